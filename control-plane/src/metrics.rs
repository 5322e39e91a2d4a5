//! The control plane's Prometheus metrics, served on the admin listener's
//! `GET /metrics` (no token, like `/live` and `/ready`).
//!
//! One [`Metrics`] is created at start and shared (`Arc`) by the store
//! wrapper ([`MeteredStore`]), the directory view, the push API and the admin
//! API. Every name below is prefixed `weft_control_plane_`; the process
//! metrics (`process_*`, from `weft-telemetry`) are not.
//!
//! | metric | type | labels | what it counts |
//! |---|---|---|---|
//! | `connected_sidecars` | gauge | | open Subscribe streams |
//! | `register_streams` | gauge | | open Register streams (accepted registrations whose stream is open) |
//! | `pushes_total` | counter | `kind` = `full`, `delta` | messages handed to Subscribe streams |
//! | `push_latency_seconds` | histogram | | for each delta a store change triggered: from the view applying the change that woke the stream to the message being handed to it (includes the 20 ms coalescing) |
//! | `watch_lag_seconds` | histogram | | for each put this replica made: from issuing it to the directory view applying its revision |
//! | `store_errors_total` | counter | `operation`, `error` | store calls that failed (every pair at 0 from the start) |
//! | `registrations_total` | counter | | Register streams accepted (instance written to the store; re-registrations after a lost lease are not counted) |
//! | `registrations_rejected_total` | counter | `reason` = `no-registration`, `invalid-instance`, `store-error` | Register streams refused |
//! | `deregistrations_total` | counter | | graceful deregistrations |
//! | `lease_expiries_total` | counter | | registrations held by this replica whose lease expired (see [`Metrics::lease_expired`]) |
//! | `directory_services`, `directory_instances` | gauge | | services and live instances in the view |
//! | `directory_revision` | gauge | | store revision of the last change the view reflects |
//! | `store_ready` | gauge | | 1 while the view follows the store, else 0 |
//! | `admin_requests_total` | counter | `method`, `route`, `status` | admin API requests answered |
//! | `tls_handshake_failures_total` | counter | `reason` | gRPC connections refused in the TLS handshake (with mTLS: every reason at 0 from the start) |
//! | `tls_certificate_expiry_timestamp_seconds` | gauge | | the gRPC listener certificate's notAfter (with mTLS only; [`Metrics::with_tls`]) |
//! | `admin_tls_handshake_failures_total` | counter | `reason` | admin connections refused in the TLS handshake (`handshake`, `timeout`), or speaking plain HTTP (`plaintext`); with admin TLS every reason at 0 from the start |
//! | `admin_tls_certificate_expiry_timestamp_seconds` | gauge | | the admin listener certificate's notAfter (with admin TLS only; [`Metrics::with_admin_tls`]) |
//! | `tasks` | gauge | | tasks running (see [`crate::tasks`]): listeners, connections, Register and Subscribe streams, lease-expiry checks, the view |

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Method, Response, StatusCode, header};
use http_body_util::Full;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use tokio::sync::watch;
use tokio::time::Instant;

use crate::store::{KeyValue, LeaseId, Revision, Store, StoreError, WatchStream};
use crate::view::DirectoryView;

/// The prefix of every control-plane metric.
pub const PREFIX: &str = "weft_control_plane";

