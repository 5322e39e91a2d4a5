//! The embedded in-memory store, for one process (`weft-control-plane
//! --dev`): nothing persists, and nothing is shared with another replica.
//!
//! It keeps etcd's semantics so the rest of the control plane cannot tell
//! the difference (the conformance suite checks it):
//!
//! - A `BTreeMap` of keys (so prefix lists are range scans) and one global
//!   revision counter, bumped once per write; deleting a missing key or
//!   revoking a lease with no keys writes nothing.
//! - A bounded history of committed batches, one per revision, so a watch
//!   can start from a past revision. Once the history is full the oldest
//!   batch is dropped, which moves the compaction horizon like
//!   [`Store::compact`] does: watching from before it yields
//!   [`StoreError::Compacted`].
//! - Every commit is broadcast to watchers through a bounded channel; a
//!   watcher that falls further behind than [`MemoryOptions::watch_lag`]
//!   gets `Compacted` instead of costing unbounded memory (see `watch`).
//! - Leases expire on tokio time (see `lease`): an expired lease's keys are
//!   deleted in one revision and watchers see the deletions.
//!
//! All state sits behind one `std::sync::Mutex`, never held across an
//! `.await`; the store is a cheap handle (`Clone`).

mod lease;
mod watch;

use std::collections::{BTreeMap, VecDeque};
use std::num::NonZeroUsize;
use std::ops::Bound;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::{Notify, broadcast};
use tokio::time::Instant;

use self::lease::Leases;
use super::{
    KeyValue, LeaseId, Revision, Store, StoreError, WatchBatch, WatchEvent, WatchStream, check_put,
};

/// Sizes of the embedded store's buffers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemoryOptions {
    /// How many revisions of history are kept for watches that start in the
    /// past. Default 10,000.
    pub history: NonZeroUsize,
    /// How many revisions a watcher may fall behind before it is told
    /// `Compacted`. Default 1,024.
    pub watch_lag: NonZeroUsize,
}

impl Default for MemoryOptions {
    fn default() -> Self {
        MemoryOptions {
            history: NonZeroUsize::new(10_000).unwrap_or(NonZeroUsize::MIN),
            watch_lag: NonZeroUsize::new(1_024).unwrap_or(NonZeroUsize::MIN),
        }
    }
}

/// The embedded store. Clones share the same data.
#[derive(Clone, Debug)]
pub struct MemoryStore {
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    state: Mutex<State>,
    /// Wakes the lease reaper when a lease with an earlier deadline appears,
    /// and when the store is dropped.
    reaper_wake: Arc<Notify>,
    /// The reaper is spawned by the first lease grant, so that `new` works
    /// outside a runtime.
    reaper_started: AtomicBool,
}

impl Drop for Shared {
    fn drop(&mut self) {
        // Let the reaper see that the store is gone and exit.
        self.reaper_wake.notify_one();
    }
}

#[derive(Debug)]
struct State {
    /// The revision of the last write; 1 for an empty store, as in etcd.
    revision: i64,
    kvs: BTreeMap<String, KeyValue>,
    leases: Leases,
    /// One batch per revision, oldest first, at most `history_limit`.
    history: VecDeque<Arc<WatchBatch>>,
    history_limit: usize,
    /// Every batch from this revision on is in `history`.
    first_kept: i64,
    /// Committed batches, to every watcher.
    events: broadcast::Sender<Arc<WatchBatch>>,
}

impl MemoryStore {
    /// An empty store.
    pub fn new(options: MemoryOptions) -> Self {
        let (events, _) = broadcast::channel(options.watch_lag.get());
        let state = State {
            revision: 1,
            kvs: BTreeMap::new(),
            leases: Leases::default(),
            history: VecDeque::new(),
            history_limit: options.history.get(),
            first_kept: 1,
            events,
        };
        MemoryStore {
            shared: Arc::new(Shared {
                state: Mutex::new(state),
                reaper_wake: Arc::new(Notify::new()),
                reaper_started: AtomicBool::new(false),
            }),
        }
    }

    /// Locks the state and ends the leases whose deadline has passed, so
    /// every operation sees expiry on time even if the reaper is late.
    fn state(&self) -> MutexGuard<'_, State> {
        let mut state = self.shared.lock();
        state.expire_due(Instant::now());
        state
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave the maps half-updated
        // in a way later operations trip over, so keep going.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl State {
    /// Bumps the revision for a write and returns it.
    fn next_revision(&mut self) -> Revision {
        self.revision += 1;
        Revision(self.revision)
    }

