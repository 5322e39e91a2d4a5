//! Connections to endpoints: pooled, kept alive, HTTP/1.1 or HTTP/2.
//!
//! One [`UpstreamClient`] per service (so a service's connect timeout and pool
//! settings apply to it alone) makes hyper-util pooled clients: HTTP/1.1 with a
//! pool of keep-alive connections per endpoint, and HTTP/2 prior knowledge (h2c)
//! multiplexing requests over one connection per endpoint. Pools are keyed by the
//! endpoint address, which is always an IP literal here: names were resolved by
//! discovery before a request reaches this stage, so the connector never calls the
//! system resolver.
//!
//! A balanced endpoint keeps its own pools ([`EndpointPools`], made from its
//! service's client on first use): when discovery removes the endpoint, its
//! idle connections close as soon as the last request to it ends, instead of
//! lingering in a shared pool until the idle timeout (with endpoints churning,
//! that held a few megabytes of connection state for departed instances).
//! Requests without a balanced endpoint (the local app, passthrough) use the
//! client's shared pools.
//!
//! A meshed service (its endpoints are sidecars, and this sidecar has `[tls]`)
//! gets mTLS pools instead ([`MeshPeer`]): HTTP/2 over TLS with ALPN `h2` for
//! every request, and HTTP/1.1 over TLS (ALPN `http/1.1`) for upgrades. Their
//! connectors verify that the peer is that service, so these pools are keyed
//! by endpoint and expected identity together.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use http::Request;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::{Client, ResponseFuture};
use hyper_util::rt::{TokioExecutor, TokioTimer};
use weft_config::ServiceName;

use crate::tls::connect::MeshConnector;
use crate::tls::{ALPN_H2, ALPN_HTTP1, MeshTls};
use weft_core::body::ProxyBody;

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

impl Pools {
    fn request(&self, req: Request<ProxyBody>, http2: bool) -> ResponseFuture {
        match (self, http2) {
            (Pools::Plain { http2, .. }, true) => http2.request(req),
            (Pools::Plain { http1, .. }, false) => http1.request(req),
            (Pools::Mesh { http2, .. }, true) => http2.request(req),
            (Pools::Mesh { http1, .. }, false) => http1.request(req),
        }
    }
}

#[derive(Debug, Clone)]
enum Connectors {
    Plain(HttpConnector),
    Mesh {
        http1: MeshConnector,
        http2: MeshConnector,
    },
}

/// What makes a set of pools: the HTTP/1.1 and HTTP/2 builders and the connectors.
#[derive(Debug)]
struct Builders {
    http1: hyper_util::client::legacy::Builder,
    http2: hyper_util::client::legacy::Builder,
    connectors: Connectors,
}

impl Builders {
    fn build(&self) -> Pools {
        match &self.connectors {
            Connectors::Plain(connector) => Pools::Plain {
                http1: self.http1.build(connector.clone()),
                http2: self.http2.build(connector.clone()),
            },
            Connectors::Mesh { http1, http2 } => Pools::Mesh {
                http1: self.http1.build(http1.clone()),
                http2: self.http2.build(http2.clone()),
            },
        }
    }
}

/// Distinguishes clients, so an endpoint's pools are remade when its service's
/// client is (its settings changed on reload).
static NEXT_CLIENT_ID: AtomicU64 = AtomicU64::new(1);

/// Pooled HTTP/1.1 and HTTP/2 clients for one service.
#[derive(Debug, Clone)]
pub struct UpstreamClient {
    settings: ClientSettings,
    id: u64,
    builders: Arc<Builders>,
    /// For requests without a balanced endpoint.
    shared: Pools,
}

/// One endpoint's connection pools, made on first use from the client of the
/// request that needs them and dropped with the endpoint (closing its idle
/// connections).
#[derive(Debug, Default)]
pub struct EndpointPools {
    slot: Mutex<Option<(u64, Arc<Pools>)>>,
}

impl EndpointPools {
    fn for_client(&self, client: &UpstreamClient) -> Arc<Pools> {
        let mut slot = self.slot.lock().unwrap_or_else(PoisonError::into_inner);
        match &*slot {
            Some((id, pools)) if *id == client.id => Arc::clone(pools),
            _ => {
                let pools = Arc::new(client.builders.build());
                *slot = Some((client.id, Arc::clone(&pools)));
                pools
            }
        }
    }
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

        let mut http1 = Client::builder(TokioExecutor::new());
        http1
            .pool_timer(TokioTimer::new())
            .timer(TokioTimer::new())
            .pool_idle_timeout(settings.idle_timeout)
            .pool_max_idle_per_host(settings.max_idle_per_endpoint)
            // send(2) of one buffer rather than writev(2), as the server side.
            .http1_writev(false)
            // The Host header is the app's (the logical name); never rewrite it to
            // the endpoint address.
            .set_host(false);
        let mut http2 = http1.clone();
        http2
            .http2_only(true)
            .http2_adaptive_window(true)
            .http2_keep_alive_interval(Duration::from_secs(30))
            .http2_keep_alive_timeout(Duration::from_secs(10));
        let connectors = match mesh.filter(|_| settings.mesh) {
            None => Connectors::Plain(connector),
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
                Connectors::Mesh {
                    http1: tls(ALPN_HTTP1),
                    http2: tls(ALPN_H2),
                }
            }
        };
        let builders = Builders {
            http1,
            http2,
            connectors,
        };
        Self {
            settings,
            id: NEXT_CLIENT_ID.fetch_add(1, Ordering::Relaxed),
            shared: builders.build(),
            builders: Arc::new(builders),
        }
    }

    pub fn settings(&self) -> ClientSettings {
        self.settings
    }

    /// Whether this client speaks mTLS to sidecars (HTTP/2 but for upgrades).
    pub fn is_mesh(&self) -> bool {
        matches!(self.shared, Pools::Mesh { .. })
    }

    /// Send `req` (its URI already names the endpoint) over HTTP/2 or HTTP/1.1,
    /// through the endpoint's own pools when it has them.
    pub fn request(
        &self,
        req: Request<ProxyBody>,
        http2: bool,
        endpoint: Option<&EndpointPools>,
    ) -> ResponseFuture {
        match endpoint {
            Some(pools) => pools.for_client(self).request(req, http2),
            None => self.shared.request(req, http2),
        }
    }
}
