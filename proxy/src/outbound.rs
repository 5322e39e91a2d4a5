//! The outbound path: the local app calls a service by its logical name.
//!
//! Stages, in order (each refusal is answered at once, never queued):
//! 1. destination: the request's authority ([`Destination`]);
//! 2. discovery: a static directory service, a service pushed by the control plane
//!    (subscribed on first use, waiting at most a second), an IP literal, or a name
//!    resolved through DNS (waiting, bounded, for the first answer); this gives the endpoints, the
//!    balancer, the connection pool and the compiled [`OutboundPolicy`];
//! 3. route: the first matching route of the service's policy, which resolves the
//!    timeouts and the retry policy;
//! 4. `outbound.rate_limit`: this sidecar's own rate towards the service;
//! 5. the whole-request timeout (to the response headers: a response that streams
//!    is never cut by it), around
//! 6. attempts: pick an endpoint (outlier ejection, per-endpoint caps, splits,
//!    locality, avoiding endpoints already tried), send with the per-try timeout,
//!    record the outcome for outlier detection, and retry what the route allows
//!    while the retry budget lasts, after a jittered backoff. A body of known length
//!    up to the route's cap is buffered for replay; a larger one, or one of unknown
//!    length (a stream), is sent once and not retried.
//!
//! The endpoint's in-flight count lasts until the response body ends. Failures at
//! any stage become responses in one place ([`error_response`]); this service never
//! fails, so hyper always has something to send.

use std::borrow::Cow;
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use http::{HeaderValue, Request, Response};
use http_body::Body as _;
use hyper::body::Incoming;
use weft_config::Protocol;

use crate::balance::select::{SelectError, Selection, select};
use crate::balance::{Balancer, Endpoint, InFlight};
use crate::body::{self, IdleTimeout, ProxyBody, Tracked};
use crate::client::UpstreamClient;
use crate::directory::Directory;
use crate::discovery::EndpointSet;
use crate::error::{ProxyError, WEFT_REASON, error_response};
use crate::forward::{self, Hop, RequestHead};
use crate::policy::{OutboundPolicy, RoutePlan};
use crate::retry::backoff::backoff;
use crate::retry::classify::{Outcome, classify_error, grpc_status, is_failure, retryable};
use crate::retry::replay::{self, Prepared};
use crate::screen;
use crate::state::Shared;
use crate::stats::Stats;
use crate::target::Destination;
use crate::telemetry::{Direction, EXTERNAL, Observation, RetrySkipped};

/// Port assumed for an IP literal without one.
const DEFAULT_PORT: u16 = 80;

/// How long a request for a name not yet known waits for the control plane
/// before falling back to DNS.
const CONTROL_PLANE_WAIT: std::time::Duration = std::time::Duration::from_secs(1);

/// The header carrying the calling service's identity to the callee's sidecar.
pub const WEFT_CALLER: &str = "weft-caller";

/// The outbound listener's service (one clone per connection).
#[derive(Debug, Clone)]
pub struct Outbound {
    shared: Arc<Shared>,
    client_addr: SocketAddr,
    /// `[limits] max_uri_length` (fixed at start).
    max_uri_length: usize,
}

/// Where one request goes: discovery's answer.
struct Target<'a> {
    /// The name refusals and logs use (borrowed on the common paths: no
    /// allocation per request).
    service: Cow<'a, str>,
    endpoints: Arc<EndpointSet>,
    balancer: &'a Balancer,
    client: &'a UpstreamClient,
    /// Whether the endpoints last beyond this request, so their own pools
    /// are worth keeping (an IP literal's endpoint is made per request: it uses
    /// the client's shared pools).
    endpoint_pools: bool,
    protocol: Protocol,
    policy: Arc<OutboundPolicy>,
}

impl Outbound {
    pub fn new(shared: Arc<Shared>, client_addr: SocketAddr) -> Self {
        let max_uri_length = max_uri_length(&shared);
        Self {
            shared,
            client_addr,
            max_uri_length,
        }
    }

