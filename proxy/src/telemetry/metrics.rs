//! The sidecar's Prometheus metrics (names and labels: `docs/telemetry.md`).
//!
//! Request-path metrics are recorded as they happen ([`Metrics::record`],
//! [`Metrics::retry`], ...): label sets are made of `Arc<str>` names the
//! directory already holds and static strings, so recording clones two `Arc`s
//! and takes the family's read lock. State that already lives elsewhere
//! (endpoint states, the control-plane connection, the config version) is
//! copied into gauges when `/metrics` is scraped or the metrics are exported
//! over OTLP, so the request path never pays for it: the sidecar hands that
//! state in through [`GaugeSource`], and telemetry knows none of its types.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::encoding::prometheus_protobuf::{self, prometheus_data_model::MetricFamily};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use super::callers::Callers;
use super::series;
use weft_core::context::{ColdStartOutcome, FaultKind, HedgeOutcome};
pub use weft_transport::io::ConnectionMetrics;

/// Latency buckets, in seconds: 0.5 ms to 10 s.
const LATENCY_BUCKETS: [f64; 14] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// Which listener a request or connection came through.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Direction {
    Inbound,
    Outbound,
}

impl Direction {
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Inbound => "inbound",
            Self::Outbound => "outbound",
        }
    }
}

/// How a request ended, for `classification`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Classification {
    Success,
    Failure,
    /// A fault was injected (`routes[].fault`): kept apart from the other
    /// two so that SLOs can leave it out.
    InjectedFault,
}

impl Classification {
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Success => "success",
            Self::Failure => "failure",
            Self::InjectedFault => "injected-fault",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    direction: &'static str,
    caller: Arc<str>,
    service: Arc<str>,
    route: Arc<str>,
    status_code: u16,
    classification: &'static str,
}

