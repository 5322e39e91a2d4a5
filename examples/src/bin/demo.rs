//! `weft-demo`: the README's main job, a local mesh on the embedded store.
//!
//! Starts `weft-control-plane --dev` (in-memory store), demo app instances with a
//! `weft-proxy` sidecar each (which registers the instance), and one caller
//! sidecar whose bootstrap file names no service at all. Then it sends demo
//! traffic by logical name through the caller's sidecar, applies policies with
//! `weftctl` while traffic flows, and prints what happened: balancing, a policy
//! pushed live, retries masking a broken instance and its ejection, a service-wide
//! rate limit shared by the instances, a graceful shutdown that deregisters an
//! instance without failing a request, and a fast failure for an unknown name.
//! Everything listens on 127.0.0.1 with ports chosen at run time.
//!
//! The mesh runs with mTLS on: at start the demo makes a development CA and
//! one certificate per service with `weft-certs` (what `weftctl certs` uses),
//! and every sidecar's bootstrap has `[tls]`, so sidecars talk TLS 1.3 +
//! HTTP/2 to each other, verify each other's identity, and refuse plaintext.
//! The control plane's certificate also serves its admin API over HTTPS, which
//! `weftctl` reaches with `--ca-file`.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use bytes::Bytes;
use clap::Parser;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use tokio::process::{Child, Command};

#[derive(Debug, Parser)]
#[command(about = "Run the Weft demo: a local mesh on the embedded store, with demo traffic")]
struct Args {
    /// Directory holding weft-proxy, weft-control-plane and weftctl.
    #[arg(long, default_value = "target/release")]
    bin_dir: PathBuf,
    /// Requests per demo round.
    #[arg(long, default_value_t = 300)]
    requests: usize,
    /// After the demo, keep the mesh running with traffic, to look at the
    /// control plane's web view (its URL is printed), until Ctrl-C.
    #[arg(long)]
    keep: bool,
}

async fn start_backend(
    name: &'static str,
    delay: Duration,
    status: StatusCode,
) -> anyhow::Result<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req: Request<Incoming>| async move {
                    if !delay.is_zero() {
                        tokio::time::sleep(delay).await;
                    }
                    let header = |name: &str| {
                        req.headers()
                            .get(name)
                            .and_then(|h| h.to_str().ok())
                            .unwrap_or("-")
                            .to_owned()
                    };
                    let host = header("host");
                    let caller = header("weft-caller");
                    let proto = if header("forwarded").contains("proto=https") {
                        "mTLS"
                    } else {
                        "plaintext"
                    };
                    let body = format!(
                        "{name} answered {} {} (Host: {host}; caller {caller}, over {proto})\n",
                        req.method(),
                        req.uri().path()
                    );
                    let mut rsp = Response::new(Full::new(Bytes::from(body)));
                    *rsp.status_mut() = status;
                    rsp.headers_mut()
                        .insert("x-instance", http::HeaderValue::from_static(name));
                    Ok::<_, Infallible>(rsp)
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    Ok(addr)
}

/// A child process killed (if still running) when dropped.
struct Process {
    child: Child,
    name: String,
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
    }
}

impl Process {
    fn pid(&self) -> anyhow::Result<u32> {
        self.child
            .id()
            .with_context(|| format!("{} has exited", self.name))
    }
}

