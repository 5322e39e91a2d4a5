//! `weft-client-app`: a Rust service that calls `billing` through the
//! in-process client (`weft-client`) instead of a sidecar hop.
//!
//! It reads the same bootstrap file a sidecar would (`--config`), sends
//! `--requests` GETs to `--uri` one after the other, and prints each answer:
//! the status, who answered (`x-backend`, as the demo's apps say), and for a
//! request Weft refused, its `weft-reason` and `weft-limit`. The code that
//! reads the response is what it would be behind a sidecar.
//!
//! ```sh
//! cargo run -p weft-examples --bin weft-client-app -- --config examples/client/weft.toml
//! ```

use std::path::PathBuf;

use anyhow::Context as _;
use bytes::Bytes;
use clap::Parser;
use http::Request;
use http_body_util::{BodyExt as _, Empty};

#[derive(Debug, Parser)]
#[command(about = "Call a service through Weft's in-process client")]
struct Args {
    /// The bootstrap file (the format a sidecar reads).
    #[arg(long, default_value = "weft.toml")]
    config: PathBuf,
    /// What to call: the authority names the service.
    #[arg(long, default_value = "http://billing/invoices/42")]
    uri: String,
    /// How many requests to send, one after the other.
    #[arg(long, default_value_t = 5)]
    requests: usize,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let mesh = weft_client::Client::from_bootstrap(&args.config)
        .await
        .with_context(|| format!("starting the weft client from {}", args.config.display()))?;
    for _ in 0..args.requests {
        let req = Request::get(args.uri.as_str()).body(Empty::<Bytes>::new())?;
        let rsp = mesh.request(req).await?;
        let header = |name: &str| {
            rsp.headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("-")
                .to_owned()
        };
        let (status, backend) = (rsp.status(), header("x-backend"));
        let (reason, limit) = (header("weft-reason"), header("weft-limit"));
        let body = rsp
            .into_body()
            .collect()
            .await
            .map_err(|e| anyhow::anyhow!("reading the response: {e}"))?
            .to_bytes();
        let body = String::from_utf8_lossy(&body);
        let first_line = body.lines().next().unwrap_or_default();
        println!(
            "{status} backend={backend} weft-reason={reason} weft-limit={limit} body={first_line:?}"
        );
    }
    mesh.shutdown().await;
    Ok(())
}
