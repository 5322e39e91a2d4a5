//! The app behind each chaos instance's sidecar, as a process of its own.
//!
//! The chaos run kills and pauses apps, so an app cannot live inside the
//! driver: each one is `weft-chaos app --id ID --listen ADDR`, which runs the
//! harness's [`Backend`] (every answer says `x-backend: ID`; `/slow?ms=N`
//! answers after N ms) until it is killed. [`AppProcess`] is the guard
//! around one: it is handed out once the app accepts connections, restarts
//! on the same address (the sidecar's `[service] app` names it), and kills
//! and reaps the process when dropped, also on panic.

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context as _, bail};
use tokio::time::Instant;

use crate::backend::Backend;

/// How long an app may take from spawn to accepting connections.
const START_TIMEOUT: Duration = Duration::from_secs(10);

/// What `weft-chaos app` runs: a [`Backend`] answering as `id` on `listen`,
/// until the process is killed.
pub async fn serve(id: &str, listen: SocketAddr) -> anyhow::Result<()> {
    let backend = Backend::builder(id).addr(listen).start().await?;
    println!("{}", backend.addr());
    std::future::pending::<()>().await;
    drop(backend);
    Ok(())
}

/// A running `weft-chaos app`; killed and reaped on drop.
#[derive(Debug)]
pub struct AppProcess {
    bin: PathBuf,
    id: String,
    addr: SocketAddr,
    child: Option<Child>,
}

impl AppProcess {
    /// Starts app `id` on a free loopback port (picked by binding port 0;
    /// retried if another process takes it first).
    pub async fn start(bin: &Path, id: &str) -> anyhow::Result<Self> {
        let mut last = None;
        for _ in 0..5 {
            let addr = TcpListener::bind("127.0.0.1:0")?.local_addr()?;
            let mut app = Self {
                bin: bin.to_owned(),
                id: id.to_owned(),
                addr,
                child: None,
            };
            match app.spawn().await {
                Ok(()) => return Ok(app),
                Err(error) => last = Some(error),
            }
        }
        Err(last.unwrap_or_else(|| anyhow::anyhow!("app {id} did not start")))
    }

    /// The address the app listens on (the same across restarts).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The process id while it runs.
    pub fn pid(&mut self) -> Option<u32> {
        let child = self.child.as_mut()?;
        matches!(child.try_wait(), Ok(None)).then(|| child.id())
    }

    /// Waits (bounded) until the process has exited and reaps it.
    pub async fn wait_exit(&mut self, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        while let Some(child) = self.child.as_mut() {
            if child.try_wait()?.is_some() {
                self.child = None;
                break;
            }
            if Instant::now() >= deadline {
                bail!("app {} did not exit within {timeout:?}", self.id);
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Ok(())
    }

    /// SIGKILLs the process (if it runs) and reaps it.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Kills the process if it still runs and starts it again on the same
    /// address, waiting until it accepts connections.
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        self.kill();
        self.spawn().await
    }

    async fn spawn(&mut self) -> anyhow::Result<()> {
        let child = Command::new(&self.bin)
            .args(["app", "--id", &self.id, "--listen", &self.addr.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("spawning {} app", self.bin.display()))?;
        self.child = Some(child);
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Some(child) = self.child.as_mut()
                && let Some(status) = child.try_wait()?
            {
                self.child = None;
                bail!("app {} exited with {status} at start", self.id);
            }
            if tokio::net::TcpStream::connect(self.addr).await.is_ok() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                self.kill();
                bail!(
                    "app {} not accepting on {} within {START_TIMEOUT:?}",
                    self.id,
                    self.addr
                );
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

impl Drop for AppProcess {
    fn drop(&mut self) {
        self.kill();
    }
}