/// Every finished request looks its labels up twice (counter and histogram),
/// in maps hashed with SipHash, whose cost grows with each write: the labels
/// are folded into one word first (FNV-1a). Equal labels fold to equal words,
/// as `Hash` requires; a collision only costs a comparison.
impl std::hash::Hash for RequestLabels {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        const PRIME: u64 = 0x0000_0100_0000_01b3;
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        let mut eat = |bytes: &[u8]| {
            for &b in bytes {
                h = (h ^ u64::from(b)).wrapping_mul(PRIME);
            }
            // A separator, so that ("ab", "c") and ("a", "bc") differ.
            h = (h ^ 0xff).wrapping_mul(PRIME);
        };
        eat(self.direction.as_bytes());
        eat(self.caller.as_bytes());
        eat(self.service.as_bytes());
        eat(self.route.as_bytes());
        eat(&self.status_code.to_le_bytes());
        eat(self.classification.as_bytes());
        state.write_u64(h);
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct RefusalLabels {
    direction: &'static str,
    caller: Arc<str>,
    service: Arc<str>,
    route: Arc<str>,
    reason: &'static str,
    limit: Arc<str>,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct RouteLabels {
    service: Arc<str>,
    route: Arc<str>,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct SkipLabels {
    service: Arc<str>,
    route: Arc<str>,
    reason: &'static str,
}

/// A route of a service, for [`Gauges::service_counters`]: which of its
/// counters exist.
#[derive(Debug, Clone, Copy)]
pub struct RouteCounters<'r> {
    pub label: &'r Arc<str>,
    /// Its requests may be retried.
    pub retried: bool,
    /// It has `hedge`.
    pub hedged: bool,
    /// It has `fault`.
    pub faulted: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct HedgeLabels {
    service: Arc<str>,
    route: Arc<str>,
    outcome: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct FaultLabels {
    service: Arc<str>,
    route: Arc<str>,
    kind: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct ServiceLabels {
    service: Arc<str>,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct OutcomeLabels {
    service: Arc<str>,
    outcome: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct EndpointLabels {
    service: Arc<str>,
    state: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct AdaptiveLabels {
    direction: &'static str,
    service: Arc<str>,
    /// The endpoint's address outbound, `""` inbound (the instance's own).
    endpoint: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct DirectionLabels {
    direction: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct TlsFailureLabels {
    direction: &'static str,
    reason: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct ResultLabels {
    result: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct ReasonLabels {
    reason: &'static str,
}

/// The `reason`s of inbound `weft_tls_handshake_failures_total`.
const INBOUND_TLS_FAILURES: &[&str] = &["plaintext", "certificate", "timeout", "error"];
/// The `reason`s of outbound `weft_tls_handshake_failures_total`.
const OUTBOUND_TLS_FAILURES: &[&str] = &["certificate", "timeout", "error"];

/// Why a retry the route allowed was not sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RetrySkipped {
    BudgetExhausted,
    NotReplayable,
    NoEndpoint,
}

impl RetrySkipped {
    const ALL: [Self; 3] = [Self::BudgetExhausted, Self::NotReplayable, Self::NoEndpoint];

    const fn as_str(self) -> &'static str {
        match self {
            Self::BudgetExhausted => "budget-exhausted",
            Self::NotReplayable => "not-replayable",
            Self::NoEndpoint => "no-endpoint",
        }
    }
}

/// How a call to a service's activator ended (`outbound.cold_start.activate`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ActivatorOutcome {
    /// A 2xx answer.
    Success,
    /// Another status, or no answer (DNS, connect or request failure).
    Failure,
    /// No answer within the activator's timeout.
    Timeout,
}

impl ActivatorOutcome {
    const ALL: [Self; 3] = [Self::Success, Self::Failure, Self::Timeout];

    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Success => "success",
            Self::Failure => "failure",
            Self::Timeout => "timeout",
        }
    }
}

/// One finished request, as [`Metrics::record`] takes it.
#[derive(Debug)]
pub struct Finished<'a> {
    pub direction: Direction,
    /// The `caller` label ([`Callers`]).
    pub caller: &'a Arc<str>,
    pub service: &'a Arc<str>,
    pub route: &'a Arc<str>,
    pub status_code: u16,
    pub classification: Classification,
    pub duration: Duration,
}

/// Counters of the span pipeline ([`super::trace`]); zero without
/// `[telemetry] otlp_endpoint`.
#[derive(Debug, Clone, Default)]
pub struct SpanMetrics {
    /// Spans the collector accepted.
    pub exported: Counter,
    /// Spans dropped because the export queue was full (or closed).
    pub queue_full: Counter,
    /// Spans dropped because their batch could not be exported.
    pub export_failed: Counter,
}

/// Counters of the OTLP metrics export ([`super::otlp_metrics`]); zero
/// without `[telemetry] otlp_metrics`.
#[derive(Debug, Clone, Default)]
pub struct OtlpExportMetrics {
    /// Export requests the collector accepted.
    pub success: Counter,
    /// Export requests that failed, timed out, or were (partly) rejected.
    pub failure: Counter,
}

/// The state that lives elsewhere (the local app's health, the config
/// version, the outbound endpoints, the control-plane client), copied into
/// gauges each time the metrics are read ([`Metrics::render`],
/// [`Metrics::collect`]). The sidecar implements it over its live state, so
/// telemetry knows none of the types that hold that state.
pub trait GaugeSource: Send + Sync {
    /// Writes the current values into `gauges`: every service's endpoints
    /// and retry budgets (those not written are gone), the rest when known.
    fn refresh(&self, gauges: &mut Gauges<'_>);
}

/// One service's outbound endpoints, by state (`weft_endpoints`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct EndpointStates {
    pub active: i64,
    pub ejected: i64,
    pub saturated: i64,
    pub unhealthy: i64,
}

/// The control-plane client, as its gauges show it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ControlPlaneStatus {
    /// A session is up.
    pub connected: bool,
    /// The version (store revision) of the last snapshot applied.
    pub version: i64,
    /// Pushed services refused by validation since start (a running total).
    pub rejected: u64,
}

/// Where a [`GaugeSource`] writes its values, during one refresh.
#[derive(Debug)]
pub struct Gauges<'a> {
    metrics: &'a Metrics,
}

impl Gauges<'_> {
    /// `weft_proxy_app_healthy` (exported only with `[service]`).
    pub fn app_healthy(&mut self, healthy: bool) {
        self.metrics.app_healthy.set(i64::from(healthy));
    }

    /// `weft_config_version`.
    pub fn config_version(&mut self, version: u64) {
        self.metrics
            .config_version
            .set(i64::try_from(version).unwrap_or(i64::MAX));
    }

    /// `weft_endpoints` of `service`.
    pub fn endpoints(&mut self, service: &Arc<str>, states: EndpointStates) {
        let EndpointStates {
            active,
            ejected,
            saturated,
            unhealthy,
        } = states;
        for (state, n) in [
            ("active", active),
            ("ejected", ejected),
            ("saturated", saturated),
            ("unhealthy", unhealthy),
        ] {
            self.metrics
                .endpoints
                .get_or_create(&EndpointLabels {
                    service: Arc::clone(service),
                    state,
                })
                .set(n);
        }
    }

    /// `weft_adaptive_concurrency_limit`: an adaptive limit's current value,
    /// of one outbound endpoint (its address) or of this instance (inbound,
    /// endpoint `""`).
    pub fn adaptive_limit(
        &mut self,
        direction: Direction,
        service: &Arc<str>,
        endpoint: String,
        limit: u32,
    ) {
        self.metrics
            .adaptive_limits
            .get_or_create(&AdaptiveLabels {
                direction: direction.as_str(),
                service: Arc::clone(service),
                endpoint,
            })
            .set(i64::from(limit));
    }

    /// `weft_retry_budget_available_retries` of one route of `service`.
    pub fn retry_budget(&mut self, service: &Arc<str>, route: &Arc<str>, available: u64) {
        self.metrics
            .budgets
            .get_or_create(&RouteLabels {
                service: Arc::clone(service),
                route: Arc::clone(route),
            })
            .set(i64::try_from(available).unwrap_or(i64::MAX));
    }

    /// Shows `service`'s counters at 0 before their first event, so that
    /// `increase()` and `rate()` see that event: `weft_ejections_total`, and
    /// for each of `routes`, with every label value, `weft_retries_total`
    /// and `weft_retries_skipped_total` (routes whose requests may be
    /// retried), `weft_hedges_total` (hedged routes) and
    /// `weft_injected_faults_total` (routes with a fault). Counters already
    /// counting are left as they are.
    pub fn service_counters<'r>(
        &mut self,
        service: &Arc<str>,
        routes: impl IntoIterator<Item = RouteCounters<'r>>,
    ) {
        let m = self.metrics;
        drop(m.ejections.get_or_create(&ServiceLabels {
            service: Arc::clone(service),
        }));
        for route in routes {
            let (service, label) = (|| Arc::clone(service), || Arc::clone(route.label));
            if route.retried {
                drop(m.retries.get_or_create(&RouteLabels {
                    service: service(),
                    route: label(),
                }));
                for why in RetrySkipped::ALL {
                    drop(m.retries_skipped.get_or_create(&SkipLabels {
                        service: service(),
                        route: label(),
                        reason: why.as_str(),
                    }));
                }
            }
            if route.hedged {
                for outcome in HedgeOutcome::ALL {
                    drop(m.hedges.get_or_create(&HedgeLabels {
                        service: service(),
                        route: label(),
                        outcome: outcome.as_str(),
                    }));
                }
            }
            if route.faulted {
                for kind in FaultKind::ALL {
                    drop(m.injected_faults.get_or_create(&FaultLabels {
                        service: service(),
                        route: label(),
                        kind: kind.as_str(),
                    }));
                }
            }
        }
    }

    /// `weft_cold_start_held` of a service with `outbound.cold_start`; shows
    /// its `weft_cold_start_total` (and, with an activator,
    /// `weft_activator_calls_total`) at 0 before their first event.
    pub fn cold_start(&mut self, service: &Arc<str>, held: u32, activator: bool) {
        let m = self.metrics;
        m.cold_start_held
            .get_or_create(&ServiceLabels {
                service: Arc::clone(service),
            })
            .set(i64::from(held));
        for outcome in ColdStartOutcome::ALL {
            drop(m.cold_starts.get_or_create(&OutcomeLabels {
                service: Arc::clone(service),
                outcome: outcome.as_str(),
            }));
        }
        if activator {
            for outcome in ActivatorOutcome::ALL {
                drop(m.activator_calls.get_or_create(&OutcomeLabels {
                    service: Arc::clone(service),
                    outcome: outcome.as_str(),
                }));
            }
        }
    }

    /// `weft_tls_certificate_expiry_timestamp_seconds` (exported only with
    /// `[tls]`): the mesh certificate's notAfter, in Unix seconds.
    pub fn tls_certificate_expiry(&mut self, not_after: i64) {
        self.metrics.tls_certificate_expiry.set(not_after);
    }

    /// `weft_proxy_control_plane_*` (exported only with `[control_plane]`).
    pub fn control_plane(&mut self, status: ControlPlaneStatus) {
        let m = self.metrics;
        m.control_plane_connected.set(i64::from(status.connected));
        m.control_plane_version.set(status.version);
        let seen = m.control_plane_rejected.get();
        if status.rejected > seen {
            m.control_plane_rejected.inc_by(status.rejected - seen);
        }
    }
}

/// Every metric of the sidecar, and the registry that exposes them.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    /// When the counters started (for OTLP's cumulative start time).
    created: SystemTime,
    /// One refresh-and-encode at a time (a scrape and an OTLP export would
    /// otherwise clear each other's refreshed gauges).
    refresh: Mutex<()>,
    requests: Family<RequestLabels, Counter>,
    durations: Family<RequestLabels, Histogram, fn() -> Histogram>,
    /// Handles of the two above, by label address (see [`series`]).
    recent: series::RecentSeries,
    /// The `caller` labels.
    callers: Callers,
    callers_folded: Counter,
    refusals: Family<RefusalLabels, Counter>,
    retries: Family<RouteLabels, Counter>,
    retries_skipped: Family<SkipLabels, Counter>,
    ejections: Family<ServiceLabels, Counter>,
    hedges: Family<HedgeLabels, Counter>,
    injected_faults: Family<FaultLabels, Counter>,
    endpoints: Family<EndpointLabels, Gauge>,
    budgets: Family<RouteLabels, Gauge>,
    adaptive_limits: Family<AdaptiveLabels, Gauge>,
    inbound_connections: ConnectionMetrics,
    outbound_connections: ConnectionMetrics,
    admin_connections: ConnectionMetrics,
    config_version: Gauge,
    reloads: Family<ResultLabels, Counter>,
    control_plane_connected: Gauge,
    control_plane_version: Gauge,
    control_plane_rejected: Counter,
    app_healthy: Gauge,
    tls_handshake_failures: Family<TlsFailureLabels, Counter>,
    tls_certificate_expiry: Gauge,
    spans: SpanMetrics,
    otlp_exports: OtlpExportMetrics,
    cold_start_held: Family<ServiceLabels, Gauge>,
    cold_starts: Family<OutcomeLabels, Counter>,
    activator_calls: Family<OutcomeLabels, Counter>,
}

fn latency_histogram() -> Histogram {
    Histogram::new(LATENCY_BUCKETS)
}

/// The request-path families, registered first (in this order) by
/// [`Metrics::new`].
struct RequestFamilies {
    requests: Family<RequestLabels, Counter>,
    durations: Family<RequestLabels, Histogram, fn() -> Histogram>,
    refusals: Family<RefusalLabels, Counter>,
    retries: Family<RouteLabels, Counter>,
    retries_skipped: Family<SkipLabels, Counter>,
    ejections: Family<ServiceLabels, Counter>,
    callers_folded: Counter,
    hedges: Family<HedgeLabels, Counter>,
    injected_faults: Family<FaultLabels, Counter>,
}

impl RequestFamilies {
    fn register(registry: &mut Registry) -> Self {
        let requests = Family::default();
        registry.register(
            "requests",
            "Requests completed (response ended, failed or abandoned), including refusals",
            requests.clone(),
        );
        let durations = Family::new_with_constructor(latency_histogram as fn() -> Histogram);
        registry.register(
            "request_duration_seconds",
            "Time from a request's arrival to the end of its response body",
            durations.clone(),
        );
        let refusals = Family::default();
        registry.register(
            "refusals",
            "Responses the proxy produced itself, by weft-reason and the policy key that refused",
            refusals.clone(),
        );
        let retries = Family::default();
        registry.register("retries", "Retry attempts sent", retries.clone());
        let retries_skipped = Family::default();
        registry.register(
            "retries_skipped",
            "Retries the route allowed that were not sent, by reason",
            retries_skipped.clone(),
        );
        let ejections = Family::default();
        registry.register(
            "ejections",
            "Endpoints ejected by outlier detection",
            ejections.clone(),
        );
        let callers_folded = Counter::default();
        registry.register(
            "callers_folded",
            "Distinct callers counted as caller=\"other\" because [telemetry] max_callers were already shown",
            callers_folded.clone(),
        );
        let hedges = Family::default();
        registry.register(
            "hedges",
            "Hedged tries, by outcome (sent, won, lost; no-budget and no-endpoint: not sent)",
            hedges.clone(),
        );
        let injected_faults = Family::default();
        registry.register(
            "injected_faults",
            "Faults injected by routes[].fault, by kind (delay, abort); their requests are classified injected-fault",
            injected_faults.clone(),
        );
        Self {
            requests,
            durations,
            refusals,
            retries,
            retries_skipped,
            ejections,
            callers_folded,
            hedges,
            injected_faults,
        }
    }
}

/// The gauges a [`GaugeSource`] refreshes per service and route.
struct EndpointFamilies {
    endpoints: Family<EndpointLabels, Gauge>,
    budgets: Family<RouteLabels, Gauge>,
    adaptive_limits: Family<AdaptiveLabels, Gauge>,
}

impl EndpointFamilies {
    fn register(registry: &mut Registry) -> Self {
        let endpoints = Family::default();
        registry.register(
            "endpoints",
            "Outbound endpoints by state (active, unhealthy, ejected, saturated)",
            endpoints.clone(),
        );
        let budgets = Family::default();
        registry.register(
            "retry_budget_available_retries",
            "Retries the retry budget allows now",
            budgets.clone(),
        );
        let adaptive_limits = Family::default();
        registry.register(
            "adaptive_concurrency_limit",
            "Current adaptive concurrency limit, per outbound endpoint or of this instance (inbound)",
            adaptive_limits.clone(),
        );
        Self {
            endpoints,
            budgets,
            adaptive_limits,
        }
    }
}

/// The listeners' connection counters, bound to their `direction` label.
struct ListenerConnections {
    inbound: ConnectionMetrics,
    outbound: ConnectionMetrics,
    admin: ConnectionMetrics,
}

impl ListenerConnections {
    fn register(registry: &mut Registry) -> Self {
        let open = Family::<DirectionLabels, Gauge>::default();
        let accepted = Family::<DirectionLabels, Counter>::default();
        let read = Family::<DirectionLabels, Counter>::default();
        let written = Family::<DirectionLabels, Counter>::default();
        let refused = Family::<DirectionLabels, Counter>::default();
        let bind = |direction: Direction| {
            let labels = DirectionLabels {
                direction: direction.as_str(),
            };
            ConnectionMetrics {
                open: open.get_or_create_owned(&labels),
                accepted: accepted.get_or_create_owned(&labels),
                read_bytes: read.get_or_create_owned(&labels),
                written_bytes: written.get_or_create_owned(&labels),
                refused: refused.get_or_create_owned(&labels),
            }
        };
        let inbound = bind(Direction::Inbound);
        let outbound = bind(Direction::Outbound);
        // The admin listener's connections are only counted when refused.
        let admin = ConnectionMetrics {
            refused: refused.get_or_create_owned(&DirectionLabels { direction: "admin" }),
            ..ConnectionMetrics::default()
        };
        registry.register(
            "tcp_open_connections",
            "Client connections open on the listener",
            open,
        );
        registry.register("tcp_connections", "Client connections accepted", accepted);
        registry.register("tcp_read_bytes", "Bytes read from client connections", read);
        registry.register(
            "tcp_written_bytes",
            "Bytes written to client connections",
            written,
        );
        registry.register(
            "tcp_connections_refused",
            "Client connections closed at accept because the listener was at [limits] max_connections",
            refused,
        );
        Self {
            inbound,
            outbound,
            admin,
        }
    }
}

/// The configuration's version and reloads, and failed mTLS handshakes.
struct ConfigAndTls {
    config_version: Gauge,
    reloads: Family<ResultLabels, Counter>,
    tls_handshake_failures: Family<TlsFailureLabels, Counter>,
}

impl ConfigAndTls {
    fn register(registry: &mut Registry) -> Self {
        let config_version = Gauge::default();
        registry.register(
            "config_version",
            "Version of the bootstrap configuration in effect",
            config_version.clone(),
        );
        let reloads = Family::<ResultLabels, Counter>::default();
        // Both results exist at 0 from the start, so that `increase()` sees
        // the first rejected reload (a series that appears at 1 has none).
        for result in ["applied", "rejected"] {
            drop(reloads.get_or_create(&ResultLabels { result }));
        }
        registry.register(
            "config_reloads",
            "Configuration reloads, by result (applied, rejected)",
            reloads.clone(),
        );
        let tls_handshake_failures = Family::default();
        registry.register(
            "tls_handshake_failures",
            "mTLS handshakes between sidecars that failed, by direction and reason",
            tls_handshake_failures.clone(),
        );
        Self {
            config_version,
            reloads,
            tls_handshake_failures,
        }
    }
}

/// The counters of telemetry's own exports (spans, OTLP metrics).
struct ExportCounters {
    spans: SpanMetrics,
    otlp_exports: OtlpExportMetrics,
}

impl ExportCounters {
    fn register(registry: &mut Registry) -> Self {
        let spans_exported = Counter::default();
        registry.register(
            "spans_exported",
            "Request spans accepted by the OTLP collector",
            spans_exported.clone(),
        );
        let spans_dropped = Family::<ReasonLabels, Counter>::default();
        let spans = SpanMetrics {
            exported: spans_exported,
            queue_full: spans_dropped.get_or_create_owned(&ReasonLabels {
                reason: "queue-full",
            }),
            export_failed: spans_dropped.get_or_create_owned(&ReasonLabels {
                reason: "export-failed",
            }),
        };
        registry.register(
            "spans_dropped",
            "Request spans not exported, by reason (queue-full, export-failed)",
            spans_dropped,
        );
        let exports = Family::<ResultLabels, Counter>::default();
        let otlp_exports = OtlpExportMetrics {
            success: exports.get_or_create_owned(&ResultLabels { result: "success" }),
            failure: exports.get_or_create_owned(&ResultLabels { result: "failure" }),
        };
        registry.register(
            "otlp_metrics_exports",
            "OTLP metrics export requests, by result (success, failure)",
            exports,
        );
        Self {
            spans,
            otlp_exports,
        }
    }
}

/// The control-plane client's gauges (registered only with a control plane).
/// Calls held while a service scales from zero, and its activator.
struct ColdStartFamilies {
    held: Family<ServiceLabels, Gauge>,
    outcomes: Family<OutcomeLabels, Counter>,
    activator_calls: Family<OutcomeLabels, Counter>,
}

impl ColdStartFamilies {
    fn register(registry: &mut Registry) -> Self {
        let held = Family::default();
        registry.register(
            "cold_start_held",
            "Calls held now because their service has no endpoint (outbound.cold_start)",
            held.clone(),
        );
        let outcomes = Family::default();
        registry.register(
            "cold_start",
            "Calls that met their service with no endpoint, by outcome (released, timeout, overflow)",
            outcomes.clone(),
        );
        let activator_calls = Family::default();
        registry.register(
            "activator_calls",
            "Calls to a service's activator (outbound.cold_start.activate), by outcome",
            activator_calls.clone(),
        );
        Self {
            held,
            outcomes,
            activator_calls,
        }
    }
}

struct ControlPlaneGauges {
    connected: Gauge,
    version: Gauge,
    rejected: Counter,
}

impl ControlPlaneGauges {
    fn register(registry: &mut Registry, with_control_plane: bool) -> Self {
        let connected = Gauge::default();
        let version = Gauge::default();
        let rejected = Counter::default();
        if with_control_plane {
            registry.register(
                "proxy_control_plane_connected",
                "1 while a session with the control plane is up",
                connected.clone(),
            );
            registry.register(
                "proxy_control_plane_version",
                "Version (store revision) of the last control-plane snapshot applied",
                version.clone(),
            );
            registry.register(
                "proxy_control_plane_rejected",
                "Pushed services refused by validation",
                rejected.clone(),
            );
        }
        Self {
            connected,
            version,
            rejected,
        }
    }
}

impl Metrics {
    /// The sidecar's metrics; the control-plane ones only `with_control_plane`.
    pub fn new(with_control_plane: bool) -> Self {
        let mut root = weft_telemetry::registry();
        // Registration order is the order of `/metrics`.
        let registry = root.sub_registry_with_prefix("weft");
        let RequestFamilies {
            requests,
            durations,
            refusals,
            retries,
            retries_skipped,
            ejections,
            callers_folded,
            hedges,
            injected_faults,
        } = RequestFamilies::register(registry);
        let EndpointFamilies {
            endpoints,
            budgets,
            adaptive_limits,
        } = EndpointFamilies::register(registry);
        let connections = ListenerConnections::register(registry);
        let ConfigAndTls {
            config_version,
            reloads,
            tls_handshake_failures,
        } = ConfigAndTls::register(registry);
        let ExportCounters {
            spans,
            otlp_exports,
        } = ExportCounters::register(registry);
        let control_plane = ControlPlaneGauges::register(registry, with_control_plane);
        let cold_start = ColdStartFamilies::register(registry);
        Self {
            registry: root,
            created: SystemTime::now(),
            refresh: Mutex::new(()),
            requests,
            durations,
            recent: series::RecentSeries::default(),
            callers: Callers::new(
                weft_config::Telemetry::DEFAULT_MAX_CALLERS,
                "",
                callers_folded.clone(),
            ),
            callers_folded,
            refusals,
            retries,
            retries_skipped,
            ejections,
            hedges,
            injected_faults,
            endpoints,
            budgets,
            adaptive_limits,
            inbound_connections: connections.inbound,
            outbound_connections: connections.outbound,
            admin_connections: connections.admin,
            config_version,
            reloads,
            control_plane_connected: control_plane.connected,
            control_plane_version: control_plane.version,
            control_plane_rejected: control_plane.rejected,
            app_healthy: Gauge::default(),
            tls_handshake_failures,
            tls_certificate_expiry: Gauge::default(),
            spans,
            otlp_exports,
            cold_start_held: cold_start.held,
            cold_starts: cold_start.outcomes,
            activator_calls: cold_start.activator_calls,
        }
    }

