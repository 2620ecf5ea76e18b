//! The store's behaviour through its one writer: what it keeps, what it
//! replicates, and what a partition's next owner finds.

use std::sync::{Arc, Mutex};
use std::time::Instant;

use chrono::Utc;

use super::writer::Writer;
use super::*;
use crate::cluster::{Changelog, ChangelogError, Fence, Ownership, Written};
use crate::engine::{CommandAction, Effect, EventRecord, InstanceRecord, KeyRecord, KeyStatus, Record, WrappedDek};

fn inst(id: &str, key: &str) -> InstanceRecord {
    InstanceRecord::sample(id, key)
}

/// A fake changelog: one partition, entries appended in order.
#[derive(Default)]
struct Log(Mutex<Vec<Replicated>>);

impl Changelog for Log {
    fn partition(&self, _route: &Route) -> i32 {
        0
    }

    fn publish(&self, records: &[Versioned], _deadline: Option<Instant>) -> Result<Vec<Written>, ChangelogError> {
        let mut log = self.0.lock().unwrap();
        let mut version = 0;
        for r in records {
            let offset = log.len() as i64;
            version = r.version;
            log.push(Replicated { partition: 0, offset, key: r.key.clone(), value: r.value.clone(), authentic: Some(version) });
        }
        Ok(vec![Written { partition: 0, next: log.len() as i64, version }])
    }
}

/// Applies entries through the writer, as the replica does.
async fn replicate(w: &Writer, entries: Vec<Replicated>) -> (usize, Vec<Refused>) {
    let w = w.clone();
    tokio::task::spawn_blocking(move || w.replicate_blocking(entries)).await.unwrap().unwrap()
}

fn with_changelog(s: &Store) -> Arc<Log> {
    let log = Arc::new(Log::default());
    s.set_changelog(log.clone());
    log
}

/// A writer for one node that owns every partition of a one-partition topic.
fn writer(s: &Store) -> Writer {
    let fence = Arc::new(Fence::default());
    fence.assign(&[("events".to_string(), 0)]);
    Writer::start(s.clone(), Ownership::shared(fence, "events", 1), 16, Box::new(|_| {})).0
}

/// An owner that writes through a fake changelog, and a second node's store
/// to replicate it to; the directories live as long as the value.
struct TwoNodes {
    _dirs: (tempfile::TempDir, tempfile::TempDir),
    owner: Store,
    next: Store,
    log: Arc<Log>,
    w: Writer,
}

fn two_nodes() -> TwoNodes {
    let (d1, d2) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (owner, next) = (Store::open(d1.path()).unwrap(), Store::open(d2.path()).unwrap());
    let log = with_changelog(&owner);
    let w = writer(&owner);
    TwoNodes { _dirs: (d1, d2), owner, next, log, w }
}

/// Queue records' effects, in order.
fn effects(records: Vec<(u64, Vec<Effect>)>) -> Vec<Effect> {
    records.into_iter().flat_map(|(_, effects)| effects).collect()
}

fn revoke(key: &str) -> Effect {
    Effect::KeyCommands {
        key_id: key.into(),
        action: CommandAction::Revoke,
        key_version: None,
        cause_event_id: format!("ev-{key}"),
        issued_at: chrono::DateTime::UNIX_EPOCH,
        correlation_id: None,
        traceparent: None,
    }
}

#[test]
fn census_counts_keys_and_instances_but_not_their_index() {
    let dir = tempfile::tempdir().unwrap();
    let s = Store::open(dir.path()).unwrap();
    s.commit(&[Record::Key(KeyRecord::new("k", Utc::now())), Record::Instance(inst("a", "k")), Record::Instance(inst("b", "k"))], false).unwrap();
    assert_eq!(s.census(), Census { keys: 1, instances: 2, outbox: 0 });
}

#[test]
fn tally_counts_dek_holders_and_destroyed_instances_per_key() {
    let dir = tempfile::tempdir().unwrap();
    let s = Store::open(dir.path()).unwrap();
    let mut gone = inst("c", "k");
    gone.wrapped = None;
    s.commit(&[Record::Instance(inst("a", "k")), Record::Instance(inst("b", "j")), Record::Instance(gone)], false).unwrap();
    let t = s.instance_tally().unwrap();
    assert_eq!(t["k"], Tally { with_dek: 1, destroyed: 1 });
    assert_eq!(t["j"], Tally { with_dek: 1, destroyed: 0 });
}

#[test]
fn an_instance_stored_as_json_before_the_binary_form_reads_and_is_rewritten_binary_when_it_changes() {
    let dir = tempfile::tempdir().unwrap();
    let s = Store::open(dir.path()).unwrap();
    let mut old = inst("a", "k");
    old.wrapped = None;
    // As a release before the binary form wrote it, index entry included.
    s.tree.insert(k(INSTANCE, "a"), serde_json::to_vec(&old).unwrap()).unwrap();
    s.tree.insert(index_key("k", "a"), vec![]).unwrap();
    assert_eq!(s.instance("a").unwrap().as_ref(), Some(&old));
    assert_eq!(s.instances_of("k").unwrap(), vec![old.clone()]);
    assert_eq!(s.instance_tally().unwrap()["k"], Tally { with_dek: 0, destroyed: 1 });
    old.rewrap_error = Some("changed".into());
    s.commit(&[Record::Instance(old.clone())], false).unwrap();
    let stored = s.tree.get(k(INSTANCE, "a")).unwrap().unwrap();
    assert_ne!(stored.first(), Some(&b'{'), "rewritten in the binary form");
    assert_eq!(s.instance("a").unwrap(), Some(old));
}

#[test]
fn committed_batch_survives_reopen_with_its_offset() {
    let dir = tempfile::tempdir().unwrap();
    {
        let s = Store::open(dir.path()).unwrap();
        let mut key = KeyRecord::new("k", Utc::now());
        key.status = KeyStatus::Disabled;
        s.commit(
            &[
                Record::Key(key),
                Record::Instance(inst("a", "k")),
                Record::Instance(inst("b", "k")),
                // A key whose id starts with the other's: its instances are its own.
                Record::Instance(inst("c", "kk")),
                Record::Offset { topic: "t".into(), partition: 2, next: 41 },
            ],
            true,
        )
        .unwrap();
    }
    let s = Store::open(dir.path()).unwrap();
    assert_eq!(s.key("k").unwrap().unwrap().status, KeyStatus::Disabled);
    assert_eq!(s.instance_ids_of("k").unwrap(), vec!["a".to_string(), "b".to_string()]);
    assert_eq!(s.instance_count("k").unwrap(), 2);
    assert_eq!(s.instance_count("kk").unwrap(), 1);
    assert_eq!(s.instance_count("none").unwrap(), 0);
    assert_eq!(s.offset("t", 2).unwrap(), Some(41));
    assert_eq!(s.offset("t", 1).unwrap(), None);
}

#[test]
fn a_keys_instances_read_page_by_page_are_each_read_once_in_order_and_only_its_own() {
    let dir = tempfile::tempdir().unwrap();
    let s = Store::open(dir.path()).unwrap();
    let mut records: Vec<Record> = (0..7).map(|i| Record::Instance(inst(&format!("i{i}"), "k"))).collect();
    // A key whose id starts with the other's, and one sorting after it: neither's instances are k's.
    records.push(Record::Instance(inst("x", "kk")));
    records.push(Record::Instance(inst("y", "l")));
    s.commit(&records, false).unwrap();
    // An index entry whose record never arrived (a changelog prefix) fills a
    // page without a record: the walk must go on past it.
    s.tree.insert(index_key("k", "i1a"), vec![]).unwrap();
    let mut read = Vec::new();
    let mut after: Option<String> = None;
    let mut pages = 0;
    loop {
        let (page, next) = s.instances_of_after("k", after.as_deref(), 3).unwrap();
        assert!(page.len() <= 3, "a page holds at most its limit: {}", page.len());
        read.extend(page.into_iter().map(|i| i.instance_id));
        pages += 1;
        match next {
            Some(next) => after = Some(next),
            None => break,
        }
    }
    let all: Vec<String> = s.instances_of("k").unwrap().into_iter().map(|i| i.instance_id).collect();
    assert_eq!(read, all);
    assert_eq!(read.len(), 7);
    // Eight index entries, three a page.
    assert_eq!(pages, 3);
    assert_eq!(s.instances_of_after("none", None, 3).unwrap(), (vec![], None));
}

