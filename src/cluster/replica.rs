//! The read replica: every node follows every partition of the changelog topic
//! and applies what other nodes wrote to its own store, so that reads and DEKs
//! are served on any node.
//!
//! Positions are kept in the store with the changes they cover, so catching up
//! after a restart is incremental. A node's own writes move its positions past
//! its own entries in the same batch (see `Store::publish`), so the replica
//! skips them rather than apply an older copy over a newer local change, yet
//! applies an entry a node published and died before applying, and whatever a
//! partition's next owner writes, whatever this node believes it owns. A partition is "caught up" when its position
//! reached the high watermark the replica last saw; the intake waits for that
//! before it takes a partition over, and the DEK endpoint refuses to serve when
//! the replica has not been caught up for longer than `cluster.max_replica_lag`.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{Message, Offset, TopicPartitionList};

use super::changelog::{ChangelogKey, MAC_HEADER, VERSION_HEADER};
use crate::config::KafkaConfig;
use crate::metrics::Metrics;
use crate::store::writer::Writer;
use crate::store::{Replicated, Store, StoreError};

#[derive(Debug, thiserror::Error)]
pub enum ReplicaError {
    #[error("cannot create the changelog consumer: {0}; check kafka.brokers and kafka.properties")]
    Consumer(rdkafka::error::KafkaError),
    #[error("the changelog topic {topic} has no partitions the broker reports; create it (see the README) or set cluster.changelog_topic")]
    NoTopic { topic: String },
    #[error("the replica did not catch up with the changelog within {0:?}; is the broker reachable?")]
    Timeout(Duration),
    #[error("cannot read the replica's positions: {0}")]
    Store(#[from] StoreError),
}

/// A changelog consumer that knows the topic's partitions, not yet following.
pub struct Connected {
    consumer: Arc<BaseConsumer>,
    topic: String,
    partitions: Vec<i32>,
}

#[derive(Default)]
struct Progress {
    /// Per partition: the latest moment at which everything the broker had was
    /// applied here (when the high watermark was asked for, not when the
    /// position reached it), so a broker that cannot be reached makes it age.
    caught_up_at: HashMap<i32, Instant>,
    /// Per partition: the high watermark the broker last reported, and when it was asked.
    high: HashMap<i32, (i64, Instant)>,
}

pub struct Replica {
    progress: Mutex<Progress>,
    changed: Condvar,
    partitions: Vec<i32>,
    stop: AtomicBool,
}

impl Replica {
    /// Connects to the changelog and learns its partitions (the events
    /// topic's too: the ownership of keys is derived from their number).
    pub fn connect(store: &Store, kafka: &KafkaConfig, bootstrap: &str, topic: &str) -> Result<Connected, ReplicaError> {
        let consumer: Arc<BaseConsumer> = Arc::new(
            crate::broker::client_config(kafka, bootstrap)
                .set("group.id", format!("{}-replica-{}", kafka.group_id, kafka.instance_id))
                .set("enable.auto.commit", "false")
                .set("enable.partition.eof", "false")
                .set("fetch.wait.max.ms", "10")
                .create()
                .map_err(ReplicaError::Consumer)?,
        );
        let meta = consumer.fetch_metadata(Some(topic), Duration::from_secs(10)).map_err(ReplicaError::Consumer)?;
        let partitions: Vec<i32> = meta.topics().iter().flat_map(|t| t.partitions().iter().map(|p| p.id())).collect();
        if partitions.is_empty() {
            return Err(ReplicaError::NoTopic { topic: topic.to_string() });
        }
        let mut tpl = TopicPartitionList::new();
        for p in &partitions {
            let from = store.replica_position(*p)?.map_or(Offset::Beginning, Offset::Offset);
            tpl.add_partition_offset(topic, *p, from).map_err(ReplicaError::Consumer)?;
        }
        consumer.assign(&tpl).map_err(ReplicaError::Consumer)?;
        Ok(Connected { consumer, topic: topic.to_string(), partitions })
    }
}

impl Connected {
    pub fn partitions(&self) -> &[i32] {
        &self.partitions
    }

