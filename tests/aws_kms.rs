//! The AWS KMS provider against a real AWS KMS API implementation (moto_server),
//! end to end through the real broker: the key lives in "AWS", keywarden only
//! holds wrapped DEKs, and every lifecycle step goes through Kafka.

mod common;

use std::process::Command;
use std::time::Duration;

use common::*;
use serde_json::json;

/// A daemon whose ARN-named keys go to moto, with `extra` appended to its
/// config file (kept alive by the returned directory) and `env` set.
fn daemon_on_aws(broker: &Broker, moto: &Moto, extra: &str, env: &[(&str, &str)]) -> (Daemon, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("keywarden.toml");
    std::fs::write(
        &config,
        format!(
            "[kms]\ndefault = \"local\"\nroutes = [{{ prefix = \"arn:aws:kms:\", provider = \"aws\" }}]\n[kms.aws]\nregion = \"us-east-1\"\nendpoint = \"{}\"\n{extra}",
            moto.url
        ),
    )
    .unwrap();
    let mut all = vec![("KEYWARDEN_CONFIG", config.to_str().unwrap()), ("AWS_ACCESS_KEY_ID", "testing"), ("AWS_SECRET_ACCESS_KEY", "testing")];
    all.extend_from_slice(env);
    (Daemon::start(&broker.bootstrap, &all), dir)
}

#[test]
fn aws_key_lifecycle_through_moto_and_the_broker() {
    let broker = Broker::start();
    let moto = Moto::start();
    let arn = moto.boto("print(kms.create_key(Description='keywarden test')['KeyMetadata']['Arn'])");
    assert!(arn.starts_with("arn:aws:kms:"), "{arn}");
    // keywarden knows the key by its ARN (that is what routes it to AWS); the
    // customer's own calls use the bare key id, which moto handles everywhere.
    let key_id = arn.rsplit('/').next().unwrap().to_string();

    let (d, _config) = daemon_on_aws(&broker, &moto, "", &[]);
    let enc = |s: &str| s.replace(':', "%3A").replace('/', "%2F");
    let ids = ["aws-a", "aws-b", "aws-c"];
    for id in ids {
        let (s, v) = d.post("/v1/instances", Some(json!({"instance_id": id, "key_id": arn})));
        assert_eq!(s, 201, "{v}");
    }
    let deks: Vec<String> = ids.iter().map(|id| d.dek(id).1["dek"].as_str().unwrap().to_string()).collect();
    let (_, key) = d.get(&format!("/v1/keys/{}", enc(&arn)));
    assert_eq!(key["kms"]["provider"], "aws", "{key}");

    let p = producer(&broker.bootstrap);
    let mut t = 0;
    let mut send = |kind: &str, version: Option<&str>| {
        t += 1;
        let id = format!("aws-ev-{t}");
        produce(&p, "key-lifecycle", Some(&arn), &event(&id, kind, &arn, version, &soon(t)));
        id
    };

    // AWS rotates key material inside the key; the rotation event makes keywarden
    // ReEncrypt every DEK, labelled with the event's version.
    moto.boto(&format!("kms.enable_key_rotation(KeyId='{key_id}')"));
    send("rotate", Some("2030-01-01"));
    d.wait_rotated(&enc(&arn), "2030-01-01");
    for (i, id) in ids.iter().enumerate() {
        let (s, v) = d.dek(id);
        assert_eq!(s, 200, "{v}");
        assert_eq!(v["dek"].as_str().unwrap(), deks[i], "ReEncrypt kept the DEK");
        assert_eq!(v["key_version"], "2030-01-01");
    }

    moto.boto(&format!("kms.disable_key(KeyId='{key_id}')"));
    send("disable", None);
    for id in ids {
        d.wait_state(id, "revoked");
        assert_eq!(d.dek(id).0, 423);
    }
    moto.boto(&format!("kms.enable_key(KeyId='{key_id}')"));
    send("enable", None);
    for (i, id) in ids.iter().enumerate() {
        d.wait_state(id, "active");
        // The plaintext cache was dropped at the disable: this is a real Decrypt.
        assert_eq!(d.dek(id).1["dek"].as_str().unwrap(), deks[i]);
    }

    moto.boto(&format!("kms.schedule_key_deletion(KeyId='{key_id}', PendingWindowInDays=7)"));
    send("delete", None);
    for id in ids {
        d.wait_state(id, "erased");
        assert_eq!(d.dek(id).0, 410);
    }
    moto.boto(&format!("kms.cancel_key_deletion(KeyId='{key_id}')\nkms.enable_key(KeyId='{key_id}')"));
    send("restore", None);
    for (i, id) in ids.iter().enumerate() {
        d.wait_state(id, "active");
        assert_eq!(d.dek(id).1["dek"].as_str().unwrap(), deks[i], "restore brings back the same DEK");
    }
}

