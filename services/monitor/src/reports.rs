//! Where a monitor's reports come from. A lone monitor subscribes to all of
//! `headroom.metrics.>`. One of several shards subscribes to each cluster
//! it owns (`headroom.metrics.<cluster>.*`, and shard 0 to the pool's), so
//! that nats-server sends each instance only its share: with one wildcard
//! subscription each, every instance would be sent every report and skip
//! the others', and ingest would not grow with instances.
//!
//! The cost of the split: a report for a cluster that is not in KV reaches
//! no shard, so only a lone monitor counts it as `unknown_cluster`.

use std::collections::HashMap;
use std::pin::Pin;

use async_nats::{Message, Subscriber};
use futures::stream::{SelectAll, StreamExt, TakeUntil};
use headroom_shared::{subjects, ClusterId};
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};

use crate::ingest::Shard;

type Cut = TakeUntil<Subscriber, Pin<Box<WaitForCancellationFutureOwned>>>;

pub struct Reports {
    client: async_nats::Client,
    shard: Shard,
    streams: SelectAll<Cut>,
    /// The subscription of each owned cluster, ended by cancelling its token.
    clusters: HashMap<ClusterId, CancellationToken>,
    /// The subscriptions that are not a cluster's (all, or the pool's).
    fixed: usize,
}

impl Reports {
    /// # Errors
    /// The subscription cannot be made.
    pub async fn new(
        client: async_nats::Client,
        shard: Shard,
    ) -> Result<Self, async_nats::SubscribeError> {
        let mut reports = Self {
            client,
            shard,
            streams: SelectAll::new(),
            clusters: HashMap::new(),
            fixed: 0,
        };
        if shard.count <= 1 {
            reports.add(subjects::METRICS_ALL.to_owned()).await?;
            reports.fixed = 1;
        } else if shard.index == 0 {
            reports.add(subjects::metrics_pool_all()).await?;
            reports.fixed = 1;
        }
        Ok(reports)
    }

    async fn add(
        &mut self,
        subject: String,
    ) -> Result<CancellationToken, async_nats::SubscribeError> {
        let subscriber = self.client.subscribe(subject).await?;
        let token = CancellationToken::new();
        self.streams
            .push(subscriber.take_until(Box::pin(token.clone().cancelled_owned())));
        Ok(token)
    }

    /// Starts taking `cluster`'s reports, when this shard subscribes per
    /// cluster and does not already.
    ///
    /// # Errors
    /// The subscription cannot be made.
    pub async fn follow(&mut self, cluster: &ClusterId) -> Result<(), async_nats::SubscribeError> {
        if self.shard.count <= 1 || self.clusters.contains_key(cluster) {
            return Ok(());
        }
        let token = self.add(subjects::metrics_of_cluster(cluster)).await?;
        self.clusters.insert(cluster.clone(), token);
        Ok(())
    }

    /// Stops taking `cluster`'s reports (its subscription ends, and
    /// dropping it unsubscribes).
    pub fn forget(&mut self, cluster: &ClusterId) {
        if let Some(token) = self.clusters.remove(cluster) {
            token.cancel();
        }
    }

    /// How many subscriptions are open (a forgotten cluster's is closed,
    /// though its stream leaves the set only when next polled).
    pub fn subscriptions(&self) -> usize {
        self.fixed + self.clusters.len()
    }

    /// The next report; waits for ever while there is no subscription (a
    /// shard that owns no cluster yet).
    pub async fn next(&mut self) -> Message {
        loop {
            if self.streams.is_empty() {
                std::future::pending::<()>().await;
            }
            if let Some(message) = self.streams.next().await {
                return message;
            }
        }
    }
}
