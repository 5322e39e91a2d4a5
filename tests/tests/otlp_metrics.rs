//! Scenario: a sidecar exports its metrics over OTLP/gRPC too.
//!
//! With `otlp_metrics = true` and a 1 s interval, after known traffic the
//! in-process receiver ([`Collector`]) gets `weft_requests_total` as a
//! cumulative monotonic Sum with the exact count and the Prometheus labels as
//! attributes, `weft_request_duration_seconds` as a cumulative Histogram with
//! the same count and the latency bounds, and `weft_config_version` as a
//! Gauge of 1, under the resource's `service.name` and `service.instance.id`;
//! `/metrics` counts the exports. Without `otlp_metrics` nothing arrives;
//! with a long interval the export at shutdown still carries the last values;
//! a collector that is down is counted, logged once, and delays shutdown by
//! at most the last export's bound.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{Context as _, bail, ensure};
use opentelemetry_proto::tonic::metrics::v1::{
    AggregationTemporality, HistogramDataPoint, NumberDataPoint, metric, number_data_point,
};
use weft_tests::backend::Backend;
use weft_tests::client::Client;
use weft_tests::config::{Bootstrap, DirService};
use weft_tests::eventually;
use weft_tests::otlp::{Attr, Collector, ReceivedMetric, attributes};
use weft_tests::process::{Proxy, Signal};

/// Several 1 s intervals on a loaded machine.
const WITHIN: Duration = Duration::from_secs(10);

/// The latency buckets of `weft_request_duration_seconds` (docs/telemetry.md).
const LATENCY_BOUNDS: [f64; 14] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

async fn start(collector: &Collector, app: &Backend, keys: &str) -> anyhow::Result<Proxy> {
    let telemetry = format!("otlp_endpoint = {:?}\n{keys}", collector.endpoint());
    Proxy::start(
        Bootstrap::new()
            .app("checkout", app.addr())
            .telemetry(&telemetry)
            .service(DirService::new("billing").endpoint(app.addr()))
            .render(),
    )
    .await
}

/// The attributes of an outbound request to billing that got a 200.
fn billing_ok() -> BTreeMap<String, Attr> {
    [
        ("direction", "outbound"),
        // The sidecar's own [service] name: the calling side of the edge.
        ("caller", "checkout"),
        ("service", "billing"),
        ("route", ""),
        ("status_code", "200"),
        ("classification", "success"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), Attr::Str(v.to_owned())))
    .collect()
}

fn sum_point<'a>(
    m: &'a ReceivedMetric,
    attrs: &BTreeMap<String, Attr>,
) -> anyhow::Result<&'a NumberDataPoint> {
    let Some(metric::Data::Sum(sum)) = &m.metric.data else {
        bail!("{} is not a Sum: {:?}", m.metric.name, m.metric);
    };
    ensure!(sum.is_monotonic, "{} is not monotonic", m.metric.name);
    ensure!(
        sum.aggregation_temporality == AggregationTemporality::Cumulative as i32,
        "{} is not cumulative",
        m.metric.name
    );
    sum.data_points
        .iter()
        .find(|p| attributes(&p.attributes) == *attrs)
        .with_context(|| format!("no {} point with {attrs:?}: {sum:#?}", m.metric.name))
}

fn histogram_point<'a>(
    m: &'a ReceivedMetric,
    attrs: &BTreeMap<String, Attr>,
) -> anyhow::Result<&'a HistogramDataPoint> {
    let Some(metric::Data::Histogram(h)) = &m.metric.data else {
        bail!("{} is not a Histogram: {:?}", m.metric.name, m.metric);
    };
    ensure!(
        h.aggregation_temporality == AggregationTemporality::Cumulative as i32,
        "{} is not cumulative",
        m.metric.name
    );
    h.data_points
        .iter()
        .find(|p| attributes(&p.attributes) == *attrs)
        .with_context(|| format!("no {} point with {attrs:?}", m.metric.name))
}

fn value(point: &NumberDataPoint) -> Option<f64> {
    match point.value? {
        number_data_point::Value::AsDouble(v) => Some(v),
        number_data_point::Value::AsInt(v) => Some(v as f64),
    }
}

