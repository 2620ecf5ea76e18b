//! Plaintext DEKs unwrapped recently, so that the data plane's DEK requests do not
//! each cost a KMS call. Entries are dropped the moment their key is revoked or
//! their wrapped DEK changes; the state check always comes before the cache.

use std::collections::HashMap;
use std::sync::Mutex;

use super::Dek;

#[derive(Default)]
pub struct DekCache {
    entries: Mutex<HashMap<String, Entry>>,
}

struct Entry {
    key_id: String,
    key_version: String,
    dek: Dek,
}

impl DekCache {
    pub fn get(&self, instance_id: &str, key_version: &str) -> Option<Dek> {
        let entries = self.entries.lock().expect("dek cache lock");
        entries.get(instance_id).filter(|e| e.key_version == key_version).map(|e| e.dek.clone())
    }

    pub fn put(&self, instance_id: &str, key_id: &str, key_version: &str, dek: Dek) {
        let entry = Entry { key_id: key_id.to_string(), key_version: key_version.to_string(), dek };
        self.entries.lock().expect("dek cache lock").insert(instance_id.to_string(), entry);
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
