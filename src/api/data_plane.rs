//! `POST /v1/instances/{id}/data-plane`: an instance's data-plane agent
//! reports how a command ended on its database host. Opened by that
//! instance's own credential only (or a client certificate mapped to it),
//! never the shared DEK token, so that the holder of one instance's
//! credential can report on that instance alone. The command must be one
//! keywarden issued to this instance: its id is recomputed from what caused
//! it (see `tell::Command::new`) and that cause must be a lifecycle event of
//! the instance's key that keywarden applied, or, for the erase of an
//! instance deleted through the API, that deletion's request. That is judged
//! by the key's owner alone; another node answers 503, retried by the agent.

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::Json;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::json;

use super::credential::{Opener, Presented};
use super::{auth, parse_body, ApiError, ApiResult, AppState};
use crate::engine::{CommandAction, DataPlaneOutcome, DataPlaneStatus, EventType, Input, Reply};

/// What an agent sends. `cause_event_id` is the command's own field, so that
/// keywarden can recompute the command id rather than keep every id it issued.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Report {
    pub command_id: String,
    pub cause_event_id: String,
    pub action: CommandAction,
    /// The version the command carried: a `rewrapped` command's id depends on it.
    #[serde(default)]
    pub key_version: Option<String>,
    pub outcome: DataPlaneOutcome,
    pub at: DateTime<Utc>,
    #[serde(default)]
    pub detail: Option<String>,
}

/// How the API names an instance deletion's request, the cause of its erase.
pub(super) const API_DELETE: &str = "api-delete-";

/// The longest detail kept: what a hook said, not its whole output.
const DETAIL_CHARS: usize = 500;

/// Which lifecycle events issue which command: the check that a reported
/// command id is not only well formed but one this event really caused.
fn issued_by(kind: EventType, action: CommandAction) -> bool {
    matches!(
        (kind, action),
        (EventType::Disable, CommandAction::Revoke)
            | (EventType::Enable | EventType::Restore, CommandAction::Restore)
            | (EventType::Delete, CommandAction::Erase)
            | (EventType::Rotate, CommandAction::Rewrapped)
    )
}

pub(super) async fn report(State(s): State<AppState>, Path(id): Path<String>, presented: Option<axum::Extension<Presented>>, body: Bytes) -> ApiResult {
    let inst = s.store.instance(&id)?;
    let opener = presented.and_then(|p| p.opener(&id, inst.as_ref().and_then(|i| i.credential.as_ref())));
    // The shared token opens every instance: it cannot vouch for one agent.
    let (Some(inst), Some(Opener::Credential(_) | Opener::Certificate(_))) = (inst, opener) else {
        return Ok(auth::unauthorized());
    };
    let Some(report) = parse_body::<Report>(&body, false)? else {
        return Err(ApiError::new(StatusCode::BAD_REQUEST, "request body is empty; send a JSON report"));
    };
    // Only the key's owner can record the report, and this node's replica
    // may not hold the command's cause yet: judged here, a real command would
    // read as one keywarden never issued (409, which the agent gives up on).
    // 503 says what the writer would: retry until the owner answers.
    if !s.ownership.owns_key(&inst.key_id) {
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("another node owns key {} and records its instances' reports; retry, through an address that reaches it", inst.key_id),
        ));
    }
    let expected = crate::tell::Command::new(&id, &inst.key_id, report.action, report.key_version.clone(), &report.cause_event_id, report.at, None).command_id;
    let cause = s.store.event(&report.cause_event_id)?;
    // An instance deleted through the API got its erase from the request,
    // which is no event: its id names the request (see `delete_instance`).
    let deleted_by_api = report.action == CommandAction::Erase && inst.destroyed_at.is_some() && report.cause_event_id.starts_with(API_DELETE);
    let issued =
        expected == report.command_id && (deleted_by_api || cause.as_ref().is_some_and(|e| e.key_id == inst.key_id && issued_by(e.kind, report.action)));
    if !issued {
        tracing::warn!(instance_id = %id, command_id = %report.command_id, security_event = true, "refused a data-plane report of a command keywarden did not issue to this instance");
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            format!(
                "command {} was not issued to instance {id} by a lifecycle event of its key; report only commands read from the commands topic",
                report.command_id
            ),
        ));
    }
    let status = DataPlaneStatus {
        command_id: report.command_id.clone(),
        action: report.action,
        outcome: report.outcome,
        at: report.at,
        detail: report.detail.map(|d| d.chars().take(DETAIL_CHARS).collect()),
        received_at: Utc::now(),
    };
    match s.writer.submit_within(Input::DataPlaneReport { instance_id: id.clone(), status }, s.write_timeout).await? {
        Reply::NotFound(m) => Err(ApiError::new(StatusCode::NOT_FOUND, m)),
        _ => {
            tracing::info!(instance_id = %id, command_id = %report.command_id, outcome = ?report.outcome, "data-plane report recorded");
            let mut response = Json(json!({"instance_id": id, "command_id": report.command_id, "recorded": true})).into_response();
            response.extensions_mut().insert(auth::Caller::Instance);
            Ok(response)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_command_an_event_issues_counts_as_issued_by_it() {
        assert!(issued_by(EventType::Disable, CommandAction::Revoke));
        assert!(issued_by(EventType::Delete, CommandAction::Erase));
        assert!(issued_by(EventType::Enable, CommandAction::Restore));
        assert!(!issued_by(EventType::Disable, CommandAction::Restore));
        assert!(!issued_by(EventType::Enable, CommandAction::Erase));
        assert!(!issued_by(EventType::Rotate, CommandAction::Revoke));
    }
}
