//! Scenario: request spans across two sidecars, exported over OTLP/gRPC.
//!
//! Every test runs caller sidecar -> callee sidecar -> app (a static-directory
//! mesh), both sidecars exporting to one in-process OTLP receiver
//! ([`Collector`]). A request makes one trace: the caller's outbound span
//! (kind Client) is the parent of the callee's inbound span (kind Server),
//! whose context is what the app receives in `traceparent`. An incoming
//! `traceparent` is continued; `sampling_ratio = 0` exports nothing for new
//! traces but still propagates an (unsampled) context; refusals and failures
//! show in the spans' attributes and status.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use anyhow::{Context as _, bail, ensure};
use opentelemetry_proto::tonic::trace::v1::span::SpanKind;
use opentelemetry_proto::tonic::trace::v1::status::StatusCode;
use weft_tests::backend::Backend;
use weft_tests::client::Client;
use weft_tests::config::{Bootstrap, DirService};
use weft_tests::eventually;
use weft_tests::mesh::{callee_with, caller_with};
use weft_tests::otlp::{Collector, ReceivedSpan};
use weft_tests::process::{Proxy, Signal};

/// Long enough for a few export intervals (500 ms) on a loaded machine.
const SPANS_WITHIN: Duration = Duration::from_secs(10);

const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const PARENT: &str = "00f067aa0ba902b7";

struct Mesh {
    collector: Collector,
    app: Backend,
    callee: Proxy,
    caller: Proxy,
}

impl Mesh {
    /// Caller (`service_name = "web"`) -> callee (service `billing`) -> app,
    /// both sidecars with `telemetry` (extra `[telemetry]` keys) and the
    /// `billing` policy bodies given.
    async fn start(
        telemetry: &str,
        caller_policy: &str,
        callee_policy: &str,
    ) -> anyhow::Result<Self> {
        let collector = Collector::start().await?;
        let app = Backend::start("app").await?;
        let keys = format!("otlp_endpoint = {:?}\n{telemetry}", collector.endpoint());
        let callee = callee_with(
            Bootstrap::new().telemetry(&keys),
            "billing",
            app.addr(),
            1,
            callee_policy,
        )
        .await?;
        let caller = caller_with(
            Bootstrap::new().telemetry(&format!("{keys}\nservice_name = \"web\"")),
            DirService::new("billing").endpoint(callee.inbound()),
            caller_policy,
        )
        .await?;
        Ok(Self {
            collector,
            app,
            callee,
            caller,
        })
    }

    fn client(&self) -> Client {
        Client::absolute(self.caller.outbound())
    }

    /// The `traceparent` the app received last.
    fn app_traceparent(&self) -> anyhow::Result<String> {
        let seen = self.app.last_seen().context("the app saw no request")?;
        Ok(seen
            .headers
            .get("traceparent")
            .context("the app saw no traceparent")?
            .to_str()?
            .to_owned())
    }
}

/// The one outbound and the one inbound span among `spans`.
fn pair(spans: &[ReceivedSpan]) -> anyhow::Result<(&ReceivedSpan, &ReceivedSpan)> {
    let one = |direction: &str| -> anyhow::Result<&ReceivedSpan> {
        let found: Vec<_> = spans
            .iter()
            .filter(|s| s.direction() == Some(direction))
            .collect();
        match found[..] {
            [span] => Ok(span),
            _ => bail!("expected one {direction} span: {spans:#?}"),
        }
    };
    Ok((one("outbound")?, one("inbound")?))
}

/// Parses `00-<trace>-<span>-<flags>`.
fn parse_traceparent(value: &str) -> anyhow::Result<(String, String, String)> {
    let parts: Vec<&str> = value.split('-').collect();
    let [version, trace, span, flags] = parts[..] else {
        bail!("not a traceparent: {value:?}");
    };
    ensure!(version == "00", "version {version} in {value:?}");
    ensure!(
        trace.len() == 32 && span.len() == 16 && flags.len() == 2,
        "malformed traceparent {value:?}"
    );
    Ok((trace.to_owned(), span.to_owned(), flags.to_owned()))
}

