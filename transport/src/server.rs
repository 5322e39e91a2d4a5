//! Accepting connections and serving HTTP/1.1 and HTTP/2 on them.
//!
//! [`serve`] runs one listener: it accepts until `stop` is cancelled, serves each
//! connection with hyper's auto (HTTP/1.1 or HTTP/2 prior knowledge) server with
//! upgrades enabled, and on stop closes the listener and asks every open connection
//! to finish gracefully (HTTP/1.1: close after the in-flight response; HTTP/2:
//! GOAWAY), returning once all of them have. The caller bounds that wait with the
//! drain grace period.
//!
//! Hardening (`[limits]`, see [`Hardening`]):
//! - at most `max_connections` open at once: past it a connection is accepted and
//!   closed at once, counted in `weft_tcp_connections_refused_total` and logged
//!   (at most once a second per listener);
//! - a new connection must show its protocol within `header_read_timeout`
//!   (hyper-util's auto builder waits for the HTTP/2 preface without a timer);
//! - HTTP/1: request heads bounded in bytes (`max_buf_size`: 431) and fields
//!   (`max_headers`: 431); a head must arrive within `header_read_timeout` of its
//!   first byte, and a keep-alive connection waiting longer than `idle_timeout`
//!   for its next request is closed ([`HeadTimer`]: hyper's header timer, which
//!   otherwise also runs while a connection is idle);
//! - HTTP/2: streams, header list, frame size, windows, rapid-reset and
//!   protocol-error reset caps, keep-alive pings; a connection on which no
//!   request has started for `idle_timeout` is asked to finish (GOAWAY: streams
//!   still open complete, no new ones), so idle HTTP/2 clients, which answer
//!   pings, do not hold listener slots forever (HTTP/1 gets the same, on top
//!   of its [`HeadTimer`]: an in-flight request's response completes, then the
//!   connection closes).
//!
//! Every HTTP/1 connection's reads are also followed by a
//! [`weft_core::framing::RequestFraming`]: the request whose head carried both
//! `Content-Length` and `Transfer-Encoding` (which hyper reduces to the
//! latter before the service sees it) gets a [`BothLengths`] extension, for
//! [`weft_core::screen`] to refuse.
//!
//! With `tls` (the inbound listener of a sidecar with `[tls]`), the same
//! protocol detection reads the connection's first byte: 0x16 (a TLS
//! handshake record) goes through [`InboundTls::accept`] (bounded by its own
//! handshake timeout, and closed at shutdown like a connection that has sent
//! nothing), anything else is plaintext, served only while the local policy
//! says `inbound.allow_plaintext`. Over TLS, the decrypted stream is then
//! sniffed for HTTP/2 the same way (within `header_read_timeout`, closed at
//! shutdown) and served with the same limits; the caller's identity is put
//! into every request's extensions ([`crate::tls::CallerIdentity`]).

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::task::{Context, Poll, ready};
use std::time::{Duration, Instant};

use http::{Request, Response};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use pin_project_lite::pin_project;
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower::ServiceExt as _;
use weft_config::Limits;

use crate::io::ConnectionMetrics;
use crate::io::Counted;
use crate::tls::accept::{Accepted, InboundTls};
use weft_core::body::ProxyBody;
use weft_core::framing::{BothLengths, RequestFraming};

/// Pause after a failed accept (e.g. out of file descriptors) before trying again.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);
/// Refused connections are logged at most this often per listener.
const REFUSAL_LOG_INTERVAL: Duration = Duration::from_secs(1);
/// An HTTP/2 client that does not answer a keep-alive ping within this is gone.
const H2_PING_TIMEOUT: Duration = Duration::from_secs(20);
/// The HTTP/2 connection preface, which hyper-util's auto builder looks for.
const H2_PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// hyper refuses (panics on) an HTTP/1 buffer smaller than this.
const MIN_H1_BUF: usize = 8192;

/// What a listener accepts from its clients.
#[derive(Debug, Clone)]
pub struct Hardening {
    /// The bootstrap's `[limits]`.
    pub limits: Limits,
    /// This listener's connection cap (`max_connections` or `admin_max_connections`).
    pub max_connections: u32,
}

impl Hardening {
    /// The data listeners' settings: `limits.max_connections`.
    pub fn data(limits: &Limits) -> Self {
        Self {
            limits: limits.clone(),
            max_connections: limits.max_connections,
        }
    }

