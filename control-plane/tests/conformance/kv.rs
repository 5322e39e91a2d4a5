//! Put, get, delete, size limits, and prefix lists with their revision.

use anyhow::{Context as _, ensure};
use bytes::Bytes;
use weft_control_plane::store::{KeyValue, MAX_VALUE_BYTES, Store, StoreError};

use super::bytes;

/// Writes bump the revision and set `mod_revision`; deleting reports whether
/// the key existed, and deleting a missing key writes nothing.
pub async fn put_get_delete<S: Store>(store: &S) -> anyhow::Result<()> {
    ensure!(store.get("a").await?.is_none(), "a exists before any put");

    let first = store.put("a", bytes("one"), None).await?;
    let kv = store.get("a").await?.context("a after put")?;
    let expected = KeyValue {
        key: "a".to_owned(),
        value: bytes("one"),
        mod_revision: first,
        lease: None,
    };
    ensure!(kv == expected, "got {kv:?}, expected {expected:?}");

    let second = store.put("a", bytes("two"), None).await?;
    ensure!(second > first, "revision went from {first} to {second}");
    let kv = store.get("a").await?.context("a after second put")?;
    ensure!(
        (kv.value.clone(), kv.mod_revision) == (bytes("two"), second),
        "{kv:?}"
    );

    ensure!(store.delete("a").await?, "deleting a reported it missing");
    ensure!(
        store.get("a").await?.is_none(),
        "a still there after delete"
    );
    let (_, before) = store.list("").await?;
    ensure!(before > second, "the delete did not bump the revision");
    ensure!(
        !store.delete("a").await?,
        "deleting a twice reported it existed"
    );
    let (_, after) = store.list("").await?;
    ensure!(
        before == after,
        "deleting a missing key bumped the revision"
    );
    Ok(())
}

/// Values up to the limit round-trip; larger ones and empty keys are
/// refused and nothing is written.
pub async fn size_limits<S: Store>(store: &S) -> anyhow::Result<()> {
    let large = Bytes::from(vec![7u8; 1024 * 1024]);
    store.put("large", large.clone(), None).await?;
    let kv = store.get("large").await?.context("large value")?;
    ensure!(kv.value == large, "a 1 MiB value did not round-trip");

    let too_large = Bytes::from(vec![7u8; MAX_VALUE_BYTES + 1]);
    match store.put("huge", too_large, None).await {
        Err(StoreError::TooLarge { key, size, limit }) => {
            ensure!(key == "huge" && size == MAX_VALUE_BYTES + 1 && limit == MAX_VALUE_BYTES);
        }
        other => anyhow::bail!("a value over the limit gave {other:?}"),
    }
    ensure!(
        store.get("huge").await?.is_none(),
        "a refused value was written"
    );

    match store.put("", bytes("v"), None).await {
        Err(StoreError::Rejected { .. }) => Ok(()),
        other => anyhow::bail!("an empty key gave {other:?}"),
    }
}

/// A list returns exactly the keys under the prefix, sorted, with the store
/// revision it reflects.
pub async fn list_prefix_with_revision<S: Store>(store: &S) -> anyhow::Result<()> {
    store.put("services/b/policy", bytes("b"), None).await?;
    store.put("services/a/policy", bytes("a"), None).await?;
    store.put("other/x", bytes("x"), None).await?;
    store.put("services/ab/policy", bytes("ab"), None).await?;
    let last = store
        .put("services/a/instances/1", bytes("a1"), None)
        .await?;

    let keys = |kvs: &[KeyValue]| kvs.iter().map(|kv| kv.key.clone()).collect::<Vec<_>>();
    let (kvs, revision) = store.list("services/a/").await?;
    ensure!(
        keys(&kvs) == ["services/a/instances/1", "services/a/policy"],
        "services/a/ listed {:?}",
        keys(&kvs)
    );
    ensure!(revision == last, "list at {revision}, last write at {last}");
    ensure!(kvs[1].value == bytes("a"), "{kvs:?}");

    let (kvs, _) = store.list("services/").await?;
    ensure!(
        keys(&kvs)
            == [
                "services/a/instances/1",
                "services/a/policy",
                "services/ab/policy",
                "services/b/policy",
            ],
        "services/ listed {:?}",
        keys(&kvs)
    );

    let (kvs, empty_at) = store.list("nothing/").await?;
    ensure!(
        kvs.is_empty() && empty_at == last,
        "nothing/ listed {kvs:?} at {empty_at}"
    );

    let later = store.put("other/y", bytes("y"), None).await?;
    let (_, revision) = store.list("services/").await?;
    ensure!(
        revision == later,
        "a list reflects the store revision ({later}), not the prefix's: got {revision}"
    );
    Ok(())
}
