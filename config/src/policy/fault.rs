//! `routes[].fault`: fault injection, for service owners to test how their
//! callers cope with a slow or failing service (in staging).
//!
//! `delay` holds `delay_percent` percent of the route's requests that long
//! before they are forwarded; `abort` answers `abort_percent` percent of them
//! with that status (4xx or 5xx) in the caller's sidecar, without forwarding
//! them. A percent defaults to 100 when its value is set, and may be a
//! fraction (`0.5`). Both may be set; a request may be delayed and then
//! aborted.
//!
//! A `fault` only takes effect where it is permitted: in a policy the control
//! plane stored from `weftctl apply --allow-faults` (which writes the
//! top-level `allow_faults = true` marker; a plain `apply` of a policy with a
//! `fault` or the marker is refused), or in a local policy file of a sidecar
//! whose bootstrap sets `[directory] allow_faults = true` (the marker in a
//! local file is ignored: the bootstrap decides). Anywhere else the sidecar
//! ignores the key and logs a warning.

use serde::de::{self, Deserializer};
use serde::{Deserialize, Serialize};

use crate::duration::{self, Duration};
use crate::number;

/// `fault = { delay = "200ms", delay_percent = 5, abort = 503, abort_percent = 1 }`.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(
    default,
    deny_unknown_fields,
    expecting = "a table like { abort = 503, abort_percent = 1 }"
)]
pub struct Fault {
    /// How long a delayed request is held before it is forwarded. Default
    /// none.
    #[serde(
        skip_serializing_if = "Option::is_none",
        deserialize_with = "duration::positive_opt"
    )]
    pub delay: Option<Duration>,
    /// Percent of the route's requests delayed, 0 to 100. Default 100 with
    /// `delay`.
    #[serde(skip_serializing_if = "Option::is_none", deserialize_with = "percent")]
    pub delay_percent: Option<f64>,
    /// The status aborted requests are answered with, 400 to 599. Default
    /// none.
    #[serde(skip_serializing_if = "Option::is_none", deserialize_with = "status")]
    pub abort: Option<u16>,
    /// Percent of the route's requests aborted, 0 to 100. Default 100 with
    /// `abort`.
    #[serde(skip_serializing_if = "Option::is_none", deserialize_with = "percent")]
    pub abort_percent: Option<f64>,
}

impl Fault {
    /// The delay and the share (0 to 1) of requests it applies to.
    pub fn delay(&self) -> Option<(Duration, f64)> {
        self.delay
            .map(|delay| (delay, self.delay_percent.unwrap_or(100.0) / 100.0))
    }

    /// The abort status and the share (0 to 1) of requests it applies to.
    pub fn abort(&self) -> Option<(u16, f64)> {
        self.abort
            .map(|status| (status, self.abort_percent.unwrap_or(100.0) / 100.0))
    }
}

/// The line the control plane puts first in a policy it stores from
/// `weftctl apply --allow-faults` (a top-level key must come before any
/// table, so first is always valid TOML).
pub const ALLOW_FAULTS_LINE: &str =
    "allow_faults = true  # written by `weftctl apply --allow-faults`\n";

/// `text` as the control plane stores it from `weftctl apply
/// --allow-faults`: with the [`ALLOW_FAULTS_LINE`] marker first, unless the
/// policy already carries it (`already`).
pub fn permit_faults(text: &str, already: bool) -> String {
    if already {
        text.to_owned()
    } else {
        format!("{ALLOW_FAULTS_LINE}{text}")
    }
}

fn percent<'de, D: Deserializer<'de>>(d: D) -> Result<Option<f64>, D::Error> {
    let value = number::float(d, "a percent from 0 to 100, e.g. 5 or 0.5")?;
    if !(0.0..=100.0).contains(&value) {
        return Err(de::Error::custom(format!(
            "must be from 0 to 100, found {value}"
        )));
    }
    Ok(Some(value))
}

fn status<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u16>, D::Error> {
    let value: u16 = number::int(d, 0, 999)?;
    if !(400..=599).contains(&value) {
        return Err(de::Error::custom(format!(
            "an injected abort is a 4xx or 5xx status, found {value}"
        )));
    }
    Ok(Some(value))
}
