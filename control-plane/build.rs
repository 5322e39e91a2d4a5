//! Embeds the git commit the binaries are built from as `WEFT_GIT_COMMIT`
//! (`git rev-parse --short HEAD`), for `weftctl version` and the admin API's
//! `GET /version`; "unknown" when there is no git or no repository (a source
//! tarball): the build never fails for it.

use std::path::Path;
use std::process::Command;

fn git(args: &[&str]) -> Option<String> {
    let out = Command::new("git").args(args).output().ok()?;
    if !out.status.success() {
        return None;
    }
    let text = String::from_utf8(out.stdout).ok()?;
    let text = text.trim();
    (!text.is_empty()).then(|| text.to_owned())
}

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-env-changed=WEFT_GIT_COMMIT");
    let commit = std::env::var("WEFT_GIT_COMMIT")
        .ok()
        .filter(|c| !c.is_empty())
        .or_else(|| git(&["rev-parse", "--short", "HEAD"]))
        .unwrap_or_else(|| "unknown".to_owned());
    println!("cargo:rustc-env=WEFT_GIT_COMMIT={commit}");
    // Run again when HEAD moves: a commit, a checkout (only files that
    // exist: a missing one would make every build run this again).
    for file in ["HEAD", "logs/HEAD"] {
        if let Some(path) = git(&["rev-parse", "--git-path", file])
            && Path::new(&path).is_file()
        {
            println!("cargo:rerun-if-changed={path}");
        }
    }
}
