//! The embedded store. sled 0.34 is beta, so nothing outside this module names it.
//!
//! One tree, prefixed keys, so that a batch of records — state, outbox entries and
//! the partition offsets that caused them — lands atomically in one `apply_batch`,
//! and one flush makes the whole batch durable (group commit).

pub mod audit;

use std::collections::HashMap;
use std::path::Path;

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::engine::{Effect, EventRecord, InstanceRecord, KeyRecord, Record, RotationJob, View};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot open the store at {path}: {source}; check that the directory is writable and no other keywarden uses it")]
    Open { path: String, source: sled::Error },
    #[error("store write failed: {0}; check disk space and permissions")]
    Write(#[from] sled::Error),
    #[error("cannot write to the changelog: {0}; nothing was applied")]
    Changelog(String),
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

const KEY: &[u8] = b"k/";
const INSTANCE: &[u8] = b"i/";
const INDEX: &[u8] = b"x/";
const EVENT: &[u8] = b"e/";
const JOB: &[u8] = b"j/";
const OUTBOX: &[u8] = b"o/";
/// KMS notices wait in their own queue: a slow KMS must not hold up commands.
const NOTICES: &[u8] = b"n/";
const OFFSET: &[u8] = b"p/";
const KMS: &[u8] = b"m/";
const AUDIT: &[u8] = b"a/";
/// Alerts firing now, by fingerprint: re-sent until resolved, also after a restart.
const FIRING: &[u8] = b"l/";
/// Alerts waiting for their sinks: a sink that is down must not hold up commands.
const ALERTS: &[u8] = b"q/";
/// How far this node's replica has read each changelog partition.
const REPLICA: &[u8] = b"r/";
/// Which node (its API URL) owns each partition, as the owner announced it.
const OWNER: &[u8] = b"w/";
/// Lifecycle events the embedded KMS emitted, by event id, replicated until
/// their key's owner has recorded them: a node that dies between a KMS change
/// and publishing its event leaves the event to the partition's next owner.
const EMITTED: &[u8] = b"v/";
/// Data-plane commands another node queued, replicated until that node has
/// sent them (it then writes a tombstone): a partition's next owner sends
/// what a dead owner left unsent. A node's own queue is its outbox.
const COMMANDS: &[u8] = b"c/";

/// The replicated name of a queued command: the same on every node, derived
/// from what the command is (the relay's command ids are derived alike).
fn command_key(effect: &Effect) -> Option<(String, Vec<u8>)> {
    let (key_id, name) = match effect {
        Effect::KeyCommands { key_id, action, cause_event_id, .. } => (key_id, format!("{cause_event_id}/{action:?}/key")),
        Effect::InstanceCommand { key_id, instance_id, action, cause_event_id, .. } => (key_id, format!("{cause_event_id}/{action:?}/{instance_id}")),
        _ => return None,
    };
    Some((key_id.clone(), k(COMMANDS, &name)))
}

/// One state change as it goes to the changelog: the store's own key and value,
/// and what decides its partition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    pub route: Route,
    pub key: Vec<u8>,
    /// None deletes the record (a tombstone, which compaction also removes).
    pub value: Option<Vec<u8>>,
}

/// One changelog entry as the replica read it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Replicated {
    pub partition: i32,
    pub offset: i64,
    pub key: Vec<u8>,
    /// None: a tombstone.
    pub value: Option<Vec<u8>>,
}

fn replica_key(partition: i32) -> Vec<u8> {
    let mut key = REPLICA.to_vec();
    key.extend_from_slice(&partition.to_be_bytes());
    key
}

/// A change belongs to its key's partition; a partition offset to its own.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    Key(String),
    Partition(i32),
}

fn k(prefix: &[u8], id: &str) -> Vec<u8> {
    let mut v = Vec::with_capacity(prefix.len() + id.len());
    v.extend_from_slice(prefix);
    v.extend_from_slice(id.as_bytes());
    v
}

fn index_key(key_id: &str, instance_id: &str) -> Vec<u8> {
    let mut v = k(INDEX, key_id);
    v.push(0);
    v.extend_from_slice(instance_id.as_bytes());
    v
}

fn offset_key(topic: &str, partition: i32) -> Vec<u8> {
    let mut v = k(OFFSET, topic);
    v.push(0);
    v.extend_from_slice(&partition.to_be_bytes());
    v
}

fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    serde_json::to_vec(value).expect("records always serialize")
}

/// A store that cannot be read is a fatal fault: deciding on partial state could
/// apply an event twice or lose a DEK, so the daemon stops instead.
fn decode<T: DeserializeOwned>(bytes: &[u8]) -> T {
    serde_json::from_slice(bytes).unwrap_or_else(|e| panic!("store record is corrupt ({e}); restore the store from a backup"))
}

