//! `routes[].hedge`: hedged requests. When a try has no response head after
//! `after`, another try of the same request goes to another endpoint; the
//! first response wins and the others are cancelled.
//!
//! `after` is either a fixed delay (`"20ms"`) or a percentile of the route's
//! observed latency (`"p95"`, from `p50` to `p99.9`). `max` is how many
//! hedges one request may send, 1 to 3 (default 1). Only requests the route
//! may retry safely are hedged (idempotent methods, unless `retry` sets
//! `non_idempotent`): the cross-key check refuses a `hedge` on a route that
//! matches only other methods.

use std::fmt;
use std::str::FromStr;

use serde::de::Deserializer;
use serde::{Deserialize, Serialize, Serializer};

use crate::duration::Duration;
use crate::number;
use crate::text::ParseVisitor;

/// `hedge = { after = "p95", max = 1 }` on a route.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(
    deny_unknown_fields,
    expecting = "a table like { after = \"20ms\", max = 1 }"
)]
pub struct Hedge {
    /// How long a try waits for its response head before a hedge is sent.
    /// Required.
    pub after: HedgeAfter,
    /// Hedges per request, 1 to 3. Default 1.
    #[serde(default = "default_max", deserialize_with = "max")]
    pub max: u32,
}

impl Hedge {
    /// The most `max` accepted.
    pub const MAX_HEDGES: u32 = 3;
}

fn default_max() -> u32 {
    1
}

fn max<'de, D: Deserializer<'de>>(d: D) -> Result<u32, D::Error> {
    number::int(d, 1, Hedge::MAX_HEDGES)
}

/// When a hedge goes: after a fixed delay, or after the route's observed
/// latency at a percentile.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum HedgeAfter {
    /// `"20ms"`: longer than 0s.
    Delay(Duration),
    /// `"p95"`: the percentile, from 50 to 99.9.
    Percentile(f64),
}

/// The error for an `after` that is neither a duration nor a percentile.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "invalid hedge delay {0:?}: expected a duration such as \"20ms\" or a latency percentile from \"p50\" to \"p99.9\" such as \"p95\""
)]
pub struct ParseHedgeAfterError(String);

impl FromStr for HedgeAfter {
    type Err = ParseHedgeAfterError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let error = || ParseHedgeAfterError(s.into());
        if let Some(p) = s.strip_prefix('p') {
            let p: f64 = p.parse().map_err(|_| error())?;
            if !(50.0..=99.9).contains(&p) || !p.is_finite() {
                return Err(error());
            }
            return Ok(Self::Percentile(p));
        }
        let delay: Duration = s.parse().map_err(|_| error())?;
        if delay.is_zero() {
            return Err(error());
        }
        Ok(Self::Delay(delay))
    }
}

impl fmt::Display for HedgeAfter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Delay(delay) => delay.fmt(f),
            Self::Percentile(p) => write!(f, "p{p}"),
        }
    }
}

impl Serialize for HedgeAfter {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for HedgeAfter {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_str(ParseVisitor::<Self>::new(
            "a duration like \"20ms\" or a percentile like \"p95\"",
        ))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn after_parses_delays_and_percentiles() {
        assert_eq!(
            "20ms".parse::<HedgeAfter>().unwrap(),
            HedgeAfter::Delay(Duration::from_millis(20))
        );
        assert_eq!(
            "p95".parse::<HedgeAfter>().unwrap(),
            HedgeAfter::Percentile(95.0)
        );
        assert_eq!(
            "p99.9".parse::<HedgeAfter>().unwrap(),
            HedgeAfter::Percentile(99.9)
        );
        for bad in ["p100", "p10", "0ms", "fast", "p", "pNaN"] {
            assert!(bad.parse::<HedgeAfter>().is_err(), "{bad}");
        }
        assert_eq!(HedgeAfter::Percentile(95.0).to_string(), "p95");
    }
}
