//! Event authenticity. A message in a format its producer can sign (native,
//! CloudEvents) carries a `keywarden-signature` header, `kid=<key id>;sig=<base64>`,
//! over the exact payload bytes. The key id picks one of the configured keys,
//! and that key's configured algorithm decides how to check it: the message
//! never chooses the algorithm. Several keys may be valid at once, which is how
//! a key is rolled over.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use ed25519_dalek::{Signer as _, Verifier as _};
use hmac::{Hmac, Mac};
use rand::RngCore;
use sha2::Sha256;
use zeroize::Zeroizing;

use super::format::Incoming;
use crate::config::{SignatureAlgorithm, SignaturesConfig};

pub const HEADER: &str = "keywarden-signature";

#[derive(Debug, thiserror::Error)]
pub enum SignatureError {
    #[error("{format} message has no {HEADER} header; sign it (keywarden event sign) or set signatures.required = false")]
    Unsigned { format: &'static str },
    #[error("{HEADER} header is malformed ({0}); expected kid=<key id>;sig=<base64>")]
    Malformed(String),
    #[error("signature names key {kid:?}, which is not configured for topic {topic}; add it to signatures.keys")]
    UnknownKey { kid: String, topic: String },
    #[error("signature by key {kid:?} does not match the payload: forged or altered")]
    Forged { kid: String },
    #[error("cannot load signature key {id} from {path}: {problem}")]
    Key { id: String, path: String, problem: String },
}

impl SignatureError {
    pub fn class(&self) -> &'static str {
        match self {
            SignatureError::Unsigned { .. } => "unsigned",
            SignatureError::Malformed(_) => "malformed_signature",
            SignatureError::UnknownKey { .. } => "unknown_signing_key",
            SignatureError::Forged { .. } => "forged",
            SignatureError::Key { .. } => "signature_key",
        }
    }

    /// Whether this is someone trying something, as opposed to a setup mistake.
    pub fn is_security_event(&self) -> bool {
        !matches!(self, SignatureError::Key { .. })
    }
}

enum Material {
    Hmac(Zeroizing<Vec<u8>>),
    Ed25519(ed25519_dalek::VerifyingKey),
}

struct Key {
    id: String,
    material: Material,
    /// Empty: every topic.
    topics: Vec<String>,
}

pub struct Verifier {
    required: bool,
    keys: Vec<Key>,
}

impl Verifier {
    pub fn load(config: &SignaturesConfig) -> Result<Verifier, SignatureError> {
        let mut keys = Vec::new();
        if !config.hmac_key_file.as_os_str().is_empty() {
            let secret = load_or_create_hmac(&config.hmac_key_id, &config.hmac_key_file)?;
            keys.push(Key { id: config.hmac_key_id.clone(), material: Material::Hmac(secret), topics: vec![] });
        }
        for k in &config.keys {
            let material = match k.algorithm {
                SignatureAlgorithm::HmacSha256 => Material::Hmac(read_hmac(&k.id, &k.file)?),
                SignatureAlgorithm::Ed25519 => Material::Ed25519(read_ed25519_public(&k.id, &k.file)?),
            };
            keys.push(Key { id: k.id.clone(), material, topics: k.topics.clone() });
        }
        Ok(Verifier { required: config.required, keys })
    }

    /// One key, read from its file (never created), that a signature must be
    /// made with: for checking one message by hand (`keywarden command
    /// verify`), with the same check the intake makes.
    pub fn single(id: &str, algorithm: SignatureAlgorithm, path: &Path) -> Result<Verifier, SignatureError> {
        let material = match algorithm {
            SignatureAlgorithm::HmacSha256 => Material::Hmac(read_hmac(id, path)?),
            SignatureAlgorithm::Ed25519 => Material::Ed25519(read_ed25519_public(id, path)?),
        };
        Ok(Verifier { required: true, keys: vec![Key { id: id.to_string(), material, topics: vec![] }] })
    }

