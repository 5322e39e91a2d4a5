//! Concurrency cap: at most `max` requests in flight through a cap, with an
//! optional bounded queue; the permit is held until the response body ends.
//!
//! The caps are [`ConcurrencyLimit`]s shared by every request through them
//! (`inbound.max_concurrency` per instance, or the matched route's
//! `routes.<name>.max_concurrency`). A request that finds a free slot goes on
//! at once (no allocation); one that finds the cap reached waits in the
//! queue, bounded in depth and time, when the cap has one, and is refused
//! with [`ProxyError::ConcurrencyCapped`] otherwise. The permit rides in the
//! response body ([`Tracked`]): a response that streams holds its slot until
//! its last byte, and a request that fails or is dropped frees it at once.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use http::{Request, Response};
use pin_project_lite::pin_project;
use tower::{Layer, Service};

use weft_core::body::Tracked;
use weft_core::error::ProxyError;
use weft_core::limits::{ConcurrencyCapped, ConcurrencyLimit, ConcurrencyPermit};
use weft_core::policy::InboundRoute;

/// Which cap a layer enforces.
#[derive(Debug, Clone)]
pub enum Which {
    /// None (the policy sets no such cap).
    Off,
    /// One cap for every request through the layer.
    Service(Arc<ConcurrencyLimit>),
    /// The matched route's cap, if it has one.
    Route,
}

impl Which {
    fn cap<'a, B>(&'a self, req: &'a Request<B>) -> Option<&'a Arc<ConcurrencyLimit>> {
        match self {
            Self::Off => None,
            Self::Service(cap) => Some(cap),
            Self::Route => req
                .extensions()
                .get::<Arc<InboundRoute>>()
                .and_then(|route| route.concurrency.as_ref()),
        }
    }
}

/// A response body holding its request's permit (none: no cap applied).
pub type PermitBody<B> = Tracked<B, Option<ConcurrencyPermit>>;

// ===== layer =====

#[derive(Debug, Clone)]
pub struct ConcurrencyLayer {
    which: Which,
}

impl ConcurrencyLayer {
    pub fn new(which: Which) -> Self {
        Self { which }
    }

    /// One cap for every request, if the policy sets one.
    pub fn service(cap: Option<&Arc<ConcurrencyLimit>>) -> Self {
        Self::new(cap.map_or(Which::Off, |c| Which::Service(Arc::clone(c))))
    }
}

impl<S> Layer<S> for ConcurrencyLayer {
    type Service = Concurrency<S>;

    fn layer(&self, inner: S) -> Concurrency<S> {
        Concurrency {
            inner,
            which: self.which.clone(),
        }
    }
}

// ===== service =====

#[derive(Debug, Clone)]
pub struct Concurrency<S> {
    inner: S,
    which: Which,
}

type Waiting = Pin<Box<dyn Future<Output = Result<ConcurrencyPermit, ConcurrencyCapped>> + Send>>;

impl<S, B, RB> Service<Request<B>> for Concurrency<S>
where
    S: Service<Request<B>, Response = Response<RB>, Error = ProxyError> + Clone,
{
    type Response = Response<PermitBody<RB>>;
    type Error = ProxyError;
    type Future = ResponseFuture<S, B>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), ProxyError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let cap = match self.which.cap(&req) {
            None => return ResponseFuture::called(self.inner.call(req), None),
            Some(cap) => match cap.try_acquire() {
                Some(permit) => {
                    return ResponseFuture::called(self.inner.call(req), Some(permit));
                }
                None if !cap.has_queue() => return ResponseFuture::refused(cap.refusal()),
                None => Arc::clone(cap),
            },
        };
        // The cold path: wait in the queue (boxed: it is rare and long), then
        // call a clone of the inner service (this one was readied for now).
        let inner = self.inner.clone();
        let inner = std::mem::replace(&mut self.inner, inner);
        ResponseFuture {
            state: State::Waiting {
                wait: Box::pin(async move { cap.acquire().await }),
                then: Some((inner, req)),
            },
        }
    }
}

// ===== future =====

pin_project! {
    pub struct ResponseFuture<S: Service<Request<B>>, B> {
        #[pin]
        state: State<S, B>,
    }
}

