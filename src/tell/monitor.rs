//! The alert monitor: checks the conditions an operator must hear about every
//! `alerts.check_every`, and raises an alert when one starts and resolves it
//! when it clears. Alerts go through the writer, so they are durable before they
//! are sent, and the set of firing alerts survives a restart.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::Utc;
use prometheus::core::Collector;
use prometheus::IntCounterVec;
use tokio_util::sync::CancellationToken;

use crate::config::AlertsConfig;
use crate::engine::{Alert, CommandAction, DataPlaneOutcome, Input, KeyStatus, Severity};
use crate::intake::Health;
use crate::kms::router::KmsRouter;
use crate::metrics::Metrics;
use crate::store::writer::Writer;
use crate::store::Store;

/// The alerts this monitor owns; others (key state, drift) are raised and
/// resolved where their condition is decided.
const OWNED: &[&str] = &[
    "KeywardenDeadLetterRate",
    "KeywardenForgedEvents",
    "KeywardenKmsBreakerOpen",
    "KeywardenKafkaUnreachable",
    "KeywardenRotationSlow",
    "KeywardenRotationFailed",
    "KeywardenRevocationUnconfirmed",
];

pub struct Monitor {
    pub store: Store,
    pub writer: Writer,
    pub metrics: Arc<Metrics>,
    pub health: Arc<Health>,
    pub kms: Arc<KmsRouter>,
    pub config: AlertsConfig,
    /// `data_plane.enforce_within`: how long a revocation may go unconfirmed.
    pub enforce_within: Duration,
    pub ownership: crate::cluster::Ownership,
}

#[derive(Default)]
struct Memory {
    dead_letters: VecDeque<(Instant, u64)>,
    forged_seen: u64,
    last_forged: Option<Instant>,
    changelog_seen: u64,
    last_changelog: Option<Instant>,
    kafka_down_since: Option<Instant>,
}

fn total(counter: &IntCounterVec) -> u64 {
    counter.collect().iter().flat_map(|f| f.get_metric()).map(|m| m.get_counter().get_value() as u64).sum()
}

/// The sum over the series whose `reason` label `keep` selects.
fn total_where(counter: &IntCounterVec, keep: impl Fn(&str) -> bool) -> u64 {
    counter
        .collect()
        .iter()
        .flat_map(|f| f.get_metric())
        .filter(|m| m.get_label().iter().any(|l| l.get_name() == "reason" && keep(l.get_value())))
        .map(|m| m.get_counter().get_value() as u64)
        .sum()
}

/// Refused changelog records are counted under reasons of this prefix.
const CHANGELOG: &str = "changelog_";

impl Monitor {
    pub async fn run(self, shutdown: CancellationToken) {
        let mut firing: HashMap<String, Alert> =
            self.store.firing_alerts().unwrap_or_default().into_iter().filter(|a| OWNED.contains(&a.name.as_str())).map(|a| (a.fingerprint(), a)).collect();
        let events = &self.metrics.security_events;
        let mut memory = Memory {
            forged_seen: total_where(events, |r| !r.starts_with(CHANGELOG)),
            changelog_seen: total_where(events, |r| r.starts_with(CHANGELOG)),
            ..Default::default()
        };
        while crate::tell::pause(&shutdown, tokio::time::sleep(self.config.check_every.0)).await {
            let now = Utc::now();
            // A round that cannot read the store neither raises nor clears.
            let (store, ownership, within) = (self.store.clone(), self.ownership.clone(), self.enforce_within);
            let unconfirmed = tokio::task::spawn_blocking(move || Self::unconfirmed_revocations(&store, &ownership, within, now));
            let conditions = match (self.conditions(&mut memory), unconfirmed.await) {
                (Ok(mut conditions), Ok(Ok(more))) => {
                    conditions.extend(more);
                    conditions
                }
                (Err(e), _) | (_, Ok(Err(e))) => {
                    tracing::error!(error = %e, "cannot read the store; alert conditions are checked again next round");
                    continue;
                }
                (_, Err(e)) => {
                    tracing::error!(error = %e, "the revocation check failed; alert conditions are checked again next round");
                    continue;
                }
            };
            let wanted: HashMap<String, Alert> = conditions.into_iter().map(|a| (a.fingerprint(), a)).collect();
            let raised: Vec<Alert> = wanted.iter().filter(|(fp, _)| !firing.contains_key(*fp)).map(|(_, a)| a.clone()).collect();
            let cleared: Vec<Alert> = firing.iter().filter(|(fp, _)| !wanted.contains_key(*fp)).map(|(_, a)| a.clone().resolved(now)).collect();
            for alert in raised.into_iter().chain(cleared) {
                let fp = alert.fingerprint();
                let resolved = alert.ends_at.is_some();
                if self.writer.submit(Input::Alert(alert.clone())).await.is_err() {
                    return;
                }
                if resolved {
                    firing.remove(&fp);
                } else {
                    tracing::warn!(alert = %alert.name, labels = ?alert.labels, summary = %alert.summary, "alert raised");
                    firing.insert(fp, alert);
                }
            }
        }
    }