#[test]
fn a_corrupt_record_is_refused_by_name_not_a_panic() {
    let dir = tempfile::tempdir().unwrap();
    let s = Store::open(dir.path()).unwrap();
    s.tree.insert(schema::k(schema::KEY, "k"), &b"{not json"[..]).unwrap();
    let err = s.key("k").unwrap_err();
    assert!(matches!(&err, StoreError::Corrupt { key, .. } if key == "k/k"), "{err}");
    assert!(s.keys().is_err());
    // The engine's view keeps the error for the writer, which refuses the decision.
    let reading = s.reading();
    assert!(crate::engine::View::key(&reading, "k").is_none());
    assert!(matches!(reading.take_error(), Some(StoreError::Corrupt { .. })));
}

#[tokio::test]
async fn a_decision_over_a_corrupt_record_is_refused_and_the_writer_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let s = Store::open(dir.path()).unwrap();
    s.tree.insert(schema::k(schema::KEY, "bad"), &b"\xff"[..]).unwrap();
    let w = writer(&s);
    let purge = |key: &str| crate::engine::Input::Purge { key_id: key.into(), purge_after: std::time::Duration::ZERO, at: Utc::now() };
    let refused = w.submit(purge("bad")).await;
    assert!(matches!(refused, Err(writer::WriterError::Store(StoreError::Corrupt { .. }))), "{refused:?}");
    let created = w.submit(crate::engine::Input::RegisterKey { key_id: "good".into(), version: "1".into(), at: Utc::now() }).await;
    assert!(created.is_ok(), "{created:?}");
    assert!(s.key("good").unwrap().is_some());
}

/// An event that could not be committed (its key's stored record cannot be
/// read) must not be passed by the offset of a later event of its
/// partition: the intake stops on the failure, and the next read of the
/// partition starts at the stored offset, which would skip a disable that
/// was never applied.
#[tokio::test]
async fn a_consumed_input_that_fails_is_not_passed_by_a_later_offset_of_its_partition() {
    let dir = tempfile::tempdir().unwrap();
    let s = Store::open(dir.path()).unwrap();
    s.tree.insert(schema::k(schema::KEY, "bad"), &b"\xff"[..]).unwrap();
    let w = writer(&s);
    let disable = |event: &str, key: &str| crate::engine::Input::Event {
        event: crate::engine::LifecycleEvent {
            event_id: event.into(),
            kind: crate::engine::EventType::Disable,
            key_id: key.into(),
            key_version: None,
            occurred_at: Utc::now(),
            correlation_id: None,
            traceparent: None,
            material_destroyed: false,
        },
        at: Utc::now(),
        kms: None,
    };
    let consumed = |next: i64| writer::Consumed { topic: "events".into(), partition: 0, next, generation: 1 };
    let first = w.enqueue(Some(disable("e1", "bad")), Some(consumed(1))).await.unwrap();
    let second = w.enqueue(Some(disable("e2", "good")), Some(consumed(2))).await.unwrap();
    let first = first.await;
    assert!(matches!(first, Err(writer::WriterError::Store(StoreError::Corrupt { .. }))), "{first:?}");
    let second = second.await;
    assert!(matches!(second, Err(writer::WriterError::Halted { partition: 0, .. })), "{second:?}");
    assert_eq!(s.offset("events", 0).unwrap(), None, "no offset of partition 0 passes the event that failed");
    assert!(s.event("e2").unwrap().is_none(), "the later event waits to be read again, after the failed one");
    // Inputs that are not consumed from the partition go on.
    let created = w.submit(crate::engine::Input::RegisterKey { key_id: "k2".into(), version: "1".into(), at: Utc::now() }).await;
    assert!(created.is_ok(), "{created:?}");
}

#[tokio::test]
async fn replica_skips_its_own_entries_and_applies_the_next_owners() {
    let dir = tempfile::tempdir().unwrap();
    let s = Store::open(dir.path()).unwrap();
    let log = with_changelog(&s);
    let w = writer(&s);
    w.import(vec![Record::Key(KeyRecord::new("k", Utc::now())), Record::Instance(inst("i1", "k"))]).await.unwrap();
    // The data plane's decoded copies follow every commit, its own and replicated.
    let served = |s: &Store| s.key_shared("k").unwrap().unwrap().status;
    let version = |s: &Store| s.instance_shared("i1").unwrap().unwrap().key_version.clone();
    assert_eq!(served(&s), KeyStatus::Active);
    assert_eq!(version(&s), "1");
    let mut disabled = KeyRecord::new("k", Utc::now());
    disabled.status = KeyStatus::Disabled;
    let mut rewrapped = inst("i1", "k");
    rewrapped.key_version = "2".into();
    w.import(vec![Record::Key(disabled), Record::Instance(rewrapped)]).await.unwrap();
    assert_eq!(served(&s), KeyStatus::Disabled, "a commit of this node replaced the decoded key");
    assert_eq!(version(&s), "2", "a commit of this node replaced the decoded instance");
    // This node's own entries, read back late, never undo its newer change.
    let own = log.0.lock().unwrap().clone();
    assert_eq!(replicate(&w, own.clone()).await.0, 0);
    assert_eq!(s.key("k").unwrap().unwrap().status, KeyStatus::Disabled);
    // Another owner's later entry is applied, whoever this node thinks owns the key.
    let enabled = Replicated {
        partition: 0,
        offset: own.len() as i64,
        key: schema::k(schema::KEY, "k"),
        value: Some(schema::encode(&KeyRecord::new("k", Utc::now()))),
        authentic: Some(s.changelog_version(0).unwrap() + 1),
    };
    let mut again = inst("i1", "k");
    again.key_version = "3".into();
    let rewrapped_there = Replicated {
        partition: 0,
        offset: own.len() as i64 + 1,
        key: schema::k(schema::INSTANCE, "i1"),
        value: Some(compact::encode_instance(&again)),
        authentic: Some(s.changelog_version(0).unwrap() + 2),
    };
    assert_eq!(replicate(&w, vec![enabled, rewrapped_there]).await.0, 2);
    assert_eq!(s.key("k").unwrap().unwrap().status, KeyStatus::Active);
    assert_eq!(served(&s), KeyStatus::Active, "a replicated commit replaced the decoded key");
    assert_eq!(version(&s), "3", "a replicated commit replaced the decoded instance");
    assert_eq!(s.replica_position(0).unwrap(), Some(own.len() as i64 + 2));
}

#[test]
fn a_batch_publishes_each_record_once_with_its_last_value_and_commands_first() {
    let dir = tempfile::tempdir().unwrap();
    let s = Store::open(dir.path()).unwrap();
    let log = with_changelog(&s);
    s.commit(&[Record::Instance(inst("i1", "k"))], true).unwrap();
    log.0.lock().unwrap().clear();
    let mut disabled = KeyRecord::new("k", Utc::now());
    disabled.status = KeyStatus::Disabled;
    let mut rewrapped = inst("i1", "k");
    rewrapped.key_version = "2".into();
    s.commit(
        &[
            Record::Key(KeyRecord::new("k", Utc::now())),
            Record::Instance(inst("i1", "k")),
            Record::Instance(rewrapped.clone()),
            Record::Outbox(revoke("k")),
            Record::Key(disabled.clone()),
        ],
        true,
    )
    .unwrap();
    let keys: Vec<String> = log.0.lock().unwrap().iter().map(|e| String::from_utf8_lossy(&e.key).into_owned()).collect();
    assert_eq!(keys.len(), 3, "the key once, the instance once (its index exists already), one command: {keys:?}");
    assert!(keys[0].starts_with("c/") && keys[1] == "i/i1" && keys[2] == "k/k", "{keys:?}");
    let log = log.0.lock().unwrap();
    assert_eq!(log[1].value.as_deref(), Some(&compact::encode_instance(&rewrapped)[..]), "the instance's last value");
    assert_eq!(log[2].value.as_deref(), Some(&schema::encode(&disabled)[..]), "the key's last value");
    assert_eq!(s.key("k").unwrap().unwrap().status, KeyStatus::Disabled);
}

