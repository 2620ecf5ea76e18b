//! The Key Protect provider against a contract server that follows IBM's published
//! API: IAM token exchange (https://cloud.ibm.com/docs/account?topic=account-iamtoken_from_apikey),
//! key actions (https://cloud.ibm.com/docs/key-protect?topic=key-protect-wrap-keys,
//! -unwrap-keys, -rewrap-keys), key metadata and states (-key-states) and the
//! error envelope (-error-messages). Key Protect cannot be installed here.

#[path = "common/keyprotect_double.rs"]
mod keyprotect_double;

mod common;

use std::sync::atomic::Ordering;
use std::time::Duration;

use common::*;
use keyprotect_double::{KeyProtectDouble, API_KEY, SERVICE_API_KEY};
use serde_json::json;

/// The resource CRN template keywarden registers instances under.
const RESOURCE_CRN: &str = "crn:v1:bluemix:public:databases-for-mysql:{region}:a/acct:dbaas-instance:deployment:{instance_id}";

/// A daemon whose CRN-named keys go to the doubles (one per region, through
/// the `endpoints` override table), with the customer's and the onboarded
/// service's credentials and `extra` appended to its config; the returned
/// directory holds the config and the API key files (`ibm-api-key`,
/// `ibm-service-api-key`).
fn daemon_on_key_protect(broker: &Broker, doubles: &[&KeyProtectDouble], extra: &str) -> (Daemon, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let api_key = dir.path().join("ibm-api-key");
    std::fs::write(&api_key, format!("{API_KEY}\n")).unwrap();
    let service_key = dir.path().join("ibm-service-api-key");
    std::fs::write(&service_key, format!("{SERVICE_API_KEY}\n")).unwrap();
    let endpoints: Vec<String> = doubles.iter().map(|d| format!("\"{}\" = \"{}\"", d.kp.region, d.url)).collect();
    let config = dir.path().join("keywarden.toml");
    std::fs::write(
        &config,
        format!(
            "[kms]\nroutes = [{{ prefix = \"crn:v1:\", provider = \"keyprotect\" }}]\n[kms.keyprotect]\nendpoint = \"http://127.0.0.1:9/{{region}}\"\nendpoints = {{ {} }}\niam_endpoint = \"{}\"\napi_key_file = \"{}\"\nservice_api_key_file = \"{}\"\nresource_crn_template = \"{RESOURCE_CRN}\"\n{extra}",
            endpoints.join(", "),
            doubles[0].url,
            api_key.display(),
            service_key.display()
        ),
    )
    .unwrap();
    (Daemon::start(&broker.bootstrap, &[("KEYWARDEN_CONFIG", config.to_str().unwrap())]), dir)
}

/// The resource CRN an instance is registered under, as Key Protect sees it.
fn registered(region: &str, instance: &str) -> String {
    RESOURCE_CRN.replace("{region}", region).replace("{instance_id}", instance)
}

