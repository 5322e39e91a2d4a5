//! The data plane as a stack of tower layers.
//!
//! Each stage of a request is one middleware, in its own file, with the
//! same shape as tower's own: a `Layer` that makes the `Service`, the
//! `Service`, and its response future, generic over the request and
//! response body types. A refusal is a typed [`ProxyError`](weft_core::error::ProxyError);
//! [`respond`] is the one place errors become responses. Per-request state
//! travels in the request's extensions: the matched route's settings
//! ([`route`]) and the [`RequestContext`](context::RequestContext) the
//! layers report through.
//!
//! # Layout
//!
//! | module | stage |
//! |---|---|
//! | [`observe`] | the request's observation, through an [`Observer`](observe::Observer) the sidecar implements (metrics, span, access log): started on arrival, finished when the body ends |
//! | [`respond`] | errors become responses (HTTP, or gRPC for a gRPC caller) |
//! | [`screen`] | URI length, HTTP/1 framing, inbound authority |
//! | [`route`] | the matched route's settings into the extensions |
//! | [`authorize`] | who may call the local service |
//! | [`fault`] | a route's injected delays and aborts, where the policy permits them |
//! | [`rate_limit`] | service share, per route, per caller, per caller sidecar |
//! | [`concurrency`] | caps with bounded queues; permit held until the body ends |
//! | [`adaptive_concurrency`] | a per-instance limit that follows the app's latency (`inbound.adaptive_concurrency`) |
//! | [`forwarded`] | forwarding headers, caller identity, hop-by-hop removal |
//! | [`timeout`] | whole-request and per-try timeouts |
//! | [`cold_start`] | calls held while the service has no endpoint, released when its first instance registers; the activator |
//! | [`retry`] | budgeted retries to other endpoints, with replayable bodies |
//! | [`hedge`] | hedged tries to other endpoints after a delay, first answer wins, spending the retry budget |
//! | [`balance`] | the endpoint of each try; outlier ejection |
//! | [`endpoint`] | one try to one endpoint over its pools |
//! | [`context`] | what one request's layers tell each other and the observation (`weft-core`'s) |
//!
//! The stacks themselves are built by the sidecar (`weft-proxy`'s `outbound`
//! and `inbound` modules), each as one builder, top to bottom; `weft-client`
//! builds the outbound one in-process.

pub mod adaptive_concurrency;
pub mod authorize;
pub mod balance;
pub mod cold_start;
pub mod concurrency;
/// The request context is `weft-core`'s (telemetry reads it too).
pub use weft_core::context;
pub mod endpoint;
pub mod fault;
pub mod forwarded;
pub mod hedge;
pub mod observe;
pub mod rate_limit;
pub mod respond;
pub mod retry;
pub mod route;
pub mod screen;
#[cfg(test)]
pub(crate) mod test_util;
pub mod timeout;

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use http::Response;
use pin_project_lite::pin_project;
use tower::Layer;

use weft_core::body::{self, ProxyBody};

/// Makes a service for a target (an endpoint's client from the endpoint).
pub trait NewService<T> {
    type Service;

    fn new_service(&self, target: T) -> Self::Service;
}

/// A [`NewService`] whose services are wrapped in a layer.
#[derive(Debug, Clone)]
pub struct NewLayered<L, N> {
    layer: L,
    inner: N,
}

impl<L, N> NewLayered<L, N> {
    pub fn new(layer: L, inner: N) -> Self {
        Self { layer, inner }
    }
}

impl<T, L, N> NewService<T> for NewLayered<L, N>
where
    N: NewService<T>,
    L: Layer<N::Service>,
{
    type Service = L::Service;

    fn new_service(&self, target: T) -> L::Service {
        self.layer.layer(self.inner.new_service(target))
    }
}

pin_project! {
    /// A response future whose body is boxed into the listeners' one body type.
    pub struct Boxed<F> {
        #[pin]
        inner: F,
    }
}

impl<F> Boxed<F> {
    pub fn new(inner: F) -> Self {
        Self { inner }
    }
}

impl<F, B> Future for Boxed<F>
where
    F: Future<Output = Result<Response<B>, Infallible>>,
    B: http_body::Body<Data = bytes::Bytes> + Send + 'static,
    B::Error: Into<body::BoxError>,
{
    type Output = Result<Response<ProxyBody>, Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let Ok(rsp) = ready!(self.project().inner.poll(cx));
        Poll::Ready(Ok(rsp.map(body::boxed)))
    }
}
