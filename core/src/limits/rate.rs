//! Rate limits: GCRA buckets built on governor.
//!
//! [`RateLimit`] is one bucket shared by everything that goes through it;
//! [`CallerRateLimit`] keeps one bucket per caller identity, and a bucket of its
//! own for each caller named in `overrides`. A check admits or refuses at once,
//! never waits and never panics; a refusal is a [`RateLimited`] naming the limit
//! and saying when a retry could succeed (at least 1 ms away).
//!
//! A service-wide limit is enforced by every instance of the service without
//! coordination: each instance enforces its [`Share`] of it, `per_second / share`
//! with a burst of `ceil(burst / share)` (at least 1), so together the instances
//! admit about the configured rate when traffic is spread evenly. Per-caller
//! limits are divided the same way, overrides included.
//!
//! Every value the config crate accepts is enforceable: governor keeps time as
//! whole nanoseconds (u64) since the limiter was created, so the time between
//! two tokens is rounded to a nanosecond (at least 1: 10^9 per second), and a
//! bucket that would take longer than [`MAX_REFILL`] to refill from empty (a
//! rate far below one a year, or a burst of billions at a low rate) is cut
//! down to that, with a warning when the limiter is built.
//!
//! Memory stays bounded whatever callers claim to be: caller identities come
//! from the caller's certificate over mTLS, but from a request header, which
//! anyone can set, over plaintext. At most
//! [`MAX_TRACKED_CALLERS`] caller buckets are kept. When that many are tracked,
//! buckets that have refilled (indistinguishable from fresh ones) are dropped,
//! at most once per [`RETAIN_INTERVAL`]; if the store is still full, a caller
//! without a bucket is checked against one shared overflow bucket instead of
//! getting its own. Callers already tracked and callers with overrides are not
//! affected. Users: `policy` builds these from a service's policy; the inbound
//! and outbound stacks call `check` before a request goes further.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, TryLockError};
use std::time::Duration;

use governor::clock::{Clock, DefaultClock, Reference};
use governor::middleware::NoOpMiddleware;
use governor::nanos::Nanos;
use governor::state::keyed::ShrinkableKeyedStateStore;
use governor::state::{InMemoryState, NotKeyed, StateStore};
use governor::{NotUntil, Quota, RateLimiter};
use weft_config::ServiceName;

/// Most caller buckets a [`CallerRateLimit`] keeps (see the module docs).
pub const MAX_TRACKED_CALLERS: usize = 10_000;

/// Shortest interval between two sweeps of refilled caller buckets when the
/// store is full, so a flood of new callers cannot make every check scan it.
pub const RETAIN_INTERVAL: Duration = Duration::from_secs(1);

/// Longest time a bucket may take to refill from empty (100 years). governor's
/// arithmetic overflows a little past 584 years after the limiter was created;
/// this leaves centuries of uptime.
pub const MAX_REFILL: Duration = Duration::from_secs(100 * 365 * 24 * 60 * 60);

/// Shortest `retry_after` reported.
const MIN_RETRY_AFTER: Duration = Duration::from_millis(1);

/// A refusal: which limit, and when a retry could succeed.
#[derive(Debug, Clone, thiserror::Error)]
#[error("rate limit {limit} exceeded")]
pub struct RateLimited {
    /// The limit's policy key path, e.g. `inbound.rate_limit`.
    pub limit: Arc<str>,
    /// Time until the bucket holds a token again, at least 1 ms.
    pub retry_after: Duration,
}

/// How many instances share a service-wide limit (at least 1). Each instance
/// enforces `per_second / share`, burst `max(1, ceil(burst / share))`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Share(NonZeroU32);

impl Share {
    /// The whole limit: a single instance, or a limit that is not shared.
    pub const ONE: Self = Self(NonZeroU32::MIN);

    pub const fn new(instances: NonZeroU32) -> Self {
        Self(instances)
    }

    pub const fn get(self) -> u32 {
        self.0.get()
    }
}

impl Default for Share {
    fn default() -> Self {
        Self::ONE
    }
}

/// What one instance enforces of a configured limit.
#[derive(Debug, Clone, Copy)]
struct Effective {
    per_second: f64,
    burst: u32,
    quota: Quota,
}

