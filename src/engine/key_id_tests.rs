//! `Input::key_id`: the key each kind of input is about.

use super::*;
use chrono::TimeZone;

/// A store with nothing in it; the tests layer what they need with an `Overlay`.
struct Empty;

impl View for Empty {
    fn key(&self, _: &str) -> Option<KeyRecord> {
        None
    }
    fn instance(&self, _: &str) -> Option<InstanceRecord> {
        None
    }
    fn event_seen(&self, _: &str) -> bool {
        false
    }
    fn job(&self, _: &str) -> Option<RotationJob> {
        None
    }
    fn instances_of(&self, _: &str) -> Vec<InstanceRecord> {
        vec![]
    }
}

fn t(secs: i64) -> DateTime<Utc> {
    Utc.timestamp_opt(1_700_000_000 + secs, 0).unwrap()
}

fn event(id: &str, kind: EventType, key: &str, at: i64) -> Input {
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

fn wrapped(version: &str) -> WrappedDek {
    WrappedDek { key_version: version.into(), ciphertext: vec![1, 2, 3] }
}

fn credential(id: &str) -> DekCredential {
    DekCredential { id: id.into(), sha256: "00".repeat(32), issued_at: t(0) }
}

fn create(instance: &str, key: &str) -> Input {
    Input::CreateInstance {
        instance_id: instance.into(),
        key_id: key.into(),
        wrapped: wrapped("1"),
        fingerprint: "fp".into(),
        credential: credential("c1"),
        at: t(0),
    }
}

/// The key of every key, instance and job record a decision writes.
fn keys_written(d: &Decision) -> Vec<String> {
    d.records
        .iter()
        .filter_map(|r| match r {
            Record::Key(k) => Some(k.key_id.clone()),
            Record::Instance(i) => Some(i.key_id.clone()),
            Record::Job(j) => Some(j.key_id.clone()),
            _ => None,
        })
        .collect()
}

#[test]
fn inputs_that_name_their_key_are_about_it_whether_or_not_it_is_known() {
    let view = Empty;
    let inputs = [
        event("e1", EventType::Disable, "k", 1),
        Input::RegisterKey { key_id: "k".into(), version: "1".into(), at: t(0) },
        create("i1", "k"),
        Input::JobPlanned { key_id: "k".into(), target_version: "2".into(), total: 3, rewrapping_to: "2".into() },
        Input::JobFinished { key_id: "k".into(), target_version: "2".into(), job: "e".into(), failed: 0, arrivals: 0, at: t(0) },
        Input::Purge { key_id: "k".into(), purge_after: Duration::from_secs(1), at: t(0) },
        Input::RetryRewraps { key_id: "k".into(), request_id: "r1".into(), at: t(0) },
    ];
    for input in inputs {
        assert_eq!(input.key_id(&view).as_deref(), Some("k"), "{input:?}");
    }
}

#[test]
fn inputs_that_name_an_instance_are_about_its_key() {
    let base = Empty;
    let mut view = Overlay::new(&base);
    let d = decide(&view, create("i1", "k"));
    view.absorb(&d.records);
    let about_i1 = [
        Input::DeleteInstance { instance_id: "i1".into(), request_id: "r1".into(), at: t(1) },
        Input::RotateCredential { instance_id: "i1".into(), credential: credential("c2"), at: t(1) },
        Input::Rewrapped { instance_id: "i1".into(), from_version: "1".into(), wrapped: wrapped("2"), job: "e1".into(), at: t(1) },
        Input::RewrapFailed { instance_id: "i1".into(), from_version: "1".into(), reason: "refused".into(), job: "e1".into(), at: t(1) },
    ];
    for input in about_i1 {
        assert_eq!(input.key_id(&view).as_deref(), Some("k"), "{input:?}");
    }
    let about_unknown = [
        Input::DeleteInstance { instance_id: "nope".into(), request_id: "r1".into(), at: t(1) },
        Input::RotateCredential { instance_id: "nope".into(), credential: credential("c2"), at: t(1) },
        Input::Rewrapped { instance_id: "nope".into(), from_version: "1".into(), wrapped: wrapped("2"), job: "e1".into(), at: t(1) },
        Input::RewrapFailed { instance_id: "nope".into(), from_version: "1".into(), reason: "refused".into(), job: "e1".into(), at: t(1) },
    ];
    for input in about_unknown {
        assert_eq!(input.key_id(&view), None, "{input:?}");
        // Nothing to own: the decision writes no state.
        assert!(keys_written(&decide(&view, input)).is_empty());
    }
}

#[test]
fn an_alert_is_about_no_key_even_one_whose_instances_it_counts() {
    let mut alert = Alert::new("KeywardenKeyDisabled", Severity::Warning, &[("key_id", "k")], "s".into(), "d".into(), t(0));
    alert.count_instances_of = Some("k".into());
    assert_eq!(Input::Alert(alert).key_id(&Empty), None);
}

/// What the writer relies on: checking the one key an input names covers
/// every record its decision writes.
#[test]
fn a_decision_writes_state_only_of_the_key_its_input_is_about() {
    let base = Empty;
    let mut view = Overlay::new(&base);
    let inputs = vec![
        Input::RegisterKey { key_id: "k".into(), version: "1".into(), at: t(0) },
        create("i1", "k"),
        create("j1", "other"),
        event("e1", EventType::Rotate, "k", 1),
        Input::JobPlanned { key_id: "k".into(), target_version: "v-e1".into(), total: 1, rewrapping_to: "v-e1".into() },
        Input::RewrapFailed { instance_id: "i1".into(), from_version: "1".into(), reason: "refused".into(), job: "e1".into(), at: t(2) },
        Input::RetryRewraps { key_id: "k".into(), request_id: "r1".into(), at: t(3) },
        Input::RotateCredential { instance_id: "i1".into(), credential: credential("c2"), at: t(3) },
        Input::Rewrapped { instance_id: "i1".into(), from_version: "1".into(), wrapped: wrapped("v-e1"), job: "r1".into(), at: t(4) },
        Input::JobFinished { key_id: "k".into(), target_version: "v-e1".into(), job: "r1".into(), failed: 0, arrivals: 0, at: t(5) },
        event("e2", EventType::Delete, "k", 6),
        Input::Purge { key_id: "k".into(), purge_after: Duration::from_secs(1), at: t(100) },
        Input::DeleteInstance { instance_id: "j1".into(), request_id: "r2".into(), at: t(101) },
    ];
    for input in inputs {
        let key = input.key_id(&view).unwrap_or_else(|| panic!("no key for {input:?}"));
        let d = decide(&view, input.clone());
        let written = keys_written(&d);
        assert!(!written.is_empty(), "{input:?} wrote no state; the scenario lost its way");
        assert!(written.iter().all(|k| *k == key), "{input:?} is about {key} but wrote {written:?}");
        view.absorb(&d.records);
    }
}
