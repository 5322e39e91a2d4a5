//! Workload identities: SPIFFE IDs, and the shape Weft gives them.
//!
//! A SPIFFE ID is a URI `spiffe://<trust-domain>/<path>`, carried as the URI
//! subject alternative name of a certificate. Weft names a service's identity
//! `spiffe://<trust-domain>/service/<name>` ([`SpiffeId::for_service`],
//! [`SpiffeId::service`]); other paths are valid SPIFFE IDs but name no Weft
//! service.
//!
//! The rules are the SPIFFE ID specification's, strictly (no normalisation,
//! so an ID compares equal only to itself):
//! - the scheme is exactly `spiffe://`;
//! - the trust domain is 1 to 255 characters of lowercase letters, digits,
//!   `.`, `-` and `_` (so no port, no user info, no upper case);
//! - the path is empty or `/`-separated segments, each non-empty, not `.` or
//!   `..`, of letters, digits, `.`, `-` and `_` (so no trailing slash, no
//!   percent-encoding, no query, no fragment);
//! - the whole ID is at most 2048 bytes.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize};

use crate::name::ServiceName;
use crate::text::ParseVisitor;

const SCHEME: &str = "spiffe://";

/// A SPIFFE trust domain: the mesh whose CA vouches for an identity.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(transparent)]
pub struct TrustDomain(String);

impl TrustDomain {
    /// The longest trust domain accepted.
    pub const MAX_LEN: usize = 255;
    /// `[tls] trust_domain` when the key is absent.
    pub const DEFAULT: &str = "weft.local";

    /// The trust domain as written.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl Default for TrustDomain {
    fn default() -> Self {
        Self(Self::DEFAULT.to_owned())
    }
}

impl fmt::Display for TrustDomain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Why a string is not a trust domain or a SPIFFE ID.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidIdentity {
    #[error("invalid trust domain {value:?}: {reason}")]
    TrustDomain { value: String, reason: &'static str },
    #[error("invalid SPIFFE ID {value:?}: {reason}")]
    SpiffeId { value: String, reason: &'static str },
}

fn check_trust_domain(s: &str) -> Result<(), &'static str> {
    if s.is_empty() {
        return Err("the trust domain is empty");
    }
    if s.len() > TrustDomain::MAX_LEN {
        return Err("the trust domain is longer than 255 characters");
    }
    let allowed = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || "-._".contains(c);
    if !s.chars().all(allowed) {
        return Err(
            "a trust domain has only lowercase letters, digits, '-', '.' and '_' (no port, no user info)",
        );
    }
    Ok(())
}

impl FromStr for TrustDomain {
    type Err = InvalidIdentity;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        check_trust_domain(s).map_err(|reason| InvalidIdentity::TrustDomain {
            value: s.to_owned(),
            reason,
        })?;
        Ok(Self(s.to_owned()))
    }
}

impl<'de> Deserialize<'de> for TrustDomain {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_str(ParseVisitor::new("a trust domain like \"weft.local\""))
    }
}

/// A SPIFFE ID; see the module docs for the rules.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SpiffeId {
    trust_domain: TrustDomain,
    /// Empty, or `/seg/seg...`.
    path: String,
}

impl SpiffeId {
    /// The longest SPIFFE ID accepted, in bytes.
    pub const MAX_LEN: usize = 2048;

    /// Parses and validates `s`.
    pub fn parse(s: &str) -> Result<Self, InvalidIdentity> {
        let invalid = |reason| InvalidIdentity::SpiffeId {
            value: s.to_owned(),
            reason,
        };
        if s.len() > Self::MAX_LEN {
            return Err(invalid("longer than 2048 bytes"));
        }
        let rest = s
            .strip_prefix(SCHEME)
            .ok_or_else(|| invalid("it does not start with \"spiffe://\""))?;
        let (domain, path) = rest.find('/').map_or((rest, ""), |i| rest.split_at(i));
        check_trust_domain(domain).map_err(invalid)?;
        if !path.is_empty() {
            for segment in path[1..].split('/') {
                if segment.is_empty() {
                    return Err(invalid("the path has an empty segment (or a trailing '/')"));
                }
                if segment == "." || segment == ".." {
                    return Err(invalid("the path has a '.' or '..' segment"));
                }
                let allowed = |c: char| c.is_ascii_alphanumeric() || "-._".contains(c);
                if !segment.chars().all(allowed) {
                    return Err(invalid(
                        "a path segment has only letters, digits, '-', '.' and '_' \
                         (no query, fragment or percent-encoding)",
                    ));
                }
            }
        }
        Ok(Self {
            trust_domain: TrustDomain(domain.to_owned()),
            path: path.to_owned(),
        })
    }

