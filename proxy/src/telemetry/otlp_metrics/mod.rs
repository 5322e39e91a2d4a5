//! The metrics of `/metrics`, exported over OTLP/gRPC too.
//!
//! With `[telemetry] otlp_metrics`, a background task (on the shared task
//! tracker) sends one `ExportMetricsServiceRequest` to `otlp_endpoint` every
//! `otlp_metrics_interval`. The Prometheus registry stays the single source
//! of truth: each export refreshes and encodes it as `/metrics` does
//! ([`super::Metrics::collect`], prometheus-client's protobuf encoder), and
//! [`convert`] turns the values into OTLP metrics, cumulative from the
//! process start. The resource has `service.name` (as spans) and
//! `service.instance.id` when the sidecar has one.
//!
//! The request path never waits on export. An export that fails or takes
//! longer than [`EXPORT_TIMEOUT`] is dropped (the next one carries the
//! cumulative values anyway) and counted in `weft_otlp_metrics_exports_total`,
//! with one warning per outage in the log. At shutdown (the shared
//! cancellation token, after the listeners drained) one last export is sent,
//! bounded by [`FINAL_EXPORT_TIMEOUT`].

pub mod convert;

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest;
use opentelemetry_proto::tonic::collector::metrics::v1::metrics_service_client::MetricsServiceClient;
use opentelemetry_proto::tonic::common::v1::{AnyValue, InstrumentationScope, KeyValue, any_value};
use opentelemetry_proto::tonic::metrics::v1::{ResourceMetrics, ScopeMetrics};
use opentelemetry_proto::tonic::resource::v1::Resource;
use prometheus_client::encoding::prometheus_protobuf::prometheus_data_model::MetricFamily;
use tokio::time::{Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::transport::Channel;

use super::metrics::{GaugeSource, Metrics, OtlpExportMetrics};

/// One export request ends within this (the next interval retries, with
/// newer values).
pub const EXPORT_TIMEOUT: Duration = Duration::from_secs(5);
/// The export at shutdown ends within this.
pub const FINAL_EXPORT_TIMEOUT: Duration = Duration::from_secs(2);
/// Connecting to the collector gives up after this.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);

/// Why the export could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    #[error("[telemetry] otlp_endpoint {endpoint:?}: {reason}")]
    Endpoint { endpoint: String, reason: String },
}

/// Why one export did not go through.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error(transparent)]
    Collect(#[from] weft_telemetry::EncodeError),
    #[error("the collector answered: {0}")]
    Status(#[from] tonic::Status),
    #[error("the collector rejected {points} data point(s): {message}")]
    Rejected { points: i64, message: String },
    #[error("no answer within {} ms", .0.as_millis())]
    Timeout(Duration),
}

/// What the export is set up from (`[telemetry]`, resolved).
#[derive(Debug, Clone)]
pub struct ExportSettings {
    /// `http://host:port` of an OTLP/gRPC collector.
    pub endpoint: String,
    /// Time between exports.
    pub interval: Duration,
    /// The `service.name` resource attribute.
    pub service_name: String,
    /// The `service.instance.id` resource attribute, when known.
    pub instance_id: Option<String>,
}

impl ExportSettings {
    /// The settings `bootstrap` asks for; `None` without `otlp_metrics`.
    pub fn from_bootstrap(
        bootstrap: &weft_config::Bootstrap,
        instance_id: Option<String>,
    ) -> Option<Self> {
        let telemetry = &bootstrap.telemetry;
        if !telemetry.otlp_metrics {
            return None;
        }
        Some(Self {
            endpoint: telemetry.otlp_endpoint.clone()?,
            interval: telemetry.otlp_metrics_interval.get(),
            service_name: bootstrap.telemetry_service_name().to_owned(),
            instance_id,
        })
    }
}

/// Where export requests go: the collector's `MetricsService`, or a test
/// double.
pub trait Sink: Send + 'static {
    fn send(
        &mut self,
        request: ExportMetricsServiceRequest,
    ) -> impl Future<Output = Result<(), ExportError>> + Send;
}

