//! What the web view shows, gathered by the control plane itself, so it works
//! with no Prometheus at all.
//!
//! A sampler task fetches every registered sidecar's admin endpoints
//! (`/metrics`, `/endpoints`, `/ready`) every `sample_interval`, at most
//! [`MAX_CONCURRENT_FETCHES`] at once, each bounded in time and size
//! ([`crate::scrape`], as `weftctl stat` fetches them).
//! Two consecutive rounds give an [`Interval`]: the rates, success rates,
//! quantiles and refusals `weftctl stat` and `weftctl edges` compute
//! ([`crate::stat`]); the last [`KEEP`] intervals are kept for the sparklines
//! and the refusal counts. A sidecar whose fetch fails is listed as
//! unreachable with why, never counted as zeroes.
//!
//! The sampler only fetches while someone looks: once nobody has loaded a
//! page for [`IDLE_AFTER`], it stops until the next page view (a large mesh
//! is not scraped for a browser tab closed yesterday). It also records each
//! service's policy revisions as the directory view changes (the store
//! keeps only the current one), the last [`POLICY_VERSIONS`] per service.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use futures_util::StreamExt as _;
use serde_json::Value;
use tokio::sync::watch;
use tokio::time::Instant;

use crate::scrape::Fetcher;
use crate::stat::{self, Direction, Row, Scrape, View};
use crate::view::DirectoryView;

/// Sidecars fetched at once (each with [`crate::scrape::TIMEOUT`]).
pub const MAX_CONCURRENT_FETCHES: usize = 32;
/// Intervals kept (10 minutes at the default 10 s).
pub const KEEP: usize = 60;
/// Policy versions kept per service.
pub const POLICY_VERSIONS: usize = 10;
/// The sampler stops fetching when no page was loaded for this long.
pub const IDLE_AFTER: Duration = Duration::from_secs(600);

/// One registered sidecar and what its last fetch found.
#[derive(Debug, Clone)]
pub struct Sidecar {
    pub service: String,
    pub id: String,
    /// Where it is fetched, or why it is not.
    pub admin: Result<SocketAddr, String>,
    /// Its metrics, or why they could not be fetched (unreachable).
    pub metrics: Result<Scrape, String>,
    /// The endpoints its `/endpoints` lists (`None` if that fetch failed).
    pub endpoints: Option<Vec<SeenEndpoint>>,
    /// Its `/ready` body, trimmed (`draining` while it shuts down).
    pub ready: Option<String>,
}

/// One endpoint as a sidecar's `/endpoints` shows it (only what the pages
/// use is kept: a caller's document lists every service it calls).
#[derive(Debug, Clone, PartialEq)]
pub struct SeenEndpoint {
    pub service: String,
    pub address: String,
    /// `active`, `ejected`, `saturated`, `unhealthy`.
    pub state: String,
    pub in_flight: u64,
    /// Requests this sidecar sent to it.
    pub requests: u64,
    pub latency_ewma_ms: Option<f64>,
}

/// The endpoints of an `/endpoints` document.
fn seen_endpoints(doc: &Value) -> Vec<SeenEndpoint> {
    let mut out = Vec::new();
    for service in doc["services"].as_array().into_iter().flatten() {
        let name = service["name"].as_str().unwrap_or_default();
        for e in service["endpoints"].as_array().into_iter().flatten() {
            out.push(SeenEndpoint {
                service: name.to_owned(),
                address: e["address"].as_str().unwrap_or_default().to_owned(),
                state: e["state"].as_str().unwrap_or("?").to_owned(),
                in_flight: e["in_flight"].as_u64().unwrap_or(0),
                requests: e["requests"].as_u64().unwrap_or(0),
                latency_ewma_ms: e["latency_ewma_ms"].as_f64(),
            });
        }
    }
    out
}

/// One round of fetches, by (service, id).
pub type Round = BTreeMap<(String, String), Sidecar>;

/// What two consecutive rounds show.
#[derive(Debug, Clone)]
pub struct Interval {
    /// When the later round ended.
    pub at: SystemTime,
    pub seconds: f64,
    /// Per service, the service's own sidecars' (inbound) view.
    pub services: Vec<Row>,
    /// Per caller -> service edge (inbound view).
    pub edges: Vec<Row>,
    /// Per route of every service (inbound view).
    pub routes: Vec<Row>,
    /// Refusals in the interval, both directions, by (service, reason,
    /// limit key).
    pub refusals: BTreeMap<(String, String, String), f64>,
}

/// A policy as the directory view served it.
#[derive(Debug, Clone, PartialEq)]
pub struct PolicyVersion {
    /// The store revision of the write that stored it (`None`: unknown).
    pub revision: Option<i64>,
    /// When this replica first served it.
    pub seen: SystemTime,
    pub toml: Arc<str>,
}

/// Everything the sampler keeps.
#[derive(Debug, Default)]
pub struct History {
    /// The latest round, and when it ended.
    pub last: Option<(Instant, Arc<Round>)>,
    /// Oldest first, at most [`KEEP`].
    pub intervals: VecDeque<Arc<Interval>>,
    /// Per service, oldest first, at most [`POLICY_VERSIONS`]; the last one
    /// is in force (`toml` empty: the policy was removed).
    pub policies: BTreeMap<String, VecDeque<PolicyVersion>>,
}

