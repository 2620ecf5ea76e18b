//! intake, a node alone (`kafka.assignment = "auto"` and a group of one): every
//! partition of the events topic assigned by this node to itself, at the
//! offsets in its store, instead of joining the consumer group. The group's
//! join round (JoinGroup, SyncGroup) costs seconds on tansu at every start and
//! restart, and a node alone has nobody to share partitions with.

use std::sync::Arc;
use std::time::Duration;

use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::TopicPartitionList;
use tokio_util::sync::CancellationToken;

use super::{IntakeContext, IntakeError};
use crate::cluster::fence::Partition;

/// How long one metadata request may take, and the pause before the next
/// while the topic is missing or the broker is down.
const METADATA_WAIT: Duration = Duration::from_secs(1);

/// Asks the broker for the topic's partitions until it answers with at least
/// one, then assigns all of them: true once assigned, false if `shutdown`
/// came first. The
/// heartbeat beats while it waits: a daemon waiting for its broker is not stuck.
pub(super) async fn every_partition(consumer: &Arc<StreamConsumer<IntakeContext>>, topic: &str, shutdown: &CancellationToken) -> Result<bool, IntakeError> {
    let mut warned = false;
    loop {
        consumer.context().health.progress.beat();
        let asked = consumer.clone();
        let name = topic.to_string();
        // fetch_metadata blocks for up to its timeout: not on a runtime worker.
        let answer = tokio::task::spawn_blocking(move || partitions(&asked, &name)).await;
        let problem = match answer {
            Ok(Ok(parts)) if !parts.is_empty() => return assign(consumer, topic, &parts).map(|()| true),
            Ok(Ok(_)) => format!("the broker does not know topic {topic}; create it (or set kafka.create_topics)"),
            Ok(Err(e)) => format!("cannot read the partitions of {topic}: {e}; check kafka.brokers"),
            Err(e) => format!("the metadata request did not finish: {e}"),
        };
        if !warned {
            tracing::warn!(%problem, "waiting for the partitions of the events topic; retrying every second");
            warned = true;
        }
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(false),
            _ = tokio::time::sleep(METADATA_WAIT) => {}
        }
    }
}

fn partitions(consumer: &StreamConsumer<IntakeContext>, topic: &str) -> Result<Vec<i32>, rdkafka::error::KafkaError> {
    let metadata = consumer.fetch_metadata(Some(topic), METADATA_WAIT)?;
    Ok(metadata.topics().iter().filter(|t| t.name() == topic && t.error().is_none()).flat_map(|t| t.partitions().iter().map(|p| p.id())).collect())
}

/// The same steps as an assignment by the group (`IntakeContext::rebalance`):
/// the store's offsets, a fence generation per partition, then the consumer.
fn assign(consumer: &StreamConsumer<IntakeContext>, topic: &str, ids: &[i32]) -> Result<(), IntakeError> {
    let context = consumer.context();
    let parts: Vec<Partition> = ids.iter().map(|p| (topic.to_string(), *p)).collect();
    let mut tpl = TopicPartitionList::new();
    for (t, p) in &parts {
        tpl.add_partition(t, *p);
    }
    context.seek_to_stored(&mut tpl, &parts);
    context.fence_and_take_over(&parts);
    if let Err(source) = consumer.assign(&tpl) {
        context.fence.revoke_all();
        return Err(IntakeError::Assign { topic: topic.to_string(), source });
    }
    context.health.note_ownership(&context.fence);
    context.log_assigned(&parts, "assigned every partition to this node alone; resuming from the store's offsets");
    Ok(())
}
