//! Scenario: `[[routes]]` give requests their own limits; the first route that
//! matches wins, and a request no route matches gets the service defaults.
//!
//! A route matches on method, exact `path`, `path_prefix` and headers (present,
//! or with a value). Which route a request took shows in the `weft-limit` of
//! its refusal (`routes.<name>.timeout`, ..., or `outbound.timeout` for the
//! defaults). The caller's sidecar applies routes' timeouts and retries; the
//! service's own sidecar applies routes' rate limits and concurrency caps.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use anyhow::{Context as _, ensure};
use weft_tests::backend::Backend;
use weft_tests::client::Client;
use weft_tests::config::DirService;
use weft_tests::mesh::{callee, caller};
use weft_tests::{eventually, timed, within};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outbound_routes_pick_timeouts_first_match_wins_and_defaults_apply_otherwise()
-> anyhow::Result<()> {
    let backend = Backend::start("a").await?;
    let proxy = caller(
        DirService::new("billing").endpoint(backend.addr()),
        "[outbound]\n\
         timeout = \"300ms\"\n\
         retry = { attempts = 0 }\n\n\
         [[routes]]\n\
         name = \"canary\"\n\
         match = { headers = [{ name = \"x-canary\", value = \"1\" }] }\n\
         timeout = \"150ms\"\n\n\
         [[routes]]\n\
         name = \"reads\"\n\
         match = { method = \"GET\", path = \"/slow\" }\n\
         timeout = \"2s\"\n",
    )
    .await?;
    let client = Client::absolute(proxy.outbound());
    let uri = "http://billing/slow?ms=600";

    // `reads`: GET /slow, 2 s is plenty.
    client
        .get(uri)
        .await?
        .expect_status(200)
        .context("GET /slow on route reads")?;
    // `canary` comes first and also matches: its 150 ms applies.
    let (reply, elapsed) = timed(client.get_with(uri, &[("x-canary", "1")])).await;
    reply?.expect_refusal(504, "timeout", "routes.canary.timeout")?;
    ensure!(
        elapsed < Duration::from_millis(500),
        "canary timed out after {elapsed:?}"
    );
    // A header with another value does not match `canary`: back to `reads`.
    client
        .get_with(uri, &[("x-canary", "2")])
        .await?
        .expect_status(200)
        .context("x-canary: 2 should fall through to route reads")?;
    // POST matches no route: the [outbound] default timeout.
    let (reply, elapsed) = timed(client.post(uri, "x")).await;
    reply?.expect_refusal(504, "timeout", "outbound.timeout")?;
    ensure!(
        elapsed >= Duration::from_millis(290),
        "the default timeout fired after {elapsed:?}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inbound_routes_limit_their_own_requests_and_name_the_route() -> anyhow::Result<()> {
    let app = Backend::start("app").await?;
    let proxy = callee(
        "billing",
        app.addr(),
        1,
        "[[routes]]\n\
         name = \"charge\"\n\
         match = { method = \"POST\", path_prefix = \"/charge\" }\n\
         rate_limit = { per_second = 0.2, burst = 2 }\n\n\
         [[routes]]\n\
         name = \"hold\"\n\
         match = { path = \"/hold\" }\n\
         max_concurrency = 1\n",
    )
    .await?;
    let client = Client::host_header(proxy.inbound());

    // POST /charge...: a burst of 2.
    for i in 0..2 {
        client
            .post(&format!("http://billing/charge/{i}"), "x")
            .await?
            .expect_status(200)?;
    }
    client
        .post("http://billing/charge/2", "x")
        .await?
        .expect_refusal(429, "rate-limit", "routes.charge.rate_limit")?;
    // GET /charge is not that route, and other paths are not limited.
    for _ in 0..3 {
        client
            .get("http://billing/charge")
            .await?
            .expect_status(200)?;
    }

    // /hold: one at a time; the route's cap does not touch other paths.
    let holder = tokio::spawn({
        let client = client.clone();
        async move { client.get("http://billing/hold").await }
    });
    eventually(Duration::from_secs(5), || async {
        ensure!(
            app.in_flight() == 1,
            "the holding request has not reached the app"
        );
        Ok(())
    })
    .await?;
    client.get("http://billing/hold").await?.expect_refusal(
        503,
        "concurrency-cap",
        "routes.hold.max_concurrency",
    )?;
    client
        .get("http://billing/other")
        .await?
        .expect_status(200)?;
    app.release();
    within(Duration::from_secs(5), "the holder", holder)
        .await???
        .expect_status(200)?;

    let local = proxy.admin_client().endpoints().await?.local_counters()?;
    ensure!(
        local.refusals("rate-limit")? == 1 && local.refusals("concurrency-cap")? == 1,
        "local counters: {local:?}"
    );
    Ok(())
}