    /// A failed mTLS handshake; `reason` is one of a fixed set (see
    /// `docs/telemetry.md`).
    pub fn tls_handshake_failure(&self, direction: Direction, reason: &'static str) {
        self.tls_handshake_failures
            .get_or_create(&TlsFailureLabels {
                direction: direction.as_str(),
                reason,
            })
            .inc();
    }

    /// Shows at most `max` distinct inbound callers in the `caller` label
    /// (`[telemetry] max_callers`); outbound requests are labelled `own`
    /// (`[service] name`, else empty).
    #[must_use]
    pub fn with_callers(mut self, max: usize, own: &str) -> Self {
        self.callers = Callers::new(max, own, self.callers_folded.clone());
        self
    }

    /// The `caller` labels.
    pub fn callers(&self) -> &Callers {
        &self.callers
    }

    /// When the metrics were created: the start of every cumulative value.
    pub fn created(&self) -> SystemTime {
        self.created
    }

    /// The OTLP metrics export's counters.
    pub fn otlp_exports(&self) -> &OtlpExportMetrics {
        &self.otlp_exports
    }

    /// The span pipeline's counters.
    pub fn spans(&self) -> &SpanMetrics {
        &self.spans
    }

    /// A finished request.
    pub fn record(&self, f: &Finished<'_>) {
        let seconds = f.duration.as_secs_f64();
        let key = series::Key::new(
            f.direction as u8,
            f.caller,
            f.service,
            f.route,
            f.status_code,
            f.classification as u8,
        );
        if self.recent.record(&key, seconds) {
            return;
        }
        let labels = RequestLabels {
            direction: f.direction.as_str(),
            caller: Arc::clone(f.caller),
            service: Arc::clone(f.service),
            route: Arc::clone(f.route),
            status_code: f.status_code,
            classification: f.classification.as_str(),
        };
        let requests = self.requests.get_or_create(&labels).clone();
        let durations = self.durations.get_or_create(&labels).clone();
        requests.inc();
        durations.observe(seconds);
        self.recent.insert(
            key,
            series::Series::new(requests, durations, [f.caller, f.service, f.route]),
        );
    }

