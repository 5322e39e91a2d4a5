//! `weft-cp-bench`: many simulated sidecars subscribed to a running control
//! plane while endpoints churn in etcd; reports how fast changes reach them.
//!
//! Opens `--sidecars` Subscribe streams (spread over `--connections` HTTP/2
//! connections, as many sidecars would be spread over replicas and
//! connections), each subscribed to `--per-sidecar` of `--services` services.
//! Seeds every service with two instances, waits until every stream has its
//! full snapshot, then writes one new instance (and deletes the one written
//! `--services` writes before, so services keep a bounded size) every
//! `1 / --churn` seconds for `--duration`, directly into etcd as a
//! registration would be written. A subscriber that receives a service state
//! containing a churned instance for the first time records the latency from
//! just before the etcd write to its receipt. Then it waits `--grace` for
//! stragglers and reports, as text and one JSON line:
//!
//! - propagation latency p50/p90/p99/max over every (write, subscriber) pair;
//! - deliveries expected and missed (a subscriber never told of a write);
//! - the control plane's CPU time during the churn phase and its RSS (from
//!   `/proc/<--cp-pid>`), and the watches etcd holds
//!   (`etcd_debugging_mvcc_watcher_total` from etcd's `/metrics`).

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use clap::Parser;
use hdrhistogram::Histogram;
use std::sync::Mutex;

use tokio::sync::mpsc;
use tonic::transport::{Channel, Endpoint};
use weft_api::v1::control_plane_client::ControlPlaneClient;
use weft_api::v1::{SubscribeRequest, SubscribeResponse};

use usage::{etcd_watchers, process_usage};

mod big;
mod leases;
mod replicas;
mod storm;
mod usage;

#[derive(Debug, Clone, Parser)]
struct Args {
    /// The control plane's gRPC address (`http://host:port`); the big case
    /// reads it from `--bound-file` instead.
    #[arg(long, default_value = "")]
    control_plane: String,
    /// etcd's client URL (writes go there directly).
    #[arg(long)]
    etcd: String,
    /// The control plane's key prefix in etcd.
    #[arg(long, default_value = "/weft/")]
    prefix: String,
    /// The control plane's pid, for its CPU time and RSS.
    #[arg(long)]
    cp_pid: Option<u32>,
    #[arg(long, default_value_t = 1000)]
    sidecars: usize,
    #[arg(long, default_value_t = 100)]
    services: usize,
    #[arg(long, default_value_t = 3)]
    per_sidecar: usize,
    /// HTTP/2 connections the subscribers share.
    #[arg(long, default_value_t = 0)]
    connections: usize,
    /// Instance writes per second.
    #[arg(long, default_value_t = 20.0)]
    churn: f64,
    /// Seconds of churn.
    #[arg(long, default_value_t = 10.0)]
    duration: f64,
    /// Seconds to wait for late deliveries after the last write.
    #[arg(long, default_value_t = 3.0)]
    grace: f64,
    /// The lease case instead of propagation: register this many instances
    /// through the control plane (one Register stream each, held open) and
    /// measure, over `--duration` seconds, what keeping their leases alive
    /// costs etcd and the control plane.
    #[arg(long, default_value_t = 0)]
    registrations: usize,
    /// etcd's pid, for its CPU time (lease case).
    #[arg(long)]
    etcd_pid: Option<u32>,
    /// The reconnect-storm case instead of propagation (see `storm`): every
    /// sidecar on its own connection; once all hold a snapshot the bench
    /// writes `--ready-file`, and the script restarts the control plane.
    #[arg(long)]
    storm: bool,
    #[arg(long)]
    ready_file: Option<std::path::PathBuf>,
    /// Storm case: simulate the sidecars from this many child processes
    /// (each below the per-process open-file limit); the parent aggregates.
    #[arg(long, default_value_t = 1)]
    shards: usize,
    /// Storm case, set by the parent: this process is child `i` of `K`
    /// (`i/K`) and simulates sidecars `k` with `k % K == i`.
    #[arg(long)]
    shard: Option<String>,
    /// Where the script writes the control plane's pid (storm and big cases).
    #[arg(long)]
    cp_pid_file: Option<std::path::PathBuf>,
    /// The big-directory case instead of propagation (see `big`): write
    /// `--services` services with `--instances` instances in all into etcd,
    /// then (`--ready-file`) the script starts the control plane.
    #[arg(long)]
    big: bool,
    #[arg(long, default_value_t = 100_000)]
    instances: usize,
    /// Big case: the control plane's `--bound-file` (its addresses).
    #[arg(long)]
    bound_file: Option<std::path::PathBuf>,
    /// Big case: where the script writes the Unix time (seconds, fractional)
    /// just before it started the control plane.
    #[arg(long)]
    cp_start_file: Option<std::path::PathBuf>,
    /// The several-replicas case instead of propagation (see `replicas`):
    /// `--control-plane` lists every replica (comma-separated), `--etcd`
    /// every member.
    #[arg(long)]
    replicas: bool,
    /// Replicas case: the members' pids, one a line, in `--etcd`'s order.
    #[arg(long)]
    etcd_pids_file: Option<std::path::PathBuf>,
    /// Big case: the services of the one sidecar whose first snapshot is
    /// measured.
    #[arg(long, default_value_t = 20)]
    snapshot_services: usize,
}

