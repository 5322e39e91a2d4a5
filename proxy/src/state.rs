//! The proxy's live state: the effective configuration, the directory built from
//! it, readiness, and the shutdown primitives.
//!
//! Both the configuration and the directory are published through `watch` channels
//! as `Arc` snapshots; the request path clones the current `Arc` and works on it
//! without locks. A reload (SIGHUP or `POST /reload`) is serialised by a mutex, reads
//! and validates the whole bootstrap file (and the policy files it names) first, and
//! only then swaps the snapshots: an invalid file changes nothing.
//!
//! [`LiveState`] is also the [`GaugeSource`](crate::telemetry::metrics::GaugeSource)
//! `/metrics` copies its gauges from (`state/gauges.rs`).

mod gauges;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::SystemTime;

use serde::Serialize;
use tokio::sync::{Mutex, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use weft_config::Loaded;

use crate::activator::ActivatorClient;
use crate::telemetry::{Direction, Metrics, Reporters};
use weft_discovery::control_plane::ControlPlaneClient;
use weft_discovery::directory::{Directory, OwnService};
use weft_discovery::health::{self, AppHealth};
use weft_discovery::remote::RemoteServices;
use weft_transport::tls::{HandshakeObserver, MeshTls, Side};

/// The effective configuration and its version.
#[derive(Debug, Serialize)]
pub struct ConfigSnapshot {
    /// 1 for the configuration loaded at start, +1 for every successful reload.
    pub version: u64,
    /// When this version was loaded, in seconds since the Unix epoch.
    pub loaded_at: u64,
    #[serde(flatten)]
    pub loaded: Loaded,
}

impl health::ServiceConfig for ConfigSnapshot {
    fn local_service(&self) -> Option<&weft_config::LocalService> {
        self.loaded.bootstrap.service.as_ref()
    }
}

/// Addresses the listeners are bound to (ports resolved when the config said 0).
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Bound {
    pub outbound: SocketAddr,
    pub inbound: SocketAddr,
    pub admin: SocketAddr,
}

/// Whether the sidecar is ready, or the first reason it is not (what
/// `/ready` says).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Readiness {
    Ready,
    /// The listeners are not bound yet.
    Starting,
    /// Shutting down.
    Draining,
    /// The local app has not answered its health check yet.
    AppStarting,
    /// The local app stopped answering its health check.
    AppUnhealthy,
    /// Waiting (bounded) for the control plane's first snapshot.
    ControlPlane,
}

impl Readiness {
    /// The `/ready` body.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Ready => "ready",
            Self::Starting => "not ready: starting",
            Self::Draining => "draining",
            Self::AppStarting => "not ready: waiting for the app to answer its health check",
            Self::AppUnhealthy => "not ready: the app does not answer its health check",
            Self::ControlPlane => "not ready: waiting for the control plane's first snapshot",
        }
    }
}

