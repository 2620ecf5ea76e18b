//! keywarden's native event format:
//! `{"event_id", "type", "key_id", "key_version"?, "occurred_at", "correlation_id"?}`,
//! JSON, ≤ 64 KiB.
//! Unknown fields are ignored so producers can add their own.

use serde::Deserialize;

use super::format::{self, optional, string, timestamp, Format, Incoming, Probe, Trust};
use super::DecodeError;
use crate::engine::{EventType, LifecycleEvent};

pub use super::format::MAX_EVENT_BYTES;

pub static FORMAT: Format = Format {
    name: "native",
    expects: "event_id, type, key_id, key_version for rotate, occurred_at",
    trust: Trust::Signed,
    detect,
    decode: |m| decode(m.payload),
};

fn detect(_: &Incoming<'_>, probe: Option<&Probe>) -> bool {
    probe.is_some_and(|p| p.has("event_id") || p.has("key_id"))
}

#[derive(Deserialize)]
struct Wire {
    event_id: Option<serde_json::Value>,
    #[serde(rename = "type")]
    kind: Option<serde_json::Value>,
    key_id: Option<serde_json::Value>,
    key_version: Option<serde_json::Value>,
    occurred_at: Option<serde_json::Value>,
    correlation_id: Option<serde_json::Value>,
}

pub fn kind(text: &str) -> Result<EventType, DecodeError> {
    Ok(match text {
        "rotate" => EventType::Rotate,
        "disable" => EventType::Disable,
        "enable" => EventType::Enable,
        "delete" => EventType::Delete,
        "restore" => EventType::Restore,
        other => return Err(DecodeError::Field { field: "type", problem: format!("{other:?} is not one of rotate, disable, enable, delete, restore") }),
    })
}

pub fn decode(payload: &[u8]) -> Result<LifecycleEvent, DecodeError> {
    if payload.len() > MAX_EVENT_BYTES {
        return Err(DecodeError::TooLarge(payload.len()));
    }
    let wire: Wire = format::parse(payload)?;
    let event_id = string("event_id", wire.event_id, 128)?;
    let kind = kind(&string("type", wire.kind, 16)?)?;
    let key_id = string("key_id", wire.key_id, 256)?;
    let key_version = optional("key_version", wire.key_version, 256)?;
    if kind == EventType::Rotate && key_version.is_none() {
        return Err(DecodeError::Field { field: "key_version", problem: "is required for rotate".into() });
    }
    let occurred_at = timestamp("occurred_at", &string("occurred_at", wire.occurred_at, 64)?)?;
    let correlation_id = optional("correlation_id", wire.correlation_id, 128)?;
    Ok(LifecycleEvent { event_id, kind, key_id, key_version, occurred_at, correlation_id, traceparent: None, material_destroyed: false })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn valid_event_with_unknown_fields_decodes() {
        let e = decode(br#"{"event_id":"e1","type":"rotate","key_id":"k","key_version":"2","occurred_at":"2026-01-01T00:00:00+01:00","extra":[1]}"#).unwrap();
        assert_eq!(e.kind, EventType::Rotate);
        assert_eq!(e.key_version.as_deref(), Some("2"));
        assert_eq!(e.occurred_at.to_rfc3339(), "2025-12-31T23:00:00+00:00");
    }

    #[test]
    fn each_bad_input_names_what_is_wrong() {
        let cases: &[(&[u8], &str)] = &[
            (b"not json", "not JSON"),
            (br#"{"type":"disable","key_id":"k","occurred_at":"2026-01-01T00:00:00Z"}"#, "event_id is missing"),
            (br#"{"event_id":"e","type":"explode","key_id":"k","occurred_at":"2026-01-01T00:00:00Z"}"#, "not one of"),
            (br#"{"event_id":"e","type":"rotate","key_id":"k","occurred_at":"2026-01-01T00:00:00Z"}"#, "key_version is required"),
            (br#"{"event_id":"e","type":"disable","key_id":"","occurred_at":"2026-01-01T00:00:00Z"}"#, "key_id must be 1-256"),
            (br#"{"event_id":"e","type":"disable","key_id":"k","occurred_at":"yesterday"}"#, "not an RFC 3339"),
            (br#"{"event_id":7,"type":"disable","key_id":"k","occurred_at":"2026-01-01T00:00:00Z"}"#, "must be a string"),
        ];
        for (input, expected) in cases {
            let err = decode(input).unwrap_err().to_string();
            assert!(err.contains(expected), "{err} should contain {expected}");
        }
        let big = vec![b' '; MAX_EVENT_BYTES + 1];
        assert!(matches!(decode(&big), Err(DecodeError::TooLarge(_))));
    }
}