    /// Checks the message's signature. A format that can be signed must be when
    /// signatures are required; a signature that is present is always checked.
    pub fn check(&self, topic: &str, msg: &Incoming<'_>, format: &'static str, signable: bool) -> Result<(), SignatureError> {
        let Some(header) = msg.header(HEADER) else {
            return if self.required && signable { Err(SignatureError::Unsigned { format }) } else { Ok(()) };
        };
        let (kid, sig) = parse_header(header)?;
        let key = self
            .keys
            .iter()
            .find(|k| k.id == kid && (k.topics.is_empty() || k.topics.iter().any(|t| t == topic)))
            .ok_or_else(|| SignatureError::UnknownKey { kid: kid.clone(), topic: topic.to_string() })?;
        let valid = match &key.material {
            Material::Hmac(secret) => {
                let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("hmac takes any key length");
                mac.update(msg.payload);
                mac.verify_slice(&sig).is_ok()
            }
            Material::Ed25519(public) => ed25519_dalek::Signature::from_slice(&sig).is_ok_and(|s| public.verify(msg.payload, &s).is_ok()),
        };
        if valid {
            Ok(())
        } else {
            Err(SignatureError::Forged { kid })
        }
    }
}

fn parse_header(value: &[u8]) -> Result<(String, Vec<u8>), SignatureError> {
    let text = std::str::from_utf8(value).map_err(|_| SignatureError::Malformed("not UTF-8".into()))?;
    let (mut kid, mut sig) = (None, None);
    for part in text.split(';') {
        match part.trim().split_once('=') {
            Some(("kid", v)) if kid.is_none() => kid = Some(v.to_string()),
            Some(("sig", v)) if sig.is_none() => sig = Some(v),
            _ => return Err(SignatureError::Malformed(format!("unexpected part {:?}", part.chars().take(40).collect::<String>()))),
        }
    }
    let kid = kid.filter(|k| !k.is_empty() && k.len() <= 128).ok_or_else(|| SignatureError::Malformed("no kid".into()))?;
    let sig = STANDARD
        .decode(sig.ok_or_else(|| SignatureError::Malformed("no sig".into()))?)
        .map_err(|e| SignatureError::Malformed(format!("sig is not base64: {e}")))?;
    Ok((kid, sig))
}

/// Signs payloads: the daemon its own events (the embedded KMS) and its
/// data-plane commands, and `keywarden event sign|emit` test events.
pub struct Signer {
    id: String,
    key: SigningKey,
}

enum SigningKey {
    Hmac(Zeroizing<Vec<u8>>),
    Ed25519(Box<ed25519_dalek::SigningKey>),
}

impl Signer {
    /// The configured HMAC key, if there is one.
    pub fn from_config(config: &SignaturesConfig) -> Result<Option<Signer>, SignatureError> {
        if config.hmac_key_file.as_os_str().is_empty() {
            return Ok(None);
        }
        let secret = load_or_create_hmac(&config.hmac_key_id, &config.hmac_key_file)?;
        Ok(Some(Signer { id: config.hmac_key_id.clone(), key: SigningKey::Hmac(secret) }))
    }

    /// An HMAC-SHA256 signer over a secret already in hand.
    pub fn hmac(id: &str, secret: &[u8]) -> Signer {
        Signer { id: id.to_string(), key: SigningKey::Hmac(Zeroizing::new(secret.to_vec())) }
    }

    /// A key given on the command line: an HMAC secret, or an Ed25519 private
    /// key (base64 of its 32-byte seed).
    pub fn from_file(id: &str, algorithm: SignatureAlgorithm, path: &Path) -> Result<Signer, SignatureError> {
        let key = match algorithm {
            SignatureAlgorithm::HmacSha256 => SigningKey::Hmac(read_hmac(id, path)?),
            SignatureAlgorithm::Ed25519 => {
                let seed = read_base64_32(id, path, "an Ed25519 private key (base64 of its 32-byte seed)")?;
                SigningKey::Ed25519(Box::new(ed25519_dalek::SigningKey::from_bytes(&seed)))
            }
        };
        Ok(Signer { id: id.to_string(), key })
    }

