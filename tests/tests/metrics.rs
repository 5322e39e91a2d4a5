//! Scenario: after known traffic through a sidecar (successes, app errors,
//! timeouts, rate-limit refusals, retries, retries skipped for each reason,
//! and inbound requests), `/metrics` has the exact count of every label set,
//! histograms count every request, and `promtool check metrics` accepts it.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use anyhow::ensure;
use bytes::Bytes;
use weft_tests::backend::Backend;
use weft_tests::client::{Client, Mode};
use weft_tests::config::{Bootstrap, DirService, policy_file};
use weft_tests::metrics::promtool_check;
use weft_tests::process::Proxy;

const NO_EJECTION: &str = "outlier = { consecutive_failures = 1000 }";

/// The labels of `weft_requests_total`; `caller` is the sidecar's own
/// `[service] name` outbound (`""` without one), the calling service inbound.
fn req<'a>(
    direction: &'a str,
    caller: &'a str,
    service: &'a str,
    route: &'a str,
    status: &'a str,
    classification: &'a str,
) -> [(&'a str, &'a str); 6] {
    [
        ("direction", direction),
        ("caller", caller),
        ("service", service),
        ("route", route),
        ("status_code", status),
        ("classification", classification),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn known_traffic_gives_exact_counts() -> anyhow::Result<()> {
    let ok = Backend::start("ok").await?;
    let bad = [
        Backend::start("bad-1").await?,
        Backend::start("bad-2").await?,
    ];
    for b in &bad {
        b.set_status(Some(503));
    }
    let bootstrap = Bootstrap::new()
        .app("checkout", ok.addr())
        .service(
            DirService::new("billing")
                .endpoint(ok.addr())
                .policy("billing.toml"),
        )
        .service(
            DirService::new("flaky")
                .endpoints(bad.iter().map(Backend::addr))
                .policy("flaky.toml"),
        )
        .service(
            DirService::new("stingy")
                .endpoints(bad.iter().map(Backend::addr))
                .policy("stingy.toml"),
        )
        .service(
            DirService::new("solo")
                .endpoint(bad[0].addr())
                .policy("solo.toml"),
        )
        .service(
            DirService::new("limited")
                .endpoint(ok.addr())
                .policy("limited.toml"),
        );
    let proxy = Proxy::builder(bootstrap.render())
        .file(
            "billing.toml",
            policy_file(
                "billing",
                "[[routes]]\nname = \"slow\"\nmatch = { path_prefix = \"/slow\" }\ntimeout = \"100ms\"\nretry = { attempts = 0 }\n",
            ),
        )
        .file(
            "flaky.toml",
            policy_file(
                "flaky",
                &format!(
                    "[outbound]\n{NO_EJECTION}\nretry_budget = {{ ratio = 1.0, min_per_second = 1000 }}\nretry = {{ attempts = 2, backoff = \"1ms..2ms\" }}\n"
                ),
            ),
        )
        .file(
            "stingy.toml",
            policy_file(
                "stingy",
                &format!(
                    "[outbound]\n{NO_EJECTION}\nretry_budget = {{ ratio = 0.0, min_per_second = 0 }}\nretry = {{ backoff = \"1ms..2ms\" }}\n"
                ),
            ),
        )
        .file(
            "solo.toml",
            policy_file(
                "solo",
                &format!(
                    "[outbound]\n{NO_EJECTION}\nendpoint_max_concurrency = 1\nretry_budget = {{ ratio = 1.0, min_per_second = 1000 }}\nretry = {{ backoff = \"1ms..2ms\" }}\n"
                ),
            ),
        )
        .file(
            "limited.toml",
            policy_file(
                "limited",
                "[outbound]\nrate_limit = { per_second = 1, burst = 1 }\n",
            ),
        )
        .start()
        .await?;

    let client = Client::absolute(proxy.outbound());
    for _ in 0..4 {
        ensure!(client.get("http://billing/hello").await?.status == 200);
    }
    ensure!(client.get("http://billing/status?code=500").await?.status == 500);
    for _ in 0..2 {
        let reply = client.get("http://billing/slow?ms=1000").await?;
        ensure!(reply.status == 504, "{reply:?}");
    }
    // flaky: 503, then two retries (the other endpoint, then the first again).
    ensure!(client.get("http://flaky/").await?.status == 503);
    // solo: its only endpoint is still held by the failed try (cap 1): no retry.
    ensure!(client.get("http://solo/").await?.status == 503);
    // flaky, a PUT body over max_replay_body (64 KiB): sent once.
    let big = Bytes::from(vec![b'x'; 100 * 1024]);
    let reply = client.send_with("PUT", "http://flaky/", &[], big).await?;
    ensure!(reply.status == 503, "{reply:?}");
    // stingy: no budget at all; the upstream's 503 comes back, marked.
    let reply = client.get("http://stingy/").await?;
    ensure!(reply.status == 503);
    ensure!(reply.header("weft-reason") == Some("budget-exhausted"));
    // limited: a burst of 1, then 429.
    ensure!(client.get("http://limited/").await?.status == 200);
    ensure!(client.get("http://limited/").await?.status == 429);
    // Inbound: 3 requests from "another sidecar" straight to the inbound listener.
    let inbound = Client::new(proxy.inbound(), Mode::HostHeader);
    for _ in 0..3 {
        ensure!(inbound.get("http://checkout/x").await?.status == 200);
    }

    let m = proxy.admin_client().metrics().await?;
    let count = |labels: &[(&str, &str)]| m.value("weft_requests_total", labels);
    let hist = |labels: &[(&str, &str)]| m.value("weft_request_duration_seconds_count", labels);
    for (labels, n) in [
        (
            req("outbound", "checkout", "billing", "", "200", "success"),
            4.0,
        ),
        (
            req("outbound", "checkout", "billing", "", "500", "failure"),
            1.0,
        ),
        (
            req("outbound", "checkout", "billing", "slow", "504", "failure"),
            2.0,
        ),
        (
            req("outbound", "checkout", "flaky", "", "503", "failure"),
            2.0,
        ),
        (
            req("outbound", "checkout", "stingy", "", "503", "failure"),
            1.0,
        ),
        (
            req("outbound", "checkout", "solo", "", "503", "failure"),
            1.0,
        ),
        (
            req("outbound", "checkout", "limited", "", "200", "success"),
            1.0,
        ),
        (
            req("outbound", "checkout", "limited", "", "429", "success"),
            1.0,
        ),
        (
            req("inbound", "anonymous", "checkout", "", "200", "success"),
            3.0,
        ),
    ] {
        ensure!(
            count(&labels)? == n,
            "requests {labels:?}: {}",
            count(&labels)?
        );
        ensure!(hist(&labels)? == n, "histogram count {labels:?}");
    }
    ensure!(
        m.sum("weft_requests_total", &[]) == 16.0,
        "no other requests: {}",
        m.text
    );
    let refusals = |service: &str, route: &str, reason: &str, limit: &str| {
        m.value(
            "weft_refusals_total",
            &[
                ("direction", "outbound"),
                ("caller", "checkout"),
                ("service", service),
                ("route", route),
                ("reason", reason),
                ("limit", limit),
            ],
        )
    };
    ensure!(refusals("billing", "slow", "timeout", "routes.slow.timeout")? == 2.0);
    ensure!(refusals("stingy", "", "budget-exhausted", "")? == 1.0);
    ensure!(refusals("limited", "", "rate-limit", "outbound.rate_limit")? == 1.0);
    ensure!(m.sum("weft_refusals_total", &[]) == 4.0, "{}", m.text);

    let retries =
        |service: &str| m.value("weft_retries_total", &[("service", service), ("route", "")]);
    ensure!(retries("flaky")? == 2.0);
    ensure!(m.sum("weft_retries_total", &[]) == 2.0);
    let skipped = |service: &str, reason: &str| {
        m.value(
            "weft_retries_skipped_total",
            &[("service", service), ("route", ""), ("reason", reason)],
        )
    };
    ensure!(skipped("solo", "no-endpoint")? == 1.0);
    ensure!(skipped("flaky", "not-replayable")? == 1.0);
    ensure!(skipped("stingy", "budget-exhausted")? == 1.0);
    ensure!(m.sum("weft_retries_skipped_total", &[]) == 3.0);
    let budget = |service: &str| {
        m.value(
            "weft_retry_budget_available_retries",
            &[("service", service), ("route", "")],
        )
    };
    // The default budget: 10/s for 10 s in reserve, plus 20% of billing's 7
    // requests, in retries: (500 + 7) / 5.
    ensure!(budget("billing")? == 101.0, "{}", m.text);
    ensure!(budget("stingy")? == 0.0);

    // Endpoint states, connections and bytes, the config version, the process.
    let endpoints = |service: &str, state: &str| {
        m.value("weft_endpoints", &[("service", service), ("state", state)])
    };
    ensure!(endpoints("billing", "active")? == 1.0);
    ensure!(endpoints("flaky", "active")? == 2.0);
    ensure!(endpoints("flaky", "ejected")? == 0.0);
    for direction in ["inbound", "outbound"] {
        let d = [("direction", direction)];
        ensure!(m.value("weft_tcp_connections_total", &d)? >= 1.0);
        ensure!(m.value("weft_tcp_read_bytes_total", &d)? > 0.0);
        ensure!(m.value("weft_tcp_written_bytes_total", &d)? > 0.0);
    }
    ensure!(m.value("weft_config_version", &[])? == 1.0);
    ensure!(m.value("process_resident_memory_bytes", &[])? > 0.0);
    ensure!(m.get("weft_proxy_control_plane_connected", &[]).is_none());
    promtool_check(&m.text)?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_errors_in_trailers_are_failures() -> anyhow::Result<()> {
    let app = Backend::start("grpc").await?;
    let proxy = Proxy::builder(
        Bootstrap::new()
            .service(DirService::new("greeter").endpoint(app.addr()))
            .render(),
    )
    .start()
    .await?;
    let client = Client::new(proxy.outbound(), Mode::H2);
    // The backend's /grpc answers 200 with `grpc-status: 0` in its trailers;
    // with `x-grpc-status` set it sends that status instead.
    let ok = client
        .send_with(
            "POST",
            "http://greeter/grpc",
            &[("content-type", "application/grpc")],
            Bytes::from_static(b"hi"),
        )
        .await?;
    ensure!(ok.status == 200);
    let failed = client
        .send_with(
            "POST",
            "http://greeter/grpc",
            &[
                ("content-type", "application/grpc"),
                ("x-grpc-status", "14"),
            ],
            Bytes::from_static(b"hi"),
        )
        .await?;
    ensure!(failed.status == 200);
    let m = proxy.admin_client().metrics().await?;
    ensure!(
        m.value(
            "weft_requests_total",
            &req("outbound", "", "greeter", "", "200", "success")
        )? == 1.0,
        "{}",
        m.text
    );
    ensure!(
        m.value(
            "weft_requests_total",
            &req("outbound", "", "greeter", "", "200", "failure")
        )? == 1.0,
        "{}",
        m.text
    );
    Ok(())
}
