use super::*;
use chrono::TimeZone;

#[derive(Default)]
struct Mem {
    keys: HashMap<String, KeyRecord>,
    instances: HashMap<String, InstanceRecord>,
    events: HashSet<String>,
    jobs: HashMap<String, RotationJob>,
    outbox: Vec<Effect>,
    notices: Vec<Notice>,
    audit: Vec<AuditFact>,
    alerts: Vec<Alert>,
}

impl View for Mem {
    fn key(&self, key_id: &str) -> Option<KeyRecord> {
        self.keys.get(key_id).cloned()
    }
    fn instance(&self, instance_id: &str) -> Option<InstanceRecord> {
        self.instances.get(instance_id).cloned()
    }
    fn event_seen(&self, event_id: &str) -> bool {
        self.events.contains(event_id)
    }
    fn job(&self, key_id: &str) -> Option<RotationJob> {
        self.jobs.get(key_id).cloned()
    }
    fn instances_of(&self, key_id: &str) -> Vec<InstanceRecord> {
        self.instances.values().filter(|i| i.key_id == key_id).cloned().collect()
    }
}

impl Mem {
    fn run(&mut self, input: Input) -> Reply {
        let d = decide(self, input);
        for r in d.records {
            match r {
                Record::Key(k) => {
                    self.keys.insert(k.key_id.clone(), k);
                }
                Record::Instance(i) => {
                    self.instances.insert(i.instance_id.clone(), i);
                }
                Record::Event(e) => {
                    self.events.insert(e.event_id);
                }
                Record::Job(j) => {
                    self.jobs.insert(j.key_id.clone(), j);
                }
                Record::Outbox(Effect::KmsNotice { notice, .. }) => self.notices.push(notice),
                Record::Outbox(Effect::Alert(a)) => self.alerts.push(a),
                Record::Outbox(e) => self.outbox.push(e),
                Record::Audit(f) => self.audit.push(f),
                Record::Offset { .. } => {}
            }
        }
        d.reply
    }

    fn state(&self, instance_id: &str) -> InstanceState {
        let i = &self.instances[instance_id];
        instance_state(i, self.keys.get(&i.key_id))
    }
}

fn t(secs: i64) -> DateTime<Utc> {
    Utc.timestamp_opt(1_700_000_000 + secs, 0).unwrap()
}

fn ev(id: &str, kind: EventType, key: &str, at: i64) -> Input {
    Input::Event {
        event: LifecycleEvent {
            event_id: id.into(),
            kind,
            key_id: key.into(),
            key_version: (kind == EventType::Rotate).then(|| format!("v-{id}")),
            occurred_at: t(at),
            correlation_id: None,
            traceparent: None,
            material_destroyed: false,
        },
        at: t(at),
        kms: None,
    }
}

fn create(m: &mut Mem, inst: &str, key: &str) {
    let reply = m.run(Input::CreateInstance {
        instance_id: inst.into(),
        key_id: key.into(),
        wrapped: WrappedDek { key_version: "1".into(), ciphertext: vec![1, 2, 3] },
        fingerprint: "fp".into(),
        credential: credential(&format!("c-{inst}")),
        at: t(0),
    });
    assert!(matches!(reply, Reply::Created(_)), "{reply:?}");
}

fn credential(id: &str) -> DekCredential {
    DekCredential { id: id.into(), sha256: format!("{:0>64}", id.len()), issued_at: t(0) }
}

fn outcome(r: Reply) -> Outcome {
    match r {
        Reply::Event { outcome, .. } => outcome,
        other => panic!("not an event reply: {other:?}"),
    }
}

#[test]
fn disable_revokes_every_instance_with_one_key_wide_command() {
    let mut m = Mem::default();
    create(&mut m, "a", "k");
    create(&mut m, "b", "k");
    assert_eq!(outcome(m.run(ev("e1", EventType::Disable, "k", 10))), Outcome::Applied);
    assert_eq!(m.state("a"), InstanceState::Revoked);
    assert_eq!(m.state("b"), InstanceState::Revoked);
    assert!(matches!(&m.outbox[..], [Effect::KeyCommands { action: CommandAction::Revoke, .. }]));
}

#[test]
fn the_kms_is_told_of_registrations_rewraps_and_handled_events() {
    let mut m = Mem::default();
    create(&mut m, "a", "k");
    m.run(ev("d", EventType::Disable, "k", 10));
    m.run(ev("e", EventType::Enable, "k", 20));
    m.run(ev("r", EventType::Rotate, "k", 30));
    m.run(rewrapped("a", "1", "v-r", 9, "r", t(31)));
    m.run(Input::JobFinished { key_id: "k".into(), target_version: "v-r".into(), job: "r".into(), failed: 0, arrivals: 0, at: t(32) });
    m.run(Input::DeleteInstance { instance_id: "a".into(), request_id: "req".into(), at: t(40) });
    let kinds: Vec<String> = m
        .notices
        .iter()
        .map(|n| match n {
            Notice::Registered { .. } => "registered".to_string(),
            Notice::Rewrapped { key_version, .. } => format!("rewrapped {key_version}"),
            Notice::Deregistered { .. } => "deregistered".to_string(),
            Notice::Acknowledge { event_id, state, key_version, .. } => format!("ack {event_id} {state:?} {}", key_version.as_deref().unwrap_or("-")),
        })
        .collect();
    assert_eq!(
        kinds,
        ["registered", "ack d Disabled 1", "ack e Enabled 1", "rewrapped v-r", "ack r Enabled v-r", "deregistered"],
        "a rotation is acknowledged only when it finished"
    );
}

