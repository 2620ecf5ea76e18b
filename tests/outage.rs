//! Broker outage and rebalance, against the real broker.

mod common;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::{Duration, Instant};

use common::*;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use rdkafka::{Offset, TopicPartitionList};

/// The `n`th event's time: `n` milliseconds from now, so that events made in
/// order are dated in order, and never far enough ahead to be refused.
fn at(n: usize) -> String {
    (chrono::Utc::now() + chrono::Duration::milliseconds(n as i64)).to_rfc3339_opts(chrono::SecondsFormat::Micros, true)
}

/// A producer that keeps messages through a broker outage, in order.
fn patient_producer(bootstrap: &str) -> BaseProducer {
    ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("message.timeout.ms", "180000")
        .set("max.in.flight.requests.per.connection", "1")
        .set("linger.ms", "0")
        .create()
        .unwrap()
}

fn send(p: &BaseProducer, key: &str, payload: Vec<u8>) {
    let sig = keywarden::intake::signature::Signer::hmac("local", TEST_EVENT_SECRET.as_bytes()).sign(&payload);
    let headers = rdkafka::message::OwnedHeaders::new().insert(rdkafka::message::Header { key: keywarden::intake::signature::HEADER, value: Some(&sig) });
    p.send(BaseRecord::<str, Vec<u8>>::to("key-lifecycle").key(key).payload(&payload).headers(headers)).map_err(|(e, _)| e).unwrap();
    p.poll(Duration::ZERO);
}

#[test]
fn broker_outage_of_30_seconds_loses_nothing_and_readiness_says_so() {
    let mut broker = Broker::start_durable();
    let d = Daemon::start(&broker.bootstrap, &[]);
    d.create_key("ok");
    for i in 0..5 {
        d.create_instance(&format!("o-{i}"), "ok");
    }
    let p = patient_producer(&broker.bootstrap);
    let kinds = ["disable", "enable"];
    let total = 60;
    let mut last = "";
    for n in 0..20 {
        last = kinds[n % 2];
        send(&p, "ok", event(&format!("ev-{n}"), last, "ok", None, &at(n)));
    }
    p.flush(Duration::from_secs(30)).unwrap();
    d.wait_event("ev-19");

    broker.stop();
    let down = Instant::now();
    // Events keep coming while the broker is away; the producer holds them.
    for n in 20..40 {
        last = kinds[n % 2];
        send(&p, "ok", event(&format!("ev-{n}"), last, "ok", None, &at(n)));
    }
    wait_until("readyz to report the outage", Duration::from_secs(20), || (!d.is_ready()).then_some(()));
    let (s, body) = d.get("/readyz");
    assert_eq!(s, 503);
    assert!(body["error"].as_str().unwrap().contains("unreachable"), "{body}");
    // State is kept and still served while the broker is down.
    assert_eq!(d.state("o-0"), "active", "ev-19 was an enable");
    assert_eq!(d.dek("o-0").0, 200);
    let remaining = Duration::from_secs(30).saturating_sub(down.elapsed());
    std::thread::sleep(remaining);

    broker.restart();
    let back = Instant::now();
    for n in 40..total {
        last = kinds[n % 2];
        send(&p, "ok", event(&format!("ev-{n}"), last, "ok", None, &at(n)));
    }
    p.flush(Duration::from_secs(120)).unwrap();
    wait_until("readiness after the outage", Duration::from_secs(90), || d.is_ready().then_some(()));
    for n in 0..total {
        let rec = d.wait_event(&format!("ev-{n}"));
        assert_eq!(rec["outcome"], "applied", "{rec}");
    }
    println!("OUTAGE: broker down {:.1?}; all {total} events applied {:.1?} after it came back", back - down, back.elapsed());
    let want = if last == "disable" { "revoked" } else { "active" };
    for i in 0..5 {
        assert_eq!(d.state(&format!("o-{i}")), want);
    }
}

