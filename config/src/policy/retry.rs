//! Retry settings: how many times, on which failures, with what backoff,
//! and how much of a request body may be buffered to replay it.
//!
//! Retries are conservative by default (see [`Retry::default`]): connect
//! failures, resets, refused streams and 502/503/504, idempotent methods only,
//! bodies up to 64 KiB. A route that writes `retry = { attempts = 0 }` turns
//! retries off but keeps the other defaults.

use std::fmt;
use std::str::FromStr;

use serde::de::Deserializer;
use serde::{Deserialize, Serialize, Serializer};

use crate::duration::{Duration, DurationRange};
use crate::number::{self, Ratio};
use crate::size::ByteSize;
use crate::text::ParseVisitor;

/// `retry = { ... }` on the outbound defaults or on a route.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(
    default,
    deny_unknown_fields,
    expecting = "a table like { attempts = 2 }"
)]
pub struct Retry {
    /// Retries after the first try, 0 to 10. Default 2.
    #[serde(deserialize_with = "attempts")]
    pub attempts: u32,
    /// Failures that may be retried. Default connect-failure, reset,
    /// refused-stream, 502, 503, 504.
    pub on: Vec<RetryOn>,
    /// Jittered exponential backoff from `min` up to `max`. Default
    /// `25ms..250ms`.
    pub backoff: DurationRange,
    /// This route's own retry ratio, instead of `outbound.retry_budget.ratio`.
    /// Default none.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub budget: Option<Ratio>,
    /// Largest request body buffered for replay; a longer body is not retried.
    /// Default `64KiB`.
    pub max_replay_body: ByteSize,
    /// Also retry non-idempotent methods (POST, PATCH). Default false.
    pub non_idempotent: bool,
}

impl Retry {
    /// The most `attempts` accepted.
    pub const MAX_ATTEMPTS: u32 = 10;
}

impl Default for Retry {
    fn default() -> Self {
        Self {
            attempts: 2,
            on: vec![
                RetryOn::ConnectFailure,
                RetryOn::Reset,
                RetryOn::RefusedStream,
                RetryOn::Status(502),
                RetryOn::Status(503),
                RetryOn::Status(504),
            ],
            backoff: DurationRange {
                min: Duration::from_millis(25),
                max: Duration::from_millis(250),
            },
            budget: None,
            max_replay_body: ByteSize::kib(64),
            non_idempotent: false,
        }
    }
}

fn attempts<'de, D: Deserializer<'de>>(d: D) -> Result<u32, D::Error> {
    number::int(d, 0, Retry::MAX_ATTEMPTS)
}

/// A failure that may be retried.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RetryOn {
    /// `connect-failure`: the connection could not be made; nothing was sent.
    ConnectFailure,
    /// `reset`: the connection or stream was reset before a response.
    Reset,
    /// `refused-stream`: HTTP/2 REFUSED_STREAM; the peer did not process it.
    RefusedStream,
    /// `5xx`: any response status from 500 to 599.
    Any5xx,
    /// `"503"`: one response status, 100 to 599.
    Status(u16),
    /// `grpc-unavailable` or `grpc:14`: a gRPC status code, 0 to 16.
    Grpc(u8),
}

/// The gRPC codes with a name of their own.
const GRPC_NAMES: [(&str, u8); 5] = [
    ("grpc-cancelled", 1),
    ("grpc-deadline-exceeded", 4),
    ("grpc-resource-exhausted", 8),
    ("grpc-internal", 13),
    ("grpc-unavailable", 14),
];

/// The error for a string that is not a retry condition.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "unknown retry condition {0:?}, expected one of: connect-failure, reset, refused-stream, \
     5xx, a status code from 100 to 599 (e.g. \"503\"), grpc-unavailable, \
     grpc-resource-exhausted, grpc-deadline-exceeded, grpc-internal, grpc-cancelled, \
     grpc:<code 0 to 16>"
)]
pub struct ParseRetryOnError(String);

