//! One request's observation: what it was and how it ended, recorded once.
//!
//! The stack's observe layer (`weft_stack::observe`) starts an
//! [`Observation`] through a [`RequestObserver`] when a request arrives; the
//! layers below tell it the service and route through the request's context;
//! the layer shows it the response, then carries it in the response body and
//! finishes it when the body ends: that is when a gRPC status in the
//! trailers is known, and when the request's duration is. A
//! body that fails, or that the client abandons, is recorded as a failure; a
//! request dropped before its response (the client went away) is recorded
//! with status 0.
//!
//! Everything that reports a finished request hangs off [`Observation::finish`]
//! (the metrics, the request's span, the access log line), so it is one place
//! for every export. The span and the request details the span and the log
//! need are only kept when `[telemetry]` asks for them ([`Reporters`]).

use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use http::{HeaderMap, Method, Request, Response, header};
use opentelemetry::KeyValue;
use opentelemetry::trace::{Span as _, SpanKind, Status};

use super::Reporters;
use super::metrics::{Classification, Direction, Finished};
use super::{NO_LIMIT, UNKNOWN};
use weft_core::context::{
    ColdStartOutcome, Events, FaultKind, HedgeOutcome, RequestContext, RetrySkipped,
};
use weft_core::error::Refusal;
use weft_core::error::{WEFT_LIMIT, WEFT_REASON};
use weft_core::retry::classify::grpc_status;
use weft_stack::observe::Observer;
use weft_stack::rate_limit;
use weft_transport::tls::CallerIdentity;

impl Events for Reporters {
    fn retry(&self, service: &Arc<str>, route: &Arc<str>) {
        self.metrics.retry(service, route);
    }

    fn retry_skipped(&self, service: &Arc<str>, route: &Arc<str>, why: RetrySkipped) {
        use super::metrics::RetrySkipped as Label;
        let why = match why {
            RetrySkipped::BudgetExhausted => Label::BudgetExhausted,
            RetrySkipped::NotReplayable => Label::NotReplayable,
            RetrySkipped::NoEndpoint => Label::NoEndpoint,
        };
        self.metrics.retry_skipped(service, route, why);
    }

    fn ejection(&self, service: &Arc<str>) {
        self.metrics.ejection(service);
    }

    fn cold_start(&self, service: &Arc<str>, outcome: ColdStartOutcome) {
        self.metrics.cold_start(service, outcome);
    }

    fn hedge(&self, service: &Arc<str>, route: &Arc<str>, outcome: HedgeOutcome, n: u32) {
        self.metrics.hedge(service, route, outcome.as_str(), n);
    }

    fn injected_fault(&self, service: &Arc<str>, route: &Arc<str>, kind: FaultKind) {
        self.metrics.injected_fault(service, route, kind.as_str());
    }
}

/// The stack's observer for one direction and one client connection: every
/// request through it is observed into the [`Reporters`].
#[derive(Debug)]
pub struct RequestObserver {
    reporters: Arc<Reporters>,
    direction: Direction,
    /// The `caller` label of an mTLS connection's requests, which all carry
    /// the same identity: resolved at its first request.
    verified_caller: OnceLock<Arc<str>>,
}

impl RequestObserver {
    /// The observer of one connection's requests.
    pub fn new(reporters: Arc<Reporters>, direction: Direction) -> Arc<Self> {
        Arc::new(Self {
            reporters,
            direction,
            verified_caller: OnceLock::new(),
        })
    }

    /// The `caller` label of `req` (see [`super::callers`]).
    fn caller<B>(&self, req: &Request<B>) -> Arc<str> {
        let callers = self.reporters.metrics.callers();
        match self.direction {
            Direction::Outbound => Arc::clone(callers.own()),
            Direction::Inbound if req.extensions().get::<CallerIdentity>().is_some() => Arc::clone(
                self.verified_caller
                    .get_or_init(|| callers.label(rate_limit::caller(req))),
            ),
            Direction::Inbound => callers.label(rate_limit::caller(req)),
        }
    }
}

impl Observer for RequestObserver {
    type Observation = Observation;

    fn start<B>(&self, req: &mut Request<B>) -> Observation {
        let caller = self.caller(req);
        Observation::start(&self.reporters, self.direction, caller, req)
    }
}

/// One request, from arrival to the end of its response.
#[derive(Debug)]
pub struct Observation {
    reporters: Arc<Reporters>,
    direction: Direction,
    /// The `caller` label.
    caller: Arc<str>,
    start: Instant,
    /// The service, the route and what happened on the way, told by the
    /// layers below (they find it in the request's extensions).
    context: RequestContext,
    /// The status sent; 0 until a response exists.
    status: u16,
    grpc_failed: bool,
    finished: bool,
    /// Only with traces or the access log on.
    detail: Option<Box<Detail>>,
}

/// What the span and the access log say beyond the metrics.
#[derive(Debug)]
struct Detail {
    method: Method,
    authority: Option<String>,
    /// The path, without the query.
    path: String,
    /// `weft-reason` and `weft-limit` of the response sent.
    reason: Option<String>,
    limit: Option<String>,
    span: Option<opentelemetry_sdk::trace::Span>,
}

