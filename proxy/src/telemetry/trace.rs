//! Request spans: OpenTelemetry, exported over OTLP/gRPC.
//!
//! With `[telemetry] otlp_endpoint` set, every proxied request gets one span
//! ([`Traces::start_span`]), started when the request arrives and ended by its
//! [`super::Observation`] when the response body ends. The W3C trace context
//! (`traceparent`, `tracestate`) of the incoming request is its parent; the
//! span's own context replaces it in the request that is forwarded, so the
//! next hop (another sidecar, or the app) continues the same trace. Sampling
//! is parent-based, with `sampling_ratio` for new traces; an unsampled
//! request still carries its (unsampled) context onwards.
//!
//! The request path never waits on export: ending a sampled span hands its
//! data to [`SpanQueue`], which `try_send`s it into a bounded channel and
//! counts a drop when the channel is full. A background task takes batches
//! off the channel (at most [`MAX_BATCH`] spans, at least every
//! [`EXPORT_INTERVAL`]) and exports them with the OTLP exporter, each export
//! bounded by [`EXPORT_TIMEOUT`]; a batch that fails is dropped and counted.
//! [`Traces::shutdown`] exports what is queued, within a bounded time.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::{HeaderMap, HeaderName, HeaderValue};
use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::{
    SpanBuilder, SpanContext, SpanKind, TraceContextExt, Tracer as _, TracerProvider as _,
};
use opentelemetry::{Context, InstrumentationScope, KeyValue};
use opentelemetry_otlp::{WithExportConfig, WithTonicConfig};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{
    Sampler, SdkTracer, SdkTracerProvider, Span, SpanData, SpanExporter, SpanProcessor,
};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::MissedTickBehavior;
use tokio_util::sync::CancellationToken;

use super::metrics::SpanMetrics;

/// Finished spans waiting for export; more are dropped (and counted).
pub const QUEUE_CAPACITY: usize = 2048;
/// The most spans sent in one export request.
pub const MAX_BATCH: usize = 512;
/// The longest a finished span waits in the queue before its batch is sent.
pub const EXPORT_INTERVAL: Duration = Duration::from_millis(500);
/// One export request, retries included, ends within this.
pub const EXPORT_TIMEOUT: Duration = Duration::from_secs(5);
/// Connecting to the collector gives up after this.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);

const TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");
const TRACESTATE: HeaderName = HeaderName::from_static("tracestate");

/// Why the span pipeline could not be built.
#[derive(Debug, thiserror::Error)]
pub enum TraceError {
    #[error("[telemetry] otlp_endpoint {endpoint:?}: {reason}")]
    Endpoint { endpoint: String, reason: String },
    #[error("building the OTLP span exporter: {0}")]
    Exporter(#[from] opentelemetry_otlp::ExporterBuildError),
}

/// What the pipeline is built from (`[telemetry]`, resolved).
#[derive(Debug, Clone)]
pub struct TraceSettings {
    /// `http://host:port` of an OTLP/gRPC collector.
    pub endpoint: String,
    /// Root sampling ratio, 0.0 to 1.0.
    pub sampling_ratio: f64,
    /// The `service.name` resource attribute.
    pub service_name: String,
}

/// The tracer and the export pipeline behind it; cheap to clone.
#[derive(Debug, Clone)]
pub struct Traces {
    tracer: SdkTracer,
    propagator: TraceContextPropagator,
    pipeline: Arc<Pipeline>,
}

#[derive(Debug)]
struct Pipeline {
    provider: SdkTracerProvider,
    stop: CancellationToken,
    task: Mutex<Option<JoinHandle<()>>>,
}

impl Traces {
    /// Builds the tracer and spawns the export task (needs a Tokio runtime).
    /// Nothing connects yet: the collector is first dialled by the first
    /// export, so a missing collector does not slow start-up.
    pub fn start(settings: &TraceSettings, metrics: &SpanMetrics) -> Result<Self, TraceError> {
        let endpoint_error = |reason: String| TraceError::Endpoint {
            endpoint: settings.endpoint.clone(),
            reason,
        };
        if settings.endpoint.starts_with("https://") {
            return Err(endpoint_error(
                "https is not supported yet (the sidecar has no TLS client until mTLS lands)"
                    .to_owned(),
            ));
        }
        let channel = tonic::transport::Endpoint::from_shared(settings.endpoint.clone())
            .map_err(|e| endpoint_error(e.to_string()))?
            .connect_timeout(CONNECT_TIMEOUT)
            .timeout(EXPORT_TIMEOUT)
            .connect_lazy();
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .with_channel(channel)
            .with_timeout(EXPORT_TIMEOUT)
            .with_retry_policy(
                opentelemetry_otlp::RetryPolicy::recommended()
                    .with_max_retries(2)
                    .with_max_delay(Duration::from_millis(500)),
            )
            .build()?;
        Ok(Self::with_exporter(settings, exporter, metrics))
    }

