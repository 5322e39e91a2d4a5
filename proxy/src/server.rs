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
//!   protocol-error reset caps, keep-alive pings.

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
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use pin_project_lite::pin_project;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use weft_config::Limits;

use crate::body::ProxyBody;
use crate::telemetry::io::Counted;
use crate::telemetry::metrics::ConnectionMetrics;

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
/// and counting connections and bytes into `connections`.
pub async fn serve<F, S>(
    name: &'static str,
    listener: TcpListener,
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
    let graceful = GracefulShutdown::new();
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
        let service = TowerToHyperService::new(make(peer));
        let activity = Arc::new(Activity::new());
        let mut builder = builder.clone();
        builder.http1().timer(HeadTimer {
            activity: Arc::clone(&activity),
            header: header_timeout,
            idle: idle_timeout,
        });
        let watcher = graceful.watcher();
        let connections = connections.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            // hyper-util's auto builder waits for the bytes that tell HTTP/1 from
            // HTTP/2 with no timer of its own (hyperium/hyper#3756). A connection
            // that has sent nothing yet (a client's spare, pre-opened one) holds no
            // request, so shutdown closes it instead of waiting for the timer.
            tokio::select! {
                biased;
                sniffed = tokio::time::timeout(header_timeout, sniff(&stream)) => {
                    if sniffed.is_err() {
                        tracing::debug!(listener = name, client.addr = %peer, "no request within the header read timeout; closing");
                        return;
                    }
                }
                () = stop.cancelled() => {
                    tracing::debug!(listener = name, client.addr = %peer, "shutting down before the first request; closing");
                    return;
                }
            }
            let io = Guarded {
                inner: Counted::new(stream, &connections),
                activity,
                _permit: permit,
            };
            let conn = builder
                .serve_connection_with_upgrades(TokioIo::new(io), service)
                .into_owned();
            if let Err(error) = watcher.watch(conn).await {
                tracing::debug!(listener = name, client.addr = %peer, %error, "connection ended with an error");
            }
        });
    }
    drop(listener);
    tracing::debug!(
        listener = name,
        connections = graceful.count(),
        "listener closed; draining connections"
    );
    graceful.shutdown().await;
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
/// or until the peer closes.
async fn sniff(stream: &TcpStream) -> io::Result<()> {
    let mut buf = [0u8; H2_PREFACE.len()];
    loop {
        let n = stream.peek(&mut buf).await?;
        let seen = buf.get(..n).unwrap_or_default();
        if n == 0 || n == buf.len() || !H2_PREFACE.starts_with(seen) {
            return Ok(());
        }
        // Part of the HTTP/2 preface: peek returns at once while those bytes
        // wait, so look again shortly.
        tokio::time::sleep(Duration::from_millis(5)).await;
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
}

impl Activity {
    const NONE: u64 = u64::MAX;

    fn new() -> Self {
        Self {
            epoch: Instant::now(),
            waiting: AtomicBool::new(true),
            first_byte: AtomicU64::new(Self::NONE),
            started: AtomicBool::new(false),
        }
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
    /// [`HeadTimer`], and holding its listener slot until it closes (upgraded
    /// connections included, since hyper hands this IO to the upgrade).
    struct Guarded<T> {
        #[pin]
        inner: T,
        activity: Arc<Activity>,
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
        if buf.filled().len() > before {
            this.activity.read();
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
