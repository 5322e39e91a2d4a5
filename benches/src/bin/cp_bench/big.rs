//! The big-directory case (`--big`): a directory of `--services` services
//! and `--instances` instances, with metadata, in a real etcd.
//!
//! 1. Writes the directory straight into etcd in the control plane's key
//!    format (`services/<name>/instances/<id>`, the JSON a registration
//!    writes: address, zone, version, weight, admin address, health), each
//!    instance bound to its own lease as a registration is (granted
//!    `GRANTING` at a time, TTL `LEASE_TTL`: long enough that nothing has to
//!    keep them alive during the run), the puts in transactions of
//!    `TXN_OPS` (etcd's default `--max-txn-ops`). Reports etcd's database
//!    size (`Status` dbSize and dbSizeInUse) and etcd's RSS.
//! 2. Writes `--ready-file`; the script writes the time to `--cp-start-file`
//!    and starts the control plane (its pid in `--cp-pid-file`, its
//!    addresses in `--bound-file`). The bench polls the admin `/ready` (200
//!    once the view has listed the store) and reports the time from the
//!    start to ready, and the control plane's RSS and CPU time then.
//! 3. One sidecar subscribes to `--snapshot-services` services: the size of
//!    the first message (the full snapshot, protobuf bytes as sent; the
//!    control plane does not compress) and the instances in it.
//! 4. Propagation, as the default case, to `--sidecars` subscribers of
//!    `--per-sidecar` services each while `--churn` instances per second are
//!    written (with metadata), each deleted again 1,000 writes later.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context as _, ensure};
use etcd_client::{PutOptions, Txn, TxnOp};
use prost::Message as _;
use tokio::sync::mpsc;
use tonic::transport::Endpoint;
use weft_api::v1::SubscribeRequest;
use weft_api::v1::control_plane_client::ControlPlaneClient;

use crate::usage::{process_usage, sample_sum};
use crate::{Args, Propagation, propagate, service};

/// Puts per transaction (etcd's default `--max-txn-ops`).
const TXN_OPS: usize = 128;
/// Lease grants and transactions in flight at once while loading.
const GRANTING: usize = 64;
/// The instances' lease TTL: longer than the run.
const LEASE_TTL: i64 = 3600;
/// Churned instances live for this many writes.
const CHURN_KEEP: u64 = 1000;

/// Instance `j` of service `s` as a registration stores it.
fn record(name: &str, id: &str, n: u64) -> String {
    let octets = [(n >> 16) as u8, (n >> 8) as u8, n as u8];
    serde_json::json!({
        "service": name,
        "id": id,
        "address": format!("10.{}.{}.{}:8080", octets[0], octets[1], octets[2]),
        "metadata": {
            "zone": format!("zone-{}", n % 3),
            "version": format!("v{}", 1 + n % 4),
            "weight": 100 + (n % 5) * 50,
            "labels": {},
        },
        "admin_address": format!("10.{}.{}.{}:9901", octets[0], octets[1], octets[2]),
        "health": "healthy",
    })
    .to_string()
}

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// GET `path` from `addr` over HTTP/1.0: the status code.
async fn http_status(addr: &str, path: &str) -> anyhow::Result<u16> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    s.write_all(format!("GET {path} HTTP/1.0\r\nhost: {addr}\r\n\r\n").as_bytes())
        .await?;
    let mut out = String::new();
    s.read_to_string(&mut out).await?;
    out.split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .context("no HTTP status")
}