impl Sink for MetricsServiceClient<Channel> {
    async fn send(&mut self, request: ExportMetricsServiceRequest) -> Result<(), ExportError> {
        let response = self.export(request).await?.into_inner();
        match response.partial_success {
            Some(partial) if partial.rejected_data_points > 0 => Err(ExportError::Rejected {
                points: partial.rejected_data_points,
                message: partial.error_message,
            }),
            _ => Ok(()),
        }
    }
}

/// Starts the export task of `metrics` (their gauges refreshed from
/// `source`) on `tasks`; it stops, after one last export, when `shutdown` is
/// cancelled. Nothing connects yet: the collector is first dialled by the
/// first export.
pub fn start<S: GaugeSource + 'static>(
    settings: &ExportSettings,
    metrics: Arc<Metrics>,
    source: Arc<S>,
    tasks: &TaskTracker,
    shutdown: CancellationToken,
) -> Result<(), SetupError> {
    let endpoint_error = |reason: String| SetupError::Endpoint {
        endpoint: settings.endpoint.clone(),
        reason,
    };
    let channel = tonic::transport::Endpoint::from_shared(settings.endpoint.clone())
        .map_err(|e| endpoint_error(e.to_string()))?
        .connect_timeout(CONNECT_TIMEOUT)
        .timeout(EXPORT_TIMEOUT)
        .connect_lazy();
    let exporter = Exporter::new(settings, metrics.created());
    let counters = metrics.otlp_exports().clone();
    let collect = move || metrics.collect(&*source);
    tasks.spawn(export_loop(
        MetricsServiceClient::new(channel),
        collect,
        exporter,
        counters,
        shutdown,
    ));
    Ok(())
}

/// What every request carries besides the values.
#[derive(Debug, Clone)]
pub struct Exporter {
    interval: Duration,
    resource: Resource,
    scope: InstrumentationScope,
    /// The start of the cumulative values, in ns since the Unix epoch.
    start: u64,
}

impl Exporter {
    pub fn new(settings: &ExportSettings, created: SystemTime) -> Self {
        let mut attributes = vec![string("service.name", &settings.service_name)];
        if let Some(id) = &settings.instance_id {
            attributes.push(string("service.instance.id", id));
        }
        Self {
            interval: settings.interval,
            resource: Resource {
                attributes,
                ..Resource::default()
            },
            scope: InstrumentationScope {
                name: "weft-proxy".to_owned(),
                version: env!("CARGO_PKG_VERSION").to_owned(),
                ..InstrumentationScope::default()
            },
            start: unix_nanos(created),
        }
    }

    /// One export request with the values of `families`, collected now.
    pub fn request(&self, families: Vec<MetricFamily>) -> ExportMetricsServiceRequest {
        let times = convert::Times {
            start: self.start,
            now: unix_nanos(SystemTime::now()),
        };
        ExportMetricsServiceRequest {
            resource_metrics: vec![ResourceMetrics {
                resource: Some(self.resource.clone()),
                scope_metrics: vec![ScopeMetrics {
                    scope: Some(self.scope.clone()),
                    metrics: convert::convert(families, times),
                    ..ScopeMetrics::default()
                }],
                ..ResourceMetrics::default()
            }],
        }
    }
}

fn string(key: &str, value: &str) -> KeyValue {
    KeyValue {
        key: key.to_owned(),
        value: Some(AnyValue {
            value: Some(any_value::Value::StringValue(value.to_owned())),
        }),
        ..KeyValue::default()
    }
}

