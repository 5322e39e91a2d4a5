//! DNS discovery for names that are not in the directory.
//!
//! The first request for a `host:port` creates an entry and starts one background
//! task for it; the request waits (bounded by the lookup deadline) for the first
//! answer. The task re-resolves when the answer's TTL runs out (clamped to
//! `[dns] min_ttl..max_ttl`) and publishes the addresses as an endpoint set, so the
//! balancer sees DNS changes as discovery updates like any other. A failed lookup
//! (timeout, SERVFAIL) keeps the last good addresses and retries sooner; an
//! authoritative "no such name" empties the set. An entry not requested for
//! `[dns] idle` is forgotten and its task ends.
//!
//! Requests never hang on DNS: every lookup runs under a deadline derived from the
//! configured per-query timeout and attempts.
//!
//! The resolver itself is built on the first lookup: a sidecar whose calls all
//! go to names in its directory never reads the system's resolver configuration
//! nor holds a resolver (less to do before the first request, less memory).
//! A resolver that cannot be built (an unreadable `/etc/resolv.conf`) fails
//! that lookup with the reason, and the next lookup tries again.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use hickory_resolver::TokioResolver;
use hickory_resolver::config::{NameServerConfig, ResolverConfig, ResolverOpts};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use weft_config::{Dns, Metadata};

use crate::endpoints::{EndpointSpec, EndpointsReader, EndpointsWriter, Update};
use weft_core::error::ProxyError;

/// Port used when the authority names none.
const DEFAULT_PORT: u16 = 80;
/// Retry delay after a failed lookup (bounded by min/max TTL).
const FAILURE_RETRY: Duration = Duration::from_secs(2);

/// What is known about a name.
#[derive(Debug, Clone, PartialEq)]
pub enum Status {
    /// The first lookup has not answered yet.
    Pending,
    /// At least one address.
    Resolved,
    /// The name does not exist or has no address records.
    NotFound,
    /// The last lookup failed; earlier addresses, if any, are still in use.
    Failed(String),
}

/// One resolved `host:port`.
#[derive(Debug)]
pub struct DnsTarget {
    host: String,
    port: u16,
    status: watch::Receiver<Status>,
    endpoints: EndpointsReader,
    last_used_ms: AtomicU64,
}

impl DnsTarget {
    pub fn host(&self) -> &str {
        &self.host
    }
    pub fn port(&self) -> u16 {
        self.port
    }
    pub fn endpoints(&self) -> &EndpointsReader {
        &self.endpoints
    }
    pub fn status(&self) -> Status {
        self.status.borrow().clone()
    }
}

/// The DNS resolver and the names it currently follows.
#[derive(Debug)]
pub struct DnsDiscovery {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    /// Built by the first lookup ([`Inner::resolver`]).
    resolver: OnceLock<TokioResolver>,
    settings: Dns,
    lookup_deadline: Duration,
    epoch: Instant,
    targets: Mutex<HashMap<(String, u16), Arc<DnsTarget>>>,
    tasks: TaskTracker,
    stop: CancellationToken,
}

/// Build a resolver from `[dns]`: the listed servers, or the system configuration.
fn build_resolver(settings: &Dns) -> Result<TokioResolver, String> {
    let provider = TokioRuntimeProvider::default();
    let mut builder = if settings.servers.is_empty() {
        TokioResolver::builder_tokio()
            .map_err(|e| format!("reading the system DNS configuration: {e}"))?
    } else {
        let servers = settings
            .servers
            .iter()
            .map(|addr| {
                let mut ns = NameServerConfig::udp_and_tcp(addr.ip());
                for conn in &mut ns.connections {
                    conn.port = addr.port();
                }
                ns
            })
            .collect();
        TokioResolver::builder_with_config(ResolverConfig::from_name_servers(servers), provider)
    };
    let opts: &mut ResolverOpts = builder.options_mut();
    opts.timeout = settings.timeout.get();
    opts.attempts = usize::from(settings.attempts);
    opts.positive_min_ttl = Some(settings.min_ttl.get());
    opts.positive_max_ttl = Some(settings.max_ttl.get());
    opts.negative_min_ttl = Some(settings.min_ttl.get());
    opts.negative_max_ttl = Some(settings.min_ttl.get().max(Duration::from_secs(1)));
    builder
        .build()
        .map_err(|e| format!("building the DNS resolver: {e}"))
}

