//! record: the single writer. Every state change passes through one thread that
//! runs the engine over a batch of inputs, commits the records together with the
//! partition offsets that caused them, and applies them; its flusher thread
//! makes them durable, one flush for every batch applied meanwhile (group
//! commit), and only then answers, while this thread goes on with the next
//! batch. Not only the engine's inputs: what the relays sent, embedded-KMS key
//! changes, partition take-overs and replicated changelog entries are committed
//! here too, so nothing else writes the store, and there are no
//! read-modify-write races. Every input is checked here, once, against this
//! node's ownership of its key.

use std::collections::HashSet;
use std::sync::mpsc::SyncSender;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use prometheus::Histogram;
use tokio::sync::{mpsc, oneshot};

use super::{KmsChange, Queue, Replicated, SentEntry, Staged, Store, StoreError, Touched};
use crate::cluster::fence::Held;
use crate::cluster::Ownership;
use crate::engine::{coalesce, decide, AuditFact, Input, Overlay, Record, Reply};

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
    /// Another node owns the key now (its partition moved): that node writes it.
    #[error("key {key_id} belongs to another node now (its partition moved); retry, and the write goes to its owner")]
    NotOwner { key_id: String },
    #[error("not written: {0}")]
    Store(StoreError),
    /// An earlier input of the same partition (and generation) was not
    /// committed: committing this one's offset would pass it.
    #[error("not written: an earlier input of {topic}/{partition} could not be committed, and this one's offset would pass it; its partition is read again from there")]
    Halted { topic: String, partition: i32 },
}

impl WriterError {
    pub fn retryable(&self) -> bool {
        matches!(self, WriterError::Unavailable(_) | WriterError::Fenced { .. } | WriterError::NotOwner { .. })
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

/// What the writer is asked to commit.
#[derive(Debug)]
pub enum Op {
    /// Decided by the engine. None: only the offset moves (a dead-lettered message).
    Decide(Option<Input>),
    /// Many inputs decided in turn, committed in one batch and answered once:
    /// a rotation's chunk of rewrap results, which would otherwise be one
    /// queued job (and one answer) per DEK. Refused whole if any of them
    /// belongs to a key this node does not own.
    DecideAll(Vec<Input>),
    /// A relay sent these entries of its queue.
    Sent { queue: Queue, sent: Vec<SentEntry> },
    /// An embedded-KMS key change (compare-and-swap on its material).
    Kms(KmsChange),
    /// This node took a partition over: it announces itself as the owner,
    /// queues again what the previous owner emitted and did not see applied,
    /// and adopts the commands it queued and did not confirm sent.
    TakeOver { topic: String, partition: i32, generation: u64, url: String },
    /// Changelog entries other nodes wrote.
    Replicated(Vec<Replicated>),
    /// Entries of the audit trail that no engine input carries (API requests,
    /// DEK releases). `durable`: flushed before the answer; DEK releases are
    /// not (sled flushes within a second), so that reads never cost an fsync.
    Audit { facts: Vec<AuditFact>, durable: bool },
    /// The changelog confirmed these batches of a group of one (see
    /// `cluster::deferred`). Not flushed: lost in a crash, they are published
    /// again under the same versions, which the replica skips.
    Published(Vec<super::Published>),
    /// Records committed as they are, not decided: seeding a stopped
    /// daemon's store (the benchmarks) or restoring one. Not reachable from
    /// any input.
    Import(Vec<Record>),
}

impl Op {
    /// Batches never mix these: replicated entries are applied in their own
    /// batches (unflushed; and this node's own writes move the positions they
    /// are checked against), and jobs with a deadline never wait behind jobs
    /// that wait for the broker however long it takes.
    fn class(&self, timed: bool) -> u8 {
        match (self, timed) {
            (Op::Replicated(_), _) => 2,
            // Nothing of it goes to the changelog: it never waits for the broker
            // with a batch that does.
            (Op::Audit { .. } | Op::Published(_), _) => 3,
            (_, true) => 1,
            _ => 0,
        }
    }
}

/// What a committed op did.
#[derive(Debug)]
pub enum Done {
    Decided(Reply),
    Written,
    /// False: the key changed since the KMS read it; nothing was written.
    Kms {
        applied: bool,
    },
    TakenOver {
        emitted: usize,
        adopted: usize,
    },
    Replicated {
        applied: usize,
        refused: Vec<super::Refused>,
    },
}

struct Job {
    op: Op,
    consumed: Option<Consumed>,
    /// A caller that must answer in bounded time (the API) gives up at this
    /// moment: a job still queued then is dropped undecided, and a batch of
    /// such jobs whose changelog write the broker has not confirmed by then is
    /// abandoned unapplied. Jobs without one (consumed events, the workers)
    /// wait for the broker however long it takes: they are never lost.
    deadline: Option<Instant>,
    reply: oneshot::Sender<Result<Done, WriterError>>,
}

/// What one durable commit changed, handed to `OnCommit` before anyone is answered.
pub struct Committed<'a> {
    pub records: &'a [Record],
    /// Key and instance records replicated entries changed.
    pub replicated: &'a [Touched],
}

pub type OnCommit = Box<dyn Fn(&Committed) + Send>;

#[derive(Clone)]
pub struct Writer {
    tx: mpsc::Sender<Msg>,
}

enum Msg {
    Job(Box<Job>),
    /// Commit what is queued, refuse what comes after, and end.
    Close,
}

/// The writer thread. It ends on `close` (or when every `Writer` is dropped),
/// after committing what it was given: components that hold a `Writer` (the
/// embedded KMS, reachable from the store's own notice filter) need not all be
/// dropped first.
pub struct Thread {
    handle: JoinHandle<Result<(), StoreError>>,
    tx: mpsc::Sender<Msg>,
}

impl Thread {
    /// Blocks until everything queued before is committed and the store
    /// flushed: call it off the async runtime.
    pub fn close(self) -> Result<(), StoreError> {
        // Already gone: the join below says how it ended.
        if self.tx.blocking_send(Msg::Close).is_err() {
            tracing::debug!("the store writer had already stopped");
        }
        drop(self.tx);
        self.handle.join().unwrap_or_else(|_| Err(StoreError::Changelog("the store writer thread panicked".into())))
    }
}

/// An input queued with `enqueue`: answers once it is durable.
pub struct Pending(oneshot::Receiver<Result<Done, WriterError>>);

impl std::future::Future for Pending {
    type Output = Result<Reply, WriterError>;

