//! The control plane's view of the directory: one watch on the store, held in
//! memory, fanned out to every subscriber.
//!
//! A single task lists the services prefix, then watches it from the listed
//! revision, applying each batch of changes to an immutable [`DirectoryView`]
//! published through a `watch` channel. However many sidecars subscribe, the store
//! sees one watch per control-plane replica; subscribers read the latest view
//! (a `watch` channel only keeps the newest, which coalesces bursts for slow
//! readers).
//!
//! Entries are validated on the way in, with the same rules sidecars apply: a
//! policy that does not pass `weft-config` validation (written to etcd by hand,
//! say) or an instance record that does not parse is logged and left out. In
//! place of a refused policy the view serves the service's last valid one,
//! which it records in the store so that a replica started later serves it
//! too ([`last_valid`]).
//!
//! Static stability: when the store is unreachable the last view stays published
//! and the task retries with jittered backoff; after a compaction it re-lists.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use rand::Rng;
use tokio::sync::watch;
use tokio::time::Instant;
use weft_api::InstanceRecord;

use crate::keys::{self, Key};
use crate::metrics::Metrics;
use crate::store::{KeyValue, Revision, Store, StoreError, WatchBatch, WatchEvent};
use crate::tasks::Tasks;

mod last_valid;

use last_valid::{PolicyHistory, PolicyVersion, Stored};

/// Backoff bounds when the store is unreachable.
const RETRY_MIN: Duration = Duration::from_millis(100);
const RETRY_MAX: Duration = Duration::from_secs(5);

/// One service as the store describes it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ServiceEntry {
    pub name: String,
    /// The policy's TOML source, validated.
    pub policy_toml: Option<Arc<str>>,
    /// The stored policy failed validation and no valid one is known to this
    /// replica (none seen, none recorded in the store): subscribers are told to
    /// keep the policy they hold.
    pub policy_refused: bool,
    pub instances: BTreeMap<String, Arc<InstanceRecord>>,
}

impl ServiceEntry {
    fn is_empty(&self) -> bool {
        self.policy_toml.is_none() && !self.policy_refused && self.instances.is_empty()
    }
}

/// An immutable snapshot of every service.
#[derive(Debug, Clone, Default)]
pub struct DirectoryView {
    /// The store revision this view reflects.
    pub revision: Revision,
    pub services: BTreeMap<String, Arc<ServiceEntry>>,
    /// Whether the view is currently following the store (false while it is
    /// unreachable: the view is the last one known).
    pub live: bool,
    /// When this replica applied the store change the view reflects (the
    /// listing or the last watch batch); `None` before the first listing.
    pub observed_at: Option<Instant>,
    /// Each service's policy key and last-valid record, as far as they
    /// decide what is served (not pushed themselves).
    pub(crate) policies: BTreeMap<String, PolicyHistory>,
}

impl DirectoryView {
    /// The store revision of the write that stored the policy `service` is
    /// served (its last valid one), if it has one.
    pub fn policy_revision(&self, service: &str) -> Option<Revision> {
        self.policies
            .get(service)
            .and_then(PolicyHistory::last_valid)
            .map(|v| v.revision)
    }

    /// Applies a put (`kv`) or a delete of `key`, made at `revision`.
    fn apply(&mut self, kv: Option<&KeyValue>, key: &str, revision: Revision) {
        match keys::parse(key) {
            Some(Key::Policy { service }) => self.apply_policy(service, key, kv, revision),
            Some(Key::LastValidPolicy { service }) => self.apply_record(service, kv),
            Some(Key::Instance { service, id }) => self.apply_instance(service, id, key, kv),
            None => {}
        }
    }

    fn apply_policy(
        &mut self,
        service: &str,
        key: &str,
        kv: Option<&KeyValue>,
        revision: Revision,
    ) {
        let history = self.policies.entry(service.to_owned()).or_default();
        let served = match kv {
            None => {
                history.deleted(revision);
                None
            }
            Some(kv) => match validate_policy(service, &kv.value) {
                Ok(text) => {
                    let toml: Arc<str> = text.into();
                    history.stored_valid(PolicyVersion {
                        revision: kv.mod_revision,
                        toml: Arc::clone(&toml),
                    });
                    Some(toml)
                }
                Err(error) => {
                    tracing::error!(store.key = key, %error, "ignoring an invalid policy in the store");
                    history.stored_invalid();
                    return self.serve_last_valid(service);
                }
            },
        };
        if history.is_empty() {
            self.policies.remove(service);
        }
        self.update(service, |entry| {
            entry.policy_toml = served;
            entry.policy_refused = false;
            true
        });
    }

