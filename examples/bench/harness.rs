//! What every benchmark needs: a real tansu broker, the real keywarden binary,
//! a store seeded through keywarden's own library, signed events, and
//! latency statistics.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use chrono::Utc;
use keywarden::cluster::Ownership;
use keywarden::engine::{InstanceRecord, KeyRecord, Record, WrappedDek};
use keywarden::kms::local::LocalKms;
use keywarden::kms::{Dek, Kms};
use keywarden::store::writer::Writer;
use keywarden::store::Store;
use rdkafka::config::ClientConfig;
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};

pub type Res<T> = Result<T, Box<dyn std::error::Error + Send + Sync>>;

/// The HMAC secret every bench daemon accepts events under (kid "local").
pub const SECRET: &str = "keywarden-bench-event-signing-secret-0123456789";

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

pub fn wait_until<T>(what: &str, timeout: Duration, every: Duration, mut f: impl FnMut() -> Option<T>) -> Res<T> {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return Ok(v);
        }
        if start.elapsed() > timeout {
            return Err(format!("timed out after {timeout:?} waiting for {what}").into());
        }
        std::thread::sleep(every);
    }
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
    PathBuf::from(std::env::var("HOME").unwrap_or_default()).join(".cargo/bin/tansu")
}

/// A real tansu broker (in-memory storage) on a free loopback port; killed on drop.
pub struct Broker {
    child: Child,
    pub bootstrap: String,
    _dir: tempfile::TempDir,
}

impl Broker {
    pub fn start() -> Res<Broker> {
        let port = free_port();
        let dir = tempfile::tempdir()?;
        let url = format!("tcp://127.0.0.1:{port}");
        let log = std::fs::File::create(dir.path().join("tansu.log"))?;
        let child = Command::new(tansu_bin())
            .args(["broker", "--storage-engine", "memory://tansu/", "--listener-url", &url, "--advertised-listener-url", &url])
            .current_dir(dir.path())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .map_err(|e| format!("cannot start tansu ({e}); install it with scripts/install-test-deps.sh"))?;
        let bootstrap = format!("127.0.0.1:{port}");
        wait_until("tansu to listen", Duration::from_secs(30), Duration::from_millis(20), || std::net::TcpStream::connect(&bootstrap).ok())?;
        Ok(Broker { child, bootstrap, _dir: dir })
    }

    /// Sends the broker `kill -<signal>`: STOP hangs it with its connections
    /// open (nothing answered, nothing refused), CONT wakes it.
    pub fn signal(&self, signal: &str) -> Res<()> {
        let status = Command::new("kill").args([&format!("-{signal}"), &self.child.id().to_string()]).status()?;
        if !status.success() {
            return Err(format!("kill -{signal} tansu failed: {status}").into());
        }
        Ok(())
    }