#[tokio::test]
async fn a_group_of_one_applies_first_and_its_replica_takes_its_unconfirmed_records_as_its_own() {
    let dir = tempfile::tempdir().unwrap();
    let s = Store::open(dir.path()).unwrap();
    let log = Arc::new(Log::default());
    s.set_publishing(Publishing::After(log.clone(), Arc::new(crate::cluster::deferred::Deferred::default())));
    let w = writer(&s);
    w.import(vec![Record::Key(KeyRecord::new("k", Utc::now()))]).await.unwrap();
    let mut disabled = KeyRecord::new("k", Utc::now());
    disabled.status = KeyStatus::Disabled;
    w.import(vec![Record::Key(disabled)]).await.unwrap();
    // Applied and durable with nothing published yet: the records wait in the store.
    assert_eq!(s.key("k").unwrap().unwrap().status, KeyStatus::Disabled);
    assert!(log.0.lock().unwrap().is_empty());
    let queued = s.unpublished(None, u64::MAX, 10).unwrap();
    assert_eq!(queued.len(), 2, "one entry per batch, in commit order");
    assert_eq!(s.last_unpublished().unwrap(), Some(queued[1].0));
    // Published, and read back by the replica before the confirmation is
    // recorded: this node's own records, neither applied over the newer
    // state nor refused as replays.
    let records: Vec<Versioned> = queued.iter().flat_map(|(_, r)| r.clone()).collect();
    assert!(records.windows(2).all(|p| p[0].version < p[1].version), "versions rise in commit order");
    let written = log.publish(&records, None).unwrap();
    let own = log.0.lock().unwrap().clone();
    let (applied, refused) = replicate(&w, own.clone()).await;
    assert_eq!((applied, refused.len()), (0, 0), "{refused:?}");
    assert_eq!(s.key("k").unwrap().unwrap().status, KeyStatus::Disabled);
    // Confirmed: the queue is empty, and a copy of a record is a replay again.
    w.published(vec![Published { ids: queued.iter().map(|(id, _)| *id).collect(), written }]).await.unwrap();
    assert!(s.unpublished(None, u64::MAX, 10).unwrap().is_empty());
    let replay = Replicated { offset: own.len() as i64, ..own[0].clone() };
    let (applied, refused) = replicate(&w, vec![replay]).await;
    assert_eq!(applied, 0);
    assert_eq!(refused.iter().map(|r| r.reason).collect::<Vec<_>>(), vec!["changelog_replayed"]);
    assert_eq!(s.key("k").unwrap().unwrap().status, KeyStatus::Disabled);
}

#[tokio::test]
async fn an_entry_published_but_not_applied_before_a_crash_is_applied_from_the_changelog() {
    let dir = tempfile::tempdir().unwrap();
    let published = {
        let s = Store::open(dir.path()).unwrap();
        let log = with_changelog(&s);
        writer(&s).import(vec![Record::Key(KeyRecord::new("k", Utc::now()))]).await.unwrap();
        let entries = log.0.lock().unwrap().clone();
        entries
    };
    // The same store before that commit: the write-ahead entry is all there is.
    let fresh = tempfile::tempdir().unwrap();
    let s = Store::open(fresh.path()).unwrap();
    assert!(s.key("k").unwrap().is_none());
    let w = writer(&s);
    let n = published.len();
    assert_eq!(replicate(&w, published).await.0, n);
    assert_eq!(s.key("k").unwrap().unwrap().status, KeyStatus::Active);
}

