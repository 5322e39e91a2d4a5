//! Test support shared by the control plane's black-box tests: gRPC and
//! admin clients for a running control plane (`grpc`), certificates for TLS
//! tests (`tls`), running the `weftctl` binary (`weftctl`) and bounded
//! polling. The control-plane process and etcd harnesses are weft-tests'
//! (`weft_tests::control_plane`, `weft_tests::etcd`), shared with the mesh
//! scenarios.

#![allow(dead_code)] // each test binary uses its own part of this module

pub mod grpc;
pub mod tls;
pub mod weftctl;

use std::future::Future;
use std::time::Duration;

use tokio::time::Instant;
use weft_tests::control_plane::{ControlPlane, ControlPlaneBuilder};

/// Starts a control plane from `builder`, blocking (for plain `#[test]`s
/// and `spawn_blocking`); panics with its log if it does not start.
#[allow(clippy::expect_used)]
pub fn start(builder: ControlPlaneBuilder) -> ControlPlane {
    builder
        .start_blocking()
        .expect("weft-control-plane did not start")
}

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
