//! Start-up and shutdown of the sidecar (`weft-proxy run`).
//!
//! [`run`] goes through named steps: it loads the bootstrap file and builds
//! the shared state (`load`), binds the three listeners and reports their
//! addresses (`Listeners::bind`), joins the control plane if there is one
//! (`join_control_plane`), serves (`serve_listeners`) until SIGTERM or
//! SIGINT (`wait_for_stop`), and drains (`drain`). SIGHUP
//! reloads the bootstrap file (an invalid one is logged and ignored). A sidecar
//! with `[service]` checks its app (`weft_discovery::health`) from the moment it is
//! bound; with a control plane, readiness waits (bounded) for the first
//! snapshot. On shutdown:
//! readiness goes false, the instance deregisters from the control plane (if
//! any) and waits half a second for that to reach callers, the outbound and
//! inbound listeners stop accepting,
//! in-flight requests (and upgraded connections) get up to `[drain] grace` to
//! finish, and the process exits 0.
//!
//! [`embedded`] is the same start without listeners or registration, for
//! the in-process client (`weft-client`).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use tokio::net::TcpListener;
use tokio::signal::unix::{SignalKind, signal};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::admin::Admin;
use crate::inbound::Inbound;
use crate::outbound::Outbound;
use crate::state::{Bound, LiveState};
use crate::telemetry::{Direction, otlp_metrics};
use weft_core::authz::MeshRule;
use weft_discovery::control_plane::{ConnectionState, ControlPlaneClient, Registration};
use weft_discovery::remote::RemoteServices;
use weft_transport::server::{Hardening, serve};
use weft_transport::tls::accept::InboundTls;

/// Longest wait for the control plane to acknowledge a deregistration.
const DEREGISTER_TIMEOUT: Duration = Duration::from_secs(2);
/// Time for a deregistration to reach callers before the listeners close.
const PROPAGATION_DELAY: Duration = Duration::from_millis(500);
/// Longest wait, at exit, for the spans still queued to be exported.
const SPAN_FLUSH_TIMEOUT: Duration = Duration::from_secs(2);

/// Options of `weft-proxy run`.
#[derive(Debug, Clone)]
pub struct RunOptions {
    pub config: PathBuf,
    /// Write the bound listener addresses here (JSON) once listening.
    pub bound_file: Option<PathBuf>,
    /// Overrides `[service] advertise`.
    pub advertise: Option<std::net::SocketAddr>,
}

async fn bind(what: &str, addr: std::net::SocketAddr) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding the {what} listener to {addr}"))
}

fn write_bound_file(path: &Path, bound: &Bound) -> anyhow::Result<()> {
    let tmp = path.with_extension("tmp");
    let json = serde_json::to_vec(bound)?;
    std::fs::write(&tmp, json).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path)
        .with_context(|| format!("renaming {} to {}", tmp.display(), path.display()))?;
    Ok(())
}

/// This instance's id: `[service] id`, else the host name and the process id.
fn instance_id(service: &weft_config::LocalService) -> String {
    match &service.id {
        Some(id) => id.clone(),
        None => {
            let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
                .map(|h| h.trim().to_owned())
                .unwrap_or_else(|_| "host".to_owned());
            format!("{host}-{}", std::process::id())
        }
    }
}

/// What this sidecar registers with the control plane: its `[service]`, reachable
/// at `advertise` (default: the bound inbound address, which must then be a
/// specific IP).
fn registration(
    loaded: &weft_config::Loaded,
    bound: &Bound,
    advertise: Option<std::net::SocketAddr>,
) -> anyhow::Result<Option<Registration>> {
    let Some(service) = &loaded.bootstrap.service else {
        return Ok(None);
    };
    let address = advertise.or(service.advertise).unwrap_or(bound.inbound);
    if address.ip().is_unspecified() {
        anyhow::bail!(
            "the advertised address is {address}; set [service] advertise (or --advertise, WEFT_ADVERTISE) to the address other sidecars should use"
        );
    }
    let id = instance_id(service);
    weft_api::InstanceRecord::check_id(&id).map_err(|e| anyhow::anyhow!("[service] id: {e}"))?;
    // An admin listener on every interface is reached at the advertised IP.
    let admin_address = if bound.admin.ip().is_unspecified() {
        std::net::SocketAddr::new(address.ip(), bound.admin.port())
    } else {
        bound.admin
    };
    Ok(Some(Registration {
        record: weft_api::InstanceRecord {
            service: service.name.clone(),
            id,
            address,
            metadata: service.metadata.clone(),
            admin_address: Some(admin_address),
            health: weft_api::Health::Healthy,
        },
    }))
}

