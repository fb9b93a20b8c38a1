//! From a raw message on `headroom.metrics.<cluster>.<server>` to a report
//! the [`Decider`] takes, or a counted rejection. Live ingestion and replay
//! go through this same path, so a recording is judged exactly as the live
//! stream was.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicU64, Ordering};

use async_nats::HeaderMap;
use headroom_shared::codec::Codec;
use headroom_shared::errors::{codes, BusError};
use headroom_shared::ops::{CounterVec, Exposition};
use headroom_shared::subjects;
use headroom_shared::wire::{FrontendDemand, PerformanceReport};
use headroom_shared::ClusterId;
use serde::{Deserialize, Serialize};

use headroom_shared::hash::fnv1a;

use crate::decide::{Decider, Rejection};

/// Which clusters this monitor decides for: a stable hash of the cluster id
/// picks one of `count` shards, and the instance decides for the shards it
/// holds (by lease, see [`crate::leases`]). The holder of shard 0 also
/// takes the free servers' pool reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Shards {
    pub count: u32,
    pub held: BTreeSet<u32>,
}

impl Default for Shards {
    /// One shard, held: a monitor alone (replay, tests).
    fn default() -> Self {
        Self::all(1)
    }
}

impl Shards {
    /// `count` shards, none held yet.
    pub fn none(count: u32) -> Self {
        Self {
            count: count.max(1),
            held: BTreeSet::new(),
        }
    }

    /// `count` shards, all held.
    pub fn all(count: u32) -> Self {
        let count = count.max(1);
        Self {
            count,
            held: (0..count).collect(),
        }
    }

    /// The shard `cluster` belongs to.
    pub fn of(&self, cluster: &str) -> u32 {
        let index = fnv1a(cluster.as_bytes()) % u64::from(self.count);
        u32::try_from(index).unwrap_or(0)
    }

    pub fn owns(&self, cluster: &str) -> bool {
        self.held.contains(&self.of(cluster))
    }

    pub fn owns_pool(&self) -> bool {
        self.held.contains(&0)
    }
}

/// What became of one message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Taken {
    /// A member's report, now in its window.
    Report,
    /// A free server saying it is idle in the pool.
    Pool,
    /// Another shard's cluster.
    Skipped,
}

/// Counters of everything ingested, readable while ingestion runs.
#[derive(Debug, Default)]
pub struct Counters {
    pub reports: AtomicU64,
    pub pool_reports: AtomicU64,
    pub skipped: AtomicU64,
    pub malformed: AtomicU64,
    pub unsupported_version: AtomicU64,
    pub invalid: AtomicU64,
    pub subject_mismatch: AtomicU64,
    pub unknown_cluster: AtomicU64,
    pub not_a_member: AtomicU64,
    pub decisions: AtomicU64,
    pub requests_sent: AtomicU64,
    pub send_failures: AtomicU64,
    /// Gauges, set at each evaluation.
    pub tracked_servers: AtomicU64,
    pub clusters: AtomicU64,
    /// Subscriptions reports arrive on (one per owned cluster when sharded).
    pub subscriptions: AtomicU64,
    /// Shards whose lease this instance holds.
    pub shards_held: AtomicU64,
    /// Decisions by action, for `/metrics`.
    pub decided: DecisionsByAction,
}

/// Decisions by action (allocate, release, replace, reweight).
#[derive(Debug)]
pub struct DecisionsByAction(pub CounterVec);

impl Default for DecisionsByAction {
    fn default() -> Self {
        Self(CounterVec::new(
            "headroom_monitor_decisions_total",
            "Decisions made, by action.",
            &["action"],
        ))
    }
}

/// A copy of the counters, as the stats endpoint and replay print them.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CountersSnapshot {
    pub reports: u64,
    pub pool_reports: u64,
    pub skipped: u64,
    pub rejected: u64,
    pub malformed: u64,
    pub unsupported_version: u64,
    pub invalid: u64,
    pub subject_mismatch: u64,
    pub unknown_cluster: u64,
    pub not_a_member: u64,
    pub decisions: u64,
    pub requests_sent: u64,
    pub send_failures: u64,
    pub tracked_servers: u64,
    pub clusters: u64,
    #[serde(default)]
    pub shards_held: u64,
}

