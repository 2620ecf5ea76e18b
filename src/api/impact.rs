//! `GET /v1/keys/{id}/impact`: what disabling or deleting a key would do, asked
//! before doing it. It reads what the engine would act on (the key's instances
//! and their wrapped DEKs) and applies the engine's rules for key-wide
//! commands; it changes nothing.

use std::collections::BTreeMap;

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::Json;
use chrono::Utc;
use serde::Deserialize;
use serde_json::{json, Value};

use super::{ApiError, ApiResult, AppState};
use crate::engine::{instance_state, InstanceRecord, KeyRecord, KeyStatus};

/// Enough ids to act on by hand; the counts cover the rest.
const DEFAULT_LIMIT: usize = 100;
const MAX_LIMIT: usize = 10_000;

#[derive(Deserialize)]
pub(super) struct ImpactQuery {
    limit: Option<usize>,
}

pub(super) async fn show_impact(State(s): State<AppState>, Path(key_id): Path<String>, Query(q): Query<ImpactQuery>) -> ApiResult {
    let limit = q.limit.unwrap_or(DEFAULT_LIMIT).min(MAX_LIMIT);
    // Reads every instance of the key: off the runtime.
    let view = tokio::task::spawn_blocking(move || {
        let record = s.store.key(&key_id)?;
        let kms_state = s.local.state(&key_id).ok();
        if record.is_none() && kms_state.is_none() {
            return Err(ApiError::new(StatusCode::NOT_FOUND, format!("key {key_id} is unknown; create it with POST /v1/keys")));
        }
        let status = record.as_ref().map(|k| k.status).or(kms_state.as_ref().map(|k| k.0)).unwrap_or(KeyStatus::Active);
        let version = record.as_ref().and_then(|k| k.version.clone()).or_else(|| kms_state.map(|k| k.1));
        let instances = s.store.instances_of(&key_id)?;
        let rotation = s.store.job(&key_id)?.map(|j| super::progress::rotation_view(&j, status, Utc::now()));
        let (provider, _) = s.router.describe(&key_id);
        Ok(impact(&key_id, status, version, record.as_ref(), &instances, rotation, provider, &s.commands_topic, limit))
    })
    .await
    .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, format!("internal error: {e}")))??;
    Ok(Json(view).into_response())
}