fn unix_nanos(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// Exports every interval until `stop`, then once more.
pub async fn export_loop<S, C>(
    mut sink: S,
    mut collect: C,
    exporter: Exporter,
    counters: OtlpExportMetrics,
    stop: CancellationToken,
) where
    S: Sink,
    C: FnMut() -> Result<Vec<MetricFamily>, weft_telemetry::EncodeError> + Send + 'static,
{
    let mut tick = tokio::time::interval_at(Instant::now() + exporter.interval, exporter.interval);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut failing = false;
    loop {
        tokio::select! {
            biased;
            () = stop.cancelled() => break,
            _ = tick.tick() => {}
        }
        // Shutdown does not wait for a slow export: the last one follows.
        tokio::select! {
            biased;
            () = stop.cancelled() => break,
            () = export(&mut sink, &mut collect, &exporter, &counters, &mut failing, EXPORT_TIMEOUT) => {}
        }
    }
    export(
        &mut sink,
        &mut collect,
        &exporter,
        &counters,
        &mut failing,
        FINAL_EXPORT_TIMEOUT,
    )
    .await;
}

/// Collects, sends and counts one export; logs when exports start failing
/// and when they recover, not every time.
async fn export<S, C>(
    sink: &mut S,
    collect: &mut C,
    exporter: &Exporter,
    counters: &OtlpExportMetrics,
    failing: &mut bool,
    timeout: Duration,
) where
    S: Sink,
    C: FnMut() -> Result<Vec<MetricFamily>, weft_telemetry::EncodeError>,
{
    let result = match collect() {
        Ok(set) => {
            let request = exporter.request(set);
            match tokio::time::timeout(timeout, sink.send(request)).await {
                Ok(result) => result,
                Err(_) => Err(ExportError::Timeout(timeout)),
            }
        }
        Err(error) => Err(error.into()),
    };
    match result {
        Ok(()) => {
            counters.success.inc();
            if std::mem::replace(failing, false) {
                tracing::info!("OTLP metrics export recovered");
            }
        }
        Err(error) => {
            counters.failure.inc();
            if !std::mem::replace(failing, true) {
                tracing::warn!(%error, "OTLP metrics export failed; retrying every interval, logged again when it recovers");
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use std::sync::Mutex;

    use opentelemetry_proto::tonic::metrics::v1::metric;
    use prometheus_client::encoding::prometheus_protobuf::encode;
    use prometheus_client::metrics::counter::Counter;
    use prometheus_client::registry::Registry;

    use super::*;

    /// Records requests, or fails.
    #[derive(Debug, Clone, Default)]
    struct Recording {
        requests: Arc<Mutex<Vec<ExportMetricsServiceRequest>>>,
        fail: bool,
    }

    impl Sink for Recording {
        async fn send(&mut self, request: ExportMetricsServiceRequest) -> Result<(), ExportError> {
            if self.fail {
                return Err(ExportError::Status(tonic::Status::unavailable("down")));
            }
            self.requests.lock().unwrap().push(request);
            Ok(())
        }
    }

    fn settings(instance_id: Option<&str>) -> ExportSettings {
        ExportSettings {
            endpoint: "http://127.0.0.1:4317".to_owned(),
            interval: Duration::from_secs(1),
            service_name: "checkout".to_owned(),
            instance_id: instance_id.map(str::to_owned),
        }
    }

    /// A registry with one counter, and a collector of it.
    fn source() -> (
        Counter,
        impl FnMut() -> Result<Vec<MetricFamily>, weft_telemetry::EncodeError> + Send + 'static,
    ) {
        let counter = Counter::default();
        let mut registry = Registry::default();
        registry.register("requests", "Requests", counter.clone());
        (counter, move || Ok(encode(&registry)?))
    }

    fn resource(request: &ExportMetricsServiceRequest) -> Vec<(String, String)> {
        request.resource_metrics[0]
            .resource
            .as_ref()
            .unwrap()
            .attributes
            .iter()
            .map(|kv| {
                let Some(any_value::Value::StringValue(v)) =
                    kv.value.as_ref().unwrap().value.clone()
                else {
                    panic!("{kv:?}")
                };
                (kv.key.clone(), v)
            })
            .collect()
    }

    #[tokio::test(start_paused = true)]
    async fn exports_every_interval_and_once_more_at_shutdown() {
        let sink = Recording::default();
        let (counter, collect) = source();
        let counters = OtlpExportMetrics::default();
        let stop = CancellationToken::new();
        let task = tokio::spawn(export_loop(
            sink.clone(),
            collect,
            Exporter::new(&settings(Some("host-1")), SystemTime::UNIX_EPOCH),
            counters.clone(),
            stop.clone(),
        ));
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert!(
            sink.requests.lock().unwrap().is_empty(),
            "not before the interval"
        );
        counter.inc();
        tokio::time::sleep(Duration::from_millis(2_100)).await;
        assert_eq!(sink.requests.lock().unwrap().len(), 2);
        counter.inc();
        stop.cancel();
        task.await.unwrap();

        let requests = sink.requests.lock().unwrap();
        assert_eq!(requests.len(), 3, "the last one at shutdown");
        assert_eq!(counters.success.get(), 3);
        assert_eq!(
            resource(&requests[0]),
            [
                ("service.name".to_owned(), "checkout".to_owned()),
                ("service.instance.id".to_owned(), "host-1".to_owned())
            ]
        );
        let scope = &requests[2].resource_metrics[0].scope_metrics[0];
        assert_eq!(scope.scope.as_ref().unwrap().name, "weft-proxy");
        let metric = &scope.metrics[0];
        assert_eq!(metric.name, "requests_total");
        let Some(metric::Data::Sum(sum)) = &metric.data else {
            panic!("{metric:?}")
        };
        assert_eq!(
            sum.data_points[0].value,
            Some(opentelemetry_proto::tonic::metrics::v1::number_data_point::Value::AsDouble(2.0)),
            "the values at shutdown"
        );
        assert_eq!(
            sum.data_points[0].start_time_unix_nano, 0,
            "created at the epoch"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn failures_are_counted_and_the_loop_goes_on() {
        let sink = Recording {
            fail: true,
            ..Recording::default()
        };
        let (_counter, collect) = source();
        let counters = OtlpExportMetrics::default();
        let stop = CancellationToken::new();
        let task = tokio::spawn(export_loop(
            sink,
            collect,
            Exporter::new(&settings(None), SystemTime::now()),
            counters.clone(),
            stop.clone(),
        ));
        tokio::time::sleep(Duration::from_millis(3_500)).await;
        stop.cancel();
        task.await.unwrap();
        assert_eq!(counters.failure.get(), 4, "3 intervals and the last one");
        assert_eq!(counters.success.get(), 0);
    }

    /// A sink that never answers.
    struct Stuck;

    impl Sink for Stuck {
        async fn send(&mut self, _: ExportMetricsServiceRequest) -> Result<(), ExportError> {
            std::future::pending().await
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_stuck_collector_bounds_every_export_and_shutdown() {
        let (_counter, collect) = source();
        let counters = OtlpExportMetrics::default();
        let stop = CancellationToken::new();
        let task = tokio::spawn(export_loop(
            Stuck,
            collect,
            Exporter::new(&settings(None), SystemTime::now()),
            counters.clone(),
            stop.clone(),
        ));
        // First export at 1 s, timed out at 6 s; the next at 7 s.
        tokio::time::sleep(Duration::from_millis(6_500)).await;
        assert_eq!(counters.failure.get(), 1);
        let stopped = Instant::now();
        stop.cancel();
        task.await.unwrap();
        assert_eq!(
            stopped.elapsed(),
            FINAL_EXPORT_TIMEOUT,
            "the slow export is dropped, the last one bounded"
        );
        assert_eq!(counters.failure.get(), 2);
    }

    #[test]
    fn settings_follow_the_bootstrap() {
        let parse = |telemetry: &str| {
            weft_config::parse_bootstrap(
                &format!("[telemetry]\n{telemetry}"),
                std::path::Path::new("b.toml"),
            )
            .unwrap()
        };
        assert!(
            ExportSettings::from_bootstrap(
                &parse("otlp_endpoint = \"http://127.0.0.1:4317\""),
                None
            )
            .is_none()
        );
        let on = ExportSettings::from_bootstrap(
            &parse("otlp_endpoint = \"http://127.0.0.1:4317\"\notlp_metrics = true"),
            Some("i".to_owned()),
        )
        .unwrap();
        assert_eq!(on.endpoint, "http://127.0.0.1:4317");
        assert_eq!(on.interval, Duration::from_secs(15));
        assert_eq!(on.service_name, "weft-proxy");
        assert_eq!(on.instance_id.as_deref(), Some("i"));
    }
}
