//! The records Headroom keeps in JetStream KV (see [`crate::kv`] for the
//! buckets): where each server is, each cluster's policy and members, and
//! the monitors' shard leases.

use serde::{Deserialize, Serialize};

use crate::codec::{message, SCHEMA_VERSION};
use crate::ids::{ClusterId, RequestId, ServerId};

/// Where a server is. Exactly one of these at any time.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ServerState {
    /// In the free pool, ready to be allocated.
    Free,
    /// Serving a cluster (or about to: see the cluster's member entry).
    Allocated { cluster: ClusterId },
    /// Leaving a cluster: no new requests; back to the pool by the deadline.
    Draining {
        cluster: ClusterId,
        deadline_ms: u64,
    },
    /// Unhealthy; kept out of the pool until an operator returns it.
    OutOfService { reason: String },
}

impl ServerState {
    /// The cluster this state ties the server to, if any.
    pub fn cluster(&self) -> Option<&ClusterId> {
        match self {
            ServerState::Allocated { cluster } | ServerState::Draining { cluster, .. } => {
                Some(cluster)
            }
            ServerState::Free | ServerState::OutOfService { .. } => None,
        }
    }

    /// Whether it is draining from `cluster`.
    pub fn is_draining_from(&self, cluster: &ClusterId) -> bool {
        matches!(self, ServerState::Draining { cluster: c, .. } if c == cluster)
    }

    pub fn name(&self) -> &'static str {
        match self {
            ServerState::Free => "free",
            ServerState::Allocated { .. } => "allocated",
            ServerState::Draining { .. } => "draining",
            ServerState::OutOfService { .. } => "out_of_service",
        }
    }
}

/// A server, in `headroom-servers`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ServerRecord {
    #[serde(default = "crate::codec::default_schema_version")]
    pub v: u16,
    pub id: ServerId,
    /// Host name or IP the front-ends connect to.
    pub address: String,
    pub port: u16,
    /// The request types this server can serve.
    #[serde(default)]
    pub request_types: Vec<String>,
    pub state: ServerState,
    /// The request whose step last changed this record, so a retried
    /// request recognises its own write.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_request: Option<RequestId>,
    /// The cluster it served last: allocating it there again finds a warm
    /// cache.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_cluster: Option<ClusterId>,
    pub updated_ms: u64,
    /// It registered itself (its agent, on its own subject): a drain of it
    /// ends only once its agent, too, has seen nothing in flight.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub agent: bool,
}
message!(ServerRecord, "server_record");

impl ServerRecord {
    /// A server new to the pool: free, never allocated.
    pub fn new_free(
        id: ServerId,
        address: String,
        port: u16,
        request_types: Vec<String>,
        now_ms: u64,
    ) -> Self {
        Self {
            v: SCHEMA_VERSION,
            id,
            address,
            port,
            request_types,
            state: ServerState::Free,
            last_request: None,
            last_cluster: None,
            updated_ms: now_ms,
            agent: false,
        }
    }

    /// Whether this server can serve any of `types` (any server fits a
    /// cluster that names no request types).
    pub fn serves_any(&self, types: &[String]) -> bool {
        types.is_empty() || types.iter().any(|t| self.request_types.contains(t))
    }

    /// How many of `types` it serves.
    pub fn coverage(&self, types: &[String]) -> usize {
        types
            .iter()
            .filter(|t| self.request_types.contains(t))
            .count()
    }
}

/// A member's place in the routing view.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MemberState {
    /// Reserved for an allocation in progress: no traffic yet.
    Joining,
    /// Takes traffic.
    Active,
    /// Takes no new requests; in-flight ones finish.
    Draining,
}

impl MemberState {
    pub fn name(&self) -> &'static str {
        match self {
            MemberState::Joining => "joining",
            MemberState::Active => "active",
            MemberState::Draining => "draining",
        }
    }
}

