//! The web view's pages, rendered with maud (every value is escaped).
//!
//! Tables are plain HTML (sortable by `ui.js`, readable without it; the
//! sort key of a cell is its `data-v`); numbers come from the sampler's
//! newest interval, refusal counts from every interval it keeps.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;

use maud::{DOCTYPE, Markup, PreEscaped, html};
use similar::TextDiff;
use weft_api::InstanceRecord;

use super::data::{History, Interval, Round, Sampler};
use super::graph::{caller_name, health_class, service_graph, sparkline};
use super::percent_encode;
use crate::metrics::Metrics;
use crate::stat::{self, Row, format_latency, format_rate, format_success};
use crate::view::{DirectoryView, ServiceEntry};

const CSS: &str = include_str!("ui.css");

/// Seconds between the script's refreshes.
const REFRESH_SECONDS: u32 = 3;

fn layout(title: &str, current: &str, body: Markup) -> Markup {
    let nav = [
        ("/ui", "Services"),
        ("/ui/graph", "Graph"),
        ("/ui/control-plane", "Control plane"),
    ];
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                title { "Weft · " (title) }
                style { (PreEscaped(CSS)) }
            }
            body data-refresh=(REFRESH_SECONDS) {
                header {
                    a.brand href="/ui" { "Weft" }
                    nav {
                        @for (href, label) in nav {
                            a href=(href) aria-current=[(current == href).then_some("page")] { (label) }
                        }
                    }
                }
                main { h1 { (title) } (body) }
                footer { "Read-only view, refreshed every " (REFRESH_SECONDS) " s with JavaScript (reload without it)." }
                script src="/ui/ui.js" defer {}
            }
        }
    }
}

/// `data-v` of a number (sorting); `-1` for none.
fn v(x: Option<f64>) -> String {
    format!("{:.6}", x.unwrap_or(-1.0))
}

fn service_href(name: &str) -> String {
    format!("/ui/services/{}", percent_encode(name))
}

/// How long ago the newest interval ended, for the notes ("3 s ago").
fn age(latest: Option<&Arc<Interval>>) -> String {
    latest
        .and_then(|l| std::time::SystemTime::now().duration_since(l.at).ok())
        .map_or_else(|| "-".to_owned(), |d| format!("{} s ago", d.as_secs()))
}

/// "collecting" while the sampler has fewer than two rounds.
fn collecting(sampler: &Sampler) -> Markup {
    html! {
        p.note { "Collecting: rates appear after two samples of the sidecars, "
            (sampler.interval.as_secs_f64()) " s apart. Reload in a moment." }
    }
}

/// The sidecars of the newest round that could not be fetched.
fn unreachable(round: Option<&Round>) -> Markup {
    let Some(round) = round else {
        return html! {};
    };
    let down: Vec<_> = round.values().filter(|s| s.metrics.is_err()).collect();
    html! {
        @if !down.is_empty() {
            div.unreachable {
                strong { (down.len()) " of " (round.len()) " sidecars unreachable" }
                " (left out of the numbers, not counted as zero): "
                ul { @for s in &down {
                    li.sidecar-unreachable { a href=(service_href(&s.service)) { (s.service) "/" (s.id) } ": "
                        (s.metrics.as_ref().err().map_or("", String::as_str)) }
                } }
            }
        }
    }
}

fn refusals_cell(refusals: &BTreeMap<String, f64>) -> Markup {
    let total: f64 = refusals.values().sum();
    html! {
        td.refusals data-v=(v(Some(total))) {
            @if refusals.is_empty() { "-" }
            @for (reason, n) in refusals {
                span.refusal data-reason=(reason) data-count=(format!("{n:.0}")) { (reason) " " (format!("{n:.0}")) }
                " "
            }
        }
    }
}

/// Refusals in the window by service and reason.
fn refusals_by_reason(history: &History) -> BTreeMap<String, BTreeMap<String, f64>> {
    let mut out: BTreeMap<String, BTreeMap<String, f64>> = BTreeMap::new();
    for ((service, reason, _), n) in history.refusals() {
        *out.entry(service).or_default().entry(reason).or_insert(0.0) += n;
    }
    out
}

/// A service's live instances: healthy, and its sidecar answering.
fn live_instances(entry: &ServiceEntry, round: Option<&Round>) -> usize {
    entry
        .instances
        .values()
        .filter(|i| i.health.is_healthy())
        .filter(|i| {
            round
                .and_then(|r| r.get(&(entry.name.clone(), i.id.clone())))
                .is_none_or(|s| s.metrics.is_ok())
        })
        .count()
}

