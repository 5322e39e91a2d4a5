//! `outbound.adaptive_concurrency` and `inbound.adaptive_concurrency`: a
//! concurrency limit that follows measured latency instead of a fixed number.
//!
//! The table only holds the bounds and the tuning of the limiter (a gradient
//! limiter in the spirit of Netflix concurrency-limits' Gradient2, in
//! `weft-core`'s `limits::adaptive`). Single values are checked as they
//! deserialize; the order of the bounds (`min_limit <= initial_limit <=
//! max_limit`) and the exclusion of the static cap on the same side are
//! cross-key rules, checked in `validate`.

use std::num::NonZeroU32;

use serde::de::{self, Deserializer};
use serde::{Deserialize, Serialize};

use crate::duration::Duration;
use crate::number;

/// Bounds and tuning of an adaptive concurrency limit.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(
    default,
    deny_unknown_fields,
    expecting = "a table like { min_limit = 5, max_limit = 500, initial_limit = 20 }"
)]
pub struct AdaptiveConcurrency {
    /// The limit never falls below this. Default 1.
    #[serde(deserialize_with = "number::nonzero")]
    pub min_limit: NonZeroU32,
    /// The limit never rises above this. Default 1000.
    #[serde(deserialize_with = "number::nonzero")]
    pub max_limit: NonZeroU32,
    /// The limit before the first measurement, from `min_limit` to
    /// `max_limit`. Default 20, moved into the bounds when they exclude it.
    #[serde(
        skip_serializing_if = "Option::is_none",
        deserialize_with = "number::nonzero_opt"
    )]
    pub initial_limit: Option<NonZeroU32>,
    /// How far a limit's worth of measurements (each moving it `smoothing /
    /// limit`) moves the limit towards its new target, more than 0.0 and at
    /// most 1.0. Default 0.2.
    #[serde(deserialize_with = "smoothing")]
    pub smoothing: f64,
    /// How much slower than the baseline the current latency may be before
    /// the limit falls, from 1.0 to 10.0 (1.5: 50% slower). Default 1.5.
    #[serde(deserialize_with = "tolerance")]
    pub tolerance: f64,
    /// Responses the long-term latency averages over (an exponential moving
    /// average), at least 1. Default 600.
    #[serde(deserialize_with = "number::nonzero")]
    pub long_window: NonZeroU32,
    /// The baseline is the lowest long-term latency over this window: a
    /// slower latency that lasts this long becomes the new normal. From 1s to
    /// 1h. Default 60s.
    #[serde(deserialize_with = "baseline_window")]
    pub baseline_window: Duration,
}

impl AdaptiveConcurrency {
    /// The shortest `baseline_window`.
    pub const MIN_BASELINE_WINDOW: Duration = Duration::from_secs(1);
    /// The longest `baseline_window`.
    pub const MAX_BASELINE_WINDOW: Duration = Duration::from_secs(60 * 60);

    /// The initial limit when none is written.
    pub const DEFAULT_INITIAL_LIMIT: u32 = 20;

    /// The limit to start from: `initial_limit`, or 20 within the bounds.
    pub fn initial(&self) -> u32 {
        self.initial_limit.map_or_else(
            || {
                Self::DEFAULT_INITIAL_LIMIT
                    .min(self.max_limit.get())
                    .max(self.min_limit.get())
            },
            NonZeroU32::get,
        )
    }
}

impl Default for AdaptiveConcurrency {
    fn default() -> Self {
        Self {
            min_limit: NonZeroU32::MIN,
            max_limit: NonZeroU32::new(1000).unwrap_or(NonZeroU32::MAX),
            initial_limit: None,
            smoothing: 0.2,
            tolerance: 1.5,
            long_window: NonZeroU32::new(600).unwrap_or(NonZeroU32::MAX),
            baseline_window: Duration::from_secs(60),
        }
    }
}

fn smoothing<'de, D: Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
    let value = number::float(d, "a number from 0.0 to 1.0")?;
    if value > 0.0 && value <= 1.0 {
        Ok(value)
    } else {
        Err(de::Error::custom(format!(
            "must be more than 0.0 and at most 1.0, found {value}"
        )))
    }
}

fn tolerance<'de, D: Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
    let value = number::float(d, "a number from 1.0 to 10.0")?;
    if (1.0..=10.0).contains(&value) {
        Ok(value)
    } else {
        Err(de::Error::custom(format!(
            "must be from 1.0 to 10.0, found {value}"
        )))
    }
}

fn baseline_window<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let value = Duration::deserialize(d)?;
    let (min, max) = (
        AdaptiveConcurrency::MIN_BASELINE_WINDOW,
        AdaptiveConcurrency::MAX_BASELINE_WINDOW,
    );
    if value < min || value > max {
        return Err(de::Error::custom(format!(
            "must be from {min} to {max}, found {value}"
        )));
    }
    Ok(value)
}
