//! The engine's vocabulary: events in, state records and effects out.
//! Every record is serde-serializable so that it can be stored, replayed, or
//! later replicated through a compacted changelog topic.

use std::fmt;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EventType {
    Rotate,
    Disable,
    Enable,
    Delete,
    Restore,
}

impl EventType {
    pub fn as_str(self) -> &'static str {
        match self {
            EventType::Rotate => "rotate",
            EventType::Disable => "disable",
            EventType::Enable => "enable",
            EventType::Delete => "delete",
            EventType::Restore => "restore",
        }
    }
}

impl fmt::Display for EventType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A lifecycle event, whatever format it arrived in.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LifecycleEvent {
    pub event_id: String,
    #[serde(rename = "type")]
    pub kind: EventType,
    pub key_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_version: Option<String>,
    pub occurred_at: DateTime<Utc>,
    /// The KMS's id for the request that caused the event (Key Protect's
    /// `correlationId`); carried to logs, records, commands and acknowledgements
    /// so that both sides can follow one request.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub correlation_id: Option<String>,
    /// W3C trace context of the event's handling, handed on to the commands and
    /// rotation it causes, so that the data plane's work joins the producer's
    /// trace. Set by the intake from the message headers, never by a format.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traceparent: Option<String>,
    /// The KMS destroyed the key material itself (AWS "KMS CMK Deletion"): the
    /// wrapped DEKs can never be unwrapped again, so they are purged at once.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub material_destroyed: bool,
}

fn yes() -> bool {
    true
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// keywarden's view of a root key, built from the events it applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KeyStatus {
    Active,
    Disabled,
    Deleted,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyRecord {
    pub key_id: String,
    pub status: KeyStatus,
    /// Newest root-key version known; DEKs are rewrapped towards it.
    pub version: Option<String>,
    /// `occurred_at` of the newest event applied: older events are stale. Only
    /// an applied event moves it (never an ignored, vetoed or stale one).
    pub last_event_at: Option<DateTime<Utc>>,
    pub last_event_id: Option<String>,
    /// When keywarden applied the delete (not the event's claimed time): the
    /// restore window counts from here, so a back-dated delete cannot cut it short.
    pub deleted_at: Option<DateTime<Utc>>,
    /// Set once the restore window passed and the wrapped DEKs were destroyed.
    pub purged_at: Option<DateTime<Utc>>,
    pub updated_at: DateTime<Utc>,
}

impl KeyRecord {
    pub fn new(key_id: &str, at: DateTime<Utc>) -> Self {
        KeyRecord {
            key_id: key_id.to_string(),
            status: KeyStatus::Active,
            version: None,
            last_event_at: None,
            last_event_id: None,
            deleted_at: None,
            purged_at: None,
            updated_at: at,
        }
    }
}

/// A DEK wrapped by a root-key version. The bytes are opaque to everyone but the KMS.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WrappedDek {
    pub key_version: String,
    #[serde(with = "b64")]
    pub ciphertext: Vec<u8>,
}

impl fmt::Debug for WrappedDek {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "WrappedDek(version {}, {} bytes)", self.key_version, self.ciphertext.len())
    }
}

mod b64 {
    use base64::{engine::general_purpose::STANDARD, Engine};
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(bytes: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&STANDARD.encode(bytes))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let text = String::deserialize(d)?;
        STANDARD.decode(text).map_err(serde::de::Error::custom)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceRecord {
    pub instance_id: String,
    pub key_id: String,
    /// `None` once destroyed: the wrapped DEK is gone and cannot come back.
    pub wrapped: Option<WrappedDek>,
    /// Version of the wrapped DEK (kept after destruction, for the record).
    pub key_version: String,
    pub dek_fingerprint: String,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub destroyed_at: Option<DateTime<Utc>>,
    pub destroyed_reason: Option<String>,
    /// Why the last rewrap failed permanently, until a later one succeeds.
    pub rewrap_error: Option<String>,
    /// The instance's own DEK credential (its hash): only its holder, or a
    /// client certificate mapped to this instance, may fetch the DEK. `None`
    /// for an instance created before credentials existed (its record has no
    /// such field) until `POST /v1/instances/{id}/credential` issues one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credential: Option<DekCredential>,
    /// The last data-plane command the instance's agent reported enforcing
    /// (or failing to), so that an operator sees whether a revocation reached
    /// the database and the monitor can alert when it did not. `None` for an
    /// instance no agent has reported on, and for records from before agents.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data_plane: Option<DataPlaneStatus>,
}

/// What an agent reported doing with one command.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DataPlaneStatus {
    pub command_id: String,
    pub action: CommandAction,
    pub outcome: DataPlaneOutcome,
    /// When the agent finished (its clock).
    pub at: DateTime<Utc>,
    /// What the hook said, shortened; never a key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    /// When keywarden committed the report (its own clock).
    pub received_at: DateTime<Utc>,
}