pub fn services(view: &DirectoryView, sampler: &Sampler) -> Markup {
    let (latest, round, refusals, rates, window) = sampler.read(|h| {
        let rates: BTreeMap<String, Vec<f64>> = view
            .services
            .keys()
            .map(|n| (n.clone(), h.rates(n)))
            .collect();
        (
            h.latest().cloned(),
            h.last.as_ref().map(|(_, r)| Arc::clone(r)),
            refusals_by_reason(h),
            rates,
            h.window(),
        )
    });
    let none = BTreeMap::new();
    let body = html! {
        @if latest.is_none() { (collecting(sampler)) }
        p.note { "Rates, success and latency: the services' own sidecars over the last "
            (latest.as_ref().map_or(0.0, |l| l.seconds).round()) " s (" (age(latest.as_ref())) "). Refusals: both sides, over the last "
            (window.as_secs()) " s. Trend: requests per second, every " (sampler.interval.as_secs_f64()) " s." }
        div.scroll { table.sortable #services {
            thead { tr {
                th data-sort="text" { "Service" }
                th data-sort="num" { "Instances" }
                th data-sort="num" { "RPS" }
                th data-sort="num" { "Success" }
                th data-sort="num" { "P50" }
                th data-sort="num" { "P99" }
                th data-sort="num" { "Refusals" }
                th data-sort="num" { "Policy rev." }
                th { "Trend" }
            } }
            tbody {
                @for (name, entry) in &view.services {
                    @let row = latest.as_ref().and_then(|l| l.services.iter().find(|r| &r.service == name));
                    @let live = live_instances(entry, round.as_deref());
                    @let revision = view.policy_revision(name);
                    tr.service data-service=(name) data-rps=(row.map_or(0.0, |r| r.rps)) {
                        td data-v=(name) { a href=(service_href(name)) { (name) } }
                        td.num data-v=(live) { (live) "/" (entry.instances.len()) }
                        td.num data-v=(v(row.map(|r| r.rps))) { (row.map_or("-".to_owned(), |r| format_rate(r.rps))) }
                        td.num.(health_class(row.and_then(|r| r.success_rate))) data-v=(v(row.and_then(|r| r.success_rate))) {
                            (format_success(row.and_then(|r| r.success_rate))) }
                        td.num data-v=(v(row.and_then(|r| r.p50_seconds))) { (format_latency(row.and_then(|r| r.p50_seconds))) }
                        td.num data-v=(v(row.and_then(|r| r.p99_seconds))) { (format_latency(row.and_then(|r| r.p99_seconds))) }
                        (refusals_cell(refusals.get(name).unwrap_or(&none)))
                        td.num data-v=(revision.map_or(-1, |r| r.0)) {
                            @match (revision, entry.policy_toml.is_some()) {
                                (Some(r), _) => (r.0),
                                (None, true) => "?",
                                (None, false) => "none",
                            }
                        }
                        td { (sparkline(rates.get(name).map_or(&[][..], Vec::as_slice))) }
                    }
                }
            }
        } }
        @if view.services.is_empty() { p.note { "No service is registered and no policy stored." } }
        (unreachable(round.as_deref()))
    };
    layout("Services", "/ui", body)
}

fn route_table(rows: &[&Row], id: &str) -> Markup {
    html! {
        div.scroll { table.sortable id=(id) {
            thead { tr {
                th data-sort="text" { "Route" }
                th data-sort="num" { "RPS" }
                th data-sort="num" { "Success" }
                th data-sort="num" { "P50" }
                th data-sort="num" { "P99" }
                th data-sort="num" { "Refusals/s" }
            } }
            tbody { @for r in rows {
                @let route = match r.route.as_deref() { Some("") | None => "(none)", Some(route) => route };
                tr.route data-route=(route) {
                    td data-v=(route) { (route) }
                    td.num data-v=(v(Some(r.rps))) { (format_rate(r.rps)) }
                    td.num.(health_class(r.success_rate)) data-v=(v(r.success_rate)) { (format_success(r.success_rate)) }
                    td.num data-v=(v(r.p50_seconds)) { (format_latency(r.p50_seconds)) }
                    td.num data-v=(v(r.p99_seconds)) { (format_latency(r.p99_seconds)) }
                    td data-v=(v(Some(r.refusals_per_second.values().sum()))) { (stat::format_refusals(&r.refusals_per_second)) }
                }
            } }
        } }
    }
}

