//! Counters of what happened to requests, per service and per direction.
//!
//! Every refusal the proxy produces is counted by its `weft-reason`; retries and
//! ejections are counted where they happen. The admin API shows them in
//! `/endpoints`; the telemetry layer exports the same counters.

use std::sync::atomic::{AtomicU64, Ordering};

use serde_json::{Value, json};

use crate::error::Reason;

/// Refusal reasons that are counted (the `weft-reason` values of limits, and
/// injected faults, counted apart so that they are never taken for failures).
pub const REFUSALS: [Reason; 8] = [
    Reason::Denied,
    Reason::RateLimit,
    Reason::ConcurrencyCap,
    Reason::Timeout,
    Reason::NoHealthyEndpoints,
    Reason::BudgetExhausted,
    Reason::ColdStartTimeout,
    Reason::InjectedFault,
];

#[derive(Debug, Default)]
pub struct Stats {
    requests: AtomicU64,
    retries: AtomicU64,
    ejections: AtomicU64,
    refusals: [AtomicU64; REFUSALS.len()],
    other_failures: AtomicU64,
}

impl Stats {
    pub fn request(&self) {
        self.requests.fetch_add(1, Ordering::Relaxed);
    }

    pub fn retry(&self) {
        self.retries.fetch_add(1, Ordering::Relaxed);
    }

    pub fn ejection(&self) {
        self.ejections.fetch_add(1, Ordering::Relaxed);
    }

    /// Count a response the proxy produced for `reason`.
    pub fn refusal(&self, reason: Reason) {
        match REFUSALS.iter().position(|r| *r == reason) {
            Some(i) => self.refusals[i].fetch_add(1, Ordering::Relaxed),
            None => self.other_failures.fetch_add(1, Ordering::Relaxed),
        };
    }

    pub fn refusals(&self, reason: Reason) -> u64 {
        REFUSALS
            .iter()
            .position(|r| *r == reason)
            .map_or(0, |i| self.refusals[i].load(Ordering::Relaxed))
    }

    pub fn to_json(&self) -> Value {
        let refusals: serde_json::Map<String, Value> = REFUSALS
            .iter()
            .zip(&self.refusals)
            .map(|(r, c)| (r.as_str().to_owned(), json!(c.load(Ordering::Relaxed))))
            .collect();
        json!({
            "requests": self.requests.load(Ordering::Relaxed),
            "retries": self.retries.load(Ordering::Relaxed),
            "ejections": self.ejections.load(Ordering::Relaxed),
            "refusals": refusals,
            "other_failures": self.other_failures.load(Ordering::Relaxed),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_by_reason() {
        let s = Stats::default();
        s.refusal(Reason::RateLimit);
        s.refusal(Reason::RateLimit);
        s.refusal(Reason::ConnectFailure);
        s.refusal(Reason::Denied);
        s.refusal(Reason::ColdStartTimeout);
        s.refusal(Reason::InjectedFault);
        s.request();
        let j = s.to_json();
        assert_eq!(j["refusals"]["rate-limit"], 2);
        assert_eq!(j["refusals"]["timeout"], 0);
        assert_eq!(j["refusals"]["denied"], 1);
        assert_eq!(j["refusals"]["cold-start-timeout"], 1);
        assert_eq!(j["refusals"]["injected-fault"], 1);
        assert_eq!(j["other_failures"], 1);
        assert_eq!(j["requests"], 1);
    }
}
