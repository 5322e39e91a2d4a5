//! Scenario: a mesh with no fixed links. A `weft-control-plane --dev` keeps the
//! directory; the `billing` service's sidecar registers its instance; a caller's
//! sidecar, whose bootstrap file names no services at all, calls `billing` by name
//! and reaches the app through billing's sidecar. A policy applied to the control
//! plane reaches the caller; a graceful shutdown of billing's sidecar removes the
//! instance from the caller's view at once.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use weft_tests::backend::Backend;
use weft_tests::client::{Client, Mode};
use weft_tests::control_plane::ControlPlane;
use weft_tests::eventually;
use weft_tests::process::{Proxy, Signal, TempDir};

/// `weftctl ARGS` against `cp`, which must exit 0; stdout and stderr.
async fn weftctl(cp: &ControlPlane, args: &[&str]) -> anyhow::Result<String> {
    let out = cp.weftctl(args).await?;
    out.ok()?;
    Ok(out.all())
}

async fn start_control_plane() -> anyhow::Result<ControlPlane> {
    ControlPlane::dev().lease_ttl("2s").start().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn services_find_each_other_through_the_control_plane() -> anyhow::Result<()> {
    let cp = start_control_plane().await?;
    let app = Backend::start("billing-app").await?;

    // billing's own sidecar: registers its instance (advertising its inbound listener).
    let billing = Proxy::start(format!(
        r#"
[service]
name = "billing"
app = "{app}"
id = "billing-1"
metadata = {{ zone = "z1", version = "v1" }}
[listen]
outbound = "127.0.0.1:0"
inbound = "127.0.0.1:0"
admin = "127.0.0.1:0"
[control_plane]
addresses = ["{grpc}"]
[drain]
grace = "2s"
"#,
        app = app.addr(),
        grpc = cp.grpc_url()
    ))
    .await?;

    // The caller's sidecar knows only the control plane.
    let caller = Proxy::start(format!(
        r#"
[listen]
outbound = "127.0.0.1:0"
inbound = "127.0.0.1:0"
admin = "127.0.0.1:0"
[control_plane]
addresses = ["{grpc}"]
"#,
        grpc = cp.grpc_url()
    ))
    .await?;

    let client = Client::new(caller.outbound(), Mode::HostHeader);
    // The registration lands asynchronously: wait (bounded) for the first success.
    eventually(Duration::from_secs(10), || async {
        let reply = client.get("http://billing/hello").await?;
        ensure!(
            reply.status == 200,
            "status {} ({:?})",
            reply.status,
            reply.text()
        );
        ensure!(
            reply.backend() == Some("billing-app"),
            "answered by {:?}",
            reply.backend()
        );
        Ok(())
    })
    .await?;
    // It went through billing's inbound listener (which adds x-forwarded-for).
    let reply = client.get("http://billing/hello").await?;
    ensure!(
        reply.header("x-seen-x-forwarded-for").is_some(),
        "not proxied by billing's sidecar"
    );

    // The caller's admin API shows the pushed service and its instance.
    let endpoints = caller.admin_client().endpoints().await?;
    let svc = endpoints
        .services()?
        .iter()
        .find(|s| s["name"] == "billing")
        .context("billing in the caller's /endpoints")?;
    ensure!(svc["source"] == "control-plane", "{svc}");
    let cp_state = &endpoints.0["control_plane"];
    ensure!(cp_state["connection"]["state"] == "connected", "{cp_state}");
    ensure!(cp_state["version"].as_i64().unwrap_or(0) > 0, "{cp_state}");
    ensure!(cp_state["rejected"] == 0, "{cp_state}");
    ensure!(
        svc["endpoints"][0]["address"] == billing.inbound().to_string(),
        "{svc}"
    );

    // `weftctl stat` finds billing's sidecar through the control plane and
    // reports the traffic it serves (inbound view) while requests flow.
    let traffic = {
        let client = client.clone();
        tokio::spawn(async move {
            let until = Instant::now() + Duration::from_millis(1500);
            while Instant::now() < until {
                let _ = client.get("http://billing/hello").await;
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
    };
    let dir = TempDir::new()?;
    let stat = weftctl(&cp, &["stat", "--interval", "800ms", "-o", "json"]).await?;
    traffic.await?;
    let stat: serde_json::Value = serde_json::from_str(&stat).context(stat.clone())?;
    let row = stat["rows"]
        .as_array()
        .and_then(|rows| rows.iter().find(|r| r["service"] == "billing"))
        .with_context(|| format!("billing in weftctl stat: {stat}"))?;
    ensure!(row["rps"].as_f64().unwrap_or(0.0) > 10.0, "{stat}");
    ensure!(row["success_rate"].as_f64() == Some(1.0), "{stat}");
    ensure!(row["p99_seconds"].as_f64().is_some(), "{stat}");
    ensure!(stat["unreachable"] == serde_json::json!([]), "{stat}");

    // A policy applied to the control plane reaches the caller: a route timeout
    // shorter than the app's delay turns into a 504 naming the route.
    let policy = dir.write(
        "billing.toml",
        "service = \"billing\"\n\n[[routes]]\nname = \"slow\"\nmatch = { path_prefix = \"/slow\" }\ntimeout = \"200ms\"\n",
    )?;
    weftctl(&cp, &["apply", "-f", policy.to_str().unwrap()]).await?;
    eventually(Duration::from_secs(10), || async {
        let reply = client.get("http://billing/slow?ms=2000").await?;
        ensure!(reply.status == 504, "status {}", reply.status);
        ensure!(
            reply.header("weft-limit") == Some("routes.slow.timeout"),
            "{:?}",
            reply.header("weft-limit")
        );
        Ok(())
    })
    .await?;

    // Graceful shutdown of billing's sidecar deregisters it at once (the lease TTL
    // is 2 s; the check below must pass well before a lease could expire).
    billing.signal(Signal::Term)?;
    let started = Instant::now();
    eventually(Duration::from_secs(10), || async {
        let reply = client.get("http://billing/hello").await?;
        ensure!(reply.status != 200, "still answered");
        Ok(())
    })
    .await?;
    ensure!(
        started.elapsed() < Duration::from_millis(1900),
        "deregistration took {:?}",
        started.elapsed()
    );
    Ok(())
}

fn billing_sidecar(id: &str, app: std::net::SocketAddr, grpc: &str) -> String {
    format!(
        r#"
[service]
name = "billing"
app = "{app}"
id = "{id}"
policy = "billing-local.toml"
[listen]
outbound = "127.0.0.1:0"
inbound = "127.0.0.1:0"
admin = "127.0.0.1:0"
[control_plane]
addresses = ["{grpc}"]
[drain]
grace = "2s"
"#
    )
}

/// Waits until `proxy`'s local app shows `source`, `share` and the effective
/// inbound rate limit `rate` (per second, burst), or `None` for no limit.
async fn expect_local(
    proxy: &Proxy,
    source: &str,
    share: u64,
    rate: Option<(f64, u64)>,
) -> anyhow::Result<()> {
    let admin = proxy.admin_client();
    eventually(Duration::from_secs(10), || async {
        let endpoints = admin.endpoints().await?;
        let local = &endpoints.0["local"];
        ensure!(local["policy_source"] == source, "{local}");
        ensure!(local["share"] == share, "{local}");
        match rate {
            Some((per_second, burst)) => {
                ensure!(
                    local["rate_limit"]["per_second"].as_f64() == Some(per_second),
                    "{local}"
                );
                ensure!(local["rate_limit"]["burst"] == burst, "{local}");
            }
            None => ensure!(local["rate_limit"].is_null(), "{local}"),
        }
        Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_takes_its_policy_and_share_from_the_control_plane() -> anyhow::Result<()> {
    let cp = start_control_plane().await?;
    let app = Backend::start("billing-app").await?;
    // The bootstrap's own policy file: the fallback until the owner applies one.
    let local_policy = "service = \"billing\"\n\n[inbound]\nmax_concurrency = 7\n";
    let one = Proxy::builder(billing_sidecar("billing-1", app.addr(), &cp.grpc_url()))
        .file("billing-local.toml", local_policy)
        .start()
        .await?;
    expect_local(&one, "file", 1, None).await?;
    // billing-2 says where it is reached on the command line (as a pod would,
    // with its IP); nothing listens there, and nothing in this test calls it.
    let two = Proxy::builder(billing_sidecar("billing-2", app.addr(), &cp.grpc_url()))
        .file("billing-local.toml", local_policy)
        .arg("--advertise")
        .arg("127.0.0.1:9")
        .start()
        .await?;
    // Two live instances: each sidecar's share is now 2, with the file's policy.
    expect_local(&one, "file", 2, None).await?;
    expect_local(&two, "file", 2, None).await?;
    let dir = TempDir::new()?;
    let instances = weftctl(&cp, &["get", "instances", "billing"]).await?;
    let two_line = instances
        .lines()
        .find(|l| l.contains("billing-2"))
        .context("billing-2 in `weftctl get instances`")?;
    ensure!(two_line.contains("127.0.0.1:9 "), "{instances}");

    // The owner applies a policy: both instances enforce half of the service-wide limit.
    let policy = dir.write(
        "billing.toml",
        "service = \"billing\"\n\n[inbound]\nrate_limit = { per_second = 40, burst = 4 }\n",
    )?;
    weftctl(&cp, &["apply", "-f", policy.to_str().unwrap()]).await?;
    expect_local(&one, "control-plane", 2, Some((20.0, 2))).await?;
    expect_local(&two, "control-plane", 2, Some((20.0, 2))).await?;

    // The limit is enforced at that share on billing-1's inbound listener: a
    // burst of 2, then 429 naming the key.
    let inbound = Client::new(one.inbound(), Mode::HostHeader);
    let mut statuses = Vec::new();
    for _ in 0..6 {
        let reply = inbound.get("http://billing/hello").await?;
        statuses.push((reply.status, reply.header("weft-limit").map(str::to_owned)));
    }
    ensure!(statuses[0].0 == 200 && statuses[1].0 == 200, "{statuses:?}");
    ensure!(
        statuses
            .iter()
            .any(|(s, l)| *s == 429 && l.as_deref() == Some("inbound.rate_limit")),
        "{statuses:?}"
    );

    // One instance leaves: the other now enforces the whole limit.
    two.signal(Signal::Term)?;
    expect_local(&one, "control-plane", 1, Some((40.0, 4))).await?;
    Ok(())
}