    /// The pipeline with any exporter (tests use one that records batches).
    pub fn with_exporter<E: SpanExporter + 'static>(
        settings: &TraceSettings,
        mut exporter: E,
        metrics: &SpanMetrics,
    ) -> Self {
        let resource = Resource::builder_empty()
            .with_service_name(settings.service_name.clone())
            .build();
        exporter.set_resource(&resource);
        let (queue, rx) = SpanQueue::new(QUEUE_CAPACITY, metrics.queue_full.clone());
        let provider = SdkTracerProvider::builder()
            .with_span_processor(queue)
            .with_sampler(Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(
                settings.sampling_ratio,
            ))))
            .with_resource(resource)
            .build();
        let tracer = provider.tracer_with_scope(
            InstrumentationScope::builder("weft-proxy")
                .with_version(env!("CARGO_PKG_VERSION"))
                .build(),
        );
        let stop = CancellationToken::new();
        let task = tokio::spawn(export_loop(rx, exporter, metrics.clone(), stop.clone()));
        Self {
            tracer,
            propagator: TraceContextPropagator::new(),
            pipeline: Arc::new(Pipeline {
                provider,
                stop,
                task: Mutex::new(Some(task)),
            }),
        }
    }

    /// Starts the span of a request whose headers are `headers`: its parent
    /// is the trace context they carry (none: a new trace), and its own
    /// context replaces theirs, for the hop the request is forwarded to.
    pub fn start_span(
        &self,
        kind: SpanKind,
        name: impl Into<std::borrow::Cow<'static, str>>,
        headers: &mut HeaderMap,
        attributes: Vec<KeyValue>,
    ) -> Span {
        let parent = extract(&self.propagator, headers);
        let span = self.tracer.build_with_context(
            SpanBuilder::from_name(name)
                .with_kind(kind)
                .with_attributes(attributes),
            &parent,
        );
        inject(
            &self.propagator,
            opentelemetry::trace::Span::span_context(&span),
            headers,
        );
        span
    }

    /// Exports the spans still queued, then stops the pipeline; gives up
    /// after `timeout` (spans still queued then are lost). Spans ended after
    /// this are not exported.
    pub async fn shutdown(&self, timeout: Duration) {
        self.pipeline.stop.cancel();
        let task = self
            .pipeline
            .task
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take();
        if let Some(mut task) = task
            && tokio::time::timeout(timeout, &mut task).await.is_err()
        {
            task.abort();
            tracing::warn!(
                timeout_ms = timeout.as_millis() as u64,
                "span export did not finish in time; spans still queued are lost"
            );
        }
        // Our processor's shutdown returns at once; the exporter was shut
        // down by the export task.
        let _ = self.pipeline.provider.shutdown_with_timeout(timeout);
    }
}

/// The trace context `headers` carry, as a parent (an empty context when
/// they carry none, or an invalid one).
pub fn extract(propagator: &TraceContextPropagator, headers: &HeaderMap) -> Context {
    propagator.extract_with_context(&Context::new(), &HeaderExtractor(headers))
}

/// Replaces the trace context in `headers` with `span` (as its parent).
pub fn inject(propagator: &TraceContextPropagator, span: &SpanContext, headers: &mut HeaderMap) {
    headers.remove(TRACEPARENT);
    headers.remove(TRACESTATE);
    let cx = Context::new().with_remote_span_context(span.clone());
    propagator.inject_context(&cx, &mut HeaderInjector(headers));
}

