//! Scenario: fault injection (`routes[].fault`) only where it is permitted.
//!
//! Through the control plane: a policy whose route aborts every call is
//! refused by a plain `weftctl apply` (and by the admin API itself, without
//! `?allow_faults=true`), naming the route; applied with `--allow-faults` it
//! reaches the caller's sidecar, which answers every call itself with the
//! status and `weft-reason: injected-fault`, counts it in
//! `weft_injected_faults_total`, and classifies the requests
//! `injected-fault` (out of the SLO's success/failure). From a local policy
//! file: the same fault does nothing unless the caller's bootstrap sets
//! `[directory] allow_faults = true`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use anyhow::ensure;
use bytes::Bytes;
use http::Method;
use weft_tests::backend::Backend;
use weft_tests::client::Client;
use weft_tests::config::{Bootstrap, DirService};
use weft_tests::control_plane::TOKEN;
use weft_tests::eventually;
use weft_tests::mesh::{Mesh, caller_with};
use weft_tests::process::{Proxy, TempDir};

const ABORT_ALL: &str = "service = \"billing\"\n\n[[routes]]\nname = \"all\"\nfault = { abort = 503, abort_percent = 100 }\n";

/// Requests `n` times; how many were answered with the injected fault.
async fn injected(client: &Client, n: usize) -> anyhow::Result<usize> {
    let mut count = 0;
    for _ in 0..n {
        let reply = client.get("http://billing/").await?;
        if reply.status == 503 && reply.header("weft-reason") == Some("injected-fault") {
            ensure!(
                reply.header("weft-limit") == Some("routes.all.fault"),
                "weft-limit {:?}",
                reply.header("weft-limit")
            );
            count += 1;
        } else {
            reply.expect_status(200)?;
        }
    }
    Ok(count)
}

async fn aborts_counted(proxy: &Proxy) -> anyhow::Result<f64> {
    let metrics = proxy.admin_client().metrics().await?;
    Ok(metrics.sum(
        "weft_injected_faults_total",
        &[("service", "billing"), ("route", "all"), ("kind", "abort")],
    ))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_control_plane_stores_faults_only_from_apply_with_allow_faults() -> anyhow::Result<()> {
    let mesh = Mesh::builder()
        .lease_ttl("2s")
        .service("billing", 1)
        .build()
        .await?;
    let (cp, caller, client) = (mesh.control_plane(), mesh.caller(), mesh.client());
    let dir = TempDir::new()?;
    let file = dir.write("billing.toml", ABORT_ALL)?;
    let file = file.to_str().unwrap();

    // Refused by weftctl, naming the route...
    let out = cp.weftctl(&["apply", "-f", file]).await?;
    ensure!(
        out.code() != 0,
        "applied without --allow-faults: {}",
        out.all()
    );
    ensure!(
        out.all().contains("routes.all.fault") && out.all().contains("--allow-faults"),
        "{}",
        out.all()
    );
    // ... and by the control plane itself (a client that skips the check).
    let admin = Client::host_header(cp.admin());
    let auth = format!("Bearer {TOKEN}");
    let refused = admin
        .send_with(
            Method::PUT.as_str(),
            &format!("http://{}/v1/services/billing/policy", cp.admin()),
            &[("authorization", auth.as_str())],
            Bytes::from_static(ABORT_ALL.as_bytes()),
        )
        .await?;
    ensure!(
        refused.status == 400 && refused.text().contains("routes.all.fault"),
        "PUT without allow_faults: {} {}",
        refused.status,
        refused.text()
    );
    // Nothing was stored: calls go through.
    ensure!(
        injected(&client, 5).await? == 0,
        "a refused policy injected faults"
    );

    let out = cp.weftctl(&["apply", "--allow-faults", "-f", file]).await?;
    out.ok()?;
    eventually(Duration::from_secs(10), || async {
        ensure!(injected(&client, 1).await? == 1, "no fault yet");
        Ok(())
    })
    .await?;
    let before = aborts_counted(caller).await?;
    ensure!(injected(&client, 10).await? == 10, "every call is aborted");
    let after = aborts_counted(caller).await?;
    ensure!(after - before == 10.0, "counted {before} -> {after}");
    let metrics = caller.admin_client().metrics().await?;
    let classified = metrics.sum(
        "weft_requests_total",
        &[("service", "billing"), ("classification", "injected-fault")],
    );
    ensure!(
        classified >= 11.0,
        "requests classified injected-fault: {classified}"
    );
    let endpoints = caller.admin_client().endpoints().await?;
    let counted = endpoints.counters("billing")?.refusals("injected-fault")?;
    ensure!(counted >= 11, "/endpoints counts {counted} injected faults");
    let failures = metrics.sum(
        "weft_requests_total",
        &[
            ("direction", "outbound"),
            ("service", "billing"),
            ("classification", "failure"),
        ],
    );
    ensure!(
        failures == 0.0,
        "injected aborts counted as failures: {failures}"
    );

    // Applying the same file again with the flag changes nothing.
    let out = cp.weftctl(&["apply", "--allow-faults", "-f", file]).await?;
    out.ok()?;
    ensure!(out.stdout.contains("unchanged"), "{}", out.all());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_local_policy_injects_faults_only_if_the_bootstrap_permits_it() -> anyhow::Result<()> {
    let backend = Backend::start("billing-1").await?;
    let body = ABORT_ALL.trim_start_matches("service = \"billing\"\n");

    let denied = caller_with(
        Bootstrap::new(),
        DirService::new("billing").endpoints([backend.addr()]),
        body,
    )
    .await?;
    let client = Client::absolute(denied.outbound());
    ensure!(
        injected(&client, 5).await? == 0,
        "a fault without permission"
    );
    ensure!(aborts_counted(&denied).await? == 0.0);

    let permitted = caller_with(
        Bootstrap::new().directory_key("allow_faults", "true"),
        DirService::new("billing").endpoints([backend.addr()]),
        body,
    )
    .await?;
    let client = Client::absolute(permitted.outbound());
    ensure!(injected(&client, 5).await? == 5, "every call is aborted");
    ensure!(aborts_counted(&permitted).await? == 5.0);
    Ok(())
}