fn read(r: sled::Result<Option<sled::IVec>>) -> Option<sled::IVec> {
    r.unwrap_or_else(|e| panic!("store read failed ({e}); check the disk"))
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

/// The two fields a tally needs; serde skips the rest (and the DEK's bytes)
/// without building them.
#[derive(serde::Deserialize)]
struct TallyFields {
    key_id: String,
    wrapped: Option<serde::de::IgnoredAny>,
}

#[derive(Clone)]
pub struct Store {
    db: sled::Db,
    tree: sled::Tree,
    /// Seq and hash of the newest audit entry. Held while a batch with audit
    /// facts is sealed and applied, so that the chain stays one line.
    audit_chain: std::sync::Arc<std::sync::Mutex<Option<(u64, String)>>>,
    /// With several nodes: writes each batch's state changes to the changelog
    /// topic, and returns only once the broker has them, before the batch is
    /// applied here. The changelog is the write-ahead log: a node that dies
    /// after publishing loses nothing the others (or it, restarted) cannot read.
    publisher: std::sync::Arc<std::sync::OnceLock<Publisher>>,
    /// Held from publishing a batch until it is applied, and while replicated
    /// entries are applied: the replica's position check and this node's own
    /// writes never interleave, so an older entry never overwrites a newer one.
    changelog: std::sync::Arc<std::sync::Mutex<()>>,
    /// Which keys' KMS reads notices; set once by the daemon. Unset: all are kept.
    wants_notices: std::sync::Arc<std::sync::OnceLock<NoticeFilter>>,
}

/// Publishes changes and returns, per partition, the offset after the last
/// one. Past the deadline, if the broker has confirmed none of them, gives up.
pub type Publisher = Box<dyn Fn(&[Change], Option<std::time::Instant>) -> Result<Vec<(i32, i64)>, PublishError> + Send + Sync>;

#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    /// None of the changes was confirmed by the deadline; those not yet sent
    /// were withdrawn.
    #[error("{0}")]
    Unconfirmed(String),
    #[error("{0}")]
    Failed(String),
}

pub type NoticeFilter = Box<dyn Fn(&str) -> bool + Send + Sync>;

impl Store {
    /// Waits up to two seconds for the store's lock: a process that is just
    /// exiting (or a handle just dropped) may still hold it. A second daemon on
    /// the same store still fails, with the lock error.
    pub fn open(path: &Path) -> Result<Store, StoreError> {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
        let db = loop {
            match sled::Config::new().path(path).flush_every_ms(Some(1000)).open() {
                Ok(db) => break db,
                Err(e) if e.to_string().contains("could not acquire lock") && std::time::Instant::now() < deadline => {
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
                Err(source) => return Err(StoreError::Open { path: path.display().to_string(), source }),
            }
        };
        let tree = db.open_tree("state").map_err(|source| StoreError::Open { path: path.display().to_string(), source })?;
        let last = tree.scan_prefix(AUDIT).next_back().map(|kv| {
            let e: audit::AuditEntry = decode(&kv.unwrap_or_else(|e| panic!("store read failed ({e}); check the disk")).1);
            (e.seq, e.hash)
        });
        Ok(Store {
            db,
            tree,
            audit_chain: std::sync::Arc::new(std::sync::Mutex::new(last)),
            publisher: Default::default(),
            changelog: Default::default(),
            wants_notices: Default::default(),
        })
    }

    /// Notices for keys whose KMS ignores them are dropped instead of queued.
    pub fn keep_notices_only_for(&self, wants: NoticeFilter) {
        let _ = self.wants_notices.set(wants);
    }

    /// Applies the records atomically; with `flush`, returns only once they are durable.
    pub fn commit(&self, records: &[Record], flush: bool) -> Result<(), StoreError> {
        self.commit_until(records, flush, None)
    }

    /// As `commit`; with a deadline, gives up with `Unavailable` (nothing
    /// applied, nothing written) if the changelog has confirmed none of the
    /// batch by then.
    pub fn commit_until(&self, records: &[Record], flush: bool, deadline: Option<std::time::Instant>) -> Result<(), StoreError> {
        let (mut batch, changes) = self.batch(records)?;
        let _published = self.publish(&changes, &mut batch, deadline)?;
        let facts: Vec<_> = records.iter().filter_map(|r| if let Record::Audit(f) = r { Some(f.clone()) } else { None }).collect();
        if facts.is_empty() {
            self.tree.apply_batch(batch)?;
        } else {
            let mut chain = self.audit_chain.lock().expect("audit chain lock");
            let entries = audit::seal(chain.as_ref(), facts, chrono::Utc::now());
            for e in &entries {
                let mut key = AUDIT.to_vec();
                key.extend_from_slice(&e.seq.to_be_bytes());
                batch.insert(key, encode(e));
            }
            self.tree.apply_batch(batch)?;
            *chain = entries.last().map(|e| (e.seq, e.hash.clone()));
        }
        if flush {
            self.tree.flush()?;
        }
        Ok(())
    }

    /// Turns the changelog on (once).
    pub fn set_publisher(&self, publisher: Publisher) {
        let _ = self.publisher.set(publisher);
    }

    /// Writes the changes to the changelog (with one configured) and adds to
    /// the batch the replica positions they moved, so this node's replica
    /// skips its own entries. The guard must be held until the batch is applied.
    fn publish(
        &self,
        changes: &[Change],
        batch: &mut sled::Batch,
        deadline: Option<std::time::Instant>,
    ) -> Result<Option<std::sync::MutexGuard<'_, ()>>, StoreError> {
        let Some(publish) = self.publisher.get() else { return Ok(None) };
        if changes.is_empty() {
            return Ok(None);
        }
        let guard = self.changelog.lock().expect("changelog lock");
        let written = publish(changes, deadline).map_err(|e| match e {
            PublishError::Unconfirmed(why) => StoreError::Unavailable(why),
            PublishError::Failed(why) => StoreError::Changelog(why),
        })?;
        for (partition, next) in written {
            if self.replica_position(partition).is_none_or(|at| next > at) {
                batch.insert(replica_key(partition), &next.to_be_bytes()[..]);
            }
        }
        Ok(Some(guard))
    }

