//! The messages Headroom services exchange on NATS.
//!
//! Field names are the contract: they are written out by name (never by
//! position), new fields are optional with a default, and `v` changes only
//! when a change would be misread by an older reader. Times are Unix
//! milliseconds, so the JSON and XML forms stay readable.

use serde::{Deserialize, Serialize};

use crate::codec::{message, SCHEMA_VERSION};
use crate::errors::{codes, BusError};
use crate::ids::{ClusterId, RequestId, ServerId};
use crate::records::{ClusterPolicy, ClusterRecord, Member, Reading, ServerRecord};
use crate::time::now_ms;

/// Who measured a performance report.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReportSource {
    /// The agent on the server itself.
    Agent,
    /// A front-end, observing the server from outside.
    Frontend { frontend: String },
}

/// A server's performance over the last interval. Every measure is
/// optional: a measure that is missing is unknown, never zero.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PerformanceReport {
    #[serde(default = "crate::codec::default_schema_version")]
    pub v: u16,
    pub server: ServerId,
    /// The cluster the server serves; none while it waits in the pool.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster: Option<ClusterId>,
    pub source: ReportSource,
    pub at_ms: u64,
    pub interval_ms: u32,
    /// CPU busy, 0.0 to 1.0 across all cores.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu: Option<f64>,
    /// Memory in use, 0.0 to 1.0.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub load1: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub net_rx_bytes_per_s: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub net_tx_bytes_per_s: Option<f64>,
    /// Requests in the server: being worked on, or waiting for a slot.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub in_flight: Option<u32>,
    /// Of those, the ones waiting for a slot.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queued: Option<u32>,
    /// The requests the server works on at once: with it, in flight over
    /// concurrency is the server's utilisation, above 1 under overload.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub concurrency: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requests_per_s: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub latency_p50_ms: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub latency_p99_ms: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub errors_per_s: Option<f64>,
    /// A front-end's: it has ejected the server (too many failures in a
    /// row) and has had no answer from it since. A member every live
    /// front-end has ejected for long while its agent still reports is
    /// replaced: its application is down behind a live agent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ejected: Option<bool>,
}

impl PerformanceReport {
    /// What the report says of the server's load, for
    /// [`Measures::utilisation`](crate::records::Measures::utilisation).
    pub fn reading(&self) -> Reading {
        Reading {
            cpu: self.cpu,
            in_flight: self.in_flight,
            concurrency: self.concurrency,
            latency_p99_ms: self.latency_p99_ms,
        }
    }
}
message!(PerformanceReport, "performance_report");

/// The longest report interval that makes sense: a report about the last
/// hour or more is not a live measurement.
pub const MAX_REPORT_INTERVAL_MS: u32 = 3_600_000;

impl PerformanceReport {
    /// A report with every measure unknown, to fill in.
    pub fn new(
        server: ServerId,
        cluster: Option<ClusterId>,
        source: ReportSource,
        at_ms: u64,
        interval_ms: u32,
    ) -> Self {
        Self {
            v: SCHEMA_VERSION,
            server,
            cluster,
            source,
            at_ms,
            interval_ms,
            cpu: None,
            memory: None,
            load1: None,
            net_rx_bytes_per_s: None,
            net_tx_bytes_per_s: None,
            in_flight: None,
            queued: None,
            concurrency: None,
            requests_per_s: None,
            latency_p50_ms: None,
            latency_p99_ms: None,
            errors_per_s: None,
            ejected: None,
        }
    }

