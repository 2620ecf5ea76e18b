//! act: the rotation worker. A rotate event leaves a persisted job; this worker
//! rewraps every DEK of the key under the newest version with bounded concurrency
//! and commits the results in batches. The old wrapped DEK is replaced only in the
//! commit that stores the new one, so a crash at any point loses no DEK, and after
//! a restart the job continues with the instances still on an old version.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use futures::StreamExt;
use rand::Rng;
use tokio::sync::{mpsc, Notify};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{info_span, Instrument};

use crate::config::RotationConfig;
use crate::engine::{Input, KeyStatus, Reply, RotationJob, WrappedDek};
use crate::kms::Kms;
use crate::metrics::Metrics;
use crate::store::writer::{Pending, Writer, WriterError};
use crate::store::{Store, StoreError};

/// Chunks queued for the writer and not yet durable, at most.
const IN_FLIGHT: usize = 2;

/// Instances the pass reads from the store at a time.
const PAGE: usize = 1024;

pub struct Rotator {
    pub store: Store,
    pub kms: Arc<dyn Kms>,
    pub writer: Writer,
    pub notify: Arc<Notify>,
    pub config: RotationConfig,
    pub metrics: Arc<Metrics>,
    /// With several nodes, only the owner of a key's partition rewraps it.
    pub ownership: crate::cluster::Ownership,
}

enum Pass {
    /// Every instance not yet on the newest version was tried; the KMS
    /// refused `failed` of them.
    Finished { failed: u64 },
    /// The key stopped being usable, or a newer rotation replaced this one.
    Interrupted,
}

/// One instance to rewrap, as the pass read it.
struct Todo {
    instance_id: String,
    key_id: String,
    wrapped: WrappedDek,
}

enum Attempt {
    Done(Input),
    KeyUnusable,
    /// Still failing transiently after every attempt: left for the next pass,
    /// never marked failed, since nothing is wrong with the instance.
    Later,
}

impl Rotator {
    pub async fn run(self, shutdown: CancellationToken) {
        loop {
            let notified = self.notify.notified();
            let jobs = match self.store.jobs() {
                Ok(jobs) => self.ownership.mine(jobs, |j| &j.key_id),
                Err(e) => {
                    tracing::error!(error = %e, "cannot read the rotation jobs; rotations wait");
                    Vec::new()
                }
            };
            for job in jobs.into_iter().filter(|j| j.finished_at.is_none()) {
                if shutdown.is_cancelled() {
                    return;
                }
                match self.pass(&job, &shutdown).await {
                    Ok(Pass::Finished { failed }) => {
                        let end = Input::JobFinished {
                            key_id: job.key_id.clone(),
                            target_version: job.target_version.clone(),
                            job: job.cause_event_id.clone(),
                            failed,
                            arrivals: job.arrivals,
                            at: Utc::now(),
                        };
                        // Not recorded, the job stays open: the next round's
                        // pass finds what is left and ends it again.
                        match self.writer.submit(end).await {
                            Ok(Reply::Conflict(why)) => {
                                tracing::info!(key_id = %job.key_id, %why, "rotation goes on");
                                continue;
                            }
                            Ok(_) => {}
                            Err(e) => {
                                tracing::warn!(key_id = %job.key_id, error = %e, "cannot record the rotation's end; the next pass ends it");
                                continue;
                            }
                        }
                        tracing::info!(
                            key_id = %job.key_id,
                            version = %job.target_version,
                            event_id = %job.cause_event_id,
                            correlation_id = job.correlation_id.as_deref().unwrap_or(""),
                            failed,
                            "rotation finished"
                        );
                    }
                    Ok(Pass::Interrupted) => {}
                    // The key moved to another node mid-pass (or the writer
                    // could not take a chunk now): what was committed stays,
                    // and the next round asks again whose key it is.
                    Err(e) if e.retryable() => {
                        tracing::info!(error = %e, key_id = %job.key_id, "rotation pass stopped; the next round goes on where it is");
                    }
                    Err(e) => {
                        tracing::error!(error = %e, key_id = %job.key_id, "rotation stopped: the store writer is gone");
                        return;
                    }
                }
            }
            // Unfinished jobs (key disabled, KMS failing) are looked at again soon.
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = notified => {}
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
        }
    }