/// One member of a cluster, as front-ends route to it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Member {
    pub server: ServerId,
    pub address: String,
    pub port: u16,
    #[serde(default)]
    pub request_types: Vec<String>,
    pub state: MemberState,
    /// Relative share of traffic; 1.0 is normal.
    pub weight: f64,
    /// The request that added it (never changes: a redelivered allocation
    /// counts the entries it already made by this).
    pub request: RequestId,
    /// The release that is draining it, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub drain_request: Option<RequestId>,
    /// When it entered its current state.
    pub since_ms: u64,
    /// The cluster generation whose write reserved this entry. With the
    /// server id it names this join and no other: a server that leaves
    /// and joins again comes back under a higher one, so a request can
    /// tell the entry it acted on from a later one for the same server.
    #[serde(default)]
    pub joined: u64,
}

impl Member {
    /// This entry's join: which server, reserved at which generation.
    pub fn join(&self) -> Join {
        Join {
            server: self.server.clone(),
            joined: self.joined,
        }
    }
}

/// One join of a server to a cluster: the server and the generation of the
/// cluster write that reserved its entry. Requests count their effects in
/// joins, not servers, because one server may leave and join again.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Join {
    pub server: ServerId,
    pub joined: u64,
}

/// Which requests a cluster's front-ends send to members serving
/// `request_type`. Rules are matched in order; empty fields match anything.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Route {
    pub request_type: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path_prefix: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    #[serde(default)]
    pub methods: Vec<String>,
    /// How front-ends choose among the members serving this type.
    #[serde(default)]
    pub balance: Balance,
}

/// How a front-end chooses a member for a request.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Balance {
    /// Weighted least outstanding requests (power of two choices).
    #[default]
    LeastRequests,
    /// Weighted rendezvous hashing on the path with bounded load: a path
    /// keeps going to the same member (its cache stays warm) unless that
    /// member is over 1.25 times the average load.
    Hash,
}

/// When the monitor scales a cluster. Utilisation is 0.0 to 1.0.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct ScalingPolicy {
    /// Scale up once utilisation has stayed above this for `sustain_ms`.
    pub upper: f64,
    /// A member may go once it has stayed below this for `release_sustain_ms`.
    pub lower: f64,
    /// The utilisation a scale-up aims for: desired = ceil(load / target).
    pub target: f64,
    pub sustain_ms: u64,
    pub release_sustain_ms: u64,
    pub cooldown_up_ms: u64,
    pub cooldown_down_ms: u64,
    /// Most servers one scale-up may ask for.
    pub max_step: u32,
    /// Which measures make up a server's utilisation, and their weights.
    pub measures: Measures,
    /// A member that has sent no report for this long is unhealthy and is
    /// replaced (never released: silence is not idleness).
    pub silent_after_ms: u64,
    /// Utilisation, as a multiple of `target`, that is a large overload:
    /// held for two evaluations, it scales up without waiting out
    /// `sustain_ms` (Knative's panic mode starts at the same 200 %).
    /// 0 turns it off.
    pub panic_ratio: f64,
    /// Size a scale-up for the load expected when it can next act (the
    /// window's trend carried `cooldown_up_ms` ahead, at most twice the
    /// held load) rather than for the least load of the window.
    pub project_rise: bool,
    /// How long a member's arrival, written but not yet confirmed by every
    /// live front-end, holds the next scale-up back: cooldowns run from
    /// confirmation, and until then traffic has not followed the change.
    /// Past it, the cooldown runs from the write, as without confirmation.
    pub confirm_wait_ms: u64,
    /// With `min_size` 0: the last member goes once no front-end has seen
    /// a request for this long. 0 (the default) keeps it.
    pub idle_to_zero_ms: u64,
}

