//! The one place a refusal becomes a response.
//!
//! Every layer below refuses with a typed [`ProxyError`]; this layer turns it
//! into the response the client gets: the status, `weft-reason`, `weft-limit`
//! and `retry-after`, and a one-line text body naming the cause (errors carry
//! names and addresses only, never secrets). A gRPC caller (a request whose
//! `content-type` is `application/grpc…`) gets what gRPC clients expect
//! instead: HTTP 200 with `grpc-status` and `grpc-message` and no body (a
//! "trailers-only" response), with the same Weft headers beside them. The
//! response carries a [`Refusal`] in its extensions, which the observation
//! counts. Refusals are logged here too.
//!
//! Above this layer the stack never fails (`Error = Infallible`), so hyper
//! always has a response to send.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use http::uri::PathAndQuery;
use http::{HeaderValue, Method, Request, Response, header};
use http_body_util::{Either, Full};
use pin_project_lite::pin_project;
use tower::{Layer, Service};

use weft_core::error::{ProxyError, WEFT_LIMIT, WEFT_REASON, chain, retry_after_value};

pub use weft_core::error::Refusal;

/// Which listener's requests (for the log line).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Outbound,
    Inbound,
}

/// The response body: the inner service's, or a refusal's text.
pub type RespondBody<B> = Either<B, Full<Bytes>>;

// ===== layer =====

/// Answers every error of the inner service as a response.
#[derive(Debug, Clone, Copy)]
pub struct RespondLayer {
    side: Side,
    client: SocketAddr,
}

impl RespondLayer {
    /// For the requests of one client connection (`client` is logged).
    pub fn new(side: Side, client: SocketAddr) -> Self {
        Self { side, client }
    }
}

impl<S> Layer<S> for RespondLayer {
    type Service = Respond<S>;

    fn layer(&self, inner: S) -> Respond<S> {
        Respond {
            inner,
            side: self.side,
            client: self.client,
        }
    }
}

// ===== service =====

#[derive(Debug, Clone)]
pub struct Respond<S> {
    inner: S,
    side: Side,
    client: SocketAddr,
}

impl<S, B, RB> Service<Request<B>> for Respond<S>
where
    S: Service<Request<B>, Response = Response<RB>, Error = ProxyError>,
{
    type Response = Response<RespondBody<RB>>;
    type Error = Infallible;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        // The layers below are always ready; an error here would have no
        // request to answer, so it is answered with the first call instead.
        let _ = ready!(self.inner.poll_ready(cx));
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let grpc = is_grpc(&req);
        let request = Logged {
            side: self.side,
            client: self.client,
            method: req.method().clone(),
            path: req.uri().path_and_query().cloned(),
        };
        ResponseFuture {
            inner: self.inner.call(req),
            grpc,
            request: Some(request),
        }
    }
}

/// What the refusal log line says about the request (no allocation: the
/// path's bytes are shared with the request's).
#[derive(Debug)]
struct Logged {
    side: Side,
    client: SocketAddr,
    method: Method,
    path: Option<PathAndQuery>,
}

/// The longest path a refusal log line repeats.
const LOGGED_PATH_MAX: usize = 256;

impl Logged {
    fn log(&self, error: &ProxyError) {
        let path = truncated(
            self.path.as_ref().map_or("/", PathAndQuery::path),
            LOGGED_PATH_MAX,
        );
        // The targets of the listeners' own modules, which operators filter on.
        match (self.side, error) {
            (Side::Inbound, ProxyError::Denied { .. }) => tracing::debug!(
                target: "weft_proxy::inbound",
                reason = %error.reason(),
                client.addr = %self.client,
                http.method = %self.method,
                http.path = %path,
                limit = error.limit(),
                error = %error,
                "inbound request denied"
            ),
            (Side::Inbound, _) => tracing::info!(
                target: "weft_proxy::inbound",
                reason = %error.reason(),
                client.addr = %self.client,
                http.method = %self.method,
                http.path = %path,
                limit = error.limit(),
                error = %chain(error),
                "inbound request refused"
            ),
            // Injected on purpose, maybe for every request: counted, not logged.
            (Side::Outbound, ProxyError::InjectedFault { .. }) => tracing::debug!(
                target: "weft_proxy::outbound",
                reason = %error.reason(),
                client.addr = %self.client,
                http.method = %self.method,
                http.path = %path,
                limit = error.limit(),
                "outbound request answered with an injected fault"
            ),
            (Side::Outbound, _) => tracing::info!(
                target: "weft_proxy::outbound",
                reason = %error.reason(),
                client.addr = %self.client,
                http.method = %self.method,
                http.path = %path,
                limit = error.limit(),
                error = %chain(error),
                "outbound request refused"
            ),
        }
    }
}

