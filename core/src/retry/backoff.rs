//! Jittered exponential backoff between tries.
//!
//! Before retry number `n` (1 for the first retry) the outbound path waits a random
//! duration drawn uniformly from `[min, ceiling(n)]`, where
//! `ceiling(n) = min(max, min * 2^(n-1))` and `min..max` is the route's
//! `retry.backoff`. The lower bound keeps a minimum spacing between tries; the
//! jitter spreads the retries of many callers that failed together so they do not
//! arrive at the next endpoint in lockstep; the ceiling doubles per retry so a
//! struggling service sees retries thin out, up to `max`.
//!
//! Two edge cases are defined rather than left to arithmetic: the ceiling saturates
//! (no overflow for any `n`, `n = 0` is treated as 1), and a zero `min` cannot grow
//! by doubling, so `0ms..max` means "full jitter": any duration in `[0, max]`.
//!
//! Used by the outbound retry loop; the waiting itself (and its deadline) is the
//! caller's.

use std::time::Duration;

use rand::Rng;
use weft_config::DurationRange;

/// Jittered exponential backoff before retry number `retry` (1 = first retry): a
/// random duration in `[min, min(max, min * 2^(retry-1))]` ("equal jitter" lower
/// bounded by `min`). With a zero `min`, a random duration in `[0, max]`.
pub fn backoff(range: &DurationRange, retry: u32) -> Duration {
    backoff_with(&mut rand::rng(), range, retry)
}

/// [`backoff`] with the random source given, so tests can seed it.
fn backoff_with<R: Rng + ?Sized>(rng: &mut R, range: &DurationRange, retry: u32) -> Duration {
    let min = range.min.get();
    let ceiling = ceiling(range, retry);
    if ceiling <= min {
        return min;
    }
    rng.random_range(min..=ceiling)
}

/// The longest backoff before retry number `retry`, never below `min`.
fn ceiling(range: &DurationRange, retry: u32) -> Duration {
    let (min, max) = (range.min.get(), range.max.get());
    if min.is_zero() {
        return max;
    }
    // Double until the cap: at most ~94 rounds (1ns to `Duration::MAX`), whatever
    // `retry` is, and saturating, so it cannot overflow.
    let mut ceiling = min;
    for _ in 1..retry {
        if ceiling >= max {
            break;
        }
        ceiling = ceiling.saturating_mul(2);
    }
    ceiling.min(max).max(min)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use rand::SeedableRng;
    use rand::rngs::StdRng;
    use weft_config::Duration as ConfigDuration;

    fn range(min_ms: u64, max_ms: u64) -> DurationRange {
        DurationRange {
            min: ConfigDuration::from_millis(min_ms),
            max: ConfigDuration::from_millis(max_ms),
        }
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn ceiling_doubles_up_to_max() {
        let r = range(25, 250);
        let ceilings: Vec<_> = (1..=6).map(|n| ceiling(&r, n)).collect();
        assert_eq!(
            ceilings,
            [ms(25), ms(50), ms(100), ms(200), ms(250), ms(250)]
        );
        assert_eq!(ceiling(&r, 0), ms(25), "retry 0 is treated as the first");
    }

    #[test]
    fn no_overflow_for_big_retry_numbers() {
        let r = DurationRange {
            min: ConfigDuration::from_secs(3600),
            max: ConfigDuration::new(Duration::MAX),
        };
        assert_eq!(ceiling(&r, u32::MAX), Duration::MAX);
        assert_eq!(ceiling(&range(25, 250), u32::MAX), ms(250));
        let d = backoff(&range(25, 250), u32::MAX);
        assert!((ms(25)..=ms(250)).contains(&d), "{d:?}");
    }

    #[test]
    fn always_within_min_and_max() {
        let mut rng = StdRng::seed_from_u64(7);
        let r = range(25, 250);
        for retry in 1..=12 {
            for _ in 0..200 {
                let d = backoff_with(&mut rng, &r, retry);
                assert!(d >= ms(25), "retry {retry}: {d:?}");
                assert!(d <= ceiling(&r, retry), "retry {retry}: {d:?}");
            }
        }
    }

    #[test]
    fn grows_with_the_retry_number() {
        let mut rng = StdRng::seed_from_u64(11);
        let r = range(10, 10_000);
        let mean = |rng: &mut StdRng, retry| {
            let total: Duration = (0..500).map(|_| backoff_with(rng, &r, retry)).sum();
            total / 500
        };
        let means: Vec<_> = (1..=6).map(|n| mean(&mut rng, n)).collect();
        assert_eq!(means[0], ms(10), "the first retry waits exactly min");
        assert!(means.windows(2).all(|w| w[0] < w[1]), "{means:?}");
        // The draws reach the upper part of the range, not only min.
        let most = (0..500)
            .map(|_| backoff_with(&mut rng, &r, 6))
            .max()
            .unwrap();
        assert!(most > ms(250), "{most:?}");
    }

    #[test]
    fn min_equal_to_max_is_constant() {
        let r = range(100, 100);
        for retry in [0, 1, 2, 10, u32::MAX] {
            assert_eq!(backoff(&r, retry), ms(100));
        }
    }

    #[test]
    fn zero_min_is_full_jitter_up_to_max() {
        let mut rng = StdRng::seed_from_u64(3);
        let r = range(0, 100);
        let draws: Vec<_> = (0..200).map(|_| backoff_with(&mut rng, &r, 1)).collect();
        assert!(draws.iter().all(|d| *d <= ms(100)));
        assert!(draws.iter().any(|d| *d > ms(50)), "not stuck at zero");
        assert_eq!(backoff(&range(0, 0), 3), Duration::ZERO);
    }
}
