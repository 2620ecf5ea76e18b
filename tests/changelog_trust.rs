//! Whoever can produce to the changelog topic, but does not hold the cluster
//! secret, changes nothing: a replayed authentic record, a forged one, and
//! even an authentic record of a prefix replication never carries are
//! refused, counted and logged, and the replica goes on. Produced by
//! kafka-python, an independent client, against the real broker and binary.

mod common;

use std::time::Duration;

use common::*;

/// Reads the changelog from the start, finds the first (the "active") record
/// of key `k/<key>` with its headers, and produces to its partition:
/// the record again, byte for byte (a replay); the same with its MAC altered
/// (a forgery); and an outbox entry signed with the real secret but of a
/// prefix replication does not carry.
const ATTACK: &str = r#"
import sys, hmac, hashlib, json, struct
from kafka import KafkaConsumer, KafkaProducer, TopicPartition

bootstrap, topic, key, secret_file = sys.argv[1:5]
secret = open(secret_file).read().strip().encode()
c = KafkaConsumer(bootstrap_servers=bootstrap, auto_offset_reset="earliest", enable_auto_commit=False, consumer_timeout_ms=5000)
parts = [TopicPartition(topic, p) for p in c.partitions_for_topic(topic)]
c.assign(parts)
c.seek_to_beginning()
found = None
for m in c:
    if m.key == ("k/" + key).encode():
        found = m
        break
assert found is not None, "no changelog record of the key"
headers = dict(found.headers)
assert "keywarden.changelog.mac" in headers and "keywarden.changelog.version" in headers, found.headers

def mac(partition, k, v, version):
    h = hmac.new(secret, b"keywarden changelog v1\0", hashlib.sha256)
    h.update(struct.pack(">i", partition)); h.update(struct.pack(">Q", len(k))); h.update(k)
    if v is None: h.update(b"\0")
    else: h.update(b"\1"); h.update(struct.pack(">Q", len(v))); h.update(v)
    h.update(struct.pack(">q", version))
    return h.digest()

p = KafkaProducer(bootstrap_servers=bootstrap)
# 1. The old authentic record: a replay.
p.send(topic, key=found.key, value=found.value, partition=found.partition, headers=found.headers)
# 2. Forged: the MAC does not match.
bad = bytes(b ^ 1 for b in headers["keywarden.changelog.mac"])
p.send(topic, key=found.key, value=found.value, partition=found.partition,
       headers=[("keywarden.changelog.version", headers["keywarden.changelog.version"]), ("keywarden.changelog.mac", bad)])
# 3. An outbox entry with a valid MAC and a version above any: the relay would
#    sign it and send it as a command, were it applied.
okey = b"o/" + struct.pack(">Q", 1 << 60)
oval = json.dumps({"kind": "key_commands", "key_id": key, "action": "restore", "key_version": None, "cause_event_id": "forged",
                   "issued_at": "2026-01-01T00:00:00Z", "correlation_id": None, "traceparent": None}).encode()
version = (1 << 62)
p.send(topic, key=okey, value=oval, partition=found.partition,
       headers=[("keywarden.changelog.version", struct.pack(">q", version)), ("keywarden.changelog.mac", mac(found.partition, okey, oval, version))])
p.flush(30)
p.close()
print("sent")
"#;

#[test]
fn a_replayed_a_forged_and_an_unreplicable_changelog_record_change_nothing() {
    let broker = Broker::start();
    let d = Daemon::start(&broker.bootstrap, &[]);
    d.create_key("ct-key");
    d.create_instance("ct-db", "ct-key");
    assert_eq!(d.dek("ct-db").0, 200);
    d.act("ct-key", "disable");
    d.wait_state("ct-db", "revoked");
    assert_eq!(d.dek("ct-db").0, 423);

    let secret = d.dir.path().join("store").join("cluster.key");
    assert!(secret.exists(), "the cluster secret is created beside the store");
    let out = std::process::Command::new("python3")
        .args(["-c", ATTACK, &broker.bootstrap, "keywarden-state", "ct-key", secret.to_str().unwrap()])
        .output()
        .expect("python3");
    assert!(out.status.success(), "kafka-python failed (pip install kafka-python): {}", String::from_utf8_lossy(&out.stderr));

    // Positive markers: each refusal is counted once the replica has read it.
    wait_until("the three refusals", Duration::from_secs(30), || {
        (security_events(&d, "changelog_replayed") >= 1 && security_events(&d, "changelog_forged") >= 1 && security_events(&d, "changelog_prefix") >= 1)
            .then_some(())
    });
    assert_eq!(d.dek("ct-db").0, 423, "the replayed 'active' record did not re-activate the key");
    assert_eq!(d.state("ct-db"), "revoked");
    assert_eq!(d.get("/v1/keys/ct-key").1["state"], "disabled");
    let log = d.log();
    assert_eq!(log.matches("refused a changelog record").count(), 3, "log:\n{log}");

    // The replica goes on: a real change after them is applied and served.
    let enable = d.act("ct-key", "enable")["event_id"].as_str().unwrap().to_string();
    d.wait_state("ct-db", "active");
    assert_eq!(d.dek("ct-db").0, 200);
    // The enable's restore command reaches the data plane; the injected
    // outbox entry (which the refusal kept out of the outbox) never does.
    let mut commands = TopicReader::new(&broker.bootstrap, "instance-commands");
    commands.read_until("the enable's restore command", Duration::from_secs(30), |seen| {
        seen.iter().any(|m| m.json()["action"] == "restore" && m.json()["cause_event_id"] == enable.as_str())
    });
    assert!(commands.commands("restore", "forged").is_empty(), "the injected outbox entry was never sent");
    assert!(d.is_ready());
}