    /// Checks that every measure is physically possible: finite, not
    /// negative, fractions within 0..=1. A report that fails is rejected
    /// whole, because one absurd field says the sender is broken.
    ///
    /// # Errors
    /// A [`codes::INVALID`] error naming the first bad field.
    pub fn validate(&self) -> Result<(), BusError> {
        let invalid = |field: &str, why: String| {
            Err(BusError::new(
                codes::INVALID,
                format!("report from {}: {field} {why}", self.server),
            ))
        };
        if self.interval_ms == 0 || self.interval_ms > MAX_REPORT_INTERVAL_MS {
            return invalid(
                "interval_ms",
                format!("{} is out of range", self.interval_ms),
            );
        }
        if self.at_ms == 0 {
            return invalid("at_ms", "is missing".to_owned());
        }
        let fraction = [("cpu", self.cpu), ("memory", self.memory)];
        for (field, value) in fraction {
            if let Some(x) = value {
                if !(x.is_finite() && (0.0..=1.0).contains(&x)) {
                    return invalid(field, format!("{x} is not between 0 and 1"));
                }
            }
        }
        let amounts = [
            ("load1", self.load1),
            ("net_rx_bytes_per_s", self.net_rx_bytes_per_s),
            ("net_tx_bytes_per_s", self.net_tx_bytes_per_s),
            ("requests_per_s", self.requests_per_s),
            ("latency_p50_ms", self.latency_p50_ms),
            ("latency_p99_ms", self.latency_p99_ms),
            ("errors_per_s", self.errors_per_s),
        ];
        for (field, value) in amounts {
            if let Some(x) = value {
                if !(x.is_finite() && x >= 0.0) {
                    return invalid(field, format!("{x} is not a finite amount"));
                }
            }
        }
        if self.concurrency == Some(0) {
            return invalid(
                "concurrency",
                "is 0: a server works on at least one".to_owned(),
            );
        }
        if let (Some(p50), Some(p99)) = (self.latency_p50_ms, self.latency_p99_ms) {
            if p50 > p99 {
                return invalid(
                    "latency_p50_ms",
                    format!("{p50} is above latency_p99_ms {p99}"),
                );
            }
        }
        if let ReportSource::Frontend { frontend } = &self.source {
            if frontend.is_empty() || frontend.len() > 128 {
                return invalid("source.frontend", "must name the front-end".to_owned());
            }
        }
        Ok(())
    }
}

/// What a reconfiguration request asks of the allocator.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReconfigAction {
    /// Add `count` servers from the pool; with `request_type`, only servers
    /// that can serve it.
    Allocate {
        count: u32,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        request_type: Option<String>,
    },
    /// Drain a member and return it to the pool.
    Release { server: ServerId },
    /// Take an unhealthy member out of service and allocate a replacement.
    Replace { server: ServerId },
    /// Change the share of traffic front-ends send to a member
    /// (1.0 is normal, 0.0 is none).
    Reweight { server: ServerId, weight: f64 },
}

impl ReconfigAction {
    pub fn name(&self) -> &'static str {
        match self {
            ReconfigAction::Allocate { .. } => "allocate",
            ReconfigAction::Release { .. } => "release",
            ReconfigAction::Replace { .. } => "replace",
            ReconfigAction::Reweight { .. } => "reweight",
        }
    }
}

/// A request to change a cluster, sent through JetStream on
/// `headroom.reconfig.<cluster>` with `Nats-Msg-Id` set to `id`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReconfigRequest {
    #[serde(default = "crate::codec::default_schema_version")]
    pub v: u16,
    pub id: RequestId,
    pub cluster: ClusterId,
    pub action: ReconfigAction,
    /// Why it was asked, for the audit log.
    #[serde(default)]
    pub reason: String,
    /// Who asked (a monitor instance, an operator).
    #[serde(default)]
    pub origin: String,
    pub issued_ms: u64,
}
message!(ReconfigRequest, "reconfig_request");

impl ReconfigRequest {
    pub fn new(cluster: ClusterId, action: ReconfigAction, origin: impl Into<String>) -> Self {
        Self {
            v: SCHEMA_VERSION,
            id: RequestId::random(),
            cluster,
            action,
            reason: String::new(),
            origin: origin.into(),
            issued_ms: now_ms(),
        }
    }
}

/// The full membership of a cluster after a change, published on
/// `headroom.membership.<cluster>`. `generation` grows by exactly one per
/// change, so a receiver that sees a jump knows it missed one and reloads
/// the cluster record from KV. With the policy it carries everything a
/// front-end routes by, so front-ends follow this subject rather than a
/// KV watch each (a JetStream consumer per front-end, which nats-server
/// caps at 1,000 per stream by default).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MembershipChange {
    #[serde(default = "crate::codec::default_schema_version")]
    pub v: u16,
    pub cluster: ClusterId,
    pub generation: u64,
    /// KV revision of the cluster record that holds this membership.
    pub revision: u64,
    #[serde(default)]
    pub members: Vec<Member>,
    /// The cluster's policy at this generation (routes and request types);
    /// absent from an older allocator's message, whose receiver then reads
    /// the record from KV.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy: Option<ClusterPolicy>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cause: Option<RequestId>,
    pub at_ms: u64,
}
message!(MembershipChange, "membership_change");