    /// A response the proxy produced itself.
    pub fn refusal(
        &self,
        direction: Direction,
        caller: &Arc<str>,
        service: &Arc<str>,
        route: &Arc<str>,
        reason: &'static str,
        limit: &Arc<str>,
    ) {
        self.refusals
            .get_or_create(&RefusalLabels {
                direction: direction.as_str(),
                caller: Arc::clone(caller),
                service: Arc::clone(service),
                route: Arc::clone(route),
                reason,
                limit: Arc::clone(limit),
            })
            .inc();
    }

    /// A retry attempt sent.
    pub fn retry(&self, service: &Arc<str>, route: &Arc<str>) {
        self.retries
            .get_or_create(&RouteLabels {
                service: Arc::clone(service),
                route: Arc::clone(route),
            })
            .inc();
    }

    /// A retry the route allowed, not sent.
    pub fn retry_skipped(&self, service: &Arc<str>, route: &Arc<str>, why: RetrySkipped) {
        self.retries_skipped
            .get_or_create(&SkipLabels {
                service: Arc::clone(service),
                route: Arc::clone(route),
                reason: why.as_str(),
            })
            .inc();
    }

    /// `n` hedges of a request to `service` on `route` ended in `outcome`
    /// (`sent`, `won`, `lost`, `no-budget`, `no-endpoint`).
    pub fn hedge(&self, service: &Arc<str>, route: &Arc<str>, outcome: &'static str, n: u32) {
        self.hedges
            .get_or_create(&HedgeLabels {
                service: Arc::clone(service),
                route: Arc::clone(route),
                outcome,
            })
            .inc_by(u64::from(n));
    }