#[tokio::test]
async fn an_emitted_event_another_node_left_is_queued_at_take_over_until_an_event_record_shows_it_applied() {
    let TwoNodes { _dirs, owner: _, next, log, w } = two_nodes();
    let emit = |id: &str, key: &str| Emission {
        event_id: id.into(),
        effect: Effect::LifecycleEvent { key_id: key.into(), payload: format!(r#"{{"event_id":"{id}"}}"#) },
    };
    for (key, id) in [("a", "e1"), ("b", "e2")] {
        let change = KmsChange { key_id: key.into(), expected: None, material: b"{}".to_vec(), emits: Some(emit(id, key)) };
        assert!(w.change_kms(change, None).await.unwrap());
    }
    // A second change that read the same (now stale) record is refused.
    let stale = KmsChange { key_id: "a".into(), expected: None, material: b"{}".to_vec(), emits: None };
    assert!(!w.change_kms(stale, None).await.unwrap(), "compare-and-swap");
    let entries = log.0.lock().unwrap().clone();
    let nw = writer(&next);
    replicate(&nw, entries).await;
    // e1 was applied by the owner before it died; e2 was not.
    let applied = EventRecord {
        event_id: "e1".into(),
        key_id: "a".into(),
        kind: crate::engine::EventType::Disable,
        occurred_at: Utc::now(),
        applied_at: Utc::now(),
        outcome: crate::engine::Outcome::Applied,
        detail: String::new(),
        correlation_id: None,
    };
    nw.import(vec![Record::Event(applied)]).await.unwrap();
    assert_eq!(next.outbox_len(), 0);
    let (emitted, _) = nw.take_over("events", 0, 1, "http://next").await.unwrap();
    assert_eq!(emitted, 1);
    assert_eq!(effects(next.outbox(10).unwrap()), vec![emit("e2", "b").effect]);
    assert_eq!(next.owner_url(0).unwrap().as_deref(), Some("http://next"));
    // The emitting node's own take-over queues nothing again: its copy is its outbox.
    let (own, _) = w.take_over("events", 0, 1, "http://owner").await.unwrap();
    assert_eq!(own, 0);
}

#[tokio::test]
async fn commands_a_dead_owner_left_unsent_are_adopted_by_the_next_and_forgotten_once_sent() {
    let TwoNodes { _dirs, owner, next, log, w } = two_nodes();
    w.import(vec![Record::Outbox(revoke("a"))]).await.unwrap();
    w.import(vec![Record::Outbox(revoke("b"))]).await.unwrap();
    // "b" was sent before the owner died; "a" was not.
    let b = owner.outbox(10).unwrap().into_iter().find(|(_, e)| *e == [revoke("b")]).unwrap().0;
    // As a relay that read it back would say, and as one that knows it by id alone.
    w.sent(Queue::Outbox, vec![SentEntry::id(b)]).await.unwrap();
    let entries = log.0.lock().unwrap().clone();
    let nw = writer(&next);
    replicate(&nw, entries).await;
    assert_eq!(next.outbox_len(), 0, "a copy is not sent by a node that does not own the key");
    assert_eq!(nw.take_over("events", 0, 1, "http://next").await.unwrap().1, 1);
    assert_eq!(effects(next.outbox(10).unwrap()), vec![revoke("a")]);
    assert_eq!(nw.take_over("events", 0, 1, "http://next").await.unwrap().1, 0, "adopted once");
}

#[tokio::test]
async fn outbox_keeps_commit_order_one_record_per_commit_and_forgets_what_was_sent() {
    let dir = tempfile::tempdir().unwrap();
    let s = Store::open(dir.path()).unwrap();
    let w = writer(&s);
    w.import(vec![Record::Outbox(revoke("a")), Record::Outbox(revoke("b"))]).await.unwrap();
    w.import(vec![Record::Outbox(revoke("c"))]).await.unwrap();
    let out = s.outbox(10).unwrap();
    let records: Vec<Vec<Effect>> = out.iter().map(|(_, e)| e.clone()).collect();
    assert_eq!(records, [vec![revoke("a"), revoke("b")], vec![revoke("c")]]);
    w.sent(Queue::Outbox, vec![SentEntry::of(out[0].0, &out[0].1)]).await.unwrap();
    assert_eq!(effects(s.outbox(10).unwrap()), [revoke("c")], "the first commit's record went whole");
    assert_eq!(s.outbox_len(), 1);
    // A record an older release wrote holds one effect.
    let id = out[1].0 + 1;
    s.tree.insert(queue_key(OUTBOX, id), encode(&revoke("old"))).unwrap();
    assert_eq!(s.outbox_from(id, 10).unwrap(), [(id, vec![revoke("old")])]);
}

fn alert(key: &str, resolved: bool) -> crate::engine::Alert {
    let mut a = crate::engine::Alert::new("KeywardenKeyDisabled", crate::engine::Severity::Warning, &[("key_id", key)], "s".into(), "d".into(), Utc::now());
    a.ends_at = resolved.then(Utc::now);
    a
}

#[tokio::test]
async fn a_commits_alerts_are_queued_as_one_record_in_order_and_go_once_delivered() {
    let dir = tempfile::tempdir().unwrap();
    let s = Store::open(dir.path()).unwrap();
    let w = writer(&s);
    let first = [alert("a", false), alert("b", false), alert("a", true)];
    w.import(first.into_iter().map(|a| Record::Outbox(Effect::Alert(a))).collect()).await.unwrap();
    w.import(vec![Record::Outbox(Effect::Alert(alert("c", false)))]).await.unwrap();
    let queued = s.alerts_from(0, 10).unwrap();
    let shape: Vec<Vec<(String, bool)>> =
        queued.iter().map(|(_, alerts)| alerts.iter().map(|a| (a.labels["key_id"].clone(), a.ends_at.is_some())).collect()).collect();
    assert_eq!(
        shape,
        vec![vec![("a".into(), false), ("b".into(), false), ("a".into(), true)], vec![("c".into(), false)]],
        "one record per commit, its alerts in order"
    );
    // Resolved within its commit, a is not firing; b and c are.
    let mut firing: Vec<String> = s.firing_alerts().unwrap().iter().map(|a| a.labels["key_id"].clone()).collect();
    firing.sort();
    assert_eq!(firing, ["b", "c"]);
    w.sent(Queue::Alerts, vec![SentEntry::id(queued[0].0)]).await.unwrap();
    let left = s.alerts_from(0, 10).unwrap();
    assert_eq!(left.len(), 1);
    assert_eq!(left[0].0, queued[1].0, "the delivered record went, whole");
    // A record an older release wrote holds one alert, as an effect.
    let id = left[0].0 + 1;
    s.tree.insert(queue_key(ALERTS, id), encode(&Effect::Alert(alert("old", false)))).unwrap();
    let read = s.alerts_from(id, 10).unwrap();
    assert_eq!(read.len(), 1);
    assert_eq!(read[0].1.iter().map(|a| a.labels["key_id"].as_str()).collect::<Vec<_>>(), ["old"]);
}

#[tokio::test]
async fn a_key_another_node_owns_is_refused_by_the_writer() {
    let dir = tempfile::tempdir().unwrap();
    let s = Store::open(dir.path()).unwrap();
    // Owns partition 0 of a two-partition topic only.
    let fence = Arc::new(Fence::default());
    fence.assign(&[("events".to_string(), 0)]);
    let (w, _) = Writer::start(s.clone(), Ownership::shared(fence, "events", 2), 16, Box::new(|_| {}));
    let (mine, theirs) = {
        let keys: Vec<String> = (0..100).map(|i| format!("key-{i}")).collect();
        let mine = keys.iter().find(|k| crate::cluster::partition_of(k, 2) == 0).unwrap().clone();
        let theirs = keys.iter().find(|k| crate::cluster::partition_of(k, 2) == 1).unwrap().clone();
        (mine, theirs)
    };
    let register = |key: &str| crate::engine::Input::RegisterKey { key_id: key.into(), version: "1".into(), at: Utc::now() };
    assert!(w.submit(register(&mine)).await.is_ok());
    let refused = w.submit(register(&theirs)).await;
    assert!(matches!(&refused, Err(writer::WriterError::NotOwner { key_id }) if *key_id == theirs), "{refused:?}");
    assert!(s.key(&theirs).unwrap().is_none());
    let change = KmsChange { key_id: theirs.clone(), expected: None, material: b"{}".to_vec(), emits: None };
    assert!(matches!(w.change_kms(change, None).await, Err(writer::WriterError::NotOwner { .. })));
}

fn rewrapped(instance_id: &str, from_version: &str) -> crate::engine::Input {
    crate::engine::Input::Rewrapped {
        instance_id: instance_id.into(),
        from_version: from_version.into(),
        wrapped: WrappedDek { key_version: "2".into(), ciphertext: vec![2] },
        job: "rotate-1".into(),
        at: Utc::now(),
    }
}

#[tokio::test]
async fn a_chunk_of_rewraps_is_committed_as_one_job_and_a_stale_result_in_it_is_dropped() {
    let dir = tempfile::tempdir().unwrap();
    let s = Store::open(dir.path()).unwrap();
    let w = writer(&s);
    w.import((0..3).map(|i| Record::Instance(inst(&format!("i{i}"), "k"))).collect()).await.unwrap();
    // i2 was read at version 0, which it no longer holds: that result is dropped.
    let chunk = vec![rewrapped("i0", "1"), rewrapped("i1", "1"), rewrapped("i2", "0"), rewrapped("gone", "1")];
    w.enqueue_all(chunk).await.unwrap().await.unwrap();
    let version = |id: &str| s.instance(id).unwrap().unwrap().key_version;
    assert_eq!((version("i0"), version("i1"), version("i2")), ("2".into(), "2".into(), "1".into()));
    assert!(s.instance("gone").unwrap().is_none(), "a result for an unknown instance creates nothing");
    let commands = s.outbox(10).unwrap();
    // One outbox entry for the chunk, naming each applied result once, in order.
    let [Effect::InstanceCommands { instances, action: CommandAction::Rewrapped, key_version, .. }] = &effects(commands.clone())[..] else {
        panic!("the chunk's commands are one entry: {commands:?}");
    };
    let named: Vec<&str> = instances.iter().map(|i| i.instance_id.as_str()).collect();
    assert_eq!((named, key_version.as_deref()), (vec!["i0", "i1"], Some("2")));
}

#[tokio::test]
async fn a_chunk_of_commands_is_replicated_once_adopted_whole_and_forgotten_once_sent() {
    let TwoNodes { _dirs, owner, next, log, w } = two_nodes();
    w.import((0..3).map(|i| Record::Instance(inst(&format!("i{i}"), "k"))).collect()).await.unwrap();
    let before = log.0.lock().unwrap().len();
    w.enqueue_all(vec![rewrapped("i0", "1"), rewrapped("i1", "1"), rewrapped("i2", "1")]).await.unwrap().await.unwrap();
    let copies = |log: &[Replicated]| log.iter().filter(|r| r.key.starts_with(COMMANDS)).map(|r| r.value.is_some()).collect::<Vec<bool>>();
    assert_eq!(copies(&log.0.lock().unwrap()[before..]), [true], "one replicated copy for the chunk's three commands");
    // The owner dies before sending it: the next owner adopts all of it.
    let nw = writer(&next);
    let entries = log.0.lock().unwrap().clone();
    replicate(&nw, entries).await;
    assert_eq!(nw.take_over("events", 0, 1, "http://next").await.unwrap().1, 1);
    let adopted = effects(next.outbox(10).unwrap());
    let [Effect::InstanceCommands { instances, .. }] = &adopted[..] else { panic!("adopted whole: {adopted:?}") };
    assert_eq!(instances.len(), 3);
    // Sent by the owner instead: its copy is tombstoned, once.
    let queued = owner.outbox(10).unwrap();
    let sent_at = log.0.lock().unwrap().len();
    w.sent(Queue::Outbox, queued.iter().map(|(id, e)| SentEntry::of(*id, e)).collect()).await.unwrap();
    assert_eq!(copies(&log.0.lock().unwrap()[sent_at..]), [false]);
    assert_eq!(owner.outbox_len(), 0);
}

#[tokio::test]
async fn a_round_of_the_outbox_counts_a_chunk_as_its_commands() {
    let dir = tempfile::tempdir().unwrap();
    let s = Store::open(dir.path()).unwrap();
    let w = writer(&s);
    w.import((0..4).map(|i| Record::Instance(inst(&format!("i{i}"), "k"))).collect()).await.unwrap();
    w.enqueue_all(vec![rewrapped("i0", "1"), rewrapped("i1", "1"), rewrapped("i2", "1")]).await.unwrap().await.unwrap();
    w.import(vec![Record::Outbox(revoke("a"))]).await.unwrap();
    w.import(vec![Record::Outbox(revoke("b"))]).await.unwrap();
    // The chunk weighs 3: a limit of 2 still takes it (one record at least), a
    // limit of 4 takes one more record, not two.
    assert_eq!(s.outbox(2).unwrap().len(), 1);
    assert_eq!(s.outbox(4).unwrap().len(), 2);
    assert_eq!(s.outbox(5).unwrap().len(), 3);
}

#[tokio::test]
async fn a_queue_read_from_past_its_removed_front_sees_the_rest_in_order_and_nothing_of_other_queues() {
    let dir = tempfile::tempdir().unwrap();
    let s = Store::open(dir.path()).unwrap();
    let w = writer(&s);
    let keys: Vec<String> = (0..6).map(|i| format!("q{i}")).collect();
    for k in &keys {
        w.import(vec![Record::Outbox(revoke(k))]).await.unwrap();
    }
    // Queued after the outbox, under the next prefixes: a read must stop at its own.
    w.import(vec![Record::Offset { topic: "t".into(), partition: 0, next: 1 }]).await.unwrap();
    let all = s.outbox(100).unwrap();
    assert_eq!(all.len(), 6);
    let sent: Vec<SentEntry> = all[..4].iter().map(|(id, e)| SentEntry::of(*id, e)).collect();
    w.sent(Queue::Outbox, sent).await.unwrap();
    let from = all[3].0 + 1;
    let rest = s.outbox_from(from, 100).unwrap();
    assert_eq!(rest, all[4..].to_vec(), "the two left, in order");
    assert_eq!(s.outbox_len_from(from), 2);
    // Entries queued later have higher ids: read from the same place, they follow.
    w.import(vec![Record::Outbox(revoke("later"))]).await.unwrap();
    let after = s.outbox_from(from, 100).unwrap();
    assert_eq!(effects(after), vec![revoke("q4"), revoke("q5"), revoke("later")]);
    // Past every id: nothing, and not the next prefix's records.
    assert!(s.outbox_from(u64::MAX, 100).unwrap().is_empty());
    assert_eq!(s.outbox_len_from(u64::MAX), 0);
}

#[tokio::test]
async fn a_chunk_with_a_key_another_node_owns_is_refused_whole() {
    let dir = tempfile::tempdir().unwrap();
    let s = Store::open(dir.path()).unwrap();
    let fence = Arc::new(Fence::default());
    fence.assign(&[("events".to_string(), 0)]);
    let (w, _) = Writer::start(s.clone(), Ownership::shared(fence, "events", 2), 16, Box::new(|_| {}));
    let keys: Vec<String> = (0..100).map(|i| format!("key-{i}")).collect();
    let mine = keys.iter().find(|k| crate::cluster::partition_of(k, 2) == 0).unwrap().clone();
    let theirs = keys.iter().find(|k| crate::cluster::partition_of(k, 2) == 1).unwrap().clone();
    w.import(vec![Record::Instance(inst("a", &mine)), Record::Instance(inst("b", &theirs))]).await.unwrap();
    let refused = w.enqueue_all(vec![rewrapped("a", "1"), rewrapped("b", "1")]).await.unwrap().await;
    assert!(matches!(&refused, Err(writer::WriterError::NotOwner { key_id }) if *key_id == theirs), "{refused:?}");
    assert_eq!(s.instance("a").unwrap().unwrap().key_version, "1", "nothing of a refused chunk is applied");
}

#[tokio::test]
async fn a_forged_a_replayed_and_an_unreplicable_record_are_refused_and_the_replica_goes_on() {
    let TwoNodes { _dirs, owner: _, next: replica, log, w } = two_nodes();
    let mut disabled = KeyRecord::new("k", Utc::now());
    disabled.status = KeyStatus::Disabled;
    w.import(vec![Record::Key(KeyRecord::new("k", Utc::now()))]).await.unwrap();
    let active = log.0.lock().unwrap().clone();
    w.import(vec![Record::Key(disabled)]).await.unwrap();
    let entries = log.0.lock().unwrap().clone();
    let rw = writer(&replica);
    assert_eq!(replicate(&rw, entries.clone()).await, (entries.len(), vec![]));
    assert_eq!(replica.key("k").unwrap().unwrap().status, KeyStatus::Disabled);
    let mut next = entries.len() as i64;
    let mut at = || {
        next += 1;
        next - 1
    };
    // The old, authentic "active" record, produced again: a replay.
    let mut replay = active[0].clone();
    replay.offset = at();
    // Any record without a valid MAC.
    let forged = Replicated { offset: at(), authentic: None, ..replay.clone() };
    // Authentic but of a prefix replication never carries (an outbox entry the relay would sign).
    let outbox = Replicated {
        offset: at(),
        key: schema::queue_key(schema::OUTBOX, 1),
        value: Some(schema::encode(&revoke("k"))),
        authentic: Some(i64::MAX - 1),
        ..replay.clone()
    };
    // Authentic, the right prefix, a value that does not decode.
    let corrupt = Replicated { offset: at(), key: schema::k(schema::KEY, "k"), value: Some(b"{".to_vec()), authentic: Some(i64::MAX), ..replay.clone() };
    let (applied, refused) = replicate(&rw, vec![replay, forged, outbox, corrupt]).await;
    assert_eq!(applied, 0);
    assert_eq!(refused.iter().map(|r| r.reason).collect::<Vec<_>>(), ["changelog_replayed", "changelog_forged", "changelog_prefix", "changelog_corrupt"]);
    assert_eq!(replica.key("k").unwrap().unwrap().status, KeyStatus::Disabled, "still revoked");
    assert_eq!(replica.outbox_len(), 0, "nothing for the relay to send");
    assert_eq!(replica.replica_position(0).unwrap(), Some(next), "the replica passed them");
    // And goes on: the owner's next real change is applied.
    w.import(vec![Record::Key(KeyRecord::new("k", Utc::now()))]).await.unwrap();
    let newest = log.0.lock().unwrap().last().cloned().unwrap();
    let newest = Replicated { offset: next, ..newest };
    assert_eq!(replicate(&rw, vec![newest]).await.0, 1);
    assert_eq!(replica.key("k").unwrap().unwrap().status, KeyStatus::Active);
}

#[tokio::test]
async fn a_command_sent_after_its_key_moved_is_not_tombstoned_by_the_old_owner() {
    let dir = tempfile::tempdir().unwrap();
    let s = Store::open(dir.path()).unwrap();
    let log = with_changelog(&s);
    // Owns partition 0 of two only.
    let fence = Arc::new(Fence::default());
    fence.assign(&[("events".to_string(), 0)]);
    let (w, _) = Writer::start(s.clone(), Ownership::shared(fence, "events", 2), 16, Box::new(|_| {}));
    let keys: Vec<String> = (0..100).map(|i| format!("key-{i}")).collect();
    let mine = keys.iter().find(|k| crate::cluster::partition_of(k, 2) == 0).unwrap();
    let moved = keys.iter().find(|k| crate::cluster::partition_of(k, 2) == 1).unwrap();
    // Queued while both were this node's (imports are not ownership-checked).
    w.import(vec![Record::Outbox(revoke(mine)), Record::Outbox(revoke(moved))]).await.unwrap();
    let sent: Vec<SentEntry> = s.outbox(10).unwrap().iter().map(|(id, effect)| SentEntry::of(*id, effect)).collect();
    let before = log.0.lock().unwrap().len();
    w.sent(Queue::Outbox, sent).await.unwrap();
    let tombstones: Vec<String> =
        log.0.lock().unwrap()[before..].iter().filter(|e| e.value.is_none()).map(|e| String::from_utf8_lossy(&e.key).into_owned()).collect();
    assert_eq!(tombstones.len(), 1, "{tombstones:?}");
    assert!(tombstones[0].contains(&format!("ev-{mine}")), "only the owned key's copy is tombstoned: {tombstones:?}");
    assert_eq!(s.outbox_len(), 0, "both are gone from this node's outbox");
}

/// Ordering against a reference model, through the real writer and store.
/// Several keys each get distinct events (disable, enable, rotate) dated at
/// random, so that they arrive out of order: some older than what was
/// applied, some newer. Producers' duplicates (the same event again at a new
/// offset), instance creations and rotation results (chunks of rewraps, some
/// late: from a version the instance left, or by the pass of a job a newer
/// rotate replaced) are mixed in. At random points the node "crashes": the
/// writer and store are closed and reopened, and everything the last `k`
/// inputs committed but nobody acknowledged (the intake's offsets to Kafka,
/// the rotation worker's and API callers' answers) is handed to it again;
/// or the crash loses those inputs' batches (applied, never durable), the
/// store is as it was before them, and they come again. The
/// final keys (status, version, rotation job), instances (key and version)
/// and every command the outbox would send, by command id, must be exactly
/// what an independent reference model says.
mod ordering {
    use std::collections::{BTreeMap, HashSet};

    use chrono::TimeZone;
    use proptest::prelude::*;

    use super::*;
    use crate::engine::{AdopterState, EventType, Input, LifecycleEvent, Notice};
    use crate::store::writer::{Consumed, Thread};
    use crate::tell::Command;

    #[derive(Debug, Clone)]
    enum Step {
        /// A rotate carries the version it rotated to; versions grow with time.
        Event {
            key: usize,
            id: String,
            kind: EventType,
            at: i64,
        },
        Create {
            key: usize,
            instance: String,
        },
        /// A chunk of one pass's results: each instance rewrapped `from` → `to`.
        Rewraps {
            job: String,
            results: Vec<(String, u32, u32)>,
        },
    }

    /// The rotate event dated `at` rotates to this version.
    fn version_at(at: i64) -> u32 {
        at as u32 / 10 + 2
    }

    /// The engine's rules, written out independently.
    #[derive(Default)]
    struct Model {
        status: BTreeMap<usize, KeyStatus>,
        version: BTreeMap<usize, u32>,
        last: BTreeMap<usize, i64>,
        /// The key's rotation job: its cause, target version and rewraps counted.
        job: BTreeMap<usize, (String, u32, u64)>,
        seen: HashSet<String>,
        /// How each event was first taken: applied or stale.
        outcomes: BTreeMap<String, &'static str>,
        /// What the KMS is told of each applied disable and enable: the
        /// state the key's DEKs are in, and the key's version. A rotate is
        /// told when its rotation finishes, which no step here reports.
        acknowledged: Vec<(String, AdopterState, Option<u32>)>,
        /// Key-wide commands: key, cause, action, the key's version then.
        key_commands: Vec<(usize, String, CommandAction, Option<u32>)>,
        /// `rewrapped` commands: instance, cause (the pass's job), version.
        rewrapped: Vec<(String, String, u32)>,
        /// Instance → its key and version.
        instances: BTreeMap<String, (usize, u32)>,
    }

    impl Model {
        fn apply(&mut self, step: &Step) {
            match step {
                // A second creation of the same id is refused; the first
                // makes the key known, at the instance's version if it had none.
                Step::Create { key, instance } => {
                    if !self.instances.contains_key(instance) {
                        self.instances.insert(instance.clone(), (*key, 1));
                        self.status.entry(*key).or_insert(KeyStatus::Active);
                        self.version.entry(*key).or_insert(1);
                    }
                }
                Step::Event { key, id, kind, at } => {
                    if !self.seen.insert(id.clone()) {
                        return; // duplicate
                    }
                    if self.last.get(key).is_some_and(|last| at < last) {
                        self.outcomes.insert(id.clone(), "stale");
                        return; // recorded, changes nothing
                    }
                    self.outcomes.insert(id.clone(), "applied");
                    let status = self.status.entry(*key).or_insert(KeyStatus::Active);
                    match (kind, *status) {
                        (EventType::Disable, KeyStatus::Active) => {
                            *status = KeyStatus::Disabled;
                            self.key_commands.push((*key, id.clone(), CommandAction::Revoke, self.version.get(key).copied()));
                        }
                        (EventType::Enable, KeyStatus::Disabled) => {
                            *status = KeyStatus::Active;
                            self.key_commands.push((*key, id.clone(), CommandAction::Restore, self.version.get(key).copied()));
                        }
                        // A rotate sets the version and replaces the job, whatever the status.
                        (EventType::Rotate, _) => {
                            self.version.insert(*key, version_at(*at));
                            self.job.insert(*key, (id.clone(), version_at(*at), 0));
                        }
                        _ => {}
                    }
                    if *kind != EventType::Rotate {
                        let state = if *status == KeyStatus::Disabled { AdopterState::Disabled } else { AdopterState::Enabled };
                        self.acknowledged.push((id.clone(), state, self.version.get(key).copied()));
                    }
                    self.last.insert(*key, *at);
                }
                Step::Rewraps { job, results } => {
                    for (instance, from, to) in results {
                        // Only the version that was read is replaced.
                        let Some((key, version)) = self.instances.get_mut(instance) else { continue };
                        if version != from {
                            continue;
                        }
                        *version = *to;
                        // Told under the pass's job; counted only by that job.
                        self.rewrapped.push((instance.clone(), job.clone(), *to));
                        if let Some((_, _, done)) = self.job.get_mut(key).filter(|(cause, _, _)| cause == job) {
                            *done += 1;
                        }
                    }
                }
            }
        }

        /// Every command the model's outbox sends, by id, with its action and
        /// version; a key-wide command goes to each instance of its key.
        fn commands(&self) -> Vec<(String, CommandAction, Option<String>)> {
            let mut out = Vec::new();
            for (k, cause, action, version) in &self.key_commands {
                for (instance, _) in self.instances.iter().filter(|(_, (key, _))| key == k) {
                    let c = Command::new(instance, &key(*k), *action, version.map(|v| v.to_string()), cause, Utc::now(), None);
                    out.push((c.command_id, c.action, c.key_version));
                }
            }
            for (instance, cause, version) in &self.rewrapped {
                let key_id = key(self.instances[instance].0);
                let c = Command::new(instance, &key_id, CommandAction::Rewrapped, Some(version.to_string()), cause, Utc::now(), None);
                out.push((c.command_id, c.action, c.key_version));
            }
            out.sort_by(|a, b| a.0.cmp(&b.0).then(a.2.cmp(&b.2)));
            out
        }
    }

    fn key(k: usize) -> String {
        format!("key-{k}")
    }

    fn base() -> chrono::DateTime<Utc> {
        Utc.timestamp_opt(1_800_000_000, 0).unwrap()
    }

    fn inputs(step: &Step) -> Vec<Input> {
        match step {
            Step::Event { key: k, id, kind, at } => vec![Input::Event {
                event: LifecycleEvent {
                    event_id: id.clone(),
                    kind: *kind,
                    key_id: key(*k),
                    key_version: (*kind == EventType::Rotate).then(|| version_at(*at).to_string()),
                    occurred_at: base() + chrono::Duration::seconds(*at),
                    correlation_id: None,
                    traceparent: None,
                    material_destroyed: false,
                },
                at: base(),
                kms: None,
            }],
            Step::Create { key: k, instance } => vec![Input::CreateInstance {
                instance_id: instance.clone(),
                key_id: key(*k),
                wrapped: WrappedDek { key_version: "1".into(), ciphertext: vec![1] },
                fingerprint: "f".into(),
                credential: crate::engine::DekCredential { id: format!("c-{instance}"), sha256: "ab".repeat(32), issued_at: base() },
                at: base(),
            }],
            Step::Rewraps { job, results } => results
                .iter()
                .map(|(instance, from, to)| Input::Rewrapped {
                    instance_id: instance.clone(),
                    from_version: from.to_string(),
                    wrapped: WrappedDek { key_version: to.to_string(), ciphertext: vec![*to as u8] },
                    job: job.clone(),
                    at: base(),
                })
                .collect(),
        }
    }

    struct Node {
        store: Store,
        writer: Writer,
        thread: Thread,
        fence: Arc<Fence>,
    }

    fn start(path: &std::path::Path) -> Node {
        let store = Store::open(path).unwrap();
        let fence = Arc::new(Fence::default());
        fence.assign(&[("events".to_string(), 0)]);
        let (writer, thread) = Writer::start(store.clone(), Ownership::shared(fence.clone(), "events", 1), 4, Box::new(|_| {}));
        Node { store, writer, thread, fence }
    }

    fn stop(node: Node) {
        let Node { store, writer, thread, .. } = node;
        drop(writer);
        thread.close().unwrap();
        drop(store);
    }

    fn copy_dir(from: &std::path::Path, to: &std::path::Path) {
        std::fs::create_dir_all(to).unwrap();
        for entry in std::fs::read_dir(from).unwrap() {
            let entry = entry.unwrap();
            let target = to.join(entry.file_name());
            if entry.file_type().unwrap().is_dir() {
                copy_dir(&entry.path(), &target);
            } else {
                std::fs::copy(entry.path(), target).unwrap();
            }
        }
    }

    /// Feeds `steps[from..to]`; an event carries its offset (its index); a
    /// chunk of rewraps is one writer job, as the rotation worker sends it.
    async fn feed(node: &Node, steps: &[Step], from: usize, to: usize) {
        let generation = node.fence.generation("events", 0).unwrap();
        let mut pending = Vec::new();
        for (offset, step) in steps.iter().enumerate().take(to).skip(from) {
            let mut inputs = inputs(step);
            let job = match step {
                Step::Rewraps { .. } => node.writer.enqueue_all(inputs).await.unwrap(),
                Step::Event { .. } => {
                    let consumed = Consumed { topic: "events".into(), partition: 0, next: offset as i64 + 1, generation };
                    node.writer.enqueue(inputs.pop(), Some(consumed)).await.unwrap()
                }
                Step::Create { .. } => node.writer.enqueue(inputs.pop(), None).await.unwrap(),
            };
            pending.push(job);
        }
        for p in pending {
            p.await.unwrap();
        }
    }

    fn steps() -> impl Strategy<Value = Vec<Step>> {
        // Per key: up to 10 distinct events at distinct, shuffled times.
        let per_key = (prop::collection::vec(0u8..3, 1..10)).prop_flat_map(|kinds| {
            let n = kinds.len();
            (Just(kinds), Just((0..n as i64).collect::<Vec<_>>()).prop_shuffle())
        });
        let extra = (0usize..4, 0usize..40, 0u8..3, prop::collection::vec((0usize..16, 1u32..5, 1u32..3), 1..5));
        (prop::collection::vec(per_key, 1..4), prop::collection::vec(extra, 0..16), prop::collection::vec(0usize..1000, 0..60)).prop_map(
            |(keys, extras, order)| {
                let mut streams: Vec<Vec<Step>> = keys
                    .iter()
                    .enumerate()
                    .map(|(k, (kinds, times))| {
                        kinds
                            .iter()
                            .zip(times)
                            .enumerate()
                            .map(|(i, (kind, at))| Step::Event {
                                key: k,
                                id: format!("k{k}-e{i}"),
                                kind: [EventType::Disable, EventType::Enable, EventType::Rotate][*kind as usize],
                                at: at * 10,
                            })
                            .collect()
                    })
                    .collect();
                // Producers' duplicates, instance creations and chunks of rewraps,
                // inserted in the streams. A chunk's job is one of its key's
                // rotate events (maybe replaced, maybe stale, maybe not yet
                // applied); see `realistic` for the instances it may name.
                for (n, (k, pos, what, rewraps)) in extras.iter().enumerate() {
                    let k = k % keys.len();
                    let stream = &mut streams[k];
                    let pos = pos % (stream.len() + 1);
                    let step = match what {
                        0 if !stream.is_empty() => stream[pos % stream.len()].clone(),
                        2 => {
                            let rotates: Vec<String> =
                                stream.iter().filter(|s| matches!(s, Step::Event { kind: EventType::Rotate, .. })).map(event_id).collect();
                            let job = if rotates.is_empty() { format!("k{k}-e0") } else { rotates[n % rotates.len()].clone() };
                            Step::Rewraps { job, results: rewraps.iter().map(|(m, from, by)| (format!("i{m}"), *from, from + by)).collect() }
                        }
                        _ => Step::Create { key: k, instance: format!("i{n}") },
                    };
                    stream.insert(pos, step);
                }
                // Interleave the keys' streams (each keeps its order, as a partition does).
                let mut out = Vec::new();
                let mut cursors = vec![0; streams.len()];
                let mut choice = order.into_iter().cycle();
                while cursors.iter().zip(&streams).any(|(c, s)| *c < s.len()) {
                    let open: Vec<usize> = (0..streams.len()).filter(|k| cursors[*k] < streams[*k].len()).collect();
                    let k = open[choice.next().unwrap_or(0) % open.len()];
                    out.push(streams[k][cursors[k]].clone());
                    cursors[k] += 1;
                }
                realistic(out)
            },
        )
    }

    /// A rewrap result is made from a DEK the worker read: its instance
    /// existed, at the version the result names as `from`, or the result is
    /// late and the instance has moved on since (or is gone). A result for an
    /// instance created later is dropped, and one from a version the instance
    /// has not reached yet is read at its current version.
    fn realistic(steps: Vec<Step>) -> Vec<Step> {
        let created: HashSet<String> = steps
            .iter()
            .filter_map(|s| match s {
                Step::Create { instance, .. } => Some(instance.clone()),
                _ => None,
            })
            .collect();
        let mut model = Model::default();
        let mut out = Vec::new();
        for mut step in steps {
            if let Step::Rewraps { results, .. } = &mut step {
                // An instance that is never created stands for one deleted
                // since it was read: its result is dropped.
                results.retain(|(instance, _, _)| model.instances.contains_key(instance) || !created.contains(instance));
                for (instance, from, to) in results.iter_mut() {
                    let Some(&(_, now)) = model.instances.get(instance) else { continue };
                    if *from > now {
                        *to = now + (*to - *from);
                        *from = now;
                    }
                }
                if results.is_empty() {
                    continue;
                }
            }
            model.apply(&step);
            out.push(step);
        }
        out
    }

    fn event_id(step: &Step) -> String {
        match step {
            Step::Event { id, .. } => id.clone(),
            _ => String::new(),
        }
    }

    /// Every command the store's outbox would send, by id, with its action
    /// and version; a key-wide command goes to each instance its key has now,
    /// as the relay sends it.
    fn outbox_commands(store: &Store) -> Vec<(String, CommandAction, Option<String>)> {
        let mut out = Vec::new();
        for effect in effects(store.outbox(100_000).unwrap()) {
            match &effect {
                Effect::KeyCommands { key_id, action, key_version, cause_event_id, issued_at, .. } => {
                    for inst in store.instances_of(key_id).unwrap().into_iter().filter(|i| i.wrapped.is_some()) {
                        let c = Command::new(&inst.instance_id, key_id, *action, key_version.clone(), cause_event_id, *issued_at, None);
                        out.push((c.command_id, c.action, c.key_version));
                    }
                }
                Effect::InstanceCommand { .. } | Effect::InstanceCommands { .. } => {
                    out.extend(crate::tell::instance_commands(&effect).into_iter().map(|c| (c.command_id, c.action, c.key_version)));
                }
                _ => {}
            }
        }
        out.sort_by(|a, b| a.0.cmp(&b.0).then(a.2.cmp(&b.2)));
        out
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]
        #[test]
        fn out_of_order_events_rewraps_duplicates_and_crashes_end_like_the_reference_model(
            steps in steps(),
            crashes in prop::collection::vec((0usize..64, 0usize..4, any::<bool>()), 0..4),
        ) {
            let dir = tempfile::tempdir().unwrap();
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            let mut model = Model::default();
            for step in &steps {
                model.apply(step);
            }
            let mut crash_points: Vec<(usize, usize, bool)> = crashes.iter().map(|(at, k, lost)| (at % (steps.len() + 1), *k, *lost)).collect();
            crash_points.sort();
            let mut node = start(dir.path());
            let mut done = 0;
            // The commands queued by the runs that crashes lost.
            let mut lost: Vec<(String, CommandAction, Option<String>)> = Vec::new();
            for (at, lag, lose) in crash_points {
                let at = at.max(done);
                let from = at.saturating_sub(lag).max(done);
                if lose {
                    // The crash loses the last `lag` inputs' batches: applied,
                    // never made durable, never answered. The store is left as
                    // it was before them (a copy taken then), and they come
                    // again: the events from the store's offsets, the API's
                    // and the rotation worker's inputs from callers that had
                    // no answer.
                    rt.block_on(feed(&node, &steps, done, from));
                    stop(node);
                    let durable = tempfile::tempdir().unwrap();
                    copy_dir(dir.path(), durable.path());
                    node = start(dir.path());
                    rt.block_on(feed(&node, &steps, from, at));
                    lost.extend(outbox_commands(&node.store));
                    stop(node);
                    std::fs::remove_dir_all(dir.path()).unwrap();
                    copy_dir(durable.path(), dir.path());
                } else {
                    // The crash: nobody heard of the last `lag` inputs' commit,
                    // and they come again.
                    rt.block_on(feed(&node, &steps, done, at));
                    stop(node);
                }
                node = start(dir.path());
                done = from;
            }
            rt.block_on(feed(&node, &steps, done, steps.len()));

            let keys: HashSet<usize> = model.status.keys().copied().collect();
            for k in keys {
                let got = node.store.key(&key(k)).unwrap();
                let got = got.as_ref().map(|r| (r.status, r.version.clone()));
                let want = Some((model.status[&k], model.version.get(&k).map(|v| v.to_string())));
                prop_assert_eq!(got, want, "key {}", k);
                let job = node.store.job(&key(k)).unwrap().map(|j| (j.cause_event_id, j.target_version, j.done));
                let want = model.job.get(&k).map(|(cause, target, done)| (cause.clone(), target.to_string(), *done));
                prop_assert_eq!(job, want, "rotation job of key {}", k);
                let mut want: Vec<String> = model.instances.iter().filter(|(_, (key, _))| *key == k).map(|(id, _)| id.clone()).collect();
                want.sort();
                prop_assert_eq!(node.store.instance_ids_of(&key(k)).unwrap(), want, "instances of key {}", k);
            }
            for (id, (k, version)) in &model.instances {
                let got = node.store.instance(id).unwrap().map(|i| (i.key_id, i.key_version, i.wrapped.map(|w| w.key_version)));
                prop_assert_eq!(got, Some((key(*k), version.to_string(), Some(version.to_string()))), "instance {}", id);
            }
            prop_assert_eq!(outbox_commands(&node.store), model.commands());
            // The key-wide entries themselves, also of keys without instances
            // (whose entries send no command).
            let mut entries: Vec<(String, String, CommandAction, Option<String>)> = effects(node.store.outbox(100_000).unwrap())
                .into_iter()
                .filter_map(|e| match e {
                    Effect::KeyCommands { key_id, cause_event_id, action, key_version, .. } => Some((key_id, cause_event_id, action, key_version)),
                    _ => None,
                })
                .collect();
            entries.sort_by(|a, b| (&a.0, &a.1).cmp(&(&b.0, &b.1)));
            let mut want: Vec<(String, String, CommandAction, Option<String>)> =
                model.key_commands.iter().map(|(k, cause, action, version)| (key(*k), cause.clone(), *action, version.map(|v| v.to_string()))).collect();
            want.sort_by(|a, b| (&a.0, &a.1).cmp(&(&b.0, &b.1)));
            prop_assert_eq!(entries, want);
            // What a lost run had queued (and, had it been durable, would have
            // sent) is queued again, under the same command ids.
            let sent_again: HashSet<(String, CommandAction, Option<String>)> = outbox_commands(&node.store).into_iter().collect();
            for c in &lost {
                prop_assert!(sent_again.contains(c), "a command of a lost run is not queued again: {:?}", c);
            }
            // Exactly one audit entry per event, however often it was handed
            // over, saying how it was taken.
            let mut audited: BTreeMap<String, Vec<String>> = BTreeMap::new();
            for entry in node.store.audit(100_000).unwrap().into_iter().filter(|e| e.fact.what.starts_with("event ")) {
                audited.entry(entry.fact.event_id.unwrap_or_default()).or_default().push(entry.fact.outcome);
            }
            let want: BTreeMap<String, Vec<String>> = model.outcomes.iter().map(|(id, outcome)| (id.clone(), vec![outcome.to_string()])).collect();
            prop_assert_eq!(audited, want);
            // What the KMS is told: one acknowledgement per applied disable and enable.
            let mut acks: Vec<(String, AdopterState, Option<String>)> = node
                .store
                .notices(100_000)
                .unwrap()
                .into_iter()
                .filter_map(|(_, e)| match e {
                    Effect::KmsNotice { notice: Notice::Acknowledge { event_id, state, key_version, .. }, .. } => Some((event_id, state, key_version)),
                    _ => None,
                })
                .collect();
            acks.sort_by(|a, b| a.0.cmp(&b.0));
            let mut want: Vec<(String, AdopterState, Option<String>)> =
                model.acknowledged.iter().map(|(id, state, version)| (id.clone(), *state, version.map(|v| v.to_string()))).collect();
            want.sort_by(|a, b| a.0.cmp(&b.0));
            prop_assert_eq!(acks, want);
            stop(node);
        }
    }
}

/// A changelog that takes each batch and, once told to, fails after taking
/// it: the node dies after publishing a batch and before applying it.
#[derive(Default)]
struct DiesAfterPublishing {
    log: Log,
    dies: std::sync::atomic::AtomicBool,
}

impl Changelog for DiesAfterPublishing {
    fn partition(&self, _route: &Route) -> i32 {
        0
    }

    fn publish(&self, records: &[Versioned], deadline: Option<Instant>) -> Result<Vec<Written>, ChangelogError> {
        let written = self.log.publish(records, deadline)?;
        if self.dies.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(ChangelogError::Failed { topic: "state".into(), reason: "killed after publishing".into() });
        }
        Ok(written)
    }
}

