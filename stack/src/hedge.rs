//! Hedge: when a try has no response head after the route's `hedge.after`,
//! send another try of the same request to another endpoint; the first
//! answer wins and the other tries are cancelled.
//!
//! It sits just below the retry layer, above the balancer: each try the
//! retry layer makes may be hedged, every hedge picks its endpoint through
//! the balancer (marked [`UntriedOnly`]: an endpoint this request has not
//! tried, or none), and a failure still reaches the retry layer, which
//! retries it as it would an unhedged one. Inside the retry layer it would
//! have to be a second state machine in the same future; below it, it only
//! needs what the retry layer already prepared: the route's plan, the
//! request's context, and the buffered body (a [`Replay`] the retry layer
//! puts in the try's extensions on hedged routes).
//!
//! What is hedged: a request whose route has `hedge`, whose body the retry
//! layer could buffer (no stream, no upgrade, at most `max_replay_body`), and
//! whose method the route may retry (idempotent, or `retry.non_idempotent`:
//! the same rule as retries, so a POST is never sent twice by default).
//! Every hedge withdraws from the route's retry budget like a retry: with the
//! budget empty the hedge is not sent (`no-budget`), so hedges can never
//! more than add the budget's ratio to the load.
//!
//! Which answer wins: the first try that ends with a response that is not a
//! failure (not a 5xx; see `is_failure`), or with a refusal. A failed try
//! does not end the request while another is in flight; when none is left,
//! the last failure goes up to the retry layer. A hedge sent and not chosen
//! is dropped: its endpoint client cancels the request (an HTTP/2 stream
//! reset, an HTTP/1 connection closed) and its in-flight slot is freed.
//!
//! Counted (`weft_hedges_total`): `sent` per hedge that went to an endpoint,
//! then each ends `won` or `lost`; `no-budget` and `no-endpoint` when the
//! delay passed but the hedge could not go. A route with `after = "p95"`
//! learns its latency from the tries that answer (time to their response
//! head), see `weft_core::hedge`.
//!
//! Routes without `hedge` pay one extension lookup: the future is the inner
//! one. A hedged request boxes its state once.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use http::{HeaderMap, Method, Request, Response, Uri, Version};
use pin_project_lite::pin_project;
use tokio::time::{Instant, Sleep};
use tower::{Layer, Service};

use super::balance::UntriedOnly;
use super::context::{HedgeOutcome, RequestContext};
use weft_core::body::ProxyBody;
use weft_core::error::ProxyError;
use weft_core::hedge::HedgePlan;
use weft_core::policy::RoutePlan;
use weft_core::retry::classify::{is_failure, is_idempotent, outcome_of};
use weft_core::retry::replay::Replay;

// ===== layer =====

#[derive(Debug, Clone, Copy, Default)]
pub struct HedgeLayer;

impl<S> Layer<S> for HedgeLayer {
    type Service = Hedge<S>;

    fn layer(&self, inner: S) -> Hedge<S> {
        Hedge { inner }
    }
}

// ===== service =====

#[derive(Debug, Clone)]
pub struct Hedge<S> {
    inner: S,
}

impl<S, RB> Service<Request<ProxyBody>> for Hedge<S>
where
    S: Service<Request<ProxyBody>, Response = Response<RB>, Error = ProxyError> + Clone,
{
    type Response = Response<RB>;
    type Error = ProxyError;
    type Future = ResponseFuture<S, RB>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), ProxyError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<ProxyBody>) -> Self::Future {
        let Some((plan, hedge, replay)) = hedgeable(&req) else {
            return ResponseFuture::Direct {
                future: self.inner.call(req),
            };
        };
        let template = Template {
            method: req.method().clone(),
            uri: req.uri().clone(),
            version: req.version(),
            headers: req.headers().clone(),
            replay,
            context: RequestContext::of(&req).cloned(),
            plan,
        };
        // The ready service takes the first try; hedges wait for its clone
        // to be ready.
        let inner = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, inner);
        let future = Box::pin(inner.call(req));
        let first = Try {
            future,
            started: Instant::now(),
            hedge: false,
            polled: false,
            endpoint: template.endpoint(),
        };
        let delay = hedge.delay();
        ResponseFuture::Hedged {
            hedging: Box::new(Hedging {
                inner,
                template,
                hedge,
                tries: vec![first],
                next: Some(Box::pin(tokio::time::sleep(delay))),
                issued: 0,
                sent: 0,
                won: false,
                last: None,
            }),
        }
    }
}

