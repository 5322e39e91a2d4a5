//! `weft-load`: an HTTP/1.1 load generator, closed loop or open loop.
//!
//! Opens `--connections` keep-alive connections, spread round-robin over the
//! `--target` addresses (repeat the flag for several), and sends `GET /` with
//! `Host: --host` for `--duration` seconds after `--warmup` seconds not counted.
//!
//! - Closed loop (default): every connection sends its requests back to back;
//!   the figure is the throughput at that concurrency.
//! - Open loop (`--rate R`): requests are scheduled at fixed intervals of 1/R s
//!   by a pacer thread, whatever the responses do, and any idle connection takes
//!   the next one. A request's latency runs from its *scheduled* send time, so
//!   time spent waiting for a connection because earlier responses were slow is
//!   counted (no coordinated omission). The pacer's own lateness (timer slack)
//!   is reported as `pacer_lag_*`.
//!
//! A failed request (connection error or non-2xx) counts as an error and the
//! connection is reopened; the run goes on. With `--interval S`, one JSON line
//! per interval (requests, errors, latency) is printed as it ends; the last
//! line is always the whole run's summary.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use bytes::Bytes;
use clap::Parser;
use hdrhistogram::Histogram;
use http::Request;
use http_body_util::{BodyExt, Empty};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::sync::mpsc;

#[derive(Debug, Parser)]
struct Args {
    /// Address to connect to (a backend directly, or a proxy's listener);
    /// repeat it to spread the connections over several.
    #[arg(long, required = true)]
    target: Vec<SocketAddr>,
    /// Host header (the logical service name when going through a proxy).
    #[arg(long, default_value = "bench")]
    host: String,
    #[arg(long, default_value_t = 16)]
    connections: usize,
    /// Open loop: requests per second, scheduled at fixed intervals.
    /// Without it, closed loop.
    #[arg(long)]
    rate: Option<f64>,
    /// Seconds to run (after the warm-up).
    #[arg(long, default_value_t = 10.0)]
    duration: f64,
    /// Seconds of warm-up not counted.
    #[arg(long, default_value_t = 1.0)]
    warmup: f64,
    /// Print one JSON line per this many seconds as well.
    #[arg(long)]
    interval: Option<f64>,
    /// Label for the JSON output.
    #[arg(long, default_value = "run")]
    label: String,
}

/// Latency histogram in microseconds, up to 60 s.
fn histogram() -> Histogram<u64> {
    #[allow(clippy::expect_used)]
    Histogram::new_with_bounds(1, 60_000_000, 3).expect("valid histogram bounds")
}

/// What the connections have recorded since the reporter last took it.
#[derive(Debug)]
struct Tally {
    hist: Histogram<u64>,
    ok: u64,
    errors: u64,
}

impl Tally {
    fn new() -> Self {
        Self {
            hist: histogram(),
            ok: 0,
            errors: 0,
        }
    }

    fn add(&mut self, other: &Tally) {
        // Both histograms have the same bounds: adding cannot fail.
        let _ = self.hist.add(&other.hist);
        self.ok += other.ok;
        self.errors += other.errors;
    }
}

/// One connection's tally, shared with the reporter.
type Shared = Arc<Mutex<Tally>>;

/// Every finished request, the warm-up's included (for CPU per request).
static FINISHED: AtomicU64 = AtomicU64::new(0);

fn record(tally: &Shared, latency: Duration, ok: bool) {
    let mut t = tally.lock().unwrap_or_else(|p| p.into_inner());
    if ok {
        t.ok += 1;
        let _ = t.hist.record((latency.as_micros() as u64).max(1));
    } else {
        t.errors += 1;
    }
}

/// A request not answered within this counts as an error (its connection is reopened).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

struct Conn {
    target: SocketAddr,
    send: Option<SendRequest<Empty<Bytes>>>,
}

impl Conn {
    async fn connect(target: SocketAddr) -> anyhow::Result<SendRequest<Empty<Bytes>>> {
        let stream = TcpStream::connect(target).await.context("connect")?;
        stream.set_nodelay(true)?;
        let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        tokio::spawn(conn);
        Ok(send)
    }

