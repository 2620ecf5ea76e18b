//! Partitions nobody consumes. When a node dies, the group coordinator is
//! meant to notice its silence after the session timeout and hand its
//! partitions to the others. tansu 0.6 drops the dead member without starting
//! a new generation, so the survivors are never told to rebalance and the dead
//! node's partitions stay unassigned: their events wait, and writes for their
//! keys get 503s.
//!
//! Every node therefore watches the partitions it does not own: one whose
//! announced owner has not answered (or that has no owner) for
//! `cluster.rejoin_after` makes this node leave and rejoin the group, which
//! starts a new generation on any broker, so the coordinator assigns every
//! partition again. On a broker that rebalances by itself, a new owner
//! announces itself well within that time and nothing happens.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::consumer::{Consumer, StreamConsumer};
use tokio_util::sync::CancellationToken;

use super::fence::Fence;
use crate::intake::{Health, IntakeContext};
use crate::store::Store;

pub struct Watch {
    pub consumer: Arc<StreamConsumer<IntakeContext>>,
    pub store: Store,
    pub fence: Arc<Fence>,
    pub topic: String,
    pub partitions: Vec<i32>,
    /// This node's advertised URL: an announcement naming it for a partition
    /// it no longer owns is as good as no owner.
    pub me: String,
    pub rejoin_after: Duration,
    pub health: Arc<Health>,
    /// Only these are asked whether they live; another announced URL is no owner.
    pub peers: super::Peers,
}

impl Watch {
    pub async fn run(self, shutdown: CancellationToken) {
        let http = match reqwest::Client::builder().timeout(Duration::from_secs(1)).build() {
            Ok(http) => http,
            Err(e) => {
                tracing::error!(error = %e, "cannot build the http client that asks owners whether they live; orphaned partitions are not watched");
                return shutdown.cancelled().await;
            }
        };
        let mut orphaned_since: HashMap<i32, Instant> = HashMap::new();
        let mut last_rejoin = Instant::now();
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(Duration::from_secs(2)) => {}
            }
            // Without the broker no owner can be assigned anyway; rejoining would only churn.
            if !self.health.broker_ok.load(std::sync::atomic::Ordering::SeqCst) {
                orphaned_since.clear();
                continue;
            }
            let mut alive: HashMap<String, bool> = HashMap::new();
            for p in &self.partitions {
                if self.fence.generation(&self.topic, *p).is_some() {
                    orphaned_since.remove(p);
                    continue;
                }
                let owner = self.store.owner_url(*p).ok().flatten().filter(|url| *url != self.me && self.peers.admits(url));
                let live = match owner {
                    None => false,
                    Some(url) => match alive.get(&url) {
                        Some(live) => *live,
                        None => {
                            let live = http.get(format!("{}/healthz", url.trim_end_matches('/'))).send().await.is_ok_and(|r| r.status().is_success());
                            alive.insert(url, live);
                            live
                        }
                    },
                };
                if live {
                    orphaned_since.remove(p);
                } else {
                    orphaned_since.entry(*p).or_insert_with(Instant::now);
                }
            }
            let stuck: Vec<i32> = orphaned_since.iter().filter(|(_, since)| since.elapsed() >= self.rejoin_after).map(|(p, _)| *p).collect();
            if stuck.is_empty() || last_rejoin.elapsed() < self.rejoin_after {
                continue;
            }
            tracing::warn!(
                partitions = ?stuck,
                after = ?self.rejoin_after,
                "partitions have had no live owner; rejoining the group so that the broker assigns them again"
            );
            self.consumer.unsubscribe();
            if let Err(e) = self.consumer.subscribe(&[&self.topic]) {
                tracing::error!(error = %e, topic = %self.topic, "cannot subscribe again after leaving the group; restart this node");
            }
            last_rejoin = Instant::now();
            orphaned_since.clear();
        }
    }
}
