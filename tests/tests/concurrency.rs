//! Scenario: concurrency caps bound what is in flight and refuse the excess at
//! once (or after a bounded queue wait), with a 503 that names the cap.
//!
//! Backends answer `/hold` only when the test releases them, so "in flight" is
//! a state the test controls rather than a race against a timer: the refusals
//! must all come back while the admitted requests are still held, which is
//! what "answered at once, never queued" means. A caller's sidecar enforces
//! `outbound.endpoint_max_concurrency` per endpoint and skips a saturated
//! endpoint when balancing (refusing only when every endpoint is saturated);
//! the service's own sidecar enforces `inbound.max_concurrency`, optionally
//! with a bounded `queue`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use anyhow::{Context as _, ensure};
use tokio::task::JoinHandle;
use weft_tests::backend::Backend;
use weft_tests::client::{Client, Reply};
use weft_tests::config::DirService;
use weft_tests::mesh::{callee, caller};
use weft_tests::{eventually, join_all, timed, within};

type Timed = (Reply, Duration);

/// Starts `count` concurrent `GET uri`, each timed from its own start.
fn spawn_gets(client: &Client, uri: &str, count: usize) -> Vec<JoinHandle<anyhow::Result<Timed>>> {
    (0..count)
        .map(|_| {
            let (client, uri) = (client.clone(), uri.to_owned());
            tokio::spawn(async move {
                let (reply, elapsed) = timed(client.get(&uri)).await;
                Ok((reply?, elapsed))
            })
        })
        .collect()
}

