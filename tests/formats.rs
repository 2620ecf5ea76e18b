//! Real event sources and signatures, end to end: the real binary on a real
//! tansu broker reads CloudEvents, refuses unsigned and forged ones, and takes
//! IBM Activity Tracker and AWS EventBridge messages (which cannot be signed)
//! only as hints on a configured topic, for keys their own KMS serves. Those
//! hints against the KMS's word are in aws_kms.rs and keyprotect_kms.rs.

mod common;

use std::time::Duration;

use common::*;
use serde_json::{json, Value};

const MIN: Duration = Duration::from_secs(60);
const CRN: &str =
    "crn:v1:bluemix:public:kms:us-south:a/f047b55a3362ac06afad8a3f2f5586ea:12e8c9c2-a162-472d-b7d6-8b9a86b815a6:key:2e4f5b0d-f8e3-4b4b-9d1c-3f2a7f4d2e1a";
const ARN: &str = "arn:aws:kms:us-west-2:111122223333:key/1234abcd-12ab-34cd-56ef-1234567890ab";

fn at_event(id: &str, action: &str, correlation: &str, time: &str) -> Vec<u8> {
    serde_json::to_vec(&json!({
        "id": id,
        "initiator": {"id": "IBMid-550006NJ23", "typeURI": "service/security/account/user", "name": "alice@example.com"},
        "target": {"id": CRN, "name": "root-key-prod", "typeURI": "kms/secrets"},
        "observer": {"name": "ActivityTracker"},
        "action": action,
        "outcome": "success",
        "reason": {"reasonCode": 200, "reasonType": "OK"},
        "eventTime": time,
        "correlationId": correlation,
        "eventType": "activity"
    }))
    .unwrap()
}

fn eventbridge(id: &str, detail_type: &str, time: &str, detail: Value) -> Vec<u8> {
    serde_json::to_vec(&json!({
        "version": "0", "id": id, "detail-type": detail_type, "source": "aws.kms",
        "account": "111122223333", "time": time, "region": "us-west-2", "resources": [ARN], "detail": detail
    }))
    .unwrap()
}

fn cloudtrail(id: &str, name: &str, time: &str) -> Vec<u8> {
    eventbridge(
        id,
        "AWS API Call via CloudTrail",
        time,
        json!({
            "eventSource": "kms.amazonaws.com", "eventName": name, "awsRegion": "us-west-2",
            "requestParameters": {"keyId": ARN}, "requestID": format!("req-{id}"), "eventID": format!("ct-{id}")
        }),
    )
}

fn unsigned(p: &rdkafka::producer::BaseProducer, key: &str, payload: &[u8]) {
    produce_with_headers(p, "key-lifecycle", Some(key), payload, &[]);
}

/// A time as Activity Tracker writes it: hundredths and a `+0000` offset.
fn activity_tracker_time(secs: i64) -> String {
    let t = soon_at(secs);
    format!("{}.{:02}{}", t.format("%Y-%m-%dT%H:%M:%S"), t.timestamp_subsec_millis() / 10, t.format("%z"))
}

/// EventBridge and Activity Tracker messages cannot be signed, so a daemon
/// that was not told to take them as hints (`signatures.hint_topics`) takes
/// none: each is dead-lettered with the reason and counted, whoever wrote it.
#[test]
fn unsigned_formats_are_refused_on_a_topic_not_configured_for_hints() {
    let broker = Broker::start();
    let d = Daemon::start(&broker.bootstrap, &[]);
    d.create_key(ARN);
    d.create_instance("aws-db", ARN);
    d.create_key(CRN);
    d.create_instance("at-db", CRN);
    let mut dlq = TopicReader::new(&broker.bootstrap, "key-lifecycle.dlq");
    produce_as_outsider(&broker.bootstrap, "key-lifecycle", ARN, &cloudtrail("eb-1", "DisableKey", &soon(1)));
    let reason = wait_dead_letter(&mut dlq, "eventbridge events cannot be signed");
    assert!(reason.contains("topic key-lifecycle is not configured") && reason.contains("signatures.hint_topics"), "{reason}");
    produce_as_outsider(&broker.bootstrap, "key-lifecycle", CRN, &at_event("at-1", "kms.secrets.delete", "corr-1", &activity_tracker_time(2)));
    wait_dead_letter(&mut dlq, "activity-tracker events cannot be signed");
    assert_eq!(security_events(&d, "hint_topic"), 2);
    for (id, event) in [("aws-db", "eb-1"), ("at-db", "at:at-1")] {
        assert_eq!(d.state(id), "active", "{id}");
        assert_eq!(d.get(&format!("/v1/events/{event}")).0, 404);
    }
}