/// Key Protect's event ids go with its events; keywarden answers each with
/// event_ack under the onboarded service's credential, and the double accepts
/// only ids it issued. A native event carrying one stands in for the
/// notification Key Protect sends.
#[test]
fn key_protect_lifecycle_with_token_refresh_throttling_and_state_checks() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let kp = KeyProtectDouble::start(&rt, "us-south");
    *kp.kp.token_lifetime.lock().unwrap() = Duration::from_secs(3);
    let key = "0e4b9d1c-root-key";
    kp.add_key(key);
    let crn = kp.crn(key);

    let broker = Broker::start();
    let (d, dir) = daemon_on_key_protect(&broker, &[&kp], "");
    let api_key = dir.path().join("ibm-api-key");
    let enc = crn.replace('/', "%2F");

    let ids: Vec<String> = (0..30).map(|i| format!("kp-{i}")).collect();
    for id in &ids {
        let (s, v) = d.post("/v1/instances", Some(json!({"instance_id": id, "key_id": crn})));
        assert_eq!(s, 201, "{v}");
    }
    let deks: Vec<String> = ids.iter().map(|id| d.dek(id).1["dek"].as_str().unwrap().to_string()).collect();

    // Rotation, through throttling and a burst of 503s, after the token expired.
    std::thread::sleep(Duration::from_secs(3));
    let (v2, rotated) = kp.rotate(key);
    kp.kp.throttle_next.store(5, Ordering::SeqCst);
    kp.kp.fail_next.store(5, Ordering::SeqCst);
    let p = producer(&broker.bootstrap);
    produce(&p, "key-lifecycle", Some(&crn), &event(&rotated, "rotate", &crn, Some(&v2), &soon(1)));
    let k = d.wait_rotated(&enc, &v2);
    assert_eq!(k["kms"]["provider"], "keyprotect", "{k}");
    for (i, id) in ids.iter().enumerate() {
        let (s, v) = d.dek(id);
        assert_eq!(s, 200, "{v}");
        assert_eq!(v["dek"].as_str().unwrap(), deks[i]);
        assert_eq!(v["key_version"], v2.as_str());
    }
    assert!(kp.kp.exchanges.load(Ordering::SeqCst) >= 2, "the IAM token was refreshed");

    // A rotation while Key Protect reports the key suspended waits: rewrap only in 1 or 3.
    let (v3, rotated3) = kp.rotate(key);
    kp.set_state(key, 2, "disable");
    let before = kp.kp.rewraps.load(Ordering::SeqCst);
    produce(&p, "key-lifecycle", Some(&crn), &event(&rotated3, "rotate", &crn, Some(&v3), &soon(2)));
    d.wait_event(&rotated3);
    // The marker: the rotation asked Key Protect and decided to wait.
    wait_until("the rotation to wait for the key", Duration::from_secs(30), || {
        d.log().contains("kms reports the key not active; rotation waits").then_some(())
    });
    assert_eq!(kp.kp.rewraps.load(Ordering::SeqCst), before, "no rewrap against a suspended key");
    kp.set_state(key, 1, "enable");
    d.wait_rotated(&enc, &v3);
    // Registrations follow the instances and their key versions, under the
    // resource CRN of the template (updates need an active key).
    wait_until("registrations updated to the newest version", Duration::from_secs(30), || {
        let regs = kp.kp.registrations.lock().unwrap();
        (regs.len() == ids.len() && regs.values().all(|v| v.as_deref() == Some(v3.as_str()))).then_some(())
    });
    assert!(kp.kp.registrations.lock().unwrap().contains_key(&(key.to_string(), registered("us-south", "kp-0"))));

    // Disable, enable, delete and restore, with the KMS's state following the customer.
    let disabled = kp.set_state(key, 2, "disable");
    produce(&p, "key-lifecycle", Some(&crn), &event(&disabled, "disable", &crn, None, &soon(3)));
    d.wait_state("kp-0", "revoked");
    assert_eq!(d.dek("kp-0").0, 423);
    let enabled = kp.set_state(key, 1, "enable");
    produce(&p, "key-lifecycle", Some(&crn), &event(&enabled, "enable", &crn, None, &soon(4)));
    d.wait_state("kp-0", "active");
    assert_eq!(d.dek("kp-0").1["dek"].as_str().unwrap(), deks[0], "a real unwrap after the cache was dropped");
    let deleted = kp.set_state(key, 5, "delete");
    produce(&p, "key-lifecycle", Some(&crn), &event(&deleted, "delete", &crn, None, &soon(5)));
    d.wait_state("kp-1", "erased");
    assert_eq!(d.dek("kp-1").0, 410);
    let restored = kp.set_state(key, 1, "restore");
    produce(&p, "key-lifecycle", Some(&crn), &event(&restored, "restore", &crn, None, &soon(6)));
    d.wait_state("kp-1", "active");
    assert_eq!(d.dek("kp-1").1["dek"].as_str().unwrap(), deks[1]);

    // Every event was acknowledged under Key Protect's own event id, with the
    // adopter's state, and only by the service credential (the double refuses
    // event_ack and registrations to any other, and ids it did not issue).
    let (s, _) = d.delete("/v1/instances/kp-29");
    assert_eq!(s, 204);
    wait_until("the deleted instance deregistered", Duration::from_secs(30), || (kp.kp.registrations.lock().unwrap().len() == ids.len() - 1).then_some(()));
    let ack_of = |id: &str| wait_until(&format!("ack of {id}"), Duration::from_secs(30), || kp.acks().into_iter().find(|a| a["eventId"] == id));
    let r = ack_of(&rotated);
    assert_eq!(r["adopterKeyState"], "DEK_ENABLED");
    assert_eq!(r["keyStateData"]["rewrappedKeyVersion"], v2.as_str(), "{r}");
    assert_eq!(ack_of(&disabled)["adopterKeyState"], "DEK_DISABLED");
    assert_eq!(ack_of(&enabled)["adopterKeyState"], "DEK_ENABLED");
    assert_eq!(ack_of(&deleted)["adopterKeyState"], "DEK_DELETED");
    assert_eq!(ack_of(&restored)["adopterKeyState"], "DEK_ENABLED");
    assert!(kp.refusals().iter().all(|r| !r.contains("event_ack") && !r.contains("registrations")), "{:?}", kp.refusals());

    // Sync: 409 for an hour after any lifecycle action (sync-resources.md);
    // a key untouched for an hour syncs once.
    let (s, v) = d.post(&format!("/v1/keys/{enc}/sync"), None);
    assert_eq!(s, 409, "{v}");
    assert!(v["error"].as_str().unwrap().contains("once an hour"), "{v}");
    let quiet = "quiet-root-key";
    kp.add_key(quiet);
    d.create_instance("kp-quiet", &kp.crn(quiet));
    let quiet_enc = kp.crn(quiet).replace('/', "%2F");
    assert_eq!(d.post(&format!("/v1/keys/{quiet_enc}/sync"), None).0, 202);
    assert_eq!(d.post(&format!("/v1/keys/{quiet_enc}/sync"), None).0, 409);

    // Errors name the provider and what to check.
    let (s, v) = d.post("/v1/instances", Some(json!({"instance_id": "kp-x", "key_id": kp.crn("missing")})));
    assert_eq!(s, 404, "{v}");
    std::fs::write(&api_key, "revoked-key\n").unwrap();
    kp.revoke_tokens();
    let (s, v) = d.post("/v1/instances", Some(json!({"instance_id": "kp-y", "key_id": crn})));
    assert_eq!(s, 502, "{v}");
    assert!(v["error"].as_str().unwrap().contains("IAM API key rejected") && v["error"].as_str().unwrap().contains("kms.keyprotect.api_key_file"), "{v}");
    drop(rt);
}

