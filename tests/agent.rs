//! The data-plane agent end to end: real tansu, the real keywarden daemon and
//! the real agent (`keywarden agent`), with hooks that append to files so that
//! what ran, and how often, is read back. MariaDB comes in tests/mariadb.rs.

mod common;

use std::time::{Duration, Instant};

use common::agent::{lines, sh_hook, wait_data_plane, Agent};
use common::*;
use rdkafka::producer::{BaseRecord, Producer};
use serde_json::{json, Value};

const MIN: Duration = Duration::from_secs(60);

/// Appends "<action> <command id>" to HOOK_DIR/<instance>.
const RECORD: &str = "echo \"$KEYWARDEN_ACTION $KEYWARDEN_COMMAND_ID\" >> \"$HOOK_DIR/$KEYWARDEN_INSTANCE_ID\"";

#[test]
fn a_disable_runs_each_hosted_instances_revoke_once_and_a_forged_or_resent_command_never_runs() {
    let broker = Broker::start();
    let d = Daemon::start(&broker.bootstrap, &[]);
    let (hook, received) = webhook();
    d.create_key("ag-key");
    let hosted = ["ag-0", "ag-1", "ag-2"];
    for id in hosted.iter().chain(&["ag-elsewhere"]) {
        d.create_instance(id, "ag-key");
    }
    let hooks = tempfile::tempdir().unwrap();
    let mut agent = Agent::start(
        &broker.bootstrap,
        &d,
        &hosted,
        &[sh_hook("revoke", RECORD), sh_hook("restore", RECORD), sh_hook("erase", RECORD)],
        hooks.path(),
        &format!("[[alerts]]\nkind = \"webhook\"\nurl = \"{hook}\"\n"),
    );

    let started = Instant::now();
    let disable = d.act("ag-key", "disable");
    let cause = disable["event_id"].as_str().unwrap().to_string();
    for id in hosted {
        let dp = wait_data_plane(&d, id, "revoke", "enforced");
        assert!(dp["command_id"].is_string() && dp["at"].is_string(), "{dp}");
    }
    println!("disable -> 3 revoke hooks run and reported: {} ms", started.elapsed().as_millis());

    // keywarden's own command for ag-0, sent again under the same id, as a
    // relay re-sends after a crash; to its partition, so that it is read
    // before the restore below.
    let mut reader = TopicReader::new(&broker.bootstrap, "instance-commands");
    let original = commands_of(&mut reader, "revoke", &cause, 4).into_iter().find(|m| m.key.as_deref() == Some("ag-0")).unwrap();
    let p = producer(&broker.bootstrap);
    let headers: Vec<(&str, &str)> = original.headers.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let mut owned = rdkafka::message::OwnedHeaders::new();
    for (k, v) in &headers {
        owned = owned.insert(rdkafka::message::Header { key: k, value: Some(*v) });
    }
    p.send(BaseRecord::<str, [u8]>::to("instance-commands").key("ag-0").partition(original.partition).payload(&original.payload).headers(owned))
        .map_err(|(e, _)| e)
        .unwrap();
    p.flush(Duration::from_secs(10)).unwrap();

    // A forged erase for ag-1, unsigned, from an independent client, as
    // whoever can write the topic could: never run, and the agent goes on.
    let forged = json!({
        "command_id": uuid::Uuid::new_v4().to_string(), "instance_id": "ag-1", "action": "erase", "key_id": "ag-key",
        "key_version": null, "cause_event_id": cause, "issued_at": chrono::Utc::now(),
    });
    produce_as_outsider(&broker.bootstrap, "instance-commands", "ag-1", forged.to_string().as_bytes());
    let alert = wait_until("the forged-command alert", MIN, || {
        received.lock().unwrap().iter().find(|a| a["labels"]["alertname"] == "KeywardenAgentForgedCommand").cloned()
    });
    assert_eq!(alert["status"], "firing", "{alert}");
    assert!(agent.running(), "a forged command must not stop the agent");

    // The positive marker: the enable's restore runs after both, on every instance.
    d.act("ag-key", "enable");
    for id in hosted {
        wait_data_plane(&d, id, "restore", "enforced");
    }
    for id in hosted {
        let runs: Vec<String> = lines(hooks.path(), id).iter().map(|l| l.split(' ').next().unwrap_or_default().to_string()).collect();
        assert_eq!(runs, ["revoke", "restore"], "{id}: one revoke, then the restore; no repeat, no erase\n{}", agent.log());
    }
    assert!(agent.log().contains("not run again"), "the re-sent command was recognised");
    // The instance hosted elsewhere is none of this agent's business.
    let (_, other) = d.get("/v1/instances/ag-elsewhere");
    assert_eq!(other["data_plane"], Value::Null, "{other}");

    // A rotation's rewrapped commands, for which this agent has no hook: each
    // is reported skipped, with the version the command's id depends on.
    let rotate = d.act("ag-key", "rotate");
    d.wait_event(rotate["event_id"].as_str().unwrap());
    for id in hosted {
        let dp = wait_data_plane(&d, id, "rewrapped", "skipped");
        assert_eq!(dp["command_id"].as_str().map(str::len), Some(36), "{dp}");
    }

    // An instance deleted through the API: its erase runs and is reported too.
    let (s, v) = d.delete("/v1/instances/ag-2");
    assert_eq!(s, 204, "{v}");
    wait_data_plane(&d, "ag-2", "erase", "enforced");
    let runs: Vec<String> = lines(hooks.path(), "ag-2").iter().map(|l| l.split(' ').next().unwrap_or_default().to_string()).collect();
    assert_eq!(runs, ["revoke", "restore", "erase"]);

    // The instances' credentials never reach the agent's log or its journal.
    let journal = std::fs::read_to_string(agent.dir.path().join("journal/journal.log")).unwrap();
    for id in hosted {
        let token = d.dek_token_for(id);
        assert!(!agent.log().contains(&token) && !journal.contains(&token), "{id}'s credential leaked");
    }
}

