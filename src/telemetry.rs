//! Traces: the `tracing` spans the stages open (event, decode, kms.*, commit,
//! rotation, publish) exported as OpenTelemetry spans over OTLP/HTTP, and the
//! W3C trace context carried from an event's Kafka headers to the commands it
//! causes. With no `telemetry.otlp_endpoint` no OpenTelemetry layer is
//! installed: spans stay log context only, and an incoming `traceparent` is
//! still handed on to commands verbatim, so a producer's trace reaches the data
//! plane even when keywarden itself records nothing.

use std::collections::HashMap;

use opentelemetry::propagation::{Extractor, TextMapPropagator};
use opentelemetry::trace::{TraceContextExt, TracerProvider as _};
use opentelemetry::Context;
use opentelemetry_otlp::{Protocol, WithExportConfig};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{Sampler, SdkTracerProvider};
use opentelemetry_sdk::Resource;
use tracing::Span;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::registry::LookupSpan;

use crate::config::TelemetryConfig;

/// The W3C header that carries a trace id and parent span id between processes.
pub const TRACEPARENT: &str = "traceparent";

#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    #[error("cannot set up the otlp exporter for {endpoint}: {message}; check telemetry.otlp_endpoint")]
    Exporter { endpoint: String, message: String },
}

/// The exporting pipeline. Dropping it flushes the spans still queued and shuts
/// the exporter down; it must outlive the async runtime, since the exporter's
/// blocking HTTP client must not run inside it.
pub struct Traces {
    provider: SdkTracerProvider,
}

impl Traces {
    /// `None` when traces are off (no endpoint configured).
    pub fn start(config: &TelemetryConfig) -> Result<Option<Traces>, TelemetryError> {
        if config.otlp_endpoint.is_empty() {
            return Ok(None);
        }
        let endpoint = traces_url(&config.otlp_endpoint);
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_protocol(Protocol::HttpBinary)
            .with_endpoint(&endpoint)
            .with_timeout(config.export_timeout.0)
            .build()
            .map_err(|e| TelemetryError::Exporter { endpoint: endpoint.clone(), message: e.to_string() })?;
        let provider = SdkTracerProvider::builder()
            .with_batch_exporter(exporter)
            // A producer that sent a traceparent already decided whether its trace
            // is sampled; keywarden follows, so a trace is never cut in half.
            .with_sampler(Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(config.sample_ratio))))
            .with_resource(Resource::builder().with_service_name(config.service_name.clone()).build())
            .build();
        Ok(Some(Traces { provider }))
    }

    /// The layer that turns keywarden's spans into OpenTelemetry spans.
    pub fn layer<S>(&self) -> tracing_opentelemetry::OpenTelemetryLayer<S, opentelemetry_sdk::trace::Tracer>
    where
        S: tracing::Subscriber + for<'a> LookupSpan<'a>,
    {
        tracing_opentelemetry::layer().with_tracer(self.provider.tracer("keywarden"))
    }
}

impl Drop for Traces {
    fn drop(&mut self) {
        if let Err(e) = self.provider.shutdown() {
            // The subscriber may be the only one who could report it; stderr is certain.
            eprintln!("keywarden: traces not all exported at exit: {e}");
        }
    }
}

/// `otlp_endpoint` is a collector's base URL, as OTEL_EXPORTER_OTLP_ENDPOINT is;
/// the traces path is appended unless the URL already names a path.
fn traces_url(endpoint: &str) -> String {
    match reqwest::Url::parse(endpoint) {
        Ok(url) if url.path() == "/" || url.path().is_empty() => format!("{}/v1/traces", endpoint.trim_end_matches('/')),
        _ => endpoint.to_string(),
    }
}

/// Kafka headers read as a trace-context carrier; names compare case-insensitively.
struct Headers<'a>(&'a [(&'a str, &'a [u8])]);

impl Extractor for Headers<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.iter().rev().find(|(k, _)| k.eq_ignore_ascii_case(key)).and_then(|(_, v)| std::str::from_utf8(v).ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.iter().map(|(k, _)| *k).collect()
    }
}

/// The trace context a message's producer sent (`traceparent`, `tracestate`);
/// an empty context when there is none or it is malformed.
pub fn received(headers: &[(&str, &[u8])]) -> Context {
    TraceContextPropagator::new().extract(&Headers(headers))
}

/// The trace context persisted with an outbox entry or a rotation job.
pub fn stored(traceparent: Option<&str>) -> Context {
    let Some(tp) = traceparent else { return Context::new() };
    let carrier: HashMap<String, String> = HashMap::from([(TRACEPARENT.to_string(), tp.to_string())]);
    TraceContextPropagator::new().extract(&carrier)
}