/// An Activity Tracker record of a Key Protect call, as IBM Cloud routes it:
/// CADF, unsigned.
fn at_record(id: &str, action: &str, crn: &str, at: &str) -> Vec<u8> {
    serde_json::to_vec(&json!({
        "id": id, "action": action, "outcome": "success", "eventTime": at, "correlationId": format!("corr-{id}"),
        "initiator": {"id": "IBMid-550006NJ23", "typeURI": "service/security/account/user"},
        "target": {"id": crn, "typeURI": "kms/secrets"}, "observer": {"name": "ActivityTracker"}, "eventType": "activity"
    }))
    .unwrap()
}

/// Activity Tracker records cannot be signed, so anyone who can produce to the
/// topic could write one. Each is a hint Key Protect must confirm: produced
/// by kafka-python, a disable while the key is active changes nothing; once
/// Key Protect reports the key suspended the same claim revokes. An enable, a
/// delete and a restore each wait for the state they claim; a rotation goes to
/// the version Key Protect reports, not to one the record names. While Key
/// Protect answers 503, a disable still revokes and an enable waits.
#[test]
fn activity_tracker_records_are_hints_that_key_protect_must_confirm() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let kp = KeyProtectDouble::start(&rt, "us-south");
    let key = "5c1f0e2a-hinted-key";
    let v1 = kp.add_key(key);
    let crn = kp.crn(key);
    let broker = Broker::start();
    let (d, _config) = daemon_on_key_protect(&broker, &[&kp], "[signatures]\nhint_topics = [\"key-lifecycle\"]\n");
    let enc = crn.replace('/', "%2F");
    d.create_instance("at-db", &crn);
    let dek = d.dek("at-db").1["dek"].as_str().unwrap().to_string();
    let mut dlq = TopicReader::new(&broker.bootstrap, "key-lifecycle.dlq");
    let send = |id: &str, action: &str, secs: i64| produce_as_outsider(&broker.bootstrap, "key-lifecycle", &crn, &at_record(id, action, &crn, &soon(secs)));

    send("at-1", "kms.secrets.disable", 1);
    let reason = wait_dead_letter(&mut dlq, "at-1");
    assert!(reason.contains("reports it active"), "{reason}");
    assert_eq!(d.dek("at-db").0, 200, "a disable Key Protect does not confirm changes nothing");

    kp.set_state(key, 2, "disable");
    send("at-2", "kms.secrets.disable", 2);
    d.wait_state("at-db", "revoked");
    assert_eq!(d.wait_event("at:at-2")["correlation_id"], "corr-at-2");
    send("at-3", "kms.secrets.enable", 3);
    assert!(wait_dead_letter(&mut dlq, "at-3").contains("reports it disabled"));
    kp.set_state(key, 1, "enable");
    send("at-4", "kms.secrets.enable", 4);
    d.wait_state("at-db", "active");

    send("at-5", "kms.secrets.delete", 5);
    assert!(wait_dead_letter(&mut dlq, "at-5").contains("claims the key deleted"));
    kp.set_state(key, 5, "delete");
    send("at-6", "kms.secrets.delete", 6);
    d.wait_state("at-db", "erased");
    send("at-7", "kms.secrets.restore", 7);
    assert!(wait_dead_letter(&mut dlq, "at-7").contains("claims the key restored"));
    kp.set_state(key, 1, "restore");
    send("at-8", "kms.secrets.restore", 8);
    d.wait_state("at-db", "active");
    assert_eq!(d.dek("at-db").1["dek"].as_str().unwrap(), dek);

    // A rotation record names no version that keywarden believes: it rotates
    // to the one Key Protect reports. With none newer, it changes nothing.
    send("at-9", "kms.secrets.rotate", 9);
    assert!(wait_dead_letter(&mut dlq, "at-9").contains(&format!("at version {v1}, which keywarden already holds")));
    let (v2, _) = kp.rotate(key);
    send("at-10", "kms.secrets.rotate", 10);
    d.wait_rotated(&enc, &v2);
    assert_eq!(d.dek("at-db").1["key_version"], v2.as_str());

    // Key Protect answers 503 to everything: a disable is applied, an enable waits.
    kp.kp.fail_next.store(usize::MAX / 2, Ordering::SeqCst);
    send("at-11", "kms.secrets.disable", 11);
    d.wait_state("at-db", "revoked");
    send("at-12", "kms.secrets.enable", 12);
    assert!(wait_dead_letter(&mut dlq, "at-12").contains("waits for the kms"));
    assert_eq!(d.state("at-db"), "revoked");
    assert_eq!(security_events(&d, "hint_contradicted"), 5, "at-1, at-3, at-5, at-7 and at-9; the unanswered at-12 is not one");

    // Expire and acknowledgement records are noted, not dead-lettered; a
    // purge record is believed once Key Protect answers 404 for the key, and
    // destroys the DEKs. The restore after it is the positive marker that the
    // two records before it were read and none was dead-lettered.
    kp.kp.fail_next.store(0, Ordering::SeqCst);
    send("at-13", "kms.secrets.expire", 13);
    send("at-14", "kms.secrets.ack-disable", 14);
    kp.set_state(key, 5, "delete");
    kp.purge(key);
    send("at-15", "kms.secrets.purge", 15);
    d.wait_state("at-db", "destroyed");
    assert_eq!(d.dek("at-db").0, 410);
    send("at-16", "kms.secrets.restore", 16);
    wait_dead_letter(&mut dlq, "at-16");
    let dead: Vec<String> = dlq.seen.iter().filter_map(|m| m.header("keywarden.reason")).map(str::to_owned).collect();
    assert!(dead.iter().all(|r| !r.contains("at-13") && !r.contains("at-14") && !r.contains("kms.secrets.expire")), "{dead:#?}");
    assert!(d.log().contains("kms.secrets.expire for crn:") && d.log().contains("record noted; nothing to apply"));
    // None of these ids is Key Protect's: nothing was acknowledged.
    assert!(kp.acks().is_empty(), "{:?}", kp.acks());
    drop(rt);
}

