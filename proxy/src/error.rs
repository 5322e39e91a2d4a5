//! Failures the proxy produces itself, and the one place they become responses.
//!
//! Each failure starts as a variant of [`ProxyError`] at the stage that detected it,
//! carrying the target it was working on and the underlying cause. [`ProxyError::status`]
//! and [`ProxyError::reason`] map it to the HTTP status and the `weft-reason` header;
//! [`error_response`] is the only function that builds a response from an error, so
//! every refusal a client sees is labelled the same way. Later stages (retries,
//! telemetry) classify with the same helpers.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http::{HeaderValue, Response, StatusCode, header};

use crate::limits::{ConcurrencyCapped, RateLimited};
use crate::retry::replay::BodyError;

use crate::body::{self, ProxyBody};

/// Name of the response header that says why the proxy answered itself.
pub const WEFT_REASON: &str = "weft-reason";

/// Name of the response header that names the policy key of the limit that refused
/// a request (e.g. `inbound.rate_limit`, `routes.charge.timeout`).
pub const WEFT_LIMIT: &str = "weft-limit";

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
        source: hyper_util::client::legacy::Error,
    },

    #[error("request to {endpoint} failed before a response arrived")]
    Upstream {
        endpoint: SocketAddr,
        #[source]
        source: hyper_util::client::legacy::Error,
    },

    #[error("this sidecar fronts no local service: the bootstrap file has no [service] section")]
    NoLocalService,

    #[error(transparent)]
    RateLimited(#[from] RateLimited),

    #[error(transparent)]
    ConcurrencyCapped(#[from] ConcurrencyCapped),

    #[error(
        "every endpoint of {service:?} is at its concurrency cap (outbound.endpoint_max_concurrency)"
    )]
    EndpointsSaturated { service: String },

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
            | Self::NoHealthyEndpoints { .. } => StatusCode::SERVICE_UNAVAILABLE,
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
        }
    }

    /// The value of the `weft-reason` header: a short, stable, machine-readable label.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::NoAuthority | Self::BadAuthority { .. } | Self::RequestBody(_) => "bad-request",
            Self::RateLimited(_) => "rate-limit",
            Self::ConcurrencyCapped(_) | Self::EndpointsSaturated { .. } => "concurrency-cap",
            Self::Timeout { .. } => "timeout",
            Self::NoHealthyEndpoints { .. } => "no-healthy-endpoints",
            Self::BudgetExhausted { .. } => "budget-exhausted",
            Self::UnknownService { .. } => "unknown-service",
            Self::Dns { .. } => "dns-failure",
            Self::NoEndpoints { .. } => "no-endpoints",
            Self::Connect { .. } => "connect-failure",
            Self::Upstream { .. } => "upstream-failure",
            Self::NoLocalService => "no-local-service",
            Self::Loop { .. } => "loop-detected",
            Self::UriTooLong { .. } => "uri-too-long",
            Self::AmbiguousRequest { .. } => "ambiguous-request",
            Self::ForeignAuthority { .. } => "foreign-authority",
            Self::Denied { .. } => "denied",
        }
    }
}

impl ProxyError {
    /// The policy key of the limit that refused the request, if a limit did.
    pub fn limit(&self) -> Option<&str> {
        match self {
            Self::RateLimited(e) => Some(&e.limit),
            Self::ConcurrencyCapped(e) => Some(&e.limit),
            Self::EndpointsSaturated { .. } => Some("outbound.endpoint_max_concurrency"),
            Self::Timeout { limit, .. } => Some(limit),
            Self::BudgetExhausted { last } => last.limit(),
            Self::UriTooLong { .. } => Some("limits.max_uri_length"),
            Self::Denied { limit, .. } => Some(limit),
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

/// Build the response for a failure: status, `weft-reason`, and a one-line text body
/// naming the cause (never secrets: errors carry names and addresses only).
pub fn error_response(err: &ProxyError) -> Response<ProxyBody> {
    let mut text = chain(err);
    text.push('\n');
    let mut rsp = Response::new(body::full(text));
    *rsp.status_mut() = err.status();
    let headers = rsp.headers_mut();
    headers.insert(WEFT_REASON, HeaderValue::from_static(err.reason()));
    if let Some(limit) = err.limit().and_then(|l| HeaderValue::from_str(l).ok()) {
        headers.insert(WEFT_LIMIT, limit);
    }
    // The client's framing cannot be trusted: whatever follows this request on
    // the connection is not read as another request.
    if matches!(err, ProxyError::AmbiguousRequest { .. }) {
        headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    if let Some(wait) = err.retry_after() {
        headers.insert(header::RETRY_AFTER, retry_after_value(wait));
    }
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    rsp
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn responses_carry_status_and_reason() {
        let rsp = error_response(&ProxyError::NoEndpoints {
            service: "billing".into(),
        });
        assert_eq!(rsp.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(rsp.headers()[WEFT_REASON], "no-endpoints");
        let rsp = error_response(&ProxyError::UnknownService {
            name: "nope".into(),
        });
        assert_eq!(rsp.status(), StatusCode::BAD_GATEWAY);
        assert_eq!(rsp.headers()[WEFT_REASON], "unknown-service");
        let rsp = error_response(&ProxyError::Denied {
            caller: "spiffe://weft.local/service/web".into(),
            service: "billing".into(),
            limit: "routes.admin.allow".into(),
        });
        assert_eq!(rsp.status(), StatusCode::FORBIDDEN);
        assert_eq!(rsp.headers()[WEFT_REASON], "denied");
        assert_eq!(rsp.headers()[WEFT_LIMIT], "routes.admin.allow");
        assert!(!rsp.headers().contains_key(header::RETRY_AFTER));
    }
}
