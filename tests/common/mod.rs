//! Test harness: a real tansu broker per test, the real `keywarden` binary, and a
//! plain Kafka client to produce events and read commands.
#![allow(dead_code)]

pub mod mariadb;

use std::io::{BufRead, BufReader, Read as _, Write as _};
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use serde_json::{json, Value};

pub mod agent;

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn tansu_bin() -> PathBuf {
    if let Ok(p) = std::env::var("TANSU_BIN") {
        return PathBuf::from(p);
    }
    for dir in std::env::var("PATH").unwrap_or_default().split(':') {
        let p = PathBuf::from(dir).join("tansu");
        if p.exists() {
            return p;
        }
    }
    let home = PathBuf::from(std::env::var("HOME").unwrap_or_default()).join(".cargo/bin/tansu");
    assert!(home.exists(), "tansu is not installed: run .ci/run, or cargo install tansu --version 0.6.0 --locked --features dynostore,libsql");
    home
}

pub fn wait_until<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(start.elapsed() < timeout, "timed out after {timeout:?} waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Every DEK release the audit entries name (`what: release dek`, one entry
/// per batch of releases), each with its entry's `who` and `outcome` beside
/// its own fields.
pub fn releases(entries: &[Value]) -> Vec<Value> {
    entries
        .iter()
        .filter(|e| e["what"] == "release dek")
        .flat_map(|e| {
            e["releases"].as_array().cloned().unwrap_or_default().into_iter().map(move |mut r| {
                for field in ["who", "outcome"] {
                    r[field] = e[field].clone();
                }
                r
            })
        })
        .collect()
}

/// A real tansu broker on a free loopback port, killed on drop. In memory by
/// default; `start_durable` keeps its data in SQLite across `stop`/`restart`.
pub struct Broker {
    child: Option<Child>,
    pub bootstrap: String,
    pub dir: tempfile::TempDir,
    storage: String,
    port: u16,
}

impl Broker {
    pub fn start() -> Broker {
        Self::start_with("memory://tansu/")
    }

    pub fn start_durable() -> Broker {
        Self::start_with("sqlite://tansu.db")
    }

    fn start_with(storage: &str) -> Broker {
        let port = free_port();
        let dir = tempfile::tempdir().unwrap();
        let mut b = Broker { child: None, bootstrap: format!("127.0.0.1:{port}"), dir, storage: storage.to_string(), port };
        b.restart();
        b
    }

    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGSTOP or SIGCONT: a broker that hangs with its connections open.
    pub fn signal(&self, name: &str) {
        let pid = self.child.as_ref().expect("running").id().to_string();
        let status = Command::new("kill").args([&format!("-{name}"), &pid]).status().unwrap();
        assert!(status.success(), "kill -{name} {pid}");
    }

    pub fn restart(&mut self) {
        assert!(self.child.is_none());
        let url = format!("tcp://127.0.0.1:{}", self.port);
        let log = std::fs::OpenOptions::new().create(true).append(true).open(self.dir.path().join("tansu.log")).unwrap();
        let child = Command::new(tansu_bin())
            .args(["broker", "--storage-engine", &self.storage, "--listener-url", &url, "--advertised-listener-url", &url])
            .current_dir(self.dir.path())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start tansu");
        self.child = Some(child);
        wait_until("tansu to listen", Duration::from_secs(30), || std::net::TcpStream::connect(&self.bootstrap).ok());
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The real keywarden binary with its own store, API port and consumer group.
pub struct Daemon {
    child: Option<Child>,
    pub api: String,
    pub dir: tempfile::TempDir,
    pub http: reqwest::blocking::Client,
    bootstrap: String,
    port: u16,
    env: Vec<(String, String)>,
    /// The admin token the daemon created on first run.
    pub admin_token: String,
    /// The legacy shared DEK token, only for a daemon started with
    /// `KEYWARDEN_API_SHARED_DEK_TOKEN=true` (otherwise no file is made).
    pub shared_dek_token: Option<String>,
}

/// Every instance's own DEK token, as its creation (or the last rotation of
/// its credential) answered it, by broker and instance: process-wide, so that
/// an instance created through one node of a cluster is fetched on another,
/// and keyed by the broker too, so that tests running at once may reuse ids.
static DEK_TOKENS: std::sync::Mutex<Option<std::collections::HashMap<(String, String), String>>> = std::sync::Mutex::new(None);

fn remember_dek_token(bootstrap: &str, instance_id: &str, token: &str) {
    DEK_TOKENS.lock().unwrap_or_else(|e| e.into_inner()).get_or_insert_with(Default::default).insert((bootstrap.into(), instance_id.into()), token.into());
}

/// The DEK token an instance on the broker at `bootstrap` was given last.
fn dek_token(bootstrap: &str, instance_id: &str) -> Option<String> {
    DEK_TOKENS.lock().unwrap_or_else(|e| e.into_inner()).as_ref()?.get(&(bootstrap.to_string(), instance_id.to_string())).cloned()
}

impl Daemon {
    pub fn start(bootstrap: &str, env: &[(&str, &str)]) -> Daemon {
        let mut d = Daemon::start_unready(bootstrap, env);
        d.wait_ready();
        d
    }

    /// Starts the process without waiting for it to be ready.
    pub fn start_unready(bootstrap: &str, env: &[(&str, &str)]) -> Daemon {
        Daemon::start_unready_on(free_port(), bootstrap, env)
    }

    /// As `start`, with its API on `port` (chosen before, so that other
    /// nodes can be told where it will be).
    pub fn start_on(port: u16, bootstrap: &str, env: &[(&str, &str)]) -> Daemon {
        let mut d = Daemon::start_unready_on(port, bootstrap, env);
        d.wait_ready();
        d
    }

    fn start_unready_on(port: u16, bootstrap: &str, env: &[(&str, &str)]) -> Daemon {
        let dir = tempfile::tempdir().unwrap();
        // A test that turns TLS on names the CA to trust the way the CLI takes it.
        let ca = env.iter().find(|(k, _)| *k == "KEYWARDEN_API_CA_CERT").map(|(_, v)| std::fs::read(v).unwrap());
        let api = format!("{}://127.0.0.1:{port}", if ca.is_some() { "https" } else { "http" });
        let http = match ca {
            Some(pem) => reqwest::blocking::Client::builder().add_root_certificate(reqwest::Certificate::from_pem(&pem).unwrap()).build().unwrap(),
            None => reqwest::blocking::Client::new(),
        };
        let env = env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        let mut d = Daemon { child: None, api, dir, http, bootstrap: bootstrap.to_string(), port, env, admin_token: String::new(), shared_dek_token: None };
        d.spawn();
        d
    }

    /// Starts the process again on the same store, port and settings.
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "stop it first");
        self.spawn();
        self.wait_ready();
    }

    /// Starts the process again without waiting for it to be ready.
    pub fn respawn(&mut self) {
        assert!(self.child.is_none(), "stop it first");
        self.spawn();
    }

    pub fn is_ready(&self) -> bool {
        self.http.get(format!("{}/readyz", self.api)).send().map(|r| r.status() == 200).unwrap_or(false)
    }

    fn spawn(&mut self) {
        let (bootstrap, port) = (self.bootstrap.clone(), self.port);
        let log = std::fs::OpenOptions::new().create(true).append(true).open(self.dir.path().join("keywarden.log")).unwrap();
        // Every test daemon accepts events signed with the one test secret, so
        // that `produce` can sign without knowing which daemon reads.
        let secret = self.dir.path().join("event-hmac.key");
        std::fs::write(&secret, TEST_EVENT_SECRET).unwrap();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_keywarden"));
        cmd.arg("run")
            .env("KEYWARDEN_KAFKA_BROKERS", bootstrap)
            .env("KEYWARDEN_STORE_PATH", self.dir.path().join("store"))
            .env("KEYWARDEN_KMS_LOCAL_MASTER_KEY_FILE", self.dir.path().join("master.key"))
            .env("KEYWARDEN_API_LISTEN", format!("127.0.0.1:{port}"))
            .env("KEYWARDEN_API_ADMIN_TOKEN_FILE", self.dir.path().join("admin.token"))
            .env("KEYWARDEN_API_DEK_TOKEN_FILE", self.dir.path().join("dek.token"))
            .env("KEYWARDEN_SIGNATURES_HMAC_KEY_FILE", &secret)
            .env("KEYWARDEN_LOG", "info,keywarden=debug")
            // Tests change key states in their KMS on purpose, between an event
            // and the next; a scheduled reconciliation landing in that gap
            // would rightly correct it and race the test. The one test about
            // reconciliation turns it back on.
            .env("KEYWARDEN_RECONCILE_SCHEDULE", "")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        self.child = Some(cmd.spawn().expect("start keywarden"));
    }

    pub fn wait_ready(&mut self) {
        let api = self.api.clone();
        let http = self.http.clone();
        let started = Instant::now();
        loop {
            if let Ok(r) = http.get(format!("{api}/readyz")).send() {
                if r.status() == 200 {
                    break;
                }
            }
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("keywarden exited with {status} during start-up; log:\n{}", self.log());
            }
            assert!(started.elapsed() < Duration::from_secs(90), "keywarden not ready after 90s; log:\n{}", self.log());
            std::thread::sleep(Duration::from_millis(50));
        }
        // A test may give several nodes the same token files.
        let file = |var: &str, name: &str| self.env.iter().find(|(k, _)| k == var).map(|(_, v)| PathBuf::from(v)).unwrap_or_else(|| self.dir.path().join(name));
        let read = |path: PathBuf| std::fs::read_to_string(path).map(|t| t.trim().to_string());
        self.admin_token = read(file("KEYWARDEN_API_ADMIN_TOKEN_FILE", "admin.token")).unwrap();
        let shared = self.env.iter().any(|(k, v)| k == "KEYWARDEN_API_SHARED_DEK_TOKEN" && v == "true");
        self.shared_dek_token = shared.then(|| read(file("KEYWARDEN_API_DEK_TOKEN_FILE", "dek.token")).unwrap());
    }

    /// The last 300 lines of the daemon's log, for failure messages.
    pub fn log(&self) -> String {
        let all = std::fs::read_to_string(self.dir.path().join("keywarden.log")).unwrap_or_default();
        let lines: Vec<&str> = all.lines().collect();
        lines[lines.len().saturating_sub(300)..].join("\n")
    }

    /// The token a caller of this path holds: the DEK endpoint takes the
    /// instance's own DEK token; everything else the admin token.
    fn token(&self, path: &str) -> String {
        match path.strip_prefix("/v1/instances/").and_then(|p| p.strip_suffix("/dek")) {
            Some(id) => self.dek_token_for(id),
            None => self.admin_token.clone(),
        }
    }

    /// The instance's own DEK token (from its creation or the last rotation),
    /// or else the shared one if this daemon opted in, or else none (which
    /// the DEK endpoint refuses).
    pub fn dek_token_for(&self, instance_id: &str) -> String {
        dek_token(&self.bootstrap, instance_id).or_else(|| self.shared_dek_token.clone()).unwrap_or_default()
    }

    pub fn get(&self, path: &str) -> (u16, Value) {
        let r = self.http.get(format!("{}{path}", self.api)).bearer_auth(self.token(path)).send().unwrap();
        decode(r)
    }

    /// Keeps the DEK token a creation or a credential rotation answers.
    pub fn post(&self, path: &str, body: Option<Value>) -> (u16, Value) {
        let mut req = self.http.post(format!("{}{path}", self.api)).bearer_auth(self.token(path));
        if let Some(b) = body {
            req = req.json(&b);
        }
        let (status, v) = decode(req.send().unwrap());
        let issued = (path == "/v1/instances" && status == 201) || (path.ends_with("/credential") && status == 200);
        if let (true, Some(id), Some(token)) = (issued, v["instance_id"].as_str(), v["dek_token"].as_str()) {
            remember_dek_token(&self.bootstrap, id, token);
        }
        (status, v)
    }

    pub fn post_raw(&self, path: &str, body: &'static str) -> (u16, Value) {
        decode(
            self.http.post(format!("{}{path}", self.api)).bearer_auth(self.token(path)).header("content-type", "application/json").body(body).send().unwrap(),
        )
    }

    pub fn delete(&self, path: &str) -> (u16, Value) {
        decode(self.http.delete(format!("{}{path}", self.api)).bearer_auth(self.token(path)).send().unwrap())
    }

    pub fn create_key(&self, key: &str) {
        let (s, v) = self.post("/v1/keys", Some(json!({ "key_id": key })));
        assert_eq!(s, 201, "{v}");
    }

    pub fn create_instance(&self, id: &str, key: &str) -> Value {
        let (s, v) = self.post("/v1/instances", Some(json!({"instance_id": id, "key_id": key})));
        assert_eq!(s, 201, "{v}");
        v
    }

    /// Operates the key through the embedded KMS; returns the emitted event.
    pub fn act(&self, key: &str, action: &str) -> Value {
        let (s, v) = self.post(&format!("/v1/keys/{key}/{action}"), None);
        assert_eq!(s, 202, "{action}: {v}");
        v
    }

    pub fn dek(&self, id: &str) -> (u16, Value) {
        self.post(&format!("/v1/instances/{id}/dek"), None)
    }

    pub fn state(&self, id: &str) -> String {
        let (s, v) = self.get(&format!("/v1/instances/{id}"));
        assert_eq!(s, 200, "{v}");
        v["state"].as_str().unwrap().to_string()
    }

    pub fn wait_state(&self, id: &str, want: &str) {
        wait_until(&format!("{id} to be {want}"), Duration::from_secs(30), || (self.state(id) == want).then_some(()));
    }

    pub fn wait_event(&self, event_id: &str) -> Value {
        wait_until(&format!("event {event_id} to be applied"), Duration::from_secs(30), || {
            let (s, v) = self.get(&format!("/v1/events/{event_id}"));
            (s == 200).then_some(v)
        })
    }

    pub fn wait_rotated(&self, key: &str, version: &str) -> Value {
        wait_until(&format!("{key} rotated to {version}"), Duration::from_secs(60), || {
            let (_, v) = self.get(&format!("/v1/keys/{key}"));
            (v["version"] == version && v["pending_rewraps"] == 0).then_some(v)
        })
    }

    /// Sends a signal by name ("HUP", "TERM", ...).
    pub fn signal(&self, name: &str) {
        let pid = self.child.as_ref().expect("running").id().to_string();
        let _ = Command::new("kill").args([&format!("-{name}"), &pid]).status();
    }

    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Two SIGTERMs back to back; returns the exit code.
    pub fn terminate_twice(&mut self) -> Option<i32> {
        let pid = self.child.as_ref()?.id().to_string();
        let _ = Command::new("kill").args(["-TERM", &pid]).status();
        std::thread::sleep(Duration::from_millis(20));
        let _ = Command::new("kill").args(["-TERM", &pid]).status();
        self.terminate()
    }

    /// Waits for the process to exit by itself; its exit code (None: by a signal).
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<i32> {
        let mut c = self.child.take().expect("running");
        let start = Instant::now();
        loop {
            if let Some(status) = c.try_wait().unwrap() {
                return status.code();
            }
            if start.elapsed() > timeout {
                let _ = c.kill();
                panic!("keywarden did not exit by itself within {timeout:?}; log:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGTERM, then wait for a clean exit; returns the exit code.
    pub fn terminate(&mut self) -> Option<i32> {
        let mut c = self.child.take()?;
        let _ = Command::new("kill").args(["-TERM", &c.id().to_string()]).status();
        let start = Instant::now();
        loop {
            if let Some(status) = c.try_wait().unwrap() {
                return status.code();
            }
            if start.elapsed() > Duration::from_secs(30) {
                let _ = c.kill();
                panic!("keywarden did not exit within 30s of SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            eprintln!("---- keywarden log ----\n{}", self.log());
        }
    }
}

fn decode(r: reqwest::blocking::Response) -> (u16, Value) {
    let status = r.status().as_u16();
    let text = r.text().unwrap_or_default();
    (status, if text.is_empty() { Value::Null } else { serde_json::from_str(&text).unwrap_or(Value::String(text)) })
}

pub fn producer(bootstrap: &str) -> BaseProducer {
    ClientConfig::new().set("bootstrap.servers", bootstrap).set("linger.ms", "0").set("partitioner", "murmur2_random").create().unwrap()
}

/// The HMAC secret every test daemon is given (signatures.hmac_key_file).
pub const TEST_EVENT_SECRET: &str = "keywarden-test-event-signing-secret-0123456789";

/// Produces an event signed as a trusted producer would.
pub fn produce(p: &BaseProducer, topic: &str, key: Option<&str>, payload: &[u8]) {
    let sig = keywarden::intake::signature::Signer::hmac("local", TEST_EVENT_SECRET.as_bytes()).sign(payload);
    produce_with_headers(p, topic, key, payload, &[(keywarden::intake::signature::HEADER, &sig)]);
}

pub fn produce_with_headers(p: &BaseProducer, topic: &str, key: Option<&str>, payload: &[u8], headers: &[(&str, &str)]) {
    let mut owned = rdkafka::message::OwnedHeaders::new();
    for (k, v) in headers {
        owned = owned.insert(rdkafka::message::Header { key: k, value: Some(*v) });
    }
    let mut rec = BaseRecord::<str, [u8]>::to(topic).payload(payload).headers(owned);
    if let Some(k) = key {
        rec = rec.key(k);
    }
    p.send(rec).map_err(|(e, _)| e).unwrap();
    p.flush(Duration::from_secs(10)).unwrap();
}

/// An `occurred_at` `secs` seconds from now. keywarden dead-letters an event
/// dated more than `signatures.max_clock_skew` (5 minutes) ahead of its
/// clock, so test events are dated from now, not in a far future: dated when
/// it is made, an event is newer than everything applied before it, and one
/// made right after another with a smaller `secs` is older (stale).
pub fn soon(secs: i64) -> String {
    soon_at(secs).to_rfc3339_opts(chrono::SecondsFormat::Micros, true)
}

/// [`soon`] as a time, for formats that write it their own way.
pub fn soon_at(secs: i64) -> chrono::DateTime<chrono::Utc> {
    chrono::Utc::now() + chrono::Duration::seconds(secs)
}

pub fn event(id: &str, kind: &str, key: &str, version: Option<&str>, at: &str) -> Vec<u8> {
    let mut v = json!({"event_id": id, "type": kind, "key_id": key, "occurred_at": at});
    if let Some(ver) = version {
        v["key_version"] = json!(ver);
    }
    serde_json::to_vec(&v).unwrap()
}

/// A message read back from a topic.
#[derive(Debug, Clone)]
pub struct Read {
    pub key: Option<String>,
    pub payload: Vec<u8>,
    pub headers: Vec<(String, String)>,
    pub partition: i32,
    pub offset: i64,
}

impl Read {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.payload).unwrap()
    }
    pub fn header(&self, k: &str) -> Option<&str> {
        self.headers.iter().find(|(hk, _)| hk == k).map(|(_, v)| v.as_str())
    }
}

/// The `n` data-plane commands of `action` that event `cause` caused, once
/// all are on the topic.
pub fn commands_of(reader: &mut TopicReader, action: &str, cause: &str, n: usize) -> Vec<Read> {
    let ours = |m: &Read| m.json()["action"] == action && m.json()["cause_event_id"] == cause;
    reader
        .read_until(&format!("{n} {action} commands of {cause}"), Duration::from_secs(60), |r| r.iter().filter(|m| ours(m)).count() >= n)
        .iter()
        .filter(|m| ours(m))
        .cloned()
        .collect()
}

/// Reads a topic from the beginning until `done` holds for what was read.
pub struct TopicReader {
    consumer: BaseConsumer,
    pub seen: Vec<Read>,
}

impl TopicReader {
    pub fn new(bootstrap: &str, topic: &str) -> TopicReader {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", bootstrap)
            .set("group.id", format!("test-reader-{}", uuid::Uuid::new_v4()))
            .set("auto.offset.reset", "earliest")
            .set("enable.auto.commit", "false")
            .set("fetch.wait.max.ms", "50")
            .create()
            .unwrap();
        consumer.subscribe(&[topic]).unwrap();
        TopicReader { consumer, seen: Vec::new() }
    }

    pub fn read_until(&mut self, what: &str, timeout: Duration, mut done: impl FnMut(&[Read]) -> bool) -> &[Read] {
        let start = Instant::now();
        while !done(&self.seen) {
            assert!(start.elapsed() < timeout, "timed out waiting for {what}; read so far: {:#?}", self.seen.len());
            self.poll_one(Duration::from_millis(100));
        }
        &self.seen
    }

    /// Reads until nothing arrives for `idle`; returns how many were read.
    pub fn drain(&mut self, idle: Duration) -> usize {
        let before = self.seen.len();
        while self.poll_one(idle) {}
        self.seen.len() - before
    }

    fn poll_one(&mut self, wait: Duration) -> bool {
        {
            if let Some(Ok(m)) = self.consumer.poll(wait) {
                // As bytes: rdkafka's own header iterator panics on a name that
                // is not UTF-8, and a dead letter keeps such a name.
                let headers = keywarden::intake::headers::raw(&m)
                    .iter()
                    .map(|h| (String::from_utf8_lossy(h.name).into_owned(), h.value.map(|v| String::from_utf8_lossy(v).into_owned()).unwrap_or_default()))
                    .collect();
                self.seen.push(Read {
                    key: m.key().map(|k| String::from_utf8_lossy(k).into_owned()),
                    payload: m.payload().unwrap_or_default().to_vec(),
                    headers,
                    partition: m.partition(),
                    offset: m.offset(),
                });
                return true;
            }
        }
        false
    }

    /// Commands read so far with the given action and cause.
    pub fn commands(&self, action: &str, cause: &str) -> Vec<Value> {
        self.seen.iter().map(Read::json).filter(|c| c["action"] == action && c["cause_event_id"] == cause).collect()
    }
}

/// Produces one unsigned message with kafka-python, an independent client, as
/// anyone who can write to the topic could (an EventBridge or Activity Tracker
/// route, or an attacker). Its default partitioner is Kafka's murmur2, so a
/// keyed message lands where keywarden's own producers put that key.
pub fn produce_as_outsider(bootstrap: &str, topic: &str, key: &str, payload: &[u8]) {
    const SEND: &str = r#"
import sys
from kafka import KafkaProducer
bootstrap, topic, key = sys.argv[1:4]
p = KafkaProducer(bootstrap_servers=bootstrap, acks="all")
p.send(topic, key=key.encode(), value=sys.stdin.buffer.read()).get(timeout=30)
p.close()
"#;
    let mut child = Command::new("python3")
        .args(["-c", SEND, bootstrap, topic, key])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python3");
    std::io::Write::write_all(child.stdin.as_mut().unwrap(), payload).unwrap();
    drop(child.stdin.take());
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "kafka-python failed (pip install kafka-python): {}", String::from_utf8_lossy(&out.stderr));
}

/// `keywarden_security_events_total{reason}` as the daemon reports it now.
pub fn security_events(d: &Daemon, reason: &str) -> u64 {
    let text = d.http.get(format!("{}/metrics", d.api)).send().unwrap().text().unwrap();
    let series = format!("keywarden_security_events_total{{reason=\"{reason}\"}}");
    text.lines().find(|l| l.starts_with(&series)).and_then(|l| l.rsplit(' ').next()?.parse().ok()).unwrap_or(0)
}

/// Reads the dead-letter topic until a message whose reason contains `needle`
/// arrives, and returns that reason.
pub fn wait_dead_letter(dlq: &mut TopicReader, needle: &str) -> String {
    let found = |r: &[Read]| r.iter().filter_map(|m| m.header("keywarden.reason")).find(|reason| reason.contains(needle)).map(str::to_owned);
    let read = dlq.read_until(&format!("a dead letter naming {needle:?}"), Duration::from_secs(60), |r| found(r).is_some()).to_vec();
    found(&read).unwrap()
}

/// A real component a test needs (Prometheus, Alertmanager, systemd-analyze).
/// When it is missing the test fails, naming how to install it, unless
/// `KEYWARDEN_TEST_SKIP_MISSING=1` asks to skip it instead (CI never does).
pub fn required<T>(found: Option<T>, what: &str, install: &str) -> Option<T> {
    if found.is_some() {
        return found;
    }
    if std::env::var("KEYWARDEN_TEST_SKIP_MISSING").as_deref() == Ok("1") {
        println!("SKIPPED: {what} is not installed ({install}); KEYWARDEN_TEST_SKIP_MISSING=1");
        return None;
    }
    panic!("{what} is not installed: {install}; or set KEYWARDEN_TEST_SKIP_MISSING=1 to skip the tests that need it");
}

/// moto_server, a real implementation of the AWS KMS API, on a free port.
pub struct Moto {
    child: Child,
    pub url: String,
}

impl Moto {
    pub fn start() -> Moto {
        let port = free_port();
        let child = Command::new("python3")
            .args(["-m", "moto.server", "-p", &port.to_string(), "-H", "127.0.0.1"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("python3 -m moto.server (pip install 'moto[server]')");
        let url = format!("http://127.0.0.1:{port}");
        wait_until("moto_server to listen", Duration::from_secs(30), || std::net::TcpStream::connect(("127.0.0.1", port)).ok());
        Moto { child, url }
    }

    /// Runs boto3 against moto, as the customer operating their key would.
    pub fn boto(&self, code: &str) -> String {
        let script = format!(
            "import boto3, sys\nkms = boto3.client('kms', region_name='us-east-1', endpoint_url='{}', aws_access_key_id='testing', aws_secret_access_key='testing')\n{code}\n",
            self.url
        );
        let out = Command::new("python3").args(["-c", &script]).output().unwrap();
        assert!(out.status.success(), "boto3: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }
}

impl Moto {
    /// The KMS goes away: every call to it fails from now on.
    pub fn stop(&mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        // Already stopped, or stopping it now: either way it is gone.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A webhook receiver: records every JSON body POSTed to it.
pub fn webhook() -> (String, Arc<Mutex<Vec<Value>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    let seen = Arc::new(Mutex::new(Vec::new()));
    let sink = seen.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let mut reader = BufReader::new(stream);
            let mut length = 0;
            loop {
                let mut line = String::new();
                if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                    break;
                }
                if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                    length = v.trim().parse().unwrap_or(0);
                }
            }
            let mut body = vec![0; length];
            if reader.read_exact(&mut body).is_ok() {
                if let Ok(v) = serde_json::from_slice(&body) {
                    sink.lock().unwrap().push(v);
                }
            }
            let _ = reader.into_inner().write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: close\r\n\r\n");
        }
    });
    (url, seen)
}
