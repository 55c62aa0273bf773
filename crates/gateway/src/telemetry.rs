//! The gateway binary's OpenTelemetry export (feature `otlp`): its
//! `tracing` spans (docs/observability.md, "Trace context") as OpenTelemetry
//! spans, and its metrics beside Prometheus, over OTLP/HTTP with protobuf, to
//! a collector such as the OpenTelemetry Collector, Jaeger or Grafana Tempo.
//!
//! The binary calls [`otlp_tracer`] and [`otlp_meter`] when
//! `OTEL_EXPORTER_OTLP_ENDPOINT` is set (for example `http://127.0.0.1:4318`;
//! spans go to its `/v1/traces`, metrics to `/v1/metrics`), adds [`layer`]
//! beside its log output, and records metrics through [`with_otlp`]. A
//! library user installs their own OpenTelemetry SDK instead.

use std::collections::HashMap;
use std::sync::{PoisonError, RwLock};

use metrics::{Key, KeyName, Label, Metadata, Recorder, SharedString};
use metrics_opentelemetry::{OpenTelemetryMetrics, OpenTelemetryRecorder};
use metrics_util::layers::FanoutBuilder;
use opentelemetry::metrics::MeterProvider as _;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::metrics::{PeriodicReader, SdkMeterProvider};
use opentelemetry_sdk::trace::SdkTracerProvider;

/// Why the exporter could not be made.
#[derive(Debug, thiserror::Error)]
#[error("OTLP exporter to {endpoint}: {reason}")]
pub struct TelemetryError {
    /// The endpoint given.
    pub endpoint: String,
    /// What went wrong.
    pub reason: String,
}

/// A tracer provider that exports spans in batches to the OTLP/HTTP
/// collector at `endpoint` (its base URL: `/v1/traces` is appended, as
/// `OTEL_EXPORTER_OTLP_ENDPOINT` means), as the service `service_name`.
/// Call [`SdkTracerProvider::shutdown`] before the process ends, so the last
/// batch is sent.
pub fn otlp_tracer(endpoint: &str, service_name: &str) -> Result<SdkTracerProvider, TelemetryError> {
    let error = |reason: String| TelemetryError { endpoint: endpoint.to_owned(), reason };
    let url = reqwest_url(endpoint).map_err(error)?;
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_endpoint(url)
        .build()
        .map_err(|e| error(e.to_string()))?;
    let resource = opentelemetry_sdk::Resource::builder().with_service_name(service_name.to_owned()).build();
    Ok(SdkTracerProvider::builder().with_batch_exporter(exporter).with_resource(resource).build())
}

/// The base URL with `/v1/traces` appended; only `http` and `https` URLs.
fn reqwest_url(endpoint: &str) -> Result<String, String> {
    signal_url(endpoint, "traces")
}

/// The base URL with `/v1/{signal}` appended; only `http` and `https` URLs.
fn signal_url(endpoint: &str, signal: &str) -> Result<String, String> {
    let base = endpoint.trim_end_matches('/');
    if !(base.starts_with("http://") || base.starts_with("https://")) || base.len() <= "https://".len() {
        return Err("not an http:// or https:// URL".into());
    }
    Ok(format!("{base}/v1/{signal}"))
}

/// A meter provider that exports metrics every `interval` to the OTLP/HTTP
/// collector at `endpoint` (`/v1/metrics` is appended), as the service
/// `service_name`. Record into it through [`with_otlp`]; call
/// [`SdkMeterProvider::shutdown`] before the process ends.
pub fn otlp_meter(
    endpoint: &str,
    service_name: &str,
    interval: std::time::Duration,
) -> Result<SdkMeterProvider, TelemetryError> {
    let error = |reason: String| TelemetryError { endpoint: endpoint.to_owned(), reason };
    let url = signal_url(endpoint, "metrics").map_err(error)?;
    let exporter = opentelemetry_otlp::MetricExporter::builder()
        .with_http()
        .with_endpoint(url)
        .build()
        .map_err(|e| error(e.to_string()))?;
    let reader = PeriodicReader::builder(exporter).with_interval(interval).build();
    let resource = opentelemetry_sdk::Resource::builder().with_service_name(service_name.to_owned()).build();
    Ok(SdkMeterProvider::builder().with_reader(reader).with_resource(resource).build())
}

