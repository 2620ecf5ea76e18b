//! tell: the outbox relay. Effects are committed with the state that caused them
//! and published here afterwards, so a crash between commit and publish only
//! delays them; after a restart they are sent again with the same ids.

pub mod alerts;
pub mod monitor;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use rdkafka::error::KafkaError;
use rdkafka::message::{Header, OwnedHeaders};

use crate::backoff::Backoff;
use futures::StreamExt;
use rdkafka::producer::{FutureProducer, FutureRecord};
use serde::Serialize;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::config::KafkaConfig;
use crate::engine::{AdopterState, Alert, CommandAction, DataPlaneOutcome, Effect, Input, KeyStatus, Notice, Severity};
use crate::intake::signature::{Signer, HEADER as SIGNATURE_HEADER};
use crate::kms::Kms;
use crate::metrics::Metrics;
use crate::store::writer::Writer;
use crate::store::{Queue, SentEntry, Store};

#[derive(Debug, thiserror::Error)]
pub enum TellError {
    #[error("cannot publish to {topic}: {source}; the effect stays in the outbox and is retried")]
    Publish { topic: String, source: KafkaError },
    #[error("cannot create the kafka producer: {0}; check kafka.brokers and kafka.properties")]
    Producer(KafkaError),
    #[error("cannot read what to send: {0}")]
    Store(#[from] crate::store::StoreError),
    #[error("the store read for what to send failed on its thread: {0}; retried")]
    Reading(String),
}

impl TellError {
    pub fn retryable(&self) -> bool {
        matches!(self, TellError::Publish { .. })
    }

    /// Whether the outbox's front was refused, rather than not delivered: a
    /// broker that cannot be reached times messages out or drops connections
    /// (`KeywardenKafkaUnreachable` says so); anything else kept it from
    /// going out although the broker answered (an ACL, a message too large),
    /// or it could not be read.
    fn stops_the_outbox(&self) -> bool {
        use rdkafka::types::RDKafkaErrorCode as Code;
        match self {
            TellError::Publish { source, .. } => !matches!(
                source.rdkafka_error_code(),
                Some(
                    Code::MessageTimedOut
                        | Code::AllBrokersDown
                        | Code::BrokerTransportFailure
                        | Code::Resolve
                        | Code::QueueFull
                        | Code::TimedOutQueue
                        | Code::RequestTimedOut
                        | Code::NetworkException
                )
            ),
            TellError::Producer(_) | TellError::Store(_) | TellError::Reading(_) => true,
        }
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
    /// carries the same id and consumers can deduplicate. A `rewrapped` names
    /// the version it announces too: one rotation's passes may rewrap an
    /// instance twice (the KMS rotated again before its event was applied),
    /// and the second is another command, which an agent that journals by id
    /// must not take for a re-send of the first.
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
        let name = match (&action, &key_version) {
            (CommandAction::Rewrapped, Some(version)) => format!("{cause_event_id}\0{instance_id}\0{action_name}\0{version}"),
            _ => format!("{cause_event_id}\0{instance_id}\0{action_name}"),
        };
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
    /// Data-plane agents confirm revocations (`data_plane.enforce_within` is
    /// set): an acknowledgement of a disable or delete then also waits for
    /// them (see `enforced`).
    await_agents: bool,
    /// The outbox's front: the publish loop moves it, the notice loop reads
    /// its key's unpublished commands from there too.
    outbox: Cursor,
}

/// Commands handled per round (an entry of many counts as many; a key-wide
/// command as one; a round takes one entry at least). A run of
/// instance commands in a round is sent as one batch (one round trip).
const ROUND: usize = 256;

/// Commands prepared or queued between two yields to the runtime.
const SLICE: usize = 256;

/// Notices read per round: enough that keys waiting on their own backoff do
/// not hide the notices of other keys behind them.
const NOTICE_WINDOW: usize = 512;

/// How soon an acknowledgement waiting for its key's commands looks again.
const UNFLUSHED_RECHECK: Duration = Duration::from_millis(200);
/// How soon an acknowledgement waiting for the agents' reports looks again:
/// each look reads every instance of the key.
const AGENTS_RECHECK: Duration = Duration::from_secs(1);

const NOTICE_REFUSED: &str = "KeywardenKmsNoticeRefused";
const OUTBOX_REFUSED: &str = "KeywardenOutboxRefused";
const ACK_DEADLINE: &str = "KeywardenKmsAckDeadline";

/// How one key's notices went this round.
enum KeyOutcome {
    Done,
    /// A transient failure: the key waits out its backoff.
    Retry,
    /// An acknowledgement waits for the key's commands to be published.
    Unflushed,
    /// An acknowledgement waits for the data-plane agents' reports.
    AwaitingAgents,
}

/// The key an outbox effect concerns, if any.
fn effect_key(e: &Effect) -> Option<&str> {
    match e {
        Effect::KeyCommands { key_id, .. } | Effect::InstanceCommand { key_id, .. } | Effect::InstanceCommands { key_id, .. } => Some(key_id),
        _ => None,
    }
}

fn notice_kind(n: &Notice) -> &'static str {
    match n {
        Notice::Registered { .. } => "registration",
        Notice::Rewrapped { .. } => "registration update",
        Notice::Deregistered { .. } => "deregistration",
        Notice::Acknowledge { .. } => "event acknowledgement",
    }
}

/// The trace an instance command entry continues; None for any other effect.
fn command_trace(effect: &Effect) -> Option<Option<&str>> {
    match effect {
        Effect::InstanceCommand { traceparent, .. } | Effect::InstanceCommands { traceparent, .. } => Some(traceparent.as_deref()),
        _ => None,
    }
}

/// How many commands an entry sends to the commands topic on its own (a
/// key-wide entry's depend on the key's instances).
fn command_count(effect: &Effect) -> usize {
    match effect {
        Effect::InstanceCommand { .. } => 1,
        Effect::InstanceCommands { instances, .. } => instances.len(),
        _ => 0,
    }
}

/// The commands an instance command entry sends.
pub(crate) fn instance_commands(effect: &Effect) -> Vec<Command> {
    match effect {
        Effect::InstanceCommand { instance_id, key_id, action, key_version, cause_event_id, issued_at, correlation_id, .. } => {
            vec![Command::new(instance_id, key_id, *action, key_version.clone(), cause_event_id, *issued_at, correlation_id.clone())]
        }
        Effect::InstanceCommands { key_id, action, key_version, cause_event_id, correlation_id, instances, .. } => instances
            .iter()
            .map(|i| Command::new(&i.instance_id, key_id, *action, key_version.clone(), cause_event_id, i.issued_at, correlation_id.clone()))
            .collect(),
        _ => Vec::new(),
    }
}

/// Which of `keys` still have a data-plane command in the outbox from
/// `from` on. The outbox is read a page at a time until every key is found
/// or it ends: an acknowledgement must not overtake its key's commands
/// however many commits are queued before them (one page of 512 commands'
/// worth let it, behind a backlog). Blocking; for due acknowledgements
/// only, each looked at again no sooner than `UNFLUSHED_RECHECK`.
fn unpublished_among(store: &Store, mut from: u64, mut keys: HashSet<String>) -> Result<HashSet<String>, crate::store::StoreError> {
    let mut found = HashSet::new();
    while !keys.is_empty() {
        let page = store.outbox_from(from, NOTICE_WINDOW)?;
        let Some((last, _)) = page.last() else { break };
        from = last + 1;
        for key in page.iter().flat_map(|(_, effects)| effects.iter().filter_map(effect_key)) {
            if let Some(key) = keys.take(key) {
                found.insert(key);
            }
        }
    }
    Ok(found)
}

/// How often the outbox depth is counted while a backlog drains.
const DEPTH_EVERY: Duration = Duration::from_secs(10);

/// Where a relay reads its queue on from: every entry below it was sent and
/// removed. Sound because one writer gives the ids in commit order (sled's
/// `generate_id`, monotonic across restarts) and applies a batch's entries
/// together: no entry below an id a relay has read can appear later. Starts
/// at 0 (a restart reads the whole queue) and goes back there when removing
/// failed, so that what is still queued is read again.
#[derive(Debug, Default)]
pub(crate) struct Cursor(AtomicU64);

impl Cursor {
    pub(crate) fn at(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }

