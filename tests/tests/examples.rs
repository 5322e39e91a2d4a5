//! Scenario: the deployment examples under `examples/deploy` stay valid.
//!
//! Every `.toml` file there is checked with the real `weft-proxy check`: files
//! named `weft*.toml` are bootstrap files (`check --config`, which also loads
//! every policy file they name, relative to the bootstrap file), every other
//! `.toml` is a service policy (`check --policy`). Files are found by walking
//! the directory, so a new example is covered without touching this test.
//!
//! The Kubernetes manifests are not parsed (the workspace has no YAML crate);
//! what is checked is that every file a `kustomization.yaml` lists (its
//! resources and the ConfigMap generator's TOML files) exists, so the config
//! the cluster gets is the config checked here.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{Context as _, ensure};
use weft_tests::process::run_command;

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

/// Runs `weft-proxy check FLAG FILE` on each file; returns one line per failure.
async fn check_all(flag: &str, files: &[PathBuf]) -> anyhow::Result<Vec<String>> {
    let mut failures = Vec::new();
    for file in files {
        let dir = file.parent().context("a file has a directory")?;
        let path = file.to_str().context("example paths are UTF-8")?;
        let output = run_command(dir, &["check", flag, path]).await?;
        if !output.status.success() || !output.stdout.contains("ok: ") {
            failures.push(format!(
                "weft-proxy check {flag} {path}: {}\n{}{}",
                output.status, output.stdout, output.stderr
            ));
        }
    }
    Ok(failures)
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

    let mut failures = check_all("--config", &bootstraps).await?;
    failures.extend(check_all("--policy", &policies).await?);
    ensure!(
        failures.is_empty(),
        "{} example file(s) failed `weft-proxy check`:\n{}",
        failures.len(),
        failures.join("\n")
    );
    Ok(())
}

/// The list items of a kustomization that name a file (`- etcd.yaml`,
/// `- config/weft.toml`, `- key=config/weft.toml`).
fn listed_files(kustomization: &str) -> Vec<String> {
    kustomization
        .lines()
        .filter_map(|line| line.trim().strip_prefix("- "))
        .map(|item| item.rsplit('=').next().unwrap_or(item).trim())
        .filter(|item| {
            [".yaml", ".yml", ".toml"]
                .iter()
                .any(|ext| item.ends_with(ext))
                && !item.contains(char::is_whitespace)
                && !item.contains(':')
        })
        .map(str::to_owned)
        .collect()
}

#[test]
fn every_file_a_kustomization_lists_exists() -> anyhow::Result<()> {
    let kustomizations = files_under(&deploy_dir(), &|name| name == "kustomization.yaml")?;
    ensure!(!kustomizations.is_empty(), "no kustomization.yaml found");
    for kustomization in kustomizations {
        let text = fs::read_to_string(&kustomization)?;
        let listed = listed_files(&text);
        ensure!(
            listed.iter().any(|f| f.ends_with(".toml")),
            "{} generates no ConfigMap from a TOML file: {listed:?}",
            kustomization.display()
        );
        let dir = kustomization.parent().context("a file has a directory")?;
        for file in listed {
            ensure!(
                dir.join(&file).is_file(),
                "{} lists {file}, which does not exist",
                kustomization.display()
            );
        }
    }
    Ok(())
}

#[test]
fn listed_files_reads_resources_and_generator_files() {
    let text = "resources:\n  - etcd.yaml\nconfigMapGenerator:\n  - name: x\n    files:\n      - config/weft.toml\n      - policy.toml=config/billing.toml\nlabels:\n  - pairs:\n";
    assert_eq!(
        listed_files(text),
        ["etcd.yaml", "config/weft.toml", "config/billing.toml"]
    );
}
