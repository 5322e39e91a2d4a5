//! The sidecar's side of the control-plane protocol: subscribing to the
//! services this sidecar calls, registering the instance it fronts, and
//! keeping what it learnt when the control plane is away.
//!
//! [`ControlPlaneClient::start`] spawns one task that connects to the
//! configured addresses in turn and keeps one `Subscribe` stream and, for a
//! sidecar with a `[service]`, one `Register` stream open on the connection
//! (the protocol is documented in the `weft-api` crate). Everything received
//! is validated and folded into a [`RemoteSnapshot`], published through a
//! `watch` channel: the request path reads it without locks, and the
//! directory integration follows it with [`ControlPlaneClient::snapshot`].
//!
//! Invariants:
//!
//! - **Static stability.** A dropped connection changes nothing that is known:
//!   the last accepted snapshot stays until the control plane sends a newer
//!   one. Only the control plane's own word (a `removed` name, or a full
//!   snapshot without it) removes a service.
//! - **Validation.** A pushed service that fails the sidecar's checks is
//!   refused and keeps its previous state; [`ControlPlaneClient::rejected`]
//!   counts refusals and keeps the last reason.
//! - **Lazy subscriptions.** [`ControlPlaneClient::service`] subscribes to a
//!   name on first use; the set only grows (bounded), and each reconnection
//!   re-sends it whole, so the control plane answers with a full snapshot.
//!   The sidecar's own service is subscribed from the start (its policy).
//! - **Cold start.** With a cache file, the client starts from the snapshot
//!   saved there, and a background task keeps it up to date.
//! - **Bounded.** Every channel is a `watch` (one slot, coalescing); every
//!   wait has a deadline; every task is tracked and stops with the token.
//!
//! # Layout
//!
//! | module | responsibility |
//! |---|---|
//! | [`snapshot`] | the snapshot types and the pure state machine applying pushes, with validation |
//! | [`subscriptions`] | the subscription set and the `Subscribe` request stream |
//! | [`register`] | the registration, the `Register` stream, deregistering |
//! | [`session`] | connecting, backoff across addresses, one session's streams |
//! | [`stream`] | why a session's stream failed |
//! | [`cache`] | the snapshot cache file and its writer task |

pub mod cache;
#[cfg(test)]
mod mock;
pub mod register;
pub mod session;
pub mod snapshot;
pub mod stream;
pub mod subscriptions;
#[cfg(test)]
mod tests;

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use weft_api::v1;

pub use register::{Deregistered, Registration};
pub use snapshot::{Lookup, Rejection, RemoteService, RemoteSnapshot};
pub use subscriptions::SubscribeError;

use register::Registrar;
use session::Address;
use snapshot::{Applied, Tracker};
use subscriptions::Subscriptions;

use crate::health::AppHealth;
use weft_transport::tls::MeshTls;

/// The connection to the control plane, as the admin API and metrics show it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConnectionState {
    /// Not connected yet since start.
    Connecting,
    /// A session is up with the control plane at `address`.
    Connected { address: String },
    /// The connection was lost (or never made) at `since`; `error` is the last
    /// attempt's failure. Reconnection attempts go on with backoff; the
    /// state stays `Disconnected` (with the first `since`) until one works.
    Disconnected { since: Instant, error: String },
}

/// Refused pushes, for the admin API and metrics.
#[derive(Debug, Default)]
struct Rejections {
    count: u64,
    last: Option<String>,
}

/// What the client and its task share.
#[derive(Debug)]
struct ClientState {
    subscriptions: Subscriptions,
    registrar: Registrar,
    snapshot: watch::Sender<Arc<RemoteSnapshot>>,
    state: watch::Sender<ConnectionState>,
    rejections: Mutex<Rejections>,
    /// True once a message from the control plane was accepted (the first
    /// snapshot), since start.
    synced: watch::Sender<bool>,
}

impl ClientState {
    fn connected(&self, address: &str, subscribed: usize) {
        tracing::info!(
            control_plane.address = %address,
            subscriptions = subscribed,
            "connected to the control plane"
        );
        self.state.send_replace(ConnectionState::Connected {
            address: address.to_owned(),
        });
    }

    fn disconnected(&self, error: String) {
        self.state.send_modify(|state| match state {
            ConnectionState::Disconnected { error: last, .. } => *last = error,
            _ => {
                tracing::warn!(
                    %error,
                    "lost the control plane; serving the last accepted snapshot and reconnecting"
                );
                *state = ConnectionState::Disconnected {
                    since: Instant::now(),
                    error,
                };
            }
        });
    }

