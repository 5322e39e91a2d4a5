//! The limit and health settings of a policy: rate limits, bounded queues,
//! outlier detection, the retry budget and zone locality.
//!
//! Each is a small table in the policy file. Defaults are the `Default` impls
//! below, one per type. A rate limit's `burst` defaults to one second's worth
//! of requests (`ceil(per_second)`, at least 1) so a limit written with only
//! `per_second` behaves as most people expect.

use std::collections::BTreeMap;
use std::num::NonZeroU32;

use serde::de::{self, Deserializer};
use serde::{Deserialize, Serialize};

use crate::duration::{self, Duration};
use crate::name::ServiceName;
use crate::number::{self, Percent, Ratio};

/// A token bucket: `per_second` sustained, up to `burst` at once.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(from = "RawRateLimit")]
pub struct RateLimit {
    /// Sustained requests per second, more than 0 and at most 10^9.
    pub per_second: f64,
    /// Bucket size. Default `ceil(per_second)`, at least 1.
    pub burst: NonZeroU32,
}

impl RateLimit {
    /// The largest `per_second` accepted.
    pub const MAX_PER_SECOND: f64 = 1e9;

    /// The burst used when none is written.
    pub fn default_burst(per_second: f64) -> NonZeroU32 {
        // per_second is at most 1e9, so the cast cannot saturate.
        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
        let burst = per_second.ceil() as u32;
        NonZeroU32::new(burst).unwrap_or(NonZeroU32::MIN)
    }
}

#[derive(Deserialize)]
#[serde(
    deny_unknown_fields,
    expecting = "a table like { per_second = 100, burst = 20 }"
)]
struct RawRateLimit {
    #[serde(deserialize_with = "per_second")]
    per_second: f64,
    #[serde(default, deserialize_with = "number::nonzero_opt")]
    burst: Option<NonZeroU32>,
}

impl From<RawRateLimit> for RateLimit {
    fn from(raw: RawRateLimit) -> Self {
        let burst = raw
            .burst
            .unwrap_or_else(|| Self::default_burst(raw.per_second));
        Self {
            per_second: raw.per_second,
            burst,
        }
    }
}

fn per_second<'de, D: Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
    let value = number::float(d, "a number of requests per second")?;
    if value > 0.0 && value <= RateLimit::MAX_PER_SECOND {
        Ok(value)
    } else {
        Err(de::Error::custom(format!(
            "must be more than 0 and at most 1000000000, found {value}"
        )))
    }
}

/// A rate limit per caller identity, with exceptions for named callers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(from = "RawCallerRateLimit")]
pub struct CallerRateLimit {
    /// Sustained requests per second for each caller without an override.
    pub per_second: f64,
    /// Bucket size for each caller without an override.
    pub burst: NonZeroU32,
    /// Limits for specific callers. Default empty.
    pub overrides: BTreeMap<ServiceName, RateLimit>,
}

impl CallerRateLimit {
    /// The limit that applies to `caller`.
    pub fn limit_for(&self, caller: &str) -> RateLimit {
        self.overrides.get(caller).copied().unwrap_or(RateLimit {
            per_second: self.per_second,
            burst: self.burst,
        })
    }
}

#[derive(Deserialize)]
#[serde(
    deny_unknown_fields,
    expecting = "a table like { per_second = 50, burst = 10 }"
)]
struct RawCallerRateLimit {
    #[serde(deserialize_with = "per_second")]
    per_second: f64,
    #[serde(default, deserialize_with = "number::nonzero_opt")]
    burst: Option<NonZeroU32>,
    #[serde(default)]
    overrides: BTreeMap<ServiceName, RateLimit>,
}

impl From<RawCallerRateLimit> for CallerRateLimit {
    fn from(raw: RawCallerRateLimit) -> Self {
        let burst = raw
            .burst
            .unwrap_or_else(|| RateLimit::default_burst(raw.per_second));
        Self {
            per_second: raw.per_second,
            burst,
            overrides: raw.overrides,
        }
    }
}

/// A bounded wait for a concurrency slot: at most `depth` requests wait, each
/// for at most `timeout`, before being refused. Only valid beside a
/// `max_concurrency`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(
    deny_unknown_fields,
    expecting = "a table like { depth = 10, timeout = \"100ms\" }"
)]
pub struct Queue {
    /// Requests allowed to wait, at least 1.
    #[serde(deserialize_with = "number::nonzero")]
    pub depth: NonZeroU32,
    /// Longest wait, longer than 0.
    #[serde(deserialize_with = "duration::positive")]
    pub timeout: Duration,
}

/// Outlier detection: eject an endpoint after consecutive failures, for a
/// time that grows with each ejection up to `max_ejection`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields, expecting = "a table")]
pub struct Outlier {
    /// Failures in a row that eject an endpoint, at least 1. Default 5.
    #[serde(deserialize_with = "number::nonzero")]
    pub consecutive_failures: NonZeroU32,
    /// First ejection time, longer than 0. Default `30s`.
    #[serde(deserialize_with = "duration::positive")]
    pub ejection: Duration,
    /// Longest ejection time, at least `ejection`. Default `5m`.
    pub max_ejection: Duration,
    /// Most endpoints ejected at once, as a percentage. Default 50.
    pub max_ejected_percent: Percent,
}

impl Default for Outlier {
    fn default() -> Self {
        Self {
            consecutive_failures: NonZeroU32::new(5).unwrap_or(NonZeroU32::MIN),
            ejection: Duration::from_secs(30),
            max_ejection: Duration::from_secs(5 * 60),
            max_ejected_percent: Percent::clamped(50),
        }
    }
}

/// The retry budget: retries may add at most `ratio` of the requests of the
/// last `ttl`, plus `min_per_second`, so retries never multiply an outage.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields, expecting = "a table")]
pub struct RetryBudget {
    /// Retries allowed per request, 0.0 to 1.0. Default 0.2.
    pub ratio: Ratio,
    /// Retries always allowed per second. Default 10.
    #[serde(deserialize_with = "number::uint32")]
    pub min_per_second: u32,
    /// The window requests are counted over, 1s to 60s. Default `10s`.
    #[serde(deserialize_with = "duration::positive")]
    pub ttl: Duration,
}

impl Default for RetryBudget {
    fn default() -> Self {
        Self {
            ratio: Ratio::clamped(0.2),
            min_per_second: 10,
            ttl: Duration::from_secs(10),
        }
    }
}

/// Zone locality: prefer endpoints in the caller's zone while enough of them
/// are healthy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields, expecting = "a table")]
pub struct Locality {
    /// Send to the caller's zone first. Default true.
    pub prefer_zone: bool,
    /// Spill to other zones when fewer than this percentage of the zone's
    /// endpoints are healthy. Default 70.
    pub min_healthy_percent: Percent,
}

impl Default for Locality {
    fn default() -> Self {
        Self {
            prefer_zone: true,
            min_healthy_percent: Percent::clamped(70),
        }
    }
}