    /// The record of the service's last valid policy changed: what a refused
    /// policy falls back to may have.
    fn apply_record(&mut self, service: &str, kv: Option<&KeyValue>) {
        let history = self.policies.entry(service.to_owned()).or_default();
        history.record(service, kv.map(|kv| &kv.value[..]));
        let refused = history.stored == Stored::Invalid;
        if history.is_empty() {
            self.policies.remove(service);
        }
        if refused {
            self.serve_last_valid(service);
        }
    }

    /// The stored policy is refused: the last valid one (seen by this
    /// replica or recorded in the store) stays in force; if there is none,
    /// sidecars are told to keep theirs. An entry that already says so is
    /// left as it is (nothing to push).
    fn serve_last_valid(&mut self, service: &str) {
        let last_valid = self
            .policies
            .get(service)
            .and_then(PolicyHistory::last_valid)
            .map(|v| Arc::clone(&v.toml));
        self.update(service, |entry| {
            let refused = last_valid.is_none();
            if entry.policy_toml == last_valid && entry.policy_refused == refused {
                return false;
            }
            entry.policy_toml = last_valid;
            entry.policy_refused = refused;
            true
        });
    }

    fn apply_instance(&mut self, service: &str, id: &str, key: &str, kv: Option<&KeyValue>) {
        let Some(kv) = kv else {
            return self.update(service, |entry| entry.instances.remove(id).is_some());
        };
        match serde_json::from_slice::<InstanceRecord>(&kv.value) {
            Ok(record) if record.service.as_str() == service && record.id == id => {
                if self.holds(service, id, &record) {
                    return;
                }
                self.update(service, |entry| {
                    entry.instances.insert(id.to_owned(), Arc::new(record));
                    true
                });
            }
            Ok(_) => tracing::error!(
                store.key = key,
                "ignoring an instance record whose service or id does not match its key"
            ),
            Err(error) => {
                tracing::error!(store.key = key, %error, "ignoring an unreadable instance record");
            }
        }
    }

    /// Whether the view already holds `record` as instance `id` of
    /// `service`: the same record written again (a sidecar registering
    /// again, with another replica or under a new lease) changes nothing a
    /// sidecar is told.
    fn holds(&self, service: &str, id: &str, record: &InstanceRecord) -> bool {
        self.services
            .get(service)
            .and_then(|entry| entry.instances.get(id))
            .is_some_and(|held| **held == *record)
    }

    /// Whether `event` would leave the view as it is because it writes an
    /// instance record the view already holds (checked before the view is
    /// copied for a change).
    fn rewrites_held_instance(&self, event: &WatchEvent) -> bool {
        let WatchEvent::Put(kv) = event else {
            return false;
        };
        let Some(Key::Instance { service, id }) = keys::parse(&kv.key) else {
            return false;
        };
        // Only a key the view holds is worth parsing here (a new instance
        // is parsed once, when applied).
        if !self
            .services
            .get(service)
            .is_some_and(|entry| entry.instances.contains_key(id))
        {
            return false;
        }
        serde_json::from_slice::<InstanceRecord>(&kv.value)
            .is_ok_and(|record| self.holds(service, id, &record))
    }

    /// Changes the service's entry with `change` (which says whether it
    /// changed anything); an entry left empty is removed.
    fn update(&mut self, service: &str, change: impl FnOnce(&mut ServiceEntry) -> bool) {
        let mut entry = self
            .services
            .get(service)
            .map(|e| (**e).clone())
            .unwrap_or_else(|| ServiceEntry {
                name: service.to_owned(),
                ..ServiceEntry::default()
            });
        if !change(&mut entry) {
            return;
        }
        if entry.is_empty() {
            self.services.remove(service);
        } else {
            self.services.insert(service.to_owned(), Arc::new(entry));
        }
    }
}

