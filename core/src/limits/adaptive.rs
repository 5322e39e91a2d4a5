//! Adaptive concurrency limits: a limit that follows measured latency.
//!
//! [`GradientLimit`] is the limiter, in the spirit of Netflix
//! concurrency-limits' Gradient2, with a no-queue baseline as in TCP Vegas
//! and Envoy's adaptive-concurrency filter. It keeps three latencies:
//!
//! - the current latency: an exponential moving average over the last
//!   [`SHORT_WINDOW`] responses;
//! - the long-term latency: the same over the last `long_window` responses
//!   (600 by default), steady enough that one slow response or a noisy
//!   endpoint does not move it much;
//! - the baseline: the lowest long-term latency over the last
//!   `baseline_window` (a time window, 60 s by default), from the
//!   [`BASELINE_SAMPLES`]th response on. Until then the limit stays where it
//!   is (`initial_limit`): the first responses measure the endpoint at the
//!   limit a service owner chose, rather than at a limit growing into a
//!   queue, and a minimum over a few responses would be a lucky one.
//!
//! ```text
//! allowed = tolerance * baseline
//! target  = limit + sqrt(limit)                      if current <= allowed
//!           limit * max(allowed / current, 0.5)      otherwise
//! limit   = clamp(limit + (target - limit) * smoothing / limit, min, max)
//! ```
//!
//! While the current latency is at most `tolerance` times the baseline, the
//! limit grows towards its square root more; when responses get slower, it
//! shrinks in proportion, towards as little as half. So `tolerance` is the
//! queue allowed: the limit settles where the current latency is about
//! `tolerance` times the baseline. (Gradient2 and this limiter's first
//! version kept a headroom of the limit's square root however slow the
//! endpoint got, so they settled where the latency was 1.8 to 2 times the
//! allowed one.) Each response moves the limit `smoothing / limit` of the way, so a limit's
//! worth of responses (about one round trip of the endpoint's queue) moves it
//! about `smoothing` of the way: how fast the limit moves follows how fast
//! the endpoint answers, not how many callers it has. Moving a whole step per
//! response, as Gradient2 does, made the limit overshoot and swing between
//! 1 and 26 in a simulation of the bench scenario below, as the queue it
//! allowed showed in the latency only later. Unlike Gradient2, whose fixed
//! headroom (`queue_size`, 4) keeps the limit at 8 or more however slow the
//! endpoint gets, the headroom shrinks with the gradient, to nothing at 0.5:
//! a limit under lasting overload goes down to `min_limit`.
//!
//! Why a baseline, and not Gradient2's long-term average alone: the average
//! follows the queue it should measure. With the limit holding the latency
//! at `tolerance` times the average, the average rises towards it, the limit
//! grows, the queue grows, and so on: in the bench scenario of an instance
//! whose capacity halves (`benches/adaptive.sh`), the long-term latency
//! caught up within its 600 responses and the limit climbed to its maximum
//! with the queue behind it (p99 88 ms against 22 ms with a static cap). The
//! baseline only rises once a whole `baseline_window` went by with the
//! endpoint slower all along, queue or not; then the slower latency becomes
//! the new normal (an endpoint that got slower for good gets its limit back).
//! It is kept as two half-window buckets (the lowest of this half and of the
//! last), so a low latency is forgotten between half a window and a whole
//! one after it.
//!
//! Rules kept from Gradient2:
//!
//! - a limit that is not used is not moved: with fewer than half of the limit
//!   in flight, a sample only feeds the latencies (an idle endpoint's limit
//!   does not grow without bound, and a latency this caller does not cause
//!   does not lower it);
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

/// Responses the current latency averages over.
pub const SHORT_WINDOW: u32 = 10;

/// Responses the long-term latency must average before its lowest value
/// becomes the baseline.
pub const BASELINE_SAMPLES: u32 = 100;

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
    /// Samples taken (saturating): both averages are plain averages until
    /// they have seen their window.
    samples: u32,
    /// Current latency in nanoseconds.
    short: f64,
    /// Long-term latency in nanoseconds.
    long: f64,
    /// The lowest long-term latency since `bucket_start`.
    current_min: f64,
    /// The lowest long-term latency in the half window before that.
    previous_min: f64,
    bucket_start: Option<Instant>,
}

/// Moves `average` towards `value` as an exponential moving average over
/// `window` samples, or a plain average over the first `samples`.
fn average(average: &mut f64, value: f64, samples: u32, window: u32) {
    let weight = if samples <= window {
        1.0 / f64::from(samples)
    } else {
        2.0 / (f64::from(window) + 1.0)
    };
    *average += (value - *average) * weight;
}

