//! B8 of issue 14: a real MariaDB under keywarden. How long from a disable
//! request to the database refusing connections, and from an enable request
//! to it accepting them again, when the real data-plane agent enforces the
//! commands with the shipped hooks; against the same server stopped by a
//! plain `mariadb-admin shutdown` and started by hand, in the same run.
//!
//! The mariadbd and agent processes are keywarden's own demo plumbing
//! (`keywarden::cli::demo::mariadb`), so the bench runs the database exactly
//! as `keywarden demo --mariadb` does.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use keywarden::cli::demo::mariadb::{mariadbd, Agent, AgentSpec, Mariadb, Start};

use crate::harness::*;
use crate::{Row, Sizes};

const KEY: &str = "b8-key";
const INSTANCE: &str = "b8-db";
/// How often the database is probed: well under the times measured.
const PROBE: Duration = Duration::from_millis(5);
const PATIENCE: Duration = Duration::from_secs(120);

fn row(what: &str, figure: String, baseline: String, ratio: String, target: &str) -> Row {
    Row { id: "B8", what: what.to_string(), figure, baseline, ratio, target: target.to_string(), met: None }
}

fn dist(d: &Dist) -> String {
    format!("p50 {} / p99 {} / max {}", ms(d.pct(50.0)), ms(d.pct(99.0)), ms(d.max()))
}

/// The time from `t0` until the database's accepting() is `want`.
fn until_accepting(db: &Mariadb, want: bool, t0: Instant, what: &str) -> Res<Duration> {
    wait_until(what, PATIENCE, PROBE, || (db.accepting() == want).then(|| t0.elapsed()))
}

pub fn b8_mariadb(bin: &Path, s: &Sizes) -> Res<Vec<Row>> {
    let mariadbd = match mariadbd() {
        Ok(m) => m,
        Err(e) if std::env::var("KEYWARDEN_TEST_SKIP_MISSING").as_deref() == Ok("1") => {
            return Ok(vec![row(&format!("skipped: {e}"), "–".into(), "–".into(), "–".into(), "report")]);
        }
        Err(e) => return Err(format!("{e}; or set KEYWARDEN_TEST_SKIP_MISSING=1 to skip B8").into()),
    };
    let broker = Broker::start()?;
    broker.topic("key-lifecycle", 3)?;
    broker.topic("instance-commands", 3)?;
    let work = tempfile::tempdir()?;
    let kv = format!("127.0.0.1:{}", free_port());
    let mut d = Daemon::new(bin, &work.path().join("keywarden"), &broker.bootstrap, &[("KEYWARDEN_DATA_PLANE_VAULT_KV_LISTEN", &kv)])?;
    d.start()?;
    let (status, v) = d.post_json("/v1/keys", &serde_json::json!({"key_id": KEY}))?;
    if status != 201 {
        return Err(format!("creating the key answered {status}: {v}").into());
    }
    let (status, v) = d.post_json("/v1/instances", &serde_json::json!({"instance_id": INSTANCE, "key_id": KEY}))?;
    let token = v["dek_token"].as_str().filter(|_| status == 201).ok_or_else(|| format!("creating the instance answered {status}: {v}"))?.to_string();
    let mut db = Mariadb::install(mariadbd, &work.path().join("mariadb"), &kv, INSTANCE, &token)?;
    if let Start::Exited(log) = db.start()? {
        return Err(format!("mariadbd did not start: {log}").into());
    }
    let key_file = d.dir.join("event-hmac.key");
    let mut agent = Agent::start(
        bin,
        &work.path().join("agent"),
        &AgentSpec {
            brokers: &broker.bootstrap,
            commands_topic: "instance-commands",
            key_id: "local",
            key_file: &key_file,
            keywarden_url: &d.api,
            instance_id: INSTANCE,
            credential: &token,
        },
        &db,
    )?;
    let outcome = cycles(&d, &mut db, &mut agent, s.b8_cycles);
    if outcome.is_err() {
        eprintln!("bench: B8 agent log:\n{}\nbench: B8 mariadbd log:\n{}", agent.log_tail(30), db.log_tail(30));
    }
    let (off, on, enforced) = outcome?;
    let (base_off, base_on) = baseline(&mut db, s.b8_cycles)?;
    drop(agent);
    db.stop();
    d.stop()?;
    let ratio = |a: &Dist, b: &Dist| format!("p50 {:.1}×", a.pct(50.0).as_secs_f64() / b.pct(50.0).as_secs_f64().max(1e-9));
    Ok(vec![
        row(
            &format!("disable request → database refusing connections (agent, shipped hooks), {} cycles", off.len()),
            dist(&off),
            format!("`mariadb-admin shutdown` → refusing: {}", dist(&base_off)),
            ratio(&off, &base_off),
            "report",
        ),
        row(
            &format!("disable request → revoke reported enforced (server exited), {} cycles", enforced.len()),
            dist(&enforced),
            "–".into(),
            "–".into(),
            "report",
        ),
        row(
            &format!("enable request → database accepting connections again, {} cycles", on.len()),
            dist(&on),
            format!("mariadbd started by hand → accepting: {}", dist(&base_on)),
            ratio(&on, &base_on),
            "report",
        ),
    ])
}

