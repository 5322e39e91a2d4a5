//! The outbound stack: the local app calls a service by its logical name.
//!
//! One builder per level, top to bottom, in the order a request meets them:
//!
//! ```text
//! per connection  Observe -> Respond -> Screen -> Discover
//! per service     Route -> RateLimit -> Forwarded -> Timeout -> Retry -> Balance
//! per endpoint    Timeout (per try) -> EndpointClient
//! ```
//!
//! [`Discover`] finds where the request goes from its authority
//! ([`Destination`]): a static directory service, a service pushed by the
//! control plane (subscribed on first use, waiting at most a second), an IP
//! literal, or a name resolved through DNS (waiting, bounded, for the first
//! answer); it names the service in the request's context and sends the
//! request down that service's stack ([`service_stack`]). Every stage is a
//! layer of [`crate::stack`]; why each sits where it does is said where it
//! is pushed.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use http::{HeaderValue, Request, Response};
use hyper::body::Incoming;
use tower::{Service, ServiceBuilder, ServiceExt};
use weft_config::Protocol;

use crate::balance::{Balancer, Endpoint};
use crate::body::ProxyBody;
use crate::client::UpstreamClient;
use crate::directory::Directory;
use crate::discovery::EndpointSet;
use crate::error::ProxyError;
use crate::policy::OutboundPolicy;
use crate::stack::balance::{Balance, Endpoints, InFlightBody};
use crate::stack::context::RequestContext;
use crate::stack::endpoint::{AppProtocol, NewEndpoint};
use crate::stack::forwarded::{self, Forwarded, ForwardedLayer};
use crate::stack::observe::{Observe, ObserveLayer};
use crate::stack::rate_limit::{RateLimit, RateLimitLayer};
use crate::stack::respond::{Respond, RespondLayer, Side};
use crate::stack::retry::{Retry, RetryLayer};
use crate::stack::route::{Route, RouteLayer};
use crate::stack::screen::{Screen, ScreenLayer};
use crate::stack::timeout::{self, Timeout, TimeoutLayer};
use crate::stack::{Boxed, NewLayered};
use crate::state::Shared;
use crate::target::Destination;
use crate::telemetry::{Direction, EXTERNAL};

/// Port assumed for an IP literal without one.
const DEFAULT_PORT: u16 = 80;

/// How long a request for a name not yet known waits for the control plane
/// before falling back to DNS.
const CONTROL_PLANE_WAIT: std::time::Duration = std::time::Duration::from_secs(1);

pub use crate::headers::WEFT_CALLER;

/// One endpoint's stack: a try, bounded by the route's per-try timeout.
pub type NewEndpointStack = NewLayered<TimeoutLayer, NewEndpoint>;

/// One service's stack.
pub type ServiceStack =
    Route<RateLimit<Forwarded<Timeout<Retry<Balance<NewEndpointStack>>>>>, OutboundPolicy>;

/// What the stack of one destination is built from.
#[derive(Debug)]
pub struct Target<'a> {
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
}

impl Caller {
    pub fn of(directory: &Directory, shared: &Shared) -> Self {
        Self {
            name: directory.caller_header.clone(),
            zone: directory.caller_zone.clone(),
            listener: shared.bound().map(|b| b.outbound),
            tasks: shared.tasks.clone(),
        }
    }
}

/// One service's stack, top to bottom.
pub fn service_stack(target: Target<'_>, caller: &Caller) -> ServiceStack {
    let policy = target.policy;
    let new_endpoint = NewEndpoint::new(
        Arc::clone(target.client),
        AppProtocol::Fixed(target.protocol),
        caller.tasks.clone(),
    )
    .refuse_loops_to(caller.listener);
    let new_endpoint = if target.endpoint_pools {
        new_endpoint
    } else {
        new_endpoint.shared_pools()
    };
    ServiceBuilder::new()
        // First: every layer below reads the matched route's plan.
        .layer(RouteLayer::new(Arc::clone(policy)))
        // This sidecar's own rate to the service: refused before anything
        // else is spent on it.
        .layer(RateLimitLayer::service(policy.rate_limit.as_ref()))
        // Headers set once, whatever the number of tries.
        .layer(ForwardedLayer::new(forwarded::Side::Outbound {
            caller: caller.name.clone(),
        }))
        // The whole request, around every try and backoff; to the response
        // headers only (a response that streams is never cut by it).
        .layer(TimeoutLayer::new(timeout::Which::Request))
        // Above the balancer: each retry picks an endpoint afresh.
        .layer(RetryLayer)
        .service(Balance::new(
            target.service,
            target.endpoints,
            target.balancer.clone(),
            Arc::clone(policy),
            caller.zone.clone(),
            // Per endpoint, below the balancer: a try that times out counts
            // against its endpoint for outlier detection.
            NewLayered::new(TimeoutLayer::new(timeout::Which::PerTry), new_endpoint),
        ))
}

