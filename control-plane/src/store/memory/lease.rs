//! Leases of the embedded store: bookkeeping and the reaper task.
//!
//! A lease has a TTL in whole seconds (as in etcd), a deadline on tokio's
//! clock, and the set of keys bound to it. Deadlines are also indexed in
//! order, so finding the leases that are due is a range scan.
//!
//! Expiry happens in two places, both under the store's lock: every store
//! operation first ends the leases that are due (so no operation ever sees a
//! key whose lease has run out), and the reaper task ends them at their
//! deadline even when nothing else happens, so that watchers hear about an
//! expired registration promptly. The reaper sleeps until the earliest
//! deadline; a grant wakes it to look again. It holds only a weak reference
//! to the store and exits once the store is dropped.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Weak};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;

use super::Shared;
use crate::store::{LeaseId, StoreError, lease_ttl_secs};

#[derive(Debug, Default)]
pub(super) struct Leases {
    last_id: i64,
    by_id: HashMap<LeaseId, Lease>,
    deadlines: BTreeSet<(Instant, LeaseId)>,
}

#[derive(Debug)]
struct Lease {
    ttl: Duration,
    deadline: Instant,
    keys: BTreeSet<String>,
}

impl Leases {
    pub(super) fn grant(&mut self, ttl: Duration, now: Instant) -> LeaseId {
        self.last_id += 1;
        let id = LeaseId(self.last_id);
        let ttl = Duration::from_secs(lease_ttl_secs(ttl).unsigned_abs());
        let deadline = now + ttl;
        self.by_id.insert(
            id,
            Lease {
                ttl,
                deadline,
                keys: BTreeSet::new(),
            },
        );
        self.deadlines.insert((deadline, id));
        id
    }

    /// Pushes the lease's deadline a full TTL past `now`.
    pub(super) fn refresh(&mut self, id: LeaseId, now: Instant) -> Result<(), StoreError> {
        let lease = self
            .by_id
            .get_mut(&id)
            .ok_or(StoreError::LeaseNotFound(id))?;
        self.deadlines.remove(&(lease.deadline, id));
        lease.deadline = now + lease.ttl;
        self.deadlines.insert((lease.deadline, id));
        Ok(())
    }

    /// Binds `key` to the lease.
    pub(super) fn attach(&mut self, id: LeaseId, key: &str) -> Result<(), StoreError> {
        let lease = self
            .by_id
            .get_mut(&id)
            .ok_or(StoreError::LeaseNotFound(id))?;
        lease.keys.insert(key.to_owned());
        Ok(())
    }

    /// Unbinds `key` (deleted, or rebound to another lease).
    pub(super) fn detach(&mut self, id: LeaseId, key: &str) {
        if let Some(lease) = self.by_id.get_mut(&id) {
            lease.keys.remove(key);
        }
    }

    /// Forgets the lease; returns its keys, or `None` if there was no such
    /// lease.
    pub(super) fn remove(&mut self, id: LeaseId) -> Option<BTreeSet<String>> {
        let lease = self.by_id.remove(&id)?;
        self.deadlines.remove(&(lease.deadline, id));
        Some(lease.keys)
    }

    /// The leases whose deadline is at or before `now`.
    pub(super) fn due(&self, now: Instant) -> Vec<LeaseId> {
        self.deadlines
            .iter()
            .take_while(|(deadline, _)| *deadline <= now)
            .map(|(_, id)| *id)
            .collect()
    }

    pub(super) fn next_deadline(&self) -> Option<Instant> {
        self.deadlines.first().map(|(deadline, _)| *deadline)
    }
}

/// Starts the task that ends leases at their deadline.
pub(super) fn spawn_reaper(shared: &Arc<Shared>) {
    let wake = shared.reaper_wake.clone();
    // Bound to the store's lifetime: exits when the store is dropped.
    tokio::spawn(reap(Arc::downgrade(shared), wake));
}

async fn reap(shared: Weak<Shared>, wake: Arc<Notify>) {
    loop {
        let next = {
            let Some(shared) = shared.upgrade() else {
                return;
            };
            let mut state = shared.lock();
            state.expire_due(Instant::now());
            state.leases.next_deadline()
        };
        tokio::select! {
            () = wake.notified() => {}
            () = tokio::time::sleep_until(next.unwrap_or_else(Instant::now)), if next.is_some() => {}
        }
    }
}
