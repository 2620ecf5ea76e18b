//! Every key the store writes, in one place: one sled tree, one prefix per
//! kind of record, so that a batch of records of every kind lands atomically.
//! Nothing outside the store spells a prefix; the replica asks `touched` what
//! a replicated key was about.

use serde::de::DeserializeOwned;
use serde::Serialize;

use super::StoreError;
use crate::engine::Effect;

pub(super) const KEY: &[u8] = b"k/";
pub(super) const INSTANCE: &[u8] = b"i/";
/// Key id, 0, instance id: a key's instances without reading them.
pub(super) const INDEX: &[u8] = b"x/";
pub(super) const EVENT: &[u8] = b"e/";
pub(super) const JOB: &[u8] = b"j/";
pub(super) const OUTBOX: &[u8] = b"o/";
/// KMS notices wait in their own queue: a slow KMS must not hold up commands.
pub(super) const NOTICES: &[u8] = b"n/";
pub(super) const OFFSET: &[u8] = b"p/";
/// Embedded-KMS material (sealed under the master key).
pub(super) const KMS: &[u8] = b"m/";
pub(super) const AUDIT: &[u8] = b"a/";
/// Alerts firing now, by fingerprint: re-sent until resolved, also after a restart.
pub(super) const FIRING: &[u8] = b"l/";
/// Alerts waiting for their sinks: a sink that is down must not hold up commands.
pub(super) const ALERTS: &[u8] = b"q/";
/// How far this node's replica has read each changelog partition.
pub(super) const REPLICA: &[u8] = b"r/";
/// The last changelog version this node accepted (or wrote) per partition: a
/// record at or below it is a replay.
pub(super) const VERSION: &[u8] = b"s/";
/// Which node (its API URL) owns each partition, as the owner announced it.
pub(super) const OWNER: &[u8] = b"w/";
/// Lifecycle events the embedded KMS emitted, by event id, replicated until
/// their key's owner has recorded them: a node that dies between a KMS change
/// and publishing its event leaves the event to the partition's next owner.
pub(super) const EMITTED: &[u8] = b"v/";
/// Data-plane commands another node queued, replicated until that node has
/// sent them (it then writes a tombstone): a partition's next owner sends
/// what a dead owner left unsent. A node's own queue is its outbox.
pub(super) const COMMANDS: &[u8] = b"c/";

/// What replication carries, and nothing else: a record of another prefix
/// from the changelog (an outbox entry the relay would sign and send, an
/// audit entry, a replica position) is refused. Each value must decode as
/// what its prefix holds.
pub(super) fn replicable(key: &[u8], value: Option<&[u8]>) -> Result<(), &'static str> {
    use crate::engine::{EventRecord, InstanceRecord, KeyRecord, RotationJob};
    let Some(prefix) = [KEY, INSTANCE, INDEX, EVENT, JOB, OFFSET, KMS, OWNER, EMITTED, COMMANDS].into_iter().find(|p| key.starts_with(p)) else {
        return Err("changelog_prefix");
    };
    let Some(value) = value else { return Ok(()) };
    let decodes = match prefix {
        KEY => decode::<KeyRecord>(key, value).is_ok(),
        INSTANCE => decode::<InstanceRecord>(key, value).is_ok(),
        EVENT => decode::<EventRecord>(key, value).is_ok(),
        JOB => decode::<RotationJob>(key, value).is_ok(),
        EMITTED | COMMANDS => decode::<Effect>(key, value).is_ok(),
        INDEX => value.is_empty(),
        OFFSET => value.len() == 8 && key.len() > OFFSET.len() + 4,
        OWNER => key.len() == OWNER.len() + 4 && std::str::from_utf8(value).is_ok_and(|u| u.starts_with("http://") || u.starts_with("https://")),
        // Sealed material: the embedded KMS authenticates it when it unseals.
        _ => true,
    };
    if decodes {
        Ok(())
    } else {
        Err("changelog_corrupt")
    }
}

pub(super) fn k(prefix: &[u8], id: &str) -> Vec<u8> {
    let mut v = Vec::with_capacity(prefix.len() + id.len());
    v.extend_from_slice(prefix);
    v.extend_from_slice(id.as_bytes());
    v
}

