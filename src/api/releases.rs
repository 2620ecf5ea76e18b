//! Every DEK release is audited (which instance, under which key version,
//! when, opened by which credential id, certificate identity or the shared
//! token; never a token), without the data plane ever waiting for it: the fetch hands the fact
//! to a bounded queue and answers; one task commits what has queued in
//! batches, through the writer, so a burst of releases costs one flush per
//! batch, not one per fetch.

use std::sync::Arc;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::engine::AuditFact;
use crate::metrics::Metrics;
use crate::store::writer::Writer;

/// Releases waiting to be committed at most; past it, a release is counted
/// in `keywarden_dek_release_audits_dropped_total` and logged, never waited for.
const QUEUED: usize = 65_536;
/// Releases committed in one writer job at most.
const BATCH: usize = 4_096;
/// How long the first release of a batch waits for others. Committing each
/// release as it came made one writer job (and its thread wake-ups) per
/// fetch: at one client's ~1,500 fetches/s that took the DEK fetch from
/// 0.81× to 0.28× of `/healthz` and its p99 from 0.5 to 4–9 ms (B5). An
/// entry is in the trail at most this much later; it was never waited for.
const WINDOW: std::time::Duration = std::time::Duration::from_millis(100);

#[derive(Clone)]
pub struct Releases {
    tx: mpsc::Sender<AuditFact>,
    metrics: Arc<Metrics>,
}

impl Releases {
    /// The queue, and the task that drains it (to be supervised).
    pub fn start(writer: Writer, metrics: Arc<Metrics>, stop: CancellationToken) -> (Releases, impl std::future::Future<Output = ()>) {
        let (tx, rx) = mpsc::channel(QUEUED);
        (Releases { tx, metrics }, drain(rx, writer, stop))
    }

    /// Never blocks: the DEK answer does not wait for its audit entry.
    pub fn record(&self, instance_id: &str, key_id: &str, key_version: &str, opener: &crate::api::credential::Opener) {
        let fact = AuditFact {
            who: "dek".into(),
            what: "release dek".into(),
            outcome: "200".into(),
            instance_id: Some(instance_id.to_string()),
            key_id: Some(key_id.to_string()),
            key_version: Some(key_version.to_string()),
            detail: Some(format!("opened by {}", opener.describe())),
            ..Default::default()
        };
        if self.tx.try_send(fact).is_err() {
            self.metrics.dek_release_audits_dropped.inc();
            tracing::error!(%instance_id, "a DEK release was not audited: the audit queue is full (the store writer is behind)");
        }
    }
}

async fn drain(mut rx: mpsc::Receiver<AuditFact>, writer: Writer, stop: CancellationToken) {
    loop {
        let first = tokio::select! {
            // What is queued at shutdown is still committed.
            _ = stop.cancelled() => match rx.try_recv() {
                Ok(fact) => fact,
                Err(_) => return,
            },
            fact = rx.recv() => match fact {
                Some(fact) => fact,
                None => return,
            },
        };
        let mut facts = vec![first];
        // The window is slept through, not spent receiving: a task waiting in
        // `recv` is woken by every release, one task switch (often a worker
        // unparked) per DEK fetch. Sleeping, it is woken once per batch and
        // takes what queued meanwhile. A full batch is committed at once.
        if rx.len() + 1 < BATCH {
            tokio::select! {
                // At shutdown, what is queued now is committed at once.
                _ = stop.cancelled() => {}
                _ = tokio::time::sleep(WINDOW) => {}
            }
        }
        while let (true, Ok(fact)) = (facts.len() < BATCH, rx.try_recv()) {
            facts.push(fact);
        }
        let n = facts.len();
        if let Err(e) = writer.audit_all(facts).await {
            tracing::error!(error = %e, releases = n, "cannot audit DEK releases; check the store");
        }
    }
}
