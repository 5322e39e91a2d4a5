//! The reconnect-storm case (`--storm`): N simulated sidecars lose their
//! control plane at once and reconnect.
//!
//! Each sidecar has its own HTTP/2 connection and one Subscribe stream (as a
//! real sidecar has), subscribed to `--per-sidecar` of `--services` services,
//! and reconnects as weft-proxy does: after a session that lasted
//! `HEALTHY_SESSION`, full-jitter exponential backoff from 100 ms doubling to
//! 10 s (`weft_discovery`'s `Backoff`, mirrored in [`Backoff`]). Once every
//! sidecar holds its snapshot, the bench writes `--ready-file`; the script
//! then kills the control plane (SIGKILL: every stream breaks at once) and
//! starts it again on the same address, writing the new pid to
//! `--cp-pid-file`. The bench reports:
//!
//! - the time from the first broken stream until every sidecar holds a
//!   snapshot from the new process at etcd's current revision (and the
//!   slowest sidecar's reconnect attempts);
//! - the new control plane's peak CPU (per 100 ms sample) and RSS, and its
//!   CPU time until the last sidecar was current;
//! - gRPC messages etcd received in that time;
//! - snapshots that went backwards (a revision lower than one the sidecar
//!   already had): must be 0.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, ensure};
use tokio::sync::{mpsc, watch};
use tonic::Streaming;
use tonic::transport::{Channel, Endpoint};
use weft_api::v1::control_plane_client::ControlPlaneClient;
use weft_api::v1::{SubscribeRequest, SubscribeResponse};

use crate::usage::{etcd_metrics, listen_overflows, process_usage, sample_sum};
use crate::{Args, service, subscriptions};

/// weft-proxy's reconnect backoff (`weft_discovery::control_plane::session`).
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(10);
pub(crate) const HEALTHY_SESSION: Duration = Duration::from_secs(5);
pub(crate) const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// How often the new control plane's CPU and RSS are sampled.
const SAMPLE: Duration = Duration::from_millis(100);

/// Full-jitter exponential backoff, as weft-proxy's; each sidecar draws
/// from its own generator (splitmix64, seeded by its index).
pub(crate) struct Backoff {
    attempt: u32,
    state: u64,
}

impl Backoff {
    pub(crate) fn new(seed: u64) -> Self {
        Self {
            attempt: 0,
            state: seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0xD1B5_4A32_D192_ED03,
        }
    }

    pub(crate) fn reset(&mut self) {
        self.attempt = 0;
    }

    pub(crate) fn next_delay(&mut self) -> Duration {
        let ceiling = BACKOFF_MIN
            .saturating_mul(2u32.saturating_pow(self.attempt.min(16)))
            .min(BACKOFF_MAX);
        self.attempt = self.attempt.saturating_add(1);
        // splitmix64
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        let fraction = (z >> 11) as f64 / (1u64 << 53) as f64;
        ceiling.mul_f64(fraction)
    }
}

/// What every sidecar shares with the main task.
#[derive(Default)]
struct Shared {
    /// Sidecars that hold a snapshot from their first session.
    subscribed: AtomicU64,
    /// Sessions that ended (streams broken).
    broken: AtomicU64,
    /// Sidecars current again: a snapshot from a later session at or past
    /// `target` revision.
    current_again: AtomicU64,
    /// Snapshots older than one the sidecar had.
    backwards: AtomicU64,
    /// The most connection attempts any sidecar needed to be current again.
    max_attempts: AtomicU32,
}

/// One simulated sidecar: subscribes, and reconnects whenever its session ends,
/// until `stop`.
async fn sidecar(
    k: usize,
    address: String,
    services: Vec<String>,
    shared: Arc<Shared>,
    target: watch::Receiver<i64>,
    mut stop: watch::Receiver<bool>,
) {
    let mut backoff = Backoff::new(k as u64);
    let mut last_revision = 0i64;
    let mut session = 0u32;
    let mut attempts_since_break = 0u32;
    let mut counted_current = false;
    loop {
        let started = Instant::now();
        attempts_since_break += 1;
        let run = run_session(
            &address,
            &services,
            &shared,
            &target,
            &mut last_revision,
            session,
            &mut counted_current,
            attempts_since_break,
        );
        let held_a_stream = tokio::select! {
            _ = stop.changed() => return,
            held = run => held,
        };
        if held_a_stream {
            shared.broken.fetch_add(1, Ordering::Relaxed);
            session += 1;
            attempts_since_break = 0;
        }
        if started.elapsed() >= HEALTHY_SESSION {
            backoff.reset();
        }
        let delay = backoff.next_delay();
        tokio::select! {
            _ = stop.changed() => return,
            () = tokio::time::sleep(delay) => {}
        }
    }
}

