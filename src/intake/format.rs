//! Format detection: every message is offered to each known format in turn and
//! the first that claims it decodes it. A format is one file beside this one
//! exporting a [`Format`]; adding one means adding it to [`FORMATS`] and
//! nothing else (the engine only ever sees a [`LifecycleEvent`]).

use std::fmt;

use chrono::{DateTime, Utc};
use serde::de::{self, Deserializer, IgnoredAny, MapAccess, Visitor};
use serde::Deserialize;

use super::{activity_tracker, cloudevents, eventbridge, native, DecodeError};
use crate::engine::LifecycleEvent;

/// Largest message any format accepts; checked before parsing anything.
pub const MAX_EVENT_BYTES: usize = 64 * 1024;

/// A Kafka message as the formats see it.
pub struct Incoming<'a> {
    pub key: Option<&'a [u8]>,
    pub payload: &'a [u8],
    pub headers: Vec<(&'a str, &'a [u8])>,
}

impl<'a> Incoming<'a> {
    pub fn header(&self, name: &str) -> Option<&'a [u8]> {
        self.headers.iter().rev().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| *v)
    }
}

pub struct Format {
    pub name: &'static str,
    /// What a message of this format looks like, for the dead-letter reason
    /// when no format claims a message.
    pub expects: &'static str,
    /// What vouches for this format's events.
    pub trust: Trust,
    /// Claims the message, cheaply; `probe` is the payload's top level when it
    /// is a JSON object.
    pub detect: fn(&Incoming<'_>, Option<&Probe>) -> bool,
    pub decode: fn(&Incoming<'_>) -> Result<LifecycleEvent, DecodeError>,
}

/// Who vouches for a format's events.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trust {
    /// Its producers sign it (keywarden's own formats): the signature decides.
    Signed,
    /// Its router cannot sign (EventBridge, Activity Tracker): an event is a
    /// hint, applied only as far as this KMS provider confirms it (see
    /// `confirm`).
    ConfirmedBy(&'static str),
}

/// Most specific first: binary CloudEvents are recognised by headers alone, and
/// the native format claims anything with an `event_id`.
pub const FORMATS: &[&Format] = &[&cloudevents::BINARY, &cloudevents::STRUCTURED, &eventbridge::FORMAT, &activity_tracker::FORMAT, &native::FORMAT];

pub struct Decoded {
    pub event: LifecycleEvent,
    pub format: &'static Format,
}

/// Which format the message is in; nothing is decoded yet, so that a signature
/// can be checked before any of the payload is believed.
pub fn detect(msg: &Incoming<'_>) -> Result<&'static Format, DecodeError> {
    if msg.payload.is_empty() {
        return Err(DecodeError::Empty);
    }
    if msg.payload.len() > MAX_EVENT_BYTES {
        return Err(DecodeError::TooLarge(msg.payload.len()));
    }
    let probe = match serde_json::from_slice::<Probe>(msg.payload) {
        Ok(p) => Some(p),
        Err(e) if e.is_data() && e.to_string().starts_with("duplicate field") => return Err(DecodeError::NotJson(e.to_string())),
        Err(_) => None,
    };
    FORMATS.iter().copied().find(|f| (f.detect)(msg, probe.as_ref())).ok_or_else(|| unknown(msg.payload, probe.is_some()))
}

/// Detects and decodes, without checking signatures (tests and tools).
pub fn decode(msg: &Incoming<'_>) -> Result<Decoded, DecodeError> {
    let format = detect(msg)?;
    let event = (format.decode)(msg).map_err(|e| e.in_format(format.name))?;
    Ok(Decoded { event, format })
}

fn unknown(payload: &[u8], object: bool) -> DecodeError {
    let expected: Vec<String> = FORMATS.iter().map(|f| format!("{} ({})", f.name, f.expects)).collect();
    let what = if object {
        "a JSON object that no format claims".to_string()
    } else {
        match serde_json::from_slice::<IgnoredAny>(payload) {
            Ok(_) => "JSON but not an object".to_string(),
            Err(e) => format!("not JSON ({e})"),
        }
    };
    DecodeError::UnknownFormat { what, expected: expected.join("; ") }
}

/// The top level of a JSON object: each field's name, and its value when that
/// is a short string. Enough to tell formats apart without decoding any of
/// them; a duplicated field is refused here, so no format has to guess which
/// copy counts.
#[derive(Default)]
pub struct Probe {
    fields: Vec<(String, Option<String>)>,
}

impl Probe {
    pub fn has(&self, name: &str) -> bool {
        self.fields.iter().any(|(k, _)| k == name)
    }

    pub fn str(&self, name: &str) -> Option<&str> {
        self.fields.iter().find(|(k, _)| k == name).and_then(|(_, v)| v.as_deref())
    }
}

impl<'de> Deserialize<'de> for Probe {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Probe;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Probe, A::Error> {
                let mut probe = Probe::default();
                while let Some(key) = map.next_key::<String>()? {
                    if probe.has(&key) {
                        return Err(de::Error::custom(format!("duplicate field `{key}`")));
                    }
                    let value = map.next_value::<Short>()?.0;
                    probe.fields.push((key, value));
                }
                Ok(probe)
            }
        }
        d.deserialize_map(V)
    }
}

/// A value kept only if it is a string of at most 256 characters.
struct Short(Option<String>);

impl<'de> Deserialize<'de> for Short {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Short;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("any JSON value")
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<Short, E> {
                Ok(Short((s.len() <= 256).then(|| s.to_string())))
            }
            fn visit_bool<E: de::Error>(self, _: bool) -> Result<Short, E> {
                Ok(Short(None))
            }
            fn visit_i64<E: de::Error>(self, _: i64) -> Result<Short, E> {
                Ok(Short(None))
            }
            fn visit_u64<E: de::Error>(self, _: u64) -> Result<Short, E> {
                Ok(Short(None))
            }
            fn visit_f64<E: de::Error>(self, _: f64) -> Result<Short, E> {
                Ok(Short(None))
            }
            fn visit_unit<E: de::Error>(self) -> Result<Short, E> {
                Ok(Short(None))
            }
            fn visit_seq<A: de::SeqAccess<'de>>(self, mut seq: A) -> Result<Short, A::Error> {
                while seq.next_element::<IgnoredAny>()?.is_some() {}
                Ok(Short(None))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Short, A::Error> {
                while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
                Ok(Short(None))
            }
        }
        d.deserialize_any(V)
    }
}

