//! schedule: cron-driven sweeps. The purge destroys the wrapped DEKs of keys that
//! stayed deleted past `policy.purge_after`; the engine decides, this only asks.

pub mod reconcile;

use std::str::FromStr;
use std::time::Duration;

use chrono::Utc;
use tokio_util::sync::CancellationToken;

use crate::engine::{Input, KeyStatus};
use crate::store::writer::Writer;
use crate::store::Store;

pub async fn purge_loop(
    store: Store,
    writer: Writer,
    ownership: crate::cluster::Ownership,
    schedule: String,
    purge_after: Duration,
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
        let now = Utc::now();
        let window = chrono::Duration::from_std(purge_after).unwrap_or(chrono::Duration::MAX);
        // Each node purges the keys it owns; together they purge all.
        let keys = match store.keys() {
            Ok(keys) => ownership.mine(keys, |k| &k.key_id),
            Err(e) => {
                tracing::error!(error = %e, "cannot read the keys; this purge round is skipped");
                continue;
            }
        };
        for key in keys {
            // A window too long to add never passes (and never overflows).
            let due = key.status == KeyStatus::Deleted
                && key.purged_at.is_none()
                && key.deleted_at.and_then(|d| d.checked_add_signed(window)).is_some_and(|end| end <= now);
            if !due {
                continue;
            }
            match writer.submit(Input::Purge { key_id: key.key_id.clone(), purge_after, at: now }).await {
                Ok(_) => tracing::warn!(key_id = %key.key_id, "restore window passed: wrapped DEKs destroyed"),
                Err(e) => {
                    tracing::error!(error = %e, "purge stopped");
                    return;
                }
            }
        }
    }
}
