//! Bounded numbers: [`Percent`], [`Ratio`], [`Weight`], and the integer
//! helpers the schemas use through `#[serde(deserialize_with = ..)]`.
//!
//! Every bound is checked inside `Deserialize`, so the TOML deserializer
//! attaches the offending value's span to the error and the user sees the line
//! and column of the bad number. Messages follow one pattern, `must be from 0
//! to 100, found 150`, and wrong types read `expected an integer, found string
//! "3"` once the private `diag` module has reworded serde's message.
//!
//! `decimal` is the shared `<number><unit>` scanner behind
//! [`crate::Duration`] and [`crate::ByteSize`].

use std::fmt;
use std::num::NonZeroU32;

use serde::de::{self, Deserializer, Visitor};
use serde::{Deserialize, Serialize};

/// A whole percentage, 0 to 100 inclusive.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(transparent)]
pub struct Percent(u8);

impl Percent {
    /// `Some` when `value <= 100`.
    pub const fn new(value: u8) -> Option<Self> {
        if value <= 100 {
            Some(Self(value))
        } else {
            None
        }
    }

    /// `value`, or 100 when it is larger.
    pub const fn clamped(value: u8) -> Self {
        Self(if value > 100 { 100 } else { value })
    }

    /// The percentage, 0 to 100.
    pub const fn get(self) -> u8 {
        self.0
    }
}

impl<'de> Deserialize<'de> for Percent {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        int(d, 0, 100).map(Self)
    }
}

/// A fraction from 0.0 to 1.0 inclusive; TOML may write it as a float or as
/// the integers 0 and 1.
#[derive(Debug, Clone, Copy, PartialEq, PartialOrd, Serialize)]
#[serde(transparent)]
pub struct Ratio(f64);

impl Ratio {
    /// `Some` when `0.0 <= value <= 1.0` (never for NaN).
    pub fn new(value: f64) -> Option<Self> {
        (0.0..=1.0).contains(&value).then_some(Self(value))
    }

    /// `value` forced into 0.0 to 1.0 (NaN becomes 0.0).
    pub fn clamped(value: f64) -> Self {
        Self(if value.is_nan() {
            0.0
        } else {
            value.clamp(0.0, 1.0)
        })
    }

    /// The fraction, 0.0 to 1.0.
    pub const fn get(self) -> f64 {
        self.0
    }
}

impl<'de> Deserialize<'de> for Ratio {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let value = float(d, "a ratio from 0.0 to 1.0")?;
        Self::new(value)
            .ok_or_else(|| de::Error::custom(format!("must be from 0.0 to 1.0, found {value}")))
    }
}

/// An endpoint's relative weight for load balancing, 0 to 10 000; 100 is the
/// default and 0 takes the endpoint out of rotation without removing it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(transparent)]
pub struct Weight(u32);

impl Weight {
    /// The largest weight accepted.
    pub const MAX: u32 = 10_000;

    /// `Some` when `value <= Weight::MAX`.
    pub const fn new(value: u32) -> Option<Self> {
        if value <= Self::MAX {
            Some(Self(value))
        } else {
            None
        }
    }

    /// The weight, 0 to 10 000.
    pub const fn get(self) -> u32 {
        self.0
    }
}

impl Default for Weight {
    fn default() -> Self {
        Self(100)
    }
}

impl<'de> Deserialize<'de> for Weight {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        int(d, 0, Self::MAX).map(Self)
    }
}

/// Deserializes an integer in `min..=max` into `T`.
pub(crate) fn int<'de, D, T>(d: D, min: T, max: T) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: Into<i128> + TryFrom<i128>,
{
    let (min, max) = (min.into(), max.into());
    let value = d.deserialize_any(IntVisitor { min, max })?;
    // In range by construction, so the conversion cannot fail.
    T::try_from(value).map_err(|_| de::Error::custom(range_message(min, max, value)))
}

/// `deserialize_with` for a count that must be at least 1.
pub(crate) fn nonzero<'de, D: Deserializer<'de>>(d: D) -> Result<NonZeroU32, D::Error> {
    let value = int(d, 1, u32::MAX)?;
    NonZeroU32::new(value).ok_or_else(|| de::Error::custom(range_message(1, 1, 0)))
}

/// [`nonzero`] for an optional key.
pub(crate) fn nonzero_opt<'de, D: Deserializer<'de>>(d: D) -> Result<Option<NonZeroU32>, D::Error> {
    nonzero(d).map(Some)
}

/// `deserialize_with` for any `u32`, with this crate's wording for negatives.
pub(crate) fn uint32<'de, D: Deserializer<'de>>(d: D) -> Result<u32, D::Error> {
    int(d, 0, u32::MAX)
}

/// Deserializes a float, accepting a TOML integer too.
pub(crate) fn float<'de, D: Deserializer<'de>>(
    d: D,
    expecting: &'static str,
) -> Result<f64, D::Error> {
    d.deserialize_any(FloatVisitor(expecting))
}

