//! Test support shared by the control plane's black-box tests: a running
//! control plane (`cp`), gRPC and admin clients for it (`grpc`), a real etcd
//! on free loopback ports (`etcd`), certificates for TLS tests (`tls`) and
//! bounded polling.

#![allow(dead_code)] // each test binary uses its own part of this module

pub mod cp;
pub mod etcd;
pub mod grpc;
pub mod tls;

use std::future::Future;
use std::time::Duration;

use tokio::time::Instant;

/// Polls `check` every 50 ms until it yields `Some`, for at most `within`;
/// the error names `what` was being waited for.
pub async fn wait_for<T, F, Fut>(what: &str, within: Duration, mut check: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = anyhow::Result<Option<T>>>,
{
    let deadline = Instant::now() + within;
    loop {
        if let Some(value) = check().await? {
            return Ok(value);
        }
        if Instant::now() >= deadline {
            anyhow::bail!("timed out after {within:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
