//! Message headers, read without trusting them. Kafka header names are bytes on
//! the wire; rdkafka 0.37's header iterator turns each name into `&str` with an
//! `unwrap`, so one message whose header name is not UTF-8 panicked the daemon
//! before any signature check, and again after every restart (the offset was
//! never stored). Headers are therefore read here straight from librdkafka, as
//! bytes, and checked by a pure function that refuses what no format can use
//! with a reason, so the message is dead-lettered and intake goes on.

use rdkafka::message::BorrowedMessage;

use super::DecodeError;

/// One header as it came off the wire: the name's bytes (up to a NUL, which
/// librdkafka's C strings cannot carry) and the value's bytes, if any.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RawHeader<'a> {
    pub name: &'a [u8],
    pub value: Option<&'a [u8]>,
}

/// Most headers any message of ours carries is a handful (CloudEvents binary
/// mode has the most); many more is someone probing, and decoding each is work.
pub const MAX_HEADERS: usize = 64;

/// Every header of `msg`, in order, as bytes. Never panics, whatever the bytes.
pub fn raw<'a>(msg: &'a BorrowedMessage<'_>) -> Vec<RawHeader<'a>> {
    use rdkafka::bindings as rd;
    let mut headers: *mut rd::rd_kafka_headers_t = std::ptr::null_mut();
    // SAFETY: `msg.ptr()` is the live native message `msg` borrows; librdkafka
    // hands back its own header list (not a copy), valid while the message is,
    // which the returned slices' lifetime `'a` (tied to `msg`) guarantees.
    let err = unsafe { rd::rd_kafka_message_headers(msg.ptr(), &mut headers) };
    if err != rd::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR || headers.is_null() {
        return Vec::new();
    }
    // SAFETY: `headers` is the non-null list checked above.
    let count = unsafe { rd::rd_kafka_header_cnt(headers) };
    let mut out = Vec::with_capacity(count.min(MAX_HEADERS + 1));
    for idx in 0..count {
        let (mut name, mut value, mut size) = (std::ptr::null(), std::ptr::null(), 0usize);
        // SAFETY: idx < count; the out-pointers are valid locals. librdkafka
        // sets `name` to a NUL-terminated string and `value` to `size` bytes
        // (or null), both owned by the header list.
        let err = unsafe { rd::rd_kafka_header_get_all(headers, idx, &mut name, &mut value, &mut size) };
        if err != rd::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR || name.is_null() {
            continue;
        }
        // SAFETY: as above; the bytes live as long as the message.
        let name: &'a [u8] = unsafe { std::ffi::CStr::from_ptr(name) }.to_bytes();
        let value: Option<&'a [u8]> = if value.is_null() {
            None
        } else {
            // SAFETY: librdkafka reports `size` readable bytes at `value`.
            Some(unsafe { std::slice::from_raw_parts(value.cast::<u8>(), size) })
        };
        out.push(RawHeader { name, value });
    }
    out
}

/// The headers as the formats read them: names as text, values as bytes (a
/// missing value reads as empty). Refuses, with the header's position and a
/// printable form of its name, a name that is not UTF-8 or too many headers:
/// no format reads such a header, and guessing what it meant would let a
/// producer smuggle one header past a check under a name that looks like another.
pub fn checked<'a>(raw: &[RawHeader<'a>]) -> Result<Vec<(&'a str, &'a [u8])>, DecodeError> {
    if raw.len() > MAX_HEADERS {
        return Err(DecodeError::Header { index: MAX_HEADERS, problem: format!("message has {} headers; at most {MAX_HEADERS} are read", raw.len()) });
    }
    raw.iter()
        .enumerate()
        .map(|(index, h)| match std::str::from_utf8(h.name) {
            Ok(name) => Ok((name, h.value.unwrap_or_default())),
            Err(_) => Err(DecodeError::Header { index, problem: format!("name {} is not UTF-8; header names must be text", printable(h.name)) }),
        })
        .collect()
}

/// A byte string for a log line or a dead-letter reason: text stays text,
/// anything else is escaped, and it is cut short.
pub fn printable(bytes: &[u8]) -> String {
    let cut = &bytes[..bytes.len().min(64)];
    let mut s: String = cut.escape_ascii().to_string();
    if bytes.len() > cut.len() {
        s.push('…');
    }
    format!("\"{s}\"")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_header_name_that_is_not_utf8_is_refused_with_its_position() {
        let raw = [RawHeader { name: b"ce_id", value: Some(b"1") }, RawHeader { name: b"\xff\xfekeywarden", value: Some(b"x") }];
        let err = checked(&raw).unwrap_err();
        assert_eq!(err.class(), "invalid_header");
        let text = err.to_string();
        assert!(text.contains("header 1") && text.contains("\\xff\\xfekeywarden"), "{text}");
    }

    #[test]
    fn values_of_any_bytes_and_missing_values_pass_as_bytes() {
        let raw = [RawHeader { name: b"a", value: Some(b"\xff\x00\xfe") }, RawHeader { name: b"b", value: None }];
        assert_eq!(checked(&raw).unwrap(), vec![("a", &b"\xff\x00\xfe"[..]), ("b", &b""[..])]);
    }

    #[test]
    fn too_many_headers_are_refused() {
        let raw = vec![RawHeader { name: b"h", value: None }; MAX_HEADERS + 1];
        assert!(checked(&raw).is_err());
        assert!(checked(&raw[..MAX_HEADERS]).is_ok());
    }
}
