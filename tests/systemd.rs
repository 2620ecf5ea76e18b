//! Under systemd: the real binary speaks sd_notify to a socket we bind (READY
//! only once consuming, STATUS lines, watchdog pings from a turning loop,
//! STOPPING on SIGTERM), and the shipped unit verifies and stays hardened.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;

/// The shipped units: the daemon's and the data-plane agent's, each held
/// to the same checks.
const UNITS: &[(&str, &str)] =
    &[("keywarden.service", include_str!("../systemd/keywarden.service")), ("keywarden-agent.service", include_str!("../systemd/keywarden-agent.service"))];
const MAX_EXPOSURE: f64 = 2.0;

/// Every datagram the daemon sent, with when it arrived, collected by a thread
/// for as long as the test runs.
struct NotifySocket {
    path: PathBuf,
    seen: Arc<Mutex<Vec<(Instant, String)>>>,
    _dir: tempfile::TempDir,
}

impl NotifySocket {
    fn bind() -> NotifySocket {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let socket = UnixDatagram::bind(&path).unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let sink = seen.clone();
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 4096];
            while let Ok(n) = socket.recv(&mut buf) {
                sink.lock().unwrap().push((Instant::now(), String::from_utf8_lossy(&buf[..n]).into_owned()));
            }
        });
        NotifySocket { path, seen, _dir: dir }
    }

    fn messages(&self) -> Vec<(Instant, String)> {
        self.seen.lock().unwrap().clone()
    }

    fn wait_for(&self, what: &str, timeout: Duration, f: impl Fn(&[(Instant, String)]) -> bool) {
        wait_until(what, timeout, || f(&self.messages()).then_some(()));
    }
}

fn has(message: &str, assignment: &str) -> bool {
    message.lines().any(|l| l == assignment)
}

fn status_of(message: &str) -> Option<&str> {
    message.lines().find_map(|l| l.strip_prefix("STATUS="))
}

#[test]
fn daemon_reports_ready_status_watchdog_and_stopping_to_systemd() {
    let broker = Broker::start();
    let notify = NotifySocket::bind();
    // The master key as the unit hands it over: a read-only credential file.
    let creds = tempfile::tempdir().unwrap();
    let master = creds.path().join("master.key");
    std::fs::write(&master, "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=\n").unwrap();
    std::fs::set_permissions(&master, std::fs::Permissions::from_mode(0o400)).unwrap();
    let mut d = Daemon::start(
        &broker.bootstrap,
        &[("NOTIFY_SOCKET", notify.path.to_str().unwrap()), ("WATCHDOG_USEC", "2000000"), ("KEYWARDEN_KMS_LOCAL_MASTER_KEY_FILE", master.to_str().unwrap())],
    );
    assert!(d.is_ready());

    notify.wait_for("READY=1", Duration::from_secs(10), |m| m.iter().any(|(_, s)| has(s, "READY=1")));
    let all = notify.messages();
    let ready_at = all.iter().position(|(_, s)| has(s, "READY=1")).unwrap();
    let ready_status = status_of(&all[ready_at].1).expect("READY=1 comes with a status");
    assert!(ready_status.starts_with("ready: ") && !ready_status.starts_with("ready: 0 partitions"), "{ready_status}");
    let before: Vec<&str> = all[..ready_at].iter().filter_map(|(_, s)| status_of(s)).collect();
    assert!(before.iter().any(|s| s.starts_with("starting")), "no starting status before READY=1: {before:?}");
    let log = d.log();
    // A node alone assigns itself every partition (kafka.assignment "auto").
    let assigned = log.find("assigned every partition to this node alone").expect("the self-assignment in the log");
    let told = log.find("told systemd we are ready").expect("readiness logged");
    assert!(assigned < told, "READY=1 was sent before partitions were assigned");

    // A state change shows up in the periodic status.
    d.create_key("k1");
    d.create_instance("db-1", "k1");
    notify.wait_for("a status counting the new key", Duration::from_secs(10), |m| {
        m.iter().filter_map(|(_, s)| status_of(s)).any(|s| s.starts_with("ready: ") && s.contains("1 keys, 1 instances"))
    });

    // Pings keep coming at about half of WATCHDOG_USEC while idle: the
    // third arrives within 4 s (awaited, not slept for).
    let idle_from = Instant::now();
    let idle_pings = |m: &[(Instant, String)]| m.iter().filter(|(t, s)| *t >= idle_from && has(s, "WATCHDOG=1")).map(|(t, _)| *t).collect::<Vec<_>>();
    notify.wait_for("three watchdog pings while idle", Duration::from_secs(10), |m| idle_pings(m).len() >= 3);
    let third = idle_pings(&notify.messages())[2];
    assert!(third - idle_from <= Duration::from_secs(4), "only 2 watchdog pings in {:?} idle", third - idle_from);
    let pings: Vec<Instant> = notify.messages().iter().skip(ready_at).filter(|(_, s)| has(s, "WATCHDOG=1")).map(|(t, _)| *t).collect();
    let worst = pings.windows(2).map(|w| w[1] - w[0]).max().unwrap();
    println!("watchdog pings since READY=1: {}; longest gap {worst:?} (systemd's limit: 2s)", pings.len());
    assert!(worst < Duration::from_millis(1800), "a watchdog gap of {worst:?} would get keywarden killed");

    assert_eq!(d.terminate(), Some(0));
    // The daemon has exited, so everything it sent is queued on the socket;
    // a datagram of our own queues behind it, and once it is read so is every
    // notification of the daemon's run.
    UnixDatagram::unbound().unwrap().send_to(b"TEST_END=1", &notify.path).unwrap();
    notify.wait_for("the test's own end marker", Duration::from_secs(10), |m| m.iter().any(|(_, s)| has(s, "TEST_END=1")));
    let all = notify.messages();
    let stopping_at = all.iter().position(|(_, s)| has(s, "STOPPING=1")).expect("STOPPING=1 on SIGTERM");
    let stopping = &all[stopping_at];
    assert!(status_of(&stopping.1).is_some_and(|s| s.starts_with("stopping: draining")), "{}", stopping.1);
    let readies: Vec<usize> = all.iter().enumerate().filter(|(_, (_, s))| has(s, "READY=1")).map(|(i, _)| i).collect();
    assert_eq!(readies, [ready_at], "READY=1 is sent once, in {} notifications", all.len());
    assert!(ready_at < stopping_at, "STOPPING=1 (at {stopping_at}) came before READY=1 (at {ready_at})");
    println!("notify messages: {}; statuses: {:?}", all.len(), all.iter().filter_map(|(_, s)| status_of(s)).collect::<Vec<_>>());
}

