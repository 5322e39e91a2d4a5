//! What only the etcd store has, against a real etcd: paged listings, the
//! key prefix, user/password authentication, TLS with client certificates,
//! and failing fast (and typed) when etcd is unreachable or goes away. Shared semantics are in
//! `store_conformance.rs`.

mod support;

use std::num::NonZeroU32;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context as _, bail, ensure};
use bytes::Bytes;
use etcd_client::Client;
use tokio::time::Instant;
use weft_control_plane::store::etcd::{
    ClientCert, ConnectError, EtcdOptions, EtcdStore, EtcdTls, EtcdUser, Password,
};
use weft_control_plane::store::{Store, StoreError};

use support::tls;
use weft_tests::etcd::{EtcdCluster, EtcdServer};

fn bytes(s: &str) -> Bytes {
    Bytes::copy_from_slice(s.as_bytes())
}

#[tokio::test]
async fn a_list_larger_than_a_page_is_one_snapshot() -> anyhow::Result<()> {
    let server = EtcdServer::start().await?;
    let mut options = EtcdOptions::new([server.client_url()]);
    options.list_page_size = NonZeroU32::new(2).context("page size")?;
    let store = EtcdStore::connect(options).await?;
    let mut last = None;
    for i in 0..7 {
        last = Some(store.put(&format!("p/{i}"), bytes("v"), None).await?);
    }
    store.put("q/after", bytes("v"), None).await?;

    let (kvs, revision) = store.list("p/").await?;
    let keys: Vec<_> = kvs.iter().map(|kv| kv.key.as_str()).collect();
    ensure!(
        keys == ["p/0", "p/1", "p/2", "p/3", "p/4", "p/5", "p/6"],
        "{keys:?}"
    );
    ensure!(
        Some(revision) > last,
        "listed at {revision}, last p/ write {last:?}"
    );
    Ok(())
}

#[tokio::test]
async fn keys_live_under_the_prefix_and_nothing_else_is_seen() -> anyhow::Result<()> {
    let server = EtcdServer::start().await?;
    let mut raw = Client::connect([server.client_url()], None).await?;
    raw.put("/other/x", "outside", None).await?;
    raw.put("/weftish/y", "a neighbour sharing the first letters", None)
        .await?;

    let store = EtcdStore::connect(EtcdOptions::new([server.client_url()])).await?;
    store.put("services/a/policy", bytes("p"), None).await?;
    let stored = raw.get("/weft/services/a/policy", None).await?;
    ensure!(
        stored.kvs().len() == 1,
        "the key is not stored under /weft/"
    );

    let (kvs, _) = store.list("").await?;
    let keys: Vec<_> = kvs.iter().map(|kv| kv.key.as_str()).collect();
    ensure!(keys == ["services/a/policy"], "{keys:?}");

    let mut options = EtcdOptions::new([server.client_url()]);
    options.key_prefix = "/mesh".to_owned();
    let other = EtcdStore::connect(options).await?;
    ensure!(other.key_prefix() == "/mesh/");
    ensure!(
        other.list("").await?.0.is_empty(),
        "prefixes leak into each other"
    );
    Ok(())
}

#[tokio::test]
async fn user_and_password_are_used_and_checked() -> anyhow::Result<()> {
    let server = EtcdServer::start().await?;
    let mut admin = Client::connect([server.client_url()], None).await?;
    admin.user_add("root", "s3cret-root", None).await?;
    admin.user_grant_role("root", "root").await?;
    admin.auth_enable().await?;

    let with = |password: Option<&str>| {
        let mut options = EtcdOptions::new([server.client_url()]);
        options.user = password.map(|password| EtcdUser {
            name: "root".to_owned(),
            password: Password::new(password),
        });
        options
    };
    let store = EtcdStore::connect(with(Some("s3cret-root"))).await?;
    store.put("a", bytes("1"), None).await?;
    ensure!(store.get("a").await?.is_some());

    for password in [Some("wrong"), None] {
        match EtcdStore::connect(with(password)).await {
            Err(ConnectError::Store {
                source: StoreError::Rejected { .. },
                ..
            }) => {}
            other => bail!("connecting with password {password:?} gave {other:?}"),
        }
    }
    Ok(())
}

