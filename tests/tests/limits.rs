//! Scenario: rate limits refuse what is over the limit, at once, with a 429
//! that names the limit.
//!
//! The service's own sidecar enforces `inbound.rate_limit` (service-wide: each
//! instance takes `1 / [service] instances` of the rate and of the burst, at
//! least 1) and `inbound.caller_rate_limit` (one bucket per `weft-caller`,
//! `anonymous` without one, with `overrides` per caller). A caller's sidecar
//! enforces `outbound.rate_limit` on everything it sends to the service, and
//! names itself in `weft-caller` (replacing what the app sent). Every refusal
//! is `429`, `weft-reason: rate-limit`, `weft-limit: <key path>` and
//! `retry-after: <whole seconds >= 1>`, and never reaches the app.
//!
//! Bursts are checked exactly with limits so slow to refill (0.2/s: a token
//! every 5 s) that no token comes back during the test; the sustained rate is
//! checked with a generous window, since a loaded machine stretches time.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use anyhow::{Context as _, ensure};
use tokio::time::Instant;
use weft_tests::backend::Backend;
use weft_tests::client::{Client, Reply};
use weft_tests::config::{Bootstrap, DirService};
use weft_tests::mesh::{callee, caller, caller_with};
use weft_tests::{paced, statuses};

/// Sends `count` sequential GETs, with `weft-caller: caller` when given, and
/// returns the statuses in order.
async fn burst(
    client: &Client,
    uri: &str,
    caller: Option<&str>,
    count: usize,
) -> anyhow::Result<Vec<Reply>> {
    let headers: Vec<(&str, &str)> = caller.map(|c| ("weft-caller", c)).into_iter().collect();
    let mut replies = Vec::with_capacity(count);
    for _ in 0..count {
        replies.push(client.get_with(uri, &headers).await?);
    }
    Ok(replies)
}

