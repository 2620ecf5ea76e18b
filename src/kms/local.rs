//! The embedded KMS: versioned AES-256-GCM root keys, sealed at rest under a master
//! key from a file. It behaves like a real KMS: operating a key emits the matching
//! lifecycle event (through the durable outbox) for the daemon to consume. When
//! a deleted key's restore window ends, the purge has it destroy the key's
//! material ([`LocalKms::destroy_material`]): nothing the key wrapped can be
//! unwrapped after that.

use std::collections::HashMap;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use base64::{engine::general_purpose::STANDARD, Engine};
use chrono::{DateTime, Utc};
use rand::RngCore;
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use super::{Dek, Kms, KmsError, KmsKeyState};
use crate::config::ConfigError;
use crate::engine::{Effect, EventType, KeyStatus, LifecycleEvent, WrappedDek};
use crate::store::writer::{Writer, WriterError};
use crate::store::{Emission, KmsChange, Store, StoreError};

/// The `[kms.local]` section of the config file.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LocalKmsConfig {
    /// File holding the 32-byte master key that encrypts root-key material at rest.
    pub master_key_file: PathBuf,
}

impl Default for LocalKmsConfig {
    fn default() -> Self {
        Self { master_key_file: PathBuf::from("keywarden-data/master.key") }
    }
}

/// What `kms.default` and routes call the embedded provider; not in the
/// provider table, because the daemon opens it with the store.
pub const NAME: &str = "local";

impl LocalKmsConfig {
    /// The master key file is created on first run, so only a path is needed;
    /// an empty one could never be created or read.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.master_key_file.as_os_str().is_empty() {
            return Err(ConfigError::invalid("kms.local.master_key_file", "", "a file path"));
        }
        Ok(())
    }
}

const NONCE: usize = 12;

#[derive(Serialize, Deserialize)]
struct SealedVersion {
    version: String,
    /// nonce || AES-256-GCM(master, material, aad = key id and version).
    /// None once the material is destroyed: the version's name stays, so that
    /// a wrapped DEK naming it is refused as destroyed, not as unknown.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    sealed: Option<String>,
}

#[derive(Serialize, Deserialize)]
struct KeyFile {
    key_id: String,
    status: KeyStatus,
    deleted_at: Option<DateTime<Utc>>,
    created_at: DateTime<Utc>,
    versions: Vec<SealedVersion>,
    /// When the sealed material of every version was destroyed, after the
    /// restore window of its delete ended: from then on nothing it wrapped can
    /// be unwrapped, by this or any node. Absent in records written before
    /// keywarden destroyed material (and in every record whose key still has it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    material_destroyed_at: Option<DateTime<Utc>>,
}

struct LoadedKey {
    status: KeyStatus,
    deleted_at: Option<DateTime<Utc>>,
    material_destroyed_at: Option<DateTime<Utc>>,
    /// Unsealed root-key material by version; zeroed when the entry is dropped.
    material: HashMap<String, Zeroizing<[u8; 32]>>,
    latest: String,
    /// The stored (sealed) record this was loaded from.
    record: Vec<u8>,
}

fn parse_file(key_id: &str, bytes: &[u8]) -> Result<KeyFile, KmsError> {
    serde_json::from_slice(bytes).map_err(|e| KmsError::Setup(format!("root key {key_id} record is corrupt: {e}")))
}

pub struct LocalKms {
    store: Store,
    /// Key changes are committed by the writer, as a compare-and-swap on the
    /// stored record, so two changes to one key never overwrite each other.
    writer: Writer,
    master: Zeroizing<[u8; 32]>,
    cache: RwLock<HashMap<String, Arc<LoadedKey>>>,
    purge_after: Duration,
    /// A key change is refused once the changelog has not confirmed it for
    /// this long (the API's write timeout), instead of hanging its caller.
    write_timeout: Option<Duration>,
}

/// What an operation on a key did: the event it emitted, for the API's answer.
#[derive(Debug, Clone)]
pub struct Emitted {
    pub event: LifecycleEvent,
}

impl LocalKms {
    pub fn open(store: Store, writer: Writer, master_key_file: &Path, purge_after: Duration) -> Result<LocalKms, KmsError> {
        let master = load_or_create_master(master_key_file)?;
        Ok(LocalKms { store, writer, master, cache: RwLock::new(HashMap::new()), purge_after, write_timeout: None })
    }