// ---- helpers the formats share ----

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

/// A required string field, checked as an id.
pub fn string(name: &'static str, v: Option<serde_json::Value>, max: usize) -> Result<String, DecodeError> {
    let v = v.ok_or(DecodeError::Field { field: name, problem: "is missing".into() })?;
    let s = v.as_str().ok_or(DecodeError::Field { field: name, problem: "must be a string".into() })?;
    valid_id(name, s, max)?;
    Ok(s.to_string())
}

/// An optional string field: absent and null are the same.
pub fn optional(name: &'static str, v: Option<serde_json::Value>, max: usize) -> Result<Option<String>, DecodeError> {
    match v {
        None | Some(serde_json::Value::Null) => Ok(None),
        v => string(name, v, max).map(Some),
    }
}

/// RFC 3339, and the variants KMS audit pipelines write: `+0000` offsets and
/// fractional seconds of any length.
pub fn timestamp(name: &'static str, text: &str) -> Result<DateTime<Utc>, DecodeError> {
    DateTime::parse_from_rfc3339(text)
        .or_else(|_| DateTime::parse_from_str(text, "%Y-%m-%dT%H:%M:%S%.f%z"))
        .map(|t| t.with_timezone(&Utc))
        .map_err(|e| DecodeError::Field { field: name, problem: format!("{text:?} is not an RFC 3339 time ({e})") })
}

