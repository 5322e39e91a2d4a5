//! An OTLP/gRPC receiver: what a collector would get from the proxies.
//!
//! [`Collector::start`] listens on `127.0.0.1:0` and serves the OTLP
//! `TraceService` and `MetricsService` (the tonic servers generated in
//! `opentelemetry-proto`) over HTTP/2, on one port as a collector does. Every
//! span of every trace export is kept as a [`ReceivedSpan`], with its
//! resource's `service.name`; every metrics export is kept whole
//! ([`Collector::metric_exports`], [`Collector::metric`]). Dropping the
//! collector stops it.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::bail;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use opentelemetry_proto::tonic::collector::metrics::v1::metrics_service_server::{
    MetricsService, MetricsServiceServer,
};
use opentelemetry_proto::tonic::collector::metrics::v1::{
    ExportMetricsServiceRequest, ExportMetricsServiceResponse,
};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue, any_value};
use opentelemetry_proto::tonic::metrics::v1::Metric;
use opentelemetry_proto::tonic::trace::v1::span::SpanKind;
use opentelemetry_proto::tonic::trace::v1::status::StatusCode;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tower::Service as _;

/// An attribute value, as far as the tests need to tell them apart.
#[derive(Debug, Clone, PartialEq)]
pub enum Attr {
    Str(String),
    Int(i64),
    Other(String),
}

/// One span as the collector received it.
#[derive(Debug, Clone)]
pub struct ReceivedSpan {
    /// The exporting resource's `service.name`.
    pub service_name: String,
    /// Lowercase hex, 32 digits.
    pub trace_id: String,
    /// Lowercase hex, 16 digits.
    pub span_id: String,
    /// Lowercase hex; empty for a root span.
    pub parent_span_id: String,
    pub name: String,
    pub kind: SpanKind,
    pub status: StatusCode,
    pub status_message: String,
    pub attributes: BTreeMap<String, Attr>,
}

impl ReceivedSpan {
    /// A string attribute.
    pub fn str(&self, key: &str) -> Option<&str> {
        match self.attributes.get(key) {
            Some(Attr::Str(s)) => Some(s),
            _ => None,
        }
    }

    /// An integer attribute.
    pub fn int(&self, key: &str) -> Option<i64> {
        match self.attributes.get(key) {
            Some(Attr::Int(i)) => Some(*i),
            _ => None,
        }
    }

    /// The `weft.direction` attribute (`inbound`, `outbound`).
    pub fn direction(&self) -> Option<&str> {
        self.str("weft.direction")
    }
}

#[derive(Debug, Default)]
struct Received {
    spans: Mutex<Vec<ReceivedSpan>>,
    requests: Mutex<usize>,
    metrics: Mutex<Vec<ExportMetricsServiceRequest>>,
}

/// One metric of a metrics export, with its resource's attributes.
#[derive(Debug, Clone)]
pub struct ReceivedMetric {
    /// The exporting resource's attributes (`service.name`, ...).
    pub resource: BTreeMap<String, Attr>,
    pub metric: Metric,
}

impl ReceivedMetric {
    /// A string attribute of the resource.
    pub fn resource_str(&self, key: &str) -> Option<&str> {
        match self.resource.get(key) {
            Some(Attr::Str(s)) => Some(s),
            _ => None,
        }
    }
}

/// `kvs` as a map, for comparing attributes.
pub fn attributes(kvs: &[KeyValue]) -> BTreeMap<String, Attr> {
    kvs.iter().map(|kv| (kv.key.clone(), attr(kv))).collect()
}

#[derive(Debug)]
struct Receiver(Arc<Received>);

