//! Weft's shared telemetry: what the sidecar and the control plane both need
//! to serve `GET /metrics`, and their log set-up ([`init_logs`]).
//!
//! - [`process::ProcessCollector`]: the standard Prometheus process metrics
//!   (`process_cpu_seconds_total`, `process_resident_memory_bytes`, ...),
//!   read from `/proc/self` on every scrape.
//! - [`encode`] and [`CONTENT_TYPE`]: a [`Registry`] as Prometheus text
//!   (format 0.0.4), the format `promtool check metrics` lints and every
//!   Prometheus-compatible scraper reads.
//!
//! A binary builds one [`Registry`] (start from [`registry`], which already
//! holds the process collector), registers its own metrics into it, usually
//! under a prefix (`registry.sub_registry_with_prefix("weft_proxy")`), and
//! answers `GET /metrics` with `encode(&registry)`. Register counters
//! *without* the `_total` suffix and put the base unit in the name
//! (`push_latency_seconds`): the encoder appends `_total` to counters.
//!
//! Why not OpenMetrics: `prometheus-client`'s text encoder writes
//! OpenMetrics, where a counter family `x` has `# HELP x` / `# TYPE x` lines
//! and an `x_total` sample. A Prometheus-format parser (promtool's linter
//! among them) reads `x_total` as a separate metric without help or type.
//! [`encode`] therefore rewrites the OpenMetrics text into Prometheus text:
//! counter families are named `x_total` in their `HELP`/`TYPE` lines,
//! `# UNIT` and `# EOF` lines are dropped, `info` becomes a gauge named
//! `x_info` and `unknown` becomes `untyped`. Exemplars are not supported
//! (Weft records none).

pub mod logs;
pub mod process;

use std::fmt::Write as _;

pub use prometheus_client;
use prometheus_client::registry::Registry;

pub use logs::{LogFormat, init_logs};
pub use process::ProcessCollector;

/// The `Content-Type` of what [`encode`] returns: Prometheus text format 0.0.4.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Encoding a registry failed (a metric or collector reported a formatting
/// error).
#[derive(Debug, thiserror::Error)]
#[error("encoding the metrics failed")]
pub struct EncodeError(#[from] std::fmt::Error);

/// A registry that already holds the [`ProcessCollector`] (unprefixed, as the
/// process metrics are standard names).
pub fn registry() -> Registry {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(ProcessCollector::new()));
    registry
}

/// Every metric in `registry`, as Prometheus text (see [`CONTENT_TYPE`]).
pub fn encode(registry: &Registry) -> Result<String, EncodeError> {
    let mut openmetrics = String::new();
    prometheus_client::encoding::text::encode_registry(&mut openmetrics, registry)?;
    Ok(openmetrics_to_prometheus(&openmetrics))
}

/// Rewrites `prometheus-client`'s OpenMetrics text as Prometheus text 0.0.4.
fn openmetrics_to_prometheus(openmetrics: &str) -> String {
    let mut out = String::with_capacity(openmetrics.len() + openmetrics.len() / 8);
    // A HELP line waits for its TYPE line, which decides the family's name.
    let mut help: Option<(&str, &str)> = None;
    for line in openmetrics.lines() {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            flush_help(&mut out, help.take());
            help = Some(rest.split_once(' ').unwrap_or((rest, "")));
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap_or((rest, "untyped"));
            let (suffix, kind) = match kind {
                "counter" => ("_total", "counter"),
                "info" => ("_info", "gauge"),
                "gauge" | "histogram" | "summary" => ("", kind),
                _ => ("", "untyped"),
            };
            let renamed = format!("{name}{suffix}");
            match help.take() {
                Some((help_name, text)) if help_name == name => {
                    flush_help(&mut out, Some((&renamed, text)));
                }
                other => flush_help(&mut out, other),
            }
            let _ = writeln!(out, "# TYPE {renamed} {kind}");
            continue;
        }
        flush_help(&mut out, help.take());
        if line.starts_with("# UNIT ") || line == "# EOF" {
            continue;
        }
        out.push_str(line);
        out.push('\n');
    }
    flush_help(&mut out, help);
    out
}

fn flush_help(out: &mut String, help: Option<(&str, &str)>) {
    if let Some((name, text)) = help {
        let _ = writeln!(out, "# HELP {name} {text}");
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use prometheus_client::encoding::EncodeLabelSet;
    use prometheus_client::metrics::counter::Counter;
    use prometheus_client::metrics::family::Family;
    use prometheus_client::metrics::gauge::Gauge;
    use prometheus_client::metrics::histogram::Histogram;
    use prometheus_client::metrics::info::Info;

    #[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
    struct Kind {
        kind: &'static str,
    }

    #[test]
    fn counters_are_named_with_total_and_openmetrics_lines_are_dropped() {
        let mut registry = Registry::default();
        let sub = registry.sub_registry_with_prefix("weft");
        let pushes = Family::<Kind, Counter>::default();
        sub.register("pushes", "Messages pushed", pushes.clone());
        let gauge: Gauge = Gauge::default();
        sub.register("streams", "Open streams", gauge.clone());
        let latency = Histogram::new([0.1, 1.0]);
        sub.register("latency_seconds", "Latency", latency.clone());
        sub.register("build", "Build", Info::new(vec![("version", "1")]));
        pushes.get_or_create(&Kind { kind: "full" }).inc_by(3);
        gauge.set(2);
        latency.observe(0.5);

        let text = encode(&registry).unwrap();
        let expected = "\
# HELP weft_pushes_total Messages pushed.
# TYPE weft_pushes_total counter
weft_pushes_total{kind=\"full\"} 3
# HELP weft_streams Open streams.
# TYPE weft_streams gauge
weft_streams 2
# HELP weft_latency_seconds Latency.
# TYPE weft_latency_seconds histogram
weft_latency_seconds_sum 0.5
weft_latency_seconds_count 1
weft_latency_seconds_bucket{le=\"0.1\"} 0
weft_latency_seconds_bucket{le=\"1.0\"} 1
weft_latency_seconds_bucket{le=\"+Inf\"} 1
# HELP weft_build_info Build.
# TYPE weft_build_info gauge
weft_build_info{version=\"1\"} 1
";
        assert_eq!(text, expected);
    }

    #[test]
    fn units_and_the_eof_marker_are_dropped() {
        let om = "# HELP a_seconds A.\n# TYPE a_seconds counter\n# UNIT a_seconds seconds\na_seconds_total 1.5\n# HELP b B.\n# TYPE b unknown\nb 1\n# EOF\n";
        assert_eq!(
            openmetrics_to_prometheus(om),
            "# HELP a_seconds_total A.\n# TYPE a_seconds_total counter\na_seconds_total 1.5\n# HELP b B.\n# TYPE b untyped\nb 1\n"
        );
    }
}
