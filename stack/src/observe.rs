//! Observe: start each request's observation when it arrives, finish it when
//! its response body ends.
//!
//! The topmost layer of both stacks. What an observation records (metrics,
//! a span, an access log line) is the sidecar's business: it implements
//! [`Observer`], and this layer only calls it at the right moments. The
//! observer's [`start`](Observer::start) may put things in the request's
//! extensions (the sidecar puts the
//! [`RequestContext`](crate::context::RequestContext) the layers below name
//! the service and route in, and report retries, endpoints and ejections
//! through). The response body is wrapped so the observation finishes once,
//! when the body ends: that is when a gRPC status in the trailers is known,
//! and when the request's duration is.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use http::{HeaderMap, Request, Response};
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;
use tower::{Layer, Service};
use weft_core::body::BoxError;

/// Where requests are observed (the sidecar's telemetry; `weft-client`'s).
pub trait Observer: Send + Sync + 'static {
    /// One request's observation, from its arrival to the end of its response.
    type Observation: Observation;

    /// A request arrives.
    fn start<B>(&self, req: &mut Request<B>) -> Self::Observation;
}

/// One request's observation. Dropped without [`finish`](Observation::finish)
/// means the request never completed (the client went away before the
/// response, or abandoned its body): the implementation records that in its
/// `Drop`.
pub trait Observation: Send + 'static {
    /// The response's head goes out (a refusal carries its
    /// [`Refusal`](weft_core::error::Refusal) in the extensions).
    fn respond<B>(&mut self, rsp: &Response<B>);

    /// The response body carried trailers.
    fn trailers(&mut self, trailers: &HeaderMap);

    /// The response body ended, or failed (`failed`). Called at most once.
    fn finish(&mut self, failed: bool);
}

// ===== layer =====

#[derive(Debug)]
pub struct ObserveLayer<O> {
    observer: Arc<O>,
}

impl<O> ObserveLayer<O> {
    pub fn new(observer: Arc<O>) -> Self {
        Self { observer }
    }
}

impl<O> Clone for ObserveLayer<O> {
    fn clone(&self) -> Self {
        Self {
            observer: Arc::clone(&self.observer),
        }
    }
}

impl<O, S> Layer<S> for ObserveLayer<O> {
    type Service = Observe<O, S>;

    fn layer(&self, inner: S) -> Observe<O, S> {
        Observe {
            inner,
            observer: Arc::clone(&self.observer),
        }
    }
}

// ===== service =====

#[derive(Debug)]
pub struct Observe<O, S> {
    inner: S,
    observer: Arc<O>,
}

impl<O, S: Clone> Clone for Observe<O, S> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
            observer: Arc::clone(&self.observer),
        }
    }
}

impl<O, S, B, RB> Service<Request<B>> for Observe<O, S>
where
    O: Observer,
    S: Service<Request<B>, Response = Response<RB>, Error = Infallible>,
    RB: Body,
{
    type Response = Response<Observed<O::Observation, RB>>;
    type Error = Infallible;
    type Future = ResponseFuture<O::Observation, S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<B>) -> Self::Future {
        let observation = self.observer.start(&mut req);
        ResponseFuture {
            inner: self.inner.call(req),
            observation: Some(observation),
        }
    }
}

// ===== future =====

pin_project! {
    pub struct ResponseFuture<T, F> {
        #[pin]
        inner: F,
        observation: Option<T>,
    }
}

impl<T, F, RB> Future for ResponseFuture<T, F>
where
    T: Observation,
    F: Future<Output = Result<Response<RB>, Infallible>>,
    RB: Body,
{
    type Output = Result<Response<Observed<T, RB>>, Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let Ok(rsp) = ready!(this.inner.poll(cx));
        let Some(mut observation) = this.observation.take() else {
            // Polled again after completing: nobody does.
            return Poll::Pending;
        };
        observation.respond(&rsp);
        let observation = if rsp.body().is_end_stream() {
            observation.finish(false);
            None
        } else {
            Some(observation)
        };
        Poll::Ready(Ok(rsp.map(|inner| Observed { inner, observation })))
    }
}

// ===== body =====

pin_project! {
    /// A response body that finishes its request's observation when it ends.
    pub struct Observed<T, B> {
        #[pin]
        inner: B,
        observation: Option<T>,
    }
}

