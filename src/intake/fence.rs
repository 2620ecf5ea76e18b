//! Partition ownership, fenced by generation. Each assignment gives a partition a
//! new generation; a revocation removes it. An input read under generation g may
//! only be committed while its partition is still at g, and the writer checks
//! that under the same lock a revocation takes, so once `revoke` returns no
//! state can be written for a partition this member no longer owns.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};

pub type Partition = (String, i32);

#[derive(Default)]
pub struct Fence {
    owned: Mutex<HashMap<Partition, u64>>,
    next: AtomicU64,
}

/// Held by the writer from its ownership check until its batch is durable.
pub struct Held<'a>(MutexGuard<'a, HashMap<Partition, u64>>);

impl Held<'_> {
    pub fn owns(&self, topic: &str, partition: i32, generation: u64) -> bool {
        self.0.get(&(topic.to_string(), partition)) == Some(&generation)
    }
}

impl Fence {
    pub fn assign(&self, partitions: &[Partition]) {
        let mut owned = self.owned.lock().expect("fence lock");
        for p in partitions {
            let generation = self.next.fetch_add(1, Ordering::SeqCst) + 1;
            owned.insert(p.clone(), generation);
        }
    }

    /// Blocks while the writer is committing, so that a batch that passed the
    /// check finishes before the partition changes hands.
    pub fn revoke(&self, partitions: &[Partition]) {
        let mut owned = self.owned.lock().expect("fence lock");
        for p in partitions {
            owned.remove(p);
        }
    }

    pub fn revoke_all(&self) {
        self.owned.lock().expect("fence lock").clear();
    }

    pub fn generation(&self, topic: &str, partition: i32) -> Option<u64> {
        self.owned.lock().expect("fence lock").get(&(topic.to_string(), partition)).copied()
    }

    pub fn owned_count(&self) -> usize {
        self.owned.lock().expect("fence lock").len()
    }

    pub fn hold(&self) -> Held<'_> {
        Held(self.owned.lock().expect("fence lock"))
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
}
