//! CloudEvents 1.0 over Kafka (the spec's Kafka protocol binding), whose data is
//! a native event. Structured mode: the payload is the CloudEvent as JSON, with
//! `data` (or `data_base64`) holding the native event. Binary mode: the
//! attributes are `ce_` headers and the payload is the native event itself.
//! The native event decides everything; the envelope is checked for being a
//! valid CloudEvent, and may add a `correlationid` extension.

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use serde::Deserialize;

use super::format::{self, optional, string, Format, Incoming, Probe, Trust};
use super::{native, DecodeError};
use crate::engine::LifecycleEvent;

pub static STRUCTURED: Format = Format {
    name: "cloudevents-structured",
    expects: "specversion 1.0, id, source, type and data holding a native event",
    trust: Trust::Signed,
    detect: |_, probe| probe.is_some_and(|p| p.has("specversion")),
    decode: structured,
};

pub static BINARY: Format = Format {
    name: "cloudevents-binary",
    expects: "ce_specversion, ce_id, ce_source and ce_type headers and a native event as payload",
    trust: Trust::Signed,
    detect: |m: &Incoming<'_>, _: Option<&Probe>| m.header("ce_specversion").is_some(),
    decode: binary,
};

#[derive(Deserialize)]
struct Envelope {
    specversion: Option<serde_json::Value>,
    id: Option<serde_json::Value>,
    source: Option<serde_json::Value>,
    #[serde(rename = "type")]
    kind: Option<serde_json::Value>,
    datacontenttype: Option<serde_json::Value>,
    data: Option<Box<serde_json::value::RawValue>>,
    data_base64: Option<serde_json::Value>,
    correlationid: Option<serde_json::Value>,
}

fn check_version(v: &str) -> Result<(), DecodeError> {
    if v != "1.0" {
        return Err(DecodeError::Field { field: "specversion", problem: format!("{v:?} is not supported; only CloudEvents 1.0 is") });
    }
    Ok(())
}

fn structured(msg: &Incoming<'_>) -> Result<LifecycleEvent, DecodeError> {
    let env: Envelope = format::parse(msg.payload)?;
    check_version(&string("specversion", env.specversion, 8)?)?;
    string("id", env.id, 256)?;
    string("source", env.source, 1024)?;
    string("type", env.kind, 256)?;
    if let Some(ct) = optional("datacontenttype", env.datacontenttype, 128)? {
        if !ct.starts_with("application/json") && !ct.ends_with("+json") {
            return Err(DecodeError::Field { field: "datacontenttype", problem: format!("{ct:?} is not JSON; data must be a native keywarden event") });
        }
    }
    let correlation = optional("correlationid", env.correlationid, 128)?;
    let data = match (env.data, env.data_base64) {
        (Some(raw), None) => raw.get().as_bytes().to_vec(),
        (None, Some(b64)) => {
            let text = b64.as_str().ok_or(DecodeError::Field { field: "data_base64", problem: "must be a string".into() })?;
            STANDARD.decode(text).map_err(|e| DecodeError::Field { field: "data_base64", problem: format!("is not base64 ({e})") })?
        }
        (Some(_), Some(_)) => return Err(DecodeError::Field { field: "data", problem: "and data_base64 are both set; a CloudEvent has one".into() }),
        (None, None) => return Err(DecodeError::Field { field: "data", problem: "is missing; it holds the native event".into() }),
    };
    with_correlation(native::decode(&data)?, correlation)
}

fn binary(msg: &Incoming<'_>) -> Result<LifecycleEvent, DecodeError> {
    let header = |name: &'static str, max: usize| -> Result<Option<String>, DecodeError> {
        match msg.header(name) {
            None => Ok(None),
            Some(v) => {
                let text = std::str::from_utf8(v).map_err(|_| DecodeError::Field { field: name, problem: "is not UTF-8".into() })?;
                format::valid_id(name, text, max)?;
                Ok(Some(text.to_string()))
            }
        }
    };
    let required = |name: &'static str, max: usize| header(name, max)?.ok_or(DecodeError::Field { field: name, problem: "header is missing".into() });
    check_version(&required("ce_specversion", 8)?)?;
    required("ce_id", 256)?;
    required("ce_source", 1024)?;
    required("ce_type", 256)?;
    let correlation = header("ce_correlationid", 128)?;
    with_correlation(native::decode(msg.payload)?, correlation)
}

