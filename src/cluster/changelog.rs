//! The changelog publisher: every batch of state changes goes to the compacted
//! changelog topic before it is applied to the store, keyed by the store key
//! (compaction keeps each record's newest value) and sent to its key's
//! partition (the events topic's partitioner), so that a key's changelog
//! partition and events partition are the same.
//!
//! It is the write-ahead log of a node, written idempotently (in order, one
//! writer per partition, fenced by the consumer group: a node that loses a
//! partition finishes its batch before the partition moves; a repeated entry
//! only writes the same value again), not in a Kafka transaction: the broker this project runs on does not offer
//! transactions, and the publish-then-apply order gives what matters without
//! them: nothing a node applied is missing from the changelog, so a new owner
//! never applies an event twice.
//!
//! Every record is authenticated: an HMAC-SHA256 under the cluster secret
//! (`cluster.secret_file`) over the partition, the store key, the value (or
//! its absence) and a version, carried in two headers. The version is
//! monotonic per partition (the previous version plus one, or the clock in
//! microseconds if that is more), and every node refuses a record whose
//! version is not above the last one it accepted for the partition: a forged
//! record fails the MAC, a replayed old one the version.

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};
use std::time::{Duration, Instant};

use rdkafka::producer::{FutureProducer, FutureRecord, Producer, PurgeConfig};

use hmac::{Hmac, Mac};
use rdkafka::message::{Header, OwnedHeaders};
use sha2::Sha256;
use zeroize::Zeroizing;

use super::{partition_of, Changelog, ChangelogError, Written};
use crate::backoff::Backoff;
use crate::config::KafkaConfig;
use crate::store::{Change, Route, Versioned};

/// Header names of a record's version (8 bytes, big-endian) and MAC (32 bytes).
pub const VERSION_HEADER: &str = "keywarden.changelog.version";
pub const MAC_HEADER: &str = "keywarden.changelog.mac";

/// The cluster secret: only nodes that hold it can write a record the others apply.
pub struct ChangelogKey(Zeroizing<Vec<u8>>);

impl ChangelogKey {
    pub fn new(secret: Zeroizing<Vec<u8>>) -> ChangelogKey {
        ChangelogKey(secret)
    }

    fn hmac(&self, partition: i32, key: &[u8], value: Option<&[u8]>, version: i64) -> Hmac<Sha256> {
        // HMAC accepts a key of any length; the secret is never empty (checked when loaded).
        let mut mac = Hmac::<Sha256>::new_from_slice(&self.0).unwrap_or_else(|_| unreachable!("hmac takes any key length"));
        mac.update(b"keywarden changelog v1\0");
        mac.update(&partition.to_be_bytes());
        mac.update(&(key.len() as u64).to_be_bytes());
        mac.update(key);
        // A tombstone and an empty value differ.
        match value {
            None => mac.update(&[0]),
            Some(v) => {
                mac.update(&[1]);
                mac.update(&(v.len() as u64).to_be_bytes());
                mac.update(v);
            }
        }
        mac.update(&version.to_be_bytes());
        mac
    }

    pub fn sign(&self, partition: i32, key: &[u8], value: Option<&[u8]>, version: i64) -> [u8; 32] {
        self.hmac(partition, key, value, version).finalize().into_bytes().into()
    }

    /// In constant time.
    pub fn verify(&self, partition: i32, key: &[u8], value: Option<&[u8]>, version: i64, mac: &[u8]) -> bool {
        self.hmac(partition, key, value, version).verify_slice(mac).is_ok()
    }

    /// A MAC over length-prefixed parts under a domain of their own, so that
    /// no message of one kind (a forwarded request) can pass as another (a
    /// changelog record).
    fn parts(&self, domain: &[u8], parts: &[&[u8]]) -> Hmac<Sha256> {
        let mut mac = Hmac::<Sha256>::new_from_slice(&self.0).unwrap_or_else(|_| unreachable!("hmac takes any key length"));
        mac.update(domain);
        for p in parts {
            mac.update(&(p.len() as u64).to_be_bytes());
            mac.update(p);
        }
        mac
    }

    pub fn sign_parts(&self, domain: &[u8], parts: &[&[u8]]) -> [u8; 32] {
        self.parts(domain, parts).finalize().into_bytes().into()
    }