/// IBM's key-states table: an expired key (Deactivated, 3) still unwraps and
/// rewraps. Reconciliation reads it, serves its DEKs, rotates under it and
/// raises a warning naming it, and revokes nothing. A key deleted and then
/// purged while its events were lost answers 404 to everything
/// (delete-purge-keys.md): reconciliation marks its instances destroyed, with
/// an audit entry each and an alert, never "unreachable". Both hold after a
/// restart.
#[test]
fn an_expired_key_keeps_serving_and_a_purged_key_destroys_its_instances() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let kp = KeyProtectDouble::start(&rt, "us-south");
    let (expiring, doomed) = ("expiring-root-key", "doomed-root-key");
    kp.add_key(expiring);
    kp.add_key(doomed);
    let broker = Broker::start();
    let (mut d, _config) = daemon_on_key_protect(&broker, &[&kp], "[reconcile]\nschedule = \"\"\n");
    for i in 0..2 {
        d.create_instance(&format!("exp-{i}"), &kp.crn(expiring));
        d.create_instance(&format!("gone-{i}"), &kp.crn(doomed));
    }
    let dek = d.dek("exp-0").1["dek"].as_str().unwrap().to_string();

    kp.expire(expiring);
    kp.set_state(doomed, 5, "delete");
    kp.purge(doomed);
    let (s, report) = d.post("/v1/reconcile", None);
    assert_eq!(s, 200, "{report}");
    println!("reconciliation over an expired and a purged key: {report}");
    assert_eq!(report["expired"], json!([kp.crn(expiring)]), "{report}");
    assert!(report["unreachable"].as_array().unwrap().is_empty(), "a purged key is not unreachable: {report}");
    let corrections = report["corrections"].as_array().unwrap();
    assert_eq!(corrections.len(), 1, "nothing corrected for the expired key: {report}");
    assert_eq!((corrections[0]["key_id"].as_str(), corrections[0]["material_destroyed"].as_bool()), (Some(kp.crn(doomed).as_str()), Some(true)));
    let crn = kp.crn(expiring);
    assert!(d.log().lines().any(|l| l.contains("the kms reports the key expired") && l.contains(&crn)), "the warning names the key");

    d.wait_state("gone-0", "destroyed");
    let check = |d: &Daemon| {
        for i in 0..2 {
            assert_eq!(d.state(&format!("exp-{i}")), "active", "an expired key revokes nothing");
            assert_eq!(d.state(&format!("gone-{i}")), "destroyed");
            let (s, v) = d.dek(&format!("gone-{i}"));
            assert_eq!(s, 410, "{v}");
        }
        let (s, v) = d.dek("exp-0");
        assert_eq!((s, v["dek"].as_str()), (200, Some(dek.as_str())), "{v}");
    };
    check(&d);
    let (_, audit) = d.get("/v1/audit?limit=200");
    let destroyed: Vec<_> = audit["entries"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["what"] == "purge" && e["outcome"] == "destroyed" && e["key_id"] == kp.crn(doomed).as_str())
        .collect();
    assert_eq!(destroyed.len(), 2, "one audit entry per destroyed instance: {audit}");
    assert!(d.log().contains("was purged: the KMS no longer knows it"), "the drift alert says the key was purged");

    // A rotation of the expired key rewraps (allowed in state 3); a new
    // instance cannot be created under it (wrap is not).
    let (v2, rotated) = kp.rotate(expiring);
    let p = producer(&broker.bootstrap);
    produce(&p, "key-lifecycle", Some(&kp.crn(expiring)), &event(&rotated, "rotate", &kp.crn(expiring), Some(&v2), &soon(1)));
    d.wait_rotated(&kp.crn(expiring).replace('/', "%2F"), &v2);
    assert_eq!(d.dek("exp-1").1["key_version"], v2.as_str());
    let (s, v) = d.post("/v1/instances", Some(json!({"instance_id": "exp-new", "key_id": kp.crn(expiring)})));
    assert_eq!(s, 409, "{v}");
    assert!(v["error"].as_str().unwrap().contains("passed its expiration date"), "{v}");

    d.terminate();
    d.restart();
    check(&d);
    // A second run changes nothing: the purged key is done, the expired one still served.
    let (_, again) = d.post("/v1/reconcile", None);
    assert!(again["corrections"].as_array().unwrap().is_empty(), "{again}");
    drop(rt);
}