impl Effective {
    fn new(name: &str, config: &weft_config::RateLimit, share: Share) -> Self {
        let instances = f64::from(share.get());
        let burst = config.burst.get().div_ceil(share.get());
        // One token every `period`. The config crate guarantees 0 < per_second
        // <= 10^9; anything it cannot express (NaN, too slow) is the slowest
        // rate allowed rather than a panic.
        let exact = Duration::try_from_secs_f64(instances / config.per_second).ok();
        let period = exact
            .unwrap_or(MAX_REFILL)
            .clamp(Duration::from_nanos(1), MAX_REFILL);
        // Both are at least 1 ns, so the division is defined and at least 1.
        let fits = MAX_REFILL.as_nanos() / period.as_nanos();
        let fitted = u32::try_from(fits).map_or(burst, |fits| burst.min(fits));
        let clamped = exact != Some(period) || fitted != burst;
        let per_second = if exact == Some(period) {
            config.per_second / instances
        } else {
            1.0 / period.as_secs_f64()
        };
        if clamped {
            tracing::warn!(
                limit.name = name,
                limit.per_second = config.per_second,
                limit.burst = config.burst.get(),
                effective.per_second = per_second,
                effective.burst = fitted,
                "rate limit beyond what can be enforced; clamped"
            );
        }
        let burst = NonZeroU32::new(fitted).unwrap_or(NonZeroU32::MIN);
        // `with_period` only refuses a zero period, excluded above.
        let quota = Quota::with_period(period)
            .unwrap_or_else(|| Quota::per_second(NonZeroU32::MAX))
            .allow_burst(burst);
        Self {
            per_second,
            burst: burst.get(),
            quota,
        }
    }
}

/// A refusal from governor's answer.
fn refused<C: Clock>(limit: &Arc<str>, not_until: &NotUntil<C::Instant>, clock: &C) -> RateLimited {
    RateLimited {
        limit: Arc::clone(limit),
        retry_after: not_until.wait_time_from(clock.now()).max(MIN_RETRY_AFTER),
    }
}

type Direct<C> = RateLimiter<NotKeyed, InMemoryState, C, NoOpMiddleware<<C as Clock>::Instant>>;

/// One bucket shared by every request checked against it.
pub struct RateLimit<C: Clock = DefaultClock> {
    name: Arc<str>,
    effective: Effective,
    limiter: Direct<C>,
}

impl RateLimit {
    pub fn new(name: impl Into<Arc<str>>, config: &weft_config::RateLimit, share: Share) -> Self {
        Self::with_clock(name, config, share, DefaultClock::default())
    }
}

impl<C: Clock> RateLimit<C> {
    pub fn with_clock(
        name: impl Into<Arc<str>>,
        config: &weft_config::RateLimit,
        share: Share,
        clock: C,
    ) -> Self {
        let name = name.into();
        let effective = Effective::new(&name, config, share);
        Self {
            limiter: RateLimiter::direct_with_clock(effective.quota, clock),
            name,
            effective,
        }
    }

    /// Take a token, or say when one will be there.
    pub fn check(&self) -> Result<(), RateLimited> {
        self.check_as(&self.name)
    }

    /// Like `check`, but a refusal names `limit`.
    fn check_as(&self, limit: &Arc<str>) -> Result<(), RateLimited> {
        self.limiter
            .check()
            .map_err(|not_until| refused(limit, &not_until, self.limiter.clock()))
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Effective per-instance rate and burst (for the admin API).
    pub fn effective(&self) -> (f64, u32) {
        (self.effective.per_second, self.effective.burst)
    }
}

impl<C: Clock> fmt::Debug for RateLimit<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RateLimit")
            .field("name", &self.name)
            .field("per_second", &self.effective.per_second)
            .field("burst", &self.effective.burst)
            .finish_non_exhaustive()
    }
}

