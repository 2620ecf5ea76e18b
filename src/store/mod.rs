//! The embedded store. sled 0.34 is beta, so nothing outside this module names it.
//!
//! One tree, prefixed keys (`schema`), so that a batch of records — state,
//! outbox entries and the partition offsets that caused them — lands atomically
//! in one `apply_batch`, and one flush makes the whole batch durable (group
//! commit). Only the writer (`writer`) writes: every other module reads.
//!
//! - `schema`: every key prefix, and how records are encoded.
//! - `compact`: the instance record's binary form.
//! - `batch`: a batch being built by the writer, and its commit.
//! - `queues`: the outbox, the KMS notices and the alert queue.
//! - `replication`: what goes to and comes from the changelog.
//! - `kms_material`: the embedded KMS's sealed keys and the events they emit.
//! - `audit`: the hash-chained, sealed audit trail.
//! - `writer`: the single writer thread.

pub mod audit;
mod batch;
pub mod compact;
mod decoded;
mod kms_material;
mod queues;
mod replication;
pub mod schema;
pub mod writer;

use std::cell::RefCell;
use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use serde::de::DeserializeOwned;

pub use batch::{Applied, Staged};
pub use kms_material::{Emission, KmsChange};
pub use queues::{Queue, SentEntry};
pub use replication::{Change, Published, Refused, Replicated, Route, Versioned};
pub use schema::Touched;

use crate::cluster::deferred::Deferred;
use crate::cluster::Changelog;
use crate::engine::{EventRecord, InstanceRecord, KeyRecord, RotationJob, View};
use schema::*;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot open the store at {path}: {source}; check that the directory is writable and no other keywarden uses it")]
    Open { path: String, source: sled::Error },
    #[error("store write failed: {0}; check disk space and permissions")]
    Write(#[from] sled::Error),
    #[error("store read failed: {0}; check the disk")]
    Read(sled::Error),
    /// A stored record that does not decode: nothing is decided on it.
    #[error("store record {key} is corrupt ({reason}); restore the store from a backup or from the changelog")]
    Corrupt { key: String, reason: String },
    #[error("cannot write to the changelog: {0}; nothing was applied")]
    Changelog(String),
    #[error("the audit secret was set twice, or after entries were sealed without it; set it once, before anything is audited")]
    AuditKey,
    /// The changelog did not confirm the batch by its deadline and none of it
    /// was written: the batch is not applied, and the caller may retry.
    #[error("the broker did not confirm the changelog write in time ({0})")]
    Unavailable(String),
}

impl StoreError {
    /// Disk-level failures rarely heal by retrying the same write at once.
    pub fn retryable(&self) -> bool {
        matches!(self, StoreError::Unavailable(_))
    }
}

/// How much the store holds, for the status systemd shows.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Census {
    pub keys: usize,
    pub instances: usize,
    pub outbox: usize,
}

/// One key's instances, for the `keywarden_instances` gauge.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Tally {
    pub with_dek: u64,
    pub destroyed: u64,
}

pub type NoticeFilter = Box<dyn Fn(&str) -> bool + Send + Sync>;

/// When a batch is published to the changelog, relative to applying it here.
pub enum Publishing {
    /// Several nodes: first, and the batch is applied only once the broker
    /// has it. The changelog is the write-ahead log: a node that dies after
    /// publishing loses nothing the others (or it, restarted) cannot read.
    Before(Arc<dyn Changelog>),
    /// A group of one: after, from the store's own queue (`cluster::deferred`),
    /// except writes with a deadline, which wait for the broker in order.
    After(Arc<dyn Changelog>, Arc<Deferred>),
}

impl Publishing {
    fn changelog(&self) -> &dyn Changelog {
        match self {
            Publishing::Before(c) | Publishing::After(c, _) => &**c,
        }
    }
}

