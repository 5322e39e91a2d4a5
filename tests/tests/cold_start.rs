//! Scenario: calls held while a service scales from zero (`outbound.cold_start`).
//!
//! A real control plane knows service `lazy` by its policy alone: no
//! instance is registered. A burst of 20 concurrent calls through a caller's
//! sidecar is held (not refused), the activator (an HTTP server of the test
//! that counts its calls) is told once, and 2 s later an instance of `lazy`
//! registers (an app behind its own sidecar): every call is answered 200 by
//! it, and the held gauge is back at 0.
//!
//! Then the bounds, on a service that never gets an instance (and whose
//! activator does not answer: counted, and harmless): a caller that hangs
//! up frees its place, held calls are answered `503
//! cold-start-timeout` (`outbound.cold_start.hold`) after `hold` and well
//! within a margin, and a call past `queue` is refused at once
//! (`outbound.cold_start.queue`).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use anyhow::{Context, ensure};
use tokio::time::Instant;
use weft_tests::backend::Backend;
use weft_tests::client::Client;
use weft_tests::eventually;
use weft_tests::mesh::Mesh;
use weft_tests::process::{Proxy, TempDir};

/// Applies `policy_body` as `service`'s policy with `weftctl apply --create`.
async fn apply(mesh: &Mesh, dir: &TempDir, service: &str, policy_body: &str) -> anyhow::Result<()> {
    let file = dir.write(
        &format!("{service}.toml"),
        &format!("service = \"{service}\"\n\n{policy_body}"),
    )?;
    mesh.control_plane()
        .weftctl_ok(&["apply", "--create", "-f", file.to_str().context("path")?])
        .await?;
    Ok(())
}

/// `weft_cold_start_held{service}` on `caller`'s `/metrics`.
async fn held(caller: &Proxy, service: &str) -> anyhow::Result<f64> {
    let scrape = caller.admin_client().metrics().await?;
    scrape.value("weft_cold_start_held", &[("service", service)])
}

