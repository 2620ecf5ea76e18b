//! Operating keywarden: alerts through a real Alertmanager (Debian's
//! prometheus-alertmanager) and a webhook, the audit trail's export and its
//! verification against tampering (also with the chain recomputed, which the
//! seals catch), and the purge's proof of erasure.

mod common;

use std::io::Write as _;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::*;
use serde_json::Value;

const MIN: Duration = Duration::from_secs(60);

struct Alertmanager {
    child: Option<Child>,
    port: u16,
    dir: tempfile::TempDir,
}

impl Alertmanager {
    fn binary() -> Option<&'static str> {
        ["/usr/bin/prometheus-alertmanager", "/usr/bin/alertmanager"].into_iter().find(|p| std::path::Path::new(p).exists())
    }

    fn start() -> Option<Alertmanager> {
        Self::binary()?;
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("am.yml"), "route:\n  receiver: blackhole\n  group_wait: 1s\nreceivers:\n  - name: blackhole\n").unwrap();
        let mut am = Alertmanager { child: None, port: free_port(), dir };
        // A port found free can be taken by another test before alertmanager
        // binds it; alertmanager then exits, and another port is tried.
        for _ in 0..3 {
            if am.try_spawn() {
                return Some(am);
            }
            am.port = free_port();
        }
        panic!("alertmanager exited at start on three free ports");
    }

    fn spawn(&mut self) {
        assert!(self.try_spawn(), "alertmanager exited at start on port {}", self.port);
    }

    /// Starts alertmanager and waits until it is ready; false if it exited first.
    fn try_spawn(&mut self) -> bool {
        let mut child = Command::new(Self::binary().unwrap())
            .arg(format!("--config.file={}", self.dir.path().join("am.yml").display()))
            .arg(format!("--storage.path={}", self.dir.path().join("data").display()))
            .arg(format!("--web.listen-address=127.0.0.1:{}", self.port))
            .arg("--cluster.listen-address=")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let url = self.url();
        let ready = wait_until("alertmanager to be ready or to exit", MIN, || {
            if matches!(child.try_wait(), Ok(Some(_))) {
                return Some(false);
            }
            reqwest::blocking::get(format!("{url}/-/ready")).ok().filter(|r| r.status().is_success()).map(|_| true)
        });
        self.child = Some(child);
        ready
    }

    fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn alerts(&self, name: &str) -> Vec<Value> {
        let r = reqwest::blocking::get(format!("{}/api/v2/alerts", self.url())).and_then(|r| r.json::<Value>());
        r.ok().and_then(|v| v.as_array().cloned()).unwrap_or_default().into_iter().filter(|a| a["labels"]["alertname"] == name).collect()
    }
}

impl Drop for Alertmanager {
    fn drop(&mut self) {
        self.stop();
    }
}