    pub fn with_write_timeout(mut self, timeout: Duration) -> LocalKms {
        self.write_timeout = Some(timeout);
        self
    }

    fn seal(&self, key_id: &str, version: &str, material: &[u8; 32]) -> String {
        let cipher = Aes256Gcm::new_from_slice(self.master.as_ref()).expect("32-byte key");
        let mut nonce = [0u8; NONCE];
        rand::rngs::OsRng.fill_bytes(&mut nonce);
        let aad = format!("keywarden root key {key_id} version {version}");
        let ct = cipher.encrypt(Nonce::from_slice(&nonce), Payload { msg: material, aad: aad.as_bytes() }).expect("aes-gcm encryption does not fail");
        let mut out = nonce.to_vec();
        out.extend_from_slice(&ct);
        STANDARD.encode(out)
    }

    fn unseal(&self, key_id: &str, version: &str, sealed: &str) -> Result<Zeroizing<[u8; 32]>, KmsError> {
        let bad = || KmsError::Setup(format!("root key {key_id} version {version} cannot be unsealed; is this the master key it was created with?"));
        let raw = STANDARD.decode(sealed).map_err(|_| bad())?;
        if raw.len() < NONCE {
            return Err(bad());
        }
        let cipher = Aes256Gcm::new_from_slice(self.master.as_ref()).expect("32-byte key");
        let aad = format!("keywarden root key {key_id} version {version}");
        let plain = Zeroizing::new(cipher.decrypt(Nonce::from_slice(&raw[..NONCE]), Payload { msg: &raw[NONCE..], aad: aad.as_bytes() }).map_err(|_| bad())?);
        let arr: [u8; 32] = plain.as_slice().try_into().map_err(|_| bad())?;
        Ok(Zeroizing::new(arr))
    }

    /// The stored record and what it says.
    fn read_file(&self, key_id: &str) -> Result<(Vec<u8>, KeyFile), KmsError> {
        let bytes = self.store.kms_get(key_id)?.ok_or_else(|| KmsError::UnknownKey(key_id.to_string()))?;
        let file = parse_file(key_id, &bytes)?;
        Ok((bytes, file))
    }

    /// The key as the store has it now. The unsealed copy is reused while the
    /// stored record is unchanged; comparing costs a read, and catches a change
    /// this process did not make (another node's, through the changelog).
    fn load(&self, key_id: &str) -> Result<Arc<LoadedKey>, KmsError> {
        let bytes = self.store.kms_get(key_id)?.ok_or_else(|| KmsError::UnknownKey(key_id.to_string()))?;
        if let Some(k) = self.cache.read().expect("kms cache lock").get(key_id) {
            if k.record == bytes {
                return Ok(k.clone());
            }
        }
        let file = parse_file(key_id, &bytes)?;
        let mut material = HashMap::new();
        // A destroyed version has nothing to unseal.
        for v in &file.versions {
            if let Some(sealed) = &v.sealed {
                material.insert(v.version.clone(), self.unseal(key_id, &v.version, sealed)?);
            }
        }
        let loaded = Arc::new(LoadedKey {
            status: file.status,
            deleted_at: file.deleted_at,
            material_destroyed_at: file.material_destroyed_at,
            material,
            latest: file.versions.last().map(|v| v.version.clone()).unwrap_or_default(),
            record: bytes,
        });
        self.cache.write().expect("kms cache lock").insert(key_id.to_string(), loaded.clone());
        Ok(loaded)
    }

    fn usable(&self, key_id: &str) -> Result<Arc<LoadedKey>, KmsError> {
        let key = self.load(key_id)?;
        if let Some(at) = key.material_destroyed_at {
            return Err(KmsError::MaterialDestroyed { key_id: key_id.to_string(), at });
        }
        match key.status {
            KeyStatus::Active => Ok(key),
            KeyStatus::Disabled => Err(KmsError::KeyDisabled(key_id.to_string())),
            KeyStatus::Deleted => Err(KmsError::KeyDeleted(key_id.to_string())),
        }
    }