    /// The admin listener's settings: `limits.admin_max_connections`.
    pub fn admin(limits: &Limits) -> Self {
        Self {
            limits: limits.clone(),
            max_connections: limits.admin_max_connections,
        }
    }

    /// hyper's connection builder with every `[limits]` setting but the
    /// per-connection HTTP/1 timer (set in [`serve`]).
    fn builder(&self) -> auto::Builder<TokioExecutor> {
        let l = &self.limits;
        let size = |s: weft_config::ByteSize| u32::try_from(s.get()).unwrap_or(u32::MAX);
        let mut builder = auto::Builder::new(TokioExecutor::new());
        builder
            .http1()
            .timer(TokioTimer::new())
            // One flattened send(2) per response instead of writev(2): fewer
            // kernel cycles per request for the small heads a proxy mostly
            // writes (benches: about 6% less CPU per request).
            .writev(false)
            .max_buf_size((size(l.max_header_size) as usize).max(MIN_H1_BUF))
            .max_headers(l.max_headers as usize)
            .header_read_timeout(l.header_read_timeout.get());
        builder
            .http2()
            .timer(TokioTimer::new())
            .max_concurrent_streams(l.http2_max_concurrent_streams)
            .max_header_list_size(size(l.max_header_size))
            .max_frame_size(size(l.http2_max_frame_size))
            .initial_stream_window_size(size(l.http2_initial_stream_window))
            .initial_connection_window_size(size(l.http2_initial_connection_window))
            .max_pending_accept_reset_streams(l.http2_max_pending_accept_reset_streams as usize)
            .max_local_error_reset_streams(l.http2_max_local_error_reset_streams as usize)
            .keep_alive_interval(l.http2_keep_alive_interval.get())
            .keep_alive_timeout(H2_PING_TIMEOUT);
        builder
    }
}

/// Serve `listener` until `stop`, building one service per connection with `make`
/// and counting connections and bytes into `connections`; with `tls`, every
/// connection is handshaken first.
pub async fn serve<F, S>(
    name: &'static str,
    listener: TcpListener,
    tls: Option<Arc<InboundTls>>,
    make: F,
    connections: ConnectionMetrics,
    hardening: Hardening,
    stop: CancellationToken,
) where
    F: Fn(SocketAddr) -> S,
    S: tower::Service<Request<Incoming>, Response = Response<ProxyBody>, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    let builder = hardening.builder();
    let header_timeout = hardening.limits.header_read_timeout.get();
    let idle_timeout = hardening.limits.idle_timeout.get();
    let slots = Arc::new(Semaphore::new(hardening.max_connections as usize));
    let mut refusals = RefusalLog::default();
    let open = TaskTracker::new();
    loop {
        let accepted = tokio::select! {
            () = stop.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        let (stream, peer) = match accepted {
            Ok(pair) => pair,
            Err(error) => {
                tracing::warn!(listener = name, %error, "accept failed");
                tokio::time::sleep(ACCEPT_BACKOFF).await;
                continue;
            }
        };
        let Ok(permit) = Arc::clone(&slots).try_acquire_owned() else {
            drop(stream);
            connections.refused.inc();
            refusals.refused(name, hardening.max_connections);
            continue;
        };
        let _ = stream.set_nodelay(true);
        let service = make(peer);
        let activity = Arc::new(Activity::new());
        let mut builder = builder.clone();
        builder.http1().timer(HeadTimer {
            activity: Arc::clone(&activity),
            header: header_timeout,
            idle: idle_timeout,
        });
        let conn = Conn {
            name,
            peer,
            builder,
            activity,
            permit,
            header_timeout,
            idle_timeout,
            stop: stop.clone(),
        };
        let connections = connections.clone();
        let tls = tls.clone();
        open.spawn(async move {
            // hyper-util's auto builder waits for the bytes that tell HTTP/1 from
            // HTTP/2 with no timer of its own (hyperium/hyper#3756). A connection
            // that has sent nothing yet (a client's spare, pre-opened one) holds no
            // request, so shutdown closes it instead of waiting for the timer.
            let sniffed = tokio::select! {
                biased;
                sniffed = tokio::time::timeout(header_timeout, sniff(&stream)) => sniffed,
                () = conn.stop.cancelled() => {
                    tracing::debug!(listener = name, client.addr = %peer, "shutting down before the first request; closing");
                    return;
                }
            };
            let first = match sniffed {
                Ok(Ok(Some(first))) => first,
                Ok(Ok(None) | Err(_)) => return,
                Err(_) => {
                    if let Some(tls) = &tls {
                        tls.silent();
                    }
                    tracing::debug!(listener = name, client.addr = %peer, "no request within the header read timeout; closing");
                    return;
                }
            };
            let stream = Counted::new(stream, &connections);
            match tls {
                None => conn.serve(stream, service.map_request(no_caller)).await,
                Some(tls) => conn.serve_tls(&tls, stream, first, service).await,
            }
        });
    }
    drop(listener);
    tracing::debug!(
        listener = name,
        connections = open.len(),
        "listener closed; draining connections"
    );
    open.close();
    open.wait().await;
}

