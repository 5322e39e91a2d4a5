//! `weft-client-bench`: the latency the in-process client (`weft-client`)
//! adds, against one sidecar hop and against a direct call, in one run.
//!
//! Starts `weft-bench-backend` and one `weft-proxy` (from `--bin-dir`) whose
//! directory has service `bench` with the backend as its only endpoint, and
//! a `weft_client::Client` in this process from the same bootstrap file.
//! Then, in turns (direct, sidecar, client; `--rounds` times, so drift on
//! the machine hits all alike), it sends `GET /` over keep-alive
//! connections: `--requests` one after the other, then the same number from
//! `--concurrency` tasks at once. Each latency is one request's, to the end
//! of its body. Prints p50 and p99 per path (median of the rounds), what the
//! sidecar and the client add to direct, and their ratio.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use bytes::Bytes;
use clap::Parser;
use hdrhistogram::Histogram;
use http::Request;
use http_body_util::{BodyExt as _, Empty};
use hyper_util::client::legacy::Client as HttpClient;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use tokio::io::{AsyncBufReadExt as _, BufReader};
use tokio::process::{Child, Command};

#[derive(Debug, Parser)]
struct Args {
    /// Directory holding weft-proxy and weft-bench-backend (default: this
    /// binary's own).
    #[arg(long)]
    bin_dir: Option<PathBuf>,
    /// Requests per path and mode in each round.
    #[arg(long, default_value_t = 5000)]
    requests: usize,
    /// Tasks sending at once in the concurrent mode.
    #[arg(long, default_value_t = 16)]
    concurrency: usize,
    #[arg(long, default_value_t = 3)]
    rounds: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Path3 {
    Direct,
    Sidecar,
    Client,
}

impl Path3 {
    const ALL: [Self; 3] = [Self::Direct, Self::Sidecar, Self::Client];

    fn name(self) -> &'static str {
        match self {
            Self::Direct => "direct",
            Self::Sidecar => "one sidecar hop",
            Self::Client => "in-process client",
        }
    }
}

/// How one request is sent, per path.
#[derive(Clone)]
struct Callers {
    http: HttpClient<HttpConnector, Empty<Bytes>>,
    backend: SocketAddr,
    sidecar: SocketAddr,
    client: weft_client::Client,
}

impl Callers {
    async fn call(&self, path: Path3) -> anyhow::Result<()> {
        let status = match path {
            Path3::Direct | Path3::Sidecar => {
                let addr = if path == Path3::Direct {
                    self.backend
                } else {
                    self.sidecar
                };
                let req = Request::get(format!("http://{addr}/"))
                    .header(http::header::HOST, "bench")
                    .body(Empty::new())?;
                let rsp = self.http.request(req).await?;
                let status = rsp.status();
                rsp.into_body().collect().await?;
                status
            }
            Path3::Client => {
                let req = Request::get("http://bench/").body(Empty::<Bytes>::new())?;
                let rsp = self.client.request(req).await?;
                let status = rsp.status();
                rsp.into_body()
                    .collect()
                    .await
                    .map_err(|e| anyhow::anyhow!("{e}"))?;
                status
            }
        };
        if !status.is_success() {
            bail!("{}: status {status}", path.name());
        }
        Ok(())
    }
}

/// Latency histogram in microseconds, up to 60 s.
fn histogram() -> Histogram<u64> {
    #[allow(clippy::expect_used)]
    Histogram::new_with_bounds(1, 60_000_000, 3).expect("valid histogram bounds")
}

/// `count` requests over `tasks` tasks, each sending its share back to back.
async fn measure(
    callers: &Callers,
    path: Path3,
    count: usize,
    tasks: usize,
) -> anyhow::Result<Histogram<u64>> {
    let per_task = count.div_ceil(tasks);
    let mut running = Vec::new();
    for _ in 0..tasks {
        let callers = callers.clone();
        running.push(tokio::spawn(async move {
            let mut hist = histogram();
            for _ in 0..per_task {
                let start = Instant::now();
                callers.call(path).await?;
                let micros = u64::try_from(start.elapsed().as_micros()).unwrap_or(u64::MAX);
                hist.saturating_record(micros.max(1));
            }
            anyhow::Ok(hist)
        }));
    }
    let mut all = histogram();
    for task in running {
        all.add(task.await??)?;
    }
    Ok(all)
}

/// A child process's first stdout line (an address), waiting at most 10 s.
async fn first_line(child: &mut Child) -> anyhow::Result<String> {
    let stdout = child.stdout.take().context("no stdout")?;
    let mut line = String::new();
    tokio::time::timeout(
        Duration::from_secs(10),
        BufReader::new(stdout).read_line(&mut line),
    )
    .await
    .context("no address printed within 10 s")??;
    Ok(line.trim().to_owned())
}

