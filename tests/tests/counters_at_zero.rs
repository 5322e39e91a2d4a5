//! Scenario: a fresh sidecar and a fresh control plane export, before any
//! event, every counter series whose label values are known at start, at 0
//! (so that `increase()` in an alert sees the first event), and the expiry
//! of their mTLS certificate.
//!
//! - Sidecar (with `[tls]`, a `[service]` and a directory service whose
//!   policy has a retried route and a route without retries):
//!   `weft_config_reloads_total` for both results; then a rejected reload
//!   takes `rejected` from 0 to 1. `weft_tls_handshake_failures_total` for
//!   every direction and reason; `weft_ejections_total` for the service;
//!   `weft_retries_total` and `weft_retries_skipped_total` (every reason) for
//!   the retried routes only. `weft_tls_certificate_expiry_timestamp_seconds`
//!   is the certificate's notAfter, and follows a rotated certificate.
//! - Control plane (with mTLS): every operation and error of
//!   `weft_control_plane_store_errors_total`, every reason of
//!   `weft_control_plane_tls_handshake_failures_total`, and
//!   `weft_control_plane_tls_certificate_expiry_timestamp_seconds`. Without
//!   mTLS neither TLS metric has a series.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use anyhow::{Context as _, ensure};
use weft_tests::backend::Backend;
use weft_tests::config::{Bootstrap, DirService, policy_file};
use weft_tests::control_plane::ControlPlane;
use weft_tests::eventually;
use weft_tests::metrics::{Scrape, promtool_check};
use weft_tests::process::{Proxy, TempDir};
use weft_tests::tls::Pki;

const STORE_OPERATIONS: [&str; 9] = [
    "put",
    "get",
    "delete",
    "list",
    "watch",
    "grant_lease",
    "keep_alive",
    "revoke",
    "compact",
];
const STORE_ERRORS: [&str; 6] = [
    "unavailable",
    "compacted",
    "lease-not-found",
    "too-large",
    "rejected",
    "malformed",
];
const RETRY_SKIPPED: [&str; 3] = ["budget-exhausted", "not-replayable", "no-endpoint"];

fn not_after(cert_der: &[u8]) -> anyhow::Result<f64> {
    #[allow(clippy::cast_precision_loss)]
    weft_certs::not_after_of(cert_der)
        .map(|t| t as f64)
        .context("the issued certificate has no notAfter")
}

