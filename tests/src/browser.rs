//! Headless Chromium (Debian's `chromium`, installed by `scripts/setup`)
//! loading a page: its DOM after load (`--dump-dom`) or a screenshot.
//!
//! Each run has its own profile directory and its own process group, and is
//! bounded in time: past [`BROWSER_TIMEOUT`] the whole group (the browser
//! and its helper processes) is killed. Chromium missing is an error, not a
//! skip: the tests that use it must fail where it is not installed.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context as _, bail};
use tokio::process::Command;

use crate::process::TempDir;

/// How long one page load (and the browser's start) may take.
pub const BROWSER_TIMEOUT: Duration = Duration::from_secs(90);

/// The `chromium` binary: `$WEFT_CHROMIUM`, else `chromium` on the PATH.
pub fn chromium_bin() -> anyhow::Result<PathBuf> {
    if let Some(path) = std::env::var_os("WEFT_CHROMIUM") {
        let path = PathBuf::from(path);
        if !path.is_file() {
            bail!("WEFT_CHROMIUM={} is not a file", path.display());
        }
        return Ok(path);
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    for dir in std::env::split_paths(&path) {
        let candidate = dir.join("chromium");
        if candidate.is_file() {
            return Ok(candidate);
        }
    }
    bail!(
        "chromium not found on the PATH: run scripts/setup (it installs Debian's chromium package)"
    )
}

/// Runs `chromium --headless=new ... ARGS URL` and returns its standard
/// output.
async fn run(args: &[String], url: &str) -> anyhow::Result<String> {
    let bin = chromium_bin()?;
    let profile = TempDir::new()?;
    let mut command = Command::new(&bin);
    command
        .args([
            "--headless=new",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--no-first-run",
            "--no-default-browser-check",
            "--disable-extensions",
            "--hide-scrollbars",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .args(args)
        .arg(url)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true);
    let child = command
        .spawn()
        .with_context(|| format!("starting {}", bin.display()))?;
    // Kills the helpers too, however this ends (also when the caller drops
    // this future: `kill_on_drop` only kills the browser itself).
    let _group = Group(child.id());
    match tokio::time::timeout(BROWSER_TIMEOUT, child.wait_with_output()).await {
        Ok(output) => {
            let output = output.context("waiting for chromium")?;
            if !output.status.success() {
                bail!(
                    "chromium exited with {}: {}",
                    output.status,
                    String::from_utf8_lossy(&output.stderr)
                );
            }
            Ok(String::from_utf8_lossy(&output.stdout).into_owned())
        }
        Err(_) => bail!("chromium did not finish loading {url} within {BROWSER_TIMEOUT:?}"),
    }
}

/// The browser's process group (it leads it), killed when dropped with
/// kill(1), so the harness needs no unsafe code.
struct Group(Option<u32>);

impl Drop for Group {
    fn drop(&mut self) {
        if let Some(pid) = self.0 {
            let _ = std::process::Command::new("kill")
                .args(["-KILL", "--", &format!("-{pid}")])
                .stderr(Stdio::null())
                .status();
        }
    }
}

/// The page's DOM once loaded (scripts ran), as HTML.
pub async fn dump_dom(url: &str) -> anyhow::Result<String> {
    run(&["--dump-dom".to_owned()], url).await
}

/// The page's DOM after `virtual_ms` of the page's (virtual) time: its
/// timers have run (e.g. a periodic refresh).
pub async fn dump_dom_after(url: &str, virtual_ms: u32) -> anyhow::Result<String> {
    run(
        &[
            "--dump-dom".to_owned(),
            format!("--virtual-time-budget={virtual_ms}"),
        ],
        url,
    )
    .await
}

/// A PNG screenshot of the page at `width` x `height` CSS pixels, written
/// to `path`.
pub async fn screenshot(url: &str, path: &Path, width: u32, height: u32) -> anyhow::Result<()> {
    run(
        &[
            format!("--screenshot={}", path.display()),
            format!("--window-size={width},{height}"),
        ],
        url,
    )
    .await?;
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    if !bytes.starts_with(b"\x89PNG") {
        bail!("{} is not a PNG", path.display());
    }
    Ok(())
}