/// Per-caller limits: one bucket per caller identity, with per-caller overrides.
///
/// Refusals of every bucket, overrides and the overflow bucket included, carry
/// this limit's name.
pub struct CallerRateLimit<C: Clock = DefaultClock> {
    name: Arc<str>,
    effective: Effective,
    callers: RateLimiter<Arc<str>, CallerCells, C, NoOpMiddleware<C::Instant>>,
    /// Buckets in `callers`, mirrored so a check can tell the store is full
    /// without taking its lock.
    tracked: Arc<AtomicUsize>,
    overrides: BTreeMap<ServiceName, RateLimit<C>>,
    /// When refilled buckets were last dropped.
    last_retain: Mutex<Option<C::Instant>>,
}

impl CallerRateLimit {
    pub fn new(
        name: impl Into<Arc<str>>,
        config: &weft_config::CallerRateLimit,
        share: Share,
    ) -> Self {
        Self::with_clock(name, config, share, DefaultClock::default())
    }
}

impl<C: Clock> CallerRateLimit<C> {
    pub fn with_clock(
        name: impl Into<Arc<str>>,
        config: &weft_config::CallerRateLimit,
        share: Share,
        clock: C,
    ) -> Self
    where
        C: Clone,
    {
        let name = name.into();
        let default = weft_config::RateLimit {
            per_second: config.per_second,
            burst: config.burst,
        };
        let effective = Effective::new(&name, &default, share);
        let overrides = config
            .overrides
            .iter()
            .map(|(caller, limit)| {
                let own = format!("{name}.overrides.{caller}");
                let limiter = RateLimit::with_clock(own, limit, share, clock.clone());
                (caller.clone(), limiter)
            })
            .collect();
        let tracked = Arc::new(AtomicUsize::new(0));
        let cells = CallerCells::new(MAX_TRACKED_CALLERS, Arc::clone(&tracked));
        Self {
            callers: RateLimiter::new(effective.quota, cells, clock),
            name,
            effective,
            tracked,
            overrides,
            last_retain: Mutex::new(None),
        }
    }

    /// Take a token from `caller`'s bucket, or say when one will be there.
    pub fn check(&self, caller: &str) -> Result<(), RateLimited> {
        if let Some(limit) = self.overrides.get(caller) {
            return limit.check_as(&self.name);
        }
        if self.tracked.load(Ordering::Relaxed) >= MAX_TRACKED_CALLERS {
            self.retain_if_due();
        }
        let key: Arc<str> = Arc::from(caller);
        self.callers
            .check_key(&key)
            .map_err(|not_until| refused(&self.name, &not_until, self.callers.clock()))
    }

    /// Callers with a bucket of their own, overrides and overflow excluded.
    pub fn tracked_callers(&self) -> usize {
        self.tracked.load(Ordering::Relaxed)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Effective per-instance rate and burst of a caller without an override.
    pub fn effective(&self) -> (f64, u32) {
        (self.effective.per_second, self.effective.burst)
    }

    /// Drop refilled buckets, unless that was done less than
    /// [`RETAIN_INTERVAL`] ago or another check is doing it right now.
    fn retain_if_due(&self) {
        let mut last = match self.last_retain.try_lock() {
            Ok(last) => last,
            Err(TryLockError::Poisoned(poisoned)) => poisoned.into_inner(),
            Err(TryLockError::WouldBlock) => return,
        };
        let now = self.callers.clock().now();
        if let Some(at) = *last
            && Duration::from(now.duration_since(at)) < RETAIN_INTERVAL
        {
            return;
        }
        *last = Some(now);
        self.callers.retain_recent();
        let tracked = self.tracked.load(Ordering::Relaxed);
        if tracked >= MAX_TRACKED_CALLERS {
            tracing::warn!(
                limit.name = %self.name,
                callers.tracked = tracked,
                "too many callers to track; new callers share one overflow bucket"
            );
        }
    }
}

impl<C: Clock> fmt::Debug for CallerRateLimit<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CallerRateLimit")
            .field("name", &self.name)
            .field("per_second", &self.effective.per_second)
            .field("burst", &self.effective.burst)
            .field("tracked_callers", &self.tracked_callers())
            .field("overrides", &self.overrides)
            .finish_non_exhaustive()
    }
}

/// The per-caller buckets: governor's `HashMapStateStore`, with a cap.
///
/// governor's store can neither refuse a new key nor say whether it holds one,
/// so it cannot keep a cap exactly; this one decides between the caller's own
/// bucket, a new bucket and the overflow bucket under the same lock that
/// updates it. A bucket's state is GCRA's theoretical arrival time, in
/// nanoseconds since the limiter was created.
struct CallerCells {
    cells: Mutex<Cells>,
    max: usize,
    tracked: Arc<AtomicUsize>,
}

