//! The chaos mesh: real etcd, two control-plane replicas, three services
//! of three instances, each instance an app process behind its own sidecar,
//! mTLS everywhere; and every operation the fault injector performs on it.
//!
//! | piece | how |
//! |---|---|
//! | etcd | [`EtcdCluster`] of three members on loopback |
//! | control plane | two `weft-control-plane` on that etcd, mTLS on the gRPC listener (a mesh CA from [`Pki`]), each listing the etcd members in a different order |
//! | instance | an [`AppProcess`] and a `weft-proxy` with `[service]`, `[tls]` (its service's certificate) and both control planes in `[control_plane]` |
//!
//! Every process sits in a slot behind an async mutex, so a fault and its
//! healing, a policy write, and the samplers never act on a process at the
//! same time. A change of state is recorded in the [`Timeline`] just before
//! the signal is sent (down) or once the process serves again (up).
//! Dropping the [`Mesh`] stops everything it started (the guards kill and
//! reap their processes), instances first, etcd last.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context as _, anyhow, bail};
use tokio::time::Instant;

use super::app::AppProcess;
use super::policy;
use super::timeline::{Change, Down, Proc, Timeline};
use crate::admin::Admin;
use crate::client::Client;
use crate::config::Bootstrap;
use crate::control_plane::{ControlPlane, CtlOutput};
use crate::etcd::EtcdCluster;
use crate::mesh::mesh_sidecar;
use crate::process::{Proxy, TempDir};
use crate::tls::Pki;

/// The services of the mesh; each calls the other two.
pub const SERVICES: [&str; 3] = ["billing", "orders", "search"];
/// Instances each service starts with.
pub const INSTANCES: usize = 3;
/// Control-plane replicas.
pub const CONTROL_PLANES: usize = 2;
/// etcd members.
pub const ETCD_MEMBERS: usize = 3;
/// How long a process that was signalled to exit may take.
const EXIT_TIMEOUT: Duration = Duration::from_secs(10);

/// The log level of every process the mesh starts (`$WEFT_TEST_LOG`, else
/// `warn`: dozens of guards print their logs when they drop).
fn log_filter() -> String {
    std::env::var("WEFT_TEST_LOG").unwrap_or_else(|_| "warn".to_owned())
}

/// Sends `signal` (`KILL`, `TERM`, `STOP`, `CONT`) to `pid` with kill(1).
pub fn send_signal(pid: u32, signal: &str) -> anyhow::Result<()> {
    let status = Command::new("kill")
        .arg(format!("-{signal}"))
        .arg(pid.to_string())
        .status()
        .context("running kill")?;
    if !status.success() {
        bail!("kill -{signal} {pid} failed: {status}");
    }
    Ok(())
}

fn signal_name(why: Down) -> &'static str {
    match why {
        Down::Kill => "KILL",
        Down::Term | Down::Remove => "TERM",
        Down::Stop => "STOP",
    }
}

/// A sidecar the traffic can send through: its instance and an HTTP client
/// for its outbound listener.
#[derive(Debug, Clone)]
pub struct Caller {
    pub id: String,
    pub service: String,
    pub client: Client,
}

/// A running sidecar as the samplers see it.
#[derive(Debug, Clone)]
pub struct Observed {
    pub id: String,
    pub service: String,
    pub pid: u32,
    pub admin: Admin,
    /// The inbound listener: the address the instance registers.
    pub inbound: SocketAddr,
}

/// Which process of an instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Part {
    App,
    Sidecar,
}

#[derive(Debug)]
struct Procs {
    app: AppProcess,
    app_paused: bool,
    sidecar: Option<Proxy>,
    sidecar_paused: bool,
}

/// What the traffic and the samplers may use of an instance right now.
#[derive(Debug, Default)]
struct Live {
    /// Set while the sidecar runs and is not paused.
    sidecar: Option<(Caller, Observed)>,
    removed: bool,
}

/// One instance: an app and its sidecar.
#[derive(Debug)]
pub struct Instance {
    pub service: String,
    pub id: String,
    procs: tokio::sync::Mutex<Procs>,
    live: Mutex<Live>,
}

impl Instance {
    /// True once the instance was taken out of the mesh.
    pub fn removed(&self) -> bool {
        self.live.lock().unwrap().removed
    }

    fn proc(&self, part: Part) -> Proc {
        match part {
            Part::App => Proc::App(self.id.clone()),
            Part::Sidecar => Proc::Sidecar(self.id.clone()),
        }
    }
}

#[derive(Debug)]
struct CpSlot {
    cp: ControlPlane,
    up: bool,
    paused: bool,
}

