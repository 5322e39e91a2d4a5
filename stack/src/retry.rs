//! Retry: send a failed try again, to another endpoint, while the route
//! allows it and the retry budget lasts.
//!
//! The matched [`RoutePlan`] says what may be retried (`retry.on`, the method
//! unless `non_idempotent`), how often (`attempts`), after which backoff
//! (jittered, exponential) and against which budget (a ratio of requests
//! plus a floor per second: every request deposits, every retry withdraws;
//! an empty budget sends the last failure back, marked `budget-exhausted`).
//! A body of known length up to `max_replay_body` is read into memory before
//! the first try so every try sends the same bytes; a larger one, or one of
//! unknown length (a stream, which may wait for the response), is sent once
//! and never retried. Upgrades are never retried. On a route with `hedge`,
//! the body is buffered the same way (even with `attempts = 0`) and each
//! try carries its [`Replay`](weft_core::retry::replay::Replay) in its
//! extensions for the hedge layer below.
//!
//! Each retry goes elsewhere: the balance layer below records in the
//! request's [`RequestContext`] every endpoint a try went to and avoids them
//! while others can take the request. A retry is never queued: when the
//! balance layer has no endpoint for it (none usable, all at their cap),
//! the client gets the failure it had, not a refusal.
//!
//! The common path allocates nothing: the future is a state machine over the
//! inner service's future and the backoff timer; only reading a request body
//! for replay is boxed.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use http::header::HeaderValue;
use http::uri::PathAndQuery;
use http::{Extensions, HeaderMap, Method, Request, Response, Uri, Version};
use http_body::Body;
use pin_project_lite::pin_project;
use tokio::time::Sleep;
use tower::{Layer, Service};

use super::context::{RequestContext, RetrySkipped};
use super::respond::Refusal;
use weft_core::body::{self, BoxError, ProxyBody};
use weft_core::error::{ProxyError, Reason, WEFT_REASON};
use weft_core::policy::RoutePlan;
use weft_core::retry::backoff::backoff;
use weft_core::retry::classify::{outcome_of, retryable};
use weft_core::retry::replay::{self, BodyError, RequestBody};
use weft_transport::forward;

// ===== layer =====

#[derive(Debug, Clone, Copy, Default)]
pub struct RetryLayer;

impl<S> Layer<S> for RetryLayer {
    type Service = Retry<S>;

    fn layer(&self, inner: S) -> Retry<S> {
        Retry { inner }
    }
}

// ===== service =====

#[derive(Debug, Clone)]
pub struct Retry<S> {
    inner: S,
}

impl<S, B, RB> Service<Request<B>> for Retry<S>
where
    S: Service<Request<ProxyBody>, Response = Response<RB>, Error = ProxyError> + Clone,
    B: Body<Data = bytes::Bytes> + Send + Unpin + 'static,
    B::Error: Into<BoxError>,
{
    type Response = Response<RB>;
    type Error = ProxyError;
    type Future = ResponseFuture<S, RB>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), ProxyError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let plan = req.extensions().get::<Arc<RoutePlan>>().cloned();
        let retries = plan.as_ref().is_some_and(|p| p.retry.attempts > 0);
        // A hedged route replays its body too (the hedge layer below sends
        // copies), and its hedges avoid the endpoints the context records.
        let hedges = plan.as_ref().is_some_and(|p| p.hedge.is_some());
        let (mut parts, incoming) = req.into_parts();
        let upgrade = parts
            .extensions
            .get::<hyper::upgrade::OnUpgrade>()
            .is_some()
            && forward::asks_upgrade(parts.version, &parts.headers);
        // Buffer for replay only a body whose length is known up front (or that
        // is empty): a body of unknown length may be a stream that waits for
        // the response (full duplex, gRPC streaming), which buffering would
        // deadlock.
        let known_length = incoming.is_end_stream() || incoming.size_hint().exact().is_some();
        let (state, body) = match plan.as_ref() {
            Some(plan) if (retries || hedges) && !upgrade && known_length => {
                if incoming.is_end_stream() {
                    (
                        State::Ready,
                        Some(RequestBody::Replayable(Default::default())),
                    )
                } else {
                    let cap = plan.retry.max_replay_body.get();
                    (
                        State::Reading {
                            read: Box::pin(replay::prepare(incoming, cap)),
                        },
                        None,
                    )
                }
            }
            _ => (
                State::Ready,
                Some(RequestBody::Streaming(body::boxed(incoming))),
            ),
        };
        if let Some(plan) = &plan {
            plan.budget.deposit();
        }
        let inner = self.inner.clone();
        let inner = std::mem::replace(&mut self.inner, inner);
        // Retries avoid the endpoints tried, which the context records.
        let context = match parts.extensions.get::<RequestContext>() {
            Some(context) => Some(context.clone()),
            None if retries || hedges => {
                let context = RequestContext::unobserved();
                parts.extensions.insert(context.clone());
                Some(context)
            }
            None => None,
        };
        ResponseFuture {
            state,
            inner,
            head: Head {
                method: parts.method,
                path: parts.uri.path_and_query().cloned(),
                uri: Some(parts.uri),
                version: parts.version,
                headers: parts.headers,
                extensions: Some(parts.extensions),
            },
            body,
            plan,
            context,
            attempt: 0,
            counted: true,
            last: None,
        }
    }
}

