//! The bounds on calls held while a service scales from zero
//! (`outbound.cold_start`).
//!
//! One [`ColdStartGate`] per service and caller sidecar, compiled with the
//! service's outbound policy (so it survives a reload that leaves the policy
//! unchanged), shared by every request to the service. It counts the calls
//! held now ([`HeldSlot`]s: at most `queue`, each released by dropping it,
//! whether the call was let through, timed out or abandoned by its caller)
//! and decides when the activator is due: on a held call when none was
//! called within the last `hold`, so a burst of calls into one cold start
//! calls it once, and a cold start that outlives `hold` calls it again.
//!
//! The gate neither waits nor sleeps: the cold-start layer of the stack does
//! the holding, on the service's endpoint watch.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::time::Instant;
use weft_config::{ActivatorUrl, ColdStart};

/// `weft-limit` of a call refused because `queue` calls are held already.
pub const QUEUE_LIMIT: &str = "outbound.cold_start.queue";
/// `weft-limit` of a call that was held `hold` without an instance coming.
pub const HOLD_LIMIT: &str = "outbound.cold_start.hold";

/// A held call that could not go through (`weft-reason: cold-start-timeout`).
#[derive(Debug, Clone, thiserror::Error)]
pub enum ColdStartRefused {
    #[error(
        "service {service:?} has no endpoint and {queue} calls already wait for its first \
         instance ({QUEUE_LIMIT})"
    )]
    Overflow { service: String, queue: u32 },
    #[error("no instance of service {service:?} came within {hold:?} ({HOLD_LIMIT})")]
    Timeout { service: String, hold: Duration },
}

impl ColdStartRefused {
    /// The policy key that refused (`weft-limit`).
    pub fn limit(&self) -> &'static str {
        match self {
            Self::Overflow { .. } => QUEUE_LIMIT,
            Self::Timeout { .. } => HOLD_LIMIT,
        }
    }
}

/// One service's held calls and activator timing.
#[derive(Debug)]
pub struct ColdStartGate {
    hold: Duration,
    queue: u32,
    activate: Option<ActivatorUrl>,
    held: AtomicU32,
    /// When the activator was last due (None: never).
    last_activation: Mutex<Option<Instant>>,
}

impl ColdStartGate {
    pub fn new(settings: &ColdStart) -> Arc<Self> {
        Arc::new(Self {
            hold: settings.hold.get(),
            queue: settings.queue.max(1),
            activate: settings.activate.clone(),
            held: AtomicU32::new(0),
            last_activation: Mutex::new(None),
        })
    }

    /// The longest a call is held.
    pub fn hold(&self) -> Duration {
        self.hold
    }

    /// The activator's URL, if the policy names one.
    pub fn activator(&self) -> Option<&ActivatorUrl> {
        self.activate.as_ref()
    }

    /// Calls held now.
    pub fn held(&self) -> u32 {
        self.held.load(Ordering::Relaxed)
    }

    /// A slot for one more held call of `service`, unless `queue` are held.
    pub fn try_hold(self: &Arc<Self>, service: &str) -> Result<HeldSlot, ColdStartRefused> {
        self.held
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < self.queue).then_some(n + 1)
            })
            .map(|_| HeldSlot {
                gate: Arc::clone(self),
            })
            .map_err(|_| ColdStartRefused::Overflow {
                service: service.to_owned(),
                queue: self.queue,
            })
    }

    /// Whether a call held at `now` calls the activator: there is one, and
    /// it was not called within the last `hold` (at most once per window).
    pub fn activation_due(&self, now: Instant) -> bool {
        if self.activate.is_none() {
            return false;
        }
        let mut last = self
            .last_activation
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        match *last {
            Some(at) if now.saturating_duration_since(at) < self.hold => false,
            _ => {
                *last = Some(now);
                true
            }
        }
    }

    /// The refusal of a call of `service` held for `hold` in vain.
    pub fn timed_out(&self, service: &str) -> ColdStartRefused {
        ColdStartRefused::Timeout {
            service: service.to_owned(),
            hold: self.hold,
        }
    }
}

/// One held call's place in its service's queue, given back on drop.
#[derive(Debug)]
pub struct HeldSlot {
    gate: Arc<ColdStartGate>,
}

impl Drop for HeldSlot {
    fn drop(&mut self) {
        self.gate.held.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn gate(activate: bool) -> Arc<ColdStartGate> {
        ColdStartGate::new(&ColdStart {
            hold: weft_config::Duration::from_secs(10),
            queue: 2,
            activate: activate.then(|| ActivatorUrl::parse("http://127.0.0.1:9/up").unwrap()),
        })
    }

    #[test]
    fn the_queue_bounds_held_calls_and_slots_come_back() {
        let gate = gate(false);
        let a = gate.try_hold("lazy").unwrap();
        let _b = gate.try_hold("lazy").unwrap();
        let refused = gate.try_hold("lazy").unwrap_err();
        assert_eq!(refused.limit(), QUEUE_LIMIT);
        assert_eq!(gate.held(), 2);
        drop(a);
        assert_eq!(gate.held(), 1);
        assert!(gate.try_hold("lazy").is_ok());
    }

    #[tokio::test(start_paused = true)]
    async fn the_activator_is_due_once_per_hold_window() {
        assert!(!gate(false).activation_due(Instant::now()), "none to call");
        let gate = gate(true);
        assert!(gate.activation_due(Instant::now()));
        assert!(!gate.activation_due(Instant::now()));
        tokio::time::advance(Duration::from_secs(9)).await;
        assert!(!gate.activation_due(Instant::now()));
        tokio::time::advance(Duration::from_secs(1)).await;
        assert!(gate.activation_due(Instant::now()), "a new window");
    }
}
