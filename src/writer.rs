//! record: the single writer. Every state change passes through one thread that
//! runs the engine over a batch of inputs, commits the records together with the
//! partition offsets that caused them, flushes once (group commit) and only then
//! answers. One writer means no read-modify-write races and a serializable log.

use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use prometheus::Histogram;
use tokio::sync::{mpsc, oneshot};

use std::sync::Arc;

use crate::engine::{decide, Input, Overlay, Record, Reply};
use crate::intake::fence::Fence;
use crate::store::{Store, StoreError};

#[derive(Debug, thiserror::Error)]
pub enum WriterError {
    #[error("the store writer has stopped; keywarden is shutting down or its store failed")]
    Stopped,
    #[error("commit failed: {0}")]
    Commit(String),
    #[error("partition {topic}/{partition} was revoked before this input was committed; its next owner reads it again")]
    Fenced { topic: String, partition: i32 },
    #[error("not written: {0}; nothing was applied, retry")]
    Unavailable(String),
}

impl WriterError {
    pub fn retryable(&self) -> bool {
        matches!(self, WriterError::Unavailable(_) | WriterError::Fenced { .. })
    }
}

/// A consumed partition offset: the next offset to read once this input is durable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Consumed {
    pub topic: String,
    pub partition: i32,
    pub next: i64,
    /// The partition's fence generation when the message was read.
    pub generation: u64,
}

struct Job {
    input: Option<Input>,
    consumed: Option<Consumed>,
    /// A caller that must answer in bounded time (the API) gives up at this
    /// moment: a job still queued then is dropped undecided, and a batch of
    /// such jobs whose changelog write the broker has not confirmed by then is
    /// abandoned unapplied. Jobs without one (consumed events, the workers)
    /// wait for the broker however long it takes: they are never lost.
    deadline: Option<Instant>,
    reply: oneshot::Sender<Result<Reply, WriterError>>,
}

/// Called after each durable commit with its records, before anyone is answered.
pub type OnCommit = Box<dyn Fn(&[Record]) + Send>;

#[derive(Clone)]
pub struct Writer {
    tx: mpsc::Sender<Job>,
}

pub type Pending = oneshot::Receiver<Result<Reply, WriterError>>;

impl Writer {
    /// Starts the writer thread. It ends when every `Writer` clone is dropped,
    /// after committing what it was given.
    pub fn start(store: Store, fence: Arc<Fence>, max_batch: usize, on_commit: OnCommit) -> (Writer, JoinHandle<Result<(), StoreError>>) {
        Self::spawn(store, fence, max_batch, on_commit, None)
    }

    /// As `start`, and observes each commit's apply-and-flush time: the flush is
    /// what bounds throughput, so its latency is the first thing to look at.
    pub fn start_timed(
        store: Store,
        fence: Arc<Fence>,
        max_batch: usize,
        on_commit: OnCommit,
        commit_seconds: Histogram,
    ) -> (Writer, JoinHandle<Result<(), StoreError>>) {
        Self::spawn(store, fence, max_batch, on_commit, Some(commit_seconds))
    }

    fn spawn(
        store: Store,
        fence: Arc<Fence>,
        max_batch: usize,
        on_commit: OnCommit,
        commit_seconds: Option<Histogram>,
    ) -> (Writer, JoinHandle<Result<(), StoreError>>) {
        let (tx, rx) = mpsc::channel(max_batch * 4);
        let handle = std::thread::Builder::new()
            .name("keywarden-writer".into())
            .spawn(move || writer_loop(store, fence, rx, max_batch, on_commit, commit_seconds))
            .expect("spawn writer thread");
        (Writer { tx }, handle)
    }

    /// Queues an input; the returned receiver answers once it is durable.
    pub async fn enqueue(&self, input: Option<Input>, consumed: Option<Consumed>) -> Result<Pending, WriterError> {
        self.send(Job { input, consumed, deadline: None, reply: oneshot::channel().0 }).await
    }

    async fn send(&self, mut job: Job) -> Result<Pending, WriterError> {
        let (reply, rx) = oneshot::channel();
        job.reply = reply;
        self.tx.send(job).await.map_err(|_| WriterError::Stopped)?;
        Ok(rx)
    }

