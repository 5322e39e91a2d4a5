//! Scenario: the operator examples under `examples/telemetry` stay valid.
//!
//! - Every Grafana dashboard (`grafana/*.json`) parses, declares the
//!   `datasource`, `direction` and `service` variables, and every panel has a
//!   Prometheus datasource and targets with a PromQL expression whose ranges
//!   are Grafana's `$__rate_interval` or `$__range`.
//! - Every expression the dashboards hold, with the template variables filled
//!   in, passes `promtool check rules` (as recording rules in a generated
//!   file: promtool has no checker for a bare expression).
//! - The Prometheus files (`prometheus/*.yml`) pass promtool: `prometheus*.yml`
//!   with `check config`, `*.test.yml` with `test rules` (the alerts' unit
//!   tests), every other file with `check rules`.
//! - Every metric name the dashboards and rules use is in docs/telemetry.md,
//!   and every recorded series they use is recorded by a rules file.
//! - Every alert of the rules files has a unit test in which it fires (a
//!   test of it with a non-empty `exp_alerts`).
//!
//! promtool is required: without it the promtool tests fail and name
//! `scripts/setup`, which installs it. Files are found by walking the
//! directories, so a new dashboard or rules file is covered without touching
//! this test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io::ErrorKind;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context as _, bail, ensure};
use serde_json::{Value, json};
use weft_tests::process::TempDir;

/// What the dashboards' template variables stand for when their expressions
/// are checked. A variable missing here fails the check: add it.
const TEMPLATE_VALUES: &[(&str, &str)] = &[
    ("__rate_interval", "1m"),
    ("__interval", "1m"),
    ("__range", "1h"),
    ("direction", "inbound"),
    ("service", ".*"),
];

/// The range selectors a dashboard expression may use.
const DASHBOARD_RANGES: &[&str] = &["$__rate_interval", "$__range"];

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the tests crate sits in the workspace root")
        .to_owned()
}

fn telemetry_dir() -> PathBuf {
    workspace_root().join("examples").join("telemetry")
}

/// The files directly in `dir` whose name satisfies `wanted`, sorted.
fn files_in(dir: &Path, wanted: &dyn Fn(&str) -> bool) -> anyhow::Result<Vec<PathBuf>> {
    let mut found = Vec::new();
    for entry in fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let path = entry?.path();
        if path.is_file()
            && path
                .file_name()
                .and_then(|n| n.to_str())
                .is_some_and(wanted)
        {
            found.push(path);
        }
    }
    found.sort();
    Ok(found)
}

fn file_name(path: &Path) -> &str {
    path.file_name().and_then(|n| n.to_str()).unwrap_or("")
}

fn dashboards() -> anyhow::Result<Vec<(PathBuf, Value)>> {
    let files = files_in(&telemetry_dir().join("grafana"), &|n| n.ends_with(".json"))?;
    ensure!(!files.is_empty(), "no dashboard found");
    files
        .into_iter()
        .map(|path| {
            let text = fs::read_to_string(&path)?;
            let json = serde_json::from_str(&text)
                .with_context(|| format!("parsing {}", path.display()))?;
            Ok((path, json))
        })
        .collect()
}

/// The Prometheus files, as (configs, rules, rule tests).
fn prometheus_files() -> anyhow::Result<(Vec<PathBuf>, Vec<PathBuf>, Vec<PathBuf>)> {
    let all = files_in(&telemetry_dir().join("prometheus"), &|n| {
        n.ends_with(".yml")
    })?;
    let (configs, rest): (Vec<_>, Vec<_>) = all
        .into_iter()
        .partition(|p| file_name(p).starts_with("prometheus"));
    let (tests, rules): (Vec<_>, Vec<_>) = rest
        .into_iter()
        .partition(|p| file_name(p).ends_with(".test.yml"));
    ensure!(
        !configs.is_empty() && !rules.is_empty() && !tests.is_empty(),
        "expected Prometheus configs, rules and rule tests, found {configs:?} {rules:?} {tests:?}"
    );
    Ok((configs, rules, tests))
}

