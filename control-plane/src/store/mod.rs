//! The store: where every piece of control-plane state lives.
//!
//! [`Store`] is a small key-value API shaped after etcd's: keys are strings
//! (relative to a prefix, `/weft/` by default, that callers never see),
//! every write bumps one global [`Revision`], a [`list`](Store::list) reports
//! the revision it reflects, and a [`watch`](Store::watch) from that revision
//! delivers every later change, in order, with no gap. That is the whole
//! contract the rest of the control plane relies on to keep a cache in sync:
//! list, then watch from the list's revision; on [`StoreError::Compacted`],
//! list and watch again.
//!
//! Keys can be bound to a lease: when the lease expires (nobody called
//! [`keep_alive`](Store::keep_alive) within its TTL) or is revoked, its keys
//! are deleted in one revision and watchers see the deletions. This is how a
//! dead sidecar's registration disappears by itself. [`keep_lease_alive`]
//! refreshes a lease until it is cancelled.
//!
//! Two implementations pass one conformance suite
//! (`tests/store_conformance.rs`): [`etcd::EtcdStore`] for production and
//! [`memory::MemoryStore`] for a single process (`--dev`, nothing persists).
//! [`AnyStore`] picks one at run time.
//!
//! Limits shared by both: values over [`MAX_VALUE_BYTES`] are refused with
//! [`StoreError::TooLarge`] before they reach etcd (which caps requests at
//! 1.5 MiB), keys must not be empty, and lease TTLs are whole seconds
//! (rounded up, at least one), as etcd counts them.

mod any;
mod error;
pub mod etcd;
pub mod memory;
mod types;

use std::future::Future;
use std::time::Duration;

use bytes::Bytes;
use tokio_util::sync::CancellationToken;

pub use any::AnyStore;
pub use error::{BoxError, ErrorChain, StoreError};
pub use types::{KeyValue, LeaseId, Revision, WatchBatch, WatchEvent, WatchStream};

/// The key prefix stores use unless told otherwise.
pub const DEFAULT_KEY_PREFIX: &str = "/weft/";

/// The largest value a store accepts: etcd's request limit (1.5 MiB).
pub const MAX_VALUE_BYTES: usize = 1536 * 1024;

/// A revisioned key-value store with prefix watches and leases.
///
/// Every method is cancel-safe in the sense that dropping its future leaves
/// the store consistent, although a write may or may not have happened.
/// Futures are `Send` so callers can spawn them.
pub trait Store: Send + Sync {
    /// Creates or replaces `key`, bound to `lease` if given; returns the
    /// revision of the write.
    fn put(
        &self,
        key: &str,
        value: Bytes,
        lease: Option<LeaseId>,
    ) -> impl Future<Output = Result<Revision, StoreError>> + Send;

    /// The key's current value, if it exists.
    fn get(&self, key: &str) -> impl Future<Output = Result<Option<KeyValue>, StoreError>> + Send;

    /// Deletes `key`; returns whether it existed. Deleting a missing key
    /// does not bump the revision.
    fn delete(&self, key: &str) -> impl Future<Output = Result<bool, StoreError>> + Send;

    /// Every key starting with `prefix`, sorted by key, and the store
    /// revision the listing reflects (pass it to [`watch`](Store::watch)).
    fn list(
        &self,
        prefix: &str,
    ) -> impl Future<Output = Result<(Vec<KeyValue>, Revision), StoreError>> + Send;

    /// Watches every key starting with `prefix`, delivering each change with
    /// a revision strictly greater than `from`, in revision order.
    ///
    /// If the store can no longer replay from `from` (compacted), the stream
    /// yields [`StoreError::Compacted`] and ends: list again and watch from
    /// the list's revision. The call itself fails only when the store cannot
    /// be reached.
    fn watch(
        &self,
        prefix: &str,
        from: Revision,
    ) -> impl Future<Output = Result<WatchStream, StoreError>> + Send;

    /// Grants a lease that lives for `ttl` (rounded up to whole seconds)
    /// unless refreshed.
    fn grant_lease(
        &self,
        ttl: Duration,
    ) -> impl Future<Output = Result<LeaseId, StoreError>> + Send;

