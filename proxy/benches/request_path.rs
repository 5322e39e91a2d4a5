//! Micro benchmarks of the request path's per-request steps (criterion):
//!
//! - `telemetry/observe`: a request's whole metrics cost: start an
//!   observation, label it, finish it (counter + histogram);
//! - `telemetry/observe_refused`: the same for a refused request (plus the
//!   refusal counter);
//! - `telemetry/observe_traced`: `observe` with traces on: the span started
//!   (trace context extracted and injected), ended and queued for export (to
//!   an exporter that discards), and the access log line (filtered out);
//! - `route/match`: the first matching route among 8 (path prefix, method,
//!   header), and no match;
//! - `rate_limit/check`: one GCRA check that admits;
//! - `headers/rewrite`: hop-by-hop removal and forwarding headers on a
//!   typical request head.
//!
//! `cargo bench -p weft-proxy --bench request_path` (add `-- --quick` for a
//! short run). Criterion reports the time per iteration.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::hint::black_box;
use std::sync::Arc;

use criterion::{Criterion, criterion_group, criterion_main};
use http::{HeaderMap, HeaderValue, Method, Request, Response};
use weft_core::body;
use weft_core::error::ProxyError;
use weft_core::headers;
use weft_core::limits::{RateLimit, Share};
use weft_core::route::RouteTable;
use weft_proxy::telemetry::{Direction, Metrics, Observation, Reporters, TraceSettings, Traces};
use weft_stack::observe::Observation as _;
use weft_stack::respond::error_response;

/// An exporter that accepts and discards every batch.
#[derive(Debug)]
struct Discard;

impl opentelemetry_sdk::trace::SpanExporter for Discard {
    async fn export(
        &self,
        _batch: Vec<opentelemetry_sdk::trace::SpanData>,
    ) -> opentelemetry_sdk::error::OTelSdkResult {
        Ok(())
    }
}

fn telemetry(c: &mut Criterion) {
    let metrics = Arc::new(Metrics::new(false));
    let reporters = Arc::new(Reporters {
        metrics: Arc::clone(&metrics),
        traces: None,
        access_log: false,
    });
    let mut req = Request::new(());
    let service: Arc<str> = Arc::from("billing");
    let route: Arc<str> = Arc::from("charge");
    let caller: Arc<str> = Arc::from("checkout");
    c.bench_function("telemetry/observe", |b| {
        b.iter(|| {
            let mut obs = Observation::start(
                &reporters,
                Direction::Outbound,
                Arc::clone(&caller),
                &mut req,
            );
            obs.context().set_service(&service, None);
            obs.context().set_route(&route);
            let rsp = Response::new(body::empty());
            obs.respond(&rsp);
            obs.finish(false);
            black_box(rsp);
        });
    });
    c.bench_function("telemetry/observe_refused", |b| {
        let error = ProxyError::NoEndpoints {
            service: "billing".into(),
        };
        b.iter(|| {
            let mut obs = Observation::start(
                &reporters,
                Direction::Outbound,
                Arc::clone(&caller),
                &mut req,
            );
            obs.context().set_service(&service, None);
            obs.context().set_route(&route);
            let rsp = error_response(&error, false);
            obs.respond(&rsp);
            obs.finish(false);
            black_box(rsp);
        });
    });

    let runtime = tokio::runtime::Runtime::new().unwrap();
    let _entered = runtime.enter();
    let settings = TraceSettings {
        endpoint: "http://127.0.0.1:4317".to_owned(),
        sampling_ratio: 1.0,
        service_name: "bench".to_owned(),
    };
    let traced = Arc::new(Reporters {
        metrics: Arc::clone(&metrics),
        traces: Some(Traces::with_exporter(&settings, Discard, metrics.spans())),
        access_log: true,
    });
    let mut req = Request::builder()
        .uri("http://billing/charge/1")
        .body(())
        .unwrap();
    c.bench_function("telemetry/observe_traced", |b| {
        b.iter(|| {
            let mut obs =
                Observation::start(&traced, Direction::Outbound, Arc::clone(&caller), &mut req);
            obs.context().set_service(&service, None);
            obs.context().set_route(&route);
            let rsp = Response::new(body::empty());
            obs.respond(&rsp);
            obs.finish(false);
            black_box(rsp);
        });
    });
}

fn routes(c: &mut Criterion) {
    let mut text = String::from("service = \"billing\"\n");
    for i in 0..7 {
        text.push_str(&format!(
            "[[routes]]\nname = \"r{i}\"\nmatch = {{ path_prefix = \"/api/v{i}/\", method = \"POST\", headers = [{{ name = \"x-tenant\", value = \"t{i}\" }}] }}\n"
        ));
    }
    text.push_str("[[routes]]\nname = \"charge\"\nmatch = { path_prefix = \"/charge\" }\n");
    let policy = weft_config::parse_policy(&text, std::path::Path::new("bench.toml")).unwrap();
    let table = RouteTable::new(&policy.routes);
    let headers = HeaderMap::new();
    c.bench_function("route/match_last_of_8", |b| {
        b.iter(|| black_box(table.find(&Method::GET, black_box("/charge/42"), &headers)));
    });
    c.bench_function("route/no_match", |b| {
        b.iter(|| black_box(table.find(&Method::GET, black_box("/other"), &headers)));
    });
}

fn rate_limit(c: &mut Criterion) {
    let policy = weft_config::parse_policy(
        "service = \"billing\"\n[outbound]\nrate_limit = { per_second = 1000000000, burst = 1000000 }\n",
        std::path::Path::new("bench.toml"),
    )
    .unwrap();
    let config = policy.outbound.rate_limit.unwrap();
    let limit = RateLimit::new("outbound.rate_limit", &config, Share::ONE);
    c.bench_function("rate_limit/check", |b| {
        b.iter(|| black_box(limit.check().is_ok()));
    });
}

fn header_rewrite(c: &mut Criterion) {
    let mut head = HeaderMap::new();
    for (name, value) in [
        ("host", "billing"),
        ("user-agent", "bench/1.0"),
        ("accept", "*/*"),
        ("connection", "keep-alive, x-hop"),
        ("keep-alive", "timeout=5"),
        ("x-hop", "1"),
        ("content-type", "application/json"),
        ("x-request-id", "0123456789abcdef"),
    ] {
        head.insert(name, HeaderValue::from_static(value));
    }
    let client = "10.0.0.7:50312".parse().unwrap();
    c.bench_function("headers/rewrite", |b| {
        b.iter(|| {
            let mut h = head.clone();
            headers::strip_hop_by_hop(&mut h, false);
            headers::add_forwarded(&mut h, client, Some("billing"));
            black_box(h)
        });
    });
}

criterion_group!(benches, telemetry, routes, rate_limit, header_rewrite);
criterion_main!(benches);
