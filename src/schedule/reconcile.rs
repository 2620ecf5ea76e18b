//! Reconciliation. KMS events are best effort (AWS says so of EventBridge), so on
//! a schedule every key in use is compared with what its KMS reports now, and
//! each difference is applied as the event that was missed, through the same
//! engine path as any event. The worst-case staleness of keywarden's view is
//! therefore one reconciliation interval.
//!
//! A run that would revoke or erase more than `reconcile.confirm_above`
//! instances does not act: one misread of a KMS must not mass-revoke a region.
//! It alerts and keeps its plan until an operator confirms it.

use std::str::FromStr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use crate::config::ReconcileConfig;
use crate::engine::{Alert, EventType, Input, KeyRecord, KeyStatus, LifecycleEvent, Severity};
use crate::kms::Kms;
use crate::store::writer::{Writer, WriterError};
use crate::store::Store;

#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    #[error("a reconciliation is already running; wait for it to finish")]
    Busy,
    #[error("the store writer refused: {0}")]
    Writer(#[from] WriterError),
    #[error("cannot read the store: {0}")]
    Store(#[from] crate::store::StoreError),
    #[error("counting the instances of each key stopped ({0}); the next reconciliation tries again")]
    Interrupted(String),
}

/// One key whose KMS disagrees with keywarden, and the event that fixes it.
#[derive(Debug, Clone, Serialize)]
pub struct Correction {
    pub key_id: String,
    pub ours: KeyStatus,
    pub kms: KeyStatus,
    #[serde(rename = "type")]
    pub kind: EventType,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key_version: Option<String>,
    /// Instances under the key: how many a revoke or erase would touch.
    pub instances: usize,
    /// The KMS no longer knows the key (Key Protect answers 404 after a
    /// purge): the delete destroys the instances' wrapped DEKs, for good.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub material_destroyed: bool,
}

impl Correction {
    fn revokes(&self) -> bool {
        matches!(self.kind, EventType::Disable | EventType::Delete)
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub keys_checked: usize,
    /// Keys whose KMS could not be asked; they are checked again next time.
    pub unreachable: Vec<String>,
    pub corrections: Vec<Correction>,
    /// Keys past their expiration date: still served, each with a warning alert.
    pub expired: Vec<String>,
    /// The corrections were held back, waiting for `keywarden reconcile --confirm`.
    pub awaiting_confirmation: bool,
}

pub struct Reconciler {
    store: Store,
    writer: Writer,
    kms: Arc<dyn Kms>,
    config: ReconcileConfig,
    running: AtomicBool,
    ownership: crate::cluster::Ownership,
}

const DRIFT: &str = "KeywardenDrift";
const HELD: &str = "KeywardenReconcileAwaitsConfirmation";
const EXPIRED: &str = "KeywardenKeyExpired";

impl Reconciler {
    pub fn new(store: Store, writer: Writer, kms: Arc<dyn Kms>, config: ReconcileConfig, ownership: crate::cluster::Ownership) -> Reconciler {
        Reconciler { store, writer, kms, config, running: AtomicBool::new(false), ownership }
    }

    /// Runs on the configured schedule until shutdown.
    pub async fn run(self: Arc<Self>, shutdown: CancellationToken) {
        if self.config.schedule.is_empty() {
            // Off: idle until shutdown, since a supervised task that ends has failed.
            shutdown.cancelled().await;
            return;
        }
        let Ok(schedule) = cron::Schedule::from_str(&self.config.schedule) else {
            tracing::error!(schedule = %self.config.schedule, "reconcile schedule does not parse; reconciliation is off");
            return;
        };
        loop {
            let Some(next) = schedule.upcoming(Utc).next() else { return };
            let wait = (next - Utc::now()).to_std().unwrap_or(Duration::ZERO);
            if !crate::tell::pause(&shutdown, tokio::time::sleep(wait)).await {
                return;
            }
            match self.reconcile(false).await {
                Ok(report) if !report.corrections.is_empty() => tracing::warn!(?report, "reconciliation found drift"),
                Ok(_) => tracing::debug!("reconciliation found no drift"),
                Err(ReconcileError::Busy) => tracing::warn!("the previous reconciliation is still running; this one is skipped"),
                Err(e) => {
                    tracing::error!(error = %e, "reconciliation stopped");
                    return;
                }
            }
        }
    }

    /// One pass over every key in use. With `confirmed`, a plan over the
    /// threshold is applied too.
    pub async fn reconcile(&self, confirmed: bool) -> Result<Report, ReconcileError> {
        if self.running.swap(true, Ordering::SeqCst) {
            return Err(ReconcileError::Busy);
        }
        let result = self.pass(confirmed).await;
        self.running.store(false, Ordering::SeqCst);
        result
    }

    async fn pass(&self, confirmed: bool) -> Result<Report, ReconcileError> {
        let keys: Vec<KeyRecord> = self.ownership.mine(self.store.keys()?, |k| &k.key_id).into_iter().filter(|k| k.purged_at.is_none()).collect();
        // Counted on a blocking thread: a key can protect 100,000 instances,
        // a scan that must not hold a runtime worker (and the DEK fetches on it).
        let store = self.store.clone();
        let ids: Vec<String> = keys.iter().map(|k| k.key_id.clone()).collect();
        let counts = tokio::task::spawn_blocking(move || ids.iter().map(|id| store.instance_count(id)).collect::<Result<Vec<usize>, _>>())
            .await
            .map_err(|e| ReconcileError::Interrupted(e.to_string()))??;
        let mut report = Report { keys_checked: 0, unreachable: vec![], corrections: vec![], expired: vec![], awaiting_confirmation: false };
        for (key, instances) in keys.iter().zip(counts) {
            if instances == 0 {
                continue;
            }
            report.keys_checked += 1;
            let state = match tokio::time::timeout(Duration::from_secs(10), self.kms.key_state(&key.key_id)).await {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => {
                    tracing::warn!(key_id = %key.key_id, error = %e, "reconciliation cannot read the key's state");
                    report.unreachable.push(key.key_id.clone());
                    continue;
                }
                Err(_) => {
                    tracing::warn!(key_id = %key.key_id, error = "no answer within 10s", "reconciliation cannot read the key's state");
                    report.unreachable.push(key.key_id.clone());
                    continue;
                }
            };
            if state.expired {
                report.expired.push(key.key_id.clone());
            }
            let rotating = self.store.job(&key.key_id)?.is_some_and(|j| j.finished_at.is_none());
            let kind = match (key.status, state.status) {
                // Purged: the material is gone, also for a key keywarden already
                // holds as deleted (its DEKs would otherwise wait for a restore
                // that can never come).
                (_, KeyStatus::Deleted) if state.material_destroyed => Some(EventType::Delete),
                (KeyStatus::Active, KeyStatus::Disabled) => Some(EventType::Disable),
                (KeyStatus::Active | KeyStatus::Disabled, KeyStatus::Deleted) => Some(EventType::Delete),
                (KeyStatus::Disabled, KeyStatus::Active) => Some(EventType::Enable),
                (KeyStatus::Deleted, KeyStatus::Active | KeyStatus::Disabled) => Some(EventType::Restore),
                (KeyStatus::Active, KeyStatus::Active)
                    if !rotating && !state.latest_version.is_empty() && key.version.as_deref() != Some(state.latest_version.as_str()) =>
                {
                    Some(EventType::Rotate)
                }
                _ => None,
            };
            if let Some(kind) = kind {
                let key_version = (kind == EventType::Rotate).then(|| state.latest_version.clone());
                report.corrections.push(Correction {
                    key_id: key.key_id.clone(),
                    ours: key.status,
                    kms: state.status,
                    kind,
                    key_version,
                    instances,
                    material_destroyed: state.material_destroyed,
                });
            }
        }
        let revoking: usize = report.corrections.iter().filter(|c| c.revokes()).map(|c| c.instances).sum();
        let now = Utc::now();
        if revoking as u64 > self.config.confirm_above && !confirmed {
            report.awaiting_confirmation = true;
            if self.store.firing_alerts()?.iter().any(|a| a.name == HELD) {
                return Ok(report);
            }
            let keys: Vec<&str> = report.corrections.iter().filter(|c| c.revokes()).map(|c| c.key_id.as_str()).collect();
            self.writer
                .submit(Input::Alert(Alert::new(
                    HELD,
                    Severity::Critical,
                    &[],
                    format!("reconciliation would revoke or erase {revoking} instances and waits for confirmation"),
                    format!(
                        "the KMS reports keys {} disabled or deleted, but no events said so. Check the KMS, then run `keywarden reconcile --confirm` (threshold reconcile.confirm_above = {})",
                        keys.join(", "),
                        self.config.confirm_above
                    ),
                    now,
                )))
                .await?;
            return Ok(report);
        }
        self.resolve_held(now).await?;
        let run = uuid::Uuid::new_v4();
        for c in &report.corrections {
            let key = self.store.key(&c.key_id)?;
            // What the KMS says now is newer than anything keywarden applied.
            let last = key.as_ref().and_then(|k| k.last_event_at).unwrap_or(now);
            let occurred_at = now.max(last + chrono::Duration::microseconds(1));
            let event = LifecycleEvent {
                event_id: format!("reconcile:{}:{}:{}", c.key_id, c.kind, occurred_at.timestamp_micros()),
                kind: c.kind,
                key_id: c.key_id.clone(),
                key_version: c.key_version.clone(),
                occurred_at,
                correlation_id: Some(format!("reconcile-{run}")),
                material_destroyed: c.material_destroyed,
                traceparent: None,
            };
            tracing::warn!(key_id = %c.key_id, ours = ?c.ours, kms = ?c.kms, r#type = %c.kind, "drift: applying the event that was missed");
            self.writer.submit(Input::Event { event, at: now, kms: Some(c.kms) }).await?;
            let alert = drift_alert(c, now);
            self.writer.submit(Input::Alert(alert)).await?;
        }
        self.expiry_alerts(&report, now).await?;
        // Keys that agree again end their drift alerts.
        for firing in self.store.firing_alerts()?.into_iter().filter(|a| a.name == DRIFT) {
            let key = firing.labels.get("key_id").cloned().unwrap_or_default();
            if !report.corrections.iter().any(|c| c.key_id == key) && !report.unreachable.contains(&key) {
                self.writer.submit(Input::Alert(firing.resolved(now))).await?;
            }
        }
        Ok(report)
    }

    /// A warning per expired key, naming it, and resolved once the key is
    /// rotated or replaced: an expired Key Protect key keeps serving its DEKs
    /// (unwrap and rewrap are allowed in Deactivated), so nothing is revoked,
    /// but no new instance can be created under it.
    async fn expiry_alerts(&self, report: &Report, now: chrono::DateTime<Utc>) -> Result<(), ReconcileError> {
        let firing = self.store.firing_alerts()?;
        let is_firing = |key: &str| firing.iter().any(|a| a.name == EXPIRED && a.labels.get("key_id").map(String::as_str) == Some(key));
        for key in report.expired.iter().filter(|k| !is_firing(k)) {
            tracing::warn!(key_id = %key, "the kms reports the key expired; its DEKs are still served, nothing is revoked");
            let alert = Alert::new(
                EXPIRED,
                Severity::Warning,
                &[("key_id", key)],
                format!("key {key} has passed its expiration date"),
                "the KMS reports the key expired (Key Protect: Deactivated). Its DEKs are still served and rotations still rewrap, but no new instance can be created under it: rotate the key or move its instances to another".to_string(),
                now,
            );
            self.writer.submit(Input::Alert(alert)).await?;
        }
        for a in firing.into_iter().filter(|a| a.name == EXPIRED) {
            let key = a.labels.get("key_id").cloned().unwrap_or_default();
            if !report.expired.contains(&key) && !report.unreachable.contains(&key) {
                self.writer.submit(Input::Alert(a.resolved(now))).await?;
            }
        }
        Ok(())
    }

    async fn resolve_held(&self, now: chrono::DateTime<Utc>) -> Result<(), ReconcileError> {
        for held in self.store.firing_alerts()?.into_iter().filter(|a| a.name == HELD) {
            self.writer.submit(Input::Alert(held.resolved(now))).await?;
        }
        Ok(())
    }
}

fn drift_alert(c: &Correction, now: chrono::DateTime<Utc>) -> Alert {
    let severity = if c.revokes() { Severity::Critical } else { Severity::Warning };
    let (summary, detail) = if c.material_destroyed {
        (
            format!("key {} was purged: the KMS no longer knows it, and its instances' DEKs are destroyed", c.key_id),
            "reconciliation found the key gone from the KMS (Key Protect answers 404 after a purge) and marked its instances destroyed; the delete and purge events were lost or are late".to_string(),
        )
    } else {
        (
            format!("key {} drifted: the KMS says {:?}, keywarden had {:?}", c.key_id, c.kms, c.ours),
            format!("reconciliation applied the missed {} event; an event from the KMS was lost or is late", c.kind),
        )
    };
    let mut a = Alert::new(DRIFT, severity, &[("key_id", &c.key_id)], summary, detail, now);
    a.count_instances_of = Some(c.key_id.clone());
    a
}