    /// Refreshes the lease once: it lives a full TTL from now.
    /// [`StoreError::LeaseNotFound`] if it already expired or was revoked.
    fn keep_alive(&self, lease: LeaseId) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Ends the lease now, deleting its keys in one revision.
    fn revoke(&self, lease: LeaseId) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Discards the history before `revision`: watches from earlier
    /// revisions then yield [`StoreError::Compacted`]. Production etcd
    /// clusters usually compact by themselves (`--auto-compaction-*`);
    /// compacting an already compacted revision is not an error.
    fn compact(&self, revision: Revision) -> impl Future<Output = Result<(), StoreError>> + Send;
}

// Keeping a lease alive. The control plane holds one lease per registered
// sidecar and refreshes it while the sidecar's stream is open. Three
// refreshes per TTL mean one lost or slow refresh never lets the lease lapse.
// An unavailable store is retried at the same pace: etcd keeps the lease while
// we cannot reach it, and if the outage outlasts the TTL the next refresh says
// so with `LeaseNotFound`, which ends the loop so the caller can register
// again.

/// The shortest pause between refreshes, whatever the TTL.
const MIN_KEEP_ALIVE_INTERVAL: Duration = Duration::from_millis(100);

/// Refreshes `lease` (granted with `ttl`) every third of its TTL until
/// `cancel` fires (then `Ok`) or the lease is gone or refused (then the
/// error). Unavailability is logged and retried. Spawn it in the caller's
/// task tracker; it does not revoke the lease when cancelled.
pub async fn keep_lease_alive<S: Store>(
    store: &S,
    lease: LeaseId,
    ttl: Duration,
    cancel: &CancellationToken,
) -> Result<(), StoreError> {
    let interval = (ttl / 3).max(MIN_KEEP_ALIVE_INTERVAL);
    loop {
        let refreshed = tokio::select! {
            () = cancel.cancelled() => return Ok(()),
            refreshed = store.keep_alive(lease) => refreshed,
        };
        match refreshed {
            Ok(()) => {}
            Err(e) if e.is_retryable() => {
                tracing::warn!(lease.id = %lease, error = %ErrorChain(&e), "lease refresh failed; retrying");
            }
            Err(e) => return Err(e),
        }
        tokio::select! {
            () = cancel.cancelled() => return Ok(()),
            () = tokio::time::sleep(interval) => {}
        }
    }
}

/// Checks a write before it goes anywhere: a non-empty key and a value
/// within [`MAX_VALUE_BYTES`].
pub(crate) fn check_put(key: &str, value: &[u8]) -> Result<(), StoreError> {
    if key.is_empty() {
        return Err(StoreError::rejected("empty key"));
    }
    if value.len() > MAX_VALUE_BYTES {
        return Err(StoreError::TooLarge {
            key: key.to_owned(),
            size: value.len(),
            limit: MAX_VALUE_BYTES,
        });
    }
    Ok(())
}

/// A lease TTL as etcd counts it: whole seconds, rounded up, at least one.
pub(crate) fn lease_ttl_secs(ttl: Duration) -> i64 {
    let secs = ttl.as_secs() + u64::from(ttl.subsec_nanos() > 0);
    i64::try_from(secs.max(1)).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ttl_rounds_up_to_whole_seconds() {
        assert_eq!(lease_ttl_secs(Duration::ZERO), 1);
        assert_eq!(lease_ttl_secs(Duration::from_millis(200)), 1);
        assert_eq!(lease_ttl_secs(Duration::from_secs(2)), 2);
        assert_eq!(lease_ttl_secs(Duration::from_millis(2001)), 3);
    }

    #[test]
    fn puts_are_checked_before_they_are_sent() {
        assert!(check_put("k", &[0; MAX_VALUE_BYTES]).is_ok());
        assert!(matches!(
            check_put("k", &[0; MAX_VALUE_BYTES + 1]),
            Err(StoreError::TooLarge { size, .. }) if size == MAX_VALUE_BYTES + 1
        ));
        assert!(matches!(
            check_put("", b"v"),
            Err(StoreError::Rejected { .. })
        ));
    }
}