/// IBM's cheat sheet: keys from any region. Each key goes to its CRN's
/// region's endpoint (two doubles, one per region, through the override
/// table); a key of a region with no endpoint reachable is not sent to another.
#[test]
fn keys_in_two_regions_are_each_served_by_their_region() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let dallas = KeyProtectDouble::start(&rt, "us-south");
    let frankfurt = KeyProtectDouble::start_sharing_iam(&rt, "eu-de", &dallas);
    dallas.add_key("dallas-key");
    frankfurt.add_key("frankfurt-key");
    let broker = Broker::start();
    let (d, _config) = daemon_on_key_protect(&broker, &[&dallas, &frankfurt], "");
    d.create_instance("us-db", &dallas.crn("dallas-key"));
    d.create_instance("eu-db", &frankfurt.crn("frankfurt-key"));
    assert_eq!(d.dek("us-db").0, 200);
    assert_eq!(d.dek("eu-db").0, 200);

    let (v2, rotated) = frankfurt.rotate("frankfurt-key");
    let crn = frankfurt.crn("frankfurt-key");
    produce(&producer(&broker.bootstrap), "key-lifecycle", Some(&crn), &event(&rotated, "rotate", &crn, Some(&v2), &soon(1)));
    d.wait_rotated(&crn.replace('/', "%2F"), &v2);
    assert_eq!(frankfurt.kp.rewraps.load(Ordering::SeqCst), 1);
    assert_eq!(dallas.kp.rewraps.load(Ordering::SeqCst), 0);
    let ack = wait_until("the rotation's ack in eu-de", Duration::from_secs(30), || frankfurt.acks().into_iter().find(|a| a["eventId"] == rotated.as_str()));
    assert_eq!(ack["keyStateData"]["rewrappedKeyVersion"], v2.as_str());
    assert!(frankfurt.kp.registrations.lock().unwrap().contains_key(&("frankfurt-key".to_string(), registered("eu-de", "eu-db"))));
    assert!(dallas.acks().is_empty() && dallas.refusals().is_empty(), "nothing of eu-de went to us-south: {:?}", dallas.refusals());

    // jp-tok has no endpoint in the table and the template's is unreachable.
    let tokyo = "crn:v1:bluemix:public:kms:jp-tok:a/acct:7d2a5c47-instance:key:tokyo-key";
    let (s, v) = d.post("/v1/instances", Some(json!({"instance_id": "jp-db", "key_id": tokyo})));
    assert_eq!(s, 503, "{v}");
    assert!(v["error"].as_str().unwrap().contains("127.0.0.1:9"), "{v}");
    drop(rt);
}