/// Buckets of the latency histograms, in seconds.
const LATENCY_BUCKETS: [f64; 13] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// Puts awaiting their watch event; beyond this the oldest are forgotten
/// (only possible while the watch is down for thousands of writes).
const MAX_PENDING_WRITES: usize = 4096;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabels {
    kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StoreErrorLabels {
    operation: &'static str,
    error: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ListenerLabels {
    listener: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct AdminLabels {
    method: &'static str,
    route: &'static str,
    status: u16,
}

/// The `operation` label of `store_errors_total`: every [`Store`] call.
const STORE_OPERATIONS: [&str; 9] = [
    "put",
    "get",
    "delete",
    "list",
    "watch",
    "grant_lease",
    "keep_alive",
    "revoke",
    "compact",
];

/// The `error` label of `store_errors_total` (see [`Metrics::store_error`]).
const STORE_ERRORS: [&str; 6] = [
    "unavailable",
    "compacted",
    "lease-not-found",
    "too-large",
    "rejected",
    "malformed",
];

/// The `reason` label of `tls_handshake_failures_total`.
const TLS_FAILURES: [&str; 3] = ["handshake", "timeout", "identity"];
/// The `reason` label of `admin_tls_handshake_failures_total`.
const ADMIN_TLS_FAILURES: [&str; 3] = ["handshake", "plaintext", "timeout"];

/// Why a Register stream was refused (the `reason` label).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rejection {
    /// The stream ended or failed before its first message, or the first
    /// message was not `register`.
    NoRegistration,
    /// The instance failed validation.
    InvalidInstance,
    /// Writing the registration to the store failed.
    StoreError,
    /// The sidecar's certificate names another service than the instance's.
    IdentityMismatch,
}

impl Rejection {
    const ALL: [Rejection; 4] = [
        Rejection::NoRegistration,
        Rejection::InvalidInstance,
        Rejection::StoreError,
        Rejection::IdentityMismatch,
    ];

    fn as_str(self) -> &'static str {
        match self {
            Rejection::NoRegistration => "no-registration",
            Rejection::InvalidInstance => "invalid-instance",
            Rejection::StoreError => "store-error",
            Rejection::IdentityMismatch => "identity-mismatch",
        }
    }
}

/// One listener's counter of connections refused in the TLS handshake, by
/// reason (`handshake`, `timeout`; `identity` on the gRPC listener,
/// `plaintext` on the admin listener).
#[derive(Debug, Clone)]
pub struct TlsFailures(Family<ReasonLabels, Counter>);

impl TlsFailures {
    /// Counts one refused connection.
    pub fn inc(&self, reason: &'static str) {
        self.0.get_or_create(&ReasonLabels { reason }).inc();
    }
}

/// Puts by this replica whose revision the view has not applied yet.
#[derive(Debug, Default)]
struct PendingWrites {
    /// The newest revision the view applied.
    applied: Revision,
    issued_at: BTreeMap<Revision, Instant>,
}

/// The registry and a handle on every control-plane metric.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    connected_sidecars: Gauge,
    register_streams: Gauge,
    pushes: Family<KindLabels, Counter>,
    push_latency: Histogram,
    watch_lag: Histogram,
    store_errors: Family<StoreErrorLabels, Counter>,
    registrations: Counter,
    registrations_rejected: Family<ReasonLabels, Counter>,
    deregistrations: Counter,
    lease_expiries: Counter,
    directory_services: Gauge,
    directory_instances: Gauge,
    directory_revision: Gauge,
    store_ready: Gauge,
    admin_requests: Family<AdminLabels, Counter>,
    connections_refused: Family<ListenerLabels, Counter>,
    tls_handshake_failures: Family<ReasonLabels, Counter>,
    tls_certificate_expiry: Gauge,
    admin_tls_handshake_failures: Family<ReasonLabels, Counter>,
    admin_tls_certificate_expiry: Gauge,
    tasks: Gauge,
    pending_writes: Mutex<PendingWrites>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Every metric at zero, registered with the process collector.
    pub fn new() -> Self {
        let mut metrics = Metrics {
            registry: weft_telemetry::registry(),
            connected_sidecars: Gauge::default(),
            register_streams: Gauge::default(),
            pushes: Family::default(),
            push_latency: Histogram::new(LATENCY_BUCKETS),
            watch_lag: Histogram::new(LATENCY_BUCKETS),
            store_errors: Family::default(),
            registrations: Counter::default(),
            registrations_rejected: Family::default(),
            deregistrations: Counter::default(),
            lease_expiries: Counter::default(),
            directory_services: Gauge::default(),
            directory_instances: Gauge::default(),
            directory_revision: Gauge::default(),
            store_ready: Gauge::default(),
            admin_requests: Family::default(),
            connections_refused: Family::default(),
            tls_handshake_failures: Family::default(),
            tls_certificate_expiry: Gauge::default(),
            admin_tls_handshake_failures: Family::default(),
            admin_tls_certificate_expiry: Gauge::default(),
            tasks: Gauge::default(),
            pending_writes: Mutex::default(),
        };
        metrics.show_known_labels();
        metrics.register_all();
        metrics
    }

    /// Label values known in advance show up at 0 from the start.
    fn show_known_labels(&self) {
        for listener in ["grpc", "admin"] {
            drop(
                self.connections_refused
                    .get_or_create(&ListenerLabels { listener }),
            );
        }
        for kind in ["full", "delta"] {
            drop(self.pushes.get_or_create(&KindLabels { kind }));
        }
        for reason in Rejection::ALL {
            drop(self.registrations_rejected.get_or_create(&ReasonLabels {
                reason: reason.as_str(),
            }));
        }
        for operation in STORE_OPERATIONS {
            for error in STORE_ERRORS {
                drop(
                    self.store_errors
                        .get_or_create(&StoreErrorLabels { operation, error }),
                );
            }
        }
    }

    /// With mTLS on the gRPC listener: adds
    /// `tls_certificate_expiry_timestamp_seconds` (set through
    /// [`Metrics::tls_certificate_expiry`]) and shows every reason of
    /// `tls_handshake_failures_total` at 0.
    #[must_use]
    pub fn with_tls(mut self) -> Self {
        for reason in TLS_FAILURES {
            drop(
                self.tls_handshake_failures
                    .get_or_create(&ReasonLabels { reason }),
            );
        }
        self.registry.sub_registry_with_prefix(PREFIX).register(
            "tls_certificate_expiry_timestamp_seconds",
            "When the gRPC listener's certificate expires (its notAfter), in seconds since the Unix epoch",
            self.tls_certificate_expiry.clone(),
        );
        self
    }

    /// With TLS on the admin listener: adds
    /// `admin_tls_certificate_expiry_timestamp_seconds` (set through
    /// [`Metrics::admin_tls_certificate_expiry`]) and shows every reason of
    /// `admin_tls_handshake_failures_total` at 0.
    #[must_use]
    pub fn with_admin_tls(mut self) -> Self {
        for reason in ADMIN_TLS_FAILURES {
            drop(
                self.admin_tls_handshake_failures
                    .get_or_create(&ReasonLabels { reason }),
            );
        }
        self.registry.sub_registry_with_prefix(PREFIX).register(
            "admin_tls_certificate_expiry_timestamp_seconds",
            "When the admin listener's certificate expires (its notAfter), in seconds since the Unix epoch",
            self.admin_tls_certificate_expiry.clone(),
        );
        self
    }

    /// The gauge of the admin listener certificate's expiry, for
    /// [`crate::tls::ServerTls`] to set on every (re)load.
    pub fn admin_tls_certificate_expiry(&self) -> Gauge {
        self.admin_tls_certificate_expiry.clone()
    }

    /// Where the gRPC listener counts its refused handshakes.
    pub fn tls_failures(&self) -> TlsFailures {
        TlsFailures(self.tls_handshake_failures.clone())
    }

    /// Where the admin listener counts its refused handshakes.
    pub fn admin_tls_failures(&self) -> TlsFailures {
        TlsFailures(self.admin_tls_handshake_failures.clone())
    }

    /// The gauge of the gRPC listener certificate's expiry, for
    /// [`crate::tls::ServerTls`] to set on every (re)load.
    pub fn tls_certificate_expiry(&self) -> Gauge {
        self.tls_certificate_expiry.clone()
    }

    /// Registers every metric under [`PREFIX`].
    fn register_all(&mut self) {
        let m = self;
        let r = m.registry.sub_registry_with_prefix(PREFIX);
        // `register` appends a full stop to the help text; counters get
        // `_total` when encoded.
        r.register(
            "connected_sidecars",
            "Open Subscribe streams (sidecars receiving pushes)",
            m.connected_sidecars.clone(),
        );
        r.register(
            "register_streams",
            "Open Register streams (accepted registrations kept alive by this replica)",
            m.register_streams.clone(),
        );
        r.register(
            "pushes",
            "Messages handed to Subscribe streams, by kind (full snapshot or delta)",
            m.pushes.clone(),
        );
        r.register(
            "push_latency_seconds",
            "Time from the directory view applying the store change that woke a Subscribe stream to the delta being handed to the stream",
            m.push_latency.clone(),
        );
        r.register(
            "watch_lag_seconds",
            "Time from this replica issuing a store put to its directory view applying the put's revision",
            m.watch_lag.clone(),
        );
        r.register(
            "store_errors",
            "Store calls that failed, by operation and error",
            m.store_errors.clone(),
        );
        r.register(
            "registrations",
            "Register streams accepted (instance written to the store)",
            m.registrations.clone(),
        );
        r.register(
            "registrations_rejected",
            "Register streams refused, by reason",
            m.registrations_rejected.clone(),
        );
        r.register(
            "deregistrations",
            "Graceful deregistrations (lease revoked on the sidecar's request)",
            m.deregistrations.clone(),
        );
        r.register(
            "lease_expiries",
            "Registrations held by this replica whose lease expired",
            m.lease_expiries.clone(),
        );
        r.register(
            "directory_services",
            "Services in the directory view",
            m.directory_services.clone(),
        );
        r.register(
            "directory_instances",
            "Live instances in the directory view",
            m.directory_instances.clone(),
        );
        r.register(
            "directory_revision",
            "Store revision the directory view reflects",
            m.directory_revision.clone(),
        );
        r.register(
            "store_ready",
            "1 while the directory view follows the store, 0 while the store is unreachable",
            m.store_ready.clone(),
        );
        r.register(
            "admin_requests",
            "Admin API requests answered, by method, route and status",
            m.admin_requests.clone(),
        );
        r.register(
            "connections_refused",
            "Client connections closed at accept because the listener was at its connection limit, by listener",
            m.connections_refused.clone(),
        );
        r.register(
            "tls_handshake_failures",
            "Connections to the gRPC listener closed because the TLS handshake failed or the client certificate names no service of the trust domain, by reason",
            m.tls_handshake_failures.clone(),
        );
        r.register(
            "admin_tls_handshake_failures",
            "Connections to the TLS admin listener closed because the TLS handshake failed or the client spoke plain HTTP, by reason",
            m.admin_tls_handshake_failures.clone(),
        );
        r.register(
            "tasks",
            "Control-plane tasks running: listeners, connections, Register and Subscribe streams, lease-expiry checks, the directory view",
            m.tasks.clone(),
        );
    }

    /// The counter of connections `listener` (`grpc` or `admin`) refused.
    pub fn connections_refused(&self, listener: &'static str) -> Counter {
        self.connections_refused
            .get_or_create_owned(&ListenerLabels { listener })
    }

    /// The gauge of running tasks, for [`crate::tasks::Tasks`].
    pub fn tasks(&self) -> Gauge {
        self.tasks.clone()
    }

    /// The exposition, with the directory gauges taken from `view`.
    pub fn encode(&self, view: &DirectoryView) -> Result<String, weft_telemetry::EncodeError> {
        let instances: usize = view.services.values().map(|s| s.instances.len()).sum();
        self.directory_services
            .set(gauge_value(view.services.len()));
        self.directory_instances.set(gauge_value(instances));
        self.directory_revision.set(view.revision.0);
        self.store_ready.set(i64::from(view.live));
        weft_telemetry::encode(&self.registry)
    }

    /// A Subscribe stream opened; it counts as connected until the guard drops.
    pub fn subscriber_connected(&self) -> GaugeGuard {
        GaugeGuard::inc(&self.connected_sidecars)
    }

    /// A Register stream was accepted; it counts as open until the guard drops.
    pub fn registration_accepted(&self) -> GaugeGuard {
        self.registrations.inc();
        GaugeGuard::inc(&self.register_streams)
    }

    pub fn registration_rejected(&self, reason: Rejection) {
        self.registrations_rejected
            .get_or_create(&ReasonLabels {
                reason: reason.as_str(),
            })
            .inc();
    }

    pub fn deregistered(&self) {
        self.deregistrations.inc();
    }

    /// A lease this replica held for a registration expired: either the
    /// keep-alive found it gone while the sidecar's stream was open (the
    /// instance is then registered again), or the stream ended without a
    /// deregistration and the instance key was gone once the lease's TTL had
    /// passed (not registered again meanwhile).
    pub fn lease_expired(&self) {
        self.lease_expiries.inc();
    }

    /// A message was handed to a Subscribe stream. `woken_at`: when the view
    /// applied the store change that woke the stream, for a delta it caused.
    pub fn pushed(&self, full: bool, woken_at: Option<Instant>) {
        let kind = if full { "full" } else { "delta" };
        self.pushes.get_or_create(&KindLabels { kind }).inc();
        if let (false, Some(at)) = (full, woken_at) {
            self.push_latency.observe(at.elapsed().as_secs_f64());
        }
    }

    /// A store call failed.
    pub fn store_error(&self, operation: &'static str, error: &StoreError) {
        let error = match error {
            StoreError::Unavailable { .. } => "unavailable",
            StoreError::Compacted { .. } => "compacted",
            StoreError::LeaseNotFound(_) => "lease-not-found",
            StoreError::TooLarge { .. } => "too-large",
            StoreError::Rejected { .. } => "rejected",
            StoreError::Malformed { .. } => "malformed",
        };
        self.store_errors
            .get_or_create(&StoreErrorLabels { operation, error })
            .inc();
    }

    /// A put issued at `issued_at` was written at `revision`.
    fn put_done(&self, revision: Revision, issued_at: Instant) {
        let mut pending = self
            .pending_writes
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if revision <= pending.applied {
            drop(pending);
            self.watch_lag.observe(issued_at.elapsed().as_secs_f64());
            return;
        }
        pending.issued_at.insert(revision, issued_at);
        if pending.issued_at.len() > MAX_PENDING_WRITES {
            pending.issued_at.pop_first();
        }
    }

    /// The directory view applied everything up to `revision`.
    pub fn view_applied(&self, revision: Revision) {
        let mut pending = self
            .pending_writes
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        pending.applied = pending.applied.max(revision);
        let later = pending
            .issued_at
            .split_off(&Revision(revision.0.saturating_add(1)));
        let done = std::mem::replace(&mut pending.issued_at, later);
        drop(pending);
        for issued_at in done.into_values() {
            self.watch_lag.observe(issued_at.elapsed().as_secs_f64());
        }
    }

    /// An admin request was answered (`route` from [`admin_route`]).
    pub fn admin_request(&self, method: &Method, route: &'static str, status: StatusCode) {
        let method = match *method {
            Method::GET => "GET",
            Method::PUT => "PUT",
            Method::POST => "POST",
            Method::DELETE => "DELETE",
            Method::HEAD => "HEAD",
            _ => "other",
        };
        self.admin_requests
            .get_or_create(&AdminLabels {
                method,
                route,
                status: status.as_u16(),
            })
            .inc();
    }
}