impl History {
    /// The newest interval.
    pub fn latest(&self) -> Option<&Arc<Interval>> {
        self.intervals.back()
    }

    /// Refusals over every interval kept, by (service, reason, limit key).
    pub fn refusals(&self) -> BTreeMap<(String, String, String), f64> {
        let mut out = BTreeMap::new();
        for interval in &self.intervals {
            for (key, n) in &interval.refusals {
                *out.entry(key.clone()).or_insert(0.0) += n;
            }
        }
        out
    }

    /// How long the kept intervals span.
    pub fn window(&self) -> Duration {
        Duration::from_secs_f64(self.intervals.iter().map(|i| i.seconds).sum())
    }

    /// `service`'s request rate in each kept interval, oldest first.
    pub fn rates(&self, service: &str) -> Vec<f64> {
        self.intervals
            .iter()
            .map(|i| {
                i.services
                    .iter()
                    .find(|r| r.service == service)
                    .map_or(0.0, |r| r.rps)
            })
            .collect()
    }

    /// Records the policies `view` serves where they changed.
    fn observe_policies(&mut self, view: &DirectoryView) {
        let now = SystemTime::now();
        for (name, entry) in &view.services {
            let toml = entry.policy_toml.clone().unwrap_or_else(|| Arc::from(""));
            self.record_policy(name, view.policy_revision(name).map(|r| r.0), toml, now);
        }
        let removed: Vec<String> = self
            .policies
            .keys()
            .filter(|name| !view.services.contains_key(*name))
            .cloned()
            .collect();
        for name in removed {
            self.record_policy(&name, None, Arc::from(""), now);
        }
    }

    fn record_policy(
        &mut self,
        name: &str,
        revision: Option<i64>,
        toml: Arc<str>,
        now: SystemTime,
    ) {
        let versions = self.policies.entry(name.to_owned()).or_default();
        match versions.back() {
            Some(last) if last.toml == toml => return,
            None if toml.is_empty() => return,
            _ => {}
        }
        versions.push_back(PolicyVersion {
            revision: (!toml.is_empty()).then_some(revision).flatten(),
            seen: now,
            toml,
        });
        while versions.len() > POLICY_VERSIONS {
            versions.pop_front();
        }
    }
}

/// The sampler's state, shared with the pages.
#[derive(Debug)]
pub struct Sampler {
    pub interval: Duration,
    history: Mutex<History>,
    /// When a page was last loaded.
    viewed: Mutex<Option<Instant>>,
    /// Wakes the sampler when a page is loaded while it is idle.
    wake: tokio::sync::Notify,
}

impl Sampler {
    pub fn new(interval: Duration) -> Self {
        Self {
            // tokio's interval refuses zero.
            interval: interval.max(Duration::from_millis(100)),
            history: Mutex::new(History::default()),
            viewed: Mutex::new(None),
            wake: tokio::sync::Notify::new(),
        }
    }

    /// Runs `f` with the history locked (briefly: pages copy what they need).
    pub fn read<T>(&self, f: impl FnOnce(&History) -> T) -> T {
        f(&self.history.lock().unwrap_or_else(PoisonError::into_inner))
    }

    /// A page was loaded: keep sampling (or start again).
    pub fn viewed(&self) {
        let mut viewed = self.viewed.lock().unwrap_or_else(PoisonError::into_inner);
        let idle = viewed.is_none_or(|at| at.elapsed() >= IDLE_AFTER);
        *viewed = Some(Instant::now());
        drop(viewed);
        if idle {
            self.wake.notify_one();
        }
    }

    fn watched(&self) -> bool {
        self.viewed
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .is_some_and(|at| at.elapsed() < IDLE_AFTER)
    }

    /// Samples until `stop` is cancelled: a round every interval while
    /// someone looks, and the policies at every change of the view.
    pub async fn run(
        self: Arc<Self>,
        mut view: watch::Receiver<Arc<DirectoryView>>,
        stop: tokio_util::sync::CancellationToken,
    ) {
        let fetcher = Fetcher::new();
        let mut tick = tokio::time::interval(self.interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let observe = |view: &watch::Receiver<Arc<DirectoryView>>| {
            let current = Arc::clone(&view.borrow());
            self.history
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .observe_policies(&current);
        };
        observe(&view);
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                changed = view.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    observe(&view);
                }
                _ = tick.tick() => {
                    if !self.watched() {
                        // Idle: forget the rounds and intervals (stale by
                        // the next page view; rates restart from the next
                        // two rounds) and wait for a page view.
                        self.forget();
                        tokio::select! {
                            () = stop.cancelled() => return,
                            () = self.wake.notified() => tick.reset_immediately(),
                        }
                        continue;
                    }
                    let current = Arc::clone(&view.borrow());
                    let round = round(&fetcher, &current).await;
                    self.add(&current, round);
                }
            }
        }
    }

    /// Drops the rounds and intervals kept.
    fn forget(&self) {
        let mut history = self.history.lock().unwrap_or_else(PoisonError::into_inner);
        history.last = None;
        history.intervals.clear();
    }

    fn add(&self, view: &DirectoryView, round: Round) {
        let now = Instant::now();
        let round = Arc::new(round);
        let mut history = self.history.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some((at, previous)) = history.last.take() {
            let known: Vec<String> = view.services.keys().cloned().collect();
            let interval = interval(&previous, &round, now - at, &known);
            history.intervals.push_back(Arc::new(interval));
            while history.intervals.len() > KEEP {
                history.intervals.pop_front();
            }
        }
        history.last = Some((now, round));
    }
}

