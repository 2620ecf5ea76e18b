//! act: the KMS seam. The engine never talks to a KMS; the rotation worker and the
//! API do, through the [`Kms`] trait.
//!
//! A provider is one file beside `local.rs` that owns everything about it: its
//! `[kms.<name>]` config section (a serde struct, `deny_unknown_fields`, with
//! documented defaults), that section's `validate()`, and a `build` that makes
//! the `Arc<dyn Kms>`, behind its own [`governor::Governed`] for a remote KMS.
//! Adding a provider touches, besides its own file exporting a
//! `pub static PROVIDER: Provider`:
//!
//! 1. one line in [`PROVIDERS`], the table `Config::validate` and the daemon's
//!    router iterate (and whose names are the ones `kms.default` and a route's
//!    `provider` may use), so that neither names a provider itself;
//! 2. one field in [`KmsConfig`] for its section, named like the provider (and
//!    its line in `KmsConfig::default`), so that the `[kms]` TOML layout stays
//!    one struct that serde checks whole.
//!
//! The embedded `local` provider is the exception: it needs the store, so the
//! daemon opens it itself and it is not in the table; its section is still its own.

pub mod aws;
pub mod cache;
pub mod governor;
pub mod keyprotect;
pub mod local;
pub mod router;
pub mod vault;

use std::fmt;
use std::sync::Arc;

use rand::RngCore;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

use self::aws::AwsKmsConfig;
use self::keyprotect::KeyProtectConfig;
use self::local::LocalKmsConfig;
use self::vault::VaultKmsConfig;
use crate::config::ConfigError;
use crate::engine::{KeyStatus, Notice, WrappedDek};
use crate::store::StoreError;

/// A remote KMS provider, as `Config::validate` and the daemon see it.
pub struct Provider {
    /// What `kms.default` and a route's `provider` call it; also the name of its
    /// `[kms.<name>]` section and what its [`Kms::provider`] answers.
    pub name: &'static str,
    /// Checks the provider's section, whether or not the provider is used, so
    /// that a bad value fails at start rather than when a route first names it.
    pub validate: fn(&KmsConfig) -> Result<(), ConfigError>,
    /// Makes the provider, behind its own governor; called only when it is used.
    pub build: fn(&KmsConfig) -> Result<Arc<dyn Kms>, KmsError>,
}

/// Every remote provider. The order is the order their sections are checked
/// in and the order they are named in errors.
pub const PROVIDERS: &[&Provider] = &[&aws::PROVIDER, &vault::PROVIDER, &keyprotect::PROVIDER];

/// The names `kms.default` and routes may use: the embedded provider's, then the table's.
pub fn provider_names() -> impl Iterator<Item = &'static str> {
    std::iter::once(local::NAME).chain(PROVIDERS.iter().map(|p| p.name))
}

/// The `[kms]` section: routing, and one field per provider holding that
/// provider's own section (defined in its file), named like the provider.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct KmsConfig {
    /// Provider for keys that match no route: "local", "aws" or "vault".
    pub default: String,
    /// Key-id prefixes routed to a provider, first match wins.
    pub routes: Vec<KmsRoute>,
    pub local: LocalKmsConfig,
    pub aws: AwsKmsConfig,
    pub vault: VaultKmsConfig,
    pub keyprotect: KeyProtectConfig,
}