    /// In constant time.
    pub fn verify_parts(&self, domain: &[u8], parts: &[&[u8]], mac: &[u8]) -> bool {
        self.parts(domain, parts).verify_slice(mac).is_ok()
    }
}

pub struct ChangelogPublisher {
    producer: FutureProducer,
    key: Arc<ChangelogKey>,
    topic: String,
    partitions: i32,
    /// Set at shutdown: a publish waiting for the broker gives up, and the
    /// batch is not applied (its inputs are read again after a restart).
    pub stop: Arc<AtomicBool>,
}

impl ChangelogPublisher {
    pub fn new(
        kafka: &KafkaConfig,
        bootstrap: &str,
        topic: &str,
        partitions: i32,
        key: Arc<ChangelogKey>,
    ) -> Result<ChangelogPublisher, rdkafka::error::KafkaError> {
        let producer: FutureProducer = crate::broker::client_config(kafka, bootstrap)
            // In order, one request in flight: a retry is re-sent before anything
            // newer, so a duplicate can only repeat the latest value. Not the
            // idempotent producer: tansu 0.6 keeps refusing its produce requests
            // (an unknown error) after a restart of the broker.
            .set("enable.idempotence", "false")
            .set("max.in.flight.requests.per.connection", "1")
            .set("acks", "all")
            .set("linger.ms", "0")
            .set("message.timeout.ms", "10000")
            .create()?;
        Ok(ChangelogPublisher { producer, key, topic: topic.to_string(), partitions, stop: Arc::new(AtomicBool::new(false)) })
    }

    /// Blocks until the broker has every change, in order; retries while it is
    /// away. Returns, per partition written, the offset after the last change:
    /// the store records it with the batch, so this node's replica knows the
    /// entries below it are already applied here.
    ///
    /// With a deadline, gives up once it passes if the broker has confirmed
    /// none of the changes, withdrawing those not yet sent, so the caller can
    /// answer in bounded time. Once any change is confirmed (in order, or a
    /// later one on another partition while an earlier one waits) the batch is in
    /// the changelog in part, other nodes may apply it, and so it is finished
    /// whatever the deadline. (A request already on the wire to a hung broker
    /// cannot be withdrawn; should the broker wake and take it, replicas apply
    /// it late. The README says so.)
    fn publish_all(&self, changes: &[Versioned], deadline: Option<Instant>) -> Result<Vec<Written>, ChangelogError> {
        let mut versions: HashMap<i32, i64> = HashMap::new();
        let mut written: HashMap<i32, i64> = HashMap::new();
        // Some change of the batch is confirmed, in order or not: the batch is
        // in the changelog in part, so the deadline no longer applies.
        let mut in_part = false;
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
        let mut rest = changes;
        while !rest.is_empty() {
            let mut sends: Vec<_> = rest
                .iter()
                .map(|c| {
                    let mac = self.key.sign(c.partition, &c.key, c.value.as_deref(), c.version);
                    let version_bytes = c.version.to_be_bytes();
                    let headers = OwnedHeaders::new()
                        .insert(Header { key: VERSION_HEADER, value: Some(&version_bytes[..]) })
                        .insert(Header { key: MAC_HEADER, value: Some(&mac[..]) });
                    let record = FutureRecord::to(&self.topic).partition(c.partition).key(&c.key).headers(headers);
                    // No payload is a tombstone.
                    self.producer
                        .send_result(match &c.value {
                            Some(value) => record.payload(value),
                            None => record,
                        })
                        .map_err(|(e, _)| e.to_string())
                })
                .collect();
            // Changes up to the first failure are in; only the rest is sent again,
            // so a retry never writes an older value after a newer one.
            let mut done = 0;
            let mut failure = None;
            // Deliveries of later changes already read while an earlier one waited.
            let mut early: HashMap<usize, Result<(i32, i64), String>> = HashMap::new();
            for i in 0..sends.len() {
                let delivered = match early.remove(&i) {
                    Some(delivered) => delivered,
                    None => match &mut sends[i] {
                        Err(e) => Err(e.clone()),
                        Ok(delivery) => match wait_until(&mut *delivery, deadline.filter(|_| !in_part)) {
                            Some(out) => delivery_of(out),
                            None => {
                                // Past the deadline with this change unconfirmed.
                                // A later change of the batch may be confirmed
                                // already (another partition): then the batch is
                                // in the changelog in part, and finished.
                                for (j, later) in sends.iter_mut().enumerate().skip(i + 1) {
                                    if let Ok(later) = later {
                                        if let Some(out) = wait_until(&mut *later, Some(Instant::now())) {
                                            early.insert(j, delivery_of(out));
                                        }
                                    }
                                }
                                if !early.values().any(Result::is_ok) {
                                    // Nothing confirmed: withdraw what waits to be sent.
                                    self.producer.purge(PurgeConfig::default().queue());
                                    return Err(ChangelogError::Unconfirmed { topic: self.topic.clone(), reason: "the broker did not answer".into() });
                                }
                                in_part = true;
                                match &mut sends[i] {
                                    Ok(delivery) => wait_until(&mut *delivery, None).map_or_else(|| Err("the broker did not answer".to_string()), delivery_of),
                                    Err(e) => Err(e.clone()),
                                }
                            }
                        },
                    },
                };
                match delivered {
                    Ok((partition, offset)) if failure.is_none() => {
                        in_part = true;
                        let next = written.entry(partition).or_insert(0);
                        *next = (*next).max(offset + 1);
                        let version = versions.entry(partition).or_insert(0);
                        *version = (*version).max(rest[done].version);
                        done += 1;
                    }
                    // In the changelog, though after a failure: sent again below
                    // (the same version), and the batch is in it in part.
                    Ok(_) => in_part = true,
                    Err(e) => failure = failure.or(Some(e)),
                }
            }
            rest = &rest[done..];
            let Some(e) = failure else { break };
            if self.stop.load(Ordering::SeqCst) {
                return Err(ChangelogError::Failed { topic: self.topic.clone(), reason: format!("{e} (shutting down)") });
            }
            if !in_part && deadline.is_some_and(|d| Instant::now() + backoff.peek() >= d) {
                return Err(ChangelogError::Unconfirmed { topic: self.topic.clone(), reason: format!("{e}, until the deadline") });
            }
            tracing::warn!(error = %e, topic = %self.topic, "cannot write to the changelog; retrying (state changes wait)");
            std::thread::sleep(backoff.next_delay());
        }
        Ok(written.into_iter().map(|(partition, next)| Written { partition, next, version: versions.get(&partition).copied().unwrap_or(0) }).collect())
    }
}

