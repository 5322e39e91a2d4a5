//! The several-replicas case (`--replicas`): control-plane replicas on a
//! multi-member etcd, a replica and then an etcd member killed.
//!
//! `--control-plane` lists the replicas, `--etcd` the members (both
//! comma-separated); `--cp-pid-file` and `--etcd-pids-file` hold their pids,
//! one a line, in the same order. Every simulated sidecar has its own
//! connection, a Subscribe stream (`--per-sidecar` of `--services`) and a
//! Register stream for its own instance (`reg-<k>`) on that connection, and
//! is given every replica's address. It fails over as weft-proxy does
//! (`weft_discovery::control_plane::session::run`): it starts at one
//! address (sidecar `k` at `k % replicas`, so they spread evenly, where
//! weft-proxy picks at random) and, whenever a session ends or a connection
//! attempt fails, waits its full-jitter backoff (100 ms doubling to 10 s,
//! reset after a 5 s session) and tries the next address in the list. A
//! failed Register stream is opened again on the same connection after its
//! own backoff, without ending the session.
//!
//! 1. Once every sidecar holds a snapshot and etcd holds every instance,
//!    the first replica is killed (SIGKILL). Reported: the time until every
//!    sidecar it served holds a snapshot from another replica at etcd's
//!    revision at the kill (and the slowest one's attempts); then, after
//!    the lease TTL has passed (`LEASE_WAIT`: a registration the dead
//!    replica held and nobody renewed is gone by then), the instances etcd
//!    holds (the fewest seen meanwhile, sampled every 100 ms).
//! 2. Then the etcd leader is killed; for `WRITE_SECONDS` an instance is
//!    written every 1 / `--churn` s (to the members left). Reported: the
//!    time from the last write until every sidecar holds etcd's revision
//!    (sidecars that never do: lost updates), and again the instances etcd
//!    holds after the lease TTL.
//!
//! Snapshots going backwards (a lower revision than the sidecar had) are
//! counted throughout.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail, ensure};
use etcd_client::GetOptions;
use tokio::sync::{mpsc, watch};
use tonic::transport::Channel;
use weft_api::v1::control_plane_client::ControlPlaneClient;
use weft_api::v1::{Instance, RegisterRequest, register_request};

use crate::storm::{Backoff, HEALTHY_SESSION, subscribe};
use crate::usage::listen_overflows;
use crate::{Args, service, subscriptions};

/// Longer than the control plane's default lease TTL (10 s) plus a second.
const LEASE_WAIT: Duration = Duration::from_secs(12);
/// Writes after the etcd member is killed.
const WRITE_SECONDS: f64 = 5.0;
/// How long the bench waits for each phase's outcome.
const PHASE_DEADLINE: Duration = Duration::from_secs(60);
/// No replica has served the sidecar yet.
const NONE: usize = usize::MAX;

/// One sidecar's state, read by the main task.
struct State {
    /// The replica that sent the sidecar's latest snapshot.
    on: AtomicUsize,
    /// The highest revision it holds.
    revision: AtomicI64,
    /// Connection attempts since it last lost a session.
    attempts: AtomicU32,
    /// The instance ids it holds, by service.
    held: std::sync::Mutex<Held>,
}

/// Instance ids by service.
type Held = std::collections::BTreeMap<String, Vec<String>>;

struct Shared {
    sidecars: Vec<State>,
    backwards: AtomicU64,
    register_failures: AtomicU64,
}

fn instance(k: usize, services: usize) -> Instance {
    let octets = [(k >> 16) as u8, (k >> 8) as u8, k as u8];
    Instance {
        service: service(k % services.max(1)),
        id: format!("reg-{k}"),
        address: format!("10.{}.{}.{}:8080", octets[0], octets[1], octets[2]),
        ..Instance::default()
    }
}

