//! Per-instance DEK credentials: a random token handed out once (at creation
//! and at each rotation), of which keywarden keeps only the SHA-256, and the
//! check of a DEK request against the instance it names. A holder of one
//! instance's credential reaches that instance only; a wrong credential and an
//! unknown instance get the same 401, so the endpoint does not tell which
//! instances exist.

use base64::{engine::general_purpose::URL_SAFE_NO_PAD, Engine};
use chrono::{DateTime, Utc};
use rand::RngCore;
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

use crate::engine::DekCredential;
use crate::text::hex;

/// A credential just made: the token for the caller (said once, never kept)
/// and what the instance record keeps of it.
pub struct Issued {
    pub token: Zeroizing<String>,
    pub credential: DekCredential,
}

/// 32 bytes from the OS (256 bits: no one guesses it, so a plain SHA-256 of
/// it is as good as a slow password hash), as unpadded base64url, which needs
/// no escaping in a header or a file. The id is 8 other random bytes: it names
/// the credential in the audit trail and derives nothing from the token.
pub fn issue(at: DateTime<Utc>) -> Issued {
    let mut raw = Zeroizing::new([0u8; 32]);
    rand::rngs::OsRng.fill_bytes(raw.as_mut());
    let token = Zeroizing::new(URL_SAFE_NO_PAD.encode(raw.as_ref()));
    let mut id = [0u8; 8];
    rand::rngs::OsRng.fill_bytes(&mut id);
    let credential = DekCredential { id: hex(&id), sha256: hex(&digest(&token)), issued_at: at };
    Issued { token, credential }
}

/// The SHA-256 of a presented bearer token (as the tokens files are compared:
/// surrounding whitespace is not part of it).
pub fn digest(token: &str) -> [u8; 32] {
    Sha256::digest(token.trim().as_bytes()).into()
}

/// Whether `presented` (a bearer token's digest) is the digest `credential`
/// keeps, compared without an early exit. `None` (no credential, or an unknown
/// instance) is compared too, against a digest no token has, so that the time
/// taken does not tell an unknown instance from a wrong token.
pub fn admits(credential: Option<&DekCredential>, presented: &[u8; 32]) -> bool {
    let presented = hex(presented);
    let (kept, real) = match credential {
        Some(c) if c.sha256.len() == presented.len() => (c.sha256.as_bytes(), true),
        _ => (NO_TOKEN.as_bytes(), false),
    };
    let differs = kept.iter().zip(presented.as_bytes()).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    differs == 0 && real
}

/// Not hex: equal to no digest.
const NO_TOKEN: &str = "----------------------------------------------------------------";

/// Who opened a DEK, for its release audit: never the token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Opener {
    /// The instance's own credential, by id.
    Credential(String),
    /// A client certificate whose identity (a URI SAN) maps to the instance.
    Certificate(String),
    /// The legacy shared DEK token (`api.shared_dek_token`).
    Shared,
}

impl Opener {
    /// As the release audit's `detail` says it.
    pub fn describe(&self) -> String {
        match self {
            Opener::Credential(id) => format!("dek credential {id}"),
            Opener::Certificate(uri) => format!("client certificate {uri}"),
            Opener::Shared => "shared dek token".to_string(),
        }
    }
}

/// `api.client_identity`: a URI with one `{instance}` in it, such as
/// `spiffe://keywarden/instance/{instance}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdentityPattern {
    prefix: String,
    suffix: String,
}

impl IdentityPattern {
    /// `None` for an empty pattern (identity mapping off) or one without
    /// exactly one `{instance}` (which config validation refuses first).
    pub fn parse(pattern: &str) -> Option<IdentityPattern> {
        let (prefix, suffix) = pattern.split_once(PLACEHOLDER)?;
        if suffix.contains(PLACEHOLDER) {
            return None;
        }
        Some(IdentityPattern { prefix: prefix.to_string(), suffix: suffix.to_string() })
    }

    /// The instance a certificate's URI names under this pattern, if any.
    /// Compared later with the instance id as the route decoded it, so that
    /// what was authorized is exactly what is served.
    pub fn instance_of<'u>(&self, uri: &'u str) -> Option<&'u str> {
        uri.strip_prefix(&self.prefix)?.strip_suffix(&self.suffix).filter(|id| !id.is_empty())
    }
}

pub const PLACEHOLDER: &str = "{instance}";

/// What a DEK request came with, found by the auth layer and checked by the
/// handler against the instance the route names (only the handler has the id
/// as the router decoded it, and the instance's record).
#[derive(Debug, Clone, Default)]
pub struct Presented {
    /// SHA-256 of the bearer token, if one was sent.
    pub bearer: Option<[u8; 32]>,
    /// The bearer is the shared DEK token, and `api.shared_dek_token` is on.
    pub shared: bool,
    /// (instance, URI) for each URI SAN of the verified client certificate
    /// that `api.client_identity` maps to an instance.
    pub identities: Vec<(String, String)>,
}

