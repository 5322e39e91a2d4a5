//! etcd is not up yet when the control plane starts (its only endpoint
//! refuses connections): the control plane does not exit; it keeps trying
//! with backoff (logged), answers `/live` 200 and `/ready` 503 meanwhile, and
//! once etcd answers on that address it becomes ready and serves: a policy
//! applied, an instance registered and pushed to a subscriber.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::ensure;
use support::grpc::{instance, instances_of, subscribe};
use support::wait_for;
use weft_tests::control_plane::ControlPlane;
use weft_tests::etcd::EtcdServer;
use weft_tests::grpc::register;

/// A loopback address nothing listens on (bound, then released).
fn free_port() -> anyhow::Result<SocketAddr> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?)
}

const RETRY_LOG: &str = "etcd unreachable at start; not ready, trying again";

#[tokio::test(flavor = "multi_thread")]
async fn a_control_plane_started_before_etcd_waits_not_ready_then_serves() -> anyhow::Result<()> {
    // etcd's address, with nothing listening there yet.
    let mut etcd = EtcdServer::start().await?;
    etcd.kill()?;
    // The bound file is only written once the store answers: fixed ports.
    let cp = ControlPlane::etcd(etcd.client_url())
        .listen(free_port()?)
        .admin(free_port()?)
        .spawn()?;

    // Up, live, not ready, and trying again (at least twice) with backoff.
    wait_for("a second try", Duration::from_secs(15), || async {
        Ok((cp.logs().matches(RETRY_LOG).count() >= 2).then_some(()))
    })
    .await?;
    wait_for("/live", Duration::from_secs(15), || async {
        Ok(cp.admin_status("/live").await.ok().map(|_| ()))
    })
    .await?;
    ensure!(cp.is_running(), "exited:\n{}", cp.logs());
    ensure!(cp.admin_status("/live").await? == 200);
    ensure!(cp.admin_status("/ready").await? == 503);
    let refused = cp.weftctl(&["get", "services"]).await?;
    ensure!(!refused.status.success(), "{refused:?}");

    // etcd comes up on that address: ready, and serving.
    etcd.restart().await?;
    wait_for("/ready 200", Duration::from_secs(30), || async {
        Ok((cp.admin_status("/ready").await? == 200).then_some(()))
    })
    .await?;
    let file = cp.dir().path().join("billing.toml");
    std::fs::write(&file, "service = \"billing\"\n")?;
    cp.weftctl_ok(&["apply", "--create", "-f", file.to_str().unwrap()])
        .await?;
    let _registration = register(&cp.grpc_url(), instance("billing", "a", 7001)).await;
    let mut sub = subscribe(&cp.grpc_url(), &["billing"]).await;
    sub.until(|m| instances_of(m, "billing").is_some_and(|i| i == ["a"]))
        .await;
    Ok(())
}