/// Every panel of a dashboard, rows' nested panels included, rows excluded.
fn panels(dashboard: &Value) -> Vec<&Value> {
    fn walk<'a>(list: &'a Value, out: &mut Vec<&'a Value>) {
        for panel in list.as_array().into_iter().flatten() {
            if let Some(nested) = panel.get("panels") {
                walk(nested, out);
            }
            if panel["type"] != "row" {
                out.push(panel);
            }
        }
    }
    let mut out = Vec::new();
    walk(&dashboard["panels"], &mut out);
    out
}

/// A dashboard expression and where it comes from.
struct Expr {
    place: String,
    expr: String,
}

fn dashboard_exprs(path: &Path, dashboard: &Value) -> Vec<Expr> {
    let mut exprs = Vec::new();
    for panel in panels(dashboard) {
        for target in panel["targets"].as_array().into_iter().flatten() {
            if let Some(expr) = target["expr"].as_str() {
                exprs.push(Expr {
                    place: format!(
                        "{} panel {} {:?} target {}",
                        file_name(path),
                        panel["id"],
                        panel["title"].as_str().unwrap_or(""),
                        target["refId"].as_str().unwrap_or("?")
                    ),
                    expr: expr.to_owned(),
                });
            }
        }
    }
    exprs
}

fn variable<'a>(dashboard: &'a Value, name: &str) -> anyhow::Result<&'a Value> {
    dashboard["templating"]["list"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|v| v["name"] == name)
        .with_context(|| format!("no template variable `{name}`"))
}

/// `expr` with its string literals blanked out (kept as `""`), so that label
/// values are not mistaken for names or ranges.
fn without_strings(expr: &str) -> String {
    let mut out = String::with_capacity(expr.len());
    let mut chars = expr.chars();
    while let Some(c) = chars.next() {
        if matches!(c, '"' | '\'' | '`') {
            out.push('"');
            while let Some(inner) = chars.next() {
                if inner == '\\' && c != '`' {
                    chars.next();
                } else if inner == c {
                    break;
                }
            }
            out.push('"');
        } else {
            out.push(c);
        }
    }
    out
}

/// The Weft metric and recorded-series names `text` mentions: identifiers
/// starting with `weft_`, `weft:` or `process_`.
fn metric_names(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut chars = text.char_indices().peekable();
    while let Some((start, c)) = chars.next() {
        let ident_start = c.is_ascii_alphabetic() || c == '_' || c == ':';
        if !ident_start && !c.is_ascii_digit() {
            continue;
        }
        let mut end = start + c.len_utf8();
        while let Some(&(i, next)) = chars.peek() {
            if next.is_ascii_alphanumeric() || next == '_' || next == ':' {
                end = i + next.len_utf8();
                chars.next();
            } else {
                break;
            }
        }
        let word = &text[start..end];
        if ident_start
            && ["weft_", "weft:", "process_"]
                .iter()
                .any(|p| word.starts_with(p))
        {
            names.insert(word.to_owned());
        }
    }
    names
}

/// Metric names in docs/telemetry.md (tables and the process paragraph),
/// with whether each is a histogram.
fn documented_metrics() -> anyhow::Result<BTreeMap<String, bool>> {
    let path = workspace_root().join("docs").join("telemetry.md");
    let doc = fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let mut metrics = BTreeMap::new();
    for line in doc.lines() {
        let cells: Vec<&str> = line.split('|').map(str::trim).collect();
        if let [_, name, kind, ..] = cells[..]
            && let Some(name) = name.strip_prefix('`').and_then(|n| n.strip_suffix('`'))
            && metric_names(name).contains(name)
        {
            metrics.insert(name.to_owned(), kind == "histogram");
        }
        for (i, span) in line.split('`').enumerate() {
            if i % 2 == 1 && metric_names(span).contains(span) {
                metrics.entry(span.to_owned()).or_insert(false);
            }
        }
    }
    ensure!(
        metrics.contains_key("weft_requests_total")
            && metrics.get("weft_request_duration_seconds") == Some(&true)
            && metrics.contains_key("process_open_fds")
            && metrics.contains_key("weft_control_plane_connected_sidecars"),
        "reading {} found {metrics:?}: its tables changed shape",
        path.display()
    );
    Ok(metrics)
}

