//! What `weftctl stat`, `edges` and `top` compute from the sidecars'
//! metrics: a parser for the Prometheus / OpenMetrics text exposition, the
//! increase of counters between two scrapes, and per-service (per-route, per
//! caller -> service edge) request rate, success rate, latency quantiles and
//! refusal rates.
//!
//! The metric names and labels are the sidecar's contract in
//! `docs/telemetry.md`: `weft_requests_total`, `weft_request_duration_seconds`
//! (a histogram) and `weft_refusals_total`.
//!
//! Rates come from two scrapes of each sidecar: the increase of every series
//! between them (a decrease means the counter was reset, a restarted sidecar:
//! the new value is the increase), summed over the sidecars and divided by the
//! time between the scrapes. Quantiles are computed as Prometheus's
//! `histogram_quantile` does, from the bucket increases summed over sidecars.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::time::Duration;

use serde::Serialize;

/// Requests completed, by direction, caller, service, route, status code and
/// classification.
pub const REQUESTS: &str = "weft_requests_total";
/// The buckets of the request duration histogram (same labels, plus `le`).
pub const DURATION_BUCKETS: &str = "weft_request_duration_seconds_bucket";
/// Responses the proxy produced itself, by reason and limit.
pub const REFUSALS: &str = "weft_refusals_total";

/// A label set, sorted by name.
pub type Labels = BTreeMap<String, String>;

/// One sample line of an exposition.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: Labels,
    pub value: f64,
}

/// A line of an exposition that is not valid text format.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("line {line}: {message}")]
pub struct ParseError {
    /// 1-based.
    pub line: usize,
    pub message: String,
}

/// Parse a Prometheus text (0.0.4) or OpenMetrics text exposition into its
/// samples. `# HELP`, `# TYPE`, `# UNIT` and other comments are skipped,
/// `# EOF` ends the exposition; exemplars (after ` # `) and timestamps are
/// ignored. Label values may escape `\\`, `\"` and `\n`.
pub fn parse(text: &str) -> Result<Vec<Sample>, ParseError> {
    let mut samples = Vec::new();
    for (index, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        if let Some(comment) = line.strip_prefix('#') {
            if comment.trim() == "EOF" {
                break;
            }
            continue;
        }
        let sample = parse_sample(line).map_err(|message| ParseError {
            line: index + 1,
            message,
        })?;
        samples.push(sample);
    }
    Ok(samples)
}

fn is_name_char(c: char, first: bool) -> bool {
    c.is_ascii_alphabetic() || c == '_' || c == ':' || (!first && c.is_ascii_digit())
}

/// Split off the longest prefix of name characters.
fn take_name(s: &str) -> (&str, &str) {
    let end = s
        .char_indices()
        .find(|&(i, c)| !is_name_char(c, i == 0))
        .map_or(s.len(), |(i, _)| i);
    s.split_at(end)
}

fn parse_sample(line: &str) -> Result<Sample, String> {
    let (name, rest) = take_name(line);
    if name.is_empty() {
        return Err(format!("expected a metric name: {line:?}"));
    }
    let mut rest = rest.trim_start_matches([' ', '\t']);
    let mut labels = Labels::new();
    if let Some(after) = rest.strip_prefix('{') {
        rest = parse_labels(after, &mut labels)?;
    }
    // An exemplar follows a `#`; nothing before it can hold one (label values
    // are behind us).
    let rest = rest.split('#').next().unwrap_or_default();
    let mut fields = rest.split_ascii_whitespace();
    let value = fields.next().ok_or_else(|| format!("{name}: no value"))?;
    let value = parse_value(value).ok_or_else(|| format!("{name}: bad value {value:?}"))?;
    if let Some(timestamp) = fields.next()
        && timestamp.parse::<f64>().is_err()
    {
        return Err(format!("{name}: bad timestamp {timestamp:?}"));
    }
    if let Some(extra) = fields.next() {
        return Err(format!("{name}: unexpected {extra:?} after the value"));
    }
    Ok(Sample {
        name: name.to_owned(),
        labels,
        value,
    })
}

/// Parse `name="value",...}` into `labels`; returns what follows the `}`.
fn parse_labels<'a>(mut s: &'a str, labels: &mut Labels) -> Result<&'a str, String> {
    loop {
        s = s.trim_start();
        if let Some(after) = s.strip_prefix('}') {
            return Ok(after);
        }
        let (name, after) = take_name(s);
        if name.is_empty() {
            return Err(format!("expected a label name at {s:?}"));
        }
        let after = after.trim_start();
        let after = after
            .strip_prefix('=')
            .ok_or_else(|| format!("label {name}: expected '='"))?
            .trim_start();
        let after = after
            .strip_prefix('"')
            .ok_or_else(|| format!("label {name}: expected a quoted value"))?;
        let mut value = String::new();
        let mut chars = after.char_indices();
        let end = loop {
            match chars.next() {
                None => return Err(format!("label {name}: unterminated value")),
                Some((i, '"')) => break i,
                Some((_, '\\')) => match chars.next() {
                    Some((_, 'n')) => value.push('\n'),
                    Some((_, '\\')) => value.push('\\'),
                    Some((_, '"')) => value.push('"'),
                    Some((_, other)) => {
                        value.push('\\');
                        value.push(other);
                    }
                    None => return Err(format!("label {name}: unterminated value")),
                },
                Some((_, c)) => value.push(c),
            }
        };
        labels.insert(name.to_owned(), value);
        s = after[end + 1..].trim_start();
        if let Some(after) = s.strip_prefix(',') {
            s = after;
        } else if !s.starts_with('}') {
            return Err(format!(
                "label {name}: expected ',' or '}}' after the value"
            ));
        }
    }
}

