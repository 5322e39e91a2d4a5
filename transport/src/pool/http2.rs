//! Requests over an endpoint's HTTP/2 connections, on the `h2` crate
//! directly.
//!
//! hyper's HTTP/2 client runs each request through its connection task: a
//! channel to the task, a task spawned per request to wait for the response,
//! and a channel back. Here the request's own future opens the stream and
//! waits for the response head, so a request costs no task and no channel.
//! A request body that is not whole at once is piped by a task of its own
//! (as hyper does), cancelled when the response body is dropped.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use h2::{Reason, RecvStream, SendStream};
use http::{HeaderMap, Method, Request, Response, header};
use http_body::{Body, Frame, SizeHint};
use tokio::sync::oneshot;
use weft_core::body::ProxyBody;

use super::connect::Http2Conn;
use super::{Done, Pool, ResponseBody, SendError, Stream, lock};

impl Pool {
    pub(super) async fn send_http2(
        self: Arc<Self>,
        req: Request<ProxyBody>,
    ) -> Result<Response<ResponseBody>, SendError> {
        let (parts, body) = req.into_parts();
        let mut head = Request::from_parts(parts, ());
        prepare_head(&mut head, &body);
        let eos = body.is_end_stream();
        let (conn, mut sender) = loop {
            let (conn, pooled) = match self.open_http2() {
                Some(conn) => (conn, true),
                // Boxed, as for HTTP/1.1: the cold path.
                None => Box::pin(self.connect_http2()).await?,
            };
            let mut sender = conn.sender.clone();
            match std::future::poll_fn(|cx| sender.poll_ready(cx)).await {
                Ok(()) => break (conn, sender),
                // The connection went away (GOAWAY, closed) before this
                // request was given to it: another one.
                Err(_) if pooled => conn.activity.close(),
                Err(error) => return Err(SendError::Http2(error)),
            }
        };
        conn.activity.acquire();
        let stream = Stream(Arc::clone(&conn.activity));
        let (response, send) = sender.send_request(head, eos)?;
        let cancel = if eos { None } else { pipe_body(body, send) };
        let (parts, recv) = response.await?.into_parts();
        let body = Http2Body::new(recv, &parts.headers);
        let done = Some(Done::Http2 { stream, cancel });
        Ok(Response::from_parts(parts, ResponseBody::http2(body, done)))
    }

    /// An open HTTP/2 connection with a stream to spare: fewer streams in
    /// flight than the peer allows.
    fn open_http2(&self) -> Option<Http2Conn> {
        let mut open = lock(&self.http2);
        open.retain(|conn| !conn.activity.is_closed());
        open.iter()
            .find(|conn| {
                let allowed = conn.sender.current_max_send_streams();
                usize::try_from(conn.activity.in_use()).is_ok_and(|used| used < allowed)
            })
            .cloned()
    }

    /// A new HTTP/2 connection, unless one appeared while waiting for the
    /// right to open it (then that one, as pooled).
    async fn connect_http2(&self) -> Result<(Http2Conn, bool), SendError> {
        let _opening = self.opening.lock().await;
        if let Some(conn) = self.open_http2() {
            return Ok((conn, true));
        }
        let conn = self.connector.http2(self.endpoint).await?;
        lock(&self.http2).push(conn.clone());
        Ok((conn, false))
    }
}

/// What hyper's client did to a head before handing it to `h2`: the
/// body's length when it is known and the header is missing. (It also
/// removed connection-specific headers, which `h2` refuses: the stacks'
/// Forwarded layer has removed them already, and a request that still has
/// one fails as a malformed request rather than going out.)
fn prepare_head(head: &mut Request<()>, body: &ProxyBody) {
    if let Some(len) = body.size_hint().exact()
        && (len != 0 || has_payload_semantics(head.method()))
        && !head.headers().contains_key(header::CONTENT_LENGTH)
    {
        head.headers_mut()
            .insert(header::CONTENT_LENGTH, http::HeaderValue::from(len));
    }
}

/// Methods whose requests define a meaning for a body (a zero length is
/// then worth saying).
fn has_payload_semantics(method: &Method) -> bool {
    !matches!(
        *method,
        Method::GET | Method::HEAD | Method::DELETE | Method::CONNECT
    )
}

