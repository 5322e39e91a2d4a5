//! Choosing the endpoint for one attempt: which endpoints are eligible, then the
//! balancer's pick among them.
//!
//! Filters, from hard to soft:
//! 1. usable: not ejected by outlier detection, weight above 0, and below the
//!    per-endpoint concurrency cap (`outbound.endpoint_max_concurrency`, or the
//!    endpoint's own limit under `outbound.adaptive_concurrency`);
//! 2. split: a roll of the dice picks one `[[splits]]` subset by weight (or the rest:
//!    endpoints matching no split); if that group has no usable endpoint, any group;
//! 3. locality: the caller's zone only, while at least `min_healthy_percent` of the
//!    zone's endpoints are healthy (and one of them is usable now);
//! 4. retry: endpoints not tried yet by this request, while there are any.
//!
//! The soft filters are dropped when they leave nothing, so they shape traffic but
//! never refuse it. The in-flight slot is claimed atomically against the cap; if a
//! concurrent request took the last slot, the pick is repeated a few times.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use rand::Rng;
use weft_config::{Locality, Split};
use weft_core::limits::EndpointCap;

use super::{Balancer, Endpoint, InFlight};

/// Picks attempted when concurrent requests race for an endpoint's last slot.
const CLAIM_ATTEMPTS: usize = 4;

/// What shapes the choice for one attempt.
#[derive(Debug, Clone, Copy, Default)]
pub struct Selection<'a> {
    pub splits: &'a [Split],
    /// The caller's zone and the service's locality settings.
    pub locality: Option<(&'a str, Locality)>,
    pub endpoint_cap: EndpointCap<'a>,
    /// Endpoints this request already tried.
    pub tried: &'a [SocketAddr],
}

/// Why no endpoint could be chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SelectError {
    /// The service has no endpoint with a non-zero weight.
    NoEndpoints,
    /// Every endpoint is ejected or its app unhealthy.
    NoHealthy,
    /// Every healthy endpoint is at its concurrency cap.
    Saturated,
}

fn subset_matches(split: &Split, e: &Endpoint) -> bool {
    split
        .subset
        .iter()
        .all(|(k, v)| e.metadata().get(k) == Some(v.as_str()))
}

struct Filter<'a> {
    now: Instant,
    cap: EndpointCap<'a>,
    split: Option<(&'a [Split], Option<usize>)>,
    zone: Option<&'a str>,
    tried: &'a [SocketAddr],
}

impl Filter<'_> {
    /// Eligible at all: weighted, its app healthy (as its sidecar reports),
    /// and not ejected. When no endpoint is, the pick fails with
    /// [`SelectError::NoHealthy`] rather than sending to apps known dead.
    fn healthy(&self, e: &Endpoint) -> bool {
        e.weight() > 0 && e.health().is_healthy() && !e.outlier().is_ejected(self.now)
    }
    fn usable(&self, e: &Endpoint) -> bool {
        self.healthy(e) && e.cap(self.cap).is_none_or(|c| e.in_flight() < c)
    }
    fn in_group(&self, e: &Endpoint) -> bool {
        match self.split {
            None => true,
            Some((splits, Some(i))) => splits.get(i).is_some_and(|s| subset_matches(s, e)),
            Some((splits, None)) => !splits.iter().any(|s| subset_matches(s, e)),
        }
    }
    fn in_zone(&self, e: &Endpoint) -> bool {
        self.zone
            .is_none_or(|z| e.metadata().zone.as_deref() == Some(z))
    }
    fn untried(&self, e: &Endpoint) -> bool {
        !self.tried.contains(&e.addr())
    }
    fn ok(&self, e: &Endpoint) -> bool {
        self.usable(e) && self.in_group(e) && self.in_zone(e) && self.untried(e)
    }
}