/// The outbound listener's service (one per client connection).
pub type OutboundStack = Observe<Respond<Screen<Discover>>>;

/// The outbound listener's service, boxing the response body for hyper.
#[derive(Debug, Clone)]
pub struct Outbound {
    stack: OutboundStack,
}

impl Outbound {
    pub fn new(shared: Arc<Shared>, client: SocketAddr) -> Self {
        let max_uri_length = max_uri_length(&shared);
        let stack = ServiceBuilder::new()
            // First: the observation covers every request, refused or not.
            .layer(ObserveLayer::new(
                Arc::clone(&shared.reporters),
                Direction::Outbound,
            ))
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
    shared: Arc<Shared>,
}

impl Discover {
    /// Discovery over `shared`'s directory (also used by `weft-client`).
    pub fn new(shared: Arc<Shared>) -> Self {
        Self { shared }
    }
}

type DiscoverFuture =
    Pin<Box<dyn Future<Output = Result<Response<InFlightBody<Incoming>>, ProxyError>> + Send>>;

/// Any request body the retry layer can replay (a listener's, or an
/// in-process client's).
impl<B> Service<Request<B>> for Discover
where
    B: http_body::Body<Data = bytes::Bytes> + Send + Unpin + 'static,
    B::Error: Into<crate::body::BoxError>,
{
    type Response = Response<InFlightBody<Incoming>>;
    type Error = ProxyError;
    type Future = DiscoverFuture;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), ProxyError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<B>) -> DiscoverFuture {
        let shared = Arc::clone(&self.shared);
        Box::pin(async move { discover(&shared, req).await })
    }
}

async fn discover<B>(
    shared: &Shared,
    req: Request<B>,
) -> Result<Response<InFlightBody<Incoming>>, ProxyError>
where
    B: http_body::Body<Data = bytes::Bytes> + Send + Unpin + 'static,
    B::Error: Into<crate::body::BoxError>,
{
    let dest = Destination::from_request(&req)?;
    let directory = shared.directory();
    let static_service = directory.service(&dest.host);
    let remote = match (static_service, shared.remote()) {
        (None, Some(remote)) if dest.ip().is_none() => {
            remote.get(&dest.host, CONTROL_PLANE_WAIT).await
        }
        _ => None,
    };
    let context = RequestContext::of(&req);
    let caller = Caller::of(&directory, shared);
    let stack = if let Some(svc) = static_service.or(remote.as_ref()) {
        if let Some(context) = context {
            context.set_service(&svc.label, Some(&svc.policy.stats));
        }
        service_stack(
            Target {
                service: Arc::clone(&svc.label),
                endpoints: Endpoints::Watch(svc.endpoints().clone()),
                balancer: &svc.balancer,
                client: &svc.client,
                endpoint_pools: true,
                protocol: svc.protocol,
                policy: &svc.policy,
            },
            &caller,
        )
    } else if let Some(ip) = dest.ip() {
        if let Some(context) = context {
            context.set_service(&EXTERNAL, Some(&directory.default_policy.stats));
        }
        let addr = SocketAddr::new(ip, dest.port.unwrap_or(DEFAULT_PORT));
        let endpoint = Arc::new(Endpoint::new(addr, Default::default()));
        service_stack(
            Target {
                service: Arc::from(addr.to_string()),
                endpoints: Endpoints::Fixed(Arc::new(EndpointSet::from_endpoints(vec![endpoint]))),
                balancer: &directory.dns_balancer,
                client: &directory.default_client,
                endpoint_pools: false,
                protocol: Protocol::Auto,
                policy: &directory.default_policy,
            },
            &caller,
        )
    } else {
        if let Some(context) = context {
            context.set_service(&EXTERNAL, Some(&directory.default_policy.stats));
        }
        let resolved = directory.dns().resolve(&dest.host, dest.port).await?;
        service_stack(
            Target {
                service: Arc::from(dest.host.as_str()),
                endpoints: Endpoints::Watch(resolved.endpoints().clone()),
                balancer: &directory.dns_balancer,
                client: &directory.default_client,
                endpoint_pools: true,
                protocol: Protocol::Auto,
                policy: &directory.default_policy,
            },
            &caller,
        )
    };
    stack.oneshot(req).await
}

/// `[limits] max_uri_length` in bytes.
pub fn max_uri_length(shared: &Shared) -> usize {
    let limit = shared.config().loaded.bootstrap.limits.max_uri_length.get();
    usize::try_from(limit).unwrap_or(usize::MAX)
}
