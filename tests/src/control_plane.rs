//! Running `weft-control-plane` and `weftctl`.
//!
//! [`ControlPlane`] is the guard around one `weft-control-plane` process, on
//! the embedded store (`--dev`) or on etcd, with loopback listeners on ports
//! chosen at run time, an admin token file, and a `--bound-file` it waits for
//! before handing the guard out. Dropping the guard kills and reaps the
//! process, also when the test panics, and prints its log (which libtest and
//! nextest show for failing tests only).
//!
//! [`ControlPlane::kill`] and [`ControlPlane::restart`] take it away and bring
//! it back on the same listen and admin addresses (the sidecars' bootstrap
//! files name the gRPC address). [`ControlPlane::weftctl`] runs the real
//! `weftctl` against its admin API with its token, bounded in time.
//!
//! Starting is available both async ([`ControlPlaneBuilder::start`]) and
//! blocking ([`ControlPlaneBuilder::start_blocking`], for plain `#[test]`s);
//! so is `weftctl`.
//!
//! The binaries are `$WEFT_CONTROL_PLANE_BIN` and `$WEFTCTL_BIN`, else
//! `weft-control-plane` and `weftctl` in the target directory the test
//! executable was built into, where `cargo build -p weft-control-plane`
//! (same `CARGO_TARGET_DIR`) puts them.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::fs::{self, File};
use std::io::Read as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, anyhow, bail};

use crate::process::{Signal, TempDir};

/// The admin token every harness control plane accepts (in its token file).
pub const TOKEN: &str = "test-token-0123456789abcdef";
/// How long a control plane may take from spawn to "bound".
const START_TIMEOUT: Duration = Duration::from_secs(15);
/// How long one `weftctl` command may run.
pub const WEFTCTL_TIMEOUT: Duration = Duration::from_secs(30);
/// At most this much of the log is printed when the guard drops.
const LOG_PRINT_LIMIT: usize = 64 * 1024;

/// Path of a binary next to the test executable's target directory (or `$env`).
pub fn sibling_bin(env: &str, name: &str) -> anyhow::Result<PathBuf> {
    if let Some(bin) = std::env::var_os(env) {
        return Ok(PathBuf::from(bin));
    }
    // Test executables live in target/<profile>/deps/; binaries one level
    // up, next to the harness's own binaries (weft-chaos).
    let exe = std::env::current_exe().context("locating the test executable")?;
    let dir = exe
        .parent()
        .ok_or_else(|| anyhow!("no directory above {}", exe.display()))?;
    let bin = match dir.parent() {
        Some(up) if !dir.join(name).exists() => up.join(name),
        _ => dir.join(name),
    };
    if !bin.exists() {
        bail!(
            "{} does not exist: run `cargo build -p weft-control-plane --bins` with the same \
             CARGO_TARGET_DIR, or set {env}",
            bin.display()
        );
    }
    Ok(bin)
}

/// The `weft-control-plane` binary under test.
pub fn control_plane_bin() -> anyhow::Result<PathBuf> {
    sibling_bin("WEFT_CONTROL_PLANE_BIN", "weft-control-plane")
}

/// The `weftctl` binary under test.
pub fn weftctl_bin() -> anyhow::Result<PathBuf> {
    sibling_bin("WEFTCTL_BIN", "weftctl")
}

/// Where the control plane keeps its state.
#[derive(Debug, Clone)]
enum Store {
    Dev,
    Etcd(String),
}

/// Builds a control-plane run.
#[derive(Debug, Clone)]
pub struct ControlPlaneBuilder {
    store: Store,
    listen: SocketAddr,
    admin: SocketAddr,
    token: bool,
    lease_ttl: Option<String>,
    log_filter: String,
    extra_args: Vec<String>,
}

impl ControlPlaneBuilder {
    /// `--lease-ttl` (default: the binary's own, 10 s).
    pub fn lease_ttl(mut self, ttl: &str) -> Self {
        self.lease_ttl = Some(ttl.to_owned());
        self
    }

    /// The gRPC listener (default `127.0.0.1:0`).
    pub fn listen(mut self, addr: SocketAddr) -> Self {
        self.listen = addr;
        self
    }

    /// The admin listener (default `127.0.0.1:0`).
    pub fn admin(mut self, addr: SocketAddr) -> Self {
        self.admin = addr;
        self
    }

    /// Runs without `--token-file` (only allowed with `--dev`).
    pub fn without_token(mut self) -> Self {
        self.token = false;
        self
    }

    /// Overrides `WEFT_LOG` (default: `$WEFT_TEST_LOG` or `info`).
    pub fn log_filter(mut self, filter: &str) -> Self {
        self.log_filter = filter.to_owned();
        self
    }