#[derive(Clone)]
pub struct Store {
    db: sled::Db,
    tree: sled::Tree,
    /// The newest audit entry, moved by each commit that carries audit facts,
    /// so that the chain stays one line.
    audit_chain: Arc<std::sync::Mutex<Option<audit::Head>>>,
    /// What audit entries are sealed and verified under; set once by the
    /// daemon, from outside the store (see `audit`).
    audit_key: Arc<std::sync::OnceLock<audit::AuditKey>>,
    /// The next sealed entry may anchor the unsealed ones before it: only on
    /// the start that created the audit secret.
    anchor_legacy: Arc<std::sync::atomic::AtomicBool>,
    /// How each batch's state changes reach the changelog (none: no changelog).
    changelog: Arc<std::sync::OnceLock<Publishing>>,
    /// Which keys' KMS reads notices; set once by the daemon. Unset: all are kept.
    wants_notices: Arc<std::sync::OnceLock<NoticeFilter>>,
    /// Key and instance records decoded, for the data plane (`key_shared`, `instance_shared`).
    keys: Arc<decoded::Decoded<KeyRecord>>,
    instances: Arc<decoded::Decoded<InstanceRecord>>,
}

impl Store {
    /// Waits up to two seconds for the store's lock: a process that is just
    /// exiting (or a handle just dropped) may still hold it. A second daemon on
    /// the same store still fails, with the lock error.
    pub fn open(path: &Path) -> Result<Store, StoreError> {
        Self::open_with_cache(path, crate::config::DEFAULT_CACHE_CAPACITY)
    }

