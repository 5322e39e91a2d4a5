//! Scenario: mTLS between sidecars (`[tls]`).
//!
//! Certificates come from a throwaway mesh CA made by the test with
//! `weft-certs`, the library behind `weftctl certs`. A caller's sidecar
//! reaches a callee's sidecar (`tls = "mesh"`) over TLS 1.3 with ALPN `h2`,
//! verifying the callee's identity; the callee's inbound listener accepts only
//! clients with a certificate from the mesh CA (plaintext only with
//! `inbound.allow_plaintext`), and keys per-caller limits on the certificate's
//! identity. Certificates rotate on disk without a restart.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context as _, ensure};
use weft_certs::Issued;
use weft_tests::backend::Backend;
use weft_tests::client::{Client, RawConn};
use weft_tests::config::{Bootstrap, DirService, policy_file};
use weft_tests::process::Proxy;
use weft_tests::tls::{Pki, connect};
use weft_tests::{closed_port, eventually, join_all};

/// `name`'s own sidecar in front of `app`, with `[tls]` (certificate
/// `issued`) and `policy_body` as its `[service] policy`.
async fn callee(
    pki: &Pki,
    name: &str,
    app: SocketAddr,
    issued: &Issued,
    policy_body: &str,
    watch_interval: Option<&str>,
) -> anyhow::Result<Proxy> {
    let file = format!("{name}.policy.toml");
    let bootstrap = Bootstrap::new()
        .app(name, app)
        .app_policy(&file)
        .tls(name, watch_interval);
    let builder = Proxy::builder(bootstrap.render()).file(&file, policy_file(name, policy_body));
    pki.files(builder, name, issued).start().await
}

/// A caller's sidecar with `[tls]` (certificate `issued` for `identity`),
/// fronting service `identity` unless `caller_only`, calling `service`.
async fn caller(
    pki: &Pki,
    identity: &str,
    caller_only: bool,
    issued: &Issued,
    service: DirService,
) -> anyhow::Result<Proxy> {
    let mut bootstrap = Bootstrap::new();
    if !caller_only {
        // No app behind it: its health is not checked.
        bootstrap = bootstrap
            .app(identity, closed_port()?)
            .app_health("enabled = false");
    }
    let bootstrap = bootstrap.tls(identity, None).service(service);
    pki.files(Proxy::builder(bootstrap.render()), identity, issued)
        .start()
        .await
}

async fn inbound_connections(proxy: &Proxy) -> anyhow::Result<f64> {
    proxy
        .admin_client()
        .metrics()
        .await?
        .value("weft_tcp_connections_total", &[("direction", "inbound")])
}

