//! A real Prometheus scrapes the real daemon: the exposition parses, the series
//! carry the labels the README promises, and their values follow what the
//! daemon did (events by type and outcome, rewraps by provider, instances by
//! state, consumer lag, build info).

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::*;
use serde_json::Value;

const MIN: Duration = Duration::from_secs(60);

fn prometheus_bin() -> Option<PathBuf> {
    std::env::var("PATH")
        .unwrap_or_default()
        .split(':')
        .map(|dir| Path::new(dir).join("prometheus"))
        .chain([PathBuf::from("/usr/bin/prometheus")])
        .find(|p| p.is_file())
}

/// A Prometheus server scraping one target every second; killed on drop, so a
/// failing assertion leaves no process behind. Prints its log if the test fails.
struct Prometheus {
    child: Child,
    dir: tempfile::TempDir,
    url: String,
    http: reqwest::blocking::Client,
}

impl Prometheus {
    fn start(bin: &Path, target: &str) -> Prometheus {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nscrape_configs:\n  - job_name: keywarden\n    scrape_interval: 1s\n    scrape_timeout: 1s\n    metrics_path: /metrics\n    static_configs:\n      - targets: ['{target}']\n"
            ),
        )
        .unwrap();
        let port = free_port();
        let log = std::fs::File::create(dir.path().join("prometheus.log")).unwrap();
        let child = Command::new(bin)
            .arg(format!("--config.file={}", config.display()))
            .arg(format!("--storage.tsdb.path={}", dir.path().join("data").display()))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start prometheus");
        let p = Prometheus { child, dir, url: format!("http://127.0.0.1:{port}"), http: reqwest::blocking::Client::new() };
        wait_until("prometheus to be ready", MIN, || p.http.get(format!("{}/-/ready", p.url)).send().ok().filter(|r| r.status() == 200));
        p
    }

    /// The instant vector for `query`: (labels, value) per series.
    fn query(&self, query: &str) -> Vec<(Value, String)> {
        let Ok(resp) = self.http.get(format!("{}/api/v1/query", self.url)).query(&[("query", query)]).send() else { return vec![] };
        let body: Value = resp.json().unwrap_or(Value::Null);
        assert_ne!(body["status"], "error", "prometheus refused {query}: {body}");
        body["data"]["result"]
            .as_array()
            .map(|series| series.iter().map(|s| (s["metric"].clone(), s["value"][1].as_str().unwrap_or_default().to_string())).collect())
            .unwrap_or_default()
    }

    /// Waits until `query` has a series whose labels include `labels` and whose value is `value`.
    fn wait_for(&self, query: &str, labels: &[(&str, &str)], value: &str) {
        self.wait_until(query, |series| series.iter().any(|(m, v)| v == value && labels.iter().all(|(k, want)| m[*k] == *want)));
    }

    fn wait_until(&self, query: &str, done: impl Fn(&[(Value, String)]) -> bool) {
        let start = std::time::Instant::now();
        loop {
            let series = self.query(query);
            if done(&series) {
                return;
            }
            assert!(start.elapsed() < MIN, "{query} did not reach the expected value in {MIN:?}; last answer: {series:?}");
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("prometheus.log")).unwrap_or_default()
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("---- prometheus log ----\n{}", self.log());
        }
    }
}

#[test]
fn prometheus_scrapes_events_rewraps_instances_lag_and_build_info() {
    let Some(bin) = required(prometheus_bin(), "prometheus (on PATH or at /usr/bin/prometheus)", "apt-get install prometheus") else { return };
    let broker = Broker::start();
    let d = Daemon::start(&broker.bootstrap, &[]);
    d.create_key("pk");
    for i in 0..3 {
        d.create_instance(&format!("p-{i}"), "pk");
    }
    d.act("pk", "rotate");
    d.wait_rotated("pk", "2");
    let ev = d.act("pk", "disable");
    d.wait_event(ev["event_id"].as_str().unwrap());
    produce(&producer(&broker.bootstrap), "key-lifecycle", Some("pk"), b"{not json");

    let prom = Prometheus::start(&bin, d.api.trim_start_matches("http://"));
    prom.wait_for("up", &[("job", "keywarden")], "1");
    prom.wait_for("keywarden_events_total", &[("type", "rotate"), ("outcome", "applied")], "1");
    prom.wait_for("keywarden_events_total", &[("type", "disable"), ("outcome", "applied")], "1");
    prom.wait_for("keywarden_events_total", &[("type", "unknown"), ("outcome", "dead_lettered")], "1");
    prom.wait_for("keywarden_events_consumed_total", &[("type", "disable")], "1");
    prom.wait_for("keywarden_build_info", &[("version", env!("CARGO_PKG_VERSION"))], "1");
    // Labelled with the provider that did the work, not the router in front of it.
    prom.wait_for("keywarden_rewrap_seconds_count", &[("provider", "local")], "3");
    prom.wait_for("keywarden_event_to_action_seconds_count", &[("type", "disable")], "1");
    prom.wait_for("keywarden_instances", &[("state", "revoked")], "3");
    prom.wait_for("keywarden_rotations_active", &[], "0");
    // Everything produced has been applied, so every assigned partition shows no lag.
    prom.wait_until("keywarden_consumer_lag", |series| !series.is_empty() && series.iter().all(|(m, v)| m["partition"].is_string() && v == "0"));
    // Each revoke went out as one command.
    prom.wait_for("keywarden_commands_published_total", &[("action", "revoke")], "3");
}