fn applied_fact(event_id: &str) -> crate::engine::AuditFact {
    crate::engine::AuditFact {
        who: "kms-event".into(),
        what: "event disable".into(),
        outcome: "applied".into(),
        event_id: Some(event_id.into()),
        key_id: Some("k".into()),
        ..Default::default()
    }
}

fn event_record(event_id: &str) -> EventRecord {
    EventRecord {
        event_id: event_id.into(),
        key_id: "k".into(),
        kind: crate::engine::EventType::Disable,
        occurred_at: Utc::now(),
        applied_at: Utc::now(),
        outcome: crate::engine::Outcome::Applied,
        detail: String::new(),
        correlation_id: None,
    }
}

/// What the replica applies and refuses of `entries`, committed.
fn recover(s: &Store, entries: &[Replicated]) -> (usize, Vec<Refused>) {
    let mut staged = Staged::default();
    let out = s.stage_replicated(&mut staged, entries).unwrap();
    s.commit_staged(staged, None).unwrap();
    out
}

#[test]
fn a_batch_published_and_not_applied_comes_back_from_the_changelog_with_its_audit_entry_once() {
    let dir = tempfile::tempdir().unwrap();
    let s = Store::open(dir.path()).unwrap();
    let changelog = Arc::new(DiesAfterPublishing::default());
    s.set_changelog(changelog.clone());
    s.commit(&[Record::Key(KeyRecord::new("k", Utc::now())), Record::Event(event_record("ev-1")), Record::Audit(applied_fact("ev-1"))], true).unwrap();
    changelog.dies.store(true, std::sync::atomic::Ordering::SeqCst);
    let mut disabled = KeyRecord::new("k", Utc::now());
    disabled.status = KeyStatus::Disabled;
    let lost = s.commit(&[Record::Key(disabled), Record::Event(event_record("ev-2")), Record::Audit(applied_fact("ev-2"))], true);
    assert!(matches!(lost, Err(StoreError::Changelog(_))), "{lost:?}");
    assert_eq!(s.audit(10).unwrap().len(), 1, "the lost batch's entry is not in the trail before recovery");
    assert!(s.event("ev-2").unwrap().is_none());

    // Restarted, the replica reads what this node published and did not apply.
    let published = changelog.log.0.lock().unwrap().clone();
    let (_, refused) = recover(&s, &published);
    assert!(refused.is_empty(), "{refused:?}");
    assert_eq!(s.key("k").unwrap().unwrap().status, KeyStatus::Disabled);
    assert!(s.event("ev-2").unwrap().is_some());
    let trail = s.audit(10).unwrap();
    let of = |id: &str| trail.iter().filter(|e| e.fact.event_id.as_deref() == Some(id)).count();
    assert_eq!((trail.len(), of("ev-1"), of("ev-2")), (2, 1, 1), "{trail:?}");
    s.verify_audit(&trail, true).unwrap();

    // The same sealed batch again, newer in the changelog (replayed): passed,
    // neither applied twice nor taken for a forgery.
    let sealed = published.iter().rfind(|e| e.key.starts_with(schema::SEALED)).unwrap().clone();
    let next = published.len() as i64;
    let again = Replicated { offset: next, authentic: Some(i64::MAX - 2), ..sealed.clone() };
    let (applied, refused) = recover(&s, &[again]);
    assert_eq!((applied, refused.len(), s.audit(10).unwrap().len()), (0, 0, 2));

    // A forged one under this node's name: its entries are not sealed by this
    // node's audit secret.
    let mut entries: Vec<audit::AuditEntry> = serde_json::from_slice(sealed.value.as_deref().unwrap()).unwrap();
    entries[0].seq = 3;
    entries[0].prev = trail[1].hash.clone();
    let forged = Replicated { offset: next + 1, value: Some(serde_json::to_vec(&entries).unwrap()), authentic: Some(i64::MAX - 1), ..sealed };
    let (applied, refused) = recover(&s, &[forged]);
    assert_eq!((applied, refused.iter().map(|r| r.reason).collect::<Vec<_>>()), (0, vec!["changelog_forged"]));
    assert_eq!(s.audit(10).unwrap().len(), 2);
}

