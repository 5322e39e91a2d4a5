//! Scenario: a mesh with no fixed links. A `weft-control-plane --dev` keeps the
//! directory; the `billing` service's sidecar registers its instance; a caller's
//! sidecar, whose bootstrap file names no services at all, calls `billing` by name
//! and reaches the app through billing's sidecar. A policy applied to the control
//! plane reaches the caller; a graceful shutdown of billing's sidecar removes the
//! instance from the caller's view at once.
//!
//! Under steady traffic through the caller (100 requests per second, every
//! outcome counted): a third instance gets traffic within a second of starting,
//! a SIGKILLed one leaves the caller's view within the lease TTL + 1 s, a
//! SIGTERMed one leaves at once and its drain fails no request; a new rate limit
//! applied with `weftctl apply` takes effect (429 `inbound.rate_limit`) with no
//! connection error and no 5xx, and an invalid policy is refused with its
//! location and changes nothing.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use weft_tests::backend::Backend;
use weft_tests::client::{Client, Mode};
use weft_tests::config::Bootstrap;
use weft_tests::control_plane::ControlPlane;
use weft_tests::eventually;
use weft_tests::mesh::{Mesh, mesh_sidecar, until_endpoints};
use weft_tests::process::{Proxy, ProxyBuilder, Signal, TempDir};
use weft_tests::traffic::Traffic;

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
    // billing's own sidecar registers its instance (advertising its inbound
    // listener); the caller's sidecar knows only the control plane. The
    // registration lands asynchronously: the mesh is handed out once the
    // caller reaches billing.
    let mesh = Mesh::builder()
        .lease_ttl("2s")
        .service("billing", 1)
        .build()
        .await?;
    let (cp, caller, client) = (mesh.control_plane(), mesh.caller(), mesh.client());
    let billing = &mesh.instance("billing-1").sidecar;
    let reply = client.get("http://billing/hello").await?;
    reply.expect_status(200)?;
    ensure!(
        reply.backend() == Some("billing-1"),
        "answered by {:?}",
        reply.backend()
    );
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
    let stat = weftctl(cp, &["stat", "--interval", "800ms", "-o", "json"]).await?;
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
    weftctl(cp, &["apply", "--create", "-f", policy.to_str().unwrap()]).await?;
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

/// Billing's sidecar `id` in front of `app`, registered with `cp`, with
/// `billing-local.toml` (`policy`) as its own policy file.
fn billing_sidecar(
    id: &str,
    app: std::net::SocketAddr,
    cp: &ControlPlane,
    policy: &str,
) -> ProxyBuilder {
    mesh_sidecar(
        Bootstrap::new()
            .app("billing", app)
            .app_id(id)
            .app_policy("billing-local.toml")
            .grace("2s"),
        &[cp.grpc_url()],
        None,
    )
    .file("billing-local.toml", policy)
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
    let one = billing_sidecar("billing-1", app.addr(), &cp, local_policy)
        .start()
        .await?;
    expect_local(&one, "file", 1, None).await?;
    // billing-2 says where it is reached on the command line (as a pod would,
    // with its IP); nothing listens there, and nothing in this test calls it.
    let two = billing_sidecar("billing-2", app.addr(), &cp, local_policy)
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
    weftctl(&cp, &["apply", "--create", "-f", policy.to_str().unwrap()]).await?;
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

/// With `[tls]`, services pushed by the control plane are meshed: the caller
/// reaches billing's sidecar over mTLS and billing's app hears who called.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pushed_services_are_called_over_mtls() -> anyhow::Result<()> {
    // A caller-only sidecar: its identity is its certificate's, web.
    let mesh = Mesh::builder()
        .lease_ttl("2s")
        .mtls()
        .service("billing", 1)
        .callers_named(&["web"])
        .build()
        .await?;
    let reply = mesh.client().get("http://billing/hello").await?;
    ensure!(reply.status == 200, "{} {}", reply.status, reply.text());
    let forwarded = reply.header("x-seen-forwarded").unwrap_or_default();
    ensure!(forwarded.contains("proto=https"), "forwarded: {forwarded}");
    ensure!(reply.header("x-seen-version") == Some("HTTP/1.1"));
    ensure!(
        mesh.instance("billing-1")
            .app
            .seen_with("weft-caller", "web")
            >= 1
    );
    Ok(())
}

/// How often the background traffic sends a request (100 per second).
const PACE: Duration = Duration::from_millis(10);

