//! Leases: keys disappear when their lease expires (and watchers hear it),
//! stay while it is kept alive, and go at once when it is revoked.

use std::time::Duration;

use anyhow::{Context as _, ensure};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use weft_control_plane::store::{LeaseId, Store, StoreError, WatchEvent, keep_lease_alive};

use super::{bytes, collect};
use crate::support::wait_for;

/// The shortest TTL etcd grants.
const TTL: Duration = Duration::from_secs(1);
/// How late expiry may be: etcd checks for expired leases every 500 ms and
/// a loaded CI machine adds its own delay.
const EXPIRY_SLACK: Duration = Duration::from_secs(4);

fn is_lease_not_found<T: std::fmt::Debug>(
    result: Result<T, StoreError>,
    lease: LeaseId,
) -> anyhow::Result<()> {
    match result {
        Err(StoreError::LeaseNotFound(id)) if id == lease => Ok(()),
        other => anyhow::bail!("expected LeaseNotFound({lease}), got {other:?}"),
    }
}

/// Without keep-alive, a lease's keys disappear after its TTL, in one
/// revision that watchers see; the lease is then gone for good.
pub async fn lease_expires_without_keep_alive<S: Store>(store: &S) -> anyhow::Result<()> {
    let lease = store.grant_lease(TTL).await?;
    let (_, from) = store.list("").await?;
    store.put("reg/a", bytes("1"), Some(lease)).await?;
    store.put("reg/b", bytes("2"), Some(lease)).await?;
    store.put("reg/c", bytes("3"), None).await?;
    let kv = store.get("reg/a").await?.context("reg/a")?;
    ensure!(kv.lease == Some(lease), "{kv:?}");
    let mut watch = store.watch("reg/", from).await?;

    let granted = Instant::now();
    wait_for("the lease's keys to expire", TTL + EXPIRY_SLACK, || async {
        Ok((store.list("reg/").await?.0.len() == 1).then_some(()))
    })
    .await?;
    ensure!(
        granted.elapsed() + Duration::from_millis(100) >= TTL,
        "keys expired after {:?}, before the TTL",
        granted.elapsed()
    );
    ensure!(
        store.get("reg/c").await?.is_some(),
        "a key without lease expired"
    );

    let events = collect(&mut watch, 5).await?;
    let deletes: Vec<_> = events
        .iter()
        .filter_map(|event| match event {
            WatchEvent::Delete { key, mod_revision } => Some((key.as_str(), *mod_revision)),
            WatchEvent::Put(_) => None,
        })
        .collect();
    ensure!(
        deletes.len() == 2 && deletes[0].1 == deletes[1].1,
        "expected reg/a and reg/b deleted in one revision: {events:?}"
    );

    is_lease_not_found(store.keep_alive(lease).await, lease)?;
    is_lease_not_found(store.put("reg/d", bytes("4"), Some(lease)).await, lease)?;
    is_lease_not_found(store.revoke(lease).await, lease)
}

/// Kept alive, a lease outlives its TTL several times over; once the
/// keeper is cancelled, its keys expire.
pub async fn lease_kept_alive_stays<S: Store>(store: &S) -> anyhow::Result<()> {
    let lease = store.grant_lease(TTL).await?;
    store.put("reg/a", bytes("1"), Some(lease)).await?;
    let cancel = CancellationToken::new();
    let check = async {
        // Holding for 3 TTLs is the point here, not waiting for a state.
        let until = Instant::now() + 3 * TTL;
        let result = async {
            while Instant::now() < until {
                ensure!(
                    store.get("reg/a").await?.is_some(),
                    "the key vanished while its lease was kept alive"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Ok(())
        }
        .await;
        cancel.cancel();
        result
    };
    let (kept, checked) = tokio::join!(keep_lease_alive(store, lease, TTL, &cancel), check);
    checked?;
    kept.context("keep_lease_alive ended with an error")?;

    wait_for(
        "the key to expire after keep-alive stopped",
        TTL + EXPIRY_SLACK,
        || async { Ok(store.get("reg/a").await?.is_none().then_some(())) },
    )
    .await
}

/// Revoking deletes the lease's keys at once, in one revision, and only
/// them: a key re-put without the lease is no longer bound to it.
pub async fn revoke_deletes_at_once<S: Store>(store: &S) -> anyhow::Result<()> {
    let long = Duration::from_secs(30);
    let lease = store.grant_lease(long).await?;
    let other = store.grant_lease(long).await?;
    ensure!(lease != other, "two grants gave the same lease");
    store.put("reg/a", bytes("1"), Some(lease)).await?;
    store.put("reg/b", bytes("2"), Some(lease)).await?;
    store.put("reg/c", bytes("3"), Some(other)).await?;
    store.put("reg/d", bytes("4"), None).await?;
    store.put("reg/e", bytes("5"), Some(lease)).await?;
    store.put("reg/e", bytes("6"), None).await?;
    let (_, from) = store.list("").await?;

    store.revoke(lease).await?;
    let (kvs, _) = store.list("reg/").await?;
    let keys: Vec<_> = kvs.iter().map(|kv| kv.key.as_str()).collect();
    ensure!(
        keys == ["reg/c", "reg/d", "reg/e"],
        "after revoke: {keys:?}"
    );

    let mut watch = store.watch("reg/", from).await?;
    let events = collect(&mut watch, 2).await?;
    let revision = events[0].mod_revision();
    let expected = [
        super::delete("reg/a", revision),
        super::delete("reg/b", revision),
    ];
    ensure!(events == expected, "revoke's events: {events:?}");

    is_lease_not_found(store.revoke(lease).await, lease)?;
    is_lease_not_found(store.keep_alive(lease).await, lease)?;
    store.keep_alive(other).await?;
    Ok(())
}