    fn poll(mut self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<Self::Output> {
        std::pin::Pin::new(&mut self.0).poll(cx).map(|r| decided(r.map_err(|_| WriterError::Stopped)?))
    }
}

fn decided(done: Result<Done, WriterError>) -> Result<Reply, WriterError> {
    match done? {
        Done::Decided(reply) => Ok(reply),
        _ => Ok(Reply::Done),
    }
}

impl Writer {
    /// Starts the writer thread. It ends when every `Writer` clone is dropped,
    /// after committing what it was given.
    pub fn start(store: Store, ownership: Ownership, max_batch: usize, on_commit: OnCommit) -> (Writer, Thread) {
        Self::spawn(store, ownership, max_batch, on_commit, None)
    }

    /// As `start`, and observes each commit's apply-and-flush time: the flush is
    /// what bounds throughput, so its latency is the first thing to look at.
    pub fn start_timed(store: Store, ownership: Ownership, max_batch: usize, on_commit: OnCommit, commit_seconds: Histogram) -> (Writer, Thread) {
        Self::spawn(store, ownership, max_batch, on_commit, Some(commit_seconds))
    }

    fn spawn(store: Store, ownership: Ownership, max_batch: usize, on_commit: OnCommit, commit_seconds: Option<Histogram>) -> (Writer, Thread) {
        let (tx, rx) = mpsc::channel(max_batch * 4);
        let state = Loop { store, ownership, max_batch, on_commit: Some(on_commit), commit_seconds, halted: Default::default() };
        let handle = std::thread::Builder::new().name("keywarden-writer".into()).spawn(move || state.run(rx));
        // Without its writer thread keywarden can do nothing; the OS refusing a
        // thread at start-up is not an input, and the daemon cannot go on.
        let handle = handle.unwrap_or_else(|e| panic!("cannot start the store writer thread: {e}"));
        (Writer { tx: tx.clone() }, Thread { handle, tx })
    }

    fn job(op: Op, consumed: Option<Consumed>, deadline: Option<Instant>) -> (Job, oneshot::Receiver<Result<Done, WriterError>>) {
        let (reply, rx) = oneshot::channel();
        (Job { op, consumed, deadline, reply }, rx)
    }

