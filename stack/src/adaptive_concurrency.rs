//! Adaptive concurrency: at most the current adaptive limit of requests in
//! flight through the layer, a limit that follows the latency of the
//! requests that succeed (`inbound.adaptive_concurrency`, per instance).
//!
//! The limit is an [`AdaptiveConcurrency`] shared by every request through
//! it (see `weft-core`'s `limits::adaptive` for the algorithm). A request that
//! finds a slot under the limit goes on at once; one that finds the limit
//! reached is refused at once with [`ProxyError::ConcurrencyCapped`] naming
//! `inbound.adaptive_concurrency` (no queue: a queue in front of a limit that
//! reacts to queueing would hide what it measures). The time from admission
//! to the response headers feeds the limit when the response is not a 5xx;
//! errors, 5xx and requests dropped before their answer feed nothing. The
//! slot rides in the response body ([`Tracked`]) and is freed when the body
//! ends, or at once when the request fails. Outbound, the per-endpoint limit
//! lives in the balancer instead (`balance`), which skips an endpoint at its
//! limit.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use http::{Request, Response};
use pin_project_lite::pin_project;
use tower::{Layer, Service};

use weft_core::body::Tracked;
use weft_core::error::ProxyError;
use weft_core::limits::{AdaptiveConcurrency, AdaptivePermit, ConcurrencyCapped};

/// A response body holding its request's slot (none: no limit applied).
pub type AdaptiveBody<B> = Tracked<B, Option<AdaptivePermit>>;

// ===== layer =====

#[derive(Debug, Clone)]
pub struct AdaptiveLayer {
    limit: Option<Arc<AdaptiveConcurrency>>,
}

impl AdaptiveLayer {
    /// The policy's limit, if it sets one.
    pub fn new(limit: Option<&Arc<AdaptiveConcurrency>>) -> Self {
        Self {
            limit: limit.cloned(),
        }
    }
}

impl<S> Layer<S> for AdaptiveLayer {
    type Service = Adaptive<S>;

    fn layer(&self, inner: S) -> Adaptive<S> {
        Adaptive {
            inner,
            limit: self.limit.clone(),
        }
    }
}

// ===== service =====

#[derive(Debug, Clone)]
pub struct Adaptive<S> {
    inner: S,
    limit: Option<Arc<AdaptiveConcurrency>>,
}

impl<S, B, RB> Service<Request<B>> for Adaptive<S>
where
    S: Service<Request<B>, Response = Response<RB>, Error = ProxyError>,
{
    type Response = Response<AdaptiveBody<RB>>;
    type Error = ProxyError;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), ProxyError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let permit = match &self.limit {
            None => None,
            Some(limit) => match limit.try_acquire() {
                Some(permit) => Some(permit),
                None => {
                    return ResponseFuture {
                        state: State::Refused {
                            refusal: Some(limit.refusal()),
                        },
                    };
                }
            },
        };
        ResponseFuture {
            state: State::Called {
                future: self.inner.call(req),
                permit,
            },
        }
    }
}

// ===== future =====

pin_project! {
    pub struct ResponseFuture<F> {
        #[pin]
        state: State<F>,
    }
}

