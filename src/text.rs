//! Small text helpers shared by the CLI and the KMS clients.

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

#[cfg(test)]
mod tests {
    #[test]
    fn a_crn_becomes_one_path_segment() {
        assert_eq!(super::percent_encode("crn:v1:a/b c"), "crn%3Av1%3Aa%2Fb%20c");
    }
}