/// The daemon itself must publish through the outage: a key with 5,000
/// instances is disabled, and the broker is killed the moment the decision is
/// committed (the DEK endpoint answers 423), while the relay is still sending
/// the revoke commands. Once the broker is back, every instance has exactly
/// one revoke (one command id; a copy the broker took just before it died may
/// be delivered again under the same id, which consumers drop), and no
/// command for anything else, read until the topic is idle.
#[test]
fn commands_cross_a_broker_outage_exactly_once_per_instance() {
    const N: usize = 5_000;
    let mut broker = Broker::start_durable();
    let d = Daemon::start(&broker.bootstrap, &[]);
    d.create_key("xo");
    std::thread::scope(|s| {
        for t in 0..8 {
            let d = &d;
            s.spawn(move || {
                for i in (t..N).step_by(8) {
                    d.create_instance(&format!("xo-{i}"), "xo");
                }
            });
        }
    });
    let ev = d.act("xo", "disable");
    let cause = ev["event_id"].as_str().unwrap().to_string();
    let committed = wait_until("the disable to be committed", Duration::from_secs(30), || (d.dek("xo-0").0 == 423).then(Instant::now));
    broker.stop();
    let down = Instant::now();
    // Proof that commands cross the outage: the relay counts a revoke as
    // published only once the broker has acknowledged it (all of a key-wide
    // run at once), and the broker is dead now, so the count cannot have
    // been lower at the stop than it is here. Below N, some revokes were
    // still unsent when the broker died.
    let published_at_stop = published_revokes(&d);
    println!("OUTAGE: broker killed {:.1?} after the commit was seen, with {published_at_stop} of {N} revokes published", down - committed);
    assert!(published_at_stop < N as u64, "all {published_at_stop} revokes were published before the broker was stopped: no command crossed the outage");
    // The relay keeps trying while the broker is away.
    std::thread::sleep(Duration::from_secs(5));
    broker.restart();
    println!("OUTAGE: broker back after {:.1?}", down.elapsed());
    let published = wait_until("the relay to publish every revoke after the outage", Duration::from_secs(120), || {
        let n = published_revokes(&d);
        (n >= N as u64).then_some(n)
    });

    let mut commands = TopicReader::new(&broker.bootstrap, "instance-commands");
    let mut ids: HashMap<String, HashSet<String>> = HashMap::new();
    let revoked = |read: &[Read]| read.iter().map(Read::json).filter(|c| c["action"] == "revoke" && c["cause_event_id"] == cause.as_str()).count();
    // Read until every instance has its revoke and then nothing more comes
    // for 5 s, or nothing at all comes for 60 s. A poll error (the group
    // coordinator still loading after the restart) is no end of the topic.
    let (mut count, mut progress) = (0, Instant::now());
    loop {
        commands.drain(Duration::from_millis(500));
        if commands.seen.len() > count {
            (count, progress) = (commands.seen.len(), Instant::now());
        }
        let idle = progress.elapsed();
        if (revoked(&commands.seen) >= N && idle > Duration::from_secs(5)) || idle > Duration::from_secs(60) {
            break;
        }
    }
    // A command id is derived from its cause, instance and action, so a
    // second application would come under the same id: what shows it is the
    // audit trail (below). A copy re-sent after the outage is the same
    // command, sent again from its durable outbox entry.
    let mut copies = 0;
    let mut by_id: HashMap<String, serde_json::Value> = HashMap::new();
    for c in commands.seen.iter().map(Read::json) {
        assert_eq!((c["action"].as_str(), c["cause_event_id"].as_str()), (Some("revoke"), Some(cause.as_str())), "an unexpected command: {c}");
        let instance = c["instance_id"].as_str().unwrap().to_string();
        let id = c["command_id"].as_str().unwrap().to_string();
        if !ids.entry(instance).or_default().insert(id.clone()) {
            copies += 1;
        }
        if let Some(first) = by_id.get(&id) {
            assert_eq!(first, &c, "command {id} re-sent as another command");
        } else {
            by_id.insert(id, c);
        }
    }
    assert_eq!(ids.len(), N, "instances with a revoke");
    let twice: Vec<_> = ids.iter().filter(|(_, c)| c.len() != 1).collect();
    assert!(twice.is_empty(), "instances revoked under more than one command id: {twice:?}");
    let distinct: HashSet<&String> = ids.values().flatten().collect();
    assert_eq!(distinct.len(), N, "one distinct command id per instance");
    // The disable applied once, by the audit trail the store kept.
    let export = d.http.get(format!("{}/v1/audit/export", d.api)).bearer_auth(&d.admin_token).send().unwrap().text().unwrap();
    let applications = export
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|e| e["event_id"] == cause.as_str() && e["what"] == "event disable" && e["outcome"] == "applied")
        .count();
    assert_eq!(applications, 1, "the disable's applications in the audit trail");
    println!(
        "OUTAGE: {published} revokes published after the outage, {} commands read, one distinct command id for each of the {N} instances; {copies} redelivered copies",
        commands.seen.len()
    );
}