    /// As `open`, with `cache_capacity` bytes of page cache (`store.cache_capacity`).
    pub fn open_with_cache(path: &Path, cache_capacity: u64) -> Result<Store, StoreError> {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
        let db = loop {
            match sled::Config::new().path(path).flush_every_ms(Some(1000)).cache_capacity(cache_capacity).open() {
                Ok(db) => break db,
                Err(e) if e.to_string().contains("could not acquire lock") && std::time::Instant::now() < deadline => {
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
                Err(source) => return Err(StoreError::Open { path: path.display().to_string(), source }),
            }
        };
        let tree = db.open_tree("state").map_err(|source| StoreError::Open { path: path.display().to_string(), source })?;
        let last = match tree.scan_prefix(AUDIT).next_back() {
            Some(kv) => {
                let (key, value) = kv.map_err(StoreError::Read)?;
                let e: audit::AuditEntry = decode(&key, &value)?;
                Some(audit::Head::of(&e))
            }
            None => None,
        };
        Ok(Store {
            db,
            tree,
            audit_chain: Arc::new(std::sync::Mutex::new(last)),
            audit_key: Default::default(),
            anchor_legacy: Default::default(),
            changelog: Default::default(),
            wants_notices: Default::default(),
            keys: Default::default(),
            instances: Default::default(),
        })
    }

    /// Seals audit entries under `key` from now on; once, before anything is
    /// audited. With `anchor_legacy`, the next entry is the anchor that vouches
    /// for entries written before the trail was keyed: the daemon asks for it
    /// only on the start that created the secret, so that a trail whose seals
    /// were stripped is never vouched for.
    pub fn set_audit_key(&self, key: audit::AuditKey, anchor_legacy: bool) -> Result<(), StoreError> {
        self.audit_key.set(key).map_err(|_| StoreError::AuditKey)?;
        self.anchor_legacy.store(anchor_legacy, std::sync::atomic::Ordering::SeqCst);
        Ok(())
    }

    /// Before `set_audit_key` (tests, tools on the library): a fixed key in
    /// unit tests, else a throwaway one whose seals fail after a restart.
    fn audit_key(&self) -> &audit::AuditKey {
        self.audit_key.get_or_init(|| {
            #[cfg(test)]
            return audit::AuditKey::for_tests();
            #[cfg(not(test))]
            {
                tracing::warn!("no audit secret was set: audit entries are sealed under a throwaway key and fail `audit verify` after a restart");
                audit::AuditKey::throwaway()
            }
        })
    }

    /// The newest audit entry, as the next seal needs it.
    fn audit_head(&self) -> Option<audit::Head> {
        self.audit_chain.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The seq of the newest audit entry when it carries no seal: the trail
    /// was written before it was keyed, or its seals were stripped.
    pub fn audit_unsealed(&self) -> Option<u64> {
        let chain = self.audit_chain.lock().unwrap_or_else(|e| e.into_inner());
        chain.as_ref().filter(|h| !h.sealed).map(|h| h.seq)
    }

    /// `audit::verify` under this store's audit key.
    pub fn verify_audit(&self, entries: &[audit::AuditEntry], from_start: bool) -> Result<audit::Verified, String> {
        audit::verify(self.audit_key(), entries, from_start)
    }

    /// Notices for keys whose KMS ignores them are dropped instead of queued.
    pub fn keep_notices_only_for(&self, wants: NoticeFilter) {
        if self.wants_notices.set(wants).is_err() {
            tracing::warn!("the notice filter was already set; keeping the first");
        }
    }

    /// Turns the changelog on (once), as the write-ahead log.
    pub fn set_changelog(&self, changelog: Arc<dyn Changelog>) {
        self.set_publishing(Publishing::Before(changelog));
    }

    /// Turns the changelog on (once).
    pub fn set_publishing(&self, publishing: Publishing) {
        if self.changelog.set(publishing).is_err() {
            tracing::warn!("the changelog was already set; keeping the first");
        }
    }

    pub fn flush(&self) -> Result<(), StoreError> {
        self.tree.flush()?;
        Ok(())
    }

    fn get(&self, key: &[u8]) -> Result<Option<sled::IVec>, StoreError> {
        self.tree.get(key).map_err(StoreError::Read)
    }

    fn get_decoded<T: DeserializeOwned>(&self, key: &[u8]) -> Result<Option<T>, StoreError> {
        self.get(key)?.map(|v| decode(key, &v)).transpose()
    }

    fn scan<T: DeserializeOwned>(&self, prefix: &[u8]) -> Result<Vec<T>, StoreError> {
        self.scan_by(prefix, decode)
    }

    /// Every record under `prefix`, each decoded as its form needs.
    fn scan_by<T>(&self, prefix: &[u8], decode: impl Fn(&[u8], &[u8]) -> Result<T, StoreError>) -> Result<Vec<T>, StoreError> {
        self.tree
            .scan_prefix(prefix)
            .map(|kv| {
                let (key, value) = kv.map_err(StoreError::Read)?;
                decode(&key, &value)
            })
            .collect()
    }

    /// The ids after `prefix` of every key under it.
    fn scan_ids(&self, prefix: &[u8]) -> Result<Vec<String>, StoreError> {
        self.tree
            .scan_prefix(prefix)
            .keys()
            .map(|key| {
                let key = key.map_err(StoreError::Read)?;
                Ok(String::from_utf8_lossy(&key[prefix.len()..]).into_owned())
            })
            .collect()
    }

    pub fn offset(&self, topic: &str, partition: i32) -> Result<Option<i64>, StoreError> {
        let key = offset_key(topic, partition);
        self.get(&key)?.map(|v| number(&key, &v)).transpose()
    }

    pub fn key(&self, key_id: &str) -> Result<Option<KeyRecord>, StoreError> {
        self.get_decoded(&k(KEY, key_id))
    }

    /// The key record as the data plane reads it on every DEK fetch: decoded
    /// once, until a commit changes it (`decoded`).
    pub fn key_shared(&self, key_id: &str) -> Result<Option<Arc<KeyRecord>>, StoreError> {
        self.keys.get_or_read(key_id, || self.key(key_id))
    }

    pub fn instance(&self, instance_id: &str) -> Result<Option<InstanceRecord>, StoreError> {
        let key = k(INSTANCE, instance_id);
        self.get(&key)?.map(|v| compact::decode_instance(&key, &v)).transpose()
    }

    /// The instance record as the data plane reads it on every DEK fetch:
    /// decoded once, until a commit changes it (`decoded`).
    pub fn instance_shared(&self, instance_id: &str) -> Result<Option<Arc<InstanceRecord>>, StoreError> {
        self.instances.get_or_read(instance_id, || self.instance(instance_id))
    }

    pub fn event(&self, event_id: &str) -> Result<Option<EventRecord>, StoreError> {
        self.get_decoded(&k(EVENT, event_id))
    }

    pub fn event_seen(&self, event_id: &str) -> Result<bool, StoreError> {
        self.tree.contains_key(k(EVENT, event_id)).map_err(StoreError::Read)
    }

    pub fn job(&self, key_id: &str) -> Result<Option<RotationJob>, StoreError> {
        self.get_decoded(&k(JOB, key_id))
    }

    pub fn keys(&self) -> Result<Vec<KeyRecord>, StoreError> {
        self.scan(KEY)
    }

    pub fn jobs(&self) -> Result<Vec<RotationJob>, StoreError> {
        self.scan(JOB)
    }

    pub fn instances(&self) -> Result<Vec<InstanceRecord>, StoreError> {
        self.scan_by(INSTANCE, compact::decode_instance)
    }

    pub fn instance_ids_of(&self, key_id: &str) -> Result<Vec<String>, StoreError> {
        self.scan_ids(&index_prefix(key_id))
    }

    /// How many instances `key_id` protects: its index entries counted, not
    /// collected (blocking; ~0.5 µs per instance).
    pub fn instance_count(&self, key_id: &str) -> Result<usize, StoreError> {
        self.tree.scan_prefix(index_prefix(key_id)).keys().try_fold(0, |n, key| key.map(|_| n + 1).map_err(StoreError::Read))
    }

    pub fn instances_of(&self, key_id: &str) -> Result<Vec<InstanceRecord>, StoreError> {
        let mut out = Vec::new();
        for id in self.instance_ids_of(key_id)? {
            out.extend(self.instance(&id)?);
        }
        Ok(out)
    }

    /// `key_id`'s instances among the next `limit` of its index entries, in
    /// instance id order, from the first whose id is above `after` (from the
    /// first of all with `None`), and where the next page starts (`None`
    /// once the key has no more): a caller that walks a large key page by
    /// page holds one page, not the key, and can start on the first page
    /// while the rest is still unread. The next page is told apart from the
    /// records found, since an index entry may come without its record (a
    /// changelog prefix that held one and not the other).
    pub fn instances_of_after(&self, key_id: &str, after: Option<&str>, limit: usize) -> Result<(Vec<InstanceRecord>, Option<String>), StoreError> {
        use std::ops::Bound;
        let prefix = index_prefix(key_id);
        let from = match after {
            Some(id) => Bound::Excluded(index_key(key_id, id)),
            None => Bound::Included(prefix.clone()),
        };
        let mut out = Vec::with_capacity(limit.min(4096));
        let mut read = 0;
        for key in self.tree.range::<Vec<u8>, _>((from, Bound::Unbounded)).keys() {
            let key = key.map_err(StoreError::Read)?;
            if !key.starts_with(&prefix) {
                break;
            }
            let id = String::from_utf8_lossy(&key[prefix.len()..]).into_owned();
            out.extend(self.instance(&id)?);
            read += 1;
            if read >= limit {
                return Ok((out, Some(id)));
            }
        }
        Ok((out, None))
    }

    /// Counted, not decoded, so that a status line every few seconds stays cheap.
    pub fn census(&self) -> Census {
        let count = |prefix: &[u8]| self.tree.scan_prefix(prefix).keys().count();
        Census { keys: count(KEY), instances: count(INSTANCE), outbox: count(OUTBOX) }
    }

    /// Per key, instances that hold a wrapped DEK and destroyed ones. Reads every
    /// instance record.
    pub fn instance_tally(&self) -> Result<HashMap<String, Tally>, StoreError> {
        let mut tally: HashMap<String, Tally> = HashMap::new();
        for kv in self.tree.scan_prefix(INSTANCE) {
            let (key, value) = kv.map_err(StoreError::Read)?;
            let inst = compact::decode_instance(&key, &value)?;
            let t = tally.entry(inst.key_id).or_default();
            if inst.wrapped.is_some() {
                t.with_dek += 1;
            } else {
                t.destroyed += 1;
            }
        }
        Ok(tally)
    }

    /// Alerts firing now (raised and not yet resolved).
    pub fn firing_alerts(&self) -> Result<Vec<crate::engine::Alert>, StoreError> {
        self.scan(FIRING)
    }

    /// Audit entries after `since` (oldest first), at most `limit`.
    pub fn audit_since(&self, since: Option<chrono::DateTime<chrono::Utc>>, limit: usize) -> Result<Vec<audit::AuditEntry>, StoreError> {
        let mut out = Vec::new();
        for kv in self.tree.scan_prefix(AUDIT) {
            if out.len() >= limit {
                break;
            }
            let (key, value) = kv.map_err(StoreError::Read)?;
            let e: audit::AuditEntry = decode(&key, &value)?;
            if since.is_none_or(|t| e.at >= t) {
                out.push(e);
            }
        }
        Ok(out)
    }

    /// The newest `limit` audit entries, oldest first.
    pub fn audit(&self, limit: usize) -> Result<Vec<audit::AuditEntry>, StoreError> {
        let mut v = Vec::new();
        for kv in self.tree.scan_prefix(AUDIT).rev().take(limit) {
            let (key, value) = kv.map_err(StoreError::Read)?;
            v.push(decode(&key, &value)?);
        }
        v.reverse();
        Ok(v)
    }

    /// The engine's view of this store, for one batch of decisions: a record
    /// that cannot be read is remembered (and the batch refused by the
    /// writer), never decided on.
    pub fn reading(&self) -> Reading<'_> {
        Reading { store: self, error: RefCell::new(None), keys: RefCell::default(), instances: RefCell::default() }
    }
}

/// `View` for the engine, which reads infallibly: the first read error is
/// kept, answers after it are empty, and the writer refuses the decision.
pub struct Reading<'a> {
    store: &'a Store,
    error: RefCell<Option<StoreError>>,
    /// Keys and instances as read, for the rest of the batch. Nothing writes
    /// the store while the writer stages a batch, so a second read of the same
    /// record (the ownership check and then the decision both read a rewrap's
    /// instance) would decode the same bytes again. Only reads that succeeded
    /// are kept: a failed one is read (and fails) again.
    keys: RefCell<HashMap<String, Option<KeyRecord>>>,
    instances: RefCell<HashMap<String, Option<InstanceRecord>>>,
}

