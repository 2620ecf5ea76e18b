//! Reading the commands topic: each message is judged (hosted here? signed
//! by keywarden? seen before?), a new command is made durable in the journal
//! and queued for its instance, and only then is the message's offset stored
//! for the next commit. Offsets are committed by librdkafka's auto-commit,
//! but only those stored here: a crash before the journal's fsync re-delivers
//! the message, one after it finds the command in the journal.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::message::{Headers, Message};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::alert::Alerter;
use super::config::AgentConfig;
use super::journal::{Entry, Journal};
use super::worker::Queued;
use super::AgentError;
use crate::intake::signature::{Verifier, HEADER};
use crate::tell::Command;

/// What to do with one message.
#[derive(Debug, PartialEq)]
pub enum Verdict {
    /// For an instance this host does not run: skipped.
    NotHosted(String),
    /// Not a command keywarden signed: never run; a security event.
    Refused(String),
    /// A command already in the journal (keywarden re-sent it, or the offset
    /// was not committed before a restart): not run again.
    Duplicate(Command),
    New(Command),
}

pub struct Judge {
    pub verifier: Verifier,
    pub key_id: String,
    pub topic: String,
    pub hosted: HashSet<String>,
    /// Every command id in the journal.
    pub known: HashSet<String>,
}

impl Judge {
    /// `key` is the message's key (keywarden keys commands by instance id):
    /// a message for an instance not hosted here is skipped without checking
    /// its signature, which is for the hosts that run it.
    pub fn judge(&self, key: Option<&[u8]>, payload: &[u8], signature: Option<&[u8]>) -> Verdict {
        if let Some(instance) = key.and_then(|k| std::str::from_utf8(k).ok()) {
            if !self.hosted.contains(instance) {
                return Verdict::NotHosted(instance.to_string());
            }
        }
        let Some(header) = signature.and_then(|s| std::str::from_utf8(s).ok()) else {
            return Verdict::Refused(format!("the message has no {HEADER} header"));
        };
        let command = match crate::cli::check_command(&self.verifier, &self.key_id, &self.topic, payload, header) {
            Ok(c) => c,
            Err(reason) => return Verdict::Refused(reason),
        };
        if !self.hosted.contains(&command.instance_id) {
            return Verdict::NotHosted(command.instance_id);
        }
        if self.known.contains(&command.command_id) {
            return Verdict::Duplicate(command);
        }
        Verdict::New(command)
    }
}

pub struct Consume {
    pub judge: Judge,
    pub journal: Journal,
    pub queues: HashMap<String, mpsc::Sender<Queued>>,
    pub alerter: Alerter,
}