/// How a command ended on the database host.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DataPlaneOutcome {
    /// The hook ran to completion (exit 0).
    Enforced,
    /// The hook failed; the agent keeps retrying it.
    Failed,
    /// No hook is configured for the action: nothing was done on the host.
    Skipped,
}

/// What keywarden keeps of an instance's DEK credential: never the token,
/// only its SHA-256 (a 256-bit random token needs no slow hash: it cannot be
/// guessed, so the hash only has to be one-way) and a short id that names the
/// credential in the audit trail without saying anything about the token.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DekCredential {
    pub id: String,
    /// Lower-case hex SHA-256 of the token as the client sends it.
    pub sha256: String,
    pub issued_at: DateTime<Utc>,
}

/// Only the id: the hash is not the token, but it is no one's business in a log.
impl fmt::Debug for DekCredential {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "DekCredential({})", self.id)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum InstanceState {
    Active,
    Revoked,
    Erased,
    Destroyed,
}

impl InstanceState {
    pub fn as_str(self) -> &'static str {
        match self {
            InstanceState::Active => "active",
            InstanceState::Revoked => "revoked",
            InstanceState::Erased => "erased",
            InstanceState::Destroyed => "destroyed",
        }
    }
}

/// Revocation is a fact about the key, not a loop over instances: an instance's
/// state is derived from its own record and its key's record, so a disable takes
/// effect for every instance in the single write that records it.
pub fn instance_state(inst: &InstanceRecord, key: Option<&KeyRecord>) -> InstanceState {
    if inst.wrapped.is_none() {
        return InstanceState::Destroyed;
    }
    match key.map(|k| k.status) {
        Some(KeyStatus::Deleted) => InstanceState::Erased,
        Some(KeyStatus::Disabled) => InstanceState::Revoked,
        Some(KeyStatus::Active) | None => InstanceState::Active,
    }
}

