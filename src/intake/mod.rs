//! intake: the consumer-group member of the events topic. Each message becomes an
//! engine input whose partition offset is committed in the same store batch as its
//! effect; a message that is not an event goes to the dead-letter topic with its
//! original bytes, and its offset then advances through the same path.

pub mod activity_tracker;
mod assign;
pub mod cloudevents;
pub mod confirm;
pub mod eventbridge;
pub mod format;
pub mod headers;
mod lag;
pub mod native;
pub mod signature;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use futures::StreamExt;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, RebalanceProtocol, StreamConsumer};
use rdkafka::error::KafkaError;
use rdkafka::message::{BorrowedMessage, Header};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::types::RDKafkaRespErr;
use rdkafka::{ClientContext, Message, Offset, TopicPartitionList};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::field::Empty;
use tracing::{info_span, Instrument, Span};

use crate::cluster::fence::{Fence, Partition};
use crate::cluster::orphans;
use crate::config::KafkaConfig;
use crate::engine::{EventType, Input, KeyStatus, LifecycleEvent, Outcome, Reply};
use crate::kms::Kms;
use crate::metrics::Metrics;
use crate::store::writer::{Consumed, Pending, Writer, WriterError};
use crate::store::Store;
use confirm::{Answer, HintError};
use format::{Decoded, Incoming, Trust};
use signature::Verifier;

#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("message has no payload; produce a JSON lifecycle event")]
    Empty,
    #[error("message is {0} bytes; events are at most 64 KiB")]
    TooLarge(usize),
    #[error("payload is not JSON: {0}")]
    NotJson(String),
    #[error("payload is {what}; expected one of: {expected}")]
    UnknownFormat { what: String, expected: String },
    #[error("field {field} {problem}")]
    Field { field: &'static str, problem: String },
    #[error("{0}")]
    Unsupported(String),
    #[error("{format} event: {source}")]
    InFormat { format: &'static str, source: Box<DecodeError> },
    #[error(
        "message key {message_key:?} is not the event's key_id {key_id:?}; produce with the key id as the message key so that a key's events stay ordered"
    )]
    KeyMismatch { message_key: String, key_id: String },
    #[error(transparent)]
    Signature(#[from] signature::SignatureError),
    #[error("header {index}: {problem}")]
    Header { index: usize, problem: String },
    #[error(
        "event {event_id} is dated {}, more than signatures.max_clock_skew ({}) ahead of this daemon's clock ({}); fix the producer's clock (or this host's) and produce the event again",
        .occurred_at.to_rfc3339(),
        humantime::format_duration(*.max_clock_skew),
        .now.to_rfc3339()
    )]
    FutureDated { event_id: String, occurred_at: DateTime<Utc>, now: DateTime<Utc>, max_clock_skew: Duration },
    #[error(transparent)]
    Hint(#[from] HintError),
    /// A record understood and nothing to apply (Activity Tracker's expire,
    /// dual-authorization steps, adopters' acknowledgement records): recorded
    /// in the log and a metric, not dead-lettered, since nothing is wrong with it.
    #[error("{0}")]
    Noted(String),
}

