//! The instance record's stored form: binary, not JSON.
//!
//! Instances are nearly all of a large store (a million of them is ~95% of
//! its bytes), and sled 0.34 splits its leaves at about 1 KiB and keeps per-page
//! state in memory for every page of the store, touched or not: its memory
//! grows with the store's bytes, whatever `store.cache_capacity` says. The JSON
//! form (field names, RFC 3339 times, base64 ciphertext) was ~400 bytes; this
//! one is ~150, so a store of the same instances has ~2.5× fewer pages, and a
//! rewrap encodes and decodes less.
//!
//! Layout, after the tag byte `FORM` (JSON records start with `{`, so a store
//! written before this form still reads; a record is rewritten in this form the
//! next time it changes): the fields in declaration order; a string or byte
//! string is a LEB128 length and its bytes; a time is its Unix seconds (i64)
//! and nanoseconds (u32), little-endian; an option is a byte 0 or 1 and then the
//! value; `data_plane`, rare and still evolving, is its JSON as a byte string.
//! A new field means a new tag, never a reinterpretation of this one.

use chrono::{DateTime, Utc};

use super::StoreError;
use crate::engine::{DekCredential, InstanceRecord, WrappedDek};

/// The first byte of an instance record in this form.
const FORM: u8 = 1;

/// The instance's stored bytes.
pub fn encode_instance(inst: &InstanceRecord) -> Vec<u8> {
    let mut w = Writer(Vec::with_capacity(192));
    w.0.push(FORM);
    w.str(&inst.instance_id);
    w.str(&inst.key_id);
    w.option(inst.wrapped.as_ref(), |w, d| {
        w.str(&d.key_version);
        w.bytes(&d.ciphertext);
    });
    w.str(&inst.key_version);
    w.str(&inst.dek_fingerprint);
    w.time(&inst.created_at);
    w.time(&inst.updated_at);
    w.option(inst.destroyed_at.as_ref(), Writer::time);
    w.option(inst.destroyed_reason.as_deref(), Writer::str);
    w.option(inst.rewrap_error.as_deref(), Writer::str);
    w.option(inst.credential.as_ref(), |w, c| {
        w.str(&c.id);
        w.str(&c.sha256);
        w.time(&c.issued_at);
    });
    // Plain data (strings, enums, times): serializing it has no failure mode.
    w.option(inst.data_plane.as_ref(), |w, s| w.bytes(&serde_json::to_vec(s).unwrap_or_default()));
    w.0
}

/// An instance record in this form or, written before it, in JSON. Anything
/// else, or trailing bytes, is corrupt: nothing is decided on it.
pub fn decode_instance(key: &[u8], bytes: &[u8]) -> Result<InstanceRecord, StoreError> {
    let corrupt = |reason: &str| StoreError::Corrupt { key: String::from_utf8_lossy(key).into_owned(), reason: reason.to_string() };
    match bytes.first() {
        Some(&FORM) => read(&bytes[1..]).ok_or_else(|| corrupt("a truncated or malformed instance record")),
        _ => serde_json::from_slice(bytes).map_err(|e| corrupt(&e.to_string())),
    }
}

fn read(bytes: &[u8]) -> Option<InstanceRecord> {
    let mut r = Reader(bytes);
    let inst = InstanceRecord {
        instance_id: r.string()?,
        key_id: r.string()?,
        wrapped: r.option(|r| Some(WrappedDek { key_version: r.string()?, ciphertext: r.bytes()?.to_vec() }))?,
        key_version: r.string()?,
        dek_fingerprint: r.string()?,
        created_at: r.time()?,
        updated_at: r.time()?,
        destroyed_at: r.option(Reader::time)?,
        destroyed_reason: r.option(Reader::string)?,
        rewrap_error: r.option(Reader::string)?,
        credential: r.option(|r| Some(DekCredential { id: r.string()?, sha256: r.string()?, issued_at: r.time()? }))?,
        data_plane: r.option(|r| serde_json::from_slice(r.bytes()?).ok())?,
    };
    r.0.is_empty().then_some(inst)
}

struct Writer(Vec<u8>);

impl Writer {
    fn len(&mut self, mut n: usize) {
        while n >= 0x80 {
            self.0.push((n as u8 & 0x7f) | 0x80);
            n >>= 7;
        }
        self.0.push(n as u8);
    }

    fn bytes(&mut self, b: &[u8]) {
        self.len(b.len());
        self.0.extend_from_slice(b);
    }

    fn str(&mut self, s: &str) {
        self.bytes(s.as_bytes());
    }

    fn time(&mut self, t: &DateTime<Utc>) {
        self.0.extend_from_slice(&t.timestamp().to_le_bytes());
        self.0.extend_from_slice(&t.timestamp_subsec_nanos().to_le_bytes());
    }