    /// `spiffe://<trust_domain>/service/<name>`: the identity of service `name`.
    pub fn for_service(trust_domain: &TrustDomain, name: &ServiceName) -> Self {
        Self {
            trust_domain: trust_domain.clone(),
            path: format!("/service/{name}"),
        }
    }

    /// `spiffe://<trust_domain>/control-plane`: the control plane's identity
    /// (every replica's).
    pub fn for_control_plane(trust_domain: &TrustDomain) -> Self {
        Self {
            trust_domain: trust_domain.clone(),
            path: "/control-plane".to_owned(),
        }
    }

    /// `spiffe://<trust_domain>`: the trust domain's own ID (a CA carries it).
    pub fn for_trust_domain(trust_domain: &TrustDomain) -> Self {
        Self {
            trust_domain: trust_domain.clone(),
            path: String::new(),
        }
    }

    pub fn trust_domain(&self) -> &TrustDomain {
        &self.trust_domain
    }

    /// The path: empty, or starting with `/`.
    pub fn path(&self) -> &str {
        &self.path
    }

    /// The Weft service this ID names, if it is `.../service/<valid name>`.
    pub fn service(&self) -> Option<ServiceName> {
        let name = self.path.strip_prefix("/service/")?;
        name.parse().ok()
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{SCHEME}{}{}", self.trust_domain, self.path)
    }
}

impl FromStr for SpiffeId {
    type Err = InvalidIdentity;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

impl Serialize for SpiffeId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// One entry of an `allow` list (`inbound.allow`, `routes[].allow`): a caller
/// by its service name (in the sidecar's own trust domain), or by its whole
/// SPIFFE ID (`spiffe://<trust-domain>/service/<name>`, compared exactly).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum CallerId {
    /// `"checkout"`: the service of that name in this mesh's trust domain.
    Service(ServiceName),
    /// `"spiffe://weft.local/service/checkout"`: exactly that identity.
    Spiffe(SpiffeId),
}

/// Why a string is not a caller identity.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidCaller {
    #[error(transparent)]
    Name(#[from] crate::name::InvalidServiceName),
    #[error(transparent)]
    Id(#[from] InvalidIdentity),
    #[error(
        "{0} names no service: callers are authenticated as spiffe://<trust-domain>/service/<name>"
    )]
    NotAService(SpiffeId),
}

impl CallerId {
    /// Whether the authenticated caller `id` is this entry, for a sidecar of
    /// `trust_domain`.
    pub fn matches(&self, id: &SpiffeId, trust_domain: &TrustDomain) -> bool {
        match self {
            Self::Service(name) => {
                id.trust_domain() == trust_domain
                    && id.path().strip_prefix("/service/") == Some(name.as_str())
            }
            Self::Spiffe(expected) => expected == id,
        }
    }
}

impl FromStr for CallerId {
    type Err = InvalidCaller;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.starts_with(SCHEME) {
            let id = SpiffeId::parse(s)?;
            if id.service().is_none() {
                return Err(InvalidCaller::NotAService(id));
            }
            return Ok(Self::Spiffe(id));
        }
        Ok(Self::Service(s.parse()?))
    }
}

impl fmt::Display for CallerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Service(name) => f.write_str(name.as_str()),
            Self::Spiffe(id) => id.fmt(f),
        }
    }
}

impl Serialize for CallerId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for CallerId {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_str(ParseVisitor::new(
            "a caller: a service name like \"checkout\" or a SPIFFE ID like \"spiffe://weft.local/service/checkout\"",
        ))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn service_ids_round_trip() {
        let td: TrustDomain = "weft.local".parse().unwrap();
        let name: ServiceName = "billing".parse().unwrap();
        let id = SpiffeId::for_service(&td, &name);
        assert_eq!(id.to_string(), "spiffe://weft.local/service/billing");
        let parsed = SpiffeId::parse("spiffe://weft.local/service/billing").unwrap();
        assert_eq!(parsed, id);
        assert_eq!(parsed.service(), Some(name));
        assert_eq!(parsed.trust_domain().as_str(), "weft.local");
        assert_eq!(
            SpiffeId::for_trust_domain(&td).to_string(),
            "spiffe://weft.local"
        );
        assert_eq!(TrustDomain::default().as_str(), "weft.local");
    }

    #[test]
    fn other_paths_are_ids_but_no_service() {
        for (s, service) in [
            ("spiffe://weft.local", None),
            ("spiffe://weft.local/ns/default/sa/web", None),
            ("spiffe://weft.local/service", None),
            ("spiffe://weft.local/service/billing/extra", None),
            ("spiffe://weft.local/service/Billing", None),
            ("spiffe://weft.local/service/pay_ments", Some("pay_ments")),
        ] {
            let id = SpiffeId::parse(s).unwrap_or_else(|e| panic!("{s}: {e}"));
            assert_eq!(id.to_string(), s);
            assert_eq!(
                id.service().as_ref().map(ServiceName::as_str),
                service,
                "{s}"
            );
        }
    }

