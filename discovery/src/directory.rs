//! The directory as this sidecar sees it: every service it can call, and how.
//!
//! A [`Directory`] is an immutable snapshot built from the effective configuration:
//! the static services of `[directory]` (each with its endpoints, balancer, policy,
//! protocol and upstream client), the DNS discovery used for every other name, and
//! the local app behind the inbound listener. The request path reads the current
//! snapshot through a `watch` channel and never blocks a reload.
//!
//! [`Directory::rebuild`] makes the next snapshot on reload while carrying over
//! what must survive it: a service that is still present keeps its endpoint writer
//! (endpoint state and in-flight requests are untouched, its endpoints are updated
//! with a `Reset`), its upstream client and pooled connections when the connection
//! settings did not change, and the DNS resolver when `[dns]` did not change.
//!
//! With `[tls]`, a static service marked `tls = "mesh"` gets an mTLS client
//! that expects the service's identity; every other client is plaintext.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::sync::Arc;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use weft_config::{LoadBalancer, Loaded, Policy, Protocol, ServiceName, StaticService, TlsMode};

use weft_core::limits::Share;
use weft_core::policy::{InboundPolicy, OutboundPolicy};
use weft_core::stats::Stats;

use crate::balance::{Balancer, Endpoint};
use crate::dns::DnsDiscovery;
use crate::endpoints::{EndpointSpec, EndpointsReader, EndpointsWriter, Update};
use crate::slot::Slot;
use weft_transport::client::{ClientSettings, MeshPeer, UpstreamClient};
use weft_transport::tls::MeshTls;

/// A service in the directory.
#[derive(Debug)]
pub struct MeshService {
    pub name: ServiceName,
    /// The name as a metric label.
    pub label: Arc<str>,
    pub policy: Arc<OutboundPolicy>,
    pub protocol: Protocol,
    pub balancer: Balancer,
    pub client: Arc<UpstreamClient>,
    writer: Arc<EndpointsWriter>,
    endpoints: EndpointsReader,
    /// The sidecar's layer stack for this service, built on its first
    /// request and dropped with the service.
    pub stack: Slot,
}

impl MeshService {
    /// A service whose endpoints are written through `writer`.
    pub fn new(
        name: ServiceName,
        policy: Arc<OutboundPolicy>,
        protocol: Protocol,
        balancer: Balancer,
        client: Arc<UpstreamClient>,
        writer: Arc<EndpointsWriter>,
    ) -> Self {
        Self {
            label: Arc::from(name.as_str()),
            name,
            policy,
            protocol,
            balancer,
            client,
            endpoints: writer.subscribe(),
            writer,
            stack: Slot::default(),
        }
    }

    pub fn endpoints(&self) -> &EndpointsReader {
        &self.endpoints
    }

    /// The writer feeding this service's endpoints.
    pub fn writer(&self) -> &Arc<EndpointsWriter> {
        &self.writer
    }
}

/// The app behind the inbound listener.
#[derive(Debug)]
pub struct LocalApp {
    pub name: ServiceName,
    /// The name as a metric label.
    pub label: Arc<str>,
    pub addr: SocketAddr,
    /// The app as an endpoint (its address, made once), reached through the
    /// client's shared pools.
    pub endpoint: Arc<Endpoint>,
    pub client: Arc<UpstreamClient>,
    pub policy: Arc<InboundPolicy>,
    pub policy_source: PolicySource,
    /// The instance count service-wide limits are divided among.
    pub share: Share,
}

/// What the control plane says about the local service.
#[derive(Debug, Clone, PartialEq)]
pub struct OwnService {
    /// The policy its owner applied, if any.
    pub policy: Option<Arc<Policy>>,
    /// How many of its instances are registered now (this one included).
    pub live_instances: u32,
}

/// Where the local app's policy came from, for the admin API.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum PolicySource {
    ControlPlane,
    File,
    None,
}