    fn current(&self, job: &RotationJob) -> bool {
        // A store that cannot be read stops the pass; the next one reads again.
        let key_active = self.store.key(&job.key_id).ok().flatten().is_some_and(|k| k.status == KeyStatus::Active);
        // The same job, not only the same version: an operator's retry
        // replaces a job of the same version, and its own pass must run.
        let same_job =
            self.store.job(&job.key_id).ok().flatten().is_some_and(|j| j.target_version == job.target_version && j.cause_event_id == job.cause_event_id);
        key_active && same_job
    }

    async fn pass(&self, job: &RotationJob, shutdown: &CancellationToken) -> Result<Pass, WriterError> {
        // Checked before any span exists: a job waiting on a disabled key is
        // looked at every second, and must not fill its event's trace with that.
        if !self.current(job) {
            return Ok(Pass::Interrupted);
        }
        // Every line of the pass carries the causing event's fields, and its
        // KMS calls are recorded in that event's trace.
        let span = info_span!(
            "rotation",
            key_id = %job.key_id,
            version = %job.target_version,
            event_id = %job.cause_event_id,
            correlation_id = job.correlation_id.as_deref().unwrap_or("")
        );
        crate::telemetry::continue_trace(&span, crate::telemetry::stored(job.traceparent.as_deref()));
        self.rewrap_all(job, shutdown).instrument(span).await
    }

