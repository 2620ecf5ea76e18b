//! The audit trail: one entry per action, whoever took it (an API token, a KMS
//! event, a schedule), hash-chained so that an edited or removed entry breaks
//! the chain. Entries are written in the same store batch as the state change
//! they describe, so the trail and the state can never disagree after a crash.
//!
//! The hash chain alone proves nothing to someone who can write the store: he
//! can edit an entry and recompute every hash after it. So each entry is also
//! sealed: an HMAC-SHA256 over its hash under the audit secret
//! (`audit.secret_file`), which is kept out of the store. An entry edited
//! offline, chain recomputed or not, no longer matches its seal.
//!
//! Entries written before the trail was keyed carry no seal. They verify by
//! their hash chain alone, and only when an anchor follows them: the first
//! sealed entry after them, sealed under a tag of its own, which keywarden
//! writes only on the start that creates the audit secret. A trail whose seals
//! were stripped (rewritten as if it were that old) has no anchor, and fails.

use chrono::{DateTime, Utc};
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

use crate::text::{hex, unhex};

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
    /// HMAC-SHA256 under the audit secret over `hash` (so over every field and
    /// the chain before it), hex: what write access to the store cannot
    /// recompute. Absent on entries written before the trail was keyed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
}

pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// The audit secret. Never stored in the store: see the module's doc.
pub struct AuditKey(Zeroizing<Vec<u8>>);

/// Which tag a seal is taken under: an anchor vouches for the unsealed entries
/// before it, so a normal entry must not be able to pass for one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Seal {
    Entry,
    Anchor,
}

impl AuditKey {
    pub fn new(secret: Zeroizing<Vec<u8>>) -> AuditKey {
        AuditKey(secret)
    }

    /// Fixed, so that a test store reopened still verifies.
    #[cfg(test)]
    pub(crate) fn for_tests() -> AuditKey {
        AuditKey::new(Zeroizing::new(b"keywarden-unit-test-audit-secret-0123456789".to_vec()))
    }

    /// For a store nobody gave a secret (a library user, not the daemon):
    /// its entries verify in this process only, and fail after a restart,
    /// which is the safe way round.
    #[cfg(not(test))]
    pub(crate) fn throwaway() -> AuditKey {
        use rand::RngCore;
        let mut secret = Zeroizing::new(vec![0u8; 32]);
        rand::rngs::OsRng.fill_bytes(&mut secret);
        AuditKey(secret)
    }

    fn hmac(&self, seal: Seal, e: &AuditEntry) -> Hmac<Sha256> {
        // HMAC accepts a key of any length.
        let mut mac = Hmac::<Sha256>::new_from_slice(&self.0).unwrap_or_else(|_| unreachable!("hmac takes any key length"));
        mac.update(match seal {
            Seal::Entry => b"keywarden audit entry v1\0".as_slice(),
            Seal::Anchor => b"keywarden audit anchor v1\0".as_slice(),
        });
        mac.update(e.hash.as_bytes());
        mac
    }

    fn seal(&self, seal: Seal, e: &AuditEntry) -> String {
        hex(&self.hmac(seal, e).finalize().into_bytes())
    }

    /// Under which tag the entry's seal was taken with this key, if under any;
    /// compared in constant time.
    fn sealed_as(&self, e: &AuditEntry) -> Option<Seal> {
        let mac = unhex(e.mac.as_deref()?)?;
        [Seal::Entry, Seal::Anchor].into_iter().find(|&s| self.hmac(s, e).verify_slice(&mac).is_ok())
    }
}

/// The newest entry, as the next seal needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Head {
    pub seq: u64,
    pub hash: String,
    /// False for an entry written before the trail was keyed.
    pub sealed: bool,
}

impl Head {
    pub fn of(e: &AuditEntry) -> Head {
        Head { seq: e.seq, hash: e.hash.clone(), sealed: e.mac.is_some() }
    }
}

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
    let text = |h: &mut Sha256, s: &str| {
        h.update((s.len() as u64).to_be_bytes());
        h.update(s.as_bytes());
    };
    for field in fields {
        match field {
            Some(s) => {
                h.update([1]);
                text(&mut h, s);
            }
            None => h.update([0]),
        }
    }
    // After everything an entry without releases hashes, and only when there
    // are some: the hashes of the entries written before they existed stand.
    if !f.releases.is_empty() {
        h.update(b"releases");
        h.update((f.releases.len() as u64).to_be_bytes());
        for r in &f.releases {
            for s in [&r.instance_id, &r.key_id, &r.key_version, &r.opened_by, &r.at.to_rfc3339()] {
                text(&mut h, s);
            }
        }
    }
    hex(&h.finalize())
}