/// How a server's utilisation is computed from its report: a weighted mean
/// of the measures that are present, each scaled so 1.0 is "full". A
/// measure with weight 0 is ignored; when none of the weighted measures is
/// known, the utilisation is unknown.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Measures {
    /// Weight of CPU busy (already 0..1).
    pub cpu: f64,
    /// Weight of requests in flight, scaled by `in_flight_capacity`.
    pub in_flight: f64,
    /// Requests in flight one server handles at full utilisation.
    pub in_flight_capacity: f64,
    /// Weight of p99 latency, scaled by `latency_slo_ms`.
    pub latency: f64,
    /// The p99 latency that counts as full utilisation.
    pub latency_slo_ms: f64,
}

/// What a server's load is judged from, as its agent reports it or the
/// front-ends see it; `None` for what is not known.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Reading {
    /// CPU busy, 0..1.
    pub cpu: Option<f64>,
    /// Requests in flight, queued ones among them.
    pub in_flight: Option<u32>,
    /// How many requests it works on at once, when it says.
    pub concurrency: Option<u32>,
    pub latency_p99_ms: Option<f64>,
}

/// Scaled measures are capped here so one absurd latency cannot dominate.
pub const MEASURE_CAP: f64 = 4.0;

impl Measures {
    /// A server's utilisation: the weighted mean of the measures known in
    /// `reading`, `None` when none of the weighted ones is. Requests in
    /// flight count against the server's own `concurrency` when it
    /// reports one, else against `in_flight_capacity`; queued requests are
    /// in flight, so a server past its capacity reads above 1.
    pub fn utilisation(&self, reading: &Reading) -> Option<f64> {
        let capacity = reading
            .concurrency
            .filter(|c| *c > 0)
            .map_or(self.in_flight_capacity, f64::from);
        let parts = [
            (self.cpu, reading.cpu),
            (
                self.in_flight,
                reading.in_flight.map(|n| f64::from(n) / capacity),
            ),
            (
                self.latency,
                reading.latency_p99_ms.map(|l| l / self.latency_slo_ms),
            ),
        ];
        let (mut sum, mut weights) = (0.0, 0.0);
        for (weight, value) in parts {
            if let (true, Some(value)) = (weight > 0.0, value) {
                sum += weight * value.min(MEASURE_CAP);
                weights += weight;
            }
        }
        (weights > 0.0).then(|| sum / weights)
    }
}

impl Default for Measures {
    fn default() -> Self {
        Self {
            cpu: 1.0,
            in_flight: 0.0,
            in_flight_capacity: 64.0,
            latency: 0.0,
            latency_slo_ms: 250.0,
        }
    }
}

impl Default for ScalingPolicy {
    fn default() -> Self {
        Self {
            upper: 0.75,
            lower: 0.30,
            target: 0.60,
            sustain_ms: 2_000,
            release_sustain_ms: 30_000,
            cooldown_up_ms: 10_000,
            cooldown_down_ms: 60_000,
            max_step: 4,
            measures: Measures::default(),
            silent_after_ms: 10_000,
            panic_ratio: 2.0,
            project_rise: true,
            confirm_wait_ms: 15_000,
            idle_to_zero_ms: 0,
        }
    }
}

/// A cluster's policy, set by operators through the admin API.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClusterPolicy {
    pub min_size: u32,
    pub max_size: u32,
    /// Request-type routing; the request types it names are the ones a
    /// server must serve (at least one of) to be allocated here.
    #[serde(default)]
    pub routes: Vec<Route>,
    #[serde(default)]
    pub scaling: ScalingPolicy,
    /// Longest a release waits for a member to drain.
    #[serde(default = "default_drain_timeout_ms")]
    pub drain_timeout_ms: u64,
}

fn default_drain_timeout_ms() -> u64 {
    30_000
}

impl Default for ClusterPolicy {
    fn default() -> Self {
        Self {
            min_size: 1,
            max_size: 10,
            routes: Vec::new(),
            scaling: ScalingPolicy::default(),
            drain_timeout_ms: default_drain_timeout_ms(),
        }
    }
}

