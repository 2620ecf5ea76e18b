//! tell: the outbox relay. Effects are committed with the state that caused them
//! and published here afterwards, so a crash between commit and publish only
//! delays them; after a restart they are sent again with the same ids.

pub mod alerts;
pub mod monitor;

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use rdkafka::error::KafkaError;
use rdkafka::message::{Header, OwnedHeaders};

use crate::backoff::Backoff;
use rdkafka::producer::{FutureProducer, FutureRecord};
use serde::Serialize;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::config::KafkaConfig;
use crate::engine::{CommandAction, Effect};
use crate::intake::signature::{Signer, HEADER as SIGNATURE_HEADER};
use crate::kms::Kms;
use crate::metrics::Metrics;
use crate::store::writer::Writer;
use crate::store::{Queue, Store};

#[derive(Debug, thiserror::Error)]
pub enum TellError {
    #[error("cannot publish to {topic}: {source}; the effect stays in the outbox and is retried")]
    Publish { topic: String, source: KafkaError },
    #[error("cannot create the kafka producer: {0}; check kafka.brokers and kafka.properties")]
    Producer(KafkaError),
    #[error("cannot read what to send: {0}")]
    Store(#[from] crate::store::StoreError),
}

impl TellError {
    pub fn retryable(&self) -> bool {
        matches!(self, TellError::Publish { .. })
    }
}

/// A data-plane command, as published to the commands topic.
#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct Command {
    pub command_id: String,
    pub instance_id: String,
    pub action: CommandAction,
    pub key_id: String,
    pub key_version: Option<String>,
    pub cause_event_id: String,
    pub issued_at: DateTime<Utc>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub correlation_id: Option<String>,
}

const COMMAND_NAMESPACE: uuid::Uuid = uuid::Uuid::from_u128(0x6b65_7977_6172_6465_6e00_636f_6d6d_616e);

impl Command {
    /// The id depends only on what caused the command, so a re-send after a crash
    /// carries the same id and consumers can deduplicate.
    pub fn new(
        instance_id: &str,
        key_id: &str,
        action: CommandAction,
        key_version: Option<String>,
        cause_event_id: &str,
        issued_at: DateTime<Utc>,
        correlation_id: Option<String>,
    ) -> Command {
        let action_name = serde_json::to_string(&action).expect("actions serialize");
        let name = format!("{cause_event_id}\0{instance_id}\0{action_name}");
        Command {
            command_id: uuid::Uuid::new_v5(&COMMAND_NAMESPACE, name.as_bytes()).to_string(),
            instance_id: instance_id.to_string(),
            action,
            key_id: key_id.to_string(),
            key_version,
            cause_event_id: cause_event_id.to_string(),
            issued_at,
            correlation_id,
        }
    }
}

pub struct Relay {
    store: Store,
    /// Told what was sent, so that the queues shrink through the one writer.
    writer: Writer,
    kms: Arc<dyn Kms>,
    producer: FutureProducer,
    kafka: KafkaConfig,
    notify: Arc<Notify>,
    metrics: Arc<Metrics>,
    /// Signs the embedded KMS's events, so that they pass the same check as
    /// anyone else's, and every data-plane command, so that a consumer can
    /// tell a real `restore` from one produced by whoever can write the topic.
    signer: Option<Arc<Signer>>,
}

/// Effects handled per round; a key-wide command counts as one.
const ROUND: usize = 64;

/// How often the outbox depth is counted while a backlog drains.
const DEPTH_EVERY: Duration = Duration::from_secs(10);