/// Whether `name` is a series of a documented metric (a histogram's
/// `_bucket`, `_sum` and `_count` included).
fn is_documented(name: &str, metrics: &BTreeMap<String, bool>) -> bool {
    metrics.contains_key(name)
        || ["_bucket", "_sum", "_count"].iter().any(|suffix| {
            name.strip_suffix(suffix)
                .is_some_and(|base| metrics.get(base) == Some(&true))
        })
}

/// The names the rules files record (`- record: NAME` lines).
fn recorded_names(rules: &[PathBuf]) -> anyhow::Result<BTreeSet<String>> {
    let mut names = BTreeSet::new();
    for path in rules {
        for line in fs::read_to_string(path)?.lines() {
            if let Some(name) = line.trim().strip_prefix("- record:") {
                names.insert(name.trim().trim_matches(['"', '\'']).to_owned());
            }
        }
    }
    Ok(names)
}

/// `expr` with its Grafana template variables (`$name`, `${name}`,
/// `${name:format}`) replaced by [`TEMPLATE_VALUES`].
fn fill_template(expr: &str) -> anyhow::Result<String> {
    let mut out = String::with_capacity(expr.len());
    let mut rest = expr;
    while let Some(at) = rest.find('$') {
        out.push_str(&rest[..at]);
        rest = &rest[at + 1..];
        let (name, after) = if let Some(braced) = rest.strip_prefix('{') {
            let close = braced.find('}').context("unclosed ${")?;
            let inner = &braced[..close];
            (
                inner.split(':').next().unwrap_or(inner),
                &braced[close + 1..],
            )
        } else {
            let len = rest
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(rest.len());
            (&rest[..len], &rest[len..])
        };
        let Some((_, value)) = TEMPLATE_VALUES.iter().find(|(n, _)| *n == name) else {
            bail!("unknown template variable `${name}` in {expr}");
        };
        out.push_str(value);
        rest = after;
    }
    out.push_str(rest);
    Ok(out)
}

/// The contents of every `[...]` in `expr` outside string literals.
fn ranges(expr: &str) -> Vec<String> {
    let plain = without_strings(expr);
    plain
        .split('[')
        .skip(1)
        .map(|part| part.split(']').next().unwrap_or(part).to_owned())
        .collect()
}

/// `text` with every `kubernetes_sd_configs:` block replaced by an empty
/// `static_configs`, and how many were replaced.
fn without_kubernetes_sd(text: &str) -> (String, usize) {
    let mut out = String::new();
    let mut replaced = 0;
    let mut skipping_deeper_than: Option<usize> = None;
    for line in text.lines() {
        let indent = line.len() - line.trim_start().len();
        if let Some(depth) = skipping_deeper_than {
            if line.trim().is_empty() || indent > depth {
                continue;
            }
            skipping_deeper_than = None;
        }
        if line.trim() == "kubernetes_sd_configs:" {
            out.push_str(&line[..indent]);
            out.push_str("static_configs: []\n");
            replaced += 1;
            skipping_deeper_than = Some(indent);
        } else {
            out.push_str(line);
            out.push('\n');
        }
    }
    (out, replaced)
}

/// promtool from PATH, or an error that says how to get it.
fn promtool() -> anyhow::Result<&'static str> {
    const HOW: &str =
        "run scripts/setup: it installs Debian's `prometheus` package, which provides promtool";
    match Command::new("promtool").arg("--version").output() {
        Ok(output) if output.status.success() => Ok("promtool"),
        Ok(output) => bail!(
            "`promtool --version` failed ({}): {}; {HOW}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        ),
        Err(error) if error.kind() == ErrorKind::NotFound => {
            bail!("promtool is not on PATH; {HOW}")
        }
        Err(error) => Err(error).context("running promtool --version"),
    }
}

/// Runs `promtool ARGS` in `dir`; returns whether it succeeded and what it printed.
fn run_promtool(dir: &Path, args: &[&str]) -> anyhow::Result<(bool, String)> {
    let output = Command::new(promtool()?)
        .args(args)
        .current_dir(dir)
        .output()
        .with_context(|| format!("running promtool {args:?}"))?;
    let printed = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    Ok((output.status.success(), printed))
}