/// Why a policy is refused.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("policy.{field}: {reason}")]
pub struct PolicyError {
    pub field: &'static str,
    pub reason: String,
}

/// A policy file that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum PolicyFileError {
    #[error("cannot read {path}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is not a usable policy: {reason}")]
    Invalid { path: String, reason: String },
}

impl ClusterPolicy {
    /// Reads a policy from a TOML or JSON file, and checks it.
    ///
    /// # Errors
    /// The file cannot be read, is neither, or the policy is invalid.
    pub fn read(path: &std::path::Path) -> Result<Self, PolicyFileError> {
        let shown = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| PolicyFileError::Read {
            path: shown.clone(),
            source,
        })?;
        let bad = |reason: String| PolicyFileError::Invalid {
            path: shown.clone(),
            reason,
        };
        let policy: Self = if text.trim_start().starts_with('{') {
            serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?
        } else {
            toml::from_str(&text).map_err(|e| bad(e.to_string()))?
        };
        policy.validate().map_err(|e| bad(e.to_string()))?;
        Ok(policy)
    }

    /// The distinct request types the routes name, in order.
    pub fn request_types(&self) -> Vec<String> {
        let mut types: Vec<String> = Vec::new();
        for route in &self.routes {
            if !types.contains(&route.request_type) {
                types.push(route.request_type.clone());
            }
        }
        types
    }

    /// # Errors
    /// The first field that is out of range, by name.
    pub fn validate(&self) -> Result<(), PolicyError> {
        let err = |field, reason: String| Err(PolicyError { field, reason });
        if self.max_size == 0 {
            return err("max_size", "must be at least 1".into());
        }
        if self.min_size > self.max_size {
            return err(
                "min_size",
                format!("{} is above max_size {}", self.min_size, self.max_size),
            );
        }
        let s = &self.scaling;
        for (field, value) in [
            ("scaling.upper", s.upper),
            ("scaling.lower", s.lower),
            ("scaling.target", s.target),
        ] {
            if !(value.is_finite() && (0.0..=1.0).contains(&value)) {
                return err(field, format!("{value} is not between 0 and 1"));
            }
        }
        if s.lower >= s.upper {
            return err(
                "scaling.lower",
                format!("{} must be below scaling.upper {}", s.lower, s.upper),
            );
        }
        if s.target <= 0.0 || s.target > s.upper {
            return err(
                "scaling.target",
                format!("{} must be above 0 and at most scaling.upper", s.target),
            );
        }
        if s.max_step == 0 {
            return err("scaling.max_step", "must be at least 1".into());
        }
        if s.release_sustain_ms < s.sustain_ms {
            return err(
                "scaling.release_sustain_ms",
                "must be at least scaling.sustain_ms (releasing is the slower decision)".into(),
            );
        }
        if !(s.panic_ratio == 0.0 || (s.panic_ratio.is_finite() && s.panic_ratio >= 1.0)) {
            return err(
                "scaling.panic_ratio",
                format!("{} must be 0 (off) or at least 1", s.panic_ratio),
            );
        }
        if s.silent_after_ms < 1_000 {
            return err("scaling.silent_after_ms", "must be at least 1000".into());
        }
        // The monitor keeps a confirmation ten minutes.
        if s.confirm_wait_ms > 600_000 {
            return err("scaling.confirm_wait_ms", "must be at most 600000".into());
        }
        let m = &s.measures;
        for (field, weight) in [
            ("scaling.measures.cpu", m.cpu),
            ("scaling.measures.in_flight", m.in_flight),
            ("scaling.measures.latency", m.latency),
        ] {
            if !(weight.is_finite() && weight >= 0.0) {
                return err(field, format!("weight {weight} must be 0 or more"));
            }
        }
        if m.cpu + m.in_flight + m.latency <= 0.0 {
            return err(
                "scaling.measures",
                "at least one weight must be above 0".into(),
            );
        }
        for (field, scale) in [
            ("scaling.measures.in_flight_capacity", m.in_flight_capacity),
            ("scaling.measures.latency_slo_ms", m.latency_slo_ms),
        ] {
            if !(scale.is_finite() && scale > 0.0) {
                return err(field, format!("{scale} must be above 0"));
            }
        }
        if self.drain_timeout_ms == 0 {
            return err("drain_timeout_ms", "must be above 0".into());
        }
        for (i, route) in self.routes.iter().enumerate() {
            if route.request_type.is_empty() {
                return err("routes", format!("route {i} has an empty request_type"));
            }
        }
        Ok(())
    }
}

