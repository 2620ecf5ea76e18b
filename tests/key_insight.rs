//! `keywarden key impact` and `keywarden key show --watch`, run as an operator
//! would: the real CLI against the real daemon over a real tansu broker.

mod common;

use std::io::Read as _;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

const MIN: Duration = Duration::from_secs(60);

fn cli(d: &Daemon, args: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_keywarden"));
    c.args(["--api", &d.api, "--token", &d.admin_token]).args(args).stdin(Stdio::null());
    c
}

/// Runs the CLI to completion, killing it if it outlives `timeout`.
fn run(mut c: Command, timeout: Duration) -> Output {
    let mut child = c.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("start the cli");
    let (mut out, mut err) = (child.stdout.take().unwrap(), child.stderr.take().unwrap());
    let reader = std::thread::spawn(move || {
        let mut o = Vec::new();
        out.read_to_end(&mut o).unwrap();
        o
    });
    let err_reader = std::thread::spawn(move || {
        let mut e = Vec::new();
        err.read_to_end(&mut e).unwrap();
        e
    });
    let start = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if start.elapsed() > timeout {
            let _ = child.kill();
            let _ = child.wait();
            panic!("the cli did not exit within {timeout:?}; stdout so far:\n{}", String::from_utf8_lossy(&reader.join().unwrap()));
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    Output { status, stdout: reader.join().unwrap(), stderr: err_reader.join().unwrap() }
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[test]
fn key_impact_predicts_the_revokes_a_disable_then_sends() {
    let broker = Broker::start();
    let d = Daemon::start(&broker.bootstrap, &[]);
    let mut commands = TopicReader::new(&broker.bootstrap, "instance-commands");
    d.create_key("ik");
    for i in 0..4 {
        d.create_instance(&format!("im-{i}"), "ik");
    }
    let (s, v) = d.delete("/v1/instances/im-3");
    assert_eq!(s, 204, "{v}");

    let out = run(cli(&d, &["key", "impact", "ik", "--output", "json"]), MIN);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let before: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(before["instances"]["total"], 4, "{before}");
    assert_eq!(before["instances"]["by_state"], serde_json::json!({"active": 3, "revoked": 0, "erased": 0, "destroyed": 1}));
    let listed: Vec<(&str, &str)> =
        before["instances"]["listed"].as_array().unwrap().iter().map(|i| (i["instance_id"].as_str().unwrap(), i["state"].as_str().unwrap())).collect();
    assert_eq!(listed, [("im-0", "active"), ("im-1", "active"), ("im-2", "active"), ("im-3", "destroyed")]);
    assert_eq!(before["wrapped_deks"], 3);
    assert_eq!(before["pending_rewraps"], 0);
    assert_eq!((before["disable"]["command"].as_str(), before["disable"]["commands"].as_u64()), (Some("revoke"), Some(3)));
    assert_eq!((before["delete"]["command"].as_str(), before["delete"]["commands"].as_u64()), (Some("erase"), Some(3)));
    assert_eq!(before["data_plane"]["commands_topic"], "instance-commands");
    assert_eq!(before["data_plane"]["message_key"], "instance_id");

    let out = run(cli(&d, &["key", "impact", "ik", "--limit", "2"]), MIN);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let shown = text(&out.stdout);
    assert!(shown.contains("instances: 4 (active 3, revoked 0, erased 0, destroyed 1)"), "{shown}");
    assert!(shown.contains("if disabled: 3 instance(s) become revoked"), "{shown}");
    assert!(shown.contains("commands go to topic instance-commands keyed by instance_id; a disable sends 3 revoke and a delete 3 erase"), "{shown}");
    assert!(shown.contains("2 more not listed"), "{shown}");

    // What it predicted is what happens.
    let ev = d.act("ik", "disable");
    let cause = ev["event_id"].as_str().unwrap().to_string();
    d.wait_event(&cause);
    commands.read_until("the revoke commands", MIN, |r| r.iter().filter(|m| m.json()["cause_event_id"] == cause.as_str()).count() >= 3);
    commands.drain(Duration::from_secs(1));
    let mut revoked: Vec<String> = commands.commands("revoke", &cause).iter().map(|c| c["instance_id"].as_str().unwrap().to_string()).collect();
    revoked.sort();
    assert_eq!(revoked, ["im-0", "im-1", "im-2"]);
    assert!(commands
        .seen
        .iter()
        .filter(|m| m.json()["cause_event_id"] == cause.as_str())
        .all(|m| m.key == Some(m.json()["instance_id"].as_str().unwrap().to_string())));

    let out = run(cli(&d, &["key", "impact", "ik", "--output", "json"]), MIN);
    let after: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(after["instances"]["by_state"]["revoked"], 3, "{after}");
    assert_eq!(after["disable"]["commands"], 0, "a second disable changes nothing");
    assert_eq!(after["delete"]["commands"], 3, "a delete would still erase them");

    let out = run(cli(&d, &["key", "impact", "no-such-key"]), MIN);
    assert!(!out.status.success());
    assert!(text(&out.stderr).contains("key no-such-key is unknown"), "{}", text(&out.stderr));
}

#[test]
fn key_show_watch_follows_a_rotation_of_2000_dek_to_the_end() {
    let broker = Broker::start();
    // A narrow rotation, so that the watch sees it move rather than only its end.
    let d = Daemon::start(&broker.bootstrap, &[("KEYWARDEN_ROTATION_CONCURRENCY", "2"), ("KEYWARDEN_ROTATION_BATCH", "32")]);
    d.create_key("wk");
    std::thread::scope(|s| {
        for t in 0..8 {
            let d = &d;
            s.spawn(move || {
                for i in (t..2000).step_by(8) {
                    d.create_instance(&format!("w-{i:04}"), "wk");
                }
            });
        }
    });
    d.act("wk", "rotate");
    // The rotation exists once the rotate event is consumed; the watch follows
    // an existing one and says so when there is none.
    wait_until("the rotation to start", MIN, || {
        let (_, v) = d.get("/v1/keys/wk");
        (v["rotation"]["target_version"] == "2").then_some(())
    });

    let out = run(cli(&d, &["key", "show", "wk", "--watch"]), Duration::from_secs(300));
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "exit {:?}\nstdout:\n{stdout}\nstderr:\n{}", out.status, text(&out.stderr));
    let last = stdout.lines().last().unwrap_or_default();
    assert!(last.starts_with("wk -> version 2 ["), "{stdout}");
    assert!(last.contains("2000/2000 100.0%") && last.ends_with("done"), "the last line is the finished rotation: {stdout}");
    assert!(!stdout.contains('\r'), "no terminal, so no redrawing: {stdout:?}");
    assert!(text(&out.stderr).contains("finished: 2000 DEK(s) rewrapped"), "{}", text(&out.stderr));

    let (_, key) = d.get("/v1/keys/wk");
    assert_eq!(key["pending_rewraps"], 0, "{key}");
    assert_eq!(key["rotation"]["state"], "finished");
    assert_eq!(key["rotation"]["percent"], 100.0);
    assert!(key["rotation"]["rate_per_second"].as_f64().unwrap() > 0.0, "{key}");

    let out = run(cli(&d, &["key", "show", "wk", "--watch", "--output", "json"]), MIN);
    assert!(out.status.success());
    let finished: Value = serde_json::from_str(text(&out.stdout).lines().last().unwrap()).unwrap();
    assert_eq!((finished["state"].as_str(), finished["done"].as_u64()), (Some("finished"), Some(2000)), "a finished rotation ends the watch at once");
}
