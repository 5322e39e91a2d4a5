//! Scenario: traffic splits by instance metadata, and zone locality.
//!
//! `[[splits]] subset = { version = "v2" } weight = 10` sends 10% of requests
//! to the endpoints whose metadata matches, the rest to those matching no
//! split; a side with no endpoint gives its share to the other. With
//! `outbound.locality.prefer_zone` (the default) a caller whose own
//! `[service] metadata.zone` is z1 sends only to z1 endpoints while at least
//! `min_healthy_percent` (70) of them are healthy, and to every zone once too
//! many are ejected.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;

use anyhow::ensure;
use weft_tests::backend::Backend;
use weft_tests::client::Client;
use weft_tests::config::{Bootstrap, DirService};
use weft_tests::mesh::{caller, caller_with};
use weft_tests::{eventually, get_n, join_all, tally};

/// `total` GETs to `uri`, from `workers` concurrent loops; each must be 200.
/// Returns how many each backend answered.
async fn spread(
    client: &Client,
    uri: &str,
    total: usize,
    workers: usize,
) -> anyhow::Result<BTreeMap<String, usize>> {
    let tasks = (0..workers)
        .map(|_| {
            let (client, uri) = (client.clone(), uri.to_owned());
            tokio::spawn(async move { get_n(&client, &uri, total / workers).await })
        })
        .collect();
    let replies: Vec<_> = join_all(tasks).await?.into_iter().flatten().collect();
    Ok(tally(&replies))
}

const V1: &[(&str, &str)] = &[("zone", "z1"), ("version", "v1")];
const V2: &[(&str, &str)] = &[("zone", "z1"), ("version", "v2")];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_split_sends_its_weight_to_the_matching_subset() -> anyhow::Result<()> {
    let (a, b, c) = (
        Backend::start("v1-a").await?,
        Backend::start("v1-b").await?,
        Backend::start("v2").await?,
    );
    let proxy = caller(
        DirService::new("billing")
            .endpoint_with(a.addr(), V1)
            .endpoint_with(b.addr(), V1)
            .endpoint_with(c.addr(), V2),
        "[[splits]]\nsubset = { version = \"v2\" }\nweight = 10",
    )
    .await?;
    let client = Client::absolute(proxy.outbound());

    let counts = spread(&client, "http://billing/", 2000, 8).await?;
    let to_v2 = counts.get("v2").copied().unwrap_or(0);
    // 10% of 2000 is 200; the binomial spread is about 13, so 120..=280 is ±6σ.
    ensure!(
        (120..=280).contains(&to_v2),
        "v2 got {to_v2} of 2000 requests, want about 10%: {counts:?}"
    );
    ensure!(
        counts.get("v1-a").is_some_and(|n| *n > 500)
            && counts.get("v1-b").is_some_and(|n| *n > 500),
        "the other 90% is balanced over both v1 endpoints: {counts:?}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_split_side_without_endpoints_gives_its_share_to_the_other() -> anyhow::Result<()> {
    let split = "[[splits]]\nsubset = { version = \"v2\" }\nweight = 10";

    // No v2 endpoint: everything goes to v1.
    let v1 = Backend::start("v1").await?;
    let proxy = caller(
        DirService::new("billing").endpoint_with(v1.addr(), V1),
        split,
    )
    .await?;
    let client = Client::absolute(proxy.outbound());
    get_n(&client, "http://billing/", 50).await?;
    ensure!(v1.requests() == 50, "v1 saw {}", v1.requests());
    drop(proxy);

    // Only v2 endpoints: everything goes to v2.
    let v2 = Backend::start("v2").await?;
    let proxy = caller(
        DirService::new("billing").endpoint_with(v2.addr(), V2),
        split,
    )
    .await?;
    let client = Client::absolute(proxy.outbound());
    get_n(&client, "http://billing/", 50).await?;
    ensure!(v2.requests() == 50, "v2 saw {}", v2.requests());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn locality_keeps_traffic_in_the_callers_zone_until_too_few_are_healthy() -> anyhow::Result<()>
{
    let near = [Backend::start("z1-a").await?, Backend::start("z1-b").await?];
    let far = [Backend::start("z2-a").await?, Backend::start("z2-b").await?];
    let own_app = Backend::start("checkout").await?;
    let mut billing = DirService::new("billing");
    for backend in &near {
        billing = billing.endpoint_with(backend.addr(), &[("zone", "z1")]);
    }
    for backend in &far {
        billing = billing.endpoint_with(backend.addr(), &[("zone", "z2")]);
    }
    let proxy = caller_with(
        Bootstrap::new()
            .app("checkout", own_app.addr())
            .app_metadata(&[("zone", "z1")]),
        billing,
        "[outbound]\n\
         load_balancer = \"round-robin\"\n\
         retry = { attempts = 0 }\n\
         outlier = { consecutive_failures = 2, ejection = \"30s\" }\n",
    )
    .await?;
    let client = Client::absolute(proxy.outbound());
    let far_requests = || far.iter().map(Backend::requests).sum::<usize>();

    let counts = tally(&get_n(&client, "http://billing/", 40).await?);
    ensure!(
        far_requests() == 0 && counts.len() == 2,
        "with z1 healthy, only z1 endpoints get traffic: {counts:?}"
    );

    // One of the two z1 endpoints fails and is ejected: 50% healthy < 70%.
    near[0].set_status(Some(500));
    let admin = proxy.admin_client();
    eventually(std::time::Duration::from_secs(10), || {
        let (admin, client) = (admin.clone(), client.clone());
        let addr = near[0].addr();
        async move {
            if admin.endpoints().await?.ejected("billing")?.contains(&addr) {
                return Ok(());
            }
            client.get("http://billing/").await?;
            anyhow::bail!("z1-a is not ejected yet")
        }
    })
    .await?;
    let counts = tally(&get_n(&client, "http://billing/", 30).await?);
    ensure!(
        far_requests() >= 10 && !counts.contains_key("z1-a"),
        "with z1 below min_healthy_percent, traffic spills to z2: {counts:?}"
    );
    Ok(())
}
