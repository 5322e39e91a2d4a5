//! Failures the proxy produces itself, and the one place they become responses.
//!
//! Each failure starts as a variant of [`ProxyError`] at the stage that detected it,
//! carrying the target it was working on and the underlying cause. [`ProxyError::status`]
//! and [`ProxyError::reason`] map it to the HTTP status and the `weft-reason` header;
//! [`crate::stack::respond`] is the only place that builds a response from an
//! error, so every refusal a client sees is labelled the same way.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http::{HeaderValue, StatusCode};

pub use crate::headers::{WEFT_LIMIT, WEFT_REASON};
use crate::limits::{ColdStartRefused, ConcurrencyCapped, RateLimited};
use crate::retry::replay::BodyError;

/// Why the proxy answered a request itself: the `weft-reason` header's value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Reason {
    BadRequest,
    RateLimit,
    ConcurrencyCap,
    Timeout,
    NoHealthyEndpoints,
    BudgetExhausted,
    UnknownService,
    DnsFailure,
    NoEndpoints,
    ConnectFailure,
    UpstreamFailure,
    NoLocalService,
    LoopDetected,
    UriTooLong,
    AmbiguousRequest,
    ForeignAuthority,
    Denied,
    ColdStartTimeout,
    InjectedFault,
}

impl Reason {
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::BadRequest => "bad-request",
            Self::RateLimit => "rate-limit",
            Self::ConcurrencyCap => "concurrency-cap",
            Self::Timeout => "timeout",
            Self::NoHealthyEndpoints => "no-healthy-endpoints",
            Self::BudgetExhausted => "budget-exhausted",
            Self::UnknownService => "unknown-service",
            Self::DnsFailure => "dns-failure",
            Self::NoEndpoints => "no-endpoints",
            Self::ConnectFailure => "connect-failure",
            Self::UpstreamFailure => "upstream-failure",
            Self::NoLocalService => "no-local-service",
            Self::LoopDetected => "loop-detected",
            Self::UriTooLong => "uri-too-long",
            Self::AmbiguousRequest => "ambiguous-request",
            Self::ForeignAuthority => "foreign-authority",
            Self::Denied => "denied",
            Self::ColdStartTimeout => "cold-start-timeout",
            Self::InjectedFault => "injected-fault",
        }
    }
}

