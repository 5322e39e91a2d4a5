//! Scenario: the in-process client (`weft-client`, in this test process)
//! calls `billing` through a `weft-control-plane --dev` mesh, beside a
//! caller's sidecar doing the same. billing has two instances, each behind
//! its own registered sidecar. For both callers, the in-process client and
//! the sidecar:
//!
//! - a call reaches billing's app through billing's sidecar;
//! - with instance 1 answering 503, every call still succeeds: the retry goes
//!   to instance 2 (instance 1 is tried, and the caller counts retries), and
//!   after `outbound.outlier`'s consecutive failures instance 1 is ejected
//!   (no more tries reach it, the caller counts an ejection);
//! - a pushed `outbound.rate_limit` refuses past its burst with 429,
//!   `weft-reason: rate-limit`, `weft-limit: outbound.rate_limit`, answered by
//!   no backend.
//!
//! A client that bypassed the outbound stack would return the 503s, and no
//! refusal would carry Weft's headers.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use anyhow::{Context as _, ensure};
use http::Request;
use http_body_util::{BodyExt as _, Empty};
use weft_tests::backend::Backend;
use weft_tests::client::{Client as HttpClient, Mode, Reply};
use weft_tests::config::Bootstrap;
use weft_tests::control_plane::ControlPlane;
use weft_tests::eventually;
use weft_tests::mesh::{mesh_caller, registered};
use weft_tests::process::TempDir;

/// A caller of billing: the in-process client, or a sidecar's outbound
/// listener (with its admin API for the counters).
enum Caller {
    InProcess(weft_client::Client),
    Sidecar(Box<(HttpClient, weft_tests::admin::Admin)>),
}

impl Caller {
    fn name(&self) -> &'static str {
        match self {
            Self::InProcess(_) => "in-process client",
            Self::Sidecar(..) => "sidecar",
        }
    }

    async fn get(&self, uri: &str) -> anyhow::Result<Reply> {
        match self {
            Self::InProcess(client) => {
                let req = Request::get(uri).body(Empty::<bytes::Bytes>::new())?;
                let rsp = client.request(req).await?;
                let (parts, body) = rsp.into_parts();
                let collected = body
                    .collect()
                    .await
                    .map_err(|e| anyhow::anyhow!("reading the body: {e}"))?;
                let trailers = collected.trailers().cloned();
                Ok(Reply {
                    status: parts.status,
                    version: parts.version,
                    headers: parts.headers,
                    body: collected.to_bytes(),
                    trailers,
                })
            }
            Self::Sidecar(sidecar) => sidecar.0.get(uri).await,
        }
    }

    /// The caller's `weft_<family>_total` for billing, summed over routes.
    async fn counter(&self, family: &str) -> anyhow::Result<f64> {
        let text = match self {
            Self::InProcess(client) => client.metrics_text()?,
            Self::Sidecar(sidecar) => sidecar.1.get("/metrics").await?.text(),
        };
        let prefix = format!("weft_{family}_total{{");
        Ok(text
            .lines()
            .filter(|l| l.starts_with(&prefix) && l.contains("service=\"billing\""))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum())
    }
}

