//! Scenario: a sidecar watches its own app (`[service] health`).
//!
//! Real processes on loopback: a control plane (`--dev`, and once on a real
//! etcd), one sidecar per `billing` instance in front of an in-process app,
//! and a caller-only sidecar sending steady traffic to `billing`.
//!
//! - Death: one app dies (its sidecar keeps running). Within a bounded time
//!   the caller marks the instance unhealthy and stops picking it (no failed
//!   request is sent after that), the instance's `/ready` answers 503, and
//!   `weftctl get instances` shows it unhealthy.
//! - Recovery: the app comes back on the same port: the instance is healthy
//!   again, ready again, and picked again.
//! - Slow start: a sidecar started before its app is not ready and not in
//!   the directory until the app answers; then it registers.
//! - Ready waits, bounded by `[control_plane] ready_timeout`, for the
//!   control plane's first snapshot.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context as _, ensure};
use tokio::time::Instant;
use weft_tests::admin::Admin;
use weft_tests::backend::Backend;
use weft_tests::client::Client;
use weft_tests::config::Bootstrap;
use weft_tests::control_plane::ControlPlane;
use weft_tests::mesh::{Instance, Mesh, MeshBuilder, endpoint_addrs};
use weft_tests::process::Proxy;
use weft_tests::traffic::Traffic;
use weft_tests::{closed_port, eventually};

/// Longest time from an app's death to the caller no longer picking it: the
/// default check (1 s interval, unhealthy after 2 failures) takes about 2 s,
/// the push a few milliseconds; generous for a loaded machine.
const DETECTION_BOUND: Duration = Duration::from_secs(10);

/// The `/ready` status and body.
async fn ready(admin: &Admin) -> anyhow::Result<(u16, String)> {
    let reply = admin.get("/ready").await?;
    Ok((reply.status.as_u16(), reply.text()))
}

/// Waits (at most 20 s) until `/ready` answers 200.
async fn until_ready(admin: &Admin) -> anyhow::Result<()> {
    eventually(Duration::from_secs(20), || async {
        let (status, body) = ready(admin).await?;
        ensure!(status == 200, "/ready: {status} {body}");
        Ok(())
    })
    .await
}

/// The HEALTH column of `id` in `weftctl get instances billing`; `None`
/// when it is not listed.
async fn listed_health(cp: &ControlPlane, id: &str) -> anyhow::Result<Option<String>> {
    let out = cp.weftctl(&["get", "instances", "billing"]).await?;
    if out.code() != 0 {
        // No billing at all yet.
        return Ok(None);
    }
    let mut lines = out.stdout.lines();
    let header: Vec<&str> = lines
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .collect();
    let column = header
        .iter()
        .position(|h| *h == "HEALTH")
        .with_context(|| format!("no HEALTH column: {}", out.stdout))?;
    Ok(lines
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .find(|cells| cells.first() == Some(&id))
        .and_then(|cells| cells.get(column).map(|c| (*c).to_owned())))
}

/// The state (`active`, `unhealthy`, `ejected`, ...) and request count of
/// `addr` among billing's endpoints in `caller`'s `/endpoints`.
async fn endpoint(caller: &Admin, addr: SocketAddr) -> anyhow::Result<(String, u64)> {
    let endpoints = caller.endpoints().await?;
    let e = endpoints.endpoint("billing", addr)?;
    Ok((
        e["state"].as_str().unwrap_or_default().to_owned(),
        e["requests"].as_u64().unwrap_or_default(),
    ))
}

/// Waits until a request through the caller's sidecar to `billing` succeeds
/// and the caller lists `n` endpoints for it.
async fn until_billing_has(client: &Client, caller: &Admin, n: usize) -> anyhow::Result<()> {
    eventually(Duration::from_secs(10), || async {
        client
            .get("http://billing/hello")
            .await?
            .expect_status(200)?;
        let have = endpoint_addrs(caller, "billing").await?;
        ensure!(have.len() == n, "billing: {have:?}, want {n} endpoints");
        Ok(())
    })
    .await
}

