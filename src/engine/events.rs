//! Lifecycle events from the KMS: rotate, disable, enable, delete, restore.
//!
//! Intake is at-least-once and unordered across partitions and reconciliation,
//! so an event may arrive twice or after a newer one. [`on_event`] sorts those
//! out first; only an event that is new and not older than the key's last
//! applied one reaches [`transition`], which dispatches to one function per
//! event type.

use chrono::{DateTime, Utc};

use super::purge::purge_instances;
use super::{decision, notice, Decision, Reply, View};
use super::{
    AdopterState, Alert, AuditFact, CommandAction, Effect, EventRecord, EventType, KeyRecord, KeyStatus, LifecycleEvent, Notice, Outcome, Record, RotationJob,
    Severity,
};

/// What a transition decided: its outcome, the detail that the reply, the audit
/// and the event record carry, and the records beyond the key's own.
type Transition = (Outcome, String, Vec<Record>);

/// Applies a lifecycle event to its key; `kms` is the key's state as the KMS
/// reported it just before, when asked.
///
/// - Duplicate: an event id already applied changes nothing and records
///   nothing, so redelivery is harmless.
/// - Stale: an event that occurred before the key's last applied event leaves
///   the state as it is (the newer word wins), but is recorded and audited.
/// - Ignored: a delete the KMS contradicts (it reports the key active) erases
///   nothing: crypto-erasure only when the KMS agrees the key is gone (the Key
///   Protect adopter rule). Transitions that make no sense for the key's state
///   are ignored too (see [`transition`]).
/// - Applied: the transition's records, and an acknowledgement to the KMS
///   (see [`acknowledgement`]).
///
/// Only an applied event becomes the key's last event, so that anything older
/// is stale. An ignored, vetoed or stale event leaves it where it was: its
/// `occurred_at` is the producer's claim, and a claim that changed nothing must
/// not decide which later events count (one dated in the future would make
/// every real event after it stale). The key is recorded even when nothing else
/// changed, so that an instance created later under it starts in the state the
/// events imply. Every event that is not a duplicate is audited and recorded as
/// seen.
pub(super) fn on_event(view: &impl View, event: LifecycleEvent, at: DateTime<Utc>, kms: Option<KeyStatus>) -> Decision {
    if view.event_seen(&event.event_id) {
        return decision(vec![], Reply::Event { outcome: Outcome::Duplicate, detail: "event already applied".into() });
    }
    let mut key = view.key(&event.key_id).unwrap_or_else(|| KeyRecord::new(&event.key_id, at));
    let (outcome, detail, mut records) = match key.last_event_at {
        Some(last) if event.occurred_at < last => (
            Outcome::Stale,
            format!(
                "occurred at {} before the last applied event {} at {}; state left as it is",
                event.occurred_at.to_rfc3339(),
                key.last_event_id.as_deref().unwrap_or("?"),
                last.to_rfc3339()
            ),
            vec![],
        ),
        // Crypto-erasure only when the KMS agrees the key is gone (the Key
        // Protect adopter rule): a delete it contradicts changes nothing.
        _ if event.kind == EventType::Delete && kms == Some(KeyStatus::Active) => {
            (Outcome::Ignored, "the kms reports the key active; a delete it does not confirm is not applied".to_string(), vec![])
        }
        _ => transition(view, &mut key, &event, at),
    };
    // Only what was applied is the key's newest word: anything older is stale.
    if outcome == Outcome::Applied {
        key.last_event_at = Some(event.occurred_at);
        key.last_event_id = Some(event.event_id.clone());
        key.updated_at = at;
        records.extend(acknowledgement(&event, &key, at));
    }
    // The key is recorded even when nothing else changed, so that an instance
    // created later under this key starts in the state the events imply.
    if outcome != Outcome::Stale || view.key(&event.key_id).is_none() {
        records.push(Record::Key(key));
    }
    records.push(audit(&event, outcome, &detail));
    records.push(Record::Event(EventRecord {
        event_id: event.event_id,
        key_id: event.key_id,
        kind: event.kind,
        occurred_at: event.occurred_at,
        applied_at: at,
        outcome,
        detail: detail.clone(),
        correlation_id: event.correlation_id,
    }));
    decision(records, Reply::Event { outcome, detail })
}

