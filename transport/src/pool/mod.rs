//! One endpoint's connections, owned by whoever owns the pool (a balanced
//! endpoint keeps its own; requests without one share a pool per address).
//!
//! - **HTTP/1.1**: a list of idle connections, newest last. A request takes
//!   the newest one that is still open (else opens one) and the connection
//!   comes back to the list when the response body ends, at most
//!   `[pool] max_idle_per_endpoint` of them. A body dropped before its end,
//!   a failed request and a `101 Switching Protocols` answer (the upgrade
//!   takes the connection) close the connection instead.
//! - **HTTP/2** ([`http2`], on the `h2` crate): requests share one
//!   connection, up to as many streams in flight as the peer allows
//!   (`SETTINGS_MAX_CONCURRENT_STREAMS`); past that a second is opened. Only
//!   one request opens a connection at a time, the others wait for it.
//! - **Stale connections**: a request that a pooled connection could not take
//!   (the peer closed it while idle, or sent GOAWAY, and it has not been
//!   noticed yet) is sent again on another connection; hyper hands such an
//!   HTTP/1.1 request back unsent, `h2` says so before the stream opens.
//! - **Idle timeout**: each connection's task closes it once it has been
//!   unused for `[pool] idle_timeout` ([`connect`]).
//!
//! There is no shared map and no hashing per request: the pool is found
//! through the endpoint. The one allocation per request is the send future,
//! whose hyper types cannot be named.

pub(crate) mod connect;
mod http2;
#[cfg(test)]
mod tests;

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};

use http::{Request, Response, StatusCode, Uri};
use http_body::{Body, Frame, SizeHint};
use hyper::body::{Bytes, Incoming};
use pin_project_lite::pin_project;
use weft_core::body::ProxyBody;

use self::connect::{Activity, ConnectError, Connector, Http1Conn, Http2Conn};
use self::http2::Http2Body;