#[derive(Debug)]
struct EtcdSlot {
    cluster: EtcdCluster,
    up: Vec<bool>,
    paused: Vec<bool>,
}

/// The whole mesh. Fields drop in order: instances, control planes, etcd.
#[derive(Debug)]
pub struct Mesh {
    instances: Mutex<Vec<Arc<Instance>>>,
    cps: Vec<tokio::sync::Mutex<CpSlot>>,
    etcd: tokio::sync::Mutex<EtcdSlot>,
    pub timeline: Arc<Timeline>,
    app_bin: PathBuf,
    pki: Pki,
    cp_grpc: Vec<SocketAddr>,
    next_id: Mutex<BTreeMap<String, usize>>,
    /// CA and control-plane certificates, policy files.
    files: TempDir,
}

impl Mesh {
    /// Starts etcd, the control planes (with a valid policy applied for
    /// every service) and every instance, and returns once every sidecar
    /// has answered `/ready`.
    pub async fn start(app_bin: PathBuf, timeline: Arc<Timeline>) -> anyhow::Result<Arc<Self>> {
        let cluster = EtcdCluster::start(ETCD_MEMBERS).await?;
        for i in 0..ETCD_MEMBERS {
            timeline.record(Proc::Etcd(i), Change::Up);
        }
        let urls = cluster.client_urls();
        let pki = Pki::new();
        let files = TempDir::new()?;
        let tls_args = pki.control_plane_args(&files)?;
        let mut cps = Vec::with_capacity(CONTROL_PLANES);
        let mut cp_grpc = Vec::with_capacity(CONTROL_PLANES);
        for i in 0..CONTROL_PLANES {
            // Each replica lists the members from a different one on.
            let mut order = urls.clone();
            order.rotate_left(i % urls.len());
            let mut builder = ControlPlane::etcd(order.join(",")).log_filter(&log_filter());
            for arg in &tls_args {
                builder = builder.arg(arg);
            }
            let cp = builder.start().await?;
            timeline.record(Proc::ControlPlane(i), Change::Up);
            cp_grpc.push(cp.grpc());
            cps.push(tokio::sync::Mutex::new(CpSlot {
                cp,
                up: true,
                paused: false,
            }));
        }
        let mesh = Arc::new(Self {
            instances: Mutex::new(Vec::new()),
            cps,
            etcd: tokio::sync::Mutex::new(EtcdSlot {
                cluster,
                up: vec![true; ETCD_MEMBERS],
                paused: vec![false; ETCD_MEMBERS],
            }),
            timeline,
            app_bin,
            pki,
            cp_grpc,
            next_id: Mutex::new(BTreeMap::new()),
            files,
        });
        for (n, service) in SERVICES.iter().enumerate() {
            let applied = mesh
                .apply_policy(service, &policy::valid(service, n))
                .await?;
            applied.ok()?;
        }
        for service in SERVICES {
            for _ in 0..INSTANCES {
                mesh.add_instance(service).await?;
            }
        }
        Ok(mesh)
    }

    /// Every instance ever started, removed ones included.
    pub fn instances(&self) -> Vec<Arc<Instance>> {
        self.instances.lock().unwrap().clone()
    }

    /// The instances of `service` still in the mesh.
    pub fn instances_of(&self, service: &str) -> Vec<Arc<Instance>> {
        self.instances()
            .into_iter()
            .filter(|i| i.service == service && !i.removed())
            .collect()
    }

    /// The sidecars the traffic can send through now.
    pub fn callers(&self) -> Vec<Caller> {
        self.instances()
            .iter()
            .filter_map(|i| i.live.lock().unwrap().sidecar.as_ref().map(|s| s.0.clone()))
            .collect()
    }

    /// The sidecars running (and not paused) now.
    pub fn observed(&self) -> Vec<Observed> {
        self.instances()
            .iter()
            .filter_map(|i| i.live.lock().unwrap().sidecar.as_ref().map(|s| s.1.clone()))
            .collect()
    }

    /// Starts a new instance of `service` (app, then sidecar).
    pub async fn add_instance(&self, service: &str) -> anyhow::Result<Arc<Instance>> {
        let n = {
            let mut next = self.next_id.lock().unwrap();
            let n = next.entry(service.to_owned()).or_insert(0);
            *n += 1;
            *n
        };
        let id = format!("{service}-{n}");
        let app = AppProcess::start(&self.app_bin, &id).await?;
        self.timeline.record(Proc::App(id.clone()), Change::Up);
        let instance = Arc::new(Instance {
            service: service.to_owned(),
            id: id.clone(),
            procs: tokio::sync::Mutex::new(Procs {
                app,
                app_paused: false,
                sidecar: None,
                sidecar_paused: false,
            }),
            live: Mutex::new(Live::default()),
        });
        self.instances.lock().unwrap().push(Arc::clone(&instance));
        self.up(&instance, Part::Sidecar).await?;
        Ok(instance)
    }