    fn batch(&self, records: &[Record]) -> Result<(sled::Batch, Vec<Change>), StoreError> {
        let mut batch = sled::Batch::default();
        let mut changes = Vec::new();
        // Queued commands are replicated, not stored here: this node's copy is its outbox entry.
        let mut commands = Vec::new();
        let mut put = |batch: &mut sled::Batch, route: Route, key: Vec<u8>, value: Vec<u8>| {
            batch.insert(key.clone(), value.clone());
            changes.push(Change { route, key, value: Some(value) });
        };
        for r in records {
            match r {
                Record::Key(key) => put(&mut batch, Route::Key(key.key_id.clone()), k(KEY, &key.key_id), encode(key)),
                Record::Instance(inst) => {
                    put(&mut batch, Route::Key(inst.key_id.clone()), index_key(&inst.key_id, &inst.instance_id), vec![]);
                    put(&mut batch, Route::Key(inst.key_id.clone()), k(INSTANCE, &inst.instance_id), encode(inst));
                }
                Record::Event(e) => put(&mut batch, Route::Key(e.key_id.clone()), k(EVENT, &e.event_id), encode(e)),
                Record::Job(j) => put(&mut batch, Route::Key(j.key_id.clone()), k(JOB, &j.key_id), encode(j)),
                Record::Outbox(Effect::Alert(alert)) => {
                    match alert.ends_at {
                        None => batch.insert(k(FIRING, &alert.fingerprint()), encode(alert)),
                        Some(_) => batch.remove(k(FIRING, &alert.fingerprint())),
                    }
                    let mut key = ALERTS.to_vec();
                    key.extend_from_slice(&self.db.generate_id()?.to_be_bytes());
                    batch.insert(key, encode(&Effect::Alert(alert.clone())));
                }
                Record::Outbox(Effect::KmsNotice { key_id, .. }) if self.wants_notices.get().is_some_and(|wants| !wants(key_id)) => {}
                Record::Outbox(effect) => {
                    if let Some((key_id, name)) = command_key(effect) {
                        commands.push(Change { route: Route::Key(key_id), key: name, value: Some(encode(effect)) });
                    }
                    // generate_id is monotonic across restarts, so the outbox keeps commit order.
                    let id = self.db.generate_id()?;
                    let prefix = if matches!(effect, Effect::KmsNotice { .. }) { NOTICES } else { OUTBOX };
                    let mut key = prefix.to_vec();
                    key.extend_from_slice(&id.to_be_bytes());
                    batch.insert(key, encode(effect));
                }
                Record::Offset { topic, partition, next } => {
                    put(&mut batch, Route::Partition(*partition), offset_key(topic, *partition), next.to_be_bytes().to_vec())
                }
                // Sealed by `commit`, which holds the chain; each node's trail is its own.
                Record::Audit(_) => {}
            }
        }
        changes.extend(commands);
        Ok((batch, changes))
    }