/// On a hint topic, an event is still only a hint its own KMS must confirm: an
/// AWS or Key Protect event naming a key that the embedded KMS serves (the key
/// is named by an ARN or a CRN, but nothing routes it there) cannot be
/// confirmed, and is dead-lettered with the reason. Malformed records are
/// refused as before.
#[test]
fn a_hint_for_a_key_its_kms_does_not_serve_is_refused() {
    let broker = Broker::start();
    let d = Daemon::start(&broker.bootstrap, &[("KEYWARDEN_SIGNATURES_HINT_TOPICS", "key-lifecycle")]);
    d.create_key(ARN);
    d.create_instance("aws-db", ARN);
    d.create_key(CRN);
    d.create_instance("at-db", CRN);
    let mut dlq = TopicReader::new(&broker.bootstrap, "key-lifecycle.dlq");
    produce_as_outsider(&broker.bootstrap, "key-lifecycle", ARN, &cloudtrail("eb-1", "DisableKey", &soon(1)));
    let reason = wait_dead_letter(&mut dlq, &format!("names key {ARN}"));
    assert!(reason.contains("which the local kms serves, so the aws kms cannot confirm it"), "{reason}");
    produce_as_outsider(&broker.bootstrap, "key-lifecycle", CRN, &at_event("at-1", "kms.secrets.disable", "corr-1", &activity_tracker_time(2)));
    let reason = wait_dead_letter(&mut dlq, &format!("names key {CRN}"));
    assert!(reason.contains("the keyprotect kms cannot confirm it"), "{reason}");
    assert_eq!(security_events(&d, "hint_unconfirmable"), 2);
    // A failed request and a non-lifecycle action change nothing and say why.
    let mut failed: Value = serde_json::from_slice(&at_event("at-3", "kms.secrets.delete", "c3", &soon(3))).unwrap();
    failed["outcome"] = "failure".into();
    produce_as_outsider(&broker.bootstrap, "key-lifecycle", CRN, &serde_json::to_vec(&failed).unwrap());
    wait_dead_letter(&mut dlq, "did not happen");
    produce_as_outsider(&broker.bootstrap, "key-lifecycle", CRN, &at_event("at-4", "kms.secrets.wrap", "c4", &soon(4)));
    wait_dead_letter(&mut dlq, "not a lifecycle action");
    assert_eq!((d.state("aws-db"), d.state("at-db")), ("active".to_string(), "active".to_string()));
}

#[test]
fn cloudevents_in_both_modes_are_applied_when_signed() {
    let broker = Broker::start();
    let d = Daemon::start(&broker.bootstrap, &[]);
    d.create_key("ce-key");
    d.create_instance("ce-db", "ce-key");
    let p = producer(&broker.bootstrap);
    let native = |id: &str, kind: &str, at: &str| json!({"event_id": id, "type": kind, "key_id": "ce-key", "occurred_at": at});
    let structured = serde_json::to_vec(&json!({
        "specversion": "1.0", "id": "ce-1", "source": "/kms/eu-de", "type": "com.example.kms.key.disabled",
        "datacontenttype": "application/json", "correlationid": "corr-ce-1", "data": native("ev-ce-1", "disable", &soon(1))
    }))
    .unwrap();
    produce(&p, "key-lifecycle", Some("ce-key"), &structured);
    d.wait_state("ce-db", "revoked");
    assert_eq!(d.wait_event("ev-ce-1")["correlation_id"], "corr-ce-1");

    let body = serde_json::to_vec(&native("ev-ce-2", "enable", &soon(2))).unwrap();
    let sig = keywarden::intake::signature::Signer::hmac("local", TEST_EVENT_SECRET.as_bytes()).sign(&body);
    produce_with_headers(
        &p,
        "key-lifecycle",
        Some("ce-key"),
        &body,
        &[("ce_specversion", "1.0"), ("ce_id", "ce-2"), ("ce_source", "/kms/eu-de"), ("ce_type", "com.example.kms.key.enabled"), ("keywarden-signature", &sig)],
    );
    d.wait_state("ce-db", "active");
}