#[derive(Default)]
struct Cells {
    callers: HashMap<Arc<str>, Nanos>,
    overflow: Option<Nanos>,
}

impl CallerCells {
    fn new(max: usize, tracked: Arc<AtomicUsize>) -> Self {
        Self {
            cells: Mutex::default(),
            max,
            tracked,
        }
    }

    /// The buckets. A panic while the lock was held cannot leave a bucket
    /// half-written (each is one `Nanos`), so poisoning is ignored.
    fn lock(&self) -> MutexGuard<'_, Cells> {
        self.cells.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl StateStore for CallerCells {
    type Key = Arc<str>;

    fn measure_and_replace<T, F, E>(&self, key: &Arc<str>, f: F) -> Result<T, E>
    where
        F: Fn(Option<Nanos>) -> Result<(T, Nanos), E>,
    {
        let mut cells = self.lock();
        let Cells { callers, overflow } = &mut *cells;
        if let Some(state) = callers.get_mut(key) {
            let (outcome, next) = f(Some(*state))?;
            *state = next;
            return Ok(outcome);
        }
        if callers.len() < self.max {
            let (outcome, next) = f(None)?;
            callers.insert(Arc::clone(key), next);
            self.tracked.store(callers.len(), Ordering::Relaxed);
            return Ok(outcome);
        }
        let (outcome, next) = f(*overflow)?;
        *overflow = Some(next);
        Ok(outcome)
    }
}

impl ShrinkableKeyedStateStore<Arc<str>> for CallerCells {
    fn retain_recent(&self, drop_below: Nanos) {
        let mut cells = self.lock();
        cells.callers.retain(|_, state| *state > drop_below);
        if cells.overflow.is_some_and(|state| state <= drop_below) {
            cells.overflow = None;
        }
        self.tracked.store(cells.callers.len(), Ordering::Relaxed);
    }

    fn shrink_to_fit(&self) {
        self.lock().callers.shrink_to_fit();
    }

    fn len(&self) -> usize {
        self.lock().callers.len()
    }