impl FromStr for RetryOn {
    type Err = ParseRetryOnError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || ParseRetryOnError(s.to_owned());
        let digits =
            |d: &str| !d.is_empty() && d.len() <= 3 && d.bytes().all(|b| b.is_ascii_digit());
        match s {
            "connect-failure" => Ok(Self::ConnectFailure),
            "reset" => Ok(Self::Reset),
            "refused-stream" => Ok(Self::RefusedStream),
            "5xx" => Ok(Self::Any5xx),
            _ if s.len() == 3 && digits(s) => match s.parse() {
                Ok(code @ 100..=599) => Ok(Self::Status(code)),
                _ => Err(err()),
            },
            _ => {
                if let Some((_, code)) = GRPC_NAMES.iter().find(|(name, _)| *name == s) {
                    return Ok(Self::Grpc(*code));
                }
                match s
                    .strip_prefix("grpc:")
                    .filter(|c| digits(c))
                    .map(str::parse)
                {
                    Some(Ok(code @ 0..=16)) => Ok(Self::Grpc(code)),
                    _ => Err(err()),
                }
            }
        }
    }
}

/// The form the file uses; named gRPC codes print by name.
impl fmt::Display for RetryOn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::ConnectFailure => f.write_str("connect-failure"),
            Self::Reset => f.write_str("reset"),
            Self::RefusedStream => f.write_str("refused-stream"),
            Self::Any5xx => f.write_str("5xx"),
            Self::Status(code) => write!(f, "{code}"),
            Self::Grpc(code) => match GRPC_NAMES.iter().find(|(_, c)| c == code) {
                Some((name, _)) => f.write_str(name),
                None => write!(f, "grpc:{code}"),
            },
        }
    }
}

impl Serialize for RetryOn {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for RetryOn {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_str(ParseVisitor::new("a retry condition like \"503\""))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn retry_conditions_parse_and_print() {
        for (input, parsed, shown) in [
            (
                "connect-failure",
                RetryOn::ConnectFailure,
                "connect-failure",
            ),
            ("reset", RetryOn::Reset, "reset"),
            ("refused-stream", RetryOn::RefusedStream, "refused-stream"),
            ("5xx", RetryOn::Any5xx, "5xx"),
            ("503", RetryOn::Status(503), "503"),
            ("429", RetryOn::Status(429), "429"),
            ("100", RetryOn::Status(100), "100"),
            ("grpc-unavailable", RetryOn::Grpc(14), "grpc-unavailable"),
            ("grpc-cancelled", RetryOn::Grpc(1), "grpc-cancelled"),
            ("grpc:14", RetryOn::Grpc(14), "grpc-unavailable"),
            ("grpc:0", RetryOn::Grpc(0), "grpc:0"),
            ("grpc:16", RetryOn::Grpc(16), "grpc:16"),
        ] {
            let on: RetryOn = input.parse().unwrap();
            assert_eq!(on, parsed, "{input}");
            assert_eq!(on.to_string(), shown);
        }
    }

    #[test]
    fn unknown_retry_conditions_list_the_accepted_forms() {
        for bad in [
            "600", "099", "50x", "5XX", "grpc:17", "grpc:", "grpc:-1", "timeout", "", "0503",
        ] {
            let err = bad.parse::<RetryOn>().unwrap_err().to_string();
            assert!(err.starts_with(&format!(
                "unknown retry condition {bad:?}, expected one of: "
            )));
        }
    }

    #[test]
    fn defaults_fill_unwritten_keys() {
        let retry: Retry = toml::from_str("attempts = 0").unwrap();
        assert_eq!(
            retry,
            Retry {
                attempts: 0,
                ..Retry::default()
            }
        );
        let err = toml::from_str::<Retry>("attempts = 11").unwrap_err();
        assert_eq!(err.message(), "must be from 0 to 10, found 11");
        let retry: Retry = toml::from_str("budget = 0.5\nmax_replay_body = 1024").unwrap();
        assert_eq!(retry.budget.map(Ratio::get), Some(0.5));
        assert_eq!(retry.max_replay_body.get(), 1024);
    }
}