/// The head every try is made from.
#[derive(Debug)]
struct Head {
    method: Method,
    /// The first try's URI (moved into it).
    uri: Option<Uri>,
    /// Later tries' (the endpoint client only reads the path).
    path: Option<PathAndQuery>,
    version: Version,
    /// Cloned for each try that may be retried, moved into the last.
    headers: HeaderMap,
    /// The first try's extensions (moved into it); later tries carry the
    /// route plan and the context only.
    extensions: Option<Extensions>,
}

// ===== future =====

type Reading = Pin<Box<dyn Future<Output = Result<RequestBody, BodyError>> + Send>>;

pin_project! {
    #[project = StateProj]
    enum State<F> {
        Reading { read: Reading },
        Ready,
        // Boxed: the layers below make a large future (the balancer's, the
        // endpoint client's), which every layer above would otherwise copy
        // into its own as the request goes down the stack.
        Calling { future: Pin<Box<F>> },
        Backoff { #[pin] sleep: Sleep },
    }
}

pin_project! {
    pub struct ResponseFuture<S: Service<Request<ProxyBody>>, RB> {
        #[pin]
        state: State<S::Future>,
        inner: S,
        head: Head,
        body: Option<RequestBody>,
        plan: Option<Arc<RoutePlan>>,
        context: Option<RequestContext>,
        // Tries sent after the first.
        attempt: u32,
        // Whether the current retry is counted: once an endpoint took it.
        counted: bool,
        // The previous try's result, kept until a retry is under way: if no
        // endpoint can take the retry, the client gets this. Boxed: only
        // retried requests have one, and inline it would make every
        // request's future (copied by each layer above) 352 bytes larger.
        last: Option<Box<Result<Response<RB>, ProxyError>>>,
    }
}

impl<S, RB> ResponseFuture<S, RB>
where
    S: Service<Request<ProxyBody>, Response = Response<RB>, Error = ProxyError>,
{
    /// The request of the next try.
    fn next_request(
        head: &mut Head,
        body: &mut Option<RequestBody>,
        plan: Option<&Arc<RoutePlan>>,
        context: Option<&RequestContext>,
    ) -> Request<ProxyBody> {
        // Only a replayable body is ever sent again (by a retry, or by a
        // hedge: the hedge layer below copies it from the extensions).
        let hedge = plan.is_some_and(|p| p.hedge.is_some());
        let mut hedge_body = None;
        let (body, again) = match body {
            Some(RequestBody::Replayable(replay)) => {
                if hedge {
                    hedge_body = Some(replay.clone());
                }
                (replay.body(), true)
            }
            Some(RequestBody::Streaming(streaming)) => {
                (std::mem::replace(streaming, body::empty()), false)
            }
            None => (body::empty(), false),
        };
        let again = again && plan.is_some_and(|p| p.retry.attempts > 0);
        let mut req = Request::new(body);
        *req.method_mut() = head.method.clone();
        *req.uri_mut() = match head.uri.take() {
            Some(uri) => uri,
            None => Uri::from(
                head.path
                    .clone()
                    .unwrap_or_else(|| PathAndQuery::from_static("/")),
            ),
        };
        *req.version_mut() = head.version;
        *req.headers_mut() = if again {
            head.headers.clone()
        } else {
            std::mem::take(&mut head.headers)
        };
        match head.extensions.take() {
            Some(first) => *req.extensions_mut() = first,
            None => {
                if let Some(plan) = plan {
                    req.extensions_mut().insert(Arc::clone(plan));
                }
                if let Some(context) = context {
                    req.extensions_mut().insert(context.clone());
                }
            }
        }
        if let Some(replay) = hedge_body {
            req.extensions_mut().insert(replay);
        }
        req
    }
}

/// What to do with a try's result.
enum Next<RB> {
    Return(Result<Response<RB>, ProxyError>),
    /// Retry after this backoff; the result is kept meanwhile.
    Retry(Result<Response<RB>, ProxyError>, std::time::Duration),
}

impl<S, RB> Future for ResponseFuture<S, RB>
where
    S: Service<Request<ProxyBody>, Response = Response<RB>, Error = ProxyError>,
{
    type Output = Result<Response<RB>, ProxyError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        loop {
            match this.state.as_mut().project() {
                StateProj::Reading { read } => {
                    *this.body = Some(ready!(read.as_mut().poll(cx))?);
                    this.state.set(State::Ready);
                }
                StateProj::Ready => {
                    let req = Self::next_request(
                        this.head,
                        this.body,
                        this.plan.as_ref(),
                        this.context.as_ref(),
                    );
                    let future = Box::pin(this.inner.call(req));
                    this.state.set(State::Calling { future });
                }
                StateProj::Backoff { sleep } => {
                    ready!(sleep.poll(cx));
                    ready!(this.inner.poll_ready(cx))?;
                    this.state.set(State::Ready);
                }
                StateProj::Calling { future } => {
                    // The balancer refuses at once, so a retry still pending
                    // (or answered) went to an endpoint: it counts.
                    let Poll::Ready(result) = future.as_mut().poll(cx) else {
                        count_retry(this.counted, this.context.as_ref());
                        return Poll::Pending;
                    };
                    let refused_retry = *this.attempt > 0
                        && matches!(
                            &result,
                            Err(ProxyError::NoEndpoints { .. }
                                | ProxyError::NoHealthyEndpoints { .. }
                                | ProxyError::EndpointsSaturated { .. })
                        );
                    if refused_retry && let Some(last) = this.last.take() {
                        if let Some(context) = this.context.as_ref() {
                            context.retry_skipped(RetrySkipped::NoEndpoint);
                        }
                        return Poll::Ready(*last);
                    }
                    count_retry(this.counted, this.context.as_ref());
                    *this.last = None;
                    let next = decide(
                        result,
                        *this.attempt,
                        this.plan.as_deref(),
                        &this.head.method,
                        this.body.as_ref(),
                        this.context.as_ref(),
                    );
                    match next {
                        Next::Return(result) => return Poll::Ready(result),
                        Next::Retry(result, wait) => {
                            *this.last = Some(Box::new(result));
                            *this.attempt += 1;
                            *this.counted = false;
                            tracing::debug!(
                                attempt = *this.attempt,
                                backoff_ms = wait.as_millis() as u64,
                                "retrying"
                            );
                            this.state.set(State::Backoff {
                                sleep: tokio::time::sleep(wait),
                            });
                        }
                    }
                }
            }
        }
    }
}

