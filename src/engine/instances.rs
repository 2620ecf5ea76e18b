//! Keys and instances made through keywarden itself (the API and the embedded
//! KMS), rather than learned from lifecycle events.

use chrono::{DateTime, Utc};

use super::purge::sha256_hex;
use super::{decision, notice, Decision, Reply, View};
use super::{AuditFact, CommandAction, DataPlaneStatus, DekCredential, Effect, InstanceRecord, KeyRecord, KeyStatus, Notice, Record, WrappedDek};

/// Records a key the embedded KMS just created, so that keywarden knows its
/// version before any event names it.
///
/// A key keywarden already knows is left as it is: its record was built from
/// events (or an earlier registration) and is newer than what the KMS said at
/// creation, so a repeated registration is a no-op rather than a reset.
pub(super) fn on_register_key(view: &impl View, key_id: String, version: String, at: DateTime<Utc>) -> Decision {
    match view.key(&key_id) {
        Some(_) => decision(vec![], Reply::Done),
        None => {
            let mut key = KeyRecord::new(&key_id, at);
            key.version = Some(version);
            decision(vec![Record::Key(key)], Reply::Done)
        }
    }
}

/// Creates an instance holding `wrapped`, the DEK wrapped by its root key.
///
/// - An id already in use is a conflict, never an overwrite: replacing the
///   wrapped DEK would lose the data encrypted under the old one.
/// - A deleted key takes no new instances (its DEKs are being erased); the
///   caller must restore it or choose another key.
/// - An unknown key, or one without a version yet, is recorded with the
///   version the DEK was wrapped by, so that a later rotation has a start.
///
/// The instance keeps `credential` (a hash, never the token) as its DEK
/// credential. The KMS is told of the registration (outbox), and the creation
/// is audited with the credential's id.
pub(super) fn on_create_instance(
    view: &impl View,
    instance_id: String,
    key_id: String,
    wrapped: WrappedDek,
    fingerprint: String,
    credential: DekCredential,
    at: DateTime<Utc>,
) -> Decision {
    if view.instance(&instance_id).is_some() {
        return decision(vec![], Reply::Conflict(format!("instance {instance_id} already exists; pick another id or delete it first")));
    }
    let mut records = Vec::new();
    match view.key(&key_id) {
        Some(k) if k.status == KeyStatus::Deleted => {
            return decision(vec![], Reply::Conflict(format!("key {key_id} is deleted; restore it or choose another key")));
        }
        Some(k) if k.version.is_none() => {
            let mut k = k.clone();
            k.version = Some(wrapped.key_version.clone());
            records.push(Record::Key(k));
        }
        Some(_) => {}
        None => {
            let mut k = KeyRecord::new(&key_id, at);
            k.version = Some(wrapped.key_version.clone());
            records.push(Record::Key(k));
        }
    }
    // Wrapped before the KMS rotated and committed after the rotate event:
    // the running pass may already have read past this id.
    if let Some(mut job) =
        view.job(&key_id).filter(|j| j.finished_at.is_none() && *j.rewrapping_to.as_ref().unwrap_or(&j.target_version) != wrapped.key_version)
    {
        job.arrivals += 1;
        records.push(Record::Job(job));
    }
    let inst = InstanceRecord {
        instance_id,
        key_id,
        key_version: wrapped.key_version.clone(),
        wrapped: Some(wrapped),
        dek_fingerprint: fingerprint,
        created_at: at,
        updated_at: at,
        destroyed_at: None,
        destroyed_reason: None,
        rewrap_error: None,
        credential: Some(credential),
        data_plane: None,
    };
    records.push(Record::Outbox(notice(&inst.key_id, Notice::Registered { instance_id: inst.instance_id.clone(), key_version: inst.key_version.clone() })));
    records.push(Record::Audit(AuditFact {
        who: "api".into(),
        what: "instance created".into(),
        outcome: "created".into(),
        key_id: Some(inst.key_id.clone()),
        instance_id: Some(inst.instance_id.clone()),
        key_version: Some(inst.key_version.clone()),
        detail: inst.credential.as_ref().map(|c| format!("dek credential {}", c.id)),
        ..Default::default()
    }));
    records.push(Record::Instance(inst.clone()));
    decision(records, Reply::Created(Box::new(inst)))
}