impl State {
    /// Feeds `rtt` (nanoseconds) at `now` into the latencies; returns the
    /// current latency and the baseline, if there is one yet.
    fn observe(&mut self, rtt: f64, now: Instant, settings: &Settings) -> (f64, Option<f64>) {
        self.samples = self.samples.saturating_add(1);
        average(&mut self.short, rtt, self.samples, SHORT_WINDOW);
        average(
            &mut self.long,
            rtt,
            self.samples,
            settings.long_window.get(),
        );
        if self.samples < BASELINE_SAMPLES {
            // No baseline until the long-term latency averages enough
            // responses: a minimum of its first, few-sample values would be
            // a lucky response, not the endpoint's latency.
            return (self.short, None);
        }
        let window = settings.baseline_window.get();
        let half = window / 2;
        match self.bucket_start {
            Some(start) if now.saturating_duration_since(start) < half => {
                self.current_min = self.current_min.min(self.long);
            }
            Some(start) if now.saturating_duration_since(start) < window => {
                // The next half window: the current one becomes the last.
                self.previous_min = self.current_min;
                self.current_min = self.long;
                self.bucket_start = Some(start + half);
            }
            // The first sample, or none for a whole window.
            _ => {
                self.previous_min = self.long;
                self.current_min = self.long;
                self.bucket_start = Some(now);
            }
        }
        (self.short, Some(self.current_min.min(self.previous_min)))
    }
}