fn gauge_value(n: usize) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// The `route` label of an admin request: its path with names replaced.
pub fn admin_route(path: &str) -> &'static str {
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    match segments.as_slice() {
        ["live"] => "/live",
        ["ready"] => "/ready",
        ["metrics"] => "/metrics",
        ["v1", "services"] => "/v1/services",
        ["v1", "services", _] => "/v1/services/{name}",
        ["v1", "services", _, "policy"] => "/v1/services/{name}/policy",
        ["ui", ..] => "/ui",
        _ => "other",
    }
}

/// The answer to `GET /metrics`.
pub fn respond(
    metrics: &Metrics,
    view: &watch::Receiver<Arc<DirectoryView>>,
) -> Response<Full<Bytes>> {
    let view = Arc::clone(&view.borrow());
    let (status, content_type, body) = match metrics.encode(&view) {
        Ok(text) => (StatusCode::OK, weft_telemetry::CONTENT_TYPE, text),
        Err(e) => {
            tracing::error!(error = %e, "encoding the metrics failed");
            (
                StatusCode::INTERNAL_SERVER_ERROR,
                "text/plain; charset=utf-8",
                format!("{e}\n"),
            )
        }
    };
    let mut rsp = Response::new(Full::new(Bytes::from(body)));
    *rsp.status_mut() = status;
    rsp.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    rsp
}

