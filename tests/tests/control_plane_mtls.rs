//! Scenario: the control plane over mTLS.
//!
//! With `--tls-ca/--tls-cert/--tls-key`, sidecars reach the control plane at
//! `https://` addresses with their mesh certificate and check it is the
//! control plane of their trust domain; the control plane accepts a
//! registration for service X only from a sidecar whose certificate names X
//! (refused, logged, counted otherwise), and refuses plaintext and foreign-CA
//! clients in the handshake (counted).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use anyhow::ensure;
use weft_api::v1::Instance;
use weft_tests::admin::Admin;
use weft_tests::control_plane::ControlPlane;
use weft_tests::eventually;
use weft_tests::grpc::try_register;
use weft_tests::mesh::Mesh;
use weft_tests::process::TempDir;
use weft_tests::tls::{Pki, grpc_channel};

fn instance(service: &str, id: &str) -> Instance {
    Instance {
        service: service.into(),
        id: id.into(),
        address: "127.0.0.1:4143".into(),
        metadata: None,
        admin_address: String::new(),
        health: 0,
    }
}

async fn metric(cp: &ControlPlane, name: &str, labels: &[(&str, &str)]) -> anyhow::Result<f64> {
    Admin::new(cp.admin()).metrics().await?.value(name, labels)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sidecars_register_and_find_each_other_over_mtls() -> anyhow::Result<()> {
    // Handed out once the caller reaches billing through the control plane.
    let mesh = Mesh::builder()
        .control_plane_tls()
        .service("billing", 1)
        .callers_named(&["checkout"])
        .build()
        .await?;
    let reply = mesh.client().get("http://billing/hello").await?;
    reply.expect_status(200)?;
    ensure!(
        reply.backend() == Some("billing-1"),
        "{:?}",
        reply.backend()
    );
    for sidecar in [&mesh.instance("billing-1").sidecar, mesh.caller()] {
        let (state, address) =
            weft_tests::mesh::control_plane_state(&sidecar.admin_client()).await?;
        ensure!(state == "connected", "{state}");
        ensure!(
            address
                .as_deref()
                .is_some_and(|a| a.starts_with("https://")),
            "{address:?}"
        );
    }
    ensure!(
        metric(
            mesh.control_plane(),
            "weft_control_plane_registrations_total",
            &[]
        )
        .await?
            == 1.0
    );
    Ok(())
}

/// A control plane with mTLS on and nothing else in the mesh: its CA, and
/// the control plane.
async fn tls_control_plane() -> anyhow::Result<Mesh> {
    Mesh::builder().control_plane_tls().callers(0).build().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sidecar_cannot_register_an_instance_of_another_service() -> anyhow::Result<()> {
    let mesh = tls_control_plane().await?;
    let (pki, cp) = (mesh.pki(), mesh.control_plane());
    let orders = pki.issue("orders");
    let channel = grpc_channel(cp.grpc(), pki.ca_pem(), Some(&orders)).await?;
    let refused = try_register(channel.clone(), instance("billing", "billing-1"))
        .await
        .expect_err("orders registered an instance of billing");
    ensure!(
        refused.code() == tonic::Code::PermissionDenied,
        "{refused:?}"
    );
    ensure!(
        refused.message().contains("\"orders\"") && refused.message().contains("\"billing\""),
        "{}",
        refused.message()
    );
    ensure!(
        metric(
            cp,
            "weft_control_plane_registrations_rejected_total",
            &[("reason", "identity-mismatch")]
        )
        .await?
            == 1.0
    );
    ensure!(
        cp.logs().contains("registration refused"),
        "not logged:\n{}",
        cp.logs()
    );
    // The same certificate registers its own service.
    let _open = try_register(channel, instance("orders", "orders-1"))
        .await
        .map_err(|s| anyhow::anyhow!("orders could not register itself: {s:?}"))?;
    let out = cp.weftctl_ok(&["get", "instances", "orders"]).await?;
    ensure!(out.contains("orders-1"), "{out}");
    let out = cp.weftctl(&["get", "instances", "billing"]).await?;
    ensure!(!out.stdout.contains("billing-1"), "{}", out.stdout);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plaintext_and_foreign_clients_are_refused_in_the_handshake() -> anyhow::Result<()> {
    let mesh = tls_control_plane().await?;
    let (pki, cp) = (mesh.pki(), mesh.control_plane());

    // Plaintext gRPC to the TLS listener.
    let plain = tonic::transport::Endpoint::from_shared(cp.grpc_url())?
        .connect()
        .await;
    if let Ok(channel) = plain {
        ensure!(
            try_register(channel, instance("billing", "billing-1"))
                .await
                .is_err(),
            "a plaintext client registered"
        );
    }
    // A certificate from another CA.
    let other = Pki::new();
    let foreign = other.issue("billing");
    let refused = match grpc_channel(cp.grpc(), pki.ca_pem(), Some(&foreign)).await {
        Err(_) => true,
        Ok(channel) => try_register(channel, instance("billing", "billing-1"))
            .await
            .is_err(),
    };
    ensure!(refused, "a foreign-CA client registered");
    // No client certificate at all.
    let refused = match grpc_channel(cp.grpc(), pki.ca_pem(), None).await {
        Err(_) => true,
        Ok(channel) => try_register(channel, instance("billing", "billing-1"))
            .await
            .is_err(),
    };
    ensure!(refused, "a client without a certificate registered");
    eventually(Duration::from_secs(5), || async {
        let failures = metric(
            cp,
            "weft_control_plane_tls_handshake_failures_total",
            &[("reason", "handshake")],
        )
        .await?;
        ensure!(failures >= 3.0, "handshake failures: {failures}");
        Ok(())
    })
    .await?;
    ensure!(metric(cp, "weft_control_plane_registrations_total", &[]).await? == 0.0);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_control_plane_with_a_service_certificate_does_not_start() -> anyhow::Result<()> {
    let pki = Pki::new();
    let dir = TempDir::new()?;
    let billing = pki.issue("billing");
    let args = [
        "--tls-ca".to_owned(),
        dir.write("ca.pem", pki.ca_pem())?.display().to_string(),
        "--tls-cert".to_owned(),
        dir.write("billing.pem", billing.cert_pem())?
            .display()
            .to_string(),
        "--tls-key".to_owned(),
        dir.write("billing-key.pem", billing.key_pem())?
            .display()
            .to_string(),
    ];
    let mut builder = ControlPlane::dev();
    for arg in &args {
        builder = builder.arg(arg);
    }
    let cp = builder.spawn()?;
    let status = weft_tests::within(
        Duration::from_secs(10),
        "the control plane to exit",
        async {
            loop {
                if let Some(status) = cp.try_status()? {
                    return anyhow::Ok(status);
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        },
    )
    .await??;
    ensure!(!status.success(), "{status}");
    ensure!(
        cp.logs()
            .contains("the control plane's certificate must be spiffe://weft.local/control-plane"),
        "{}",
        cp.logs()
    );
    Ok(())
}
