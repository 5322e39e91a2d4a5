//! The inbound stack: other sidecars call the local app.
//!
//! ```text
//! per connection  Observe -> Respond -> Local
//! per local app   Screen -> Route -> Authorize -> RateLimit (route, service, caller)
//!                 -> Concurrency (route, service) -> Adaptive -> Forwarded -> Timeout
//!                 -> EndpointClient
//! ```
//!
//! Every request goes to the `[service] app` address, whatever its authority
//! says (the inbound listener is never an open proxy to other hosts): an
//! HTTP/1 absolute-form request naming another host is refused outright
//! (403, `foreign-authority`). Then the caller must be allowed to call the
//! service (the matched route's `allow`, else `inbound.allow`, else `[tls]
//! default_inbound`; 403 `denied`) before it spends any limit. Then the local
//! service's policy protects this instance, most specific limit first; the
//! concurrency permits are held until the response body ends. The client is
//! recorded in `x-forwarded-for` and `forwarded`; over mTLS `weft-caller` is
//! the authenticated caller's name. The HTTP version towards the app is the
//! one the caller's sidecar asked for (`weft-protocol`), else the request's.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use http::{Request, Response};
use hyper::body::Incoming;
use tower::{Service, ServiceBuilder, ServiceExt};

use crate::state::LiveState;
use crate::telemetry::{Direction, RequestObserver};
use weft_core::authz::MeshRule;
use weft_core::body::ProxyBody;
use weft_core::error::ProxyError;
use weft_discovery::directory::LocalApp;
use weft_stack::adaptive_concurrency::{Adaptive, AdaptiveBody, AdaptiveLayer};
use weft_stack::authorize::{Authorize, AuthorizeLayer};
use weft_stack::concurrency::{self, Concurrency, ConcurrencyLayer, PermitBody};
use weft_stack::context::RequestContext;
use weft_stack::endpoint::{AppProtocol, EndpointClient, NewEndpoint};
use weft_stack::forwarded::{self, ClientAddr, Forwarded, ForwardedLayer};
use weft_stack::observe::{Observe, ObserveLayer};
use weft_stack::rate_limit::{self, RateLimit, RateLimitLayer};
use weft_stack::respond::{Respond, RespondLayer, Side};
use weft_stack::route::{Route, RouteLayer};
use weft_stack::screen::{self, Screen, ScreenLayer};
use weft_stack::timeout::{self, Timeout, TimeoutLayer};
use weft_stack::{Boxed, NewService};
use weft_transport::pool::ResponseBody;

pub use weft_stack::rate_limit::ANONYMOUS;

/// The local app's stack.
pub type AppStack = Screen<
    Route<
        Authorize<
            RateLimit<
                RateLimit<
                    RateLimit<
                        Concurrency<Concurrency<Adaptive<Forwarded<Timeout<EndpointClient>>>>>,
                    >,
                >,
            >,
        >,
        weft_core::policy::InboundPolicy,
    >,
>;

/// What the app's stack needs beyond the local app itself (fixed at start).
#[derive(Debug, Clone)]
pub struct Listener {
    /// `[limits] max_uri_length`.
    pub max_uri_length: usize,
    /// The inbound listener's address.
    pub address: Option<SocketAddr>,
    /// `[service] advertise`, which absolute-form requests may name.
    pub advertise: Option<SocketAddr>,
    /// `[tls]`'s authorization default and trust domain.
    pub rule: Arc<MeshRule>,
    pub tasks: tokio_util::task::TaskTracker,
}

