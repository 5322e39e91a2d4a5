//! What one request's layers tell each other, and the observation that
//! started it.
//!
//! The observe layer at the top of the sidecar's stacks starts a request's
//! observation and puts a [`RequestContext`] in the request's extensions
//! (the retry layer puts one there when no observe layer did). Layers below
//! name the service and the route there, the endpoint client records every
//! endpoint a try went to (so the next retry goes elsewhere), and retries,
//! retries not sent, hedges, injected faults, ejections and cold starts are
//! reported through it: each with one
//! call, which updates the service's [`Stats`] and the telemetry [`Events`]
//! together. A refusal is marked on its response instead
//! ([`crate::error::Refusal`]). A request without a context (a stack used
//! without the observe layer, in a unit test or a library) reports nothing.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, LazyLock, Mutex, MutexGuard, OnceLock, PoisonError};

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

/// How a call to a service with no endpoint ended its cold start
/// (`outbound.cold_start`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ColdStartOutcome {
    /// Held, then let through when an instance came.
    Released,
    /// Held for `hold`, then refused.
    Timeout,
    /// Refused at once: `queue` calls were held already.
    Overflow,
}

impl ColdStartOutcome {
    pub const ALL: [Self; 3] = [Self::Released, Self::Timeout, Self::Overflow];

    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Released => "released",
            Self::Timeout => "timeout",
            Self::Overflow => "overflow",
        }
    }
}

/// What became of a hedge (`weft_hedges_total`'s `outcome`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HedgeOutcome {
    /// A hedge went to an endpoint.
    Sent,
    /// A hedge's response was the one returned.
    Won,
    /// A hedge was cancelled: another try answered first (or the request
    /// ended otherwise).
    Lost,
    /// The delay passed but the retry budget had nothing left: not sent.
    NoBudget,
    /// The delay passed but no endpoint this request has not tried could
    /// take it: not sent.
    NoEndpoint,
}

impl HedgeOutcome {
    pub const ALL: [Self; 5] = [
        Self::Sent,
        Self::Won,
        Self::Lost,
        Self::NoBudget,
        Self::NoEndpoint,
    ];

    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Sent => "sent",
            Self::Won => "won",
            Self::Lost => "lost",
            Self::NoBudget => "no-budget",
            Self::NoEndpoint => "no-endpoint",
        }
    }
}

/// A fault injected into a request (`weft_injected_faults_total`'s `kind`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultKind {
    Delay,
    Abort,
}

impl FaultKind {
    pub const ALL: [Self; 2] = [Self::Delay, Self::Abort];

    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Delay => "delay",
            Self::Abort => "abort",
        }
    }
}

/// Where a request's events are counted (the sidecar's metrics).
pub trait Events: Send + Sync + std::fmt::Debug {
    fn retry(&self, service: &Arc<str>, route: &Arc<str>);
    fn retry_skipped(&self, service: &Arc<str>, route: &Arc<str>, why: RetrySkipped);
    fn ejection(&self, service: &Arc<str>);
    fn cold_start(&self, service: &Arc<str>, outcome: ColdStartOutcome);
    /// `n` hedges of a request ended in `outcome`.
    fn hedge(&self, service: &Arc<str>, route: &Arc<str>, outcome: HedgeOutcome, n: u32);
    /// A fault of `kind` was injected into a request.
    fn injected_fault(&self, service: &Arc<str>, route: &Arc<str>, kind: FaultKind);
}

/// Where a request's tries went.
#[derive(Debug, Default)]
pub struct Tries {
    /// The last endpoint a try went to.
    pub endpoint: Option<SocketAddr>,
    /// Endpoints tried before the last one.
    pub tried_before: Vec<SocketAddr>,
    /// Retry attempts sent.
    pub retries: u32,
}

impl Tries {
    /// Every endpoint a try went to.
    pub fn all(&self) -> impl Iterator<Item = SocketAddr> + '_ {
        self.tried_before.iter().copied().chain(self.endpoint)
    }
}

#[derive(Debug)]
struct Inner {
    /// None: nothing is counted (no observe layer above).
    events: Option<Arc<dyn Events>>,
    /// The service label and its counters, once discovery names it (set
    /// once: read without a lock).
    service: OnceLock<(Arc<str>, Option<Arc<Stats>>)>,
    /// The route label, once the route layer matched.
    route: OnceLock<Arc<str>>,
    /// The labels until then (`unknown`, no route).
    default_service: &'static Arc<str>,
    default_route: &'static Arc<str>,
    /// Whether any try went out yet (spares the lock on the first).
    sent: AtomicBool,
    /// Whether a fault was injected (the request is kept out of the SLO
    /// classification).
    injected: AtomicBool,
    tries: Mutex<Tries>,
}

/// The handle layers report through (cheap to clone: one `Arc`).
#[derive(Debug, Clone)]
pub struct RequestContext(Arc<Inner>);