    /// Records the events of the write at `revision` (just taken with
    /// `next_revision`) and sends them to watchers.
    fn publish(&mut self, revision: Revision, events: Vec<WatchEvent>) {
        let batch = Arc::new(WatchBatch { revision, events });
        self.history.push_back(batch.clone());
        while self.history.len() > self.history_limit {
            if let Some(dropped) = self.history.pop_front() {
                self.first_kept = dropped.revision.0 + 1;
            }
        }
        // No receiver is fine: nobody is watching.
        let _ = self.events.send(batch);
    }

    /// Deletes `keys` (those that exist) in one revision.
    fn delete_keys(&mut self, keys: impl IntoIterator<Item = String>) {
        let mut removed = Vec::new();
        for key in keys {
            if let Some(kv) = self.kvs.remove(&key) {
                if let Some(lease) = kv.lease {
                    self.leases.detach(lease, &kv.key);
                }
                removed.push(kv.key);
            }
        }
        if removed.is_empty() {
            return;
        }
        let revision = self.next_revision();
        let events = removed
            .into_iter()
            .map(|key| WatchEvent::Delete {
                key,
                mod_revision: revision,
            })
            .collect();
        self.publish(revision, events);
    }

    /// Ends a lease: forgets it and deletes its keys.
    fn end_lease(&mut self, lease: LeaseId) -> Result<(), StoreError> {
        let keys = self
            .leases
            .remove(lease)
            .ok_or(StoreError::LeaseNotFound(lease))?;
        self.delete_keys(keys);
        Ok(())
    }

    fn expire_due(&mut self, now: Instant) {
        for lease in self.leases.due(now) {
            tracing::debug!(lease.id = %lease, "lease expired");
            let _ = self.end_lease(lease);
        }
    }
}

impl Store for MemoryStore {
    async fn put(
        &self,
        key: &str,
        value: Bytes,
        lease: Option<LeaseId>,
    ) -> Result<Revision, StoreError> {
        check_put(key, &value)?;
        let mut state = self.state();
        if let Some(lease) = lease {
            state.leases.attach(lease, key)?;
        }
        let previous = state.kvs.get(key).and_then(|kv| kv.lease);
        if let Some(previous) = previous.filter(|p| Some(*p) != lease) {
            state.leases.detach(previous, key);
        }
        let revision = state.next_revision();
        let kv = KeyValue {
            key: key.to_owned(),
            value,
            mod_revision: revision,
            lease,
        };
        state.kvs.insert(kv.key.clone(), kv.clone());
        state.publish(revision, vec![WatchEvent::Put(kv)]);
        Ok(revision)
    }

    async fn get(&self, key: &str) -> Result<Option<KeyValue>, StoreError> {
        Ok(self.state().kvs.get(key).cloned())
    }

    async fn delete(&self, key: &str) -> Result<bool, StoreError> {
        let mut state = self.state();
        if !state.kvs.contains_key(key) {
            return Ok(false);
        }
        state.delete_keys([key.to_owned()]);
        Ok(true)
    }

    async fn list(&self, prefix: &str) -> Result<(Vec<KeyValue>, Revision), StoreError> {
        let state = self.state();
        let kvs = state
            .kvs
            .range::<str, _>((Bound::Included(prefix), Bound::Unbounded))
            .take_while(|(key, _)| key.starts_with(prefix))
            .map(|(_, kv)| kv.clone())
            .collect();
        Ok((kvs, Revision(state.revision)))
    }

    async fn watch(&self, prefix: &str, from: Revision) -> Result<WatchStream, StoreError> {
        Ok(watch::start(&self.shared, prefix, from))
    }

    async fn grant_lease(&self, ttl: Duration) -> Result<LeaseId, StoreError> {
        if !self.shared.reaper_started.swap(true, Ordering::AcqRel) {
            lease::spawn_reaper(&self.shared);
        }
        let lease = self.state().leases.grant(ttl, Instant::now());
        self.shared.reaper_wake.notify_one();
        Ok(lease)
    }

    async fn keep_alive(&self, lease: LeaseId) -> Result<(), StoreError> {
        self.state().leases.refresh(lease, Instant::now())
    }

    async fn revoke(&self, lease: LeaseId) -> Result<(), StoreError> {
        self.state().end_lease(lease)
    }

    async fn compact(&self, revision: Revision) -> Result<(), StoreError> {
        let mut state = self.state();
        if revision.0 > state.revision {
            return Err(StoreError::rejected(format!(
                "cannot compact at future revision {revision} (current {})",
                state.revision
            )));
        }
        while state
            .history
            .front()
            .is_some_and(|batch| batch.revision < revision)
        {
            state.history.pop_front();
        }
        state.first_kept = state.first_kept.max(revision.0);
        Ok(())
    }
}

#[cfg(test)]
mod tests;