pin_project! {
    #[project = StateProj]
    enum State<S: Service<Request<B>>, B> {
        Waiting { wait: Waiting, then: Option<(S, Request<B>)> },
        Called { #[pin] future: S::Future, permit: Option<ConcurrencyPermit> },
        Refused { refusal: ConcurrencyCapped },
    }
}

impl<S: Service<Request<B>>, B> ResponseFuture<S, B> {
    fn called(future: S::Future, permit: Option<ConcurrencyPermit>) -> Self {
        Self {
            state: State::Called { future, permit },
        }
    }

    fn refused(refusal: ConcurrencyCapped) -> Self {
        Self {
            state: State::Refused { refusal },
        }
    }
}

impl<S, B, RB> Future for ResponseFuture<S, B>
where
    S: Service<Request<B>, Response = Response<RB>, Error = ProxyError>,
{
    type Output = Result<Response<PermitBody<RB>>, ProxyError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        loop {
            match this.state.as_mut().project() {
                StateProj::Called { future, permit } => {
                    let rsp = ready!(future.poll(cx))?;
                    let permit = permit.take();
                    return Poll::Ready(Ok(rsp.map(|body| Tracked::new(body, permit))));
                }
                StateProj::Refused { refusal } => return Poll::Ready(Err(refusal.clone().into())),
                StateProj::Waiting { wait, then } => {
                    let permit = ready!(wait.as_mut().poll(cx))?;
                    let Some((mut inner, req)) = then.take() else {
                        // Only after the future completed, which nobody polls.
                        return Poll::Pending;
                    };
                    let future = inner.call(req);
                    this.state.set(State::Called {
                        future,
                        permit: Some(permit),
                    });
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use std::num::NonZeroU32;
    use std::time::Duration;

    use bytes::Bytes;
    use http_body_util::{BodyExt, Full};
    use tower::ServiceExt;

    use super::*;
    use crate::test_util::{arrived, pair, refusal};

    fn cap(max: u32, queue: Option<(u32, &str)>) -> Arc<ConcurrencyLimit> {
        let queue = queue.map(|(depth, timeout)| {
            let src = format!(
                "service = \"billing\"\n[inbound]\nmax_concurrency = {max}\nqueue = {{ depth = {depth}, timeout = \"{timeout}\" }}"
            );
            weft_config::parse_policy(&src, std::path::Path::new("billing.toml"))
                .unwrap()
                .inbound
                .queue
                .unwrap()
        });
        ConcurrencyLimit::new(
            "inbound.max_concurrency",
            NonZeroU32::new(max).unwrap(),
            queue.as_ref(),
        )
    }

    fn get() -> Request<()> {
        Request::get("/").body(()).unwrap()
    }

    #[tokio::test(start_paused = true)]
    async fn the_permit_lasts_until_the_body_ends_and_a_queue_times_out() {
        let cap = cap(1, Some((1, "100ms")));
        let (service, mut handle) = pair::<Request<()>, Response<Full<Bytes>>>();
        let mut layer = ConcurrencyLayer::new(Which::Service(Arc::clone(&cap))).layer(service);
        handle.allow(10);

        let first = layer.ready().await.unwrap().call(get());
        let (_, send) = arrived(&mut handle).await.unwrap();
        send.send_response(Response::new(Full::new(Bytes::from_static(b"x"))));
        let body = first.await.unwrap().into_body();
        assert_eq!(cap.in_flight(), 1, "held while the body is unread");

        // The second waits in the queue, the third finds the queue full.
        let second = tokio::spawn(layer.clone().oneshot(get()));
        tokio::task::yield_now().await;
        assert_eq!(cap.waiting(), 1);
        let third = refusal(layer.ready().await.unwrap().call(get()).await);
        assert!(
            matches!(&third, ProxyError::ConcurrencyCapped(c) if !c.waited),
            "{third}"
        );

        // The queued one gives up after its timeout, and nothing reached the app.
        tokio::time::advance(Duration::from_millis(150)).await;
        let second = refusal(second.await.unwrap());
        assert!(
            matches!(&second, ProxyError::ConcurrencyCapped(c) if c.waited),
            "{second}"
        );
        assert_eq!(cap.waiting(), 0);
        assert!(arrived(&mut handle).await.is_none());

        // Reading the body to its end frees the slot.
        body.collect().await.unwrap();
        assert_eq!(cap.in_flight(), 0);
        let fourth = layer.ready().await.unwrap().call(get());
        let (_, send) = arrived(&mut handle).await.unwrap();
        send.send_response(Response::new(Full::new(Bytes::new())));
        drop(fourth.await.unwrap());
        assert_eq!(cap.in_flight(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_queued_request_goes_on_when_a_slot_frees() {
        let cap = cap(1, Some((4, "1s")));
        let (service, mut handle) = pair::<Request<()>, Response<Full<Bytes>>>();
        let mut layer = ConcurrencyLayer::new(Which::Service(Arc::clone(&cap))).layer(service);
        handle.allow(10);
        let first = layer.ready().await.unwrap().call(get());
        let (_, send) = arrived(&mut handle).await.unwrap();
        let second = tokio::spawn(layer.clone().oneshot(get()));
        tokio::task::yield_now().await;
        assert!(
            arrived(&mut handle).await.is_none(),
            "queued behind the first"
        );
        send.send_response(Response::new(Full::new(Bytes::new())));
        drop(first.await.unwrap());
        let (_, send) = handle.next_request().await.unwrap();
        send.send_response(Response::new(Full::new(Bytes::new())));
        second.await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn without_a_cap_requests_pass() {
        let (service, mut handle) = pair::<Request<()>, Response<()>>();
        let mut layer = ConcurrencyLayer::new(Which::Route).layer(service);
        handle.allow(1);
        let rsp = layer.ready().await.unwrap().call(get());
        let (_, send) = arrived(&mut handle).await.unwrap();
        send.send_response(Response::new(()));
        rsp.await.unwrap();
    }
}