/// Readiness waits, at most `timeout`, for the control plane's first
/// snapshot: a sidecar that answered `/ready` with an empty directory would
/// take traffic it cannot route. After the timeout it is ready on what it
/// has (the cached snapshot, if one was loaded, else the static directory).
/// With a cached snapshot it does not wait for a control plane it could not
/// reach: the first failed attempt makes it ready on the cache (it serves
/// from the cache meanwhile anyway; a later snapshot replaces it).
fn wait_for_first_snapshot(
    shared: &Arc<LiveState>,
    client: &ControlPlaneClient,
    timeout: Duration,
) {
    let (shared, client) = (Arc::clone(shared), client.clone());
    let stop = shared.shutdown.clone();
    shared.tasks.clone().spawn(async move {
        let cached = client.snapshot().borrow().version;
        let mut states = client.state_changes();
        let unreachable = async {
            if cached == 0
                || states
                    .wait_for(|s| matches!(s, ConnectionState::Disconnected { .. }))
                    .await
                    .is_err()
            {
                std::future::pending::<()>().await;
            }
        };
        tokio::select! {
            () = stop.cancelled() => return,
            () = unreachable => tracing::warn!(snapshot.version = cached, "the control plane is unreachable; ready on the cached snapshot"),
            waited = tokio::time::timeout(timeout, client.first_snapshot()) => match waited {
                Ok(()) => tracing::info!("first snapshot from the control plane received"),
                Err(_) => {
                    let version = client.snapshot().borrow().version;
                    if version > 0 {
                        tracing::warn!(control_plane.ready_timeout_ms = timeout.as_millis() as u64, snapshot.version = version, "no snapshot from the control plane yet; ready on the cached snapshot");
                    } else {
                        tracing::warn!(control_plane.ready_timeout_ms = timeout.as_millis() as u64, "no snapshot from the control plane yet and none cached; ready on the static directory");
                    }
                }
            },
        }
        shared.set_control_plane_ready();
    });
}

/// Run the sidecar until it is told to stop.
pub async fn run(opts: RunOptions) -> anyhow::Result<()> {
    let shared = load(opts.config.clone()).await?;
    let listeners = Listeners::bind(&shared, opts.bound_file.as_deref()).await?;
    let control_plane = join_control_plane(&shared, &listeners.bound, opts.advertise)?;
    let serving = serve_listeners(&shared, listeners);
    wait_for_stop(&shared).await?;
    drain(&shared, control_plane.as_ref(), serving).await;
    Ok(())
}

/// Loads the bootstrap file at `path` and builds the shared state from it;
/// starts the OTLP metrics export when `[telemetry]` asks for it.
async fn load(path: PathBuf) -> anyhow::Result<Arc<LiveState>> {
    let loaded = tokio::task::spawn_blocking(move || weft_config::load_bootstrap(&path))
        .await
        .context("loading the configuration")??;
    let shared = LiveState::new(loaded).map_err(anyhow::Error::msg)?;
    let config = shared.config();
    let instance = config.loaded.bootstrap.service.as_ref().map(instance_id);
    if let Some(settings) =
        otlp_metrics::ExportSettings::from_bootstrap(&config.loaded.bootstrap, instance)
    {
        otlp_metrics::start(
            &settings,
            Arc::clone(&shared.metrics),
            Arc::clone(&shared),
            &shared.tasks,
            shared.shutdown.clone(),
        )?;
    }
    Ok(shared)
}

/// The three listeners, bound, and their addresses.
struct Listeners {
    outbound: TcpListener,
    inbound: TcpListener,
    admin: TcpListener,
    bound: Bound,
}

impl Listeners {
    /// Binds `[listen]`'s addresses, records them in `shared` (and in
    /// `bound_file`), and starts checking the local app: from here on the
    /// sidecar can become ready.
    async fn bind(shared: &LiveState, bound_file: Option<&Path>) -> anyhow::Result<Self> {
        let listen = shared.config().loaded.bootstrap.listen.clone();
        let outbound = bind("outbound", listen.outbound).await?;
        let inbound = bind("inbound", listen.inbound).await?;
        let admin = bind("admin", listen.admin).await?;
        let bound = Bound {
            outbound: outbound.local_addr()?,
            inbound: inbound.local_addr()?,
            admin: admin.local_addr()?,
        };
        shared.set_bound(bound);
        if shared.config().loaded.bootstrap.service.is_some() {
            shared.check_app_health();
        }
        if let Some(path) = bound_file {
            write_bound_file(path, &bound)?;
        }
        tracing::info!(
            listen.outbound = %bound.outbound,
            listen.inbound = %bound.inbound,
            listen.admin = %bound.admin,
            config.path = %shared.path().display(),
            "weft-proxy listening"
        );
        Ok(Self {
            outbound,
            inbound,
            admin,
            bound,
        })
    }
}