/// The local app's stack, top to bottom.
pub fn app_stack(local: &LocalApp, listener: &Listener) -> AppStack {
    let policy = &local.policy;
    let name: Arc<str> = Arc::clone(&local.label);
    let client = NewEndpoint::new(
        Arc::clone(&local.client),
        AppProtocol::Asked,
        listener.tasks.clone(),
    )
    .shared_pools()
    .new_service(Arc::clone(&local.endpoint));
    ServiceBuilder::new()
        // Cheap checks first; the inbound listener serves the local service only.
        .layer(ScreenLayer::inbound(
            listener.max_uri_length,
            screen::Local {
                service: Arc::clone(&name),
                listener: listener.address,
                advertise: listener.advertise,
            },
        ))
        // Every layer below reads the matched route's limits.
        .layer(RouteLayer::new(Arc::clone(policy)))
        // Who may call, before the request spends any limit.
        .layer(AuthorizeLayer::new(
            name,
            Arc::clone(&listener.rule),
            Arc::clone(policy),
        ))
        // Rate limits, most specific first; each refuses at once.
        .layer(RateLimitLayer::new(rate_limit::Which::Route))
        .layer(RateLimitLayer::service(policy.rate_limit.as_ref()))
        .layer(RateLimitLayer::per_caller(
            policy.caller_rate_limit.as_ref(),
        ))
        // Concurrency caps after the rate limits (a refused request holds no
        // slot), route first; permits held until the response body ends.
        .layer(ConcurrencyLayer::new(concurrency::Which::Route))
        .layer(ConcurrencyLayer::service(policy.concurrency.as_ref()))
        // The instance's adaptive limit (config excludes it beside the static
        // cap above), last of the limits: it measures the app's latency, so
        // only requests that will reach the app count, timeout included.
        .layer(AdaptiveLayer::new(policy.adaptive.as_ref()))
        .layer(ForwardedLayer::new(forwarded::Side::Inbound))
        // Innermost: bounds the app's answer, and frees the permits when it fires.
        .layer(TimeoutLayer::new(timeout::Which::Fixed(
            policy.timeout.clone(),
        )))
        .service(client)
}

/// The inbound listener's service (one per client connection).
pub type InboundStack = Observe<RequestObserver, Respond<Local>>;

#[derive(Debug, Clone)]
pub struct Inbound {
    stack: InboundStack,
}

impl Inbound {
    pub fn new(shared: Arc<LiveState>, client: SocketAddr, rule: Arc<MeshRule>) -> Self {
        let config = shared.config();
        let listener = Listener {
            max_uri_length: crate::outbound::max_uri_length(&shared),
            address: shared.bound().map(|b| b.inbound),
            advertise: config
                .loaded
                .bootstrap
                .service
                .as_ref()
                .and_then(|s| s.advertise),
            rule,
            tasks: shared.tasks.clone(),
        };
        let stack = ServiceBuilder::new()
            // First: the observation covers every request, refused or not.
            .layer(ObserveLayer::new(RequestObserver::new(
                Arc::clone(&shared.reporters),
                Direction::Inbound,
            )))
            // Every error below becomes a response here, and only here.
            .layer(RespondLayer::new(Side::Inbound, client))
            .service(Local {
                shared,
                client,
                listener: Arc::new(listener),
            });
        Self { stack }
    }
}

impl Service<Request<Incoming>> for Inbound {
    type Response = Response<ProxyBody>;
    type Error = Infallible;
    type Future = Boxed<<InboundStack as Service<Request<Incoming>>>::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.stack.poll_ready(cx)
    }

    fn call(&mut self, req: Request<Incoming>) -> Self::Future {
        Boxed::new(self.stack.call(req))
    }
}

/// The local app's stack, for the directory's current local app.
#[derive(Debug, Clone)]
pub struct Local {
    shared: Arc<LiveState>,
    client: SocketAddr,
    listener: Arc<Listener>,
}

type LocalFuture = Pin<
    Box<
        dyn Future<
                Output = Result<
                    Response<PermitBody<PermitBody<AdaptiveBody<ResponseBody>>>>,
                    ProxyError,
                >,
            > + Send,
    >,
>;

impl Service<Request<Incoming>> for Local {
    type Response = Response<PermitBody<PermitBody<AdaptiveBody<ResponseBody>>>>;
    type Error = ProxyError;
    type Future = LocalFuture;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), ProxyError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, mut req: Request<Incoming>) -> LocalFuture {
        let directory = self.shared.directory();
        let Some(local) = directory.local.as_ref() else {
            return Box::pin(std::future::ready(Err(ProxyError::NoLocalService)));
        };
        if let Some(context) = RequestContext::of(&req) {
            context.set_service(&local.label, Some(&local.policy.stats));
        }
        req.extensions_mut().insert(ClientAddr(self.client));
        let stack = app_stack(local, &self.listener);
        Box::pin(stack.oneshot(req))
    }
}