/// Waits until `caller` holds `want` calls to `service`.
async fn until_held(caller: &Proxy, service: &str, want: f64) -> anyhow::Result<()> {
    eventually(Duration::from_secs(10), || async {
        let now = held(caller, service).await?;
        ensure!(now == want, "{now} calls held, want {want}");
        Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_waits_for_the_first_instance_and_the_activator_is_called_once()
-> anyhow::Result<()> {
    let mut mesh = Mesh::builder().etcd().build().await?;
    let activator = Backend::start("activator").await?;
    let dir = TempDir::new()?;
    apply(
        &mesh,
        &dir,
        "lazy",
        &format!(
            "[outbound]\ncold_start = {{ hold = \"20s\", queue = 50, activate = \"http://{}/activate\" }}\n",
            activator.addr()
        ),
    )
    .await?;

    let client = mesh.client();
    let burst: Vec<_> = (0..20)
        .map(|i| {
            let client = client.clone();
            tokio::spawn(async move { client.get(&format!("http://lazy/call/{i}")).await })
        })
        .collect();
    let caller = mesh.caller();
    until_held(caller, "lazy", 20.0).await?;
    ensure!(
        burst.iter().all(|call| !call.is_finished()),
        "no call answered before an instance exists"
    );
    eventually(Duration::from_secs(5), || async {
        ensure!(
            activator.requests() == 1,
            "{} activator calls",
            activator.requests()
        );
        Ok(())
    })
    .await?;

    // The platform takes its time; then the first instance registers.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let id = mesh.add_instance("lazy").await?;
    for call in burst {
        let reply = call.await??;
        reply.expect_status(200)?;
        ensure!(
            reply.backend() == Some(id.as_str()),
            "{:?}",
            reply.backend()
        );
    }

    let seen = activator.seen();
    ensure!(
        seen.len() == 1,
        "the activator was called {} times",
        seen.len()
    );
    let call = &seen[0];
    ensure!(call.method == http::Method::POST, "{}", call.method);
    ensure!(call.path == "/activate", "{}", call.path);
    ensure!(
        call.headers
            .get("weft-service")
            .and_then(|v| v.to_str().ok())
            == Some("lazy"),
        "{:?}",
        call.headers
    );

    let scrape = mesh.caller().admin_client().metrics().await?;
    let value = |name: &str, labels: &[(&str, &str)]| scrape.value(name, labels);
    ensure!(value("weft_cold_start_held", &[("service", "lazy")])? == 0.0);
    ensure!(
        value(
            "weft_cold_start_total",
            &[("service", "lazy"), ("outcome", "released")]
        )? == 20.0
    );
    for outcome in ["timeout", "overflow"] {
        ensure!(
            value(
                "weft_cold_start_total",
                &[("service", "lazy"), ("outcome", outcome)]
            )? == 0.0,
            "{outcome}"
        );
    }
    ensure!(
        value(
            "weft_activator_calls_total",
            &[("service", "lazy"), ("outcome", "success")]
        )? == 1.0
    );
    // With an instance, calls are not held (nor counted) any more.
    client.get("http://lazy/again").await?.expect_status(200)?;
    ensure!(held(mesh.caller(), "lazy").await? == 0.0);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_an_instance_held_calls_time_out_and_the_queue_overflows() -> anyhow::Result<()> {
    const HOLD: Duration = Duration::from_secs(3);
    let mesh = Mesh::builder().build().await?;
    let dir = TempDir::new()?;
    // An activator nobody answers: its failure is counted, the calls are
    // held as usual.
    let activator = weft_tests::closed_port()?;
    apply(
        &mesh,
        &dir,
        "sleepy",
        &format!(
            "[outbound]\ncold_start = {{ hold = \"3s\", queue = 3, activate = \"http://{activator}/up\" }}\n"
        ),
    )
    .await?;
    let client = mesh.client();

    // A caller that hangs up while held gives its place back.
    let gone = {
        let client = client.clone();
        tokio::spawn(async move { client.get("http://sleepy/gone").await })
    };
    until_held(mesh.caller(), "sleepy", 1.0).await?;
    gone.abort();
    until_held(mesh.caller(), "sleepy", 0.0).await?;

    let started = Instant::now();
    let held_calls: Vec<_> = (0..3)
        .map(|_| {
            let client: Client = client.clone();
            tokio::spawn(async move {
                let reply = client.get("http://sleepy/wait").await;
                (reply, started.elapsed())
            })
        })
        .collect();
    until_held(mesh.caller(), "sleepy", 3.0).await?;

    // The queue is full: one more is refused at once (long before `hold`).
    let (reply, took) = weft_tests::timed(client.get("http://sleepy/more")).await;
    reply?.expect_refusal(503, "cold-start-timeout", "outbound.cold_start.queue")?;
    ensure!(took < HOLD / 2, "the overflow waited {took:?}");

    for call in held_calls {
        let (reply, took) = call.await?;
        reply?.expect_refusal(503, "cold-start-timeout", "outbound.cold_start.hold")?;
        // `started` is before the call was sent: at least `hold`, plus the
        // first call's subscription to the control plane and a margin.
        ensure!(
            took >= HOLD && took < HOLD + Duration::from_secs(5),
            "answered after {took:?}"
        );
    }
    let scrape = mesh.caller().admin_client().metrics().await?;
    for (outcome, want) in [("timeout", 3.0), ("overflow", 1.0), ("released", 0.0)] {
        let have = scrape.value(
            "weft_cold_start_total",
            &[("service", "sleepy"), ("outcome", outcome)],
        )?;
        ensure!(have == want, "{outcome}: {have}, want {want}");
    }
    ensure!(held(mesh.caller(), "sleepy").await? == 0.0);
    // /endpoints counts the four refusals under their reason.
    let counters = mesh.caller().admin_client().endpoints().await?;
    let refused = counters
        .counters("sleepy")?
        .refusals("cold-start-timeout")?;
    ensure!(
        refused == 4,
        "/endpoints counts {refused} cold-start-timeout refusals"
    );
    let activator_calls = |outcome| {
        scrape.value(
            "weft_activator_calls_total",
            &[("service", "sleepy"), ("outcome", outcome)],
        )
    };
    ensure!(
        activator_calls("failure")? >= 1.0,
        "the failed activator call is counted"
    );
    ensure!(activator_calls("success")? == 0.0);
    Ok(())
}
