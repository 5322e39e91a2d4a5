//! [`AnyStore`]: the store chosen at start-up, etcd or embedded.
//!
//! [`Store`] uses `impl Future` returns, so it cannot be a trait object;
//! this enum is the one place that dispatches, and everything above it can
//! stay non-generic.

use std::time::Duration;

use bytes::Bytes;

use super::etcd::EtcdStore;
use super::memory::MemoryStore;
use super::{KeyValue, LeaseId, Revision, Store, StoreError, WatchStream};

/// Either store, behind the one [`Store`] API.
#[derive(Clone, Debug)]
pub enum AnyStore {
    /// etcd: production.
    Etcd(EtcdStore),
    /// The embedded in-memory store: one process, nothing persists.
    Memory(MemoryStore),
}

impl From<EtcdStore> for AnyStore {
    fn from(store: EtcdStore) -> Self {
        AnyStore::Etcd(store)
    }
}

impl From<MemoryStore> for AnyStore {
    fn from(store: MemoryStore) -> Self {
        AnyStore::Memory(store)
    }
}

/// Calls the same method on whichever store this is.
macro_rules! dispatch {
    ($self:ident . $method:ident ( $($arg:expr),* )) => {
        match $self {
            AnyStore::Etcd(store) => store.$method($($arg),*).await,
            AnyStore::Memory(store) => store.$method($($arg),*).await,
        }
    };
}

impl Store for AnyStore {
    async fn put(
        &self,
        key: &str,
        value: Bytes,
        lease: Option<LeaseId>,
    ) -> Result<Revision, StoreError> {
        dispatch!(self.put(key, value, lease))
    }

    async fn get(&self, key: &str) -> Result<Option<KeyValue>, StoreError> {
        dispatch!(self.get(key))
    }

    async fn delete(&self, key: &str) -> Result<bool, StoreError> {
        dispatch!(self.delete(key))
    }

    async fn list(&self, prefix: &str) -> Result<(Vec<KeyValue>, Revision), StoreError> {
        dispatch!(self.list(prefix))
    }

    async fn watch(&self, prefix: &str, from: Revision) -> Result<WatchStream, StoreError> {
        dispatch!(self.watch(prefix, from))
    }

    async fn grant_lease(&self, ttl: Duration) -> Result<LeaseId, StoreError> {
        dispatch!(self.grant_lease(ttl))
    }

    async fn keep_alive(&self, lease: LeaseId) -> Result<(), StoreError> {
        dispatch!(self.keep_alive(lease))
    }

    async fn revoke(&self, lease: LeaseId) -> Result<(), StoreError> {
        dispatch!(self.revoke(lease))
    }

    async fn compact(&self, revision: Revision) -> Result<(), StoreError> {
        dispatch!(self.compact(revision))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::store::memory::MemoryOptions;

    #[tokio::test]
    async fn dispatches_to_the_store_it_holds() {
        let memory = MemoryStore::new(MemoryOptions::default());
        let any = AnyStore::from(memory.clone());
        let revision = any.put("k", Bytes::from_static(b"v"), None).await.unwrap();
        let kv = memory.get("k").await.unwrap().unwrap();
        assert_eq!(kv.mod_revision, revision);
        assert_eq!(any.list("").await.unwrap(), (vec![kv], revision));
    }
}
