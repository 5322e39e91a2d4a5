//! Scenario: caller authorization on the callee's sidecar (`inbound.allow`,
//! `routes[].allow`, `[tls] default_inbound`).
//!
//! Every sidecar has `[tls]` with a certificate from a throwaway mesh CA, so
//! the callee's sidecar knows each caller by its certificate. A caller that no
//! rule allows gets 403 `weft-reason: denied` naming the key that decided
//! (`weft-limit`), counted in `weft_refusals_total{reason="denied"}`, logged at
//! debug, in the access log and in the inbound span; its request never reaches
//! the app. Policies change who may call live: by reload, and pushed by the
//! control plane.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context as _, bail, ensure};
use serde_json::Value;
use weft_tests::backend::Backend;
use weft_tests::client::{Client, Reply};
use weft_tests::config::{Bootstrap, DirService, policy_file};
use weft_tests::eventually;
use weft_tests::mesh::Mesh;
use weft_tests::otlp::Collector;
use weft_tests::process::{Proxy, Signal, TempDir};
use weft_tests::tls::Pki;

/// billing's sidecar in front of `app`, with `[tls]` plus `tls_keys`, its
/// policy `policy_body`, `[telemetry]` `telemetry` if not empty; debug logs.
async fn billing(
    pki: &Pki,
    app: SocketAddr,
    policy_body: &str,
    tls_keys: &[(&str, &str)],
    telemetry: &str,
) -> anyhow::Result<Proxy> {
    let mut bootstrap = Bootstrap::new()
        .app("billing", app)
        .app_policy("billing.toml")
        .tls("billing", None);
    for (key, value) in tls_keys {
        bootstrap = bootstrap.tls_key(key, value);
    }
    if !telemetry.is_empty() {
        bootstrap = bootstrap.telemetry(telemetry);
    }
    let builder = Proxy::builder(bootstrap.render())
        .file("billing.toml", policy_file("billing", policy_body))
        .log_filter("info,weft_proxy::inbound=debug")
        .arg("--log-format")
        .arg("json");
    pki.files(builder, "billing", &pki.issue("billing"))
        .start()
        .await
}

/// A caller-only sidecar whose certificate says `identity`, calling billing
/// at `billing` over mTLS.
async fn caller(pki: &Pki, identity: &str, billing: SocketAddr) -> anyhow::Result<Proxy> {
    let bootstrap = Bootstrap::new()
        .tls(identity, None)
        .service(DirService::new("billing").tls("mesh").endpoint(billing));
    pki.files(
        Proxy::builder(bootstrap.render()),
        identity,
        &pki.issue(identity),
    )
    .start()
    .await
}

async fn get(caller: &Proxy, path: &str) -> anyhow::Result<Reply> {
    Client::host_header(caller.outbound())
        .get(&format!("http://billing{path}"))
        .await
}