    /// Applies changelog entries, in their partition's order, that are not
    /// already here (an entry below the partition's position was written by this
    /// node, or applied before), and moves the positions past them, in one
    /// batch. Returns the entries applied.
    pub fn apply_replicated<'a>(&self, entries: &'a [Replicated], flush: bool) -> Result<Vec<&'a Replicated>, StoreError> {
        let _guard = self.changelog.lock().expect("changelog lock");
        let mut positions: HashMap<i32, Option<i64>> = HashMap::new();
        let mut batch = sled::Batch::default();
        let mut applied = Vec::new();
        for e in entries {
            let at = positions.entry(e.partition).or_insert_with(|| self.replica_position(e.partition));
            if at.is_some_and(|at| e.offset < at) {
                continue;
            }
            match &e.value {
                Some(value) => batch.insert(e.key.clone(), value.clone()),
                None => batch.remove(e.key.clone()),
            }
            *at = Some(e.offset + 1);
            applied.push(e);
        }
        for (partition, at) in positions {
            if let Some(next) = at {
                batch.insert(replica_key(partition), &next.to_be_bytes()[..]);
            }
        }
        self.tree.apply_batch(batch)?;
        if flush {
            self.tree.flush()?;
        }
        Ok(applied)
    }

    /// Tells every node, through the changelog, that this node now writes the
    /// keys of `partition` and takes their writes at `url`.
    pub fn announce_owner(&self, partition: i32, url: &str) -> Result<(), StoreError> {
        let mut key = OWNER.to_vec();
        key.extend_from_slice(&partition.to_be_bytes());
        let change = Change { route: Route::Partition(partition), key: key.clone(), value: Some(url.as_bytes().to_vec()) };
        let mut batch = sled::Batch::default();
        let _published = self.publish(std::slice::from_ref(&change), &mut batch, None)?;
        batch.insert(key, url.as_bytes());
        self.tree.apply_batch(batch)?;
        self.tree.flush()?;
        Ok(())
    }

    pub fn owner_url(&self, partition: i32) -> Option<String> {
        let mut key = OWNER.to_vec();
        key.extend_from_slice(&partition.to_be_bytes());
        read(self.tree.get(key)).map(|v| String::from_utf8_lossy(&v).into_owned())
    }

    pub fn replica_position(&self, partition: i32) -> Option<i64> {
        read(self.tree.get(replica_key(partition))).map(|v| i64::from_be_bytes(v.as_ref().try_into().expect("position is 8 bytes")))
    }

    pub fn flush(&self) -> Result<(), StoreError> {
        self.tree.flush()?;
        Ok(())
    }

    pub fn offset(&self, topic: &str, partition: i32) -> Option<i64> {
        read(self.tree.get(offset_key(topic, partition))).map(|v| i64::from_be_bytes(v.as_ref().try_into().expect("offset is 8 bytes")))
    }

    pub fn event(&self, event_id: &str) -> Option<EventRecord> {
        read(self.tree.get(k(EVENT, event_id))).map(|v| decode(&v))
    }

    fn scan<T: DeserializeOwned>(&self, prefix: &[u8]) -> Vec<T> {
        self.tree.scan_prefix(prefix).map(|kv| decode(&kv.unwrap_or_else(|e| panic!("store read failed ({e}); check the disk")).1)).collect()
    }

    pub fn keys(&self) -> Vec<KeyRecord> {
        self.scan(KEY)
    }

    pub fn jobs(&self) -> Vec<RotationJob> {
        self.scan(JOB)
    }

    pub fn instances(&self) -> Vec<InstanceRecord> {
        self.scan(INSTANCE)
    }

    pub fn instance_ids_of(&self, key_id: &str) -> Vec<String> {
        let mut prefix = k(INDEX, key_id);
        prefix.push(0);
        self.tree
            .scan_prefix(&prefix)
            .keys()
            .map(|key| {
                let key = key.unwrap_or_else(|e| panic!("store read failed ({e}); check the disk"));
                String::from_utf8_lossy(&key[prefix.len()..]).into_owned()
            })
            .collect()
    }

    /// The oldest `limit` effects waiting to be published, with their ids.
    pub fn outbox(&self, limit: usize) -> Vec<(u64, Effect)> {
        self.queue(OUTBOX, limit)
    }

    /// The oldest `limit` notices waiting for their KMS, with their ids.
    pub fn notices(&self, limit: usize) -> Vec<(u64, Effect)> {
        self.queue(NOTICES, limit)
    }

    fn queue(&self, prefix: &[u8], limit: usize) -> Vec<(u64, Effect)> {
        self.tree
            .scan_prefix(prefix)
            .take(limit)
            .map(|kv| {
                let (key, value) = kv.unwrap_or_else(|e| panic!("store read failed ({e}); check the disk"));
                let id = u64::from_be_bytes(key[prefix.len()..].try_into().expect("queue id is 8 bytes"));
                (id, decode(&value))
            })
            .collect()
    }

    /// Counted, not decoded, so that a status line every few seconds stays cheap.
    pub fn census(&self) -> Census {
        let count = |prefix: &[u8]| self.tree.scan_prefix(prefix).keys().count();
        Census { keys: count(KEY), instances: count(INSTANCE), outbox: count(OUTBOX) }
    }

    /// Per key, instances that hold a wrapped DEK and destroyed ones. Reads every
    /// instance record, but decodes only two fields of each.
    pub fn instance_tally(&self) -> HashMap<String, Tally> {
        let mut tally: HashMap<String, Tally> = HashMap::new();
        for kv in self.tree.scan_prefix(INSTANCE) {
            let fields: TallyFields = decode(&kv.unwrap_or_else(|e| panic!("store read failed ({e}); check the disk")).1);
            let t = tally.entry(fields.key_id).or_default();
            if fields.wrapped.is_some() {
                t.with_dek += 1;
            } else {
                t.destroyed += 1;
            }
        }
        tally
    }

    pub fn outbox_len(&self) -> usize {
        self.tree.scan_prefix(OUTBOX).count()
    }

    /// Not flushed: an effect published twice after a crash is deduplicated by its
    /// stable id downstream, and one flush per relay round is enough.
    pub fn outbox_remove(&self, ids: &[u64]) -> Result<(), StoreError> {
        if self.publisher.get().is_none() {
            return self.queue_remove(OUTBOX, ids);
        }
        // Sent: the other nodes forget their copies.
        let mut batch = sled::Batch::default();
        let mut tombstones = Vec::new();
        for id in ids {
            let mut key = OUTBOX.to_vec();
            key.extend_from_slice(&id.to_be_bytes());
            if let Some(value) = read(self.tree.get(&key)) {
                if let Some((key_id, name)) = command_key(&decode(&value)) {
                    tombstones.push(Change { route: Route::Key(key_id), key: name, value: None });
                }
            }
            batch.remove(key);
        }
        let _published = self.publish(&tombstones, &mut batch, None)?;
        self.tree.apply_batch(batch)?;
        Ok(())
    }

    /// Commands another node queued for keys `mine` selects and never confirmed
    /// sent: moved into this node's outbox (sent again with the same command
    /// ids, so the data plane can deduplicate them).
    pub fn adopt_commands(&self, mine: impl Fn(&str) -> bool) -> Result<usize, StoreError> {
        let mut adopted = Vec::new();
        let mut names = Vec::new();
        for kv in self.tree.scan_prefix(COMMANDS) {
            let (name, value) = kv?;
            let effect: Effect = decode(&value);
            if command_key(&effect).is_some_and(|(key_id, _)| mine(&key_id)) {
                names.push(name.to_vec());
                adopted.push(Record::Outbox(effect));
            }
        }
        if adopted.is_empty() {
            return Ok(0);
        }
        // Each is queued here under the same name, which replaces the copy.
        let (mut batch, changes) = self.batch(&adopted)?;
        for name in names {
            batch.remove(name);
        }
        let _published = self.publish(&changes, &mut batch, None)?;
        self.tree.apply_batch(batch)?;
        self.tree.flush()?;
        Ok(adopted.len())
    }

    pub fn notices_remove(&self, ids: &[u64]) -> Result<(), StoreError> {
        self.queue_remove(NOTICES, ids)
    }

    /// The oldest `limit` alerts waiting for their sinks, with their ids.
    pub fn alert_queue(&self, limit: usize) -> Vec<(u64, Effect)> {
        self.queue(ALERTS, limit)
    }

    pub fn alert_queue_remove(&self, ids: &[u64]) -> Result<(), StoreError> {
        self.queue_remove(ALERTS, ids)?;
        self.tree.flush()?;
        Ok(())
    }

    fn queue_remove(&self, prefix: &[u8], ids: &[u64]) -> Result<(), StoreError> {
        let mut batch = sled::Batch::default();
        for id in ids {
            let mut key = prefix.to_vec();
            key.extend_from_slice(&id.to_be_bytes());
            batch.remove(key);
        }
        self.tree.apply_batch(batch)?;
        Ok(())
    }

    /// Alerts firing now (raised and not yet resolved).
    pub fn firing_alerts(&self) -> Vec<crate::engine::Alert> {
        self.scan(FIRING)
    }

    /// Audit entries after `since` (oldest first), at most `limit`.
    pub fn audit_since(&self, since: Option<chrono::DateTime<chrono::Utc>>, limit: usize) -> Vec<audit::AuditEntry> {
        self.tree
            .scan_prefix(AUDIT)
            .map(|kv| decode::<audit::AuditEntry>(&kv.unwrap_or_else(|e| panic!("store read failed ({e}); check the disk")).1))
            .filter(|e| since.is_none_or(|t| e.at >= t))
            .take(limit)
            .collect()
    }

    /// The newest `limit` audit entries, oldest first.
    pub fn audit(&self, limit: usize) -> Vec<audit::AuditEntry> {
        let mut v: Vec<audit::AuditEntry> = self
            .tree
            .scan_prefix(AUDIT)
            .rev()
            .take(limit)
            .map(|kv| decode(&kv.unwrap_or_else(|e| panic!("store read failed ({e}); check the disk")).1))
            .collect();
        v.reverse();
        v
    }

    /// Embedded-KMS material. The KMS owns the bytes; the store only keeps them.
    pub fn kms_get(&self, key_id: &str) -> Option<Vec<u8>> {
        read(self.tree.get(k(KMS, key_id))).map(|v| v.to_vec())
    }

    /// Writes KMS material and the lifecycle event it implies in one durable batch,
    /// so that a key change is never made without its event being published.
    pub fn kms_put(&self, key_id: &str, material: Vec<u8>, event: Option<Effect>, deadline: Option<std::time::Instant>) -> Result<(), StoreError> {
        let (mut batch, _) = self.batch(event.iter().cloned().map(Record::Outbox).collect::<Vec<_>>().as_slice())?;
        // Other nodes unwrap with the same material (sealed under the shared master key).
        let mut changes = vec![Change { route: Route::Key(key_id.to_string()), key: k(KMS, key_id), value: Some(material.clone()) }];
        if let Some(effect @ Effect::LifecycleEvent { payload, .. }) = &event {
            let event_id = serde_json::from_str::<serde_json::Value>(payload).ok().and_then(|v| v["event_id"].as_str().map(str::to_owned)).unwrap_or_default();
            let value = encode(effect);
            batch.insert(k(EMITTED, &event_id), value.clone());
            changes.push(Change { route: Route::Key(key_id.to_string()), key: k(EMITTED, &event_id), value: Some(value) });
        }
        let _published = self.publish(&changes, &mut batch, deadline)?;
        batch.insert(k(KMS, key_id), material);
        self.tree.apply_batch(batch)?;
        self.tree.flush()?;
        Ok(())
    }

    /// Lifecycle events the embedded KMS emitted for keys `mine` selects that
    /// no event record shows applied; those that are applied are forgotten here.
    pub fn unapplied_emissions(&self, mine: impl Fn(&str) -> bool) -> Result<Vec<Effect>, StoreError> {
        let mut pending = Vec::new();
        let mut done = sled::Batch::default();
        for kv in self.tree.scan_prefix(EMITTED) {
            let (key, value) = kv?;
            let event_id = String::from_utf8_lossy(&key[EMITTED.len()..]).into_owned();
            if self.tree.contains_key(k(EVENT, &event_id))? {
                done.remove(key);
                continue;
            }
            let effect: Effect = decode(&value);
            if matches!(&effect, Effect::LifecycleEvent { key_id, .. } if mine(key_id)) {
                pending.push(effect);
            }
        }
        self.tree.apply_batch(done)?;
        Ok(pending)
    }

    pub fn kms_keys(&self) -> Vec<String> {
        self.tree
            .scan_prefix(KMS)
            .keys()
            .map(|key| {
                let key = key.unwrap_or_else(|e| panic!("store read failed ({e}); check the disk"));
                String::from_utf8_lossy(&key[KMS.len()..]).into_owned()
            })
            .collect()
    }
}

