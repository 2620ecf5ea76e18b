//! A batch the writer is building: every change of every job it commits
//! together, applied with one `apply_batch` and made durable by one flush.

use std::collections::HashMap;
use std::time::Instant;

use super::schema::*;
use super::{audit, Change, Publishing, Route, Store, StoreError, Touched};
use crate::cluster::ChangelogError;
use crate::engine::{AuditFact, Effect, Record};

/// Built by one writer batch; nothing is written until `Store::commit_staged`.
#[derive(Default)]
pub struct Staged {
    pub(super) batch: sled::Batch,
    /// What goes to the changelog, in order, before the batch is applied.
    pub(super) changes: Vec<Change>,
    pub(super) facts: Vec<AuditFact>,
    /// Alerts raised or resolved, queued as one record at commit.
    pub(super) alerts: Vec<crate::engine::Alert>,
    /// Outbox effects, queued as one record at commit.
    pub(super) outbox: Vec<Effect>,
    /// This node's own sealed audit entries, read back from the changelog
    /// for a batch it published and did not apply (`schema::SEALED`).
    pub(super) recovered: Vec<audit::AuditEntry>,
    /// Embedded-KMS material as this batch leaves it, for the next job's
    /// compare-and-swap.
    pub(super) kms: HashMap<String, Vec<u8>>,
    /// Replica positions as this batch leaves them.
    pub(super) positions: HashMap<i32, Option<i64>>,
    /// The last changelog version accepted per partition, as this batch leaves them.
    pub(super) versions: HashMap<i32, i64>,
    /// Key and instance records this batch changes, for caches.
    pub touched: Vec<Touched>,
    /// The batch must be durable before anyone is answered.
    pub flush: bool,
}

impl Staged {
    pub(super) fn put(&mut self, route: Route, key: Vec<u8>, value: Vec<u8>) {
        self.batch.insert(key.clone(), value.clone());
        self.changes.push(Change { route, key, value: Some(value) });
    }
}

/// A batch applied to sled and not yet known durable (see `Store::apply_staged`).
#[must_use = "a group of one's changelog records are published only once `durable` is called"]
pub struct Applied {
    /// It must be flushed before anyone is answered.
    pub flush: bool,
    /// A group of one's changelog records, handed to the publisher once durable.
    deferred: Option<(std::sync::Arc<crate::cluster::deferred::Deferred>, u64, Vec<super::Versioned>)>,
    /// The key and instance records the batch changed.
    pub touched: Vec<Touched>,
}

impl Applied {
    /// Called once the batch is durable (flushed, if it had to be): a group
    /// of one's changelog gets its records now, never what a crash could
    /// still take back. Blocks while the publisher is at capacity.
    pub fn durable(self) {
        if let Some((deferred, id, records)) = self.deferred {
            deferred.applied(id, records);
        }
    }
}

/// Of the changes to one store key in a batch, only the last: the batch is
/// applied whole, so the earlier values never exist on their own (compaction
/// would drop them too). A rotation's job record, rewritten with each of the
/// batch's rewraps, is published once. The last changes keep their order, so
/// a prefix of the batch still has every command before its state.
fn newest_only(changes: Vec<Change>) -> Vec<Change> {
    let last: Vec<bool> = {
        let mut seen = std::collections::HashSet::with_capacity(changes.len());
        let mut last: Vec<bool> = changes.iter().rev().map(|c| seen.insert(c.key.as_slice())).collect();
        last.reverse();
        last
    };
    changes.into_iter().zip(last).filter_map(|(c, last)| last.then_some(c)).collect()
}

impl Store {
    /// Adds the engine's records to the batch.
    pub fn stage_records(&self, staged: &mut Staged, records: &[Record]) -> Result<(), StoreError> {
        self.stage_records_of(staged, records, |_| false)
    }