/// Writes the directory; returns the seconds it took.
async fn load(args: &Args, etcd: &etcd_client::Client) -> anyhow::Result<f64> {
    let per_service = args.instances.div_ceil(args.services.max(1));
    let started = Instant::now();
    let all: Vec<(String, String, u64)> = (0..args.instances)
        .map(|n| {
            let (s, j) = (n / per_service, n % per_service);
            (service(s), format!("i-{j}"), n as u64)
        })
        .collect();
    let permits = Arc::new(tokio::sync::Semaphore::new(GRANTING));
    let mut tasks = Vec::new();
    for chunk in all.chunks(TXN_OPS) {
        let chunk = chunk.to_vec();
        let mut client = etcd.clone();
        let prefix = args.prefix.clone();
        let permit = Arc::clone(&permits).acquire_owned().await?;
        tasks.push(tokio::spawn(async move {
            let _permit = permit;
            let mut ops = Vec::with_capacity(chunk.len());
            for (name, id, n) in &chunk {
                let lease = client.lease_grant(LEASE_TTL, None).await?.id();
                ops.push(TxnOp::put(
                    format!("{prefix}services/{name}/instances/{id}"),
                    record(name, id, *n),
                    Some(PutOptions::new().with_lease(lease)),
                ));
            }
            client.txn(Txn::new().and_then(ops)).await?;
            anyhow::Ok(())
        }));
    }
    for task in tasks {
        task.await??;
    }
    Ok(started.elapsed().as_secs_f64())
}

