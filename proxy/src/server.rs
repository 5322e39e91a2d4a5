//! Accepting connections and serving HTTP/1.1 and HTTP/2 on them.
//!
//! [`serve`] runs one listener: it accepts until `stop` is cancelled, serves each
//! connection with hyper's auto (HTTP/1.1 or HTTP/2 prior knowledge) server with
//! upgrades enabled, and on stop closes the listener and asks every open connection
//! to finish gracefully (HTTP/1.1: close after the in-flight response; HTTP/2:
//! GOAWAY), returning once all of them have. The caller bounds that wait with the
//! drain grace period.
//!
//! With `tls` (the inbound listener of a sidecar with `[tls]`), each accepted
//! connection first goes through [`InboundTls::accept`] on its own task (a
//! slow handshake never holds up the accept loop); a refused one is closed,
//! and the caller's identity of an mTLS connection is put into every request's
//! extensions ([`crate::tls::CallerIdentity`]).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http::{Request, Response};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt as _;

use crate::body::ProxyBody;
use crate::telemetry::io::Counted;
use crate::telemetry::metrics::ConnectionMetrics;
use crate::tls::accept::InboundTls;

/// Pause after a failed accept (e.g. out of file descriptors) before trying again.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

/// Serve `listener` until `stop`, building one service per connection with `make`
/// and counting connections and bytes into `connections`; with `tls`, every
/// connection is handshaken first.
pub async fn serve<F, S>(
    name: &'static str,
    listener: TcpListener,
    tls: Option<Arc<InboundTls>>,
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
        if let Some(tls) = &tls {
            let (tls, builder, watcher) = (Arc::clone(tls), builder.clone(), graceful.watcher());
            let (service, stream) = (make(peer), Counted::new(stream, &connections));
            tokio::spawn(async move {
                let (io, caller) = match tls.accept(stream).await {
                    Ok(accepted) => accepted,
                    Err(failure) => {
                        tracing::info!(listener = name, client.addr = %peer, error = %failure, "connection refused");
                        return;
                    }
                };
                let service = service.map_request(move |mut req: Request<Incoming>| {
                    if let Some(caller) = &caller {
                        req.extensions_mut().insert(caller.clone());
                    }
                    req
                });
                let conn = builder.serve_connection_with_upgrades(
                    TokioIo::new(io),
                    TowerToHyperService::new(service),
                );
                if let Err(error) = watcher.watch(conn.into_owned()).await {
                    tracing::debug!(listener = name, client.addr = %peer, %error, "connection ended with an error");
                }
            });
            continue;
        }
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