/// The sidecar's Register stream, opened again (after its own backoff) when
/// it fails, for as long as the session lasts.
async fn register(channel: Channel, k: usize, services: usize, shared: Arc<Shared>) {
    let mut backoff = Backoff::new(k as u64 ^ 0x5EED);
    loop {
        let opened = Instant::now();
        let (tx, rx) = mpsc::channel(1);
        let sent = tx
            .send(RegisterRequest {
                msg: Some(register_request::Msg::Register(instance(k, services))),
            })
            .await;
        if sent.is_ok() {
            let requests = futures_util::stream::unfold(rx, |mut rx| async move {
                rx.recv().await.map(|m| (m, rx))
            });
            if let Ok(response) = ControlPlaneClient::new(channel.clone())
                .register(requests)
                .await
            {
                let mut stream = response.into_inner();
                while let Ok(Some(_)) = stream.message().await {}
            }
        }
        drop(tx);
        shared.register_failures.fetch_add(1, Ordering::Relaxed);
        if opened.elapsed() >= HEALTHY_SESSION {
            backoff.reset();
        }
        tokio::time::sleep(backoff.next_delay()).await;
    }
}

/// One session with replica `index`: returns whether it got a snapshot.
async fn session(
    k: usize,
    index: usize,
    address: &str,
    services: &[String],
    services_total: usize,
    shared: &Arc<Shared>,
) -> bool {
    let me = &shared.sidecars[k];
    // Held whole: the subscription lasts while `subscription` does.
    let Some(mut subscription) = subscribe(address, services).await else {
        return false;
    };
    let registration = tokio::spawn(register(
        subscription.channel.clone(),
        k,
        services_total,
        Arc::clone(shared),
    ));
    let stream = &mut subscription.stream;
    let mut got = false;
    while let Ok(Some(msg)) = stream.message().await {
        let had = me.revision.load(Ordering::SeqCst);
        if msg.version < had {
            shared.backwards.fetch_add(1, Ordering::Relaxed);
        }
        me.revision.fetch_max(msg.version, Ordering::SeqCst);
        {
            let mut held = me
                .held
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if msg.full {
                held.clear();
            }
            for state in &msg.services {
                let mut ids: Vec<String> = state.instances.iter().map(|i| i.id.clone()).collect();
                ids.sort();
                held.insert(state.name.clone(), ids);
            }
            for name in &msg.removed {
                held.remove(name);
            }
        }
        if !got {
            got = true;
            me.on.store(index, Ordering::SeqCst);
        }
    }
    registration.abort();
    got
}

/// One simulated sidecar, failing over across `addresses` until `stop`.
async fn sidecar(
    k: usize,
    addresses: Arc<Vec<String>>,
    services: Vec<String>,
    services_total: usize,
    shared: Arc<Shared>,
    mut stop: watch::Receiver<bool>,
) {
    let mut backoff = Backoff::new(k as u64);
    let first = k % addresses.len();
    for index in (0..addresses.len()).cycle().skip(first) {
        let started = Instant::now();
        shared.sidecars[k].attempts.fetch_add(1, Ordering::Relaxed);
        let run = session(
            k,
            index,
            &addresses[index],
            &services,
            services_total,
            &shared,
        );
        let held = tokio::select! {
            _ = stop.changed() => return,
            held = run => held,
        };
        if held {
            shared.sidecars[k].attempts.store(0, Ordering::Relaxed);
        }
        if started.elapsed() >= HEALTHY_SESSION {
            backoff.reset();
        }
        tokio::select! {
            _ = stop.changed() => return,
            () = tokio::time::sleep(backoff.next_delay()) => {}
        }
    }
}

fn pids(path: Option<&std::path::Path>, what: &str) -> anyhow::Result<Vec<u32>> {
    let path = path.with_context(|| format!("--replicas needs the {what} pid file"))?;
    std::fs::read_to_string(path)?
        .split_whitespace()
        .map(|p| p.parse().context("a pid"))
        .collect()
}