#[tokio::test]
async fn an_unreachable_etcd_fails_fast_and_retryably() -> anyhow::Result<()> {
    // A port nothing listens on: bound, then released.
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let mut options = EtcdOptions::new([format!("http://127.0.0.1:{port}")]);
    options.connect_timeout = Duration::from_millis(300);
    options.request_timeout = Duration::from_millis(300);
    let started = Instant::now();
    match EtcdStore::connect(options).await {
        Err(ConnectError::Store { source, .. }) if source.is_retryable() => {}
        other => bail!("connecting to nothing gave {other:?}"),
    }
    ensure!(
        started.elapsed() < Duration::from_secs(3),
        "took {:?}",
        started.elapsed()
    );
    Ok(())
}

#[tokio::test]
async fn a_watch_ends_with_an_error_when_etcd_goes_away() -> anyhow::Result<()> {
    let server = EtcdServer::start().await?;
    let mut options = EtcdOptions::new([server.client_url()]);
    options.request_timeout = Duration::from_millis(500);
    let store = EtcdStore::connect(options).await?;
    let (_, from) = store.list("").await?;
    let mut watch = store.watch("", from).await?;
    drop(server);

    let next = tokio::time::timeout(Duration::from_secs(10), watch.recv())
        .await
        .context("the watch hung after etcd died")?;
    match next {
        Some(Err(e)) if e.is_retryable() => {}
        other => bail!("expected a retryable error, got {other:?}"),
    }
    match store.get("a").await {
        Err(e) if e.is_retryable() => Ok(()),
        other => bail!("a request to a dead etcd gave {other:?}"),
    }
}

#[tokio::test]
async fn tls_with_a_client_certificate() -> anyhow::Result<()> {
    let pki = tls::generate()?;
    let server = EtcdServer::start_tls(&pki).await?;
    let dir = server.tls_dir();
    let tls = |ca: PathBuf, client: bool| EtcdTls {
        ca_file: ca,
        client_cert: client.then(|| ClientCert {
            cert_file: dir.join("client.pem"),
            key_file: dir.join("client-key.pem"),
        }),
        domain: None,
    };
    let with = |url: &str, tls: EtcdTls| {
        let mut options = EtcdOptions::new([url]);
        options.tls = Some(tls);
        options.connect_timeout = Duration::from_secs(1);
        options.request_timeout = Duration::from_secs(1);
        options
    };

    let store =
        EtcdStore::connect(with(server.client_url(), tls(dir.join("ca.pem"), true))).await?;
    store.put("a", bytes("over TLS"), None).await?;
    ensure!(
        store
            .get("a")
            .await?
            .is_some_and(|kv| kv.value == bytes("over TLS"))
    );

    // etcd requires a client certificate.
    let refused =
        EtcdStore::connect(with(server.client_url(), tls(dir.join("ca.pem"), false))).await;
    ensure!(refused.is_err(), "connected without a client certificate");

    // A CA that did not sign etcd's certificate.
    let stranger = dir.join("other-ca.pem");
    std::fs::write(&stranger, tls::generate()?.ca)?;
    let refused = EtcdStore::connect(with(server.client_url(), tls(stranger, true))).await;
    ensure!(refused.is_err(), "trusted a certificate from another CA");

    // TLS settings with a plain-HTTP URL are a settings error.
    let plain = server.client_url().replacen("https://", "http://", 1);
    match EtcdStore::connect(with(&plain, tls(dir.join("ca.pem"), true))).await {
        Err(ConnectError::Invalid { .. }) => Ok(()),
        other => bail!("TLS over an http:// URL gave {other:?}"),
    }
}