/// A sample value: a float, `+Inf`, `-Inf` or `NaN`.
fn parse_value(s: &str) -> Option<f64> {
    match s {
        "+Inf" | "Inf" => Some(f64::INFINITY),
        "-Inf" => Some(f64::NEG_INFINITY),
        "NaN" => Some(f64::NAN),
        _ if s
            .bytes()
            .any(|b| b.is_ascii_alphabetic() && b != b'e' && b != b'E') =>
        {
            None
        }
        _ => s.parse().ok(),
    }
}

/// A series: metric name and label set.
type SeriesKey = (String, Labels);

/// The series `weftctl stat` reads from one sidecar: requests, duration
/// buckets and refusals, by metric name and label set.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Scrape {
    series: BTreeMap<SeriesKey, f64>,
}

impl Scrape {
    /// Parse an exposition, keeping the series `weftctl stat` uses (samples
    /// that are not finite, non-negative numbers are left out: these are
    /// counters).
    pub fn from_text(text: &str) -> Result<Self, ParseError> {
        Ok(Self::from_samples(parse(text)?))
    }

    pub fn from_samples(samples: impl IntoIterator<Item = Sample>) -> Self {
        let series = samples
            .into_iter()
            .filter(|s| [REQUESTS, DURATION_BUCKETS, REFUSALS].contains(&s.name.as_str()))
            .filter(|s| s.value.is_finite() && s.value >= 0.0)
            .map(|s| ((s.name, s.labels), s.value))
            .collect();
        Self { series }
    }

    /// Every series kept: metric name, labels and value.
    pub fn series(&self) -> impl Iterator<Item = (&str, &Labels, f64)> {
        self.series
            .iter()
            .map(|((name, labels), &value)| (name.as_str(), labels, value))
    }

    /// How much every series grew since `prev`. A series that went down was
    /// reset (the sidecar restarted), so its increase is its new value; a
    /// histogram's buckets are reset together when any of them went down. A
    /// series absent from `prev` is new: its increase is its value.
    pub fn increase_since(&self, prev: &Scrape) -> Scrape {
        let went_down = |key: &SeriesKey, value: f64| {
            prev.series
                .get(key)
                .is_some_and(|&previous| value < previous)
        };
        let reset_histograms: BTreeSet<Labels> = self
            .series
            .iter()
            .filter(|(key, value)| key.0 == DURATION_BUCKETS && went_down(key, **value))
            .map(|(key, _)| without_le(&key.1))
            .collect();
        let series = self
            .series
            .iter()
            .map(|(key, &value)| {
                let reset = if key.0 == DURATION_BUCKETS {
                    reset_histograms.contains(&without_le(&key.1))
                } else {
                    went_down(key, value)
                };
                let increase = match prev.series.get(key) {
                    Some(&previous) if !reset => value - previous,
                    _ => value,
                };
                (key.clone(), increase)
            })
            .collect();
        Scrape { series }
    }
}

fn without_le(labels: &Labels) -> Labels {
    let mut labels = labels.clone();
    labels.remove("le");
    labels
}

/// Whose view of the traffic: the called service's own sidecars (inbound)
/// or its callers' sidecars (outbound).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    Inbound,
    Outbound,
}

impl Direction {
    pub fn label(self) -> &'static str {
        match self {
            Direction::Inbound => "inbound",
            Direction::Outbound => "outbound",
        }
    }
}

/// What a row stands for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum View<'a> {
    /// One row per service (`weftctl stat`).
    Services,
    /// One row per route of one service (`weftctl stat SERVICE`).
    Routes { service: &'a str },
    /// One row per route of every service (`weftctl top`).
    AllRoutes,
    /// One row per caller -> service edge, by the `caller` label
    /// (`weftctl edges`); `service` keeps the edges into that service only.
    Edges { service: Option<&'a str> },
}

/// What rows are summed by: (caller, service, route), as the view uses them.
type RowKey = (Option<String>, String, Option<String>);

impl View<'_> {
    /// The row a series with `label`s is counted in; `None` for a series
    /// the view leaves out.
    fn key<'l>(self, label: impl Fn(&str) -> &'l str) -> Option<RowKey> {
        let service = label("service");
        Some(match self {
            View::Services => (None, service.to_owned(), None),
            View::Routes { service: only } if service == only => {
                (None, service.to_owned(), Some(label("route").to_owned()))
            }
            View::Routes { .. } => return None,
            View::AllRoutes => (None, service.to_owned(), Some(label("route").to_owned())),
            View::Edges {
                service: Some(only),
            } if service != only => return None,
            View::Edges { .. } => (Some(label("caller").to_owned()), service.to_owned(), None),
        })
    }
}

