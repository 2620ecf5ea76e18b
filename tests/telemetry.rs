//! Traces and logs end to end: the real daemon exports spans to an OTLP/HTTP
//! receiver run by the test, continues the trace of an event's `traceparent`
//! header, hands the trace on to the commands it publishes, and logs each
//! event's fields on every line in JSON.

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use keywarden::intake::signature::{Signer, HEADER as SIGNATURE_HEADER};
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::any_value::Value as AnyValue;
use prost::Message;
use serde_json::{json, Value};

const MIN: Duration = Duration::from_secs(60);

/// A received span, ids in lowercase hex as in a traceparent.
#[derive(Debug, Clone)]
struct Received {
    trace_id: String,
    span_id: String,
    parent_span_id: String,
    name: String,
    service: String,
}

/// An OTLP/HTTP trace receiver (protobuf over POST /v1/traces) on a free
/// loopback port; keeps every span it is sent.
struct Collector {
    url: String,
    spans: Arc<Mutex<Vec<Received>>>,
    _runtime: tokio::runtime::Runtime,
}

impl Collector {
    fn start() -> Collector {
        let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
        let spans: Arc<Mutex<Vec<Received>>> = Arc::default();
        let listener = runtime.block_on(tokio::net::TcpListener::bind("127.0.0.1:0")).unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let kept = spans.clone();
        let app = axum::Router::new().route(
            "/v1/traces",
            axum::routing::post(move |body: axum::body::Bytes| async move {
                let request = ExportTraceServiceRequest::decode(body.as_ref()).expect("an OTLP protobuf trace export");
                let mut kept = kept.lock().unwrap();
                for rs in request.resource_spans {
                    let service = rs
                        .resource
                        .iter()
                        .flat_map(|r| &r.attributes)
                        .find(|a| a.key == "service.name")
                        .and_then(|a| match a.value.as_ref()?.value.as_ref()? {
                            AnyValue::StringValue(s) => Some(s.clone()),
                            _ => None,
                        })
                        .unwrap_or_default();
                    for span in rs.scope_spans.into_iter().flat_map(|s| s.spans) {
                        kept.push(Received {
                            trace_id: hex(&span.trace_id),
                            span_id: hex(&span.span_id),
                            parent_span_id: hex(&span.parent_span_id),
                            name: span.name,
                            service: service.clone(),
                        });
                    }
                }
                ([(axum::http::header::CONTENT_TYPE, "application/x-protobuf")], Vec::<u8>::new())
            }),
        );
        runtime.spawn(async move { axum::serve(listener, app).await.unwrap() });
        Collector { url, spans, _runtime: runtime }
    }

    fn trace(&self, trace_id: &str) -> Vec<Received> {
        self.spans.lock().unwrap().iter().filter(|s| s.trace_id == trace_id).cloned().collect()
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Produces a native event signed with the test secret, with extra headers.
fn produce_signed(bootstrap: &str, key: &str, payload: &Value, headers: &[(&str, &str)]) {
    let bytes = serde_json::to_vec(payload).unwrap();
    let sig = Signer::hmac("local", TEST_EVENT_SECRET.as_bytes()).sign(&bytes);
    let mut all = vec![(SIGNATURE_HEADER, sig.as_str())];
    all.extend_from_slice(headers);
    produce_with_headers(&producer(bootstrap), "key-lifecycle", Some(key), &bytes, &all);
}

fn command<'a>(reader: &'a TopicReader, action: &str, cause: &str) -> Option<&'a Read> {
    reader.seen.iter().find(|r| r.json()["action"] == action && r.json()["cause_event_id"] == cause)
}