    async fn handle(self, mut req: Request<Incoming>) -> Response<ProxyBody> {
        let method = req.method().clone();
        // Logged on refusal: bounded, whatever length the client sent.
        let path = truncated(req.uri().path(), LOGGED_PATH_MAX).to_owned();
        let mut stats = None;
        let mut observation =
            Observation::start(&self.shared.reporters, Direction::Outbound, &mut req);
        match self.proxy(req, &mut stats, &mut observation).await {
            Ok(rsp) => observation.respond(rsp),
            Err(error) => {
                if let Some(stats) = &stats {
                    stats.refusal(error.reason());
                }
                observation.refused(&error);
                tracing::info!(
                    client.addr = %self.client_addr,
                    http.method = %method,
                    http.path = %path,
                    reason = error.reason(),
                    limit = error.limit(),
                    error = %crate::error::chain(&error),
                    "outbound request refused"
                );
                observation.respond(error_response(&error))
            }
        }
    }

    async fn proxy(
        &self,
        mut req: Request<Incoming>,
        stats: &mut Option<Arc<Stats>>,
        observation: &mut Observation,
    ) -> Result<Response<ProxyBody>, ProxyError> {
        screen::request(&req, self.max_uri_length)?;
        let dest = Destination::from_request(&req)?;
        let directory = self.shared.directory();
        let dns_target;
        let static_service = directory.service(&dest.host);
        let remote = match (static_service, self.shared.remote()) {
            (None, Some(remote)) if dest.ip().is_none() => {
                remote.get(&dest.host, CONTROL_PLANE_WAIT).await
            }
            _ => None,
        };
        let target = if let Some(svc) = static_service.or(remote.as_ref()) {
            observation.set_service(&svc.label);
            Target {
                service: Cow::Borrowed(svc.name.as_str()),
                endpoints: Arc::clone(&svc.endpoints().borrow()),
                balancer: &svc.balancer,
                client: &svc.client,
                endpoint_pools: true,
                protocol: svc.protocol,
                policy: Arc::clone(&svc.policy),
            }
        } else if let Some(ip) = dest.ip() {
            observation.set_service(&EXTERNAL);
            let addr = SocketAddr::new(ip, dest.port.unwrap_or(DEFAULT_PORT));
            Target {
                service: Cow::Owned(addr.to_string()),
                endpoints: Arc::new(EndpointSet::from_endpoints(vec![Arc::new(Endpoint::new(
                    addr,
                    Default::default(),
                ))])),
                balancer: &directory.dns_balancer,
                client: &directory.default_client,
                endpoint_pools: false,
                protocol: Protocol::Auto,
                policy: Arc::clone(&directory.default_policy),
            }
        } else {
            observation.set_service(&EXTERNAL);
            dns_target = directory.dns().resolve(&dest.host, dest.port).await?;
            Target {
                service: Cow::Borrowed(dest.host.as_str()),
                endpoints: Arc::clone(&dns_target.endpoints().borrow()),
                balancer: &directory.dns_balancer,
                client: &directory.default_client,
                endpoint_pools: true,
                protocol: Protocol::Auto,
                policy: Arc::clone(&directory.default_policy),
            }
        };
        let policy = Arc::clone(&target.policy);
        *stats = Some(Arc::clone(&policy.stats));
        policy.stats.request();

        let route = policy
            .routes()
            .find(req.method(), req.uri().path(), req.headers());
        let plan = policy.plan(route);
        observation.set_route(policy.routes().label(route));
        if let Some(limit) = &policy.rate_limit {
            limit.check()?;
        }
        // The callee's sidecar keys per-caller limits on this; the app cannot
        // set it, nor the protocol sidecars agree on between themselves.
        req.headers_mut().remove(WEFT_CALLER);
        req.headers_mut().remove(crate::forward::WEFT_PROTOCOL);
        if let Some(caller) = directory
            .caller
            .as_ref()
            .and_then(|c| HeaderValue::from_str(c.as_str()).ok())
        {
            req.headers_mut().insert(WEFT_CALLER, caller);
        }

        let attempts = self.attempts(&directory, &target, &plan, req, observation);
        let rsp = match &plan.timeout {
            Some(t) => tokio::time::timeout(t.after, attempts)
                .await
                .map_err(|_| ProxyError::Timeout {
                    limit: Arc::clone(&t.limit),
                    after: t.after,
                })??,
            None => attempts.await?,
        };
        Ok(rsp)
    }

