//! The etcd store: production's, through etcd-client.
//!
//! One [`EtcdStore`] holds one client per configured endpoint (cluster
//! member); clones share them. Requests go to one member, the current one
//! (at first a random one, so that replicas spread over the cluster), while
//! it answers; a request that fails with [`StoreError::Unavailable`]
//! (refused connection, broken stream, no leader, timeout) moves the store
//! to the next member and is sent again there, within the same
//! `request_timeout`, so losing one member of a cluster costs a retry, not
//! an outage. (etcd-client's own balanced channel keeps sending a share of
//! the requests to a dead member: etcdv3/etcd-client#39.) A member's client
//! is connected when first needed, so a member down at start-up is only
//! skipped. Every key is stored under the key prefix (`/weft/` by default),
//! which callers never see. A request that runs out of time, like any
//! transport failure, is [`StoreError::Unavailable`] and may be retried.
//!
//! Listing a prefix reads pages of `list_page_size` keys, every page at the
//! revision of the first, so the listing is one consistent snapshot however
//! large it is; if that revision is compacted away mid-listing, the listing
//! starts over (a few times at most).
//!
//! Watches are in `watch`; lease refreshes, all over one long-lived
//! keep-alive stream, in `lease`; errors are mapped in `convert`; connection
//! settings are in `options`.
//!
//! Tested against etcd 3.4.23 (Debian bookworm) by the conformance suite.

mod convert;
mod lease;
mod options;
mod watch;

use std::fmt;
use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use etcd_client::{
    Client, CompactionOptions, ConnectOptions, GetOptions, KvClient, LeaseClient, PutOptions,
    ResponseHeader, WatchClient,
};
use tokio::time::Instant;

use self::convert::{Op, key_value, map_error, prefix_range_end};
use self::lease::KeepAlives;
pub use self::options::{ClientCert, ConnectError, EtcdOptions, EtcdTls, EtcdUser, Password};
use super::{
    ErrorChain, KeyValue, LeaseId, Revision, Store, StoreError, WatchStream, check_put,
    lease_ttl_secs,
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
    /// One per endpoint, in the configured order.
    members: Box<[Member]>,
    /// The index (modulo the count) of the member requests go to.
    current: AtomicUsize,
    connect_options: ConnectOptions,
    prefix: Arc<str>,
    endpoints: Arc<[String]>,
    request_timeout: Duration,
    page_size: i64,
    /// The task that sends every lease refresh over one stream.
    keep_alives: KeepAlives,
}

/// One endpoint and its clients, connected when needed.
struct Member {
    url: String,
    clients: Mutex<Option<Arc<Clients>>>,
}

