//! IBM Key Protect events as IBM Cloud Activity Tracker (or IBM Cloud Logs)
//! records them: CADF JSON, routed to Kafka. `action` is `kms.secrets.<verb>`,
//! the key is `target.id` (its CRN, which keywarden uses as the key id, so
//! register Key Protect keys by CRN), the time is `eventTime`, and only a
//! `success` outcome happened. `correlationId` is carried through, as Key
//! Protect asks of its adopters.

use serde::Deserialize;
use serde_json::Value;

use super::format::{self, optional, string, timestamp, Format, Incoming, Probe, Trust};
use super::DecodeError;
use crate::engine::{EventType, LifecycleEvent};

pub static FORMAT: Format = Format {
    name: "activity-tracker",
    expects: "CADF with action kms.secrets.*, target.id (a key CRN), eventTime, outcome",
    trust: Trust::ConfirmedBy(crate::kms::keyprotect::NAME),
    detect: |_: &Incoming<'_>, probe: Option<&Probe>| probe.and_then(|p| p.str("action")).is_some_and(|a| a.starts_with("kms.")),
    decode,
};

#[derive(Deserialize)]
struct Wire {
    id: Option<Value>,
    action: Option<Value>,
    #[serde(rename = "eventTime")]
    event_time: Option<Value>,
    outcome: Option<Value>,
    #[serde(rename = "correlationId")]
    correlation_id: Option<Value>,
    #[serde(default)]
    target: Value,
}

fn decode(msg: &Incoming<'_>) -> Result<LifecycleEvent, DecodeError> {
    let w: Wire = format::parse(msg.payload)?;
    let action = string("action", w.action, 128)?;
    // at-events.md: the kms.secrets actions of a key's lifecycle. A purge
    // destroys the material (believed only once Key Protect no longer knows
    // the key); expire, the dual-authorization steps and adopters'
    // acknowledgements (`kms.secrets.ack-*`) change nothing keywarden serves.
    let (kind, material_destroyed) = match action.as_str() {
        "kms.secrets.rotate" => (EventType::Rotate, false),
        "kms.secrets.disable" => (EventType::Disable, false),
        "kms.secrets.enable" => (EventType::Enable, false),
        "kms.secrets.delete" => (EventType::Delete, false),
        "kms.secrets.purge" => (EventType::Delete, true),
        "kms.secrets.restore" => (EventType::Restore, false),
        "kms.secrets.expire" => {
            return Err(DecodeError::Noted(format!(
                "{action} for {}: an expired Key Protect key still unwraps and rewraps, so its DEKs stay served; reconciliation raises its expiry alert",
                target(&w.target)
            )))
        }
        "kms.secrets.setkeyfordeletion" | "kms.secrets.unsetkeyfordeletion" => {
            return Err(DecodeError::Noted(format!("{action} for {}: a dual-authorization step; the key's state is unchanged", target(&w.target))))
        }
        a if a.starts_with("kms.secrets.ack-") => {
            return Err(DecodeError::Noted(format!("{action} for {}: an adopter's acknowledgement of a key event", target(&w.target))))
        }
        other => {
            return Err(DecodeError::Unsupported(format!(
                "action {other:?} is not a lifecycle action; expected kms.secrets.rotate, disable, enable, delete, purge, restore, expire, setkeyfordeletion, unsetkeyfordeletion or ack-* (filter the route on action)"
            )))
        }
    };
    let outcome = string("outcome", w.outcome, 32)?;
    if outcome != "success" {
        return Err(DecodeError::Unsupported(format!("outcome is {outcome:?}: the {action} request did not happen")));
    }
    let at_text = string("eventTime", w.event_time, 64)?;
    let occurred_at = timestamp("eventTime", &at_text)?;
    let key_id = string("target.id", w.target.get("id").cloned(), 256)?;
    if !(key_id.starts_with("crn:") && key_id.contains(":key:")) {
        return Err(DecodeError::Field { field: "target.id", problem: format!("{key_id:?} is not a Key Protect key CRN (crn:...:key:<id>)") });
    }
    let correlation_id = optional("correlationId", w.correlation_id, 128)?;
    // Activity Tracker may not give the event an id of its own; the request's
    // correlation id plus the action then names it, stable across
    // redeliveries. Either way the id is marked as Activity Tracker's, so
    // that it is never mistaken for an event id of Key Protect's (which is
    // what an event_ack must name).
    let event_id = match (optional("id", w.id, 120)?, &correlation_id) {
        (Some(id), _) => format!("at:{id}"),
        (None, Some(c)) => format!("at:{c}:{action}"),
        (None, None) => {
            return Err(DecodeError::Field { field: "correlationId", problem: "is missing, and so is id; one is needed to recognise redeliveries".into() })
        }
    };
    // A rotate record names no key version (at-events.md): Key Protect
    // reports its newest version when asked, and the rotation goes to that.
    let key_version = (kind == EventType::Rotate).then(|| format!("kp-rotation-{}", occurred_at.format("%Y%m%dT%H%M%SZ")));
    Ok(LifecycleEvent { event_id, kind, key_id, key_version, occurred_at, correlation_id, traceparent: None, material_destroyed })
}

