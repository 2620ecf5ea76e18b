//! AWS KMS events as Amazon EventBridge delivers them (routed to Kafka by a
//! rule). KMS's own events: `KMS CMK Rotation`, `KMS CMK Deletion` (the key
//! material is gone for good) and `KMS Imported Key Material Expiration`; and
//! the API calls that change a key's usability, as `AWS API Call via
//! CloudTrail`. The key is always named by its ARN, built from the event's
//! region and account when only the bare id is given, so that register AWS keys
//! in keywarden by ARN.

use serde::Deserialize;
use serde_json::Value;

use super::format::{self, optional, string, timestamp, valid_id, Format, Incoming, Probe, Trust};
use super::DecodeError;
use crate::engine::{EventType, LifecycleEvent};

pub static FORMAT: Format = Format {
    name: "eventbridge",
    expects: "detail-type, source aws.kms, id, time, resources or detail naming the key",
    trust: Trust::ConfirmedBy(crate::kms::aws::NAME),
    detect: |_: &Incoming<'_>, probe: Option<&Probe>| probe.is_some_and(|p| p.has("detail-type") && p.has("source")),
    decode,
};

#[derive(Deserialize)]
struct Wire {
    id: Option<Value>,
    #[serde(rename = "detail-type")]
    detail_type: Option<Value>,
    source: Option<Value>,
    account: Option<Value>,
    time: Option<Value>,
    region: Option<Value>,
    #[serde(default)]
    resources: Value,
    #[serde(default)]
    detail: Value,
}

fn decode(msg: &Incoming<'_>) -> Result<LifecycleEvent, DecodeError> {
    let w: Wire = format::parse(msg.payload)?;
    let source = string("source", w.source, 64)?;
    if source != "aws.kms" {
        return Err(unsupported(format!("source {source:?} is not aws.kms; route only KMS events to this topic")));
    }
    let detail_type = string("detail-type", w.detail_type, 128)?;
    let event_id = string("id", w.id, 128)?;
    let occurred_at = timestamp("time", &string("time", w.time, 64)?)?;
    let region = optional("region", w.region, 64)?;
    let account = optional("account", w.account, 64)?;
    let detail = &w.detail;
    let mut correlation_id = None;
    let mut material_destroyed = false;
    let mut key_version = None;
    let kind = match detail_type.as_str() {
        "KMS CMK Rotation" => {
            // AWS keeps a key's versions to itself; the label names this rotation.
            key_version = Some(format!("aws-rotation-{}", occurred_at.format("%Y%m%dT%H%M%SZ")));
            EventType::Rotate
        }
        "KMS CMK Deletion" => {
            material_destroyed = true;
            EventType::Delete
        }
        "KMS Imported Key Material Expiration" => EventType::Disable,
        "AWS API Call via CloudTrail" => {
            if let Some(code) = detail.get("errorCode").and_then(Value::as_str) {
                return Err(unsupported(format!("the CloudTrail call failed ({code}); it changed nothing")));
            }
            correlation_id = detail.get("requestID").and_then(Value::as_str).filter(|s| valid_id("requestID", s, 128).is_ok()).map(str::to_owned);
            match detail.get("eventName").and_then(Value::as_str).unwrap_or_default() {
                "DisableKey" => EventType::Disable,
                "EnableKey" => EventType::Enable,
                // The key cannot be used while its deletion is pending: revoke now.
                // Cancelling leaves it disabled, as AWS does; EnableKey follows.
                "ScheduleKeyDeletion" | "CancelKeyDeletion" => EventType::Disable,
                other => {
                    return Err(unsupported(format!(
                        "CloudTrail call {other:?} is not a lifecycle action; expected DisableKey, EnableKey, ScheduleKeyDeletion or CancelKeyDeletion (filter the rule on detail.eventName)"
                    )))
                }
            }
        }
        other => {
            return Err(unsupported(format!(
                "detail-type {other:?} is not a lifecycle event; expected KMS CMK Rotation, KMS CMK Deletion, KMS Imported Key Material Expiration or AWS API Call via CloudTrail"
            )))
        }
    };
    let key_id = key_arn(&w.resources, detail, region.as_deref(), account.as_deref())?;
    Ok(LifecycleEvent { event_id, kind, key_id, key_version, occurred_at, correlation_id, traceparent: None, material_destroyed })
}

fn unsupported(why: String) -> DecodeError {
    DecodeError::Unsupported(why)
}

