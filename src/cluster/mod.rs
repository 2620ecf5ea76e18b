//! Everything multi-node, behind one seam. Several keywarden nodes share one
//! Kafka: each key belongs to one partition of the events topic, and the node
//! that consumes that partition is the one node that writes the key.
//!
//! - `partition`: which partition a key belongs to (Kafka's own partitioner).
//! - `fence`: which partitions this node owns now, by generation.
//! - `Ownership` (here): the one ownership check; the writer applies it to every
//!   input, and the workers take their work lists from it.
//! - `changelog`: the write-ahead log every node's state changes go to first
//!   (`trait Changelog`).
//! - `deferred`: a group of one publishes its changelog after it applies.
//! - `replica`: follows every node's changelog into this node's store, through
//!   the writer.
//! - `takeover`: what a node does when a partition becomes its own.
//! - `orphans`: the tansu workaround for partitions a dead node left behind.
//! - `forward`: writes for keys another node owns go to that node.
//!
//! A single node runs the same code with `Ownership::single`: it owns every key,
//! publishes no changelog and runs no replica.

pub mod changelog;
pub mod deferred;
pub mod fence;
pub mod forward;
pub mod orphans;
pub mod partition;
pub mod replica;
pub mod takeover;

use std::sync::Arc;
use std::time::Instant;

pub use fence::Fence;
pub use partition::{murmur2, partition_of, PARTITIONER};

use crate::store::{Route, Versioned};

#[derive(Debug, thiserror::Error)]
pub enum ChangelogError {
    /// None of the batch was confirmed by the deadline; what was not yet sent
    /// was withdrawn, so nothing of it is applied anywhere.
    #[error("changelog {topic} confirmed none of the batch in time ({reason}); nothing was applied, retry")]
    Unconfirmed { topic: String, reason: String },
    #[error("cannot write to changelog {topic}: {reason}; check the broker")]
    Failed { topic: String, reason: String },
}

impl ChangelogError {
    pub fn retryable(&self) -> bool {
        matches!(self, ChangelogError::Unconfirmed { .. })
    }
}

/// What a publish wrote to one partition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Written {
    pub partition: i32,
    /// The offset after the last change written.
    pub next: i64,
    /// The version of the last change written (see `changelog`).
    pub version: i64,
}

/// The write-ahead log of the cluster. With several nodes the store publishes
/// each batch's changes here, and applies the batch only once this returns;
/// a group of one publishes them after (`deferred`).
pub trait Changelog: Send + Sync {
    /// The partition a change goes to: its key's partition of the events
    /// topic, so that one node writes both.
    fn partition(&self, route: &Route) -> i32;

    /// Publishes the records in order, under the versions they carry, and
    /// returns what it wrote per partition. With a deadline, gives up
    /// (`Unconfirmed`) once it passes if the broker has confirmed none of them.
    fn publish(&self, records: &[Versioned], deadline: Option<Instant>) -> Result<Vec<Written>, ChangelogError>;
}

/// The nodes of the deployment (`cluster.peers`): the only URLs a write is
/// forwarded to, or an owner asked whether it lives, whatever the changelog
/// announces.
#[derive(Debug, Clone, Default)]
pub struct Peers(Vec<String>);

impl Peers {
    pub fn new(urls: &[String]) -> Peers {
        Peers(urls.iter().map(|u| u.trim_end_matches('/').to_string()).collect())
    }

    pub fn admits(&self, url: &str) -> bool {
        self.0.iter().any(|p| p == url.trim_end_matches('/'))
    }
}

/// Which keys this node writes: those whose partition of the events topic it
/// consumes now. Without a changelog there is one node, and it writes all.
#[derive(Clone)]
pub struct Ownership {
    fence: Arc<Fence>,
    /// The events topic and its partition count, with several nodes.
    shared: Option<(String, i32)>,
}

impl Ownership {
    /// One node: it owns every key (the fence still fences its own consumer
    /// across rebalances).
    pub fn single(fence: Arc<Fence>) -> Ownership {
        Ownership { fence, shared: None }
    }

    pub fn shared(fence: Arc<Fence>, events_topic: &str, partitions: i32) -> Ownership {
        Ownership { fence, shared: Some((events_topic.to_string(), partitions)) }
    }

    pub fn fence(&self) -> &Arc<Fence> {
        &self.fence
    }

    pub fn is_shared(&self) -> bool {
        self.shared.is_some()
    }

    pub fn partition(&self, key_id: &str) -> Option<i32> {
        self.shared.as_ref().map(|(_, n)| partition_of(key_id, *n))
    }

    /// Lock-free (the fence's snapshot): the data plane asks it.
    pub fn owns_key(&self, key_id: &str) -> bool {
        match &self.shared {
            None => true,
            Some((topic, n)) => self.fence.serves(topic, partition_of(key_id, *n)),
        }
    }

    /// As `owns_key`, in the snapshot the writer holds for its batch.
    pub fn owns_key_held(&self, held: &fence::Held<'_>, key_id: &str) -> bool {
        match &self.shared {
            None => true,
            Some((topic, n)) => held.serves(topic, partition_of(key_id, *n)),
        }
    }

    /// Whether this node is the key's partition's assigned owner in the held
    /// snapshot, taken over or not: the one writer of that partition of the
    /// changelog, which is all a record of sent commands needs (their copies
    /// are dropped from every node's store), including those the take-over
    /// itself adopted.
    pub fn assigned_key_held(&self, held: &fence::Held<'_>, key_id: &str) -> bool {
        match &self.shared {
            None => true,
            Some((topic, n)) => held.owns_partition(topic, partition_of(key_id, *n)),
        }
    }

    /// The items about keys this node owns: every worker takes its work list
    /// from here, so that no two nodes work on the same key.
    pub fn mine<T>(&self, items: Vec<T>, key_of: impl Fn(&T) -> &str) -> Vec<T> {
        if self.shared.is_none() {
            return items;
        }
        items.into_iter().filter(|item| self.owns_key(key_of(item))).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A partition this node was just given, still being taken over (its
    /// replica may not hold what the previous owner wrote), is not yet this
    /// node's for anything but its consumed events: not for API writes, the
    /// workers, or a DEK served without the replica's lag check.
    #[test]
    fn a_key_of_a_partition_pending_take_over_is_not_owned_until_taken_over() {
        let fence = Arc::new(Fence::default());
        let ownership = Ownership::shared(fence.clone(), "events", 1);
        fence.assign_pending(&[("events".to_string(), 0)]);
        assert!(!ownership.owns_key("k"));
        assert!(!ownership.owns_key_held(&fence.hold(), "k"));
        assert!(ownership.mine(vec!["k"], |k| k).is_empty());
        fence.taken_over("events", 0, fence.generation("events", 0).unwrap());
        assert!(ownership.owns_key("k") && ownership.owns_key_held(&fence.hold(), "k"));
        assert!(Ownership::single(Arc::new(Fence::default())).owns_key("k"), "one node without a changelog owns every key");
    }
}
