//! Discovery: the live endpoint list of each service, fed by a stream of updates.
//!
//! A source of endpoints (the static directory on start and on every reload, the
//! DNS resolver, later the control plane) describes changes as [`Update`]s: a full
//! `Reset`, or incremental `Add`/`Remove`. An [`EndpointsWriter`] applies them and
//! publishes an immutable [`EndpointSet`] through a `watch` channel; the request
//! path reads the latest set by cloning an `Arc`, without holding a lock across an
//! await.
//!
//! Applying an update keeps the existing `Arc<Endpoint>` of every endpoint whose
//! address and metadata did not change, so balancer state survives; a removed
//! endpoint is only dropped from the set, and requests already in flight to it hold
//! it (and its pooled connection) until they finish. An endpoint's health
//! (its app's, as its sidecar reports it) is updated in place on the kept
//! `Arc`, so a health change costs no balancer state.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::sync::watch;

use crate::balance::Endpoint;
pub use weft_core::endpoint_spec::EndpointSpec;

/// A change to a service's endpoints.
#[derive(Debug, Clone, PartialEq)]
pub enum Update {
    /// Replace the whole list.
    Reset(Vec<EndpointSpec>),
    /// Add endpoints, or replace ones with the same address.
    Add(Vec<EndpointSpec>),
    /// Remove the endpoints at these addresses.
    Remove(Vec<SocketAddr>),
}

/// An immutable snapshot of a service's endpoints.
#[derive(Debug, Default)]
pub struct EndpointSet {
    endpoints: Vec<Arc<Endpoint>>,
}

impl EndpointSet {
    /// A set of exactly these endpoints (for destinations without discovery).
    pub fn from_endpoints(endpoints: Vec<Arc<Endpoint>>) -> Self {
        Self { endpoints }
    }

    pub fn endpoints(&self) -> &[Arc<Endpoint>] {
        &self.endpoints
    }

    pub fn is_empty(&self) -> bool {
        self.endpoints.is_empty()
    }
}

/// The writing side of a service's endpoints.
#[derive(Debug)]
pub struct EndpointsWriter {
    tx: watch::Sender<Arc<EndpointSet>>,
}

/// The reading side: cheap to clone, read per request.
pub type EndpointsReader = watch::Receiver<Arc<EndpointSet>>;

impl EndpointsWriter {
    /// A writer starting from `initial`, and a reader of it.
    pub fn new(initial: Vec<EndpointSpec>) -> (Self, EndpointsReader) {
        let (tx, rx) = watch::channel(Arc::new(EndpointSet::default()));
        let writer = Self { tx };
        writer.apply(Update::Reset(initial));
        (writer, rx)
    }

    pub fn subscribe(&self) -> EndpointsReader {
        self.tx.subscribe()
    }

    pub fn current(&self) -> Arc<EndpointSet> {
        Arc::clone(&self.tx.borrow())
    }

    /// Apply one update and publish the result (only if something changed).
    pub fn apply(&self, update: Update) {
        let current = self.current();
        let old = current.endpoints();
        let reuse = |spec: EndpointSpec| -> Arc<Endpoint> {
            let endpoint = old
                .iter()
                .find(|e| e.same_as(spec.addr, &spec.metadata))
                .cloned()
                .unwrap_or_else(|| Arc::new(Endpoint::new(spec.addr, spec.metadata)));
            endpoint.set_health(spec.health);
            endpoint
        };
        let next: Vec<Arc<Endpoint>> = match update {
            Update::Reset(specs) => {
                let mut next: Vec<Arc<Endpoint>> = Vec::with_capacity(specs.len());
                for spec in specs {
                    if !next.iter().any(|e| e.addr() == spec.addr) {
                        next.push(reuse(spec));
                    }
                }
                next
            }
            Update::Add(specs) => {
                let mut next: Vec<Arc<Endpoint>> = old.to_vec();
                for spec in specs {
                    let ep = reuse(spec);
                    match next.iter_mut().find(|e| e.addr() == ep.addr()) {
                        Some(slot) => *slot = ep,
                        None => next.push(ep),
                    }
                }
                next
            }
            Update::Remove(addrs) => old
                .iter()
                .filter(|e| !addrs.contains(&e.addr()))
                .cloned()
                .collect(),
        };
        let unchanged =
            next.len() == old.len() && next.iter().zip(old).all(|(a, b)| Arc::ptr_eq(a, b));
        if !unchanged {
            self.tx
                .send_replace(Arc::new(EndpointSet { endpoints: next }));
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use weft_api::Health;
    use weft_config::Metadata;

    use super::*;

    fn spec(port: u16) -> EndpointSpec {
        EndpointSpec {
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            metadata: Metadata::default(),
            health: Health::Healthy,
        }
    }

    #[test]
    fn health_changes_in_place() {
        let (w, rx) = EndpointsWriter::new(vec![spec(1)]);
        let first = Arc::clone(&rx.borrow().endpoints()[0]);
        assert_eq!(first.health(), Health::Healthy);
        w.apply(Update::Reset(vec![EndpointSpec {
            health: Health::Unhealthy,
            ..spec(1)
        }]));
        assert!(Arc::ptr_eq(&rx.borrow().endpoints()[0], &first));
        assert_eq!(first.health(), Health::Unhealthy);
        w.apply(Update::Reset(vec![spec(1)]));
        assert_eq!(first.health(), Health::Healthy);
    }

    #[test]
    fn reset_keeps_unchanged_endpoints_and_their_state() {
        let (w, rx) = EndpointsWriter::new(vec![spec(1), spec(2)]);
        let first = Arc::clone(&rx.borrow().endpoints()[0]);
        let guard = first.start();
        w.apply(Update::Reset(vec![spec(1), spec(3)]));
        let set = rx.borrow().clone();
        let ports: Vec<u16> = set.endpoints().iter().map(|e| e.addr().port()).collect();
        assert_eq!(ports, [1, 3]);
        assert!(Arc::ptr_eq(&set.endpoints()[0], &first));
        assert_eq!(set.endpoints()[0].in_flight(), 1);
        drop(guard);
    }

    #[test]
    fn add_and_remove() {
        let (w, rx) = EndpointsWriter::new(vec![spec(1)]);
        w.apply(Update::Add(vec![spec(2), spec(1)]));
        assert_eq!(rx.borrow().endpoints().len(), 2);
        w.apply(Update::Remove(vec![spec(1).addr]));
        let ports: Vec<u16> = rx
            .borrow()
            .endpoints()
            .iter()
            .map(|e| e.addr().port())
            .collect();
        assert_eq!(ports, [2]);
    }

    #[test]
    fn no_publish_without_change() {
        let (w, mut rx) = EndpointsWriter::new(vec![spec(1)]);
        rx.mark_unchanged();
        w.apply(Update::Reset(vec![spec(1)]));
        assert!(!rx.has_changed().unwrap());
        w.apply(Update::Reset(vec![]));
        assert!(rx.has_changed().unwrap());
        assert!(rx.borrow().is_empty());
    }
}