    /// A fault of `kind` (`delay`, `abort`) injected into a request to
    /// `service` on `route`.
    pub fn injected_fault(&self, service: &Arc<str>, route: &Arc<str>, kind: &'static str) {
        self.injected_faults
            .get_or_create(&FaultLabels {
                service: Arc::clone(service),
                route: Arc::clone(route),
                kind,
            })
            .inc();
    }

    /// An endpoint of `service` ejected.
    pub fn ejection(&self, service: &Arc<str>) {
        self.ejections
            .get_or_create(&ServiceLabels {
                service: Arc::clone(service),
            })
            .inc();
    }

    /// A call that met `service` with no endpoint, and how that ended.
    pub fn cold_start(&self, service: &Arc<str>, outcome: ColdStartOutcome) {
        self.cold_starts
            .get_or_create(&OutcomeLabels {
                service: Arc::clone(service),
                outcome: outcome.as_str(),
            })
            .inc();
    }

    /// A call to `service`'s activator, and how it ended.
    pub fn activator_call(&self, service: &Arc<str>, outcome: ActivatorOutcome) {
        self.activator_calls
            .get_or_create(&OutcomeLabels {
                service: Arc::clone(service),
                outcome: outcome.as_str(),
            })
            .inc();
    }

    /// A reload, applied or rejected.
    pub fn reload(&self, applied: bool) {
        let result = if applied { "applied" } else { "rejected" };
        self.reloads.get_or_create(&ResultLabels { result }).inc();
    }