impl DecodeError {
    /// A short, fixed label for metrics.
    pub fn class(&self) -> &'static str {
        match self {
            DecodeError::Empty => "empty",
            DecodeError::TooLarge(_) => "too_large",
            DecodeError::NotJson(_) => "not_json",
            DecodeError::UnknownFormat { .. } => "unknown_format",
            DecodeError::Field { .. } => "invalid_field",
            DecodeError::Unsupported(_) => "unsupported",
            DecodeError::InFormat { source, .. } => source.class(),
            DecodeError::KeyMismatch { .. } => "key_mismatch",
            DecodeError::Signature(e) => e.class(),
            DecodeError::Header { .. } => "invalid_header",
            DecodeError::FutureDated { .. } => "future_dated",
            DecodeError::Hint(e) => e.class(),
            DecodeError::Noted(_) => "noted",
        }
    }

    /// A record that needs nothing done: recorded, never dead-lettered.
    pub fn is_noted(&self) -> bool {
        match self {
            DecodeError::Noted(_) => true,
            DecodeError::InFormat { source, .. } => source.is_noted(),
            _ => false,
        }
    }

    /// Whether someone may be trying something (counted in
    /// `keywarden_security_events_total`), as opposed to a mistake.
    pub fn is_security_event(&self) -> bool {
        match self {
            DecodeError::Signature(e) => e.is_security_event(),
            DecodeError::Hint(e) => e.is_security_event(),
            _ => false,
        }
    }

    pub fn in_format(self, format: &'static str) -> DecodeError {
        DecodeError::InFormat { format, source: Box::new(self) }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum IntakeError {
    #[error("cannot create the kafka consumer: {0}; check kafka.brokers and kafka.properties")]
    Consumer(KafkaError),
    #[error("cannot subscribe to {topic}: {source}")]
    Subscribe { topic: String, source: KafkaError },
    #[error("cannot assign the partitions of {topic} to this node: {source}; restart keywarden, or set kafka.assignment = \"group\"")]
    Assign { topic: String, source: KafkaError },
    #[error("the store writer failed; events stay unacknowledged and will be redelivered")]
    Writer,
}

impl IntakeError {
    pub fn retryable(&self) -> bool {
        false
    }
}

/// What `/readyz` reports: partitions held and the broker answering; and the
/// consume loop's heartbeat, which the systemd watchdog pings are tied to.
#[derive(Default)]
pub struct Health {
    pub assigned: AtomicBool,
    /// Every partition assigned has been taken over at least once since the
    /// start (see `Health::note_ownership`).
    pub served_once: AtomicBool,
    pub broker_ok: AtomicBool,
    pub progress: crate::notify::Heartbeat,
    /// Set by the supervisor when a critical task stopped: never ready again.
    pub failure: Arc<crate::supervise::Failure>,
}

impl Health {
    /// Assigned as far as readiness goes: the first time, only once every
    /// partition is taken over, so that a node does not report ready and then
    /// refuse writes for the keys of a partition still being taken over. A
    /// later rebalance does not take readiness away while its take-overs run:
    /// DEKs are still served meanwhile (within the replica's lag), and every
    /// node of a group is rebalanced at once.
    pub fn note_ownership(&self, fence: &Fence) {
        let all = fence.serving_all();
        if all {
            self.served_once.store(true, Ordering::SeqCst);
        }
        let ready = fence.owned_count() > 0 && (all || self.served_once.load(Ordering::SeqCst));
        self.assigned.store(ready, Ordering::SeqCst);
    }

    pub fn ready(&self) -> bool {
        self.failure.get().is_none() && self.assigned.load(Ordering::SeqCst) && self.broker_ok.load(Ordering::SeqCst)
    }
}

/// `recv` waits as long as the topic is idle; waking this often lets the
/// heartbeat tell an idle loop from a stuck one (well inside a watchdog of 2s).
const IDLE_WAKE: Duration = Duration::from_millis(250);

/// How far before its stored offset a partition is read again on assignment.
/// tansu 0.6.0 answers a fetch from an offset inside a record batch with
/// nothing from that batch: resumed at the stored offset, a node skipped the
/// rest of the batch its last applied event was in (events lost). Read from
/// here, the batch holding the stored offset comes whole (a producer batch is
/// at most librdkafka's `batch.num.messages`, 10,000 by default), and what is
/// below the stored offset is passed by unread.
const REWIND: i64 = 10_000;

/// Held while one caller takes a partition (and generation) over.
type TakeOverTurn = Arc<tokio::sync::Mutex<()>>;

/// How soon a failed take-over is tried again.
const TAKEOVER_RETRY: Duration = Duration::from_secs(1);

/// Rebalance handling: on assignment each partition resumes from the offset in
/// the store (the truth; Kafka's committed offset is only a hint) under a new
/// fence generation; on revocation the fence closes before the partition goes.
pub struct IntakeContext {
    store: Store,
    fence: Arc<Fence>,
    health: Arc<Health>,
    /// With several nodes: newly assigned partitions, to be taken over (replica
    /// caught up, ownership announced) at once, not only when an event comes.
    takeovers: Option<mpsc::UnboundedSender<(i32, u64)>>,
    /// Partitions read again from before their stored offset (see `REWIND`),
    /// with that offset, until a message at or past it arrives.
    resume: std::sync::Mutex<HashMap<Partition, i64>>,
    resuming: AtomicBool,
}

impl ClientContext for IntakeContext {}

impl IntakeContext {
    /// Each partition resumes from the offset in the store; without one, from
    /// the group's committed offset (never past the store's: events read again
    /// are recognised).
    fn seek_to_stored(&self, tpl: &mut TopicPartitionList, parts: &[Partition]) {
        for (topic, partition) in parts {
            let stored = self.store.offset(topic, *partition).unwrap_or_else(|e| {
                tracing::error!(error = %e, %topic, partition, "cannot read the stored offset; resuming from the group's committed offset");
                None
            });
            if let Some(next) = stored {
                // An offset before the log's start reads from its start
                // (`auto.offset.reset`), which is before `next` too.
                if let Err(e) = tpl.set_partition_offset(topic, *partition, Offset::Offset(next.saturating_sub(REWIND).max(0))) {
                    tracing::error!(error = %e, %topic, partition, "cannot seek to the stored offset");
                }
                let mut resume = self.resume.lock().unwrap_or_else(|e| e.into_inner());
                resume.insert((topic.clone(), *partition), next);
                self.resuming.store(true, Ordering::SeqCst);
            }
        }
    }

    /// Whether a message at `offset` was applied before this assignment
    /// (below the stored offset): passed by. The first message at or past the
    /// stored offset ends the partition's resumption; one past it means the
    /// offsets between are gone (deleted by retention or compaction) or were
    /// in a batch larger than `REWIND`, and is said.
    fn applied_before(&self, topic: &str, partition: i32, offset: i64) -> bool {
        if !self.resuming.load(Ordering::SeqCst) {
            return false;
        }
        let mut resume = self.resume.lock().unwrap_or_else(|e| e.into_inner());
        let key = (topic.to_string(), partition);
        let Some(next) = resume.get(&key).copied() else { return false };
        if offset < next {
            return true;
        }
        resume.remove(&key);
        self.resuming.store(!resume.is_empty(), Ordering::SeqCst);
        if offset > next {
            tracing::warn!(%topic, partition, stored = next, first = offset, "resumed past the stored offset: the offsets between are gone from the topic, or were in a producer batch of more than 10,000 messages");
        }
        false
    }

    /// A new fence generation per partition; with several nodes, each is
    /// queued to be taken over, and served only once it is.
    fn fence_and_take_over(&self, parts: &[Partition]) {
        match &self.takeovers {
            Some(_) => self.fence.assign_pending(parts),
            None => self.fence.assign(parts),
        }
        if let Some(tx) = &self.takeovers {
            for (topic, partition) in parts {
                if let Some(generation) = self.fence.generation(topic, *partition) {
                    // The receiver lives as long as the intake; after it, nothing needs taking over.
                    let _ = tx.send((*partition, generation));
                }
            }
        }
    }

    fn log_assigned(&self, parts: &[Partition], message: &str) {
        let resumed: Vec<String> = parts
            .iter()
            .map(|(t, p)| format!("{t}/{p}@{}", self.store.offset(t, *p).ok().flatten().map(|o| o.to_string()).unwrap_or_else(|| "start".into())))
            .collect();
        tracing::info!(partitions = ?resumed, "{message}");
    }
}

impl ConsumerContext for IntakeContext {
    fn rebalance(&self, consumer: &BaseConsumer<Self>, err: RDKafkaRespErr, tpl: &mut TopicPartitionList) {
        let cooperative = matches!(consumer.rebalance_protocol(), RebalanceProtocol::Cooperative);
        let parts: Vec<Partition> = tpl.elements().iter().map(|e| (e.topic().to_string(), e.partition())).collect();
        match err {
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => {
                self.seek_to_stored(tpl, &parts);
                self.fence_and_take_over(&parts);
                let result = if cooperative { consumer.incremental_assign(tpl) } else { consumer.assign(tpl) };
                if let Err(e) = result {
                    tracing::error!(error = %e, "assigning partitions failed");
                }
                self.log_assigned(&parts, "partitions assigned; resuming from the store's offsets");
            }
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS => {
                self.fence.revoke(&parts);
                self.resume.lock().unwrap_or_else(|e| e.into_inner()).retain(|p, _| !parts.contains(p));
                let result = if cooperative { consumer.incremental_unassign(tpl) } else { consumer.unassign() };
                if let Err(e) = result {
                    tracing::error!(error = %e, "unassigning partitions failed");
                }
                tracing::info!(partitions = parts.len(), "partitions revoked");
            }
            other => {
                tracing::warn!(error = ?other, "rebalance error; dropping the assignment");
                self.fence.revoke_all();
                let _ = consumer.unassign();
            }
        }
        self.health.note_ownership(&self.fence);
    }
}

/// What an event must pass beyond its signature before it becomes an input.
pub struct Admission {
    /// `signatures.max_clock_skew`: see [`check_freshness`].
    pub max_clock_skew: Duration,
    /// `signatures.hint_topics`: where unsigned formats are accepted as hints.
    pub hint_topics: Vec<String>,
    /// `reconcile.confirm_above`: the most instances a hint the KMS could not
    /// be asked about may revoke.
    pub confirm_above: u64,
}

/// How long a KMS is given to say what state a key is in before the intake
/// goes on without its word; the partition's events wait meanwhile.
const KMS_ANSWER: Duration = Duration::from_secs(2);

pub struct Intake {
    consumer: Arc<StreamConsumer<IntakeContext>>,
    dlq: FutureProducer,
    kafka: KafkaConfig,
    writer: Writer,
    metrics: Arc<Metrics>,
    fence: Arc<Fence>,
    health: Arc<Health>,
    kms: Arc<dyn Kms>,
    verifier: Arc<Verifier>,
    admission: Admission,
    /// With several nodes: a partition's events are applied only once this
    /// node's replica holds everything its previous owner wrote; the
    /// partitions (and generations) for which that is done.
    replica: Option<Arc<crate::cluster::replica::Replica>>,
    taken_over: std::sync::Mutex<std::collections::HashSet<(i32, u64)>>,
    /// One take-over of a partition (and generation) at a time: the consume
    /// path and the take-over loop may both ask for it.
    taking: std::sync::Mutex<std::collections::HashMap<(i32, u64), TakeOverTurn>>,
    takeover_rx: std::sync::Mutex<Option<mpsc::UnboundedReceiver<(i32, u64)>>>,
    /// This node's API, announced to the others for each partition it takes.
    advertise_url: String,
    rejoin_after: Duration,
    store: Store,
    /// A node alone assigns itself every partition (`assign`) instead of
    /// subscribing through the consumer group.
    assign_all: bool,
}

struct Ack {
    pending: Pending,
    topic: String,
    partition: i32,
    offset: i64,
    /// The event's type, for metrics; `None` for a dead-lettered message.
    kind: Option<&'static str>,
    /// When the event happened, for the time-to-action histogram.
    occurred_at: Option<DateTime<Utc>>,
    /// The message's span: the "event handled" line is logged in it, and the
    /// trace ends when it is dropped.
    span: Span,
    /// Open from enqueue until the input is durable. The writer commits many
    /// events' inputs in one batch on its own thread; a span per batch would
    /// sit in a trace of its own, linked to hundreds of others, while what an
    /// event's trace needs is how long this event waited for durability
    /// (queueing, the group commit and its flush), which is what this measures.
    commit: Span,
}

impl Intake {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        kafka: &KafkaConfig,
        bootstrap: &str,
        store: Store,
        writer: Writer,
        fence: Arc<Fence>,
        health: Arc<Health>,
        metrics: Arc<Metrics>,
        kms: Arc<dyn Kms>,
        verifier: Arc<Verifier>,
        admission: Admission,
        replica: Option<Arc<crate::cluster::replica::Replica>>,
        advertise_url: &str,
        rejoin_after: Duration,
        assign_all: bool,
    ) -> Result<Intake, IntakeError> {
        let (takeover_tx, takeover_rx) = mpsc::unbounded_channel();
        let mut cfg = crate::broker::client_config(kafka, bootstrap);
        cfg.set("group.id", &kafka.group_id)
            .set("enable.auto.commit", "true")
            // Offsets are stored only once the store batch holding their effect is flushed.
            .set("enable.auto.offset.store", "false")
            .set("auto.offset.reset", "earliest")
            // Revocation latency is bounded below by how long a fetch may wait on an
            // idle partition (tansu waits it out even when an event arrives);
            // lifecycle topics are low-volume, so poll briskly. README, "The intake
            // polls briskly", has the measured cost of the idle polling.
            .set("fetch.wait.max.ms", "2");
        // Static membership: a restarted member with the same id gets its
        // partitions back at once instead of after the session timeout.
        // "dynamic" opts out (several nodes on a broker whose coordinator
        // mishandles more than two static members).
        // A node assigning itself every partition is no group member: it must
        // not claim a static member id that a later group member would inherit.
        if kafka.instance_id != "dynamic" && !assign_all {
            cfg.set("group.instance.id", &kafka.instance_id);
        }
        // The operator's properties win over keywarden's choices.
        for (k, v) in &kafka.properties {
            cfg.set(k, v);
        }
        let consumer: StreamConsumer<IntakeContext> = cfg
            .create_with_context(IntakeContext {
                store: store.clone(),
                fence: fence.clone(),
                health: health.clone(),
                takeovers: replica.as_ref().map(|_| takeover_tx.clone()),
                resume: Default::default(),
                resuming: AtomicBool::new(false),
            })
            .map_err(IntakeError::Consumer)?;
        if !assign_all {
            consumer.subscribe(&[&kafka.events_topic]).map_err(|source| IntakeError::Subscribe { topic: kafka.events_topic.clone(), source })?;
        }
        let dlq: FutureProducer = crate::broker::client_config(kafka, bootstrap).set("message.timeout.ms", "30000").create().map_err(IntakeError::Consumer)?;
        Ok(Intake {
            consumer: Arc::new(consumer),
            dlq,
            kafka: kafka.clone(),
            writer,
            metrics,
            fence,
            health,
            kms,
            verifier,
            admission,
            replica,
            taken_over: Default::default(),
            taking: Default::default(),
            takeover_rx: std::sync::Mutex::new(Some(takeover_rx)),
            advertise_url: advertise_url.to_string(),
            rejoin_after,
            store,
            assign_all,
        })
    }

    /// Starts the intake's watchers under the supervisor: the broker probe
    /// (readiness), the lag sampler and, with several nodes, the watch over
    /// partitions nobody owns. They stop with `stop`.
    pub fn spawn_watchers(&self, supervisor: &mut crate::supervise::Supervisor, stop: CancellationToken, peers: crate::cluster::Peers) {
        supervisor.spawn("intake-probe", probe_broker(self.consumer.clone(), self.kafka.events_topic.clone(), self.health.clone(), stop.clone()));
        supervisor.spawn("intake-lag", lag::sample(self.consumer.clone(), self.metrics.clone(), stop.clone()));
        if let Some(replica) = &self.replica {
            let watch = orphans::Watch {
                consumer: self.consumer.clone(),
                store: self.store.clone(),
                fence: self.fence.clone(),
                topic: self.kafka.events_topic.clone(),
                partitions: replica.partitions().to_vec(),
                me: self.advertise_url.clone(),
                rejoin_after: self.rejoin_after,
                health: self.health.clone(),
                peers,
            };
            supervisor.spawn("intake-orphans", watch.run(stop));
        }
    }

    /// Consumes until `shutdown`, then drains acknowledgements and commits offsets.
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), IntakeError> {
        let (ack_tx, ack_rx) = mpsc::channel::<Ack>(self.kafka.max_batch * 4);
        let acker = tokio::spawn(acknowledge(self.consumer.clone(), ack_rx, self.metrics.clone(), shutdown.clone()));
        let mut takeover_rx = self.takeover_rx.lock().expect("intake lock").take();
        let takeovers = async {
            match takeover_rx.as_mut() {
                Some(rx) => {
                    // Partitions are taken over at once, not one after the
                    // other (each may wait for the replica). One that failed
                    // (the broker away) is tried again TAKEOVER_RETRY later,
                    // while the partition is still ours under that generation:
                    // until it is done, its keys are not served here.
                    let mut running = futures::stream::FuturesUnordered::new();
                    let mut again: std::collections::VecDeque<(tokio::time::Instant, i32, u64)> = Default::default();
                    let this = &self;
                    let current = |partition: i32, generation: u64| this.fence.generation(&this.kafka.events_topic, partition) == Some(generation);
                    let attempt = |partition: i32, generation: u64| async move { (partition, generation, this.take_over(partition, generation).await) };
                    loop {
                        let retry_at = again.front().map(|(at, _, _)| *at);
                        tokio::select! {
                            next = rx.recv() => match next {
                                Some((partition, generation)) => running.push(attempt(partition, generation)),
                                None => break,
                            },
                            Some((partition, generation, done)) = running.next(), if !running.is_empty() => {
                                if !done && current(partition, generation) {
                                    again.push_back((tokio::time::Instant::now() + TAKEOVER_RETRY, partition, generation));
                                }
                            }
                            _ = tokio::time::sleep_until(retry_at.unwrap_or_else(tokio::time::Instant::now)), if retry_at.is_some() => {
                                if let Some((_, partition, generation)) = again.pop_front() {
                                    if current(partition, generation) {
                                        running.push(attempt(partition, generation));
                                    }
                                }
                            }
                        }
                    }
                    std::future::pending::<()>().await
                }
                None => std::future::pending::<()>().await,
            }
        };
        let result = tokio::select! {
            r = self.consume(&ack_tx, &shutdown) => r,
            _ = takeovers => Ok(()),
        };
        drop(ack_tx);
        // Whatever is not durable within the drain timeout stays unacknowledged and
        // is read again by the next owner; that is safe, only slower.
        let acked = match tokio::time::timeout(self.kafka.drain_timeout.0, acker).await {
            Ok(joined) => joined.unwrap_or(Err(IntakeError::Writer)),
            Err(_) => {
                tracing::warn!(timeout = ?self.kafka.drain_timeout, "drain timed out; unfinished events will be redelivered");
                Ok(())
            }
        };
        // Commit what is durable, so that a restart does not re-read it (it would be
        // harmless: duplicates are recognised, but slower).
        if let Err(e) = self.consumer.commit_consumer_state(CommitMode::Sync) {
            tracing::debug!(error = %e, "final offset commit skipped");
        }
        result.and(acked)
    }

    async fn consume(&self, ack_tx: &mpsc::Sender<Ack>, shutdown: &CancellationToken) -> Result<(), IntakeError> {
        if self.assign_all && !assign::every_partition(&self.consumer, &self.kafka.events_topic, shutdown).await? {
            return Ok(());
        }
        loop {
            self.health.progress.beat();
            let msg = tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                m = tokio::time::timeout(IDLE_WAKE, self.consumer.recv()) => m,
            };
            let Ok(msg) = msg else { continue };
            let msg = match msg {
                Ok(m) => m,
                Err(e) => {
                    tracing::warn!(error = %e, "kafka consumer error; retrying");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue;
                }
            };
            let (topic, partition, offset) = (msg.topic().to_string(), msg.partition(), msg.offset());
            let Some(generation) = self.fence.generation(&topic, partition) else {
                // Fetched before a revocation: the partition's next owner reads it.
                continue;
            };
            if self.consumer.context().applied_before(&topic, partition, offset) {
                continue;
            }
            if !self.take_over(partition, generation).await {
                // Not applied and not acknowledged: the partition's next reader gets it.
                return Err(IntakeError::Writer);
            }
            let consumed = Consumed { topic: topic.clone(), partition, next: offset + 1, generation };
            let raw = headers::raw(&msg);
            let headers = headers::checked(&raw);
            let upstream = crate::telemetry::received(headers.as_deref().unwrap_or_default());
            // Every line logged while handling the message carries these fields.
            let span = info_span!(
                "event",
                otel.kind = "consumer",
                %topic,
                partition,
                offset,
                event_id = Empty,
                key_id = Empty,
                r#type = Empty,
                correlation_id = Empty,
                format = Empty
            );
            crate::telemetry::continue_trace(&span, upstream.clone());
            let now = Utc::now();
            let decoded = info_span!(parent: &span, "decode").in_scope(|| {
                decode_message(&msg, headers, &self.verifier).and_then(|d| check_freshness(&d.event, now, self.admission.max_clock_skew).map(|()| d))
            });
            let admitted = match decoded {
                Ok(d) => self.admit(&topic, d).instrument(span.clone()).await,
                Err(e) => Err(e),
            };
            let (input, meta) = match admitted {
                Ok((mut event, format, kms)) => {
                    span.record("event_id", event.event_id.as_str());
                    span.record("key_id", event.key_id.as_str());
                    span.record("type", event.kind.as_str());
                    span.record("correlation_id", event.correlation_id.as_deref().unwrap_or(""));
                    span.record("format", format.name);
                    event.traceparent = crate::telemetry::traceparent(&span, &upstream);
                    span.in_scope(|| tracing::debug!("event received"));
                    let meta = (event.kind.as_str(), event.occurred_at);
                    (Some(Input::Event { event, at: Utc::now(), kms }), Some(meta))
                }
                Err(reason) if reason.is_noted() => {
                    self.metrics.events.with_label_values(&["unknown", "noted"]).inc();
                    span.in_scope(|| tracing::info!(topic = %topic, partition, offset, record = %reason, "record noted; nothing to apply"));
                    (None, None)
                }
                Err(reason) => {
                    if reason.is_security_event() {
                        self.metrics.security_events.with_label_values(&[reason.class()]).inc();
                        tracing::error!(topic = %topic, partition, offset, reason = %reason, "refused a message that nothing vouches for; it is never applied");
                    }
                    if !self.dead_letter(&msg, &reason, shutdown).instrument(span.clone()).await {
                        return Ok(());
                    }
                    (None, None)
                }
            };
            let commit = info_span!(parent: &span, "commit");
            let (kind, occurred_at) = (meta.map(|m| m.0), meta.map(|m| m.1));
            self.metrics.events_consumed.with_label_values(&[kind.unwrap_or("unknown")]).inc();
            let pending = self.writer.enqueue(input, Some(consumed)).await.map_err(|_| IntakeError::Writer)?;
            if ack_tx.send(Ack { pending, topic, partition, offset, kind, occurred_at, span, commit }).await.is_err() {
                return Err(IntakeError::Writer);
            }
        }
    }

    /// The first message of a newly assigned partition waits until the replica
    /// holds what the previous owner wrote (so that its events are recognised
    /// as applied), then tells the other nodes who owns the partition now. Not
    /// done in the rebalance callback: blocking there stalls the whole group.
    async fn take_over(&self, partition: i32, generation: u64) -> bool {
        let Some(replica) = &self.replica else { return true };
        let gate = self.taking.lock().expect("intake lock").entry((partition, generation)).or_default().clone();
        let _turn = gate.lock().await;
        if self.taken_over.lock().expect("intake lock").contains(&(partition, generation)) {
            return true;
        }
        let done = crate::cluster::takeover::take_over(replica, &self.writer, &self.kafka.events_topic, partition, generation, &self.advertise_url).await;
        match done {
            Ok(()) => {
                tracing::info!(partition, "partition taken over: replica caught up, ownership announced");
                self.taken_over.lock().expect("intake lock").insert((partition, generation));
                self.taking.lock().expect("intake lock").remove(&(partition, generation));
                // The fence's lock is held by the writer across a batch's
                // changelog publish: waited for off the runtime.
                let (fence, topic) = (self.fence.clone(), self.kafka.events_topic.clone());
                if let Err(e) = tokio::task::spawn_blocking(move || fence.taken_over(&topic, partition, generation)).await {
                    tracing::error!(partition, error = %e, "cannot mark the partition taken over; retrying");
                    return false;
                }
                self.health.note_ownership(&self.fence);
                true
            }
            Err(e) => {
                tracing::error!(partition, error = %e, "cannot announce this node as the partition's owner; retrying");
                false
            }
        }
    }

    /// What of a decoded event becomes an input, with the KMS's word on the
    /// key when it was asked. A signed event is applied as it is (a delete is
    /// checked with the KMS first); a hint only as far as its KMS confirms it
    /// (see [`confirm`]).
    async fn admit(&self, topic: &str, decoded: Decoded) -> Result<(LifecycleEvent, &'static format::Format, Option<KeyStatus>), DecodeError> {
        let Decoded { event, format } = decoded;
        let Trust::ConfirmedBy(confirms) = format.trust else {
            let kms = self.confirm_delete(&event).await;
            return Ok((event, format, kms));
        };
        if !self.admission.hint_topics.iter().any(|t| t == topic) {
            return Err(HintError::Topic { format: format.name, topic: topic.to_string() }.into());
        }
        let serves = self.kms.provider_for(&event.key_id);
        if serves != confirms {
            return Err(HintError::Unconfirmable { format: format.name, key_id: event.key_id, confirms, serves }.into());
        }
        // Only the rotation check reads it; a record that cannot be read
        // fails the engine's own read of it, which refuses the decision.
        let held = self.store.key(&event.key_id).ok().flatten().and_then(|k| k.version);
        let answer = Answer::from_result(self.key_state(&event.key_id).await);
        let confirmed = confirm::judge(format.name, event, held.as_deref(), answer)?;
        let event = confirmed.event;
        if confirmed.kms.is_none() {
            // Unconfirmed, so bounded: a writer to the topic during a KMS
            // outage must not be able to revoke a whole fleet.
            let store = self.store.clone();
            let key_id = event.key_id.clone();
            let instances = tokio::task::spawn_blocking(move || store.instance_count(&key_id)).await.ok().and_then(Result::ok).unwrap_or(0);
            if instances as u64 > self.admission.confirm_above {
                return Err(HintError::MassRevocation {
                    format: format.name,
                    event_id: event.event_id,
                    key_id: event.key_id,
                    instances,
                    limit: self.admission.confirm_above,
                }
                .into());
            }
        }
        if let Some(why) = &confirmed.narrowed {
            tracing::warn!(event_id = %event.event_id, key_id = %event.key_id, applied = %event.kind, reason = %why, "applying less than the hint claims");
        }
        Ok((event, format, confirmed.kms))
    }

    /// Asks the key's KMS for its state before a signed delete is applied, so
    /// that a delete the KMS contradicts erases nothing. An unreachable KMS is
    /// no veto: refusing DEKs is the safe direction, and a restore undoes it.
    async fn confirm_delete(&self, event: &LifecycleEvent) -> Option<KeyStatus> {
        if event.kind != EventType::Delete {
            return None;
        }
        match self.key_state(&event.key_id).await {
            Ok(state) => Some(state.status),
            Err(e) => {
                tracing::warn!(key_id = %event.key_id, error = %e, "cannot confirm the delete with the kms; applying it");
                None
            }
        }
    }

    /// The key's state, as its KMS reports it within [`KMS_ANSWER`].
    async fn key_state(&self, key_id: &str) -> Result<crate::kms::KmsKeyState, crate::kms::KmsError> {
        let call = self.kms.key_state(key_id).instrument(info_span!("kms.key_state", key_id = %key_id));
        tokio::time::timeout(KMS_ANSWER, call)
            .await
            .unwrap_or_else(|_| Err(crate::kms::KmsError::Unavailable(format!("no answer within {}s", KMS_ANSWER.as_secs()))))
    }

    /// Publishes to the dead-letter topic and waits for the broker to have it: the
    /// offset must not advance past a message that exists nowhere. Returns false if
    /// shutdown came first (the message will be read again).
    async fn dead_letter(&self, msg: &BorrowedMessage<'_>, reason: &DecodeError, shutdown: &CancellationToken) -> bool {
        let reason_text = reason.to_string();
        let partition = msg.partition().to_string();
        let offset = msg.offset().to_string();
        // The original headers are copied as librdkafka holds them, byte for
        // byte, never iterated (see `headers`): a name that is not UTF-8 is
        // kept for whoever inspects the dead letter.
        let original = msg.headers().map(|h| h.detach()).unwrap_or_default();
        let headers = [
            ("keywarden.reason", reason_text.as_str()),
            ("keywarden.source.topic", msg.topic()),
            ("keywarden.source.partition", partition.as_str()),
            ("keywarden.source.offset", offset.as_str()),
        ]
        .into_iter()
        .fold(original, |h, (key, value)| h.insert(Header { key, value: Some(value) }));
        let mut backoff = crate::backoff::Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
        loop {
            let mut record = FutureRecord::to(&self.kafka.dlq_topic).headers(headers.clone());
            if let Some(p) = msg.payload() {
                record = record.payload(p);
            }
            if let Some(k) = msg.key() {
                record = record.key(k);
            }
            match self.dlq.send(record, Duration::from_secs(5)).await {
                Ok(_) => {
                    self.metrics.dead_letters.with_label_values(&[reason.class()]).inc();
                    // Nothing in an undecodable or unverified message is believed, its type included.
                    self.metrics.events.with_label_values(&["unknown", "dead_lettered"]).inc();
                    tracing::warn!(topic = msg.topic(), partition = msg.partition(), offset = msg.offset(), reason = %reason_text, "message dead-lettered");
                    return true;
                }
                Err((e, _)) => {
                    tracing::warn!(error = %e, dlq = %self.kafka.dlq_topic, "cannot publish to the dead-letter topic; retrying");
                    // Retrying is progress: a restart would only retry the same publish.
                    self.health.progress.beat();
                    tokio::select! {
                        _ = shutdown.cancelled() => return false,
                        _ = tokio::time::sleep(backoff.next_delay()) => {}
                    }
                }
            }
        }
    }
}