    /// Send the request, retrying as the route allows.
    async fn attempts(
        &self,
        directory: &Directory,
        target: &Target<'_>,
        plan: &RoutePlan<'_>,
        req: Request<Incoming>,
        observation: &mut Observation,
    ) -> Result<Response<ProxyBody>, ProxyError> {
        let policy = &target.policy;
        let retry = &plan.retry;
        let (mut head, incoming) = forward::prepare(req);
        // Buffer for replay only a body whose length is known up front (or that is
        // empty): a body of unknown length may be a stream that waits for the
        // response (full duplex, gRPC streaming), which buffering would deadlock.
        let known_length = incoming.is_end_stream() || incoming.size_hint().exact().is_some();
        let mut body = if retry.attempts > 0 && !head.is_upgrade() && known_length {
            replay::prepare(incoming, retry.max_replay_body.get()).await?
        } else {
            Prepared::Streaming(body::boxed(incoming))
        };
        plan.budget.deposit();

        let locality = directory
            .caller_zone
            .as_deref()
            .map(|zone| (zone, policy.outbound.locality));
        let mut tried: Vec<SocketAddr> = Vec::new();
        let select_next = |tried: &[SocketAddr]| {
            let selection = Selection {
                splits: &policy.splits,
                locality,
                endpoint_cap: policy.endpoint_cap(),
                tried,
            };
            select(target.balancer, target.endpoints.endpoints(), &selection)
        };
        let mut next = select_next(&tried).map_err(|e| select_error(e, &target.service))?;
        let mut attempt = 0u32;
        loop {
            let in_flight = next;
            let endpoint = Arc::clone(in_flight.endpoint());

            let attempt_body = match &mut body {
                Prepared::Replayable(replay) => replay.body(),
                Prepared::Streaming(streaming) => std::mem::replace(streaming, body::empty()),
            };
            observation.set_endpoint(endpoint.addr());
            let result = self
                .send_once(target, plan, &mut head, attempt_body, &endpoint)
                .await;
            let outcome = match &result {
                Ok(rsp) => Outcome::Response {
                    status: rsp.status(),
                    grpc_status: grpc_status(rsp.headers()),
                },
                Err(ProxyError::Connect { .. }) => Outcome::ConnectFailure,
                Err(ProxyError::Upstream { source, .. }) => classify_error(source),
                Err(ProxyError::Timeout { .. }) => Outcome::Timeout,
                Err(_) => return result.map(|rsp| self.finish(policy, rsp, in_flight)),
            };
            self.record_outcome(policy, &target.endpoints, &endpoint, outcome, observation);
            if result.is_ok() {
                in_flight.observe_response();
            }

            let replayable = matches!(body, Prepared::Replayable(_));
            if attempt >= retry.attempts || !retryable(retry, &head.method, outcome) {
                return result.map(|rsp| self.finish(policy, rsp, in_flight));
            }
            if !replayable {
                observation.retry_skipped(RetrySkipped::NotReplayable);
                return result.map(|rsp| self.finish(policy, rsp, in_flight));
            }
            if !plan.budget.withdraw() {
                tracing::debug!(service = %target.service, endpoint.addr = %endpoint.addr(), "retry budget spent");
                policy.stats.refusal("budget-exhausted");
                observation.retry_skipped(RetrySkipped::BudgetExhausted);
                return match result {
                    Ok(rsp) => {
                        observation.refused_for("budget-exhausted", None);
                        let mut rsp = self.finish(policy, rsp, in_flight);
                        rsp.headers_mut()
                            .insert(WEFT_REASON, HeaderValue::from_static("budget-exhausted"));
                        Ok(rsp)
                    }
                    Err(last) => Err(ProxyError::BudgetExhausted {
                        last: Box::new(last),
                    }),
                };
            }
            // Choose where the retry goes before letting go of this failure: if no
            // endpoint can take it now, the client gets this failure, not a refusal.
            tried.push(endpoint.addr());
            next = match select_next(&tried) {
                Ok(next) => next,
                Err(_) => {
                    observation.retry_skipped(RetrySkipped::NoEndpoint);
                    return result.map(|rsp| self.finish(policy, rsp, in_flight));
                }
            };
            drop(result);
            drop(in_flight);
            attempt += 1;
            policy.stats.retry();
            observation.retry();
            let wait = backoff(&retry.backoff, attempt);
            tracing::debug!(service = %target.service, endpoint.addr = %endpoint.addr(), attempt, ?outcome, backoff_ms = wait.as_millis() as u64, "retrying");
            tokio::time::sleep(wait).await;
        }
    }