impl std::fmt::Display for Reason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A failure produced by the proxy rather than by the upstream application.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("the request names no destination: send an absolute URI or a Host header")]
    NoAuthority,

    #[error("invalid destination {authority:?}: {problem}")]
    BadAuthority {
        authority: String,
        problem: &'static str,
    },

    #[error("unknown service {name:?}: not in the directory and DNS has no address for it")]
    UnknownService { name: String },

    #[error("DNS lookup for {name:?} failed: {message}")]
    Dns { name: String, message: String },

    #[error("service {service:?} has no endpoints")]
    NoEndpoints { service: String },

    #[error("connecting to {endpoint} failed")]
    Connect {
        endpoint: SocketAddr,
        #[source]
        source: crate::body::BoxError,
    },

    #[error("request to {endpoint} failed before a response arrived")]
    Upstream {
        endpoint: SocketAddr,
        #[source]
        source: crate::body::BoxError,
    },

    #[error("this sidecar fronts no local service: the bootstrap file has no [service] section")]
    NoLocalService,

    #[error(transparent)]
    RateLimited(#[from] RateLimited),

    #[error(transparent)]
    ConcurrencyCapped(#[from] ConcurrencyCapped),

    /// `limit`: `outbound.endpoint_max_concurrency` or
    /// `outbound.adaptive_concurrency`.
    #[error("every endpoint of {service:?} is at its concurrency cap ({limit})")]
    EndpointsSaturated {
        service: String,
        limit: &'static str,
    },

    #[error("no response within {after:?} ({limit})")]
    Timeout { limit: Arc<str>, after: Duration },

    #[error("every endpoint of {service:?} is ejected after repeated failures")]
    NoHealthyEndpoints { service: String },

    #[error("the retry budget is spent; the last attempt failed")]
    BudgetExhausted {
        #[source]
        last: Box<ProxyError>,
    },

    #[error(transparent)]
    RequestBody(#[from] BodyError),

    #[error("the request would loop back into this proxy's own listener {listener}")]
    Loop { listener: SocketAddr },

    #[error("the request target is {length} bytes, over limits.max_uri_length ({max})")]
    UriTooLong { length: usize, max: usize },

    #[error("ambiguous request: {problem}")]
    AmbiguousRequest { problem: &'static str },

    #[error("the inbound listener only serves the local service; {authority:?} is another host")]
    ForeignAuthority { authority: String },

    #[error("{caller} may not call {service} ({limit})")]
    Denied {
        caller: String,
        service: String,
        limit: Arc<str>,
    },

    #[error(transparent)]
    ColdStart(#[from] ColdStartRefused),
    #[error("fault injected by the policy ({limit}): answered {status}")]
    InjectedFault { status: StatusCode, limit: Arc<str> },
}

impl ProxyError {
    /// The HTTP status a client gets for this failure.
    pub fn status(&self) -> StatusCode {
        match self {
            Self::NoAuthority | Self::BadAuthority { .. } | Self::RequestBody(_) => {
                StatusCode::BAD_REQUEST
            }
            Self::RateLimited(_) => StatusCode::TOO_MANY_REQUESTS,
            Self::ConcurrencyCapped(_)
            | Self::EndpointsSaturated { .. }
            | Self::NoHealthyEndpoints { .. }
            | Self::ColdStart(_) => StatusCode::SERVICE_UNAVAILABLE,
            Self::Timeout { .. } => StatusCode::GATEWAY_TIMEOUT,
            Self::BudgetExhausted { last } => last.status(),
            Self::UnknownService { .. } => StatusCode::BAD_GATEWAY,
            Self::Dns { .. } => StatusCode::SERVICE_UNAVAILABLE,
            Self::NoEndpoints { .. } => StatusCode::SERVICE_UNAVAILABLE,
            Self::Connect { .. } | Self::Upstream { .. } => StatusCode::BAD_GATEWAY,
            Self::NoLocalService => StatusCode::SERVICE_UNAVAILABLE,
            Self::Loop { .. } => StatusCode::LOOP_DETECTED,
            Self::UriTooLong { .. } => StatusCode::URI_TOO_LONG,
            Self::AmbiguousRequest { .. } => StatusCode::BAD_REQUEST,
            Self::ForeignAuthority { .. } | Self::Denied { .. } => StatusCode::FORBIDDEN,
            Self::InjectedFault { status, .. } => *status,
        }
    }

    /// The value of the `weft-reason` header: a short, stable, machine-readable label.
    pub fn reason(&self) -> Reason {
        match self {
            Self::NoAuthority | Self::BadAuthority { .. } | Self::RequestBody(_) => {
                Reason::BadRequest
            }
            Self::RateLimited(_) => Reason::RateLimit,
            Self::ConcurrencyCapped(_) | Self::EndpointsSaturated { .. } => Reason::ConcurrencyCap,
            Self::Timeout { .. } => Reason::Timeout,
            Self::NoHealthyEndpoints { .. } => Reason::NoHealthyEndpoints,
            Self::BudgetExhausted { .. } => Reason::BudgetExhausted,
            Self::UnknownService { .. } => Reason::UnknownService,
            Self::Dns { .. } => Reason::DnsFailure,
            Self::NoEndpoints { .. } => Reason::NoEndpoints,
            Self::Connect { .. } => Reason::ConnectFailure,
            Self::Upstream { .. } => Reason::UpstreamFailure,
            Self::NoLocalService => Reason::NoLocalService,
            Self::Loop { .. } => Reason::LoopDetected,
            Self::UriTooLong { .. } => Reason::UriTooLong,
            Self::AmbiguousRequest { .. } => Reason::AmbiguousRequest,
            Self::ForeignAuthority { .. } => Reason::ForeignAuthority,
            Self::Denied { .. } => Reason::Denied,
            Self::ColdStart(_) => Reason::ColdStartTimeout,
            Self::InjectedFault { .. } => Reason::InjectedFault,
        }
    }

    /// The gRPC status a gRPC caller gets for this failure: RESOURCE_EXHAUSTED
    /// for a limit, DEADLINE_EXCEEDED for a timeout, UNAVAILABLE where another
    /// try (later, or elsewhere) may succeed, PERMISSION_DENIED for a refused
    /// caller, INVALID_ARGUMENT for a request the proxy cannot forward.
    pub fn grpc_code(&self) -> u8 {
        const UNKNOWN: u8 = 2;
        const INVALID_ARGUMENT: u8 = 3;
        const DEADLINE_EXCEEDED: u8 = 4;
        const NOT_FOUND: u8 = 5;
        const PERMISSION_DENIED: u8 = 7;
        const RESOURCE_EXHAUSTED: u8 = 8;
        const UNIMPLEMENTED: u8 = 12;
        const INTERNAL: u8 = 13;
        const UNAVAILABLE: u8 = 14;
        const UNAUTHENTICATED: u8 = 16;
        match self {
            Self::NoAuthority
            | Self::BadAuthority { .. }
            | Self::RequestBody(_)
            | Self::UriTooLong { .. }
            | Self::AmbiguousRequest { .. } => INVALID_ARGUMENT,
            Self::RateLimited(_) | Self::ConcurrencyCapped(_) | Self::EndpointsSaturated { .. } => {
                RESOURCE_EXHAUSTED
            }
            Self::Timeout { .. } => DEADLINE_EXCEEDED,
            Self::BudgetExhausted { last } => last.grpc_code(),
            Self::UnknownService { .. } => NOT_FOUND,
            Self::Dns { .. }
            | Self::NoEndpoints { .. }
            | Self::NoHealthyEndpoints { .. }
            | Self::Connect { .. }
            | Self::Upstream { .. }
            | Self::NoLocalService
            | Self::ColdStart(_) => UNAVAILABLE,
            Self::Loop { .. } => INTERNAL,
            Self::ForeignAuthority { .. } | Self::Denied { .. } => PERMISSION_DENIED,
            // gRPC's mapping of HTTP statuses (doc/http-grpc-status-mapping.md).
            Self::InjectedFault { status, .. } => match status.as_u16() {
                400 => INTERNAL,
                401 => UNAUTHENTICATED,
                403 => PERMISSION_DENIED,
                404 => UNIMPLEMENTED,
                429 | 502..=504 => UNAVAILABLE,
                _ => UNKNOWN,
            },
        }
    }
}

impl ProxyError {
    /// The policy key of the limit that refused the request, if a limit did.
    pub fn limit(&self) -> Option<&str> {
        match self {
            Self::RateLimited(e) => Some(&e.limit),
            Self::ConcurrencyCapped(e) => Some(&e.limit),
            Self::EndpointsSaturated { limit, .. } => Some(limit),
            Self::Timeout { limit, .. } => Some(limit),
            Self::BudgetExhausted { last } => last.limit(),
            Self::UriTooLong { .. } => Some("limits.max_uri_length"),
            Self::Denied { limit, .. } | Self::InjectedFault { limit, .. } => Some(limit),
            Self::ColdStart(e) => Some(e.limit()),
            _ => None,
        }
    }

    /// When a retry could succeed, for the `retry-after` header.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            Self::RateLimited(e) => Some(e.retry_after),
            _ => None,
        }
    }
}

/// `retry-after` in whole seconds, rounded up, at least 1.
pub fn retry_after_value(wait: Duration) -> HeaderValue {
    let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
    HeaderValue::from(secs.max(1))
}

/// `err` and its causes, `: `-separated (e.g. a connect failure and the TLS
/// reason behind it), for the response body and logs.
pub fn chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// The refusal a response stands for, in its extensions.
#[derive(Debug, Clone)]
pub struct Refusal {
    pub reason: Reason,
    /// The policy key of the limit that refused (`weft-limit`), if one did.
    pub limit: Option<Arc<str>>,
}

impl Refusal {
    /// The refusal `error` stands for.
    pub fn of(error: &ProxyError) -> Self {
        Self {
            reason: error.reason(),
            limit: error.limit().map(Arc::from),
        }
    }
}