/// A three-member cluster loses the member the store talks to (and then a
/// second one is restarted and the first comes back): requests move to the
/// next member within the request timeout, reads and writes keep working,
/// a watch started afterwards works, and nothing written is lost.
#[tokio::test(flavor = "multi_thread")]
async fn losing_a_cluster_member_costs_a_retry_not_an_outage() -> anyhow::Result<()> {
    let mut cluster = EtcdCluster::start(3).await?;
    let mut options = EtcdOptions::new(cluster.client_urls());
    options.request_timeout = Duration::from_secs(2);
    let store = EtcdStore::connect(options).await?;
    store.put("before", bytes("1"), None).await?;

    // Kill the member the store sends its requests to (a random one).
    let current = cluster
        .client_urls()
        .iter()
        .position(|u| u == store.current_member())
        .context("the store's member is one of the cluster's")?;
    cluster.kill(current)?;
    for i in 0..20 {
        let started = Instant::now();
        store
            .put(&format!("during/{i}"), bytes("x"), None)
            .await
            .with_context(|| format!("put {i} with member {current} dead"))?;
        ensure!(
            started.elapsed() < Duration::from_secs(3),
            "put {i} took {:?}",
            started.elapsed()
        );
    }
    let lease = store.grant_lease(Duration::from_secs(5)).await?;
    store.put("leased", bytes("l"), Some(lease)).await?;
    store.keep_alive(lease).await?;
    let (listed, revision) = store.list("during/").await?;
    ensure!(listed.len() == 20, "{} keys under during/", listed.len());
    let mut watch = store.watch("after/", revision).await?;
    store.put("after/a", bytes("2"), None).await?;
    let batch = tokio::time::timeout(Duration::from_secs(5), watch.recv())
        .await
        .context("no watch event within 5 s")?
        .context("the watch ended")??;
    ensure!(!batch.events.is_empty(), "{batch:?}");

    // The killed member comes back and the current one goes: still working.
    cluster.restart(current).await?;
    let now = cluster
        .client_urls()
        .iter()
        .position(|u| u == store.current_member())
        .context("the store's member is one of the cluster's")?;
    ensure!(now != current, "still on the killed member {current}");
    cluster.kill(now)?;
    store.put("later", bytes("3"), None).await?;
    ensure!(store.get("before").await?.is_some());
    ensure!(store.get("later").await?.is_some());
    Ok(())
}

/// `LeaseKeepAlive` streams etcd has started, from its `/metrics`.
async fn keep_alive_streams_started(server: &EtcdServer) -> anyhow::Result<f64> {
    let addr = server
        .client_url()
        .trim_start_matches("http://")
        .parse()
        .context("etcd's client address")?;
    let scrape = weft_tests::admin::Admin::new(addr).metrics().await?;
    ensure!(
        scrape.text.contains("grpc_server_started_total"),
        "etcd's /metrics has no grpc_server_started_total"
    );
    Ok(scrape.sum(
        "grpc_server_started_total",
        &[("grpc_method", "LeaseKeepAlive")],
    ))
}

#[tokio::test]
async fn every_lease_is_kept_alive_over_one_stream() -> anyhow::Result<()> {
    let server = EtcdServer::start().await?;
    let store = EtcdStore::connect(EtcdOptions::new([server.client_url()])).await?;
    let mut leases = Vec::new();
    for _ in 0..100 {
        leases.push(store.grant_lease(Duration::from_secs(60)).await?);
    }
    let before = keep_alive_streams_started(&server).await?;
    for round in 0..3 {
        let refreshes = leases.iter().map(|&lease| store.keep_alive(lease));
        for (lease, refreshed) in leases
            .iter()
            .zip(futures_util::future::join_all(refreshes).await)
        {
            refreshed.with_context(|| format!("round {round}: refreshing lease {lease}"))?;
        }
    }
    // A revoked lease's refresh says so; the others still refresh, on the
    // same stream.
    let (gone, kept) = (leases[0], leases[1]);
    store.revoke(gone).await?;
    match store.keep_alive(gone).await {
        Err(StoreError::LeaseNotFound(lease)) if lease == gone => {}
        other => bail!("refreshing a revoked lease gave {other:?}"),
    }
    store.keep_alive(kept).await?;
    let after = keep_alive_streams_started(&server).await?;
    ensure!(
        after - before == 1.0,
        "302 refreshes of 100 leases took {} LeaseKeepAlive streams",
        after - before
    );
    Ok(())
}

#[tokio::test]
async fn lease_refreshes_fail_while_etcd_is_down_and_resume_when_it_is_back() -> anyhow::Result<()>
{
    let mut server = EtcdServer::start().await?;
    let mut options = EtcdOptions::new([server.client_url()]);
    options.request_timeout = Duration::from_millis(500);
    let store = EtcdStore::connect(options).await?;
    let lease = store.grant_lease(Duration::from_secs(60)).await?;
    store.keep_alive(lease).await?;

    server.kill()?;
    // The stream breaks; every refresh fails retryably, and promptly.
    for _ in 0..3 {
        let started = Instant::now();
        match store.keep_alive(lease).await {
            Err(e) if e.is_retryable() => {}
            other => bail!("a refresh with etcd down gave {other:?}"),
        }
        ensure!(
            started.elapsed() < Duration::from_secs(3),
            "a refresh with etcd down took {:?}",
            started.elapsed()
        );
    }

    server.restart().await?;
    weft_tests::eventually(Duration::from_secs(20), || async {
        Ok(store.keep_alive(lease).await?)
    })
    .await
    .context("refreshes did not resume once etcd was back")?;
    Ok(())
}
