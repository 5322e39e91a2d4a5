//! Opening one connection to an endpoint: TCP (no delay, keep-alive), mTLS
//! towards a sidecar, then the HTTP/1.1 or HTTP/2 handshake, with the
//! connection's task spawned so that it closes itself once idle too long.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::LazyLock;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use hyper::client::conn::{http1, http2};
use hyper::rt::{Read, Write};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use socket2::{SockRef, TcpKeepalive};
use tokio::net::TcpStream;

use crate::tls::connect::{MeshConnectError, MeshConnector};
use weft_core::body::ProxyBody;

/// TCP keep-alive probes start after this much silence.
const TCP_KEEPALIVE: Duration = Duration::from_secs(60);
/// HTTP/2 pings find a dead connection the kernel has not noticed.
const H2_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);
const H2_KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);

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
}

/// How a connection is in use: by how many requests (HTTP/1.1: zero or one;
/// HTTP/2: its open streams), and since when by none. The connection's task
/// reads it to close the connection after `[pool] idle_timeout` unused.
#[derive(Debug, Default)]
pub(crate) struct Activity {
    in_use: AtomicU32,
    /// Milliseconds since [`EPOCH`] when `in_use` last fell to zero.
    idle_since: AtomicU64,
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
    pub(crate) sender: http2::SendRequest<ProxyBody>,
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
            None => self.spawn_http2(endpoint, TokioIo::new(tcp)).await,
            Some((_, h2)) => {
                let tls = h2.handshake(endpoint, tcp).await?;
                self.spawn_http2(endpoint, TokioIo::new(tls)).await
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
        tokio::spawn(async move {
            let conn = conn.with_upgrades();
            until_idle(conn, &watched, idle_timeout, endpoint).await;
        });
        Ok(Http1Conn { sender, activity })
    }

    async fn spawn_http2<T>(&self, endpoint: SocketAddr, io: T) -> Result<Http2Conn, ConnectError>
    where
        T: Read + Write + Unpin + Send + 'static,
    {
        let (sender, conn) = http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .adaptive_window(true)
            .keep_alive_interval(H2_KEEPALIVE_INTERVAL)
            .keep_alive_timeout(H2_KEEPALIVE_TIMEOUT)
            .handshake(io)
            .await
            .map_err(|source| ConnectError::Handshake { endpoint, source })?;
        let activity = Activity::new();
        let watched = Arc::clone(&activity);
        let idle_timeout = self.idle_timeout;
        tokio::spawn(async move {
            until_idle(conn, &watched, idle_timeout, endpoint).await;
        });
        Ok(Http2Conn { sender, activity })
    }
}

/// Drive a connection until it ends, or until it has been unused for
/// `idle_timeout` (then dropping it closes it).
async fn until_idle<C, E>(
    conn: C,
    activity: &Activity,
    idle_timeout: Duration,
    endpoint: SocketAddr,
) where
    C: std::future::Future<Output = Result<(), E>>,
    E: std::fmt::Display,
{
    tokio::pin!(conn);
    let mut wait = idle_timeout;
    loop {
        tokio::select! {
            ended = &mut conn => {
                if let Err(error) = ended {
                    tracing::debug!(endpoint.addr = %endpoint, %error, "connection to endpoint failed");
                }
                return;
            }
            () = tokio::time::sleep(wait) => match activity.idle_left(idle_timeout) {
                Some(left) => wait = left,
                None => {
                    tracing::trace!(endpoint.addr = %endpoint, "idle connection to endpoint closed");
                    return;
                }
            },
        }
    }
}
