//! Hints: events in a format its router cannot sign (EventBridge, CloudTrail,
//! Activity Tracker). Anyone who can produce to the topic can write one, so
//! such an event decides nothing by itself: it is accepted only on a topic
//! configured for hints (`signatures.hint_topics`), only for a key that the
//! format's own KMS serves, and it is applied only as far as that KMS confirms
//! the state it claims. [`judge`] is that rule, pure; the intake asks the KMS
//! and hands the answer here.
//!
//! When the KMS cannot be asked, the safe direction wins: a revocation is
//! applied (as a disable, which a later enable undoes, and only up to the
//! mass-revocation limit), while an enable, restore or rotate is dead-lettered
//! and waits for the KMS (the next reconciliation applies the key's real state,
//! or the event is produced again).

use crate::engine::{EventType, KeyStatus, LifecycleEvent};
use crate::kms::{KmsError, KmsKeyState};

/// Why a hint was not applied. Each is a dead letter with this reason.
#[derive(Debug, thiserror::Error)]
pub enum HintError {
    #[error(
        "{format} events cannot be signed and topic {topic} is not configured for them; add it to signatures.hint_topics to accept them as hints the kms confirms"
    )]
    Topic { format: &'static str, topic: String },
    #[error(
        "{format} event names key {key_id}, which the {serves} kms serves, so the {confirms} kms cannot confirm it; route the key to {confirms} (kms.routes) or send a signed event"
    )]
    Unconfirmable { format: &'static str, key_id: String, confirms: &'static str, serves: &'static str },
    #[error(
        "{format} event {event_id} claims {claim} for key {key_id}, but the kms reports it {kms_says}; not applied (produce it again once the kms agrees)"
    )]
    Contradicted { format: &'static str, event_id: String, key_id: String, claim: &'static str, kms_says: String },
    #[error(
        "{format} event {event_id} ({kind}) for key {key_id} waits for the kms, which cannot be asked ({reason}); the next reconciliation applies the key's state, or produce the event again"
    )]
    Unreachable { format: &'static str, event_id: String, key_id: String, kind: EventType, reason: String },
    #[error(
        "{format} event {event_id} would revoke {instances} instances of key {key_id} without the kms confirming it (more than reconcile.confirm_above = {limit}); check the kms, then produce a signed event or run `keywarden reconcile --confirm`"
    )]
    MassRevocation { format: &'static str, event_id: String, key_id: String, instances: usize, limit: u64 },
}

impl HintError {
    pub fn class(&self) -> &'static str {
        match self {
            HintError::Topic { .. } => "hint_topic",
            HintError::Unconfirmable { .. } => "hint_unconfirmable",
            HintError::Contradicted { .. } => "hint_contradicted",
            HintError::Unreachable { .. } => "hint_kms_unreachable",
            HintError::MassRevocation { .. } => "hint_mass_revocation",
        }
    }

    /// Whether someone may be trying something: a hint where none are
    /// allowed, for a key its KMS does not serve, or one the KMS contradicts.
    /// An unreachable KMS is nobody's doing.
    pub fn is_security_event(&self) -> bool {
        matches!(self, HintError::Topic { .. } | HintError::Unconfirmable { .. } | HintError::Contradicted { .. })
    }
}

/// What the KMS said when asked about the key.
#[derive(Debug)]
pub enum Answer {
    State(KmsKeyState),
    /// The KMS does not know the key, or says its material is gone: the key
    /// cannot be used again.
    Gone,
    Unreachable(String),
}