fn systemd_analyze() -> Option<PathBuf> {
    std::env::var("PATH").unwrap_or_default().split(':').map(|d| Path::new(d).join("systemd-analyze")).find(|p| p.exists())
}

/// A shipped unit, pointed at the binary under test so that `verify` can
/// check ExecStart.
fn unit_for_test(dir: &Path, name: &str, unit: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, unit.replace("/usr/local/bin/keywarden", env!("CARGO_BIN_EXE_keywarden"))).unwrap();
    path
}

#[test]
fn shipped_units_verify_cleanly() {
    let Some(analyze) = required(systemd_analyze(), "systemd-analyze", "apt-get install systemd") else { return };
    let dir = tempfile::tempdir().unwrap();
    for (name, unit) in UNITS {
        let out = Command::new(&analyze).arg("verify").arg(unit_for_test(dir.path(), name, unit)).output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "systemd-analyze verify {name} failed:\n{stderr}");
        assert!(!stderr.contains(name), "systemd-analyze verify warns about {name}:\n{stderr}");
    }
}

#[test]
fn shipped_units_exposure_is_at_most_two() {
    let Some(analyze) = required(systemd_analyze(), "systemd-analyze", "apt-get install systemd") else { return };
    let dir = tempfile::tempdir().unwrap();
    for (name, unit) in UNITS {
        let out = Command::new(&analyze).args(["security", "--offline=yes"]).arg(unit_for_test(dir.path(), name, unit)).output().unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "systemd-analyze security {name} failed:\n{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
        let score: f64 = stdout
            .lines()
            .find_map(|l| l.split_once(&format!("Overall exposure level for {name}: ")))
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no exposure level for {name} in:\n{stdout}"));
        println!("systemd-analyze security exposure of {name}: {score} (limit {MAX_EXPOSURE})");
        assert!(score <= MAX_EXPOSURE, "{name}: exposure {score} is over {MAX_EXPOSURE}:\n{stdout}");
    }
}

/// The daemon finds a credential by the file name of the path it is configured
/// with, so each path the unit sets must name a credential it loads.
#[test]
fn unit_paths_name_the_credentials_it_loads() {
    let setting = |name: &str| -> Vec<&str> { UNITS[0].1.lines().filter_map(|l| l.strip_prefix(name)).collect() };
    assert_eq!(setting("Type="), ["notify"]);
    assert_eq!(setting("NotifyAccess="), ["main"]);
    assert_eq!(setting("WatchdogSec=").len(), 1);
    let loaded: Vec<&str> = setting("LoadCredential=").iter().map(|c| c.split(':').next().unwrap()).collect();
    for var in ["KEYWARDEN_KMS_LOCAL_MASTER_KEY_FILE", "KEYWARDEN_API_ADMIN_TOKEN_FILE", "KEYWARDEN_API_DEK_TOKEN_FILE"] {
        let value = setting("Environment=").iter().find_map(|e| e.strip_prefix(&format!("{var}="))).unwrap_or_else(|| panic!("{var} is not set"));
        let name = value.strip_prefix("%d/").unwrap_or_else(|| panic!("{var}={value} is not in the credentials directory (%d)"));
        assert!(loaded.contains(&name), "{var} names credential {name}, but the unit loads only {loaded:?}");
    }
}

/// SIGTERM lets the agent's running hook finish (a database mid-shutdown is
/// not cut short): only the main process is signalled first, and systemd
/// waits longer than any shipped hook may run.
#[test]
fn agent_unit_waits_for_the_running_hook_before_killing_it() {
    let unit = UNITS[1].1;
    let setting = |name: &str| -> Vec<&str> { unit.lines().filter_map(|l| l.strip_prefix(name)).collect() };
    assert_eq!(setting("ExecStart="), ["/usr/local/bin/keywarden agent --config /etc/keywarden/agent.toml"]);
    assert_eq!(setting("KillMode="), ["mixed"]);
    let stop = humantime::parse_duration(setting("TimeoutStopSec=")[0]).unwrap();
    let config: toml::Value = toml::from_str(include_str!("../config/agent.toml")).unwrap();
    for (action, hook) in config["hooks"].as_table().unwrap() {
        let timeout = humantime::parse_duration(hook["timeout"].as_str().unwrap()).unwrap();
        assert!(timeout < stop, "the {action} hook may run {timeout:?}, longer than TimeoutStopSec={stop:?}");
    }
}
