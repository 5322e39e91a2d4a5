//! Scenario: the deployment examples under `examples/deploy` stay valid.
//!
//! Every `.toml` file there is checked with the real `weft-proxy check`: files
//! named `weft*.toml` are bootstrap files (`check --config`, which also loads
//! every policy file they name, relative to the bootstrap file, and the `[tls]`
//! files), every other `.toml` is a service policy (`check --policy`). Files
//! are found by walking the directory, so a new example is covered without
//! touching this test. The `[tls]` files of a bootstrap are where the
//! deployment mounts them (a Secret, a systemd credential), which does not
//! exist here: the bootstrap is checked as a copy whose `[tls]` names fresh
//! certificates for its service, issued by a test CA; that the paths are the
//! mounted ones is checked against the manifests and units below.
//!
//! The Kubernetes manifests are rendered the way `kubectl kustomize` would
//! (each `kustomization.yaml`: its resources, its ConfigMap and Secret
//! generators; no kubectl needed) and checked ([`manifests`]): every probe and
//! Service port names a container port; every volume mounted is declared;
//! every ConfigMap and Secret used is generated or made by hand as a README
//! section says (`manifests::MADE_BY_HAND`), and every file a container is
//! told about (arguments, the bootstrap's `[tls]`) is one of its keys; every
//! container passes Pod Security "restricted" with a read-only root
//! filesystem, and has requests and limits; the namespace enforces
//! "restricted"; the optional cert-manager Certificates make the hand-made TLS
//! Secrets with the right identities. The systemd units hand the sidecar and
//! the control plane the credential files their bootstrap and flags name.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{Context as _, ensure};
use weft_tests::process::{TempDir, run_command};
use weft_tests::tls::Pki;

/// The Kubernetes manifests: rendering and checks.
#[path = "examples/manifests.rs"]
mod manifests;

/// `examples/deploy` in this checkout.
fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the tests crate sits in the workspace root")
        .join("examples")
        .join("deploy")
}

/// Every file under `dir` whose name satisfies `wanted`, sorted.
fn files_under(dir: &Path, wanted: &dyn Fn(&str) -> bool) -> anyhow::Result<Vec<PathBuf>> {
    let mut found = Vec::new();
    let mut pending = vec![dir.to_owned()];
    while let Some(dir) = pending.pop() {
        for entry in fs::read_dir(&dir).with_context(|| format!("reading {}", dir.display()))? {
            let path = entry?.path();
            if path.is_dir() {
                pending.push(path);
            } else if path
                .file_name()
                .and_then(|n| n.to_str())
                .is_some_and(wanted)
            {
                found.push(path);
            }
        }
    }
    found.sort();
    Ok(found)
}

fn is_bootstrap(name: &str) -> bool {
    name.starts_with("weft") && name.ends_with(".toml")
}

// ---------------------------------------------------------------------------
// TOML: just enough to read `[tls]` and `[service] name` from our examples.
// ---------------------------------------------------------------------------

/// The string value of `key` in `[section]` (`key = "value"`, one a line),
/// the only shape the examples use for these keys.
fn toml_string(text: &str, section: &str, key: &str) -> Option<String> {
    let mut current = "";
    for line in text.lines().map(str::trim) {
        if line.starts_with('[') {
            current = line.trim_start_matches('[').split(']').next().unwrap_or("");
            continue;
        }
        let Some((name, value)) = line.split_once('=') else {
            continue;
        };
        if current == section && name.trim() == key {
            let value = value.trim().strip_prefix('"')?;
            return value.split('"').next().map(str::to_owned);
        }
    }
    None
}

/// The `[tls]` files of a bootstrap file, as written: `(key, path)`.
fn tls_files(text: &str) -> Vec<(&'static str, String)> {
    ["ca", "cert", "key"]
        .into_iter()
        .filter_map(|key| toml_string(text, "tls", key).map(|path| (key, path)))
        .collect()
}

// ---------------------------------------------------------------------------
// weft-proxy check
// ---------------------------------------------------------------------------

/// Runs `weft-proxy check FLAG FILE` in the file's directory; the failure, if any.
async fn check(flag: &str, file: &Path, shown: &Path) -> anyhow::Result<Option<String>> {
    let dir = file.parent().context("a file has a directory")?;
    let path = file.to_str().context("example paths are UTF-8")?;
    let output = run_command(dir, &["check", flag, path]).await?;
    if output.status.success() && output.stdout.contains("ok: ") {
        return Ok(None);
    }
    Ok(Some(format!(
        "weft-proxy check {flag} {}: {}\n{}{}",
        shown.display(),
        output.status,
        output.stdout,
        output.stderr
    )))
}

/// Checks a bootstrap file. One with `[tls]` is copied (with the other TOML
/// files of its directory, the policies it may name) into a scratch directory
/// where its `[tls]` paths are replaced by a fresh CA and a certificate for its
/// `[service]`, so that `check` loads and verifies real files.
async fn check_bootstrap(file: &Path, pki: &Pki) -> anyhow::Result<Option<String>> {
    let text = fs::read_to_string(file)?;
    let tls = tls_files(&text);
    if tls.is_empty() {
        return check("--config", file, file).await;
    }
    ensure!(
        tls.len() == 3,
        "{}: [tls] needs ca, cert and key: {tls:?}",
        file.display()
    );
    let scratch = TempDir::new()?;
    let dir = file.parent().context("a file has a directory")?;
    for sibling in fs::read_dir(dir)? {
        let sibling = sibling?.path();
        if sibling.extension().is_some_and(|e| e == "toml") && sibling != file {
            let name = sibling.file_name().and_then(|n| n.to_str()).unwrap();
            scratch.write(name, &fs::read_to_string(&sibling)?)?;
        }
    }
    let service = toml_string(&text, "service", "name").unwrap_or_else(|| "caller".to_owned());
    let issued = pki.issue(&service);
    let mut copy = text.clone();
    for (key, original) in &tls {
        let contents = match *key {
            "ca" => pki.ca_pem(),
            "cert" => issued.cert_pem(),
            _ => issued.key_pem(),
        };
        let written = scratch.write(&format!("{key}.pem"), contents)?;
        copy = copy.replace(
            &format!("\"{original}\""),
            &format!("\"{}\"", written.display()),
        );
    }
    let name = file.file_name().and_then(|n| n.to_str()).unwrap();
    let copied = scratch.write(name, &copy)?;
    check("--config", &copied, file).await
}

