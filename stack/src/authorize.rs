//! Authorize: who may call the local service, before the request spends any
//! limit.
//!
//! The caller is the service named by the client certificate of an mTLS
//! connection ([`CallerIdentity`], in the request's extensions); a
//! plaintext caller has none. The matched route's `allow` decides, else
//! `inbound.allow`, else `[tls] default_inbound` ([`MeshRule`]); a refusal
//! is 403 `denied`, naming the key that refused.

use std::sync::Arc;
use std::task::{Context, Poll};

use futures_util::future::{Either, Ready, ready};
use http::Request;
use tower::{Layer, Service};

use weft_core::authz::MeshRule;
use weft_core::error::ProxyError;
use weft_core::policy::{InboundPolicy, InboundRoute};
use weft_transport::tls::CallerIdentity;

// ===== layer =====

#[derive(Debug, Clone)]
pub struct AuthorizeLayer {
    service: Arc<str>,
    rule: Arc<MeshRule>,
    policy: Arc<InboundPolicy>,
}

impl AuthorizeLayer {
    /// Callers of `service`, under `rule` and the service's `policy`.
    pub fn new(service: Arc<str>, rule: Arc<MeshRule>, policy: Arc<InboundPolicy>) -> Self {
        Self {
            service,
            rule,
            policy,
        }
    }
}

impl<S> Layer<S> for AuthorizeLayer {
    type Service = Authorize<S>;

    fn layer(&self, inner: S) -> Authorize<S> {
        Authorize {
            inner,
            layer: self.clone(),
        }
    }
}

// ===== service =====

#[derive(Debug, Clone)]
pub struct Authorize<S> {
    inner: S,
    layer: AuthorizeLayer,
}

impl<S, B> Service<Request<B>> for Authorize<S>
where
    S: Service<Request<B>, Error = ProxyError>,
{
    type Response = S::Response;
    type Error = ProxyError;
    type Future = Either<Ready<Result<S::Response, ProxyError>>, S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), ProxyError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let route = req.extensions().get::<Arc<InboundRoute>>();
        let layer = &self.layer;
        let checked = layer.rule.check(
            &layer.service,
            req.extensions().get::<CallerIdentity>(),
            route.and_then(|r| r.allow.as_ref()),
            layer.policy.allow.as_ref(),
        );
        match checked {
            Ok(()) => Either::Right(self.inner.call(req)),
            Err(denied) => Either::Left(ready(Err(denied))),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use std::time::Duration;

    use tower::ServiceExt;
    use weft_config::TrustDomain;

    use super::*;
    use crate::route::RouteLayer;
    use crate::test_util::{arrived, pair, refusal};

    fn caller(name: &str) -> CallerIdentity {
        let td: TrustDomain = "weft.local".parse().unwrap();
        let ca = weft_certs::Ca::generate(&td).unwrap();
        let issued = ca
            .issue(&name.parse().unwrap(), Duration::from_secs(3600))
            .unwrap();
        weft_transport::tls::identity::service_identity(issued.cert_der(), &td).unwrap()
    }

    #[tokio::test]
    async fn a_route_allow_list_replaces_the_service_one_before_any_limit() {
        let policy = weft_config::parse_policy(
            "service = \"billing\"\n[inbound]\nallow = [\"web\"]\n\
             [[routes]]\nname = \"admin\"\nmatch = { path_prefix = \"/admin\" }\nallow = [\"ops\"]\n",
            std::path::Path::new("billing.toml"),
        )
        .unwrap();
        let policy = Arc::new(InboundPolicy::new(
            Some(&policy),
            weft_core::limits::Share::ONE,
            Arc::new(weft_core::stats::Stats::default()),
            None,
        ));
        let rule = Arc::new(MeshRule::new(None));
        let (service, mut handle) = pair::<Request<()>, ()>();
        let mut layer = RouteLayer::new(Arc::clone(&policy))
            .layer(AuthorizeLayer::new(Arc::from("billing"), rule, policy).layer(service));
        handle.allow(10);
        let from = |path: &str, who: &str| {
            let mut req = Request::get(path).body(()).unwrap();
            req.extensions_mut().insert(caller(who));
            req
        };
        for (path, who, admitted) in [
            ("/pay", "web", true),
            ("/pay", "ops", false),
            ("/admin/x", "ops", true),
            ("/admin/x", "web", false),
        ] {
            let rsp = layer.ready().await.unwrap().call(from(path, who));
            match arrived(&mut handle).await {
                Some((_, send)) => {
                    assert!(admitted, "{who} reached {path}");
                    send.send_response(());
                    rsp.await.unwrap();
                }
                None => {
                    assert!(!admitted, "{who} refused on {path}");
                    let denied = refusal(rsp.await);
                    let key = if path == "/pay" {
                        "inbound.allow"
                    } else {
                        "routes.admin.allow"
                    };
                    assert_eq!(denied.limit(), Some(key));
                }
            }
        }
    }
}