fn check_promtool(dir: &Path, args: &[&str]) -> anyhow::Result<()> {
    let (ok, printed) = run_promtool(dir, args)?;
    ensure!(ok, "promtool {} failed:\n{printed}", args.join(" "));
    Ok(())
}

#[test]
fn every_dashboard_panel_has_a_datasource_and_prometheus_targets() -> anyhow::Result<()> {
    for (path, dashboard) in dashboards()? {
        let name = file_name(&path);
        let datasource = variable(&dashboard, "datasource")?;
        ensure!(
            datasource["type"] == "datasource" && datasource["query"] == "prometheus",
            "{name}: `datasource` must be a Prometheus datasource variable: {datasource}"
        );
        let direction = variable(&dashboard, "direction")?;
        ensure!(
            direction["current"]["value"] == "inbound",
            "{name}: `direction` must default to inbound: {direction}"
        );
        let service = variable(&dashboard, "service")?;
        ensure!(
            service["multi"] == true
                && service["includeAll"] == true
                && service["definition"] == "label_values(weft_requests_total, service)",
            "{name}: `service` must be a multi-value variable with All over weft_requests_total's services: {service}"
        );

        let panels = panels(&dashboard);
        ensure!(panels.len() >= 10, "{name}: only {} panels", panels.len());
        let mut ids = BTreeSet::new();
        for panel in panels {
            let place = format!("{name} panel {} {}", panel["id"], panel["title"]);
            ensure!(ids.insert(panel["id"].to_string()), "{place}: duplicate id");
            ensure!(
                panel["title"].as_str().is_some_and(|t| !t.is_empty()),
                "{place}: no title"
            );
            let expected = json!({"type": "prometheus", "uid": "${datasource}"});
            ensure!(
                panel["datasource"] == expected,
                "{place}: datasource is {}, not {expected}",
                panel["datasource"]
            );
            let targets = panel["targets"]
                .as_array()
                .map(Vec::as_slice)
                .unwrap_or(&[]);
            ensure!(!targets.is_empty(), "{place}: no targets");
            let mut ref_ids = BTreeSet::new();
            for target in targets {
                ensure!(
                    target["expr"]
                        .as_str()
                        .is_some_and(|e| !e.trim().is_empty()),
                    "{place}: a target has no expr: {target}"
                );
                ensure!(
                    target.get("datasource").is_none_or(|d| *d == expected),
                    "{place}: a target's datasource is not {expected}: {target}"
                );
                ensure!(
                    target["refId"].as_str().is_some_and(|r| ref_ids.insert(r)),
                    "{place}: missing or duplicate refId: {target}"
                );
            }
        }

        for Expr { place, expr } in dashboard_exprs(&path, &dashboard) {
            for range in ranges(&expr) {
                ensure!(
                    DASHBOARD_RANGES.contains(&range.as_str()),
                    "{place}: range [{range}] in {expr}: use one of {DASHBOARD_RANGES:?}"
                );
            }
        }
    }
    Ok(())
}

#[test]
fn every_dashboard_expression_passes_promtool() -> anyhow::Result<()> {
    promtool()?;
    let scratch = TempDir::new()?;
    for (path, dashboard) in dashboards()? {
        let exprs = dashboard_exprs(&path, &dashboard);
        ensure!(!exprs.is_empty(), "{}: no expressions", path.display());
        // One group per expression, named after its panel, so that promtool's
        // error names where the expression comes from. YAML reads JSON.
        let mut groups = Vec::new();
        for (i, Expr { place, expr }) in exprs.iter().enumerate() {
            let filled = fill_template(expr).with_context(|| place.clone())?;
            groups.push(json!({
                "name": place,
                "rules": [{"record": format!("dashboard_expr_{i}"), "expr": filled}],
            }));
        }
        let rules = serde_json::to_string_pretty(&json!({ "groups": groups }))?;
        let file = scratch.write("dashboard-rules.yml", &rules)?;
        let (ok, printed) = run_promtool(scratch.path(), &["check", "rules", path_str(&file)?])?;
        ensure!(
            ok && printed.contains(&format!("SUCCESS: {} rules found", exprs.len())),
            "promtool check rules on {}'s expressions failed:\n{printed}",
            path.display()
        );
    }
    Ok(())
}

