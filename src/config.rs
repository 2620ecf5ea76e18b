//! Configuration: TOML with `deny_unknown_fields`, documented defaults, environment
//! overrides (`KEYWARDEN_<SECTION>_<FIELD>`) and a `validate()` that names the field.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Where they were before the `[kms]` section moved to `kms/`, beside the
/// provider table it is checked against.
pub use crate::kms::{KmsConfig, KmsRoute};

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}; pass an existing file with --config")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("config file {path} is not valid: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("environment variable {var}={value:?} is not valid for {field}: {message}")]
    Env { var: String, value: String, field: String, message: String },
    #[error("config field {field} = {value:?} is not valid: {expected}")]
    Invalid { field: &'static str, value: String, expected: String },
}

impl ConfigError {
    /// The error `validate()` gives for one field: each provider's config
    /// section (in `kms/`) validates itself and must name the field the same way.
    pub fn invalid(field: &'static str, value: impl fmt::Display, expected: impl Into<String>) -> ConfigError {
        ConfigError::Invalid { field, value: value.to_string(), expected: expected.into() }
    }
}

/// A duration written the human way in config ("30d", "250ms", "4h").
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct HumanDuration(pub Duration);

impl fmt::Debug for HumanDuration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", humantime::format_duration(self.0))
    }
}

impl Serialize for HumanDuration {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&humantime::format_duration(self.0).to_string())
    }
}

impl<'de> Deserialize<'de> for HumanDuration {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        humantime::parse_duration(&text)
            .map(HumanDuration)
            .map_err(|e| serde::de::Error::custom(format!("{text:?} is not a duration like \"30d\" or \"250ms\": {e}")))
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub kafka: KafkaConfig,
    pub store: StoreConfig,
    pub api: ApiConfig,
    pub kms: KmsConfig,
    pub policy: PolicyConfig,
    pub rotation: RotationConfig,
    pub signatures: SignaturesConfig,
    pub alerts: AlertsConfig,
    pub reconcile: ReconcileConfig,
    pub log: LogConfig,
    pub telemetry: TelemetryConfig,
    pub cluster: ClusterConfig,
    pub audit: AuditConfig,
    pub data_plane: DataPlaneConfig,
    /// The file this was read from, for SIGHUP.
    #[serde(skip)]
    pub source: Option<PathBuf>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct KafkaConfig {
    /// Bootstrap servers, or "embedded" for librdkafka's in-process mock cluster.
    pub brokers: String,
    pub group_id: String,
    pub events_topic: String,
    pub commands_topic: String,
    pub dlq_topic: String,
    /// Create the three topics at start-up through the admin API.
    pub create_topics: bool,
    /// Partition count used when keywarden creates a topic.
    pub partitions: i32,
    /// Replication factor used when keywarden creates a topic.
    pub replication: i32,
    /// How many events are applied to the store in one flushed batch at most.
    pub max_batch: usize,
    /// Static group membership id (`group.instance.id`), stable per node so that a
    /// restarted daemon gets its partitions back at once. Empty: derived from the
    /// host name and the store path.
    pub instance_id: String,
    /// How this node gets its partitions of the events topic: "auto" (a node
    /// alone assigns itself every partition, several nodes use the consumer
    /// group) or "group" (always the consumer group).
    pub assignment: Assignment,
    /// How long a graceful shutdown waits for in-flight events to become durable.
    /// Must be shorter than the consumer session timeout.
    pub drain_timeout: HumanDuration,
    /// Extra librdkafka properties, passed through verbatim to every client.
    pub properties: BTreeMap<String, String>,
    /// librdkafka properties whose values are secrets, read from these files at
    /// start ("sasl.password" = "/etc/keywarden/kafka-password"), so that no
    /// secret sits in the config file or the environment.
    pub secret_files: BTreeMap<String, PathBuf>,
}

impl Default for KafkaConfig {
    fn default() -> Self {
        Self {
            brokers: "embedded".into(),
            group_id: "keywarden".into(),
            events_topic: "key-lifecycle".into(),
            commands_topic: "instance-commands".into(),
            dlq_topic: "key-lifecycle.dlq".into(),
            create_topics: true,
            partitions: 3,
            replication: 1,
            max_batch: 1024,
            instance_id: String::new(),
            assignment: Assignment::Auto,
            drain_timeout: HumanDuration(Duration::from_secs(10)),
            properties: BTreeMap::new(),
            secret_files: BTreeMap::new(),
        }
    }
}

/// `kafka.assignment`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Assignment {
    /// A group of one (`cluster.group_of_one`) skips the consumer group's join
    /// round (seconds on tansu, at every start) and takes every partition
    /// itself; several nodes use the group.
    Auto,
    /// Always the consumer group, also for a node alone.
    Group,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StoreConfig {
    pub path: PathBuf,
    /// Bytes of sled's page cache, as sled counts them. Full scans (the status
    /// census, the monitor, the per-key gauges on /metrics) pull every page of
    /// the store through it, so with sled's default (1 GiB) the resident memory
    /// grows with the store (655 MiB at 1,000,000 instances). sled counts a
    /// page's bytes on disk, and holds about 2.8 times that in memory: a full
    /// scan with 64 MiB here took ~180 MiB. Too small, and reads go to the disk
    /// (the OS page cache) more often; between 1 MiB and 64 GiB.
    pub cache_capacity: u64,
}

/// 4 MiB: B6 (1,000,000 instances) peaks at 137 MiB, within its 150 MiB target
/// (144–149 MiB with 8 MiB, 223 MiB with 64 MiB). B1's rotation of 100,000 DEKs
/// took 2.95 and 2.69 s against 2.48 and 2.56 s with 64 MiB, and B5's DEK
/// fetches did not move: a host with memory to spare buys the rotation's 10%
/// back here.
pub const DEFAULT_CACHE_CAPACITY: u64 = 4 << 20;

impl Default for StoreConfig {
    fn default() -> Self {
        Self { path: PathBuf::from("keywarden-data"), cache_capacity: DEFAULT_CACHE_CAPACITY }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ApiConfig {
    pub listen: String,
    /// Bearer token for managing keys and instances; created 0600 on first run.
    /// A file (or credential) with fewer than 32 characters refuses to start:
    /// an empty one would otherwise be the empty token.
    pub admin_token_file: PathBuf,
    /// The shared DEK token of old deployments, which opens every instance's
    /// DEK; read (or created) only with `shared_dek_token` on. At least 32
    /// characters, as the admin token.
    pub dek_token_file: PathBuf,
    /// Let the token in `dek_token_file` fetch any instance's DEK, as before
    /// instances had their own credentials. Off by default: a holder of one
    /// instance's credential then reaches that instance only, and a stolen
    /// data-plane token cannot open every tenant's DEK. Turn it on only for
    /// data-plane nodes that cannot yet be given their instance's `dek_token`.
    pub shared_dek_token: bool,
    /// Which instance a client certificate may open, as a URI with one
    /// `{instance}` in it (such as `spiffe://keywarden/instance/{instance}`),
    /// matched against the certificate's URI SANs. Needs
    /// `tls.client_ca_file`: only certificates from that CA are read. Empty
    /// (the default): a certificate opens no DEK by itself, the instance's
    /// credential is needed too.
    pub client_identity: String,
    pub tls: TlsConfig,
    /// Serve plain HTTP on an address other hosts can reach. Off: keywarden
    /// refuses to start with a non-loopback `listen` and no `tls`, because the
    /// API carries bearer tokens and plaintext DEKs that anyone on the path
    /// could read. Turn it on only behind something that encrypts the path
    /// (a TLS-terminating proxy on the host, a service mesh, a VPN).
    pub allow_plaintext: bool,
    /// How long a write (keys, instances) waits for the broker to confirm it
    /// in the changelog before it is answered 503, unapplied. Too long and a
    /// hung broker hangs every client; too short and a slow broker refuses writes.
    pub write_timeout: HumanDuration,
}

/// TLS on the API listener; all empty means plain HTTP.
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct TlsConfig {
    /// PEM certificate chain, leaf first.
    pub cert_file: PathBuf,
    /// PEM private key of that certificate.
    pub key_file: PathBuf,
    /// PEM CA bundle: when set, DEK requests must also present a client
    /// certificate issued by it.
    pub client_ca_file: PathBuf,
}

impl TlsConfig {
    pub fn enabled(&self) -> bool {
        !self.cert_file.as_os_str().is_empty()
    }
}

impl Default for ApiConfig {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:8420".into(),
            admin_token_file: PathBuf::from("keywarden-data/admin.token"),
            dek_token_file: PathBuf::from("keywarden-data/dek.token"),
            shared_dek_token: false,
            client_identity: String::new(),
            tls: TlsConfig::default(),
            allow_plaintext: false,
            write_timeout: HumanDuration(Duration::from_secs(5)),
        }
    }
}

/// The data plane: the listener databases read their keys from, apart from
/// the admin API, so that a database host reaches nothing but its own keys;
/// and what keywarden expects of the agents that enforce its commands on
/// database hosts (`keywarden agent`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DataPlaneConfig {
    /// Where MariaDB's `hashicorp_key_management` plugin (or any HashiCorp
    /// Vault KV v2 client) reads an instance's keys: mount = instance id,
    /// `X-Vault-Token` = the instance's own DEK token. Empty (the default):
    /// off. Nothing of the admin API is served there.
    pub vault_kv_listen: String,
    /// TLS on that listener, as `api.tls` (the plugin takes the CA in
    /// `hashicorp-key-management-vault-ca`). With `client_ca_file` set, a
    /// key is served only over a connection with a client certificate from
    /// that CA.
    pub tls: TlsConfig,
    /// Serve the keys over plain HTTP on an address other hosts can reach.
    /// Off: keywarden refuses to start with a non-loopback `vault_kv_listen`
    /// and no `tls`, because the answers are database keys in the clear.
    pub allow_plaintext: bool,
    /// How long after a key is disabled or deleted every instance of it must
    /// have reported its revoke or erase command enforced
    /// (`POST /v1/instances/{id}/data-plane`); past it, the
    /// KeywardenRevocationUnconfirmed alert fires for each instance that has
    /// not. "0s" (the default): off, for deployments whose hosts run no
    /// agent yet (every instance of every disabled key would alert). Too
    /// long, and a database still running on a revoked key goes unnoticed
    /// until MariaDB's key cache expires and it crashes; too short, and a
    /// slow but clean shutdown alerts. When set, an acknowledgement of a
    /// disable or delete to the KMS also waits until every instance of the
    /// key has reported it enforced (`tell::Relay::enforced`).
    pub enforce_within: HumanDuration,
}