#[test]
fn a_failing_hook_is_retried_with_an_alert_and_holds_back_only_its_own_instance() {
    let broker = Broker::start();
    let d = Daemon::start(&broker.bootstrap, &[]);
    let (hook, received) = webhook();
    d.create_key("af-key");
    for id in ["af-bad", "af-good"] {
        d.create_instance(id, "af-key");
    }
    let hooks = tempfile::tempdir().unwrap();
    // af-bad's database will not stop until the operator fixes it.
    let revoke = format!("if [ \"$KEYWARDEN_INSTANCE_ID\" = af-bad ] && [ ! -e \"$HOOK_DIR/fixed\" ]; then echo database busy; exit 1; fi; {RECORD}");
    let _agent = Agent::start(
        &broker.bootstrap,
        &d,
        &["af-bad", "af-good"],
        &[sh_hook("revoke", &revoke), sh_hook("restore", RECORD)],
        hooks.path(),
        &format!("[[alerts]]\nkind = \"webhook\"\nurl = \"{hook}\"\n"),
    );
    d.act("af-key", "disable");
    let failed = wait_data_plane(&d, "af-bad", "revoke", "failed");
    assert!(failed["detail"].as_str().unwrap_or_default().contains("database busy"), "{failed}");
    let alert = wait_until("the hook-failing alert", MIN, || {
        received.lock().unwrap().iter().find(|a| a["labels"]["alertname"] == "KeywardenAgentHookFailing" && a["status"] == "firing").cloned()
    });
    assert_eq!(alert["labels"]["instance_id"], "af-bad", "{alert}");
    // The other instance is not held up: revoked, and restored, meanwhile.
    wait_data_plane(&d, "af-good", "revoke", "enforced");
    d.act("af-key", "enable");
    wait_data_plane(&d, "af-good", "restore", "enforced");
    assert!(lines(hooks.path(), "af-bad").is_empty(), "af-bad's restore waits behind its revoke");

    std::fs::write(hooks.path().join("fixed"), "").unwrap();
    wait_data_plane(&d, "af-bad", "restore", "enforced");
    let runs: Vec<String> = lines(hooks.path(), "af-bad").iter().map(|l| l.split(' ').next().unwrap_or_default().to_string()).collect();
    assert_eq!(runs, ["revoke", "restore"], "the revoke, retried until it worked, then the restore");
    wait_until("the hook-failing alert to resolve", MIN, || {
        received.lock().unwrap().iter().find(|a| a["labels"]["alertname"] == "KeywardenAgentHookFailing" && a["status"] == "resolved").cloned()
    });
}