#[test]
fn a_delete_the_kms_contradicts_erases_nothing() {
    let mut m = Mem::default();
    create(&mut m, "a", "k");
    let Input::Event { event, at, .. } = ev("d", EventType::Delete, "k", 10) else { unreachable!() };
    let reply = m.run(Input::Event { event, at, kms: Some(KeyStatus::Active) });
    assert!(matches!(reply, Reply::Event { outcome: Outcome::Ignored, .. }), "{reply:?}");
    assert_eq!(m.state("a"), InstanceState::Active);
    let Input::Event { event, at, .. } = ev("d2", EventType::Delete, "k", 20) else { unreachable!() };
    m.run(Input::Event { event, at, kms: Some(KeyStatus::Deleted) });
    assert_eq!(m.state("a"), InstanceState::Erased);
}

#[test]
fn redelivered_event_changes_nothing() {
    let mut m = Mem::default();
    create(&mut m, "a", "k");
    m.run(ev("e1", EventType::Disable, "k", 10));
    m.run(ev("e2", EventType::Enable, "k", 20));
    assert_eq!(outcome(m.run(ev("e1", EventType::Disable, "k", 10))), Outcome::Duplicate);
    assert_eq!(m.state("a"), InstanceState::Active);
    assert_eq!(m.outbox.len(), 2);
}

#[test]
fn late_enable_after_disable_is_ignored() {
    let mut m = Mem::default();
    create(&mut m, "a", "k");
    m.run(ev("e2", EventType::Disable, "k", 20));
    assert_eq!(outcome(m.run(ev("e1", EventType::Enable, "k", 10))), Outcome::Stale);
    assert_eq!(m.state("a"), InstanceState::Revoked);
}

#[test]
fn late_rotate_after_delete_resurrects_nothing() {
    let mut m = Mem::default();
    create(&mut m, "a", "k");
    m.run(ev("d", EventType::Delete, "k", 20));
    assert_eq!(outcome(m.run(ev("r", EventType::Rotate, "k", 10))), Outcome::Stale);
    assert_eq!(outcome(m.run(ev("r2", EventType::Rotate, "k", 30))), Outcome::Ignored);
    assert_eq!(m.state("a"), InstanceState::Erased);
    assert!(m.jobs.is_empty());
}

#[test]
fn events_for_a_key_without_instances_shape_later_instances() {
    let mut m = Mem::default();
    m.run(ev("e1", EventType::Disable, "k", 10));
    assert_eq!(m.keys["k"].status, KeyStatus::Disabled);
    create(&mut m, "late", "k");
    assert_eq!(m.state("late"), InstanceState::Revoked);
}

#[test]
fn stale_event_for_a_new_key_is_still_recorded() {
    let mut m = Mem::default();
    assert_eq!(outcome(m.run(ev("e1", EventType::Enable, "k", 10))), Outcome::Applied);
    assert!(m.events.contains("e1"));
    assert!(m.keys.contains_key("k"));
}

#[test]
fn rotate_creates_a_job_and_rewrap_result_advances_it() {
    let mut m = Mem::default();
    create(&mut m, "a", "k");
    m.run(ev("r", EventType::Rotate, "k", 10));
    let job = &m.jobs["k"];
    assert_eq!(job.target_version, "v-r");
    m.run(rewrapped("a", "1", "v-r", 9, "r", t(11)));
    assert_eq!(m.instances["a"].key_version, "v-r");
    assert_eq!(m.jobs["k"].done, 1);
    assert!(m.outbox.iter().any(|e| matches!(e, Effect::InstanceCommand { action: CommandAction::Rewrapped, cause_event_id, .. } if cause_event_id == "r")));
}

#[test]
fn rewrap_of_a_dek_that_changed_meanwhile_is_dropped() {
    let mut m = Mem::default();
    create(&mut m, "a", "k");
    m.run(Input::DeleteInstance { instance_id: "a".into(), request_id: "req".into(), at: t(5) });
    m.run(rewrapped("a", "1", "2", 9, "r", t(6)));
    assert_eq!(m.state("a"), InstanceState::Destroyed);
    assert!(m.instances["a"].wrapped.is_none());
}

#[test]
fn restore_inside_the_window_brings_instances_back() {
    let mut m = Mem::default();
    create(&mut m, "a", "k");
    m.run(ev("d", EventType::Delete, "k", 10));
    m.run(Input::Purge { key_id: "k".into(), purge_after: Duration::from_secs(100), at: t(50) });
    assert_eq!(m.state("a"), InstanceState::Erased);
    m.run(ev("r", EventType::Restore, "k", 60));
    assert_eq!(m.state("a"), InstanceState::Active);
}

#[test]
fn restore_after_purge_leaves_instances_destroyed_and_says_why() {
    let mut m = Mem::default();
    create(&mut m, "a", "k");
    m.run(ev("d", EventType::Delete, "k", 10));
    m.run(Input::Purge { key_id: "k".into(), purge_after: Duration::from_secs(100), at: t(200) });
    assert_eq!(m.state("a"), InstanceState::Destroyed);
    match m.run(ev("r", EventType::Restore, "k", 300)) {
        Reply::Event { outcome: Outcome::Applied, detail } => assert!(detail.contains("stay destroyed"), "{detail}"),
        other => panic!("{other:?}"),
    }
    assert_eq!(m.state("a"), InstanceState::Destroyed);
}

#[test]
fn instance_delete_destroys_its_dek_and_emits_erase() {
    let mut m = Mem::default();
    create(&mut m, "a", "k");
    assert_eq!(m.run(Input::DeleteInstance { instance_id: "a".into(), request_id: "req".into(), at: t(5) }), Reply::Done);
    assert_eq!(m.state("a"), InstanceState::Destroyed);
    assert!(matches!(&m.outbox[..], [Effect::InstanceCommand { action: CommandAction::Erase, .. }]));
    assert!(matches!(m.run(Input::DeleteInstance { instance_id: "zz".into(), request_id: "r".into(), at: t(5) }), Reply::NotFound(_)));
}