/// The record's target, for the log line of a noted record.
fn target(t: &Value) -> &str {
    t.get("id").and_then(Value::as_str).unwrap_or("an unnamed target")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::intake::format::decode as detect_and_decode;

    const CRN: &str =
        "crn:v1:bluemix:public:kms:us-south:a/f047b55a3362ac06afad8a3f2f5586ea:12e8c9c2-a162-472d-b7d6-8b9a86b815a6:key:2e4f5b0d-f8e3-4b4b-9d1c-3f2a7f4d2e1a";

    /// Shaped like the Activity Tracker samples in the Key Protect docs.
    fn at_event(action: &str) -> serde_json::Value {
        serde_json::json!({
            "initiator": {"id": "IBMid-550006NJ23", "typeURI": "service/security/account/user", "name": "alice@example.com",
                          "host": {"address": "192.0.2.10"}, "credential": {"type": "token"}},
            "target": {"id": CRN, "name": "root-key-prod", "typeURI": "kms/secrets"},
            "observer": {"name": "ActivityTracker"},
            "action": action,
            "outcome": "success",
            "reason": {"reasonCode": 200, "reasonType": "OK"},
            "severity": "warning",
            "eventTime": "2026-03-01T10:15:30.12+0000",
            "correlationId": "8c2b1a4e-3f5d-4e8a-9b7c-1d2e3f4a5b6c",
            "logSourceCRN": "crn:v1:bluemix:public:kms:us-south:a/f047b55a3362ac06afad8a3f2f5586ea:12e8c9c2-a162-472d-b7d6-8b9a86b815a6::",
            "requestData": {"requestURI": "/api/v2/keys/2e4f5b0d-f8e3-4b4b-9d1c-3f2a7f4d2e1a/actions/rotate", "keyType": "root_key"},
            "eventType": "activity",
            "saveServiceCopy": true
        })
    }

    fn decode_json(v: serde_json::Value) -> Result<LifecycleEvent, String> {
        let bytes = serde_json::to_vec(&v).unwrap();
        detect_and_decode(&Incoming { key: None, payload: &bytes, headers: vec![] }).map(|d| d.event).map_err(|e| e.to_string())
    }

    #[test]
    fn every_lifecycle_action_maps_and_keeps_its_correlation_id() {
        for (action, kind) in [
            ("kms.secrets.rotate", EventType::Rotate),
            ("kms.secrets.disable", EventType::Disable),
            ("kms.secrets.enable", EventType::Enable),
            ("kms.secrets.delete", EventType::Delete),
            ("kms.secrets.restore", EventType::Restore),
        ] {
            let e = decode_json(at_event(action)).unwrap();
            assert_eq!((e.kind, e.key_id.as_str()), (kind, CRN));
            assert_eq!(e.correlation_id.as_deref(), Some("8c2b1a4e-3f5d-4e8a-9b7c-1d2e3f4a5b6c"));
            assert_eq!(e.event_id, format!("at:8c2b1a4e-3f5d-4e8a-9b7c-1d2e3f4a5b6c:{action}"));
            assert_eq!(e.occurred_at.to_rfc3339(), "2026-03-01T10:15:30.120+00:00");
        }
        // No version in the record: the rotation goes to the one Key Protect reports.
        assert_eq!(decode_json(at_event("kms.secrets.rotate")).unwrap().key_version.as_deref(), Some("kp-rotation-20260301T101530Z"));
        let purge = decode_json(at_event("kms.secrets.purge")).unwrap();
        assert!(purge.kind == EventType::Delete && purge.material_destroyed, "a purge claims the material destroyed");
    }

    #[test]
    fn expiry_dual_authorization_and_acknowledgement_records_are_noted_not_dead_lettered() {
        for action in
            ["kms.secrets.expire", "kms.secrets.setkeyfordeletion", "kms.secrets.unsetkeyfordeletion", "kms.secrets.ack-rotate", "kms.secrets.ack-delete"]
        {
            let bytes = serde_json::to_vec(&at_event(action)).unwrap();
            let err = detect_and_decode(&Incoming { key: None, payload: &bytes, headers: vec![] }).map(|_| ()).unwrap_err();
            assert!(err.is_noted(), "{action}: {err}");
            assert!(err.to_string().contains(CRN), "{err}");
        }
    }

    #[test]
    fn failures_and_other_actions_are_not_applied() {
        let mut failed = at_event("kms.secrets.disable");
        failed["outcome"] = "failure".into();
        let mut not_a_key = at_event("kms.secrets.delete");
        not_a_key["target"]["id"] = "crn:v1:bluemix:public:kms:us-south:a/x:y::".into();
        for (v, expected) in [(failed, "did not happen"), (at_event("kms.secrets.wrap"), "not a lifecycle action"), (not_a_key, "not a Key Protect key CRN")] {
            let err = decode_json(v).unwrap_err();
            assert!(err.contains(expected) && err.contains("activity-tracker"), "{err} should contain {expected}");
        }
    }
}