pub(super) fn index_prefix(key_id: &str) -> Vec<u8> {
    let mut v = k(INDEX, key_id);
    v.push(0);
    v
}

pub(super) fn index_key(key_id: &str, instance_id: &str) -> Vec<u8> {
    let mut v = index_prefix(key_id);
    v.extend_from_slice(instance_id.as_bytes());
    v
}

pub(super) fn offset_key(topic: &str, partition: i32) -> Vec<u8> {
    let mut v = k(OFFSET, topic);
    v.push(0);
    v.extend_from_slice(&partition.to_be_bytes());
    v
}

pub(super) fn partition_key(prefix: &[u8], partition: i32) -> Vec<u8> {
    let mut key = prefix.to_vec();
    key.extend_from_slice(&partition.to_be_bytes());
    key
}

pub(super) fn queue_key(prefix: &[u8], id: u64) -> Vec<u8> {
    let mut key = prefix.to_vec();
    key.extend_from_slice(&id.to_be_bytes());
    key
}

/// The replicated name of a queued command: the same on every node, derived
/// from what the command is (the relay's command ids are derived alike).
pub(super) fn command_key(effect: &Effect) -> Option<(String, Vec<u8>)> {
    let (key_id, name) = match effect {
        Effect::KeyCommands { key_id, action, cause_event_id, .. } => (key_id, format!("{cause_event_id}/{action:?}/key")),
        Effect::InstanceCommand { key_id, instance_id, action, cause_event_id, .. } => (key_id, format!("{cause_event_id}/{action:?}/{instance_id}")),
        _ => return None,
    };
    Some((key_id.clone(), k(COMMANDS, &name)))
}

/// What a stored key was about, for whoever caches what it holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Touched {
    Key(String),
    Instance(String),
}

/// The key record or instance record a store key names, if it names one.
pub fn touched(key: &[u8]) -> Option<Touched> {
    let text = |rest: &[u8]| String::from_utf8_lossy(rest).into_owned();
    if let Some(id) = key.strip_prefix(KEY) {
        Some(Touched::Key(text(id)))
    } else {
        key.strip_prefix(INSTANCE).map(|id| Touched::Instance(text(id)))
    }
}

pub(super) fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    // Records are plain data (strings, numbers, enums): serializing them to
    // JSON has no failure mode, so an empty value is never written in practice.
    serde_json::to_vec(value).unwrap_or_default()
}

/// A record that does not decode is refused with the key that holds it:
/// deciding on partial state could apply an event twice or lose a DEK.
pub(super) fn decode<T: DeserializeOwned>(key: &[u8], bytes: &[u8]) -> Result<T, StoreError> {
    serde_json::from_slice(bytes).map_err(|e| StoreError::Corrupt { key: String::from_utf8_lossy(key).into_owned(), reason: e.to_string() })
}

/// An 8-byte big-endian number (offsets, positions, queue ids).
pub(super) fn number(key: &[u8], bytes: &[u8]) -> Result<i64, StoreError> {
    let array: [u8; 8] = bytes
        .try_into()
        .map_err(|_| StoreError::Corrupt { key: String::from_utf8_lossy(key).into_owned(), reason: format!("{} bytes, expected 8", bytes.len()) })?;
    Ok(i64::from_be_bytes(array))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_corrupt_record_is_an_error_that_names_its_key() {
        let err = decode::<u32>(b"k/key-1", b"{not json").unwrap_err();
        assert!(matches!(&err, StoreError::Corrupt { key, .. } if key == "k/key-1"), "{err}");
        assert!(number(b"p/t", &[1, 2, 3]).is_err());
    }

    #[test]
    fn touched_names_key_and_instance_records_only() {
        assert_eq!(touched(&k(KEY, "a")), Some(Touched::Key("a".into())));
        assert_eq!(touched(&k(INSTANCE, "i")), Some(Touched::Instance("i".into())));
        assert_eq!(touched(&k(EVENT, "e")), None);
    }
}
