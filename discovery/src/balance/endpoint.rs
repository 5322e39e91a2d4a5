//! One endpoint (an instance's address and metadata) and the load the balancer
//! reads from it.
//!
//! An [`Endpoint`] outlives discovery updates: when a service's endpoint list is
//! replaced, endpoints whose address and metadata are unchanged keep their `Arc`, so
//! their latency estimate and in-flight count carry over, and requests already in
//! flight to a removed endpoint hold it alive until they finish.
//!
//! Load is two numbers: requests in flight (incremented when the balancer picks the
//! endpoint, decremented when the response body ends, through [`InFlight`]) and a
//! peak-EWMA estimate of response latency (time to response headers: a streaming body
//! measures the stream, not the endpoint's speed).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use http::uri::Authority;
use weft_api::Health;
use weft_config::{AdaptiveConcurrency, Metadata};
use weft_core::limits::{EndpointCap, GradientLimit};

use super::ewma::PeakEwma;
use super::outlier::OutlierState;
use weft_transport::client::EndpointPools;

/// An instance of a service, as the balancer sees it.
#[derive(Debug)]
pub struct Endpoint {
    addr: SocketAddr,
    /// `addr` as a URI authority, made once rather than per request.
    authority: Option<Authority>,
    metadata: Metadata,
    in_flight: AtomicU32,
    requests: AtomicU64,
    latency: PeakEwma,
    outlier: OutlierState,
    /// Set while the instance's sidecar reports its app unhealthy.
    unhealthy: AtomicBool,
    /// Its connection pools: they go when the endpoint does.
    pools: EndpointPools,
    /// Its `outbound.adaptive_concurrency` limit, made the first time a
    /// policy with one looks at the endpoint (never, without one).
    adaptive: OnceLock<GradientLimit>,
}

impl Endpoint {
    pub fn new(addr: SocketAddr, metadata: Metadata) -> Self {
        Self {
            addr,
            authority: weft_transport::forward::authority_of(addr),
            metadata,
            in_flight: AtomicU32::new(0),
            requests: AtomicU64::new(0),
            latency: PeakEwma::default(),
            outlier: OutlierState::default(),
            unhealthy: AtomicBool::new(false),
            pools: EndpointPools::default(),
            adaptive: OnceLock::new(),
        }
    }

    /// Its adaptive limit under `settings` (made at the first call).
    pub fn adaptive(&self, settings: &AdaptiveConcurrency) -> &GradientLimit {
        self.adaptive.get_or_init(|| GradientLimit::new(settings))
    }

    /// The most requests `cap` lets be in flight to it (`None`: no cap).
    pub fn cap(&self, cap: EndpointCap<'_>) -> Option<u32> {
        match cap {
            EndpointCap::None => None,
            EndpointCap::Static(max) => Some(max),
            EndpointCap::Adaptive(settings) => Some(self.adaptive(settings).limit(settings)),
        }
    }

    /// Passive health state.
    pub fn outlier(&self) -> &OutlierState {
        &self.outlier
    }

    /// Active health: whether the instance's sidecar finds its app answering
    /// (healthy for endpoints nobody checks).
    pub fn health(&self) -> Health {
        if self.unhealthy.load(Ordering::Relaxed) {
            Health::Unhealthy
        } else {
            Health::Healthy
        }
    }