/// The envelope's correlation id, unless the event carries its own.
fn with_correlation(mut event: LifecycleEvent, correlation: Option<String>) -> Result<LifecycleEvent, DecodeError> {
    if event.correlation_id.is_none() {
        event.correlation_id = correlation;
    }
    Ok(event)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::EventType;
    use crate::intake::format::decode;

    const NATIVE: &str = r#"{"event_id":"e-9","type":"disable","key_id":"k1","occurred_at":"2026-03-01T10:00:00Z"}"#;

    #[test]
    fn structured_mode_carries_a_native_event_in_data() {
        let payload = format!(
            r#"{{"specversion":"1.0","id":"ce-1","source":"/kms/eu","type":"com.example.key.disabled","datacontenttype":"application/json","correlationid":"corr-7","data":{NATIVE}}}"#
        );
        let d = decode(&Incoming { key: None, payload: payload.as_bytes(), headers: vec![] }).unwrap();
        assert_eq!(d.format.name, "cloudevents-structured");
        assert_eq!((d.event.event_id.as_str(), d.event.kind, d.event.correlation_id.as_deref()), ("e-9", EventType::Disable, Some("corr-7")));

        let b64 = STANDARD.encode(NATIVE);
        let payload = format!(r#"{{"specversion":"1.0","id":"ce-1","source":"/kms","type":"t","data_base64":"{b64}"}}"#);
        assert_eq!(decode(&Incoming { key: None, payload: payload.as_bytes(), headers: vec![] }).unwrap().event.key_id, "k1");
    }

    #[test]
    fn binary_mode_reads_attributes_from_ce_headers() {
        let headers = vec![("ce_specversion", &b"1.0"[..]), ("ce_id", b"ce-2"), ("ce_source", b"/kms"), ("ce_type", b"t"), ("ce_correlationid", b"c-1")];
        let d = decode(&Incoming { key: Some(b"k1"), payload: NATIVE.as_bytes(), headers }).unwrap();
        assert_eq!(d.format.name, "cloudevents-binary");
        assert_eq!(d.event.correlation_id.as_deref(), Some("c-1"));
    }

    #[test]
    fn invalid_envelopes_say_what_is_wrong() {
        let cases: &[(&str, &str)] = &[
            (r#"{"specversion":"0.3","id":"1","source":"s","type":"t","data":{}}"#, "only CloudEvents 1.0"),
            (r#"{"specversion":"1.0","source":"s","type":"t","data":{}}"#, "id is missing"),
            (r#"{"specversion":"1.0","id":"1","source":"s","type":"t"}"#, "data is missing"),
            (r#"{"specversion":"1.0","id":"1","source":"s","type":"t","datacontenttype":"text/xml","data":"<x/>"}"#, "is not JSON"),
            (r#"{"specversion":"1.0","id":"1","source":"s","type":"t","data":{"event_id":"e"}}"#, "type is missing"),
        ];
        for (payload, expected) in cases {
            let err = decode(&Incoming { key: None, payload: payload.as_bytes(), headers: vec![] }).err().unwrap().to_string();
            assert!(err.contains(expected) && err.contains("cloudevents"), "{err} should contain {expected}");
        }
        let headers = vec![("ce_specversion", &b"1.0"[..]), ("ce_id", b"x")];
        let err = decode(&Incoming { key: None, payload: NATIVE.as_bytes(), headers }).err().unwrap().to_string();
        assert!(err.contains("ce_source header is missing"), "{err}");
    }
}