/// Detects the format, checks the signature before believing anything in the
/// payload, then decodes.
fn decode_message(msg: &BorrowedMessage<'_>, headers: Result<Vec<(&str, &[u8])>, DecodeError>, verifier: &Verifier) -> Result<Decoded, DecodeError> {
    let incoming = Incoming { key: msg.key(), payload: msg.payload().unwrap_or_default(), headers: headers? };
    let format = format::detect(&incoming)?;
    verifier.check(msg.topic(), &incoming, format.name, format.trust == Trust::Signed)?;
    let event = (format.decode)(&incoming).map_err(|e| e.in_format(format.name))?;
    if let Some(k) = msg.key() {
        let key = String::from_utf8_lossy(k);
        if key != event.key_id {
            return Err(DecodeError::KeyMismatch { message_key: key.into_owned(), key_id: event.key_id });
        }
    }
    Ok(Decoded { event, format })
}

/// Refuses an event dated more than `max_clock_skew` ahead of `now`, before it
/// becomes an input: a signature says who sent an event, not when, and the
/// engine orders a key's events by their `occurred_at`, so one dated in the
/// future would win over every real event until that time came. A past date
/// is no refusal (late events are the engine's to call stale). A skew too
/// large to add to `now` refuses nothing.
fn check_freshness(event: &LifecycleEvent, now: DateTime<Utc>, max_clock_skew: Duration) -> Result<(), DecodeError> {
    let limit = chrono::Duration::from_std(max_clock_skew).ok().and_then(|skew| now.checked_add_signed(skew));
    match limit {
        Some(limit) if event.occurred_at > limit => {
            Err(DecodeError::FutureDated { event_id: event.event_id.clone(), occurred_at: event.occurred_at, now, max_clock_skew })
        }
        _ => Ok(()),
    }
}

