//! Scenario: the control plane's own failures, under steady traffic between
//! sidecars that found each other through it. Real processes on loopback:
//! etcd (one node, or three), `weft-control-plane` (one replica, or two), the
//! sidecars, and in-process apps.
//!
//! - The control plane is killed: traffic goes on with every request
//!   answered; it comes back on the same address, the sidecars resync, and a
//!   new instance registers and gets traffic.
//! - etcd is down for 20 s (the figure) and comes back: traffic goes
//!   on, no caller ever loses an instance, and no registration is lost.
//! - Two replicas on a three-node etcd: one replica and one etcd member (the
//!   leader) die together; the sidecars move to the surviving replica within
//!   a bounded window, traffic never fails, registrations survive, and a
//!   policy applied through the survivor reaches the sidecars.
//! - The control plane restarts while a service's policy in etcd is invalid
//!   (written by other means): it still serves the last valid one, so a new
//!   sidecar with nothing cached enforces it, and the refusal is reported.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, bail, ensure};
use etcd_client::GetOptions;
use tokio::time::Instant;
use weft_tests::backend::Backend;
use weft_tests::client::Client;
use weft_tests::control_plane::ControlPlane;
use weft_tests::etcd::EtcdServer;
use weft_tests::eventually;
use weft_tests::mesh::{
    Mesh, control_plane_state, endpoint_addrs, mesh_caller, registered, until_endpoints,
};
use weft_tests::process::{Proxy, TempDir};
use weft_tests::traffic::Traffic;

/// The lease TTL the control planes run with: short, so outages outlast it.
const LEASE_TTL: Duration = Duration::from_secs(2);
const LEASE_TTL_ARG: &str = "2s";
/// The etcd key prefix of billing's registrations.
const BILLING_INSTANCES: &str = "/weft/services/billing/instances/";

/// Waits until every sidecar reports its control-plane connection as
/// connected (to `address`, if given); returns how long that took.
async fn until_connected(
    sidecars: &[&Proxy],
    address: Option<&str>,
    timeout: Duration,
) -> anyhow::Result<Duration> {
    let started = Instant::now();
    eventually(timeout, || async {
        for sidecar in sidecars {
            let (state, at) = control_plane_state(&sidecar.admin_client()).await?;
            ensure!(state == "connected", "a sidecar is {state}");
            if let Some(want) = address {
                ensure!(
                    at.as_deref() == Some(want),
                    "a sidecar is connected to {at:?}"
                );
            }
        }
        Ok(())
    })
    .await?;
    Ok(started.elapsed())
}

/// Waits until `weftctl get instances billing` (through `cp`) lists exactly `ids`.
async fn until_instances(cp: &ControlPlane, ids: &[&str], timeout: Duration) -> anyhow::Result<()> {
    eventually(timeout, || async {
        let out = cp.weftctl(&["get", "instances", "billing"]).await?;
        out.ok()?;
        let listed: BTreeSet<&str> = out
            .stdout
            .lines()
            .skip(1)
            .filter_map(|l| l.split_whitespace().next())
            .collect();
        let want: BTreeSet<&str> = ids.iter().copied().collect();
        ensure!(
            listed == want,
            "weftctl get instances billing:\n{}",
            out.stdout
        );
        Ok(())
    })
    .await
}

/// The ids of billing's registrations in etcd, read from `client`.
async fn etcd_instances(mut client: etcd_client::Client) -> anyhow::Result<BTreeSet<String>> {
    let response = client
        .get(BILLING_INSTANCES, Some(GetOptions::new().with_prefix()))
        .await?;
    Ok(response
        .kvs()
        .iter()
        .filter_map(|kv| kv.key_str().ok())
        .filter_map(|k| k.strip_prefix(BILLING_INSTANCES))
        .map(str::to_owned)
        .collect())
}

/// Polls `caller`'s view of billing every 100 ms until stopped, recording
/// every view that is not exactly `want` (with when it was seen).
struct ViewWatch {
    seen: Arc<Mutex<Vec<String>>>,
    polls: Arc<Mutex<usize>>,
    task: tokio::task::JoinHandle<()>,
}