    /// As `stage_records`, told which instances the batch read as stored:
    /// their index entry exists already (it is written with the instance
    /// and never removed before it), so it is not looked up again. That
    /// lookup was a sled read per rewrap in a rotation's chunk.
    pub fn stage_records_of(&self, staged: &mut Staged, records: &[Record], stored: impl Fn(&str) -> bool) -> Result<(), StoreError> {
        // Queued commands are replicated, not stored here: this node's copy is its outbox entry.
        let mut commands = Vec::new();
        let first = staged.changes.len();
        for r in records {
            match r {
                Record::Key(key) => {
                    staged.put(Route::Key(key.key_id.clone()), k(KEY, &key.key_id), encode(key));
                    staged.touched.push(Touched::Key(key.key_id.clone()));
                }
                Record::Instance(inst) => {
                    // The index entry never changes once written: a rewrap or
                    // revocation rewrites only the instance (and publishes it alone).
                    if !stored(&inst.instance_id) {
                        let index = index_key(&inst.key_id, &inst.instance_id);
                        if !self.tree.contains_key(&index).map_err(StoreError::Read)? {
                            staged.put(Route::Key(inst.key_id.clone()), index, vec![]);
                        }
                    }
                    staged.put(Route::Key(inst.key_id.clone()), k(INSTANCE, &inst.instance_id), super::compact::encode_instance(inst));
                    staged.touched.push(Touched::Instance(inst.instance_id.clone()));
                }
                Record::Event(e) => staged.put(Route::Key(e.key_id.clone()), k(EVENT, &e.event_id), encode(e)),
                Record::Job(j) => staged.put(Route::Key(j.key_id.clone()), k(JOB, &j.key_id), encode(j)),
                Record::Outbox(Effect::Alert(alert)) => {
                    match alert.ends_at {
                        None => staged.batch.insert(k(FIRING, &alert.fingerprint()), encode(alert)),
                        Some(_) => staged.batch.remove(k(FIRING, &alert.fingerprint())),
                    }
                    staged.alerts.push(alert.clone());
                }
                Record::Outbox(Effect::KmsNotice { key_id, .. }) if self.wants_notices.get().is_some_and(|wants| !wants(key_id)) => {}
                Record::Outbox(effect @ Effect::KmsNotice { .. }) => {
                    // generate_id is monotonic across restarts, so the queue keeps commit order.
                    let id = self.db.generate_id()?;
                    staged.batch.insert(queue_key(NOTICES, id), encode(effect));
                }
                Record::Outbox(effect) => {
                    if let Some((key_id, name)) = command_key(effect) {
                        commands.push(Change { route: Route::Key(key_id), key: name, value: Some(encode(effect)) });
                    }
                    staged.outbox.push(effect.clone());
                }
                Record::Offset { topic, partition, next } => {
                    staged.put(Route::Partition(*partition), offset_key(topic, *partition), next.to_be_bytes().to_vec())
                }
                // Sealed at commit, in the order staged; each node's trail is its own.
                Record::Audit(fact) => staged.facts.push(fact.clone()),
            }
        }
        // Before the state they come with: a node killed half-way through
        // publishing a batch leaves a prefix of it in the changelog. A command
        // without its state is sent and, the state decided again, sent once
        // more under the same id; state without its command would never send it.
        staged.changes.splice(first..first, commands);
        Ok(())
    }

    /// Publishes the batch's changes to the changelog (with one configured),
    /// then applies the batch and, if asked, flushes it; or, for a group of
    /// one, applies it with its changelog records queued and hands them to the
    /// publisher once durable. With a deadline, gives up with `Unavailable`
    /// (nothing applied, nothing written) if the changelog confirmed none of
    /// it by then.
    pub fn commit_staged(&self, staged: Staged, deadline: Option<Instant>) -> Result<(), StoreError> {
        let applied = self.apply_staged(staged, deadline)?;
        if applied.flush {
            self.tree.flush()?;
        }
        applied.durable();
        Ok(())
    }

