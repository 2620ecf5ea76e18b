//! Several keywarden nodes on one real broker: they split the events topic's
//! partitions, replicate state through the compacted changelog, answer reads
//! and DEKs on any node, and take writes on any node. One is SIGKILLed, a fresh
//! one with an empty store joins, another stops cleanly; at the end every live
//! node agrees on every instance, no event was applied twice, and the fresh
//! node serves byte-identical DEKs.

mod common;

use std::collections::HashMap;
use std::io::Write as _;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};

const KEYS: usize = 30;

/// Seven nodes at once on two cores would starve their heartbeats: one test at a time.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// The nodes' directories, for their logs when a write keeps failing.
static LOGS: std::sync::Mutex<Vec<std::path::PathBuf>> = std::sync::Mutex::new(Vec::new());
const PER_KEY: usize = 100;
/// The most nodes one test starts (three, then a fresh fourth).
const NODES: usize = 4;

struct Shared {
    dir: tempfile::TempDir,
    /// The API ports of the nodes to come, so that each lists all as peers.
    ports: Vec<u16>,
    started: std::cell::Cell<usize>,
}

impl Shared {
    /// What every node of one deployment shares: the master key that seals the
    /// embedded KMS's material, the API tokens (writes are forwarded) and the
    /// cluster secret the changelog is authenticated under.
    fn new() -> Shared {
        let dir = tempfile::tempdir().unwrap();
        let secret = |name: &str, text: &str| {
            let mut f = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(dir.path().join(name)).unwrap();
            f.write_all(text.as_bytes()).unwrap();
        };
        use base64::Engine;
        secret("master.key", &base64::engine::general_purpose::STANDARD.encode([7u8; 32]));
        secret("admin.token", "cluster-admin-token-0123456789abcdef");
        secret("dek.token", "cluster-dek-token-0123456789abcdef");
        secret("cluster.key", "the-cluster-secret-every-node-holds-0123456789");
        Shared { dir, ports: (0..NODES).map(|_| free_port()).collect(), started: std::cell::Cell::new(0) }
    }

    fn path(&self, name: &str) -> String {
        self.dir.path().join(name).to_str().unwrap().to_string()
    }

    fn node(&self, bootstrap: &str) -> Daemon {
        let n = self.started.get();
        self.started.set(n + 1);
        let peers = self.ports.iter().map(|p| format!("http://127.0.0.1:{p}")).collect::<Vec<_>>().join(",");
        let (master, admin, dek, cluster) = (self.path("master.key"), self.path("admin.token"), self.path("dek.token"), self.path("cluster.key"));
        let d = Daemon::start_on(
            self.ports[n],
            bootstrap,
            &[
                ("KEYWARDEN_KAFKA_PARTITIONS", "6"),
                // tansu 0.6 keeps rebalancing a group of three static members.
                ("KEYWARDEN_KAFKA_INSTANCE_ID", "dynamic"),
                ("KEYWARDEN_KMS_LOCAL_MASTER_KEY_FILE", &master),
                ("KEYWARDEN_API_ADMIN_TOKEN_FILE", &admin),
                ("KEYWARDEN_API_DEK_TOKEN_FILE", &dek),
                ("KEYWARDEN_CLUSTER_SECRET_FILE", &cluster),
                ("KEYWARDEN_CLUSTER_PEERS", &peers),
                // A killed node's partitions move after this long.
                ("KEYWARDEN_KAFKA_PROPERTIES_SESSION_TIMEOUT_MS", "8000"),
                ("KEYWARDEN_KAFKA_DRAIN_TIMEOUT", "3s"),
                // tansu 0.6 does not reassign a dead member's partitions; the
                // survivors rejoin after this long without a live owner.
                ("KEYWARDEN_CLUSTER_REJOIN_AFTER", "10s"),
                ("KEYWARDEN_LOG", "info"),
            ],
        );
        LOGS.lock().unwrap().push(d.dir.path().to_path_buf());
        d
    }
}