/// Death then recovery of one of three instances (default health check),
/// under traffic, in a mesh from `mesh`.
async fn death_and_recovery(mesh: MeshBuilder) -> anyhow::Result<()> {
    let mut mesh = mesh.service("billing", 3).build().await?;
    let caller_admin = mesh.caller().admin_client();
    let client = mesh.client();

    let traffic = Traffic::start(
        client.clone(),
        "http://billing/hello",
        Duration::from_millis(10),
    );
    traffic.wait_for_more(50, Duration::from_secs(10)).await?;
    traffic
        .summary()
        .expect_no_failures("before the app died")?;

    // SIGKILL of billing-2's app, as far as its sidecar can tell: the
    // listener and every connection close at once.
    let Instance {
        sidecar: two,
        app: app2,
        ..
    } = mesh.instances.remove(1);
    let app2_addr = app2.addr();
    let dead = two.inbound();
    drop(app2);
    let cp = mesh.control_plane();
    let killed = traffic.now();
    let started = Instant::now();
    eventually(DETECTION_BOUND, || async {
        let (state, _) = endpoint(&caller_admin, dead).await?;
        ensure!(state == "unhealthy", "billing-2 is {state} at the caller");
        Ok(())
    })
    .await?;
    let detected = traffic.now();
    eprintln!(
        "the caller marked billing-2 unhealthy {:?} after its app died",
        started.elapsed()
    );
    let (_, requests_at_detection) = endpoint(&caller_admin, dead).await?;

    let admin2 = two.admin_client();
    let (status, body) = ready(&admin2).await?;
    ensure!(status == 503, "billing-2's /ready: {status} {body}");
    ensure!(body.contains("health check"), "billing-2's /ready: {body}");
    eventually(Duration::from_secs(5), || async {
        let health = listed_health(cp, "billing-2").await?;
        ensure!(
            health.as_deref() == Some("unhealthy"),
            "weftctl: {health:?}"
        );
        Ok(())
    })
    .await?;
    let caller_metrics = caller_admin.metrics().await?;
    let unhealthy = caller_metrics.value(
        "weft_endpoints",
        &[("service", "billing"), ("state", "unhealthy")],
    )?;
    ensure!(unhealthy == 1.0, "weft_endpoints unhealthy = {unhealthy}");
    let app_healthy = admin2
        .metrics()
        .await?
        .value("weft_proxy_app_healthy", &[])?;
    ensure!(
        app_healthy == 0.0,
        "billing-2's weft_proxy_app_healthy = {app_healthy}"
    );

    // Nothing sent after the caller learnt it fails, and nothing more goes
    // to billing-2.
    traffic.wait_for_more(200, Duration::from_secs(20)).await?;
    let after = traffic.summary().since(detected);
    after.expect_no_failures("after the caller marked billing-2 unhealthy")?;
    let (_, requests_now) = endpoint(&caller_admin, dead).await?;
    ensure!(
        requests_now == requests_at_detection,
        "billing-2 was picked {} more times while unhealthy",
        requests_now - requests_at_detection
    );
    let window = traffic.summary().window(killed, detected);
    eprintln!(
        "between the death and the detection: {} requests, {} failed",
        window.total(),
        window.failures().len()
    );

    // Recovery: the app answers again on the same port.
    let app2 = Backend::builder("billing-2")
        .addr(app2_addr)
        .start()
        .await?;
    let started = Instant::now();
    eventually(DETECTION_BOUND, || async {
        let (state, _) = endpoint(&caller_admin, dead).await?;
        ensure!(state == "active", "billing-2 is {state} at the caller");
        let (status, body) = ready(&admin2).await?;
        ensure!(status == 200, "billing-2's /ready: {status} {body}");
        Ok(())
    })
    .await?;
    eprintln!(
        "billing-2 was healthy again at the caller {:?} after its app came back",
        started.elapsed()
    );
    eventually(Duration::from_secs(10), || async {
        ensure!(
            app2.requests() > 0,
            "the new billing-2 app has had no request"
        );
        let health = listed_health(cp, "billing-2").await?;
        ensure!(health.as_deref() == Some("healthy"), "weftctl: {health:?}");
        Ok(())
    })
    .await?;
    let summary = traffic.stop().await?;
    summary
        .since(detected)
        .expect_no_failures("from the detection to the end")?;
    ensure!(
        mesh.instance("billing-1").app.requests() > 0
            && mesh.instance("billing-3").app.requests() > 0
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_app_is_taken_out_and_put_back_when_it_answers_again() -> anyhow::Result<()> {
    death_and_recovery(Mesh::builder()).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_app_is_taken_out_and_put_back_on_etcd() -> anyhow::Result<()> {
    death_and_recovery(Mesh::builder().etcd()).await
}

/// A sidecar started before its app waits for it: not ready, not
/// registered, and says so in its log; it registers once the app answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sidecar_started_before_its_app_registers_once_the_app_answers() -> anyhow::Result<()> {
    let mesh = Mesh::builder().service("billing", 1).build().await?;
    let (cp, addresses) = (mesh.control_plane(), mesh.addresses());
    let caller_admin = mesh.caller().admin_client();
    let client = mesh.client();

    let later = closed_port()?;
    let early = Proxy::builder(
        Bootstrap::new()
            .app("billing", later)
            .app_id("billing-2")
            .control_plane(addresses.iter().cloned())
            .render(),
    )
    .start_bound()
    .await?;
    let admin = early.admin_client();
    // Two checks' worth of waiting (the default interval is 1s): never
    // ready, never listed.
    let until = Instant::now() + Duration::from_secs(2);
    while Instant::now() < until {
        let (status, body) = ready(&admin).await?;
        ensure!(status == 503, "/ready before the app: {status} {body}");
        ensure!(
            body.contains("waiting for the app"),
            "/ready before the app: {body}"
        );
        ensure!(
            listed_health(cp, "billing-2").await?.is_none(),
            "billing-2 registered before its app answered"
        );
        let listed = endpoint_addrs(&caller_admin, "billing").await?;
        ensure!(
            !listed.contains(&early.inbound()),
            "the caller lists billing-2 before its app answered"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    ensure!(
        early
            .logs()
            .contains("waiting for the app to answer its health check"),
        "the log does not say what it waits for:\n{}",
        early.logs()
    );

    let app2 = Backend::builder("billing-2").addr(later).start().await?;
    eventually(Duration::from_secs(10), || async {
        let (status, body) = ready(&admin).await?;
        ensure!(status == 200, "/ready: {status} {body}");
        let health = listed_health(cp, "billing-2").await?;
        ensure!(health.as_deref() == Some("healthy"), "weftctl: {health:?}");
        let listed = endpoint_addrs(&caller_admin, "billing").await?;
        ensure!(listed.contains(&early.inbound()), "caller: {listed:?}");
        Ok(())
    })
    .await?;
    eventually(Duration::from_secs(10), || async {
        client
            .get("http://billing/hello")
            .await?
            .expect_status(200)?;
        ensure!(app2.requests() > 0, "billing-2's app has had no request");
        Ok(())
    })
    .await
}

/// With a control plane configured, `/ready` waits for its first snapshot,
/// at most `ready_timeout`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ready_waits_for_the_first_snapshot_at_most_ready_timeout() -> anyhow::Result<()> {
    // The control plane is not up yet: a caller is not ready...
    let cp_addr = closed_port()?;
    let caller = Proxy::builder(
        Bootstrap::new()
            .control_plane([format!("http://{cp_addr}")])
            .render(),
    )
    .start_bound()
    .await?;
    let admin = caller.admin_client();
    let until = Instant::now() + Duration::from_secs(1);
    while Instant::now() < until {
        let (status, body) = ready(&admin).await?;
        ensure!(status == 503, "/ready before any snapshot: {status} {body}");
        ensure!(body.contains("control plane"), "/ready: {body}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // ...until the control plane answers (well before the default 10s
    // ready_timeout).
    let _cp = ControlPlane::dev().listen(cp_addr).start().await?;
    until_ready(&admin).await?;
    ensure!(
        caller
            .logs()
            .contains("first snapshot from the control plane received"),
        "ready, but not on the first snapshot:\n{}",
        caller.logs()
    );

    // A control plane that never answers: ready after `ready_timeout`, on
    // the static directory, with a warning.
    let nobody = closed_port()?;
    let started = Instant::now();
    let alone = Proxy::builder(
        Bootstrap::new()
            .control_plane([format!("http://{nobody}")])
            .control_plane_key("ready_timeout", "\"2s\"")
            .render(),
    )
    .start()
    .await?;
    let waited = started.elapsed();
    ensure!(
        waited >= Duration::from_secs(2),
        "ready {waited:?} after start, before ready_timeout"
    );
    ensure!(
        alone.logs().contains("ready on the static directory"),
        "{}",
        alone.logs()
    );
    Ok(())
}

/// A sidecar that starts while its control plane is down serves from its
/// snapshot cache and is ready as soon as the control plane is found
/// unreachable, without waiting out `ready_timeout` (a minute here).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cached_snapshot_makes_a_sidecar_ready_while_the_control_plane_is_down()
-> anyhow::Result<()> {
    let mut cp = ControlPlane::dev().start().await?;
    let app = Backend::start("billing-1").await?;
    let _billing =
        weft_tests::mesh::registered("billing", "billing-1", app.addr(), &[cp.grpc_url()]).await?;
    let cache_dir = weft_tests::process::TempDir::new()?;
    let cache = cache_dir.path().join("snapshot.json");
    let bootstrap = Bootstrap::new()
        .control_plane([cp.grpc_url()])
        .control_plane_key("cache", &format!("{:?}", cache.display().to_string()))
        .control_plane_key("ready_timeout", "\"60s\"")
        .render();

    // A first run with the control plane up learns billing and caches it.
    let first = Proxy::start(bootstrap.clone()).await?;
    let client = Client::host_header(first.outbound());
    eventually(Duration::from_secs(20), || async {
        client.get("http://billing/").await?.expect_status(200)?;
        let cached = std::fs::read_to_string(&cache).unwrap_or_default();
        ensure!(
            cached.contains("billing"),
            "billing is not in the cache yet"
        );
        Ok(())
    })
    .await?;
    drop(first);
    cp.kill()?;

    // The second starts on the cache alone.
    let second = Proxy::builder(bootstrap).start_bound().await?;
    let admin = second.admin_client();
    until_ready(&admin).await?;
    ensure!(
        second
            .logs()
            .contains("the control plane is unreachable; ready on the cached snapshot"),
        "ready, but not on the cache:\n{}",
        second.logs()
    );
    Client::host_header(second.outbound())
        .get("http://billing/")
        .await?
        .expect_status(200)?;
    Ok(())
}

/// With `path`, the check is an HTTP GET: an app that accepts connections
/// but answers its health path with 503 is unhealthy (a TCP check would pass),
/// and healthy again once it answers 2xx.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http_check_sees_an_app_that_answers_503() -> anyhow::Result<()> {
    let mesh = Mesh::builder().service("billing", 1).build().await?;
    let app2 = Backend::start("billing-2").await?;
    let two = Proxy::start(
        Bootstrap::new()
            .app("billing", app2.addr())
            .app_id("billing-2")
            .app_health("path = \"/healthz\", interval = \"200ms\", timeout = \"150ms\"")
            .control_plane(mesh.addresses())
            .render(),
    )
    .await?;
    let caller_admin = mesh.caller().admin_client();
    let client = mesh.client();
    until_billing_has(&client, &caller_admin, 2).await?;
    ensure!(
        app2.seen().iter().any(|r| r.path == "/healthz"),
        "no GET /healthz reached the app"
    );

    app2.set_status(Some(503));
    eventually(DETECTION_BOUND, || async {
        let (state, _) = endpoint(&caller_admin, two.inbound()).await?;
        ensure!(state == "unhealthy", "billing-2 is {state} at the caller");
        let (status, body) = ready(&two.admin_client()).await?;
        ensure!(status == 503, "billing-2's /ready: {status} {body}");
        Ok(())
    })
    .await?;
    app2.set_status(None);
    eventually(DETECTION_BOUND, || async {
        let (state, _) = endpoint(&caller_admin, two.inbound()).await?;
        ensure!(state == "active", "billing-2 is {state} at the caller");
        let (status, body) = ready(&two.admin_client()).await?;
        ensure!(status == 200, "billing-2's /ready: {status} {body}");
        Ok(())
    })
    .await
}
