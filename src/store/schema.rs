//! Every key the store writes, in one place: one sled tree, one prefix per
//! kind of record, so that a batch of records of every kind lands atomically.
//! Nothing outside the store spells a prefix; the replica asks `touched` what
//! a replicated key was about.

use serde::de::DeserializeOwned;
use serde::Serialize;

use super::{StoreError, Versioned};
use crate::engine::{CommandAction, Effect};

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
/// The last version per partition the broker confirmed of this node's own
/// records. Between it and `VERSION` lie records a group of one applied and has
/// not yet seen confirmed (`cluster::deferred`): its replica meets them as its
/// own, not as replays.
pub(super) const PUBLISHED: &[u8] = b"t/";
/// A group of one's batches applied here and not yet confirmed in the
/// changelog, by commit order: published from here, also after a restart.
pub(super) const UNPUBLISHED: &[u8] = b"u/";
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
/// Several nodes: the audit entries of the batch a node published last, keyed
/// by the node (`audit::node_id`), sealed under its own audit secret. A node
/// killed after publishing a batch and before applying it recovers the
/// batch's state from the changelog, and its trail from this; every other
/// node passes it by. Never stored, only replicated.
pub(super) const SEALED: &[u8] = b"g/";

/// What replication carries, and nothing else: a record of another prefix
/// from the changelog (an outbox entry the relay would sign and send, an
/// audit entry outside a node's sealed batch, a replica position) is refused. Each value must decode as
/// what its prefix holds.
pub(super) fn replicable(key: &[u8], value: Option<&[u8]>) -> Result<(), &'static str> {
    use crate::engine::{EventRecord, KeyRecord, RotationJob};
    let Some(prefix) = [KEY, INSTANCE, INDEX, EVENT, JOB, OFFSET, KMS, OWNER, EMITTED, COMMANDS, SEALED].into_iter().find(|p| key.starts_with(p)) else {
        return Err("changelog_prefix");
    };
    let Some(value) = value else { return Ok(()) };
    let decodes = match prefix {
        KEY => decode::<KeyRecord>(key, value).is_ok(),
        INSTANCE => super::compact::decode_instance(key, value).is_ok(),
        EVENT => decode::<EventRecord>(key, value).is_ok(),
        JOB => decode::<RotationJob>(key, value).is_ok(),
        EMITTED | COMMANDS => decode::<Effect>(key, value).is_ok(),
        SEALED => decode::<Vec<super::audit::AuditEntry>>(key, value).is_ok_and(|entries| !entries.is_empty()),
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
/// from what the command is (the relay's command ids are derived alike). A
/// `rewrapped` is named by its version too: one rotation's passes may rewrap
/// an instance twice (see `tell::Command::new`), and the second command's
/// copy must not replace the first's, nor go when the first is sent.
pub(super) fn command_key(effect: &Effect) -> Option<(String, Vec<u8>)> {
    let version = |action: &CommandAction, version: &Option<String>| match (action, version) {
        (CommandAction::Rewrapped, Some(v)) => format!("@{v}"),
        _ => String::new(),
    };
    let (key_id, name) = match effect {
        Effect::KeyCommands { key_id, action, cause_event_id, .. } => (key_id, format!("{cause_event_id}/{action:?}/key")),
        Effect::InstanceCommand { key_id, instance_id, action, cause_event_id, key_version, .. } => {
            (key_id, format!("{cause_event_id}/{action:?}/{instance_id}{}", version(action, key_version)))
        }
        // Named by its first instance and its length, as a single command is
        // by its instance (and version).
        Effect::InstanceCommands { key_id, instances, action, cause_event_id, key_version, .. } => {
            let first = instances.first().map_or("", |i| i.instance_id.as_str());
            (key_id, format!("{cause_event_id}/{action:?}/{first}+{}{}", instances.len(), version(action, key_version)))
        }
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

/// A batch's changelog records as `UNPUBLISHED` holds them: per record its
/// partition, version, key and value (or none), length-prefixed. Not JSON:
/// it holds every byte of the batch again, and JSON spells bytes as numbers.
pub(super) fn encode_versioned(records: &[Versioned]) -> Vec<u8> {
    let size: usize = records.iter().map(|r| 21 + r.key.len() + r.value.as_ref().map_or(0, Vec::len)).sum();
    let mut out = Vec::with_capacity(size);
    for r in records {
        out.extend_from_slice(&r.partition.to_be_bytes());
        out.extend_from_slice(&r.version.to_be_bytes());
        out.extend_from_slice(&(r.key.len() as u32).to_be_bytes());
        out.extend_from_slice(&r.key);
        match &r.value {
            None => out.push(0),
            Some(v) => {
                out.push(1);
                out.extend_from_slice(&(v.len() as u32).to_be_bytes());
                out.extend_from_slice(v);
            }
        }
    }
    out
}

pub(super) fn decode_versioned(key: &[u8], mut bytes: &[u8]) -> Result<Vec<Versioned>, StoreError> {
    let corrupt = || StoreError::Corrupt { key: String::from_utf8_lossy(key).into_owned(), reason: "a truncated changelog record".into() };
    fn take<'a>(bytes: &mut &'a [u8], n: usize) -> Option<&'a [u8]> {
        let (head, rest) = (bytes.get(..n)?, bytes.get(n..)?);
        *bytes = rest;
        Some(head)
    }
    let mut out = Vec::new();
    while !bytes.is_empty() {
        let mut next = || -> Option<Versioned> {
            let partition = i32::from_be_bytes(take(&mut bytes, 4)?.try_into().ok()?);
            let version = i64::from_be_bytes(take(&mut bytes, 8)?.try_into().ok()?);
            let len = u32::from_be_bytes(take(&mut bytes, 4)?.try_into().ok()?) as usize;
            let record_key = take(&mut bytes, len)?.to_vec();
            let value = match take(&mut bytes, 1)?[0] {
                0 => None,
                1 => {
                    let len = u32::from_be_bytes(take(&mut bytes, 4)?.try_into().ok()?) as usize;
                    Some(take(&mut bytes, len)?.to_vec())
                }
                _ => return None,
            };
            Some(Versioned { partition, version, key: record_key, value })
        };
        out.push(next().ok_or_else(corrupt)?);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unpublished_records_decode_as_written_and_a_truncated_one_is_corrupt() {
        let records = vec![
            Versioned { partition: 2, version: 7, key: b"k/a".to_vec(), value: Some(b"{}".to_vec()) },
            Versioned { partition: 0, version: 8, key: b"c/x".to_vec(), value: None },
            Versioned { partition: 1, version: 9, key: b"x/a\0i".to_vec(), value: Some(vec![]) },
        ];
        let bytes = encode_versioned(&records);
        assert_eq!(decode_versioned(b"u/1", &bytes).unwrap(), records);
        // Cut anywhere but between two records, it is refused; never misread.
        for cut in 1..bytes.len() {
            match decode_versioned(b"u/1", &bytes[..cut]) {
                Ok(prefix) => assert!(prefix.len() < records.len() && records.starts_with(&prefix), "cut at {cut}"),
                Err(e) => assert!(matches!(e, StoreError::Corrupt { .. })),
            }
        }
        assert!(decode_versioned(b"u/1", &bytes[..bytes.len() - 1]).is_err());
    }

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

    #[test]
    fn a_second_rewrap_of_an_instance_by_one_rotation_has_its_own_replicated_name() {
        let rewrapped = |version: &str| Effect::InstanceCommand {
            instance_id: "i".into(),
            key_id: "k".into(),
            action: CommandAction::Rewrapped,
            key_version: Some(version.into()),
            cause_event_id: "rot".into(),
            issued_at: chrono::DateTime::UNIX_EPOCH,
            correlation_id: None,
            traceparent: None,
        };
        assert_eq!(command_key(&rewrapped("3")), command_key(&rewrapped("3")));
        assert_ne!(command_key(&rewrapped("3")), command_key(&rewrapped("4")));
    }
}