    /// Appends an argument.
    pub fn arg(mut self, arg: &str) -> Self {
        self.extra_args.push(arg.to_owned());
        self
    }

    fn args(&self, listen: SocketAddr, admin: SocketAddr) -> Vec<String> {
        let mut args = match &self.store {
            Store::Dev => vec!["--dev".to_owned()],
            Store::Etcd(urls) => vec!["--etcd".to_owned(), urls.clone()],
        };
        args.extend([
            "--listen".to_owned(),
            listen.to_string(),
            "--admin".to_owned(),
            admin.to_string(),
        ]);
        if let Some(ttl) = &self.lease_ttl {
            args.extend(["--lease-ttl".to_owned(), ttl.clone()]);
        }
        args.extend(self.extra_args.iter().cloned());
        args
    }

    /// Spawns the control plane without waiting for it (for runs expected to fail).
    pub fn spawn(self) -> anyhow::Result<ControlPlane> {
        let dir = TempDir::new()?;
        let token_file = dir.write("tokens", &format!("# admin tokens\n{TOKEN}\n"))?;
        let mut cp = ControlPlane {
            child: Mutex::new(None),
            grpc: self.listen,
            admin: self.admin,
            token_file,
            bound_path: dir.path().join("bound.json"),
            log_path: dir.path().join("control-plane.log"),
            runs: 0,
            builder: self,
            dir,
        };
        cp.spawn_process(cp.builder.listen, cp.builder.admin)?;
        Ok(cp)
    }

