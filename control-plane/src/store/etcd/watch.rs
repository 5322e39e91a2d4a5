//! Watches on etcd.
//!
//! Each watch is one etcd watch stream over the prefix, from `from + 1`
//! (etcd's `start_revision` is inclusive; ours is "after"). Creating it waits
//! for etcd's first answer within the request timeout, so an unreachable
//! etcd fails the call rather than the stream. A forwarding task then
//! translates etcd's responses into [`WatchBatch`]es on the bounded
//! [`WatchStream`]: when the reader is slow the task stops reading, and gRPC
//! flow control pushes back on etcd, which eventually cancels a watcher that
//! is too far behind with a compaction, like one that started from a
//! compacted revision. Either way the stream yields
//! [`StoreError::Compacted`] and ends.
//!
//! etcd 3.4 first confirms the watch (`created`) and then, if the start
//! revision is compacted, cancels it in a second response carrying
//! `compact_revision`; any response is handled the same way wherever it
//! comes. Any other cancellation or stream failure ends the stream with the
//! mapped error. Dropping the [`WatchStream`] ends the task, which drops the
//! etcd stream and so cancels the watch.

use std::sync::Arc;

use etcd_client::{EventType, WatchOptions, WatchResponse};
use tokio::sync::mpsc;

use super::EtcdStore;
use super::convert::{Op, key_value, map_error, relative_key};
use crate::store::{Revision, StoreError, WatchBatch, WatchEvent, WatchStream};

type Sender = mpsc::Sender<Result<WatchBatch, StoreError>>;

pub(super) async fn start(
    store: &EtcdStore,
    prefix: &str,
    from: Revision,
) -> Result<WatchStream, StoreError> {
    let options = WatchOptions::new()
        .with_prefix()
        .with_start_revision(from.0.saturating_add(1));
    let key = store.full_key(prefix);
    let (etcd, first) = store
        .call(Op::Other, |clients| {
            let (mut client, key, options) = (clients.watch.clone(), key.clone(), options.clone());
            async move {
                let mut etcd = client.watch(key, Some(options)).await?;
                let first = etcd.message().await?;
                Ok((etcd, first))
            }
        })
        .await?;
    let (tx, stream) = WatchStream::channel();
    // Bound to the stream's lifetime: exits when the watcher drops it.
    tokio::spawn(forward(etcd, first, store.inner.prefix.clone(), tx));
    Ok(stream)
}

async fn forward(
    mut etcd: etcd_client::WatchStream,
    first: Option<WatchResponse>,
    prefix: Arc<str>,
    tx: Sender,
) {
    let mut next = Ok(first);
    loop {
        let step = match next {
            Ok(Some(response)) => translate(&response, &prefix),
            Ok(None) => Step::End(StoreError::unavailable("etcd closed the watch stream")),
            Err(error) => Step::End(map_error(error, Op::Other)),
        };
        match step {
            Step::Skip => {}
            Step::Batch(batch) => {
                if tx.send(Ok(batch)).await.is_err() {
                    return;
                }
            }
            Step::End(error) => {
                tracing::debug!(watch.prefix = %prefix, error = %error, "etcd watch ended");
                let _ = tx.send(Err(error)).await;
                return;
            }
        }
        next = tokio::select! {
            () = tx.closed() => return,
            next = etcd.message() => next,
        };
    }
}

/// What one etcd watch response means for the watcher.
#[derive(Debug)]
enum Step {
    /// No events (the creation answer, a progress notification).
    Skip,
    Batch(WatchBatch),
    /// The watch is over.
    End(StoreError),
}

fn translate(response: &WatchResponse, prefix: &str) -> Step {
    if response.compact_revision() > 0 {
        return Step::End(StoreError::Compacted {
            compact_revision: Revision(response.compact_revision()),
        });
    }
    if response.canceled() {
        let reason = response.cancel_reason();
        let error = if reason.contains("permission denied") {
            StoreError::rejected(format!("etcd cancelled the watch: {reason}"))
        } else {
            StoreError::unavailable(format!("etcd cancelled the watch: {reason}"))
        };
        return Step::End(error);
    }
    let mut events = Vec::with_capacity(response.events().len());
    for event in response.events() {
        let Some(kv) = event.kv() else {
            continue;
        };
        let translated = match event.event_type() {
            EventType::Put => key_value(kv, prefix).map(WatchEvent::Put),
            EventType::Delete => relative_key(kv.key(), prefix).map(|key| WatchEvent::Delete {
                key,
                mod_revision: Revision(kv.mod_revision()),
            }),
        };
        match translated {
            Ok(event) => events.push(event),
            Err(error) => return Step::End(error),
        }
    }
    match events.last() {
        Some(last) => Step::Batch(WatchBatch {
            revision: last.mod_revision(),
            events,
        }),
        None => Step::Skip,
    }
}