/// Rate-limited logging of refused connections (the accept loop's own state).
#[derive(Debug, Default)]
struct RefusalLog {
    last: Option<Instant>,
    suppressed: u64,
}

impl RefusalLog {
    fn refused(&mut self, listener: &'static str, cap: u32) {
        let now = Instant::now();
        if self
            .last
            .is_some_and(|last| now.duration_since(last) < REFUSAL_LOG_INTERVAL)
        {
            self.suppressed += 1;
            return;
        }
        tracing::warn!(
            listener,
            max_connections = cap,
            also_refused = self.suppressed,
            "connection refused: the listener is at its connection limit ([limits] max_connections)"
        );
        self.last = Some(now);
        self.suppressed = 0;
    }
}

/// Waits until the first bytes of `stream` tell HTTP/1 from HTTP/2, as
/// hyper-util's auto builder will look for them (without consuming anything),
/// and returns the first byte (which also tells TLS from plaintext); `None`
/// when the peer closes before sending anything.
async fn sniff(stream: &TcpStream) -> io::Result<Option<u8>> {
    let mut buf = [0u8; H2_PREFACE.len()];
    loop {
        let n = stream.peek(&mut buf).await?;
        let seen = buf.get(..n).unwrap_or_default();
        if n == 0 || n == buf.len() || !H2_PREFACE.starts_with(seen) {
            return Ok(seen.first().copied());
        }
        // Part of the HTTP/2 preface: peek returns at once while those bytes
        // wait, so look again shortly.
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// [`sniff`] for a stream that cannot peek (the decrypted side of a TLS
/// connection): reads until the bytes tell HTTP/1 from HTTP/2 and returns
/// them, to be read again first ([`Rewind`]); empty when the peer closed.
async fn sniff_read<T: AsyncRead + Unpin>(stream: &mut T) -> io::Result<Vec<u8>> {
    let mut buf = [0u8; H2_PREFACE.len()];
    let mut n = 0;
    while let Some(free) = buf.get_mut(n..) {
        let read = stream.read(free).await?;
        n += read;
        let seen = buf.get(..n).unwrap_or_default();
        if read == 0 || n == buf.len() || !H2_PREFACE.starts_with(seen) {
            break;
        }
    }
    Ok(buf.get(..n).unwrap_or_default().to_vec())
}

/// `make`'s service on a plaintext connection: requests carry no caller.
fn no_caller(req: Request<Incoming>) -> Request<Incoming> {
    req
}

/// One accepted connection, past the connection cap, to be served.
struct Conn {
    name: &'static str,
    peer: SocketAddr,
    /// The listener's builder with this connection's [`HeadTimer`].
    builder: auto::Builder<TokioExecutor>,
    activity: Arc<Activity>,
    permit: OwnedSemaphorePermit,
    header_timeout: Duration,
    idle_timeout: Duration,
    stop: CancellationToken,
}

impl Conn {
    /// Serves HTTP on `io` (its protocol already sniffed) until it closes;
    /// finishes gracefully at shutdown, and once no request has started for
    /// `idle_timeout`.
    async fn serve<T, S>(self, io: T, service: S)
    where
        T: AsyncRead + AsyncWrite + Send + Unpin + 'static,
        S: tower::Service<Request<Incoming>, Response = Response<ProxyBody>, Error = Infallible>
            + Clone
            + Send
            + 'static,
        S::Future: Send + 'static,
    {
        let activity = Arc::clone(&self.activity);
        let io = Guarded {
            inner: io,
            activity: self.activity,
            framing: RequestFraming::new(),
            _permit: self.permit,
        };
        let requests = Arc::clone(&activity);
        let service = service.map_request(move |mut req: Request<Incoming>| {
            if requests.request_started() {
                req.extensions_mut().insert(BothLengths);
            }
            req
        });
        let conn = self
            .builder
            .serve_connection_with_upgrades(TokioIo::new(io), TowerToHyperService::new(service))
            .into_owned();
        let mut conn = std::pin::pin!(conn);
        let mut finishing = false;
        let ended = loop {
            let idle_at = activity.last_request() + self.idle_timeout;
            tokio::select! {
                ended = conn.as_mut() => break ended,
                () = self.stop.cancelled(), if !finishing => {
                    conn.as_mut().graceful_shutdown();
                    finishing = true;
                }
                () = tokio::time::sleep_until(idle_at.into()), if !finishing => {
                    if activity.last_request() + self.idle_timeout <= Instant::now() {
                        tracing::debug!(listener = self.name, client.addr = %self.peer, idle_timeout = ?self.idle_timeout, "no request for the idle timeout; closing the connection");
                        conn.as_mut().graceful_shutdown();
                        finishing = true;
                    }
                }
            }
        };
        if let Err(error) = ended {
            tracing::debug!(listener = self.name, client.addr = %self.peer, %error, "connection ended with an error");
        }
    }

    /// The inbound listener with `[tls]`: a connection whose first byte is
    /// `first` is handshaken (or, not TLS, served in plaintext if the policy
    /// allows it), then sniffed again on its decrypted side.
    async fn serve_tls<S>(self, tls: &InboundTls, stream: Counted<TcpStream>, first: u8, service: S)
    where
        S: tower::Service<Request<Incoming>, Response = Response<ProxyBody>, Error = Infallible>
            + Clone
            + Send
            + 'static,
        S::Future: Send + 'static,
    {
        let (name, peer) = (self.name, self.peer);
        let accepted = tokio::select! {
            biased;
            accepted = tls.accept(stream, first) => accepted,
            () = self.stop.cancelled() => {
                tracing::debug!(listener = name, client.addr = %peer, "shutting down during the TLS handshake; closing");
                return;
            }
        };
        let (mut stream, caller) = match accepted {
            Ok(Accepted::Plaintext(stream)) => {
                return self.serve(stream, service.map_request(no_caller)).await;
            }
            Ok(Accepted::Tls(stream, caller)) => (stream, caller),
            Err(failure) => {
                tracing::info!(listener = name, client.addr = %peer, error = %failure, "connection refused");
                return;
            }
        };
        let sniffed = tokio::select! {
            biased;
            sniffed = tokio::time::timeout(self.header_timeout, sniff_read(&mut *stream)) => sniffed,
            () = self.stop.cancelled() => {
                tracing::debug!(listener = name, client.addr = %peer, "shutting down before the first request; closing");
                return;
            }
        };
        let seen = match sniffed {
            Ok(Ok(seen)) if !seen.is_empty() => seen,
            Ok(_) => return,
            Err(_) => {
                tracing::debug!(listener = name, client.addr = %peer, "no request within the header read timeout after the TLS handshake; closing");
                return;
            }
        };
        let service = service.map_request(move |mut req: Request<Incoming>| {
            req.extensions_mut().insert(caller.clone());
            req
        });
        self.serve(Rewind::new(stream, seen), service).await;
    }
}

pin_project! {
    /// A stream whose first bytes were read to choose the protocol, and are
    /// read again first.
    #[derive(Debug)]
    pub struct Rewind<T> {
        seen: Vec<u8>,
        at: usize,
        #[pin]
        inner: T,
    }
}

impl<T> Rewind<T> {
    pub fn new(inner: T, seen: Vec<u8>) -> Self {
        Self { seen, at: 0, inner }
    }
}

impl<T: AsyncRead> AsyncRead for Rewind<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.project();
        if let Some(rest) = this.seen.get(*this.at..)
            && !rest.is_empty()
            && buf.remaining() > 0
        {
            let n = rest.len().min(buf.remaining());
            buf.put_slice(rest.get(..n).unwrap_or_default());
            *this.at += n;
            return Poll::Ready(Ok(()));
        }
        this.inner.poll_read(cx, buf)
    }
}