#[test]
fn overlay_lets_a_batch_see_its_own_records() {
    let base = Mem::default();
    let mut o = Overlay::new(&base);
    let d = decide(&o, ev("e1", EventType::Disable, "k", 10));
    o.absorb(&d.records);
    let d = decide(&o, ev("e1", EventType::Disable, "k", 10));
    assert_eq!(d.reply, Reply::Event { outcome: Outcome::Duplicate, detail: "event already applied".into() });
}

mod ordering {
    use super::*;
    use proptest::prelude::*;

    /// The key an effect concerns (an alert's, by its label).
    fn effect_key(e: &Effect) -> Option<&str> {
        match e {
            Effect::KeyCommands { key_id, .. }
            | Effect::InstanceCommand { key_id, .. }
            | Effect::InstanceCommands { key_id, .. }
            | Effect::LifecycleEvent { key_id, .. }
            | Effect::KmsNotice { key_id, .. } => Some(key_id),
            Effect::Alert(a) => a.labels.get("key_id").map(String::as_str),
        }
    }

    fn kind(i: u8) -> EventType {
        [EventType::Rotate, EventType::Disable, EventType::Enable, EventType::Delete, EventType::Restore][i as usize % 5]
    }

    proptest! {
        /// Redeliveries anywhere in the stream (at-least-once intake) and late
        /// copies of old events leave exactly the state of the clean stream.
        #[test]
        fn redelivered_and_late_events_end_like_the_clean_stream(
            kinds in proptest::collection::vec(0u8..5, 1..20),
            extra in proptest::collection::vec((0usize..40, 0usize..40), 0..30),
        ) {
            let events: Vec<Input> = kinds.iter().enumerate()
                .map(|(i, k)| ev(&format!("e{i}"), kind(*k), "k", i as i64 * 10)).collect();
            let mut clean = Mem::default();
            create(&mut clean, "a", "k");
            for e in &events { clean.run(e.clone()); }

            // After event i, copies of any events up to i arrive again.
            let mut stream: Vec<Input> = Vec::new();
            for (i, e) in events.iter().enumerate() {
                stream.push(e.clone());
                for (after, which) in &extra {
                    if after % events.len() == i {
                        stream.push(events[which % (i + 1)].clone());
                    }
                }
            }
            let mut noisy = Mem::default();
            create(&mut noisy, "a", "k");
            for e in stream { noisy.run(e); }
            prop_assert_eq!(&noisy.keys["k"], &clean.keys["k"]);
            prop_assert_eq!(noisy.state("a"), clean.state("a"));
            // Every effect, not only how many: the same commands, notices and
            // alerts, under the same causes, in the same order.
            prop_assert_eq!(&noisy.outbox, &clean.outbox);
        }
    }

    proptest! {
        /// Several keys, each with its own ordered stream (Kafka keeps order per
        /// key), interleaved at random, with redeliveries and with whole runs of a
        /// key's events held back and released later: every key ends exactly as
        /// the well-ordered stream leaves it, and no effect is emitted twice.
        #[test]
        fn interleaved_delayed_and_duplicated_keys_end_like_the_ordered_stream(
            streams in proptest::collection::vec(proptest::collection::vec(0u8..5, 1..12), 1..5),
            schedule in proptest::collection::vec(0usize..64, 0..200),
            redeliver in proptest::collection::vec((0usize..5, 0usize..12), 0..20),
        ) {
            let key = |k: usize| format!("k{k}");
            let events: Vec<Vec<Input>> = streams.iter().enumerate().map(|(k, kinds)| {
                kinds.iter().enumerate().map(|(i, kind_ix)| ev(&format!("k{k}-e{i}"), kind(*kind_ix), &key(k), i as i64 * 10)).collect()
            }).collect();

            let mut ordered = Mem::default();
            for (k, stream) in events.iter().enumerate() {
                create(&mut ordered, &format!("i{k}"), &key(k));
                for e in stream { ordered.run(e.clone()); }
            }

            // The schedule picks which key's next event arrives; a key may be
            // skipped for a long time (a delay), but never overtakes itself.
            let mut noisy = Mem::default();
            for k in 0..events.len() { create(&mut noisy, &format!("i{k}"), &key(k)); }
            let mut next = vec![0usize; events.len()];
            let mut delivered: Vec<Input> = Vec::new();
            let step = |noisy: &mut Mem, next: &mut Vec<usize>, k: usize, delivered: &mut Vec<Input>| {
                if next[k] < events[k].len() {
                    let e = events[k][next[k]].clone();
                    next[k] += 1;
                    noisy.run(e.clone());
                    delivered.push(e);
                }
            };
            for (n, pick) in schedule.iter().enumerate() {
                step(&mut noisy, &mut next, pick % events.len(), &mut delivered);
                if let Some((_, which)) = redeliver.get(n % redeliver.len().max(1)) {
                    if !delivered.is_empty() && n % 3 == 0 {
                        let copy = delivered[which % delivered.len()].clone();
                        // A redelivery of something already applied.
                        noisy.run(copy);
                    }
                }
            }
            for k in 0..events.len() {
                while next[k] < events[k].len() { step(&mut noisy, &mut next, k, &mut delivered); }
            }
            for k in 0..events.len() {
                prop_assert_eq!(&noisy.keys[&key(k)], &ordered.keys[&key(k)]);
                prop_assert_eq!(noisy.state(&format!("i{k}")), ordered.state(&format!("i{k}")));
            }
            // Every effect, not only how many; keys interleave differently,
            // so the two outboxes are compared as sets of effects, each key's
            // in its own order.
            for k in 0..events.len() {
                let of_key = |m: &Mem| m.outbox.iter().filter(|e| effect_key(e) == Some(key(k).as_str())).cloned().collect::<Vec<_>>();
                prop_assert_eq!(of_key(&noisy), of_key(&ordered), "effects of key {}", k);
            }
            prop_assert!(noisy.outbox.iter().all(|e| effect_key(e).is_some()), "an effect of no key: {:?}", noisy.outbox);
            prop_assert_eq!(noisy.outbox.len(), ordered.outbox.len());
        }
    }
}