/// Waits for each input to be durable, in order, then stores its offset for the
/// next auto-commit. Stored offsets never pass what the store holds.
async fn acknowledge(
    consumer: Arc<StreamConsumer<IntakeContext>>,
    mut rx: mpsc::Receiver<Ack>,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) -> Result<(), IntakeError> {
    while let Some(ack) = rx.recv().await {
        let result = ack.pending.await;
        drop(ack.commit);
        let reply = match result {
            Ok(reply) => reply,
            Err(WriterError::Fenced { topic, partition }) => {
                tracing::debug!(%topic, partition, offset = ack.offset, "input fenced off after a revocation");
                continue;
            }
            _ => {
                shutdown.cancel();
                return Err(IntakeError::Writer);
            }
        };
        if let (Some(kind), Reply::Event { outcome, detail }) = (ack.kind, &reply) {
            let outcome_label = match outcome {
                Outcome::Applied => "applied",
                Outcome::Duplicate => "duplicate",
                Outcome::Stale => "stale",
                Outcome::Ignored => "ignored",
            };
            metrics.events.with_label_values(&[kind, outcome_label]).inc();
            if let (Outcome::Applied, Some(at)) = (outcome, ack.occurred_at) {
                // A producer's clock ahead of ours would make this negative; that is no delay.
                let delay = (Utc::now() - at).to_std().unwrap_or_default();
                metrics.event_to_action.with_label_values(&[kind]).observe(delay.as_secs_f64());
            }
            // event_id, key_id, type, correlation_id and format come from the span.
            ack.span.in_scope(|| tracing::info!(outcome = outcome_label, %detail, "event handled"));
        }
        if let Err(e) = consumer.store_offset(&ack.topic, ack.partition, ack.offset) {
            // The partition was revoked meanwhile; the store already holds the offset.
            tracing::debug!(error = %e, partition = ack.partition, "offset not stored in kafka");
        }
    }
    Ok(())
}

