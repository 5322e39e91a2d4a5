//! The sidecar-facing gRPC API: registration with leases, and the push of the
//! directory and policies.
//!
//! **Register**: the first message registers an instance. The control plane
//! validates it (over mTLS, the instance must be of the service the sidecar's
//! certificate names), writes it under `services/<name>/instances/<id>` bound to a lease
//! of `lease_ttl`, answers with the TTL and revision, and keeps the lease alive for
//! as long as the stream stays open. `Deregister` revokes the lease at once (the
//! graceful path, after the sidecar drained); a stream that just ends stops the
//! keep-alive, so a dead sidecar disappears within the TTL. If the store loses the
//! lease while the stream is open (etcd unreachable for longer than the TTL), the
//! instance is registered again: a live sidecar is never dropped for the store's
//! trouble. A `health` message (the sidecar's check of its app changed) rewrites
//! the registration, under the same lease, with the new health; subscribers
//! then see the instance healthy or unhealthy. `live_instances` counts only
//! healthy instances: an unhealthy one takes no traffic, so no share of a
//! service-wide limit.
//!
//! **Subscribe**: a sidecar names the services it wants; the first response is a
//! full snapshot of them, later responses carry only the services that changed
//! (each complete) and those that disappeared. Every response carries the store
//! revision it reflects, never going backwards on a stream (nor from one replica
//! to a fresh one: the first response waits until the view has listed the
//! store). All subscribers read
//! one in-memory [`DirectoryView`] (one store watch per replica); a change wakes
//! each subscriber, which waits [`COALESCE`] for the burst to settle and then sends
//! one message with the newest state. A slow subscriber only ever gets the newest
//! state: nothing queues for it beyond one bounded message buffer.

use std::collections::{BTreeMap, BTreeSet};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::Stream;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming};
use weft_api::InstanceRecord;
use weft_api::v1::control_plane_server::ControlPlane;
use weft_api::v1::{
    self, RegisterRequest, RegisterResponse, ServiceState, SubscribeRequest, SubscribeResponse,
    register_request,
};

use crate::keys;
use crate::metrics::{Metrics, Rejection};
use crate::store::{ErrorChain, LeaseId, Store, StoreError, keep_lease_alive, lease_ttl_secs};
use crate::tasks::Tasks;
use crate::tls::PeerService;
use crate::view::{DirectoryView, ServiceEntry};

/// The sidecars' longest reconnect backoff (weft-proxy's `BACKOFF_MAX`): the
/// warm-up adds it to the lease TTL.
pub const SIDECAR_BACKOFF_MAX: Duration = Duration::from_secs(10);
/// How long a subscriber lets a burst of changes settle before sending.
pub const COALESCE: Duration = Duration::from_millis(20);
/// Most services one stream may subscribe to.
const MAX_SUBSCRIPTIONS: usize = 10_000;
/// Responses buffered per stream.
const STREAM_BUFFER: usize = 4;

type RspStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

/// The gRPC service.
#[derive(Debug)]
pub struct Push<S> {
    store: Arc<S>,
    view: watch::Receiver<Arc<DirectoryView>>,
    lease_ttl: Duration,
    /// Until when messages say `warming` (see [`Push::new`]).
    warm_until: Instant,
    metrics: Arc<Metrics>,
    /// Owns each stream's task; its token stops them.
    tasks: Tasks,
}

impl<S> Push<S> {
    /// `warm_up` is how long after this call the control plane's view may
    /// still lack live instances: ones whose registrations expired while no
    /// control plane was up, and whose sidecars have not reconnected yet. Until
    /// then every message says `warming`, so sidecars keep what they knew;
    /// when it ends, each stream that was told so gets a full message. A lease
    /// TTL plus [`SIDECAR_BACKOFF_MAX`] covers a sidecar that was backing off.
    pub fn new(
        store: Arc<S>,
        view: watch::Receiver<Arc<DirectoryView>>,
        lease_ttl: Duration,
        warm_up: Duration,
        metrics: Arc<Metrics>,
        tasks: Tasks,
    ) -> Self {
        Self {
            store,
            view,
            lease_ttl,
            warm_until: Instant::now() + warm_up,
            metrics,
            tasks,
        }
    }
}

fn receiver_stream<T: Send + 'static>(rx: mpsc::Receiver<Result<T, Status>>) -> RspStream<T> {
    Box::pin(futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    }))
}

fn unavailable(what: &str, e: &StoreError) -> Status {
    Status::unavailable(format!("{what}: {}", ErrorChain(e)))
}

