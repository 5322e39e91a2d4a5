//! The inbound path: other sidecars call the local app.
//!
//! Every request goes to the `[service] app` address, whatever its authority says
//! (the inbound listener is never an open proxy to other hosts), and an HTTP/1
//! absolute-form request naming another host is refused outright (403,
//! `foreign-authority`: see [`crate::screen`]). Then the caller must be
//! allowed to call the service: the matched route's `allow`, else
//! `inbound.allow`, else `[tls] default_inbound` ([`crate::authz`]; 403
//! `denied` otherwise), before it spends any limit. Then the local service's
//! policy protects this instance, most specific limit first:
//! 1. the matched route's `rate_limit` (this instance's share of it);
//! 2. `inbound.rate_limit` (this instance's share of the service-wide limit);
//! 3. `inbound.caller_rate_limit`, keyed by the caller identity: the service
//!    named by the client certificate of an mTLS connection
//!    ([`CallerIdentity`], in the request's extensions), else (plaintext: no
//!    `[tls]`, or `inbound.allow_plaintext`) the `weft-caller` header,
//!    `anonymous` when absent;
//! 4. the route's `max_concurrency`, then `inbound.max_concurrency` (each with its
//!    bounded queue), whose permits are held until the response body ends;
//! 5. `inbound.timeout` to the response headers.
//!
//! The client is recorded in `x-forwarded-for` and `forwarded` (`proto=https`
//! over mTLS); `Host` is kept. Over mTLS, `weft-caller` is set to the
//! authenticated caller's name, so the app can trust it. The HTTP version
//! towards the app is the one the caller's sidecar asked for
//! ([`crate::forward::WEFT_PROTOCOL`]: the app's own), else the request's.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use http::{HeaderValue, Request, Response};
use hyper::body::Incoming;

use crate::authz::MeshRule;
use crate::body::{self, ProxyBody, Tracked};
use crate::directory::Directory;
use crate::error::{ProxyError, error_response};
use crate::forward::{Hop, forward, take_protocol};
use crate::headers;
use crate::outbound::WEFT_CALLER;
use crate::screen::{self, LocalNames};
use crate::state::Shared;
use crate::telemetry::{Direction, Observation};
use crate::tls::CallerIdentity;

/// The caller identity of requests that carry none.
pub const ANONYMOUS: &str = "anonymous";

/// The inbound listener's service (one clone per connection).
#[derive(Debug, Clone)]
pub struct Inbound {
    shared: Arc<Shared>,
    client_addr: SocketAddr,
    /// `[limits] max_uri_length` (fixed at start).
    max_uri_length: usize,
    /// `[service] advertise`, which absolute-form requests may name.
    advertise: Option<SocketAddr>,
    /// `[tls]`'s authorization default and trust domain (fixed at start).
    mesh_rule: Arc<MeshRule>,
}

impl Inbound {
    pub fn new(shared: Arc<Shared>, client_addr: SocketAddr, mesh_rule: Arc<MeshRule>) -> Self {
        let max_uri_length = crate::outbound::max_uri_length(&shared);
        let advertise = shared
            .config()
            .loaded
            .bootstrap
            .service
            .as_ref()
            .and_then(|s| s.advertise);
        Self {
            shared,
            client_addr,
            max_uri_length,
            advertise,
            mesh_rule,
        }
    }

    async fn handle(self, mut req: Request<Incoming>) -> Response<ProxyBody> {
        let directory = self.shared.directory();
        let stats = directory
            .local
            .as_ref()
            .map(|l| Arc::clone(&l.policy.stats));
        if let Some(stats) = &stats {
            stats.request();
        }
        let mut observation =
            Observation::start(&self.shared.reporters, Direction::Inbound, &mut req);
        match self.proxy(&directory, req, &mut observation).await {
            Ok(rsp) => observation.respond(rsp),
            Err(error) => {
                if let Some(stats) = &stats {
                    stats.refusal(error.reason());
                }
                observation.refused(&error);
                if matches!(error, ProxyError::Denied { .. }) {
                    tracing::debug!(client.addr = %self.client_addr, reason = error.reason(), limit = error.limit(), error = %error, "inbound request denied");
                } else {
                    tracing::info!(client.addr = %self.client_addr, reason = error.reason(), error = %crate::error::chain(&error), "inbound request refused");
                }
                observation.respond(error_response(&error))
            }
        }
    }

    async fn proxy(
        &self,
        directory: &Directory,
        mut req: Request<Incoming>,
        observation: &mut Observation,
    ) -> Result<Response<ProxyBody>, ProxyError> {
        let local = directory.local.as_ref().ok_or(ProxyError::NoLocalService)?;
        observation.set_service(&local.label);
        screen::request(&req, self.max_uri_length)?;
        screen::inbound_authority(
            &req,
            LocalNames {
                service: local.name.as_str(),
                listener: self.shared.bound().map(|b| b.inbound),
                advertise: self.advertise,
            },
        )?;
        let policy = &local.policy;
        let index = policy
            .routes()
            .find(req.method(), req.uri().path(), req.headers());
        observation.set_route(policy.routes().label(index));
        let route = policy.route(index);
        let identity = req.extensions().get::<CallerIdentity>().cloned();
        self.mesh_rule.check(
            local.name.as_str(),
            identity.as_ref(),
            route.and_then(|r| r.allow.as_ref()),
            policy.allow.as_ref(),
        )?;
        if let Some(limit) = route.and_then(|r| r.rate_limit.as_ref()) {
            limit.check()?;
        }
        if let Some(limit) = &policy.rate_limit {
            limit.check()?;
        }
        if let Some(limit) = &policy.caller_rate_limit {
            let caller = match &identity {
                Some(identity) => identity.service().as_str(),
                None => req
                    .headers()
                    .get(WEFT_CALLER)
                    .and_then(|v| v.to_str().ok())
                    .filter(|v| !v.is_empty())
                    .unwrap_or(ANONYMOUS),
            };
            limit.check(caller)?;
        }
        let route_permit = match route.and_then(|r| r.concurrency.as_ref()) {
            Some(cap) => Some(cap.acquire().await?),
            None => None,
        };
        let permit = match &policy.concurrency {
            Some(cap) => Some(cap.acquire().await?),
            None => None,
        };
        let host = headers::requested_host(&req);
        let proto = match &identity {
            Some(identity) => {
                if let Ok(name) = HeaderValue::from_str(identity.service().as_str()) {
                    req.headers_mut().insert(WEFT_CALLER, name);
                }
                "https"
            }
            None => "http",
        };
        headers::add_forwarded_proto(req.headers_mut(), self.client_addr, host.as_deref(), proto);
        let protocol = take_protocol(req.headers_mut());
        observation.set_endpoint(local.addr);
        let hop = Hop {
            client: &local.client,
            endpoint: local.addr,
            authority: local.authority.as_ref(),
            pools: None,
            protocol,
            tasks: &self.shared.tasks,
        };
        let rsp = match &policy.timeout {
            Some(t) => tokio::time::timeout(t.after, forward(hop, req))
                .await
                .map_err(|_| ProxyError::Timeout {
                    limit: Arc::clone(&t.limit),
                    after: t.after,
                })??,
            None => forward(hop, req).await?,
        };
        Ok(rsp.map(|b| body::boxed(Tracked::new(b, (route_permit, permit)))))
    }
}

impl tower::Service<Request<Incoming>> for Inbound {
    type Response = Response<ProxyBody>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<Incoming>) -> Self::Future {
        let this = self.clone();
        Box::pin(async move { Ok(this.handle(req).await) })
    }
}