    /// Takes `instance` out of the mesh: SIGTERM to its sidecar (which
    /// deregisters and drains), then its app.
    pub async fn remove_instance(&self, instance: &Instance) -> anyhow::Result<()> {
        let mut procs = instance.procs.lock().await;
        {
            let mut live = instance.live.lock().unwrap();
            live.removed = true;
            live.sidecar = None;
        }
        self.timeline
            .record(instance.proc(Part::Sidecar), Change::Down(Down::Remove));
        self.timeline
            .record(instance.proc(Part::App), Change::Down(Down::Remove));
        if let Some(sidecar) = procs.sidecar.take() {
            if procs.sidecar_paused {
                send_signal(sidecar.pid(), "CONT")?;
            }
            send_signal(sidecar.pid(), "TERM")?;
            let exited = sidecar.wait_exit(EXIT_TIMEOUT).await;
            drop(sidecar);
            exited?;
        }
        procs.app.kill();
        Ok(())
    }

    /// Takes one process of `instance` down (`why`: kill, term or stop).
    pub async fn down(&self, instance: &Instance, part: Part, why: Down) -> anyhow::Result<()> {
        let mut procs = instance.procs.lock().await;
        if instance.removed() {
            bail!("{} was removed", instance.id);
        }
        let signal = signal_name(why);
        match part {
            Part::App => {
                let pid = procs
                    .app
                    .pid()
                    .ok_or_else(|| anyhow!("app {} is not running", instance.id))?;
                anyhow::ensure!(!procs.app_paused, "app {} is paused", instance.id);
                self.timeline.record(instance.proc(part), Change::Down(why));
                send_signal(pid, signal)?;
                if why == Down::Stop {
                    procs.app_paused = true;
                } else {
                    procs.app.wait_exit(EXIT_TIMEOUT).await?;
                }
            }
            Part::Sidecar => {
                let pid = match &procs.sidecar {
                    Some(sidecar) if !procs.sidecar_paused => sidecar.pid(),
                    _ => bail!("sidecar {} is not running", instance.id),
                };
                instance.live.lock().unwrap().sidecar = None;
                self.timeline.record(instance.proc(part), Change::Down(why));
                send_signal(pid, signal)?;
                if why == Down::Stop {
                    procs.sidecar_paused = true;
                } else if let Some(sidecar) = procs.sidecar.take() {
                    let exited = sidecar.wait_exit(EXIT_TIMEOUT).await;
                    drop(sidecar);
                    exited?;
                }
            }
        }
        Ok(())
    }

    /// Brings one process of `instance` back: SIGCONT if paused, else a
    /// new process (an app on the same address; a sidecar with the same
    /// bootstrap, on new ports).
    pub async fn up(&self, instance: &Instance, part: Part) -> anyhow::Result<()> {
        let mut procs = instance.procs.lock().await;
        if instance.removed() {
            bail!("{} was removed", instance.id);
        }
        match part {
            Part::App if procs.app_paused => {
                let pid = procs
                    .app
                    .pid()
                    .ok_or_else(|| anyhow!("paused app {} is gone", instance.id))?;
                send_signal(pid, "CONT")?;
                procs.app_paused = false;
            }
            Part::App => procs.app.restart().await?,
            Part::Sidecar if procs.sidecar_paused => {
                let sidecar = procs
                    .sidecar
                    .as_ref()
                    .ok_or_else(|| anyhow!("paused sidecar {} is gone", instance.id))?;
                send_signal(sidecar.pid(), "CONT")?;
                procs.sidecar_paused = false;
            }
            Part::Sidecar => {
                let sidecar = self
                    .start_sidecar(&instance.service, &instance.id, procs.app.addr())
                    .await?;
                procs.sidecar = Some(sidecar);
            }
        }
        if part == Part::Sidecar
            && let Some(sidecar) = &procs.sidecar
        {
            let caller = Caller {
                id: instance.id.clone(),
                service: instance.service.clone(),
                client: Client::host_header(sidecar.outbound()),
            };
            let observed = Observed {
                id: instance.id.clone(),
                service: instance.service.clone(),
                pid: sidecar.pid(),
                admin: sidecar.admin_client(),
                inbound: sidecar.inbound(),
            };
            instance.live.lock().unwrap().sidecar = Some((caller, observed));
        }
        self.timeline.record(instance.proc(part), Change::Up);
        Ok(())
    }