impl<T, B> Body for Observed<T, B>
where
    T: Observation,
    B: Body,
    B::Error: Into<BoxError>,
{
    type Data = B::Data;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let mut this = self.project();
        let polled = this.inner.as_mut().poll_frame(cx);
        if let Poll::Ready(frame) = &polled
            && let Some(mut observation) = this.observation.take()
        {
            match frame {
                Some(Ok(frame)) => {
                    if let Some(trailers) = frame.trailers_ref() {
                        observation.trailers(trailers);
                    }
                    // hyper stops polling a body that says it has ended.
                    if this.inner.is_end_stream() {
                        observation.finish(false);
                    } else {
                        *this.observation = Some(observation);
                    }
                }
                Some(Err(_)) => observation.finish(true),
                None => observation.finish(false),
            }
        }
        polled.map(|frame| frame.map(|f| f.map_err(Into::into)))
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use std::sync::Mutex;

    use bytes::Bytes;
    use http_body_util::{BodyExt, Full, StreamBody};
    use tower::ServiceExt;

    use super::*;

    /// What the layer told the observations, in order.
    #[derive(Debug, Default)]
    struct Recorder(Mutex<Vec<String>>);

    struct Recording(Arc<Recorder>, bool);

    impl Recorder {
        fn push(&self, event: impl Into<String>) {
            self.0.lock().unwrap().push(event.into());
        }
        fn events(&self) -> Vec<String> {
            self.0.lock().unwrap().clone()
        }
    }

    impl Observation for Recording {
        fn respond<B>(&mut self, rsp: &Response<B>) {
            self.0.push(format!("respond {}", rsp.status().as_u16()));
        }
        fn trailers(&mut self, trailers: &HeaderMap) {
            self.0.push(format!("trailers {}", trailers.len()));
        }
        fn finish(&mut self, failed: bool) {
            self.1 = true;
            self.0.push(format!("finish failed={failed}"));
        }
    }

    impl Drop for Recording {
        fn drop(&mut self) {
            if !self.1 {
                self.0.push("dropped unfinished");
            }
        }
    }

    /// An observer whose observations all report into one shared log.
    #[derive(Debug, Default)]
    struct Logging(Arc<Recorder>);

    impl Observer for Logging {
        type Observation = Recording;
        fn start<B>(&self, req: &mut Request<B>) -> Recording {
            self.0.push(format!("start {}", req.uri().path()));
            Recording(Arc::clone(&self.0), false)
        }
    }

    fn ok() -> Response<Full<Bytes>> {
        Response::new(Full::new(Bytes::from_static(b"ok")))
    }

    #[tokio::test]
    async fn an_observation_finishes_when_the_body_ends_not_before() {
        let log = Arc::new(Recorder::default());
        let observe = ObserveLayer::new(Arc::new(Logging(Arc::clone(&log)))).layer(
            tower::service_fn(|_: Request<()>| async { Ok::<_, Infallible>(ok()) }),
        );
        let req = Request::get("/orders").body(()).unwrap();
        let rsp = observe.oneshot(req).await.unwrap();
        assert_eq!(log.events(), ["start /orders", "respond 200"]);
        rsp.into_body().collect().await.unwrap();
        assert_eq!(
            log.events(),
            ["start /orders", "respond 200", "finish failed=false"]
        );
    }

    #[tokio::test]
    async fn an_empty_body_finishes_with_the_head_and_trailers_are_seen() {
        let log = Arc::new(Recorder::default());
        let inner = tower::service_fn(|_: Request<()>| async {
            let mut trailers = HeaderMap::new();
            trailers.insert("grpc-status", http::HeaderValue::from_static("14"));
            let frames = vec![
                Ok::<_, Infallible>(Frame::data(Bytes::from_static(b"x"))),
                Ok(Frame::trailers(trailers)),
            ];
            Ok::<_, Infallible>(Response::new(StreamBody::new(futures_util::stream::iter(
                frames,
            ))))
        });
        let observe = ObserveLayer::new(Arc::new(Logging(Arc::clone(&log)))).layer(inner);
        let rsp = observe.oneshot(Request::new(())).await.unwrap();
        rsp.into_body().collect().await.unwrap();
        assert_eq!(
            log.events(),
            [
                "start /",
                "respond 200",
                "trailers 1",
                "finish failed=false"
            ]
        );

        let empty = ObserveLayer::new(Arc::new(Logging(Arc::clone(&log)))).layer(
            tower::service_fn(|_: Request<()>| async {
                Ok::<_, Infallible>(Response::new(http_body_util::Empty::<Bytes>::new()))
            }),
        );
        let _rsp = empty.oneshot(Request::new(())).await.unwrap();
        assert_eq!(
            log.events()[4..],
            ["start /", "respond 200", "finish failed=false"]
        );
    }

    #[tokio::test]
    async fn an_abandoned_body_is_never_finished_as_a_success() {
        let log = Arc::new(Recorder::default());
        let observe = ObserveLayer::new(Arc::new(Logging(Arc::clone(&log)))).layer(
            tower::service_fn(|_: Request<()>| async { Ok::<_, Infallible>(ok()) }),
        );
        let rsp = observe.oneshot(Request::new(())).await.unwrap();
        drop(rsp);
        assert_eq!(
            log.events(),
            ["start /", "respond 200", "dropped unfinished"]
        );
    }
}
