//! The sidecar's Prometheus metrics (names and labels: `docs/telemetry.md`).
//!
//! Request-path metrics are recorded as they happen ([`Metrics::record`],
//! [`Metrics::retry`], ...): label sets are made of `Arc<str>` names the
//! directory already holds and static strings, so recording clones two `Arc`s
//! and takes the family's read lock. State that already lives elsewhere
//! (endpoint states, the control-plane connection, the config version) is
//! copied into gauges when `/metrics` is scraped or the metrics are exported
//! over OTLP ([`Metrics::refresh`]), so the request path never pays for it.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::encoding::prometheus_protobuf::{self, prometheus_data_model::MetricFamily};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use crate::control_plane::ConnectionState;
use crate::directory::MeshService;
use crate::state::Shared;

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
}

impl Classification {
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Success => "success",
            Self::Failure => "failure",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    direction: &'static str,
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

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct ServiceLabels {
    service: Arc<str>,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct EndpointLabels {
    service: Arc<str>,
    state: &'static str,
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

/// Why a retry the route allowed was not sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RetrySkipped {
    BudgetExhausted,
    NotReplayable,
    NoEndpoint,
}

impl RetrySkipped {
    const fn as_str(self) -> &'static str {
        match self {
            Self::BudgetExhausted => "budget-exhausted",
            Self::NotReplayable => "not-replayable",
            Self::NoEndpoint => "no-endpoint",
        }
    }
}

/// One finished request, as [`Metrics::record`] takes it.
#[derive(Debug)]
pub struct Finished<'a> {
    pub direction: Direction,
    pub service: &'a Arc<str>,
    pub route: &'a Arc<str>,
    pub status_code: u16,
    pub classification: Classification,
    pub duration: Duration,
}

/// Counters of one listener's client connections (the default: counted nowhere).
#[derive(Debug, Clone, Default)]
pub struct ConnectionMetrics {
    pub open: Gauge,
    pub accepted: Counter,
    pub read_bytes: Counter,
    pub written_bytes: Counter,
    /// Connections closed at accept: the listener was at `[limits]` max_connections.
    pub refused: Counter,
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
    refusals: Family<RefusalLabels, Counter>,
    retries: Family<RouteLabels, Counter>,
    retries_skipped: Family<SkipLabels, Counter>,
    ejections: Family<ServiceLabels, Counter>,
    endpoints: Family<EndpointLabels, Gauge>,
    budgets: Family<RouteLabels, Gauge>,
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
    spans: SpanMetrics,
    otlp_exports: OtlpExportMetrics,
}

fn latency_histogram() -> Histogram {
    Histogram::new(LATENCY_BUCKETS)
}