impl Counters {
    pub fn count_rejection(&self, code: &str) {
        let counter = match code {
            codes::UNSUPPORTED_VERSION => &self.unsupported_version,
            codes::INVALID => &self.invalid,
            codes::SUBJECT_MISMATCH => &self.subject_mismatch,
            codes::UNKNOWN_CLUSTER => &self.unknown_cluster,
            codes::NOT_A_MEMBER => &self.not_a_member,
            _ => &self.malformed,
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }

    pub fn snapshot(&self) -> CountersSnapshot {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let mut s = CountersSnapshot {
            reports: get(&self.reports),
            pool_reports: get(&self.pool_reports),
            skipped: get(&self.skipped),
            rejected: 0,
            malformed: get(&self.malformed),
            unsupported_version: get(&self.unsupported_version),
            invalid: get(&self.invalid),
            subject_mismatch: get(&self.subject_mismatch),
            unknown_cluster: get(&self.unknown_cluster),
            not_a_member: get(&self.not_a_member),
            decisions: get(&self.decisions),
            requests_sent: get(&self.requests_sent),
            send_failures: get(&self.send_failures),
            tracked_servers: get(&self.tracked_servers),
            clusters: get(&self.clusters),
            shards_held: get(&self.shards_held),
        };
        s.rejected = s.malformed
            + s.unsupported_version
            + s.invalid
            + s.subject_mismatch
            + s.unknown_cluster
            + s.not_a_member;
        s
    }
}

impl Counters {
    /// Writes the counters in Prometheus form.
    pub fn expose(&self, out: &mut Exposition) {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        const TAKEN: &str = "headroom_monitor_reports_total";
        const TAKEN_HELP: &str =
            "Performance reports ingested: member reports, free servers' pool reports, and other shards' (skipped).";
        out.counter(TAKEN, TAKEN_HELP, &[("kind", "member")], get(&self.reports));
        out.counter(
            TAKEN,
            TAKEN_HELP,
            &[("kind", "pool")],
            get(&self.pool_reports),
        );
        out.counter(
            TAKEN,
            TAKEN_HELP,
            &[("kind", "skipped")],
            get(&self.skipped),
        );
        const REJECTED: &str = "headroom_monitor_reports_rejected_total";
        const REJECTED_HELP: &str = "Performance reports rejected, by reason code.";
        for (code, counter) in [
            ("malformed", &self.malformed),
            (codes::UNSUPPORTED_VERSION, &self.unsupported_version),
            (codes::INVALID, &self.invalid),
            (codes::SUBJECT_MISMATCH, &self.subject_mismatch),
            (codes::UNKNOWN_CLUSTER, &self.unknown_cluster),
            (codes::NOT_A_MEMBER, &self.not_a_member),
        ] {
            out.counter(REJECTED, REJECTED_HELP, &[("reason", code)], get(counter));
        }
        self.decided.0.write(out);
        out.counter(
            "headroom_monitor_requests_sent_total",
            "Reconfiguration requests sent to the allocator.",
            &[],
            get(&self.requests_sent),
        );
        out.counter(
            "headroom_monitor_send_failures_total",
            "Decisions that could not be sent (queue full or JetStream refused).",
            &[],
            get(&self.send_failures),
        );
        out.gauge(
            "headroom_monitor_tracked_servers",
            "Servers with a window in this monitor.",
            &[],
            get(&self.tracked_servers) as f64,
        );
        out.gauge(
            "headroom_monitor_clusters",
            "Clusters this monitor decides for.",
            &[],
            get(&self.clusters) as f64,
        );
        out.gauge(
            "headroom_monitor_subscriptions",
            "Subscriptions reports arrive on: one for a lone monitor, one per owned cluster for a shard.",
            &[],
            get(&self.subscriptions) as f64,
        );
        out.gauge(
            "headroom_monitor_shards_held",
            "Shards whose lease this instance holds (it decides for their clusters).",
            &[],
            get(&self.shards_held) as f64,
        );
    }
}

fn reject(code: &str, message: impl Into<String>) -> Rejection {
    Rejection(BusError::new(code, message))
}

/// Parses, decodes, checks and records one metrics message that arrived at
/// `now_ms`, counting the outcome.
///
/// # Errors
/// The rejection, with its stable code; it has been counted.
pub fn ingest(
    decider: &mut Decider,
    shards: &Shards,
    counters: &Counters,
    now_ms: u64,
    subject: &str,
    headers: Option<&HeaderMap>,
    payload: &[u8],
) -> Result<Taken, Rejection> {
    let taken = take(decider, shards, now_ms, subject, headers, payload);
    match &taken {
        Ok(Taken::Report) => counters.reports.fetch_add(1, Ordering::Relaxed),
        Ok(Taken::Pool) => counters.pool_reports.fetch_add(1, Ordering::Relaxed),
        Ok(Taken::Skipped) => counters.skipped.fetch_add(1, Ordering::Relaxed),
        Err(rejection) => {
            counters.count_rejection(rejection.code());
            0
        }
    };
    taken
}

fn take(
    decider: &mut Decider,
    shards: &Shards,
    now_ms: u64,
    subject: &str,
    headers: Option<&HeaderMap>,
    payload: &[u8],
) -> Result<Taken, Rejection> {
    let Some((cluster_token, server_token)) = subjects::parse_metrics(subject) else {
        return Err(reject(
            codes::SUBJECT_MISMATCH,
            format!("{subject} is not headroom.metrics.<cluster>.<server>"),
        ));
    };
    // Skip other shards' clusters before paying for decoding.
    let owned = match cluster_token {
        Some(c) => shards.owns(c),
        None => shards.owns_pool(),
    };
    if !owned {
        return Ok(Taken::Skipped);
    }
    let codec = Codec::of(headers).map_err(|e| reject(e.code(), e.to_string()))?;
    if server_token == subjects::DEMAND_TOKEN {
        return take_demand(decider, now_ms, subject, cluster_token, codec, payload);
    }
    let report: PerformanceReport = codec
        .decode(payload)
        .map_err(|e| reject(e.code(), e.to_string()))?;
    report.validate().map_err(Rejection)?;
    if report.server.as_str() != server_token {
        return Err(reject(
            codes::SUBJECT_MISMATCH,
            format!("report from {} on {subject}", report.server),
        ));
    }
    if report.cluster.as_ref().map(ClusterId::as_str) != cluster_token {
        return Err(reject(
            codes::SUBJECT_MISMATCH,
            format!(
                "report for cluster {} on {subject}",
                report.cluster.as_ref().map_or("(pool)", ClusterId::as_str)
            ),
        ));
    }
    match &report.cluster {
        None => Ok(Taken::Pool),
        Some(cluster) => {
            decider.observe(now_ms, cluster, &report)?;
            Ok(Taken::Report)
        }
    }
}

/// A front-end's word on its cluster's demand (`<cluster>._demand`).
fn take_demand(
    decider: &mut Decider,
    now_ms: u64,
    subject: &str,
    cluster_token: Option<&str>,
    codec: Codec,
    payload: &[u8],
) -> Result<Taken, Rejection> {
    let said: FrontendDemand = codec
        .decode(payload)
        .map_err(|e| reject(e.code(), e.to_string()))?;
    said.validate().map_err(Rejection)?;
    if Some(said.cluster.as_str()) != cluster_token {
        return Err(reject(
            codes::SUBJECT_MISMATCH,
            format!("demand for cluster {} on {subject}", said.cluster),
        ));
    }
    decider.demand(now_ms, &said.cluster, &said)?;
    Ok(Taken::Report)
}

#[cfg(test)]
mod tests {
    use super::Shards;

    #[test]
    fn every_cluster_has_exactly_one_shard_and_the_shards_share_them_evenly() {
        for count in [1u32, 2, 3, 4, 7] {
            let mut per_shard = vec![0usize; count as usize];
            for c in 0..10_000 {
                let cluster = format!("cluster-{c}");
                let owners: Vec<u32> = (0..count)
                    .filter(|&index| {
                        Shards {
                            count,
                            held: [index].into(),
                        }
                        .owns(&cluster)
                    })
                    .collect();
                assert_eq!(owners.len(), 1, "{cluster} of {count} shards: {owners:?}");
                per_shard[owners[0] as usize] += 1;
            }
            let even = 10_000 / count as usize;
            for n in per_shard {
                assert!(
                    n.abs_diff(even) * 10 < even,
                    "{count} shards: {n} against {even}"
                );
            }
        }
    }
}
