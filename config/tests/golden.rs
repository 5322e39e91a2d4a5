//! Golden tests: the exact error a user sees for each class of mistake.
//!
//! Every `*.toml` directly under `tests/golden/bootstrap/` is loaded with
//! `load_bootstrap`, and every one under `tests/golden/policy/` with
//! `load_policy`; each holds one mistake. The error's display must equal the
//! `.expected` file beside it, which pins the wording, the location and the
//! quoted line. Paths are relative to the crate directory, so the expected
//! output is the same on every machine. Policy files referenced by the
//! bootstrap cases live in `tests/golden/bootstrap/policies/`.
//!
//! `UPDATE_GOLDEN=1 cargo test -p weft-config --test golden` rewrites the
//! expected files; review the diff before committing it.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::fs;
use std::path::{Path, PathBuf};

use weft_config::{ConfigError, load_bootstrap, load_policy};

type Loader = fn(&Path) -> Result<(), ConfigError>;

fn cases(dir: &str) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = fs::read_dir(dir)
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .filter(|path| path.is_file())
        .collect();
    files.sort();
    files
}

#[test]
fn every_mistake_reads_as_expected() {
    // Cargo runs tests from the crate directory; make sure of it, since the
    // expected output contains relative paths. This is the only test in this
    // binary, so changing the working directory races with nothing.
    std::env::set_current_dir(env!("CARGO_MANIFEST_DIR")).unwrap();
    let update = std::env::var_os("UPDATE_GOLDEN").is_some_and(|v| v == "1");
    let loaders: [(&str, Loader); 2] = [
        ("tests/golden/bootstrap", |p| load_bootstrap(p).map(drop)),
        ("tests/golden/policy", |p| load_policy(p).map(drop)),
    ];

    let mut failures = Vec::new();
    let mut count = 0;
    for (dir, load) in loaders {
        for file in cases(dir) {
            match file.extension().and_then(|e| e.to_str()) {
                Some("toml") => {}
                Some("expected") if file.with_extension("toml").is_file() => continue,
                _ => {
                    failures.push(format!(
                        "{}: not a case or an expected output",
                        file.display()
                    ));
                    continue;
                }
            }
            count += 1;
            let actual = match load(&file) {
                Ok(()) => {
                    failures.push(format!(
                        "{}: accepted, but it has a mistake",
                        file.display()
                    ));
                    continue;
                }
                Err(err) => format!("{err}\n"),
            };
            let expected_file = file.with_extension("expected");
            if update {
                fs::write(&expected_file, &actual).unwrap();
                continue;
            }
            match fs::read_to_string(&expected_file) {
                Ok(expected) if expected == actual => {}
                Ok(expected) => failures.push(format!(
                    "{}:\n--- expected\n{expected}--- actual\n{actual}",
                    file.display()
                )),
                Err(err) => failures.push(format!("{}: {err}", expected_file.display())),
            }
        }
    }
    assert!(count >= 20, "only {count} golden cases found");
    assert!(
        failures.is_empty(),
        "{} golden case(s) differ (UPDATE_GOLDEN=1 rewrites them):\n\n{}",
        failures.len(),
        failures.join("\n")
    );
}
