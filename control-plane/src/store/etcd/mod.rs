//! The etcd store: production's, through etcd-client.
//!
//! One [`EtcdStore`] holds one gRPC channel balanced over the configured
//! endpoints; clones share it. Every key is stored under the key prefix
//! (`/weft/` by default), which callers never see. Each request is bounded
//! by `request_timeout`; a request that runs out of time, like any transport
//! failure, is [`StoreError::Unavailable`] and may be retried.
//!
//! Listing a prefix reads pages of `list_page_size` keys, every page at the
//! revision of the first, so the listing is one consistent snapshot however
//! large it is; if that revision is compacted away mid-listing, the listing
//! starts over (a few times at most).
//!
//! Watches are in `watch`; errors are mapped in `convert`; connection
//! settings are in `options`.
//!
//! Tested against etcd 3.4.23 (Debian bookworm) by the conformance suite.

mod convert;
mod options;
mod watch;

use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use etcd_client::{
    Client, CompactionOptions, GetOptions, KvClient, LeaseClient, PutOptions, ResponseHeader,
    WatchClient,
};

use self::convert::{Op, key_value, map_error, prefix_range_end};
pub use self::options::{ClientCert, ConnectError, EtcdOptions, EtcdTls, EtcdUser, Password};
use super::{
    KeyValue, LeaseId, Revision, Store, StoreError, WatchStream, check_put, lease_ttl_secs,
};

/// The largest response we decode: a page of a listing or a batch of watch
/// events (etcd-client's default is 4 MiB, less than one page of large
/// values).
const MAX_RESPONSE_BYTES: usize = 64 * 1024 * 1024;

/// How many times a listing starts over when its revision is compacted.
const LIST_ATTEMPTS: usize = 3;

/// The etcd store. Clones share one connection.
#[derive(Clone)]
pub struct EtcdStore {
    inner: Arc<Inner>,
}

/// etcd-client's clients are large (kilobytes each): share them.
struct Inner {
    /// Owns the sender that manages the balanced channel's endpoints; kept
    /// so the channel outlives `connect`.
    _client: Client,
    kv: KvClient,
    watch: WatchClient,
    lease: LeaseClient,
    prefix: Arc<str>,
    endpoints: Arc<[String]>,
    request_timeout: Duration,
    page_size: i64,
}

impl fmt::Debug for EtcdStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EtcdStore")
            .field("endpoints", &self.inner.endpoints)
            .field("prefix", &self.inner.prefix)
            .finish_non_exhaustive()
    }
}

impl EtcdStore {
    /// Connects and checks that etcd answers (one read under the prefix),
    /// so a wrong endpoint, certificate or password fails here rather than
    /// at the first write.
    pub async fn connect(options: EtcdOptions) -> Result<Self, ConnectError> {
        if options.endpoints.is_empty() {
            return Err(ConnectError::NoEndpoints);
        }
        let unreachable = |source| ConnectError::Store {
            endpoints: options.endpoints.join(","),
            source,
        };
        let connect = Client::connect(&options.endpoints, Some(options.connect_options()?));
        let budget = options.connect_timeout + options.request_timeout;
        let client = match tokio::time::timeout(budget, connect).await {
            Err(_) => return Err(unreachable(timed_out(budget))),
            // Bad URLs and TLS settings fail before anything is sent.
            Ok(Err(
                e @ (etcd_client::Error::InvalidArgs(_)
                | etcd_client::Error::InvalidUri(_)
                | etcd_client::Error::TransportError(_)),
            )) => return Err(ConnectError::Invalid { source: e.into() }),
            Ok(Err(e)) => return Err(unreachable(map_error(e, Op::Other))),
            Ok(Ok(client)) => client,
        };
        let inner = Inner {
            _client: client.clone(),
            kv: client
                .kv_client()
                .max_decoding_message_size(MAX_RESPONSE_BYTES),
            watch: client
                .watch_client()
                .max_decoding_message_size(MAX_RESPONSE_BYTES),
            lease: client.lease_client(),
            prefix: options.normalized_prefix().into(),
            endpoints: options.endpoints.clone().into(),
            request_timeout: options.request_timeout,
            page_size: i64::from(options.list_page_size.get()),
        };
        let store = EtcdStore {
            inner: Arc::new(inner),
        };
        store.ping().await.map_err(unreachable)?;
        tracing::info!(etcd.endpoints = %options.endpoints.join(","), etcd.prefix = %store.inner.prefix, "connected to etcd");
        Ok(store)
    }

    /// Checks that etcd answers reads under the prefix; returns its current
    /// revision.
    pub async fn ping(&self) -> Result<Revision, StoreError> {
        let mut kv = self.inner.kv.clone();
        let options = GetOptions::new().with_prefix().with_count_only();
        let response = self
            .call(
                Op::Other,
                kv.get(self.inner.prefix.as_bytes(), Some(options)),
            )
            .await?;
        header_revision(response.header())
    }

    /// The key prefix every key is stored under.
    pub fn key_prefix(&self) -> &str {
        &self.inner.prefix
    }

    fn full_key(&self, key: &str) -> String {
        format!("{}{key}", self.inner.prefix)
    }

