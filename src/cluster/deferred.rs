//! The changelog of a group of one, published after its batches are applied.
//!
//! With several nodes the changelog is the write-ahead log: a batch is applied
//! only once the broker has it, because the node that takes a partition over
//! knows only what the changelog holds. A group of one has no such reader: the
//! only node that takes its partitions over is itself, restarted, and it reads
//! its own store. So it applies and flushes each batch first, with the batch's
//! changelog records (versions fixed) in the same sled batch under
//! `UNPUBLISHED`, and this thread publishes them in commit order, many batches
//! per broker round trip, then drops them from the queue through the writer. A
//! restart publishes what is left before anything newer.
//!
//! Writes with a deadline (the API's) still wait for the broker, so that a
//! write refused for an unreachable broker is refused as on several nodes.
//! They go through the same queue, behind every batch applied before them:
//! the changelog keeps the store's order.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use super::{Changelog, ChangelogError, Written};
use crate::store::writer::Writer;
use crate::store::{Published, Store, StoreError, Versioned};

#[derive(Debug, thiserror::Error)]
pub enum DeferredError {
    #[error("cannot read the unpublished changelog records: {0}")]
    Store(#[from] StoreError),
    #[error("{0}")]
    Changelog(#[from] ChangelogError),
    #[error("the store writer stopped before the changelog's confirmations were recorded")]
    WriterStopped,
}

impl DeferredError {
    pub fn retryable(&self) -> bool {
        match self {
            DeferredError::Store(e) => e.retryable(),
            DeferredError::Changelog(e) => e.retryable(),
            DeferredError::WriterStopped => false,
        }
    }
}

/// Records queued at most before a commit waits for the broker: what bounds
/// the memory a slow or absent broker costs (the rest waits in the store).
const CAPACITY: usize = 20_000;
/// Unpublished batches read from the store per round after a restart.
const BACKLOG_ROUND: usize = 8;

/// Batches applied and waiting for the broker, and writes waiting for it
/// before they are applied, in commit order.
pub struct Deferred {
    queue: Mutex<Queue>,
    changed: Condvar,
}

#[derive(Default)]
struct Queue {
    items: VecDeque<Item>,
    /// Records of `Applied` items queued.
    records: usize,
    /// The publishing thread has ended: what is applied waits in the store
    /// for the next start, and writes that wait for the broker are refused.
    closed: bool,
}

enum Item {
    Applied { id: u64, records: Vec<Versioned> },
    Confirm(Arc<Ticket>),
}

/// A write that is applied only once the broker confirms it.
struct Ticket {
    records: Vec<Versioned>,
    deadline: Instant,
    state: Mutex<TicketState>,
    done: Condvar,
}

enum TicketState {
    Waiting,
    /// On its way: the writer waits for the answer, whatever the deadline
    /// (`ChangelogPublisher::publish` gives up at it if nothing is confirmed).
    Sending,
    /// The answer, taken once by the writer.
    Done(Option<Result<Vec<Written>, ChangelogError>>),
    /// The writer stopped waiting before it was sent: it is never sent.
    Abandoned,
}

impl Default for Deferred {
    fn default() -> Self {
        Deferred { queue: Mutex::new(Queue::default()), changed: Condvar::new() }
    }
}

fn unconfirmed(reason: &str) -> ChangelogError {
    ChangelogError::Unconfirmed { topic: "the changelog".into(), reason: reason.into() }
}

impl Deferred {
    fn lock(&self) -> MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A batch applied and flushed under queue entry `id`. Waits while the
    /// queue is full (the broker is slower than the store, or away): memory
    /// stays bounded, and the writer slows down to the broker's pace.
    pub fn applied(&self, id: u64, records: Vec<Versioned>) {
        let mut q = self.lock();
        while !q.closed && q.records > 0 && q.records + records.len() > CAPACITY {
            q = self.changed.wait(q).unwrap_or_else(|e| e.into_inner());
        }
        if q.closed {
            // Kept in the store: the next start publishes it.
            return;
        }
        q.records += records.len();
        q.items.push_back(Item::Applied { id, records });
        self.changed.notify_all();
    }

    /// Publishes `records` after everything queued before them, and answers
    /// once the broker confirmed them, or with `Unconfirmed` if it confirmed
    /// none by `deadline` (then nothing of them is sent later).
    pub fn confirm(&self, records: Vec<Versioned>, deadline: Instant) -> Result<Vec<Written>, ChangelogError> {
        let ticket = Arc::new(Ticket { records, deadline, state: Mutex::new(TicketState::Waiting), done: Condvar::new() });
        {
            let mut q = self.lock();
            if q.closed {
                return Err(unconfirmed("shutting down"));
            }
            q.items.push_back(Item::Confirm(ticket.clone()));
            self.changed.notify_all();
        }
        let mut state = ticket.state.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            match &mut *state {
                TicketState::Waiting => {
                    let now = Instant::now();
                    if now >= deadline {
                        *state = TicketState::Abandoned;
                        return Err(unconfirmed("the broker had not confirmed the batches applied before it"));
                    }
                    state = ticket.done.wait_timeout(state, deadline - now).unwrap_or_else(|e| e.into_inner()).0;
                }
                TicketState::Sending => state = ticket.done.wait(state).unwrap_or_else(|e| e.into_inner()),
                TicketState::Done(result) => return result.take().unwrap_or_else(|| Err(unconfirmed("answered already"))),
                TicketState::Abandoned => return Err(unconfirmed("abandoned")),
            }
        }
    }

    /// Ends the queue: waiting writes are refused, applied batches stay in the store.
    fn close(&self) {
        let mut q = self.lock();
        q.closed = true;
        for item in q.items.drain(..) {
            if let Item::Confirm(ticket) = item {
                finish(&ticket, Err(unconfirmed("shutting down")));
            }
        }
        q.records = 0;
        self.changed.notify_all();
    }

    /// The publishing thread: first what a previous run left unpublished (up
    /// to `backlog`, the newest entry there was before this queue was turned
    /// on), then the queue, until `stop`.
    pub fn run(&self, changelog: Arc<dyn Changelog>, store: Store, writer: Writer, backlog: Option<u64>, stop: Arc<AtomicBool>) {
        let mut pending = Vec::new();
        let result = publish_backlog(&*changelog, &store, backlog, &stop, &mut |p| {
            pending.push(p);
            settle(&writer, &mut pending)
        })
        .and_then(|_| self.follow(&*changelog, &writer, &stop, &mut pending));
        self.close();
        match result {
            Err(e) if !stop.load(Ordering::SeqCst) => {
                tracing::error!(error = %e, "the changelog publisher stopped; what is applied is published after a restart")
            }
            _ => tracing::debug!(unsettled = pending.len(), "the changelog publisher stopped"),
        }
    }

    fn follow(&self, changelog: &dyn Changelog, writer: &Writer, stop: &AtomicBool, pending: &mut Vec<Published>) -> Result<(), DeferredError> {
        while !stop.load(Ordering::SeqCst) {
            match self.next() {
                Next::Idle => {}
                Next::Confirm(ticket) => send(changelog, &ticket),
                Next::Applied(ids, records) => {
                    let written = changelog.publish(&records, None)?;
                    pending.push(Published { ids, written });
                }
            }
            settle(writer, pending)?;
        }
        Ok(())
    }

    /// The next write that waits, or every applied batch at the front of the
    /// queue (one broker round trip for all of them), up to `CAPACITY` records.
    fn next(&self) -> Next {
        let mut q = self.lock();
        if q.items.is_empty() {
            // Not for long: confirmations not yet recorded are tried again.
            q = self.changed.wait_timeout(q, Duration::from_millis(100)).unwrap_or_else(|e| e.into_inner()).0;
        }
        let (mut ids, mut records) = (Vec::new(), Vec::new());
        while records.len() < CAPACITY {
            match q.items.pop_front() {
                Some(Item::Applied { id, records: r }) => {
                    q.records -= r.len();
                    ids.push(id);
                    records.extend(r);
                }
                Some(Item::Confirm(ticket)) if ids.is_empty() => return Next::Confirm(ticket),
                Some(other) => {
                    q.items.push_front(other);
                    break;
                }
                None => break,
            }
        }
        self.changed.notify_all();
        if ids.is_empty() {
            Next::Idle
        } else {
            Next::Applied(ids, records)
        }
    }
}

enum Next {
    Idle,
    Confirm(Arc<Ticket>),
    Applied(Vec<u64>, Vec<Versioned>),
}

fn finish(ticket: &Ticket, result: Result<Vec<Written>, ChangelogError>) {
    *ticket.state.lock().unwrap_or_else(|e| e.into_inner()) = TicketState::Done(Some(result));
    ticket.done.notify_all();
}

fn send(changelog: &dyn Changelog, ticket: &Ticket) {
    {
        let mut state = ticket.state.lock().unwrap_or_else(|e| e.into_inner());
        match *state {
            TicketState::Waiting if Instant::now() < ticket.deadline => *state = TicketState::Sending,
            TicketState::Waiting => {
                *state = TicketState::Done(Some(Err(unconfirmed("its deadline passed before it was sent"))));
                ticket.done.notify_all();
                return;
            }
            _ => return,
        }
    }
    finish(ticket, changelog.publish(&ticket.records, Some(ticket.deadline)));
}

/// Hands confirmations to the writer without waiting for it: the writer may
/// itself be waiting for this thread (a write with a deadline). A full
/// writer queue keeps them for the next try.
fn settle(writer: &Writer, pending: &mut Vec<Published>) -> Result<(), DeferredError> {
    if pending.is_empty() {
        return Ok(());
    }
    match writer.published_nowait(std::mem::take(pending)) {
        Ok(()) => Ok(()),
        Err(Some(back)) => {
            *pending = back;
            Ok(())
        }
        Err(None) => Err(DeferredError::WriterStopped),
    }
}

/// Publishes what the store holds unpublished up to `until`, oldest first,
/// and hands each round's confirmation to `done`.
pub fn publish_backlog(
    changelog: &dyn Changelog,
    store: &Store,
    until: Option<u64>,
    stop: &AtomicBool,
    done: &mut dyn FnMut(Published) -> Result<(), DeferredError>,
) -> Result<usize, DeferredError> {
    let Some(until) = until else { return Ok(0) };
    let (mut after, mut batches) = (None, 0);
    while !stop.load(Ordering::SeqCst) {
        let round = store.unpublished(after, until, BACKLOG_ROUND)?;
        let Some((last, _)) = round.last() else { break };
        after = Some(*last);
        batches += round.len();
        let ids = round.iter().map(|(id, _)| *id).collect();
        let records: Vec<Versioned> = round.into_iter().flat_map(|(_, r)| r).collect();
        let written = changelog.publish(&records, None)?;
        done(Published { ids, written })?;
    }
    if batches > 0 {
        tracing::info!(batches, "published the changelog records applied before the last stop");
    }
    Ok(batches)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Answers after `delay`, recording what it published.
    struct Slow {
        delay: Duration,
        log: Mutex<Vec<i64>>,
    }

    impl Changelog for Slow {
        fn partition(&self, _route: &crate::store::Route) -> i32 {
            0
        }

        fn publish(&self, records: &[Versioned], deadline: Option<Instant>) -> Result<Vec<Written>, ChangelogError> {
            if deadline.is_some_and(|d| Instant::now() + self.delay > d) {
                std::thread::sleep(deadline.unwrap().saturating_duration_since(Instant::now()));
                return Err(unconfirmed("slow"));
            }
            std::thread::sleep(self.delay);
            self.log.lock().unwrap().extend(records.iter().map(|r| r.version));
            Ok(vec![])
        }
    }

    fn record(version: i64) -> Versioned {
        Versioned { partition: 0, version, key: b"k/a".to_vec(), value: None }
    }

    fn thread(q: &Arc<Deferred>, log: &Arc<Slow>, stop: &Arc<AtomicBool>) -> std::thread::JoinHandle<()> {
        let (q, log, stop) = (q.clone(), log.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut pending = Vec::new();
            while !stop.load(Ordering::SeqCst) {
                match q.next() {
                    Next::Idle => {}
                    Next::Confirm(t) => send(&*log, &t),
                    Next::Applied(ids, records) => {
                        log.publish(&records, None).unwrap();
                        pending.push(ids);
                    }
                }
            }
            q.close();
        })
    }