/// Validate a stored policy with the sidecars' own rules.
pub fn validate_policy(service: &str, value: &[u8]) -> Result<String, String> {
    let text = std::str::from_utf8(value).map_err(|_| "the policy is not UTF-8 text".to_owned())?;
    let origin = format!("<store:{service}>");
    let policy = weft_config::parse_policy(text, Path::new(&origin)).map_err(|e| e.to_string())?;
    if policy.service.as_str() != service {
        return Err(format!(
            "the policy is for service {:?} but stored under {service:?}",
            policy.service.as_str()
        ));
    }
    Ok(text.to_owned())
}

/// Start following the store (a task owned by `tasks`, stopped with them);
/// returns the view's receiver.
pub fn follow<S: Store + 'static>(
    store: Arc<S>,
    metrics: Arc<Metrics>,
    tasks: &Tasks,
) -> watch::Receiver<Arc<DirectoryView>> {
    let (tx, rx) = watch::channel(Arc::new(DirectoryView::default()));
    let stop = tasks.stop().clone();
    tasks.spawn("directory-view", async move {
        tokio::select! {
            () = stop.cancelled() => {}
            () = run(store, metrics, tx) => {}
        }
    });
    rx
}

async fn run<S: Store>(
    store: Arc<S>,
    metrics: Arc<Metrics>,
    tx: watch::Sender<Arc<DirectoryView>>,
) {
    let mut failures = 0u32;
    loop {
        match follow_once(&*store, &metrics, &tx).await {
            Ok(()) => failures = 0,
            Err(StoreError::Compacted { .. }) => {
                tracing::info!("watch compacted; listing again");
                continue;
            }
            Err(error) => {
                failures = failures.saturating_add(1);
                tracing::warn!(error = %crate::store::ErrorChain(&error), "store unreachable; serving the last known directory");
            }
        }
        tx.send_if_modified(|view| {
            if view.live {
                Arc::make_mut(view).live = false;
                true
            } else {
                false
            }
        });
        let ceiling = RETRY_MIN
            .saturating_mul(1u32 << failures.min(6))
            .min(RETRY_MAX);
        let wait = rand::rng().random_range(RETRY_MIN..=ceiling.max(RETRY_MIN));
        tokio::time::sleep(wait).await;
    }
}

/// Brings the last-valid records of the `unsynced` services up to date
/// (see [`last_valid`]); the ones that failed stay for the next batch.
async fn sync_records<S: Store>(
    store: &S,
    tx: &watch::Sender<Arc<DirectoryView>>,
    unsynced: &mut BTreeSet<String>,
) {
    if unsynced.is_empty() {
        return;
    }
    let actions: Vec<_> = {
        let view = tx.borrow();
        std::mem::take(unsynced)
            .into_iter()
            .filter_map(|service| {
                let action = view.policies.get(&service)?.record_action()?;
                Some((service, action))
            })
            .collect()
    };
    for (service, action) in actions {
        if !last_valid::sync_record(store, &service, &action).await {
            unsynced.insert(service);
        }
    }
}

/// Applies a watch batch to the view; says whether subscribers are to be
/// woken. A batch that changes nothing served (the record of a policy just
/// applied, an instance registered again with the same record: a sidecar
/// that moved to another replica) is not a new revision of the directory:
/// no sidecar would ever be told of it (all of them would look behind), and
/// it wakes none of them. Services whose policy or last-valid record changed
/// are added to `unsynced`.
fn apply_batch(
    view: &mut Arc<DirectoryView>,
    batch: &WatchBatch,
    unsynced: &mut BTreeSet<String>,
) -> bool {
    let mut served_changed = false;
    let was_live = view.live;
    for event in &batch.events {
        let service = match keys::parse(event.key()) {
            Some(Key::Policy { service } | Key::LastValidPolicy { service }) => {
                unsynced.insert(service.to_owned());
                service
            }
            Some(Key::Instance { service, .. }) => service,
            None => continue,
        };
        if view.rewrites_held_instance(event) {
            continue;
        }
        let before = view.services.get(service).cloned();
        let view = Arc::make_mut(view);
        match event {
            WatchEvent::Put(kv) => view.apply(Some(kv), &kv.key, kv.mod_revision),
            WatchEvent::Delete { key, mod_revision } => {
                view.apply(None, key, *mod_revision);
            }
        }
        served_changed |= match (&before, view.services.get(service)) {
            (Some(b), Some(a)) => !Arc::ptr_eq(b, a),
            (None, None) => false,
            _ => true,
        };
    }
    if !served_changed && was_live {
        return false;
    }
    let view = Arc::make_mut(view);
    if served_changed {
        view.revision = batch.revision;
        view.observed_at = Some(Instant::now());
    }
    view.live = true;
    true
}

