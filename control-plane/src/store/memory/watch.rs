//! Watches on the embedded store.
//!
//! A watch starts under the store's lock: it subscribes to the broadcast of
//! commits and copies the batches of its replay from the history in the same
//! critical section, so the replay and the live feed meet with no gap and no
//! duplicate. A forwarding task then sends the replay and the live batches,
//! filtered to the watched prefix, into the watcher's bounded
//! [`WatchStream`].
//!
//! Memory stays bounded: the broadcast holds at most `watch_lag` batches for
//! all watchers together. A watcher that does not read fills its stream,
//! which stalls its forwarder; once the broadcast has moved on by more than
//! `watch_lag` batches the forwarder reports [`StoreError::Compacted`] and
//! ends, and the watcher re-lists. The forwarder also ends when the watcher
//! drops its stream or the store is dropped.

use std::sync::{Arc, Weak};

use tokio::sync::broadcast::{self, error::RecvError};
use tokio::sync::mpsc;

use super::Shared;
use crate::store::{Revision, StoreError, WatchBatch, WatchStream};

type Sender = mpsc::Sender<Result<WatchBatch, StoreError>>;

/// Starts watching `prefix` for changes after `from`.
pub(super) fn start(shared: &Arc<Shared>, prefix: &str, from: Revision) -> WatchStream {
    let (tx, stream) = WatchStream::channel();
    let state = shared.lock();
    if from.0.saturating_add(1) < state.first_kept {
        let compact_revision = Revision(state.first_kept);
        // The channel is new and empty: this cannot fail for lack of room.
        let _ = tx.try_send(Err(StoreError::Compacted { compact_revision }));
        return stream;
    }
    let live = state.events.subscribe();
    let start = state
        .history
        .partition_point(|batch| batch.revision <= from);
    let replay: Vec<_> = state.history.range(start..).cloned().collect();
    drop(state);
    // Bound to the stream's lifetime: exits when the watcher drops it.
    tokio::spawn(forward(
        Arc::downgrade(shared),
        prefix.to_owned(),
        from,
        replay,
        live,
        tx,
    ));
    stream
}

async fn forward(
    shared: Weak<Shared>,
    prefix: String,
    from: Revision,
    replay: Vec<Arc<WatchBatch>>,
    mut live: broadcast::Receiver<Arc<WatchBatch>>,
    tx: Sender,
) {
    for batch in replay {
        if !send_matching(&tx, &prefix, &batch).await {
            return;
        }
    }
    loop {
        let received = tokio::select! {
            () = tx.closed() => return,
            received = live.recv() => received,
        };
        match received {
            // A watch may start from a revision not written yet.
            Ok(batch) if batch.revision <= from => {}
            Ok(batch) => {
                if !send_matching(&tx, &prefix, &batch).await {
                    return;
                }
            }
            Err(RecvError::Lagged(missed)) => {
                let Some(shared) = shared.upgrade() else {
                    return;
                };
                let compact_revision = Revision(shared.lock().first_kept);
                tracing::debug!(watch.prefix = %prefix, missed, "watcher fell behind");
                let _ = tx
                    .send(Err(StoreError::Compacted { compact_revision }))
                    .await;
                return;
            }
            Err(RecvError::Closed) => return,
        }
    }
}

/// Sends the events of `batch` under `prefix`, if any; false once the
/// watcher is gone.
async fn send_matching(tx: &Sender, prefix: &str, batch: &WatchBatch) -> bool {
    let events: Vec<_> = batch
        .events
        .iter()
        .filter(|event| event.key().starts_with(prefix))
        .cloned()
        .collect();
    if events.is_empty() {
        return true;
    }
    let batch = WatchBatch {
        revision: batch.revision,
        events,
    };
    tx.send(Ok(batch)).await.is_ok()
}