impl ViewWatch {
    fn start(caller: &Proxy, want: &[SocketAddr]) -> Self {
        let admin = caller.admin_client();
        let want: BTreeSet<_> = want.iter().copied().collect();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let polls = Arc::new(Mutex::new(0));
        let started = Instant::now();
        let task = {
            let (seen, polls) = (Arc::clone(&seen), Arc::clone(&polls));
            tokio::spawn(async move {
                loop {
                    match endpoint_addrs(&admin, "billing").await {
                        Ok(have) if have == want => {}
                        Ok(have) => seen
                            .lock()
                            .unwrap()
                            .push(format!("at {:?}: {have:?}", started.elapsed())),
                        Err(e) => seen
                            .lock()
                            .unwrap()
                            .push(format!("at {:?}: {e:#}", started.elapsed())),
                    }
                    *polls.lock().unwrap() += 1;
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            })
        };
        Self { seen, polls, task }
    }

    fn stop(self, min_polls: usize) -> anyhow::Result<()> {
        self.task.abort();
        let seen = self.seen.lock().unwrap();
        let polls = *self.polls.lock().unwrap();
        if !seen.is_empty() {
            bail!(
                "the caller's view of billing changed ({} of {polls} polls):\n{}",
                seen.len(),
                seen.join("\n")
            );
        }
        ensure!(
            polls >= min_polls,
            "only {polls} polls of the caller's view"
        );
        Ok(())
    }
}

/// The control plane is killed under traffic and restarted on the same
/// address: no request fails while it is down (longer than the lease TTL,
/// so its registrations expire in etcd) or while the sidecars resync; after
/// the restart, a new instance registers and gets traffic.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn traffic_survives_a_control_plane_restart() -> anyhow::Result<()> {
    let mut mesh = Mesh::builder()
        .etcd()
        .lease_ttl(LEASE_TTL_ARG)
        .service("billing", 1)
        .build()
        .await?;
    let client = mesh.client();

    let traffic = Traffic::start(
        client.clone(),
        "http://billing/hello",
        Duration::from_millis(10),
    );
    traffic.wait_for_more(20, Duration::from_secs(5)).await?;

    mesh.control_planes[0].kill()?;
    let killed = traffic.now();
    let etcd = mesh.etcd()?;
    for sidecar in [&mesh.instance("billing-1").sidecar, mesh.caller()] {
        let admin = sidecar.admin_client();
        eventually(Duration::from_secs(5), || async {
            let (state, _) = control_plane_state(&admin).await?;
            ensure!(state == "disconnected", "{state}");
            Ok(())
        })
        .await?;
    }
    // Down past the lease TTL: billing-1's registration expires in etcd.
    let expired = Instant::now();
    eventually(LEASE_TTL + Duration::from_secs(5), || async {
        let ids = etcd_instances(etcd.connect(0).await?).await?;
        ensure!(ids.is_empty(), "still registered in etcd: {ids:?}");
        Ok(())
    })
    .await?;
    eprintln!(
        "billing-1's registration expired in etcd {:?} after the kill",
        expired.elapsed()
    );
    traffic.wait_for_more(50, Duration::from_secs(5)).await?;
    let restarting = traffic.now();
    traffic.summary().window(killed, restarting).expect_all(
        200,
        50,
        "while the control plane was down",
    )?;

    mesh.control_planes[0].restart().await?;
    let restarted = traffic.now();
    let (one, caller, cp) = (
        &mesh.instance("billing-1").sidecar,
        mesh.caller(),
        mesh.control_plane(),
    );
    let resync = until_connected(&[one, caller], None, Duration::from_secs(15)).await?;
    eprintln!("both sidecars reconnected {resync:?} after the restart");
    until_instances(cp, &["billing-1"], Duration::from_secs(5)).await?;
    until_endpoints(caller, "billing", &[one.inbound()], Duration::from_secs(5)).await?;
    let resynced = traffic.now();

    // A new registration works and gets traffic.
    mesh.add_instance("billing").await?;
    let ready = Instant::now();
    let (two, caller, cp) = (
        mesh.instance("billing-2"),
        mesh.caller(),
        mesh.control_plane(),
    );
    eventually(Duration::from_secs(5), || async {
        ensure!(two.app.requests() > 0, "billing-2 has had no request");
        Ok(())
    })
    .await?;
    eprintln!(
        "billing-2 got traffic {:?} after its sidecar was ready",
        ready.elapsed()
    );
    until_endpoints(
        caller,
        "billing",
        &mesh.inbounds("billing"),
        Duration::from_secs(5),
    )
    .await?;
    until_instances(cp, &["billing-1", "billing-2"], Duration::from_secs(5)).await?;
    traffic.wait_for_more(20, Duration::from_secs(5)).await?;