impl Default for DataPlaneConfig {
    fn default() -> Self {
        Self { vault_kv_listen: String::new(), tls: TlsConfig::default(), allow_plaintext: false, enforce_within: HumanDuration(Duration::ZERO) }
    }
}

impl DataPlaneConfig {
    pub fn vault_kv_enabled(&self) -> bool {
        !self.vault_kv_listen.is_empty()
    }
}

/// Operator alerts: where they go and when conditions count as alerts.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AlertsConfig {
    /// Where alerts go; several may be given. Empty: alerts are only logged.
    pub sinks: Vec<AlertSink>,
    /// How often firing alerts are sent again (Alertmanager forgets an alert
    /// that is not repeated within its resolve_timeout).
    pub resend_every: HumanDuration,
    /// How often the conditions below are checked.
    pub check_every: HumanDuration,
    /// Dead-lettered messages per minute above which an alert fires.
    pub dead_letters_per_minute: u64,
    /// A rotation still running after this long alerts as slow.
    pub rotation_slow_after: HumanDuration,
    /// Kafka unreachable for this long alerts.
    pub kafka_unreachable_after: HumanDuration,
    /// A forged-event alert resolves after this long without a new one.
    pub forged_quiet_after: HumanDuration,
}

impl Default for AlertsConfig {
    fn default() -> Self {
        Self {
            sinks: Vec::new(),
            resend_every: HumanDuration(Duration::from_secs(60)),
            check_every: HumanDuration(Duration::from_secs(5)),
            dead_letters_per_minute: 10,
            rotation_slow_after: HumanDuration(Duration::from_secs(3600)),
            kafka_unreachable_after: HumanDuration(Duration::from_secs(60)),
            forged_quiet_after: HumanDuration(Duration::from_secs(15 * 60)),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AlertSink {
    /// "alertmanager" (its v2 API) or "webhook" (a JSON POST).
    pub kind: String,
    /// Alertmanager's base URL (http://host:9093), or the webhook's URL.
    pub url: String,
    /// Webhook only: send a Slack-compatible body ({"text": ...}).
    #[serde(default)]
    pub slack: bool,
}

/// Several nodes sharing the work: see the README's "Running several nodes".
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClusterConfig {
    /// Compacted topic every state change is also written to, with the events
    /// topic's partition count; every node follows it as a read replica. Empty
    /// turns replication off (a single node then needs none).
    pub changelog_topic: String,
    /// A node whose replica has not been caught up for longer than this refuses
    /// DEK requests (503) rather than serve a DEK that may have been revoked.
    pub max_replica_lag: HumanDuration,
    /// The API base URL other nodes forward writes to; empty derives
    /// http(s)://<api.listen>.
    pub advertise_url: String,
    /// A partition of the events topic whose announced owner has not answered
    /// for this long makes a node rejoin the consumer group, so that the broker
    /// assigns it again (see `cluster::orphans`). Keep it above the session timeout.
    pub rejoin_after: HumanDuration,
    /// The secret every changelog record is authenticated under (HMAC-SHA256,
    /// at least 32 characters; a systemd credential of the same file name
    /// wins). Every node of a deployment needs the same one; whoever can
    /// produce to the changelog topic without it changes nothing. Empty:
    /// `cluster.key` in the store directory, created on first start.
    pub secret_file: PathBuf,
    /// The API base URLs of every node of the deployment (as each advertises
    /// itself). A write is forwarded, and a partition's owner asked whether it
    /// lives, only at a URL in this list: an owner announcement naming any
    /// other URL is ignored (the partition counts as ownerless). Empty: no
    /// node but this one, so a single node needs none and several nodes must
    /// list each other. At most one entry also makes the node a group of one,
    /// which publishes its changelog after applying instead of before
    /// (`cluster::deferred`): list every node on every node, or a node that
    /// takes partitions over from it may miss its last writes.
    pub peers: Vec<String>,
}

impl ClusterConfig {
    /// No other node can take this node's partitions over: its changelog has
    /// no reader that must see a batch before it is applied.
    pub fn group_of_one(&self) -> bool {
        self.peers.len() <= 1
    }
}

impl Default for ClusterConfig {
    fn default() -> Self {
        Self {
            changelog_topic: "keywarden-state".into(),
            max_replica_lag: HumanDuration(Duration::from_secs(2)),
            advertise_url: String::new(),
            rejoin_after: HumanDuration(Duration::from_secs(20)),
            secret_file: PathBuf::new(),
            peers: Vec::new(),
        }
    }
}

/// The audit trail's seal: see `store::audit`.
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct AuditConfig {
    /// The secret every audit entry is sealed under (HMAC-SHA256, at least 32
    /// characters; a systemd credential of the same file name wins), created
    /// (mode 0600) on first start. Whoever can write the store can recompute
    /// its hash chain; only a seal he cannot make shows an entry edited
    /// offline, so the secret must not be in the store. Empty:
    /// `<store.path>-audit.key`, beside the store directory and not in it, so
    /// that a copy, backup or restore of the store never carries it; where the
    /// store's writers can also reach that directory, give it as a systemd
    /// credential or a file on another volume. Losing or changing it makes
    /// every entry sealed under it fail `audit verify`.
    pub secret_file: PathBuf,
}

/// Reconciliation: polls each key's KMS and corrects what events missed.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ReconcileConfig {
    /// Cron schedule with seconds ("0 */5 * * * *" is every five minutes);
    /// empty turns reconciliation off.
    pub schedule: String,
    /// A run that would revoke or erase more instances than this alerts and
    /// waits for `keywarden reconcile confirm` instead of acting.
    pub confirm_above: u64,
}

impl Default for ReconcileConfig {
    fn default() -> Self {
        Self { schedule: "0 */5 * * * *".into(), confirm_above: 1000 }
    }
}

/// Event authenticity: see `intake::signature`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SignaturesConfig {
    /// Native and CloudEvents messages must carry a valid signature.
    pub required: bool,
    /// The HMAC-SHA256 secret this daemon signs its own events with (the
    /// embedded KMS's) and also accepts, and signs every data-plane command
    /// with, so that a consumer can tell a real one from a forged one;
    /// created on first run. Empty: none, and commands go out unsigned.
    pub hmac_key_file: PathBuf,
    /// The key id that secret goes by in signature headers.
    pub hmac_key_id: String,
    /// More keys to accept: partners' Ed25519 public keys, or an old secret
    /// during a rollover.
    pub keys: Vec<SignatureKey>,
    /// How far ahead of this daemon's clock an event's `occurred_at` may be
    /// before the intake dead-letters it. A signature proves who sent an
    /// event, not when: a future-dated event would otherwise be the newest
    /// word on its key and make the real events after it stale. Too small and
    /// events from producers with a slightly fast clock are refused; too large
    /// and an event dated that far ahead still wins over the real ones.
    pub max_clock_skew: HumanDuration,
    /// Topics on which events in formats that cannot be signed (EventBridge,
    /// CloudTrail, Activity Tracker) are accepted, as hints that the key's own
    /// KMS must confirm before anything is applied. Empty: such events are
    /// dead-lettered wherever they arrive.
    pub hint_topics: Vec<String>,
}

impl Default for SignaturesConfig {
    fn default() -> Self {
        Self {
            required: true,
            hmac_key_file: PathBuf::from("keywarden-data/event-hmac.key"),
            hmac_key_id: "local".into(),
            keys: Vec::new(),
            max_clock_skew: HumanDuration(Duration::from_secs(5 * 60)),
            hint_topics: Vec::new(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SignatureKey {
    pub id: String,
    pub algorithm: SignatureAlgorithm,
    /// HMAC: the secret; Ed25519: base64 of the 32-byte public key.
    pub file: PathBuf,
    /// Topics this key may sign for; empty means every topic consumed.
    #[serde(default)]
    pub topics: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
pub enum SignatureAlgorithm {
    #[serde(rename = "hmac-sha256")]
    #[value(name = "hmac-sha256")]
    HmacSha256,
    #[serde(rename = "ed25519")]
    #[value(name = "ed25519")]
    Ed25519,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PolicyConfig {
    /// How long a deleted key's wrapped DEKs are kept so that a restore can bring data back.
    pub purge_after: HumanDuration,
    /// How long plaintext unwrapped by the KMS may be served from memory; past
    /// that the KMS is asked again, and an unreachable KMS means refusal.
    pub max_dek_cache_age: HumanDuration,
    /// Cached plaintext DEKs at most.
    pub dek_cache_size: usize,
    /// Cron expression (with seconds) for the purge sweep.
    pub purge_schedule: String,
}

impl Default for PolicyConfig {
    fn default() -> Self {
        Self {
            purge_after: HumanDuration(Duration::from_secs(30 * 24 * 3600)),
            max_dek_cache_age: HumanDuration(Duration::from_secs(4 * 3600)),
            dek_cache_size: 100_000,
            purge_schedule: "0 * * * * *".into(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RotationConfig {
    /// Rewrap calls in flight at once against the KMS.
    pub concurrency: usize,
    /// Rewrapped instances committed to the store in one batch.
    pub batch: usize,
    /// Attempts, with capped exponential backoff and jitter, for a rewrap that fails
    /// transiently; then the instance waits for the job's next pass.
    pub max_attempts: u32,
}

impl Default for RotationConfig {
    fn default() -> Self {
        Self { concurrency: 16, batch: 256, max_attempts: 5 }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// "plain" or "json".
    pub format: String,
    /// A tracing filter such as "info" or "keywarden=debug".
    pub level: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self { format: "plain".into(), level: "info".into() }
    }
}

/// OpenTelemetry traces: see `telemetry`. Off unless an endpoint is set.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TelemetryConfig {
    /// Base URL of an OTLP/HTTP collector ("http://127.0.0.1:4318"); spans are
    /// posted as protobuf to <url>/v1/traces. Empty: no spans are recorded or
    /// exported, and an event's incoming traceparent is still passed on to its
    /// commands. A wrong URL loses traces (export errors go to the log), never events.
    pub otlp_endpoint: String,
    /// The `service.name` the traces are filed under; two deployments sharing
    /// one name mix their traces in the backend.
    pub service_name: String,
    /// Fraction of traces keywarden starts that are recorded, 0.0 to 1.0. A
    /// producer's traceparent decides for its own trace, so a trace is never
    /// half recorded; lower this if the collector cannot keep up.
    pub sample_ratio: f64,
    /// Timeout of one export request; a collector slower than this drops the batch.
    pub export_timeout: HumanDuration,
}

impl Default for TelemetryConfig {
    fn default() -> Self {
        Self { otlp_endpoint: String::new(), service_name: "keywarden".into(), sample_ratio: 1.0, export_timeout: HumanDuration(Duration::from_secs(10)) }
    }
}

impl Config {
    /// Reads the file (when given), applies `KEYWARDEN_*` overrides, then validates.
    pub fn load(path: Option<&Path>) -> Result<Config, ConfigError> {
        let vars: Vec<(String, String)> = std::env::vars().filter(|(k, _)| k.starts_with("KEYWARDEN_")).collect();
        Self::load_with_env(path, &vars)
    }

    pub fn load_with_env(path: Option<&Path>, vars: &[(String, String)]) -> Result<Config, ConfigError> {
        let (text, shown) = match path {
            Some(p) => (std::fs::read_to_string(p).map_err(|source| ConfigError::Read { path: p.into(), source })?, p.to_path_buf()),
            None => (String::new(), PathBuf::from("<defaults>")),
        };
        let parse_err = |message: String| ConfigError::Parse { path: shown.clone(), message };
        let mut value: toml::Value = toml::from_str(&text).map_err(|e| parse_err(e.to_string()))?;
        // Validate the file alone first, so that a typo is reported against the file.
        Config::deserialize(value.clone()).map_err(|e| parse_err(e.to_string()))?;
        let defaults = toml::Value::try_from(Config::default()).expect("defaults serialize");
        apply_env(&mut value, &defaults, vars)?;
        let mut config = Config::deserialize(value).map_err(|e| parse_err(e.to_string()))?;
        config.source = path.map(Path::to_path_buf);
        config.validate()?;
        if config.kafka.instance_id.is_empty() {
            config.kafka.instance_id = derived_instance_id(&config.store.path);
        }
        Ok(config)
    }

    /// `kafka.assignment` "auto" on a node alone: no consumer group join, every
    /// partition of the events topic taken at start (`intake::assign`).
    pub fn assigns_every_partition(&self) -> bool {
        self.kafka.assignment == Assignment::Auto && self.cluster.group_of_one()
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |field: &'static str, value: &dyn fmt::Display, expected: &str| ConfigError::Invalid {
            field,
            value: value.to_string(),
            expected: expected.to_string(),
        };
        let k = &self.kafka;
        if k.brokers.trim().is_empty() {
            return Err(invalid("kafka.brokers", &k.brokers, "\"embedded\" or a list like \"host1:9092,host2:9092\""));
        }
        if k.group_id.trim().is_empty() {
            return Err(invalid("kafka.group_id", &k.group_id, "a non-empty consumer group id"));
        }
        for (field, topic) in [("kafka.events_topic", &k.events_topic), ("kafka.commands_topic", &k.commands_topic), ("kafka.dlq_topic", &k.dlq_topic)] {
            if !valid_topic(topic) {
                return Err(invalid(field, topic, "a Kafka topic name: 1-249 characters of a-z A-Z 0-9 . _ -"));
            }
        }
        if k.events_topic == k.commands_topic || k.events_topic == k.dlq_topic || k.commands_topic == k.dlq_topic {
            return Err(invalid("kafka.dlq_topic", &k.dlq_topic, "events, commands and dead-letter topics must all differ"));
        }
        if !(1..=10_000).contains(&k.partitions) {
            return Err(invalid("kafka.partitions", &k.partitions, "a whole number from 1 to 10000"));
        }
        if !(1..=16).contains(&k.replication) {
            return Err(invalid("kafka.replication", &k.replication, "a whole number from 1 to 16"));
        }
        if !(1..=100_000).contains(&k.max_batch) {
            return Err(invalid("kafka.max_batch", &k.max_batch, "a whole number from 1 to 100000"));
        }
        if let Some(name) = k.properties.keys().find(|name| is_secret_property(name)) {
            return Err(ConfigError::Invalid {
                field: "kafka.properties",
                value: name.clone(),
                expected: format!("no secret inline: put the value of {name} in a file and name it under [kafka.secret_files]"),
            });
        }
        let session_ms: u64 = k.properties.get("session.timeout.ms").and_then(|v| v.parse().ok()).unwrap_or(45_000);
        if k.drain_timeout.0.is_zero() || k.drain_timeout.0 >= Duration::from_millis(session_ms) {
            return Err(invalid(
                "kafka.drain_timeout",
                &format!("{:?}", k.drain_timeout),
                &format!("a positive duration shorter than the session timeout ({session_ms} ms)"),
            ));
        }
        if k.instance_id.len() > 200 || k.instance_id.chars().any(char::is_control) {
            return Err(invalid("kafka.instance_id", &k.instance_id, "up to 200 printable characters, or empty to derive one"));
        }
        if !((1 << 20)..=(64 << 30)).contains(&self.store.cache_capacity) {
            return Err(invalid("store.cache_capacity", &self.store.cache_capacity, "bytes from 1048576 (1 MiB) to 68719476736 (64 GiB)"));
        }
        if self.store.path.as_os_str().is_empty() {
            return Err(invalid("store.path", &self.store.path.display(), "a directory path"));
        }
        for sink in &self.alerts.sinks {
            if !matches!(sink.kind.as_str(), "alertmanager" | "webhook") {
                return Err(invalid("alerts.sinks.kind", &sink.kind, "\"alertmanager\" or \"webhook\""));
            }
            if !(sink.url.starts_with("http://") || sink.url.starts_with("https://")) {
                return Err(invalid("alerts.sinks.url", &sink.url, "an http:// or https:// URL"));
            }
            if sink.slack && sink.kind != "webhook" {
                return Err(invalid("alerts.sinks.slack", &sink.kind, "only a webhook sink takes slack = true"));
            }
        }
        for (field, d) in [("alerts.resend_every", self.alerts.resend_every), ("alerts.check_every", self.alerts.check_every)] {
            if d.0 < Duration::from_millis(100) {
                return Err(invalid(field, &format!("{d:?}"), "at least 100ms"));
            }
        }
        if self.data_plane.enforce_within.0 != Duration::ZERO && self.data_plane.enforce_within.0 < Duration::from_secs(1) {
            return Err(invalid("data_plane.enforce_within", &format!("{:?}", self.data_plane.enforce_within), "\"0s\" (off) or at least 1s"));
        }
        if !self.reconcile.schedule.is_empty() && cron::Schedule::from_str(&self.reconcile.schedule).is_err() {
            return Err(invalid("reconcile.schedule", &self.reconcile.schedule, "a cron expression with seconds, e.g. \"0 */5 * * * *\", or empty for off"));
        }
        let c = &self.cluster;
        if !c.changelog_topic.is_empty()
            && (!valid_topic(&c.changelog_topic) || [&k.events_topic, &k.commands_topic, &k.dlq_topic].contains(&&c.changelog_topic))
        {
            return Err(invalid("cluster.changelog_topic", &c.changelog_topic, "a Kafka topic name of its own, or empty for off"));
        }
        if !(c.advertise_url.is_empty() || c.advertise_url.starts_with("http://") || c.advertise_url.starts_with("https://")) {
            return Err(invalid("cluster.advertise_url", &c.advertise_url, "an http:// or https:// URL, or empty to derive it"));
        }
        if let Some(bad) = c.peers.iter().find(|p| !(p.starts_with("http://") || p.starts_with("https://"))) {
            return Err(invalid("cluster.peers", bad, "a list of http:// or https:// URLs, one per node"));
        }
        if c.rejoin_after.0 < Duration::from_secs(2) {
            return Err(invalid("cluster.rejoin_after", &format!("{:?}", c.rejoin_after.0), "at least 2s, and above the consumer session timeout"));
        }
        let sig = &self.signatures;
        if !sig.hmac_key_file.as_os_str().is_empty() && !valid_key_id(&sig.hmac_key_id) {
            return Err(invalid("signatures.hmac_key_id", &sig.hmac_key_id, "1-128 characters of a-z A-Z 0-9 . _ -"));
        }
        let mut ids = vec![sig.hmac_key_id.as_str()];
        for key in &sig.keys {
            if !valid_key_id(&key.id) || ids.contains(&key.id.as_str()) {
                return Err(invalid("signatures.keys.id", &key.id, "a unique key id of 1-128 characters of a-z A-Z 0-9 . _ -"));
            }
            ids.push(&key.id);
            if key.file.as_os_str().is_empty() {
                return Err(invalid("signatures.keys.file", &key.id, "the path of the key's file"));
            }
            if let Some(t) = key.topics.iter().find(|t| **t != k.events_topic) {
                return Err(invalid("signatures.keys.topics", t, &format!("a topic keywarden consumes ({})", k.events_topic)));
            }
        }
        if let Some(t) = sig.hint_topics.iter().find(|t| **t != k.events_topic) {
            return Err(invalid("signatures.hint_topics", t, &format!("a topic keywarden consumes ({})", k.events_topic)));
        }
        if sig.required && sig.hmac_key_file.as_os_str().is_empty() && sig.keys.is_empty() {
            return Err(invalid("signatures.keys", &"[]", "at least one key when signatures.required is true"));
        }
        if !(Duration::from_secs(1)..=Duration::from_secs(24 * 3600)).contains(&sig.max_clock_skew.0) {
            return Err(invalid("signatures.max_clock_skew", &format!("{:?}", sig.max_clock_skew), "between 1s and 24h, such as \"5m\""));
        }
        if SocketAddr::from_str(&self.api.listen).is_err() {
            return Err(invalid("api.listen", &self.api.listen, "an address like 127.0.0.1:8420"));
        }
        if self.api.write_timeout.0 < Duration::from_millis(100) || self.api.write_timeout.0 > Duration::from_secs(120) {
            return Err(invalid("api.write_timeout", &format!("{:?}", self.api.write_timeout.0), "between 100ms and 120s"));
        }
        let tls = &self.api.tls;
        // Both set or both empty.
        if tls.enabled() == tls.key_file.as_os_str().is_empty() {
            return Err(invalid("api.tls.key_file", &tls.key_file.display(), "set together with api.tls.cert_file, or both empty"));
        }
        if !tls.enabled() && !tls.client_ca_file.as_os_str().is_empty() {
            return Err(invalid("api.tls.client_ca_file", &tls.client_ca_file.display(), "used only with api.tls.cert_file and key_file set"));
        }
        if !self.api.client_identity.is_empty() {
            if tls.client_ca_file.as_os_str().is_empty() {
                return Err(invalid(
                    "api.client_identity",
                    &self.api.client_identity,
                    "used only with api.tls.client_ca_file set (certificates are read only from that CA)",
                ));
            }
            if crate::api::credential::IdentityPattern::parse(&self.api.client_identity).is_none() {
                return Err(invalid(
                    "api.client_identity",
                    &self.api.client_identity,
                    "a URI with {instance} in it exactly once, such as \"spiffe://keywarden/instance/{instance}\", or empty",
                ));
            }
        }
        if !tls.enabled() && !self.api.allow_plaintext && !is_loopback(&self.api.listen) {
            return Err(invalid(
                "api.listen",
                &self.api.listen,
                "a loopback address such as 127.0.0.1:8420 while the api speaks plain http (it carries tokens and plaintext DEKs); \
                 enable api.tls (cert_file and key_file) or set api.allow_plaintext = true",
            ));
        }
        self.validate_data_plane()?;
        self.kms.validate()?;
        if self.api.admin_token_file.as_os_str().is_empty() || self.api.admin_token_file == self.api.dek_token_file {
            return Err(invalid("api.admin_token_file", &self.api.admin_token_file.display(), "a file path, different from api.dek_token_file"));
        }
        // Not in `kms.validate()`: the embedded provider's section has always
        // been checked here, after the API's, and the first error reported stays the same.
        self.kms.local.validate()?;
        if self.policy.purge_after.0.is_zero() {
            return Err(invalid("policy.purge_after", &"0s", "a positive duration such as \"30d\""));
        }
        if self.policy.max_dek_cache_age.0.is_zero() {
            return Err(invalid("policy.max_dek_cache_age", &"0s", "a positive duration such as \"4h\""));
        }
        if !(1..=10_000_000).contains(&self.policy.dek_cache_size) {
            return Err(invalid("policy.dek_cache_size", &self.policy.dek_cache_size, "a whole number from 1 to 10000000"));
        }
        if cron::Schedule::from_str(&self.policy.purge_schedule).is_err() {
            return Err(invalid("policy.purge_schedule", &self.policy.purge_schedule, "a cron expression with seconds, such as \"0 * * * * *\""));
        }
        let r = &self.rotation;
        if !(1..=1024).contains(&r.concurrency) {
            return Err(invalid("rotation.concurrency", &r.concurrency, "a whole number from 1 to 1024"));
        }
        if !(1..=100_000).contains(&r.batch) {
            return Err(invalid("rotation.batch", &r.batch, "a whole number from 1 to 100000"));
        }
        if !(1..=100).contains(&r.max_attempts) {
            return Err(invalid("rotation.max_attempts", &r.max_attempts, "a whole number from 1 to 100"));
        }
        if !matches!(self.log.format.as_str(), "plain" | "json") {
            return Err(invalid("log.format", &self.log.format, "\"plain\" or \"json\""));
        }
        if tracing_subscriber::EnvFilter::try_new(&self.log.level).is_err() {
            return Err(invalid("log.level", &self.log.level, "a tracing filter such as \"info\" or \"keywarden=debug\""));
        }
        let t = &self.telemetry;
        if !t.otlp_endpoint.is_empty() && !reqwest::Url::parse(&t.otlp_endpoint).is_ok_and(|u| matches!(u.scheme(), "http" | "https")) {
            return Err(invalid("telemetry.otlp_endpoint", &t.otlp_endpoint, "an http(s) URL such as \"http://127.0.0.1:4318\", or empty for no traces"));
        }
        if t.service_name.trim().is_empty() {
            return Err(invalid("telemetry.service_name", &t.service_name, "a non-empty name such as \"keywarden\""));
        }
        if !(0.0..=1.0).contains(&t.sample_ratio) {
            return Err(invalid("telemetry.sample_ratio", &t.sample_ratio, "a number from 0.0 to 1.0"));
        }
        if t.export_timeout.0.is_zero() {
            return Err(invalid("telemetry.export_timeout", &"0s", "a positive duration such as \"10s\""));
        }
        Ok(())
    }

    /// `[data_plane]`: the same rules as the API's listener and TLS, and a
    /// port of its own (on the API's, one of the two would not start).
    fn validate_data_plane(&self) -> Result<(), ConfigError> {
        let d = &self.data_plane;
        if !d.vault_kv_enabled() {
            if d.tls.enabled() || !d.tls.key_file.as_os_str().is_empty() || !d.tls.client_ca_file.as_os_str().is_empty() {
                return Err(ConfigError::invalid("data_plane.tls.cert_file", d.tls.cert_file.display(), "used only with data_plane.vault_kv_listen set"));
            }
            return Ok(());
        }
        if SocketAddr::from_str(&d.vault_kv_listen).is_err() {
            return Err(ConfigError::invalid("data_plane.vault_kv_listen", &d.vault_kv_listen, "an address like 127.0.0.1:8200, or empty for off"));
        }
        if d.vault_kv_listen == self.api.listen {
            return Err(ConfigError::invalid("data_plane.vault_kv_listen", &d.vault_kv_listen, "an address other than api.listen"));
        }
        if d.tls.enabled() == d.tls.key_file.as_os_str().is_empty() {
            return Err(ConfigError::invalid("data_plane.tls.key_file", d.tls.key_file.display(), "set together with data_plane.tls.cert_file, or both empty"));
        }
        if !d.tls.enabled() && !d.tls.client_ca_file.as_os_str().is_empty() {
            return Err(ConfigError::invalid(
                "data_plane.tls.client_ca_file",
                d.tls.client_ca_file.display(),
                "used only with data_plane.tls.cert_file and key_file set",
            ));
        }
        if !d.tls.enabled() && !d.allow_plaintext && !is_loopback(&d.vault_kv_listen) {
            return Err(ConfigError::invalid(
                "data_plane.vault_kv_listen",
                &d.vault_kv_listen,
                "a loopback address such as 127.0.0.1:8200 while it speaks plain http (it answers database keys); \
                 enable data_plane.tls (cert_file and key_file) or set data_plane.allow_plaintext = true",
            ));
        }
        Ok(())
    }

    /// Whether a provider serves any key: the default or a route names it.
    pub fn uses(&self, provider: &str) -> bool {
        self.kms.uses(provider)
    }

    pub fn embedded_broker(&self) -> bool {
        self.kafka.brokers == "embedded"
    }

    /// `cluster.secret_file`, or its default beside the store.
    pub fn cluster_secret_file(&self) -> PathBuf {
        if self.cluster.secret_file.as_os_str().is_empty() {
            self.store.path.join("cluster.key")
        } else {
            self.cluster.secret_file.clone()
        }
    }

    /// `audit.secret_file`, or its default beside (not in) the store
    /// directory: `keywarden-data` gives `keywarden-data-audit.key`.
    pub fn audit_secret_file(&self) -> PathBuf {
        if !self.audit.secret_file.as_os_str().is_empty() {
            return self.audit.secret_file.clone();
        }
        // Resolved, so that `.` or `data/..` name the directory they mean.
        let store = std::fs::canonicalize(&self.store.path).or_else(|_| std::path::absolute(&self.store.path)).unwrap_or_else(|_| self.store.path.clone());
        match store.file_name() {
            Some(name) => store.with_file_name(format!("{}-audit.key", name.to_string_lossy())),
            // The root directory: nothing is beside it.
            None => store.join("keywarden-audit.key"),
        }
    }
}

/// Whether `api.listen` is an address only this host can reach: 127.0.0.0/8,
/// ::1 (also written as ::ffff:127.x.y.z), or localhost. 0.0.0.0 and :: are
/// every interface, so not loopback.
fn is_loopback(listen: &str) -> bool {
    if let Ok(addr) = SocketAddr::from_str(listen) {
        return addr.ip().to_canonical().is_loopback();
    }
    listen.rsplit_once(':').is_some_and(|(host, port)| host.eq_ignore_ascii_case("localhost") && port.parse::<u16>().is_ok())
}

/// Property names whose values are credentials.
fn is_secret_property(name: &str) -> bool {
    let n = name.to_ascii_lowercase();
    n.contains("password") || n.contains("secret") || n == "ssl.key.pem" || n == "sasl.oauthbearer.config"
}

impl KafkaConfig {
    /// The secret properties, read from their files.
    pub fn read_secrets(&self) -> Result<Vec<(String, String)>, ConfigError> {
        self.secret_files
            .iter()
            .map(|(name, path)| {
                std::fs::read_to_string(path)
                    .map(|v| (name.clone(), v.trim_end_matches(['\n', '\r']).to_string()))
                    .map_err(|source| ConfigError::Read { path: path.clone(), source })
            })
            .collect()
    }
}

/// Stable for one store on one host, different for two stores: two daemons must
/// never share a static member id, and one daemon must keep its own across restarts.
fn derived_instance_id(store: &Path) -> String {
    use sha2::{Digest, Sha256};
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    let path = std::fs::canonicalize(store).unwrap_or_else(|_| std::env::current_dir().unwrap_or_default().join(store));
    let digest = Sha256::new().chain_update(host.trim()).chain_update([0]).chain_update(path.as_os_str().as_encoded_bytes()).finalize();
    let hex = crate::text::hex(&digest[..6]);
    format!("keywarden-{}-{hex}", host.trim())
}

/// What SIGHUP may change without a restart.
const RELOADABLE: &[&str] = &["log.level", "alerts.sinks"];

impl Config {
    /// The fields that differ between `self` and `next` and that a reload cannot
    /// apply; empty means `next` can be taken as it is.
    pub fn not_reloadable(&self, next: &Config) -> Vec<String> {
        let (mut a, mut b) = (Vec::new(), Vec::new());
        collect_all(&toml::Value::try_from(self).expect("config serializes"), &mut Vec::new(), &mut a);
        collect_all(&toml::Value::try_from(next).expect("config serializes"), &mut Vec::new(), &mut b);
        let mut changed: Vec<String> = a
            .iter()
            .filter(|(p, v)| b.iter().find(|(q, _)| q == p).map(|(_, w)| w) != Some(v))
            .chain(b.iter().filter(|(p, _)| !a.iter().any(|(q, _)| q == p)))
            .map(|(p, _)| p.clone())
            .filter(|p| !RELOADABLE.iter().any(|r| p == r || p.starts_with(&format!("{r}."))))
            .collect();
        changed.sort();
        changed.dedup();
        changed
    }
}

/// Every leaf by dotted path; arrays count as one leaf.
fn collect_all(v: &toml::Value, path: &mut Vec<String>, out: &mut Vec<(String, toml::Value)>) {
    match v {
        toml::Value::Table(t) => {
            for (k, child) in t {
                path.push(k.clone());
                collect_all(child, path, out);
                path.pop();
            }
        }
        leaf => out.push((path.join("."), leaf.clone())),
    }
}

fn valid_key_id(id: &str) -> bool {
    (1..=128).contains(&id.len()) && id.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
}

fn valid_topic(t: &str) -> bool {
    !t.is_empty() && t.len() <= 249 && t != "." && t != ".." && t.chars().all(|c| c.is_ascii_alphanumeric() || ".-_".contains(c))
}

/// Every leaf of the default config is a settable field; its variable is
/// `KEYWARDEN_` + the path joined by `_`, upper-cased. Values are parsed as the
/// leaf's type, so a typo in a number fails with the variable's name.
fn apply_env(value: &mut toml::Value, defaults: &toml::Value, vars: &[(String, String)]) -> Result<(), ConfigError> {
    let mut leaves = Vec::new();
    collect_leaves(defaults, &mut Vec::new(), &mut leaves);
    for (var, raw) in vars {
        let Some((path, template)) = leaves.iter().find(|(p, _)| env_name(p) == *var) else {
            if let Some(name) = var.strip_prefix("KEYWARDEN_KAFKA_PROPERTIES_") {
                // librdkafka property names are dotted; "KEYWARDEN_KAFKA_PROPERTIES_SESSION_TIMEOUT_MS" sets session.timeout.ms.
                let prop = name.to_lowercase().replace('_', ".");
                set_path(value, &["kafka", "properties", &prop], toml::Value::String(raw.clone()));
            }
            continue;
        };
        let field = path.join(".");
        let parsed = match template {
            toml::Value::String(_) => toml::Value::String(raw.clone()),
            toml::Value::Integer(_) => toml::Value::Integer(raw.trim().parse().map_err(|_| ConfigError::Env {
                var: var.clone(),
                value: raw.clone(),
                field: field.clone(),
                message: "expected a whole number".into(),
            })?),
            toml::Value::Float(_) => toml::Value::Float(raw.trim().parse().map_err(|_| ConfigError::Env {
                var: var.clone(),
                value: raw.clone(),
                field: field.clone(),
                message: "expected a number".into(),
            })?),
            toml::Value::Boolean(_) => toml::Value::Boolean(raw.trim().parse().map_err(|_| ConfigError::Env {
                var: var.clone(),
                value: raw.clone(),
                field: field.clone(),
                message: "expected true or false".into(),
            })?),
            // A list of strings, comma-separated ("http://a:8420,http://b:8420").
            toml::Value::Array(_) => {
                toml::Value::Array(raw.split(',').map(str::trim).filter(|s| !s.is_empty()).map(|s| toml::Value::String(s.to_string())).collect())
            }
            _ => toml::Value::String(raw.clone()),
        };
        let parts: Vec<&str> = path.iter().map(String::as_str).collect();
        set_path(value, &parts, parsed);
    }
    Ok(())
}

fn collect_leaves(v: &toml::Value, prefix: &mut Vec<String>, out: &mut Vec<(Vec<String>, toml::Value)>) {
    match v {
        toml::Value::Table(t) if !matches!(prefix.last().map(String::as_str), Some("properties" | "secret_files")) => {
            for (k, child) in t {
                prefix.push(k.clone());
                collect_leaves(child, prefix, out);
                prefix.pop();
            }
        }
        toml::Value::Table(_) => {}
        // A list (of strings: cluster.peers) is set whole, comma-separated; a
        // list of tables (kms.routes) that way is refused when it is parsed.
        leaf => out.push((prefix.clone(), leaf.clone())),
    }
}

fn env_name(path: &[String]) -> String {
    format!("KEYWARDEN_{}", path.join("_").to_uppercase())
}

fn set_path(root: &mut toml::Value, path: &[&str], leaf: toml::Value) {
    let mut cur = root;
    for (i, part) in path.iter().enumerate() {
        let table = match cur {
            toml::Value::Table(t) => t,
            other => {
                *other = toml::Value::Table(Default::default());
                let toml::Value::Table(t) = other else { unreachable!() };
                t
            }
        };
        if i + 1 == path.len() {
            table.insert(part.to_string(), leaf);
            return;
        }
        cur = table.entry(part.to_string()).or_insert_with(|| toml::Value::Table(Default::default()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_peer_list_is_set_from_the_environment_comma_separated() {
        let vars = vec![("KEYWARDEN_CLUSTER_PEERS".to_string(), "http://a:8420, http://b:8420,".to_string())];
        let mut value = toml::Value::try_from(Config::default()).unwrap();
        let defaults = value.clone();
        apply_env(&mut value, &defaults, &vars).unwrap();
        let config: Config = value.try_into().unwrap();
        assert_eq!(config.cluster.peers, ["http://a:8420", "http://b:8420"]);
    }

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs.iter().map(|(a, b)| (a.to_string(), b.to_string())).collect()
    }

    #[test]
    fn the_page_cache_is_bounded_by_default_and_refused_outside_its_range() {
        assert_eq!(Config::load_with_env(None, &[]).unwrap().store.cache_capacity, 4 << 20);
        let set = |v: &str| Config::load_with_env(None, &env(&[("KEYWARDEN_STORE_CACHE_CAPACITY", v)]));
        assert_eq!(set("16777216").unwrap().store.cache_capacity, 16 << 20);
        for bad in ["0", "1048575", "68719476737"] {
            let err = set(bad).unwrap_err().to_string();
            assert!(err.contains("store.cache_capacity"), "{bad}: {err}");
        }
    }

    #[test]
    fn a_node_alone_assigns_itself_every_partition_unless_told_to_use_the_group() {
        let load = |vars: &[(&str, &str)]| Config::load_with_env(None, &env(vars)).unwrap();
        assert!(load(&[]).assigns_every_partition(), "the default for a node alone");
        assert!(!load(&[("KEYWARDEN_KAFKA_ASSIGNMENT", "group")]).assigns_every_partition());
        assert!(
            !load(&[("KEYWARDEN_CLUSTER_PEERS", "http://a:8420,http://b:8420")]).assigns_every_partition(),
            "several nodes share the partitions through the group"
        );
        let err = Config::load_with_env(None, &env(&[("KEYWARDEN_KAFKA_ASSIGNMENT", "manual")])).unwrap_err().to_string();
        assert!(err.contains("auto") && err.contains("group"), "{err}");
    }

    #[test]
    fn a_group_of_one_is_a_node_that_lists_at_most_one_peer() {
        let mut c = ClusterConfig::default();
        assert!(c.group_of_one());
        c.peers = vec!["http://a:8420".into()];
        assert!(c.group_of_one());
        c.peers.push("http://b:8420".into());
        assert!(!c.group_of_one(), "several nodes publish write-ahead");
    }

    #[test]
    fn defaults_are_valid_and_use_the_embedded_broker() {
        let c = Config::load_with_env(None, &[]).unwrap();
        assert!(c.embedded_broker());
        assert_eq!(c.api.listen, "127.0.0.1:8420");
        assert_eq!(c.policy.purge_after.0, Duration::from_secs(30 * 86400));
    }

    #[test]
    fn the_audit_secret_defaults_to_beside_the_store_never_in_it() {
        let dir = tempfile::tempdir().unwrap();
        let store = dir.path().join("data");
        let c = Config::load_with_env(None, &env(&[("KEYWARDEN_STORE_PATH", store.to_str().unwrap())])).unwrap();
        let secret = c.audit_secret_file();
        assert_eq!(secret.file_name().unwrap(), "data-audit.key");
        assert!(!secret.starts_with(std::fs::canonicalize(dir.path()).unwrap().join("data")), "{}", secret.display());
        // Also when the store's path ends in `..` or `.`.
        std::fs::create_dir_all(store.join("sub")).unwrap();
        let c = Config::load_with_env(None, &env(&[("KEYWARDEN_STORE_PATH", store.join("sub/..").to_str().unwrap())])).unwrap();
        assert_eq!(c.audit_secret_file().file_name().unwrap(), "data-audit.key");
        let c = Config::load_with_env(None, &env(&[("KEYWARDEN_AUDIT_SECRET_FILE", "/etc/keywarden/audit.key")])).unwrap();
        assert_eq!(c.audit_secret_file(), PathBuf::from("/etc/keywarden/audit.key"));
    }

    #[test]
    fn shipped_config_file_parses() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/keywarden.toml");
        Config::load_with_env(Some(&path), &[]).unwrap();
    }

    #[test]
    fn environment_overrides_every_section() {
        let c = Config::load_with_env(
            None,
            &env(&[
                ("KEYWARDEN_KAFKA_BROKERS", "127.0.0.1:9092"),
                ("KEYWARDEN_STORE_PATH", "/tmp/x"),
                ("KEYWARDEN_API_LISTEN", "127.0.0.1:9999"),
                ("KEYWARDEN_KMS_LOCAL_MASTER_KEY_FILE", "/tmp/m.key"),
                ("KEYWARDEN_POLICY_PURGE_AFTER", "2s"),
                ("KEYWARDEN_KAFKA_PARTITIONS", "6"),
                ("KEYWARDEN_KAFKA_PROPERTIES_SESSION_TIMEOUT_MS", "60000"),
            ]),
        )
        .unwrap();
        assert_eq!(c.kafka.brokers, "127.0.0.1:9092");
        assert_eq!(c.store.path, PathBuf::from("/tmp/x"));
        assert_eq!(c.api.listen, "127.0.0.1:9999");
        assert_eq!(c.kms.local.master_key_file, PathBuf::from("/tmp/m.key"));
        assert_eq!(c.policy.purge_after.0, Duration::from_secs(2));
        assert_eq!(c.kafka.partitions, 6);
        assert_eq!(c.kafka.properties["session.timeout.ms"], "60000");
    }

    #[test]
    fn invalid_values_name_the_field() {
        let err = Config::load_with_env(None, &env(&[("KEYWARDEN_API_LISTEN", "nowhere")])).unwrap_err();
        assert!(err.to_string().contains("api.listen"), "{err}");
        let err = Config::load_with_env(None, &env(&[("KEYWARDEN_KAFKA_PARTITIONS", "many")])).unwrap_err();
        assert!(err.to_string().contains("KEYWARDEN_KAFKA_PARTITIONS"), "{err}");
        let err = Config::load_with_env(None, &env(&[("KEYWARDEN_POLICY_PURGE_AFTER", "soon")])).unwrap_err();
        assert!(err.to_string().contains("purge_after"), "{err}");
    }

    #[test]
    fn static_member_id_is_stable_per_store_and_differs_between_stores() {
        let a = Config::load_with_env(None, &env(&[("KEYWARDEN_STORE_PATH", "/tmp/a")])).unwrap();
        let a2 = Config::load_with_env(None, &env(&[("KEYWARDEN_STORE_PATH", "/tmp/a")])).unwrap();
        let b = Config::load_with_env(None, &env(&[("KEYWARDEN_STORE_PATH", "/tmp/b")])).unwrap();
        assert_eq!(a.kafka.instance_id, a2.kafka.instance_id);
        assert_ne!(a.kafka.instance_id, b.kafka.instance_id);
        let err = Config::load_with_env(None, &env(&[("KEYWARDEN_KAFKA_DRAIN_TIMEOUT", "60s")])).unwrap_err();
        assert!(err.to_string().contains("kafka.drain_timeout"), "{err}");
    }

    #[test]
    fn kafka_secrets_come_from_files_never_inline() {
        let err = Config::load_with_env(None, &env(&[("KEYWARDEN_KAFKA_PROPERTIES_SASL_PASSWORD", "hunter2")])).unwrap_err();
        assert!(err.to_string().contains("kafka.secret_files"), "{err}");
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("pw"), "s3cret\n").unwrap();
        let p = dir.path().join("k.toml");
        std::fs::write(&p, format!("[kafka.secret_files]\n\"sasl.password\" = \"{}\"\n", dir.path().join("pw").display())).unwrap();
        let c = Config::load_with_env(Some(&p), &[]).unwrap();
        assert_eq!(c.kafka.read_secrets().unwrap(), vec![("sasl.password".to_string(), "s3cret".to_string())]);
    }

    #[test]
    fn traces_are_off_by_default_and_turned_on_by_the_environment() {
        let c = Config::load_with_env(None, &[]).unwrap();
        assert!(c.telemetry.otlp_endpoint.is_empty());
        let c =
            Config::load_with_env(None, &env(&[("KEYWARDEN_TELEMETRY_OTLP_ENDPOINT", "http://127.0.0.1:4318"), ("KEYWARDEN_TELEMETRY_SAMPLE_RATIO", "0.25")]))
                .unwrap();
        assert_eq!(c.telemetry.otlp_endpoint, "http://127.0.0.1:4318");
        assert_eq!(c.telemetry.sample_ratio, 0.25);
        let err = Config::load_with_env(None, &env(&[("KEYWARDEN_TELEMETRY_OTLP_ENDPOINT", "127.0.0.1:4318")])).unwrap_err();
        assert!(err.to_string().contains("telemetry.otlp_endpoint"), "{err}");
        let err = Config::load_with_env(None, &env(&[("KEYWARDEN_TELEMETRY_SAMPLE_RATIO", "2")])).unwrap_err();
        assert!(err.to_string().contains("telemetry.sample_ratio"), "{err}");
    }

    #[test]
    fn max_clock_skew_is_five_minutes_and_bounded() {
        let c = Config::load_with_env(None, &[]).unwrap();
        assert_eq!(c.signatures.max_clock_skew.0, Duration::from_secs(300));
        let c = Config::load_with_env(None, &env(&[("KEYWARDEN_SIGNATURES_MAX_CLOCK_SKEW", "24h")])).unwrap();
        assert_eq!(c.signatures.max_clock_skew.0, Duration::from_secs(24 * 3600));
        for out_of_bounds in ["500ms", "25h"] {
            let err = Config::load_with_env(None, &env(&[("KEYWARDEN_SIGNATURES_MAX_CLOCK_SKEW", out_of_bounds)])).unwrap_err();
            assert!(err.to_string().contains("signatures.max_clock_skew"), "{err}");
        }
    }

    #[test]
    fn hint_topics_are_off_by_default_and_only_the_events_topic() {
        assert!(Config::load_with_env(None, &[]).unwrap().signatures.hint_topics.is_empty());
        let c = Config::load_with_env(None, &env(&[("KEYWARDEN_SIGNATURES_HINT_TOPICS", "key-lifecycle")])).unwrap();
        assert_eq!(c.signatures.hint_topics, ["key-lifecycle"]);
        let err = Config::load_with_env(None, &env(&[("KEYWARDEN_SIGNATURES_HINT_TOPICS", "other-topic")])).unwrap_err().to_string();
        assert!(err.contains("signatures.hint_topics") && err.contains("key-lifecycle"), "{err}");
    }

    #[test]
    fn a_plaintext_api_off_loopback_refuses_to_start_unless_allowed() {
        for listen in ["0.0.0.0:8420", "10.1.2.3:8420", "[::]:8420", "[2001:db8::1]:8420"] {
            let err = Config::load_with_env(None, &env(&[("KEYWARDEN_API_LISTEN", listen)])).unwrap_err().to_string();
            assert!(err.contains("api.listen") && err.contains(listen), "{err}");
            assert!(err.contains("enable api.tls") && err.contains("api.allow_plaintext = true"), "{err}");
            let allowed = Config::load_with_env(None, &env(&[("KEYWARDEN_API_LISTEN", listen), ("KEYWARDEN_API_ALLOW_PLAINTEXT", "true")])).unwrap();
            assert!(allowed.api.allow_plaintext);
            // With TLS the address may be any (validate does not read the files).
            Config::load_with_env(
                None,
                &env(&[("KEYWARDEN_API_LISTEN", listen), ("KEYWARDEN_API_TLS_CERT_FILE", "/etc/k/cert.pem"), ("KEYWARDEN_API_TLS_KEY_FILE", "/etc/k/key.pem")]),
            )
            .unwrap();
        }
        for listen in ["127.0.0.1:8420", "127.9.9.9:1", "[::1]:8420", "[::ffff:127.0.0.1]:8420"] {
            let c = Config::load_with_env(None, &env(&[("KEYWARDEN_API_LISTEN", listen)])).unwrap();
            assert!(!c.api.allow_plaintext, "off by default");
        }
    }

    #[test]
    fn the_vault_kv_listener_is_off_by_default_and_checked_like_the_api() {
        let c = Config::load_with_env(None, &[]).unwrap();
        assert!(!c.data_plane.vault_kv_enabled(), "off by default");
        let on = Config::load_with_env(None, &env(&[("KEYWARDEN_DATA_PLANE_VAULT_KV_LISTEN", "127.0.0.1:8200")])).unwrap();
        assert_eq!(on.data_plane.vault_kv_listen, "127.0.0.1:8200");
        let refused = |vars: &[(&str, &str)]| Config::load_with_env(None, &env(vars)).unwrap_err().to_string();
        let err = refused(&[("KEYWARDEN_DATA_PLANE_VAULT_KV_LISTEN", "0.0.0.0:8200")]);
        assert!(err.contains("data_plane.vault_kv_listen") && err.contains("data_plane.allow_plaintext = true"), "{err}");
        Config::load_with_env(None, &env(&[("KEYWARDEN_DATA_PLANE_VAULT_KV_LISTEN", "0.0.0.0:8200"), ("KEYWARDEN_DATA_PLANE_ALLOW_PLAINTEXT", "true")]))
            .unwrap();
        Config::load_with_env(
            None,
            &env(&[
                ("KEYWARDEN_DATA_PLANE_VAULT_KV_LISTEN", "0.0.0.0:8200"),
                ("KEYWARDEN_DATA_PLANE_TLS_CERT_FILE", "/etc/k/cert.pem"),
                ("KEYWARDEN_DATA_PLANE_TLS_KEY_FILE", "/etc/k/key.pem"),
            ]),
        )
        .unwrap();
        let err = refused(&[("KEYWARDEN_DATA_PLANE_VAULT_KV_LISTEN", "127.0.0.1:8420")]);
        assert!(err.contains("other than api.listen"), "{err}");
        let err = refused(&[("KEYWARDEN_DATA_PLANE_VAULT_KV_LISTEN", "vault")]);
        assert!(err.contains("data_plane.vault_kv_listen"), "{err}");
        let err = refused(&[("KEYWARDEN_DATA_PLANE_VAULT_KV_LISTEN", "127.0.0.1:8200"), ("KEYWARDEN_DATA_PLANE_TLS_CERT_FILE", "/etc/k/cert.pem")]);
        assert!(err.contains("data_plane.tls.key_file"), "{err}");
        let err = refused(&[("KEYWARDEN_DATA_PLANE_TLS_CERT_FILE", "/etc/k/cert.pem")]);
        assert!(err.contains("only with data_plane.vault_kv_listen"), "{err}");
    }

    #[test]
    fn the_shared_dek_token_is_off_unless_asked_for() {
        let c = Config::load_with_env(None, &[]).unwrap();
        assert!(!c.api.shared_dek_token && c.api.client_identity.is_empty());
        let c = Config::load_with_env(None, &env(&[("KEYWARDEN_API_SHARED_DEK_TOKEN", "true")])).unwrap();
        assert!(c.api.shared_dek_token);
        let err = Config::load_with_env(None, &env(&[("KEYWARDEN_API_SHARED_DEK_TOKEN", "yes")])).unwrap_err();
        assert!(err.to_string().contains("KEYWARDEN_API_SHARED_DEK_TOKEN"), "{err}");
    }

    #[test]
    fn a_client_identity_needs_a_client_ca_and_one_instance_placeholder() {
        let tls = [
            ("KEYWARDEN_API_TLS_CERT_FILE", "/etc/k/cert.pem"),
            ("KEYWARDEN_API_TLS_KEY_FILE", "/etc/k/key.pem"),
            ("KEYWARDEN_API_TLS_CLIENT_CA_FILE", "/etc/k/ca.pem"),
        ];
        let with = |pattern: &str, vars: &[(&str, &str)]| {
            let mut all = vars.to_vec();
            all.push(("KEYWARDEN_API_CLIENT_IDENTITY", pattern));
            Config::load_with_env(None, &env(&all))
        };
        let ok = with("spiffe://keywarden/instance/{instance}", &tls).unwrap();
        assert_eq!(ok.api.client_identity, "spiffe://keywarden/instance/{instance}");
        let err = with("spiffe://keywarden/instance/{instance}", &[]).unwrap_err().to_string();
        assert!(err.contains("api.client_identity") && err.contains("api.tls.client_ca_file"), "{err}");
        for bad in ["spiffe://keywarden/instance", "spiffe://{instance}/{instance}"] {
            let err = with(bad, &tls).unwrap_err().to_string();
            assert!(err.contains("api.client_identity") && err.contains("exactly once"), "{err}");
        }
    }

    #[test]
    fn localhost_counts_as_loopback_and_every_interface_does_not() {
        assert!(is_loopback("localhost:8420") && is_loopback("LOCALHOST:1"));
        assert!(!is_loopback("localhost") && !is_loopback("localhost:port") && !is_loopback("localhost.example.com:8420"));
        assert!(!is_loopback("0.0.0.0:8420") && !is_loopback("[::]:8420") && !is_loopback("[::ffff:10.0.0.1]:8420"));
    }

    #[test]
    fn unknown_fields_are_rejected() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("k.toml");
        std::fs::write(&p, "[kafka]\nbrokerz = \"x\"\n").unwrap();
        let err = Config::load_with_env(Some(&p), &[]).unwrap_err();
        assert!(err.to_string().contains("brokerz"), "{err}");
    }
}