#[test]
fn destroyed_key_material_purges_at_once_and_nothing_restores_it() {
    let mut m = Mem::default();
    create(&mut m, "a", "k");
    create(&mut m, "b", "k");
    let mut destroy = ev("gone", EventType::Delete, "k", 10);
    if let Input::Event { event, .. } = &mut destroy {
        event.material_destroyed = true;
        event.correlation_id = Some("corr-1".into());
    }
    m.run(destroy);
    assert_eq!((m.state("a"), m.state("b")), (InstanceState::Destroyed, InstanceState::Destroyed));
    let erased: Vec<_> = m
        .outbox
        .iter()
        .filter_map(|e| match e {
            Effect::InstanceCommand { action: CommandAction::Erase, instance_id, correlation_id, .. } => Some((instance_id.clone(), correlation_id.clone())),
            _ => None,
        })
        .collect();
    assert_eq!(erased.len(), 2, "each instance is told to erase: {erased:?}");
    assert!(erased.iter().all(|(_, c)| c.as_deref() == Some("corr-1")));
    m.run(ev("r", EventType::Restore, "k", 20));
    assert_eq!(m.state("a"), InstanceState::Destroyed);
}

#[test]
fn the_correlation_id_reaches_commands_and_the_acknowledgement() {
    let mut m = Mem::default();
    create(&mut m, "a", "k");
    let mut disable = ev("d", EventType::Disable, "k", 10);
    if let Input::Event { event, .. } = &mut disable {
        event.correlation_id = Some("corr-9".into());
    }
    m.run(disable);
    assert!(m.outbox.iter().any(|e| matches!(e, Effect::KeyCommands { correlation_id: Some(c), .. } if c == "corr-9")));
    assert!(m.notices.iter().any(|n| matches!(n, Notice::Acknowledge { correlation_id: Some(c), .. } if c == "corr-9")));
}

#[test]
fn every_applied_event_and_every_destroyed_dek_is_audited() {
    let mut m = Mem::default();
    create(&mut m, "a", "k");
    let mut disable = ev("d", EventType::Disable, "k", 10);
    if let Input::Event { event, .. } = &mut disable {
        event.correlation_id = Some("corr-a".into());
    }
    m.run(disable);
    m.run(ev("d", EventType::Disable, "k", 10));
    m.run(ev("x", EventType::Delete, "k", 20));
    m.run(Input::Purge { key_id: "k".into(), purge_after: Duration::from_secs(1), at: t(100) });
    let events: Vec<_> = m.audit.iter().filter(|f| f.who == "kms-event").collect();
    assert_eq!(events.len(), 2, "the redelivered disable is not audited twice: {events:?}");
    assert_eq!((events[0].event_id.as_deref(), events[0].correlation_id.as_deref(), events[0].outcome.as_str()), (Some("d"), Some("corr-a"), "applied"));
    let purged: Vec<_> = m.audit.iter().filter(|f| f.what == "purge").collect();
    assert_eq!(purged.len(), 1);
    assert_eq!(purged[0].instance_id.as_deref(), Some("a"));
    assert!(purged[0].detail.as_deref().unwrap().contains("sha256 of the destroyed wrapped DEK"));
}

#[test]
fn a_disable_raises_an_alert_that_the_enable_resolves() {
    let mut m = Mem::default();
    create(&mut m, "a", "k");
    m.run(ev("d", EventType::Disable, "k", 10));
    m.run(ev("e", EventType::Enable, "k", 20));
    m.run(ev("x", EventType::Delete, "k", 30));
    let seen: Vec<_> = m.alerts.iter().map(|a| (a.name.as_str(), a.severity, a.ends_at.is_some())).collect();
    assert_eq!(
        seen,
        [
            ("KeywardenKeyDisabled", Severity::Warning, false),
            ("KeywardenKeyDisabled", Severity::Warning, true),
            ("KeywardenKeyDeleted", Severity::Critical, false),
            ("KeywardenKeyDisabled", Severity::Warning, true),
        ]
    );
    assert_eq!(m.alerts[0].fingerprint(), m.alerts[1].fingerprint(), "the resolve names the alert it resolves");
    assert_eq!(m.alerts[0].count_instances_of.as_deref(), Some("k"));
}

#[test]
fn the_traceparent_reaches_commands_and_the_rotation_it_causes() {
    const TP: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let mut m = Mem::default();
    create(&mut m, "a", "k");
    let with_trace = |mut input: Input| {
        if let Input::Event { event, .. } = &mut input {
            event.traceparent = Some(TP.into());
        }
        input
    };
    m.run(with_trace(ev("r", EventType::Rotate, "k", 10)));
    assert_eq!(m.jobs["k"].traceparent.as_deref(), Some(TP), "the rotation's rewraps join the event's trace");
    m.run(rewrapped("a", "1", "v-r", 9, "r", t(11)));
    assert!(m.outbox.iter().any(|e| matches!(e, Effect::InstanceCommand { action: CommandAction::Rewrapped, traceparent: Some(tp), .. } if tp == TP)));
    m.run(with_trace(ev("d", EventType::Disable, "k", 20)));
    assert!(m.outbox.iter().any(|e| matches!(e, Effect::KeyCommands { action: CommandAction::Revoke, traceparent: Some(tp), .. } if tp == TP)));
    m.run(ev("e", EventType::Enable, "k", 30));
    assert!(
        m.outbox.iter().any(|e| matches!(e, Effect::KeyCommands { action: CommandAction::Restore, traceparent: None, .. })),
        "an event without a trace hands none on"
    );
}

