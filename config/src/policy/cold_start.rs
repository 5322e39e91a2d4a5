//! `outbound.cold_start`: calls held while a service scales from zero.
//!
//! A service whose instances are stopped when idle and started on demand has,
//! for a moment, no endpoint at all. With this table, a caller's sidecar holds
//! new calls to it (at most `queue` of them, each at most `hold`) instead of
//! refusing them at once, releases them when the first instance registers,
//! and may tell an activator (`activate`) to start one. Every bound is checked
//! as the table deserializes, so errors point at the offending value.

use serde::de::{self, Deserializer};
use serde::{Deserialize, Serialize};

use crate::duration::Duration;
use crate::number;

/// `outbound.cold_start = { hold = "10s", queue = 100, activate = "http://..." }`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(
    default,
    deny_unknown_fields,
    expecting = "a table like { hold = \"10s\", queue = 100 }"
)]
pub struct ColdStart {
    /// How long one call may be held, longer than 0 and at most `5m`.
    /// Default `10s`.
    #[serde(deserialize_with = "hold")]
    pub hold: Duration,
    /// Calls held at once per service (per caller sidecar), 1 to 10000;
    /// more are refused at once. Default 100.
    #[serde(deserialize_with = "queue")]
    pub queue: u32,
    /// Called (`POST`) once per cold start so a platform can start an
    /// instance: an `http://host:port/path` URL. Default none.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub activate: Option<ActivatorUrl>,
}

impl ColdStart {
    /// The longest `hold` accepted.
    pub const MAX_HOLD: Duration = Duration::from_secs(5 * 60);
    /// The largest `queue` accepted.
    pub const MAX_QUEUE: u32 = 10_000;
    /// `hold` when the key is absent.
    pub const DEFAULT_HOLD: Duration = Duration::from_secs(10);
    /// `queue` when the key is absent.
    pub const DEFAULT_QUEUE: u32 = 100;
}

impl Default for ColdStart {
    fn default() -> Self {
        Self {
            hold: Self::DEFAULT_HOLD,
            queue: Self::DEFAULT_QUEUE,
            activate: None,
        }
    }
}

fn hold<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let value = Duration::deserialize(d)?;
    if value.is_zero() || value > ColdStart::MAX_HOLD {
        return Err(de::Error::custom(format!(
            "must be longer than 0s and at most {}, found {value}",
            ColdStart::MAX_HOLD
        )));
    }
    Ok(value)
}

fn queue<'de, D: Deserializer<'de>>(d: D) -> Result<u32, D::Error> {
    number::int(d, 1, ColdStart::MAX_QUEUE)
}

/// The activator's URL: `http://host[:port][/path]`, checked when it is read.
/// (https is refused: the sidecar has no TLS client for hosts outside the
/// mesh.)
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
#[serde(transparent)]
pub struct ActivatorUrl(String);

impl ActivatorUrl {
    /// The URL as written.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Checks `url` as the policy file's `activate` key does.
    pub fn parse(url: &str) -> Result<Self, String> {
        if url.starts_with("https://") {
            return Err(format!(
                "activator URL {url:?}: https is not supported (the sidecar has no TLS client \
                 for hosts outside the mesh); use http:// to an activator on a trusted network"
            ));
        }
        let invalid = || {
            format!(
                "invalid activator URL {url:?}: expected an http URL like \
                 \"http://activator.internal:8080/activate\""
            )
        };
        let rest = url.strip_prefix("http://").ok_or_else(invalid)?;
        let (authority, path) = match rest.find('/') {
            Some(i) => rest.split_at(i),
            None => (rest, ""),
        };
        let (host, port) = match authority.rsplit_once(':') {
            // An IPv6 literal's colons are inside its brackets.
            Some((host, port)) if !port.contains(']') => (host, Some(port)),
            _ => (authority, None),
        };
        let host_ok = !host.is_empty()
            && !host.contains(['?', '#', '@', '/'])
            && host.chars().all(|c| c.is_ascii_graphic());
        let port_ok = port.is_none_or(|p| p.parse::<u16>().is_ok_and(|p| p != 0));
        let path_ok = path.chars().all(|c| c.is_ascii_graphic() && c != '#');
        if host_ok && port_ok && path_ok {
            Ok(Self(url.to_owned()))
        } else {
            Err(invalid())
        }
    }
}

impl<'de> Deserialize<'de> for ActivatorUrl {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let url = String::deserialize(d)?;
        Self::parse(&url).map_err(de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use std::path::Path;

    use super::*;

    fn parse(table: &str) -> Result<Option<ColdStart>, String> {
        let src = format!("service = \"lazy\"\n[outbound]\ncold_start = {table}\n");
        crate::parse_policy(&src, Path::new("p.toml"))
            .map(|p| p.outbound.cold_start)
            .map_err(|e| e.to_string().lines().next().unwrap_or_default().to_owned())
    }

    #[test]
    fn defaults_and_bounds() {
        let cs = parse("{}").unwrap().unwrap();
        assert_eq!(cs, ColdStart::default());
        assert_eq!(cs.hold.to_string(), "10s");
        assert_eq!(cs.queue, 100);
        let cs = parse("{ hold = \"5m\", queue = 10000, activate = \"http://10.0.0.1:9/up\" }")
            .unwrap()
            .unwrap();
        assert_eq!(cs.activate.unwrap().as_str(), "http://10.0.0.1:9/up");
        assert_eq!(
            parse("{ hold = \"0s\" }").unwrap_err(),
            "p.toml:3:23: outbound.cold_start.hold: must be longer than 0s and at most 5m, found 0s"
        );
        assert!(
            parse("{ hold = \"6m\" }")
                .unwrap_err()
                .contains("at most 5m, found 6m")
        );
        assert!(
            parse("{ queue = 0 }")
                .unwrap_err()
                .contains("outbound.cold_start.queue: must be from 1 to 10000, found 0"),
        );
        assert!(
            parse("{ queue = 10001 }")
                .unwrap_err()
                .contains("found 10001")
        );
        assert!(parse("{ wait = \"1s\" }").unwrap_err().contains("wait"));
    }

    #[test]
    fn activator_urls() {
        for ok in [
            "http://activator",
            "http://activator.internal:8080/activate",
            "http://127.0.0.1:9/a/b?x=1",
            "http://[::1]:80/",
        ] {
            assert!(ActivatorUrl::parse(ok).is_ok(), "{ok}");
        }
        for bad in [
            "activator:8080",
            "http://",
            "http://:80/",
            "http://a:0/",
            "http://a:x/",
            "http://a b/",
            "ftp://a/",
        ] {
            assert!(
                ActivatorUrl::parse(bad)
                    .unwrap_err()
                    .starts_with("invalid activator URL"),
                "{bad}"
            );
        }
        assert!(
            parse("{ activate = \"https://a/\" }")
                .unwrap_err()
                .contains("outbound.cold_start.activate: activator URL \"https://a/\": https is not supported")
        );
    }
}