    fn wrap_with(key_id: &str, key: &LoadedKey, dek: &Dek, aad: &[u8]) -> WrappedDek {
        let cipher = Aes256Gcm::new_from_slice(key.material[&key.latest].as_ref()).expect("32-byte key");
        let mut nonce = [0u8; NONCE];
        rand::rngs::OsRng.fill_bytes(&mut nonce);
        let ct =
            cipher.encrypt(Nonce::from_slice(&nonce), Payload { msg: dek.expose(), aad: &aad_for(key_id, aad) }).expect("aes-gcm encryption does not fail");
        let mut ciphertext = nonce.to_vec();
        ciphertext.extend_from_slice(&ct);
        WrappedDek { key_version: key.latest.clone(), ciphertext }
    }

    fn unwrap_with(key_id: &str, key: &LoadedKey, wrapped: &WrappedDek, aad: &[u8]) -> Result<Dek, KmsError> {
        let material = key
            .material
            .get(&wrapped.key_version)
            .ok_or_else(|| KmsError::UnknownVersion { key_id: key_id.to_string(), version: wrapped.key_version.clone() })?;
        if wrapped.ciphertext.len() < NONCE {
            return Err(KmsError::Integrity(key_id.to_string()));
        }
        let cipher = Aes256Gcm::new_from_slice(material.as_ref()).expect("32-byte key");
        let plain = Zeroizing::new(
            cipher
                .decrypt(Nonce::from_slice(&wrapped.ciphertext[..NONCE]), Payload { msg: &wrapped.ciphertext[NONCE..], aad: &aad_for(key_id, aad) })
                .map_err(|_| KmsError::Integrity(key_id.to_string()))?,
        );
        Dek::from_slice(&plain).ok_or_else(|| KmsError::Integrity(key_id.to_string()))
    }

    /// Commits the record if the stored one is still `expected`. False: it
    /// changed since it was read.
    async fn save(&self, expected: Option<Vec<u8>>, file: &KeyFile, event: Option<&LifecycleEvent>) -> Result<bool, KmsError> {
        let emits = match event {
            Some(e) => {
                let payload = serde_json::to_string(e).map_err(|e| KmsError::Setup(format!("cannot encode the lifecycle event: {e}")))?;
                Some(Emission { event_id: e.event_id.clone(), effect: Effect::LifecycleEvent { key_id: e.key_id.clone(), payload } })
            }
            None => None,
        };
        let material = serde_json::to_vec(file).map_err(|e| KmsError::Setup(format!("cannot encode root key {}: {e}", file.key_id)))?;
        let change = KmsChange { key_id: file.key_id.clone(), expected, material, emits };
        self.writer.change_kms(change, self.write_timeout).await.map_err(|e| match e {
            // As the store's own refusal: 503 and retry.
            e if e.retryable() => KmsError::Store(StoreError::Unavailable(e.to_string())),
            WriterError::Store(e) => KmsError::Store(e),
            e => KmsError::Store(StoreError::Changelog(e.to_string())),
        })
    }

    /// Creates a root key with its first version. Emits no lifecycle event: none of
    /// the five event types means "created".
    pub async fn create_key(&self, key_id: Option<String>) -> Result<(String, String), KmsError> {
        let key_id = key_id.unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
        let exists = || KmsError::Conflict(format!("key {key_id} already exists; choose another id"));
        if self.store.kms_get(&key_id)?.is_some() {
            return Err(exists());
        }
        let version = "1".to_string();
        let mut material = Zeroizing::new([0u8; 32]);
        rand::rngs::OsRng.fill_bytes(material.as_mut());
        let file = KeyFile {
            key_id: key_id.clone(),
            status: KeyStatus::Active,
            deleted_at: None,
            created_at: Utc::now(),
            versions: vec![SealedVersion { version: version.clone(), sealed: Some(self.seal(&key_id, &version, &material)) }],
            material_destroyed_at: None,
        };
        // Created by someone else in the meantime: the same answer as before.
        if !self.save(None, &file, None).await? {
            return Err(exists());
        }
        Ok((key_id, version))
    }

    /// Applies an operator's action to a key and emits the matching lifecycle
    /// event. A concurrent change to the same key makes it decide again on
    /// what that change left.
    pub async fn operate(&self, key_id: &str, action: EventType) -> Result<Emitted, KmsError> {
        for _ in 0..8 {
            let (stored, mut file) = self.read_file(key_id)?;
            let event = self.apply(key_id, action, &mut file)?;
            if self.save(Some(stored), &file, Some(&event)).await? {
                return Ok(Emitted { event });
            }
        }
        Err(KmsError::Store(StoreError::Unavailable(format!("key {key_id} kept changing while this {} was applied", action.as_str()))))
    }