fn finished(job: &str, failed: u64, at: DateTime<Utc>) -> Input {
    Input::JobFinished { key_id: "k".into(), target_version: "v-r".into(), job: job.into(), failed, arrivals: 0, at }
}

fn retry(request: &str, at: DateTime<Utc>) -> Input {
    Input::RetryRewraps { key_id: "k".into(), request_id: request.into(), at }
}

/// The event ids the KMS was sent acknowledgements for, in order.
fn acked(m: &Mem) -> Vec<String> {
    m.notices.iter().filter_map(|n| if let Notice::Acknowledge { event_id, .. } = n { Some(event_id.clone()) } else { None }).collect()
}

#[test]
fn an_operator_retry_after_a_complete_rotation_acknowledges_nothing() {
    let mut m = Mem::default();
    create(&mut m, "a", "k");
    m.run(ev("r", EventType::Rotate, "k", 10));
    m.run(rewrapped("a", "1", "v-r", 9, "r", t(11)));
    m.run(finished("r", 0, t(12)));
    assert_eq!(acked(&m), ["r"]);
    assert_eq!(m.run(retry("retry-1", t(20))), Reply::Done);
    let job = &m.jobs["k"];
    assert_eq!((job.target_version.as_str(), job.cause_event_id.as_str(), job.finished_at, job.acknowledge), ("v-r", "retry-1", None, false));
    assert!(job.acknowledges.is_empty(), "{job:?}");
    m.run(finished("retry-1", 0, t(21)));
    assert_eq!(acked(&m), ["r"], "the retry answers no KMS event, and r was answered once");
    assert!(matches!(m.run(Input::RetryRewraps { key_id: "zz".into(), request_id: "x".into(), at: t(22) }), Reply::NotFound(_)));
    m.run(ev("d", EventType::Disable, "k", 30));
    assert!(matches!(m.run(retry("y", t(31))), Reply::Conflict(_)));
}

/// Key Protect is told a rotation is done only once every DEK is rewrapped
/// (`crypto-erasure.md`): a rotation the KMS refused some rewraps of is
/// acknowledged by the retry that rewraps them, however many retries it
/// takes, and the instances still failed stay counted (and alerted) until
/// then, not only until a retry starts.
#[test]
fn a_rotation_that_left_deks_behind_is_acknowledged_by_the_retry_that_rewraps_them() {
    let mut m = Mem::default();
    create(&mut m, "a", "k");
    create(&mut m, "b", "k");
    m.run(ev("r", EventType::Rotate, "k", 10));
    m.run(rewrapped("a", "1", "v-r", 9, "r", t(11)));
    m.run(Input::RewrapFailed { instance_id: "b".into(), from_version: "1".into(), reason: "refused".into(), job: "r".into(), at: t(11) });
    m.run(finished("r", 1, t(12)));
    assert_eq!(acked(&m), Vec::<String>::new(), "b is still on the old version");
    assert_eq!(m.audit.last().map(|f| f.outcome.as_str()), Some("partial"));
    assert_eq!(m.jobs["k"].owed_acknowledgements(), ["r"]);

    m.run(retry("retry-1", t(20)));
    assert_eq!((m.jobs["k"].acknowledges.clone(), m.jobs["k"].failed), (vec!["r".to_string()], 1), "the retry took the acknowledgement and b's failure over");
    m.run(Input::RewrapFailed { instance_id: "b".into(), from_version: "1".into(), reason: "refused".into(), job: "retry-1".into(), at: t(21) });
    m.run(finished("retry-1", 1, t(22)));
    assert_eq!((acked(&m), m.jobs["k"].failed), (Vec::<String>::new(), 1), "the first retry failed b again");

    m.run(retry("retry-2", t(30)));
    m.run(rewrapped("b", "1", "v-r", 9, "retry-2", t(31)));
    assert_eq!(m.jobs["k"].failed, 0, "b's rewrap took it off");
    m.run(finished("retry-2", 0, t(32)));
    assert_eq!(acked(&m), ["r"]);
    assert!(matches!(m.notices.last(), Some(Notice::Acknowledge { key_version: Some(v), .. }) if v == "v-r"));
    m.run(retry("retry-3", t(40)));
    m.run(finished("retry-3", 0, t(41)));
    assert_eq!(acked(&m), ["r"], "acknowledged once");
}

/// The pass that ends a job went through every instance not yet on the
/// newest version: its count of refusals decides, not the job's running
/// one, which a record written before this count existed (or any drift)
/// may have wrong.
#[test]
fn the_ending_passs_refusals_decide_whether_a_rotation_is_acknowledged() {
    let mut m = Mem::default();
    create(&mut m, "a", "k");
    m.run(ev("r", EventType::Rotate, "k", 10));
    assert_eq!(m.jobs["k"].failed, 0);
    m.run(finished("r", 1, t(12)));
    assert_eq!((acked(&m), m.jobs["k"].failed), (Vec::<String>::new(), 1));
    assert_eq!(m.audit.last().map(|f| f.outcome.as_str()), Some("partial"));
}

