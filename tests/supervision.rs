//! Supervision: a critical task that stops takes the whole daemon down, with
//! a reason, so that systemd restarts it. Each task is stopped through the
//! fault hook (KEYWARDEN_FAULT_INJECT) of the real binary.

mod common;

use std::time::Duration;

use common::*;

/// Every long-running task of a single node with its changelog replica.
const TASKS: &[&str] = &[
    "api",
    "relay",
    "rotation",
    "purge",
    "notify",
    "alerts",
    "alert-resend",
    "monitor",
    "reconcile",
    "reload",
    "replica",
    "replica-watermarks",
    // A group of one's changelog publisher (cluster::deferred).
    "changelog",
    "intake-probe",
    "intake-lag",
    "intake-orphans",
    "dek-audit",
];

#[test]
fn each_critical_task_that_panics_or_ends_makes_the_daemon_exit_non_zero_naming_it() {
    let broker = Broker::start();
    for (n, task) in TASKS.iter().enumerate() {
        // Every task panics once; two of them end quietly instead.
        let kind = if n % 6 == 5 { "exit" } else { "panic" };
        let fault = format!("{kind}:{task}");
        let mut d = Daemon::start_unready(&broker.bootstrap, &[("KEYWARDEN_FAULT_INJECT", &fault)]);
        // The fault fires 2 s after the task starts; the daemon must be gone
        // within kafka.drain_timeout (10 s) of it (start-up takes up to ~8 s).
        let code = d.wait_exit(Duration::from_secs(30));
        let log = std::fs::read_to_string(d.dir.path().join("keywarden.log")).unwrap();
        assert_eq!(code, Some(1), "{fault}: exit code; log:\n{}", d.log());
        let said = if kind == "panic" { format!("task {task} panicked") } else { format!("task {task} ended unexpectedly") };
        assert!(log.contains(&said), "{fault}: no log line naming it; log:\n{}", d.log());
    }
}

#[test]
fn readiness_turns_503_with_the_reason_before_the_daemon_exits() {
    let broker = Broker::start();
    // The API itself stays up while the intake drains: a dead relay is reported.
    let mut d = Daemon::start_unready(&broker.bootstrap, &[("KEYWARDEN_FAULT_INJECT", "panic:relay"), ("KEYWARDEN_KAFKA_DRAIN_TIMEOUT", "5s")]);
    let reason = wait_until("readyz to name the failure", Duration::from_secs(15), || {
        let r = d.http.get(format!("{}/readyz", d.api)).send().ok()?;
        let status = r.status().as_u16();
        let body: serde_json::Value = r.json().ok()?;
        (status == 503 && body["error"].as_str().unwrap_or_default().contains("task relay panicked")).then_some(body)
    });
    assert!(reason["error"].as_str().unwrap().contains("exiting"), "{reason}");
    assert_eq!(d.wait_exit(Duration::from_secs(20)), Some(1));
}
