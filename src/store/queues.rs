//! The three queues effects wait in after their commit: the outbox (data-plane
//! commands and embedded-KMS events), KMS notices, and alerts (one record per
//! commit). Each is read oldest first by its relay, which tells the writer what
//! it sent.

use super::schema::*;
use super::{Change, Route, Staged, Store, StoreError};
use crate::engine::{Alert, Effect, Record};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Queue {
    Outbox,
    Notices,
    Alerts,
}

impl Queue {
    fn prefix(self) -> &'static [u8] {
        match self {
            Queue::Outbox => OUTBOX,
            Queue::Notices => NOTICES,
            Queue::Alerts => ALERTS,
        }
    }
}

/// A queue entry its relay sent: its id and, for a data-plane command, its
/// replicated copy's key and name, taken from the effect the relay read.
/// Removing an outbox entry used to read it back and decode it again only to
/// find that name: over a third of the writer's time in a 100,000-DEK rotation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SentEntry {
    id: u64,
    copy: CopyName,
}

/// What a sent entry's replicated copy is.
#[derive(Debug, Clone, PartialEq, Eq)]
enum CopyName {
    /// Taken from the effect the relay read: its key and name, or none (not a command).
    Known(Option<(String, Vec<u8>)>),
    /// Not known to the caller: the entry is read back from the queue.
    ReadBack,
}

impl SentEntry {
    /// An entry sent as `effect`, which it was read as.
    pub fn of(id: u64, effect: &Effect) -> SentEntry {
        SentEntry { id, copy: CopyName::Known(command_key(effect)) }
    }

    /// An entry known by its id alone (a notice, an alert).
    pub fn id(id: u64) -> SentEntry {
        SentEntry { id, copy: CopyName::ReadBack }
    }

    pub fn id_of(&self) -> u64 {
        self.id
    }
}

impl Store {
    /// The oldest KMS notices from id `from` on, at most `limit`, with their
    /// ids: a relay that removed every entry below `from` reads on from there
    /// (see `Cursor`).
    pub fn notices_from(&self, from: u64, limit: usize) -> Result<Vec<(u64, Effect)>, StoreError> {
        self.queued_weighing(Queue::Notices, from, limit, |_| 1)
    }

    /// The oldest alert records from id `from` on, at most `limit`, with their
    /// ids: each holds, in order, the alerts one commit raised or resolved,
    /// and is removed whole once every one of them is delivered. A record an
    /// older release wrote holds one alert.
    pub fn alerts_from(&self, from: u64, limit: usize) -> Result<Vec<(u64, Vec<Alert>)>, StoreError> {
        let mut out = Vec::new();
        for kv in self.queue_range(Queue::Alerts, from).take(limit) {
            let (key, value) = kv.map_err(StoreError::Read)?;
            let id = number(&key, &key[ALERTS.len()..])? as u64;
            let alerts = match decode::<Vec<Alert>>(&key, &value) {
                Ok(alerts) => alerts,
                Err(e) => match decode::<Effect>(&key, &value) {
                    Ok(Effect::Alert(alert)) => vec![alert],
                    _ => return Err(e),
                },
            };
            out.push((id, alerts));
        }
        Ok(out)
    }

    /// The oldest entries of a queue from id `from` on, with their ids, until
    /// their `weight` reaches `limit` (at least one entry, however heavy).
    fn queued_weighing(&self, queue: Queue, from: u64, limit: usize, weight: impl Fn(&Effect) -> usize) -> Result<Vec<(u64, Effect)>, StoreError> {
        let prefix = queue.prefix();
        let mut out = Vec::new();
        let mut total = 0;
        for kv in self.queue_range(queue, from) {
            if total >= limit {
                break;
            }
            let (key, value) = kv.map_err(StoreError::Read)?;
            let id = number(&key, &key[prefix.len()..])? as u64;
            let effect = decode(&key, &value)?;
            total += weight(&effect);
            out.push((id, effect));
        }
        Ok(out)
    }