pub async fn run(args: Arc<Args>) -> anyhow::Result<()> {
    let ready_file = args
        .ready_file
        .as_deref()
        .context("--big needs --ready-file")?;
    let bound_file = args
        .bound_file
        .as_deref()
        .context("--big needs --bound-file")?;
    let start_file = args
        .cp_start_file
        .as_deref()
        .context("--big needs --cp-start-file")?;
    let pid_file = args
        .cp_pid_file
        .as_deref()
        .context("--big needs --cp-pid-file")?;
    ensure!(
        args.snapshot_services <= args.services && args.per_sidecar <= args.services,
        "more services per sidecar than services"
    );
    let mut etcd = etcd_client::Client::connect([args.etcd.as_str()], None)
        .await
        .context("connecting to etcd")?;

    // 1. The directory.
    let load_seconds = load(&args, &etcd).await?;
    let status = etcd.status().await?;
    let (db_size, db_in_use) = (status.db_size(), status.raft_used_db_size());
    let keys = etcd
        .get(
            format!("{}services/", args.prefix),
            Some(
                etcd_client::GetOptions::new()
                    .with_prefix()
                    .with_count_only(),
            ),
        )
        .await?
        .count();
    let etcd_rss = args.etcd_pid.map(process_usage).transpose()?.map(|u| u.1);
    let leases = sample_sum(
        &crate::usage::etcd_metrics(&args.etcd).await?,
        "etcd_debugging_lease_granted_total",
        &[],
    );
    eprintln!(
        "loaded {keys} instance keys ({leases:.0} leases granted) in {load_seconds:.1} s; etcd dbSize {db_size}, in use {db_in_use}"
    );

    // 2. The control plane starts on the loaded directory.
    std::fs::write(ready_file, b"loaded\n")?;
    let deadline = Instant::now() + Duration::from_secs(300);
    let bound: serde_json::Value = loop {
        ensure!(Instant::now() < deadline, "no bound file within 300 s");
        if let Ok(text) = std::fs::read_to_string(bound_file)
            && let Ok(v) = serde_json::from_str(&text)
        {
            break v;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    let admin = bound["admin"]
        .as_str()
        .context("bound file: admin")?
        .to_owned();
    let listen = bound["listen"]
        .as_str()
        .context("bound file: listen")?
        .to_owned();
    while http_status(&admin, "/ready").await.ok() != Some(200) {
        ensure!(Instant::now() < deadline, "the view not ready within 300 s");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let ready_at = unix_now();
    let started_at: f64 = std::fs::read_to_string(start_file)?.trim().parse()?;
    let view_ready = ready_at - started_at;
    let pid: u32 = std::fs::read_to_string(pid_file)?.trim().parse()?;
    let (cp_cpu_ready, cp_rss_ready) = process_usage(pid)?;

    // 3. A sidecar's first snapshot.
    let address = format!("http://{listen}");
    let channel = Endpoint::from_shared(address.clone())?.connect().await?;
    let (tx, rx) = mpsc::channel(1);
    let wanted: Vec<String> = (0..args.snapshot_services)
        .map(|j| service((j * 7919) % args.services))
        .collect();
    tx.send(SubscribeRequest {
        add: wanted,
        remove: vec![],
    })
    .await?;
    let requests =
        futures_util::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|m| (m, rx)) });
    let asked = Instant::now();
    let mut stream = ControlPlaneClient::new(channel)
        .subscribe(requests)
        .await?
        .into_inner();
    let first = stream
        .message()
        .await?
        .context("the subscription ended before its snapshot")?;
    let snapshot_ms = asked.elapsed().as_secs_f64() * 1000.0;
    let snapshot_bytes = first.encoded_len();
    let snapshot_instances: usize = first.services.iter().map(|s| s.instances.len()).sum();
    drop((tx, stream));

    // 4. Propagation while instances churn.
    let mut with_address = (*args).clone();
    with_address.control_plane = address;
    with_address.cp_pid = Some(pid);
    let with_address = Arc::new(with_address);
    let p: Propagation = propagate(&with_address, &mut etcd, CHURN_KEEP, &|name, id, seq| {
        record(name, id, 1_000_000 + seq)
    })
    .await?;
    let ms = |q: f64| p.hist.value_at_quantile(q) as f64 / 1000.0;
    let window = p.churn_time.as_secs_f64() + args.grace;
    let writes_per_second = p.seq as f64 / p.churn_time.as_secs_f64();

    println!(
        "directory: {} services, {keys} instances ({} per service, with zone/version/weight), written in {load_seconds:.1} s; etcd dbSize {:.1} MiB (in use {:.1} MiB), etcd RSS {}",
        args.services,
        args.instances.div_ceil(args.services.max(1)),
        db_size as f64 / 1048576.0,
        db_in_use as f64 / 1048576.0,
        etcd_rss.map_or("?".to_owned(), |r| format!(
            "{:.1} MiB",
            r as f64 / 1048576.0
        ))
    );
    println!(
        "control plane: view ready {view_ready:.2} s after start ({cp_cpu_ready:.2} s CPU), RSS {:.1} MiB then",
        cp_rss_ready as f64 / 1048576.0
    );
    println!(
        "first snapshot for {} services: {snapshot_bytes} bytes, {snapshot_instances} instances, in {snapshot_ms:.1} ms",
        args.snapshot_services
    );
    println!(
        "propagation to {} sidecars ({} services each) at {writes_per_second:.1} writes/s: p50 {:.1} ms, p90 {:.1} ms, p99 {:.1} ms, max {:.1} ms; deliveries {} of {}; control plane CPU {:.1}%, RSS {:.1} MiB",
        args.sidecars,
        args.per_sidecar,
        ms(0.5),
        ms(0.9),
        ms(0.99),
        p.hist.max() as f64 / 1000.0,
        p.received,
        p.expected,
        p.cpu_s.map_or(f64::NAN, |c| 100.0 * c / window),
        p.rss.map_or(f64::NAN, |r| r as f64 / 1048576.0),
    );
    println!(
        "{}",
        serde_json::json!({
            "case": "big",
            "services": args.services,
            "instances": keys,
            "load_seconds": load_seconds,
            "etcd_db_size_bytes": db_size,
            "etcd_db_size_in_use_bytes": db_in_use,
            "etcd_rss_bytes": etcd_rss,
            "view_ready_seconds": view_ready,
            "cp_cpu_seconds_at_ready": cp_cpu_ready,
            "cp_rss_bytes_at_ready": cp_rss_ready,
            "snapshot_services": args.snapshot_services,
            "snapshot_bytes": snapshot_bytes,
            "snapshot_instances": snapshot_instances,
            "snapshot_ms": snapshot_ms,
            "sidecars": args.sidecars,
            "per_sidecar": args.per_sidecar,
            "churn_per_second": writes_per_second,
            "p50_ms": ms(0.5),
            "p90_ms": ms(0.9),
            "p99_ms": ms(0.99),
            "max_ms": p.hist.max() as f64 / 1000.0,
            "deliveries": p.received,
            "expected": p.expected,
            "cp_cpu_percent": p.cpu_s.map(|c| 100.0 * c / window),
            "cp_rss_bytes": p.rss,
            "subscribe_seconds": p.connect_time.as_secs_f64(),
            "etcd_watchers": p.watchers,
            "connections": p.connections,
        })
    );
    ensure!(
        snapshot_instances == args.snapshot_services * args.instances.div_ceil(args.services),
        "the first snapshot has {snapshot_instances} instances"
    );
    Ok(())
}