/// The instance's data_plane once it names a command other than `after`
/// with `action` enforced; returns its command id.
fn reported(d: &Daemon, action: &str, after: &str) -> Res<String> {
    wait_until(&format!("{INSTANCE} to report {action} enforced"), PATIENCE, PROBE, || {
        let (_, v) = d.get(&format!("/v1/instances/{INSTANCE}")).ok()?;
        let dp = &v["data_plane"];
        let id = dp["command_id"].as_str()?;
        (dp["action"] == action && dp["outcome"] == "enforced" && id != after).then(|| id.to_string())
    })
}

fn request(d: &Daemon, action: &str) -> Res<()> {
    let (status, v) = d.post(&format!("/v1/keys/{KEY}/{action}"))?;
    if status != 202 {
        return Err(format!("{action} answered {status}: {v}").into());
    }
    Ok(())
}

/// Disable and enable `n` times through keywarden and the agent, after one
/// uncounted rotation that shows the agent consuming. Returns the disable →
/// refusing, enable → accepting and disable → enforced times.
fn cycles(d: &Daemon, db: &mut Mariadb, agent: &mut Agent, n: usize) -> Res<(Dist, Dist, Dist)> {
    request(d, "rotate")?;
    let mut last = reported(d, "rewrapped", "")?;
    let (mut off, mut on, mut enforced) = (Vec::new(), Vec::new(), Vec::new());
    for cycle in 0..n {
        let t0 = Instant::now();
        request(d, "disable")?;
        off.push(until_accepting(db, false, t0, "the database to refuse connections")?);
        last = reported(d, "revoke", &last)?;
        enforced.push(t0.elapsed());
        if db.pid().is_some() {
            return Err(format!("cycle {cycle}: revoke reported enforced, yet mariadbd runs").into());
        }
        let t1 = Instant::now();
        request(d, "enable")?;
        on.push(until_accepting(db, true, t1, "the database to accept connections")?);
        last = reported(d, "restore", &last)?;
        if !agent.running() {
            return Err("the agent stopped".into());
        }
    }
    Ok((Dist::new(off), Dist::new(on), Dist::new(enforced)))
}

/// The same server stopped with a plain `mariadb-admin shutdown` and
/// started by hand (`mariadbd --defaults-file`), `n` times.
fn baseline(db: &mut Mariadb, n: usize) -> Res<(Dist, Dist)> {
    let (mut off, mut on) = (Vec::new(), Vec::new());
    for _ in 0..n {
        let t0 = Instant::now();
        let mut admin = Command::new("mariadb-admin")
            .arg(format!("--socket={}", db.socket.display()))
            .args(["--user=root", "shutdown"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?;
        off.push(until_accepting(db, false, t0, "the database to refuse connections")?);
        if !admin.wait()?.success() {
            return Err("mariadb-admin shutdown failed".into());
        }
        db.wait_gone(PATIENCE)?;
        match db.start()? {
            Start::Ready(took) => on.push(took),
            Start::Exited(log) => return Err(format!("mariadbd did not start by hand: {log}").into()),
        }
    }
    Ok((Dist::new(off), Dist::new(on)))
}