    pub async fn submit(&self, input: Input) -> Result<Reply, WriterError> {
        self.enqueue(Some(input), None).await?.await.map_err(|_| WriterError::Stopped)?
    }

    /// As `submit`, but answers `Unavailable` once `timeout` has passed
    /// without the input being durable; it is then not applied (see `Job::deadline`).
    pub async fn submit_within(&self, input: Input, timeout: Duration) -> Result<Reply, WriterError> {
        let deadline = Instant::now() + timeout;
        let job = Job { input: Some(input), consumed: None, deadline: Some(deadline), reply: oneshot::channel().0 };
        let waited = async { self.send(job).await?.await.map_err(|_| WriterError::Stopped)? };
        // The writer answers at the deadline itself; this only covers a writer
        // busy with a batch that waits on the broker (a job still queued then
        // is dropped when the writer reaches it).
        match tokio::time::timeout(timeout + Duration::from_millis(250), waited).await {
            Ok(answer) => answer,
            Err(_) => Err(WriterError::Unavailable(format!("the store writer did not get to it within {timeout:?}; the broker may be unreachable"))),
        }
    }
}

fn writer_loop(
    store: Store,
    fence: Arc<Fence>,
    mut rx: mpsc::Receiver<Job>,
    max_batch: usize,
    on_commit: OnCommit,
    commit_seconds: Option<Histogram>,
) -> Result<(), StoreError> {
    let mut jobs = Vec::with_capacity(max_batch);
    // A job that would have mixed jobs with and without a deadline in one
    // batch: it starts the next one.
    let mut carried: Option<Job> = None;
    while let Some(first) = carried.take().or_else(|| rx.blocking_recv()) {
        let timed = first.deadline.is_some();
        jobs.push(first);
        while jobs.len() < max_batch {
            match rx.try_recv() {
                Ok(job) if job.deadline.is_some() == timed => jobs.push(job),
                Ok(job) => {
                    carried = Some(job);
                    break;
                }
                Err(_) => break,
            }
        }
        let now = Instant::now();
        let (expired, live): (Vec<Job>, Vec<Job>) = jobs.drain(..).partition(|j| j.deadline.is_some_and(|d| d <= now));
        for job in expired {
            let _ = job.reply.send(Err(WriterError::Unavailable("it waited past its deadline behind writes the broker had not confirmed".into())));
        }
        jobs = live;
        if jobs.is_empty() {
            continue;
        }
        let deadline = jobs.iter().filter_map(|j| j.deadline).min();
        let mut records = Vec::new();
        let mut replies = Vec::with_capacity(jobs.len());
        // Held until the batch is durable: a revocation waits for it, and no input
        // read under an older generation gets in.
        let owned = fence.hold();
        {
            let mut overlay = Overlay::new(&store);
            for job in jobs.drain(..) {
                if let Some(c) = &job.consumed {
                    if !owned.owns(&c.topic, c.partition, c.generation) {
                        let _ = job.reply.send(Err(WriterError::Fenced { topic: c.topic.clone(), partition: c.partition }));
                        continue;
                    }
                }
                let reply = match job.input {
                    Some(input) => {
                        let d = decide(&overlay, input);
                        overlay.absorb(&d.records);
                        records.extend(d.records);
                        d.reply
                    }
                    None => Reply::Done,
                };
                if let Some(c) = job.consumed {
                    records.push(Record::Offset { topic: c.topic, partition: c.partition, next: c.next });
                }
                replies.push((job.reply, reply));
            }
        }
        let started = std::time::Instant::now();
        let committed = store.commit_until(&records, true, deadline);
        if let Some(h) = &commit_seconds {
            h.observe(started.elapsed().as_secs_f64());
        }
        if let Err(StoreError::Unavailable(why)) = &committed {
            // Nothing of the batch was written anywhere: the callers are told,
            // and the writer goes on.
            tracing::warn!(reason = %why, inputs = replies.len(), "writes abandoned unapplied: the changelog did not confirm them in time");
            for (tx, _) in replies {
                let _ = tx.send(Err(WriterError::Unavailable(why.clone())));
            }
            continue;
        }
        if let Err(e) = committed {
            tracing::error!(error = %e, "store commit failed; stopping so that nothing is acknowledged that is not durable");
            for (tx, _) in replies {
                let _ = tx.send(Err(WriterError::Commit(e.to_string())));
            }
            return Err(e);
        }
        drop(owned);
        on_commit(&records);
        for (tx, reply) in replies {
            let _ = tx.send(Ok(reply));
        }
    }
    store.flush()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::{EventType, LifecycleEvent, Outcome, View};
    use chrono::Utc;

    #[tokio::test]
    async fn offset_is_committed_with_the_state_it_caused() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let fence = Arc::new(Fence::default());
        fence.assign(&[("t".to_string(), 0)]);
        let generation = fence.generation("t", 0).unwrap();
        let timer = prometheus::Histogram::with_opts(prometheus::HistogramOpts::new("t", "t")).unwrap();
        let (w, handle) = Writer::start_timed(store.clone(), fence.clone(), 16, Box::new(|_| {}), timer.clone());
        let event = LifecycleEvent {
            event_id: "e1".into(),
            kind: EventType::Disable,
            key_id: "k".into(),
            key_version: None,
            occurred_at: Utc::now(),
            correlation_id: None,
            traceparent: None,
            material_destroyed: false,
        };
        let consumed = Consumed { topic: "t".into(), partition: 0, next: 8, generation };
        let pending = w.enqueue(Some(Input::Event { event: event.clone(), at: Utc::now(), kms: None }), Some(consumed)).await.unwrap();
        assert!(matches!(pending.await.unwrap().unwrap(), Reply::Event { outcome: Outcome::Applied, .. }));
        assert_eq!(store.offset("t", 0), Some(8));
        assert!(store.event_seen("e1"));
        assert_eq!(timer.get_sample_count(), 1, "the commit is timed");
        let again = w.submit(Input::Event { event, at: Utc::now(), kms: None }).await.unwrap();
        assert!(matches!(again, Reply::Event { outcome: Outcome::Duplicate, .. }));
        drop(w);
        handle.join().unwrap().unwrap();
    }

    #[tokio::test]
    async fn a_revoked_partition_writes_nothing_more() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let fence = Arc::new(Fence::default());
        let part = ("t".to_string(), 3);
        fence.assign(std::slice::from_ref(&part));
        let old = fence.generation("t", 3).unwrap();
        let (w, _handle) = Writer::start(store.clone(), fence.clone(), 16, Box::new(|_| {}));
        let event = |id: &str| LifecycleEvent {
            event_id: id.into(),
            kind: EventType::Disable,
            key_id: "k".into(),
            key_version: None,
            occurred_at: Utc::now(),
            correlation_id: None,
            traceparent: None,
            material_destroyed: false,
        };
        let first = w
            .enqueue(
                Some(Input::Event { event: event("e1"), at: Utc::now(), kms: None }),
                Some(Consumed { topic: "t".into(), partition: 3, next: 1, generation: old }),
            )
            .await
            .unwrap();
        assert!(first.await.unwrap().is_ok());
        // Revoked (and even re-assigned to this member): inputs read before are fenced off.
        fence.revoke(std::slice::from_ref(&part));
        let late = w
            .enqueue(
                Some(Input::Event { event: event("e2"), at: Utc::now(), kms: None }),
                Some(Consumed { topic: "t".into(), partition: 3, next: 2, generation: old }),
            )
            .await
            .unwrap();
        assert!(matches!(late.await.unwrap(), Err(WriterError::Fenced { partition: 3, .. })));
        fence.assign(std::slice::from_ref(&part));
        let stale_gen = w
            .enqueue(
                Some(Input::Event { event: event("e3"), at: Utc::now(), kms: None }),
                Some(Consumed { topic: "t".into(), partition: 3, next: 3, generation: old }),
            )
            .await
            .unwrap();
        assert!(matches!(stale_gen.await.unwrap(), Err(WriterError::Fenced { .. })));
        assert_eq!(store.offset("t", 3), Some(1), "the stored offset never passes what this owner applied");
        assert!(!store.event_seen("e2") && !store.event_seen("e3"));
    }
}
