//! Adaptive concurrency limits: a limit that follows measured latency.
//!
//! [`GradientLimit`] is the limiter, in the spirit of Netflix
//! concurrency-limits' Gradient2. It keeps a long-term latency (an
//! exponential moving average over `long_window` responses) and compares each
//! response's latency (the short term) with it:
//!
//! ```text
//! gradient = clamp(tolerance * long / short, 0.5, 1.0)
//! target   = limit * gradient + sqrt(limit) * (2 * gradient - 1)
//! limit    = clamp(limit * (1 - smoothing) + target * smoothing, min, max)
//! ```
//!
//! While responses are no slower than `tolerance` times the long-term
//! latency, the gradient is 1 and the limit grows by its square root (the
//! queue it allows); when they get slower, the limit shrinks, by at most half
//! per response before smoothing. Unlike Gradient2, whose fixed headroom
//! (`queue_size`, 4) keeps the limit at 8 or more however slow the endpoint
//! gets, the headroom shrinks with the gradient, to nothing at 0.5: a limit
//! under lasting overload goes down to `min_limit`. Rules kept from Gradient2:
//!
//! - a limit that is not used is not moved: with fewer than half of the limit
//!   in flight, a sample only feeds the long-term latency (an idle endpoint's
//!   limit does not grow without bound, and a latency this caller does not
//!   cause does not lower it);
//! - a latency that lasts becomes the new normal: the long-term latency
//!   reaches it over about `long_window` responses, and the limit grows back;
//! - when the long-term latency is more than twice the latest one, it decays
//!   by 5% a response, so a recovered endpoint's limit recovers too;
//! - samples of failed or dropped requests (errors, 5xx, timeouts, cancelled
//!   requests) are ignored: their latency says nothing about the endpoint's
//!   queue. The caller simply does not report them.
//!
//! The limit is read lock-free (an atomic, published after each update); an
//! update takes a mutex for a few float operations, never across an await.
//! The settings are passed to each call rather than stored, so a policy
//! reload with new bounds applies at once to the limit and its history
//! carries over.
//!
//! [`AdaptiveConcurrency`] pairs a limit with its own in-flight count, for a
//! limit on everything through it (`inbound.adaptive_concurrency`, per
//! instance). Outbound, each endpoint keeps a [`GradientLimit`] and uses its
//! own in-flight count (`weft-discovery`'s `Endpoint`); [`EndpointCap`] says
//! which cap, static or adaptive, the policy puts on endpoints.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::time::Instant;

use weft_config::AdaptiveConcurrency as Settings;

use super::ConcurrencyCapped;

/// Samples averaged plainly before the long-term latency becomes an
/// exponential moving average (Gradient2's warm-up).
const WARMUP: u32 = 10;

/// One adaptive limit's state.
#[derive(Debug)]
pub struct GradientLimit {
    /// The limit as last computed, rounded down: what requests are admitted
    /// against.
    limit: AtomicU32,
    state: Mutex<State>,
}

#[derive(Debug)]
struct State {
    /// The limit unrounded.
    estimate: f64,
    /// Long-term latency in nanoseconds.
    long_rtt: f64,
    /// Samples taken, up to `WARMUP`.
    samples: u32,
}

impl GradientLimit {
    pub fn new(settings: &Settings) -> Self {
        let initial = settings.initial();
        Self {
            limit: AtomicU32::new(initial),
            state: Mutex::new(State {
                estimate: f64::from(initial),
                long_rtt: 0.0,
                samples: 0,
            }),
        }
    }

    /// The current limit, within `settings`' bounds (which may have changed
    /// since the last sample).
    pub fn limit(&self, settings: &Settings) -> u32 {
        self.limit
            .load(Ordering::Relaxed)
            .clamp(settings.min_limit.get(), settings.max_limit.get())
    }

    /// Feeds the latency of one successful request, with `in_flight` requests
    /// in flight through the limit as it ended; returns the new limit.
    pub fn sample(&self, settings: &Settings, rtt: Duration, in_flight: u32) -> u32 {
        let (min, max) = (
            f64::from(settings.min_limit.get()),
            f64::from(settings.max_limit.get()),
        );
        let rtt = (rtt.as_secs_f64() * 1e9).max(1.0);
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        let s = &mut *state;
        if s.samples < WARMUP {
            s.samples += 1;
            s.long_rtt += (rtt - s.long_rtt) / f64::from(s.samples);
        } else {
            let alpha = 2.0 / (f64::from(settings.long_window.get()) + 1.0);
            s.long_rtt += (rtt - s.long_rtt) * alpha;
        }
        // Latency fell well below the long-term view: let that view follow
        // faster, or the limit would stay low after a recovery.
        if s.long_rtt / rtt > 2.0 {
            s.long_rtt *= 0.95;
        }
        let estimate = s.estimate.clamp(min, max);
        if f64::from(in_flight) >= estimate / 2.0 {
            let gradient = (settings.tolerance * s.long_rtt / rtt).clamp(0.5, 1.0);
            let target = estimate * gradient + estimate.sqrt() * (2.0 * gradient - 1.0);
            let smoothing = settings.smoothing;
            s.estimate = (estimate * (1.0 - smoothing) + target * smoothing).clamp(min, max);
        } else {
            s.estimate = estimate;
        }
        // In min..=max, so within u32.
        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
        let limit = s.estimate as u32;
        self.limit.store(limit, Ordering::Relaxed);
        limit
    }
}

