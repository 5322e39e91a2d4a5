//! Balance: choose the endpoint of one try, and learn from its outcome.
//!
//! The choice is [`select`]'s: usable endpoints only (not ejected, app not
//! unhealthy, weight above 0, below `outbound.endpoint_max_concurrency` or
//! the endpoint's own `outbound.adaptive_concurrency` limit: a full endpoint
//! is skipped, not refused), then `[[splits]]`, the caller's
//! zone (`outbound.locality`) and endpoints this request has not tried yet,
//! each dropped when it would leave nothing (but a hedge, marked
//! [`UntriedOnly`], goes to an untried endpoint or nowhere), then the service's balancer
//! (p2c-ewma, least-request or round-robin). The endpoint's in-flight slot is
//! claimed with the choice and held until the response body ends, and the
//! try goes to the endpoint's own client (a [`NewService`] makes it from the
//! endpoint), which records the endpoint in the request's context. Refusals: no endpoints, none healthy, all at their cap.
//!
//! The outcome feeds passive health (outlier ejection): a 5xx, a connect
//! failure, a reset or a timeout counts towards `outbound.outlier`'s
//! consecutive failures, within `max_ejected_percent`; anything else resets
//! the count. The time to the response headers feeds the latency estimate
//! and, under `outbound.adaptive_concurrency`, the endpoint's adaptive limit
//! (successful tries only: a failed try's latency says nothing of the
//! endpoint's queue). Headers rather than body end: a streaming body measures
//! the stream, not the endpoint, and the balancer's estimate uses the same.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::{Duration, Instant};

use futures_util::future::{Either, Ready, ready as ready_future};
use http::{Request, Response};
use http_body_util::Either as EitherBody;
use pin_project_lite::pin_project;
use tower::Service;

use super::NewService;
use super::context::RequestContext;
use weft_core::body::{IdleTimeout, Tracked};
use weft_core::error::ProxyError;
use weft_core::limits::EndpointCap;
use weft_core::policy::OutboundPolicy;
use weft_core::retry::classify::{Outcome, is_failure, outcome_of};
use weft_discovery::balance::select::{SelectError, Selection, select};
use weft_discovery::balance::{Balancer, Endpoint, InFlight};
use weft_discovery::endpoints::{EndpointSet, EndpointsReader};

/// Marks a try that must go to an endpoint the request has not tried (a
/// hedge: sending it where a try is still in flight would gain nothing).
/// Without an untried endpoint that can take it, it is refused
/// ([`ProxyError::EndpointsSaturated`]) instead of going to a tried one.
#[derive(Debug, Clone, Copy)]
pub struct UntriedOnly;

/// Where the endpoints come from.
#[derive(Debug, Clone)]
pub enum Endpoints {
    /// Discovery's current set (a directory service, a name resolved by DNS).
    Watch(EndpointsReader),
    /// One fixed set (an IP literal).
    Fixed(Arc<EndpointSet>),
}

impl Endpoints {
    fn current(&self) -> Arc<EndpointSet> {
        match self {
            Self::Watch(reader) => Arc::clone(&reader.borrow()),
            Self::Fixed(set) => Arc::clone(set),
        }
    }
}

/// A response body holding the endpoint's in-flight slot, cut after
/// `outbound.idle_timeout` without data when one is set.
pub type InFlightBody<B> = Tracked<EitherBody<IdleTimeout<B>, B>, InFlight>;

// ===== service =====

#[derive(Debug, Clone)]
pub struct Balance<N> {
    service: Arc<str>,
    endpoints: Endpoints,
    balancer: Balancer,
    policy: Arc<OutboundPolicy>,
    /// The caller's zone, for `outbound.locality`.
    zone: Option<Arc<str>>,
    new_endpoint: N,
}

impl<N> Balance<N> {
    pub fn new(
        service: Arc<str>,
        endpoints: Endpoints,
        balancer: Balancer,
        policy: Arc<OutboundPolicy>,
        zone: Option<Arc<str>>,
        new_endpoint: N,
    ) -> Self {
        Self {
            service,
            endpoints,
            balancer,
            policy,
            zone,
            new_endpoint,
        }
    }

