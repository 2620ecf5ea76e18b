//! The decision: (input, current state) → state-change records + effects.
//!
//! Pure: no I/O, no clock (time arrives inside the input), no randomness. Everything
//! that must be correct — duplicates, stale events, state transitions, what to
//! publish — is decided here and can be tested without a broker or a store.

mod instances;
mod purge;
mod rotation;
mod types;

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use chrono::{DateTime, Utc};

pub use types::*;

/// Read access to current state. The store implements it; `Overlay` layers the
/// records of a batch that is not yet committed on top.
pub trait View {
    fn key(&self, key_id: &str) -> Option<KeyRecord>;
    fn instance(&self, instance_id: &str) -> Option<InstanceRecord>;
    fn event_seen(&self, event_id: &str) -> bool;
    fn job(&self, key_id: &str) -> Option<RotationJob>;
    fn instances_of(&self, key_id: &str) -> Vec<InstanceRecord>;
}

#[derive(Debug, Clone)]
pub enum Input {
    /// `kms` is the key's state as its KMS reported it just before, when asked.
    Event {
        event: LifecycleEvent,
        at: DateTime<Utc>,
        kms: Option<KeyStatus>,
    },
    /// The embedded KMS created a key: keywarden knows it before any event.
    RegisterKey {
        key_id: String,
        version: String,
        at: DateTime<Utc>,
    },
    CreateInstance {
        instance_id: String,
        key_id: String,
        wrapped: WrappedDek,
        fingerprint: String,
        at: DateTime<Utc>,
    },
    DeleteInstance {
        instance_id: String,
        request_id: String,
        at: DateTime<Utc>,
    },
    JobPlanned {
        key_id: String,
        target_version: String,
        total: u64,
    },
    Rewrapped {
        instance_id: String,
        from_version: String,
        wrapped: WrappedDek,
        at: DateTime<Utc>,
    },
    RewrapFailed {
        instance_id: String,
        from_version: String,
        reason: String,
        at: DateTime<Utc>,
    },
    JobFinished {
        key_id: String,
        target_version: String,
        at: DateTime<Utc>,
    },
    Purge {
        key_id: String,
        purge_after: Duration,
        at: DateTime<Utc>,
    },
    /// A condition the monitor or the reconciliation found, or its end.
    Alert(Alert),
    /// An operator asks for another rotation pass over the key's instances
    /// whose rewrap failed (after fixing what the KMS refused).
    RetryRewraps {
        key_id: String,
        request_id: String,
        at: DateTime<Utc>,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    Event { outcome: Outcome, detail: String },
    Created(Box<InstanceRecord>),
    Conflict(String),
    NotFound(String),
    Done,
}

pub struct Decision {
    pub records: Vec<Record>,
    pub reply: Reply,
}

fn notice(key_id: &str, notice: Notice) -> Effect {
    Effect::KmsNotice { key_id: key_id.to_string(), notice }
}

fn decision(records: Vec<Record>, reply: Reply) -> Decision {
    Decision { records, reply }
}

pub fn decide(view: &impl View, input: Input) -> Decision {
    match input {
        Input::Event { event, at, kms } => decide_event(view, event, at, kms),
        Input::RegisterKey { key_id, version, at } => instances::on_register_key(view, key_id, version, at),
        Input::CreateInstance { instance_id, key_id, wrapped, fingerprint, at } => {
            instances::on_create_instance(view, instance_id, key_id, wrapped, fingerprint, at)
        }
        Input::DeleteInstance { instance_id, request_id, at } => instances::on_delete_instance(view, instance_id, request_id, at),
        Input::JobPlanned { key_id, target_version, total } => rotation::on_job_planned(view, key_id, target_version, total),
        Input::Rewrapped { instance_id, from_version, wrapped, at } => rotation::on_rewrapped(view, instance_id, from_version, wrapped, at),
        Input::RewrapFailed { instance_id, from_version, reason, at } => rotation::on_rewrap_failed(view, instance_id, from_version, reason, at),
        Input::JobFinished { key_id, target_version, at } => rotation::on_job_finished(view, key_id, target_version, at),
        Input::Alert(alert) => decision(vec![Record::Outbox(Effect::Alert(alert))], Reply::Done),
        Input::RetryRewraps { key_id, request_id, at } => rotation::on_retry_rewraps(view, key_id, request_id, at),
        Input::Purge { key_id, purge_after, at } => purge::on_purge(view, key_id, purge_after, at),
    }
}

fn decide_event(view: &impl View, event: LifecycleEvent, at: DateTime<Utc>, kms: Option<KeyStatus>) -> Decision {
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
    // An ignored event was still the newest word on this key: anything older is stale.
    if matches!(outcome, Outcome::Applied | Outcome::Ignored) {
        key.last_event_at = Some(event.occurred_at);
        key.last_event_id = Some(event.event_id.clone());
        key.updated_at = at;
    }
    // The key is recorded even when nothing else changed, so that an instance
    // created later under this key starts in the state the events imply.
    if outcome == Outcome::Applied {
        let state = match (event.kind, key.status) {
            (EventType::Rotate, _) => None, // acknowledged when the rotation finishes
            (_, KeyStatus::Active) => Some(AdopterState::Enabled),
            (_, KeyStatus::Disabled) => Some(AdopterState::Disabled),
            (_, KeyStatus::Deleted) => Some(AdopterState::Deleted),
        };
        if let Some(state) = state {
            records.push(Record::Outbox(notice(
                &event.key_id,
                Notice::Acknowledge {
                    event_id: event.event_id.clone(),
                    state,
                    key_version: key.version.clone(),
                    at,
                    correlation_id: event.correlation_id.clone(),
                },
            )));
        }
    }
    if outcome != Outcome::Stale || view.key(&event.key_id).is_none() {
        records.push(Record::Key(key));
    }
    records.push(Record::Audit(AuditFact {
        who: if event.event_id.starts_with("reconcile:") { "schedule:reconcile" } else { "kms-event" }.into(),
        what: format!("event {}", event.kind),
        outcome: outcome.as_str().into(),
        event_id: Some(event.event_id.clone()),
        key_id: Some(event.key_id.clone()),
        key_version: event.key_version.clone(),
        correlation_id: event.correlation_id.clone(),
        detail: Some(detail.clone()),
        ..Default::default()
    }));
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

fn transition(view: &impl View, key: &mut KeyRecord, event: &LifecycleEvent, at: DateTime<Utc>) -> (Outcome, String, Vec<Record>) {
    let key_commands = |action: CommandAction, version: Option<String>| {
        Record::Outbox(Effect::KeyCommands {
            key_id: event.key_id.clone(),
            action,
            key_version: version,
            cause_event_id: event.event_id.clone(),
            issued_at: at,
            correlation_id: event.correlation_id.clone(),
            traceparent: event.traceparent.clone(),
        })
    };
    let ignored = |why: &str| (Outcome::Ignored, why.to_string(), vec![]);
    let key_alert = |kind: EventType| {
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
    };
    let raise = |kind: EventType| Record::Outbox(Effect::Alert(key_alert(kind)));
    let clear = |kind: EventType| Record::Outbox(Effect::Alert(key_alert(kind).resolved(at)));
    match (event.kind, key.status) {
        (EventType::Rotate, KeyStatus::Deleted) => ignored("key is deleted; a rotate cannot bring it back"),
        (EventType::Rotate, _) => {
            let Some(version) = event.key_version.clone() else {
                return ignored("rotate without key_version");
            };
            key.version = Some(version.clone());
            let job = RotationJob {
                key_id: key.key_id.clone(),
                target_version: version.clone(),
                cause_event_id: event.event_id.clone(),
                acknowledge: true,
                correlation_id: event.correlation_id.clone(),
                traceparent: event.traceparent.clone(),
                started_at: at,
                total: None,
                done: 0,
                failed: 0,
                finished_at: None,
            };
            let detail = if key.status == KeyStatus::Disabled {
                format!("rotation to version {version} waits until the key is enabled")
            } else {
                format!("rotation to version {version} started")
            };
            (Outcome::Applied, detail, vec![Record::Job(job)])
        }
        (EventType::Disable, KeyStatus::Active) => {
            key.status = KeyStatus::Disabled;
            (Outcome::Applied, "key disabled; DEKs revoked".into(), vec![key_commands(CommandAction::Revoke, key.version.clone()), raise(EventType::Disable)])
        }
        (EventType::Disable, KeyStatus::Disabled) => (Outcome::Applied, "key was already disabled".into(), vec![]),
        (EventType::Disable, KeyStatus::Deleted) => ignored("key is deleted; disable changes nothing"),
        (EventType::Enable, KeyStatus::Disabled) => {
            key.status = KeyStatus::Active;
            (Outcome::Applied, "key enabled; DEKs restored".into(), vec![key_commands(CommandAction::Restore, key.version.clone()), clear(EventType::Disable)])
        }
        (EventType::Enable, KeyStatus::Active) => (Outcome::Applied, "key was already enabled".into(), vec![]),
        (EventType::Enable, KeyStatus::Deleted) => ignored("key is deleted; restore it rather than enable it"),
        (EventType::Delete, _) if event.material_destroyed && key.purged_at.is_none() => {
            // Per instance, not key-wide: the relay fans a key-wide command out to
            // instances that still hold a wrapped DEK, and none will after this.
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
            key.deleted_at = key.deleted_at.or(Some(event.occurred_at));
            key.purged_at = Some(at);
            let reason = format!("purged: the kms destroyed the material of key {} at {}", key.key_id, event.occurred_at.to_rfc3339());
            let mut records = erase;
            records.push(raise(EventType::Delete));
            records.extend(purge::purge_instances(view, &key.key_id, &reason, "kms-event", at));
            (Outcome::Applied, "the kms destroyed the key material; wrapped DEKs purged, nothing can restore them".into(), records)
        }
        (EventType::Delete, KeyStatus::Deleted) => (Outcome::Applied, "key was already deleted".into(), vec![]),
        (EventType::Delete, _) => {
            key.status = KeyStatus::Deleted;
            key.deleted_at = Some(event.occurred_at);
            key.purged_at = None;
            (
                Outcome::Applied,
                "key deleted; DEKs erased until restored or purged".into(),
                vec![key_commands(CommandAction::Erase, key.version.clone()), raise(EventType::Delete), clear(EventType::Disable)],
            )
        }
        (EventType::Restore, KeyStatus::Deleted) => {
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
                    vec![clear(EventType::Delete)],
                )
            } else {
                (
                    Outcome::Applied,
                    "key restored; DEKs served again".into(),
                    vec![key_commands(CommandAction::Restore, key.version.clone()), clear(EventType::Delete)],
                )
            }
        }
        (EventType::Restore, _) => ignored("key is not deleted; restore changes nothing"),
    }
}