    /// The action's effect on the record, and the event it emits.
    fn apply(&self, key_id: &str, action: EventType, file: &mut KeyFile) -> Result<LifecycleEvent, KmsError> {
        let now = Utc::now();
        let conflict = |what: &str| Err(KmsError::Conflict(format!("key {key_id} is {what}")));
        let mut key_version = None;
        match (action, file.status) {
            (EventType::Rotate, KeyStatus::Active) => {
                let next = file.versions.len() + 1;
                let version = next.to_string();
                let mut material = Zeroizing::new([0u8; 32]);
                rand::rngs::OsRng.fill_bytes(material.as_mut());
                let sealed = self.seal(key_id, &version, &material);
                file.versions.push(SealedVersion { version: version.clone(), sealed: Some(sealed) });
                key_version = Some(version);
            }
            (EventType::Rotate, KeyStatus::Disabled) => return conflict("disabled; enable it before rotating"),
            (EventType::Disable, KeyStatus::Active) => file.status = KeyStatus::Disabled,
            (EventType::Disable, KeyStatus::Disabled) => return conflict("already disabled"),
            (EventType::Enable, KeyStatus::Disabled) => file.status = KeyStatus::Active,
            (EventType::Enable, KeyStatus::Active) => return conflict("already enabled"),
            (EventType::Delete, KeyStatus::Active | KeyStatus::Disabled) => {
                file.status = KeyStatus::Deleted;
                file.deleted_at = Some(now);
            }
            (EventType::Restore, KeyStatus::Deleted) => {
                let deleted = file.deleted_at.unwrap_or(now);
                // Whatever the window is now (another node's, a changed
                // config): nothing is left to restore.
                if let Some(destroyed) = file.material_destroyed_at {
                    return Err(KmsError::Conflict(format!(
                        "key {key_id} was deleted at {} and its material was destroyed at {}, when its restore window ended; it cannot be restored, \
                         and nothing it wrapped can be unwrapped: create a new key",
                        deleted.to_rfc3339(),
                        destroyed.to_rfc3339()
                    )));
                }
                if self.window_passed(deleted, now) {
                    return Err(KmsError::Conflict(format!(
                        "key {key_id} was deleted at {} and its restore window of {} has passed; its DEKs are destroyed and cannot be restored",
                        deleted.to_rfc3339(),
                        humantime::format_duration(self.purge_after)
                    )));
                }
                file.status = KeyStatus::Active;
                file.deleted_at = None;
            }
            (EventType::Restore, _) => return conflict("not deleted; there is nothing to restore"),
            (_, KeyStatus::Deleted) if file.material_destroyed_at.is_some() => {
                return conflict("deleted and its material destroyed; it can never be used again, create a new key")
            }
            (_, KeyStatus::Deleted) => return conflict("deleted; restore it first"),
        }
        let event = LifecycleEvent {
            event_id: uuid::Uuid::new_v4().to_string(),
            kind: action,
            key_id: key_id.to_string(),
            key_version: key_version.or_else(|| file.versions.last().map(|v| v.version.clone())),
            occurred_at: now,
            correlation_id: None,
            traceparent: None,
            material_destroyed: false,
        };
        Ok(event)
    }

    /// Whether a delete at `deleted` is past its restore window at `now`. A
    /// window too long to add never passes (and never overflows).
    fn window_passed(&self, deleted: DateTime<Utc>, now: DateTime<Utc>) -> bool {
        chrono::Duration::from_std(self.purge_after).ok().and_then(|window| deleted.checked_add_signed(window)).is_some_and(|end| end <= now)
    }