/// One connection and Subscribe stream; returns whether it got a snapshot
/// (and so counts as a session that broke) when it ends.
#[allow(clippy::too_many_arguments)]
async fn run_session(
    address: &str,
    services: &[String],
    shared: &Shared,
    target: &watch::Receiver<i64>,
    last_revision: &mut i64,
    session: u32,
    counted_current: &mut bool,
    attempts: u32,
) -> bool {
    // Held whole: the subscription lasts while `subscription` does.
    let Some(mut subscription) = subscribe(address, services).await else {
        return false;
    };
    let stream = &mut subscription.stream;
    let mut got = false;
    while let Ok(Some(msg)) = stream.message().await {
        if msg.version < *last_revision {
            shared.backwards.fetch_add(1, Ordering::Relaxed);
        }
        *last_revision = (*last_revision).max(msg.version);
        if !got {
            got = true;
            if session == 0 {
                shared.subscribed.fetch_add(1, Ordering::Relaxed);
            }
        }
        let target = *target.borrow();
        if session > 0 && !*counted_current && target > 0 && msg.version >= target {
            *counted_current = true;
            shared.current_again.fetch_add(1, Ordering::Relaxed);
            shared.max_attempts.fetch_max(attempts, Ordering::Relaxed);
        }
    }
    got
}

/// A Subscribe stream of its own to one replica, as a simulated sidecar
/// holds it; the subscription lasts while this is held.
pub(crate) struct Subscription {
    /// The connection (for the sidecar's Register stream).
    pub channel: Channel,
    pub stream: Streaming<SubscribeResponse>,
    /// The request side: dropping it ends the subscription.
    _requests: mpsc::Sender<SubscribeRequest>,
}

/// Connects to `address` (bounded by [`CONNECT_TIMEOUT`]) and subscribes to
/// `services`; `None` if either fails.
pub(crate) async fn subscribe(address: &str, services: &[String]) -> Option<Subscription> {
    let endpoint = Endpoint::from_shared(address.to_owned()).ok()?;
    let channel = tokio::time::timeout(
        CONNECT_TIMEOUT,
        endpoint.connect_timeout(CONNECT_TIMEOUT).connect(),
    )
    .await
    .ok()?
    .ok()?;
    let (tx, rx) = mpsc::channel(1);
    tx.send(SubscribeRequest {
        add: services.to_vec(),
        remove: vec![],
    })
    .await
    .ok()?;
    let requests =
        futures_util::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|m| (m, rx)) });
    let response = ControlPlaneClient::new(channel.clone())
        .subscribe(requests)
        .await
        .ok()?;
    Some(Subscription {
        channel,
        stream: response.into_inner(),
        _requests: tx,
    })
}

