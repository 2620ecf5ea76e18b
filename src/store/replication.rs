//! What the store sends to the changelog and takes from it: every state change
//! as the store's own key and value, and the replica's position in each
//! changelog partition, kept with the changes it covers.

use std::collections::HashMap;

use super::schema::*;
use super::{Staged, Store, StoreError};

/// One state change as it goes to the changelog: the store's own key and value,
/// and what decides its partition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    pub route: Route,
    pub key: Vec<u8>,
    /// None deletes the record (a tombstone, which compaction also removes).
    pub value: Option<Vec<u8>>,
}

/// A change belongs to its key's partition; a partition offset to its own.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    Key(String),
    Partition(i32),
}

/// A change as it is published: in its partition, under its version (see
/// `cluster::changelog`), fixed when the batch is committed so that a retry,
/// also after a restart, sends the same bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Versioned {
    pub partition: i32,
    pub version: i64,
    pub key: Vec<u8>,
    pub value: Option<Vec<u8>>,
}

/// Unpublished batches the changelog has confirmed: their queue entries go,
/// and the replica's positions move past what was written.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Published {
    pub ids: Vec<u64>,
    pub written: Vec<crate::cluster::Written>,
}

/// One changelog entry as the replica read it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Replicated {
    pub partition: i32,
    pub offset: i64,
    pub key: Vec<u8>,
    /// None: a tombstone.
    pub value: Option<Vec<u8>>,
    /// The record's version, if its MAC under the cluster secret checked out
    /// (None: missing or forged, and the record is refused).
    pub authentic: Option<i64>,
}

/// A changelog record refused: never applied, its offset passed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refused {
    pub partition: i32,
    pub offset: i64,
    /// The store key, printable.
    pub key: String,
    /// A fixed label: `changelog_forged`, `changelog_replayed`,
    /// `changelog_prefix` or `changelog_corrupt`.
    pub reason: &'static str,
}

impl Store {
    pub fn replica_position(&self, partition: i32) -> Result<Option<i64>, StoreError> {
        let key = partition_key(REPLICA, partition);
        self.get(&key)?.map(|v| number(&key, &v)).transpose()
    }

    /// The API URL of the node that announced itself as the partition's owner.
    pub fn owner_url(&self, partition: i32) -> Result<Option<String>, StoreError> {
        Ok(self.get(&partition_key(OWNER, partition))?.map(|v| String::from_utf8_lossy(&v).into_owned()))
    }

    /// The last changelog version accepted or written for the partition (0: none).
    pub fn changelog_version(&self, partition: i32) -> Result<i64, StoreError> {
        let key = partition_key(VERSION, partition);
        Ok(self.get(&key)?.map(|v| number(&key, &v)).transpose()?.unwrap_or(0))
    }

    /// The last version of this node's own records the broker confirmed for
    /// the partition; without a record of it, the last version accepted
    /// (nothing of this node's is unconfirmed).
    pub fn changelog_published(&self, partition: i32) -> Result<i64, StoreError> {
        let key = partition_key(PUBLISHED, partition);
        match self.get(&key)? {
            Some(v) => number(&key, &v),
            None => self.changelog_version(partition),
        }
    }

    /// A group of one's unpublished batches, oldest first: those after
    /// `after` up to `until`, at most `limit`.
    pub fn unpublished(&self, after: Option<u64>, until: u64, limit: usize) -> Result<Vec<(u64, Vec<Versioned>)>, StoreError> {
        let from = queue_key(UNPUBLISHED, after.map_or(0, |a| a.saturating_add(1)));
        let mut out = Vec::new();
        for kv in self.tree.range(from..=queue_key(UNPUBLISHED, until)).take(limit) {
            let (key, value) = kv.map_err(StoreError::Read)?;
            let id = key.get(UNPUBLISHED.len()..).and_then(|b| <[u8; 8]>::try_from(b).ok()).map(u64::from_be_bytes);
            let Some(id) = id else { continue };
            out.push((id, decode_versioned(&key, &value)?));
        }
        Ok(out)
    }

    /// The id of the newest unpublished batch.
    pub fn last_unpublished(&self) -> Result<Option<u64>, StoreError> {
        match self.tree.scan_prefix(UNPUBLISHED).keys().next_back() {
            None => Ok(None),
            Some(key) => {
                let key = key.map_err(StoreError::Read)?;
                Ok(key.get(UNPUBLISHED.len()..).and_then(|b| <[u8; 8]>::try_from(b).ok()).map(u64::from_be_bytes))
            }
        }
    }

    /// Drops confirmed batches from the unpublished queue and moves the
    /// replica's positions past them, so that the replica skips them by
    /// offset and counts a copy of them below the confirmed version as a replay.
    pub fn stage_published(&self, staged: &mut Staged, published: &[Published]) -> Result<(), StoreError> {
        for p in published {
            for id in &p.ids {
                staged.batch.remove(queue_key(UNPUBLISHED, *id));
            }
            for w in &p.written {
                let at = match staged.positions.get(&w.partition) {
                    Some(at) => *at,
                    None => self.replica_position(w.partition)?,
                };
                if at.is_none_or(|at| w.next > at) {
                    staged.positions.insert(w.partition, Some(w.next));
                    staged.batch.insert(partition_key(REPLICA, w.partition), &w.next.to_be_bytes()[..]);
                }
                let confirmed = self.changelog_published(w.partition)?.max(w.version);
                staged.batch.insert(partition_key(PUBLISHED, w.partition), &confirmed.to_be_bytes()[..]);
            }
        }
        Ok(())
    }