/// Checks that `replies` are `admitted` 200s followed only by 429 refusals
/// from `limit`.
fn expect_admitted_then_refused(
    replies: &[Reply],
    admitted: usize,
    limit: &str,
    what: &str,
) -> anyhow::Result<()> {
    let codes: Vec<u16> = replies.iter().map(|r| r.status.as_u16()).collect();
    for (i, reply) in replies.iter().enumerate() {
        if i < admitted {
            reply.expect_status(200).with_context(|| {
                format!("{what}: request {i} of {codes:?} (want {admitted} admitted)")
            })?;
        } else {
            reply
                .expect_refusal(429, "rate-limit", limit)
                .with_context(|| {
                    format!("{what}: request {i} of {codes:?} (want {admitted} admitted)")
                })?;
        }
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inbound_rate_limit_admits_about_the_configured_rate() -> anyhow::Result<()> {
    const PER_SECOND: f64 = 20.0;
    const BURST: f64 = 5.0;
    let app = Backend::start("app").await?;
    let proxy = callee(
        "billing",
        app.addr(),
        1,
        "[inbound]\nrate_limit = { per_second = 20, burst = 5 }",
    )
    .await?;
    let client = Client::host_header(proxy.inbound());

    // 50/s for 2 s: two and a half times the limit.
    let started = Instant::now();
    let replies = paced(100, Duration::from_millis(20), |_| {
        let client = client.clone();
        async move { client.get("http://billing/").await }
    })
    .await?;
    let elapsed = started.elapsed().as_secs_f64();

    let admitted = replies.iter().filter(|r| r.status == 200).count();
    for reply in replies.iter().filter(|r| r.status != 200) {
        reply.expect_refusal(429, "rate-limit", "inbound.rate_limit")?;
    }
    // Ideal: 5 + 20 * 2 = 45. A bucket refills with time, so a slow run may
    // admit more, but never more than the burst plus the rate over the time
    // the requests took, plus a little for timer slack.
    let ceiling = BURST + PER_SECOND * elapsed + 3.0;
    ensure!(
        (30..=60).contains(&admitted) && (admitted as f64) <= ceiling,
        "admitted {admitted} of 100 over {elapsed:.2}s (want 30..=60 and <= {ceiling:.0}): {:?}",
        statuses(&replies)
    );
    ensure!(
        app.requests() == admitted,
        "the app saw {} requests, {admitted} were admitted",
        app.requests()
    );
    let local = proxy.admin_client().endpoints().await?.local_counters()?;
    ensure!(
        local.refusals("rate-limit")? == (100 - admitted) as u64,
        "local counters: {local:?}, {} refused",
        100 - admitted
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn caller_rate_limit_keeps_one_bucket_per_caller_with_overrides() -> anyhow::Result<()> {
    let app = Backend::start("app").await?;
    let proxy = callee(
        "billing",
        app.addr(),
        1,
        "[inbound]\n\
         caller_rate_limit = { per_second = 0.2, burst = 3, overrides = { gold = { per_second = 0.2, burst = 8 } } }",
    )
    .await?;
    let client = Client::host_header(proxy.inbound());
    let uri = "http://billing/";
    let limit = "inbound.caller_rate_limit";

    let a = burst(&client, uri, Some("orders"), 5).await?;
    expect_admitted_then_refused(&a, 3, limit, "caller orders")?;
    // Another caller has its own bucket, untouched by the first one's.
    let b = burst(&client, uri, Some("checkout"), 4).await?;
    expect_admitted_then_refused(&b, 3, limit, "caller checkout after orders ran out")?;
    // No weft-caller: the `anonymous` caller, again a bucket of its own.
    let anonymous = burst(&client, uri, None, 4).await?;
    expect_admitted_then_refused(&anonymous, 3, limit, "anonymous caller")?;
    // An override gives one caller a bigger bucket.
    let gold = burst(&client, uri, Some("gold"), 9).await?;
    expect_admitted_then_refused(&gold, 8, limit, "caller gold (override burst 8)")?;
    // The first caller is still out of tokens.
    let again = burst(&client, uri, Some("orders"), 1).await?;
    expect_admitted_then_refused(&again, 0, limit, "caller orders, later")?;

    ensure!(
        app.requests() == 3 + 3 + 3 + 8,
        "the app saw {}",
        app.requests()
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn instances_share_service_wide_limits() -> anyhow::Result<()> {
    let app = Backend::start("app").await?;
    let uri = "http://billing/";

    // Two instances: each takes half of the service's burst of 10.
    let proxy = callee(
        "billing",
        app.addr(),
        2,
        "[inbound]\nrate_limit = { per_second = 0.2, burst = 10 }",
    )
    .await?;
    let client = Client::host_header(proxy.inbound());
    let replies = burst(&client, uri, None, 8).await?;
    expect_admitted_then_refused(
        &replies,
        5,
        "inbound.rate_limit",
        "burst 10 over 2 instances",
    )?;
    drop(proxy);

    // Per-caller limits are divided the same way, overrides included.
    let proxy = callee(
        "billing",
        app.addr(),
        2,
        "[inbound]\n\
         caller_rate_limit = { per_second = 0.2, burst = 6, overrides = { gold = { per_second = 0.2, burst = 10 } } }",
    )
    .await?;
    let client = Client::host_header(proxy.inbound());
    let limit = "inbound.caller_rate_limit";
    let replies = burst(&client, uri, Some("orders"), 5).await?;
    expect_admitted_then_refused(&replies, 3, limit, "caller burst 6 over 2 instances")?;
    let replies = burst(&client, uri, Some("gold"), 7).await?;
    expect_admitted_then_refused(&replies, 5, limit, "override burst 10 over 2 instances")?;
    drop(proxy);

    // A share never rounds down to nothing: burst 1 over 3 instances is 1.
    let proxy = callee(
        "billing",
        app.addr(),
        3,
        "[inbound]\nrate_limit = { per_second = 0.2, burst = 1 }",
    )
    .await?;
    let client = Client::host_header(proxy.inbound());
    let replies = burst(&client, uri, None, 2).await?;
    expect_admitted_then_refused(
        &replies,
        1,
        "inbound.rate_limit",
        "burst 1 over 3 instances",
    )?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outbound_rate_limit_caps_what_one_caller_sidecar_sends() -> anyhow::Result<()> {
    let backend = Backend::start("a").await?;
    let proxy = caller(
        DirService::new("billing").endpoint(backend.addr()),
        "[outbound]\nrate_limit = { per_second = 0.2, burst = 3 }",
    )
    .await?;
    let client = Client::absolute(proxy.outbound());

    let replies = burst(&client, "http://billing/", None, 5).await?;
    expect_admitted_then_refused(&replies, 3, "outbound.rate_limit", "outbound burst 3")?;
    ensure!(
        backend.requests() == 3,
        "the backend saw {}",
        backend.requests()
    );
    let counters = proxy
        .admin_client()
        .endpoints()
        .await?
        .counters("billing")?;
    ensure!(
        counters.refusals("rate-limit")? == 2,
        "billing counters: {counters:?}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_caller_sidecar_names_its_own_service_in_weft_caller() -> anyhow::Result<()> {
    let policy = "[inbound]\n\
                  caller_rate_limit = { per_second = 0.2, burst = 2, overrides = { orders = { per_second = 0.2, burst = 5 } } }";
    let app = Backend::start("billing-app").await?;
    let billing = callee("billing", app.addr(), 1, policy).await?;
    // The sidecar of service `orders`, calling billing's sidecar.
    let orders_app = Backend::start("orders-app").await?;
    let orders = caller_with(
        Bootstrap::new().app("orders", orders_app.addr()),
        DirService::new("billing").endpoint(billing.inbound()),
        policy,
    )
    .await?;

    // The app claims to be someone else; its sidecar replaces that with
    // `orders`, so the override's burst of 5 applies, not the default 2.
    let client = Client::absolute(orders.outbound());
    let replies = burst(&client, "http://billing/", Some("checkout"), 7).await?;
    expect_admitted_then_refused(
        &replies,
        5,
        "inbound.caller_rate_limit",
        "through the orders sidecar",
    )?;

    // `checkout`'s own bucket was never touched.
    let direct = Client::host_header(billing.inbound());
    let replies = burst(&direct, "http://billing/", Some("checkout"), 3).await?;
    expect_admitted_then_refused(
        &replies,
        2,
        "inbound.caller_rate_limit",
        "caller checkout, direct",
    )?;
    ensure!(app.requests() == 7, "billing's app saw {}", app.requests());
    Ok(())
}
