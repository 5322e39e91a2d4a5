//! Scenario: bad configuration is caught before use and named precisely.
//!
//! `weft-proxy check` must accept good bootstrap and policy files (exit 0,
//! `ok: FILE`) and refuse bad ones with exit code 1 and an error whose first
//! line is `error: {file}:{line}:{column}: {key.path}: {message}`. The exact
//! wording is pinned by the config crate's golden tests; here we pin the
//! exit code, the location, the key path and a fragment of the message.
//! `weft-proxy run` with a bad file must exit non-zero at once, not serve.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use anyhow::{Context as _, bail, ensure};
use weft_tests::process::{Output, Proxy, TempDir, run_command};

/// Where and what an error's first line says.
#[derive(Debug, PartialEq, Eq)]
struct Located {
    file: String,
    line: u32,
    column: u32,
    key: String,
    message: String,
}

/// Parses `error: {file}:{line}:{column}: {key}: {message}` (file ends in `.toml`).
fn locate(stderr: &str) -> anyhow::Result<Located> {
    let first = stderr.lines().next().unwrap_or_default();
    let rest = first
        .strip_prefix("error: ")
        .with_context(|| format!("stderr does not start with `error: `: {stderr:?}"))?;
    let file_end = rest
        .find(".toml:")
        .with_context(|| format!("no `FILE.toml:` in {first:?}"))?
        + ".toml".len();
    let (file, rest) = rest.split_at(file_end);
    let mut parts = rest[1..].splitn(3, ':');
    let line = parts.next().unwrap_or_default().parse();
    let column = parts.next().unwrap_or_default().parse();
    let (Ok(line), Ok(column)) = (line, column) else {
        bail!("no `:line:column:` after the file in {first:?}");
    };
    let rest = parts.next().unwrap_or_default();
    let rest = rest
        .strip_prefix(' ')
        .with_context(|| format!("no space after the location in {first:?}"))?;
    let (key, message) = rest
        .split_once(": ")
        .with_context(|| format!("no `key.path: message` in {first:?}"))?;
    Ok(Located {
        file: file.to_owned(),
        line,
        column,
        key: key.to_owned(),
        message: message.to_owned(),
    })
}

/// Writes `name` and runs `weft-proxy check --FLAG name` in a fresh directory.
async fn check(
    flag: &str,
    name: &str,
    contents: &str,
    extra: &[(&str, &str)],
) -> anyhow::Result<Output> {
    let dir = TempDir::new()?;
    dir.write(name, contents)?;
    for (extra_name, extra_contents) in extra {
        dir.write(extra_name, extra_contents)?;
    }
    run_command(dir.path(), &["check", flag, name]).await
}

/// Fails unless `output` is a refusal located at `file:line[:column]` on `key`
/// whose message contains `fragment`.
fn expect_refusal(
    output: &Output,
    file: &str,
    line: u32,
    column: Option<u32>,
    key: &str,
    fragment: &str,
) -> anyhow::Result<()> {
    ensure!(
        output.status.code() == Some(1),
        "exit status {} (stdout {:?}, stderr {:?})",
        output.status,
        output.stdout,
        output.stderr
    );
    let located = locate(&output.stderr)?;
    ensure!(
        located.file.ends_with(file),
        "error names file {:?}, want {file}",
        located.file
    );
    ensure!(
        located.line == line,
        "line {} want {line}: {:?}",
        located.line,
        output.stderr
    );
    if let Some(column) = column {
        ensure!(
            located.column == column,
            "column {} want {column}: {:?}",
            located.column,
            output.stderr
        );
    }
    ensure!(
        located.key == key,
        "key path {:?} want {key:?}: {:?}",
        located.key,
        output.stderr
    );
    ensure!(
        !located.message.trim().is_empty(),
        "empty message: {:?}",
        output.stderr
    );
    ensure!(
        located.message.contains(fragment),
        "message {:?} lacks {fragment:?}",
        located.message
    );
    Ok(())
}

const GOOD_BOOTSTRAP: &str = r#"[service]
name = "checkout"
app = "127.0.0.1:8080"

[listen]
outbound = "127.0.0.1:0"
inbound = "127.0.0.1:0"
admin = "127.0.0.1:0"