impl RequestContext {
    pub fn new(
        events: Option<Arc<dyn Events>>,
        service: &'static Arc<str>,
        route: &'static Arc<str>,
    ) -> Self {
        Self(Arc::new(Inner {
            events,
            service: OnceLock::new(),
            route: OnceLock::new(),
            default_service: service,
            default_route: route,
            sent: AtomicBool::new(false),
            injected: AtomicBool::new(false),
            tries: Mutex::new(Tries::default()),
        }))
    }

    /// A context for a request no observe layer saw (nothing is counted).
    pub fn unobserved() -> Self {
        static NONE: LazyLock<Arc<str>> = LazyLock::new(|| Arc::from(""));
        Self::new(None, &NONE, &NONE)
    }

    /// The context `req` carries, if an observe layer put one there.
    pub fn of<B>(req: &Request<B>) -> Option<&Self> {
        req.extensions().get::<Self>()
    }

    /// The service label.
    pub fn service(&self) -> &Arc<str> {
        self.0
            .service
            .get()
            .map_or(self.0.default_service, |(label, _)| label)
    }

    /// The service's counters, once it is known.
    pub fn stats(&self) -> Option<&Arc<Stats>> {
        self.0.service.get().and_then(|(_, stats)| stats.as_ref())
    }

    /// The route label.
    pub fn route(&self) -> &Arc<str> {
        self.0.route.get().unwrap_or(self.0.default_route)
    }

    /// Where the tries went (locked: never across an await).
    pub fn tries(&self) -> MutexGuard<'_, Tries> {
        self.0.tries.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Every endpoint a try of this request went to (none: without a lock).
    pub fn tried(&self) -> Vec<SocketAddr> {
        if !self.0.sent.load(Ordering::Acquire) {
            return Vec::new();
        }
        self.tries().all().collect()
    }

    /// Discovery named the service: its label and counters (the first
    /// naming counts).
    pub fn set_service(&self, label: &Arc<str>, stats: Option<&Arc<Stats>>) {
        if self
            .0
            .service
            .set((Arc::clone(label), stats.cloned()))
            .is_ok()
            && let Some(stats) = stats
        {
            stats.request();
        }
    }

    pub fn set_route(&self, label: &Arc<str>) {
        let _ = self.0.route.set(Arc::clone(label));
    }

    /// A try goes to `endpoint`.
    pub fn set_endpoint(&self, endpoint: SocketAddr) {
        let mut tries = self.tries();
        if let Some(previous) = tries.endpoint.replace(endpoint)
            && previous != endpoint
        {
            tries.tried_before.push(previous);
        }
        self.0.sent.store(true, Ordering::Release);
    }

    /// Of several tries in flight at once (hedges), the one that went to
    /// `endpoint` answered: it becomes the request's endpoint, the others
    /// count as tried before it.
    pub fn answered_by(&self, endpoint: SocketAddr) {
        let mut tries = self.tries();
        if tries.endpoint == Some(endpoint) {
            return;
        }
        tries.tried_before.retain(|e| *e != endpoint);
        if let Some(last) = tries.endpoint.replace(endpoint) {
            tries.tried_before.push(last);
        }
    }

    /// A retry attempt went to an endpoint.
    pub fn retry(&self) {
        self.tries().retries += 1;
        if let Some(stats) = self.stats() {
            stats.retry();
        }
        if let Some(events) = &self.0.events {
            events.retry(self.service(), self.route());
        }
    }

    pub fn retry_skipped(&self, why: RetrySkipped) {
        if let Some(events) = &self.0.events {
            events.retry_skipped(self.service(), self.route(), why);
        }
    }

    /// `n` hedges ended in `outcome` (see [`HedgeOutcome`]).
    pub fn hedge(&self, outcome: HedgeOutcome, n: u32) {
        if n == 0 {
            return;
        }
        if let Some(events) = &self.0.events {
            events.hedge(self.service(), self.route(), outcome, n);
        }
    }

    /// A fault of `kind` was injected into the request.
    pub fn injected_fault(&self, kind: FaultKind) {
        self.0.injected.store(true, Ordering::Relaxed);
        if let Some(events) = &self.0.events {
            events.injected_fault(self.service(), self.route(), kind);
        }
    }

    /// Whether a fault was injected into the request.
    pub fn fault_injected(&self) -> bool {
        self.0.injected.load(Ordering::Relaxed)
    }

    /// An endpoint of the request's service was ejected.
    pub fn ejection(&self) {
        if let Some(stats) = self.stats() {
            stats.ejection();
        }
        if let Some(events) = &self.0.events {
            events.ejection(self.service());
        }
    }

    /// The request met its service with no endpoint (`outbound.cold_start`)
    /// and this is how that ended.
    pub fn cold_start(&self, outcome: ColdStartOutcome) {
        if let Some(events) = &self.0.events {
            events.cold_start(self.service(), outcome);
        }
    }
}
