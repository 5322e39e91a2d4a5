//! `weft-bench-backend`: a minimal, fast HTTP/1.1 + h2c server for load benches.
//! Answers every request with a 2-byte body. Prints its address on stdout.
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

#[derive(Debug, Parser)]
struct Args {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: String,
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
    let count = Arc::new(AtomicU64::new(0));
    let (every, late) = (args.slow_every, Duration::from_millis(args.slow_ms));
    loop {
        let (stream, _) = listener.accept().await?;
        let _ = stream.set_nodelay(true);
        let count = Arc::clone(&count);
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |_req| {
                let n = count.fetch_add(1, Ordering::Relaxed) + 1;
                async move {
                    if every > 0 && n.is_multiple_of(every) {
                        tokio::time::sleep(late).await;
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