/// The acknowledgement of an applied event to the KMS: the state the key's DEKs
/// are in now that it was applied.
///
/// A rotate is not acknowledged here but when its rotation finishes (see
/// `rotation::on_job_finished`): until then the DEKs are not rewrapped.
fn acknowledgement(event: &LifecycleEvent, key: &KeyRecord, at: DateTime<Utc>) -> Option<Record> {
    let state = match (event.kind, key.status) {
        (EventType::Rotate, _) => None, // acknowledged when the rotation finishes
        (_, KeyStatus::Active) => Some(AdopterState::Enabled),
        (_, KeyStatus::Disabled) => Some(AdopterState::Disabled),
        (_, KeyStatus::Deleted) => Some(AdopterState::Deleted),
    };
    state.map(|state| {
        Record::Outbox(notice(
            &event.key_id,
            Notice::Acknowledge { event_id: event.event_id.clone(), state, key_version: key.version.clone(), at, correlation_id: event.correlation_id.clone() },
        ))
    })
}

/// The audit fact of an event that was not a duplicate, whatever its outcome:
/// who sent it (the reconciliation or the KMS) and what became of it.
fn audit(event: &LifecycleEvent, outcome: Outcome, detail: &str) -> Record {
    Record::Audit(AuditFact {
        who: if event.event_id.starts_with("reconcile:") { "schedule:reconcile" } else { "kms-event" }.into(),
        what: format!("event {}", event.kind),
        outcome: outcome.as_str().into(),
        event_id: Some(event.event_id.clone()),
        key_id: Some(event.key_id.clone()),
        key_version: event.key_version.clone(),
        correlation_id: event.correlation_id.clone(),
        detail: Some(detail.to_string()),
        ..Default::default()
    })
}

/// Changes `key` as a new, current event of its type demands, and returns the
/// outcome with the records it causes. One function per event type; each
/// decides from the key's status whether the event applies, is a no-op that
/// still counts as applied (the key already is in that state), or is ignored.
fn transition(view: &impl View, key: &mut KeyRecord, event: &LifecycleEvent, at: DateTime<Utc>) -> Transition {
    match event.kind {
        EventType::Rotate => on_rotate(view, key, event, at),
        EventType::Disable => on_disable(key, event, at),
        EventType::Enable => on_enable(key, event, at),
        EventType::Delete => on_delete(view, key, event, at),
        EventType::Restore => on_restore(view, key, event, at),
    }
}

/// A rotate sets the key's newest version and starts a rotation job towards it;
/// the job is acknowledged to the KMS when it finishes with every DEK
/// rewrapped. A job it replaces that still owed acknowledgements (a rotation
/// that left DEKs behind, or had not ended) hands them on: rewrapping every
/// DEK to the newer version completes the older rotation too.
///
/// - A deleted key is not rotated: a rotate cannot bring it back.
/// - A rotate without a version has nothing to rotate to and is ignored.
/// - A disabled key gets its job too, but the rotation waits until the key is
///   enabled (the detail says so): its DEKs cannot be rewrapped meanwhile.
fn on_rotate(view: &impl View, key: &mut KeyRecord, event: &LifecycleEvent, at: DateTime<Utc>) -> Transition {
    if key.status == KeyStatus::Deleted {
        return ignored("key is deleted; a rotate cannot bring it back");
    }
    let Some(version) = event.key_version.clone() else {
        return ignored("rotate without key_version");
    };
    key.version = Some(version.clone());
    let previous = view.job(&key.key_id);
    let job = RotationJob {
        key_id: key.key_id.clone(),
        target_version: version.clone(),
        cause_event_id: event.event_id.clone(),
        acknowledge: true,
        acknowledges: previous.as_ref().map(RotationJob::owed_acknowledgements).unwrap_or_default(),
        correlation_id: event.correlation_id.clone(),
        traceparent: event.traceparent.clone(),
        started_at: at,
        total: None,
        done: 0,
        // Instances the replaced job failed stay counted until rewrapped.
        failed: previous.as_ref().map_or(0, |j| j.failed),
        finished_at: None,
        rewrapping_to: None,
        arrivals: 0,
    };
    let detail = if key.status == KeyStatus::Disabled {
        format!("rotation to version {version} waits until the key is enabled")
    } else {
        format!("rotation to version {version} started")
    };
    (Outcome::Applied, detail, vec![Record::Job(job)])
}

