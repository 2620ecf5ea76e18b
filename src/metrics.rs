//! Prometheus metrics, emitted next to the log line of the thing they count.
//! Gauges that describe the store (instances by state, rotation backlog) are
//! computed from it at scrape time, at most every `STORE_GAUGES_EVERY`, so the
//! hot paths pay nothing for them.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use prometheus::{Encoder, Histogram, HistogramOpts, HistogramVec, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry, TextEncoder};

use crate::engine::{KeyStatus, RotationJob};
use crate::store::{Store, Tally};

/// A scrape every second must not turn into a scan of every instance every
/// second; five seconds is well inside any sensible scrape interval.
const STORE_GAUGES_EVERY: Duration = Duration::from_secs(5);

/// The instance states `keywarden_instances` always reports, zero included, so
/// that an alert on `keywarden_instances{state="revoked"} > 0` has a series.
const INSTANCE_STATES: [&str; 4] = ["active", "revoked", "erased", "destroyed"];

pub struct Metrics {
    registry: Registry,
    pub events: IntCounterVec,
    pub events_consumed: IntCounterVec,
    pub event_to_action: HistogramVec,
    pub dead_letters: IntCounterVec,
    pub security_events: IntCounterVec,
    pub commands: IntCounterVec,
    pub rewraps: IntCounterVec,
    pub rewrap_seconds: HistogramVec,
    pub rewrap_errors: IntCounterVec,
    pub dek_requests: IntCounterVec,
    /// DEK releases whose audit entry was dropped (the audit queue was full).
    pub dek_release_audits_dropped: prometheus::IntCounter,
    pub commit_seconds: Histogram,
    pub outbox_depth: IntGauge,
    /// Age of the oldest acknowledgement a KMS with a deadline still waits for.
    pub kms_ack_oldest_seconds: IntGauge,
    pub consumer_lag: IntGaugeVec,
    pub rotations_active: IntGauge,
    pub rotation_pending: IntGauge,
    pub instances: IntGaugeVec,
    pub build_info: IntGaugeVec,
    store_gauges_at: Mutex<Option<Instant>>,
}

fn counter(name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    IntCounterVec::new(Opts::new(name, help), labels).expect("metric")
}

fn histogram(name: &str, help: &str, labels: &[&str], buckets: Vec<f64>) -> HistogramVec {
    HistogramVec::new(HistogramOpts::new(name, help).buckets(buckets), labels).expect("metric")
}

impl Metrics {
    pub fn new() -> Metrics {
        let registry = Registry::new();
        let events = counter(
            "keywarden_events_total",
            "Lifecycle events handled, by type and outcome (applied, duplicate, stale, ignored; dead_lettered with type unknown)",
            &["type", "outcome"],
        );
        let events_consumed = counter(
            "keywarden_events_consumed_total",
            "Messages read from the events topic, by event type (unknown when undecodable); re-reads after a rebalance count again",
            &["type"],
        );
        // Events can be hours old (a backlog, a KMS that batches), so the buckets reach a day.
        let event_to_action = histogram(
            "keywarden_event_to_action_seconds",
            "Time from an event's occurred_at to its effect being durable in the store, for applied events",
            &["type"],
            vec![0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0, 14400.0, 86400.0],
        );
        let dead_letters = counter("keywarden_dead_letters_total", "Messages sent to the dead-letter topic, by reason class", &["reason"]);
        let security_events = counter("keywarden_security_events_total", "Messages refused for a missing, unknown or forged signature, by reason", &["reason"]);
        let commands = counter("keywarden_commands_published_total", "Data-plane commands published, by action", &["action"]);
        let rewraps = counter("keywarden_rewraps_total", "DEK rewraps, by provider and result", &["provider", "result"]);
        let rewrap_seconds = histogram(
            "keywarden_rewrap_seconds",
            "Duration of one KMS rewrap call, including the wait for the provider's rate and concurrency limits",
            &["provider"],
            vec![0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0],
        );
        let rewrap_errors =
            counter("keywarden_rewrap_errors_total", "Failed KMS rewrap calls (each attempt), by provider and error class", &["provider", "class"]);
        let dek_requests = counter("keywarden_dek_requests_total", "DEK requests from the data plane, by result", &["result"]);
        let commit_seconds = Histogram::with_opts(
            HistogramOpts::new("keywarden_store_commit_seconds", "Time to apply and flush one batch to the store")
                .buckets(vec![0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0]),
        )
        .expect("metric");
        let outbox_depth = IntGauge::new("keywarden_outbox_depth", "Outbox records (one per commit) whose effects are not all published yet").expect("metric");
        let kms_ack_oldest_seconds = IntGauge::new(
            "keywarden_kms_ack_oldest_pending_seconds",
            "Age of the oldest unsent acknowledgement to a KMS that sets a deadline (Key Protect: 4h)",
        )
        .expect("metric");
        let consumer_lag = IntGaugeVec::new(
            Opts::new("keywarden_consumer_lag", "Messages on an assigned events partition not yet durably applied (high watermark minus stored offset)"),
            &["partition"],
        )
        .expect("metric");
        let rotations_active =
            IntGauge::new("keywarden_rotations_active", "Rotation jobs not finished (running, or waiting for the key or the KMS)").expect("metric");
        let rotation_pending =
            IntGauge::new("keywarden_rotation_pending_instances", "Instances that unfinished rotations still have to rewrap, across all keys").expect("metric");
        let instances = IntGaugeVec::new(Opts::new("keywarden_instances", "Instances by state"), &["state"]).expect("metric");
        let build_info = IntGaugeVec::new(Opts::new("keywarden_build_info", "Build information"), &["version"]).expect("metric");
        build_info.with_label_values(&[env!("CARGO_PKG_VERSION")]).set(1);
        for c in [&events, &events_consumed, &dead_letters, &security_events, &commands, &rewraps, &rewrap_errors, &dek_requests] {
            registry.register(Box::new(c.clone())).expect("register");
        }
        for h in [&event_to_action, &rewrap_seconds] {
            registry.register(Box::new(h.clone())).expect("register");
        }
        for g in [&outbox_depth, &kms_ack_oldest_seconds, &rotations_active, &rotation_pending] {
            registry.register(Box::new(g.clone())).expect("register");
        }
        for g in [&consumer_lag, &instances, &build_info] {
            registry.register(Box::new(g.clone())).expect("register");
        }
        registry.register(Box::new(commit_seconds.clone())).expect("register");
        let dek_release_audits_dropped = prometheus::IntCounter::new(
            "keywarden_dek_release_audits_dropped_total",
            "DEK releases not audited because the audit queue was full (the store writer is behind)",
        )
        .expect("metric");
        registry.register(Box::new(dek_release_audits_dropped.clone())).expect("register");
        for state in INSTANCE_STATES {
            instances.with_label_values(&[state]).set(0);
        }
        Metrics {
            registry,
            events,
            events_consumed,
            event_to_action,
            dead_letters,
            security_events,
            commands,
            rewraps,
            rewrap_seconds,
            rewrap_errors,
            dek_requests,
            dek_release_audits_dropped,
            commit_seconds,
            outbox_depth,
            kms_ack_oldest_seconds,
            consumer_lag,
            rotations_active,
            rotation_pending,
            instances,
            build_info,
            store_gauges_at: Mutex::new(None),
        }
    }

