//! The values a [`Store`](super::Store) hands out: revisions, leases, keys
//! with their values, and the watch stream.
//!
//! They mirror etcd's model because etcd is the store that matters in
//! production: one global revision that every write bumps by one, a key's
//! `mod_revision` set by the write that last touched it, and leases that own
//! keys. Keys are always relative to the store's key prefix (`/weft/` by
//! default): callers never see the prefix.

use std::fmt;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use futures_util::Stream;
use tokio::sync::mpsc;

use super::StoreError;

/// A store revision: a logical clock bumped by one on every write, shared by
/// every key. A list reports the revision it reflects; a watch resumes from
/// one.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Revision(pub i64);

impl fmt::Display for Revision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// A lease's id. Keys written with a lease are deleted when it expires or is
/// revoked.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct LeaseId(pub i64);

impl fmt::Display for LeaseId {
    /// Hexadecimal, as etcdctl prints lease ids.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:x}", self.0)
    }
}

/// A key with its value, as stored.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyValue {
    /// The key, relative to the store's prefix.
    pub key: String,
    pub value: Bytes,
    /// The revision of the write that last changed this key.
    pub mod_revision: Revision,
    /// The lease the key is bound to, if any.
    pub lease: Option<LeaseId>,
}

/// One change to one key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WatchEvent {
    /// The key was created or its value replaced.
    Put(KeyValue),
    /// The key was deleted, by a delete or by its lease ending.
    Delete { key: String, mod_revision: Revision },
}

impl WatchEvent {
    /// The key the event is about.
    pub fn key(&self) -> &str {
        match self {
            WatchEvent::Put(kv) => &kv.key,
            WatchEvent::Delete { key, .. } => key,
        }
    }

    /// The revision of the write that made this change.
    pub fn mod_revision(&self) -> Revision {
        match self {
            WatchEvent::Put(kv) => kv.mod_revision,
            WatchEvent::Delete { mod_revision, .. } => *mod_revision,
        }
    }
}

/// Events delivered together, in revision order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WatchBatch {
    /// The revision the watcher's view reflects once it has applied the
    /// batch: the revision of its last event.
    pub revision: Revision,
    /// Never empty.
    pub events: Vec<WatchEvent>,
}

/// The receiving end of a watch: batches of events in revision order.
///
/// It is bounded: a watcher that stops reading eventually holds up its
/// producer, and a watcher that falls too far behind is told
/// [`StoreError::Compacted`] rather than costing the store unbounded memory.
/// After yielding an error the stream ends; the caller re-lists (after
/// `Compacted`) or watches again from the last revision it applied.
/// Dropping the stream cancels the watch.
#[derive(Debug)]
pub struct WatchStream {
    rx: mpsc::Receiver<Result<WatchBatch, StoreError>>,
}

/// How many batches a watch stream buffers between its producer and reader.
pub(crate) const WATCH_STREAM_BUFFER: usize = 16;

impl WatchStream {
    /// A stream and the sender its producer feeds.
    pub(crate) fn channel() -> (mpsc::Sender<Result<WatchBatch, StoreError>>, Self) {
        let (tx, rx) = mpsc::channel(WATCH_STREAM_BUFFER);
        (tx, WatchStream { rx })
    }

    /// The next batch, an error (after which the stream ends), or `None` once
    /// the stream has ended.
    pub async fn recv(&mut self) -> Option<Result<WatchBatch, StoreError>> {
        self.rx.recv().await
    }
}

impl Stream for WatchStream {
    type Item = Result<WatchBatch, StoreError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.rx.poll_recv(cx)
    }
}