fn kill(pid: u32) -> anyhow::Result<()> {
    let status = std::process::Command::new("kill")
        .args(["-9", &pid.to_string()])
        .status()?;
    ensure!(status.success(), "kill -9 {pid} failed");
    Ok(())
}

/// Registered instances (`reg-*`) etcd holds.
async fn registered(etcd: &mut etcd_client::Client, prefix: &str) -> anyhow::Result<usize> {
    let rsp = etcd
        .get(
            format!("{prefix}services/"),
            Some(GetOptions::new().with_prefix().with_keys_only()),
        )
        .await?;
    Ok(rsp
        .kvs()
        .iter()
        .filter(|kv| kv.key().windows(15).any(|w| w == b"/instances/reg-"))
        .count())
}

async fn revision(etcd: &mut etcd_client::Client) -> anyhow::Result<i64> {
    etcd.get("/", Some(GetOptions::new().with_count_only()))
        .await?
        .header()
        .map(|h| h.revision())
        .context("etcd response without a header")
}

/// Every service's instance ids in etcd.
async fn etcd_directory(etcd: &mut etcd_client::Client, prefix: &str) -> anyhow::Result<Held> {
    let rsp = etcd
        .get(
            format!("{prefix}services/"),
            Some(GetOptions::new().with_prefix().with_keys_only()),
        )
        .await?;
    let mut out = Held::new();
    for kv in rsp.kvs() {
        let key = String::from_utf8_lossy(kv.key());
        let rest = key.strip_prefix(prefix).unwrap_or(&key);
        if let Some((name, id)) = rest
            .strip_prefix("services/")
            .and_then(|r| r.split_once("/instances/"))
        {
            out.entry(name.to_owned()).or_default().push(id.to_owned());
        }
    }
    for ids in out.values_mut() {
        ids.sort();
    }
    Ok(out)
}

/// Sidecars whose services' instances differ from `truth` (etcd's).
fn stale(shared: &Shared, subscribed: &[Vec<String>], truth: &Held) -> usize {
    shared
        .sidecars
        .iter()
        .zip(subscribed)
        .filter(|(s, names)| {
            let held = s
                .held
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            names.iter().any(|n| held.get(n) != truth.get(n))
        })
        .count()
}

