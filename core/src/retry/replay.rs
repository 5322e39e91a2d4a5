//! Request bodies that can be sent more than once.
//!
//! A retry has to send the same body again, but a streamed body is gone once sent.
//! [`prepare`] reads a request body into memory, up to the route's
//! `retry.max_replay_body`, before the first try: a body that fits becomes a
//! [`Replay`] that yields byte-identical copies (trailers included) for every try;
//! a body that does not fit is handed back as a stream to be sent exactly once, and
//! that request is not retried. Nothing is lost or reordered on the way: when the
//! cap is passed mid-read, the stream yields the chunks already read, then the rest
//! of the original body, then its trailers.
//!
//! Invariants: at most `cap` bytes (plus the one chunk that crossed it) are held per
//! request; a body whose size hint already exceeds the cap is not read at all; an
//! empty body costs nothing.
//!
//! Waiting: [`prepare`] waits until the client has sent the whole body (or passed
//! the cap) before the first try starts. The caller bounds that wait with the
//! request's deadline. A client that sends part of a small body and then waits for
//! the response before sending more (an HTTP/2 bidirectional stream, such as gRPC
//! bidi streaming) cannot be prepared: it would stall until that deadline, so the
//! caller should only prepare bodies of requests it may actually retry.
//!
//! Used by the outbound retry path.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use http::HeaderMap;
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;

use crate::body::{self, BoxError, ProxyBody};

/// A request body prepared for possible replay.
#[derive(Debug)]
pub enum RequestBody {
    /// The whole body is in memory (at most the cap): it can be sent any number
    /// of times.
    Replayable(Replay),
    /// Larger than the cap, or could not be read whole: sent once, never retried.
    Streaming(ProxyBody),
}

/// A whole request body held in memory, to be sent once per try.
#[derive(Debug, Clone, Default)]
pub struct Replay {
    data: Bytes,
    trailers: Option<HeaderMap>,
}

impl Replay {
    /// A fresh body for one try: the same bytes and trailers every time. Cheap: the
    /// data is shared, only the trailers (if any) are copied.
    pub fn body(&self) -> ProxyBody {
        body::boxed(ReplayBody {
            data: Some(self.data.clone()).filter(|data| !data.is_empty()),
            trailers: self.trailers.clone(),
        })
    }

    /// The body's length in bytes.
    pub fn len(&self) -> u64 {
        // usize -> u64 never truncates on the platforms Rust supports.
        self.data.len() as u64
    }

    /// Whether the body has no data (it may still have trailers).
    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }
}

/// Reading the request body failed while buffering it for replay (the client reset
/// the stream or sent a malformed body); the caller answers 400.
#[derive(Debug, thiserror::Error)]
#[error("reading the request body failed")]
pub struct BodyError(#[source] pub BoxError);

/// Read `body` into memory up to `cap` bytes.
///
/// - An empty body (`is_end_stream`) is replayable at once, without polling.
/// - If the size hint's lower bound (the exact length, when known) already exceeds
///   `cap`, the body is not read: `Streaming(body)` as is.
/// - If the cap is passed while reading, `Streaming` of a body that yields the
///   chunks already read and then the rest of the original body, trailers
///   included.
/// - Otherwise `Replayable`, with the request trailers kept.
///
/// A read error while buffering is returned as [`BodyError`].
pub async fn prepare<B>(mut body: B, cap: u64) -> Result<RequestBody, BodyError>
where
    B: Body<Data = Bytes> + Send + Unpin + 'static,
    B::Error: Into<BoxError>,
{
    if body.is_end_stream() {
        return Ok(RequestBody::Replayable(Replay::default()));
    }
    if body.size_hint().lower() > cap {
        return Ok(RequestBody::Streaming(body::boxed(body)));
    }

    let mut chunks: VecDeque<Bytes> = VecDeque::new();
    let mut len: u64 = 0;
    let mut trailers: Option<HeaderMap> = None;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| BodyError(e.into()))?;
        match frame.into_data() {
            Ok(data) => {
                if data.is_empty() {
                    continue;
                }
                len = len.saturating_add(data.len() as u64);
                chunks.push_back(data);
                if len > cap {
                    return Ok(RequestBody::Streaming(body::boxed(Resumed {
                        read: chunks,
                        rest: body,
                    })));
                }
            }
            Err(frame) => {
                if let Ok(more) = frame.into_trailers() {
                    match &mut trailers {
                        Some(trailers) => trailers.extend(more),
                        None => trailers = Some(more),
                    }
                }
            }
        }
    }
    Ok(RequestBody::Replayable(Replay {
        data: concat(chunks, len),
        trailers,
    }))
}

/// The chunks as one contiguous buffer; a single chunk is not copied.
fn concat(mut chunks: VecDeque<Bytes>, len: u64) -> Bytes {
    if chunks.len() <= 1 {
        return chunks.pop_front().unwrap_or_default();
    }
    let mut data = BytesMut::with_capacity(usize::try_from(len).unwrap_or(0));
    for chunk in chunks {
        data.extend_from_slice(&chunk);
    }
    data.freeze()
}

/// The body of one replayed try: the data in one frame, then the trailers.
struct ReplayBody {
    data: Option<Bytes>,
    trailers: Option<HeaderMap>,
}

impl Body for ReplayBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        if let Some(data) = self.data.take() {
            return Poll::Ready(Some(Ok(Frame::data(data))));
        }
        Poll::Ready(self.trailers.take().map(|t| Ok(Frame::trailers(t))))
    }

    fn is_end_stream(&self) -> bool {
        self.data.is_none() && self.trailers.is_none()
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.data.as_ref().map_or(0, |d| d.len() as u64))
    }
}

