//! Scenario: a caller's sidecar retries what is safe to retry, elsewhere, and
//! within a budget.
//!
//! Backends can be switched to answer every request with 503 (after reading
//! its body), and each request carries an `x-request-id`, so a test can count
//! exactly how many tries each request cost and which endpoints they reached.
//! By default idempotent methods are retried on 502/503/504 and resets, any
//! method on connect failures, a retry goes to another endpoint, a body over
//! `max_replay_body` (64 KiB) is sent once, and `outbound.retry_budget` bounds
//! retries to a ratio of requests (the spent budget shows as `weft-reason:
//! budget-exhausted` on the upstream's own answer).
//!
//! Every policy here turns outlier ejection off in practice (1000 failures) so
//! that the failing endpoints stay in the balancer, and uses a short backoff
//! so the tests stay fast.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use anyhow::{Context as _, ensure};
use bytes::Bytes;
use weft_tests::backend::Backend;
use weft_tests::client::{Client, Reply};
use weft_tests::config::DirService;
use weft_tests::mesh::caller;
use weft_tests::{closed_port, pattern, statuses, tally};

/// Outbound settings shared by these scenarios; `extra` adds keys to `[outbound]`.
fn outbound(extra: &str) -> String {
    format!(
        "[outbound]\n\
         outlier = {{ consecutive_failures = 1000 }}\n\
         {extra}\n"
    )
}

/// A generous budget, for scenarios that are not about the budget.
const GENEROUS_BUDGET: &str = "retry_budget = { ratio = 1.0, min_per_second = 1000 }";