impl Answer {
    pub fn from_result(result: Result<KmsKeyState, KmsError>) -> Answer {
        match result {
            // A purged key: the KMS no longer knows it.
            Ok(state) if state.material_destroyed => Answer::Gone,
            Ok(state) => Answer::State(state),
            Err(KmsError::UnknownKey(_) | KmsError::MaterialDestroyed { .. }) => Answer::Gone,
            Err(KmsError::KeyDisabled(_)) => Answer::State(KmsKeyState::new(KeyStatus::Disabled, String::new())),
            // Key Protect answers a purged key's calls with 410.
            Err(KmsError::KeyDeleted(_)) => Answer::State(KmsKeyState::new(KeyStatus::Deleted, String::new())),
            Err(e) => Answer::Unreachable(e.to_string()),
        }
    }
}

/// A hint the KMS confirmed, possibly narrowed to what it confirms.
#[derive(Debug, PartialEq, Eq)]
pub struct Confirmed {
    pub event: LifecycleEvent,
    /// The key's status as the KMS reported it, for the engine (`None` when it
    /// could not be asked).
    pub kms: Option<KeyStatus>,
    /// Set when the event applied is not the one claimed, saying why.
    pub narrowed: Option<String>,
}

/// Decides what of a hint to apply, from the KMS's answer and the version
/// keywarden holds for the key. Claims and what confirms them:
///
/// - disable: the KMS reports the key disabled, deleted or gone;
/// - delete: deleted (pending deletion) or gone; a key the KMS reports only
///   disabled is revoked, not erased; a claim that the material was destroyed
///   is believed only when the KMS no longer knows the key, otherwise it is an
///   erasure that a restore can undo;
/// - enable, restore: active;
/// - rotate: active, with a version other than the one keywarden holds (that
///   version is then the rotation's target); a provider that exposes no
///   versions (AWS rotates inside the key) confirms a rotation by the key being
///   active, which is safe since a rewrap never changes the DEK.
///
/// Unreachable: a disable or delete is applied as a disable; anything else is
/// refused until the KMS answers.
pub fn judge(format: &'static str, mut event: LifecycleEvent, held_version: Option<&str>, answer: Answer) -> Result<Confirmed, HintError> {
    let contradicted = |event: &LifecycleEvent, kms_says: String| HintError::Contradicted {
        format,
        event_id: event.event_id.clone(),
        key_id: event.key_id.clone(),
        claim: claim(event),
        kms_says,
    };
    let state = match answer {
        Answer::State(state) => state,
        Answer::Gone => {
            return match event.kind {
                EventType::Disable | EventType::Delete => Ok(Confirmed { event, kms: Some(KeyStatus::Deleted), narrowed: None }),
                _ => Err(contradicted(&event, "unknown (it no longer has the key)".into())),
            }
        }
        Answer::Unreachable(reason) => {
            return match event.kind {
                EventType::Disable => Ok(Confirmed { event, kms: None, narrowed: None }),
                EventType::Delete => {
                    let narrowed = Some(format!("the kms could not be asked ({reason}); the delete is applied as a disable until it confirms"));
                    event.kind = EventType::Disable;
                    event.material_destroyed = false;
                    Ok(Confirmed { event, kms: None, narrowed })
                }
                kind => Err(HintError::Unreachable { format, event_id: event.event_id, key_id: event.key_id, kind, reason }),
            }
        }
    };
    let status = state.status;
    let says = || status_text(status);
    match (event.kind, status) {
        (EventType::Disable, KeyStatus::Disabled | KeyStatus::Deleted) => Ok(Confirmed { event, kms: Some(status), narrowed: None }),
        (EventType::Delete, KeyStatus::Deleted) => {
            let narrowed =
                event.material_destroyed.then(|| "the kms still holds the key (pending deletion): erased with a restore window, not purged".to_string());
            event.material_destroyed = false;
            Ok(Confirmed { event, kms: Some(status), narrowed })
        }
        (EventType::Delete, KeyStatus::Disabled) => {
            event.kind = EventType::Disable;
            event.material_destroyed = false;
            Ok(Confirmed { event, kms: Some(status), narrowed: Some("the kms reports the key disabled, not deleted: revoked, not erased".into()) })
        }
        (EventType::Enable | EventType::Restore, KeyStatus::Active) => Ok(Confirmed { event, kms: Some(status), narrowed: None }),
        (EventType::Rotate, KeyStatus::Active) if state.latest_version.is_empty() => Ok(Confirmed { event, kms: Some(status), narrowed: None }),
        (EventType::Rotate, KeyStatus::Active) if Some(state.latest_version.as_str()) == held_version => {
            Err(contradicted(&event, format!("at version {}, which keywarden already holds", state.latest_version)))
        }
        (EventType::Rotate, KeyStatus::Active) => {
            event.key_version = Some(state.latest_version);
            Ok(Confirmed { event, kms: Some(status), narrowed: None })
        }
        _ => Err(contradicted(&event, says().into())),
    }
}

