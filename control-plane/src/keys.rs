//! The key layout. Keys are relative to the store's prefix (default `/weft/`),
//! which the store adds and removes itself.
//!
//! ```text
//! services/<name>/policy           the owner's policy file (TOML source), validated before it is written
//! services/<name>/instances/<id>   a registration (JSON), bound to a lease
//! services/<name>/last-valid-policy  the newest valid policy a control plane saw (JSON, see `view::last_valid`)
//! ```
//!
//! Service names are `weft_config::ServiceName`s and instance ids are restricted
//! to `[A-Za-z0-9._:-]`, so neither can contain `/` and every key parses back
//! unambiguously.

/// What a key under the prefix names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Key<'a> {
    Policy { service: &'a str },
    LastValidPolicy { service: &'a str },
    Instance { service: &'a str, id: &'a str },
}

/// The prefix holding every service.
pub const SERVICES: &str = "services/";

pub fn policy_key(service: &str) -> String {
    format!("{SERVICES}{service}/policy")
}

pub fn last_valid_policy_key(service: &str) -> String {
    format!("{SERVICES}{service}/last-valid-policy")
}

pub fn instance_key(service: &str, id: &str) -> String {
    format!("{SERVICES}{service}/instances/{id}")
}

/// Parse a key read from the store; `None` for keys Weft does not own.
pub fn parse(key: &str) -> Option<Key<'_>> {
    let rest = key.strip_prefix(SERVICES)?;
    let (service, rest) = rest.split_once('/')?;
    if service.is_empty() {
        return None;
    }
    match rest.split_once('/') {
        None if rest == "policy" => Some(Key::Policy { service }),
        None if rest == "last-valid-policy" => Some(Key::LastValidPolicy { service }),
        Some(("instances", id)) if !id.is_empty() && !id.contains('/') => {
            Some(Key::Instance { service, id })
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_round_trip() {
        assert_eq!(
            parse(&policy_key("billing")),
            Some(Key::Policy { service: "billing" })
        );
        assert_eq!(
            parse(&instance_key("billing", "i-1")),
            Some(Key::Instance {
                service: "billing",
                id: "i-1"
            })
        );
        assert_eq!(
            parse(&last_valid_policy_key("billing")),
            Some(Key::LastValidPolicy { service: "billing" })
        );
        assert_eq!(parse("services/billing/other"), None);
        assert_eq!(parse("services//policy"), None);
        assert_eq!(parse("other/billing/policy"), None);
        assert_eq!(parse("services/billing/instances/a/b"), None);
    }
}
