//! A small HTTP/1.1 + HTTP/2 server loop for the control plane's HTTP listeners,
//! stopping (gracefully, letting in-flight requests finish) on cancellation.

use std::convert::Infallible;
use std::future::Future;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// Serve `handler` on `listener` until `stop`.
pub async fn http<F, Fut>(listener: TcpListener, stop: CancellationToken, handler: F)
where
    F: Fn(Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Result<Response<Full<Bytes>>, Infallible>> + Send + 'static,
{
    let builder = auto::Builder::new(TokioExecutor::new());
    accept_loop(
        "admin",
        listener,
        stop,
        builder,
        hyper::service::service_fn(handler),
    )
    .await;
}

/// Serve a gRPC service (HTTP/2 only) on `listener` until `stop`.
pub async fn grpc<S>(listener: TcpListener, stop: CancellationToken, service: S)
where
    S: tower::Service<
            Request<Incoming>,
            Response = Response<tonic::body::Body>,
            Error = Infallible,
        > + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    let mut builder = auto::Builder::new(TokioExecutor::new()).http2_only();
    builder.http2().timer(hyper_util::rt::TokioTimer::new());
    let service = hyper_util::service::TowerToHyperService::new(service);
    accept_loop("gRPC", listener, stop, builder, service).await;
}

/// Accept until `stop`, serving each connection with `service`; then let open
/// connections finish (at most 5 s).
async fn accept_loop<S, B>(
    name: &'static str,
    listener: TcpListener,
    stop: CancellationToken,
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
    loop {
        let accepted = tokio::select! {
            () = stop.cancelled() => break,
            a = listener.accept() => a,
        };
        let Ok((stream, peer)) = accepted else {
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            continue;
        };
        let _ = stream.set_nodelay(true);
        let conn = builder
            .serve_connection(TokioIo::new(stream), service.clone())
            .into_owned();
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            if let Err(error) = conn.await {
                tracing::debug!(listener = name, client.addr = %peer, %error, "connection ended with an error");
            }
        });
    }
    drop(listener);
    let _ = tokio::time::timeout(std::time::Duration::from_secs(5), graceful.shutdown()).await;
}