/// What `after` shows since `before`, `elapsed` apart.
fn interval(before: &Round, after: &Round, elapsed: Duration, known: &[String]) -> Interval {
    let mut increases = Vec::new();
    for (key, sidecar) in after {
        if let (Ok(now), Some(Ok(then))) = (
            &sidecar.metrics,
            before.get(key).map(|b| b.metrics.as_ref()),
        ) {
            increases.push(now.increase_since(then));
        }
    }
    let mut refusals = BTreeMap::new();
    for scrape in &increases {
        for (name, labels, n) in scrape.series() {
            if name != stat::REFUSALS || n <= 0.0 {
                continue;
            }
            let label = |l: &str| labels.get(l).cloned().unwrap_or_default();
            *refusals
                .entry((label("service"), label("reason"), label("limit")))
                .or_insert(0.0) += n;
        }
    }
    let aggregate = |view| stat::aggregate(&increases, Direction::Inbound, view, known, elapsed);
    Interval {
        at: SystemTime::now(),
        seconds: elapsed.as_secs_f64(),
        services: aggregate(View::Services),
        edges: aggregate(View::Edges { service: None }),
        routes: aggregate(View::AllRoutes),
        refusals,
    }
}

/// Every sidecar `view` lists, fetched with bounded concurrency.
async fn round(fetcher: &Fetcher, view: &DirectoryView) -> Round {
    futures_util::stream::iter(sidecars(view))
        .map(|(service, id, admin)| async move {
            let (metrics, endpoints, ready) = match &admin {
                Ok(addr) => {
                    let (metrics, endpoints, ready) = tokio::join!(
                        fetcher.metrics(*addr),
                        fetcher.get(*addr, "/endpoints", None, false),
                        fetcher.get(*addr, "/ready", None, true),
                    );
                    let endpoints = endpoints
                        .ok()
                        .and_then(|b| serde_json::from_slice::<Value>(&b).ok())
                        .map(|doc| seen_endpoints(&doc));
                    let ready = ready
                        .ok()
                        .map(|b| String::from_utf8_lossy(&b).trim().to_owned());
                    (metrics, endpoints, ready)
                }
                Err(why) => (Err(why.clone()), None, None),
            };
            let sidecar = Sidecar {
                service: service.clone(),
                id: id.clone(),
                admin,
                metrics,
                endpoints,
                ready,
            };
            ((service, id), sidecar)
        })
        .buffer_unordered(MAX_CONCURRENT_FETCHES)
        .collect()
        .await
}

/// Every instance of every service, with where its sidecar's admin listener
/// is (or why it is not fetched): as `weftctl stat` decides it, a loopback
/// admin address of a sidecar elsewhere names no sidecar, and two instances
/// sharing one admin address are one sidecar, fetched once.
fn sidecars(view: &DirectoryView) -> Vec<(String, String, Result<SocketAddr, String>)> {
    let mut seen: HashMap<SocketAddr, String> = HashMap::new();
    let mut out = Vec::new();
    for (service, entry) in &view.services {
        for (id, record) in &entry.instances {
            let admin = match record.admin_address {
                None => Err("no admin address".to_owned()),
                Some(admin) if admin.ip().is_loopback() && !record.address.ip().is_loopback() => {
                    Err(format!(
                        "admin address {admin} is loopback, the sidecar is at {}",
                        record.address.ip()
                    ))
                }
                Some(admin) => match seen.get(&admin) {
                    Some(first) => Err(format!("admin address {admin} is also {first}'s")),
                    None => {
                        seen.insert(admin, format!("{service}/{id}"));
                        Ok(admin)
                    }
                },
            };
            out.push((service.clone(), id.clone(), admin));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn policy_history_records_changes_only_and_is_bounded() {
        let mut h = History::default();
        let t = SystemTime::now();
        h.record_policy("a", None, Arc::from(""), t);
        assert!(h.policies["a"].is_empty());
        for n in 0..15 {
            let toml: Arc<str> = Arc::from(format!("v{n}"));
            h.record_policy("a", Some(n), Arc::clone(&toml), t);
            h.record_policy("a", Some(n), toml, t);
        }
        let versions = &h.policies["a"];
        assert_eq!(versions.len(), POLICY_VERSIONS);
        assert_eq!(versions.back().unwrap().revision, Some(14));
        h.record_policy("a", Some(20), Arc::from(""), t);
        assert_eq!(h.policies["a"].back().unwrap().revision, None);
    }
}
