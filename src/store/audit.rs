//! The audit trail: one entry per write through the API (who, what, outcome),
//! hash-chained so that an edited or deleted entry breaks the chain.

use std::sync::Mutex;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::{Store, StoreError};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditEntry {
    pub seq: u64,
    pub at: DateTime<Utc>,
    /// Which token made the call ("admin" or "dek").
    pub who: String,
    /// Method and path, e.g. "POST /v1/keys/k1/disable".
    pub what: String,
    /// The HTTP status answered.
    pub outcome: u16,
    /// Hash of the previous entry; all zeros for the first.
    pub prev: String,
    /// SHA-256 over the fields above.
    pub hash: String,
}

fn hash_of(e: &AuditEntry) -> String {
    let mut h = Sha256::new();
    h.update(e.seq.to_be_bytes());
    h.update(e.at.to_rfc3339().as_bytes());
    for part in [&e.who, &e.what, &e.prev] {
        h.update((part.len() as u64).to_be_bytes());
        h.update(part.as_bytes());
    }
    h.update(e.outcome.to_be_bytes());
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

/// Appends in order; the lock keeps the chain linear.
pub struct Audit {
    store: Store,
    last: Mutex<Option<(u64, String)>>,
}

impl Audit {
    pub fn new(store: Store) -> Audit {
        let last = store.audit_last().map(|e| (e.seq, e.hash));
        Audit { store, last: Mutex::new(last) }
    }

    pub fn record(&self, who: &str, what: String, outcome: u16) -> Result<AuditEntry, StoreError> {
        let mut last = self.last.lock().expect("audit lock");
        let (seq, prev) = match last.as_ref() {
            Some((s, h)) => (s + 1, h.clone()),
            None => (1, "0".repeat(64)),
        };
        let mut entry = AuditEntry { seq, at: Utc::now(), who: who.to_string(), what, outcome, prev, hash: String::new() };
        entry.hash = hash_of(&entry);
        self.store.audit_put(&entry)?;
        *last = Some((entry.seq, entry.hash.clone()));
        Ok(entry)
    }
}

/// Checks that each entry hashes to its `hash` and links to the one before.
pub fn verify(entries: &[AuditEntry]) -> Result<(), String> {
    let mut prev: Option<&AuditEntry> = None;
    for e in entries {
        if hash_of(e) != e.hash {
            return Err(format!("audit entry {} does not match its hash: it was altered", e.seq));
        }
        if let Some(p) = prev {
            if e.seq != p.seq + 1 || e.prev != p.hash {
                return Err(format!("audit entry {} does not follow entry {}: an entry is missing or out of place", e.seq, p.seq));
            }
        }
        prev = Some(e);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_chain_catches_an_edited_or_missing_entry() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let audit = Audit::new(store.clone());
        for i in 0..5 {
            audit.record("admin", format!("POST /v1/keys/k{i}/disable"), 202).unwrap();
        }
        let entries = store.audit(100);
        assert_eq!(entries.len(), 5);
        verify(&entries).unwrap();
        let mut edited = entries.clone();
        edited[2].outcome = 500;
        assert!(verify(&edited).unwrap_err().contains("altered"));
        let mut missing = entries.clone();
        missing.remove(3);
        assert!(verify(&missing).unwrap_err().contains("missing"));
        // A restart continues the same chain.
        let again = Audit::new(store.clone());
        again.record("dek", "POST /v1/instances/i/dek".into(), 200).unwrap();
        verify(&store.audit(100)).unwrap();
    }
}
