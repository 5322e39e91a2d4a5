//! Durations as config files write them: [`Duration`] (`"250ms"`, `"1.5s"`,
//! `"5m"`, `"1h"`) and [`DurationRange`] (`"25ms..250ms"`).
//!
//! A duration is always a string with a unit, never a bare number: `timeout =
//! 2` could mean seconds or milliseconds, so it is rejected. The units are
//! `ms`, `s`, `m` and `h`; the number may have a fractional part, kept to the
//! nanosecond. Zero is a valid `Duration`; keys that need a positive one use
//! `positive` / `positive_opt`. Both types serialize back to the same
//! compact string form, so the admin `/config` output reads like the file.

use std::fmt;
use std::str::FromStr;

use serde::de::{self, Deserializer};
use serde::{Deserialize, Serialize, Serializer};

use crate::text::ParseVisitor;

const NANOS_PER_MS: u128 = 1_000_000;
const NANOS_PER_S: u128 = 1_000 * NANOS_PER_MS;
const NANOS_PER_M: u128 = 60 * NANOS_PER_S;
const NANOS_PER_H: u128 = 60 * NANOS_PER_M;

/// A length of time from a config file; see the module docs for the syntax.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Duration(std::time::Duration);

impl Duration {
    /// Wraps a std duration.
    pub const fn new(d: std::time::Duration) -> Self {
        Self(d)
    }

    /// Whole milliseconds, for defaults and tests.
    pub const fn from_millis(ms: u64) -> Self {
        Self(std::time::Duration::from_millis(ms))
    }

    /// Whole seconds, for defaults and tests.
    pub const fn from_secs(s: u64) -> Self {
        Self(std::time::Duration::from_secs(s))
    }

    /// The std duration, for timers.
    pub const fn get(self) -> std::time::Duration {
        self.0
    }

    /// True for `"0s"`.
    pub const fn is_zero(self) -> bool {
        self.0.is_zero()
    }
}

impl From<std::time::Duration> for Duration {
    fn from(d: std::time::Duration) -> Self {
        Self(d)
    }
}

/// The error for a string that is not a duration.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "invalid duration {0:?}: expected a number followed by a unit (ms, s, m, h), e.g. \"250ms\""
)]
pub struct ParseDurationError(String);

impl FromStr for Duration {
    type Err = ParseDurationError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let unit = |u: &str| match u {
            "ms" => Some(NANOS_PER_MS),
            "s" => Some(NANOS_PER_S),
            "m" => Some(NANOS_PER_M),
            "h" => Some(NANOS_PER_H),
            _ => None,
        };
        let nanos = crate::number::decimal(s, unit).ok_or_else(|| ParseDurationError(s.into()))?;
        let secs = u64::try_from(nanos / NANOS_PER_S).map_err(|_| ParseDurationError(s.into()))?;
        // The remainder is below 10^9, so it fits.
        let subsec = u32::try_from(nanos % NANOS_PER_S).unwrap_or(0);
        Ok(Self(std::time::Duration::new(secs, subsec)))
    }
}

/// The largest unit that states the value exactly: `"90s"`, `"5m"`,
/// `"1500ms"`; sub-millisecond values as fractional milliseconds (`"0.25ms"`).
impl fmt::Display for Duration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let nanos = self.0.as_nanos();
        let exact = [("h", NANOS_PER_H), ("m", NANOS_PER_M), ("s", NANOS_PER_S)]
            .into_iter()
            .find(|(_, n)| nanos.is_multiple_of(*n) && nanos >= *n);
        match exact {
            _ if nanos == 0 => f.write_str("0s"),
            Some((unit, n)) => write!(f, "{}{unit}", nanos / n),
            None if nanos.is_multiple_of(NANOS_PER_MS) => write!(f, "{}ms", nanos / NANOS_PER_MS),
            None => {
                let fraction = format!("{:06}", nanos % NANOS_PER_MS);
                write!(
                    f,
                    "{}.{}ms",
                    nanos / NANOS_PER_MS,
                    fraction.trim_end_matches('0')
                )
            }
        }
    }
}

impl Serialize for Duration {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Duration {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_str(ParseVisitor::<Self>::new("a duration string like \"2s\""))
    }
}

/// `deserialize_with` for a duration that must be longer than zero.
pub(crate) fn positive<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let value = Duration::deserialize(d)?;
    if value.is_zero() {
        return Err(de::Error::custom("must be longer than 0s"));
    }
    Ok(value)
}

/// [`positive`] for an optional key.
pub(crate) fn positive_opt<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    positive(d).map(Some)
}

/// An inclusive range of durations, written `"MIN..MAX"` with `MIN <= MAX`;
/// used for retry backoff (the first delay, and the cap the delays grow to).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct DurationRange {
    /// The shortest duration in the range.
    pub min: Duration,
    /// The longest duration in the range.
    pub max: Duration,
}