    /// The counters of a listener's connections.
    pub fn connections(&self, direction: Direction) -> &ConnectionMetrics {
        match direction {
            Direction::Inbound => &self.inbound_connections,
            Direction::Outbound => &self.outbound_connections,
        }
    }

    /// The admin listener's counters (only refusals are exported).
    pub fn admin_connections(&self) -> &ConnectionMetrics {
        &self.admin_connections
    }

    /// Copies the state kept elsewhere (`source`) into gauges, then encodes
    /// everything.
    pub fn render(&self, source: &dyn GaugeSource) -> Result<String, weft_telemetry::EncodeError> {
        let _one = self.refresh.lock().unwrap_or_else(PoisonError::into_inner);
        self.refresh(source);
        weft_telemetry::encode(&self.registry)
    }

    /// Copies the state kept elsewhere (`source`) into gauges, then collects
    /// every value as structured data: the same metrics as
    /// [`Metrics::render`], for the OTLP export.
    pub fn collect(
        &self,
        source: &dyn GaugeSource,
    ) -> Result<Vec<MetricFamily>, weft_telemetry::EncodeError> {
        let _one = self.refresh.lock().unwrap_or_else(PoisonError::into_inner);
        self.refresh(source);
        Ok(prometheus_protobuf::encode(&self.registry)?)
    }

