//! Running the `weft-proxy` binary.
//!
//! [`TempDir`] is a per-test scratch directory (bootstrap, policy files, the
//! bound-address file, logs), removed on drop. [`Proxy`] is the guard around one
//! running `weft-proxy run`: it is only handed out once the proxy wrote its
//! bound-address file and answered `GET /ready` with 200, and dropping it kills
//! and reaps the process, also when the test panics. The proxy's stderr goes to
//! a file in the temp dir; the guard prints that log when it drops, where
//! libtest and nextest capture it and show it only for failing tests.
//!
//! The binary is `$WEFT_PROXY_BIN`, else `weft-proxy` in the target directory
//! the test executable was built into (`target/<profile>/weft-proxy`), which
//! `cargo build -p weft-proxy` with the same `CARGO_TARGET_DIR` puts there.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::fs::{self, File};
use std::io::Read as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context as _, anyhow, bail};
use tokio::time::Instant;

use crate::admin::Admin;

/// How long a proxy may take from spawn to "bound and ready".
const START_TIMEOUT: Duration = Duration::from_secs(15);
/// How long a `weft-proxy check` may run.
const CHECK_TIMEOUT: Duration = Duration::from_secs(15);
/// At most this much of the log is printed when the guard drops.
const LOG_PRINT_LIMIT: usize = 64 * 1024;

/// Path of the `weft-proxy` binary under test.
pub fn proxy_bin() -> anyhow::Result<PathBuf> {
    if let Some(bin) = std::env::var_os("WEFT_PROXY_BIN") {
        return Ok(PathBuf::from(bin));
    }
    // Test executables live in target/<profile>/deps/; binaries one level
    // up, next to the harness's own binaries (weft-chaos).
    let exe = std::env::current_exe().context("locating the test executable")?;
    let dir = exe
        .parent()
        .ok_or_else(|| anyhow!("no directory above {}", exe.display()))?;
    let bin = match dir.parent() {
        Some(up) if !dir.join("weft-proxy").exists() => up.join("weft-proxy"),
        _ => dir.join("weft-proxy"),
    };
    if !bin.exists() {
        bail!(
            "{} does not exist: run `cargo build -p weft-proxy` with the same \
             CARGO_TARGET_DIR, or set WEFT_PROXY_BIN",
            bin.display()
        );
    }
    Ok(bin)
}

/// A scratch directory for one test, removed (with its contents) on drop.
#[derive(Debug)]
pub struct TempDir {
    path: PathBuf,
}

impl TempDir {
    /// Creates a fresh, uniquely named directory under the system temp dir.
    pub fn new() -> anyhow::Result<Self> {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let name = format!(
            "weft-test-{}-{}-{nanos}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        );
        let path = std::env::temp_dir().join(name);
        fs::create_dir_all(&path).with_context(|| format!("creating {}", path.display()))?;
        Ok(Self { path })
    }

    /// The directory's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Writes `contents` to `name` inside the directory, atomically (write to a
    /// sibling, then rename), so a process reading it never sees half a file.
    pub fn write(&self, name: &str, contents: &str) -> anyhow::Result<PathBuf> {
        let path = self.path.join(name);
        let staging = self.path.join(format!(".{name}.tmp"));
        fs::write(&staging, contents).with_context(|| format!("writing {}", staging.display()))?;
        fs::rename(&staging, &path).with_context(|| format!("renaming to {}", path.display()))?;
        Ok(path)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.path);
    }
}

/// The signals a test sends to the proxy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    Term,
    Int,
    Hup,
    Kill,
}

impl Signal {
    fn flag(self) -> &'static str {
        match self {
            Signal::Term => "-TERM",
            Signal::Int => "-INT",
            Signal::Hup => "-HUP",
            Signal::Kill => "-KILL",
        }
    }
}

/// Addresses the proxy reports in its `--bound-file`.
#[derive(Debug, Clone, Copy)]
pub struct Bound {
    pub outbound: SocketAddr,
    pub inbound: SocketAddr,
    pub admin: SocketAddr,
}

impl Bound {
    fn parse(text: &str) -> anyhow::Result<Self> {
        let json: serde_json::Value =
            serde_json::from_str(text).context("bound file is not JSON")?;
        let addr = |key: &str| -> anyhow::Result<SocketAddr> {
            json.get(key)
                .and_then(|v| v.as_str())
                .ok_or_else(|| anyhow!("bound file has no string {key:?}: {text}"))?
                .parse()
                .with_context(|| format!("bound file {key:?} is not a socket address: {text}"))
        };
        Ok(Self {
            outbound: addr("outbound")?,
            inbound: addr("inbound")?,
            admin: addr("admin")?,
        })
    }
}