    /// Applies a pushed message; publishes the new snapshot, counts and logs
    /// refusals.
    fn accept(&self, tracker: &mut Tracker, message: &v1::SubscribeResponse) {
        let held_before = tracker.held_instances();
        match tracker.apply(message) {
            Ok(applied) => {
                tracing::debug!(
                    snapshot.version = message.version,
                    snapshot.full = message.full,
                    snapshot.warming = message.warming,
                    snapshot.services = message.services.len(),
                    snapshot.removed = message.removed.len(),
                    "control-plane update"
                );
                let held = tracker.held_instances();
                if message.warming && held > 0 && message.full {
                    tracing::info!(
                        instances = held,
                        "the control plane is warming up; keeping the instances it has not heard from again yet"
                    );
                } else if !message.warming && held_before > 0 {
                    tracing::info!(
                        instances = held_before,
                        "the control plane's warm-up is over; dropping the instances it did not hear from again"
                    );
                }
                self.publish(applied);
                self.synced
                    .send_if_modified(|synced| !std::mem::replace(synced, true));
            }
            Err(stale) => tracing::warn!(error = %stale, "control-plane update ignored"),
        }
    }

    fn publish(&self, applied: Applied) {
        self.reject(applied.rejected);
        if let Some(snapshot) = applied.snapshot {
            self.snapshot.send_replace(snapshot);
        }
    }

    fn reject(&self, rejected: Vec<Rejection>) {
        if rejected.is_empty() {
            return;
        }
        for rejection in &rejected {
            tracing::warn!(
                service.name = rejection.service(),
                error = %rejection,
                "refused a pushed service; keeping its previous state"
            );
        }
        let mut rejections = self
            .rejections
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        rejections.count += rejected.len() as u64;
        rejections.last = rejected.last().map(ToString::to_string);
    }
}

/// The sidecar's control-plane client: cheap to clone.
#[derive(Debug, Clone)]
pub struct ControlPlaneClient {
    shared: Arc<ClientState>,
}

impl ControlPlaneClient {
    /// Starts the client (must be called within a Tokio runtime).
    ///
    /// Connects to each of `addresses` (`http://` or `https://host:port`) in turn, with a
    /// jittered exponential backoff (full jitter, 100 ms doubling up to 10 s)
    /// between attempts; keeps one `Subscribe` stream (re-sending the whole
    /// subscription set on every reconnection) and, with a `registration`,
    /// one `Register` stream (registering again on every reconnection). With
    /// a `cache` file that can be read, starts from the snapshot in it, and
    /// keeps it written (atomically, at most once a second, from a background
    /// task). Tasks are tracked by `tasks` and stop with `stop`.
    ///
    /// `https` addresses are reached over mTLS with `tls` (this sidecar's
    /// certificate; the server must be the control plane of its trust
    /// domain). An address that cannot be used (not a URL; `https` without
    /// `tls`) is logged and skipped; with none left, the client
    /// serves the cached snapshot (if any) and stays disconnected.
    ///
    /// With `health` (the local app's, see [`crate::health`]), the
    /// registration waits for the app to answer its check and then reports
    /// every change of its health; without, the instance is always healthy.
    pub fn start(
        addresses: Vec<String>,
        registration: Option<Registration>,
        health: Option<watch::Receiver<AppHealth>>,
        cache: Option<PathBuf>,
        tls: Option<&MeshTls>,
        tasks: &TaskTracker,
        stop: CancellationToken,
    ) -> Self {
        let mut targets = Vec::with_capacity(addresses.len());
        for address in &addresses {
            match Address::parse(address, tls) {
                Ok(target) => targets.push(target),
                Err(error) => tracing::error!(%error, "control-plane address skipped"),
            }
        }

        let mut tracker = Tracker::default();
        let mut rejected = Vec::new();
        if let Some(path) = &cache {
            match cache::load(path) {
                Ok(Some(file)) => {
                    let applied = tracker.restore(file.version, &file.wire_services());
                    rejected = applied.rejected;
                    tracing::info!(
                        cache.path = %path.display(),
                        snapshot.version = file.version,
                        snapshot.services = tracker.snapshot().services.len(),
                        "starting from the cached control-plane snapshot"
                    );
                }
                Ok(None) => tracing::info!(
                    cache.path = %path.display(),
                    "no cached control-plane snapshot yet"
                ),
                Err(error) => tracing::warn!(%error, "cached control-plane snapshot not used"),
            }
        }

        // Resubscribe to everything cached, and to the sidecar's own service
        // (for its policy).
        let mut initial: BTreeSet<String> = tracker.snapshot().services.keys().cloned().collect();
        if let Some(r) = &registration {
            initial.insert(r.record.service.to_string());
        }

        let shared = Arc::new(ClientState {
            subscriptions: Subscriptions::new(initial),
            registrar: Registrar::new(registration, health),
            snapshot: watch::channel(Arc::clone(tracker.snapshot())).0,
            state: watch::channel(ConnectionState::Connecting).0,
            rejections: Mutex::new(Rejections::default()),
            synced: watch::channel(false).0,
        });
        shared.reject(rejected);

        if let Some(path) = cache {
            tasks.spawn(cache::keep_written(
                path,
                shared.snapshot.subscribe(),
                stop.clone(),
            ));
        }
        let task_shared = Arc::clone(&shared);
        tasks.spawn(async move {
            session::run(&task_shared, targets, tracker, stop).await;
        });
        Self { shared }
    }

