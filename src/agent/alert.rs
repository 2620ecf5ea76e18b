//! The agent's alerts, through the daemon's sinks (`tell::alerts::Sinks`):
//! a hook that keeps failing, a forged command. Sent from a task of their
//! own, so that a sink that is down never delays a hook; not kept across a
//! restart (keywarden's KeywardenRevocationUnconfirmed is the durable alert
//! for a revocation the host did not enforce).

use chrono::Utc;

use crate::config::AlertSink;
use crate::engine::{Alert, Severity};
use crate::tell::alerts::{Context, Sinks};

#[derive(Clone)]
pub struct Alerter {
    sinks: Sinks,
}

impl Alerter {
    pub fn new(sinks: Vec<AlertSink>, node: String, api: String) -> Alerter {
        Alerter { sinks: Sinks::new(sinks, Context { node, api }) }
    }

    /// A hook of `instance_id` failed; `resolved` once it succeeded.
    pub fn hook_failing(&self, instance_id: &str, action: &str, command_id: &str, error: &str, resolved: bool) {
        let alert = Alert::new(
            "KeywardenAgentHookFailing",
            Severity::Critical,
            &[("instance_id", instance_id), ("action", action)],
            format!("the {action} hook of instance {instance_id} fails; the agent retries it"),
            format!("command {command_id}: {error}. Later commands of this instance wait for it; other instances are not held up"),
            Utc::now(),
        );
        self.send(if resolved { alert.resolved(Utc::now()) } else { alert });
    }

    /// A message on the commands topic was not a command keywarden signed.
    pub fn forged(&self, reason: &str) {
        self.send(Alert::new(
            "KeywardenAgentForgedCommand",
            Severity::Critical,
            &[],
            "a data-plane command with a missing or invalid signature was refused".into(),
            format!("{reason}. It was not run. Check who can write to the commands topic"),
            Utc::now(),
        ));
    }

    fn send(&self, alert: Alert) {
        tracing::warn!(alert = %alert.name, labels = ?alert.labels, resolved = alert.ends_at.is_some(), summary = %alert.summary, "agent alert");
        if self.sinks.is_empty() {
            return;
        }
        let sinks = self.sinks.clone();
        tokio::spawn(async move {
            if let Err(e) = sinks.send(&alert, None).await {
                tracing::error!(alert = %alert.name, error = %e, "cannot deliver the agent's alert");
            }
        });
    }
}