    /// Adds `weft_proxy_app_healthy` (a sidecar with `[service]`).
    #[must_use]
    pub fn with_app_health(mut self) -> Self {
        self.registry.sub_registry_with_prefix("weft").register(
            "proxy_app_healthy",
            "1 while the local app answers its health check (or checking is off), else 0",
            self.app_healthy.clone(),
        );
        self
    }

    /// Adds `weft_tls_certificate_expiry_timestamp_seconds` (a sidecar
    /// with `[tls]`), and shows every direction and reason of
    /// `weft_tls_handshake_failures_total` at 0.
    #[must_use]
    pub fn with_tls(mut self) -> Self {
        for (direction, reasons) in [
            (Direction::Inbound, INBOUND_TLS_FAILURES),
            (Direction::Outbound, OUTBOUND_TLS_FAILURES),
        ] {
            for &reason in reasons {
                drop(
                    self.tls_handshake_failures
                        .get_or_create(&TlsFailureLabels {
                            direction: direction.as_str(),
                            reason,
                        }),
                );
            }
        }
        self.registry.sub_registry_with_prefix("weft").register(
            "tls_certificate_expiry_timestamp_seconds",
            "When this sidecar's mesh certificate expires (its notAfter), in seconds since the Unix epoch",
            self.tls_certificate_expiry.clone(),
        );
        self
    }

    /// Copies the state kept elsewhere (`source`) into gauges, without
    /// encoding: at start, so that the counters a source shows at 0 (see
    /// [`Gauges::service_counters`]) exist before the first scrape.
    pub fn refresh_from(&self, source: &dyn GaugeSource) {
        let _one = self.refresh.lock().unwrap_or_else(PoisonError::into_inner);
        self.refresh(source);
    }

