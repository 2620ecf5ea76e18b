//! Rotation against a KMS that times out, answers 5xx and throttles 30% of the
//! time, and refuses some instances for good: every rewrap still completes, the
//! refusals are reported per instance, and an operator's retry finishes them.
//! In process (a wrapper around the embedded KMS, for the refusals and the
//! quota) and end to end: the real binary's AWS provider against moto_server
//! through a proxy that injects the faults on every operation.

mod common;

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::Utc;
use rand::{Rng, SeedableRng};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use keywarden::act::rotation::Rotator;
use keywarden::cluster::Ownership;
use keywarden::config::RotationConfig;
use keywarden::engine::{EventType, Input, LifecycleEvent, Reply, WrappedDek};
use keywarden::kms::local::LocalKms;
use keywarden::kms::{Dek, Kms, KmsError, KmsKeyState};
use keywarden::metrics::Metrics;
use keywarden::store::writer::Writer;
use keywarden::store::Store;

struct FaultyKms {
    inner: Arc<LocalKms>,
    /// Whether 30% of rewraps fail transiently (timeouts, 5xx, 429).
    flaky: bool,
    rng: Mutex<rand::rngs::StdRng>,
    /// Instances (by AAD) the KMS refuses outright, until healed.
    poisoned: Mutex<HashSet<Vec<u8>>>,
    calls: Mutex<HashMap<&'static str, usize>>,
}

impl FaultyKms {
    fn count(&self, what: &'static str) {
        *self.calls.lock().unwrap().entry(what).or_default() += 1;
    }
}

#[async_trait::async_trait]
impl Kms for FaultyKms {
    fn provider(&self) -> &'static str {
        "faulty"
    }
    async fn wrap(&self, key_id: &str, dek: &Dek, aad: &[u8], label: Option<&str>) -> Result<WrappedDek, KmsError> {
        self.inner.wrap(key_id, dek, aad, label).await
    }
    async fn unwrap(&self, key_id: &str, wrapped: &WrappedDek, aad: &[u8]) -> Result<Dek, KmsError> {
        self.inner.unwrap(key_id, wrapped, aad).await
    }
    async fn rewrap(&self, key_id: &str, wrapped: &WrappedDek, aad: &[u8], label: Option<&str>) -> Result<WrappedDek, KmsError> {
        self.count("rewrap");
        if self.poisoned.lock().unwrap().contains(aad) {
            self.count("refused");
            return Err(KmsError::Refused("400 ciphertext is not valid for this key".into()));
        }
        let roll: f64 = if self.flaky { self.rng.lock().unwrap().gen() } else { 1.0 };
        if roll < 0.10 {
            self.count("timeout");
            tokio::time::sleep(Duration::from_millis(20)).await;
            return Err(KmsError::Unavailable("request timed out after 20ms".into()));
        }
        if roll < 0.20 {
            self.count("5xx");
            return Err(KmsError::Unavailable("503 service unavailable".into()));
        }
        if roll < 0.30 {
            self.count("429");
            return Err(KmsError::Throttled("429 too many requests".into()));
        }
        self.inner.rewrap(key_id, wrapped, aad, label).await
    }
    async fn key_state(&self, key_id: &str) -> Result<KmsKeyState, KmsError> {
        self.count("key_state");
        self.inner.key_state(key_id).await
    }
}