/// Key Protect's AAD strings are at most 255 characters, and the instance id
/// is the AAD: a longer one is refused at creation, saying why. A
/// registration refused as not service-to-service is an alert naming the
/// setting, never a silent drop; without a service credential `check-config`
/// says registrations and acknowledgements are off.
#[test]
fn instance_ids_fit_the_aad_limit_and_a_refused_registration_alerts() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let kp = KeyProtectDouble::start(&rt, "us-south");
    kp.add_key("aad-key");
    let broker = Broker::start();
    let (d, config) = daemon_on_key_protect(&broker, &[&kp], "");
    let (s, v) = d.post("/v1/instances", Some(json!({"instance_id": "i".repeat(256), "key_id": kp.crn("aad-key")})));
    assert_eq!(s, 400, "{v}");
    assert!(v["error"].as_str().unwrap().contains("at most 255"), "{v}");
    let (s, v) = d.post("/v1/instances", Some(json!({"instance_id": "i".repeat(255), "key_id": kp.crn("aad-key")})));
    assert_eq!(s, 201, "{v}");
    assert_eq!(d.dek(&"i".repeat(255)).0, 200);

    // The customer's API key where the service's belongs: Key Protect answers SERVICE_ONLY_ERR.
    std::fs::write(config.path().join("ibm-service-api-key"), format!("{API_KEY}\n")).unwrap();
    kp.revoke_tokens();
    d.create_instance("refused-db", &kp.crn("aad-key"));
    let line = wait_until("the refused registration's alert", Duration::from_secs(30), || {
        d.log().lines().find(|l| l.contains("kms refused a notice; dropping it and alerting") && l.contains("refused-db")).map(str::to_owned)
    });
    assert!(line.contains("SERVICE_ONLY") || line.contains("service_api_key_file"), "{line}");
    assert!(kp.refusals().iter().any(|r| r.contains("registrations") && r.contains("403")), "{:?}", kp.refusals());

    let bare = config.path().join("no-service.toml");
    std::fs::write(
        &bare,
        format!(
            "[kms]\nroutes = [{{ prefix = \"crn:v1:\", provider = \"keyprotect\" }}]\n[kms.keyprotect]\napi_key_file = \"{}\"\n",
            config.path().join("ibm-api-key").display()
        ),
    )
    .unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_keywarden")).arg("check-config").env("KEYWARDEN_CONFIG", &bare).output().unwrap();
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{said}");
    assert!(said.contains("service_api_key_file is not set") && said.contains("acknowledges"), "{said}");
    drop(rt);
}

