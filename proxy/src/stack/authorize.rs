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

use crate::authz::MeshRule;
use crate::error::ProxyError;
use crate::policy::{InboundPolicy, InboundRoute};
use crate::tls::CallerIdentity;

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
