//! Scenario: timeouts answer 504 at the timeout, name the key that fired, and
//! never cut a response that has started.
//!
//! A timeout covers the time to the response headers: a slow backend gets a
//! 504 `weft-reason: timeout` close to the configured time (not after the
//! backend's delay), while a body that keeps streaming past the timeout is
//! delivered whole. Only `outbound.idle_timeout` cuts a body, when it sends
//! nothing for that long. A `per_try_timeout` with a retry moves on to a fast
//! endpoint well within the whole-request timeout. `inbound.timeout` guards
//! the service's own sidecar the same way.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use anyhow::{Context as _, ensure};
use http_body_util::BodyExt as _;
use weft_tests::backend::Backend;
use weft_tests::client::{Client, Reply};
use weft_tests::config::DirService;
use weft_tests::mesh::{callee, caller};
use weft_tests::{tally, timed, within};

/// Fails unless `elapsed` is close to `timeout`: not before it, and well
/// before the backend would have answered.
fn expect_near(
    elapsed: Duration,
    timeout: Duration,
    backend_delay: Duration,
) -> anyhow::Result<()> {
    ensure!(
        elapsed >= timeout - Duration::from_millis(10) && elapsed < backend_delay / 2,
        "answered after {elapsed:?}: want about the {timeout:?} timeout (the backend takes {backend_delay:?})"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_route_timeout_answers_504_at_the_timeout_not_the_backend_delay() -> anyhow::Result<()> {
    let backend = Backend::start("a").await?;
    let proxy = caller(
        DirService::new("billing").endpoint(backend.addr()),
        "[[routes]]\nname = \"api\"\ntimeout = \"300ms\"\nretry = { attempts = 0 }",
    )
    .await?;
    let client = Client::absolute(proxy.outbound());

    let (reply, elapsed) = timed(client.get("http://billing/slow?ms=3000")).await;
    reply?.expect_refusal(504, "timeout", "routes.api.timeout")?;
    expect_near(
        elapsed,
        Duration::from_millis(300),
        Duration::from_millis(3000),
    )?;
    let counters = proxy
        .admin_client()
        .endpoints()
        .await?
        .counters("billing")?;
    ensure!(
        counters.refusals("timeout")? == 1,
        "billing counters: {counters:?}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_streaming_past_the_timeout_is_not_cut() -> anyhow::Result<()> {
    let backend = Backend::start("a").await?;
    let proxy = caller(
        DirService::new("billing").endpoint(backend.addr()),
        "[outbound]\nidle_timeout = \"2s\"\n\n\
         [[routes]]\nname = \"api\"\ntimeout = \"300ms\"\nretry = { attempts = 0 }",
    )
    .await?;
    let client = Client::absolute(proxy.outbound());

    // Headers and the first chunk at once, then a chunk every 150 ms: 750 ms
    // in all, more than twice the route timeout.
    let (reply, elapsed) = timed(client.get("http://billing/drip?chunks=6&ms=150")).await;
    let reply = reply?;
    reply.expect_status(200)?;
    let want: String = (0..6).map(|i| format!("chunk {i}\n")).collect();
    ensure!(reply.text() == want, "the body was cut: {:?}", reply.text());
    ensure!(
        elapsed >= Duration::from_millis(700),
        "the body took {elapsed:?}, so it did not outlast the 300ms timeout"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_timeout_cuts_a_body_that_stalls() -> anyhow::Result<()> {
    let backend = Backend::start("a").await?;
    let proxy = caller(
        DirService::new("billing").endpoint(backend.addr()),
        "[outbound]\nidle_timeout = \"400ms\"",
    )
    .await?;
    let client = Client::absolute(proxy.outbound());

    // Gaps shorter than the idle timeout are fine, however long the body.
    let reply = client.get("http://billing/drip?chunks=6&ms=150").await?;
    reply.expect_status(200)?;
    ensure!(
        reply.text().ends_with("chunk 5\n"),
        "cut: {:?}",
        reply.text()
    );

    // A gap of 3 s: the proxy must cut the body about 400 ms after chunk 0.
    let response = client
        .send(
            http::Request::get("http://billing/drip?chunks=3&ms=3000")
                .body(weft_tests::client::empty())?,
        )
        .await?;
    ensure!(response.status() == 200, "status {}", response.status());
    let (collected, elapsed) = timed(within(
        Duration::from_millis(2500),
        "a body stalled for longer than outbound.idle_timeout (it was not cut)",
        response.into_body().collect(),
    ))
    .await;
    let body = match collected? {
        Ok(collected) => collected.to_bytes(),
        // A cut shows as a body error on the client side: what we want.
        Err(_) => return Ok(()),
    };
    ensure!(
        !body.ends_with(b"chunk 2\n"),
        "the whole stalled body arrived after {elapsed:?}; want it cut after the idle timeout"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_try_timeout_with_a_retry_reaches_a_fast_endpoint() -> anyhow::Result<()> {
    let slow = Backend::builder("slow")
        .latency(Duration::from_secs(3))
        .start()
        .await?;
    let fast = Backend::start("fast").await?;
    let proxy = caller(
        DirService::new("billing").endpoints([slow.addr(), fast.addr()]),
        "[outbound]\n\
         load_balancer = \"round-robin\"\n\
         outlier = { consecutive_failures = 1000 }\n\
         retry_budget = { ratio = 1.0, min_per_second = 1000 }\n\n\
         [[routes]]\n\
         name = \"single\"\n\
         match = { headers = [{ name = \"x-single\" }] }\n\
         timeout = \"2s\"\n\
         per_try_timeout = \"200ms\"\n\
         retry = { attempts = 0 }\n\n\
         [[routes]]\n\
         name = \"tries\"\n\
         timeout = \"2s\"\n\
         per_try_timeout = \"200ms\"\n\
         retry = { attempts = 1, backoff = \"1ms..5ms\" }\n",
    )
    .await?;
    let client = Client::absolute(proxy.outbound());

    let mut replies: Vec<Reply> = Vec::new();
    for i in 0..6 {
        let (reply, elapsed) = timed(client.get("http://billing/")).await;
        let reply = reply?;
        reply.expect_status(200).with_context(|| {
            format!("request {i}: the try at the slow endpoint should time out and retry")
        })?;
        ensure!(
            elapsed < Duration::from_millis(1500),
            "request {i} took {elapsed:?}; a try is cut at 200 ms"
        );
        replies.push(reply);
    }
    ensure!(
        tally(&replies).keys().eq(["fast"]) && slow.requests() >= 2,
        "answers {:?}; the slow endpoint saw {} tries",
        tally(&replies),
        slow.requests()
    );

    // Without a retry the per-try timeout is the answer. Round-robin sends one
    // of two consecutive requests to the slow endpoint.
    let mut refused = 0;
    for _ in 0..2 {
        let (reply, elapsed) =
            timed(client.get_with("http://billing/", &[("x-single", "1")])).await;
        let reply = reply?;
        if reply.status == 200 {
            continue;
        }
        reply.expect_refusal(504, "timeout", "routes.single.per_try_timeout")?;
        expect_near(elapsed, Duration::from_millis(200), Duration::from_secs(3))?;
        refused += 1;
    }
    ensure!(
        refused == 1,
        "{refused} of 2 single tries timed out, want 1"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inbound_timeout_answers_504_on_the_services_own_sidecar() -> anyhow::Result<()> {
    let app = Backend::start("app").await?;
    let proxy = callee("billing", app.addr(), 1, "[inbound]\ntimeout = \"300ms\"").await?;
    let client = Client::host_header(proxy.inbound());

    let (reply, elapsed) = timed(client.get("http://billing/slow?ms=3000")).await;
    reply?.expect_refusal(504, "timeout", "inbound.timeout")?;
    expect_near(
        elapsed,
        Duration::from_millis(300),
        Duration::from_millis(3000),
    )?;
    // A quick request is unaffected.
    client.get("http://billing/").await?.expect_status(200)?;
    let local = proxy.admin_client().endpoints().await?.local_counters()?;
    ensure!(local.refusals("timeout")? == 1, "local counters: {local:?}");
    Ok(())
}