impl<T: AsyncWrite> AsyncWrite for Rewind<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.project().inner.poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.project().inner.poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().inner.poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().inner.poll_shutdown(cx)
    }
}

/// What a connection's [`HeadTimer`] knows of its reads.
#[derive(Debug)]
struct Activity {
    epoch: Instant,
    /// Whether hyper is waiting for a request head (true from the accept).
    waiting: AtomicBool,
    /// Milliseconds after `epoch` of the first byte read during this wait;
    /// `NONE` while nothing came.
    first_byte: AtomicU64,
    /// Whether hyper has started waiting for a head at least once.
    started: AtomicBool,
    /// Milliseconds after `epoch` when the last request started (0: none yet,
    /// the connection's start counts).
    last_request: AtomicU64,
    /// Requests handed to the service so far.
    requests: AtomicU64,
    /// The ordinal of the HTTP/1 request whose head carried both
    /// `Content-Length` and `Transfer-Encoding` (0: none), from the reads.
    both_lengths: AtomicU64,
}

impl Activity {
    const NONE: u64 = u64::MAX;

    fn new() -> Self {
        Self {
            epoch: Instant::now(),
            waiting: AtomicBool::new(true),
            first_byte: AtomicU64::new(Self::NONE),
            started: AtomicBool::new(false),
            last_request: AtomicU64::new(0),
            requests: AtomicU64::new(0),
            both_lengths: AtomicU64::new(0),
        }
    }