/// `keywarden_commands_published_total{action="revoke"}` as the daemon reports it now.
fn published_revokes(d: &Daemon) -> u64 {
    let text = d.http.get(format!("{}/metrics", d.api)).send().unwrap().text().unwrap();
    text.lines().find(|l| l.starts_with("keywarden_commands_published_total{action=\"revoke\"}")).and_then(|l| l.rsplit(' ').next()?.parse().ok()).unwrap_or(0)
}

#[test]
fn a_consumer_joining_and_leaving_mid_stream_loses_nothing_and_applies_nothing_twice() {
    intruder_mid_stream("group");
}

/// A node alone (`kafka.assignment` "auto") is no group member: a consumer that
/// joins its group id takes every partition for itself and commits, and the
/// node goes on consuming all of them, each event applied once.
#[test]
fn a_node_alone_is_not_moved_by_a_consumer_joining_its_group() {
    intruder_mid_stream("auto");
}

fn intruder_mid_stream(assignment: &str) {
    let broker = Broker::start();
    let mut d = Daemon::start(&broker.bootstrap, &[("KEYWARDEN_KAFKA_ASSIGNMENT", assignment)]);
    let in_group = assignment == "group";
    let p = patient_producer(&broker.bootstrap);
    let mut sent = 0;
    let mut last: HashMap<String, &str> = HashMap::new();
    produce_rb(&p, &mut sent, 60, &mut last);

    // Another member joins the group, takes partitions, reads events
    // keywarden has not applied and commits their offsets itself; then it
    // leaves. It commits by hand, synchronously, so that the test holds the
    // broker's answer to the intruder's own commit.
    let intruder: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", &broker.bootstrap)
        .set("group.id", "keywarden")
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .create()
        .unwrap();
    intruder.subscribe(&["key-lifecycle"]).unwrap();
    let joined = Instant::now();
    let mut got_partitions = false;
    // Every event the intruder read, and whether keywarden had not applied it yet.
    let mut reads: Vec<Intruded> = Vec::new();
    while joined.elapsed() < Duration::from_secs(60) {
        note_read(&d, intruder.poll(Duration::from_millis(100)), &mut reads, None);
        if intruder.assignment().map(|a| a.count() > 0).unwrap_or(false) {
            got_partitions = true;
            if joined.elapsed() > Duration::from_secs(1) {
                break;
            }
        }
        // In the group, the partitions the intruder took are keywarden's no
        // more: what is produced to them now keywarden cannot apply.
        if in_group && got_partitions && sent < 120 {
            produce_rb(&p, &mut sent, 60, &mut last);
        }
    }
    assert!(got_partitions, "the second member never got a partition");
    let held = intruder.assignment().unwrap();
    // A node alone keeps every partition whoever joins its group, and applies
    // each event within milliseconds: the intruder would read one before
    // keywarden applied it only by chance. So keywarden is killed while the
    // next 60 events are produced and the intruder reads and commits them,
    // and started again after: the group's offsets are then ahead of what
    // keywarden applied, and it must not start from them.
    let down_from = (!in_group).then_some(sent);
    if !in_group {
        d.kill();
    }
    if sent < 120 {
        produce_rb(&p, &mut sent, 60, &mut last);
    }
    match down_from {
        None => {
            for _ in 0..30 {
                note_read(&d, intruder.poll(Duration::from_millis(100)), &mut reads, None);
            }
        }
        Some(from) => wait_until("the intruder to read the events produced while keywarden was down", Duration::from_secs(30), || {
            note_read(&d, intruder.poll(Duration::from_millis(100)), &mut reads, down_from);
            (from..sent).all(|n| reads.iter().any(|r| r.n == n)).then_some(())
        }),
    }
    assert!(!reads.is_empty(), "the intruder consumed nothing");

    // The intruder commits, for each partition it read, the offset after the
    // last event it read there.
    let mut last_read: BTreeMap<i32, &Intruded> = BTreeMap::new();
    for r in &reads {
        let at = last_read.entry(r.partition).or_insert(r);
        if r.offset > at.offset {
            *at = r;
        }
    }
    let mut commit = TopicPartitionList::new();
    for (partition, r) in &last_read {
        commit.add_partition_offset("key-lifecycle", *partition, Offset::Offset(r.offset + 1)).unwrap();
    }
    let result = intruder.commit(&commit, CommitMode::Sync);
    assert!(result.is_ok(), "the intruder's commit {commit:?} failed: {result:?}");
    // In the group, the commit put the group ahead of keywarden: on some
    // partition the last event committed past is one keywarden had not
    // applied after the commit had succeeded. (A node alone was dead since
    // before those 60 events were produced.)
    let ahead_at_commit: Vec<(i32, i64, String)> = last_read
        .iter()
        .filter(|(_, r)| match down_from {
            None => d.get(&format!("/v1/events/rb-ev-{}", r.n)).0 == 404,
            Some(_) => r.ahead,
        })
        .map(|(partition, r)| (*partition, r.offset + 1, format!("rb-ev-{}", r.n)))
        .collect();
    if in_group {
        assert!(!ahead_at_commit.is_empty(), "the intruder committed past no event keywarden had not applied: {last_read:?}");
    }
    // Read back, by a client outside the group (which leaves the intruder
    // alone): the group's committed offsets are the intruder's. Keywarden
    // cannot have committed over them meanwhile: in the group it holds none
    // of these partitions, and alone it is dead.
    let want: Vec<(i32, i64)> = last_read.iter().map(|(partition, r)| (*partition, r.offset + 1)).collect();
    let observer: BaseConsumer = ClientConfig::new().set("bootstrap.servers", &broker.bootstrap).set("group.id", "keywarden").create().unwrap();
    let committed: Vec<(i32, i64)> = wait_until("the intruder's commit to be the group's", Duration::from_secs(30), || {
        let offsets: Vec<(i32, i64)> = observer
            .committed_offsets(commit.clone(), Duration::from_secs(10))
            .ok()?
            .elements()
            .iter()
            .filter_map(|e| match e.offset() {
                Offset::Offset(o) => Some((e.partition(), o)),
                _ => None,
            })
            .collect();
        (offsets == want).then_some(offsets)
    });
    if !in_group {
        d.respawn();
        wait_until("readiness after the restart", Duration::from_secs(90), || d.is_ready().then_some(()));
    }
    let ahead = reads.iter().filter(|r| r.ahead).count();
    if in_group {
        assert!(ahead > 0, "the intruder consumed no event before keywarden applied it");
    } else {
        // keywarden is no member, so the group's only member holds everything.
        assert_eq!(held.count(), 3, "the intruder holds every partition of the group: {held:?}");
    }
    println!(
        "REBALANCE ({assignment}): the intruder read {} events, {ahead} before keywarden applied them, and committed {committed:?}, ahead of keywarden at {ahead_at_commit:?}",
        reads.len()
    );
    intruder.unsubscribe();
    // Closed on its own thread: librdkafka's close of this consumer sometimes
    // waits forever on tansu after the group has moved on (keywarden is
    // assigned every partition again); that is the test client's, not
    // keywarden's, and must not hang the test.
    std::thread::spawn(move || drop(intruder));
    produce_rb(&p, &mut sent, 60, &mut last);

    for n in 0..sent {
        let rec = d.wait_event(&format!("rb-ev-{n}"));
        assert_eq!(rec["outcome"], "applied", "{rec}");
    }
    // Exactly once, from the audit trail the store kept (a node alone was
    // restarted: its counters started again).
    let export = d.http.get(format!("{}/v1/audit/export", d.api)).bearer_auth(&d.admin_token).send().unwrap().text().unwrap();
    let mut applied: HashMap<String, usize> = HashMap::new();
    for entry in export.lines().map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()) {
        if entry["what"].as_str().is_some_and(|w| w.starts_with("event ")) && entry["outcome"] == "applied" {
            *applied.entry(entry["event_id"].as_str().unwrap_or_default().to_string()).or_default() += 1;
        }
    }
    let not_once: Vec<(String, Option<usize>)> =
        (0..sent).map(|n| format!("rb-ev-{n}")).map(|id| (id.clone(), applied.get(&id).copied())).filter(|(_, n)| *n != Some(1)).collect();
    assert!(not_once.is_empty(), "events not applied exactly once (by the audit trail): {not_once:?}");
    for (key, kind) in &last {
        let (_, k) = d.get(&format!("/v1/keys/{key}"));
        assert_eq!(k["state"], if *kind == "disable" { "disabled" } else { "active" }, "{k}");
    }
    let log = std::fs::read_to_string(d.dir.path().join("keywarden.log")).unwrap();
    if in_group {
        assert!(log.contains("partitions revoked"), "the rebalance revoked keywarden's partitions");
    } else {
        assert!(log.contains("assigned every partition to this node alone"), "no self-assignment in the log");
        assert!(!log.contains("partitions revoked"), "a node alone lost partitions to a group member");
    }
    println!("REBALANCE ({assignment}): {sent} events, all applied once, across a member joining and leaving");
}

