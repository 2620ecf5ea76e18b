//! `keywarden key show --watch`, run as an operator
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
