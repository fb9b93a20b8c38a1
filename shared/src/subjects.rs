//! The subject tree and the JetStream streams over it.
//!
//! One root, `headroom`, so permissions can be written per service:
//!
//! | subject | carries | transport |
//! | --- | --- | --- |
//! | `headroom.metrics.<cluster>.<server>` | [`PerformanceReport`](crate::wire::PerformanceReport) | core NATS, high rate, loss tolerated; `<cluster>` is `_pool` for a free server |
//! | `headroom.metrics.<cluster>._demand` | [`FrontendDemand`](crate::wire::FrontendDemand): requests held and seen by a front-end | core NATS |
//! | `headroom.reconfig.<cluster>` | [`ReconfigRequest`](crate::wire::ReconfigRequest) | JetStream `HEADROOM_RECONFIG`, work queue, de-duplicated by `Nats-Msg-Id` |
//! | `headroom.membership.<cluster>` | [`MembershipChange`](crate::wire::MembershipChange) | core NATS; the KV cluster record is the snapshot |
//! | `headroom.assign.<server>` | [`AssignmentNotice`](crate::wire::AssignmentNotice) | core NATS |
//! | `headroom.status.<server>` | [`ServerStatus`](crate::wire::ServerStatus) | core NATS |
//! | `headroom.events.<cluster>.<kind>` | [`AuditEvent`](crate::wire::AuditEvent) | JetStream `HEADROOM_EVENTS`, the audit log; `<cluster>` is `_none` when no cluster applies |
//! | `headroom.frontend.<cluster>.<instance>` | a front-end's report of itself | core NATS |
//! | `headroom.frontend.<cluster>.<instance>.applied` | [`FrontendApplied`](crate::wire::FrontendApplied): the generation it routes by | core NATS |
//! | `headroom.admin.>` | the allocator's admin endpoints | NATS services API |
//! | `headroom.monitor.stats` | the monitor's counters | NATS services API |

use std::time::Duration;

use async_nats::jetstream::stream;

use crate::ids::{ClusterId, ServerId};

pub const ROOT: &str = "headroom";
/// The cluster token for a server that sits in the free pool.
pub const POOL_TOKEN: &str = "_pool";
/// The server token of a front-end's demand for its cluster
/// ([`FrontendDemand`](crate::wire::FrontendDemand)): no server id starts
/// with `_`.
pub const DEMAND_TOKEN: &str = "_demand";
/// The cluster token for events that concern no cluster.
pub const NO_CLUSTER_TOKEN: &str = "_none";

pub const RECONFIG_STREAM: &str = "HEADROOM_RECONFIG";
pub const EVENTS_STREAM: &str = "HEADROOM_EVENTS";
/// The durable consumer the allocators share on the reconfig stream.
pub const ALLOCATOR_CONSUMER: &str = "allocator";

/// The admin endpoints' group; each verb is a subject below it.
pub const ADMIN_GROUP: &str = "headroom.admin";
pub mod admin {
    pub const POOL_LIST: &str = "pool.list";
    pub const POOL_REGISTER: &str = "pool.register";
    /// A server's own registration, `pool.register.<server>`: the subject
    /// an agent's user may publish, and the allocator refuses a body that
    /// names another server.
    pub const POOL_REGISTER_OWN: &str = "pool.register.*";

    pub fn pool_register_own(server: &crate::ServerId) -> String {
        format!("pool.register.{server}")
    }
    pub const POOL_DEREGISTER: &str = "pool.deregister";
    pub const CLUSTER_LIST: &str = "cluster.list";
    pub const CLUSTER_GET: &str = "cluster.get";
    pub const CLUSTER_PUT: &str = "cluster.put";
    pub const MEMBER_DRAIN: &str = "member.drain";
}

pub fn metrics(cluster: Option<&ClusterId>, server: &ServerId) -> String {
    let cluster = cluster.map_or(POOL_TOKEN, ClusterId::as_str);
    format!("{ROOT}.metrics.{cluster}.{server}")
}
pub const METRICS_ALL: &str = "headroom.metrics.>";
/// Where front-ends say what demand they see for `cluster`.
pub fn demand(cluster: &ClusterId) -> String {
    format!("{ROOT}.metrics.{cluster}.{DEMAND_TOKEN}")
}
/// Every member's reports of one cluster.
pub fn metrics_of_cluster(cluster: &ClusterId) -> String {
    format!("{ROOT}.metrics.{cluster}.*")
}
/// Every free server's reports.
pub fn metrics_pool_all() -> String {
    format!("{ROOT}.metrics.{POOL_TOKEN}.*")
}