#[test]
fn a_kill_9_of_the_agent_mid_revocation_still_runs_each_hook_to_completion_exactly_once() {
    let broker = Broker::start();
    let d = Daemon::start(&broker.bootstrap, &[]);
    d.create_key("ak-key");
    let hosted = ["ak-0", "ak-1"];
    for id in hosted {
        d.create_instance(id, "ak-key");
    }
    let hooks = tempfile::tempdir().unwrap();
    // A slow stop: its effect (the line in HOOK_DIR/<instance>) comes at its end.
    // Each start records the shell's pid, which is what writes the effect.
    let slow = format!("echo $$ >> \"$HOOK_DIR/$KEYWARDEN_INSTANCE_ID.starts\"; sleep 2; {RECORD}");
    let mut agent = Agent::start(&broker.bootstrap, &d, &hosted, &[sh_hook("revoke", &slow)], hooks.path(), "");
    d.act("ak-key", "disable");
    wait_until("a revoke hook to be running", MIN, || hosted.iter().any(|id| !lines(hooks.path(), &format!("{id}.starts")).is_empty()).then_some(()));
    agent.kill();
    let killed_mid_run: Vec<&str> =
        hosted.iter().copied().filter(|id| !lines(hooks.path(), &format!("{id}.starts")).is_empty() && lines(hooks.path(), id).is_empty()).collect();
    assert!(!killed_mid_run.is_empty(), "the kill landed while a hook ran");
    // Every hook the dead agent started has ended (a zombie counts as ended:
    // it can write nothing more), so a second effect, had one survived the
    // kill, would already be in the file when it is counted below.
    wait_until("the killed agent's hooks to end", MIN, || {
        let alive = hosted.iter().flat_map(|id| lines(hooks.path(), &format!("{id}.starts"))).any(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .is_ok_and(|stat| stat.rsplit(')').next().is_some_and(|rest| !rest.trim_start().starts_with('Z')))
        });
        (!alive).then_some(())
    });
    agent.restart();
    for id in hosted {
        wait_data_plane(&d, id, "revoke", "enforced");
    }
    for id in hosted {
        assert_eq!(lines(hooks.path(), id).len(), 1, "{id}: the revoke's effect happened exactly once\n{}", agent.log());
    }
    for id in &killed_mid_run {
        assert!(lines(hooks.path(), &format!("{id}.starts")).len() >= 2, "{id} was started again after the restart");
    }
    assert!(agent.log().contains("was interrupted"), "the restart knew the run was cut short");
    println!("kill -9 mid-revocation: {} instance(s) interrupted, each revoke effect exactly once", killed_mid_run.len());
}

#[test]
fn a_revocation_no_agent_confirms_alerts_after_enforce_within_and_resolves_once_one_does() {
    let broker = Broker::start();
    let (hook, received) = webhook();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("keywarden.toml");
    std::fs::write(
        &config,
        format!("[data_plane]\nenforce_within = \"2s\"\n[alerts]\ncheck_every = \"200ms\"\nresend_every = \"2s\"\n[[alerts.sinks]]\nkind = \"webhook\"\nurl = \"{hook}\"\n"),
    )
    .unwrap();
    let d = Daemon::start(&broker.bootstrap, &[("KEYWARDEN_CONFIG", config.to_str().unwrap())]);
    d.create_key("au-key");
    d.create_instance("au-0", "au-key");
    let disabled = Instant::now();
    d.act("au-key", "disable");
    let unconfirmed = |status: &'static str| {
        let received = received.clone();
        move || received.lock().unwrap().iter().find(|a| a["labels"]["alertname"] == "KeywardenRevocationUnconfirmed" && a["status"] == status).cloned()
    };
    let alert = wait_until("the unconfirmed-revocation alert", MIN, unconfirmed("firing"));
    assert!(disabled.elapsed() >= Duration::from_secs(2), "not before enforce_within");
    assert_eq!(alert["labels"]["instance_id"], "au-0", "{alert}");
    assert_eq!(alert["labels"]["key_id"], "au-key", "{alert}");
    println!("unconfirmed revocation alerted after {} ms (enforce_within 2s)", disabled.elapsed().as_millis());

    // An agent comes and enforces it: the alert resolves.
    let hooks = tempfile::tempdir().unwrap();
    let _agent = Agent::start(&broker.bootstrap, &d, &["au-0"], &[sh_hook("revoke", RECORD)], hooks.path(), "");
    wait_data_plane(&d, "au-0", "revoke", "enforced");
    wait_until("the unconfirmed-revocation alert to resolve", MIN, unconfirmed("resolved"));
}