    let summary = traffic.stop().await?;
    eprintln!(
        "traffic: {:?} (down: {:?}; restart to resync: {:?}; after: {:?}), by backend {:?}",
        summary.counts(),
        summary.window(killed, restarting).counts(),
        summary.window(restarted, resynced).counts(),
        summary.since(resynced).counts(),
        summary.by_backend()
    );
    summary.expect_all(
        200,
        100,
        "before, during and after the control plane's restart",
    )?;
    Ok(())
}

/// A control plane that restarts after its registrations expired has a view
/// that lacks the instances whose sidecars have not registered again yet.
/// Here billing's sidecar lists only replica A and the caller only replica B;
/// both replicas die for longer than the lease TTL and only B comes back, so
/// billing-1 cannot register again. While B warms up (a lease TTL plus the
/// sidecars' longest reconnect backoff) its messages say so, and the caller
/// keeps calling billing-1 (static stability); once the warm-up is over, B's
/// word counts and billing-1, never heard from again, goes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_control_plane_does_not_make_callers_drop_live_instances() -> anyhow::Result<()>
{
    let etcd = EtcdServer::start().await?;
    let mut a = ControlPlane::etcd(etcd.client_url())
        .lease_ttl(LEASE_TTL_ARG)
        .start()
        .await?;
    // B's warm-up: long enough for the caller to reconnect after B's restart
    // (its backoff has grown while both replicas were down), shorter than the
    // default (lease TTL + 10 s) to keep the test short.
    const WARM_UP: Duration = Duration::from_secs(7);
    let mut b = ControlPlane::etcd(etcd.client_url())
        .lease_ttl(LEASE_TTL_ARG)
        .arg("--warm-up")
        .arg("7s")
        .start()
        .await?;
    let app = Backend::start("billing-1").await?;
    let one = registered("billing", "billing-1", app.addr(), &[a.grpc_url()]).await?;
    let caller = mesh_caller(&[b.grpc_url()]).await?;
    let client = Client::host_header(caller.outbound());
    eventually(Duration::from_secs(10), || async {
        client
            .get("http://billing/hello")
            .await?
            .expect_status(200)?;
        Ok(())
    })
    .await?;
    until_endpoints(&caller, "billing", &[one.inbound()], Duration::from_secs(5)).await?;
    let traffic = Traffic::start(
        client.clone(),
        "http://billing/hello",
        Duration::from_millis(10),
    );

    a.kill()?;
    b.kill()?;
    eventually(LEASE_TTL + Duration::from_secs(5), || async {
        let ids = etcd_instances(etcd.connect().await?).await?;
        ensure!(ids.is_empty(), "still registered in etcd: {ids:?}");
        Ok(())
    })
    .await?;
    let restarted = Instant::now();
    b.restart().await?;
    until_connected(&[&caller], Some(&b.grpc_url()), Duration::from_secs(6)).await?;
    let reconnected = traffic.now();
    eprintln!(
        "the caller reconnected {:?} after the restart",
        restarted.elapsed()
    );
    traffic.wait_for_more(100, Duration::from_secs(5)).await?;
    ensure!(
        restarted.elapsed() < WARM_UP,
        "the warm-up was over before the check; it proved nothing"
    );
    let summary = traffic.stop().await?;
    eprintln!(
        "after the caller reconnected to the restarted replica: {:?}",
        summary.since(reconnected).counts()
    );
    summary.expect_all(
        200,
        100,
        "with billing-1 alive and not yet registered again",
    )?;

    // The warm-up ends: B's word counts, and billing-1 (which cannot reach B)
    // is gone from the caller.
    eventually(WARM_UP + Duration::from_secs(3), || async {
        let reply = client.get("http://billing/hello").await?;
        ensure!(
            reply.status == 502 && reply.reason() == Some("unknown-service"),
            "{} {:?} at {:?} after the restart",
            reply.status,
            reply.reason(),
            restarted.elapsed()
        );
        Ok(())
    })
    .await?;
    ensure!(
        restarted.elapsed() >= WARM_UP,
        "billing-1 was dropped {:?} after the restart, before the warm-up ended",
        restarted.elapsed()
    );
    Ok(())
}

