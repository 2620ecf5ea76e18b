//! keywarden's native event format:
//! `{"event_id", "type", "key_id", "key_version"?, "occurred_at"}`, JSON, ≤ 64 KiB.
//! Unknown fields are ignored so producers can add their own.

use chrono::{DateTime, Utc};
use serde::Deserialize;

use super::DecodeError;
use crate::engine::{EventType, LifecycleEvent};

pub const MAX_EVENT_BYTES: usize = 64 * 1024;

#[derive(Deserialize)]
struct Wire {
    event_id: Option<serde_json::Value>,
    #[serde(rename = "type")]
    kind: Option<serde_json::Value>,
    key_id: Option<serde_json::Value>,
    key_version: Option<serde_json::Value>,
    occurred_at: Option<serde_json::Value>,
}

fn string_field(name: &'static str, v: Option<serde_json::Value>, max: usize) -> Result<String, DecodeError> {
    let v = v.ok_or(DecodeError::Field { field: name, problem: "is missing".into() })?;
    let s = v.as_str().ok_or(DecodeError::Field { field: name, problem: "must be a string".into() })?;
    valid_id(name, s, max)?;
    Ok(s.to_string())
}

/// Ids end up in store keys, logs and headers: no control characters, bounded length.
pub fn valid_id(name: &'static str, s: &str, max: usize) -> Result<(), DecodeError> {
    let len = s.chars().count();
    if len == 0 || len > max {
        return Err(DecodeError::Field { field: name, problem: format!("must be 1-{max} characters, got {len}") });
    }
    if s.chars().any(char::is_control) {
        return Err(DecodeError::Field { field: name, problem: "must not contain control characters".into() });
    }
    Ok(())
}

pub fn decode(payload: &[u8]) -> Result<LifecycleEvent, DecodeError> {
    if payload.len() > MAX_EVENT_BYTES {
        return Err(DecodeError::TooLarge(payload.len()));
    }
    let wire: Wire = serde_json::from_slice(payload).map_err(|e| DecodeError::NotJson(e.to_string()))?;
    let event_id = string_field("event_id", wire.event_id, 128)?;
    let kind_text = string_field("type", wire.kind, 16)?;
    let kind = match kind_text.as_str() {
        "rotate" => EventType::Rotate,
        "disable" => EventType::Disable,
        "enable" => EventType::Enable,
        "delete" => EventType::Delete,
        "restore" => EventType::Restore,
        other => {
            return Err(DecodeError::Field {
                field: "type",
                problem: format!("{other:?} is not one of rotate, disable, enable, delete, restore"),
            })
        }
    };
    let key_id = string_field("key_id", wire.key_id, 256)?;
    let key_version = match wire.key_version {
        None | Some(serde_json::Value::Null) if kind == EventType::Rotate => {
            return Err(DecodeError::Field { field: "key_version", problem: "is required for rotate".into() })
        }
        None | Some(serde_json::Value::Null) => None,
        v => Some(string_field("key_version", v, 256)?),
    };
    let at_text = string_field("occurred_at", wire.occurred_at, 64)?;
    let occurred_at = DateTime::parse_from_rfc3339(&at_text)
        .map_err(|e| DecodeError::Field { field: "occurred_at", problem: format!("{at_text:?} is not RFC 3339 ({e})") })?
        .with_timezone(&Utc);
    Ok(LifecycleEvent { event_id, kind, key_id, key_version, occurred_at })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn valid_event_with_unknown_fields_decodes() {
        let e = decode(br#"{"event_id":"e1","type":"rotate","key_id":"k","key_version":"2","occurred_at":"2026-01-01T00:00:00+01:00","extra":[1]}"#)
            .unwrap();
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
            (br#"{"event_id":"e","type":"disable","key_id":"k","occurred_at":"yesterday"}"#, "not RFC 3339"),
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
