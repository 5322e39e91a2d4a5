//! Scenario: the proxy's logs follow `--log-format` and the `WEFT_LOG` filter.
//!
//! Logs go to stderr. With `--log-format json` every line must be one JSON
//! object (so log shippers can parse them); `WEFT_LOG` must filter what is
//! written (`error` silences a normal start and request, `info` does not).
//! With `[telemetry] access_log = true`, every finished request writes one
//! line with target `weft_access` and the request's fields (none without it).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use anyhow::{Context as _, ensure};
use serde_json::Value;
use weft_tests::backend::Backend;
use weft_tests::client::Client;
use weft_tests::config::{Bootstrap, DirService, policy_file};
use weft_tests::otlp::Collector;
use weft_tests::process::{Proxy, Signal};

fn bootstrap(backend: &Backend) -> String {
    Bootstrap::new()
        .service(DirService::new("billing").endpoint(backend.addr()))
        .render()
}

/// Starts a proxy, sends one request, stops it cleanly, returns its stderr.
async fn logs_of_one_run(proxy: Proxy) -> anyhow::Result<String> {
    Client::absolute(proxy.outbound())
        .get("http://billing/")
        .await?
        .expect_status(200)?;
    proxy.signal(Signal::Term)?;
    proxy.wait_exit(std::time::Duration::from_secs(5)).await?;
    Ok(proxy.logs())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_log_format_writes_one_json_object_per_line() -> anyhow::Result<()> {
    let backend = Backend::start("a").await?;
    let proxy = Proxy::builder(bootstrap(&backend))
        .log_filter("info")
        .arg("--log-format")
        .arg("json")
        .start()
        .await?;
    let logs = logs_of_one_run(proxy).await?;
    let lines: Vec<&str> = logs.lines().filter(|l| !l.trim().is_empty()).collect();
    ensure!(!lines.is_empty(), "nothing was logged at info");
    for line in lines {
        let value: serde_json::Value =
            serde_json::from_str(line).with_context(|| format!("not JSON: {line:?}"))?;
        ensure!(value.is_object(), "not a JSON object: {line:?}");
    }
    ensure!(
        access_lines(&logs)?.is_empty(),
        "access lines without access_log: {logs}"
    );
    Ok(())
}

/// The `weft_access` lines of a JSON log.
fn access_lines(logs: &str) -> anyhow::Result<Vec<Value>> {
    let mut lines = Vec::new();
    for line in logs.lines().filter(|l| !l.trim().is_empty()) {
        let value: Value =
            serde_json::from_str(line).with_context(|| format!("not JSON: {line:?}"))?;
        if value["target"] == "weft_access" {
            lines.push(value);
        }
    }
    Ok(lines)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn access_log_writes_one_line_per_request() -> anyhow::Result<()> {
    let collector = Collector::start().await?;
    let backend = Backend::start("a").await?;
    let policy = "[outbound]\nrate_limit = { per_second = 1, burst = 1 }\n\n\
                  [[routes]]\nname = \"pay\"\nmatch = { path_prefix = \"/pay\" }";
    let start = |telemetry: String| {
        Proxy::builder(
            Bootstrap::new()
                .telemetry(&telemetry)
                .service(
                    DirService::new("billing")
                        .endpoint(backend.addr())
                        .policy("billing.toml"),
                )
                .render(),
        )
        .file("billing.toml", policy_file("billing", policy))
        .log_filter("info")
        .arg("--log-format")
        .arg("json")
        .start()
    };
    let proxy = start(format!(
        "otlp_endpoint = {:?}\naccess_log = true",
        collector.endpoint()
    ))
    .await?;
    let client = Client::absolute(proxy.outbound());
    client
        .get("http://billing/pay/1?card=secret")
        .await?
        .expect_status(200)?;
    client.get("http://billing/pay/2").await?.expect_refusal(
        429,
        "rate-limit",
        "outbound.rate_limit",
    )?;
    let spans = collector
        .wait_for(2, std::time::Duration::from_secs(10))
        .await?;
    let trace_of = |path: &str| {
        spans
            .iter()
            .find(|s| s.str("url.path") == Some(path))
            .map(|s| s.trace_id.clone())
    };
    proxy.signal(Signal::Term)?;
    proxy.wait_exit(std::time::Duration::from_secs(5)).await?;
    let logs = proxy.logs();
    let lines = access_lines(&logs)?;
    let [ok, refused] = &lines[..] else {
        anyhow::bail!("expected two access lines: {logs}");
    };

    let backend_addr = backend.addr().to_string();
    let expect = |line: &Value, key: &str, want: Value| {
        ensure!(line[key] == want, "{key}: {} in {line}", line[key]);
        Ok(())
    };
    for (key, want) in [
        ("level", "INFO".into()),
        ("message", "request".into()),
        ("direction", "outbound".into()),
        ("method", "GET".into()),
        ("authority", "billing".into()),
        ("path", "/pay/1".into()),
        ("service", "billing".into()),
        ("route", "pay".into()),
        ("status", 200.into()),
        ("classification", "success".into()),
        ("endpoint", backend_addr.as_str().into()),
        ("retries", 0.into()),
        (
            "trace_id",
            trace_of("/pay/1").context("no span for /pay/1")?.into(),
        ),
    ] {
        expect(ok, key, want)?;
    }
    ensure!(
        ok["duration_ms"].as_f64().is_some_and(|d| d >= 0.0),
        "duration_ms: {ok}"
    );
    ensure!(
        ok.get("reason").is_none() && ok.get("limit").is_none(),
        "{ok}"
    );
    for (key, want) in [
        ("path", "/pay/2".into()),
        ("status", 429.into()),
        ("reason", "rate-limit".into()),
        ("limit", "outbound.rate_limit".into()),
        (
            "trace_id",
            trace_of("/pay/2").context("no span for /pay/2")?.into(),
        ),
    ] {
        expect(refused, key, want)?;
    }
    ensure!(
        refused.get("endpoint").is_none(),
        "refused before any endpoint: {refused}"
    );

    // Without traces: the same line, without a trace id.
    let proxy = start("access_log = true".to_owned()).await?;
    let logs = logs_of_one_run(proxy).await?;
    let lines = access_lines(&logs)?;
    let [line] = &lines[..] else {
        anyhow::bail!("expected one access line: {logs}");
    };
    expect(line, "status", 200.into())?;
    ensure!(line.get("trace_id").is_none(), "{line}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weft_log_filters_what_is_written() -> anyhow::Result<()> {
    let backend = Backend::start("a").await?;
    let info = Proxy::builder(bootstrap(&backend))
        .log_filter("info")
        .start()
        .await?;
    let info = logs_of_one_run(info).await?;
    ensure!(
        info.contains("INFO"),
        "WEFT_LOG=info wrote no INFO line: {info:?}"
    );

    let quiet = Proxy::builder(bootstrap(&backend))
        .log_filter("error")
        .start()
        .await?;
    let quiet = logs_of_one_run(quiet).await?;
    ensure!(
        !quiet.contains("INFO") && !quiet.contains("WARN"),
        "WEFT_LOG=error still wrote: {quiet:?}"
    );
    Ok(())
}
