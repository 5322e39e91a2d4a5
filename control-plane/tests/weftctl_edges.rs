//! Black-box tests of `weftctl edges` and `weftctl top` against a real mesh:
//! a `--dev` control plane, registered sidecars of billing and ledger with
//! mTLS, caller sidecars `web` and `cron` sending steady traffic, and the
//! real `weftctl` binary scraping the registered sidecars' `/metrics`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use anyhow::{Context, ensure};
use serde_json::Value;
use tokio::task::JoinHandle;
use weft_tests::client::Client;
use weft_tests::eventually;
use weft_tests::mesh::Mesh;

/// How long the traffic's numbers may take to show.
const WITHIN: Duration = Duration::from_secs(30);

/// Requests sent in a loop until dropped.
struct Traffic(Vec<JoinHandle<()>>);

impl Traffic {
    /// Every `(client, uri)` gets a request every 10 ms.
    fn start(targets: Vec<(Client, &'static str)>) -> Self {
        Self(
            targets
                .into_iter()
                .map(|(client, uri)| {
                    tokio::spawn(async move {
                        loop {
                            let _ = client.get(uri).await;
                            tokio::time::sleep(Duration::from_millis(10)).await;
                        }
                    })
                })
                .collect(),
        )
    }
}

impl Drop for Traffic {
    fn drop(&mut self) {
        for task in &self.0 {
            task.abort();
        }
    }
}

fn rows<'a>(doc: &'a Value, key: &str) -> anyhow::Result<&'a Vec<Value>> {
    doc[key]
        .as_array()
        .with_context(|| format!("no {key} in {doc}"))
}

/// The row of `caller -> service` in `weftctl edges -o json`.
fn edge<'a>(doc: &'a Value, caller: &str, service: &str) -> anyhow::Result<&'a Value> {
    rows(doc, "edges")?
        .iter()
        .find(|r| r["caller"] == caller && r["service"] == service)
        .with_context(|| format!("no edge {caller} -> {service} in {doc}"))
}

fn busy_and_healthy(row: &Value) -> anyhow::Result<()> {
    ensure!(row["rps"].as_f64().unwrap_or(0.0) > 0.0, "{row}");
    ensure!(row["success_rate"] == 1.0, "{row}");
    ensure!(row["p99_seconds"].as_f64().is_some(), "{row}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn edges_and_top_show_live_traffic_between_real_sidecars() -> anyhow::Result<()> {
    let mesh = Mesh::builder()
        .mtls()
        .service("billing", 1)
        .service("ledger", 1)
        .callers_named(&["web", "cron"])
        .build()
        .await?;
    let via = |i: usize| Client::host_header(mesh.callers[i].outbound());
    let _traffic = Traffic::start(vec![
        (via(0), "http://billing/charge"),
        (via(0), "http://ledger/entries"),
        (via(1), "http://billing/charge"),
    ]);
    let cp = mesh.control_plane();

    // Every edge, the callee's view, callers known by their certificates.
    let doc = eventually(WITHIN, || async {
        let out = cp
            .weftctl_ok(&["edges", "--interval", "1s", "-o", "json"])
            .await?;
        let doc: Value = serde_json::from_str(&out)?;
        for (caller, service) in [("web", "billing"), ("cron", "billing"), ("web", "ledger")] {
            busy_and_healthy(edge(&doc, caller, service)?)?;
        }
        Ok(doc)
    })
    .await?;
    // cron called ledger only while the mesh was built: an edge with no
    // traffic in the interval.
    let idle = edge(&doc, "cron", "ledger")?;
    ensure!(
        idle["rps"] == 0.0 && idle["success_rate"].is_null(),
        "{idle}"
    );
    ensure!(rows(&doc, "edges")?.len() == 4, "{doc}");
    ensure!(doc["sidecars"] == 2, "billing's and ledger's: {doc}");
    ensure!(rows(&doc, "unreachable")?.is_empty(), "{doc}");

    // Into one service; and the table.
    let doc: Value = serde_json::from_str(
        &cp.weftctl_ok(&["edges", "billing", "--interval", "500ms", "-o", "json"])
            .await?,
    )?;
    ensure!(
        rows(&doc, "edges")?
            .iter()
            .all(|r| r["service"] == "billing"),
        "{doc}"
    );
    let table = eventually(WITHIN, || async {
        let out = cp.weftctl_ok(&["edges", "--interval", "500ms"]).await?;
        let lines: Vec<Vec<&str>> = out
            .lines()
            .map(|l| l.split_whitespace().collect())
            .collect();
        ensure!(
            lines.first().map(Vec::as_slice)
                == Some(&["CALLER", "SERVICE", "RPS", "SUCCESS", "P99"][..]),
            "{out}"
        );
        ensure!(
            lines
                .iter()
                .any(|l| l.len() == 5 && l[0] == "cron" && l[1] == "billing" && l[3] == "100.00%"),
            "{out}"
        );
        Ok(out)
    })
    .await?;
    ensure!(
        table.lines().count() == 5,
        "a header and four edges: {table}"
    );

    // top: the busiest routes first (billing gets twice ledger's traffic).
    let doc = eventually(WITHIN, || async {
        let out = cp
            .weftctl_ok(&["top", "--once", "--interval", "1s", "-o", "json"])
            .await?;
        let doc: Value = serde_json::from_str(&out)?;
        let routes = rows(&doc, "routes")?;
        ensure!(routes.len() == 2, "{doc}");
        ensure!(routes[0]["service"] == "billing", "{doc}");
        ensure!(routes[1]["service"] == "ledger", "{doc}");
        for row in routes {
            ensure!(row["route"] == "", "{row}");
            busy_and_healthy(row)?;
        }
        Ok(doc)
    })
    .await?;
    ensure!(rows(&doc, "unreachable")?.is_empty(), "{doc}");
    let out = cp
        .weftctl_ok(&["top", "--once", "--interval", "500ms", "-n", "1"])
        .await?;
    let lines: Vec<&str> = out.lines().collect();
    ensure!(lines.len() == 2, "a header and one route: {out}");
    let header: Vec<&str> = lines[0].split_whitespace().collect();
    ensure!(
        header == ["SERVICE", "ROUTE", "RPS", "SUCCESS", "P50", "P99"],
        "{out}"
    );
    ensure!(
        lines[1].starts_with("billing") && lines[1].contains("(none)"),
        "{out}"
    );
    ensure!(
        !out.contains('\x1b'),
        "no ANSI codes when stdout is not a terminal"
    );
    Ok(())
}
