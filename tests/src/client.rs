//! HTTP clients the scenarios play the local app with.
//!
//! [`Client`] wraps hyper-util's pooled legacy client with a connector that
//! always dials one fixed address (the proxy's listener), in one of three
//! [`Mode`]s: HTTP/1.1 absolute form (what an app with `HTTP_PROXY` sends),
//! HTTP/1.1 origin form with the destination in the Host header, or HTTP/2
//! prior knowledge (h2c) with the destination in `:authority`. The target URI
//! of each request is always the logical one (`http://billing/x`); the mode
//! decides how it goes on the wire.
//!
//! [`RawConn`] is a plain TCP connection for requests that must be byte-exact
//! (hop-by-hop headers, HTTP/1.0, no Host) and for protocol upgrades.
//!
//! Every wait is bounded: requests by [`REQUEST_TIMEOUT`], raw reads by
//! [`RAW_READ_TIMEOUT`].
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use anyhow::{Context as _, anyhow, bail};
use bytes::{Bytes, BytesMut};
use futures_util::stream;
use http::{HeaderMap, Request, Response, StatusCode, Uri, Version};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt as _, Empty, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::rt::{Read, ReadBufCursor, Write};
use hyper_util::client::legacy::connect::{Connected, Connection};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;

/// The error type of request and response bodies in the harness.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// The body type of requests the harness sends (and responses the backend sends).
pub type Body = BoxBody<Bytes, BoxError>;

/// Upper bound for one request, response body included.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// Upper bound for one read on a [`RawConn`].
pub const RAW_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// An empty body.
pub fn empty() -> Body {
    Empty::new()
        .map_err(|never: Infallible| match never {})
        .boxed()
}

/// A body of `data`, in one frame.
pub fn full(data: impl Into<Bytes>) -> Body {
    Full::new(data.into())
        .map_err(|never: Infallible| match never {})
        .boxed()
}

/// `len` bytes of [`crate::pattern`], produced lazily in 64 KiB chunks.
pub fn pattern_body(len: u64) -> Body {
    const CHUNK: u64 = 64 * 1024;
    let chunks = stream::unfold(0_u64, move |offset| async move {
        if offset >= len {
            return None;
        }
        let size = CHUNK.min(len - offset);
        let data = Bytes::from(crate::pattern(offset, size as usize));
        Some((Ok::<_, BoxError>(Frame::data(data)), offset + size))
    });
    StreamBody::new(chunks).boxed()
}

/// How a [`Client`] puts the destination on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// HTTP/1.1, `GET http://billing/x HTTP/1.1` (as an app with HTTP_PROXY).
    AbsoluteForm,
    /// HTTP/1.1, `GET /x HTTP/1.1` + `Host: billing`.
    HostHeader,
    /// HTTP/2 prior knowledge; `:authority: billing`.
    H2,
}

/// A pooled HTTP client whose every connection goes to one address.
#[derive(Debug, Clone)]
pub struct Client {
    inner: hyper_util::client::legacy::Client<FixedConnector, Body>,
    mode: Mode,
}

impl Client {
    /// A client sending through `addr` in `mode`.
    pub fn new(addr: SocketAddr, mode: Mode) -> Self {
        let connector = FixedConnector {
            addr,
            proxied: mode == Mode::AbsoluteForm,
        };
        let inner = hyper_util::client::legacy::Client::builder(TokioExecutor::new())
            .http2_only(mode == Mode::H2)
            .pool_idle_timeout(Duration::from_secs(30))
            .build(connector);
        Self { inner, mode }
    }

    /// HTTP/1.1 absolute-form requests through `addr`.
    pub fn absolute(addr: SocketAddr) -> Self {
        Self::new(addr, Mode::AbsoluteForm)
    }

    /// HTTP/1.1 origin-form requests with a Host header through `addr`.
    pub fn host_header(addr: SocketAddr) -> Self {
        Self::new(addr, Mode::HostHeader)
    }

    /// HTTP/2 prior-knowledge requests through `addr`.
    pub fn h2(addr: SocketAddr) -> Self {
        Self::new(addr, Mode::H2)
    }