impl Relay {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        store: Store,
        writer: Writer,
        kms: Arc<dyn Kms>,
        kafka: &KafkaConfig,
        bootstrap: &str,
        notify: Arc<Notify>,
        metrics: Arc<Metrics>,
        signer: Option<Arc<Signer>>,
    ) -> Result<Relay, TellError> {
        let producer = crate::broker::client_config(kafka, bootstrap)
            .set("message.timeout.ms", "30000")
            // A request the broker never answers (it died with it on the wire)
            // is retried after 5 s, not the default 30 s, so that commands
            // queued at a broker crash go out soon after it is back. A retry
            // can repeat a command, under the same command id.
            .set("request.timeout.ms", "5000")
            .set("linger.ms", "2")
            // The embedded KMS's events land where the key's owner reads them.
            .set("partitioner", crate::cluster::PARTITIONER)
            .create()
            .map_err(TellError::Producer)?;
        Ok(Relay { store, writer, kms, producer, kafka: kafka.clone(), notify, metrics, signer })
    }

    pub async fn run(self, shutdown: CancellationToken) {
        tokio::join!(self.publish_loop(shutdown.clone()), self.notice_loop(shutdown));
    }

    /// Tells each key's KMS what it asked to be told, in commit order. A
    /// transient failure waits and retries (order matters: a registration comes
    /// before its update); a permanent one is logged and dropped, so that one
    /// bad notice cannot stall the rest.
    async fn notice_loop(&self, shutdown: CancellationToken) {
        let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(30));
        loop {
            let notified = self.notify.notified();
            let batch = match self.store.notices(32) {
                Ok(batch) => batch,
                Err(e) => {
                    tracing::error!(error = %e, "cannot read the kms notices; retrying");
                    if !pause(&shutdown, tokio::time::sleep(backoff.next_delay())).await {
                        return;
                    }
                    continue;
                }
            };
            if batch.is_empty() {
                if !idle(&shutdown, notified).await {
                    return;
                }
                continue;
            }
            let mut done = Vec::new();
            let mut stalled = false;
            for (id, effect) in batch {
                let Effect::KmsNotice { key_id, notice } = &effect else {
                    done.push(id);
                    continue;
                };
                match self.kms.notify(key_id, notice).await {
                    Ok(()) => done.push(id),
                    Err(e) if e.retryable() => {
                        tracing::warn!(%key_id, error = %e, "kms notice failed; retrying");
                        stalled = true;
                        break;
                    }
                    Err(e) => {
                        tracing::error!(%key_id, error = %e, notice = ?notice, "kms refused a notice; dropping it");
                        done.push(id);
                    }
                }
            }
            if let Err(e) = self.writer.sent(Queue::Notices, done).await {
                tracing::error!(error = %e, "cannot remove delivered notices; they will be sent again");
            }
            if stalled {
                if !pause(&shutdown, tokio::time::sleep(backoff.next_delay())).await {
                    return;
                }
            } else {
                backoff.reset();
            }
        }
    }

    async fn publish_loop(&self, shutdown: CancellationToken) {
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(10));
        let mut depth_at: Option<std::time::Instant> = None;
        loop {
            let notified = self.notify.notified();
            let batch = match self.store.outbox(ROUND) {
                Ok(batch) => batch,
                Err(e) => {
                    tracing::error!(error = %e, "cannot read the outbox; retrying");
                    if !pause(&shutdown, tokio::time::sleep(backoff.next_delay())).await {
                        return;
                    }
                    continue;
                }
            };
            // Counting the outbox walks all of it: once per round made a 100,000-DEK
            // rotation quadratic, and once a second was still a twentieth of the
            // daemon's CPU during one (a count of 100,000 entries takes ~50 ms).
            // A short round is an exact count, and cheap; while rounds come back
            // full the gauge is refreshed every 10 s.
            if batch.len() < ROUND || depth_at.is_none_or(|t| t.elapsed() >= DEPTH_EVERY) {
                self.metrics.outbox_depth.set(self.store.outbox_len() as i64);
                depth_at = Some(std::time::Instant::now());
            }
            if batch.is_empty() {
                if !idle(&shutdown, notified).await {
                    return;
                }
                continue;
            }
            let mut sent = Vec::with_capacity(batch.len());
            let mut failed = None;
            for (id, effect) in batch {
                match self.publish(&effect).await {
                    Ok(()) => sent.push(id),
                    Err(e) => {
                        failed = Some(e);
                        break;
                    }
                }
            }
            // With a changelog, removing also publishes tombstones (the other
            // nodes forget their copies), on the writer's thread.
            if let Err(e) = self.writer.sent(Queue::Outbox, sent).await {
                tracing::error!(error = %e, "cannot remove published effects from the outbox; they will be sent again");
            }
            if let Some(e) = failed {
                tracing::warn!(error = %e, "publishing failed");
                if !pause(&shutdown, tokio::time::sleep(backoff.next_delay())).await {
                    return;
                }
            } else {
                backoff.reset();
            }
        }
    }

    async fn publish(&self, effect: &Effect) -> Result<(), TellError> {
        match effect {
            Effect::KeyCommands { key_id, action, key_version, cause_event_id, issued_at, correlation_id, traceparent } => {
                // Fan out to the instances the key protects now, including those
                // created after the event: they all share the key's fate.
                let commands: Vec<Command> = self
                    .store
                    .instances_of(key_id)?
                    .into_iter()
                    .filter(|inst| inst.wrapped.is_some())
                    .map(|inst| Command::new(&inst.instance_id, key_id, *action, key_version.clone(), cause_event_id, *issued_at, correlation_id.clone()))
                    .collect();
                self.send_commands(&commands, traceparent.as_deref()).await
            }
            Effect::InstanceCommand { instance_id, key_id, action, key_version, cause_event_id, issued_at, correlation_id, traceparent } => {
                let c = Command::new(instance_id, key_id, *action, key_version.clone(), cause_event_id, *issued_at, correlation_id.clone());
                self.send_commands(std::slice::from_ref(&c), traceparent.as_deref()).await
            }
            Effect::LifecycleEvent { key_id, payload } => {
                let topic = &self.kafka.events_topic;
                let signature = self.signer.as_ref().map(|s| s.sign(payload.as_bytes()));
                let mut record = FutureRecord::to(topic).key(key_id).payload(payload);
                if let Some(sig) = &signature {
                    record = record.headers(OwnedHeaders::new().insert(Header { key: SIGNATURE_HEADER, value: Some(sig.as_str()) }));
                }
                self.producer.send(record, Duration::from_secs(10)).await.map_err(|(source, _)| TellError::Publish { topic: topic.clone(), source })?;
                tracing::info!(%key_id, "lifecycle event published");
                Ok(())
            }
            // Stored in the notice and alert queues, never here.
            Effect::KmsNotice { .. } | Effect::Alert(_) => Ok(()),
        }
    }

    /// `traceparent` is the causing event's, stored with the effect: the
    /// commands continue its trace, so the data plane's handling joins it.
    async fn send_commands(&self, commands: &[Command], traceparent: Option<&str>) -> Result<(), TellError> {
        let topic = &self.kafka.commands_topic;
        let span = tracing::info_span!("publish", otel.kind = "producer", %topic, commands = commands.len());
        let upstream = crate::telemetry::stored(traceparent);
        crate::telemetry::continue_trace(&span, upstream.clone());
        let header = crate::telemetry::traceparent(&span, &upstream);
        let payloads: Vec<String> = commands.iter().map(|c| serde_json::to_string(c).expect("commands serialize")).collect();
        // The same header as a signed event's, over the exact payload bytes.
        let signatures: Vec<Option<String>> = payloads.iter().map(|p| self.signer.as_ref().map(|s| s.sign(p.as_bytes()))).collect();
        // Queue them all, then wait: librdkafka batches the sends.
        let futures: Vec<_> = commands
            .iter()
            .zip(&payloads)
            .zip(&signatures)
            .map(|((c, p), signature)| {
                let mut headers = OwnedHeaders::new();
                if let Some(tp) = &header {
                    headers = headers.insert(Header { key: crate::telemetry::TRACEPARENT, value: Some(tp.as_str()) });
                }
                if let Some(sig) = signature {
                    headers = headers.insert(Header { key: SIGNATURE_HEADER, value: Some(sig.as_str()) });
                }
                self.producer.send(FutureRecord::to(topic).key(&c.instance_id).payload(p).headers(headers), Duration::from_secs(10))
            })
            .collect();
        let results = futures::future::join_all(futures).instrument(span.clone()).await;
        let _in_span = span.enter();
        for (c, result) in commands.iter().zip(results) {
            result.map_err(|(source, _)| TellError::Publish { topic: topic.clone(), source })?;
            let action = serde_json::to_value(c.action).ok().and_then(|v| v.as_str().map(str::to_owned)).unwrap_or_default();
            self.metrics.commands.with_label_values(&[&action]).inc();
            tracing::debug!(
                instance_id = %c.instance_id,
                key_id = %c.key_id,
                event_id = %c.cause_event_id,
                correlation_id = c.correlation_id.as_deref().unwrap_or(""),
                command_id = %c.command_id,
                action = %action,
                "command published"
            );
        }
        Ok(())
    }
}