    async fn run(&self, op: Op, deadline: Option<Instant>) -> Result<Done, WriterError> {
        let (job, rx) = Self::job(op, None, deadline);
        self.tx.send(Msg::Job(Box::new(job))).await.map_err(|_| WriterError::Stopped)?;
        rx.await.map_err(|_| WriterError::Stopped)?
    }

    /// Queues an input; the returned `Pending` answers once it is durable.
    pub async fn enqueue(&self, input: Option<Input>, consumed: Option<Consumed>) -> Result<Pending, WriterError> {
        let (job, rx) = Self::job(Op::Decide(input), consumed, None);
        self.tx.send(Msg::Job(Box::new(job))).await.map_err(|_| WriterError::Stopped)?;
        Ok(Pending(rx))
    }

    /// Queues inputs to be committed together (see `Op::DecideAll`); the
    /// returned `Pending` answers once all of them are durable.
    pub async fn enqueue_all(&self, inputs: Vec<Input>) -> Result<Pending, WriterError> {
        let (job, rx) = Self::job(Op::DecideAll(inputs), None, None);
        self.tx.send(Msg::Job(Box::new(job))).await.map_err(|_| WriterError::Stopped)?;
        Ok(Pending(rx))
    }

    pub async fn submit(&self, input: Input) -> Result<Reply, WriterError> {
        decided(self.run(Op::Decide(Some(input)), None).await)
    }

    /// As `submit`, but answers `Unavailable` once `timeout` has passed
    /// without the input being durable; it is then not applied (see `Job::deadline`).
    pub async fn submit_within(&self, input: Input, timeout: Duration) -> Result<Reply, WriterError> {
        decided(self.run_within(Op::Decide(Some(input)), timeout).await)
    }

    async fn run_within(&self, op: Op, timeout: Duration) -> Result<Done, WriterError> {
        // The writer answers at the deadline itself; this only covers a writer
        // busy with a batch that waits on the broker (a job still queued then
        // is dropped when the writer reaches it).
        match tokio::time::timeout(timeout + Duration::from_millis(250), self.run(op, Some(Instant::now() + timeout))).await {
            Ok(answer) => answer,
            Err(_) => Err(WriterError::Unavailable(format!("the store writer did not get to it within {timeout:?}; the broker may be unreachable"))),
        }
    }

    /// Appends to the audit trail within `timeout`.
    pub async fn audit(&self, fact: AuditFact, timeout: Duration) -> Result<(), WriterError> {
        self.run_within(Op::Audit { facts: vec![fact], durable: true }, timeout).await.map(|_| ())
    }

    /// Appends many entries to the audit trail, in one job, however long the
    /// writer takes to get to it; not flushed (see `Op::Audit`).
    pub async fn audit_all(&self, facts: Vec<AuditFact>) -> Result<(), WriterError> {
        self.run(Op::Audit { facts, durable: false }, None).await.map(|_| ())
    }

    /// Commits records as they are (see `Op::Import`).
    pub async fn import(&self, records: Vec<Record>) -> Result<(), WriterError> {
        self.run(Op::Import(records), None).await.map(|_| ())
    }

    /// Removes what a relay sent from its queue.
    pub async fn sent(&self, queue: Queue, sent: Vec<SentEntry>) -> Result<(), WriterError> {
        self.run(Op::Sent { queue, sent }, None).await.map(|_| ())
    }

    /// Commits an embedded-KMS key change within `timeout`. Ok(false): the
    /// key changed since it was read; read it again and retry.
    pub async fn change_kms(&self, change: KmsChange, timeout: Option<Duration>) -> Result<bool, WriterError> {
        let done = match timeout {
            Some(t) => self.run_within(Op::Kms(change), t).await?,
            None => self.run(Op::Kms(change), None).await?,
        };
        Ok(matches!(done, Done::Kms { applied: true }))
    }

    /// Returns how many emitted events were queued again and how many commands adopted.
    pub async fn take_over(&self, topic: &str, partition: i32, generation: u64, url: &str) -> Result<(usize, usize), WriterError> {
        match self.run(Op::TakeOver { topic: topic.to_string(), partition, generation, url: url.to_string() }, None).await? {
            Done::TakenOver { emitted, adopted } => Ok((emitted, adopted)),
            _ => Ok((0, 0)),
        }
    }