/// Asks the broker for metadata every second: a consumer that holds partitions
/// but cannot reach the broker is not ready, and `/readyz` says so.
async fn probe_broker(consumer: Arc<StreamConsumer<IntakeContext>>, topic: String, health: Arc<Health>, shutdown: CancellationToken) {
    let mut was_ok = true;
    loop {
        let c = consumer.clone();
        let t = topic.clone();
        let ok = tokio::task::spawn_blocking(move || c.fetch_metadata(Some(&t), Duration::from_secs(2)).is_ok()).await.unwrap_or(false);
        health.broker_ok.store(ok, Ordering::SeqCst);
        if ok != was_ok {
            if ok {
                tracing::info!("kafka is reachable again");
            } else {
                tracing::warn!("kafka is unreachable; not ready until it is back (state is kept)");
            }
            was_ok = ok;
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn event_at(occurred_at: DateTime<Utc>) -> LifecycleEvent {
        LifecycleEvent {
            event_id: "e-1".into(),
            kind: EventType::Disable,
            key_id: "k".into(),
            key_version: None,
            occurred_at,
            correlation_id: None,
            traceparent: None,
            material_destroyed: false,
        }
    }

    const SKEW: Duration = Duration::from_secs(300);

    #[test]
    fn events_up_to_the_clock_skew_ahead_and_any_age_behind_are_accepted() {
        let now = Utc.timestamp_opt(1_800_000_000, 0).unwrap();
        for occurred in [now, now + chrono::Duration::seconds(300), now - chrono::Duration::days(400)] {
            check_freshness(&event_at(occurred), now, SKEW).unwrap();
        }
    }

    #[test]
    fn an_event_dated_beyond_the_clock_skew_is_refused_with_the_reason() {
        let now = Utc.timestamp_opt(1_800_000_000, 0).unwrap();
        let err = check_freshness(&event_at(now + chrono::Duration::seconds(301)), now, SKEW).unwrap_err();
        assert_eq!(err.class(), "future_dated");
        let reason = err.to_string();
        for part in ["event e-1", "2027-01-15T08:05:01+00:00", "signatures.max_clock_skew (5m)", "2027-01-15T08:00:00+00:00", "fix the producer's clock"] {
            assert!(reason.contains(part), "{part:?} not in {reason}");
        }
    }

    #[test]
    fn a_clock_skew_too_large_to_add_refuses_nothing() {
        let end_of_time = event_at(DateTime::<Utc>::MAX_UTC);
        check_freshness(&end_of_time, Utc.timestamp_opt(1_800_000_000, 0).unwrap(), Duration::MAX).unwrap();
        check_freshness(&end_of_time, DateTime::<Utc>::MAX_UTC - chrono::Duration::seconds(1), SKEW).unwrap();
    }
}