impl DnsDiscovery {
    /// Start DNS discovery with `settings`. Tasks are tracked by `tasks` and stop
    /// when `stop` is cancelled or this value is dropped.
    pub fn new(settings: &Dns, tasks: TaskTracker, stop: CancellationToken) -> Self {
        let per_try = settings.timeout.get();
        let lookup_deadline =
            per_try * u32::from(settings.attempts.max(1)) + Duration::from_millis(250);
        Self {
            inner: Arc::new(Inner {
                resolver: OnceLock::new(),
                settings: settings.clone(),
                lookup_deadline,
                epoch: Instant::now(),
                targets: Mutex::new(HashMap::new()),
                tasks,
                stop,
            }),
        }
    }

    /// The settings this resolver was built with.
    pub fn settings(&self) -> &Dns {
        &self.inner.settings
    }

    /// Endpoints for `host:port`, waiting (bounded) for the first lookup.
    pub async fn resolve(
        &self,
        host: &str,
        port: Option<u16>,
    ) -> Result<Arc<DnsTarget>, ProxyError> {
        let port = port.unwrap_or(DEFAULT_PORT);
        let target = self.target(host, port);
        target
            .last_used_ms
            .store(self.inner.now_ms(), Ordering::Relaxed);
        let mut status = target.status.clone();
        let waited = tokio::time::timeout(
            self.inner.lookup_deadline,
            status.wait_for(|s| *s != Status::Pending),
        )
        .await;
        let current = match waited {
            Ok(Ok(s)) => s.clone(),
            Ok(Err(_)) | Err(_) => Status::Failed("the lookup did not finish in time".into()),
        };
        match current {
            Status::Resolved => Ok(target),
            Status::NotFound => Err(ProxyError::UnknownService {
                name: host.to_owned(),
            }),
            Status::Failed(message) => {
                if target.endpoints.borrow().is_empty() {
                    Err(ProxyError::Dns {
                        name: host.to_owned(),
                        message,
                    })
                } else {
                    Ok(target)
                }
            }
            Status::Pending => Err(ProxyError::Dns {
                name: host.to_owned(),
                message: "the lookup did not finish in time".into(),
            }),
        }
    }

    /// Every name currently followed (for the admin API).
    pub fn targets(&self) -> Vec<Arc<DnsTarget>> {
        let mut v: Vec<_> = self.inner.lock().values().cloned().collect();
        v.sort_by(|a, b| (&a.host, a.port).cmp(&(&b.host, b.port)));
        v
    }

    fn target(&self, host: &str, port: u16) -> Arc<DnsTarget> {
        let key = (host.to_owned(), port);
        let mut map = self.inner.lock();
        if let Some(t) = map.get(&key) {
            return Arc::clone(t);
        }
        let (status_tx, status_rx) = watch::channel(Status::Pending);
        let (writer, endpoints) = EndpointsWriter::new(Vec::new());
        let target = Arc::new(DnsTarget {
            host: host.to_owned(),
            port,
            status: status_rx,
            endpoints,
            last_used_ms: AtomicU64::new(self.inner.now_ms()),
        });
        map.insert(key, Arc::clone(&target));
        drop(map);
        let inner = Arc::clone(&self.inner);
        let task_target = Arc::clone(&target);
        self.inner.tasks.spawn(async move {
            inner.follow(task_target, writer, status_tx).await;
        });
        target
    }
}

impl Drop for DnsDiscovery {
    fn drop(&mut self) {
        self.inner.stop.cancel();
    }
}

