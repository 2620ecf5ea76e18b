//! Reporting outcomes to keywarden: `POST /v1/instances/{id}/data-plane`
//! with the instance's own credential. A report keywarden cannot take now
//! (unreachable, 5xx) is retried with backoff; one it refuses (4xx) is logged
//! and given up, since sending it again would be refused again. Reports run
//! beside the hooks, not in their way: a keywarden that is down must not hold
//! back the next revocation on the host.

use std::path::Path;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde_json::json;
use zeroize::Zeroizing;

use super::config::{AgentConfig, HostedInstance};
use crate::engine::{CommandAction, DataPlaneOutcome};
use crate::tell::Command;

#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    #[error("cannot read the credential of instance {instance_id} from {path}: {message}; put the instance's dek_token there")]
    Credential { instance_id: String, path: String, message: String },
    #[error("keywarden is unreachable at {url}: {message}; the report is retried")]
    Unreachable { url: String, message: String },
    #[error("keywarden answered {status} to the report: {body}")]
    Refused { status: u16, body: String },
    #[error("cannot set up the https client: {0}; check keywarden.ca_file")]
    Setup(String),
}

impl ReportError {
    /// A refusal is retried only when keywarden says it may pass later
    /// (503: its writer busy or the key's owner elsewhere; 5xx in general).
    pub fn retryable(&self) -> bool {
        match self {
            ReportError::Unreachable { .. } | ReportError::Credential { .. } => true,
            ReportError::Refused { status, .. } => *status >= 500 || *status == 429,
            ReportError::Setup(_) => false,
        }
    }
}

/// One outcome to report.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub command: Command,
    pub outcome: DataPlaneOutcome,
    pub at: DateTime<Utc>,
    pub detail: String,
}

#[derive(Clone)]
pub struct Reporter {
    http: reqwest::Client,
    base: String,
}

impl Reporter {
    pub fn new(config: &AgentConfig) -> Result<Reporter, ReportError> {
        let mut builder = reqwest::Client::builder().timeout(Duration::from_secs(10));
        if !config.keywarden.ca_file.as_os_str().is_empty() {
            let pem = std::fs::read(&config.keywarden.ca_file).map_err(|e| ReportError::Setup(format!("{}: {e}", config.keywarden.ca_file.display())))?;
            let ca = reqwest::Certificate::from_pem(&pem).map_err(|e| ReportError::Setup(e.to_string()))?;
            builder = builder.add_root_certificate(ca);
        }
        let http = builder.build().map_err(|e| ReportError::Setup(e.to_string()))?;
        Ok(Reporter { http, base: config.keywarden.url.trim_end_matches('/').to_string() })
    }

    pub async fn send(&self, instance: &HostedInstance, outcome: &Outcome) -> Result<(), ReportError> {
        let token = read_credential(&instance.id, &instance.credential_file)?;
        let url = format!("{}/v1/instances/{}/data-plane", self.base, instance.id);
        let c = &outcome.command;
        let mut body = json!({
            "command_id": c.command_id,
            "cause_event_id": c.cause_event_id,
            "action": c.action,
            "outcome": outcome.outcome,
            "at": outcome.at,
            "detail": outcome.detail,
        });
        // Only a rewrapped command's id depends on its version. Sent with
        // that one alone, so that a keywarden of the previous release, which
        // refuses unknown fields, still takes every other report (revokes
        // among them) while it is upgraded after its agents.
        if c.action == CommandAction::Rewrapped {
            body["key_version"] = json!(c.key_version);
        }
        let response = self
            .http
            .post(&url)
            .bearer_auth(token.as_str())
            .json(&body)
            .send()
            .await
            .map_err(|e| ReportError::Unreachable { url: url.clone(), message: e.to_string() })?;
        let status = response.status();
        if status.is_success() {
            return Ok(());
        }
        let body = response.text().await.unwrap_or_default().chars().take(300).collect();
        Err(ReportError::Refused { status: status.as_u16(), body })
    }
}

fn read_credential(instance_id: &str, path: &Path) -> Result<Zeroizing<String>, ReportError> {
    let text = Zeroizing::new(std::fs::read_to_string(path).map_err(|e| ReportError::Credential {
        instance_id: instance_id.to_string(),
        path: path.display().to_string(),
        message: e.to_string(),
    })?);
    Ok(Zeroizing::new(text.trim().to_string()))
}
