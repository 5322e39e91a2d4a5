//! etcd dies under a running control plane with a registered instance and a
//! subscribed sidecar: the control plane keeps serving its cached view (to
//! existing and new subscribers), reports not ready, keeps the registration
//! (longer than its lease TTL), and follows the store again when etcd is back,
//! with the registration still there and no subscriber ever told it was gone.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::time::Duration;

use support::grpc::{Subscription, instance, instances_of, subscribe};
use support::start;
use support::wait_for;
use weft_tests::control_plane::ControlPlane;
use weft_tests::etcd::EtcdServer;
use weft_tests::grpc::register;

const LEASE_TTL: Duration = Duration::from_secs(2);

/// Every push `sub` received until it stays quiet for `quiet`.
async fn drain(sub: &mut Subscription, quiet: Duration) -> Vec<weft_api::v1::SubscribeResponse> {
    let mut seen = Vec::new();
    while let Ok(Ok(Some(msg))) = tokio::time::timeout(quiet, sub.rx.message()).await {
        seen.push(msg);
    }
    seen
}

async fn wait_ready(cp: &ControlPlane, status: u16) -> anyhow::Result<()> {
    wait_for(
        &format!("/ready {status}"),
        Duration::from_secs(15),
        || async { Ok((cp.admin_status("/ready").await? == status).then_some(())) },
    )
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn an_etcd_outage_drops_no_registration_and_no_subscriber() -> anyhow::Result<()> {
    let mut etcd = EtcdServer::start().await?;
    let url = etcd.client_url().to_owned();
    let cp =
        tokio::task::spawn_blocking(move || start(ControlPlane::etcd(url).lease_ttl("2s"))).await?;
    let _registration = register(&cp.grpc_url(), instance("billing", "a", 7001)).await;
    let mut sub = subscribe(&cp.grpc_url(), &["billing"]).await;
    sub.until(|m| instances_of(m, "billing").is_some_and(|i| i == ["a"]))
        .await;
    wait_ready(&cp, 200).await?;

    etcd.kill()?;
    wait_ready(&cp, 503).await?;
    // The cached view is still served, to a new subscriber too.
    let mut during = subscribe(&cp.grpc_url(), &["billing"]).await;
    let full = during.next().await;
    assert!(full.full);
    assert_eq!(instances_of(&full, "billing").unwrap(), ["a"]);
    // Down for longer than the lease TTL.
    tokio::time::sleep(LEASE_TTL + Duration::from_secs(1)).await;
    assert!(
        cp.is_running(),
        "the control plane exited while etcd was down"
    );

    etcd.restart().await?;
    wait_ready(&cp, 200).await?;
    // Past another lease TTL with etcd back: the registration is still there.
    tokio::time::sleep(LEASE_TTL + Duration::from_secs(1)).await;
    let mut after = subscribe(&cp.grpc_url(), &["billing"]).await;
    let full = after.next().await;
    assert!(full.full);
    assert_eq!(instances_of(&full, "billing").unwrap(), ["a"]);

    // No subscriber was ever told the instance was gone.
    for (name, sub) in [("first", &mut sub), ("during the outage", &mut during)] {
        for msg in drain(sub, Duration::from_millis(500)).await {
            if let Some(ids) = instances_of(&msg, "billing") {
                assert_eq!(ids, ["a"], "the {name} subscriber saw {msg:?}");
            }
            assert!(msg.removed.is_empty(), "the {name} subscriber saw {msg:?}");
        }
    }
    Ok(())
}
