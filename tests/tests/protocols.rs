//! Scenario: what goes through the proxy arrives intact, whatever the protocol.
//!
//! HTTP/2 prior knowledge from the app; the upstream protocol chosen by the
//! directory entry (`auto` keeps the app's version, `http1`/`http2` force one);
//! gRPC-style requests whose trailers must cross in both directions (and
//! `TE: trailers`, named in `Connection` on HTTP/1.1 hops only); 10 MiB
//! bodies checked byte for byte; bodies streamed without buffering (a slow
//! drip arrives chunk by chunk, an h2 echo is full duplex); and an HTTP/1.1
//! upgrade after which raw bytes flow both ways.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use anyhow::{Context as _, ensure};
use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Request, Version};
use http_body_util::BodyExt as _;
use http_body_util::channel::Channel;
use tokio::time::Instant;
use weft_tests::backend::Backend;
use weft_tests::client::{BoxError, Client, Mode, RawConn, pattern_body};
use weft_tests::config::{Bootstrap, DirService};
use weft_tests::process::Proxy;
use weft_tests::{check_pattern, within};

/// Three backends behind three directory entries that differ only in `protocol`.
struct Setup {
    h2: Backend,
    auto: Backend,
    h1: Backend,
    proxy: Proxy,
}

async fn setup() -> anyhow::Result<Setup> {
    let h2 = Backend::start("h2").await?;
    let auto = Backend::start("auto").await?;
    let h1 = Backend::start("h1").await?;
    let bootstrap = Bootstrap::new()
        .service(
            DirService::new("billing-h2")
                .protocol("http2")
                .endpoint(h2.addr()),
        )
        .service(
            DirService::new("billing-auto")
                .protocol("auto")
                .endpoint(auto.addr()),
        )
        .service(
            DirService::new("billing-h1")
                .protocol("http1")
                .endpoint(h1.addr()),
        );
    let proxy = Proxy::start(bootstrap.render()).await?;
    Ok(Setup {
        h2,
        auto,
        h1,
        proxy,
    })
}

