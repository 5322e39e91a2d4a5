//! The sidecar's live state as `/metrics` shows it: [`LiveState`] is the
//! [`GaugeSource`] the metrics copy into their gauges when they are scraped
//! or exported (the local app's health, the config version, every outbound
//! service's endpoints, retry budgets and calls held for a cold start, the
//! control-plane client, the mesh certificate's expiry, the adaptive
//! concurrency limits). It also names each service's retry routes, whose
//! counters then show at 0 before their first event.

use std::sync::Arc;
use std::time::Instant;

use super::LiveState;
use crate::telemetry::Direction;
use crate::telemetry::metrics::{
    ControlPlaneStatus, EndpointStates, GaugeSource, Gauges, RouteCounters,
};
use weft_core::limits::EndpointCap;
use weft_discovery::control_plane::{ConnectionState, ControlPlaneClient};
use weft_discovery::directory::MeshService;

impl GaugeSource for LiveState {
    fn refresh(&self, gauges: &mut Gauges<'_>) {
        gauges.app_healthy(self.app_health().is_serving());
        gauges.config_version(self.config().version);
        if let Some(not_after) = self.tls.as_ref().and_then(|t| t.current().not_after_unix()) {
            gauges.tls_certificate_expiry(not_after);
        }
        let now = Instant::now();
        let directory = self.directory();
        if let Some(local) = directory.local.as_ref()
            && let Some(adaptive) = local.policy.adaptive.as_ref()
        {
            gauges.adaptive_limit(
                Direction::Inbound,
                &local.label,
                String::new(),
                adaptive.limit(),
            );
        }
        for svc in directory.services() {
            service(gauges, svc, now);
        }
        if let Some(remote) = self.remote() {
            for svc in remote.services() {
                if directory.service(svc.name.as_str()).is_none() {
                    service(gauges, &svc, now);
                }
            }
            gauges.control_plane(control_plane(remote.client()));
        }
    }
}

/// One outbound service's retry budgets and endpoints by state.
fn service(gauges: &mut Gauges<'_>, svc: &MeshService, now: Instant) {
    let cap = svc.policy.endpoint_cap();
    let set = Arc::clone(&svc.endpoints().borrow());
    let mut states = EndpointStates::default();
    for e in set.endpoints() {
        let n = if !e.health().is_healthy() {
            &mut states.unhealthy
        } else if e.outlier().ejected_for(now).is_some() {
            &mut states.ejected
        } else if e.cap(cap).is_some_and(|c| e.in_flight() >= c) {
            &mut states.saturated
        } else {
            &mut states.active
        };
        *n += 1;
        if let EndpointCap::Adaptive(settings) = cap {
            gauges.adaptive_limit(
                Direction::Outbound,
                &svc.label,
                e.addr().to_string(),
                e.adaptive(settings).limit(settings),
            );
        }
    }
    for (route, budget) in svc.policy.budgets() {
        gauges.retry_budget(&svc.label, route, budget.available());
    }
    // The route labels: no route matched
    // (`plan(None)`), then each route until `plan` falls back to that one.
    let default = svc.policy.plan(None);
    let routes = std::iter::once(default)
        .chain(
            (0..)
                .map(|i| svc.policy.plan(Some(i)))
                .take_while(|plan| !Arc::ptr_eq(plan, default)),
        )
        .map(|plan| RouteCounters {
            label: &plan.label,
            retried: plan.retry.attempts > 0,
            hedged: plan.hedge.is_some(),
            faulted: plan.fault.is_some(),
        });
    gauges.service_counters(&svc.label, routes);
    gauges.endpoints(&svc.label, states);
    if let Some(gate) = &svc.policy.cold_start {
        gauges.cold_start(&svc.label, gate.held(), gate.activator().is_some());
    }
}

fn control_plane(client: &ControlPlaneClient) -> ControlPlaneStatus {
    ControlPlaneStatus {
        connected: matches!(client.state(), ConnectionState::Connected { .. }),
        version: client.snapshot().borrow().version,
        rejected: client.rejected().0,
    }
}