fn range_message(min: i128, max: i128, found: i128) -> String {
    // A bound at the type's own limit is not worth printing.
    let unbounded = max >= i128::from(u32::MAX);
    if unbounded {
        format!("must be at least {min}, found {found}")
    } else {
        format!("must be from {min} to {max}, found {found}")
    }
}

struct IntVisitor {
    min: i128,
    max: i128,
}

impl IntVisitor {
    fn check<E: de::Error>(&self, value: i128) -> Result<i128, E> {
        if (self.min..=self.max).contains(&value) {
            Ok(value)
        } else {
            Err(E::custom(range_message(self.min, self.max, value)))
        }
    }
}

impl Visitor<'_> for IntVisitor {
    type Value = i128;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an integer")
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<i128, E> {
        self.check(v.into())
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<i128, E> {
        self.check(v.into())
    }
}

struct FloatVisitor(&'static str);

impl Visitor<'_> for FloatVisitor {
    type Value = f64;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.0)
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<f64, E> {
        Ok(v)
    }

    #[allow(clippy::cast_precision_loss)] // config-sized integers are exact in f64
    fn visit_i64<E: de::Error>(self, v: i64) -> Result<f64, E> {
        Ok(v as f64)
    }

    #[allow(clippy::cast_precision_loss)]
    fn visit_u64<E: de::Error>(self, v: u64) -> Result<f64, E> {
        Ok(v as f64)
    }
}

/// Splits `"1.5s"` into the value `1.5 * scale(unit)`, truncated to an integer.
///
/// The number is decimal digits with at most one `.` that has digits on both
/// sides; no sign, exponent, or whitespace. `scale` maps the unit suffix to
/// its multiplier, `None` for an unknown unit. Returns `None` for any
/// malformed input or on overflow.
pub(crate) fn decimal(input: &str, scale: impl Fn(&str) -> Option<u128>) -> Option<u128> {
    let split = input
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(input.len());
    let (number, unit) = input.split_at(split);
    let multiplier = scale(unit)?;
    let (whole, fraction) = match number.split_once('.') {
        Some((whole, fraction)) => (whole, fraction),
        None => (number, ""),
    };
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    if !digits(whole) || (number.contains('.') && !digits(fraction)) {
        return None;
    }
    let mut value = whole.parse::<u128>().ok()?.checked_mul(multiplier)?;
    // Digits past the 18th cannot matter for any multiplier used here.
    let fraction = fraction.get(..fraction.len().min(18)).unwrap_or("");
    if !fraction.is_empty() {
        let denominator = 10u128.pow(u32::try_from(fraction.len()).ok()?);
        let numerator = fraction.parse::<u128>().ok()?.checked_mul(multiplier)?;
        value = value.checked_add(numerator / denominator)?;
    }
    Some(value)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[derive(Debug, Deserialize)]
    struct Doc {
        p: Option<Percent>,
        r: Option<Ratio>,
        w: Option<Weight>,
        #[serde(default, deserialize_with = "nonzero_opt")]
        n: Option<NonZeroU32>,
    }

    fn err(src: &str) -> String {
        toml::from_str::<Doc>(src).unwrap_err().message().to_owned()
    }

    #[test]
    fn bounded_numbers_accept_their_range() {
        let doc: Doc = toml::from_str("p = 100\nr = 1\nw = 10000\nn = 1").unwrap();
        assert_eq!(doc.p.unwrap().get(), 100);
        assert_eq!(doc.r.unwrap().get(), 1.0);
        assert_eq!(doc.w.unwrap().get(), 10_000);
        assert_eq!(doc.n.unwrap().get(), 1);
        let doc: Doc = toml::from_str("p = 0\nr = 0.25\nw = 0").unwrap();
        assert_eq!(doc.r.unwrap().get(), 0.25);
        assert_eq!(Weight::default().get(), 100);
    }

    #[test]
    fn bounded_numbers_reject_out_of_range() {
        assert_eq!(err("p = 150"), "must be from 0 to 100, found 150");
        assert_eq!(err("p = -1"), "must be from 0 to 100, found -1");
        assert_eq!(err("r = 1.5"), "must be from 0.0 to 1.0, found 1.5");
        assert_eq!(err("r = nan"), "must be from 0.0 to 1.0, found NaN");
        assert_eq!(err("w = 10001"), "must be from 0 to 10000, found 10001");
        assert_eq!(err("n = 0"), "must be at least 1, found 0");
        assert!(err("p = 1.5").starts_with("invalid type: floating point `1.5`"));
        assert!(err("r = \"x\"").ends_with("expected a ratio from 0.0 to 1.0"));
    }

    #[test]
    fn decimal_scans_numbers_and_units() {
        let unit = |u: &str| (u == "x").then_some(1000);
        assert_eq!(decimal("2x", unit), Some(2000));
        assert_eq!(decimal("1.5x", unit), Some(1500));
        assert_eq!(decimal("0.0015x", unit), Some(1));
        for bad in ["x", "1", "1.x", ".5x", "1..5x", "-1x", "1 x", "1y", ""] {
            assert_eq!(decimal(bad, unit), None, "{bad:?}");
        }
        assert_eq!(decimal("999999999999999999999999999999999999x", unit), None);
    }
}