/// AWS events are best effort. Reconciliation finds what they missed: a key
/// disabled in AWS with no event is revoked within one interval, and a change
/// that would revoke more instances than the threshold waits for an operator.
#[test]
fn reconciliation_applies_what_events_missed_and_asks_before_revoking_many() {
    let broker = Broker::start();
    let moto = Moto::start();
    let create = "print(kms.create_key(Description='keywarden reconcile')['KeyMetadata']['Arn'])";
    let (small, large) = (moto.boto(create), moto.boto(create));
    let bare = |arn: &str| arn.rsplit('/').next().unwrap().to_string();
    let (d, _config) = daemon_on_aws(&broker, &moto, "[reconcile]\nconfirm_above = 2\n", &[("KEYWARDEN_RECONCILE_SCHEDULE", "* * * * * *")]);
    d.create_instance("rc-small", &small);
    for i in 0..3 {
        d.create_instance(&format!("rc-large-{i}"), &large);
    }

    // Disabled in AWS, and the event never came.
    moto.boto(&format!("kms.disable_key(KeyId='{}')", bare(&small)));
    d.wait_state("rc-small", "revoked");
    let (_, audit) = d.get("/v1/audit?limit=200");
    let fixed = audit["entries"].as_array().unwrap().iter().find(|e| e["who"] == "schedule:reconcile" && e["key_id"] == small.as_str()).cloned();
    assert!(fixed.is_some_and(|e| e["what"] == "event disable" && e["outcome"] == "applied"), "{audit}");

    // Three instances is above the threshold of two: nothing happens until confirmed.
    moto.boto(&format!("kms.disable_key(KeyId='{}')", bare(&large)));
    // The marker: a reconciliation saw the key disabled and held back.
    wait_until("a reconciliation to hold back", Duration::from_secs(30), || {
        d.log().contains("reconciliation would revoke or erase 3 instances and waits for confirmation").then_some(())
    });
    for i in 0..3 {
        assert_eq!(d.state(&format!("rc-large-{i}")), "active", "held back for confirmation");
    }
    // The schedule runs every second: a request that meets one of its runs is
    // told so and asked to wait, and is made again.
    const RUNNING: &str = "a reconciliation is already running";
    let plan = wait_until("a reconciliation request not refused as concurrent", Duration::from_secs(30), || {
        let (_, plan) = d.post("/v1/reconcile", None);
        (!plan["error"].as_str().is_some_and(|e| e.contains(RUNNING))).then_some(plan)
    });
    assert_eq!(plan["awaiting_confirmation"], true, "{plan}");
    let confirm = wait_until("a confirmation not refused as concurrent", Duration::from_secs(30), || {
        let out = Command::new(env!("CARGO_BIN_EXE_keywarden")).args(["--api", &d.api, "--token", &d.admin_token, "reconcile", "--confirm"]).output().unwrap();
        (!String::from_utf8_lossy(&out.stderr).contains(RUNNING)).then_some(out)
    });
    assert!(confirm.status.success(), "{}", String::from_utf8_lossy(&confirm.stderr));
    for i in 0..3 {
        d.wait_state(&format!("rc-large-{i}"), "revoked");
    }

    // Enabled again in AWS: reconciliation brings the small key back too.
    moto.boto(&format!("kms.enable_key(KeyId='{}')", bare(&small)));
    d.wait_state("rc-small", "active");
}