fn edge_table(edges: &[&Row]) -> Markup {
    html! {
        div.scroll { table.sortable #edges {
            thead { tr {
                th data-sort="text" { "Caller" }
                th data-sort="text" { "Service" }
                th data-sort="num" { "RPS" }
                th data-sort="num" { "Success" }
                th data-sort="num" { "P99" }
            } }
            tbody { @for e in edges {
                @let caller = caller_name(e.caller.as_deref().unwrap_or(""));
                tr.edge-row data-caller=(caller) data-service=(e.service) {
                    td data-v=(caller) { (caller) }
                    td data-v=(e.service) { a href=(service_href(&e.service)) { (e.service) } }
                    td.num data-v=(v(Some(e.rps))) { (format_rate(e.rps)) }
                    td.num.(health_class(e.success_rate)) data-v=(v(e.success_rate)) { (format_success(e.success_rate)) }
                    td.num data-v=(v(e.p99_seconds)) { (format_latency(e.p99_seconds)) }
                }
            } }
        } }
    }
}

pub fn graph(view: &DirectoryView, sampler: &Sampler) -> Markup {
    let (latest, round) = sampler.read(|h| {
        (
            h.latest().cloned(),
            h.last.as_ref().map(|(_, r)| Arc::clone(r)),
        )
    });
    let services: Vec<String> = view.services.keys().cloned().collect();
    let edges: Vec<&Row> = latest
        .as_ref()
        .map(|l| l.edges.iter().collect())
        .unwrap_or_default();
    let owned: Vec<Row> = edges.iter().map(|r| (*r).clone()).collect();
    let body = html! {
        @if latest.is_none() { (collecting(sampler)) }
        p.note { "Who calls whom, as the callees' sidecars count it (the caller's certificate, or its "
            code { "weft-caller" } " header). Width: requests per second; colour: success rate. Select an edge for the callee's routes." }
        div.graph-box { (service_graph(&owned, &services)) }
        h2 { "Edges" }
        (edge_table(&edges))
        (unreachable(round.as_deref()))
    };
    layout("Service graph", "/ui/graph", body)
}

/// What the sidecars that list one instance (its address) say about it.
struct Seen {
    states: BTreeMap<String, usize>,
    /// How many list it.
    sidecars: usize,
    in_flight: u64,
    ewma_ms: Vec<f64>,
}

fn seen_by_callers(round: Option<&Round>, service: &str, address: SocketAddr) -> Seen {
    let mut seen = Seen {
        states: BTreeMap::new(),
        sidecars: 0,
        in_flight: 0,
        ewma_ms: Vec::new(),
    };
    let address = address.to_string();
    let endpoints = round
        .into_iter()
        .flat_map(|r| r.values())
        .filter_map(|s| s.endpoints.as_ref())
        .flatten();
    for e in endpoints.filter(|e| e.service == service && e.address == address) {
        seen.sidecars += 1;
        *seen.states.entry(e.state.clone()).or_default() += 1;
        seen.in_flight += e.in_flight;
        // The estimate of a sidecar that never called it says nothing.
        if e.requests > 0 {
            seen.ewma_ms.extend(e.latency_ewma_ms);
        }
    }
    seen
}

/// An instance's state: draining (its sidecar says so), unhealthy (its app
/// does not answer), ejected (by any sidecar's outlier detection), else
/// what the sidecars that called it say (active, saturated), or unknown
/// when no registered sidecar called it.
fn instance_state(record: &InstanceRecord, ready: Option<&str>, seen: &Seen) -> String {
    if ready == Some("draining") {
        return "draining".to_owned();
    }
    if !record.health.is_healthy() {
        return "unhealthy".to_owned();
    }
    if let Some(n) = seen.states.get("ejected") {
        return format!("ejected (by {n} of {} sidecars)", seen.sidecars);
    }
    if seen.states.contains_key("saturated") {
        return "saturated".to_owned();
    }
    if seen.ewma_ms.is_empty() {
        // No registered sidecar called it: nobody to say it is active.
        return "unknown (no registered caller)".to_owned();
    }
    "active".to_owned()
}

