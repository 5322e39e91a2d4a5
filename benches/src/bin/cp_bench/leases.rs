//! The lease case (`--registrations N`): what keeping N registrations alive
//! costs etcd and the control plane.
//!
//! Registers N instances through the control plane's Register API (one
//! stream each, spread over connections of 100 streams, at most
//! `REGISTERING` registrations in flight), holds every stream open, lets the
//! keep-alives settle for `SETTLE`, then measures over `--duration` seconds,
//! from etcd's `/metrics` and `/proc`:
//!
//! - `LeaseKeepAlive` streams etcd set up per second
//!   (`grpc_server_started_total{grpc_method="LeaseKeepAlive"}`) and how many
//!   are open at the end (started minus handled);
//! - keep-alive requests per second
//!   (`grpc_server_msg_received_total{grpc_method="LeaseKeepAlive"}`), and
//!   every gRPC message etcd received per second, whatever the method;
//! - the CPU share of the control plane and of etcd, and the control plane's
//!   RSS;
//! - how many instance keys etcd holds at the start and the end of the window
//!   (fewer than N: leases expired before their refresh, and the control
//!   plane registered the instances again), and how many registrations the
//!   control plane refused at first (the bench tries each up to 5 times).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, ensure};
use tokio::sync::{Semaphore, mpsc, watch};
use tonic::transport::{Channel, Endpoint};
use weft_api::v1::control_plane_client::ControlPlaneClient;
use weft_api::v1::{Instance, RegisterRequest, register_request};

use crate::Args;
use crate::usage::{etcd_metrics, process_usage, sample_sum};

/// Registrations in flight at once while registering.
const REGISTERING: usize = 200;
/// Attempts per registration.
const ATTEMPTS: u32 = 5;
/// Pause between the last registration and the measurement.
const SETTLE: Duration = Duration::from_secs(3);

/// The counters read at each end of the measurement.
struct Reading {
    at: Instant,
    keepalive_started: f64,
    keepalive_handled: f64,
    keepalive_received: f64,
    received: f64,
    cp: Option<(f64, u64)>,
    etcd: Option<(f64, u64)>,
}

async fn read(args: &Args) -> anyhow::Result<Reading> {
    let metrics = etcd_metrics(&args.etcd).await?;
    let keepalive = [("grpc_method", "LeaseKeepAlive")];
    ensure!(
        metrics.contains("grpc_server_started_total"),
        "no grpc_server_started_total in etcd's /metrics"
    );
    Ok(Reading {
        at: Instant::now(),
        keepalive_started: sample_sum(&metrics, "grpc_server_started_total", &keepalive),
        keepalive_handled: sample_sum(&metrics, "grpc_server_handled_total", &keepalive),
        keepalive_received: sample_sum(&metrics, "grpc_server_msg_received_total", &keepalive),
        received: sample_sum(&metrics, "grpc_server_msg_received_total", &[]),
        cp: args.cp_pid.map(process_usage).transpose()?,
        etcd: args.etcd_pid.map(process_usage).transpose()?,
    })
}

/// Registers instance `k` (trying again, up to `ATTEMPTS` times, if the
/// control plane refuses it: its store may be overloaded) and holds its
/// stream open until `stop`.
async fn register(
    channel: Channel,
    k: usize,
    services: usize,
    permits: Arc<Semaphore>,
    ready: mpsc::Sender<()>,
    retries: Arc<AtomicU64>,
    mut stop: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let permit = permits.acquire_owned().await?;
    let mut attempt = 1;
    let (tx, mut responses) = loop {
        match open_registration(channel.clone(), k, services).await {
            Ok(open) => break open,
            Err(e) if attempt < ATTEMPTS => {
                retries.fetch_add(1, Ordering::Relaxed);
                report_retry(k, &e);
                attempt += 1;
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            Err(e) => return Err(e),
        }
    };
    drop(permit);
    ready.send(()).await?;
    drop(ready);
    // Hold the stream (and so the registration) until told to stop.
    tokio::select! {
        _ = stop.changed() => {}
        msg = responses.message() => {
            msg.context("register stream")?;
            anyhow::bail!("instance {k}: the control plane ended its register stream");
        }
    }
    drop(tx);
    Ok(())
}

/// One line per thousand instances that had to try again.
fn report_retry(k: usize, e: &anyhow::Error) {
    if k.is_multiple_of(1000) {
        eprintln!("registering instance {k} failed, trying again: {e:#}");
    }
}

type Open = (
    mpsc::Sender<RegisterRequest>,
    tonic::Streaming<weft_api::v1::RegisterResponse>,
);

/// Opens instance `k`'s Register stream and waits for its answer.
async fn open_registration(channel: Channel, k: usize, services: usize) -> anyhow::Result<Open> {
    let (tx, rx) = mpsc::channel(1);
    let octets = [(k >> 16) as u8, (k >> 8) as u8, k as u8];
    tx.send(RegisterRequest {
        msg: Some(register_request::Msg::Register(Instance {
            service: crate::service(k % services.max(1)),
            id: format!("reg-{k}"),
            address: format!("10.{}.{}.{}:8080", octets[0], octets[1], octets[2]),
            ..Instance::default()
        })),
    })
    .await?;
    let requests =
        futures_util::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|m| (m, rx)) });
    let mut responses = ControlPlaneClient::new(channel)
        .register(requests)
        .await
        .context("register")?
        .into_inner();
    responses
        .message()
        .await
        .context("register response")?
        .context("the register stream ended before its answer")?;
    Ok((tx, responses))
}

