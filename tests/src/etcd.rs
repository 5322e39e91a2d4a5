//! Real etcd for tests: a single node ([`EtcdServer`], optionally serving
//! clients over TLS) or a cluster of several members on loopback
//! ([`EtcdCluster`]).
//!
//! etcd is run from `PATH`, else `/usr/bin/etcd`, on 127.0.0.1 with ports
//! picked at run time and data directories in a fresh temp dir, with fast
//! elections (10 ms heartbeats, 100 ms election timeout). A start waits
//! (bounded) until every member serves linearizable reads, so the cluster
//! has a leader. Dropping the guard (also while a test panics) kills every
//! member, waits for each to exit and removes the directory.
//!
//! Ports are found by binding port 0 and releasing it; another process may
//! grab one in between, so a start that fails with "address already in use"
//! is retried with new ports. etcd missing is a hard failure telling the
//! reader to run `scripts/setup`: these tests never skip themselves.
//!
//! A member can be killed (SIGKILL: a crash, not a shutdown) and restarted
//! on the same ports with the same data, which is how the outage scenarios
//! take etcd away and bring it back.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::ffi::OsString;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context as _, anyhow, bail};
use etcd_client::{Certificate, Client, ConnectOptions, Identity, TlsOptions};
use tokio::time::Instant;

use crate::process::TempDir;

/// How long etcd gets to become healthy (it usually takes 0.1-0.5 s).
const START_TIMEOUT: Duration = Duration::from_secs(15);
/// Starts that lost a port race are retried this many times.
const START_ATTEMPTS: usize = 5;
/// At most this much of a member's log goes into an error message.
const LOG_LIMIT: usize = 16 * 1024;

/// PEM text of the files a TLS etcd needs: the CA, the server's certificate
/// and key (for 127.0.0.1), and a client certificate and key the server
/// accepts.
#[derive(Debug, Clone)]
pub struct TlsPem {
    pub ca: String,
    pub server_cert: String,
    pub server_key: String,
    pub client_cert: String,
    pub client_key: String,
}

/// One etcd process of a cluster (or the only one).
#[derive(Debug)]
struct Member {
    client_url: String,
    args: Vec<OsString>,
    log_path: PathBuf,
    child: Option<Child>,
}

impl Member {
    fn stop(&mut self) -> anyhow::Result<()> {
        if let Some(mut child) = self.child.take() {
            if let Ok(None) = child.try_wait() {
                child.kill().context("killing etcd")?;
            }
            child.wait().context("waiting for etcd to exit")?;
        }
        Ok(())
    }

    fn log(&self) -> String {
        let log = std::fs::read_to_string(&self.log_path).unwrap_or_default();
        let start = log.len().saturating_sub(LOG_LIMIT);
        let start = (start..log.len())
            .find(|i| log.is_char_boundary(*i))
            .unwrap_or(log.len());
        log[start..].to_owned()
    }
}

/// A running etcd cluster (one member or more), stopped when dropped.
#[derive(Debug)]
pub struct EtcdCluster {
    binary: PathBuf,
    members: Vec<Member>,
    tls: Option<TlsOptions>,
    // Declared last: removed after every member has exited.
    dir: TempDir,
}

impl EtcdCluster {
    /// Starts a cluster of `size` members on loopback and waits until every
    /// member is healthy.
    pub async fn start(size: usize) -> anyhow::Result<Self> {
        Self::start_with(size, None).await
    }

    async fn start_with(size: usize, pki: Option<&TlsPem>) -> anyhow::Result<Self> {
        anyhow::ensure!(size > 0, "an etcd cluster needs at least one member");
        let binary = find_etcd()?;
        let mut attempt = 1;
        loop {
            match Self::try_start(&binary, size, pki).await {
                Ok(cluster) => return Ok(cluster),
                Err(Start::PortTaken(log)) if attempt < START_ATTEMPTS => {
                    eprintln!("etcd lost a port race (attempt {attempt}), retrying:\n{log}");
                    attempt += 1;
                }
                Err(Start::PortTaken(log)) => bail!("etcd could not bind its ports:\n{log}"),
                Err(Start::Failed(e)) => return Err(e),
            }
        }
    }

