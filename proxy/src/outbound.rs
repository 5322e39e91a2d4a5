//! The outbound stack: the local app calls a service by its logical name.
//!
//! One builder per level, top to bottom, in the order a request meets them:
//!
//! ```text
//! per connection  Observe -> Respond -> Screen -> Discover
//! per service     Route -> Fault -> RateLimit -> Forwarded -> Timeout -> ColdStart -> Retry -> Hedge -> Balance
//! per endpoint    Timeout (per try) -> EndpointClient
//! ```
//!
//! [`Discover`] finds where the request goes from its authority
//! ([`Destination`]): a static directory service, a service pushed by the
//! control plane (subscribed on first use, waiting at most a second), an IP
//! literal, or a name resolved through DNS (waiting, bounded, for the first
//! answer); it names the service in the request's context and sends the
//! request down that service's stack ([`service_stack`]). A directory or
//! pushed service's stack is built on its first request and kept in the
//! service (`MeshService::stack`) until a reload or a push replaces the
//! service; each request runs a clone of it (as cheap as a build: a few
//! reference counts). IP literals and DNS names get a stack per request. Every stage is a
//! layer of [`weft_stack`]; why each sits where it does is said where it
//! is pushed.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use futures_util::future::Either;
use http::{HeaderValue, Request, Response};
use hyper::body::Incoming;
use tower::{Service, ServiceBuilder};
use weft_config::Protocol;

use crate::activator::HttpActivator;
use crate::state::LiveState;
use crate::telemetry::{Direction, EXTERNAL, RequestObserver};
use weft_core::body::ProxyBody;
use weft_core::error::ProxyError;
use weft_core::policy::OutboundPolicy;
use weft_core::target::Destination;
use weft_discovery::balance::{Balancer, Endpoint};
use weft_discovery::directory::{Directory, MeshService};
use weft_discovery::endpoints::EndpointSet;
use weft_stack::balance::{Balance, Endpoints, InFlightBody};
use weft_stack::cold_start::{Activator, ColdStart, ColdStartLayer};
use weft_stack::context::RequestContext;
use weft_stack::endpoint::{AppProtocol, NewEndpoint};
use weft_stack::fault::{Fault, FaultLayer};
use weft_stack::forwarded::{self, Forwarded, ForwardedLayer};
use weft_stack::hedge::{Hedge, HedgeLayer};
use weft_stack::observe::{Observe, ObserveLayer};
use weft_stack::rate_limit::{RateLimit, RateLimitLayer};
use weft_stack::respond::{Respond, RespondLayer, Side};
use weft_stack::retry::{Retry, RetryLayer};
use weft_stack::route::{Route, RouteLayer};
use weft_stack::screen::{Screen, ScreenLayer};
use weft_stack::timeout::{self, Timeout, TimeoutLayer};
use weft_stack::{Boxed, NewLayered};
use weft_transport::client::UpstreamClient;
use weft_transport::pool::ResponseBody;

/// Port assumed for an IP literal without one.
const DEFAULT_PORT: u16 = 80;

/// How long a request for a name not yet known waits for the control plane
/// before falling back to DNS.
const CONTROL_PLANE_WAIT: std::time::Duration = std::time::Duration::from_secs(1);

pub use weft_core::headers::WEFT_CALLER;

/// One endpoint's stack: a try, bounded by the route's per-try timeout.
pub type NewEndpointStack = NewLayered<TimeoutLayer, NewEndpoint>;

/// One service's stack.
pub type ServiceStack = Route<
    Fault<RateLimit<Forwarded<Timeout<ColdStart<Retry<Hedge<Balance<NewEndpointStack>>>>>>>>,
    OutboundPolicy,
>;

/// What the stack of one destination is built from.
#[derive(Debug)]
pub struct ServiceParts<'a> {
    /// The name refusals name.
    pub service: Arc<str>,
    pub endpoints: Endpoints,
    pub balancer: &'a Balancer,
    pub client: &'a Arc<UpstreamClient>,
    /// Whether the endpoints last beyond this request (an IP literal's does
    /// not: it uses the client's shared pools).
    pub endpoint_pools: bool,
    pub protocol: Protocol,
    pub policy: &'a Arc<OutboundPolicy>,
}

