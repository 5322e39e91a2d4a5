//! The control-plane client against a real `weft-control-plane --dev` process:
//! registration seen by subscribers, policies applied with `weftctl` pushed,
//! static stability when the control plane dies, re-registration and
//! resubscription when it comes back with an empty store, deregistration, and
//! a cold start from the snapshot cache.
//!
//! The binaries are `$WEFT_CONTROL_PLANE_BIN` and `$WEFTCTL_BIN`, else
//! `weft-control-plane` and `weftctl` in the target directory this test was
//! built into, where `cargo build -p weft-control-plane` (same
//! `CARGO_TARGET_DIR`) puts them.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::fs::{self, File};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use weft_api::InstanceRecord;
use weft_discovery::control_plane::{
    ConnectionState, ControlPlaneClient, Deregistered, Lookup, Registration, RemoteSnapshot,
};

/// Generous bound for anything that should take milliseconds.
const SOON: Duration = Duration::from_secs(10);

/// The client's logs, shown by libtest for failing tests.
fn logs() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new("weft_discovery=debug"))
        .with_test_writer()
        .try_init();
}

fn bin(env: &str, name: &str) -> PathBuf {
    if let Some(bin) = std::env::var_os(env) {
        return PathBuf::from(bin);
    }
    // Test executables live in target/<profile>/deps/; binaries one level up.
    let exe = std::env::current_exe().unwrap();
    let bin = exe.parent().and_then(Path::parent).unwrap().join(name);
    assert!(
        bin.exists(),
        "{} does not exist: run `cargo build -p weft-control-plane` with the same \
         CARGO_TARGET_DIR, or set {env}",
        bin.display()
    );
    bin
}

