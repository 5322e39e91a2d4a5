//! The service policy file, owned by a service's team: how the service may be
//! called (`[inbound]`, enforced by its own sidecars) and how callers reach it
//! (`[outbound]`, `[[routes]]` and `[[splits]]`, enforced by each caller's
//! sidecar).
//!
//! Field names are the TOML keys (`Route::r#match` is the `match` key).
//! Defaults live in the `Default` impls, one per type, and are documented on
//! each field. Single values are checked as they deserialize; rules across
//! keys (unique route names, `per_try_timeout <= timeout`, split weights
//! adding up to at most 100, ...) live in the private `validate` module and run
//! in [`crate::parse_policy`].
//!
//! Layout (private submodules, re-exported here): `limits` has the rate,
//! queue, outlier, budget and locality tables; `retry` the retry table;
//! `route` routes, matches and splits; `hedge` a route's hedged requests;
//! `fault` its fault injection; `cold_start` the table of calls held while a
//! service scales from zero.

mod adaptive;
mod cold_start;
mod fault;
mod hedge;
mod limits;
mod retry;
mod route;
mod validate;

use std::num::NonZeroU32;

use serde::{Deserialize, Serialize};

pub use self::adaptive::AdaptiveConcurrency;
pub use self::cold_start::{ActivatorUrl, ColdStart};
pub use self::fault::{ALLOW_FAULTS_LINE, Fault, permit_faults};
pub use self::hedge::{Hedge, HedgeAfter, ParseHedgeAfterError};
pub use self::limits::{CallerRateLimit, Locality, Outlier, Queue, RateLimit, RetryBudget};
pub use self::retry::{ParseRetryOnError, Retry, RetryOn};
pub use self::route::{HeaderMatch, HeaderName, Method, Route, RouteMatch, Split};
use crate::duration::{self, Duration};
use crate::identity::CallerId;
use crate::name::ServiceName;
use crate::number;

/// A whole policy file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, expecting = "a policy document")]
pub struct Policy {
    /// The service this policy is for.
    pub service: ServiceName,
    /// Limits every instance enforces on its callers.
    #[serde(default)]
    pub inbound: Inbound,
    /// How callers' sidecars reach the service.
    #[serde(default)]
    pub outbound: Outbound,
    /// Per-route settings, first match wins. Default none.
    #[serde(default)]
    pub routes: Vec<Route>,
    /// Traffic splits by instance metadata. Default none.
    #[serde(default)]
    pub splits: Vec<Split>,
    /// Whether the routes' `fault` keys may take effect. Written by the
    /// control plane (`weftctl apply --allow-faults`), which refuses a plain
    /// apply that carries it; for a local policy file the sidecar's bootstrap
    /// (`[directory] allow_faults`) decides instead. Default false.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub allow_faults: bool,
}

impl Policy {
    /// The names of the routes with a `fault`, in file order.
    pub fn fault_routes(&self) -> Vec<&str> {
        self.routes
            .iter()
            .filter(|r| r.fault.is_some())
            .map(|r| r.name.as_str())
            .collect()
    }

    /// The keys this policy sets that only the service's own sidecars enforce
    /// (`inbound.*`, and each route's `rate_limit`, `max_concurrency`, `queue`
    /// and `allow`), as key paths (`inbound.rate_limit`,
    /// `routes.charge.max_concurrency`), in file order. A caller's sidecar
    /// reads the same file for the other keys and never enforces these.
    pub fn service_side_keys(&self) -> Vec<String> {
        let i = &self.inbound;
        let inbound = [
            ("max_concurrency", i.max_concurrency.is_some()),
            ("queue", i.queue.is_some()),
            ("rate_limit", i.rate_limit.is_some()),
            ("caller_rate_limit", i.caller_rate_limit.is_some()),
            ("allow", i.allow.is_some()),
            ("allow_plaintext", i.allow_plaintext),
            ("timeout", i.timeout.is_some()),
            ("adaptive_concurrency", i.adaptive_concurrency.is_some()),
        ];
        let mut keys: Vec<String> = inbound
            .iter()
            .filter(|(_, set)| *set)
            .map(|(key, _)| format!("inbound.{key}"))
            .collect();
        for r in &self.routes {
            let route = [
                ("rate_limit", r.rate_limit.is_some()),
                ("max_concurrency", r.max_concurrency.is_some()),
                ("queue", r.queue.is_some()),
                ("allow", r.allow.is_some()),
            ];
            keys.extend(
                route
                    .iter()
                    .filter(|(_, set)| *set)
                    .map(|(key, _)| format!("routes.{}.{key}", r.name)),
            );
        }
        keys
    }
}

