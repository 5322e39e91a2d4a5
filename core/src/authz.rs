//! Caller authorization on the inbound path: who may call the local service.
//!
//! The rule, for a request that the local policy's route table matched to
//! route `r` (or to none):
//! 1. `r.allow`, if the route has one: it replaces `inbound.allow` for the
//!    route's requests (it may be narrower or wider);
//! 2. else `inbound.allow`, if the policy has one;
//! 3. else the bootstrap's `[tls] default_inbound`: `allow-meshed` (the
//!    default, and the only behaviour without `[tls]`) lets every caller the
//!    listener accepted through, `deny` refuses everyone.
//!
//! A list lets a caller through when one entry names it: a service name
//! matches `spiffe://<this sidecar's trust domain>/service/<name>`, a SPIFFE
//! ID matches itself ([`CallerId::matches`]). A caller without an identity (a
//! plaintext connection, allowed by `inbound.allow_plaintext`, or any request
//! to a sidecar without `[tls]`) is refused by every list, empty or not; the
//! `weft-caller` header is never trusted for this. A refusal is a
//! [`ProxyError::Denied`]: 403, `weft-reason: denied`, `weft-limit` naming the
//! key that decided (`routes.<name>.allow`, `inbound.allow` or
//! `tls.default_inbound`).

use std::sync::Arc;

use weft_config::{CallerId, DefaultInbound, TrustDomain};

use crate::error::ProxyError;
use crate::identity::CallerIdentity;

/// The key of the mesh-wide default, in `weft-limit`.
pub const DEFAULT_KEY: &str = "tls.default_inbound";

/// A compiled `allow` list and the policy key it came from.
#[derive(Debug, Clone)]
pub struct Allow {
    key: Arc<str>,
    callers: Arc<[CallerId]>,
}

impl Allow {
    /// `callers` as written under `key` (e.g. `inbound.allow`).
    pub fn new(key: impl Into<Arc<str>>, callers: &[CallerId]) -> Self {
        Self {
            key: key.into(),
            callers: callers.into(),
        }
    }

    /// The policy key of this list.
    pub fn key(&self) -> &str {
        &self.key
    }

    /// The callers listed.
    pub fn callers(&self) -> &[CallerId] {
        &self.callers
    }

    /// Whether `caller` (none: no identity) is listed, for a sidecar of
    /// `trust_domain`.
    pub fn permits(&self, caller: Option<&CallerIdentity>, trust_domain: &TrustDomain) -> bool {
        caller.is_some_and(|caller| {
            self.callers
                .iter()
                .any(|entry| entry.matches(caller.spiffe_id(), trust_domain))
        })
    }
}

/// What the sidecar's bootstrap says about authorization (fixed at start).
#[derive(Debug, Clone)]
pub struct MeshRule {
    /// The sidecar's trust domain (`[tls] trust_domain`; without `[tls]` no
    /// caller has an identity, so any value does).
    pub trust_domain: TrustDomain,
    /// `[tls] default_inbound`; `allow-meshed` without `[tls]`.
    pub default: DefaultInbound,
}

impl MeshRule {
    /// The rule of a bootstrap's `[tls]` section (or its absence).
    pub fn new(tls: Option<&weft_config::Tls>) -> Self {
        match tls {
            Some(tls) => Self {
                trust_domain: tls.trust_domain.clone(),
                default: tls.default_inbound,
            },
            None => Self {
                trust_domain: TrustDomain::default(),
                default: DefaultInbound::AllowMeshed,
            },
        }
    }

