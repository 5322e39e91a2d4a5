//! `weft-control-plane`: keeps the directory and every service's policy in a
//! store (etcd, or an embedded in-memory store with `--dev`) and serves them.
//!
//! Start-up: the TLS files (gRPC and admin) are read and both listeners bound first (a mistake
//! there exits at once); the admin listener answers from then on. If etcd does
//! not answer yet, the control plane keeps trying with backoff, logging each
//! try, and stays alive and not ready (`/ready` 503, `/live` 200) until it
//! does; the gRPC listener accepts sidecars from then on.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::{Arc, OnceLock};

use anyhow::Context;
use clap::Parser;
use rand::Rng;
use tokio::net::TcpListener;
use tokio::signal::unix::{SignalKind, signal};
use tokio_util::sync::CancellationToken;
use weft_api::v1::control_plane_server::ControlPlaneServer;
use weft_control_plane::admin::{self, AdminState};
use weft_control_plane::auth::Tokens;
use weft_control_plane::metrics::{self, MeteredStore, Metrics};
use weft_control_plane::push::Push;
use weft_control_plane::serve;
use weft_control_plane::store::etcd::{
    ClientCert, ConnectError, EtcdOptions, EtcdStore, EtcdTls, EtcdUser, Password,
};
use weft_control_plane::store::memory::{MemoryOptions, MemoryStore};
use weft_control_plane::store::{AnyStore, DEFAULT_KEY_PREFIX, ErrorChain};
use weft_control_plane::tasks::Tasks;
use weft_control_plane::tls::{ServerTls, TlsPaths};
use weft_control_plane::{ui, view};

#[derive(Debug, Parser)]
#[command(
    name = "weft-control-plane",
    version = concat!(env!("CARGO_PKG_VERSION"), " (commit ", env!("WEFT_GIT_COMMIT"), ")"),
    about = "The Weft control plane"
)]
struct Args {
    /// Use an embedded in-memory store instead of etcd. Nothing persists.
    #[arg(long, conflicts_with = "etcd")]
    dev: bool,
    /// etcd endpoints (comma-separated), e.g. https://etcd-0:2379,https://etcd-1:2379.
    #[arg(long, value_delimiter = ',', required_unless_present = "dev")]
    etcd: Vec<String>,
    /// Key prefix in etcd.
    #[arg(long, default_value = DEFAULT_KEY_PREFIX)]
    etcd_prefix: String,
    /// CA certificate (PEM) that signed the etcd members' certificates.
    #[arg(long)]
    etcd_ca: Option<PathBuf>,
    /// Client certificate and key (PEM) for etcd.
    #[arg(long, requires = "etcd_key")]
    etcd_cert: Option<PathBuf>,
    #[arg(long, requires = "etcd_cert")]
    etcd_key: Option<PathBuf>,
    /// etcd user; the password is read from --etcd-password-file.
    #[arg(long, requires = "etcd_password_file")]
    etcd_user: Option<String>,
    #[arg(long)]
    etcd_password_file: Option<PathBuf>,
    /// The sidecar-facing gRPC API (registration and push).
    #[arg(long, default_value = "0.0.0.0:8443")]
    listen: SocketAddr,
    /// How long a registration outlives its sidecar's stream.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    lease_ttl: std::time::Duration,
    /// How long after start pushed snapshots say the control plane is still
    /// warming up, so sidecars keep instances it has not heard from again yet
    /// (registrations that expired while no control plane was up). Default:
    /// the lease TTL plus 10s, the sidecars' longest reconnect backoff.
    #[arg(long, value_parser = parse_duration)]
    warm_up: Option<std::time::Duration>,
    /// mTLS on the gRPC listener: the mesh CA (PEM). With --tls-cert and
    /// --tls-key, sidecars must connect over TLS 1.3 with a certificate from
    /// this CA naming their service, and may only register that service.
    #[arg(long, requires_all = ["tls_cert", "tls_key"])]
    tls_ca: Option<PathBuf>,
    /// The control plane's certificate (PEM), identity
    /// spiffe://<trust-domain>/control-plane (`weftctl certs control-plane`).
    #[arg(long, requires = "tls_ca")]
    tls_cert: Option<PathBuf>,
    /// Its private key (PEM).
    #[arg(long, requires = "tls_ca")]
    tls_key: Option<PathBuf>,
    /// The mesh's SPIFFE trust domain.
    #[arg(long, default_value = weft_config::TrustDomain::DEFAULT)]
    trust_domain: weft_config::TrustDomain,
    /// How often the TLS files (--tls-*, --admin-tls-*) are checked for a
    /// new certificate.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    tls_watch_interval: std::time::Duration,
    /// The admin API (weftctl).
    #[arg(long, default_value = "127.0.0.1:8444")]
    admin: SocketAddr,
    /// Serve the admin API over TLS (HTTPS only) with this certificate
    /// (PEM, leaf first; e.g. the --tls-cert one, issued with
    /// `weftctl certs control-plane --san NAME_OR_IP`). Reloaded when it
    /// changes, like --tls-cert.
    #[arg(long, value_name = "FILE", requires = "admin_tls_key")]
    admin_tls_cert: Option<PathBuf>,
    /// The admin certificate's private key (PEM).
    #[arg(long, value_name = "FILE", requires = "admin_tls_cert")]
    admin_tls_key: Option<PathBuf>,
    /// Bearer tokens accepted by the admin API, one per line. Required unless --dev.
    #[arg(long, required_unless_present = "dev")]
    token_file: Option<PathBuf>,
    /// Turn the web view (`/ui` on the admin listener) off: 404.
    #[arg(long)]
    no_ui: bool,
    /// Read-only tokens for the web view only, one per line (the admin
    /// tokens are accepted too).
    #[arg(long, value_name = "FILE", conflicts_with = "no_ui")]
    ui_token_file: Option<PathBuf>,
    /// Also accept the web view's token as `?token=` in the URL (for tests
    /// and kiosks: a URL ends up in histories and logs). Off by default.
    #[arg(long, conflicts_with = "no_ui")]
    ui_allow_query_token: bool,
    /// How often the web view fetches the sidecars' admin endpoints (while
    /// a page was loaded in the last 10 minutes).
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    ui_sample_interval: std::time::Duration,
    /// Once serving (listening, and the store answered), write the bound
    /// addresses (JSON) to this file.
    #[arg(long)]
    bound_file: Option<PathBuf>,
    /// Client connections open at once on the gRPC listener; past it a new
    /// connection is accepted and closed at once.
    #[arg(long, default_value_t = 10_000, value_parser = clap::value_parser!(u32).range(1..))]
    max_connections: u32,
    /// Client connections open at once on the admin listener.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..))]
    admin_max_connections: u32,
    /// Log format: plain or json.
    #[arg(long, default_value = "plain", value_parser = ["plain", "json"])]
    log_format: String,
}

fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    s.parse::<weft_config::Duration>()
        .map(|d| d.get())
        .map_err(|e| e.to_string())
}

/// The store: the embedded one with `--dev`, else etcd once it answers.
async fn store(args: &Args) -> anyhow::Result<Option<AnyStore>> {
    if args.dev {
        tracing::warn!(
            "--dev: using the embedded in-memory store; NOTHING PERSISTS, every registration and policy is lost when this process exits"
        );
        return Ok(Some(MemoryStore::new(MemoryOptions::default()).into()));
    }
    let mut options = EtcdOptions::new(args.etcd.clone());
    options.key_prefix = args.etcd_prefix.clone();
    if let Some(ca_file) = &args.etcd_ca {
        options.tls = Some(EtcdTls {
            ca_file: ca_file.clone(),
            client_cert: match (&args.etcd_cert, &args.etcd_key) {
                (Some(cert_file), Some(key_file)) => Some(ClientCert {
                    cert_file: cert_file.clone(),
                    key_file: key_file.clone(),
                }),
                _ => None,
            },
            domain: None,
        });
    }
    if let (Some(name), Some(file)) = (&args.etcd_user, &args.etcd_password_file) {
        let password = std::fs::read_to_string(file)
            .with_context(|| format!("reading the etcd password file {}", file.display()))?;
        options.user = Some(EtcdUser {
            name: name.clone(),
            password: Password::new(password.trim_end_matches(['\r', '\n'])),
        });
    }
    // etcd unreachable at start (not yet up, a network partition) is waited
    // for, as it is later on: the admin API answers meanwhile, not ready. An
    // invalid URL, unreadable TLS files or a refused password is not: the
    // process exits.
    let mut failures = 0u32;
    loop {
        match EtcdStore::connect(options.clone()).await {
            Ok(store) => return Ok(Some(store.into())),
            Err(ConnectError::Store { source, .. }) if source.is_retryable() => {
                failures = failures.saturating_add(1);
                let ceiling = CONNECT_RETRY_MIN
                    .saturating_mul(1u32 << failures.min(6))
                    .min(CONNECT_RETRY_MAX);
                let wait = rand::rng().random_range(CONNECT_RETRY_MIN..=ceiling);
                tracing::warn!(
                    etcd.endpoints = %options.endpoints.join(","),
                    error = %ErrorChain(&source),
                    attempt = failures,
                    retry_in_ms = wait.as_millis() as u64,
                    "etcd unreachable at start; not ready, trying again"
                );
                tokio::time::sleep(wait).await;
            }
            Err(e) => return Err(e).context("connecting to etcd"),
        }
    }
}

