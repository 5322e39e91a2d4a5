//! [`ServiceName`]: the logical name a service is called by, checked once at
//! the edge so every other crate can use it as a map key without re-checking.
//!
//! A name is 1 to 253 characters of lowercase ASCII letters, digits, `-`, `.`
//! and `_`, starting and ending with a letter or digit. That is a DNS name
//! (what callers put in the Host header) plus `_`, and lowercase only, so two
//! spellings never name one service.

use std::borrow::Borrow;
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize};

use crate::text::ParseVisitor;

/// A valid service name; see the module docs for the rules.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(transparent)]
pub struct ServiceName(String);

impl ServiceName {
    /// The longest name accepted, as for DNS.
    pub const MAX_LEN: usize = 253;

    /// The name as a string.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// Why a string is not a service name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid service name {name:?}: {reason}")]
pub struct InvalidServiceName {
    name: String,
    reason: String,
}

fn check(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > ServiceName::MAX_LEN {
        return Err(format!(
            "must be 1 to {} characters long",
            ServiceName::MAX_LEN
        ));
    }
    let allowed = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || "-._".contains(c);
    if let Some(c) = name.chars().find(|c| !allowed(*c)) {
        return Err(format!(
            "character {c:?} is not allowed; use lowercase letters, digits, '-', '.' and '_'"
        ));
    }
    let alphanumeric = |c: Option<char>| c.is_some_and(|c| c.is_ascii_alphanumeric());
    if !alphanumeric(name.chars().next()) || !alphanumeric(name.chars().next_back()) {
        return Err("must start and end with a letter or digit".to_owned());
    }
    Ok(())
}

impl TryFrom<String> for ServiceName {
    type Error = InvalidServiceName;

    fn try_from(name: String) -> Result<Self, Self::Error> {
        match check(&name) {
            Ok(()) => Ok(Self(name)),
            Err(reason) => Err(InvalidServiceName { name, reason }),
        }
    }
}

impl FromStr for ServiceName {
    type Err = InvalidServiceName;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::try_from(s.to_owned())
    }
}

impl fmt::Display for ServiceName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl AsRef<str> for ServiceName {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

/// Lets maps keyed by name be queried with a `&str`; ordering and hashing
/// agree with `str`'s because the name is stored as written.
impl Borrow<str> for ServiceName {
    fn borrow(&self) -> &str {
        &self.0
    }
}

impl From<ServiceName> for String {
    fn from(name: ServiceName) -> Self {
        name.0
    }
}

impl<'de> Deserialize<'de> for ServiceName {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_str(ParseVisitor::new("a service name like \"billing\""))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    #[test]
    fn accepts_dns_like_names() {
        for good in [
            "billing",
            "a",
            "9",
            "billing-v2",
            "eu.billing",
            "pay_ments",
            "a-b.c_d9",
        ] {
            assert_eq!(good.parse::<ServiceName>().unwrap().as_str(), good);
        }
        assert!("a".repeat(253).parse::<ServiceName>().is_ok());
    }

    #[test]
    fn rejects_bad_names_with_a_reason() {
        let err = |s: &str| s.parse::<ServiceName>().unwrap_err().to_string();
        assert_eq!(
            err(""),
            "invalid service name \"\": must be 1 to 253 characters long"
        );
        assert!(err(&"a".repeat(254)).ends_with("must be 1 to 253 characters long"));
        assert_eq!(
            err("Billing"),
            "invalid service name \"Billing\": character 'B' is not allowed; \
             use lowercase letters, digits, '-', '.' and '_'"
        );
        assert!(err("bill ing").contains("character ' ' is not allowed"));
        assert!(err("bill/ing").contains("character '/' is not allowed"));
        assert!(err("-billing").ends_with("must start and end with a letter or digit"));
        assert!(err("billing.").ends_with("must start and end with a letter or digit"));
        assert!(err("_x").ends_with("must start and end with a letter or digit"));
    }

    #[test]
    fn works_as_a_map_key_and_deserializes() {
        let map: BTreeMap<ServiceName, u8> = toml::from_str("billing = 1\norders = 2").unwrap();
        assert_eq!(map.get("orders"), Some(&2));
        let err = toml::from_str::<BTreeMap<ServiceName, u8>>("Orders = 1").unwrap_err();
        assert!(err.message().starts_with("invalid service name \"Orders\""));
        let name: ServiceName = String::from("x").try_into().unwrap();
        assert_eq!(name.to_string(), "x");
    }
}