fn path_str(path: &Path) -> anyhow::Result<&str> {
    path.to_str().context("paths are UTF-8")
}

#[test]
fn prometheus_configs_rules_and_rule_tests_pass_promtool() -> anyhow::Result<()> {
    promtool()?;
    let (configs, rules, tests) = prometheus_files()?;
    for file in &rules {
        let dir = file.parent().context("a file has a directory")?;
        check_promtool(dir, &["check", "rules", path_str(file)?])?;
    }
    for file in &tests {
        let dir = file.parent().context("a file has a directory")?;
        check_promtool(dir, &["test", "rules", path_str(file)?])?;
    }
    for file in &configs {
        let dir = file.parent().context("a file has a directory")?;
        let (ok, printed) = run_promtool(dir, &["check", "config", path_str(file)?])?;
        if ok {
            continue;
        }
        ensure!(
            printed.contains("field kubernetes_sd_configs not found"),
            "promtool check config {} failed:\n{printed}",
            file.display()
        );
        // A promtool built without Kubernetes service discovery (Debian's):
        // check everything else, next to the same rules files.
        let (text, replaced) = without_kubernetes_sd(&fs::read_to_string(file)?);
        ensure!(
            replaced > 0,
            "no kubernetes_sd_configs block found in {}",
            file.display()
        );
        let scratch = TempDir::new()?;
        for rule_file in &rules {
            scratch.write(file_name(rule_file), &fs::read_to_string(rule_file)?)?;
        }
        let copy = scratch.write(file_name(file), &text)?;
        eprintln!(
            "promtool lacks Kubernetes service discovery: checking {} with its {replaced} kubernetes_sd_configs block(s) replaced by empty static_configs",
            file.display()
        );
        check_promtool(scratch.path(), &["check", "config", path_str(&copy)?])?;
    }
    Ok(())
}

#[test]
fn dashboards_and_rules_use_only_documented_metrics() -> anyhow::Result<()> {
    let metrics = documented_metrics()?;
    let (_, rules, tests) = prometheus_files()?;
    let recorded = recorded_names(&rules)?;
    ensure!(!recorded.is_empty(), "the rules files record nothing");

    // (where, names used there)
    let mut uses: Vec<(String, BTreeSet<String>)> = Vec::new();
    for (path, dashboard) in dashboards()? {
        for Expr { place, expr } in dashboard_exprs(&path, &dashboard) {
            uses.push((place, metric_names(&without_strings(&expr))));
        }
        for var in dashboard["templating"]["list"]
            .as_array()
            .into_iter()
            .flatten()
        {
            if let Some(definition) = var["definition"].as_str() {
                let place = format!("{} variable {}", file_name(&path), var["name"]);
                uses.push((place, metric_names(&without_strings(definition))));
            }
        }
    }
    // The rules files are read whole (expressions, annotations, comments): a
    // name mentioned anywhere in them must exist.
    for file in rules.iter().chain(&tests) {
        let text = fs::read_to_string(file)?;
        uses.push((file.display().to_string(), metric_names(&text)));
    }

    let mut unknown = Vec::new();
    for (place, names) in &uses {
        for name in names {
            let known = if name.contains(':') {
                recorded.contains(name)
            } else {
                is_documented(name, &metrics)
            };
            if !known {
                unknown.push(format!("{place}: {name}"));
            }
        }
    }
    ensure!(
        unknown.is_empty(),
        "metric names neither in docs/telemetry.md nor in CONTROL_PLANE_METRICS (recorded series: not recorded by a rules file):\n{}",
        unknown.join("\n")
    );
    let used: BTreeSet<&String> = uses.iter().flat_map(|(_, names)| names).collect();
    ensure!(
        used.iter().any(|n| n.starts_with("weft_control_plane_"))
            && used.contains(&"weft_request_duration_seconds_bucket".to_owned()),
        "the name extraction found too little: {used:?}"
    );
    Ok(())
}