#[cfg(test)]
impl InstanceRecord {
    /// An instance of `key_id` holding a wrapped DEK under version 1, made
    /// now: what most tests start from.
    pub(crate) fn sample(instance_id: &str, key_id: &str) -> InstanceRecord {
        InstanceRecord {
            instance_id: instance_id.into(),
            key_id: key_id.into(),
            wrapped: Some(WrappedDek { key_version: "1".into(), ciphertext: vec![1] }),
            key_version: "1".into(),
            dek_fingerprint: "f".into(),
            created_at: Utc::now(),
            updated_at: Utc::now(),
            destroyed_at: None,
            destroyed_reason: None,
            rewrap_error: None,
            credential: None,
            data_plane: None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RotationJob {
    pub key_id: String,
    pub target_version: String,
    pub cause_event_id: String,
    /// Whether the job's own cause is a KMS event to acknowledge once every
    /// DEK is rewrapped: a rotate event's job is; an operator's retry answers
    /// no event of its own.
    #[serde(default = "yes")]
    pub acknowledge: bool,
    /// Rotate events this job has yet to acknowledge besides its running
    /// cause: taken over from the job it replaced (which left DEKs on an
    /// older version, or had not ended), or, once this job ended with DEKs
    /// left behind, its own cause too. Acknowledged, and emptied, when a job
    /// ends with every DEK rewrapped. A job recorded before this field owes
    /// nothing once ended: it acknowledged when it ended, partial or not.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub acknowledges: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub correlation_id: Option<String>,
    /// The causing event's trace: the rotation's rewraps are recorded in it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traceparent: Option<String>,
    pub started_at: DateTime<Utc>,
    /// Instances that needed a rewrap when the job was planned.
    pub total: Option<u64>,
    pub done: u64,
    pub failed: u64,
    pub finished_at: Option<DateTime<Utc>>,
    /// The version the job's last pass rewraps to: the KMS's newest when the
    /// pass began, which the event may not name (a label, or no version).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rewrapping_to: Option<String>,
    /// Instances created while the job ran, wrapped under another version
    /// than the one it rewraps to (wrapped just before the KMS rotated,
    /// committed after the event): the running pass may have read past them.
    /// Only a pass that began after the last of them ends the job.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub arrivals: u64,
}

impl RotationJob {
    /// The KMS events this job has yet to acknowledge: those it holds, and its
    /// own cause (if it is one) while it runs. A job replaced before it
    /// acknowledged them hands them to the job that replaces it.
    pub fn owed_acknowledgements(&self) -> Vec<String> {
        let own = (self.acknowledge && self.finished_at.is_none()).then(|| self.cause_event_id.clone());
        self.acknowledges.iter().cloned().chain(own).collect()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    Applied,
    Duplicate,
    Stale,
    Ignored,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Applied => "applied",
            Outcome::Duplicate => "duplicate",
            Outcome::Stale => "stale",
            Outcome::Ignored => "ignored",
        }
    }
}

/// What became of one event; kept so that redeliveries are recognised and so
/// that an operator can ask what happened.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventRecord {
    pub event_id: String,
    pub key_id: String,
    #[serde(rename = "type")]
    pub kind: EventType,
    pub occurred_at: DateTime<Utc>,
    pub applied_at: DateTime<Utc>,
    pub outcome: Outcome,
    pub detail: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub correlation_id: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CommandAction {
    Revoke,
    Restore,
    Rewrapped,
    Erase,
}

/// An effect to publish after commit. Key-wide commands are one entry that the
/// relay fans out to the key's instances, so a disable commits in O(1).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Effect {
    KeyCommands {
        key_id: String,
        action: CommandAction,
        key_version: Option<String>,
        cause_event_id: String,
        issued_at: DateTime<Utc>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        correlation_id: Option<String>,
        /// Persisted with the effect because the relay publishes after commit,
        /// possibly after a restart, when the event's span is long gone.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        traceparent: Option<String>,
    },
    InstanceCommand {
        instance_id: String,
        key_id: String,
        action: CommandAction,
        key_version: Option<String>,
        cause_event_id: String,
        issued_at: DateTime<Utc>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        correlation_id: Option<String>,
        /// Persisted with the effect because the relay publishes after commit,
        /// possibly after a restart, when the event's span is long gone.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        traceparent: Option<String>,
    },
    /// Instance commands of one cause and version, decided in one writer job
    /// (a rotation's chunk of `rewrapped`s, see `coalesce`): one outbox entry,
    /// sent as one command per instance, each with the id it would have had
    /// alone. A chunk of 1,024 costs one queue insert, one removal and one
    /// replicated copy instead of 1,024 of each.
    InstanceCommands {
        key_id: String,
        action: CommandAction,
        key_version: Option<String>,
        cause_event_id: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        correlation_id: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        traceparent: Option<String>,
        /// In the order they were decided.
        instances: Vec<Issued>,
    },
    /// A lifecycle event emitted by the embedded KMS, as a real KMS would.
    LifecycleEvent { key_id: String, payload: String },
    /// Something the key's KMS wants to be told (Key Protect tracks which
    /// resources a key protects and wants events acknowledged); providers that
    /// do not care ignore it. Kept apart from commands, so a slow KMS never
    /// delays a revocation reaching the data plane.
    KmsNotice { key_id: String, notice: Notice },
    /// An operator alert, firing or (with `ends_at`) resolved.
    Alert(Alert),
}

/// One instance of an `Effect::InstanceCommands`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Issued {
    pub instance_id: String,
    pub issued_at: DateTime<Utc>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    Critical,
    Warning,
}