fn claim(event: &LifecycleEvent) -> &'static str {
    match event.kind {
        EventType::Disable => "the key disabled",
        EventType::Delete if event.material_destroyed => "the key's material destroyed",
        EventType::Delete => "the key deleted",
        EventType::Enable => "the key enabled",
        EventType::Restore => "the key restored",
        EventType::Rotate => "a new key version",
    }
}

fn status_text(status: KeyStatus) -> &'static str {
    match status {
        KeyStatus::Active => "active",
        KeyStatus::Disabled => "disabled",
        KeyStatus::Deleted => "deleted",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::Utc;

    fn hint(kind: EventType) -> LifecycleEvent {
        LifecycleEvent {
            event_id: "h-1".into(),
            kind,
            key_id: "arn:aws:kms:us-east-1:1:key/k".into(),
            key_version: (kind == EventType::Rotate).then(|| "claimed".into()),
            occurred_at: Utc::now(),
            correlation_id: None,
            traceparent: None,
            material_destroyed: false,
        }
    }

    fn kms(status: KeyStatus, version: &str) -> Answer {
        Answer::State(KmsKeyState::new(status, version))
    }

    fn applied(kind: EventType, answer: Answer) -> Option<EventType> {
        judge("eventbridge", hint(kind), Some("v1"), answer).ok().map(|c| c.event.kind)
    }

    #[test]
    fn each_claim_is_applied_only_when_the_kms_reports_that_state() {
        use EventType::*;
        use KeyStatus::{Active as A, Deleted as X, Disabled as D};
        // (claim, kms status, what is applied)
        let table = [
            (Disable, A, None),
            (Disable, D, Some(Disable)),
            (Disable, X, Some(Disable)),
            (Delete, A, None),
            (Delete, D, Some(Disable)),
            (Delete, X, Some(Delete)),
            (Enable, A, Some(Enable)),
            (Enable, D, None),
            (Enable, X, None),
            (Restore, A, Some(Restore)),
            (Restore, D, None),
            (Restore, X, None),
            (Rotate, A, Some(Rotate)),
            (Rotate, D, None),
            (Rotate, X, None),
        ];
        for (claim, status, expected) in table {
            assert_eq!(applied(claim, kms(status, "v2")), expected, "{claim} while the kms reports {status:?}");
        }
    }

    #[test]
    fn a_contradicted_hint_names_the_claim_and_the_kms_state_and_is_a_security_event() {
        let err = judge("eventbridge", hint(EventType::Disable), None, kms(KeyStatus::Active, "")).unwrap_err();
        assert_eq!(err.class(), "hint_contradicted");
        assert!(err.is_security_event());
        let text = err.to_string();
        assert!(text.contains("claims the key disabled") && text.contains("reports it active"), "{text}");
    }

    #[test]
    fn a_rotation_takes_the_kms_version_and_is_refused_when_keywarden_already_holds_it() {
        let c = judge("activity-tracker", hint(EventType::Rotate), Some("v1"), kms(KeyStatus::Active, "v2")).unwrap();
        assert_eq!(c.event.key_version.as_deref(), Some("v2"), "the kms's version, not the claimed one");
        let err = judge("activity-tracker", hint(EventType::Rotate), Some("v2"), kms(KeyStatus::Active, "v2")).unwrap_err();
        assert!(err.to_string().contains("already holds"), "{err}");
        // AWS exposes no versions: active is the confirmation, the claimed label stays.
        let c = judge("eventbridge", hint(EventType::Rotate), Some("v1"), kms(KeyStatus::Active, "")).unwrap();
        assert_eq!(c.event.key_version.as_deref(), Some("claimed"));
    }

    #[test]
    fn destroyed_material_is_believed_only_when_the_kms_no_longer_has_the_key() {
        let destroyed = || LifecycleEvent { material_destroyed: true, ..hint(EventType::Delete) };
        let gone = judge("eventbridge", destroyed(), None, Answer::Gone).unwrap();
        assert!(gone.event.material_destroyed && gone.narrowed.is_none());
        let pending = judge("eventbridge", destroyed(), None, kms(KeyStatus::Deleted, "")).unwrap();
        assert!(!pending.event.material_destroyed, "pending deletion keeps the restore window");
        assert_eq!(pending.event.kind, EventType::Delete);
        assert!(pending.narrowed.unwrap().contains("restore window"));
        assert!(judge("eventbridge", destroyed(), None, kms(KeyStatus::Active, "")).is_err());
    }

    #[test]
    fn an_unreachable_kms_lets_revocations_through_as_disables_and_holds_the_rest() {
        let unreachable = || Answer::Unreachable("connection refused".into());
        assert_eq!(applied(EventType::Disable, unreachable()), Some(EventType::Disable));
        let delete = judge("eventbridge", LifecycleEvent { material_destroyed: true, ..hint(EventType::Delete) }, None, unreachable()).unwrap();
        assert_eq!(delete.event.kind, EventType::Disable, "nothing is erased on an unconfirmed word");
        assert!(!delete.event.material_destroyed && delete.kms.is_none());
        for kind in [EventType::Enable, EventType::Restore, EventType::Rotate] {
            let err = judge("eventbridge", hint(kind), None, unreachable()).unwrap_err();
            assert_eq!(err.class(), "hint_kms_unreachable");
            assert!(!err.is_security_event());
            assert!(err.to_string().contains("connection refused"), "{err}");
        }
    }

    #[test]
    fn a_key_the_kms_does_not_know_confirms_only_revocations() {
        assert_eq!(applied(EventType::Disable, Answer::Gone), Some(EventType::Disable));
        assert_eq!(applied(EventType::Delete, Answer::Gone), Some(EventType::Delete));
        for kind in [EventType::Enable, EventType::Restore, EventType::Rotate] {
            assert_eq!(applied(kind, Answer::Gone), None, "{kind}");
        }
    }

    #[test]
    fn kms_errors_become_answers() {
        assert!(matches!(Answer::from_result(Err(KmsError::UnknownKey("k".into()))), Answer::Gone));
        assert!(matches!(Answer::from_result(Err(KmsError::KeyDeleted("k".into()))), Answer::State(KmsKeyState { status: KeyStatus::Deleted, .. })));
        assert!(matches!(Answer::from_result(Err(KmsError::Throttled("slow down".into()))), Answer::Unreachable(_)));
        assert!(matches!(Answer::from_result(Err(KmsError::Refused("403".into()))), Answer::Unreachable(_)));
        // Key Protect's 404 after a purge: the key is gone, not merely deleted.
        let purged = KmsKeyState { material_destroyed: true, ..KmsKeyState::new(KeyStatus::Deleted, "") };
        assert!(matches!(Answer::from_result(Ok(purged)), Answer::Gone));
        let expired = KmsKeyState { expired: true, ..KmsKeyState::new(KeyStatus::Active, "v1") };
        assert!(matches!(Answer::from_result(Ok(expired)), Answer::State(KmsKeyState { status: KeyStatus::Active, .. })));
    }
}