async fn wait_job_finished(store: &Store, key: &str, event_id: &str) -> keywarden::engine::RotationJob {
    for _ in 0..3000 {
        if let Some(job) = store.job(key).unwrap() {
            if job.cause_event_id == event_id && job.finished_at.is_some() {
                return job;
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("rotation {event_id} did not finish: {:?}", store.job(key));
}

/// The input that creates instance `id` under `key`, with its DEK (wrapped by
/// the embedded KMS, the instance id as AAD).
async fn creation(local: &LocalKms, key: &str, id: &str) -> (Input, Dek) {
    let dek = Dek::generate();
    let wrapped = local.wrap(key, &dek, id.as_bytes(), None).await.unwrap();
    let input = Input::CreateInstance {
        instance_id: id.into(),
        key_id: key.into(),
        wrapped,
        fingerprint: dek.fingerprint(),
        credential: keywarden::api::credential::issue(Utc::now()).credential,
        at: Utc::now(),
    };
    (input, dek)
}

fn rotate_event(id: &str, key: &str, version: &str) -> Input {
    Input::Event {
        event: LifecycleEvent {
            event_id: id.into(),
            kind: EventType::Rotate,
            key_id: key.into(),
            key_version: Some(version.into()),
            occurred_at: Utc::now(),
            correlation_id: None,
            traceparent: None,
            material_destroyed: false,
        },
        at: Utc::now(),
        kms: None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flaky_kms_still_rewraps_everything_and_reports_refusals_per_instance() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("store")).unwrap();
    let notify = Arc::new(Notify::new());
    let wake = notify.clone();
    let (writer, _thread) = Writer::start(store.clone(), Ownership::single(Default::default()), 256, Box::new(move |_| wake.notify_one()));
    let local = Arc::new(LocalKms::open(store.clone(), writer.clone(), &dir.path().join("master.key"), Duration::from_secs(3600)).unwrap());
    let seed: u64 = rand::thread_rng().gen();
    println!("fault seed {seed}");
    let kms = Arc::new(FaultyKms {
        inner: local.clone(),
        flaky: true,
        rng: Mutex::new(rand::rngs::StdRng::seed_from_u64(seed)),
        poisoned: Mutex::new(HashSet::new()),
        calls: Mutex::new(HashMap::new()),
    });

    let (key, _) = local.create_key(Some("fk".into())).await.unwrap();
    let mut originals = HashMap::new();
    for i in 0..400 {
        let id = format!("inst-{i}");
        let (create, dek) = creation(&local, &key, &id).await;
        assert!(matches!(writer.submit(create).await.unwrap(), Reply::Created(_)));
        originals.insert(id, dek);
    }
    let poisoned: HashSet<String> = ["inst-7", "inst-123", "inst-399"].iter().map(|s| s.to_string()).collect();
    *kms.poisoned.lock().unwrap() = poisoned.iter().map(|s| s.as_bytes().to_vec()).collect();

    let shutdown = CancellationToken::new();
    let rotator = Rotator {
        store: store.clone(),
        kms: kms.clone(),
        writer: writer.clone(),
        notify,
        config: RotationConfig { concurrency: 8, batch: 32, max_attempts: 4 },
        metrics: Arc::new(Metrics::new()),
        ownership: Ownership::single(Default::default()),
    };
    let worker = tokio::spawn(rotator.run(shutdown.clone()));

    local.operate(&key, EventType::Rotate).await.unwrap();
    writer.submit(rotate_event("rot-2", &key, "2")).await.unwrap();
    let job = wait_job_finished(&store, &key, "rot-2").await;
    assert_eq!(job.failed, poisoned.len() as u64, "{job:?}");
    assert_eq!(job.total, Some(400));

    for (id, dek) in &originals {
        let inst = store.instance(id).unwrap().unwrap();
        let wrapped = inst.wrapped.as_ref().unwrap();
        if poisoned.contains(id) {
            assert_eq!(inst.key_version, "1", "a refused instance keeps its old, valid wrapped DEK");
            assert!(inst.rewrap_error.as_deref().unwrap().contains("ciphertext is not valid"), "{inst:?}");
        } else {
            assert_eq!(inst.key_version, "2", "{id} left on the old version");
            assert!(inst.rewrap_error.is_none());
        }
        let back = local.unwrap(&key, wrapped, id.as_bytes()).await.unwrap();
        assert_eq!(back.expose(), dek.expose(), "{id} no longer unwraps to its DEK");
    }
    let calls = kms.calls.lock().unwrap().clone();
    println!("kms calls: {calls:?}");
    assert!(calls.get("timeout").copied().unwrap_or(0) > 0 && calls.get("5xx").copied().unwrap_or(0) > 0 && calls.get("429").copied().unwrap_or(0) > 0);

    // The operator fixes the cause and retries: the refused ones complete.
    kms.poisoned.lock().unwrap().clear();
    writer.submit(rotate_event("retry-1", &key, "2")).await.unwrap();
    let job = wait_job_finished(&store, &key, "retry-1").await;
    assert_eq!(job.failed, 0);
    for id in &poisoned {
        let inst = store.instance(id).unwrap().unwrap();
        assert_eq!(inst.key_version, "2");
        assert!(inst.rewrap_error.is_none());
    }
    shutdown.cancel();
    worker.await.unwrap();
}

/// With several nodes, a key can move to another node while its rotation
/// pass runs: the writer then refuses the pass's chunks (`NotOwner`, to be
/// retried). That ends the pass, not the rotation worker, which serves every
/// other key and picks the rotation up again once the key is its own. Here
/// the worker still believes it owns the key while the writer's fence says
/// otherwise, as in the moment a partition moves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pass_refused_because_its_key_moved_ends_the_pass_not_the_worker() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("store")).unwrap();
    let notify = Arc::new(Notify::new());
    let wake = notify.clone();
    let fence = Arc::new(keywarden::cluster::fence::Fence::default());
    let partition = ("key-lifecycle".to_string(), 0);
    fence.assign(std::slice::from_ref(&partition));
    let ownership = Ownership::shared(fence.clone(), "key-lifecycle", 1);
    let (writer, _thread) = Writer::start(store.clone(), ownership, 256, Box::new(move |_| wake.notify_one()));
    let local = Arc::new(LocalKms::open(store.clone(), writer.clone(), &dir.path().join("master.key"), Duration::from_secs(3600)).unwrap());
    let (key, _) = local.create_key(Some("moving".into())).await.unwrap();
    for i in 0..20 {
        let (create, _) = creation(&local, &key, &format!("mv-{i}")).await;
        assert!(matches!(writer.submit(create).await.unwrap(), Reply::Created(_)));
    }
    local.operate(&key, EventType::Rotate).await.unwrap();
    writer.submit(rotate_event("rot-moving", &key, "2")).await.unwrap();
    fence.revoke(std::slice::from_ref(&partition));

    let shutdown = CancellationToken::new();
    let kms = Arc::new(FaultyKms {
        inner: local.clone(),
        flaky: false,
        rng: Mutex::new(rand::rngs::StdRng::seed_from_u64(0)),
        poisoned: Mutex::new(HashSet::new()),
        calls: Mutex::new(HashMap::new()),
    });
    let rotator = Rotator {
        store: store.clone(),
        kms: kms.clone(),
        writer: writer.clone(),
        notify,
        config: RotationConfig { concurrency: 4, batch: 4, max_attempts: 2 },
        metrics: Arc::new(Metrics::new()),
        ownership: Ownership::single(Default::default()),
    };
    let worker = tokio::spawn(rotator.run(shutdown.clone()));
    // The marker: every pass begins by asking the KMS for the key's state,
    // so a third ask means passes after a refused one: the refusal left the
    // worker running.
    let passes = || kms.calls.lock().unwrap().get("key_state").copied().unwrap_or(0);
    for _ in 0..1500 {
        if passes() >= 3 || worker.is_finished() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(!worker.is_finished(), "the rotation worker ended when the writer refused a pass for another node's key");
    assert!(passes() >= 3, "no pass after the refused ones: {} passes", passes());
    assert!(store.job(&key).unwrap().unwrap().finished_at.is_none(), "a refused pass ended the job");

    fence.assign(std::slice::from_ref(&partition));
    let job = wait_job_finished(&store, &key, "rot-moving").await;
    assert_eq!(job.failed, 0, "{job:?}");
    for i in 0..20 {
        assert_eq!(store.instance(&format!("mv-{i}")).unwrap().unwrap().key_version, "2");
    }
    shutdown.cancel();
    worker.await.unwrap();
}

/// A KMS with a hard quota: above `per_second` requests in a one-second window it
/// answers 429, like Key Protect or AWS do.
struct QuotaKms {
    inner: Arc<LocalKms>,
    per_second: usize,
    window: Mutex<(std::time::Instant, usize)>,
    served: std::sync::atomic::AtomicUsize,
    throttled: std::sync::atomic::AtomicUsize,
}

#[async_trait::async_trait]
impl Kms for QuotaKms {
    fn provider(&self) -> &'static str {
        "quota"
    }
    async fn wrap(&self, key_id: &str, dek: &Dek, aad: &[u8], label: Option<&str>) -> Result<WrappedDek, KmsError> {
        self.inner.wrap(key_id, dek, aad, label).await
    }
    async fn unwrap(&self, key_id: &str, wrapped: &WrappedDek, aad: &[u8]) -> Result<Dek, KmsError> {
        self.inner.unwrap(key_id, wrapped, aad).await
    }
    async fn rewrap(&self, key_id: &str, wrapped: &WrappedDek, aad: &[u8], label: Option<&str>) -> Result<WrappedDek, KmsError> {
        {
            let mut w = self.window.lock().unwrap();
            if w.0.elapsed() >= Duration::from_secs(1) {
                *w = (std::time::Instant::now(), 0);
            }
            w.1 += 1;
            if w.1 > self.per_second {
                self.throttled.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                return Err(KmsError::Throttled("429 Too Many Requests".into()));
            }
        }
        self.served.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        self.inner.rewrap(key_id, wrapped, aad, label).await
    }
    async fn key_state(&self, key_id: &str) -> Result<KmsKeyState, KmsError> {
        self.inner.key_state(key_id).await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_100k_rotation_at_the_kms_quota_completes_without_failures() {
    use keywarden::kms::governor::{Governed, Limits};
    const N: usize = 100_000;
    const QUOTA: usize = 5_000;
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("store")).unwrap();
    let notify = Arc::new(Notify::new());
    let wake = notify.clone();
    let (writer, _thread) = Writer::start(store.clone(), Ownership::single(Default::default()), 1024, Box::new(move |_| wake.notify_one()));
    let local = Arc::new(LocalKms::open(store.clone(), writer.clone(), &dir.path().join("master.key"), Duration::from_secs(3600)).unwrap());
    let (key, _) = local.create_key(Some("big".into())).await.unwrap();
    let setup = std::time::Instant::now();
    let mut last = None;
    for i in 0..N {
        let (input, _) = creation(&local, &key, &format!("b-{i:06}")).await;
        last = Some(writer.enqueue(Some(input), None).await.unwrap());
    }
    last.unwrap().await.unwrap();
    println!("QUOTA: set up {N} instances in {:.1?}", setup.elapsed());

    let quota = Arc::new(QuotaKms {
        inner: local.clone(),
        per_second: QUOTA,
        window: Mutex::new((std::time::Instant::now(), 0)),
        served: 0.into(),
        throttled: 0.into(),
    });
    // Configured just under the quota, as an operator would.
    let limits = Limits { rate: QUOTA as f64 * 0.95, max_concurrency: 64, breaker_threshold: 1000, breaker_cooldown: Duration::from_secs(1) };
    let governed = Arc::new(Governed::new(quota.clone(), limits));
    let shutdown = CancellationToken::new();
    let rotator = Rotator {
        store: store.clone(),
        kms: governed.clone(),
        writer: writer.clone(),
        notify,
        config: RotationConfig { concurrency: 64, batch: 512, max_attempts: 8 },
        metrics: Arc::new(Metrics::new()),
        ownership: Ownership::single(Default::default()),
    };
    let worker = tokio::spawn(rotator.run(shutdown.clone()));
    local.operate(&key, EventType::Rotate).await.unwrap();
    let started = std::time::Instant::now();
    writer.submit(rotate_event("big-rot", &key, "2")).await.unwrap();
    let job = wait_job_finished_within(&store, &key, "big-rot", Duration::from_secs(300)).await;
    let took = started.elapsed();
    let served = quota.served.load(std::sync::atomic::Ordering::SeqCst);
    let throttled = quota.throttled.load(std::sync::atomic::Ordering::SeqCst);
    println!(
        "QUOTA: {N} rewraps in {took:.1?} = {:.0}/s against a quota of {QUOTA}/s ({:.0}% of it); {throttled} throttled ({:.2}% of requests)",
        N as f64 / took.as_secs_f64(),
        100.0 * N as f64 / took.as_secs_f64() / QUOTA as f64,
        100.0 * throttled as f64 / (served + throttled) as f64
    );
    assert_eq!(job.failed, 0, "{job:?}");
    assert_eq!(job.done, N as u64, "{job:?}");
    let stragglers = store.instances_of(&key).unwrap().iter().filter(|i| i.key_version != "2").count();
    assert_eq!(stragglers, 0);
    shutdown.cancel();
    worker.await.unwrap();
}

async fn wait_job_finished_within(store: &Store, key: &str, event_id: &str, limit: Duration) -> keywarden::engine::RotationJob {
    let start = std::time::Instant::now();
    while start.elapsed() < limit {
        if let Some(job) = store.job(key).unwrap() {
            if job.cause_event_id == event_id && job.finished_at.is_some() {
                return job;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("rotation {event_id} did not finish within {limit:?}: {:?}", store.job(key));
}

/// The message of an injected throttle answered with HTTP 429, as in the
/// client's error, so the log shows which form took the throttling path.
const THROTTLED_429: &str = "injected: throttled with HTTP 429";
/// The same for a throttle answered with HTTP 400, as AWS KMS answers it.
const THROTTLED_400: &str = "injected: throttled with HTTP 400";

/// A proxy in front of moto_server that, while on, answers 30% of every AWS
/// KMS operation with a fault: a hang past the client's timeout, a 500
/// `KMSInternalException`, or a `ThrottlingException`. Per the AWS KMS API
/// reference ("ThrottlingException ... HTTP Status Code: 400"; AWS's
/// knowledge-center article quotes "Status Code: 400; Error Code:
/// ThrottlingException") AWS throttles with a 400; a gateway or proxy on the
/// way may answer 429 instead. Half of the throttles take each form
/// (alternating), counted apart as "429" and "400-throttle".
struct FaultProxy {
    moto: String,
    http: reqwest::Client,
    rng: Mutex<rand::rngs::StdRng>,
    on: std::sync::atomic::AtomicBool,
    hang: Duration,
    /// Throttles injected so far: even ones are answered 429, odd ones 400.
    throttles: std::sync::atomic::AtomicUsize,
    /// (operation, what happened) -> count
    seen: Mutex<HashMap<(String, &'static str), usize>>,
}

impl FaultProxy {
    fn count(&self, op: &str, what: &'static str) -> usize {
        self.seen.lock().unwrap().get(&(op.to_string(), what)).copied().unwrap_or(0)
    }

    /// How many `what` faults were injected, over every operation.
    fn injected(&self, what: &str) -> usize {
        self.seen.lock().unwrap().iter().filter(|((_, w), _)| *w == what).map(|(_, n)| n).sum()
    }
}

async fn proxy(
    axum::extract::State(p): axum::extract::State<Arc<FaultProxy>>,
    headers: axum::http::HeaderMap,
    body: axum::body::Bytes,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    let op = headers.get("x-amz-target").and_then(|v| v.to_str().ok()).and_then(|t| t.strip_prefix("TrentService.")).unwrap_or("?").to_string();
    let fault = |status: u16, kind: &str, message: &str| {
        (
            axum::http::StatusCode::from_u16(status).unwrap(),
            [("content-type", "application/x-amz-json-1.1")],
            format!(r#"{{"__type":"{kind}","message":"{message}"}}"#),
        )
            .into_response()
    };
    if p.on.load(std::sync::atomic::Ordering::SeqCst) {
        let roll: f64 = p.rng.lock().unwrap().gen();
        let what = match roll {
            r if r < 0.10 => Some("hang"),
            r if r < 0.20 => Some("5xx"),
            r if r < 0.30 => Some(if p.throttles.fetch_add(1, std::sync::atomic::Ordering::SeqCst) % 2 == 0 { "429" } else { "400-throttle" }),
            _ => None,
        };
        if let Some(what) = what {
            *p.seen.lock().unwrap().entry((op.clone(), what)).or_default() += 1;
            return match what {
                "hang" => {
                    tokio::time::sleep(p.hang).await;
                    fault(500, "KMSInternalException", "injected")
                }
                "5xx" => fault(500, "KMSInternalException", "injected"),
                "429" => fault(429, "ThrottlingException", THROTTLED_429),
                _ => fault(400, "ThrottlingException", THROTTLED_400),
            };
        }
    }
    *p.seen.lock().unwrap().entry((op, "ok")).or_default() += 1;
    let mut req = p.http.post(&p.moto).body(body);
    for (name, value) in &headers {
        if name != "host" && name != "content-length" {
            req = req.header(name, value);
        }
    }
    match req.send().await {
        Ok(r) => {
            let status = axum::http::StatusCode::from_u16(r.status().as_u16()).unwrap();
            let kind = r.headers().get("content-type").cloned();
            let bytes = r.bytes().await.unwrap_or_default();
            let mut out = (status, bytes).into_response();
            if let Some(kind) = kind {
                out.headers_mut().insert("content-type", kind);
            }
            out
        }
        Err(e) => (axum::http::StatusCode::BAD_GATEWAY, e.to_string()).into_response(),
    }
}

/// moto_server and boto3, which the AWS tests drive it with: `Some` when
/// both import. The check comes first, so that a missing moto fails at once
/// with how to install it rather than after moto_server's start-up timeout.
fn moto_installed() -> Option<()> {
    let out = std::process::Command::new("python3").args(["-c", "import moto.server, boto3"]).output().ok()?;
    out.status.success().then_some(())
}

/// Every complete line the daemon logged so far (the whole file: `log()` keeps
/// only the last 300 lines), in order.
fn log_lines(d: &common::Daemon) -> Vec<String> {
    let all = std::fs::read_to_string(d.dir.path().join("keywarden.log")).unwrap_or_default();
    // A line still being written has no newline yet.
    let complete = all.rfind('\n').map_or("", |end| &all[..end]);
    complete.lines().map(str::to_owned).collect()
}

/// The real daemon's AWS provider through the fault proxy: 30% of every call
/// (ReEncrypt, Decrypt, DescribeKey alike) hangs past the 1 s client timeout,
/// fails with a 500 or is throttled (as a 429 or as a 400). A rotation of
/// every DEK completes and each DEK is byte-identical afterwards;
/// reconciliation runs every 2 s against the same faults and never revokes or
/// erases an instance because a DescribeKey failed; and the throttling path is
/// taken for both forms of throttle.
#[test]
fn the_aws_provider_rewraps_everything_through_hangs_5xx_and_throttling_on_every_operation() {
    use common::*;
    const N: usize = 150;
    let install = "run scripts/install-test-deps.sh, or pip install 'moto[server]' boto3";
    let Some(()) = required(moto_installed(), "moto_server (python3 -m moto.server) with boto3", install) else { return };
    let broker = Broker::start();
    let moto = Moto::start();
    let arn = moto.boto("print(kms.create_key(Description='keywarden faults')['KeyMetadata']['Arn'])");
    let rt = tokio::runtime::Runtime::new().unwrap();
    let seed: u64 = rand::thread_rng().gen();
    println!("fault seed {seed}");
    let faults = Arc::new(FaultProxy {
        moto: format!("{}/", moto.url),
        http: reqwest::Client::new(),
        rng: Mutex::new(rand::rngs::StdRng::seed_from_u64(seed)),
        on: false.into(),
        hang: Duration::from_millis(1500),
        throttles: 0.into(),
        seen: Mutex::new(HashMap::new()),
    });
    let listener = rt.block_on(tokio::net::TcpListener::bind("127.0.0.1:0")).unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let app = axum::Router::new().fallback(axum::routing::post(proxy)).with_state(faults.clone());
    rt.spawn(async move { axum::serve(listener, app).await.unwrap() });

    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("keywarden.toml");
    std::fs::write(
        &config,
        format!(
            "[kms]\ndefault = \"local\"\nroutes = [{{ prefix = \"arn:aws:kms:\", provider = \"aws\" }}]\n[kms.aws]\nregion = \"us-east-1\"\nendpoint = \"{url}\"\n[kms.aws.limits]\ntimeout = \"1s\"\nmax_concurrency = 16\n[rotation]\nmax_attempts = 12\n"
        ),
    )
    .unwrap();
    let d = Daemon::start(
        &broker.bootstrap,
        &[
            ("KEYWARDEN_CONFIG", config.to_str().unwrap()),
            ("KEYWARDEN_RECONCILE_SCHEDULE", "*/2 * * * * *"),
            ("AWS_ACCESS_KEY_ID", "testing"),
            ("AWS_SECRET_ACCESS_KEY", "testing"),
        ],
    );
    let ids: Vec<String> = (0..N).map(|i| format!("flt-{i}")).collect();
    for id in &ids {
        d.create_instance(id, &arn);
    }
    let deks: Vec<String> = ids.iter().map(|id| d.dek(id).1["dek"].as_str().unwrap().to_string()).collect();

    faults.on.store(true, std::sync::atomic::Ordering::SeqCst);
    let p = producer(&broker.bootstrap);
    produce(&p, "key-lifecycle", Some(&arn), &event("flt-rotate", "rotate", &arn, Some("flt-2"), &soon(1)));
    let enc = arn.replace(':', "%3A").replace('/', "%2F");
    let key = wait_until("the rotation to finish", Duration::from_secs(240), || {
        let (_, key) = d.get(&format!("/v1/keys/{enc}"));
        key["rotation"]["finished_at"].is_string().then_some(key)
    });
    assert_eq!((key["rotation"]["done"].as_u64(), key["rotation"]["failed"].as_u64()), (Some(N as u64), Some(0)), "{key}");

    // Reconciliation asks DescribeKey through the same faults. Its own line
    // for a read that failed (src/schedule/reconcile.rs), not the rotator's
    // "cannot read the key state; rotation waits"; then, after it, a whole
    // pass that read the key's state: every pass ends with "reconciliation
    // found (no) drift", and this key is the only one with instances, so a
    // pass without the failure line read the state. A DescribeKey answered
    // by moto after the failure was seen confirms it.
    let failed_read = |l: &str| l.contains("reconciliation cannot read the key's state") && l.contains(arn.as_str());
    let pass_end = |l: &str| l.contains("reconciliation found no drift") || l.contains("reconciliation found drift");
    let mut answered_at_failure = None;
    let (failure, clean_pass) = wait_until("a failed reconciliation read of the key's state, then a pass that read it", Duration::from_secs(120), || {
        let lines = log_lines(&d);
        let failed = lines.iter().position(|l| failed_read(l))?;
        let answered = faults.count("DescribeKey", "ok");
        let since = *answered_at_failure.get_or_insert(answered);
        if answered <= since {
            return None;
        }
        // The end of the pass that failed, then the passes after it.
        let mut end = failed + 1 + lines[failed + 1..].iter().position(|l| pass_end(l))?;
        loop {
            let next = end + 1 + lines[end + 1..].iter().position(|l| pass_end(l))?;
            if !lines[end + 1..next].iter().any(|l| failed_read(l)) {
                return Some((lines[failed].clone(), lines[next].clone()));
            }
            end = next;
        }
    });
    println!("reconciliation could not read the key's state:\n  {failure}\nand a later pass read it:\n  {clean_pass}");
    // Only now: nothing was revoked or erased for the failed read.
    let log = log_lines(&d);
    let drift: Vec<&String> =
        log.iter().filter(|l| l.contains("reconciliation found drift") || l.contains("drift: applying the event that was missed")).collect();
    assert!(drift.is_empty(), "reconciliation saw drift where a DescribeKey failed: {drift:?}");
    let (_, key) = d.get(&format!("/v1/keys/{enc}"));
    assert_eq!(key["state"], "active", "{key}");
    for id in &ids {
        assert_eq!(d.state(id), "active", "{id} was revoked or erased after a failed DescribeKey");
    }
    let (_, audit) = d.get("/v1/audit?limit=10000");
    let reconciled: Vec<_> = audit["entries"].as_array().unwrap().iter().filter(|e| e["who"] == "schedule:reconcile").collect();
    assert!(reconciled.is_empty(), "reconciliation changed something on a failed DescribeKey: {reconciled:?}");

    // Every DEK, read through Decrypt under the same faults (a failed read is
    // a 503 to retry, never another DEK), is the one it was.
    for (i, id) in ids.iter().enumerate() {
        let v = wait_until(&format!("the DEK of {id}"), Duration::from_secs(30), || {
            let (s, v) = d.dek(id);
            assert!(s == 200 || s == 503, "{id}: {s} {v}");
            (s == 200).then_some(v)
        });
        assert_eq!(v["dek"].as_str().unwrap(), deks[i], "{id}");
        assert_eq!(v["key_version"], "flt-2");
        assert_eq!(d.state(id), "active", "{id} was revoked or erased");
    }
    let (_, audit) = d.get("/v1/audit?limit=10000");
    let reconciled: Vec<_> = audit["entries"].as_array().unwrap().iter().filter(|e| e["who"] == "schedule:reconcile").collect();
    assert!(reconciled.is_empty(), "reconciliation changed something on a failed DescribeKey: {reconciled:?}");

    let seen = faults.seen.lock().unwrap().clone();
    println!(
        "faults injected: {} hangs, {} 5xx, {} throttles as 429, {} throttles as 400; by operation: {seen:?}",
        faults.injected("hang"),
        faults.injected("5xx"),
        faults.injected("429"),
        faults.injected("400-throttle")
    );
    for what in ["hang", "5xx", "429", "400-throttle"] {
        assert!(faults.injected(what) > 0, "no {what} injected: {seen:?}");
        assert!(faults.count("ReEncrypt", what) > 0, "no {what} on ReEncrypt: {seen:?}");
    }
    for op in ["Decrypt", "DescribeKey"] {
        let faulted: usize = ["hang", "5xx", "429", "400-throttle"].iter().map(|w| faults.count(op, w)).sum();
        assert!(faulted > 0, "no fault injected on {op}: {seen:?}");
    }
    // The throttling path, for each form: the client classifies both as
    // throttling (KmsError::Throttled, "kms is throttling: ..."; a 429 read as
    // unavailable would say "kms is unavailable: ..."), the rotation retries
    // them, the metric counts them and the governor halves its concurrency.
    let log = log_lines(&d);
    for (form, message) in [("429", THROTTLED_429), ("400", THROTTLED_400)] {
        let line = log.iter().find(|l| l.contains(message) && l.contains("rewrap"));
        let line = line.unwrap_or_else(|| panic!("no rewrap error for an injected {form} throttle in the log"));
        assert!(line.contains("kms is throttling: aws kms ReEncrypt"), "an injected {form} throttle was not classified as throttling: {line}");
        println!("a {form} throttle on the throttling path: {line}");
    }
    let metrics = d.http.get(format!("{}/metrics", d.api)).send().unwrap().text().unwrap();
    let throttled =
        metrics.lines().find(|l| l.starts_with("keywarden_rewrap_errors_total") && l.contains("class=\"throttled\"") && l.contains("provider=\"aws\""));
    assert!(throttled.is_some_and(|l| !l.ends_with(" 0")), "the throttling path was not taken:\n{metrics}");
    assert!(log.iter().any(|l| l.contains("kms throttled: concurrency halved")), "the governor did not halve its concurrency");
    drop(rt);
}