    /// The header value for `payload`.
    pub fn sign(&self, payload: &[u8]) -> String {
        let sig = match &self.key {
            SigningKey::Hmac(secret) => {
                let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("hmac takes any key length");
                mac.update(payload);
                mac.finalize().into_bytes().to_vec()
            }
            SigningKey::Ed25519(k) => k.sign(payload).to_bytes().to_vec(),
        };
        format!("kid={};sig={}", self.id, STANDARD.encode(sig))
    }
}

/// A new Ed25519 key pair, base64: (private seed, public key).
pub fn ed25519_keypair() -> (Zeroizing<String>, String) {
    let key = ed25519_dalek::SigningKey::generate(&mut rand::rngs::OsRng);
    (Zeroizing::new(STANDARD.encode(key.to_bytes())), STANDARD.encode(key.verifying_key().to_bytes()))
}

fn key_error(id: &str, path: &Path, problem: impl Into<String>) -> SignatureError {
    SignatureError::Key { id: id.to_string(), path: path.display().to_string(), problem: problem.into() }
}

/// A systemd credential of the same file name wins, as for the API tokens.
fn credential_or(path: &Path) -> std::path::PathBuf {
    if let (Ok(dir), Some(name)) = (std::env::var("CREDENTIALS_DIRECTORY"), path.file_name()) {
        let cred = Path::new(&dir).join(name);
        if cred.exists() {
            return cred;
        }
    }
    path.to_path_buf()
}

/// Whether `load_or_create_secret` would read the secret rather than create it.
pub fn secret_exists(path: &Path) -> bool {
    credential_or(path).exists()
}

/// The file's text, trimmed, is the secret; at least 32 bytes of it.
fn read_hmac(id: &str, path: &Path) -> Result<Zeroizing<Vec<u8>>, SignatureError> {
    let text = Zeroizing::new(std::fs::read_to_string(credential_or(path)).map_err(|e| key_error(id, path, e.to_string()))?);
    let secret = Zeroizing::new(text.trim().as_bytes().to_vec());
    if secret.len() < 32 {
        return Err(key_error(id, path, "an HMAC secret must be at least 32 characters"));
    }
    Ok(secret)
}

fn load_or_create_hmac(id: &str, path: &Path) -> Result<Zeroizing<Vec<u8>>, SignatureError> {
    load_or_create_secret(id, path, "created an event signing secret (mode 0600); give it to the producers of the events topic")
}

/// A secret of at least 32 characters from the file (or the systemd credential
/// of its name); a missing file is created with a random one, and `created`
/// is logged to say who needs a copy.
pub fn load_or_create_secret(id: &str, path: &Path, created: &str) -> Result<Zeroizing<Vec<u8>>, SignatureError> {
    if credential_or(path).exists() {
        return read_hmac(id, path);
    }
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| key_error(id, path, e.to_string()))?;
    }
    let mut raw = Zeroizing::new([0u8; 32]);
    rand::rngs::OsRng.fill_bytes(raw.as_mut());
    let secret = Zeroizing::new(STANDARD.encode(raw.as_ref()));
    let mut f = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(path).map_err(|e| key_error(id, path, e.to_string()))?;
    f.write_all(format!("{}\n", secret.as_str()).as_bytes()).map_err(|e| key_error(id, path, e.to_string()))?;
    tracing::warn!(path = %path.display(), key_id = id, "{created}");
    Ok(Zeroizing::new(secret.as_bytes().to_vec()))
}

fn read_base64_32(id: &str, path: &Path, what: &str) -> Result<[u8; 32], SignatureError> {
    let text = Zeroizing::new(std::fs::read_to_string(credential_or(path)).map_err(|e| key_error(id, path, e.to_string()))?);
    let bytes = Zeroizing::new(STANDARD.decode(text.trim()).map_err(|_| key_error(id, path, format!("must hold {what}")))?);
    bytes.as_slice().try_into().map_err(|_| key_error(id, path, format!("must hold {what}")))
}

