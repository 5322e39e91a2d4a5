//! The conformance cases, and helpers to read watch streams with a bound.

pub mod kv;
pub mod lease;
pub mod watch;

use std::time::Duration;

use anyhow::{Context as _, bail, ensure};
use bytes::Bytes;
use weft_control_plane::store::{KeyValue, LeaseId, Revision, StoreError, WatchEvent, WatchStream};

/// How long a watch may take to deliver an event that has been written.
pub const WATCH_WAIT: Duration = Duration::from_secs(5);

pub fn bytes(s: &str) -> Bytes {
    Bytes::copy_from_slice(s.as_bytes())
}

pub fn put(key: &str, value: &str, mod_revision: Revision, lease: Option<LeaseId>) -> WatchEvent {
    WatchEvent::Put(KeyValue {
        key: key.to_owned(),
        value: bytes(value),
        mod_revision,
        lease,
    })
}

pub fn delete(key: &str, mod_revision: Revision) -> WatchEvent {
    WatchEvent::Delete {
        key: key.to_owned(),
        mod_revision,
    }
}

/// The stream's next item, within [`WATCH_WAIT`].
pub async fn next(
    watch: &mut WatchStream,
) -> anyhow::Result<Option<Result<weft_control_plane::store::WatchBatch, StoreError>>> {
    tokio::time::timeout(WATCH_WAIT, watch.recv())
        .await
        .context("watch delivered nothing in time")
}

/// Exactly the next `n` events, checking that they come in revision order
/// and that each batch's revision is its last event's.
pub async fn collect(watch: &mut WatchStream, n: usize) -> anyhow::Result<Vec<WatchEvent>> {
    let mut events: Vec<WatchEvent> = Vec::new();
    while events.len() < n {
        let batch = match next(watch).await? {
            Some(Ok(batch)) => batch,
            Some(Err(e)) => bail!("watch failed after {events:?}: {e:?}"),
            None => bail!("watch ended after {events:?}"),
        };
        let last = batch.events.last().context("empty batch")?;
        ensure!(
            batch.revision == last.mod_revision(),
            "batch revision {} is not its last event's: {batch:?}",
            batch.revision
        );
        events.extend(batch.events);
    }
    ensure!(events.len() == n, "expected {n} events, got {events:?}");
    for pair in events.windows(2) {
        ensure!(
            pair[0].mod_revision() <= pair[1].mod_revision(),
            "events out of order: {events:?}"
        );
    }
    Ok(events)
}