/// billing's valid policy (a 300 ms timeout) is applied, then an invalid
/// one is written straight to etcd and the control plane restarts: it has
/// never seen the valid policy itself, yet it serves it (from its record in
/// etcd), so a caller that starts afterwards, with no snapshot cache,
/// times out a slow billing rather than waiting on it with no policy at all.
/// `weftctl get policy` prints the policy in force under the refusal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_control_plane_serves_the_last_valid_policy_to_new_sidecars()
-> anyhow::Result<()> {
    const POLICY_KEY: &str = "/weft/services/billing/policy";
    const RECORD_KEY: &str = "/weft/services/billing/last-valid-policy";
    let etcd = EtcdServer::start().await?;
    let mut cp = ControlPlane::etcd(etcd.client_url())
        .lease_ttl(LEASE_TTL_ARG)
        .start()
        .await?;
    let addresses = [cp.grpc_url()];
    let app = Backend::start("billing-1").await?;
    let _billing = registered("billing", "billing-1", app.addr(), &addresses).await?;
    let dir = TempDir::new()?;
    let valid = "service = \"billing\"\n\n[outbound]\ntimeout = \"300ms\"\n";
    let file = dir.write("billing.toml", valid)?;
    cp.weftctl_ok(&["apply", "--create", "-f", file.to_str().context("path")?])
        .await?;
    // The control plane records the valid policy once its view has it.
    eventually(Duration::from_secs(5), || async {
        let mut client = etcd.connect().await?;
        let recorded = client.get(RECORD_KEY, None).await?;
        ensure!(!recorded.kvs().is_empty(), "no {RECORD_KEY} yet");
        Ok(())
    })
    .await?;
    etcd.connect()
        .await?
        .put(
            POLICY_KEY,
            "service = \"billing\"\n\n[outbound]\ntimeout = \"forever\"\n",
            None,
        )
        .await?;
    cp.restart().await?;

    let caller = mesh_caller(&addresses).await?;
    let client = Client::host_header(caller.outbound());
    eventually(Duration::from_secs(10), || async {
        client
            .get("http://billing/hello")
            .await?
            .expect_status(200)?;
        Ok(())
    })
    .await?;
    app.set_latency(Duration::from_secs(3));
    let reply = client.get("http://billing/hello").await?;
    reply.expect_status(504)?;
    ensure!(
        reply.reason() == Some("timeout"),
        "weft-reason {:?}",
        reply.reason()
    );
    app.set_latency(Duration::ZERO);

    let out = cp.weftctl(&["get", "policy", "billing"]).await?;
    out.ok()?;
    ensure!(
        out.stdout.contains("# REFUSED") && out.stdout.contains("timeout = \"300ms\""),
        "weftctl get policy billing:\n{}",
        out.all()
    );
    ensure!(out.stderr.contains("warning:"), "{}", out.all());
    Ok(())
}