    /// The client's mode.
    pub fn mode(&self) -> Mode {
        self.mode
    }

    /// Sends `request` and returns once the response head arrived.
    pub async fn send(&self, mut request: Request<Body>) -> anyhow::Result<Response<Incoming>> {
        if self.mode == Mode::H2 {
            *request.version_mut() = Version::HTTP_2;
        }
        let what = format!("{} {}", request.method(), request.uri());
        crate::within(REQUEST_TIMEOUT, &what, self.inner.request(request))
            .await?
            .with_context(|| format!("{what} via {:?}", self.mode))
    }

    /// Sends `request` and reads the whole response, trailers included.
    pub async fn request(&self, request: Request<Body>) -> anyhow::Result<Reply> {
        let what = format!("{} {}", request.method(), request.uri());
        let response = self.send(request).await?;
        crate::within(REQUEST_TIMEOUT, &what, Reply::collect(response))
            .await?
            .with_context(|| format!("reading the response to {what}"))
    }

    /// `GET uri`, whole response.
    pub async fn get(&self, uri: &str) -> anyhow::Result<Reply> {
        self.request(Request::get(uri).body(empty())?).await
    }

    /// `POST uri` with `body`, whole response.
    pub async fn post(&self, uri: &str, body: impl Into<Bytes>) -> anyhow::Result<Reply> {
        self.request(Request::post(uri).body(full(body))?).await
    }

    /// `method uri` with extra `headers` and `body`, whole response.
    pub async fn send_with(
        &self,
        method: &str,
        uri: &str,
        headers: &[(&str, &str)],
        body: impl Into<Bytes>,
    ) -> anyhow::Result<Reply> {
        let mut request = Request::builder().method(method).uri(uri);
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        self.request(request.body(full(body))?).await
    }

    /// `GET uri` with extra `headers`, whole response.
    pub async fn get_with(&self, uri: &str, headers: &[(&str, &str)]) -> anyhow::Result<Reply> {
        self.send_with("GET", uri, headers, Bytes::new()).await
    }
}

/// A fully read response.
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: StatusCode,
    pub version: Version,
    pub headers: HeaderMap,
    pub body: Bytes,
    pub trailers: Option<HeaderMap>,
}

impl Reply {
    /// Reads `response` to its end.
    pub async fn collect(response: Response<Incoming>) -> anyhow::Result<Self> {
        let (parts, body) = response.into_parts();
        let collected = body.collect().await?;
        let trailers = collected.trailers().cloned();
        Ok(Self {
            status: parts.status,
            version: parts.version,
            headers: parts.headers,
            body: collected.to_bytes(),
            trailers,
        })
    }

    /// The value of header `name`, if present and text.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// The value of trailer `name`, if present and text.
    pub fn trailer(&self, name: &str) -> Option<&str> {
        self.trailers
            .as_ref()
            .and_then(|t| t.get(name))
            .and_then(|v| v.to_str().ok())
    }

    /// Which test backend answered (its `x-backend` header).
    pub fn backend(&self) -> Option<&str> {
        self.header("x-backend")
    }

    /// The body as text (lossy).
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The `weft-reason` header: why the proxy answered itself.
    pub fn reason(&self) -> Option<&str> {
        self.header("weft-reason")
    }

    /// The `weft-limit` header: which policy key refused the request.
    pub fn limit(&self) -> Option<&str> {
        self.header("weft-limit")
    }