/// A recorder that sends every metric to `prometheus` and to `provider`'s
/// meter, the latter under OpenTelemetry's names ([`otel_name`],
/// [`otel_label`]). Install it with `metrics::set_global_recorder`.
pub fn with_otlp<R: Recorder + Sync + 'static>(prometheus: R, provider: &SdkMeterProvider) -> impl Recorder + Sync {
    let otel = OpenTelemetryRecorder::new(OpenTelemetryMetrics::new(provider.meter("dualstream-gateway")));
    // OpenTelemetry's advice for `messaging.client.operation.duration`, in seconds.
    const DURATION_BOUNDS: [f64; 14] =
        [0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0];
    otel.set_histogram_bounds([OPERATION_DURATION].into_iter(), &DURATION_BOUNDS);
    otel.describe_histogram(
        OPERATION_DURATION.into(),
        Some(metrics::Unit::Seconds),
        "Duration of a messaging operation (the durable write, to its acknowledgement)".into(),
    );
    FanoutBuilder::default().add_recorder(prometheus).add_recorder(OtelNames::new(otel)).build()
}

/// `messaging.client.operation.duration`.
const OPERATION_DURATION: &str = "messaging.client.operation.duration";

/// The OpenTelemetry name of the metric that Prometheus shows as `name`:
/// the semantic conventions' name where one applies, else `name` without
/// the `_total` that Prometheus appends to counters. Either way, the
/// OpenTelemetry Collector's Prometheus exporter shows it under `name`
/// again (it appends `_total` to counters and the unit to durations), so
/// the dashboard's queries work behind OTLP too (histograms excepted: there
/// they are buckets, not quantiles).
pub fn otel_name(name: &str) -> &str {
    match name {
        "messaging_client_sent_messages_total" => "messaging.client.sent.messages",
        "messaging_client_consumed_messages_total" => "messaging.client.consumed.messages",
        "messaging_client_operation_duration_seconds" => OPERATION_DURATION,
        other => other.strip_suffix("_total").unwrap_or(other),
    }
}

/// The OpenTelemetry attribute name of a Prometheus label.
pub fn otel_label(label: &str) -> &str {
    match label {
        "messaging_system" => "messaging.system",
        "messaging_operation_name" => "messaging.operation.name",
        "messaging_destination_name" => "messaging.destination.name",
        "error_type" => "error.type",
        other => other,
    }
}

/// A recorder under OpenTelemetry's names: renames each metric and its
/// labels once, on its first registration, and keeps the inner recorder's
/// handle for it (`metrics`' macros register on every call).
struct OtelNames<R> {
    inner: R,
    counters: RwLock<HashMap<Key, metrics::Counter>>,
    gauges: RwLock<HashMap<Key, metrics::Gauge>>,
    histograms: RwLock<HashMap<Key, metrics::Histogram>>,
}

impl<R: Recorder> OtelNames<R> {
    fn new(inner: R) -> Self {
        Self { inner, counters: RwLock::default(), gauges: RwLock::default(), histograms: RwLock::default() }
    }

    fn renamed(key: &Key) -> Key {
        let labels: Vec<Label> =
            key.labels().map(|l| Label::new(otel_label(l.key()).to_owned(), l.value().to_owned())).collect();
        Key::from_parts(otel_name(key.name()).to_owned(), labels)
    }

    fn handle<H: Clone>(map: &RwLock<HashMap<Key, H>>, key: &Key, register: impl FnOnce(&Key) -> H) -> H {
        if let Some(h) = map.read().unwrap_or_else(PoisonError::into_inner).get(key) {
            return h.clone();
        }
        let mut map = map.write().unwrap_or_else(PoisonError::into_inner);
        map.entry(key.clone()).or_insert_with(|| register(&Self::renamed(key))).clone()
    }
}

impl<R: Recorder> Recorder for OtelNames<R> {
    fn describe_counter(&self, key: KeyName, unit: Option<metrics::Unit>, description: SharedString) {
        self.inner.describe_counter(otel_name(key.as_str()).to_owned().into(), unit, description);
    }

    fn describe_gauge(&self, key: KeyName, unit: Option<metrics::Unit>, description: SharedString) {
        self.inner.describe_gauge(otel_name(key.as_str()).to_owned().into(), unit, description);
    }

    fn describe_histogram(&self, key: KeyName, unit: Option<metrics::Unit>, description: SharedString) {
        self.inner.describe_histogram(otel_name(key.as_str()).to_owned().into(), unit, description);
    }

    fn register_counter(&self, key: &Key, metadata: &Metadata<'_>) -> metrics::Counter {
        Self::handle(&self.counters, key, |k| self.inner.register_counter(k, metadata))
    }

