//! The three queues effects wait in after their commit: the outbox (data-plane
//! commands and embedded-KMS events) and alerts, one record per commit each,
//! and KMS notices, one entry each. Each is read oldest first by its relay,
//! which tells the writer what it sent; a record goes once all of it was sent.

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

/// A queue entry its relay sent: its id and, for an outbox record, its
/// commands' replicated copies, named from the effects the relay read.
/// Removing an outbox entry used to read it back and decode it again only to
/// find those names: over a third of the writer's time in a 100,000-DEK rotation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SentEntry {
    id: u64,
    copies: Copies,
}

/// What a sent entry's replicated copies are.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Copies {
    /// Taken from the effects the relay read: each command's key and name.
    Known(Vec<(String, Vec<u8>)>),
    /// Not known to the caller: the entry is read back from the queue.
    ReadBack,
}

impl SentEntry {
    /// An outbox record whose every effect was sent, as it was read.
    pub fn of(id: u64, effects: &[Effect]) -> SentEntry {
        SentEntry { id, copies: Copies::Known(effects.iter().filter_map(command_key).collect()) }
    }

    /// An entry known by its id alone (a notice, an alert).
    pub fn id(id: u64) -> SentEntry {
        SentEntry { id, copies: Copies::ReadBack }
    }

    pub fn id_of(&self) -> u64 {
        self.id
    }
}

/// A queue record's items: a list (one record per commit), or the one effect
/// an older release queued per entry, which `legacy` takes as an item.
fn record_items<T: serde::de::DeserializeOwned>(key: &[u8], value: &[u8], legacy: impl FnOnce(Effect) -> Option<T>) -> Result<Vec<T>, StoreError> {
    match decode::<Vec<T>>(key, value) {
        Ok(items) => Ok(items),
        Err(e) => match decode::<Effect>(key, value).ok().and_then(legacy) {
            Some(item) => Ok(vec![item]),
            None => Err(e),
        },
    }
}

fn outbox_effects(key: &[u8], value: &[u8]) -> Result<Vec<Effect>, StoreError> {
    record_items(key, value, Some)
}

impl Store {
    /// The oldest KMS notices from id `from` on, at most `limit`, with their
    /// ids: a relay that removed every entry below `from` reads on from there
    /// (see `Cursor`).
    pub fn notices_from(&self, from: u64, limit: usize) -> Result<Vec<(u64, Effect)>, StoreError> {
        let mut out = Vec::new();
        for kv in self.queue_range(Queue::Notices, from).take(limit) {
            let (key, value) = kv.map_err(StoreError::Read)?;
            let id = number(&key, &key[NOTICES.len()..])? as u64;
            out.push((id, decode(&key, &value)?));
        }
        Ok(out)
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
            let alerts = record_items(&key, &value, |effect| match effect {
                Effect::Alert(alert) => Some(alert),
                _ => None,
            })?;
            out.push((id, alerts));
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

    /// The oldest outbox records from id `from` on, each the effects one
    /// commit queued, in order, until they hold `limit` commands: an entry of
    /// many instance commands (a rotation's chunk) counts as that many, so that
    /// what the relay holds in one round stays bounded (at least one record,
    /// however heavy; a record holds one writer batch at most).
    pub fn outbox_from(&self, from: u64, limit: usize) -> Result<Vec<(u64, Vec<Effect>)>, StoreError> {
        let mut out = Vec::new();
        let mut total = 0;
        for kv in self.queue_range(Queue::Outbox, from) {
            if total >= limit {
                break;
            }
            let (key, value) = kv.map_err(StoreError::Read)?;
            let id = number(&key, &key[OUTBOX.len()..])? as u64;
            let effects = outbox_effects(&key, &value)?;
            total += effects
                .iter()
                .map(|e| match e {
                    Effect::InstanceCommands { instances, .. } => instances.len().max(1),
                    _ => 1,
                })
                .sum::<usize>();
            out.push((id, effects));
        }
        Ok(out)
    }

    /// The oldest outbox records (see `outbox_from`).
    pub fn outbox(&self, limit: usize) -> Result<Vec<(u64, Vec<Effect>)>, StoreError> {
        self.outbox_from(0, limit)
    }

    pub fn notices(&self, limit: usize) -> Result<Vec<(u64, Effect)>, StoreError> {
        self.notices_from(0, limit)
    }

    /// How many outbox records (commits with effects not all sent) there are.
    pub fn outbox_len(&self) -> usize {
        self.outbox_len_from(0)
    }

    /// How many outbox records there are from id `from` on.
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
        for SentEntry { id, copies } in sent {
            let key = queue_key(prefix, id);
            if queue == Queue::Outbox && self.changelog.get().is_some() {
                let copies = match copies {
                    Copies::Known(copies) => copies,
                    Copies::ReadBack => match self.get(&key)? {
                        Some(value) => outbox_effects(&key, &value)?.iter().filter_map(command_key).collect(),
                        None => Vec::new(),
                    },
                };
                for (key_id, name) in copies.into_iter().filter(|(key_id, _)| mine(key_id)) {
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