/// Sends one GET and returns the HTTP version the backend received it with.
async fn upstream_version(
    client: &Client,
    service: &str,
    backend: &Backend,
) -> anyhow::Result<Version> {
    let reply = client.get(&format!("http://{service}/hello")).await?;
    reply.expect_status(200)?;
    ensure!(
        reply.backend() == Some(backend.id()),
        "{:?}",
        reply.backend()
    );
    if client.mode() == Mode::H2 {
        ensure!(
            reply.version == Version::HTTP_2,
            "h2 client got {:?}",
            reply.version
        );
    }
    Ok(backend.last_seen().context("backend saw nothing")?.version)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2_prior_knowledge_reaches_http2_and_auto_services() -> anyhow::Result<()> {
    let s = setup().await?;
    let h2 = Client::h2(s.proxy.outbound());
    let got = upstream_version(&h2, "billing-h2", &s.h2).await?;
    ensure!(
        got == Version::HTTP_2,
        "protocol = http2 forwarded as {got:?}"
    );
    let got = upstream_version(&h2, "billing-auto", &s.auto).await?;
    ensure!(
        got == Version::HTTP_2,
        "protocol = auto forwarded h2 as {got:?}"
    );
    let got = upstream_version(&h2, "billing-h1", &s.h1).await?;
    ensure!(
        got == Version::HTTP_11,
        "protocol = http1 forwarded as {got:?}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http1_app_requests_follow_the_service_protocol_upstream() -> anyhow::Result<()> {
    let s = setup().await?;
    let h1 = Client::absolute(s.proxy.outbound());
    let got = upstream_version(&h1, "billing-auto", &s.auto).await?;
    ensure!(
        got == Version::HTTP_11,
        "protocol = auto forwarded h1 as {got:?}"
    );
    let got = upstream_version(&h1, "billing-h2", &s.h2).await?;
    ensure!(
        got == Version::HTTP_2,
        "protocol = http2 forwarded as {got:?}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_style_trailers_cross_the_proxy_both_ways() -> anyhow::Result<()> {
    let s = setup().await?;
    let client = Client::h2(s.proxy.outbound());
    for service in ["billing-h2", "billing-auto"] {
        let (mut tx, body) = Channel::<Bytes, BoxError>::new(4);
        let request = Request::post(format!("http://{service}/grpc"))
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .body(body.boxed())?;
        let sender = tokio::spawn(async move {
            tx.send_data(Bytes::from_static(b"\0\0\0\0\x05hello"))
                .await?;
            let mut trailers = HeaderMap::new();
            trailers.insert("x-client-trailer", HeaderValue::from_static("from-app"));
            tx.send_trailers(trailers).await?;
            anyhow::Ok(())
        });
        let reply = client.request(request).await?;
        sender.await??;
        reply.expect_status(200)?;
        ensure!(
            reply.body == b"\0\0\0\0\x05hello"[..],
            "{service}: body {:?}",
            reply.body
        );
        ensure!(
            reply.trailer("grpc-status") == Some("0")
                && reply.trailer("grpc-message") == Some("ok"),
            "{service}: response trailers {:?}",
            reply.trailers
        );
        ensure!(
            reply.trailer("x-seen-trailer-x-client-trailer") == Some("from-app"),
            "{service}: request trailers did not reach the backend: {:?}",
            reply.trailers
        );
    }
    Ok(())
}

/// The `Connection` tokens `seen` carries, lower case.
fn connection_tokens(seen: &HeaderMap) -> Vec<String> {
    seen.get_all("connection")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|t| t.trim().to_ascii_lowercase())
        .filter(|t| !t.is_empty())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn te_trailers_is_named_in_connection_on_http1_hops_only() -> anyhow::Result<()> {
    // RFC 9110 §10.1.4: a sender of TE names it in Connection. HTTP/2 has no
    // Connection (gRPC sends TE: trailers alone).
    let s = setup().await?;
    for client in [
        Client::absolute(s.proxy.outbound()),
        Client::h2(s.proxy.outbound()),
    ] {
        let mode = client.mode();
        for (service, backend) in [
            ("billing-h1", &s.h1),
            ("billing-auto", &s.auto),
            ("billing-h2", &s.h2),
        ] {
            let mut headers = vec![("te", "trailers")];
            if mode != Mode::H2 {
                headers.push(("connection", "TE"));
            }
            let reply = client
                .get_with(&format!("http://{service}/hello"), &headers)
                .await?;
            reply.expect_status(200)?;
            let seen = backend.last_seen().context("backend saw nothing")?;
            ensure!(
                seen.headers.get("te").is_some_and(|v| v == "trailers"),
                "{mode:?} to {service}: TE: trailers lost: {:?}",
                seen.headers
            );
            let tokens = connection_tokens(&seen.headers);
            if seen.version == Version::HTTP_2 {
                ensure!(tokens.is_empty(), "{mode:?} to {service}: {tokens:?}");
            } else {
                ensure!(
                    tokens == ["te"],
                    "{mode:?} to {service} over HTTP/1.1: Connection {tokens:?}"
                );
            }
        }
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_mib_bodies_stream_up_and_down_byte_for_byte() -> anyhow::Result<()> {
    let s = setup().await?;
    // Odd sizes, so nothing lines up with a buffer boundary.
    let up: u64 = 10 * 1024 * 1024 + 13;
    let down: u64 = 10 * 1024 * 1024 + 7;
    for (client, service) in [
        (Client::absolute(s.proxy.outbound()), "billing-auto"),
        (Client::h2(s.proxy.outbound()), "billing-h2"),
    ] {
        let mode = client.mode();
        let request = Request::post(format!("http://{service}/echo")).body(pattern_body(up))?;
        let reply = client.request(request).await?;
        reply.expect_status(200)?;
        ensure!(
            reply.body.len() as u64 == up,
            "{mode:?}: echoed {} of {up} bytes",
            reply.body.len()
        );
        check_pattern(0, &reply.body).with_context(|| format!("{mode:?}: echo"))?;

        let reply = client
            .get(&format!("http://{service}/pattern?len={down}"))
            .await?;
        reply.expect_status(200)?;
        ensure!(
            reply.body.len() as u64 == down,
            "{mode:?}: got {} of {down} bytes",
            reply.body.len()
        );
        check_pattern(0, &reply.body).with_context(|| format!("{mode:?}: download"))?;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn response_bodies_are_streamed_not_buffered() -> anyhow::Result<()> {
    let s = setup().await?;
    for (client, service) in [
        (Client::absolute(s.proxy.outbound()), "billing-auto"),
        (Client::h2(s.proxy.outbound()), "billing-h2"),
    ] {
        let mode = client.mode();
        let started = Instant::now();
        // 4 chunks 400 ms apart: the whole body takes >= 1.2 s at the backend.
        let response = client
            .send(
                Request::get(format!("http://{service}/drip?chunks=4&ms=400"))
                    .body(weft_tests::client::empty())?,
            )
            .await?;
        let mut body = response.into_body();
        let first = within(Duration::from_secs(5), "first chunk", body.frame())
            .await?
            .context("body ended before any data")??;
        let first_at = started.elapsed();
        ensure!(
            first.data_ref().is_some_and(|d| d.starts_with(b"chunk 0")),
            "{mode:?}: first frame {first:?}"
        );
        let rest = within(Duration::from_secs(10), "rest of body", body.collect()).await??;
        let total = started.elapsed();
        ensure!(
            String::from_utf8_lossy(&rest.to_bytes()).ends_with("chunk 3\n"),
            "{mode:?}: the drip was cut short"
        );
        ensure!(
            first_at < Duration::from_millis(800) && total >= Duration::from_millis(1100),
            "{mode:?}: first chunk after {first_at:?}, whole body after {total:?}: \
             the proxy buffered the response"
        );
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2_request_body_is_streamed_full_duplex() -> anyhow::Result<()> {
    let s = setup().await?;
    let client = Client::h2(s.proxy.outbound());
    let (mut tx, body) = Channel::<Bytes, BoxError>::new(4);
    let request = Request::post("http://billing-h2/echo").body(body.boxed())?;
    tx.send_data(Bytes::from_static(b"ping-1")).await?;
    // The response head may only wait for the first chunk, not the whole body.
    let response = within(
        Duration::from_secs(5),
        "response head while the request body is still open",
        client.send(request),
    )
    .await??;
    let mut body = response.into_body();
    // The request body is still open: the echo of the first part can only
    // arrive if the proxy forwards request data as it comes.
    for round in 1..=3 {
        let frame = within(
            Duration::from_secs(5),
            "echo of a request chunk",
            body.frame(),
        )
        .await?
        .context("echo ended early")??;
        let want = format!("ping-{round}");
        ensure!(
            frame.data_ref().is_some_and(|d| d == want.as_bytes()),
            "round {round}: got {frame:?}"
        );
        if round < 3 {
            tx.send_data(Bytes::from(format!("ping-{}", round + 1)))
                .await?;
        }
    }
    drop(tx);
    let rest = within(Duration::from_secs(5), "end of echo", body.collect()).await??;
    ensure!(rest.to_bytes().is_empty());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_upgrade_switches_protocols_and_echoes_both_ways() -> anyhow::Result<()> {
    let s = setup().await?;
    let mut conn = RawConn::connect(s.proxy.outbound()).await?;
    conn.write(
        b"GET http://billing-auto/ws HTTP/1.1\r\n\
          Host: billing-auto\r\n\
          Connection: Upgrade\r\n\
          Upgrade: websocket\r\n\
          Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
          Sec-WebSocket-Version: 13\r\n\r\n",
    )
    .await?;
    let head = conn.read_head().await?;
    ensure!(head.status == 101, "status {} ({head:?})", head.status);
    ensure!(
        head.header("upgrade")
            .is_some_and(|u| u.eq_ignore_ascii_case("websocket")),
        "upgrade header {:?}",
        head.header("upgrade")
    );
    ensure!(head.header("x-backend") == Some("auto"));

    for message in [
        &b"hello"[..],
        b"\x00\x01binary\xff",
        &weft_tests::pattern(0, 64 * 1024),
    ] {
        conn.write(message).await?;
        let echoed = conn.read_exact(message.len()).await?;
        ensure!(echoed == message, "echo of {} bytes differs", message.len());
    }
    Ok(())
}

/// A gRPC caller gets the proxy's refusals as gRPC statuses (HTTP 200,
/// `grpc-status`, `grpc-message`, no body), the way gRPC clients expect,
/// with the same `weft-reason` and `weft-limit`; an HTTP caller still gets
/// HTTP statuses.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_callers_get_refusals_as_grpc_statuses() -> anyhow::Result<()> {
    let backend = Backend::start("limited").await?;
    let bootstrap = Bootstrap::new()
        .service(
            DirService::new("limited")
                .protocol("http2")
                .policy("limited.toml")
                .endpoint(backend.addr()),
        )
        .service(DirService::new("down").endpoint(weft_tests::closed_port()?));
    let proxy = Proxy::builder(bootstrap.render())
        .file(
            "limited.toml",
            weft_tests::config::policy_file(
                "limited",
                "[outbound]\nrate_limit = { per_second = 1, burst = 1 }",
            ),
        )
        .start()
        .await?;
    let client = Client::h2(proxy.outbound());
    let call = |service: &str| {
        Request::post(format!("http://{service}/weft.Test/Call"))
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .body(
                http_body_util::Full::new(Bytes::from_static(b"\0\0\0\0\0"))
                    .map_err(|never| -> BoxError { match never {} })
                    .boxed(),
            )
    };

    let first = client.request(call("limited")?).await?;
    first.expect_status(200)?;
    ensure!(first.header("weft-reason").is_none(), "{first:?}");
    let refused = client.request(call("limited")?).await?;
    refused.expect_status(200)?;
    ensure!(
        refused.header("content-type") == Some("application/grpc"),
        "{refused:?}"
    );
    ensure!(
        refused.header("grpc-status") == Some("8"),
        "RESOURCE_EXHAUSTED: {refused:?}"
    );
    ensure!(
        refused
            .header("grpc-message")
            .is_some_and(|m| m.contains("outbound.rate_limit")),
        "{refused:?}"
    );
    ensure!(
        refused.header("weft-reason") == Some("rate-limit"),
        "{refused:?}"
    );
    ensure!(
        refused.header("weft-limit") == Some("outbound.rate_limit"),
        "{refused:?}"
    );
    ensure!(
        refused.body.is_empty(),
        "a trailers-only answer: {refused:?}"
    );

    let down = client.request(call("down")?).await?;
    down.expect_status(200)?;
    ensure!(
        down.header("grpc-status") == Some("14"),
        "UNAVAILABLE: {down:?}"
    );
    ensure!(
        down.header("weft-reason") == Some("connect-failure"),
        "{down:?}"
    );

    // The same refusal to an HTTP caller is an HTTP status.
    let plain = Client::h2(proxy.outbound()).get("http://limited/").await?;
    plain.expect_status(429)?;
    ensure!(plain.header("grpc-status").is_none(), "{plain:?}");
    Ok(())
}
