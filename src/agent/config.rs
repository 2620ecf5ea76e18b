//! The agent's own config (`keywarden agent --config FILE`): TOML with
//! `deny_unknown_fields`, documented defaults and a `validate()` that names
//! the field. It shares nothing with the daemon's config but the shapes it
//! reuses (log, alert sinks, signature algorithm), so that a database host
//! never needs the daemon's secrets.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::config::{AlertSink, ConfigError, HumanDuration, LogConfig, SignatureAlgorithm};
use crate::engine::CommandAction;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AgentConfig {
    pub kafka: AgentKafka,
    pub signature: CommandSignature,
    pub keywarden: KeywardenApi,
    /// The instances whose databases run on this host. Commands for any other
    /// instance are skipped (and their offsets committed past).
    #[serde(rename = "instances")]
    pub instances: Vec<HostedInstance>,
    pub hooks: Hooks,
    /// Where the journal of commands lives (`journal.log`): it must survive
    /// reboots, and be on a file system where fsync means durable. Losing it
    /// makes the agent run the hooks of commands it receives again.
    pub journal_dir: PathBuf,
    /// How long a finished and reported command stays in the journal (by
    /// when keywarden issued it); older ones are dropped at start. Their ids
    /// are then no longer recognised, so this must be longer than the
    /// commands topic keeps messages (its `retention.ms`; Kafka's default is
    /// 7 days): a command still in the topic could otherwise be read again
    /// (after its group's offsets expired) and run again.
    pub journal_keep: HumanDuration,
    pub retry: Retry,
    /// Where the agent's alerts go (a failing hook, a forged command): the
    /// daemon's sink shapes (`kind = "alertmanager"` or `"webhook"`). Empty:
    /// only logged. They are not kept across a restart: keywarden's own
    /// KeywardenRevocationUnconfirmed alert is the durable one.
    pub alerts: Vec<AlertSink>,
    pub log: LogConfig,
    /// The file this was read from.
    #[serde(skip)]
    pub source: Option<PathBuf>,
}

