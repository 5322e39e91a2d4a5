//! What the sidecar tells operators: metrics (`/metrics`, and OTLP with
//! `otlp_metrics`), request spans (OTLP), the access log, and the one place a
//! finished request is reported to all three ([`observe`]).
//!
//! | module | responsibility |
//! |---|---|
//! | [`metrics`] | the Prometheus registry and every metric (names: `docs/telemetry.md`); state kept elsewhere comes in through [`metrics::GaugeSource`] |
//! | [`otlp_metrics`] | the registry's values, exported over OTLP every interval |
//! | [`observe`] | one request's observation, finished when its response body ends: metrics, span, access log |
//! | [`trace`] | the tracer, W3C trace-context propagation, and the bounded span export queue |
//! | [`series`] | the series a finished request is counted in, by its labels' addresses |
//! | [`callers`] | the `caller` label: interned, at most `[telemetry] max_callers` distinct |

pub mod callers;
pub mod metrics;
pub mod observe;
pub mod otlp_metrics;
pub mod series;
pub mod trace;

use std::sync::{Arc, LazyLock};

pub use metrics::{Direction, Metrics, RetrySkipped};
pub use observe::{Observation, RequestObserver};
pub use trace::{TraceError, TraceSettings, Traces};

/// Where finished requests are reported; set up once at start (`[telemetry]`
/// is restart-only).
#[derive(Debug)]
pub struct Reporters {
    pub metrics: Arc<Metrics>,
    /// With `[telemetry] otlp_endpoint`.
    pub traces: Option<Traces>,
    /// `[telemetry] access_log`.
    pub access_log: bool,
}

impl Reporters {
    /// The reporters `bootstrap` asks for; starts the span export task when
    /// traces are on (needs a Tokio runtime).
    pub fn start(
        bootstrap: &weft_config::Bootstrap,
        metrics: Arc<Metrics>,
    ) -> Result<Self, TraceError> {
        let telemetry = &bootstrap.telemetry;
        let traces = match &telemetry.otlp_endpoint {
            Some(endpoint) => Some(Traces::start(
                &TraceSettings {
                    endpoint: endpoint.clone(),
                    sampling_ratio: telemetry.sampling_ratio.get(),
                    service_name: bootstrap.telemetry_service_name().to_owned(),
                },
                metrics.spans(),
            )?),
            None => None,
        };
        Ok(Self {
            metrics,
            traces,
            access_log: telemetry.access_log,
        })
    }

    /// Whether requests need more than their metrics (a span, a log line).
    pub fn detailed(&self) -> bool {
        self.traces.is_some() || self.access_log
    }
}

/// The `service` label of outbound requests to names resolved through DNS and
/// to IP literals (a bounded label whatever hosts the app calls).
pub static EXTERNAL: LazyLock<Arc<str>> = LazyLock::new(|| Arc::from("external"));
/// The `service` label of requests whose service is not known.
pub static UNKNOWN: LazyLock<Arc<str>> = LazyLock::new(|| Arc::from("unknown"));
/// The `limit` label of refusals that no configured limit made.
pub static NO_LIMIT: LazyLock<Arc<str>> = LazyLock::new(|| Arc::from(""));

/// The `route` label of a request that matched no route.
pub fn no_route() -> &'static Arc<str> {
    weft_core::route::RouteTable::no_route()
}