    /// Records the changelog's confirmations without waiting: the changelog
    /// thread calls it, and the writer may be waiting for that thread. Gives
    /// them back if the writer's queue is full (`Err(Some)`) or it stopped
    /// (`Err(None)`).
    pub fn published_nowait(&self, published: Vec<super::Published>) -> Result<(), Option<Vec<super::Published>>> {
        let (job, _) = Self::job(Op::Published(published), None, None);
        match self.tx.try_send(Msg::Job(Box::new(job))) {
            Ok(()) => Ok(()),
            Err(mpsc::error::TrySendError::Full(Msg::Job(job))) => match job.op {
                Op::Published(published) => Err(Some(published)),
                _ => Err(None),
            },
            Err(_) => Err(None),
        }
    }

    /// Records the changelog's confirmations, once committed.
    pub async fn published(&self, published: Vec<super::Published>) -> Result<(), WriterError> {
        self.run(Op::Published(published), None).await.map(|_| ())
    }

    /// For the replica's thread (not async): blocks until the entries are
    /// applied, and returns how many were new here, and those refused.
    pub fn replicate_blocking(&self, entries: Vec<Replicated>) -> Result<(usize, Vec<super::Refused>), WriterError> {
        let (job, rx) = Self::job(Op::Replicated(entries), None, None);
        self.tx.blocking_send(Msg::Job(Box::new(job))).map_err(|_| WriterError::Stopped)?;
        match rx.blocking_recv().map_err(|_| WriterError::Stopped)?? {
            Done::Replicated { applied, refused } => Ok((applied, refused)),
            _ => Ok((0, Vec::new())),
        }
    }
}

struct Loop {
    store: Store,
    ownership: Ownership,
    max_batch: usize,
    /// Handed to the flusher, which alone calls it, when the loop starts.
    on_commit: Option<OnCommit>,
    commit_seconds: Option<Histogram>,
    /// Partitions (topic, partition, generation) one of whose consumed
    /// inputs failed: their later inputs are refused, uncommitted, so that
    /// no stored offset passes an input that was never applied (the next
    /// read of the partition starts at the failed one). Only the writer
    /// thread touches it.
    halted: std::cell::RefCell<HashSet<(String, i32, u64)>>,
}

/// Batches the flusher may hold before the writer waits for it: what bounds
/// how far the store's applied state runs ahead of its durable state.
const IN_FLIGHT: usize = 4;

impl Loop {
    fn run(mut self, rx: mpsc::Receiver<Msg>) -> Result<(), StoreError> {
        let (tx, flushes) = std::sync::mpsc::sync_channel(IN_FLIGHT);
        let failed = Arc::new(Mutex::new(None));
        let flusher = Flusher {
            store: self.store.clone(),
            on_commit: self.on_commit.take().unwrap_or_else(|| Box::new(|_| {})),
            commit_seconds: self.commit_seconds.clone(),
            failed: failed.clone(),
        };
        let flushing = std::thread::Builder::new().name("keywarden-flush".into()).spawn(move || flusher.run(flushes));
        // As for the writer thread itself: without it nothing is durable.
        let flushing = flushing.unwrap_or_else(|e| panic!("cannot start the store flusher thread: {e}"));
        let ended = self.commit_all(rx, &tx, &failed);
        // The flusher answers what it holds, then ends.
        drop(tx);
        if flushing.join().is_err() {
            return Err(StoreError::Changelog("the store flusher thread panicked".into()));
        }
        ended?;
        if let Some(e) = failed.lock().unwrap_or_else(|e| e.into_inner()).take() {
            return Err(e);
        }
        self.store.flush()
    }