    fn conditions(&self, memory: &mut Memory) -> Result<Vec<Alert>, crate::store::StoreError> {
        let now = Utc::now();
        let c = &self.config;
        let mut out = Vec::new();

        let dead = total(&self.metrics.dead_letters);
        let minute_ago = Instant::now() - Duration::from_secs(60);
        memory.dead_letters.push_back((Instant::now(), dead));
        while memory.dead_letters.len() > 1 && memory.dead_letters[1].0 <= minute_ago {
            memory.dead_letters.pop_front();
        }
        let per_minute = dead - memory.dead_letters.front().map_or(dead, |(_, n)| *n);
        if per_minute > c.dead_letters_per_minute {
            out.push(Alert::new(
                "KeywardenDeadLetterRate",
                Severity::Warning,
                &[],
                format!("{per_minute} messages dead-lettered in the last minute"),
                format!("more than {} messages a minute go to the dead-letter topic; see its keywarden.reason headers", c.dead_letters_per_minute),
                now,
            ));
        }

        let forged = total_where(&self.metrics.security_events, |r| !r.starts_with(CHANGELOG));
        if forged > memory.forged_seen {
            memory.forged_seen = forged;
            memory.last_forged = Some(Instant::now());
        }
        if memory.last_forged.is_some_and(|t| t.elapsed() < c.forged_quiet_after.0) {
            out.push(Alert::new(
                "KeywardenForgedEvents",
                Severity::Critical,
                &[],
                "unsigned or forged lifecycle events were refused".into(),
                "someone produced events without a valid signature, or hints their kms contradicts, to the events topic; they were dead-lettered and not applied (see keywarden_security_events_total and the dead letters' keywarden.reason). Check who can write to the topic".into(),
                now,
            ));
        }
        let changelog = total_where(&self.metrics.security_events, |r| r.starts_with(CHANGELOG));
        if changelog > memory.changelog_seen {
            memory.changelog_seen = changelog;
            memory.last_changelog = Some(Instant::now());
        }
        if memory.last_changelog.is_some_and(|t| t.elapsed() < c.forged_quiet_after.0) {
            out.push(Alert::new(
                "KeywardenChangelogRefused",
                Severity::Critical,
                &[],
                "forged, replayed or foreign changelog records were refused".into(),
                "someone without the cluster secret produced to the changelog topic, or a node's secret differs; nothing was applied (see keywarden_security_events_total and the log for partition and offset). Check who can write to the topic and that every node has the same cluster.secret_file".into(),
                now,
            ));
        }

        for (provider, state) in self.kms.providers_health() {
            if state.breaker_open {
                out.push(Alert::new(
                    "KeywardenKmsBreakerOpen",
                    Severity::Critical,
                    &[("provider", provider)],
                    format!("the {provider} KMS keeps failing; calls to it are paused"),
                    format!("the circuit breaker for {provider} is open: rotations and new instances on its keys wait until it answers again"),
                    now,
                ));
            }
        }

        if self.health.broker_ok.load(std::sync::atomic::Ordering::SeqCst) {
            memory.kafka_down_since = None;
        } else {
            let since = *memory.kafka_down_since.get_or_insert_with(Instant::now);
            if since.elapsed() >= c.kafka_unreachable_after.0 {
                out.push(Alert::new(
                    "KeywardenKafkaUnreachable",
                    Severity::Critical,
                    &[],
                    format!("kafka has been unreachable for {}s", since.elapsed().as_secs()),
                    "no lifecycle events are consumed and no commands published until kafka is back; state is kept".into(),
                    now,
                ));
            }
        }

        let slow = chrono::Duration::from_std(c.rotation_slow_after.0).ok();
        for job in self.ownership.mine(self.store.jobs()?, |j| &j.key_id) {
            // A threshold too long to add is never reached (and never overflows).
            let slow_since = slow.and_then(|slow| job.started_at.checked_add_signed(slow));
            if job.finished_at.is_none() && slow_since.is_some_and(|since| since <= now) {
                out.push(Alert::new(
                    "KeywardenRotationSlow",
                    Severity::Warning,
                    &[("key_id", &job.key_id)],
                    format!("rotation of key {} to version {} is still running", job.key_id, job.target_version),
                    format!("started {}; {} of {} rewrapped", job.started_at.to_rfc3339(), job.done, job.total.map_or("?".into(), |t| t.to_string())),
                    now,
                ));
            }
            if job.failed > 0 {
                let mut description = format!(
                    "the KMS refused their rewrap to version {}; see GET /v1/keys/{}, fix the cause and run `keywarden key retry`",
                    job.target_version, job.key_id
                );
                let owed = job.owed_acknowledgements();
                if !owed.is_empty() {
                    description.push_str(&format!(". The KMS is not told of the rotation ({}) until the retry rewraps them", owed.join(", ")));
                }
                out.push(Alert::new(
                    "KeywardenRotationFailed",
                    Severity::Warning,
                    &[("key_id", &job.key_id)],
                    format!("{} instance(s) of key {} could not be rewrapped", job.failed, job.key_id),
                    description,
                    now,
                ));
            }
        }
        Ok(out)
    }