    #[test]
    fn invalid_ids_are_rejected_with_a_reason() {
        let err = |s: &str| SpiffeId::parse(s).unwrap_err().to_string();
        for (s, reason) in [
            ("https://weft.local/service/a", "does not start with"),
            ("SPIFFE://weft.local/service/a", "does not start with"),
            ("spiffe:///service/a", "trust domain is empty"),
            ("spiffe://", "trust domain is empty"),
            ("spiffe://Weft.local/service/a", "lowercase letters"),
            ("spiffe://weft.local:8443/service/a", "no port"),
            ("spiffe://user@weft.local/service/a", "no user info"),
            ("spiffe://weft.local/", "empty segment"),
            ("spiffe://weft.local/service/a/", "empty segment"),
            ("spiffe://weft.local//a", "empty segment"),
            ("spiffe://weft.local/service/../a", "'..' segment"),
            ("spiffe://weft.local/./a", "'.' or '..'"),
            ("spiffe://weft.local/service/a?x=1", "no query"),
            ("spiffe://weft.local/service/a#f", "fragment"),
            ("spiffe://weft.local/service/a%20b", "percent-encoding"),
        ] {
            let message = err(s);
            assert!(message.contains(reason), "{s}: {message}");
        }
        let long = format!("spiffe://weft.local/{}", "a".repeat(2048));
        assert!(err(&long).contains("longer than 2048 bytes"));
        let long_domain = format!("spiffe://{}", "a".repeat(256));
        assert!(err(&long_domain).contains("longer than 255"));
    }

    #[test]
    fn callers_are_service_names_or_service_spiffe_ids() {
        let td: TrustDomain = "weft.local".parse().unwrap();
        let other: TrustDomain = "other.mesh".parse().unwrap();
        let web = SpiffeId::parse("spiffe://weft.local/service/web").unwrap();
        let foreign_web = SpiffeId::parse("spiffe://other.mesh/service/web").unwrap();

        let by_name: CallerId = "web".parse().unwrap();
        assert_eq!(by_name, CallerId::Service("web".parse().unwrap()));
        assert!(by_name.matches(&web, &td));
        assert!(!by_name.matches(&foreign_web, &td), "another trust domain");
        assert!(by_name.matches(&foreign_web, &other));
        assert!(!"webx".parse::<CallerId>().unwrap().matches(&web, &td));

        let by_id: CallerId = "spiffe://weft.local/service/web".parse().unwrap();
        assert!(by_id.matches(&web, &td));
        assert!(by_id.matches(&web, &other), "a whole ID is compared as is");
        assert!(!by_id.matches(&foreign_web, &other));
        assert_eq!(by_id.to_string(), "spiffe://weft.local/service/web");
        assert_eq!(by_name.to_string(), "web");

        let err = |s: &str| s.parse::<CallerId>().unwrap_err().to_string();
        assert!(
            err("Web").contains("invalid service name \"Web\""),
            "{}",
            err("Web")
        );
        assert!(err("spiffe://weft.local/service/").contains("empty segment"));
        assert_eq!(
            err("spiffe://weft.local/ns/default/sa/web"),
            "spiffe://weft.local/ns/default/sa/web names no service: callers are \
             authenticated as spiffe://<trust-domain>/service/<name>"
        );
        assert!(err("").contains("invalid service name"));

        #[derive(Debug, Deserialize)]
        struct Doc {
            allow: Vec<CallerId>,
        }
        let doc: Doc =
            toml::from_str("allow = [\"web\", \"spiffe://weft.local/service/orders\"]").unwrap();
        assert_eq!(doc.allow.len(), 2);
        assert!(toml::from_str::<Doc>("allow = [1]").is_err());
    }

    #[test]
    fn trust_domains_parse_and_deserialize() {
        assert!("example.org".parse::<TrustDomain>().is_ok());
        assert!("my_mesh-1".parse::<TrustDomain>().is_ok());
        assert_eq!(
            "Weft".parse::<TrustDomain>().unwrap_err().to_string(),
            "invalid trust domain \"Weft\": a trust domain has only lowercase letters, digits, \
             '-', '.' and '_' (no port, no user info)"
        );
        #[derive(Debug, Deserialize)]
        struct Doc {
            td: TrustDomain,
        }
        let doc: Doc = toml::from_str("td = \"prod.example\"").unwrap();
        assert_eq!(doc.td.as_str(), "prod.example");
        assert!(toml::from_str::<Doc>("td = \"\"").is_err());
    }
}