/// Destroys an instance's wrapped DEK at the operator's request.
///
/// - An unknown instance is `NotFound`.
/// - An instance already destroyed is done: deleting twice (a retried request)
///   changes nothing and emits nothing again.
///
/// Otherwise the instance keeps its record, marked destroyed, but loses the
/// wrapped DEK; the outbox gets an `Erase` command for the instance and a
/// deregistration notice for the KMS; the audit names the sha256 of the
/// destroyed ciphertext as proof of erasure without keeping anything that
/// could be unwrapped.
pub(super) fn on_delete_instance(view: &impl View, instance_id: String, request_id: String, at: DateTime<Utc>) -> Decision {
    let Some(mut inst) = view.instance(&instance_id) else {
        return decision(vec![], Reply::NotFound(format!("instance {instance_id} does not exist")));
    };
    let Some(wrapped) = inst.wrapped.take() else {
        return decision(vec![], Reply::Done);
    };
    let digest = sha256_hex(&wrapped.ciphertext);
    let proof = Record::Audit(AuditFact {
        who: "api".into(),
        what: "instance deleted".into(),
        outcome: "destroyed".into(),
        key_id: Some(inst.key_id.clone()),
        instance_id: Some(inst.instance_id.clone()),
        key_version: Some(wrapped.key_version.clone()),
        detail: Some(format!("sha256 of the destroyed wrapped DEK: {digest}")),
        ..Default::default()
    });
    inst.destroyed_at = Some(at);
    inst.destroyed_reason = Some("instance deleted through the API".into());
    inst.updated_at = at;
    let effect = Effect::InstanceCommand {
        instance_id: inst.instance_id.clone(),
        key_id: inst.key_id.clone(),
        action: CommandAction::Erase,
        key_version: Some(inst.key_version.clone()),
        cause_event_id: request_id,
        issued_at: at,
        correlation_id: None,
        traceparent: None,
    };
    let deregister = notice(&inst.key_id, Notice::Deregistered { instance_id: inst.instance_id.clone() });
    decision(vec![Record::Instance(inst), Record::Outbox(effect), Record::Outbox(deregister), proof], Reply::Done)
}

/// Replaces an instance's DEK credential with `credential`.
///
/// - An unknown instance is `NotFound`: the API answers 404 to the operator
///   (who holds the admin token and may list instances anyway).
/// - A destroyed instance is a conflict: it has no DEK left to fetch, so a
///   credential for it would open nothing.
///
/// Otherwise the new hash replaces the old in the one record the DEK endpoint
/// reads, so the old token is refused from the commit on; the audit names the
/// old and the new credential id, never a token.
pub(super) fn on_rotate_credential(view: &impl View, instance_id: String, credential: DekCredential, at: DateTime<Utc>) -> Decision {
    let Some(mut inst) = view.instance(&instance_id) else {
        return decision(vec![], Reply::NotFound(format!("instance {instance_id} does not exist")));
    };
    if inst.wrapped.is_none() {
        return decision(vec![], Reply::Conflict(format!("instance {instance_id} is destroyed: it has no DEK, so it needs no credential")));
    }
    let replaced = inst.credential.as_ref().map_or_else(|| "none".to_string(), |c| c.id.clone());
    let audit = Record::Audit(AuditFact {
        who: "api".into(),
        what: "dek credential rotated".into(),
        outcome: "rotated".into(),
        key_id: Some(inst.key_id.clone()),
        instance_id: Some(inst.instance_id.clone()),
        detail: Some(format!("dek credential {} replaces {replaced}", credential.id)),
        ..Default::default()
    });
    inst.credential = Some(credential);
    inst.updated_at = at;
    decision(vec![Record::Instance(inst), audit], Reply::Done)
}

/// Records what an instance's agent did with a command.
///
/// - An unknown instance is `NotFound`.
/// - A report older (by the agent's clock) than the one kept does not replace
///   it: a retried report of an earlier command must not hide a later one.
///   The same command reported again (its `failed` and then its `enforced`)
///   replaces it.
/// - Each accepted report is audited, naming the command and its outcome.
pub(super) fn on_data_plane_report(view: &impl View, instance_id: String, status: DataPlaneStatus) -> Decision {
    let Some(mut inst) = view.instance(&instance_id) else {
        return decision(vec![], Reply::NotFound(format!("instance {instance_id} does not exist")));
    };
    if inst.data_plane.as_ref().is_some_and(|kept| kept.command_id != status.command_id && kept.at > status.at) {
        return decision(vec![], Reply::Done);
    }
    let audit = Record::Audit(AuditFact {
        who: "data-plane agent".into(),
        what: format!("command {}", serde_json::to_value(status.action).ok().and_then(|v| v.as_str().map(str::to_owned)).unwrap_or_default()),
        outcome: serde_json::to_value(status.outcome).ok().and_then(|v| v.as_str().map(str::to_owned)).unwrap_or_default(),
        key_id: Some(inst.key_id.clone()),
        instance_id: Some(inst.instance_id.clone()),
        detail: Some(format!("command {} at {}", status.command_id, status.at.to_rfc3339())),
        ..Default::default()
    });
    inst.updated_at = status.received_at;
    inst.data_plane = Some(status);
    decision(vec![Record::Instance(inst), audit], Reply::Done)
}