    /// One request; `Ok(true)` for a 2xx response read to its end.
    async fn request(&mut self, host: &str) -> bool {
        let attempt = async {
            let send = match &mut self.send {
                Some(send) => send,
                None => self.send.insert(Self::connect(self.target).await?),
            };
            send.ready().await?;
            let req = Request::get("/")
                .header("host", host)
                .body(Empty::<Bytes>::new())?;
            let rsp = send.send_request(req).await?;
            let success = rsp.status().is_success();
            rsp.into_body().collect().await?;
            anyhow::Ok(success)
        };
        match tokio::time::timeout(REQUEST_TIMEOUT, attempt).await {
            Ok(Ok(success)) => success,
            _ => {
                // Reopen on the next request; pause so a refused connect does
                // not spin.
                self.send = None;
                tokio::time::sleep(Duration::from_millis(10)).await;
                false
            }
        }
    }
}

async fn closed_loop(mut conn: Conn, host: Arc<str>, tally: Shared, warm: Instant, end: Instant) {
    loop {
        let t0 = Instant::now();
        if t0 >= end {
            break;
        }
        let ok = conn.request(&host).await;
        FINISHED.fetch_add(1, Ordering::Relaxed);
        if t0 >= warm {
            record(&tally, t0.elapsed(), ok);
        }
    }
}

type Schedule = Arc<tokio::sync::Mutex<mpsc::UnboundedReceiver<Instant>>>;

async fn open_loop(
    mut conn: Conn,
    host: Arc<str>,
    tally: Shared,
    warm: Instant,
    schedule: Schedule,
) {
    loop {
        // The idle connections queue for the next scheduled request.
        let Some(scheduled) = schedule.lock().await.recv().await else {
            break;
        };
        let ok = conn.request(&host).await;
        FINISHED.fetch_add(1, Ordering::Relaxed);
        if scheduled >= warm {
            record(&tally, scheduled.elapsed(), ok);
        }
    }
}

/// Sends the scheduled times `start + k / rate` until `end`, each when it comes;
/// returns the lateness of the sends (µs).
fn pacer(
    rate: f64,
    start: Instant,
    end: Instant,
    tx: mpsc::UnboundedSender<Instant>,
) -> Histogram<u64> {
    let mut lag = histogram();
    let period = Duration::from_secs_f64(1.0 / rate);
    let mut k: u32 = 0;
    loop {
        let at = start + period * k;
        if at >= end {
            break;
        }
        let now = Instant::now();
        if at > now {
            std::thread::sleep(at - now);
        }
        let _ = lag.record((at.elapsed().as_micros() as u64).max(1));
        if tx.send(at).is_err() {
            break;
        }
        k += 1;
    }
    lag
}

/// Percentiles reported for the latency plots, p50 to p99.99.
const PLOTTED_PERCENTILES: [f64; 9] = [50.0, 75.0, 90.0, 95.0, 99.0, 99.5, 99.9, 99.95, 99.99];