    /// Starts following all partitions on threads of their own; what they
    /// read is applied through the writer.
    pub fn follow(
        self,
        store: Store,
        writer: Writer,
        key: Arc<ChangelogKey>,
        metrics: Arc<Metrics>,
        supervisor: &mut crate::supervise::Supervisor,
    ) -> Arc<Replica> {
        let Connected { consumer, topic, partitions } = self;
        let replica = Arc::new(Replica { progress: Mutex::new(Progress::default()), changed: Condvar::new(), partitions, stop: AtomicBool::new(false) });
        let follower = Follower { store, writer, key, metrics, consumer: consumer.clone(), topic: topic.clone(), replica: replica.clone() };
        // Blocking loops (librdkafka polls), supervised like every task: a
        // replica that stopped would serve stale DEKs.
        supervisor.spawn_blocking("replica", move || follower.run());
        let asking = replica.clone();
        supervisor.spawn_blocking("replica-watermarks", move || asking.ask_watermarks(&consumer, &topic));
        replica
    }
}

impl Replica {
    pub fn partitions(&self) -> &[i32] {
        &self.partitions
    }

    /// Blocks until `partition` (or every partition, for `None`) was caught up
    /// after this call began.
    pub fn wait_caught_up(&self, partitions: Option<&[i32]>, timeout: Duration) -> Result<(), ReplicaError> {
        let asked = Instant::now();
        let deadline = asked + timeout;
        let mut progress = self.progress.lock().expect("replica lock");
        loop {
            let done = |p: &i32| progress.caught_up_at.get(p).is_some_and(|t| *t >= asked);
            let ok = partitions.unwrap_or(&self.partitions).iter().all(done);
            if ok {
                return Ok(());
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(ReplicaError::Timeout(timeout));
            }
            progress = self.changed.wait_timeout(progress, deadline - now).expect("replica lock").0;
        }
    }

    /// How long ago the partition was last caught up: what another node wrote
    /// since may be missing here.
    pub fn lag(&self, partition: i32) -> Duration {
        let progress = self.progress.lock().expect("replica lock");
        progress.caught_up_at.get(&partition).map_or(Duration::MAX, |t| t.elapsed())
    }

    /// Asks the broker for every partition's high watermark, over and over: the
    /// follower is caught up as of the moment of asking once it has applied
    /// up to that mark. (The watermark cached from fetch responses would not
    /// age while the broker is unreachable.)
    fn ask_watermarks(&self, consumer: &BaseConsumer, topic: &str) {
        while !self.stop.load(Ordering::SeqCst) {
            let round = Instant::now();
            for p in &self.partitions {
                let asked = Instant::now();
                if let Ok((_, high)) = consumer.fetch_watermarks(topic, *p, Duration::from_secs(1)) {
                    self.progress.lock().expect("replica lock").high.insert(*p, (high, asked));
                }
            }
            std::thread::sleep(Duration::from_millis(100).saturating_sub(round.elapsed()));
        }
    }

