//! What a node does when a partition becomes its own, before it applies the
//! partition's first event: it waits until its replica holds what the previous
//! owner wrote (so that events already applied are recognised), then, through
//! the writer, announces itself as the owner, queues again the lifecycle events
//! the previous owner's embedded KMS emitted and did not see applied, and
//! adopts the commands it queued and did not confirm sent.

use std::sync::Arc;
use std::time::Duration;

use super::replica::Replica;
use crate::store::writer::{Writer, WriterError};

pub async fn take_over(replica: &Arc<Replica>, writer: &Writer, topic: &str, partition: i32, generation: u64, url: &str) -> Result<(), WriterError> {
    let r = replica.clone();
    let waited = tokio::task::spawn_blocking(move || r.wait_caught_up(Some(&[partition]), Duration::from_secs(20))).await;
    if !matches!(waited, Ok(Ok(()))) {
        tracing::error!(partition, "taking the partition over without a caught-up replica");
    }
    let (emitted, adopted) = writer.take_over(topic, partition, generation, url).await?;
    if emitted > 0 {
        tracing::warn!(partition, events = emitted, "publishing lifecycle events the previous owner emitted but did not see applied");
    }
    if adopted > 0 {
        tracing::warn!(partition, commands = adopted, "sending data-plane commands the previous owner queued but did not confirm sent");
    }
    Ok(())
}