/// The cap a policy puts on each endpoint, per caller sidecar.
#[derive(Debug, Clone, Copy, Default)]
pub enum EndpointCap<'a> {
    /// No cap.
    #[default]
    None,
    /// `outbound.endpoint_max_concurrency`.
    Static(u32),
    /// `outbound.adaptive_concurrency`: each endpoint's own limit.
    Adaptive(&'a Settings),
}

impl EndpointCap<'_> {
    /// The policy key of the cap, for `weft-limit` (`None` for no cap).
    pub fn key(&self) -> Option<&'static str> {
        match self {
            Self::None => None,
            Self::Static(_) => Some("outbound.endpoint_max_concurrency"),
            Self::Adaptive(_) => Some("outbound.adaptive_concurrency"),
        }
    }
}

/// An adaptive limit on everything through it, with its own in-flight count.
#[derive(Debug)]
pub struct AdaptiveConcurrency {
    name: Arc<str>,
    settings: Settings,
    limit: GradientLimit,
    in_flight: AtomicU32,
}

impl AdaptiveConcurrency {
    pub fn new(name: impl Into<Arc<str>>, settings: &Settings) -> Arc<Self> {
        Arc::new(Self {
            name: name.into(),
            settings: *settings,
            limit: GradientLimit::new(settings),
            in_flight: AtomicU32::new(0),
        })
    }

    /// `previous` when it has exactly these settings (its limit and in-flight
    /// count carry over a reload), else a new limit.
    pub fn reuse_or_new(
        previous: Option<&Arc<Self>>,
        name: &str,
        settings: &Settings,
    ) -> Arc<Self> {
        match previous {
            Some(p) if &*p.name == name && p.settings == *settings => Arc::clone(p),
            _ => Self::new(name, settings),
        }
    }

    /// A permit if fewer than the current limit are in flight (never waits).
    pub fn try_acquire(self: &Arc<Self>) -> Option<AdaptivePermit> {
        let limit = self.limit();
        self.in_flight
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < limit).then_some(n + 1)
            })
            .ok()?;
        Some(AdaptivePermit {
            owner: Arc::clone(self),
            started: Instant::now(),
        })
    }

    /// The refusal of a request that found the limit reached.
    pub fn refusal(&self) -> ConcurrencyCapped {
        ConcurrencyCapped {
            limit: Arc::clone(&self.name),
            waited: false,
        }
    }

    /// The current limit.
    pub fn limit(&self) -> u32 {
        self.limit.limit(&self.settings)
    }

    /// Requests holding a permit.
    pub fn in_flight(&self) -> u32 {
        self.in_flight.load(Ordering::Acquire)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn settings(&self) -> &Settings {
        &self.settings
    }
}

/// A slot under an [`AdaptiveConcurrency`], held until the response body
/// ends; dropping it frees the slot.
#[derive(Debug)]
pub struct AdaptivePermit {
    owner: Arc<AdaptiveConcurrency>,
    /// tokio's clock (the same as std's outside paused-time tests).
    started: Instant,
}

impl AdaptivePermit {
    /// Feeds the time since the permit was taken into the limit: call it for
    /// successful requests only (see the module's notes on ignored samples).
    pub fn observe_success(&self) {
        let owner = &self.owner;
        owner
            .limit
            .sample(&owner.settings, self.started.elapsed(), owner.in_flight());
    }
}