/// An event the intruder read: `rb-ev-{n}` at `offset` of `partition`, and
/// whether keywarden had not applied it when it was read.
#[derive(Debug)]
struct Intruded {
    n: usize,
    partition: i32,
    offset: i64,
    ahead: bool,
}

/// Notes an event the intruder read. Keywarden is asked whether it has
/// applied it, unless it is down (`down_from`: since before `rb-ev-{n}`
/// was produced): then the events from there on are unapplied by
/// construction, and those before counted as applied.
fn note_read(
    d: &Daemon,
    polled: Option<rdkafka::error::KafkaResult<rdkafka::message::BorrowedMessage<'_>>>,
    reads: &mut Vec<Intruded>,
    down_from: Option<usize>,
) {
    if let Some(Ok(m)) = polled {
        let event: serde_json::Value = serde_json::from_slice(rdkafka::Message::payload(&m).unwrap_or_default()).unwrap();
        let id = event["event_id"].as_str().unwrap();
        let n: usize = id.strip_prefix("rb-ev-").and_then(|n| n.parse().ok()).unwrap_or_else(|| panic!("not a test event: {id}"));
        let ahead = match down_from {
            None => d.get(&format!("/v1/events/{id}")).0 == 404,
            Some(from) => n >= from,
        };
        reads.push(Intruded { n, partition: rdkafka::Message::partition(&m), offset: rdkafka::Message::offset(&m), ahead });
    }
}