/// A front-end's word that it routes by a membership generation, on
/// `headroom.frontend.<cluster>.<instance>.applied`: sent when it applies a
/// new one, and again every report interval, so its silence (three
/// intervals) says it is gone.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FrontendApplied {
    #[serde(default = "crate::codec::default_schema_version")]
    pub v: u16,
    pub cluster: ClusterId,
    /// The front-end's instance name.
    pub frontend: String,
    /// The membership generation its routing table holds.
    pub generation: u64,
    /// How often it says so.
    pub interval_ms: u32,
    pub at_ms: u64,
    /// What it still has open with each member its table has as draining:
    /// the evidence a drain ends on.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub draining: Vec<DrainingMember>,
}
message!(FrontendApplied, "frontend_applied");

/// A front-end's word on the demand it sees for its cluster, on
/// `headroom.metrics.<cluster>._demand`: every report interval, and at
/// once when it starts holding requests for a cluster with no member. The
/// monitor scales a cluster up from zero on it, and lets the last member
/// go only after no front-end has seen a request for a while.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FrontendDemand {
    #[serde(default = "crate::codec::default_schema_version")]
    pub v: u16,
    pub cluster: ClusterId,
    pub frontend: String,
    /// Requests it holds now, waiting for a member.
    pub held: u32,
    /// Every request it was sent (cache hits too), per second, over its
    /// last interval.
    pub requests_per_s: f64,
    pub interval_ms: u32,
    pub at_ms: u64,
}
message!(FrontendDemand, "frontend_demand");

impl FrontendDemand {
    /// # Errors
    /// A [`codes::INVALID`] error naming the first bad field.
    pub fn validate(&self) -> Result<(), BusError> {
        let invalid = |field: &str, why: String| {
            Err(BusError::new(
                codes::INVALID,
                format!("demand from {}: {field} {why}", self.frontend),
            ))
        };
        if self.frontend.is_empty() {
            return invalid("frontend", "is missing".to_owned());
        }
        if self.interval_ms == 0 || self.interval_ms > MAX_REPORT_INTERVAL_MS {
            return invalid(
                "interval_ms",
                format!("{} is out of range", self.interval_ms),
            );
        }
        if !(self.requests_per_s.is_finite() && self.requests_per_s >= 0.0) {
            return invalid(
                "requests_per_s",
                format!("{} is not a rate", self.requests_per_s),
            );
        }
        Ok(())
    }
}

/// One front-end's open work with a draining member. Draining members get
/// no new requests; those already sent still count.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DrainingMember {
    pub server: ServerId,
    /// Requests in flight to it, WebSocket tunnels among them.
    pub in_flight: u32,
    /// Of those, open WebSocket tunnels.
    #[serde(default)]
    pub tunnels: u32,
    /// Answers it has had from it, ever: unchanged over a report interval
    /// with nothing in flight, nothing reached it in that interval.
    pub answered: u64,
}

impl MembershipChange {
    pub fn of(record: &ClusterRecord, revision: u64, cause: Option<RequestId>) -> Self {
        Self {
            v: SCHEMA_VERSION,
            cluster: record.id.clone(),
            generation: record.generation,
            revision,
            members: record.members.clone(),
            policy: Some(record.policy.clone()),
            cause,
            at_ms: now_ms(),
        }
    }

    /// The cluster record as far as routing goes (members, policy and
    /// generation; not the allocator's change log), when the message
    /// carries the policy.
    pub fn routing_record(&self) -> Option<ClusterRecord> {
        let policy = self.policy.clone()?;
        let mut record = ClusterRecord::new(self.cluster.clone(), policy, self.at_ms);
        record.members.clone_from(&self.members);
        record.generation = self.generation;
        Some(record)
    }
}