    /// The endpoint and budget gauges of services gone since the last
    /// refresh disappear: `source` writes every current one again.
    fn refresh(&self, source: &dyn GaugeSource) {
        self.endpoints.clear();
        self.budgets.clear();
        self.cold_start_held.clear();
        self.adaptive_limits.clear();
        source.refresh(&mut Gauges { metrics: self });
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    /// A sidecar whose only outbound service is `service`.
    struct OneService(&'static str);

    impl GaugeSource for OneService {
        fn refresh(&self, gauges: &mut Gauges<'_>) {
            let service = Arc::from(self.0);
            gauges.config_version(7);
            gauges.endpoints(
                &service,
                EndpointStates {
                    active: 2,
                    ejected: 1,
                    ..EndpointStates::default()
                },
            );
            gauges.retry_budget(&service, &Arc::from("/pay"), 5);
            gauges.control_plane(ControlPlaneStatus {
                connected: true,
                version: 42,
                rejected: 3,
            });
        }
    }

    #[test]
    fn gauges_show_what_the_source_wrote_at_the_last_read() {
        let metrics = Metrics::new(true);
        let text = metrics.render(&OneService("billing")).unwrap();
        for line in [
            "weft_config_version 7",
            r#"weft_endpoints{service="billing",state="active"} 2"#,
            r#"weft_endpoints{service="billing",state="ejected"} 1"#,
            r#"weft_endpoints{service="billing",state="unhealthy"} 0"#,
            r#"weft_retry_budget_available_retries{service="billing",route="/pay"} 5"#,
            "weft_proxy_control_plane_connected 1",
            "weft_proxy_control_plane_version 42",
            "weft_proxy_control_plane_rejected_total 3",
        ] {
            assert!(text.lines().any(|l| l == line), "no {line:?} in\n{text}");
        }
        // A service gone since the last read has no gauges left; the
        // rejection total is not counted twice.
        let text = metrics.render(&OneService("ledger")).unwrap();
        assert!(!text.contains("billing"), "{text}");
        assert!(text.contains(r#"weft_endpoints{service="ledger",state="active"} 2"#));
        assert!(
            text.lines()
                .any(|l| l == "weft_proxy_control_plane_rejected_total 3"),
            "{text}"
        );
    }

    /// A sidecar with `[tls]` whose one service retries requests of route
    /// `/pay` only, and hedges and injects faults into those of `/get`.
    struct RetriedRoute;

    impl GaugeSource for RetriedRoute {
        fn refresh(&self, gauges: &mut Gauges<'_>) {
            gauges.tls_certificate_expiry(1_900_000_000);
            let (pay, get) = (Arc::from("/pay"), Arc::from("/get"));
            let route = |label, retried, hedged, faulted| RouteCounters {
                label,
                retried,
                hedged,
                faulted,
            };
            gauges.service_counters(
                &Arc::from("billing"),
                [
                    route(&pay, true, false, false),
                    route(&get, false, true, true),
                ],
            );
        }
    }

    #[test]
    fn known_counters_start_at_zero_and_count_on() {
        let metrics = Metrics::new(false).with_tls();
        let text = metrics.render(&RetriedRoute).unwrap();
        for line in [
            r#"weft_config_reloads_total{result="applied"} 0"#,
            r#"weft_config_reloads_total{result="rejected"} 0"#,
            r#"weft_tls_handshake_failures_total{direction="inbound",reason="plaintext"} 0"#,
            r#"weft_tls_handshake_failures_total{direction="outbound",reason="timeout"} 0"#,
            r#"weft_ejections_total{service="billing"} 0"#,
            r#"weft_retries_total{service="billing",route="/pay"} 0"#,
            r#"weft_retries_skipped_total{service="billing",route="/pay",reason="no-endpoint"} 0"#,
            r#"weft_hedges_total{service="billing",route="/get",outcome="no-budget"} 0"#,
            r#"weft_injected_faults_total{service="billing",route="/get",kind="abort"} 0"#,
            "weft_tls_certificate_expiry_timestamp_seconds 1900000000",
        ] {
            assert!(text.lines().any(|l| l == line), "no {line:?} in\n{text}");
        }
        // Counting goes on from there; a refresh does not reset a counter.
        metrics.reload(false);
        metrics.retry_skipped(
            &Arc::from("billing"),
            &Arc::from("/pay"),
            RetrySkipped::NoEndpoint,
        );
        let text = metrics.render(&RetriedRoute).unwrap();
        for line in [
            r#"weft_config_reloads_total{result="rejected"} 1"#,
            r#"weft_retries_skipped_total{service="billing",route="/pay",reason="no-endpoint"} 1"#,
        ] {
            assert!(text.lines().any(|l| l == line), "no {line:?} in\n{text}");
        }
        // Without [tls], neither TLS metric has a series.
        let text = Metrics::new(false).render(&OneService("x")).unwrap();
        assert!(!text.contains("weft_tls_certificate_expiry_timestamp_seconds "));
        assert!(!text.contains("weft_tls_handshake_failures_total{"));
    }
}
