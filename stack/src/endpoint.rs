//! The endpoint client: send one try to one endpoint and bring its response
//! back. The innermost service of both stacks.
//!
//! Per try, the URI is pointed at the endpoint (`https` towards a sidecar
//! over mTLS), the HTTP version chosen for the hop (a hop to a sidecar over
//! mTLS is always HTTP/2, HTTP/1.1 for upgrades; otherwise the service's
//! `protocol`, the one the caller's sidecar asked for in `weft-protocol`, or
//! the request's own), `TE: trailers` named in `Connection` on an HTTP/1.1
//! hop, and the request sent over the endpoint's own connection pools (kept
//! with the endpoint, and dropped when discovery removes it). The response's
//! hop-by-hop headers are removed; a `101 Switching Protocols` answer to an
//! upgrade joins the two upgraded connections in a tracked task.
//!
//! Outbound, a try towards this sidecar's own outbound listener is refused
//! ([`ProxyError::Loop`]) instead of looping.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use http::header::HeaderValue;
use http::{Request, Response, StatusCode, Version};
use hyper::body::Incoming;
use hyper::upgrade::OnUpgrade;
use pin_project_lite::pin_project;
use tokio_util::task::TaskTracker;
use tower::Service;
use weft_config::Protocol;

use super::NewService;
use super::context::RequestContext;
use weft_core::body::ProxyBody;
use weft_core::error::ProxyError;
use weft_core::headers;
use weft_discovery::balance::Endpoint;
use weft_transport::client::UpstreamClient;
use weft_transport::forward::{self, WEFT_PROTOCOL, endpoint_uri, take_protocol};
use weft_transport::pool::{ResponseBody, SendFuture};

/// The HTTP version towards the endpoint's app.
#[derive(Debug, Clone, Copy)]
pub enum AppProtocol {
    /// Fixed (the service's `protocol`; `Auto`: the request's own).
    Fixed(Protocol),
    /// The one a caller's sidecar asked for in `weft-protocol` (inbound).
    Asked,
}

/// What every endpoint of one service shares.
#[derive(Debug, Clone)]
pub struct NewEndpoint {
    client: Arc<UpstreamClient>,
    protocol: AppProtocol,
    /// Whether the endpoints last beyond one request, so their own pools are
    /// worth keeping (an IP literal's endpoint is made per request: it uses
    /// the client's shared pools).
    endpoint_pools: bool,
    tasks: TaskTracker,
    /// This sidecar's outbound listener, which no try may go to.
    listener: Option<SocketAddr>,
}

impl NewEndpoint {
    pub fn new(client: Arc<UpstreamClient>, protocol: AppProtocol, tasks: TaskTracker) -> Self {
        Self {
            client,
            protocol,
            endpoint_pools: true,
            tasks,
            listener: None,
        }
    }

    /// Use the client's shared pools, not the endpoints' own.
    pub fn shared_pools(mut self) -> Self {
        self.endpoint_pools = false;
        self
    }

    /// Refuse tries towards `listener` (this sidecar's outbound listener).
    pub fn refuse_loops_to(mut self, listener: Option<SocketAddr>) -> Self {
        self.listener = listener;
        self
    }
}

impl NewService<Arc<Endpoint>> for NewEndpoint {
    type Service = EndpointClient;

    fn new_service(&self, endpoint: Arc<Endpoint>) -> EndpointClient {
        EndpointClient {
            endpoint,
            shared: self.clone(),
        }
    }
}

// ===== service =====

/// Sends tries to one endpoint.
#[derive(Debug, Clone)]
pub struct EndpointClient {
    endpoint: Arc<Endpoint>,
    shared: NewEndpoint,
}

impl EndpointClient {
    fn loops(&self) -> Option<ProxyError> {
        let endpoint = self.endpoint.addr();
        let listener = self.shared.listener?;
        let loops = listener == endpoint
            || (listener.ip().is_unspecified()
                && listener.port() == endpoint.port()
                && endpoint.ip().is_loopback());
        loops.then_some(ProxyError::Loop { listener })
    }
}

impl Service<Request<ProxyBody>> for EndpointClient {
    type Response = Response<ResponseBody>;
    type Error = ProxyError;
    type Future = ResponseFuture;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), ProxyError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<ProxyBody>) -> ResponseFuture {
        self.send(req)
    }
}

/// A request straight from a listener (inbound: tried once, never replayed).
impl Service<Request<Incoming>> for EndpointClient {
    type Response = Response<ResponseBody>;
    type Error = ProxyError;
    type Future = ResponseFuture;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), ProxyError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<Incoming>) -> ResponseFuture {
        self.send(req.map(weft_core::body::boxed))
    }
}

