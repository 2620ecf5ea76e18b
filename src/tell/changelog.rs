//! The changelog relay: publishes the state changes each commit queued to the
//! compacted changelog topic, in commit order, keyed by the store key so that
//! compaction keeps each record's newest value. A change goes to its key's
//! partition (the events topic's partitioner), so the changelog partition and
//! the events partition of a key are the same.
//!
//! Changes are published after commit (at least once, idempotent producer), not
//! in a Kafka transaction with the consumed offsets: the broker this project
//! runs on does not offer transactions to us, and the store, not Kafka, is the
//! truth; a crash between commit and publish only delays the change.

use std::time::Duration;

use rdkafka::producer::{FutureProducer, FutureRecord};
use tokio_util::sync::CancellationToken;

use crate::cluster::partition_of;
use crate::config::KafkaConfig;
use crate::store::{Route, Store};

pub struct ChangelogRelay {
    pub store: Store,
    /// Woken by each commit.
    pub notify: std::sync::Arc<tokio::sync::Notify>,
    pub producer: FutureProducer,
    pub topic: String,
    pub partitions: i32,
}

impl ChangelogRelay {
    pub fn new(
        store: Store,
        notify: std::sync::Arc<tokio::sync::Notify>,
        kafka: &KafkaConfig,
        bootstrap: &str,
        topic: &str,
        partitions: i32,
    ) -> Result<ChangelogRelay, rdkafka::error::KafkaError> {
        let producer: FutureProducer = crate::broker::client_config(kafka, bootstrap)
            .set("enable.idempotence", "true")
            .set("linger.ms", "2")
            .set("message.timeout.ms", "30000")
            .create()?;
        Ok(ChangelogRelay { store, notify, producer, topic: topic.to_string(), partitions })
    }

    pub async fn run(self, shutdown: CancellationToken) {
        let mut backoff = Duration::from_millis(100);
        loop {
            let notified = self.notify.notified();
            let batch = self.store.change_queue(64);
            if batch.is_empty() {
                let wake = async {
                    tokio::select! {
                        _ = notified => {}
                        _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                    }
                };
                if !super::pause(&shutdown, wake).await {
                    return;
                }
                continue;
            }
            let mut done = Vec::new();
            let mut failed = None;
            'batches: for (id, changes) in batch {
                let sends: Vec<_> = changes
                    .iter()
                    .map(|c| {
                        let partition = match &c.route {
                            Route::Key(k) => partition_of(k, self.partitions),
                            Route::Partition(p) => *p,
                        };
                        self.producer.send(FutureRecord::to(&self.topic).partition(partition).key(&c.key).payload(&c.value), Duration::from_secs(10))
                    })
                    .collect();
                for result in futures::future::join_all(sends).await {
                    if let Err((e, _)) = result {
                        failed = Some(e);
                        break 'batches;
                    }
                }
                done.push(id);
            }
            if let Err(e) = self.store.change_queue_remove(&done) {
                tracing::error!(error = %e, "cannot remove published changes; they will be published again");
            }
            if let Some(e) = failed {
                tracing::warn!(error = %e, topic = %self.topic, "publishing to the changelog failed; retrying");
                if !super::pause(&shutdown, tokio::time::sleep(backoff)).await {
                    return;
                }
                backoff = (backoff * 2).min(Duration::from_secs(10));
            } else {
                backoff = Duration::from_millis(100);
            }
        }
    }
}