    pub fn stop(&self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

struct Follower {
    store: Store,
    writer: Writer,
    key: Arc<ChangelogKey>,
    metrics: Arc<Metrics>,
    consumer: Arc<BaseConsumer>,
    topic: String,
    replica: Arc<Replica>,
}

impl Follower {
    fn run(self) {
        let mut last_check = Instant::now() - Duration::from_secs(1);
        while !self.replica.stop.load(Ordering::SeqCst) {
            let mut entries = Vec::new();
            let mut read_some = false;
            // Where each partition's position was when this poll began: what
            // lies below it is here already (this node's own records, whose
            // confirmation moved the position past them, or entries applied
            // before), and the writer would skip it. Passed here, a group of
            // one reading back its own changelog costs no writer batch.
            let mut positions: HashMap<i32, Option<i64>> = HashMap::new();
            // Read what is there (up to a batch), then apply it in one write.
            if let Some(first) = self.consumer.poll(Duration::from_millis(50)) {
                let mut next = Some(first);
                let mut read = 0;
                while let Some(result) = next.take() {
                    match result {
                        Ok(m) if self.here_already(&m, &mut positions) => {}
                        Ok(m) => entries.push(self.read(&m)),
                        Err(e) => tracing::warn!(error = %e, topic = %self.topic, "changelog read failed; retrying"),
                    }
                    read += 1;
                    if read < 5000 {
                        next = self.consumer.poll(Duration::ZERO);
                    }
                }
                read_some = read > 0;
            }
            if !entries.is_empty() {
                // Not flushed: a replica that loses its last batches in a crash
                // loses their positions with them (one sled batch) and reads them
                // again; a flush per batch only delayed revocations reaching the API.
                // Through the writer (the cache forgets what they change there).
                match self.writer.replicate_blocking(entries) {
                    Ok((_, refused)) => self.report(&refused),
                    Err(e) => {
                        tracing::error!(error = %e, "cannot apply replicated changes; retrying from the stored position");
                        std::thread::sleep(Duration::from_millis(500));
                        self.rewind();
                        continue;
                    }
                }
            }
            // Caught up means: nothing left below the high watermark last asked for.
            if last_check.elapsed() >= Duration::from_millis(20) || read_some {
                last_check = Instant::now();
                let mut progress = self.replica.progress.lock().expect("replica lock");
                let highs: Vec<(i32, i64, Instant)> = progress.high.iter().map(|(p, (h, at))| (*p, *h, *at)).collect();
                for (p, high, asked) in highs {
                    if self.store.replica_position(p).ok().flatten().unwrap_or(0) >= high {
                        let at = progress.caught_up_at.entry(p).or_insert(asked);
                        *at = (*at).max(asked);
                    }
                }
                drop(progress);
                self.replica.changed.notify_all();
            }
        }
    }

    /// Below the partition's stored position: the writer would skip it. A
    /// position that cannot be read counts as none (the writer decides).
    fn here_already(&self, m: &rdkafka::message::BorrowedMessage<'_>, positions: &mut HashMap<i32, Option<i64>>) -> bool {
        let at = *positions.entry(m.partition()).or_insert_with(|| self.store.replica_position(m.partition()).ok().flatten());
        at.is_some_and(|at| m.offset() < at)
    }

    /// The record with its MAC checked: `authentic` holds its version only if
    /// the MAC under the cluster secret covers it.
    fn read(&self, m: &rdkafka::message::BorrowedMessage<'_>) -> Replicated {
        let (partition, key, value) = (m.partition(), m.key().unwrap_or_default(), m.payload());
        let headers = crate::intake::headers::raw(m);
        let header = |name: &str| headers.iter().find(|h| h.name == name.as_bytes()).and_then(|h| h.value);
        let version = header(VERSION_HEADER).and_then(|v| <[u8; 8]>::try_from(v).ok()).map(i64::from_be_bytes);
        let authentic = match (version, header(MAC_HEADER)) {
            (Some(version), Some(mac)) if self.key.verify(partition, key, value, version, mac) => Some(version),
            _ => None,
        };
        Replicated { partition, offset: m.offset(), key: key.to_vec(), value: value.map(<[u8]>::to_vec), authentic }
    }

    /// Refused records are a security event: counted, logged and (through the
    /// monitor's watch on the counter) alerted. The replica goes on.
    fn report(&self, refused: &[crate::store::Refused]) {
        for r in refused {
            self.metrics.security_events.with_label_values(&[r.reason]).inc();
            tracing::error!(
                topic = %self.topic,
                partition = r.partition,
                offset = r.offset,
                key = %r.key.escape_debug(),
                reason = r.reason,
                "refused a changelog record: it is never applied (forged or replayed without the cluster secret, or not what replication carries)"
            );
        }
    }

    /// After a failed write, reads again from the stored positions.
    fn rewind(&self) {
        for p in &self.replica.partitions {
            let from = match self.store.replica_position(*p) {
                Ok(at) => at.map_or(Offset::Beginning, Offset::Offset),
                Err(e) => {
                    tracing::error!(error = %e, partition = p, "cannot read the replica position; reading the partition from its start");
                    Offset::Beginning
                }
            };
            if let Err(e) = self.consumer.seek(&self.topic, *p, from, Duration::from_secs(5)) {
                tracing::warn!(error = %e, partition = p, "cannot rewind the changelog reader");
            }
        }
    }
}