/// The pid in `path`, once the script wrote a new one.
fn read_pid(path: &std::path::Path) -> Option<u32> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// The sidecars this process simulates (all, or its shard's) and what
/// they share.
struct Local {
    shared: Arc<Shared>,
    count: u64,
    target: watch::Sender<i64>,
    stop: watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Local {
    /// Starts sidecars `k` of `0..--sidecars` with `k % of == index`.
    fn start(args: &Args, index: usize, of: usize) -> Self {
        let shared = Arc::new(Shared::default());
        let (target, target_rx) = watch::channel(0i64);
        let (stop, stop_rx) = watch::channel(false);
        let mut tasks = Vec::new();
        for k in (0..args.sidecars).filter(|k| k % of == index) {
            tasks.push(tokio::spawn(sidecar(
                k,
                args.control_plane.clone(),
                subscriptions(k, args).into_iter().map(service).collect(),
                Arc::clone(&shared),
                target_rx.clone(),
                stop_rx.clone(),
            )));
        }
        Self {
            shared,
            count: tasks.len() as u64,
            target,
            stop,
            tasks,
        }
    }

    async fn wait_subscribed(&self) -> anyhow::Result<()> {
        let started = Instant::now();
        while self.shared.subscribed.load(Ordering::Relaxed) < self.count {
            ensure!(
                started.elapsed() < Duration::from_secs(300),
                "only {} of {} sidecars subscribed within 300 s",
                self.shared.subscribed.load(Ordering::Relaxed),
                self.count
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(())
    }

    async fn wait_broken(&self) -> anyhow::Result<()> {
        let waited = Instant::now();
        while self.shared.broken.load(Ordering::Relaxed) == 0 {
            ensure!(
                waited.elapsed() < Duration::from_secs(60),
                "no stream broke within 60 s of the ready file"
            );
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        Ok(())
    }

    fn all_current(&self) -> bool {
        self.shared.current_again.load(Ordering::Relaxed) >= self.count
    }

    async fn stop(self) {
        self.stop.send_replace(true);
        for task in self.tasks {
            let _ = task.await;
        }
    }
}

fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// A child process (`--shard i/K`): simulates its share of the sidecars and
/// talks to the parent in lines: JSON events on stdout (`subscribed`,
/// `broken` with the Unix time of its first broken stream, `current` with
/// the time its last sidecar was current again, its slowest sidecar's
/// attempts and its snapshots gone backwards, then `done`), the target
/// revision on stdin; stdin closed: stop.
async fn child(args: &Args, shard: &str) -> anyhow::Result<()> {
    use tokio::io::AsyncBufReadExt as _;
    let (index, of) = shard
        .split_once('/')
        .and_then(|(i, k)| Some((i.parse::<usize>().ok()?, k.parse::<usize>().ok()?)))
        .filter(|&(i, k)| i < k)
        .context("--shard wants i/K with i < K")?;
    let local = Local::start(args, index, of);
    local.wait_subscribed().await?;
    println!("{}", serde_json::json!({ "event": "subscribed" }));
    let mut stdin = tokio::io::BufReader::new(tokio::io::stdin()).lines();
    let target: i64 = stdin
        .next_line()
        .await?
        .context("no target revision from the parent")?
        .trim()
        .parse()?;
    local.target.send_replace(target);
    local.wait_broken().await?;
    println!(
        "{}",
        serde_json::json!({ "event": "broken", "at": unix_now() })
    );
    let deadline = Instant::now() + Duration::from_secs(120);
    while !local.all_current() {
        ensure!(
            Instant::now() < deadline,
            "shard {shard}: not all current within 120 s"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    println!(
        "{}",
        serde_json::json!({
            "event": "current",
            "at": unix_now(),
            "max_attempts": local.shared.max_attempts.load(Ordering::Relaxed),
        })
    );
    while stdin.next_line().await?.is_some() {}
    let backwards = local.shared.backwards.load(Ordering::Relaxed);
    local.stop().await;
    println!(
        "{}",
        serde_json::json!({ "event": "done", "backwards": backwards })
    );
    Ok(())
}

/// The parent's children and their events.
struct Children {
    procs: Vec<tokio::process::Child>,
    stdins: Vec<tokio::process::ChildStdin>,
    events: mpsc::UnboundedReceiver<(usize, serde_json::Value)>,
}

impl Children {
    fn spawn(k: usize) -> anyhow::Result<Self> {
        use tokio::io::AsyncBufReadExt as _;
        let exe = std::env::current_exe()?;
        let (tx, events) = mpsc::unbounded_channel();
        let (mut procs, mut stdins) = (Vec::new(), Vec::new());
        for i in 0..k {
            let mut child = tokio::process::Command::new(&exe)
                .args(std::env::args_os().skip(1))
                .arg("--shard")
                .arg(format!("{i}/{k}"))
                .stdin(std::process::Stdio::piped())
                .stdout(std::process::Stdio::piped())
                .kill_on_drop(true)
                .spawn()
                .context("starting a shard")?;
            stdins.push(child.stdin.take().context("shard stdin")?);
            let mut lines =
                tokio::io::BufReader::new(child.stdout.take().context("shard stdout")?).lines();
            let tx = tx.clone();
            tokio::spawn(async move {
                while let Ok(Some(line)) = lines.next_line().await {
                    if let Ok(v) = serde_json::from_str(&line) {
                        let _ = tx.send((i, v));
                    }
                }
            });
            procs.push(child);
        }
        Ok(Self {
            procs,
            stdins,
            events,
        })
    }

    /// Waits for `event` from every child; returns the events.
    async fn all(
        &mut self,
        event: &str,
        within: Duration,
    ) -> anyhow::Result<Vec<serde_json::Value>> {
        let mut got = Vec::new();
        let deadline = tokio::time::Instant::now() + within;
        while got.len() < self.procs.len() {
            let (_, v) = tokio::time::timeout_at(deadline, self.events.recv())
                .await
                .with_context(|| format!("not every shard reported {event} within {within:?}"))?
                .context("the shards' output ended")?;
            if v["event"] == event {
                got.push(v);
            }
        }
        Ok(got)
    }
}

pub async fn run(args: &Args) -> anyhow::Result<()> {
    if let Some(shard) = &args.shard {
        return child(args, shard).await;
    }
    let ready_file = args
        .ready_file
        .as_deref()
        .context("--storm needs --ready-file")?;
    let pid_file = args
        .cp_pid_file
        .as_deref()
        .context("--storm needs --cp-pid-file")?;
    let n = args.sidecars;
    let mut etcd = etcd_client::Client::connect([args.etcd.as_str()], None)
        .await
        .context("connecting to etcd")?;
    crate::seed(&mut etcd, args).await?;

    let started = Instant::now();
    let (local, mut children) = if args.shards > 1 {
        let mut children = Children::spawn(args.shards)?;
        children.all("subscribed", Duration::from_secs(300)).await?;
        (None, Some(children))
    } else {
        let local = Local::start(args, 0, 1);
        local.wait_subscribed().await?;
        (Some(local), None)
    };
    let subscribe_time = started.elapsed();
    let old_pid = read_pid(pid_file);
    // Nothing writes during the storm: etcd's revision now is the one every
    // sidecar must reach again.
    let revision = etcd
        .get("/", Some(etcd_client::GetOptions::new().with_count_only()))
        .await?
        .header()
        .map(|h| h.revision())
        .context("etcd response without a header")?;
    if let Some(local) = &local {
        local.target.send_replace(revision);
    }
    if let Some(children) = &mut children {
        use tokio::io::AsyncWriteExt as _;
        for stdin in &mut children.stdins {
            stdin.write_all(format!("{revision}\n").as_bytes()).await?;
            stdin.flush().await?;
        }
    }

    // Go: the script kills the control plane and starts another.
    std::fs::write(ready_file, b"ready\n")?;
    let mut first_broken_at = None;
    if let Some(local) = &local {
        local.wait_broken().await?;
    } else if let Some(children) = &mut children {
        let (_, v) = tokio::time::timeout(Duration::from_secs(60), children.events.recv())
            .await
            .context("no stream broke within 60 s of the ready file")?
            .context("the shards' output ended")?;
        ensure!(v["event"] == "broken", "unexpected shard event {v}");
        first_broken_at = v["at"].as_f64();
    }
    let broke = Instant::now();
    let overflows_before = listen_overflows();
    let etcd_before = etcd_metrics(&args.etcd).await?;

    // The new process: sample its CPU and RSS until every sidecar is current.
    let mut new_pid = None;
    let mut samples: Vec<(Instant, f64, u64)> = Vec::new();
    let deadline = Duration::from_secs(120);
    let (mut broken_at, mut current_at, mut max_attempts) = (Vec::new(), Vec::new(), 0u32);
    broken_at.extend(first_broken_at);
    loop {
        let done = match (&local, &mut children) {
            (Some(local), _) => local.all_current(),
            (None, Some(children)) => {
                while let Ok((_, v)) = children.events.try_recv() {
                    match v["event"].as_str() {
                        Some("broken") => broken_at.extend(v["at"].as_f64()),
                        Some("current") => {
                            current_at.extend(v["at"].as_f64());
                            max_attempts =
                                max_attempts.max(v["max_attempts"].as_u64().unwrap_or(0) as u32);
                        }
                        _ => {}
                    }
                }
                current_at.len() == args.shards
            }
            (None, None) => true,
        };
        if done {
            break;
        }
        ensure!(
            broke.elapsed() < deadline,
            "not every sidecar current again within {deadline:?}"
        );
        if new_pid.is_none() {
            new_pid = read_pid(pid_file).filter(|&p| Some(p) != old_pid);
        }
        if let Some(pid) = new_pid
            && let Ok((cpu, rss)) = process_usage(pid)
        {
            samples.push((Instant::now(), cpu, rss));
        }
        tokio::time::sleep(SAMPLE).await;
    }
    let mut all_current = broke.elapsed();
    if let Some(pid) = new_pid
        && let Ok((cpu, rss)) = process_usage(pid)
    {
        samples.push((Instant::now(), cpu, rss));
    }
    let etcd_after = etcd_metrics(&args.etcd).await?;
    let overflows = listen_overflows()
        .zip(overflows_before)
        .map(|(a, b)| a.saturating_sub(b));
    let (backwards, attempts) = if let Some(local) = local {
        let counts = (
            local.shared.backwards.load(Ordering::Relaxed),
            local.shared.max_attempts.load(Ordering::Relaxed),
        );
        local.stop().await;
        counts
    } else if let Some(mut children) = children {
        // From the children's own clocks: first broken stream to the last
        // sidecar current.
        let first = broken_at.iter().copied().fold(f64::INFINITY, f64::min);
        let last = current_at.iter().copied().fold(0.0, f64::max);
        all_current = Duration::from_secs_f64((last - first).max(0.0));
        children.stdins.clear();
        let done = children.all("done", Duration::from_secs(60)).await?;
        for mut proc in children.procs {
            let status = proc.wait().await?;
            ensure!(status.success(), "a shard failed: {status}");
        }
        let backwards = done
            .iter()
            .map(|v| v["backwards"].as_u64().unwrap_or(0))
            .sum();
        (backwards, max_attempts)
    } else {
        (0, 0)
    };

    let peak_cpu = samples
        .windows(2)
        .map(|w| 100.0 * (w[1].1 - w[0].1) / w[1].0.duration_since(w[0].0).as_secs_f64())
        .fold(0.0f64, f64::max);
    let peak_rss = samples.iter().map(|s| s.2).max().unwrap_or(0);
    let cpu_seconds = samples.last().map_or(0.0, |s| s.1);
    let etcd_messages = sample_sum(&etcd_after, "grpc_server_msg_received_total", &[])
        - sample_sum(&etcd_before, "grpc_server_msg_received_total", &[]);
    println!(
        "storm: {n} sidecars ({} process(es); subscribed in {:.1} s) lost their control plane; all current again {:.2} s after the first broken stream (slowest: {attempts} connection attempts)",
        args.shards.max(1),
        subscribe_time.as_secs_f64(),
        all_current.as_secs_f64()
    );
    println!(
        "new control plane: peak CPU {peak_cpu:.0}% (per {}ms), peak RSS {:.1} MiB, {cpu_seconds:.2} s CPU until all current; etcd received {etcd_messages:.0} gRPC messages; snapshots backwards: {backwards}; connections dropped by a full listen queue (ListenOverflows): {}",
        SAMPLE.as_millis(),
        peak_rss as f64 / 1048576.0,
        overflows.map_or("?".to_owned(), |o| o.to_string())
    );
    println!(
        "{}",
        serde_json::json!({
            "case": "storm",
            "sidecars": n,
            "processes": args.shards.max(1),
            "services": args.services,
            "per_sidecar": args.per_sidecar,
            "all_current_seconds": all_current.as_secs_f64(),
            "max_attempts": attempts,
            "cp_peak_cpu_percent": peak_cpu,
            "cp_peak_rss_bytes": peak_rss,
            "cp_cpu_seconds": cpu_seconds,
            "etcd_messages": etcd_messages,
            "backwards": backwards,
            "listen_overflows": overflows,
        })
    );
    ensure!(backwards == 0, "{backwards} snapshots went backwards");
    Ok(())
}