impl Severity {
    pub fn as_str(self) -> &'static str {
        match self {
            Severity::Critical => "critical",
            Severity::Warning => "warning",
        }
    }
}

/// An operator alert. Its identity is its name and labels: the same condition
/// always raises the same fingerprint, so repeats deduplicate in Alertmanager
/// and a resolve finds what it resolves.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Alert {
    pub name: String,
    pub severity: Severity,
    /// Identifying labels besides the name (key_id, provider, ...).
    pub labels: std::collections::BTreeMap<String, String>,
    pub summary: String,
    pub description: String,
    pub starts_at: DateTime<Utc>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ends_at: Option<DateTime<Utc>>,
    /// Counted when the alert is sent, so that raising it stays O(1) for a key
    /// with many instances.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub count_instances_of: Option<String>,
}

impl Alert {
    pub fn new(name: &str, severity: Severity, labels: &[(&str, &str)], summary: String, description: String, at: DateTime<Utc>) -> Alert {
        Alert {
            name: name.to_string(),
            severity,
            labels: labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            summary,
            description,
            starts_at: at,
            ends_at: None,
            count_instances_of: None,
        }
    }

    /// The same alert, resolved at `at`.
    pub fn resolved(mut self, at: DateTime<Utc>) -> Alert {
        self.ends_at = Some(at);
        self
    }

    pub fn fingerprint(&self) -> String {
        use sha2::Digest;
        let mut h = sha2::Sha256::new();
        h.update(self.name.as_bytes());
        for (k, v) in &self.labels {
            h.update([0]);
            h.update(k.as_bytes());
            h.update([0]);
            h.update(v.as_bytes());
        }
        crate::text::hex(&h.finalize()[..8])
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "notice", rename_all = "snake_case")]
pub enum Notice {
    Registered {
        instance_id: String,
        key_version: String,
    },
    Rewrapped {
        instance_id: String,
        key_version: String,
    },
    Deregistered {
        instance_id: String,
    },
    Acknowledge {
        event_id: String,
        state: AdopterState,
        key_version: Option<String>,
        at: DateTime<Utc>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        correlation_id: Option<String>,
    },
}

/// The adopter's state of its DEKs, as Key Protect's event acknowledgement names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum AdopterState {
    #[serde(rename = "DEK_ENABLED")]
    Enabled,
    #[serde(rename = "DEK_DISABLED")]
    Disabled,
    #[serde(rename = "DEK_DELETED")]
    Deleted,
}

/// What happened, before the chain gives it a place.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditFact {
    /// Who acted: "admin" or "dek" (API tokens), "anonymous" (refused),
    /// "kms-event", "schedule:purge", "schedule:reconcile", "rotation".
    pub who: String,
    /// What: "POST /v1/keys/k1/disable", "event disable", "purge", ...
    pub what: String,
    /// The HTTP status, or the engine's outcome ("applied", "ignored", ...).
    pub outcome: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub event_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instance_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_version: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub correlation_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    /// The DEKs a `release dek` entry records, each with what opened it: one
    /// entry per batch of releases (`api::releases`), not one per fetch.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub releases: Vec<Release>,
}

/// One DEK handed to the data plane, as its batch's audit entry lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Release {
    pub instance_id: String,
    pub key_id: String,
    pub key_version: String,
    /// What opened it: `dek credential <id>`, `client certificate <URI>` or
    /// `shared dek token`; never a token.
    pub opened_by: String,
    /// When it was answered (the entry's own time is its batch's commit).
    pub at: DateTime<Utc>,
}

/// One state change. A batch of these, plus the partition offsets it consumed,
/// is applied to the store atomically.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "record", rename_all = "snake_case")]
pub enum Record {
    Key(KeyRecord),
    Instance(InstanceRecord),
    Event(EventRecord),
    Job(RotationJob),
    Outbox(Effect),
    Offset {
        topic: String,
        partition: i32,
        next: i64,
    },
    /// Placed in the hash-chained audit trail by the store, in the same batch.
    Audit(AuditFact),
}
