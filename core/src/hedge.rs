//! A route's hedging settings, compiled, and the latency estimate a
//! percentile delay (`after = "p95"`) reads.
//!
//! [`LatencyEstimate`] is a decaying histogram: 64 logarithmic buckets (four
//! per doubling, about 19% wide) from 100µs to about 5s, counted with relaxed
//! atomics. Every [`DECAY_EVERY`] samples all counts are halved, so the
//! estimate follows the route's recent latency (old samples weigh half as much
//! per period) without a clock or a lock. A percentile reads the buckets once
//! (64 loads) and answers the upper bound of the bucket it falls in: at most
//! 19% above the true value, which errs towards hedging later.
//!
//! Until [`MIN_SAMPLES`] samples are in, a percentile is not trusted and the
//! delay is [`FALLBACK_DELAY`] (1s): conservative, so a new route or a freshly
//! loaded policy does not hedge on a guess. Concurrent halving and counting may
//! lose a few samples; that is the price of no lock, and harmless for an
//! estimate.
//!
//! The hedge layer (`weft_stack::hedge`) records the time each answering try
//! took to its response head, and asks for the delay before each hedge.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use weft_config::{Hedge, HedgeAfter};

/// Buckets of the estimate.
const BUCKETS: usize = 64;
/// The lower bound of the first bucket, in seconds (100µs).
const FIRST: f64 = 1e-4;
/// Buckets per doubling of latency.
const PER_DOUBLING: f64 = 4.0;
/// Samples between two halvings of every count.
pub const DECAY_EVERY: u64 = 1024;
/// Samples needed before a percentile is used.
pub const MIN_SAMPLES: u32 = 20;
/// The delay of a percentile hedge before [`MIN_SAMPLES`] samples.
pub const FALLBACK_DELAY: Duration = Duration::from_secs(1);

/// A route's latency, recent samples weighing most.
#[derive(Debug)]
pub struct LatencyEstimate {
    buckets: [AtomicU32; BUCKETS],
    samples: AtomicU64,
}

impl Default for LatencyEstimate {
    fn default() -> Self {
        Self {
            buckets: std::array::from_fn(|_| AtomicU32::new(0)),
            samples: AtomicU64::new(0),
        }
    }
}

impl LatencyEstimate {
    /// One try's time to its response head.
    pub fn record(&self, latency: Duration) {
        let ratio = latency.as_secs_f64() / FIRST;
        let index = if ratio <= 1.0 {
            0
        } else {
            // Finite and positive here; `as` saturates.
            ((ratio.log2() * PER_DOUBLING) as usize).min(BUCKETS - 1)
        };
        self.buckets[index].fetch_add(1, Ordering::Relaxed);
        let n = self.samples.fetch_add(1, Ordering::Relaxed) + 1;
        if n.is_multiple_of(DECAY_EVERY) {
            for bucket in &self.buckets {
                let count = bucket.load(Ordering::Relaxed);
                bucket.store(count / 2, Ordering::Relaxed);
            }
        }
    }

    /// The latency below which `percentile` percent of the (weighted)
    /// samples fall, as its bucket's upper bound; None before
    /// [`MIN_SAMPLES`] samples.
    pub fn percentile(&self, percentile: f64) -> Option<Duration> {
        let counts: [u32; BUCKETS] =
            std::array::from_fn(|i| self.buckets[i].load(Ordering::Relaxed));
        let total: u64 = counts.iter().map(|&c| u64::from(c)).sum();
        if total < u64::from(MIN_SAMPLES) {
            return None;
        }
        // The rank of the percentile, 1-based: ceil(total * p / 100).
        let rank = ((total as f64) * percentile / 100.0).ceil().max(1.0);
        let mut seen = 0u64;
        for (i, &count) in counts.iter().enumerate() {
            seen += u64::from(count);
            if seen as f64 >= rank {
                let upper = FIRST * ((i + 1) as f64 / PER_DOUBLING).exp2();
                return Some(Duration::from_secs_f64(upper));
            }
        }
        Some(Duration::from_secs_f64(
            FIRST * (BUCKETS as f64 / PER_DOUBLING).exp2(),
        ))
    }
}