/// `text` cut to at most `max` bytes, on a character boundary.
fn truncated(text: &str, max: usize) -> &str {
    let end = (0..=max.min(text.len()))
        .rev()
        .find(|i| text.is_char_boundary(*i))
        .unwrap_or(0);
    &text[..end]
}

/// Whether the caller speaks gRPC: HTTP/2 (gRPC's transport: HTTP/1.1
/// requests are not looked at) with `content-type: application/grpc…`.
pub fn is_grpc<B>(req: &Request<B>) -> bool {
    req.version() == http::Version::HTTP_2
        && req
            .headers()
            .get(header::CONTENT_TYPE)
            .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"))
}

// ===== future =====

pin_project! {
    pub struct ResponseFuture<F> {
        #[pin]
        inner: F,
        grpc: bool,
        request: Option<Logged>,
    }
}

impl<F, RB> Future for ResponseFuture<F>
where
    F: Future<Output = Result<Response<RB>, ProxyError>>,
{
    type Output = Result<Response<RespondBody<RB>>, Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        Poll::Ready(Ok(match ready!(this.inner.poll(cx)) {
            Ok(rsp) => rsp.map(Either::Left),
            Err(error) => {
                if let Some(request) = this.request.take() {
                    request.log(&error);
                }
                error_response(&error, *this.grpc).map(Either::Right)
            }
        }))
    }
}

/// The response for `error`: plain HTTP, or gRPC for a gRPC caller.
pub fn error_response(error: &ProxyError, grpc: bool) -> Response<Full<Bytes>> {
    let mut rsp = if grpc {
        let mut rsp = Response::new(Full::new(Bytes::new()));
        let headers = rsp.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/grpc"),
        );
        headers.insert(
            "grpc-status",
            HeaderValue::from(u16::from(error.grpc_code())),
        );
        if let Ok(message) = HeaderValue::from_str(&grpc_message(&chain(error))) {
            headers.insert("grpc-message", message);
        }
        rsp
    } else {
        let mut text = chain(error);
        text.push('\n');
        let mut rsp = Response::new(Full::new(Bytes::from(text)));
        *rsp.status_mut() = error.status();
        rsp.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        rsp
    };
    let headers = rsp.headers_mut();
    headers.insert(
        &WEFT_REASON,
        HeaderValue::from_static(error.reason().as_str()),
    );
    if let Some(limit) = error.limit().and_then(|l| HeaderValue::from_str(l).ok()) {
        headers.insert(&WEFT_LIMIT, limit);
    }
    // The client's framing cannot be trusted: whatever follows this request on
    // the connection is not read as another request.
    if matches!(error, ProxyError::AmbiguousRequest { .. }) {
        headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    if let Some(wait) = error.retry_after() {
        headers.insert(header::RETRY_AFTER, retry_after_value(wait));
    }
    rsp.extensions_mut().insert(Refusal::of(error));
    rsp
}

