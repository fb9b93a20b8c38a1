//! What the allocator exposes on `/metrics`: its audit events by kind
//! (allocations, releases, ...), requests by action and outcome, and the
//! pool and clusters as KV holds them.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use async_nats::jetstream::kv;
use futures::future::Either;
use futures::StreamExt;
use headroom_shared::codec::{Codec, Message};
use headroom_shared::kv::{ClusterRecord, ServerRecord};
use headroom_shared::ops::{CounterVec, GaugeVec, Histogram, Ops};
use tokio_util::sync::CancellationToken;

/// The record an entry holds, or `None` for a delete or an undecodable
/// value (which the allocator's reads report).
fn decoded<T: Message>(entry: &kv::Entry) -> Option<T> {
    if entry.operation != kv::Operation::Put {
        return None;
    }
    Codec::MsgPack.decode(&entry.value).ok()
}

#[derive(Debug)]
pub struct Metrics {
    pub events: CounterVec,
    pub requests: CounterVec,
    pub request_seconds: Histogram,
    pub pool: GaugeVec,
    pub members: GaugeVec,
    pub generation: GaugeVec,
}

impl Default for Metrics {
    fn default() -> Self {
        Self {
            events: CounterVec::new(
                "headroom_allocator_events_total",
                "Changes the allocator made, by audit event kind (allocated, drain_started, released, ...).",
                &["kind"],
            ),
            requests: CounterVec::new(
                "headroom_allocator_requests_total",
                "Reconfiguration requests handled, by action and outcome (applied, rejected, duplicate, retry, malformed).",
                &["action", "outcome"],
            ),
            request_seconds: Histogram::default(),
            pool: GaugeVec::new(
                "headroom_pool_servers",
                "Registered servers by state.",
                &["state"],
            ),
            members: GaugeVec::new(
                "headroom_cluster_members",
                "Members of each cluster by member state.",
                &["cluster", "state"],
            ),
            generation: GaugeVec::new(
                "headroom_membership_generation",
                "Each cluster's membership generation (grows by one with every change).",
                &["cluster"],
            ),
        }
    }
}

impl Metrics {
    /// Keeps the pool and cluster gauges equal to KV by following both
    /// buckets, so they move the moment any allocator changes a record.
    pub async fn follow(
        self: Arc<Self>,
        servers: kv::Store,
        clusters: kv::Store,
        stop: CancellationToken,
    ) -> Result<&'static str, crate::AllocatorError> {
        let servers = headroom_shared::kv::follow(servers, ">".to_owned(), stop.clone());
        let clusters = headroom_shared::kv::follow(clusters, ">".to_owned(), stop);
        let mut changes = std::pin::pin!(futures::stream::select(
            servers.map(Either::Left),
            clusters.map(Either::Right),
        ));
        let mut server_states: HashMap<String, &'static str> = HashMap::new();
        let mut cluster_records: HashMap<String, ClusterRecord> = HashMap::new();
        while let Some(change) = changes.next().await {
            match change {
                Either::Left(entry) => {
                    match decoded::<ServerRecord>(&entry) {
                        Some(record) => server_states.insert(entry.key, record.state.name()),
                        None => server_states.remove(&entry.key),
                    };
                    let mut pool: BTreeMap<&str, f64> =
                        ["free", "allocated", "draining", "out_of_service"]
                            .into_iter()
                            .map(|state| (state, 0.0))
                            .collect();
                    for state in server_states.values() {
                        *pool.entry(state).or_default() += 1.0;
                    }
                    self.pool
                        .replace(pool.into_iter().map(|(s, n)| (vec![s.to_owned()], n)));
                }
                Either::Right(entry) => {
                    match decoded::<ClusterRecord>(&entry) {
                        Some(record) => cluster_records.insert(entry.key, record),
                        None => cluster_records.remove(&entry.key),
                    };
                    let mut members = BTreeMap::<(String, &str), f64>::new();
                    for cluster in cluster_records.values() {
                        for state in ["joining", "active", "draining"] {
                            members.insert((cluster.id.to_string(), state), 0.0);
                        }
                        for member in &cluster.members {
                            *members
                                .entry((cluster.id.to_string(), member.state.name()))
                                .or_default() += 1.0;
                        }
                    }
                    self.members.replace(
                        members
                            .into_iter()
                            .map(|((c, s), n)| (vec![c, s.to_owned()], n)),
                    );
                    self.generation.replace(
                        cluster_records
                            .values()
                            .map(|c| (vec![c.id.to_string()], c.generation as f64)),
                    );
                }
            }
        }
        Ok("metrics")
    }

    /// Publishes these on `ops`.
    pub fn register(self: &Arc<Self>, ops: &Ops) {
        let metrics = self.clone();
        ops.register(move |out| {
            metrics.events.write(out);
            metrics.requests.write(out);
            out.histogram(
                "headroom_allocator_request_seconds",
                "Time to apply a reconfiguration request.",
                &[],
                &metrics.request_seconds,
            );
            metrics.pool.write(out);
            metrics.members.write(out);
            metrics.generation.write(out);
        });
    }
}
