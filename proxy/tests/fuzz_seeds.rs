//! The proxy fuzz targets' seed corpora pass their checks: every raw request
//! in `tests/corpus/hostile/` through the request path (`request` target)
//! and followed for its framing (`framing` target),
//! every policy-shaped TOML file of the config goldens and the examples
//! compiled (`policy` target), and every input the targets once failed on
//! (`fuzz/regressions/<target>/`, when present). `scripts/fuzz` seeds the targets with the same files.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::fs;
use std::path::{Path, PathBuf};

/// Files under `dir` (recursively) whose name ends with `suffix`, sorted.
fn files(dir: &Path, suffix: &str) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut dirs = vec![dir.to_owned()];
    while let Some(dir) = dirs.pop() {
        let Ok(entries) = fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries {
            let path = entry.unwrap().path();
            if path.is_dir() {
                dirs.push(path);
            } else if path.to_string_lossy().ends_with(suffix) {
                out.push(path);
            }
        }
    }
    out.sort();
    out
}

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

#[test]
fn hostile_requests_pass_the_request_checks() {
    let seeds = files(&repo().join("tests/corpus/hostile"), ".http");
    assert!(seeds.len() >= 20, "seeds went missing: {}", seeds.len());
    for file in seeds
        .iter()
        .chain(&files(&repo().join("fuzz/regressions/request"), ""))
    {
        weft_proxy::fuzzing::request(&fs::read(file).unwrap());
    }
}

#[test]
fn hostile_requests_pass_the_framing_checks() {
    let seeds = files(&repo().join("tests/corpus/hostile"), ".http");
    for file in seeds
        .iter()
        .chain(&files(&repo().join("fuzz/regressions/framing"), ""))
    {
        weft_proxy::fuzzing::framing(&fs::read(file).unwrap());
    }
}

#[test]
fn policies_compile_for_both_sides() {
    let mut seeds = files(&repo().join("config/tests/golden"), ".toml");
    seeds.extend(files(&repo().join("examples"), ".toml"));
    seeds.extend(files(&repo().join("fuzz/regressions/policy"), ""));
    assert!(seeds.len() > 50, "seeds went missing: {}", seeds.len());
    for file in seeds {
        weft_proxy::fuzzing::policy(&fs::read(file).unwrap());
    }
}