impl Default for KmsConfig {
    fn default() -> Self {
        Self {
            default: local::NAME.into(),
            routes: Vec::new(),
            local: LocalKmsConfig::default(),
            aws: AwsKmsConfig::default(),
            vault: VaultKmsConfig::default(),
            keyprotect: KeyProtectConfig::default(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KmsRoute {
    pub prefix: String,
    pub provider: String,
    /// Give the provider the key id without the prefix ("vault:orders" → "orders").
    #[serde(default)]
    pub strip_prefix: bool,
}

impl KmsConfig {
    /// Whether a provider serves any key: the default or a route names it.
    pub fn uses(&self, provider: &str) -> bool {
        self.default == provider || self.routes.iter().any(|r| r.provider == provider)
    }

    /// Routing, then each remote provider's section; `[kms.local]` is checked by
    /// `Config::validate` itself, where it always was.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let names: Vec<&str> = provider_names().collect();
        for (field, name) in std::iter::once(("kms.default", &self.default)).chain(self.routes.iter().map(|r| ("kms.routes.provider", &r.provider))) {
            if !names.contains(&name.as_str()) {
                return Err(ConfigError::invalid(field, name, format!("one of {}", names.join(", "))));
            }
        }
        if self.routes.iter().any(|r| r.prefix.is_empty()) {
            return Err(ConfigError::invalid("kms.routes.prefix", "", "a non-empty key-id prefix such as \"arn:aws:kms:\""));
        }
        PROVIDERS.iter().try_for_each(|p| (p.validate)(self))
    }
}

/// A plaintext data-encryption key. Zeroed on drop; never printed.
#[derive(Clone)]
pub struct Dek(Zeroizing<[u8; 32]>);

impl Dek {
    pub fn generate() -> Dek {
        let mut bytes = Zeroizing::new([0u8; 32]);
        rand::rngs::OsRng.fill_bytes(bytes.as_mut());
        Dek(bytes)
    }

    pub fn from_slice(bytes: &[u8]) -> Option<Dek> {
        let arr: [u8; 32] = bytes.try_into().ok()?;
        Some(Dek(Zeroizing::new(arr)))
    }

    pub fn expose(&self) -> &[u8; 32] {
        &self.0
    }

    /// Proves two DEKs are the same without revealing either: a domain-separated
    /// SHA-256, truncated. A 256-bit random key cannot be recovered from it.
    pub fn fingerprint(&self) -> String {
        let mut h = Sha256::new();
        h.update(b"keywarden dek fingerprint v1\0");
        h.update(self.0.as_ref());
        let digest = h.finalize();
        crate::text::hex(&digest[..16])
    }
}

impl fmt::Debug for Dek {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Dek(<redacted>)")
    }
}

#[derive(Debug, thiserror::Error)]
pub enum KmsError {
    #[error("key {0} does not exist in the KMS; create it first or check the key id")]
    UnknownKey(String),
    #[error("key {0} is disabled in the KMS; enable it to use its DEKs")]
    KeyDisabled(String),
    #[error("key {0} is deleted in the KMS; restore it within the restore window to use its DEKs")]
    KeyDeleted(String),
    /// The embedded KMS destroyed the key's material when its restore window
    /// ended: not a state a restore or an enable can leave.
    #[error(
        "the material of key {key_id} was destroyed at {}, when its restore window ended; nothing it wrapped can be unwrapped again: create a new key for new data",
        .at.to_rfc3339()
    )]
    MaterialDestroyed { key_id: String, at: chrono::DateTime<chrono::Utc> },
    #[error("key {key_id} has no version {version}; the wrapped DEK belongs to another key")]
    UnknownVersion { key_id: String, version: String },
    #[error("wrapped DEK does not authenticate under key {0}; it was altered or belongs to another instance")]
    Integrity(String),
    #[error("{0}")]
    Conflict(String),
    #[error("kms is throttling: {0}; keywarden backs off and retries")]
    Throttled(String),
    #[error("kms refused the request: {0}")]
    Refused(String),
    #[error("kms is unavailable: {0}; it will be retried")]
    Unavailable(String),
    #[error("kms configuration: {0}")]
    Setup(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl KmsError {
    /// Transient failures are retried with backoff; the rest fail the instance.
    pub fn retryable(&self) -> bool {
        matches!(self, KmsError::Unavailable(_) | KmsError::Throttled(_))
    }

    /// The key is not usable right now: it may be again (enable, restore),
    /// except once its material is destroyed. Either way nothing is gained by
    /// retrying a call now, nor is it a failure of one instance.
    pub fn key_unusable(&self) -> bool {
        matches!(self, KmsError::KeyDisabled(_) | KmsError::KeyDeleted(_) | KmsError::MaterialDestroyed { .. })
    }

    /// A short, fixed label for metrics.
    pub fn class(&self) -> &'static str {
        match self {
            KmsError::UnknownKey(_) => "unknown_key",
            KmsError::KeyDisabled(_) => "key_disabled",
            KmsError::KeyDeleted(_) => "key_deleted",
            KmsError::MaterialDestroyed { .. } => "material_destroyed",
            KmsError::UnknownVersion { .. } => "unknown_version",
            KmsError::Integrity(_) => "integrity",
            KmsError::Conflict(_) => "conflict",
            KmsError::Throttled(_) => "throttled",
            KmsError::Refused(_) => "refused",
            KmsError::Unavailable(_) => "unavailable",
            KmsError::Setup(_) => "setup",
            KmsError::Store(_) => "store",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KmsKeyState {
    pub status: KeyStatus,
    pub latest_version: String,
    /// Past its expiration date (Key Protect's Deactivated): the key still
    /// unwraps and rewraps, so its DEKs are served, but it wraps nothing new
    /// and the customer should rotate or replace it. Reconciliation alerts.
    pub expired: bool,
    /// The KMS no longer knows the key (Key Protect's 404 after a purge): its
    /// material is destroyed and nothing it wrapped can be unwrapped again.
    pub material_destroyed: bool,
}

/// A KMS's deadline for acknowledging an event (Key Protect: 4 hours).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NoticeDeadline {
    pub deadline: std::time::Duration,
    /// An unsent acknowledgement this old raises an alert, well before the deadline.
    pub warn_after: std::time::Duration,
}

impl KmsKeyState {
    /// A key in `status`, neither expired nor destroyed.
    pub fn new(status: KeyStatus, latest_version: impl Into<String>) -> KmsKeyState {
        KmsKeyState { status, latest_version: latest_version.into(), expired: false, material_destroyed: false }
    }
}

/// What keywarden needs of any KMS. `rewrap` never hands the plaintext to the
/// caller, so remote providers can rewrap server-side.
#[async_trait::async_trait]
pub trait Kms: Send + Sync {
    fn provider(&self) -> &'static str;
    /// The provider that serves this key: a router is no provider itself, and
    /// metrics labelled "router" would hide which KMS is slow.
    fn provider_for(&self, _key_id: &str) -> &'static str {
        self.provider()
    }
    /// `label` is keywarden's current version of the key: a provider that does
    /// not expose versions (AWS rotates inside the key) names the wrapping with it.
    async fn wrap(&self, key_id: &str, dek: &Dek, aad: &[u8], label: Option<&str>) -> Result<WrappedDek, KmsError>;
    async fn unwrap(&self, key_id: &str, wrapped: &WrappedDek, aad: &[u8]) -> Result<Dek, KmsError>;
    /// `label` is the version the rotation moves to, with the same use as in `wrap`.
    async fn rewrap(&self, key_id: &str, wrapped: &WrappedDek, aad: &[u8], label: Option<&str>) -> Result<WrappedDek, KmsError>;
    async fn key_state(&self, key_id: &str) -> Result<KmsKeyState, KmsError>;
    /// Tells the KMS what it asked to be told (registrations, acknowledgements).
    /// Most providers do not care.
    async fn notify(&self, _key_id: &str, _notice: &Notice) -> Result<(), KmsError> {
        Ok(())
    }
    /// Whether `notify` does anything for this key. Notices for a provider that
    /// ignores them are not queued at all: each would cost a store write and a
    /// removal (two per rewrap in a rotation) for nothing.
    fn wants_notices(&self, _key_id: &str) -> bool {
        false
    }
    /// How long the KMS gives an acknowledgement, and when keywarden alerts
    /// that one is still unsent; `None`: it sets no deadline.
    fn notice_deadline(&self, _key_id: &str) -> Option<NoticeDeadline> {
        None
    }
    /// Asks the KMS to re-send the key's last lifecycle event.
    async fn sync(&self, key_id: &str) -> Result<(), KmsError> {
        Err(KmsError::Conflict(format!("the {} kms has no sync; key {key_id} cannot be synced", self.provider())))
    }
    /// Limits and breaker state, for providers behind a governor.
    fn health(&self) -> Option<governor::GovernorState> {
        None
    }
}

/// A shared provider is a provider: lets a governor wrap an `Arc` that tests or
/// the router also hold.
#[async_trait::async_trait]
impl<K: Kms + ?Sized> Kms for std::sync::Arc<K> {
    fn provider(&self) -> &'static str {
        (**self).provider()
    }
    fn provider_for(&self, key_id: &str) -> &'static str {
        (**self).provider_for(key_id)
    }
    async fn wrap(&self, key_id: &str, dek: &Dek, aad: &[u8], label: Option<&str>) -> Result<WrappedDek, KmsError> {
        (**self).wrap(key_id, dek, aad, label).await
    }
    async fn unwrap(&self, key_id: &str, wrapped: &WrappedDek, aad: &[u8]) -> Result<Dek, KmsError> {
        (**self).unwrap(key_id, wrapped, aad).await
    }
    async fn rewrap(&self, key_id: &str, wrapped: &WrappedDek, aad: &[u8], label: Option<&str>) -> Result<WrappedDek, KmsError> {
        (**self).rewrap(key_id, wrapped, aad, label).await
    }
    async fn key_state(&self, key_id: &str) -> Result<KmsKeyState, KmsError> {
        (**self).key_state(key_id).await
    }
    async fn notify(&self, key_id: &str, notice: &Notice) -> Result<(), KmsError> {
        (**self).notify(key_id, notice).await
    }
    async fn sync(&self, key_id: &str) -> Result<(), KmsError> {
        (**self).sync(key_id).await
    }
    fn wants_notices(&self, key_id: &str) -> bool {
        (**self).wants_notices(key_id)
    }
    fn notice_deadline(&self, key_id: &str) -> Option<NoticeDeadline> {
        (**self).notice_deadline(key_id)
    }
    fn health(&self) -> Option<governor::GovernorState> {
        (**self).health()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_provider_in_the_table_has_its_own_section_and_a_unique_name() {
        let sections = toml::Value::try_from(KmsConfig::default()).unwrap();
        let names: Vec<&str> = provider_names().collect();
        for (i, name) in names.iter().enumerate() {
            assert!(sections.get(name).is_some_and(toml::Value::is_table), "[kms.{name}] is a section of KmsConfig");
            assert!(!names[..i].contains(name), "{name} is in the table once");
        }
    }

    #[test]
    fn each_provider_checks_its_own_section() {
        for p in PROVIDERS {
            let broken: KmsConfig = toml::from_str(&format!("[{}.limits]\nmax_concurrency = 0\n", p.name)).unwrap();
            let err = (p.validate)(&broken).unwrap_err().to_string();
            assert!(err.contains(&format!("kms.{}.limits", p.name)), "{err}");
            (p.validate)(&KmsConfig::default()).unwrap();
        }
    }

    #[test]
    fn an_unknown_provider_is_refused_with_the_names_of_the_known_ones() {
        let k = KmsConfig { default: "gcp".into(), ..KmsConfig::default() };
        let err = k.validate().unwrap_err().to_string();
        assert!(err.contains("kms.default") && err.contains("one of local, aws, vault, keyprotect"), "{err}");
        let k: KmsConfig = toml::from_str("routes = [{ prefix = \"x:\", provider = \"gcp\" }]").unwrap();
        assert!(k.validate().unwrap_err().to_string().contains("kms.routes.provider"));
    }

    #[test]
    fn the_embedded_provider_answers_to_its_name() {
        let dir = tempfile::tempdir().unwrap();
        let store = crate::store::Store::open(&dir.path().join("db")).unwrap();
        let ownership = crate::cluster::Ownership::single(Default::default());
        let (writer, _) = crate::store::writer::Writer::start(store.clone(), ownership, 1, Box::new(|_| {}));
        let kms = local::LocalKms::open(store, writer, &dir.path().join("master.key"), std::time::Duration::from_secs(60)).unwrap();
        assert_eq!(kms.provider(), local::NAME);
    }

    #[test]
    fn notices_for_a_kms_that_ignores_them_are_not_queued() {
        use crate::engine::{Effect, Record};
        let dir = tempfile::tempdir().unwrap();
        let store = crate::store::Store::open(dir.path()).unwrap();
        store.keep_notices_only_for(Box::new(|key_id| key_id == "kp"));
        let notice = |key: &str| Record::Outbox(Effect::KmsNotice { key_id: key.into(), notice: Notice::Deregistered { instance_id: "i".into() } });
        store.commit(&[notice("kp"), notice("local-key")], true).unwrap();
        let queued = store.notices(10).unwrap();
        assert_eq!(queued.len(), 1);
        assert!(matches!(&queued[0].1, Effect::KmsNotice { key_id, .. } if key_id == "kp"));
    }

    #[test]
    fn dek_never_prints_its_bytes() {
        let dek = Dek::from_slice(&[7u8; 32]).unwrap();
        assert_eq!(format!("{dek:?}"), "Dek(<redacted>)");
        assert_eq!(dek.fingerprint().len(), 32);
        assert_ne!(dek.fingerprint(), Dek::generate().fingerprint());
    }
}
