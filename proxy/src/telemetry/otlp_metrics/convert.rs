//! The registry's values (Prometheus `MetricFamily` messages, from
//! prometheus-client's protobuf encoder) as OTLP metrics.
//!
//! | Prometheus | OTLP |
//! |---|---|
//! | counter | a cumulative, monotonic `Sum` |
//! | gauge (info metrics included: 1 with their labels) | a `Gauge` |
//! | histogram | a cumulative `Histogram` with explicit bounds; Prometheus' cumulative bucket counts become each bucket's own count, and the `+Inf` bucket is OTLP's overflow bucket |
//! | untyped | a `Gauge` |
//!
//! Names are those of `/metrics` (`weft_requests_total`, ...), the help text
//! is the description, and a data point's attributes are its series' labels
//! (string values). Values are doubles, as in Prometheus. Cumulative values
//! start at [`Times::start`] (the process start); every point is stamped
//! [`Times::now`]. A family without series is left out; summaries (which
//! prometheus-client does not make) too.

use prometheus_client::encoding::prometheus_protobuf::prometheus_data_model as prom;

use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue, any_value};
use opentelemetry_proto::tonic::metrics::v1::{
    AggregationTemporality, Gauge, Histogram, HistogramDataPoint, Metric, NumberDataPoint, Sum,
    metric, number_data_point,
};

/// Timestamps, in nanoseconds since the Unix epoch.
#[derive(Debug, Clone, Copy)]
pub struct Times {
    /// When the cumulative values started counting.
    pub start: u64,
    /// When the values were collected.
    pub now: u64,
}

/// Every family that has series, as an OTLP metric.
pub fn convert(families: Vec<prom::MetricFamily>, times: Times) -> Vec<Metric> {
    families
        .into_iter()
        .filter_map(|family| convert_family(family, times))
        .collect()
}