    fn refusal(&self, error: SelectError) -> ProxyError {
        let service = self.service.to_string();
        match error {
            SelectError::NoEndpoints => ProxyError::NoEndpoints { service },
            SelectError::NoHealthy => ProxyError::NoHealthyEndpoints { service },
            SelectError::Saturated => ProxyError::EndpointsSaturated {
                service,
                limit: self
                    .policy
                    .endpoint_cap()
                    .key()
                    .unwrap_or("outbound.endpoint_max_concurrency"),
            },
        }
    }
}

impl<N, S, B, RB> Service<Request<B>> for Balance<N>
where
    N: NewService<Arc<Endpoint>, Service = S>,
    S: Service<Request<B>, Response = Response<RB>, Error = ProxyError>,
{
    type Response = Response<InFlightBody<RB>>;
    type Error = ProxyError;
    type Future = Either<Ready<Result<Self::Response, ProxyError>>, ResponseFuture<S::Future>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), ProxyError>> {
        // Endpoints are chosen per request: a full one is skipped, not waited for.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let set = self.endpoints.current();
        let context = RequestContext::of(&req).cloned();
        // Endpoints this request's earlier tries went to (none on the first).
        let tried = context
            .as_ref()
            .map(RequestContext::tried)
            .unwrap_or_default();
        let selection = Selection {
            splits: &self.policy.splits,
            locality: self
                .zone
                .as_deref()
                .map(|zone| (zone, self.policy.outbound.locality)),
            endpoint_cap: self.policy.endpoint_cap(),
            tried: &tried,
        };
        let in_flight = match select(&self.balancer, set.endpoints(), &selection) {
            // Dropping the claim frees the endpoint's slot at once.
            Ok(in_flight)
                if req.extensions().get::<UntriedOnly>().is_some()
                    && tried.contains(&in_flight.endpoint().addr()) =>
            {
                return Either::Left(ready_future(Err(self.refusal(SelectError::Saturated))));
            }
            Ok(in_flight) => in_flight,
            Err(error) => return Either::Left(ready_future(Err(self.refusal(error)))),
        };
        // The endpoint's client records the try in the context (the next
        // retry avoids it).
        let mut client = self
            .new_endpoint
            .new_service(Arc::clone(in_flight.endpoint()));
        Either::Right(ResponseFuture {
            inner: client.call(req),
            in_flight: Some(in_flight),
            set,
            policy: Arc::clone(&self.policy),
            context,
        })
    }
}

// ===== future =====

pin_project! {
    pub struct ResponseFuture<F> {
        #[pin]
        inner: F,
        in_flight: Option<InFlight>,
        // For the share of endpoints outlier detection may eject.
        set: Arc<EndpointSet>,
        policy: Arc<OutboundPolicy>,
        context: Option<RequestContext>,
    }
}

impl<F, RB> Future for ResponseFuture<F>
where
    F: Future<Output = Result<Response<RB>, ProxyError>>,
{
    type Output = Result<Response<InFlightBody<RB>>, ProxyError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let result = ready!(this.inner.poll(cx));
        let Some(in_flight) = this.in_flight.take() else {
            return Poll::Pending;
        };
        let outcome = outcome_of(&result);
        if let Some(outcome) = outcome
            && record_outcome(this.policy, this.set, in_flight.endpoint(), outcome)
            && let Some(context) = this.context
        {
            context.ejection();
        }
        if let EndpointCap::Adaptive(settings) = this.policy.endpoint_cap()
            && outcome.is_some_and(|o| !is_failure(o))
        {
            in_flight.observe_adaptive(settings);
        }
        let rsp = result?;
        in_flight.observe_response();
        let idle = this.policy.outbound.idle_timeout.map(|d| d.get());
        Poll::Ready(Ok(rsp.map(|body| {
            let body = match idle {
                Some(idle) => EitherBody::Left(IdleTimeout::new(body, idle)),
                None => EitherBody::Right(body),
            };
            Tracked::new(body, in_flight)
        })))
    }
}