fn summary_json(label: &str, kind: &str, seconds: f64, tally: &Tally, extra: &str) -> String {
    let q = |p: f64| tally.hist.value_at_quantile(p) as f64 / 1000.0;
    let max = if tally.hist.is_empty() {
        0.0
    } else {
        tally.hist.max() as f64 / 1000.0
    };
    // The latency curve the bench plots (benches/plot.py): percentile -> ms.
    let percentiles = PLOTTED_PERCENTILES
        .iter()
        .map(|p| format!("\"{p}\":{:.3}", q(p / 100.0)))
        .collect::<Vec<_>>()
        .join(",");
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or_default();
    format!(
        "{{\"label\":\"{label}\",\"kind\":\"{kind}\",\"time\":{now:.1},\"seconds\":{seconds:.3},\"requests\":{},\"rps\":{:.1},\"errors\":{},\"p50_ms\":{:.3},\"p90_ms\":{:.3},\"p99_ms\":{:.3},\"p999_ms\":{:.3},\"p9999_ms\":{:.3},\"max_ms\":{max:.3},\"percentiles_ms\":{{{percentiles}}}{extra}}}",
        tally.ok,
        tally.ok as f64 / seconds,
        tally.errors,
        q(0.5),
        q(0.9),
        q(0.99),
        q(0.999),
        q(0.9999),
    )
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let host: Arc<str> = Arc::from(args.host.as_str());
    let start = Instant::now();
    let warm = start + Duration::from_secs_f64(args.warmup);
    let end = warm + Duration::from_secs_f64(args.duration);

    let schedule = args.rate.map(|rate| {
        let (tx, rx) = mpsc::unbounded_channel();
        let pacer = std::thread::spawn(move || pacer(rate, start, end, tx));
        (Arc::new(tokio::sync::Mutex::new(rx)), pacer)
    });

    let mut tallies = Vec::new();
    let mut tasks = Vec::new();
    for i in 0..args.connections {
        let target = args.target[i % args.target.len()];
        // Connect up front: a target that is not there fails the run at once.
        let send = Conn::connect(target)
            .await
            .with_context(|| format!("connecting to {target}"))?;
        let conn = Conn {
            target,
            send: Some(send),
        };
        let tally: Shared = Arc::new(Mutex::new(Tally::new()));
        tallies.push(Arc::clone(&tally));
        let host = Arc::clone(&host);
        tasks.push(match &schedule {
            Some((rx, _)) => tokio::spawn(open_loop(conn, host, tally, warm, Arc::clone(rx))),
            None => tokio::spawn(closed_loop(conn, host, tally, warm, end)),
        });
    }

    let take = |tallies: &[Shared]| {
        let mut sum = Tally::new();
        for t in tallies {
            let mut t = t.lock().unwrap_or_else(|p| p.into_inner());
            sum.add(&t);
            *t = Tally::new();
        }
        sum
    };
    let mut total = Tally::new();
    if let Some(every) = args.interval {
        let every = Duration::from_secs_f64(every);
        let mut at = warm;
        let mut n = 0u64;
        while at + every <= end {
            tokio::time::sleep_until((at + every).into()).await;
            at += every;
            n += 1;
            let part = take(&tallies);
            println!(
                "{}",
                summary_json(
                    &args.label,
                    "interval",
                    every.as_secs_f64(),
                    &part,
                    &format!(",\"interval\":{n}")
                )
            );
            total.add(&part);
        }
    }
    for t in tasks {
        t.await?;
    }
    total.add(&take(&tallies));

    let (kind, extra) = match schedule {
        Some((_, pacer)) => {
            let lag = pacer
                .join()
                .map_err(|_| anyhow::anyhow!("the pacer thread panicked"))?;
            let rate = args.rate.unwrap_or_default();
            (
                "open",
                format!(
                    ",\"rate\":{rate:.1},\"pacer_lag_p50_ms\":{:.3},\"pacer_lag_p99_ms\":{:.3}",
                    lag.value_at_quantile(0.5) as f64 / 1000.0,
                    lag.value_at_quantile(0.99) as f64 / 1000.0
                ),
            )
        }
        None => ("closed", String::new()),
    };
    let extra = format!(
        ",\"connections\":{},\"finished_all\":{}{extra}",
        args.connections,
        FINISHED.load(Ordering::Relaxed)
    );
    let q = |p: f64| total.hist.value_at_quantile(p) as f64 / 1000.0;
    println!(
        "# {}: {:.0} req/s ok, {} errors, latency ms p50 {:.3} p90 {:.3} p99 {:.3} p99.9 {:.3}",
        args.label,
        total.ok as f64 / args.duration,
        total.errors,
        q(0.5),
        q(0.9),
        q(0.99),
        q(0.999)
    );
    println!(
        "{}",
        summary_json(&args.label, kind, args.duration, &total, &extra)
    );
    Ok(())
}
