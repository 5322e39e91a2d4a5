//! Running the real `weftctl` binary, with nothing taken from the
//! environment, and what it printed and its exit code.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::Write;
use std::path::Path;
use std::process::{Command, Output, Stdio};

/// What one run of `weftctl` printed, and its exit code.
#[derive(Debug)]
pub struct Run {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    pub fn all(&self) -> String {
        format!("{}{}", self.stdout, self.stderr)
    }

    /// stdout as JSON (panics with the output if it is not).
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.all()))
    }
}

impl From<Output> for Run {
    fn from(out: Output) -> Self {
        Self {
            code: out.status.code().expect("weftctl was killed"),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }
}

/// `weftctl [--control-plane URL] [--token-file FILE]`, with neither taken
/// from the environment.
pub fn weftctl(url: Option<&str>, token: Option<&Path>) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_weftctl"));
    if let Some(url) = url {
        cmd.arg("--control-plane").arg(url);
    }
    if let Some(t) = token {
        cmd.arg("--token-file").arg(t);
    }
    cmd.env_remove("WEFT_TOKEN_FILE")
        .env_remove("WEFT_CONTROL_PLANE")
        .env_remove("WEFT_CA_FILE")
        .stdin(Stdio::null());
    cmd
}

/// `weftctl --control-plane URL [--token-file FILE] ARGS`.
pub fn run(url: &str, token: Option<&Path>, args: &[&str]) -> Run {
    weftctl(Some(url), token)
        .args(args)
        .output()
        .unwrap()
        .into()
}

/// `weftctl ARGS`, without `--control-plane` (nor the environment's).
pub fn run_offline(args: &[&str]) -> Run {
    weftctl(None, None).args(args).output().unwrap().into()
}

/// `weftctl --control-plane URL [--token-file FILE] ARGS` with `stdin` on its
/// standard input.
pub fn run_with_stdin(url: &str, token: Option<&Path>, args: &[&str], stdin: &str) -> Run {
    with_stdin(weftctl(Some(url), token), args, stdin)
}

/// `weftctl ARGS`, without `--control-plane`, with `stdin` on its standard input.
pub fn run_offline_with_stdin(args: &[&str], stdin: &str) -> Run {
    with_stdin(weftctl(None, None), args, stdin)
}

fn with_stdin(mut weftctl: Command, args: &[&str], stdin: &str) -> Run {
    let mut child = weftctl
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut input = child.stdin.take().unwrap();
    input.write_all(stdin.as_bytes()).unwrap();
    drop(input);
    child.wait_with_output().unwrap().into()
}