    /// One alert per instance of a disabled or deleted key whose agent has
    /// not reported the revoke (or erase) enforced within `enforce_within` of
    /// the key's change. Enforced means the instance's last report is that
    /// action, done: the agent runs an instance's commands in order, so a
    /// later restore replaces it, and the next revocation needs its own.
    /// Only instances the command went to count (those still holding a
    /// wrapped DEK: see `Relay::publish`); a purged key's instances are not
    /// asked (nothing can open their data again).
    ///
    /// A scan of the keys and of the revoked keys' instances: run on a
    /// blocking thread (see `run`).
    fn unconfirmed_revocations(
        store: &Store,
        ownership: &crate::cluster::Ownership,
        enforce_within: Duration,
        now: chrono::DateTime<Utc>,
    ) -> Result<Vec<Alert>, crate::store::StoreError> {
        // Off ("0s"), or too long to add: nothing is ever due.
        let Ok(within) = chrono::Duration::from_std(enforce_within) else { return Ok(vec![]) };
        if enforce_within.is_zero() {
            return Ok(vec![]);
        }
        let mut out = Vec::new();
        for key in ownership.mine(store.keys()?, |k| &k.key_id) {
            let (action, since) = match key.status {
                KeyStatus::Disabled => (CommandAction::Revoke, key.updated_at),
                KeyStatus::Deleted if key.purged_at.is_none() => (CommandAction::Erase, key.deleted_at.unwrap_or(key.updated_at)),
                _ => continue,
            };
            if since.checked_add_signed(within).is_none_or(|due| due > now) {
                continue;
            }
            for inst in store.instances_of(&key.key_id)?.into_iter().filter(|i| i.wrapped.is_some()) {
                let confirmed = inst.data_plane.as_ref().is_some_and(|d| d.action == action && d.outcome == DataPlaneOutcome::Enforced);
                if confirmed {
                    continue;
                }
                let name = if action == CommandAction::Revoke { "revoke" } else { "erase" };
                out.push(Alert::new(
                    "KeywardenRevocationUnconfirmed",
                    Severity::Critical,
                    &[("key_id", &key.key_id), ("instance_id", &inst.instance_id)],
                    format!("instance {} has not confirmed the {name} of key {}", inst.instance_id, key.key_id),
                    format!(
                        "key {} changed at {} and no data-plane agent reported the {name} command enforced for instance {} within {}s: its database may still be running on a revoked key (and crash once its key cache expires). Check the agent on its host (journalctl -u keywarden-agent) and GET /v1/instances/{}",
                        key.key_id,
                        since.to_rfc3339(),
                        inst.instance_id,
                        enforce_within.as_secs(),
                        inst.instance_id
                    ),
                    now,
                ));
            }
        }
        Ok(out)
    }
}
