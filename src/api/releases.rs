//! Every DEK release is audited (which instance, under which key version,
//! when, opened by which credential id, certificate identity or the shared
//! token; never a token), without the data plane ever waiting for it: the fetch hands the release
//! to a bounded queue and answers; one task commits what has queued in
//! batches, through the writer, as one audit entry per batch that names
//! every release in it, so a burst of releases costs one flush, one hash
//! and one seal per batch, not per fetch.

use std::sync::Arc;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::engine::{AuditFact, Release};
use crate::metrics::Metrics;
use crate::store::writer::Writer;

/// Releases waiting to be committed at most; past it, a release is counted
/// in `keywarden_dek_release_audits_dropped_total` and logged, never waited for.
const QUEUED: usize = 65_536;
/// Releases committed in one writer job at most.
const BATCH: usize = 4_096;
/// Releases one audit entry names at most (~150 bytes each in the store): a
/// job of more writes several entries.
const PER_ENTRY: usize = 1_024;
/// How long the first release of a batch waits for others. Committing each
/// release as it came made one writer job (and its thread wake-ups) per
/// fetch: at one client's ~1,500 fetches/s that took the DEK fetch from
/// 0.81× to 0.28× of `/healthz` and its p99 from 0.5 to 4–9 ms (B5). An
/// entry is in the trail at most this much later; it was never waited for.
const WINDOW: std::time::Duration = std::time::Duration::from_millis(100);

#[derive(Clone)]
pub struct Releases {
    tx: mpsc::Sender<Release>,
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
        let release = Release {
            instance_id: instance_id.to_string(),
            key_id: key_id.to_string(),
            key_version: key_version.to_string(),
            opened_by: opener.describe(),
            at: chrono::Utc::now(),
        };
        if self.tx.try_send(release).is_err() {
            self.metrics.dek_release_audits_dropped.inc();
            tracing::error!(%instance_id, "a DEK release was not audited: the audit queue is full (the store writer is behind)");
        }
    }
}

/// The audit entries of a batch of releases, in order, [`PER_ENTRY`] to an entry.
fn entries(mut releases: Vec<Release>) -> Vec<AuditFact> {
    let mut facts = Vec::with_capacity(releases.len().div_ceil(PER_ENTRY));
    while !releases.is_empty() {
        let rest = releases.split_off(releases.len().min(PER_ENTRY));
        facts.push(entry(std::mem::replace(&mut releases, rest)));
    }
    facts
}

/// The audit entry of a batch of releases. What all of them share (the
/// instance, key, version, opener) is also said in the entry's own fields, so
/// that an entry of one release reads as one did before there were batches,
/// and a search by instance finds the entries that name only that instance.
fn entry(releases: Vec<Release>) -> AuditFact {
    fn shared<'a>(releases: &'a [Release], field: impl Fn(&'a Release) -> &'a str) -> Option<String> {
        let first = field(releases.first()?);
        releases.iter().all(|r| field(r) == first).then(|| first.to_string())
    }
    AuditFact {
        who: "dek".into(),
        what: "release dek".into(),
        outcome: "200".into(),
        instance_id: shared(&releases, |r| &r.instance_id),
        key_id: shared(&releases, |r| &r.key_id),
        key_version: shared(&releases, |r| &r.key_version),
        detail: Some(match shared(&releases, |r| &r.opened_by) {
            Some(opener) => format!("opened by {opener}"),
            None => format!("{} releases", releases.len()),
        }),
        releases,
        ..Default::default()
    }
}

async fn drain(mut rx: mpsc::Receiver<Release>, writer: Writer, stop: CancellationToken) {
    loop {
        let first = tokio::select! {
            // What is queued at shutdown is still committed.
            _ = stop.cancelled() => match rx.try_recv() {
                Ok(release) => release,
                Err(_) => return,
            },
            release = rx.recv() => match release {
                Some(release) => release,
                None => return,
            },
        };
        let mut releases = vec![first];
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
        while let (true, Ok(release)) = (releases.len() < BATCH, rx.try_recv()) {
            releases.push(release);
        }
        let n = releases.len();
        if let Err(e) = writer.audit_all(entries(releases)).await {
            tracing::error!(error = %e, releases = n, "cannot audit DEK releases; check the store");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn release(instance: &str, opened_by: &str) -> Release {
        Release { instance_id: instance.into(), key_id: "k".into(), key_version: "v1".into(), opened_by: opened_by.into(), at: chrono::Utc::now() }
    }

    #[test]
    fn a_batch_entry_names_every_release_and_says_only_what_all_of_them_share() {
        let one = entry(vec![release("a", "dek credential c1")]);
        assert_eq!((one.what.as_str(), one.instance_id.as_deref(), one.key_id.as_deref()), ("release dek", Some("a"), Some("k")));
        assert_eq!(one.detail.as_deref(), Some("opened by dek credential c1"));
        assert_eq!(one.releases.len(), 1);

        let two = entry(vec![release("a", "shared dek token"), release("b", "shared dek token")]);
        assert_eq!(two.instance_id, None, "two instances: neither is named as the entry's");
        assert_eq!((two.key_id.as_deref(), two.key_version.as_deref()), (Some("k"), Some("v1")));
        assert_eq!(two.detail.as_deref(), Some("opened by shared dek token"));
        let named: Vec<&str> = two.releases.iter().map(|r| r.instance_id.as_str()).collect();
        assert_eq!(named, ["a", "b"]);

        let mixed = entry(vec![release("a", "dek credential c1"), release("a", "client certificate spiffe://x/a")]);
        assert_eq!(mixed.instance_id.as_deref(), Some("a"));
        assert_eq!(mixed.detail.as_deref(), Some("2 releases"), "openers differ: none is named as the entry's");
    }

    #[test]
    fn a_large_batch_is_split_into_entries_in_order_and_none_is_left_out() {
        let n = 2 * PER_ENTRY + 3;
        let facts = entries((0..n).map(|i| release(&format!("i{i}"), "shared dek token")).collect());
        assert_eq!(facts.iter().map(|f| f.releases.len()).collect::<Vec<_>>(), [PER_ENTRY, PER_ENTRY, 3]);
        let named: Vec<String> = facts.iter().flat_map(|f| f.releases.iter().map(|r| r.instance_id.clone())).collect();
        assert_eq!(named, (0..n).map(|i| format!("i{i}")).collect::<Vec<_>>());
        assert!(entries(Vec::new()).is_empty());
    }
}
