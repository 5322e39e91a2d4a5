//! Classifying one attempt's outcome, and the retry rules applied to it.
//!
//! An attempt ends in an [`Outcome`]: a response head (with its `grpc-status` when
//! the response is trailers-only), or one of the ways a request fails before any
//! response: the connection could not be made, the connection or stream was reset,
//! the HTTP/2 peer refused the stream, or the per-try timeout fired.
//! [`classify_error`] maps a failed request's error onto those (the endpoint
//! connections' own tests, in `weft-transport`, check it on real sockets).
//!
//! [`retryable`] decides whether the route's policy allows another try. Safety comes
//! first: a connect failure and a refused stream never reached the application, so
//! they may be retried whatever the method; anything else may have been processed and
//! is retried only for idempotent methods, unless the policy opts in with
//! `non_idempotent`. A refused stream not listed as `refused-stream` still counts as
//! a `reset` (it is an RST_STREAM) under the idempotency rule. A per-try timeout is
//! what a client would see as a 504, so `reset`, `5xx` or `504` allow retrying it.
//!
//! [`is_failure`] is the separate question outlier detection asks: did this endpoint
//! fail? A 4xx is the caller's problem and never counts.
//!
//! The retry path and outlier detection use these helpers and nothing else, so they
//! always agree on what an outcome is.

use http::header::HeaderName;
use http::{HeaderMap, Method, StatusCode};
use weft_config::{Retry, RetryOn};

/// `grpc-status`, the gRPC status code of a response.
static GRPC_STATUS: HeaderName = HeaderName::from_static("grpc-status");

/// What happened to one attempt, as far as retrying is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// A response head arrived. `grpc_status` is read from the head, so it is only
    /// set for trailers-only gRPC responses (the usual form of a gRPC error).
    Response {
        status: StatusCode,
        grpc_status: Option<u8>,
    },
    /// The connection could not be made; nothing was sent.
    ConnectFailure,
    /// The connection or stream failed after the request may have been sent.
    Reset,
    /// The HTTP/2 peer answered REFUSED_STREAM: it did not process the request.
    RefusedStream,
    /// The per-try timeout fired before a response head arrived.
    Timeout,
}

impl Outcome {
    /// The outcome of a response head: its status and, for a trailers-only gRPC
    /// response, its `grpc-status`.
    pub fn of_response<B>(rsp: &http::Response<B>) -> Self {
        Self::Response {
            status: rsp.status(),
            grpc_status: grpc_status(rsp.headers()),
        }
    }
}

/// Read the `grpc-status` header of a (trailers-only) gRPC response head. `None`
/// when it is absent or not a decimal code from 0 to 255.
pub fn grpc_status(headers: &HeaderMap) -> Option<u8> {
    let value = headers.get(&GRPC_STATUS)?.as_bytes();
    // `u8::from_str` would also accept a leading `+`; the grammar is 1*DIGIT.
    if value.is_empty() || value.len() > 3 || !value.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let code = value
        .iter()
        .fold(0u16, |acc, digit| acc * 10 + u16::from(digit - b'0'));
    u8::try_from(code).ok()
}

/// Classify a request that failed after its connection was made: an HTTP/2
/// REFUSED_STREAM anywhere in the error's source chain is a
/// [`Outcome::RefusedStream`]; anything else is a [`Outcome::Reset`]. (A
/// connect failure is its own error, [`ProxyError::Connect`](crate::error::ProxyError::Connect).)
pub fn classify_error(err: &(dyn std::error::Error + 'static)) -> Outcome {
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(err) = cause {
        if let Some(h2) = err.downcast_ref::<h2::Error>()
            && h2.reason() == Some(h2::Reason::REFUSED_STREAM)
        {
            return Outcome::RefusedStream;
        }
        cause = err.source();
    }
    Outcome::Reset
}

/// Whether RFC 9110 calls `method` idempotent: GET, HEAD, OPTIONS, TRACE, PUT,
/// DELETE.
pub fn is_idempotent(method: &Method) -> bool {
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE
    )
}

