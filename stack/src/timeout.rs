//! Timeout: fail a request whose response headers take longer than a limit.
//!
//! The limit is fixed for the layer (`inbound.timeout`) or read from the
//! matched [`RoutePlan`]: the whole request (`timeout`, around every try and
//! backoff) or one try (`per_try_timeout`, around one endpoint's answer).
//! Only the wait for the response headers is bounded: a response that
//! streams is never cut by it. When the limit passes, the inner future is
//! dropped (freeing whatever it held, such as a concurrency permit or an
//! endpoint's in-flight slot) and the request fails with
//! [`ProxyError::Timeout`] naming the limit's policy key.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use http::Request;
use pin_project_lite::pin_project;
use tokio::time::Sleep;
use tower::{Layer, Service};

use weft_core::error::ProxyError;
use weft_core::policy::{NamedTimeout, RoutePlan};

/// Which limit a layer enforces.
#[derive(Debug, Clone)]
pub enum Which {
    /// The same limit for every request (none: no limit).
    Fixed(Option<NamedTimeout>),
    /// The matched route's whole-request `timeout`.
    Request,
    /// The matched route's `per_try_timeout`.
    PerTry,
}

impl Which {
    fn limit<B>(&self, req: &Request<B>) -> Option<NamedTimeout> {
        let plan = || req.extensions().get::<Arc<RoutePlan>>();
        match self {
            Self::Fixed(limit) => limit.clone(),
            Self::Request => plan()?.timeout.clone(),
            Self::PerTry => plan()?.per_try_timeout.clone(),
        }
    }
}

// ===== layer =====

#[derive(Debug, Clone)]
pub struct TimeoutLayer {
    which: Which,
}

impl TimeoutLayer {
    pub fn new(which: Which) -> Self {
        Self { which }
    }
}

impl<S> Layer<S> for TimeoutLayer {
    type Service = Timeout<S>;

    fn layer(&self, inner: S) -> Timeout<S> {
        Timeout {
            inner,
            which: self.which.clone(),
        }
    }
}

// ===== service =====

#[derive(Debug, Clone)]
pub struct Timeout<S> {
    inner: S,
    which: Which,
}

impl<S, B> Service<Request<B>> for Timeout<S>
where
    S: Service<Request<B>, Error = ProxyError>,
{
    type Response = S::Response;
    type Error = ProxyError;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), ProxyError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let limit = self.which.limit(&req);
        ResponseFuture {
            sleep: limit.as_ref().map(|l| tokio::time::sleep(l.after)),
            limit,
            inner: self.inner.call(req),
        }
    }
}

// ===== future =====

pin_project! {
    pub struct ResponseFuture<F> {
        #[pin]
        inner: F,
        #[pin]
        sleep: Option<Sleep>,
        limit: Option<NamedTimeout>,
    }
}

impl<F, R> Future for ResponseFuture<F>
where
    F: Future<Output = Result<R, ProxyError>>,
{
    type Output = Result<R, ProxyError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        if let Poll::Ready(result) = this.inner.poll(cx) {
            return Poll::Ready(result);
        }
        if let Some(sleep) = this.sleep.as_pin_mut() {
            ready!(sleep.poll(cx));
            let (limit, after) = match this.limit {
                Some(limit) => (Arc::clone(&limit.limit), limit.after),
                None => (Arc::from(""), Duration::ZERO),
            };
            return Poll::Ready(Err(ProxyError::Timeout { limit, after }));
        }
        Poll::Pending
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use tower::ServiceExt;

    use super::*;
    use crate::test_util::{arrived, pair, refusal};

    fn limit(ms: u64) -> Option<NamedTimeout> {
        Some(NamedTimeout {
            after: Duration::from_millis(ms),
            limit: Arc::from("inbound.timeout"),
        })
    }

    #[tokio::test(start_paused = true)]
    async fn fires_at_the_limit_and_frees_the_permit() {
        use crate::concurrency::{self, ConcurrencyLayer};
        let cap = weft_core::limits::ConcurrencyLimit::new(
            "inbound.max_concurrency",
            std::num::NonZeroU32::MIN,
            None,
        );
        let (service, mut handle) = pair::<Request<()>, http::Response<()>>();
        let mut layer = ConcurrencyLayer::new(concurrency::Which::Service(Arc::clone(&cap)))
            .layer(TimeoutLayer::new(Which::Fixed(limit(100))).layer(service));
        handle.allow(2);
        let call = tokio::spawn(layer.clone().oneshot(Request::new(())));
        let (_, _send) = handle.next_request().await.unwrap();
        assert_eq!(cap.in_flight(), 1);
        tokio::time::advance(Duration::from_millis(101)).await;
        let error = refusal(call.await.unwrap());
        assert!(matches!(error, ProxyError::Timeout { .. }), "{error}");
        assert_eq!(error.limit(), Some("inbound.timeout"));
        assert_eq!(cap.in_flight(), 0, "the timeout freed the permit");

        // An answer in time goes through.
        let call = layer.ready().await.unwrap().call(Request::new(()));
        let (_, send) = arrived(&mut handle).await.unwrap();
        tokio::time::advance(Duration::from_millis(99)).await;
        send.send_response(http::Response::new(()));
        drop(call.await.unwrap());
        assert_eq!(cap.in_flight(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn the_route_plan_sets_the_limits() {
        let policy = weft_config::parse_policy(
            "service = \"billing\"\n[outbound]\ntimeout = \"1s\"\nper_try_timeout = \"50ms\"\n",
            std::path::Path::new("billing.toml"),
        )
        .unwrap();
        let outbound = weft_core::policy::OutboundPolicy::new(
            Some(&policy),
            Arc::new(weft_core::stats::Stats::default()),
        );
        let mut req = Request::new(());
        req.extensions_mut().insert(Arc::clone(outbound.plan(None)));
        assert_eq!(
            Which::Request.limit(&req).unwrap().after,
            Duration::from_secs(1)
        );
        let per_try = Which::PerTry.limit(&req).unwrap();
        assert_eq!(per_try.after, Duration::from_millis(50));
        assert_eq!(&*per_try.limit, "outbound.per_try_timeout");
        assert!(
            Which::Request.limit(&Request::new(())).is_none(),
            "no plan, no limit"
        );
    }
}
