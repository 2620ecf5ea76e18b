//! The audit trail: one entry per action, whoever took it (an API token, a KMS
//! event, a schedule), hash-chained so that an edited or removed entry breaks
//! the chain. Entries are written in the same store batch as the state change
//! they describe, so the trail and the state can never disagree after a crash.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

pub use crate::engine::AuditFact;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditEntry {
    pub seq: u64,
    pub at: DateTime<Utc>,
    #[serde(flatten)]
    pub fact: AuditFact,
    /// Hash of the previous entry; all zeros for the first.
    pub prev: String,
    /// SHA-256 over every field above.
    pub hash: String,
}

pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

fn hash_of(e: &AuditEntry) -> String {
    let f = &e.fact;
    let mut h = Sha256::new();
    h.update(e.seq.to_be_bytes());
    let at = e.at.to_rfc3339();
    // Length-prefixed, and absent distinct from empty, so that no two
    // different entries hash the same bytes.
    let fields = [Some(&at), Some(&f.who), Some(&f.what), Some(&f.outcome)]
        .into_iter()
        .chain([&f.event_id, &f.key_id, &f.instance_id, &f.key_version, &f.correlation_id, &f.detail].map(Option::as_ref))
        .chain([Some(&e.prev)]);
    for field in fields {
        match field {
            Some(s) => {
                h.update([1]);
                h.update((s.len() as u64).to_be_bytes());
                h.update(s.as_bytes());
            }
            None => h.update([0]),
        }
    }
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

/// Places `facts` after `last` (seq and hash of the newest entry), in order.
pub fn seal(last: Option<&(u64, String)>, facts: impl IntoIterator<Item = AuditFact>, at: DateTime<Utc>) -> Vec<AuditEntry> {
    let (mut seq, mut prev) = last.cloned().unwrap_or((0, GENESIS.to_string()));
    facts
        .into_iter()
        .map(|fact| {
            seq += 1;
            let mut e = AuditEntry { seq, at, fact, prev: prev.clone(), hash: String::new() };
            e.hash = hash_of(&e);
            prev = e.hash.clone();
            e
        })
        .collect()
}

/// Checks that each entry hashes to its `hash` and links to the one before;
/// with `from_start`, also that the first entry is the first ever written.
pub fn verify(entries: &[AuditEntry], from_start: bool) -> Result<(), String> {
    let mut prev: Option<&AuditEntry> = None;
    for e in entries {
        if hash_of(e) != e.hash {
            return Err(format!("audit entry {} does not match its hash: it was altered", e.seq));
        }
        match prev {
            Some(p) if e.seq != p.seq + 1 || e.prev != p.hash => {
                return Err(format!("audit entry {} does not follow entry {}: an entry is missing or out of place", e.seq, p.seq))
            }
            None if from_start && (e.seq != 1 || e.prev != GENESIS) => {
                return Err(format!("the trail starts at entry {}, not 1: its first entries were removed", e.seq))
            }
            _ => {}
        }
        prev = Some(e);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::Record;
    use crate::store::Store;

    fn fact(i: usize) -> AuditFact {
        AuditFact { who: "admin".into(), what: format!("POST /v1/keys/k{i}/disable"), outcome: "202".into(), ..Default::default() }
    }

    #[test]
    fn the_chain_catches_an_edited_or_missing_entry_and_survives_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = Store::open(dir.path()).unwrap();
            store.commit(&(0..5).map(|i| Record::Audit(fact(i))).collect::<Vec<_>>(), true).unwrap();
        }
        let store = Store::open(dir.path()).unwrap();
        // A restart continues the same chain.
        store
            .commit(
                &[Record::Audit(AuditFact {
                    who: "kms-event".into(),
                    what: "event disable".into(),
                    outcome: "applied".into(),
                    key_id: Some("k".into()),
                    ..Default::default()
                })],
                true,
            )
            .unwrap();
        let entries = store.audit_since(None, usize::MAX).unwrap();
        assert_eq!(entries.len(), 6);
        verify(&entries, true).unwrap();
        let mut edited = entries.clone();
        edited[2].fact.outcome = "500".into();
        assert!(verify(&edited, true).unwrap_err().contains("altered"));
        let mut missing = entries.clone();
        missing.remove(3);
        assert!(verify(&missing, true).unwrap_err().contains("missing"));
        assert!(verify(&entries[1..], true).unwrap_err().contains("first entries were removed"));
        // An absent field and an empty one hash differently.
        let mut empty = entries.clone();
        empty[5].fact.instance_id = Some(String::new());
        assert!(verify(&empty, true).is_err());
    }
}
