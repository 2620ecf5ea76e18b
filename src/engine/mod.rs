//! The decision: (input, current state) → state-change records + effects.
//!
//! Pure: no I/O, no clock (time arrives inside the input), no randomness. Everything
//! that must be correct — duplicates, stale events, state transitions, what to
//! publish — is decided here and can be tested without a broker or a store.

mod coalesce;
mod events;
mod instances;
mod purge;
mod rotation;
mod types;

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use chrono::{DateTime, Utc};

pub use coalesce::coalesce;
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
        /// The hash of the DEK token the API hands out once; the token itself
        /// never enters the engine.
        credential: DekCredential,
        at: DateTime<Utc>,
    },
    /// An operator replaces an instance's DEK credential (a leaked or lost
    /// token, or an instance from before credentials): the old one stops
    /// working the moment this is committed.
    RotateCredential {
        instance_id: String,
        credential: DekCredential,
        at: DateTime<Utc>,
    },
    DeleteInstance {
        instance_id: String,
        request_id: String,
        at: DateTime<Utc>,
    },
    /// An instance's data-plane agent reports how a command ended. The API
    /// checked its credential and that keywarden issued the command to this
    /// instance; `status.received_at` is when it arrived.
    DataPlaneReport {
        instance_id: String,
        status: DataPlaneStatus,
    },
    /// A pass of the job for `target_version` read the key: `total` needed
    /// a rewrap, to `rewrapping_to` (the KMS's newest version, which an
    /// event's label or a missing version does not name).
    JobPlanned {
        key_id: String,
        target_version: String,
        total: u64,
        rewrapping_to: String,
    },
    /// `job` is the cause event id of the rotation job whose pass did the
    /// rewrap: only that job counts it, not a newer one that replaced it.
    Rewrapped {
        instance_id: String,
        from_version: String,
        wrapped: WrappedDek,
        job: String,
        at: DateTime<Utc>,
    },
    RewrapFailed {
        instance_id: String,
        from_version: String,
        reason: String,
        job: String,
        at: DateTime<Utc>,
    },
    JobFinished {
        key_id: String,
        target_version: String,
        /// The finished job's `cause_event_id`: a pass of a job that another
        /// (an operator's retry) replaced meanwhile closes nothing.
        job: String,
        /// Rewraps the KMS refused in the pass that ended the job. That pass
        /// went through every instance not yet on the newest version, so
        /// these are the DEKs the rotation leaves behind (or, when the engine
        /// dropped a report because the DEK had changed meanwhile, more).
        failed: u64,
        /// The job's `arrivals` when the pass began: a pass that began before
        /// an instance arrived under an older version does not end the job.
        arrivals: u64,
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

/// Decides what one input changes, given the current state in `view`: the
/// records to commit (state, outbox, audit) and the reply to whoever submitted
/// it.
///
/// Only a dispatch: each kind of input has its own function, which says what
/// it decides and why — lifecycle events in `events`, instances made through
/// the API in `instances`, a rotation's progress in `rotation`, the purge in
/// `purge`.
pub fn decide(view: &impl View, input: Input) -> Decision {
    match input {
        Input::Event { event, at, kms } => events::on_event(view, event, at, kms),
        Input::RegisterKey { key_id, version, at } => instances::on_register_key(view, key_id, version, at),
        Input::CreateInstance { instance_id, key_id, wrapped, fingerprint, credential, at } => {
            instances::on_create_instance(view, instance_id, key_id, wrapped, fingerprint, credential, at)
        }
        Input::RotateCredential { instance_id, credential, at } => instances::on_rotate_credential(view, instance_id, credential, at),
        Input::DeleteInstance { instance_id, request_id, at } => instances::on_delete_instance(view, instance_id, request_id, at),
        Input::DataPlaneReport { instance_id, status } => instances::on_data_plane_report(view, instance_id, status),
        Input::JobPlanned { key_id, target_version, total, rewrapping_to } => rotation::on_job_planned(view, key_id, target_version, total, rewrapping_to),
        Input::Rewrapped { instance_id, from_version, wrapped, job, at } => rotation::on_rewrapped(view, instance_id, from_version, wrapped, &job, at),
        Input::RewrapFailed { instance_id, from_version, reason, job, at } => rotation::on_rewrap_failed(view, instance_id, from_version, reason, &job, at),
        Input::JobFinished { key_id, target_version, job, failed, arrivals, at } => {
            rotation::on_job_finished(view, key_id, target_version, job, failed, arrivals, at)
        }
        Input::Alert(alert) => on_alert(alert),
        Input::RetryRewraps { key_id, request_id, at } => rotation::on_retry_rewraps(view, key_id, request_id, at),
        Input::Purge { key_id, purge_after, at } => purge::on_purge(view, key_id, purge_after, at),
    }
}

/// An alert raised or resolved by the monitor or the reconciliation goes to the
/// outbox as it is: there is nothing to decide about it, and going through the
/// engine publishes it like every other effect, from the outbox.
fn on_alert(alert: Alert) -> Decision {
    decision(vec![Record::Outbox(Effect::Alert(alert))], Reply::Done)
}

impl Input {
    /// The key this input is about, so that the writer can check once per input
    /// that this node owns the key before deciding anything.
    ///
    /// Read from the input where it names the key (an event's key, and every
    /// variant with a `key_id`). Inputs that name only an instance (a delete
    /// and the rewrap results) are about that instance's key, looked up through
    /// `view`. `None` for an alert, which belongs to no one key, and for an
    /// instance `view` does not know: such an input changes no key's state
    /// (the delete is `NotFound`, a rewrap result is dropped).
    pub fn key_id(&self, view: &impl View) -> Option<String> {
        match self {
            Input::Event { event, .. } => Some(event.key_id.clone()),
            Input::RegisterKey { key_id, .. }
            | Input::CreateInstance { key_id, .. }
            | Input::JobPlanned { key_id, .. }
            | Input::JobFinished { key_id, .. }
            | Input::Purge { key_id, .. }
            | Input::RetryRewraps { key_id, .. } => Some(key_id.clone()),
            Input::DeleteInstance { instance_id, .. }
            | Input::RotateCredential { instance_id, .. }
            | Input::DataPlaneReport { instance_id, .. }
            | Input::Rewrapped { instance_id, .. }
            | Input::RewrapFailed { instance_id, .. } => view.instance(instance_id).map(|i| i.key_id),
            Input::Alert(_) => None,
        }
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
mod key_id_tests;
#[cfg(test)]
mod tests;