    /// A queue's entries from id `from` on. Starting past the entries a relay
    /// removed matters: sled keeps the emptied nodes of a queue's front, and a
    /// scan from the prefix walks all of them (after 100,000 events, most of
    /// the relays' time, reading pages back from disk).
    fn queue_range(&self, queue: Queue, from: u64) -> sled::Iter {
        let prefix = queue.prefix();
        let mut end = prefix.to_vec();
        if let Some(last) = end.last_mut() {
            *last += 1;
        }
        self.tree.range(queue_key(prefix, from)..end)
    }

    /// The oldest outbox entries from id `from` on, up to `limit` commands: an
    /// entry of many instance commands (a rotation's chunk) counts as that
    /// many, so that what the relay holds in one round stays bounded.
    pub fn outbox_from(&self, from: u64, limit: usize) -> Result<Vec<(u64, Effect)>, StoreError> {
        self.queued_weighing(Queue::Outbox, from, limit, |e| match e {
            Effect::InstanceCommands { instances, .. } => instances.len().max(1),
            _ => 1,
        })
    }

    /// The oldest outbox entries (see `outbox_from`).
    pub fn outbox(&self, limit: usize) -> Result<Vec<(u64, Effect)>, StoreError> {
        self.outbox_from(0, limit)
    }

    pub fn notices(&self, limit: usize) -> Result<Vec<(u64, Effect)>, StoreError> {
        self.notices_from(0, limit)
    }

    pub fn outbox_len(&self) -> usize {
        self.outbox_len_from(0)
    }

    /// How many outbox entries there are from id `from` on.
    pub fn outbox_len_from(&self, from: u64) -> usize {
        self.queue_range(Queue::Outbox, from).count()
    }

    /// Removes what a relay sent. A sent command's replicated copy is
    /// tombstoned, so that the other nodes forget it, but only for keys `mine`
    /// selects: a partition has one writer to its changelog, and a command
    /// sent just after its key moved stays on the other nodes, to be adopted
    /// and sent once more under the same id. Not flushed for the
    /// outbox: an effect published twice after a crash is deduplicated by its
    /// stable id downstream; alerts are, as a sink may page someone twice.
    pub fn stage_sent(&self, staged: &mut Staged, queue: Queue, sent: Vec<SentEntry>, mine: impl Fn(&str) -> bool) -> Result<(), StoreError> {
        let prefix = queue.prefix();
        for SentEntry { id, copy } in sent {
            let key = queue_key(prefix, id);
            if queue == Queue::Outbox && self.changelog.get().is_some() {
                let copy = match copy {
                    CopyName::Known(copy) => copy,
                    CopyName::ReadBack => match self.get(&key)? {
                        Some(value) => command_key(&decode(&key, &value)?),
                        None => None,
                    },
                };
                if let Some((key_id, name)) = copy.filter(|(key_id, _)| mine(key_id)) {
                    staged.changes.push(Change { route: Route::Key(key_id), key: name, value: None });
                }
            }
            staged.batch.remove(key);
        }
        staged.flush |= queue == Queue::Alerts;
        Ok(())
    }

    /// Commands another node queued for keys `mine` selects and never confirmed
    /// sent: moved into this node's outbox (sent again with the same command
    /// ids, so the data plane can deduplicate them). Returns how many.
    pub fn stage_adopted_commands(&self, staged: &mut Staged, mine: impl Fn(&str) -> bool) -> Result<usize, StoreError> {
        let mut adopted = Vec::new();
        let mut names = Vec::new();
        for kv in self.tree.scan_prefix(COMMANDS) {
            let (name, value) = kv.map_err(StoreError::Read)?;
            let effect: Effect = decode(&name, &value)?;
            if command_key(&effect).is_some_and(|(key_id, _)| mine(&key_id)) {
                names.push(name.to_vec());
                adopted.push(Record::Outbox(effect));
            }
        }
        // Each is queued here under the same name, which replaces the copy.
        self.stage_records(staged, &adopted)?;
        for name in names {
            staged.batch.remove(name);
        }
        Ok(adopted.len())
    }
}