pub fn service(view: &DirectoryView, entry: &ServiceEntry, sampler: &Sampler) -> Markup {
    let name = entry.name.as_str();
    let (latest, round, refusals, policies, window): (Option<Arc<Interval>>, _, _, _, _) = sampler
        .read(|h| {
            (
                h.latest().cloned(),
                h.last.as_ref().map(|(_, r)| Arc::clone(r)),
                h.refusals()
                    .into_iter()
                    .filter(|((s, _, _), _)| s == name)
                    .collect::<Vec<_>>(),
                h.policies
                    .get(name)
                    .map(|v| v.iter().cloned().collect::<Vec<_>>())
                    .unwrap_or_default(),
                h.window(),
            )
        });
    let routes: Vec<&Row> = latest
        .iter()
        .flat_map(|l| l.routes.iter())
        .filter(|r| r.service == name)
        .collect();
    let callers: Vec<&Row> = latest
        .iter()
        .flat_map(|l| l.edges.iter())
        .filter(|r| r.service == name)
        .collect();
    let revision = view.policy_revision(name);
    let body = html! {
        @if latest.is_none() { (collecting(sampler)) }
        h2 { "Instances" }
        p.note { "State, in-flight (summed) and latency (EWMA, averaged over the sidecars that called it) as the registered sidecars that list each instance see it." }
        div.scroll { table.sortable #instances {
            thead { tr {
                th data-sort="text" { "Instance" } th data-sort="text" { "Address" } th data-sort="text" { "Zone" }
                th data-sort="text" { "Version" } th data-sort="num" { "Weight" } th data-sort="text" { "State" }
                th data-sort="num" { "In flight" } th data-sort="num" { "EWMA" } th data-sort="text" { "Sidecar" }
            } }
            tbody { @for (id, record) in &entry.instances {
                @let sidecar = round.as_deref().and_then(|r| r.get(&(name.to_owned(), id.clone())));
                @let seen = seen_by_callers(round.as_deref(), name, record.address);
                @let state = instance_state(record, sidecar.and_then(|s| s.ready.as_deref()), &seen);
                @let ewma = (!seen.ewma_ms.is_empty()).then(|| seen.ewma_ms.iter().sum::<f64>() / seen.ewma_ms.len() as f64);
                tr.instance data-instance=(id) data-state=(state.split(' ').next().unwrap_or("")) {
                    td data-v=(id) { (id) }
                    td data-v=(record.address) { (record.address) }
                    td data-v=(record.metadata.zone.as_deref().unwrap_or("")) { (record.metadata.zone.as_deref().unwrap_or("-")) }
                    td data-v=(record.metadata.version.as_deref().unwrap_or("")) { (record.metadata.version.as_deref().unwrap_or("-")) }
                    td.num data-v=(record.metadata.weight.get()) { (record.metadata.weight.get()) }
                    td.state.(state.split(' ').next().unwrap_or("")) data-v=(state) { (state) }
                    td.num data-v=(seen.in_flight) { @if seen.sidecars > 0 { (seen.in_flight) } @else { "-" } }
                    td.num data-v=(v(ewma)) { (ewma.map_or("-".to_owned(), |ms| format_latency(Some(ms / 1000.0)))) }
                    td data-v=(sidecar.map_or("", |s| if s.metrics.is_ok() { "ok" } else { "unreachable" })) {
                        @match sidecar.map(|s| &s.metrics) {
                            None => "not fetched yet",
                            Some(Ok(_)) => "reachable",
                            Some(Err(e)) => span.bad { "unreachable: " (e) },
                        }
                    }
                }
            } }
        } }
        @if entry.instances.is_empty() { p.note { "No instance is registered." } }
        h2 { "Routes" }
        p.note { "The service's own sidecars, over the last " (latest.as_ref().map_or(0.0, |l| l.seconds).round()) " s." }
        (route_table(&routes, "routes"))
        h2 #callers { "Callers" }
        (edge_table(&callers))
        h2 { "Recent refusals" }
        p.note { "By the limit that refused (its key), both sides, over the last " (window.as_secs()) " s." }
        div.scroll { table.sortable #refusals {
            thead { tr { th data-sort="text" { "Reason" } th data-sort="text" { "Limit key" } th data-sort="num" { "Refused" } } }
            tbody { @for ((_, reason, limit), n) in &refusals {
                tr.refusal-row data-reason=(reason) data-limit=(limit) {
                    td { (reason) } td { @if limit.is_empty() { "-" } @else { code { (limit) } } }
                    td.num data-v=(v(Some(*n))) { (format!("{n:.0}")) }
                }
            } }
        } }
        h2 { "Policy" }
        @match (&entry.policy_toml, revision) {
            (Some(toml), r) => {
                p.note { "As applied: store revision " (r.map_or("unknown".to_owned(), |r| r.0.to_string())) "." }
                pre.policy { (&**toml) }
            }
            (None, _) if entry.policy_refused => p.bad { "The stored policy was refused by validation and no valid one is known: sidecars keep theirs." },
            (None, _) => p.note { "No policy: the sidecars' defaults apply." },
        }
        h3 { "History" }
        p.note { "The store keeps only the current policy; these are the versions this control plane served since it started (the last "
            (super::data::POLICY_VERSIONS) ")." }
        @for pair in policies.windows(2).rev() {
            details.policy-change {
                summary { "revision " (pair[1].revision.map_or("-".to_owned(), |r| r.to_string()))
                    @if pair[1].toml.is_empty() { " (removed)" } }
                pre.diff { (TextDiff::from_lines(&*pair[0].toml, &*pair[1].toml).unified_diff()
                    .header(&format!("revision {}", pair[0].revision.map_or("-".to_owned(), |r| r.to_string())),
                            &format!("revision {}", pair[1].revision.map_or("-".to_owned(), |r| r.to_string())))
                    .to_string()) }
            }
        }
        @if policies.len() < 2 { p.note { "No change seen yet." } }
    };
    layout(name, "", body)
}