fn expect_zero(scrape: &Scrape, name: &str, labels: &[(&str, &str)]) -> anyhow::Result<()> {
    let value = scrape.value(name, labels)?;
    ensure!(value == 0.0, "{name} {labels:?} is {value}, not 0");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fresh_sidecar_exports_its_known_counters_at_zero() -> anyhow::Result<()> {
    let app = Backend::start("checkout-app").await?;
    let billing = Backend::start("billing-1").await?;
    let pki = Pki::new();
    let first = pki.issue("checkout");
    let bootstrap = Bootstrap::new()
        .app("checkout", app.addr())
        .tls("checkout", Some("200ms"))
        .service(
            DirService::new("billing")
                .endpoint(billing.addr())
                .policy("billing.toml"),
        );
    let builder = Proxy::builder(bootstrap.render()).file(
        "billing.toml",
        policy_file(
            "billing",
            "[[routes]]\nname = \"pay\"\nmatch = { path_prefix = \"/pay\" }\nretry = { attempts = 3 }\n\n\
             [[routes]]\nname = \"report\"\nmatch = { path_prefix = \"/report\" }\nretry = { attempts = 0 }\n",
        ),
    );
    let proxy = pki.files(builder, "checkout", &first).start().await?;
    let admin = proxy.admin_client();

    let scrape = admin.metrics().await?;
    promtool_check(&scrape.text)?;
    for result in ["applied", "rejected"] {
        expect_zero(&scrape, "weft_config_reloads_total", &[("result", result)])?;
    }
    for (direction, reasons) in [
        (
            "inbound",
            &["plaintext", "certificate", "timeout", "error"][..],
        ),
        ("outbound", &["certificate", "timeout", "error"][..]),
    ] {
        for reason in reasons {
            expect_zero(
                &scrape,
                "weft_tls_handshake_failures_total",
                &[("direction", direction), ("reason", reason)],
            )?;
        }
    }
    expect_zero(&scrape, "weft_ejections_total", &[("service", "billing")])?;
    // Requests that match no route take the service's retry defaults
    // (2 attempts): the empty route is retried too; `report` is not.
    for route in ["", "pay"] {
        let at = [("service", "billing"), ("route", route)];
        expect_zero(&scrape, "weft_retries_total", &at)?;
        for reason in RETRY_SKIPPED {
            expect_zero(
                &scrape,
                "weft_retries_skipped_total",
                &[("service", "billing"), ("route", route), ("reason", reason)],
            )?;
        }
    }
    ensure!(
        scrape
            .get(
                "weft_retries_total",
                &[("service", "billing"), ("route", "report")]
            )
            .is_none(),
        "a route without retries has retry counters:\n{}",
        scrape.text
    );
    let expiry = scrape.value("weft_tls_certificate_expiry_timestamp_seconds", &[])?;
    ensure!(
        expiry == not_after(first.cert_der())?,
        "expiry {expiry}, the certificate's notAfter {}",
        not_after(first.cert_der())?
    );

    // The first rejected reload: 0 -> 1, which `increase()` sees.
    proxy.write_config(&format!("bogus_reload_key = 1\n{}", bootstrap.render()))?;
    let reply = admin.reload().await?;
    ensure!(reply.status == 400, "reload answered {}", reply.status);
    let scrape = admin.metrics().await?;
    ensure!(scrape.value("weft_config_reloads_total", &[("result", "rejected")])? == 1.0);
    expect_zero(
        &scrape,
        "weft_config_reloads_total",
        &[("result", "applied")],
    )?;

    // A rotated certificate that expires later moves the gauge.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let second = pki.issue("checkout");
    ensure!(not_after(second.cert_der())? > not_after(first.cert_der())?);
    proxy.dir().write("checkout-key.pem", second.key_pem())?;
    proxy.dir().write("checkout.pem", second.cert_pem())?;
    eventually(Duration::from_secs(10), || async {
        let expiry = admin
            .metrics()
            .await?
            .value("weft_tls_certificate_expiry_timestamp_seconds", &[])?;
        ensure!(
            expiry == not_after(second.cert_der())?,
            "expiry still {expiry}"
        );
        Ok(())
    })
    .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sidecar_without_tls_has_no_expiry_gauge() -> anyhow::Result<()> {
    let app = Backend::start("app").await?;
    let proxy = Proxy::builder(Bootstrap::new().app("checkout", app.addr()).render())
        .start()
        .await?;
    let scrape = proxy.admin_client().metrics().await?;
    for result in ["applied", "rejected"] {
        expect_zero(&scrape, "weft_config_reloads_total", &[("result", result)])?;
    }
    ensure!(
        !scrape
            .text
            .contains("weft_tls_certificate_expiry_timestamp_seconds "),
        "{}",
        scrape.text
    );
    ensure!(
        scrape.sum("weft_tls_handshake_failures_total", &[]) == 0.0
            && !scrape.text.contains("weft_tls_handshake_failures_total{"),
        "{}",
        scrape.text
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fresh_control_plane_exports_its_known_counters_at_zero() -> anyhow::Result<()> {
    let pki = Pki::new();
    let files = TempDir::new()?;
    let issued = pki.issue_control_plane();
    let path = |name: &str, text: &str| anyhow::Ok(files.write(name, text)?.display().to_string());
    let cp = ControlPlane::dev()
        .arg("--tls-ca")
        .arg(&path("ca.pem", pki.ca_pem())?)
        .arg("--tls-cert")
        .arg(&path("control-plane.pem", issued.cert_pem())?)
        .arg("--tls-key")
        .arg(&path("control-plane-key.pem", issued.key_pem())?)
        .start()
        .await?;
    let scrape = weft_tests::admin::Admin::new(cp.admin()).metrics().await?;
    promtool_check(&scrape.text)?;
    for operation in STORE_OPERATIONS {
        for error in STORE_ERRORS {
            expect_zero(
                &scrape,
                "weft_control_plane_store_errors_total",
                &[("operation", operation), ("error", error)],
            )?;
        }
    }
    for reason in ["handshake", "timeout", "identity"] {
        expect_zero(
            &scrape,
            "weft_control_plane_tls_handshake_failures_total",
            &[("reason", reason)],
        )?;
    }
    let der = issued.cert_der();
    let expiry = scrape.value(
        "weft_control_plane_tls_certificate_expiry_timestamp_seconds",
        &[],
    )?;
    ensure!(
        expiry == not_after(der)?,
        "expiry {expiry}, the certificate's notAfter {}",
        not_after(der)?
    );

    // Without mTLS: no TLS series at all.
    let plain = ControlPlane::dev().start().await?;
    let scrape = weft_tests::admin::Admin::new(plain.admin())
        .metrics()
        .await?;
    expect_zero(
        &scrape,
        "weft_control_plane_store_errors_total",
        &[("operation", "watch"), ("error", "unavailable")],
    )?;
    ensure!(
        !scrape
            .text
            .contains("weft_control_plane_tls_certificate_expiry_timestamp_seconds ")
            && !scrape
                .text
                .contains("weft_control_plane_tls_handshake_failures_total{"),
        "{}",
        scrape.text
    );
    Ok(())
}
