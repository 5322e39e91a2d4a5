//! Service policies compiled for the request path.
//!
//! A policy file is parsed and validated by `weft-config`; this module turns it
//! into the objects requests consult: the route table, the rate limiters and
//! concurrency caps (with their state), the retry budgets, and the precomputed
//! names of every limit (the policy key path that goes into `weft-limit`).
//!
//! Which side enforces what:
//! - [`OutboundPolicy`], in every caller's sidecar: `outbound.*` (this caller's rate
//!   to the service, per-endpoint caps, connect/idle timeouts, outlier ejection,
//!   retry budget, locality, calls held while the service scales from zero),
//!   `[[splits]]`, and per route `timeout`, `per_try_timeout`, `retry`,
//!   `hedge` and (where permitted) `fault` (with `[outbound]` defaults).
//! - [`InboundPolicy`], in the service's own sidecar: `inbound.*` (service-wide rate
//!   limit at this instance's share, per-caller limits, per-instance concurrency cap
//!   with its queue, timeout, who may call: `allow`) and per route `rate_limit` (a
//!   service-wide share too), `max_concurrency` and `queue` (per instance) and
//!   `allow` (see [`crate::authz`]).
//!
//! Limiter state survives a reload that leaves the policy (and share) unchanged:
//! the directory keeps the compiled policy instead of rebuilding it. Counters
//! ([`Stats`]) survive every reload.

use std::sync::Arc;
use std::time::Duration;

use weft_config::{Outbound, Policy, Retry, Route, Split};

use crate::authz::Allow;
use crate::fault::FaultPlan;
use crate::hedge::HedgePlan;
use crate::limits::{
    AdaptiveConcurrency, CallerRateLimit, ColdStartGate, ConcurrencyLimit, EndpointCap, RateLimit,
    Share,
};
use crate::retry::RetryBudget;
use crate::route::RouteTable;
use crate::stats::Stats;

fn budget(outbound: &Outbound, ratio: Option<f64>) -> Arc<RetryBudget> {
    budget_of(outbound, ratio.unwrap_or(outbound.retry_budget.ratio.get()))
}

fn budget_of(outbound: &Outbound, ratio: f64) -> Arc<RetryBudget> {
    let b = &outbound.retry_budget;
    // weft-config guarantees ttl in 1s..=60s and ratio in 0..=1; the clamp keeps
    // the ttl there whatever the source of the policy (RetryBudget clamps the ratio).
    Arc::new(RetryBudget::new(
        b.ttl
            .get()
            .clamp(Duration::from_secs(1), Duration::from_secs(60)),
        b.min_per_second,
        ratio,
    ))
}

/// A timeout and the policy key it came from.
#[derive(Debug, Clone)]
pub struct NamedTimeout {
    pub after: Duration,
    pub limit: Arc<str>,
}

/// Settings for one outbound request, resolved for its route once, when the
/// policy is compiled; the route layer puts the matched one in the request's
/// extensions.
#[derive(Debug)]
pub struct RoutePlan {
    /// The route's name (None: no route matched).
    pub route: Option<Arc<str>>,
    /// The route label (`""`: no route).
    pub label: Arc<str>,
    pub timeout: Option<NamedTimeout>,
    pub per_try_timeout: Option<NamedTimeout>,
    pub retry: Retry,
    pub budget: Arc<RetryBudget>,
    /// `hedge`: hedged tries (spending `budget`). None: no hedging.
    pub hedge: Option<Arc<HedgePlan>>,
    /// `fault`, where the policy permits it (`allow_faults`). None: no
    /// fault injection.
    pub fault: Option<Arc<FaultPlan>>,
}

/// How this sidecar calls one service.
#[derive(Debug)]
pub struct OutboundPolicy {
    source: Option<Policy>,
    routes: RouteTable,
    /// The plan of each route, in table order.
    route_plans: Vec<Arc<RoutePlan>>,
    /// The plan of a request that matches no route.
    default_plan: Arc<RoutePlan>,
    /// The service's retry budget (routes with their own `retry.budget` have theirs).
    budget: Arc<RetryBudget>,
    pub outbound: Outbound,
    pub splits: Vec<Split>,
    pub rate_limit: Option<Arc<RateLimit>>,
    pub stats: Arc<Stats>,
    /// `outbound.cold_start`: calls held while the service has no endpoint.
    pub cold_start: Option<Arc<ColdStartGate>>,
}

fn named(after: Option<weft_config::Duration>, limit: String) -> Option<NamedTimeout> {
    after.map(|d| NamedTimeout {
        after: d.get(),
        limit: limit.into(),
    })
}

