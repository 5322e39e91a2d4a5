//! Scenario: adaptive concurrency limits follow latency.
//!
//! A caller's sidecar with `outbound.adaptive_concurrency` keeps one limit per
//! endpoint. Two instances answer fast; then one slows down 40 times. Under a
//! steady concurrent load its limit must fall below its starting point (and
//! below the fast instance's), the load must move to the fast instance, and
//! `/metrics` and `/endpoints` must show each endpoint's limit. With every
//! endpoint at its limit, a request is refused at once with `503
//! concurrency-cap` naming `outbound.adaptive_concurrency`. The instance's
//! own sidecar enforces `inbound.adaptive_concurrency` the same way. Bad
//! bounds are a located config error.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{Context as _, ensure};
use weft_tests::backend::Backend;
use weft_tests::client::Client;
use weft_tests::config::DirService;
use weft_tests::mesh::{callee, caller};
use weft_tests::process::{TempDir, run_command};
use weft_tests::{eventually, join_all};

const INITIAL: f64 = 20.0;

/// `n` loops sending `GET uri` back to back until `stop` is set.
fn load(
    client: &Client,
    uri: &str,
    n: usize,
    stop: &Arc<AtomicBool>,
) -> Vec<tokio::task::JoinHandle<()>> {
    (0..n)
        .map(|_| {
            let (client, uri, stop) = (client.clone(), uri.to_owned(), Arc::clone(stop));
            tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    // Refusals and errors are fine here: only the limits matter.
                    let _ = client.get(&uri).await;
                }
            })
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_endpoints_limit_falls_and_the_load_moves_to_the_fast_one() -> anyhow::Result<()> {
    let fast = Backend::builder("fast")
        .latency(Duration::from_millis(5))
        .start()
        .await?;
    let slow = Backend::builder("slow")
        .latency(Duration::from_millis(5))
        .start()
        .await?;
    let proxy = caller(
        DirService::new("billing").endpoints([fast.addr(), slow.addr()]),
        "[outbound]\nload_balancer = \"round-robin\"\nretry = { attempts = 0 }\n\
         adaptive_concurrency = { min_limit = 1, max_limit = 40, initial_limit = 20 }",
    )
    .await?;
    let client = Client::absolute(proxy.outbound());
    let admin = proxy.admin_client();
    let gauge = |endpoint: std::net::SocketAddr| {
        let admin = admin.clone();
        async move {
            admin.metrics().await?.value(
                "weft_adaptive_concurrency_limit",
                &[
                    ("direction", "outbound"),
                    ("service", "billing"),
                    ("endpoint", &endpoint.to_string()),
                ],
            )
        }
    };
    // The gauge exists from the first look at the endpoints, at the start value.
    let _ = client.get("http://billing/").await?;
    ensure!(gauge(slow.addr()).await? >= 1.0);

    // 30 callers at once: enough to use both limits (a limit below half
    // used does not move).
    let stop = Arc::new(AtomicBool::new(false));
    let loops = load(&client, "http://billing/", 30, &stop);
    tokio::time::sleep(Duration::from_secs(1)).await;
    slow.set_latency(Duration::from_millis(200));
    let outcome = eventually(Duration::from_secs(30), || async {
        let (f, s) = (gauge(fast.addr()).await?, gauge(slow.addr()).await?);
        ensure!(
            s < INITIAL / 2.0 && s < f,
            "limits: fast {f}, slow {s} (start {INITIAL})"
        );
        Ok((f, s))
    })
    .await;
    // The load has moved: over a second, the fast instance takes most of it.
    let (fast_before, slow_before) = (fast.requests(), slow.requests());
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (to_fast, to_slow) = (fast.requests() - fast_before, slow.requests() - slow_before);
    stop.store(true, Ordering::Relaxed);
    join_all_loops(loops).await;
    let (f, s) = outcome?;
    ensure!(
        to_fast > 4 * to_slow,
        "requests in a second: fast {to_fast}, slow {to_slow} (limits {f}, {s})"
    );

    // /endpoints shows the same limits; hold every slot, and one more is refused.
    eventually(Duration::from_secs(5), || async {
        ensure!(
            fast.in_flight() + slow.in_flight() == 0,
            "requests still in flight"
        );
        Ok(())
    })
    .await?;
    let endpoints = admin.endpoints().await?;
    let limit_of = |addr| -> anyhow::Result<u64> {
        endpoints.endpoint("billing", addr)?["adaptive_limit"]
            .as_u64()
            .context("adaptive_limit in /endpoints")
    };
    let (lf, ls) = (limit_of(fast.addr())?, limit_of(slow.addr())?);
    ensure!(ls < lf, "/endpoints limits: fast {lf}, slow {ls}");
    let held: Vec<_> = (0..lf + ls)
        .map(|_| {
            let client = client.clone();
            tokio::spawn(async move { client.get("http://billing/hold").await })
        })
        .collect();
    eventually(Duration::from_secs(10), || async {
        let n = (fast.in_flight() + slow.in_flight()) as u64;
        ensure!(n == lf + ls, "{n} held, want {}", lf + ls);
        Ok(())
    })
    .await?;
    client.get("http://billing/").await?.expect_refusal(
        503,
        "concurrency-cap",
        "outbound.adaptive_concurrency",
    )?;
    fast.release();
    slow.release();
    for reply in join_all(held).await? {
        reply.expect_status(200)?;
    }
    Ok(())
}

