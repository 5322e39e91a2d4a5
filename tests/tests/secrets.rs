//! Scenario: no secret appears in logs, `/config` output or error messages.
//!
//! The secrets of a mesh: the admin API's bearer tokens (the right one and a
//! wrong one a client tried), the etcd password, and private keys (the
//! control plane's and a sidecar's). Everything runs at debug level, over
//! real processes: a control plane on etcd with authentication and mTLS, a
//! sidecar connected to it, `weftctl` with a wrong and a right token, and a
//! control plane started with a wrong etcd password.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use anyhow::ensure;
use weft_tests::backend::Backend;
use weft_tests::config::Bootstrap;
use weft_tests::control_plane::{ControlPlane, TOKEN, run_blocking, weftctl_command};
use weft_tests::etcd::EtcdServer;
use weft_tests::process::{Proxy, TempDir};
use weft_tests::tls::Pki;
use weft_tests::{eventually, within};

const ETCD_PASSWORD: &str = "etcd-pa55word-do-not-log";
const WRONG_TOKEN: &str = "wrong-token-do-not-log-0123456789";
const WRONG_ETCD_PASSWORD: &str = "wrong-etcd-pa55word-do-not-log";

/// `text` (named `what`) shows none of `secrets`.
fn no_secret(what: &str, text: &str, secrets: &[&str]) -> anyhow::Result<()> {
    for secret in secrets {
        ensure!(
            !text.contains(secret),
            "{what} shows a secret ({secret:?}):\n{text}"
        );
    }
    Ok(())
}

/// A private key's body: its PEM minus the armour lines.
fn key_body(pem: &str) -> String {
    pem.lines().filter(|l| !l.starts_with("-----")).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_secret_reaches_a_log_an_answer_or_config() -> anyhow::Result<()> {
    let etcd = EtcdServer::start().await?;
    let mut admin = etcd.connect().await?;
    admin.user_add("root", ETCD_PASSWORD, None).await?;
    admin.user_grant_role("root", "root").await?;
    admin.auth_enable().await?;

    let pki = Pki::new();
    let files = TempDir::new()?;
    let password = files.write("etcd-password", &format!("{ETCD_PASSWORD}\n"))?;
    let wrong_password = files.write("wrong-etcd-password", WRONG_ETCD_PASSWORD)?;
    let wrong_token = files.write("wrong-token", WRONG_TOKEN)?;
    let cp_tls = pki.control_plane_args(&files)?;
    let cp_key = std::fs::read_to_string(files.path().join("control-plane-key.pem"))?;

    let mut builder = ControlPlane::etcd(etcd.client_url())
        .log_filter("debug")
        .arg("--etcd-user")
        .arg("root")
        .arg("--etcd-password-file")
        .arg(&password.display().to_string());
    for arg in &cp_tls {
        builder = builder.arg(arg);
    }
    let cp = builder.start().await?;

    // weftctl with a wrong token: 401, and its message names no token.
    let (admin_url, dir) = (cp.admin_url(), files.path().to_owned());
    let wrong = tokio::task::spawn_blocking(move || {
        let args = ["get", "services"];
        let mut command = weftctl_command(&admin_url, Some(&wrong_token))?;
        command.args(args);
        run_blocking(command, &args, &dir)
    })
    .await??;
    ensure!(!wrong.status.success(), "a wrong token was accepted");
    ensure!(wrong.stderr.contains("401"), "{}", wrong.stderr);
    no_secret(
        "weftctl's answer to a wrong token",
        &format!("{}{}", wrong.stdout, wrong.stderr),
        &[WRONG_TOKEN, TOKEN],
    )?;
    cp.weftctl_ok(&["get", "services"]).await?;

    // A sidecar with a certificate, connected over mTLS.
    let app = Backend::start("billing-1").await?;
    let issued = pki.issue("billing");
    let sidecar = pki
        .files(
            Proxy::builder(
                Bootstrap::new()
                    .tls("billing", None)
                    .app("billing", app.addr())
                    .control_plane([format!("https://{}", cp.grpc())])
                    .render(),
            ),
            "billing",
            &issued,
        )
        .log_filter("debug")
        .start()
        .await?;
    eventually(Duration::from_secs(10), || async {
        let out = cp.weftctl_ok(&["get", "instances", "billing"]).await?;
        ensure!(out.contains("127.0.0.1"), "{out}");
        Ok(())
    })
    .await?;
    let config = sidecar.admin_client().get("/config").await?.text();
    let endpoints = sidecar.admin_client().get("/endpoints").await?.text();
    let sidecar_key = key_body(issued.key_pem());
    let keys = ["PRIVATE KEY", sidecar_key.as_str()];
    no_secret("the sidecar's /config", &config, &keys)?;
    no_secret("the sidecar's /endpoints", &endpoints, &keys)?;

    // A control plane with a wrong etcd password stops with an error that
    // does not quote it.
    let refused = ControlPlane::etcd(etcd.client_url())
        .log_filter("debug")
        .arg("--etcd-user")
        .arg("root")
        .arg("--etcd-password-file")
        .arg(&wrong_password.display().to_string())
        .spawn()?;
    within(
        Duration::from_secs(15),
        "the refused control plane to exit",
        async {
            while refused.try_status()?.is_none() {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            anyhow::Ok(())
        },
    )
    .await??;
    let refused_log = refused.logs();
    ensure!(
        refused_log.contains("etcd"),
        "no etcd error logged:\n{refused_log}"
    );

    let cp_key = key_body(&cp_key);
    let secrets = [
        ETCD_PASSWORD,
        WRONG_ETCD_PASSWORD,
        TOKEN,
        WRONG_TOKEN,
        "PRIVATE KEY",
        cp_key.as_str(),
        sidecar_key.as_str(),
    ];
    no_secret("the control plane's log", &cp.logs(), &secrets)?;
    no_secret("the refused control plane's log", &refused_log, &secrets)?;
    no_secret("the sidecar's log", &sidecar.logs(), &secrets)?;
    Ok(())
}
