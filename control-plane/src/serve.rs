//! A small HTTP/1.1 + HTTP/2 server loop for the control plane's HTTP listeners,
//! stopping (gracefully, letting in-flight requests finish) on cancellation.
//!
//! Hardened like the sidecar's listeners (README, "Hardening defaults"): at most
//! [`Limits::max_connections`] open at once (past it a connection is accepted
//! and closed at once, counted in `weft_control_plane_connections_refused_total`
//! and logged at most once a second); a new connection must show its protocol
//! within [`HEADER_READ_TIMEOUT`]; HTTP/1 heads are bounded in bytes and fields
//! and must arrive within that timeout (hyper's timer, which also closes an
//! HTTP/1 connection idle that long); HTTP/2 streams, header lists, reset
//! floods and dead peers are bounded explicitly.
//!
//! Either listener may be TLS ([`Tls`]): a failed handshake closes the
//! connection and is counted by reason. On the admin listener, a client
//! speaking plain HTTP to the TLS port gets a 400 (JSON, as every admin
//! error) saying to use `https://` (counted as `plaintext`) rather than a TLS
//! alert it cannot read.

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use prometheus_client::metrics::counter::Counter;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tokio_util::either::Either;

use crate::metrics::TlsFailures;
use crate::tasks::Tasks;
use crate::tls::{PeerService, ServerTls};

/// An HTTP/1 request head, and a new connection's first bytes, must arrive
/// within this.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest HTTP/1 request head and HTTP/2 header list.
const MAX_HEADER_SIZE: u32 = 64 * 1024;
/// Most fields in an HTTP/1 request head.
const MAX_HEADERS: usize = 100;
/// HTTP/2 streams a client may have open at once.
const MAX_CONCURRENT_STREAMS: u32 = 256;
/// Streams a client may reset before they were accepted (rapid reset).
const MAX_PENDING_ACCEPT_RESETS: usize = 20;
/// Streams reset because the client broke the protocol, before GOAWAY.
const MAX_LOCAL_ERROR_RESETS: usize = 256;
/// Ping an HTTP/2 client silent this long; drop it if the ping is unanswered
/// for `H2_PING_TIMEOUT`.
const H2_PING_INTERVAL: Duration = Duration::from_secs(60);
const H2_PING_TIMEOUT: Duration = Duration::from_secs(20);
/// Refused connections are logged at most this often per listener.
const REFUSAL_LOG_INTERVAL: Duration = Duration::from_secs(1);
/// The HTTP/2 connection preface.
const H2_PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// One listener's connection cap and the counter of connections it refused.
#[derive(Debug, Clone)]
pub struct Limits {
    pub max_connections: u32,
    pub refused: Counter,
}

fn harden(builder: &mut auto::Builder<TokioExecutor>) {
    builder
        .http1()
        .timer(TokioTimer::new())
        .max_buf_size(MAX_HEADER_SIZE as usize)
        .max_headers(MAX_HEADERS)
        .header_read_timeout(HEADER_READ_TIMEOUT);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(MAX_CONCURRENT_STREAMS)
        .max_header_list_size(MAX_HEADER_SIZE)
        .max_pending_accept_reset_streams(MAX_PENDING_ACCEPT_RESETS)
        .max_local_error_reset_streams(MAX_LOCAL_ERROR_RESETS)
        .keep_alive_interval(H2_PING_INTERVAL)
        .keep_alive_timeout(H2_PING_TIMEOUT);
}