/// List, publish, then apply watch batches until the watch ends. Errors the
/// watch stream yields are counted here (the store wrapper counts the calls).
async fn follow_once<S: Store>(
    store: &S,
    metrics: &Metrics,
    tx: &watch::Sender<Arc<DirectoryView>>,
) -> Result<(), StoreError> {
    let (kvs, revision) = store.list(keys::SERVICES).await?;
    let mut view = DirectoryView {
        revision,
        live: true,
        observed_at: Some(Instant::now()),
        ..DirectoryView::default()
    };
    for kv in &kvs {
        view.apply(Some(kv), &kv.key, kv.mod_revision);
    }
    tracing::info!(store.revision = %revision, services = view.services.len(), "directory loaded");
    // Services whose last-valid record may need writing or deleting.
    let mut unsynced: BTreeSet<String> = view.policies.keys().cloned().collect();
    tx.send_replace(Arc::new(view));
    metrics.view_applied(revision);
    sync_records(store, tx, &mut unsynced).await;
    let mut watch = store.watch(keys::SERVICES, revision).await?;
    while let Some(batch) = watch.recv().await {
        let batch = batch.inspect_err(|e| metrics.store_error("watch", e))?;
        tx.send_if_modified(|view| apply_batch(view, &batch, &mut unsynced));
        metrics.view_applied(batch.revision);
        sync_records(store, tx, &mut unsynced).await;
    }
    let ended = StoreError::unavailable("the watch ended");
    metrics.store_error("watch", &ended);
    Err(ended)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use crate::store::memory::{MemoryOptions, MemoryStore};
    use bytes::Bytes;
    use tokio_util::sync::CancellationToken;

    fn test_tasks() -> Tasks {
        Tasks::new(CancellationToken::new(), Default::default())
    }

    fn instance_json(service: &str, id: &str, port: u16) -> Bytes {
        Bytes::from(format!(
            r#"{{"service":"{service}","id":"{id}","address":"127.0.0.1:{port}","metadata":{{"zone":"z1"}}}}"#
        ))
    }

    async fn wait_for(
        rx: &mut watch::Receiver<Arc<DirectoryView>>,
        what: impl Fn(&DirectoryView) -> bool,
    ) -> Arc<DirectoryView> {
        let got = tokio::time::timeout(Duration::from_secs(5), rx.wait_for(|v| what(v)))
            .await
            .expect("the view did not reach the expected state in time")
            .expect("the view task ended");
        Arc::clone(&got)
    }

    #[tokio::test]
    async fn follows_puts_deletes_and_skips_invalid_entries() {
        let store = Arc::new(MemoryStore::new(MemoryOptions::default()));
        store
            .put(
                &keys::instance_key("billing", "a"),
                instance_json("billing", "a", 1000),
                None,
            )
            .await
            .unwrap();
        let tasks = test_tasks();
        let mut rx = follow(Arc::clone(&store), Arc::new(Metrics::new()), &tasks);
        let v = wait_for(&mut rx, |v| v.live && v.services.contains_key("billing")).await;
        assert_eq!(v.services["billing"].instances.len(), 1);

        // A later instance, a valid policy, an invalid policy, a mismatched record.
        store
            .put(
                &keys::instance_key("billing", "b"),
                instance_json("billing", "b", 1001),
                None,
            )
            .await
            .unwrap();
        let policy = "service = \"billing\"\n[outbound]\nload_balancer = \"round-robin\"\n";
        store
            .put(&keys::policy_key("billing"), Bytes::from(policy), None)
            .await
            .unwrap();
        store
            .put(
                &keys::policy_key("orders"),
                Bytes::from("service = \"orders\"\nbogus = 1\n"),
                None,
            )
            .await
            .unwrap();
        store
            .put(
                &keys::instance_key("orders", "x"),
                instance_json("billing", "x", 1002),
                None,
            )
            .await
            .unwrap();
        // A key the view does not know changes nothing served: no new
        // revision; a later instance is one.
        let ignored = store
            .put("services/marker/ignored", Bytes::from("x"), None)
            .await
            .unwrap();
        let rev = store
            .put(
                &keys::instance_key("marker", "m"),
                instance_json("marker", "m", 1003),
                None,
            )
            .await
            .unwrap();
        let v = wait_for(&mut rx, |v| v.revision >= rev).await;
        assert!(rev > ignored);
        let billing = &v.services["billing"];
        assert_eq!(billing.instances.len(), 2);
        assert_eq!(billing.policy_toml.as_deref(), Some(policy));
        // The invalid policy is not served; with no valid one known, the
        // entry says so (sidecars keep the policy they hold), and the
        // mismatched record is left out.
        let orders = &v.services["orders"];
        assert!(orders.policy_refused, "{orders:?}");
        assert!(orders.policy_toml.is_none() && orders.instances.is_empty());

        // Once a valid policy was seen, an invalid one leaves it in force.
        let good = "service = \"orders\"\n";
        store
            .put(&keys::policy_key("orders"), Bytes::from(good), None)
            .await
            .unwrap();
        let refused = store
            .put(
                &keys::policy_key("orders"),
                Bytes::from("service = \"orders\"\nbogus = 2\n"),
                None,
            )
            .await
            .unwrap();
        // The refused policy serves what was served: not a new revision.
        let rev = store
            .put(
                &keys::instance_key("marker", "n"),
                instance_json("marker", "n", 1004),
                None,
            )
            .await
            .unwrap();
        let v = wait_for(&mut rx, |v| v.revision >= rev).await;
        assert!(rev > refused);
        let orders = &v.services["orders"];
        assert_eq!(orders.policy_toml.as_deref(), Some(good));
        assert!(!orders.policy_refused);
        store.delete(&keys::policy_key("orders")).await.unwrap();

        // Deleting everything of a service removes it.
        store
            .delete(&keys::instance_key("billing", "a"))
            .await
            .unwrap();
        store
            .delete(&keys::instance_key("billing", "b"))
            .await
            .unwrap();
        store.delete(&keys::policy_key("billing")).await.unwrap();
        wait_for(&mut rx, |v| !v.services.contains_key("billing")).await;

        assert!(tasks.shutdown(Duration::from_secs(5)).await);
    }

    /// A replica that starts after an invalid policy was written serves the
    /// last valid one, recorded by the replica that saw it; deleting the
    /// policy deletes the record.
    #[tokio::test]
    async fn a_later_replica_serves_the_recorded_last_valid_policy() {
        let store = Arc::new(MemoryStore::new(MemoryOptions::default()));
        let good = "service = \"billing\"\n[outbound]\ntimeout = \"1s\"\n";
        let first = test_tasks();
        let mut rx = follow(Arc::clone(&store), Arc::new(Metrics::new()), &first);
        let rev = store
            .put(&keys::policy_key("billing"), Bytes::from(good), None)
            .await
            .unwrap();
        wait_for(&mut rx, |v| v.revision >= rev).await;
        // The record is written after the view applied the policy (and does
        // not move the view's revision: it changes nothing served).
        let record = tokio::time::timeout(Duration::from_secs(5), async {
            loop {
                if let Some(record) = store
                    .get(&keys::last_valid_policy_key("billing"))
                    .await
                    .unwrap()
                {
                    return record;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await
        .expect("the valid policy is recorded");
        assert_eq!(rx.borrow().revision, rev, "the record is no new revision");
        assert!(record.mod_revision > rev);
        assert!(first.shutdown(Duration::from_secs(5)).await);

        store
            .put(
                &keys::policy_key("billing"),
                Bytes::from("service = \"billing\"\nbogus = 1\n"),
                None,
            )
            .await
            .unwrap();
        let later = test_tasks();
        let mut rx = follow(Arc::clone(&store), Arc::new(Metrics::new()), &later);
        let v = wait_for(&mut rx, |v| v.live).await;
        let billing = &v.services["billing"];
        assert_eq!(billing.policy_toml.as_deref(), Some(good));
        assert!(!billing.policy_refused);

        assert!(store.delete(&keys::policy_key("billing")).await.unwrap());
        wait_for(&mut rx, |v| !v.services.contains_key("billing")).await;
        tokio::time::timeout(Duration::from_secs(5), async {
            while store
                .get(&keys::last_valid_policy_key("billing"))
                .await
                .unwrap()
                .is_some()
            {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await
        .expect("the record is deleted with the policy");
        assert!(later.shutdown(Duration::from_secs(5)).await);
    }

    #[tokio::test]
    async fn lease_expiry_removes_instances() {
        let store = Arc::new(MemoryStore::new(MemoryOptions::default()));
        let tasks = test_tasks();
        let mut rx = follow(Arc::clone(&store), Arc::new(Metrics::new()), &tasks);
        let lease = store.grant_lease(Duration::from_secs(1)).await.unwrap();
        store
            .put(
                &keys::instance_key("billing", "a"),
                instance_json("billing", "a", 1000),
                Some(lease),
            )
            .await
            .unwrap();
        wait_for(&mut rx, |v| v.services.contains_key("billing")).await;
        store.revoke(lease).await.unwrap();
        wait_for(&mut rx, |v| !v.services.contains_key("billing")).await;
        assert!(tasks.shutdown(Duration::from_secs(5)).await);
    }

    fn put(service: &str, id: &str, port: u16, revision: i64) -> WatchBatch {
        WatchBatch {
            revision: Revision(revision),
            events: vec![WatchEvent::Put(KeyValue {
                key: keys::instance_key(service, id),
                value: instance_json(service, id, port),
                mod_revision: Revision(revision),
                lease: Some(crate::store::LeaseId(revision)),
            })],
        }
    }

    #[test]
    fn the_same_record_written_again_is_not_a_new_revision() {
        let mut view = Arc::new(DirectoryView {
            live: true,
            ..DirectoryView::default()
        });
        let mut unsynced = BTreeSet::new();
        assert!(apply_batch(
            &mut view,
            &put("billing", "a", 1000, 5),
            &mut unsynced
        ));
        assert_eq!(view.revision, Revision(5));
        let entry = Arc::clone(&view.services["billing"]);
        // The sidecar registers again (another replica, a new lease): the
        // same record, nothing to tell anyone.
        // A subscriber holds the view meanwhile: it is not even copied.
        let held = Arc::clone(&view);
        assert!(!apply_batch(
            &mut view,
            &put("billing", "a", 1000, 6),
            &mut unsynced
        ));
        assert!(Arc::ptr_eq(&held, &view));
        drop(held);
        assert_eq!(view.revision, Revision(5));
        assert!(Arc::ptr_eq(&entry, &view.services["billing"]));
        // Another address is a change.
        assert!(apply_batch(
            &mut view,
            &put("billing", "a", 1001, 7),
            &mut unsynced
        ));
        assert_eq!(view.revision, Revision(7));
        assert!(unsynced.is_empty());
        // A delete of an unknown key changes nothing; of a known one, it does.
        let delete = |id: &str, revision| WatchBatch {
            revision: Revision(revision),
            events: vec![WatchEvent::Delete {
                key: keys::instance_key("billing", id),
                mod_revision: Revision(revision),
            }],
        };
        assert!(!apply_batch(&mut view, &delete("ghost", 8), &mut unsynced));
        assert!(apply_batch(&mut view, &delete("a", 9), &mut unsynced));
        assert_eq!(view.revision, Revision(9));
        assert!(view.services.is_empty());
        // Coming back from the store being unreachable wakes subscribers
        // even when nothing changed.
        Arc::make_mut(&mut view).live = false;
        assert!(apply_batch(&mut view, &delete("ghost", 10), &mut unsynced));
        assert!(view.live);
        assert_eq!(view.revision, Revision(9));
    }
}