impl Member {
    fn slot(&self) -> MutexGuard<'_, Option<Arc<Clients>>> {
        // Only ever held to read or swap an `Option`: a panic cannot leave
        // it half-written.
        self.clients.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The clients of one member (each request clones the one it uses: they
/// share one channel).
struct Clients {
    /// Owns the sender that manages the member's channel; kept so the
    /// channel outlives `connect`.
    _client: Client,
    kv: KvClient,
    watch: WatchClient,
    lease: LeaseClient,
}

impl Clients {
    fn new(client: Client) -> Self {
        Self {
            kv: client
                .kv_client()
                .max_decoding_message_size(MAX_RESPONSE_BYTES),
            watch: client
                .watch_client()
                .max_decoding_message_size(MAX_RESPONSE_BYTES),
            lease: client.lease_client(),
            _client: client,
        }
    }
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
        let connect_options = options.connect_options()?;
        let members: Box<[Member]> = options
            .endpoints
            .iter()
            .map(|url| Member {
                url: url.clone(),
                clients: Mutex::new(None),
            })
            .collect();
        let budget = options.connect_timeout + options.request_timeout;
        for member in &members {
            let connect = Client::connect([&member.url], Some(connect_options.clone()));
            match tokio::time::timeout(budget, connect).await {
                // Bad URLs and TLS settings fail before anything is sent.
                Ok(Err(
                    e @ (etcd_client::Error::InvalidArgs(_)
                    | etcd_client::Error::InvalidUri(_)
                    | etcd_client::Error::TransportError(_)),
                )) => return Err(ConnectError::Invalid { source: e.into() }),
                Ok(Err(e)) => match map_error(e, Op::Other) {
                    // A refused password is refused by every member.
                    e @ StoreError::Rejected { .. } => return Err(unreachable(e)),
                    // This member is down: it is connected when first needed.
                    e => {
                        tracing::warn!(etcd.endpoint = %member.url, error = %e, "etcd member unreachable")
                    }
                },
                Err(_) => tracing::warn!(
                    etcd.endpoint = %member.url,
                    error = %timed_out(budget),
                    "etcd member unreachable"
                ),
                Ok(Ok(client)) => *member.slot() = Some(Arc::new(Clients::new(client))),
            }
        }
        let first = first_member(members.len());
        let inner = Arc::new_cyclic(|weak| Inner {
            members,
            current: AtomicUsize::new(first),
            connect_options,
            prefix: options.normalized_prefix().into(),
            endpoints: options.endpoints.clone().into(),
            request_timeout: options.request_timeout,
            page_size: i64::from(options.list_page_size.get()),
            keep_alives: KeepAlives::start(weak.clone(), options.request_timeout),
        });
        let store = EtcdStore { inner };
        store.ping().await.map_err(unreachable)?;
        tracing::info!(
            etcd.endpoints = %options.endpoints.join(","),
            etcd.member = %store.current_member(),
            etcd.prefix = %store.inner.prefix,
            "connected to etcd"
        );
        Ok(store)
    }

    /// Checks that etcd answers reads under the prefix; returns its current
    /// revision.
    pub async fn ping(&self) -> Result<Revision, StoreError> {
        let options = GetOptions::new().with_prefix().with_count_only();
        let response = self
            .call(Op::Other, |c| {
                let (mut kv, options) = (c.kv.clone(), options.clone());
                let key = self.inner.prefix.as_bytes().to_vec();
                async move { kv.get(key, Some(options)).await }
            })
            .await?;
        header_revision(response.header())
    }

    /// The endpoint requests go to now.
    pub fn current_member(&self) -> &str {
        let count = self.inner.members.len();
        let index = self.inner.current.load(Ordering::Relaxed) % count.max(1);
        self.inner.members.get(index).map_or("", |m| m.url.as_str())
    }

    /// The key prefix every key is stored under.
    pub fn key_prefix(&self) -> &str {
        &self.inner.prefix
    }

    fn full_key(&self, key: &str) -> String {
        format!("{}{key}", self.inner.prefix)
    }

    /// Runs one request (`request` makes it for a member's clients) within
    /// the request timeout, mapping its error. When the current member fails
    /// it with [`StoreError::Unavailable`] (or does not answer within its
    /// share of the time: what is left divided by the members not tried
    /// yet), the next member becomes current, the failed member's channel is
    /// dropped (it is connected afresh when next needed), and the request is
    /// sent to the next member. Every Weft request is safe to send twice
    /// (puts and deletes of whole values, lease refreshes and revocations; a
    /// lease granted twice expires unused).
    async fn call<T, F, Fut>(&self, op: Op<'_>, request: F) -> Result<T, StoreError>
    where
        F: FnMut(&Clients) -> Fut,
        Fut: Future<Output = Result<T, etcd_client::Error>>,
    {
        Ok(self.call_on(op, request).await?.0)
    }

    /// [`call`](Self::call), also returning the member that answered and
    /// its clients (for a stream that outlives the call).
    async fn call_on<T, F, Fut>(
        &self,
        op: Op<'_>,
        mut request: F,
    ) -> Result<(T, usize, Arc<Clients>), StoreError>
    where
        F: FnMut(&Clients) -> Fut,
        Fut: Future<Output = Result<T, etcd_client::Error>>,
    {
        let deadline = Instant::now() + self.inner.request_timeout;
        let count = self.inner.members.len();
        let mut last = None;
        for tried in 0..count {
            let now = Instant::now();
            if now >= deadline {
                break;
            }
            let share = (deadline - now) / u32::try_from(count - tried).unwrap_or(1);
            let until = now + share;
            let index = self.inner.current.load(Ordering::Relaxed) % count;
            let (error, clients) = match tokio::time::timeout_at(until, self.member(index)).await {
                Err(_) => (timed_out(share), None),
                Ok(Err(error)) => (error, None),
                Ok(Ok(clients)) => match tokio::time::timeout_at(until, request(&clients)).await {
                    Ok(Ok(value)) => return Ok((value, index, clients)),
                    Ok(Err(error)) => (map_error(error, op), Some(clients)),
                    Err(_) => (timed_out(share), Some(clients)),
                },
            };
            if !matches!(error, StoreError::Unavailable { .. }) {
                return Err(error);
            }
            self.member_failed(index, clients.as_ref(), &error);
            last = Some(error);
        }
        Err(last.unwrap_or_else(|| timed_out(self.inner.request_timeout)))
    }

    /// After member `index` failed a request with `error`: if it is
    /// unavailable, drops `clients` (the channel the request went over, if it
    /// got that far) and makes the next member current, unless another
    /// request did already.
    fn member_failed(&self, index: usize, clients: Option<&Arc<Clients>>, error: &StoreError) {
        if !matches!(error, StoreError::Unavailable { .. }) {
            return;
        }
        if let Some(clients) = clients {
            self.forget(index, clients);
        }
        let count = self.inner.members.len();
        if count > 1 {
            let next = (index + 1) % count;
            if self
                .inner
                .current
                .compare_exchange(index, next, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
            {
                tracing::warn!(
                    etcd.endpoint = %self.inner.members[index].url,
                    etcd.next = %self.inner.members[next].url,
                    error = %ErrorChain(error),
                    "etcd member failed a request; moving to the next one"
                );
            }
        }
    }

    /// Member `index`'s clients, connecting them if needed.
    async fn member(&self, index: usize) -> Result<Arc<Clients>, StoreError> {
        let member = &self.inner.members[index];
        if let Some(clients) = member.slot().as_ref() {
            return Ok(Arc::clone(clients));
        }
        let client = Client::connect([&member.url], Some(self.inner.connect_options.clone()))
            .await
            .map_err(|e| map_error(e, Op::Other))?;
        let clients = Arc::new(Clients::new(client));
        *member.slot() = Some(Arc::clone(&clients));
        Ok(clients)
    }

    /// Drops member `index`'s channel if it is still `clients`, so the next
    /// request connects afresh (a channel to a member that went away may
    /// never recover by itself).
    fn forget(&self, index: usize, clients: &Arc<Clients>) {
        let mut slot = self.inner.members[index].slot();
        if slot.as_ref().is_some_and(|c| Arc::ptr_eq(c, clients)) {
            *slot = None;
        }
    }

    /// One consistent listing, page by page.
    async fn list_once(&self, prefix: &str) -> Result<(Vec<KeyValue>, Revision), StoreError> {
        let first = self.full_key(prefix);
        let end = prefix_range_end(first.as_bytes());
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
                .call(Op::Other, |c| {
                    let (mut kv, key, options) = (c.kv.clone(), start.clone(), options.clone());
                    async move { kv.get(key, Some(options)).await }
                })
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

/// The member a new store sends its requests to first: a random one, so that
/// control-plane replicas given the same endpoint list spread their requests
/// and watches over the cluster instead of all loading the first member
/// (each moves on to the next member, in list order, when its own fails).
fn first_member(count: usize) -> usize {
    use rand::Rng as _;
    if count <= 1 {
        0
    } else {
        rand::rng().random_range(0..count)
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
        let full_key = self.full_key(key);
        let response = self
            .call(op, |c| {
                let (mut kv, key) = (c.kv.clone(), full_key.clone());
                let (value, options) = (Vec::from(value.clone()), options.clone());
                async move { kv.put(key, value, options).await }
            })
            .await?;
        header_revision(response.header())
    }

    async fn get(&self, key: &str) -> Result<Option<KeyValue>, StoreError> {
        let full_key = self.full_key(key);
        let response = self
            .call(Op::Other, |c| {
                let (mut kv, key) = (c.kv.clone(), full_key.clone());
                async move { kv.get(key, None).await }
            })
            .await?;
        response
            .kvs()
            .first()
            .map(|item| key_value(item, &self.inner.prefix))
            .transpose()
    }

    async fn delete(&self, key: &str) -> Result<bool, StoreError> {
        let full_key = self.full_key(key);
        let response = self
            .call(Op::Other, |c| {
                let (mut kv, key) = (c.kv.clone(), full_key.clone());
                async move { kv.delete(key, None).await }
            })
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
        let response = self
            .call(Op::Other, |c| {
                let mut lease = c.lease.clone();
                async move { lease.grant(lease_ttl_secs(ttl), None).await }
            })
            .await?;
        if !response.error().is_empty() {
            return Err(StoreError::rejected(response.error().to_owned()));
        }
        Ok(LeaseId(response.id()))
    }

    async fn keep_alive(&self, id: LeaseId) -> Result<(), StoreError> {
        // Over the store's one keep-alive stream (see `lease`).
        self.inner
            .keep_alives
            .refresh(id, self.inner.request_timeout)
            .await
    }

    async fn revoke(&self, id: LeaseId) -> Result<(), StoreError> {
        self.call(Op::Lease(id), |c| {
            let mut lease = c.lease.clone();
            async move { lease.revoke(id.0).await }
        })
        .await?;
        Ok(())
    }

    async fn compact(&self, revision: Revision) -> Result<(), StoreError> {
        // Physical: return once the history is really gone, so a watch from
        // before `revision` is refused from then on.
        match self
            .call(Op::Other, |c| {
                let mut kv = c.kv.clone();
                let options = CompactionOptions::new().with_physical();
                async move { kv.compact(revision.0, Some(options)).await }
            })
            .await
        {
            Ok(_) | Err(StoreError::Compacted { .. }) => Ok(()),
            Err(e) => Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::first_member;

    #[test]
    fn the_first_member_is_any_of_them() {
        assert_eq!(first_member(0), 0);
        assert_eq!(first_member(1), 0);
        let mut seen = [0u32; 3];
        for _ in 0..300 {
            let i = first_member(3);
            assert!(i < 3);
            seen[i] += 1;
        }
        // 300 draws: each member about 100 times; none below 40 but with
        // odds far under one in a billion.
        assert!(seen.iter().all(|&n| n >= 40), "{seen:?}");
    }
}