/// What a request did to a member, remembered in the cluster record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MemberChange {
    Allocated,
    DrainStarted,
}

/// One entry of a cluster's log of recent member changes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecentChange {
    pub request: RequestId,
    pub server: ServerId,
    pub change: MemberChange,
    /// The generation of the entry it changed ([`Member::joined`]).
    #[serde(default)]
    pub joined: u64,
    /// The generation of the cluster write that recorded it.
    #[serde(default)]
    pub generation: u64,
}

impl RecentChange {
    pub fn join(&self) -> Join {
        Join {
            server: self.server.clone(),
            joined: self.joined,
        }
    }
}

/// How many member changes a cluster record remembers. A request delivered
/// again finds its own earlier joins here after the members have left;
/// [`ClusterRecord::complete_after`] says when the log no longer reaches
/// back far enough for that, so a redelivery can stop instead of guessing.
pub const RECENT_CHANGES: usize = 128;

/// A cluster, in `headroom-clusters`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClusterRecord {
    #[serde(default = "crate::codec::default_schema_version")]
    pub v: u16,
    pub id: ClusterId,
    pub policy: ClusterPolicy,
    #[serde(default)]
    pub members: Vec<Member>,
    /// Grows by one on every change of this record; membership messages
    /// carry it so a receiver can see that it missed one.
    pub generation: u64,
    /// The last [`RECENT_CHANGES`] allocations and drains, oldest first,
    /// written in the same compare-and-set as the change itself.
    #[serde(default)]
    pub recent: Vec<RecentChange>,
    /// `recent` holds every change written at a generation above this one:
    /// the highest generation among the changes it has forgotten.
    #[serde(default)]
    pub complete_after: u64,
    pub updated_ms: u64,
}
message!(ClusterRecord, "cluster_record");

impl ClusterRecord {
    pub fn new(id: ClusterId, policy: ClusterPolicy, now_ms: u64) -> Self {
        Self {
            v: SCHEMA_VERSION,
            id,
            policy,
            members: Vec::new(),
            generation: 0,
            recent: Vec::new(),
            complete_after: 0,
            updated_ms: now_ms,
        }
    }

    /// The generation the next write of this record will have (the store
    /// advances it by one on every write).
    pub fn next_generation(&self) -> u64 {
        self.generation + 1
    }

    /// Remembers, in the write about to be made, that `request` made
    /// `change` to the join `join`.
    pub fn remember(&mut self, request: &RequestId, join: &Join, change: MemberChange) {
        self.recent.push(RecentChange {
            request: request.clone(),
            server: join.server.clone(),
            change,
            joined: join.joined,
            generation: self.next_generation(),
        });
        let excess = self.recent.len().saturating_sub(RECENT_CHANGES);
        let now = self.generation;
        for forgotten in self.recent.drain(..excess) {
            // An entry from before generations were logged (0) could be of
            // any time up to now.
            let at = if forgotten.generation == 0 {
                now
            } else {
                forgotten.generation
            };
            self.complete_after = self.complete_after.max(at);
        }
    }

    /// Whether the log still holds every change written after generation
    /// `since`.
    pub fn remembers_since(&self, since: u64) -> bool {
        self.complete_after <= since
    }