/// With a control plane: registers this instance and follows pushed
/// services; `None` without `[control_plane]`.
fn join_control_plane(
    shared: &Arc<LiveState>,
    bound: &Bound,
    advertise: Option<std::net::SocketAddr>,
) -> anyhow::Result<Option<ControlPlaneClient>> {
    if shared.config().loaded.bootstrap.control_plane.is_none() {
        return Ok(None);
    }
    let registration = registration(&shared.config().loaded, bound, advertise)?;
    Ok(follow_control_plane(shared, registration))
}

/// With `[control_plane]`: starts the session (registering `registration`,
/// if any, and following its service's policy) and follows pushed services;
/// `None` without `[control_plane]`.
fn follow_control_plane(
    shared: &Arc<LiveState>,
    registration: Option<Registration>,
) -> Option<ControlPlaneClient> {
    let config = shared.config();
    let loaded = &config.loaded;
    let cp = loaded.bootstrap.control_plane.as_ref()?;
    let registers = registration.is_some();
    let client = ControlPlaneClient::start(
        cp.addresses.clone(),
        registration,
        Some(shared.app_health_changes()),
        cp.cache.as_ref().map(|c| loaded.resolve(c)),
        shared.tls.as_deref(),
        &shared.tasks,
        shared.shutdown.clone(),
    );
    if let (Some(service), true) = (&loaded.bootstrap.service, registers) {
        shared.follow_own_service(&client, service.name.to_string());
    }
    wait_for_first_snapshot(shared, &client, cp.ready_timeout.get());
    shared.set_remote(RemoteServices::start(
        client.clone(),
        loaded,
        shared.tls.clone(),
        &shared.tasks,
        shared.shutdown.clone(),
    ));
    Some(client)
}

/// An in-process client's start (the `weft-client` crate): the state a
/// sidecar builds from the bootstrap file at `path` (directory, DNS,
/// telemetry) and, with `[control_plane]`, the session that follows pushed
/// services and policies. No listener is bound. Nothing is registered
/// unless `register`: then `[service]` is registered at its `advertise`
/// address, else at its `app` (the app takes calls itself, with no
/// sidecar), with the app's health checked as a sidecar checks it.
/// Everything started stops with `shared.shutdown` (tracked by
/// `shared.tasks`).
pub async fn embedded(
    path: PathBuf,
    register: bool,
) -> anyhow::Result<(Arc<LiveState>, Option<ControlPlaneClient>)> {
    let shared = load(path).await?;
    let registration = if register {
        Some(embedded_registration(&shared.config().loaded)?)
    } else {
        None
    };
    if registration.is_some() {
        shared.check_app_health();
    }
    let control_plane = follow_control_plane(&shared, registration);
    Ok((shared, control_plane))
}

/// What an in-process client registers when asked: `[service]` at its
/// `advertise` address, else its `app`; no admin listener.
fn embedded_registration(loaded: &weft_config::Loaded) -> anyhow::Result<Registration> {
    let (Some(service), Some(_)) = (&loaded.bootstrap.service, &loaded.bootstrap.control_plane)
    else {
        anyhow::bail!("registering needs [service] and [control_plane] in the bootstrap file");
    };
    let address = service.advertise.unwrap_or(service.app);
    if address.ip().is_unspecified() {
        anyhow::bail!(
            "the address to register is {address}; set [service] advertise to the address callers should use"
        );
    }
    let id = instance_id(service);
    weft_api::InstanceRecord::check_id(&id).map_err(|e| anyhow::anyhow!("[service] id: {e}"))?;
    Ok(Registration {
        record: weft_api::InstanceRecord {
            service: service.name.clone(),
            id,
            address,
            metadata: service.metadata.clone(),
            admin_address: None,
            health: weft_api::Health::Healthy,
        },
    })
}

/// The listeners' serving tasks and what stops them.
struct Serving {
    /// Stops the outbound and inbound listeners (at the start of the drain).
    data_stop: CancellationToken,
    /// Stops the admin listener (at exit).
    admin_stop: CancellationToken,
    outbound: JoinHandle<()>,
    inbound: JoinHandle<()>,
    admin: JoinHandle<()>,
}