#[test]
fn alerts_reach_a_real_alertmanager_with_their_labels_and_resolve() {
    let Some(mut am) = required(Alertmanager::start(), "prometheus-alertmanager", "apt-get install prometheus-alertmanager") else { return };
    let (hook, received) = webhook();
    let broker = Broker::start();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("keywarden.toml");
    std::fs::write(
        &config,
        format!(
            "[alerts]\ncheck_every = \"200ms\"\nresend_every = \"2s\"\n[[alerts.sinks]]\nkind = \"alertmanager\"\nurl = \"{}\"\n[[alerts.sinks]]\nkind = \"webhook\"\nurl = \"{hook}\"\n",
            am.url()
        ),
    )
    .unwrap();
    let d = Daemon::start(&broker.bootstrap, &[("KEYWARDEN_CONFIG", config.to_str().unwrap())]);
    d.create_key("al-key");
    for i in 0..3 {
        d.create_instance(&format!("al-{i}"), "al-key");
    }
    let disable = d.act("al-key", "disable");
    d.wait_event(disable["event_id"].as_str().unwrap());
    let fired = wait_until("the disable alert in alertmanager", MIN, || am.alerts("KeywardenKeyDisabled").into_iter().next());
    assert_eq!(fired["labels"]["key_id"], "al-key");
    assert_eq!(fired["labels"]["severity"], "warning");
    assert_eq!(fired["labels"]["service"], "keywarden");
    assert_eq!(fired["annotations"]["instances"], "3", "{fired}");
    assert_eq!(fired["status"]["state"], "active");
    let fingerprint = fired["fingerprint"].clone();

    // Raised again (a re-send, or after a restart) it stays one alert. The
    // marker is alertmanager's own: it sets an alert's `updatedAt` to when it
    // last received it, so two later values show two re-sends (every 2 s)
    // reached alertmanager itself. A re-send that made a second alert would
    // show here as more than one alert (and, with other labels, would not
    // move the first one's `updatedAt`: the wait would time out).
    let updated = |a: &Value| a["updatedAt"].as_str().and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok()).expect("alertmanager's updatedAt");
    let first_update = updated(&fired);
    let mut updates = std::collections::BTreeSet::new();
    let alerts = wait_until("two re-sends of the disable alert at alertmanager", MIN, || {
        let alerts = am.alerts("KeywardenKeyDisabled");
        updates.extend(alerts.iter().filter(|a| a["fingerprint"] == fingerprint).map(updated).filter(|t| *t > first_update));
        (updates.len() >= 2 || alerts.len() > 1).then_some(alerts)
    });
    assert_eq!(alerts.len(), 1, "a re-send made another alert in alertmanager: {alerts:?}");
    assert_eq!(alerts[0]["fingerprint"], fingerprint);
    println!("the disable alert at alertmanager: first received {first_update}, re-sends received at {updates:?}");
    let firings = |name: &str| received.lock().unwrap().iter().filter(|b| b["labels"]["alertname"] == name && b["status"] == "firing").count();

    let enable = d.act("al-key", "enable");
    d.wait_event(enable["event_id"].as_str().unwrap());
    wait_until("the disable alert to resolve", MIN, || {
        let now = chrono::Utc::now();
        let open = am
            .alerts("KeywardenKeyDisabled")
            .into_iter()
            .any(|a| a["endsAt"].as_str().and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok()).is_none_or(|t| t > now));
        (!open).then_some(())
    });

    // Alertmanager down: a delete's critical alert waits in the queue, and
    // arrives once it is back.
    am.stop();
    let delete = d.act("al-key", "delete");
    d.wait_event(delete["event_id"].as_str().unwrap());
    // Sent (the webhook has it) while alertmanager was away.
    wait_until("the delete alert at the webhook", MIN, || (firings("KeywardenKeyDeleted") >= 1).then_some(()));
    am.spawn();
    let critical = wait_until("the delete alert after the outage", MIN, || am.alerts("KeywardenKeyDeleted").into_iter().next());
    assert_eq!(critical["labels"]["severity"], "critical");

    // A forged event raises a security alert.
    let p = producer(&broker.bootstrap);
    let forged = event("forged-1", "delete", "al-key", None, &soon(0));
    produce_with_headers(&p, "key-lifecycle", Some("al-key"), &forged, &[("keywarden-signature", "kid=local;sig=AAAA")]);
    let security = wait_until("the forged-event alert", MIN, || am.alerts("KeywardenForgedEvents").into_iter().next());
    assert_eq!(security["labels"]["severity"], "critical");

    // The webhook saw the same alerts, firing and resolved.
    let bodies = received.lock().unwrap().clone();
    let disabled: Vec<&Value> = bodies.iter().filter(|b| b["labels"]["alertname"] == "KeywardenKeyDisabled").collect();
    assert!(disabled.iter().any(|b| b["status"] == "firing"), "{bodies:?}");
    assert!(disabled.iter().any(|b| b["status"] == "resolved"), "{bodies:?}");
    assert!(disabled.iter().all(|b| b["fingerprint"] == disabled[0]["fingerprint"]));
}