    /// Whether `request` made `change` to a join of `server` that the log
    /// still holds.
    pub fn remembers(&self, request: &RequestId, server: &ServerId, change: MemberChange) -> bool {
        self.recent
            .iter()
            .any(|r| &r.request == request && &r.server == server && r.change == change)
    }

    /// The joins `request` made to this cluster: its entries still listed
    /// (joining included), and those the log remembers that have left
    /// since. A server that left and joined again counts twice.
    pub fn joins_by(&self, request: &RequestId) -> Vec<Join> {
        let mut joins: Vec<Join> = self
            .members
            .iter()
            .filter(|m| &m.request == request)
            .map(Member::join)
            .collect();
        for r in &self.recent {
            if &r.request == request && r.change == MemberChange::Allocated {
                let join = r.join();
                if !joins.contains(&join) {
                    joins.push(join);
                }
            }
        }
        joins
    }

    pub fn member(&self, server: &ServerId) -> Option<&Member> {
        self.members.iter().find(|m| &m.server == server)
    }

    pub fn member_mut(&mut self, server: &ServerId) -> Option<&mut Member> {
        self.members.iter_mut().find(|m| &m.server == server)
    }

    /// Members that count towards the size limits: every one not draining.
    pub fn size(&self) -> usize {
        self.members
            .iter()
            .filter(|m| m.state != MemberState::Draining)
            .count()
    }

    pub fn active(&self) -> usize {
        self.members
            .iter()
            .filter(|m| m.state == MemberState::Active)
            .count()
    }
}

/// The value of `shard.<n>` in the monitors bucket: who decides for the
/// shard's clusters. A holder renews it by compare-and-set; another
/// instance may take it once its revision has not moved for a lease's
/// length, or at once when `holder` is empty (handed over).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardLease {
    pub v: u16,
    pub holder: Option<String>,
    /// When it was last written, for people reading it; expiry does not
    /// use it, so clocks need not agree.
    pub at_ms: u64,
}

message!(ShardLease, "shard_lease");

/// The value of `instance.<id>` in the monitors bucket, put at every lease
/// round: live instances share the shards evenly.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MonitorHeartbeat {
    pub v: u16,
    pub instance: String,
    pub shards: Vec<u32>,
    pub at_ms: u64,
}