/// etcd is killed for 20 s under traffic and restarted: every request is
/// answered, the caller never loses an instance, the control plane reports
/// not ready meanwhile, and afterwards both registrations are still there
/// (in the control plane's view, in etcd, and past another lease TTL).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_etcd_outage_of_20s_loses_no_registration_and_no_request() -> anyhow::Result<()> {
    const OUTAGE: Duration = Duration::from_secs(20);
    let mut mesh = Mesh::builder()
        .etcd()
        .lease_ttl(LEASE_TTL_ARG)
        .service("billing", 2)
        .build()
        .await?;
    let client = mesh.client();
    until_instances(
        mesh.control_plane(),
        &["billing-1", "billing-2"],
        Duration::from_secs(5),
    )
    .await?;

    let traffic = Traffic::start(
        client.clone(),
        "http://billing/hello",
        Duration::from_millis(20),
    );
    let view = ViewWatch::start(mesh.caller(), &mesh.inbounds("billing"));
    traffic.wait_for_more(20, Duration::from_secs(5)).await?;

    mesh.etcd_mut()?.kill(0)?;
    let down = Instant::now();
    let cp = mesh.control_plane();
    let killed = traffic.now();
    eventually(Duration::from_secs(10), || async {
        ensure!(cp.admin_status("/ready").await? == 503, "still ready");
        Ok(())
    })
    .await?;
    eprintln!(
        "the control plane reported not ready {:?} after etcd died",
        down.elapsed()
    );
    // The outage's length is the scenario (the 20 s), not a wait for
    // a condition.
    tokio::time::sleep_until(down + OUTAGE).await;
    ensure!(
        cp.is_running(),
        "the control plane exited while etcd was down"
    );
    let during = traffic.summary().since(killed);
    during.expect_all(200, 500, "while etcd was down")?;

    mesh.etcd_mut()?.restart(0).await?;
    let restarted = Instant::now();
    let (cp, etcd) = (mesh.control_plane(), mesh.etcd()?);
    eventually(Duration::from_secs(15), || async {
        ensure!(cp.admin_status("/ready").await? == 200, "not ready");
        Ok(())
    })
    .await?;
    eprintln!(
        "the control plane was ready {:?} after etcd came back",
        restarted.elapsed()
    );
    until_instances(cp, &["billing-1", "billing-2"], Duration::from_secs(10)).await?;
    let in_etcd = etcd_instances(etcd.connect(0).await?).await?;
    ensure!(
        in_etcd == BTreeSet::from(["billing-1".to_owned(), "billing-2".to_owned()]),
        "in etcd after the outage: {in_etcd:?}"
    );
    // Another lease TTL and more with etcd back: still registered (the
    // leases are kept alive, not just left over).
    traffic
        .wait_for_more(150, LEASE_TTL + Duration::from_secs(10))
        .await?;
    let in_etcd = etcd_instances(etcd.connect(0).await?).await?;
    ensure!(in_etcd.len() == 2, "in etcd a lease TTL later: {in_etcd:?}");
    until_instances(cp, &["billing-1", "billing-2"], Duration::from_secs(5)).await?;

    let summary = traffic.stop().await?;
    eprintln!(
        "traffic: {:?} ({} while etcd was down), by backend {:?}",
        summary.counts(),
        during.total(),
        summary.by_backend()
    );
    summary.expect_all(200, 1000, "across the etcd outage")?;
    view.stop(200)?;
    Ok(())
}