/// Acknowledgements go per key in parallel: while Key Protect answers one
/// key's event_ack with a burst of 429s, another key's acknowledgement still
/// arrives. The throttled one, still unsent after `ack_warn_after`, raises the
/// deadline alert and shows in the metric; once the burst ends it is sent.
#[test]
fn a_throttled_keys_acknowledgements_do_not_stall_other_keys_and_a_late_one_alerts() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let kp = KeyProtectDouble::start(&rt, "us-south");
    let (busy, calm) = ("busy-root-key", "calm-root-key");
    kp.add_key(busy);
    kp.add_key(calm);
    let broker = Broker::start();
    let (d, _config) = daemon_on_key_protect(&broker, &[&kp], "ack_warn_after = \"2s\"\n");
    d.create_instance("busy-db", &kp.crn(busy));
    d.create_instance("calm-db", &kp.crn(calm));

    *kp.kp.throttle_acks_of.lock().unwrap() = Some((busy.to_string(), usize::MAX));
    let p = producer(&broker.bootstrap);
    let busy_event = kp.set_state(busy, 2, "disable");
    produce(&p, "key-lifecycle", Some(&kp.crn(busy)), &event(&busy_event, "disable", &kp.crn(busy), None, &soon(1)));
    d.wait_state("busy-db", "revoked");
    let started = std::time::Instant::now();
    let calm_event = kp.set_state(calm, 2, "disable");
    produce(&p, "key-lifecycle", Some(&kp.crn(calm)), &event(&calm_event, "disable", &kp.crn(calm), None, &soon(2)));
    let ack = wait_until("the calm key's ack during the other's 429 burst", Duration::from_secs(30), || {
        kp.acks().into_iter().find(|a| a["eventId"] == calm_event.as_str())
    });
    println!("calm key acknowledged {:?} after its event, while the busy key's acks were throttled", started.elapsed());
    assert_eq!(ack["adopterKeyState"], "DEK_DISABLED");
    assert!(kp.acks().iter().all(|a| a["eventId"] != busy_event.as_str()), "the busy key's ack is still throttled");

    let line = wait_until("the deadline alert for the throttled ack", Duration::from_secs(30), || {
        d.log().lines().find(|l| l.contains("nears the kms's deadline") && l.contains(&busy_event)).map(str::to_owned)
    });
    assert!(line.contains(&kp.crn(busy)), "{line}");
    let metrics = d.http.get(format!("{}/metrics", d.api)).send().unwrap().text().unwrap();
    let oldest: i64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("keywarden_kms_ack_oldest_pending_seconds "))
        .and_then(|v| v.trim().parse().ok())
        .expect("the ack age metric");
    println!("oldest unsent acknowledgement: {oldest}s");
    assert!(oldest >= 2, "{oldest}");

    *kp.kp.throttle_acks_of.lock().unwrap() = None;
    let ack = wait_until("the busy key's ack after the burst", Duration::from_secs(60), || kp.acks().into_iter().find(|a| a["eventId"] == busy_event.as_str()));
    assert_eq!(ack["adopterKeyState"], "DEK_DISABLED");
    drop(rt);
}

#[test]
fn with_agents_expected_a_disable_is_acknowledged_only_once_every_database_reported_it_stopped() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let kp = KeyProtectDouble::start(&rt, "us-south");
    let key = "agents-root-key";
    kp.add_key(key);
    let broker = Broker::start();
    let (d, _config) = daemon_on_key_protect(&broker, &[&kp], "[data_plane]\nenforce_within = \"10m\"\n");
    d.create_instance("agents-db-0", &kp.crn(key));
    d.create_instance("agents-db-1", &kp.crn(key));
    let mut reader = TopicReader::new(&broker.bootstrap, "instance-commands");
    let p = producer(&broker.bootstrap);
    let kp_event = kp.set_state(key, 2, "disable");
    produce(&p, "key-lifecycle", Some(&kp.crn(key)), &event(&kp_event, "disable", &kp.crn(key), None, &soon(1)));
    d.wait_state("agents-db-0", "revoked");
    let commands = commands_of(&mut reader, "revoke", &kp_event, 2);
    const WAITS: &str = "the acknowledgement waits for every instance's data-plane agent";
    let waits = || d.log().matches(WAITS).count();
    let report = |id: &str| {
        let command = commands.iter().find(|m| m.key.as_deref() == Some(id)).unwrap().json();
        let body = json!({"command_id": command["command_id"], "cause_event_id": kp_event, "action": "revoke", "outcome": "enforced", "at": chrono::Utc::now(), "detail": "stopped"});
        let status = d.http.post(format!("{}/v1/instances/{id}/data-plane", d.api)).bearer_auth(d.dek_token_for(id)).json(&body).send().unwrap().status();
        assert_eq!(status.as_u16(), 200, "{id}'s report");
    };
    let no_ack = |when: &str| assert!(kp.acks().iter().all(|a| a["eventId"] != kp_event.as_str()), "acknowledged {when}");

    // The commands are out, yet no database has said it stopped: the ack waits.
    wait_until("the ack to wait for the agents", Duration::from_secs(30), || (waits() > 0).then_some(()));
    no_ack("before any database stopped");
    report("agents-db-0");
    let seen = waits();
    wait_until("the ack to look again after one report", Duration::from_secs(30), || (waits() > seen).then_some(()));
    no_ack("with one of two databases still running");
    report("agents-db-1");
    let ack = wait_until("the ack once both databases stopped", Duration::from_secs(30), || kp.acks().into_iter().find(|a| a["eventId"] == kp_event.as_str()));
    assert_eq!(ack["adopterKeyState"], "DEK_DISABLED");
    drop(rt);
}