/// The local app, its policy compiled for `own` when the control plane has
/// described the service, else for the bootstrap file. The pushed policy wins
/// over `[service] policy` (which remains the fallback until one is applied);
/// the live instance count wins over `[service] instances`.
fn build_local(
    loaded: &Loaded,
    previous: Option<&LocalApp>,
    own: Option<&OwnService>,
) -> Option<LocalApp> {
    let s = loaded.bootstrap.service.as_ref()?;
    let pushed = own.and_then(|o| o.policy.as_deref());
    let file = loaded.policies.get(&s.name);
    let (source, policy_source) = match (pushed, file) {
        (Some(p), _) => (Some(p), PolicySource::ControlPlane),
        (None, Some(p)) => (Some(p), PolicySource::File),
        (None, None) => (None, PolicySource::None),
    };
    let instances = own
        .map(|o| NonZeroU32::new(o.live_instances).unwrap_or(NonZeroU32::MIN))
        .unwrap_or(s.instances);
    let share = Share::new(instances);
    let settings = client_settings(loaded, source);
    let recompiled = !previous.is_some_and(|l| l.policy.compiled_from(source, share));
    if recompiled && loaded.bootstrap.tls.is_none() && source.is_some_and(has_allow_list) {
        tracing::warn!(
            service = %s.name,
            "the policy has allow lists but this sidecar has no [tls]: no caller has an identity, \
             so every request they cover is denied"
        );
    }
    let policy = match previous {
        Some(l) if l.policy.compiled_from(source, share) => Arc::clone(&l.policy),
        Some(l) => Arc::new(InboundPolicy::new(
            source,
            share,
            Arc::clone(&l.policy.stats),
            Some(&l.policy),
        )),
        None => Arc::new(InboundPolicy::new(
            source,
            share,
            Arc::new(Stats::default()),
            None,
        )),
    };
    Some(LocalApp {
        label: previous
            .filter(|l| l.name == s.name)
            .map_or_else(|| Arc::from(s.name.as_str()), |l| Arc::clone(&l.label)),
        name: s.name.clone(),
        addr: s.app,
        endpoint: match previous {
            Some(l) if l.addr == s.app => Arc::clone(&l.endpoint),
            _ => Arc::new(Endpoint::new(s.app, Default::default())),
        },
        client: reuse_client(previous.map(|l| &l.client), settings, None),
        policy,
        policy_source,
        share,
    })
}

/// Whether `policy` says who may call (`inbound.allow` or a route's `allow`).
fn has_allow_list(policy: &weft_config::Policy) -> bool {
    policy.inbound.allow.is_some() || policy.routes.iter().any(|r| r.allow.is_some())
}

/// One snapshot of everything the request path needs to route a request.
#[derive(Debug)]
pub struct Directory {
    services: HashMap<String, Arc<MeshService>>,
    dns: Arc<DnsDiscovery>,
    /// Balancer shared by names resolved through DNS and IP literals.
    pub dns_balancer: Balancer,
    /// Client for names resolved through DNS and IP literals.
    pub default_client: Arc<UpstreamClient>,
    /// Policy (the defaults) for names resolved through DNS and IP literals.
    pub default_policy: Arc<OutboundPolicy>,
    pub local: Option<LocalApp>,
    /// The local service's name and zone: the caller identity and locality of
    /// outbound requests.
    pub caller: Option<ServiceName>,
    /// `caller` as a `weft-caller` value, made once.
    pub caller_header: Option<http::HeaderValue>,
    pub caller_zone: Option<Arc<str>>,
}

pub fn client_settings(loaded: &Loaded, policy: Option<&Policy>) -> ClientSettings {
    let pool = &loaded.bootstrap.pool;
    let connect_timeout = policy
        .map(|p| p.outbound.connect_timeout.get())
        .unwrap_or_else(|| weft_config::Outbound::default().connect_timeout.get());
    ClientSettings {
        connect_timeout,
        idle_timeout: pool.idle_timeout.get(),
        max_idle_per_endpoint: usize::try_from(pool.max_idle_per_endpoint).unwrap_or(usize::MAX),
        mesh: false,
    }
}

fn specs(svc: &StaticService) -> Vec<EndpointSpec> {
    svc.endpoints
        .iter()
        .map(|e| EndpointSpec {
            addr: e.address,
            metadata: e.metadata.clone(),
            health: weft_api::Health::Healthy,
        })
        .collect()
}

/// `old` if it was made with `settings`, else a new client (mTLS to `mesh`
/// when `settings.mesh`).
pub fn reuse_client(
    old: Option<&Arc<UpstreamClient>>,
    settings: ClientSettings,
    mesh: Option<MeshPeer<'_>>,
) -> Arc<UpstreamClient> {
    match old {
        Some(c) if c.settings() == settings => Arc::clone(c),
        _ => Arc::new(UpstreamClient::new(settings, mesh)),
    }
}

impl Directory {
    /// Build the first snapshot.
    pub fn build(
        loaded: &Loaded,
        tls: Option<&MeshTls>,
        tasks: &TaskTracker,
        stop: &CancellationToken,
    ) -> Result<Self, String> {
        Self::rebuild(None, loaded, None, tls, tasks, stop)
    }