/// Why a request could not be sent.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    #[error(transparent)]
    Connect(#[from] ConnectError),
    #[error(transparent)]
    Http(#[from] hyper::Error),
    #[error(transparent)]
    Http2(#[from] h2::Error),
}

/// A request on its way: boxed, as hyper's send futures have no name.
pub type SendFuture =
    Pin<Box<dyn Future<Output = Result<Response<ResponseBody>, SendError>> + Send>>;

/// One endpoint's connections.
#[derive(Debug)]
pub struct Pool {
    endpoint: SocketAddr,
    connector: Arc<Connector>,
    max_idle: usize,
    /// Idle HTTP/1.1 connections, newest last.
    http1: Mutex<Vec<Http1Conn>>,
    /// Open HTTP/2 connections.
    http2: Mutex<Vec<Http2Conn>>,
    /// Held while an HTTP/2 connection is being opened.
    opening: tokio::sync::Mutex<()>,
}

impl Pool {
    pub(crate) fn new(endpoint: SocketAddr, connector: Arc<Connector>, max_idle: usize) -> Self {
        Self {
            endpoint,
            connector,
            max_idle,
            http1: Mutex::new(Vec::new()),
            http2: Mutex::new(Vec::new()),
            opening: tokio::sync::Mutex::new(()),
        }
    }

    /// Whether the pool holds no open connection (a shared pool may then go).
    pub(crate) fn is_empty(&self) -> bool {
        lock(&self.http1).iter().all(|c| c.sender.is_closed())
            && lock(&self.http2).iter().all(|c| c.activity.is_closed())
    }

    /// Send `req` over HTTP/2 or HTTP/1.1 (its URI names the endpoint; an
    /// HTTP/1.1 request goes out in origin form).
    pub fn send(self: &Arc<Self>, req: Request<ProxyBody>, http2: bool) -> SendFuture {
        let pool = Arc::clone(self);
        if http2 {
            Box::pin(pool.send_http2(req))
        } else {
            Box::pin(pool.send_http1(req))
        }
    }

    async fn send_http1(
        self: Arc<Self>,
        mut req: Request<ProxyBody>,
    ) -> Result<Response<ResponseBody>, SendError> {
        origin_form(&mut req);
        loop {
            let (mut conn, pooled) = match self.idle_http1() {
                Some(conn) => (conn, true),
                // Boxed: connecting (TCP, maybe a TLS handshake) is the
                // cold path; inline, its state would make every request's
                // future as large, and be copied with it.
                None => (Box::pin(self.connector.http1(self.endpoint)).await?, false),
            };
            if let Err(error) = std::future::poll_fn(|cx| conn.sender.poll_ready(cx)).await {
                if pooled {
                    continue;
                }
                return Err(error.into());
            }
            match conn.sender.try_send_request(req).await {
                Ok(rsp) => return Ok(self.http1_response(rsp, conn)),
                Err(mut error) => match error.take_message() {
                    // The connection closed before taking it: another one.
                    Some(unsent) if pooled => req = unsent,
                    _ => return Err(error.into_error().into()),
                },
            }
        }
    }

    /// The newest idle HTTP/1.1 connection still open, checked out.
    fn idle_http1(&self) -> Option<Http1Conn> {
        let mut idle = lock(&self.http1);
        while let Some(conn) = idle.pop() {
            if !conn.sender.is_closed() {
                conn.activity.acquire();
                return Some(conn);
            }
        }
        None
    }

    fn http1_response(
        self: Arc<Self>,
        rsp: Response<Incoming>,
        conn: Http1Conn,
    ) -> Response<ResponseBody> {
        if rsp.status() == StatusCode::SWITCHING_PROTOCOLS {
            // The upgrade takes the connection.
            return rsp.map(|inner| ResponseBody::http1(inner, None));
        }
        if rsp.body().is_end_stream() {
            self.put_back(conn);
            return rsp.map(|inner| ResponseBody::http1(inner, None));
        }
        let done = Some(Done::Http1 { conn, pool: self });
        rsp.map(|inner| ResponseBody::http1(inner, done))
    }

    /// A connection whose response ended goes back to the idle list (at most
    /// `max_idle`; beyond, it closes).
    fn put_back(&self, conn: Http1Conn) {
        conn.activity.release();
        if conn.sender.is_closed() {
            return;
        }
        let mut idle = lock(&self.http1);
        if idle.len() < self.max_idle {
            idle.push(conn);
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// An HTTP/1.1 request line carries the path, not the whole URI.
fn origin_form(req: &mut Request<ProxyBody>) {
    if req.uri().authority().is_none() {
        return;
    }
    let path = req
        .uri()
        .path_and_query()
        .map_or("/", http::uri::PathAndQuery::as_str);
    if let Ok(uri) = Uri::try_from(path) {
        *req.uri_mut() = uri;
    }
}

/// One HTTP/2 stream in flight, until dropped.
#[derive(Debug)]
struct Stream(Arc<Activity>);

impl Drop for Stream {
    fn drop(&mut self) {
        self.0.release();
    }
}

/// What a response body gives back when it ends.
#[derive(Debug)]
enum Done {
    /// The connection, to its pool.
    Http1 { conn: Http1Conn, pool: Arc<Pool> },
    /// The stream's place on its connection, and what cancels the task
    /// still sending the request body, if one is.
    Http2 {
        stream: Stream,
        cancel: Option<tokio::sync::oneshot::Sender<()>>,
    },
}

impl Done {
    fn finish(self) {
        match self {
            Self::Http1 { conn, pool } => pool.put_back(conn),
            Self::Http2 { stream, cancel } => drop((stream, cancel)),
        }
    }
}

pin_project! {
    /// An endpoint's response body; when it ends its connection (HTTP/1.1)
    /// or stream (HTTP/2) is free again.
    #[derive(Debug)]
    pub struct ResponseBody {
        #[pin]
        inner: Inner,
        done: Option<Done>,
    }
}

pin_project! {
    #[project = InnerProj]
    #[derive(Debug)]
    enum Inner {
        Http1 { #[pin] body: Incoming },
        Http2 { body: Http2Body },
    }
}

impl ResponseBody {
    fn http1(body: Incoming, done: Option<Done>) -> Self {
        Self {
            inner: Inner::Http1 { body },
            done,
        }
    }

    fn http2(body: Http2Body, done: Option<Done>) -> Self {
        Self {
            inner: Inner::Http2 { body },
            done,
        }
    }
}

/// A response body's failure: the HTTP/1.1 connection's or the HTTP/2
/// stream's.
#[derive(Debug, thiserror::Error)]
pub enum ResponseBodyError {
    #[error(transparent)]
    Http1(#[from] hyper::Error),
    #[error(transparent)]
    Http2(#[from] h2::Error),
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = ResponseBodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, ResponseBodyError>>> {
        let this = self.project();
        let (polled, ended) = match this.inner.project() {
            InnerProj::Http1 { mut body } => {
                let polled = body.as_mut().poll_frame(cx).map_err(Into::into);
                let ended = body.is_end_stream();
                (polled, ended)
            }
            InnerProj::Http2 { body } => {
                let polled = body.poll_frame(cx).map_err(Into::into);
                (polled, body.is_end_stream())
            }
        };
        match &polled {
            Poll::Ready(None) => {
                if let Some(done) = this.done.take() {
                    done.finish();
                }
            }
            Poll::Ready(Some(Ok(_))) if ended => {
                if let Some(done) = this.done.take() {
                    done.finish();
                }
            }
            // A failed body's connection is not reused (dropped with `done`).
            Poll::Ready(Some(Err(_))) => drop(this.done.take()),
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        match &self.inner {
            Inner::Http1 { body } => body.is_end_stream(),
            Inner::Http2 { body } => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.inner {
            Inner::Http1 { body } => body.size_hint(),
            Inner::Http2 { body } => body.size_hint(),
        }
    }
}
