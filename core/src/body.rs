//! Body types shared by every listener.
//!
//! Request and response bodies stream through the proxy frame by frame (data and
//! trailers); nothing here buffers a whole body. [`ProxyBody`] is the one boxed body
//! type handed to hyper on both sides, so the outbound, inbound and admin services
//! share a response type. [`Tracked`] wraps a body and keeps a guard alive until the
//! body ends (or is dropped), which is how per-endpoint in-flight counts last for the
//! whole response rather than just its headers.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use http_body_util::{BodyExt, Full, combinators::UnsyncBoxBody};

/// Error type carried by proxied bodies.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The body type of every request sent upstream and every response sent downstream.
pub type ProxyBody = UnsyncBoxBody<Bytes, BoxError>;

/// Box any body into a [`ProxyBody`].
pub fn boxed<B>(body: B) -> ProxyBody
where
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    body.map_err(Into::into).boxed_unsync()
}

/// A complete in-memory body (error pages, admin responses).
pub fn full(bytes: impl Into<Bytes>) -> ProxyBody {
    boxed(Full::new(bytes.into()))
}

/// An empty body.
pub fn empty() -> ProxyBody {
    boxed(http_body_util::Empty::<Bytes>::new())
}

pin_project_lite::pin_project! {
    /// A body that holds `guard` until the inner body reports its end, errors, or
    /// is dropped, whichever comes first.
    pub struct Tracked<B, G> {
        #[pin]
        inner: B,
        guard: Option<G>,
    }
}

impl<B, G> Tracked<B, G> {
    pub fn new(inner: B, guard: G) -> Self {
        Self {
            inner,
            guard: Some(guard),
        }
    }
}

impl<B: Body, G> Body for Tracked<B, G> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = self.project();
        let polled = this.inner.poll_frame(cx);
        match &polled {
            Poll::Ready(None) | Poll::Ready(Some(Err(_))) => {
                this.guard.take();
            }
            Poll::Ready(Some(Ok(_))) | Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

pin_project_lite::pin_project! {
    /// A body that fails with [`IdleTimedOut`] when no frame arrives for `idle`.
    /// Used for `outbound.idle_timeout`: a stream that keeps sending is never cut,
    /// one that goes silent is.
    pub struct IdleTimeout<B> {
        #[pin]
        inner: B,
        idle: std::time::Duration,
        #[pin]
        sleep: Option<tokio::time::Sleep>,
    }
}

/// The error of a body cut by [`IdleTimeout`].
#[derive(Debug, thiserror::Error)]
#[error("no data for {0:?} (outbound.idle_timeout)")]
pub struct IdleTimedOut(std::time::Duration);

impl<B> IdleTimeout<B> {
    pub fn new(inner: B, idle: std::time::Duration) -> Self {
        Self {
            inner,
            idle,
            sleep: None,
        }
    }
}

impl<B> Body for IdleTimeout<B>
where
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
        match this.inner.poll_frame(cx) {
            Poll::Ready(frame) => {
                this.sleep.set(None);
                Poll::Ready(frame.map(|f| f.map_err(Into::into)))
            }
            Poll::Pending => {
                if this.sleep.is_none() {
                    this.sleep.set(Some(tokio::time::sleep(*this.idle)));
                }
                match this.sleep.as_mut().as_pin_mut().map(|s| s.poll(cx)) {
                    Some(Poll::Ready(())) => {
                        Poll::Ready(Some(Err(Box::new(IdleTimedOut(*this.idle)))))
                    }
                    _ => Poll::Pending,
                }
            }
        }
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
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};

    struct Flag(Arc<AtomicBool>);
    impl Drop for Flag {
        fn drop(&mut self) {
            self.0.store(true, Ordering::SeqCst);
        }
    }

    #[tokio::test]
    async fn guard_released_at_end_of_body_not_before() {
        let released = Arc::new(AtomicBool::new(false));
        let (mut tx, rx) = http_body_util::channel::Channel::<Bytes, BoxError>::new(1);
        let mut body = Tracked::new(rx, Flag(released.clone()));
        tx.send_data(Bytes::from_static(b"a")).await.unwrap();
        let frame = body.frame().await.unwrap().unwrap();
        assert_eq!(frame.into_data().unwrap(), "a");
        assert!(!released.load(Ordering::SeqCst), "released before the end");
        drop(tx);
        assert!(body.frame().await.is_none());
        assert!(released.load(Ordering::SeqCst));
    }

    #[tokio::test(start_paused = true)]
    async fn idle_timeout_cuts_silent_bodies_only() {
        let (mut tx, rx) = http_body_util::channel::Channel::<Bytes, BoxError>::new(1);
        let mut body = std::pin::pin!(IdleTimeout::new(rx, std::time::Duration::from_secs(1)));
        for _ in 0..3 {
            tokio::time::advance(std::time::Duration::from_millis(900)).await;
            tx.send_data(Bytes::from_static(b"x")).await.unwrap();
            assert!(body.frame().await.unwrap().is_ok());
        }
        let err = body.frame().await.unwrap().unwrap_err();
        assert!(err.is::<IdleTimedOut>());
    }

    #[tokio::test]
    async fn guard_released_when_body_dropped() {
        let released = Arc::new(AtomicBool::new(false));
        let body = Tracked::new(Full::new(Bytes::from_static(b"x")), Flag(released.clone()));
        drop(body);
        assert!(released.load(Ordering::SeqCst));
    }
}