/// The route's hedge settings and the body to copy, when `req` may be hedged.
fn hedgeable(req: &Request<ProxyBody>) -> Option<(Arc<RoutePlan>, Arc<HedgePlan>, Replay)> {
    let plan = req.extensions().get::<Arc<RoutePlan>>()?;
    let hedge = plan.hedge.as_ref()?;
    let replay = req.extensions().get::<Replay>()?;
    if !(plan.retry.non_idempotent || is_idempotent(req.method())) {
        return None;
    }
    Some((Arc::clone(plan), Arc::clone(hedge), replay.clone()))
}

/// What each hedge is made from.
#[derive(Debug)]
struct Template {
    method: Method,
    uri: Uri,
    version: Version,
    headers: HeaderMap,
    replay: Replay,
    context: Option<RequestContext>,
    plan: Arc<RoutePlan>,
}

impl Template {
    /// Where the try just made went (the endpoint client records it in the
    /// context as the balancer calls it).
    fn endpoint(&self) -> Option<SocketAddr> {
        self.context.as_ref().and_then(|c| c.tries().endpoint)
    }

    fn request(&self) -> Request<ProxyBody> {
        let mut req = Request::new(self.replay.body());
        *req.method_mut() = self.method.clone();
        *req.uri_mut() = self.uri.clone();
        *req.version_mut() = self.version;
        *req.headers_mut() = self.headers.clone();
        let extensions = req.extensions_mut();
        extensions.insert(Arc::clone(&self.plan));
        if let Some(context) = &self.context {
            extensions.insert(context.clone());
        }
        extensions.insert(self.replay.clone());
        extensions.insert(UntriedOnly);
        req
    }
}

// ===== future =====

pin_project! {
    #[project = Proj]
    pub enum ResponseFuture<S: Service<Request<ProxyBody>>, RB> {
        Direct { #[pin] future: S::Future },
        Hedged { hedging: Box<Hedging<S, RB>> },
    }
}

impl<S, RB> Future for ResponseFuture<S, RB>
where
    S: Service<Request<ProxyBody>, Response = Response<RB>, Error = ProxyError>,
{
    type Output = Result<Response<RB>, ProxyError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project() {
            Proj::Direct { future } => future.poll(cx),
            Proj::Hedged { hedging } => hedging.poll(cx),
        }
    }
}

/// One try in flight.
struct Try<F> {
    future: Pin<Box<F>>,
    started: Instant,
    /// A hedge (not the request's first try).
    hedge: bool,
    /// Polled at least once (a hedge the balancer refuses is refused then).
    polled: bool,
    /// Where it went (None: nowhere yet, or not observed).
    endpoint: Option<SocketAddr>,
}

/// A hedged request's state.
pub struct Hedging<S: Service<Request<ProxyBody>>, RB> {
    inner: S,
    template: Template,
    hedge: Arc<HedgePlan>,
    tries: Vec<Try<S::Future>>,
    /// When the next hedge goes; None: no more hedges.
    next: Option<Pin<Box<Sleep>>>,
    /// Hedges made (`hedge.max` at most).
    issued: u32,
    /// Hedges that went to an endpoint.
    sent: u32,
    /// Whether a hedge's answer was the one returned.
    won: bool,
    /// The last failure, returned if no try answers better.
    last: Option<Result<Response<RB>, ProxyError>>,
}