/// A body whose first chunks were already read: yields them, then the rest.
struct Resumed<B> {
    read: VecDeque<Bytes>,
    rest: B,
}

impl<B> Body for Resumed<B>
where
    B: Body<Data = Bytes> + Unpin,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        if let Some(chunk) = self.read.pop_front() {
            return Poll::Ready(Some(Ok(Frame::data(chunk))));
        }
        Pin::new(&mut self.rest).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.read.is_empty() && self.rest.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        let read: u64 = self.read.iter().map(|c| c.len() as u64).sum();
        let rest = self.rest.size_hint();
        let mut hint = SizeHint::new();
        hint.set_lower(rest.lower().saturating_add(read));
        if let Some(upper) = rest.upper() {
            hint.set_upper(upper.saturating_add(read));
        }
        hint
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use http_body_util::channel::Channel;
    use http_body_util::{Empty, Full};

    /// Every frame of a body: data chunks, then trailers.
    async fn frames(mut body: ProxyBody) -> (Vec<Bytes>, Option<HeaderMap>) {
        let (mut data, mut trailers) = (Vec::new(), None);
        while let Some(frame) = body.frame().await {
            match frame.unwrap().into_data() {
                Ok(chunk) => data.push(chunk),
                Err(frame) => trailers = Some(frame.into_trailers().unwrap()),
            }
        }
        (data, trailers)
    }

    fn trailers() -> HeaderMap {
        let mut t = HeaderMap::new();
        t.insert("grpc-timeout", "1S".parse().unwrap());
        t
    }

    /// A channel body fed with `chunks` and `trailers`, with no size hint.
    async fn streamed(
        chunks: &[&'static [u8]],
        trailers: Option<HeaderMap>,
    ) -> http_body_util::channel::Channel<Bytes, BoxError> {
        let (mut tx, rx) = Channel::<Bytes, BoxError>::new(chunks.len() + 1);
        for chunk in chunks {
            tx.send_data(Bytes::from_static(chunk)).await.unwrap();
        }
        if let Some(t) = trailers {
            tx.send_trailers(t).await.unwrap();
        }
        rx
    }

    #[tokio::test]
    async fn empty_body_is_replayable_for_free() {
        let RequestBody::Replayable(replay) = prepare(Empty::<Bytes>::new(), 0).await.unwrap()
        else {
            panic!("an empty body is replayable");
        };
        assert_eq!(replay.len(), 0);
        assert!(replay.is_empty());
        let body = replay.body();
        assert!(body.is_end_stream());
        assert_eq!(frames(body).await, (vec![], None));
    }

    #[tokio::test]
    async fn small_body_replays_byte_identical_with_trailers() {
        let body = streamed(&[b"hello ", b"", b"world"], Some(trailers())).await;
        let RequestBody::Replayable(replay) = prepare(body, 11).await.unwrap() else {
            panic!("fits the cap exactly");
        };
        assert_eq!(replay.len(), 11);
        for _ in 0..2 {
            let body = replay.body();
            assert_eq!(body.size_hint().exact(), Some(11));
            let (data, t) = frames(body).await;
            assert_eq!(data.concat(), b"hello world");
            assert_eq!(t, Some(trailers()));
        }
    }

    #[tokio::test]
    async fn over_cap_body_streams_everything_once_in_order() {
        let body = streamed(&[b"one-", b"two-", b"three-", b"four"], Some(trailers())).await;
        let RequestBody::Streaming(body) = prepare(body, 6).await.unwrap() else {
            panic!("over the cap");
        };
        let (data, t) = frames(body).await;
        assert_eq!(
            data,
            [&b"one-"[..], b"two-", b"three-", b"four"],
            "chunks kept as sent, in order"
        );
        assert_eq!(t, Some(trailers()));
    }

    #[tokio::test]
    async fn over_cap_body_waits_for_the_rest() {
        // The rest of the body arrives only after prepare has returned.
        let (mut tx, rx) = Channel::<Bytes, BoxError>::new(4);
        tx.send_data(Bytes::from_static(b"0123456789"))
            .await
            .unwrap();
        let RequestBody::Streaming(mut body) = prepare(rx, 4).await.unwrap() else {
            panic!("over the cap");
        };
        let first = body.frame().await.unwrap().unwrap().into_data().unwrap();
        assert_eq!(first, "0123456789");
        tx.send_data(Bytes::from_static(b"tail")).await.unwrap();
        tx.send_trailers(trailers()).await.unwrap();
        drop(tx);
        let (data, t) = frames(body).await;
        assert_eq!(data, [Bytes::from_static(b"tail")]);
        assert_eq!(t, Some(trailers()));
    }

    #[tokio::test]
    async fn size_hint_over_cap_is_not_read() {
        let full = Full::new(Bytes::from_static(b"0123456789"));
        let RequestBody::Streaming(body) = prepare(full, 9).await.unwrap() else {
            panic!("the exact length is over the cap");
        };
        assert_eq!(body.size_hint().exact(), Some(10), "handed back as is");
        assert_eq!(frames(body).await.0.concat(), b"0123456789");
    }

    #[tokio::test]
    async fn body_error_is_an_error() {
        let (mut tx, rx) = Channel::<Bytes, BoxError>::new(2);
        tx.send_data(Bytes::from_static(b"part")).await.unwrap();
        tx.abort("client went away".into());
        let err = prepare(rx, 1024).await.unwrap_err();
        assert_eq!(err.to_string(), "reading the request body failed");
        let source = std::error::Error::source(&err).unwrap();
        assert_eq!(source.to_string(), "client went away");
    }
}
