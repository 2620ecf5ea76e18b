//! The embedded KMS's keys, sealed under its master key (the KMS owns the
//! bytes; the store only keeps them), and the lifecycle events its changes
//! emit, kept until the key's owner has recorded them.

use super::schema::*;
use super::{Route, Staged, Store, StoreError};
use crate::engine::{Effect, Record};

/// A lifecycle event the embedded KMS emits with a key change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Emission {
    pub event_id: String,
    /// The outbox entry that publishes it.
    pub effect: Effect,
}

/// A key change of the embedded KMS: applied only if the key's material is
/// still what the KMS read (`expected`; None: the key must not exist yet), so
/// that two changes to one key never overwrite each other.
#[derive(Debug, Clone)]
pub struct KmsChange {
    pub key_id: String,
    pub expected: Option<Vec<u8>>,
    pub material: Vec<u8>,
    pub emits: Option<Emission>,
}

impl Store {
    pub fn kms_get(&self, key_id: &str) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.get(&k(KMS, key_id))?.map(|v| v.to_vec()))
    }

    pub fn kms_keys(&self) -> Result<Vec<String>, StoreError> {
        self.scan_ids(KMS)
    }

    /// Stages the change with the event it implies in the same batch, so that
    /// a key change is never made without its event being published. Returns
    /// false, staging nothing, if the key changed since the KMS read it.
    pub fn stage_kms(&self, staged: &mut Staged, change: KmsChange) -> Result<bool, StoreError> {
        let current = match staged.kms.get(&change.key_id) {
            Some(material) => Some(material.clone()),
            None => self.kms_get(&change.key_id)?,
        };
        if current != change.expected {
            return Ok(false);
        }
        let route = || Route::Key(change.key_id.clone());
        // Other nodes unwrap with the same material (sealed under the shared master key).
        staged.put(route(), k(KMS, &change.key_id), change.material.clone());
        if let Some(emission) = change.emits {
            // For the other nodes only: this node's own copy is its outbox
            // entry, which survives a restart, so a take-over here never
            // queues again what this node emitted itself (its replica skips
            // its own entries).
            if self.changelog.get().is_some() {
                staged.changes.push(super::Change { route: route(), key: k(EMITTED, &emission.event_id), value: Some(encode(&emission.effect)) });
            }
            self.stage_records(staged, &[Record::Outbox(emission.effect)])?;
        }
        staged.kms.insert(change.key_id, change.material);
        staged.flush = true;
        Ok(true)
    }

    /// Lifecycle events the embedded KMS emitted for keys `mine` selects that
    /// no event record shows applied are queued again (a duplicate is
    /// recognised by its id); those that are applied are forgotten here.
    /// Returns how many were queued.
    pub fn stage_unapplied_emissions(&self, staged: &mut Staged, mine: impl Fn(&str) -> bool) -> Result<usize, StoreError> {
        let mut pending = Vec::new();
        for kv in self.tree.scan_prefix(EMITTED) {
            let (key, value) = kv.map_err(StoreError::Read)?;
            let event_id = String::from_utf8_lossy(&key[EMITTED.len()..]).into_owned();
            if self.event_seen(&event_id)? {
                staged.batch.remove(key);
                continue;
            }
            let effect: Effect = decode(&key, &value)?;
            if matches!(&effect, Effect::LifecycleEvent { key_id, .. } if mine(key_id)) {
                pending.push(Record::Outbox(effect));
            }
        }
        self.stage_records(staged, &pending)?;
        Ok(pending.len())
    }
}