    async fn try_start(binary: &Path, size: usize, pki: Option<&TlsPem>) -> Result<Self, Start> {
        let dir = TempDir::new()?;
        let scheme = if pki.is_some() { "https" } else { "http" };
        let mut ports = Vec::with_capacity(size);
        // Hold every probe listener until all ports are picked, so the
        // members never get the same port.
        let mut probes = Vec::with_capacity(2 * size);
        for _ in 0..size {
            let client = TcpListener::bind("127.0.0.1:0").context("binding a probe port")?;
            let peer = TcpListener::bind("127.0.0.1:0").context("binding a probe port")?;
            ports.push((
                client.local_addr().context("probe port")?.port(),
                peer.local_addr().context("probe port")?.port(),
            ));
            probes.push(client);
            probes.push(peer);
        }
        drop(probes);
        let names: Vec<String> = (0..size).map(|i| format!("e{i}")).collect();
        let initial_cluster = names
            .iter()
            .zip(&ports)
            .map(|(name, (_, peer))| format!("{name}=http://127.0.0.1:{peer}"))
            .collect::<Vec<_>>()
            .join(",");

        let mut tls_args: Vec<OsString> = Vec::new();
        let mut client_tls = None;
        if let Some(pki) = pki {
            let write = |name: &str, pem: &str| -> anyhow::Result<PathBuf> { dir.write(name, pem) };
            tls_args.push("--trusted-ca-file".into());
            tls_args.push(write("ca.pem", &pki.ca)?.into());
            tls_args.push("--cert-file".into());
            tls_args.push(write("server.pem", &pki.server_cert)?.into());
            tls_args.push("--key-file".into());
            tls_args.push(write("server-key.pem", &pki.server_key)?.into());
            tls_args.push("--client-cert-auth".into());
            write("client.pem", &pki.client_cert)?;
            write("client-key.pem", &pki.client_key)?;
            client_tls = Some(
                TlsOptions::new()
                    .ca_certificate(Certificate::from_pem(&pki.ca))
                    .identity(Identity::from_pem(&pki.client_cert, &pki.client_key)),
            );
        }

        let mut members = Vec::with_capacity(size);
        for (name, (client_port, peer_port)) in names.iter().zip(&ports) {
            let client_url = format!("{scheme}://127.0.0.1:{client_port}");
            let peer_url = format!("http://127.0.0.1:{peer_port}");
            let mut args = tls_args.clone();
            args.extend(["--name".into(), name.into(), "--data-dir".into()]);
            args.push(dir.path().join(format!("{name}.data")).into());
            for (flag, value) in [
                ("--listen-client-urls", &client_url),
                ("--advertise-client-urls", &client_url),
                ("--listen-peer-urls", &peer_url),
                ("--initial-advertise-peer-urls", &peer_url),
                ("--initial-cluster", &initial_cluster),
                ("--initial-cluster-state", &"new".to_owned()),
            ] {
                args.push(flag.into());
                args.push(value.into());
            }
            args.extend([
                "--heartbeat-interval=10".into(),
                "--election-timeout=100".into(),
            ]);
            members.push(Member {
                client_url,
                args,
                log_path: dir.path().join(format!("{name}.log")),
                child: None,
            });
        }
        let mut cluster = EtcdCluster {
            binary: binary.to_owned(),
            members,
            tls: client_tls,
            dir,
        };
        for i in 0..size {
            let child = spawn(
                binary,
                &cluster.members[i].args,
                &cluster.members[i].log_path,
            )?;
            cluster.members[i].child = Some(child);
        }
        for i in 0..size {
            cluster.wait_healthy(i).await?;
        }
        Ok(cluster)
    }

