//! `weft-demo`: the README's main job.
//!
//! Starts three demo backends (one of them slow), writes a bootstrap file for a
//! standalone `weft-proxy` that knows them as two logical services (`catalog`,
//! round-robin; `billing`, p2c-ewma), starts the proxy, and sends demo traffic by
//! logical name, printing which instance answered. Then it removes an instance with
//! a live reload, asks for a service that does not exist, and stops the proxy with
//! SIGTERM. Everything listens on 127.0.0.1 with ports chosen at run time.

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
#[command(about = "Run the Weft demo: backends, a standalone sidecar, demo traffic")]
struct Args {
    /// Path to the weft-proxy binary.
    #[arg(long, default_value = "target/release/weft-proxy")]
    proxy: PathBuf,
    /// Requests per demo round.
    #[arg(long, default_value_t = 300)]
    requests: usize,
}

struct Backend {
    name: &'static str,
    zone: &'static str,
    version: &'static str,
    delay: Duration,
    addr: SocketAddr,
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
                    let host = req
                        .headers()
                        .get(http::header::HOST)
                        .and_then(|h| h.to_str().ok())
                        .unwrap_or("-")
                        .to_owned();
                    let body = format!(
                        "{name} answered {} {} (Host: {host})\n",
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

fn bootstrap(backends: &[Backend], broken: SocketAddr, include_slow: bool) -> String {
    let endpoints: Vec<String> = backends
        .iter()
        .filter(|b| include_slow || b.delay.is_zero())
        .map(|b| {
            format!(
                "  {{ address = \"{}\", metadata = {{ zone = \"{}\", version = \"{}\", labels = {{ instance = \"{}\" }} }} }},",
                b.addr, b.zone, b.version, b.name
            )
        })
        .collect();
    let endpoints = endpoints.join("\n");
    let fast: Vec<String> = backends
        .iter()
        .filter(|b| b.delay.is_zero())
        .map(|b| format!("  {{ address = \"{}\" }},", b.addr))
        .collect();
    let fast = fast.join("\n");
    format!(
        r#"# Written by weft-demo: a standalone sidecar with two logical services.
[listen]
outbound = "127.0.0.1:0"
inbound = "127.0.0.1:0"
admin = "127.0.0.1:0"

[drain]
grace = "5s"

[[directory.services]]
name = "catalog"
policy = "catalog.toml"
endpoints = [
{endpoints}
]

[[directory.services]]
name = "billing"
policy = "billing.toml"
endpoints = [
{endpoints}
]

[[directory.services]]
name = "orders"
policy = "orders.toml"
endpoints = [
{fast}
  {{ address = "{broken}" }},
]

[[directory.services]]
name = "search"
policy = "search.toml"
endpoints = [
{fast}
]
"#
    )
}

struct ProxyProcess {
    child: Child,
    outbound: SocketAddr,
    admin: SocketAddr,
}

impl Drop for ProxyProcess {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
    }
}

async fn start_proxy(bin: &Path, dir: &Path) -> anyhow::Result<ProxyProcess> {
    let bound = dir.join("bound.json");
    let child = Command::new(bin)
        .args(["run", "--config"])
        .arg(dir.join("weft.toml"))
        .arg("--bound-file")
        .arg(&bound)
        .env(
            "WEFT_LOG",
            std::env::var("WEFT_LOG").unwrap_or_else(|_| "warn".into()),
        )
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("starting {}", bin.display()))?;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Ok(text) = std::fs::read_to_string(&bound) {
            let v: serde_json::Value = serde_json::from_str(&text)?;
            let get = |k: &str| -> anyhow::Result<SocketAddr> {
                Ok(v[k].as_str().context("bound file")?.parse()?)
            };
            return Ok(ProxyProcess {
                child,
                outbound: get("outbound")?,
                admin: get("admin")?,
            });
        }
        if Instant::now() > deadline {
            bail!("weft-proxy did not start within 10s");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
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
    let mut backends = vec![
        Backend {
            name: "instance-a",
            zone: "eu-1",
            version: "v1",
            delay: Duration::ZERO,
            addr: "0.0.0.0:0".parse()?,
        },
        Backend {
            name: "instance-b",
            zone: "eu-1",
            version: "v1",
            delay: Duration::ZERO,
            addr: "0.0.0.0:0".parse()?,
        },
        Backend {
            name: "instance-c",
            zone: "eu-2",
            version: "v2",
            delay: Duration::from_millis(25),
            addr: "0.0.0.0:0".parse()?,
        },
    ];
    for b in &mut backends {
        b.addr = start_backend(b.name, b.delay, StatusCode::OK).await?;
    }
    let broken = start_backend("broken", Duration::ZERO, StatusCode::SERVICE_UNAVAILABLE).await?;
    println!("Weft demo\n=========\n");
    println!(
        "Three instances of a demo app (instance-c answers 25 ms slower), and one broken instance (always 503) at {broken}:"
    );
    for b in &backends {
        println!(
            "  {:<11} {}  zone={} version={}",
            b.name, b.addr, b.zone, b.version
        );
    }

    let dir = std::env::temp_dir().join(format!("weft-demo-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    std::fs::write(
        dir.join("catalog.toml"),
        "service = \"catalog\"\n\n[outbound]\nload_balancer = \"round-robin\"\n",
    )?;
    std::fs::write(
        dir.join("billing.toml"),
        "service = \"billing\"\n\n[outbound]\nload_balancer = \"p2c-ewma\"\n",
    )?;
    std::fs::write(
        dir.join("orders.toml"),
        "service = \"orders\"\n\n[outbound]\nload_balancer = \"round-robin\"\noutlier = { consecutive_failures = 3, ejection = \"30s\" }\nretry = { attempts = 2, on = [\"connect-failure\", \"503\"] }\n",
    )?;
    std::fs::write(
        dir.join("search.toml"),
        "service = \"search\"\n\n[outbound]\nrate_limit = { per_second = 20, burst = 5 }\n",
    )?;
    std::fs::write(dir.join("weft.toml"), bootstrap(&backends, broken, true))?;
    println!("\nBootstrap file: {}", dir.join("weft.toml").display());

    let proxy = start_proxy(&args.proxy, &dir).await?;
    let pid = proxy.child.id().context("proxy pid")?;
    println!(
        "weft-proxy (pid {pid}) listening: outbound {}, admin {}\n",
        proxy.outbound, proxy.admin
    );

    let client: HttpClient = Client::builder(TokioExecutor::new())
        .set_host(false)
        .build_http();
    let (_, _, body) = call(&client, proxy.outbound, "catalog", "/hello").await?;
    print!("GET http://catalog/hello through the sidecar -> {body}");

    println!("\n1. `catalog` balanced round-robin, sequential requests: an even split");
    round(&client, proxy.outbound, "catalog", args.requests, 1).await?;
    println!(
        "\n2. `billing` balanced by p2c + peak-EWMA, 8 concurrent callers: the slow instance gets less"
    );
    round(&client, proxy.outbound, "billing", args.requests, 8).await?;

    println!("\n3. Live reload: instance-c removed from the bootstrap file, then SIGHUP");
    std::fs::write(dir.join("weft.toml"), bootstrap(&backends, broken, false))?;
    kill(pid, "-HUP")?;
    let admin: Client<HttpConnector, Empty<Bytes>> =
        Client::builder(TokioExecutor::new()).build_http();
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let rsp = admin
            .get(format!("http://{}/config", proxy.admin).parse()?)
            .await?;
        let v: serde_json::Value =
            serde_json::from_slice(&rsp.into_body().collect().await?.to_bytes())?;
        if v["version"].as_u64() == Some(2) {
            println!("  config version 2 applied");
            break;
        }
        if Instant::now() > deadline {
            bail!("reload was not applied");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    round(&client, proxy.outbound, "billing", args.requests / 3, 4).await?;

    println!(
        "\n4. `orders` has a broken instance: retries hide its 503s, outlier detection ejects it"
    );
    round(&client, proxy.outbound, "orders", 60, 1).await?;

    println!("\n5. `search` allows this caller 20 req/s (burst 5): the excess is refused at once");
    round(&client, proxy.outbound, "search", 40, 4).await?;
    let rsp = client
        .request(
            Request::get(format!("http://{}/", proxy.outbound))
                .header(http::header::HOST, "search")
                .body(Empty::new())?,
        )
        .await?;
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

    println!("\n6. A name that is neither in the directory nor in DNS fails fast:");
    let started = Instant::now();
    let (status, reason, _) = call(&client, proxy.outbound, "no-such-service.invalid", "/").await?;
    println!(
        "  GET http://no-such-service.invalid/ -> {status}, weft-reason: {reason} ({:.0?})",
        started.elapsed()
    );

    let rsp = admin
        .get(format!("http://{}/endpoints", proxy.admin).parse()?)
        .await?;
    let v: serde_json::Value =
        serde_json::from_slice(&rsp.into_body().collect().await?.to_bytes())?;
    println!("\n7. What the sidecar sees (GET /endpoints on the admin listener):");
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
                "    {:<21} {:<7} requests={:<5} latency_ewma={:.2}ms",
                ep["address"].as_str().unwrap_or("?"),
                ep["state"].as_str().unwrap_or("?"),
                ep["requests"],
                ep["latency_ewma_ms"].as_f64().unwrap_or(0.0)
            );
        }
    }

    println!("\n8. SIGTERM: drain and exit");
    let mut proxy = proxy;
    kill(pid, "-TERM")?;
    let status = tokio::time::timeout(Duration::from_secs(10), proxy.child.wait()).await??;
    println!("  weft-proxy exited with {status}");
    let _ = std::fs::remove_dir_all(&dir);
    if !status.success() {
        bail!("weft-proxy exited with {status}");
    }
    println!("\nDone. See README.md for the configuration reference.");
    Ok(())
}
