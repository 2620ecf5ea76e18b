//! What the store sends to the changelog and takes from it: every state change
//! as the store's own key and value, and the replica's position in each
//! changelog partition, kept with the changes it covers.

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
        }
        Ok((applied, refused))
    }

    /// Tells every node, through the changelog, that this node now writes the
    /// keys of `partition` and takes their writes at `url`.
    pub fn stage_owner(&self, staged: &mut Staged, partition: i32, url: &str) {
        staged.put(super::Route::Partition(partition), partition_key(OWNER, partition), url.as_bytes().to_vec());
        staged.flush = true;
    }
}
