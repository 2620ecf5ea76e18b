//! intake: the consumer-group member of the events topic. Each message becomes an
//! engine input whose partition offset is committed in the same store batch as its
//! effect; a message that is not an event goes to the dead-letter topic with its
//! original bytes, and its offset then advances through the same path.

pub mod native;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use rdkafka::consumer::{CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer};
use rdkafka::error::KafkaError;
use rdkafka::message::{BorrowedMessage, Header, Headers, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{ClientContext, Message};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::config::KafkaConfig;
use crate::engine::{Input, Outcome, Reply};
use crate::metrics::Metrics;
use crate::writer::{Consumed, Pending, Writer};

#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("message has no payload; produce a JSON lifecycle event")]
    Empty,
    #[error("message is {0} bytes; events are at most 64 KiB")]
    TooLarge(usize),
    #[error("payload is not JSON: {0}")]
    NotJson(String),
    #[error("field {field} {problem}")]
    Field { field: &'static str, problem: String },
    #[error("message key {message_key:?} is not the event's key_id {key_id:?}; produce with the key id as the message key so that a key's events stay ordered")]
    KeyMismatch { message_key: String, key_id: String },
}

impl DecodeError {
    /// A short, fixed label for metrics.
    pub fn class(&self) -> &'static str {
        match self {
            DecodeError::Empty => "empty",
            DecodeError::TooLarge(_) => "too_large",
            DecodeError::NotJson(_) => "not_json",
            DecodeError::Field { .. } => "invalid_field",
            DecodeError::KeyMismatch { .. } => "key_mismatch",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum IntakeError {
    #[error("cannot create the kafka consumer: {0}; check kafka.brokers and kafka.properties")]
    Consumer(KafkaError),
    #[error("cannot subscribe to {topic}: {source}")]
    Subscribe { topic: String, source: KafkaError },
    #[error("the store writer failed; events stay unacknowledged and will be redelivered")]
    Writer,
}

impl IntakeError {
    pub fn retryable(&self) -> bool {
        false
    }
}

/// Tracks whether this member holds partitions, for `/readyz`.
pub struct IntakeContext {
    pub assigned: Arc<AtomicBool>,
}

impl ClientContext for IntakeContext {}

impl ConsumerContext for IntakeContext {
    fn post_rebalance(&self, _consumer: &rdkafka::consumer::BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Assign(tpl) => {
                tracing::info!(partitions = tpl.count(), "partitions assigned");
                self.assigned.store(tpl.count() > 0, Ordering::SeqCst);
            }
            Rebalance::Revoke(tpl) => {
                tracing::info!(partitions = tpl.count(), "partitions revoked");
                self.assigned.store(false, Ordering::SeqCst);
            }
            Rebalance::Error(e) => tracing::warn!(error = %e, "rebalance error"),
        }
    }
}

pub struct Intake {
    pub consumer: Arc<StreamConsumer<IntakeContext>>,
    dlq: FutureProducer,
    kafka: KafkaConfig,
    writer: Writer,
    metrics: Arc<Metrics>,
}

struct Ack {
    pending: Pending,
    topic: String,
    partition: i32,
    offset: i64,
    label: Option<(String, String, &'static str)>,
}

impl Intake {
    pub fn new(
        kafka: &KafkaConfig,
        bootstrap: &str,
        writer: Writer,
        metrics: Arc<Metrics>,
        assigned: Arc<AtomicBool>,
    ) -> Result<Intake, IntakeError> {
        let mut cfg = crate::broker::client_config(kafka, bootstrap);
        cfg.set("group.id", &kafka.group_id)
            .set("enable.auto.commit", "true")
            // Offsets are stored only once the store batch holding their effect is flushed.
            .set("enable.auto.offset.store", "false")
            .set("auto.offset.reset", "earliest")
            // Revocation latency is bounded below by how long a fetch may wait on an
            // idle partition; lifecycle topics are low-volume, so poll briskly.
            .set("fetch.wait.max.ms", "10");
        // The operator's properties win over keywarden's choices.
        for (k, v) in &kafka.properties {
            cfg.set(k, v);
        }
        let consumer: StreamConsumer<IntakeContext> =
            cfg.create_with_context(IntakeContext { assigned }).map_err(IntakeError::Consumer)?;
        consumer
            .subscribe(&[&kafka.events_topic])
            .map_err(|source| IntakeError::Subscribe { topic: kafka.events_topic.clone(), source })?;
        let dlq: FutureProducer = crate::broker::client_config(kafka, bootstrap)
            .set("message.timeout.ms", "30000")
            .create()
            .map_err(IntakeError::Consumer)?;
        Ok(Intake { consumer: Arc::new(consumer), dlq, kafka: kafka.clone(), writer, metrics })
    }

    /// Consumes until `shutdown`, then drains acknowledgements and commits offsets.
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), IntakeError> {
        let (ack_tx, ack_rx) = mpsc::channel::<Ack>(self.kafka.max_batch * 4);
        let acker = tokio::spawn(acknowledge(self.consumer.clone(), ack_rx, self.metrics.clone(), shutdown.clone()));
        let result = self.consume(&ack_tx, &shutdown).await;
        drop(ack_tx);
        let acked = acker.await.unwrap_or(Err(IntakeError::Writer));
        // Commit what is durable, so that a restart does not re-read it (it would be
        // harmless: duplicates are recognised, but slower).
        if let Err(e) = self.consumer.commit_consumer_state(CommitMode::Sync) {
            tracing::debug!(error = %e, "final offset commit skipped");
        }
        result.and(acked)
    }

    async fn consume(&self, ack_tx: &mpsc::Sender<Ack>, shutdown: &CancellationToken) -> Result<(), IntakeError> {
        loop {
            let msg = tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                m = self.consumer.recv() => m,
            };
            let msg = match msg {
                Ok(m) => m,
                Err(e) => {
                    tracing::warn!(error = %e, "kafka consumer error; retrying");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue;
                }
            };
            let (topic, partition, offset) = (msg.topic().to_string(), msg.partition(), msg.offset());
            let consumed = Consumed { topic: topic.clone(), partition, next: offset + 1 };
            let (input, label) = match decode_message(&msg) {
                Ok(event) => {
                    tracing::debug!(event_id = %event.event_id, key_id = %event.key_id, r#type = %event.kind, partition, offset, "event received");
                    let label = Some((event.event_id.clone(), event.key_id.clone(), event.kind.as_str()));
                    (Some(Input::Event { event, at: Utc::now() }), label)
                }
                Err(reason) => {
                    if !self.dead_letter(&msg, &reason, shutdown).await {
                        return Ok(());
                    }
                    (None, None)
                }
            };
            let pending = self.writer.enqueue(input, Some(consumed)).await.map_err(|_| IntakeError::Writer)?;
            if ack_tx.send(Ack { pending, topic, partition, offset, label }).await.is_err() {
                return Err(IntakeError::Writer);
            }
        }
    }

    /// Publishes to the dead-letter topic and waits for the broker to have it: the
    /// offset must not advance past a message that exists nowhere. Returns false if
    /// shutdown came first (the message will be read again).
    async fn dead_letter(&self, msg: &BorrowedMessage<'_>, reason: &DecodeError, shutdown: &CancellationToken) -> bool {
        let reason_text = reason.to_string();
        let partition = msg.partition().to_string();
        let offset = msg.offset().to_string();
        let mut headers = OwnedHeaders::new()
            .insert(Header { key: "keywarden.reason", value: Some(reason_text.as_str()) })
            .insert(Header { key: "keywarden.source.topic", value: Some(msg.topic()) })
            .insert(Header { key: "keywarden.source.partition", value: Some(partition.as_str()) })
            .insert(Header { key: "keywarden.source.offset", value: Some(offset.as_str()) });
        if let Some(original) = msg.headers() {
            for h in original.iter() {
                headers = headers.insert(Header { key: h.key, value: h.value });
            }
        }
        let mut backoff = Duration::from_millis(100);
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
                    tracing::warn!(topic = msg.topic(), partition = msg.partition(), offset = msg.offset(), reason = %reason_text, "message dead-lettered");
                    return true;
                }
                Err((e, _)) => {
                    tracing::warn!(error = %e, dlq = %self.kafka.dlq_topic, "cannot publish to the dead-letter topic; retrying");
                    tokio::select! {
                        _ = shutdown.cancelled() => return false,
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        }
    }
}

fn decode_message(msg: &BorrowedMessage<'_>) -> Result<crate::engine::LifecycleEvent, DecodeError> {
    let payload = msg.payload().filter(|p| !p.is_empty()).ok_or(DecodeError::Empty)?;
    let event = native::decode(payload)?;
    if let Some(k) = msg.key() {
        let key = String::from_utf8_lossy(k);
        if key != event.key_id {
            return Err(DecodeError::KeyMismatch { message_key: key.into_owned(), key_id: event.key_id });
        }
    }
    Ok(event)
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
        let reply = match ack.pending.await {
            Ok(Ok(reply)) => reply,
            _ => {
                shutdown.cancel();
                return Err(IntakeError::Writer);
            }
        };
        if let (Some((event_id, key_id, kind)), Reply::Event { outcome, detail }) = (&ack.label, &reply) {
            let outcome_label = match outcome {
                Outcome::Applied => "applied",
                Outcome::Duplicate => "duplicate",
                Outcome::Stale => "stale",
                Outcome::Ignored => "ignored",
            };
            metrics.events.with_label_values(&[kind, outcome_label]).inc();
            tracing::info!(%event_id, %key_id, r#type = kind, outcome = outcome_label, %detail, "event handled");
        }
        if let Err(e) = consumer.store_offset(&ack.topic, ack.partition, ack.offset) {
            // The partition was revoked meanwhile; the store already holds the offset.
            tracing::debug!(error = %e, partition = ack.partition, "offset not stored in kafka");
        }
    }
    Ok(())
}
