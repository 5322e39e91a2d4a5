//! A real single-node etcd for tests: [`EtcdServer::start`] runs `etcd` (from
//! `PATH`, else `/usr/bin/etcd`) on 127.0.0.1 with ports picked at run time
//! and a data directory in a fresh temp dir, with fast elections, and waits
//! (bounded) until it serves linearizable reads. Dropping it (also while a
//! test panics) kills etcd, waits for it to exit and removes the directory.
//!
//! Ports are found by binding port 0 and releasing it; another process may
//! grab one in between, so a start that fails with "address already in use"
//! is retried with new ports. etcd missing is a hard failure telling the
//! reader to run `scripts/setup`: these tests never skip themselves.
//!
//! [`EtcdServer::start_tls`] serves clients over TLS and requires client
//! certificates, with a [`TestPki`] whose files it writes to
//! [`EtcdServer::tls_dir`] (`ca.pem`, `client.pem`, `client-key.pem`).

use std::ffi::OsString;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context as _, bail};
use etcd_client::{Certificate, Client, ConnectOptions, Identity, TlsOptions};
use tempfile::TempDir;
use tokio::time::Instant;

use super::tls::TestPki;

/// How long etcd gets to become healthy (it usually takes 0.1-0.4 s).
const START_TIMEOUT: Duration = Duration::from_secs(15);
/// Starts that lost a port race are retried this many times.
const START_ATTEMPTS: usize = 5;

/// A running etcd, stopped when dropped.
#[derive(Debug)]
pub struct EtcdServer {
    child: Child,
    client_url: String,
    dir: TempDir,
    /// What a restart needs: the command and how to check health.
    binary: PathBuf,
    args: Vec<OsString>,
    log_path: PathBuf,
    tls: Option<TlsOptions>,
}

impl EtcdServer {
    /// Starts a single-node etcd and waits until it is healthy.
    pub async fn start() -> anyhow::Result<Self> {
        Self::start_with(None).await
    }

    /// Starts one that serves clients over TLS with client certificates.
    pub async fn start_tls(pki: &TestPki) -> anyhow::Result<Self> {
        Self::start_with(Some(pki)).await
    }

    async fn start_with(pki: Option<&TestPki>) -> anyhow::Result<Self> {
        let binary = find_etcd()?;
        let mut attempt = 1;
        loop {
            match Self::try_start(&binary, pki).await {
                Ok(server) => return Ok(server),
                Err(Start::PortTaken(log)) if attempt < START_ATTEMPTS => {
                    eprintln!("etcd lost a port race (attempt {attempt}), retrying:\n{log}");
                    attempt += 1;
                }
                Err(Start::PortTaken(log)) => bail!("etcd could not bind its ports:\n{log}"),
                Err(Start::Failed(e)) => return Err(e),
            }
        }
    }

    /// The client URL, `http://127.0.0.1:PORT` (`https` with TLS).
    pub fn client_url(&self) -> &str {
        &self.client_url
    }

    /// Where a TLS server's PEM files are.
    pub fn tls_dir(&self) -> &Path {
        self.dir.path()
    }