message!(MonitorHeartbeat, "monitor_heartbeat");

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utilisation_is_a_weighted_mean_of_the_known_measures() {
        let reading = |cpu, in_flight, concurrency, latency_p99_ms| Reading {
            cpu,
            in_flight,
            concurrency,
            latency_p99_ms,
        };
        let measures = Measures::default;
        let cpu_only = measures();
        assert_eq!(
            cpu_only.utilisation(&reading(Some(0.5), Some(10), None, None)),
            Some(0.5)
        );
        assert_eq!(
            cpu_only.utilisation(&reading(None, Some(10), None, Some(100.0))),
            None,
            "unknown, not zero"
        );
        let mixed = Measures {
            cpu: 1.0,
            in_flight: 1.0,
            in_flight_capacity: 10.0,
            latency: 2.0,
            latency_slo_ms: 100.0,
        };
        // (0.4 + 0.5 + 2 * 0.5) / 4
        assert_eq!(
            mixed.utilisation(&reading(Some(0.4), Some(5), None, Some(50.0))),
            Some(0.475)
        );
        // Missing measures drop out of the mean instead of counting as 0.
        assert_eq!(
            mixed.utilisation(&reading(Some(0.4), None, None, None)),
            Some(0.4)
        );
        // A server that says how many it works on at once is measured
        // against that: 12 in flight (8 working, 4 queued) on 8 slots.
        let in_flight_only = Measures {
            cpu: 0.0,
            in_flight: 1.0,
            in_flight_capacity: 64.0,
            ..mixed
        };
        assert_eq!(
            in_flight_only.utilisation(&reading(None, Some(12), Some(8), None)),
            Some(1.5)
        );
        assert_eq!(
            in_flight_only.utilisation(&reading(None, Some(16), None, None)),
            Some(0.25),
            "the policy's capacity without one"
        );
        // An absurd latency is capped.
        assert_eq!(
            mixed.utilisation(&reading(None, None, None, Some(1e9))),
            Some(MEASURE_CAP)
        );
    }

    #[test]
    fn default_policy_is_valid() {
        assert_eq!(ClusterPolicy::default().validate(), Ok(()));
    }

    #[test]
    fn policy_errors_name_the_field() {
        let mut policy = ClusterPolicy {
            min_size: 5,
            max_size: 2,
            ..ClusterPolicy::default()
        };
        assert_eq!(policy.validate().map_err(|e| e.field), Err("min_size"));
        policy.min_size = 1;
        policy.scaling.lower = 0.9;
        assert_eq!(policy.validate().map_err(|e| e.field), Err("scaling.lower"));
        policy.scaling.lower = 0.1;
        policy.scaling.upper = f64::NAN;
        assert_eq!(policy.validate().map_err(|e| e.field), Err("scaling.upper"));
    }

    #[test]
    fn request_types_come_from_routes_once_each() {
        let route = |t: &str| Route {
            request_type: t.into(),
            path_prefix: None,
            host: None,
            methods: vec![],
            balance: Balance::default(),
        };
        let policy = ClusterPolicy {
            routes: vec![route("static"), route("api"), route("static")],
            ..ClusterPolicy::default()
        };
        assert_eq!(policy.request_types(), vec!["static", "api"]);
    }

    #[test]
    fn a_request_remembers_members_that_have_left() {
        let mut cluster = ClusterRecord::new(
            ClusterId::new("c").expect("id"),
            ClusterPolicy::default(),
            0,
        );
        let r = RequestId::new("r").expect("id");
        let join = |n: u32, joined: u64| Join {
            server: ServerId::new(format!("s{n}")).expect("id"),
            joined,
        };
        cluster.remember(&r, &join(1, 1), MemberChange::Allocated);
        cluster.generation += 1;
        cluster.remember(&r, &join(2, 1), MemberChange::DrainStarted);
        cluster.generation += 1;
        // s1 left and joined again for the same request: two joins.
        cluster.remember(&r, &join(1, 3), MemberChange::Allocated);
        cluster.generation += 1;
        assert_eq!(cluster.joins_by(&r), vec![join(1, 1), join(1, 3)]);
        assert!(cluster.remembers(&r, &join(2, 1).server, MemberChange::DrainStarted));
        assert!(cluster.remembers_since(0));
        for n in 0..RECENT_CHANGES as u32 {
            cluster.remember(&RequestId::random(), &join(n, 9), MemberChange::Allocated);
            cluster.generation += 1;
        }
        assert_eq!(cluster.recent.len(), RECENT_CHANGES);
        assert!(cluster.joins_by(&r).is_empty(), "the oldest are forgotten");
        assert_eq!(cluster.complete_after, 3, "and the log says how far back");
        assert!(!cluster.remembers_since(2));
        assert!(cluster.remembers_since(3));
    }

    #[test]
    fn draining_members_do_not_count_towards_size() {
        let mut cluster = ClusterRecord::new(
            ClusterId::new("c").expect("id"),
            ClusterPolicy::default(),
            0,
        );
        for (i, state) in [
            MemberState::Active,
            MemberState::Joining,
            MemberState::Draining,
        ]
        .into_iter()
        .enumerate()
        {
            cluster.members.push(Member {
                server: ServerId::new(format!("s{i}")).expect("id"),
                address: "127.0.0.1".into(),
                port: 80,
                request_types: vec![],
                state,
                weight: 1.0,
                request: RequestId::random(),
                drain_request: None,
                since_ms: 0,
                joined: 0,
            });
        }
        assert_eq!(cluster.size(), 2);
        assert_eq!(cluster.active(), 1);
    }
}