    /// Fails unless this is the proxy refusing with `status`, `weft-reason:
    /// reason` and `weft-limit: limit`; a 429 must also say `retry-after` in
    /// whole seconds, at least 1. The backend must not have answered it.
    pub fn expect_refusal(&self, status: u16, reason: &str, limit: &str) -> anyhow::Result<&Self> {
        self.expect_status(status)?;
        let describe = || format!("headers {:?}, body {:?}", self.headers, self.text());
        if self.reason() != Some(reason) || self.limit() != Some(limit) {
            bail!(
                "expected weft-reason {reason:?} and weft-limit {limit:?}, got {:?} and {:?} ({})",
                self.reason(),
                self.limit(),
                describe()
            );
        }
        if let Some(backend) = self.backend() {
            bail!("a refusal came from backend {backend:?} ({})", describe());
        }
        if status == 429 {
            let retry_after = self.header("retry-after").unwrap_or_default();
            if !retry_after.parse::<u64>().is_ok_and(|secs| secs >= 1) {
                bail!(
                    "a 429 needs retry-after in whole seconds >= 1, got {retry_after:?} ({})",
                    describe()
                );
            }
        }
        Ok(self)
    }

    /// Fails unless the status is `want`, showing what came instead.
    pub fn expect_status(&self, want: u16) -> anyhow::Result<&Self> {
        if self.status.as_u16() != want {
            bail!(
                "expected status {want}, got {} (headers {:?}, body {:?})",
                self.status,
                self.headers,
                self.text()
            );
        }
        Ok(self)
    }
}

/// A connector that dials one fixed address whatever the request URI says.
#[derive(Debug, Clone)]
struct FixedConnector {
    addr: SocketAddr,
    /// Marks connections as proxied, which makes hyper send absolute-form URIs.
    proxied: bool,
}

impl tower::Service<Uri> for FixedConnector {
    type Response = FixedStream;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<FixedStream>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: Uri) -> Self::Future {
        let (addr, proxied) = (self.addr, self.proxied);
        Box::pin(async move {
            let stream = TcpStream::connect(addr).await?;
            stream.set_nodelay(true)?;
            Ok(FixedStream {
                io: TokioIo::new(stream),
                proxied,
            })
        })
    }
}

/// A TCP stream that tells hyper whether it leads to a proxy.
#[derive(Debug)]
struct FixedStream {
    io: TokioIo<TcpStream>,
    proxied: bool,
}

impl Connection for FixedStream {
    fn connected(&self) -> Connected {
        Connected::new().proxy(self.proxied)
    }
}

impl Read for FixedStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl Write for FixedStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// The head of a response read off a [`RawConn`].
#[derive(Debug, Clone)]
pub struct RawHead {
    pub status: u16,
    /// Header names lower-cased, in wire order.
    pub headers: Vec<(String, String)>,
}

impl RawHead {
    /// The first value of header `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.headers
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// A raw TCP connection with bounded reads, for byte-exact HTTP/1.x.
#[derive(Debug)]
pub struct RawConn {
    stream: TcpStream,
    /// Bytes read past the last thing returned.
    buffered: BytesMut,
}

impl RawConn {
    /// Connects to `addr`.
    pub async fn connect(addr: SocketAddr) -> anyhow::Result<Self> {
        let stream = crate::within(RAW_READ_TIMEOUT, "connect", TcpStream::connect(addr))
            .await?
            .with_context(|| format!("connecting to {addr}"))?;
        stream.set_nodelay(true)?;
        Ok(Self {
            stream,
            buffered: BytesMut::new(),
        })
    }

    /// Writes all of `bytes`.
    pub async fn write(&mut self, bytes: &[u8]) -> anyhow::Result<()> {
        self.stream.write_all(bytes).await?;
        self.stream.flush().await?;
        Ok(())
    }

    async fn fill(&mut self) -> anyhow::Result<()> {
        let mut chunk = [0_u8; 16 * 1024];
        let n = crate::within(RAW_READ_TIMEOUT, "raw read", self.stream.read(&mut chunk)).await??;
        if n == 0 {
            bail!(
                "connection closed by peer (unread: {:?})",
                String::from_utf8_lossy(&self.buffered)
            );
        }
        self.buffered.extend_from_slice(&chunk[..n]);
        Ok(())
    }

