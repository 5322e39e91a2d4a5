//! Service-side policy keys that nothing may enforce, found from the bootstrap
//! file alone.
//!
//! A policy's `inbound.*` keys and its routes' `rate_limit`, `max_concurrency`,
//! `queue` and `allow` are enforced only by the service's own sidecars, on
//! their inbound listeners ([`weft_core::policy`]); a caller's sidecar reads the
//! same file for the rest and never enforces them. They are enforced, then,
//! only when the caller's requests reach the service through its sidecars:
//! - services pushed by the control plane: their instances are sidecars'
//!   registrations, so yes;
//! - static services with `tls = "mesh"`: the endpoints prove with mTLS that
//!   they are the service's sidecars, so yes;
//! - static services with `tls = "none"`: the endpoints are addresses this
//!   sidecar cannot tell from plain apps, so maybe not: [`unenforced`] names
//!   them (unless the service is this sidecar's own `[service]`);
//! - names resolved through DNS carry no policy at all.
//!
//! `weft-proxy check --config` prints each as a warning, the directory logs it
//! when a service's policy is compiled (at start and on each reload that
//! changes it), and `/endpoints` shows the keys as "not enforced here".

use std::fmt;
use std::path::PathBuf;

use weft_config::{Loaded, ServiceName, StaticService, TlsMode};

/// What `/endpoints` says of a service-side key that a warning names.
pub const NOT_ENFORCED_HERE: &str = "not enforced here";
/// What `/endpoints` says of a service-side key when the service's own
/// sidecars stand in front of its instances.
pub const BY_OWN_SIDECARS: &str = "enforced by the service's own sidecars";

/// A static service whose policy has service-side keys that may go unenforced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unenforced {
    pub service: ServiceName,
    /// The policy file, as the bootstrap file's directory resolves it.
    pub policy_file: PathBuf,
    /// The service-side keys the file sets (see
    /// [`weft_config::Policy::service_side_keys`]).
    pub keys: Vec<String>,
}

impl fmt::Display for Unenforced {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let service = &self.service;
        write!(
            f,
            "{}: {} {} not enforced by this sidecar: only {service}'s own sidecars enforce \
             {}, and this sidecar reaches {service} at the plaintext static endpoints of \
             its [[directory.services]] entry (tls = \"none\"); unless those are {service}'s \
             sidecars, nothing enforces {}",
            self.policy_file.display(),
            self.keys.join(", "),
            if self.keys.len() == 1 { "is" } else { "are" },
            if self.keys.len() == 1 { "it" } else { "them" },
            if self.keys.len() == 1 { "it" } else { "them" },
        )
    }
}

/// `svc`'s policy's service-side keys, if nothing may enforce them (see the
/// module documentation for when).
pub fn unenforced_for(loaded: &Loaded, svc: &StaticService) -> Option<Unenforced> {
    if svc.tls == TlsMode::Mesh {
        return None;
    }
    let own = loaded.bootstrap.service.as_ref().map(|s| &s.name);
    if own == Some(&svc.name) {
        return None;
    }
    let keys = loaded.policies.get(&svc.name)?.service_side_keys();
    if keys.is_empty() {
        return None;
    }
    Some(Unenforced {
        service: svc.name.clone(),
        policy_file: svc
            .policy
            .as_ref()
            .map_or_else(PathBuf::new, |p| loaded.resolve(p)),
        keys,
    })
}

/// Every static service whose service-side keys may go unenforced, in the
/// order of the bootstrap file.
pub fn unenforced(loaded: &Loaded) -> Vec<Unenforced> {
    loaded
        .bootstrap
        .directory
        .services
        .iter()
        .filter_map(|svc| unenforced_for(loaded, svc))
        .collect()
}

/// Log [`unenforced_for`]'s finding for `svc`, if any (once per compiled
/// policy: the directory calls this when it compiles `svc`'s policy).
pub fn warn_if_unenforced(loaded: &Loaded, svc: &StaticService) {
    if let Some(u) = unenforced_for(loaded, svc) {
        tracing::warn!(
            service.name = %u.service,
            policy.file = %u.policy_file.display(),
            policy.keys = %u.keys.join(","),
            "{u}"
        );
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn loaded(bootstrap: &str, policy: &str) -> Loaded {
        let path = std::path::Path::new("/etc/weft/weft.toml");
        let bootstrap = weft_config::parse_bootstrap(bootstrap, path).unwrap();
        let policy =
            weft_config::parse_policy(policy, std::path::Path::new("billing.toml")).unwrap();
        Loaded {
            path: path.to_owned(),
            bootstrap,
            policies: [(policy.service.clone(), policy)].into_iter().collect(),
        }
    }

    const LIMITED: &str = "service = \"billing\"\n[[routes]]\nname = \"all\"\nrate_limit = { per_second = 100, burst = 10 }\n";
    const PLAIN: &str = "[[directory.services]]\nname = \"billing\"\npolicy = \"billing.toml\"\nendpoints = [{ address = \"127.0.0.1:9000\" }]\n";

    #[test]
    fn a_plaintext_static_service_with_service_side_keys_is_named() {
        let found = unenforced(&loaded(PLAIN, LIMITED));
        assert_eq!(
            found,
            [Unenforced {
                service: "billing".parse().unwrap(),
                policy_file: "/etc/weft/billing.toml".into(),
                keys: vec!["routes.all.rate_limit".into()],
            }]
        );
        let line = found[0].to_string();
        assert!(
            line.starts_with(
                "/etc/weft/billing.toml: routes.all.rate_limit is not enforced by this sidecar"
            ),
            "{line}"
        );
    }

    #[test]
    fn own_service_caller_side_keys_are_not_named() {
        let own = format!("[service]\nname = \"billing\"\napp = \"127.0.0.1:1\"\n{PLAIN}");
        assert!(unenforced(&loaded(&own, LIMITED)).is_empty());
        let caller_side = "service = \"billing\"\n[outbound]\ntimeout = \"1s\"\n";
        assert!(unenforced(&loaded(PLAIN, caller_side)).is_empty());
    }

    #[test]
    fn mesh_endpoints_are_the_service_s_sidecars() {
        let mesh = format!(
            "[tls]\nca = \"ca.pem\"\ncert = \"c.pem\"\nkey = \"k.pem\"\n{}",
            PLAIN.replace("policy = ", "tls = \"mesh\"\npolicy = ")
        );
        assert!(unenforced(&loaded(&mesh, LIMITED)).is_empty());
    }
}