/// What happened to a server, told to it on `headroom.assign.<server>`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Assignment {
    /// It now serves the cluster: warm up and report ready.
    Allocated,
    /// Front-ends stop sending it new requests; finish in-flight work and
    /// report drained before the deadline.
    Draining { deadline_ms: u64 },
    /// It is back in the free pool.
    Released,
    /// It was taken out of service (stopped reporting, failed a hook).
    OutOfService { reason: String },
}

impl Assignment {
    pub fn name(&self) -> &'static str {
        match self {
            Assignment::Allocated => "allocated",
            Assignment::Draining { .. } => "draining",
            Assignment::Released => "released",
            Assignment::OutOfService { .. } => "out_of_service",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AssignmentNotice {
    #[serde(default = "crate::codec::default_schema_version")]
    pub v: u16,
    pub server: ServerId,
    pub cluster: ClusterId,
    pub assignment: Assignment,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request: Option<RequestId>,
    pub at_ms: u64,
}
message!(AssignmentNotice, "assignment_notice");

/// A server's answer to an assignment, on `headroom.status.<server>`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ServerStatusKind {
    /// The allocate hook succeeded; the server can take traffic.
    Ready,
    /// No request in flight any more; the release can complete.
    Drained,
    /// A hook failed.
    Failed { reason: String },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ServerStatus {
    #[serde(default = "crate::codec::default_schema_version")]
    pub v: u16,
    pub server: ServerId,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster: Option<ClusterId>,
    pub status: ServerStatusKind,
    pub at_ms: u64,
}
message!(ServerStatus, "server_status");

/// What an audit event records.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EventKind {
    Registered,
    Deregistered,
    PolicyUpdated,
    Allocated,
    DrainStarted,
    Released,
    OutOfService,
    Reweighted,
    /// State that a crash left half-written was completed or undone.
    Repaired,
    /// A request could not be applied (in whole or in part).
    Rejected {
        error: BusError,
    },
    /// The monitor decided to change a cluster; `detail` holds the decision
    /// and the window values that caused it.
    Decided,
    /// Every live front-end of the cluster routes by a generation that
    /// holds the request's change; `detail` says how long after the
    /// decision, and by which front-ends.
    Confirmed,
    /// A request's change was not applied by every live front-end within
    /// the confirmation deadline; `detail` names those behind and the
    /// generation each routes by.
    Lagging,
    /// A monitor instance took a shard's lease: it decides for the shard's
    /// clusters from `at_ms`. `detail` names the shard.
    ShardTaken,
    /// A monitor instance stopped deciding for a shard at `at_ms` (handed
    /// over, stopping, or its lease could not be renewed in time).
    ShardLeft,
}

impl EventKind {
    /// The last subject token of the event: `headroom.events.<cluster>.<this>`.
    pub fn token(&self) -> &'static str {
        match self {
            EventKind::Registered => "registered",
            EventKind::Deregistered => "deregistered",
            EventKind::PolicyUpdated => "policy_updated",
            EventKind::Allocated => "allocated",
            EventKind::DrainStarted => "drain_started",
            EventKind::Released => "released",
            EventKind::OutOfService => "out_of_service",
            EventKind::Reweighted => "reweighted",
            EventKind::Repaired => "repaired",
            EventKind::Rejected { .. } => "rejected",
            EventKind::Decided => "decided",
            EventKind::Confirmed => "confirmed",
            EventKind::Lagging => "lagging",
            EventKind::ShardTaken => "shard_taken",
            EventKind::ShardLeft => "shard_left",
        }
    }
}

/// One entry of the audit log, kept in the `HEADROOM_EVENTS` stream.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AuditEvent {
    #[serde(default = "crate::codec::default_schema_version")]
    pub v: u16,
    pub kind: EventKind,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster: Option<ClusterId>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server: Option<ServerId>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request: Option<RequestId>,
    #[serde(default)]
    pub detail: String,
    /// The service instance that wrote it.
    #[serde(default)]
    pub origin: String,
    pub at_ms: u64,
}
message!(AuditEvent, "audit_event");