impl OutboundPolicy {
    /// Compile `policy` (or the defaults when the service has none).
    pub fn new(policy: Option<&Policy>, stats: Arc<Stats>) -> Self {
        let outbound = policy.map(|p| p.outbound.clone()).unwrap_or_default();
        let routes: &[Route] = policy.map_or(&[], |p| &p.routes);
        let faults_allowed = policy.is_some_and(|p| p.allow_faults);
        if let Some(policy) = policy.filter(|_| !faults_allowed) {
            for route in policy.fault_routes() {
                tracing::warn!(
                    service = policy.service.as_str(),
                    route.name = route,
                    "routes.{route}.fault is ignored: fault injection needs `weftctl apply --allow-faults`, \
                     or `[directory] allow_faults = true` in the bootstrap for a local policy file"
                );
            }
        }
        let table = RouteTable::new(routes);
        let default_retry = outbound.retry.clone().unwrap_or_default();
        let budget = budget(&outbound, default_retry.budget.map(|r| r.get()));
        let default_timeout = named(outbound.timeout, "outbound.timeout".into());
        let default_per_try = named(outbound.per_try_timeout, "outbound.per_try_timeout".into());
        let route_plans = routes
            .iter()
            .enumerate()
            .map(|(i, r)| {
                let retry = r.retry.clone().unwrap_or_else(|| default_retry.clone());
                Arc::new(RoutePlan {
                    route: Some(Arc::from(r.name.as_str())),
                    label: Arc::clone(table.label(Some(i))),
                    timeout: match r.timeout {
                        Some(_) => named(r.timeout, format!("routes.{}.timeout", r.name)),
                        None => default_timeout.clone(),
                    },
                    per_try_timeout: match r.per_try_timeout {
                        Some(_) => named(
                            r.per_try_timeout,
                            format!("routes.{}.per_try_timeout", r.name),
                        ),
                        None => default_per_try.clone(),
                    },
                    budget: match r.retry.as_ref().and_then(|retry| retry.budget) {
                        Some(ratio) => budget_of(&outbound, ratio.get()),
                        None => Arc::clone(&budget),
                    },
                    retry,
                    hedge: r.hedge.as_ref().map(HedgePlan::new),
                    fault: r
                        .fault
                        .as_ref()
                        .filter(|_| faults_allowed)
                        .map(|fault| FaultPlan::new(&r.name, fault)),
                })
            })
            .collect();
        Self {
            source: policy.cloned(),
            default_plan: Arc::new(RoutePlan {
                route: None,
                label: Arc::clone(table.label(None)),
                timeout: default_timeout,
                per_try_timeout: default_per_try,
                retry: default_retry,
                budget: Arc::clone(&budget),
                hedge: None,
                fault: None,
            }),
            routes: table,
            route_plans,
            budget,
            rate_limit: outbound
                .rate_limit
                .as_ref()
                .map(|rl| Arc::new(RateLimit::new("outbound.rate_limit", rl, Share::ONE))),
            splits: policy.map(|p| p.splits.clone()).unwrap_or_default(),
            cold_start: outbound.cold_start.as_ref().map(ColdStartGate::new),
            outbound,
            stats,
        }
    }

    /// Whether this was compiled from `policy` (so a reload can keep it).
    pub fn compiled_from(&self, policy: Option<&Policy>) -> bool {
        self.source.as_ref() == policy
    }

    pub fn routes(&self) -> &RouteTable {
        &self.routes
    }

    /// The settings for a request that matched route `index` (None: no route).
    pub fn plan(&self, index: Option<usize>) -> &Arc<RoutePlan> {
        index
            .and_then(|i| self.route_plans.get(i))
            .unwrap_or(&self.default_plan)
    }

    /// Every retry budget with its `route` label: the service's (empty route)
    /// and those of routes with their own `retry.budget`.
    pub fn budgets(&self) -> impl Iterator<Item = (&Arc<str>, &RetryBudget)> {
        std::iter::once((self.routes.label(None), &*self.budget)).chain(
            self.route_plans
                .iter()
                .filter(|plan| !Arc::ptr_eq(&plan.budget, &self.budget))
                .map(|plan| (&plan.label, &*plan.budget)),
        )
    }

    /// The cap on each endpoint: `endpoint_max_concurrency`, or each
    /// endpoint's own `adaptive_concurrency` limit (config allows one of them).
    pub fn endpoint_cap(&self) -> EndpointCap<'_> {
        match (
            self.outbound.endpoint_max_concurrency,
            &self.outbound.adaptive_concurrency,
        ) {
            (Some(max), _) => EndpointCap::Static(max.get()),
            (None, Some(adaptive)) => EndpointCap::Adaptive(adaptive),
            (None, None) => EndpointCap::None,
        }
    }
}

