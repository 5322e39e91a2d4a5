//! The policy files `-f` names, read and validated: `-f FILE`; `-f DIR`,
//! every `*.toml` file directly in DIR (not in its subdirectories, not hidden
//! ones) in name order; `-f -`, one policy on standard input, named
//! `<stdin>` in messages.
//!
//! Validation is `weft-config`'s, so its messages are the control plane's
//! and `weft-proxy check`'s (`file:line:col: key: what`, the line quoted).

use std::io::Read;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use weft_config::{ConfigError, Policy};

/// The `-f` argument that means standard input.
const STDIN_ARG: &str = "-";
/// The name standard input goes by in messages (and in the `weft-file-name`
/// header, so the control plane's messages say it too).
pub const STDIN_NAME: &str = "<stdin>";

/// One policy file to read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    File(PathBuf),
    Stdin,
}

impl Source {
    /// The name messages use: the path as given, or `<stdin>`.
    pub fn name(&self) -> &Path {
        match self {
            Self::File(path) => path,
            Self::Stdin => Path::new(STDIN_NAME),
        }
    }
}

/// A policy file, read and validated.
#[derive(Debug)]
pub struct PolicyFile {
    pub source: Source,
    pub text: String,
    pub policy: Policy,
}

impl PolicyFile {
    /// The service the policy is for.
    pub fn service(&self) -> &str {
        self.policy.service.as_str()
    }

    /// The name messages use.
    pub fn name(&self) -> std::path::Display<'_> {
        self.source.name().display()
    }
}

/// The files the `-f` arguments name: a file as given, a directory's
/// `*.toml` files in name order, `-` (at most once) as standard input.
pub fn expand(args: &[PathBuf]) -> anyhow::Result<Vec<Source>> {
    let mut sources = Vec::new();
    for arg in args {
        if arg.as_os_str() == STDIN_ARG {
            if sources.contains(&Source::Stdin) {
                bail!("-f - (standard input) is given more than once");
            }
            sources.push(Source::Stdin);
        } else if arg.is_dir() {
            let found = toml_files(arg)?;
            if found.is_empty() {
                bail!("{}: the directory holds no *.toml file", arg.display());
            }
            sources.extend(found.into_iter().map(Source::File));
        } else {
            sources.push(Source::File(arg.clone()));
        }
    }
    Ok(sources)
}

/// The `*.toml` files directly in `dir` (hidden ones left out), sorted.
fn toml_files(dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    let entries =
        std::fs::read_dir(dir).with_context(|| format!("cannot read {}", dir.display()))?;
    for entry in entries {
        let entry = entry.with_context(|| format!("cannot read {}", dir.display()))?;
        let path = entry.path();
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name.starts_with('.') || path.extension().is_none_or(|e| e != "toml") {
            continue;
        }
        // A symlink to a file counts; a subdirectory does not.
        if path.is_file() {
            files.push(path);
        }
    }
    files.sort();
    Ok(files)
}

/// Read and validate one policy; the error is `weft-config`'s own message.
pub fn load(source: Source) -> Result<PolicyFile, ConfigError> {
    let name = source.name().to_owned();
    let read = match &source {
        Source::File(path) => std::fs::read_to_string(path),
        Source::Stdin => {
            let mut text = String::new();
            std::io::stdin().read_to_string(&mut text).map(|_| text)
        }
    };
    let text = read.map_err(|source| ConfigError::Io {
        file: name.clone(),
        context: None,
        source,
    })?;
    let policy = weft_config::parse_policy(&text, &name)?;
    Ok(PolicyFile {
        source,
        text,
        policy,
    })
}

/// Read and validate every file; each problem is printed (`error: ...`) and
/// the count of invalid files returned.
pub fn load_all(sources: Vec<Source>) -> Result<Vec<PolicyFile>, usize> {
    let mut loaded = Vec::with_capacity(sources.len());
    let mut invalid = 0;
    for source in sources {
        match load(source) {
            Ok(file) => loaded.push(file),
            Err(e) => {
                eprintln!("error: {e}");
                invalid += 1;
            }
        }
    }
    if invalid == 0 {
        Ok(loaded)
    } else {
        Err(invalid)
    }
}