[drain]
grace = "5s"

[[directory.services]]
name = "billing"
policy = "billing.toml"
protocol = "auto"
endpoints = [ { address = "127.0.0.1:9000", metadata = { zone = "z1", version = "v1" } } ]
"#;

const GOOD_POLICY: &str = r#"service = "billing"

[outbound]
load_balancer = "round-robin"

[[routes]]
name = "default"
match = { path_prefix = "/" }
timeout = "2s"
"#;

#[test]
fn locate_parses_the_contract_example() {
    let located = locate(
        "error: bad.toml:4:11: routes[0].timeout: invalid duration \"2 x\": expected a number\n  |\n",
    )
    .unwrap();
    assert_eq!(
        located,
        Located {
            file: "bad.toml".into(),
            line: 4,
            column: 11,
            key: "routes[0].timeout".into(),
            message: "invalid duration \"2 x\": expected a number".into(),
        }
    );
    assert!(locate("error: something else").is_err());
}

#[tokio::test]
async fn check_accepts_good_bootstrap_and_policy_files() -> anyhow::Result<()> {
    let output = check(
        "--config",
        "weft.toml",
        GOOD_BOOTSTRAP,
        &[("billing.toml", GOOD_POLICY)],
    )
    .await?;
    ensure!(output.status.success(), "check --config: {output:?}");
    let line = output.stdout.trim();
    ensure!(
        line.starts_with("ok: ") && line.ends_with("weft.toml"),
        "stdout {line:?}"
    );

    let output = check("--policy", "billing.toml", GOOD_POLICY, &[]).await?;
    ensure!(output.status.success(), "check --policy: {output:?}");
    let line = output.stdout.trim();
    ensure!(
        line.starts_with("ok: ") && line.ends_with("billing.toml"),
        "stdout {line:?}"
    );
    Ok(())
}

#[tokio::test]
async fn check_refuses_an_unknown_bootstrap_key() -> anyhow::Result<()> {
    let bad = "[listen]\noutbound = \"127.0.0.1:0\"\ninbound = \"127.0.0.1:0\"\nadmin = \"127.0.0.1:0\"\nadmim_port = 9\n";
    let output = check("--config", "bad.toml", bad, &[]).await?;
    // The key path of an unknown key is the table it appeared in, or the key itself.
    let located = locate(&output.stderr)?;
    let key = if located.key == "listen" {
        "listen"
    } else {
        "listen.admim_port"
    };
    expect_refusal(&output, "bad.toml", 5, Some(1), key, "admim_port")
}

#[tokio::test]
async fn check_refuses_a_bad_duration_in_a_policy() -> anyhow::Result<()> {
    // The contract's own example: line 4 is `timeout = "2 x"`, the value starts at column 11.
    let bad = "service = \"billing\"\n\n[[routes]]\ntimeout = \"2 x\"\nname = \"default\"\nmatch = { path_prefix = \"/\" }\n";
    let output = check("--policy", "bad.toml", bad, &[]).await?;
    expect_refusal(
        &output,
        "bad.toml",
        4,
        Some(11),
        "routes[0].timeout",
        "invalid duration \"2 x\"",
    )
}

#[tokio::test]
async fn check_refuses_a_bad_duration_in_the_bootstrap() -> anyhow::Result<()> {
    let bad = "[listen]\noutbound = \"127.0.0.1:0\"\ninbound = \"127.0.0.1:0\"\nadmin = \"127.0.0.1:0\"\n\n[drain]\ngrace = \"soon\"\n";
    let output = check("--config", "bad.toml", bad, &[]).await?;
    expect_refusal(
        &output,
        "bad.toml",
        7,
        Some(9),
        "drain.grace",
        "invalid duration",
    )
}

