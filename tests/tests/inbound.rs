//! Scenario: the inbound listener in front of the local app, header hygiene on
//! both listeners, and the admin listener's documents.
//!
//! A request to the inbound listener must reach `[service] app` with the Host
//! it was sent with, plus `x-forwarded-for` and `forwarded` naming the client.
//! Hop-by-hop headers (those named in `Connection`, `keep-alive`,
//! `proxy-connection`, a stray `upgrade`) must not be forwarded, on inbound or
//! outbound; end-to-end headers must be. The admin listener must answer
//! `/live`, `/ready`, `/config` and `/endpoints` as the contract describes.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;

use anyhow::{Context as _, ensure};
use weft_tests::backend::{Backend, SeenRequest};
use weft_tests::client::{Client, RawConn};
use weft_tests::config::{Bootstrap, DirService, policy};
use weft_tests::process::Proxy;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inbound_forwards_to_the_app_with_forwarding_headers() -> anyhow::Result<()> {
    let app = Backend::start("app").await?;
    let proxy = Proxy::start(Bootstrap::new().app("checkout", app.addr()).render()).await?;

    for client in [
        Client::host_header(proxy.inbound()),
        Client::h2(proxy.inbound()),
    ] {
        let mode = client.mode();
        let reply = client
            .post("http://checkout.internal:4143/echo", "payload")
            .await?;
        reply.expect_status(200)?;
        ensure!(
            reply.backend() == Some("app"),
            "{mode:?}: {:?}",
            reply.backend()
        );
        ensure!(reply.body == "payload", "{mode:?}: body {:?}", reply.body);
        ensure!(
            reply.header("x-seen-host") == Some("checkout.internal:4143"),
            "{mode:?}: the app saw Host {:?}",
            reply.header("x-seen-host")
        );
        ensure!(
            reply.header("x-seen-x-forwarded-for") == Some("127.0.0.1"),
            "{mode:?}: x-forwarded-for {:?}",
            reply.header("x-seen-x-forwarded-for")
        );
        let forwarded = reply
            .header("x-seen-forwarded")
            .with_context(|| format!("{mode:?}: the app saw no forwarded header"))?
            .replace('"', "")
            .to_ascii_lowercase();
        ensure!(
            forwarded.contains("for=127.0.0.1") && forwarded.contains("proto=http"),
            "{mode:?}: forwarded {forwarded:?}"
        );
    }
    ensure!(app.requests() == 2);
    Ok(())
}

/// Sends one HTTP/1.1 request with every kind of hop-by-hop header, raw so
/// that exactly these bytes reach the proxy, and returns what the backend saw.
async fn send_hop_by_hop(
    listener: SocketAddr,
    host: &str,
    backend: &Backend,
) -> anyhow::Result<SeenRequest> {
    let before = backend.requests();
    let mut conn = RawConn::connect(listener).await?;
    let request = format!(
        "GET /headers HTTP/1.1\r\n\
         Host: {host}\r\n\
         Connection: keep-alive, x-foo\r\n\
         X-Foo: named-in-connection\r\n\
         Keep-Alive: timeout=5\r\n\
         Proxy-Connection: keep-alive\r\n\
         Upgrade: h2c-not-really\r\n\
         X-End-To-End: kept\r\n\
         \r\n"
    );
    conn.write(request.as_bytes()).await?;
    let (head, _) = conn.read_response().await?;
    ensure!(head.status == 200, "status {} ({head:?})", head.status);
    ensure!(
        backend.requests() == before + 1,
        "the backend did not see exactly one request"
    );
    backend.last_seen().context("backend saw nothing")
}

