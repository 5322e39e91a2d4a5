//! Scenario: reloading the bootstrap file swaps the directory without dropping
//! anything in flight, and a bad file changes nothing.
//!
//! Slow requests are put in flight to every endpoint of `billing`; then the
//! bootstrap is rewritten without one of them (the "victim") and reloaded,
//! by SIGHUP in one test and by `POST /reload` in another. Every slow request
//! must still complete, including those on the victim; new requests must only
//! reach the endpoints that remain; `/config`'s version must go from 1 to 2
//! and `/endpoints` must stop listing the victim as active. A bootstrap that
//! does not parse must be refused (400 on `POST /reload`, a log line on
//! SIGHUP), keep version 1, and keep traffic flowing to the old endpoints.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use anyhow::{Context as _, ensure};
use weft_tests::backend::Backend;
use weft_tests::client::{Client, Reply};
use weft_tests::config::{Bootstrap, DirService, policy};
use weft_tests::process::{Proxy, Signal};
use weft_tests::{eventually, get_n, tally};

/// How long each in-flight request takes at the backend.
const SLOW_MS: u64 = 1500;
/// Slow requests put in flight: two per endpoint under round-robin.
const SLOW_REQUESTS: usize = 6;

fn bootstrap(backends: &[&Backend]) -> String {
    Bootstrap::new()
        .service(
            DirService::new("billing")
                .policy("billing.toml")
                .endpoints(backends.iter().map(|b| b.addr())),
        )
        .render()
}

async fn start(backends: &[&Backend]) -> anyhow::Result<Proxy> {
    Proxy::builder(bootstrap(backends))
        .file("billing.toml", policy("billing", "round-robin"))
        .start()
        .await
}

#[derive(Debug, Clone, Copy)]
enum Trigger {
    Sighup,
    PostReload,
}

async fn reload(proxy: &Proxy, trigger: Trigger) -> anyhow::Result<()> {
    match trigger {
        Trigger::Sighup => proxy.signal(Signal::Hup),
        Trigger::PostReload => {
            let reply = proxy.admin_client().reload().await?;
            reply.expect_status(200)?;
            let json: serde_json::Value = serde_json::from_slice(&reply.body)
                .with_context(|| format!("POST /reload answered {:?}", reply.text()))?;
            ensure!(json["version"] == 2, "POST /reload answered {json}");
            Ok(())
        }
    }
}