fn convert_family(family: prom::MetricFamily, times: Times) -> Option<Metric> {
    let kind = prom::MetricType::try_from(family.r#type).ok()?;
    let series = family.metric;
    let data = match kind {
        prom::MetricType::Counter => metric::Data::Sum(Sum {
            data_points: series
                .iter()
                .filter_map(|m| {
                    Some(number(
                        &m.label,
                        times.start,
                        times,
                        m.counter.as_ref()?.value,
                    ))
                })
                .collect(),
            aggregation_temporality: AggregationTemporality::Cumulative as i32,
            is_monotonic: true,
        }),
        prom::MetricType::Gauge | prom::MetricType::Untyped => metric::Data::Gauge(Gauge {
            data_points: series
                .iter()
                .filter_map(|m| {
                    let value = match kind {
                        prom::MetricType::Gauge => m.gauge.as_ref()?.value,
                        _ => m.untyped.as_ref()?.value,
                    };
                    Some(number(&m.label, 0, times, value))
                })
                .collect(),
        }),
        prom::MetricType::Histogram => metric::Data::Histogram(Histogram {
            data_points: series
                .iter()
                .filter_map(|m| Some(histogram(&m.label, m.histogram.as_ref()?, times)))
                .collect(),
            aggregation_temporality: AggregationTemporality::Cumulative as i32,
        }),
        prom::MetricType::Summary | prom::MetricType::GaugeHistogram => return None,
    };
    let empty = match &data {
        metric::Data::Sum(sum) => sum.data_points.is_empty(),
        metric::Data::Gauge(gauge) => gauge.data_points.is_empty(),
        metric::Data::Histogram(h) => h.data_points.is_empty(),
        metric::Data::ExponentialHistogram(_) | metric::Data::Summary(_) => true,
    };
    if empty {
        return None;
    }
    Some(Metric {
        name: family.name,
        description: family.help,
        unit: family.unit,
        data: Some(data),
        ..Metric::default()
    })
}

/// A point; `start` 0 leaves the start time out (gauges).
fn number(labels: &[prom::LabelPair], start: u64, times: Times, value: f64) -> NumberDataPoint {
    NumberDataPoint {
        attributes: attributes(labels),
        start_time_unix_nano: start,
        time_unix_nano: times.now,
        value: Some(number_data_point::Value::AsDouble(value)),
        ..NumberDataPoint::default()
    }
}

fn histogram(labels: &[prom::LabelPair], h: &prom::Histogram, times: Times) -> HistogramDataPoint {
    let count = if h.sample_count_float > 0.0 {
        h.sample_count_float as u64
    } else {
        h.sample_count
    };
    let cumulative: Vec<u64> = h
        .bucket
        .iter()
        .map(|b| {
            if b.cumulative_count_float > 0.0 {
                b.cumulative_count_float as u64
            } else {
                b.cumulative_count
            }
        })
        .collect();
    let mut bounds: Vec<f64> = h.bucket.iter().map(|b| b.upper_bound).collect();
    let mut counts = de_cumulate(&cumulative);
    if bounds.last().is_some_and(|b| *b == f64::INFINITY) {
        // The +Inf bucket is OTLP's implicit overflow bucket.
        bounds.pop();
    } else {
        // The +Inf bucket is optional in Prometheus: the rest overflows.
        let held = cumulative.last().copied().unwrap_or(0);
        counts.push(count.saturating_sub(held));
    }
    HistogramDataPoint {
        attributes: attributes(labels),
        start_time_unix_nano: times.start,
        time_unix_nano: times.now,
        count,
        sum: Some(h.sample_sum),
        bucket_counts: counts,
        explicit_bounds: bounds,
        ..HistogramDataPoint::default()
    }
}

/// Each bucket's own count, from running totals.
fn de_cumulate(cumulative: &[u64]) -> Vec<u64> {
    let mut previous = 0;
    cumulative
        .iter()
        .map(|&c| {
            let alone = c.saturating_sub(previous);
            previous = previous.max(c);
            alone
        })
        .collect()
}

fn attributes(labels: &[prom::LabelPair]) -> Vec<KeyValue> {
    labels
        .iter()
        .map(|label| KeyValue {
            key: label.name.clone(),
            value: Some(AnyValue {
                value: Some(any_value::Value::StringValue(label.value.clone())),
            }),
            ..KeyValue::default()
        })
        .collect()
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use std::collections::BTreeMap;

    use prometheus_client::encoding::EncodeLabelSet;
    use prometheus_client::encoding::prometheus_protobuf::encode;
    use prometheus_client::metrics::counter::Counter;
    use prometheus_client::metrics::family::Family;
    use prometheus_client::metrics::gauge::Gauge as PromGauge;
    use prometheus_client::metrics::histogram::Histogram as PromHistogram;
    use prometheus_client::metrics::info::Info;
    use prometheus_client::registry::{Registry, Unit};

    use super::*;

    const TIMES: Times = Times {
        start: 1_000,
        now: 2_000,
    };

    #[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
    struct Labels {
        service: &'static str,
        status_code: u16,
    }

    fn by_name(metrics: Vec<Metric>) -> BTreeMap<String, Metric> {
        metrics.into_iter().map(|m| (m.name.clone(), m)).collect()
    }

    fn attrs(kvs: &[KeyValue]) -> BTreeMap<&str, &str> {
        kvs.iter()
            .map(|kv| {
                let value = match kv.value.as_ref().unwrap().value.as_ref().unwrap() {
                    any_value::Value::StringValue(s) => s.as_str(),
                    other => panic!("not a string: {other:?}"),
                };
                (kv.key.as_str(), value)
            })
            .collect()
    }

    fn double(v: f64) -> Option<number_data_point::Value> {
        Some(number_data_point::Value::AsDouble(v))
    }

    #[test]
    fn counters_gauges_and_histograms_convert() {
        let mut root = Registry::default();
        let registry = root.sub_registry_with_prefix("weft");
        let requests = Family::<Labels, Counter>::default();
        registry.register("requests", "Requests", requests.clone());
        let open = PromGauge::<i64>::default();
        registry.register("open", "Open", open.clone());
        let latency =
            Family::<Labels, PromHistogram, fn() -> PromHistogram>::new_with_constructor(|| {
                PromHistogram::new([0.1, 1.0])
            });
        registry.register("latency_seconds", "Latency", latency.clone());
        let empty = Family::<Labels, Counter>::default();
        registry.register("unused", "Nothing yet", empty);

        let ok = Labels {
            service: "billing",
            status_code: 200,
        };
        requests.get_or_create(&ok).inc_by(3);
        open.set(-2);
        for v in [0.05, 0.5, 0.7, 5.0] {
            latency.get_or_create(&ok).observe(v);
        }

        let metrics = by_name(convert(encode(&root).unwrap(), TIMES));
        assert_eq!(
            metrics.keys().collect::<Vec<_>>(),
            ["weft_latency_seconds", "weft_open", "weft_requests_total"],
            "the names of /metrics; a family without series is left out"
        );

        let requests = &metrics["weft_requests_total"];
        assert_eq!(requests.description, "Requests.");
        let Some(metric::Data::Sum(sum)) = &requests.data else {
            panic!("not a sum: {requests:?}");
        };
        assert!(sum.is_monotonic);
        assert_eq!(
            sum.aggregation_temporality,
            AggregationTemporality::Cumulative as i32
        );
        let [point] = &sum.data_points[..] else {
            panic!("{sum:?}")
        };
        assert_eq!(point.value, double(3.0));
        assert_eq!(
            (point.start_time_unix_nano, point.time_unix_nano),
            (1_000, 2_000)
        );
        assert_eq!(
            attrs(&point.attributes),
            BTreeMap::from([("service", "billing"), ("status_code", "200")])
        );

        let Some(metric::Data::Gauge(open)) = &metrics["weft_open"].data else {
            panic!("not a gauge");
        };
        assert_eq!(open.data_points[0].value, double(-2.0));
        assert!(open.data_points[0].attributes.is_empty());
        assert_eq!(open.data_points[0].start_time_unix_nano, 0);

        let Some(metric::Data::Histogram(h)) = &metrics["weft_latency_seconds"].data else {
            panic!("not a histogram");
        };
        assert_eq!(
            h.aggregation_temporality,
            AggregationTemporality::Cumulative as i32
        );
        let point = &h.data_points[0];
        assert_eq!(point.count, 4);
        assert_eq!(point.sum, Some(6.25));
        assert_eq!(point.explicit_bounds, [0.1, 1.0]);
        assert_eq!(point.bucket_counts, [1, 2, 1], "per bucket, +Inf last");
        assert_eq!(point.start_time_unix_nano, 1_000);
        assert_eq!(attrs(&point.attributes)["service"], "billing");
    }

    fn bucket(upper_bound: f64, cumulative_count: u64) -> prom::Bucket {
        prom::Bucket {
            upper_bound,
            cumulative_count,
            ..prom::Bucket::default()
        }
    }

    #[test]
    fn buckets_are_de_cumulated() {
        assert_eq!(de_cumulate(&[1, 3, 3, 4]), [1, 2, 0, 1]);
        assert_eq!(de_cumulate(&[]), [0u64; 0]);
        assert_eq!(de_cumulate(&[2, 1, 5]), [2, 0, 3], "never negative");

        // Without a +Inf bucket, what the buckets do not hold overflows.
        let h = prom::Histogram {
            sample_count: 5,
            sample_sum: 7.0,
            bucket: vec![bucket(1.0, 1), bucket(2.0, 2)],
            ..prom::Histogram::default()
        };
        let point = histogram(&[], &h, TIMES);
        assert_eq!(point.explicit_bounds, [1.0, 2.0]);
        assert_eq!(point.bucket_counts, [1, 1, 3]);
        assert_eq!((point.count, point.sum), (5, Some(7.0)));

        // No buckets: everything in the one overflow bucket.
        let h = prom::Histogram {
            sample_count: 2,
            ..prom::Histogram::default()
        };
        let point = histogram(&[], &h, TIMES);
        assert!(point.explicit_bounds.is_empty());
        assert_eq!(point.bucket_counts, [2]);
    }

    #[test]
    fn units_info_and_process_style_metrics() {
        let mut registry = Registry::default();
        let c = Counter::<u64>::default();
        registry.register_with_unit("read", "Read", Unit::Bytes, c.clone());
        c.inc_by(1 << 40);
        registry.register("build", "Build", Info::new(vec![("version", "1.2")]));
        let cpu = Counter::<f64, std::sync::atomic::AtomicU64>::default();
        registry.register("cpu_seconds", "CPU", cpu.clone());
        cpu.inc_by(1.5);
        let metrics = by_name(convert(encode(&registry).unwrap(), TIMES));

        let read = &metrics["read_bytes_total"];
        assert_eq!(read.unit, "bytes");
        let Some(metric::Data::Sum(sum)) = &read.data else {
            panic!("not a sum")
        };
        assert_eq!(sum.data_points[0].value, double((1u64 << 40) as f64));
        let Some(metric::Data::Sum(cpu)) = &metrics["cpu_seconds_total"].data else {
            panic!("not a sum")
        };
        assert_eq!(cpu.data_points[0].value, double(1.5));

        let Some(metric::Data::Gauge(build)) = &metrics["build_info"].data else {
            panic!("not a gauge")
        };
        assert_eq!(build.data_points[0].value, double(1.0));
        assert_eq!(
            attrs(&build.data_points[0].attributes),
            BTreeMap::from([("version", "1.2")])
        );
    }
}
