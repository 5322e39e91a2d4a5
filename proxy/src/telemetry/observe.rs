//! One request's observation: what it was and how it ended, recorded once.
//!
//! A listener starts an [`Observation`] when a request arrives, tells it the
//! service and route once they are known, and hands it the response with
//! [`Observation::respond`]. The observation then rides in the response body
//! ([`Observed`]) and is recorded when the body ends: that is when a gRPC
//! status in the trailers is known, and when the request's duration is. A
//! body that fails, or that the client abandons, is recorded as a failure; a
//! request dropped before its response (the client went away) is recorded
//! with status 0.
//!
//! Everything that reports a finished request hangs off [`Observation::finish`]
//! (today: the metrics), so it is one place for every export.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use http::Response;
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;

use super::metrics::{Classification, Direction, Finished, Metrics, RetrySkipped};
use super::{NO_LIMIT, UNKNOWN};
use crate::body::{self, BoxError, ProxyBody};
use crate::error::ProxyError;
use crate::retry::classify::grpc_status;

/// One request, from arrival to the end of its response.
#[derive(Debug)]
pub struct Observation {
    metrics: Arc<Metrics>,
    direction: Direction,
    start: Instant,
    service: Arc<str>,
    route: Arc<str>,
    /// The status sent; 0 until a response exists.
    status: u16,
    grpc_failed: bool,
    finished: bool,
}

impl Observation {
    pub fn start(metrics: &Arc<Metrics>, direction: Direction) -> Self {
        Self {
            metrics: Arc::clone(metrics),
            direction,
            start: Instant::now(),
            service: Arc::clone(&UNKNOWN),
            route: Arc::clone(super::no_route()),
            status: 0,
            grpc_failed: false,
            finished: false,
        }
    }

    pub fn set_service(&mut self, label: &Arc<str>) {
        self.service = Arc::clone(label);
    }

    pub fn set_route(&mut self, label: &Arc<str>) {
        self.route = Arc::clone(label);
    }

    pub fn service(&self) -> &Arc<str> {
        &self.service
    }

    /// The proxy answers `error` itself.
    pub fn refused(&self, error: &ProxyError) {
        self.refused_for(error.reason(), error.limit());
    }

    /// The proxy marks the response with `reason` (and `limit`).
    pub fn refused_for(&self, reason: &'static str, limit: Option<&str>) {
        let limit = limit.map_or_else(|| Arc::clone(&NO_LIMIT), Arc::from);
        self.metrics
            .refusal(self.direction, &self.service, &self.route, reason, &limit);
    }

    pub fn retry(&self) {
        self.metrics.retry(&self.service, &self.route);
    }

    pub fn retry_skipped(&self, why: RetrySkipped) {
        self.metrics.retry_skipped(&self.service, &self.route, why);
    }

    pub fn ejection(&self) {
        self.metrics.ejection(&self.service);
    }

    /// The response goes out: the observation finishes when its body ends.
    pub fn respond(mut self, rsp: Response<ProxyBody>) -> Response<ProxyBody> {
        self.status = rsp.status().as_u16();
        self.grpc_failed = grpc_status(rsp.headers()).is_some_and(|s| s != 0);
        if rsp.body().is_end_stream() {
            self.finish(false);
            return rsp;
        }
        rsp.map(|inner| {
            body::boxed(Observed {
                inner,
                observation: Some(self),
            })
        })
    }

    /// Records the request (once).
    fn finish(&mut self, failed: bool) {
        if std::mem::replace(&mut self.finished, true) {
            return;
        }
        let failed = failed || self.status == 0 || self.status >= 500 || self.grpc_failed;
        let classification = if failed {
            Classification::Failure
        } else {
            Classification::Success
        };
        self.metrics.record(&Finished {
            direction: self.direction,
            service: &self.service,
            route: &self.route,
            status_code: self.status,
            classification,
            duration: self.start.elapsed(),
        });
    }
}

impl Drop for Observation {
    /// Never finished: dropped before a response, or with its body unfinished.
    fn drop(&mut self) {
        self.finish(true);
    }
}

pin_project! {
    /// A response body that finishes its request's observation when it ends.
    pub struct Observed {
        #[pin]
        inner: ProxyBody,
        observation: Option<Observation>,
    }
}

impl Body for Observed {
    type Data = bytes::Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let mut this = self.project();
        let polled = this.inner.as_mut().poll_frame(cx);
        if let Poll::Ready(frame) = &polled
            && let Some(mut observation) = this.observation.take()
        {
            match frame {
                Some(Ok(frame)) => {
                    if let Some(trailers) = frame.trailers_ref() {
                        observation.grpc_failed |= grpc_status(trailers).is_some_and(|s| s != 0);
                    }
                    // hyper stops polling a body that says it has ended.
                    if this.inner.is_end_stream() {
                        observation.finish(false);
                    } else {
                        *this.observation = Some(observation);
                    }
                }
                Some(Err(_)) => observation.finish(true),
                None => observation.finish(false),
            }
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
