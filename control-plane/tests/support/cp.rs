//! A `weft-control-plane` process for black-box tests: started on loopback
//! ports chosen by the OS, with a token file, stopped (and its files removed) on
//! drop, also when a test panics.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

pub const TOKEN: &str = "test-token-0123456789abcdef";

pub struct ControlPlane {
    pub child: Child,
    /// `http://ADDR` of the admin API.
    pub admin: String,
    /// `http://ADDR` of the gRPC API.
    pub grpc: String,
    pub dir: PathBuf,
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

static NEXT: AtomicU64 = AtomicU64::new(0);

pub fn temp_dir(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "weft-cp-{tag}-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

pub fn start(tag: &str, store_args: &[String]) -> ControlPlane {
    let dir = temp_dir(tag);
    std::fs::write(dir.join("tokens"), format!("# admin tokens\n{TOKEN}\n")).unwrap();
    let bound = dir.join("bound.json");
    let log = std::fs::File::create(dir.join("cp.log")).unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_weft-control-plane"))
        .args(store_args)
        .args([
            "--admin",
            "127.0.0.1:0",
            "--listen",
            "127.0.0.1:0",
            "--token-file",
        ])
        .arg(dir.join("tokens"))
        .arg("--bound-file")
        .arg(&bound)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    let mut cp = ControlPlane {
        child,
        admin: String::new(),
        grpc: String::new(),
        dir,
    };
    let deadline = Instant::now() + Duration::from_secs(15);
    while Instant::now() < deadline {
        if let Ok(text) = std::fs::read_to_string(&bound) {
            let v: serde_json::Value = serde_json::from_str(&text).unwrap();
            cp.admin = format!("http://{}", v["admin"].as_str().unwrap());
            cp.grpc = format!("http://{}", v["listen"].as_str().unwrap());
            return cp;
        }
        if let Ok(Some(status)) = cp.child.try_wait() {
            panic!(
                "weft-control-plane exited with {status}: {}",
                std::fs::read_to_string(cp.dir.join("cp.log")).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("weft-control-plane did not start");
}

impl ControlPlane {
    /// The status of `GET path` on the admin API (no token).
    pub async fn admin_status(&self, path: &str) -> anyhow::Result<u16> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let addr = self.admin.trim_start_matches("http://");
        let mut s = tokio::net::TcpStream::connect(addr).await?;
        let req = format!("GET {path} HTTP/1.1\r\nhost: cp\r\nconnection: close\r\n\r\n");
        s.write_all(req.as_bytes()).await?;
        let mut out = String::new();
        s.read_to_string(&mut out).await?;
        let status = out.split_whitespace().nth(1).unwrap_or_default();
        Ok(status.parse()?)
    }
}

impl ControlPlane {
    /// True while the process has not exited.
    pub fn child_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}
