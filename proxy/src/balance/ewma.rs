//! Peak-EWMA latency estimate (as in Finagle and tower's `PeakEwma`).
//!
//! An endpoint starts with a default estimate; its first response replaces it (a
//! measurement beats a guess). After that, a sample above the estimate replaces it
//! at once (the "peak": an endpoint that turns slow is avoided immediately); a
//! sample below it is blended in with a weight that grows with the time since the
//! last update. Between samples the estimate decays towards zero with time constant
//! `DECAY`, so an endpoint avoided for being slow is eventually tried again instead
//! of starving forever. Until its first response an endpoint is [`PeakEwma::is_sampled`]
//! false, and the balancer prices it at its rival's estimate (see `balance::p2c`).

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How fast old observations lose weight.
const DECAY: Duration = Duration::from_secs(10);

/// The estimate an endpoint starts with before its first response: high enough that
/// a new endpoint is not flooded before it has answered once, low enough that it is
/// tried promptly.
const DEFAULT_RTT: Duration = Duration::from_millis(30);

#[derive(Debug)]
pub struct PeakEwma {
    state: Mutex<State>,
}

#[derive(Debug, Clone, Copy)]
struct State {
    rtt_nanos: f64,
    updated: Instant,
    /// Whether a response has been observed (else `rtt_nanos` is the default).
    sampled: bool,
}

impl Default for PeakEwma {
    fn default() -> Self {
        Self::new(DEFAULT_RTT, Instant::now())
    }
}

impl PeakEwma {
    pub fn new(initial: Duration, now: Instant) -> Self {
        Self {
            state: Mutex::new(State {
                rtt_nanos: initial.as_nanos() as f64,
                updated: now,
                sampled: false,
            }),
        }
    }

    fn with_state<T>(&self, f: impl FnOnce(&mut State) -> T) -> T {
        // A poisoned lock only means another thread panicked mid-update of two
        // plain numbers; the numbers are still usable.
        let mut guard = match self.state.lock() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        };
        f(&mut guard)
    }

    /// The decayed estimate at `now`, in nanoseconds.
    pub fn estimate_nanos(&self, now: Instant) -> f64 {
        self.with_state(|s| s.decayed(now))
    }

    pub fn estimate(&self, now: Instant) -> Duration {
        Duration::from_nanos(self.estimate_nanos(now) as u64)
    }

    /// True once a response has been observed.
    pub fn is_sampled(&self) -> bool {
        self.with_state(|s| s.sampled)
    }

    /// Fold in one observed latency.
    pub fn observe(&self, rtt: Duration, now: Instant) {
        let rtt = rtt.as_nanos() as f64;
        self.with_state(|s| {
            let elapsed = now.saturating_duration_since(s.updated).as_secs_f64();
            if !s.sampled || rtt > s.rtt_nanos {
                s.sampled = true;
                s.rtt_nanos = rtt;
            } else {
                let w = (-elapsed / DECAY.as_secs_f64()).exp();
                s.rtt_nanos = s.rtt_nanos * w + rtt * (1.0 - w);
            }
            s.updated = now;
        })
    }
}

impl State {
    fn decayed(&self, now: Instant) -> f64 {
        let elapsed = now.saturating_duration_since(self.updated).as_secs_f64();
        self.rtt_nanos * (-elapsed / DECAY.as_secs_f64()).exp()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_sample_replaces_the_default() {
        let t0 = Instant::now();
        let e = PeakEwma::new(Duration::from_millis(30), t0);
        assert!(!e.is_sampled());
        e.observe(Duration::from_millis(1), t0 + Duration::from_millis(100));
        assert!(e.is_sampled());
        assert_eq!(
            e.estimate(t0 + Duration::from_millis(100)),
            Duration::from_millis(1)
        );
    }

    #[test]
    fn peak_replaces_and_low_samples_blend() {
        let t0 = Instant::now();
        let e = PeakEwma::new(Duration::from_millis(10), t0);
        e.observe(Duration::from_millis(50), t0);
        assert_eq!(e.estimate(t0), Duration::from_millis(50));
        // A fast sample right away barely moves the estimate...
        e.observe(Duration::from_millis(1), t0 + Duration::from_millis(1));
        assert!(e.estimate(t0 + Duration::from_millis(1)) > Duration::from_millis(45));
        // ...and the estimate decays with time.
        let later = t0 + Duration::from_secs(30);
        assert!(e.estimate(later) < Duration::from_millis(5));
    }
}