/// Serve `handler` on `listener` until `tasks` stop; each connection is a
/// task of theirs. With `tls`, HTTPS only.
pub async fn http<F, Fut>(
    listener: TcpListener,
    limits: Limits,
    tls: Option<Tls>,
    tasks: Tasks,
    handler: F,
) where
    F: Fn(Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Result<Response<Full<Bytes>>, Infallible>> + Send + 'static,
{
    let mut builder = auto::Builder::new(TokioExecutor::new());
    harden(&mut builder);
    accept_loop(
        "admin",
        listener,
        limits,
        tls,
        tasks,
        builder,
        hyper::service::service_fn(handler),
    )
    .await;
}

/// TLS on a listener: the configuration, and where handshake failures count.
#[derive(Debug, Clone)]
pub struct Tls {
    pub server: Arc<ServerTls>,
    pub failures: TlsFailures,
}

/// Serve a gRPC service (HTTP/2 only) on `listener` until `tasks` stop; with
/// `tls`, over mTLS, each request carrying the client's [`PeerService`].
pub async fn grpc<S>(
    listener: TcpListener,
    limits: Limits,
    tls: Option<Tls>,
    tasks: Tasks,
    service: S,
) where
    S: tower::Service<
            Request<Incoming>,
            Response = Response<tonic::body::Body>,
            Error = Infallible,
        > + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    let mut builder = auto::Builder::new(TokioExecutor::new());
    harden(&mut builder);
    let builder = builder.http2_only();
    let service = hyper_util::service::TowerToHyperService::new(service);
    accept_loop("gRPC", listener, limits, tls, tasks, builder, service).await;
}

/// Accept until `stop`, serving each connection with `service`; then let open
/// connections finish (at most 5 s).
async fn accept_loop<S, B>(
    name: &'static str,
    listener: TcpListener,
    limits: Limits,
    tls: Option<Tls>,
    tasks: Tasks,
    builder: auto::Builder<TokioExecutor>,
    service: S,
) where
    S: hyper::service::Service<Request<Incoming>, Response = Response<B>, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    B: hyper::body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let graceful = GracefulShutdown::new();
    let slots = Arc::new(Semaphore::new(limits.max_connections as usize));
    let mut last_log: Option<Instant> = None;
    let mut unlogged = 0u64;
    let stop = tasks.stop().clone();
    loop {
        let accepted = tokio::select! {
            () = stop.cancelled() => break,
            a = listener.accept() => a,
        };
        let Ok((stream, peer)) = accepted else {
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            continue;
        };
        let Ok(permit) = Arc::clone(&slots).try_acquire_owned() else {
            drop(stream);
            limits.refused.inc();
            let now = Instant::now();
            if last_log.is_some_and(|t| now.duration_since(t) < REFUSAL_LOG_INTERVAL) {
                unlogged += 1;
            } else {
                tracing::warn!(
                    listener = name,
                    max_connections = limits.max_connections,
                    also_refused = unlogged,
                    "connection refused: the listener is at its connection limit"
                );
                last_log = Some(now);
                unlogged = 0;
            }
            continue;
        };
        let _ = stream.set_nodelay(true);
        let builder = builder.clone();
        let service = service.clone();
        let watcher = graceful.watcher();
        let tls = tls.clone();
        let stop = stop.clone();
        tasks.spawn("connection", async move {
            let _permit = permit;
            // hyper-util's auto builder waits for the HTTP/2 preface without a
            // timer of its own (hyperium/hyper#3756). A connection that has
            // sent nothing by shutdown holds no request: close it.
            tokio::select! {
                biased;
                sniffed = tokio::time::timeout(HEADER_READ_TIMEOUT, sniff(&stream)) => {
                    if sniffed.is_err() {
                        return;
                    }
                }
                () = stop.cancelled() => return,
            }
            // Only the admin listener answers plain HTTP; the gRPC one
            // fails the handshake, as sidecars expect.
            let plaintext = match &tls {
                Some(tls) if !tls.server.is_mesh() => is_plaintext(&stream).await,
                _ => false,
            };
            let (io, peer_service) = match tls {
                None => (Either::Left(stream), None),
                Some(tls) if plaintext => {
                    tls.failures.inc("plaintext");
                    tracing::debug!(listener = name, client.addr = %peer, "plain HTTP on the TLS listener; answered 400");
                    refuse_plaintext(stream).await;
                    return;
                }
                Some(tls) => match handshake(&tls, stream).await {
                    Ok((stream, service)) => (Either::Right(stream), service),
                    Err((reason, error)) => {
                        tls.failures.inc(reason);
                        tracing::debug!(listener = name, client.addr = %peer, reason, %error, "TLS handshake refused");
                        return;
                    }
                },
            };
            let service = WithPeer {
                inner: service,
                peer: peer_service,
            };
            let conn = builder
                .serve_connection(TokioIo::new(io), service)
                .into_owned();
            if let Err(error) = watcher.watch(conn).await {
                tracing::debug!(listener = name, client.addr = %peer, %error, "connection ended with an error");
            }
        });
    }
    drop(listener);
    let _ = tokio::time::timeout(std::time::Duration::from_secs(5), graceful.shutdown()).await;
}

