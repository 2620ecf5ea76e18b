//! A rotation's progress: the job a rotate event (or an operator's retry)
//! started, the rewrap result of each instance, and the job's end.
//!
//! The rotation worker reads a wrapped DEK, asks the KMS to rewrap it and
//! reports back; every report may be late, repeated, or overtaken by a delete,
//! so each one is checked against the current state before it changes anything.

use chrono::{DateTime, Utc};

use super::{decision, notice, Decision, Reply, View};
use super::{AdopterState, AuditFact, CommandAction, Effect, KeyStatus, Notice, Record, RotationJob, WrappedDek};

/// Records how many instances the job for `target_version` has to rewrap,
/// and the version its pass rewraps them to.
///
/// Only the first plan of the key's current job sets the total: a plan for an
/// older target (a rotation that was superseded) leaves the job as it is, and
/// a later pass's plan, only its version, so progress is measured against
/// one total, that of the first pass.
pub(super) fn on_job_planned(view: &impl View, key_id: String, target_version: String, total: u64, rewrapping_to: String) -> Decision {
    match view.job(&key_id) {
        Some(mut job) if job.target_version == target_version && job.finished_at.is_none() => {
            let planned = job.total.is_none() || job.rewrapping_to.as_deref() != Some(rewrapping_to.as_str());
            job.total.get_or_insert(total);
            job.rewrapping_to = Some(rewrapping_to);
            decision(if planned { vec![Record::Job(job)] } else { vec![] }, Reply::Done)
        }
        _ => decision(vec![], Reply::Done),
    }
}

/// Replaces an instance's wrapped DEK with its rewrap.
///
/// Only the DEK that was read may be replaced: if the instance is gone, or its
/// wrapped DEK is no longer the `from_version` the worker read (a concurrent
/// delete or an earlier rewrap won), the result is dropped.
///
/// Otherwise, if the key's job is still the one whose pass made the rewrap
/// (`job`), it counts one more done (and one fewer failed if this instance
/// had failed before); the outbox tells the instance its DEK was rewrapped,
/// under that job's cause, correlation id and trace, and tells the KMS the
/// new version.
pub(super) fn on_rewrapped(view: &impl View, instance_id: String, from_version: String, wrapped: WrappedDek, job: &str, at: DateTime<Utc>) -> Decision {
    let Some(mut inst) = view.instance(&instance_id) else { return decision(vec![], Reply::Done) };
    if inst.wrapped.as_ref().map(|w| &w.key_version) != Some(&from_version) {
        return decision(vec![], Reply::Done);
    }
    let version = wrapped.key_version.clone();
    let had_failed = inst.rewrap_error.take().is_some();
    inst.wrapped = Some(wrapped);
    inst.key_version = version.clone();
    inst.updated_at = at;
    let mut records = Vec::new();
    // A rewrap finished by the pass of a job that a newer rotation replaced
    // meanwhile is kept (its DEK is good), told under its own job's cause,
    // and not counted as the newer job's progress.
    let mut cause = job.to_string();
    let mut correlation_id = None;
    let mut traceparent = None;
    if let Some(mut job) = view.job(&inst.key_id).filter(|j| j.cause_event_id == job) {
        job.done += 1;
        if had_failed {
            job.failed = job.failed.saturating_sub(1);
        }
        cause = job.cause_event_id.clone();
        correlation_id = job.correlation_id.clone();
        traceparent = job.traceparent.clone();
        records.push(Record::Job(job));
    }
    records.push(Record::Outbox(Effect::InstanceCommand {
        instance_id: inst.instance_id.clone(),
        key_id: inst.key_id.clone(),
        action: CommandAction::Rewrapped,
        key_version: Some(version.clone()),
        cause_event_id: cause,
        issued_at: at,
        correlation_id,
        traceparent,
    }));
    records.push(Record::Outbox(notice(&inst.key_id, Notice::Rewrapped { instance_id: inst.instance_id.clone(), key_version: version })));
    records.push(Record::Instance(inst));
    decision(records, Reply::Done)
}

/// Records that the KMS refused to rewrap an instance's DEK, and why.
///
/// As with a success, a report about a DEK that changed since it was read is
/// dropped. Otherwise the instance keeps its DEK (still usable under the old
/// version) and carries the reason until a later rewrap succeeds; the failure
/// is audited. Nothing goes to the outbox: the instance's data is unaffected.
pub(super) fn on_rewrap_failed(view: &impl View, instance_id: String, from_version: String, reason: String, job: &str, at: DateTime<Utc>) -> Decision {
    let Some(mut inst) = view.instance(&instance_id) else { return decision(vec![], Reply::Done) };
    if inst.wrapped.as_ref().map(|w| &w.key_version) != Some(&from_version) {
        return decision(vec![], Reply::Done);
    }
    let newly_failed = inst.rewrap_error.is_none();
    let fact = Record::Audit(AuditFact {
        who: "rotation".into(),
        what: "rewrap".into(),
        outcome: "failed".into(),
        key_id: Some(inst.key_id.clone()),
        instance_id: Some(inst.instance_id.clone()),
        key_version: Some(from_version.clone()),
        detail: Some(reason.clone()),
        ..Default::default()
    });
    inst.rewrap_error = Some(reason);
    inst.updated_at = at;
    let mut records = vec![fact];
    // `failed` counts instances currently failed, not attempts: a later
    // pass that fails the same instance again does not count it twice.
    if let (true, Some(mut job)) = (newly_failed, view.job(&inst.key_id).filter(|j| j.cause_event_id == job)) {
        job.failed += 1;
        records.push(Record::Job(job));
    }
    records.push(Record::Instance(inst));
    decision(records, Reply::Done)
}