/// Two instances of billing and a caller that names no address find each
/// other through the control plane; a third instance gets traffic within a
/// second of starting; a SIGKILLed instance leaves every caller's view within
/// the lease TTL + 1 s; a SIGTERMed one leaves at once, and its drain fails no
/// request of the steady traffic the caller sends meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn instances_join_and_leave_under_steady_traffic() -> anyhow::Result<()> {
    const LEASE_TTL: Duration = Duration::from_secs(2);
    // The caller learns both instances (it subscribes on the first call).
    let mut mesh = Mesh::builder()
        .lease_ttl("2s")
        .service("billing", 2)
        .build()
        .await?;
    let client = mesh.client();

    let traffic = Traffic::start(client.clone(), "http://billing/hello", PACE);
    traffic.wait_for_more(20, Duration::from_secs(5)).await?;

    // A third instance: traffic reaches its app within a second of its sidecar
    // being ready (registration and push included).
    mesh.add_instance("billing").await?;
    let ready = Instant::now();
    let (caller, cp) = (mesh.caller(), mesh.control_plane());
    let [one, two, three] = ["billing-1", "billing-2", "billing-3"].map(|id| mesh.instance(id));
    let listed_after = until_endpoints(
        caller,
        "billing",
        &mesh.inbounds("billing"),
        Duration::from_secs(5),
    )
    .await?;
    let first_request = eventually(Duration::from_secs(5), || async {
        ensure!(three.app.requests() > 0, "billing-3 has had no request");
        Ok(ready.elapsed())
    })
    .await;
    eprintln!(
        "billing-3 listed by the caller {listed_after:?} and got its first request {first_request:?} \
         after its sidecar was ready; caller's view: {}",
        caller
            .admin_client()
            .endpoints()
            .await?
            .service("billing")?
    );
    let joined_after = first_request?;
    ensure!(
        joined_after < Duration::from_secs(1),
        "billing-3 got traffic only {joined_after:?} after starting"
    );

    // SIGKILL: no deregistration; the lease expires. The caller drops the
    // instance within TTL + 1 s, and after that no request fails.
    let killed = traffic.now();
    two.sidecar.signal(Signal::Kill)?;
    let gone_after = until_endpoints(
        caller,
        "billing",
        &[one.sidecar.inbound(), three.sidecar.inbound()],
        LEASE_TTL + Duration::from_secs(5),
    )
    .await?;
    let gone = traffic.now();
    eprintln!("SIGKILLed billing-2 left the caller's view after {gone_after:?}");
    ensure!(
        gone_after <= LEASE_TTL + Duration::from_secs(1),
        "billing-2 stayed in the caller's view {gone_after:?} after SIGKILL (lease TTL {LEASE_TTL:?})"
    );
    let app2_requests = two.app.requests();
    traffic.wait_for_more(50, Duration::from_secs(5)).await?;
    ensure!(
        two.app.requests() == app2_requests,
        "billing-2's app still got requests"
    );

    // Round-robin from here on (p2c-ewma may leave a slightly slower instance
    // idle at this load), so billing-3 is certainly serving when it is told
    // to stop.
    let dir = TempDir::new()?;
    let policy = dir.write(
        "billing.toml",
        "service = \"billing\"\n\n[outbound]\nload_balancer = \"round-robin\"\n",
    )?;
    weftctl(
        cp,
        &["apply", "--create", "-f", policy.to_str().context("path")?],
    )
    .await?;
    let admin = caller.admin_client();
    eventually(Duration::from_secs(5), || async {
        let endpoints = admin.endpoints().await?;
        let billing = endpoints.service("billing")?;
        ensure!(billing["load_balancer"] == "round-robin", "{billing}");
        Ok(())
    })
    .await?;
    let three_before = three.app.requests();
    traffic.wait_for_more(20, Duration::from_secs(5)).await?;
    ensure!(
        three.app.requests() >= three_before + 5,
        "billing-3 is not serving its share: {} requests",
        three.app.requests() - three_before
    );

    // SIGTERM: deregistered at once, then drained; no request fails.
    let terminated = traffic.now();
    let started = Instant::now();
    three.sidecar.signal(Signal::Term)?;
    let left_after = until_endpoints(
        caller,
        "billing",
        &[one.sidecar.inbound()],
        Duration::from_secs(5),
    )
    .await?;
    eprintln!("SIGTERMed billing-3 left the caller's view after {left_after:?}");
    ensure!(
        left_after < Duration::from_secs(1),
        "billing-3 left the caller's view only {left_after:?} after SIGTERM"
    );
    let status = three.sidecar.wait_exit(Duration::from_secs(10)).await?;
    ensure!(status.success(), "billing-3's sidecar exited with {status}");
    eprintln!(
        "billing-3's sidecar exited {:?} after SIGTERM",
        started.elapsed()
    );
    traffic.wait_for_more(50, Duration::from_secs(5)).await?;

    let summary = traffic.stop().await?;
    eprintln!(
        "traffic: {:?}, by backend {:?}; between SIGKILL and removal: {:?}",
        summary.counts(),
        summary.by_backend(),
        summary.window(killed, gone).counts()
    );
    summary
        .window(Duration::ZERO, killed)
        .expect_all(200, 20, "before the SIGKILL")?;
    summary
        .window(gone, terminated)
        .expect_all(200, 40, "after the SIGKILLed instance left")?;
    summary
        .since(terminated)
        .expect_all(200, 50, "while billing-3 drained after SIGTERM")?;
    let last_three = summary
        .last_from("billing-3")
        .context("billing-3 answered nothing")?;
    eprintln!(
        "billing-3's last answer: {last_three}; SIGTERM at {terminated:?}; it answered {} requests sent after SIGTERM",
        summary
            .since(terminated)
            .records
            .iter()
            .filter(|r| r.outcome.backend() == Some("billing-3"))
            .count()
    );
    ensure!(
        last_three.sent + Duration::from_millis(100) >= terminated,
        "billing-3 was not serving when SIGTERM came: {last_three}"
    );
    Ok(())
}