/// A delivery's partition and offset, or why it failed.
fn delivery_of(out: Result<rdkafka::producer::future_producer::OwnedDeliveryResult, futures::channel::oneshot::Canceled>) -> Result<(i32, i64), String> {
    match out {
        Ok(Ok((partition, offset))) => Ok((partition, offset)),
        Ok(Err((e, _))) => Err(e.to_string()),
        Err(_) => Err("the producer was dropped".to_string()),
    }
}

impl Changelog for ChangelogPublisher {
    fn partition(&self, route: &Route) -> i32 {
        match route {
            Route::Key(k) => partition_of(k, self.partitions),
            Route::Partition(p) => *p,
        }
    }

    fn publish(&self, records: &[Versioned], deadline: Option<Instant>) -> Result<Vec<Written>, ChangelogError> {
        self.publish_all(records, deadline)
    }
}

/// Versions for a batch's changes, in order: per partition the last version
/// (`last`) plus one, or the clock in microseconds if that is more, so that
/// versions keep rising across restarts and a new writer of a partition.
pub fn versioned(changes: Vec<Change>, partition: impl Fn(&Route) -> i32, last: impl Fn(i32) -> i64, now_micros: i64) -> Vec<Versioned> {
    let mut versions: HashMap<i32, i64> = HashMap::new();
    changes
        .into_iter()
        .map(|c| {
            let p = partition(&c.route);
            let v = versions.entry(p).or_insert_with(|| last(p));
            *v = (*v + 1).max(now_micros);
            Versioned { partition: p, version: *v, key: c.key, value: c.value }
        })
        .collect()
}