    /// Runs one request within the request timeout, mapping its error.
    async fn call<T>(
        &self,
        op: Op<'_>,
        request: impl Future<Output = Result<T, etcd_client::Error>>,
    ) -> Result<T, StoreError> {
        match tokio::time::timeout(self.inner.request_timeout, request).await {
            Ok(result) => result.map_err(|e| map_error(e, op)),
            Err(_) => Err(timed_out(self.inner.request_timeout)),
        }
    }

    /// One consistent listing, page by page.
    async fn list_once(&self, prefix: &str) -> Result<(Vec<KeyValue>, Revision), StoreError> {
        let first = self.full_key(prefix);
        let end = prefix_range_end(first.as_bytes());
        let mut kv = self.inner.kv.clone();
        let mut start = first.into_bytes();
        let mut revision = None;
        let mut kvs = Vec::new();
        loop {
            let mut options = GetOptions::new()
                .with_range(end.clone())
                .with_limit(self.inner.page_size);
            if let Some(Revision(revision)) = revision {
                options = options.with_revision(revision);
            }
            let response = self
                .call(Op::Other, kv.get(start.clone(), Some(options)))
                .await?;
            let at = *revision.get_or_insert(header_revision(response.header())?);
            for item in response.kvs() {
                kvs.push(key_value(item, &self.inner.prefix)?);
            }
            match response.kvs().last() {
                Some(last) if response.more() => {
                    // The next page starts just after the last key.
                    start = last.key().to_vec();
                    start.push(0);
                }
                _ => return Ok((kvs, at)),
            }
        }
    }
}

fn timed_out(after: Duration) -> StoreError {
    StoreError::unavailable(format!("etcd did not answer within {after:?}"))
}

fn header_revision(header: Option<&ResponseHeader>) -> Result<Revision, StoreError> {
    header
        .map(|h| Revision(h.revision()))
        .ok_or_else(|| StoreError::unavailable("etcd response without a header"))
}

impl Store for EtcdStore {
    async fn put(
        &self,
        key: &str,
        value: Bytes,
        lease: Option<LeaseId>,
    ) -> Result<Revision, StoreError> {
        check_put(key, &value)?;
        let op = Op::Put {
            key,
            size: value.len(),
            lease,
        };
        let options = lease.map(|lease| PutOptions::new().with_lease(lease.0));
        let mut kv = self.inner.kv.clone();
        let response = self
            .call(op, kv.put(self.full_key(key), Vec::from(value), options))
            .await?;
        header_revision(response.header())
    }

    async fn get(&self, key: &str) -> Result<Option<KeyValue>, StoreError> {
        let mut kv = self.inner.kv.clone();
        let response = self
            .call(Op::Other, kv.get(self.full_key(key), None))
            .await?;
        response
            .kvs()
            .first()
            .map(|item| key_value(item, &self.inner.prefix))
            .transpose()
    }

    async fn delete(&self, key: &str) -> Result<bool, StoreError> {
        let mut kv = self.inner.kv.clone();
        let response = self
            .call(Op::Other, kv.delete(self.full_key(key), None))
            .await?;
        Ok(response.deleted() > 0)
    }

    async fn list(&self, prefix: &str) -> Result<(Vec<KeyValue>, Revision), StoreError> {
        let mut attempt = 1;
        loop {
            match self.list_once(prefix).await {
                Err(StoreError::Compacted { .. }) if attempt < LIST_ATTEMPTS => attempt += 1,
                result => return result,
            }
        }
    }

    async fn watch(&self, prefix: &str, from: Revision) -> Result<WatchStream, StoreError> {
        watch::start(self, prefix, from).await
    }

    async fn grant_lease(&self, ttl: Duration) -> Result<LeaseId, StoreError> {
        let mut lease = self.inner.lease.clone();
        let response = self
            .call(Op::Other, lease.grant(lease_ttl_secs(ttl), None))
            .await?;
        if !response.error().is_empty() {
            return Err(StoreError::rejected(response.error().to_owned()));
        }
        Ok(LeaseId(response.id()))
    }

    async fn keep_alive(&self, id: LeaseId) -> Result<(), StoreError> {
        // etcd-client sends one refresh and checks its answer; dropping the
        // keeper and its stream ends the gRPC stream.
        let mut lease = self.inner.lease.clone();
        self.call(Op::Lease(id), lease.keep_alive(id.0)).await?;
        Ok(())
    }

    async fn revoke(&self, id: LeaseId) -> Result<(), StoreError> {
        let mut lease = self.inner.lease.clone();
        self.call(Op::Lease(id), lease.revoke(id.0)).await?;
        Ok(())
    }

    async fn compact(&self, revision: Revision) -> Result<(), StoreError> {
        let mut kv = self.inner.kv.clone();
        // Physical: return once the history is really gone, so a watch from
        // before `revision` is refused from then on.
        let options = CompactionOptions::new().with_physical();
        match self
            .call(Op::Other, kv.compact(revision.0, Some(options)))
            .await
        {
            Ok(_) | Err(StoreError::Compacted { .. }) => Ok(()),
            Err(e) => Err(e),
        }
    }
}