/// What every service's stack shares: this sidecar's side of the calls.
#[derive(Debug, Clone)]
pub struct Caller {
    /// This sidecar's service, as `weft-caller`.
    pub name: Option<HeaderValue>,
    /// Its zone, for `outbound.locality`.
    pub zone: Option<Arc<str>>,
    /// This sidecar's outbound listener (no try may loop back to it).
    pub listener: Option<SocketAddr>,
    pub tasks: tokio_util::task::TaskTracker,
    /// Who is told when a service with `outbound.cold_start.activate` is
    /// called at zero instances (directory and pushed services only).
    pub activator: Option<Arc<dyn Activator>>,
}

impl Caller {
    pub fn of(directory: &Directory, shared: &LiveState) -> Self {
        Self {
            name: directory.caller_header.clone(),
            zone: directory.caller_zone.clone(),
            listener: shared.bound().map(|b| b.outbound),
            tasks: shared.tasks.clone(),
            activator: None,
        }
    }

    /// With the sidecar's activator (for a directory or pushed service).
    fn with_activator(self, directory: &Directory, shared: &LiveState) -> Self {
        let activator = HttpActivator {
            client: Arc::clone(&shared.activator),
            dns: Arc::clone(directory.dns()),
            metrics: Arc::clone(&shared.metrics),
            tasks: shared.tasks.clone(),
        };
        Self {
            activator: Some(Arc::new(activator)),
            ..self
        }
    }
}

/// One service's stack, top to bottom.
pub fn service_stack(parts: ServiceParts<'_>, caller: Caller) -> ServiceStack {
    let policy = parts.policy;
    let new_endpoint = NewEndpoint::new(
        Arc::clone(parts.client),
        AppProtocol::Fixed(parts.protocol),
        caller.tasks,
    )
    .refuse_loops_to(caller.listener);
    let cold_start = ColdStartLayer::new(
        Arc::clone(&parts.service),
        parts.endpoints.clone(),
        policy.cold_start.clone(),
        caller.activator,
    );
    let new_endpoint = if parts.endpoint_pools {
        new_endpoint
    } else {
        new_endpoint.shared_pools()
    };
    ServiceBuilder::new()
        // First: every layer below reads the matched route's plan.
        .layer(RouteLayer::new(Arc::clone(policy)))
        // Injected faults (where permitted), right after the route is
        // known: an injected abort spends nothing below, and an injected
        // delay is not counted against the route's timeouts (it stands for
        // a slow network or service in front of them).
        .layer(FaultLayer)
        // This sidecar's own rate to the service: refused before anything
        // else is spent on it.
        .layer(RateLimitLayer::service(policy.rate_limit.as_ref()))
        // Headers set once, whatever the number of tries.
        .layer(ForwardedLayer::new(forwarded::Side::Outbound {
            caller: caller.name,
        }))
        // The whole request, around every try and backoff; to the response
        // headers only (a response that streams is never cut by it).
        .layer(TimeoutLayer::new(timeout::Which::Request))
        // Below the whole-request timeout, which bounds a held call too (the
        // shorter of the two wins); above the retries, so a held call's body
        // is not buffered for replay (nor read at all) while it waits, and
        // its released tries are budgeted as any others.
        .layer(cold_start)
        // Above the balancer: each retry picks an endpoint afresh.
        .layer(RetryLayer)
        // Below the retries, above the balancer: each try may be hedged to
        // another endpoint (the balancer picks it, avoiding those tried),
        // reusing the body the retry layer buffered and its budget; a
        // failure still goes up to be retried.
        .layer(HedgeLayer)
        // Picks each try's endpoint; it also enforces the per-endpoint caps
        // (`endpoint_max_concurrency`, or `adaptive_concurrency`, which the
        // tries' latencies feed), since a full endpoint must be skipped, not
        // refused, and only the balancer knows the others.
        .service(Balance::new(
            parts.service,
            parts.endpoints,
            parts.balancer.clone(),
            Arc::clone(policy),
            caller.zone,
            // Per endpoint, below the balancer: a try that times out counts
            // against its endpoint for outlier detection.
            NewLayered::new(TimeoutLayer::new(timeout::Which::PerTry), new_endpoint),
        ))
}

