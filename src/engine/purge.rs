//! Purging: the wrapped DEKs of a deleted key are destroyed for good, when its
//! restore window passed or when the KMS destroyed the key material itself.

use std::time::Duration;

use chrono::{DateTime, Utc};
use sha2::Digest;

use super::{decision, notice, Decision, Reply, View};
use super::{AuditFact, KeyStatus, Notice, Record};

/// Purges a deleted key once `purge_after` (the restore window) has passed
/// since its deletion (when keywarden applied the delete, see
/// `events::on_delete`), as the purge schedule asks.
///
/// The schedule asks for keys its read of the store showed due, but the state
/// may have moved since (a restore or an earlier purge was applied meanwhile),
/// so the window is checked again here: an unknown key, a key that is not
/// deleted, a key already purged or one whose window is still open changes
/// nothing. When due, every wrapped DEK of the key is destroyed (see
/// [`purge_instances`]) and the key records when, so that a later restore can
/// say that its instances stay destroyed.
pub(super) fn on_purge(view: &impl View, key_id: String, purge_after: Duration, at: DateTime<Utc>) -> Decision {
    let Some(mut key) = view.key(&key_id) else { return decision(vec![], Reply::Done) };
    let due = match (key.status, key.deleted_at, key.purged_at) {
        // A window too long to add never passes (and never overflows).
        (KeyStatus::Deleted, Some(deleted), None) => {
            chrono::Duration::from_std(purge_after).ok().and_then(|window| deleted.checked_add_signed(window)).is_some_and(|end| end <= at)
        }
        _ => false,
    };
    if !due {
        return decision(vec![], Reply::Done);
    }
    let reason = format!(
        "purged: key {} was deleted at {} and not restored within the restore window",
        key.key_id,
        key.deleted_at.map(|d| d.to_rfc3339()).unwrap_or_default()
    );
    let mut records = purge_instances(view, &key_id, &reason, "schedule:purge", at);
    key.purged_at = Some(at);
    key.updated_at = at;
    records.push(Record::Key(key));
    decision(records, Reply::Done)
}

/// Destroys the wrapped DEKs of a key's instances: afterwards nothing, not even
/// the KMS, can bring their data back.
pub(super) fn purge_instances(view: &impl View, key_id: &str, reason: &str, who: &str, at: DateTime<Utc>) -> Vec<Record> {
    let mut records = Vec::new();
    for mut inst in view.instances_of(key_id) {
        if let Some(wrapped) = inst.wrapped.take() {
            // The proof of erasure names exactly which ciphertext was destroyed,
            // without keeping anything that could be unwrapped.
            let digest = sha256_hex(&wrapped.ciphertext);
            records.push(Record::Audit(AuditFact {
                who: who.into(),
                what: "purge".into(),
                outcome: "destroyed".into(),
                key_id: Some(key_id.into()),
                instance_id: Some(inst.instance_id.clone()),
                key_version: Some(wrapped.key_version.clone()),
                detail: Some(format!("{reason}; sha256 of the destroyed wrapped DEK: {digest}")),
                ..Default::default()
            }));
            inst.destroyed_at = Some(at);
            inst.destroyed_reason = Some(reason.to_string());
            inst.updated_at = at;
            records.push(Record::Outbox(notice(key_id, Notice::Deregistered { instance_id: inst.instance_id.clone() })));
            records.push(Record::Instance(inst));
        }
    }
    records
}

/// The lowercase hex sha256 of a destroyed wrapped DEK: the audit's proof of
/// which ciphertext was erased, from which nothing can be unwrapped.
pub(super) fn sha256_hex(ciphertext: &[u8]) -> String {
    crate::text::hex(&sha2::Sha256::digest(ciphertext))
}