/// Closes the key's job for `target_version` once the worker went through every
/// instance, `failed` of which the KMS refused to rewrap.
///
/// A job that already finished, or a report for a target that is no longer the
/// key's job (a newer rotation replaced it), changes nothing: the end is
/// recorded, audited and acknowledged exactly once. Nor does a pass that began
/// before an instance arrived under an older version (`arrivals`): it may have
/// read past it, so the next pass ends the job. The audit says whether the
/// rotation was complete or partial (some rewraps failed).
///
/// The KMS hears of a rotation only once every DEK is rewrapped, not when the
/// event arrived (`crypto-erasure.md`): a complete job acknowledges its rotate
/// event and those it took over. A partial one acknowledges nothing; its
/// failures raise `KeywardenRotationFailed`, and the operator's retry takes the
/// acknowledgements over and sends them once it completes.
pub(super) fn on_job_finished(
    view: &impl View,
    key_id: String,
    target_version: String,
    cause: String,
    failed: u64,
    arrivals: u64,
    at: DateTime<Utc>,
) -> Decision {
    match view.job(&key_id) {
        Some(job) if job.cause_event_id == cause && job.finished_at.is_none() && job.arrivals != arrivals => decision(
            vec![],
            Reply::Conflict(format!("instances of key {key_id} arrived under an older version during the pass; another pass ends the rotation")),
        ),
        Some(mut job) if job.target_version == target_version && job.cause_event_id == cause && job.finished_at.is_none() => {
            let owed = job.owed_acknowledgements();
            // The ending pass's count, not the job's running one: that counts
            // an instance that an earlier job already failed as not failed.
            job.failed = failed;
            job.finished_at = Some(at);
            let mut detail = format!("{} rewrapped, {} failed", job.done, job.failed);
            if failed > 0 && !owed.is_empty() {
                detail.push_str(&format!("; the acknowledgement of {} waits for a retry that rewraps them", owed.join(", ")));
            }
            let fact = Record::Audit(AuditFact {
                who: "rotation".into(),
                what: "rotation finished".into(),
                outcome: if failed > 0 { "partial".into() } else { "complete".into() },
                event_id: Some(job.cause_event_id.clone()),
                key_id: Some(key_id.clone()),
                key_version: Some(target_version.clone()),
                correlation_id: job.correlation_id.clone(),
                detail: Some(detail),
                ..Default::default()
            });
            // Partial: the job keeps what it owes, for the retry to take over.
            let acks: Vec<Record> = if failed > 0 {
                job.acknowledges = owed;
                Vec::new()
            } else {
                job.acknowledges.clear();
                owed.into_iter()
                    .map(|event_id| {
                        Record::Outbox(notice(
                            &key_id,
                            Notice::Acknowledge {
                                event_id,
                                state: AdopterState::Enabled,
                                key_version: Some(target_version.clone()),
                                at,
                                correlation_id: job.correlation_id.clone(),
                            },
                        ))
                    })
                    .collect()
            };
            let mut records = vec![Record::Job(job), fact];
            records.extend(acks);
            decision(records, Reply::Done)
        }
        _ => decision(vec![], Reply::Done),
    }
}

/// Starts another rotation pass towards the key's current version, at an
/// operator's request, typically after fixing what made rewraps fail.
///
/// - An unknown key is `NotFound`; a key without a version has nothing to
///   rewrap to, and a key that is not active must not have its DEKs rewrapped
///   (it is disabled or deleted): both are conflicts that say what to do.
///
/// The new job replaces the previous one with fresh counts and keeps its
/// correlation id, so that the retry can be followed with the original request.
/// The KMS sent no event for it, but it takes over the acknowledgements the
/// previous job still owed (it left DEKs behind, or had not ended): they go
/// once the retry rewraps every DEK. The retry is audited.
pub(super) fn on_retry_rewraps(view: &impl View, key_id: String, request_id: String, at: DateTime<Utc>) -> Decision {
    let Some(key) = view.key(&key_id) else {
        return decision(vec![], Reply::NotFound(format!("key {key_id} is unknown to keywarden")));
    };
    let Some(version) = key.version.clone() else {
        return decision(vec![], Reply::Conflict(format!("key {key_id} has no version to rewrap to")));
    };
    if key.status != KeyStatus::Active {
        return decision(vec![], Reply::Conflict(format!("key {key_id} is {:?}; enable or restore it before retrying", key.status).to_lowercase()));
    }
    let previous = view.job(&key_id);
    let job = RotationJob {
        key_id: key_id.clone(),
        target_version: version.clone(),
        cause_event_id: request_id.clone(),
        acknowledge: false,
        acknowledges: previous.as_ref().map(RotationJob::owed_acknowledgements).unwrap_or_default(),
        correlation_id: previous.as_ref().and_then(|j| j.correlation_id.clone()),
        traceparent: None,
        started_at: at,
        total: None,
        done: 0,
        // The instances still failed stay counted (a rewrap of one takes it
        // off), so that the alert about them lasts until they are fixed, not
        // until the retry starts.
        failed: previous.as_ref().map_or(0, |j| j.failed),
        finished_at: None,
        rewrapping_to: None,
        arrivals: 0,
    };
    let fact = Record::Audit(AuditFact {
        who: "api".into(),
        what: "rotation retry".into(),
        outcome: "started".into(),
        event_id: Some(request_id),
        key_id: Some(key_id),
        key_version: Some(version),
        ..Default::default()
    });
    decision(vec![Record::Job(job), fact], Reply::Done)
}
