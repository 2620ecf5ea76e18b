//! keywarden's native event format:
//! `{"event_id", "type", "key_id", "key_version"?, "occurred_at", "correlation_id"?}`,
//! JSON, ≤ 64 KiB.
//! Unknown fields are ignored so producers can add their own.

use serde::Deserialize;

use super::format::{self, optional, string, timestamp, Format, Incoming, Probe};
use super::DecodeError;
use crate::engine::{EventType, LifecycleEvent};

pub use super::format::MAX_EVENT_BYTES;

pub static FORMAT: Format = Format {
    name: "native",
    expects: "event_id, type, key_id, key_version for rotate, occurred_at",
    signed: true,
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
        other => {
            return Err(DecodeError::Field {
                field: "type",
                problem: format!("{other:?} is not one of rotate, disable, enable, delete, restore"),
            })
        }
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
    Ok(LifecycleEvent { event_id, kind, key_id, key_version, occurred_at, correlation_id, material_destroyed: false })
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

#[cfg(test)]
mod hostile {
    use super::*;
    use rand::{Rng, SeedableRng};

    fn generate(rng: &mut rand::rngs::StdRng, n: usize) -> Vec<u8> {
        let valid = br#"{"event_id":"e-1","type":"rotate","key_id":"k","key_version":"2","occurred_at":"2026-01-01T00:00:00Z"}"#;
        match n % 9 {
            // Random bytes.
            0 => (0..rng.gen_range(0..256)).map(|_| rng.gen()).collect(),
            // Truncated valid JSON.
            1 => valid[..rng.gen_range(0..valid.len())].to_vec(),
            // Deep nesting.
            2 => {
                let depth = rng.gen_range(1..5000);
                let mut v = "[".repeat(depth).into_bytes();
                v.extend("]".repeat(depth).into_bytes());
                v
            }
            // Wrong types in every field.
            3 => {
                let junk = ["1", "true", "null", "[]", "{}", "\"\"", "-0.5e999"];
                let pick = |r: &mut rand::rngs::StdRng| junk[r.gen_range(0..junk.len())];
                format!(
                    r#"{{"event_id":{},"type":{},"key_id":{},"key_version":{},"occurred_at":{}}}"#,
                    pick(rng),
                    pick(rng),
                    pick(rng),
                    pick(rng),
                    pick(rng)
                )
                .into_bytes()
            }
            // Unicode ids, including control characters and very long ones.
            4 => {
                let len = rng.gen_range(0..400);
                let id: String = (0..len).map(|_| char::from_u32(rng.gen_range(0..0x2FFFF)).unwrap_or('\u{fffd}')).collect();
                serde_json::to_vec(&serde_json::json!({"event_id": id, "type": "disable", "key_id": id, "occurred_at": "2026-01-01T00:00:00Z"})).unwrap()
            }
            // Duplicate fields.
            5 => br#"{"event_id":"a","event_id":"b","type":"disable","type":"enable","key_id":"k","occurred_at":"2026-01-01T00:00:00Z"}"#.to_vec(),
            // Random mutations of a valid event.
            6 => {
                let mut v = valid.to_vec();
                for _ in 0..rng.gen_range(1..8) {
                    let i = rng.gen_range(0..v.len());
                    v[i] = rng.gen();
                }
                v
            }
            // Odd timestamps and types.
            7 => format!(
                r#"{{"event_id":"e","type":"{}","key_id":"k","key_version":"1","occurred_at":"{}"}}"#,
                ["rotate", "ROTATE", "disable ", "", "delete"][rng.gen_range(0..5)],
                ["2026-13-01T00:00:00Z", "0000-00-00", "2026-01-01T00:00:00+25:00", "2026-01-01T00:00:00Z", "9999-12-31T23:59:59Z"][rng.gen_range(0..5)]
            )
            .into_bytes(),
            // Oversized payloads.
            _ => vec![b'"'; rng.gen_range(MAX_EVENT_BYTES - 10..MAX_EVENT_BYTES + 10)],
        }
    }

    /// 100,000 hostile inputs: none panics, and each is either an event or has a
    /// reason that can go in the dead-letter header.
    #[test]
    fn hostile_inputs_never_panic_and_always_get_a_reason() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(0x6b77);
        let mut rejected = 0;
        for n in 0..100_000 {
            let input = generate(&mut rng, n);
            match std::panic::catch_unwind(|| decode(&input)) {
                Ok(Ok(_)) => {}
                Ok(Err(reason)) => {
                    assert!(!reason.to_string().is_empty());
                    rejected += 1;
                }
                Err(_) => panic!("decoder panicked on input #{n}: {:?}", String::from_utf8_lossy(&input[..input.len().min(200)])),
            }
        }
        assert!(rejected > 50_000, "most hostile inputs are rejected ({rejected})");
        // A 10 MB string is refused by size before any parsing.
        let huge = format!(r#"{{"event_id":"{}"}}"#, "x".repeat(10 << 20));
        assert!(matches!(decode(huge.as_bytes()), Err(DecodeError::TooLarge(_))));
    }
}
