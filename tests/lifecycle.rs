//! End to end over a real tansu broker: every event type, duplicates, stale
//! events, unknown keys, the dead-letter topic, the restore window and API errors.

mod common;

use std::collections::HashSet;
use std::time::Duration;

use common::*;
use serde_json::json;

const MIN: Duration = Duration::from_secs(60);

#[test]
fn every_event_type_rewraps_revokes_erases_and_restores_end_to_end() {
    let broker = Broker::start();
    let d = Daemon::start(&broker.bootstrap, &[]);
    let mut commands = TopicReader::new(&broker.bootstrap, "instance-commands");
    d.create_key("k1");
    let ids = ["db-a", "db-b", "db-c"];
    for id in ids {
        d.create_instance(id, "k1");
    }
    let original: Vec<String> = ids.iter().map(|id| d.dek(id).1["dek"].as_str().unwrap().to_string()).collect();
    let fingerprints: Vec<String> = ids.iter().map(|id| d.get(&format!("/v1/instances/{id}")).1["dek_fingerprint"].as_str().unwrap().to_string()).collect();
    // A plaintext DEK must not be kept by any cache on its way, nor a refusal
    // stand in for a later answer.
    let no_store = |id: &str| {
        let r = d.http.post(format!("{}/v1/instances/{id}/dek", d.api)).bearer_auth(d.dek_token_for(id)).send().unwrap();
        (r.status().as_u16(), r.headers().get("cache-control").and_then(|v| v.to_str().ok()).map(str::to_string))
    };
    assert_eq!(no_store("db-a"), (200, Some("no-store".to_string())));
    assert_eq!(no_store("no-such-instance"), (401, Some("no-store".to_string())));
    // The DEK route checks its own credentials, outside the API's token layer:
    // a node's signature header opens no DEK, even beside the instance's token.
    let signed =
        d.http.post(format!("{}/v1/instances/db-a/dek", d.api)).bearer_auth(d.dek_token_for("db-a")).header("x-keywarden-node-mac", "forged").send().unwrap();
    assert_eq!(signed.status().as_u16(), 401, "a node signature opened a DEK");

    // Several rotations: the DEK never changes, the wrapping follows the newest version.
    for round in 2..=4 {
        let ev = d.act("k1", "rotate");
        let version = round.to_string();
        assert_eq!(ev["key_version"], version.as_str());
        let key = d.wait_rotated("k1", &version);
        assert_eq!(key["rotation"]["done"], 3, "{key}");
        for (i, id) in ids.iter().enumerate() {
            let (s, v) = d.dek(id);
            assert_eq!(s, 200);
            assert_eq!(v["dek"].as_str().unwrap(), original[i], "DEK of {id} changed in rotation {round}");
            assert_eq!(v["key_version"], version.as_str());
            let inst = d.get(&format!("/v1/instances/{id}")).1;
            assert_eq!(inst["dek_fingerprint"].as_str().unwrap(), fingerprints[i]);
        }
        let cause = ev["event_id"].as_str().unwrap().to_string();
        commands.read_until("rewrapped commands", MIN, |r| commands_for(r, "rewrapped", &cause) == 3);
    }

    let ev = d.act("k1", "disable");
    let cause = ev["event_id"].as_str().unwrap().to_string();
    for id in ids {
        d.wait_state(id, "revoked");
        let (s, v) = d.dek(id);
        assert_eq!(s, 423, "{v}");
        assert!(v["error"].as_str().unwrap().contains("revoked"));
    }
    commands.read_until("revoke commands", MIN, |r| commands_for(r, "revoke", &cause) == 3);

    let ev = d.act("k1", "enable");
    let cause = ev["event_id"].as_str().unwrap().to_string();
    for id in ids {
        d.wait_state(id, "active");
    }
    commands.read_until("restore commands", MIN, |r| commands_for(r, "restore", &cause) == 3);

    let ev = d.act("k1", "delete");
    let cause = ev["event_id"].as_str().unwrap().to_string();
    for id in ids {
        d.wait_state(id, "erased");
        assert_eq!(d.dek(id).0, 410);
    }
    commands.read_until("erase commands", MIN, |r| commands_for(r, "erase", &cause) == 3);

    let ev = d.act("k1", "restore");
    let cause = ev["event_id"].as_str().unwrap().to_string();
    for (i, id) in ids.iter().enumerate() {
        d.wait_state(id, "active");
        assert_eq!(d.dek(id).1["dek"].as_str().unwrap(), original[i], "restore brings back the same DEK");
    }
    commands.read_until("restore commands after delete", MIN, |r| commands_for(r, "restore", &cause) == 3);

    // Every command carries the documented fields, keyed by instance id.
    for r in &commands.seen {
        let c = r.json();
        for field in ["command_id", "instance_id", "action", "key_id", "key_version", "cause_event_id", "issued_at"] {
            assert!(c.get(field).is_some(), "command lacks {field}: {c}");
        }
        assert_eq!(r.key.as_deref(), c["instance_id"].as_str());
    }
}

