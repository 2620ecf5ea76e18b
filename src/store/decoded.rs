//! Key and instance records decoded, for the data plane: every DEK fetch
//! reads its instance (its credential, its wrapped DEK) and its key's state,
//! and reading and decoding both records from sled on each fetch cost more
//! than the rest of the fetch's own work.
//!
//! Only the store's commit changes these records, and it forgets the ones a
//! batch touched right after applying the batch, before the batch is durable
//! and before anyone is told of it. A read that began before that and comes
//! back after it (with the old record) finds the generation moved and leaves
//! the cache alone, so an old record is never kept past the commit that
//! replaced it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// Records held at most, of each kind. Reaching it starts the cache over, so
/// that a fleet larger than this keeps its recent working set rather than
/// whichever records came first.
const HELD: usize = 16_384;

pub(super) struct Decoded<T>(Mutex<Held<T>>);

struct Held<T> {
    /// Moved by every commit that touches a record of this kind.
    generation: u64,
    /// `None`: the store has no such record.
    records: HashMap<String, Option<Arc<T>>>,
}

impl<T> Default for Decoded<T> {
    fn default() -> Self {
        Decoded(Mutex::new(Held { generation: 0, records: HashMap::new() }))
    }
}

impl<T> Decoded<T> {
    fn held(&self) -> std::sync::MutexGuard<'_, Held<T>> {
        // Plain data, consistent after every statement: a panic elsewhere
        // while it was held leaves nothing half-done.
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The record, or the generation to hand to `fill` with what the store holds.
    pub(super) fn get(&self, id: &str) -> Result<Option<Arc<T>>, u64> {
        let held = self.held();
        held.records.get(id).cloned().ok_or(held.generation)
    }

    /// The record held, or what `read` decodes from the store, then kept.
    pub(super) fn get_or_read<E>(&self, id: &str, read: impl FnOnce() -> Result<Option<T>, E>) -> Result<Option<Arc<T>>, E> {
        match self.get(id) {
            Ok(record) => Ok(record),
            Err(generation) => {
                let record = read()?.map(Arc::new);
                self.fill(generation, id, record.clone());
                Ok(record)
            }
        }
    }

    /// Keeps what was read from the store, unless a commit touched a record since `generation`.
    pub(super) fn fill(&self, generation: u64, id: &str, record: Option<Arc<T>>) {
        let mut held = self.held();
        if held.generation == generation {
            if held.records.len() >= HELD {
                held.records.clear();
            }
            held.records.insert(id.to_string(), record);
        }
    }

    /// Called once a batch that changed these records is applied.
    pub(super) fn forget<'a>(&self, ids: impl IntoIterator<Item = &'a str>) {
        let mut ids = ids.into_iter().peekable();
        if ids.peek().is_none() {
            return;
        }
        let mut held = self.held();
        held.generation += 1;
        for id in ids {
            held.records.remove(id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::KeyRecord;

    fn record(status: crate::engine::KeyStatus) -> Option<Arc<KeyRecord>> {
        Some(Arc::new(KeyRecord { status, ..KeyRecord::new("k", chrono::Utc::now()) }))
    }

    #[test]
    fn a_read_that_began_before_a_commit_touched_its_record_is_not_kept() {
        use crate::engine::KeyStatus::*;
        let cache = Decoded::default();
        let before = cache.get("k").unwrap_err();
        // The commit disables the key while the read is on its way back with the old record.
        cache.forget(["k"]);
        cache.fill(before, "k", record(Active));
        let now = cache.get("k").unwrap_err();
        assert_ne!(now, before, "the old record was not kept: the next read goes to the store");
        cache.fill(now, "k", record(Disabled));
        assert_eq!(cache.get("k").unwrap().unwrap().status, Disabled);
        // A commit that touches no record leaves what is held.
        cache.forget(std::iter::empty());
        assert!(cache.get("k").is_ok());
        cache.forget(["other"]);
        assert!(cache.get("k").is_ok(), "another record's commit leaves this one");
        cache.forget(["k"]);
        assert!(cache.get("k").is_err());
    }

    #[test]
    fn a_full_cache_starts_over_and_keeps_the_newest() {
        let cache: Decoded<u32> = Decoded::default();
        for i in 0..HELD {
            cache.fill(0, &i.to_string(), Some(Arc::new(0)));
        }
        assert!(cache.get("0").is_ok());
        cache.fill(0, "newest", Some(Arc::new(1)));
        assert_eq!(cache.get("newest").unwrap().as_deref(), Some(&1));
        assert!(cache.get("0").is_err(), "the older records were dropped");
        assert_eq!(cache.held().records.len(), 1);
    }
}