/// When each churned instance was written (by its sequence number).
type Writes = Arc<Mutex<HashMap<u64, Instant>>>;

fn service(i: usize) -> String {
    format!("svc-{i:05}")
}

/// The services sidecar `k` subscribes to (deterministic, spread evenly).
fn subscriptions(k: usize, args: &Args) -> Vec<usize> {
    (0..args.per_sidecar)
        .map(|j| (k * args.per_sidecar + j * 7919) % args.services)
        .collect()
}

fn record(service: &str, id: &str, port: u16) -> String {
    serde_json::json!({
        "service": service,
        "id": id,
        "address": format!("10.0.0.1:{port}"),
        "metadata": {},
    })
    .to_string()
}

/// Seeds every service with two instances.
async fn seed(etcd: &mut etcd_client::Client, args: &Args) -> anyhow::Result<()> {
    for i in 0..args.services {
        let name = service(i);
        for j in 0..2u16 {
            let id = format!("seed-{j}");
            let key = format!("{}services/{name}/instances/{id}", args.prefix);
            etcd.put(key, record(&name, &id, 8000 + j), None).await?;
        }
    }
    Ok(())
}

/// One simulated sidecar's subscription: reads pushes until `stop`, records
/// the latency of each churned instance it sees first.
async fn subscriber(
    channel: Channel,
    services: Vec<String>,
    writes: Writes,
    ready: mpsc::Sender<()>,
    received: Arc<AtomicU64>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> anyhow::Result<Histogram<u64>> {
    let mut hist = Histogram::<u64>::new_with_bounds(1, 600_000_000, 3)?;
    let (tx, rx) = mpsc::channel(1);
    tx.send(SubscribeRequest {
        add: services,
        remove: vec![],
    })
    .await?;
    let requests = tokio_stream(rx);
    let mut stream = ControlPlaneClient::new(channel)
        .subscribe(requests)
        .await
        .context("subscribe")?
        .into_inner();
    let mut seen: std::collections::HashSet<u64> = std::collections::HashSet::new();
    let mut first = true;
    loop {
        let msg = tokio::select! {
            _ = stop.changed() => break,
            msg = stream.message() => msg,
        };
        let Some(msg) = msg.context("subscription stream")? else {
            break;
        };
        let msg: SubscribeResponse = msg;
        let now = Instant::now();
        if first {
            first = false;
            let _ = ready.send(()).await;
            continue;
        }
        for state in &msg.services {
            for inst in &state.instances {
                let Some(seq) = inst.id.strip_prefix("churn-").and_then(|s| s.parse().ok()) else {
                    continue;
                };
                if !seen.insert(seq) {
                    continue;
                }
                let at = writes
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .get(&seq)
                    .copied();
                if let Some(at) = at {
                    hist.record(now.saturating_duration_since(at).as_micros().max(1) as u64)?;
                    received.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    }
    drop(tx);
    Ok(hist)
}

/// A request stream from a channel receiver (keeps the stream open while
/// the sender lives).
fn tokio_stream(
    rx: mpsc::Receiver<SubscribeRequest>,
) -> impl futures_util::Stream<Item = SubscribeRequest> + Send + 'static {
    futures_util::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|m| (m, rx)) })
}