/// Reads trace-context headers (the first value of each).
struct HeaderExtractor<'a>(&'a HeaderMap);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(HeaderName::as_str).collect()
    }
}

/// Writes trace-context headers; an empty `tracestate` is left out.
struct HeaderInjector<'a>(&'a mut HeaderMap);

impl Injector for HeaderInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        if value.is_empty() {
            return;
        }
        if let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(key.as_bytes()),
            HeaderValue::from_str(&value),
        ) {
            self.0.insert(name, value);
        }
    }
}

/// The span processor: hands each finished sampled span to the export task
/// without waiting, or drops it (counted) when the queue is full.
#[derive(Debug)]
pub struct SpanQueue {
    tx: mpsc::Sender<SpanData>,
    dropped: prometheus_client::metrics::counter::Counter,
}

impl SpanQueue {
    /// A queue of `capacity` spans and its receiving end.
    pub fn new(
        capacity: usize,
        dropped: prometheus_client::metrics::counter::Counter,
    ) -> (Self, mpsc::Receiver<SpanData>) {
        let (tx, rx) = mpsc::channel(capacity.max(1));
        (Self { tx, dropped }, rx)
    }
}

impl SpanProcessor for SpanQueue {
    fn on_start(&self, _span: &mut Span, _cx: &Context) {}

    fn on_end(&self, span: SpanData) {
        if !span.span_context.is_sampled() {
            return;
        }
        if self.tx.try_send(span).is_err() {
            self.dropped.inc();
        }
    }

    fn force_flush(&self) -> OTelSdkResult {
        Ok(())
    }

    fn shutdown_with_timeout(&self, _timeout: Duration) -> OTelSdkResult {
        Ok(())
    }
}

/// Exports batches until `stop`, then what is left in the queue.
async fn export_loop<E: SpanExporter>(
    mut rx: mpsc::Receiver<SpanData>,
    exporter: E,
    metrics: SpanMetrics,
    stop: CancellationToken,
) {
    let mut batch = Vec::with_capacity(MAX_BATCH);
    let mut tick = tokio::time::interval(EXPORT_INTERVAL);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut failing = false;
    loop {
        let room = MAX_BATCH - batch.len();
        tokio::select! {
            biased;
            () = stop.cancelled() => break,
            received = rx.recv_many(&mut batch, room) => {
                if received == 0 {
                    break;
                }
                if batch.len() < MAX_BATCH {
                    continue;
                }
            }
            _ = tick.tick() => {
                if batch.is_empty() {
                    continue;
                }
            }
        }
        export(&exporter, &mut batch, &metrics, &mut failing).await;
    }
    // Flush: whatever was queued when the pipeline stopped.
    rx.close();
    while let Some(span) = rx.recv().await {
        batch.push(span);
        if batch.len() == MAX_BATCH {
            export(&exporter, &mut batch, &metrics, &mut failing).await;
        }
    }
    if !batch.is_empty() {
        export(&exporter, &mut batch, &metrics, &mut failing).await;
    }
    let _ = exporter.shutdown_with_timeout(EXPORT_TIMEOUT);
}