    fn commit_all(&self, mut rx: mpsc::Receiver<Msg>, flusher: &SyncSender<Flush>, failed: &Mutex<Option<StoreError>>) -> Result<(), StoreError> {
        let mut jobs = Vec::with_capacity(self.max_batch);
        // A job of another class than the batch it came after: it starts the next one.
        let mut carried: Option<Box<Job>> = None;
        loop {
            let first = match carried.take().map(Msg::Job).or_else(|| rx.blocking_recv()) {
                None => break,
                Some(Msg::Job(job)) => *job,
                Some(Msg::Close) => {
                    // What is queued already is still committed; nothing after.
                    rx.close();
                    continue;
                }
            };
            let class = first.op.class(first.deadline.is_some());
            jobs.push(first);
            while jobs.len() < self.max_batch {
                match rx.try_recv() {
                    Ok(Msg::Job(job)) if job.op.class(job.deadline.is_some()) == class => jobs.push(*job),
                    Ok(Msg::Job(job)) => {
                        carried = Some(job);
                        break;
                    }
                    Ok(Msg::Close) => {
                        rx.close();
                        break;
                    }
                    Err(_) => break,
                }
            }
            let now = Instant::now();
            let (expired, live): (Vec<Job>, Vec<Job>) = jobs.drain(..).partition(|j| j.deadline.is_some_and(|d| d <= now));
            for job in expired {
                answer(job.reply, Err(WriterError::Unavailable("it waited past its deadline behind writes the broker had not confirmed".into())));
            }
            // A flush failed: nothing more may be acknowledged.
            if failed.lock().unwrap_or_else(|e| e.into_inner()).is_some() {
                for job in live {
                    answer(job.reply, Err(WriterError::Commit("an earlier batch could not be flushed".into())));
                }
                return Ok(());
            }
            if !live.is_empty() {
                self.batch(live, flusher)?;
            }
        }
        Ok(())
    }