#[test]
fn the_audit_trail_exports_verifies_and_catches_tampering_and_purges_leave_proof() {
    let broker = Broker::start();
    let mut d = Daemon::start(&broker.bootstrap, &[("KEYWARDEN_POLICY_PURGE_AFTER", "1s"), ("KEYWARDEN_POLICY_PURGE_SCHEDULE", "* * * * * *")]);
    let started = chrono::Utc::now();
    d.create_key("au-key");
    d.create_instance("au-1", "au-key");
    d.create_instance("au-2", "au-key");
    let delete = d.act("au-key", "delete");
    d.wait_event(delete["event_id"].as_str().unwrap());
    d.wait_state("au-1", "destroyed");
    d.wait_state("au-2", "destroyed");

    let (api, token) = (d.api.clone(), d.admin_token.clone());
    let cli = |args: &[&str]| Command::new(env!("CARGO_BIN_EXE_keywarden")).args(["--api", &api, "--token", &token]).args(args).output().unwrap();
    let verified = cli(&["audit", "verify"]);
    assert!(verified.status.success(), "{}", String::from_utf8_lossy(&verified.stderr));
    let export = cli(&["audit", "export", "--since", &started.to_rfc3339()]);
    assert!(export.status.success());
    let lines: Vec<Value> = String::from_utf8(export.stdout).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let applied = lines.iter().find(|e| e["event_id"] == delete["event_id"]).expect("the delete event is audited");
    assert_eq!((applied["who"].as_str(), applied["outcome"].as_str(), applied["key_id"].as_str()), (Some("kms-event"), Some("applied"), Some("au-key")));
    let proofs: Vec<&Value> = lines.iter().filter(|e| e["what"] == "purge").collect();
    assert_eq!(proofs.len(), 2, "one proof of erasure per instance");
    for p in &proofs {
        assert_eq!(p["who"], "schedule:purge");
        assert!(p["detail"].as_str().unwrap().contains("sha256 of the destroyed wrapped DEK"), "{p}");
    }
    assert!(lines.iter().any(|e| e["what"] == "POST /v1/keys/au-key/delete" && e["who"] == "admin"));

    // Alter one entry behind the daemon's back.
    assert_eq!(d.terminate(), Some(0));
    {
        let db = sled::open(d.dir.path().join("store")).unwrap();
        let tree = db.open_tree("state").unwrap();
        let (k, v) = tree.scan_prefix(b"a/").nth(2).unwrap().unwrap();
        let mut entry: Value = serde_json::from_slice(&v).unwrap();
        entry["outcome"] = "nothing to see here".into();
        tree.insert(k, serde_json::to_vec(&entry).unwrap()).unwrap();
        db.flush().unwrap();
    }
    d.restart();
    let tampered = cli(&["audit", "verify"]);
    assert!(!tampered.status.success());
    assert!(String::from_utf8_lossy(&tampered.stderr).contains("altered"), "{}", String::from_utf8_lossy(&tampered.stderr));

    // The audit secret was created beside the store, not in it.
    let store = d.dir.path().join("store");
    let secret = d.dir.path().join("store-audit.key");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(std::fs::metadata(&secret).expect("the audit secret beside the store").permissions().mode() & 0o777, 0o600);
    assert!(!std::fs::read_dir(&store).unwrap().any(|f| f.unwrap().file_name().to_string_lossy().contains("audit")));

    // Whoever can write the store can also recompute the whole chain, as
    // keywarden hashed it before the seals: the edited entry is still caught,
    // by its seal, and named; the entries before it still verify.
    assert_eq!(d.terminate(), Some(0));
    let (edited, _) = rewrite_trail(&store, false);
    d.restart();
    let recomputed = cli(&["audit", "verify"]);
    let err = String::from_utf8_lossy(&recomputed.stderr);
    assert!(!recomputed.status.success(), "{}", String::from_utf8_lossy(&recomputed.stdout));
    assert!(err.contains(&format!("audit entry {edited} does not match its seal: it was altered")), "{err}");

    // Nor does writing the trail in the format from before the seals pass
    // for an old trail: the audit secret is not new, so nothing anchors it.
    assert_eq!(d.terminate(), Some(0));
    rewrite_trail(&store, true);
    d.restart();
    let stripped = cli(&["audit", "verify"]);
    let err = String::from_utf8_lossy(&stripped.stderr);
    assert!(!stripped.status.success());
    assert!(err.contains("carry no seal and no anchor vouches for them"), "{err}");

    // A store from before the seals, on the start that creates the secret
    // (an upgrade): its entries are anchored and verify as legacy. That is
    // also why the secret belongs where the store's writers cannot reach it.
    assert_eq!(d.terminate(), Some(0));
    let (_, old_entries) = rewrite_trail(&store, true);
    std::fs::remove_file(&secret).unwrap();
    d.restart();
    let upgraded = cli(&["audit", "verify"]);
    let out = String::from_utf8_lossy(&upgraded.stdout);
    assert!(upgraded.status.success(), "{}", String::from_utf8_lossy(&upgraded.stderr));
    assert!(out.contains("chain: intact") && out.contains(&format!("legacy: {old_entries}")), "{out}");
    let export = cli(&["audit", "export"]);
    let lines: Vec<Value> = String::from_utf8(export.stdout).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let anchor = &lines[old_entries];
    assert_eq!((anchor["who"].as_str(), anchor["what"].as_str()), (Some("keywarden"), Some("audit trail keyed")), "{anchor}");
    assert!(lines[..old_entries].iter().all(|e| e.get("mac").is_none()) && lines[old_entries..].iter().all(|e| e["mac"].is_string()));
}

