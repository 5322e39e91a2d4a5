//! Fault: the route's injected delays and aborts (`routes[].fault`), for
//! service owners testing how callers cope, in staging.
//!
//! The matched [`RoutePlan`] carries a compiled fault only where the policy
//! permits it (see `weft_core::fault`). Each request rolls once: a delayed
//! request waits the delay, then goes on; an aborted one is answered with the
//! injected status (through [`respond`](crate::respond), with `weft-reason:
//! injected-fault` and `weft-limit: routes.<name>.fault`) without going
//! further; a request may be both, delayed then aborted. Each injection is
//! reported through the request's context, which counts it
//! (`weft_injected_faults_total`) and marks the request so its observation is
//! classified `injected-fault` rather than `success` or `failure`.
//!
//! Routes without a fault pay one extension lookup: the future is the inner
//! one.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use http::{Request, StatusCode};
use pin_project_lite::pin_project;
use tokio::time::Sleep;
use tower::{Layer, Service};

use super::context::{FaultKind, RequestContext};
use weft_core::error::ProxyError;
use weft_core::policy::RoutePlan;

// ===== layer =====

#[derive(Debug, Clone, Copy, Default)]
pub struct FaultLayer;

impl<S> Layer<S> for FaultLayer {
    type Service = Fault<S>;

    fn layer(&self, inner: S) -> Fault<S> {
        Fault { inner }
    }
}

// ===== service =====

#[derive(Debug, Clone)]
pub struct Fault<S> {
    inner: S,
}

impl<S, B> Service<Request<B>> for Fault<S>
where
    S: Service<Request<B>, Error = ProxyError> + Clone,
{
    type Response = S::Response;
    type Error = ProxyError;
    type Future = ResponseFuture<S::Future, S, B>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), ProxyError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let Some(plan) = req
            .extensions()
            .get::<Arc<RoutePlan>>()
            .and_then(|plan| plan.fault.as_ref())
        else {
            return ResponseFuture::Direct {
                future: self.inner.call(req),
            };
        };
        let injection = plan.inject();
        let limit = Arc::clone(&plan.limit);
        let context = RequestContext::of(&req);
        if let Some(context) = context {
            if injection.delay.is_some() {
                context.injected_fault(FaultKind::Delay);
            }
            if injection.abort.is_some() {
                context.injected_fault(FaultKind::Abort);
            }
        }
        if let Some(delay) = injection.delay {
            tracing::debug!(delay_ms = delay.as_millis() as u64, limit = %limit, "injected delay");
            // The ready service waits with the request; this one's clone is
            // made ready for the next.
            let inner = self.inner.clone();
            let inner = std::mem::replace(&mut self.inner, inner);
            return ResponseFuture::Delayed {
                sleep: tokio::time::sleep(delay),
                inner,
                req: Some(req),
                abort: injection.abort.map(|status| (status, limit)),
            };
        }
        match injection.abort {
            Some(status) => ResponseFuture::Aborted {
                error: Some(ProxyError::InjectedFault { status, limit }),
            },
            None => ResponseFuture::Direct {
                future: self.inner.call(req),
            },
        }
    }
}

// ===== future =====

pin_project! {
    /// No trait bounds on the type itself (only on its `Future` impl): a
    /// bound here makes rustc prove `S: Service<Request<B>>` for every
    /// lifetime when an `async` block holds this future (the in-process
    /// client's), which it cannot.
    #[project = Proj]
    pub enum ResponseFuture<F, S, B> {
        Direct { #[pin] future: F },
        Delayed {
            #[pin]
            sleep: Sleep,
            inner: S,
            req: Option<Request<B>>,
            abort: Option<(StatusCode, Arc<str>)>,
        },
        Aborted { error: Option<ProxyError> },
    }
}

impl<F, S, B> Future for ResponseFuture<F, S, B>
where
    S: Service<Request<B>, Future = F, Error = ProxyError>,
    F: Future<Output = Result<S::Response, ProxyError>>,
{
    type Output = Result<S::Response, ProxyError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        loop {
            match self.as_mut().project() {
                Proj::Direct { future } => return future.poll(cx),
                Proj::Aborted { error } => {
                    // Polled again after it answered: pending, as a finished future may be.
                    let Some(error) = error.take() else {
                        return Poll::Pending;
                    };
                    return Poll::Ready(Err(error));
                }
                Proj::Delayed {
                    sleep,
                    inner,
                    req,
                    abort,
                } => {
                    ready!(sleep.poll(cx));
                    if let Some((status, limit)) = abort.take() {
                        return Poll::Ready(Err(ProxyError::InjectedFault { status, limit }));
                    }
                    let Some(req) = req.take() else {
                        return Poll::Pending;
                    };
                    let future = inner.call(req);
                    self.set(ResponseFuture::Direct { future });
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use std::time::Duration;

    use http::Response;
    use tokio::time::Instant;
    use tower::ServiceExt;

    use super::*;
    use crate::test_util::{self, outbound_policy, refusal};

    type Rsp = Response<()>;

    fn plan(fault: &str, allowed: bool) -> Arc<RoutePlan> {
        let allow = if allowed { "allow_faults = true\n" } else { "" };
        let policy = outbound_policy(&format!(
            "{allow}[[routes]]\nname = \"pay\"\nfault = {fault}\n"
        ));
        Arc::clone(policy.plan(Some(0)))
    }

    fn request(plan: &Arc<RoutePlan>) -> Request<()> {
        let mut req = Request::new(());
        req.extensions_mut().insert(Arc::clone(plan));
        req
    }

    #[tokio::test(start_paused = true)]
    async fn an_abort_answers_without_going_further() {
        let (inner, mut handle) = test_util::pair::<Request<()>, Rsp>();
        let plan = plan("{ abort = 503 }", true);
        let error = refusal(FaultLayer.layer(inner).oneshot(request(&plan)).await);
        assert_eq!(error.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(error.reason().as_str(), "injected-fault");
        assert_eq!(error.limit(), Some("routes.pay.fault"));
        assert!(test_util::arrived(&mut handle).await.is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn a_delay_holds_the_request_then_forwards_it() {
        let (inner, mut handle) = test_util::pair::<Request<()>, Rsp>();
        let plan = plan("{ delay = \"200ms\" }", true);
        let start = Instant::now();
        let call = tokio::spawn(FaultLayer.layer(inner).oneshot(request(&plan)));
        let (_, send) = handle.next_request().await.unwrap();
        assert_eq!(start.elapsed(), Duration::from_millis(200));
        send.send_response(Response::new(()));
        assert!(call.await.unwrap().is_ok());
    }

    #[tokio::test(start_paused = true)]
    async fn no_fault_without_permission() {
        let (inner, mut handle) = test_util::pair::<Request<()>, Rsp>();
        let plan = plan("{ abort = 503 }", false);
        assert!(plan.fault.is_none());
        let call = tokio::spawn(FaultLayer.layer(inner).oneshot(request(&plan)));
        let (_, send) = handle.next_request().await.unwrap();
        send.send_response(Response::new(()));
        assert!(call.await.unwrap().is_ok());
    }
}