fn expect_hop_by_hop_removed(seen: &SeenRequest, listener: &str) -> anyhow::Result<()> {
    for name in ["x-foo", "keep-alive", "proxy-connection", "upgrade"] {
        ensure!(
            !seen.headers.contains_key(name),
            "{listener}: hop-by-hop header {name:?} reached the backend: {:?}",
            seen.headers
        );
    }
    let connection = seen
        .headers
        .get_all("connection")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .collect::<Vec<_>>()
        .join(",");
    ensure!(
        !connection.to_ascii_lowercase().contains("x-foo"),
        "{listener}: the app's Connection header was forwarded: {connection:?}"
    );
    ensure!(
        seen.headers
            .get("x-end-to-end")
            .is_some_and(|v| v == "kept"),
        "{listener}: an end-to-end header was dropped: {:?}",
        seen.headers
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hop_by_hop_headers_are_not_forwarded() -> anyhow::Result<()> {
    let app = Backend::start("app").await?;
    let billing = Backend::start("billing").await?;
    let proxy = Proxy::start(
        Bootstrap::new()
            .app("checkout", app.addr())
            .service(DirService::new("billing").endpoint(billing.addr()))
            .render(),
    )
    .await?;

    let seen = send_hop_by_hop(proxy.inbound(), "checkout", &app).await?;
    expect_hop_by_hop_removed(&seen, "inbound")?;
    // Outbound, destination by Host header.
    let seen = send_hop_by_hop(proxy.outbound(), "billing", &billing).await?;
    expect_hop_by_hop_removed(&seen, "outbound")?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_reports_liveness_readiness_config_and_endpoints() -> anyhow::Result<()> {
    let a = Backend::start("a").await?;
    let b = Backend::start("b").await?;
    let c = Backend::start("c").await?;
    let bootstrap = Bootstrap::new()
        .service(
            DirService::new("billing")
                .policy("billing.toml")
                .endpoint_with(a.addr(), &[("zone", "z1"), ("version", "v1")])
                .endpoint_with(b.addr(), &[("zone", "z2"), ("version", "v2")]),
        )
        .service(DirService::new("orders").endpoint(c.addr()));
    let proxy = Proxy::builder(bootstrap.render())
        .file("billing.toml", policy("billing", "round-robin"))
        .start()
        .await?;
    let admin = proxy.admin_client();

    admin.get("/live").await?.expect_status(200)?;
    admin.get("/ready").await?.expect_status(200)?;

    let config = admin.json("/config").await?;
    ensure!(config["version"] == 1, "/config version: {config}");
    let path = config["path"].as_str().context("/config has no path")?;
    ensure!(
        path.ends_with("weft.toml")
            && std::path::Path::new(path).file_name() == proxy.config_path().file_name(),
        "/config path {path:?}, started with {}",
        proxy.config_path().display()
    );
    ensure!(
        config["config"].is_object(),
        "/config has no config object: {config}"
    );
    ensure!(
        config.to_string().contains(&a.addr().to_string()),
        "the effective config does not mention endpoint {}: {config}",
        a.addr()
    );

    let endpoints = admin.endpoints().await?;
    ensure!(
        endpoints.0["version"].is_u64(),
        "/endpoints version: {}",
        endpoints.0
    );
    let billing = endpoints.service("billing")?;
    ensure!(billing["source"] == "static", "billing source: {billing}");
    ensure!(
        billing["load_balancer"] == "round-robin",
        "billing balancer: {billing}"
    );
    endpoints.expect_active("billing", [a.addr(), b.addr()])?;
    let listed = billing["endpoints"]
        .as_array()
        .context("billing endpoints")?;
    for (backend, zone, version) in [(&a, "z1", "v1"), (&b, "z2", "v2")] {
        let endpoint = listed
            .iter()
            .find(|e| e["address"] == backend.addr().to_string().as_str())
            .with_context(|| format!("{} not listed: {billing}", backend.addr()))?;
        ensure!(endpoint["in_flight"] == 0, "idle endpoint: {endpoint}");
        ensure!(
            endpoint["metadata"]["zone"] == zone && endpoint["metadata"]["version"] == version,
            "metadata: {endpoint}"
        );
    }
    let orders = endpoints.service("orders")?;
    ensure!(
        orders["load_balancer"] == "p2c-ewma",
        "default balancer: {orders}"
    );
    endpoints.expect_active("orders", [c.addr()])?;
    Ok(())
}
