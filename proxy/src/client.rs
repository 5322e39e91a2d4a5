//! Connections to endpoints: pooled, kept alive, HTTP/1.1 or HTTP/2.
//!
//! One [`UpstreamClient`] per service (so a service's connect timeout and pool
//! settings apply to it alone) holds two hyper-util pooled clients: HTTP/1.1 with a
//! pool of keep-alive connections per endpoint, and HTTP/2 prior knowledge (h2c)
//! multiplexing requests over one connection per endpoint. Pools are keyed by the
//! endpoint address, which is always an IP literal here: names were resolved by
//! discovery before a request reaches this stage, so the connector never calls the
//! system resolver.
//!
//! A meshed service (its endpoints are sidecars, and this sidecar has `[tls]`)
//! gets mTLS pools instead ([`MeshPeer`]): HTTP/2 over TLS with ALPN `h2` for
//! every request, and HTTP/1.1 over TLS (ALPN `http/1.1`) for upgrades. Their
//! connectors verify that the peer is that service, so these pools are keyed
//! by endpoint and expected identity together.

use std::time::Duration;

use http::{Request, Response};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use weft_config::ServiceName;

use crate::body::ProxyBody;
use crate::tls::connect::MeshConnector;
use crate::tls::{ALPN_H2, ALPN_HTTP1, MeshTls};

/// Settings of one upstream client; equal settings let a reload keep the pools.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientSettings {
    pub connect_timeout: Duration,
    pub idle_timeout: Duration,
    pub max_idle_per_endpoint: usize,
    /// The endpoints are sidecars reached with mTLS.
    pub mesh: bool,
}

/// What a meshed service's client needs: this sidecar's TLS, and the service
/// its endpoints must prove to be.
#[derive(Debug, Clone, Copy)]
pub struct MeshPeer<'a> {
    pub tls: &'a MeshTls,
    pub service: &'a ServiceName,
}

#[derive(Debug, Clone)]
enum Pools {
    Plain {
        http1: Client<HttpConnector, ProxyBody>,
        http2: Client<HttpConnector, ProxyBody>,
    },
    Mesh {
        http1: Client<MeshConnector, ProxyBody>,
        http2: Client<MeshConnector, ProxyBody>,
    },
}

/// Pooled HTTP/1.1 and HTTP/2 clients for one service.
#[derive(Debug, Clone)]
pub struct UpstreamClient {
    settings: ClientSettings,
    pools: Pools,
}

impl UpstreamClient {
    /// Plaintext pools, or mTLS pools when `mesh` is given (and
    /// `settings.mesh` says so).
    pub fn new(settings: ClientSettings, mesh: Option<MeshPeer<'_>>) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(settings.connect_timeout));
        connector.set_keepalive(Some(Duration::from_secs(60)));
        connector.enforce_http(true);

        let mut builder = Client::builder(TokioExecutor::new());
        builder
            .pool_timer(TokioTimer::new())
            .timer(TokioTimer::new())
            .pool_idle_timeout(settings.idle_timeout)
            .pool_max_idle_per_host(settings.max_idle_per_endpoint)
            // send(2) of one buffer rather than writev(2), as the server side.
            .http1_writev(false)
            // The Host header is the app's (the logical name); never rewrite it to
            // the endpoint address.
            .set_host(false);
        let mut h2 = builder.clone();
        h2.http2_only(true)
            .http2_adaptive_window(true)
            .http2_keep_alive_interval(Duration::from_secs(30))
            .http2_keep_alive_timeout(Duration::from_secs(10));
        let pools = match mesh.filter(|_| settings.mesh) {
            None => Pools::Plain {
                http1: builder.build(connector.clone()),
                http2: h2.build(connector),
            },
            Some(peer) => {
                // The URI scheme is https for these hops.
                connector.enforce_http(false);
                let tls = |alpn| {
                    MeshConnector::new(
                        connector.clone(),
                        peer.tls,
                        peer.service,
                        alpn,
                        settings.connect_timeout,
                    )
                };
                Pools::Mesh {
                    http1: builder.build(tls(ALPN_HTTP1)),
                    http2: h2.build(tls(ALPN_H2)),
                }
            }
        };
        Self { settings, pools }
    }

    pub fn settings(&self) -> ClientSettings {
        self.settings
    }

    /// Whether this client speaks mTLS to sidecars (HTTP/2 but for upgrades).
    pub fn is_mesh(&self) -> bool {
        matches!(self.pools, Pools::Mesh { .. })
    }

    /// Send `req` (its URI already names the endpoint) over HTTP/2 or HTTP/1.1.
    pub async fn send(
        &self,
        req: Request<ProxyBody>,
        http2: bool,
    ) -> Result<Response<Incoming>, hyper_util::client::legacy::Error> {
        match (&self.pools, http2) {
            (Pools::Plain { http2, .. }, true) => http2.request(req).await,
            (Pools::Plain { http1, .. }, false) => http1.request(req).await,
            (Pools::Mesh { http2, .. }, true) => http2.request(req).await,
            (Pools::Mesh { http1, .. }, false) => http1.request(req).await,
        }
    }
}
