//! Watching from a revision, and resuming after a compaction with a fresh
//! list: the list-then-watch loop the control plane's cache runs.

use anyhow::ensure;
use weft_control_plane::store::{Revision, Store, StoreError};

use super::{bytes, collect, delete, next, put};

/// A watch from a revision delivers every later change under its prefix, in
/// order, then live changes; one from a later revision skips what came
/// before it.
pub async fn watch_from_revision<S: Store>(store: &S) -> anyhow::Result<()> {
    store.put("x/before", bytes("0"), None).await?;
    let (listed, from) = store.list("x/").await?;
    ensure!(listed.len() == 1, "{listed:?}");

    let a = store.put("x/a", bytes("1"), None).await?;
    store.put("y/a", bytes("elsewhere"), None).await?;
    let b = store.put("x/b", bytes("2"), None).await?;
    store.delete("x/a").await?;
    let (_, deleted) = store.list("").await?;

    let mut watch = store.watch("x/", from).await?;
    let events = collect(&mut watch, 3).await?;
    let expected = [
        put("x/a", "1", a, None),
        put("x/b", "2", b, None),
        delete("x/a", deleted),
    ];
    ensure!(events == expected, "got {events:?}\nexpected {expected:?}");

    // Then live changes, on the same stream.
    let c = store.put("x/c", bytes("3"), None).await?;
    let events = collect(&mut watch, 1).await?;
    ensure!(events == [put("x/c", "3", c, None)], "live: {events:?}");

    // From the middle: only what came after `a`.
    let mut later = store.watch("x/", a).await?;
    let events = collect(&mut later, 3).await?;
    let expected = [
        put("x/b", "2", b, None),
        delete("x/a", deleted),
        put("x/c", "3", c, None),
    ];
    ensure!(events == expected, "from {a}: {events:?}");

    // From a revision not written yet: only what comes after it.
    let mut ahead = store.watch("x/", Revision(c.0 + 1)).await?;
    store.put("x/d", bytes("4"), None).await?;
    let e = store.put("x/e", bytes("5"), None).await?;
    let events = collect(&mut ahead, 1).await?;
    ensure!(
        events == [put("x/e", "5", e, None)],
        "from {}: {events:?}",
        c.0 + 1
    );
    Ok(())
}

/// After a compaction, a watch from before it yields `Compacted` and ends; a
/// fresh list and a watch from its revision resume with nothing missed.
pub async fn resume_after_compaction<S: Store>(store: &S) -> anyhow::Result<()> {
    let first = store.put("k/a", bytes("1"), None).await?;
    store.put("k/b", bytes("2"), None).await?;
    let last = store.put("k/a", bytes("3"), None).await?;
    store.compact(last).await?;
    store.compact(last).await?; // compacting twice is fine

    let mut stale = store.watch("k/", Revision(first.0 - 1)).await?;
    match next(&mut stale).await? {
        Some(Err(StoreError::Compacted { compact_revision })) => ensure!(
            compact_revision == last,
            "compacted at {last}, reported {compact_revision}"
        ),
        other => anyhow::bail!("a watch from before the compaction gave {other:?}"),
    }
    ensure!(
        next(&mut stale).await?.is_none(),
        "the stream goes on after Compacted"
    );

    // Re-list, then watch from the list's revision.
    let (kvs, revision) = store.list("k/").await?;
    let listed: Vec<_> = kvs
        .iter()
        .map(|kv| (kv.key.as_str(), kv.value.clone()))
        .collect();
    ensure!(
        listed == [("k/a", bytes("3")), ("k/b", bytes("2"))],
        "{listed:?}"
    );
    ensure!(revision == last, "list at {revision}");
    let mut watch = store.watch("k/", revision).await?;
    let c = store.put("k/c", bytes("4"), None).await?;
    let events = collect(&mut watch, 1).await?;
    ensure!(events == [put("k/c", "4", c, None)], "resumed: {events:?}");

    // The compaction revision itself is still watchable.
    let mut boundary = store.watch("k/", Revision(last.0 - 1)).await?;
    let events = collect(&mut boundary, 2).await?;
    let expected = [put("k/a", "3", last, None), put("k/c", "4", c, None)];
    ensure!(events == expected, "from the boundary: {events:?}");

    match store.compact(Revision(c.0 + 100)).await {
        Err(StoreError::Rejected { .. }) => Ok(()),
        other => anyhow::bail!("compacting a future revision gave {other:?}"),
    }
}