/// Rewrite the registration under its lease (a health change).
async fn rewrite_registration<S: Store>(
    store: &S,
    record: &InstanceRecord,
    lease: LeaseId,
) -> Result<i64, StoreError> {
    let value =
        serde_json::to_vec(record).map_err(|e| StoreError::Rejected { source: e.into() })?;
    let key = keys::instance_key(record.service.as_str(), &record.id);
    Ok(store.put(&key, Bytes::from(value), Some(lease)).await?.0)
}

/// Write the registration under a fresh lease.
async fn write_registration<S: Store>(
    store: &S,
    record: &InstanceRecord,
    ttl: Duration,
) -> Result<(LeaseId, i64), StoreError> {
    let lease = store.grant_lease(ttl).await?;
    let value =
        serde_json::to_vec(record).map_err(|e| StoreError::Rejected { source: e.into() })?;
    let key = keys::instance_key(record.service.as_str(), &record.id);
    let revision = store.put(&key, Bytes::from(value), Some(lease)).await?;
    Ok((lease, revision.0))
}

#[tonic::async_trait]
impl<S: Store + 'static> ControlPlane for Push<S> {
    type RegisterStream = RspStream<RegisterResponse>;
    type SubscribeStream = RspStream<SubscribeResponse>;

    async fn register(
        &self,
        request: Request<Streaming<RegisterRequest>>,
    ) -> Result<Response<Self::RegisterStream>, Status> {
        let (record, inbound) = self.first_registration(request).await?;
        let (lease, revision) = write_registration(&*self.store, &record, self.lease_ttl)
            .await
            .map_err(|e| {
                self.metrics.registration_rejected(Rejection::StoreError);
                unavailable("writing the registration failed", &e)
            })?;
        tracing::info!(service = %record.service, instance.id = %record.id, instance.addr = %record.address, instance.health = %record.health, "instance registered");
        let open = self.metrics.registration_accepted();

        let (tx, rx) = mpsc::channel(STREAM_BUFFER);
        let ttl_ms = u64::try_from(self.lease_ttl.as_millis()).unwrap_or(u64::MAX);
        let _ = tx
            .send(Ok(RegisterResponse {
                lease_ttl_ms: ttl_ms,
                revision,
            }))
            .await;
        let registration = Registration {
            store: Arc::clone(&self.store),
            ttl: self.lease_ttl,
            metrics: Arc::clone(&self.metrics),
            tasks: self.tasks.clone(),
            record,
            lease,
            tx,
        };
        self.tasks.spawn("register", async move {
            let _open = open;
            registration.keep(inbound).await;
        });
        Ok(Response::new(receiver_stream(rx)))
    }

    async fn subscribe(
        &self,
        request: Request<Streaming<SubscribeRequest>>,
    ) -> Result<Response<Self::SubscribeStream>, Status> {
        let inbound = request.into_inner();
        let (tx, rx) = mpsc::channel(STREAM_BUFFER);
        let view = self.view.clone();
        let stop = self.tasks.stop().clone();
        let metrics = Arc::clone(&self.metrics);
        let connected = metrics.subscriber_connected();
        let warm_until = self.warm_until;
        self.tasks.spawn("subscribe", async move {
            let _connected = connected;
            if let Err(status) =
                serve_subscription(inbound, view, &tx, &metrics, warm_until, stop).await
            {
                let _ = tx.send(Err(status)).await;
            }
        });
        Ok(Response::new(receiver_stream(rx)))
    }
}

impl<S: Store + 'static> Push<S> {
    /// Reads and checks a Register stream's first message: a valid instance,
    /// of the service the client's certificate names (over mTLS). A refusal
    /// is counted under its reason.
    async fn first_registration(
        &self,
        request: Request<Streaming<RegisterRequest>>,
    ) -> Result<(InstanceRecord, Streaming<RegisterRequest>), Status> {
        let reject = |reason, status| {
            self.metrics.registration_rejected(reason);
            status
        };
        let peer = request.extensions().get::<PeerService>().cloned();
        let mut inbound = request.into_inner();
        let first = inbound
            .message()
            .await
            .map_err(|status| reject(Rejection::NoRegistration, status))?
            .ok_or_else(|| {
                reject(
                    Rejection::NoRegistration,
                    Status::invalid_argument("the stream ended before a registration"),
                )
            })?;
        let Some(register_request::Msg::Register(instance)) = first.msg else {
            return Err(reject(
                Rejection::NoRegistration,
                Status::invalid_argument("the first message must be `register`"),
            ));
        };
        let record = InstanceRecord::try_from(&instance).map_err(|e| {
            reject(
                Rejection::InvalidInstance,
                Status::invalid_argument(e.to_string()),
            )
        })?;
        if let Some(PeerService(peer)) = &peer
            && *peer != record.service
        {
            tracing::warn!(
                peer.service = %peer,
                service = %record.service,
                instance.id = %record.id,
                "registration refused: the sidecar's certificate names another service"
            );
            return Err(reject(
                Rejection::IdentityMismatch,
                Status::permission_denied(format!(
                    "this sidecar's certificate is for service {peer:?}; it cannot register an instance of {:?}",
                    record.service.as_str()
                )),
            ));
        }
        Ok((record, inbound))
    }
}