    /// A request is handed to the service; whether its head carried both
    /// `Content-Length` and `Transfer-Encoding`. hyper hands an HTTP/1
    /// connection's requests over in order, after reading their heads (in
    /// the same task): the n-th request here is the n-th head read.
    fn request_started(&self) -> bool {
        let ms = u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(Self::NONE - 1);
        self.last_request.store(ms, Ordering::Relaxed);
        let n = self.requests.fetch_add(1, Ordering::Relaxed) + 1;
        self.both_lengths.load(Ordering::Relaxed) == n
    }

    /// When the last request started (the connection's start before any).
    fn last_request(&self) -> Instant {
        self.epoch + Duration::from_millis(self.last_request.load(Ordering::Relaxed))
    }

    fn read(&self) {
        if self.waiting.load(Ordering::Relaxed)
            && self.first_byte.load(Ordering::Relaxed) == Self::NONE
        {
            let ms = u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(Self::NONE - 1);
            self.first_byte.store(ms, Ordering::Relaxed);
        }
    }

    fn first_byte(&self) -> Option<Instant> {
        match self.first_byte.load(Ordering::Relaxed) {
            Self::NONE => None,
            ms => Some(self.epoch + Duration::from_millis(ms)),
        }
    }
}

pin_project! {
    /// A served client connection: counted, its reads noted for the
    /// [`HeadTimer`] and followed for HTTP/1 request framing
    /// ([`RequestFraming`]: it stops at once on HTTP/2's preface), and
    /// holding its listener slot until it closes (upgraded connections
    /// included, since hyper hands this IO to the upgrade).
    struct Guarded<T> {
        #[pin]
        inner: T,
        activity: Arc<Activity>,
        framing: RequestFraming,
        _permit: OwnedSemaphorePermit,
    }
}

impl<T: AsyncRead> AsyncRead for Guarded<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.project();
        let before = buf.filled().len();
        let polled = this.inner.poll_read(cx, buf);
        if let Some(read) = buf.filled().get(before..)
            && !read.is_empty()
        {
            this.activity.read();
            if let Some(ordinal) = this.framing.feed(read) {
                this.activity.both_lengths.store(ordinal, Ordering::Relaxed);
            }
        }
        polled
    }
}

impl<T: AsyncWrite> AsyncWrite for Guarded<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.project().inner.poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.project().inner.poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().inner.poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().inner.poll_shutdown(cx)
    }
}

/// hyper's HTTP/1 header-read timer for one connection. hyper starts it
/// whenever it waits for a request head, including while a keep-alive
/// connection is idle, so one value would bound both. This timer tells them
/// apart: once a byte of the head has arrived, the head has `header` from that
/// byte (slowloris); while nothing arrives, the connection may idle for `idle`.
#[derive(Debug, Clone)]
struct HeadTimer {
    activity: Arc<Activity>,
    header: Duration,
    idle: Duration,
}

impl hyper::rt::Timer for HeadTimer {
    fn sleep(&self, duration: Duration) -> Pin<Box<dyn hyper::rt::Sleep>> {
        self.sleep_until(Instant::now() + duration)
    }