impl Default for AgentConfig {
    fn default() -> Self {
        AgentConfig {
            kafka: AgentKafka::default(),
            signature: CommandSignature::default(),
            keywarden: KeywardenApi::default(),
            instances: Vec::new(),
            hooks: Hooks::default(),
            journal_dir: PathBuf::new(),
            journal_keep: HumanDuration(Duration::from_secs(30 * 24 * 3600)),
            retry: Retry::default(),
            alerts: Vec::new(),
            log: LogConfig::default(),
            source: None,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AgentKafka {
    /// Bootstrap servers of the cluster keywarden publishes commands to.
    pub brokers: String,
    /// The topic keywarden's `kafka.commands_topic` names.
    pub commands_topic: String,
    /// This host's consumer group. Each host needs its own (the default is
    /// derived from the host name): hosts sharing a group split the topic's
    /// partitions and each would miss the commands of the others' share.
    pub group_id: String,
    /// Where a group with no committed offset starts: "latest" (commands
    /// issued from now on; the default, so that a new host does not replay
    /// the topic's history) or "earliest".
    pub start_from: String,
    /// Extra librdkafka properties (TLS, SASL), passed through verbatim.
    pub properties: BTreeMap<String, String>,
}

impl Default for AgentKafka {
    fn default() -> Self {
        AgentKafka {
            brokers: "localhost:9092".into(),
            commands_topic: "instance-commands".into(),
            group_id: String::new(),
            start_from: "latest".into(),
            properties: BTreeMap::new(),
        }
    }
}

/// The key keywarden signs commands with (its `signatures.hmac_key_id` and
/// `signatures.hmac_key_file`); a command not signed by it is never run.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CommandSignature {
    /// The key id the signature header must name.
    pub key_id: String,
    pub algorithm: SignatureAlgorithm,
    /// HMAC: the shared secret (a systemd credential of the same file name
    /// wins); Ed25519: the public key. Read, never created.
    pub key_file: PathBuf,
}

impl Default for CommandSignature {
    fn default() -> Self {
        CommandSignature { key_id: "local".into(), algorithm: SignatureAlgorithm::HmacSha256, key_file: PathBuf::new() }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct KeywardenApi {
    /// Base URL of keywarden's API, where outcomes are reported
    /// (`POST /v1/instances/{id}/data-plane`).
    pub url: String,
    /// PEM CA to trust for an https URL with a private CA. Empty: the system roots.
    pub ca_file: PathBuf,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HostedInstance {
    pub id: String,
    /// The instance's own DEK credential (`dek_token`, as `instance create`
    /// printed it): it authenticates this instance's reports, and no other's.
    /// Read at each report, so that a rotated credential is picked up.
    pub credential_file: PathBuf,
    /// Extra environment for this instance's hooks (the database's socket,
    /// data directory, unit name...).
    #[serde(default)]
    pub env: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct Hooks {
    pub revoke: Option<Hook>,
    pub restore: Option<Hook>,
    pub erase: Option<Hook>,
    pub rewrapped: Option<Hook>,
}

impl Hooks {
    pub fn get(&self, action: CommandAction) -> Option<&Hook> {
        match action {
            CommandAction::Revoke => self.revoke.as_ref(),
            CommandAction::Restore => self.restore.as_ref(),
            CommandAction::Erase => self.erase.as_ref(),
            CommandAction::Rewrapped => self.rewrapped.as_ref(),
        }
    }
}

/// A command line run without a shell: nothing of a command reaches it but
/// through KEYWARDEN_* environment variables.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Hook {
    /// The program (an absolute path) and its arguments.
    pub argv: Vec<String>,
    /// A run still going after this long is killed (with its process group)
    /// and counts as failed; it is retried.
    #[serde(default = "default_hook_timeout")]
    pub timeout: HumanDuration,
}

fn default_hook_timeout() -> HumanDuration {
    HumanDuration(Duration::from_secs(120))
}

/// How a failing hook, or a report keywarden cannot take, is retried.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Retry {
    /// The first wait after a failure; each next one doubles.
    pub first: HumanDuration,
    /// The longest wait between two tries.
    pub max: HumanDuration,
}

impl Default for Retry {
    fn default() -> Self {
        Retry { first: HumanDuration(Duration::from_secs(1)), max: HumanDuration(Duration::from_secs(300)) }
    }
}

impl AgentConfig {
    pub fn load(path: &Path) -> Result<AgentConfig, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.to_path_buf(), source })?;
        let mut config: AgentConfig = toml::from_str(&text).map_err(|e| ConfigError::Parse { path: path.to_path_buf(), message: e.to_string() })?;
        config.source = Some(path.to_path_buf());
        if config.kafka.group_id.is_empty() {
            config.kafka.group_id = format!("keywarden-agent-{}", host_name());
        }
        config.validate()?;
        Ok(config)
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |field: &'static str, value: &dyn std::fmt::Display, expected: &str| ConfigError::invalid(field, value, expected);
        if self.kafka.brokers.trim().is_empty() {
            return Err(invalid("kafka.brokers", &self.kafka.brokers, "a list like \"host1:9092,host2:9092\""));
        }
        if self.kafka.commands_topic.trim().is_empty() {
            return Err(invalid("kafka.commands_topic", &self.kafka.commands_topic, "keywarden's kafka.commands_topic"));
        }
        if !matches!(self.kafka.start_from.as_str(), "latest" | "earliest") {
            return Err(invalid("kafka.start_from", &self.kafka.start_from, "\"latest\" or \"earliest\""));
        }
        if self.signature.key_file.as_os_str().is_empty() {
            return Err(invalid("signature.key_file", &"", "the file of the key keywarden signs commands with (signatures.hmac_key_file)"));
        }
        if !(self.keywarden.url.starts_with("http://") || self.keywarden.url.starts_with("https://")) {
            return Err(invalid("keywarden.url", &self.keywarden.url, "keywarden's API base URL, http(s)://host:port"));
        }
        if self.instances.is_empty() {
            return Err(invalid("instances", &"[]", "at least one [[instances]] entry: the instances hosted here"));
        }
        let mut seen = std::collections::HashSet::new();
        for inst in &self.instances {
            if crate::intake::format::valid_id("instances.id", &inst.id, 256).is_err() || !seen.insert(&inst.id) {
                return Err(invalid("instances.id", &inst.id, "a distinct instance id, as keywarden knows it"));
            }
            if inst.credential_file.as_os_str().is_empty() {
                return Err(invalid("instances.credential_file", &inst.id, "the file holding this instance's dek_token"));
            }
        }
        for (name, hook) in [
            ("hooks.revoke", &self.hooks.revoke),
            ("hooks.restore", &self.hooks.restore),
            ("hooks.erase", &self.hooks.erase),
            ("hooks.rewrapped", &self.hooks.rewrapped),
        ] {
            let Some(hook) = hook else { continue };
            match hook.argv.first() {
                Some(program) if Path::new(program).is_absolute() => {}
                _ => {
                    return Err(invalid(name, &format!("{:?}", hook.argv), "argv = [\"/absolute/program\", \"args\"...]: run without a shell or a PATH search"))
                }
            }
            if hook.timeout.0 < Duration::from_millis(100) {
                return Err(invalid(name, &format!("{:?}", hook.timeout), "a timeout of at least 100ms"));
            }
        }
        if self.journal_dir.as_os_str().is_empty() {
            return Err(invalid("journal_dir", &"", "a directory that survives reboots, such as /var/lib/keywarden-agent"));
        }
        if self.journal_keep.0 < Duration::from_secs(3600) {
            return Err(invalid("journal_keep", &format!("{:?}", self.journal_keep), "at least 1h, and longer than the commands topic's retention"));
        }
        if self.retry.first.0 < Duration::from_millis(10) || self.retry.max.0 < self.retry.first.0 {
            return Err(invalid("retry", &format!("first = {:?}, max = {:?}", self.retry.first, self.retry.max), "first at least 10ms and max at least first"));
        }
        for sink in &self.alerts {
            if !matches!(sink.kind.as_str(), "alertmanager" | "webhook") || sink.url.is_empty() {
                return Err(invalid("alerts.kind", &sink.kind, "\"alertmanager\" or \"webhook\", with a url"));
            }
        }
        Ok(())
    }

    pub fn hosted(&self, instance_id: &str) -> Option<&HostedInstance> {
        self.instances.iter().find(|i| i.id == instance_id)
    }
}

fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname").map(|h| h.trim().to_string()).ok().filter(|h| !h.is_empty()).unwrap_or_else(|| "host".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shipped_agent_config_parses_and_validates() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/agent.toml");
        let config = AgentConfig::load(&path).unwrap();
        assert!(config.hooks.revoke.is_some() && config.hooks.erase.is_some() && config.hooks.restore.is_some());
        assert!(config.kafka.group_id.starts_with("keywarden-agent-"));
    }

    #[test]
    fn a_hook_run_through_a_path_search_or_an_unknown_field_is_refused() {
        let base = "journal_dir = \"/tmp/j\"\n[signature]\nkey_file = \"/k\"\n[keywarden]\nurl = \"http://127.0.0.1:1\"\n[[instances]]\nid = \"db-1\"\ncredential_file = \"/c\"\n";
        let ok: AgentConfig = toml::from_str(base).unwrap();
        ok.validate().unwrap();
        let relative: AgentConfig = toml::from_str(&format!("{base}[hooks.revoke]\nargv = [\"sh\", \"-c\", \"x\"]\n")).unwrap();
        assert!(relative.validate().unwrap_err().to_string().contains("hooks.revoke"));
        assert!(toml::from_str::<AgentConfig>(&format!("{base}shell = true\n")).is_err());
        let twice: AgentConfig = toml::from_str(&format!("{base}[[instances]]\nid = \"db-1\"\ncredential_file = \"/d\"\n")).unwrap();
        assert!(twice.validate().unwrap_err().to_string().contains("instances.id"));
    }
}