/// Makes `span` a child of `parent` (a remote context). Does nothing when the
/// context is empty or traces are off; must come before the span is entered.
pub fn continue_trace(span: &Span, parent: Context) {
    if parent.span().span_context().is_valid() {
        // Without the OpenTelemetry layer there is nothing to parent, by design.
        let _ = span.set_parent(parent);
    }
}

/// The traceparent to hand on from within `span`: the span's own when traces
/// are exported, else `upstream` unchanged (the producer's, or a stored one).
pub fn traceparent(span: &Span, upstream: &Context) -> Option<String> {
    let own = span.context();
    let cx = if own.span().span_context().is_valid() { &own } else { upstream };
    if !cx.span().span_context().is_valid() {
        return None;
    }
    let mut carrier: HashMap<String, String> = HashMap::new();
    TraceContextPropagator::new().inject_context(cx, &mut carrier);
    carrier.remove(TRACEPARENT)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    use opentelemetry::trace::TraceId;
    use opentelemetry_sdk::error::OTelSdkResult;
    use opentelemetry_sdk::trace::{SpanData, SpanExporter};
    use tracing_subscriber::layer::SubscriberExt;

    /// Keeps exported spans (the SDK's own in-memory exporter needs its
    /// "testing" feature, which drags in a runtime).
    #[derive(Debug, Clone, Default)]
    struct Collect(Arc<Mutex<Vec<SpanData>>>);

    impl SpanExporter for Collect {
        async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
            self.0.lock().unwrap().extend(batch);
            Ok(())
        }
    }

    const TP: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn without_traces_an_incoming_traceparent_is_handed_on_unchanged() {
        let headers: &[(&str, &[u8])] = &[("TraceParent", TP.as_bytes())];
        let span = tracing::info_span!("event");
        continue_trace(&span, received(headers));
        assert_eq!(traceparent(&span, &received(headers)).as_deref(), Some(TP));
        assert_eq!(traceparent(&span, &stored(Some(TP))).as_deref(), Some(TP));
    }

    #[test]
    fn a_malformed_or_missing_traceparent_is_dropped() {
        let span = tracing::info_span!("event");
        for bad in ["", "00-zz-00f067aa0ba902b7-01", "00-00000000000000000000000000000000-00f067aa0ba902b7-01"] {
            let headers: &[(&str, &[u8])] = &[("traceparent", bad.as_bytes())];
            assert_eq!(traceparent(&span, &received(headers)), None, "{bad}");
        }
        assert_eq!(traceparent(&span, &stored(None)), None);
    }

    #[test]
    fn with_traces_the_span_continues_the_producers_trace_and_hands_on_its_own_id() {
        let exporter = Collect::default();
        let provider = SdkTracerProvider::builder().with_simple_exporter(exporter.clone()).build();
        let subscriber = tracing_subscriber::registry().with(tracing_opentelemetry::layer().with_tracer(provider.tracer("test")));
        let handed_on = tracing::subscriber::with_default(subscriber, || {
            let span = tracing::info_span!("event");
            let headers: &[(&str, &[u8])] = &[("traceparent", TP.as_bytes())];
            continue_trace(&span, received(headers));
            let tp = traceparent(&span, &received(headers)).unwrap();
            span.in_scope(|| tracing::info_span!("decode").in_scope(|| {}));
            tp
        });
        let trace_id = TraceId::from_hex("4bf92f3577b34da6a3ce929d0e0e4736").unwrap();
        assert!(handed_on.starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-"), "{handed_on}");
        assert_ne!(handed_on, TP, "the parent of what follows is keywarden's span, not the producer's");
        let spans = exporter.0.lock().unwrap().clone();
        let names: Vec<&str> = spans.iter().filter(|s| s.span_context.trace_id() == trace_id).map(|s| s.name.as_ref()).collect();
        assert_eq!(names.len(), 2, "{names:?}");
        assert!(names.contains(&"event") && names.contains(&"decode"), "{names:?}");
    }

    #[test]
    fn the_endpoint_is_a_base_url_unless_it_names_a_path() {
        assert_eq!(traces_url("http://otel:4318"), "http://otel:4318/v1/traces");
        assert_eq!(traces_url("http://otel:4318/"), "http://otel:4318/v1/traces");
        assert_eq!(traces_url("https://otel/custom/traces"), "https://otel/custom/traces");
    }
}