    /// `read` are entries read from the cursor on, in order, each with whether
    /// it was removed: the cursor moves past those removed up to the first
    /// that was not.
    pub(crate) fn removed(&self, read: impl IntoIterator<Item = (u64, bool)>) {
        let mut at = self.at();
        for (id, removed) in read {
            if !removed {
                break;
            }
            at = at.max(id.saturating_add(1));
        }
        self.0.store(at, Ordering::Relaxed);
    }

    pub(crate) fn reset(&self) {
        self.0.store(0, Ordering::Relaxed);
    }
}

/// Where a relay stopped inside a queue record it could not send whole (one
/// record per commit): the record's id and how many of its items went out.
/// The retry goes on from the first that did not; after a restart nothing is
/// remembered, and the record is sent from its start, under the same ids.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct Resume(Option<(u64, usize)>);

impl Resume {
    /// How many of record `id`'s items went out already.
    pub(crate) fn sent_of(&self, id: u64) -> usize {
        self.0.filter(|(at, _)| *at == id).map_or(0, |(_, n)| n)
    }

    /// Record `id` stopped after its first `sent` items.
    pub(crate) fn stopped(&mut self, id: u64, sent: usize) {
        self.0 = (sent > 0).then_some((id, sent));
    }

    /// A round read `records` (id, items sent before it, items it had left),
    /// in order, and sent the first `sent` of the items left: how many records
    /// went out whole (to be removed), and where the first that did not stopped.
    fn settle(&mut self, records: impl IntoIterator<Item = (u64, usize, usize)>, mut sent: usize) -> usize {
        let mut whole = 0;
        for (id, before, left) in records {
            if sent < left {
                self.stopped(id, before + sent);
                break;
            }
            sent -= left;
            whole += 1;
        }
        whole
    }
}

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
        Ok(Relay { store, writer, kms, producer, kafka: kafka.clone(), notify, metrics, signer, await_agents: false, outbox: Cursor::default() })
    }

    /// With data-plane agents expected to confirm revocations.
    pub fn awaiting_agents(mut self, on: bool) -> Relay {
        self.await_agents = on;
        self
    }

    pub async fn run(self, shutdown: CancellationToken) {
        tokio::join!(self.publish_loop(shutdown.clone()), self.notice_loop(shutdown));
    }

    /// Tells each key's KMS what it asked to be told: per key in commit order
    /// (a registration comes before its update), keys in parallel under the
    /// provider's governor, so that one key's throttled or failing notices
    /// never hold up another's. A key whose notice failed transiently waits
    /// out its own backoff; a refusal is dropped with an alert naming the key,
    /// never silently. An acknowledgement waits until its key's data-plane
    /// commands are published (the DEKs flushed or rewrapped before Key
    /// Protect is told, `crypto-erasure.md`), and one pending past the KMS's
    /// deadline warning raises an alert.
    async fn notice_loop(&self, shutdown: CancellationToken) {
        let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(30));
        let mut waiting: HashMap<String, (std::time::Instant, Backoff)> = HashMap::new();
        let mut warned: HashSet<String> = HashSet::new();
        let cursor = Cursor::default();
        loop {
            let notified = self.notify.notified();
            let (from, outbox) = (cursor.at(), self.outbox.at());
            let read = match self.off_runtime(move |store| store.notices_from(from, NOTICE_WINDOW)).await {
                Ok(batch) => {
                    // The outbox only matters to acknowledgements that are due
                    // (their keys' unpublished commands): it is read for those
                    // alone, since that may mean reading all of it.
                    let now = std::time::Instant::now();
                    let acknowledging: HashSet<String> = batch
                        .iter()
                        .filter_map(|(_, effect)| match effect {
                            Effect::KmsNotice { key_id, notice: Notice::Acknowledge { .. } } => Some(key_id),
                            _ => None,
                        })
                        .filter(|k| waiting.get(*k).is_none_or(|(at, _)| *at <= now))
                        .cloned()
                        .collect();
                    if acknowledging.is_empty() {
                        Ok((batch, HashSet::new()))
                    } else {
                        self.off_runtime(move |store| unpublished_among(store, outbox, acknowledging)).await.map(|unflushed| (batch, unflushed))
                    }
                }
                Err(e) => Err(e),
            };
            let (batch, unflushed) = match read {
                Ok(read) => read,
                Err(e) => {
                    tracing::error!(error = %e, "cannot read the kms notices; retrying");
                    if !pause(&shutdown, tokio::time::sleep(backoff.next_delay())).await {
                        return;
                    }
                    continue;
                }
            };
            backoff.reset();
            if batch.is_empty() {
                self.metrics.kms_ack_oldest_seconds.set(0);
                if !idle(&shutdown, notified).await {
                    return;
                }
                continue;
            }
            let now = std::time::Instant::now();
            self.deadlines(&batch, &mut warned).await;
            let read: Vec<u64> = batch.iter().map(|(id, _)| *id).collect();
            // Per key, its notices in commit order.
            let mut by_key: Vec<(String, Vec<(u64, Notice)>)> = Vec::new();
            let mut done = Vec::new();
            for (id, effect) in batch {
                let Effect::KmsNotice { key_id, notice } = effect else {
                    done.push(id);
                    continue;
                };
                match by_key.iter_mut().find(|(k, _)| *k == key_id) {
                    Some((_, list)) => list.push((id, notice)),
                    None => by_key.push((key_id, vec![(id, notice)])),
                }
            }
            let due: Vec<(String, Vec<(u64, Notice)>)> = by_key.into_iter().filter(|(k, _)| waiting.get(k).is_none_or(|(at, _)| *at <= now)).collect();
            let sent = futures::future::join_all(due.iter().map(|(key_id, notices)| self.notify_key(key_id, notices, unflushed.contains(key_id)))).await;
            let mut any_waiting = false;
            for ((key_id, _), (ids, outcome)) in due.iter().zip(sent) {
                done.extend(ids);
                match outcome {
                    KeyOutcome::Done => {
                        waiting.remove(key_id);
                    }
                    KeyOutcome::Retry => {
                        let entry = waiting.entry(key_id.clone()).or_insert_with(|| (now, Backoff::new(Duration::from_millis(200), Duration::from_secs(30))));
                        entry.0 = std::time::Instant::now() + entry.1.next_delay();
                        any_waiting = true;
                    }
                    KeyOutcome::Unflushed => {
                        // Looked at again after a pause, not on every commit's
                        // wake-up: each look may read the outbox up to its command.
                        waiting.insert(key_id.clone(), (std::time::Instant::now() + UNFLUSHED_RECHECK, Backoff::new(UNFLUSHED_RECHECK, UNFLUSHED_RECHECK)));
                        any_waiting = true;
                    }
                    KeyOutcome::AwaitingAgents => {
                        waiting.insert(key_id.clone(), (std::time::Instant::now() + AGENTS_RECHECK, Backoff::new(AGENTS_RECHECK, AGENTS_RECHECK)));
                        any_waiting = true;
                    }
                }
            }
            if let Err(e) = self.writer.sent(Queue::Notices, done.iter().copied().map(SentEntry::id).collect()).await {
                tracing::error!(error = %e, "cannot remove delivered notices; they will be sent again");
                cursor.reset();
            } else {
                // Keys that wait keep their notices: the cursor stops at the first.
                let removed: HashSet<u64> = done.iter().copied().collect();
                cursor.removed(read.iter().map(|id| (*id, removed.contains(id))));
            }
            // Progress and nobody waiting: the next round at once. Otherwise
            // the waiting keys are retried when the first backoff ends (an
            // unpublished command is looked at again soon), or sooner when a
            // new notice arrives.
            if !done.is_empty() && !any_waiting {
                continue;
            }
            let next = waiting.values().map(|(at, _)| *at).min();
            let wait = next
                .map_or(UNFLUSHED_RECHECK, |at| at.saturating_duration_since(std::time::Instant::now()).min(UNFLUSHED_RECHECK))
                .max(Duration::from_millis(20));
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(wait) => {}
                _ = notified => {}
            }
        }
    }

    /// One key's notices, in order, up to the first that cannot go yet.
    async fn notify_key(&self, key_id: &str, notices: &[(u64, Notice)], unflushed: bool) -> (Vec<u64>, KeyOutcome) {
        let mut done = Vec::new();
        for (id, notice) in notices {
            if let Notice::Acknowledge { state, event_id, .. } = notice {
                if unflushed {
                    return (done, KeyOutcome::Unflushed);
                }
                if self.await_agents && !self.enforced(key_id, *state).await {
                    tracing::debug!(%key_id, %event_id, "the acknowledgement waits for every instance's data-plane agent to report the revocation enforced");
                    return (done, KeyOutcome::AwaitingAgents);
                }
            }
            match self.kms.notify(key_id, notice).await {
                Ok(()) => done.push(*id),
                Err(e) if e.retryable() => {
                    tracing::warn!(%key_id, error = %e, "kms notice failed; this key's notices wait and are retried, other keys' go on");
                    return (done, KeyOutcome::Retry);
                }
                Err(e) => {
                    tracing::error!(%key_id, error = %e, notice = ?notice, "kms refused a notice; dropping it and alerting");
                    let alert = Alert::new(
                        NOTICE_REFUSED,
                        Severity::Warning,
                        &[("key_id", key_id)],
                        format!("the kms of key {key_id} refused a {}", notice_kind(notice)),
                        format!("{e}. The notice was dropped; fix the cause, then run `keywarden key sync <key>` if the KMS should hear of the key again"),
                        Utc::now(),
                    );
                    // Dropped only once the operator will hear of it: without
                    // the alert the notice stays, and its refusal is met again.
                    if let Err(e) = self.writer.submit(Input::Alert(alert)).await {
                        tracing::error!(error = %e, "cannot record the refused-notice alert; the notice is kept and retried");
                        return (done, KeyOutcome::Retry);
                    }
                    done.push(*id);
                }
            }
        }
        (done, KeyOutcome::Done)
    }

    /// Whether the data plane has done what an acknowledgement of `state`
    /// tells the KMS is done: for a disable or delete, every instance of the
    /// key that was sent the revoke or erase (those holding a wrapped DEK) has
    /// its agent's report of it enforced, so that no database still runs on
    /// the key's DEKs (`crypto-erasure.md`: DEKs flushed before the ack). A
    /// key that has changed state since is not waited for: its new state's
    /// commands are what the data plane acts on now, and the KMS asked for
    /// this ack. A store that cannot be read counts as not done (retried).
    async fn enforced(&self, key_id: &str, state: AdopterState) -> bool {
        let (action, status) = match state {
            AdopterState::Disabled => (CommandAction::Revoke, KeyStatus::Disabled),
            AdopterState::Deleted => (CommandAction::Erase, KeyStatus::Deleted),
            AdopterState::Enabled => return true,
        };
        let store = self.store.clone();
        let key = key_id.to_string();
        let scan = tokio::task::spawn_blocking(move || -> Result<bool, crate::store::StoreError> {
            if store.key(&key)?.is_none_or(|k| k.status != status) {
                return Ok(true);
            }
            Ok(store
                .instances_of(&key)?
                .iter()
                .filter(|i| i.wrapped.is_some())
                .all(|i| i.data_plane.as_ref().is_some_and(|d| d.action == action && d.outcome == DataPlaneOutcome::Enforced)))
        });
        match scan.await {
            Ok(Ok(done)) => done,
            Ok(Err(e)) => {
                tracing::warn!(%key_id, error = %e, "cannot read the key's instances for its acknowledgement; retrying");
                false
            }
            Err(e) => {
                tracing::error!(%key_id, error = %e, "the data-plane check of an acknowledgement failed; retrying");
                false
            }
        }
    }

    /// Acknowledgements still queued: the age of the oldest as a metric, and
    /// an alert for each one older than its KMS's deadline warning (Key
    /// Protect gives adopters 4 hours, `dek-rewrapping.md`).
    async fn deadlines(&self, batch: &[(u64, Effect)], warned: &mut HashSet<String>) {
        let now = Utc::now();
        let acks: Vec<_> = batch
            .iter()
            .filter_map(|(_, effect)| match effect {
                Effect::KmsNotice { key_id, notice: Notice::Acknowledge { event_id, at, .. } } => {
                    self.kms.notice_deadline(key_id).map(|deadline| (key_id, event_id, at, deadline))
                }
                _ => None,
            })
            .collect();
        // The age is in the metric before any alert about it goes out, so that
        // whoever reads the alert and then the metric sees at least that age.
        let oldest = acks.iter().map(|(_, _, at, _)| (now - **at).num_seconds().max(0)).max().unwrap_or(0);
        self.metrics.kms_ack_oldest_seconds.set(oldest);
        for (key_id, event_id, at, deadline) in acks {
            let age = (now - *at).num_seconds().max(0);
            let Ok(warn_after) = chrono::Duration::from_std(deadline.warn_after) else { continue };
            if now - *at < warn_after || !warned.insert(event_id.clone()) {
                continue;
            }
            tracing::warn!(%key_id, %event_id, age_seconds = age, "an acknowledgement is still unsent and nears the kms's deadline");
            let alert = Alert::new(
                ACK_DEADLINE,
                Severity::Critical,
                &[("key_id", key_id), ("event_id", event_id)],
                format!(
                    "the acknowledgement of event {event_id} for key {key_id} is unsent after {}",
                    humantime::format_duration(Duration::from_secs(age as u64))
                ),
                format!(
                    "the kms expects it within {} of the event; check the kms notices in the log (throttling, refusals, unpublished commands) for this key",
                    humantime::format_duration(deadline.deadline)
                ),
                now,
            );
            if let Err(e) = self.writer.submit(Input::Alert(alert)).await {
                // Not warned, then: the next round raises it again.
                tracing::error!(error = %e, "cannot record the acknowledgement deadline alert; retrying next round");
                warned.remove(event_id);
            }
        }
        // Acks no longer queued need no memory of their warning.
        warned.retain(|id| batch.iter().any(|(_, e)| matches!(e, Effect::KmsNotice { notice: Notice::Acknowledge { event_id, .. }, .. } if event_id == id)));
    }

    /// A store read on a blocking thread: the relay's reads walk the outbox or
    /// every instance of a key, which must not hold a runtime worker.
    async fn off_runtime<T: Send + 'static>(&self, read: impl FnOnce(&Store) -> Result<T, crate::store::StoreError> + Send + 'static) -> Result<T, TellError> {
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || read(&store)).await.map_err(|e| TellError::Reading(e.to_string()))?.map_err(TellError::from)
    }

    async fn publish_loop(&self, shutdown: CancellationToken) {
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(10));
        let mut depth_at: Option<std::time::Instant> = None;
        // A record whose first effects were published before a failure.
        let mut resume = Resume::default();
        // Whether KeywardenOutboxRefused is firing: raised when the front of
        // the outbox is refused (it is retried, and everything after it
        // waits), resolved once publishing goes on.
        let mut refused = false;
        loop {
            let notified = self.notify.notified();
            let from = self.outbox.at();
            let records = match self.off_runtime(move |store| store.outbox_from(from, ROUND)).await {
                Ok(records) => records,
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
            if records.iter().map(|(_, effects)| effects.len()).sum::<usize>() < ROUND || depth_at.is_none_or(|t| t.elapsed() >= DEPTH_EVERY) {
                // A count walks the whole outbox (~50 ms for 100,000 entries).
                if let Ok(depth) = self.off_runtime(move |store| Ok(store.outbox_len_from(from))).await {
                    self.metrics.outbox_depth.set(depth as i64);
                }
                depth_at = Some(std::time::Instant::now());
            }
            if records.is_empty() {
                if !idle(&shutdown, notified).await {
                    return;
                }
                continue;
            }
            // Each record's effects, less those published already, in order
            // and each under its record's id; a record goes once all are out.
            let mut batch: Vec<(u64, Effect)> = Vec::new();
            let mut read: Vec<(SentEntry, usize, usize)> = Vec::with_capacity(records.len());
            for (id, effects) in records {
                let skip = resume.sent_of(id).min(effects.len());
                read.push((SentEntry::of(id, &effects), skip, effects.len() - skip));
                batch.extend(effects.into_iter().skip(skip).map(|e| (id, e)));
            }
            let mut sent = 0;
            let mut failed = None;
            let mut rest = batch.as_slice();
            while !rest.is_empty() {
                // Instance commands in a row under one trace (a rotation's
                // `rewrapped`s) are queued together and waited for once: one
                // round trip for the run instead of one per command, which
                // left a lifecycle event queued behind thousands of them for
                // seconds. Their order in the topic is kept (one partition per
                // instance, queued in order).
                let (now, (published, result)) = match command_trace(&rest[0].1) {
                    Some(traceparent) => {
                        let run = rest.iter().take_while(|(_, e)| command_trace(e) == Some(traceparent)).count();
                        let now = &rest[..run];
                        let commands: Vec<Command> = now.iter().flat_map(|(_, e)| instance_commands(e)).collect();
                        (now, self.send_commands(&commands, traceparent).await)
                    }
                    None => (&rest[..1], (0, self.publish(&rest[0].1).await)),
                };
                rest = &rest[now.len()..];
                match result {
                    Ok(()) => sent += now.len(),
                    Err(e) => {
                        // In a run of instance commands, the effects all of
                        // whose commands went out before the failure are done;
                        // the rest is sent again (under the same command ids,
                        // which the data plane deduplicates). An effect sent on
                        // its own (a key-wide command, a lifecycle event) has
                        // no count of its own and failed whole: counted as
                        // sent, it was removed unsent.
                        let mut left = published;
                        for (_, effect) in now {
                            let n = command_count(effect);
                            if n == 0 || n > left {
                                break;
                            }
                            left -= n;
                            sent += 1;
                        }
                        failed = Some(e);
                        break;
                    }
                }
            }
            let whole = resume.settle(read.iter().map(|(entry, skip, unsent)| (entry.id_of(), *skip, *unsent)), sent);
            let done: Vec<SentEntry> = read.into_iter().take(whole).map(|(entry, _, _)| entry).collect();
            // With a changelog, removing also publishes tombstones (the other
            // nodes forget their copies), on the writer's thread.
            let last = done.last().map(SentEntry::id_of);
            if let Err(e) = self.writer.sent(Queue::Outbox, done).await {
                tracing::error!(error = %e, "cannot remove published effects from the outbox; they will be sent again");
                self.outbox.reset();
            } else {
                self.outbox.removed(last.map(|id| (id, true)));
            }
            if let Some(e) = failed {
                tracing::warn!(error = %e, "publishing failed");
                if !refused && e.stops_the_outbox() {
                    refused = self.outbox_alert(Some(&e)).await;
                }
                if !pause(&shutdown, tokio::time::sleep(backoff.next_delay())).await {
                    return;
                }
            } else {
                backoff.reset();
                if refused {
                    refused = !self.outbox_alert(None).await;
                }
            }
        }
    }

    /// Raises KeywardenOutboxRefused for `error`, or resolves it (`None`);
    /// true if the writer recorded it.
    async fn outbox_alert(&self, error: Option<&TellError>) -> bool {
        let now = Utc::now();
        let mut alert = Alert::new(
            OUTBOX_REFUSED,
            Severity::Critical,
            &[],
            "the outbox's next effect was refused; it is retried and every command after it waits".into(),
            match error {
                Some(e) => format!(
                    "{e}. Fix the cause (the producer's ACL on the topic, the message size limit, the record named in the log); revocations are in force on the DEK endpoint meanwhile, but their commands do not reach the data plane"
                ),
                None => "the outbox is published again".into(),
            },
            now,
        );
        if error.is_none() {
            alert.ends_at = Some(now);
        }
        match self.writer.submit(Input::Alert(alert)).await {
            Ok(_) => true,
            Err(e) => {
                tracing::error!(error = %e, "cannot record the outbox alert; the next round tries again");
                false
            }
        }
    }

    async fn publish(&self, effect: &Effect) -> Result<(), TellError> {
        match effect {
            Effect::KeyCommands { key_id, action, key_version, cause_event_id, issued_at, correlation_id, traceparent } => {
                // Fan out to the instances the key protects now, including those
                // created after the event: they all share the key's fate.
                // Every instance of the key, read and decoded off the runtime:
                // 10,000 of them held a worker for milliseconds while the
                // next revocation's DEK fetches waited for one.
                // Their commands are made there too (a UUIDv5 each).
                let (key, action, version, cause, at, correlation) =
                    (key_id.clone(), *action, key_version.clone(), cause_event_id.clone(), *issued_at, correlation_id.clone());
                let commands: Vec<Command> = self
                    .off_runtime(move |store| {
                        Ok(store
                            .instances_of(&key)?
                            .into_iter()
                            .filter(|inst| inst.wrapped.is_some())
                            .map(|inst| Command::new(&inst.instance_id, &key, action, version.clone(), &cause, at, correlation.clone()))
                            .collect())
                    })
                    .await?;
                self.send_commands(&commands, traceparent.as_deref()).await.1
            }
            // `publish_loop` sends these in runs; this is a run of one.
            Effect::InstanceCommand { traceparent, .. } | Effect::InstanceCommands { traceparent, .. } => {
                self.send_commands(&instance_commands(effect), traceparent.as_deref()).await.1
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
    /// Returns how many commands, from the first, were published, and the
    /// first failure.
    async fn send_commands(&self, commands: &[Command], traceparent: Option<&str>) -> (usize, Result<(), TellError>) {
        let topic = &self.kafka.commands_topic;
        let span = tracing::info_span!("publish", otel.kind = "producer", %topic, commands = commands.len());
        let upstream = crate::telemetry::stored(traceparent);
        crate::telemetry::continue_trace(&span, upstream.clone());
        let header = crate::telemetry::traceparent(&span, &upstream);
        // Prepared and queued a slice at a time, yielding in between: 10,000
        // commands of a key-wide revoke held a runtime worker for tens of
        // milliseconds, while the DEK requests that must see the revocation
        // waited for one.
        let mut prepared: Vec<(String, Option<String>)> = Vec::with_capacity(commands.len());
        for slice in commands.chunks(SLICE) {
            prepared.extend(slice.iter().map(|c| {
                let payload = serde_json::to_string(c).expect("commands serialize");
                // The same header as a signed event's, over the exact payload bytes.
                let signature = self.signer.as_ref().map(|s| s.sign(payload.as_bytes()));
                (payload, signature)
            }));
            tokio::task::yield_now().await;
        }
        // Queue them all, then wait: librdkafka batches the sends. A send
        // queues its record when first polled; each slice is polled once
        // before the next is made.
        let mut sending = futures::stream::FuturesOrdered::new();
        let mut results = Vec::with_capacity(commands.len());
        for (slice, prepared) in commands.chunks(SLICE).zip(prepared.chunks(SLICE)) {
            for (c, (payload, signature)) in slice.iter().zip(prepared) {
                let mut headers = OwnedHeaders::new();
                if let Some(tp) = &header {
                    headers = headers.insert(Header { key: crate::telemetry::TRACEPARENT, value: Some(tp.as_str()) });
                }
                if let Some(sig) = signature {
                    headers = headers.insert(Header { key: SIGNATURE_HEADER, value: Some(sig.as_str()) });
                }
                sending.push_back(self.producer.send(FutureRecord::to(topic).key(&c.instance_id).payload(payload).headers(headers), Duration::from_secs(10)));
            }
            while let std::task::Poll::Ready(Some(result)) = futures::poll!(sending.next()) {
                results.push(result);
            }
            tokio::task::yield_now().await;
        }
        while let Some(result) = sending.next().instrument(span.clone()).await {
            results.push(result);
        }
        let _in_span = span.enter();
        let mut published: HashMap<CommandAction, u64> = HashMap::new();
        let mut failed = None;
        for (n, (c, result)) in commands.iter().zip(results).enumerate() {
            if let Err((source, _)) = result {
                failed = Some((n, TellError::Publish { topic: topic.clone(), source }));
                break;
            }
            *published.entry(c.action).or_default() += 1;
            tracing::debug!(
                instance_id = %c.instance_id,
                key_id = %c.key_id,
                event_id = %c.cause_event_id,
                correlation_id = c.correlation_id.as_deref().unwrap_or(""),
                command_id = %c.command_id,
                action = ?c.action,
                "command published"
            );
        }
        for (action, count) in published {
            let action = serde_json::to_value(action).ok().and_then(|v| v.as_str().map(str::to_owned)).unwrap_or_default();
            self.metrics.commands.with_label_values(&[&action]).inc_by(count);
        }
        match failed {
            Some((n, e)) => (n, Err(e)),
            None => (commands.len(), Ok(())),
        }
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
    fn a_round_removes_the_records_sent_whole_and_goes_on_inside_the_first_that_was_not() {
        let mut resume = Resume::default();
        // Records 1 (three effects) and 2 (two): four sent, then a failure.
        assert_eq!(resume.settle([(1, 0, 3), (2, 0, 2)], 4), 1, "record 1 went whole");
        assert_eq!((resume.sent_of(1), resume.sent_of(2)), (0, 1), "record 2 goes on after its first");
        // The next round reads record 2's last effect only; a failure before it keeps the place.
        assert_eq!(resume.settle([(2, 1, 1)], 0), 0);
        assert_eq!(resume.sent_of(2), 1);
        assert_eq!(resume.settle([(2, 1, 1), (3, 0, 2)], 3), 2, "both went whole");
        // A record none of which went out starts from its first.
        assert_eq!(resume.settle([(4, 0, 2)], 0), 0);
        assert_eq!(resume.sent_of(4), 0);
    }

    /// librdkafka's mock cluster with the events and commands topics (one
    /// partition each), and a store with its writer.
    struct Mocked {
        cluster: rdkafka::mocking::MockCluster<'static, rdkafka::producer::DefaultProducerContext>,
        kafka: KafkaConfig,
        _dir: tempfile::TempDir,
        store: Store,
        writer: Writer,
    }

    fn mocked() -> Mocked {
        let cluster = rdkafka::mocking::MockCluster::new(1).unwrap();
        let kafka = KafkaConfig { events_topic: "events".into(), commands_topic: "commands".into(), ..KafkaConfig::default() };
        for topic in ["events", "commands"] {
            cluster.create_topic(topic, 1, 1).unwrap();
        }
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("store")).unwrap();
        let fence = Arc::new(crate::cluster::Fence::default());
        fence.assign(&[("events".to_string(), 0)]);
        let (writer, _) = Writer::start(store.clone(), crate::cluster::Ownership::shared(fence, "events", 1), 16, Box::new(|_| {}));
        Mocked { cluster, kafka, _dir: dir, store, writer }
    }

    /// Starts the relay's loops on the mock cluster; cancel the token to stop them.
    fn start_relay(store: &Store, writer: Writer, kafka: &KafkaConfig, bootstrap: &str) -> (CancellationToken, tokio::task::JoinHandle<()>) {
        let relay =
            Relay::new(store.clone(), writer, Arc::new(Told::default()), kafka, bootstrap, Arc::new(Notify::new()), Arc::new(Metrics::new()), None).unwrap();
        let shutdown = CancellationToken::new();
        let running = tokio::spawn(relay.run(shutdown.clone()));
        (shutdown, running)
    }

    /// Every payload of the topic's one partition, up to its end.
    fn read_topic(bootstrap: String, topic: &'static str) -> tokio::task::JoinHandle<Vec<String>> {
        use rdkafka::consumer::{BaseConsumer, Consumer};
        use rdkafka::Message;
        tokio::task::spawn_blocking(move || {
            let consumer: BaseConsumer = rdkafka::ClientConfig::new().set("bootstrap.servers", &bootstrap).set("group.id", "check").create().unwrap();
            let (_, end) = consumer.fetch_watermarks(topic, 0, Duration::from_secs(10)).unwrap();
            let mut assignment = rdkafka::TopicPartitionList::new();
            assignment.add_partition_offset(topic, 0, rdkafka::Offset::Beginning).unwrap();
            consumer.assign(&assignment).unwrap();
            let mut payloads = Vec::new();
            let deadline = std::time::Instant::now() + Duration::from_secs(10);
            while (payloads.len() as i64) < end && std::time::Instant::now() < deadline {
                if let Some(m) = consumer.poll(Duration::from_millis(100)) {
                    payloads.push(String::from_utf8_lossy(m.unwrap().payload().unwrap_or_default()).into_owned());
                }
            }
            payloads
        })
    }

    /// A broker that refuses the outbox's front (an ACL, a size limit) holds
    /// every effect after it: the operator hears of it at once, and hears it
    /// is over once the effect went out.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_refused_outbox_front_raises_an_alert_that_resolves_once_it_goes_out() {
        use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};
        let Mocked { cluster, kafka, _dir, store, writer } = mocked();
        writer.import(vec![crate::engine::Record::Outbox(Effect::LifecycleEvent { key_id: "k".into(), payload: "a".into() })]).await.unwrap();
        cluster.request_errors(RDKafkaApiKey::Produce, &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_TOPIC_AUTHORIZATION_FAILED; 2]);
        let (shutdown, running) = start_relay(&store, writer, &kafka, &cluster.bootstrap_servers());
        let queued = |store: &Store| -> Vec<bool> {
            store
                .alerts_from(0, 100)
                .unwrap()
                .into_iter()
                .flat_map(|(_, alerts)| alerts)
                .filter(|a| a.name == OUTBOX_REFUSED)
                .map(|a| a.ends_at.is_some())
                .collect()
        };
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while queued(&store).len() < 2 {
            assert!(std::time::Instant::now() < deadline, "the outbox alert was not raised and resolved: {:?}", queued(&store));
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        shutdown.cancel();
        running.await.unwrap();
        assert_eq!(queued(&store), [false, true], "raised once while refused, resolved once published");
        assert!(store.firing_alerts().unwrap().iter().all(|a| a.name != OUTBOX_REFUSED));
        assert_eq!(read_topic(cluster.bootstrap_servers(), "events").await.unwrap(), ["a"]);
    }

    /// The publish loop itself, through a broker that refuses the second of a
    /// commit's three effects once, a key-wide revoke (a permanent error, so
    /// librdkafka does not retry it inside the producer): the loop backs off
    /// and sends the rest, the revoke reaches every instance, and what went
    /// out before the refusal is not sent again.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_broker_that_refuses_half_way_through_a_commits_effects_gets_the_rest_and_not_the_first_again() {
        use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};
        let Mocked { cluster, kafka, _dir, store, writer } = mocked();
        let instance = |id: &str| crate::engine::Record::Instance(crate::engine::InstanceRecord::sample(id, "k"));
        writer.import(vec![instance("i1"), instance("i2")]).await.unwrap();
        let event = |payload: &str| crate::engine::Record::Outbox(Effect::LifecycleEvent { key_id: "k".into(), payload: payload.into() });
        let at = Utc::now();
        let revoke = crate::engine::Record::Outbox(Effect::KeyCommands {
            key_id: "k".into(),
            action: CommandAction::Revoke,
            key_version: None,
            cause_event_id: "e1".into(),
            issued_at: at,
            correlation_id: None,
            traceparent: None,
        });
        writer.import(vec![event("a"), revoke, event("c")]).await.unwrap();
        let queued = store.outbox_from(0, 10).unwrap();
        assert_eq!(queued.iter().map(|(_, effects)| effects.len()).collect::<Vec<_>>(), [3], "one commit, one record of three effects");
        // The first produce request goes through, the second is refused.
        cluster.request_errors(
            RDKafkaApiKey::Produce,
            &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_NO_ERROR, RDKafkaRespErr::RD_KAFKA_RESP_ERR_TOPIC_AUTHORIZATION_FAILED],
        );
        let (shutdown, running) = start_relay(&store, writer, &kafka, &cluster.bootstrap_servers());
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while !store.outbox_from(0, 10).unwrap().is_empty() {
            assert!(std::time::Instant::now() < deadline, "the commit's effects were not all published");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        shutdown.cancel();
        running.await.unwrap();
        // The record is removed only once all of it is acknowledged, so each
        // topic's end is final: read everything up to it.
        let read = |topic: &'static str| read_topic(cluster.bootstrap_servers(), topic);
        assert_eq!(read("events").await.unwrap(), ["a", "c"], "each event published once, in order");
        // A key-wide command is sent again whole, so a command may repeat, under its id.
        let commands: HashSet<(String, String)> = read("commands")
            .await
            .unwrap()
            .iter()
            .map(|p| serde_json::from_str::<serde_json::Value>(p).unwrap())
            .map(|c| (c["instance_id"].as_str().unwrap().to_string(), c["command_id"].as_str().unwrap().to_string()))
            .collect();
        let want: HashSet<(String, String)> =
            ["i1", "i2"].map(|i| (i.to_string(), Command::new(i, "k", CommandAction::Revoke, None, "e1", at, None).command_id)).into();
        assert_eq!(commands, want, "the refused revoke reached every instance, under its command ids");
    }

    /// A KMS that records the notices it is told, or refuses every one and
    /// wants acknowledgements at once (`refuse`).
    #[derive(Default)]
    struct Told {
        told: std::sync::Mutex<Vec<String>>,
        refuse: bool,
    }

    #[async_trait::async_trait]
    impl Kms for Told {
        fn provider(&self) -> &'static str {
            "told"
        }
        async fn wrap(&self, key_id: &str, _: &crate::kms::Dek, _: &[u8], _: Option<&str>) -> Result<crate::engine::WrappedDek, crate::kms::KmsError> {
            Err(crate::kms::KmsError::UnknownKey(key_id.into()))
        }
        async fn unwrap(&self, key_id: &str, _: &crate::engine::WrappedDek, _: &[u8]) -> Result<crate::kms::Dek, crate::kms::KmsError> {
            Err(crate::kms::KmsError::UnknownKey(key_id.into()))
        }
        async fn rewrap(
            &self,
            key_id: &str,
            _: &crate::engine::WrappedDek,
            _: &[u8],
            _: Option<&str>,
        ) -> Result<crate::engine::WrappedDek, crate::kms::KmsError> {
            Err(crate::kms::KmsError::UnknownKey(key_id.into()))
        }
        async fn key_state(&self, key_id: &str) -> Result<crate::kms::KmsKeyState, crate::kms::KmsError> {
            Err(crate::kms::KmsError::UnknownKey(key_id.into()))
        }
        async fn notify(&self, key_id: &str, _: &Notice) -> Result<(), crate::kms::KmsError> {
            if self.refuse {
                return Err(crate::kms::KmsError::UnknownKey(key_id.into()));
            }
            self.told.lock().unwrap().push(key_id.to_string());
            Ok(())
        }
        fn notice_deadline(&self, _: &str) -> Option<crate::kms::NoticeDeadline> {
            self.refuse.then_some(crate::kms::NoticeDeadline { deadline: Duration::from_secs(4 * 3600), warn_after: Duration::ZERO })
        }
    }

    /// A refused notice is dropped, and an overdue acknowledgement marked
    /// warned, only once its alert is recorded: with the writer stopped, the
    /// notice stays and the warning is raised again next round.
    #[tokio::test]
    async fn a_notice_or_warning_whose_alert_was_not_recorded_is_kept_for_the_next_round() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("store")).unwrap();
        let fence = Arc::new(crate::cluster::Fence::default());
        fence.assign(&[("events".to_string(), 0)]);
        let (writer, thread) = Writer::start(store.clone(), crate::cluster::Ownership::shared(fence, "events", 1), 16, Box::new(|_| {}));
        let relay = Relay::new(
            store,
            writer,
            Arc::new(Told { refuse: true, ..Told::default() }),
            &KafkaConfig::default(),
            "127.0.0.1:9",
            Arc::new(Notify::new()),
            Arc::new(Metrics::new()),
            None,
        )
        .unwrap();
        let ack = Effect::KmsNotice {
            key_id: "k".into(),
            notice: Notice::Acknowledge { event_id: "e1".into(), state: AdopterState::Disabled, key_version: None, at: Utc::now(), correlation_id: None },
        };
        let Effect::KmsNotice { notice, .. } = &ack else { unreachable!() };
        // With the writer running, the refusal's alert is recorded and the notice dropped.
        let (dropped, _) = relay.notify_key("k", &[(1, notice.clone())], false).await;
        assert_eq!(dropped, [1]);
        let mut warned = HashSet::new();
        relay.deadlines(&[(1, ack.clone())], &mut warned).await;
        assert!(warned.contains("e1"));
        tokio::task::spawn_blocking(move || thread.close()).await.unwrap().unwrap();
        let (dropped, outcome) = relay.notify_key("k", &[(1, notice.clone())], false).await;
        assert!(dropped.is_empty() && matches!(outcome, KeyOutcome::Retry), "a refused notice was dropped with no alert recorded");
        let mut warned = HashSet::new();
        relay.deadlines(&[(1, ack)], &mut warned).await;
        assert!(warned.is_empty(), "an overdue acknowledgement was marked warned with no alert recorded");
    }

    /// An acknowledgement tells the KMS that the key's data-plane commands are
    /// out; behind a backlog of more commits than one read of the outbox
    /// holds, key b's went to the KMS while its revoke was still queued.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_acknowledgement_waits_for_its_keys_commands_behind_any_backlog() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("store")).unwrap();
        let fence = Arc::new(crate::cluster::Fence::default());
        fence.assign(&[("events".to_string(), 0)]);
        let (writer, _) = Writer::start(store.clone(), crate::cluster::Ownership::shared(fence, "events", 1), 16, Box::new(|_| {}));
        let at = Utc::now();
        let revoke = |key: &str| {
            crate::engine::Record::Outbox(Effect::KeyCommands {
                key_id: key.into(),
                action: CommandAction::Revoke,
                key_version: None,
                cause_event_id: format!("{key}-disabled"),
                issued_at: at,
                correlation_id: None,
                traceparent: None,
            })
        };
        let ack = |key: &str| {
            crate::engine::Record::Outbox(Effect::KmsNotice {
                key_id: key.into(),
                notice: Notice::Acknowledge { event_id: format!("{key}-disabled"), state: AdopterState::Disabled, key_version: None, at, correlation_id: None },
            })
        };
        // One commit each, so each is its own outbox record: more than one read's worth.
        for i in 0..NOTICE_WINDOW + 88 {
            writer.import(vec![revoke(&format!("a{i}"))]).await.unwrap();
        }
        writer.import(vec![revoke("b"), ack("b")]).await.unwrap();
        // Key c's acknowledgement, committed after b's, has no commands to wait for.
        writer.import(vec![ack("c")]).await.unwrap();
        let told = Arc::new(Told::default());
        let relay = Arc::new(
            Relay::new(
                store.clone(),
                writer.clone(),
                told.clone(),
                &KafkaConfig::default(),
                "127.0.0.1:9",
                Arc::new(Notify::new()),
                Arc::new(Metrics::new()),
                None,
            )
            .unwrap(),
        );
        let shutdown = CancellationToken::new();
        let notices = tokio::spawn({
            let (relay, shutdown) = (relay.clone(), shutdown.clone());
            async move { relay.notice_loop(shutdown).await }
        });
        let wait_for = |key: &'static str| {
            let told = told.clone();
            async move {
                let deadline = std::time::Instant::now() + Duration::from_secs(20);
                while !told.told.lock().unwrap().iter().any(|k| k == key) {
                    assert!(std::time::Instant::now() < deadline, "key {key}'s acknowledgement never went out");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        };
        wait_for("c").await;
        assert_eq!(*told.told.lock().unwrap(), ["c"], "b's acknowledgement went out before its revoke was published");
        // Once everything queued is published (removed), b's goes too: it waited, it was not dropped.
        let queued = store.outbox_from(0, usize::MAX).unwrap();
        writer.sent(crate::store::Queue::Outbox, queued.iter().map(|(id, effects)| SentEntry::of(*id, effects)).collect()).await.unwrap();
        wait_for("b").await;
        shutdown.cancel();
        notices.await.unwrap();
        assert_eq!(*told.told.lock().unwrap(), ["c", "b"]);
    }

    #[test]
    fn an_unreachable_broker_is_no_refusal_of_the_outbox() {
        use rdkafka::types::RDKafkaErrorCode as Code;
        let publish = |code| TellError::Publish { topic: "t".into(), source: KafkaError::MessageProduction(code) };
        assert!(!publish(Code::MessageTimedOut).stops_the_outbox());
        assert!(!publish(Code::AllBrokersDown).stops_the_outbox());
        assert!(publish(Code::TopicAuthorizationFailed).stops_the_outbox());
        assert!(publish(Code::MessageSizeTooLarge).stops_the_outbox());
    }

    #[test]
    fn a_cursor_moves_past_the_removed_front_only_and_goes_back_when_removing_failed() {
        let c = Cursor::default();
        assert_eq!(c.at(), 0);
        c.removed([(3, true), (5, true), (9, false), (12, true)]);
        assert_eq!(c.at(), 6, "stops at the first entry still queued");
        c.removed([(9, false)]);
        assert_eq!(c.at(), 6, "a waiting entry holds it");
        c.removed([(9, true), (12, true)]);
        assert_eq!(c.at(), 13);
        c.removed(std::iter::empty());
        assert_eq!(c.at(), 13, "never back by itself");
        c.reset();
        assert_eq!(c.at(), 0);
    }

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

    #[test]
    fn a_rewrap_to_another_version_is_another_command() {
        let at = Utc::now();
        let rewrapped = |v: &str| Command::new("i", "k", CommandAction::Rewrapped, Some(v.into()), "rot", at, None).command_id;
        assert_eq!(rewrapped("3"), rewrapped("3"), "a re-send keeps its id");
        assert_ne!(rewrapped("3"), rewrapped("4"), "one rotation's second rewrap of an instance is another command");
        // A revoke's id does not depend on the version it carries.
        let revoke = |v: Option<&str>| Command::new("i", "k", CommandAction::Revoke, v.map(str::to_owned), "dis", at, None).command_id;
        assert_eq!(revoke(Some("3")), revoke(None));
    }

    #[test]
    fn a_chunk_entry_sends_the_commands_its_instances_would_have_sent_alone() {
        let at = Utc::now();
        let alone = |instance: &str| Effect::InstanceCommand {
            instance_id: instance.into(),
            key_id: "k".into(),
            action: CommandAction::Rewrapped,
            key_version: Some("2".into()),
            cause_event_id: "e1".into(),
            issued_at: at,
            correlation_id: Some("c".into()),
            traceparent: None,
        };
        let records = crate::engine::coalesce(vec![crate::engine::Record::Outbox(alone("a")), crate::engine::Record::Outbox(alone("b"))]);
        let [crate::engine::Record::Outbox(chunk)] = &records[..] else { panic!("{records:?}") };
        let want: Vec<Command> = [alone("a"), alone("b")].iter().flat_map(instance_commands).collect();
        assert_eq!(instance_commands(chunk), want, "same ids, same fields, same order");
        assert_eq!((command_count(chunk), command_trace(chunk)), (2, Some(None)));
    }
}