/// The alerts (`- alert: NAME` lines) of `rules`.
fn alert_names(rules: &[PathBuf]) -> anyhow::Result<BTreeSet<String>> {
    let mut names = BTreeSet::new();
    for path in rules {
        for line in fs::read_to_string(path)?.lines() {
            if let Some(name) = line.trim().strip_prefix("- alert:") {
                names.insert(name.trim().trim_matches(['"', '\'']).to_owned());
            }
        }
    }
    Ok(names)
}

/// The alerts that a rule test (promtool's `alert_rule_test`) expects to
/// fire: each `- alertname: NAME` whose next `exp_alerts:` is not `[]`.
fn alerts_tested_firing(text: &str) -> BTreeSet<String> {
    let mut firing = BTreeSet::new();
    let mut current: Option<String> = None;
    for line in text.lines().map(str::trim) {
        if let Some(name) = line.strip_prefix("- alertname:") {
            current = Some(name.trim().trim_matches(['"', '\'']).to_owned());
        } else if let Some(expected) = line.strip_prefix("exp_alerts:")
            && let Some(name) = current.take()
            && expected.trim() != "[]"
        {
            firing.insert(name);
        }
    }
    firing
}

#[test]
fn every_alert_has_a_unit_test_in_which_it_fires() -> anyhow::Result<()> {
    let (_, rules, tests) = prometheus_files()?;
    let alerts = alert_names(&rules)?;
    ensure!(alerts.len() >= 10, "too few alerts found: {alerts:?}");
    let mut firing = BTreeSet::new();
    for file in &tests {
        firing.extend(alerts_tested_firing(&fs::read_to_string(file)?));
    }
    let untested: Vec<&String> = alerts.difference(&firing).collect();
    ensure!(
        untested.is_empty(),
        "alerts without a promtool test in which they fire (add one to a *.test.yml): {untested:?}"
    );
    let unknown: Vec<&String> = firing.difference(&alerts).collect();
    ensure!(
        unknown.is_empty(),
        "tests of alerts that do not exist: {unknown:?}"
    );
    Ok(())
}

#[test]
fn alerts_tested_firing_skips_empty_expectations() {
    let text = "alert_rule_test:\n  - alertname: A\n    eval_time: 1m\n    exp_alerts: []\n  - alertname: B\n    eval_time: 5m\n    exp_alerts:\n      - exp_labels: {severity: info}\n  - alertname: C\n    exp_alerts: []\n";
    assert_eq!(alerts_tested_firing(text), BTreeSet::from(["B".to_owned()]));
}

#[test]
fn metric_names_skips_strings_functions_labels_and_durations() {
    let expr = r#"histogram_quantile(0.99, sum by (service, le) (rate(weft_request_duration_seconds_bucket{route="weft_not_a_metric"}[5m]))) / weft:service_requests:rate1m and on (job) process_open_fds"#;
    assert_eq!(
        metric_names(&without_strings(expr)),
        BTreeSet::from(
            [
                "weft_request_duration_seconds_bucket",
                "weft:service_requests:rate1m",
                "process_open_fds"
            ]
            .map(str::to_owned)
        )
    );
}

#[test]
fn is_documented_accepts_histogram_series_only_for_histograms() {
    let metrics = BTreeMap::from([
        ("weft_request_duration_seconds".to_owned(), true),
        ("weft_requests_total".to_owned(), false),
    ]);
    assert!(is_documented(
        "weft_request_duration_seconds_bucket",
        &metrics
    ));
    assert!(is_documented(
        "weft_request_duration_seconds_count",
        &metrics
    ));
    assert!(is_documented("weft_requests_total", &metrics));
    assert!(!is_documented("weft_requests_total_count", &metrics));
    assert!(!is_documented("weft_request_total", &metrics));
}

#[test]
fn fill_template_replaces_variables_and_rejects_unknown_ones() {
    assert_eq!(
        fill_template(
            r#"rate(x{direction="$direction", service=~"${service:regex}"}[$__rate_interval])"#
        )
        .unwrap(),
        r#"rate(x{direction="inbound", service=~".*"}[1m])"#
    );
    assert!(fill_template("rate(x[$window])").is_err());
}

