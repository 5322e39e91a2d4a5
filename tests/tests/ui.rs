//! Scenario: the control plane's web view (`/ui` on its admin listener).
//!
//! It needs a token (an admin one, or a read-only `--ui-token-file` one that
//! opens nothing else), sent as a bearer header, the cookie the login form
//! sets, or `?token=` only with `--ui-allow-query-token`; `--no-ui` turns it
//! off. Against a real mesh under traffic (mTLS, so callers are known by
//! their certificates), with one instance failing until its caller ejects it
//! and a rate limit refusing, headless Chromium loads every page and the
//! rendered DOM shows the services with non-zero rates, the graph's edges,
//! the ejected instance as ejected and the refusals under their reason; a
//! sidecar killed while registered is shown as unreachable; the script
//! refreshes a page in place. Screenshots at a
//! desktop's and a phone's width are saved (`$WEFT_UI_SCREENSHOTS`, else the
//! target's tmp directory).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context as _, ensure};
use weft_tests::browser;
use weft_tests::client::{Client, Reply};
use weft_tests::control_plane::{ControlPlane, TOKEN};
use weft_tests::eventually;
use weft_tests::mesh::Mesh;
use weft_tests::process::{Signal, TempDir};
use weft_tests::traffic::Traffic;

/// A read-only UI token (in the `--ui-token-file`).
const UI_TOKEN: &str = "ui-read-only-token-0123456789";
/// The pace of the background traffic to each service.
const TRAFFIC_EVERY: Duration = Duration::from_millis(10);
/// How long the traffic's effects may take to show.
const WITHIN: Duration = Duration::from_secs(60);
/// How long Chromium may take to load the pages (it starts once per page,
/// slowly on a loaded machine).
const BROWSER_WITHIN: Duration = Duration::from_secs(180);

async fn get(cp: &ControlPlane, path: &str, headers: &[(&str, &str)]) -> anyhow::Result<Reply> {
    Client::absolute(cp.admin())
        .get_with(&format!("{}{path}", cp.admin_url()), headers)
        .await
}

fn bearer(token: &str) -> String {
    format!("Bearer {token}")
}