/// A CloudTrail record as an EventBridge rule routes it: unsigned.
fn cloudtrail(id: &str, name: &str, arn: &str, at: &str) -> Vec<u8> {
    let (region, account) = {
        let parts: Vec<&str> = arn.split(':').collect();
        (parts[3].to_string(), parts[4].to_string())
    };
    serde_json::to_vec(&json!({
        "version": "0", "id": id, "detail-type": "AWS API Call via CloudTrail", "source": "aws.kms",
        "account": account, "time": at, "region": region, "resources": [arn],
        "detail": {"eventSource": "kms.amazonaws.com", "eventName": name, "requestParameters": {"keyId": arn}, "requestID": format!("req-{id}")}
    }))
    .unwrap()
}

/// EventBridge and CloudTrail events cannot be signed, so anyone who can
/// produce to the topic could write one. Each is a hint that AWS (moto) must
/// confirm: produced by kafka-python, a disable while the key is enabled in
/// AWS changes nothing, and is applied once AWS reports the key disabled; an
/// enable waits for AWS the same way. A "KMS CMK Deletion" while the key is
/// only pending deletion erases with a restore window instead of purging. With
/// AWS gone, a disable is still applied (the safe direction) unless it would
/// revoke more than `reconcile.confirm_above` instances, and an enable waits.
#[test]
fn unsigned_aws_events_are_hints_that_aws_must_confirm() {
    let broker = Broker::start();
    let mut moto = Moto::start();
    let create = "print(kms.create_key(Description='keywarden hints')['KeyMetadata']['Arn'])";
    let (one, erased, many) = (moto.boto(create), moto.boto(create), moto.boto(create));
    let bare = |arn: &str| arn.rsplit('/').next().unwrap().to_string();
    let (d, _config) = daemon_on_aws(&broker, &moto, "[signatures]\nhint_topics = [\"key-lifecycle\"]\n[reconcile]\nconfirm_above = 1\n", &[]);
    d.create_instance("hint-one", &one);
    d.create_instance("hint-erased", &erased);
    d.create_instance("hint-many-0", &many);
    d.create_instance("hint-many-1", &many);
    let dek = d.dek("hint-one").1["dek"].as_str().unwrap().to_string();
    let mut dlq = TopicReader::new(&broker.bootstrap, "key-lifecycle.dlq");
    let send =
        |id: &str, name: &str, arn: &str, secs: i64| produce_as_outsider(&broker.bootstrap, "key-lifecycle", arn, &cloudtrail(id, name, arn, &soon(secs)));

    // The key is enabled in AWS: a disable that AWS does not confirm changes nothing.
    send("h-1", "DisableKey", &one, 1);
    let reason = wait_dead_letter(&mut dlq, "h-1");
    assert!(reason.contains("claims the key disabled") && reason.contains("reports it active"), "{reason}");
    assert_eq!(security_events(&d, "hint_contradicted"), 1);
    assert_eq!(d.state("hint-one"), "active");
    assert_eq!(d.dek("hint-one").0, 200);
    assert_eq!(d.get("/v1/events/h-1").0, 404, "a contradicted hint is not even recorded as seen");

    // Disabled in AWS: the same claim is now the truth.
    moto.boto(&format!("kms.disable_key(KeyId='{}')", bare(&one)));
    send("h-2", "DisableKey", &one, 2);
    d.wait_state("hint-one", "revoked");
    assert_eq!(d.dek("hint-one").0, 423);
    assert_eq!(d.wait_event("h-2")["correlation_id"], "req-h-2");

    // An enable while AWS still reports the key disabled waits for AWS.
    send("h-3", "EnableKey", &one, 3);
    let reason = wait_dead_letter(&mut dlq, "h-3");
    assert!(reason.contains("claims the key enabled") && reason.contains("reports it disabled"), "{reason}");
    assert_eq!(d.state("hint-one"), "revoked");
    moto.boto(&format!("kms.enable_key(KeyId='{}')", bare(&one)));
    send("h-4", "EnableKey", &one, 4);
    d.wait_state("hint-one", "active");
    assert_eq!(d.dek("hint-one").1["dek"].as_str().unwrap(), dek);

    // "The material is destroyed", while AWS reports the key only pending
    // deletion: erased, with the restore window, not purged.
    moto.boto(&format!("kms.schedule_key_deletion(KeyId='{}', PendingWindowInDays=7)", bare(&erased)));
    let deletion = serde_json::to_vec(&json!({
        "version": "0", "id": "h-5", "detail-type": "KMS CMK Deletion", "source": "aws.kms", "account": erased.split(':').nth(4).unwrap(),
        "time": soon(5), "region": "us-east-1", "resources": [erased], "detail": {"key-id": bare(&erased)}
    }))
    .unwrap();
    produce_as_outsider(&broker.bootstrap, "key-lifecycle", &erased, &deletion);
    d.wait_state("hint-erased", "erased");
    assert_eq!(d.dek("hint-erased").0, 410);
    assert_eq!(d.wait_event("h-5")["type"], "delete");
    assert!(d.log().contains("erased with a restore window, not purged"), "the narrowing is logged");

    // AWS is gone. A disable is applied all the same: refusing DEKs is safe.
    moto.stop();
    send("h-6", "DisableKey", &one, 6);
    d.wait_state("hint-one", "revoked");
    // Not for more instances than confirm_above (1), though: those wait.
    send("h-7", "DisableKey", &many, 7);
    let reason = wait_dead_letter(&mut dlq, "h-7");
    assert!(reason.contains("would revoke 2 instances") && reason.contains("reconcile.confirm_above = 1"), "{reason}");
    // And an enable waits for AWS to answer.
    send("h-8", "EnableKey", &one, 8);
    let reason = wait_dead_letter(&mut dlq, "h-8");
    assert!(reason.contains("waits for the kms"), "{reason}");
    assert_eq!(d.state("hint-one"), "revoked");
    for id in ["hint-many-0", "hint-many-1"] {
        assert_eq!(d.state(id), "active", "{id}");
    }
    assert_eq!(security_events(&d, "hint_contradicted"), 2, "the two contradicted hints, and nothing that was only unanswered");
}