impl EndpointClient {
    fn send(&mut self, mut req: Request<ProxyBody>) -> ResponseFuture {
        let endpoint = self.endpoint.addr();
        if let Some(context) = RequestContext::of(&req) {
            context.set_endpoint(endpoint);
        }
        if let Some(refused) = self.loops() {
            return ResponseFuture::failed(endpoint, refused);
        }
        let downstream = forward::is_upgrade(&req).then(|| hyper::upgrade::on(&mut req));
        let upgrade = downstream.is_some();
        let protocol = match self.shared.protocol {
            AppProtocol::Fixed(protocol) => protocol,
            AppProtocol::Asked => take_protocol(req.headers_mut()),
        };
        let app_http2 = !upgrade
            && match protocol {
                Protocol::Http2 => true,
                Protocol::Http1 => false,
                Protocol::Auto => req.version() == Version::HTTP_2,
            };
        let client = &self.shared.client;
        let mesh = client.is_mesh();
        let http2 = app_http2 || (mesh && !upgrade);
        let path = req.uri().path_and_query().cloned();
        let path = path.unwrap_or_else(|| http::uri::PathAndQuery::from_static("/"));
        match endpoint_uri(endpoint, self.endpoint.authority(), &path, mesh) {
            Ok(uri) => *req.uri_mut() = uri,
            Err(error) => return ResponseFuture::failed(endpoint, error),
        }
        *req.version_mut() = if http2 {
            Version::HTTP_2
        } else {
            Version::HTTP_11
        };
        if !http2 && req.headers().contains_key(http::header::TE) {
            // `TE: trailers` (kept for gRPC) is hop-by-hop: on HTTP/1.1 it must
            // be named in `Connection`.
            headers::name_te_in_connection(req.headers_mut());
        }
        if mesh {
            let app = if app_http2 { "http2" } else { "http1" };
            req.headers_mut()
                .insert(&WEFT_PROTOCOL, HeaderValue::from_static(app));
        }
        let pools = self.shared.endpoint_pools.then(|| self.endpoint.pools());
        ResponseFuture {
            state: State::Sending {
                send: client.request(req, http2, endpoint, pools),
            },
            endpoint,
            upgrade: downstream.map(|down| (down, self.shared.tasks.clone())),
        }
    }
}

// ===== future =====

pin_project! {
    pub struct ResponseFuture {
        #[pin]
        state: State,
        endpoint: SocketAddr,
        upgrade: Option<(OnUpgrade, TaskTracker)>,
    }
}

pin_project! {
    #[project = StateProj]
    enum State {
        Sending { #[pin] send: SendFuture },
        Failed { error: Option<ProxyError> },
    }
}

impl ResponseFuture {
    fn failed(endpoint: SocketAddr, error: ProxyError) -> Self {
        Self {
            state: State::Failed { error: Some(error) },
            endpoint,
            upgrade: None,
        }
    }
}

impl Future for ResponseFuture {
    type Output = Result<Response<ResponseBody>, ProxyError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let endpoint = *this.endpoint;
        let sent = match this.state.project() {
            StateProj::Failed { error } => {
                return match error.take() {
                    Some(error) => Poll::Ready(Err(error)),
                    None => Poll::Pending,
                };
            }
            StateProj::Sending { send } => ready!(send.poll(cx)),
        };
        let mut rsp = sent.map_err(|source| forward::send_error(endpoint, source))?;
        let switching = rsp.status() == StatusCode::SWITCHING_PROTOCOLS;
        let upgrade = this.upgrade.take();
        headers::strip_hop_by_hop(rsp.headers_mut(), switching && upgrade.is_some());
        if let (true, Some((downstream, tasks))) = (switching, upgrade) {
            forward::join_upgrade(&tasks, endpoint, downstream, &mut rsp);
        }
        Poll::Ready(Ok(rsp))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use std::convert::Infallible;
    use std::time::Duration;

    use bytes::Bytes;
    use http_body_util::{BodyExt, Full};
    use hyper_util::rt::TokioIo;

    use super::*;
    use weft_core::body;
    use weft_transport::client::ClientSettings;

    /// An HTTP/1.1 app on 127.0.0.1 answering with the request target and
    /// version it got.
    async fn app() -> SocketAddr {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let echo = hyper::service::service_fn(|req: Request<Incoming>| async move {
                    let seen = format!("{} {:?}", req.uri(), req.version());
                    Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(seen))))
                });
                tokio::spawn(
                    hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), echo),
                );
            }
        });
        addr
    }

    fn client() -> Arc<UpstreamClient> {
        Arc::new(UpstreamClient::new(
            ClientSettings {
                connect_timeout: Duration::from_secs(5),
                idle_timeout: Duration::from_secs(30),
                max_idle_per_endpoint: 4,
                mesh: false,
            },
            None,
        ))
    }

    #[tokio::test]
    async fn a_try_reaches_its_endpoint_and_a_loop_is_refused() {
        let addr = app().await;
        let endpoint = Arc::new(Endpoint::new(addr, Default::default()));
        let new = NewEndpoint::new(
            client(),
            AppProtocol::Fixed(Protocol::Http1),
            TaskTracker::new(),
        );
        let req = || {
            Request::get("http://billing/charge?id=7")
                .header("host", "billing")
                .body(body::empty())
                .unwrap()
        };
        let rsp = new
            .new_service(Arc::clone(&endpoint))
            .call(req())
            .await
            .unwrap();
        let seen = rsp.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(
            seen, "/charge?id=7 HTTP/1.1",
            "origin form, to the endpoint"
        );

        let looping = new.refuse_loops_to(Some(addr));
        let refused = looping.new_service(endpoint).call(req()).await.unwrap_err();
        assert!(matches!(refused, ProxyError::Loop { .. }), "{refused}");
    }
}