/// Whether the route's retry policy allows retrying this outcome for this method.
/// The budget, the attempt count so far and the replay body are the caller's
/// business; this only says whether the outcome is of a retryable kind.
pub fn retryable(retry: &Retry, method: &Method, outcome: Outcome) -> bool {
    if retry.attempts == 0 {
        return false;
    }
    let on = |condition: RetryOn| retry.on.contains(&condition);
    match outcome {
        // Nothing reached the application: safe for any method.
        Outcome::ConnectFailure => return on(RetryOn::ConnectFailure),
        Outcome::RefusedStream if on(RetryOn::RefusedStream) => return true,
        _ => {}
    }
    if !(retry.non_idempotent || is_idempotent(method)) {
        return false;
    }
    match outcome {
        Outcome::ConnectFailure => false,
        Outcome::Reset | Outcome::RefusedStream => on(RetryOn::Reset),
        Outcome::Timeout => on(RetryOn::Reset) || on(RetryOn::Any5xx) || on(RetryOn::Status(504)),
        Outcome::Response {
            status,
            grpc_status,
        } => retry.on.iter().any(|condition| match *condition {
            RetryOn::Any5xx => status.is_server_error(),
            RetryOn::Status(code) => status.as_u16() == code,
            RetryOn::Grpc(code) => grpc_status == Some(code),
            RetryOn::ConnectFailure | RetryOn::Reset | RetryOn::RefusedStream => false,
        }),
    }
}

/// The outcome of one try, as retries and outlier detection see it; None
/// for a failure that says nothing of the endpoint (e.g. the request's own
/// body broke, or the proxy refused it).
pub fn outcome_of<B>(
    result: &Result<http::Response<B>, crate::error::ProxyError>,
) -> Option<Outcome> {
    use crate::error::ProxyError;
    match result {
        Ok(rsp) => Some(Outcome::of_response(rsp)),
        Err(ProxyError::Connect { .. }) => Some(Outcome::ConnectFailure),
        Err(ProxyError::Upstream { source, .. }) => Some(classify_error(source.as_ref())),
        Err(ProxyError::Timeout { .. }) => Some(Outcome::Timeout),
        Err(_) => None,
    }
}