/// A disable of an active key revokes its DEKs with one key-wide command and
/// raises the key-disabled alert.
///
/// An already disabled key is applied without commands (and acknowledged
/// again); a deleted key stays deleted, so the disable is ignored.
fn on_disable(key: &mut KeyRecord, event: &LifecycleEvent, at: DateTime<Utc>) -> Transition {
    match key.status {
        KeyStatus::Active => {
            key.status = KeyStatus::Disabled;
            (
                Outcome::Applied,
                "key disabled; DEKs revoked".into(),
                vec![key_commands(event, at, CommandAction::Revoke, key.version.clone()), raise(event, at, EventType::Disable)],
            )
        }
        KeyStatus::Disabled => (Outcome::Applied, "key was already disabled".into(), vec![]),
        KeyStatus::Deleted => ignored("key is deleted; disable changes nothing"),
    }
}

/// An enable of a disabled key restores its DEKs with one key-wide command and
/// resolves the key-disabled alert.
///
/// An already active key is applied without commands; a deleted key needs a
/// restore, not an enable, so the enable is ignored.
fn on_enable(key: &mut KeyRecord, event: &LifecycleEvent, at: DateTime<Utc>) -> Transition {
    match key.status {
        KeyStatus::Disabled => {
            key.status = KeyStatus::Active;
            (
                Outcome::Applied,
                "key enabled; DEKs restored".into(),
                vec![key_commands(event, at, CommandAction::Restore, key.version.clone()), clear(event, at, EventType::Disable)],
            )
        }
        KeyStatus::Active => (Outcome::Applied, "key was already enabled".into(), vec![]),
        KeyStatus::Deleted => ignored("key is deleted; restore it rather than enable it"),
    }
}

/// A delete erases the key's DEKs until a restore or the purge.
///
/// - If the KMS destroyed the key material itself, see [`on_material_destroyed`]
///   (unless the key was purged already: then nothing is left to destroy).
/// - An already deleted key is applied without commands.
/// - Otherwise the key becomes deleted as of `at`, when keywarden applied the
///   delete, not the event's claimed time: the restore window starts then, so
///   a back-dated delete cannot shorten it (or skip it at the next purge
///   sweep). One key-wide erase command goes out, the key-deleted alert is
///   raised and a key-disabled alert resolved (the delete supersedes it).
fn on_delete(view: &impl View, key: &mut KeyRecord, event: &LifecycleEvent, at: DateTime<Utc>) -> Transition {
    if event.material_destroyed && key.purged_at.is_none() {
        return on_material_destroyed(view, key, event, at);
    }
    match key.status {
        KeyStatus::Deleted => (Outcome::Applied, "key was already deleted".into(), vec![]),
        KeyStatus::Active | KeyStatus::Disabled => {
            key.status = KeyStatus::Deleted;
            key.deleted_at = Some(at);
            key.purged_at = None;
            (
                Outcome::Applied,
                "key deleted; DEKs erased until restored or purged".into(),
                vec![
                    key_commands(event, at, CommandAction::Erase, key.version.clone()),
                    raise(event, at, EventType::Delete),
                    clear(event, at, EventType::Disable),
                ],
            )
        }
    }
}

/// The KMS destroyed the key material (AWS "KMS CMK Deletion"): the wrapped
/// DEKs can never be unwrapped again, so they are purged at once rather than
/// after the restore window.
///
/// A key that was not deleted yet gets one erase command per instance that
/// still holds a wrapped DEK, not a key-wide one: the relay fans a key-wide
/// command out to instances that still hold a wrapped DEK, and none will after
/// this. A key already deleted had its erase then. The key keeps its first
/// deletion time (or takes `at`, when keywarden applied this, for the same
/// reason as in [`on_delete`]), is marked purged, and the key-deleted alert is
/// raised.
fn on_material_destroyed(view: &impl View, key: &mut KeyRecord, event: &LifecycleEvent, at: DateTime<Utc>) -> Transition {
    let erase: Vec<Record> = if key.status == KeyStatus::Deleted {
        vec![]
    } else {
        view.instances_of(&key.key_id)
            .into_iter()
            .filter(|i| i.wrapped.is_some())
            .map(|i| {
                Record::Outbox(Effect::InstanceCommand {
                    instance_id: i.instance_id,
                    key_id: key.key_id.clone(),
                    action: CommandAction::Erase,
                    key_version: Some(i.key_version),
                    cause_event_id: event.event_id.clone(),
                    issued_at: at,
                    correlation_id: event.correlation_id.clone(),
                    traceparent: event.traceparent.clone(),
                })
            })
            .collect()
    };
    key.status = KeyStatus::Deleted;
    key.deleted_at = key.deleted_at.or(Some(at));
    key.purged_at = Some(at);
    let reason = format!("purged: the kms destroyed the material of key {} at {}", key.key_id, event.occurred_at.to_rfc3339());
    let mut records = erase;
    records.push(raise(event, at, EventType::Delete));
    records.extend(purge_instances(view, &key.key_id, &reason, "kms-event", at));
    (Outcome::Applied, "the kms destroyed the key material; wrapped DEKs purged, nothing can restore them".into(), records)
}