/// Choose an endpoint and claim an in-flight slot on it.
pub fn select(
    balancer: &Balancer,
    endpoints: &[Arc<Endpoint>],
    sel: &Selection<'_>,
) -> Result<InFlight, SelectError> {
    let mut f = Filter {
        now: Instant::now(),
        cap: sel.endpoint_cap,
        split: None,
        zone: None,
        tried: &[],
    };
    if !endpoints.iter().any(|e| f.usable(e)) {
        return Err(if endpoints.iter().any(|e| f.healthy(e)) {
            SelectError::Saturated
        } else if endpoints.iter().any(|e| e.weight() > 0) {
            SelectError::NoHealthy
        } else {
            SelectError::NoEndpoints
        });
    }

    if !sel.splits.is_empty() {
        let roll = rand::rng().random_range(0..100u32);
        let mut acc = 0u32;
        let chosen = sel.splits.iter().position(|s| {
            acc += u32::from(s.weight.get());
            roll < acc
        });
        f.split = Some((sel.splits, chosen));
        if !endpoints.iter().any(|e| f.usable(e) && f.in_group(e)) {
            f.split = None;
        }
    }

    if let Some((zone, locality)) = sel.locality
        && locality.prefer_zone
    {
        let in_zone =
            |e: &&Arc<Endpoint>| e.weight() > 0 && e.metadata().zone.as_deref() == Some(zone);
        let total = endpoints.iter().filter(in_zone).count();
        let healthy = endpoints
            .iter()
            .filter(in_zone)
            .filter(|e| f.healthy(e))
            .count();
        let enough =
            total > 0 && healthy * 100 >= usize::from(locality.min_healthy_percent.get()) * total;
        if enough {
            f.zone = Some(zone);
            if !endpoints
                .iter()
                .any(|e| f.usable(e) && f.in_group(e) && f.in_zone(e))
            {
                f.zone = None;
            }
        }
    }

    f.tried = sel.tried;
    if !endpoints.iter().any(|e| f.ok(e)) {
        f.tried = &[];
    }

    for _ in 0..CLAIM_ATTEMPTS {
        let Some(endpoint) = balancer.pick(endpoints, |e| f.ok(e)) else {
            break;
        };
        if let Some(in_flight) = endpoint.try_start(endpoint.cap(sel.endpoint_cap)) {
            return Ok(in_flight);
        }
    }
    Err(SelectError::Saturated)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::collections::{BTreeMap, HashMap};
    use weft_config::{LoadBalancer, Metadata, Outlier, Percent};

    fn ep(port: u16, zone: &str, version: &str) -> Arc<Endpoint> {
        let metadata = Metadata {
            zone: Some(zone.into()),
            version: Some(version.into()),
            ..Metadata::default()
        };
        Arc::new(Endpoint::new(
            SocketAddr::from(([127, 0, 0, 1], port)),
            metadata,
        ))
    }

    fn eject(e: &Endpoint) {
        let s = Outlier {
            consecutive_failures: std::num::NonZeroU32::MIN,
            max_ejected_percent: Percent::new(100).unwrap(),
            ..Outlier::default()
        };
        e.outlier().failure(&s, Instant::now(), || true).unwrap();
    }

    fn tally(eps: &[Arc<Endpoint>], sel: &Selection<'_>, n: usize) -> HashMap<u16, usize> {
        let b = Balancer::new(LoadBalancer::RoundRobin);
        let mut c = HashMap::new();
        for _ in 0..n {
            let g = select(&b, eps, sel).unwrap();
            *c.entry(g.endpoint().addr().port()).or_default() += 1;
        }
        c
    }

    #[test]
    fn skips_ejected_and_reports_all_ejected() {
        let eps = vec![ep(1, "z1", "v1"), ep(2, "z1", "v1")];
        eject(&eps[0]);
        let c = tally(&eps, &Selection::default(), 10);
        assert_eq!(c.get(&2), Some(&10));
        eject(&eps[1]);
        let b = Balancer::new(LoadBalancer::RoundRobin);
        assert_eq!(
            select(&b, &eps, &Selection::default()).unwrap_err(),
            SelectError::NoHealthy
        );
    }

    #[test]
    fn skips_unhealthy_apps_and_refuses_when_none_is_healthy() {
        let eps = vec![ep(1, "z1", "v1"), ep(2, "z1", "v1")];
        eps[0].set_health(weft_api::Health::Unhealthy);
        let c = tally(&eps, &Selection::default(), 10);
        assert_eq!(c.get(&2), Some(&10));
        eps[1].set_health(weft_api::Health::Unhealthy);
        let b = Balancer::new(LoadBalancer::RoundRobin);
        assert_eq!(
            select(&b, &eps, &Selection::default()).unwrap_err(),
            SelectError::NoHealthy
        );
        eps[0].set_health(weft_api::Health::Healthy);
        assert_eq!(tally(&eps, &Selection::default(), 10).get(&1), Some(&10));
    }

    #[test]
    fn caps_endpoints_and_reports_saturation() {
        let eps = vec![ep(1, "z1", "v1"), ep(2, "z1", "v1")];
        let b = Balancer::new(LoadBalancer::P2cEwma);
        let sel = Selection {
            endpoint_cap: EndpointCap::Static(1),
            ..Selection::default()
        };
        let a = select(&b, &eps, &sel).unwrap();
        let c = select(&b, &eps, &sel).unwrap();
        assert_ne!(a.endpoint().addr(), c.endpoint().addr());
        assert_eq!(select(&b, &eps, &sel).unwrap_err(), SelectError::Saturated);
        drop(a);
        assert!(select(&b, &eps, &sel).is_ok());
    }

    #[test]
    fn adaptive_caps_follow_each_endpoints_own_limit() {
        let eps = vec![ep(1, "z1", "v1"), ep(2, "z1", "v1")];
        let settings = weft_config::AdaptiveConcurrency {
            min_limit: std::num::NonZeroU32::MIN,
            initial_limit: std::num::NonZeroU32::new(2),
            ..weft_config::AdaptiveConcurrency::default()
        };
        // Endpoint 1 got slow: its limit fell to 1; endpoint 2 kept 2.
        let slow = eps[0].adaptive(&settings);
        // 100 fast responses set its baseline; then it answers slowly.
        for (rtt, in_flight, n) in [(1, 0, 100), (100, 2, 50)] {
            for _ in 0..n {
                slow.sample(&settings, std::time::Duration::from_millis(rtt), in_flight);
            }
        }
        assert_eq!(eps[0].cap(EndpointCap::Adaptive(&settings)), Some(1));
        assert_eq!(eps[1].cap(EndpointCap::Adaptive(&settings)), Some(2));
        let b = Balancer::new(LoadBalancer::P2cEwma);
        let sel = Selection {
            endpoint_cap: EndpointCap::Adaptive(&settings),
            ..Selection::default()
        };
        let held: Vec<_> = (0..3).map(|_| select(&b, &eps, &sel).unwrap()).collect();
        let on_slow = held
            .iter()
            .filter(|g| g.endpoint().addr().port() == 1)
            .count();
        assert_eq!(on_slow, 1, "one at the slow endpoint, two at the other");
        assert_eq!(select(&b, &eps, &sel).unwrap_err(), SelectError::Saturated);
    }

    #[test]
    fn splits_by_weight_and_fall_back() {
        let eps = vec![ep(1, "z1", "v1"), ep(2, "z1", "v1"), ep(3, "z1", "v2")];
        let splits = vec![Split {
            subset: BTreeMap::from([("version".to_owned(), "v2".to_owned())]),
            weight: Percent::new(10).unwrap(),
        }];
        let sel = Selection {
            splits: &splits,
            ..Selection::default()
        };
        let c = tally(&eps, &sel, 4000);
        let v2 = *c.get(&3).unwrap_or(&0);
        assert!((280..=520).contains(&v2), "{c:?}");
        eject(&eps[2]);
        let c = tally(&eps, &sel, 100);
        assert_eq!(c.get(&3), None);
        assert_eq!(c.values().sum::<usize>(), 100);
    }

    #[test]
    fn prefers_the_local_zone_while_healthy() {
        let eps = vec![ep(1, "z1", "v1"), ep(2, "z2", "v1"), ep(3, "z2", "v1")];
        let locality = Locality::default();
        let sel = Selection {
            locality: Some(("z1", locality)),
            ..Selection::default()
        };
        assert_eq!(tally(&eps, &sel, 20).get(&1), Some(&20));
        eject(&eps[0]);
        let c = tally(&eps, &sel, 20);
        assert_eq!(c.get(&1), None);
        assert_eq!(c.values().sum::<usize>(), 20);
    }

    #[test]
    fn retries_avoid_tried_endpoints_when_possible() {
        let eps = vec![ep(1, "z1", "v1"), ep(2, "z1", "v1")];
        let tried = [eps[0].addr()];
        let sel = Selection {
            tried: &tried,
            ..Selection::default()
        };
        assert_eq!(tally(&eps, &sel, 10).get(&2), Some(&10));
        let tried = [eps[0].addr(), eps[1].addr()];
        let sel = Selection {
            tried: &tried,
            ..Selection::default()
        };
        assert_eq!(tally(&eps, &sel, 10).values().sum::<usize>(), 10);
    }
}