/// An accepted registration, kept alive for as long as its stream is open.
struct Registration<S> {
    store: Arc<S>,
    ttl: Duration,
    metrics: Arc<Metrics>,
    tasks: Tasks,
    record: InstanceRecord,
    lease: LeaseId,
    /// The Register stream's responses.
    tx: mpsc::Sender<Result<RegisterResponse, Status>>,
}

impl<S: Store + 'static> Registration<S> {
    /// Keeps the lease alive and follows the stream until it ends, the
    /// sidecar deregisters, or the process stops.
    async fn keep(mut self, mut inbound: Streaming<RegisterRequest>) {
        // The lost lease already counted as expired (re-registering may
        // take several attempts).
        let mut lost = None;
        loop {
            match self.next_outcome(&mut inbound).await {
                Outcome::Ignore => {}
                Outcome::Health(health) => self.health_changed(health).await,
                Outcome::Deregister => return self.deregister().await,
                Outcome::LeaseLost => {
                    if lost != Some(self.lease) {
                        lost = Some(self.lease);
                        self.metrics.lease_expired();
                    }
                    self.register_again().await;
                }
                Outcome::Ended => return self.ended(),
                Outcome::Stop => return,
            }
        }
    }

    /// Keeps the lease alive until the stream says something, the lease is
    /// lost, or the process stops.
    async fn next_outcome(&self, inbound: &mut Streaming<RegisterRequest>) -> Outcome {
        let keeper_stop = CancellationToken::new();
        let keeper = keep_lease_alive(&*self.store, self.lease, self.ttl, &keeper_stop);
        tokio::pin!(keeper);
        let outcome = tokio::select! {
            () = self.tasks.stop().cancelled() => Outcome::Stop,
            msg = inbound.message() => match msg {
                Ok(Some(RegisterRequest { msg: Some(register_request::Msg::Deregister(_)) })) => Outcome::Deregister,
                Ok(Some(RegisterRequest { msg: Some(register_request::Msg::Health(report)) })) => {
                    Outcome::Health(weft_api::Health::from_wire(report.health))
                }
                Ok(Some(_)) => Outcome::Ignore,
                Ok(None) | Err(_) => Outcome::Ended,
            },
            result = &mut keeper => match result {
                Err(StoreError::LeaseNotFound(_)) => Outcome::LeaseLost,
                _ => Outcome::Ended,
            },
        };
        keeper_stop.cancel();
        outcome
    }

    /// Rewrites the registration with the instance's new health.
    async fn health_changed(&mut self, health: weft_api::Health) {
        if health == self.record.health {
            return;
        }
        self.record.health = health;
        let record = &self.record;
        match rewrite_registration(&*self.store, record, self.lease).await {
            Ok(revision) => {
                tracing::info!(service = %record.service, instance.id = %record.id, instance.health = %health, store.revision = revision, "instance health changed")
            }
            // A lost lease is found by the keeper, which registers again
            // with the new health.
            Err(e) => {
                tracing::warn!(service = %record.service, instance.id = %record.id, instance.health = %health, error = %ErrorChain(&e), "recording the instance's health failed; it is written with the next registration")
            }
        }
    }

    /// Revokes the lease (the instance disappears at once) and confirms.
    async fn deregister(self) {
        if let Err(e) = self.store.revoke(self.lease).await {
            tracing::warn!(error = %ErrorChain(&e), "revoking a lease failed; it expires by itself");
        }
        self.metrics.deregistered();
        tracing::info!(service = %self.record.service, instance.id = %self.record.id, "instance deregistered");
        let _ = self
            .tx
            .send(Ok(RegisterResponse {
                lease_ttl_ms: 0,
                revision: 0,
            }))
            .await;
    }

    /// The store lost the lease while the stream is open: register again
    /// (after a pause when that fails; the next outcome retries).
    async fn register_again(&mut self) {
        match write_registration(&*self.store, &self.record, self.ttl).await {
            Ok((lease, _)) => {
                tracing::warn!(service = %self.record.service, instance.id = %self.record.id, "lease lost in the store; registered again");
                self.lease = lease;
            }
            Err(e) => {
                tracing::warn!(error = %ErrorChain(&e), "registering again failed; retrying");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    }

    /// The stream ended without a deregistration: the lease is left to
    /// expire, and a bounded task counts the expiry.
    fn ended(self) {
        let Registration {
            store,
            ttl,
            metrics,
            tasks,
            record,
            lease,
            ..
        } = self;
        tracing::info!(service = %record.service, instance.id = %record.id, "registration stream ended; the lease expires unless the sidecar returns");
        let key = keys::instance_key(record.service.as_str(), &record.id);
        let stop = tasks.stop().clone();
        tasks.spawn("count-expiry", async move {
            count_expiry(&*store, &key, lease, ttl, &metrics, &stop).await;
        });
    }
}

/// After a Register stream ended without a deregistration, its lease is left
/// to expire: once the TTL (plus a second) has passed, and up to twice more
/// while the key is still bound to that lease, check the instance key, and
/// count an expiry if it is gone. A key bound to another lease means the
/// sidecar registered again (here or with another replica): nothing expired.
async fn count_expiry<S: Store>(
    store: &S,
    key: &str,
    lease: LeaseId,
    ttl: Duration,
    metrics: &Metrics,
    stop: &CancellationToken,
) {
    let wait = Duration::from_secs(lease_ttl_secs(ttl).unsigned_abs()) + Duration::from_secs(1);
    for _ in 0..3 {
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(wait) => {}
        }
        match store.get(key).await {
            Ok(None) => {
                metrics.lease_expired();
                return;
            }
            Ok(Some(kv)) if kv.lease != Some(lease) => return,
            // Not expired yet (etcd may extend a lease across a leader
            // change), or the store is unreachable: look again.
            Ok(Some(_)) | Err(_) => {}
        }
    }
}