    fn is_empty(&self) -> bool {
        self.lock().callers.is_empty()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use governor::clock::FakeRelativeClock;

    fn config(per_second: f64, burst: u32) -> weft_config::RateLimit {
        weft_config::RateLimit {
            per_second,
            burst: NonZeroU32::new(burst).unwrap(),
        }
    }

    fn shared(n: u32) -> Share {
        Share::new(NonZeroU32::new(n).unwrap())
    }

    fn bucket(
        per_second: f64,
        burst: u32,
        share: Share,
    ) -> (RateLimit<FakeRelativeClock>, FakeRelativeClock) {
        let clock = FakeRelativeClock::default();
        let limit = RateLimit::with_clock(
            "test.rate_limit",
            &config(per_second, burst),
            share,
            clock.clone(),
        );
        (limit, clock)
    }

    fn per_caller(
        per_second: f64,
        burst: u32,
        overrides: &[(&str, weft_config::RateLimit)],
    ) -> (CallerRateLimit<FakeRelativeClock>, FakeRelativeClock) {
        let config = weft_config::CallerRateLimit {
            per_second,
            burst: NonZeroU32::new(burst).unwrap(),
            overrides: overrides
                .iter()
                .map(|(name, limit)| (name.parse().unwrap(), *limit))
                .collect(),
        };
        let clock = FakeRelativeClock::default();
        let limit = CallerRateLimit::with_clock(
            "test.caller_rate_limit",
            &config,
            Share::ONE,
            clock.clone(),
        );
        (limit, clock)
    }

    /// How many checks in a row are admitted, up to `most`.
    fn admitted(mut check: impl FnMut() -> Result<(), RateLimited>, most: usize) -> usize {
        (0..most).take_while(|_| check().is_ok()).count()
    }

    #[test]
    fn admits_the_burst_then_refuses() {
        let (limit, _clock) = bucket(10.0, 5, Share::ONE);
        assert_eq!(admitted(|| limit.check(), 100), 5);
        let refusal = limit.check().unwrap_err();
        assert_eq!(&*refusal.limit, "test.rate_limit");
        assert_eq!(refusal.to_string(), "rate limit test.rate_limit exceeded");
    }

    #[test]
    fn refills_at_the_configured_rate() {
        let (limit, clock) = bucket(10.0, 5, Share::ONE);
        assert_eq!(admitted(|| limit.check(), 100), 5);
        // One token per 100 ms.
        clock.advance(Duration::from_millis(99));
        assert!(limit.check().is_err());
        clock.advance(Duration::from_millis(1));
        assert!(limit.check().is_ok());
        assert!(limit.check().is_err());
        // A full second refills ten tokens, but the bucket holds five.
        clock.advance(Duration::from_secs(1));
        assert_eq!(admitted(|| limit.check(), 100), 5);
    }

    #[test]
    fn fractional_rates() {
        let (limit, clock) = bucket(0.5, 1, Share::ONE);
        assert!(limit.check().is_ok());
        let refusal = limit.check().unwrap_err();
        assert_eq!(refusal.retry_after, Duration::from_secs(2));
        clock.advance(Duration::from_millis(1_999));
        assert!(limit.check().is_err());
        clock.advance(Duration::from_millis(1));
        assert!(limit.check().is_ok());
        assert_eq!(limit.effective(), (0.5, 1));
    }

    #[test]
    fn a_share_divides_rate_and_burst() {
        let (limit, clock) = bucket(100.0, 20, shared(4));
        assert_eq!(limit.effective(), (25.0, 5));
        assert_eq!(admitted(|| limit.check(), 100), 5);
        assert_eq!(
            limit.check().unwrap_err().retry_after,
            Duration::from_millis(40)
        );
        clock.advance(Duration::from_millis(40));
        assert!(limit.check().is_ok());
        // The burst rounds up and never reaches zero.
        assert_eq!(bucket(1.0, 1, shared(3)).0.effective().1, 1);
        assert_eq!(bucket(1.0, 10, shared(3)).0.effective().1, 4);
    }

    #[test]
    fn retry_after_counts_down_and_is_at_least_a_millisecond() {
        let (limit, clock) = bucket(1.0, 2, Share::ONE);
        assert_eq!(admitted(|| limit.check(), 10), 2);
        assert_eq!(
            limit.check().unwrap_err().retry_after,
            Duration::from_secs(1)
        );
        clock.advance(Duration::from_millis(700));
        assert_eq!(
            limit.check().unwrap_err().retry_after,
            Duration::from_millis(300)
        );
        clock.advance(Duration::from_nanos(299_999_999));
        assert_eq!(limit.check().unwrap_err().retry_after, MIN_RETRY_AFTER);
        clock.advance(Duration::from_nanos(1));
        assert!(limit.check().is_ok());
    }

    #[test]
    fn never_panics_on_extreme_settings() {
        let max = weft_config::RateLimit::MAX_PER_SECOND;
        let cases = [
            (max, u32::MAX, Share::ONE),
            (max, u32::MAX, shared(u32::MAX)),
            (max, 1, shared(u32::MAX)),
            (f64::MIN_POSITIVE, u32::MAX, Share::ONE),
            (f64::MIN_POSITIVE, 1, shared(u32::MAX)),
            (1e-9, u32::MAX, shared(7)),
            (0.1, u32::MAX, Share::ONE),
            (7e8, 3, Share::ONE),
        ];
        for (per_second, burst, share) in cases {
            let (limit, clock) = bucket(per_second, burst, share);
            let (rate, burst) = limit.effective();
            assert!(
                rate > 0.0 && rate.is_finite(),
                "{per_second} {burst}: {rate}"
            );
            assert!(burst >= 1);
            for _ in 0..3 {
                let _ = limit.check();
                clock.advance(MAX_REFILL);
            }
            if let Err(refusal) = limit.check() {
                assert!(refusal.retry_after >= MIN_RETRY_AFTER);
                assert!(refusal.retry_after <= MAX_REFILL);
            }
        }
        // The slowest rate is one token per MAX_REFILL; the burst fits in it.
        let (limit, _clock) = bucket(0.1, u32::MAX, Share::ONE);
        // One token per 10 s, so at most MAX_REFILL / 10 s of them.
        let fits = u32::try_from(MAX_REFILL.as_secs() / 10).unwrap();
        assert_eq!(limit.effective(), (0.1, fits));
        let (limit, _clock) = bucket(f64::MIN_POSITIVE, 5, Share::ONE);
        assert_eq!(limit.effective(), (1.0 / MAX_REFILL.as_secs_f64(), 1));
    }

    #[test]
    fn callers_have_buckets_of_their_own() {
        let (limit, clock) = per_caller(1.0, 3, &[]);
        assert_eq!(admitted(|| limit.check("a"), 10), 3);
        let refusal = limit.check("a").unwrap_err();
        assert_eq!(&*refusal.limit, "test.caller_rate_limit");
        assert_eq!(refusal.retry_after, Duration::from_secs(1));
        assert_eq!(admitted(|| limit.check("b"), 10), 3);
        assert_eq!(limit.tracked_callers(), 2);
        clock.advance(Duration::from_secs(1));
        assert_eq!(admitted(|| limit.check("a"), 10), 1);
    }

    #[test]
    fn overrides_are_honoured_and_named_after_the_limit() {
        let (limit, clock) = per_caller(1.0, 2, &[("gold", config(0.5, 5))]);
        assert_eq!(admitted(|| limit.check("gold"), 10), 5);
        let refusal = limit.check("gold").unwrap_err();
        assert_eq!(&*refusal.limit, "test.caller_rate_limit");
        assert_eq!(refusal.retry_after, Duration::from_secs(2));
        // Others keep the default, and `gold` takes no tracked bucket.
        assert_eq!(admitted(|| limit.check("silver"), 10), 2);
        assert_eq!(limit.tracked_callers(), 1);
        clock.advance(Duration::from_secs(2));
        assert_eq!(admitted(|| limit.check("gold"), 10), 1);
    }

    #[test]
    fn the_number_of_tracked_callers_is_capped() {
        let (limit, clock) = per_caller(1.0, 2, &[]);
        for n in 0..MAX_TRACKED_CALLERS {
            assert!(limit.check(&format!("caller-{n}")).is_ok());
        }
        assert_eq!(limit.tracked_callers(), MAX_TRACKED_CALLERS);
        // New callers share the overflow bucket: two tokens between them all.
        let overflow = (0..100)
            .filter(|n| limit.check(&format!("new-{n}")).is_ok())
            .count();
        assert_eq!(overflow, 2);
        assert_eq!(limit.tracked_callers(), MAX_TRACKED_CALLERS);
        // Tracked callers keep their own buckets meanwhile.
        assert!(limit.check("caller-7").is_ok());
        assert!(limit.check("caller-7").is_err());

        // Once the buckets have refilled they are dropped and new callers
        // get buckets of their own again.
        clock.advance(Duration::from_secs(10));
        assert_eq!(admitted(|| limit.check("latecomer"), 10), 2);
        assert_eq!(limit.tracked_callers(), 1);
    }

    #[test]
    fn a_full_store_is_swept_at_most_once_per_interval() {
        let (limit, clock) = per_caller(1.0, 1, &[]);
        for n in 0..MAX_TRACKED_CALLERS {
            assert!(limit.check(&format!("caller-{n}")).is_ok());
        }
        // governor drops a bucket once it has been full for one token's
        // time: these at 2 s. A sweep at 1.5 s finds nothing to drop.
        clock.advance(Duration::from_millis(1_500));
        assert!(limit.check("first").is_ok());
        assert_eq!(limit.tracked_callers(), MAX_TRACKED_CALLERS);
        // At 2.2 s the buckets could go, but the next sweep is not due before
        // 2.5 s: `second` is checked against the overflow bucket, which
        // `first` emptied.
        clock.advance(Duration::from_millis(700));
        assert!(limit.check("second").is_err());
        assert_eq!(limit.tracked_callers(), MAX_TRACKED_CALLERS);
        clock.advance(RETAIN_INTERVAL - Duration::from_millis(700));
        assert!(limit.check("third").is_ok());
        assert_eq!(limit.tracked_callers(), 1);
    }
}