/// The cluster token (`None` for the pool) and server token of a metrics
/// subject, unvalidated; `None` when the subject is not one.
pub fn parse_metrics(subject: &str) -> Option<(Option<&str>, &str)> {
    let rest = subject.strip_prefix("headroom.metrics.")?;
    let (cluster, server) = rest.split_once('.')?;
    if cluster.is_empty() || server.is_empty() || server.contains('.') {
        return None;
    }
    Some(((cluster != POOL_TOKEN).then_some(cluster), server))
}

/// What a front-end observes of itself (the per-backend view goes on the
/// metrics subject of each backend).
pub fn frontend_stats(cluster: &ClusterId, instance: &str) -> String {
    format!("{ROOT}.frontend.{cluster}.{instance}")
}

/// Where a front-end says which membership generation it applied.
pub fn frontend_applied(cluster: &ClusterId, instance: &str) -> String {
    format!("{ROOT}.frontend.{cluster}.{instance}.applied")
}

/// Every front-end's applied generation.
pub const FRONTEND_APPLIED_ALL: &str = "headroom.frontend.*.*.applied";

/// The monitor's services API name; its `stats` endpoint answers with its
/// counters.
pub const MONITOR_SERVICE: &str = "headroom-monitor";
pub const MONITOR_STATS: &str = "headroom.monitor.stats";

pub fn reconfig(cluster: &ClusterId) -> String {
    format!("{ROOT}.reconfig.{cluster}")
}
pub const RECONFIG_ALL: &str = "headroom.reconfig.>";
/// The cluster token of a reconfig subject.
pub fn reconfig_cluster(subject: &str) -> Option<&str> {
    subject.strip_prefix("headroom.reconfig.")
}

pub fn membership(cluster: &ClusterId) -> String {
    format!("{ROOT}.membership.{cluster}")
}
pub const MEMBERSHIP_ALL: &str = "headroom.membership.*";

pub fn assign(server: &ServerId) -> String {
    format!("{ROOT}.assign.{server}")
}

pub fn status(server: &ServerId) -> String {
    format!("{ROOT}.status.{server}")
}
pub const STATUS_ALL: &str = "headroom.status.*";

pub fn events(cluster: Option<&ClusterId>, kind: &str) -> String {
    let cluster = cluster.map_or(NO_CLUSTER_TOKEN, ClusterId::as_str);
    format!("{ROOT}.events.{cluster}.{kind}")
}
pub const EVENTS_ALL: &str = "headroom.events.>";

/// The reconfiguration stream: a work queue shared by every allocator, with
/// a de-duplication window so a request published twice is stored once.
pub fn reconfig_stream(replicas: usize) -> stream::Config {
    stream::Config {
        name: RECONFIG_STREAM.to_owned(),
        description: Some("Headroom: reconfiguration requests for the allocator".to_owned()),
        subjects: vec![RECONFIG_ALL.to_owned()],
        retention: stream::RetentionPolicy::WorkQueue,
        storage: stream::StorageType::File,
        num_replicas: replicas.max(1),
        duplicate_window: Duration::from_secs(120),
        max_age: Duration::from_secs(24 * 3600),
        ..Default::default()
    }
}

/// The audit log.
pub fn events_stream(replicas: usize) -> stream::Config {
    stream::Config {
        name: EVENTS_STREAM.to_owned(),
        description: Some("Headroom: audit log of every decision and change".to_owned()),
        subjects: vec![EVENTS_ALL.to_owned()],
        retention: stream::RetentionPolicy::Limits,
        storage: stream::StorageType::File,
        num_replicas: replicas.max(1),
        duplicate_window: Duration::from_secs(120),
        max_age: Duration::from_secs(7 * 24 * 3600),
        max_bytes: 1 << 30,
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subjects_share_one_root() {
        let c = ClusterId::new("web").expect("id");
        let s = ServerId::new("s1").expect("id");
        assert_eq!(metrics(Some(&c), &s), "headroom.metrics.web.s1");
        assert_eq!(metrics(None, &s), "headroom.metrics._pool.s1");
        assert_eq!(reconfig(&c), "headroom.reconfig.web");
        assert_eq!(
            parse_metrics("headroom.metrics.web.s1"),
            Some((Some("web"), "s1"))
        );
        assert_eq!(
            parse_metrics("headroom.metrics._pool.s1"),
            Some((None, "s1"))
        );
        assert_eq!(parse_metrics("headroom.metrics.web"), None);
        assert_eq!(parse_metrics("headroom.metrics.web.s1.x"), None);
        assert_eq!(reconfig_cluster("headroom.reconfig.web"), Some("web"));
        assert_eq!(
            events(None, "registered"),
            "headroom.events._none.registered"
        );
    }
}