/// Backoff bounds while etcd is unreachable at start (jittered, doubling).
const CONNECT_RETRY_MIN: std::time::Duration = std::time::Duration::from_millis(100);
const CONNECT_RETRY_MAX: std::time::Duration = std::time::Duration::from_secs(5);

/// How long shutdown waits for the control plane's tasks after cancelling
/// them (the listeners themselves let connections finish for 5 s).
const SHUTDOWN_GRACE: std::time::Duration = std::time::Duration::from_secs(8);

/// The admin API's state once the store answered; until then it serves
/// `/live`, `/ready` (503) and `/metrics` only.
type AdminCell = Arc<OnceLock<Arc<AdminState<MeteredStore<AnyStore>>>>>;

async fn run(args: Args) -> anyhow::Result<()> {
    let tokens = match &args.token_file {
        Some(path) => Some(Tokens::from_file(path)?),
        None => {
            tracing::warn!(
                "--dev without --token-file: the admin API accepts requests without a token"
            );
            None
        }
    };
    let ui_tokens = match &args.ui_token_file {
        Some(path) => Some(Tokens::from_file(path)?),
        None => None,
    };
    let mut metrics = Metrics::new();
    if tls_files(&args).is_some() {
        metrics = metrics.with_tls();
    }
    if args.admin_tls_cert.is_some() {
        metrics = metrics.with_admin_tls();
    }
    let metrics = Arc::new(metrics);
    let tasks = Tasks::new(CancellationToken::new(), metrics.tasks());
    let tls = grpc_tls(&args, &metrics, &tasks)?;
    let admin_tls = admin_tls(&args, &metrics, &tasks)?;
    let admin_listener = TcpListener::bind(args.admin)
        .await
        .with_context(|| format!("binding the admin listener to {}", args.admin))?;
    let admin_addr = admin_listener.local_addr()?;
    let grpc_listener = TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("binding the gRPC listener to {}", args.listen))?;
    let grpc_addr = grpc_listener.local_addr()?;

    let state = AdminCell::default();
    spawn_admin(&args, admin_listener, admin_tls, &state, &metrics, &tasks);

    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let store = tokio::select! {
        connected = store(&args) => connected?,
        _ = term.recv() => { tracing::info!("SIGTERM received"); None }
        _ = int.recv() => { tracing::info!("SIGINT received"); None }
    };
    let Some(store) = store else {
        tasks.shutdown(SHUTDOWN_GRACE).await;
        return Ok(());
    };
    let store = Arc::new(MeteredStore::new(store, Arc::clone(&metrics)));
    let view = view::follow(Arc::clone(&store), Arc::clone(&metrics), &tasks);
    tracing::info!(listen.grpc = %grpc_addr, listen.admin = %admin_addr, lease_ttl_ms = args.lease_ttl.as_millis() as u64, "weft-control-plane ready");
    let push = Push::new(
        Arc::clone(&store),
        view.clone(),
        args.lease_ttl,
        args.warm_up
            .unwrap_or(args.lease_ttl + weft_control_plane::push::SIDECAR_BACKOFF_MAX),
        Arc::clone(&metrics),
        tasks.clone(),
    );
    tasks.spawn(
        "grpc-listener",
        serve::grpc(
            grpc_listener,
            serve::Limits {
                max_connections: args.max_connections,
                refused: metrics.connections_refused("grpc"),
            },
            tls,
            tasks.clone(),
            ControlPlaneServer::new(push),
        ),
    );
    let ui = match ui_tokens {
        _ if args.no_ui => None,
        ui_tokens => {
            let sampler = Arc::new(ui::Sampler::new(args.ui_sample_interval));
            tasks.spawn(
                "ui-sampler",
                Arc::clone(&sampler).run(view.clone(), tasks.stop().clone()),
            );
            Some(ui::Ui {
                tokens: ui_tokens,
                allow_query_token: args.ui_allow_query_token,
                secure_cookie: args.admin_tls_cert.is_some(),
                store: if args.dev { "embedded (--dev)" } else { "etcd" },
                sampler,
            })
        }
    };
    let _ = state.set(Arc::new(AdminState {
        store: Arc::clone(&store),
        view,
        tokens,
        metrics: Arc::clone(&metrics),
        ui,
    }));
    // Written once everything serves (so a process waiting on it may use
    // the whole admin API at once), not while waiting for etcd.
    if let Some(path) = &args.bound_file {
        write_bound_file(path, admin_addr, grpc_addr)?;
    }

    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received"),
        _ = int.recv() => tracing::info!("SIGINT received"),
    }
    tasks.shutdown(SHUTDOWN_GRACE).await;
    Ok(())
}