/// Start `bin args..` and wait for the JSON it writes to `--bound-file`.
async fn spawn(
    name: &str,
    bin: &Path,
    args: &[String],
    dir: &Path,
) -> anyhow::Result<(Process, serde_json::Value)> {
    let bound = dir.join(format!("{name}.bound.json"));
    let log = std::fs::File::create(dir.join(format!("{name}.log")))?;
    let child = Command::new(bin)
        .args(args)
        .arg("--bound-file")
        .arg(&bound)
        .env(
            "WEFT_LOG",
            std::env::var("WEFT_LOG").unwrap_or_else(|_| "warn".into()),
        )
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("starting {}", bin.display()))?;
    let process = Process {
        child,
        name: name.to_owned(),
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Ok(text) = std::fs::read_to_string(&bound) {
            return Ok((process, serde_json::from_str(&text)?));
        }
        if Instant::now() > deadline {
            let log = std::fs::read_to_string(dir.join(format!("{name}.log"))).unwrap_or_default();
            bail!("{name} did not start within 10s:\n{log}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn addr(v: &serde_json::Value, key: &str) -> anyhow::Result<SocketAddr> {
    Ok(v[key].as_str().context("bound file")?.parse()?)
}

/// A sidecar for one instance of `service` in front of `app`.
fn instance_bootstrap(
    service: &str,
    id: &str,
    app: SocketAddr,
    zone: &str,
    version: &str,
    cp: SocketAddr,
) -> String {
    format!(
        r#"# weft-demo: the sidecar of {service} instance {id}
[service]
name = "{service}"
app = "{app}"
id = "{id}"
instances = 3
policy = "{service}.toml"
metadata = {{ zone = "{zone}", version = "{version}" }}

[listen]
outbound = "127.0.0.1:0"
inbound = "127.0.0.1:0"
admin = "127.0.0.1:0"

[control_plane]
addresses = ["https://{cp}"]

[drain]
grace = "5s"

{tls}"#,
        tls = tls_section(service)
    )
}

/// `[tls]` with the certificate of `identity` made by [`make_certs`].
fn tls_section(identity: &str) -> String {
    format!(
        "[tls]\nca = \"certs/ca.pem\"\ncert = \"certs/{identity}.pem\"\nkey = \"certs/{identity}-key.pem\"\n"
    )
}

/// A development CA, a certificate for each of `services` and one for the
/// control plane, in DIR/certs, made with weft-certs (what `weftctl certs ca`,
/// `certs issue` and `certs control-plane` run).
fn make_certs(dir: &Path, services: &[&str]) -> anyhow::Result<weft_config::TrustDomain> {
    let certs = dir.join("certs");
    let trust_domain = weft_config::TrustDomain::default();
    let ca = weft_certs::Ca::generate(&trust_domain)?;
    ca.write(&certs)?;
    for service in services {
        ca.issue(&service.parse()?, weft_certs::DEFAULT_VALIDITY)?
            .write(&certs)?;
    }
    // 127.0.0.1 (always in it) is where weftctl reaches the admin API.
    ca.issue_control_plane(&["localhost"], weft_certs::DEFAULT_VALIDITY)?
        .write(&certs)?;
    Ok(trust_domain)
}

/// `weftctl` against the control plane's admin API, over HTTPS (the demo
/// CA signed its certificate).
async fn weftctl(
    args: &Args,
    cp_admin: SocketAddr,
    token: &Path,
    cmd: &[&str],
) -> anyhow::Result<String> {
    // The demo's certs/ directory is beside the token file.
    let ca = token.with_file_name("certs").join("ca.pem");
    let out = Command::new(args.bin_dir.join("weftctl"))
        .arg("--control-plane")
        .arg(format!("https://{cp_admin}"))
        .arg("--ca-file")
        .arg(ca)
        .arg("--token-file")
        .arg(token)
        .args(cmd)
        .output()
        .await?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if !out.status.success() {
        bail!("weftctl {cmd:?} failed: {text}");
    }
    Ok(text)
}

type HttpClient = Client<HttpConnector, Empty<Bytes>>;

/// GET `path` from `service` through the proxy (Host-header form).
async fn call(
    client: &HttpClient,
    proxy: SocketAddr,
    service: &str,
    path: &str,
) -> anyhow::Result<(StatusCode, String, String)> {
    let req = Request::get(format!("http://{proxy}{path}"))
        .header(http::header::HOST, service)
        .body(Empty::new())?;
    let rsp = client.request(req).await?;
    let status = rsp.status();
    let who = rsp
        .headers()
        .get("x-instance")
        .or_else(|| rsp.headers().get("weft-reason"))
        .and_then(|v| v.to_str().ok())
        .unwrap_or("-")
        .to_owned();
    let body = String::from_utf8_lossy(&rsp.into_body().collect().await?.to_bytes()).into_owned();
    Ok((status, who, body))
}

async fn round(
    client: &HttpClient,
    proxy: SocketAddr,
    service: &str,
    n: usize,
    concurrency: usize,
) -> anyhow::Result<()> {
    let started = Instant::now();
    let counts = Arc::new(tokio::sync::Mutex::new(BTreeMap::<String, usize>::new()));
    let per_worker = n.div_ceil(concurrency);
    let mut workers = Vec::new();
    for _ in 0..concurrency {
        let (client, counts, service) = (client.clone(), Arc::clone(&counts), service.to_owned());
        workers.push(tokio::spawn(async move {
            for _ in 0..per_worker {
                let (status, who, _) = call(&client, proxy, &service, "/demo").await?;
                let key = if status.is_success() {
                    who
                } else {
                    format!("{status} {who}")
                };
                *counts.lock().await.entry(key).or_default() += 1;
            }
            anyhow::Ok(())
        }));
    }
    for w in workers {
        w.await??;
    }
    let elapsed = started.elapsed();
    let counts = counts.lock().await;
    let total: usize = counts.values().sum();
    println!(
        "  {total} requests in {:.2?} ({:.0} req/s, concurrency {concurrency})",
        elapsed,
        total as f64 / elapsed.as_secs_f64()
    );
    for (who, count) in counts.iter() {
        let bar = "#".repeat(count * 40 / total.max(1));
        println!("    {who:<12} {count:>5}  {bar}");
    }
    Ok(())
}

/// The inbound listener of the sidecar `id` (from its bound file).
fn sidecar_inbound(dir: &Path, id: &str) -> anyhow::Result<SocketAddr> {
    let text = std::fs::read_to_string(dir.join(format!("{id}.bound.json")))?;
    addr(&serde_json::from_str(&text)?, "inbound")
}

fn kill(pid: u32, signal: &str) -> anyhow::Result<()> {
    let status = std::process::Command::new("kill")
        .args([signal, &pid.to_string()])
        .status()?;
    if !status.success() {
        bail!("kill {signal} {pid} failed");
    }
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let dir = std::env::temp_dir().join(format!("weft-demo-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let result = run(&args, &dir).await;
    if std::env::var_os("WEFT_DEMO_KEEP").is_some() {
        println!("(kept {})", dir.display());
    } else {
        let _ = std::fs::remove_dir_all(&dir);
    }
    result
}

async fn run(args: &Args, dir: &Path) -> anyhow::Result<()> {
    println!(
        "Weft demo: a local mesh on the embedded store\n==============================================\n"
    );
    let token = dir.join("admin-token");
    std::fs::write(&token, "weft-demo-admin-token-0123456789\n")?;
    // A read-only token for the web view only (it opens no admin API call).
    let ui_token = dir.join("ui-token");
    std::fs::write(&ui_token, "weft-demo-ui-token-0123456789\n")?;

    // mTLS between every sidecar: a development CA and one certificate per service.
    let trust_domain = make_certs(dir, &["billing", "orders", "checkout"])?;
    println!(
        "mTLS on: a development CA for trust domain {trust_domain} and certificates for billing, orders, checkout\n  \
         and the control plane (weft-certs, as `weftctl certs`); every sidecar has [tls] and proves\n  \
         spiffe://{trust_domain}/service/<name> to its peers and to the control plane (https://)\n"
    );

    let (cp, cp_bound) = spawn(
        "control-plane",
        &args.bin_dir.join("weft-control-plane"),
        &[
            "--dev".into(),
            "--listen".into(),
            "127.0.0.1:0".into(),
            "--admin".into(),
            "127.0.0.1:0".into(),
            "--token-file".into(),
            token.display().to_string(),
            "--lease-ttl".into(),
            "3s".into(),
            "--tls-ca".into(),
            dir.join("certs/ca.pem").display().to_string(),
            "--tls-cert".into(),
            dir.join("certs/control-plane.pem").display().to_string(),
            "--tls-key".into(),
            dir.join("certs/control-plane-key.pem")
                .display()
                .to_string(),
            // The same certificate serves the admin API over HTTPS.
            "--admin-tls-cert".into(),
            dir.join("certs/control-plane.pem").display().to_string(),
            "--admin-tls-key".into(),
            dir.join("certs/control-plane-key.pem")
                .display()
                .to_string(),
            "--ui-token-file".into(),
            ui_token.display().to_string(),
            "--ui-sample-interval".into(),
            "2s".into(),
        ],
        dir,
    )
    .await?;
    let (cp_grpc, cp_admin) = (addr(&cp_bound, "listen")?, addr(&cp_bound, "admin")?);
    println!(
        "weft-control-plane --dev (pid {}): gRPC over mTLS {cp_grpc}, admin https://{cp_admin}",
        cp.pid()?
    );

    // Policies, applied with weftctl before the sidecars start.
    let policies = [
        (
            "billing",
            "service = \"billing\"\n\n[outbound]\nload_balancer = \"p2c-ewma\"\n",
        ),
        (
            "orders",
            "service = \"orders\"\n\n[outbound]\nload_balancer = \"round-robin\"\noutlier = { consecutive_failures = 3, ejection = \"30s\" }\nretry = { attempts = 2, on = [\"connect-failure\", \"503\"] }\n",
        ),
    ];
    for (service, text) in policies {
        let file = dir.join(format!("{service}.toml"));
        std::fs::write(&file, text)?;
        print!(
            "  {}",
            weftctl(
                args,
                cp_admin,
                &token,
                &["apply", "--create", "-f", &file.display().to_string()]
            )
            .await?
        );
    }

    // App instances, each with its own sidecar that registers it.
    let instances = [
        (
            "billing",
            "billing-a",
            "eu-1",
            "v1",
            Duration::ZERO,
            StatusCode::OK,
        ),
        (
            "billing",
            "billing-b",
            "eu-1",
            "v1",
            Duration::ZERO,
            StatusCode::OK,
        ),
        (
            "billing",
            "billing-c",
            "eu-2",
            "v2",
            Duration::from_millis(25),
            StatusCode::OK,
        ),
        (
            "orders",
            "orders-a",
            "eu-1",
            "v1",
            Duration::ZERO,
            StatusCode::OK,
        ),
        (
            "orders",
            "orders-b",
            "eu-1",
            "v1",
            Duration::ZERO,
            StatusCode::OK,
        ),
        (
            "orders",
            "orders-broken",
            "eu-1",
            "v1",
            Duration::ZERO,
            StatusCode::SERVICE_UNAVAILABLE,
        ),
    ];
    let mut sidecars = Vec::new();
    println!(
        "\nApp instances and their sidecars (billing-c answers 25 ms slower; orders-broken always 503):"
    );
    for (service, id, zone, version, delay, status) in instances {
        let name: &'static str = id;
        let app = start_backend(name, delay, status).await?;
        let config = dir.join(format!("{id}.toml"));
        std::fs::write(
            &config,
            instance_bootstrap(service, id, app, zone, version, cp_grpc),
        )?;
        let (sidecar, bound) = spawn(
            id,
            &args.bin_dir.join("weft-proxy"),
            &[
                "run".into(),
                "--config".into(),
                config.display().to_string(),
            ],
            dir,
        )
        .await?;
        println!(
            "  {id:<14} app {app}  sidecar inbound {} (mTLS)  zone={zone} version={version}",
            addr(&bound, "inbound")?
        );
        sidecars.push((id, sidecar));
    }

    // The caller's sidecar knows only the control plane.
    let caller_config = dir.join("checkout.toml");
    std::fs::write(
        &caller_config,
        format!(
            "# weft-demo: the caller's sidecar (no [service]: its identity is its certificate's, checkout)\n[listen]\noutbound = \"127.0.0.1:0\"\ninbound = \"127.0.0.1:0\"\nadmin = \"127.0.0.1:0\"\n\n[control_plane]\naddresses = [\"https://{cp_grpc}\"]\n\n{}",
            tls_section("checkout")
        ),
    )?;
    let (caller, caller_bound) = spawn(
        "caller",
        &args.bin_dir.join("weft-proxy"),
        &[
            "run".into(),
            "--config".into(),
            caller_config.display().to_string(),
        ],
        dir,
    )
    .await?;
    let outbound = addr(&caller_bound, "outbound")?;
    println!("  caller sidecar (no static directory, identity checkout) outbound {outbound}\n");
    println!(
        "weftctl get services:\n{}",
        weftctl(args, cp_admin, &token, &["get", "services"]).await?
    );

    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    let client: HttpClient = Client::builder(TokioExecutor::new())
        .set_host(false)
        .build(connector);
    // Registrations land asynchronously: wait until all three billing instances answer.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let mut seen = std::collections::BTreeSet::new();
        for _ in 0..30 {
            if let Ok((StatusCode::OK, who, _)) = call(&client, outbound, "billing", "/hello").await
            {
                seen.insert(who);
            }
        }
        if seen.len() == 3 {
            break;
        }
        if Instant::now() > deadline {
            bail!("the billing instances did not all become reachable: {seen:?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (_, _, body) = call(&client, outbound, "billing", "/hello").await?;
    print!("GET http://billing/hello through the caller's sidecar -> {body}");
    let billing_inbound = sidecar_inbound(dir, "billing-a")?;
    let plaintext = call(&client, billing_inbound, "billing", "/hello").await;
    println!(
        "GET straight to billing-a's inbound listener {billing_inbound} without a certificate -> {}",
        match plaintext {
            Ok((status, _, _)) => format!("{status} (unexpected: plaintext was served)"),
            Err(_) => "refused: the connection is closed (mTLS required)".to_owned(),
        }
    );

    println!("\n1. billing, p2c + peak-EWMA, 8 concurrent callers: the slow instance gets less");
    round(&client, outbound, "billing", args.requests, 8).await?;

    println!("\n2. A new billing policy applied with weftctl reaches the caller live: round-robin");
    let file = dir.join("billing-rr.toml");
    std::fs::write(
        &file,
        "service = \"billing\"\n\n[outbound]\nload_balancer = \"round-robin\"\n",
    )?;
    print!(
        "  {}",
        weftctl(
            args,
            cp_admin,
            &token,
            &["apply", "-f", &file.display().to_string()]
        )
        .await?
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    round(&client, outbound, "billing", args.requests, 1).await?;

    println!(
        "\n3. orders has a broken instance: retries hide its 503s, outlier detection ejects it"
    );
    round(&client, outbound, "orders", 60, 1).await?;

    println!(
        "\n4. A service-wide inbound limit of 30 req/s (burst 6) for billing, enforced by its 3 instances at 10 req/s each"
    );
    let file = dir.join("billing-limit.toml");
    std::fs::write(
        &file,
        "service = \"billing\"\n\n[inbound]\nrate_limit = { per_second = 30, burst = 6 }\n\n[outbound]\nload_balancer = \"round-robin\"\nretry = { attempts = 0 }\n",
    )?;
    // Each billing sidecar reads its own policy from its bootstrap; the demo
    // writes the file and reloads them (SIGHUP), as ops would roll it out.
    // Replace the file atomically, so a sidecar never reads it half-written.
    std::fs::copy(&file, dir.join("billing.toml.new"))?;
    std::fs::rename(dir.join("billing.toml.new"), dir.join("billing.toml"))?;
    for (id, sidecar) in &sidecars {
        if id.starts_with("billing") {
            kill(sidecar.pid()?, "-HUP")?;
        }
    }
    print!(
        "  {}",
        weftctl(
            args,
            cp_admin,
            &token,
            &["apply", "-f", &file.display().to_string()]
        )
        .await?
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    round(&client, outbound, "billing", 60, 6).await?;
    let req = Request::get(format!("http://{outbound}/"))
        .header(http::header::HOST, "billing")
        .body(Empty::new())?;
    let rsp = client.request(req).await?;
    let header = |name: &str| {
        rsp.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("-")
            .to_owned()
    };
    println!(
        "  a refused request: {} weft-reason: {} weft-limit: {} retry-after: {}",
        rsp.status(),
        header("weft-reason"),
        header("weft-limit"),
        header("retry-after")
    );
    tokio::time::sleep(Duration::from_secs(1)).await;

    println!(
        "\n5. billing-c shuts down gracefully (SIGTERM) while traffic flows: it deregisters, then drains; nothing fails"
    );
    let pid = sidecars
        .iter()
        .find(|(id, _)| *id == "billing-c")
        .map(|(_, s)| s.pid())
        .context("billing-c")??;
    let traffic = {
        let client = client.clone();
        tokio::spawn(async move {
            let mut failures = 0;
            let mut total = 0;
            let end = Instant::now() + Duration::from_millis(1500);
            while Instant::now() < end {
                match call(&client, outbound, "billing", "/demo").await {
                    Ok((StatusCode::OK, _, _)) | Ok((StatusCode::TOO_MANY_REQUESTS, _, _)) => {}
                    _ => failures += 1,
                }
                total += 1;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            (total, failures)
        })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    kill(pid, "-TERM")?;
    let (total, failures) = traffic.await?;
    println!("  {total} requests during the shutdown, {failures} failed");
    print!(
        "weftctl get instances billing:\n{}",
        weftctl(args, cp_admin, &token, &["get", "instances", "billing"]).await?
    );

    println!("\n6. A name that is neither in the directory nor in DNS fails fast:");
    let started = Instant::now();
    let (status, reason, _) = call(&client, outbound, "no-such-service.invalid", "/").await?;
    println!(
        "  GET http://no-such-service.invalid/ -> {status}, weft-reason: {reason} ({:.0?})",
        started.elapsed()
    );

    println!("\n7. What the caller's sidecar sees (GET /endpoints on its admin listener):");
    let admin: Client<HttpConnector, Empty<Bytes>> =
        Client::builder(TokioExecutor::new()).build_http();
    let rsp = admin
        .get(format!("http://{}/endpoints", addr(&caller_bound, "admin")?).parse()?)
        .await?;
    let v: serde_json::Value =
        serde_json::from_slice(&rsp.into_body().collect().await?.to_bytes())?;
    for svc in v["services"].as_array().into_iter().flatten() {
        println!(
            "  {} ({}, {})",
            svc["name"].as_str().unwrap_or("?"),
            svc["source"].as_str().unwrap_or("?"),
            svc["load_balancer"].as_str().unwrap_or("?")
        );
        let counters = &svc["counters"];
        if counters.is_object() {
            println!(
                "    counters: requests={} retries={} ejections={} refusals={}",
                counters["requests"],
                counters["retries"],
                counters["ejections"],
                counters["refusals"]
            );
        }
        for ep in svc["endpoints"].as_array().into_iter().flatten() {
            println!(
                "    {:<21} {:<9} requests={:<5} latency_ewma={:.2}ms {}",
                ep["address"].as_str().unwrap_or("?"),
                ep["state"].as_str().unwrap_or("?"),
                ep["requests"],
                ep["latency_ewma_ms"].as_f64().unwrap_or(0.0),
                ep["metadata"]["zone"].as_str().unwrap_or("")
            );
        }
    }

    if args.keep {
        // billing-a's own sidecar calls orders too: it is registered, so the
        // web view sees its view of orders' instances (the ejection).
        let billing_outbound = {
            let text = std::fs::read_to_string(dir.join("billing-a.bound.json"))?;
            addr(&serde_json::from_str(&text)?, "outbound")?
        };
        keep_running(&client, outbound, billing_outbound, cp_admin, dir).await?;
    }

    println!("\n8. SIGTERM to every process: drain, deregister, exit");
    let mut processes: Vec<Process> = sidecars.into_iter().map(|(_, s)| s).collect();
    processes.push(caller);
    processes.push(cp);
    for p in &mut processes {
        if let Some(pid) = p.child.id() {
            kill(pid, "-TERM")?;
        }
        let status = tokio::time::timeout(Duration::from_secs(10), p.child.wait()).await??;
        println!("  {:<14} exited with {status}", p.name);
    }
    println!(
        "\nDone. See docs/ for the configuration reference (docs/operations.md, docs/policies.md)."
    );
    Ok(())
}

/// `--keep`: prints how to open the web view, then sends traffic until
/// Ctrl-C: from the caller to billing (past its rate limit), orders (with
/// its broken instance) and an unknown name, and from billing-a's sidecar
/// (`billing_outbound`) to orders.
async fn keep_running(
    client: &HttpClient,
    outbound: SocketAddr,
    billing_outbound: SocketAddr,
    cp_admin: SocketAddr,
    dir: &Path,
) -> anyhow::Result<()> {
    let ca = dir.join("certs/ca.pem");
    println!(
        "\nThe mesh keeps running with traffic. Its web view (read-only, on the admin listener):\n\n  \
         https://{cp_admin}/ui\n\n  \
         The admin listener serves the demo CA's certificate: trust {ca} in the browser, or accept\n  \
         the warning. Sign in with the read-only token in {ui} (or the admin token in {admin});\n  \
         a script sends it as a header:\n\n  \
         curl --cacert {ca} -H \"Authorization: Bearer $(cat {ui})\" https://{cp_admin}/ui\n\n\
         Ctrl-C stops everything.",
        ca = ca.display(),
        ui = dir.join("ui-token").display(),
        admin = dir.join("admin-token").display(),
    );
    let traffic: Vec<_> = [
        (outbound, "billing", "/charge", 25),
        (outbound, "orders", "/list", 100),
        (outbound, "no-such-service.invalid", "/", 2000),
        (billing_outbound, "orders", "/invoice", 50),
    ]
    .into_iter()
    .map(|(outbound, service, path, every_ms)| {
        let client = client.clone();
        tokio::spawn(async move {
            loop {
                let _ = call(&client, outbound, service, path).await;
                tokio::time::sleep(Duration::from_millis(every_ms)).await;
            }
        })
    })
    .collect();
    tokio::signal::ctrl_c()
        .await
        .context("waiting for Ctrl-C")?;
    for task in traffic {
        task.abort();
    }
    Ok(())
}