/// Applies `body` as billing's policy with `weftctl apply`.
async fn apply(cp: &ControlPlane, dir: &TempDir, body: &str) -> anyhow::Result<()> {
    let file = dir.write("billing.toml", &format!("service = \"billing\"\n{body}"))?;
    cp.weftctl_ok(&["apply", "--create", "-f", file.to_str().context("path")?])
        .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_in_process_client_behaves_as_a_sidecar() -> anyhow::Result<()> {
    let cp = ControlPlane::dev().lease_ttl("2s").start().await?;
    let grpc = [cp.grpc_url()];
    let app1 = Backend::start("billing-1").await?;
    let app2 = Backend::start("billing-2").await?;
    let _billing1 = registered("billing", "billing-1", app1.addr(), &grpc).await?;
    let _billing2 = registered("billing", "billing-2", app2.addr(), &grpc).await?;

    // The client reads a bootstrap file like a sidecar's: here only
    // `[control_plane]` (and the harness's `[listen]`, which it ignores).
    let dir = TempDir::new()?;
    let path = dir.write(
        "weft.toml",
        &Bootstrap::new()
            .control_plane(grpc.iter().cloned())
            .render(),
    )?;
    let client = weft_client::Client::from_bootstrap(&path).await?;
    let sidecar = mesh_caller(&grpc).await?;
    let callers = [
        Caller::InProcess(client.clone()),
        Caller::Sidecar(Box::new((
            HttpClient::new(sidecar.outbound(), Mode::HostHeader),
            sidecar.admin_client(),
        ))),
    ];

    for caller in &callers {
        let who = caller.name();
        eventually(Duration::from_secs(10), || async {
            let reply = caller.get("http://billing/hello").await?;
            reply.expect_status(200)?;
            // Through billing's sidecar, which adds x-forwarded-for.
            ensure!(
                reply.header("x-seen-x-forwarded-for").is_some(),
                "{who}: not proxied by billing's sidecar: {:?}",
                reply.headers
            );
            Ok(())
        })
        .await?;
    }

    // Retries and ejection. The slow route's timeout tells when the policy
    // has reached a caller.
    apply(
        &cp,
        &dir,
        r#"
[outbound]
load_balancer = "round-robin"
retry = { attempts = 2, on = ["503"], backoff = "5ms..20ms" }
outlier = { consecutive_failures = 3, ejection = "60s", max_ejected_percent = 50 }

[[routes]]
name = "slow"
match = { path_prefix = "/slow" }
timeout = "200ms"
"#,
    )
    .await?;
    for caller in &callers {
        let who = caller.name();
        app1.set_status(None);
        eventually(Duration::from_secs(10), || async {
            let reply = caller.get("http://billing/slow?ms=2000").await?;
            reply.expect_refusal(504, "timeout", "routes.slow.timeout")?;
            Ok(())
        })
        .await
        .with_context(|| format!("{who}: the policy never arrived"))?;
        app1.set_status(Some(503));

        let tried_before = app1.requests();
        let retries_before = caller.counter("retries").await?;
        for _ in 0..20 {
            let reply = caller.get("http://billing/hello").await?;
            reply.expect_status(200).with_context(|| who)?;
            ensure!(
                reply.backend() == Some("billing-2"),
                "{who}: answered by {:?}",
                reply.backend()
            );
        }
        let tried = app1.requests() - tried_before;
        ensure!(tried >= 1, "{who}: instance 1 was never tried");
        let retries = caller.counter("retries").await? - retries_before;
        ensure!(
            retries >= tried as f64,
            "{who}: {retries} retries for {tried} failed tries"
        );
        // Ejected after 3 consecutive failures: no more tries reach it.
        ensure!(tried <= 3, "{who}: instance 1 tried {tried} times");
        ensure!(
            caller.counter("ejections").await? >= 1.0,
            "{who}: no ejection counted"
        );
        let ejected_at = app1.requests();
        for _ in 0..10 {
            caller
                .get("http://billing/hello")
                .await?
                .expect_status(200)
                .with_context(|| who)?;
        }
        ensure!(
            app1.requests() == ejected_at,
            "{who}: an ejected instance was tried"
        );
    }
    app1.set_status(None);

    // A pushed outbound rate limit: the burst passes, then 429.
    apply(
        &cp,
        &dir,
        "\n[outbound]\nrate_limit = { per_second = 1, burst = 3 }\n",
    )
    .await?;
    for caller in &callers {
        let who = caller.name();
        eventually(Duration::from_secs(10), || async {
            let mut refused = None;
            for _ in 0..6 {
                let reply = caller.get("http://billing/hello").await?;
                if reply.status == 429 {
                    refused = Some(reply);
                    break;
                }
                reply.expect_status(200)?;
            }
            let refused = refused.with_context(|| format!("{who}: no 429 in 6 calls"))?;
            refused.expect_refusal(429, "rate-limit", "outbound.rate_limit")?;
            Ok(())
        })
        .await?;
    }

    client.shutdown().await;
    let req = Request::get("http://billing/hello").body(Empty::<bytes::Bytes>::new())?;
    ensure!(
        matches!(client.request(req).await, Err(weft_client::Error::ShutDown)),
        "a request after shutdown was answered"
    );
    Ok(())
}

/// The bootstrap file of an app `orders` (its `[service]`) that calls through
/// the in-process client and the control plane at `grpc`.
fn orders_bootstrap(
    dir: &TempDir,
    app: std::net::SocketAddr,
    grpc: &str,
) -> anyhow::Result<std::path::PathBuf> {
    dir.write(
        "weft.toml",
        &Bootstrap::new()
            .app("orders", app)
            .app_id("orders-1")
            .control_plane([grpc.to_owned()])
            .render(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_in_process_client_registers_its_app_only_when_asked() -> anyhow::Result<()> {
    let cp = ControlPlane::dev().lease_ttl("2s").start().await?;
    let grpc = cp.grpc_url();
    let app = Backend::start("orders-app").await?;
    let dir = TempDir::new()?;
    let path = orders_bootstrap(&dir, app.addr(), &grpc)?;

    // Not asked: connected, and for a second after, orders is unknown.
    let plain = weft_client::Client::from_bootstrap(&path).await?;
    ensure!(
        plain.wait_for_control_plane(Duration::from_secs(10)).await,
        "no snapshot"
    );
    for _ in 0..10 {
        let services = cp.weftctl_ok(&["get", "services"]).await?;
        ensure!(
            !services.contains("orders"),
            "registered unasked: {services}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Asked: the app is registered at its own address, and a sidecar's app
    // calls it by name, straight to the app.
    let registered = weft_client::Client::builder(&path)
        .register(true)
        .start()
        .await?;
    let caller = mesh_caller(std::slice::from_ref(&grpc)).await?;
    let http = HttpClient::new(caller.outbound(), Mode::HostHeader);
    eventually(Duration::from_secs(10), || async {
        let reply = http.get("http://orders/hello").await?;
        reply.expect_status(200)?;
        ensure!(
            reply.backend() == Some("orders-app"),
            "{:?}",
            reply.backend()
        );
        Ok(())
    })
    .await?;
    let instances = cp.weftctl_ok(&["get", "instances", "orders"]).await?;
    ensure!(
        instances.contains("orders-1") && instances.contains(&app.addr().to_string()),
        "{instances}"
    );

    // Shutdown deregisters at once (well before the 2 s lease could expire).
    let started = std::time::Instant::now();
    registered.shutdown().await;
    eventually(Duration::from_secs(10), || async {
        let reply = http.get("http://orders/hello").await?;
        ensure!(reply.status != 200, "still answered");
        Ok(())
    })
    .await?;
    ensure!(
        started.elapsed() < Duration::from_millis(1900),
        "deregistration took {:?}",
        started.elapsed()
    );

    // Dropping a registered client (without shutdown) deregisters it too.
    let again = weft_client::Client::builder(&path)
        .register(true)
        .start()
        .await?;
    eventually(Duration::from_secs(10), || async {
        http.get("http://orders/hello").await?.expect_status(200)?;
        Ok(())
    })
    .await?;
    let started = std::time::Instant::now();
    drop(again);
    eventually(Duration::from_secs(10), || async {
        let reply = http.get("http://orders/hello").await?;
        ensure!(reply.status != 200, "still answered");
        Ok(())
    })
    .await?;
    ensure!(
        started.elapsed() < Duration::from_millis(1900),
        "deregistration on drop took {:?}",
        started.elapsed()
    );
    plain.shutdown().await;
    Ok(())
}