/// Send `body` on `send`: at once when it is whole already, else from a
/// task of its own. Returns what cancels that task (drop it: the stream is
/// reset), kept until the response body ends.
fn pipe_body(body: ProxyBody, send: SendStream<Bytes>) -> Option<oneshot::Sender<()>> {
    let (cancel, cancelled) = oneshot::channel();
    let mut pipe = Pipe {
        body,
        send,
        cancelled,
    };
    let waker = std::task::Waker::noop();
    if Pin::new(&mut pipe)
        .poll(&mut Context::from_waker(waker))
        .is_ready()
    {
        return None;
    }
    tokio::spawn(pipe);
    Some(cancel)
}

/// A request body on its way to a stream, at the pace the peer's flow
/// control allows (one frame buffered at a time).
struct Pipe {
    body: ProxyBody,
    send: SendStream<Bytes>,
    cancelled: oneshot::Receiver<()>,
}

impl Future for Pipe {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = &mut *self;
        loop {
            // The response was dropped: nobody wants the rest.
            if Pin::new(&mut this.cancelled).poll(cx).is_ready() {
                this.send.send_reset(Reason::CANCEL);
                return Poll::Ready(());
            }
            // The peer reset the stream: it wants no more.
            if this.send.poll_reset(cx).is_ready() {
                return Poll::Ready(());
            }
            if this.send.capacity() == 0 {
                this.send.reserve_capacity(1);
                match ready!(this.send.poll_capacity(cx)) {
                    Some(Ok(_)) => {}
                    // The stream closed, or failed: nothing more to send.
                    None | Some(Err(_)) => return Poll::Ready(()),
                }
                continue;
            }
            match ready!(Pin::new(&mut this.body).poll_frame(cx)) {
                None => {
                    let _ = this.send.send_data(Bytes::new(), true);
                    return Poll::Ready(());
                }
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(data) => {
                        let eos = this.body.is_end_stream();
                        if this.send.send_data(data, eos).is_err() || eos {
                            return Poll::Ready(());
                        }
                    }
                    Err(frame) => {
                        if let Ok(trailers) = frame.into_trailers() {
                            let _ = this.send.send_trailers(trailers);
                        }
                        return Poll::Ready(());
                    }
                },
                Some(Err(error)) => {
                    tracing::debug!(%error, "request body failed; stream reset");
                    this.send.send_reset(Reason::INTERNAL_ERROR);
                    return Poll::Ready(());
                }
            }
        }
    }
}

/// The receiving half of a response stream: data (its flow-control
/// capacity given back as it is read), then trailers.
#[derive(Debug)]
pub(super) struct Http2Body {
    recv: RecvStream,
    /// What `content-length` says is left, if it said.
    remaining: Option<u64>,
    data_done: bool,
}

impl Http2Body {
    fn new(recv: RecvStream, headers: &HeaderMap) -> Self {
        let remaining = headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok());
        Self {
            recv,
            remaining,
            data_done: false,
        }
    }

    pub(super) fn poll_frame(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, h2::Error>>> {
        if !self.data_done {
            match ready!(self.recv.poll_data(cx)) {
                Some(Ok(data)) => {
                    let _ = self.recv.flow_control().release_capacity(data.len());
                    if let Some(left) = &mut self.remaining {
                        *left = left.saturating_sub(data.len() as u64);
                    }
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Some(Err(error)) => return Poll::Ready(Some(Err(error))),
                None => self.data_done = true,
            }
        }
        match ready!(self.recv.poll_trailers(cx)) {
            Ok(Some(trailers)) => Poll::Ready(Some(Ok(Frame::trailers(trailers)))),
            Ok(None) => Poll::Ready(None),
            Err(error) => Poll::Ready(Some(Err(error))),
        }
    }

    pub(super) fn is_end_stream(&self) -> bool {
        self.recv.is_end_stream()
    }

    pub(super) fn size_hint(&self) -> SizeHint {
        if self.recv.is_end_stream() {
            return SizeHint::with_exact(0);
        }
        match self.remaining {
            Some(left) => SizeHint::with_exact(left),
            None => SizeHint::default(),
        }
    }
}