    /// Recomputes the store gauges unless that was done within the last
    /// `STORE_GAUGES_EVERY`. Blocking (it scans the store): call it off the runtime.
    pub fn refresh_store_gauges(&self, store: &Store) {
        {
            let mut at = self.store_gauges_at.lock().expect("metrics lock");
            if at.is_some_and(|t| t.elapsed() < STORE_GAUGES_EVERY) {
                return;
            }
            *at = Some(Instant::now());
        }
        // Gauges that cannot be read keep their last values; the log says why.
        let read = || -> Result<_, crate::store::StoreError> { Ok((store.jobs()?, store.keys()?, store.instance_tally()?)) };
        let (jobs, keys, tally) = match read() {
            Ok(read) => read,
            Err(e) => {
                tracing::error!(error = %e, "cannot read the store for its gauges");
                return;
            }
        };
        let (active, pending) = rotation_backlog(&jobs);
        self.rotations_active.set(active);
        self.rotation_pending.set(pending);
        let statuses: HashMap<String, KeyStatus> = keys.into_iter().map(|k| (k.key_id, k.status)).collect();
        for (state, n) in instances_by_state(&tally, &statuses) {
            self.instances.with_label_values(&[state]).set(n);
        }
    }

    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        TextEncoder::new().encode(&self.registry.gather(), &mut buf).expect("text encoding");
        String::from_utf8(buf).expect("prometheus text is utf-8")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// Unfinished jobs, and the instances they still have to rewrap. A job not yet
/// planned has no total and counts as active with nothing known pending; a failed
/// instance is not pending: it waits for `key retry`, not for the worker.
fn rotation_backlog(jobs: &[RotationJob]) -> (i64, i64) {
    let open: Vec<&RotationJob> = jobs.iter().filter(|j| j.finished_at.is_none()).collect();
    let pending = open.iter().map(|j| j.total.unwrap_or(0).saturating_sub(j.done + j.failed)).sum::<u64>();
    (open.len() as i64, pending as i64)
}

/// The same derivation as `engine::instance_state`, over counts: a DEK-holding
/// instance takes its key's state, one without a DEK is destroyed.
fn instances_by_state(tally: &HashMap<String, Tally>, statuses: &HashMap<String, KeyStatus>) -> [(&'static str, i64); 4] {
    let mut n = [0i64; 4];
    for (key_id, t) in tally {
        let slot = match statuses.get(key_id) {
            Some(KeyStatus::Deleted) => 2,
            Some(KeyStatus::Disabled) => 1,
            Some(KeyStatus::Active) | None => 0,
        };
        n[slot] += t.with_dek as i64;
        n[3] += t.destroyed as i64;
    }
    [(INSTANCE_STATES[0], n[0]), (INSTANCE_STATES[1], n[1]), (INSTANCE_STATES[2], n[2]), (INSTANCE_STATES[3], n[3])]
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::Utc;

    fn job(total: Option<u64>, done: u64, failed: u64, finished: bool) -> RotationJob {
        RotationJob {
            key_id: "k".into(),
            target_version: "2".into(),
            cause_event_id: "e".into(),
            acknowledge: true,
            acknowledges: Vec::new(),
            correlation_id: None,
            traceparent: None,
            started_at: Utc::now(),
            total,
            done,
            failed,
            finished_at: finished.then(Utc::now),
            rewrapping_to: None,
            arrivals: 0,
        }
    }

    #[test]
    fn rotation_backlog_counts_only_unfinished_jobs_and_not_failed_instances() {
        let jobs = [job(Some(100), 40, 10, false), job(None, 0, 0, false), job(Some(7), 7, 0, true)];
        assert_eq!(rotation_backlog(&jobs), (2, 50));
    }

    #[test]
    fn instances_take_their_keys_state_unless_destroyed() {
        let tally = HashMap::from([
            ("a".to_string(), Tally { with_dek: 3, destroyed: 1 }),
            ("d".to_string(), Tally { with_dek: 2, destroyed: 0 }),
            ("x".to_string(), Tally { with_dek: 4, destroyed: 5 }),
            ("unknown".to_string(), Tally { with_dek: 1, destroyed: 0 }),
        ]);
        let statuses = HashMap::from([("a".to_string(), KeyStatus::Active), ("d".to_string(), KeyStatus::Disabled), ("x".to_string(), KeyStatus::Deleted)]);
        assert_eq!(instances_by_state(&tally, &statuses), [("active", 4), ("revoked", 2), ("erased", 4), ("destroyed", 6)]);
    }

    #[test]
    fn every_metric_is_exposed_with_the_prometheus_naming_conventions() {
        let m = Metrics::new();
        m.events.with_label_values(&["rotate", "applied"]).inc();
        m.events_consumed.with_label_values(&["rotate"]).inc();
        m.event_to_action.with_label_values(&["rotate"]).observe(0.2);
        m.rewrap_seconds.with_label_values(&["local"]).observe(0.001);
        m.rewrap_errors.with_label_values(&["local", "throttled"]).inc();
        m.consumer_lag.with_label_values(&["0"]).set(3);
        let text = m.render();
        for name in [
            "keywarden_events_total{outcome=\"applied\",type=\"rotate\"} 1",
            "keywarden_events_consumed_total{type=\"rotate\"} 1",
            "keywarden_event_to_action_seconds_bucket{type=\"rotate\",le=\"0.25\"} 1",
            "keywarden_rewrap_seconds_count{provider=\"local\"} 1",
            "keywarden_rewrap_errors_total{class=\"throttled\",provider=\"local\"} 1",
            "keywarden_consumer_lag{partition=\"0\"} 3",
            "keywarden_instances{state=\"revoked\"} 0",
            "keywarden_rotations_active 0",
            "keywarden_rotation_pending_instances 0",
            "keywarden_outbox_depth 0",
            "keywarden_build_info{version=",
        ] {
            assert!(text.contains(name), "{name} missing from:\n{text}");
        }
        for line in text.lines().filter(|l| l.starts_with("# TYPE")) {
            let mut parts = line.split_whitespace().skip(2);
            let (name, kind) = (parts.next().unwrap(), parts.next().unwrap());
            assert!(name.starts_with("keywarden_"), "{line}");
            assert_eq!(name.ends_with("_total"), kind == "counter", "counters and only counters end in _total: {line}");
        }
    }

    #[test]
    fn store_gauges_follow_the_store_but_not_more_often_than_the_throttle() {
        use crate::engine::{InstanceRecord, KeyRecord, Record, WrappedDek};
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let inst = |id: &str, key: &str, dek: bool| InstanceRecord {
            wrapped: dek.then(|| WrappedDek { key_version: "1".into(), ciphertext: vec![1] }),
            ..InstanceRecord::sample(id, key)
        };
        let mut disabled = KeyRecord::new("d", Utc::now());
        disabled.status = KeyStatus::Disabled;
        store
            .commit(
                &[
                    Record::Key(KeyRecord::new("a", Utc::now())),
                    Record::Key(disabled),
                    Record::Instance(inst("a1", "a", true)),
                    Record::Instance(inst("a2", "a", false)),
                    Record::Instance(inst("d1", "d", true)),
                    Record::Job(job(Some(10), 4, 1, false)),
                ],
                false,
            )
            .unwrap();
        let m = Metrics::new();
        m.refresh_store_gauges(&store);
        let get = |s: &str| m.instances.with_label_values(&[s]).get();
        assert_eq!((get("active"), get("revoked"), get("erased"), get("destroyed")), (1, 1, 0, 1));
        assert_eq!((m.rotations_active.get(), m.rotation_pending.get()), (1, 5));
        store.commit(&[Record::Instance(inst("a3", "a", true))], false).unwrap();
        m.refresh_store_gauges(&store);
        assert_eq!(get("active"), 1, "a second scrape right away reuses the last count");
    }
}