#[test]
fn a_report_needs_the_instances_own_credential_and_a_command_keywarden_issued_it() {
    let broker = Broker::start();
    let d = Daemon::start(&broker.bootstrap, &[]);
    d.create_key("ar-key");
    d.create_instance("ar-0", "ar-key");
    d.create_instance("ar-1", "ar-key");
    let disable = d.act("ar-key", "disable");
    let cause = disable["event_id"].as_str().unwrap().to_string();
    d.wait_event(&cause);
    let mut reader = TopicReader::new(&broker.bootstrap, "instance-commands");
    let ours = commands_of(&mut reader, "revoke", &cause, 2).into_iter().find(|m| m.key.as_deref() == Some("ar-0")).unwrap().json();
    let report = |id: &str, token: &str, body: &Value| {
        let r = d.http.post(format!("{}/v1/instances/{id}/data-plane", d.api)).bearer_auth(token).json(body).send().unwrap();
        r.status().as_u16()
    };
    let body = json!({"command_id": ours["command_id"], "cause_event_id": cause, "action": "revoke", "outcome": "enforced", "at": chrono::Utc::now(), "detail": "stopped"});
    // ar-1's credential reaches ar-1 only; the admin token none.
    assert_eq!(report("ar-0", &d.dek_token_for("ar-1"), &body), 401);
    assert_eq!(report("ar-0", &d.admin_token, &body), 401);
    // A command id keywarden did not issue to ar-0 (ar-0's own id, reported
    // for ar-1; an action the event did not cause).
    assert_eq!(report("ar-1", &d.dek_token_for("ar-1"), &body), 409);
    let restore = json!({"command_id": ours["command_id"], "cause_event_id": cause, "action": "restore", "outcome": "enforced", "at": chrono::Utc::now()});
    assert_eq!(report("ar-0", &d.dek_token_for("ar-0"), &restore), 409);
    let (_, v) = d.get("/v1/instances/ar-0");
    assert_eq!(v["data_plane"], Value::Null, "nothing refused was recorded: {v}");
    assert_eq!(report("ar-0", &d.dek_token_for("ar-0"), &body), 200);
    let (_, v) = d.get("/v1/instances/ar-0");
    assert_eq!(v["data_plane"]["command_id"], ours["command_id"], "{v}");
    assert_eq!(v["data_plane"]["outcome"], "enforced", "{v}");

    // A rewrapped command's id names the version it announces: its report
    // carries that version, and one naming another version is no command
    // keywarden issued.
    let enable = d.act("ar-key", "enable");
    d.wait_event(enable["event_id"].as_str().unwrap());
    let rotate = d.act("ar-key", "rotate");
    let rotation = rotate["event_id"].as_str().unwrap().to_string();
    let rewrapped = commands_of(&mut reader, "rewrapped", &rotation, 2).into_iter().find(|m| m.key.as_deref() == Some("ar-0")).unwrap().json();
    let version = rewrapped["key_version"].as_str().unwrap().to_string();
    let report_rewrap = |version: &str| json!({"command_id": rewrapped["command_id"], "cause_event_id": rotation, "action": "rewrapped", "key_version": version, "outcome": "enforced", "at": chrono::Utc::now()});
    assert_eq!(report("ar-0", &d.dek_token_for("ar-0"), &report_rewrap("1")), 409, "another version's rewrap");
    // An agent of the previous release reports it without the version.
    let mut unversioned = report_rewrap(&version);
    unversioned.as_object_mut().unwrap().remove("key_version");
    assert_eq!(report("ar-0", &d.dek_token_for("ar-0"), &unversioned), 409, "a rewrap reported without its version");
    assert_eq!(report("ar-0", &d.dek_token_for("ar-0"), &report_rewrap(&version)), 200, "the rewrap to {version}");
}