pub fn parse<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, DecodeError> {
    serde_json::from_slice(bytes).map_err(|e| DecodeError::NotJson(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(payload: &[u8]) -> Incoming<'_> {
        Incoming { key: None, payload, headers: vec![] }
    }

    #[test]
    fn unknown_json_names_every_format_it_expected() {
        let err = decode(&msg(br#"{"hello":"world"}"#)).err().unwrap().to_string();
        for f in FORMATS {
            assert!(err.contains(f.name), "{err} names {}", f.name);
        }
        assert!(decode(&msg(b"[1,2]")).err().unwrap().to_string().contains("not an object"));
        assert!(decode(&msg(b"\xff\xfe")).err().unwrap().to_string().contains("not JSON"));
    }

    #[test]
    fn duplicate_top_level_fields_are_refused_before_any_format_decides() {
        let err =
            decode(&msg(br#"{"event_id":"a","event_id":"b","type":"disable","key_id":"k","occurred_at":"2026-01-01T00:00:00Z"}"#)).err().unwrap().to_string();
        assert!(err.contains("duplicate field"), "{err}");
    }

    #[test]
    fn timestamps_with_compact_offsets_parse() {
        assert_eq!(timestamp("t", "2020-04-17T14:23:29.00+0000").unwrap().to_rfc3339(), "2020-04-17T14:23:29+00:00");
        assert!(timestamp("t", "yesterday").is_err());
    }
}

/// Hostile input for the detector and every format's parser: generated, not
/// fuzzed, so that it runs in every `cargo test` (deterministic seed).
#[cfg(test)]
mod hostile {
    use super::*;
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    const SAMPLES: &[&str] = &[
        r#"{"event_id":"e-1","type":"rotate","key_id":"k","key_version":"2","occurred_at":"2026-01-01T00:00:00Z"}"#,
        r#"{"specversion":"1.0","id":"c","source":"/s","type":"t","data":{"event_id":"e","type":"disable","key_id":"k","occurred_at":"2026-01-01T00:00:00Z"}}"#,
        r#"{"version":"0","id":"i","detail-type":"KMS CMK Rotation","source":"aws.kms","account":"1","time":"2019-05-13T17:28:29Z","region":"us-west-2","resources":["arn:aws:kms:us-west-2:1:key/k"],"detail":{"key-id":"k"}}"#,
        r#"{"id":"i","detail-type":"AWS API Call via CloudTrail","source":"aws.kms","time":"2020-07-25T23:41:56Z","resources":[],"detail":{"eventName":"DisableKey","requestParameters":{"keyId":"arn:aws:kms:r:1:key/k"},"requestID":"q"}}"#,
        r#"{"action":"kms.secrets.disable","outcome":"success","eventTime":"2026-03-01T10:15:30.12+0000","correlationId":"c","target":{"id":"crn:v1:bluemix:public:kms:us-south:a/x:y:key:z"}}"#,
    ];

    /// Header names and values as bytes on the wire: some names are not UTF-8
    /// (one is a real name with a bad byte in front), some values are missing.
    fn headers(rng: &mut StdRng) -> Vec<(Vec<u8>, Option<Vec<u8>>)> {
        let names: [&[u8]; 10] = [
            b"ce_specversion",
            b"ce_id",
            b"ce_source",
            b"ce_type",
            b"ce_correlationid",
            b"keywarden-signature",
            b"\xff\xfe",
            b"\xc3(",
            b"\x80keywarden-signature",
            b"traceparent",
        ];
        let values: [Option<&[u8]>; 8] =
            [Some(b"1.0"), Some(b""), Some(b"\xff\xfe"), Some(b"0.3"), Some(b"kid=local;sig=AAAA"), Some(b"x"), None, Some(b"00-\xff-01")];
        (0..rng.gen_range(0..5)).map(|_| (names[rng.gen_range(0..names.len())].to_vec(), values[rng.gen_range(0..values.len())].map(<[u8]>::to_vec))).collect()
    }

    fn payload(rng: &mut StdRng, n: usize) -> Vec<u8> {
        let sample = SAMPLES[rng.gen_range(0..SAMPLES.len())].as_bytes();
        match n % 10 {
            0 => (0..rng.gen_range(0..256)).map(|_| rng.gen()).collect(),
            1 => sample[..rng.gen_range(0..sample.len())].to_vec(),
            2 => {
                let depth = rng.gen_range(1..5000);
                let open = ["[", "{\"a\":"][rng.gen_range(0..2)];
                let mut v = format!("{{\"event_id\":{}", open.repeat(depth)).into_bytes();
                v.extend(b"1");
                v
            }
            3 => {
                // Every top-level field of a sample replaced by a value of the wrong type.
                let junk = ["1", "true", "null", "[]", "{}", "\"\"", "-0.5e999", "[[[[]]]]"];
                let mut v: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(sample).unwrap();
                for val in v.values_mut() {
                    if rng.gen_bool(0.5) {
                        *val = serde_json::from_str(junk[rng.gen_range(0..junk.len())]).unwrap_or(serde_json::Value::Null);
                    }
                }
                serde_json::to_vec(&v).unwrap()
            }
            4 => {
                let len = rng.gen_range(0..400);
                let id: String = (0..len).map(|_| char::from_u32(rng.gen_range(0..0x2FFFF)).unwrap_or('\u{fffd}')).collect();
                let text = String::from_utf8_lossy(sample)
                    .replace("\"k\"", &serde_json::to_string(&id).unwrap())
                    .replace("\"c\"", &serde_json::to_string(&id).unwrap());
                text.into_bytes()
            }
            5 => {
                // A duplicated field, at the top or nested.
                let text = String::from_utf8_lossy(sample);
                let i = text.find(',').unwrap_or(1);
                format!("{}{}", &text[..i + 1], &text[1..]).into_bytes()
            }
            6 => {
                let mut v = sample.to_vec();
                for _ in 0..rng.gen_range(1..8) {
                    let i = rng.gen_range(0..v.len());
                    v[i] = rng.gen();
                }
                v
            }
            7 => {
                let times =
                    ["2026-13-01T00:00:00Z", "0000-00-00", "2026-01-01T00:00:00+25:00", "9999-12-31T23:59:59Z", "2026-01-01T00:00:00.1234567891234+0000"];
                let t = times[rng.gen_range(0..times.len())];
                String::from_utf8_lossy(sample)
                    .replace("2026-01-01T00:00:00Z", t)
                    .replace("2019-05-13T17:28:29Z", t)
                    .replace("2026-03-01T10:15:30.12+0000", t)
                    .into_bytes()
            }
            8 => vec![b'"'; rng.gen_range(MAX_EVENT_BYTES - 10..MAX_EVENT_BYTES + 10)],
            _ => sample.to_vec(),
        }
    }

    /// 120,000 hostile inputs across every format: none panics, and each is
    /// either an event or has a reason for the dead-letter header.
    #[test]
    fn hostile_inputs_never_panic_and_always_get_a_reason() {
        let mut rng = StdRng::seed_from_u64(0x6b77);
        let (mut rejected, mut decoded, mut bad_names) = (0, 0, 0);
        for n in 0..120_000 {
            let payload = payload(&mut rng, n);
            let headers = headers(&mut rng);
            bad_names += usize::from(headers.iter().any(|(name, _)| std::str::from_utf8(name).is_err()));
            let raw: Vec<_> = headers.iter().map(|(name, value)| crate::intake::headers::RawHeader { name, value: value.as_deref() }).collect();
            let read = || {
                let msg = Incoming { key: None, payload: &payload, headers: crate::intake::headers::checked(&raw)? };
                decode(&msg).map(|d| d.format.name)
            };
            match std::panic::catch_unwind(read) {
                Ok(Ok(_)) => decoded += 1,
                Ok(Err(reason)) => {
                    assert!(!reason.to_string().is_empty() && !reason.class().is_empty());
                    rejected += 1;
                }
                Err(_) => panic!("panicked on input #{n}: {:?}", String::from_utf8_lossy(&payload[..payload.len().min(200)])),
            }
        }
        assert!(rejected > 60_000 && decoded > 1_000, "rejected {rejected}, decoded {decoded}");
        assert!(bad_names > 10_000, "only {bad_names} inputs had a header name that is not UTF-8");
        // A 10 MB string is refused by size before any parsing.
        let huge = format!(r#"{{"event_id":"{}"}}"#, "x".repeat(10 << 20));
        assert!(matches!(decode(&Incoming { key: None, payload: huge.as_bytes(), headers: vec![] }), Err(DecodeError::TooLarge(_))));
    }
}