/// `[inbound]`: what each instance's sidecar enforces. Every key defaults to
/// "no limit".
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields, expecting = "a table")]
pub struct Inbound {
    /// In-flight requests per instance.
    #[serde(
        skip_serializing_if = "Option::is_none",
        deserialize_with = "number::nonzero_opt"
    )]
    pub max_concurrency: Option<NonZeroU32>,
    /// A bounded wait when `max_concurrency` is reached.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub queue: Option<Queue>,
    /// A rate limit for the whole service, shared across its instances.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<RateLimit>,
    /// A rate limit per caller identity.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub caller_rate_limit: Option<CallerRateLimit>,
    /// Caller identities allowed to call the service (service names of the
    /// sidecar's trust domain, or whole SPIFFE IDs); an empty list allows no
    /// caller. `None`: the bootstrap's `[tls] default_inbound` decides (by
    /// default any meshed caller). A route's own `allow` replaces this one
    /// for its requests.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub allow: Option<Vec<CallerId>>,
    /// With mTLS on (`[tls]` in the sidecar's bootstrap), also accept
    /// plaintext connections on the inbound listener, for a migration.
    /// Default `false`; without `[tls]` everything is plaintext anyway.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub allow_plaintext: bool,
    /// Whole-request timeout for inbound requests.
    #[serde(
        skip_serializing_if = "Option::is_none",
        deserialize_with = "duration::positive_opt"
    )]
    pub timeout: Option<Duration>,
    /// A per-instance concurrency limit that follows measured latency; not
    /// with `max_concurrency`. Default none.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub adaptive_concurrency: Option<AdaptiveConcurrency>,
}

/// `[outbound]`: what each caller's sidecar does when calling the service.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields, expecting = "a table")]
pub struct Outbound {
    /// How an endpoint is picked. Default `p2c-ewma`.
    pub load_balancer: LoadBalancer,
    /// In-flight requests per endpoint, per caller. Default no limit.
    #[serde(
        skip_serializing_if = "Option::is_none",
        deserialize_with = "number::nonzero_opt"
    )]
    pub endpoint_max_concurrency: Option<NonZeroU32>,
    /// Connection timeout, longer than 0. Default `1s`.
    #[serde(deserialize_with = "duration::positive")]
    pub connect_timeout: Duration,
    /// Cut a connection or stream idle this long. Default none.
    #[serde(
        skip_serializing_if = "Option::is_none",
        deserialize_with = "duration::positive_opt"
    )]
    pub idle_timeout: Option<Duration>,
    /// What each caller's sidecar sends to the service in total. Default none.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<RateLimit>,
    /// Ejection of failing endpoints. Always on; default 5 failures, 30s
    /// first ejection, 5m at most, at most 50% of endpoints ejected.
    pub outlier: Outlier,
    /// The retry budget shared by all routes. Default ratio 0.2, 10 retries
    /// per second always allowed, over a 10s window.
    pub retry_budget: RetryBudget,
    /// Zone-local balancing. Default on, spilling over below 70% healthy.
    pub locality: Locality,
    /// Default whole-request timeout for routes. Default none.
    #[serde(
        skip_serializing_if = "Option::is_none",
        deserialize_with = "duration::positive_opt"
    )]
    pub timeout: Option<Duration>,
    /// Default per-try timeout for routes, at most `timeout`. Default none.
    #[serde(
        skip_serializing_if = "Option::is_none",
        deserialize_with = "duration::positive_opt"
    )]
    pub per_try_timeout: Option<Duration>,
    /// Default retries for routes; `None` uses [`Retry::default`].
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retry: Option<Retry>,
    /// Hold calls while the service has no endpoint (it scales from zero).
    /// Default none: such calls are refused at once (`no-endpoints`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cold_start: Option<ColdStart>,
    /// A per-endpoint concurrency limit that follows measured latency, per
    /// caller; not with `endpoint_max_concurrency`. Default none.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub adaptive_concurrency: Option<AdaptiveConcurrency>,
}

