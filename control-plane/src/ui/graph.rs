//! The inline SVG the pages draw on the server: the service graph and the
//! sparklines.
//!
//! The graph is laid out in columns by depth (a node's column is one more
//! than the deepest caller's, cycles cut), nodes stacked in each column by
//! name. An edge is a curve from caller to callee, its width by request
//! rate (relative to the busiest edge), its colour by success rate; each is
//! a link to the callee's page, at its callers.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;

use maud::{Markup, html};

use super::percent_encode;
use crate::stat::{Row, format_rate, format_success};

const NODE_W: f64 = 130.0;
const NODE_H: f64 = 30.0;
const COL_GAP: f64 = 110.0;
const ROW_GAP: f64 = 26.0;
const PAD: f64 = 12.0;

/// A caller's display name (`-`: a sidecar that does not label callers).
pub fn caller_name(caller: &str) -> &str {
    if caller.is_empty() { "-" } else { caller }
}

/// The colour class of a success rate: `ok` from 99.9%, `warn` from 95%,
/// else `bad`; `idle` without requests.
pub fn health_class(success: Option<f64>) -> &'static str {
    match success {
        None => "idle",
        Some(s) if s >= 0.999 => "ok",
        Some(s) if s >= 0.95 => "warn",
        Some(_) => "bad",
    }
}

/// The service graph of `edges` (caller -> service rows); `services` are
/// drawn even without edges.
pub fn service_graph(edges: &[Row], services: &[String]) -> Markup {
    let mut nodes: BTreeSet<String> = services.iter().cloned().collect();
    let mut callees: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for e in edges {
        let caller = caller_name(e.caller.as_deref().unwrap_or(""));
        nodes.insert(caller.to_owned());
        nodes.insert(e.service.clone());
        callees.entry(caller).or_default().push(&e.service);
    }
    // Depth: longest path from a node nobody calls, each node placed once
    // per pass; a cycle stops growing after as many passes as nodes.
    let mut depth: BTreeMap<&str, usize> = nodes.iter().map(|n| (n.as_str(), 0)).collect();
    for _ in 0..nodes.len() {
        let mut changed = false;
        for (caller, targets) in &callees {
            let d = depth.get(caller).copied().unwrap_or(0);
            for t in targets {
                if *t != *caller && depth.get(t).copied().unwrap_or(0) < d + 1 {
                    depth.insert(*t, d + 1);
                    changed = true;
                }
            }
        }
        if !changed {
            break;
        }
    }
    let mut columns: BTreeMap<usize, Vec<&str>> = BTreeMap::new();
    for (node, d) in &depth {
        columns
            .entry((*d).min(nodes.len()))
            .or_default()
            .push(*node);
    }
    let mut place: BTreeMap<&str, (f64, f64)> = BTreeMap::new();
    let mut height: f64 = NODE_H;
    for (c, (_, names)) in columns.iter().enumerate() {
        for (r, name) in names.iter().enumerate() {
            let (x, y) = (
                PAD + c as f64 * (NODE_W + COL_GAP),
                PAD + r as f64 * (NODE_H + ROW_GAP),
            );
            place.insert(*name, (x, y));
            height = height.max(y + NODE_H);
        }
    }
    let width = PAD * 2.0 + columns.len().max(1) as f64 * (NODE_W + COL_GAP) - COL_GAP;
    let height = height + PAD;
    let busiest = edges.iter().map(|e| e.rps).fold(0.0_f64, f64::max);
    html! {
        svg.graph viewBox=(format!("0 0 {width:.0} {height:.0}")) width=(format!("{width:.0}"))
            height=(format!("{height:.0}")) role="img"
            aria-label="Service graph" preserveAspectRatio="xMinYMin meet" {
            @for e in edges {
                @let caller = caller_name(e.caller.as_deref().unwrap_or(""));
                @if let (Some(&(x1, y1)), Some(&(x2, y2))) = (place.get(caller), place.get(e.service.as_str())) {
                    @let stroke = if busiest > 0.0 { 1.5 + 8.0 * e.rps / busiest } else { 1.5 };
                    @let (sx, sy, tx, ty) = (x1 + NODE_W, y1 + NODE_H / 2.0, x2, y2 + NODE_H / 2.0);
                    @let path = edge_path(sx, sy, tx, ty);
                    a.edge href=(format!("/ui/services/{}#callers", percent_encode(&e.service)))
                        data-caller=(caller) data-service=(e.service) data-rps=(format!("{:.3}", e.rps)) {
                        title { (caller) " → " (e.service) ": " (format_rate(e.rps)) " rps, " (format_success(e.success_rate)) " success" }
                        path class=(format!("edge-line {}", health_class(e.success_rate)))
                            d=(path) stroke-width=(format!("{stroke:.1}")) fill="none" {}
                    }
                }
            }
            @for (name, (x, y)) in &place {
                @let is_service = services.iter().any(|s| s.as_str() == *name);
                g.node data-node=(name) {
                    @if is_service {
                        a href=(format!("/ui/services/{}", percent_encode(name))) {
                            rect x=(x) y=(y) width=(NODE_W) height=(NODE_H) rx="6" class="svc" {}
                            text x=(x + NODE_W / 2.0) y=(y + NODE_H / 2.0 + 4.0) text-anchor="middle" { (clip(name)) }
                        }
                    } @else {
                        rect x=(x) y=(y) width=(NODE_W) height=(NODE_H) rx="6" class="ext" {}
                        text x=(x + NODE_W / 2.0) y=(y + NODE_H / 2.0 + 4.0) text-anchor="middle" { (clip(name)) }
                    }
                }
            }
        }
    }
}