/// Waits (up to `within`) until every sidecar holds what etcd holds for its
/// services; returns how long it took and how many still differ.
async fn until_consistent(
    etcd: &mut etcd_client::Client,
    prefix: &str,
    shared: &Shared,
    subscribed: &[Vec<String>],
    within: Duration,
) -> anyhow::Result<(Duration, usize)> {
    let started = Instant::now();
    let truth = etcd_directory(etcd, prefix).await?;
    loop {
        let differ = stale(shared, subscribed, &truth);
        if differ == 0 || started.elapsed() >= within {
            return Ok((started.elapsed(), differ));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The fewest registered instances seen over `wait` (sampled every 100 ms).
async fn fewest_registered(
    etcd: &mut etcd_client::Client,
    prefix: &str,
    wait: Duration,
) -> anyhow::Result<(usize, usize)> {
    let until = Instant::now() + wait;
    let mut fewest = usize::MAX;
    loop {
        if let Ok(n) = registered(etcd, prefix).await {
            fewest = fewest.min(n);
        }
        if Instant::now() >= until {
            return Ok((fewest, registered(etcd, prefix).await?));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

pub async fn run(args: &Args) -> anyhow::Result<()> {
    let addresses: Arc<Vec<String>> =
        Arc::new(args.control_plane.split(',').map(str::to_owned).collect());
    let members: Vec<String> = args.etcd.split(',').map(str::to_owned).collect();
    let cp_pids = pids(args.cp_pid_file.as_deref(), "replicas'")?;
    let etcd_pids = pids(args.etcd_pids_file.as_deref(), "members'")?;
    ensure!(
        cp_pids.len() == addresses.len() && etcd_pids.len() == members.len(),
        "a pid per replica and per member"
    );
    let n = args.sidecars;
    let mut etcd = etcd_client::Client::connect(members.clone(), None)
        .await
        .context("connecting to etcd")?;
    crate::seed(&mut etcd, args).await?;

    let shared = Arc::new(Shared {
        sidecars: (0..n)
            .map(|_| State {
                on: AtomicUsize::new(NONE),
                revision: AtomicI64::new(0),
                attempts: AtomicU32::new(0),
                held: std::sync::Mutex::default(),
            })
            .collect(),
        backwards: AtomicU64::new(0),
        register_failures: AtomicU64::new(0),
    });
    let (stop_tx, stop_rx) = watch::channel(false);
    let subscribed: Vec<Vec<String>> = (0..n)
        .map(|k| subscriptions(k, args).into_iter().map(service).collect())
        .collect();
    let cpu_before_start = cpu_seconds(&cp_pids);
    let started = Instant::now();
    let tasks: Vec<_> = (0..n)
        .map(|k| {
            tokio::spawn(sidecar(
                k,
                Arc::clone(&addresses),
                subscribed[k].clone(),
                args.services,
                Arc::clone(&shared),
                stop_rx.clone(),
            ))
        })
        .collect();
    loop {
        let served = shared
            .sidecars
            .iter()
            .filter(|s| s.on.load(Ordering::SeqCst) != NONE)
            .count();
        let held = registered(&mut etcd, &args.prefix).await?;
        if served == n && held == n {
            break;
        }
        ensure!(
            started.elapsed() < Duration::from_secs(300),
            "after 300 s: {served} of {n} sidecars served, {held} registered"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let subscribe_time = started.elapsed();
    // The replicas' CPU for serving and registering every sidecar once.
    let start_cpu = cpu_seconds(&cp_pids) - cpu_before_start;
    let per_replica: Vec<usize> = (0..addresses.len())
        .map(|i| {
            shared
                .sidecars
                .iter()
                .filter(|s| s.on.load(Ordering::SeqCst) == i)
                .count()
        })
        .collect();
    eprintln!(
        "{n} sidecars served and registered in {:.1} s (the replicas' CPU: {start_cpu:.2} s, {:.2} ms per sidecar), per replica {per_replica:?}",
        subscribe_time.as_secs_f64(),
        start_cpu * 1000.0 / n as f64
    );

    // 1. A replica dies.
    let target = revision(&mut etcd).await?;
    let orphans: Vec<usize> = (0..n)
        .filter(|&k| shared.sidecars[k].on.load(Ordering::SeqCst) == 0)
        .collect();
    let overflows_before = listen_overflows();
    let survivors_cpu = |pids: &[u32]| cpu_seconds(&pids[1..]);
    let cpu_at_kill = survivors_cpu(&cp_pids);
    let ticks_at_kill = crate::usage::cpu_ticks();
    let killed = Instant::now();
    kill(cp_pids[0])?;
    let mut max_attempts = 0;
    // When each of them was served again (to the 10 ms poll).
    let mut served_at: Vec<Option<Duration>> = vec![None; orphans.len()];
    loop {
        for (i, &k) in orphans.iter().enumerate() {
            let s = &shared.sidecars[k];
            if served_at[i].is_none()
                && s.on.load(Ordering::SeqCst) != 0
                && s.revision.load(Ordering::SeqCst) >= target
            {
                served_at[i] = Some(killed.elapsed());
            }
        }
        let waiting = served_at.iter().filter(|t| t.is_none()).count();
        if waiting == 0 {
            break;
        }
        ensure!(
            killed.elapsed() < PHASE_DEADLINE,
            "{waiting} of {} sidecars of the killed replica not served by another within {PHASE_DEADLINE:?}",
            orphans.len()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let failover = killed.elapsed();
    let failover_cpu = survivors_cpu(&cp_pids) - cpu_at_kill;
    // How busy each core was meanwhile (the replicas on CPU 0; etcd and
    // this bench, its simulated sidecars included, on CPU 1).
    let failover_busy = crate::usage::cpu_busy(&ticks_at_kill, &crate::usage::cpu_ticks());
    let mut times: Vec<Duration> = served_at.into_iter().flatten().collect();
    times.sort();
    let quantile = |q: f64| {
        times
            .get(((times.len() as f64 * q) as usize).min(times.len().saturating_sub(1)))
            .map_or(0.0, Duration::as_secs_f64)
    };
    let (failover_p50, failover_p90) = (quantile(0.5), quantile(0.9));
    let overflows = listen_overflows()
        .zip(overflows_before)
        .map(|(a, b)| a.saturating_sub(b));
    for &k in &orphans {
        max_attempts = max_attempts.max(shared.sidecars[k].attempts.load(Ordering::Relaxed));
    }
    let (fewest_after_replica, held_after_replica) =
        fewest_registered(&mut etcd, &args.prefix, LEASE_WAIT.saturating_sub(failover)).await?;
    // Until every orphan's registration is written again (and the TTL has
    // passed: keep-alives of every registration included).
    let after_kill_cpu = survivors_cpu(&cp_pids) - cpu_at_kill;
    let after_kill = killed.elapsed();
    eprintln!(
        "replica 0 killed: its {} sidecars served by the others after {:.2} s; registrations: fewest {fewest_after_replica}, {held_after_replica} after {LEASE_WAIT:?}",
        orphans.len(),
        failover.as_secs_f64()
    );

    // 2. The etcd leader dies; writes go on to the others.
    let mut leader = None;
    for (i, member) in members.iter().enumerate() {
        let mut c = etcd_client::Client::connect([member.as_str()], None).await?;
        let status = c.status().await?;
        if status
            .header()
            .is_some_and(|h| h.member_id() == status.leader())
        {
            leader = Some(i);
        }
    }
    let leader = leader.context("no etcd leader found")?;
    let survivors: Vec<String> = members
        .iter()
        .enumerate()
        .filter(|&(i, _)| i != leader)
        .map(|(_, m)| m.clone())
        .collect();
    let member_killed = Instant::now();
    kill(etcd_pids[leader])?;
    let mut etcd = etcd_client::Client::connect(survivors, None).await?;
    let period = Duration::from_secs_f64(1.0 / args.churn);
    let mut ticker = tokio::time::interval(period);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut writes = 0u64;
    let mut write_errors = 0u64;
    let mut first_write = None;
    while member_killed.elapsed() < Duration::from_secs_f64(WRITE_SECONDS) {
        ticker.tick().await;
        let s = (writes as usize) % args.services;
        let name = service(s);
        let id = format!("churn-{writes}");
        let key = format!("{}services/{name}/instances/{id}", args.prefix);
        // etcd elects a new leader meanwhile: a write may fail or hang.
        let put = etcd.put(key, crate::record(&name, &id, 9000), None);
        match tokio::time::timeout(Duration::from_secs(1), put).await {
            Ok(Ok(_)) => {
                writes += 1;
                first_write.get_or_insert_with(|| member_killed.elapsed());
            }
            _ => write_errors += 1,
        }
    }
    let first_write = first_write.context("no write succeeded after the etcd member was killed")?;
    let final_revision = revision(&mut etcd).await?;
    // No update lost: every sidecar comes to hold, for each of its services,
    // the instances etcd holds (a push carries only changed services, so a
    // sidecar's revision is that of its services' last change).
    let (caught_up, behind) = until_consistent(
        &mut etcd,
        &args.prefix,
        &shared,
        &subscribed,
        PHASE_DEADLINE,
    )
    .await?;
    let wait = LEASE_WAIT.saturating_sub(member_killed.elapsed());
    let (fewest_after_member, held_after_member) =
        fewest_registered(&mut etcd, &args.prefix, wait).await?;
    // And again at the very end, after the registrations' TTL.
    let end_revision = revision(&mut etcd).await?;
    let (_, differ_at_end) = until_consistent(
        &mut etcd,
        &args.prefix,
        &shared,
        &subscribed,
        Duration::from_secs(10),
    )
    .await?;
    let at_end = n - differ_at_end;
    stop_tx.send_replace(true);
    for task in tasks {
        let _ = task.await;
    }
    let backwards = shared.backwards.load(Ordering::Relaxed);
    println!(
        "{n} sidecars on {} replicas ({per_replica:?}), {} etcd members; replica 0 killed: its {} sidecars served by another at revision {target} after {:.2} s (half of them after {failover_p50:.2} s, 90% after {failover_p90:.2} s; slowest: {max_attempts} attempts; SYNs dropped by a full listen queue meanwhile: {}; the two replicas left used {failover_cpu:.2} s of CPU until then, {after_kill_cpu:.2} s in the {:.1} s after the kill); registrations held: fewest {fewest_after_replica}, {held_after_replica} of {n} {LEASE_WAIT:?} after",
        addresses.len(),
        members.len(),
        orphans.len(),
        failover.as_secs_f64(),
        overflows.map_or("?".to_owned(), |o| o.to_string()),
        after_kill.as_secs_f64()
    );
    println!(
        "etcd leader (member {leader}) killed: {writes} writes in {WRITE_SECONDS} s ({write_errors} failed or timed out; the first write succeeded {:.2} s after the kill); every sidecar holds etcd's instances of its services (revision {final_revision}) {:.2} s after the last write ({behind} differ); registrations: fewest {fewest_after_member}, {held_after_member} of {n}; at the end (revision {end_revision}) {at_end} of {n} sidecars hold etcd's instances; snapshots backwards: {backwards}",
        first_write.as_secs_f64(),
        caught_up.as_secs_f64()
    );
    println!(
        "{}",
        serde_json::json!({
            "case": "replicas",
            "sidecars": n,
            "replicas": addresses.len(),
            "members": members.len(),
            "per_replica": per_replica,
            "subscribe_seconds": subscribe_time.as_secs_f64(),
            "orphans": orphans.len(),
            "failover_seconds": failover.as_secs_f64(),
            "failover_max_attempts": max_attempts,
            "failover_p50_seconds": failover_p50,
            "failover_p90_seconds": failover_p90,
            "failover_listen_overflows": overflows,
            "start_cpu_seconds": start_cpu,
            "failover_cpu_seconds": failover_cpu,
            "failover_cpu_busy_percent": failover_busy,
            "after_kill_cpu_seconds": after_kill_cpu,
            "after_kill_seconds": after_kill.as_secs_f64(),
            "registered_fewest_after_replica": fewest_after_replica,
            "registered_after_replica": held_after_replica,
            "etcd_leader_killed": leader,
            "writes": writes,
            "write_errors": write_errors,
            "first_write_seconds": first_write.as_secs_f64(),
            "final_revision": final_revision,
            "caught_up_seconds": caught_up.as_secs_f64(),
            "behind": behind,
            "registered_fewest_after_member": fewest_after_member,
            "registered_after_member": held_after_member,
            "end_revision": end_revision,
            "at_end_revision": at_end,
            "backwards": backwards,
            "register_stream_failures": shared.register_failures.load(Ordering::Relaxed),
        })
    );
    if behind > 0 || at_end < n || held_after_member < n || held_after_replica < n || backwards > 0
    {
        bail!("an update or a registration was lost, or a snapshot went backwards");
    }
    Ok(())
}

/// The CPU seconds (user and system) the processes `pids` have used; a
/// process that is gone counts 0.
fn cpu_seconds(pids: &[u32]) -> f64 {
    pids.iter()
        .filter_map(|&pid| crate::usage::process_usage(pid).ok())
        .map(|(cpu, _)| cpu)
        .sum()
}