/// Builds a proxy run: the bootstrap text plus any side files (policies).
#[derive(Debug)]
pub struct ProxyBuilder {
    bootstrap: String,
    files: Vec<(String, String)>,
    log_filter: String,
    extra_args: Vec<String>,
}

impl ProxyBuilder {
    /// Also writes `name` (relative to the bootstrap file) before starting.
    pub fn file(mut self, name: &str, contents: impl Into<String>) -> Self {
        self.files.push((name.to_owned(), contents.into()));
        self
    }

    /// Overrides `WEFT_LOG` (default: `$WEFT_TEST_LOG` or `info`).
    pub fn log_filter(mut self, filter: &str) -> Self {
        self.log_filter = filter.to_owned();
        self
    }

    /// Appends arguments after `run --config FILE --bound-file FILE`.
    pub fn arg(mut self, arg: &str) -> Self {
        self.extra_args.push(arg.to_owned());
        self
    }

    /// Spawns the proxy without waiting for it (for runs expected to fail).
    pub fn spawn(self) -> anyhow::Result<Proxy> {
        let dir = TempDir::new()?;
        for (name, contents) in &self.files {
            dir.write(name, contents)?;
        }
        let config_path = dir.write("weft.toml", &self.bootstrap)?;
        let bound_path = dir.path().join("bound.json");
        let log_path = dir.path().join("proxy.stderr.log");
        let stdout_path = dir.path().join("proxy.stdout.log");
        let bin = proxy_bin()?;
        let mut command = Command::new(&bin);
        command
            .arg("run")
            .arg("--config")
            .arg(&config_path)
            .arg("--bound-file")
            .arg(&bound_path)
            .args(&self.extra_args)
            .env("WEFT_LOG", &self.log_filter)
            .current_dir(dir.path())
            .stdin(Stdio::null())
            .stdout(File::create(&stdout_path)?)
            .stderr(File::create(&log_path)?);
        let child = command
            .spawn()
            .with_context(|| format!("spawning {}", bin.display()))?;
        Ok(Proxy {
            child: Mutex::new(child),
            dir,
            config_path,
            bound_path,
            log_path,
            bound: None,
        })
    }

    /// Spawns the proxy and waits until it is bound and `/ready` says 200.
    pub async fn start(self) -> anyhow::Result<Proxy> {
        let deadline = Instant::now() + START_TIMEOUT;
        let proxy = self.start_bound().await?;
        let admin = proxy.admin_client();
        let ready = crate::eventually(deadline.saturating_duration_since(Instant::now()), || {
            let admin = admin.clone();
            let exited = proxy.try_status();
            async move {
                if let Ok(Some(status)) = exited {
                    return Err(anyhow!("weft-proxy exited with {status}"));
                }
                let status = admin.ready_status().await?;
                if status != 200 {
                    bail!("/ready answered {status}");
                }
                Ok(())
            }
        })
        .await;
        if let Err(error) = ready {
            bail!(
                "weft-proxy never became ready: {error:#}; log:\n{}",
                proxy.logs()
            );
        }
        Ok(proxy)
    }

    /// Spawns the proxy and waits until its listeners are bound, whether or
    /// not it is ready (e.g. a sidecar still waiting for its app).
    pub async fn start_bound(self) -> anyhow::Result<Proxy> {
        let mut proxy = self.spawn()?;
        let deadline = Instant::now() + START_TIMEOUT;
        let bound = loop {
            if let Some(status) = proxy.try_status()? {
                bail!(
                    "weft-proxy exited with {status} before binding; log:\n{}",
                    proxy.logs()
                );
            }
            if let Ok(text) = fs::read_to_string(&proxy.bound_path)
                && let Ok(bound) = Bound::parse(&text)
            {
                break bound;
            }
            if Instant::now() >= deadline {
                bail!(
                    "weft-proxy wrote no bound file within {START_TIMEOUT:?}; log:\n{}",
                    proxy.logs()
                );
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        };
        proxy.bound = Some(bound);
        Ok(proxy)
    }
}

/// A running `weft-proxy run`; killed and reaped on drop.
#[derive(Debug)]
pub struct Proxy {
    child: Mutex<Child>,
    // Declared after `child` so the process is gone before its files are.
    dir: TempDir,
    config_path: PathBuf,
    bound_path: PathBuf,
    log_path: PathBuf,
    bound: Option<Bound>,
}

impl Proxy {
    /// Starts building a proxy run from the bootstrap file's text.
    pub fn builder(bootstrap: impl Into<String>) -> ProxyBuilder {
        ProxyBuilder {
            bootstrap: bootstrap.into(),
            files: Vec::new(),
            log_filter: std::env::var("WEFT_TEST_LOG").unwrap_or_else(|_| "info".to_owned()),
            extra_args: Vec::new(),
        }
    }