    async fn rewrap_all(&self, job: &RotationJob, shutdown: &CancellationToken) -> Result<Pass, WriterError> {
        // Adopters rewrap only when the KMS itself reports the key active (Key
        // Protect's rule); an unreachable KMS means: try again later.
        // The version the KMS rewraps to is its newest, whatever the event named:
        // events from AWS or Activity Tracker carry no version, only a label.
        let mut target = job.target_version.clone();
        match self.kms.key_state(&job.key_id).instrument(info_span!("kms.key_state", key_id = %job.key_id)).await {
            Ok(state) if state.status != KeyStatus::Active => {
                tracing::info!(key_id = %job.key_id, state = ?state.status, "kms reports the key not active; rotation waits");
                return Ok(Pass::Interrupted);
            }
            Ok(state) if !state.latest_version.is_empty() => target = state.latest_version,
            Err(e) if e.retryable() => {
                tracing::warn!(key_id = %job.key_id, error = %e, "cannot read the key state; rotation waits");
                return Ok(Pass::Interrupted);
            }
            _ => {}
        }
        // The key's instances are read page by page on a blocking thread while
        // the first pages are rewrapped: reading 100,000 of them first held a
        // runtime worker for half a second before the first rewrap, and the
        // whole key in memory. The job's total is known once the reader ends.
        let (mut pages, mut reader) = self.read_todo(&job.key_id, &target);
        let todo = futures::stream::poll_fn(move |cx| pages.poll_recv(cx)).flat_map(futures::stream::iter);
        let mut results = todo.map(|id| self.rewrap_one(id, &target, &job.cause_event_id)).buffer_unordered(self.config.concurrency);
        // Rewraps go on while the chunks before are being committed: waiting
        // for them without polling `results` would leave the KMS idle for one
        // flush per chunk, and the flush, not the KMS, would bound the
        // rotation. Two chunks are in flight at most, so that the writer
        // stages one while the other is flushed.
        let mut chunk = Vec::with_capacity(self.config.batch);
        let mut in_flight: VecDeque<Pending> = VecDeque::with_capacity(IN_FLIGHT);
        let mut interrupted = false;
        let mut exhausted = false;
        let mut deferred = 0usize;
        let mut failed = 0u64;
        // Set once the reader answered; `unread` if it could not read them all.
        let mut read_done = false;
        let mut unread = false;
        while !(exhausted && read_done) {
            tokio::select! {
                read = &mut reader, if !read_done => {
                    read_done = true;
                    match read {
                        Ok(Ok(total)) => {
                            tracing::info!(key_id = %job.key_id, version = %job.target_version, remaining = total, "rotation pass read the key's instances");
                            // The reader answers once a pass: the job's first pass sets
                            // its total, every pass the version it rewraps to.
                            let plan = Input::JobPlanned { key_id: job.key_id.clone(), target_version: job.target_version.clone(), total, rewrapping_to: target.clone() };
                            self.writer.submit(plan).await?;
                        }
                        Ok(Err(e)) => {
                            tracing::error!(key_id = %job.key_id, error = %e, "cannot read the key's instances; rotation waits");
                            unread = true;
                        }
                        Err(e) => {
                            tracing::error!(key_id = %job.key_id, error = %e, "the reader of the key's instances died; rotation waits");
                            unread = true;
                        }
                    }
                }
                durable = async { in_flight.front_mut().expect("guarded").await }, if !in_flight.is_empty() => {
                    in_flight.pop_front();
                    durable?;
                    if !self.current(job) {
                        self.settle(&mut in_flight).await?;
                        return Ok(Pass::Interrupted);
                    }
                }
                attempt = results.next(), if !exhausted => match attempt {
                    Some(Attempt::Done(input)) => {
                        failed += u64::from(matches!(input, Input::RewrapFailed { .. }));
                        chunk.push(input);
                    }
                    Some(Attempt::KeyUnusable) => interrupted = true,
                    Some(Attempt::Later) => deferred += 1,
                    None => exhausted = true,
                },
            }
            let stop = interrupted || shutdown.is_cancelled();
            // A chunk is queued once fewer than two are in flight; what arrives
            // meanwhile joins it. Memory stays bounded: past four chunks, wait.
            let due = chunk.len() >= self.config.batch && (in_flight.len() < IN_FLIGHT || chunk.len() >= 4 * self.config.batch);
            if due || stop {
                self.commit(&mut chunk, &mut in_flight).await?;
                if stop || !self.current(job) {
                    self.settle(&mut in_flight).await?;
                    return Ok(Pass::Interrupted);
                }
            }
        }
        self.commit(&mut chunk, &mut in_flight).await?;
        self.settle(&mut in_flight).await?;
        if unread {
            return Ok(Pass::Interrupted);
        }
        if deferred > 0 {
            tracing::warn!(key_id = %job.key_id, deferred, "kms kept failing transiently for some instances; the next pass retries them");
            return Ok(Pass::Interrupted);
        }
        Ok(if self.current(job) { Pass::Finished { failed } } else { Pass::Interrupted })
    }

    /// Starts reading the key's instances that are not on `target`, a page at
    /// a time, on a blocking thread: the pages arrive on the receiver (two
    /// ahead at most, so memory holds three pages, not the key), and the
    /// reader ends with how many there were. Dropping the receiver stops it.
    fn read_todo(&self, key_id: &str, target: &str) -> (mpsc::Receiver<Vec<Todo>>, JoinHandle<Result<u64, StoreError>>) {
        let (tx, rx) = mpsc::channel(2);
        let (store, key_id, target) = (self.store.clone(), key_id.to_string(), target.to_string());
        let reader = tokio::task::spawn_blocking(move || {
            let mut after: Option<String> = None;
            let mut total = 0u64;
            loop {
                let (page, next) = store.instances_of_after(&key_id, after.as_deref(), PAGE)?;
                let todo: Vec<Todo> = page
                    .into_iter()
                    .filter_map(|i| match i.wrapped {
                        Some(wrapped) if wrapped.key_version != target => Some(Todo { instance_id: i.instance_id, key_id: i.key_id, wrapped }),
                        _ => None,
                    })
                    .collect();
                total += todo.len() as u64;
                // The pass stopped listening: it was interrupted, nothing to read for.
                if !todo.is_empty() && tx.blocking_send(todo).is_err() {
                    return Ok(total);
                }
                match next {
                    Some(next) => after = Some(next),
                    None => return Ok(total),
                }
            }
        });
        (rx, reader)
    }