async fn join_all_loops(loops: Vec<tokio::task::JoinHandle<()>>) {
    for task in loops {
        let _ = task.await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inbound_adaptive_concurrency_refuses_over_the_limit() -> anyhow::Result<()> {
    let app = Backend::start("app").await?;
    let proxy = callee(
        "billing",
        app.addr(),
        1,
        "[inbound]\nadaptive_concurrency = { min_limit = 2, initial_limit = 3 }",
    )
    .await?;
    let client = Client::host_header(proxy.inbound());
    let held: Vec<_> = (0..3)
        .map(|_| {
            let client = client.clone();
            tokio::spawn(async move { client.get("http://billing/hold").await })
        })
        .collect();
    eventually(Duration::from_secs(10), || async {
        ensure!(app.in_flight() == 3, "{} at the app", app.in_flight());
        Ok(())
    })
    .await?;
    client.get("http://billing/").await?.expect_refusal(
        503,
        "concurrency-cap",
        "inbound.adaptive_concurrency",
    )?;
    let admin = proxy.admin_client();
    let local = &admin.json("/endpoints").await?["local"];
    ensure!(
        local["adaptive_limit"] == 3 && local["in_flight"] == 3,
        "/endpoints local: {local}"
    );
    let limit = admin.metrics().await?.value(
        "weft_adaptive_concurrency_limit",
        &[
            ("direction", "inbound"),
            ("service", "billing"),
            ("endpoint", ""),
        ],
    )?;
    ensure!(limit == 3.0, "inbound gauge {limit}");
    app.release();
    for reply in join_all(held).await? {
        reply.expect_status(200)?;
    }
    Ok(())
}

#[tokio::test]
async fn bounds_out_of_order_are_a_located_error() -> anyhow::Result<()> {
    let dir = TempDir::new()?;
    dir.write(
        "billing.toml",
        "service = \"billing\"\n[outbound]\nadaptive_concurrency = { min_limit = 50, max_limit = 10 }\n",
    )?;
    let output = run_command(dir.path(), &["check", "--policy", "billing.toml"]).await?;
    ensure!(output.status.code() == Some(1), "{output:?}");
    let first = output.stderr.lines().next().unwrap_or_default();
    ensure!(
        first.starts_with("error: ")
            && first.contains("billing.toml:3:")
            && first.contains(
                "outbound.adaptive_concurrency.min_limit: min_limit (50) is more than max_limit (10)"
            ),
        "stderr: {:?}",
        output.stderr
    );
    Ok(())
}
