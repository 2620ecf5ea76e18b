//! Where the Kafka clients connect: a real cluster, or librdkafka's in-process mock
//! cluster for trying keywarden out. Also creates keywarden's topics at start-up,
//! since brokers such as tansu do not auto-create them.

use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::error::KafkaError;
use rdkafka::types::RDKafkaErrorCode;

use crate::config::KafkaConfig;

#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    #[error("cannot start the embedded mock broker: {0}")]
    Embedded(String),
    #[error("cannot create topic {topic}: {source}; create it by hand or check that the brokers in kafka.brokers are reachable")]
    CreateTopic { topic: String, source: KafkaError },
    #[error("kafka client setup failed: {0}; check kafka.properties")]
    Client(#[from] KafkaError),
}

impl BrokerError {
    /// A broker that is still starting answers later; setup errors do not heal.
    pub fn retryable(&self) -> bool {
        matches!(self, BrokerError::CreateTopic { .. })
    }
}

/// Keeps the embedded mock cluster alive. The cluster handle is not `Send`, so it
/// lives on a thread of its own until this guard is dropped.
pub struct EmbeddedBroker {
    pub bootstrap: String,
    stop: Option<std::sync::mpsc::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl EmbeddedBroker {
    /// Starts a one-broker mock cluster with the given topics (name, partitions):
    /// the mock does not serve the CreateTopics admin call.
    pub fn start(topics: Vec<(String, i32)>) -> Result<EmbeddedBroker, BrokerError> {
        let (addr_tx, addr_rx) = std::sync::mpsc::channel();
        let (stop_tx, stop_rx) = std::sync::mpsc::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("keywarden-embedded-broker".into())
            .spawn(move || match rdkafka::mocking::MockCluster::new(1) {
                Ok(cluster) => {
                    for (topic, partitions) in &topics {
                        if let Err(e) = cluster.create_topic(topic, *partitions, 1) {
                            let _ = addr_tx.send(Err(format!("cannot create topic {topic}: {e}")));
                            return;
                        }
                    }
                    let _ = addr_tx.send(Ok(cluster.bootstrap_servers()));
                    let _ = stop_rx.recv();
                    drop(cluster);
                }
                Err(e) => {
                    let _ = addr_tx.send(Err(e.to_string()));
                }
            })
            .map_err(|e| BrokerError::Embedded(e.to_string()))?;
        let bootstrap = addr_rx.recv().map_err(|e| BrokerError::Embedded(e.to_string()))?.map_err(BrokerError::Embedded)?;
        Ok(EmbeddedBroker { bootstrap, stop: Some(stop_tx), thread: Some(thread) })
    }
}

impl Drop for EmbeddedBroker {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The client configuration every keywarden client shares.
pub fn client_config(kafka: &KafkaConfig, bootstrap: &str) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", bootstrap);
    for (k, v) in &kafka.properties {
        c.set(k, v);
    }
    c
}

/// Creates the topics that do not exist yet; existing ones are left as they are.
/// `changelog`, when given, is created compacted: it holds each record's newest value.
pub async fn ensure_topics(kafka: &KafkaConfig, bootstrap: &str, changelog: Option<&str>) -> Result<(), BrokerError> {
    let admin: AdminClient<DefaultClientContext> = client_config(kafka, bootstrap).create()?;
    let mut topics = vec![&kafka.events_topic, &kafka.commands_topic, &kafka.dlq_topic];
    let changelog = changelog.map(str::to_string);
    topics.extend(changelog.as_ref());
    let new: Vec<NewTopic> = topics
        .iter()
        .map(|t| {
            let topic = NewTopic::new(t, kafka.partitions, TopicReplication::Fixed(kafka.replication));
            if Some(*t) == changelog.as_ref() {
                topic.set("cleanup.policy", "compact")
            } else {
                topic
            }
        })
        .collect();
    let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10))).request_timeout(Some(Duration::from_secs(15)));
    let results = admin
        .create_topics(&new, &opts)
        .await
        .map_err(|source| BrokerError::CreateTopic { topic: topics.iter().map(|t| t.as_str()).collect::<Vec<_>>().join(","), source })?;
    for r in results {
        match r {
            Ok(topic) => tracing::info!(%topic, partitions = kafka.partitions, "created topic"),
            Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((topic, code)) => {
                return Err(BrokerError::CreateTopic { topic, source: KafkaError::AdminOp(code) });
            }
        }
    }
    Ok(())
}