impl Observation {
    /// A request arrives: with traces on, its span starts here, as a child
    /// of the trace context `req` carries, and `req` then carries the span's
    /// context to the next hop, and the [`RequestContext`] the layers below
    /// report through.
    pub fn start<B>(
        reporters: &Arc<Reporters>,
        direction: Direction,
        caller: Arc<str>,
        req: &mut Request<B>,
    ) -> Self {
        let start = Instant::now();
        let detail = reporters.detailed().then(|| {
            let method = req.method().clone();
            let path = req.uri().path().to_owned();
            let authority = authority(req);
            let span = reporters.traces.as_ref().map(|traces| {
                let kind = match direction {
                    Direction::Inbound => SpanKind::Server,
                    Direction::Outbound => SpanKind::Client,
                };
                let mut attributes = vec![
                    KeyValue::new("weft.direction", direction.as_str()),
                    KeyValue::new("http.request.method", method.as_str().to_owned()),
                    KeyValue::new("url.path", path.clone()),
                ];
                if let Some(authority) = &authority {
                    attributes.push(KeyValue::new("server.address", authority.clone()));
                }
                traces.start_span(kind, method_name(&method), req.headers_mut(), attributes)
            });
            Box::new(Detail {
                method,
                authority,
                path,
                reason: None,
                limit: None,
                span,
            })
        });
        let context = RequestContext::new(
            Some(Arc::clone(reporters) as Arc<dyn Events>),
            &UNKNOWN,
            super::no_route(),
        );
        req.extensions_mut().insert(context.clone());
        Self {
            reporters: Arc::clone(reporters),
            direction,
            caller,
            start,
            context,
            status: 0,
            grpc_failed: false,
            finished: false,
            detail,
        }
    }

    /// The context the layers below report through.
    pub fn context(&self) -> &RequestContext {
        &self.context
    }

    /// The proxy marked the response with `refusal`: counted once, here.
    fn refused(&self, refusal: &Refusal) {
        let context = &self.context;
        if let Some(stats) = context.stats() {
            stats.refusal(refusal.reason);
        }
        let limit = refusal.limit.as_ref().unwrap_or(&NO_LIMIT);
        self.reporters.metrics.refusal(
            self.direction,
            &self.caller,
            context.service(),
            context.route(),
            refusal.reason.as_str(),
            limit,
        );
    }

    /// Records the request (once).
    fn record(&mut self, failed: bool) {
        if std::mem::replace(&mut self.finished, true) {
            return;
        }
        let failed = failed || self.status == 0 || self.status >= 500 || self.grpc_failed;
        // A request a fault was injected into is neither: SLOs leave it out.
        let classification = if self.context.fault_injected() {
            Classification::InjectedFault
        } else if failed {
            Classification::Failure
        } else {
            Classification::Success
        };
        let finished = Finished {
            direction: self.direction,
            caller: &self.caller,
            service: self.context.service(),
            route: self.context.route(),
            status_code: self.status,
            classification,
            duration: self.start.elapsed(),
        };
        self.reporters.metrics.record(&finished);
        let Some(detail) = self.detail.as_deref_mut() else {
            return;
        };
        let trace_id = detail.span.as_ref().map(|span| {
            let sc = span.span_context();
            sc.trace_id().to_string()
        });
        let sent = {
            let tries = self.context.tries();
            Sent {
                endpoint: tries.endpoint,
                retries: tries.retries,
            }
        };
        if let Some(mut span) = detail.span.take() {
            let why = failure_description(&finished, detail, self.grpc_failed);
            end_span(&mut span, &finished, detail, sent, why);
        }
        if self.reporters.access_log {
            access_log(&finished, detail, sent, trace_id.as_deref());
        }
    }
}

impl weft_stack::observe::Observation for Observation {
    /// The response goes out: a refusal is counted now; the request is
    /// recorded when its body ends.
    fn respond<B>(&mut self, rsp: &Response<B>) {
        if let Some(refusal) = rsp.extensions().get::<Refusal>() {
            self.refused(refusal);
        }
        self.status = rsp.status().as_u16();
        self.grpc_failed = grpc_status(rsp.headers()).is_some_and(|s| s != 0);
        if let Some(detail) = &mut self.detail {
            let text = |name| {
                rsp.headers()
                    .get(name)
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_owned)
            };
            detail.reason = text(&WEFT_REASON);
            detail.limit = text(&WEFT_LIMIT);
        }
    }

    fn trailers(&mut self, trailers: &HeaderMap) {
        self.grpc_failed |= grpc_status(trailers).is_some_and(|s| s != 0);
    }

    fn finish(&mut self, failed: bool) {
        self.record(failed);
    }
}

/// Where the request went, as the layers told the context.
#[derive(Debug, Clone, Copy)]
struct Sent {
    /// The last endpoint the request was sent to.
    endpoint: Option<SocketAddr>,
    /// Retry attempts sent.
    retries: u32,
}

