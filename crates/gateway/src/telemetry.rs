//! The gateway binary's span export (feature `otlp`): its `tracing` spans
//! (docs/observability.md, "Trace context") as OpenTelemetry spans over
//! OTLP/HTTP with protobuf, to a collector such as the OpenTelemetry
//! Collector, Jaeger or Grafana Tempo.
//!
//! The binary calls [`otlp_tracer`] when `OTEL_EXPORTER_OTLP_ENDPOINT` is
//! set (for example `http://127.0.0.1:4318`; spans go to its `/v1/traces`)
//! and adds [`layer`] beside its log output. A library user installs their
//! own OpenTelemetry SDK instead.

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::WithExportConfig;
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
    let base = endpoint.trim_end_matches('/');
    if !(base.starts_with("http://") || base.starts_with("https://")) || base.len() <= "https://".len() {
        return Err("not an http:// or https:// URL".into());
    }
    Ok(format!("{base}/v1/traces"))
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

    #[test]
    fn the_endpoint_is_a_base_url_and_gets_the_traces_path() {
        assert_eq!(reqwest_url("http://127.0.0.1:4318/").as_deref(), Ok("http://127.0.0.1:4318/v1/traces"));
        assert_eq!(reqwest_url("https://otel.example").as_deref(), Ok("https://otel.example/v1/traces"));
        for bad in ["", "127.0.0.1:4318", "grpc://x:4317", "http://"] {
            let e = otlp_tracer(bad, "t").expect_err(bad);
            assert!(e.to_string().contains("not an http:// or https:// URL"), "{e}");
        }
    }
}
