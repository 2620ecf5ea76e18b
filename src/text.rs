//! Small text helpers shared across the crate: URL segments and hex.

/// Percent-encodes everything but RFC 3986's unreserved characters, for ids
/// (CRNs, ARNs) placed in one URL path segment.
pub fn percent_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// Lowercase hex: digests, MACs and ids. Not `format!` per byte: that was
/// 32 allocations per digest, on every DEK fetch (the presented token's
/// digest) and twice per audit entry (B5).
pub fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(char::from(DIGITS[usize::from(b >> 4)]));
        s.push(char::from(DIGITS[usize::from(b & 0xf)]));
    }
    s
}

/// The bytes of a hex string (either case, as `u8::from_str_radix` reads
/// each pair); `None` for an odd length or a pair that is not hex.
pub fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len()).step_by(2).map(|i| s.get(i..i + 2).and_then(|b| u8::from_str_radix(b, 16).ok())).collect()
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_crn_becomes_one_path_segment() {
        assert_eq!(super::percent_encode("crn:v1:a/b c"), "crn%3Av1%3Aa%2Fb%20c");
    }

    #[test]
    fn hex_is_lowercase_two_digits_a_byte_and_reads_back() {
        let bytes = [0x00, 0x0f, 0xa5, 0xff];
        assert_eq!(super::hex(&bytes), "000fa5ff");
        assert_eq!(super::unhex("000fa5ff"), Some(bytes.to_vec()));
        assert_eq!(super::unhex("000fa5f"), None, "an odd length");
        assert_eq!(super::unhex("zz"), None);
        assert_eq!(super::unhex("é0"), None, "a multi-byte character");
    }
}