/// When a route's hedges go.
#[derive(Debug)]
pub enum HedgeDelay {
    Fixed(Duration),
    Percentile {
        percentile: f64,
        /// Boxed: 64 counters.
        estimate: Box<LatencyEstimate>,
    },
}

/// `routes[].hedge`, compiled: one per route, shared by its requests.
#[derive(Debug)]
pub struct HedgePlan {
    pub delay: HedgeDelay,
    /// Hedges per request (1 to 3).
    pub max: u32,
}

impl HedgePlan {
    pub fn new(hedge: &Hedge) -> Arc<Self> {
        let delay = match hedge.after {
            HedgeAfter::Delay(delay) => HedgeDelay::Fixed(delay.get()),
            HedgeAfter::Percentile(percentile) => HedgeDelay::Percentile {
                percentile,
                estimate: Box::default(),
            },
        };
        Arc::new(Self {
            delay,
            max: hedge.max.clamp(1, Hedge::MAX_HEDGES),
        })
    }

    /// How long a try waits for its response head before a hedge goes.
    pub fn delay(&self) -> Duration {
        match &self.delay {
            HedgeDelay::Fixed(delay) => *delay,
            HedgeDelay::Percentile {
                percentile,
                estimate,
            } => estimate.percentile(*percentile).unwrap_or(FALLBACK_DELAY),
        }
    }

    /// A try answered after `latency` (feeds a percentile delay).
    pub fn observe(&self, latency: Duration) {
        if let HedgeDelay::Percentile { estimate, .. } = &self.delay {
            estimate.record(latency);
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn a_percentile_needs_samples_and_falls_in_the_right_bucket() {
        let estimate = LatencyEstimate::default();
        for _ in 0..MIN_SAMPLES - 1 {
            estimate.record(Duration::from_millis(10));
        }
        assert_eq!(estimate.percentile(95.0), None);
        // 90 fast samples and 10 slow: p50 is near 10ms, p95 near 200ms.
        for _ in 0..71 {
            estimate.record(Duration::from_millis(10));
        }
        for _ in 0..10 {
            estimate.record(Duration::from_millis(200));
        }
        let p50 = estimate.percentile(50.0).unwrap();
        assert!(
            p50 >= Duration::from_millis(10) && p50 < Duration::from_millis(12),
            "{p50:?}"
        );
        let p95 = estimate.percentile(95.0).unwrap();
        assert!(
            p95 >= Duration::from_millis(200) && p95 < Duration::from_millis(240),
            "{p95:?}"
        );
    }

    #[test]
    fn old_samples_fade() {
        let estimate = LatencyEstimate::default();
        for _ in 0..DECAY_EVERY {
            estimate.record(Duration::from_millis(500));
        }
        // Then the route gets fast: after a few halvings the slow samples
        // are under 5% and p95 follows the fast ones.
        for _ in 0..4 * DECAY_EVERY {
            estimate.record(Duration::from_millis(5));
        }
        let p95 = estimate.percentile(95.0).unwrap();
        assert!(p95 < Duration::from_millis(7), "{p95:?}");
    }

    #[test]
    fn the_fallback_before_samples_is_conservative() {
        let hedge = Hedge {
            after: HedgeAfter::Percentile(95.0),
            max: 1,
        };
        let plan = HedgePlan::new(&hedge);
        assert_eq!(plan.delay(), FALLBACK_DELAY);
        let hedge = Hedge {
            after: HedgeAfter::Delay(weft_config::Duration::from_millis(20)),
            max: 2,
        };
        let plan = HedgePlan::new(&hedge);
        assert_eq!((plan.delay(), plan.max), (Duration::from_millis(20), 2));
    }
}
