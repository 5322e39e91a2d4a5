//! `weft-bench-backend`: a minimal, fast HTTP/1.1 + h2c server for load benches.
//! Answers every request with a 2-byte body. Prints its address on stdout.
//!
//! With `--slots N --service-time MS` it is a server of bounded capacity: at
//! most N requests are served at once, each taking MS milliseconds; more wait
//! inside, in arrival order, unbounded (a queue the caller cannot see). With
//! `--degrade-slots M` its capacity drops to M slots when it gets SIGUSR1
//! (the adaptive-concurrency bench's instance whose capacity halves mid-run).
//! With `--slow-every N --slow-ms M`, every N-th request it receives answers M
//! ms late (a slow tail, for the hedging bench).

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use clap::Parser;
use http::Response;
use http_body_util::Full;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

#[derive(Debug, Parser)]
struct Args {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: String,
    /// Requests served at once (the rest wait); unbounded without it.
    #[arg(long)]
    slots: Option<u32>,
    /// Milliseconds each request takes once served.
    #[arg(long, default_value_t = 0.0)]
    service_time: f64,
    /// Slots left after SIGUSR1 (at most `--slots`).
    #[arg(long)]
    degrade_slots: Option<u32>,
    /// Every this many requests (0: none), one answers late.
    #[arg(long, default_value_t = 0)]
    slow_every: u64,
    /// How late, in milliseconds.
    #[arg(long, default_value_t = 0)]
    slow_ms: u64,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let listener = TcpListener::bind(&args.listen).await?;
    println!("{}", listener.local_addr()?);
    let slots = args
        .slots
        .map(|n| Arc::new(Semaphore::new(usize::try_from(n).unwrap_or(usize::MAX))));
    if let (Some(sem), Some(to), Some(from)) = (&slots, args.degrade_slots, args.slots) {
        let sem = Arc::clone(sem);
        let mut signal =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::user_defined1())?;
        tokio::spawn(async move {
            signal.recv().await;
            // Take the slots away for good, as they free up.
            if let Ok(gone) = sem.acquire_many(from.saturating_sub(to)).await {
                gone.forget();
            }
            eprintln!("capacity now {to} slots");
        });
    }
    let service_time = Duration::from_secs_f64(args.service_time / 1000.0);
    let count = Arc::new(AtomicU64::new(0));
    let (every, late) = (args.slow_every, Duration::from_millis(args.slow_ms));
    loop {
        let (stream, _) = listener.accept().await?;
        let _ = stream.set_nodelay(true);
        let slots = slots.clone();
        let count = Arc::clone(&count);
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |_req| {
                let slots = slots.clone();
                let n = count.fetch_add(1, Ordering::Relaxed) + 1;
                async move {
                    if every > 0 && n.is_multiple_of(every) {
                        tokio::time::sleep(late).await;
                    }
                    let _slot = match &slots {
                        Some(sem) => sem.acquire().await.ok(),
                        None => None,
                    };
                    if !service_time.is_zero() {
                        tokio::time::sleep(service_time).await;
                    }
                    Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"ok"))))
                }
            });
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}