pub async fn run(args: &Args) -> anyhow::Result<()> {
    let n = args.registrations;
    let connections = if args.connections == 0 {
        n.div_ceil(100).max(1)
    } else {
        args.connections
    };
    let mut channels = Vec::with_capacity(connections);
    for _ in 0..connections {
        channels.push(
            Endpoint::from_shared(args.control_plane.clone())?
                .connect()
                .await
                .context("connecting to the control plane")?,
        );
    }
    let permits = Arc::new(Semaphore::new(REGISTERING));
    let retries = Arc::new(AtomicU64::new(0));
    let (ready_tx, mut ready_rx) = mpsc::channel(n.max(1));
    let (stop_tx, stop_rx) = watch::channel(false);
    let started = Instant::now();
    let mut tasks = Vec::with_capacity(n);
    for k in 0..n {
        tasks.push(tokio::spawn(register(
            channels[k % connections].clone(),
            k,
            args.services,
            Arc::clone(&permits),
            ready_tx.clone(),
            Arc::clone(&retries),
            stop_rx.clone(),
        )));
    }
    drop(ready_tx);
    for _ in 0..n {
        let ready = tokio::time::timeout(Duration::from_secs(600), ready_rx.recv())
            .await
            .context("registrations not done within 600 s")?;
        if ready.is_none() {
            for task in tasks.into_iter().filter(|t| t.is_finished()) {
                task.await??;
            }
            anyhow::bail!("a registration failed before its answer");
        }
    }
    let register_time = started.elapsed();
    tokio::time::sleep(SETTLE).await;

    let mut etcd = etcd_client::Client::connect([args.etcd.as_str()], None)
        .await
        .context("connecting to etcd")?;
    let mut instance_keys = async || -> anyhow::Result<i64> {
        Ok(etcd
            .get(
                format!("{}services/", args.prefix),
                Some(
                    etcd_client::GetOptions::new()
                        .with_prefix()
                        .with_count_only(),
                ),
            )
            .await?
            .count())
    };
    let held_before = instance_keys().await?;
    let before = read(args).await?;
    tokio::time::sleep(Duration::from_secs_f64(args.duration)).await;
    let after = read(args).await?;
    let held = instance_keys().await?;
    let window = after.at.duration_since(before.at).as_secs_f64();
    let live = tasks.iter().filter(|t| !t.is_finished()).count();
    stop_tx.send_replace(true);
    for task in tasks {
        if let Ok(Err(e)) = task.await {
            eprintln!("a registration failed: {e:#}");
        }
    }

    let rate = |a: f64, b: f64| (a - b) / window;
    let streams_started = rate(after.keepalive_started, before.keepalive_started);
    let keepalives = rate(after.keepalive_received, before.keepalive_received);
    let messages = rate(after.received, before.received);
    let open_streams = after.keepalive_started - after.keepalive_handled;
    let cpu = |a: Option<(f64, u64)>, b: Option<(f64, u64)>| match (a, b) {
        (Some((a, _)), Some((b, _))) => Some(100.0 * (a - b) / window),
        _ => None,
    };
    let cp_cpu = cpu(after.cp, before.cp);
    let etcd_cpu = cpu(after.etcd, before.etcd);
    let cp_rss = after.cp.map(|(_, rss)| rss);
    let show = |v: Option<f64>| v.map_or("?".to_owned(), |v| format!("{v:.1}"));
    println!(
        "registrations {n} ({connections} connections), registered in {:.1} s ({} refused and tried again); {live} streams live; instance keys in etcd: {held_before} at the start of the window, {held} at its end",
        register_time.as_secs_f64(),
        retries.load(Ordering::Relaxed),
    );
    println!(
        "over {window:.1} s: etcd LeaseKeepAlive streams started {streams_started:.1}/s, open at the end {open_streams:.0}; keep-alive requests {keepalives:.1}/s; gRPC messages received {messages:.1}/s"
    );
    println!(
        "CPU: control plane {}%, etcd {}%; control plane RSS {} MiB",
        show(cp_cpu),
        show(etcd_cpu),
        show(cp_rss.map(|r| r as f64 / 1048576.0))
    );
    println!(
        "{}",
        serde_json::json!({
            "case": "leases",
            "registrations": n,
            "connections": connections,
            "register_seconds": register_time.as_secs_f64(),
            "window_seconds": window,
            "keepalive_streams_started_per_second": streams_started,
            "keepalive_streams_open": open_streams,
            "keepalive_requests_per_second": keepalives,
            "etcd_messages_received_per_second": messages,
            "cp_cpu_percent": cp_cpu,
            "etcd_cpu_percent": etcd_cpu,
            "cp_rss_bytes": cp_rss,
            "register_retries": retries.load(Ordering::Relaxed),
            "instance_keys_start": held_before,
            "instance_keys": held,
            "live_streams": live,
        })
    );
    Ok(())
}