fn produce_rb(p: &BaseProducer, sent: &mut usize, count: usize, last: &mut HashMap<String, &'static str>) {
    const KEYS: [&str; 6] = ["rb-0", "rb-1", "rb-2", "rb-3", "rb-4", "rb-5"];
    for _ in 0..count {
        let key = KEYS[*sent % KEYS.len()];
        let kind = ["disable", "enable"][(*sent / KEYS.len()) % 2];
        send(p, key, event(&format!("rb-ev-{sent}"), kind, key, None, &at(*sent)));
        last.insert(key.to_string(), kind);
        *sent += 1;
    }
    p.flush(Duration::from_secs(30)).unwrap();
}

#[test]
fn sigterm_drains_and_a_second_signal_exits_at_once_losing_nothing() {
    let broker = Broker::start();
    let mut d = Daemon::start(&broker.bootstrap, &[]);
    let p = patient_producer(&broker.bootstrap);
    let mut sent = 0;
    let mut last = HashMap::new();
    produce_rb(&p, &mut sent, 120, &mut last);
    // First signal: drain and exit 0.
    assert_eq!(d.terminate(), Some(0), "graceful shutdown exits 0");
    d.restart();
    produce_rb(&p, &mut sent, 120, &mut last);
    for n in 0..sent {
        d.wait_event(&format!("rb-ev-{n}"));
    }
    // Two signals in a row while the drain is stuck on a hung broker: the
    // second exits at once, with 130.
    broker.signal("STOP");
    let signalled = Instant::now();
    let code = d.terminate_twice();
    let took = signalled.elapsed();
    broker.signal("CONT");
    assert_eq!(code, Some(130), "the second signal exits at once");
    assert!(took < Duration::from_secs(3), "the second signal took {took:?}");
    d.restart();
    produce_rb(&p, &mut sent, 60, &mut last);
    for n in 0..sent {
        assert_eq!(d.wait_event(&format!("rb-ev-{n}"))["outcome"], "applied");
    }
    for (key, kind) in &last {
        assert_eq!(d.get(&format!("/v1/keys/{key}")).1["state"], if *kind == "disable" { "disabled" } else { "active" });
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

/// The data plane never waits on the broker: with the broker hung (SIGSTOP,
/// its connections open, nothing answered) for 30 s while writes are in
/// flight, DEKs keep being served, and every write is refused in bounded time.
#[test]
fn a_hung_broker_never_stalls_dek_requests_and_writes_fail_fast() {
    let broker = Broker::start();
    let d = Daemon::start(&broker.bootstrap, &[]);
    d.create_key("hung");
    for i in 0..5 {
        d.create_instance(&format!("h-{i}"), "hung");
    }
    let dek = d.dek("h-0").1["dek"].clone();
    assert!(dek.is_string());

    broker.signal("STOP");
    let hung_for = Duration::from_secs(30);
    let hung_at = Instant::now();
    let (samples, writes) = std::thread::scope(|s| {
        let writer = s.spawn(|| {
            let mut writes = Vec::new();
            let mut n = 0;
            while hung_at.elapsed() + Duration::from_secs(7) < hung_for {
                let started = Instant::now();
                let (status, body) = d.post("/v1/instances", Some(serde_json::json!({"instance_id": format!("hw-{n}"), "key_id": "hung"})));
                writes.push((status, started.elapsed(), body));
                n += 1;
            }
            writes
        });
        let mut samples = Vec::new();
        while hung_at.elapsed() < hung_for {
            let started = Instant::now();
            let (status, body) = d.dek(&format!("h-{}", samples.len() % 5));
            samples.push(started.elapsed());
            assert_eq!(status, 200, "DEK refused while the broker is hung: {body}");
            std::thread::sleep(Duration::from_millis(5));
        }
        let writes = writer.join().unwrap();
        // Still hung: none of the refused writes was applied.
        for n in 0..writes.len() {
            assert_eq!(d.get(&format!("/v1/instances/hw-{n}")).0, 404, "hw-{n} was refused, so it must not exist");
        }
        (samples, writes)
    });
    broker.signal("CONT");

    let mut sorted = samples.clone();
    sorted.sort();
    println!(
        "DEK fetch with the broker hung: n={} p50={:?} p99={:?} max={:?}",
        sorted.len(),
        percentile(&sorted, 0.5),
        percentile(&sorted, 0.99),
        sorted[sorted.len() - 1]
    );
    assert!(sorted.len() >= 200, "only {} samples", sorted.len());
    assert!(writes.len() >= 3, "writes in flight during the hang: {}", writes.len());
    for (status, took, body) in &writes {
        println!("write during the hang: {status} after {took:?}");
        assert_eq!(*status, 503, "a write while the broker is hung is refused: {body}");
        assert!(*took < Duration::from_millis(6500), "refused within api.write_timeout (5s) and a margin: {took:?}");
        assert!(body["error"].as_str().unwrap_or_default().contains("retry"), "{body}");
    }
    // The broker back: writes go through again, and the DEK is the same. A
    // retry after a refusal is answered 503 again; a 409 would say a refused
    // attempt was applied after all.
    wait_until("a write to succeed after the broker resumes", Duration::from_secs(60), || {
        match d.post("/v1/instances", Some(serde_json::json!({"instance_id": "after-hang", "key_id": "hung"}))) {
            (201, _) => Some(()),
            (503, _) => None,
            (status, body) => panic!("a write after the hang answered {status}: {body}"),
        }
    });
    assert_eq!(d.get("/v1/instances/after-hang").0, 200, "the write after the hang is visible");
    // Keywarden processes writes again (the later one is applied, and the
    // writer takes its jobs in order): a refused write that was only delayed,
    // not dropped, would exist by now.
    for n in 0..writes.len() {
        assert_eq!(d.get(&format!("/v1/instances/hw-{n}")).0, 404, "hw-{n} was refused, so it must not exist after the broker resumed");
    }
    assert_eq!(d.dek("h-0").1["dek"], dek);
}

/// tansu 0.6.0 answers a fetch from an offset inside a record batch with
/// nothing of that batch: a node that stopped after applying part of a
/// producer's batch, resumed at its stored offset, never saw the rest of it
/// (and jumped past it once later events came). Here the store's offset is
/// put at 11 of one 40-event batch, as such a stop leaves it; after the
/// start the other 29 are applied, and the first 11 (applied before, as far
/// as the store knows) are not read again as new.
#[test]
fn a_start_inside_a_producer_batch_applies_the_rest_of_the_batch() {
    let broker = Broker::start();
    let mut d = Daemon::start(&broker.bootstrap, &[]);
    assert_eq!(d.terminate(), Some(0));
    // One batch: a long linger, all 40 sent before it ends.
    let p: BaseProducer = ClientConfig::new().set("bootstrap.servers", &broker.bootstrap).set("linger.ms", "1000").create().unwrap();
    for i in 0..40 {
        let payload = event(&format!("mb-{i}"), ["disable", "enable"][i % 2], "mb-key", None, &at(i));
        let sig = keywarden::intake::signature::Signer::hmac("local", TEST_EVENT_SECRET.as_bytes()).sign(&payload);
        let headers = rdkafka::message::OwnedHeaders::new().insert(rdkafka::message::Header { key: keywarden::intake::signature::HEADER, value: Some(&sig) });
        p.send(BaseRecord::<str, Vec<u8>>::to("key-lifecycle").partition(0).key("mb-key").payload(&payload).headers(headers)).map_err(|(e, _)| e).unwrap();
    }
    p.flush(Duration::from_secs(30)).unwrap();
    {
        use keywarden::cluster::{Fence, Ownership};
        use keywarden::store::writer::{Consumed, Writer};
        let store = keywarden::store::Store::open(&d.dir.path().join("store")).unwrap();
        let fence = std::sync::Arc::new(Fence::default());
        fence.assign(&[("key-lifecycle".to_string(), 0)]);
        let generation = fence.generation("key-lifecycle", 0).unwrap();
        let (writer, thread) = Writer::start(store, Ownership::single(fence), 16, Box::new(|_| {}));
        let rt = tokio::runtime::Runtime::new().unwrap();
        rt.block_on(async {
            let consumed = Consumed { topic: "key-lifecycle".into(), partition: 0, next: 11, generation };
            writer.enqueue(None, Some(consumed)).await.unwrap().await.unwrap();
        });
        drop(writer);
        thread.close().unwrap();
    }
    d.restart();
    for i in 11..40 {
        assert_eq!(d.wait_event(&format!("mb-{i}"))["outcome"], "applied", "mb-{i}");
    }
    // After the last of the batch: none of the first 11 came in as new.
    for i in 0..11 {
        assert_eq!(d.get(&format!("/v1/events/mb-{i}")).0, 404, "mb-{i} was read again as a new event");
    }
}
