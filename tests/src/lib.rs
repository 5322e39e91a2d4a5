//! Black-box test harness for Weft.
//!
//! Everything here talks to a real `weft-proxy` process over real loopback
//! sockets, with every port chosen at run time (bind port 0). The harness is
//! split by concern:
//!
//! - [`process`]: spawns `weft-proxy` in a per-test temporary directory and
//!   guarantees the process is killed and reaped when the guard drops, also on
//!   panic; prints the proxy's log so failing tests show it.
//! - [`config`]: renders bootstrap and policy files from small builders so a
//!   scenario reads like the setup it needs.
//! - [`admin`]: typed helpers for the proxy's admin listener (`/ready`,
//!   `/config`, `/endpoints`, `/reload`).
//! - [`browser`]: headless Chromium loading a page: its DOM, or a screenshot.
//! - [`backend`]: an in-process HTTP/1.1 + h2c backend that reports what it saw
//!   (`/echo`, `/slow`, `/drip`, `/grpc`, `/ws`, `/pattern`, ...).
//! - [`dns`]: a tiny authoritative DNS server on UDP and TCP whose records a
//!   test can change at run time.
//! - [`mesh`]: one-call setups for the two sides of a policy: a caller's
//!   sidecar (outbound keys) and a service's own sidecar (inbound keys); and
//!   a whole mesh run by a control plane (`Mesh::builder()`).
//! - [`metrics`]: a `/metrics` scrape read by name and labels, and
//!   `promtool check metrics`.
//! - [`otlp`]: an OTLP/gRPC trace receiver that keeps the spans proxies export.
//! - [`client`]: HTTP clients that send through the proxy in absolute form,
//!   with a Host header, or as HTTP/2 prior knowledge, plus a raw TCP client
//!   for byte-exact requests and upgrades.
//! - [`tls`]: a mesh CA and service certificates (`weft-certs`, as `weftctl
//!   certs` makes them) for sidecars with `[tls]`, and a TLS client that shows
//!   what a listener negotiates and which certificate it presents.
//! - [`traffic`]: steady background traffic through a client, every outcome
//!   recorded and counted (errors, 5xx, statuses, backends, time windows).
//! - [`etcd`]: a real etcd, one node or a cluster on loopback, that a test can
//!   kill and restart member by member.
//! - [`control_plane`]: a `weft-control-plane` process (`--dev` or on etcd)
//!   with its token file, kill and restart on the same addresses, and a
//!   `weftctl` runner.
//! - [`grpc`]: the control plane's gRPC API driven by hand: a registration
//!   stream held open, or its refusal.
//! - [`chaos`]: the chaos run (`benches/chaos.sh`, the `weft-chaos` binary,
//!   and its short version in `tests/chaos.rs`): a whole mesh under traffic
//!   and random faults, judged against invariants at the end.
//!
//! Running: build the binaries into the same target directory, then run the
//! tests (`cargo build -p weft-proxy -p weft-control-plane --bins && cargo
//! nextest run -p weft-tests`, or plain `cargo test -p weft-tests`); the
//! control-plane scenarios need etcd (`scripts/setup`). `WEFT_PROXY_BIN`,
//! `WEFT_CONTROL_PLANE_BIN` and `WEFTCTL_BIN` point the tests at other
//! binaries; `WEFT_TEST_LOG` sets the proxies' `WEFT_LOG` (default
//! `info`). A proxy's stderr is printed when its guard drops, and the test
//! runner shows it for failing tests only.
//!
//! This file holds what every scenario needs: [`eventually`], which replaces
//! every "sleep and hope" with a polled condition and a bounded deadline,
//! [`paced`] and [`timed`] for load at a known rate and latencies measured
//! per request, and the deterministic byte [`pattern`] used to verify large
//! bodies.
#![allow(clippy::unwrap_used, clippy::expect_used)]

pub mod admin;
pub mod backend;
pub mod browser;
pub mod chaos;
pub mod client;
pub mod config;
pub mod control_plane;
pub mod dns;
pub mod etcd;
pub mod grpc;
pub mod mesh;
pub mod metrics;
pub mod otlp;
pub mod process;
pub mod tls;
pub mod traffic;

use std::collections::BTreeMap;
use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context as _, anyhow};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::client::{Client, Reply};

/// How often [`eventually`] re-checks its condition.
const POLL_INTERVAL: Duration = Duration::from_millis(20);