/// A delete dated long ago (signed, so trusted to say who sent it, not when)
/// keeps the whole restore window: it counts from when keywarden applied the
/// delete. Were it counted from the claimed date, 40 days back, the first
/// purge sweep (every second here) would purge the DEK at once.
#[test]
fn a_back_dated_delete_keeps_its_whole_restore_window() {
    let broker = Broker::start();
    let moto = Moto::start();
    let arn = moto.boto("print(kms.create_key(Description='keywarden back-dated')['KeyMetadata']['Arn'])");
    let (d, _config) = daemon_on_aws(&broker, &moto, "[policy]\npurge_after = \"8s\"\npurge_schedule = \"* * * * * *\"\n", &[]);
    d.create_instance("bd-db", &arn);
    // The customer schedules the key's deletion in AWS; the (signed) event says it happened 40 days ago.
    moto.boto(&format!("kms.schedule_key_deletion(KeyId='{}', PendingWindowInDays=7)", arn.rsplit('/').next().unwrap()));
    let p = producer(&broker.bootstrap);
    produce(&p, "key-lifecycle", Some(&arn), &event("bd-delete", "delete", &arn, None, &soon(-40 * 86_400)));
    let applied = d.wait_event("bd-delete");
    assert_eq!(applied["outcome"], "applied", "{applied}");
    d.wait_state("bd-db", "erased");
    let applied_at = chrono::DateTime::parse_from_rfc3339(applied["applied_at"].as_str().unwrap()).unwrap();
    wait_until("the purge at the end of the window", Duration::from_secs(60), || (d.state("bd-db") == "destroyed").then_some(()));
    let inst = d.get("/v1/instances/bd-db").1;
    let destroyed_at = chrono::DateTime::parse_from_rfc3339(inst["destroyed_at"].as_str().unwrap()).unwrap();
    let kept = (destroyed_at - applied_at).to_std().unwrap();
    assert!(kept >= Duration::from_secs(8), "purged {kept:?} after the delete was applied, inside the 8 s window: {inst}");
}
