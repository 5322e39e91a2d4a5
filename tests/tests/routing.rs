//! Scenario: how the outbound listener finds the destination of a request, and
//! how it answers when there is none or it cannot be reached.
//!
//! The destination is the request's authority: for a directory name the port
//! in it is ignored and the backend still sees the Host the app sent. A request
//! with no authority at all is a 400 `bad-request`; an endpoint that refuses
//! connections turns into a 502 `connect-failure`. Both carry `weft-reason`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use anyhow::ensure;
use weft_tests::backend::Backend;
use weft_tests::client::{Client, RawConn};
use weft_tests::closed_port;
use weft_tests::config::{Bootstrap, DirService};
use weft_tests::process::Proxy;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn port_in_the_authority_is_ignored_for_directory_names() -> anyhow::Result<()> {
    let backend = Backend::start("a").await?;
    let proxy = Proxy::start(
        Bootstrap::new()
            .service(DirService::new("billing").endpoint(backend.addr()))
            .render(),
    )
    .await?;

    for client in [
        Client::absolute(proxy.outbound()),
        Client::host_header(proxy.outbound()),
    ] {
        let reply = client.get("http://billing:9999/charge?id=7").await?;
        reply.expect_status(200)?;
        ensure!(reply.backend() == Some("a"), "{:?}", reply.backend());
        let seen = backend.last_seen().expect("the backend saw the request");
        ensure!(
            seen.host.as_deref() == Some("billing:9999"),
            "Host {:?}",
            seen.host
        );
        ensure!(seen.path == "/charge?id=7", "path {:?}", seen.path);
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_without_any_authority_is_400_bad_request() -> anyhow::Result<()> {
    let backend = Backend::start("a").await?;
    let proxy = Proxy::start(
        Bootstrap::new()
            .service(DirService::new("billing").endpoint(backend.addr()))
            .render(),
    )
    .await?;

    // HTTP/1.0 allows leaving out Host; origin form has no authority either.
    let mut conn = RawConn::connect(proxy.outbound()).await?;
    conn.write(b"GET /charge HTTP/1.0\r\n\r\n").await?;
    let (head, _) = conn.read_response().await?;
    ensure!(head.status == 400, "status {} ({head:?})", head.status);
    ensure!(
        head.header("weft-reason") == Some("bad-request"),
        "weft-reason {:?}",
        head.header("weft-reason")
    );
    ensure!(backend.requests() == 0);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endpoint_refusing_connections_is_502_connect_failure() -> anyhow::Result<()> {
    let nobody = closed_port()?;
    let proxy = Proxy::start(
        Bootstrap::new()
            .service(DirService::new("ghost").endpoint(nobody))
            .render(),
    )
    .await?;

    let client = Client::absolute(proxy.outbound());
    let started = Instant::now();
    let reply = client.get("http://ghost/").await?;
    reply.expect_status(502)?;
    ensure!(
        reply.header("weft-reason") == Some("connect-failure"),
        "weft-reason {:?}",
        reply.header("weft-reason")
    );
    ensure!(
        started.elapsed() < Duration::from_secs(5),
        "a refused connection took {:?} to report",
        started.elapsed()
    );
    Ok(())
}

/// Threads of a running process, from `/proc`.
fn threads(pid: u32) -> anyhow::Result<usize> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("Threads:"))
        .and_then(|n| n.trim().parse().ok())
        .ok_or_else(|| anyhow::anyhow!("no Threads line in /proc/{pid}/status"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_sets_the_threads_that_serve_traffic() -> anyhow::Result<()> {
    let backend = Backend::start("a").await?;
    let bootstrap = Bootstrap::new()
        .service(DirService::new("billing").endpoint(backend.addr()))
        .render();
    for (workers, expect) in [(1, 1..=2), (3, 4..=usize::MAX)] {
        let proxy = Proxy::builder(bootstrap.clone())
            .arg("--workers")
            .arg(&workers.to_string())
            .start()
            .await?;
        // Concurrent requests from several connections are all served.
        let mut calls = tokio::task::JoinSet::new();
        for _ in 0..8 {
            let client = Client::host_header(proxy.outbound());
            calls.spawn(async move {
                for _ in 0..10 {
                    client
                        .get("http://billing/charge")
                        .await?
                        .expect_status(200)?;
                }
                anyhow::Ok(())
            });
        }
        while let Some(done) = calls.join_next().await {
            done??;
        }
        // One worker: the main thread serves everything (a blocking-pool
        // thread from reading the configuration may still linger); three:
        // the main thread and three workers at least.
        let n = threads(proxy.pid())?;
        ensure!(expect.contains(&n), "--workers {workers}: {n} threads");
    }
    Ok(())
}
