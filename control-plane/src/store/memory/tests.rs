//! Behaviour only the embedded store has, on paused tokio time: exact lease
//! expiry, the bounded history and watch buffers, and tasks that end with
//! the store. What both stores share is in `tests/store_conformance.rs`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::num::NonZeroUsize;
use std::time::Duration;

use tokio::time::Instant;

use super::{MemoryOptions, MemoryStore};
use crate::store::{Revision, Store, StoreError, WatchEvent};

fn store_with(history: usize, watch_lag: usize) -> MemoryStore {
    MemoryStore::new(MemoryOptions {
        history: NonZeroUsize::new(history).unwrap(),
        watch_lag: NonZeroUsize::new(watch_lag).unwrap(),
    })
}

fn value() -> bytes::Bytes {
    bytes::Bytes::from_static(b"v")
}

#[tokio::test(start_paused = true)]
async fn a_lease_expires_exactly_at_its_ttl_and_watchers_hear_it() {
    let store = MemoryStore::new(MemoryOptions::default());
    let start = Instant::now();
    let lease = store
        .grant_lease(Duration::from_millis(1500))
        .await
        .unwrap();
    let written = store.put("reg/a", value(), Some(lease)).await.unwrap();
    let mut watch = store.watch("reg/", written).await.unwrap();

    tokio::time::sleep(Duration::from_millis(1999)).await;
    assert!(
        store.get("reg/a").await.unwrap().is_some(),
        "1.5 s rounds up to 2 s"
    );

    // Nothing else happens: the reaper alone ends the lease, at 2 s.
    let batch = watch.recv().await.unwrap().unwrap();
    assert_eq!(start.elapsed(), Duration::from_secs(2));
    assert_eq!(
        batch.events,
        [WatchEvent::Delete {
            key: "reg/a".to_owned(),
            mod_revision: Revision(written.0 + 1),
        }]
    );
}

#[tokio::test(start_paused = true)]
async fn keep_alive_pushes_the_deadline_a_full_ttl() {
    let store = MemoryStore::new(MemoryOptions::default());
    let lease = store.grant_lease(Duration::from_secs(2)).await.unwrap();
    store.put("reg/a", value(), Some(lease)).await.unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    store.keep_alive(lease).await.unwrap();
    tokio::time::sleep(Duration::from_millis(1999)).await;
    assert!(store.get("reg/a").await.unwrap().is_some());
    tokio::time::sleep(Duration::from_millis(1)).await;
    assert!(store.get("reg/a").await.unwrap().is_none());
    assert!(matches!(
        store.keep_alive(lease).await,
        Err(StoreError::LeaseNotFound(id)) if id == lease
    ));
}

#[tokio::test]
async fn a_full_history_moves_the_compaction_horizon() {
    let store = store_with(3, 64);
    let mut last = Revision(0);
    for i in 0..10 {
        last = store.put(&format!("k/{i}"), value(), None).await.unwrap();
    }
    // Revisions last-2..=last are kept: watching from last-3 still works.
    let mut watch = store.watch("k/", Revision(last.0 - 3)).await.unwrap();
    for expected in last.0 - 2..=last.0 {
        let batch = watch.recv().await.unwrap().unwrap();
        assert_eq!(batch.revision, Revision(expected));
    }
    let mut stale = store.watch("k/", Revision(last.0 - 4)).await.unwrap();
    assert!(matches!(
        stale.recv().await,
        Some(Err(StoreError::Compacted { compact_revision })) if compact_revision.0 == last.0 - 2
    ));
    assert!(stale.recv().await.is_none());
}

#[tokio::test]
async fn a_watcher_that_falls_behind_is_told_compacted() {
    let store = store_with(1_000, 4);
    let (_, from) = store.list("").await.unwrap();
    let mut watch = store.watch("k/", from).await.unwrap();
    // The forwarder cannot run while this task writes without yielding.
    for i in 0..100 {
        store.put(&format!("k/{i}"), value(), None).await.unwrap();
    }
    let mut delivered = 0;
    loop {
        match watch.recv().await {
            Some(Ok(_)) => delivered += 1,
            Some(Err(StoreError::Compacted { .. })) => break,
            other => panic!("expected Compacted, got {other:?}"),
        }
    }
    assert!(
        delivered < 100,
        "{delivered} batches buffered for a stalled watcher"
    );
    assert!(watch.recv().await.is_none());
}

#[tokio::test]
async fn a_watcher_that_keeps_up_misses_nothing() {
    let store = store_with(1_000, 4);
    let (_, from) = store.list("").await.unwrap();
    let mut watch = store.watch("k/", from).await.unwrap();
    for i in 0..100 {
        let revision = store.put(&format!("k/{i}"), value(), None).await.unwrap();
        store.put("elsewhere", value(), None).await.unwrap();
        let batch = watch.recv().await.unwrap().unwrap();
        assert_eq!(batch.revision, revision);
    }
}

#[tokio::test]
async fn background_tasks_end_with_the_store_and_the_stream() {
    let metrics = tokio::runtime::Handle::current().metrics();
    let store = MemoryStore::new(MemoryOptions::default());
    store.grant_lease(Duration::from_secs(60)).await.unwrap();
    let watch = store.watch("", Revision(0)).await.unwrap();
    assert_eq!(metrics.num_alive_tasks(), 2, "the reaper and one forwarder");

    drop(watch);
    wait_until(|| metrics.num_alive_tasks() == 1).await;
    drop(store);
    wait_until(|| metrics.num_alive_tasks() == 0).await;
}

/// Yields to the runtime until `done`, at most 1,000 times.
async fn wait_until(done: impl Fn() -> bool) {
    for _ in 0..1_000 {
        if done() {
            return;
        }
        tokio::task::yield_now().await;
    }
    panic!("condition not reached");
}
