//! Scenario: SIGTERM and SIGINT drain the proxy gracefully.
//!
//! On SIGTERM the proxy must report `/ready` 503, stop accepting new
//! connections, let in-flight requests finish within `[drain] grace`, and exit
//! 0. It must not wait out the whole grace when nothing is in flight (idle
//! keep-alive connections included), and a request longer than the grace must
//! not hold the process open past it.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use anyhow::{bail, ensure};
use tokio::net::TcpStream;
use tokio::time::Instant;
use weft_tests::backend::Backend;
use weft_tests::client::Client;
use weft_tests::config::{Bootstrap, DirService};
use weft_tests::eventually;
use weft_tests::process::{Proxy, Signal};

async fn start(backend: &Backend, grace: &str) -> anyhow::Result<Proxy> {
    Proxy::start(
        Bootstrap::new()
            .grace(grace)
            .service(DirService::new("billing").endpoint(backend.addr()))
            .render(),
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_an_in_flight_request_finish_then_exits_zero() -> anyhow::Result<()> {
    let backend = Backend::start("a").await?;
    let proxy = start(&backend, "5s").await?;
    let client = Client::absolute(proxy.outbound());
    let admin = proxy.admin_client();

    let slow = tokio::spawn({
        let client = client.clone();
        async move { client.get("http://billing/slow?ms=1500").await }
    });
    eventually(Duration::from_secs(2), || async {
        ensure!(
            backend.in_flight() == 1,
            "the slow request has not reached the backend"
        );
        Ok(())
    })
    .await?;

    proxy.signal(Signal::Term)?;
    let signalled = Instant::now();

    // While draining: not ready, and no new connections on the outbound listener.
    eventually(Duration::from_secs(1), || async {
        let status = admin.ready_status().await?;
        ensure!(status == 503, "/ready answered {status} while draining");
        Ok(())
    })
    .await?;
    eventually(Duration::from_secs(1), || async {
        if TcpStream::connect(proxy.outbound()).await.is_ok() {
            bail!("the outbound listener still accepts connections while draining");
        }
        Ok(())
    })
    .await?;
    ensure!(
        backend.in_flight() == 1 && proxy.try_status()?.is_none(),
        "the drain checks ran after the request ended; they proved nothing"
    );

    let reply = slow.await??;
    reply.expect_status(200)?;
    ensure!(reply.text() == "slow a", "body {:?}", reply.text());

    let status = proxy.wait_exit(Duration::from_secs(5)).await?;
    ensure!(status.code() == Some(0), "exit status {status}");
    ensure!(
        signalled.elapsed() < Duration::from_millis(4500),
        "exit took {:?} after SIGTERM though the only request ended after ~1.5 s",
        signalled.elapsed()
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_keep_alive_connections_do_not_hold_shutdown_for_the_grace() -> anyhow::Result<()> {
    let backend = Backend::start("a").await?;
    let proxy = start(&backend, "30s").await?;
    // Leave idle keep-alive connections open on outbound (h1 and h2) and admin.
    let h1 = Client::absolute(proxy.outbound());
    let h2 = Client::h2(proxy.outbound());
    h1.get("http://billing/").await?.expect_status(200)?;
    h2.get("http://billing/").await?.expect_status(200)?;
    proxy.admin_client().ready_status().await?;
    // And a connection that has sent nothing yet, like the spare one a pooling
    // client opens while it reuses another: it must not wait out the header
    // read timeout either.
    let silent = TcpStream::connect(proxy.outbound()).await?;
    tokio::time::sleep(Duration::from_millis(100)).await;

    let signalled = Instant::now();
    proxy.signal(Signal::Term)?;
    let status = proxy.wait_exit(Duration::from_secs(9)).await?;
    ensure!(status.code() == Some(0), "exit status {status}");
    ensure!(
        signalled.elapsed() < Duration::from_secs(3),
        "shutdown took {:?} with idle connections open",
        signalled.elapsed()
    );
    drop((h1, h2, silent));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigint_exits_zero() -> anyhow::Result<()> {
    let backend = Backend::start("a").await?;
    let proxy = start(&backend, "5s").await?;
    Client::absolute(proxy.outbound())
        .get("http://billing/")
        .await?
        .expect_status(200)?;
    proxy.signal(Signal::Int)?;
    let status = proxy.wait_exit(Duration::from_secs(5)).await?;
    ensure!(status.code() == Some(0), "exit status {status}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_longer_than_the_grace_does_not_hold_the_process() -> anyhow::Result<()> {
    let backend = Backend::start("a").await?;
    let proxy = start(&backend, "1s").await?;
    let client = Client::absolute(proxy.outbound());
    let stuck = tokio::spawn({
        let client = client.clone();
        async move { client.get("http://billing/slow?ms=20000").await }
    });
    eventually(Duration::from_secs(2), || async {
        ensure!(backend.in_flight() == 1);
        Ok(())
    })
    .await?;

    proxy.signal(Signal::Term)?;
    let signalled = Instant::now();
    proxy.wait_exit(Duration::from_secs(4)).await?;
    ensure!(
        signalled.elapsed() < Duration::from_secs(3),
        "with grace 1s the proxy took {:?} to exit",
        signalled.elapsed()
    );
    // The cut-off request fails rather than hanging (the client bound is 30 s).
    let outcome = weft_tests::within(Duration::from_secs(5), "cut-off request", stuck).await??;
    ensure!(
        outcome.as_ref().map_or(true, |reply| reply.status != 200),
        "a request cut off by the grace cannot have succeeded: {outcome:?}"
    );
    Ok(())
}