/// The engine sends a key-wide command only on a change of state (disabling a
/// disabled key changes nothing), and the relay fans it out to the instances
/// that still hold a wrapped DEK; the counts follow the same two rules.
#[allow(clippy::too_many_arguments)]
fn impact(
    key_id: &str,
    status: KeyStatus,
    version: Option<String>,
    record: Option<&KeyRecord>,
    instances: &[InstanceRecord],
    rotation: Option<Value>,
    provider: &str,
    commands_topic: &str,
    limit: usize,
) -> Value {
    let states: Vec<&'static str> = instances.iter().map(|i| instance_state(i, record).as_str()).collect();
    let mut by_state: BTreeMap<&str, usize> = ["active", "revoked", "erased", "destroyed"].into_iter().map(|s| (s, 0)).collect();
    for state in &states {
        *by_state.entry(state).or_default() += 1;
    }
    let listed: Vec<Value> = instances
        .iter()
        .zip(&states)
        .take(limit)
        .map(|(i, state)| json!({"instance_id": i.instance_id, "state": state, "key_version": i.key_version}))
        .collect();
    let holders: Vec<&InstanceRecord> = instances.iter().filter(|i| i.wrapped.is_some()).collect();
    let pending = holders.iter().filter(|i| version.as_ref().is_some_and(|v| *v != i.key_version)).count();
    let failed = holders.iter().filter(|i| i.rewrap_error.is_some()).count();
    let n = holders.len();
    let disable = match status {
        KeyStatus::Active => json!({
            "changes_state": true,
            "command": "revoke",
            "commands": n,
            "effect": format!(
                "{n} instance(s) become revoked: DEK requests are refused (423) from the moment the disable is committed, and {n} revoke command(s) go to {commands_topic}{}",
                if pending > 0 { format!("; the rotation pauses with {pending} DEK(s) still to rewrap") } else { String::new() }
            ),
        }),
        KeyStatus::Disabled => json!({"changes_state": false, "command": "revoke", "commands": 0, "effect": "the key is already disabled; nothing changes"}),
        KeyStatus::Deleted => json!({"changes_state": false, "command": "revoke", "commands": 0, "effect": "the key is deleted; a disable changes nothing"}),
    };
    let delete = match status {
        KeyStatus::Deleted => json!({"changes_state": false, "command": "erase", "commands": 0, "effect": "the key is already deleted; nothing changes"}),
        _ => json!({
            "changes_state": true,
            "command": "erase",
            "commands": n,
            "effect": format!(
                "{n} instance(s) become erased: DEK requests are refused (410), and {n} erase command(s) go to {commands_topic}; a restore within the restore window (policy.purge_after) brings them back, after it their wrapped DEKs are destroyed"
            ),
        }),
    };
    json!({
        "key_id": key_id,
        "state": status,
        "version": version,
        "kms_provider": provider,
        "instances": {
            "total": instances.len(),
            "by_state": by_state,
            "listed": listed,
            "truncated": listed.len() < instances.len(),
        },
        "wrapped_deks": n,
        "pending_rewraps": pending,
        "rewrap_failures": failed,
        "rotation": rotation,
        "disable": disable,
        "delete": delete,
        "data_plane": {
            "commands_topic": commands_topic,
            "message_key": "instance_id",
            "consumers": "every consumer of the commands topic; each command is keyed by its instance id, so the instance's own subscriber receives it",
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::WrappedDek;

    fn inst(id: &str, version: &str, dek: bool, error: bool) -> InstanceRecord {
        InstanceRecord {
            instance_id: id.into(),
            key_id: "k".into(),
            wrapped: dek.then(|| WrappedDek { key_version: version.into(), ciphertext: vec![1] }),
            key_version: version.into(),
            dek_fingerprint: "f".into(),
            created_at: Utc::now(),
            updated_at: Utc::now(),
            destroyed_at: None,
            destroyed_reason: None,
            rewrap_error: error.then(|| "refused".to_string()),
            credential: None,
            data_plane: None,
        }
    }

    fn key(status: KeyStatus) -> KeyRecord {
        let mut k = KeyRecord::new("k", Utc::now());
        k.status = status;
        k.version = Some("2".into());
        k
    }

    fn run(status: KeyStatus, instances: &[InstanceRecord], limit: usize) -> Value {
        impact("k", status, Some("2".into()), Some(&key(status)), instances, None, "local", "cmds", limit)
    }

    #[test]
    fn disabling_an_active_key_revokes_every_instance_that_holds_a_dek() {
        let all = [inst("a", "2", true, false), inst("b", "1", true, false), inst("c", "1", true, true), inst("d", "1", false, false)];
        let v = run(KeyStatus::Active, &all, 2);
        assert_eq!(v["instances"]["total"], 4);
        assert_eq!(v["instances"]["by_state"], json!({"active": 3, "revoked": 0, "erased": 0, "destroyed": 1}));
        assert_eq!(v["instances"]["listed"].as_array().unwrap().len(), 2);
        assert_eq!(v["instances"]["truncated"], true);
        assert_eq!((v["wrapped_deks"].as_u64(), v["pending_rewraps"].as_u64(), v["rewrap_failures"].as_u64()), (Some(3), Some(2), Some(1)));
        assert_eq!((v["disable"]["command"].as_str(), v["disable"]["commands"].as_u64()), (Some("revoke"), Some(3)));
        assert_eq!((v["delete"]["command"].as_str(), v["delete"]["commands"].as_u64()), (Some("erase"), Some(3)));
        assert!(v["disable"]["effect"].as_str().unwrap().contains("rotation pauses with 2"), "{v}");
        assert_eq!(v["data_plane"]["commands_topic"], "cmds");
    }

    #[test]
    fn a_disable_of_a_disabled_key_sends_nothing_but_a_delete_still_erases() {
        let all = [inst("a", "2", true, false)];
        let v = run(KeyStatus::Disabled, &all, 10);
        assert_eq!(v["instances"]["by_state"]["revoked"], 1);
        assert_eq!((v["disable"]["changes_state"].as_bool(), v["disable"]["commands"].as_u64()), (Some(false), Some(0)));
        assert_eq!(v["delete"]["commands"], 1);
        let v = run(KeyStatus::Deleted, &all, 10);
        assert_eq!((v["disable"]["commands"].as_u64(), v["delete"]["commands"].as_u64()), (Some(0), Some(0)));
        assert_eq!(v["instances"]["truncated"], false);
    }
}
