//! Scenario: names outside the directory are resolved by DNS, respecting TTLs.
//!
//! The proxy's `[dns]` section points at the harness's DNS server. A request
//! for `svc.test:PORT` must be resolved there (the server counts the question)
//! and balanced over the A records; when the record changes, traffic must
//! follow once the 1 s TTL runs out. Backends on 127.0.0.1 and 127.0.0.2 share
//! one port (all of 127.0.0.0/8 is loopback on Linux), so only the address in
//! the record decides where a request goes. A name the server does not know
//! (NXDOMAIN) is answered fast with 502 and `weft-reason: unknown-service`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use anyhow::ensure;
use weft_tests::backend::Backend;
use weft_tests::client::Client;
use weft_tests::config::Bootstrap;
use weft_tests::dns::DnsServer;
use weft_tests::process::Proxy;
use weft_tests::{eventually, get_n, tally};

const FIRST: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 1);
const SECOND: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 2);

/// Two backends on the same port, one on 127.0.0.1 and one on 127.0.0.2.
async fn twin_backends() -> anyhow::Result<(Backend, Backend)> {
    let first = Backend::start("first").await?;
    let second = Backend::builder("second")
        .addr(SocketAddr::from((SECOND, first.addr().port())))
        .start()
        .await?;
    Ok((first, second))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn name_outside_the_directory_is_resolved_and_follows_record_changes() -> anyhow::Result<()> {
    let dns = DnsServer::start().await?;
    let (first, second) = twin_backends().await?;
    let port = first.addr().port();
    dns.set("svc.test", &[FIRST], 1);
    let proxy = Proxy::start(Bootstrap::new().dns(dns.addr()).render()).await?;
    let client = Client::absolute(proxy.outbound());
    let uri = format!("http://svc.test:{port}/hello");

    let replies = get_n(&client, &uri, 5).await?;
    ensure!(
        tally(&replies).keys().eq(["first"]),
        "{:?}",
        tally(&replies)
    );
    ensure!(
        dns.queries("svc.test") >= 1,
        "the proxy never asked the test DNS server"
    );
    let seen = first.last_seen().expect("first saw requests");
    ensure!(
        seen.host.as_deref() == Some(format!("svc.test:{port}").as_str()),
        "Host {:?}",
        seen.host
    );

    // The admin view lists the DNS-discovered endpoint.
    let endpoints = proxy.admin_client().endpoints().await?;
    let listed = endpoints.services()?.iter().any(|service| {
        service["source"] == "dns"
            && service["endpoints"].as_array().is_some_and(|endpoints| {
                endpoints
                    .iter()
                    .any(|e| e["address"] == first.addr().to_string().as_str())
            })
    });
    ensure!(
        listed,
        "no dns-sourced service lists {}: {}",
        first.addr(),
        endpoints.0
    );

    // Move the name; once the 1 s TTL is over, traffic must follow.
    dns.set("svc.test", &[SECOND], 1);
    let started = Instant::now();
    eventually(Duration::from_secs(10), || async {
        let reply = client.get(&uri).await?;
        reply.expect_status(200)?;
        ensure!(
            reply.backend() == Some("second"),
            "still {:?}",
            reply.backend()
        );
        Ok(())
    })
    .await?;
    let moved_after = started.elapsed();
    // And it stays there, although the old backend is still up.
    let (first_before, second_before) = (first.requests(), second.requests());
    let replies = get_n(&client, &uri, 10).await?;
    ensure!(first.requests() == first_before && second.requests() == second_before + 10);
    ensure!(
        tally(&replies).keys().eq(["second"]),
        "after the move (took {moved_after:?}): {:?}",
        tally(&replies)
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn name_with_several_records_is_balanced_over_them() -> anyhow::Result<()> {
    let dns = DnsServer::start().await?;
    let (first, second) = twin_backends().await?;
    dns.set("multi.test", &[FIRST, SECOND], 30);
    let proxy = Proxy::start(Bootstrap::new().dns(dns.addr()).render()).await?;
    let client = Client::absolute(proxy.outbound());

    let uri = format!("http://multi.test:{}/", first.addr().port());
    let replies = get_n(&client, &uri, 60).await?;
    let counts = tally(&replies);
    ensure!(
        counts.keys().eq(["first", "second"]),
        "both records should get traffic: {counts:?}"
    );
    ensure!(second.requests() > 0 && first.requests() > 0);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_name_is_a_fast_502_unknown_service() -> anyhow::Result<()> {
    let dns = DnsServer::start().await?;
    let backend = Backend::start("a").await?;
    let proxy = Proxy::start(Bootstrap::new().dns(dns.addr()).render()).await?;
    let client = Client::absolute(proxy.outbound());

    let started = Instant::now();
    let reply = client
        .get(&format!("http://nope.test:{}/", backend.addr().port()))
        .await?;
    let took = started.elapsed();
    reply.expect_status(502)?;
    ensure!(
        reply.header("weft-reason") == Some("unknown-service"),
        "weft-reason {:?}",
        reply.header("weft-reason")
    );
    ensure!(took < Duration::from_secs(2), "took {took:?}");
    ensure!(
        dns.queries("nope.test") >= 1,
        "the test DNS server was never asked"
    );
    ensure!(backend.requests() == 0);
    Ok(())
}