fn read_ed25519_public(id: &str, path: &Path) -> Result<ed25519_dalek::VerifyingKey, SignatureError> {
    let raw = read_base64_32(id, path, "an Ed25519 public key (base64 of 32 bytes)")?;
    ed25519_dalek::VerifyingKey::from_bytes(&raw).map_err(|e| key_error(id, path, format!("is not a valid Ed25519 public key: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::SignatureKey;

    fn msg<'a>(payload: &'a [u8], header: Option<&'a str>) -> Incoming<'a> {
        Incoming { key: None, payload, headers: header.map(|h| vec![(HEADER, h.as_bytes())]).unwrap_or_default() }
    }

    fn setup(dir: &Path) -> (SignaturesConfig, Signer, Signer) {
        let (private, public) = ed25519_keypair();
        std::fs::write(dir.join("ed.key"), private.as_bytes()).unwrap();
        std::fs::write(dir.join("ed.pub"), public).unwrap();
        std::fs::write(dir.join("old.hmac"), "an-older-secret-that-is-still-valid-for-rollover").unwrap();
        let config = SignaturesConfig {
            required: true,
            hmac_key_id: "current".into(),
            hmac_key_file: dir.join("current.hmac"),
            keys: vec![
                SignatureKey { id: "old".into(), algorithm: SignatureAlgorithm::HmacSha256, file: dir.join("old.hmac"), topics: vec![] },
                SignatureKey { id: "partner".into(), algorithm: SignatureAlgorithm::Ed25519, file: dir.join("ed.pub"), topics: vec!["events".into()] },
            ],
            ..SignaturesConfig::default()
        };
        let old = Signer::from_file("old", SignatureAlgorithm::HmacSha256, &dir.join("old.hmac")).unwrap();
        let partner = Signer::from_file("partner", SignatureAlgorithm::Ed25519, &dir.join("ed.key")).unwrap();
        (config, old, partner)
    }

    #[test]
    fn hmac_and_ed25519_signatures_verify_and_two_keys_may_be_valid_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let (config, old, partner) = setup(dir.path());
        let verifier = Verifier::load(&config).unwrap();
        let current = Signer::from_config(&config).unwrap().unwrap();
        let payload = br#"{"event_id":"e"}"#;
        for signer in [&current, &old, &partner] {
            let h = signer.sign(payload);
            verifier.check("events", &msg(payload, Some(&h)), "native", true).unwrap();
        }
        // The created secret is private to the daemon's user.
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(std::fs::metadata(dir.path().join("current.hmac")).unwrap().permissions().mode() & 0o777, 0o600);
    }

    #[test]
    fn unsigned_forged_and_misplaced_messages_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let (config, old, partner) = setup(dir.path());
        let verifier = Verifier::load(&config).unwrap();
        let payload = br#"{"event_id":"e","type":"disable"}"#;
        let check = |p: &[u8], h: Option<&str>, topic: &str| verifier.check(topic, &msg(p, h), "native", true).unwrap_err().class();
        assert_eq!(check(payload, None, "events"), "unsigned");
        let altered = br#"{"event_id":"e","type":"delete!"}"#;
        assert_eq!(check(altered, Some(&old.sign(payload)), "events"), "forged");
        assert_eq!(check(altered, Some(&partner.sign(payload)), "events"), "forged");
        // The Ed25519 key is configured for one topic only.
        assert_eq!(check(payload, Some(&partner.sign(payload)), "other"), "unknown_signing_key");
        assert_eq!(check(payload, Some("kid=nobody;sig=AAAA"), "events"), "unknown_signing_key");
        assert_eq!(check(payload, Some("sig=AAAA"), "events"), "malformed_signature");
        assert_eq!(check(payload, Some("kid=old;sig=***"), "events"), "malformed_signature");
        // A signature is not required of formats whose producers cannot sign.
        verifier.check("events", &msg(payload, None), "eventbridge", false).unwrap();
        // And nothing is required when signatures are off.
        let off = Verifier::load(&SignaturesConfig { required: false, ..config }).unwrap();
        off.check("events", &msg(payload, None), "native", true).unwrap();
    }
}