    /// One attempt, bounded by the per-try timeout.
    async fn send_once(
        &self,
        target: &Target<'_>,
        plan: &RoutePlan<'_>,
        head: &mut RequestHead,
        body: ProxyBody,
        endpoint: &Endpoint,
    ) -> Result<Response<Incoming>, ProxyError> {
        let (authority, pools, endpoint) =
            (endpoint.authority(), endpoint.pools(), endpoint.addr());
        if let Some(b) = self.shared.bound()
            && (b.outbound == endpoint
                || (b.outbound.ip().is_unspecified()
                    && b.outbound.port() == endpoint.port()
                    && endpoint.ip().is_loopback()))
        {
            return Err(ProxyError::Loop {
                listener: b.outbound,
            });
        }
        let hop = Hop {
            client: target.client,
            endpoint,
            authority,
            pools: target.endpoint_pools.then_some(pools),
            protocol: target.protocol,
            tasks: &self.shared.tasks,
        };
        let send = forward::send(hop, head, body);
        match &plan.per_try_timeout {
            Some(t) => {
                tokio::time::timeout(t.after, send)
                    .await
                    .map_err(|_| ProxyError::Timeout {
                        limit: Arc::clone(&t.limit),
                        after: t.after,
                    })?
            }
            None => send.await,
        }
    }

    /// Passive health: count failures, eject within `max_ejected_percent`.
    fn record_outcome(
        &self,
        policy: &OutboundPolicy,
        set: &EndpointSet,
        endpoint: &Endpoint,
        outcome: Outcome,
        observation: &Observation,
    ) {
        let now = Instant::now();
        if !is_failure(outcome) {
            endpoint.outlier().success(now);
            return;
        }
        let settings = &policy.outbound.outlier;
        let may_eject = || {
            let total = set.endpoints().len();
            let ejected = set
                .endpoints()
                .iter()
                .filter(|e| e.outlier().is_ejected(now))
                .count();
            (ejected + 1) * 100 <= usize::from(settings.max_ejected_percent.get()) * total
        };
        if let Some(time) = endpoint.outlier().failure(settings, now, may_eject) {
            policy.stats.ejection();
            observation.ejection();
            tracing::warn!(endpoint.addr = %endpoint.addr(), ejection_ms = time.as_millis() as u64, "endpoint ejected after consecutive failures");
        }
    }

    /// The response to send downstream: the endpoint's in-flight slot lasts until
    /// its body ends, and an idle body is cut after `outbound.idle_timeout`.
    fn finish(
        &self,
        policy: &OutboundPolicy,
        rsp: Response<Incoming>,
        in_flight: InFlight,
    ) -> Response<ProxyBody> {
        let idle = policy.outbound.idle_timeout.map(|d| d.get());
        rsp.map(|b| match idle {
            Some(idle) => body::boxed(Tracked::new(IdleTimeout::new(b, idle), in_flight)),
            None => body::boxed(Tracked::new(b, in_flight)),
        })
    }
}

/// The longest path a refusal log line repeats.
const LOGGED_PATH_MAX: usize = 256;

/// `text` cut to at most `max` bytes, on a character boundary.
fn truncated(text: &str, max: usize) -> &str {
    let end = (0..=max.min(text.len()))
        .rev()
        .find(|i| text.is_char_boundary(*i))
        .unwrap_or(0);
    &text[..end]
}

/// `[limits] max_uri_length` in bytes.
pub(crate) fn max_uri_length(shared: &Shared) -> usize {
    let limit = shared.config().loaded.bootstrap.limits.max_uri_length.get();
    usize::try_from(limit).unwrap_or(usize::MAX)
}

fn select_error(error: SelectError, service: &str) -> ProxyError {
    let service = service.to_owned();
    match error {
        SelectError::NoEndpoints => ProxyError::NoEndpoints { service },
        SelectError::NoHealthy => ProxyError::NoHealthyEndpoints { service },
        SelectError::Saturated => ProxyError::EndpointsSaturated { service },
    }
}

impl tower::Service<Request<Incoming>> for Outbound {
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