/// Two control-plane replicas on a three-node etcd cluster; sidecars list
/// both replicas. The replica the caller is connected to dies together with
/// the etcd leader. Every sidecar is connected to the survivor within
/// [`RECONNECT_WINDOW`], traffic never fails, the registrations survive past
/// the lease TTL (the caller never loses one from its view), a policy applied
/// through the survivor reaches every sidecar, and a new instance registers
/// through it and gets traffic.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_survive_losing_one_replica_and_the_etcd_leader() -> anyhow::Result<()> {
    // Fair bound for the move to the survivor: the sidecars' first retry
    // waits at most 100 ms (full jitter) and goes to the next listed address;
    // etcd elects a new leader within a few 100 ms election timeouts; the
    // re-registration is one lease grant and one put. 3 s leaves room for a
    // loaded CI machine and is still well inside what an operator would call
    // "kept working".
    const RECONNECT_WINDOW: Duration = Duration::from_secs(3);
    let mut mesh = Mesh::builder()
        .etcd_cluster(3)
        .replicas(2)
        .lease_ttl(LEASE_TTL_ARG)
        .service("billing", 2)
        .build()
        .await?;
    let (addresses, client, both) = (mesh.addresses(), mesh.client(), mesh.inbounds("billing"));
    // Field by field, so that etcd and the replicas can be taken down while
    // the sidecars are in use.
    let (one, two) = (&mesh.instances[0].sidecar, &mesh.instances[1].sidecar);
    let caller = &mesh.callers[0];
    let cluster = mesh.etcd.as_mut().context("etcd")?;
    until_connected(&[one, two, caller], None, Duration::from_secs(5)).await?;

    let traffic = Traffic::start(
        client.clone(),
        "http://billing/hello",
        Duration::from_millis(10),
    );
    traffic.wait_for_more(20, Duration::from_secs(5)).await?;

    // The victim: the replica the caller is connected to.
    let (_, at) = control_plane_state(&caller.admin_client()).await?;
    let at = at.context("the caller's control-plane address")?;
    let victim = addresses
        .iter()
        .position(|a| *a == at)
        .with_context(|| format!("the caller is connected to {at}, not a listed replica"))?;
    let survivor = 1 - victim;
    let mut on_victim = 0;
    for sidecar in [one, two, caller] {
        if control_plane_state(&sidecar.admin_client())
            .await?
            .1
            .as_deref()
            == Some(&at)
        {
            on_victim += 1;
        }
    }
    let leader = cluster.leader().await?;
    eprintln!(
        "killing replica {victim} ({on_victim} of 3 sidecars on it) and etcd member {leader} (the leader)"
    );

    let view = ViewWatch::start(caller, &both);
    let killed = traffic.now();
    let kill_time = Instant::now();
    mesh.control_planes[victim].kill()?;
    cluster.kill(leader)?;
    let survivor_cp = &mesh.control_planes[survivor];

    let moved = until_connected(
        &[one, two, caller],
        Some(&addresses[survivor]),
        RECONNECT_WINDOW,
    )
    .await
    .context("every sidecar connected to the surviving replica")?;
    until_instances(survivor_cp, &["billing-1", "billing-2"], RECONNECT_WINDOW)
        .await
        .context("the registrations through the surviving replica")?;
    let window = kill_time.elapsed();
    eprintln!(
        "every sidecar connected to the survivor {moved:?} after the kill; both instances listed by it after {window:?}"
    );

    // Past the lease TTL of the registrations the dead replica kept alive:
    // still registered (through the survivor), in its view and in etcd.
    tokio::time::sleep_until(kill_time + LEASE_TTL + Duration::from_secs(1)).await;
    until_instances(
        survivor_cp,
        &["billing-1", "billing-2"],
        Duration::from_secs(5),
    )
    .await?;
    let alive = (0..3).find(|i| *i != leader).context("a live member")?;
    let in_etcd = etcd_instances(cluster.connect(alive).await?).await?;
    ensure!(
        in_etcd.len() == 2,
        "in etcd past the lease TTL: {in_etcd:?}"
    );
    until_endpoints(caller, "billing", &both, Duration::from_secs(5)).await?;

    // A policy applied through the survivor reaches the caller (its balancer)
    // and billing's own sidecars (their share of the service-wide limit).
    let dir = TempDir::new()?;
    let policy = dir.write(
        "billing.toml",
        "service = \"billing\"\n\n[outbound]\nload_balancer = \"round-robin\"\n\n\
         [inbound]\nrate_limit = { per_second = 1000, burst = 100 }\n",
    )?;
    survivor_cp
        .weftctl_ok(&["apply", "--create", "-f", policy.to_str().context("path")?])
        .await?;
    let admin = caller.admin_client();
    eventually(Duration::from_secs(5), || async {
        let endpoints = admin.endpoints().await?;
        let billing = endpoints.service("billing")?;
        ensure!(billing["load_balancer"] == "round-robin", "{billing}");
        Ok(())
    })
    .await?;
    for sidecar in [one, two] {
        let admin = sidecar.admin_client();
        eventually(Duration::from_secs(5), || async {
            let local = admin.endpoints().await?.0["local"].clone();
            ensure!(local["policy_source"] == "control-plane", "{local}");
            ensure!(
                local["rate_limit"]["per_second"].as_f64() == Some(500.0),
                "{local}"
            );
            Ok(())
        })
        .await?;
    }

    // The caller never lost an instance (the registrations the dead replica
    // kept alive moved to the survivor before their leases ran out).
    view.stop(20)?;

    // A new instance registers through the survivor and gets traffic.
    mesh.add_instance("billing").await?;
    let three = mesh.instance("billing-3");
    eventually(Duration::from_secs(5), || async {
        ensure!(three.app.requests() > 0, "billing-3 has had no request");
        Ok(())
    })
    .await?;
    until_endpoints(
        mesh.caller(),
        "billing",
        &mesh.inbounds("billing"),
        Duration::from_secs(5),
    )
    .await?;
    traffic.wait_for_more(20, Duration::from_secs(5)).await?;

    let summary = traffic.stop().await?;
    eprintln!(
        "traffic: {:?} (in the reconnect window: {:?}), by backend {:?}",
        summary.counts(),
        summary.window(killed, killed + window).counts(),
        summary.by_backend()
    );
    summary.expect_all(200, 300, "across the loss of a replica and the etcd leader")?;
    Ok(())
}
