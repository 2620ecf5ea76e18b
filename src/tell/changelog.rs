//! The changelog publisher: every batch of state changes goes to the compacted
//! changelog topic before it is applied to the store, keyed by the store key
//! (compaction keeps each record's newest value) and sent to its key's
//! partition (the events topic's partitioner), so that a key's changelog
//! partition and events partition are the same.
//!
//! It is the write-ahead log of a node, written idempotently (an idempotent
//! producer, one writer per partition, fenced by the consumer group: a node
//! that loses a partition finishes its batch before the partition moves), not
//! in a Kafka transaction: the broker this project runs on does not offer
//! transactions, and the publish-then-apply order gives what matters without
//! them: nothing a node applied is missing from the changelog, so a new owner
//! never applies an event twice.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use rdkafka::producer::{FutureProducer, FutureRecord};

use crate::cluster::partition_of;
use crate::config::KafkaConfig;
use crate::store::{Change, Route};

pub struct ChangelogPublisher {
    producer: FutureProducer,
    topic: String,
    partitions: i32,
    /// Set at shutdown: a publish waiting for the broker gives up, and the
    /// batch is not applied (its inputs are read again after a restart).
    pub stop: Arc<AtomicBool>,
}

impl ChangelogPublisher {
    pub fn new(kafka: &KafkaConfig, bootstrap: &str, topic: &str, partitions: i32) -> Result<ChangelogPublisher, rdkafka::error::KafkaError> {
        let producer: FutureProducer = crate::broker::client_config(kafka, bootstrap)
            .set("enable.idempotence", "true")
            .set("linger.ms", "0")
            .set("message.timeout.ms", "10000")
            .create()?;
        Ok(ChangelogPublisher { producer, topic: topic.to_string(), partitions, stop: Arc::new(AtomicBool::new(false)) })
    }

    /// Blocks until the broker has every change; retries while it is away.
    pub fn publish(&self, changes: &[Change]) -> Result<(), String> {
        let mut backoff = Duration::from_millis(100);
        loop {
            let sends: Vec<_> = changes
                .iter()
                .map(|c| {
                    let partition = match &c.route {
                        Route::Key(k) => partition_of(k, self.partitions),
                        Route::Partition(p) => *p,
                    };
                    self.producer.send_result(FutureRecord::to(&self.topic).partition(partition).key(&c.key).payload(&c.value))
                })
                .collect();
            let mut failure = None;
            for send in sends {
                match send {
                    Err((e, _)) => failure = Some(e.to_string()),
                    Ok(delivery) => match futures::executor::block_on(delivery) {
                        Ok(Ok(_)) => {}
                        Ok(Err((e, _))) => failure = Some(e.to_string()),
                        Err(_) => failure = Some("the producer was dropped".into()),
                    },
                }
            }
            let Some(e) = failure else { return Ok(()) };
            if self.stop.load(Ordering::SeqCst) {
                return Err(format!("{e} (shutting down)"));
            }
            tracing::warn!(error = %e, topic = %self.topic, "cannot write to the changelog; retrying (state changes wait)");
            std::thread::sleep(backoff);
            backoff = (backoff * 2).min(Duration::from_secs(5));
        }
    }
}