/// The outbound listener's service (one per client connection).
pub type OutboundStack = Observe<RequestObserver, Respond<Screen<Discover>>>;

/// The outbound listener's service, boxing the response body for hyper.
#[derive(Debug, Clone)]
pub struct Outbound {
    stack: OutboundStack,
}

impl Outbound {
    pub fn new(shared: Arc<LiveState>, client: SocketAddr) -> Self {
        let max_uri_length = max_uri_length(&shared);
        let stack = ServiceBuilder::new()
            // First: the observation covers every request, refused or not.
            .layer(ObserveLayer::new(RequestObserver::new(
                Arc::clone(&shared.reporters),
                Direction::Outbound,
            )))
            // Every error below becomes a response here, and only here.
            .layer(RespondLayer::new(Side::Outbound, client))
            // Cheap checks before any lookup.
            .layer(ScreenLayer::new(max_uri_length))
            .service(Discover { shared });
        Self { stack }
    }
}

impl Service<Request<Incoming>> for Outbound {
    type Response = Response<ProxyBody>;
    type Error = Infallible;
    type Future = Boxed<<OutboundStack as Service<Request<Incoming>>>::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Service::<Request<Incoming>>::poll_ready(&mut self.stack, cx)
    }

    fn call(&mut self, req: Request<Incoming>) -> Self::Future {
        Boxed::new(self.stack.call(req))
    }
}

/// Where a request goes: the destination's stack.
#[derive(Debug, Clone)]
pub struct Discover {
    shared: Arc<LiveState>,
}

impl Discover {
    /// Discovery over `shared`'s directory (also used by `weft-client`).
    pub fn new(shared: Arc<LiveState>) -> Self {
        Self { shared }
    }
}

/// The request bodies a stack takes: any the retry layer can replay (a
/// listener's, or an in-process client's).
pub trait StackBody:
    http_body::Body<Data = bytes::Bytes, Error: Into<weft_core::body::BoxError>>
    + Send
    + Unpin
    + 'static
{
}

impl<B> StackBody for B where
    B: http_body::Body<Data = bytes::Bytes, Error: Into<weft_core::body::BoxError>>
        + Send
        + Unpin
        + 'static
{
}

/// The future of a request whose stack is known at once (a directory
/// service, a service the control plane already described, an IP literal),
/// or of one that waits for the control plane or DNS first (boxed: rare).
pub type DiscoverFuture<B> = Either<
    StackFuture<B>,
    Pin<Box<dyn Future<Output = Result<Response<InFlightBody<ResponseBody>>, ProxyError>> + Send>>,
>;

type StackFuture<B> = <ServiceStack as Service<Request<B>>>::Future;

impl<B: StackBody> Service<Request<B>> for Discover {
    type Response = Response<InFlightBody<ResponseBody>>;
    type Error = ProxyError;
    type Future = DiscoverFuture<B>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), ProxyError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<B>) -> DiscoverFuture<B> {
        let dest = match Destination::from_request(&req) {
            Ok(dest) => dest,
            Err(error) => return Either::Right(Box::pin(std::future::ready(Err(error)))),
        };
        let directory = self.shared.directory();
        let known = match directory.service(&dest.host) {
            Some(svc) => Some(Arc::clone(svc)),
            None if dest.ip().is_none() => self.shared.remote().and_then(|r| r.get_now(&dest.host)),
            None => None,
        };
        if let Some(svc) = known {
            return Either::Left(mesh_service(&svc, &directory, &self.shared, req));
        }
        let caller = Caller::of(&directory, &self.shared);
        if let Some(ip) = dest.ip() {
            return Either::Left(ip_literal(&directory, caller, ip, dest.port, req));
        }
        let shared = Arc::clone(&self.shared);
        Either::Right(Box::pin(async move {
            let remote = match shared.remote() {
                Some(remote) => remote.get(&dest.host, CONTROL_PLANE_WAIT).await,
                None => None,
            };
            if let Some(svc) = remote {
                return mesh_service(&svc, &directory, &shared, req).await;
            }
            dns_name(&directory, caller, &dest, req).await
        }))
    }
}