enum Outcome {
    Ignore,
    Health(weft_api::Health),
    Deregister,
    LeaseLost,
    Ended,
    Stop,
}

fn service_state(entry: &ServiceEntry) -> ServiceState {
    ServiceState {
        name: entry.name.clone(),
        instances: entry
            .instances
            .values()
            .map(|r| v1::Instance::from(&**r))
            .collect(),
        policy_toml: entry.policy_toml.as_deref().unwrap_or_default().to_owned(),
        policy_refused: entry.policy_refused,
        live_instances: u32::try_from(
            entry
                .instances
                .values()
                .filter(|r| r.health.is_healthy())
                .count(),
        )
        .unwrap_or(u32::MAX),
    }
}

/// What a stream last told its sidecar about each subscribed service.
#[derive(Default)]
struct Sent {
    /// `None`: told it does not exist.
    services: BTreeMap<String, Option<Arc<ServiceEntry>>>,
    version: i64,
}

/// Build the next message: everything (first, and when the warm-up ends) or
/// what changed since `sent`.
fn next_message(
    view: &DirectoryView,
    subscribed: &BTreeSet<String>,
    sent: &mut Sent,
    full: bool,
    warming: bool,
) -> Option<SubscribeResponse> {
    let mut msg = SubscribeResponse {
        version: view.revision.0.max(sent.version),
        full,
        warming,
        ..Default::default()
    };
    sent.services.retain(|name, _| subscribed.contains(name));
    for name in subscribed {
        let current = view.services.get(name);
        let changed = match sent.services.get(name) {
            None => true,
            Some(previous) => match (previous, current) {
                (Some(a), Some(b)) => !Arc::ptr_eq(a, b),
                (None, None) => false,
                _ => true,
            },
        };
        if !(full || changed) {
            continue;
        }
        match current {
            Some(entry) => msg.services.push(service_state(entry)),
            None => msg.removed.push(name.clone()),
        }
        sent.services.insert(name.clone(), current.cloned());
    }
    if !full && msg.services.is_empty() && msg.removed.is_empty() {
        return None;
    }
    sent.version = msg.version;
    Some(msg)
}