#[tonic::async_trait]
impl TraceService for Receiver {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut spans = Vec::new();
        for resource_spans in request.into_inner().resource_spans {
            let service_name = resource_spans
                .resource
                .as_ref()
                .and_then(|r| r.attributes.iter().find(|kv| kv.key == "service.name"))
                .and_then(|kv| match attr(kv) {
                    Attr::Str(s) => Some(s),
                    _ => None,
                })
                .unwrap_or_default();
            for scope in resource_spans.scope_spans {
                for span in scope.spans {
                    let status = span.status.clone().unwrap_or_default();
                    spans.push(ReceivedSpan {
                        service_name: service_name.clone(),
                        trace_id: hex(&span.trace_id),
                        span_id: hex(&span.span_id),
                        parent_span_id: hex(&span.parent_span_id),
                        name: span.name.clone(),
                        kind: SpanKind::try_from(span.kind).unwrap_or(SpanKind::Unspecified),
                        status: StatusCode::try_from(status.code).unwrap_or(StatusCode::Unset),
                        status_message: status.message,
                        attributes: span
                            .attributes
                            .iter()
                            .map(|kv| (kv.key.clone(), attr(kv)))
                            .collect(),
                    });
                }
            }
        }
        self.0.spans.lock().unwrap().extend(spans);
        *self.0.requests.lock().unwrap() += 1;
        Ok(tonic::Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

#[derive(Debug)]
struct MetricsReceiver(Arc<Received>);

#[tonic::async_trait]
impl MetricsService for MetricsReceiver {
    async fn export(
        &self,
        request: tonic::Request<ExportMetricsServiceRequest>,
    ) -> Result<tonic::Response<ExportMetricsServiceResponse>, tonic::Status> {
        self.0.metrics.lock().unwrap().push(request.into_inner());
        Ok(tonic::Response::new(ExportMetricsServiceResponse {
            partial_success: None,
        }))
    }
}

fn attr(kv: &KeyValue) -> Attr {
    match kv.value.as_ref().and_then(|v: &AnyValue| v.value.as_ref()) {
        Some(any_value::Value::StringValue(s)) => Attr::Str(s.clone()),
        Some(any_value::Value::IntValue(i)) => Attr::Int(*i),
        other => Attr::Other(format!("{other:?}")),
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A running OTLP/gRPC trace receiver; stops on drop.
#[derive(Debug)]
pub struct Collector {
    addr: SocketAddr,
    received: Arc<Received>,
    task: JoinHandle<()>,
}

impl Collector {
    /// Listens on `127.0.0.1:0` and serves until dropped.
    pub async fn start() -> anyhow::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let received = Arc::new(Received::default());
        let traces = TraceServiceServer::new(Receiver(Arc::clone(&received)));
        let metrics = MetricsServiceServer::new(MetricsReceiver(Arc::clone(&received)));
        // One port for both, routed by gRPC path, as a collector serves them.
        let service = tower::service_fn(move |request: http::Request<hyper::body::Incoming>| {
            let (mut traces, mut metrics) = (traces.clone(), metrics.clone());
            async move {
                if request
                    .uri()
                    .path()
                    .starts_with("/opentelemetry.proto.collector.metrics.")
                {
                    metrics.call(request).await
                } else {
                    traces.call(request).await
                }
            }
        });
        let task = tokio::spawn(async move {
            let mut builder = auto::Builder::new(TokioExecutor::new()).http2_only();
            builder.http2().timer(hyper_util::rt::TokioTimer::new());
            let mut connections = tokio::task::JoinSet::new();
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let service = hyper_util::service::TowerToHyperService::new(service.clone());
                let conn = builder
                    .serve_connection(TokioIo::new(stream), service)
                    .into_owned();
                connections.spawn(async move {
                    let _ = conn.await;
                });
            }
        });
        Ok(Self {
            addr,
            received,
            task,
        })
    }

    /// The receiver's address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The `otlp_endpoint` value for a proxy's `[telemetry]`.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Every span received so far.
    pub fn spans(&self) -> Vec<ReceivedSpan> {
        self.received.spans.lock().unwrap().clone()
    }

    /// Export requests received so far.
    pub fn requests(&self) -> usize {
        *self.received.requests.lock().unwrap()
    }

    /// Every metrics export request received so far, oldest first.
    pub fn metric_exports(&self) -> Vec<ExportMetricsServiceRequest> {
        self.received.metrics.lock().unwrap().clone()
    }

    /// The metric `name` in the latest metrics export that has it.
    pub fn metric(&self, name: &str) -> Option<ReceivedMetric> {
        let exports = self.received.metrics.lock().unwrap();
        exports.iter().rev().find_map(|export| {
            export.resource_metrics.iter().find_map(|rm| {
                let metric = rm
                    .scope_metrics
                    .iter()
                    .flat_map(|sm| &sm.metrics)
                    .find(|m| m.name == name)?;
                Some(ReceivedMetric {
                    resource: rm
                        .resource
                        .as_ref()
                        .map(|r| attributes(&r.attributes))
                        .unwrap_or_default(),
                    metric: metric.clone(),
                })
            })
        })
    }

    /// Waits until at least `n` spans were received; returns them all.
    pub async fn wait_for(&self, n: usize, timeout: Duration) -> anyhow::Result<Vec<ReceivedSpan>> {
        crate::eventually(timeout, || async {
            let spans = self.spans();
            if spans.len() < n {
                bail!(
                    "{} span(s) received, waiting for {n}: {spans:#?}",
                    spans.len()
                );
            }
            Ok(spans)
        })
        .await
    }
}

impl Drop for Collector {
    fn drop(&mut self) {
        self.task.abort();
    }
}
