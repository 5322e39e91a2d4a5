//! Connections to endpoints: pooled, kept alive, HTTP/1.1 or HTTP/2.
//!
//! One [`UpstreamClient`] per service (so a service's connect timeout and pool
//! settings apply to it alone) makes connection pools ([`crate::pool`]):
//! HTTP/1.1 with idle keep-alive connections per endpoint, and HTTP/2 prior
//! knowledge (h2c) multiplexing requests over one connection per endpoint.
//! Endpoints are IP literals here: names were resolved by discovery before a
//! request reaches this stage, so nothing calls the system resolver.
//!
//! A balanced endpoint keeps its own pool ([`EndpointPools`], made from its
//! service's client on first use): when discovery removes the endpoint, its
//! idle connections close as soon as the last request to it ends, instead of
//! lingering in a shared pool until the idle timeout. Requests without a
//! balanced endpoint (IP literals) use the client's shared pools, by address.
//!
//! A meshed service (its endpoints are sidecars, and this sidecar has `[tls]`)
//! gets mTLS pools instead ([`MeshPeer`]): HTTP/2 over TLS with ALPN `h2` for
//! every request, and HTTP/1.1 over TLS (ALPN `http/1.1`) for upgrades. Their
//! connectors verify that the peer is that service, so these pools are keyed
//! by endpoint and expected identity together.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use http::Request;
use weft_config::ServiceName;

use crate::pool::connect::Connector;
use crate::pool::{Pool, SendFuture};
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

/// Distinguishes clients, so an endpoint's pool is remade when its service's
/// client is (its settings changed on reload).
static NEXT_CLIENT_ID: AtomicU64 = AtomicU64::new(1);

/// Connections to the endpoints of one service.
#[derive(Debug)]
pub struct UpstreamClient {
    settings: ClientSettings,
    id: u64,
    connector: Arc<Connector>,
    /// Pools of requests without a balanced endpoint (IP literals), by address.
    shared: Mutex<HashMap<SocketAddr, Arc<Pool>>>,
}

/// One endpoint's connection pool, made on first use from the client of the
/// request that needs it and dropped with the endpoint (closing its idle
/// connections).
#[derive(Debug, Default)]
pub struct EndpointPools {
    slot: Mutex<Option<(u64, Arc<Pool>)>>,
}

impl EndpointPools {
    fn for_client(&self, client: &UpstreamClient, endpoint: SocketAddr) -> Arc<Pool> {
        let mut slot = self.slot.lock().unwrap_or_else(PoisonError::into_inner);
        match &*slot {
            Some((id, pool)) if *id == client.id => Arc::clone(pool),
            _ => {
                let pool = Arc::new(client.pool(endpoint));
                *slot = Some((client.id, Arc::clone(&pool)));
                pool
            }
        }
    }
}

impl UpstreamClient {
    /// Plaintext connections, or mTLS ones when `mesh` is given (and
    /// `settings.mesh` says so).
    pub fn new(settings: ClientSettings, mesh: Option<MeshPeer<'_>>) -> Self {
        let mesh = mesh.filter(|_| settings.mesh).map(|peer| {
            let tls =
                |alpn| MeshConnector::new(peer.tls, peer.service, alpn, settings.connect_timeout);
            (tls(ALPN_HTTP1), tls(ALPN_H2))
        });
        Self {
            settings,
            id: NEXT_CLIENT_ID.fetch_add(1, Ordering::Relaxed),
            connector: Arc::new(Connector {
                connect_timeout: settings.connect_timeout,
                idle_timeout: settings.idle_timeout,
                mesh,
            }),
            shared: Mutex::new(HashMap::new()),
        }
    }

    pub(crate) fn pool(&self, endpoint: SocketAddr) -> Pool {
        Pool::new(
            endpoint,
            Arc::clone(&self.connector),
            self.settings.max_idle_per_endpoint,
        )
    }

    pub fn settings(&self) -> ClientSettings {
        self.settings
    }

    /// Whether this client speaks mTLS to sidecars (HTTP/2 but for upgrades).
    pub fn is_mesh(&self) -> bool {
        self.connector.mesh.is_some()
    }

    /// Send `req` to `endpoint` (its URI names it) over HTTP/2 or HTTP/1.1,
    /// through the endpoint's own pool when it has one.
    pub fn request(
        &self,
        req: Request<ProxyBody>,
        http2: bool,
        endpoint: SocketAddr,
        pools: Option<&EndpointPools>,
    ) -> SendFuture {
        let pool = match pools {
            Some(pools) => pools.for_client(self, endpoint),
            None => self.shared_pool(endpoint),
        };
        pool.send(req, http2)
    }

    /// The shared pool for `endpoint`; pools left empty are dropped on the way.
    fn shared_pool(&self, endpoint: SocketAddr) -> Arc<Pool> {
        let mut shared = self.shared.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(pool) = shared.get(&endpoint) {
            return Arc::clone(pool);
        }
        shared.retain(|_, pool| Arc::strong_count(pool) > 1 || !pool.is_empty());
        let pool = Arc::new(self.pool(endpoint));
        shared.insert(endpoint, Arc::clone(&pool));
        pool
    }
}
