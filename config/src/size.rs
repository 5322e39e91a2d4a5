//! [`ByteSize`]: an amount of bytes, written as an integer (`65536`) or a
//! string with a unit (`"64KiB"`, `"1MiB"`, `"512B"`, `"10KB"`).
//!
//! Binary units (`KiB`, `MiB`, `GiB`, `TiB`) are powers of 1024 and decimal
//! units (`KB`, `MB`, `GB`, `TB`) powers of 1000, as their names say; unit
//! letters are case-insensitive, and a fractional number (`"1.5MiB"`) is
//! truncated to whole bytes. A size serializes as its integer byte count, so
//! JSON readers never parse units.

use std::fmt;
use std::str::FromStr;

use serde::de::{self, Deserializer, Visitor};
use serde::{Deserialize, Serialize};

/// A number of bytes from a config file.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(transparent)]
pub struct ByteSize(u64);

impl ByteSize {
    /// `n` bytes.
    pub const fn b(n: u64) -> Self {
        Self(n)
    }

    /// `n` KiB (1024 bytes each).
    pub const fn kib(n: u64) -> Self {
        Self(n * 1024)
    }

    /// `n` MiB.
    pub const fn mib(n: u64) -> Self {
        Self(n * 1024 * 1024)
    }

    /// The number of bytes.
    pub const fn get(self) -> u64 {
        self.0
    }
}

/// The error for a string that is not a size.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "invalid size {0:?}: expected a number of bytes or a number followed by a unit \
     (B, KB, MB, GB, KiB, MiB, GiB), e.g. \"64KiB\""
)]
pub struct ParseByteSizeError(String);

impl FromStr for ByteSize {
    type Err = ParseByteSizeError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let unit = |u: &str| {
            let power = |base: u128, exp: u32| Some(base.pow(exp));
            match u.to_ascii_lowercase().as_str() {
                "b" => Some(1),
                "kb" => power(1000, 1),
                "mb" => power(1000, 2),
                "gb" => power(1000, 3),
                "tb" => power(1000, 4),
                "kib" => power(1024, 1),
                "mib" => power(1024, 2),
                "gib" => power(1024, 3),
                "tib" => power(1024, 4),
                _ => None,
            }
        };
        crate::number::decimal(s, unit)
            .and_then(|n| u64::try_from(n).ok())
            .map(Self)
            .ok_or_else(|| ParseByteSizeError(s.to_owned()))
    }
}

/// The largest binary unit that states the size exactly: `"64KiB"`, `"1MiB"`,
/// `"1000B"`.
impl fmt::Display for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let units = [
            ("TiB", 1u64 << 40),
            ("GiB", 1 << 30),
            ("MiB", 1 << 20),
            ("KiB", 1 << 10),
        ];
        match units
            .into_iter()
            .find(|(_, n)| self.0 >= *n && self.0.is_multiple_of(*n))
        {
            Some((unit, n)) => write!(f, "{}{unit}", self.0 / n),
            None => write!(f, "{}B", self.0),
        }
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(SizeVisitor)
    }
}

struct SizeVisitor;

impl Visitor<'_> for SizeVisitor {
    type Value = ByteSize;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a size like \"64KiB\" or a number of bytes")
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<ByteSize, E> {
        u64::try_from(v)
            .map(ByteSize)
            .map_err(|_| E::custom(format!("must be at least 0, found {v}")))
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<ByteSize, E> {
        Ok(ByteSize(v))
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<ByteSize, E> {
        v.parse().map_err(E::custom)
    }
}

/// Deserializes a size in `min..=max`, with the crate's range wording
/// (`must be from 8KiB to 1MiB, found 4KiB`).
pub(crate) fn within<'de, D: Deserializer<'de>>(
    d: D,
    min: ByteSize,
    max: ByteSize,
) -> Result<ByteSize, D::Error> {
    let value = ByteSize::deserialize(d)?;
    if value < min || value > max {
        return Err(de::Error::custom(format!(
            "must be from {min} to {max}, found {value}"
        )));
    }
    Ok(value)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[derive(Debug, Deserialize)]
    struct Doc {
        s: ByteSize,
    }

    fn size(src: &str) -> Result<u64, String> {
        toml::from_str::<Doc>(&format!("s = {src}"))
            .map(|d| d.s.get())
            .map_err(|e| e.message().to_owned())
    }

    #[test]
    fn parses_integers_and_units() {
        assert_eq!(size("65536"), Ok(65_536));
        assert_eq!(size("\"64KiB\""), Ok(65_536));
        assert_eq!(size("\"1MiB\""), Ok(1 << 20));
        assert_eq!(size("\"512B\""), Ok(512));
        assert_eq!(size("\"10KB\""), Ok(10_000));
        assert_eq!(size("\"10kb\""), Ok(10_000));
        assert_eq!(size("\"1.5MiB\""), Ok(1_572_864));
        assert_eq!(size("\"0B\""), Ok(0));
    }

    #[test]
    fn rejects_malformed_sizes() {
        assert_eq!(size("-1"), Err("must be at least 0, found -1".into()));
        for bad in [
            "\"64\"",
            "\"64 KiB\"",
            "\"KiB\"",
            "\"1XB\"",
            "\"99999999999TiB\"",
        ] {
            let err = size(bad).unwrap_err();
            assert!(err.starts_with("invalid size"), "{bad}: {err}");
        }
        assert!(size("true").unwrap_err().contains("expected a size like"));
    }

    #[test]
    fn displays_in_the_largest_exact_unit() {
        assert_eq!(ByteSize::kib(64).to_string(), "64KiB");
        assert_eq!(ByteSize::mib(1).to_string(), "1MiB");
        assert_eq!(ByteSize::b(1000).to_string(), "1000B");
        assert_eq!(ByteSize::b(0).to_string(), "0B");
        assert_eq!("64KiB".parse::<ByteSize>().unwrap(), ByteSize::kib(64));
    }
}