impl Default for Outbound {
    fn default() -> Self {
        Self {
            load_balancer: LoadBalancer::default(),
            endpoint_max_concurrency: None,
            connect_timeout: Duration::from_secs(1),
            idle_timeout: None,
            rate_limit: None,
            outlier: Outlier::default(),
            retry_budget: RetryBudget::default(),
            locality: Locality::default(),
            timeout: None,
            per_try_timeout: None,
            retry: None,
            cold_start: None,
            adaptive_concurrency: None,
        }
    }
}

/// How a caller's sidecar picks one of a service's endpoints.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum LoadBalancer {
    /// `p2c-ewma`: power of two choices over peak-EWMA latency.
    #[default]
    P2cEwma,
    /// `round-robin`.
    RoundRobin,
    /// `least-request`: power of two choices over in-flight requests.
    LeastRequest,
}

/// The settings a request on `route` runs with: the route's own keys, else
/// the `[outbound]` defaults.
#[derive(Debug, Clone, PartialEq)]
pub struct RouteSettings<'a> {
    /// Whole-request timeout, if any.
    pub timeout: Option<Duration>,
    /// Per-try timeout, if any.
    pub per_try_timeout: Option<Duration>,
    /// Retries (the route's, else `outbound.retry`, else the default).
    pub retry: std::borrow::Cow<'a, Retry>,
}

impl Outbound {
    /// Resolves a route's settings against these defaults; `None` for
    /// requests no route matched.
    pub fn settings_for<'a>(&'a self, route: Option<&'a Route>) -> RouteSettings<'a> {
        let retry = route
            .and_then(|r| r.retry.as_ref())
            .or(self.retry.as_ref())
            .map_or_else(
                || std::borrow::Cow::Owned(Retry::default()),
                std::borrow::Cow::Borrowed,
            );
        RouteSettings {
            timeout: route.and_then(|r| r.timeout).or(self.timeout),
            per_try_timeout: route
                .and_then(|r| r.per_try_timeout)
                .or(self.per_try_timeout),
            retry,
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use std::path::Path;

    #[test]
    fn service_side_keys_are_listed_in_file_order() {
        let src = r#"
service = "billing"
[inbound]
rate_limit = { per_second = 100, burst = 10 }
allow_plaintext = true
[outbound]
rate_limit = { per_second = 100, burst = 10 }
[[routes]]
name = "charge"
match = { path_prefix = "/charge" }
timeout = "1s"
max_concurrency = 5
queue = { depth = 1, timeout = "10ms" }
[[routes]]
name = "read"
retry = { attempts = 1 }
"#;
        let policy = crate::parse_policy(src, Path::new("billing.toml")).unwrap();
        assert_eq!(
            policy.service_side_keys(),
            [
                "inbound.rate_limit",
                "inbound.allow_plaintext",
                "routes.charge.max_concurrency",
                "routes.charge.queue",
            ]
        );
        let caller_only = "service = \"billing\"\n[outbound]\ntimeout = \"1s\"\n";
        let policy = crate::parse_policy(caller_only, Path::new("billing.toml")).unwrap();
        assert!(policy.service_side_keys().is_empty());
    }
}
