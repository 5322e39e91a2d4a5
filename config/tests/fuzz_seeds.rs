//! The config fuzz targets' seed corpora pass their checks: every TOML file
//! under `tests/golden/` and the repository's `examples/`, fed to both
//! parsers (a policy read as a bootstrap file is a located error too), and
//! every input the targets once failed on (`fuzz/regressions/bootstrap/`
//! and `fuzz/regressions/policy/`, when present). `scripts/fuzz` seeds the
//! `bootstrap` and `policy` targets with the same files.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::fs;
use std::path::{Path, PathBuf};

/// Adds the files under `dir` (recursively) whose name ends with `suffix`.
fn files(dir: &Path, suffix: &str, out: &mut Vec<PathBuf>) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for entry in entries {
        let path = entry.unwrap().path();
        if path.is_dir() {
            files(&path, suffix, out);
        } else if path.to_string_lossy().ends_with(suffix) {
            out.push(path);
        }
    }
}

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

#[test]
fn seed_files_pass_the_fuzz_checks() {
    let mut seeds = Vec::new();
    files(&repo().join("config/tests/golden"), ".toml", &mut seeds);
    files(&repo().join("examples"), ".toml", &mut seeds);
    seeds.retain(|p| p.file_name().is_some_and(|n| n != "Cargo.toml"));
    assert!(seeds.len() > 50, "seeds went missing: {}", seeds.len());
    let mut accepted = 0;
    for file in &seeds {
        let data = fs::read(file).unwrap();
        let bootstrap = weft_config::fuzzing::bootstrap(&data).is_some();
        let policy = weft_config::fuzzing::policy(&data).is_some();
        accepted += usize::from(bootstrap || policy);
    }
    // The examples and the golden `ok/` files are valid.
    assert!(accepted >= 8, "only {accepted} seeds parse");
}

type Check = fn(&[u8]);

#[test]
fn past_failures_pass_the_fuzz_checks() {
    let checks: [(&str, Check); 2] = [
        ("bootstrap", |d| drop(weft_config::fuzzing::bootstrap(d))),
        ("policy", |d| drop(weft_config::fuzzing::policy(d))),
    ];
    for (target, check) in checks {
        let mut inputs = Vec::new();
        files(
            &repo().join("fuzz/regressions").join(target),
            "",
            &mut inputs,
        );
        for file in inputs {
            check(&fs::read(&file).unwrap());
        }
    }
}