/// Whether an outcome counts as a failure of the endpoint for outlier detection: a
/// 5xx response, a connect failure, a reset, a refused stream or a timeout.
pub fn is_failure(outcome: Outcome) -> bool {
    match outcome {
        Outcome::Response { status, .. } => status.is_server_error(),
        Outcome::ConnectFailure | Outcome::Reset | Outcome::RefusedStream | Outcome::Timeout => {
            true
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn policy(on: &[&str]) -> Retry {
        Retry {
            on: on.iter().map(|c| c.parse().unwrap()).collect(),
            ..Retry::default()
        }
    }

    fn response(status: u16) -> Outcome {
        Outcome::Response {
            status: StatusCode::from_u16(status).unwrap(),
            grpc_status: None,
        }
    }

    fn grpc(code: u8) -> Outcome {
        Outcome::Response {
            status: StatusCode::OK,
            grpc_status: Some(code),
        }
    }

    #[test]
    fn grpc_status_reads_decimal_codes_only() {
        let read = |value: &str| {
            let mut headers = HeaderMap::new();
            headers.insert("grpc-status", value.parse().unwrap());
            grpc_status(&headers)
        };
        assert_eq!(read("0"), Some(0));
        assert_eq!(read("14"), Some(14));
        assert_eq!(read("255"), Some(255));
        for bad in ["", "+1", "-1", "256", "1000", "14 ", "x"] {
            assert_eq!(read(bad), None, "{bad:?}");
        }
        assert_eq!(grpc_status(&HeaderMap::new()), None);
    }

    #[test]
    fn outcome_of_a_response_reads_grpc_status() {
        let rsp = http::Response::builder()
            .status(200)
            .header("grpc-status", "14")
            .body(())
            .unwrap();
        assert_eq!(Outcome::of_response(&rsp), grpc(14));
    }

    #[test]
    fn idempotent_methods() {
        for method in ["GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"] {
            assert!(is_idempotent(&method.parse().unwrap()), "{method}");
        }
        for method in ["POST", "PATCH", "CONNECT", "PURGE"] {
            assert!(!is_idempotent(&method.parse().unwrap()), "{method}");
        }
    }

    #[test]
    fn zero_attempts_never_retries() {
        let retry = Retry {
            attempts: 0,
            ..policy(&["connect-failure", "refused-stream", "reset", "5xx"])
        };
        for outcome in [
            Outcome::ConnectFailure,
            Outcome::RefusedStream,
            Outcome::Reset,
            Outcome::Timeout,
            response(503),
        ] {
            assert!(!retryable(&retry, &Method::GET, outcome), "{outcome:?}");
        }
    }

    #[test]
    fn connect_failure_is_retried_for_any_method_when_listed() {
        let listed = policy(&["connect-failure"]);
        assert!(retryable(&listed, &Method::GET, Outcome::ConnectFailure));
        assert!(retryable(&listed, &Method::POST, Outcome::ConnectFailure));
        let unlisted = policy(&["reset", "5xx"]);
        assert!(!retryable(&unlisted, &Method::GET, Outcome::ConnectFailure));
    }

    #[test]
    fn refused_stream_is_retried_for_any_method_when_listed() {
        let listed = policy(&["refused-stream"]);
        assert!(retryable(&listed, &Method::POST, Outcome::RefusedStream));
        assert!(retryable(&listed, &Method::PATCH, Outcome::RefusedStream));
        // Unlisted, it is a reset: idempotent methods only.
        let reset = policy(&["reset"]);
        assert!(retryable(&reset, &Method::GET, Outcome::RefusedStream));
        assert!(!retryable(&reset, &Method::POST, Outcome::RefusedStream));
        assert!(!retryable(
            &policy(&["5xx"]),
            &Method::GET,
            Outcome::RefusedStream
        ));
    }

    #[test]
    fn reset_needs_reset_and_an_idempotent_method() {
        let retry = policy(&["reset"]);
        assert!(retryable(&retry, &Method::PUT, Outcome::Reset));
        assert!(!retryable(&retry, &Method::POST, Outcome::Reset));
        assert!(!retryable(
            &policy(&["connect-failure", "5xx"]),
            &Method::GET,
            Outcome::Reset
        ));
        let opted_in = Retry {
            non_idempotent: true,
            ..retry
        };
        assert!(retryable(&opted_in, &Method::POST, Outcome::Reset));
    }

    #[test]
    fn timeout_needs_reset_5xx_or_504() {
        for on in [&["reset"][..], &["5xx"], &["504"]] {
            assert!(
                retryable(&policy(on), &Method::GET, Outcome::Timeout),
                "{on:?}"
            );
            assert!(
                !retryable(&policy(on), &Method::POST, Outcome::Timeout),
                "{on:?}"
            );
        }
        assert!(!retryable(
            &policy(&["503", "connect-failure", "refused-stream"]),
            &Method::GET,
            Outcome::Timeout
        ));
    }

    #[test]
    fn responses_need_a_listed_status() {
        let any = policy(&["5xx"]);
        assert!(retryable(&any, &Method::GET, response(500)));
        assert!(retryable(&any, &Method::GET, response(599)));
        assert!(!retryable(&any, &Method::GET, response(499)));
        assert!(!retryable(&any, &Method::GET, response(200)));

        let exact = policy(&["503", "429"]);
        assert!(retryable(&exact, &Method::GET, response(503)));
        assert!(retryable(&exact, &Method::GET, response(429)));
        assert!(!retryable(&exact, &Method::GET, response(502)));
    }

    #[test]
    fn grpc_responses_need_a_listed_code() {
        // gRPC calls are POSTs: a listed code alone does not retry them.
        let retry = policy(&["grpc-unavailable"]);
        assert!(!retryable(&retry, &Method::POST, grpc(14)));
        let opted_in = Retry {
            non_idempotent: true,
            ..retry.clone()
        };
        assert!(retryable(&opted_in, &Method::POST, grpc(14)));
        assert!(!retryable(&opted_in, &Method::POST, grpc(13)));
        assert!(!retryable(&opted_in, &Method::POST, response(200)));
        assert!(retryable(&retry, &Method::GET, grpc(14)));
    }

    #[test]
    fn post_is_not_retried_on_503_but_is_on_connect_failure() {
        let retry = Retry::default();
        assert!(!retryable(&retry, &Method::POST, response(503)));
        assert!(retryable(&retry, &Method::POST, Outcome::ConnectFailure));
        assert!(retryable(&retry, &Method::POST, Outcome::RefusedStream));
        assert!(!retryable(&retry, &Method::POST, Outcome::Reset));
        assert!(retryable(&retry, &Method::GET, response(503)));
        assert!(!retryable(&retry, &Method::GET, response(500)));
    }

    #[test]
    fn failures_for_outlier_detection() {
        assert!(is_failure(response(500)));
        assert!(is_failure(response(503)));
        assert!(!is_failure(response(404)));
        assert!(!is_failure(response(429)));
        assert!(!is_failure(response(200)));
        assert!(!is_failure(grpc(14)), "a gRPC error over 200 is not 5xx");
        for outcome in [
            Outcome::ConnectFailure,
            Outcome::Reset,
            Outcome::RefusedStream,
            Outcome::Timeout,
        ] {
            assert!(is_failure(outcome), "{outcome:?}");
        }
    }
}
