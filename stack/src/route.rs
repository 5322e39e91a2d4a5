//! Route: match the request against the service's route table and put the
//! matched route's settings in the request's extensions.
//!
//! Outbound, every request gets a [`RoutePlan`] (the service's defaults when
//! no route matches): the timeout, retry and per-try layers read it. Inbound,
//! a request that matched a route gets its [`InboundRoute`] (its rate limit,
//! concurrency cap and `allow`); one that matched none gets nothing. The
//! route label goes to the request's context for telemetry.

use std::sync::Arc;

use http::Request;
use tower::{Layer, Service};

use super::context::RequestContext;
use weft_core::policy::{InboundPolicy, InboundRoute, OutboundPolicy, RoutePlan};

/// A compiled policy whose routes a request is matched against.
pub trait Routes: Send + Sync + 'static {
    /// What a matched request carries in its extensions.
    type Plan: Clone + Send + Sync + 'static;

    /// The route label and the settings of the route `req` matches.
    fn route<B>(&self, req: &Request<B>) -> (&Arc<str>, Option<&Self::Plan>);
}

impl Routes for OutboundPolicy {
    type Plan = Arc<RoutePlan>;

    fn route<B>(&self, req: &Request<B>) -> (&Arc<str>, Option<&Arc<RoutePlan>>) {
        let index = self
            .routes()
            .find(req.method(), req.uri().path(), req.headers());
        let plan = self.plan(index);
        (&plan.label, Some(plan))
    }
}

impl Routes for InboundPolicy {
    type Plan = Arc<InboundRoute>;

    fn route<B>(&self, req: &Request<B>) -> (&Arc<str>, Option<&Arc<InboundRoute>>) {
        let index = self
            .routes()
            .find(req.method(), req.uri().path(), req.headers());
        (self.routes().label(index), self.route(index))
    }
}

// ===== layer =====

#[derive(Debug)]
pub struct RouteLayer<P> {
    policy: Arc<P>,
}

impl<P> RouteLayer<P> {
    pub fn new(policy: Arc<P>) -> Self {
        Self { policy }
    }
}

impl<P> Clone for RouteLayer<P> {
    fn clone(&self) -> Self {
        Self {
            policy: Arc::clone(&self.policy),
        }
    }
}

impl<S, P> Layer<S> for RouteLayer<P> {
    type Service = Route<S, P>;

    fn layer(&self, inner: S) -> Route<S, P> {
        Route {
            inner,
            policy: Arc::clone(&self.policy),
        }
    }
}

// ===== service =====

#[derive(Debug)]
pub struct Route<S, P> {
    inner: S,
    policy: Arc<P>,
}

impl<S: Clone, P> Clone for Route<S, P> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
            policy: Arc::clone(&self.policy),
        }
    }
}

impl<S, P, B> Service<Request<B>> for Route<S, P>
where
    S: Service<Request<B>>,
    P: Routes,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<B>) -> S::Future {
        let (label, plan) = self.policy.route(&req);
        if let Some(context) = RequestContext::of(&req) {
            context.set_route(label);
        }
        if let Some(plan) = plan {
            let plan = plan.clone();
            req.extensions_mut().insert(plan);
        }
        self.inner.call(req)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use tower::ServiceExt;
    use tower_test::mock;

    use super::*;
    use weft_core::stats::Stats;

    fn policy(toml: &str) -> weft_config::Policy {
        weft_config::parse_policy(toml, std::path::Path::new("test.toml")).unwrap()
    }

    #[tokio::test]
    async fn the_matched_plan_travels_in_the_extensions() {
        let policy = policy(
            r#"
            service = "billing"
            [[routes]]
            name = "charge"
            match = { path_prefix = "/charge" }
            timeout = "2s"
            "#,
        );
        let outbound = Arc::new(OutboundPolicy::new(
            Some(&policy),
            Arc::new(Stats::default()),
        ));
        let (service, mut handle) = mock::pair::<Request<()>, ()>();
        let route = RouteLayer::new(outbound).layer(service);

        let call = tokio::spawn(
            route
                .clone()
                .oneshot(Request::get("/charge/1").body(()).unwrap()),
        );
        let (req, send) = handle.next_request().await.unwrap();
        let plan = req.extensions().get::<Arc<RoutePlan>>().unwrap();
        assert_eq!(plan.route.as_deref(), Some("charge"));
        assert_eq!(
            plan.timeout.as_ref().unwrap().limit.as_ref(),
            "routes.charge.timeout"
        );
        send.send_response(());
        call.await.unwrap().unwrap();

        let call = tokio::spawn(route.oneshot(Request::get("/other").body(()).unwrap()));
        let (req, send) = handle.next_request().await.unwrap();
        let plan = req.extensions().get::<Arc<RoutePlan>>().unwrap();
        assert_eq!(plan.route, None, "the service's defaults");
        assert!(plan.timeout.is_none());
        send.send_response(());
        call.await.unwrap().unwrap();
    }
}
