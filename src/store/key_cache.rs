//! Key records decoded, for the data plane: every DEK fetch checks its key's
//! state, and reading and decoding the key record (JSON, timestamps) on each
//! one cost more than the rest of the check.
//!
//! Only the store's commit changes a key record, and it forgets the keys a
//! batch touched right after applying the batch, before the batch is durable
//! and before anyone is told of it. A read that began before that and comes
//! back after it (with the old record) finds the generation moved and leaves
//! the cache alone, so an old record is never kept past the commit that
//! replaced it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use crate::engine::KeyRecord;

/// Keys held at most; past it, reads go to the store (a deployment with more
/// keys than this pays the decode for the rest).
const HELD: usize = 16_384;

#[derive(Default)]
pub(super) struct KeyCache(Mutex<Held>);

#[derive(Default)]
struct Held {
    /// Moved by every commit that touches a key record.
    generation: u64,
    /// `None`: the store has no such key.
    keys: HashMap<String, Option<Arc<KeyRecord>>>,
}

impl KeyCache {
    fn held(&self) -> std::sync::MutexGuard<'_, Held> {
        // Plain data, consistent after every statement: a panic elsewhere
        // while it was held leaves nothing half-done.
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The record, or the generation to hand to `fill` with what the store holds.
    pub(super) fn get(&self, key_id: &str) -> Result<Option<Arc<KeyRecord>>, u64> {
        let held = self.held();
        held.keys.get(key_id).cloned().ok_or(held.generation)
    }

    /// Keeps what was read from the store, unless a commit touched a key since `generation`.
    pub(super) fn fill(&self, generation: u64, key_id: &str, record: Option<Arc<KeyRecord>>) {
        let mut held = self.held();
        if held.generation == generation && held.keys.len() < HELD {
            held.keys.insert(key_id.to_string(), record);
        }
    }

    /// Called once a batch that changed these keys is applied.
    pub(super) fn forget<'a>(&self, key_ids: impl IntoIterator<Item = &'a str>) {
        let mut key_ids = key_ids.into_iter().peekable();
        if key_ids.peek().is_none() {
            return;
        }
        let mut held = self.held();
        held.generation += 1;
        for key_id in key_ids {
            held.keys.remove(key_id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(status: crate::engine::KeyStatus) -> Option<Arc<KeyRecord>> {
        Some(Arc::new(KeyRecord { status, ..KeyRecord::new("k", chrono::Utc::now()) }))
    }

    #[test]
    fn a_read_that_began_before_a_commit_touched_its_key_is_not_kept() {
        use crate::engine::KeyStatus::*;
        let cache = KeyCache::default();
        let before = cache.get("k").unwrap_err();
        // The commit disables the key while the read is on its way back with the old record.
        cache.forget(["k"]);
        cache.fill(before, "k", record(Active));
        let now = cache.get("k").unwrap_err();
        assert_ne!(now, before, "the old record was not kept: the next read goes to the store");
        cache.fill(now, "k", record(Disabled));
        assert_eq!(cache.get("k").unwrap().unwrap().status, Disabled);
        // A commit that touches no key leaves what is held.
        cache.forget(std::iter::empty());
        assert!(cache.get("k").is_ok());
        cache.forget(["other"]);
        assert!(cache.get("k").is_ok(), "another key's commit leaves this one");
        cache.forget(["k"]);
        assert!(cache.get("k").is_err());
    }
}
