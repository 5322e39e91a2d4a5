//! Scenario: a policy's service-side keys (`inbound.*`, routes' `rate_limit`,
//! `max_concurrency`, `queue`, `allow`) are enforced only by the service's own
//! sidecars. A standalone caller whose static directory sends `billing`'s
//! traffic to plaintext addresses (here: plain apps, no sidecar in front)
//! cannot tell whether anything enforces them: `weft-proxy check` warns (exit
//! 0), the sidecar logs a warning at start and when a reload changes the
//! policy (not on every reload, not per request), and `/endpoints` shows each
//! such key as "not enforced here". In a mesh whose instances are sidecars'
//! registrations there is no warning anywhere.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use anyhow::{Context as _, ensure};
use serde_json::Value;
use weft_tests::backend::Backend;
use weft_tests::client::{Client, Mode};
use weft_tests::config::{DirService, policy_file};
use weft_tests::control_plane::ControlPlane;
use weft_tests::eventually;
use weft_tests::mesh::{caller, mesh_caller, registered};
use weft_tests::process::{Proxy, TempDir, run_command};

const LIMITED: &str = "[inbound]\nmax_concurrency = 5\n\n[[routes]]\nname = \"all\"\nrate_limit = { per_second = 100, burst = 10 }\n";
/// What the log line says of a key set nothing may enforce.
const LOGGED: &str = "not enforced by this sidecar";

/// `/endpoints`' policy part for `service`.
async fn policy_part(proxy: &Proxy, service: &str) -> anyhow::Result<Value> {
    let endpoints = proxy.admin_client().endpoints().await?;
    Ok(endpoints.service(service)?["policy"].clone())
}

async fn check_config(proxy: &Proxy) -> anyhow::Result<weft_tests::process::Output> {
    let config = proxy
        .config_path()
        .to_str()
        .context("config path")?
        .to_owned();
    run_command(proxy.dir().path(), &["check", "--config", &config]).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_caller_of_plain_apps_is_told_service_side_keys_are_not_enforced() -> anyhow::Result<()> {
    let app = Backend::start("billing-app").await?;
    let proxy = caller(DirService::new("billing").endpoint(app.addr()), LIMITED).await?;

    // `check` passes, with one warning naming the file, the service and the keys.
    let out = check_config(&proxy).await?;
    ensure!(out.status.success(), "check: {out:?}");
    ensure!(out.stdout.contains("ok: "), "check: {out:?}");
    let warnings: Vec<&str> = out
        .stderr
        .lines()
        .filter(|l| l.starts_with("warning: "))
        .collect();
    ensure!(warnings.len() == 1, "check: {out:?}");
    for part in [
        "weft.toml",
        "billing.toml",
        "billing's own sidecars",
        "inbound.max_concurrency, routes.all.rate_limit are not enforced",
        "tls = \"none\"",
    ] {
        ensure!(warnings[0].contains(part), "no {part:?} in {}", warnings[0]);
    }

    // `/endpoints` marks both keys and carries the same warning.
    let policy = policy_part(&proxy, "billing").await?;
    ensure!(
        policy["service_side_keys"]["inbound.max_concurrency"] == "not enforced here"
            && policy["service_side_keys"]["routes.all.rate_limit"] == "not enforced here",
        "{policy}"
    );
    ensure!(
        policy["warning"]
            .as_str()
            .is_some_and(|w| w.contains("routes.all.rate_limit")),
        "{policy}"
    );

    // Logged once at start; every request still passes (nothing enforces
    // the limit: what the warning is about), and that logs nothing more.
    ensure!(
        proxy.logs().matches(LOGGED).count() == 1,
        "{}",
        proxy.logs()
    );
    let client = Client::new(proxy.outbound(), Mode::HostHeader);
    for _ in 0..30 {
        client.get("http://billing/").await?.expect_status(200)?;
    }
    // A reload that leaves the policy alone does not repeat it; one that
    // changes it does.
    proxy.admin_client().reload().await?.expect_status(200)?;
    ensure!(
        proxy.logs().matches(LOGGED).count() == 1,
        "{}",
        proxy.logs()
    );
    proxy.dir().write(
        "billing.toml",
        &policy_file("billing", &format!("{LIMITED}max_concurrency = 2\n")),
    )?;
    proxy.admin_client().reload().await?.expect_status(200)?;
    ensure!(
        proxy.logs().matches(LOGGED).count() == 2,
        "{}",
        proxy.logs()
    );
    let policy = policy_part(&proxy, "billing").await?;
    ensure!(
        policy["service_side_keys"]["routes.all.max_concurrency"] == "not enforced here",
        "{policy}"
    );

    // A policy with caller-side keys only: no warning.
    let dir = TempDir::new()?;
    dir.write(
        "billing.toml",
        &policy_file("billing", "[outbound]\ntimeout = \"1s\"\n"),
    )?;
    dir.write(
        "weft.toml",
        &format!(
            "[[directory.services]]\nname = \"billing\"\npolicy = \"billing.toml\"\nendpoints = [{{ address = \"{}\" }}]\n",
            app.addr()
        ),
    )?;
    let out = run_command(dir.path(), &["check", "--config", "weft.toml"]).await?;
    ensure!(
        out.status.success() && !out.stderr.contains("warning"),
        "{out:?}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mesh_caller_whose_instances_are_sidecars_has_no_warning() -> anyhow::Result<()> {
    let cp = ControlPlane::dev().start().await?;
    let app = Backend::start("billing-app").await?;
    let addresses = [cp.grpc_url()];
    let _billing = registered("billing", "billing-1", app.addr(), &addresses).await?;
    let dir = TempDir::new()?;
    let file = dir.write("billing.toml", &policy_file("billing", LIMITED))?;
    cp.weftctl_ok(&["apply", "--create", "-f", file.to_str().context("path")?])
        .await?;
    let proxy = mesh_caller(&addresses).await?;

    let client = Client::new(proxy.outbound(), Mode::HostHeader);
    let policy = eventually(Duration::from_secs(10), || async {
        client.get("http://billing/").await?.expect_status(200)?;
        let policy = policy_part(&proxy, "billing").await?;
        ensure!(
            policy["service_side_keys"]["routes.all.rate_limit"].is_string(),
            "{policy}"
        );
        Ok(policy)
    })
    .await?;
    ensure!(
        policy["service_side_keys"]["routes.all.rate_limit"]
            == "enforced by the service's own sidecars"
            && policy["warning"].is_null(),
        "{policy}"
    );
    ensure!(!proxy.logs().contains(LOGGED), "{}", proxy.logs());
    let out = check_config(&proxy).await?;
    ensure!(
        out.status.success() && !out.stderr.contains("warning"),
        "{out:?}"
    );
    Ok(())
}