// ---- the allocator's admin endpoints (NATS services API) ----

/// `headroom.admin.pool.register`: add a server to the free pool.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RegisterServer {
    #[serde(default = "crate::codec::default_schema_version")]
    pub v: u16,
    pub id: ServerId,
    pub address: String,
    pub port: u16,
    #[serde(default)]
    pub request_types: Vec<String>,
}
message!(RegisterServer, "register_server");

/// `headroom.admin.pool.deregister`: remove a free or out-of-service server.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeregisterServer {
    #[serde(default = "crate::codec::default_schema_version")]
    pub v: u16,
    pub id: ServerId,
}
message!(DeregisterServer, "deregister_server");

/// `headroom.admin.cluster.put`: create a cluster or change its policy.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PutCluster {
    #[serde(default = "crate::codec::default_schema_version")]
    pub v: u16,
    pub id: ClusterId,
    pub policy: ClusterPolicy,
}
message!(PutCluster, "put_cluster");

/// `headroom.admin.cluster.get`: one cluster's record.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GetCluster {
    #[serde(default = "crate::codec::default_schema_version")]
    pub v: u16,
    pub id: ClusterId,
}
message!(GetCluster, "get_cluster");

/// `headroom.admin.member.drain`: release a member by hand.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DrainMember {
    #[serde(default = "crate::codec::default_schema_version")]
    pub v: u16,
    pub cluster: ClusterId,
    pub server: ServerId,
}
message!(DrainMember, "drain_member");

/// The answer to `member.drain`: the release request it queued.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DrainQueued {
    #[serde(default = "crate::codec::default_schema_version")]
    pub v: u16,
    pub request: RequestId,
}
message!(DrainQueued, "drain_queued");

/// The answer to `pool.list`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ServerList {
    #[serde(default = "crate::codec::default_schema_version")]
    pub v: u16,
    #[serde(default)]
    pub servers: Vec<ServerRecord>,
}
message!(ServerList, "server_list");

/// The answer to `cluster.list`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClusterList {
    #[serde(default = "crate::codec::default_schema_version")]
    pub v: u16,
    #[serde(default)]
    pub clusters: Vec<ClusterRecord>,
}
message!(ClusterList, "cluster_list");

/// An empty request or answer, for endpoints that need no body.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Empty {
    #[serde(default = "crate::codec::default_schema_version")]
    pub v: u16,
}
message!(Empty, "empty");

impl Empty {
    pub fn new() -> Self {
        Self { v: SCHEMA_VERSION }
    }
}