/// A file holding the UI token, and the `--ui-token-file=` argument naming it.
fn ui_token_file(dir: &TempDir) -> anyhow::Result<String> {
    let path = dir.write("ui-tokens", &format!("# read-only\n{UI_TOKEN}\n"))?;
    Ok(format!("--ui-token-file={}", path.display()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_web_view_needs_a_token_and_can_be_turned_off() -> anyhow::Result<()> {
    let dir = TempDir::new()?;
    let cp = ControlPlane::dev()
        .arg(&ui_token_file(&dir)?)
        .start()
        .await?;

    let denied = get(&cp, "/ui", &[]).await?;
    ensure!(denied.status == 401, "without a token: {}", denied.status);
    ensure!(
        denied.text().contains("/ui/login"),
        "the login form: {}",
        denied.text()
    );
    let wrong = get(
        &cp,
        "/ui",
        &[("authorization", &bearer("not-a-token-at-all"))],
    )
    .await?;
    ensure!(wrong.status == 401, "a wrong token: {}", wrong.status);
    for token in [TOKEN, UI_TOKEN] {
        let page = get(&cp, "/ui", &[("authorization", &bearer(token))]).await?;
        ensure!(page.status == 200, "with a token: {}", page.status);
        ensure!(
            page.header("content-type") == Some("text/html; charset=utf-8"),
            "{:?}",
            page.header("content-type")
        );
        for secret in [TOKEN, UI_TOKEN] {
            ensure!(!page.text().contains(secret), "a token in the page");
        }
    }
    // The read-only token opens the web view only.
    let admin = get(&cp, "/v1/services", &[("authorization", &bearer(UI_TOKEN))]).await?;
    ensure!(
        admin.status == 401,
        "the admin API with the UI token: {}",
        admin.status
    );
    // ?token= only with --ui-allow-query-token.
    let query = get(&cp, &format!("/ui?token={UI_TOKEN}"), &[]).await?;
    ensure!(
        query.status == 401,
        "a query token by default: {}",
        query.status
    );
    // The login form sets the cookie, which then opens the pages.
    let login = Client::absolute(cp.admin())
        .send_with(
            "POST",
            &format!("{}/ui/login", cp.admin_url()),
            &[("content-type", "application/x-www-form-urlencoded")],
            format!("token={UI_TOKEN}"),
        )
        .await?;
    ensure!(login.status == 303, "login: {}", login.status);
    let cookie = login.header("set-cookie").context("login sets a cookie")?;
    ensure!(
        cookie.contains("HttpOnly") && cookie.contains("SameSite=Strict"),
        "{cookie}"
    );
    let pair = cookie.split(';').next().unwrap_or_default().to_owned();
    let page = get(&cp, "/ui/control-plane", &[("cookie", &pair)]).await?;
    ensure!(page.status == 200, "with the cookie: {}", page.status);
    let bad_login = Client::absolute(cp.admin())
        .send_with(
            "POST",
            &format!("{}/ui/login", cp.admin_url()),
            &[("content-type", "application/x-www-form-urlencoded")],
            "token=nope",
        )
        .await?;
    ensure!(bad_login.status == 401 && bad_login.header("set-cookie").is_none());
    // Read-only.
    let post = Client::absolute(cp.admin())
        .send_with(
            "POST",
            &format!("{}/ui", cp.admin_url()),
            &[("authorization", &bearer(TOKEN))],
            "",
        )
        .await?;
    ensure!(post.status == 405, "POST /ui: {}", post.status);

    let off = ControlPlane::dev().arg("--no-ui").start().await?;
    let page = get(&off, "/ui", &[("authorization", &bearer(TOKEN))]).await?;
    ensure!(page.status == 404, "--no-ui: {}", page.status);
    let page = get(&off, "/ui/graph", &[("authorization", &bearer(TOKEN))]).await?;
    ensure!(page.status == 404, "--no-ui: {}", page.status);
    Ok(())
}

/// The value of attribute `attr` in the first tag at or after `marker`.
fn attr_after<'a>(html: &'a str, marker: &str, attr: &str) -> Option<&'a str> {
    let from = html.find(marker)?;
    let tag_end = from + html[from..].find('>')?;
    let tag_start = html[..from].rfind('<')?;
    let tag = &html[tag_start..tag_end];
    let needle = format!("{attr}=\"");
    let at = tag.find(&needle)? + needle.len();
    let len = tag[at..].find('"')?;
    Some(&tag[at..at + len])
}

/// The services page lists `service` with a request rate above zero.
fn busy(html: &str, service: &str) -> anyhow::Result<()> {
    let marker = format!("data-service=\"{service}\" data-rps=");
    let rps: f64 = attr_after(html, &marker, "data-rps")
        .with_context(|| format!("no row for {service}"))?
        .parse()?;
    ensure!(rps > 0.0, "{service}: {rps} rps");
    Ok(())
}

fn check_services(html: &str) -> anyhow::Result<()> {
    busy(html, "billing")?;
    busy(html, "ledger")?;
    let ledger = html
        .find("data-service=\"ledger\" data-rps=")
        .context("no ledger row")?;
    let row = &html[ledger..ledger + html[ledger..].find("</tr>").context("row end")?];
    let refused: f64 = attr_after(row, "data-reason=\"rate-limit\"", "data-count")
        .context("ledger's refusals have no rate-limit")?
        .parse()?;
    ensure!(refused > 0.0, "rate-limit refusals: {refused}");
    Ok(())
}

fn check_graph(html: &str) -> anyhow::Result<()> {
    for service in ["billing", "ledger"] {
        let edge = format!(
            "class=\"edge\" href=\"/ui/services/{service}#callers\" data-caller=\"web\" data-service=\"{service}\""
        );
        ensure!(html.contains(&edge), "no edge web -> {service}");
    }
    Ok(())
}

fn check_billing(html: &str) -> anyhow::Result<()> {
    let state = attr_after(html, "data-instance=\"billing-1\"", "data-state")
        .context("billing-1 is not listed")?;
    ensure!(state == "ejected", "billing-1 is {state}");
    let state = attr_after(html, "data-instance=\"billing-2\"", "data-state")
        .context("billing-2 is not listed")?;
    ensure!(state == "active", "billing-2 is {state}");
    Ok(())
}

fn check_ledger(html: &str) -> anyhow::Result<()> {
    let limit = attr_after(
        html,
        "class=\"refusal-row\" data-reason=\"rate-limit\"",
        "data-limit",
    )
    .context("no rate-limit refusal row")?;
    ensure!(limit == "inbound.rate_limit", "limit key {limit}");
    ensure!(
        html.contains("rate_limit = { per_second = 2"),
        "the policy as applied"
    );
    Ok(())
}

/// Where screenshots go.
fn screenshot_dir() -> anyhow::Result<PathBuf> {
    let dir = std::env::var_os("WEFT_UI_SCREENSHOTS").map_or_else(
        || PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("ui-screenshots"),
        PathBuf::from,
    );
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_web_view_shows_the_mesh_in_a_real_browser() -> anyhow::Result<()> {
    // Fail at once (not after building a mesh) where there is no browser.
    browser::chromium_bin()?;
    let dir = TempDir::new()?;
    let mesh = Mesh::builder()
        .mtls()
        .lease_ttl("30s")
        .service("billing", 2)
        .service("ledger", 1)
        // The caller is a registered instance too: the control plane fetches
        // registered sidecars only (a caller-only sidecar has no registration
        // to name its admin address), so web's view of billing-1 is seen.
        .service("web", 1)
        .callers(0)
        .control_plane_arg(&ui_token_file(&dir)?)
        .control_plane_arg("--ui-allow-query-token")
        .control_plane_arg("--ui-sample-interval=1s")
        .build()
        .await?;
    let cp = mesh.control_plane();
    let billing = dir.write(
        "billing.toml",
        "service = \"billing\"\n\n[outbound]\nload_balancer = \"round-robin\"\n\
         retry = { attempts = 0 }\noutlier = { consecutive_failures = 3, ejection = \"5m\" }\n",
    )?;
    let ledger = dir.write(
        "ledger.toml",
        "service = \"ledger\"\n\n[inbound]\nrate_limit = { per_second = 2, burst = 2 }\n",
    )?;
    for file in [&billing, &ledger] {
        cp.weftctl_ok(&["apply", "-f", file.to_str().context("path")?])
            .await?;
    }
    let web = &mesh.instance("web-1").sidecar;
    let via_web = Client::host_header(web.outbound());
    for service in ["billing", "ledger"] {
        eventually(WITHIN, || async {
            let reply = via_web.get(&format!("http://{service}/hello")).await?;
            reply.expect_status(200)?;
            Ok(())
        })
        .await
        .with_context(|| format!("web reaching {service}"))?;
    }
    mesh.instance("billing-1").app.set_status(Some(500));
    // A request to each every 10 ms until the test ends (dropped).
    let _traffic = [
        Traffic::start(via_web.clone(), "http://billing/charge", TRAFFIC_EVERY),
        Traffic::start(via_web, "http://ledger/entries", TRAFFIC_EVERY),
    ];
    let failing = mesh.instance("billing-1").sidecar.inbound();
    let web = web.admin_client();
    eventually(WITHIN, || async {
        let ejected = web.endpoints().await?.ejected("billing")?;
        ensure!(ejected == [failing].into(), "ejected: {ejected:?}");
        Ok(())
    })
    .await
    .context("web's sidecar ejecting billing-1")?;

    // The server's pages, as a script would read them.
    let auth = bearer(UI_TOKEN);
    let headers = [("authorization", auth.as_str())];
    eventually(WITHIN, || async {
        check_services(&get(cp, "/ui", &headers).await?.text())?;
        check_graph(&get(cp, "/ui/graph", &headers).await?.text())?;
        check_billing(&get(cp, "/ui/services/billing", &headers).await?.text())?;
        check_ledger(&get(cp, "/ui/services/ledger", &headers).await?.text())
    })
    .await
    .context("the pages showing the mesh")?;

    // The same in a real browser.
    let url = |path: &str| format!("{}{path}?token={UI_TOKEN}", cp.admin_url());
    eventually(BROWSER_WITHIN, || async {
        check_services(&browser::dump_dom(&url("/ui")).await?)?;
        check_graph(&browser::dump_dom(&url("/ui/graph")).await?)?;
        check_billing(&browser::dump_dom(&url("/ui/services/billing")).await?)?;
        let ledger = browser::dump_dom(&url("/ui/services/ledger")).await?;
        check_ledger(&ledger)?;
        let control = browser::dump_dom(&url("/ui/control-plane")).await?;
        ensure!(control.contains("Connected sidecars"), "{control}");
        for page in [&ledger, &control] {
            ensure!(
                !page.contains(UI_TOKEN) && !page.contains(TOKEN),
                "a token in a page"
            );
        }
        Ok(())
    })
    .await
    .context("Chromium's DOM of the pages")?;
    // The script refreshes the page's tables in place (every 3 s).
    let refreshed = browser::dump_dom_after(&url("/ui"), 8000).await?;
    ensure!(
        refreshed.contains("data-refreshed=\""),
        "the script did not refresh the page"
    );
    check_services(&refreshed)?;
    let shots = screenshot_dir()?;
    for (path, name, width, height) in [
        ("/ui", "ui-services.png", 1280, 900),
        ("/ui", "ui-services-phone.png", 375, 800),
        ("/ui/graph", "ui-graph.png", 1280, 900),
        ("/ui/services/billing", "ui-service.png", 1280, 900),
        ("/ui/services/billing", "ui-service-phone.png", 375, 800),
    ] {
        browser::screenshot(&url(path), &shots.join(name), width, height).await?;
    }

    // A sidecar that stops answering while still registered is shown as
    // unreachable, not as zeroes.
    let ledger_1 = mesh
        .instances
        .iter()
        .position(|i| i.id == "ledger-1")
        .context("ledger-1")?;
    mesh.instances[ledger_1].sidecar.signal(Signal::Kill)?;
    let cp = mesh.control_plane();
    eventually(WITHIN, || async {
        let page = get(cp, "/ui", &headers).await?.text();
        ensure!(
            page.contains("class=\"sidecar-unreachable\"") && page.contains("ledger/ledger-1"),
            "ledger-1 not shown unreachable"
        );
        Ok(())
    })
    .await?;
    Ok(())
}