/// Polls `check` until it returns `Ok`, or fails once `timeout` has passed.
///
/// Each attempt is itself bounded by the time left, so a check that hangs
/// cannot stall the test. The error names the deadline and carries the last
/// failure, which is usually the most useful hint of what went wrong.
pub async fn eventually<T, F, Fut>(timeout: Duration, mut check: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = anyhow::Result<T>>,
{
    let deadline = Instant::now() + timeout;
    let mut last_error = anyhow!("the condition was never checked");
    loop {
        let now = Instant::now();
        if now >= deadline {
            return Err(last_error.context(format!("condition not met within {timeout:?}")));
        }
        match tokio::time::timeout(deadline - now, check()).await {
            Ok(Ok(value)) => return Ok(value),
            Ok(Err(error)) => last_error = error,
            Err(_) => last_error = anyhow!("the last check was still running at the deadline"),
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}

/// Awaits `future`, failing with `what` if it takes longer than `timeout`.
///
/// Scenarios wrap every wait that has no natural bound in this, so a hang
/// becomes a failure with a name instead of a stuck test.
pub async fn within<T>(
    timeout: Duration,
    what: &str,
    future: impl Future<Output = T>,
) -> anyhow::Result<T> {
    tokio::time::timeout(timeout, future)
        .await
        .map_err(|_| anyhow!("{what}: not done within {timeout:?}"))
}

/// Sends `count` sequential `GET uri` through `client`; each must answer 200.
pub async fn get_n(client: &Client, uri: &str, count: usize) -> anyhow::Result<Vec<Reply>> {
    let mut replies = Vec::with_capacity(count);
    for i in 0..count {
        let reply = client.get(uri).await?;
        reply
            .expect_status(200)
            .map_err(|e| e.context(format!("request {i} of {count} to {uri}")))?;
        replies.push(reply);
    }
    Ok(replies)
}

/// How many of `replies` each backend answered (by `x-backend`; `"?"` if absent).
pub fn tally<'a>(replies: impl IntoIterator<Item = &'a Reply>) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for reply in replies {
        let id = reply.backend().unwrap_or("?").to_owned();
        *counts.entry(id).or_default() += 1;
    }
    counts
}

/// How many of `replies` came back with each status code.
pub fn statuses<'a>(replies: impl IntoIterator<Item = &'a Reply>) -> BTreeMap<u16, usize> {
    let mut counts = BTreeMap::new();
    for reply in replies {
        *counts.entry(reply.status.as_u16()).or_default() += 1;
    }
    counts
}

/// Runs `future` and returns its output with how long it took.
pub async fn timed<T>(future: impl Future<Output = T>) -> (T, Duration) {
    let started = Instant::now();
    let output = future.await;
    (output, started.elapsed())
}

/// Awaits every task (each bounded by the client's request timeout, plus
/// slack), failing on the first error or panic.
pub async fn join_all<T>(tasks: Vec<JoinHandle<anyhow::Result<T>>>) -> anyhow::Result<Vec<T>> {
    let mut out = Vec::with_capacity(tasks.len());
    for (i, task) in tasks.into_iter().enumerate() {
        let joined = within(
            client::REQUEST_TIMEOUT + Duration::from_secs(5),
            "a spawned request",
            task,
        )
        .await?;
        out.push(joined.with_context(|| format!("task {i} panicked"))??);
    }
    Ok(out)
}

/// Starts `count` requests, one every `interval` whatever the answers take
/// (each on its own task, so a slow answer does not slow the load), and
/// waits for all of them. `send(i)` makes the i-th request.
pub async fn paced<F, Fut>(
    count: usize,
    interval: Duration,
    mut send: F,
) -> anyhow::Result<Vec<Reply>>
where
    F: FnMut(usize) -> Fut,
    Fut: Future<Output = anyhow::Result<Reply>> + Send + 'static,
{
    let mut ticks = tokio::time::interval(interval);
    let mut tasks = Vec::with_capacity(count);
    for i in 0..count {
        ticks.tick().await;
        tasks.push(tokio::spawn(send(i)));
    }
    join_all(tasks).await
}

/// A loopback address nothing listens on (bound, then released).
pub fn closed_port() -> anyhow::Result<SocketAddr> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(listener.local_addr()?)
}

/// The byte at `offset` of the deterministic test pattern.
///
/// The pattern has a period of 251 * 256 bytes, which is not a multiple of any
/// buffer size a proxy would use, so a dropped, duplicated or reordered chunk
/// shows up as a mismatch.
pub fn pattern_byte(offset: u64) -> u8 {
    let low = (offset % 251) as u8;
    let high = ((offset / 251) % 256) as u8;
    low ^ high
}

/// `len` bytes of the test pattern starting at `offset`.
pub fn pattern(offset: u64, len: usize) -> Vec<u8> {
    (0..len as u64).map(|i| pattern_byte(offset + i)).collect()
}

/// Checks that `chunk` is the test pattern at `offset`, naming the first bad byte.
pub fn check_pattern(offset: u64, chunk: &[u8]) -> anyhow::Result<()> {
    for (i, byte) in chunk.iter().enumerate() {
        let at = offset + i as u64;
        let want = pattern_byte(at);
        if *byte != want {
            anyhow::bail!("pattern mismatch at byte {at}: got {byte:#04x}, want {want:#04x}");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pattern_is_not_periodic_at_power_of_two_sizes() {
        for size in [1024_u64, 4096, 16384, 65536] {
            assert_ne!(pattern(0, 64), pattern(size, 64), "period at {size}");
        }
        assert!(check_pattern(1000, &pattern(1000, 5000)).is_ok());
        let mut bad = pattern(0, 10);
        bad[7] ^= 1;
        assert!(check_pattern(0, &bad).is_err());
    }

    #[tokio::test]
    async fn eventually_returns_first_success_and_fails_at_deadline() {
        let mut calls = 0;
        let value = eventually(Duration::from_secs(2), || {
            calls += 1;
            let n = calls;
            async move {
                if n < 3 {
                    anyhow::bail!("not yet")
                }
                Ok(n)
            }
        })
        .await
        .unwrap();
        assert_eq!(value, 3);

        let started = Instant::now();
        let error = eventually(Duration::from_millis(100), || async {
            anyhow::bail!("never") as anyhow::Result<()>
        })
        .await
        .unwrap_err();
        assert!(started.elapsed() < Duration::from_secs(1));
        assert!(format!("{error:#}").contains("never"), "{error:#}");
    }
}