/// A write on any node; a 503 (a partition between owners) is retried.
fn write(d: &Daemon, path: &str, body: Option<Value>) -> Value {
    let start = Instant::now();
    loop {
        let (s, v) = d.post(path, body.clone());
        if (200..300).contains(&s) {
            return v;
        }
        if !(s == 503 && start.elapsed() < Duration::from_secs(90)) {
            for dir in LOGS.lock().unwrap().iter() {
                let log = std::fs::read_to_string(dir.join("keywarden.log")).unwrap_or_default();
                let lines: Vec<&str> = log.lines().filter(|l| !l.contains("CONFWARN")).collect();
                eprintln!("==== {} ====\n{}", dir.display(), lines[lines.len().saturating_sub(60)..].join("\n"));
            }
            panic!("POST {path} on {}: {s} {v}", d.api);
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn key(i: usize) -> String {
    format!("ck-{i:02}")
}

fn audit_of_stopped(store: &Path) -> Vec<Value> {
    let s = keywarden::store::Store::open(store).unwrap();
    s.audit_since(None, usize::MAX).unwrap().into_iter().map(|e| serde_json::to_value(e).unwrap()).collect()
}

fn audit_of_running(d: &Daemon) -> Vec<Value> {
    let text = d.http.get(format!("{}/v1/audit/export", d.api)).bearer_auth(&d.admin_token).send().unwrap().text().unwrap();
    text.lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

#[test]
fn three_nodes_share_the_work_survive_a_kill_a_fresh_node_and_a_clean_stop() {
    let _one_at_a_time = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let broker = Broker::start();
    let shared = Shared::new();
    let mut nodes: Vec<Daemon> = (0..3).map(|_| shared.node(&broker.bootstrap)).collect();

    // 30 keys and 3,000 instances, created through all three nodes.
    for i in 0..KEYS {
        write(&nodes[i % 3], "/v1/keys", Some(json!({"key_id": key(i)})));
    }
    let started = Instant::now();
    std::thread::scope(|scope| {
        for (n, d) in nodes.iter().enumerate() {
            scope.spawn(move || {
                for i in (n..KEYS * PER_KEY).step_by(3) {
                    write(d, "/v1/instances", Some(json!({"instance_id": format!("ci-{i:04}"), "key_id": key(i % KEYS)})));
                }
            });
        }
    });
    println!("CLUSTER: 3000 instances created through 3 nodes in {:.1}s", started.elapsed().as_secs_f64());
    // A sample of DEKs, as first served, to compare with what every node serves at the end.
    let sample: Vec<String> = (0..KEYS * PER_KEY).step_by(37).map(|i| format!("ci-{i:04}")).collect();
    let mut first: HashMap<String, String> = HashMap::new();
    for (n, id) in sample.iter().enumerate() {
        let (s, v) = nodes[n % 3].dek(id);
        assert_eq!(s, 200, "{id}: {v}");
        first.insert(id.clone(), v["dek"].as_str().unwrap().to_string());
    }

    // Rotate keys 0-9, disable 10-19, delete 20-29, with a kill, a fresh node
    // and a clean stop in between.
    let mut events = Vec::new();
    for i in 0..10 {
        events.push(write(&nodes[i % 3], &format!("/v1/keys/{}/rotate", key(i)), None)["event_id"].as_str().unwrap().to_string());
    }
    nodes[0].kill();
    let killed = Instant::now();
    println!("CLUSTER: node 1 SIGKILLed");
    // A write to one key of every partition: those of the killed node wait for a new owner.
    for p in 0..6 {
        let probe = (0..KEYS).map(key).find(|k| keywarden::cluster::partition_of(k, 6) == p).unwrap();
        write(&nodes[1], &format!("/v1/keys/{probe}/retry"), None);
    }
    println!("CLUSTER: every partition writable again {:.1}s after the SIGKILL", killed.elapsed().as_secs_f64());
    for i in 10..20 {
        events.push(write(&nodes[1 + i % 2], &format!("/v1/keys/{}/disable", key(i)), None)["event_id"].as_str().unwrap().to_string());
    }
    let fresh = shared.node(&broker.bootstrap);
    println!("CLUSTER: a fresh node 4 with an empty store joined");
    for i in 20..KEYS {
        let d = if i % 2 == 0 { &nodes[2] } else { &fresh };
        events.push(write(d, &format!("/v1/keys/{}/delete", key(i)), None)["event_id"].as_str().unwrap().to_string());
    }
    assert_eq!(nodes[1].terminate(), Some(0), "node 2 stops cleanly");
    println!("CLUSTER: node 2 stopped cleanly");
    let live = [&nodes[2], &fresh];

    // Every live node converges on the state each key's last event implies.
    let want = |i: usize| match i {
        0..=9 => "active",
        10..=19 => "revoked",
        _ => "erased",
    };
    for d in live {
        let started = Instant::now();
        loop {
            let (_, list) = d.get("/v1/instances");
            let list = list["instances"].as_array().cloned().unwrap_or_default();
            let by_id: HashMap<String, (String, String)> = list
                .iter()
                .map(|v| {
                    (
                        v["instance_id"].as_str().unwrap().to_string(),
                        (v["state"].as_str().unwrap().to_string(), v["key_version"].as_str().unwrap_or("").to_string()),
                    )
                })
                .collect();
            // (key, what it should be, what it is) for every instance that is not there yet.
            let mut wrong: HashMap<(usize, String), usize> = HashMap::new();
            for i in 0..KEYS * PER_KEY {
                let got = by_id.get(&format!("ci-{i:04}")).cloned().unwrap_or(("missing".into(), String::new()));
                let ok = got.0 == want(i % KEYS) && (i % KEYS >= 10 || got.1 == "2");
                if !ok {
                    *wrong.entry((i % KEYS, format!("{}@{}", got.0, got.1))).or_default() += 1;
                }
            }
            if wrong.is_empty() {
                break;
            }
            if started.elapsed() > Duration::from_secs(120) {
                for dir in LOGS.lock().unwrap().iter() {
                    let log = std::fs::read_to_string(dir.join("keywarden.log")).unwrap_or_default();
                    let lines: Vec<&str> = log.lines().filter(|l| !l.contains("CONFWARN") && !l.contains("event received")).collect();
                    eprintln!("==== {} ====\n{}", dir.display(), lines[lines.len().saturating_sub(80)..].join("\n"));
                }
                let mut wrong: Vec<_> = wrong.into_iter().collect();
                wrong.sort();
                panic!("node {} did not converge in 120 s; (key, state@version) -> instances: {wrong:?}", d.api);
            }
            std::thread::sleep(Duration::from_millis(500));
        }
    }

    // The fresh node serves the same DEKs as the others, and as at the start.
    for id in &sample {
        let i: usize = id[3..].parse().unwrap();
        if i % KEYS >= 10 {
            continue;
        }
        let (s3, v3) = live[0].dek(id);
        let (s4, v4) = live[1].dek(id);
        assert_eq!((s3, s4), (200, 200), "{id}: {v3} {v4}");
        assert_eq!(v3["dek"], v4["dek"], "{id}: the fresh node's DEK is byte-identical");
        assert_eq!(v3["dek"].as_str().unwrap(), first[id], "{id}: the rotation kept the DEK");
    }
    for id in sample.iter().filter(|id| id[3..].parse::<usize>().unwrap() % KEYS >= 10) {
        let (s, _) = live[1].dek(id);
        assert!(s == 423 || s == 410, "{id}: revoked or erased on the fresh node too ({s})");
    }

    // Exactly one application per event, across every node's audit trail.
    let mut trails: Vec<Value> = live.iter().flat_map(|d| audit_of_running(d)).collect();
    for n in [0, 1] {
        trails.extend(audit_of_stopped(&nodes[n].dir.path().join("store")));
    }
    for id in &events {
        let applied = trails.iter().filter(|e| e["event_id"] == id.as_str() && e["who"] == "kms-event" && e["outcome"] == "applied").count();
        assert_eq!(applied, 1, "event {id} was applied {applied} times");
    }
    println!("CLUSTER: {} events, each applied exactly once across 4 nodes' audit trails", events.len());
    // Writes sent to a node that does not own their key reached the owner
    // signed by that node, not with the caller's token (audited as "node").
    let forwarded = trails.iter().filter(|e| e["who"] == "node" && e["what"] == "POST /v1/instances" && e["outcome"] == "201").count();
    assert!(forwarded > 0, "no forwarded instance creation was audited on an owner as who=node");
    println!("CLUSTER: {forwarded} instance creations forwarded under a node signature");

    // The data plane was told: every instance of a disabled or deleted key got
    // its command, including those whose key's owner was killed or stopped.
    let mut commands = TopicReader::new(&broker.bootstrap, "instance-commands");
    let told = |seen: &[Read], cause: &str| {
        seen.iter()
            .filter(|m| m.json()["cause_event_id"] == cause)
            .map(|m| m.json()["instance_id"].as_str().unwrap().to_string())
            .collect::<std::collections::HashSet<_>>()
            .len()
    };
    for (n, cause) in events[10..].iter().enumerate() {
        commands.read_until(&format!("commands for every instance of {}", key(10 + n)), Duration::from_secs(60), |seen| told(seen, cause) == PER_KEY);
    }
    println!("CLUSTER: every instance of the 20 disabled or deleted keys got its command ({} commands read)", commands.seen.len());
}

#[test]
fn a_revocation_on_the_owner_is_visible_on_every_node_quickly() {
    let _one_at_a_time = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mut broker = Broker::start();
    let shared = Shared::new();
    let nodes: Vec<Daemon> = (0..3).map(|_| shared.node(&broker.bootstrap)).collect();
    write(&nodes[0], "/v1/keys", Some(json!({"key_id": "rt-key"})));
    write(&nodes[1], "/v1/instances", Some(json!({"instance_id": "rt-db", "key_id": "rt-key"})));
    const WARM_UP: usize = 3;
    // A p99 needs at least 200 samples; with fewer it is only the maximum.
    const SAMPLES: usize = 200;
    let (mut spread, mut end_to_end) = (Vec::new(), Vec::new());
    for cycle in 0..WARM_UP + SAMPLES {
        for (action, want) in [("disable", 423), ("enable", 200)] {
            let start = Instant::now();
            // Every node is watched at once; each notes when it first answers `want`.
            let seen: Vec<Instant> = std::thread::scope(|scope| {
                let watchers: Vec<_> = nodes
                    .iter()
                    .map(|d| {
                        scope.spawn(move || {
                            let mut last = (0, Value::Null);
                            while start.elapsed() < Duration::from_secs(10) {
                                last = d.dek("rt-db");
                                if last.0 == want {
                                    return Instant::now();
                                }
                            }
                            panic!("{action} not seen on {} after 10 s: {} {}", d.api, last.0, last.1);
                        })
                    })
                    .collect();
                write(&nodes[cycle % 3], &format!("/v1/keys/rt-key/{action}"), None);
                watchers.into_iter().map(|w| w.join().unwrap()).collect()
            });
            if action == "disable" && cycle >= WARM_UP {
                let (first, last) = (*seen.iter().min().unwrap(), *seen.iter().max().unwrap());
                // The owner refuses first; the others follow through the changelog.
                spread.push(last - first);
                end_to_end.push(last - start);
            }
        }
    }
    let report = |what: &str, mut v: Vec<Duration>| {
        assert_eq!(v.len(), SAMPLES);
        v.sort();
        let pct = |q: f64| v[((v.len() - 1) as f64 * q).round() as usize].as_secs_f64() * 1000.0;
        println!(
            "CLUSTER: {what}, {} disables: p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms (target p99 <= 100 ms on loopback)",
            v.len(),
            pct(0.5),
            pct(0.99),
            pct(1.0)
        );
    };
    report("refused on the owner -> refused on all 3 nodes", spread);
    report("disable request -> refused on all 3 nodes", end_to_end);

    // Without the broker the replicas fall behind: the two nodes that do not own
    // the key refuse its DEK rather than serve what may have been revoked since.
    broker.stop();
    let started = Instant::now();
    wait_until("the non-owners to refuse with 503", Duration::from_secs(20), || {
        let answers: Vec<(u16, Value)> = nodes.iter().map(|d| d.dek("rt-db")).collect();
        let refused = answers.iter().filter(|(s, v)| *s == 503 && v["error"].as_str().unwrap_or("").contains("behind the changelog")).count();
        (refused == 2 && answers.iter().any(|(s, _)| *s == 200)).then_some(())
    });
    println!(
        "CLUSTER: broker stopped; the 2 replicas refused the DEK after {:.1}s (cluster.max_replica_lag = 2s), the owner kept serving it",
        started.elapsed().as_secs_f64()
    );
}

/// Produces, with kafka-python, an owner announcement for a partition the
/// first node does not own, naming a rogue URL, authentic under the cluster
/// secret (as a node that holds it could). Prints the partition.
const ROGUE_OWNER: &str = r#"
import sys, hmac, hashlib, struct
from kafka import KafkaConsumer, KafkaProducer, TopicPartition

bootstrap, topic, secret_file, me, rogue = sys.argv[1:6]
secret = open(secret_file).read().strip().encode()
c = KafkaConsumer(bootstrap_servers=bootstrap, auto_offset_reset="earliest", enable_auto_commit=False, consumer_timeout_ms=5000)
c.assign([TopicPartition(topic, p) for p in c.partitions_for_topic(topic)])
c.seek_to_beginning()
owners = {}
for m in c:
    if m.key and m.key.startswith(b"w/") and len(m.key) == 6:
        owners[struct.unpack(">i", m.key[2:])[0]] = (m.value.decode(), m.partition)
theirs = [(p, at) for p, (url, at) in sorted(owners.items()) if url != me]
assert theirs, owners
partition, at = theirs[0]
key = b"w/" + struct.pack(">i", partition)
value = rogue.encode()
version = 1 << 61
h = hmac.new(secret, b"keywarden changelog v1\0", hashlib.sha256)
h.update(struct.pack(">i", at)); h.update(struct.pack(">Q", len(key))); h.update(key)
h.update(b"\1"); h.update(struct.pack(">Q", len(value))); h.update(value)
h.update(struct.pack(">q", version))
p = KafkaProducer(bootstrap_servers=bootstrap)
p.send(topic, key=key, value=value, partition=at,
       headers=[("keywarden.changelog.version", struct.pack(">q", version)), ("keywarden.changelog.mac", h.digest())])
p.flush(30)
print(partition)
"#;

#[test]
fn an_owner_announced_outside_the_peer_list_receives_nothing() {
    let _one_at_a_time = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let broker = Broker::start();
    let shared = Shared::new();
    let nodes: Vec<Daemon> = (0..2).map(|_| shared.node(&broker.bootstrap)).collect();
    // Both own some partitions and have announced themselves.
    for i in 0..KEYS {
        write(&nodes[i % 2], "/v1/keys", Some(json!({"key_id": key(i)})));
    }
    let rogue = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    rogue.set_nonblocking(true).unwrap();
    let rogue_url = format!("http://{}", rogue.local_addr().unwrap());
    let out = std::process::Command::new("python3")
        .args(["-c", ROGUE_OWNER, &broker.bootstrap, "keywarden-state", &shared.path("cluster.key"), &nodes[0].api, &rogue_url])
        .output()
        .expect("python3");
    assert!(out.status.success(), "kafka-python failed (pip install kafka-python): {}", String::from_utf8_lossy(&out.stderr));
    let partition: i32 = String::from_utf8_lossy(&out.stdout).trim().parse().unwrap();
    let target = (0..10_000).map(|i| format!("rogue-{i}")).find(|k| keywarden::cluster::partition_of(k, 6) == partition).unwrap();
    // The first node, once its replica has the announcement, refuses to
    // forward there: the positive marker that it was read and judged.
    let refused = wait_until("the write refused for an owner outside cluster.peers", Duration::from_secs(30), || {
        let (s, v) = nodes[0].post(&format!("/v1/keys/{target}/disable"), None);
        (s == 503 && v["error"].as_str().unwrap_or_default().contains("not in cluster.peers")).then_some(v)
    });
    assert!(refused["error"].as_str().unwrap().contains(&rogue_url), "{refused}");
    // The first node's watch of the partitions it does not own asks their
    // announced owners whether they live, every 2 s. It must not ask the rogue
    // URL: it takes the partition for ownerless, and after
    // cluster.rejoin_after (10 s) rejoins the group to have it assigned
    // again. That rejoin is the positive marker that the watch judged the
    // rogue's partition, after which nothing may have reached the rogue URL.
    // Only a round after the refusal counts: an earlier one may have judged
    // the partition before the rogue announcement was read.
    let log_lines = || std::fs::read_to_string(nodes[0].dir.path().join("keywarden.log")).unwrap_or_default().lines().map(without_colours).collect::<Vec<_>>();
    let judged_from = log_lines().len();
    let partitions = format!("{partition}");
    wait_until("the first node to take the rogue's partition for ownerless and rejoin", Duration::from_secs(60), || {
        log_lines()
            .iter()
            .skip(judged_from)
            .any(|l| {
                l.contains("partitions have had no live owner")
                    && l.split("partitions=[").nth(1).and_then(|rest| rest.split(']').next()).is_some_and(|list| list.split(", ").any(|p| p == partitions))
            })
            .then_some(())
    });
    // Neither the write nor an owner health probe ever reached the rogue URL.
    match rogue.accept() {
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
        other => panic!("the rogue owner URL received a connection: {other:?}"),
    }
}

/// A log line without its terminal colour codes (`ESC [ ... m`).
fn without_colours(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            chars.by_ref().find(|c| *c == 'm');
        } else {
            out.push(c);
        }
    }
    out
}

/// A data-plane report is judged and recorded by the key's owner alone.
/// Judged on another node, whose replica may not hold the command's cause
/// yet, a real command would read as one keywarden never issued (409), which
/// the agent gives up on; another node answers 503, which it retries. A
/// cause that no node has seen stands for the lagging replica.
#[test]
fn a_data_plane_report_is_judged_by_the_keys_owner_and_retried_elsewhere() {
    let _one_at_a_time = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let broker = Broker::start();
    let shared = Shared::new();
    let nodes: Vec<Daemon> = (0..3).map(|_| shared.node(&broker.bootstrap)).collect();
    write(&nodes[0], "/v1/keys", Some(json!({"key_id": "dp-key"})));
    write(&nodes[1], "/v1/instances", Some(json!({"instance_id": "dp-db", "key_id": "dp-key"})));
    let disabled = write(&nodes[2], "/v1/keys/dp-key/disable", None);
    let cause = disabled["event_id"].as_str().unwrap().to_string();
    let report = |d: &Daemon, cause: &str| -> (u16, Value) {
        let at = chrono::Utc::now();
        let c = keywarden::tell::Command::new("dp-db", "dp-key", keywarden::engine::CommandAction::Revoke, None, cause, at, None);
        let body = json!({"command_id": c.command_id, "cause_event_id": cause, "action": "revoke", "outcome": "enforced", "at": at});
        let r = d.http.post(format!("{}/v1/instances/dp-db/data-plane", d.api)).bearer_auth(d.dek_token_for("dp-db")).json(&body).send().unwrap();
        let status = r.status().as_u16();
        (status, r.json().unwrap_or(Value::Null))
    };
    // Every node has the instance (else 401) once its replica caught up.
    let answers = wait_until("one node to judge the unknown cause and the others to defer", Duration::from_secs(60), || {
        let answers: Vec<(u16, Value)> = nodes.iter().map(|d| report(d, "an-event-no-node-has-seen")).collect();
        let mut statuses: Vec<u16> = answers.iter().map(|(s, _)| *s).collect();
        statuses.sort();
        (statuses == [409, 503, 503]).then_some(answers)
    });
    let owner = answers.iter().position(|(s, _)| *s == 409).unwrap();
    for (i, (_, v)) in answers.iter().enumerate().filter(|(i, _)| *i != owner) {
        assert!(v["error"].as_str().unwrap_or("").contains("another node owns key dp-key"), "node {i}: {v}");
    }
    // The real command: deferred by the others, recorded by the owner.
    for (i, d) in nodes.iter().enumerate().filter(|(i, _)| *i != owner) {
        assert_eq!(report(d, &cause).0, 503, "node {i}");
    }
    let (s, v) = report(&nodes[owner], &cause);
    assert_eq!((s, &v["recorded"]), (200, &json!(true)), "{v}");
    let (_, shown) = nodes[owner].get("/v1/instances/dp-db");
    assert_eq!((&shown["data_plane"]["action"], &shown["data_plane"]["outcome"]), (&json!("revoke"), &json!("enforced")), "{shown}");
}
