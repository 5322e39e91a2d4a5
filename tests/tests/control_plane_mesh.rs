//! Scenario: a mesh with no fixed links. A `weft-control-plane --dev` keeps the
//! directory; the `billing` service's sidecar registers its instance; a caller's
//! sidecar, whose bootstrap file names no services at all, calls `billing` by name
//! and reaches the app through billing's sidecar. A policy applied to the control
//! plane reaches the caller; a graceful shutdown of billing's sidecar removes the
//! instance from the caller's view at once.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use weft_tests::backend::Backend;
use weft_tests::client::{Client, Mode};
use weft_tests::eventually;
use weft_tests::process::{Proxy, Signal, TempDir, proxy_bin};
use weft_tests::tls::Pki;

const TOKEN: &str = "mesh-test-token-0123456789";

struct ControlPlane {
    child: Child,
    grpc: String,
    admin: String,
    _dir: TempDir,
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn sibling_bin(name: &str) -> anyhow::Result<PathBuf> {
    let proxy = proxy_bin()?;
    let bin = proxy.with_file_name(name);
    ensure!(
        bin.exists(),
        "{} does not exist: build the workspace's binaries first",
        bin.display()
    );
    Ok(bin)
}

async fn start_control_plane() -> anyhow::Result<ControlPlane> {
    let dir = TempDir::new()?;
    let tokens = dir.write("tokens", &format!("{TOKEN}\n"))?;
    let bound = dir.path().join("cp-bound.json");
    let log = std::fs::File::create(dir.path().join("cp.log"))?;
    let child = Command::new(sibling_bin("weft-control-plane")?)
        .args([
            "--dev",
            "--listen",
            "127.0.0.1:0",
            "--admin",
            "127.0.0.1:0",
            "--lease-ttl",
            "2s",
        ])
        .arg("--token-file")
        .arg(&tokens)
        .arg("--bound-file")
        .arg(&bound)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()?;
    let mut cp = ControlPlane {
        child,
        grpc: String::new(),
        admin: String::new(),
        _dir: dir,
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Ok(text) = std::fs::read_to_string(&bound) {
            let v: serde_json::Value = serde_json::from_str(&text)?;
            cp.grpc = format!("http://{}", v["listen"].as_str().context("listen")?);
            cp.admin = format!("http://{}", v["admin"].as_str().context("admin")?);
            return Ok(cp);
        }
        ensure!(Instant::now() < deadline, "the control plane did not start");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn weftctl(cp: &ControlPlane, args: &[&str], dir: &TempDir) -> anyhow::Result<String> {
    let tokens = dir.write("ctl-token", &format!("{TOKEN}\n"))?;
    let out = Command::new(sibling_bin("weftctl")?)
        .arg("--control-plane")
        .arg(&cp.admin)
        .arg("--token-file")
        .arg(&tokens)
        .args(args)
        .output()?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    ensure!(out.status.success(), "weftctl {args:?} failed: {text}");
    Ok(text)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn services_find_each_other_through_the_control_plane() -> anyhow::Result<()> {
    let cp = start_control_plane().await?;
    let app = Backend::start("billing-app").await?;

    // billing's own sidecar: registers its instance (advertising its inbound listener).
    let billing = Proxy::start(format!(
        r#"
[service]
name = "billing"
app = "{app}"
id = "billing-1"
metadata = {{ zone = "z1", version = "v1" }}
[listen]
outbound = "127.0.0.1:0"
inbound = "127.0.0.1:0"
admin = "127.0.0.1:0"
[control_plane]
addresses = ["{grpc}"]
[drain]
grace = "2s"
"#,
        app = app.addr(),
        grpc = cp.grpc
    ))
    .await?;

    // The caller's sidecar knows only the control plane.
    let caller = Proxy::start(format!(
        r#"
[listen]
outbound = "127.0.0.1:0"
inbound = "127.0.0.1:0"
admin = "127.0.0.1:0"
[control_plane]
addresses = ["{grpc}"]
"#,
        grpc = cp.grpc
    ))
    .await?;

    let client = Client::new(caller.outbound(), Mode::HostHeader);
    // The registration lands asynchronously: wait (bounded) for the first success.
    eventually(Duration::from_secs(10), || async {
        let reply = client.get("http://billing/hello").await?;
        ensure!(
            reply.status == 200,
            "status {} ({:?})",
            reply.status,
            reply.text()
        );
        ensure!(
            reply.backend() == Some("billing-app"),
            "answered by {:?}",
            reply.backend()
        );
        Ok(())
    })
    .await?;
    // It went through billing's inbound listener (which adds x-forwarded-for).
    let reply = client.get("http://billing/hello").await?;
    ensure!(
        reply.header("x-seen-x-forwarded-for").is_some(),
        "not proxied by billing's sidecar"
    );

    // The caller's admin API shows the pushed service and its instance.
    let endpoints = caller.admin_client().endpoints().await?;
    let svc = endpoints
        .services()?
        .iter()
        .find(|s| s["name"] == "billing")
        .context("billing in the caller's /endpoints")?;
    ensure!(svc["source"] == "control-plane", "{svc}");
    let cp_state = &endpoints.0["control_plane"];
    ensure!(cp_state["connection"]["state"] == "connected", "{cp_state}");
    ensure!(cp_state["version"].as_i64().unwrap_or(0) > 0, "{cp_state}");
    ensure!(cp_state["rejected"] == 0, "{cp_state}");
    ensure!(
        svc["endpoints"][0]["address"] == billing.inbound().to_string(),
        "{svc}"
    );

    // `weftctl stat` finds billing's sidecar through the control plane and
    // reports the traffic it serves (inbound view) while requests flow.
    let traffic = {
        let client = client.clone();
        tokio::spawn(async move {
            let until = Instant::now() + Duration::from_millis(1500);
            while Instant::now() < until {
                let _ = client.get("http://billing/hello").await;
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
    };
    let dir = TempDir::new()?;
    let stat = weftctl(&cp, &["stat", "--interval", "800ms", "-o", "json"], &dir)?;
    traffic.await?;
    let stat: serde_json::Value = serde_json::from_str(&stat).context(stat.clone())?;
    let row = stat["rows"]
        .as_array()
        .and_then(|rows| rows.iter().find(|r| r["service"] == "billing"))
        .with_context(|| format!("billing in weftctl stat: {stat}"))?;
    ensure!(row["rps"].as_f64().unwrap_or(0.0) > 10.0, "{stat}");
    ensure!(row["success_rate"].as_f64() == Some(1.0), "{stat}");
    ensure!(row["p99_seconds"].as_f64().is_some(), "{stat}");
    ensure!(stat["unreachable"] == serde_json::json!([]), "{stat}");

    // A policy applied to the control plane reaches the caller: a route timeout
    // shorter than the app's delay turns into a 504 naming the route.
    let policy = dir.write(
        "billing.toml",
        "service = \"billing\"\n\n[[routes]]\nname = \"slow\"\nmatch = { path_prefix = \"/slow\" }\ntimeout = \"200ms\"\n",
    )?;
    weftctl(&cp, &["apply", "-f", policy.to_str().unwrap()], &dir)?;
    eventually(Duration::from_secs(10), || async {
        let reply = client.get("http://billing/slow?ms=2000").await?;
        ensure!(reply.status == 504, "status {}", reply.status);
        ensure!(
            reply.header("weft-limit") == Some("routes.slow.timeout"),
            "{:?}",
            reply.header("weft-limit")
        );
        Ok(())
    })
    .await?;

    // Graceful shutdown of billing's sidecar deregisters it at once (the lease TTL
    // is 2 s; the check below must pass well before a lease could expire).
    billing.signal(Signal::Term)?;
    let started = Instant::now();
    eventually(Duration::from_secs(10), || async {
        let reply = client.get("http://billing/hello").await?;
        ensure!(reply.status != 200, "still answered");
        Ok(())
    })
    .await?;
    ensure!(
        started.elapsed() < Duration::from_millis(1900),
        "deregistration took {:?}",
        started.elapsed()
    );
    Ok(())
}

fn billing_sidecar(id: &str, app: std::net::SocketAddr, grpc: &str) -> String {
    format!(
        r#"
[service]
name = "billing"
app = "{app}"
id = "{id}"
policy = "billing-local.toml"
[listen]
outbound = "127.0.0.1:0"
inbound = "127.0.0.1:0"
admin = "127.0.0.1:0"
[control_plane]
addresses = ["{grpc}"]
[drain]
grace = "2s"
"#
    )
}

/// Waits until `proxy`'s local app shows `source`, `share` and the effective
/// inbound rate limit `rate` (per second, burst), or `None` for no limit.
async fn expect_local(
    proxy: &Proxy,
    source: &str,
    share: u64,
    rate: Option<(f64, u64)>,
) -> anyhow::Result<()> {
    let admin = proxy.admin_client();
    eventually(Duration::from_secs(10), || async {
        let endpoints = admin.endpoints().await?;
        let local = &endpoints.0["local"];
        ensure!(local["policy_source"] == source, "{local}");
        ensure!(local["share"] == share, "{local}");
        match rate {
            Some((per_second, burst)) => {
                ensure!(
                    local["rate_limit"]["per_second"].as_f64() == Some(per_second),
                    "{local}"
                );
                ensure!(local["rate_limit"]["burst"] == burst, "{local}");
            }
            None => ensure!(local["rate_limit"].is_null(), "{local}"),
        }
        Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_takes_its_policy_and_share_from_the_control_plane() -> anyhow::Result<()> {
    let cp = start_control_plane().await?;
    let app = Backend::start("billing-app").await?;
    // The bootstrap's own policy file: the fallback until the owner applies one.
    let local_policy = "service = \"billing\"\n\n[inbound]\nmax_concurrency = 7\n";
    let one = Proxy::builder(billing_sidecar("billing-1", app.addr(), &cp.grpc))
        .file("billing-local.toml", local_policy)
        .start()
        .await?;
    expect_local(&one, "file", 1, None).await?;
    // billing-2 says where it is reached on the command line (as a pod would,
    // with its IP); nothing listens there, and nothing in this test calls it.
    let two = Proxy::builder(billing_sidecar("billing-2", app.addr(), &cp.grpc))
        .file("billing-local.toml", local_policy)
        .arg("--advertise")
        .arg("127.0.0.1:9")
        .start()
        .await?;
    // Two live instances: each sidecar's share is now 2, with the file's policy.
    expect_local(&one, "file", 2, None).await?;
    expect_local(&two, "file", 2, None).await?;
    let dir = TempDir::new()?;
    let instances = weftctl(&cp, &["get", "instances", "billing"], &dir)?;
    let two_line = instances
        .lines()
        .find(|l| l.contains("billing-2"))
        .context("billing-2 in `weftctl get instances`")?;
    ensure!(two_line.contains("127.0.0.1:9 "), "{instances}");

    // The owner applies a policy: both instances enforce half of the service-wide limit.
    let policy = dir.write(
        "billing.toml",
        "service = \"billing\"\n\n[inbound]\nrate_limit = { per_second = 40, burst = 4 }\n",
    )?;
    weftctl(&cp, &["apply", "-f", policy.to_str().unwrap()], &dir)?;
    expect_local(&one, "control-plane", 2, Some((20.0, 2))).await?;
    expect_local(&two, "control-plane", 2, Some((20.0, 2))).await?;

    // The limit is enforced at that share on billing-1's inbound listener: a
    // burst of 2, then 429 naming the key.
    let inbound = Client::new(one.inbound(), Mode::HostHeader);
    let mut statuses = Vec::new();
    for _ in 0..6 {
        let reply = inbound.get("http://billing/hello").await?;
        statuses.push((reply.status, reply.header("weft-limit").map(str::to_owned)));
    }
    ensure!(statuses[0].0 == 200 && statuses[1].0 == 200, "{statuses:?}");
    ensure!(
        statuses
            .iter()
            .any(|(s, l)| *s == 429 && l.as_deref() == Some("inbound.rate_limit")),
        "{statuses:?}"
    );

    // One instance leaves: the other now enforces the whole limit.
    two.signal(Signal::Term)?;
    expect_local(&one, "control-plane", 1, Some((40.0, 4))).await?;
    Ok(())
}

/// With `[tls]`, services pushed by the control plane are meshed: the caller
/// reaches billing's sidecar over mTLS and billing's app hears who called.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pushed_services_are_called_over_mtls() -> anyhow::Result<()> {
    let cp = start_control_plane().await?;
    let pki = Pki::new();
    let app = Backend::start("billing-app").await?;
    let tls = "[tls]\nca = \"ca.pem\"\ncert = \"cert.pem\"\nkey = \"key.pem\"\n";
    let with_cert = |bootstrap: String, service: &str| {
        let issued = pki.issue(service);
        Proxy::builder(bootstrap)
            .file("ca.pem", pki.ca_pem())
            .file("cert.pem", issued.cert_pem())
            .file("key.pem", issued.key_pem())
    };
    let _billing = with_cert(
        format!(
            "[service]\nname = \"billing\"\napp = \"{app}\"\nid = \"billing-1\"\n\
             [listen]\noutbound = \"127.0.0.1:0\"\ninbound = \"127.0.0.1:0\"\nadmin = \"127.0.0.1:0\"\n\
             [control_plane]\naddresses = [\"{grpc}\"]\n{tls}",
            app = app.addr(),
            grpc = cp.grpc
        ),
        "billing",
    )
    .start()
    .await?;
    // A caller-only sidecar: its identity is its certificate's, web.
    let caller = with_cert(
        format!(
            "[listen]\noutbound = \"127.0.0.1:0\"\ninbound = \"127.0.0.1:0\"\nadmin = \"127.0.0.1:0\"\n\
             [control_plane]\naddresses = [\"{grpc}\"]\n{tls}",
            grpc = cp.grpc
        ),
        "web",
    )
    .start()
    .await?;

    let client = Client::new(caller.outbound(), Mode::HostHeader);
    let reply = eventually(Duration::from_secs(10), || async {
        let reply = client.get("http://billing/hello").await?;
        ensure!(reply.status == 200, "{} {}", reply.status, reply.text());
        Ok(reply)
    })
    .await?;
    let forwarded = reply.header("x-seen-forwarded").unwrap_or_default();
    ensure!(forwarded.contains("proto=https"), "forwarded: {forwarded}");
    ensure!(reply.header("x-seen-version") == Some("HTTP/1.1"));
    ensure!(app.seen_with("weft-caller", "web") >= 1);
    Ok(())
}