/// Serves the three listeners, each on its own task. Data listeners stop at
/// the start of the drain; admin keeps answering (with /ready = 503) until
/// the process exits.
fn serve_listeners(shared: &Arc<LiveState>, listeners: Listeners) -> Serving {
    let limits = shared.config().loaded.bootstrap.limits.clone();
    let data_stop = CancellationToken::new();
    let admin_stop = CancellationToken::new();
    let out_task = tokio::spawn(serve(
        "outbound",
        listeners.outbound,
        None,
        {
            let s = Arc::clone(shared);
            move |peer| Outbound::new(Arc::clone(&s), peer)
        },
        shared.metrics.connections(Direction::Outbound).clone(),
        Hardening::data(&limits),
        data_stop.clone(),
    ));
    let inbound_tls = inbound_tls(shared);
    if let Some(tls) = &shared.tls {
        tls.watch(&shared.tasks, shared.shutdown.clone());
    }
    let in_task = tokio::spawn(serve(
        "inbound",
        listeners.inbound,
        inbound_tls,
        {
            let s = Arc::clone(shared);
            let rule = Arc::new(MeshRule::new(s.config().loaded.bootstrap.tls.as_ref()));
            move |peer| Inbound::new(Arc::clone(&s), peer, Arc::clone(&rule))
        },
        shared.metrics.connections(Direction::Inbound).clone(),
        Hardening::data(&limits),
        data_stop.clone(),
    ));
    let admin_task = tokio::spawn(serve(
        "admin",
        listeners.admin,
        None,
        {
            let s = Arc::clone(shared);
            move |_| Admin::new(Arc::clone(&s))
        },
        shared.metrics.admin_connections().clone(),
        Hardening::admin(&limits),
        admin_stop.clone(),
    ));
    Serving {
        data_stop,
        admin_stop,
        outbound: out_task,
        inbound: in_task,
        admin: admin_task,
    }
}

/// With `[tls]`, the inbound listener's acceptor; plaintext is allowed
/// while the local service's policy says so.
fn inbound_tls(shared: &Arc<LiveState>) -> Option<Arc<InboundTls>> {
    shared.tls.as_ref().map(|tls| {
        let s = Arc::clone(shared);
        Arc::new(InboundTls::new(
            Arc::clone(tls),
            Box::new(move || {
                s.directory()
                    .local
                    .as_ref()
                    .is_some_and(|l| l.policy.allow_plaintext)
            }),
        ))
    })
}

/// Reloads on every SIGHUP until SIGTERM or SIGINT.
async fn wait_for_stop(shared: &LiveState) -> anyhow::Result<()> {
    let mut hup = signal(SignalKind::hangup()).context("installing the SIGHUP handler")?;
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    loop {
        tokio::select! {
            _ = hup.recv() => match shared.reload().await {
                Ok(version) => tracing::info!(config.version = version, "configuration reloaded (SIGHUP)"),
                Err(error) => tracing::error!(error = %error, "reload rejected (SIGHUP); keeping the current configuration"),
            },
            _ = term.recv() => { tracing::info!("SIGTERM received"); return Ok(()) }
            _ = int.recv() => { tracing::info!("SIGINT received"); return Ok(()) }
        }
    }
}

/// Drains within `[drain] grace`: not ready, deregistered, data listeners
/// closed, in-flight requests and tasks finished (or the grace over), spans
/// flushed, then the admin listener closed.
async fn drain(shared: &LiveState, control_plane: Option<&ControlPlaneClient>, serving: Serving) {
    let grace = shared.config().loaded.bootstrap.drain.grace.get();
    tracing::info!(drain.grace_ms = grace.as_millis() as u64, "draining");
    shared.start_draining();
    let deadline = tokio::time::Instant::now() + grace;
    // Leave the directory first, so callers stop choosing this instance, and give
    // the change a moment to reach them before the listeners close: requests
    // already on their way still find an open listener.
    if let Some(client) = control_plane {
        let deregistered = client.deregister(grace.min(DEREGISTER_TIMEOUT)).await;
        tracing::info!(?deregistered, "deregistered from the control plane");
        tokio::time::sleep(grace.min(PROPAGATION_DELAY)).await;
    }
    serving.data_stop.cancel();
    let drained = tokio::time::timeout_at(deadline, async {
        let _ = serving.outbound.await;
        let _ = serving.inbound.await;
        shared.tasks.close();
        shared.shutdown.cancel();
        shared.tasks.wait().await;
    })
    .await;
    match drained {
        Ok(()) => tracing::info!("drained; exiting"),
        Err(_) => tracing::warn!("grace period over with requests still in flight; exiting"),
    }
    if let Some(traces) = &shared.reporters.traces {
        traces.shutdown(SPAN_FLUSH_TIMEOUT).await;
    }
    shared.shutdown.cancel();
    serving.admin_stop.cancel();
    let _ = tokio::time::timeout(Duration::from_millis(200), serving.admin).await;
}