/// A scratch directory, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> Self {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let path = std::env::temp_dir().join(format!(
            "weft-cp-client-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = fs::remove_dir_all(&path);
        fs::create_dir_all(&path).unwrap();
        Self(path)
    }

    fn join(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// One running `weft-control-plane --dev`; killed on drop, its log printed
/// (libtest shows it for failing tests only).
struct ControlPlane {
    child: Child,
    grpc: SocketAddr,
    admin: SocketAddr,
    log: PathBuf,
}

impl ControlPlane {
    /// Starts one on `listen` (port 0 for any) with a fresh in-memory store.
    fn start(dir: &TempDir, listen: SocketAddr, lease_ttl: &str) -> Self {
        static RUN: AtomicU64 = AtomicU64::new(0);
        let run = RUN.fetch_add(1, Ordering::Relaxed);
        let bound = dir.join(&format!("bound-{run}.json"));
        let log = dir.join(&format!("control-plane-{run}.log"));
        let child = Command::new(bin("WEFT_CONTROL_PLANE_BIN", "weft-control-plane"))
            .args(["--dev", "--admin", "127.0.0.1:0", "--lease-ttl", lease_ttl])
            .arg("--listen")
            .arg(listen.to_string())
            .arg("--bound-file")
            .arg(&bound)
            .env("WEFT_LOG", "info,weft_control_plane=debug")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let mut cp = Self {
            child,
            grpc: listen,
            admin: listen,
            log,
        };
        let deadline = Instant::now() + SOON;
        loop {
            if let Ok(text) = fs::read_to_string(&bound)
                && let Ok(json) = serde_json::from_str::<serde_json::Value>(&text)
            {
                cp.grpc = json["listen"].as_str().unwrap().parse().unwrap();
                cp.admin = json["admin"].as_str().unwrap().parse().unwrap();
                return cp;
            }
            if let Ok(Some(status)) = cp.child.try_wait() {
                panic!("weft-control-plane exited at start: {status}");
            }
            assert!(
                Instant::now() < deadline,
                "weft-control-plane did not start"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn url(&self) -> String {
        format!("http://{}", self.grpc)
    }

    /// `weftctl apply -f FILE` against this control plane.
    fn apply(&self, file: &Path) {
        let out = Command::new(bin("WEFTCTL_BIN", "weftctl"))
            .arg("--control-plane")
            .arg(format!("http://{}", self.admin))
            .arg("apply")
            .arg("--create")
            .arg("-f")
            .arg(file)
            .env_remove("WEFT_TOKEN_FILE")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "weftctl apply failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        self.kill();
        if let Ok(log) = fs::read_to_string(&self.log) {
            eprintln!("---- {} ----\n{log}", self.log.display());
        }
    }
}

/// A client with its own task tracker; stopped (and waited for) on drop of
/// [`Client::stop`].
struct Client {
    client: ControlPlaneClient,
    tasks: TaskTracker,
    stop: CancellationToken,
}

impl Client {
    fn start(
        addresses: &[String],
        registration: Option<Registration>,
        cache: Option<PathBuf>,
    ) -> Self {
        let tasks = TaskTracker::new();
        let stop = CancellationToken::new();
        let client = ControlPlaneClient::start(
            addresses.to_vec(),
            registration,
            None,
            cache,
            None,
            &tasks,
            stop.clone(),
        );
        Self {
            client,
            tasks,
            stop,
        }
    }

    async fn stop(self) {
        self.stop.cancel();
        self.tasks.close();
        tokio::time::timeout(SOON, self.tasks.wait())
            .await
            .expect("the client's tasks stop");
    }

    /// Waits until the snapshot satisfies `f`.
    async fn until(
        &self,
        what: &str,
        f: impl FnMut(&Arc<RemoteSnapshot>) -> bool,
    ) -> Arc<RemoteSnapshot> {
        let mut rx = self.client.snapshot();
        let found = tokio::time::timeout(SOON, async {
            rx.wait_for(f).await.map(|s| Arc::clone(&s)).ok()
        })
        .await;
        match found {
            Ok(Some(snapshot)) => snapshot,
            _ => panic!(
                "{what}: not within {SOON:?}; last snapshot: {:?}",
                rx.borrow()
            ),
        }
    }

    /// Waits until the connection state satisfies `f`.
    async fn until_state(&self, what: &str, f: impl FnMut(&ConnectionState) -> bool) {
        let mut rx = self.client.state_changes();
        if tokio::time::timeout(SOON, rx.wait_for(f)).await.is_err() {
            panic!(
                "{what}: not within {SOON:?}; state: {:?}",
                self.client.state()
            );
        }
    }
}

fn registration(service: &str, id: &str, port: u16) -> Registration {
    let record = InstanceRecord {
        service: service.parse().unwrap(),
        id: id.to_owned(),
        address: SocketAddr::from(([127, 0, 0, 1], port)),
        metadata: weft_config::Metadata {
            zone: Some("eu-1".to_owned()),
            ..weft_config::Metadata::default()
        },
        admin_address: Some(SocketAddr::from(([127, 0, 0, 1], port + 1))),
        health: weft_api::Health::Healthy,
    };
    Registration { record }
}

/// The ports of `service`'s endpoints in `snapshot` (empty when unknown).
fn ports(snapshot: &RemoteSnapshot, service: &str) -> Vec<u16> {
    match snapshot.lookup(service) {
        Lookup::Found(s) => s.endpoints.iter().map(|e| e.addr.port()).collect(),
        Lookup::Missing | Lookup::Unknown => Vec::new(),
    }
}

/// Waits until `client` sees its own registration (so the control plane's
/// view has it).
async fn registered(client: &Client, service: &str, port: u16) {
    client
        .until("registered", |s| ports(s, service).contains(&port))
        .await;
}

fn connected(state: &ConnectionState) -> bool {
    matches!(state, ConnectionState::Connected { .. })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_registered_instance_reaches_subscribers() {
    logs();
    let dir = TempDir::new();
    let cp = ControlPlane::start(&dir, "127.0.0.1:0".parse().unwrap(), "10s");
    let addresses = [cp.url()];

    let billing = Client::start(
        &addresses,
        Some(registration("billing", "billing-1", 5001)),
        None,
    );
    // The sidecar subscribes to its own service from the start.
    registered(&billing, "billing", 5001).await;
    let caller = Client::start(&addresses, None, None);

    let service = caller
        .client
        .service("billing", SOON)
        .await
        .expect("billing is known");
    assert_eq!(service.name, "billing");
    assert_eq!(service.instances[0].id, "billing-1");
    assert_eq!(service.endpoints[0].addr, "127.0.0.1:5001".parse().unwrap());
    assert_eq!(service.endpoints[0].metadata.zone.as_deref(), Some("eu-1"));
    assert_eq!(service.live_instances, 1);
    assert!(service.policy.is_none());
    assert!(connected(&caller.client.state()));

    // A second instance reaches the existing subscription as a delta.
    let second = Client::start(
        &addresses,
        Some(registration("billing", "billing-2", 5003)),
        None,
    );
    let snap = caller
        .until("the second instance", |s| ports(s, "billing").len() == 2)
        .await;
    assert_eq!(snap.services["billing"].live_instances, 2);

    // A name nobody registered is answered as missing, without waiting out
    // the deadline.
    let started = Instant::now();
    assert!(caller.client.service("ghost", SOON).await.is_none());
    assert!(started.elapsed() < SOON / 2, "{:?}", started.elapsed());
    assert_eq!(
        caller.client.snapshot().borrow().lookup("ghost"),
        Lookup::Missing
    );
    // Not a service name: refused at once, not subscribed.
    assert!(caller.client.service("Not A Name", SOON).await.is_none());
    assert_eq!(caller.client.rejected(), (0, None));

    second.stop().await;
    caller.stop().await;
    billing.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_name_and_a_dead_address_fail_over_to_the_live_one() {
    logs();
    let dir = TempDir::new();
    let cp = ControlPlane::start(&dir, "127.0.0.1:0".parse().unwrap(), "10s");
    // A dead address first in the list, then the live one by name: whichever
    // the client starts with, it ends up connected through the name.
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dead_url = format!("http://{}", dead.local_addr().unwrap());
    drop(dead);
    let by_name = format!("http://localhost:{}", cp.grpc.port());
    let client = Client::start(
        &[dead_url, by_name.clone()],
        Some(registration("billing", "billing-1", 5001)),
        None,
    );
    registered(&client, "billing", 5001).await;
    assert_eq!(
        client.client.state(),
        ConnectionState::Connected { address: by_name }
    );
    client.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_applied_policy_is_pushed() {
    logs();
    let dir = TempDir::new();
    let cp = ControlPlane::start(&dir, "127.0.0.1:0".parse().unwrap(), "10s");
    let addresses = [cp.url()];
    let caller = Client::start(&addresses, None, None);
    // Nothing yet: missing.
    assert!(caller.client.service("billing", SOON).await.is_none());

    let policy = dir.join("billing.toml");
    fs::write(
        &policy,
        "service = \"billing\"\n\n[inbound]\nmax_concurrency = 7\n",
    )
    .unwrap();
    cp.apply(&policy);
    let snap = caller
        .until(
            "the policy",
            |s| matches!(s.lookup("billing"), Lookup::Found(b) if b.policy.is_some()),
        )
        .await;
    let billing = &snap.services["billing"];
    let max = billing
        .policy
        .as_ref()
        .and_then(|p| p.inbound.max_concurrency)
        .map(|n| n.get());
    assert_eq!(max, Some(7));
    assert!(
        billing
            .policy_toml
            .as_deref()
            .unwrap()
            .contains("max_concurrency = 7")
    );
    assert!(billing.endpoints.is_empty());

    // A changed policy replaces it.
    fs::write(
        &policy,
        "service = \"billing\"\n\n[inbound]\nmax_concurrency = 9\n",
    )
    .unwrap();
    cp.apply(&policy);
    caller
        .until("the changed policy", |s| {
            matches!(s.lookup("billing"), Lookup::Found(b)
                if b.policy.as_ref().and_then(|p| p.inbound.max_concurrency).map(|n| n.get()) == Some(9))
        })
        .await;
    assert_eq!(caller.client.rejected(), (0, None));
    caller.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_control_plane_restart_keeps_the_snapshot_then_resyncs() {
    logs();
    let dir = TempDir::new();
    let mut cp = ControlPlane::start(&dir, "127.0.0.1:0".parse().unwrap(), "10s");
    let listen = cp.grpc;
    let addresses = [cp.url()];

    let billing = Client::start(
        &addresses,
        Some(registration("billing", "billing-1", 5001)),
        None,
    );
    registered(&billing, "billing", 5001).await;
    let caller = Client::start(&addresses, None, None);
    assert!(caller.client.service("billing", SOON).await.is_some());
    let before = caller.client.snapshot().borrow().clone();

    // Killed: both clients notice, and keep what they knew.
    cp.kill();
    caller
        .until_state("the caller notices", |s| {
            matches!(s, ConnectionState::Disconnected { .. })
        })
        .await;
    billing
        .until_state("the instance notices", |s| {
            matches!(s, ConnectionState::Disconnected { .. })
        })
        .await;
    let ConnectionState::Disconnected { error, .. } = caller.client.state() else {
        unreachable!()
    };
    assert!(!error.is_empty());
    // Reconnection attempts fail for a while; nothing is cleared.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(Arc::ptr_eq(&caller.client.snapshot().borrow(), &before));
    assert_eq!(ports(&caller.client.snapshot().borrow(), "billing"), [5001]);
    assert!(
        caller
            .client
            .service("billing", Duration::ZERO)
            .await
            .is_some(),
        "served from the last snapshot"
    );

    // Back on the same address with an empty store: the instance registers
    // again and the caller resubscribes and sees it again.
    let cp = ControlPlane::start(&dir, listen, "10s");
    caller.until_state("the caller reconnects", connected).await;
    billing
        .until_state("the instance reconnects", connected)
        .await;
    caller
        .until("billing registered again", |s| {
            ports(s, "billing") == [5001]
        })
        .await;

    // New registrations work, and new subscriptions too.
    let orders = Client::start(
        &addresses,
        Some(registration("orders", "orders-1", 6001)),
        None,
    );
    let found = caller.client.service("orders", SOON).await;
    let found = match found {
        Some(s) if !s.endpoints.is_empty() => s,
        // The subscription may have been answered before the registration.
        _ => caller
            .until("orders registered", |s| ports(s, "orders") == [6001])
            .await
            .services["orders"]
            .clone(),
    };
    assert_eq!(found.endpoints[0].addr.port(), 6001);
    assert_eq!(caller.client.rejected(), (0, None));

    orders.stop().await;
    caller.stop().await;
    billing.stop().await;
    drop(cp);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deregistering_removes_the_instance_at_once() {
    logs();
    let dir = TempDir::new();
    // A long TTL: a removal within it can only be the deregistration.
    let cp = ControlPlane::start(&dir, "127.0.0.1:0".parse().unwrap(), "60s");
    let addresses = [cp.url()];
    let billing = Client::start(
        &addresses,
        Some(registration("billing", "billing-1", 5001)),
        None,
    );
    let other = Client::start(
        &addresses,
        Some(registration("billing", "billing-2", 5003)),
        None,
    );
    let caller = Client::start(&addresses, None, None);
    caller.client.subscribe("billing").unwrap();
    caller
        .until("both instances", |s| ports(s, "billing").len() == 2)
        .await;

    let started = Instant::now();
    assert_eq!(
        billing.client.deregister(SOON).await,
        Deregistered::Acknowledged
    );
    caller
        .until("billing-1 removed", |s| ports(s, "billing") == [5003])
        .await;
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );

    // Deregistering again is harmless; the subscription goes on.
    assert_eq!(
        billing.client.deregister(SOON).await,
        Deregistered::Acknowledged
    );
    assert!(connected(&billing.client.state()));
    billing
        .until("billing still followed", |s| ports(s, "billing") == [5003])
        .await;
    // A client without a registration has nothing to deregister.
    assert_eq!(
        caller.client.deregister(SOON).await,
        Deregistered::NotRegistered
    );

    // The last instance goes: the service is gone for the caller.
    assert_eq!(
        other.client.deregister(SOON).await,
        Deregistered::Acknowledged
    );
    caller
        .until("billing gone", |s| s.lookup("billing") == Lookup::Missing)
        .await;

    other.stop().await;
    caller.stop().await;
    billing.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cache_file_serves_a_cold_start_without_the_control_plane() {
    logs();
    let dir = TempDir::new();
    let cache = dir.join("cache/snapshot.json");
    let mut cp = ControlPlane::start(&dir, "127.0.0.1:0".parse().unwrap(), "10s");
    let addresses = [cp.url()];
    let billing = Client::start(
        &addresses,
        Some(registration("billing", "billing-1", 5001)),
        None,
    );
    registered(&billing, "billing", 5001).await;
    let caller = Client::start(&addresses, None, Some(cache.clone()));
    assert!(caller.client.service("billing", SOON).await.is_some());
    // Written by the background task, within about a second.
    let deadline = Instant::now() + SOON;
    while !fs::read_to_string(&cache).is_ok_and(|t| t.contains("billing-1")) {
        assert!(Instant::now() < deadline, "the cache was not written");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    caller.stop().await;
    billing.stop().await;
    cp.kill();

    // A new sidecar, control plane down: it starts from the cache.
    let cold = Client::start(&addresses, None, Some(cache.clone()));
    let service = cold
        .client
        .service("billing", Duration::ZERO)
        .await
        .expect("billing from the cache");
    assert_eq!(service.endpoints[0].addr.port(), 5001);
    assert_eq!(service.instances[0].id, "billing-1");
    cold.until_state("cold start is disconnected", |s| {
        matches!(s, ConnectionState::Disconnected { .. })
    })
    .await;
    // Still served after failed attempts; the cache file is left as it was.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        cold.client
            .service("billing", Duration::ZERO)
            .await
            .is_some()
    );
    assert!(fs::read_to_string(&cache).unwrap().contains("billing-1"));
    cold.stop().await;

    // A corrupt cache is reported and ignored.
    fs::write(&cache, "{ not json").unwrap();
    let broken = Client::start(&addresses, None, Some(cache.clone()));
    assert!(broken.client.snapshot().borrow().services.is_empty());
    broken.stop().await;
}