    /// Subscribes to `service` (idempotent; lazily, on first call) and waits
    /// at most `wait` for its first state. `None` when it does not exist, when
    /// nothing is known when the wait runs out, or when `name` cannot be
    /// subscribed to (not a service name; too many subscriptions).
    pub async fn service(&self, name: &str, wait: Duration) -> Option<Arc<RemoteService>> {
        let mut snapshots = self.shared.snapshot.subscribe();
        let known = snapshots.borrow_and_update().lookup(name);
        if let Err(error) = self.subscribe(name) {
            tracing::debug!(service.name = name, %error, "not subscribed");
            return match known {
                Lookup::Found(service) => Some(service),
                Lookup::Missing | Lookup::Unknown => None,
            };
        }
        match known {
            Lookup::Found(service) => return Some(service),
            Lookup::Missing => return None,
            Lookup::Unknown => {}
        }
        let answered = snapshots.wait_for(|s| !matches!(s.lookup(name), Lookup::Unknown));
        match tokio::time::timeout(wait, answered).await {
            Ok(Ok(snapshot)) => snapshot.services.get(name).cloned(),
            Ok(Err(_)) | Err(_) => None,
        }
    }

    /// Subscribes to `name` without waiting; true when it is new.
    pub fn subscribe(&self, name: &str) -> Result<bool, SubscribeError> {
        self.shared.subscriptions.add(name)
    }

    /// The latest snapshot, and notifications when it changes.
    pub fn snapshot(&self) -> watch::Receiver<Arc<RemoteSnapshot>> {
        self.shared.snapshot.subscribe()
    }

    /// Waits until the first message from the control plane has been
    /// accepted since start (at once if it has); never returns while none
    /// arrives, so bound it with a timeout.
    pub async fn first_snapshot(&self) {
        let mut synced = self.shared.synced.subscribe();
        if synced.wait_for(|s| *s).await.is_err() {
            std::future::pending::<()>().await;
        }
    }

    /// The connection's state now.
    pub fn state(&self) -> ConnectionState {
        self.shared.state.borrow().clone()
    }

    /// The connection's state, and notifications when it changes.
    pub fn state_changes(&self) -> watch::Receiver<ConnectionState> {
        self.shared.state.subscribe()
    }

    /// How many pushed services were refused by validation so far, and the
    /// last reason.
    pub fn rejected(&self) -> (u64, Option<String>) {
        let rejections = self
            .shared
            .rejections
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        (rejections.count, rejections.last.clone())
    }

    /// What this client registers, if anything.
    pub fn registration(&self) -> Option<&Registration> {
        self.shared.registrar.registration()
    }

    /// Deregisters at once (call after draining) and stops the register
    /// stream; waits at most `timeout` for the control plane's answer. From
    /// then on the instance is not registered again, even on reconnection.
    pub async fn deregister(&self, timeout: Duration) -> Deregistered {
        let outcome = self.shared.registrar.deregister(timeout).await;
        match outcome {
            Deregistered::Acknowledged | Deregistered::NotRegistered => {
                tracing::debug!(?outcome, "deregister");
            }
            Deregistered::Unconfirmed | Deregistered::TimedOut => tracing::warn!(
                ?outcome,
                "deregistration not confirmed; the instance disappears when its lease expires"
            ),
        }
        outcome
    }
}