/// The key's ARN: from `resources`, from CloudTrail's own resource list, or
/// built from a bare key id with the event's region and account.
fn key_arn(resources: &Value, detail: &Value, region: Option<&str>, account: Option<&str>) -> Result<String, DecodeError> {
    let is_key_arn = |s: &&str| s.starts_with("arn:aws") && s.contains(":key/");
    let listed = resources.as_array().into_iter().flatten().filter_map(Value::as_str).find(is_key_arn);
    let trail = detail["resources"].as_array().into_iter().flatten().filter_map(|r| r["ARN"].as_str()).find(is_key_arn);
    let arn = match listed.or(trail) {
        Some(arn) => arn.to_string(),
        None => {
            let id = [&detail["key-id"], &detail["requestParameters"]["keyId"], &detail["responseElements"]["keyId"]]
                .into_iter()
                .find_map(Value::as_str)
                .ok_or(DecodeError::Field { field: "resources", problem: "names no KMS key, and neither does detail".into() })?;
            if is_key_arn(&id) {
                id.to_string()
            } else if id.starts_with("alias/") || id.contains(":alias/") {
                return Err(DecodeError::Field { field: "detail", problem: format!("names the key by alias {id:?}; keywarden needs the key id or ARN") });
            } else {
                let (Some(region), Some(account)) = (region, account) else {
                    return Err(DecodeError::Field { field: "region", problem: format!("and account are needed to name key {id:?} by its ARN") });
                };
                format!("arn:aws:kms:{region}:{account}:key/{id}")
            }
        }
    };
    valid_id("key", &arn, 256)?;
    Ok(arn)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::intake::format::decode as detect_and_decode;

    const ARN: &str = "arn:aws:kms:us-west-2:111122223333:key/1234abcd-12ab-34cd-56ef-1234567890ab";

    fn decode_json(v: serde_json::Value) -> Result<LifecycleEvent, String> {
        let bytes = serde_json::to_vec(&v).unwrap();
        detect_and_decode(&Incoming { key: None, payload: &bytes, headers: vec![] }).map(|d| d.event).map_err(|e| e.to_string())
    }

    /// The samples from the AWS KMS developer guide ("Monitoring with Amazon EventBridge").
    fn kms_event(detail_type: &str) -> serde_json::Value {
        serde_json::json!({
            "version": "0",
            "id": "6a7e8feb-b491-4cf7-a9f1-bf3703467718",
            "detail-type": detail_type,
            "source": "aws.kms",
            "account": "111122223333",
            "time": "2019-05-13T17:28:29Z",
            "region": "us-west-2",
            "resources": [ARN],
            "detail": {"key-id": "1234abcd-12ab-34cd-56ef-1234567890ab"}
        })
    }

    fn cloudtrail(name: &str) -> serde_json::Value {
        serde_json::json!({
            "version": "0",
            "id": format!("ct-{name}"),
            "detail-type": "AWS API Call via CloudTrail",
            "source": "aws.kms",
            "account": "111122223333",
            "time": "2020-07-25T23:41:56Z",
            "region": "us-west-2",
            "resources": [],
            "detail": {
                "eventVersion": "1.08",
                "eventTime": "2020-07-25T23:41:56Z",
                "eventSource": "kms.amazonaws.com",
                "eventName": name,
                "awsRegion": "us-west-2",
                "requestParameters": {"keyId": "1234abcd-12ab-34cd-56ef-1234567890ab"},
                "responseElements": null,
                "requestID": "req-4f2c",
                "eventID": "a24b3967-ddad-417f-9b22-2332b918db06",
                "resources": [{"accountId": "111122223333", "type": "AWS::KMS::Key", "ARN": ARN}]
            }
        })
    }

    #[test]
    fn kms_events_map_onto_lifecycle_events() {
        let r = decode_json(kms_event("KMS CMK Rotation")).unwrap();
        assert_eq!((r.kind, r.key_id.as_str(), r.key_version.as_deref()), (EventType::Rotate, ARN, Some("aws-rotation-20190513T172829Z")));
        let d = decode_json(kms_event("KMS CMK Deletion")).unwrap();
        assert!(d.kind == EventType::Delete && d.material_destroyed);
        assert_eq!(decode_json(kms_event("KMS Imported Key Material Expiration")).unwrap().kind, EventType::Disable);
    }

    #[test]
    fn cloudtrail_calls_map_onto_lifecycle_events() {
        for (name, kind) in [
            ("DisableKey", EventType::Disable),
            ("EnableKey", EventType::Enable),
            ("ScheduleKeyDeletion", EventType::Disable),
            ("CancelKeyDeletion", EventType::Disable),
        ] {
            let e = decode_json(cloudtrail(name)).unwrap();
            assert_eq!((e.kind, e.key_id.as_str(), e.correlation_id.as_deref()), (kind, ARN, Some("req-4f2c")), "{name}");
            assert!(!e.material_destroyed);
        }
    }

    #[test]
    fn a_bare_key_id_becomes_an_arn() {
        let mut v = kms_event("KMS CMK Rotation");
        v["resources"] = serde_json::json!([]);
        assert_eq!(decode_json(v).unwrap().key_id, ARN);
    }

    #[test]
    fn what_cannot_be_applied_says_why() {
        let mut failed = cloudtrail("DisableKey");
        failed["detail"]["errorCode"] = "AccessDeniedException".into();
        let mut alias = cloudtrail("EnableKey");
        alias["detail"]["resources"] = serde_json::json!([]);
        alias["detail"]["requestParameters"]["keyId"] = "alias/prod".into();
        let mut s3 = kms_event("Object Created");
        s3["source"] = "aws.s3".into();
        for (v, expected) in [
            (failed, "call failed (AccessDeniedException)"),
            (cloudtrail("Encrypt"), "not a lifecycle action"),
            (kms_event("KMS Custom Key Store Status"), "not a lifecycle event"),
            (alias, "by alias"),
            (s3, "is not aws.kms"),
        ] {
            let err = decode_json(v).unwrap_err();
            assert!(err.contains(expected) && err.contains("eventbridge"), "{err} should contain {expected}");
        }
    }
}