/// Places `facts` after `last`, in order, each sealed under `key`. With
/// `anchor`, and `last` written before the trail was keyed, the first of them
/// is the anchor that vouches for the unsealed entries before it.
pub fn seal(key: &AuditKey, last: Option<&Head>, anchor: bool, facts: impl IntoIterator<Item = AuditFact>, at: DateTime<Utc>) -> Vec<AuditEntry> {
    let (mut seq, mut prev) = last.map(|h| (h.seq, h.hash.clone())).unwrap_or((0, GENESIS.to_string()));
    let mut kind = if anchor && last.is_some_and(|h| !h.sealed) { Seal::Anchor } else { Seal::Entry };
    facts
        .into_iter()
        .map(|fact| {
            seq += 1;
            let mut e = AuditEntry { seq, at, fact, prev: prev.clone(), hash: String::new(), mac: None };
            e.hash = hash_of(&e);
            e.mac = Some(key.seal(kind, &e));
            kind = Seal::Entry;
            prev = e.hash.clone();
            e
        })
        .collect()
}

/// This node's name in the changelog's sealed batches (`schema::SEALED`): taken
/// from its audit secret, so that it is stable across restarts, differs between
/// nodes and tells nothing about the secret.
pub fn node_id(key: &AuditKey) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(&key.0).unwrap_or_else(|_| unreachable!("hmac takes any key length"));
    mac.update(b"keywarden audit node id v1");
    hex(&mac.finalize().into_bytes()[..8])
}

/// Whether `entries`, read back from the changelog, are this node's own and
/// come next in its trail: the first follows `last`, each follows the one
/// before, and every one is sealed under `key`.
pub fn follows(key: &AuditKey, last: Option<&Head>, entries: &[AuditEntry]) -> bool {
    let Some(first) = entries.first() else { return false };
    let (seq, prev) = last.map(|h| (h.seq, h.hash.as_str())).unwrap_or((0, GENESIS));
    first.seq == seq + 1 && first.prev == prev && sealed_by(key, entries)
}

/// Whether every entry hashes right, links to the one before and is sealed under `key`.
pub fn sealed_by(key: &AuditKey, entries: &[AuditEntry]) -> bool {
    entries.iter().all(|e| e.mac.is_some()) && verify(key, entries, false).is_ok()
}

/// What a verification found, when the trail holds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Verified {
    /// Entries from before the trail was keyed, vouched for by the anchor
    /// after them: nobody changed them since the anchor was written, but
    /// before that only their hash chain protected them.
    pub legacy: u64,
}

/// Checks that each entry hashes to its `hash`, links to the one before and
/// carries a seal made with `key` (or, written before the trail was keyed, is
/// vouched for by an anchor after it); with `from_start`, also that the first
/// entry is the first ever written.
pub fn verify(key: &AuditKey, entries: &[AuditEntry], from_start: bool) -> Result<Verified, String> {
    let mut prev: Option<&AuditEntry> = None;
    // The run of unsealed entries since the last sealed one: its first seq and length.
    let mut unsealed: Option<(u64, u64)> = None;
    let mut legacy = 0;
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
        match (&e.mac, prev) {
            (None, Some(p)) if p.mac.is_some() => {
                return Err(format!("audit entry {} has no seal but follows sealed entry {}: its seal was removed, it was altered", e.seq, p.seq))
            }
            (None, _) => unsealed.get_or_insert((e.seq, 0)).1 += 1,
            (Some(_), _) => match (key.sealed_as(e), unsealed.take()) {
                (Some(Seal::Entry), None) => {}
                (Some(Seal::Anchor), Some((_, n))) => legacy += n,
                // A window of the trail may begin at the anchor.
                (Some(Seal::Anchor), None) if prev.is_none() && !from_start => {}
                (Some(Seal::Anchor), None) => {
                    return Err(format!("audit entry {} is an anchor that follows no unsealed entry: entries before it were removed", e.seq))
                }
                (Some(Seal::Entry), Some((first, _))) => return Err(unanchored(first, e.seq - 1)),
                (None, _) => return Err(format!("audit entry {} does not match its seal: it was altered, or sealed under another audit secret", e.seq)),
            },
        }
        prev = Some(e);
    }
    match (unsealed, prev) {
        (Some((first, _)), Some(last)) => Err(unanchored(first, last.seq)),
        _ => Ok(Verified { legacy }),
    }
}