/// The records of a batch that is not committed yet, layered over a base view so
/// that each input of the batch sees the ones before it.
pub struct Overlay<'a, V: View> {
    base: &'a V,
    keys: HashMap<String, KeyRecord>,
    instances: HashMap<String, InstanceRecord>,
    events: HashSet<String>,
    jobs: HashMap<String, RotationJob>,
}

impl<'a, V: View> Overlay<'a, V> {
    pub fn new(base: &'a V) -> Self {
        Overlay { base, keys: HashMap::new(), instances: HashMap::new(), events: HashSet::new(), jobs: HashMap::new() }
    }

    pub fn absorb(&mut self, records: &[Record]) {
        for r in records {
            match r {
                Record::Key(k) => {
                    self.keys.insert(k.key_id.clone(), k.clone());
                }
                Record::Instance(i) => {
                    self.instances.insert(i.instance_id.clone(), i.clone());
                }
                Record::Event(e) => {
                    self.events.insert(e.event_id.clone());
                }
                Record::Job(j) => {
                    self.jobs.insert(j.key_id.clone(), j.clone());
                }
                Record::Outbox(_) | Record::Offset { .. } | Record::Audit(_) => {}
            }
        }
    }
}

impl<V: View> View for Overlay<'_, V> {
    fn key(&self, key_id: &str) -> Option<KeyRecord> {
        self.keys.get(key_id).cloned().or_else(|| self.base.key(key_id))
    }
    fn instance(&self, instance_id: &str) -> Option<InstanceRecord> {
        self.instances.get(instance_id).cloned().or_else(|| self.base.instance(instance_id))
    }
    fn event_seen(&self, event_id: &str) -> bool {
        self.events.contains(event_id) || self.base.event_seen(event_id)
    }
    fn job(&self, key_id: &str) -> Option<RotationJob> {
        self.jobs.get(key_id).cloned().or_else(|| self.base.job(key_id))
    }
    fn instances_of(&self, key_id: &str) -> Vec<InstanceRecord> {
        let mut list = self.base.instances_of(key_id);
        for inst in list.iter_mut() {
            if let Some(newer) = self.instances.get(&inst.instance_id) {
                *inst = newer.clone();
            }
        }
        let known: HashSet<String> = list.iter().map(|i| i.instance_id.clone()).collect();
        list.extend(self.instances.values().filter(|i| i.key_id == key_id && !known.contains(&i.instance_id)).cloned());
        list
    }
}

#[cfg(test)]
mod tests;
