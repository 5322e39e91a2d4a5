//! Opening one connection to an endpoint: TCP (no delay, keep-alive), mTLS
//! towards a sidecar, then the HTTP/1.1 (hyper) or HTTP/2 (`h2`) handshake,
//! with the connection's task spawned so that it closes itself once idle too
//! long (and, HTTP/2, once a keep-alive ping goes unanswered).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::LazyLock;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use hyper::client::conn::http1;
use hyper::rt::{Read, Write};
use hyper_util::rt::TokioIo;
use socket2::{SockRef, TcpKeepalive};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;

use crate::tls::connect::{MeshConnectError, MeshConnector};
use weft_core::body::ProxyBody;

/// TCP keep-alive probes start after this much silence.
const TCP_KEEPALIVE: Duration = Duration::from_secs(60);
/// HTTP/2 pings find a dead connection the kernel has not noticed.
const H2_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);
const H2_KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);
/// HTTP/2 flow-control windows we grant the peer (hyper's defaults): a
/// response of up to 2 MiB, and 5 MiB over all streams, need no
/// WINDOW_UPDATE round trip. Fixed rather than adaptive: adaptive windows
/// cost a ping per burst of data to estimate the bandwidth-delay product.
const H2_STREAM_WINDOW: u32 = 2 * 1024 * 1024;
const H2_CONNECTION_WINDOW: u32 = 5 * 1024 * 1024;
/// Streams opened before the peer's SETTINGS say how many it allows.
const H2_INITIAL_MAX_STREAMS: usize = 100;
/// The largest response head accepted, and request body buffered per stream.
const H2_MAX_HEADER_LIST: u32 = 16 * 1024;
const H2_MAX_SEND_BUFFER: usize = 1024 * 1024;

/// Why a connection could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("TCP connect to {endpoint}: {source}")]
    Tcp {
        endpoint: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("TCP connect to {endpoint} took longer than {after:?}")]
    Timeout {
        endpoint: SocketAddr,
        after: Duration,
    },
    #[error(transparent)]
    Tls(#[from] MeshConnectError),
    #[error("HTTP handshake with {endpoint}: {source}")]
    Handshake {
        endpoint: SocketAddr,
        #[source]
        source: hyper::Error,
    },
    #[error("HTTP/2 handshake with {endpoint}: {source}")]
    Http2Handshake {
        endpoint: SocketAddr,
        #[source]
        source: h2::Error,
    },
}

/// How a connection is in use: by how many requests (HTTP/1.1: zero or one;
/// HTTP/2: its open streams), and since when by none. The connection's task
/// reads it to close the connection after `[pool] idle_timeout` unused, and
/// marks it closed when it ends.
#[derive(Debug, Default)]
pub(crate) struct Activity {
    in_use: AtomicU32,
    /// Milliseconds since [`EPOCH`] when `in_use` last fell to zero.
    idle_since: AtomicU64,
    closed: AtomicBool,
}

/// The clock `Activity` counts idle time on.
static EPOCH: LazyLock<Instant> = LazyLock::new(Instant::now);

fn now_ms() -> u64 {
    u64::try_from(EPOCH.elapsed().as_millis()).unwrap_or(u64::MAX)
}

impl Activity {
    fn new() -> Arc<Self> {
        let activity = Arc::new(Self::default());
        activity.idle_since.store(now_ms(), Ordering::Relaxed);
        activity
    }

    pub(crate) fn in_use(&self) -> u32 {
        self.in_use.load(Ordering::Relaxed)
    }

    pub(crate) fn acquire(&self) {
        self.in_use.fetch_add(1, Ordering::Relaxed);
    }

    /// Whether the connection is known to be closed (or unable to take
    /// another request): no request is given to it any more.
    pub(crate) fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Relaxed)
    }

    pub(crate) fn close(&self) {
        self.closed.store(true, Ordering::Relaxed);
    }

    pub(crate) fn release(&self) {
        if self.in_use.fetch_sub(1, Ordering::Relaxed) == 1 {
            self.idle_since.store(now_ms(), Ordering::Relaxed);
        }
    }

    /// How much longer the connection may stay unused: `None` once it has
    /// been idle for `timeout`.
    fn idle_left(&self, timeout: Duration) -> Option<Duration> {
        if self.in_use() > 0 {
            return Some(timeout);
        }
        let idle =
            Duration::from_millis(now_ms().saturating_sub(self.idle_since.load(Ordering::Relaxed)));
        timeout.checked_sub(idle).filter(|left| !left.is_zero())
    }
}

/// An HTTP/1.1 connection's sending half.
#[derive(Debug)]
pub(crate) struct Http1Conn {
    pub(crate) sender: http1::SendRequest<ProxyBody>,
    pub(crate) activity: Arc<Activity>,
}

