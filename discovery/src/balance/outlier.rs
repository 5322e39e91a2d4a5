//! Passive health: outlier ejection from the failures real traffic sees.
//!
//! Every finished attempt is recorded against its endpoint. A failure (5xx
//! response, connect failure, reset, timeout) increments a consecutive-failure
//! count; a success resets it. When the count reaches `consecutive_failures` the
//! endpoint is ejected for `ejection x 2^(n-1)` (n = ejections so far, capped at
//! `max_ejection`), unless that would eject more than `max_ejected_percent` of the
//! service's endpoints. When the time is up the endpoint is eligible again and real
//! traffic probes it: a failure there counts from zero again, a success after a
//! quiet period forgets earlier ejections.
//!
//! State is per endpoint and lock-free except for the ejection deadline, guarded by
//! a mutex held for a few instructions.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use weft_config::Outlier;

/// Upper bound on the doubling exponent (2^16 x ejection is beyond any max_ejection).
const MAX_DOUBLINGS: u32 = 16;

#[derive(Debug, Default)]
pub struct OutlierState {
    consecutive: AtomicU32,
    ejections: AtomicU32,
    ejected: Mutex<Option<Ejection>>,
}

#[derive(Debug, Clone, Copy)]
struct Ejection {
    until: Instant,
    base: Duration,
}

impl OutlierState {
    fn ejection(&self) -> Option<Ejection> {
        match self.ejected.lock() {
            Ok(g) => *g,
            Err(p) => *p.into_inner(),
        }
    }

    fn set_ejection(&self, value: Option<Ejection>) {
        match self.ejected.lock() {
            Ok(mut g) => *g = value,
            Err(p) => *p.into_inner() = value,
        }
    }

    /// Whether the endpoint is ejected at `now`.
    pub fn is_ejected(&self, now: Instant) -> bool {
        self.ejected_for(now).is_some()
    }

    /// How much longer the endpoint stays ejected, if it is.
    pub fn ejected_for(&self, now: Instant) -> Option<Duration> {
        self.ejection()
            .filter(|e| e.until > now)
            .map(|e| e.until - now)
    }

    /// Times this endpoint was ejected since it was last forgiven.
    pub fn ejections(&self) -> u32 {
        self.ejections.load(Ordering::Relaxed)
    }

    /// Ends the current ejection, if any: the endpoint's own sidecar found its
    /// app answering again after reporting it unhealthy, which outranks the
    /// failures that ejected it (those were the same outage). Past ejections
    /// still count towards the next ejection's length.
    pub fn uneject(&self) {
        self.consecutive.store(0, Ordering::Relaxed);
        if let Some(e) = self.ejection() {
            // Keep the base: `success` forgives past ejections after a quiet
            // period measured from `until`.
            self.set_ejection(Some(Ejection {
                until: Instant::now().min(e.until),
                base: e.base,
            }));
        }
    }

    /// Record a success.
    pub fn success(&self, now: Instant) {
        self.consecutive.store(0, Ordering::Relaxed);
        // After a quiet period as long as the base ejection, forget past ejections
        // so that the next one starts short again.
        if self.ejections.load(Ordering::Relaxed) > 0
            && let Some(e) = self.ejection()
            && now >= e.until + e.base
        {
            self.ejections.store(0, Ordering::Relaxed);
            self.set_ejection(None);
        }
    }

    /// Record a failure. `may_eject` is asked (only when the threshold is reached)
    /// whether one more ejection stays within `max_ejected_percent`. Returns the
    /// ejection time when this failure ejected the endpoint.
    pub fn failure(
        &self,
        settings: &Outlier,
        now: Instant,
        may_eject: impl FnOnce() -> bool,
    ) -> Option<Duration> {
        let count = self
            .consecutive
            .fetch_add(1, Ordering::Relaxed)
            .saturating_add(1);
        if count < settings.consecutive_failures.get() || self.is_ejected(now) || !may_eject() {
            return None;
        }
        let n = self
            .ejections
            .fetch_add(1, Ordering::Relaxed)
            .min(MAX_DOUBLINGS);
        let base = settings.ejection.get();
        let time = base
            .checked_mul(1u32 << n)
            .unwrap_or(Duration::MAX)
            .min(settings.max_ejection.get().max(base));
        self.consecutive.store(0, Ordering::Relaxed);
        self.set_ejection(Some(Ejection {
            until: now + time,
            base,
        }));
        Some(time)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::num::NonZeroU32;

    fn settings(n: u32) -> Outlier {
        Outlier {
            consecutive_failures: NonZeroU32::new(n).unwrap(),
            ejection: weft_config::Duration::from_secs(10),
            max_ejection: weft_config::Duration::from_secs(35),
            max_ejected_percent: weft_config::Percent::new(100).unwrap(),
        }
    }

    #[test]
    fn ejects_after_consecutive_failures_only() {
        let s = settings(3);
        let o = OutlierState::default();
        let t = Instant::now();
        assert!(o.failure(&s, t, || true).is_none());
        assert!(o.failure(&s, t, || true).is_none());
        o.success(t);
        assert!(o.failure(&s, t, || true).is_none());
        assert!(o.failure(&s, t, || true).is_none());
        assert_eq!(o.failure(&s, t, || true), Some(Duration::from_secs(10)));
        assert!(o.is_ejected(t + Duration::from_secs(9)));
        assert!(!o.is_ejected(t + Duration::from_secs(10)));
    }

    #[test]
    fn ejection_time_doubles_up_to_the_cap_and_is_forgiven() {
        let s = settings(1);
        let o = OutlierState::default();
        let mut t = Instant::now();
        let mut times = vec![];
        for _ in 0..4 {
            times.push(o.failure(&s, t, || true).unwrap());
            t += times[times.len() - 1];
        }
        assert_eq!(
            times.iter().map(|d| d.as_secs()).collect::<Vec<_>>(),
            [10, 20, 35, 35]
        );
        // A success long after the last ejection forgets them.
        o.success(t + Duration::from_secs(10));
        assert_eq!(o.ejections(), 0);
        assert_eq!(
            o.failure(&s, t + Duration::from_secs(11), || true),
            Some(Duration::from_secs(10))
        );
    }

    #[test]
    fn uneject_ends_the_ejection_at_once() {
        let s = settings(1);
        let o = OutlierState::default();
        let now = Instant::now();
        o.failure(&s, now, || true).unwrap();
        assert!(o.is_ejected(now));
        o.uneject();
        assert!(!o.is_ejected(Instant::now()));
        assert_eq!(o.ejections(), 1);
        // Nothing to end: no change.
        o.uneject();
        assert!(!o.is_ejected(Instant::now()));
    }

    #[test]
    fn respects_the_ejection_budget() {
        let s = settings(1);
        let o = OutlierState::default();
        let t = Instant::now();
        assert!(o.failure(&s, t, || false).is_none());
        assert!(!o.is_ejected(t));
    }
}