/// --tls-ca, --tls-cert and --tls-key, when all three are given.
fn tls_files(args: &Args) -> Option<(&PathBuf, &PathBuf, &PathBuf)> {
    match (&args.tls_ca, &args.tls_cert, &args.tls_key) {
        (Some(ca), Some(cert), Some(key)) => Some((ca, cert, key)),
        _ => None,
    }
}

/// mTLS on the gRPC listener, when --tls-ca, --tls-cert and --tls-key are
/// given (the files are then watched for a new certificate).
fn grpc_tls(
    args: &Args,
    metrics: &Arc<Metrics>,
    tasks: &Tasks,
) -> anyhow::Result<Option<serve::Tls>> {
    let Some((ca, cert, key)) = tls_files(args) else {
        if !args.dev {
            tracing::warn!(
                "no --tls-ca/--tls-cert/--tls-key: sidecars connect in plaintext and any of them may register any service"
            );
        }
        return Ok(None);
    };
    let server = ServerTls::load(
        TlsPaths {
            ca: ca.clone(),
            cert: cert.clone(),
            key: key.clone(),
        },
        args.trust_domain.clone(),
        metrics.tls_certificate_expiry(),
    )
    .context("setting up mTLS on the gRPC listener")?;
    server.watch(args.tls_watch_interval, tasks);
    Ok(Some(serve::Tls {
        server,
        failures: metrics.tls_failures(),
    }))
}

/// TLS on the admin listener, with --admin-tls-cert and --admin-tls-key
/// (the files are then watched for a new certificate).
fn admin_tls(
    args: &Args,
    metrics: &Arc<Metrics>,
    tasks: &Tasks,
) -> anyhow::Result<Option<serve::Tls>> {
    let (Some(cert), Some(key)) = (&args.admin_tls_cert, &args.admin_tls_key) else {
        return Ok(None);
    };
    let server = ServerTls::load_admin(
        cert.clone(),
        key.clone(),
        metrics.admin_tls_certificate_expiry(),
    )
    .context("setting up TLS on the admin listener")?;
    server.watch(args.tls_watch_interval, tasks);
    Ok(Some(serve::Tls {
        server,
        failures: metrics.admin_tls_failures(),
    }))
}

/// Serves the admin API from the start: until the store has answered,
/// /live 200, /ready 503 and /metrics; the rest once `state` is set.
fn spawn_admin(
    args: &Args,
    listener: TcpListener,
    tls: Option<serve::Tls>,
    state: &AdminCell,
    metrics: &Arc<Metrics>,
    tasks: &Tasks,
) {
    let limits = serve::Limits {
        max_connections: args.admin_max_connections,
        refused: metrics.connections_refused("admin"),
    };
    let (state, metrics) = (Arc::clone(state), Arc::clone(metrics));
    let handler = move |req: hyper::Request<hyper::body::Incoming>| {
        let (method, route) = (req.method().clone(), metrics::admin_route(req.uri().path()));
        let (state, metrics) = (state.get().cloned(), Arc::clone(&metrics));
        async move {
            let rsp = match state {
                Some(state) => admin::handle(state, req).await,
                None => Ok(admin::starting(&metrics, &req)),
            };
            if let Ok(rsp) = &rsp {
                metrics.admin_request(&method, route, rsp.status());
            }
            rsp
        }
    };
    tasks.spawn(
        "admin-listener",
        serve::http(listener, limits, tls, tasks.clone(), handler),
    );
}

/// Writes the bound addresses (JSON) to `path`, atomically.
fn write_bound_file(
    path: &std::path::Path,
    admin: SocketAddr,
    listen: SocketAddr,
) -> anyhow::Result<()> {
    let tmp = path.with_extension("tmp");
    let bound = serde_json::json!({ "admin": admin, "listen": listen });
    std::fs::write(&tmp, serde_json::to_vec(&bound)?)?;
    std::fs::rename(&tmp, path)?;
    Ok(())
}

fn main() -> ExitCode {
    let args = Args::parse();
    weft_telemetry::init_logs(if args.log_format == "json" {
        weft_telemetry::LogFormat::Json
    } else {
        weft_telemetry::LogFormat::Plain
    });
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: starting the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