    /// Spawns the control plane and waits (polling, without blocking the
    /// runtime) until it wrote its bound-address file.
    pub async fn start(self) -> anyhow::Result<ControlPlane> {
        let mut cp = self.spawn()?;
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if cp.poll_bound()? {
                return Ok(cp);
            }
            cp.check_start_deadline(deadline)?;
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Like [`ControlPlaneBuilder::start`], blocking the thread (for tests
    /// without a runtime).
    pub fn start_blocking(self) -> anyhow::Result<ControlPlane> {
        let mut cp = self.spawn()?;
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if cp.poll_bound()? {
                return Ok(cp);
            }
            cp.check_start_deadline(deadline)?;
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

/// A running `weft-control-plane`; killed and reaped on drop.
#[derive(Debug)]
pub struct ControlPlane {
    child: Mutex<Option<Child>>,
    grpc: SocketAddr,
    admin: SocketAddr,
    token_file: PathBuf,
    bound_path: PathBuf,
    log_path: PathBuf,
    /// How many processes this guard started (restarts included).
    runs: u32,
    builder: ControlPlaneBuilder,
    // Declared last so the process is gone before its files are.
    dir: TempDir,
}

impl ControlPlane {
    fn builder(store: Store) -> ControlPlaneBuilder {
        ControlPlaneBuilder {
            store,
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            admin: SocketAddr::from(([127, 0, 0, 1], 0)),
            token: true,
            lease_ttl: None,
            log_filter: std::env::var("WEFT_TEST_LOG").unwrap_or_else(|_| "info".to_owned()),
            extra_args: Vec::new(),
        }
    }

    /// A control plane on the embedded in-memory store (`--dev`).
    pub fn dev() -> ControlPlaneBuilder {
        Self::builder(Store::Dev)
    }

    /// A control plane on etcd at `urls` (comma-separated client URLs).
    pub fn etcd(urls: impl Into<String>) -> ControlPlaneBuilder {
        Self::builder(Store::Etcd(urls.into()))
    }

    fn spawn_process(&mut self, listen: SocketAddr, admin: SocketAddr) -> anyhow::Result<()> {
        let _ = fs::remove_file(&self.bound_path);
        let bin = control_plane_bin()?;
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_path)
            .context("opening the control plane's log")?;
        self.runs += 1;
        let mut command = Command::new(&bin);
        command
            .args(self.builder.args(listen, admin))
            .env("WEFT_LOG", &self.builder.log_filter)
            .env_remove("WEFT_LOG_FORMAT")
            .current_dir(self.dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        if self.builder.token {
            command.arg("--token-file").arg(&self.token_file);
        }
        command.arg("--bound-file").arg(&self.bound_path);
        let child = command
            .spawn()
            .with_context(|| format!("spawning {}", bin.display()))?;
        *self.child.lock().unwrap() = Some(child);
        Ok(())
    }

    /// Reads the bound file if it is there; fails if the process exited.
    fn poll_bound(&mut self) -> anyhow::Result<bool> {
        if let Ok(text) = fs::read_to_string(&self.bound_path)
            && let Ok(json) = serde_json::from_str::<serde_json::Value>(&text)
        {
            let addr = |key: &str| -> anyhow::Result<SocketAddr> {
                json[key]
                    .as_str()
                    .ok_or_else(|| anyhow!("bound file has no {key:?}: {text}"))?
                    .parse()
                    .with_context(|| format!("bound file {key:?}: {text}"))
            };
            self.grpc = addr("listen")?;
            self.admin = addr("admin")?;
            return Ok(true);
        }
        if let Some(status) = self.try_status()? {
            bail!(
                "weft-control-plane exited with {status} before binding; log:\n{}",
                self.logs()
            );
        }
        Ok(false)
    }

    fn check_start_deadline(&self, deadline: Instant) -> anyhow::Result<()> {
        if Instant::now() >= deadline {
            bail!(
                "weft-control-plane wrote no bound file within {START_TIMEOUT:?}; log:\n{}",
                self.logs()
            );
        }
        Ok(())
    }

    /// The sidecar-facing gRPC address.
    pub fn grpc(&self) -> SocketAddr {
        self.grpc
    }

    /// `http://ADDR` of the gRPC API, as a sidecar's `[control_plane] addresses` names it.
    pub fn grpc_url(&self) -> String {
        format!("http://{}", self.grpc)
    }

    /// The admin listener's address.
    pub fn admin(&self) -> SocketAddr {
        self.admin
    }

    /// `http://ADDR` of the admin API, as `weftctl --control-plane` takes it.
    pub fn admin_url(&self) -> String {
        format!("http://{}", self.admin)
    }

    /// The token file (one line: [`TOKEN`]).
    pub fn token_file(&self) -> &Path {
        &self.token_file
    }

    /// The scratch directory (token file, log, anything a test writes).
    pub fn dir(&self) -> &TempDir {
        &self.dir
    }

    /// The process id of the running process.
    pub fn pid(&self) -> anyhow::Result<u32> {
        self.child
            .lock()
            .unwrap()
            .as_ref()
            .map(Child::id)
            .ok_or_else(|| anyhow!("the control plane is not running"))
    }

    /// The exit status if the process has exited, without blocking.
    pub fn try_status(&self) -> anyhow::Result<Option<ExitStatus>> {
        match self.child.lock().unwrap().as_mut() {
            Some(child) => Ok(child.try_wait()?),
            None => bail!("the control plane was killed"),
        }
    }

    /// True while the process has not exited.
    pub fn is_running(&self) -> bool {
        matches!(self.try_status(), Ok(None))
    }

    /// Sends `signal` with kill(1).
    pub fn signal(&self, signal: Signal) -> anyhow::Result<()> {
        let pid = self.pid()?;
        let flag = match signal {
            Signal::Term => "-TERM",
            Signal::Int => "-INT",
            Signal::Hup => "-HUP",
            Signal::Kill => "-KILL",
        };
        let status = Command::new("kill")
            .arg(flag)
            .arg(pid.to_string())
            .status()
            .context("running kill")?;
        if !status.success() {
            bail!("kill {flag} {pid} failed: {status}");
        }
        Ok(())
    }

    /// Kills the process (SIGKILL: a crash) and reaps it.
    pub fn kill(&mut self) -> anyhow::Result<()> {
        if let Some(mut child) = self.child.lock().unwrap().take() {
            if let Ok(None) = child.try_wait() {
                child.kill().context("killing weft-control-plane")?;
            }
            child.wait().context("reaping weft-control-plane")?;
        }
        Ok(())
    }

    /// Kills the process if it still runs and starts it again on the same
    /// gRPC address (and the same store; the admin address may change),
    /// waiting until it is bound. With `--dev`, the new process starts from an empty store.
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        self.kill()?;
        // Sidecars know the gRPC address, so it must stay; the admin listener
        // takes a fresh port (another test may have taken the old one since).
        let listen = self.grpc;
        self.spawn_process(listen, SocketAddr::from(([127, 0, 0, 1], 0)))?;
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if self.poll_bound()? {
                anyhow::ensure!(
                    self.grpc == listen,
                    "the restarted control plane bound {}, not {listen}",
                    self.grpc
                );
                return Ok(());
            }
            self.check_start_deadline(deadline)?;
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// The status of `GET path` on the admin API (no token).
    pub async fn admin_status(&self, path: &str) -> anyhow::Result<u16> {
        let reply = crate::client::Client::host_header(self.admin)
            .get(&format!("http://{}{path}", self.admin))
            .await?;
        Ok(reply.status.as_u16())
    }

    /// Runs `weftctl --control-plane URL --token-file FILE ARGS` (nothing
    /// taken from the environment), bounded by [`WEFTCTL_TIMEOUT`].
    pub async fn weftctl(&self, args: &[&str]) -> anyhow::Result<CtlOutput> {
        let mut command = tokio::process::Command::from(self.weftctl_command(args)?);
        command.kill_on_drop(true);
        let output = crate::within(WEFTCTL_TIMEOUT, "weftctl", command.output())
            .await?
            .with_context(|| format!("running weftctl {args:?}"))?;
        Ok(CtlOutput::new(args, output))
    }

    /// Like [`ControlPlane::weftctl`], blocking the thread.
    pub fn weftctl_blocking(&self, args: &[&str]) -> anyhow::Result<CtlOutput> {
        run_blocking(self.weftctl_command(args)?, args, self.dir.path())
    }

    /// Runs `weftctl ARGS` and fails unless it exits 0; returns its stdout.
    pub async fn weftctl_ok(&self, args: &[&str]) -> anyhow::Result<String> {
        let out = self.weftctl(args).await?;
        out.ok()?;
        Ok(out.stdout)
    }

    fn weftctl_command(&self, args: &[&str]) -> anyhow::Result<Command> {
        let mut command = weftctl_command(&self.admin_url(), Some(&self.token_file))?;
        command.args(args);
        Ok(command)
    }

    /// Everything the control plane logged so far (every run of this guard).
    pub fn logs(&self) -> String {
        let mut text = String::new();
        if let Ok(mut file) = File::open(&self.log_path) {
            let _ = file.read_to_string(&mut text);
        }
        text
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        let _ = self.kill();
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
            "----- weft-control-plane stderr ({}, {} run(s)){panicking} -----\n{}\n----- end of weft-control-plane stderr -----",
            self.log_path.display(),
            self.runs,
            &logs[start..]
        );
    }
}

/// `weftctl --control-plane URL [--token-file FILE]` with nothing taken from
/// the environment; the caller appends the command's arguments.
pub fn weftctl_command(admin_url: &str, token_file: Option<&Path>) -> anyhow::Result<Command> {
    let mut command = Command::new(weftctl_bin()?);
    command.arg("--control-plane").arg(admin_url);
    if let Some(token) = token_file {
        command.arg("--token-file").arg(token);
    }
    command
        .env_remove("WEFT_TOKEN_FILE")
        .env_remove("WEFT_CONTROL_PLANE")
        .env_remove("WEFT_CA_FILE")
        .stdin(Stdio::null());
    Ok(command)
}

/// Runs `command` to completion, bounded by [`WEFTCTL_TIMEOUT`] (killed
/// after it), with its output in files under `dir` so a chatty command
/// cannot fill a pipe while the thread waits.
pub fn run_blocking(mut command: Command, args: &[&str], dir: &Path) -> anyhow::Result<CtlOutput> {
    static RUN: AtomicU64 = AtomicU64::new(0);
    let run = RUN.fetch_add(1, Ordering::Relaxed);
    let out_path = dir.join(format!(".cmd-{run}.stdout"));
    let err_path = dir.join(format!(".cmd-{run}.stderr"));
    let mut child = command
        .stdout(File::create(&out_path)?)
        .stderr(File::create(&err_path)?)
        .spawn()
        .with_context(|| format!("spawning {command:?}"))?;
    let deadline = Instant::now() + WEFTCTL_TIMEOUT;
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!("{command:?} did not finish within {WEFTCTL_TIMEOUT:?}");
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    let read = |path: &Path| {
        let text = fs::read(path)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default();
        let _ = fs::remove_file(path);
        text
    };
    Ok(CtlOutput {
        args: args.iter().map(|a| (*a).to_owned()).collect(),
        status,
        stdout: read(&out_path),
        stderr: read(&err_path),
    })
}

/// What a finished `weftctl` printed and how it exited.
#[derive(Debug, Clone)]
pub struct CtlOutput {
    pub args: Vec<String>,
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl CtlOutput {
    fn new(args: &[&str], output: std::process::Output) -> Self {
        Self {
            args: args.iter().map(|a| (*a).to_owned()).collect(),
            status: output.status,
            stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        }
    }

    /// The exit code (-1 if killed by a signal).
    pub fn code(&self) -> i32 {
        self.status.code().unwrap_or(-1)
    }

    /// stdout then stderr.
    pub fn all(&self) -> String {
        format!("{}{}", self.stdout, self.stderr)
    }

    /// Fails (with everything printed) unless the command exited 0.
    pub fn ok(&self) -> anyhow::Result<&Self> {
        if !self.status.success() {
            bail!(
                "weftctl {:?} exited with {}: {}",
                self.args,
                self.status,
                self.all()
            );
        }
        Ok(self)
    }
}
