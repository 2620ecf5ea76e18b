//! Rotation against a KMS that times out, answers 5xx and throttles 30% of the
//! time, and refuses some instances for good: every rewrap still completes, the
//! refusals are reported per instance, and an operator's retry finishes them.

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
        let roll: f64 = self.rng.lock().unwrap().gen();
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
            return Err(KmsError::Unavailable("429 too many requests".into()));
        }
        self.inner.rewrap(key_id, wrapped, aad, label).await
    }
    async fn key_state(&self, key_id: &str) -> Result<KmsKeyState, KmsError> {
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
        rng: Mutex::new(rand::rngs::StdRng::seed_from_u64(seed)),
        poisoned: Mutex::new(HashSet::new()),
        calls: Mutex::new(HashMap::new()),
    });

    let (key, _) = local.create_key(Some("fk".into())).await.unwrap();
    let mut originals = HashMap::new();
    for i in 0..400 {
        let id = format!("inst-{i}");
        let dek = Dek::generate();
        let wrapped = local.wrap(&key, &dek, id.as_bytes(), None).await.unwrap();
        let reply = writer
            .submit(Input::CreateInstance {
                instance_id: id.clone(),
                key_id: key.clone(),
                wrapped,
                fingerprint: dek.fingerprint(),
                credential: keywarden::api::credential::issue(Utc::now()).credential,
                at: Utc::now(),
            })
            .await
            .unwrap();
        assert!(matches!(reply, Reply::Created(_)));
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
        let id = format!("b-{i:06}");
        let dek = Dek::generate();
        let wrapped = local.wrap(&key, &dek, id.as_bytes(), None).await.unwrap();
        let input = Input::CreateInstance {
            instance_id: id,
            key_id: key.clone(),
            wrapped,
            fingerprint: dek.fingerprint(),
            credential: keywarden::api::credential::issue(Utc::now()).credential,
            at: Utc::now(),
        };
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