/// A job that ended before acknowledgements were withheld (recorded by the
/// previous release) acknowledged its event then, partial or not: a retry
/// must not acknowledge it a second time.
#[test]
fn a_job_ended_by_the_previous_release_owes_nothing() {
    let mut m = Mem::default();
    create(&mut m, "a", "k");
    m.run(ev("r", EventType::Rotate, "k", 10));
    let old: RotationJob = serde_json::from_value(serde_json::json!({
        "key_id": "k", "target_version": "v-r", "cause_event_id": "r", "acknowledge": true,
        "started_at": t(10), "total": 1, "done": 0, "failed": 1, "finished_at": t(12)
    }))
    .unwrap();
    m.jobs.insert("k".into(), old);
    m.run(retry("retry-1", t(20)));
    m.run(rewrapped("a", "1", "v-r", 9, "retry-1", t(21)));
    m.run(finished("retry-1", 0, t(22)));
    assert_eq!(acked(&m), Vec::<String>::new());
}

/// An instance of key k created at t(12), its DEK wrapped under `version`.
fn arriving(id: &str, version: &str) -> Input {
    Input::CreateInstance {
        instance_id: id.into(),
        key_id: "k".into(),
        wrapped: WrappedDek { key_version: version.into(), ciphertext: vec![1] },
        fingerprint: "f".into(),
        credential: credential(id),
        at: t(12),
    }
}

/// A pass rewraps to the KMS's newest version, which the event may not name
/// (a label, or none): an instance created under that version needs no
/// other pass, or steady creations would keep the job from ever ending. A
/// later pass's plan records its version, not a new total.
#[test]
fn an_instance_under_the_version_the_pass_rewraps_to_is_no_arrival() {
    let mut m = Mem::default();
    create(&mut m, "a", "k");
    m.run(ev("r", EventType::Rotate, "k", 10));
    let plan = |total, to: &str| Input::JobPlanned { key_id: "k".into(), target_version: "v-r".into(), total, rewrapping_to: to.into() };
    m.run(plan(1, "kms-7"));
    m.run(arriving("new", "kms-7"));
    assert_eq!(m.jobs["k"].arrivals, 0);
    m.run(arriving("old", "1"));
    assert_eq!(m.jobs["k"].arrivals, 1);
    m.run(plan(5, "kms-8"));
    assert_eq!((m.jobs["k"].total, m.jobs["k"].rewrapping_to.as_deref()), (Some(1), Some("kms-8")));
}

/// An instance wrapped just before the KMS rotated and committed after the
/// rotate event may be created after the running pass read past its id: that
/// pass must not end the job (nor acknowledge it), the next one, which reads
/// it, does. An instance created under the target changes nothing.
#[test]
fn an_instance_that_arrives_under_an_older_version_during_a_rotation_needs_another_pass() {
    let mut m = Mem::default();
    create(&mut m, "a", "k");
    m.run(ev("r", EventType::Rotate, "k", 10));
    m.run(rewrapped("a", "1", "v-r", 9, "r", t(11)));
    m.run(arriving("on-target", "v-r"));
    assert_eq!(m.jobs["k"].arrivals, 0);
    m.run(arriving("late", "1"));
    assert_eq!(m.jobs["k"].arrivals, 1);
    let end = |arrivals| Input::JobFinished { key_id: "k".into(), target_version: "v-r".into(), job: "r".into(), failed: 0, arrivals, at: t(13) };
    assert!(matches!(m.run(end(0)), Reply::Conflict(_)), "a pass that began before the arrival ended the job");
    assert_eq!((m.jobs["k"].finished_at, acked(&m)), (None, Vec::<String>::new()));
    m.run(rewrapped("late", "1", "v-r", 9, "r", t(14)));
    assert_eq!(m.run(end(1)), Reply::Done);
    assert_eq!((m.jobs["k"].finished_at, acked(&m)), (Some(t(13)), vec!["r".to_string()]));
    m.run(arriving("after-the-end", "1"));
    assert_eq!(m.jobs["k"].arrivals, 1, "a finished job is not reopened");
}

/// A job replaced before it ended (an operator's retry while its pass ran,
/// or a newer rotate event) hands its acknowledgement on instead of losing
/// it: the replacing job acknowledges both once it rewraps every DEK.
#[test]
fn a_job_replaced_before_it_ended_hands_its_acknowledgement_on() {
    let mut m = Mem::default();
    create(&mut m, "a", "k");
    m.run(ev("r", EventType::Rotate, "k", 10));
    m.run(retry("retry-1", t(11)));
    m.run(finished("r", 0, t(12)));
    assert_eq!(acked(&m), Vec::<String>::new(), "the replaced pass ends nothing");
    m.run(ev("r2", EventType::Rotate, "k", 20));
    assert_eq!(m.jobs["k"].acknowledges, ["r"]);
    m.run(rewrapped("a", "1", "v-r2", 9, "r2", t(21)));
    m.run(Input::JobFinished { key_id: "k".into(), target_version: "v-r2".into(), job: "r2".into(), failed: 0, arrivals: 0, at: t(22) });
    assert_eq!(acked(&m), ["r", "r2"]);
}

#[test]
fn a_pass_of_a_replaced_job_does_not_close_the_retry_that_replaced_it() {
    let mut m = Mem::default();
    create(&mut m, "a", "k");
    m.run(ev("r", EventType::Rotate, "k", 10));
    // An operator's retry while the rotate event's pass still runs.
    m.run(retry("retry-1", t(11)));
    m.run(finished("r", 0, t(12)));
    assert_eq!(m.jobs["k"].finished_at, None, "the retry's own pass has not run yet");
    m.run(finished("retry-1", 0, t(13)));
    assert_eq!(m.jobs["k"].finished_at, Some(t(13)));
}