/// Sends `batch` (emptying it) and counts the outcome; logs when export
/// starts failing and when it recovers, not for every batch.
async fn export<E: SpanExporter>(
    exporter: &E,
    batch: &mut Vec<SpanData>,
    metrics: &SpanMetrics,
    failing: &mut bool,
) {
    let spans = std::mem::replace(batch, Vec::with_capacity(MAX_BATCH));
    let count = spans.len() as u64;
    let result = tokio::time::timeout(EXPORT_TIMEOUT, exporter.export(spans)).await;
    match result {
        Ok(Ok(())) => {
            metrics.exported.inc_by(count);
            if std::mem::replace(failing, false) {
                tracing::info!("span export recovered");
            }
        }
        Ok(Err(error)) => {
            metrics.export_failed.inc_by(count);
            if !std::mem::replace(failing, true) {
                tracing::warn!(%error, spans = count, "span export failed; dropping spans until it works again");
            }
        }
        Err(_) => {
            metrics.export_failed.inc_by(count);
            if !std::mem::replace(failing, true) {
                tracing::warn!(
                    timeout_ms = EXPORT_TIMEOUT.as_millis() as u64,
                    spans = count,
                    "span export timed out; dropping spans until it works again"
                );
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use opentelemetry::trace::{Span as _, SpanId, TraceFlags, TraceId, TraceState};

    use super::*;

    /// An exporter that counts the spans it was given, or fails.
    #[derive(Debug, Clone, Default)]
    struct Counting {
        spans: Arc<AtomicUsize>,
        fail: bool,
    }

    impl SpanExporter for Counting {
        async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
            if self.fail {
                return Err(opentelemetry_sdk::error::OTelSdkError::InternalFailure(
                    "down".to_owned(),
                ));
            }
            self.spans.fetch_add(batch.len(), Ordering::SeqCst);
            Ok(())
        }
    }

    fn settings(ratio: f64) -> TraceSettings {
        TraceSettings {
            endpoint: "http://127.0.0.1:4317".to_owned(),
            sampling_ratio: ratio,
            service_name: "test".to_owned(),
        }
    }

    fn end_spans(provider: &SdkTracerProvider, n: usize) {
        let tracer = provider.tracer("t");
        for _ in 0..n {
            tracer.start("s").end();
        }
    }

    #[tokio::test]
    async fn a_full_queue_drops_and_counts() {
        let metrics = SpanMetrics::default();
        let (queue, rx) = SpanQueue::new(2, metrics.queue_full.clone());
        let provider = SdkTracerProvider::builder()
            .with_span_processor(queue)
            .build();
        end_spans(&provider, 5);
        assert_eq!(metrics.queue_full.get(), 3, "2 queued, 3 dropped");

        let exporter = Counting::default();
        let stop = CancellationToken::new();
        stop.cancel();
        export_loop(rx, exporter.clone(), metrics.clone(), stop).await;
        assert_eq!(exporter.spans.load(Ordering::SeqCst), 2, "the queued ones");
        assert_eq!(metrics.exported.get(), 2);
        assert_eq!(metrics.export_failed.get(), 0);
    }

    #[tokio::test]
    async fn a_failed_export_drops_and_counts() {
        let metrics = SpanMetrics::default();
        let (queue, rx) = SpanQueue::new(8, metrics.queue_full.clone());
        let provider = SdkTracerProvider::builder()
            .with_span_processor(queue)
            .build();
        end_spans(&provider, 3);
        let stop = CancellationToken::new();
        stop.cancel();
        let exporter = Counting {
            fail: true,
            ..Counting::default()
        };
        export_loop(rx, exporter, metrics.clone(), stop).await;
        assert_eq!(metrics.export_failed.get(), 3);
        assert_eq!(metrics.exported.get(), 0);
        assert_eq!(metrics.queue_full.get(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn batches_leave_within_the_interval() {
        let metrics = SpanMetrics::default();
        let exporter = Counting::default();
        let traces = Traces::with_exporter(&settings(1.0), exporter.clone(), &metrics);
        let mut span = traces.start_span(SpanKind::Server, "GET", &mut HeaderMap::new(), vec![]);
        span.end();
        tokio::time::sleep(EXPORT_INTERVAL * 2).await;
        assert_eq!(exporter.spans.load(Ordering::SeqCst), 1);
        traces.shutdown(Duration::from_secs(1)).await;
        assert_eq!(metrics.exported.get(), 1);
    }

    #[tokio::test]
    async fn shutdown_flushes_what_is_queued() {
        let metrics = SpanMetrics::default();
        let exporter = Counting::default();
        let traces = Traces::with_exporter(&settings(1.0), exporter.clone(), &metrics);
        for _ in 0..3 {
            traces
                .start_span(SpanKind::Client, "GET", &mut HeaderMap::new(), vec![])
                .end();
        }
        traces.shutdown(Duration::from_secs(1)).await;
        assert_eq!(exporter.spans.load(Ordering::SeqCst), 3);
        // After shutdown, spans are not exported (nor counted as dropped).
        traces
            .start_span(SpanKind::Client, "GET", &mut HeaderMap::new(), vec![])
            .end();
        assert_eq!(metrics.exported.get(), 3);
        assert_eq!(metrics.queue_full.get(), 0);
    }

    const PARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (k, v) in pairs {
            map.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        map
    }

    #[test]
    fn extraction_reads_traceparent_and_tracestate() {
        let propagator = TraceContextPropagator::new();
        let cx = extract(
            &propagator,
            &headers(&[("traceparent", PARENT), ("tracestate", "vendor=x")]),
        );
        let span = cx.span();
        let sc = span.span_context();
        assert!(sc.is_valid() && sc.is_remote() && sc.is_sampled());
        assert_eq!(
            sc.trace_id().to_string(),
            "4bf92f3577b34da6a3ce929d0e0e4736"
        );
        assert_eq!(sc.span_id().to_string(), "00f067aa0ba902b7");
        assert_eq!(sc.trace_state().header(), "vendor=x");

        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
        ] {
            let cx = extract(&propagator, &headers(&[("traceparent", bad)]));
            assert!(!cx.span().span_context().is_valid(), "{bad:?}");
        }
    }

    #[test]
    fn injection_replaces_the_context() {
        let propagator = TraceContextPropagator::new();
        let mut map = headers(&[
            ("traceparent", PARENT),
            ("tracestate", "old=1"),
            ("x-other", "kept"),
        ]);
        let sc = SpanContext::new(
            TraceId::from_hex("0af7651916cd43dd8448eb211c80319c").unwrap(),
            SpanId::from_hex("b7ad6b7169203331").unwrap(),
            TraceFlags::SAMPLED,
            false,
            TraceState::default(),
        );
        inject(&propagator, &sc, &mut map);
        assert_eq!(
            map["traceparent"],
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
        );
        assert!(
            !map.contains_key("tracestate"),
            "an empty tracestate is left out"
        );
        assert_eq!(map["x-other"], "kept");

        let unsampled = SpanContext::new(
            sc.trace_id(),
            sc.span_id(),
            TraceFlags::default(),
            false,
            TraceState::from_key_value([("vendor", "y")]).unwrap(),
        );
        inject(&propagator, &unsampled, &mut map);
        assert_eq!(
            map["traceparent"],
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00"
        );
        assert_eq!(map["tracestate"], "vendor=y");
    }

    #[tokio::test]
    async fn a_span_continues_the_incoming_trace_and_replaces_it() {
        let metrics = SpanMetrics::default();
        let traces = Traces::with_exporter(&settings(1.0), Counting::default(), &metrics);
        let mut map = headers(&[("traceparent", PARENT)]);
        let span = traces.start_span(SpanKind::Server, "GET", &mut map, vec![]);
        let sc = opentelemetry::trace::Span::span_context(&span);
        assert_eq!(
            sc.trace_id().to_string(),
            "4bf92f3577b34da6a3ce929d0e0e4736"
        );
        assert_ne!(sc.span_id().to_string(), "00f067aa0ba902b7");
        let forwarded = map["traceparent"].to_str().unwrap();
        assert_eq!(
            forwarded,
            format!("00-4bf92f3577b34da6a3ce929d0e0e4736-{}-01", sc.span_id())
        );

        // No parent and a ratio of 0: a new, unsampled trace that still propagates.
        let unsampled = Traces::with_exporter(&settings(0.0), Counting::default(), &metrics);
        let mut map = HeaderMap::new();
        let span = unsampled.start_span(SpanKind::Client, "GET", &mut map, vec![]);
        let sc = opentelemetry::trace::Span::span_context(&span);
        assert!(sc.is_valid() && !sc.is_sampled());
        assert!(map["traceparent"].to_str().unwrap().ends_with("-00"));

        // A sampled parent wins over a ratio of 0.
        let mut map = headers(&[("traceparent", PARENT)]);
        let span = unsampled.start_span(SpanKind::Server, "GET", &mut map, vec![]);
        assert!(opentelemetry::trace::Span::span_context(&span).is_sampled());
    }
}