impl View for Store {
    fn key(&self, key_id: &str) -> Option<KeyRecord> {
        read(self.tree.get(k(KEY, key_id))).map(|v| decode(&v))
    }

    fn instance(&self, instance_id: &str) -> Option<InstanceRecord> {
        read(self.tree.get(k(INSTANCE, instance_id))).map(|v| decode(&v))
    }

    fn event_seen(&self, event_id: &str) -> bool {
        self.tree.contains_key(k(EVENT, event_id)).unwrap_or_else(|e| panic!("store read failed ({e}); check the disk"))
    }

    fn job(&self, key_id: &str) -> Option<RotationJob> {
        read(self.tree.get(k(JOB, key_id))).map(|v| decode(&v))
    }

    fn instances_of(&self, key_id: &str) -> Vec<InstanceRecord> {
        self.instance_ids_of(key_id).iter().filter_map(|id| self.instance(id)).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::{CommandAction, KeyStatus, WrappedDek};
    use chrono::Utc;

    fn inst(id: &str, key: &str) -> InstanceRecord {
        InstanceRecord {
            instance_id: id.into(),
            key_id: key.into(),
            wrapped: Some(WrappedDek { key_version: "1".into(), ciphertext: vec![1] }),
            key_version: "1".into(),
            dek_fingerprint: "f".into(),
            created_at: Utc::now(),
            updated_at: Utc::now(),
            destroyed_at: None,
            destroyed_reason: None,
            rewrap_error: None,
        }
    }

    #[test]
    fn census_counts_keys_and_instances_but_not_their_index() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path()).unwrap();
        s.commit(&[Record::Key(KeyRecord::new("k", Utc::now())), Record::Instance(inst("a", "k")), Record::Instance(inst("b", "k"))], false).unwrap();
        assert_eq!(s.census(), Census { keys: 1, instances: 2, outbox: 0 });
    }

    #[test]
    fn tally_counts_dek_holders_and_destroyed_instances_per_key() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path()).unwrap();
        let mut gone = inst("c", "k");
        gone.wrapped = None;
        s.commit(&[Record::Instance(inst("a", "k")), Record::Instance(inst("b", "j")), Record::Instance(gone)], false).unwrap();
        let t = s.instance_tally();
        assert_eq!(t["k"], Tally { with_dek: 1, destroyed: 1 });
        assert_eq!(t["j"], Tally { with_dek: 1, destroyed: 0 });
    }

    #[test]
    fn committed_batch_survives_reopen_with_its_offset() {
        let dir = tempfile::tempdir().unwrap();
        {
            let s = Store::open(dir.path()).unwrap();
            let mut key = KeyRecord::new("k", Utc::now());
            key.status = KeyStatus::Disabled;
            s.commit(
                &[
                    Record::Key(key),
                    Record::Instance(inst("a", "k")),
                    Record::Instance(inst("b", "k")),
                    Record::Offset { topic: "t".into(), partition: 2, next: 41 },
                ],
                true,
            )
            .unwrap();
        }
        let s = Store::open(dir.path()).unwrap();
        assert_eq!(s.key("k").unwrap().status, KeyStatus::Disabled);
        assert_eq!(s.instance_ids_of("k"), vec!["a".to_string(), "b".to_string()]);
        assert_eq!(s.offset("t", 2), Some(41));
        assert_eq!(s.offset("t", 1), None);
    }

    /// A fake changelog: one partition, entries appended in order.
    fn changelog(s: &Store) -> std::sync::Arc<std::sync::Mutex<Vec<Replicated>>> {
        let log = std::sync::Arc::new(std::sync::Mutex::new(Vec::<Replicated>::new()));
        let writer = log.clone();
        s.set_publisher(Box::new(move |changes, _deadline| {
            let mut log = writer.lock().unwrap();
            for c in changes {
                let offset = log.len() as i64;
                log.push(Replicated { partition: 0, offset, key: c.key.clone(), value: c.value.clone() });
            }
            Ok(vec![(0, log.len() as i64)])
        }));
        log
    }

    #[test]
    fn replica_skips_its_own_entries_and_applies_the_next_owners() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path()).unwrap();
        let log = changelog(&s);
        s.commit(&[Record::Key(KeyRecord::new("k", Utc::now()))], true).unwrap();
        let mut disabled = KeyRecord::new("k", Utc::now());
        disabled.status = KeyStatus::Disabled;
        s.commit(&[Record::Key(disabled.clone())], true).unwrap();
        // This node's own entries, read back late, never undo its newer change.
        let own = log.lock().unwrap().clone();
        assert!(s.apply_replicated(&own, true).unwrap().is_empty());
        assert_eq!(s.key("k").unwrap().status, KeyStatus::Disabled);
        // Another owner's later entry is applied, whoever this node thinks owns the key.
        let enabled = Replicated { partition: 0, offset: own.len() as i64, key: k(KEY, "k"), value: Some(encode(&KeyRecord::new("k", Utc::now()))) };
        assert_eq!(s.apply_replicated(std::slice::from_ref(&enabled), true).unwrap().len(), 1);
        assert_eq!(s.key("k").unwrap().status, KeyStatus::Active);
        assert_eq!(s.replica_position(0), Some(own.len() as i64 + 1));
    }

    #[test]
    fn an_entry_published_but_not_applied_before_a_crash_is_applied_from_the_changelog() {
        let dir = tempfile::tempdir().unwrap();
        let published = {
            let s = Store::open(dir.path()).unwrap();
            let log = changelog(&s);
            s.commit(&[Record::Key(KeyRecord::new("k", Utc::now()))], true).unwrap();
            let entries = log.lock().unwrap().clone();
            entries
        };
        // The same store before that commit: the write-ahead entry is all there is.
        let fresh = tempfile::tempdir().unwrap();
        let s = Store::open(fresh.path()).unwrap();
        assert!(s.key("k").is_none());
        assert_eq!(s.apply_replicated(&published, true).unwrap().len(), published.len());
        assert_eq!(s.key("k").unwrap().status, KeyStatus::Active);
    }

    #[test]
    fn an_emitted_event_stays_pending_until_an_event_record_shows_it_applied() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path()).unwrap();
        let emit = |id: &str, key: &str| Effect::LifecycleEvent { key_id: key.into(), payload: format!(r#"{{"event_id":"{id}"}}"#) };
        s.kms_put("a", b"{}".to_vec(), Some(emit("e1", "a")), None).unwrap();
        s.kms_put("b", b"{}".to_vec(), Some(emit("e2", "b")), None).unwrap();
        assert_eq!(s.unapplied_emissions(|k| k == "a").unwrap(), vec![emit("e1", "a")]);
        let applied = EventRecord {
            event_id: "e1".into(),
            key_id: "a".into(),
            kind: crate::engine::EventType::Disable,
            occurred_at: Utc::now(),
            applied_at: Utc::now(),
            outcome: crate::engine::Outcome::Applied,
            detail: String::new(),
            correlation_id: None,
        };
        s.commit(&[Record::Event(applied)], true).unwrap();
        assert!(s.unapplied_emissions(|k| k == "a").unwrap().is_empty());
        assert_eq!(s.unapplied_emissions(|_| true).unwrap(), vec![emit("e2", "b")]);
    }

    #[test]
    fn commands_a_dead_owner_left_unsent_are_adopted_by_the_next_and_forgotten_once_sent() {
        let (d1, d2) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let (owner, next) = (Store::open(d1.path()).unwrap(), Store::open(d2.path()).unwrap());
        let log = changelog(&owner);
        let at = Utc::now();
        let revoke = |key: &str| Effect::KeyCommands {
            key_id: key.into(),
            action: CommandAction::Revoke,
            key_version: None,
            cause_event_id: format!("ev-{key}"),
            issued_at: at,
            correlation_id: None,
            traceparent: None,
        };
        owner.commit(&[Record::Outbox(revoke("a")), Record::Outbox(revoke("b"))], true).unwrap();
        // "b" was sent before the owner died; "a" was not.
        let b = owner.outbox(10).into_iter().find(|(_, e)| *e == revoke("b")).unwrap().0;
        owner.outbox_remove(&[b]).unwrap();
        let entries = log.lock().unwrap().clone();
        next.apply_replicated(&entries, true).unwrap();
        assert_eq!(next.outbox_len(), 0, "a copy is not sent by a node that does not own the key");
        assert_eq!(next.adopt_commands(|_| true).unwrap(), 1);
        assert_eq!(next.outbox(10).into_iter().map(|(_, e)| e).collect::<Vec<_>>(), vec![revoke("a")]);
        assert_eq!(next.adopt_commands(|_| true).unwrap(), 0, "adopted once");
    }

    #[test]
    fn outbox_keeps_commit_order_and_forgets_what_was_sent() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path()).unwrap();
        let effect = |n: &str| Effect::KeyCommands {
            key_id: n.into(),
            action: CommandAction::Revoke,
            key_version: None,
            cause_event_id: n.into(),
            issued_at: Utc::now(),
            correlation_id: None,
            traceparent: None,
        };
        s.commit(&[Record::Outbox(effect("a")), Record::Outbox(effect("b"))], true).unwrap();
        s.commit(&[Record::Outbox(effect("c"))], true).unwrap();
        let out = s.outbox(10);
        let names: Vec<_> = out
            .iter()
            .map(|(_, e)| match e {
                Effect::KeyCommands { key_id, .. } => key_id.clone(),
                _ => unreachable!(),
            })
            .collect();
        assert_eq!(names, ["a", "b", "c"]);
        s.outbox_remove(&[out[0].0]).unwrap();
        assert_eq!(s.outbox_len(), 2);
    }
}