    /// Lets `caller` through to `service`, or refuses it: `route` is the
    /// matched route's `allow`, `service_allow` the policy's `inbound.allow`.
    pub fn check(
        &self,
        service: &str,
        caller: Option<&CallerIdentity>,
        route: Option<&Allow>,
        service_allow: Option<&Allow>,
    ) -> Result<(), ProxyError> {
        let key = match route.or(service_allow) {
            Some(allow) if allow.permits(caller, &self.trust_domain) => return Ok(()),
            Some(allow) => Arc::clone(&allow.key),
            None => match self.default {
                DefaultInbound::AllowMeshed => return Ok(()),
                DefaultInbound::Deny => Arc::from(DEFAULT_KEY),
            },
        };
        Err(ProxyError::Denied {
            caller: caller.map_or_else(
                || "a caller without an identity (plaintext)".to_owned(),
                ToString::to_string,
            ),
            service: service.to_owned(),
            limit: key,
        })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn caller(td: &str, name: &str) -> CallerIdentity {
        let id: weft_config::SpiffeId = format!("spiffe://{td}/service/{name}").parse().unwrap();
        CallerIdentity::new(id, name.parse().unwrap())
    }

    fn list(key: &str, callers: &[&str]) -> Allow {
        let callers: Vec<CallerId> = callers.iter().map(|c| c.parse().unwrap()).collect();
        Allow::new(key, &callers)
    }

    fn rule(default: DefaultInbound) -> MeshRule {
        MeshRule {
            trust_domain: "weft.local".parse().unwrap(),
            default,
        }
    }

    fn denied_by(result: Result<(), ProxyError>) -> Option<String> {
        match result {
            Ok(()) => None,
            Err(e) => {
                assert_eq!(e.reason().as_str(), "denied");
                assert_eq!(e.status(), http::StatusCode::FORBIDDEN);
                Some(e.limit().unwrap().to_owned())
            }
        }
    }

    #[test]
    fn a_list_admits_the_callers_it_names_by_service_or_spiffe_id() {
        let web = caller("weft.local", "web");
        let orders = caller("weft.local", "orders");
        let batch = caller("weft.local", "batch");
        let allow = list(
            "inbound.allow",
            &["web", "spiffe://weft.local/service/orders"],
        );
        let td: TrustDomain = "weft.local".parse().unwrap();
        assert!(allow.permits(Some(&web), &td));
        assert!(allow.permits(Some(&orders), &td));
        assert!(!allow.permits(Some(&batch), &td));
        assert!(!allow.permits(None, &td), "no identity, no entry");
        // A name is of the sidecar's trust domain.
        let other: TrustDomain = "other.mesh".parse().unwrap();
        assert!(!allow.permits(Some(&web), &other));
        assert!(!list("k", &[]).permits(Some(&web), &td));
    }

    #[test]
    fn the_route_list_replaces_the_service_list_then_the_default_decides() {
        let web = caller("weft.local", "web");
        let ops = caller("weft.local", "ops");
        let service = list("inbound.allow", &["web"]);
        let route = list("routes.admin.allow", &["ops"]);
        let allowed = rule(DefaultInbound::AllowMeshed);
        let check = |rule: &MeshRule, who, route, service| {
            denied_by(rule.check("billing", who, route, service))
        };

        // The route's list replaces the service's, wider or narrower.
        assert_eq!(
            check(&allowed, Some(&web), Some(&route), Some(&service)),
            Some("routes.admin.allow".into())
        );
        assert_eq!(
            check(&allowed, Some(&ops), Some(&route), Some(&service)),
            None
        );
        // Other routes: the service's list.
        assert_eq!(check(&allowed, Some(&web), None, Some(&service)), None);
        assert_eq!(
            check(&allowed, Some(&ops), None, Some(&service)),
            Some("inbound.allow".into())
        );
        assert_eq!(
            check(&allowed, None, None, Some(&service)),
            Some("inbound.allow".into()),
            "plaintext callers are denied by a list"
        );
        // No list: the mesh default.
        assert_eq!(check(&allowed, Some(&ops), None, None), None);
        assert_eq!(check(&allowed, None, None, None), None);
        let deny = rule(DefaultInbound::Deny);
        assert_eq!(
            check(&deny, Some(&web), None, None),
            Some(DEFAULT_KEY.into())
        );
        assert_eq!(check(&deny, None, None, None), Some(DEFAULT_KEY.into()));
        assert_eq!(check(&deny, Some(&web), None, Some(&service)), None);
        assert_eq!(check(&deny, Some(&ops), Some(&route), None), None);
    }

    #[test]
    fn a_denial_names_the_caller_and_the_service() {
        let web = caller("weft.local", "web");
        let err = rule(DefaultInbound::AllowMeshed)
            .check(
                "billing",
                Some(&web),
                None,
                Some(&list("inbound.allow", &[])),
            )
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "spiffe://weft.local/service/web may not call billing (inbound.allow)"
        );
        let err = rule(DefaultInbound::Deny)
            .check("billing", None, None, None)
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "a caller without an identity (plaintext) may not call billing (tls.default_inbound)"
        );
    }

    #[test]
    fn without_tls_there_is_no_default_deny() {
        let rule = MeshRule::new(None);
        assert_eq!(rule.default, DefaultInbound::AllowMeshed);
        assert!(rule.check("billing", None, None, None).is_ok());
    }
}