/// The exported count of outbound 200s to billing, once it is `n`.
async fn wait_for_requests(collector: &Collector, n: f64) -> anyhow::Result<ReceivedMetric> {
    eventually(WITHIN, || async {
        let m = collector
            .metric("weft_requests_total")
            .context("no weft_requests_total exported yet")?;
        let got = value(sum_point(&m, &billing_ok())?);
        ensure!(
            got == Some(n),
            "weft_requests_total {got:?}, waiting for {n}"
        );
        Ok(m)
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_are_exported_every_interval() -> anyhow::Result<()> {
    let collector = Collector::start().await?;
    let app = Backend::start("app").await?;
    let proxy = start(
        &collector,
        &app,
        "otlp_metrics = true\notlp_metrics_interval = \"1s\"",
    )
    .await?;
    let client = Client::absolute(proxy.outbound());
    for _ in 0..3 {
        client.get("http://billing/").await?.expect_status(200)?;
    }

    let requests = wait_for_requests(&collector, 3.0).await?;
    let point = sum_point(&requests, &billing_ok())?;
    ensure!(
        point.start_time_unix_nano > 0 && point.start_time_unix_nano < point.time_unix_nano,
        "start {} time {}",
        point.start_time_unix_nano,
        point.time_unix_nano
    );
    ensure!(
        requests.resource_str("service.name") == Some("checkout"),
        "{:?}",
        requests.resource
    );
    let instance = requests.resource_str("service.instance.id").unwrap_or("");
    ensure!(
        instance.ends_with(&format!("-{}", proxy.pid())),
        "service.instance.id {instance:?}: host name and pid"
    );

    // The histogram of the same requests, from the same export or a later one.
    let durations = collector
        .metric("weft_request_duration_seconds")
        .context("no weft_request_duration_seconds")?;
    let h = histogram_point(&durations, &billing_ok())?;
    ensure!(h.count == 3, "histogram count {}", h.count);
    ensure!(
        h.explicit_bounds == LATENCY_BOUNDS,
        "{:?}",
        h.explicit_bounds
    );
    ensure!(
        h.bucket_counts.len() == LATENCY_BOUNDS.len() + 1
            && h.bucket_counts.iter().sum::<u64>() == 3,
        "bucket counts {:?}: one per bucket, each bucket's own",
        h.bucket_counts
    );
    ensure!(h.sum.is_some_and(|s| s > 0.0), "sum {:?}", h.sum);

    let version = collector
        .metric("weft_config_version")
        .context("no weft_config_version")?;
    let Some(metric::Data::Gauge(gauge)) = &version.metric.data else {
        bail!("weft_config_version is not a Gauge: {:?}", version.metric);
    };
    ensure!(
        gauge.data_points.len() == 1 && value(&gauge.data_points[0]) == Some(1.0),
        "{gauge:?}"
    );

    // More traffic shows in a later export: the values are cumulative.
    client.get("http://billing/").await?.expect_status(200)?;
    wait_for_requests(&collector, 4.0).await?;

    // /metrics counts the exports, and agrees with what was exported.
    let m = proxy.admin_client().metrics().await?;
    ensure!(
        m.value("weft_otlp_metrics_exports_total", &[("result", "success")])? >= 2.0,
        "exports counted"
    );
    ensure!(m.value("weft_otlp_metrics_exports_total", &[("result", "failure")])? == 0.0);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_otlp_metrics_nothing_is_exported() -> anyhow::Result<()> {
    let collector = Collector::start().await?;
    let app = Backend::start("app").await?;
    let proxy = start(&collector, &app, "otlp_metrics_interval = \"1s\"").await?;
    let client = Client::absolute(proxy.outbound());
    client.get("http://billing/").await?.expect_status(200)?;
    // The span arrives (same endpoint), metrics do not.
    collector.wait_for(1, WITHIN).await?;
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    ensure!(
        collector.metric_exports().is_empty(),
        "metrics exported without otlp_metrics"
    );
    let m = proxy.admin_client().metrics().await?;
    ensure!(m.value("weft_otlp_metrics_exports_total", &[("result", "success")])? == 0.0);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_last_values_are_exported_at_shutdown() -> anyhow::Result<()> {
    let collector = Collector::start().await?;
    let app = Backend::start("app").await?;
    let proxy = start(
        &collector,
        &app,
        "otlp_metrics = true\notlp_metrics_interval = \"10m\"",
    )
    .await?;
    let client = Client::absolute(proxy.outbound());
    for _ in 0..2 {
        client.get("http://billing/").await?.expect_status(200)?;
    }
    ensure!(collector.metric_exports().is_empty(), "none before 10m");
    proxy.signal(Signal::Term)?;
    let status = proxy.wait_exit(WITHIN).await?;
    ensure!(status.success(), "exit status {status}");
    ensure!(
        collector.metric_exports().len() == 1,
        "one export, at shutdown: {}",
        collector.metric_exports().len()
    );
    wait_for_requests(&collector, 2.0).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_collector_is_counted_logged_once_and_does_not_hold_up_shutdown()
-> anyhow::Result<()> {
    let dead = weft_tests::closed_port()?;
    let app = Backend::start("app").await?;
    let proxy = Proxy::start(
        Bootstrap::new()
            .telemetry(&format!(
                "otlp_endpoint = \"http://{dead}\"\notlp_metrics = true\notlp_metrics_interval = \"1s\""
            ))
            .service(DirService::new("billing").endpoint(app.addr()))
            .render(),
    )
    .await?;
    let client = Client::absolute(proxy.outbound());
    client.get("http://billing/").await?.expect_status(200)?;
    let admin = proxy.admin_client();
    eventually(WITHIN, || async {
        let m = admin.metrics().await?;
        let failed = m.value("weft_otlp_metrics_exports_total", &[("result", "failure")])?;
        ensure!(failed >= 2.0, "failed exports: {failed}");
        ensure!(m.value("weft_otlp_metrics_exports_total", &[("result", "success")])? == 0.0);
        Ok(())
    })
    .await?;
    let warnings = proxy.logs().matches("OTLP metrics export failed").count();
    ensure!(
        warnings == 1,
        "{warnings} warnings for one outage:\n{}",
        proxy.logs()
    );

    let stopping = std::time::Instant::now();
    proxy.signal(Signal::Term)?;
    let status = proxy.wait_exit(WITHIN).await?;
    ensure!(status.success(), "exit status {status}");
    ensure!(
        stopping.elapsed() < Duration::from_secs(4),
        "shutdown took {:?} (the last export is bounded by 2 s)",
        stopping.elapsed()
    );
    Ok(())
}
