//! Weft's configuration schemas, parsed and validated: the sidecar bootstrap
//! file (owned by ops) and the service policy file (owned by each service's
//! team).
//!
//! Files are parsed once, at the edge, into strong types ("parse, don't
//! validate"): durations, sizes, socket addresses, service names and bounded
//! numbers are checked as they deserialize, rules across keys right after.
//! Whatever comes out of [`parse_bootstrap`], [`parse_policy`] or the `load_*`
//! functions is valid; a file with any mistake yields one [`ConfigError`] that
//! names the file, line, column and key, and nothing of it is used. Every type
//! also serializes to clean JSON for the admin `/config` endpoint. The crate
//! does no network I/O; [`load_bootstrap`] and [`load_policy`] are its only
//! file I/O.
//!
//! # Layout
//!
//! - [`name`], [`identity`], [`duration`], [`size`], [`number`]: value
//!   types, each validated in its `Deserialize`.
//! - [`bootstrap`]: the bootstrap schema, defaults and cross-key rules.
//! - [`policy`]: the policy schema, defaults and cross-key rules.
//! - [`error`]: [`ConfigError`] and how it is displayed.
//! - `diag` (private): turns serde errors and broken rules into located errors.
//! - `text` (private): string-typed values such as socket addresses.
//! - `load` (private): reading files; [`Loaded`].
//! - `fuzzing` (hidden): what the fuzz targets in `fuzz/` run on each input.

pub mod bootstrap;
mod diag;
pub mod duration;
pub mod error;
#[doc(hidden)]
pub mod fuzzing;
pub mod identity;
mod load;
pub mod name;
pub mod number;
pub mod policy;
pub mod size;
mod text;

use std::path::Path;

pub use bootstrap::{
    Bootstrap, ControlPlane, DefaultInbound, Directory, Dns, Drain, HealthCheck, Limits, Listen,
    LocalService, Metadata, Pool, Protocol, StaticEndpoint, StaticService, Telemetry, Tls, TlsMode,
};
pub use duration::{Duration, DurationRange};
pub use error::ConfigError;
pub use identity::{CallerId, InvalidCaller, InvalidIdentity, SpiffeId, TrustDomain};
pub use load::{Loaded, load_bootstrap, load_policy};
pub use name::ServiceName;
pub use number::{Percent, Ratio, Weight};
pub use policy::{
    ActivatorUrl, AdaptiveConcurrency, CallerRateLimit, ColdStart, Fault, HeaderMatch, HeaderName,
    Hedge, HedgeAfter, Inbound, LoadBalancer, Locality, Method, Outbound, Outlier, Policy, Queue,
    RateLimit, Retry, RetryBudget, RetryOn, Route, RouteMatch, RouteSettings, Split, permit_faults,
};
pub use size::ByteSize;

/// Parses and validates a bootstrap file's text. `file` is only used in
/// errors; policy files are not read (see [`load_bootstrap`]).
pub fn parse_bootstrap(src: &str, file: &Path) -> Result<Bootstrap, ConfigError> {
    let bootstrap: Bootstrap = diag::deserialize(src, file)?;
    bootstrap.validate().map_err(|p| p.into_error(src, file))?;
    Ok(bootstrap)
}

/// Parses and validates a policy file's text. `file` is only used in errors.
pub fn parse_policy(src: &str, file: &Path) -> Result<Policy, ConfigError> {
    let policy: Policy = diag::deserialize(src, file)?;
    policy.validate().map_err(|p| p.into_error(src, file))?;
    Ok(policy)
}