impl Inner {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<(String, u16), Arc<DnsTarget>>> {
        match self.targets.lock() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        }
    }

    /// The resolver, built now if no lookup has needed it yet. Two first
    /// lookups at once may both build one; the second is dropped.
    fn resolver(&self) -> Result<&TokioResolver, String> {
        if let Some(resolver) = self.resolver.get() {
            return Ok(resolver);
        }
        let built = build_resolver(&self.settings)?;
        Ok(self.resolver.get_or_init(|| built))
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    fn clamp(&self, d: Duration) -> Duration {
        d.clamp(self.settings.min_ttl.get(), self.settings.max_ttl.get())
            .max(Duration::from_millis(100))
    }

    /// Resolve `target` until it goes idle or discovery stops.
    async fn follow(
        self: Arc<Self>,
        target: Arc<DnsTarget>,
        writer: EndpointsWriter,
        status: watch::Sender<Status>,
    ) {
        let name = target.host.clone();
        loop {
            let wait = match self.resolver() {
                Ok(resolver) => self.lookup(resolver, &target, &writer, &status).await,
                Err(message) => {
                    tracing::warn!(dns.name = %name, error = %message, "no DNS resolver; keeping the last addresses");
                    status.send_replace(Status::Failed(message));
                    self.clamp(FAILURE_RETRY)
                }
            };
            tokio::select! {
                () = self.stop.cancelled() => return,
                () = tokio::time::sleep(wait) => {}
            }
            let idle_ms = self
                .now_ms()
                .saturating_sub(target.last_used_ms.load(Ordering::Relaxed));
            if Duration::from_millis(idle_ms) >= self.settings.idle.get() {
                let key = (target.host.clone(), target.port);
                let mut map = self.lock();
                if map.get(&key).is_some_and(|t| Arc::ptr_eq(t, &target)) {
                    map.remove(&key);
                }
                tracing::debug!(dns.name = %name, "forgetting idle name");
                return;
            }
        }
    }

    /// One lookup of `target` with `resolver`, its answer published; returns
    /// how long to wait before the next.
    async fn lookup(
        &self,
        resolver: &TokioResolver,
        target: &DnsTarget,
        writer: &EndpointsWriter,
        status: &watch::Sender<Status>,
    ) -> Duration {
        let name = &target.host;
        match tokio::time::timeout(self.lookup_deadline, resolver.lookup_ip(name.as_str())).await {
            Ok(Ok(lookup)) => {
                let mut ips: Vec<IpAddr> = lookup.iter().collect();
                ips.sort();
                ips.dedup();
                let ttl = lookup
                    .valid_until()
                    .saturating_duration_since(Instant::now());
                let specs: Vec<EndpointSpec> = ips
                    .iter()
                    .map(|ip| EndpointSpec {
                        addr: SocketAddr::new(*ip, target.port),
                        metadata: Metadata::default(),
                        health: weft_api::Health::Healthy,
                    })
                    .collect();
                tracing::debug!(dns.name = %name, dns.addresses = ?ips, dns.ttl_ms = ttl.as_millis() as u64, "resolved");
                let found = !specs.is_empty();
                writer.apply(Update::Reset(specs));
                status.send_replace(if found {
                    Status::Resolved
                } else {
                    Status::NotFound
                });
                self.clamp(ttl)
            }
            Ok(Err(e)) if e.is_nx_domain() || e.is_no_records_found() => {
                tracing::debug!(dns.name = %name, "no such name");
                writer.apply(Update::Reset(Vec::new()));
                status.send_replace(Status::NotFound);
                self.clamp(Duration::ZERO).max(Duration::from_secs(1))
            }
            Ok(Err(e)) => {
                tracing::warn!(dns.name = %name, error = %e, "DNS lookup failed; keeping the last addresses");
                status.send_replace(Status::Failed(e.to_string()));
                self.clamp(FAILURE_RETRY)
            }
            Err(_) => {
                tracing::warn!(dns.name = %name, "DNS lookup timed out; keeping the last addresses");
                status.send_replace(Status::Failed("the lookup timed out".into()));
                self.clamp(FAILURE_RETRY)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[tokio::test]
    async fn the_resolver_is_built_by_the_first_lookup() {
        // A name server that never answers: the lookup times out, quickly.
        let silent = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let settings = Dns {
            servers: vec![silent.local_addr().unwrap()],
            timeout: Duration::from_millis(50).into(),
            attempts: 1,
            ..Dns::default()
        };
        let dns = DnsDiscovery::new(&settings, TaskTracker::new(), CancellationToken::new());
        assert!(
            dns.inner.resolver.get().is_none(),
            "built before any lookup"
        );
        let looked_up = dns.resolve("svc.example", Some(8080)).await;
        assert!(
            matches!(looked_up, Err(ProxyError::Dns { .. })),
            "{looked_up:?}"
        );
        assert!(
            dns.inner.resolver.get().is_some(),
            "not built by the lookup"
        );
    }
}
