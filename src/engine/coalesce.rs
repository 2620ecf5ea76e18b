//! The instance commands of one writer job, queued as one outbox entry.
//!
//! A rotation commits its rewraps 1,024 at a time, and each told its instance
//! in an outbox entry of its own: 1,024 queue inserts, replicated copies,
//! removals and tombstones per chunk, which cost the writer more than the
//! rewraps themselves. Commands of one cause, version and trace that follow
//! each other become one `Effect::InstanceCommands`; the relay sends it as the
//! same commands, with the same ids, as it would have sent them one by one.

use super::{Effect, Issued, Record};

/// `records` with each run of joinable instance commands as one entry, at
/// the place of the run's first. Only another outbox command ends a run
/// (notices and alerts are queued apart), so the order of what the relay
/// sends is kept. A rotation job's record, rewritten by every rewrap of the
/// chunk, is kept once, the last: the batch is applied whole, so the earlier
/// ones would never exist on their own, and each was encoded for nothing.
pub fn coalesce(records: Vec<Record>) -> Vec<Record> {
    let mut last_job: std::collections::HashMap<String, usize> = std::collections::HashMap::new();
    for (i, record) in records.iter().enumerate() {
        if let Record::Job(job) = record {
            last_job.insert(job.key_id.clone(), i);
        }
    }
    let mut out: Vec<Record> = Vec::with_capacity(records.len());
    // Where in `out` the run that a next command may join is.
    let mut run: Option<usize> = None;
    for (i, record) in records.into_iter().enumerate() {
        match record {
            Record::Job(ref job) if last_job.get(&job.key_id) != Some(&i) => {}
            Record::Outbox(command @ Effect::InstanceCommand { .. }) => {
                if let Some(Record::Outbox(open)) = run.and_then(|i| out.get_mut(i)) {
                    if join(open, &command) {
                        continue;
                    }
                }
                run = Some(out.len());
                out.push(Record::Outbox(command));
            }
            Record::Outbox(Effect::KmsNotice { .. } | Effect::Alert(_)) => out.push(record),
            Record::Outbox(_) => {
                run = None;
                out.push(record);
            }
            other => out.push(other),
        }
    }
    out
}

/// Adds `command` (an `InstanceCommand`) to `open` if they share everything
/// but the instance and the time; false leaves both as they were.
fn join(open: &mut Effect, command: &Effect) -> bool {
    let Effect::InstanceCommand { instance_id, key_id, action, key_version, cause_event_id, issued_at, correlation_id, traceparent } = command else {
        return false;
    };
    let next = Issued { instance_id: instance_id.clone(), issued_at: *issued_at };
    match open {
        Effect::InstanceCommands { key_id: k, action: a, key_version: v, cause_event_id: c, correlation_id: r, traceparent: t, instances }
            if (&*k, &*a, &*v, &*c, &*r, &*t) == (key_id, action, key_version, cause_event_id, correlation_id, traceparent) =>
        {
            instances.push(next);
            true
        }
        Effect::InstanceCommand {
            instance_id: i,
            key_id: k,
            action: a,
            key_version: v,
            cause_event_id: c,
            issued_at: at,
            correlation_id: r,
            traceparent: t,
        } if (&*k, &*a, &*v, &*c, &*r, &*t) == (key_id, action, key_version, cause_event_id, correlation_id, traceparent) => {
            let first = Issued { instance_id: std::mem::take(i), issued_at: *at };
            *open = Effect::InstanceCommands {
                key_id: std::mem::take(k),
                action: *a,
                key_version: v.take(),
                cause_event_id: std::mem::take(c),
                correlation_id: r.take(),
                traceparent: t.take(),
                instances: vec![first, next],
            };
            true
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::{CommandAction, Notice, RotationJob};
    use chrono::{TimeZone, Utc};

    fn command(instance: &str, cause: &str, version: &str) -> Record {
        Record::Outbox(Effect::InstanceCommand {
            instance_id: instance.into(),
            key_id: "k".into(),
            action: CommandAction::Rewrapped,
            key_version: Some(version.into()),
            cause_event_id: cause.into(),
            issued_at: Utc.timestamp_opt(1_700_000_000, 0).unwrap(),
            correlation_id: None,
            traceparent: Some("00-t".into()),
        })
    }

    fn instances(record: &Record) -> Vec<String> {
        match record {
            Record::Outbox(Effect::InstanceCommands { instances, .. }) => instances.iter().map(|i| i.instance_id.clone()).collect(),
            Record::Outbox(Effect::InstanceCommand { instance_id, .. }) => vec![instance_id.clone()],
            other => panic!("not a command: {other:?}"),
        }
    }

    #[test]
    fn a_chunk_of_one_cause_is_one_entry_in_order() {
        let notice = Record::Outbox(Effect::KmsNotice { key_id: "k".into(), notice: Notice::Deregistered { instance_id: "a".into() } });
        let out = coalesce(vec![command("a", "e1", "2"), notice.clone(), command("b", "e1", "2"), command("c", "e1", "2")]);
        assert_eq!(out.len(), 2, "{out:?}");
        assert_eq!(instances(&out[0]), ["a", "b", "c"]);
        assert_eq!(out[1], notice, "a notice is queued apart and stays");
        let Record::Outbox(Effect::InstanceCommands { key_version, cause_event_id, traceparent, .. }) = &out[0] else { panic!() };
        assert_eq!((key_version.as_deref(), cause_event_id.as_str(), traceparent.as_deref()), (Some("2"), "e1", Some("00-t")));
    }

    #[test]
    fn a_job_rewritten_by_every_rewrap_is_kept_once_as_it_ends() {
        let job = |key: &str, done: u64| {
            Record::Job(RotationJob {
                key_id: key.into(),
                target_version: "2".into(),
                cause_event_id: "e1".into(),
                acknowledge: true,
                acknowledges: Vec::new(),
                correlation_id: None,
                traceparent: None,
                started_at: Utc.timestamp_opt(1_700_000_000, 0).unwrap(),
                total: Some(2),
                done,
                failed: 0,
                finished_at: None,
                rewrapping_to: None,
                arrivals: 0,
            })
        };
        let out = coalesce(vec![job("k", 1), command("a", "e1", "2"), job("j", 1), job("k", 2), command("b", "e1", "2")]);
        let jobs: Vec<(String, u64)> = out.iter().filter_map(|r| if let Record::Job(j) = r { Some((j.key_id.clone(), j.done)) } else { None }).collect();
        assert_eq!(jobs, [("j".to_string(), 1), ("k".to_string(), 2)], "{out:?}");
        assert_eq!(out.len(), 3, "the two commands are one entry: {out:?}");
    }

    #[test]
    fn commands_that_differ_or_are_split_by_another_command_stay_apart() {
        let key_wide = Record::Outbox(Effect::KeyCommands {
            key_id: "k".into(),
            action: CommandAction::Revoke,
            key_version: None,
            cause_event_id: "e9".into(),
            issued_at: Utc::now(),
            correlation_id: None,
            traceparent: None,
        });
        let out = coalesce(vec![command("a", "e1", "2"), command("b", "e2", "2"), command("c", "e2", "3"), key_wide.clone(), command("d", "e2", "3")]);
        let runs: Vec<Vec<String>> = out.iter().filter(|r| **r != key_wide).map(instances).collect();
        assert_eq!(runs, [vec!["a"], vec!["b"], vec!["c"], vec!["d"]], "another cause, another version, or a command between: {out:?}");
        assert_eq!(out[3], key_wide);
        assert!(matches!(out[0], Record::Outbox(Effect::InstanceCommand { .. })), "a run of one stays as it was");
    }
}
