//! What one request's layers tell each other, and the observation that
//! started it.
//!
//! The [`Observe`](super::observe) layer at the top of a stack starts a
//! request's observation and puts a [`RequestContext`] in the request's
//! extensions (the retry layer puts one there when no observe layer did).
//! The balance layer records there every endpoint an attempt went to, so
//! the retry layer's next attempt goes elsewhere. Layers below learn what the observation reports when the
//! request ends (the service, the route, the endpoint, the retries) and
//! report what happens on the way (a retry, a retry not sent, an ejection,
//! a refusal is marked on its response instead: see [`super::respond`]):
//! each through one call on the context, which updates the service's
//! [`Stats`] and the telemetry [`Events`] together. A request without a context (a stack used without
//! the observe layer, in a unit test or a library) reports nothing.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use http::Request;

use crate::stats::Stats;

/// Why a retry the route allowed was not sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RetrySkipped {
    BudgetExhausted,
    NotReplayable,
    NoEndpoint,
}

impl RetrySkipped {
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::BudgetExhausted => "budget-exhausted",
            Self::NotReplayable => "not-replayable",
            Self::NoEndpoint => "no-endpoint",
        }
    }
}

/// Where a request's events are counted (the sidecar's metrics).
pub trait Events: Send + Sync + std::fmt::Debug {
    fn retry(&self, service: &Arc<str>, route: &Arc<str>);
    fn retry_skipped(&self, service: &Arc<str>, route: &Arc<str>, why: RetrySkipped);
    fn ejection(&self, service: &Arc<str>);
}

/// A request's labels and the events reported so far.
#[derive(Debug)]
pub struct Labels {
    /// The service label (`unknown` until discovery names one).
    pub service: Arc<str>,
    /// The route label (empty: no route matched).
    pub route: Arc<str>,
    /// The service's counters for `/endpoints`, once the service is known.
    pub stats: Option<Arc<Stats>>,
    /// The last endpoint the request was sent to.
    pub endpoint: Option<SocketAddr>,
    /// Retry attempts sent.
    pub retries: u32,
    /// Endpoints tried before the last one (the last is `endpoint`).
    pub tried_before: Vec<SocketAddr>,
}

impl Labels {
    /// Whether an attempt of this request already went to `addr`.
    pub fn tried(&self, addr: SocketAddr) -> bool {
        self.endpoint == Some(addr) || self.tried_before.contains(&addr)
    }

    /// How many endpoints attempts went to.
    pub fn tried_count(&self) -> usize {
        usize::from(self.endpoint.is_some()) + self.tried_before.len()
    }
}

#[derive(Debug)]
struct Inner {
    /// None: nothing is counted (no observe layer above).
    events: Option<Arc<dyn Events>>,
    labels: Mutex<Labels>,
}

/// The handle layers report through (cheap to clone: one `Arc`).
#[derive(Debug, Clone)]
pub struct RequestContext(Arc<Inner>);

impl RequestContext {
    pub fn new(events: Option<Arc<dyn Events>>, service: Arc<str>, route: Arc<str>) -> Self {
        Self(Arc::new(Inner {
            events,
            labels: Mutex::new(Labels {
                service,
                route,
                stats: None,
                endpoint: None,
                retries: 0,
                tried_before: Vec::new(),
            }),
        }))
    }

    /// The context `req` carries, if an observe layer put one there.
    pub fn of<B>(req: &Request<B>) -> Option<&Self> {
        req.extensions().get::<Self>()
    }

    /// The labels, locked (never across an await).
    pub fn labels(&self) -> MutexGuard<'_, Labels> {
        self.0.labels.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Discovery named the service: its label and counters.
    pub fn set_service(&self, label: &Arc<str>, stats: Option<&Arc<Stats>>) {
        let mut labels = self.labels();
        labels.service = Arc::clone(label);
        labels.stats = stats.cloned();
        if let Some(stats) = stats {
            stats.request();
        }
    }

    pub fn set_route(&self, label: &Arc<str>) {
        self.labels().route = Arc::clone(label);
    }

    /// An attempt goes to `endpoint`.
    pub fn set_endpoint(&self, endpoint: SocketAddr) {
        let mut labels = self.labels();
        if let Some(previous) = labels.endpoint.replace(endpoint)
            && previous != endpoint
        {
            labels.tried_before.push(previous);
        }
    }

    /// A retry attempt is about to be sent.
    pub fn retry(&self) {
        let mut labels = self.labels();
        labels.retries += 1;
        if let Some(stats) = &labels.stats {
            stats.retry();
        }
        if let Some(events) = &self.0.events {
            events.retry(&labels.service, &labels.route);
        }
    }

    pub fn retry_skipped(&self, why: RetrySkipped) {
        let labels = self.labels();
        if let Some(events) = &self.0.events {
            events.retry_skipped(&labels.service, &labels.route, why);
        }
    }

    /// An endpoint of the request's service was ejected.
    pub fn ejection(&self) {
        let labels = self.labels();
        if let Some(stats) = &labels.stats {
            stats.ejection();
        }
        if let Some(events) = &self.0.events {
            events.ejection(&labels.service);
        }
    }
}
