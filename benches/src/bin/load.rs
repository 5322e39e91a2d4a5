//! `weft-load`: a closed-loop HTTP/1.1 load generator.
//!
//! Opens `--connections` keep-alive connections to `--target` and sends requests
//! back to back on each for `--duration`, with `Host: --host`. Reports requests/s
//! and latency percentiles (hdrhistogram), as text and as one JSON line.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::Context;
use bytes::Bytes;
use clap::Parser;
use hdrhistogram::Histogram;
use http::Request;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

#[derive(Debug, Parser)]
struct Args {
    /// Address to connect to (a backend directly, or a proxy's outbound listener).
    #[arg(long)]
    target: SocketAddr,
    /// Host header (the logical service name when going through a proxy).
    #[arg(long, default_value = "bench")]
    host: String,
    #[arg(long, default_value_t = 16)]
    connections: usize,
    /// Seconds to run.
    #[arg(long, default_value_t = 10.0)]
    duration: f64,
    /// Seconds of warm-up not counted.
    #[arg(long, default_value_t = 1.0)]
    warmup: f64,
    /// Label for the JSON output.
    #[arg(long, default_value = "run")]
    label: String,
}

async fn worker(
    args: &Args,
    start: Instant,
    warm: Instant,
    end: Instant,
) -> anyhow::Result<(u64, u64, Histogram<u64>)> {
    let stream = TcpStream::connect(args.target).await.context("connect")?;
    stream.set_nodelay(true)?;
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
    let (mut ok, mut errors) = (0u64, 0u64);
    let _ = start;
    loop {
        let t0 = Instant::now();
        if t0 >= end {
            break;
        }
        send.ready().await?;
        let req = Request::get("/")
            .header("host", &args.host)
            .body(Empty::<Bytes>::new())?;
        let rsp = send.send_request(req).await?;
        let success = rsp.status().is_success();
        rsp.into_body().collect().await?;
        if t0 >= warm {
            hist.record(t0.elapsed().as_micros().max(1) as u64)?;
            if success { ok += 1 } else { errors += 1 }
        }
    }
    Ok((ok, errors, hist))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = std::sync::Arc::new(Args::parse());
    let start = Instant::now();
    let warm = start + Duration::from_secs_f64(args.warmup);
    let end = warm + Duration::from_secs_f64(args.duration);
    let mut tasks = Vec::new();
    for _ in 0..args.connections {
        let args = args.clone();
        tasks.push(tokio::spawn(async move {
            worker(&args, start, warm, end).await
        }));
    }
    let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
    let (mut ok, mut errors) = (0, 0);
    for t in tasks {
        let (o, e, h) = t.await??;
        ok += o;
        errors += e;
        hist.add(h)?;
    }
    let rps = ok as f64 / args.duration;
    let q = |p: f64| hist.value_at_quantile(p) as f64 / 1000.0;
    println!(
        "{}: {:.0} req/s ok, {} errors, latency ms p50 {:.3} p90 {:.3} p99 {:.3} p99.9 {:.3}",
        args.label,
        rps,
        errors,
        q(0.5),
        q(0.9),
        q(0.99),
        q(0.999)
    );
    println!(
        "{{\"label\":\"{}\",\"rps\":{:.1},\"errors\":{},\"p50_ms\":{:.3},\"p90_ms\":{:.3},\"p99_ms\":{:.3},\"p999_ms\":{:.3}}}",
        args.label,
        rps,
        errors,
        q(0.5),
        q(0.9),
        q(0.99),
        q(0.999)
    );
    Ok(())
}