    fn sleep_until(&self, _deadline: Instant) -> Pin<Box<dyn hyper::rt::Sleep>> {
        let start = self.begin();
        Box::pin(HeadSleep {
            sleep: Box::pin(tokio::time::sleep_until(self.first_check(start))),
            activity: Arc::clone(&self.activity),
            start,
            header: self.header,
            idle: self.idle,
        })
    }

    fn reset(&self, sleep: &mut Pin<Box<dyn hyper::rt::Sleep>>, new_deadline: Instant) {
        match sleep.as_mut().downcast_mut_pin::<HeadSleep>() {
            Some(head) => {
                let head = head.get_mut();
                head.start = self.begin();
                let first = self.first_check(head.start);
                head.sleep.as_mut().reset(first);
            }
            None => *sleep = self.sleep_until(new_deadline),
        }
    }
}

impl HeadTimer {
    /// hyper starts waiting for a head: note it, and return when.
    fn begin(&self) -> Instant {
        let activity = &self.activity;
        // The first head's bytes may have come during protocol detection:
        // keep what was noted since the accept. Later heads start afresh.
        if activity.started.swap(true, Ordering::Relaxed) {
            activity.first_byte.store(Activity::NONE, Ordering::Relaxed);
        }
        activity.waiting.store(true, Ordering::Relaxed);
        Instant::now()
    }

    fn first_check(&self, start: Instant) -> tokio::time::Instant {
        (start + self.header.min(self.idle)).into()
    }
}

/// One wait for a request head (see [`HeadTimer`]).
struct HeadSleep {
    sleep: Pin<Box<tokio::time::Sleep>>,
    activity: Arc<Activity>,
    start: Instant,
    header: Duration,
    idle: Duration,
}

impl Future for HeadSleep {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = self.get_mut();
        loop {
            ready!(this.sleep.as_mut().poll(cx));
            let now = Instant::now();
            let deadline = match this.activity.first_byte() {
                Some(first) => first + this.header,
                None => {
                    let idle_end = this.start + this.idle;
                    if now >= idle_end {
                        return Poll::Ready(());
                    }
                    // Look again within `header`, so a head that starts now
                    // is still held to it.
                    idle_end.min(now + this.header)
                }
            };
            if now >= deadline {
                return Poll::Ready(());
            }
            this.sleep.as_mut().reset(deadline.into());
        }
    }
}

impl hyper::rt::Sleep for HeadSleep {}

impl Drop for HeadSleep {
    fn drop(&mut self) {
        self.activity.waiting.store(false, Ordering::Relaxed);
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use tokio::io::AsyncWriteExt as _;

    use super::*;

    #[tokio::test]
    async fn rewind_reads_the_seen_bytes_again_then_the_rest() {
        let (mut a, b) = tokio::io::duplex(64);
        a.write_all(b"LO").await.unwrap();
        drop(a);
        let mut r = Rewind::new(b, b"HEL".to_vec());
        let mut one = [0u8; 2];
        r.read_exact(&mut one).await.unwrap();
        assert_eq!(&one, b"HE");
        let mut out = String::new();
        r.read_to_string(&mut out).await.unwrap();
        assert_eq!(out, "LLO");
    }

    #[tokio::test]
    async fn sniff_read_stops_at_the_first_byte_that_is_not_the_h2_preface() {
        let (mut a, mut b) = tokio::io::duplex(64);
        a.write_all(b"GET / HTTP/1.1\r\n").await.unwrap();
        let seen = sniff_read(&mut b).await.unwrap();
        assert!(!seen.is_empty() && b"GET / HTTP/1.1\r\n".starts_with(&seen));
    }

    #[tokio::test]
    async fn sniff_read_waits_for_the_whole_h2_preface() {
        let (mut a, mut b) = tokio::io::duplex(64);
        let task = tokio::spawn(async move {
            for chunk in H2_PREFACE.chunks(5) {
                a.write_all(chunk).await.unwrap();
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            a
        });
        let seen = sniff_read(&mut b).await.unwrap();
        assert_eq!(seen, H2_PREFACE);
        drop(task.await.unwrap());
    }

    #[tokio::test]
    async fn sniff_read_returns_what_came_before_the_peer_closed() {
        let (mut a, mut b) = tokio::io::duplex(64);
        a.write_all(b"PRI").await.unwrap();
        drop(a);
        assert_eq!(sniff_read(&mut b).await.unwrap(), b"PRI");
        let (a, mut b) = tokio::io::duplex(64);
        drop(a);
        assert!(sniff_read(&mut b).await.unwrap().is_empty());
    }
}
