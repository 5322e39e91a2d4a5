//! Scenario: hedged requests cut a slow tail.
//!
//! Two instances of `billing`, one with a slow tail (every 5th request it
//! receives answers 1s late), behind a caller's sidecar that balances
//! round-robin. With `hedge = { after = "50ms" }` on the route, a request
//! stuck on the slow answer gets a second try on the other instance after
//! 50ms, which answers first: no request takes anywhere near the second, and
//! `weft_hedges_total` counts hedges sent and won. Without the key, the slow
//! answers stay slow. The bounds compare against the 1s tail, not against
//! the fast path, so a loaded machine does not make them flaky.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use anyhow::ensure;
use weft_tests::backend::Backend;
use weft_tests::client::Client;
use weft_tests::config::DirService;
use weft_tests::mesh::caller;
use weft_tests::process::Proxy;
use weft_tests::timed;

/// The late answers of the slow instance.
const TAIL: Duration = Duration::from_secs(1);
const REQUESTS: usize = 20;

/// Two instances, the first with a slow tail, behind a caller whose policy
/// has `route`'s extra keys.
async fn setup(route: &str) -> anyhow::Result<(Proxy, Backend, Backend)> {
    let slow = Backend::start("slow").await?;
    slow.set_slow_every(5, TAIL);
    let fast = Backend::start("fast").await?;
    let proxy = caller(
        DirService::new("billing").endpoints([slow.addr(), fast.addr()]),
        &format!(
            "[outbound]\n\
             load_balancer = \"round-robin\"\n\
             retry_budget = {{ ratio = 1.0, min_per_second = 1000 }}\n\
             [[routes]]\n\
             name = \"all\"\n\
             {route}\n"
        ),
    )
    .await?;
    Ok((proxy, slow, fast))
}

/// The durations of `REQUESTS` sequential GETs, each answered 200.
async fn durations(proxy: &Proxy) -> anyhow::Result<Vec<Duration>> {
    let client = Client::absolute(proxy.outbound());
    let mut took = Vec::new();
    for i in 0..REQUESTS {
        let (reply, elapsed) = timed(client.get("http://billing/")).await;
        let reply = reply?;
        reply
            .expect_status(200)
            .map_err(|e| e.context(format!("request {i}")))?;
        took.push(elapsed);
    }
    Ok(took)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hedges_answer_the_slow_tail_from_the_other_instance() -> anyhow::Result<()> {
    let (proxy, slow, _fast) = setup("hedge = { after = \"50ms\" }").await?;
    let took = durations(&proxy).await?;
    let slowest = took.iter().max().copied().unwrap_or_default();
    ensure!(
        slow.requests() >= REQUESTS / 2,
        "the slow instance got only {} requests",
        slow.requests()
    );
    ensure!(
        slowest < TAIL * 3 / 4,
        "with hedging, the slowest request took {slowest:?} (the tail is {TAIL:?}): {took:?}"
    );
    let metrics = proxy.admin_client().metrics().await?;
    let count = |outcome| {
        metrics.sum(
            "weft_hedges_total",
            &[
                ("service", "billing"),
                ("route", "all"),
                ("outcome", outcome),
            ],
        )
    };
    ensure!(
        count("sent") >= 2.0 && count("won") >= 2.0,
        "every slow answer (at least 2) was hedged and the hedge won: sent {}, won {}, lost {}",
        count("sent"),
        count("won"),
        count("lost")
    );
    ensure!(
        count("won") + count("lost") == count("sent"),
        "each hedge sent ends won or lost: sent {}, won {}, lost {}",
        count("sent"),
        count("won"),
        count("lost")
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_hedging_the_slow_tail_stays_slow() -> anyhow::Result<()> {
    let (proxy, _slow, _fast) = setup("").await?;
    let took = durations(&proxy).await?;
    let slow = took.iter().filter(|d| **d >= TAIL).count();
    ensure!(slow >= 2, "requests of 1s or more: {slow} in {took:?}");
    let metrics = proxy.admin_client().metrics().await?;
    ensure!(
        metrics.sum("weft_hedges_total", &[]) == 0.0,
        "no hedge counted"
    );
    Ok(())
}