impl GradientLimit {
    pub fn new(settings: &Settings) -> Self {
        let initial = settings.initial();
        Self {
            limit: AtomicU32::new(initial),
            state: Mutex::new(State {
                estimate: f64::from(initial),
                samples: 0,
                short: 0.0,
                long: 0.0,
                current_min: f64::INFINITY,
                previous_min: f64::INFINITY,
                bucket_start: None,
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
    /// in flight through the limit as it ended (itself included); returns the
    /// new limit.
    pub fn sample(&self, settings: &Settings, rtt: Duration, in_flight: u32) -> u32 {
        self.sample_at(settings, rtt, in_flight, Instant::now())
    }

    /// [`sample`](Self::sample) at a given time.
    pub fn sample_at(
        &self,
        settings: &Settings,
        rtt: Duration,
        in_flight: u32,
        now: Instant,
    ) -> u32 {
        let (min, max) = (
            f64::from(settings.min_limit.get()),
            f64::from(settings.max_limit.get()),
        );
        let rtt = (rtt.as_secs_f64() * 1e9).max(1.0);
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        let s = &mut *state;
        let (short, baseline) = s.observe(rtt, now, settings);
        let estimate = s.estimate.clamp(min, max);
        s.estimate = match baseline {
            Some(baseline) if f64::from(in_flight) >= estimate / 2.0 => {
                let allowed = settings.tolerance * baseline;
                let target = if short <= allowed {
                    estimate + estimate.sqrt()
                } else {
                    estimate * (allowed / short).max(0.5)
                };
                let step = (settings.smoothing / estimate).min(1.0);
                (estimate + (target - estimate) * step).clamp(min, max)
            }
            _ => estimate,
        };
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

    /// A limit fed on a made-up clock, one response every `tick`.
    struct Feeder {
        limit: GradientLimit,
        settings: Settings,
        now: Instant,
        tick: Duration,
    }

    impl Feeder {
        fn new(settings: Settings) -> Self {
            Self {
                limit: GradientLimit::new(&settings),
                settings,
                now: Instant::now(),
                // 400 responses a second.
                tick: Duration::from_micros(2_500),
            }
        }

        fn limit(&self) -> u32 {
            self.limit.limit(&self.settings)
        }

        /// One response of `rtt` with the limit fully used.
        fn one(&mut self, rtt: Duration) -> u32 {
            self.now += self.tick;
            let in_flight = self.limit();
            self.limit
                .sample_at(&self.settings, rtt, in_flight, self.now)
        }

        /// `n` responses of `rtt`, the limit fully used.
        fn feed(&mut self, rtt: Duration, n: usize) -> u32 {
            let mut last = self.limit();
            for _ in 0..n {
                last = self.one(rtt);
            }
            last
        }
    }

    #[test]
    fn the_limit_grows_while_latency_is_steady_up_to_max() {
        let mut f = Feeder::new(settings(5, 100, 20));
        assert_eq!(f.limit(), 20);
        let after = f.feed(ms(10), 200);
        assert!(after > 20, "{after}");
        assert_eq!(f.feed(ms(10), 5_000), 100, "capped at max_limit");
    }

    #[test]
    fn the_limit_falls_when_latency_rises_and_recovers_when_it_falls() {
        let mut f = Feeder::new(settings(2, 200, 50));
        let steady = f.feed(ms(10), 500);
        assert!(steady >= 50, "{steady}");
        // Three times slower: the limit falls, far and fast (within about
        // ten of its round trips).
        let slow = f.feed(ms(30), 600);
        assert!(slow * 2 < steady, "{steady} -> {slow}");
        let slowest = f.feed(ms(30), 300);
        assert!(slowest <= slow, "{slow} -> {slowest}");
        // Fast again: it climbs back.
        let recovered = f.feed(ms(10), 2_000);
        assert!(recovered > slow * 2, "{slow} -> {recovered}");
    }

    #[test]
    fn the_limit_stays_in_its_bounds() {
        let mut f = Feeder::new(settings(4, 16, 8));
        assert_eq!(f.feed(ms(1), 1_000), 16);
        assert_eq!(f.feed(Duration::from_secs(5), 500), 4);
        // Even at absurd latencies the floor holds, and a reload with new
        // bounds applies at once.
        let tighter = settings(6, 10, 8);
        let limit = &f.limit;
        assert_eq!(limit.limit(&tighter), 6);
        assert_eq!(limit.sample(&tighter, Duration::from_secs(50), 6), 6);
        let zero = limit.sample(&tighter, Duration::ZERO, 6);
        assert!((6..=10).contains(&zero), "{zero}");
    }

    #[test]
    fn a_lasting_latency_becomes_the_new_normal_after_the_baseline_window() {
        let mut f = Feeder::new(settings(1, 100, 50));
        f.feed(ms(10), 2_000);
        let low = f.feed(ms(40), 1_000);
        assert!(low < 10, "{low}");
        // Still within the window (60 s; 7.5 s of responses so far): low.
        assert!(f.feed(ms(40), 8_000) < 10);
        // Once a whole window went by at 40ms, 40ms is the baseline and the
        // limit grows back.
        let later = f.feed(ms(40), 30_000);
        assert_eq!(later, 100);
    }

    /// The drift this limiter was built against: an endpoint whose capacity
    /// halves (4 slots of 10ms instead of 8; more wait in its queue). With
    /// the limit fully used, the latency is the queue the limit allows.
    /// Gradient2's long-term average follows that latency up and the limit
    /// climbs to `max_limit` with the queue behind it; the baseline does not.
    #[test]
    fn a_queue_does_not_become_the_baseline() {
        let mut f = Feeder::new(settings(1, 32, 8));
        // Healthy: 8 slots, no queue up to 8 in flight.
        for _ in 0..4_000 {
            let l = f.limit();
            f.one(ms(10) * l.max(8) / 8);
        }
        // Halved, for 30 s of responses at 400/s.
        let (mut worst, mut sum) = (0, 0);
        for i in 0..12_000 {
            let l = f.limit();
            f.one(ms(10) * l.max(4) / 4);
            if i >= 2_000 {
                worst = worst.max(l);
                sum += l;
            }
        }
        // 6 in flight is 15ms, `tolerance` times the 10ms without a queue.
        let mean = f64::from(sum) / 10_000.0;
        assert!(
            worst <= 9 && mean <= 7.0,
            "after the halving: limit up to {worst}, {mean:.1} on average (4 slots)"
        );
    }

    /// An endpoint with no queue whose latency varies a lot from response to
    /// response (exponentially distributed, as noisy as it gets): the noise
    /// must not read as a queue.
    #[test]
    fn noisy_latencies_do_not_shrink_a_limit() {
        let mut f = Feeder::new(settings(1, 1_000, 20));
        let mut x: u64 = 0x2545_f491_4f6c_dd1d;
        let mut lowest = u32::MAX;
        for i in 0..40_000 {
            // xorshift64 to a uniform (0, 1), then exponential with mean 10ms.
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let u = ((x >> 11) as f64 + 0.5) / (1u64 << 53) as f64;
            let rtt = Duration::from_secs_f64(-u.ln() * 0.010);
            let l = f.one(rtt);
            if i >= 1_000 {
                lowest = lowest.min(l);
            }
        }
        assert!(lowest >= 20, "the limit fell to {lowest} without a queue");
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