/// `weftctl apply` of a new rate limit reaches billing's running sidecar under
/// steady traffic: 429s naming `inbound.rate_limit` appear, and no request
/// fails (no connection error, no 5xx) across the change. An invalid policy
/// is refused with its file:line:col message and changes nothing: the old
/// limit still applies.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_policy_change_reaches_sidecars_without_dropping_requests() -> anyhow::Result<()> {
    let mesh = Mesh::builder()
        .lease_ttl("2s")
        .service("billing", 1)
        .build()
        .await?;
    let (cp, client) = (mesh.control_plane(), mesh.client());

    let traffic = Traffic::start(client.clone(), "http://billing/hello", PACE);
    traffic.wait_for_more(30, Duration::from_secs(5)).await?;

    // A rate limit of 20/s (burst 5) for a service receiving 100/s.
    let dir = TempDir::new()?;
    let good = dir.write(
        "billing.toml",
        "service = \"billing\"\n\n[inbound]\nrate_limit = { per_second = 20, burst = 5 }\n",
    )?;
    let good = good.to_str().context("path")?;
    let before_apply = traffic.now();
    weftctl(cp, &["apply", "--create", "-f", good]).await?;
    let applied = traffic.now();
    let admin = mesh.instance("billing-1").sidecar.admin_client();
    eventually(Duration::from_secs(5), || async {
        let summary = traffic.summary().since(applied);
        ensure!(
            summary
                .records
                .iter()
                .any(|r| r.outcome.status() == Some(429)
                    && r.outcome.limit() == Some("inbound.rate_limit")),
            "no 429 from inbound.rate_limit yet: {:?}",
            summary.counts()
        );
        Ok(())
    })
    .await?;
    let first_429 = traffic
        .summary()
        .since(before_apply)
        .records
        .into_iter()
        .find(|r| r.outcome.status() == Some(429))
        .context("a 429")?;
    eprintln!(
        "first 429 sent {:?} after weftctl apply returned",
        first_429.sent.saturating_sub(applied)
    );
    let local = admin.endpoints().await?.0["local"].clone();
    ensure!(local["policy_source"] == "control-plane", "{local}");
    ensure!(
        local["rate_limit"]["per_second"].as_f64() == Some(20.0),
        "{local}"
    );

    // An invalid policy: refused with its location; nothing changes.
    let bad = dir.write(
        "billing-bad.toml",
        "service = \"billing\"\n\n[inbound]\nrate_limit = { per_second = 1000, burst = 5 }\nmax_concurrency = \"many\"\n",
    )?;
    let bad = bad.to_str().context("path")?;
    let refused = cp.weftctl(&["apply", "--create", "-f", bad]).await?;
    ensure!(refused.code() == 1, "{}", refused.all());
    ensure!(
        refused.stderr.contains(&format!("{bad}:5:"))
            && refused.stderr.contains("inbound.max_concurrency"),
        "weftctl apply of an invalid file: {}",
        refused.all()
    );
    ensure!(
        refused.stderr.contains("5 | max_concurrency = \"many\""),
        "{}",
        refused.all()
    );
    let stored = cp.weftctl_ok(&["get", "policy", "billing"]).await?;
    ensure!(
        stored.contains("per_second = 20"),
        "stored policy: {stored}"
    );

    let refused_at = traffic.now();
    traffic.wait_for_more(150, Duration::from_secs(10)).await?;
    let local = admin.endpoints().await?.0["local"].clone();
    ensure!(
        local["rate_limit"]["per_second"].as_f64() == Some(20.0),
        "{local}"
    );

    let summary = traffic.stop().await?;
    eprintln!(
        "traffic: {:?}; after the apply: {:?}; after the refused apply: {:?}",
        summary.counts(),
        summary.since(applied).counts(),
        summary.since(refused_at).counts()
    );
    summary.expect_no_failures("across both applies")?;
    for record in &summary.records {
        match record.outcome.status() {
            Some(200) => {}
            Some(429) if record.outcome.limit() == Some("inbound.rate_limit") => {}
            _ => anyhow::bail!("unexpected answer {record}"),
        }
    }
    summary
        .window(Duration::ZERO, before_apply)
        .expect_all(200, 30, "before the apply")?;
    // The old limit still applies after the refused apply: 429s go on, and
    // the successes stay near 20/s (burst 5, plus the window's slack).
    let after = summary.since(refused_at);
    let span = after
        .records
        .last()
        .map(|r| r.sent - refused_at)
        .context("requests after the refused apply")?;
    let ok = after.count_status(200) as f64;
    let allowed = 20.0 * span.as_secs_f64() + 5.0 + 3.0;
    ensure!(after.count_status(429) > 0, "{:?}", after.counts());
    ensure!(
        ok <= allowed,
        "{ok} successes in {span:?} after the refused apply: more than the 20/s limit allows ({allowed})"
    );
    Ok(())
}