    /// Starts a proxy from a bootstrap with no side files and waits until ready.
    pub async fn start(bootstrap: impl Into<String>) -> anyhow::Result<Proxy> {
        Self::builder(bootstrap).start().await
    }

    fn bound(&self) -> Bound {
        self.bound
            .expect("the proxy was spawned without waiting for its bound file")
    }

    /// The outbound listener (where the local app sends its calls).
    pub fn outbound(&self) -> SocketAddr {
        self.bound().outbound
    }

    /// The inbound listener (in front of the local app).
    pub fn inbound(&self) -> SocketAddr {
        self.bound().inbound
    }

    /// The admin listener.
    pub fn admin(&self) -> SocketAddr {
        self.bound().admin
    }

    /// A client for the admin listener.
    pub fn admin_client(&self) -> Admin {
        Admin::new(self.admin())
    }

    /// The scratch directory holding the bootstrap file.
    pub fn dir(&self) -> &TempDir {
        &self.dir
    }

    /// The bootstrap file the proxy was started with (and re-reads on reload).
    pub fn config_path(&self) -> &Path {
        &self.config_path
    }

    /// Replaces the bootstrap file atomically (the proxy reads it on reload).
    pub fn write_config(&self, bootstrap: &str) -> anyhow::Result<()> {
        self.dir.write("weft.toml", bootstrap).map(|_| ())
    }

    /// The proxy's process id.
    pub fn pid(&self) -> u32 {
        self.child.lock().unwrap().id()
    }

    /// Sends `signal` with kill(1), so the harness needs no unsafe code.
    pub fn signal(&self, signal: Signal) -> anyhow::Result<()> {
        let status = Command::new("kill")
            .arg(signal.flag())
            .arg(self.pid().to_string())
            .status()
            .context("running kill")?;
        if !status.success() {
            bail!("kill {} {} failed: {status}", signal.flag(), self.pid());
        }
        Ok(())
    }

    /// The exit status if the process has exited, without blocking.
    pub fn try_status(&self) -> anyhow::Result<Option<ExitStatus>> {
        Ok(self.child.lock().unwrap().try_wait()?)
    }

    /// Waits for the process to exit, failing after `timeout`.
    pub async fn wait_exit(&self, timeout: Duration) -> anyhow::Result<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.try_status()? {
                return Ok(status);
            }
            if Instant::now() >= deadline {
                bail!("weft-proxy did not exit within {timeout:?}");
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Everything the proxy logged to stderr so far.
    pub fn logs(&self) -> String {
        let mut text = String::new();
        if let Ok(mut file) = File::open(&self.log_path) {
            let _ = file.read_to_string(&mut text);
        }
        text
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        if let Ok(child) = self.child.get_mut() {
            if let Ok(None) = child.try_wait() {
                let _ = child.kill();
            }
            let _ = child.wait();
        }
        let logs = self.logs();
        let start = logs.len().saturating_sub(LOG_PRINT_LIMIT);
        let start = (start..logs.len())
            .find(|i| logs.is_char_boundary(*i))
            .unwrap_or(logs.len());
        let panicking = if std::thread::panicking() {
            " (test panicked)"
        } else {
            ""
        };
        eprintln!(
            "----- weft-proxy stderr ({}){panicking} -----\n{}\n----- end of weft-proxy stderr -----",
            self.log_path.display(),
            &logs[start..]
        );
    }
}

/// What a finished `weft-proxy` command printed and how it exited.
#[derive(Debug)]
pub struct Output {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

/// Runs `weft-proxy ARGS` in `dir` to completion (bounded) and collects its output.
pub async fn run_command(dir: &Path, args: &[&str]) -> anyhow::Result<Output> {
    let bin = proxy_bin()?;
    let child = tokio::process::Command::new(&bin)
        .args(args)
        .current_dir(dir)
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output();
    let output = crate::within(CHECK_TIMEOUT, "weft-proxy command", child)
        .await?
        .with_context(|| format!("running {} {args:?}", bin.display()))?;
    Ok(Output {
        status: output.status,
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn temp_dirs_are_unique_and_removed_on_drop() {
        let a = TempDir::new().unwrap();
        let b = TempDir::new().unwrap();
        assert_ne!(a.path(), b.path());
        let file = a.write("x.toml", "k = 1").unwrap();
        assert_eq!(fs::read_to_string(&file).unwrap(), "k = 1");
        let path = a.path().to_owned();
        drop(a);
        assert!(!path.exists());
    }

    #[test]
    fn bound_file_parses() {
        let bound = Bound::parse(
            r#"{"outbound":"127.0.0.1:1","inbound":"127.0.0.1:2","admin":"127.0.0.1:3"}"#,
        )
        .unwrap();
        assert_eq!(bound.admin.port(), 3);
        assert!(Bound::parse(r#"{"outbound":"127.0.0.1:1"}"#).is_err());
    }
}