/// A curve from (sx, sy) to (tx, ty); backwards (a cycle) it loops below.
fn edge_path(sx: f64, sy: f64, tx: f64, ty: f64) -> String {
    if tx > sx {
        let mid = (sx + tx) / 2.0;
        format!("M{sx:.1},{sy:.1} C{mid:.1},{sy:.1} {mid:.1},{ty:.1} {tx:.1},{ty:.1}")
    } else {
        let below = sy.max(ty) + NODE_H * 1.5;
        format!(
            "M{sx:.1},{sy:.1} C{:.1},{below:.1} {:.1},{below:.1} {tx:.1},{ty:.1}",
            sx + 60.0,
            tx - 60.0
        )
    }
}

/// A node label that fits its box.
fn clip(name: &str) -> String {
    if name.chars().count() <= 16 {
        name.to_owned()
    } else {
        let mut s: String = name.chars().take(15).collect();
        s.push('…');
        s
    }
}

/// A sparkline of `values` (oldest first), scaled to the largest.
pub fn sparkline(values: &[f64]) -> Markup {
    const W: f64 = 120.0;
    const H: f64 = 24.0;
    let max = values.iter().copied().fold(0.0_f64, f64::max);
    let mut points = String::new();
    let n = values.len();
    for (i, v) in values.iter().enumerate() {
        let x = if n > 1 {
            W * i as f64 / (n - 1) as f64
        } else {
            W
        };
        let y = if max > 0.0 {
            H - 2.0 - (H - 4.0) * v / max
        } else {
            H - 2.0
        };
        let _ = write!(points, "{x:.1},{y:.1} ");
    }
    html! {
        svg.spark viewBox=(format!("0 0 {W} {H}")) width=(W) height=(H) role="img"
            aria-label=(format!("requests per second over the last {n} samples, at most {}", format_rate(max))) {
            @if n > 0 {
                polyline points=(points.trim_end()) fill="none" stroke-width="1.5" {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    fn edge(caller: &str, service: &str, rps: f64, success: Option<f64>) -> Row {
        Row {
            caller: Some(caller.to_owned()),
            service: service.to_owned(),
            route: None,
            rps,
            success_rate: success,
            p50_seconds: None,
            p99_seconds: None,
            refusals_per_second: BTreeMap::new(),
        }
    }

    #[test]
    fn edges_are_drawn_escaped_with_width_by_rate_and_colour_by_success() {
        // The caller label comes from a plaintext caller's weft-caller
        // header: anything at all.
        let hostile = "<script>alert(1)</script>";
        let svg = service_graph(
            &[
                edge("web", "billing", 10.0, Some(1.0)),
                edge(hostile, "billing", 5.0, Some(0.5)),
                edge("billing", "ledger", 0.0, None),
            ],
            &["billing".to_owned(), "ledger".to_owned()],
        )
        .into_string();
        assert!(!svg.contains("<script>"), "{svg}");
        assert!(svg.contains("&lt;script&gt;"), "{svg}");
        assert_eq!(svg.matches("class=\"edge\"").count(), 3, "{svg}");
        assert!(svg.contains("class=\"edge-line ok\" d="), "{svg}");
        assert!(svg.contains("class=\"edge-line bad\" d="), "{svg}");
        assert!(svg.contains("class=\"edge-line idle\" d="), "{svg}");
        // The busiest edge is the widest.
        assert!(svg.contains("stroke-width=\"9.5\""), "{svg}");
        // Services link to their pages; an outside caller does not.
        assert!(svg.contains("href=\"/ui/services/ledger\""), "{svg}");
        assert!(!svg.contains("href=\"/ui/services/web\""), "{svg}");
    }

    #[test]
    fn a_cycle_does_not_loop_forever() {
        let svg = service_graph(
            &[
                edge("a", "b", 1.0, Some(1.0)),
                edge("b", "a", 1.0, Some(1.0)),
            ],
            &["a".to_owned(), "b".to_owned()],
        )
        .into_string();
        assert_eq!(svg.matches("class=\"edge\"").count(), 2);
    }

    #[test]
    fn sparkline_scales_to_the_largest() {
        let svg = sparkline(&[0.0, 5.0, 10.0]).into_string();
        assert!(
            svg.contains("points=\"0.0,22.0 60.0,12.0 120.0,2.0\""),
            "{svg}"
        );
        assert!(!sparkline(&[]).into_string().contains("polyline"));
    }
}