#[tokio::test]
async fn check_refuses_impossible_values() -> anyhow::Result<()> {
    // A concurrency cap of zero would refuse every request.
    let bad = "service = \"billing\"\n\n[inbound]\nmax_concurrency = 0\n";
    let output = check("--policy", "bad.toml", bad, &[]).await?;
    expect_refusal(
        &output,
        "bad.toml",
        4,
        Some(19),
        "inbound.max_concurrency",
        "",
    )?;

    // A port beyond 65535 is not a socket address.
    let bad = "[listen]\noutbound = \"127.0.0.1:0\"\ninbound = \"127.0.0.1:0\"\nadmin = \"127.0.0.1:70000\"\n";
    let output = check("--config", "bad.toml", bad, &[]).await?;
    expect_refusal(
        &output,
        "bad.toml",
        4,
        Some(9),
        "listen.admin",
        "127.0.0.1:70000",
    )?;

    // An unknown balancer name.
    let bad = "service = \"billing\"\n\n[outbound]\nload_balancer = \"fastest\"\n";
    let output = check("--policy", "bad.toml", bad, &[]).await?;
    expect_refusal(
        &output,
        "bad.toml",
        4,
        Some(17),
        "outbound.load_balancer",
        "fastest",
    )?;

    // Calls held for an hour, and an activator without a URL scheme.
    let bad = "service = \"lazy\"\n\n[outbound]\ncold_start = { hold = \"1h\" }\n";
    let output = check("--policy", "bad.toml", bad, &[]).await?;
    expect_refusal(
        &output,
        "bad.toml",
        4,
        Some(23),
        "outbound.cold_start.hold",
        "at most 5m, found 1h",
    )?;
    let bad = "service = \"lazy\"\n\n[outbound]\ncold_start = { activate = \"activator:8080\" }\n";
    let output = check("--policy", "bad.toml", bad, &[]).await?;
    expect_refusal(
        &output,
        "bad.toml",
        4,
        Some(27),
        "outbound.cold_start.activate",
        "invalid activator URL",
    )
}

#[tokio::test]
async fn check_config_also_checks_the_policy_files_it_names() -> anyhow::Result<()> {
    let bad_policy = "service = \"billing\"\n\n[outbound]\nload_balancer = \"fastest\"\n";
    let output = check(
        "--config",
        "weft.toml",
        GOOD_BOOTSTRAP,
        &[("billing.toml", bad_policy)],
    )
    .await?;
    expect_refusal(
        &output,
        "billing.toml",
        4,
        Some(17),
        "outbound.load_balancer",
        "fastest",
    )
}

#[tokio::test]
async fn check_refuses_a_bad_app_health_check() -> anyhow::Result<()> {
    // A check that may outlast its interval.
    let bad = "[service]\nname = \"billing\"\napp = \"127.0.0.1:8080\"\n\
               health = { path = \"/healthz\", timeout = \"2s\" }\n";
    let output = check("--config", "bad.toml", bad, &[]).await?;
    expect_refusal(
        &output,
        "bad.toml",
        4,
        Some(41),
        "service.health.timeout",
        "is longer than service.health.interval",
    )?;
    let bad = "[service]\nname = \"billing\"\napp = \"127.0.0.1:8080\"\n\
               health = { unhealthy_after = 0 }\n";
    let output = check("--config", "bad.toml", bad, &[]).await?;
    expect_refusal(
        &output,
        "bad.toml",
        4,
        Some(30),
        "service.health.unhealthy_after",
        "from 1 to 100",
    )?;
    let bad = "[control_plane]\naddresses = [\"http://127.0.0.1:8443\"]\nready_timeout = 10\n";
    let output = check("--config", "bad.toml", bad, &[]).await?;
    expect_refusal(
        &output,
        "bad.toml",
        3,
        Some(17),
        "control_plane.ready_timeout",
        "",
    )
}

#[tokio::test]
async fn run_with_a_bad_config_exits_non_zero_at_once() -> anyhow::Result<()> {
    let bad = "[listen]\noutbound = \"127.0.0.1:0\"\ninbound = \"127.0.0.1:0\"\nadmin = \"127.0.0.1:0\"\n\n[drain]\ngrace = \"soon\"\n";
    let proxy = Proxy::builder(bad).spawn()?;
    let status = proxy.wait_exit(Duration::from_secs(5)).await?;
    ensure!(!status.success(), "run with a bad config exited {status}");
    let logs = proxy.logs();
    ensure!(
        logs.contains("drain.grace"),
        "the error should name the key: {logs:?}"
    );
    Ok(())
}
