//! Cold start: hold calls to a service that has no endpoint yet, until its
//! first instance registers (`outbound.cold_start`).
//!
//! A service scaled to zero has an empty endpoint set. Without this layer
//! its calls are refused at once (`no-endpoints`). With it, a call that
//! finds the set empty takes a slot of the service's [`ColdStartGate`] (at
//! most `queue` calls are held; one more is refused at once) and waits on
//! the service's endpoint watch (no polling) for at most `hold`: the moment
//! discovery publishes a set with an endpoint, every held call goes on down
//! the stack as if it had just arrived. A call held `hold` in vain is
//! refused. Both refusals are `503`, `weft-reason: cold-start-timeout`, with
//! `weft-limit` naming `outbound.cold_start.queue` or
//! `outbound.cold_start.hold`.
//!
//! While held, a call's body is not read (its sender feels back-pressure),
//! and a call dropped by its caller (a hang-up, or the route's whole-request
//! timeout above this layer firing first) gives its slot back at once.
//!
//! The first held call of a cold start also tells the service's activator
//! ([`Activator`]), at most once per `hold` window per service (the gate
//! decides). The sidecar makes that call in a task of its own: its outcome
//! never touches the held calls.
//!
//! A service with endpoints, a destination without discovery (an IP
//! literal), or a policy without `cold_start` costs one check per call.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use futures_util::future::Either;
use http::Request;
use tower::{Layer, Service, ServiceExt};

use super::balance::Endpoints;
use super::context::{ColdStartOutcome, RequestContext};
use weft_config::ActivatorUrl;
use weft_core::error::ProxyError;
use weft_core::limits::ColdStartGate;

/// Tells a platform that a service needs an instance.
pub trait Activator: Send + Sync + std::fmt::Debug {
    /// Call `url` for `service`; returns at once (the call runs elsewhere,
    /// and its failures are the implementation's to log and count).
    fn activate(&self, service: &Arc<str>, url: &ActivatorUrl);
}

// ===== layer =====

#[derive(Debug, Clone)]
pub struct ColdStartLayer {
    service: Arc<str>,
    endpoints: Endpoints,
    gate: Option<Arc<ColdStartGate>>,
    activator: Option<Arc<dyn Activator>>,
}

impl ColdStartLayer {
    /// Holds calls to `service` while `endpoints` is empty, within `gate`'s
    /// bounds (None: never holds).
    pub fn new(
        service: Arc<str>,
        endpoints: Endpoints,
        gate: Option<Arc<ColdStartGate>>,
        activator: Option<Arc<dyn Activator>>,
    ) -> Self {
        Self {
            service,
            endpoints,
            gate,
            activator,
        }
    }
}

impl<S> Layer<S> for ColdStartLayer {
    type Service = ColdStart<S>;

    fn layer(&self, inner: S) -> ColdStart<S> {
        // Only a watched set can gain its first endpoint.
        let cold = match (&self.gate, &self.endpoints) {
            (Some(gate), Endpoints::Watch(endpoints)) => Some(Cold {
                service: Arc::clone(&self.service),
                gate: Arc::clone(gate),
                endpoints: endpoints.clone(),
                activator: self.activator.clone(),
            }),
            _ => None,
        };
        ColdStart { inner, cold }
    }
}

/// What a layer that may hold calls needs.
#[derive(Debug, Clone)]
struct Cold {
    service: Arc<str>,
    gate: Arc<ColdStartGate>,
    endpoints: weft_discovery::endpoints::EndpointsReader,
    activator: Option<Arc<dyn Activator>>,
}

// ===== service =====

#[derive(Debug, Clone)]
pub struct ColdStart<S> {
    inner: S,
    cold: Option<Cold>,
}

/// A held call (rare: boxed).
pub type HeldFuture<R> = Pin<Box<dyn Future<Output = Result<R, ProxyError>> + Send>>;