    /// Decides, stages and commits one batch. Errs only when the store itself
    /// failed to commit: then nothing more may be acknowledged.
    fn batch(&self, jobs: Vec<Job>, flusher: &SyncSender<Flush>) -> Result<(), StoreError> {
        let deadline = jobs.iter().filter_map(|j| j.deadline).min();
        if deadline.is_some() {
            // A group of one hands a batch's changelog records to its
            // publisher once durable, and a batch with a deadline waits for
            // the broker in the same queue: the batches before it must be in
            // that queue first, or the changelog would not keep commit order.
            let (done, wait) = std::sync::mpsc::sync_channel(1);
            if flusher.send(Flush::Barrier(done)).is_err() || wait.recv().is_err() {
                return Err(StoreError::Changelog("the store flusher stopped".into()));
            }
        }
        let replicated = matches!(jobs.first().map(|j| &j.op), Some(Op::Replicated(_)));
        // Audit batches flush only if one of their entries must be durable.
        let audits = matches!(jobs.first().map(|j| &j.op), Some(Op::Audit { .. } | Op::Published(_)));
        let mut staged = Staged { flush: !replicated && !audits, ..Staged::default() };
        let mut records = Vec::new();
        let mut replies = Vec::with_capacity(jobs.len());
        // The partitions of the consumed inputs staged so far, halted if the batch fails.
        let mut partitions = Vec::new();
        // Held until the batch is applied (with several nodes, published to
        // the changelog first): a revocation waits for it, and no input read
        // under an older generation gets in. Replicated entries are not
        // this node's writes, whoever owns their keys.
        let owned = if replicated { None } else { Some(self.ownership.fence().hold()) };
        let reading = self.store.reading();
        let mut overlay = Overlay::new(&reading);
        let mut jobs = jobs.into_iter();
        while let Some(job) = jobs.next() {
            let partition = job.consumed.as_ref().map(|c| (c.topic.clone(), c.partition, c.generation));
            if let Some((topic, partition, _)) = partition.as_ref().filter(|p| self.halted.borrow().contains(*p)) {
                answer(job.reply, Err(WriterError::Halted { topic: topic.clone(), partition: *partition }));
                continue;
            }
            let outcome = self.stage(job.op, job.consumed, owned.as_ref(), &reading, &mut overlay, &mut staged, &mut records);
            match outcome {
                Ok(done) => {
                    replies.push((job.reply, done));
                    partitions.extend(partition);
                }
                // A fenced input's partition is another owner's to read now.
                Err(Failure::Job(e @ WriterError::Fenced { .. })) => answer(job.reply, Err(e)),
                Err(Failure::Job(e)) => {
                    if let Some(partition) = partition {
                        tracing::error!(topic = %partition.0, partition = partition.1, error = %e, "an input was not committed: its partition's later inputs are refused until it is read again");
                        self.halted.borrow_mut().insert(partition);
                    }
                    answer(job.reply, Err(e));
                }
                Err(Failure::Batch(e)) => {
                    self.halted.borrow_mut().extend(partitions.drain(..).chain(partition));
                    // A read failed half-way through staging: nothing of the
                    // batch is written, every caller is told, the writer goes on.
                    tracing::error!(error = %e, "a batch was not written: the store could not be read");
                    let why = e.to_string();
                    answer(job.reply, Err(WriterError::Store(e)));
                    for (tx, _) in replies {
                        answer(tx, Err(WriterError::Unavailable(why.clone())));
                    }
                    // The batch's jobs not staged yet are not written either:
                    // told so, and their partitions held like the others.
                    for rest in jobs {
                        if let Some(c) = &rest.consumed {
                            self.halted.borrow_mut().insert((c.topic.clone(), c.partition, c.generation));
                        }
                        answer(rest.reply, Err(WriterError::Unavailable(why.clone())));
                    }
                    return Ok(());
                }
            }
        }
        drop(overlay);
        let started = Instant::now();
        let committed = self.store.apply_staged(staged, deadline);
        match committed {
            Err(StoreError::Unavailable(why)) => {
                // Nothing of the batch was written anywhere: the callers are told,
                // and the writer goes on.
                tracing::warn!(reason = %why, inputs = replies.len(), "writes abandoned unapplied: the changelog did not confirm them in time");
                for (tx, _) in replies {
                    answer(tx, Err(WriterError::Unavailable(why.clone())));
                }
                Ok(())
            }
            Err(e) => {
                tracing::error!(error = %e, "store commit failed; stopping so that nothing is acknowledged that is not durable");
                for (tx, _) in replies {
                    answer(tx, Err(WriterError::Commit(e.to_string())));
                }
                Err(e)
            }
            Ok(mut applied) => {
                // Applied under the fence: another node takes the partition
                // over from the changelog, which (with several nodes) has the
                // batch already, and this node's callers, the consumer's
                // offsets among them, hear of it only once it is durable.
                drop(owned);
                let replicated = if replicated { std::mem::take(&mut applied.touched) } else { Vec::new() };
                let batch = Box::new(Flushed { applied, started, records, replicated, replies });
                if let Err(std::sync::mpsc::SendError(Flush::Batch(batch))) = flusher.send(Flush::Batch(batch)) {
                    for (tx, _) in batch.replies {
                        answer(tx, Err(WriterError::Commit("the store flusher stopped".into())));
                    }
                    return Err(StoreError::Changelog("the store flusher stopped".into()));
                }
                Ok(())
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn stage(
        &self,
        op: Op,
        consumed: Option<Consumed>,
        owned: Option<&Held<'_>>,
        reading: &super::Reading<'_>,
        overlay: &mut Overlay<'_, super::Reading<'_>>,
        staged: &mut Staged,
        records: &mut Vec<Record>,
    ) -> Result<Done, Failure> {
        if let (Some(c), Some(owned)) = (&consumed, owned) {
            if !owned.owns(&c.topic, c.partition, c.generation) {
                return Err(Failure::Job(WriterError::Fenced { topic: c.topic.clone(), partition: c.partition }));
            }
        }
        let mine = |key_id: &str| owned.is_none_or(|held| self.ownership.owns_key_held(held, key_id));
        let done = match op {
            Op::Decide(input) => {
                let reply = match input {
                    Some(input) => {
                        // A consumed input's key is in its partition, fenced above.
                        if consumed.is_none() {
                            if let Some(key_id) = input.key_id(&*overlay).filter(|k| !mine(k)) {
                                return Err(Failure::Job(WriterError::NotOwner { key_id }));
                            }
                        }
                        let d = decide(&*overlay, input);
                        if let Some(e) = reading.take_error() {
                            return Err(Failure::Job(WriterError::Store(e)));
                        }
                        overlay.absorb(&d.records);
                        self.store.stage_records_of(staged, &d.records, |id| reading.found_instance(id)).map_err(Failure::Batch)?;
                        records.extend(d.records);
                        d.reply
                    }
                    None => Reply::Done,
                };
                Done::Decided(reply)
            }
            Op::DecideAll(inputs) => {
                // All checked before any is staged: the job is committed or refused whole.
                if let Some(key_id) = inputs.iter().filter_map(|i| i.key_id(&*overlay)).find(|k| !mine(k)) {
                    return Err(Failure::Job(WriterError::NotOwner { key_id }));
                }
                if let Some(e) = reading.take_error() {
                    return Err(Failure::Job(WriterError::Store(e)));
                }
                let mut decided = Vec::new();
                for input in inputs {
                    let d = decide(&*overlay, input);
                    // Some of the job is in the overlay already: the whole batch is refused.
                    if let Some(e) = reading.take_error() {
                        return Err(Failure::Batch(e));
                    }
                    overlay.absorb(&d.records);
                    decided.extend(d.records);
                }
                // Staged together, so that the job's commands are one outbox entry.
                let decided = coalesce(decided);
                self.store.stage_records_of(staged, &decided, |id| reading.found_instance(id)).map_err(Failure::Batch)?;
                records.extend(decided);
                Done::Written
            }
            Op::Sent { queue, sent } => {
                let assigned = |key_id: &str| owned.is_none_or(|held| self.ownership.assigned_key_held(held, key_id));
                self.store.stage_sent(staged, queue, sent, assigned).map_err(Failure::Batch)?;
                Done::Written
            }
            Op::Kms(change) => {
                if !mine(&change.key_id) {
                    return Err(Failure::Job(WriterError::NotOwner { key_id: change.key_id }));
                }
                Done::Kms { applied: self.store.stage_kms(staged, change).map_err(Failure::Batch)? }
            }
            Op::TakeOver { topic, partition, generation, url } => {
                if !owned.is_some_and(|held| held.owns(&topic, partition, generation)) {
                    return Err(Failure::Job(WriterError::Fenced { topic, partition }));
                }
                let in_partition = |key_id: &str| self.ownership.partition(key_id) == Some(partition);
                self.store.stage_owner(staged, partition, &url);
                let emitted = self.store.stage_unapplied_emissions(staged, in_partition).map_err(Failure::Batch)?;
                let adopted = self.store.stage_adopted_commands(staged, in_partition).map_err(Failure::Batch)?;
                Done::TakenOver { emitted, adopted }
            }
            Op::Import(imported) => {
                overlay.absorb(&imported);
                self.store.stage_records(staged, &imported).map_err(Failure::Batch)?;
                records.extend(imported);
                Done::Written
            }
            Op::Audit { facts, durable } => {
                staged.flush |= durable;
                let records: Vec<Record> = facts.into_iter().map(Record::Audit).collect();
                self.store.stage_records(staged, &records).map_err(Failure::Batch)?;
                Done::Written
            }
            Op::Published(published) => {
                self.store.stage_published(staged, &published).map_err(Failure::Batch)?;
                Done::Written
            }
            Op::Replicated(entries) => {
                let (applied, refused) = self.store.stage_replicated(staged, &entries).map_err(Failure::Batch)?;
                Done::Replicated { applied, refused }
            }
        };
        if let Some(c) = consumed {
            let offset = Record::Offset { topic: c.topic, partition: c.partition, next: c.next };
            self.store.stage_records(staged, std::slice::from_ref(&offset)).map_err(Failure::Batch)?;
            records.push(offset);
        }
        Ok(done)
    }
}

/// An applied batch, on its way to being durable and answered.
struct Flushed {
    applied: super::Applied,
    /// When its apply began: the commit is timed from there to its flush.
    started: Instant,
    records: Vec<Record>,
    replicated: Vec<Touched>,
    replies: Vec<(oneshot::Sender<Result<Done, WriterError>>, Done)>,
}

enum Flush {
    Batch(Box<Flushed>),
    /// Answered once every batch sent before it is durable and answered.
    Barrier(std::sync::mpsc::SyncSender<()>),
}

/// Makes applied batches durable and answers them, in commit order, while the
/// writer stages the next: a flush no longer stops the writer, and one flush
/// covers every batch applied meanwhile (group commit across batches). The
/// writer still applies every change; this thread only flushes, hands a group
/// of one's changelog records to its publisher, and tells.
struct Flusher {
    store: Store,
    on_commit: OnCommit,
    commit_seconds: Option<Histogram>,
    /// Set when a flush failed: the writer stops, and nothing after is acknowledged.
    failed: Arc<Mutex<Option<StoreError>>>,
}

impl Flusher {
    fn run(self, flushes: std::sync::mpsc::Receiver<Flush>) {
        let mut broken = false;
        while let Ok(first) = flushes.recv() {
            let mut group = vec![first];
            group.extend(flushes.try_iter());
            let needs_flush = group.iter().any(|f| matches!(f, Flush::Batch(b) if b.applied.flush));
            if needs_flush && !broken {
                if let Err(e) = self.store.flush() {
                    tracing::error!(error = %e, "store flush failed; stopping so that nothing is acknowledged that is not durable");
                    *self.failed.lock().unwrap_or_else(|e| e.into_inner()) = Some(e);
                    broken = true;
                }
            }
            for flush in group {
                match flush {
                    Flush::Barrier(done) => {
                        // The writer waits on it; gone, it stopped waiting.
                        if done.send(()).is_err() {
                            tracing::debug!("the store writer stopped waiting for its flushes");
                        }
                    }
                    Flush::Batch(batch) if broken => {
                        for (tx, _) in batch.replies {
                            answer(tx, Err(WriterError::Commit("the store could not be flushed; keywarden stops".into())));
                        }
                    }
                    Flush::Batch(batch) => {
                        let Flushed { applied, started, records, replicated, replies } = *batch;
                        applied.durable();
                        if let Some(h) = &self.commit_seconds {
                            h.observe(started.elapsed().as_secs_f64());
                        }
                        (self.on_commit)(&Committed { records: &records, replicated: &replicated });
                        for (tx, done) in replies {
                            answer(tx, Ok(done));
                        }
                    }
                }
            }
        }
    }
}

enum Failure {
    /// This job is refused; the rest of the batch goes on.
    Job(WriterError),
    /// The batch cannot be staged; none of it is written.
    Batch(StoreError),
}

/// A caller that stopped waiting (its request timed out) no longer needs the answer.
fn answer(tx: oneshot::Sender<Result<Done, WriterError>>, result: Result<Done, WriterError>) {
    if tx.send(result).is_err() {
        tracing::debug!("a writer's caller stopped waiting before its answer");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    use crate::cluster::Fence;
    use crate::engine::{EventType, LifecycleEvent, Outcome};
    use chrono::Utc;

    #[tokio::test]
    async fn offset_is_committed_with_the_state_it_caused() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let fence = Arc::new(Fence::default());
        let ownership = Ownership::single(fence.clone());
        fence.assign(&[("t".to_string(), 0)]);
        let generation = fence.generation("t", 0).unwrap();
        let timer = prometheus::Histogram::with_opts(prometheus::HistogramOpts::new("t", "t")).unwrap();
        let (w, handle) = Writer::start_timed(store.clone(), ownership, 16, Box::new(|_| {}), timer.clone());
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
        assert!(matches!(pending.await.unwrap(), Reply::Event { outcome: Outcome::Applied, .. }));
        assert_eq!(store.offset("t", 0).unwrap(), Some(8));
        assert!(store.event_seen("e1").unwrap());
        assert_eq!(timer.get_sample_count(), 1, "the commit is timed");
        let again = w.submit(Input::Event { event, at: Utc::now(), kms: None }).await.unwrap();
        assert!(matches!(again, Reply::Event { outcome: Outcome::Duplicate, .. }));
        drop(w);
        tokio::task::spawn_blocking(move || handle.close()).await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn a_revoked_partition_writes_nothing_more() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let fence = Arc::new(Fence::default());
        let ownership = Ownership::single(fence.clone());
        let part = ("t".to_string(), 3);
        fence.assign(std::slice::from_ref(&part));
        let old = fence.generation("t", 3).unwrap();
        let (w, _handle) = Writer::start(store.clone(), ownership, 16, Box::new(|_| {}));
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
        assert!(first.await.is_ok());
        // Revoked (and even re-assigned to this member): inputs read before are fenced off.
        fence.revoke(std::slice::from_ref(&part));
        let late = w
            .enqueue(
                Some(Input::Event { event: event("e2"), at: Utc::now(), kms: None }),
                Some(Consumed { topic: "t".into(), partition: 3, next: 2, generation: old }),
            )
            .await
            .unwrap();
        assert!(matches!(late.await, Err(WriterError::Fenced { partition: 3, .. })));
        fence.assign(std::slice::from_ref(&part));
        let stale_gen = w
            .enqueue(
                Some(Input::Event { event: event("e3"), at: Utc::now(), kms: None }),
                Some(Consumed { topic: "t".into(), partition: 3, next: 3, generation: old }),
            )
            .await
            .unwrap();
        assert!(matches!(stale_gen.await, Err(WriterError::Fenced { .. })));
        assert_eq!(store.offset("t", 3).unwrap(), Some(1), "the stored offset never passes what this owner applied");
        assert!(!store.event_seen("e2").unwrap() && !store.event_seen("e3").unwrap());
    }
}