fn commands_for(read: &[Read], action: &str, cause: &str) -> usize {
    read.iter()
        .map(Read::json)
        .filter(|c| c["action"] == action && c["cause_event_id"] == cause)
        .map(|c| c["instance_id"].to_string())
        .collect::<HashSet<_>>()
        .len()
}

#[test]
fn malformed_messages_go_to_the_dead_letter_topic_and_intake_goes_on() {
    let broker = Broker::start();
    let d = Daemon::start(&broker.bootstrap, &[]);
    d.create_key("k2");
    d.create_instance("i2", "k2");
    let p = producer(&broker.bootstrap);
    let garbage: &[u8] = b"\x00\x01 definitely not json";
    produce(&p, "key-lifecycle", Some("k2"), garbage);
    let no_version = event("bad-rotate", "rotate", "k2", None, &soon(0));
    produce(&p, "key-lifecycle", Some("k2"), &no_version);
    produce(&p, "key-lifecycle", Some("k2"), &event("good", "disable", "k2", None, &soon(1)));

    // The valid event after the bad ones is applied: nothing stopped the intake.
    d.wait_state("i2", "revoked");
    let mut dlq = TopicReader::new(&broker.bootstrap, "key-lifecycle.dlq");
    let read = dlq.read_until("two dead letters", MIN, |r| r.len() >= 2).to_vec();
    assert_eq!(read[0].payload, garbage, "original bytes are kept");
    assert_eq!(read[1].payload, no_version);
    assert!(read[0].header("keywarden.reason").unwrap().contains("not JSON"), "{:?}", read[0].headers);
    assert!(read[1].header("keywarden.reason").unwrap().contains("key_version is required"), "{:?}", read[1].headers);
    for r in &read {
        assert_eq!(r.header("keywarden.source.topic"), Some("key-lifecycle"));
        assert!(r.header("keywarden.source.partition").unwrap().parse::<i32>().is_ok());
        assert!(r.header("keywarden.source.offset").unwrap().parse::<i64>().is_ok());
    }
    let metrics = d.http.get(format!("{}/metrics", d.api)).send().unwrap().text().unwrap();
    assert!(metrics.contains("keywarden_dead_letters_total"), "{metrics}");
}

/// An event dated ahead of the clock by more than signatures.max_clock_skew is
/// refused before the engine; it would otherwise make every later real event
/// of its key look stale.
#[test]
fn a_future_dated_event_is_dead_lettered_and_the_next_real_one_is_applied() {
    let broker = Broker::start();
    let d = Daemon::start(&broker.bootstrap, &[]);
    d.create_key("fd-key");
    d.create_instance("fd-db", "fd-key");
    let p = producer(&broker.bootstrap);
    // Signed, well-formed, and a day ahead: a disable from "tomorrow".
    produce(&p, "key-lifecycle", Some("fd-key"), &event("fd-future", "disable", "fd-key", None, &soon(86_400)));
    produce(&p, "key-lifecycle", Some("fd-key"), &event("fd-now", "disable", "fd-key", None, &soon(0)));
    assert_eq!(d.wait_event("fd-now")["outcome"], "applied", "the real event after it is not stale");
    assert_eq!(d.get("/v1/events/fd-future").0, 404, "the future-dated event was never applied");
    let mut dlq = TopicReader::new(&broker.bootstrap, "key-lifecycle.dlq");
    let read = dlq.read_until("the future-dated event dead-lettered", MIN, |r| !r.is_empty()).to_vec();
    let reason = read[0].header("keywarden.reason").unwrap_or_default();
    assert!(reason.contains("fd-future") && reason.contains("max_clock_skew"), "{reason}");
}