impl<S: Service<Request<ProxyBody>>, RB> std::fmt::Debug for Hedging<S, RB> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hedging")
            .field("tries", &self.tries.len())
            .field("sent", &self.sent)
            .finish_non_exhaustive()
    }
}

/// The balancer's refusals: nothing was sent.
fn refused<RB>(result: &Result<Response<RB>, ProxyError>) -> bool {
    matches!(
        result,
        Err(ProxyError::NoEndpoints { .. }
            | ProxyError::NoHealthyEndpoints { .. }
            | ProxyError::EndpointsSaturated { .. })
    )
}

impl<S, RB> Hedging<S, RB>
where
    S: Service<Request<ProxyBody>, Response = Response<RB>, Error = ProxyError>,
{
    fn count(&self, outcome: HedgeOutcome, n: u32) {
        if let Some(context) = &self.template.context {
            context.hedge(outcome, n);
        }
    }

    fn poll(&mut self, cx: &mut Context<'_>) -> Poll<Result<Response<RB>, ProxyError>> {
        loop {
            if let Some(result) = self.poll_tries(cx) {
                return Poll::Ready(result);
            }
            if !self.poll_hedge(cx) {
                return Poll::Pending;
            }
        }
    }

    /// Polls every try; the request's result once one is chosen.
    fn poll_tries(&mut self, cx: &mut Context<'_>) -> Option<Result<Response<RB>, ProxyError>> {
        let mut i = 0;
        while i < self.tries.len() {
            let attempt = &mut self.tries[i];
            let first_poll = !std::mem::replace(&mut attempt.polled, true);
            let Poll::Ready(result) = attempt.future.as_mut().poll(cx) else {
                if first_poll && attempt.hedge {
                    self.sent += 1;
                    self.count(HedgeOutcome::Sent, 1);
                }
                i += 1;
                continue;
            };
            let attempt = self.tries.swap_remove(i);
            if attempt.hedge && refused(&result) {
                // No untried endpoint could take it: nothing was sent, so
                // the budget gets its retry back; no more hedges.
                self.template.plan.budget.refund();
                self.count(HedgeOutcome::NoEndpoint, 1);
                self.next = None;
                continue;
            }
            if first_poll && attempt.hedge {
                self.sent += 1;
                self.count(HedgeOutcome::Sent, 1);
            }
            let failed = outcome_of(&result).is_some_and(is_failure);
            if !failed {
                if result.is_ok() {
                    self.hedge.observe(attempt.started.elapsed());
                }
                if let (Some(context), Some(endpoint)) = (&self.template.context, attempt.endpoint)
                    && self.sent > 0
                {
                    // Telemetry names the endpoint that answered, not the
                    // last one a try went to.
                    context.answered_by(endpoint);
                }
                self.won = attempt.hedge;
                return Some(result);
            }
            self.last = Some(result);
        }
        if self.tries.is_empty() {
            // Every try failed: the retry layer decides what comes next.
            return self.last.take();
        }
        None
    }

    /// Sends a hedge when its delay has passed; whether one was sent.
    fn poll_hedge(&mut self, cx: &mut Context<'_>) -> bool {
        match self.next.as_mut().map(|next| next.as_mut().poll(cx)) {
            Some(Poll::Ready(())) => {}
            Some(Poll::Pending) | None => return false,
        }
        match self.inner.poll_ready(cx) {
            Poll::Pending => return false,
            Poll::Ready(Err(_)) => {
                self.next = None;
                return false;
            }
            Poll::Ready(Ok(())) => {}
        }
        if !self.template.plan.budget.withdraw() {
            tracing::debug!(route = %self.template.plan.label, "retry budget spent: no hedge");
            self.count(HedgeOutcome::NoBudget, 1);
            self.next = None;
            return false;
        }
        let future = self.inner.call(self.template.request());
        self.tries.push(Try {
            future: Box::pin(future),
            started: Instant::now(),
            hedge: true,
            polled: false,
            endpoint: self.template.endpoint(),
        });
        self.issued += 1;
        if self.issued >= self.hedge.max {
            self.next = None;
        } else if let Some(next) = self.next.as_mut() {
            next.as_mut().reset(Instant::now() + self.hedge.delay());
        }
        true
    }
}