/// Header of an admin error reply: the stable code (the services API puts
/// its own numeric code and description beside it).
pub const ERROR_CODE_HEADER: &str = "Headroom-Error-Code";

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::{Codec, Message, WireError};
    use crate::records::{MemberState, Route, ServerState};

    fn cluster() -> ClusterId {
        ClusterId::new("web").expect("id")
    }
    fn server(n: u32) -> ServerId {
        ServerId::new(format!("s{n}")).expect("id")
    }
    fn member(n: u32, state: MemberState) -> Member {
        Member {
            server: server(n),
            address: "10.0.0.1".into(),
            port: 8080,
            request_types: vec!["static".into(), "api".into()],
            state,
            weight: 0.5,
            request: RequestId::new("r1").expect("id"),
            drain_request: Some(RequestId::new("r2").expect("id")),
            since_ms: 1_700_000_000_000,
            joined: 3,
        }
    }
    fn record() -> ClusterRecord {
        let mut record = ClusterRecord::new(
            cluster(),
            ClusterPolicy {
                routes: vec![Route {
                    request_type: "static".into(),
                    path_prefix: Some("/static".into()),
                    host: None,
                    methods: vec!["GET".into(), "HEAD".into()],
                    balance: crate::records::Balance::Hash,
                }],
                ..ClusterPolicy::default()
            },
            5,
        );
        record.members = vec![
            member(1, MemberState::Active),
            member(2, MemberState::Draining),
        ];
        record.generation = 7;
        record
    }

    fn round_trip<T: Message + std::fmt::Debug + PartialEq>(message: &T) {
        for codec in Codec::ALL {
            let bytes = codec.encode(message).expect("encode");
            let back: T = codec
                .decode(&bytes)
                .unwrap_or_else(|e| panic!("{codec:?}: {e}\n{}", String::from_utf8_lossy(&bytes)));
            assert_eq!(&back, message, "{codec:?}");
        }
    }

    #[test]
    fn every_message_round_trips_in_every_codec() {
        let report = PerformanceReport {
            v: 1,
            server: server(1),
            cluster: Some(cluster()),
            source: ReportSource::Frontend {
                frontend: "fe-1".into(),
            },
            at_ms: 12,
            interval_ms: 1000,
            cpu: Some(0.5),
            memory: None,
            load1: Some(1.25),
            net_rx_bytes_per_s: None,
            net_tx_bytes_per_s: None,
            in_flight: Some(3),
            queued: Some(1),
            concurrency: Some(8),
            requests_per_s: Some(120.0),
            latency_p50_ms: Some(2.0),
            latency_p99_ms: Some(9.5),
            errors_per_s: None,
            ejected: Some(true),
        };
        round_trip(&report);
        round_trip(&PerformanceReport {
            source: ReportSource::Agent,
            cluster: None,
            ..report
        });
        for action in [
            ReconfigAction::Allocate {
                count: 2,
                request_type: Some("api".into()),
            },
            ReconfigAction::Allocate {
                count: 1,
                request_type: None,
            },
            ReconfigAction::Release { server: server(3) },
            ReconfigAction::Replace { server: server(3) },
            ReconfigAction::Reweight {
                server: server(3),
                weight: 0.25,
            },
        ] {
            round_trip(&ReconfigRequest::new(cluster(), action, "monitor-1"));
        }
        round_trip(&MembershipChange::of(
            &record(),
            42,
            Some(RequestId::random()),
        ));
        round_trip(&MembershipChange::of(
            &ClusterRecord::new(cluster(), ClusterPolicy::default(), 0),
            1,
            None,
        ));
        round_trip(&FrontendDemand {
            v: SCHEMA_VERSION,
            cluster: cluster(),
            frontend: "fe-1".into(),
            held: 3,
            requests_per_s: 12.5,
            interval_ms: 1000,
            at_ms: 12,
        });
        round_trip(&FrontendApplied {
            v: SCHEMA_VERSION,
            cluster: cluster(),
            frontend: "fe-1".into(),
            generation: 7,
            interval_ms: 1000,
            at_ms: 12,
            draining: vec![DrainingMember {
                server: ServerId::new("s1").expect("id"),
                in_flight: 2,
                tunnels: 1,
                answered: 40,
            }],
        });
        for assignment in [
            Assignment::Allocated,
            Assignment::Draining { deadline_ms: 9 },
            Assignment::Released,
            Assignment::OutOfService {
                reason: "silent".into(),
            },
        ] {
            round_trip(&AssignmentNotice {
                v: 1,
                server: server(1),
                cluster: cluster(),
                assignment,
                request: None,
                at_ms: 3,
            });
        }
        for status in [
            ServerStatusKind::Ready,
            ServerStatusKind::Drained,
            ServerStatusKind::Failed {
                reason: "hook exited 1".into(),
            },
        ] {
            round_trip(&ServerStatus {
                v: 1,
                server: server(1),
                cluster: Some(cluster()),
                status,
                at_ms: 3,
            });
        }
        for kind in [
            EventKind::Allocated,
            EventKind::Rejected {
                error: BusError::new(codes::POOL_EXHAUSTED, "no free server serves api"),
            },
        ] {
            round_trip(&AuditEvent {
                v: 1,
                kind,
                cluster: Some(cluster()),
                server: None,
                request: Some(RequestId::random()),
                detail: "x".into(),
                origin: "alloc-1".into(),
                at_ms: 1,
            });
        }
        round_trip(&record());
        round_trip(&ServerList {
            v: 1,
            servers: vec![
                ServerRecord {
                    v: 1,
                    id: server(1),
                    address: "h".into(),
                    port: 1,
                    request_types: vec![],
                    state: ServerState::Draining {
                        cluster: cluster(),
                        deadline_ms: 4,
                    },
                    last_request: None,
                    last_cluster: Some(cluster()),
                    updated_ms: 2,
                    agent: false,
                },
                ServerRecord {
                    v: 1,
                    id: server(2),
                    address: "h".into(),
                    port: 1,
                    request_types: vec!["api".into()],
                    state: ServerState::Free,
                    last_request: Some(RequestId::random()),
                    last_cluster: None,
                    updated_ms: 2,
                    agent: false,
                },
            ],
        });
        round_trip(&ClusterList {
            v: 1,
            clusters: vec![record(), record()],
        });
        round_trip(&PutCluster {
            v: 1,
            id: cluster(),
            policy: ClusterPolicy::default(),
        });
        round_trip(&Empty::new());
    }

    #[test]
    fn json_and_xml_are_readable_by_people() {
        let req = ReconfigRequest::new(
            cluster(),
            ReconfigAction::Release { server: server(4) },
            "op",
        );
        let xml = String::from_utf8(Codec::Xml.encode(&req).expect("xml").to_vec()).expect("utf8");
        assert!(xml.starts_with("<reconfig_request>"), "{xml}");
        assert!(xml.contains("<server>s4</server>"), "{xml}");
        let json =
            String::from_utf8(Codec::Json.encode(&req).expect("json").to_vec()).expect("utf8");
        assert!(json.contains(r#""release":{"server":"s4"}"#), "{json}");
    }

    #[test]
    fn msgpack_uses_field_names() {
        let bytes = crate::codec::encode(&Empty::new()).expect("encode");
        assert_eq!(bytes.as_ref(), &[0x81, 0xa1, b'v', 0x01]);
    }

    #[test]
    fn the_header_picks_the_codec() {
        let req = ReconfigRequest::new(
            cluster(),
            ReconfigAction::Allocate {
                count: 1,
                request_type: None,
            },
            "op",
        );
        let json = Codec::Json.encode(&req).expect("json");
        let headers = Codec::Json.headers();
        assert_eq!(
            crate::codec::decode::<ReconfigRequest>(Some(&headers), &json),
            Ok(req.clone())
        );
        // Without a header, the body is read as MessagePack and JSON fails.
        assert!(matches!(
            crate::codec::decode::<ReconfigRequest>(None, &json),
            Err(WireError::Malformed { .. })
        ));
        let mut odd = async_nats::HeaderMap::new();
        odd.insert(crate::codec::CONTENT_TYPE, "text/plain");
        assert!(matches!(
            crate::codec::decode::<ReconfigRequest>(Some(&odd), &json),
            Err(WireError::UnknownContentType(_))
        ));
        let mut charset = async_nats::HeaderMap::new();
        charset.insert(
            crate::codec::CONTENT_TYPE,
            "application/json; charset=utf-8",
        );
        assert!(crate::codec::decode::<ReconfigRequest>(Some(&charset), &json).is_ok());
    }

    #[test]
    fn garbage_and_future_versions_are_clear_errors() {
        for body in [&b""[..], b"\xc1\xff\x00", b"{", b"<reconfig_request>"] {
            for codec in Codec::ALL {
                let err = codec.decode::<ReconfigRequest>(body).expect_err("garbage");
                assert_eq!(err.code(), codes::MALFORMED, "{codec:?} {err}");
            }
        }
        let mut req = ReconfigRequest::new(
            cluster(),
            ReconfigAction::Release { server: server(1) },
            "op",
        );
        req.v = 2;
        let bytes = crate::codec::encode(&req).expect("encode");
        let err = Codec::MsgPack
            .decode::<ReconfigRequest>(&bytes)
            .expect_err("version 2");
        assert_eq!(err.code(), codes::UNSUPPORTED_VERSION);
        assert!(err.to_string().contains("version 2"), "{err}");
    }

    #[test]
    fn ids_in_bodies_are_validated() {
        let json = br#"{"v":1,"id":"r1","cluster":"a.>","action":{"release":{"server":"s1"}},"issued_ms":1}"#;
        let err = Codec::Json
            .decode::<ReconfigRequest>(json)
            .expect_err("wildcard id");
        assert!(err.to_string().contains("cluster id"), "{err}");
    }
}