/// An event whose producer claims it occurred at `occurred`, applied by
/// keywarden at `at` with the KMS's answer `kms`: the two times differ when a
/// producer's clock is off or an event is back-dated.
fn claimed(id: &str, kind: EventType, key: &str, occurred: DateTime<Utc>, at: DateTime<Utc>, kms: Option<KeyStatus>) -> Input {
    let Input::Event { mut event, .. } = ev(id, kind, key, 0) else { unreachable!() };
    event.occurred_at = occurred;
    Input::Event { event, at, kms }
}

#[test]
fn an_ignored_future_dated_event_does_not_make_later_events_stale() {
    let mut m = Mem::default();
    create(&mut m, "a", "k");
    // A restore of a key that is not deleted is ignored; dated a year ahead.
    let future = claimed("f", EventType::Restore, "k", t(365 * 86400), t(5), None);
    assert_eq!(outcome(m.run(future)), Outcome::Ignored);
    assert_eq!(m.keys["k"].last_event_at, None, "an ignored event is no one's last word");
    assert_eq!(outcome(m.run(ev("d", EventType::Disable, "k", 10))), Outcome::Applied);
    assert_eq!(m.state("a"), InstanceState::Revoked);
    assert_eq!((m.keys["k"].last_event_at, m.keys["k"].last_event_id.as_deref()), (Some(t(10)), Some("d")));
}

#[test]
fn a_vetoed_delete_does_not_move_the_last_event() {
    let mut m = Mem::default();
    create(&mut m, "a", "k");
    m.run(ev("d", EventType::Disable, "k", 10));
    let vetoed = claimed("x", EventType::Delete, "k", t(86400), t(11), Some(KeyStatus::Active));
    assert_eq!(outcome(m.run(vetoed)), Outcome::Ignored);
    assert_eq!((m.keys["k"].last_event_at, m.keys["k"].last_event_id.as_deref()), (Some(t(10)), Some("d")));
    assert_eq!(outcome(m.run(ev("e", EventType::Enable, "k", 20))), Outcome::Applied);
    assert_eq!(m.state("a"), InstanceState::Active);
}

#[test]
fn a_back_dated_delete_keeps_the_whole_restore_window() {
    const DAY: i64 = 86400;
    let window = Duration::from_secs(30 * DAY as u64);
    let mut m = Mem::default();
    create(&mut m, "a", "k");
    let now = t(100 * DAY);
    assert_eq!(outcome(m.run(claimed("x", EventType::Delete, "k", now - chrono::Duration::days(40), now, None))), Outcome::Applied);
    assert_eq!(m.keys["k"].deleted_at, Some(now), "the window counts from when keywarden applied the delete");
    m.run(Input::Purge { key_id: "k".into(), purge_after: window, at: now + chrono::Duration::days(1) });
    assert_eq!(m.state("a"), InstanceState::Erased, "a restore can still bring the data back");
    assert_eq!(m.keys["k"].purged_at, None);
    m.run(Input::Purge { key_id: "k".into(), purge_after: window, at: now + chrono::Duration::days(30) });
    assert_eq!(m.state("a"), InstanceState::Destroyed);
}

#[test]
fn a_restore_window_too_long_to_add_never_passes() {
    let mut m = Mem::default();
    create(&mut m, "a", "k");
    m.run(ev("x", EventType::Delete, "k", 10));
    // Too long for chrono at all, and representable but past the end of time.
    for window in [Duration::MAX, Duration::from_secs(i64::MAX as u64 / 1000)] {
        assert_eq!(m.run(Input::Purge { key_id: "k".into(), purge_after: window, at: t(100) }), Reply::Done);
        assert_eq!(m.state("a"), InstanceState::Erased);
    }
}

#[test]
fn a_created_instance_keeps_its_credential_hash_and_the_audit_names_only_its_id() {
    let mut m = Mem::default();
    create(&mut m, "i1", "k1");
    let kept = m.instances["i1"].credential.clone().expect("a credential is kept");
    assert_eq!(kept.id, "c-i1");
    let created = m.audit.iter().find(|a| a.what == "instance created").unwrap();
    assert_eq!(created.detail.as_deref(), Some("dek credential c-i1"));
    assert!(!format!("{:?}", m.instances["i1"]).contains(&kept.sha256), "the hash stays out of Debug");
}

#[test]
fn rotating_a_credential_replaces_the_old_at_once_and_is_audited_by_id() {
    let mut m = Mem::default();
    create(&mut m, "i1", "k1");
    create(&mut m, "i2", "k1");
    let fresh = DekCredential { id: "c-new".into(), sha256: "ab".repeat(32), issued_at: t(5) };
    assert_eq!(m.run(Input::RotateCredential { instance_id: "i1".into(), credential: fresh.clone(), at: t(5) }), Reply::Done);
    assert_eq!(m.instances["i1"].credential.as_ref(), Some(&fresh));
    assert_eq!(m.instances["i1"].updated_at, t(5));
    // The other instance's credential is untouched.
    assert_eq!(m.instances["i2"].credential.as_ref().map(|c| c.id.as_str()), Some("c-i2"));
    let rotated = m.audit.iter().find(|a| a.what == "dek credential rotated").unwrap();
    assert_eq!(rotated.instance_id.as_deref(), Some("i1"));
    assert_eq!(rotated.detail.as_deref(), Some("dek credential c-new replaces c-i1"));
}

#[test]
fn a_credential_is_not_rotated_for_an_unknown_or_destroyed_instance() {
    let mut m = Mem::default();
    let fresh = || DekCredential { id: "c-new".into(), sha256: "ab".repeat(32), issued_at: t(5) };
    assert!(matches!(m.run(Input::RotateCredential { instance_id: "nope".into(), credential: fresh(), at: t(5) }), Reply::NotFound(_)));
    create(&mut m, "i1", "k1");
    m.run(Input::DeleteInstance { instance_id: "i1".into(), request_id: "r1".into(), at: t(1) });
    let audited = m.audit.len();
    assert!(matches!(m.run(Input::RotateCredential { instance_id: "i1".into(), credential: fresh(), at: t(5) }), Reply::Conflict(_)));
    assert_eq!(m.instances["i1"].credential.as_ref().map(|c| c.id.as_str()), Some("c-i1"));
    assert_eq!(m.audit.len(), audited, "a refused rotation writes nothing");
}