    /// Records the instance's health as discovery last reported it. Back to
    /// healthy also ends an outlier ejection (from the same outage, most
    /// likely): the instance's own sidecar found its app answering.
    pub fn set_health(&self, health: Health) {
        let was_unhealthy = self.unhealthy.swap(!health.is_healthy(), Ordering::Relaxed);
        if was_unhealthy && health.is_healthy() {
            self.outlier.uneject();
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Its connection pools.
    pub fn pools(&self) -> &EndpointPools {
        &self.pools
    }

    /// The address as a URI authority.
    pub fn authority(&self) -> Option<&Authority> {
        self.authority.as_ref()
    }

    pub fn metadata(&self) -> &Metadata {
        &self.metadata
    }

    /// Relative weight (0 = send no new traffic).
    pub fn weight(&self) -> u32 {
        self.metadata.weight.get()
    }

    /// Requests currently in flight from this proxy to the endpoint.
    pub fn in_flight(&self) -> u32 {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// Requests sent to this endpoint since it was first discovered.
    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }

    /// The current latency estimate.
    pub fn latency_estimate(&self, now: Instant) -> Duration {
        self.latency.estimate(now)
    }

    /// Peak-EWMA cost: estimated latency times the requests that would be in flight
    /// with one more, divided by the weight. Lower is better.
    pub fn ewma_cost(&self, now: Instant) -> f64 {
        self.ewma_cost_at(self.latency.estimate_nanos(now))
    }

    /// The peak-EWMA cost with `estimate_nanos` as the latency estimate.
    pub fn ewma_cost_at(&self, estimate_nanos: f64) -> f64 {
        let pending = f64::from(self.in_flight()) + 1.0;
        estimate_nanos * pending / self.weight_factor()
    }

    /// The latency estimate in nanoseconds, and whether it is measured (false
    /// until the endpoint's first response: it is then the default guess).
    pub fn latency_nanos(&self, now: Instant) -> (f64, bool) {
        (self.latency.estimate_nanos(now), self.latency.is_sampled())
    }

    /// Least-request cost: in-flight requests, divided by the weight.
    pub fn request_cost(&self) -> f64 {
        f64::from(self.in_flight()) / self.weight_factor()
    }

    fn weight_factor(&self) -> f64 {
        f64::from(self.weight().max(1)) / 100.0
    }

    /// Record that a request is being sent; the returned guard ends it.
    pub fn start(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        self.requests.fetch_add(1, Ordering::Relaxed);
        InFlight {
            endpoint: Arc::clone(self),
            started: tokio::time::Instant::now(),
        }
    }

    /// Like [`Endpoint::start`], but only if fewer than `max` requests are in flight
    /// (checked and incremented atomically, so the cap is never exceeded).
    pub fn try_start(self: &Arc<Self>, max: Option<u32>) -> Option<InFlight> {
        let Some(max) = max else {
            return Some(self.start());
        };
        self.in_flight
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            })
            .ok()?;
        self.requests.fetch_add(1, Ordering::Relaxed);
        Some(InFlight {
            endpoint: Arc::clone(self),
            started: tokio::time::Instant::now(),
        })
    }

    /// Fold a latency observed at `now` into the estimate (the simulations'
    /// clock; the request path uses [`InFlight::observe_response`]).
    #[cfg(test)]
    pub(crate) fn observe_latency_at(&self, rtt: Duration, now: Instant) {
        self.latency.observe(rtt, now);
    }

    /// Whether `other` describes the same endpoint (same address and metadata).
    pub fn same_as(&self, addr: SocketAddr, metadata: &Metadata) -> bool {
        self.addr == addr && &self.metadata == metadata
    }
}

/// A request in flight to an endpoint. Dropping it ends the request.
#[derive(Debug)]
pub struct InFlight {
    endpoint: Arc<Endpoint>,
    /// tokio's clock (the same as std's outside paused-time tests).
    started: tokio::time::Instant,
}

impl InFlight {
    /// Feed the time from the start of the request to its response headers into the
    /// endpoint's latency estimate.
    pub fn observe_response(&self) {
        self.endpoint
            .latency
            .observe(self.started.elapsed(), Instant::now());
    }

    pub fn endpoint(&self) -> &Arc<Endpoint> {
        &self.endpoint
    }

    /// Feed the time from the start of the request to now (its response
    /// headers) into the endpoint's adaptive limit. Successful tries only.
    pub fn observe_adaptive(&self, settings: &AdaptiveConcurrency) {
        let endpoint = &self.endpoint;
        endpoint
            .adaptive(settings)
            .sample(settings, self.started.elapsed(), endpoint.in_flight());
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.endpoint.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn in_flight_counts_until_guard_drops() {
        let ep = Arc::new(Endpoint::new(
            "127.0.0.1:1".parse().unwrap(),
            Metadata::default(),
        ));
        let a = ep.start();
        let b = ep.start();
        assert_eq!(ep.in_flight(), 2);
        drop(a);
        assert_eq!(ep.in_flight(), 1);
        drop(b);
        assert_eq!(ep.in_flight(), 0);
        assert_eq!(ep.requests(), 2);
    }

    #[test]
    fn try_start_never_exceeds_the_cap() {
        let ep = Arc::new(Endpoint::new(
            "127.0.0.1:1".parse().unwrap(),
            Metadata::default(),
        ));
        let a = ep.try_start(Some(2)).unwrap();
        let _b = ep.try_start(Some(2)).unwrap();
        assert!(ep.try_start(Some(2)).is_none());
        drop(a);
        assert!(ep.try_start(Some(2)).is_some());
        assert_eq!(ep.in_flight(), 1);
    }
}