/// Drives `fut` on this (non-async) thread until it is ready, or until
/// `deadline` passes (None: however long it takes).
fn wait_until<F: Future>(fut: F, deadline: Option<Instant>) -> Option<F::Output> {
    struct Unpark(std::thread::Thread);
    impl Wake for Unpark {
        fn wake(self: Arc<Self>) {
            self.0.unpark();
        }
    }
    let waker = Waker::from(Arc::new(Unpark(std::thread::current())));
    let mut cx = Context::from_waker(&waker);
    let mut fut = std::pin::pin!(fut);
    loop {
        if let Poll::Ready(out) = fut.as_mut().poll(&mut cx) {
            return Some(out);
        }
        match deadline {
            None => std::thread::park(),
            Some(d) => {
                let now = Instant::now();
                if now >= d {
                    return None;
                }
                std::thread::park_timeout(d - now);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_mac_covers_partition_key_value_and_version() {
        let key = ChangelogKey::new(Zeroizing::new(b"0123456789abcdef0123456789abcdef".to_vec()));
        let mac = key.sign(3, b"k/a", Some(b"v"), 7);
        assert!(key.verify(3, b"k/a", Some(b"v"), 7, &mac));
        assert!(!key.verify(4, b"k/a", Some(b"v"), 7, &mac), "partition");
        assert!(!key.verify(3, b"k/b", Some(b"v"), 7, &mac), "key");
        assert!(!key.verify(3, b"k/a", Some(b"w"), 7, &mac), "value");
        assert!(!key.verify(3, b"k/a", None, 7, &mac), "a tombstone is not the value");
        assert!(!key.verify(3, b"k/a", Some(b""), 7, &mac), "nor an empty one");
        assert!(!key.verify(3, b"k/a", Some(b"v"), 8, &mac), "version");
        let other = ChangelogKey::new(Zeroizing::new(b"another secret of thirty-two bytes".to_vec()));
        assert!(!other.verify(3, b"k/a", Some(b"v"), 7, &mac), "another cluster's secret");
        assert!(!key.verify(3, b"k/a", Some(b"v"), 7, &mac[..31]), "a truncated mac");
    }

    /// A batch with a change on each of two partitions, the first one's
    /// broker slower than the write's deadline: the second change is
    /// confirmed (in the changelog, where the other nodes apply it) while
    /// the first still waits. The batch is then in the changelog in part,
    /// and must be finished, not answered "nothing applied" (which the API
    /// turns into a 503 while the other nodes apply half of it).
    #[test]
    fn a_later_change_confirmed_while_an_earlier_one_waits_past_the_deadline_finishes_the_batch() {
        let cluster = rdkafka::mocking::MockCluster::new(2).unwrap();
        cluster.create_topic("state", 2, 1).unwrap();
        cluster.partition_leader("state", 0, Some(1)).unwrap();
        cluster.partition_leader("state", 1, Some(2)).unwrap();
        let key = Arc::new(ChangelogKey::new(Zeroizing::new(vec![7u8; 32])));
        let publisher = ChangelogPublisher::new(&KafkaConfig::default(), &cluster.bootstrap_servers(), "state", 2, key).unwrap();
        let change = |partition: i32, name: &str, version: i64| Versioned { partition, version, key: name.as_bytes().to_vec(), value: Some(b"v".to_vec()) };
        // Both brokers' connections up first, so that only the slow answer counts.
        publisher.publish(&[change(0, "k/warm-0", 1), change(1, "k/warm-1", 1)], None).unwrap();
        cluster.broker_round_trip_time(1, Duration::from_millis(1500)).unwrap();
        let started = Instant::now();
        let written = publisher
            .publish(&[change(0, "k/a", 2), change(1, "k/b", 2)], Some(started + Duration::from_millis(300)))
            .expect("a batch in the changelog in part is finished, not abandoned");
        let took = started.elapsed();
        let mut partitions: Vec<i32> = written.iter().map(|w| w.partition).collect();
        partitions.sort();
        assert_eq!(partitions, [0, 1]);
        assert!(took >= Duration::from_millis(1000), "the first change was waited for past the deadline: {took:?}");
    }

    #[test]
    fn waiting_gives_up_at_the_deadline_and_not_before_a_ready_future() {
        assert_eq!(wait_until(std::future::ready(7), Some(Instant::now())), Some(7));
        let started = Instant::now();
        assert_eq!(wait_until(std::future::pending::<()>(), Some(started + Duration::from_millis(50))), None);
        assert!(started.elapsed() >= Duration::from_millis(50));
    }
}