/// Why a failed request failed, for the span status.
fn failure_description(f: &Finished<'_>, detail: &Detail, grpc_failed: bool) -> Option<String> {
    if f.classification == Classification::Success {
        return None;
    }
    Some(match (&detail.reason, f.status_code) {
        (Some(reason), _) => reason.clone(),
        (None, 0) => "no response: the client went away first".to_owned(),
        (None, status) if status >= 500 => format!("HTTP status {status}"),
        (None, _) if grpc_failed => "gRPC status other than 0".to_owned(),
        (None, _) => "the response body failed or was abandoned".to_owned(),
    })
}

/// The span's final attributes, name and status; then it ends (and is
/// queued for export when sampled).
fn end_span(
    span: &mut opentelemetry_sdk::trace::Span,
    f: &Finished<'_>,
    detail: &Detail,
    sent: Sent,
    failure: Option<String>,
) {
    if span.is_recording() {
        if !f.route.is_empty() {
            span.update_name(format!("{} {}", method_name(&detail.method), f.route));
        }
        let mut attributes = vec![
            KeyValue::new("weft.service", f.service.to_string()),
            KeyValue::new("weft.route", f.route.to_string()),
            KeyValue::new("weft.retries", i64::from(sent.retries)),
            KeyValue::new("http.response.status_code", i64::from(f.status_code)),
        ];
        if let Some(endpoint) = sent.endpoint {
            attributes.push(KeyValue::new("weft.endpoint", endpoint.to_string()));
        }
        if let Some(reason) = &detail.reason {
            attributes.push(KeyValue::new("weft.reason", reason.clone()));
        }
        if let Some(limit) = &detail.limit {
            attributes.push(KeyValue::new("weft.limit", limit.clone()));
        }
        span.set_attributes(attributes);
        if let Some(description) = failure {
            span.set_status(Status::error(description));
        }
    }
    span.end();
}

/// The access log line (target `weft_access`).
fn access_log(f: &Finished<'_>, detail: &Detail, sent: Sent, trace_id: Option<&str>) {
    tracing::info!(
        target: "weft_access",
        direction = f.direction.as_str(),
        method = %detail.method,
        authority = detail.authority.as_deref(),
        path = %detail.path,
        service = %f.service,
        route = %f.route,
        status = f.status_code,
        classification = f.classification.as_str(),
        duration_ms = f.duration.as_micros() as f64 / 1000.0,
        endpoint = sent.endpoint.map(tracing::field::display),
        reason = detail.reason.as_deref(),
        limit = detail.limit.as_deref(),
        retries = sent.retries,
        trace_id,
        "request"
    );
}

/// The span name of a method: standard methods by name, any other `HTTP`
/// (OpenTelemetry's HTTP conventions; the method itself is an attribute).
fn method_name(method: &Method) -> &'static str {
    match *method {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::DELETE => "DELETE",
        Method::HEAD => "HEAD",
        Method::OPTIONS => "OPTIONS",
        Method::PATCH => "PATCH",
        Method::CONNECT => "CONNECT",
        Method::TRACE => "TRACE",
        _ => "HTTP",
    }
}

/// The authority the request names: its URI's, else its `Host` header.
fn authority<B>(req: &Request<B>) -> Option<String> {
    req.uri()
        .authority()
        .map(|a| a.as_str().to_owned())
        .or_else(|| host(req.headers()))
}

fn host(headers: &HeaderMap) -> Option<String> {
    headers
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
}

impl Drop for Observation {
    /// Never finished: dropped before a response, or with its body unfinished.
    fn drop(&mut self) {
        self.record(true);
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use std::convert::Infallible;

    use bytes::Bytes;
    use http_body_util::{BodyExt, Full};
    use tower::{Layer, ServiceExt};
    use weft_stack::observe::ObserveLayer;

    use super::*;
    use crate::telemetry::Metrics;
    use crate::telemetry::metrics::{GaugeSource, Gauges};

    struct NoGauges;

    impl GaugeSource for NoGauges {
        fn refresh(&self, _: &mut Gauges<'_>) {}
    }

    #[tokio::test]
    async fn the_request_is_recorded_when_its_body_ends_under_the_labels_below() {
        let metrics = Arc::new(Metrics::new(false));
        let reporters = Arc::new(Reporters {
            metrics: Arc::clone(&metrics),
            traces: None,
            access_log: false,
        });
        let service_label: Arc<str> = Arc::from("billing");
        let inner = tower::service_fn(move |req: Request<()>| {
            let context = RequestContext::of(&req).cloned().unwrap();
            context.set_service(&service_label, None);
            async move { Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"ok")))) }
        });
        let observer = RequestObserver::new(reporters, Direction::Outbound);
        let observe = ObserveLayer::new(observer).layer(inner);
        let rsp = observe.oneshot(Request::new(())).await.unwrap();
        let count = || {
            metrics.render(&NoGauges).unwrap().lines().any(|l| {
                l.starts_with("weft_requests_total{")
                    && l.contains("service=\"billing\"")
                    && l.ends_with(" 1")
            })
        };
        assert!(!count(), "not before the body ends");
        rsp.into_body().collect().await.unwrap();
        assert!(count(), "{}", metrics.render(&NoGauges).unwrap());
    }
}
