//! Scenario: calling a service by its logical name spreads requests over its
//! endpoints the way its policy's `load_balancer` says.
//!
//! Three in-process backends are the endpoints of directory service `billing`.
//! The app side is played by HTTP/1.1 clients that name the destination in the
//! absolute-form URI or in the Host header. Round-robin must split exactly;
//! P2C with peak-EWMA (the default) must move traffic away from an endpoint
//! that answers slowly; least-request must avoid an endpoint that is busy.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::ensure;
use weft_tests::backend::Backend;
use weft_tests::client::{Client, Mode};
use weft_tests::config::{Bootstrap, DirService, policy};
use weft_tests::process::Proxy;
use weft_tests::traffic::Traffic;
use weft_tests::{eventually, get_n, tally};

/// Starts a proxy whose directory has `billing` over `backends`, with a policy
/// file choosing `load_balancer` if one is given.
async fn start_proxy(backends: &[&Backend], load_balancer: Option<&str>) -> anyhow::Result<Proxy> {
    let mut service = DirService::new("billing").endpoints(backends.iter().map(|b| b.addr()));
    if load_balancer.is_some() {
        service = service.policy("billing.toml");
    }
    let mut builder = Proxy::builder(Bootstrap::new().service(service).render());
    if let Some(load_balancer) = load_balancer {
        builder = builder.file("billing.toml", policy("billing", load_balancer));
    }
    builder.start().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logical_name_reaches_every_endpoint_in_absolute_form_and_by_host_header()
-> anyhow::Result<()> {
    let (a, b, c) = (
        Backend::start("a").await?,
        Backend::start("b").await?,
        Backend::start("c").await?,
    );
    let proxy = start_proxy(&[&a, &b, &c], Some("round-robin")).await?;

    for mode in [Mode::AbsoluteForm, Mode::HostHeader] {
        let client = Client::new(proxy.outbound(), mode);
        let replies = get_n(&client, "http://billing/hello", 30).await?;
        let counts = tally(&replies);
        ensure!(
            counts.keys().map(String::as_str).eq(["a", "b", "c"]),
            "{mode:?}: every endpoint should answer, got {counts:?}"
        );
        for reply in &replies {
            let id = reply.backend().unwrap_or("?");
            ensure!(
                reply.text() == format!("backend {id}"),
                "{mode:?}: body {:?}",
                reply.text()
            );
            // The backend sees the Host the app sent, not an endpoint address.
            ensure!(
                reply.header("x-seen-host") == Some("billing"),
                "{mode:?}: backend saw Host {:?}",
                reply.header("x-seen-host")
            );
        }
    }
    ensure!(a.requests() + b.requests() + c.requests() == 60);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_robin_splits_sequential_requests_evenly() -> anyhow::Result<()> {
    let (a, b, c) = (
        Backend::start("a").await?,
        Backend::start("b").await?,
        Backend::start("c").await?,
    );
    let proxy = start_proxy(&[&a, &b, &c], Some("round-robin")).await?;
    let client = Client::absolute(proxy.outbound());

    let replies = get_n(&client, "http://billing/", 300).await?;
    let counts = tally(&replies);
    for backend in [&a, &b, &c] {
        let answered = counts.get(backend.id()).copied().unwrap_or(0);
        ensure!(
            answered.abs_diff(100) <= 1,
            "round-robin over 3 endpoints: {} answered {answered} of 300 ({counts:?})",
            backend.id()
        );
        // What the client saw is what the backend saw: no request was answered twice.
        ensure!(
            backend.requests() == answered,
            "{} saw {}",
            backend.id(),
            backend.requests()
        );
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn p2c_ewma_is_the_default_and_shifts_traffic_away_from_a_slow_endpoint() -> anyhow::Result<()>
{
    let fast_a = Backend::start("fast-a").await?;
    let fast_b = Backend::start("fast-b").await?;
    let slow = Backend::builder("slow")
        .latency(Duration::from_millis(40))
        .start()
        .await?;
    // No policy file: the default balancer applies.
    let proxy = start_proxy(&[&fast_a, &fast_b, &slow], None).await?;
    let endpoints = proxy.admin_client().endpoints().await?;
    let balancer = &endpoints.service("billing")?["load_balancer"];
    ensure!(
        balancer == "p2c-ewma",
        "default load_balancer is {balancer}"
    );

    let client = Client::absolute(proxy.outbound());
    get_n(&client, "http://billing/", 50).await?;
    let replies = get_n(&client, "http://billing/", 300).await?;
    let counts = tally(&replies);
    let to_slow = counts.get("slow").copied().unwrap_or(0);
    ensure!(
        to_slow * 100 < 300 * 15,
        "the slow endpoint got {to_slow} of 300 requests after warm-up (want < 15%): {counts:?}"
    );
    ensure!(
        counts
            .keys()
            .all(|id| ["fast-a", "fast-b", "slow"].contains(&id.as_str())),
        "unexpected answers: {counts:?}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn least_request_sends_new_requests_away_from_busy_endpoints() -> anyhow::Result<()> {
    let backends = [
        Backend::start("a").await?,
        Backend::start("b").await?,
        Backend::start("c").await?,
    ];
    let proxy = start_proxy(&backends.iter().collect::<Vec<_>>(), Some("least-request")).await?;
    let client = Client::absolute(proxy.outbound());
    let busy_of = |backends: &[Backend; 3]| -> Vec<String> {
        backends
            .iter()
            .filter(|b| b.in_flight() > 0)
            .map(|b| b.id().to_owned())
            .collect()
    };

    // Occupy one endpoint with a long request.
    let long = tokio::spawn({
        let client = client.clone();
        async move { client.get("http://billing/slow?ms=3000").await }
    });
    let busy = eventually(Duration::from_secs(2), || async {
        let busy = busy_of(&backends);
        ensure!(busy.len() == 1, "busy endpoints: {busy:?}");
        Ok(busy[0].clone())
    })
    .await?;

    // Quick requests now: none of them may go to the busy endpoint. (Round-robin
    // would send a third of them there; a random pick about as many.)
    let replies = get_n(&client, "http://billing/", 30).await?;
    let counts = tally(&replies);
    ensure!(
        !counts.contains_key(&busy),
        "least-request sent {:?} of 30 requests to the busy endpoint {busy}: {counts:?}",
        counts.get(&busy)
    );
    ensure!(
        busy_of(&backends) == vec![busy.clone()],
        "the long request should still be running, or the check above proved nothing"
    );

    // A second long request must also pick an idle endpoint.
    let second = tokio::spawn({
        let client = client.clone();
        async move { client.get("http://billing/slow?ms=3000").await }
    });
    let busy_now = eventually(Duration::from_secs(2), || async {
        let busy = busy_of(&backends);
        ensure!(
            backends.iter().map(Backend::in_flight).sum::<usize>() == 2,
            "busy endpoints: {busy:?}"
        );
        Ok(busy)
    })
    .await?;
    ensure!(
        busy_now.len() == 2,
        "two concurrent long requests landed on the same endpoint: {:?}",
        backends
            .iter()
            .map(|b| (b.id().to_owned(), b.in_flight()))
            .collect::<BTreeMap<_, _>>()
    );

    long.await??.expect_status(200)?;
    second.await??.expect_status(200)?;
    Ok(())
}

/// Issue 13: three equal endpoints (about 1 ms each) under steady load share it
/// in every window. The old p2c-ewma gave one of them 0.1% of the requests for
/// 30 s: a slow first answer kept its estimate above its peers' for many
/// seconds. The 33% +/- 5% target is held on a virtual clock (the proxy's
/// `balance::sim` tests); over real sockets on a busy machine the bound here is
/// wider, and still far from starvation.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn p2c_ewma_shares_evenly_among_equal_endpoints() -> anyhow::Result<()> {
    let mut backends = Vec::new();
    for id in ["a", "b", "c"] {
        backends.push(
            Backend::builder(id)
                .latency(Duration::from_millis(1))
                .start()
                .await?,
        );
    }
    let refs: Vec<&Backend> = backends.iter().collect();
    let proxy = start_proxy(&refs, None).await?;
    // About 250 req/s, each request on its own task (several connections).
    let traffic = Traffic::start(
        Client::absolute(proxy.outbound()),
        "http://billing/hello",
        Duration::from_millis(4),
    );
    tokio::time::sleep(Duration::from_secs(15)).await;
    let summary = traffic.stop().await?;
    summary.expect_no_failures("steady traffic to three equal endpoints")?;
    for start in [0, 5, 10] {
        let window = summary.window(Duration::from_secs(start), Duration::from_secs(start + 5));
        let counts = window.by_backend();
        let total: usize = counts.values().sum();
        println!("{start} s to {} s: {counts:?}", start + 5);
        ensure!(
            total > 300,
            "only {total} answers from {start} s to {} s",
            start + 5
        );
        for id in ["a", "b", "c"] {
            let n = counts.get(id).copied().unwrap_or(0);
            let share = n as f64 / total as f64;
            ensure!(
                (0.20..=0.47).contains(&share),
                "from {start} s to {} s, {id} answered {n} of {total} ({:.1}%): {counts:?}",
                start + 5,
                share * 100.0
            );
        }
    }
    Ok(())
}