#[test]
fn unsigned_forged_and_unknown_messages_are_dead_lettered_never_applied_and_counted() {
    let broker = Broker::start();
    let d = Daemon::start(&broker.bootstrap, &[]);
    d.create_key("sk");
    d.create_instance("s-db", "sk");
    let p = producer(&broker.bootstrap);
    let delete = event("evil-1", "delete", "sk", None, &soon(1));
    unsigned(&p, "sk", &delete);
    let forged = keywarden::intake::signature::Signer::hmac("local", b"not-the-secret-but-long-enough-to-use-0000").sign(&delete);
    let mut again = delete.clone();
    again.extend_from_slice(b" ");
    produce_with_headers(&p, "key-lifecycle", Some("sk"), &again, &[("keywarden-signature", &forged)]);
    // A valid signature over different bytes: the payload was altered.
    let good_sig = keywarden::intake::signature::Signer::hmac("local", TEST_EVENT_SECRET.as_bytes()).sign(&delete);
    let altered = event("evil-2", "delete", "sk", None, &soon(2));
    produce_with_headers(&p, "key-lifecycle", Some("sk"), &altered, &[("keywarden-signature", &good_sig)]);
    produce(&p, "key-lifecycle", Some("sk"), br#"{"hello":"world"}"#);
    // A signed, valid event after them all is applied: nothing stopped the intake.
    produce(&p, "key-lifecycle", Some("sk"), &event("ok-1", "disable", "sk", None, &soon(5)));
    d.wait_state("s-db", "revoked");

    let mut dlq = TopicReader::new(&broker.bootstrap, "key-lifecycle.dlq");
    let read = dlq.read_until("four dead letters", MIN, |r| r.len() >= 4).to_vec();
    let reasons: Vec<&str> = read.iter().map(|r| r.header("keywarden.reason").unwrap()).collect();
    assert!(reasons[0].contains("no keywarden-signature header"), "{reasons:?}");
    assert!(reasons[1].contains("forged or altered"), "{reasons:?}");
    assert!(reasons[2].contains("forged or altered"), "{reasons:?}");
    assert!(reasons[3].contains("expected one of") && reasons[3].contains("eventbridge") && reasons[3].contains("activity-tracker"), "{reasons:?}");
    for id in ["evil-1", "evil-2"] {
        assert_eq!(d.get(&format!("/v1/events/{id}")).0, 404, "{id} was never applied");
    }
    assert_eq!((security_events(&d, "unsigned"), security_events(&d, "forged")), (1, 2));
}

#[test]
fn event_emit_produces_signed_events_the_daemon_accepts_including_ed25519() {
    let broker = Broker::start();
    let dir = tempfile::tempdir().unwrap();
    let keygen =
        std::process::Command::new(env!("CARGO_BIN_EXE_keywarden")).args(["event", "keygen", "--out"]).arg(dir.path().join("partner")).output().unwrap();
    assert!(keygen.status.success(), "{}", String::from_utf8_lossy(&keygen.stderr));
    let config = dir.path().join("keywarden.toml");
    std::fs::write(
        &config,
        format!(
            "[signatures]\nrequired = true\n[[signatures.keys]]\nid = \"partner\"\nalgorithm = \"ed25519\"\nfile = \"{}\"\ntopics = [\"key-lifecycle\"]\n",
            dir.path().join("partner.pub").display()
        ),
    )
    .unwrap();
    let d = Daemon::start(&broker.bootstrap, &[("KEYWARDEN_CONFIG", config.to_str().unwrap())]);
    d.create_key("em-key");
    d.create_instance("em-db", "em-key");
    let emit = |extra: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_keywarden"))
            .args(["event", "emit", "--key", "em-key"])
            .args(extra)
            .env("KEYWARDEN_KAFKA_BROKERS", &broker.bootstrap)
            .env("KEYWARDEN_SIGNATURES_HMAC_KEY_FILE", d.dir.path().join("event-hmac.key"))
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap().trim().to_string()
    };
    // The daemon's own HMAC secret, then a partner's Ed25519 key, in each envelope.
    let id = emit(&["--type", "disable", "--correlation-id", "corr-cli"]);
    d.wait_state("em-db", "revoked");
    assert_eq!(d.wait_event(&id)["correlation_id"], "corr-cli");
    let key = dir.path().join("partner.key");
    let ed = ["--key-file", key.to_str().unwrap(), "--key-id", "partner", "--algorithm", "ed25519"];
    emit(&[&["--type", "enable", "--envelope", "cloudevents"][..], &ed].concat());
    d.wait_state("em-db", "active");
    emit(&[&["--type", "disable", "--envelope", "cloudevents-binary"][..], &ed].concat());
    d.wait_state("em-db", "revoked");
    // --unsigned is refused by the daemon.
    let id = emit(&["--type", "enable", "--unsigned"]);
    let mut dlq = TopicReader::new(&broker.bootstrap, "key-lifecycle.dlq");
    let refused = dlq.read_until("the unsigned event dead-lettered", MIN, |r| r.iter().any(|m| String::from_utf8_lossy(&m.payload).contains(&id))).to_vec();
    let refused = refused.iter().find(|m| String::from_utf8_lossy(&m.payload).contains(&id)).unwrap();
    assert!(refused.header("keywarden.reason").unwrap().contains("no keywarden-signature header"), "{:?}", refused.headers);
    assert_eq!(d.get(&format!("/v1/events/{id}")).0, 404);
    assert_eq!(d.state("em-db"), "revoked");
    // `event sign` prints the header a producer attaches.
    let signed = std::process::Command::new(env!("CARGO_BIN_EXE_keywarden"))
        .args(["event", "sign", "--key-file", key.to_str().unwrap(), "--key-id", "partner", "--algorithm", "ed25519"])
        .arg(&config)
        .output()
        .unwrap();
    let line = String::from_utf8(signed.stdout).unwrap();
    assert!(line.starts_with("keywarden-signature: kid=partner;sig="), "{line}");
}