/// Waits for `weft-proxy`'s bound file and returns its outbound address.
async fn outbound_of(bound_file: &Path) -> anyhow::Result<SocketAddr> {
    for _ in 0..200 {
        if let Ok(text) = std::fs::read_to_string(bound_file)
            && let Ok(json) = serde_json::from_str::<serde_json::Value>(&text)
            && let Some(addr) = json["outbound"].as_str()
        {
            return Ok(addr.parse()?);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    bail!("weft-proxy wrote no {} within 10 s", bound_file.display())
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values.get(values.len() / 2).copied().unwrap_or(f64::NAN)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let bin_dir = match args.bin_dir {
        Some(dir) => dir,
        None => std::env::current_exe()?
            .parent()
            .context("this binary's directory")?
            .to_path_buf(),
    };
    let work = std::env::temp_dir().join(format!("weft-client-bench-{}", std::process::id()));
    std::fs::create_dir_all(&work)?;
    let result = run(
        &bin_dir,
        &work,
        args.requests,
        args.concurrency,
        args.rounds,
    )
    .await;
    let _ = std::fs::remove_dir_all(&work);
    result
}

async fn run(
    bin_dir: &Path,
    work: &Path,
    requests: usize,
    concurrency: usize,
    rounds: usize,
) -> anyhow::Result<()> {
    let mut backend = Command::new(bin_dir.join("weft-bench-backend"))
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .context("starting weft-bench-backend")?;
    let backend_addr: SocketAddr = first_line(&mut backend).await?.parse()?;
    let config = work.join("weft.toml");
    std::fs::write(
        &config,
        format!(
            "[listen]\noutbound = \"127.0.0.1:0\"\ninbound = \"127.0.0.1:0\"\nadmin = \"127.0.0.1:0\"\n\n\
             [[directory.services]]\nname = \"bench\"\nendpoints = [{{ address = \"{backend_addr}\" }}]\n"
        ),
    )?;
    let bound_file = work.join("bound.json");
    let _proxy = Command::new(bin_dir.join("weft-proxy"))
        .args(["run", "--config"])
        .arg(&config)
        .arg("--bound-file")
        .arg(&bound_file)
        .env("WEFT_LOG", "warn")
        .kill_on_drop(true)
        .spawn()
        .context("starting weft-proxy")?;
    let sidecar = outbound_of(&bound_file).await?;
    let client = weft_client::Client::from_bootstrap(&config).await?;
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    let callers = Callers {
        http: HttpClient::builder(TokioExecutor::new())
            .pool_max_idle_per_host(concurrency.max(1))
            .build(connector),
        backend: backend_addr,
        sidecar,
        client: client.clone(),
    };
    // Warm-up: connections open, code paged in.
    for path in Path3::ALL {
        measure(&callers, path, 500, concurrency.max(1)).await?;
    }

    println!(
        "weft-client-bench: {requests} requests per path and mode, {rounds} rounds; load average {}",
        std::fs::read_to_string("/proc/loadavg")
            .unwrap_or_default()
            .split(' ')
            .take(3)
            .collect::<Vec<_>>()
            .join(" ")
    );
    for (mode, tasks) in [("sequential", 1), ("concurrent", concurrency.max(1))] {
        // [path][round] = (p50, p99) in µs.
        let mut figures = vec![(Vec::new(), Vec::new()); Path3::ALL.len()];
        for _ in 0..rounds {
            for (i, path) in Path3::ALL.into_iter().enumerate() {
                let hist = measure(&callers, path, requests, tasks).await?;
                figures[i].0.push(hist.value_at_quantile(0.5) as f64);
                figures[i].1.push(hist.value_at_quantile(0.99) as f64);
            }
        }
        let medians: Vec<(f64, f64)> = figures
            .into_iter()
            .map(|(p50, p99)| (median(p50), median(p99)))
            .collect();
        println!("\n{mode} ({tasks} task(s)), median of {rounds} rounds, µs:\n");
        println!("| path | p50 | p99 | p50 added to direct | p99 added to direct |");
        println!("|---|---|---|---|---|");
        let (d50, d99) = medians[0];
        for (path, (p50, p99)) in Path3::ALL.into_iter().zip(&medians) {
            println!(
                "| {} | {p50:.0} | {p99:.0} | {:.0} | {:.0} |",
                path.name(),
                p50 - d50,
                p99 - d99
            );
        }
        let (s50, s99) = medians[1];
        let (c50, c99) = medians[2];
        println!(
            "\n{mode}: client/direct p50 x{:.2}, p99 x{:.2}; client/sidecar p50 x{:.2}, p99 x{:.2}; \
             added by the client / added by the sidecar: p50 {:.2}, p99 {:.2}",
            c50 / d50,
            c99 / d99,
            c50 / s50,
            c99 / s99,
            (c50 - d50) / (s50 - d50),
            (c99 - d99) / (s99 - d99)
        );
    }
    client.shutdown().await;
    Ok(())
}