async fn endpoint_removed_while_requests_are_in_flight(trigger: Trigger) -> anyhow::Result<()> {
    let backends = [
        Backend::start("a").await?,
        Backend::start("b").await?,
        Backend::start("c").await?,
    ];
    let proxy = start(&backends.iter().collect::<Vec<_>>()).await?;
    let admin = proxy.admin_client();
    ensure!(admin.config_version().await? == 1);
    let client = Client::absolute(proxy.outbound());

    let slow: Vec<_> = (0..SLOW_REQUESTS)
        .map(|_| {
            let client = client.clone();
            tokio::spawn(async move {
                client
                    .get(&format!("http://billing/slow?ms={SLOW_MS}"))
                    .await
            })
        })
        .collect();
    eventually(Duration::from_secs(3), || async {
        let in_flight: usize = backends.iter().map(Backend::in_flight).sum();
        ensure!(
            in_flight == SLOW_REQUESTS,
            "{in_flight} of {SLOW_REQUESTS} in flight"
        );
        Ok(())
    })
    .await?;
    let victim = backends
        .iter()
        .max_by_key(|b| b.in_flight())
        .expect("three backends");
    let on_victim = victim.in_flight();
    ensure!(on_victim > 0);
    let remaining: Vec<&Backend> = backends.iter().filter(|b| b.id() != victim.id()).collect();

    proxy.write_config(&bootstrap(&remaining))?;
    reload(&proxy, trigger).await?;
    eventually(Duration::from_secs(1), || async {
        let version = admin.config_version().await?;
        ensure!(version == 2, "/config version is {version}");
        Ok(())
    })
    .await?;
    ensure!(
        victim.in_flight() == on_victim,
        "the reload was only seen after the slow requests to {} ended; the test proved nothing",
        victim.id()
    );
    admin
        .endpoints()
        .await?
        .expect_active("billing", remaining.iter().map(|b| b.addr()))?;

    // New requests only reach what remains.
    let before = victim.requests();
    let replies = get_n(&client, "http://billing/", 20).await?;
    let counts = tally(&replies);
    ensure!(
        !counts.contains_key(victim.id()) && counts.len() == 2,
        "after removing {}: {counts:?}",
        victim.id()
    );
    ensure!(victim.requests() == before);

    // Nothing that was in flight failed, the victim's requests included.
    let mut finished: Vec<Reply> = Vec::new();
    for request in slow {
        let reply = request
            .await?
            .context("an in-flight request failed across the reload")?;
        reply.expect_status(200)?;
        finished.push(reply);
    }
    let counts = tally(&finished);
    ensure!(
        counts.get(victim.id()) == Some(&on_victim),
        "{} requests were in flight on {}, {counts:?} completed",
        on_victim,
        victim.id()
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_removes_an_endpoint_without_failing_in_flight_requests() -> anyhow::Result<()> {
    endpoint_removed_while_requests_are_in_flight(Trigger::Sighup).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn post_reload_removes_an_endpoint_without_failing_in_flight_requests() -> anyhow::Result<()>
{
    endpoint_removed_while_requests_are_in_flight(Trigger::PostReload).await
}

/// A bootstrap that is valid TOML but not a valid bootstrap: an unknown key.
fn broken_bootstrap(backends: &[&Backend]) -> String {
    format!("bogus_reload_key = 1\n{}", bootstrap(backends))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_reload_is_refused_and_keeps_the_old_config() -> anyhow::Result<()> {
    let (a, b, c) = (
        Backend::start("a").await?,
        Backend::start("b").await?,
        Backend::start("c").await?,
    );
    let proxy = start(&[&a, &b]).await?;
    let admin = proxy.admin_client();
    let client = Client::absolute(proxy.outbound());

    // A broken file that would also drop `b`: nothing of it may apply.
    proxy.write_config(&broken_bootstrap(&[&a]))?;
    let reply = admin.reload().await?;
    ensure!(
        reply.status == 400,
        "POST /reload of a bad file answered {}",
        reply.status
    );
    ensure!(
        reply.text().contains("bogus_reload_key"),
        "the refusal should carry the config error: {:?}",
        reply.text()
    );
    ensure!(admin.config_version().await? == 1);

    // The same by SIGHUP: logged, process still up, nothing applied.
    // (POST /reload may have logged the error too: count, don't just search.)
    let logged = || proxy.logs().matches("bogus_reload_key").count();
    let before = logged();
    proxy.signal(Signal::Hup)?;
    eventually(Duration::from_secs(10), || async {
        ensure!(
            logged() > before,
            "the rejected SIGHUP reload was not logged"
        );
        Ok(())
    })
    .await?;
    ensure!(
        proxy.try_status()?.is_none(),
        "a bad SIGHUP reload killed the proxy"
    );
    ensure!(admin.config_version().await? == 1);
    admin
        .endpoints()
        .await?
        .expect_active("billing", [a.addr(), b.addr()])?;
    let counts = tally(&get_n(&client, "http://billing/", 10).await?);
    ensure!(
        counts.keys().eq(["a", "b"]),
        "old endpoints should still serve: {counts:?}"
    );

    // A good file afterwards is applied, and counts as the next version: it adds
    // an endpoint to `billing` and a whole new service `orders`.
    let orders = Backend::start("orders").await?;
    let good = format!(
        "{}[[directory.services]]\nname = \"orders\"\nendpoints = [ {{ address = \"{}\" }} ]\n",
        bootstrap(&[&a, &b, &c]),
        orders.addr()
    );
    proxy.write_config(&good)?;
    let reply = admin.reload().await?;
    reply.expect_status(200)?;
    ensure!(admin.config_version().await? == 2);
    admin
        .endpoints()
        .await?
        .expect_active("billing", [a.addr(), b.addr(), c.addr()])?;
    let counts = tally(&get_n(&client, "http://billing/", 9).await?);
    ensure!(
        counts.keys().eq(["a", "b", "c"]),
        "the added endpoint gets traffic: {counts:?}"
    );
    let reply = client.get("http://orders/").await?;
    reply.expect_status(200)?;
    ensure!(
        reply.backend() == Some("orders"),
        "the added service: {:?}",
        reply.backend()
    );
    Ok(())
}

/// An endpoint taken out of the directory gets its pooled keep-alive
/// connections closed once nothing is in flight to it, not after the pool's
/// idle timeout (90 s by default): with instances churning, a shared pool
/// held connection state for every departed one until then.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_removed_endpoints_pooled_connections_close_at_once() -> anyhow::Result<()> {
    let (a, b) = (Backend::start("a").await?, Backend::start("b").await?);
    let proxy = start(&[&a, &b]).await?;
    let client = Client::absolute(proxy.outbound());
    get_n(&client, "http://billing/x", 6).await?;
    ensure!(
        a.open_connections() >= 1 && b.open_connections() >= 1,
        "pooled connections: a {}, b {}",
        a.open_connections(),
        b.open_connections()
    );

    let kept = b.open_connections();
    proxy.write_config(&bootstrap(&[&b]))?;
    reload(&proxy, Trigger::PostReload).await?;
    eventually(Duration::from_secs(3), || async {
        ensure!(
            a.open_connections() == 0,
            "{} connection(s) to the removed endpoint still open",
            a.open_connections()
        );
        Ok(())
    })
    .await?;
    // The endpoint that stayed keeps its pool (no request ran since, so its
    // count is exact; afterwards a request may race a connection's return to
    // the pool and open another) and serves everything.
    ensure!(
        b.open_connections() == kept,
        "b's connections went from {kept} to {} across the reload",
        b.open_connections()
    );
    let replies = get_n(&client, "http://billing/x", 6).await?;
    ensure!(
        tally(&replies).get("b") == Some(&6),
        "{:?}",
        tally(&replies)
    );
    Ok(())
}
