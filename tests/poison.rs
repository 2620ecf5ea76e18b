//! Poison messages: bytes that are legal on the Kafka wire but that no format
//! can use. Produced by kafka-python, an independent client that writes header
//! names as raw bytes, against the real broker and the real binary.

mod common;

use std::time::Duration;

use common::*;

/// Produces, with kafka-python, a signed delete whose header list also has a
/// name that is not UTF-8, and a delete whose signature header value is not
/// UTF-8. Both would erase the key's instances if they were believed.
const POISON: &str = r#"
import sys, hmac, hashlib, base64, json
from kafka import KafkaProducer

class RawName(str):
    """A header name kafka-python writes as these exact bytes."""
    def __new__(cls, raw):
        name = str.__new__(cls, raw.decode("latin-1"))
        name.raw = raw
        return name
    def encode(self, *args, **kwargs):
        return self.raw

bootstrap, secret = sys.argv[1], sys.argv[2]
def signature(body):
    sig = base64.b64encode(hmac.new(secret.encode(), body, hashlib.sha256).digest()).decode()
    return ("kid=local;sig=" + sig).encode()
def delete(event_id):
    return json.dumps({"event_id": event_id, "type": "delete", "key_id": "pk-key",
                       "occurred_at": "2026-01-01T00:00:00Z"}).encode()

p = KafkaProducer(bootstrap_servers=bootstrap)
one = delete("pk-poison-name")
p.send("key-lifecycle", key=b"pk-key", value=one,
       headers=[(RawName(b"\xff\xfe"), b"x"), ("keywarden-signature", signature(one))])
two = delete("pk-poison-value")
p.send("key-lifecycle", key=b"pk-key", value=two, headers=[("keywarden-signature", b"kid=local;sig=\xff\xfe")])
p.flush(30)
p.close()
"#;

#[test]
fn a_header_name_that_is_not_utf8_is_dead_lettered_and_the_next_signed_event_is_applied() {
    let broker = Broker::start();
    let mut d = Daemon::start(&broker.bootstrap, &[]);
    d.create_key("pk-key");
    d.create_instance("pk-db", "pk-key");

    let out = std::process::Command::new("python3").args(["-c", POISON, &broker.bootstrap, TEST_EVENT_SECRET]).output().expect("python3");
    assert!(out.status.success(), "kafka-python producer failed (pip install kafka-python): {}", String::from_utf8_lossy(&out.stderr));
    // Behind the poison in the same partition: once this is applied, both
    // poison messages have been handled.
    let p = producer(&broker.bootstrap);
    produce(&p, "key-lifecycle", Some("pk-key"), &event("pk-after", "disable", "pk-key", None, "2026-01-01T00:00:01Z"));
    assert_eq!(d.wait_event("pk-after")["outcome"], "applied", "log:\n{}", d.log());
    assert_eq!(d.state("pk-db"), "revoked", "the poison deletes were not applied: the instance is revoked, not erased");
    for id in ["pk-poison-name", "pk-poison-value"] {
        assert_eq!(d.get(&format!("/v1/events/{id}")).0, 404, "{id} must never be applied");
    }
    assert!(d.is_ready(), "the daemon is still up; log:\n{}", d.log());

    // Both are on the dead-letter topic with a reason, the bad name kept as it was.
    let mut dlq = TopicReader::new(&broker.bootstrap, "key-lifecycle.dlq");
    let letters = dlq.read_until("two dead letters", Duration::from_secs(30), |seen| seen.len() >= 2).to_vec();
    let name = letters.iter().find(|l| l.json()["event_id"] == "pk-poison-name").expect("the bad-name message is dead-lettered");
    let reason = name.header("keywarden.reason").unwrap_or_default();
    assert!(reason.contains("not UTF-8") && reason.contains("\\xff\\xfe"), "reason: {reason}");
    assert!(name.headers.iter().any(|(k, v)| k == "\u{fffd}\u{fffd}" && v == "x"), "original header kept: {:?}", name.headers);
    let value = letters.iter().find(|l| l.json()["event_id"] == "pk-poison-value").expect("the bad-value message is dead-lettered");
    assert!(value.header("keywarden.reason").unwrap_or_default().contains("malformed"), "{:?}", value.headers);

    // No crash loop: a restart reads on past them.
    assert_eq!(d.terminate(), Some(0));
    d.restart();
    assert_eq!(d.wait_event("pk-after")["outcome"], "applied");
    let log = std::fs::read_to_string(d.dir.path().join("keywarden.log")).unwrap();
    assert!(!log.contains("panicked"), "log:\n{}", d.log());
}