impl Consume {
    pub async fn run(mut self, config: &AgentConfig, shutdown: CancellationToken) -> Result<(), AgentError> {
        let mut client = ClientConfig::new();
        client
            .set("bootstrap.servers", &config.kafka.brokers)
            .set("group.id", &config.kafka.group_id)
            .set("enable.auto.commit", "true")
            .set("auto.commit.interval.ms", "1000")
            // Only offsets stored after the journal's fsync are committed.
            .set("enable.auto.offset.store", "false")
            .set("auto.offset.reset", &config.kafka.start_from);
        for (k, v) in &config.kafka.properties {
            client.set(k, v);
        }
        let consumer: Arc<StreamConsumer> = Arc::new(client.create().map_err(AgentError::Kafka)?);
        consumer.subscribe(&[&config.kafka.commands_topic]).map_err(AgentError::Kafka)?;
        tracing::info!(topic = %config.kafka.commands_topic, group = %config.kafka.group_id, instances = self.queues.len(), "agent consuming commands");
        loop {
            let received = tokio::select! {
                _ = shutdown.cancelled() => break,
                m = consumer.recv() => m,
            };
            let msg = match received {
                Ok(m) => m,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot read the commands topic; retrying");
                    if !crate::tell::pause(&shutdown, tokio::time::sleep(Duration::from_secs(1))).await {
                        break;
                    }
                    continue;
                }
            };
            let signature = msg.headers().and_then(|h| h.iter().find(|h| h.key == HEADER).and_then(|h| h.value));
            let verdict = self.judge.judge(msg.key(), msg.payload().unwrap_or_default(), signature);
            let (partition, offset) = (msg.partition(), msg.offset());
            match verdict {
                Verdict::NotHosted(instance) => tracing::debug!(%instance, partition, offset, "command for an instance not hosted here; skipped"),
                Verdict::Refused(reason) => {
                    tracing::warn!(security_event = true, partition, offset, %reason, "refused a data-plane command: not signed by keywarden's key; it is not run");
                    self.alerter.forged(&format!("partition {partition} offset {offset}: {reason}"));
                }
                Verdict::Duplicate(c) => {
                    tracing::info!(instance_id = %c.instance_id, command_id = %c.command_id, "command already journaled (re-sent); not run again")
                }
                Verdict::New(c) => {
                    self.journal.append(Entry::Accepted { command: c.clone() }).await?;
                    self.judge.known.insert(c.command_id.clone());
                    tracing::info!(instance_id = %c.instance_id, command_id = %c.command_id, action = %super::hooks::action_name(&c), "command accepted");
                    if let Some(queue) = self.queues.get(&c.instance_id) {
                        // Waits while the instance's queue is full: its
                        // commands are journaled, and back-pressure here only
                        // slows reading.
                        if queue.send(Queued { command: c, interrupted: false }).await.is_err() {
                            break;
                        }
                    }
                }
            }
            consumer.store_offset_from_message(&msg).map_err(AgentError::Kafka)?;
        }
        // What was stored is committed on the way out, off the runtime.
        let c = consumer.clone();
        match tokio::task::spawn_blocking(move || c.commit_consumer_state(CommitMode::Sync)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "cannot commit the last offsets; their commands are known to the journal and not run again"),
            Err(e) => tracing::warn!(error = %e, "cannot commit the last offsets"),
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::SignatureAlgorithm;
    use crate::engine::CommandAction;
    use crate::intake::signature::Signer;

    const SECRET: &str = "an-agent-test-command-signing-secret-0123456789";

    fn judge(dir: &std::path::Path) -> Judge {
        std::fs::write(dir.join("k"), SECRET).unwrap();
        Judge {
            verifier: Verifier::single("local", SignatureAlgorithm::HmacSha256, &dir.join("k")).unwrap(),
            key_id: "local".into(),
            topic: "instance-commands".into(),
            hosted: ["db-1".to_string()].into(),
            known: HashSet::new(),
        }
    }

    #[test]
    fn only_a_new_signed_command_for_a_hosted_instance_is_run() {
        let dir = tempfile::tempdir().unwrap();
        let mut j = judge(dir.path());
        let c = Command::new("db-1", "k", CommandAction::Revoke, None, "e1", chrono::Utc::now(), None);
        let payload = serde_json::to_vec(&c).unwrap();
        let sig = Signer::hmac("local", SECRET.as_bytes()).sign(&payload);
        assert_eq!(j.judge(Some(b"db-1"), &payload, Some(sig.as_bytes())), Verdict::New(c.clone()));
        j.known.insert(c.command_id.clone());
        assert_eq!(j.judge(Some(b"db-1"), &payload, Some(sig.as_bytes())), Verdict::Duplicate(c.clone()));
        assert!(matches!(j.judge(Some(b"db-1"), &payload, None), Verdict::Refused(r) if r.contains("no keywarden-signature")));
        let forged = Signer::hmac("local", b"someone-else-s-secret-of-enough-length-000").sign(&payload);
        assert!(matches!(j.judge(Some(b"db-1"), &payload, Some(forged.as_bytes())), Verdict::Refused(r) if r.contains("forged")));
        assert_eq!(j.judge(Some(b"db-2"), &payload, None), Verdict::NotHosted("db-2".into()));
        // Keyed as a hosted instance, signed, but for another one.
        let other = Command::new("db-9", "k", CommandAction::Erase, None, "e1", chrono::Utc::now(), None);
        let p = serde_json::to_vec(&other).unwrap();
        let s = Signer::hmac("local", SECRET.as_bytes()).sign(&p);
        assert_eq!(j.judge(Some(b"db-1"), &p, Some(s.as_bytes())), Verdict::NotHosted("db-9".into()));
    }
}
