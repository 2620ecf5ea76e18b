//! schedule: cron-driven sweeps. The purge destroys the wrapped DEKs of keys that
//! stayed deleted past `policy.purge_after`; the engine decides, this only asks.
//! For a key of the embedded KMS it then has the KMS destroy the key's material
//! too, so that no surviving copy of a wrapped DEK can be unwrapped.

pub mod reconcile;

use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio_util::sync::CancellationToken;

use crate::engine::{AuditFact, Input, KeyRecord, KeyStatus};
use crate::kms::local::LocalKms;
use crate::kms::router::KmsRouter;
use crate::kms::KmsError;
use crate::store::writer::{Writer, WriterError};
use crate::store::Store;

/// The embedded KMS, and the router that tells which keys it serves: the
/// purge destroys the material of those keys, and only of those.
#[derive(Clone)]
pub struct Embedded {
    pub router: Arc<KmsRouter>,
    pub local: Arc<LocalKms>,
}

/// How long the audit entry of a destroyed key's material may wait for the
/// writer; the material is gone either way.
const AUDIT_TIMEOUT: Duration = Duration::from_secs(5);

pub async fn purge_loop(
    store: Store,
    writer: Writer,
    ownership: crate::cluster::Ownership,
    schedule: String,
    purge_after: Duration,
    embedded: Embedded,
    shutdown: CancellationToken,
) {
    // validate() already parsed it; a failure here would be a bug, so say so loudly.
    let Ok(schedule) = cron::Schedule::from_str(&schedule) else {
        tracing::error!(%schedule, "purge schedule does not parse; purging is off");
        return;
    };
    loop {
        let Some(next) = schedule.upcoming(Utc).next() else { return };
        let wait = (next - Utc::now()).to_std().unwrap_or(Duration::ZERO);
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(wait) => {}
        }
        if let Err(e) = purge_round(&store, &writer, &ownership, purge_after, &embedded, Utc::now()).await {
            tracing::error!(error = %e, "purge stopped");
            return;
        }
    }
}

/// One sweep at `now`. Err only when the writer is gone (the daemon is
/// stopping or failed); a round that cannot read the keys is skipped.
async fn purge_round(
    store: &Store,
    writer: &Writer,
    ownership: &crate::cluster::Ownership,
    purge_after: Duration,
    embedded: &Embedded,
    now: DateTime<Utc>,
) -> Result<(), WriterError> {
    let window = chrono::Duration::from_std(purge_after).unwrap_or(chrono::Duration::MAX);
    // Each node purges the keys it owns; together they purge all.
    let keys = match store.keys() {
        Ok(keys) => ownership.mine(keys, |k| &k.key_id),
        Err(e) => {
            tracing::error!(error = %e, "cannot read the keys; this purge round is skipped");
            return Ok(());
        }
    };
    for key in keys {
        // A window too long to add never passes (and never overflows).
        let due = key.status == KeyStatus::Deleted
            && key.purged_at.is_none()
            && key.deleted_at.and_then(|d| d.checked_add_signed(window)).is_some_and(|end| end <= now);
        if due {
            writer.submit(Input::Purge { key_id: key.key_id.clone(), purge_after, at: now }).await?;
            tracing::warn!(key_id = %key.key_id, "restore window passed: wrapped DEKs destroyed");
        }
        // Just purged, or purged in an earlier round whose destruction failed
        // (a destroyed key costs one read here, and changes nothing).
        if key.status == KeyStatus::Deleted && (due || key.purged_at.is_some()) {
            destroy_material(writer, embedded, &key).await;
        }
    }
    Ok(())
}