/// One row of `weftctl stat` (and `edges`, `top`).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Row {
    /// Only in the edges view: the calling service (the `caller` label;
    /// `anonymous`, `other`, or `""` from a sidecar without it).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub caller: Option<String>,
    pub service: String,
    /// Only in the per-route view; `""` is "no route matched".
    #[serde(skip_serializing_if = "Option::is_none")]
    pub route: Option<String>,
    /// Requests completed per second.
    pub rps: f64,
    /// success / (success + failure); `None` without requests.
    pub success_rate: Option<f64>,
    pub p50_seconds: Option<f64>,
    pub p99_seconds: Option<f64>,
    /// Refusals per second by reason; reasons without refusals are left out.
    pub refusals_per_second: BTreeMap<String, f64>,
}

#[derive(Debug, Default)]
struct Totals {
    requests: f64,
    success: f64,
    failure: f64,
    /// (upper bound, cumulative count increase), in no order.
    buckets: Vec<(f64, f64)>,
    refusals: BTreeMap<String, f64>,
}

/// Sum the increases of every sidecar into rows, sorted by (caller,)
/// service (and route) name. `known` service names get a row even without
/// any series (a service without traffic) in the per-service view;
/// `interval` is the time between the two scrapes.
pub fn aggregate(
    increases: &[Scrape],
    direction: Direction,
    view: View<'_>,
    known: &[String],
    interval: Duration,
) -> Vec<Row> {
    let known = match view {
        View::Services => known,
        _ => &[],
    };
    let mut totals: BTreeMap<RowKey, Totals> = known
        .iter()
        .map(|name| ((None, name.clone(), None), Totals::default()))
        .collect();
    for scrape in increases {
        for ((name, labels), &increase) in &scrape.series {
            let label = |l: &str| labels.get(l).map_or("", String::as_str);
            if label("direction") != direction.label() {
                continue;
            }
            let Some(key) = view.key(label) else {
                continue;
            };
            let t = totals.entry(key).or_default();
            match name.as_str() {
                REQUESTS => {
                    t.requests += increase;
                    match label("classification") {
                        "success" => t.success += increase,
                        "failure" => t.failure += increase,
                        _ => {}
                    }
                }
                // An injected delay is not the service's latency.
                DURATION_BUCKETS if label("classification") != "injected-fault" => {
                    if let Some(le) = parse_value(label("le")) {
                        t.buckets.push((le, increase));
                    }
                }
                REFUSALS => *t.refusals.entry(label("reason").to_owned()).or_default() += increase,
                _ => {}
            }
        }
    }
    let seconds = interval.as_secs_f64();
    let per_second = |n: f64| if seconds > 0.0 { n / seconds } else { 0.0 };
    totals
        .into_iter()
        .map(|((caller, service, route), t)| {
            let buckets = merge_buckets(t.buckets);
            let judged = t.success + t.failure;
            Row {
                caller,
                service,
                route,
                rps: per_second(t.requests),
                success_rate: (judged > 0.0).then(|| t.success / judged),
                p50_seconds: histogram_quantile(0.5, &buckets),
                p99_seconds: histogram_quantile(0.99, &buckets),
                refusals_per_second: t
                    .refusals
                    .into_iter()
                    .filter(|&(_, n)| n > 0.0)
                    .map(|(reason, n)| (reason, per_second(n)))
                    .collect(),
            }
        })
        .collect()
}

/// Sort buckets by upper bound and add up the counts of equal bounds.
fn merge_buckets(mut buckets: Vec<(f64, f64)>) -> Vec<(f64, f64)> {
    buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
    let mut merged: Vec<(f64, f64)> = Vec::with_capacity(buckets.len());
    for (le, count) in buckets {
        match merged.last_mut() {
            Some(last) if last.0 == le => last.1 += count,
            _ => merged.push((le, count)),
        }
    }
    merged
}