    async fn try_start(binary: &Path, pki: Option<&TestPki>) -> Result<Self, Start> {
        let dir = tempfile::Builder::new()
            .prefix("weft-etcd-")
            .tempdir()
            .context("creating etcd's temp dir")?;
        let client_port = free_port()?;
        let peer_port = free_port()?;
        let scheme = if pki.is_some() { "https" } else { "http" };
        let client_url = format!("{scheme}://127.0.0.1:{client_port}");
        let peer_url = format!("http://127.0.0.1:{peer_port}");
        let log_path = dir.path().join("etcd.log");
        let mut args: Vec<OsString> = Vec::new();
        let mut client_tls = None;
        if let Some(pki) = pki {
            let write = |name: &str, pem: &str| -> anyhow::Result<PathBuf> {
                let path = dir.path().join(name);
                std::fs::write(&path, pem).with_context(|| format!("writing {name}"))?;
                Ok(path)
            };
            args.push("--trusted-ca-file".into());
            args.push(write("ca.pem", &pki.ca)?.into());
            args.push("--cert-file".into());
            args.push(write("server.pem", &pki.server_cert)?.into());
            args.push("--key-file".into());
            args.push(write("server-key.pem", &pki.server_key)?.into());
            args.push("--client-cert-auth".into());
            write("client.pem", &pki.client_cert)?;
            write("client-key.pem", &pki.client_key)?;
            client_tls = Some(
                TlsOptions::new()
                    .ca_certificate(Certificate::from_pem(&pki.ca))
                    .identity(Identity::from_pem(&pki.client_cert, &pki.client_key)),
            );
        }
        args.extend(["--name".into(), "n0".into(), "--data-dir".into()]);
        args.push(dir.path().join("data").into());
        for (flag, value) in [
            ("--listen-client-urls", &client_url),
            ("--advertise-client-urls", &client_url),
            ("--listen-peer-urls", &peer_url),
            ("--initial-advertise-peer-urls", &peer_url),
            ("--initial-cluster", &format!("n0={peer_url}")),
            ("--initial-cluster-state", &"new".to_owned()),
        ] {
            args.push(flag.into());
            args.push(value.into());
        }
        args.extend([
            "--heartbeat-interval=10".into(),
            "--election-timeout=100".into(),
        ]);
        let child = spawn(binary, &args, &log_path)?;
        let mut server = EtcdServer {
            child,
            client_url,
            dir,
            binary: binary.to_owned(),
            args,
            log_path: log_path.clone(),
            tls: client_tls.clone(),
        };
        server.wait_healthy(&log_path, client_tls).await?;
        Ok(server)
    }

    /// Kills etcd (SIGKILL: a crash, not a shutdown) and waits for it to
    /// exit; its data directory stays for [`EtcdServer::restart`].
    pub fn kill(&mut self) -> anyhow::Result<()> {
        self.child.kill().context("killing etcd")?;
        self.child.wait().context("waiting for etcd to exit")?;
        Ok(())
    }

    /// Starts etcd again with the same ports and data, and waits until it is
    /// healthy.
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        self.child = spawn(&self.binary, &self.args, &self.log_path)?;
        let (log_path, tls) = (self.log_path.clone(), self.tls.clone());
        match self.wait_healthy(&log_path, tls).await {
            Ok(()) => Ok(()),
            Err(Start::PortTaken(log)) => {
                bail!("etcd's ports were taken while it was down:\n{log}")
            }
            Err(Start::Failed(e)) => Err(e),
        }
    }

    /// Waits until etcd answers a linearizable read (so it has a leader), or
    /// fails with its log if it exits or takes too long.
    async fn wait_healthy(
        &mut self,
        log_path: &Path,
        tls: Option<TlsOptions>,
    ) -> Result<(), Start> {
        let deadline = Instant::now() + START_TIMEOUT;
        let mut options = ConnectOptions::new()
            .with_connect_timeout(Duration::from_millis(200))
            .with_timeout(Duration::from_millis(500));
        if let Some(tls) = tls {
            options = options.with_tls(tls);
        }
        loop {
            if let Some(status) = self.child.try_wait().context("polling etcd")? {
                let log = std::fs::read_to_string(log_path).unwrap_or_default();
                if log.contains("address already in use") {
                    return Err(Start::PortTaken(log));
                }
                return Err(Start::Failed(anyhow::anyhow!(
                    "etcd exited with {status} before becoming healthy; its log:\n{log}"
                )));
            }
            let client = Client::connect([&self.client_url], Some(options.clone())).await;
            if let Ok(mut client) = client
                && client.get("health", None).await.is_ok()
            {
                return Ok(());
            }
            if Instant::now() >= deadline {
                let log = std::fs::read_to_string(log_path).unwrap_or_default();
                return Err(Start::Failed(anyhow::anyhow!(
                    "etcd at {} not healthy within {START_TIMEOUT:?}; its log:\n{log}",
                    self.client_url
                )));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
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

impl Drop for EtcdServer {
    fn drop(&mut self) {
        // SIGKILL: nothing in a test's etcd needs a clean shutdown, and
        // waiting for the exit frees the ports before the next start.
        let _ = self.child.kill();
        let _ = self.child.wait();
        // `dir` is removed when the field drops, after etcd has exited.
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

/// A loopback port that was free a moment ago.
fn free_port() -> anyhow::Result<u16> {
    let listener = TcpListener::bind("127.0.0.1:0").context("binding a probe port")?;
    Ok(listener
        .local_addr()
        .context("reading the probe port")?
        .port())
}