    /// Changelog entries, in their partition's order, that are not already
    /// here (an entry below the partition's position was written by this node,
    /// or applied before), and the positions moved past them. An entry that
    /// is not authentic, not newer than the last one accepted for its
    /// partition, of a prefix replication does not carry, or whose value does
    /// not decode, is refused and passed. Returns how many were applied, and
    /// the refused.
    pub fn stage_replicated(&self, staged: &mut Staged, entries: &[Replicated]) -> Result<(usize, Vec<Refused>), StoreError> {
        let mut applied = 0;
        let mut refused = Vec::new();
        // What the broker had confirmed of this node's own records before the
        // batch, read once per partition: a group of one reads back every
        // record it published, and this was a store read per record.
        let mut confirmed: HashMap<i32, i64> = HashMap::new();
        for e in entries {
            let at = match staged.positions.get(&e.partition) {
                Some(at) => *at,
                None => self.replica_position(e.partition)?,
            };
            if at.is_some_and(|at| e.offset < at) {
                continue;
            }
            staged.positions.insert(e.partition, Some(e.offset + 1));
            let last = match staged.versions.get(&e.partition) {
                Some(v) => *v,
                None => self.changelog_version(e.partition)?,
            };
            let verdict = match e.authentic {
                None => Err("changelog_forged"),
                // This node's own record, applied here before the broker
                // confirmed it (a group of one): what it holds is here already.
                Some(version) if version <= last && version > published(&mut confirmed, e.partition, |p| self.changelog_published(p))? => continue,
                Some(version) if version <= last => Err("changelog_replayed"),
                Some(_) => replicable(&e.key, e.value.as_deref()),
            };
            if let Err(reason) = verdict {
                refused.push(Refused { partition: e.partition, offset: e.offset, key: String::from_utf8_lossy(&e.key).into_owned(), reason });
                continue;
            }
            if let Some(version) = e.authentic {
                staged.versions.insert(e.partition, version);
            }
            if e.key.starts_with(SEALED) {
                match self.recover_sealed(staged, &e.key, e.value.as_deref())? {
                    Sealed::Recovered => applied += 1,
                    Sealed::Passed => {}
                    Sealed::Forged => refused.push(Refused {
                        partition: e.partition,
                        offset: e.offset,
                        key: String::from_utf8_lossy(&e.key).into_owned(),
                        reason: "changelog_forged",
                    }),
                }
                continue;
            }
            match &e.value {
                Some(value) => staged.batch.insert(e.key.clone(), value.clone()),
                None => staged.batch.remove(e.key.clone()),
            }
            staged.touched.extend(touched(&e.key));
            applied += 1;
        }
        for (partition, at) in &staged.positions {
            if let Some(next) = at {
                staged.batch.insert(partition_key(REPLICA, *partition), &next.to_be_bytes()[..]);
            }
        }
        for (partition, version) in &staged.versions {
            staged.batch.insert(partition_key(VERSION, *partition), &version.to_be_bytes()[..]);
            // Nothing of this node's own is below an accepted record, unconfirmed.
            staged.batch.insert(partition_key(PUBLISHED, *partition), &version.to_be_bytes()[..]);
        }
        Ok((applied, refused))
    }

    /// A node's sealed audit entries (`SEALED`) as the replica meets them. This
    /// node's own, next in its trail, are the entries of a batch it published
    /// and was killed before applying: they join the trail. Its own that are
    /// not next were applied already (or the trail moved on without them) and
    /// are passed; its own that its audit secret did not seal are forged.
    /// Another node's are that node's business, and passed.
    fn recover_sealed(&self, staged: &mut Staged, key: &[u8], value: Option<&[u8]>) -> Result<Sealed, StoreError> {
        let audit_key = self.audit_key();
        let Some(value) = value.filter(|_| key.get(SEALED.len()..) == Some(super::audit::node_id(audit_key).as_bytes())) else {
            return Ok(Sealed::Passed);
        };
        let entries: Vec<super::audit::AuditEntry> = decode(key, value)?;
        let head = match staged.recovered.last() {
            Some(e) => Some(super::audit::Head::of(e)),
            None => self.audit_head(),
        };
        if super::audit::follows(audit_key, head.as_ref(), &entries) {
            tracing::warn!(
                first = entries.first().map_or(0, |e| e.seq),
                count = entries.len(),
                "audit entries of a batch this node published but did not apply were recovered from the changelog"
            );
            staged.recovered.extend(entries);
            Ok(Sealed::Recovered)
        } else if super::audit::sealed_by(audit_key, &entries) {
            Ok(Sealed::Passed)
        } else {
            Ok(Sealed::Forged)
        }
    }

    /// Tells every node, through the changelog, that this node now writes the
    /// keys of `partition` and takes their writes at `url`.
    pub fn stage_owner(&self, staged: &mut Staged, partition: i32, url: &str) {
        staged.put(super::Route::Partition(partition), partition_key(OWNER, partition), url.as_bytes().to_vec());
        staged.flush = true;
    }
}

/// What became of a sealed batch of audit entries read from the changelog.
enum Sealed {
    Recovered,
    Passed,
    Forged,
}

/// The partition's value in `memo`, or `read` once.
fn published(memo: &mut HashMap<i32, i64>, partition: i32, read: impl FnOnce(i32) -> Result<i64, StoreError>) -> Result<i64, StoreError> {
    if let Some(v) = memo.get(&partition) {
        return Ok(*v);
    }
    let v = read(partition)?;
    memo.insert(partition, v);
    Ok(v)
}