    /// Reads a response head (status line and headers, up to the blank line).
    pub async fn read_head(&mut self) -> anyhow::Result<RawHead> {
        let end = loop {
            if let Some(at) = self.buffered.windows(4).position(|w| w == b"\r\n\r\n") {
                break at + 4;
            }
            self.fill().await?;
        };
        let head = self.buffered.split_to(end);
        let text = std::str::from_utf8(&head).context("response head is not UTF-8")?;
        let mut lines = text.split("\r\n");
        let status_line = lines.next().unwrap_or_default();
        let status = status_line
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| anyhow!("bad status line {status_line:?}"))?;
        let headers = lines
            .filter(|l| !l.is_empty())
            .filter_map(|l| l.split_once(':'))
            .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_owned()))
            .collect();
        Ok(RawHead { status, headers })
    }

    /// Reads exactly `n` bytes.
    pub async fn read_exact(&mut self, n: usize) -> anyhow::Result<Bytes> {
        while self.buffered.len() < n {
            self.fill().await?;
        }
        Ok(self.buffered.split_to(n).freeze())
    }

    /// Reads a line ending in CRLF (without the CRLF).
    async fn read_line(&mut self) -> anyhow::Result<String> {
        let end = loop {
            if let Some(at) = self.buffered.windows(2).position(|w| w == b"\r\n") {
                break at;
            }
            self.fill().await?;
        };
        let line = self.buffered.split_to(end + 2);
        Ok(String::from_utf8_lossy(&line[..end]).into_owned())
    }

    /// Reads a response: head, then a body framed by content-length or chunked
    /// (close-delimited bodies are not supported; tests avoid them).
    pub async fn read_response(&mut self) -> anyhow::Result<(RawHead, Bytes)> {
        let head = self.read_head().await?;
        let chunked = head
            .header("transfer-encoding")
            .is_some_and(|te| te.eq_ignore_ascii_case("chunked"));
        if chunked {
            let mut body = BytesMut::new();
            loop {
                let line = self.read_line().await?;
                let size = line.split(';').next().unwrap_or_default().trim();
                let size = usize::from_str_radix(size, 16)
                    .with_context(|| format!("bad chunk size line {line:?}"))?;
                if size == 0 {
                    // Skip trailers up to the blank line.
                    while !self.read_line().await?.is_empty() {}
                    return Ok((head, body.freeze()));
                }
                body.extend_from_slice(&self.read_exact(size).await?);
                self.read_line().await?;
            }
        }
        let len = match head.header("content-length") {
            Some(len) => len.parse().context("bad content-length")?,
            None => 0,
        };
        let body = self.read_exact(len).await?;
        Ok((head, body))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::Backend;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn modes_put_the_destination_where_they_say() {
        let backend = Backend::start("a").await.unwrap();
        let cases = [
            (Mode::AbsoluteForm, "http://billing/x?q=1", Version::HTTP_11),
            (Mode::HostHeader, "/x?q=1", Version::HTTP_11),
            (Mode::H2, "http://billing/x?q=1", Version::HTTP_2),
        ];
        for (mode, target, version) in cases {
            let reply = Client::new(backend.addr(), mode)
                .get("http://billing/x?q=1")
                .await
                .unwrap();
            reply.expect_status(200).unwrap();
            let seen = backend.last_seen().unwrap();
            assert_eq!(seen.target, target, "{mode:?}");
            assert_eq!(seen.host.as_deref(), Some("billing"), "{mode:?}");
            assert_eq!(seen.version, version, "{mode:?}");
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn raw_conn_reads_length_and_chunked_bodies() {
        let backend = Backend::start("a").await.unwrap();
        let mut conn = RawConn::connect(backend.addr()).await.unwrap();
        conn.write(b"GET /hello HTTP/1.1\r\nHost: a\r\n\r\n")
            .await
            .unwrap();
        let (head, body) = conn.read_response().await.unwrap();
        assert_eq!(head.status, 200);
        assert_eq!(body, "backend a");
        conn.write(b"GET /drip?chunks=2&ms=1 HTTP/1.1\r\nHost: a\r\n\r\n")
            .await
            .unwrap();
        let (head, body) = conn.read_response().await.unwrap();
        assert_eq!(head.header("transfer-encoding"), Some("chunked"));
        assert_eq!(body, "chunk 0\nchunk 1\n");
    }
}