    /// This snapshot with the local app's policy recompiled for `own` (a
    /// control-plane update about the local service); everything else is
    /// shared with `self`.
    pub fn with_own(&self, loaded: &Loaded, own: Option<&OwnService>) -> Self {
        Self {
            services: self.services.clone(),
            dns: Arc::clone(&self.dns),
            dns_balancer: self.dns_balancer.clone(),
            default_client: self.default_client.clone(),
            default_policy: Arc::clone(&self.default_policy),
            local: build_local(loaded, self.local.as_ref(), own),
            caller: self.caller.clone(),
            caller_header: self.caller_header.clone(),
            caller_zone: self.caller_zone.clone(),
        }
    }

    /// Build the snapshot for `loaded`, carrying state over from `old`; `own`
    /// is what the control plane says about the local service, if anything;
    /// `tls` is this sidecar's mTLS, if `[tls]` is configured.
    pub fn rebuild(
        old: Option<&Directory>,
        loaded: &Loaded,
        own: Option<&OwnService>,
        tls: Option<&MeshTls>,
        tasks: &TaskTracker,
        stop: &CancellationToken,
    ) -> Result<Self, String> {
        let dns = match old {
            Some(d) if d.dns.settings() == &loaded.bootstrap.dns => Arc::clone(&d.dns),
            _ => Arc::new(DnsDiscovery::new(
                &loaded.bootstrap.dns,
                tasks.clone(),
                stop.child_token(),
            )),
        };
        let mut services = HashMap::new();
        for svc in &loaded.bootstrap.directory.services {
            let source = loaded.policies.get(&svc.name);
            let strategy = source
                .map(|p| p.outbound.load_balancer)
                .unwrap_or(LoadBalancer::P2cEwma);
            let previous = old.and_then(|d| d.services.get(svc.name.as_str()));
            if !previous.is_some_and(|p| p.policy.compiled_from(source)) {
                crate::enforcement::warn_if_unenforced(loaded, svc);
            }
            let policy = match previous {
                Some(p) if p.policy.compiled_from(source) => Arc::clone(&p.policy),
                Some(p) => Arc::new(OutboundPolicy::new(source, Arc::clone(&p.policy.stats))),
                None => Arc::new(OutboundPolicy::new(source, Arc::new(Stats::default()))),
            };
            let writer = match previous {
                Some(p) => {
                    p.writer.apply(Update::Reset(specs(svc)));
                    Arc::clone(&p.writer)
                }
                None => Arc::new(EndpointsWriter::new(specs(svc)).0),
            };
            let settings = ClientSettings {
                mesh: tls.is_some() && svc.tls == TlsMode::Mesh,
                ..client_settings(loaded, source)
            };
            let mesh = tls.map(|tls| MeshPeer {
                tls,
                service: &svc.name,
            });
            let client = reuse_client(previous.map(|p| &p.client), settings, mesh);
            let balancer = match previous {
                Some(p) if p.balancer.strategy() == strategy => p.balancer.clone(),
                _ => Balancer::new(strategy),
            };
            let service = MeshService::new(
                svc.name.clone(),
                policy,
                svc.protocol,
                balancer,
                client,
                writer,
            );
            services.insert(svc.name.as_str().to_owned(), Arc::new(service));
        }
        let default_settings = client_settings(loaded, None);
        let default_client = reuse_client(old.map(|d| &d.default_client), default_settings, None);
        let default_policy = match old {
            Some(d) => Arc::clone(&d.default_policy),
            None => Arc::new(OutboundPolicy::new(None, Arc::new(Stats::default()))),
        };
        let local = build_local(loaded, old.and_then(|d| d.local.as_ref()), own);
        let caller = loaded.bootstrap.service.as_ref().map(|s| s.name.clone());
        let caller_zone = loaded
            .bootstrap
            .service
            .as_ref()
            .and_then(|s| s.metadata.zone.as_deref())
            .map(Arc::from);
        let caller_header = caller
            .as_ref()
            .and_then(|c| http::HeaderValue::from_str(c.as_str()).ok());
        Ok(Self {
            services,
            dns,
            dns_balancer: Balancer::new(LoadBalancer::P2cEwma),
            default_client,
            default_policy,
            local,
            caller,
            caller_header,
            caller_zone,
        })
    }

    /// The directory service called `host`, if any.
    pub fn service(&self, host: &str) -> Option<&Arc<MeshService>> {
        self.services.get(host)
    }

    /// Every directory service, sorted by name.
    pub fn services(&self) -> Vec<&Arc<MeshService>> {
        let mut v: Vec<_> = self.services.values().collect();
        v.sort_by(|a, b| a.name.cmp(&b.name));
        v
    }

    pub fn dns(&self) -> &Arc<DnsDiscovery> {
        &self.dns
    }
}
