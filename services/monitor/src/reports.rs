//! Where a monitor's reports come from, for the shards it holds. With one
//! shard, its holder subscribes to all of `headroom.metrics.>`. With
//! several, an instance subscribes to each cluster of its shards
//! (`headroom.metrics.<cluster>.*`, and the holder of shard 0 to the
//! pool's), so that nats-server sends each instance only its share: with
//! one wildcard subscription each, every instance would be sent every
//! report and skip the others', and ingest would not grow with instances.
//!
//! The cost of the split: a report for a cluster that is not in KV reaches
//! no one, so only a lone shard's holder counts it as `unknown_cluster`.

use std::collections::HashMap;
use std::pin::Pin;

use async_nats::{Message, Subscriber};
use futures::stream::{SelectAll, StreamExt, TakeUntil};
use headroom_shared::{subjects, ClusterId};
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};

type Cut = TakeUntil<Subscriber, Pin<Box<WaitForCancellationFutureOwned>>>;

pub struct Reports {
    client: async_nats::Client,
    /// How many shards there are.
    shards: u32,
    streams: SelectAll<Cut>,
    /// The subscription of each owned cluster, ended by cancelling its token.
    clusters: HashMap<ClusterId, CancellationToken>,
    /// Shard 0's subscription that is not a cluster's (all, or the pool's).
    first: Option<CancellationToken>,
}

impl Reports {
    /// No subscription yet: they follow the shards taken.
    pub fn new(client: async_nats::Client, shards: u32) -> Self {
        Self {
            client,
            shards,
            streams: SelectAll::new(),
            clusters: HashMap::new(),
            first: None,
        }
    }

    /// Starts what holding shard 0 adds: every report for a lone shard,
    /// else the pool's.
    ///
    /// # Errors
    /// The subscription cannot be made.
    pub async fn take_first_shard(&mut self) -> Result<(), async_nats::SubscribeError> {
        if self.first.is_none() {
            let subject = if self.shards <= 1 {
                subjects::METRICS_ALL.to_owned()
            } else {
                subjects::metrics_pool_all()
            };
            self.first = Some(self.add(subject).await?);
        }
        Ok(())
    }

    /// Ends what [`Self::take_first_shard`] started.
    pub fn leave_first_shard(&mut self) {
        if let Some(token) = self.first.take() {
            token.cancel();
        }
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

    /// Starts taking `cluster`'s reports, when there are several shards and
    /// it does not already.
    ///
    /// # Errors
    /// The subscription cannot be made.
    pub async fn follow(&mut self, cluster: &ClusterId) -> Result<(), async_nats::SubscribeError> {
        if self.shards <= 1 || self.clusters.contains_key(cluster) {
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
        usize::from(self.first.is_some()) + self.clusters.len()
    }

    /// The next report; waits for ever while there is no subscription (an
    /// instance that holds no shard, or whose shards have no cluster).
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
