//! Scenario: outlier detection takes failing endpoints out of the balancer and
//! brings them back.
//!
//! After `consecutive_failures` 5xx answers in a row an endpoint is ejected
//! for `ejection`: it gets no traffic and `/endpoints` shows it `ejected` with
//! `ejected_for_ms`. When the ejection ends it is `active` again and gets real
//! traffic. No more than `max_ejected_percent` of the endpoints are ejected
//! at once (rounded down; 100 allows all), and with every endpoint ejected a
//! request is answered at once with 503 `no-healthy-endpoints`.
//!
//! Retries are off (`attempts = 0`) so every failure is seen by the client and
//! counted by the test, and round-robin makes the order of tries predictable.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use anyhow::{Context as _, ensure};
use weft_tests::backend::Backend;
use weft_tests::client::Client;
use weft_tests::config::DirService;
use weft_tests::mesh::caller;
use weft_tests::process::Proxy;
use weft_tests::{eventually, get_n, statuses, tally};

fn policy(outlier: &str) -> String {
    format!(
        "[outbound]\n\
         load_balancer = \"round-robin\"\n\
         retry = {{ attempts = 0 }}\n\
         outlier = {{ {outlier} }}\n"
    )
}

/// Sends one request per poll until `/endpoints` lists `want` ejected endpoints
/// of `billing`, and returns the ejected set.
async fn fail_until_ejected(
    proxy: &Proxy,
    client: &Client,
    want: usize,
) -> anyhow::Result<std::collections::BTreeSet<std::net::SocketAddr>> {
    let admin = proxy.admin_client();
    eventually(Duration::from_secs(10), || {
        let (admin, client) = (admin.clone(), client.clone());
        async move {
            let ejected = admin.endpoints().await?.ejected("billing")?;
            if ejected.len() == want {
                return Ok(ejected);
            }
            client.get("http://billing/").await?;
            anyhow::bail!("{} endpoints ejected, want {want}", ejected.len())
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_endpoint_is_ejected_then_returns_after_the_ejection() -> anyhow::Result<()> {
    const EJECTION: Duration = Duration::from_secs(2);
    let (flaky, good) = (
        Backend::start("flaky").await?,
        Backend::start("good").await?,
    );
    flaky.set_status(Some(500));
    let proxy = caller(
        DirService::new("billing").endpoints([flaky.addr(), good.addr()]),
        &policy("consecutive_failures = 3, ejection = \"2s\""),
    )
    .await?;
    let client = Client::absolute(proxy.outbound());
    let admin = proxy.admin_client();

    // Round-robin: every other request meets the failing endpoint.
    let mut replies = Vec::new();
    for _ in 0..12 {
        replies.push(client.get("http://billing/").await?);
    }
    let failures = replies.iter().filter(|r| r.status == 500).count();
    ensure!(
        (3..=4).contains(&failures) && flaky.requests() == failures,
        "the endpoint failed {failures} times ({} tries) before it stopped getting traffic, \
         want 3 (consecutive_failures): {:?}",
        flaky.requests(),
        statuses(&replies)
    );
    let endpoints = admin.endpoints().await?;
    ensure!(
        endpoints.ejected("billing")? == [flaky.addr()].into(),
        "want only flaky ejected: {}",
        endpoints.0
    );
    endpoints.expect_active("billing", [good.addr()])?;
    let ejected_for = endpoints.endpoint("billing", flaky.addr())?["ejected_for_ms"]
        .as_u64()
        .context("an ejected endpoint has ejected_for_ms")?;
    ensure!(
        ejected_for <= EJECTION.as_millis() as u64,
        "ejected_for_ms {ejected_for} (ejection {EJECTION:?})"
    );
    ensure!(
        endpoints.counters("billing")?.ejections()? == 1,
        "{}",
        endpoints.0
    );

    // While ejected, it gets nothing. (If the ejection had ended meanwhile,
    // the check would prove nothing: the machine is too slow for 2 s.)
    let before = flaky.requests();
    let mut replies = Vec::new();
    for _ in 0..10 {
        replies.push(client.get("http://billing/").await?);
    }
    let still_ejected = admin.endpoints().await?.ejected("billing")?;
    ensure!(
        still_ejected.contains(&flaky.addr()),
        "the ejection ended before 10 requests were done: the machine is too slow for this scenario"
    );
    ensure!(
        flaky.requests() == before && replies.iter().all(|r| r.status == 200),
        "an ejected endpoint got traffic: {:?}",
        statuses(&replies)
    );

    // Healed, it comes back when the ejection ends (probed by real traffic:
    // keep sending) and gets traffic again.
    flaky.set_status(None);
    eventually(EJECTION + Duration::from_secs(3), || async {
        client.get("http://billing/").await?.expect_status(200)?;
        admin
            .endpoints()
            .await?
            .expect_active("billing", [flaky.addr(), good.addr()])
    })
    .await?;
    let replies = get_n(&client, "http://billing/", 10).await?;
    let counts = tally(&replies);
    ensure!(
        counts.get("flaky").copied().unwrap_or(0) >= 3,
        "the returned endpoint should share the traffic again: {counts:?}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_ejected_percent_bounds_how_many_endpoints_are_ejected() -> anyhow::Result<()> {
    let backends = [
        Backend::start("a").await?,
        Backend::start("b").await?,
        Backend::start("c").await?,
    ];
    for backend in &backends {
        backend.set_status(Some(500));
    }
    let proxy = caller(
        DirService::new("billing").endpoints(backends.iter().map(Backend::addr)),
        &policy("consecutive_failures = 2, ejection = \"30s\", max_ejected_percent = 34"),
    )
    .await?;
    let client = Client::absolute(proxy.outbound());

    // Every endpoint fails 10 times in a row or more; 34% of 3 is 1 endpoint.
    let mut replies = Vec::new();
    for _ in 0..30 {
        replies.push(client.get("http://billing/").await?);
    }
    ensure!(
        replies
            .iter()
            .all(|r| r.status == 500 && r.backend().is_some()),
        "every answer should be a backend's 500: {:?}",
        statuses(&replies)
    );
    let endpoints = proxy.admin_client().endpoints().await?;
    let ejected = endpoints.ejected("billing")?;
    let active = endpoints.active("billing")?;
    ensure!(
        ejected.len() == 1 && active.len() == 2,
        "want 1 ejected and 2 active: {}",
        endpoints.0
    );
    ensure!(
        endpoints.counters("billing")?.ejections()? == 1,
        "{}",
        endpoints.0
    );
    // The last requests went only to the endpoints still in.
    let last = tally(&replies[20..]);
    for backend in backends.iter().filter(|b| ejected.contains(&b.addr())) {
        ensure!(
            !last.contains_key(backend.id()),
            "ejected {} got traffic: {last:?}",
            backend.id()
        );
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_every_endpoint_ejected_requests_get_503_no_healthy_endpoints() -> anyhow::Result<()> {
    let (a, b) = (Backend::start("a").await?, Backend::start("b").await?);
    a.set_status(Some(500));
    b.set_status(Some(500));
    let proxy = caller(
        DirService::new("billing").endpoints([a.addr(), b.addr()]),
        &policy("consecutive_failures = 2, ejection = \"30s\", max_ejected_percent = 100"),
    )
    .await?;
    let client = Client::absolute(proxy.outbound());

    fail_until_ejected(&proxy, &client, 2).await?;
    let seen = a.requests() + b.requests();
    for _ in 0..3 {
        let reply = client.get("http://billing/").await?;
        reply.expect_status(503)?;
        ensure!(
            reply.reason() == Some("no-healthy-endpoints") && reply.backend().is_none(),
            "want the proxy's own 503 no-healthy-endpoints: {reply:?}"
        );
    }
    ensure!(
        a.requests() + b.requests() == seen,
        "an ejected endpoint got traffic"
    );
    let counters = proxy
        .admin_client()
        .endpoints()
        .await?
        .counters("billing")?;
    ensure!(
        counters.refusals("no-healthy-endpoints")? == 3 && counters.ejections()? == 2,
        "billing counters: {counters:?}"
    );
    Ok(())
}
