//! Consumer lag, sampled off the hot path: per assigned partition, the broker's
//! high watermark minus the next offset the store holds. The store's offset, not
//! Kafka's position, because only what is durable has been acted on.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use rdkafka::consumer::{Consumer, StreamConsumer};
use tokio_util::sync::CancellationToken;

use super::IntakeContext;
use crate::metrics::Metrics;

/// Lag is a trend to alert on, not a per-message fact; every few seconds is
/// plenty and costs the broker one request per partition.
const EVERY: Duration = Duration::from_secs(5);
const BROKER_TIMEOUT: Duration = Duration::from_secs(2);

pub(super) async fn sample(consumer: Arc<StreamConsumer<IntakeContext>>, metrics: Arc<Metrics>, shutdown: CancellationToken) {
    let mut shown: HashSet<i32> = HashSet::new();
    loop {
        let c = consumer.clone();
        if let Ok((assigned, measured)) = tokio::task::spawn_blocking(move || measure(&c)).await {
            for (partition, lag) in measured {
                metrics.consumer_lag.with_label_values(&[&partition.to_string()]).set(lag);
                shown.insert(partition);
            }
            // A partition that moved to another member is that member's to report.
            shown.retain(|p| {
                let keep = assigned.contains(p);
                if !keep {
                    let _ = metrics.consumer_lag.remove_label_values(&[&p.to_string()]);
                }
                keep
            });
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(EVERY) => {}
        }
    }
}

/// The assigned partitions, and the lag of those whose watermarks the broker
/// gave; a partition it did not answer for keeps its last value.
fn measure(consumer: &StreamConsumer<IntakeContext>) -> (HashSet<i32>, Vec<(i32, i64)>) {
    let Ok(assignment) = consumer.assignment() else { return Default::default() };
    let mut assigned = HashSet::new();
    let mut measured = Vec::new();
    for e in assignment.elements() {
        assigned.insert(e.partition());
        match consumer.fetch_watermarks(e.topic(), e.partition(), BROKER_TIMEOUT) {
            Ok((low, high)) => measured.push((e.partition(), lag(low, high, consumer.context().store.offset(e.topic(), e.partition()).ok().flatten()))),
            Err(err) => tracing::debug!(error = %err, partition = e.partition(), "cannot read the watermarks; lag not updated"),
        }
    }
    (assigned, measured)
}

/// Messages from the next offset to read up to the high watermark. With no
/// stored offset the partition is read from its low watermark (auto.offset.reset
/// is earliest), and an offset below it was deleted by retention: unreadable, so
/// no lag.
fn lag(low: i64, high: i64, next: Option<i64>) -> i64 {
    (high - next.unwrap_or(low).max(low)).max(0)
}

#[cfg(test)]
mod tests {
    use super::lag;

    #[test]
    fn lag_counts_from_the_durable_offset_to_the_high_watermark() {
        assert_eq!(lag(0, 10, Some(4)), 6);
        assert_eq!(lag(0, 10, Some(10)), 0);
        assert_eq!(lag(0, 10, None), 10, "never read: everything is lag");
        assert_eq!(lag(5, 10, Some(2)), 5, "offsets removed by retention are not lag");
        assert_eq!(lag(0, 3, Some(7)), 0, "a watermark behind the stored offset is no negative lag");
    }
}