#[tokio::test]
async fn every_example_bootstrap_and_policy_file_passes_check() -> anyhow::Result<()> {
    let dir = deploy_dir();
    let toml = files_under(&dir, &|name| name.ends_with(".toml"))?;
    let (bootstraps, policies): (Vec<_>, Vec<_>) = toml.into_iter().partition(|path| {
        path.file_name()
            .and_then(|n| n.to_str())
            .is_some_and(is_bootstrap)
    });
    // The systemd and Kubernetes examples hold at least one of each: finding
    // none means the walk is broken, not that everything is fine.
    ensure!(
        bootstraps.len() >= 2,
        "bootstrap files found under {}: {bootstraps:?}",
        dir.display()
    );
    ensure!(
        policies.len() >= 2,
        "policy files found under {}: {policies:?}",
        dir.display()
    );

    let pki = Pki::new();
    let mut failures = Vec::new();
    for bootstrap in &bootstraps {
        // The examples run with mTLS: a bootstrap without [tls] is a regression.
        let text = fs::read_to_string(bootstrap)?;
        if tls_files(&text).is_empty() {
            failures.push(format!("{}: no [tls] section", bootstrap.display()));
        }
        failures.extend(check_bootstrap(bootstrap, &pki).await?);
    }
    for policy in &policies {
        failures.extend(check("--policy", policy, policy).await?);
    }
    ensure!(
        failures.is_empty(),
        "{} example file(s) failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
    Ok(())
}

// ---------------------------------------------------------------------------
// systemd: credentials
// ---------------------------------------------------------------------------

/// The credential ids a unit loads (`LoadCredential=ID:PATH`).
fn credentials(unit: &str) -> BTreeSet<String> {
    unit.lines()
        .filter_map(|l| l.trim().strip_prefix("LoadCredential="))
        .filter_map(|l| l.split(':').next().map(str::to_owned))
        .collect()
}

#[test]
fn systemd_units_load_the_credentials_their_files_name() -> anyhow::Result<()> {
    let dir = deploy_dir().join("systemd");
    // The sidecar: the bootstrap of instance I names
    // /run/credentials/weft-proxy@I.service/ID for IDs the template loads.
    let template = fs::read_to_string(dir.join("weft-proxy@.service"))?;
    let loaded = credentials(&template);
    ensure!(
        ["ca.crt", "tls.crt", "tls.key"]
            .iter()
            .all(|id| loaded.contains(*id)),
        "weft-proxy@.service loads {loaded:?}"
    );
    let bootstraps = files_under(&dir.join("weft"), &is_bootstrap)?;
    ensure!(!bootstraps.is_empty(), "no bootstrap under systemd/weft");
    for bootstrap in bootstraps {
        let instance = bootstrap
            .parent()
            .and_then(Path::file_name)
            .and_then(|n| n.to_str())
            .context("systemd/weft/<instance>/weft.toml")?;
        let text = fs::read_to_string(&bootstrap)?;
        let tls = tls_files(&text);
        ensure!(tls.len() == 3, "{}: [tls] {tls:?}", bootstrap.display());
        let prefix = format!("/run/credentials/weft-proxy@{instance}.service/");
        for (key, path) in tls {
            let id = path.strip_prefix(&prefix).with_context(|| {
                format!(
                    "{}: [tls] {key} = {path:?} is not in {prefix}",
                    bootstrap.display()
                )
            })?;
            ensure!(
                loaded.contains(id),
                "{}: [tls] {key} names the credential {id}, which weft-proxy@.service does not load ({loaded:?})",
                bootstrap.display()
            );
        }
    }
    // The control plane: every %d/ID in its command line is loaded.
    let unit = fs::read_to_string(dir.join("weft-control-plane.service"))?;
    let loaded = credentials(&unit);
    let named: Vec<&str> = unit
        .split("%d/")
        .skip(1)
        .filter_map(|rest| rest.split(|c: char| c.is_whitespace() || c == '\\').next())
        .collect();
    ensure!(
        named.len() >= 6,
        "weft-control-plane.service names {named:?} in %d"
    );
    for id in named {
        ensure!(
            loaded.contains(id),
            "weft-control-plane.service names %d/{id}, which it does not load ({loaded:?})"
        );
    }
    Ok(())
}

#[test]
fn toml_string_reads_a_section_key() {
    let text = "[service]\nname = \"billing\"  # x\n[tls]\nca = \"/etc/weft/tls/ca.crt\"\n[[routes]]\nca = \"no\"\n";
    assert_eq!(
        toml_string(text, "service", "name").as_deref(),
        Some("billing")
    );
    assert_eq!(
        toml_string(text, "tls", "ca").as_deref(),
        Some("/etc/weft/tls/ca.crt")
    );
    assert_eq!(toml_string(text, "tls", "cert"), None);
}