    pub fn topic(&self, name: &str, partitions: u32) -> Res<()> {
        let status = Command::new(tansu_bin())
            .args(["topic", "create", name, "--broker", &format!("tcp://{}", self.bootstrap), "--partitions", &partitions.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()?;
        if !status.success() {
            return Err(format!("tansu topic create {name} failed: {status}").into());
        }
        Ok(())
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The keywarden binary next to this example, in the same profile; built first
/// (a no-op when fresh) so that the bench never measures a stale binary. Built
/// together with this example, so that cargo resolves the same features for
/// both (examples pull in dev-dependency features such as tokio's `test-util`)
/// and does not rebuild the library every other run.
pub fn keywarden_bin() -> Res<PathBuf> {
    // Another build to measure in the same session as this one (an A/B of two
    // commits on one machine), used as it is.
    if let Some(bin) = std::env::var_os("KEYWARDEN_BENCH_BIN") {
        return Ok(PathBuf::from(bin));
    }
    let exe = std::env::current_exe()?;
    let profile_dir = exe.parent().and_then(Path::parent).ok_or("cannot locate the target directory")?.to_path_buf();
    let release = profile_dir.file_name().map(|n| n == "release").unwrap_or(false);
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.args(["build", "--quiet", "--locked", "--bin", "keywarden", "--example", "bench"]);
    if release {
        cmd.arg("--release");
    }
    let status = cmd.current_dir(env!("CARGO_MANIFEST_DIR")).status()?;
    if !status.success() {
        return Err("building the keywarden binary failed".into());
    }
    Ok(profile_dir.join("keywarden"))
}

/// One keywarden process: its own directory (store, master key, tokens, log),
/// API port and environment.
pub struct Daemon {
    child: Option<Child>,
    bin: PathBuf,
    pub dir: PathBuf,
    pub api: String,
    port: u16,
    bootstrap: String,
    env: Vec<(String, String)>,
    pub admin_token: String,
    pub dek_token: String,
    pub http: reqwest::blocking::Client,
    pub spawned_at: Instant,
}

impl Daemon {
    /// Prepares the directory without starting: seed the store first, then `spawn`.
    pub fn new(bin: &Path, dir: &Path, bootstrap: &str, env: &[(&str, &str)]) -> Res<Daemon> {
        std::fs::create_dir_all(dir)?;
        std::fs::write(dir.join("event-hmac.key"), SECRET)?;
        let port = free_port();
        Ok(Daemon {
            child: None,
            bin: bin.to_path_buf(),
            dir: dir.to_path_buf(),
            api: format!("http://127.0.0.1:{port}"),
            port,
            bootstrap: bootstrap.to_string(),
            env: env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            admin_token: String::new(),
            dek_token: String::new(),
            http: reqwest::blocking::Client::builder().timeout(Duration::from_secs(60)).build()?,
            spawned_at: Instant::now(),
        })
    }

    pub fn store_path(&self) -> PathBuf {
        self.dir.join("store")
    }

    pub fn master_key(&self) -> PathBuf {
        self.dir.join("master.key")
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.join("keywarden.log")
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub fn spawn(&mut self) -> Res<()> {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(self.log_path())?;
        let mut cmd = Command::new(&self.bin);
        cmd.arg("run")
            .env("KEYWARDEN_KAFKA_BROKERS", &self.bootstrap)
            .env("KEYWARDEN_STORE_PATH", self.store_path())
            .env("KEYWARDEN_KMS_LOCAL_MASTER_KEY_FILE", self.master_key())
            .env("KEYWARDEN_API_LISTEN", format!("127.0.0.1:{}", self.port))
            .env("KEYWARDEN_API_ADMIN_TOKEN_FILE", self.dir.join("admin.token"))
            .env("KEYWARDEN_API_DEK_TOKEN_FILE", self.dir.join("dek.token"))
            // The seeded instances have no credentials of their own (as those
            // made before credentials existed), so the bench fetches with the
            // legacy shared token, which costs the same hash and compare.
            .env("KEYWARDEN_API_SHARED_DEK_TOKEN", "true")
            .env("KEYWARDEN_SIGNATURES_HMAC_KEY_FILE", self.dir.join("event-hmac.key"))
            .env("KEYWARDEN_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        self.spawned_at = Instant::now();
        self.child = Some(cmd.spawn()?);
        Ok(())
    }

    /// Polls `/readyz` every `every`; returns the time from spawn to ready.
    pub fn wait_ready(&mut self, every: Duration) -> Res<Duration> {
        let url = format!("{}/readyz", self.api);
        loop {
            if let Ok(r) = self.http.get(&url).send() {
                if r.status() == 200 {
                    break;
                }
            }
            if let Some(status) = self.child.as_mut().ok_or("not running")?.try_wait()? {
                return Err(format!("keywarden exited with {status} during start-up; see {}", self.log_path().display()).into());
            }
            if self.spawned_at.elapsed() > Duration::from_secs(120) {
                return Err(format!("keywarden not ready after 120 s; see {}", self.log_path().display()).into());
            }
            std::thread::sleep(every);
        }
        let took = self.spawned_at.elapsed();
        let read = |name: &str| std::fs::read_to_string(self.dir.join(name)).map(|s| s.trim().to_string());
        self.admin_token = read("admin.token")?;
        self.dek_token = read("dek.token")?;
        Ok(took)
    }

    pub fn start(&mut self) -> Res<Duration> {
        self.spawn()?;
        self.wait_ready(Duration::from_millis(10))
    }

    /// The exit status, if the process ended (by itself or by someone else).
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.as_mut().and_then(|c| c.try_wait().ok().flatten())
    }

    /// SIGKILL; returns once the process is gone.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM and wait for the clean exit (the store is flushed and unlocked).
    pub fn stop(&mut self) -> Res<()> {
        if let Some(mut c) = self.child.take() {
            let _ = Command::new("kill").args(["-TERM", &c.id().to_string()]).status();
            let start = Instant::now();
            while c.try_wait()?.is_none() {
                if start.elapsed() > Duration::from_secs(30) {
                    let _ = c.kill();
                    let _ = c.wait();
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        Ok(())
    }

    pub fn get(&self, path: &str) -> Res<(u16, serde_json::Value)> {
        let r = self.http.get(format!("{}{path}", self.api)).bearer_auth(&self.admin_token).send()?;
        let s = r.status().as_u16();
        Ok((s, r.json().unwrap_or(serde_json::Value::Null)))
    }

    /// POST with a JSON body and the admin token.
    pub fn post_json(&self, path: &str, body: &serde_json::Value) -> Res<(u16, serde_json::Value)> {
        let r = self.http.post(format!("{}{path}", self.api)).bearer_auth(&self.admin_token).json(body).send()?;
        let s = r.status().as_u16();
        Ok((s, r.json().unwrap_or(serde_json::Value::Null)))
    }

    pub fn post(&self, path: &str) -> Res<(u16, serde_json::Value)> {
        let token = if path.ends_with("/dek") { &self.dek_token } else { &self.admin_token };
        let r = self.http.post(format!("{}{path}", self.api)).bearer_auth(token).send()?;
        let s = r.status().as_u16();
        Ok((s, r.json().unwrap_or(serde_json::Value::Null)))
    }

    /// Sum of a Prometheus counter over all its label sets.
    pub fn metric_sum(&self, name: &str) -> Res<f64> {
        let text = self.http.get(format!("{}/metrics", self.api)).send()?.text()?;
        Ok(metric_sum(&text, name))
    }

    /// Peak resident set size (VmHWM) of the running process, in bytes.
    pub fn peak_rss(&self) -> Option<u64> {
        proc_status_kb(self.pid()?, "VmHWM:").map(|kb| kb * 1024)
    }

    #[allow(dead_code)]
    pub fn rss(&self) -> Option<u64> {
        proc_status_kb(self.pid()?, "VmRSS:").map(|kb| kb * 1024)
    }

    /// Whether the log holds `needle` (read from `from` bytes on); returns the new length.
    pub fn log_contains(&self, needle: &str) -> bool {
        std::fs::read_to_string(self.log_path()).map(|s| s.contains(needle)).unwrap_or(false)
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill();
    }
}

fn proc_status_kb(pid: u32, field: &str) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines().find(|l| l.starts_with(field))?.split_whitespace().nth(1)?.parse().ok()
}

pub fn metric_sum(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| l.starts_with(name) && matches!(l.as_bytes().get(name.len()), Some(b'{') | Some(b' ')))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// What a key gets when seeded.
pub enum SeedKms {
    /// The embedded KMS: the key is created in it and every DEK really wrapped.
    Local,
    /// A remote key: the ciphertext is opaque to keywarden (the bench KMS makes it).
    Remote,
}

/// Writes keys and instances straight into a (stopped) daemon's store, through
/// keywarden's own store and KMS code: the records are exactly those the API
/// would write, minus the per-instance audit entry and registration notice.
pub fn seed(store_path: &Path, master_key: &Path, keys: &[(&str, usize)], kms: SeedKms) -> Res<Duration> {
    let started = Instant::now();
    std::fs::create_dir_all(store_path)?;
    let store = Store::open(store_path)?;
    let (writer, thread) = Writer::start(store.clone(), Ownership::single(Default::default()), 4, Box::new(|_| {}));
    let local = LocalKms::open(store.clone(), writer.clone(), master_key, Duration::from_secs(30 * 86400))?;
    let now = Utc::now();
    let mut batch = Vec::with_capacity(8192);
    for (key_id, count) in keys {
        let version = match kms {
            SeedKms::Local => futures::executor::block_on(local.create_key(Some(key_id.to_string())))?.1,
            SeedKms::Remote => "1".to_string(),
        };
        let mut key = KeyRecord::new(key_id, now);
        key.version = Some(version.clone());
        batch.push(Record::Key(key));
        for n in 0..*count {
            let instance_id = format!("{key_id}-{n:07}");
            let dek = Dek::generate();
            let wrapped = match kms {
                SeedKms::Local => futures::executor::block_on(local.wrap(key_id, &dek, instance_id.as_bytes(), None))?,
                SeedKms::Remote => WrappedDek { key_version: version.clone(), ciphertext: dek.expose().to_vec() },
            };
            batch.push(Record::Instance(InstanceRecord {
                instance_id,
                key_id: key_id.to_string(),
                key_version: wrapped.key_version.clone(),
                wrapped: Some(wrapped),
                dek_fingerprint: dek.fingerprint(),
                created_at: now,
                updated_at: now,
                destroyed_at: None,
                destroyed_reason: None,
                rewrap_error: None,
                credential: None,
                data_plane: None,
            }));
            if batch.len() >= 8192 {
                futures::executor::block_on(writer.import(std::mem::take(&mut batch)))?;
            }
        }
    }
    futures::executor::block_on(writer.import(batch))?;
    drop(local);
    drop(writer);
    thread.close()?;
    drop(store);
    Ok(started.elapsed())
}

pub fn dir_bytes(path: &Path) -> u64 {
    let mut total = 0;
    if let Ok(entries) = std::fs::read_dir(path) {
        for e in entries.flatten() {
            let Ok(meta) = e.metadata() else { continue };
            if meta.is_dir() {
                total += dir_bytes(&e.path());
            } else {
                total += meta.len();
            }
        }
    }
    total
}

/// Signs and produces lifecycle events, as a trusted producer would.
pub struct EventProducer {
    pub producer: BaseProducer,
    signer: keywarden::intake::signature::Signer,
    topic: String,
}

impl EventProducer {
    pub fn new(bootstrap: &str, topic: &str, linger_ms: u32) -> Res<EventProducer> {
        let producer: BaseProducer = ClientConfig::new()
            .set("bootstrap.servers", bootstrap)
            .set("linger.ms", linger_ms.to_string())
            .set("queue.buffering.max.messages", "1000000")
            .set("queue.buffering.max.kbytes", "1048576")
            .create()?;
        Ok(EventProducer { producer, signer: keywarden::intake::signature::Signer::hmac("local", SECRET.as_bytes()), topic: topic.to_string() })
    }

    /// Queues one event; `flush` afterwards to wait for the broker.
    pub fn send(&self, key_id: &str, payload: &[u8]) -> Res<()> {
        let sig = self.signer.sign(payload);
        let headers =
            rdkafka::message::OwnedHeaders::new().insert(rdkafka::message::Header { key: keywarden::intake::signature::HEADER, value: Some(sig.as_str()) });
        let mut record = BaseRecord::<str, [u8]>::to(&self.topic).payload(payload).key(key_id).headers(headers);
        loop {
            match self.producer.send(record) {
                Ok(()) => return Ok(()),
                Err((rdkafka::error::KafkaError::MessageProduction(rdkafka::types::RDKafkaErrorCode::QueueFull), r)) => {
                    record = r;
                    self.producer.poll(Duration::from_millis(10));
                }
                Err((e, _)) => return Err(e.into()),
            }
        }
    }

    pub fn flush(&self) -> Res<()> {
        self.producer.flush(Duration::from_secs(60))?;
        Ok(())
    }
}

pub fn event(id: &str, kind: &str, key: &str, version: Option<&str>, at: chrono::DateTime<Utc>) -> Vec<u8> {
    let mut v = serde_json::json!({"event_id": id, "type": kind, "key_id": key, "occurred_at": at.to_rfc3339_opts(chrono::SecondsFormat::Micros, true)});
    if let Some(ver) = version {
        v["key_version"] = serde_json::json!(ver);
    }
    serde_json::to_vec(&v).unwrap()
}

/// Latency statistics over many repetitions.
#[derive(Debug, Clone, Default)]
pub struct Dist {
    sorted: Vec<Duration>,
}

impl Dist {
    pub fn new(mut v: Vec<Duration>) -> Dist {
        v.sort();
        Dist { sorted: v }
    }
    pub fn len(&self) -> usize {
        self.sorted.len()
    }
    pub fn pct(&self, p: f64) -> Duration {
        if self.sorted.is_empty() {
            return Duration::ZERO;
        }
        let i = ((p / 100.0) * (self.sorted.len() as f64 - 1.0)).round() as usize;
        self.sorted[i.min(self.sorted.len() - 1)]
    }
    pub fn max(&self) -> Duration {
        self.sorted.last().copied().unwrap_or_default()
    }
}

pub fn ms(d: Duration) -> String {
    let m = d.as_secs_f64() * 1000.0;
    if m < 10.0 {
        format!("{m:.2} ms")
    } else if m < 10_000.0 {
        format!("{m:.0} ms")
    } else {
        format!("{:.1} s", m / 1000.0)
    }
}

pub fn mib(bytes: u64) -> String {
    format!("{:.0} MiB", bytes as f64 / (1024.0 * 1024.0))
}
