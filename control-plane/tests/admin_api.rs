//! Black-box tests of `weft-control-plane`'s admin API through `weftctl`, over
//! real loopback sockets: the control plane runs as a process (`--dev` and, in
//! one test, on a real etcd), and every call goes through the `weftctl` binary.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use support::start;
use weft_tests::control_plane::{ControlPlane, TOKEN};
use weft_tests::etcd::EtcdServer;

fn weftctl(cp: &ControlPlane, token: Option<&Path>, args: &[&str]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_weftctl"));
    cmd.arg("--control-plane").arg(cp.admin_url());
    if let Some(t) = token {
        cmd.arg("--token-file").arg(t);
    }
    cmd.env_remove("WEFT_TOKEN_FILE")
        .env_remove("WEFT_CONTROL_PLANE");
    cmd.args(args).output().unwrap()
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// Poll `weftctl args` until its output satisfies `ok` (the view follows the
/// store asynchronously).
fn eventually(cp: &ControlPlane, token: &Path, args: &[&str], ok: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let out = weftctl(cp, Some(token), args);
        let t = text(&out);
        if out.status.success() && ok(&t) {
            return t;
        }
        assert!(
            Instant::now() < deadline,
            "weftctl {args:?} never gave the expected output; last: {t}"
        );
        std::thread::sleep(Duration::from_millis(25));
    }
}

fn exercise(cp: &ControlPlane) {
    let token = cp.token_file().to_owned();
    let policy = cp.dir().path().join("billing.toml");
    std::fs::write(
        &policy,
        "service = \"billing\"\n\n[outbound]\nload_balancer = \"round-robin\"\n",
    )
    .unwrap();

    // Apply, then read back the policy, the service and its instances.
    let out = weftctl(
        cp,
        Some(&token),
        &["apply", "--create", "-f", policy.to_str().unwrap()],
    );
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("created"), "{}", text(&out));
    let out = weftctl(cp, Some(&token), &["get", "policy", "billing"]);
    assert!(text(&out).contains("round-robin"), "{}", text(&out));
    let got = eventually(cp, &token, &["get", "instances", "billing"], |_| true);
    assert_eq!(got.lines().count(), 1, "only the header: {got}");
    eventually(cp, &token, &["get", "services"], |t| {
        t.lines()
            .any(|l| l.starts_with("billing") && l.trim_end().ends_with("yes"))
    });

    // An invalid policy is refused with the file, line, column and key, and
    // nothing changes.
    let bad = cp.dir().path().join("bad.toml");
    std::fs::write(
        &bad,
        "service = \"billing\"\n\n[outbound]\nload_balancer = \"random\"\n",
    )
    .unwrap();
    let out = weftctl(
        cp,
        Some(&token),
        &["apply", "--create", "-f", bad.to_str().unwrap()],
    );
    assert!(!out.status.success());
    let t = text(&out);
    assert!(t.contains("bad.toml:4:17: outbound.load_balancer:"), "{t}");
    let out = weftctl(cp, Some(&token), &["get", "policy", "billing"]);
    assert!(text(&out).contains("round-robin"), "{}", text(&out));

    // The control plane validates on its own too: a raw PUT without weftctl's
    // local check gets the same located message, naming the file it was sent as.
    let rsp = raw_put(
        cp,
        "billing",
        "service = \"billing\"\nretries = 1\n",
        Some(TOKEN),
    );
    assert!(rsp.contains("400"), "{rsp}");
    assert!(rsp.contains("sent.toml:2:1: retries: unknown key"), "{rsp}");
    // A policy for another service under this name is refused.
    let rsp = raw_put(cp, "billing", "service = \"orders\"\n", Some(TOKEN));
    assert!(
        rsp.contains("400") && rsp.contains("not \\\"billing\\\""),
        "{rsp}"
    );

    // No token, or a wrong one: 401, nothing leaks.
    let wrong = cp.dir().path().join("wrong");
    std::fs::write(&wrong, "not-the-right-token-at-all\n").unwrap();
    for t in [None, Some(wrong.as_path())] {
        let out = weftctl(cp, t, &["get", "services"]);
        assert!(!out.status.success());
        assert!(text(&out).contains("401"), "{}", text(&out));
        assert!(!text(&out).contains(TOKEN));
    }
    let rsp = raw_put(cp, "billing", "service = \"billing\"\n", None);
    assert!(rsp.contains("401"), "{rsp}");

    // Delete.
    let out = weftctl(cp, Some(&token), &["delete", "policy", "billing"]);
    assert!(out.status.success(), "{}", text(&out));
    eventually(cp, &token, &["get", "services"], |t| !t.contains("billing"));
    let out = weftctl(cp, Some(&token), &["get", "instances", "billing"]);
    assert!(!out.status.success());
    assert!(text(&out).contains("404"), "{}", text(&out));
}

/// A GET over a raw socket; returns the whole response text.
fn raw_get(cp: &ControlPlane, path: &str, token: Option<&str>) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(cp.admin()).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let auth = token
        .map(|t| format!("authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nhost: cp\r\n{auth}connection: close\r\n\r\n"
    )
    .unwrap();
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out
}

/// The JSON body of a raw response.
fn body(rsp: &str) -> serde_json::Value {
    let (_, body) = rsp.split_once("\r\n\r\n").unwrap();
    serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {rsp}"))
}

/// `/live` says it is live (not as an error object); `/version` names the
/// build, and needs the token like every other read.
fn probes_and_version(cp: &ControlPlane) {
    let rsp = raw_get(cp, "/live", None);
    assert!(rsp.starts_with("HTTP/1.1 200"), "{rsp}");
    assert_eq!(body(&rsp), serde_json::json!({ "status": "live" }), "{rsp}");
    let rsp = raw_get(cp, "/version", None);
    assert!(rsp.starts_with("HTTP/1.1 401"), "{rsp}");
    let rsp = raw_get(cp, "/version", Some(TOKEN));
    assert!(rsp.starts_with("HTTP/1.1 200"), "{rsp}");
    let v = body(&rsp);
    assert_eq!(v["version"], env!("CARGO_PKG_VERSION"), "{rsp}");
    assert!(v["commit"].as_str().is_some_and(|c| !c.is_empty()), "{rsp}");
}

/// A PUT of a policy over a raw socket; returns the whole response text.
fn raw_put(cp: &ControlPlane, service: &str, body: &str, token: Option<&str>) -> String {
    use std::io::{Read, Write};
    let addr = cp.admin();
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let auth = token
        .map(|t| format!("authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    write!(
        s,
        "PUT /v1/services/{service}/policy HTTP/1.1\r\nhost: cp\r\n{auth}weft-file-name: sent.toml\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out
}

#[test]
fn admin_api_on_the_embedded_store() {
    let cp = start(ControlPlane::dev());
    probes_and_version(&cp);
    exercise(&cp);
}

#[tokio::test(flavor = "multi_thread")]
async fn admin_api_on_etcd() {
    let etcd = EtcdServer::start().await.expect("etcd (run scripts/setup)");
    let url = etcd.client_url().to_owned();
    let cp = tokio::task::spawn_blocking(move || start(ControlPlane::etcd(url)))
        .await
        .unwrap();
    tokio::task::spawn_blocking(move || exercise(&cp))
        .await
        .unwrap();
    drop(etcd);
}
