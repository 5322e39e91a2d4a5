//! Measurement: how long a policy takes from `weftctl apply` returning to
//! being applied by every running sidecar that calls the service.
//!
//! One etcd, one control plane on it, one instance of billing and five
//! callers' sidecars (each has called billing once, so each is subscribed to
//! it). Each round applies a policy that flips billing's `load_balancer`
//! between `round-robin` and `least-request`; five pollers (one per caller,
//! every 5 ms) read the caller's `/endpoints` until it shows the new balancer.
//! The figure is, per round, the time until the last caller applied it,
//! measured from the moment the `weftctl` process exited 0. The test prints
//! every round and the median and maximum, and fails if any round takes more
//! than two seconds.
//!
//! Run it on its own to read the figure:
//! `cargo nextest run -p weft-tests --test control_plane_propagation --no-capture`
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use anyhow::{Context, ensure};
use tokio::time::Instant;
use weft_tests::admin::Admin;
use weft_tests::mesh::Mesh;
use weft_tests::process::{Proxy, TempDir};

const CALLERS: usize = 5;
const ROUNDS: usize = 10;
/// What a round may take at most (the figure is expected in tens of ms).
const BOUND: Duration = Duration::from_secs(2);
const POLL: Duration = Duration::from_millis(5);

/// Polls a caller's `/endpoints` (through `admin`) until billing's balancer
/// is `want`; returns when it saw it, measured from `from`.
async fn applied(admin: Admin, want: &str, from: Instant) -> anyhow::Result<Duration> {
    let deadline = from + BOUND;
    loop {
        let endpoints = admin.endpoints().await?;
        if endpoints.service("billing")?["load_balancer"] == want {
            return Ok(from.elapsed());
        }
        ensure!(
            Instant::now() < deadline,
            "a caller did not apply {want} within {BOUND:?}"
        );
        tokio::time::sleep(POLL).await;
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let rank = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[rank.min(sorted.len() - 1)]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policy_propagation_to_five_callers() -> anyhow::Result<()> {
    // Each caller has called billing (so it is subscribed to it).
    let mesh = Mesh::builder()
        .etcd()
        .service("billing", 1)
        .callers(CALLERS)
        .build()
        .await?;
    let cp = mesh.control_plane();
    let admins: Vec<Admin> = mesh.callers.iter().map(Proxy::admin_client).collect();

    let dir = TempDir::new()?;
    let mut rounds = Vec::with_capacity(ROUNDS);
    let mut per_sidecar = Vec::with_capacity(ROUNDS * CALLERS);
    for round in 0..ROUNDS {
        let balancer = if round % 2 == 0 {
            "round-robin"
        } else {
            "least-request"
        };
        let file = dir.write(
            "billing.toml",
            &format!("service = \"billing\"\n\n[outbound]\nload_balancer = \"{balancer}\"\n"),
        )?;
        cp.weftctl_ok(&["apply", "--create", "-f", file.to_str().context("path")?])
            .await?;
        let returned = Instant::now();
        let mut pollers = Vec::with_capacity(CALLERS);
        for admin in &admins {
            pollers.push(tokio::spawn(applied(admin.clone(), balancer, returned)));
        }
        let mut slowest = Duration::ZERO;
        for poller in pollers {
            let took = poller.await??;
            per_sidecar.push(took);
            slowest = slowest.max(took);
        }
        eprintln!(
            "round {round}: {balancer} applied by all {CALLERS} callers {slowest:?} after weftctl apply returned"
        );
        rounds.push(slowest);
    }
    rounds.sort();
    per_sidecar.sort();
    eprintln!(
        "policy propagation, weftctl apply returned -> all {CALLERS} callers applied ({ROUNDS} rounds, polled every {POLL:?}): \
         median {:?}, max {:?}; per sidecar: p50 {:?}, p90 {:?}, max {:?}",
        percentile(&rounds, 0.5),
        rounds[rounds.len() - 1],
        percentile(&per_sidecar, 0.5),
        percentile(&per_sidecar, 0.9),
        per_sidecar[per_sidecar.len() - 1],
    );
    Ok(())
}