impl<S, B> Service<Request<B>> for ColdStart<S>
where
    S: Service<Request<B>, Error = ProxyError> + Clone + Send + 'static,
    S::Future: Send,
    S::Response: Send,
    B: Send + 'static,
{
    type Response = S::Response;
    type Error = ProxyError;
    type Future = Either<S::Future, HeldFuture<S::Response>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), ProxyError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let Some(cold) = self
            .cold
            .as_ref()
            .filter(|c| c.endpoints.borrow().is_empty())
        else {
            return Either::Left(self.inner.call(req));
        };
        let context = RequestContext::of(&req).cloned();
        let report = move |outcome: ColdStartOutcome| {
            if let Some(context) = &context {
                context.cold_start(outcome);
            }
        };
        let slot = match cold.gate.try_hold(&cold.service) {
            Ok(slot) => slot,
            Err(refused) => {
                report(ColdStartOutcome::Overflow);
                return Either::Right(Box::pin(std::future::ready(Err(refused.into()))));
            }
        };
        if cold.gate.activation_due(tokio::time::Instant::now())
            && let (Some(activator), Some(url)) = (&cold.activator, cold.gate.activator())
        {
            activator.activate(&cold.service, url);
        }
        let Cold {
            service,
            gate,
            mut endpoints,
            ..
        } = cold.clone();
        let inner = self.inner.clone();
        tracing::debug!(service.name = %service, held = gate.held(), "call held: the service has no endpoint");
        Either::Right(Box::pin(async move {
            // Not a poll: woken by discovery's next set (the watch's
            // read guard is dropped before anything else is awaited).
            let waited =
                tokio::time::timeout(gate.hold(), endpoints.wait_for(|set| !set.is_empty()));
            let arrived = match waited.await {
                Ok(Ok(_)) => Some(true),
                Ok(Err(_)) => Some(false),
                Err(_) => None,
            };
            drop(slot);
            match arrived {
                Some(true) => {
                    report(ColdStartOutcome::Released);
                    inner.oneshot(req).await
                }
                // The service is gone from discovery (no instance will come).
                Some(false) => Err(ProxyError::NoEndpoints {
                    service: service.to_string(),
                }),
                None => {
                    report(ColdStartOutcome::Timeout);
                    Err(gate.timed_out(&service).into())
                }
            }
        }))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use std::net::SocketAddr;
    use std::sync::Mutex;
    use std::time::Duration;

    use weft_config::Metadata;
    use weft_core::context::{Events, RetrySkipped};
    use weft_discovery::endpoints::{EndpointSpec, EndpointsWriter, Update};

    use super::*;
    use crate::test_util::{Handle, MockService, arrived, outbound_policy, pair, refusal};

    type Req = Request<()>;
    type Rsp = http::Response<()>;

    /// Outcomes and activations, as the sidecar would count them.
    #[derive(Debug, Default)]
    struct Counts {
        outcomes: Mutex<Vec<ColdStartOutcome>>,
        activations: Mutex<Vec<(String, String)>>,
    }

    impl Events for Counts {
        fn retry(&self, _: &Arc<str>, _: &Arc<str>) {}
        fn retry_skipped(&self, _: &Arc<str>, _: &Arc<str>, _: RetrySkipped) {}
        fn ejection(&self, _: &Arc<str>) {}
        fn cold_start(&self, _: &Arc<str>, outcome: ColdStartOutcome) {
            self.outcomes.lock().unwrap().push(outcome);
        }
        fn hedge(&self, _: &Arc<str>, _: &Arc<str>, _: weft_core::context::HedgeOutcome, _: u32) {}
        fn injected_fault(&self, _: &Arc<str>, _: &Arc<str>, _: weft_core::context::FaultKind) {}
    }

    impl Activator for Counts {
        fn activate(&self, service: &Arc<str>, url: &ActivatorUrl) {
            self.activations
                .lock()
                .unwrap()
                .push((service.to_string(), url.as_str().to_owned()));
        }
    }

    impl Counts {
        fn outcomes(&self, which: ColdStartOutcome) -> usize {
            let outcomes = self.outcomes.lock().unwrap();
            outcomes.iter().filter(|o| **o == which).count()
        }
    }

    struct Setup {
        service: ColdStart<MockService<Req, Rsp>>,
        handle: Handle<Req, Rsp>,
        writer: EndpointsWriter,
        gate: Arc<ColdStartGate>,
        counts: Arc<Counts>,
    }

    fn setup(table: &str) -> Setup {
        let policy = outbound_policy(&format!("[outbound]\ncold_start = {table}\n"));
        let gate = Arc::clone(policy.cold_start.as_ref().unwrap());
        let (writer, reader) = EndpointsWriter::new(vec![]);
        let counts = Arc::new(Counts::default());
        let (inner, handle) = pair::<Req, Rsp>();
        let layer = ColdStartLayer::new(
            Arc::from("lazy"),
            Endpoints::Watch(reader),
            Some(Arc::clone(&gate)),
            Some(Arc::clone(&counts) as Arc<dyn Activator>),
        );
        Setup {
            service: layer.layer(inner),
            handle,
            writer,
            gate,
            counts,
        }
    }

    fn request(counts: &Arc<Counts>) -> Req {
        static LAZY: std::sync::LazyLock<Arc<str>> = std::sync::LazyLock::new(|| Arc::from("lazy"));
        let context =
            RequestContext::new(Some(Arc::clone(counts) as Arc<dyn Events>), &LAZY, &LAZY);
        let mut req = Request::new(());
        req.extensions_mut().insert(context);
        req
    }

    fn instance(port: u16) -> Update {
        Update::Add(vec![EndpointSpec {
            addr: SocketAddr::from(([10, 0, 0, 1], port)),
            metadata: Metadata::default(),
            health: Default::default(),
        }])
    }

    #[tokio::test(start_paused = true)]
    async fn a_burst_is_held_then_released_when_the_first_instance_registers() {
        let Setup {
            service,
            mut handle,
            writer,
            gate,
            counts,
        } = setup("{ hold = \"10s\", queue = 10, activate = \"http://127.0.0.1:9/up\" }");
        handle.allow(10);
        let calls: Vec<_> = (0..5)
            .map(|_| tokio::spawn(service.clone().oneshot(request(&counts))))
            .collect();
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert!(arrived(&mut handle).await.is_none(), "held, not sent");
        assert_eq!(gate.held(), 5);
        assert_eq!(
            *counts.activations.lock().unwrap(),
            [("lazy".to_owned(), "http://127.0.0.1:9/up".to_owned())],
            "the activator was called once for the burst"
        );

        writer.apply(instance(1));
        for _ in 0..5 {
            let (_, send) = handle.next_request().await.unwrap();
            send.send_response(http::Response::new(()));
        }
        for call in calls {
            call.await.unwrap().unwrap();
        }
        assert_eq!(gate.held(), 0);
        assert_eq!(counts.outcomes(ColdStartOutcome::Released), 5);

        // With an endpoint, calls go straight through (and nothing is counted).
        let call = tokio::spawn(service.clone().oneshot(request(&counts)));
        let (_, send) = handle.next_request().await.unwrap();
        send.send_response(http::Response::new(()));
        call.await.unwrap().unwrap();
        assert_eq!(counts.outcomes.lock().unwrap().len(), 5);
    }

    #[tokio::test(start_paused = true)]
    async fn a_call_held_in_vain_is_refused_after_hold() {
        let Setup {
            service,
            mut handle,
            gate,
            counts,
            writer: _writer,
        } = setup("{ hold = \"3s\" }");
        let call = tokio::spawn(service.clone().oneshot(request(&counts)));
        tokio::time::sleep(Duration::from_millis(2999)).await;
        assert!(!call.is_finished());
        tokio::time::sleep(Duration::from_millis(2)).await;
        let error = refusal(call.await.unwrap());
        assert!(matches!(error, ProxyError::ColdStart(_)), "{error}");
        assert_eq!(error.reason().as_str(), "cold-start-timeout");
        assert_eq!(error.status(), http::StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(error.limit(), Some("outbound.cold_start.hold"));
        assert_eq!(gate.held(), 0);
        assert_eq!(counts.outcomes(ColdStartOutcome::Timeout), 1);
        assert!(arrived(&mut handle).await.is_none());
        assert!(
            counts.activations.lock().unwrap().is_empty(),
            "no activator configured"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn past_the_queue_calls_are_refused_at_once_and_hang_ups_free_slots() {
        let Setup {
            service,
            gate,
            counts,
            writer: _writer,
            handle: _handle,
        } = setup("{ queue = 2 }");
        let first = tokio::spawn(service.clone().oneshot(request(&counts)));
        let _second = tokio::spawn(service.clone().oneshot(request(&counts)));
        tokio::task::yield_now().await;
        assert_eq!(gate.held(), 2);
        let error = refusal(service.clone().oneshot(request(&counts)).await);
        assert_eq!(error.reason().as_str(), "cold-start-timeout");
        assert_eq!(error.limit(), Some("outbound.cold_start.queue"));
        assert_eq!(counts.outcomes(ColdStartOutcome::Overflow), 1);

        // The first caller hangs up: its slot is free for another call.
        first.abort();
        assert!(first.await.unwrap_err().is_cancelled());
        assert_eq!(gate.held(), 1);
        let _third = tokio::spawn(service.clone().oneshot(request(&counts)));
        tokio::task::yield_now().await;
        assert_eq!(gate.held(), 2);
        assert_eq!(counts.outcomes(ColdStartOutcome::Overflow), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn the_activator_is_called_again_only_after_a_hold_window() {
        let Setup {
            service,
            counts,
            writer: _writer,
            handle: _handle,
            ..
        } = setup("{ hold = \"1s\", activate = \"http://127.0.0.1:9/up\" }");
        let calls = |n| {
            (0..n)
                .map(|_| tokio::spawn(service.clone().oneshot(request(&counts))))
                .collect::<Vec<_>>()
        };
        let burst = calls(20);
        tokio::time::sleep(Duration::from_millis(500)).await;
        let late = calls(5);
        assert_eq!(counts.activations.lock().unwrap().len(), 1);
        for call in burst.into_iter().chain(late) {
            assert!(call.await.unwrap().is_err());
        }
        // Still cold a window later: the platform is asked again, once.
        let again = calls(3);
        for call in again {
            assert!(call.await.unwrap().is_err());
        }
        assert_eq!(counts.activations.lock().unwrap().len(), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn without_the_policy_calls_are_not_held() {
        let (writer, reader) = EndpointsWriter::new(vec![]);
        let (inner, mut handle) = pair::<Req, Rsp>();
        let service = ColdStartLayer::new(Arc::from("lazy"), Endpoints::Watch(reader), None, None)
            .layer(inner);
        handle.allow(1);
        let call = tokio::spawn(service.oneshot(Request::new(())));
        let (_, send) = handle.next_request().await.unwrap();
        send.send_response(http::Response::new(()));
        call.await.unwrap().unwrap();
        drop(writer);
    }
}
