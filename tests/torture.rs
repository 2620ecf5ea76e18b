//! Kill torture: the real binary over the real broker, killed with SIGKILL at
//! random moments while a key with 2,000 instances is rotated, disabled and
//! enabled. Nothing may be lost, nothing applied twice, no DEK ever changes.

mod common;

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use common::*;
use rand::{Rng, SeedableRng};

const INSTANCES: usize = 2000;
const KEY: &str = "torture-key";

#[test]
fn sigkill_at_random_moments_loses_no_dek_and_leaves_every_instance_right() {
    let started = Instant::now();
    let seed: u64 = std::env::var("TORTURE_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(|| rand::thread_rng().gen());
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    println!("torture seed {seed} (TORTURE_SEED to replay)");

    let broker = Broker::start();
    // Small rewrap batches and modest concurrency: more commits per rotation, so
    // more moments at which a kill lands between two of them.
    let mut d = Daemon::start(&broker.bootstrap, &[("KEYWARDEN_ROTATION_BATCH", "50"), ("KEYWARDEN_ROTATION_CONCURRENCY", "4")]);
    let mut commands = TopicReader::new(&broker.bootstrap, "instance-commands");
    let events = producer(&broker.bootstrap);

    d.create_key(KEY);
    let ids: Vec<String> = (0..INSTANCES).map(|i| format!("t-{i:04}")).collect();
    std::thread::scope(|s| {
        for chunk in ids.chunks(INSTANCES / 4) {
            let d = &d;
            s.spawn(move || {
                for id in chunk {
                    d.create_instance(id, KEY);
                }
            });
        }
    });
    let original: HashMap<String, String> = ids.iter().map(|id| (id.clone(), d.dek(id).1["dek"].as_str().unwrap().to_string())).collect();
    println!("set up {INSTANCES} instances in {:.1?}", started.elapsed());

    // The operator's actions; each is followed by a kill at a random moment.
    let mut plan = Vec::new();
    for round in 0..24 {
        plan.push(match round % 6 {
            2 => "disable",
            3 => "enable",
            _ => "rotate",
        });
    }
    let mut version = 1;
    let mut key_disabled = false;
    let mut revocations: Vec<(String, &str)> = Vec::new();
    let mut kills = 0;
    let mut mid_rotation = 0;
    let mut recovery = Vec::new();
    for (i, action) in plan.iter().enumerate() {
        let ev = d.act(KEY, action);
        match *action {
            "rotate" => version += 1,
            "disable" => {
                key_disabled = true;
                revocations.push((ev["event_id"].as_str().unwrap().to_string(), "revoke"));
            }
            _ => {
                key_disabled = false;
                revocations.push((ev["event_id"].as_str().unwrap().to_string(), "restore"));
            }
        }
        std::thread::sleep(Duration::from_millis(rng.gen_range(0..400)));
        let (_, key) = d.get(&format!("/v1/keys/{KEY}"));
        let rotating = key["pending_rewraps"].as_u64().unwrap_or(0) > 0 && !key_disabled;
        d.kill();
        kills += 1;
        if rotating {
            mid_rotation += 1;
        }
        // A probe event for another key, produced while the daemon is down: the
        // time until it is applied is the restart-to-processing time.
        let probe = format!("probe-{i}");
        produce(&events, "key-lifecycle", Some("probe-key"), &event(&probe, "disable", "probe-key", None, &soon(0)));
        let restarted = Instant::now();
        d.respawn();
        wait_until("the probe event after restart", Duration::from_secs(90), || {
            let r = d.http.get(format!("{}/v1/events/{probe}", d.api)).bearer_auth(&d.admin_token).send();
            r.ok().filter(|r| r.status() == 200).map(|_| ())
        });
        recovery.push(restarted.elapsed());
    }

    // Let the last rotation finish, then check every instance.
    let final_version = version.to_string();
    let key = d.wait_rotated(KEY, &final_version);
    assert_eq!(key["state"], "active", "{key}");
    assert_eq!(key["rewrap_failures"].as_array().map(Vec::len), Some(0), "{key}");
    let (_, list) = d.get(&format!("/v1/instances?key_id={KEY}"));
    let list = list["instances"].as_array().unwrap().clone();
    assert_eq!(list.len(), INSTANCES);
    for inst in &list {
        assert_eq!(inst["state"], "active", "{inst}");
        assert_eq!(inst["key_version"], final_version.as_str(), "left on an old version: {inst}");
    }
    for id in &ids {
        let (s, v) = d.dek(id);
        assert_eq!(s, 200, "{id}: {v}");
        assert_eq!(v["dek"].as_str().unwrap(), original[id], "{id}: the DEK changed or was lost");
    }

    // Every command expected was published at least once: a revoke or restore per
    // instance for each disable and enable, and a rewrapped to the final version.
    let expected = INSTANCES * (revocations.len() + 1);
    let mut have: HashSet<(String, String)> = HashSet::new();
    let mut scanned = 0;
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        commands.drain(Duration::from_millis(500));
        for m in &commands.seen[scanned..] {
            let c = m.json();
            let inst = c["instance_id"].as_str().unwrap_or_default().to_string();
            if c["action"] == "rewrapped" && c["key_version"] == final_version.as_str() {
                have.insert(("final".into(), inst));
            } else if revocations.iter().any(|(cause, action)| c["cause_event_id"] == cause.as_str() && c["action"] == *action) {
                have.insert((c["cause_event_id"].as_str().unwrap().to_string(), inst));
            }
        }
        scanned = commands.seen.len();
        if have.len() >= expected {
            break;
        }
        assert!(Instant::now() < deadline, "only {} of {expected} expected commands were published", have.len());
    }
    let mut duplicates = 0;
    let mut ids_seen = HashSet::new();
    for m in &commands.seen {
        if !ids_seen.insert(m.json()["command_id"].as_str().unwrap().to_string()) {
            duplicates += 1;
        }
    }

    recovery.sort();
    let p50 = recovery[recovery.len() / 2];
    let max = *recovery.last().unwrap();
    println!("TORTURE: {kills} SIGKILLs, {mid_rotation} of them mid-rotation; {INSTANCES} instances; {} rotations; final version {final_version}", version - 1);
    println!("TORTURE: restart-to-processing p50 {p50:.2?}, max {max:.2?} (static group membership on tansu)");
    println!("TORTURE: {} commands read, {duplicates} re-sent after crashes (same command_id); total {:.1?}", commands.seen.len(), started.elapsed());
    // Timing is printed, not asserted: this machine is shared and noisy.
    assert!(kills >= 20);
}