/// Key Protect is told a rotation is done only once every DEK is rewrapped
/// ([rewrap], `crypto-erasure.md`): a rotation whose rewraps Key Protect
/// refused for two instances ends partial and acknowledges nothing; the
/// operator's retry, once the cause is gone, rewraps them and sends the
/// rotate event's acknowledgement, once.
#[test]
fn a_rotation_with_refused_rewraps_is_acknowledged_only_by_the_retry_that_rewraps_them() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let kp = KeyProtectDouble::start(&rt, "us-south");
    let key = "partial-root-key";
    kp.add_key(key);
    let crn = kp.crn(key);
    let enc = crn.replace('/', "%2F");
    let broker = Broker::start();
    let (d, _config) = daemon_on_key_protect(&broker, &[&kp], "");
    let ids: Vec<String> = (0..6).map(|i| format!("part-{i}")).collect();
    for id in &ids {
        d.create_instance(id, &crn);
    }
    let deks: Vec<String> = ids.iter().map(|id| d.dek(id).1["dek"].as_str().unwrap().to_string()).collect();
    let registered_now = |instance: &str| {
        wait_until(&format!("{instance} registered"), Duration::from_secs(30), || {
            kp.kp.registrations.lock().unwrap().contains_key(&(key.to_string(), registered("us-south", instance))).then_some(())
        })
    };
    let acks_of = |event: &str| kp.acks().iter().filter(|a| a["eventId"] == event).count();

    *kp.kp.refuse_rewraps_of.lock().unwrap() = vec!["part-1".into(), "part-4".into()];
    let (v2, rotated) = kp.rotate(key);
    let p = producer(&broker.bootstrap);
    produce(&p, "key-lifecycle", Some(&crn), &event(&rotated, "rotate", &crn, Some(&v2), &soon(1)));
    let k = wait_until("the rotation to end", Duration::from_secs(60), || {
        let (_, v) = d.get(&format!("/v1/keys/{enc}"));
        v["rotation"]["finished_at"].is_string().then_some(v)
    });
    assert_eq!((k["rotation"]["done"].as_u64(), k["rotation"]["failed"].as_u64(), k["pending_rewraps"].as_u64()), (Some(4), Some(2), Some(2)), "{k}");
    // The marker: the key's notices go in commit order, so once a later
    // instance's registration reached Key Protect, an acknowledgement queued
    // at the rotation's end would have gone before it.
    d.create_instance("part-late", &crn);
    registered_now("part-late");
    assert_eq!(acks_of(&rotated), 0, "a rotation that left two DEKs on the old version was acknowledged");

    // A retry before the cause is fixed fails them again: still nothing.
    let retry = |d: &Daemon| {
        let (s, v) = d.post(&format!("/v1/keys/{enc}/retry"), None);
        assert_eq!(s, 202, "{v}");
        v["event_id"].as_str().unwrap().to_string()
    };
    let first = retry(&d);
    let k = wait_until("the first retry to end", Duration::from_secs(60), || {
        let (_, v) = d.get(&format!("/v1/keys/{enc}"));
        (v["rotation"]["cause_event_id"] == first.as_str() && v["rotation"]["finished_at"].is_string()).then_some(v)
    });
    assert_eq!((k["rotation"]["failed"].as_u64(), &k["rotation"]["acknowledges"]), (Some(2), &json!([rotated])), "{k}");
    d.create_instance("part-late-2", &crn);
    registered_now("part-late-2");
    assert_eq!(acks_of(&rotated), 0, "a retry that failed the same two again acknowledged the rotation");

    kp.kp.refuse_rewraps_of.lock().unwrap().clear();
    retry(&d);
    let ack = wait_until("the rotate event's acknowledgement after the retry", Duration::from_secs(60), || {
        kp.acks().into_iter().find(|a| a["eventId"] == rotated.as_str())
    });
    assert_eq!(ack["adopterKeyState"], "DEK_ENABLED", "{ack}");
    assert_eq!(ack["keyStateData"]["rewrappedKeyVersion"], v2.as_str(), "{ack}");
    d.wait_rotated(&enc, &v2);
    for (id, dek) in ids.iter().zip(&deks) {
        let (s, v) = d.dek(id);
        assert_eq!((s, v["dek"].as_str(), v["key_version"].as_str()), (200, Some(dek.as_str()), Some(v2.as_str())), "{id}: {v}");
    }
    d.create_instance("part-later", &crn);
    registered_now("part-later");
    assert_eq!(acks_of(&rotated), 1, "acknowledged once");
    assert!(kp.refusals().iter().all(|r| !r.contains("event_ack")), "{:?}", kp.refusals());
    drop(rt);
}