/// Decrements its gauge when dropped.
#[derive(Debug)]
pub struct GaugeGuard(Gauge);

impl GaugeGuard {
    pub(crate) fn inc(gauge: &Gauge) -> Self {
        gauge.inc();
        GaugeGuard(gauge.clone())
    }
}

impl Drop for GaugeGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// A [`Store`] that counts failed calls (`store_errors_total`) and times
/// puts until the view applies them (`watch_lag_seconds`).
#[derive(Debug, Clone)]
pub struct MeteredStore<S> {
    inner: S,
    metrics: Arc<Metrics>,
}

impl<S> MeteredStore<S> {
    pub fn new(inner: S, metrics: Arc<Metrics>) -> Self {
        MeteredStore { inner, metrics }
    }

    fn count<T>(
        &self,
        operation: &'static str,
        result: Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        if let Err(e) = &result {
            self.metrics.store_error(operation, e);
        }
        result
    }
}

impl<S: Store> Store for MeteredStore<S> {
    async fn put(
        &self,
        key: &str,
        value: Bytes,
        lease: Option<LeaseId>,
    ) -> Result<Revision, StoreError> {
        let issued_at = Instant::now();
        let result = self.inner.put(key, value, lease).await;
        if let Ok(revision) = &result {
            self.metrics.put_done(*revision, issued_at);
        }
        self.count("put", result)
    }