/// `text` percent-encoded as gRPC's `grpc-message` wants: printable ASCII
/// other than `%` as is, every other byte as `%XX`.
fn grpc_message(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for byte in text.bytes() {
        if (0x20..=0x7e).contains(&byte) && byte != b'%' {
            out.push(char::from(byte));
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use std::time::Duration;

    use http_body_util::BodyExt;
    use tower_test::mock;

    use std::sync::Arc;

    use http::StatusCode;

    use super::*;
    use weft_core::error::Reason;
    use weft_core::limits::RateLimited;

    fn rate_limited() -> ProxyError {
        ProxyError::RateLimited(RateLimited {
            limit: Arc::from("inbound.rate_limit"),
            retry_after: Duration::from_millis(1500),
        })
    }

    #[test]
    fn http_refusals_carry_status_reason_limit_and_retry_after() {
        let rsp = error_response(
            &ProxyError::NoEndpoints {
                service: "billing".into(),
            },
            false,
        );
        assert_eq!(rsp.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(rsp.headers()[&WEFT_REASON], "no-endpoints");
        assert!(!rsp.headers().contains_key(&WEFT_LIMIT));
        let rsp = error_response(&rate_limited(), false);
        assert_eq!(rsp.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(rsp.headers()[&WEFT_LIMIT], "inbound.rate_limit");
        assert_eq!(rsp.headers()[header::RETRY_AFTER], "2");
        let refusal = rsp.extensions().get::<Refusal>().unwrap();
        assert_eq!(refusal.reason, Reason::RateLimit);
        assert_eq!(refusal.limit.as_deref(), Some("inbound.rate_limit"));
    }

    #[test]
    fn grpc_refusals_are_grpc_statuses() {
        let cases = [
            (rate_limited(), "8"),
            (
                ProxyError::NoEndpoints {
                    service: "billing".into(),
                },
                "14",
            ),
            (
                ProxyError::Timeout {
                    limit: Arc::from("outbound.timeout"),
                    after: Duration::from_secs(1),
                },
                "4",
            ),
            (
                ProxyError::Denied {
                    caller: "web".into(),
                    service: "billing".into(),
                    limit: Arc::from("inbound.allow"),
                },
                "7",
            ),
        ];
        for (error, code) in cases {
            let rsp = error_response(&error, true);
            assert_eq!(rsp.status(), StatusCode::OK);
            assert_eq!(rsp.headers()[header::CONTENT_TYPE], "application/grpc");
            assert_eq!(rsp.headers()["grpc-status"], code, "{error}");
            assert_eq!(rsp.headers()[&WEFT_REASON], error.reason().as_str());
            assert!(rsp.headers().contains_key("grpc-message"));
        }
    }

    #[test]
    fn grpc_messages_are_percent_encoded() {
        assert_eq!(grpc_message("a b%c\né"), "a b%25c%0A%C3%A9");
    }

    #[tokio::test]
    async fn errors_become_responses_and_responses_pass() {
        let (service, mut handle) = mock::pair::<Request<Full<Bytes>>, Response<Full<Bytes>>>();
        let mut respond = RespondLayer::new(Side::Outbound, "127.0.0.1:1".parse().unwrap()).layer(
            tower::ServiceExt::map_err(service, |_| ProxyError::NoAuthority),
        );
        let grpc = Request::builder()
            .version(http::Version::HTTP_2)
            .header(header::CONTENT_TYPE, "application/grpc+proto")
            .body(Full::new(Bytes::new()))
            .unwrap();
        let rsp = tokio::spawn(tower::ServiceExt::oneshot(respond.clone(), grpc));
        let (_, send) = handle.next_request().await.unwrap();
        send.send_error(std::io::Error::other("boom"));
        let rsp = rsp.await.unwrap().unwrap();
        assert_eq!(rsp.status(), StatusCode::OK);
        assert_eq!(rsp.headers()["grpc-status"], "3");

        let rsp = tokio::spawn(tower::ServiceExt::oneshot(
            respond.clone(),
            Request::new(Full::new(Bytes::new())),
        ));
        let (_, send) = handle.next_request().await.unwrap();
        send.send_response(Response::new(Full::new(Bytes::from_static(b"ok"))));
        let rsp = rsp.await.unwrap().unwrap();
        assert_eq!(rsp.status(), StatusCode::OK);
        assert!(rsp.extensions().get::<Refusal>().is_none());
        assert_eq!(rsp.into_body().collect().await.unwrap().to_bytes(), "ok");
        let _ = &mut respond;
    }
}
