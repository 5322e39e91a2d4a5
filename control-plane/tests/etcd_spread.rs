//! Control-plane replicas given the same etcd endpoint list spread over the
//! cluster's members instead of all sending their requests (and their watch)
//! to the first one listed: each starts on a random member, logs which, and
//! that member (etcd's own metrics say) holds its watch.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{Context, ensure};
use support::{start, wait_for};
use weft_tests::control_plane::ControlPlane;
use weft_tests::etcd::EtcdCluster;

/// The member a control plane logged it connected to.
fn member_of(cp: &ControlPlane) -> Option<String> {
    let logs = cp.logs();
    let line = logs.lines().find(|l| l.contains("connected to etcd"))?;
    let rest = line.split("etcd.member=").nth(1)?;
    Some(rest.split_whitespace().next()?.to_owned())
}

/// etcd's `etcd_debugging_mvcc_watcher_total` gauge at `url`: the watchers
/// that member holds.
async fn watchers(url: &str) -> anyhow::Result<u64> {
    let addr: std::net::SocketAddr = url.trim_start_matches("http://").parse()?;
    let reply = weft_tests::admin::Admin::new(addr).get("/metrics").await?;
    let text = reply.text();
    let line = text
        .lines()
        .find(|l| l.starts_with("etcd_debugging_mvcc_watcher_total "))
        .context("no etcd_debugging_mvcc_watcher_total")?;
    Ok(line.rsplit(' ').next().unwrap_or_default().parse()?)
}

#[tokio::test(flavor = "multi_thread")]
async fn replicas_spread_over_the_etcd_members() -> anyhow::Result<()> {
    let cluster = EtcdCluster::start(3).await?;
    let urls = cluster.client_urls();
    // Start replicas until two members are in use (the odds of twelve
    // replicas all on one member are 3 in 3^12: about one in 177,000).
    let mut replicas = Vec::new();
    let mut by_member: BTreeMap<String, u64> = BTreeMap::new();
    while by_member.len() < 2 && replicas.len() < 12 {
        let arg = cluster.etcd_arg();
        let cp = tokio::task::spawn_blocking(move || start(ControlPlane::etcd(arg))).await?;
        let member = wait_for("the connected member", Duration::from_secs(15), || async {
            Ok(member_of(&cp))
        })
        .await?;
        ensure!(urls.contains(&member), "{member} is not one of {urls:?}");
        *by_member.entry(member).or_default() += 1;
        replicas.push(cp);
    }
    ensure!(
        by_member.len() >= 2,
        "{} replicas all on one member: {by_member:?}",
        replicas.len()
    );
    // Each member holds the watches of the replicas that said they use it.
    for url in &urls {
        let want = by_member.get(url).copied().unwrap_or(0);
        wait_for(
            &format!("{want} watchers on {url}"),
            Duration::from_secs(15),
            || async { Ok((watchers(url).await? == want).then_some(())) },
        )
        .await?;
    }
    Ok(())
}