/// Has the embedded KMS destroy the material of a purged key it serves, and
/// audits it. The KMS checks its own record (deleted, window ended), so a key
/// restored meanwhile keeps its material.
async fn destroy_material(writer: &Writer, embedded: &Embedded, key: &KeyRecord) {
    let Some(id) = embedded.router.embedded_id(&key.key_id) else { return };
    match embedded.local.destroy_material(id).await {
        Ok(true) => {
            tracing::warn!(key_id = %key.key_id, "restore window passed: the embedded kms destroyed the key's material; nothing it wrapped can be unwrapped");
            let fact = AuditFact {
                who: "schedule:purge".into(),
                what: "destroy key material".into(),
                outcome: "destroyed".into(),
                key_id: Some(key.key_id.clone()),
                key_version: key.version.clone(),
                detail: Some("the embedded kms destroyed the sealed material of every version of the key: no wrapped DEK of it can be unwrapped".into()),
                ..Default::default()
            };
            if let Err(e) = writer.audit(fact, AUDIT_TIMEOUT).await {
                tracing::error!(key_id = %key.key_id, error = %e, "cannot write the audit entry of the destroyed key material; check the store");
            }
        }
        Ok(false) => {}
        // Not the embedded KMS's to destroy (yet): restored there, inside its
        // own window, or a key it never held.
        Err(e @ (KmsError::Conflict(_) | KmsError::UnknownKey(_))) => tracing::debug!(key_id = %key.key_id, error = %e, "key material not destroyed"),
        Err(e) => tracing::error!(key_id = %key.key_id, error = %e, "cannot destroy the key's material; the next purge round tries again"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::{EventType, Record, WrappedDek};
    use crate::kms::router::Route;
    use crate::kms::{Dek, Kms, KmsKeyState};

    /// A remote provider: never called, only named.
    struct Remote;

    #[async_trait::async_trait]
    impl Kms for Remote {
        fn provider(&self) -> &'static str {
            "aws"
        }
        async fn wrap(&self, _: &str, _: &Dek, _: &[u8], _: Option<&str>) -> Result<WrappedDek, KmsError> {
            Err(KmsError::Unavailable("not called".into()))
        }
        async fn unwrap(&self, _: &str, _: &WrappedDek, _: &[u8]) -> Result<Dek, KmsError> {
            Err(KmsError::Unavailable("not called".into()))
        }
        async fn rewrap(&self, _: &str, _: &WrappedDek, _: &[u8], _: Option<&str>) -> Result<WrappedDek, KmsError> {
            Err(KmsError::Unavailable("not called".into()))
        }
        async fn key_state(&self, _: &str) -> Result<KmsKeyState, KmsError> {
            Err(KmsError::Unavailable("not called".into()))
        }
    }

    /// keywarden's record of a key deleted an hour before `now`.
    fn deleted(key_id: &str, now: DateTime<Utc>, purged: bool) -> Record {
        let mut k = KeyRecord::new(key_id, now);
        k.status = KeyStatus::Deleted;
        k.deleted_at = Some(now - chrono::Duration::hours(1));
        k.purged_at = purged.then_some(now - chrono::Duration::minutes(1));
        Record::Key(k)
    }

    #[tokio::test]
    async fn the_purge_destroys_the_material_of_the_embedded_kms_s_purged_keys_only_and_once() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("db")).unwrap();
        let ownership = crate::cluster::Ownership::single(Default::default());
        let (writer, _thread) = Writer::start(store.clone(), ownership.clone(), 16, Box::new(|_| {}));
        // The embedded KMS's own window has ended as soon as a delete is applied.
        let local = Arc::new(LocalKms::open(store.clone(), writer.clone(), &dir.path().join("master.key"), Duration::ZERO).unwrap());
        let router = Arc::new(KmsRouter::new(vec![Route { prefix: "remote:".into(), strip: false, kms: Arc::new(Remote) }], local.clone()));
        let embedded = Embedded { router, local: local.clone() };
        let now = Utc::now();
        // due: deleted past the window here and in the KMS; earlier: purged in
        // an earlier round whose destruction did not happen; remote: the KMS
        // holds a key of that id, but the router gives it to another provider;
        // restored: keywarden's record says deleted, the KMS's does not (it
        // was restored there, and keywarden has not seen the event yet).
        for key in ["due", "earlier", "remote:k", "restored"] {
            local.create_key(Some(key.into())).await.unwrap();
            if key != "restored" {
                local.operate(key, EventType::Delete).await.unwrap();
            }
        }
        assert_eq!(local.state("restored").unwrap().0, KeyStatus::Active);
        let dek = Dek::generate();
        let kept = local.wrap("restored", &dek, b"i", None).await.unwrap();
        writer
            .import(vec![deleted("due", now, false), deleted("earlier", now, true), deleted("remote:k", now, false), deleted("restored", now, false)])
            .await
            .unwrap();

        purge_round(&store, &writer, &ownership, Duration::from_secs(60), &embedded, now).await.unwrap();
        let destroyed = |key: &str| local.material_destroyed_at(key).unwrap().is_some();
        assert!(destroyed("due") && destroyed("earlier"));
        assert!(!destroyed("remote:k"), "a remote provider's key is not the embedded kms's to destroy");
        assert!(!destroyed("restored"), "the kms's own record decides");
        assert_eq!(local.unwrap("restored", &kept, b"i").await.unwrap().expose(), dek.expose());
        assert!(store.key("due").unwrap().unwrap().purged_at.is_some(), "the wrapped DEKs were purged first");
        let audited =
            || store.audit(100).unwrap().into_iter().filter(|e| e.fact.what == "destroy key material").map(|e| e.fact.key_id.unwrap()).collect::<Vec<_>>();
        let mut proof = audited();
        proof.sort();
        assert_eq!(proof, ["due", "earlier"]);

        // The next round finds nothing left to destroy.
        let before = store.kms_get("due").unwrap();
        purge_round(&store, &writer, &ownership, Duration::from_secs(60), &embedded, Utc::now()).await.unwrap();
        assert_eq!(store.kms_get("due").unwrap(), before);
        assert_eq!(audited().len(), 2, "each destruction is audited once");
    }
}