    #[test]
    fn a_write_that_waits_is_published_after_every_batch_applied_before_it() {
        let q = Arc::new(Deferred::default());
        let log = Arc::new(Slow { delay: Duration::from_millis(20), log: Mutex::default() });
        let stop = Arc::new(AtomicBool::new(false));
        let t = thread(&q, &log, &stop);
        q.applied(1, vec![record(1), record(2)]);
        q.applied(2, vec![record(3)]);
        q.confirm(vec![record(4)], Instant::now() + Duration::from_secs(5)).unwrap();
        assert_eq!(*log.log.lock().unwrap(), vec![1, 2, 3, 4], "in commit order");
        stop.store(true, Ordering::SeqCst);
        t.join().unwrap();
        assert!(q.confirm(vec![record(5)], Instant::now() + Duration::from_secs(5)).is_err(), "refused once the publisher has stopped");
    }

    #[test]
    fn a_write_stuck_behind_the_broker_is_refused_at_its_deadline_and_never_sent() {
        let q = Arc::new(Deferred::default());
        let log = Arc::new(Slow { delay: Duration::from_millis(400), log: Mutex::default() });
        let stop = Arc::new(AtomicBool::new(false));
        let t = thread(&q, &log, &stop);
        q.applied(1, vec![record(1)]);
        let started = Instant::now();
        let refused = q.confirm(vec![record(2)], Instant::now() + Duration::from_millis(100));
        assert!(matches!(refused, Err(ChangelogError::Unconfirmed { .. })), "{refused:?}");
        assert!(started.elapsed() < Duration::from_millis(350), "answered at its deadline, not after the broker");
        std::thread::sleep(Duration::from_millis(600));
        assert_eq!(*log.log.lock().unwrap(), vec![1], "the refused write was never published");
        stop.store(true, Ordering::SeqCst);
        t.join().unwrap();
    }
}