/// A directory or control-plane service's stack, cached in its
/// [`MeshService`], with the caller it was built for.
struct CachedStack {
    caller_name: Option<HeaderValue>,
    caller_zone: Option<Arc<str>>,
    stack: ServiceStack,
}

/// A request to a directory or control-plane service, down its stack: built
/// on the service's first request and kept in the service (dropped with it,
/// when a reload or a push replaces it); each request runs a clone.
fn mesh_service<B: StackBody>(
    svc: &MeshService,
    directory: &Directory,
    shared: &LiveState,
    req: Request<B>,
) -> StackFuture<B> {
    if let Some(context) = RequestContext::of(&req) {
        context.set_service(&svc.label, Some(&svc.policy.stats));
    }
    let build = || {
        service_stack(
            ServiceParts {
                service: Arc::clone(&svc.label),
                endpoints: Endpoints::Watch(svc.endpoints().clone()),
                balancer: &svc.balancer,
                client: &svc.client,
                endpoint_pools: true,
                protocol: svc.protocol,
                policy: &svc.policy,
            },
            Caller::of(directory, shared).with_activator(directory, shared),
        )
    };
    let cached = svc.stack.get_or_init(|| CachedStack {
        caller_name: directory.caller_header.clone(),
        caller_zone: directory.caller_zone.clone(),
        stack: build(),
    });
    let mut stack = match cached {
        Some(cached)
            if cached.caller_name == directory.caller_header
                && cached.caller_zone == directory.caller_zone =>
        {
            cached.stack.clone()
        }
        // Built for this sidecar's former name or zone (a reload changed
        // `[service]` and the control plane has not replaced this service
        // since): this request gets a stack of its own.
        _ => build(),
    };
    // Every layer of the stack is always ready.
    stack.call(req)
}

/// A request to an IP literal: one endpoint, made for it.
fn ip_literal<B: StackBody>(
    directory: &Directory,
    caller: Caller,
    ip: std::net::IpAddr,
    port: Option<u16>,
    req: Request<B>,
) -> StackFuture<B> {
    if let Some(context) = RequestContext::of(&req) {
        context.set_service(&EXTERNAL, Some(&directory.default_policy.stats));
    }
    let addr = SocketAddr::new(ip, port.unwrap_or(DEFAULT_PORT));
    let endpoint = Arc::new(Endpoint::new(addr, Default::default()));
    let mut stack = service_stack(
        ServiceParts {
            service: Arc::from(addr.to_string()),
            endpoints: Endpoints::Fixed(Arc::new(EndpointSet::from_endpoints(vec![endpoint]))),
            balancer: &directory.dns_balancer,
            client: &directory.default_client,
            endpoint_pools: false,
            protocol: Protocol::Auto,
            policy: &directory.default_policy,
        },
        caller,
    );
    stack.call(req)
}

/// A request to a name resolved through DNS (waiting, bounded, for the first answer).
async fn dns_name<B: StackBody>(
    directory: &Directory,
    caller: Caller,
    dest: &Destination,
    req: Request<B>,
) -> Result<Response<InFlightBody<ResponseBody>>, ProxyError> {
    if let Some(context) = RequestContext::of(&req) {
        context.set_service(&EXTERNAL, Some(&directory.default_policy.stats));
    }
    let resolved = directory.dns().resolve(&dest.host, dest.port).await?;
    let mut stack = service_stack(
        ServiceParts {
            service: Arc::from(dest.host.as_str()),
            endpoints: Endpoints::Watch(resolved.endpoints().clone()),
            balancer: &directory.dns_balancer,
            client: &directory.default_client,
            endpoint_pools: true,
            protocol: Protocol::Auto,
            policy: &directory.default_policy,
        },
        caller,
    );
    stack.call(req).await
}

/// `[limits] max_uri_length` in bytes.
pub fn max_uri_length(shared: &LiveState) -> usize {
    let limit = shared.config().loaded.bootstrap.limits.max_uri_length.get();
    usize::try_from(limit).unwrap_or(usize::MAX)
}