async fn handshake_failures(proxy: &Proxy, direction: &str, reason: &str) -> anyhow::Result<f64> {
    Ok(proxy.admin_client().metrics().await?.sum(
        "weft_tls_handshake_failures_total",
        &[("direction", direction), ("reason", reason)],
    ))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sidecars_talk_mtls_over_http2_and_each_app_keeps_its_protocol() -> anyhow::Result<()> {
    let pki = Pki::new();
    let app = Backend::start("billing-app").await?;
    let billing_cert = pki.issue("billing");
    let billing = callee(&pki, "billing", app.addr(), &billing_cert, "", None).await?;
    let web = caller(
        &pki,
        "web",
        false,
        &pki.issue("web"),
        DirService::new("billing")
            .tls("mesh")
            .endpoint(billing.inbound()),
    )
    .await?;

    // An HTTP/1.1 app: the app behind billing gets HTTP/1.1 too, over mTLS
    // (forwarded proto=https) from the authenticated caller.
    let reply = Client::host_header(web.outbound())
        .get("http://billing/hello")
        .await?;
    reply.expect_status(200)?;
    ensure!(reply.backend() == Some("billing-app"));
    ensure!(
        reply.header("x-seen-version") == Some("HTTP/1.1"),
        "{:?}",
        reply.header("x-seen-version")
    );
    let forwarded = reply.header("x-seen-forwarded").unwrap_or_default();
    ensure!(forwarded.contains("proto=https"), "forwarded: {forwarded}");
    let seen = app.last_seen().context("the app saw nothing")?;
    ensure!(
        seen.headers.get("weft-caller").is_some_and(|v| v == "web"),
        "{:?}",
        seen.headers
    );
    ensure!(
        !seen.headers.contains_key("weft-protocol"),
        "the sidecars' own header reached the app"
    );
    // An HTTP/2 app: HTTP/2 all the way.
    let reply = Client::h2(web.outbound())
        .get("http://billing/hello")
        .await?;
    reply.expect_status(200)?;
    ensure!(reply.header("x-seen-version") == Some("HTTP/2.0"));

    // The hop is one multiplexed HTTP/2 connection: eight HTTP/1.1 apps'
    // connections, eight requests in flight at once, one connection between
    // the sidecars (opened by the first request above).
    let tasks = (0..8)
        .map(|_| {
            let client = Client::host_header(web.outbound());
            tokio::spawn(async move { client.get("http://billing/slow?ms=300").await })
        })
        .collect();
    for reply in join_all(tasks).await? {
        reply.expect_status(200)?;
    }
    ensure!(app.max_in_flight() >= 8, "{}", app.max_in_flight());
    ensure!(
        inbound_connections(&billing).await? == 1.0,
        "billing's inbound listener accepted {} connections",
        inbound_connections(&billing).await?
    );

    // The admin API shows the identity in force and the meshed service.
    let endpoints = web.admin_client().endpoints().await?;
    ensure!(
        endpoints.0["tls"]["identity"] == "spiffe://weft.local/service/web",
        "{}",
        endpoints.0["tls"]
    );
    ensure!(endpoints.service("billing")?["tls"] == "mesh");

    // What a peer sidecar negotiates: TLS 1.3, ALPN h2, billing's certificate.
    let tls = connect(billing.inbound(), pki.ca_pem(), Some(&pki.issue("web"))).await?;
    ensure!(tls.version == Some(rustls::ProtocolVersion::TLSv1_3));
    ensure!(tls.alpn.as_deref() == Some(&b"h2"[..]), "{:?}", tls.alpn);
    ensure!(tls.server_cert == billing_cert.cert_der());
    ensure!(tls.get("billing", "/direct").await? == 200);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_inbound_listener_refuses_plaintext_and_foreign_certificates() -> anyhow::Result<()> {
    let pki = Pki::new();
    let app = Backend::start("billing-app").await?;
    let billing = callee(&pki, "billing", app.addr(), &pki.issue("billing"), "", None).await?;

    let plaintext = Client::host_header(billing.inbound())
        .get("http://billing/")
        .await;
    ensure!(plaintext.is_err(), "plaintext was served: {plaintext:?}");

    // No client certificate; one from another CA (same trust domain, same
    // name). TLS 1.3 finishes the client's side of the handshake before the
    // server refuses, so the refusal shows on the first request.
    let other = Pki::new();
    for (what, cert) in [
        ("no certificate", None),
        ("another CA", Some(other.issue("web"))),
    ] {
        let refused = match connect(billing.inbound(), pki.ca_pem(), cert.as_ref()).await {
            Err(_) => true,
            Ok(conn) => conn.get("billing", "/").await.is_err(),
        };
        ensure!(refused, "{what}: the request was served");
    }
    ensure!(
        app.requests() == 0,
        "the app saw {} requests",
        app.requests()
    );
    ensure!(handshake_failures(&billing, "inbound", "plaintext").await? >= 1.0);
    ensure!(handshake_failures(&billing, "inbound", "certificate").await? >= 2.0);
    let logs = billing.logs();
    ensure!(
        logs.contains("plaintext connection refused"),
        "no refusal in the log:\n{logs}"
    );

    // Migration: with inbound.allow_plaintext (applied live), plaintext is
    // served on the same port, mTLS still works, a foreign CA is still refused.
    billing.dir().write(
        "billing.policy.toml",
        &policy_file("billing", "[inbound]\nallow_plaintext = true"),
    )?;
    billing.admin_client().reload().await?.expect_status(200)?;
    let reply = Client::host_header(billing.inbound())
        .get("http://billing/plain")
        .await?;
    reply.expect_status(200)?;
    let forwarded = reply.header("x-seen-forwarded").unwrap_or_default();
    ensure!(forwarded.contains("proto=http;"), "forwarded: {forwarded}");
    let tls = connect(billing.inbound(), pki.ca_pem(), Some(&pki.issue("web"))).await?;
    ensure!(tls.get("billing", "/tls").await? == 200);
    let foreign = match connect(billing.inbound(), pki.ca_pem(), Some(&other.issue("web"))).await {
        Err(_) => true,
        Ok(conn) => conn.get("billing", "/").await.is_err(),
    };
    ensure!(foreign, "a certificate from another CA was served");
    ensure!(app.requests() == 2);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_caller_limits_key_on_the_certificate_identity() -> anyhow::Result<()> {
    let pki = Pki::new();
    let app = Backend::start("billing-app").await?;
    let policy = "[inbound]\nallow_plaintext = true\ncaller_rate_limit = { per_second = 0.01, burst = 1, \
                  overrides = { orders = { per_second = 1000, burst = 1000 } } }";
    let billing = callee(
        &pki,
        "billing",
        app.addr(),
        &pki.issue("billing"),
        policy,
        None,
    )
    .await?;
    let target = || {
        DirService::new("billing")
            .tls("mesh")
            .endpoint(billing.inbound())
    };

    // A caller-only sidecar sends no weft-caller header: its certificate says
    // it is orders, whose override applies.
    let orders = caller(&pki, "orders", true, &pki.issue("orders"), target()).await?;
    let client = Client::host_header(orders.outbound());
    for _ in 0..5 {
        client.get("http://billing/x").await?.expect_status(200)?;
    }
    ensure!(
        app.seen_with("weft-caller", "orders") == 5,
        "the app was not told the authenticated caller"
    );

    // web has the default bucket of one, whatever its app claims to be.
    let web = caller(&pki, "web", false, &pki.issue("web"), target()).await?;
    let client = Client::host_header(web.outbound());
    client
        .get_with("http://billing/x", &[("weft-caller", "orders")])
        .await?
        .expect_status(200)?;
    client
        .get_with("http://billing/x", &[("weft-caller", "orders")])
        .await?
        .expect_refusal(429, "rate-limit", "inbound.caller_rate_limit")?;

    // Allowed plaintext has no certificate: the header (here none) decides.
    let plain = Client::host_header(billing.inbound());
    plain.get("http://billing/x").await?.expect_status(200)?;
    plain.get("http://billing/x").await?.expect_refusal(
        429,
        "rate-limit",
        "inbound.caller_rate_limit",
    )?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reaching_a_sidecar_with_another_identity_is_a_connect_failure() -> anyhow::Result<()> {
    let pki = Pki::new();
    let app = Backend::start("orders-app").await?;
    let orders = callee(&pki, "orders", app.addr(), &pki.issue("orders"), "", None).await?;
    // The caller believes billing lives at orders' sidecar.
    let web = caller(
        &pki,
        "web",
        false,
        &pki.issue("web"),
        DirService::new("billing")
            .tls("mesh")
            .endpoint(orders.inbound()),
    )
    .await?;

    let reply = Client::host_header(web.outbound())
        .get("http://billing/charge")
        .await?;
    ensure!(reply.status == 502, "{} {}", reply.status, reply.text());
    ensure!(
        reply.reason() == Some("connect-failure"),
        "{:?}",
        reply.reason()
    );
    let why = "the peer is spiffe://weft.local/service/orders, expected spiffe://weft.local/service/billing";
    ensure!(reply.text().contains(why), "{}", reply.text());
    ensure!(web.logs().contains(why), "not in the caller's log");
    ensure!(app.requests() == 0, "orders' app was reached");
    ensure!(handshake_failures(&web, "outbound", "certificate").await? >= 1.0);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_certificate_is_used_for_new_connections_without_a_restart() -> anyhow::Result<()>
{
    let pki = Pki::new();
    let app = Backend::start("billing-app").await?;
    let first = pki.issue("billing");
    let billing = callee(&pki, "billing", app.addr(), &first, "", Some("200ms")).await?;
    let web = caller(
        &pki,
        "web",
        false,
        &pki.issue("web"),
        DirService::new("billing")
            .tls("mesh")
            .endpoint(billing.inbound()),
    )
    .await?;
    let web_cert = pki.issue("web");
    let presented = || async {
        anyhow::Ok(
            connect(billing.inbound(), pki.ca_pem(), Some(&web_cert))
                .await?
                .server_cert,
        )
    };
    ensure!(presented().await? == first.cert_der());

    // A request in flight across the swap.
    let client = Client::host_header(web.outbound());
    let held = {
        let client = client.clone();
        tokio::spawn(async move { client.get("http://billing/hold").await })
    };
    eventually(Duration::from_secs(5), || async {
        ensure!(app.in_flight() == 1, "not in flight yet");
        Ok(())
    })
    .await?;

    // A new certificate (new key, new serial) replaces the files on disk.
    let second = pki.issue("billing");
    ensure!(second.cert_der() != first.cert_der());
    billing.dir().write("billing-key.pem", second.key_pem())?;
    billing.dir().write("billing.pem", second.cert_pem())?;
    eventually(Duration::from_secs(5), || async {
        ensure!(
            presented().await? == second.cert_der(),
            "still the old certificate"
        );
        Ok(())
    })
    .await?;
    app.release();
    held.await??.expect_status(200)?;
    client
        .get("http://billing/after")
        .await?
        .expect_status(200)?;

    // A broken file is refused; the new certificate stays in use.
    billing.dir().write("billing.pem", "not a certificate\n")?;
    eventually(Duration::from_secs(5), || async {
        ensure!(billing.logs().contains("new TLS files refused"), "not yet");
        Ok(())
    })
    .await?;
    ensure!(presented().await? == second.cert_der());
    client
        .get("http://billing/still")
        .await?
        .expect_status(200)?;
    // A reload while the file is still broken says so, and changes nothing.
    let reload = billing.admin_client().reload().await?;
    ensure!(
        reload.status == 400,
        "reload: {} {}",
        reload.status,
        reload.text()
    );
    ensure!(
        reload.text().contains("the [tls] files were refused"),
        "{}",
        reload.text()
    );
    ensure!(presented().await? == second.cert_der());
    ensure!(billing.try_status()?.is_none(), "billing's sidecar exited");
    ensure!(
        billing.admin_client().config_version().await? == 1,
        "nothing was reloaded"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_for_another_service_stops_the_sidecar_at_start() -> anyhow::Result<()> {
    let pki = Pki::new();
    let bootstrap = Bootstrap::new()
        .app("billing", closed_port()?)
        .tls("billing", None);
    let proxy = pki
        .files(
            Proxy::builder(bootstrap.render()),
            "billing",
            &pki.issue("orders"),
        )
        .spawn()?;
    let status = proxy.wait_exit(Duration::from_secs(10)).await?;
    ensure!(!status.success());
    let logs = proxy.logs();
    ensure!(
        logs.contains("the certificate is spiffe://weft.local/service/orders, but this sidecar must be spiffe://weft.local/service/billing"),
        "{logs}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_websocket_upgrade_crosses_the_mtls_hop() -> anyhow::Result<()> {
    let pki = Pki::new();
    let app = Backend::start("billing-app").await?;
    let billing = callee(&pki, "billing", app.addr(), &pki.issue("billing"), "", None).await?;
    let web = caller(
        &pki,
        "web",
        false,
        &pki.issue("web"),
        DirService::new("billing")
            .tls("mesh")
            .endpoint(billing.inbound()),
    )
    .await?;
    let mut conn = RawConn::connect(web.outbound()).await?;
    conn.write(
        b"GET /ws HTTP/1.1\r\n\
          Host: billing\r\n\
          Connection: Upgrade\r\n\
          Upgrade: websocket\r\n\
          Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
          Sec-WebSocket-Version: 13\r\n\r\n",
    )
    .await?;
    let head = conn.read_head().await?;
    ensure!(head.status == 101, "status {} ({head:?})", head.status);
    let message = weft_tests::pattern(0, 64 * 1024);
    conn.write(&message).await?;
    ensure!(conn.read_exact(message.len()).await? == message);
    let forwarded = head.header("x-seen-forwarded").unwrap_or_default();
    ensure!(forwarded.contains("proto=https"), "forwarded: {forwarded}");
    Ok(())
}

/// billing's sidecar with `[tls]` and `limits` (`(key, TOML value)`), in front
/// of `app`, with a long drain grace.
async fn hardened_callee(
    pki: &Pki,
    app: SocketAddr,
    limits: &[(&str, &str)],
) -> anyhow::Result<Proxy> {
    let mut bootstrap = Bootstrap::new()
        .app("billing", app)
        .tls("billing", None)
        .grace("30s");
    for (key, value) in limits {
        bootstrap = bootstrap.limit(key, value);
    }
    pki.files(
        Proxy::builder(bootstrap.render()),
        "billing",
        &pki.issue("billing"),
    )
    .start()
    .await
}

/// How long until the server closes `stream` (EOF or an error), at most 10 s.
async fn closed_after<S: tokio::io::AsyncRead + Unpin>(stream: &mut S) -> anyhow::Result<Duration> {
    use tokio::io::AsyncReadExt as _;
    let started = std::time::Instant::now();
    let mut buf = [0u8; 1024];
    weft_tests::within(Duration::from_secs(10), "the server closing", async {
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await?;
    Ok(started.elapsed())
}

/// `[limits]` holds on the mTLS inbound listener as on a plaintext one: a
/// connection that sends nothing, an mTLS connection that sends no request
/// and a dribbled HTTP/1 head over mTLS are all closed at
/// `header_read_timeout`; the silent one counts as a handshake `timeout`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_mtls_inbound_listener_applies_the_header_read_timeout() -> anyhow::Result<()> {
    use tokio::io::AsyncWriteExt as _;
    let pki = Pki::new();
    let app = Backend::start("billing-app").await?;
    let billing = hardened_callee(&pki, app.addr(), &[("header_read_timeout", "\"1s\"")]).await?;
    let web = pki.issue("web");

    let mut silent = tokio::net::TcpStream::connect(billing.inbound()).await?;
    let quiet = connect(billing.inbound(), pki.ca_pem(), Some(&web)).await?;
    let mut dribble = connect(billing.inbound(), pki.ca_pem(), Some(&web)).await?;
    dribble
        .stream
        .write_all(b"GET /slow HTTP/1.1\r\nHost: bil")
        .await?;
    let mut quiet = quiet.stream;
    let (silent, quiet, dribble) = tokio::join!(
        closed_after(&mut silent),
        closed_after(&mut quiet),
        closed_after(&mut dribble.stream),
    );
    for (what, after) in [
        ("a silent connection", silent?),
        ("an mTLS connection with no request", quiet?),
        ("a dribbled head over mTLS", dribble?),
    ] {
        ensure!(
            after >= Duration::from_millis(700) && after < Duration::from_secs(4),
            "{what} was closed after {after:?} (header_read_timeout 1s)"
        );
    }
    ensure!(handshake_failures(&billing, "inbound", "timeout").await? >= 1.0);
    ensure!(app.requests() == 0);
    // And the listener still serves.
    let tls = connect(billing.inbound(), pki.ca_pem(), Some(&web)).await?;
    ensure!(tls.get("billing", "/after").await? == 200);
    Ok(())
}

/// The mTLS inbound listener has the connection cap (a connection past it is
/// closed before any handshake, and counted), and connections that have sent
/// no request, mid-handshake or after it, do not hold shutdown for the grace.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_mtls_inbound_listener_caps_connections_and_closes_idle_ones_at_shutdown()
-> anyhow::Result<()> {
    let pki = Pki::new();
    let app = Backend::start("billing-app").await?;
    let billing = hardened_callee(&pki, app.addr(), &[("max_connections", "2")]).await?;
    let web = pki.issue("web");

    // Two silent connections fill the listener: one handshaken, one raw.
    let held = connect(billing.inbound(), pki.ca_pem(), Some(&web)).await?;
    let raw = tokio::net::TcpStream::connect(billing.inbound()).await?;
    let third = match connect(billing.inbound(), pki.ca_pem(), Some(&web)).await {
        Err(_) => true,
        Ok(conn) => conn.get("billing", "/").await.is_err(),
    };
    ensure!(
        third,
        "a third connection was served past max_connections = 2"
    );
    let scrape = billing.admin_client().metrics().await?;
    ensure!(
        scrape.value(
            "weft_tcp_connections_refused_total",
            &[("direction", "inbound")]
        )? >= 1.0,
        "{}",
        scrape.text
    );
    ensure!(app.requests() == 0);

    // SIGTERM with a 30 s grace: neither connection holds a request.
    let signalled = std::time::Instant::now();
    billing.signal(weft_tests::process::Signal::Term)?;
    let status = billing.wait_exit(Duration::from_secs(20)).await?;
    ensure!(status.code() == Some(0), "exit status {status}");
    ensure!(
        signalled.elapsed() < Duration::from_secs(3),
        "shutdown took {:?} with connections that sent no request",
        signalled.elapsed()
    );
    drop((held, raw));
    Ok(())
}