    /// As `commit_staged`, without the flush: the caller flushes (one flush
    /// may cover several batches) before it calls `Applied::durable`, and
    /// before it tells anyone the batch is committed.
    pub fn apply_staged(&self, mut staged: Staged, deadline: Option<Instant>) -> Result<Applied, StoreError> {
        let mut applied = None;
        let mut sealed = None;
        if let (Some(publishing), false) = (self.changelog.get(), staged.changes.is_empty()) {
            // Written ahead, the batch takes its audit entries along, sealed
            // now as they will be applied and last, so that whatever of the
            // batch reached the changelog before them did too: this node,
            // killed before it applies the batch, recovers its trail with
            // its state. A group of one applies first and needs none of it.
            if let (Publishing::Before(_), Some(route)) = (publishing, staged.changes.last().map(|c| c.route.clone())) {
                if !staged.facts.is_empty() {
                    let entries = self.seal_staged(&mut staged);
                    let key = k(SEALED, &audit::node_id(self.audit_key()));
                    staged.changes.push(Change { route, key, value: Some(encode(&entries)) });
                    sealed = Some(entries);
                }
            }
            let changelog = publishing.changelog();
            // A version this node cannot read is taken as none: the clock then
            // sets the next one, and the other nodes refuse it if it is old.
            let records = crate::cluster::changelog::versioned(
                newest_only(std::mem::take(&mut staged.changes)),
                |route| changelog.partition(route),
                |partition| self.changelog_version(partition).unwrap_or(0),
                chrono::Utc::now().timestamp_micros(),
            );
            let confirmed = match (publishing, deadline) {
                (Publishing::After(_, deferred), None) => {
                    let mut last: HashMap<i32, i64> = HashMap::new();
                    for r in &records {
                        last.insert(r.partition, r.version);
                    }
                    for (partition, version) in last {
                        // What the broker confirmed stays where it was; the
                        // replica takes what lies above it as this node's own.
                        let confirmed = self.changelog_published(partition)?;
                        staged.batch.insert(partition_key(PUBLISHED, partition), &confirmed.to_be_bytes()[..]);
                        staged.batch.insert(partition_key(VERSION, partition), &version.to_be_bytes()[..]);
                    }
                    let id = self.db.generate_id()?;
                    staged.batch.insert(queue_key(UNPUBLISHED, id), encode_versioned(&records));
                    applied = Some((deferred.clone(), id, records));
                    None
                }
                (Publishing::After(_, deferred), Some(deadline)) => Some(deferred.confirm(records, deadline)),
                (Publishing::Before(changelog), _) => Some(changelog.publish(&records, deadline)),
            };
            if let Some(confirmed) = confirmed {
                let written = confirmed.map_err(|e| match e {
                    ChangelogError::Unconfirmed { .. } => StoreError::Unavailable(e.to_string()),
                    ChangelogError::Failed { .. } => StoreError::Changelog(e.to_string()),
                })?;
                for w in written {
                    // This node's replica skips its own entries.
                    if self.replica_position(w.partition)?.is_none_or(|at| w.next > at) {
                        staged.batch.insert(partition_key(REPLICA, w.partition), &w.next.to_be_bytes()[..]);
                    }
                    staged.batch.insert(partition_key(VERSION, w.partition), &w.version.to_be_bytes()[..]);
                    staged.batch.insert(partition_key(PUBLISHED, w.partition), &w.version.to_be_bytes()[..]);
                }
            }
        }
        // One queue record per commit, not one per effect or alert: each
        // record is inserted now and removed once all of it is sent, and per
        // entry that was two sled writes for every event (B3). generate_id is
        // monotonic across restarts, so each queue keeps commit order.
        if !staged.alerts.is_empty() {
            let id = self.db.generate_id()?;
            staged.batch.insert(queue_key(ALERTS, id), encode(&std::mem::take(&mut staged.alerts)));
        }
        if !staged.outbox.is_empty() {
            let id = self.db.generate_id()?;
            staged.batch.insert(queue_key(OUTBOX, id), encode(&std::mem::take(&mut staged.outbox)));
        }
        let anchored = sealed.is_some() || !staged.facts.is_empty();
        let sealed = match sealed {
            Some(entries) => entries,
            None if staged.facts.is_empty() => Vec::new(),
            None => self.seal_staged(&mut staged),
        };
        let mut entries = std::mem::take(&mut staged.recovered);
        entries.extend(sealed);
        if entries.is_empty() {
            self.tree.apply_batch(staged.batch)?;
        } else {
            // Only the writer commits, so the head the entries were sealed
            // after is still the head; the lock keeps readers of it in line.
            let mut chain = self.audit_chain.lock().unwrap_or_else(|e| e.into_inner());
            for e in &entries {
                staged.batch.insert(queue_key(AUDIT, e.seq), encode(e));
            }
            self.tree.apply_batch(staged.batch)?;
            if anchored {
                // One anchor, for the unsealed entries there were at start.
                self.anchor_legacy.store(false, std::sync::atomic::Ordering::SeqCst);
            }
            *chain = entries.last().map(audit::Head::of);
        }
        // Once applied, before it is durable and anyone is told: the data
        // plane's decoded records must not outlive it.
        self.keys.forget(staged.touched.iter().filter_map(|t| match t {
            Touched::Key(key_id) => Some(key_id.as_str()),
            Touched::Instance(_) => None,
        }));
        self.instances.forget(staged.touched.iter().filter_map(|t| match t {
            Touched::Instance(instance_id) => Some(instance_id.as_str()),
            Touched::Key(_) => None,
        }));
        Ok(Applied { flush: staged.flush, deferred: applied, touched: staged.touched })
    }

    /// The batch's audit facts sealed after the trail's head as this batch
    /// leaves it (after any entries it recovers).
    fn seal_staged(&self, staged: &mut Staged) -> Vec<audit::AuditEntry> {
        let head = match staged.recovered.last() {
            Some(e) => Some(audit::Head::of(e)),
            None => self.audit_head(),
        };
        let anchor = self.anchor_legacy.load(std::sync::atomic::Ordering::SeqCst);
        audit::seal(self.audit_key(), head.as_ref(), anchor, std::mem::take(&mut staged.facts), chrono::Utc::now())
    }

    /// Commits records outside a writer: for tests of the readers only.
    #[cfg(test)]
    pub fn commit(&self, records: &[Record], flush: bool) -> Result<(), StoreError> {
        let mut staged = Staged { flush, ..Staged::default() };
        self.stage_records(&mut staged, records)?;
        self.commit_staged(staged, None)
    }
}