/// Counts the current retry, once.
fn count_retry(counted: &mut bool, context: Option<&RequestContext>) {
    if !std::mem::replace(counted, true)
        && let Some(context) = context
    {
        context.retry();
    }
}

/// Whether a try's result goes back to the client or is retried.
fn decide<RB>(
    result: Result<Response<RB>, ProxyError>,
    attempt: u32,
    plan: Option<&RoutePlan>,
    method: &Method,
    body: Option<&RequestBody>,
    context: Option<&RequestContext>,
) -> Next<RB> {
    let (Some(plan), Some(outcome)) = (plan, outcome_of(&result)) else {
        return Next::Return(result);
    };
    let retry = &plan.retry;
    if attempt >= retry.attempts || !retryable(retry, method, outcome) {
        return Next::Return(result);
    }
    let skipped = |why| {
        if let Some(context) = context {
            context.retry_skipped(why);
        }
    };
    if !matches!(body, Some(RequestBody::Replayable(_))) {
        skipped(RetrySkipped::NotReplayable);
        return Next::Return(result);
    }
    if !plan.budget.withdraw() {
        tracing::debug!(route = %plan.label, "retry budget spent");
        skipped(RetrySkipped::BudgetExhausted);
        return Next::Return(match result {
            Ok(mut rsp) => {
                rsp.headers_mut().insert(
                    &WEFT_REASON,
                    HeaderValue::from_static(Reason::BudgetExhausted.as_str()),
                );
                rsp.extensions_mut().insert(Refusal {
                    reason: Reason::BudgetExhausted,
                    limit: None,
                });
                Ok(rsp)
            }
            Err(last) => Err(ProxyError::BudgetExhausted {
                last: Box::new(last),
            }),
        });
    }
    Next::Retry(result, backoff(&retry.backoff, attempt + 1))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use std::net::SocketAddr;

    use tower::ServiceExt;
    use weft_config::LoadBalancer;

    use super::*;
    use crate::balance::{Balance, Endpoints};
    use crate::test_util::{FakeEndpoints, outbound_policy};
    use weft_discovery::balance::{Balancer, Endpoint};
    use weft_discovery::endpoints::EndpointSet;

    type Stack = Retry<Balance<FakeEndpoints>>;

    /// Retry over a least-request balancer of `n` endpoints.
    fn stack(n: u16, policy: &str) -> (Stack, Vec<SocketAddr>, FakeEndpoints, Arc<RoutePlan>) {
        let (stack, endpoints, fake, plan) = stack_of(n, policy);
        (
            stack,
            endpoints.iter().map(|e| e.addr()).collect(),
            fake,
            plan,
        )
    }

    fn stack_of(
        n: u16,
        policy: &str,
    ) -> (Stack, Vec<Arc<Endpoint>>, FakeEndpoints, Arc<RoutePlan>) {
        let endpoints: Vec<_> = (1..=n)
            .map(|port| {
                Arc::new(Endpoint::new(
                    SocketAddr::from(([10, 0, 0, 1], port)),
                    Default::default(),
                ))
            })
            .collect();
        let policy = outbound_policy(policy);
        let fake = FakeEndpoints::default();
        let balance = Balance::new(
            Arc::from("billing"),
            Endpoints::Fixed(Arc::new(EndpointSet::from_endpoints(endpoints.clone()))),
            Balancer::new(LoadBalancer::LeastRequest),
            Arc::clone(&policy),
            None,
            fake.clone(),
        );
        let plan = Arc::clone(policy.plan(None));
        (RetryLayer.layer(balance), endpoints, fake, plan)
    }

    fn request(plan: &Arc<RoutePlan>) -> Request<ProxyBody> {
        let mut req = Request::get("/").body(body::empty()).unwrap();
        req.extensions_mut().insert(Arc::clone(plan));
        req
    }

    #[tokio::test(start_paused = true)]
    async fn a_retry_goes_to_another_endpoint() {
        let (retry, endpoints, fake, plan) = stack_of(2, "");
        let (a, b) = (endpoints[0].addr(), endpoints[1].addr());
        // `b` is busier, so least-request would pick `a` again for the
        // retry; the retry must go to `b` all the same.
        let busy: Vec<_> = (0..3).map(|_| endpoints[1].start()).collect();
        fake.answer(a, 503);
        let rsp = retry.oneshot(request(&plan)).await.unwrap();
        assert_eq!(rsp.status(), 200);
        assert_eq!(fake.tries(), [a, b], "the retry went elsewhere");
        drop(busy);
    }

    #[tokio::test(start_paused = true)]
    async fn retries_stop_at_the_budget() {
        let policy = "[outbound]\nretry_budget = { ratio = 0.0, min_per_second = 0 }\n";
        let (retry, endpoints, fake, plan) = stack(2, policy);
        for e in &endpoints {
            fake.answer(*e, 503);
        }
        let rsp = retry.oneshot(request(&plan)).await.unwrap();
        assert_eq!(rsp.status(), 503, "the last failure goes back");
        assert_eq!(rsp.headers()[&WEFT_REASON], "budget-exhausted");
        assert_eq!(
            rsp.extensions().get::<Refusal>().unwrap().reason,
            Reason::BudgetExhausted
        );
        assert_eq!(fake.tries().len(), 1, "no retry");
    }

    #[tokio::test(start_paused = true)]
    async fn a_retry_never_queues_for_a_full_endpoint() {
        let policy = "[outbound]\nendpoint_max_concurrency = 1\n";
        let (retry, endpoints, fake, plan) = stack(1, policy);
        fake.answer(endpoints[0], 503);
        // The failed try still holds the only slot: the retry finds no
        // endpoint, and the client gets the failure rather than a refusal.
        let rsp = retry.oneshot(request(&plan)).await.unwrap();
        assert_eq!(rsp.status(), 503);
        assert!(!rsp.headers().contains_key(&WEFT_REASON));
        assert_eq!(fake.tries(), [endpoints[0]]);
    }

    #[tokio::test(start_paused = true)]
    async fn attempts_bound_the_retries() {
        let policy = "[outbound]\nretry = { attempts = 2 }\n";
        let (retry, endpoints, fake, plan) = stack(2, policy);
        for e in &endpoints {
            fake.answer(*e, 503);
        }
        let rsp = retry.oneshot(request(&plan)).await.unwrap();
        assert_eq!(rsp.status(), 503);
        assert_eq!(fake.tries().len(), 3, "the first try and two retries");
    }
}
