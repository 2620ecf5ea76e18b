//! Partition ownership, fenced by generation. Each assignment gives a partition a
//! new generation; a revocation removes it. An input read under generation g may
//! only be committed while its partition is still at g, and the writer checks
//! that under the same lock a revocation takes, so once `revoke` returns no
//! state can be written for a partition this member no longer owns.
//!
//! With several nodes, a partition assigned to this node is not yet served:
//! until its take-over (the replica caught up with what the previous owner
//! wrote) is done, this node's copy of its keys may be stale. Its consumed
//! events wait for the take-over (the intake), and so does everything else
//! about its keys: API writes, DEKs without the replica's lag check, the
//! workers. `owns` (by generation) is the fence of consumed inputs; `serves`
//! is ownership for everything else.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use arc_swap::ArcSwap;

pub type Partition = (String, i32);

/// Each owned partition's generation, and whether it is served yet.
type Owned = HashMap<Partition, (u64, bool)>;

/// Readers (every message consumed, every DEK request, every forwarded write)
/// load a snapshot and never wait: the writer holds `changing` across a whole
/// commit, which with a changelog includes a broker round trip, and nothing on
/// the data plane may wait on the broker. Only ownership changes take it.
#[derive(Default)]
pub struct Fence {
    owned: ArcSwap<Owned>,
    /// Serialises ownership changes with the writer's commits: a revocation
    /// waits for a batch that passed the check to be applied (with several
    /// nodes, in the changelog, where the next owner reads it; its callers
    /// hear of it once it is durable here too).
    changing: Mutex<()>,
    next: AtomicU64,
}

/// Held by the writer from its ownership check until its batch is applied.
pub struct Held<'a> {
    _changing: MutexGuard<'a, ()>,
    owned: Arc<Owned>,
}

impl Held<'_> {
    pub fn owns(&self, topic: &str, partition: i32, generation: u64) -> bool {
        self.owned.get(&(topic.to_string(), partition)).is_some_and(|(g, _)| *g == generation)
    }

    /// Owned now, under whatever generation, served or not.
    pub fn owns_partition(&self, topic: &str, partition: i32) -> bool {
        self.owned.contains_key(&(topic.to_string(), partition))
    }

    /// Owned now, under whatever generation, and served (taken over).
    pub fn serves(&self, topic: &str, partition: i32) -> bool {
        self.owned.get(&(topic.to_string(), partition)).is_some_and(|(_, served)| *served)
    }
}

impl Fence {
    fn change(&self, f: impl FnOnce(&mut Owned)) {
        let _changing = self.changing.lock().unwrap_or_else(|e| e.into_inner());
        let mut owned = Owned::clone(&self.owned.load());
        f(&mut owned);
        self.owned.store(Arc::new(owned));
    }

    /// Assigned and served at once: nothing to take over (one node without
    /// a changelog, tests).
    pub fn assign(&self, partitions: &[Partition]) {
        self.assign_as(partitions, true)
    }

    /// Assigned, served only once `taken_over` says so.
    pub fn assign_pending(&self, partitions: &[Partition]) {
        self.assign_as(partitions, false)
    }

    fn assign_as(&self, partitions: &[Partition], served: bool) {
        self.change(|owned| {
            for p in partitions {
                let generation = self.next.fetch_add(1, Ordering::SeqCst) + 1;
                owned.insert(p.clone(), (generation, served));
            }
        })
    }

    /// The partition's take-over under `generation` is done: it is served,
    /// unless it was revoked or assigned again meanwhile.
    pub fn taken_over(&self, topic: &str, partition: i32, generation: u64) {
        self.change(|owned| {
            if let Some((g, served)) = owned.get_mut(&(topic.to_string(), partition)) {
                if *g == generation {
                    *served = true;
                }
            }
        })
    }

    /// Blocks while the writer is committing, so that a batch that passed the
    /// check finishes before the partition changes hands.
    pub fn revoke(&self, partitions: &[Partition]) {
        self.change(|owned| {
            for p in partitions {
                owned.remove(p);
            }
        })
    }

    pub fn revoke_all(&self) {
        self.change(HashMap::clear)
    }

    /// Lock-free.
    pub fn generation(&self, topic: &str, partition: i32) -> Option<u64> {
        self.owned.load().get(&(topic.to_string(), partition)).map(|(g, _)| *g)
    }

    /// Lock-free.
    pub fn serves(&self, topic: &str, partition: i32) -> bool {
        self.owned.load().get(&(topic.to_string(), partition)).is_some_and(|(_, served)| *served)
    }

    /// Lock-free.
    pub fn owned_count(&self) -> usize {
        self.owned.load().len()
    }

    /// Some partition is owned, and every one owned is served: what
    /// readiness waits for. Lock-free.
    pub fn serving_all(&self) -> bool {
        let owned = self.owned.load();
        !owned.is_empty() && owned.values().all(|(_, served)| *served)
    }

    pub fn hold(&self) -> Held<'_> {
        let changing = self.changing.lock().unwrap_or_else(|e| e.into_inner());
        Held { _changing: changing, owned: self.owned.load_full() }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reassignment_gets_a_new_generation() {
        let f = Fence::default();
        let p = ("t".to_string(), 0);
        f.assign(std::slice::from_ref(&p));
        let g1 = f.generation("t", 0).unwrap();
        f.revoke(std::slice::from_ref(&p));
        assert!(f.generation("t", 0).is_none());
        f.assign(std::slice::from_ref(&p));
        let g2 = f.generation("t", 0).unwrap();
        assert_ne!(g1, g2);
        assert!(!f.hold().owns("t", 0, g1), "an input read before the revocation is fenced off");
        assert!(f.hold().owns("t", 0, g2));
    }

    #[test]
    fn a_partition_pending_take_over_is_owned_but_not_served_until_taken_over_under_its_generation() {
        let f = Fence::default();
        let p = ("t".to_string(), 0);
        f.assign_pending(std::slice::from_ref(&p));
        let g1 = f.generation("t", 0).unwrap();
        assert!(f.hold().owns("t", 0, g1), "its consumed inputs are fenced by generation");
        assert!(!f.serves("t", 0) && !f.hold().serves("t", 0) && !f.serving_all());
        f.revoke(std::slice::from_ref(&p));
        f.assign_pending(std::slice::from_ref(&p));
        f.taken_over("t", 0, g1);
        assert!(!f.serves("t", 0), "a take-over of an earlier generation serves nothing");
        f.taken_over("t", 0, f.generation("t", 0).unwrap());
        assert!(f.serves("t", 0) && f.hold().serves("t", 0) && f.serving_all());
    }
}