async fn send(
    client: &Client,
    method: &str,
    uri: &str,
    id: &str,
    body: Bytes,
) -> anyhow::Result<Reply> {
    client
        .send_with(method, uri, &[("x-request-id", id)], body)
        .await
        .with_context(|| format!("{method} {uri} ({id})"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idempotent_requests_survive_an_endpoint_that_always_fails() -> anyhow::Result<()> {
    let bad = Backend::start("bad").await?;
    let good = [
        Backend::start("good-1").await?,
        Backend::start("good-2").await?,
    ];
    bad.set_status(Some(503));
    let proxy = caller(
        DirService::new("billing").endpoints([bad.addr(), good[0].addr(), good[1].addr()]),
        &outbound(&format!(
            "load_balancer = \"round-robin\"\n{GENEROUS_BUDGET}\nretry = {{ backoff = \"1ms..5ms\" }}"
        )),
    )
    .await?;
    let client = Client::absolute(proxy.outbound());

    let methods = ["GET", "HEAD", "OPTIONS", "PUT", "DELETE"];
    let mut replies = Vec::new();
    for i in 0..30 {
        let method = methods[i % methods.len()];
        let reply = send(
            &client,
            method,
            "http://billing/",
            &format!("r{i}"),
            Bytes::new(),
        )
        .await?;
        reply
            .expect_status(200)
            .with_context(|| format!("{method} r{i} with one endpoint always answering 503"))?;
        replies.push(reply);
    }
    let counts = tally(&replies);
    ensure!(!counts.contains_key("bad"), "answers: {counts:?}");
    // Round-robin sends about a third of first tries to `bad`; each needed a retry.
    ensure!(
        bad.requests() >= 5,
        "bad saw only {} requests",
        bad.requests()
    );
    let counters = proxy
        .admin_client()
        .endpoints()
        .await?
        .counters("billing")?;
    ensure!(
        counters.retries()? == bad.requests() as u64,
        "retries counted {counters:?}, bad answered {} times",
        bad.requests()
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn post_is_not_retried_on_503_unless_its_route_allows_it() -> anyhow::Result<()> {
    let (bad, good) = (Backend::start("bad").await?, Backend::start("good").await?);
    bad.set_status(Some(503));
    let proxy = caller(
        DirService::new("billing").endpoints([bad.addr(), good.addr()]),
        &format!(
            "{}\n\
             [[routes]]\n\
             name = \"retryable\"\n\
             match = {{ path = \"/retryable\" }}\n\
             retry = {{ non_idempotent = true, backoff = \"1ms..5ms\" }}\n",
            outbound(&format!(
                "load_balancer = \"round-robin\"\n{GENEROUS_BUDGET}\nretry = {{ backoff = \"1ms..5ms\" }}"
            ))
        ),
    )
    .await?;
    let client = Client::absolute(proxy.outbound());

    let mut replies = Vec::new();
    for i in 0..20 {
        replies.push(
            send(
                &client,
                "POST",
                "http://billing/",
                &format!("p{i}"),
                Bytes::from("order"),
            )
            .await?,
        );
    }
    let failed: Vec<_> = replies.iter().filter(|r| r.status == 503).collect();
    ensure!(
        !failed.is_empty()
            && failed.len() + tally(&replies).get("good").copied().unwrap_or(0) == 20,
        "POSTs hitting the failing endpoint must get its 503, the others 200: {:?}",
        statuses(&replies)
    );
    for reply in &failed {
        ensure!(
            reply.backend() == Some("bad"),
            "a 503 to a POST must be the endpoint's own, not retried: {reply:?}"
        );
    }
    ensure!(
        bad.requests() + good.requests() == 20 && bad.requests() == failed.len(),
        "20 POSTs reached the backends {} times ({} at bad)",
        bad.requests() + good.requests(),
        bad.requests()
    );

    // The route that opts in retries POSTs too.
    for i in 0..10 {
        send(
            &client,
            "POST",
            "http://billing/retryable",
            &format!("q{i}"),
            Bytes::from("order"),
        )
        .await?
        .expect_status(200)
        .context("POST on a route with non_idempotent = true")?;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn any_method_is_retried_on_a_connect_failure() -> anyhow::Result<()> {
    let nobody = closed_port()?;
    let good = Backend::start("good").await?;
    let proxy = caller(
        DirService::new("billing").endpoints([nobody, good.addr()]),
        &outbound(&format!(
            "load_balancer = \"round-robin\"\n{GENEROUS_BUDGET}\nretry = {{ backoff = \"1ms..5ms\" }}"
        )),
    )
    .await?;
    let client = Client::absolute(proxy.outbound());
    for i in 0..10 {
        let reply = send(
            &client,
            "POST",
            "http://billing/",
            &format!("c{i}"),
            Bytes::from("x"),
        )
        .await?;
        reply
            .expect_status(200)
            .with_context(|| format!("POST c{i} with one endpoint refusing connections"))?;
    }
    ensure!(good.requests() == 10, "good saw {}", good.requests());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_goes_to_a_different_endpoint() -> anyhow::Result<()> {
    let (bad, good) = (Backend::start("bad").await?, Backend::start("good").await?);
    bad.set_status(Some(503));
    // The balancer (p2c-ewma, the default) strongly prefers `bad`, which
    // weighs 100 times the default while `good` weighs 1: first tries go to
    // `bad`, and a retry that ignored where the first try went would land on
    // `bad` again and, with one retry allowed, fail.
    let proxy = caller(
        DirService::new("billing")
            .endpoint_with(bad.addr(), &[("weight", "10000")])
            .endpoint_with(good.addr(), &[("weight", "1")]),
        &outbound(&format!(
            "{GENEROUS_BUDGET}\nretry = {{ attempts = 1, backoff = \"1ms..5ms\" }}"
        )),
    )
    .await?;
    let client = Client::absolute(proxy.outbound());

    for i in 0..30 {
        let id = format!("r{i}");
        let reply = send(&client, "GET", "http://billing/", &id, Bytes::new()).await?;
        reply
            .expect_status(200)
            .with_context(|| format!("{id}: one retry after the failing endpoint"))?;
        let (at_bad, at_good) = (
            bad.seen_with("x-request-id", &id),
            good.seen_with("x-request-id", &id),
        );
        ensure!(
            at_bad <= 1 && at_good == 1,
            "{id} reached bad {at_bad} times and good {at_good} times"
        );
    }
    ensure!(
        bad.requests() >= 20,
        "bad was tried first only {} times in 30: the scenario proved little",
        bad.requests()
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_retry_budget_caps_retries_when_every_endpoint_fails() -> anyhow::Result<()> {
    const REQUESTS: usize = 50;
    let (a, b) = (Backend::start("a").await?, Backend::start("b").await?);
    a.set_status(Some(503));
    b.set_status(Some(503));
    let proxy = caller(
        DirService::new("billing").endpoints([a.addr(), b.addr()]),
        &outbound(
            "retry_budget = { ratio = 0.2, min_per_second = 1, ttl = \"1s\" }\n\
             retry = { attempts = 2, backoff = \"1ms..5ms\" }",
        ),
    )
    .await?;
    let client = Client::absolute(proxy.outbound());

    let mut replies = Vec::new();
    for i in 0..REQUESTS {
        let reply = send(
            &client,
            "GET",
            "http://billing/",
            &format!("r{i}"),
            Bytes::new(),
        )
        .await?;
        reply.expect_status(503)?;
        ensure!(
            reply.backend().is_some(),
            "with the budget spent the upstream's own 503 comes back: {reply:?}"
        );
        replies.push(reply);
    }
    let seen = a.requests() + b.requests();
    // Unbudgeted, 50 requests with 2 retries each would be 150 tries. The
    // budget allows 20% of the requests plus about 1 per second.
    ensure!(
        seen > REQUESTS && seen <= REQUESTS + 20,
        "{REQUESTS} requests reached the backends {seen} times (want some retries, at most 20)"
    );
    let exhausted = replies
        .iter()
        .filter(|r| r.reason() == Some("budget-exhausted"))
        .count();
    ensure!(
        exhausted >= REQUESTS - 20,
        "only {exhausted} of {REQUESTS} answers say weft-reason: budget-exhausted"
    );
    let counters = proxy
        .admin_client()
        .endpoints()
        .await?
        .counters("billing")?;
    ensure!(
        counters.retries()? == (seen - REQUESTS) as u64
            && counters.refusals("budget-exhausted")? == exhausted as u64,
        "billing counters {counters:?}: {} retries reached the backends, {exhausted} answers were budget-exhausted",
        seen - REQUESTS
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_over_the_replay_cap_is_sent_once_and_not_retried() -> anyhow::Result<()> {
    let (a, b) = (Backend::start("a").await?, Backend::start("b").await?);
    a.set_status(Some(503));
    b.set_status(Some(503));
    let proxy = caller(
        DirService::new("billing").endpoints([a.addr(), b.addr()]),
        &outbound(&format!(
            "{GENEROUS_BUDGET}\nretry = {{ attempts = 2, backoff = \"1ms..5ms\" }}"
        )),
    )
    .await?;
    let client = Client::absolute(proxy.outbound());
    let seen = || a.requests() + b.requests();

    // Under the 64 KiB default: buffered, and retried twice.
    let small = Bytes::from(pattern(0, 1024));
    let reply = send(&client, "PUT", "http://billing/", "small", small).await?;
    reply.expect_status(503)?;
    ensure!(
        seen() == 3,
        "a 1 KiB PUT reached the backends {} times, want 3",
        seen()
    );

    // Over it: streamed once, and the client gets the endpoint's answer.
    let large = Bytes::from(pattern(0, 100 * 1024));
    let reply = send(&client, "PUT", "http://billing/", "large", large).await?;
    reply.expect_status(503)?;
    ensure!(
        reply.backend().is_some(),
        "the endpoint's own 503 should come back: {reply:?}"
    );
    ensure!(
        reply.text().contains(&format!("read Ok({})", 100 * 1024)),
        "the endpoint should have read the whole body: {:?}",
        reply.text()
    );
    ensure!(
        seen() == 4,
        "a 100 KiB PUT (over max_replay_body) reached the backends {} times, want 1",
        seen() - 3
    );
    Ok(())
}
