//! Reading config files from disk: a policy file alone, or a bootstrap file
//! together with every policy file it names.
//!
//! This is the crate's only I/O. Policy paths in a bootstrap file are relative
//! to the bootstrap file's directory (absolute paths are used as written), so
//! a config directory can be moved as a whole. Each policy must declare the
//! service it is attached to; a policy for `orders` attached to `billing` is a
//! mistake that would otherwise apply the wrong limits silently.
//!
//! The `[tls]` files are only checked to be readable here (so a wrong path is
//! reported like a missing policy file); their content is the proxy's to
//! parse, and it re-reads them when they change.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::bootstrap::Bootstrap;
use crate::diag::{KeyPath, Problem};
use crate::error::ConfigError;
use crate::name::ServiceName;
use crate::policy::Policy;

/// A bootstrap file and the policies it references, all validated.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Loaded {
    /// The bootstrap file, as the caller named it.
    pub path: PathBuf,
    /// Its content.
    pub bootstrap: Bootstrap,
    /// Policies by service: the local `[service]`'s, if it names one, and
    /// each directory entry's.
    pub policies: BTreeMap<ServiceName, Policy>,
}

impl Loaded {
    /// A path from the bootstrap file, made relative to its directory the
    /// way policy paths are; absolute paths are returned as they are.
    pub fn resolve(&self, path: &Path) -> PathBuf {
        self.path.parent().unwrap_or(Path::new("")).join(path)
    }
}

/// Reads and parses one policy file.
pub fn load_policy(path: &Path) -> Result<Policy, ConfigError> {
    let src = read(path, None)?;
    crate::parse_policy(&src, path)
}

/// Reads and parses a bootstrap file, then every policy file it names.
pub fn load_bootstrap(path: &Path) -> Result<Loaded, ConfigError> {
    let src = read(path, None)?;
    let bootstrap = crate::parse_bootstrap(&src, path)?;
    let dir = path.parent().unwrap_or(Path::new(""));

    let local = bootstrap.service.iter().filter_map(|s| {
        let policy = s.policy.as_ref()?;
        Some((&s.name, policy, KeyPath::new(["service", "policy"])))
    });
    let directory = bootstrap
        .directory
        .services
        .iter()
        .enumerate()
        .filter_map(|(i, s)| {
            let policy = s.policy.as_ref()?;
            Some((
                &s.name,
                policy,
                KeyPath::new(["directory", "services"])
                    .index(i)
                    .key("policy"),
            ))
        });

    let mut policies = BTreeMap::new();
    for (service, relative, key) in local.chain(directory) {
        // Validation made sure a service named twice names one file.
        if policies.contains_key(service) {
            continue;
        }
        let file = dir.join(relative);
        let text = read(&file, Some(format!("{key} in {}", path.display())))?;
        let mut policy = crate::parse_policy(&text, &file)?;
        // A local file's faults are the bootstrap's to permit, whatever the
        // file says (the marker is the control plane's).
        policy.allow_faults = bootstrap.directory.allow_faults;
        if policy.service != *service {
            let message = format!(
                "policy is for service {:?} but is attached to {:?} by {key} in {}",
                policy.service.as_str(),
                service.as_str(),
                path.display()
            );
            return Err(Problem::new(KeyPath::new(["service"]), message).into_error(&text, &file));
        }
        policies.insert(service.clone(), policy);
    }
    if let Some(tls) = &bootstrap.tls {
        for (key, relative) in [("ca", &tls.ca), ("cert", &tls.cert), ("key", &tls.key)] {
            let file = dir.join(relative);
            std::fs::File::open(&file).map_err(|source| ConfigError::Io {
                file,
                context: Some(format!("tls.{key} in {}", path.display())),
                source,
            })?;
        }
    }
    Ok(Loaded {
        path: path.to_owned(),
        bootstrap,
        policies,
    })
}

fn read(file: &Path, context: Option<String>) -> Result<String, ConfigError> {
    std::fs::read_to_string(file).map_err(|source| ConfigError::Io {
        file: file.to_owned(),
        context,
        source,
    })
}
