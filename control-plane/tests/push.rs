//! Black-box tests of the sidecar-facing gRPC API of a running
//! `weft-control-plane --dev`: registration with leases, and subscriptions that
//! get a full snapshot, then deltas.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::time::Duration;

use weft_api::v1::{Deregister, RegisterRequest, register_request};

use support::grpc::{instance, instances_of, put_policy, subscribe};
use support::start;
use weft_tests::control_plane::ControlPlane;
use weft_tests::grpc::{channel, register, try_register};
use weft_tests::process::Signal;

#[tokio::test(flavor = "multi_thread")]
async fn registration_subscription_deltas_and_deregistration() {
    let cp = tokio::task::spawn_blocking(|| start(ControlPlane::dev().lease_ttl("1s")))
        .await
        .unwrap();

    // A subscription to a service that does not exist yet: full snapshot, "removed".
    let mut sub = subscribe(&cp.grpc_url(), &["billing"]).await;
    let first = sub.next().await;
    assert!(first.full);
    assert_eq!(first.removed, ["billing"]);

    // Registration shows up as a delta with a higher version.
    let reg_a = register(&cp.grpc_url(), instance("billing", "a", 7001)).await;
    let msg = sub.until(|m| instances_of(m, "billing").is_some()).await;
    assert!(!msg.full);
    assert!(msg.version > first.version);
    assert_eq!(instances_of(&msg, "billing").unwrap(), ["a"]);
    assert_eq!(msg.services[0].live_instances, 1);

    // A second instance, then a policy applied through the admin API.
    let reg_b = register(&cp.grpc_url(), instance("billing", "b", 7002)).await;
    sub.until(|m| instances_of(m, "billing").is_some_and(|i| i.len() == 2))
        .await;
    let policy = "service = \"billing\"\n[outbound]\nload_balancer = \"least-request\"\n";
    let status = put_policy(&cp.admin_url(), "billing", policy).await;
    assert_eq!(status, 200);
    let msg = sub
        .until(|m| {
            m.services
                .iter()
                .any(|s| s.name == "billing" && s.policy_toml == policy)
        })
        .await;
    assert_eq!(
        instances_of(&msg, "billing").unwrap().len(),
        2,
        "each service state is complete"
    );

    // A late subscriber gets everything in one full snapshot.
    let mut late = subscribe(&cp.grpc_url(), &["billing"]).await;
    let full = late.next().await;
    assert!(full.full);
    assert_eq!(instances_of(&full, "billing").unwrap(), ["a", "b"]);

    // Graceful deregistration removes the instance at once.
    reg_a
        .send(RegisterRequest {
            msg: Some(register_request::Msg::Deregister(Deregister {})),
        })
        .await
        .unwrap();
    let started = std::time::Instant::now();
    sub.until(|m| instances_of(m, "billing").is_some_and(|i| i == ["b"]))
        .await;
    assert!(
        started.elapsed() < Duration::from_millis(900),
        "deregistration took {:?}",
        started.elapsed()
    );

    // A sidecar that vanishes (its stream just ends) disappears within the lease TTL.
    drop(reg_b);
    let started = std::time::Instant::now();
    sub.until(|m| instances_of(m, "billing").is_some_and(|i| i.is_empty()))
        .await;
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "expiry took {:?}",
        started.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn invalid_requests_are_refused() {
    let cp = tokio::task::spawn_blocking(|| start(ControlPlane::dev()))
        .await
        .unwrap();
    // A registration with a bad address.
    let mut bad = instance("billing", "a", 7001);
    bad.address = "not-an-address".into();
    let err = try_register(channel(&cp.grpc_url()).await, bad)
        .await
        .expect_err("a registration with a bad address was accepted");
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
    assert!(err.message().contains("address"), "{err:?}");
    // A subscription to an invalid name.
    let mut sub = subscribe(&cp.grpc_url(), &["Not A Name"]).await;
    let err = tokio::time::timeout(Duration::from_secs(5), sub.rx.message())
        .await
        .unwrap()
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
}

/// A `health` message rewrites the registration: subscribers see the
/// instance unhealthy (still listed) and the live count without it; an
/// instance that never reports (an older sidecar) is healthy.
#[tokio::test(flavor = "multi_thread")]
async fn health_reports_mark_instances_and_the_live_count() {
    use weft_api::v1::{Health, HealthReport};
    let cp = tokio::task::spawn_blocking(|| start(ControlPlane::dev().lease_ttl("2s")))
        .await
        .unwrap();
    let mut sub = subscribe(&cp.grpc_url(), &["billing"]).await;
    sub.next().await;
    let reg_a = register(&cp.grpc_url(), instance("billing", "a", 7001)).await;
    let _reg_b = register(&cp.grpc_url(), instance("billing", "b", 7002)).await;
    let healthy = sub
        .until(|m| instances_of(m, "billing").is_some_and(|i| i.len() == 2))
        .await;
    let state = &healthy.services[0];
    assert_eq!(state.live_instances, 2);
    assert!(
        state
            .instances
            .iter()
            .all(|i| i.health() != Health::Unhealthy)
    );

    let report = |health: Health| RegisterRequest {
        msg: Some(register_request::Msg::Health(HealthReport {
            health: health.into(),
        })),
    };
    reg_a.send(report(Health::Unhealthy)).await.unwrap();
    let msg = sub
        .until(|m| {
            m.services.iter().any(|s| {
                s.instances
                    .iter()
                    .any(|i| i.id == "a" && i.health() == Health::Unhealthy)
            })
        })
        .await;
    assert_eq!(instances_of(&msg, "billing").unwrap(), ["a", "b"]);
    assert_eq!(msg.services[0].live_instances, 1);
    let b = msg.services[0]
        .instances
        .iter()
        .find(|i| i.id == "b")
        .unwrap();
    assert_eq!(b.health(), Health::Healthy, "b never reported: healthy");

    reg_a.send(report(Health::Healthy)).await.unwrap();
    let msg = sub
        .until(|m| m.services.iter().any(|s| s.live_instances == 2))
        .await;
    let a = msg.services[0]
        .instances
        .iter()
        .find(|i| i.id == "a")
        .unwrap();
    assert_eq!(a.health(), Health::Healthy);
}

/// SIGTERM with open Register and Subscribe streams, and a lease-expiry
/// check pending for a sidecar that vanished (10 s away): every task stops
/// at once, the streams end and the process exits 0 well within the
/// shutdown grace period, with nothing left running.
#[tokio::test(flavor = "multi_thread")]
async fn sigterm_stops_every_task_with_streams_open() {
    let cp = tokio::task::spawn_blocking(|| start(ControlPlane::dev().lease_ttl("10s")))
        .await
        .unwrap();
    let mut sub = subscribe(&cp.grpc_url(), &["billing"]).await;
    sub.next().await;
    let _kept = register(&cp.grpc_url(), instance("billing", "a", 7001)).await;
    let vanished = register(&cp.grpc_url(), instance("billing", "b", 7002)).await;
    sub.until(|m| instances_of(m, "billing").is_some_and(|i| i.len() == 2))
        .await;
    drop(vanished);
    tokio::time::timeout(Duration::from_secs(5), async {
        while !cp.logs().contains("registration stream ended") {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the vanished sidecar's stream did not end");

    let started = std::time::Instant::now();
    cp.signal(Signal::Term).unwrap();
    let status = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            if let Some(status) = cp.try_status().unwrap() {
                return status;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the control plane did not exit");
    let took = started.elapsed();
    assert!(status.success(), "{status}\n{}", cp.logs());
    assert!(
        took < Duration::from_secs(5),
        "exit took {took:?}\n{}",
        cp.logs()
    );
    assert!(!cp.logs().contains("still running"), "{}", cp.logs());
    // The subscription ended with the process.
    let ended = tokio::time::timeout(Duration::from_secs(5), sub.rx.message())
        .await
        .expect("the subscription is still open");
    assert!(!matches!(ended, Ok(Some(_))), "{ended:?}");
}