/// An HTTP/2 connection's sending half (cloned per request).
#[derive(Debug, Clone)]
pub(crate) struct Http2Conn {
    pub(crate) sender: h2::client::SendRequest<Bytes>,
    pub(crate) activity: Arc<Activity>,
}

/// Opens connections for one client (one service): plaintext, or mTLS with
/// the ALPN of the HTTP version.
#[derive(Debug)]
pub(crate) struct Connector {
    pub(crate) connect_timeout: Duration,
    pub(crate) idle_timeout: Duration,
    /// mTLS towards sidecars: ALPN `http/1.1`, and `h2`.
    pub(crate) mesh: Option<(MeshConnector, MeshConnector)>,
}

impl Connector {
    async fn tcp(&self, endpoint: SocketAddr) -> Result<TcpStream, ConnectError> {
        let tcp =
            match tokio::time::timeout(self.connect_timeout, TcpStream::connect(endpoint)).await {
                Ok(Ok(tcp)) => tcp,
                Ok(Err(source)) => return Err(ConnectError::Tcp { endpoint, source }),
                Err(_) => {
                    return Err(ConnectError::Timeout {
                        endpoint,
                        after: self.connect_timeout,
                    });
                }
            };
        // Best effort: a socket that refuses these options still works.
        let _ = tcp.set_nodelay(true);
        let _ =
            SockRef::from(&tcp).set_tcp_keepalive(&TcpKeepalive::new().with_time(TCP_KEEPALIVE));
        Ok(tcp)
    }

    /// A new HTTP/1.1 connection (upgrades allowed), checked out.
    pub(crate) async fn http1(&self, endpoint: SocketAddr) -> Result<Http1Conn, ConnectError> {
        let tcp = self.tcp(endpoint).await?;
        match &self.mesh {
            None => self.spawn_http1(endpoint, TokioIo::new(tcp)).await,
            Some((http1, _)) => {
                let tls = http1.handshake(endpoint, tcp).await?;
                self.spawn_http1(endpoint, TokioIo::new(tls)).await
            }
        }
    }

    /// A new HTTP/2 connection.
    pub(crate) async fn http2(&self, endpoint: SocketAddr) -> Result<Http2Conn, ConnectError> {
        let tcp = self.tcp(endpoint).await?;
        match &self.mesh {
            None => self.spawn_http2(endpoint, tcp).await,
            Some((_, h2)) => {
                let tls = h2.handshake(endpoint, tcp).await?;
                self.spawn_http2(endpoint, tls).await
            }
        }
    }

    async fn spawn_http1<T>(&self, endpoint: SocketAddr, io: T) -> Result<Http1Conn, ConnectError>
    where
        T: Read + Write + Unpin + Send + 'static,
    {
        let (sender, conn) = http1::Builder::new()
            // send(2) of one buffer rather than writev(2), as the server side.
            .writev(false)
            .handshake(io)
            .await
            .map_err(|source| ConnectError::Handshake { endpoint, source })?;
        let activity = Activity::new();
        activity.acquire();
        let watched = Arc::clone(&activity);
        let idle_timeout = self.idle_timeout;
        tokio::spawn(until_idle(
            conn.with_upgrades(),
            watched,
            idle_timeout,
            endpoint,
        ));
        Ok(Http1Conn { sender, activity })
    }

    async fn spawn_http2<T>(&self, endpoint: SocketAddr, io: T) -> Result<Http2Conn, ConnectError>
    where
        T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let (sender, mut conn) = h2::client::Builder::new()
            .initial_max_send_streams(H2_INITIAL_MAX_STREAMS)
            .initial_window_size(H2_STREAM_WINDOW)
            .initial_connection_window_size(H2_CONNECTION_WINDOW)
            .max_header_list_size(H2_MAX_HEADER_LIST)
            .max_send_buffer_size(H2_MAX_SEND_BUFFER)
            .enable_push(false)
            .handshake::<_, Bytes>(io)
            .await
            .map_err(|source| ConnectError::Http2Handshake { endpoint, source })?;
        let activity = Activity::new();
        let watched = Arc::clone(&activity);
        let idle_timeout = self.idle_timeout;
        let pings = conn.ping_pong();
        tokio::spawn(async move {
            let conn = KeepAlive::new(conn, pings, Arc::clone(&watched));
            until_idle(conn, Arc::clone(&watched), idle_timeout, endpoint).await;
            watched.close();
        });
        Ok(Http2Conn { sender, activity })
    }
}

pin_project_lite::pin_project! {
    /// An HTTP/2 connection that pings its peer every
    /// [`H2_KEEPALIVE_INTERVAL`] while streams are open, and ends when a ping
    /// goes unanswered for [`H2_KEEPALIVE_TIMEOUT`].
    struct KeepAlive<T> {
        #[pin]
        conn: h2::client::Connection<T, Bytes>,
        pings: Option<h2::PingPong>,
        activity: Arc<Activity>,
        #[pin]
        timer: tokio::time::Sleep,
        // Whether the timer's waker is registered (see `UntilIdle`).
        armed: bool,
        awaiting_pong: bool,
    }
}