/// The `q` quantile of a histogram given as (upper bound, cumulative count)
/// sorted by bound, as Prometheus's `histogram_quantile` computes it: linear
/// interpolation within the bucket the rank falls in (the first bucket's
/// lower bound is 0); a rank in the `+Inf` bucket gives the highest finite
/// bound. `None` (Prometheus's NaN) without observations or without a
/// `+Inf` bucket.
pub fn histogram_quantile(q: f64, buckets: &[(f64, f64)]) -> Option<f64> {
    let (&(last_le, _), _) = buckets.split_last()?;
    if buckets.len() < 2 || last_le != f64::INFINITY || q.is_nan() {
        return None;
    }
    // Counts must not go down from one bucket to the next; summing scrapes
    // taken at slightly different moments can break that, so smooth it out.
    let mut running = 0.0_f64;
    let buckets: Vec<(f64, f64)> = buckets
        .iter()
        .map(|&(le, count)| {
            running = running.max(count);
            (le, running)
        })
        .collect();
    let observations = running;
    if observations <= 0.0 {
        return None;
    }
    let rank = q.clamp(0.0, 1.0) * observations;
    let last = buckets.len() - 1;
    let index = buckets[..last]
        .iter()
        .position(|&(_, count)| count >= rank)
        .unwrap_or(last);
    if index == last {
        return Some(buckets[last - 1].0);
    }
    let (upper, count) = buckets[index];
    if index == 0 && upper <= 0.0 {
        return Some(upper);
    }
    let (lower, below) = if index == 0 {
        (0.0, 0.0)
    } else {
        buckets[index - 1]
    };
    let in_bucket = count - below;
    if in_bucket <= 0.0 {
        return Some(upper);
    }
    Some(lower + (upper - lower) * ((rank - below) / in_bucket))
}

/// A rate: one decimal, two below 0.1 (so a trickle does not show as 0.0).
pub fn format_rate(rate: f64) -> String {
    if rate > 0.0 && rate < 0.1 {
        format!("{rate:.2}")
    } else {
        format!("{rate:.1}")
    }
}

/// A success rate as a percentage with two decimals, `-` without requests.
pub fn format_success(rate: Option<f64>) -> String {
    rate.map_or_else(|| "-".to_owned(), |r| format!("{:.2}%", r * 100.0))
}

/// A latency in ms with three significant digits (`0.75ms`, `7.50ms`,
/// `96.7ms`, `250ms`), in seconds from 1 s (`1.25s`); `-` without requests.
pub fn format_latency(seconds: Option<f64>) -> String {
    let Some(s) = seconds else {
        return "-".to_owned();
    };
    let ms = s * 1000.0;
    if s >= 1.0 {
        format!("{s:.2}s")
    } else if ms >= 100.0 {
        format!("{ms:.0}ms")
    } else if ms >= 10.0 {
        format!("{ms:.1}ms")
    } else {
        format!("{ms:.2}ms")
    }
}

/// `reason=rate/s` separated by spaces, by reason; `-` without refusals.
pub fn format_refusals(refusals: &BTreeMap<String, f64>) -> String {
    if refusals.is_empty() {
        return "-".to_owned();
    }
    let mut out = String::new();
    for (reason, rate) in refusals {
        if !out.is_empty() {
            out.push(' ');
        }
        let _ = write!(out, "{reason}={}/s", format_rate(*rate));
    }
    out
}

/// The table `weftctl stat` prints, header first: SERVICE (ROUTE in the
/// per-route view, with `(none)` for the empty route), RPS, SUCCESS, P50,
/// P99, REFUSED.
pub fn table(rows: &[Row]) -> Vec<Vec<String>> {
    let by_route = rows.first().is_some_and(|r| r.route.is_some());
    let first = if by_route { "ROUTE" } else { "SERVICE" };
    let mut out = vec![
        [first, "RPS", "SUCCESS", "P50", "P99", "REFUSED"]
            .map(str::to_owned)
            .to_vec(),
    ];
    for row in rows {
        let name = match &row.route {
            Some(route) if route.is_empty() => "(none)".to_owned(),
            Some(route) => route.clone(),
            None => row.service.clone(),
        };
        out.push(vec![
            name,
            format_rate(row.rps),
            format_success(row.success_rate),
            format_latency(row.p50_seconds),
            format_latency(row.p99_seconds),
            format_refusals(&row.refusals_per_second),
        ]);
    }
    out
}

/// The table `weftctl edges` prints, header first: CALLER, SERVICE, RPS,
/// SUCCESS, P99 (`-` for a caller a sidecar did not label).
pub fn edges_table(rows: &[Row]) -> Vec<Vec<String>> {
    let mut out = vec![
        ["CALLER", "SERVICE", "RPS", "SUCCESS", "P99"]
            .map(str::to_owned)
            .to_vec(),
    ];
    for row in rows {
        let caller = match row.caller.as_deref() {
            None | Some("") => "-".to_owned(),
            Some(caller) => caller.to_owned(),
        };
        out.push(vec![
            caller,
            row.service.clone(),
            format_rate(row.rps),
            format_success(row.success_rate),
            format_latency(row.p99_seconds),
        ]);
    }
    out
}

/// The `n` busiest rows, by request rate (ties by name), leaving out rows
/// without requests.
pub fn busiest(mut rows: Vec<Row>, n: usize) -> Vec<Row> {
    rows.retain(|r| r.rps > 0.0);
    // Stable: rows come sorted by name, which breaks ties.
    rows.sort_by(|a, b| b.rps.total_cmp(&a.rps));
    rows.truncate(n);
    rows
}