    /// Destroys the sealed material of every version of a deleted key whose
    /// restore window has ended, so that no surviving copy of a DEK it wrapped
    /// (a store backup, an old changelog segment, a wrapped DEK a data plane
    /// kept) can be unwrapped again: the embedded KMS's proof of erasure. The
    /// record stays (deleted, the versions' names, when the material was
    /// destroyed), committed by the writer as a compare-and-swap on the stored
    /// record like [`LocalKms::operate`], and replicated to the other nodes.
    ///
    /// The key's own record decides, not the caller: a key that is not
    /// deleted (restored meanwhile) or whose window is still open is refused
    /// with `Conflict` and left as it is. Ok(true): destroyed now; Ok(false):
    /// it was destroyed already, nothing changed.
    pub async fn destroy_material(&self, key_id: &str) -> Result<bool, KmsError> {
        for _ in 0..8 {
            let (stored, mut file) = self.read_file(key_id)?;
            if file.material_destroyed_at.is_some() {
                return Ok(false);
            }
            if file.status != KeyStatus::Deleted {
                return Err(KmsError::Conflict(format!(
                    "key {key_id} is not deleted; only a deleted key's material is destroyed, once its restore window ends"
                )));
            }
            let now = Utc::now();
            if !file.deleted_at.is_some_and(|deleted| self.window_passed(deleted, now)) {
                return Err(KmsError::Conflict(format!(
                    "key {key_id} is still inside its restore window of {}; its material is destroyed when the window ends",
                    humantime::format_duration(self.purge_after)
                )));
            }
            for v in &mut file.versions {
                v.sealed = None;
            }
            file.material_destroyed_at = Some(now);
            if self.save(Some(stored), &file, None).await? {
                // The unsealed copy goes too (zeroed when the last user drops it).
                self.cache.write().expect("kms cache lock").remove(key_id);
                return Ok(true);
            }
        }
        Err(KmsError::Store(StoreError::Unavailable(format!("key {key_id} kept changing while its material was destroyed"))))
    }

    /// When the key's material was destroyed, if it was.
    pub fn material_destroyed_at(&self, key_id: &str) -> Result<Option<DateTime<Utc>>, KmsError> {
        Ok(self.load(key_id)?.material_destroyed_at)
    }

    pub fn state(&self, key_id: &str) -> Result<(KeyStatus, String, Option<DateTime<Utc>>), KmsError> {
        let key = self.load(key_id)?;
        Ok((key.status, key.latest.clone(), key.deleted_at))
    }
}

/// Binds a wrapped DEK to its key as well as to the caller's context (the instance).
fn aad_for(key_id: &str, aad: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(key_id.len() + aad.len() + 1);
    v.extend_from_slice(key_id.as_bytes());
    v.push(0);
    v.extend_from_slice(aad);
    v
}

#[async_trait::async_trait]
impl Kms for LocalKms {
    fn provider(&self) -> &'static str {
        "local"
    }

    async fn wrap(&self, key_id: &str, dek: &Dek, aad: &[u8], _label: Option<&str>) -> Result<WrappedDek, KmsError> {
        let key = self.usable(key_id)?;
        Ok(Self::wrap_with(key_id, &key, dek, aad))
    }

    async fn unwrap(&self, key_id: &str, wrapped: &WrappedDek, aad: &[u8]) -> Result<Dek, KmsError> {
        let key = self.usable(key_id)?;
        Self::unwrap_with(key_id, &key, wrapped, aad)
    }

    async fn rewrap(&self, key_id: &str, wrapped: &WrappedDek, aad: &[u8], _label: Option<&str>) -> Result<WrappedDek, KmsError> {
        let key = self.usable(key_id)?;
        let dek = Self::unwrap_with(key_id, &key, wrapped, aad)?;
        Ok(Self::wrap_with(key_id, &key, &dek, aad))
    }

    async fn key_state(&self, key_id: &str) -> Result<KmsKeyState, KmsError> {
        let key = self.load(key_id)?;
        Ok(KmsKeyState::new(key.status, key.latest.clone()))
    }
}