#[test]
fn an_instance_record_stored_before_credentials_decodes_without_one() {
    let old = r#"{"instance_id":"i1","key_id":"k1","wrapped":{"key_version":"1","ciphertext":"AQID"},"key_version":"1",
        "dek_fingerprint":"fp","created_at":"2024-01-01T00:00:00Z","updated_at":"2024-01-01T00:00:00Z",
        "destroyed_at":null,"destroyed_reason":null,"rewrap_error":null}"#;
    let inst: InstanceRecord = serde_json::from_str(old).expect("an old record decodes");
    assert_eq!(inst.credential, None);
    // And one without a credential is written as before, without the field.
    assert!(!serde_json::to_string(&inst).unwrap().contains("credential"));
}

fn report(command_id: &str, action: CommandAction, outcome: DataPlaneOutcome, at: i64) -> Input {
    Input::DataPlaneReport {
        instance_id: "i1".into(),
        status: DataPlaneStatus { command_id: command_id.into(), action, outcome, at: t(at), detail: None, received_at: t(at + 1) },
    }
}

#[test]
fn a_data_plane_report_is_kept_unless_an_earlier_command_arrives_late() {
    let mut m = Mem::default();
    assert!(matches!(m.run(report("c1", CommandAction::Revoke, DataPlaneOutcome::Failed, 10)), Reply::NotFound(_)));
    create(&mut m, "i1", "k1");
    assert_eq!(m.run(report("c1", CommandAction::Revoke, DataPlaneOutcome::Failed, 10)), Reply::Done);
    // The same command, enforced on a retry, replaces its failure.
    m.run(report("c1", CommandAction::Revoke, DataPlaneOutcome::Enforced, 12));
    assert_eq!(m.instances["i1"].data_plane.as_ref().map(|d| (d.command_id.as_str(), d.outcome)), Some(("c1", DataPlaneOutcome::Enforced)));
    m.run(report("c2", CommandAction::Restore, DataPlaneOutcome::Enforced, 20));
    // A report of the revoke sent again late does not hide the restore after it.
    let audited = m.audit.len();
    m.run(report("c1", CommandAction::Revoke, DataPlaneOutcome::Enforced, 12));
    assert_eq!(m.instances["i1"].data_plane.as_ref().map(|d| d.command_id.as_str()), Some("c2"));
    assert_eq!(m.audit.len(), audited, "a report not kept is not audited either");
    let last = m.audit.iter().rev().find(|a| a.who == "data-plane agent").unwrap();
    assert_eq!((last.what.as_str(), last.outcome.as_str()), ("command restore", "enforced"));
}

#[test]
fn an_instance_record_stored_before_agents_decodes_without_a_data_plane() {
    let old = r#"{"instance_id":"i1","key_id":"k1","wrapped":{"key_version":"1","ciphertext":"AQID"},"key_version":"1",
        "dek_fingerprint":"fp","created_at":"2024-01-01T00:00:00Z","updated_at":"2024-01-01T00:00:00Z",
        "destroyed_at":null,"destroyed_reason":null,"rewrap_error":null}"#;
    let inst: InstanceRecord = serde_json::from_str(old).expect("an old record decodes");
    assert_eq!(inst.data_plane, None);
    assert!(!serde_json::to_string(&inst).unwrap().contains("data_plane"));
}

/// A rotation replaced by a newer one while its pass still ran: what that
/// pass finishes is kept and told under its own cause, but is not the newer
/// job's progress (which once jumped past 90% before the newer pass began).
#[test]
fn a_rewrap_by_a_replaced_rotation_is_kept_but_not_counted_as_the_new_jobs_progress() {
    let mut m = Mem::default();
    create(&mut m, "a", "k");
    create(&mut m, "b", "k");
    m.run(ev("r", EventType::Rotate, "k", 10));
    m.run(ev("r2", EventType::Rotate, "k", 20));
    assert_eq!(m.jobs["k"].cause_event_id, "r2");
    m.run(rewrapped("a", "1", "v-r", 9, "r", t(21)));
    m.run(Input::RewrapFailed { instance_id: "b".into(), from_version: "1".into(), reason: "refused".into(), job: "r".into(), at: t(21) });
    assert_eq!(m.instances["a"].key_version, "v-r", "the rewrap itself is kept");
    assert_eq!((m.jobs["k"].done, m.jobs["k"].failed), (0, 0), "the newer job counts none of the older pass's results");
    assert!(m.outbox.iter().any(|e| matches!(e, Effect::InstanceCommand { action: CommandAction::Rewrapped, cause_event_id, .. } if cause_event_id == "r")));
    m.run(rewrapped("a", "v-r", "v-r2", 8, "r2", t(22)));
    assert_eq!(m.jobs["k"].done, 1, "its own pass's rewrap counts");
}

/// A rotation pass's result: `instance_id` rewrapped from `from` to `to` by
/// the pass of the job caused by `job`.
fn rewrapped(instance_id: &str, from: &str, to: &str, ciphertext: u8, job: &str, at: DateTime<Utc>) -> Input {
    Input::Rewrapped {
        instance_id: instance_id.into(),
        from_version: from.into(),
        wrapped: WrappedDek { key_version: to.into(), ciphertext: vec![ciphertext] },
        job: job.into(),
        at,
    }
}