impl Reading<'_> {
    fn keep<T: Default>(&self, r: Result<T, StoreError>) -> T {
        r.unwrap_or_else(|e| {
            self.error.borrow_mut().get_or_insert(e);
            T::default()
        })
    }

    /// Whether this reading found `instance_id` in the store (not merely
    /// in the batch being staged over it).
    pub fn found_instance(&self, instance_id: &str) -> bool {
        self.instances.borrow().get(instance_id).is_some_and(Option::is_some)
    }

    /// The first read that failed since the last call.
    pub fn take_error(&self) -> Option<StoreError> {
        self.error.borrow_mut().take()
    }
}

/// The record read before under `id`, or `read` once, kept if it succeeded.
fn remembered<T: Clone>(
    memo: &RefCell<HashMap<String, Option<T>>>,
    id: &str,
    read: impl FnOnce() -> Result<Option<T>, StoreError>,
) -> Result<Option<T>, StoreError> {
    if let Some(known) = memo.borrow().get(id) {
        return Ok(known.clone());
    }
    let read = read()?;
    memo.borrow_mut().insert(id.to_string(), read.clone());
    Ok(read)
}

impl View for Reading<'_> {
    fn key(&self, key_id: &str) -> Option<KeyRecord> {
        self.keep(remembered(&self.keys, key_id, || self.store.key(key_id)))
    }

    fn instance(&self, instance_id: &str) -> Option<InstanceRecord> {
        self.keep(remembered(&self.instances, instance_id, || self.store.instance(instance_id)))
    }

    fn event_seen(&self, event_id: &str) -> bool {
        self.keep(self.store.event_seen(event_id))
    }

    fn job(&self, key_id: &str) -> Option<RotationJob> {
        self.keep(self.store.job(key_id))
    }

    fn instances_of(&self, key_id: &str) -> Vec<InstanceRecord> {
        self.keep(self.store.instances_of(key_id))
    }
}

#[cfg(test)]
mod tests;