/// What [`propagate`] measured.
pub(crate) struct Propagation {
    pub connections: usize,
    /// From the first Subscribe until every subscriber had its snapshot.
    pub connect_time: Duration,
    pub watchers: Option<f64>,
    pub churn_time: Duration,
    /// Instances written.
    pub seq: u64,
    pub received: u64,
    pub expected: u64,
    /// The control plane's CPU seconds over the churn and the grace period.
    pub cpu_s: Option<f64>,
    /// Its RSS at the end.
    pub rss: Option<u64>,
    pub hist: Histogram<u64>,
}

/// The propagation measurement: `--sidecars` Subscribe streams over shared
/// connections, then one instance written every `1 / --churn` s for
/// `--duration` (`record(service, id, seq)` is its value), the one written
/// `keep` writes earlier deleted; the latency from each write to each
/// subscriber of its service.
pub(crate) async fn propagate(
    args: &Arc<Args>,
    etcd: &mut etcd_client::Client,
    keep: u64,
    record: &(dyn Fn(&str, &str, u64) -> String + Sync),
) -> anyhow::Result<Propagation> {
    let key = |service: &str, id: &str| format!("{}services/{service}/instances/{id}", args.prefix);
    // Subscribers, over shared connections (100 streams per connection by
    // default: below HTTP/2 servers' usual stream limits).
    let connections = if args.connections == 0 {
        args.sidecars.div_ceil(100).max(1)
    } else {
        args.connections
    };
    let mut channels = Vec::with_capacity(connections);
    for _ in 0..connections {
        let channel = Endpoint::from_shared(args.control_plane.clone())?
            .connect()
            .await
            .context("connecting to the control plane")?;
        channels.push(channel);
    }
    let writes: Writes = Arc::default();
    let received = Arc::new(AtomicU64::new(0));
    let (ready_tx, mut ready_rx) = mpsc::channel(args.sidecars.max(1));
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut subs = Vec::with_capacity(args.sidecars);
    let mut subscribers_of = vec![0u64; args.services];
    let started = Instant::now();
    for k in 0..args.sidecars {
        let wanted = subscriptions(k, args);
        for &s in &wanted {
            subscribers_of[s] += 1;
        }
        subs.push(tokio::spawn(subscriber(
            channels[k % connections].clone(),
            wanted.into_iter().map(service).collect(),
            Arc::clone(&writes),
            ready_tx.clone(),
            Arc::clone(&received),
            stop_rx.clone(),
        )));
    }
    drop(ready_tx);
    for _ in 0..args.sidecars {
        tokio::time::timeout(Duration::from_secs(120), ready_rx.recv())
            .await
            .context("subscribers not ready within 120 s")?
            .context("a subscriber failed before its snapshot")?;
    }
    let connect_time = started.elapsed();
    let watchers = etcd_watchers(&args.etcd).await.ok();

    // Churn.
    let cpu_before = args.cp_pid.map(process_usage).transpose()?;
    let churn_start = Instant::now();
    let period = Duration::from_secs_f64(1.0 / args.churn);
    let mut ticker = tokio::time::interval(period);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut expected = 0u64;
    let mut seq = 0u64;
    while churn_start.elapsed() < Duration::from_secs_f64(args.duration) {
        ticker.tick().await;
        let s = (seq as usize) % args.services;
        let name = service(s);
        let id = format!("churn-{seq}");
        writes
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(seq, Instant::now());
        etcd.put(key(&name, &id), record(&name, &id, seq), None)
            .await?;
        expected += subscribers_of[s];
        if let Some(old) = seq.checked_sub(keep) {
            let old_service = service((old as usize) % args.services);
            etcd.delete(key(&old_service, &format!("churn-{old}")), None)
                .await?;
        }
        seq += 1;
    }
    let churn_time = churn_start.elapsed();
    tokio::time::sleep(Duration::from_secs_f64(args.grace)).await;
    let cpu_after = args.cp_pid.map(process_usage).transpose()?;

    stop_tx.send_replace(true);
    let mut hist = Histogram::<u64>::new_with_bounds(1, 600_000_000, 3)?;
    for sub in subs {
        match sub.await {
            Ok(Ok(h)) => hist.add(h)?,
            Ok(Err(e)) => eprintln!("a subscriber failed: {e:#}"),
            Err(e) => eprintln!("a subscriber panicked: {e}"),
        }
    }
    drop(channels);
    let (cpu_s, rss) = match (cpu_before, cpu_after) {
        (Some((b, _)), Some((a, rss))) => (Some(a - b), Some(rss)),
        _ => (None, None),
    };
    Ok(Propagation {
        connections,
        connect_time,
        watchers,
        churn_time,
        seq,
        received: received.load(Ordering::Relaxed),
        expected,
        cpu_s,
        rss,
        hist,
    })
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Arc::new(Args::parse());
    if args.registrations > 0 {
        return leases::run(&args).await;
    }
    if args.storm {
        return storm::run(&args).await;
    }
    if args.replicas {
        return replicas::run(&args).await;
    }
    if args.big {
        return big::run(args).await;
    }
    if args.per_sidecar > args.services {
        bail!("--per-sidecar is larger than --services");
    }
    let mut etcd = etcd_client::Client::connect([args.etcd.as_str()], None)
        .await
        .context("connecting to etcd")?;
    seed(&mut etcd, &args).await?;
    let p = propagate(&args, &mut etcd, args.services as u64, &|name, id, _| {
        record(name, id, 9000)
    })
    .await?;
    let Propagation {
        connections,
        connect_time,
        watchers,
        churn_time,
        seq,
        received,
        expected,
        cpu_s,
        rss,
        ..
    } = p;
    let ms = |q: f64| p.hist.value_at_quantile(q) as f64 / 1000.0;
    let hist = &p.hist;
    println!(
        "sidecars {} ({} connections), services {}, {} per sidecar, churn {}/s for {:.1}s: {} writes",
        args.sidecars,
        connections,
        args.services,
        args.per_sidecar,
        args.churn,
        churn_time.as_secs_f64(),
        seq
    );
    println!(
        "propagation p50 {:.1} ms, p90 {:.1} ms, p99 {:.1} ms, max {:.1} ms; deliveries {received} of {expected}",
        ms(0.5),
        ms(0.9),
        ms(0.99),
        hist.max() as f64 / 1000.0
    );
    if let (Some(cpu), Some(rss)) = (cpu_s, rss) {
        println!(
            "control plane: {:.2} s CPU over {:.1} s of churn ({:.1}%), RSS {:.1} MiB",
            cpu,
            churn_time.as_secs_f64() + args.grace,
            100.0 * cpu / (churn_time.as_secs_f64() + args.grace),
            rss as f64 / 1048576.0
        );
    }
    println!(
        "etcd watchers: {}; all subscribed in {:.2} s",
        watchers.map_or("?".to_owned(), |w| w.to_string()),
        connect_time.as_secs_f64()
    );
    println!(
        "{}",
        serde_json::json!({
            "sidecars": args.sidecars,
            "connections": connections,
            "services": args.services,
            "per_sidecar": args.per_sidecar,
            "churn_per_second": args.churn,
            "writes": seq,
            "p50_ms": ms(0.5),
            "p90_ms": ms(0.9),
            "p99_ms": ms(0.99),
            "max_ms": hist.max() as f64 / 1000.0,
            "deliveries": received,
            "expected": expected,
            "cp_cpu_seconds": cpu_s,
            "cp_window_seconds": churn_time.as_secs_f64() + args.grace,
            "cp_rss_bytes": rss,
            "etcd_watchers": watchers,
            "subscribe_seconds": connect_time.as_secs_f64(),
        })
    );
    Ok(())
}