/// The table `weftctl top` prints, header first: SERVICE, ROUTE (`(none)`
/// for the empty route), RPS, SUCCESS, P50, P99.
pub fn top_table(rows: &[Row]) -> Vec<Vec<String>> {
    let mut out = vec![
        ["SERVICE", "ROUTE", "RPS", "SUCCESS", "P50", "P99"]
            .map(str::to_owned)
            .to_vec(),
    ];
    for row in rows {
        let route = match row.route.as_deref() {
            None | Some("") => "(none)".to_owned(),
            Some(route) => route.to_owned(),
        };
        out.push(vec![
            row.service.clone(),
            route,
            format_rate(row.rps),
            format_success(row.success_rate),
            format_latency(row.p50_seconds),
            format_latency(row.p99_seconds),
        ]);
    }
    out
}

/// Parse an interval: a number followed by `ms`, `s` or `m` (`500ms`, `2s`,
/// `1.5s`, `1m`); a bare number is seconds. It must be positive and at most
/// an hour.
pub fn parse_interval(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (number, unit) = s.split_at(split);
    let scale = match unit {
        "ms" => 0.001,
        "s" | "" => 1.0,
        "m" => 60.0,
        _ => return Err(format!("{s:?}: expected a duration like 500ms, 2s or 1m")),
    };
    let number: f64 = number
        .parse()
        .map_err(|_| format!("{s:?}: expected a duration like 500ms, 2s or 1m"))?;
    let seconds = number * scale;
    if !(seconds > 0.0 && seconds <= 3600.0) {
        return Err(format!("{s:?}: must be more than 0 and at most 1h"));
    }
    Ok(Duration::from_secs_f64(seconds))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> Labels {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn parses_comments_labels_values_and_timestamps() {
        let text = "# HELP weft_requests Requests completed.\n\
                    # TYPE weft_requests counter\n\
                    weft_requests_total{direction=\"inbound\",service=\"billing\"} 42\n\
                    weft_requests_total{ direction = \"outbound\" , service=\"web\", } 7 1700000000000\n\
                    up 1\r\n\
                    \n\
                    # a free comment\n\
                    process_start_time_seconds 1.7e9\n";
        let samples = parse(text).unwrap();
        assert_eq!(
            samples,
            vec![
                Sample {
                    name: "weft_requests_total".into(),
                    labels: labels(&[("direction", "inbound"), ("service", "billing")]),
                    value: 42.0,
                },
                Sample {
                    name: "weft_requests_total".into(),
                    labels: labels(&[("direction", "outbound"), ("service", "web")]),
                    value: 7.0,
                },
                Sample {
                    name: "up".into(),
                    labels: Labels::new(),
                    value: 1.0,
                },
                Sample {
                    name: "process_start_time_seconds".into(),
                    labels: Labels::new(),
                    value: 1.7e9,
                },
            ]
        );
    }

    #[test]
    fn label_values_unescape_quotes_backslashes_and_newlines() {
        let text = r#"m{a="say \"hi\"",b="C:\\dir\\",c="two\nlines",d="}#{,=",e="\t"} 1"#;
        let samples = parse(text).unwrap();
        assert_eq!(
            samples[0].labels,
            labels(&[
                ("a", "say \"hi\""),
                ("b", "C:\\dir\\"),
                ("c", "two\nlines"),
                ("d", "}#{,="),
                ("e", "\\t"),
            ])
        );
        assert_eq!(samples[0].value, 1.0);
    }

    #[test]
    fn special_values_and_exemplars() {
        let text = "# TYPE d histogram\n\
                    # UNIT d seconds\n\
                    d_bucket{le=\"0.005\"} 3 # {trace_id=\"abc\"} 0.004 1700000000.1\n\
                    d_bucket{le=\"+Inf\"} 5\n\
                    g NaN\n\
                    h -Inf\n\
                    i +Inf # {} 1\n";
        let s = parse(text).unwrap();
        assert_eq!(s[0].value, 3.0);
        assert_eq!(s[0].labels, labels(&[("le", "0.005")]));
        assert_eq!(s[1].labels["le"], "+Inf");
        assert!(s[2].value.is_nan());
        assert_eq!(s[3].value, f64::NEG_INFINITY);
        assert_eq!(s[4].value, f64::INFINITY);
        assert_eq!(parse_value("+Inf"), Some(f64::INFINITY));
        assert_eq!(parse_value("1e-3"), Some(0.001));
        assert_eq!(parse_value("infinity"), None);
    }

    #[test]
    fn openmetrics_eof_ends_the_exposition() {
        let text = "a 1\n# EOF\nthis is not a sample\n";
        let s = parse(text).unwrap();
        assert_eq!(s.len(), 1);
    }

    #[test]
    fn bad_lines_are_located() {
        for (text, message) in [
            ("a 1\nb{x=\"1} 2\n", "line 2: label x: unterminated value"),
            ("{x=\"1\"} 2", "line 1: expected a metric name"),
            ("a{x=1} 2", "line 1: label x: expected a quoted value"),
            (
                "a{x=\"1\" y=\"2\"} 2",
                "line 1: label x: expected ',' or '}'",
            ),
            ("a", "line 1: a: no value"),
            ("a one", "line 1: a: bad value \"one\""),
            ("a 1 2 3", "line 1: a: unexpected \"3\""),
            ("a 1 now", "line 1: a: bad timestamp \"now\""),
        ] {
            let e = parse(text).unwrap_err().to_string();
            assert!(e.starts_with(message), "{text:?}: {e}");
        }
    }

    /// An exposition with one sidecar's series.
    fn exposition(lines: &[(&str, &str, f64)]) -> Scrape {
        let mut text = String::new();
        for (name, labels, value) in lines {
            text.push_str(&format!("{name}{{{labels}}} {value}\n"));
        }
        Scrape::from_text(&text).unwrap()
    }

    const IN_B: &str = r#"direction="inbound",service="billing",route="charge""#;

    fn requests(class: &str, code: &str, dir_svc_route: &str) -> String {
        format!(r#"{dir_svc_route},status_code="{code}",classification="{class}""#)
    }

    fn bucket(le: &str, dir_svc_route: &str) -> String {
        format!(r#"{dir_svc_route},status_code="200",classification="success",le="{le}""#)
    }

    #[test]
    fn increases_treat_a_decrease_as_a_reset() {
        let ok = requests("success", "200", IN_B);
        let bad = requests("failure", "503", IN_B);
        let before = exposition(&[(REQUESTS, &ok, 100.0), (REQUESTS, &bad, 10.0)]);
        let after = exposition(&[
            (REQUESTS, &ok, 130.0),
            // Restarted: 4 since the restart.
            (REQUESTS, &bad, 4.0),
        ]);
        let inc = after.increase_since(&before);
        let rows = aggregate(
            &[inc],
            Direction::Inbound,
            View::Services,
            &[],
            Duration::from_secs(2),
        );
        assert_eq!(rows.len(), 1);
        assert_eq!(rows[0].service, "billing");
        assert_eq!(rows[0].rps, 17.0);
        assert_eq!(rows[0].success_rate, Some(30.0 / 34.0));
        // A new series counts from 0.
        let newer = exposition(&[
            (REQUESTS, &ok, 130.0),
            (REQUESTS, &bad, 4.0),
            (REQUESTS, &requests("success", "201", IN_B), 6.0),
        ]);
        let inc = newer.increase_since(&after);
        let rows = aggregate(
            &[inc],
            Direction::Inbound,
            View::Services,
            &[],
            Duration::from_secs(1),
        );
        assert_eq!((rows[0].rps, rows[0].success_rate), (6.0, Some(1.0)));
    }

    #[test]
    fn a_histogram_is_reset_as_a_whole() {
        // After a restart one bucket happens to hold its old count: it must
        // not count as 0, or the buckets would no longer be cumulative.
        let before = exposition(&[
            (DURATION_BUCKETS, &bucket("0.1", IN_B), 5.0),
            (DURATION_BUCKETS, &bucket("+Inf", IN_B), 50.0),
        ]);
        let after = exposition(&[
            (DURATION_BUCKETS, &bucket("0.1", IN_B), 5.0),
            (DURATION_BUCKETS, &bucket("+Inf", IN_B), 8.0),
        ]);
        let inc = after.increase_since(&before);
        let key = |le: &str| {
            let labels = parse(&format!("x{{{}}} 0", bucket(le, IN_B))).unwrap()[0]
                .labels
                .clone();
            (DURATION_BUCKETS.to_owned(), labels)
        };
        assert_eq!(
            (inc.series[&key("0.1")], inc.series[&key("+Inf")]),
            (5.0, 8.0)
        );
    }

    fn approx(got: Option<f64>, want: f64) {
        let got = got.expect("a quantile");
        assert!((got - want).abs() < 1e-12, "{got} != {want}");
    }

    #[test]
    fn quantiles_match_histogram_quantile() {
        let h = [
            (0.005, 6.0),
            (0.01, 14.0),
            (0.025, 16.0),
            (0.05, 17.0),
            (0.1, 20.0),
            (f64::INFINITY, 20.0),
        ];
        // rank 10 falls in (0.005, 0.01], holding 8 of which 4 are needed.
        approx(histogram_quantile(0.5, &h), 0.0075);
        // rank 19.8 falls in (0.05, 0.1], holding 3 of which 2.8 are needed.
        approx(histogram_quantile(0.99, &h), 0.05 + 0.05 * 2.8 / 3.0);
        // rank 3 in the first bucket: lower bound 0.
        approx(histogram_quantile(0.15, &h), 0.0025);
        // A rank in +Inf: the highest finite bound.
        let h = [(0.1, 1.0), (0.2, 2.0), (f64::INFINITY, 10.0)];
        assert_eq!(histogram_quantile(0.5, &h), Some(0.2));
        // No observations, no +Inf bucket, a single bucket: none.
        assert_eq!(
            histogram_quantile(0.5, &[(0.1, 0.0), (f64::INFINITY, 0.0)]),
            None
        );
        assert_eq!(histogram_quantile(0.5, &[(0.1, 1.0), (0.2, 2.0)]), None);
        assert_eq!(histogram_quantile(0.5, &[(f64::INFINITY, 2.0)]), None);
        // Counts that go down are smoothed as Prometheus does.
        let h = [(0.1, 4.0), (0.2, 3.0), (f64::INFINITY, 4.0)];
        approx(histogram_quantile(0.5, &h), 0.05);
    }

    #[test]
    fn aggregates_buckets_across_sidecars_before_the_quantile() {
        let route_a = r#"direction="inbound",service="billing",route="a""#;
        let route_b = r#"direction="inbound",service="billing",route="""#;
        let out = r#"direction="outbound",service="billing",route="a""#;
        let one = exposition(&[
            (DURATION_BUCKETS, &bucket("0.01", route_a), 2.0),
            (DURATION_BUCKETS, &bucket("0.02", route_a), 2.0),
            (DURATION_BUCKETS, &bucket("+Inf", route_a), 2.0),
            (REQUESTS, &requests("success", "200", route_a), 2.0),
            (
                REFUSALS,
                &format!(r#"{route_a},reason="rate-limit",limit="x""#),
                3.0,
            ),
            (
                REFUSALS,
                &format!(r#"{route_a},reason="timeout",limit="""#),
                0.0,
            ),
            // The callers' view: left out of the inbound one.
            (REQUESTS, &requests("success", "200", out), 1000.0),
        ]);
        let two = exposition(&[
            (DURATION_BUCKETS, &bucket("0.01", route_b), 0.0),
            (DURATION_BUCKETS, &bucket("0.02", route_b), 2.0),
            (DURATION_BUCKETS, &bucket("+Inf", route_b), 2.0),
            (REQUESTS, &requests("failure", "500", route_b), 2.0),
            (
                REFUSALS,
                &format!(r#"{route_b},reason="rate-limit",limit="y""#),
                1.0,
            ),
        ]);
        let empty = Scrape::default();
        let incs = [one.increase_since(&empty), two.increase_since(&empty)];
        let known = ["billing".to_owned(), "idle".to_owned()];
        let half = Duration::from_millis(500);
        let mut rows = aggregate(&incs, Direction::Inbound, View::Services, &known, half);
        // 4 observations: 2 in (0, 0.01], 2 in (0.01, 0.02].
        approx(rows[0].p50_seconds, 0.01);
        approx(rows[0].p99_seconds, 0.01 + 0.01 * (1.96 / 2.0));
        rows[0].p50_seconds = None;
        rows[0].p99_seconds = None;
        assert_eq!(
            rows,
            vec![
                Row {
                    caller: None,
                    service: "billing".into(),
                    route: None,
                    rps: 8.0,
                    success_rate: Some(0.5),
                    p50_seconds: None,
                    p99_seconds: None,
                    refusals_per_second: [("rate-limit".to_owned(), 8.0)].into(),
                },
                Row {
                    caller: None,
                    service: "idle".into(),
                    route: None,
                    rps: 0.0,
                    success_rate: None,
                    p50_seconds: None,
                    p99_seconds: None,
                    refusals_per_second: BTreeMap::new(),
                },
            ]
        );
        let rows = aggregate(
            &incs,
            Direction::Inbound,
            View::Routes { service: "billing" },
            &[],
            half,
        );
        let names: Vec<_> = rows.iter().map(|r| r.route.as_deref().unwrap()).collect();
        assert_eq!(names, ["", "a"]);
        assert_eq!((rows[0].rps, rows[0].success_rate), (4.0, Some(0.0)));
        assert_eq!((rows[1].rps, rows[1].success_rate), (4.0, Some(1.0)));
        approx(rows[1].p50_seconds, 0.005);
        let rows = aggregate(&incs, Direction::Outbound, View::Services, &[], half);
        assert_eq!((rows.len(), rows[0].rps), (1, 2000.0));
        assert_eq!(rows[0].p50_seconds, None);

        let t = table(&aggregate(
            &incs,
            Direction::Inbound,
            View::Routes { service: "billing" },
            &[],
            half,
        ));
        assert_eq!(t[0], ["ROUTE", "RPS", "SUCCESS", "P50", "P99", "REFUSED"]);
        assert_eq!(
            t[1],
            [
                "(none)",
                "4.0",
                "0.00%",
                "15.0ms",
                "19.9ms",
                "rate-limit=2.0/s"
            ]
        );
        assert_eq!(
            t[2],
            [
                "a",
                "4.0",
                "100.00%",
                "5.00ms",
                "9.90ms",
                "rate-limit=6.0/s"
            ]
        );
    }

    #[test]
    fn edges_are_summed_by_caller_and_service_from_the_inbound_series() {
        let series = |caller: &str, service: &str, route: &str| {
            format!(r#"direction="inbound",caller="{caller}",service="{service}",route="{route}""#)
        };
        let one = exposition(&[
            (
                REQUESTS,
                &requests("success", "200", &series("web", "billing", "a")),
                6.0,
            ),
            (
                REQUESTS,
                &requests("failure", "503", &series("web", "billing", "b")),
                2.0,
            ),
            (
                REQUESTS,
                &requests("success", "200", &series("cron", "billing", "a")),
                4.0,
            ),
            (
                DURATION_BUCKETS,
                &bucket("0.01", &series("web", "billing", "a")),
                6.0,
            ),
            (
                DURATION_BUCKETS,
                &bucket("+Inf", &series("web", "billing", "a")),
                6.0,
            ),
            // The caller's own view of the edge: not counted twice.
            (
                REQUESTS,
                &requests(
                    "success",
                    "200",
                    r#"direction="outbound",caller="web",service="billing",route="a""#,
                ),
                100.0,
            ),
        ]);
        let two = exposition(&[
            (
                REQUESTS,
                &requests("success", "200", &series("web", "ledger", "")),
                2.0,
            ),
            // A sidecar from before the caller label.
            (REQUESTS, &requests("success", "200", IN_B), 2.0),
        ]);
        let empty = Scrape::default();
        let incs = [one.increase_since(&empty), two.increase_since(&empty)];
        let second = Duration::from_secs(1);
        let known = ["idle".to_owned()];
        let rows = aggregate(
            &incs,
            Direction::Inbound,
            View::Edges { service: None },
            &known,
            second,
        );
        let edges: Vec<_> = rows
            .iter()
            .map(|r| {
                (
                    r.caller.as_deref().unwrap(),
                    r.service.as_str(),
                    r.rps,
                    r.success_rate,
                )
            })
            .collect();
        assert_eq!(
            edges,
            [
                ("", "billing", 2.0, Some(1.0)),
                ("cron", "billing", 4.0, Some(1.0)),
                ("web", "billing", 8.0, Some(0.75)),
                ("web", "ledger", 2.0, Some(1.0)),
            ]
        );
        approx(rows[2].p99_seconds, 0.0099);
        let t = edges_table(&rows);
        assert_eq!(t[0], ["CALLER", "SERVICE", "RPS", "SUCCESS", "P99"]);
        assert_eq!(t[1], ["-", "billing", "2.0", "100.00%", "-"]);
        assert_eq!(t[3], ["web", "billing", "8.0", "75.00%", "9.90ms"]);
        let into_ledger = aggregate(
            &incs,
            Direction::Inbound,
            View::Edges {
                service: Some("ledger"),
            },
            &[],
            second,
        );
        assert_eq!(into_ledger.len(), 1);
        assert_eq!(into_ledger[0].caller.as_deref(), Some("web"));

        // top: every route of every service, busiest first.
        let rows = aggregate(&incs, Direction::Inbound, View::AllRoutes, &known, second);
        let top = busiest(rows, 2);
        let names: Vec<_> = top
            .iter()
            .map(|r| (r.service.as_str(), r.route.as_deref().unwrap(), r.rps))
            .collect();
        assert_eq!(names, [("billing", "a", 10.0), ("billing", "b", 2.0)]);
        let t = top_table(&top);
        assert_eq!(t[0], ["SERVICE", "ROUTE", "RPS", "SUCCESS", "P50", "P99"]);
        assert_eq!(t[2], ["billing", "b", "2.0", "0.00%", "-", "-"]);
    }

    #[test]
    fn formats() {
        assert_eq!(format_rate(0.0), "0.0");
        assert_eq!(format_rate(0.04), "0.04");
        assert_eq!(format_rate(1234.56), "1234.6");
        assert_eq!(format_success(Some(0.995)), "99.50%");
        assert_eq!(format_success(None), "-");
        assert_eq!(format_latency(Some(0.00075)), "0.75ms");
        assert_eq!(format_latency(Some(0.0967)), "96.7ms");
        assert_eq!(format_latency(Some(0.25)), "250ms");
        assert_eq!(format_latency(Some(1.25)), "1.25s");
        assert_eq!(format_latency(None), "-");
        let r = [("timeout".to_owned(), 0.5), ("rate-limit".to_owned(), 3.5)].into();
        assert_eq!(format_refusals(&r), "rate-limit=3.5/s timeout=0.5/s");
        assert_eq!(format_refusals(&BTreeMap::new()), "-");
    }

    #[test]
    fn intervals() {
        assert_eq!(parse_interval("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_interval("2s"), Ok(Duration::from_secs(2)));
        assert_eq!(parse_interval("1.5"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_interval("1m"), Ok(Duration::from_secs(60)));
        for bad in ["0s", "2h", "fast", "", "-1s", "2 s"] {
            assert!(parse_interval(bad).is_err(), "{bad}");
        }
    }
}