/// A restore of a deleted key makes it active again and resolves the
/// key-deleted alert.
///
/// Inside the restore window its DEKs are served again (one key-wide restore
/// command). After a purge nothing can bring them back: no command goes out and
/// the detail says how many instances stay destroyed and since when. A key that
/// is not deleted has nothing to restore, so the restore is ignored.
fn on_restore(view: &impl View, key: &mut KeyRecord, event: &LifecycleEvent, at: DateTime<Utc>) -> Transition {
    if key.status != KeyStatus::Deleted {
        return ignored("key is not deleted; restore changes nothing");
    }
    key.status = KeyStatus::Active;
    key.deleted_at = None;
    if let Some(purged) = key.purged_at {
        let destroyed = view.instances_of(&key.key_id).len();
        (
            Outcome::Applied,
            format!(
                "key restored, but its wrapped DEKs were purged at {}: {destroyed} instance(s) stay destroyed and cannot be recovered",
                purged.to_rfc3339()
            ),
            vec![clear(event, at, EventType::Delete)],
        )
    } else {
        (
            Outcome::Applied,
            "key restored; DEKs served again".into(),
            vec![key_commands(event, at, CommandAction::Restore, key.version.clone()), clear(event, at, EventType::Delete)],
        )
    }
}

/// An event that does not apply to the key's state: nothing changes, not even
/// the key's last event, and `why` is the detail.
fn ignored(why: &str) -> Transition {
    (Outcome::Ignored, why.to_string(), vec![])
}

/// One command for every instance of the event's key, caused by the event and
/// carrying its correlation id and trace.
fn key_commands(event: &LifecycleEvent, at: DateTime<Utc>, action: CommandAction, version: Option<String>) -> Record {
    Record::Outbox(Effect::KeyCommands {
        key_id: event.key_id.clone(),
        action,
        key_version: version,
        cause_event_id: event.event_id.clone(),
        issued_at: at,
        correlation_id: event.correlation_id.clone(),
        traceparent: event.traceparent.clone(),
    })
}

/// The alert that the event's key was deleted (critical) or disabled
/// (warning); its instances are counted when it is sent.
fn key_alert(event: &LifecycleEvent, at: DateTime<Utc>, kind: EventType) -> Alert {
    let (name, severity, what) = match kind {
        EventType::Delete => ("KeywardenKeyDeleted", Severity::Critical, "deleted: its DEKs are erased until a restore"),
        _ => ("KeywardenKeyDisabled", Severity::Warning, "disabled: its DEKs are revoked until it is enabled"),
    };
    let mut a = Alert::new(
        name,
        severity,
        &[("key_id", &event.key_id)],
        format!("root key {} was {}", event.key_id, what.split(':').next().unwrap_or(what)),
        format!("root key {} was {what} (event {})", event.key_id, event.event_id),
        at,
    );
    a.count_instances_of = Some(event.key_id.clone());
    a
}

/// Raises the key alert for `kind` (see [`key_alert`]).
fn raise(event: &LifecycleEvent, at: DateTime<Utc>, kind: EventType) -> Record {
    Record::Outbox(Effect::Alert(key_alert(event, at, kind)))
}

/// Resolves the key alert for `kind` as of `at`.
fn clear(event: &LifecycleEvent, at: DateTime<Utc>, kind: EventType) -> Record {
    Record::Outbox(Effect::Alert(key_alert(event, at, kind).resolved(at)))
}
