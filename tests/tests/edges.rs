//! Scenario: who calls whom. The callee's sidecar labels its inbound request
//! metrics with the caller: the service an mTLS caller's certificate names,
//! else the `weft-caller` header of a plaintext request, else `anonymous`;
//! a caller's sidecar labels its outbound ones with its own `[service]
//! name`. At most `[telemetry] max_callers` callers are shown, the others
//! are `other`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;

use anyhow::ensure;
use weft_tests::backend::Backend;
use weft_tests::client::Client;
use weft_tests::closed_port;
use weft_tests::config::{Bootstrap, DirService, policy_file};
use weft_tests::metrics::{Scrape, promtool_check};
use weft_tests::process::Proxy;
use weft_tests::tls::Pki;

/// billing's sidecar with `[tls]`, plaintext allowed, `[telemetry]`
/// `telemetry`.
async fn billing(pki: &Pki, app: SocketAddr, telemetry: &str) -> anyhow::Result<Proxy> {
    let mut bootstrap = Bootstrap::new()
        .app("billing", app)
        .app_policy("billing.toml")
        .tls("billing", None);
    if !telemetry.is_empty() {
        bootstrap = bootstrap.telemetry(telemetry);
    }
    let builder = Proxy::builder(bootstrap.render()).file(
        "billing.toml",
        policy_file("billing", "[inbound]\nallow_plaintext = true"),
    );
    pki.files(builder, "billing", &pki.issue("billing"))
        .start()
        .await
}

/// `weft_requests_total` of inbound 200s to billing from `caller`.
fn inbound_from(m: &Scrape, caller: &str) -> f64 {
    m.sum(
        "weft_requests_total",
        &[
            ("direction", "inbound"),
            ("caller", caller),
            ("service", "billing"),
            ("status_code", "200"),
        ],
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inbound_requests_are_labelled_with_their_caller() -> anyhow::Result<()> {
    let pki = Pki::new();
    let app = Backend::start("billing-app").await?;
    let billing = billing(&pki, app.addr(), "").await?;
    // web calls over mTLS; its app claims to be orders, which its
    // certificate overrules.
    let web = pki
        .files(
            Proxy::builder(
                Bootstrap::new()
                    .app("web", closed_port()?)
                    .app_health("enabled = false")
                    .tls("web", None)
                    .service(
                        DirService::new("billing")
                            .tls("mesh")
                            .endpoint(billing.inbound()),
                    )
                    .render(),
            ),
            "web",
            &pki.issue("web"),
        )
        .start()
        .await?;
    let via_web = Client::host_header(web.outbound());
    for _ in 0..3 {
        via_web
            .get_with("http://billing/x", &[("weft-caller", "orders")])
            .await?
            .expect_status(200)?;
    }
    // Plaintext callers: the unverified header, else anonymous.
    let plain = Client::host_header(billing.inbound());
    for _ in 0..2 {
        plain
            .get_with("http://billing/x", &[("weft-caller", "batch")])
            .await?
            .expect_status(200)?;
    }
    plain.get("http://billing/x").await?.expect_status(200)?;

    let m = billing.admin_client().metrics().await?;
    ensure!(inbound_from(&m, "web") == 3.0, "{}", m.text);
    ensure!(inbound_from(&m, "batch") == 2.0, "{}", m.text);
    ensure!(inbound_from(&m, "anonymous") == 1.0, "{}", m.text);
    ensure!(inbound_from(&m, "orders") == 0.0, "{}", m.text);
    ensure!(
        m.sum(
            "weft_request_duration_seconds_count",
            &[("direction", "inbound"), ("caller", "web")]
        ) == 3.0,
        "{}",
        m.text
    );
    ensure!(m.value("weft_callers_folded_total", &[])? == 0.0);
    promtool_check(&m.text)?;

    // The caller's side of the edge: its own [service] name.
    let m = web.admin_client().metrics().await?;
    ensure!(
        m.sum(
            "weft_requests_total",
            &[
                ("direction", "outbound"),
                ("caller", "web"),
                ("service", "billing")
            ]
        ) == 3.0,
        "{}",
        m.text
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn callers_past_max_callers_are_other() -> anyhow::Result<()> {
    let pki = Pki::new();
    let app = Backend::start("billing-app").await?;
    let billing = billing(&pki, app.addr(), "max_callers = 2").await?;
    let plain = Client::host_header(billing.inbound());
    for caller in ["a", "b", "c", "a", "c", "d"] {
        plain
            .get_with("http://billing/x", &[("weft-caller", caller)])
            .await?
            .expect_status(200)?;
    }
    // Refusals carry the caller too: an absolute-form request naming
    // another host is refused by billing's sidecar.
    let refused = Client::absolute(billing.inbound())
        .get_with("http://elsewhere/x", &[("weft-caller", "b")])
        .await?;
    refused.expect_status(403)?;
    ensure!(refused.header("weft-reason") == Some("foreign-authority"));
    let m = billing.admin_client().metrics().await?;
    ensure!(inbound_from(&m, "a") == 2.0, "{}", m.text);
    ensure!(inbound_from(&m, "b") == 1.0, "{}", m.text);
    ensure!(inbound_from(&m, "other") == 3.0, "{}", m.text);
    ensure!(inbound_from(&m, "c") + inbound_from(&m, "d") == 0.0);
    ensure!(
        m.value("weft_callers_folded_total", &[])? == 2.0,
        "{}",
        m.text
    );
    ensure!(
        m.sum(
            "weft_refusals_total",
            &[("caller", "b"), ("reason", "foreign-authority")]
        ) == 1.0,
        "{}",
        m.text
    );
    Ok(())
}