/// The TLS handshake (bounded by [`HEADER_READ_TIMEOUT`]) and, on the mesh
/// listener, the client's service; on failure, the refusal's reason label
/// and what went wrong.
async fn handshake(
    tls: &Tls,
    stream: TcpStream,
) -> Result<(TlsStream<TcpStream>, Option<PeerService>), (&'static str, String)> {
    let acceptor = TlsAcceptor::from(tls.server.config());
    let stream = match tokio::time::timeout(HEADER_READ_TIMEOUT, acceptor.accept(stream)).await {
        Err(_) => return Err(("timeout", "no TLS handshake within the timeout".to_owned())),
        Ok(Err(error)) => return Err(("handshake", error.to_string())),
        Ok(Ok(stream)) => stream,
    };
    if !tls.server.is_mesh() {
        return Ok((stream, None));
    }
    let cert = stream
        .get_ref()
        .1
        .peer_certificates()
        .and_then(<[_]>::first)
        .ok_or(("identity", "no client certificate".to_owned()))?;
    let service = tls
        .server
        .peer_service(cert)
        .map_err(|error| ("identity", error))?;
    Ok((stream, Some(service)))
}

/// A TLS connection starts with a handshake record (content type 22); an
/// HTTP request with a method name.
async fn is_plaintext(stream: &TcpStream) -> bool {
    let mut first = [0u8; 1];
    matches!(stream.peek(&mut first).await, Ok(1) if first[0].is_ascii_uppercase())
}

/// The body of the 400 a plain-HTTP client on the TLS admin listener reads.
const PLAINTEXT_REFUSAL: &str =
    "{\"error\": \"this admin API is served over TLS: use https:// (weftctl: with --ca-file)\"}\n";

/// Answers a plain-HTTP client with [`PLAINTEXT_REFUSAL`] and closes,
/// reading what it sent (bounded) so that closing does not reset the
/// connection before it reads the answer.
async fn refuse_plaintext(mut stream: TcpStream) {
    let mut buf = [0u8; 4096];
    let _ = stream.try_read(&mut buf);
    let answer = async {
        let text = format!(
            "HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\nconnection: close\r\ncontent-length: {}\r\n\r\n{PLAINTEXT_REFUSAL}",
            PLAINTEXT_REFUSAL.len()
        );
        stream.write_all(text.as_bytes()).await?;
        stream.shutdown().await?;
        // Until the client closes (it read the answer), or a bounded time.
        while stream.read(&mut buf).await? > 0 {}
        std::io::Result::Ok(())
    };
    let _ = tokio::time::timeout(Duration::from_secs(2), answer).await;
}

/// A service that puts the connection's [`PeerService`] (if any) into each
/// request's extensions.
#[derive(Clone)]
struct WithPeer<S> {
    inner: S,
    peer: Option<PeerService>,
}

impl<S, B> hyper::service::Service<Request<Incoming>> for WithPeer<S>
where
    S: hyper::service::Service<Request<Incoming>, Response = Response<B>, Error = Infallible>,
{
    type Response = Response<B>;
    type Error = Infallible;
    type Future = S::Future;

    fn call(&self, mut request: Request<Incoming>) -> Self::Future {
        if let Some(peer) = &self.peer {
            request.extensions_mut().insert(peer.clone());
        }
        self.inner.call(request)
    }
}

/// Waits until the first bytes of `stream` tell HTTP/1 from HTTP/2 (without
/// consuming them), or the peer closes.
async fn sniff(stream: &TcpStream) -> std::io::Result<()> {
    let mut buf = [0u8; H2_PREFACE.len()];
    loop {
        let n = stream.peek(&mut buf).await?;
        let seen = buf.get(..n).unwrap_or_default();
        if n == 0 || n == buf.len() || !H2_PREFACE.starts_with(seen) {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}