    /// Queues a chunk for the writer without waiting for it, so that KMS calls go
    /// on while the chunks before are committed; with two in flight already,
    /// waits for the older first.
    async fn commit(&self, chunk: &mut Vec<Input>, in_flight: &mut VecDeque<Pending>) -> Result<(), WriterError> {
        if in_flight.len() >= IN_FLIGHT {
            if let Some(oldest) = in_flight.pop_front() {
                oldest.await?;
            }
        }
        if !chunk.is_empty() {
            // One job for the whole chunk: committed in one batch, answered once.
            in_flight.push_back(self.writer.enqueue_all(std::mem::take(chunk)).await?);
        }
        Ok(())
    }

    /// Waits until every chunk queued is durable.
    async fn settle(&self, in_flight: &mut VecDeque<Pending>) -> Result<(), WriterError> {
        while let Some(pending) = in_flight.pop_front() {
            pending.await?;
        }
        Ok(())
    }

    async fn rewrap_one(&self, todo: Todo, target: &str, job: &str) -> Attempt {
        let Todo { instance_id, key_id, wrapped } = todo;
        let provider = self.kms.provider_for(&key_id);
        let mut backoff = crate::backoff::Backoff::new(Duration::from_millis(50), Duration::from_secs(5));
        let mut attempt = 1;
        loop {
            let started = std::time::Instant::now();
            let call = self.kms.rewrap(&key_id, &wrapped, instance_id.as_bytes(), Some(target));
            let result = call.instrument(info_span!("kms.rewrap", key_id = %key_id, %instance_id, attempt)).await;
            self.metrics.rewrap_seconds.with_label_values(&[provider]).observe(started.elapsed().as_secs_f64());
            if let Err(e) = &result {
                self.metrics.rewrap_errors.with_label_values(&[provider, e.class()]).inc();
            }
            match result {
                Ok(new) => {
                    self.metrics.rewraps.with_label_values(&[provider, "ok"]).inc();
                    return Attempt::Done(Input::Rewrapped {
                        instance_id,
                        from_version: wrapped.key_version,
                        wrapped: new,
                        job: job.to_string(),
                        at: Utc::now(),
                    });
                }
                Err(e) if e.key_unusable() => return Attempt::KeyUnusable,
                Err(e) if e.retryable() && attempt >= self.config.max_attempts => {
                    self.metrics.rewraps.with_label_values(&[provider, "deferred"]).inc();
                    tracing::debug!(%instance_id, error = %e, "rewrap still failing transiently; deferred to the next pass");
                    return Attempt::Later;
                }
                Err(e) if e.retryable() => {
                    self.metrics.rewraps.with_label_values(&[provider, "retry"]).inc();
                    tracing::debug!(%instance_id, error = %e, attempt, "rewrap failed transiently; retrying");
                    let delay = backoff.next_delay();
                    let jitter = rand::thread_rng().gen_range(0..=delay.as_millis() as u64 / 2);
                    tokio::time::sleep(delay + Duration::from_millis(jitter)).await;
                    attempt += 1;
                }
                Err(e) => {
                    self.metrics.rewraps.with_label_values(&[provider, "failed"]).inc();
                    tracing::warn!(%instance_id, %key_id, error = %e, "rewrap failed");
                    return Attempt::Done(Input::RewrapFailed {
                        instance_id,
                        from_version: wrapped.key_version,
                        reason: e.to_string(),
                        job: job.to_string(),
                        at: Utc::now(),
                    });
                }
            }
        }
    }
}