/// The value of a control-plane metric (summed over its series).
fn metric(samples: &[stat::Sample], name: &str) -> Option<f64> {
    let values: Vec<f64> = samples
        .iter()
        .filter(|s| s.name == name)
        .map(|s| s.value)
        .collect();
    (!values.is_empty()).then(|| values.iter().sum())
}

pub fn control_plane(
    view: &DirectoryView,
    sampler: &Sampler,
    metrics: &Metrics,
    store: &str,
) -> Markup {
    let samples = metrics
        .encode(view)
        .ok()
        .and_then(|t| stat::parse(&t).ok())
        .unwrap_or_default();
    let m = |n: &str| metric(&samples, &format!("{}_{n}", crate::metrics::PREFIX));
    let mut buckets: Vec<(f64, f64)> = samples
        .iter()
        .filter(|s| s.name == format!("{}_push_latency_seconds_bucket", crate::metrics::PREFIX))
        .filter_map(|s| {
            Some((
                s.labels
                    .get("le")?
                    .replace("+Inf", "inf")
                    .parse::<f64>()
                    .ok()?,
                s.value,
            ))
        })
        .collect();
    buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
    let (round, sampled) = sampler.read(|h| {
        (
            h.last.as_ref().map(|(_, r)| Arc::clone(r)),
            h.intervals.len(),
        )
    });
    let instances: usize = view.services.values().map(|s| s.instances.len()).sum();
    let count = |x: Option<f64>| x.map_or("-".to_owned(), |x| format!("{x:.0}"));
    let body = html! {
        div.scroll { table.kv #control-plane {
            tbody {
                tr { th { "Replicas" } td { "This replica. Replicas do not register in the store, so each one's page shows itself." } }
                tr { th { "Version" } td { (crate::VERSION) " (commit " (crate::COMMIT) ")" } }
                tr { th { "Store" } td { (store) } }
                tr { th { "Store health" } td.store-health.(if view.live { "ok" } else { "bad" }) {
                    @if view.live { "following the store" } @else { "unreachable: serving the last view" } } }
                tr { th { "Store revision" } td #revision { (view.revision.0) } }
                tr { th { "Services / instances" } td { (view.services.len()) " / " (instances) } }
                tr { th { "Connected sidecars" } td #connected { (count(m("connected_sidecars"))) } }
                tr { th { "Registrations held" } td { (count(m("register_streams"))) } }
                tr { th { "Pushes" } td { (count(m("pushes_total"))) } }
                tr { th { "Push latency p50 / p99" } td { (format_latency(stat::histogram_quantile(0.5, &buckets))) " / "
                    (format_latency(stat::histogram_quantile(0.99, &buckets))) " (since start)" } }
                tr { th { "Store errors" } td { (count(m("store_errors_total"))) } }
                tr { th { "Web view sampling" } td { "every " (sampler.interval.as_secs_f64()) " s, "
                    (round.as_ref().map_or(0, |r| r.len())) " sidecars in the last round, "
                    (round.as_ref().map_or(0, |r| r.values().filter(|s| s.metrics.is_err()).count())) " unreachable, "
                    (sampled) " intervals kept" } }
            }
        } }
        (unreachable(round.as_deref()))
    };
    layout("Control plane", "/ui/control-plane", body)
}

pub fn login(error: Option<&str>) -> Markup {
    let body = html! {
        @if let Some(e) = error { p.bad { (e) } }
        p { "The web view needs an admin token or a read-only UI token." }
        form method="post" action="/ui/login" {
            label for="token" { "Token" }
            input #token type="password" name="token" autocomplete="current-password" required;
            button type="submit" { "Sign in" }
        }
    };
    layout("Sign in", "", body)
}

pub fn not_found(message: &str) -> Markup {
    layout(
        "Not found",
        "",
        html! { p { (message) } p { a href="/ui" { "Services" } } },
    )
}