/// Reads the master key (base64 of 32 bytes); on first run creates it, mode 0600.
fn load_or_create_master(path: &Path) -> Result<Zeroizing<[u8; 32]>, KmsError> {
    if !path.exists() {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| KmsError::Setup(format!("cannot create {}: {e}", dir.display())))?;
        }
        let mut key = Zeroizing::new([0u8; 32]);
        rand::rngs::OsRng.fill_bytes(key.as_mut());
        let text = Zeroizing::new(format!("{}\n", STANDARD.encode(key.as_ref())));
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .map_err(|e| KmsError::Setup(format!("cannot create master key file {}: {e}", path.display())))?;
        f.write_all(text.as_bytes())
            .and_then(|_| f.sync_all())
            .map_err(|e| KmsError::Setup(format!("cannot write master key file {}: {e}", path.display())))?;
        tracing::info!(path = %path.display(), "created a new master key file (mode 0600); back it up: without it the root keys cannot be read");
        return Ok(key);
    }
    let meta = std::fs::metadata(path).map_err(|e| KmsError::Setup(format!("cannot read master key file {}: {e}", path.display())))?;
    if meta.permissions().mode() & 0o077 != 0 {
        tracing::warn!(path = %path.display(), "master key file is readable by group or others; chmod 600 it");
    }
    let text = Zeroizing::new(std::fs::read_to_string(path).map_err(|e| KmsError::Setup(format!("cannot read master key file {}: {e}", path.display())))?);
    let raw = Zeroizing::new(STANDARD.decode(text.trim()).unwrap_or_default());
    let arr: [u8; 32] = raw.as_slice().try_into().map_err(|_| KmsError::Setup(format!("master key file {} must hold 32 bytes in base64", path.display())))?;
    Ok(Zeroizing::new(arr))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn writer(store: &Store) -> Writer {
        let ownership = crate::cluster::Ownership::single(Default::default());
        Writer::start(store.clone(), ownership, 16, Box::new(|_| {})).0
    }

    fn kms(dir: &Path) -> LocalKms {
        let store = Store::open(&dir.join("db")).unwrap();
        LocalKms::open(store.clone(), writer(&store), &dir.join("master.key"), Duration::from_secs(3600)).unwrap()
    }

    /// The stored record of a key, as JSON.
    fn record(kms: &LocalKms, key_id: &str) -> serde_json::Value {
        serde_json::from_slice(&kms.store.kms_get(key_id).unwrap().unwrap()).unwrap()
    }

    #[tokio::test]
    async fn destroyed_material_unwraps_nothing_refuses_a_restore_and_is_destroyed_once() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("db")).unwrap();
        // A window of zero has ended as soon as the delete is applied.
        let kms = LocalKms::open(store.clone(), writer(&store), &dir.path().join("master.key"), Duration::ZERO).unwrap();
        let (key, _) = kms.create_key(Some("k".into())).await.unwrap();
        let dek = Dek::generate();
        let w1 = kms.wrap(&key, &dek, b"a", None).await.unwrap();
        kms.operate(&key, EventType::Rotate).await.unwrap();
        let w2 = kms.wrap(&key, &dek, b"b", None).await.unwrap();
        kms.operate(&key, EventType::Delete).await.unwrap();
        let events = kms.store.outbox_len();

        assert!(kms.destroy_material(&key).await.unwrap(), "destroyed by this call");
        let destroyed = |r: Result<_, KmsError>| matches!(r, Err(KmsError::MaterialDestroyed { key_id, .. }) if key_id == "k");
        assert!(destroyed(kms.unwrap(&key, &w1, b"a").await.map(|_| ())));
        assert!(destroyed(kms.unwrap(&key, &w2, b"b").await.map(|_| ())));
        assert!(destroyed(kms.rewrap(&key, &w1, b"a", None).await.map(|_| ())));
        assert!(destroyed(kms.wrap(&key, &dek, b"c", None).await.map(|_| ())));
        let msg = kms.unwrap(&key, &w1, b"a").await.unwrap_err().to_string();
        assert!(msg.contains("destroyed") && msg.contains("create a new key"), "{msg}");

        // The record stays, deleted, naming its versions, with no material.
        let r = record(&kms, &key);
        assert_eq!(r["status"], "deleted", "{r}");
        assert!(r["material_destroyed_at"].is_string(), "{r}");
        let versions = r["versions"].as_array().unwrap();
        assert_eq!(versions.iter().map(|v| v["version"].as_str().unwrap()).collect::<Vec<_>>(), ["1", "2"]);
        assert!(versions.iter().all(|v| v.get("sealed").is_none()), "{r}");
        assert_eq!(kms.state(&key).unwrap().0, KeyStatus::Deleted);
        assert_eq!(kms.material_destroyed_at(&key).unwrap(), serde_json::from_value(r["material_destroyed_at"].clone()).unwrap());

        let restore = kms.operate(&key, EventType::Restore).await.expect_err("a restore is refused").to_string();
        assert!(restore.contains("material was destroyed") && restore.contains("cannot be restored"), "{restore}");
        assert!(matches!(kms.operate(&key, EventType::Enable).await, Err(KmsError::Conflict(m)) if m.contains("material destroyed")));

        // Again: nothing changes, and nothing is emitted, now or before.
        let before = kms.store.kms_get(&key).unwrap();
        assert!(!kms.destroy_material(&key).await.unwrap(), "already destroyed");
        assert_eq!(kms.store.kms_get(&key).unwrap(), before);
        assert_eq!(kms.store.outbox_len(), events, "destroying emits no lifecycle event");

        // Not only this process's copy: a restarted KMS, even one whose window
        // would still be open, finds nothing to unwrap or restore either.
        drop(kms);
        let there = LocalKms::open(store.clone(), writer(&store), &dir.path().join("master.key"), Duration::from_secs(3600)).unwrap();
        assert!(destroyed(there.unwrap(&key, &w1, b"a").await.map(|_| ())));
        assert!(matches!(there.operate(&key, EventType::Restore).await, Err(KmsError::Conflict(m)) if m.contains("material was destroyed")));
    }

    #[tokio::test]
    async fn material_is_kept_until_the_restore_window_of_a_delete_has_ended() {
        let dir = tempfile::tempdir().unwrap();
        let kms = kms(dir.path());
        let (key, _) = kms.create_key(None).await.unwrap();
        let dek = Dek::generate();
        let w = kms.wrap(&key, &dek, b"a", None).await.unwrap();
        let refused = |r: Result<bool, KmsError>, says: &str| matches!(r, Err(KmsError::Conflict(m)) if m.contains(says));
        assert!(refused(kms.destroy_material(&key).await, "is not deleted"));
        kms.operate(&key, EventType::Delete).await.unwrap();
        assert!(refused(kms.destroy_material(&key).await, "still inside its restore window"));
        assert!(record(&kms, &key).get("material_destroyed_at").is_none());
        // Nothing was lost: the restore inside the window brings the DEK back.
        kms.operate(&key, EventType::Restore).await.unwrap();
        assert_eq!(kms.unwrap(&key, &w, b"a").await.unwrap().expose(), dek.expose());
        assert!(matches!(kms.destroy_material("no-such-key").await, Err(KmsError::UnknownKey(_))));
    }

    #[test]
    fn a_key_record_written_before_material_was_destroyed_still_parses() {
        let old = br#"{"key_id":"k","status":"deleted","deleted_at":"2024-01-01T00:00:00Z","created_at":"2023-01-01T00:00:00Z","versions":[{"version":"1","sealed":"AAAA"}]}"#;
        let file = parse_file("k", old).unwrap();
        assert!(file.material_destroyed_at.is_none());
        assert_eq!(file.versions[0].sealed.as_deref(), Some("AAAA"));
        // And a key that keeps its material is written as before.
        let again: serde_json::Value = serde_json::to_value(&file).unwrap();
        assert_eq!(again, serde_json::from_slice::<serde_json::Value>(old).unwrap());
    }

    #[tokio::test]
    async fn rewrap_moves_to_the_new_version_and_keeps_the_dek() {
        let dir = tempfile::tempdir().unwrap();
        let kms = kms(dir.path());
        let (key, v1) = kms.create_key(Some("k".into())).await.unwrap();
        let dek = Dek::generate();
        let w1 = kms.wrap(&key, &dek, b"inst-1", None).await.unwrap();
        assert_eq!(w1.key_version, v1);
        let emitted = kms.operate(&key, EventType::Rotate).await.unwrap();
        assert_eq!(emitted.event.key_version.as_deref(), Some("2"));
        let w2 = kms.rewrap(&key, &w1, b"inst-1", None).await.unwrap();
        assert_eq!(w2.key_version, "2");
        assert_eq!(kms.unwrap(&key, &w2, b"inst-1").await.unwrap().expose(), dek.expose());
        // The old version still opens old wraps until they are all rewrapped.
        assert_eq!(kms.unwrap(&key, &w1, b"inst-1").await.unwrap().expose(), dek.expose());
    }

    #[tokio::test]
    async fn wrapped_dek_is_bound_to_its_instance() {
        let dir = tempfile::tempdir().unwrap();
        let kms = kms(dir.path());
        let (key, _) = kms.create_key(None).await.unwrap();
        let w = kms.wrap(&key, &Dek::generate(), b"a", None).await.unwrap();
        assert!(matches!(kms.unwrap(&key, &w, b"b").await, Err(KmsError::Integrity(_))));
    }

    #[tokio::test]
    async fn disabled_key_refuses_and_emits_an_event_through_the_outbox() {
        let dir = tempfile::tempdir().unwrap();
        let kms = kms(dir.path());
        let (key, _) = kms.create_key(None).await.unwrap();
        let w = kms.wrap(&key, &Dek::generate(), b"a", None).await.unwrap();
        kms.operate(&key, EventType::Disable).await.unwrap();
        assert!(matches!(kms.unwrap(&key, &w, b"a").await, Err(KmsError::KeyDisabled(_))));
        assert_eq!(kms.store.outbox_len(), 1);
        assert!(matches!(kms.operate(&key, EventType::Disable).await, Err(KmsError::Conflict(_))));
    }

    #[tokio::test]
    async fn a_change_another_node_wrote_to_the_store_is_seen_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let here = kms(dir.path());
        let (key, _) = here.create_key(None).await.unwrap();
        let w = here.wrap(&key, &Dek::generate(), b"a", None).await.unwrap();
        here.unwrap(&key, &w, b"a").await.unwrap();
        // The other node's KMS shares the store (as the replica shares its records).
        let there = LocalKms::open(here.store.clone(), here.writer.clone(), &dir.path().join("master.key"), Duration::from_secs(60)).unwrap();
        there.operate(&key, EventType::Disable).await.unwrap();
        assert!(matches!(here.unwrap(&key, &w, b"a").await, Err(KmsError::KeyDisabled(_))));
        there.operate(&key, EventType::Enable).await.unwrap();
        here.unwrap(&key, &w, b"a").await.unwrap();
    }

    #[tokio::test]
    async fn concurrent_changes_to_one_key_are_each_applied_once() {
        let dir = tempfile::tempdir().unwrap();
        let kms = Arc::new(kms(dir.path()));
        let (key, _) = kms.create_key(None).await.unwrap();
        // Eight rotations at once: each reads the record, and only one of
        // those that read the same record may commit on it.
        let rotations: Vec<_> = (0..8)
            .map(|_| {
                let (kms, key) = (kms.clone(), key.clone());
                tokio::spawn(async move { kms.operate(&key, EventType::Rotate).await })
            })
            .collect();
        let mut versions = Vec::new();
        for r in rotations {
            versions.push(r.await.unwrap().unwrap().event.key_version.unwrap());
        }
        versions.sort_by_key(|v| v.parse::<u32>().unwrap());
        assert_eq!(versions, (2..=9).map(|v| v.to_string()).collect::<Vec<_>>(), "no rotation overwrote another");
        assert_eq!(kms.state(&key).unwrap().1, "9");
        assert_eq!(kms.store.outbox_len(), 8, "one event per rotation");
    }

    #[tokio::test]
    async fn a_restore_window_too_long_to_add_never_passes() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("db")).unwrap();
        for (i, window) in [Duration::MAX, Duration::from_secs(i64::MAX as u64 / 1000)].into_iter().enumerate() {
            let kms = LocalKms::open(store.clone(), writer(&store), &dir.path().join("master.key"), window).unwrap();
            let (key, _) = kms.create_key(Some(format!("k{i}"))).await.unwrap();
            kms.operate(&key, EventType::Delete).await.unwrap();
            kms.operate(&key, EventType::Restore).await.unwrap();
        }
    }

    #[tokio::test]
    async fn root_keys_survive_restart_with_the_same_master_key_only() {
        let dir = tempfile::tempdir().unwrap();
        let dek = Dek::generate();
        let w = {
            let kms = kms(dir.path());
            kms.create_key(Some("k".into())).await.unwrap();
            kms.wrap("k", &dek, b"a", None).await.unwrap()
        };
        let mode = std::fs::metadata(dir.path().join("master.key")).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let kms2 = kms(dir.path());
        assert_eq!(kms2.unwrap("k", &w, b"a").await.unwrap().expose(), dek.expose());
        drop(kms2);
        std::fs::remove_file(dir.path().join("master.key")).unwrap();
        let kms3 = kms(dir.path());
        assert!(matches!(kms3.unwrap("k", &w, b"a").await, Err(KmsError::Setup(_))));
    }
}