/// The hash keywarden chained audit entries with before they were sealed (and
/// still chains them with, under the seal): plain SHA-256, which anyone can
/// compute. A copy of the old `store::audit::hash_of`, on purpose.
fn plain_hash(e: &keywarden::store::audit::AuditEntry) -> String {
    use sha2::Digest;
    let f = &e.fact;
    let mut h = sha2::Sha256::new();
    h.update(e.seq.to_be_bytes());
    let at = e.at.to_rfc3339();
    let fields = [Some(&at), Some(&f.who), Some(&f.what), Some(&f.outcome)]
        .into_iter()
        .chain([&f.event_id, &f.key_id, &f.instance_id, &f.key_version, &f.correlation_id, &f.detail].map(Option::as_ref))
        .chain([Some(&e.prev)]);
    for field in fields {
        match field {
            Some(s) => {
                h.update([1]);
                h.update((s.len() as u64).to_be_bytes());
                h.update(s.as_bytes());
            }
            None => h.update([0]),
        }
    }
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

/// Rewrites a stopped daemon's trail as someone with write access to its
/// store but without the audit secret can: every entry hashed and linked again
/// with plain SHA-256; with `strip_seals`, in the format from before the
/// seals (no `mac`). Written to sled's files directly, as the existing edit
/// above is: the store is written only by its writer, and this is exactly the
/// write nobody should be able to hide. Returns the seq of the entry edited
/// earlier and how many entries the trail holds.
fn rewrite_trail(store: &std::path::Path, strip_seals: bool) -> (u64, usize) {
    let db = sled::open(store).unwrap();
    let tree = db.open_tree("state").unwrap();
    let trail: Vec<(sled::IVec, keywarden::store::audit::AuditEntry)> =
        tree.scan_prefix(b"a/").map(|kv| kv.unwrap()).map(|(k, v)| (k, serde_json::from_slice(&v).unwrap())).collect();
    let mut prev = keywarden::store::audit::GENESIS.to_string();
    let mut edited = None;
    for (key, e) in &trail {
        let mut e = e.clone();
        e.prev = prev;
        e.hash = plain_hash(&e);
        if strip_seals {
            e.mac = None;
        }
        if e.fact.outcome == "nothing to see here" {
            edited = Some(e.seq);
        }
        prev = e.hash.clone();
        tree.insert(key, serde_json::to_vec(&e).unwrap()).unwrap();
    }
    db.flush().unwrap();
    (edited.expect("the entry edited earlier"), trail.len())
}

/// `keywarden command verify`, as a consumer of the commands topic runs it.
fn verify_command(payload: &[u8], signature: &str, args: &[&std::ffi::OsStr], env: &[(&str, &std::path::Path)]) -> (bool, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_keywarden"));
    cmd.args(["command", "verify", "--signature", signature]).args(args);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    child.stdin.take().unwrap().write_all(payload).unwrap();
    let out = child.wait_with_output().unwrap();
    (out.status.success(), format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
}

#[test]
fn commands_are_signed_and_a_forged_one_is_told_from_a_real_one() {
    let broker = Broker::start();
    let d = Daemon::start(&broker.bootstrap, &[]);
    let mut commands = TopicReader::new(&broker.bootstrap, "instance-commands");
    d.create_key("sig-key");
    d.create_instance("sig-1", "sig-key");
    d.create_instance("sig-2", "sig-key");
    let disable = d.act("sig-key", "disable");
    let cause = disable["event_id"].as_str().unwrap().to_string();
    let of_cause = |m: &&common::Read| m.json()["cause_event_id"] == cause.as_str();
    commands.read_until("both revoke commands", MIN, |r| r.iter().filter(of_cause).count() == 2);
    let real: Vec<common::Read> = commands.seen.iter().filter(of_cause).cloned().collect();

    // Each carries the events' signature header, under the daemon's
    // signatures.hmac_key_file, and verifies with it (the config's key by default).
    let key_file = d.dir.path().join("event-hmac.key");
    for m in &real {
        let signature = m.header("keywarden-signature").expect("every command is signed");
        let (valid, out) = verify_command(&m.payload, signature, &[], &[("KEYWARDEN_SIGNATURES_HMAC_KEY_FILE", &key_file)]);
        assert!(valid, "{out}");
        assert!(out.starts_with("valid: command") && out.contains(m.json()["instance_id"].as_str().unwrap()), "{out}");
    }

    // Whoever can write the topic turns a revoke into a restore and keeps the
    // real signature: read back from the topic, it is caught.
    let signature = real[0].header("keywarden-signature").unwrap().to_string();
    let forged = String::from_utf8(real[0].payload.clone()).unwrap().replace("\"revoke\"", "\"restore\"");
    assert_ne!(forged.as_bytes(), real[0].payload.as_slice());
    let p = producer(&broker.bootstrap);
    produce_with_headers(&p, "instance-commands", real[0].key.as_deref(), forged.as_bytes(), &[("keywarden-signature", &signature)]);
    commands.read_until("the forged command", MIN, |r| r.iter().any(|m| m.payload == forged.as_bytes()));
    let read_back = commands.seen.iter().find(|m| m.payload == forged.as_bytes()).unwrap();
    let key_args = ["--key-file".as_ref(), key_file.as_os_str(), "--key-id".as_ref(), "local".as_ref()];
    let (valid, out) = verify_command(&read_back.payload, read_back.header("keywarden-signature").unwrap(), &key_args, &[]);
    assert!(!valid, "{out}");
    assert!(out.starts_with("invalid:") && out.contains("forged or altered"), "{out}");
}

#[test]
fn sighup_reloads_tokens_sinks_and_log_level_and_refuses_what_needs_a_restart() {
    let broker = Broker::start();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("keywarden.toml");
    std::fs::write(&config, "[log]\nlevel = \"warn\"\n").unwrap();
    let mut d = Daemon::start(&broker.bootstrap, &[("KEYWARDEN_CONFIG", config.to_str().unwrap()), ("KEYWARDEN_LOG", "")]);
    d.create_key("hup-key");

    // A new admin token and log level, and a sink: all applied without a restart.
    let (hook, received) = webhook();
    std::fs::write(&config, format!("[log]\nlevel = \"info,keywarden=debug\"\n[[alerts.sinks]]\nkind = \"webhook\"\nurl = \"{hook}\"\n")).unwrap();
    let old_token = d.admin_token.clone();
    std::fs::write(d.dir.path().join("admin.token"), "a-brand-new-admin-token-0123456789\n").unwrap();
    d.signal("HUP");
    d.admin_token = "a-brand-new-admin-token-0123456789".into();
    wait_until("the new admin token to work", MIN, || (d.get("/v1/keys/hup-key").0 == 200).then_some(()));
    let stale = d.http.get(format!("{}/v1/keys/hup-key", d.api)).bearer_auth(&old_token).send().unwrap();
    assert_eq!(stale.status().as_u16(), 401, "the old token stops working");
    d.create_instance("hup-db", "hup-key");
    let disable = d.act("hup-key", "disable");
    d.wait_event(disable["event_id"].as_str().unwrap());
    wait_until("the alert at the sink added by the reload", MIN, || {
        received.lock().unwrap().iter().any(|b| b["labels"]["alertname"] == "KeywardenKeyDisabled").then_some(())
    });
    assert!(d.log().contains("config reloaded"), "{}", d.log());
    assert!(d.log().contains("event handled"), "the debug/info lines now appear: {}", d.log());

    // Changing the consumer group needs a restart: refused whole, named, and
    // the daemon goes on as it was.
    std::fs::write(&config, "[log]\nlevel = \"warn\"\n[kafka]\ngroup_id = \"somebody-else\"\n").unwrap();
    d.signal("HUP");
    wait_until("the refusal in the log", MIN, || d.log().contains("config reload refused").then_some(()));
    assert!(d.log().contains("kafka.group_id"), "{}", d.log());
    let enable = d.act("hup-key", "enable");
    d.wait_event(enable["event_id"].as_str().unwrap());
    d.wait_state("hup-db", "active");
    assert_eq!(d.terminate(), Some(0));
}
