//! Plaintext DEKs unwrapped recently, so that the data plane's DEK requests do not
//! each cost a KMS call. Entries are dropped the moment their key is revoked or
//! their wrapped DEK changes; the state check always comes before the cache.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::Dek;

/// Plaintext may be served from memory for at most `max_age` after the KMS last
/// unwrapped it; after that the KMS must be asked again, and if it cannot be
/// reached the DEK is refused rather than served stale.
pub struct DekCache {
    entries: Mutex<HashMap<String, Entry>>,
    max_age: Duration,
    capacity: usize,
}

struct Entry {
    key_id: String,
    key_version: String,
    dek: Dek,
    unwrapped_at: Instant,
}

impl Default for DekCache {
    fn default() -> Self {
        Self::new(Duration::from_secs(4 * 3600), 100_000)
    }
}

impl DekCache {
    pub fn new(max_age: Duration, capacity: usize) -> DekCache {
        DekCache { entries: Mutex::new(HashMap::new()), max_age, capacity }
    }

    pub fn get(&self, instance_id: &str, key_version: &str) -> Option<Dek> {
        let mut entries = self.entries.lock().expect("dek cache lock");
        let fresh = entries.get(instance_id).map(|e| e.key_version == key_version && e.unwrapped_at.elapsed() < self.max_age);
        match fresh {
            Some(true) => entries.get(instance_id).map(|e| e.dek.clone()),
            Some(false) => {
                entries.remove(instance_id);
                None
            }
            None => None,
        }
    }

    pub fn put(&self, instance_id: &str, key_id: &str, key_version: &str, dek: Dek) {
        let entry = Entry { key_id: key_id.to_string(), key_version: key_version.to_string(), dek, unwrapped_at: Instant::now() };
        let mut entries = self.entries.lock().expect("dek cache lock");
        // Bounded: when full, drop the oldest unwraps first.
        if entries.len() >= self.capacity && !entries.contains_key(instance_id) {
            let mut by_age: Vec<(Instant, String)> = entries.iter().map(|(k, e)| (e.unwrapped_at, k.clone())).collect();
            by_age.sort();
            for (_, k) in by_age.into_iter().take((self.capacity / 10).max(1)) {
                entries.remove(&k);
            }
        }
        entries.insert(instance_id.to_string(), entry);
    }

    pub fn forget(&self, instance_id: &str) {
        self.entries.lock().expect("dek cache lock").remove(instance_id);
    }

    pub fn forget_key(&self, key_id: &str) {
        self.entries.lock().expect("dek cache lock").retain(|_, e| e.key_id != key_id);
    }

    pub fn len(&self) -> usize {
        self.entries.lock().expect("dek cache lock").len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plaintext_older_than_the_cache_age_is_not_served() {
        let c = DekCache::new(Duration::from_millis(30), 10);
        c.put("a", "k", "1", Dek::generate());
        assert!(c.get("a", "1").is_some());
        std::thread::sleep(Duration::from_millis(40));
        assert!(c.get("a", "1").is_none(), "past max_dek_cache_age the KMS must be asked again");
        assert!(c.is_empty());
    }

    #[test]
    fn the_cache_stays_bounded() {
        let c = DekCache::new(Duration::from_secs(60), 10);
        for i in 0..25 {
            c.put(&format!("i{i}"), "k", "1", Dek::generate());
        }
        assert!(c.len() <= 10);
        assert!(c.get("i24", "1").is_some(), "the newest stays");
    }

    #[test]
    fn revoking_a_key_drops_only_its_plaintext() {
        let c = DekCache::default();
        c.put("a", "k1", "1", Dek::generate());
        c.put("b", "k2", "1", Dek::generate());
        c.forget_key("k1");
        assert!(c.get("a", "1").is_none());
        assert!(c.get("b", "1").is_some());
        assert!(c.get("b", "2").is_none(), "a rewrapped DEK is not served from an old entry");
    }
}