fn unanchored(first: u64, last: u64) -> String {
    format!(
        "audit entries {first} to {last} carry no seal and no anchor vouches for them: they were rewritten by someone without the audit secret, or the store is older than the secret (see the README's audit trail section)"
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::Record;
    use crate::store::Store;

    fn fact(i: usize) -> AuditFact {
        AuditFact { who: "admin".into(), what: format!("POST /v1/keys/k{i}/disable"), outcome: "202".into(), ..Default::default() }
    }

    fn other_key() -> AuditKey {
        AuditKey::new(Zeroizing::new(b"another-deployment-audit-secret-0123456789".to_vec()))
    }

    /// Hashes and links from `from` on again, as the code before the seals did
    /// (`hash_of` is unchanged): what anyone who can write the store can do.
    fn recompute(entries: &mut [AuditEntry], from: usize) {
        for i in from..entries.len() {
            entries[i].prev = if i == 0 { GENESIS.to_string() } else { entries[i - 1].hash.clone() };
            entries[i].hash = hash_of(&entries[i]);
        }
    }

    /// A trail as keywarden wrote it before the seals: hashed and linked, no `mac`.
    fn unsealed(n: usize) -> Vec<AuditEntry> {
        let mut entries: Vec<AuditEntry> = seal(&AuditKey::for_tests(), None, false, (0..n).map(fact), Utc::now());
        for e in &mut entries {
            e.mac = None;
        }
        entries
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
        let key = AuditKey::for_tests();
        let verify = |entries: &[AuditEntry], from_start| verify(&key, entries, from_start);
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

    #[test]
    fn every_release_a_batch_entry_names_is_hashed_and_an_entry_without_any_hashes_as_before() {
        let release = |instance: &str| crate::engine::Release {
            instance_id: instance.into(),
            key_id: "k".into(),
            key_version: "v1".into(),
            opened_by: "dek credential c1".into(),
            at: Utc::now(),
        };
        let plain = fact(1);
        let releases = AuditFact { releases: vec![release("a"), release("b")], ..fact(2) };
        let key = AuditKey::for_tests();
        let entries = seal(&key, None, false, [plain.clone(), releases], Utc::now());
        verify(&key, &entries, true).unwrap();
        // Through the store's JSON and back: the times hash as they decode.
        let decoded: Vec<AuditEntry> = entries.iter().map(|e| serde_json::from_slice(&serde_json::to_vec(e).unwrap()).unwrap()).collect();
        verify(&key, &decoded, true).unwrap();
        for edit in [
            &(|e: &mut AuditEntry| e.fact.releases[1].instance_id = "c".into()) as &dyn Fn(&mut AuditEntry),
            &|e| e.fact.releases[0].opened_by = "shared dek token".into(),
            &|e| e.fact.releases[1].at += chrono::Duration::milliseconds(1),
            &|e| drop(e.fact.releases.pop()),
            &|e| e.fact.releases.swap(0, 1),
        ] {
            let mut edited = entries.clone();
            edit(&mut edited[1]);
            assert!(verify(&key, &edited, true).unwrap_err().contains("altered"));
        }
        // An entry without releases hashes the bytes it always did: the hash
        // below was computed outside this code (Python's hashlib) by the
        // algorithm from before there were releases.
        let old = AuditEntry {
            seq: 1,
            at: "2026-01-02T03:04:05Z".parse().unwrap(),
            fact: AuditFact { who: "dek".into(), what: "release dek".into(), outcome: "200".into(), instance_id: Some("db-1".into()), ..Default::default() },
            prev: GENESIS.to_string(),
            hash: String::new(),
            mac: None,
        };
        assert_eq!(hash_of(&old), "c3b3fd04a5d8ac2526e5ad6d928a8096c6a2d7973b9344ccd33f5c56fefb0191");
        let mut with = entries[0].clone();
        with.fact.releases = vec![release("a")];
        assert_ne!(hash_of(&with), entries[0].hash);
    }

    #[test]
    fn an_entry_edited_with_the_chain_recomputed_without_the_key_fails_at_that_entry() {
        let key = AuditKey::for_tests();
        let entries = seal(&key, None, false, (0..6).map(fact), Utc::now());
        assert_eq!(verify(&key, &entries, true), Ok(Verified { legacy: 0 }));

        let mut rehashed = entries.clone();
        rehashed[2].fact.outcome = "nothing to see here".into();
        recompute(&mut rehashed, 0);
        // The hashes and links hold again; the seals do not.
        assert_eq!(rehashed[..2], entries[..2]);
        let err = verify(&key, &rehashed, true).unwrap_err();
        assert!(err.starts_with("audit entry 3 does not match its seal"), "{err}");

        // Dropping the seals from the edited entry on does not help either...
        let mut stripped = rehashed.clone();
        for e in &mut stripped[2..] {
            e.mac = None;
        }
        let err = verify(&key, &stripped, true).unwrap_err();
        assert!(err.starts_with("audit entry 3 has no seal but follows sealed entry 2"), "{err}");
        // ...nor from all of them: an unsealed trail needs an anchor.
        for e in &mut stripped {
            e.mac = None;
        }
        let err = verify(&key, &stripped, true).unwrap_err();
        assert!(err.starts_with("audit entries 1 to 6 carry no seal and no anchor"), "{err}");
    }

    #[test]
    fn the_key_verifies_and_another_key_does_not() {
        let key = AuditKey::for_tests();
        let entries = seal(&key, None, false, (0..3).map(fact), Utc::now());
        assert!(verify(&key, &entries, true).is_ok());
        assert!(verify(&key, &entries[1..], false).is_ok(), "a window verifies too");
        let err = verify(&other_key(), &entries, true).unwrap_err();
        assert!(err.contains("audit entry 1 does not match its seal") && err.contains("another audit secret"), "{err}");
        // Resealed under another key by someone who has one: still not ours.
        let resealed = seal(&other_key(), None, false, entries.iter().map(|e| e.fact.clone()), entries[0].at);
        assert!(verify(&key, &resealed, true).unwrap_err().contains("does not match its seal"));
        let mut garbled = entries.clone();
        garbled[1].mac = Some("not hex".into());
        assert!(verify(&key, &garbled, true).unwrap_err().starts_with("audit entry 2 does not match its seal"));
    }

    #[test]
    fn entries_from_before_the_key_verify_as_legacy_only_under_an_anchor() {
        let key = AuditKey::for_tests();
        let mut old = unsealed(4);
        let head = Head::of(&old[3]);
        assert!(!head.sealed);

        let anchored = [old.clone(), seal(&key, Some(&head), true, (4..6).map(fact), Utc::now())].concat();
        assert_eq!(verify(&key, &anchored, true), Ok(Verified { legacy: 4 }));
        assert!(verify(&key, &anchored[4..], false).is_ok(), "a window may begin at the anchor");
        assert!(verify(&key, &anchored[5..], false).is_ok(), "and after it");
        assert!(verify(&other_key(), &anchored, true).is_err());

        // Sealed on without an anchor (the start did not create the secret):
        // the unsealed entries are not vouched for.
        let unanchored = [old.clone(), seal(&key, Some(&head), false, (4..6).map(fact), Utc::now())].concat();
        let err = verify(&key, &unanchored, true).unwrap_err();
        assert!(err.starts_with("audit entries 1 to 4 carry no seal and no anchor"), "{err}");
        assert!(verify(&key, &old, true).unwrap_err().starts_with("audit entries 1 to 4"), "nor before anything is sealed");

        // An unsealed entry edited after the anchor was written: the anchor's link breaks.
        old[1].fact.outcome = "nothing to see here".into();
        recompute(&mut old, 1);
        let edited = [old, anchored[4..].to_vec()].concat();
        assert!(verify(&key, &edited, true).unwrap_err().starts_with("audit entry 5 does not follow entry 4"));
    }

    #[test]
    fn the_store_anchors_its_unsealed_entries_only_when_told_to() {
        for anchor in [true, false] {
            let dir = tempfile::tempdir().unwrap();
            {
                let store = Store::open(dir.path()).unwrap();
                for e in unsealed(3) {
                    store.tree.insert(crate::store::schema::queue_key(crate::store::schema::AUDIT, e.seq), crate::store::schema::encode(&e)).unwrap();
                }
            }
            let store = Store::open(dir.path()).unwrap();
            assert_eq!(store.audit_unsealed(), Some(3));
            store.set_audit_key(AuditKey::for_tests(), anchor).unwrap();
            assert!(store.set_audit_key(other_key(), anchor).is_err(), "set once");
            store.commit(&[Record::Audit(fact(3)), Record::Audit(fact(4))], true).unwrap();
            assert_eq!(store.audit_unsealed(), None);
            let entries = store.audit_since(None, usize::MAX).unwrap();
            match store.verify_audit(&entries, true) {
                Ok(v) => assert!(anchor && v.legacy == 3, "{v:?}"),
                Err(e) => assert!(!anchor && e.contains("carry no seal"), "{e}"),
            }
        }
    }
}
