//! Accepting connections and serving HTTP/1.1 and HTTP/2 on them.
//!
//! [`serve`] runs one listener: it accepts until `stop` is cancelled, serves each
//! connection with hyper's auto (HTTP/1.1 or HTTP/2 prior knowledge) server with
//! upgrades enabled, and on stop closes the listener and asks every open connection
//! to finish gracefully (HTTP/1.1: close after the in-flight response; HTTP/2:
//! GOAWAY), returning once all of them have. The caller bounds that wait with the
//! drain grace period.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::Duration;

use http::{Request, Response};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::body::ProxyBody;
use crate::telemetry::io::Counted;
use crate::telemetry::metrics::ConnectionMetrics;

/// Pause after a failed accept (e.g. out of file descriptors) before trying again.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

/// Serve `listener` until `stop`, building one service per connection with `make`
/// and counting connections and bytes into `connections`.
pub async fn serve<F, S>(
    name: &'static str,
    listener: TcpListener,
    make: F,
    connections: ConnectionMetrics,
    stop: CancellationToken,
) where
    F: Fn(SocketAddr) -> S,
    S: tower::Service<Request<Incoming>, Response = Response<ProxyBody>, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder.http1().timer(TokioTimer::new());
    builder.http2().timer(TokioTimer::new());
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
        let _ = stream.set_nodelay(true);
        let service = TowerToHyperService::new(make(peer));
        let conn = builder
            .serve_connection_with_upgrades(
                TokioIo::new(Counted::new(stream, &connections)),
                service,
            )
            .into_owned();
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            if let Err(error) = conn.await {
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