const ROUTE: &str = "[[routes]]\nname = \"charge\"\nmatch = { path_prefix = \"/charge\" }";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_request_is_one_trace_across_two_sidecars() -> anyhow::Result<()> {
    let mesh = Mesh::start("", ROUTE, ROUTE).await?;
    mesh.client()
        .get("http://billing/charge/1?amount=5")
        .await?
        .expect_status(200)?;
    let spans = mesh.collector.wait_for(2, SPANS_WITHIN).await?;
    let (out, inb) = pair(&spans)?;

    // One trace: caller's outbound span -> callee's inbound span -> app.
    ensure!(out.kind == SpanKind::Client, "{out:#?}");
    ensure!(inb.kind == SpanKind::Server, "{inb:#?}");
    ensure!(out.parent_span_id.is_empty(), "a new trace: {out:#?}");
    ensure!(out.trace_id == inb.trace_id, "two traces: {spans:#?}");
    ensure!(
        inb.parent_span_id == out.span_id,
        "the inbound span's parent is {}, not the outbound span {}",
        inb.parent_span_id,
        out.span_id
    );
    let seen = mesh.app_traceparent()?;
    ensure!(
        seen == format!("00-{}-{}-01", inb.trace_id, inb.span_id),
        "the app saw {seen:?}; the callee's span is {}/{}",
        inb.trace_id,
        inb.span_id
    );

    // Resource and attributes.
    ensure!(
        out.service_name == "web",
        "[telemetry] service_name: {out:#?}"
    );
    ensure!(
        inb.service_name == "billing",
        "defaults to [service] name: {inb:#?}"
    );
    for span in [out, inb] {
        ensure!(span.name == "GET charge", "span name: {span:#?}");
        ensure!(span.str("http.request.method") == Some("GET"), "{span:#?}");
        ensure!(span.str("url.path") == Some("/charge/1"), "{span:#?}");
        ensure!(span.str("weft.service") == Some("billing"), "{span:#?}");
        ensure!(span.str("weft.route") == Some("charge"), "{span:#?}");
        ensure!(span.int("weft.retries") == Some(0), "{span:#?}");
        ensure!(
            span.int("http.response.status_code") == Some(200),
            "{span:#?}"
        );
        ensure!(span.str("weft.reason").is_none(), "{span:#?}");
        ensure!(span.status == StatusCode::Unset, "{span:#?}");
    }
    let callee_inbound = mesh.callee.inbound().to_string();
    ensure!(
        out.str("weft.endpoint") == Some(callee_inbound.as_str()),
        "{out:#?}"
    );
    let app = mesh.app.addr().to_string();
    ensure!(inb.str("weft.endpoint") == Some(app.as_str()), "{inb:#?}");
    ensure!(out.str("server.address") == Some("billing"), "{out:#?}");

    // Both sidecars count what they exported, and dropped nothing.
    for proxy in [&mesh.caller, &mesh.callee] {
        let admin = proxy.admin_client();
        eventually(SPANS_WITHIN, || async {
            let scrape = admin.metrics().await?;
            let exported = scrape.value("weft_spans_exported_total", &[])?;
            ensure!(exported == 1.0, "weft_spans_exported_total = {exported}");
            for reason in ["queue-full", "export-failed"] {
                let dropped = scrape.value("weft_spans_dropped_total", &[("reason", reason)])?;
                ensure!(dropped == 0.0, "{reason}: {dropped}");
            }
            Ok(())
        })
        .await?;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_incoming_traceparent_is_continued() -> anyhow::Result<()> {
    let mesh = Mesh::start("", "", "").await?;
    let traceparent = format!("00-{TRACE}-{PARENT}-01");
    mesh.client()
        .get_with(
            "http://billing/",
            &[
                ("traceparent", traceparent.as_str()),
                ("tracestate", "vendor=1"),
            ],
        )
        .await?
        .expect_status(200)?;
    let spans = mesh.collector.wait_for(2, SPANS_WITHIN).await?;
    let (out, inb) = pair(&spans)?;
    ensure!(out.trace_id == TRACE && inb.trace_id == TRACE, "{spans:#?}");
    ensure!(out.parent_span_id == PARENT, "{out:#?}");
    ensure!(inb.parent_span_id == out.span_id, "{spans:#?}");
    ensure!(out.name == "GET", "no route matched: {out:#?}");

    let seen = mesh.app.last_seen().context("no request")?;
    ensure!(
        seen.headers["traceparent"] == format!("00-{TRACE}-{}-01", inb.span_id).as_str(),
        "{:?}",
        seen.headers
    );
    ensure!(
        seen.headers["tracestate"] == "vendor=1",
        "{:?}",
        seen.headers
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sampling_ratio_zero_exports_no_new_trace_but_propagates() -> anyhow::Result<()> {
    let mesh = Mesh::start("sampling_ratio = 0", "", "").await?;
    mesh.client()
        .get("http://billing/")
        .await?
        .expect_status(200)?;
    let (trace, _, flags) = parse_traceparent(&mesh.app_traceparent()?)?;
    ensure!(
        flags == "00",
        "an unsampled context reaches the app: flags {flags}"
    );
    ensure!(trace != "0".repeat(32), "a real trace id");

    // A sampled parent is followed whatever the ratio: these spans are
    // exported, and only these.
    mesh.client()
        .get_with(
            "http://billing/",
            &[("traceparent", format!("00-{TRACE}-{PARENT}-01").as_str())],
        )
        .await?
        .expect_status(200)?;
    let spans = mesh.collector.wait_for(2, SPANS_WITHIN).await?;
    let (_, sampled, flags) = parse_traceparent(&mesh.app_traceparent()?)?;
    ensure!(flags == "01", "a sampled parent's flags: {flags}");
    let (_, inb) = pair(&spans)?;
    ensure!(inb.span_id == sampled, "{spans:#?}");
    ensure!(
        spans.iter().all(|s| s.trace_id == TRACE),
        "the new trace ({trace}) was exported: {spans:#?}"
    );
    // Let a further export interval pass: still nothing of the new trace.
    tokio::time::sleep(Duration::from_secs(1)).await;
    ensure!(
        mesh.collector.spans().len() == 2,
        "{:#?}",
        mesh.collector.spans()
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_show_their_reason_and_limit() -> anyhow::Result<()> {
    let mesh = Mesh::start(
        "",
        "[outbound]\ntimeout = \"300ms\"\nretry = { attempts = 0 }",
        "[inbound]\nrate_limit = { per_second = 1, burst = 1 }",
    )
    .await?;
    // The caller gives up first (504), using the callee's only token...
    mesh.client()
        .get("http://billing/slow?ms=1000")
        .await?
        .expect_refusal(504, "timeout", "outbound.timeout")?;
    // ...so the callee refuses the next one (429).
    mesh.client()
        .get("http://billing/limited")
        .await?
        .expect_refusal(429, "rate-limit", "inbound.rate_limit")?;

    let find = |spans: &[ReceivedSpan], direction: &str, path: &str| {
        spans
            .iter()
            .find(|s| s.direction() == Some(direction) && s.str("url.path") == Some(path))
            .cloned()
    };
    let spans = eventually(SPANS_WITHIN, || async {
        let spans = mesh.collector.spans();
        let wanted = [
            ("outbound", "/slow"),
            ("outbound", "/limited"),
            ("inbound", "/limited"),
        ];
        for (direction, path) in wanted {
            if find(&spans, direction, path).is_none() {
                bail!("no {direction} span for {path} yet: {spans:#?}");
            }
        }
        Ok(spans)
    })
    .await?;

    let timed_out = find(&spans, "outbound", "/slow").unwrap();
    ensure!(
        timed_out.str("weft.reason") == Some("timeout"),
        "{timed_out:#?}"
    );
    ensure!(
        timed_out.str("weft.limit") == Some("outbound.timeout"),
        "{timed_out:#?}"
    );
    ensure!(
        timed_out.int("http.response.status_code") == Some(504),
        "{timed_out:#?}"
    );
    ensure!(
        timed_out.status == StatusCode::Error && timed_out.status_message == "timeout",
        "a 504 is a failure: {timed_out:#?}"
    );

    let inbound = find(&spans, "inbound", "/limited").unwrap();
    let outbound = find(&spans, "outbound", "/limited").unwrap();
    for span in [&inbound, &outbound] {
        ensure!(span.str("weft.reason") == Some("rate-limit"), "{span:#?}");
        ensure!(
            span.str("weft.limit") == Some("inbound.rate_limit"),
            "{span:#?}"
        );
        ensure!(
            span.int("http.response.status_code") == Some(429),
            "{span:#?}"
        );
        ensure!(
            span.status == StatusCode::Unset,
            "a 429 is not a failure: {span:#?}"
        );
    }
    ensure!(
        inbound.str("weft.endpoint").is_none(),
        "refused before reaching the app: {inbound:#?}"
    );
    ensure!(inbound.parent_span_id == outbound.span_id, "{spans:#?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failure_is_an_error_span_with_its_retries() -> anyhow::Result<()> {
    let mesh = Mesh::start(
        "",
        "[outbound]\nretry = { attempts = 1, on = [\"503\"], backoff = \"1ms..2ms\" }",
        "",
    )
    .await?;
    mesh.client()
        .get("http://billing/status?code=503")
        .await?
        .expect_status(503)?;
    let spans = mesh.collector.wait_for(3, SPANS_WITHIN).await?;
    let outbound: Vec<_> = spans
        .iter()
        .filter(|s| s.direction() == Some("outbound"))
        .collect();
    let inbound: Vec<_> = spans
        .iter()
        .filter(|s| s.direction() == Some("inbound"))
        .collect();
    let ([out], [first, second]) = (&outbound[..], &inbound[..]) else {
        bail!("expected one outbound and two inbound spans: {spans:#?}");
    };
    ensure!(out.int("weft.retries") == Some(1), "{out:#?}");
    ensure!(
        out.int("http.response.status_code") == Some(503),
        "{out:#?}"
    );
    ensure!(
        out.status == StatusCode::Error && out.status_message == "HTTP status 503",
        "{out:#?}"
    );
    for attempt in [first, second] {
        ensure!(
            attempt.trace_id == out.trace_id && attempt.parent_span_id == out.span_id,
            "each attempt is a child of the outbound span: {spans:#?}"
        );
        ensure!(attempt.status == StatusCode::Error, "{attempt:#?}");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_collector_slows_nothing_and_drops_are_counted() -> anyhow::Result<()> {
    // A port nothing listens on.
    let dead = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
    let app = Backend::start("app").await?;
    let started = std::time::Instant::now();
    let proxy = Proxy::builder(
        Bootstrap::new()
            .telemetry(&format!("otlp_endpoint = \"http://{dead}\""))
            .service(DirService::new("billing").endpoint(app.addr()))
            .render(),
    )
    .start()
    .await?;
    ensure!(
        started.elapsed() < Duration::from_secs(5),
        "start-up took {:?}",
        started.elapsed()
    );
    let client = Client::absolute(proxy.outbound());
    for _ in 0..3 {
        let sent = std::time::Instant::now();
        client.get("http://billing/").await?.expect_status(200)?;
        ensure!(
            sent.elapsed() < Duration::from_secs(1),
            "a request took {:?}",
            sent.elapsed()
        );
    }
    let admin = proxy.admin_client();
    eventually(SPANS_WITHIN, || async {
        let scrape = admin.metrics().await?;
        let failed = scrape.value("weft_spans_dropped_total", &[("reason", "export-failed")])?;
        ensure!(failed == 3.0, "export-failed drops: {failed}");
        ensure!(scrape.value("weft_spans_exported_total", &[])? == 0.0);
        Ok(())
    })
    .await?;

    client.get("http://billing/").await?.expect_status(200)?;
    let stopping = std::time::Instant::now();
    proxy.signal(Signal::Term)?;
    let status = proxy.wait_exit(Duration::from_secs(10)).await?;
    ensure!(status.success(), "exit status {status}");
    ensure!(
        stopping.elapsed() < Duration::from_secs(4),
        "shutdown took {:?} (the span flush is bounded by 2 s)",
        stopping.elapsed()
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_that_changes_telemetry_is_rejected() -> anyhow::Result<()> {
    let app = Backend::start("app").await?;
    let render = |telemetry: &str, name: &str| {
        Bootstrap::new()
            .telemetry(telemetry)
            .service(DirService::new(name).endpoint(app.addr()))
            .render()
    };
    let proxy = Proxy::start(render("access_log = true", "billing")).await?;
    let admin = proxy.admin_client();

    proxy.write_config(&render("access_log = false", "billing"))?;
    let reply = admin.reload().await?;
    ensure!(reply.status == 400, "answered {}", reply.status);
    ensure!(
        reply.text().contains(
            "[telemetry] changed; traces, OTLP metrics and the access log are set up at start"
        ),
        "{}",
        reply.text()
    );
    ensure!(admin.config_version().await? == 1);

    // The same [telemetry] with another change is applied.
    proxy.write_config(&render("access_log = true", "orders"))?;
    admin.reload().await?.expect_status(200)?;
    ensure!(admin.config_version().await? == 2);
    Ok(())
}