/// `weft_refusals_total{direction="inbound", reason="denied", limit}` on `proxy`.
async fn denied(proxy: &Proxy, limit: &str) -> anyhow::Result<f64> {
    Ok(proxy.admin_client().metrics().await?.sum(
        "weft_refusals_total",
        &[
            ("direction", "inbound"),
            ("service", "billing"),
            ("reason", "denied"),
            ("limit", limit),
        ],
    ))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_listed_callers_reach_the_service() -> anyhow::Result<()> {
    let pki = Pki::new();
    let app = Backend::start("billing-app").await?;
    let collector = Collector::start().await?;
    let telemetry = format!(
        "otlp_endpoint = {:?}\naccess_log = true",
        collector.endpoint()
    );
    let policy = "[inbound]\nallow = [\"web\", \"spiffe://weft.local/service/batch\"]";
    let billing = billing(&pki, app.addr(), policy, &[], &telemetry).await?;
    let web = caller(&pki, "web", billing.inbound()).await?;
    let batch = caller(&pki, "batch", billing.inbound()).await?;
    let orders = caller(&pki, "orders", billing.inbound()).await?;

    // Listed by name and by SPIFFE ID.
    get(&web, "/charge").await?.expect_status(200)?;
    get(&batch, "/charge").await?.expect_status(200)?;
    ensure!(app.requests() == 2);

    // Not listed: 403 from billing's sidecar, passed through by the caller's.
    let reply = get(&orders, "/charge").await?;
    reply.expect_refusal(403, "denied", "inbound.allow")?;
    ensure!(
        reply
            .text()
            .contains("spiffe://weft.local/service/orders may not call billing (inbound.allow)"),
        "{}",
        reply.text()
    );
    ensure!(app.requests() == 2, "the denied request reached the app");
    ensure!(denied(&billing, "inbound.allow").await? == 1.0);
    // Not retried (a 403), and not counted against the endpoint by the caller.
    let scrape = orders.admin_client().metrics().await?;
    ensure!(
        scrape.sum("weft_retries_total", &[]) == 0.0,
        "{}",
        scrape.text
    );
    // /endpoints shows the list and the mesh default.
    let endpoints = billing.admin_client().endpoints().await?;
    ensure!(
        endpoints.0["local"]["allow"]
            == serde_json::json!(["web", "spiffe://weft.local/service/batch"]),
        "{}",
        endpoints.0["local"]
    );
    ensure!(
        endpoints.0["tls"]["default_inbound"] == "allow-meshed",
        "{}",
        endpoints.0["tls"]
    );
    ensure!(
        endpoints.0["local"]["counters"]["refusals"]["denied"] == 1,
        "{}",
        endpoints.0["local"]
    );

    // The inbound span carries the refusal.
    let span = eventually(Duration::from_secs(10), || async {
        collector
            .spans()
            .into_iter()
            .find(|s| s.direction() == Some("inbound") && s.str("weft.reason") == Some("denied"))
            .context("no denied inbound span yet")
    })
    .await?;
    ensure!(span.str("weft.limit") == Some("inbound.allow"), "{span:#?}");
    ensure!(
        span.int("http.response.status_code") == Some(403),
        "{span:#?}"
    );

    // The log (debug) and the access log.
    billing.signal(Signal::Term)?;
    billing.wait_exit(Duration::from_secs(10)).await?;
    let logs = billing.logs();
    let lines = logs
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .collect::<Vec<_>>();
    let denial = lines
        .iter()
        .find(|l| l["message"] == "inbound request denied")
        .with_context(|| format!("no denial in the log:\n{logs}"))?;
    ensure!(denial["level"] == "DEBUG", "{denial}");
    ensure!(denial["limit"] == "inbound.allow", "{denial}");
    ensure!(
        denial["error"]
            .as_str()
            .is_some_and(|e| e.contains("spiffe://weft.local/service/orders")),
        "{denial}"
    );
    let access = lines
        .iter()
        .filter(|l| l["target"] == "weft_access")
        .collect::<Vec<_>>();
    ensure!(access.len() == 3, "access lines: {access:#?}");
    let refused = access
        .iter()
        .find(|l| l["reason"] == "denied")
        .with_context(|| format!("no denied access line: {access:#?}"))?;
    ensure!(refused["status"] == 403, "{refused}");
    ensure!(refused["limit"] == "inbound.allow", "{refused}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_route_allow_list_replaces_the_service_one_for_its_requests() -> anyhow::Result<()> {
    let pki = Pki::new();
    let app = Backend::start("billing-app").await?;
    let policy = "[inbound]\nallow = [\"web\"]\n\n\
                  [[routes]]\nname = \"admin\"\nmatch = { path_prefix = \"/admin\" }\nallow = [\"ops\"]\n\n\
                  [[routes]]\nname = \"health\"\nmatch = { path = \"/health\" }\nallow = [\"web\", \"ops\", \"monitor\"]\n\n\
                  [[routes]]\nname = \"closed\"\nmatch = { path_prefix = \"/closed\" }\nallow = []";
    let billing = billing(&pki, app.addr(), policy, &[], "").await?;
    let web = caller(&pki, "web", billing.inbound()).await?;
    let ops = caller(&pki, "ops", billing.inbound()).await?;
    let monitor = caller(&pki, "monitor", billing.inbound()).await?;

    // The route's list, narrower than the service's...
    get(&web, "/admin/users")
        .await?
        .expect_refusal(403, "denied", "routes.admin.allow")?;
    get(&ops, "/admin/users").await?.expect_status(200)?;
    // ...or wider.
    get(&monitor, "/health").await?.expect_status(200)?;
    get(&web, "/health").await?.expect_status(200)?;
    // An empty list allows nobody.
    get(&web, "/closed")
        .await?
        .expect_refusal(403, "denied", "routes.closed.allow")?;
    // Other requests: the service's list.
    get(&web, "/charge").await?.expect_status(200)?;
    get(&ops, "/charge")
        .await?
        .expect_refusal(403, "denied", "inbound.allow")?;
    get(&monitor, "/charge")
        .await?
        .expect_refusal(403, "denied", "inbound.allow")?;
    ensure!(app.requests() == 4, "{} requests", app.requests());
    let scrape = billing.admin_client().metrics().await?;
    let routed = scrape.sum(
        "weft_refusals_total",
        &[("route", "admin"), ("reason", "denied")],
    );
    ensure!(routed == 1.0, "{}", scrape.text);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_mesh_default_deny_applies_until_a_reloaded_policy_allows() -> anyhow::Result<()> {
    let pki = Pki::new();
    let app = Backend::start("billing-app").await?;
    let billing = billing(
        &pki,
        app.addr(),
        "[inbound]\nallow_plaintext = true",
        &[("default_inbound", "\"deny\"")],
        "",
    )
    .await?;
    let web = caller(&pki, "web", billing.inbound()).await?;

    // The policy says nothing: the bootstrap's default denies, mTLS or not.
    get(&web, "/a")
        .await?
        .expect_refusal(403, "denied", "tls.default_inbound")?;
    let plain = Client::host_header(billing.inbound());
    plain
        .get("http://billing/a")
        .await?
        .expect_refusal(403, "denied", "tls.default_inbound")?;
    ensure!(app.requests() == 0);
    ensure!(denied(&billing, "tls.default_inbound").await? == 2.0);

    // A reloaded policy lists web: allowed at once, on the open connection
    // too; a plaintext caller has no identity and stays denied.
    billing.dir().write(
        "billing.toml",
        &policy_file(
            "billing",
            "[inbound]\nallow_plaintext = true\nallow = [\"web\"]",
        ),
    )?;
    billing.admin_client().reload().await?.expect_status(200)?;
    get(&web, "/b").await?.expect_status(200)?;
    plain
        .get("http://billing/b")
        .await?
        .expect_refusal(403, "denied", "inbound.allow")?;

    // Back to no list: denied again.
    billing.dir().write(
        "billing.toml",
        &policy_file("billing", "[inbound]\nallow_plaintext = true"),
    )?;
    billing.admin_client().reload().await?.expect_status(200)?;
    get(&web, "/c")
        .await?
        .expect_refusal(403, "denied", "tls.default_inbound")?;
    ensure!(app.requests() == 1);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_list_plaintext_callers_are_served_and_with_one_denied() -> anyhow::Result<()> {
    let pki = Pki::new();
    let app = Backend::start("billing-app").await?;
    let billing = billing(
        &pki,
        app.addr(),
        "[inbound]\nallow_plaintext = true",
        &[],
        "",
    )
    .await?;
    // The default (allow-meshed): a plaintext caller the listener accepted is served.
    let plain = Client::host_header(billing.inbound());
    plain.get("http://billing/a").await?.expect_status(200)?;
    // With a list, even one naming the service the weft-caller header claims,
    // a caller without a certificate is denied.
    billing.dir().write(
        "billing.toml",
        &policy_file(
            "billing",
            "[inbound]\nallow_plaintext = true\nallow = [\"web\"]",
        ),
    )?;
    billing.admin_client().reload().await?.expect_status(200)?;
    plain
        .get_with("http://billing/b", &[("weft-caller", "web")])
        .await?
        .expect_refusal(403, "denied", "inbound.allow")?;
    ensure!(app.requests() == 1);
    Ok(())
}

/// `weftctl apply` of a policy with `allow` reaches billing's sidecar: the
/// caller it does not list is denied from then on, and allowed again when the
/// list changes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_allow_list_pushed_by_the_control_plane_applies_live() -> anyhow::Result<()> {
    // Both callers reach billing before any list applies.
    let mesh = Mesh::builder()
        .lease_ttl("2s")
        .mtls()
        .service("billing", 1)
        .callers_named(&["web", "orders"])
        .build()
        .await?;
    let (cp, billing) = (mesh.control_plane(), &mesh.instance("billing-1").sidecar);
    let (web, orders) = (&mesh.callers[0], &mesh.callers[1]);

    let dir = TempDir::new()?;
    let apply = |body: &'static str| {
        let path = dir.write("billing.toml", &policy_file("billing", body));
        async move {
            let path = path?;
            cp.weftctl_ok(&["apply", "--create", "-f", path.to_str().context("path")?])
                .await
        }
    };
    apply("[inbound]\nallow = [\"web\"]").await?;
    eventually(Duration::from_secs(5), || async {
        let reply = get(orders, "/hello").await?;
        if reply.status == 200 {
            bail!("orders is still allowed");
        }
        reply.expect_refusal(403, "denied", "inbound.allow")?;
        Ok(())
    })
    .await?;
    get(web, "/hello").await?.expect_status(200)?;
    let local: Value = billing.admin_client().endpoints().await?.0["local"].clone();
    ensure!(local["policy_source"] == "control-plane", "{local}");

    apply("[inbound]\nallow = [\"web\", \"orders\"]").await?;
    eventually(Duration::from_secs(5), || async {
        get(orders, "/hello").await?.expect_status(200)?;
        Ok(())
    })
    .await?;
    Ok(())
}