/// Waits until `refused` of `tasks` have finished while the rest are held, and
/// returns the finished replies; the unfinished tasks stay in `tasks`.
async fn finished_while_held(
    tasks: &mut Vec<JoinHandle<anyhow::Result<Timed>>>,
    refused: usize,
) -> anyhow::Result<Vec<Reply>> {
    eventually(Duration::from_secs(10), || {
        let done = tasks.iter().filter(|t| t.is_finished()).count();
        async move {
            ensure!(
                done >= refused,
                "{done} of the requests answered, want {refused} refused at once"
            );
            Ok(())
        }
    })
    .await?;
    let (done, held): (Vec<_>, Vec<_>) = std::mem::take(tasks)
        .into_iter()
        .partition(|t| t.is_finished());
    *tasks = held;
    Ok(join_all(done)
        .await?
        .into_iter()
        .map(|(reply, _)| reply)
        .collect())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endpoint_max_concurrency_caps_each_endpoint_and_refuses_the_rest_at_once()
-> anyhow::Result<()> {
    let (a, b) = (Backend::start("a").await?, Backend::start("b").await?);
    let proxy = caller(
        DirService::new("billing").endpoints([a.addr(), b.addr()]),
        "[outbound]\nendpoint_max_concurrency = 2\nretry = { attempts = 0 }",
    )
    .await?;
    let client = Client::absolute(proxy.outbound());
    let admin = proxy.admin_client();

    // 12 at once against 2 endpoints x 2: 4 admitted, 8 refused.
    let mut tasks = spawn_gets(&client, "http://billing/hold", 12);
    let refused = finished_while_held(&mut tasks, 8).await?;
    for reply in &refused {
        reply.expect_refusal(503, "concurrency-cap", "outbound.endpoint_max_concurrency")?;
    }
    ensure!(
        tasks.len() == 4,
        "a saturated endpoint must be skipped, not refused while another has room: \
         {} requests admitted",
        tasks.len()
    );
    // The admitted requests took their permits before reaching the backends.
    eventually(Duration::from_secs(5), || async {
        let in_flight = (a.in_flight(), b.in_flight());
        ensure!(in_flight == (2, 2), "in flight (a, b) = {in_flight:?}");
        Ok(())
    })
    .await?;
    let endpoints = admin.endpoints().await?;
    for backend in [&a, &b] {
        let state = endpoints.state("billing", backend.addr())?;
        ensure!(
            state == "saturated",
            "{} is {state:?} with 2 in flight",
            backend.id()
        );
    }
    let counters = endpoints.counters("billing")?;
    ensure!(
        counters.refusals("concurrency-cap")? == 8,
        "billing counters: {counters:?}"
    );

    a.release();
    b.release();
    for (reply, _) in join_all(tasks).await? {
        reply.expect_status(200)?;
    }
    ensure!(
        a.max_in_flight() == 2 && b.max_in_flight() == 2,
        "max in flight: a={} b={} (cap 2)",
        a.max_in_flight(),
        b.max_in_flight()
    );
    // A permit is held until the response body ends, which the proxy may see
    // a moment after the client read it.
    eventually(Duration::from_secs(5), || async {
        admin
            .endpoints()
            .await?
            .expect_active("billing", [a.addr(), b.addr()])
    })
    .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inbound_max_concurrency_caps_what_reaches_the_app() -> anyhow::Result<()> {
    let app = Backend::start("app").await?;
    let proxy = callee("billing", app.addr(), 1, "[inbound]\nmax_concurrency = 2").await?;
    let client = Client::host_header(proxy.inbound());

    let mut tasks = spawn_gets(&client, "http://billing/hold", 8);
    let refused = finished_while_held(&mut tasks, 6).await?;
    for reply in &refused {
        reply.expect_refusal(503, "concurrency-cap", "inbound.max_concurrency")?;
    }
    ensure!(tasks.len() == 2, "{} requests admitted", tasks.len());
    eventually(Duration::from_secs(5), || async {
        ensure!(
            app.in_flight() == 2,
            "{} in flight at the app",
            app.in_flight()
        );
        Ok(())
    })
    .await?;
    // Other requests are refused too while the cap is full.
    client.get("http://billing/").await?.expect_refusal(
        503,
        "concurrency-cap",
        "inbound.max_concurrency",
    )?;

    app.release();
    for (reply, _) in join_all(tasks).await? {
        reply.expect_status(200)?;
    }
    ensure!(
        app.max_in_flight() == 2,
        "the app saw {} at once",
        app.max_in_flight()
    );
    ensure!(
        app.requests() == 2,
        "the app saw {} requests",
        app.requests()
    );
    // With the slots free again (a permit is held until the response body
    // ends, which the proxy may see a moment after the client), requests go
    // through.
    let late_refusals = AtomicUsize::new(0);
    eventually(Duration::from_secs(5), || async {
        let reply = client.get("http://billing/").await?;
        if reply.status != 200 {
            late_refusals.fetch_add(1, Ordering::SeqCst);
            reply.expect_refusal(503, "concurrency-cap", "inbound.max_concurrency")?;
            anyhow::bail!("still refused after every held request finished");
        }
        Ok(())
    })
    .await?;
    let refused = 7 + late_refusals.load(Ordering::SeqCst) as u64;
    let local = proxy.admin_client().endpoints().await?.local_counters()?;
    ensure!(
        local.refusals("concurrency-cap")? == refused,
        "local counters: {local:?}, {refused} refused"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inbound_queue_admits_a_waiter_when_a_slot_frees_and_refuses_after_its_timeout()
-> anyhow::Result<()> {
    const QUEUE_TIMEOUT: Duration = Duration::from_secs(1);
    /// How long a queued request is watched to be still waiting.
    const STILL_WAITING: Duration = Duration::from_millis(300);
    let app = Backend::start("app").await?;
    let proxy = callee(
        "billing",
        app.addr(),
        1,
        "[inbound]\nmax_concurrency = 1\nqueue = { depth = 1, timeout = \"1s\" }",
    )
    .await?;
    let client = Client::host_header(proxy.inbound());
    let app = &app;
    let occupy = |client: &Client| {
        let client = client.clone();
        async move {
            let task = tokio::spawn(async move { client.get("http://billing/hold").await });
            eventually(Duration::from_secs(5), || async {
                ensure!(
                    app.in_flight() == 1,
                    "the holding request has not reached the app"
                );
                Ok(())
            })
            .await?;
            anyhow::Ok(task)
        }
    };

    // A slot frees before the queue timeout: the waiter gets it.
    let holder = occupy(&client).await?;
    let mut waiter = spawn_gets(&client, "http://billing/", 1).pop().unwrap();
    ensure!(
        tokio::time::timeout(STILL_WAITING, &mut waiter)
            .await
            .is_err(),
        "with the only slot taken, a request must wait in the queue, but it was answered at once"
    );
    ensure!(
        app.requests() == 1,
        "the waiter reached the app while the slot was taken"
    );
    app.release();
    within(Duration::from_secs(5), "the holder", holder)
        .await???
        .expect_status(200)?;
    let (reply, _) = within(Duration::from_secs(5), "the waiter", waiter).await???;
    reply
        .expect_status(200)
        .context("a queued request once the slot freed")?;

    // No slot frees in time: the waiter is refused after the queue timeout,
    // and a request finding the queue full is refused at once.
    let holder = occupy(&client).await?;
    let before = app.requests();
    let mut first = spawn_gets(&client, "http://billing/", 1).pop().unwrap();
    let _ = tokio::time::timeout(STILL_WAITING, &mut first).await;
    let second = spawn_gets(&client, "http://billing/", 1).pop().unwrap();
    let mut outcomes = join_all(vec![first, second]).await?;
    outcomes.sort_by_key(|(_, elapsed)| *elapsed);
    for (reply, _) in &outcomes {
        reply.expect_refusal(503, "concurrency-cap", "inbound.max_concurrency")?;
    }
    let (at_once, after_wait) = (outcomes[0].1, outcomes[1].1);
    ensure!(
        at_once < Duration::from_millis(900),
        "with the queue full, a request must be refused at once, took {at_once:?}"
    );
    ensure!(
        after_wait >= QUEUE_TIMEOUT - Duration::from_millis(50),
        "a queued request must wait out the queue timeout ({QUEUE_TIMEOUT:?}), was refused after {after_wait:?}"
    );
    ensure!(
        app.requests() == before,
        "a refused request reached the app"
    );
    app.release();
    within(Duration::from_secs(5), "the holder", holder)
        .await???
        .expect_status(200)?;
    Ok(())
}