    fn register_gauge(&self, key: &Key, metadata: &Metadata<'_>) -> metrics::Gauge {
        Self::handle(&self.gauges, key, |k| self.inner.register_gauge(k, metadata))
    }

    fn register_histogram(&self, key: &Key, metadata: &Metadata<'_>) -> metrics::Histogram {
        Self::handle(&self.histograms, key, |k| self.inner.register_histogram(k, metadata))
    }
}

/// The `tracing` layer that turns spans into `provider`'s OpenTelemetry
/// spans.
pub fn layer<S>(provider: &SdkTracerProvider) -> impl tracing_subscriber::Layer<S>
where
    S: tracing::Subscriber + for<'span> tracing_subscriber::registry::LookupSpan<'span>,
{
    tracing_opentelemetry::layer().with_tracer(provider.tracer("dualstream-gateway"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The name a Prometheus exporter of OpenTelemetry metrics gives an
    /// OpenTelemetry name (the Collector's, with its default suffixes): dots
    /// to underscores, `_seconds` for a duration in seconds, `_total` for a
    /// counter.
    fn prometheus_name(otel: &str, counter: bool, seconds: bool) -> String {
        let mut name = otel.replace('.', "_");
        if seconds {
            name.push_str("_seconds");
        }
        if counter {
            name.push_str("_total");
        }
        name
    }

    #[test]
    fn every_metric_keeps_its_prometheus_name_behind_otlp() {
        use crate::metric_names as m;
        use dualstream_publisher::metric_names as p;
        let counters = [p::SENT_MESSAGES, p::NOTIFICATIONS, m::INGESTED, m::DELIVERIES, m::CLOSED, m::TRUNCATED]
            .into_iter()
            .chain([m::REDIS_NOTIFICATIONS, m::HUB_MISSED, m::HUB_DISCONNECTS, m::CONSUMED_MESSAGES, m::HISTORY_READS])
            .chain([m::HISTORY_BACKFILL_READS, m::HISTORY_PARKED_DROPPED]);
        for name in counters {
            assert!(name.ends_with("_total"), "{name}");
            assert!(!otel_name(name).ends_with("_total"), "{name}");
            assert_eq!(prometheus_name(otel_name(name), true, false), name);
        }
        let others =
            [m::CLIENTS, m::SUBSCRIPTIONS, m::BUFFERED_BYTES, m::BREAKER, m::HUB_SUBSCRIBERS, m::HUB_CONNECTED]
                .into_iter()
                .chain([
                    m::HISTORY_CONSUMERS,
                    m::JOINS,
                    m::JOIN_LAG_MAX,
                    m::JOIN_LAG,
                    p::BATCH_SIZE,
                    p::NOTIFY_QUEUE_DEPTH,
                ]);
        for name in others {
            assert_eq!(prometheus_name(otel_name(name), false, false), name);
        }
        assert_eq!(prometheus_name(otel_name(p::OPERATION_SECONDS), false, true), p::OPERATION_SECONDS);
        // The semantic conventions' names and attributes.
        assert_eq!(otel_name(p::SENT_MESSAGES), "messaging.client.sent.messages");
        assert_eq!(otel_name(m::CONSUMED_MESSAGES), "messaging.client.consumed.messages");
        assert_eq!(otel_name(p::OPERATION_SECONDS), "messaging.client.operation.duration");
        assert_eq!(otel_label("messaging_destination_name"), "messaging.destination.name");
        assert_eq!(otel_label("error_type"), "error.type");
        assert_eq!(otel_label("transport"), "transport");
    }

    #[test]
    fn the_endpoint_is_a_base_url_and_gets_the_traces_path() {
        assert_eq!(reqwest_url("http://127.0.0.1:4318/").as_deref(), Ok("http://127.0.0.1:4318/v1/traces"));
        assert_eq!(reqwest_url("https://otel.example").as_deref(), Ok("https://otel.example/v1/traces"));
        assert_eq!(signal_url("http://c:4318", "metrics").as_deref(), Ok("http://c:4318/v1/metrics"));
        for bad in ["", "127.0.0.1:4318", "grpc://x:4317", "http://"] {
            let e = otlp_tracer(bad, "t").expect_err(bad);
            assert!(e.to_string().contains("not an http:// or https:// URL"), "{e}");
            let e = otlp_meter(bad, "t", std::time::Duration::from_secs(1)).expect_err(bad);
            assert!(e.to_string().contains("not an http:// or https:// URL"), "{e}");
        }
    }
}
