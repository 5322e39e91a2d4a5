//! Services learned from the control plane, shaped like the static directory's.
//!
//! The control-plane client keeps the latest accepted [`RemoteSnapshot`]; this
//! module follows it and maintains one [`MeshService`] per remote service, so the
//! outbound path treats a pushed service exactly like a static one. Across
//! snapshots a service keeps its endpoint writer (endpoint state and in-flight
//! requests survive; endpoints are updated with a `Reset`), its compiled policy
//! while the policy is unchanged (limiter state survives), its counters always,
//! and its connection pool.
//!
//! Pushed services are meshed: their endpoints are sidecars' inbound
//! listeners, so with `[tls]` their clients speak mTLS and expect the
//! service's identity.
//!
//! A name is subscribed lazily, on the first request for it: [`RemoteServices::get`]
//! asks the client to subscribe and waits, bounded, for the first state.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use weft_config::{LoadBalancer, Loaded, Protocol, ServiceName};

use crate::balance::Balancer;
use crate::control_plane::{ConnectionState, ControlPlaneClient, RemoteSnapshot};
use crate::directory::{MeshService, client_settings, reuse_client};
use crate::endpoints::{EndpointsWriter, Update};
use weft_core::policy::OutboundPolicy;
use weft_core::stats::Stats;
use weft_transport::client::{ClientSettings, MeshPeer};
use weft_transport::tls::MeshTls;

type Services = Arc<HashMap<String, Arc<MeshService>>>;

/// The remote services and the client they come from.
#[derive(Debug)]
pub struct RemoteServices {
    client: ControlPlaneClient,
    services: watch::Receiver<Services>,
}

impl RemoteServices {
    /// Follow `client`'s snapshots; `loaded` gives the connection-pool
    /// settings, `tls` this sidecar's mTLS (if `[tls]` is configured).
    pub fn start(
        client: ControlPlaneClient,
        loaded: &Loaded,
        tls: Option<Arc<MeshTls>>,
        tasks: &TaskTracker,
        stop: CancellationToken,
    ) -> Arc<Self> {
        let (tx, rx) = watch::channel(Services::default());
        let mut snapshots = client.snapshot();
        let pool = ClientSettings {
            mesh: tls.is_some(),
            ..client_settings(loaded, None)
        };
        tasks.spawn(async move {
            loop {
                let snapshot = Arc::clone(&snapshots.borrow_and_update());
                let next = rebuild(&tx.borrow(), &snapshot, pool, tls.as_deref());
                tx.send_replace(Arc::new(next));
                tokio::select! {
                    () = stop.cancelled() => return,
                    changed = snapshots.changed() => if changed.is_err() { return },
                }
            }
        });
        Arc::new(Self {
            client,
            services: rx,
        })
    }

    pub fn client(&self) -> &ControlPlaneClient {
        &self.client
    }

    /// The service called `name` if the control plane has described it
    /// already (never waits).
    pub fn get_now(&self, name: &str) -> Option<Arc<MeshService>> {
        self.services.borrow().get(name).cloned()
    }

    /// The service called `name`, subscribing to it on first use and waiting at
    /// most `wait` for the control plane's answer.
    pub async fn get(&self, name: &str, wait: Duration) -> Option<Arc<MeshService>> {
        if let Some(svc) = self.get_now(name) {
            return Some(svc);
        }
        ServiceName::try_from(name.to_owned()).ok()?;
        // While the control plane is unreachable, a name it never described is
        // not worth waiting for: go straight to the fallback (DNS).
        let wait = match self.client.state() {
            ConnectionState::Disconnected { .. } => Duration::ZERO,
            _ => wait,
        };
        let deadline = tokio::time::Instant::now() + wait;
        self.client.service(name, wait).await?;
        let mut rx = self.services.clone();
        let found = tokio::time::timeout_at(deadline, rx.wait_for(|m| m.contains_key(name))).await;
        match found {
            Ok(Ok(map)) => map.get(name).cloned(),
            _ => None,
        }
    }

    /// Every remote service, sorted by name (for the admin API).
    pub fn services(&self) -> Vec<Arc<MeshService>> {
        let map = Arc::clone(&self.services.borrow());
        let mut v: Vec<_> = map.values().cloned().collect();
        v.sort_by(|a, b| a.name.cmp(&b.name));
        v
    }
}

fn rebuild(
    old: &HashMap<String, Arc<MeshService>>,
    snapshot: &RemoteSnapshot,
    pool: ClientSettings,
    tls: Option<&MeshTls>,
) -> HashMap<String, Arc<MeshService>> {
    let mut next = HashMap::with_capacity(snapshot.services.len());
    for (name, remote) in &snapshot.services {
        let Ok(service_name) = ServiceName::try_from(name.clone()) else {
            continue;
        };
        let previous = old.get(name);
        let source = remote.policy.as_deref();
        let strategy = source.map_or(LoadBalancer::P2cEwma, |p| p.outbound.load_balancer);
        let policy = match previous {
            Some(p) if p.policy.compiled_from(source) => Arc::clone(&p.policy),
            Some(p) => Arc::new(OutboundPolicy::new(source, Arc::clone(&p.policy.stats))),
            None => Arc::new(OutboundPolicy::new(source, Arc::new(Stats::default()))),
        };
        let writer = match previous {
            Some(p) => {
                p.writer().apply(Update::Reset(remote.endpoints.clone()));
                Arc::clone(p.writer())
            }
            None => Arc::new(EndpointsWriter::new(remote.endpoints.clone()).0),
        };
        let settings = ClientSettings {
            connect_timeout: source.map_or_else(
                || weft_config::Outbound::default().connect_timeout.get(),
                |p| p.outbound.connect_timeout.get(),
            ),
            ..pool
        };
        let mesh = tls.map(|tls| MeshPeer {
            tls,
            service: &service_name,
        });
        let client = reuse_client(previous.map(|p| &p.client), settings, mesh);
        let balancer = match previous {
            Some(p) if p.balancer.strategy() == strategy => p.balancer.clone(),
            _ => Balancer::new(strategy),
        };
        // With mTLS, sidecars speak HTTP/2 to each other and the callee's
        // sidecar speaks the app's own protocol to its app; without, the app's
        // protocol is kept on the hop.
        let service = MeshService::new(
            service_name,
            policy,
            Protocol::Auto,
            balancer,
            client,
            writer,
        );
        next.insert(name.clone(), Arc::new(service));
    }
    next
}
