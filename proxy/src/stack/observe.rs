//! Observe: start each request's observation when it arrives, finish it when
//! its response body ends.
//!
//! The topmost layer of both stacks. It puts the request's
//! [`RequestContext`](super::context::RequestContext) in its extensions
//! (the layers below name the service and route there, and report retries,
//! endpoints and ejections), and wraps the response body so the request is
//! recorded once, when its body ends: metrics, its span, the access log
//! line (see [`crate::telemetry::observe`]). Refusals are counted here too,
//! from the [`Refusal`](super::respond::Refusal) the response carries.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use http::{Request, Response};
use http_body::Body;
use pin_project_lite::pin_project;
use tower::{Layer, Service};

use crate::telemetry::observe::Observed;
use crate::telemetry::{Direction, Observation, Reporters};

// ===== layer =====

#[derive(Debug, Clone)]
pub struct ObserveLayer {
    reporters: Arc<Reporters>,
    direction: Direction,
}

impl ObserveLayer {
    pub fn new(reporters: Arc<Reporters>, direction: Direction) -> Self {
        Self {
            reporters,
            direction,
        }
    }
}

impl<S> Layer<S> for ObserveLayer {
    type Service = Observe<S>;

    fn layer(&self, inner: S) -> Observe<S> {
        Observe {
            inner,
            layer: self.clone(),
        }
    }
}

// ===== service =====

#[derive(Debug, Clone)]
pub struct Observe<S> {
    inner: S,
    layer: ObserveLayer,
}

impl<S, B, RB> Service<Request<B>> for Observe<S>
where
    S: Service<Request<B>, Response = Response<RB>, Error = Infallible>,
    RB: Body,
{
    type Response = Response<Observed<RB>>;
    type Error = Infallible;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<B>) -> Self::Future {
        let observation = Observation::start(&self.layer.reporters, self.layer.direction, &mut req);
        ResponseFuture {
            inner: self.inner.call(req),
            observation: Some(observation),
        }
    }
}

// ===== future =====

pin_project! {
    pub struct ResponseFuture<F> {
        #[pin]
        inner: F,
        observation: Option<Observation>,
    }
}

impl<F, RB> Future for ResponseFuture<F>
where
    F: Future<Output = Result<Response<RB>, Infallible>>,
    RB: Body,
{
    type Output = Result<Response<Observed<RB>>, Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let Ok(rsp) = ready!(this.inner.poll(cx));
        match this.observation.take() {
            Some(observation) => Poll::Ready(Ok(observation.respond(rsp))),
            // Polled again after completing: nobody does.
            None => Poll::Pending,
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use bytes::Bytes;
    use http_body_util::{BodyExt, Full};
    use tower::ServiceExt;

    use super::*;
    use crate::stack::context::RequestContext;
    use crate::telemetry::Metrics;
    use crate::telemetry::metrics::{GaugeSource, Gauges};

    struct NoGauges;

    impl GaugeSource for NoGauges {
        fn refresh(&self, _: &mut Gauges<'_>) {}
    }

    #[tokio::test]
    async fn the_request_is_recorded_when_its_body_ends_under_the_labels_below() {
        let metrics = Arc::new(Metrics::new(false));
        let reporters = Arc::new(Reporters {
            metrics: Arc::clone(&metrics),
            traces: None,
            access_log: false,
        });
        let service_label: Arc<str> = Arc::from("billing");
        let inner = tower::service_fn(move |req: Request<()>| {
            let context = RequestContext::of(&req).cloned().unwrap();
            context.set_service(&service_label, None);
            async move { Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"ok")))) }
        });
        let observe = ObserveLayer::new(reporters, Direction::Outbound).layer(inner);
        let rsp = observe.oneshot(Request::new(())).await.unwrap();
        let count = || {
            metrics.render(&NoGauges).unwrap().lines().any(|l| {
                l.starts_with("weft_requests_total{")
                    && l.contains("service=\"billing\"")
                    && l.ends_with(" 1")
            })
        };
        assert!(!count(), "not before the body ends");
        rsp.into_body().collect().await.unwrap();
        assert!(count(), "{}", metrics.render(&NoGauges).unwrap());
    }
}