/// The error for a string that is not a duration range.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseDurationRangeError {
    /// No `..` between two durations.
    #[error("invalid duration range {0:?}: expected MIN..MAX, e.g. \"25ms..250ms\"")]
    Syntax(String),
    /// One side is not a duration.
    #[error("invalid duration range {range:?}: {source}")]
    Bound {
        /// The whole input.
        range: String,
        /// Why the side failed.
        source: ParseDurationError,
    },
    /// `MIN` is longer than `MAX`.
    #[error("invalid duration range {range:?}: the minimum {min} is longer than the maximum {max}")]
    Reversed {
        /// The whole input.
        range: String,
        /// The parsed minimum.
        min: Duration,
        /// The parsed maximum.
        max: Duration,
    },
}

impl FromStr for DurationRange {
    type Err = ParseDurationRangeError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (min, max) = s
            .split_once("..")
            .ok_or_else(|| ParseDurationRangeError::Syntax(s.into()))?;
        let bound = |side: &str| {
            side.parse::<Duration>()
                .map_err(|source| ParseDurationRangeError::Bound {
                    range: s.into(),
                    source,
                })
        };
        let (min, max) = (bound(min)?, bound(max)?);
        if min > max {
            return Err(ParseDurationRangeError::Reversed {
                range: s.into(),
                min,
                max,
            });
        }
        Ok(Self { min, max })
    }
}

impl fmt::Display for DurationRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}..{}", self.min, self.max)
    }
}

impl Serialize for DurationRange {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for DurationRange {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_str(ParseVisitor::<Self>::new(
            "a duration range like \"25ms..250ms\"",
        ))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn d(s: &str) -> std::time::Duration {
        s.parse::<Duration>().unwrap().get()
    }

    #[test]
    fn parses_every_unit_and_fractions() {
        assert_eq!(d("250ms"), std::time::Duration::from_millis(250));
        assert_eq!(d("2s"), std::time::Duration::from_secs(2));
        assert_eq!(d("1.5s"), std::time::Duration::from_millis(1500));
        assert_eq!(d("5m"), std::time::Duration::from_secs(300));
        assert_eq!(d("1h"), std::time::Duration::from_secs(3600));
        assert_eq!(d("0.5ms"), std::time::Duration::from_micros(500));
        assert_eq!(d("0s"), std::time::Duration::ZERO);
    }

    #[test]
    fn rejects_malformed_durations() {
        for bad in [
            "2 s", "2", "s", "2sec", "2us", "-1s", "1.s", ".5s", "1S", "", "2s ", "1e3ms",
        ] {
            let err = bad.parse::<Duration>().unwrap_err().to_string();
            assert_eq!(
                err,
                format!(
                    "invalid duration {bad:?}: expected a number followed by a unit \
                     (ms, s, m, h), e.g. \"250ms\""
                )
            );
        }
        assert!("99999999999999999999h".parse::<Duration>().is_err());
    }

    #[test]
    fn displays_compactly_and_round_trips() {
        for (input, shown) in [
            ("0ms", "0s"),
            ("1500ms", "1500ms"),
            ("1.5s", "1500ms"),
            ("90s", "90s"),
            ("60s", "1m"),
            ("120m", "2h"),
            ("0.25ms", "0.25ms"),
            ("1.000001ms", "1.000001ms"),
        ] {
            let parsed: Duration = input.parse().unwrap();
            assert_eq!(parsed.to_string(), shown);
            assert_eq!(shown.parse::<Duration>().unwrap(), parsed);
        }
    }

    #[test]
    fn ranges_parse_and_check_order() {
        let r: DurationRange = "25ms..250ms".parse().unwrap();
        assert_eq!(
            (r.min, r.max),
            (Duration::from_millis(25), Duration::from_millis(250))
        );
        assert_eq!(r.to_string(), "25ms..250ms");
        assert!("1s..1s".parse::<DurationRange>().is_ok());
        assert_eq!(
            "250ms..25ms"
                .parse::<DurationRange>()
                .unwrap_err()
                .to_string(),
            "invalid duration range \"250ms..25ms\": the minimum 250ms is longer than the maximum 25ms"
        );
        assert_eq!(
            "25ms-250ms"
                .parse::<DurationRange>()
                .unwrap_err()
                .to_string(),
            "invalid duration range \"25ms-250ms\": expected MIN..MAX, e.g. \"25ms..250ms\""
        );
        assert!(
            "x..1s"
                .parse::<DurationRange>()
                .unwrap_err()
                .to_string()
                .contains("invalid duration \"x\"")
        );
    }

    #[test]
    fn deserializes_only_from_strings() {
        #[derive(Debug, Deserialize)]
        struct Doc {
            #[serde(deserialize_with = "positive")]
            t: Duration,
        }
        assert_eq!(
            toml::from_str::<Doc>("t = \"2s\"").unwrap().t,
            Duration::from_secs(2)
        );
        let err = toml::from_str::<Doc>("t = 2").unwrap_err();
        assert!(
            err.message()
                .contains("expected a duration string like \"2s\""),
            "{err}"
        );
        let err = toml::from_str::<Doc>("t = \"0ms\"").unwrap_err();
        assert_eq!(err.message(), "must be longer than 0s");
    }
}