#[test]
fn duplicate_and_stale_events_change_nothing() {
    let broker = Broker::start();
    let d = Daemon::start(&broker.bootstrap, &[]);
    let mut commands = TopicReader::new(&broker.bootstrap, "instance-commands");
    d.create_key("k3");
    d.create_instance("i3a", "k3");
    d.create_instance("i3b", "k3");
    let p = producer(&broker.bootstrap);

    // A disable, delivered twice, then an enable that happened before it.
    let disable = event("d-1", "disable", "k3", None, &soon(10));
    produce(&p, "key-lifecycle", Some("k3"), &disable);
    produce(&p, "key-lifecycle", Some("k3"), &disable);
    produce(&p, "key-lifecycle", Some("k3"), &event("e-0", "enable", "k3", None, &soon(5)));
    let stale = d.wait_event("e-0");
    assert_eq!(stale["outcome"], "stale", "{stale}");
    assert_eq!(d.wait_event("d-1")["outcome"], "applied");
    assert_eq!(d.state("i3a"), "revoked", "a late enable does not re-enable");
    commands.read_until("revoke commands", MIN, |r| commands_for(r, "revoke", "d-1") == 2);
    // An enable after it is the marker: each instance's commands share a
    // partition (the key is the instance id) and leave in commit order, so a
    // duplicate revoke would come before the restore.
    produce(&p, "key-lifecycle", Some("k3"), &event("e-2", "enable", "k3", None, &soon(20)));
    commands.read_until("the restore commands after them", MIN, |r| commands_for(r, "restore", "e-2") == 2);
    let revokes = commands.commands("revoke", "d-1");
    assert_eq!(revokes.len(), 2, "exactly one revoke per instance: {revokes:?}");
    let metrics = d.http.get(format!("{}/metrics", d.api)).send().unwrap().text().unwrap();
    assert!(metrics.contains(r#"keywarden_events_total{outcome="duplicate",type="disable"} 1"#), "{metrics}");

    // A late rotate after a delete resurrects nothing. The delete is the KMS's
    // own (keywarden applies a delete only when the KMS confirms it).
    d.create_key("k3b");
    d.create_instance("i3c", "k3b");
    let del = d.act("k3b", "delete");
    assert_eq!(d.wait_event(del["event_id"].as_str().unwrap())["outcome"], "applied");
    let deleted_at = chrono::DateTime::parse_from_rfc3339(del["occurred_at"].as_str().unwrap()).unwrap();
    let before = (deleted_at - chrono::Duration::hours(1)).to_rfc3339();
    let after = (deleted_at + chrono::Duration::minutes(1)).to_rfc3339();
    produce(&p, "key-lifecycle", Some("k3b"), &event("rot-late", "rotate", "k3b", Some("9"), &before));
    produce(&p, "key-lifecycle", Some("k3b"), &event("rot-after", "rotate", "k3b", Some("9"), &after));
    assert_eq!(d.wait_event("rot-late")["outcome"], "stale");
    assert_eq!(d.wait_event("rot-after")["outcome"], "ignored");
    assert_eq!(d.state("i3c"), "erased");
    let key = d.get("/v1/keys/k3b").1;
    assert_eq!(key["state"], "deleted", "{key}");
    assert_ne!(key["version"], "9");
}

#[test]
fn a_delete_the_kms_does_not_confirm_erases_nothing() {
    let broker = Broker::start();
    let d = Daemon::start(&broker.bootstrap, &[]);
    d.create_key("k4");
    d.create_instance("i4", "k4");
    // A delete event for a key the embedded KMS still holds active.
    let p = producer(&broker.bootstrap);
    produce(&p, "key-lifecycle", Some("k4"), &event("forged-del", "delete", "k4", None, &soon(0)));
    let rec = d.wait_event("forged-del");
    assert_eq!(rec["outcome"], "ignored", "{rec}");
    assert!(rec["detail"].as_str().unwrap().contains("kms reports the key active"), "{rec}");
    assert_eq!(d.state("i4"), "active");
    assert_eq!(d.dek("i4").0, 200);
}

#[test]
fn events_for_a_key_without_instances_shape_instances_created_later() {
    let broker = Broker::start();
    let d = Daemon::start(&broker.bootstrap, &[]);
    let p = producer(&broker.bootstrap);
    produce(&p, "key-lifecycle", Some("ext-key"), &event("x-1", "disable", "ext-key", None, &soon(0)));
    assert_eq!(d.wait_event("x-1")["outcome"], "applied");
    let (s, key) = d.get("/v1/keys/ext-key");
    assert_eq!(s, 200, "{key}");
    assert_eq!(key["state"], "disabled");
    assert_eq!(key["instances"], 0);

    // The KMS can still wrap under it (its own state is active), but keywarden
    // knows the key is disabled: the new instance starts revoked.
    d.create_key("ext-key");
    let inst = d.create_instance("late-1", "ext-key");
    assert_eq!(inst["state"], "revoked", "{inst}");
    assert_eq!(d.dek("late-1").0, 423);
}

#[test]
fn restore_after_the_purge_leaves_instances_destroyed_and_says_why() {
    let broker = Broker::start();
    let d = Daemon::start(&broker.bootstrap, &[("KEYWARDEN_POLICY_PURGE_AFTER", "2s"), ("KEYWARDEN_POLICY_PURGE_SCHEDULE", "* * * * * *")]);
    d.create_key("k5");
    d.create_instance("i5", "k5");
    d.act("k5", "delete");
    d.wait_state("i5", "erased");
    wait_until("the purge", MIN, || (d.state("i5") == "destroyed").then_some(()));
    let inst = d.get("/v1/instances/i5").1;
    assert!(inst["destroyed_reason"].as_str().unwrap().contains("restore window"), "{inst}");
    assert_eq!(d.dek("i5").0, 410);
    // The embedded KMS destroyed the key's material after the purge: the proof
    // that no surviving copy of i5's wrapped DEK can be unwrapped.
    let key = wait_until("the key material destroyed", MIN, || {
        let key = d.get("/v1/keys/k5").1;
        key["kms_material_destroyed_at"].is_string().then_some(key)
    });
    assert_eq!(key["kms_state"], "deleted", "{key}");
    // Audited just after the destruction is committed.
    let proof = wait_until("the audit entry of the destruction", MIN, || {
        d.get("/v1/audit?limit=1000").1["entries"].as_array().unwrap().iter().find(|e| e["what"] == "destroy key material" && e["key_id"] == "k5").cloned()
    });
    assert_eq!((proof["who"].as_str(), proof["outcome"].as_str()), (Some("schedule:purge"), Some("destroyed")), "{proof}");

    // The embedded KMS refuses, and says why.
    let (s, v) = d.post("/v1/keys/k5/restore", None);
    assert_eq!(s, 409, "{v}");
    assert!(v["error"].as_str().unwrap().contains("restore window"), "{v}");
    assert!(v["error"].as_str().unwrap().contains("material was destroyed"), "{v}");

    // A restore from elsewhere (a remote KMS) is recorded; the instance stays destroyed.
    let p = producer(&broker.bootstrap);
    produce(&p, "key-lifecycle", Some("k5"), &event("late-restore", "restore", "k5", None, &soon(0)));
    let rec = d.wait_event("late-restore");
    assert!(rec["detail"].as_str().unwrap().contains("stay destroyed"), "{rec}");
    assert_eq!(d.state("i5"), "destroyed");
    assert_eq!(d.dek("i5").0, 410);
}

#[test]
fn api_errors_are_json_with_the_right_status() {
    let broker = Broker::start();
    let d = Daemon::start(&broker.bootstrap, &[]);
    d.create_key("k6");
    let cases: Vec<(u16, (u16, serde_json::Value))> = vec![
        (400, d.post_raw("/v1/instances", "{not json")),
        (400, d.post_raw("/v1/instances", r#"{"instance_id":"x"}"#)),
        (400, d.post_raw("/v1/instances", r#"{"instance_id":"","key_id":"k6"}"#)),
        (400, d.post_raw("/v1/instances", r#"{"instance_id":"x","key_id":"k6","bogus":1}"#)),
        (400, d.post("/v1/instances", None)),
        (404, d.post("/v1/instances", Some(json!({"instance_id": "x", "key_id": "no-such-key"})))),
        (404, d.get("/v1/instances/nope")),
        // An unknown instance is refused as a wrong credential is: 401.
        (401, d.dek("nope")),
        (404, d.delete("/v1/instances/nope")),
        (404, d.get("/v1/keys/nope")),
        (404, d.post("/v1/keys/k6/explode", None)),
        (404, d.post("/v1/keys/nope/disable", None)),
        (409, d.post("/v1/keys", Some(json!({"key_id": "k6"})))),
        (409, d.post("/v1/keys/k6/enable", None)),
        (404, d.get("/v1/no/such/route")),
    ];
    for (want, (got, body)) in cases {
        assert_eq!(got, want, "{body}");
        let msg = body["error"].as_str().unwrap_or_else(|| panic!("error body is JSON with an error field: {body}"));
        assert!(!msg.is_empty());
    }
    d.create_instance("i6", "k6");
    assert_eq!(d.post("/v1/instances", Some(json!({"instance_id": "i6", "key_id": "k6"}))).0, 409);
    // Deleting an instance destroys its wrapped DEK at once.
    assert_eq!(d.delete("/v1/instances/i6").0, 204);
    assert_eq!(d.state("i6"), "destroyed");
    assert_eq!(d.dek("i6").0, 410);
    assert_eq!(d.get("/healthz").0, 200);
    assert_eq!(d.get("/readyz").0, 200);
}

#[test]
fn cli_speaks_to_the_api_and_fails_with_a_one_line_reason() {
    let broker = Broker::start();
    let d = Daemon::start(&broker.bootstrap, &[]);
    let cli = |args: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_keywarden"))
            .arg("--api")
            .arg(&d.api)
            .args(args)
            .env("KEYWARDEN_API_ADMIN_TOKEN_FILE", d.dir.path().join("admin.token"))
            .output()
            .unwrap()
    };
    let token_file = d.dir.path().join("cli-db.dek-token");
    let token_arg = token_file.to_str().unwrap().to_string();
    let out = cli(&["--output", "json", "key", "create", "cli-key"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["key_id"], "cli-key");
    let out = cli(&["--output", "json", "instance", "create", "cli-db", "--key", "cli-key"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let created: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("shown this once"), "{}", String::from_utf8_lossy(&out.stderr));
    std::fs::write(&token_file, format!("{}\n", created["dek_token"].as_str().expect("instance create prints the dek_token"))).unwrap();
    // Without the instance's token the CLI says what it needs, in one line.
    let out = cli(&["instance", "dek", "cli-db"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--token-file") && err.trim().lines().count() == 1, "{err}");
    let out = cli(&["--output", "json", "instance", "dek", "cli-db", "--token-file", &token_arg]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    // A new credential: the old token file stops working, the new one works.
    let out = cli(&["--output", "json", "instance", "credential", "cli-db"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let rotated: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_ne!(rotated["dek_token"], created["dek_token"]);
    let out = cli(&["instance", "dek", "cli-db", "--token-file", &token_arg]);
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("(401)"), "{}", String::from_utf8_lossy(&out.stderr));
    std::fs::write(&token_file, rotated["dek_token"].as_str().unwrap()).unwrap();
    let out = cli(&["key", "disable", "cli-key"]);
    assert!(out.status.success());
    d.wait_state("cli-db", "revoked");
    let out = cli(&["instance", "dek", "cli-db", "--token-file", &token_arg]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(err.contains("revoked") && err.contains("423"), "{err}");
    let out = cli(&["instance", "list", "--key", "cli-key"]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("cli-db\trevoked"));
    let out =
        std::process::Command::new(env!("CARGO_BIN_EXE_keywarden")).args(["--api", "http://127.0.0.1:1", "--token", "t", "key", "show", "x"]).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot reach"));
}

#[test]
fn an_event_from_a_third_party_kafka_client_is_applied() {
    let broker = Broker::start();
    let d = Daemon::start(&broker.bootstrap, &[]);
    d.create_key("py-key");
    d.create_instance("py-db", "py-key");
    let script = r#"
import base64, hashlib, hmac, json, sys
from confluent_kafka import Producer
p = Producer({"bootstrap.servers": sys.argv[1]})
ev = {"event_id": "py-1", "type": "disable", "key_id": "py-key", "occurred_at": sys.argv[3], "source": "confluent-kafka"}
body = json.dumps(ev).encode()
sig = base64.b64encode(hmac.new(sys.argv[2].encode(), body, hashlib.sha256).digest()).decode()
p.produce("key-lifecycle", key="py-key", value=body, headers=[("keywarden-signature", "kid=local;sig=" + sig)])
left = p.flush(30)
sys.exit(1 if left else 0)
"#;
    let out = std::process::Command::new("python3").args(["-c", script, &broker.bootstrap, TEST_EVENT_SECRET, &soon(0)]).output().expect("python3");
    assert!(out.status.success(), "confluent-kafka producer failed (pip install confluent-kafka): {}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(d.wait_event("py-1")["outcome"], "applied");
    d.wait_state("py-db", "revoked");
}

#[test]
fn graceful_shutdown_exits_zero_and_state_survives_restart() {
    let broker = Broker::start();
    let mut d = Daemon::start(&broker.bootstrap, &[]);
    d.create_key("k8");
    d.create_instance("i8", "k8");
    let dek = d.dek("i8").1["dek"].clone();
    d.act("k8", "rotate");
    d.wait_rotated("k8", "2");
    assert_eq!(d.terminate(), Some(0));
    // A new process on the same store and master key serves the same DEK.
    let store_env = d.dir.path().join("store");
    let key_env = d.dir.path().join("master.key");
    let d3 = Daemon::start(
        &broker.bootstrap,
        &[("KEYWARDEN_STORE_PATH", store_env.to_str().unwrap()), ("KEYWARDEN_KMS_LOCAL_MASTER_KEY_FILE", key_env.to_str().unwrap())],
    );
    assert_eq!(d3.dek("i8").1["dek"], dek);
    assert_eq!(d3.get("/v1/instances/i8").1["key_version"], "2");
}

#[test]
fn the_api_takes_the_right_token_for_each_door_and_says_nothing_else() {
    let broker = Broker::start();
    let d = Daemon::start(&broker.bootstrap, &[]);
    d.create_key("auth-key");
    let credential_id = d.create_instance("auth-db", "auth-key")["dek_credential_id"].as_str().unwrap().to_string();
    let dek_token = d.dek_token_for("auth-db");
    let call = |method: reqwest::Method, path: &str, token: Option<&str>| {
        let mut req = d.http.request(method, format!("{}{path}", d.api));
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        let r = req.send().unwrap();
        (r.status().as_u16(), r.text().unwrap())
    };
    use reqwest::Method;
    // No token, a wrong token, or the other door's token: 401 and nothing more.
    for (method, path, token) in [
        (Method::GET, "/v1/keys/auth-key", None),
        (Method::GET, "/v1/keys/auth-key", Some("not-the-token")),
        (Method::GET, "/v1/keys/auth-key", Some(dek_token.as_str())),
        (Method::POST, "/v1/keys/auth-key/disable", Some(dek_token.as_str())),
        (Method::POST, "/v1/instances/auth-db/credential", Some(dek_token.as_str())),
        (Method::POST, "/v1/instances/auth-db/dek", None),
        // The admin token opens no DEK.
        (Method::POST, "/v1/instances/auth-db/dek", Some(d.admin_token.as_str())),
    ] {
        let (status, body) = call(method.clone(), path, token);
        assert_eq!(status, 401, "{method} {path}");
        assert_eq!(body, r#"{"error":"unauthorized"}"#);
    }
    assert_eq!(call(Method::POST, "/v1/instances/auth-db/dek", Some(&dek_token)).0, 200);
    assert_eq!(call(Method::GET, "/v1/keys/auth-key", Some(&d.admin_token)).0, 200);
    for open in ["/healthz", "/readyz", "/metrics"] {
        assert_eq!(call(Method::GET, open, None).0, 200, "{open}");
    }
    let mode = std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(d.dir.path().join("admin.token")).unwrap().permissions());
    assert_eq!(mode & 0o777, 0o600);

    // Every write is in the audit trail with who, what and the outcome, refused
    // ones included, and the chain verifies.
    let (_, audit) = d.get("/v1/audit");
    assert_eq!(audit["chain"], "intact", "{audit}");
    let entries = audit["entries"].as_array().unwrap();
    let find = |what: &str| entries.iter().find(|e| e["what"] == what).cloned();
    let created = find("POST /v1/instances").expect("instance creation audited");
    assert_eq!(created["who"], "admin");
    assert_eq!(created["outcome"], "201");
    let refused = find("POST /v1/keys/auth-key/disable").expect("refused write audited");
    assert_eq!(refused["outcome"], "401");
    assert_eq!(refused["who"], "anonymous");
    // The DEK served above is in the trail too, committed behind its answer:
    // which instance, under which key version, never the DEK.
    let release = wait_until("the DEK release audited", Duration::from_secs(10), || {
        let (_, audit) = d.get("/v1/audit?limit=1000");
        releases(audit["entries"].as_array()?).into_iter().find(|r| r["instance_id"] == "auth-db")
    });
    assert_eq!(release["who"], "dek");
    assert_eq!(release["outcome"], "200");
    assert_eq!(release["key_id"], "auth-key");
    assert_eq!(release["key_version"], "1", "{release}");
    assert_eq!(release["opened_by"], format!("dek credential {credential_id}"), "{release}");
    assert!(release["at"].as_str().is_some_and(|at| at.parse::<chrono::DateTime<chrono::Utc>>().is_ok()), "{release}");
}

/// What a DEK request answers, all of it: a refusal must not tell an unknown
/// instance from a known one by its status, body or headers.
fn dek_answer(d: &Daemon, id: &str, token: &str) -> (u16, String, Option<String>) {
    let r = d.http.post(format!("{}/v1/instances/{id}/dek", d.api)).bearer_auth(token).send().unwrap();
    let www = r.headers().get("www-authenticate").and_then(|v| v.to_str().ok()).map(str::to_string);
    (r.status().as_u16(), r.text().unwrap(), www)
}

#[test]
fn an_instance_credential_opens_that_instance_only_and_a_rotation_retires_it_at_once() {
    let broker = Broker::start();
    let d = Daemon::start(&broker.bootstrap, &[]);
    d.create_key("cred-key");
    let a = d.create_instance("cred-a", "cred-key");
    let b = d.create_instance("cred-b", "cred-key");
    let (token_a, token_b) = (a["dek_token"].as_str().unwrap().to_string(), b["dek_token"].as_str().unwrap().to_string());
    assert_ne!(token_a, token_b);
    assert!(token_a.len() >= 43, "at least 256 bits: {}", token_a.len());
    let id_a = a["dek_credential_id"].as_str().unwrap().to_string();
    // The token is said once: reading the instance back does not say it.
    let (_, shown) = d.get("/v1/instances/cred-a");
    assert_eq!(shown["dek_credential_id"], id_a.as_str());
    assert!(!shown.to_string().contains(&token_a), "{shown}");

    assert_eq!(dek_answer(&d, "cred-a", &token_a).0, 200);
    let refused = dek_answer(&d, "cred-b", &token_a);
    assert_eq!(refused.0, 401, "A's credential does not open B");
    assert_eq!(refused, dek_answer(&d, "no-such-instance", &token_a), "another instance and an unknown one get the same answer");
    assert_eq!(dek_answer(&d, "cred-b", &token_b).0, 200);

    // Rotation: admin only; the new token works at once and the old one no more.
    assert_eq!(d.post("/v1/instances/no-such-instance/credential", None).0, 404);
    let (s, rotated) = d.post("/v1/instances/cred-a/credential", None);
    assert_eq!(s, 200, "{rotated}");
    let (new_a, new_id) = (rotated["dek_token"].as_str().unwrap().to_string(), rotated["dek_credential_id"].as_str().unwrap().to_string());
    assert_ne!(new_a, token_a);
    assert_ne!(new_id, id_a);
    assert_eq!(dek_answer(&d, "cred-a", &token_a), refused, "the old credential is refused, as any wrong one");
    assert_eq!(dek_answer(&d, "cred-a", &new_a).0, 200);
    assert_eq!(dek_answer(&d, "cred-b", &token_b).0, 200, "B's credential is untouched");

    // The releases name the credential that opened them; the rotation is audited; no token is in the trail.
    let trail = wait_until("both of A's credentials in the release audit", Duration::from_secs(10), || {
        let text = d.http.get(format!("{}/v1/audit/export", d.api)).bearer_auth(&d.admin_token).send().ok()?.text().ok()?;
        let entries: Vec<serde_json::Value> = text.lines().map(serde_json::from_str).collect::<Result<_, _>>().ok()?;
        let released = releases(&entries);
        let opened = |id: &str| released.iter().any(|r| r["instance_id"] == "cred-a" && r["opened_by"] == format!("dek credential {id}"));
        (opened(&id_a) && opened(&new_id)).then_some(text)
    });
    let rotation = trail.lines().find(|l| l.contains("dek credential rotated")).expect("the rotation is audited");
    assert!(rotation.contains(&format!("dek credential {new_id} replaces {id_a}")), "{rotation}");
    assert!(trail.lines().any(|l| l.contains(r#""what":"POST /v1/instances/cred-a/credential""#) && l.contains(r#""who":"admin""#)));
    for token in [&token_a, &token_b, &new_a] {
        assert!(!trail.contains(token.as_str()), "a dek_token is in the audit trail");
    }
    // Nor in the log.
    let log = std::fs::read_to_string(d.dir.path().join("keywarden.log")).unwrap();
    assert!(!log.contains(&token_a) && !log.contains(&new_a), "a dek_token is in the log");
    // Without api.shared_dek_token no shared token file is read or made.
    assert!(!d.dir.path().join("dek.token").exists());
}

#[test]
fn the_shared_dek_token_opens_every_instance_only_when_opted_in() {
    let broker = Broker::start();
    let d = Daemon::start(&broker.bootstrap, &[("KEYWARDEN_API_SHARED_DEK_TOKEN", "true")]);
    let shared = d.shared_dek_token.clone().expect("the shared token file was created");
    d.create_key("legacy-key");
    d.create_instance("legacy-a", "legacy-key");
    d.create_instance("legacy-b", "legacy-key");
    for id in ["legacy-a", "legacy-b"] {
        assert_eq!(dek_answer(&d, id, &shared).0, 200, "{id}");
    }
    // The instances' own credentials still open only their own.
    assert_eq!(dek_answer(&d, "legacy-b", &d.dek_token_for("legacy-a")).0, 401);
    assert_eq!(dek_answer(&d, "no-such-instance", &shared).0, 401);
    let release = wait_until("a release by the shared token audited", Duration::from_secs(10), || {
        let (_, audit) = d.get("/v1/audit?limit=1000");
        let released = releases(audit["entries"].as_array()?);
        let by_shared: Vec<&serde_json::Value> = released.iter().filter(|r| r["opened_by"] == "shared dek token").collect();
        (by_shared.len() == 2).then(|| by_shared.iter().map(|r| r["instance_id"].as_str().unwrap_or_default().to_string()).collect::<Vec<_>>())
    });
    assert_eq!(release, ["legacy-a", "legacy-b"], "each release by the shared token audited, in order");
}