    fn option<T: ?Sized>(&mut self, v: Option<&T>, write: impl FnOnce(&mut Self, &T)) {
        match v {
            None => self.0.push(0),
            Some(v) => {
                self.0.push(1);
                write(self, v);
            }
        }
    }
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let (head, rest) = (self.0.get(..n)?, self.0.get(n..)?);
        self.0 = rest;
        Some(head)
    }

    /// At most five bytes (a u32): a longer one is corrupt, not a huge allocation.
    fn len(&mut self) -> Option<usize> {
        let mut n: u64 = 0;
        for shift in (0..35).step_by(7) {
            let b = *self.take(1)?.first()?;
            n |= u64::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                return usize::try_from(u32::try_from(n).ok()?).ok();
            }
        }
        None
    }

    fn bytes(&mut self) -> Option<&'a [u8]> {
        let n = self.len()?;
        self.take(n)
    }

    fn string(&mut self) -> Option<String> {
        std::str::from_utf8(self.bytes()?).ok().map(str::to_string)
    }

    fn time(&mut self) -> Option<DateTime<Utc>> {
        let secs = i64::from_le_bytes(self.take(8)?.try_into().ok()?);
        let nanos = u32::from_le_bytes(self.take(4)?.try_into().ok()?);
        DateTime::from_timestamp(secs, nanos)
    }

    fn option<T>(&mut self, read: impl FnOnce(&mut Self) -> Option<T>) -> Option<Option<T>> {
        match *self.take(1)?.first()? {
            0 => Some(None),
            1 => read(self).map(Some),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::{CommandAction, DataPlaneOutcome, DataPlaneStatus};

    fn at(secs: i64, nanos: u32) -> DateTime<Utc> {
        DateTime::from_timestamp(secs, nanos).unwrap()
    }

    fn plain() -> InstanceRecord {
        InstanceRecord {
            instance_id: "s0000-0000000".into(),
            key_id: "s0000".into(),
            wrapped: Some(WrappedDek { key_version: "1".into(), ciphertext: vec![7; 60] }),
            key_version: "1".into(),
            dek_fingerprint: "6c92521a9c4a0a099ff7b27f84626afb".into(),
            created_at: at(1_796_292_068, 372_882_709),
            updated_at: at(1_796_292_068, 372_882_709),
            destroyed_at: None,
            destroyed_reason: None,
            rewrap_error: None,
            credential: None,
            data_plane: None,
        }
    }

    fn full() -> InstanceRecord {
        InstanceRecord {
            wrapped: None,
            destroyed_at: Some(at(-1, 999_999_999)),
            destroyed_reason: Some("purged: ünïcode and a long reason ".repeat(20)),
            rewrap_error: Some(String::new()),
            credential: Some(DekCredential { id: "cred-1".into(), sha256: "ab".repeat(32), issued_at: at(0, 0) }),
            data_plane: Some(DataPlaneStatus {
                command_id: "c-1".into(),
                action: CommandAction::Revoke,
                outcome: DataPlaneOutcome::Enforced,
                at: at(5, 6),
                detail: Some("stopped".into()),
                received_at: at(7, 8),
            }),
            ..plain()
        }
    }

    #[test]
    fn every_field_survives_the_round_trip_to_the_nanosecond() {
        for inst in [plain(), full()] {
            let bytes = encode_instance(&inst);
            assert_eq!(decode_instance(b"i/x", &bytes).unwrap(), inst);
        }
    }

    #[test]
    fn the_form_is_much_smaller_than_the_json_it_replaces() {
        let inst = plain();
        let (binary, json) = (encode_instance(&inst).len(), serde_json::to_vec(&inst).unwrap().len());
        assert!(binary * 5 < json * 2, "{binary} bytes against JSON's {json}");
    }

    #[test]
    fn a_record_written_as_json_before_this_form_still_reads() {
        let inst = full();
        assert_eq!(decode_instance(b"i/x", &serde_json::to_vec(&inst).unwrap()).unwrap(), inst);
    }

    #[test]
    fn every_truncation_and_trailing_byte_is_corrupt_and_none_panics() {
        let bytes = encode_instance(&full());
        for n in 0..bytes.len() {
            assert!(matches!(decode_instance(b"i/x", &bytes[..n]), Err(StoreError::Corrupt { .. })), "prefix of {n} bytes");
        }
        let mut longer = bytes.clone();
        longer.push(0);
        assert!(matches!(decode_instance(b"i/x", &longer), Err(StoreError::Corrupt { .. })));
    }

    #[test]
    fn arbitrary_bytes_after_the_tag_never_panic() {
        // A length that claims more than is there, a six-byte length, a bad
        // option tag, invalid UTF-8, nanoseconds out of range.
        let cases: [&[u8]; 5] = [&[FORM, 0xff, 0xff, 0xff, 0x0f], &[FORM, 0x80, 0x80, 0x80, 0x80, 0x80, 0x01], &[FORM, 0, 0, 2], &[FORM, 1, 0xff], &[FORM; 64]];
        for c in cases {
            assert!(decode_instance(b"i/x", c).is_err(), "{c:?}");
        }
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        for _ in 0..2000 {
            let len = (x % 200) as usize;
            let mut v = vec![FORM];
            for _ in 0..len {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                v.push(x as u8);
            }
            // Decoding must answer, never panic; random bytes almost never form a record.
            let decoded = decode_instance(b"i/x", &v);
            if let Ok(inst) = decoded {
                assert_eq!(decode_instance(b"i/x", &encode_instance(&inst)).unwrap(), inst);
            }
        }
    }
}