impl Drop for AdaptivePermit {
    fn drop(&mut self) {
        self.owner.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::num::NonZeroU32;

    fn bound(n: u32) -> NonZeroU32 {
        NonZeroU32::new(n).unwrap()
    }

    fn settings(min: u32, max: u32, initial: u32) -> Settings {
        Settings {
            min_limit: bound(min),
            max_limit: bound(max),
            initial_limit: Some(bound(initial)),
            ..Settings::default()
        }
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    /// `n` samples of `rtt`, each with the limit fully used.
    fn feed(limit: &GradientLimit, s: &Settings, rtt: Duration, n: usize) -> u32 {
        let mut last = limit.limit(s);
        for _ in 0..n {
            last = limit.sample(s, rtt, limit.limit(s));
        }
        last
    }

    #[test]
    fn the_limit_grows_while_latency_is_steady_up_to_max() {
        let s = settings(5, 100, 20);
        let limit = GradientLimit::new(&s);
        assert_eq!(limit.limit(&s), 20);
        let after = feed(&limit, &s, ms(10), 20);
        assert!(after > 20, "{after}");
        assert_eq!(feed(&limit, &s, ms(10), 2_000), 100, "capped at max_limit");
    }

    #[test]
    fn the_limit_falls_when_latency_rises_and_recovers_when_it_falls() {
        let s = settings(2, 200, 50);
        let limit = GradientLimit::new(&s);
        let steady = feed(&limit, &s, ms(10), 200);
        assert!(steady >= 50, "{steady}");
        // Three times slower: the limit falls, far and fast.
        let slow = feed(&limit, &s, ms(30), 30);
        assert!(slow * 2 < steady, "{steady} -> {slow}");
        let slowest = feed(&limit, &s, ms(30), 30);
        assert!(slowest <= slow, "{slow} -> {slowest}");
        // Fast again: it climbs back.
        let recovered = feed(&limit, &s, ms(10), 2_000);
        assert!(recovered > slow * 2, "{slow} -> {recovered}");
    }

    #[test]
    fn the_limit_stays_in_its_bounds() {
        let s = settings(4, 16, 8);
        let limit = GradientLimit::new(&s);
        assert_eq!(feed(&limit, &s, ms(1), 1_000), 16);
        assert_eq!(feed(&limit, &s, Duration::from_secs(5), 100), 4);
        // Even at absurd latencies the floor holds, and a reload with new
        // bounds applies at once.
        let tighter = settings(6, 10, 8);
        assert_eq!(limit.limit(&tighter), 6);
        assert_eq!(limit.sample(&tighter, Duration::from_secs(50), 6), 6);
        let zero = limit.sample(&tighter, Duration::ZERO, 6);
        assert!((6..=10).contains(&zero), "{zero}");
    }

    #[test]
    fn a_lasting_latency_becomes_the_new_normal() {
        let s = settings(1, 100, 50);
        let limit = GradientLimit::new(&s);
        feed(&limit, &s, ms(10), 200);
        let low = feed(&limit, &s, ms(40), 50);
        assert!(low < 10, "{low}");
        // Over about `long_window` responses the long-term latency reaches
        // 40ms, and the limit grows back (Gradient2 does the same).
        let later = feed(&limit, &s, ms(40), 3_000);
        assert_eq!(later, 100);
    }

    #[test]
    fn an_unused_limit_does_not_move() {
        let s = settings(1, 1_000, 20);
        let limit = GradientLimit::new(&s);
        // Fewer than half of the limit in flight: fast or slow, no change.
        for rtt in [ms(1), ms(500), ms(1)] {
            for _ in 0..100 {
                assert_eq!(limit.sample(&s, rtt, 3), 20);
            }
        }
    }

    #[test]
    fn failed_requests_are_not_sampled() {
        let s = settings(1, 100, 20);
        let gate = AdaptiveConcurrency::new("inbound.adaptive_concurrency", &s);
        for _ in 0..200 {
            let held: Vec<_> = (0..gate.limit())
                .filter_map(|_| gate.try_acquire())
                .collect();
            // Every request failed: dropped without a sample.
            drop(held);
        }
        assert_eq!(gate.limit(), 20);
        assert_eq!(gate.in_flight(), 0);
    }

    #[test]
    fn the_gate_admits_up_to_the_limit_and_frees_on_drop() {
        let s = settings(2, 10, 2);
        let gate = AdaptiveConcurrency::new("inbound.adaptive_concurrency", &s);
        let a = gate.try_acquire().unwrap();
        let _b = gate.try_acquire().unwrap();
        assert!(gate.try_acquire().is_none());
        assert_eq!(
            gate.refusal().to_string(),
            "concurrency cap inbound.adaptive_concurrency reached"
        );
        a.observe_success();
        drop(a);
        assert_eq!(gate.in_flight(), 1);
        assert!(gate.try_acquire().is_some());

        let same =
            AdaptiveConcurrency::reuse_or_new(Some(&gate), "inbound.adaptive_concurrency", &s);
        assert!(Arc::ptr_eq(&gate, &same));
        let other = AdaptiveConcurrency::reuse_or_new(
            Some(&gate),
            "inbound.adaptive_concurrency",
            &settings(2, 11, 2),
        );
        assert!(!Arc::ptr_eq(&gate, &other));
    }
}