impl Presented {
    /// Who may open `instance_id`'s DEK with what was presented, if anyone:
    /// its own credential, a certificate mapped to it, or the shared token.
    /// `credential` is `None` for an unknown instance or one without a
    /// credential; the comparison runs all the same.
    pub fn opener(&self, instance_id: &str, credential: Option<&DekCredential>) -> Option<Opener> {
        let own = self.bearer.as_ref().is_some_and(|d| admits(credential, d));
        if let (true, Some(c)) = (own, credential) {
            return Some(Opener::Credential(c.id.clone()));
        }
        if let Some((_, uri)) = self.identities.iter().find(|(id, _)| id == instance_id) {
            return Some(Opener::Certificate(uri.clone()));
        }
        self.shared.then_some(Opener::Shared)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_issued_token_is_256_random_bits_and_only_its_hash_is_kept() {
        let a = issue(Utc::now());
        let b = issue(Utc::now());
        assert_eq!(URL_SAFE_NO_PAD.decode(a.token.as_str()).unwrap().len(), 32);
        assert_ne!(a.token.as_str(), b.token.as_str());
        assert_ne!(a.credential.id, b.credential.id);
        assert_eq!(a.credential.sha256.len(), 64);
        let kept = serde_json::to_string(&a.credential).unwrap();
        assert!(!kept.contains(a.token.as_str()), "the record holds no token: {kept}");
        assert!(!format!("{:?}", a.credential).contains(&a.credential.sha256), "Debug shows the id only");
        assert!(admits(Some(&a.credential), &digest(&a.token)));
        // With the whitespace a token file may end with.
        assert!(admits(Some(&a.credential), &digest(&format!("{}\n", a.token.as_str()))));
    }

    #[test]
    fn a_wrong_or_other_instances_credential_is_refused_as_an_unknown_instance_is() {
        let a = issue(Utc::now());
        let b = issue(Utc::now());
        let with = |token: &str| Presented { bearer: Some(digest(token)), ..Default::default() };
        assert_eq!(with(&a.token).opener("a", Some(&a.credential)), Some(Opener::Credential(a.credential.id.clone())));
        assert_eq!(with(&b.token).opener("a", Some(&a.credential)), None, "B's credential does not open A");
        assert_eq!(with("not-a-token").opener("a", Some(&a.credential)), None);
        assert_eq!(with(&a.token).opener("nope", None), None, "an unknown instance");
        assert_eq!(Presented::default().opener("a", Some(&a.credential)), None, "no token at all");
        // A stored hash that is not one (a damaged record) opens nothing and does not panic.
        let damaged = DekCredential { sha256: "xyz".into(), ..a.credential.clone() };
        assert_eq!(with(&a.token).opener("a", Some(&damaged)), None);
    }

    #[test]
    fn a_rotated_credential_no_longer_opens_the_instance() {
        let old = issue(Utc::now());
        let new = issue(Utc::now());
        let presented = Presented { bearer: Some(digest(&old.token)), ..Default::default() };
        assert!(presented.opener("a", Some(&old.credential)).is_some());
        assert_eq!(presented.opener("a", Some(&new.credential)), None);
    }

    #[test]
    fn a_certificate_identity_opens_only_the_instance_it_maps_to() {
        let p = IdentityPattern::parse("spiffe://keywarden/instance/{instance}").unwrap();
        assert_eq!(p.instance_of("spiffe://keywarden/instance/db-a"), Some("db-a"));
        assert_eq!(p.instance_of("spiffe://keywarden/instance/"), None);
        assert_eq!(p.instance_of("spiffe://other/instance/db-a"), None);
        let suffixed = IdentityPattern::parse("urn:{instance}:db").unwrap();
        assert_eq!(suffixed.instance_of("urn:x:db"), Some("x"));
        assert_eq!(suffixed.instance_of("urn:x:dbs"), None);
        assert_eq!(IdentityPattern::parse(""), None);
        assert_eq!(IdentityPattern::parse("spiffe://keywarden/{instance}/{instance}"), None);

        let uri = "spiffe://keywarden/instance/db-a".to_string();
        let cert = Presented { identities: vec![("db-a".into(), uri.clone())], ..Default::default() };
        let a = issue(Utc::now());
        assert_eq!(cert.opener("db-a", Some(&a.credential)), Some(Opener::Certificate(uri)));
        assert_eq!(cert.opener("db-b", Some(&a.credential)), None, "mapped to db-a, not db-b");
        assert_eq!(cert.opener("db-b", None), None);
    }

    #[test]
    fn the_shared_token_opens_only_when_it_was_presented_and_is_on() {
        let shared = Presented { shared: true, ..Default::default() };
        assert_eq!(shared.opener("any", None), Some(Opener::Shared));
        assert_eq!(Opener::Shared.describe(), "shared dek token");
        assert_eq!(Opener::Credential("0a1b".into()).describe(), "dek credential 0a1b");
    }
}