pin_project! {
    #[project = StateProj]
    enum State<F> {
        Called { #[pin] future: F, permit: Option<AdaptivePermit> },
        Refused { refusal: Option<ConcurrencyCapped> },
    }
}

impl<F, RB> Future for ResponseFuture<F>
where
    F: Future<Output = Result<Response<RB>, ProxyError>>,
{
    type Output = Result<Response<AdaptiveBody<RB>>, ProxyError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project().state.project() {
            StateProj::Called { future, permit } => {
                // An error drops the permit here, unsampled.
                let rsp = ready!(future.poll(cx))?;
                let permit = permit.take();
                if let Some(permit) = &permit
                    && !rsp.status().is_server_error()
                {
                    permit.observe_success();
                }
                Poll::Ready(Ok(rsp.map(|body| Tracked::new(body, permit))))
            }
            StateProj::Refused { refusal } => match refusal.take() {
                Some(refusal) => Poll::Ready(Err(refusal.into())),
                // Only after the future completed, which nobody polls.
                None => Poll::Pending,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use std::time::Duration;

    use tower::ServiceExt;

    use super::*;
    use crate::test_util::{arrived, pair, refusal};

    fn limit(policy: &str) -> Arc<AdaptiveConcurrency> {
        let src = format!("service = \"billing\"\n[inbound]\nadaptive_concurrency = {policy}");
        let policy = weft_config::parse_policy(&src, std::path::Path::new("billing.toml")).unwrap();
        AdaptiveConcurrency::new(
            "inbound.adaptive_concurrency",
            policy.inbound.adaptive_concurrency.as_ref().unwrap(),
        )
    }

    fn get() -> Request<()> {
        Request::get("/").body(()).unwrap()
    }

    /// `limit.limit()` requests at once, each answered after `delay`.
    async fn wave<S>(
        layer: &S,
        handle: &mut crate::test_util::Handle<Request<()>, Response<()>>,
        n: u32,
        delay: Duration,
        status: u16,
    ) where
        S: Service<Request<()>, Response = Response<AdaptiveBody<()>>, Error = ProxyError>
            + Clone
            + Send
            + 'static,
        S::Future: Send,
    {
        let calls: Vec<_> = (0..n)
            .map(|_| tokio::spawn(layer.clone().oneshot(get())))
            .collect();
        tokio::task::yield_now().await;
        let mut sends = Vec::new();
        while let Some((_, send)) = arrived(handle).await {
            sends.push(send);
        }
        tokio::time::advance(delay).await;
        for send in sends {
            let mut rsp = Response::new(());
            *rsp.status_mut() = http::StatusCode::from_u16(status).unwrap();
            send.send_response(rsp);
        }
        for call in calls {
            drop(call.await.unwrap());
        }
    }

    #[tokio::test(start_paused = true)]
    async fn the_limit_falls_when_the_app_slows_and_refusals_name_it() {
        let limit = limit("{ min_limit = 1, max_limit = 50, initial_limit = 8 }");
        let (service, mut handle) = pair::<Request<()>, Response<()>>();
        handle.allow(100_000);
        let layer = AdaptiveLayer::new(Some(&limit)).layer(service);

        for _ in 0..50 {
            wave(
                &layer,
                &mut handle,
                limit.limit(),
                Duration::from_millis(10),
                200,
            )
            .await;
        }
        let healthy = limit.limit();
        assert!(healthy >= 8, "{healthy}");
        // 5xx answers, however slow, say nothing about the queue.
        for _ in 0..20 {
            wave(
                &layer,
                &mut handle,
                limit.limit(),
                Duration::from_millis(500),
                503,
            )
            .await;
        }
        assert_eq!(limit.limit(), healthy);
        for _ in 0..10 {
            wave(
                &layer,
                &mut handle,
                limit.limit(),
                Duration::from_millis(200),
                200,
            )
            .await;
        }
        let slow = limit.limit();
        assert!(slow < healthy / 2, "{healthy} -> {slow}");
        assert_eq!(limit.in_flight(), 0, "every slot freed with its body");

        // At the limit, the next request is refused at once.
        let held: Vec<_> = (0..slow)
            .map(|_| tokio::spawn(layer.clone().oneshot(get())))
            .collect();
        tokio::task::yield_now().await;
        assert_eq!(limit.in_flight(), slow);
        let refused = refusal(layer.clone().oneshot(get()).await);
        assert!(
            matches!(&refused, ProxyError::ConcurrencyCapped(c) if &*c.limit == "inbound.adaptive_concurrency"),
            "{refused}"
        );
        while let Some((_, send)) = arrived(&mut handle).await {
            send.send_response(Response::new(()));
        }
        for call in held {
            drop(call.await.unwrap());
        }
        assert_eq!(limit.in_flight(), 0);
    }

    #[tokio::test]
    async fn without_a_limit_requests_pass() {
        let (service, mut handle) = pair::<Request<()>, Response<()>>();
        let mut layer = AdaptiveLayer::new(None).layer(service);
        handle.allow(1);
        let rsp = layer.ready().await.unwrap().call(get());
        let (_, send) = arrived(&mut handle).await.unwrap();
        send.send_response(Response::new(()));
        rsp.await.unwrap();
    }
}