/// Why a reload was refused.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error(transparent)]
    Config(#[from] weft_config::ConfigError),
    #[error("{0}")]
    Rejected(String),
    #[error("the [tls] files were refused (the current certificate stays): {0}")]
    Tls(#[from] weft_transport::tls::MaterialError),
}

/// Counts failed mesh handshakes (`weft_tls_handshake_failures_total`).
struct CountHandshakeFailures(Arc<Metrics>);

impl HandshakeObserver for CountHandshakeFailures {
    fn handshake_failed(&self, side: Side, reason: &'static str) {
        let direction = match side {
            Side::Inbound => Direction::Inbound,
            Side::Outbound => Direction::Outbound,
        };
        self.0.tls_handshake_failure(direction, reason);
    }
}

/// State shared by every listener and task.
#[derive(Debug)]
pub struct LiveState {
    path: PathBuf,
    config: watch::Sender<Arc<ConfigSnapshot>>,
    directory: watch::Sender<Arc<Directory>>,
    reload_lock: Mutex<()>,
    bound: OnceLock<Bound>,
    remote: OnceLock<Arc<RemoteServices>>,
    /// What the control plane last said about the local service.
    own: std::sync::Mutex<Option<OwnService>>,
    draining: AtomicBool,
    /// The local app's health (`weft_discovery::health`).
    app_health: watch::Sender<AppHealth>,
    /// False, with a control plane, until its first snapshot arrived or
    /// `[control_plane] ready_timeout` passed.
    control_plane_ready: AtomicBool,
    pub tasks: TaskTracker,
    pub shutdown: CancellationToken,
    pub metrics: Arc<Metrics>,
    /// This sidecar's mTLS identity, with `[tls]`.
    pub tls: Option<Arc<MeshTls>>,
    /// Metrics, spans and the access log: what every request reports to.
    pub reporters: Arc<Reporters>,
    /// The client of `outbound.cold_start.activate` calls.
    pub activator: Arc<ActivatorClient>,
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl LiveState {
    /// Build the state from a loaded configuration (inside a Tokio runtime:
    /// with traces on, this starts the span export task), reading the `[tls]`
    /// files, whose identity must fit `[service]`.
    pub fn new(loaded: Loaded) -> Result<Arc<Self>, String> {
        let tasks = TaskTracker::new();
        let shutdown = CancellationToken::new();
        let own_name = loaded
            .bootstrap
            .service
            .as_ref()
            .map_or("", |s| s.name.as_str());
        let metrics = Metrics::new(loaded.bootstrap.control_plane.is_some())
            .with_callers(loaded.bootstrap.telemetry.max_callers, own_name);
        let metrics = if loaded.bootstrap.service.is_some() {
            metrics.with_app_health()
        } else {
            metrics
        };
        let metrics = Arc::new(if loaded.bootstrap.tls.is_some() {
            metrics.with_tls()
        } else {
            metrics
        });
        let tls = MeshTls::load(
            &loaded,
            Arc::new(CountHandshakeFailures(Arc::clone(&metrics))),
        )
        .map_err(|e| format!("[tls]: {e}"))?;
        let directory = Directory::build(&loaded, tls.as_deref(), &tasks, &shutdown)?;
        let reporters =
            Reporters::start(&loaded.bootstrap, Arc::clone(&metrics)).map_err(|e| e.to_string())?;
        let snapshot = ConfigSnapshot {
            version: 1,
            loaded_at: now_secs(),
            loaded,
        };
        let app_health = health::initial(&snapshot);
        let control_plane_ready = snapshot.loaded.bootstrap.control_plane.is_none();
        let state = Arc::new(Self {
            path: snapshot.loaded.path.clone(),
            config: watch::channel(Arc::new(snapshot)).0,
            directory: watch::channel(Arc::new(directory)).0,
            reload_lock: Mutex::new(()),
            bound: OnceLock::new(),
            remote: OnceLock::new(),
            own: std::sync::Mutex::new(None),
            draining: AtomicBool::new(false),
            app_health: watch::channel(app_health).0,
            control_plane_ready: AtomicBool::new(control_plane_ready),
            tasks,
            shutdown,
            metrics,
            tls,
            reporters: Arc::new(reporters),
            activator: Arc::new(ActivatorClient::default()),
        });
        // The bootstrap file's services show their counters at 0 from the
        // start, before any request (later ones from the next scrape).
        state.metrics.refresh_from(&*state);
        Ok(state)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn config(&self) -> Arc<ConfigSnapshot> {
        Arc::clone(&self.config.borrow())
    }

    pub fn directory(&self) -> Arc<Directory> {
        Arc::clone(&self.directory.borrow())
    }

    pub fn set_bound(&self, bound: Bound) {
        let _ = self.bound.set(bound);
    }

    pub fn bound(&self) -> Option<Bound> {
        self.bound.get().copied()
    }

    /// Services pushed by the control plane (set once at start when
    /// `[control_plane]` is configured).
    pub fn set_remote(&self, remote: Arc<RemoteServices>) {
        let _ = self.remote.set(remote);
    }

    pub fn remote(&self) -> Option<&Arc<RemoteServices>> {
        self.remote.get()
    }

    pub fn start_draining(&self) {
        self.draining.store(true, Ordering::SeqCst);
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::SeqCst)
    }

    /// Ready: listeners bound, directory loaded, not draining, the local app
    /// healthy (or not checked), and with a control plane, its first snapshot
    /// received (or `ready_timeout` passed).
    pub fn is_ready(&self) -> bool {
        self.readiness() == Readiness::Ready
    }

    /// Why the sidecar is (not) ready, first reason first.
    pub fn readiness(&self) -> Readiness {
        if self.is_draining() {
            return Readiness::Draining;
        }
        if self.bound.get().is_none() {
            return Readiness::Starting;
        }
        match self.app_health() {
            AppHealth::Starting => return Readiness::AppStarting,
            AppHealth::Unhealthy => return Readiness::AppUnhealthy,
            AppHealth::Healthy | AppHealth::Unchecked => {}
        }
        if !self.control_plane_ready.load(Ordering::SeqCst) {
            return Readiness::ControlPlane;
        }
        Readiness::Ready
    }

    /// The local app's health now.
    pub fn app_health(&self) -> AppHealth {
        *self.app_health.borrow()
    }

    /// The local app's health, and notifications when it changes.
    pub fn app_health_changes(&self) -> watch::Receiver<AppHealth> {
        self.app_health.subscribe()
    }

    /// Starts checking the local app (`[service] health`), tracked and
    /// stopped like every task.
    pub fn check_app_health(&self) {
        self.tasks.spawn(health::run(
            self.config.subscribe(),
            self.app_health.clone(),
            self.shutdown.clone(),
        ));
    }

    /// The control plane's first snapshot arrived, or the wait for it ended.
    pub fn set_control_plane_ready(&self) {
        self.control_plane_ready.store(true, Ordering::SeqCst);
    }

    /// Re-read the `[tls]` files and the bootstrap file, and swap them in if
    /// they are valid (counted). Refused `[tls]` files refuse the whole reload.
    pub async fn reload(&self) -> Result<u64, ReloadError> {
        let result = self.try_reload().await;
        self.metrics.reload(result.is_ok());
        result
    }

    async fn try_reload(&self) -> Result<u64, ReloadError> {
        let _serial = self.reload_lock.lock().await;
        if let Some(tls) = &self.tls {
            let tls = Arc::clone(tls);
            // Files still refused fail the reload again, with the reason.
            tokio::task::spawn_blocking(move || tls.refresh(true))
                .await
                .map_err(|e| {
                    ReloadError::Rejected(format!("reading the TLS files failed: {e}"))
                })??;
        }
        let path = self.path.clone();
        let loaded = tokio::task::spawn_blocking(move || weft_config::load_bootstrap(&path))
            .await
            .map_err(|e| {
                ReloadError::Rejected(format!("reading the configuration failed: {e}"))
            })??;
        let current = self.config();
        if loaded.bootstrap.listen != current.loaded.bootstrap.listen {
            return Err(ReloadError::Rejected(format!(
                "{}: [listen] changed; listener addresses only change on restart, nothing was applied",
                self.path.display()
            )));
        }
        if loaded.bootstrap.tls != current.loaded.bootstrap.tls {
            return Err(ReloadError::Rejected(format!(
                "{}: [tls] changed; it only changes on restart (the files it names are re-read on change), nothing was applied",
                self.path.display()
            )));
        }
        if loaded.bootstrap.telemetry != current.loaded.bootstrap.telemetry {
            return Err(ReloadError::Rejected(format!(
                "{}: [telemetry] changed; traces, OTLP metrics and the access log are set up at start and only change on restart, nothing was applied",
                self.path.display()
            )));
        }
        if loaded.bootstrap.limits != current.loaded.bootstrap.limits {
            return Err(ReloadError::Rejected(format!(
                "{}: [limits] changed; listener limits only change on restart, nothing was applied",
                self.path.display()
            )));
        }
        let old = self.directory();
        let own = self.own();
        let directory = Directory::rebuild(
            Some(&old),
            &loaded,
            own.as_ref(),
            self.tls.as_deref(),
            &self.tasks,
            &self.shutdown,
        )
        .map_err(ReloadError::Rejected)?;
        let version = current.version + 1;
        self.directory.send_replace(Arc::new(directory));
        self.config.send_replace(Arc::new(ConfigSnapshot {
            version,
            loaded_at: now_secs(),
            loaded,
        }));
        Ok(version)
    }

    fn own(&self) -> Option<OwnService> {
        self.own
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Follows what `client` learns about the local service `name` (its
    /// applied policy, its live instance count) and recompiles the local
    /// app's policy when that changes. Stops with the shutdown token, and
    /// ignores updates once draining (the instance has deregistered itself).
    pub fn follow_own_service(self: &Arc<Self>, client: &ControlPlaneClient, name: String) {
        let mut snapshots = client.snapshot();
        let shared = Arc::clone(self);
        let stop = self.shutdown.clone();
        self.tasks.spawn(async move {
            loop {
                let own = snapshots
                    .borrow_and_update()
                    .services
                    .get(&name)
                    .map(|s| OwnService {
                        policy: s.policy.clone(),
                        live_instances: s.live_instances,
                    });
                if !shared.is_draining() {
                    shared.set_own(own).await;
                }
                tokio::select! {
                    () = stop.cancelled() => return,
                    changed = snapshots.changed() => if changed.is_err() { return },
                }
            }
        });
    }

    /// Recompiles the local app's policy for `own` unless it is what the
    /// current directory was built for.
    async fn set_own(&self, own: Option<OwnService>) {
        let _serial = self.reload_lock.lock().await;
        {
            let mut current = self
                .own
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if *current == own {
                return;
            }
            current.clone_from(&own);
        }
        let config = self.config();
        let directory = self.directory().with_own(&config.loaded, own.as_ref());
        if let Some(local) = &directory.local {
            tracing::info!(
                service.name = %local.name,
                policy.source = ?local.policy_source,
                share = local.share.get(),
                "local policy updated from the control plane"
            );
        }
        self.directory.send_replace(Arc::new(directory));
    }
}