impl<S: Service<Request<ProxyBody>>, RB> Drop for Hedging<S, RB> {
    /// Every hedge sent ends won or lost, whether the request got an answer,
    /// timed out or was abandoned.
    fn drop(&mut self) {
        if self.sent == 0 {
            return;
        }
        if let Some(context) = &self.template.context {
            let won = u32::from(self.won);
            context.hedge(HedgeOutcome::Won, won);
            context.hedge(HedgeOutcome::Lost, self.sent - won);
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use std::sync::{LazyLock, Mutex};
    use std::time::Duration;

    use bytes::Bytes;
    use http_body_util::Full;
    use tower::ServiceExt;
    use weft_config::LoadBalancer;
    use weft_core::body;
    use weft_core::context::{Events, FaultKind, RetrySkipped};
    use weft_discovery::balance::{Balancer, Endpoint};
    use weft_discovery::endpoints::EndpointSet;

    use super::*;
    use crate::NewService;
    use crate::balance::{Balance, Endpoints};
    use crate::test_util::{self, Handle, MockService, outbound_policy};

    type Rsp = Response<Full<Bytes>>;
    type Mock = MockService<Request<ProxyBody>, Rsp>;

    /// Endpoint clients that hand every try to one mock, tagged with its
    /// endpoint (an extension), and record the endpoint in the context.
    #[derive(Debug, Clone)]
    struct MockEndpoints(Mock);

    impl NewService<Arc<Endpoint>> for MockEndpoints {
        type Service = tower::util::BoxService<Request<ProxyBody>, Rsp, ProxyError>;

        fn new_service(&self, endpoint: Arc<Endpoint>) -> Self::Service {
            let mock = self.0.clone();
            let addr = endpoint.addr();
            tower::util::BoxService::new(tower::service_fn(move |mut req: Request<ProxyBody>| {
                if let Some(context) = RequestContext::of(&req) {
                    context.set_endpoint(addr);
                }
                req.extensions_mut().insert(addr);
                mock.clone().oneshot(req)
            }))
        }
    }

    /// The hedge counts reported through the context.
    #[derive(Debug, Default)]
    struct Counted(Mutex<Vec<(HedgeOutcome, u32)>>);

    impl Counted {
        fn of(&self, outcome: HedgeOutcome) -> u32 {
            let counted = self.0.lock().unwrap();
            counted
                .iter()
                .filter(|(o, _)| *o == outcome)
                .map(|(_, n)| n)
                .sum()
        }
    }

    impl Events for Counted {
        fn retry(&self, _: &Arc<str>, _: &Arc<str>) {}
        fn retry_skipped(&self, _: &Arc<str>, _: &Arc<str>, _: RetrySkipped) {}
        fn ejection(&self, _: &Arc<str>) {}
        fn hedge(&self, _: &Arc<str>, _: &Arc<str>, outcome: HedgeOutcome, n: u32) {
            self.0.lock().unwrap().push((outcome, n));
        }
        fn injected_fault(&self, _: &Arc<str>, _: &Arc<str>, _: FaultKind) {}
        fn cold_start(&self, _: &Arc<str>, _: weft_core::context::ColdStartOutcome) {}
    }

    struct Setup {
        hedge: Hedge<Balance<MockEndpoints>>,
        handle: Handle<Request<ProxyBody>, Rsp>,
        endpoints: Vec<Arc<Endpoint>>,
        plan: Arc<RoutePlan>,
        counted: Arc<Counted>,
    }

    fn setup(n: u16, policy: &str) -> Setup {
        let endpoints: Vec<_> = (1..=n)
            .map(|port| {
                Arc::new(Endpoint::new(
                    SocketAddr::from(([10, 0, 0, 1], port)),
                    Default::default(),
                ))
            })
            .collect();
        let policy = outbound_policy(&format!(
            "{policy}\n[[routes]]\nname = \"r\"\nhedge = {{ after = \"20ms\" }}\n"
        ));
        let (mock, handle) = test_util::pair();
        let balance = Balance::new(
            Arc::from("billing"),
            Endpoints::Fixed(Arc::new(EndpointSet::from_endpoints(endpoints.clone()))),
            Balancer::new(LoadBalancer::RoundRobin),
            Arc::clone(&policy),
            None,
            MockEndpoints(mock),
        );
        Setup {
            hedge: HedgeLayer.layer(balance),
            handle,
            endpoints,
            plan: Arc::clone(policy.plan(Some(0))),
            counted: Arc::default(),
        }
    }

    fn request(setup: &Setup, method: Method) -> Request<ProxyBody> {
        static LABEL: LazyLock<Arc<str>> = LazyLock::new(|| Arc::from("x"));
        let mut req = Request::builder()
            .method(method)
            .uri("/")
            .body(body::empty())
            .unwrap();
        let events: Arc<dyn Events> = setup.counted.clone();
        req.extensions_mut().insert(Arc::clone(&setup.plan));
        req.extensions_mut()
            .insert(RequestContext::new(Some(events), &LABEL, &LABEL));
        req.extensions_mut().insert(Replay::default());
        req
    }

    fn answer(from: &str) -> Rsp {
        Response::builder()
            .header("from", from)
            .body(Full::new(Bytes::new()))
            .unwrap()
    }

    fn endpoint_of(req: &Request<ProxyBody>) -> SocketAddr {
        *req.extensions().get::<SocketAddr>().unwrap()
    }

    #[tokio::test(start_paused = true)]
    async fn a_hedge_goes_at_the_delay_and_the_fast_answer_wins() {
        let mut s = setup(2, "");
        let start = Instant::now();
        let call = tokio::spawn(s.hedge.clone().oneshot(request(&s, Method::GET)));
        let (first, _slow) = s.handle.next_request().await.unwrap();
        // Nothing answers: the hedge goes when the delay has passed.
        let (hedge, fast) = s.handle.next_request().await.unwrap();
        assert_eq!(start.elapsed(), Duration::from_millis(20));
        assert_ne!(endpoint_of(&first), endpoint_of(&hedge), "another endpoint");
        fast.send_response(answer("hedge"));
        let rsp = call.await.unwrap().unwrap();
        assert_eq!(rsp.headers()["from"], "hedge");
        // The slow try was dropped: its endpoint's slot is free, the
        // winner's is held by the response body.
        let slot = |addr| {
            s.endpoints
                .iter()
                .find(|e| e.addr() == addr)
                .unwrap()
                .in_flight()
        };
        assert_eq!(slot(endpoint_of(&first)), 0, "the loser was cancelled");
        assert_eq!(slot(endpoint_of(&hedge)), 1);
        drop(rsp);
        assert_eq!(slot(endpoint_of(&hedge)), 0);
        let c = &s.counted;
        assert_eq!(
            (
                c.of(HedgeOutcome::Sent),
                c.of(HedgeOutcome::Won),
                c.of(HedgeOutcome::Lost)
            ),
            (1, 1, 0)
        );
    }

    #[tokio::test(start_paused = true)]
    async fn the_first_try_wins_when_it_answers_first() {
        let mut s = setup(2, "");
        let req = request(&s, Method::GET);
        let context = RequestContext::of(&req).unwrap().clone();
        let call = tokio::spawn(s.hedge.clone().oneshot(req));
        let (first_req, first) = s.handle.next_request().await.unwrap();
        let (hedge, _slow) = s.handle.next_request().await.unwrap();
        first.send_response(answer("first"));
        let rsp = call.await.unwrap().unwrap();
        assert_eq!(rsp.headers()["from"], "first");
        // Telemetry names the endpoint that answered.
        let tries = context.tries();
        assert_eq!(tries.endpoint, Some(endpoint_of(&first_req)));
        assert_eq!(tries.tried_before, [endpoint_of(&hedge)]);
        drop(tries);
        let hedged = endpoint_of(&hedge);
        let slot = s
            .endpoints
            .iter()
            .find(|e| e.addr() == hedged)
            .unwrap()
            .in_flight();
        assert_eq!(slot, 0, "the hedge was cancelled");
        let c = &s.counted;
        assert_eq!(
            (
                c.of(HedgeOutcome::Sent),
                c.of(HedgeOutcome::Won),
                c.of(HedgeOutcome::Lost)
            ),
            (1, 0, 1)
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_fast_answer_sends_no_hedge() {
        let mut s = setup(2, "");
        let call = tokio::spawn(s.hedge.clone().oneshot(request(&s, Method::GET)));
        let (_, first) = s.handle.next_request().await.unwrap();
        tokio::time::advance(Duration::from_millis(19)).await;
        first.send_response(answer("first"));
        assert_eq!(call.await.unwrap().unwrap().headers()["from"], "first");
        tokio::time::advance(Duration::from_millis(100)).await;
        assert!(test_util::arrived(&mut s.handle).await.is_none());
        assert!(s.counted.0.lock().unwrap().is_empty());
    }

    /// Sends one `method` request; checks that no hedge goes within 100ms
    /// and that the first try's answer is the request's.
    async fn expect_no_hedge(s: &mut Setup, method: Method) {
        let call = tokio::spawn(s.hedge.clone().oneshot(request(s, method)));
        let (_, first) = s.handle.next_request().await.unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(
            test_util::arrived(&mut s.handle).await.is_none(),
            "no hedge"
        );
        first.send_response(answer("first"));
        assert_eq!(call.await.unwrap().unwrap().headers()["from"], "first");
    }

    #[tokio::test(start_paused = true)]
    async fn no_hedge_without_budget() {
        let mut s = setup(
            2,
            "[outbound]\nretry_budget = { ratio = 0.0, min_per_second = 0 }",
        );
        expect_no_hedge(&mut s, Method::GET).await;
        assert_eq!(s.counted.of(HedgeOutcome::NoBudget), 1);
        assert_eq!(s.counted.of(HedgeOutcome::Sent), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_post_is_never_hedged() {
        let mut s = setup(2, "");
        expect_no_hedge(&mut s, Method::POST).await;
        assert!(s.counted.0.lock().unwrap().is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn a_hedge_never_goes_to_an_endpoint_already_tried() {
        let mut s = setup(1, "");
        let budget = s.plan.budget.available();
        expect_no_hedge(&mut s, Method::GET).await;
        assert_eq!(s.counted.of(HedgeOutcome::NoEndpoint), 1);
        assert_eq!(s.counted.of(HedgeOutcome::Sent), 0);
        // Nothing was sent: the budget got its retry back.
        assert_eq!(s.plan.budget.available(), budget);
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_try_waits_for_the_hedge_in_flight() {
        let mut s = setup(2, "");
        let call = tokio::spawn(s.hedge.clone().oneshot(request(&s, Method::GET)));
        let (_, first) = s.handle.next_request().await.unwrap();
        let (_, hedge) = s.handle.next_request().await.unwrap();
        let mut failed = answer("first");
        *failed.status_mut() = http::StatusCode::SERVICE_UNAVAILABLE;
        first.send_response(failed);
        tokio::time::sleep(Duration::from_millis(5)).await;
        assert!(!call.is_finished(), "the hedge may still answer");
        hedge.send_response(answer("hedge"));
        assert_eq!(call.await.unwrap().unwrap().headers()["from"], "hedge");
    }
}