impl<T: AsyncRead + AsyncWrite + Unpin> KeepAlive<T> {
    fn new(
        conn: h2::client::Connection<T, Bytes>,
        pings: Option<h2::PingPong>,
        activity: Arc<Activity>,
    ) -> Self {
        Self {
            conn,
            pings,
            activity,
            timer: tokio::time::sleep(H2_KEEPALIVE_INTERVAL),
            armed: false,
            awaiting_pong: false,
        }
    }
}

/// Why an HTTP/2 connection ended.
#[derive(Debug, thiserror::Error)]
enum Http2Ended {
    #[error(transparent)]
    Failed(#[from] h2::Error),
    #[error("no answer to a keep-alive ping within {H2_KEEPALIVE_TIMEOUT:?}")]
    PingTimeout,
}

impl<T: AsyncRead + AsyncWrite + Unpin> std::future::Future for KeepAlive<T> {
    type Output = Result<(), Http2Ended>;

    fn poll(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        use std::task::Poll;
        let mut this = self.project();
        if let Poll::Ready(ended) = this.conn.poll(cx) {
            return Poll::Ready(ended.map_err(Into::into));
        }
        let Some(pings) = this.pings.as_mut() else {
            return Poll::Pending;
        };
        loop {
            if *this.awaiting_pong {
                match pings.poll_pong(cx) {
                    Poll::Ready(Ok(_)) => {
                        *this.awaiting_pong = false;
                        let next = tokio::time::Instant::now() + H2_KEEPALIVE_INTERVAL;
                        this.timer.as_mut().reset(next);
                        *this.armed = false;
                    }
                    Poll::Ready(Err(error)) => return Poll::Ready(Err(error.into())),
                    Poll::Pending => {}
                }
            }
            if *this.armed && !this.timer.is_elapsed() {
                return Poll::Pending;
            }
            if this.timer.as_mut().poll(cx).is_pending() {
                *this.armed = true;
                return Poll::Pending;
            }
            *this.armed = false;
            if *this.awaiting_pong {
                return Poll::Ready(Err(Http2Ended::PingTimeout));
            }
            let now = tokio::time::Instant::now();
            if this.activity.in_use() > 0 && pings.send_ping(h2::Ping::opaque()).is_ok() {
                *this.awaiting_pong = true;
                this.timer.as_mut().reset(now + H2_KEEPALIVE_TIMEOUT);
            } else {
                this.timer.as_mut().reset(now + H2_KEEPALIVE_INTERVAL);
            }
        }
    }
}

pin_project_lite::pin_project! {
    /// Drives a connection until it ends, or until it has been unused for
    /// `idle_timeout` (then dropping it closes it).
    ///
    /// The idle timer is polled only when it has fired (or was just set, to
    /// register it), not on every wake of the connection: its waker stays
    /// registered until it fires, and polling a timer is not free.
    struct UntilIdle<C> {
        #[pin]
        conn: C,
        #[pin]
        timer: tokio::time::Sleep,
        armed: bool,
        activity: Arc<Activity>,
        idle_timeout: Duration,
        endpoint: SocketAddr,
    }
}

fn until_idle<C>(
    conn: C,
    activity: Arc<Activity>,
    idle_timeout: Duration,
    endpoint: SocketAddr,
) -> UntilIdle<C> {
    UntilIdle {
        conn,
        timer: tokio::time::sleep(idle_timeout),
        armed: false,
        activity,
        idle_timeout,
        endpoint,
    }
}

impl<C, E> std::future::Future for UntilIdle<C>
where
    C: std::future::Future<Output = Result<(), E>>,
    E: std::fmt::Display,
{
    type Output = ();

    fn poll(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<()> {
        use std::task::Poll;
        let mut this = self.project();
        if let Poll::Ready(ended) = this.conn.poll(cx) {
            if let Err(error) = ended {
                tracing::debug!(endpoint.addr = %this.endpoint, %error, "connection to endpoint failed");
            }
            return Poll::Ready(());
        }
        loop {
            if *this.armed && !this.timer.is_elapsed() {
                return Poll::Pending;
            }
            if this.timer.as_mut().poll(cx).is_pending() {
                *this.armed = true;
                return Poll::Pending;
            }
            match this.activity.idle_left(*this.idle_timeout) {
                Some(left) => {
                    this.timer
                        .as_mut()
                        .reset(tokio::time::Instant::now() + left);
                    *this.armed = false;
                }
                None => {
                    tracing::trace!(endpoint.addr = %this.endpoint, "idle connection to endpoint closed");
                    return Poll::Ready(());
                }
            }
        }
    }
}