async fn serve_subscription(
    mut inbound: Streaming<SubscribeRequest>,
    mut view: watch::Receiver<Arc<DirectoryView>>,
    tx: &mpsc::Sender<Result<SubscribeResponse, Status>>,
    metrics: &Metrics,
    warm_until: Instant,
    stop: CancellationToken,
) -> Result<(), Status> {
    let mut subscribed = BTreeSet::new();
    let mut sent = Sent::default();
    // Wait for the first request so the first message already holds what the
    // sidecar asked for.
    let mut first = true;
    // Whether this stream was told `warming` and not yet that it ended.
    let mut told_warming = false;
    loop {
        // When the view applied the store change that woke this stream.
        let mut woken_at: Option<Instant> = None;
        let loaded = view.borrow().observed_at.is_some();
        // The warm-up ended: say so with a full message.
        let mut warmed = false;
        tokio::select! {
            () = stop.cancelled() => return Ok(()),
            () = tokio::time::sleep_until(warm_until), if told_warming => warmed = true,
            msg = inbound.message() => match msg? {
                Some(req) => {
                    for name in req.remove {
                        subscribed.remove(&name);
                    }
                    for name in req.add {
                        if weft_config::ServiceName::try_from(name.clone()).is_err() {
                            return Err(Status::invalid_argument(format!("invalid service name {name:?}")));
                        }
                        subscribed.insert(name);
                    }
                    if subscribed.len() > MAX_SUBSCRIPTIONS {
                        return Err(Status::resource_exhausted(format!("at most {MAX_SUBSCRIPTIONS} services per stream")));
                    }
                }
                None => return Ok(()),
            },
            changed = view.changed(), if !first || !loaded => {
                if changed.is_err() {
                    return Err(Status::unavailable("the control plane is shutting down"));
                }
                woken_at = view.borrow().observed_at;
                tokio::time::sleep(COALESCE).await;
            }
        }
        if woken_at.is_none() && view.has_changed().unwrap_or(false) {
            // A subscription change, but a store change is pending too.
            woken_at = view.borrow().observed_at;
        }
        let current = Arc::clone(&view.borrow_and_update());
        if current.observed_at.is_none() {
            // The view has not listed the store yet (a replica just
            // started): it is empty, at revision 0, and a sidecar that
            // knew a later revision would see its snapshot go backwards.
            // The first message waits for the listing.
            continue;
        }
        let warming = Instant::now() < warm_until;
        let full = first || (warmed && !warming);
        if let Some(msg) = next_message(&current, &subscribed, &mut sent, full, warming) {
            told_warming = warming;
            if tx.send(Ok(msg)).await.is_err() {
                return Ok(());
            }
            metrics.pushed(full, woken_at);
        }
        first = false;
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::store::Revision;

    fn entry(name: &str, policy: Option<&str>) -> Arc<ServiceEntry> {
        Arc::new(ServiceEntry {
            name: name.into(),
            policy_toml: policy.map(Into::into),
            policy_refused: false,
            instances: BTreeMap::new(),
        })
    }

    #[test]
    fn full_then_deltas_of_changed_services_only() {
        let mut view = DirectoryView {
            revision: Revision(5),
            live: true,
            ..Default::default()
        };
        view.services
            .insert("billing".into(), entry("billing", Some("a")));
        view.services.insert("orders".into(), entry("orders", None));
        let subscribed: BTreeSet<String> = ["billing".to_owned(), "ghost".to_owned()].into();
        let mut sent = Sent::default();
        let first = next_message(&view, &subscribed, &mut sent, true, false).unwrap();
        assert!(first.full);
        assert_eq!(first.version, 5);
        assert_eq!(first.services.len(), 1);
        assert_eq!(first.removed, ["ghost"]);
        // Nothing subscribed changed: no message.
        view.revision = Revision(6);
        view.services
            .insert("orders".into(), entry("orders", Some("x")));
        assert!(next_message(&view, &subscribed, &mut sent, false, false).is_none());
        // billing changed: one delta with billing only.
        view.revision = Revision(7);
        view.services
            .insert("billing".into(), entry("billing", Some("b")));
        let delta = next_message(&view, &subscribed, &mut sent, false, false).unwrap();
        assert!(!delta.full);
        assert_eq!(delta.version, 7);
        assert_eq!(delta.services[0].policy_toml, "b");
        assert!(delta.removed.is_empty());
        // billing disappears.
        view.services.remove("billing");
        let delta = next_message(&view, &subscribed, &mut sent, false, false).unwrap();
        assert_eq!(delta.removed, ["billing"]);
        // A new subscription is reported even if it does not exist.
        let subscribed: BTreeSet<String> = ["orders".to_owned()].into();
        let delta = next_message(&view, &subscribed, &mut sent, false, false).unwrap();
        assert_eq!(delta.services[0].name, "orders");
    }
}