    async fn get(&self, key: &str) -> Result<Option<KeyValue>, StoreError> {
        self.count("get", self.inner.get(key).await)
    }

    async fn delete(&self, key: &str) -> Result<bool, StoreError> {
        self.count("delete", self.inner.delete(key).await)
    }

    async fn list(&self, prefix: &str) -> Result<(Vec<KeyValue>, Revision), StoreError> {
        self.count("list", self.inner.list(prefix).await)
    }

    /// Errors the stream yields later are counted by its reader (the view).
    async fn watch(&self, prefix: &str, from: Revision) -> Result<WatchStream, StoreError> {
        self.count("watch", self.inner.watch(prefix, from).await)
    }

    async fn grant_lease(&self, ttl: Duration) -> Result<LeaseId, StoreError> {
        self.count("grant_lease", self.inner.grant_lease(ttl).await)
    }

    async fn keep_alive(&self, lease: LeaseId) -> Result<(), StoreError> {
        self.count("keep_alive", self.inner.keep_alive(lease).await)
    }

    async fn revoke(&self, lease: LeaseId) -> Result<(), StoreError> {
        self.count("revoke", self.inner.revoke(lease).await)
    }

    async fn compact(&self, revision: Revision) -> Result<(), StoreError> {
        self.count("compact", self.inner.compact(revision).await)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::store::memory::{MemoryOptions, MemoryStore};

    fn sample(text: &str, series: &str) -> Option<f64> {
        text.lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
            .map(|v| v.parse().unwrap())
    }

    #[test]
    fn admin_routes_hide_names() {
        assert_eq!(admin_route("/v1/services/billing"), "/v1/services/{name}");
        assert_eq!(
            admin_route("/v1/services/billing/policy"),
            "/v1/services/{name}/policy"
        );
        assert_eq!(admin_route("/metrics"), "/metrics");
        assert_eq!(admin_route("/v1/services/a/b/c"), "other");
    }

    #[tokio::test]
    async fn store_errors_and_watch_lag_are_counted() {
        let metrics = Arc::new(Metrics::new());
        let text = metrics.encode(&DirectoryView::default()).unwrap();
        // Every operation and error shows at 0 before the first failure.
        assert_eq!(
            sample(
                &text,
                "weft_control_plane_store_errors_total{operation=\"put\",error=\"rejected\"}"
            ),
            Some(0.0),
            "{text}"
        );
        assert_eq!(
            text.lines()
                .filter(|l| l.starts_with("weft_control_plane_store_errors_total{"))
                .count(),
            STORE_OPERATIONS.len() * STORE_ERRORS.len()
        );
        let store = MeteredStore::new(
            MemoryStore::new(MemoryOptions::default()),
            Arc::clone(&metrics),
        );
        assert!(store.put("", Bytes::new(), None).await.is_err());
        assert!(store.keep_alive(LeaseId(42)).await.is_err());
        let r1 = store
            .put("a", Bytes::from_static(b"1"), None)
            .await
            .unwrap();
        let r2 = store
            .put("b", Bytes::from_static(b"2"), None)
            .await
            .unwrap();
        metrics.view_applied(r1);
        let text = metrics.encode(&DirectoryView::default()).unwrap();
        let p = "weft_control_plane_";
        assert_eq!(
            sample(
                &text,
                &format!("{p}store_errors_total{{operation=\"put\",error=\"rejected\"}}")
            ),
            Some(1.0),
            "{text}"
        );
        assert_eq!(
            sample(
                &text,
                &format!(
                    "{p}store_errors_total{{operation=\"keep_alive\",error=\"lease-not-found\"}}"
                )
            ),
            Some(1.0)
        );
        assert_eq!(
            sample(&text, &format!("{p}watch_lag_seconds_count")),
            Some(1.0)
        );
        metrics.view_applied(r2);
        // A put whose revision the view already applied counts at once.
        metrics.put_done(r2, Instant::now());
        let text = metrics.encode(&DirectoryView::default()).unwrap();
        assert_eq!(
            sample(&text, &format!("{p}watch_lag_seconds_count")),
            Some(3.0)
        );
        assert_eq!(sample(&text, &format!("{p}store_ready")), Some(0.0));
        assert_eq!(
            sample(&text, &format!("{p}pushes_total{{kind=\"full\"}}")),
            Some(0.0)
        );
        assert!(sample(&text, "process_open_fds").is_some(), "{text}");
    }
}