    /// How many members the cluster has (running or not).
    pub fn size(&self) -> usize {
        self.members.len()
    }

    /// Every member's client URL (`http://127.0.0.1:PORT`), in member order.
    pub fn client_urls(&self) -> Vec<String> {
        self.members.iter().map(|m| m.client_url.clone()).collect()
    }

    /// Member `i`'s client URL.
    pub fn client_url(&self, i: usize) -> &str {
        &self.members[i].client_url
    }

    /// The client URLs joined with commas, as `weft-control-plane --etcd` takes them.
    pub fn etcd_arg(&self) -> String {
        self.client_urls().join(",")
    }

    /// The scratch directory (data dirs, logs, TLS files).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// True while member `i`'s process runs.
    pub fn is_running(&mut self, i: usize) -> bool {
        self.members[i]
            .child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// Member `i`'s process id while it runs (to signal it: SIGTERM, SIGSTOP).
    pub fn pid(&mut self, i: usize) -> Option<u32> {
        let child = self.members[i].child.as_mut()?;
        matches!(child.try_wait(), Ok(None)).then(|| child.id())
    }

    /// Kills member `i` (SIGKILL) and waits for it to exit; its data
    /// directory stays for [`EtcdCluster::restart`].
    pub fn kill(&mut self, i: usize) -> anyhow::Result<()> {
        self.members[i].stop()
    }

    /// Starts member `i` again with the same ports and data, and waits until
    /// it is healthy (has rejoined a cluster with a leader).
    pub async fn restart(&mut self, i: usize) -> anyhow::Result<()> {
        self.members[i].stop()?;
        let child = spawn(
            &self.binary,
            &self.members[i].args,
            &self.members[i].log_path,
        )?;
        self.members[i].child = Some(child);
        match self.wait_healthy(i).await {
            Ok(()) => Ok(()),
            Err(Start::PortTaken(log)) => {
                bail!("etcd's ports were taken while it was down:\n{log}")
            }
            Err(Start::Failed(e)) => Err(e),
        }
    }

    /// The index of the current leader, asked of the first running member
    /// that answers (bounded).
    pub async fn leader(&mut self) -> anyhow::Result<usize> {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            for i in 0..self.members.len() {
                if !self.is_running(i) {
                    continue;
                }
                let Ok(mut client) = self.connect(i).await else {
                    continue;
                };
                let Ok(status) = client.status().await else {
                    continue;
                };
                let leader = status.leader();
                if leader == 0 {
                    continue;
                }
                // Find which member has the leader's id.
                for j in 0..self.members.len() {
                    if !self.is_running(j) {
                        continue;
                    }
                    if let Ok(mut other) = self.connect(j).await
                        && let Ok(status) = other.status().await
                        && status.header().map(|h| h.member_id()) == Some(leader)
                    {
                        return Ok(j);
                    }
                }
            }
            if Instant::now() >= deadline {
                bail!("no etcd member named a running leader within {START_TIMEOUT:?}");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// A client connected to member `i` only.
    pub async fn connect(&self, i: usize) -> anyhow::Result<Client> {
        Client::connect([&self.members[i].client_url], Some(self.options()))
            .await
            .with_context(|| format!("connecting to etcd at {}", self.members[i].client_url))
    }

    fn options(&self) -> ConnectOptions {
        let options = ConnectOptions::new()
            .with_connect_timeout(Duration::from_millis(200))
            .with_timeout(Duration::from_millis(500));
        match &self.tls {
            Some(tls) => options.with_tls(tls.clone()),
            None => options,
        }
    }

    /// Waits until member `i` answers a linearizable read (so it is part of
    /// a cluster with a leader), or fails with its log if it exits or takes
    /// too long.
    async fn wait_healthy(&mut self, i: usize) -> Result<(), Start> {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            let exited = match self.members[i].child.as_mut() {
                Some(child) => child.try_wait().context("polling etcd")?,
                None => return Err(Start::Failed(anyhow!("etcd member {i} is not running"))),
            };
            if let Some(status) = exited {
                let log = self.members[i].log();
                if log.contains("address already in use") {
                    return Err(Start::PortTaken(log));
                }
                return Err(Start::Failed(anyhow!(
                    "etcd member {i} exited with {status} before becoming healthy; its log:\n{log}"
                )));
            }
            if let Ok(mut client) = self.connect(i).await
                && client.get("health", None).await.is_ok()
            {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(Start::Failed(anyhow!(
                    "etcd at {} not healthy within {START_TIMEOUT:?}; its log:\n{}",
                    self.members[i].client_url,
                    self.members[i].log()
                )));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        // SIGKILL: nothing in a test's etcd needs a clean shutdown, and
        // waiting for the exit frees the ports before the next start.
        for member in &mut self.members {
            let _ = member.stop();
        }
    }
}

/// A running single-node etcd, stopped when dropped.
#[derive(Debug)]
pub struct EtcdServer {
    cluster: EtcdCluster,
}

impl EtcdServer {
    /// Starts a single-node etcd and waits until it is healthy.
    pub async fn start() -> anyhow::Result<Self> {
        Ok(Self {
            cluster: EtcdCluster::start_with(1, None).await?,
        })
    }

    /// Starts one that serves clients over TLS and requires client
    /// certificates signed by `pki.ca`; the PEM files are in
    /// [`EtcdServer::tls_dir`] (`ca.pem`, `client.pem`, `client-key.pem`).
    pub async fn start_tls(pki: &TlsPem) -> anyhow::Result<Self> {
        Ok(Self {
            cluster: EtcdCluster::start_with(1, Some(pki)).await?,
        })
    }

    /// The client URL, `http://127.0.0.1:PORT` (`https` with TLS).
    pub fn client_url(&self) -> &str {
        self.cluster.client_url(0)
    }

    /// Where a TLS server's PEM files are.
    pub fn tls_dir(&self) -> &Path {
        self.cluster.dir()
    }

    /// Kills etcd (SIGKILL: a crash, not a shutdown) and waits for it to
    /// exit; its data directory stays for [`EtcdServer::restart`].
    pub fn kill(&mut self) -> anyhow::Result<()> {
        self.cluster.kill(0)
    }

    /// Starts etcd again with the same ports and data, and waits until it is
    /// healthy.
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        self.cluster.restart(0).await
    }

    /// A client connected to it.
    pub async fn connect(&self) -> anyhow::Result<Client> {
        self.cluster.connect(0).await
    }
}

enum Start {
    /// Another process took one of the ports between picking and binding.
    PortTaken(String),
    Failed(anyhow::Error),
}

impl From<anyhow::Error> for Start {
    fn from(e: anyhow::Error) -> Self {
        Start::Failed(e)
    }
}

/// Runs etcd with `args`, appending its output to `log_path`.
fn spawn(binary: &Path, args: &[OsString], log_path: &Path) -> anyhow::Result<Child> {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log_path)
        .context("opening etcd's log file")?;
    Command::new(binary)
        .args(args)
        .stdin(Stdio::null())
        .stdout(log.try_clone().context("duplicating etcd's log file")?)
        .stderr(log)
        .spawn()
        .with_context(|| format!("starting {}", binary.display()))
}

/// etcd from `PATH`, else Debian's `/usr/bin/etcd`.
fn find_etcd() -> anyhow::Result<PathBuf> {
    let on_path = std::env::var_os("PATH").and_then(|path| {
        std::env::split_paths(&path)
            .map(|dir| dir.join("etcd"))
            .find(|candidate| candidate.is_file())
    });
    let debian = Path::new("/usr/bin/etcd");
    match on_path {
        Some(binary) => Ok(binary),
        None if debian.is_file() => Ok(debian.to_owned()),
        None => bail!(
            "etcd is not installed (not on PATH, not at /usr/bin/etcd): run scripts/setup, \
             which installs Debian's etcd-server"
        ),
    }
}