    async fn start_sidecar(
        &self,
        service: &str,
        id: &str,
        app: SocketAddr,
    ) -> anyhow::Result<Proxy> {
        let addresses: Vec<String> = self
            .cp_grpc
            .iter()
            .map(|a| format!("https://{a}"))
            .collect();
        mesh_sidecar(
            Bootstrap::new().app(service, app).app_id(id).grace("1s"),
            &addresses,
            Some((&self.pki, service)),
        )
        .log_filter(&log_filter())
        .start()
        .await
        .with_context(|| format!("starting sidecar {id}"))
    }

    /// Takes control-plane replica `i` down.
    pub async fn cp_down(&self, i: usize, why: Down) -> anyhow::Result<()> {
        let mut slot = self.cps[i].lock().await;
        anyhow::ensure!(slot.up, "control plane {i} is already down");
        let pid = slot.cp.pid()?;
        slot.up = false;
        self.timeline
            .record(Proc::ControlPlane(i), Change::Down(why));
        match why {
            Down::Kill | Down::Remove => slot.cp.kill()?,
            Down::Term => {
                send_signal(pid, "TERM")?;
                let deadline = Instant::now() + EXIT_TIMEOUT;
                while slot.cp.is_running() {
                    if Instant::now() >= deadline {
                        slot.cp.kill()?;
                        bail!("control plane {i} did not exit on SIGTERM within {EXIT_TIMEOUT:?}");
                    }
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
            Down::Stop => {
                send_signal(pid, "STOP")?;
                slot.paused = true;
            }
        }
        Ok(())
    }

    /// Brings control-plane replica `i` back (SIGCONT, or a restart on the
    /// same gRPC address).
    pub async fn cp_up(&self, i: usize) -> anyhow::Result<()> {
        let mut slot = self.cps[i].lock().await;
        if slot.up {
            return Ok(());
        }
        if slot.paused {
            send_signal(slot.cp.pid()?, "CONT")?;
            slot.paused = false;
        } else {
            slot.cp.restart().await?;
        }
        slot.up = true;
        self.timeline.record(Proc::ControlPlane(i), Change::Up);
        Ok(())
    }

    /// Runs `weftctl ARGS` against the first control plane that is up
    /// (starting at replica `prefer`).
    pub async fn weftctl(&self, prefer: usize, args: &[&str]) -> anyhow::Result<CtlOutput> {
        for k in 0..self.cps.len() {
            let slot = self.cps[(prefer + k) % self.cps.len()].lock().await;
            if slot.up {
                return slot.cp.weftctl(args).await;
            }
        }
        bail!("no control plane is up")
    }

    /// `weftctl apply -f FILE` of `text` as `service`'s policy.
    pub async fn apply_policy(&self, service: &str, text: &str) -> anyhow::Result<CtlOutput> {
        // A file of its own: policy changes run concurrently.
        static FILES: AtomicUsize = AtomicUsize::new(0);
        let n = FILES.fetch_add(1, Ordering::Relaxed);
        let path = self.files.write(&format!("{service}-{n}.toml"), text)?;
        let path = path.display().to_string();
        self.weftctl(0, &["apply", "--create", "-f", &path]).await
    }

    /// The store revision each control plane that is up reflects (its
    /// `weft_control_plane_directory_revision`); `None` for one that is not.
    pub async fn cp_revisions(&self) -> Vec<Option<u64>> {
        let mut out = Vec::with_capacity(self.cps.len());
        for slot in &self.cps {
            let slot = slot.lock().await;
            let revision = if slot.up {
                match Admin::new(slot.cp.admin()).metrics().await {
                    Ok(scrape) => scrape
                        .get("weft_control_plane_directory_revision", &[])
                        .map(|v| v as u64),
                    Err(_) => None,
                }
            } else {
                None
            };
            out.push(revision);
        }
        out
    }

    /// Every control plane's `weftctl get instances SERVICE`: the instance
    /// ids and addresses it lists (`Err` for a replica that is down or
    /// failed to answer).
    pub async fn directory(&self, service: &str) -> Vec<anyhow::Result<Vec<(String, String)>>> {
        let mut out = Vec::with_capacity(self.cps.len());
        for i in 0..self.cps.len() {
            let slot = self.cps[i].lock().await;
            if !slot.up {
                out.push(Err(anyhow!("control plane {i} is down")));
                continue;
            }
            let listed = slot
                .cp
                .weftctl_ok(&["get", "instances", service])
                .await
                .map(|text| parse_instances(&text));
            out.push(listed);
        }
        out
    }

    /// Takes etcd member `i` down.
    pub async fn etcd_down(&self, i: usize, why: Down) -> anyhow::Result<()> {
        let mut slot = self.etcd.lock().await;
        anyhow::ensure!(slot.up[i], "etcd member {i} is already down");
        let pid = slot
            .cluster
            .pid(i)
            .ok_or_else(|| anyhow!("etcd member {i} is not running"))?;
        slot.up[i] = false;
        self.timeline.record(Proc::Etcd(i), Change::Down(why));
        match why {
            Down::Kill | Down::Remove => slot.cluster.kill(i)?,
            Down::Term => {
                send_signal(pid, "TERM")?;
                let deadline = Instant::now() + EXIT_TIMEOUT;
                while slot.cluster.is_running(i) {
                    if Instant::now() >= deadline {
                        slot.cluster.kill(i)?;
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
            Down::Stop => {
                send_signal(pid, "STOP")?;
                slot.paused[i] = true;
            }
        }
        Ok(())
    }

    /// Brings etcd member `i` back (SIGCONT, or a restart with its data).
    pub async fn etcd_up(&self, i: usize) -> anyhow::Result<()> {
        let mut slot = self.etcd.lock().await;
        if slot.up[i] {
            return Ok(());
        }
        if slot.paused[i] {
            let pid = slot
                .cluster
                .pid(i)
                .ok_or_else(|| anyhow!("paused etcd member {i} is gone"))?;
            send_signal(pid, "CONT")?;
            slot.paused[i] = false;
        } else {
            slot.cluster.restart(i).await?;
        }
        slot.up[i] = true;
        self.timeline.record(Proc::Etcd(i), Change::Up);
        Ok(())
    }

    /// Writes `value` at `key` straight into etcd (through a member that
    /// is up), bypassing the control plane's validation.
    pub async fn etcd_put(&self, key: &str, value: &str) -> anyhow::Result<()> {
        let slot = self.etcd.lock().await;
        let mut last = anyhow!("no etcd member is up");
        for i in (0..slot.up.len()).filter(|i| slot.up[*i]) {
            let attempt = async {
                let mut client = slot.cluster.connect(i).await?;
                client.put(key, value, None).await?;
                anyhow::Ok(())
            };
            match attempt.await {
                Ok(()) => return Ok(()),
                Err(error) => last = error,
            }
        }
        Err(last)
    }

    /// Brings every process that is down or paused back, retrying each
    /// until `deadline`. Returns what could not be brought back.
    pub async fn heal_all(&self, deadline: Instant) -> Vec<String> {
        let mut failed = Vec::new();
        loop {
            failed.clear();
            for i in 0..ETCD_MEMBERS {
                if let Err(error) = self.etcd_up(i).await {
                    failed.push(format!("etcd e{i}: {error:#}"));
                }
            }
            for i in 0..self.cps.len() {
                if let Err(error) = self.cp_up(i).await {
                    failed.push(format!("control plane {i}: {error:#}"));
                }
            }
            for instance in self.instances().iter().filter(|i| !i.removed()) {
                let (app_down, sidecar_down) = {
                    let mut procs = instance.procs.lock().await;
                    let app_down = procs.app_paused || procs.app.pid().is_none();
                    (app_down, procs.sidecar_paused || procs.sidecar.is_none())
                };
                for (part, down) in [(Part::App, app_down), (Part::Sidecar, sidecar_down)] {
                    if down && let Err(error) = self.up(instance, part).await {
                        failed.push(format!("{}: {error:#}", instance.proc(part)));
                    }
                }
            }
            if failed.is_empty() || Instant::now() >= deadline {
                return failed;
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }
}

/// The `ID` and `ADDRESS` columns of `weftctl get instances` (the header
/// line skipped).
fn parse_instances(text: &str) -> Vec<(String, String)> {
    text.lines()
        .skip(1)
        .filter_map(|line| {
            let mut columns = line.split_whitespace();
            Some((columns.next()?.to_owned(), columns.next()?.to_owned()))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn instance_table_parses() {
        let text = "ID          ADDRESS          ZONE  VERSION  WEIGHT  ADMIN\n\
                    billing-1   127.0.0.1:4143   -     -        -       127.0.0.1:9\n";
        assert_eq!(
            parse_instances(text),
            vec![("billing-1".to_owned(), "127.0.0.1:4143".to_owned())]
        );
        assert!(parse_instances("ID ADDRESS\n").is_empty());
    }
}