#[test]
fn an_events_trace_continues_its_traceparent_through_kms_commit_and_into_its_commands_and_rotations() {
    let collector = Collector::start();
    let broker = Broker::start();
    let d = Daemon::start(&broker.bootstrap, &[("KEYWARDEN_TELEMETRY_OTLP_ENDPOINT", &collector.url), ("KEYWARDEN_TELEMETRY_SERVICE_NAME", "keywarden-test")]);
    let mut commands = TopicReader::new(&broker.bootstrap, "instance-commands");
    d.create_key("k1");
    d.create_instance("db-1", "k1");
    // A rotation's rewraps join the trace of the event that started it, across
    // the job persisted in the store.
    let rotate = d.act("k1", "rotate");
    let rotate_id = rotate["event_id"].as_str().unwrap().to_string();
    d.wait_rotated("k1", "2");
    commands.read_until("the rewrapped command", MIN, |r| r.iter().any(|m| m.json()["action"] == "rewrapped" && m.json()["cause_event_id"] == rotate_id));
    let rewrapped = command(&commands, "rewrapped", &rotate_id).unwrap();
    let rotation_trace = rewrapped.header("traceparent").expect("the rewrapped command carries a traceparent").split('-').nth(1).unwrap().to_string();
    let spans = wait_until("the rotation's spans to be exported", MIN, || {
        let spans = collector.trace(&rotation_trace);
        let has = |name: &str| spans.iter().any(|s| s.name == name);
        ["event", "rotation", "kms.rewrap", "publish"].iter().all(|n| has(n)).then_some(spans)
    });
    let pass = spans.iter().find(|s| s.name == "rotation").unwrap();
    assert!(spans.iter().filter(|s| s.name == "kms.rewrap").all(|s| s.parent_span_id == pass.span_id), "{spans:#?}");
    let event = spans.iter().find(|s| s.name == "event").unwrap();
    assert_eq!(pass.parent_span_id, event.span_id, "the rotation is parented under the rotate event: {spans:#?}");

    // Disabled in the KMS first, so that the KMS confirms the delete below and
    // it is applied (the intake asks the KMS before any delete).
    d.act("k1", "disable");
    d.wait_state("db-1", "revoked");

    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let producer_span = "00f067aa0ba902b7";
    let traceparent = format!("00-{trace_id}-{producer_span}-01");
    let event =
        json!({"event_id": "otel-delete-1", "type": "delete", "key_id": "k1", "occurred_at": chrono::Utc::now().to_rfc3339(), "correlation_id": "corr-otel-1"});
    produce_signed(&broker.bootstrap, "k1", &event, &[("traceparent", &traceparent)]);
    d.wait_state("db-1", "erased");

    commands.read_until("the erase command", MIN, |r| r.iter().any(|m| m.json()["action"] == "erase" && m.json()["cause_event_id"] == "otel-delete-1"));
    let erase = command(&commands, "erase", "otel-delete-1").unwrap();
    let handed_on = erase.header("traceparent").expect("the erase command carries a traceparent");
    let parts: Vec<&str> = handed_on.split('-').collect();
    assert_eq!(parts.len(), 4, "{handed_on}");
    assert_eq!(parts[1], trace_id, "the command continues the producer's trace: {handed_on}");
    assert_ne!(parts[2], producer_span, "the command's parent is keywarden's span, not the producer's: {handed_on}");

    // A clean exit flushes what is still queued for export: no waiting here.
    let mut d = d;
    assert_eq!(d.terminate(), Some(0));
    let spans = collector.trace(trace_id);
    for name in ["event", "decode", "kms.key_state", "commit", "publish"] {
        assert!(spans.iter().any(|s| s.name == name), "no {name} span in the event's trace: {spans:#?}");
    }
    let event = spans.iter().find(|s| s.name == "event").unwrap();
    assert_eq!(event.parent_span_id, producer_span, "the event's span is a child of the producer's: {spans:#?}");
    assert_eq!(event.service, "keywarden-test");
    for name in ["decode", "kms.key_state", "commit"] {
        let s = spans.iter().find(|s| s.name == name).unwrap();
        assert_eq!(s.parent_span_id, event.span_id, "{name} is a step of the event: {spans:#?}");
    }
    let publish = spans.iter().find(|s| s.name == "publish").unwrap();
    assert_eq!(publish.span_id, parts[2], "the command's traceparent names the publish span: {spans:#?}");
    assert_eq!(publish.parent_span_id, event.span_id, "publishing continues the event's trace across the outbox: {spans:#?}");
}

#[test]
fn without_otlp_json_log_lines_carry_the_events_fields_and_commands_carry_the_producers_traceparent() {
    let broker = Broker::start();
    let d = Daemon::start(&broker.bootstrap, &[("KEYWARDEN_LOG_FORMAT", "json")]);
    let mut commands = TopicReader::new(&broker.bootstrap, "instance-commands");
    d.create_key("k2");
    d.create_instance("db-2", "k2");
    let traceparent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
    let event = json!({"event_id": "json-disable-1", "type": "disable", "key_id": "k2", "occurred_at": chrono::Utc::now().to_rfc3339(), "correlation_id": "corr-json-1"});
    produce_signed(&broker.bootstrap, "k2", &event, &[("traceparent", traceparent)]);
    d.wait_state("db-2", "revoked");
    commands.read_until("the revoke command", MIN, |r| r.iter().any(|m| m.json()["action"] == "revoke" && m.json()["cause_event_id"] == "json-disable-1"));
    let revoke = command(&commands, "revoke", "json-disable-1").unwrap();
    assert_eq!(revoke.header("traceparent"), Some(traceparent), "with no spans recorded, the producer's traceparent is handed on unchanged");

    let lines = wait_until("the event handled line", MIN, || {
        let log = std::fs::read_to_string(d.dir.path().join("keywarden.log")).unwrap_or_default();
        let lines: Vec<Value> = log.lines().filter_map(|l| serde_json::from_str::<Value>(l).ok()).collect();
        lines.iter().any(|l| l["message"] == "event handled" && l["span"]["event_id"] == "json-disable-1").then_some(lines)
    });
    let about_the_event: Vec<&Value> = lines.iter().filter(|l| l["span"]["event_id"] == "json-disable-1").collect();
    let messages: Vec<&str> = about_the_event.iter().filter_map(|l| l["message"].as_str()).collect();
    assert!(messages.contains(&"event received") && messages.contains(&"event handled"), "{messages:?}");
    for line in &about_the_event {
        assert_eq!(line["span"]["key_id"], "k2", "{line}");
        assert_eq!(line["span"]["correlation_id"], "corr-json-1", "{line}");
        assert_eq!(line["span"]["type"], "disable", "{line}");
    }
    let handled = about_the_event.iter().find(|l| l["message"] == "event handled").unwrap();
    assert_eq!(handled["outcome"], "applied", "the line's own fields are at the top level: {handled}");
}
