//! What the allocator exposes on `/metrics`: its audit events by kind
//! (allocations, releases, ...), requests by action and outcome, and the
//! pool (from the allocator's view of it) and clusters as KV holds them.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use async_nats::jetstream::kv;
use futures::StreamExt;
use headroom_shared::codec::{Codec, Message};
use headroom_shared::ops::{CounterVec, GaugeVec, Histogram, Ops};
use headroom_shared::records::{ClusterRecord, MemberState};
use tokio_util::sync::CancellationToken;

use crate::pool::PoolView;

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
    /// From a decision to every live front-end routing by its change.
    pub confirm_seconds: Histogram,
    /// Servers' statuses and registrations refused, by reason code.
    pub refused: CounterVec,
    pub pool: GaugeVec,
    pub members: GaugeVec,
    pub generation: GaugeVec,
    /// Each cluster's counts, by key, as the clusters bucket last showed.
    clusters: Mutex<HashMap<String, ClusterCounts>>,
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
            confirm_seconds: Histogram::default(),
            refused: CounterVec::new(
                "headroom_allocator_server_messages_refused_total",
                "Servers' statuses and registrations refused, by what (status, registration) and reason code (malformed, subject_mismatch).",
                &["what", "reason"],
            ),
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
            clusters: Mutex::default(),
        }
    }
}

/// A cluster's member counts (joining, active, draining) and generation.
type ClusterCounts = ([f64; 3], u64);

impl Metrics {
    /// Keeps the cluster gauges equal to KV by following the clusters
    /// bucket, so they move the moment any allocator changes a record. A
    /// change costs the size of that one cluster; the gauges are written
    /// from the counts when scraped.
    pub async fn follow(
        self: Arc<Self>,
        clusters: kv::Store,
        stop: CancellationToken,
    ) -> Result<&'static str, crate::AllocatorError> {
        let mut changes =
            std::pin::pin!(headroom_shared::kv::follow(clusters, ">".to_owned(), stop));
        while let Some(entry) = changes.next().await {
            let mut counts = self.clusters.lock().unwrap_or_else(|p| p.into_inner());
            match decoded::<ClusterRecord>(&entry) {
                Some(record) => {
                    let mut by_state = [0.0; 3];
                    for member in &record.members {
                        by_state[member.state as usize] += 1.0;
                    }
                    counts.insert(entry.key, (by_state, record.generation));
                }
                None => {
                    counts.remove(&entry.key);
                }
            }
        }
        Ok("metrics")
    }

    /// Turns the counts into the gauges' series (at scrape).
    fn refresh(&self, pool: &PoolView) {
        let mut by_state: BTreeMap<&str, f64> = ["free", "allocated", "draining", "out_of_service"]
            .into_iter()
            .map(|state| (state, 0.0))
            .collect();
        for (state, n) in pool.counts() {
            *by_state.entry(state).or_default() += n as f64;
        }
        self.pool
            .replace(by_state.into_iter().map(|(s, n)| (vec![s.to_owned()], n)));
        let counts = self.clusters.lock().unwrap_or_else(|p| p.into_inner());
        let states = [
            MemberState::Joining,
            MemberState::Active,
            MemberState::Draining,
        ];
        self.members
            .replace(counts.iter().flat_map(|(cluster, (n, _))| {
                states.iter().map(move |state| {
                    (
                        vec![cluster.clone(), state.name().to_owned()],
                        n[*state as usize],
                    )
                })
            }));
        self.generation.replace(
            counts
                .iter()
                .map(|(cluster, (_, generation))| (vec![cluster.clone()], *generation as f64)),
        );
    }

    /// Publishes these on `ops`; the pool gauges come from `pool`, the KV
    /// calls from the store's count.
    pub fn register(self: &Arc<Self>, ops: &Ops, pool: PoolView, kv_calls: Arc<CounterVec>) {
        let metrics = self.clone();
        ops.register(move |out| {
            kv_calls.write(out);
            metrics.refresh(&pool);
            metrics.events.write(out);
            metrics.requests.write(out);
            metrics.refused.write(out);
            out.histogram(
                "headroom_allocator_request_seconds",
                "Time to apply a reconfiguration request.",
                &[],
                &metrics.request_seconds,
            );
            out.histogram(
                "headroom_allocator_confirm_seconds",
                "Time from a decision to every live front-end routing by its change.",
                &[],
                &metrics.confirm_seconds,
            );
            metrics.pool.write(out);
            metrics.members.write(out);
            metrics.generation.write(out);
        });
    }
}