/// Passive health: count failures, eject within `max_ejected_percent`.
/// Returns whether this outcome ejected the endpoint.
fn record_outcome(
    policy: &OutboundPolicy,
    set: &EndpointSet,
    endpoint: &Endpoint,
    outcome: Outcome,
) -> bool {
    let now = Instant::now();
    if !is_failure(outcome) {
        endpoint.outlier().success(now);
        return false;
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
    match endpoint.outlier().failure(settings, now, may_eject) {
        Some(time) => {
            tracing::warn!(endpoint.addr = %endpoint.addr(), ejection_ms = duration_ms(time), "endpoint ejected after consecutive failures");
            true
        }
        None => false,
    }
}

fn duration_ms(time: Duration) -> u64 {
    u64::try_from(time.as_millis()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use std::net::SocketAddr;

    use tower::ServiceExt;
    use weft_config::{LoadBalancer, Metadata};

    use super::*;
    use crate::test_util::{FakeEndpoints, outbound_policy, refusal};

    fn endpoint(port: u16, zone: &str, version: &str) -> Arc<Endpoint> {
        let metadata = Metadata {
            zone: Some(zone.to_owned()),
            version: Some(version.to_owned()),
            ..Metadata::default()
        };
        Arc::new(Endpoint::new(
            SocketAddr::from(([10, 0, 0, 1], port)),
            metadata,
        ))
    }

    fn balance(
        endpoints: &[Arc<Endpoint>],
        policy: &str,
        zone: Option<&str>,
        strategy: LoadBalancer,
    ) -> (Balance<FakeEndpoints>, FakeEndpoints) {
        let fake = FakeEndpoints::default();
        let balance = Balance::new(
            Arc::from("billing"),
            Endpoints::Fixed(Arc::new(EndpointSet::from_endpoints(endpoints.to_vec()))),
            Balancer::new(strategy),
            outbound_policy(policy),
            zone.map(Arc::from),
            fake.clone(),
        );
        (balance, fake)
    }

    async fn send(balance: &Balance<FakeEndpoints>, n: usize) {
        for _ in 0..n {
            drop(balance.clone().oneshot(Request::new(())).await.unwrap());
        }
    }

    #[tokio::test]
    async fn a_split_and_the_callers_zone_pick_the_right_subset() {
        let (a, b, c) = (
            endpoint(1, "a", "v1"),
            endpoint(2, "b", "v1"),
            endpoint(3, "a", "v2"),
        );
        let all = [Arc::clone(&a), Arc::clone(&b), Arc::clone(&c)];

        // All of the traffic to the v2 subset.
        let split = "[[splits]]\nsubset = { version = \"v2\" }\nweight = 100\n";
        let (lb, fake) = balance(&all, split, None, LoadBalancer::RoundRobin);
        send(&lb, 6).await;
        assert!(fake.tries().iter().all(|e| *e == c.addr()));

        // The caller's zone only, while it is healthy.
        let (lb, fake) = balance(&all, "", Some("b"), LoadBalancer::RoundRobin);
        send(&lb, 6).await;
        assert!(fake.tries().iter().all(|e| *e == b.addr()));

        // No zone preference: everyone gets some.
        let (lb, fake) = balance(&all, "", None, LoadBalancer::RoundRobin);
        send(&lb, 6).await;
        let tries = fake.tries();
        for e in &all {
            assert_eq!(
                tries.iter().filter(|t| **t == e.addr()).count(),
                2,
                "{tries:?}"
            );
        }
    }

    #[tokio::test]
    async fn an_ejected_endpoint_is_skipped_then_comes_back() {
        let (a, b) = (endpoint(1, "a", "v1"), endpoint(2, "a", "v1"));
        let policy = "[outbound]\noutlier = { consecutive_failures = 1, ejection = \"100ms\" }\n";
        let (lb, fake) = balance(
            &[Arc::clone(&a), Arc::clone(&b)],
            policy,
            None,
            LoadBalancer::RoundRobin,
        );
        fake.answer(a.addr(), 503);
        send(&lb, 4).await;
        let tries = fake.tries();
        assert_eq!(
            tries.iter().filter(|t| **t == a.addr()).count(),
            1,
            "ejected after one 503: {tries:?}"
        );
        assert!(a.outlier().is_ejected(Instant::now()));

        // Outlier ejection runs on the real clock.
        fake.answer(a.addr(), 200);
        tokio::time::sleep(Duration::from_millis(150)).await;
        send(&lb, 4).await;
        assert!(
            fake.tries().contains(&a.addr()),
            "back after its ejection time"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_slow_endpoints_adaptive_limit_falls_and_its_load_moves() {
        let (a, b) = (endpoint(1, "a", "v1"), endpoint(2, "a", "v1"));
        let policy = "[outbound]\nadaptive_concurrency = { min_limit = 1, initial_limit = 4 }\n";
        let (lb, fake) = balance(
            &[Arc::clone(&a), Arc::clone(&b)],
            policy,
            None,
            LoadBalancer::RoundRobin,
        );
        // Both answer in 10ms, then `a` takes 200ms. A limit less than
        // half used does not move, so the waves keep both in use.
        fake.delay(a.addr(), Duration::from_millis(10));
        fake.delay(b.addr(), Duration::from_millis(10));
        let wave = |n: usize| {
            let lb = lb.clone();
            async move {
                let calls = (0..n).map(|_| lb.clone().oneshot(Request::new(())));
                futures_util::future::join_all(calls).await
            }
        };
        for _ in 0..50 {
            drop(wave(8).await);
        }
        let settings = lb.policy.outbound.adaptive_concurrency.unwrap();
        let healthy = a.adaptive(&settings).limit(&settings);
        assert!(healthy >= 4, "{healthy}");
        // Slower, so more at once (as under a steady rate): 16 per wave.
        fake.delay(a.addr(), Duration::from_millis(200));
        for _ in 0..20 {
            drop(wave(16).await);
        }
        let slow = a.adaptive(&settings).limit(&settings);
        assert!(slow < healthy && slow <= 2, "{healthy} -> {slow}");
        assert!(b.adaptive(&settings).limit(&settings) >= healthy);

        // Hold `a`'s slots and all of `b`'s: the next is refused, naming the limit.
        let held = wave(usize::try_from(slow + b.adaptive(&settings).limit(&settings)).unwrap());
        let held = tokio::spawn(held);
        tokio::task::yield_now().await;
        let refused = refusal(lb.clone().oneshot(Request::new(())).await);
        assert!(
            matches!(
                refused,
                ProxyError::EndpointsSaturated {
                    limit: "outbound.adaptive_concurrency",
                    ..
                }
            ),
            "{refused}"
        );
        assert_eq!(refused.limit(), Some("outbound.adaptive_concurrency"));
        drop(held.await);
        assert!(lb.clone().oneshot(Request::new(())).await.is_ok());
    }

    #[tokio::test]
    async fn a_full_endpoint_is_skipped_and_all_full_is_refused() {
        let (a, b) = (endpoint(1, "a", "v1"), endpoint(2, "a", "v1"));
        let policy = "[outbound]\nendpoint_max_concurrency = 1\n";
        let (lb, fake) = balance(
            &[Arc::clone(&a), Arc::clone(&b)],
            policy,
            None,
            LoadBalancer::P2cEwma,
        );
        // Two responses held (their bodies unread): both endpoints full.
        let first = lb.clone().oneshot(Request::new(())).await.unwrap();
        let second = lb.clone().oneshot(Request::new(())).await.unwrap();
        let tries = fake.tries();
        assert_ne!(tries[0], tries[1], "the full endpoint was skipped");
        let refused = refusal(lb.clone().oneshot(Request::new(())).await);
        assert!(
            matches!(refused, ProxyError::EndpointsSaturated { .. }),
            "{refused}"
        );
        drop((first, second));
        assert!(lb.clone().oneshot(Request::new(())).await.is_ok());
    }
}
