//! Scenario: the proxy's logs follow `--log-format` and the `WEFT_LOG` filter.
//!
//! Logs go to stderr. With `--log-format json` every line must be one JSON
//! object (so log shippers can parse them); `WEFT_LOG` must filter what is
//! written (`error` silences a normal start and request, `info` does not).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use anyhow::{Context as _, ensure};
use weft_tests::backend::Backend;
use weft_tests::client::Client;
use weft_tests::config::{Bootstrap, DirService};
use weft_tests::process::{Proxy, Signal};

fn bootstrap(backend: &Backend) -> String {
    Bootstrap::new()
        .service(DirService::new("billing").endpoint(backend.addr()))
        .render()
}

/// Starts a proxy, sends one request, stops it cleanly, returns its stderr.
async fn logs_of_one_run(proxy: Proxy) -> anyhow::Result<String> {
    Client::absolute(proxy.outbound())
        .get("http://billing/")
        .await?
        .expect_status(200)?;
    proxy.signal(Signal::Term)?;
    proxy.wait_exit(std::time::Duration::from_secs(5)).await?;
    Ok(proxy.logs())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_log_format_writes_one_json_object_per_line() -> anyhow::Result<()> {
    let backend = Backend::start("a").await?;
    let proxy = Proxy::builder(bootstrap(&backend))
        .log_filter("info")
        .arg("--log-format")
        .arg("json")
        .start()
        .await?;
    let logs = logs_of_one_run(proxy).await?;
    let lines: Vec<&str> = logs.lines().filter(|l| !l.trim().is_empty()).collect();
    ensure!(!lines.is_empty(), "nothing was logged at info");
    for line in lines {
        let value: serde_json::Value =
            serde_json::from_str(line).with_context(|| format!("not JSON: {line:?}"))?;
        ensure!(value.is_object(), "not a JSON object: {line:?}");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weft_log_filters_what_is_written() -> anyhow::Result<()> {
    let backend = Backend::start("a").await?;
    let info = Proxy::builder(bootstrap(&backend))
        .log_filter("info")
        .start()
        .await?;
    let info = logs_of_one_run(info).await?;
    ensure!(
        info.contains("INFO"),
        "WEFT_LOG=info wrote no INFO line: {info:?}"
    );

    let quiet = Proxy::builder(bootstrap(&backend))
        .log_filter("error")
        .start()
        .await?;
    let quiet = logs_of_one_run(quiet).await?;
    ensure!(
        !quiet.contains("INFO") && !quiet.contains("WARN"),
        "WEFT_LOG=error still wrote: {quiet:?}"
    );
    Ok(())
}
