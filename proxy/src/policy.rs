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
//!   retry budget, locality), `[[splits]]`, and per route `timeout`,
//!   `per_try_timeout` and `retry` (with `[outbound]` defaults).
//! - [`InboundPolicy`], in the service's own sidecar: `inbound.*` (service-wide rate
//!   limit at this instance's share, per-caller limits, per-instance concurrency cap
//!   with its queue, timeout, who may call: `allow`) and per route `rate_limit` (a
//!   service-wide share too), `max_concurrency` and `queue` (per instance) and
//!   `allow` (see [`crate::authz`]).
//!
//! Limiter state survives a reload that leaves the policy (and share) unchanged:
//! the directory keeps the compiled policy instead of rebuilding it. Counters
//! ([`Stats`]) survive every reload.

use std::borrow::Cow;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use weft_config::{Outbound, Policy, Retry, Route, Split};

use crate::authz::Allow;
use crate::limits::{CallerRateLimit, ConcurrencyLimit, RateLimit, Share};
use crate::retry::RetryBudget;
use crate::route::RouteTable;
use crate::stats::Stats;

fn budget(outbound: &Outbound, ratio: Option<f64>) -> Arc<RetryBudget> {
    let b = &outbound.retry_budget;
    let ratio = ratio.unwrap_or(b.ratio.get());
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

/// Settings for one outbound request, resolved for its route.
#[derive(Debug)]
pub struct RoutePlan<'a> {
    pub route: Option<&'a str>,
    pub timeout: Option<NamedTimeout>,
    pub per_try_timeout: Option<NamedTimeout>,
    pub retry: Cow<'a, Retry>,
    pub budget: &'a RetryBudget,
}

#[derive(Debug)]
struct OutboundRoute {
    timeout: Option<NamedTimeout>,
    per_try_timeout: Option<NamedTimeout>,
    budget: Option<Arc<RetryBudget>>,
}

/// How this sidecar calls one service.
#[derive(Debug)]
pub struct OutboundPolicy {
    source: Option<Policy>,
    routes: RouteTable,
    route_config: Vec<Route>,
    route_plans: Vec<OutboundRoute>,
    default_timeout: Option<NamedTimeout>,
    default_per_try: Option<NamedTimeout>,
    pub outbound: Outbound,
    pub splits: Vec<Split>,
    pub rate_limit: Option<RateLimit>,
    budget: Arc<RetryBudget>,
    /// `outbound.retry`, else the default retry policy (resolved once).
    default_retry: Retry,
    pub stats: Arc<Stats>,
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
        let routes: Vec<Route> = policy.map(|p| p.routes.clone()).unwrap_or_default();
        let route_plans = routes
            .iter()
            .map(|r| OutboundRoute {
                timeout: match r.timeout {
                    Some(_) => named(r.timeout, format!("routes.{}.timeout", r.name)),
                    None => named(outbound.timeout, "outbound.timeout".into()),
                },
                per_try_timeout: match r.per_try_timeout {
                    Some(_) => named(
                        r.per_try_timeout,
                        format!("routes.{}.per_try_timeout", r.name),
                    ),
                    None => named(outbound.per_try_timeout, "outbound.per_try_timeout".into()),
                },
                budget: r
                    .retry
                    .as_ref()
                    .and_then(|retry| retry.budget)
                    .map(|ratio| budget(&outbound, Some(ratio.get()))),
            })
            .collect();
        Self {
            source: policy.cloned(),
            routes: RouteTable::new(&routes),
            default_timeout: named(outbound.timeout, "outbound.timeout".into()),
            default_per_try: named(outbound.per_try_timeout, "outbound.per_try_timeout".into()),
            rate_limit: outbound
                .rate_limit
                .as_ref()
                .map(|rl| RateLimit::new("outbound.rate_limit", rl, Share::ONE)),
            budget: budget(
                &outbound,
                outbound
                    .retry
                    .as_ref()
                    .and_then(|r| r.budget)
                    .map(|r| r.get()),
            ),
            splits: policy.map(|p| p.splits.clone()).unwrap_or_default(),
            default_retry: outbound.retry.clone().unwrap_or_default(),
            route_plans,
            route_config: routes,
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
    pub fn plan(&self, index: Option<usize>) -> RoutePlan<'_> {
        let route = index.and_then(|i| self.route_config.get(i));
        let compiled = index.and_then(|i| self.route_plans.get(i));
        let retry = route
            .and_then(|r| r.retry.as_ref())
            .unwrap_or(&self.default_retry);
        RoutePlan {
            route: route.map(|r| r.name.as_str()),
            timeout: compiled.map_or_else(|| self.default_timeout.clone(), |c| c.timeout.clone()),
            per_try_timeout: compiled.map_or_else(
                || self.default_per_try.clone(),
                |c| c.per_try_timeout.clone(),
            ),
            retry: Cow::Borrowed(retry),
            budget: compiled
                .and_then(|c| c.budget.as_deref())
                .unwrap_or(&self.budget),
        }
    }

    /// Every retry budget with its `route` label: the service's (empty route)
    /// and those of routes with their own `retry.budget`.
    pub fn budgets(&self) -> impl Iterator<Item = (&Arc<str>, &RetryBudget)> {
        std::iter::once((self.routes.label(None), &*self.budget)).chain(
            self.route_plans.iter().enumerate().filter_map(|(i, plan)| {
                Some((self.routes.label(Some(i)), plan.budget.as_deref()?))
            }),
        )
    }

    pub fn endpoint_cap(&self) -> Option<u32> {
        self.outbound.endpoint_max_concurrency.map(NonZeroU32::get)
    }
}

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
    route_limits: Vec<InboundRoute>,
    pub rate_limit: Option<RateLimit>,
    pub caller_rate_limit: Option<CallerRateLimit>,
    pub concurrency: Option<Arc<ConcurrencyLimit>>,
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
                InboundRoute {
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
                }
            })
            .collect();
        Self {
            source: policy.map(|p| (p.clone(), share)),
            routes: RouteTable::new(routes),
            route_limits,
            rate_limit: inbound
                .rate_limit
                .as_ref()
                .map(|rl| RateLimit::new("inbound.rate_limit", rl, share)),
            caller_rate_limit: inbound
                .caller_rate_limit
                .as_ref()
                .map(|rl| CallerRateLimit::new("inbound.caller_rate_limit", rl, share)),
            concurrency: inbound.max_concurrency.map(|max| {
                ConcurrencyLimit::reuse_or_new(
                    previous.and_then(|p| p.concurrency.as_ref()),
                    "inbound.max_concurrency",
                    max,
                    inbound.queue.as_ref(),
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
    pub fn route(&self, index: Option<usize>) -> Option<&InboundRoute> {
        index.and_then(|i| self.route_limits.get(i))
    }
}
