//! Real event sources and signatures, end to end: the real binary on a real
//! tansu broker reads IBM Activity Tracker, AWS EventBridge and CloudEvents
//! messages, refuses unsigned and forged ones, and carries correlation ids.

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

#[test]
fn activity_tracker_events_drive_the_lifecycle_and_carry_their_correlation_id() {
    let broker = Broker::start();
    let d = Daemon::start(&broker.bootstrap, &[]);
    d.create_key(CRN);
    d.create_instance("at-db", CRN);
    let mut commands = TopicReader::new(&broker.bootstrap, "instance-commands");
    let p = producer(&broker.bootstrap);
    // Routed by Activity Tracker, not signed: accepted by format.
    unsigned(&p, CRN, &at_event("at-1", "kms.secrets.disable", "corr-disable-1", &activity_tracker_time(1)));
    d.wait_state("at-db", "revoked");
    let rec = d.wait_event("at-1");
    assert_eq!(rec["correlation_id"], "corr-disable-1", "{rec}");
    let revoke = commands.read_until("the revoke command", MIN, |r| !commands_with(r, "revoke", "at-1").is_empty()).to_vec();
    assert_eq!(commands_with(&revoke, "revoke", "at-1")[0]["correlation_id"], "corr-disable-1");
    assert!(d.log().contains("corr-disable-1"), "the log lines carry the correlation id");

    unsigned(&p, CRN, &at_event("at-2", "kms.secrets.enable", "corr-enable-2", &activity_tracker_time(2)));
    d.wait_state("at-db", "active");
    // A failed request and a non-lifecycle action change nothing and say why.
    let mut failed: Value = serde_json::from_slice(&at_event("at-3", "kms.secrets.delete", "c3", &soon(3))).unwrap();
    failed["outcome"] = "failure".into();
    unsigned(&p, CRN, &serde_json::to_vec(&failed).unwrap());
    unsigned(&p, CRN, &at_event("at-4", "kms.secrets.wrap", "c4", &soon(4)));
    let mut dlq = TopicReader::new(&broker.bootstrap, "key-lifecycle.dlq");
    let read = dlq.read_until("two dead letters", MIN, |r| r.len() >= 2).to_vec();
    assert!(read[0].header("keywarden.reason").unwrap().contains("did not happen"), "{:?}", read[0].headers);
    assert!(read[1].header("keywarden.reason").unwrap().contains("not a lifecycle action"), "{:?}", read[1].headers);
    assert_eq!(d.state("at-db"), "active");
}

#[test]
fn eventbridge_events_revoke_and_a_kms_deletion_erases_for_good() {
    let broker = Broker::start();
    let d = Daemon::start(&broker.bootstrap, &[]);
    d.create_key(ARN);
    d.create_instance("aws-db", ARN);
    let p = producer(&broker.bootstrap);
    let steps: &[(&str, Vec<u8>, &str)] = &[
        ("eb-1", cloudtrail("eb-1", "DisableKey", &soon(1)), "revoked"),
        ("eb-2", cloudtrail("eb-2", "EnableKey", &soon(2)), "active"),
        ("eb-3", cloudtrail("eb-3", "ScheduleKeyDeletion", &soon(3)), "revoked"),
        // Cancelling leaves the key disabled, as AWS does.
        ("eb-4", cloudtrail("eb-4", "CancelKeyDeletion", &soon(4)), "revoked"),
        ("eb-5", cloudtrail("eb-5", "EnableKey", &soon(5)), "active"),
        ("eb-6", eventbridge("eb-6", "KMS Imported Key Material Expiration", &soon(6), json!({"key-id": "1234abcd-12ab-34cd-56ef-1234567890ab"})), "revoked"),
        ("eb-7", cloudtrail("eb-7", "EnableKey", &soon(7)), "active"),
    ];
    for (id, payload, want) in steps {
        unsigned(&p, ARN, payload);
        d.wait_event(id);
        d.wait_state("aws-db", want);
    }
    assert_eq!(d.wait_event("eb-1")["correlation_id"], "req-eb-1");
    // Before erasing, keywarden asks the key's KMS (here the embedded one) and
    // applies a delete only if that does not report the key active.
    let (s, v) = d.post(&format!("/v1/keys/{}/disable", ARN.replace('/', "%2F")), None);
    assert_eq!(s, 202, "{v}");
    d.wait_event(v["event_id"].as_str().unwrap());
    // The key material is gone: the wrapped DEK is purged at once, and a
    // restore cannot bring it back.
    unsigned(&p, ARN, &eventbridge("eb-8", "KMS CMK Deletion", &soon(8), json!({"key-id": "1234abcd-12ab-34cd-56ef-1234567890ab"})));
    d.wait_state("aws-db", "destroyed");
    let (s, _) = d.dek("aws-db");
    assert_eq!(s, 410);
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
    let metrics = d.http.get(format!("{}/metrics", d.api)).send().unwrap().text().unwrap();
    let count = |reason: &str| -> u64 {
        metrics
            .lines()
            .find(|l| l.starts_with("keywarden_security_events_total") && l.contains(&format!("reason=\"{reason}\"")))
            .and_then(|l| l.rsplit(' ').next()?.parse().ok())
            .unwrap_or(0)
    };
    assert_eq!((count("unsigned"), count("forged")), (1, 2), "{metrics}");
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
    std::thread::sleep(Duration::from_secs(2));
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

fn commands_with(read: &[Read], action: &str, cause: &str) -> Vec<Value> {
    read.iter().map(Read::json).filter(|c| c["action"] == action && c["cause_event_id"] == cause).collect()
}