impl Metrics {
    /// The sidecar's metrics; the control-plane ones only `with_control_plane`.
    pub fn new(with_control_plane: bool) -> Self {
        let mut root = weft_telemetry::registry();
        let registry = root.sub_registry_with_prefix("weft");
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
        let inbound_connections = bind(Direction::Inbound);
        let outbound_connections = bind(Direction::Outbound);
        // The admin listener's connections are only counted when refused.
        let admin_connections = ConnectionMetrics {
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

        let config_version = Gauge::default();
        registry.register(
            "config_version",
            "Version of the bootstrap configuration in effect",
            config_version.clone(),
        );
        let reloads = Family::default();
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

        let control_plane_connected = Gauge::default();
        let control_plane_version = Gauge::default();
        let control_plane_rejected = Counter::default();
        if with_control_plane {
            registry.register(
                "proxy_control_plane_connected",
                "1 while a session with the control plane is up",
                control_plane_connected.clone(),
            );
            registry.register(
                "proxy_control_plane_version",
                "Version (store revision) of the last control-plane snapshot applied",
                control_plane_version.clone(),
            );
            registry.register(
                "proxy_control_plane_rejected",
                "Pushed services refused by validation",
                control_plane_rejected.clone(),
            );
        }
        Self {
            registry: root,
            created: SystemTime::now(),
            refresh: Mutex::new(()),
            requests,
            durations,
            refusals,
            retries,
            retries_skipped,
            ejections,
            endpoints,
            budgets,
            inbound_connections,
            outbound_connections,
            admin_connections,
            config_version,
            reloads,
            control_plane_connected,
            control_plane_version,
            control_plane_rejected,
            app_healthy: Gauge::default(),
            tls_handshake_failures,
            spans,
            otlp_exports,
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
        let labels = RequestLabels {
            direction: f.direction.as_str(),
            service: Arc::clone(f.service),
            route: Arc::clone(f.route),
            status_code: f.status_code,
            classification: f.classification.as_str(),
        };
        self.requests.get_or_create(&labels).inc();
        self.durations
            .get_or_create(&labels)
            .observe(f.duration.as_secs_f64());
    }

    /// A response the proxy produced itself.
    pub fn refusal(
        &self,
        direction: Direction,
        service: &Arc<str>,
        route: &Arc<str>,
        reason: &'static str,
        limit: &Arc<str>,
    ) {
        self.refusals
            .get_or_create(&RefusalLabels {
                direction: direction.as_str(),
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

    /// An endpoint of `service` ejected.
    pub fn ejection(&self, service: &Arc<str>) {
        self.ejections
            .get_or_create(&ServiceLabels {
                service: Arc::clone(service),
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

    /// Copies the state kept elsewhere into gauges, then encodes everything.
    pub fn render(&self, shared: &Shared) -> Result<String, weft_telemetry::EncodeError> {
        let _one = self.refresh.lock().unwrap_or_else(PoisonError::into_inner);
        self.refresh(shared);
        weft_telemetry::encode(&self.registry)
    }

    /// Copies the state kept elsewhere into gauges, then collects every
    /// value as structured data: the same metrics as [`Metrics::render`],
    /// for the OTLP export.
    pub fn collect(
        &self,
        shared: &Shared,
    ) -> Result<Vec<MetricFamily>, weft_telemetry::EncodeError> {
        let _one = self.refresh.lock().unwrap_or_else(PoisonError::into_inner);
        self.refresh(shared);
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

    fn refresh(&self, shared: &Shared) {
        self.app_healthy
            .set(i64::from(shared.app_health().is_serving()));
        self.config_version
            .set(i64::try_from(shared.config().version).unwrap_or(i64::MAX));
        let now = Instant::now();
        self.endpoints.clear();
        self.budgets.clear();
        let directory = shared.directory();
        let count = |svc: &MeshService| {
            let cap = svc.policy.endpoint_cap();
            let set = Arc::clone(&svc.endpoints().borrow());
            let mut states = [0i64; 4];
            for e in set.endpoints() {
                let i = if !e.health().is_healthy() {
                    3
                } else if e.outlier().ejected_for(now).is_some() {
                    1
                } else if cap.is_some_and(|c| e.in_flight() >= c) {
                    2
                } else {
                    0
                };
                states[i] += 1;
            }
            for (route, budget) in svc.policy.budgets() {
                self.budgets
                    .get_or_create(&RouteLabels {
                        service: Arc::clone(&svc.label),
                        route: Arc::clone(route),
                    })
                    .set(i64::try_from(budget.available()).unwrap_or(i64::MAX));
            }
            for (state, n) in ["active", "ejected", "saturated", "unhealthy"]
                .into_iter()
                .zip(states)
            {
                self.endpoints
                    .get_or_create(&EndpointLabels {
                        service: Arc::clone(&svc.label),
                        state,
                    })
                    .set(n);
            }
        };
        for svc in directory.services() {
            count(svc);
        }
        if let Some(remote) = shared.remote() {
            for svc in remote.services() {
                if directory.service(svc.name.as_str()).is_none() {
                    count(&svc);
                }
            }
            let client = remote.client();
            let connected = matches!(client.state(), ConnectionState::Connected { .. });
            self.control_plane_connected.set(i64::from(connected));
            let version = client.snapshot().borrow().version;
            self.control_plane_version.set(version);
            let (rejected, _) = client.rejected();
            let seen = self.control_plane_rejected.get();
            if rejected > seen {
                self.control_plane_rejected.inc_by(rejected - seen);
            }
        }
    }
}