#[test]
fn another_nodes_sealed_audit_entries_are_passed_by_and_not_taken_into_this_nodes_trail() {
    let dir = tempfile::tempdir().unwrap();
    let owner = Store::open(&dir.path().join("owner")).unwrap();
    let changelog = with_changelog(&owner);
    owner.commit(&[Record::Key(KeyRecord::new("k", Utc::now())), Record::Audit(applied_fact("ev-1"))], true).unwrap();
    let other = Store::open(&dir.path().join("other")).unwrap();
    other.set_audit_key(audit::AuditKey::new(zeroize::Zeroizing::new(b"another node's audit secret, 32+ bytes".to_vec())), false).unwrap();
    let published = changelog.0.lock().unwrap().clone();
    assert!(published.iter().any(|e| e.key.starts_with(schema::SEALED)), "the batch took its sealed entries along");
    let (_, refused) = recover(&other, &published);
    assert!(refused.is_empty(), "{refused:?}");
    assert!(other.key("k").unwrap().is_some(), "the state is replicated");
    assert!(other.audit(10).unwrap().is_empty(), "another node's trail is its own");
}

/// The flusher answers (and hands a group of one's records to its publisher)
/// behind the writer: a write with a deadline, which goes to the publisher
/// from the writer's thread, must still come after every batch applied before it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_of_ones_changelog_keeps_commit_order_with_the_flusher_behind_the_writer() {
    let dir = tempfile::tempdir().unwrap();
    let s = Store::open(dir.path()).unwrap();
    let log = Arc::new(Log::default());
    let deferred = Arc::new(crate::cluster::deferred::Deferred::default());
    s.set_publishing(Publishing::After(log.clone(), deferred.clone()));
    let w = writer(&s);
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let publisher = {
        let (deferred, log, s, w, stop) = (deferred.clone(), log.clone(), s.clone(), w.clone(), stop.clone());
        std::thread::spawn(move || deferred.run(log, s, w, None, stop))
    };
    let register = |key: String| crate::engine::Input::RegisterKey { key_id: key, version: "1".into(), at: Utc::now() };
    for round in 0..5 {
        let mut pending = Vec::new();
        for i in 0..200 {
            pending.push(w.enqueue(Some(register(format!("k{round}-{i}"))), None).await.unwrap());
        }
        w.submit_within(register(format!("timed-{round}")), std::time::Duration::from_secs(10)).await.unwrap();
        for p in pending {
            p.await.unwrap();
        }
    }
    let versions: Vec<i64> = log.0.lock().unwrap().iter().filter_map(|r| r.authentic).collect();
    assert_eq!(versions.len(), 5 * 201, "every key's record reached the changelog");
    assert!(versions.windows(2).all(|v| v[0] < v[1]), "the changelog is in commit order: {versions:?}");
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    publisher.join().unwrap();
}