/// Waits for `wake`, or for shutdown; false means shut down.
/// An empty queue waits for the next commit's wake-up, or a second at most (a
/// wake-up sent before the wait began is not lost: `notified` was created
/// before the queue was read); false means shut down.
pub(crate) async fn idle(shutdown: &CancellationToken, notified: impl std::future::Future<Output = ()>) -> bool {
    pause(shutdown, async {
        tokio::select! {
            _ = notified => {}
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    })
    .await
}

pub(crate) async fn pause(shutdown: &CancellationToken, wake: impl std::future::Future<Output = ()>) -> bool {
    tokio::select! {
        _ = shutdown.cancelled() => false,
        _ = wake => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_resent_command_keeps_its_id() {
        let at = Utc::now();
        let a = Command::new("i", "k", CommandAction::Revoke, None, "e1", at, None);
        let b = Command::new("i", "k", CommandAction::Revoke, None, "e1", at, None);
        let c = Command::new("i", "k", CommandAction::Restore, None, "e1", at, None);
        assert_eq!(a.command_id, b.command_id);
        assert_ne!(a.command_id, c.command_id);
        let json = serde_json::to_value(&a).unwrap();
        for field in ["command_id", "instance_id", "action", "key_id", "key_version", "cause_event_id", "issued_at"] {
            assert!(json.get(field).is_some(), "{field}");
        }
        assert_eq!(json["action"], "revoke");
    }
}