#[test]
fn ranges_reads_selectors_outside_strings() {
    assert_eq!(
        ranges(r#"rate(x{a="[1m]"}[$__rate_interval]) + increase(y[$__range])"#),
        ["$__rate_interval", "$__range"]
    );
}

#[test]
fn without_kubernetes_sd_replaces_whole_blocks() {
    let text = "  - job_name: a\n    kubernetes_sd_configs:\n      - role: pod\n        namespaces:\n          names: [x]\n\n    relabel_configs: []\n";
    assert_eq!(
        without_kubernetes_sd(text),
        (
            "  - job_name: a\n    static_configs: []\n    relabel_configs: []\n".to_owned(),
            1
        )
    );
}

/// The caller -> service table of the shipped dashboard: its three instant
/// queries, evaluated by `promtool test rules` on two callers' series, give
/// each edge's request rate, success ratio and p99 (the merge transformation
/// joins them on `caller` and `service`).
#[test]
fn the_caller_table_gives_rate_success_and_p99_per_edge() -> anyhow::Result<()> {
    promtool()?;
    let (path, dashboard) = dashboards()?
        .into_iter()
        .find(|(path, _)| file_name(path) == "weft-mesh.json")
        .context("no weft-mesh.json")?;
    let panel = panels(&dashboard)
        .into_iter()
        .find(|p| p["title"] == "Callers -> services")
        .with_context(|| format!("{}: no caller -> service table", path.display()))?;
    ensure!(panel["type"] == "table", "{panel}");
    let targets = panel["targets"].as_array().context("targets")?;
    let exprs: Vec<String> = targets
        .iter()
        .map(|t| {
            ensure!(t["instant"] == true && t["format"] == "table", "{t}");
            let expr = t["expr"].as_str().context("expr")?;
            ensure!(expr.contains("by (caller, service"), "not per edge: {expr}");
            ensure!(
                expr.contains(r#"direction="inbound""#),
                "not the callee's view: {expr}"
            );
            fill_template(expr)
        })
        .collect::<anyhow::Result<_>>()?;
    ensure!(exprs.len() == 3, "rate, success, p99: {exprs:?}");

    // Over the last hour (`$__range`): web -> billing 1/s ok and 1/s failed,
    // all within 1 s; cron -> billing 2/s ok, no histogram.
    let series = |labels: &str, per_minute: u32| json!({"series": format!("{{{labels}}}"), "values": format!("0+{per_minute}x70")});
    let web = r#"direction="inbound",caller="web",service="billing",route="""#;
    let cron = r#"direction="inbound",caller="cron",service="billing",route="""#;
    let input = [
        series(
            &format!(r#"__name__="weft_requests_total",{web},classification="success""#),
            60,
        ),
        series(
            &format!(r#"__name__="weft_requests_total",{web},classification="failure""#),
            60,
        ),
        series(
            &format!(r#"__name__="weft_requests_total",{cron},classification="success""#),
            120,
        ),
        series(
            &format!(r#"__name__="weft_request_duration_seconds_bucket",{web},le="1""#),
            120,
        ),
        series(
            &format!(r#"__name__="weft_request_duration_seconds_bucket",{web},le="+Inf""#),
            120,
        ),
    ];
    let edge = |caller: &str, value: f64| json!({"labels": format!(r#"{{caller="{caller}",service="billing"}}"#), "value": value});
    let expected = [
        vec![edge("cron", 2.0), edge("web", 2.0)],
        vec![edge("cron", 1.0), edge("web", 0.5)],
        vec![edge("web", 0.99)],
    ];
    let tests: Vec<Value> = exprs
        .iter()
        .zip(expected)
        .map(|(expr, samples)| json!({"expr": expr, "eval_time": "70m", "exp_samples": samples}))
        .collect();
    let scratch = TempDir::new()?;
    scratch.write("none.yml", "groups: []\n")?;
    let test = json!({
        "rule_files": ["none.yml"],
        "evaluation_interval": "1m",
        "tests": [{"interval": "1m", "input_series": input, "promql_expr_test": tests}],
    });
    let file = scratch.write("edges.test.yml", &serde_json::to_string_pretty(&test)?)?;
    check_promtool(scratch.path(), &["test", "rules", path_str(&file)?])
}