/// One route's limits on the inbound side; the route layer puts the matched
/// one in the request's extensions.
#[derive(Debug, Default)]
pub struct InboundRoute {
    pub rate_limit: Option<RateLimit>,
    pub concurrency: Option<Arc<ConcurrencyLimit>>,
    /// `routes.<name>.allow`: replaces `inbound.allow` for this route.
    pub allow: Option<Allow>,
}

/// How the local service protects each of its instances.
#[derive(Debug)]
pub struct InboundPolicy {
    source: Option<(Policy, Share)>,
    routes: RouteTable,
    route_limits: Vec<Arc<InboundRoute>>,
    pub rate_limit: Option<Arc<RateLimit>>,
    pub caller_rate_limit: Option<Arc<CallerRateLimit>>,
    pub concurrency: Option<Arc<ConcurrencyLimit>>,
    /// `inbound.adaptive_concurrency`: this instance's limit that follows
    /// latency (config excludes it beside `inbound.max_concurrency`).
    pub adaptive: Option<Arc<AdaptiveConcurrency>>,
    pub timeout: Option<NamedTimeout>,
    /// `inbound.allow`: the callers allowed (routes may replace it).
    pub allow: Option<Allow>,
    /// `inbound.allow_plaintext`: with mTLS on, plaintext callers are served too.
    pub allow_plaintext: bool,
    pub stats: Arc<Stats>,
}

impl InboundPolicy {
    /// Compile the local service's policy; `share` is the number of instances a
    /// service-wide limit is divided among. Concurrency caps whose settings are
    /// unchanged from `previous` are carried over with their in-flight count and
    /// queue (a cap is per instance, whatever the share); rate limiters are new,
    /// starting with a full burst.
    pub fn new(
        policy: Option<&Policy>,
        share: Share,
        stats: Arc<Stats>,
        previous: Option<&InboundPolicy>,
    ) -> Self {
        let inbound = policy.map(|p| p.inbound.clone()).unwrap_or_default();
        let routes: &[Route] = policy.map_or(&[], |p| &p.routes);
        let route_limits = routes
            .iter()
            .map(|r| {
                let previous_cap = previous.and_then(|p| {
                    let (source, _) = p.source.as_ref()?;
                    let i = source.routes.iter().position(|q| q.name == r.name)?;
                    p.route_limits.get(i)?.concurrency.as_ref()
                });
                Arc::new(InboundRoute {
                    rate_limit: r.rate_limit.as_ref().map(|rl| {
                        RateLimit::new(format!("routes.{}.rate_limit", r.name), rl, share)
                    }),
                    concurrency: r.max_concurrency.map(|max| {
                        ConcurrencyLimit::reuse_or_new(
                            previous_cap,
                            &format!("routes.{}.max_concurrency", r.name),
                            max,
                            r.queue.as_ref(),
                        )
                    }),
                    allow: r
                        .allow
                        .as_ref()
                        .map(|list| Allow::new(format!("routes.{}.allow", r.name), list)),
                })
            })
            .collect();
        Self {
            source: policy.map(|p| (p.clone(), share)),
            routes: RouteTable::new(routes),
            route_limits,
            rate_limit: inbound
                .rate_limit
                .as_ref()
                .map(|rl| Arc::new(RateLimit::new("inbound.rate_limit", rl, share))),
            caller_rate_limit: inbound
                .caller_rate_limit
                .as_ref()
                .map(|rl| Arc::new(CallerRateLimit::new("inbound.caller_rate_limit", rl, share))),
            concurrency: inbound.max_concurrency.map(|max| {
                ConcurrencyLimit::reuse_or_new(
                    previous.and_then(|p| p.concurrency.as_ref()),
                    "inbound.max_concurrency",
                    max,
                    inbound.queue.as_ref(),
                )
            }),
            adaptive: inbound.adaptive_concurrency.as_ref().map(|settings| {
                AdaptiveConcurrency::reuse_or_new(
                    previous.and_then(|p| p.adaptive.as_ref()),
                    "inbound.adaptive_concurrency",
                    settings,
                )
            }),
            timeout: named(inbound.timeout, "inbound.timeout".into()),
            allow: inbound
                .allow
                .as_ref()
                .map(|list| Allow::new("inbound.allow", list)),
            allow_plaintext: inbound.allow_plaintext,
            stats,
        }
    }

    pub fn compiled_from(&self, policy: Option<&Policy>, share: Share) -> bool {
        match (&self.source, policy) {
            (Some((p, s)), Some(q)) => p == q && *s == share,
            (None, None) => true,
            _ => false,
        }
    }

    pub fn routes(&self) -> &RouteTable {
        &self.routes
    }

    /// The per-route limits of route `index`.
    pub fn route(&self, index: Option<usize>) -> Option<&Arc<InboundRoute>> {
        index.and_then(|i| self.route_limits.get(i))
    }
}
