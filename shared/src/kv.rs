//! The JetStream KV schema: buckets, keys and the records stored in them.
//!
//! JetStream KV is Headroom's only store. Four buckets:
//! - `headroom-servers`, key = server id: where each server is. This record
//!   is the authority on a server's placement, so a server can be in at most
//!   one cluster by construction.
//! - `headroom-clusters`, key = cluster id: the cluster's policy and its
//!   member list, the routing view front-ends follow.
//! - `headroom-requests`, key = request id: the outcome of every
//!   reconfiguration request, so a redelivered request is applied at most
//!   once.
//! - `headroom-monitors`: which monitor instance holds each shard's lease
//!   (`shard.<n>`), and each live instance's heartbeat (`instance.<id>`).
//!
//! Every write is compare-and-set on the revision read. A server listed in a
//! cluster's members always has a server record naming that cluster; the
//! reverse may lag after a crash until the allocator's reconciler repairs it.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::codec::{message, SCHEMA_VERSION};
use crate::ids::{ClusterId, RequestId, ServerId};
use crate::wire::{BusError, ReconfigAction};

pub const SERVERS_BUCKET: &str = "headroom-servers";
pub const CLUSTERS_BUCKET: &str = "headroom-clusters";
pub const REQUESTS_BUCKET: &str = "headroom-requests";
pub const MONITORS_BUCKET: &str = "headroom-monitors";

/// Headroom's buckets, so that each is made one way and a misspelt name
/// cannot be made at all.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bucket {
    Servers,
    Clusters,
    Requests,
    Monitors,
}

impl Bucket {
    pub const fn name(self) -> &'static str {
        match self {
            Bucket::Servers => SERVERS_BUCKET,
            Bucket::Clusters => CLUSTERS_BUCKET,
            Bucket::Requests => REQUESTS_BUCKET,
            Bucket::Monitors => MONITORS_BUCKET,
        }
    }
}

/// How a bucket is made. One definition, used by whoever creates it.
pub fn bucket_config(bucket: Bucket, replicas: usize) -> async_nats::jetstream::kv::Config {
    let (description, history, max_age) = match bucket {
        Bucket::Servers => ("Headroom: every server and where it is", 16, Duration::ZERO),
        Bucket::Clusters => (
            "Headroom: cluster policy and membership",
            32,
            Duration::ZERO,
        ),
        // Leases are judged by whether their revision moves, so only the
        // last value of each key matters.
        Bucket::Monitors => (
            "Headroom: monitor shard leases and heartbeats",
            1,
            Duration::ZERO,
        ),
        // Outcomes outlive JetStream's de-duplication window by far; a day
        // bounds the bucket while covering any redelivery.
        Bucket::Requests => (
            "Headroom: outcome of each reconfiguration request",
            1,
            Duration::from_secs(24 * 3600),
        ),
    };
    async_nats::jetstream::kv::Config {
        bucket: bucket.name().to_owned(),
        description: description.to_owned(),
        history,
        max_age,
        num_replicas: replicas.max(1),
        storage: async_nats::jetstream::stream::StorageType::File,
        ..Default::default()
    }
}

/// Opens a bucket, creating it when it is missing. Every service that
/// needs a bucket calls this, so whichever starts first makes it the same
/// way.
///
/// # Errors
/// When the bucket can neither be found nor created.
pub async fn open_bucket(
    js: &async_nats::jetstream::Context,
    bucket: Bucket,
    replicas: usize,
) -> Result<async_nats::jetstream::kv::Store, async_nats::Error> {
    use async_nats::jetstream::context::KeyValueErrorKind;
    match js.get_key_value(bucket.name()).await {
        Ok(store) => Ok(store),
        Err(err) if err.kind() == KeyValueErrorKind::GetBucket => {
            Ok(js.create_key_value(bucket_config(bucket, replicas)).await?)
        }
        Err(err) => Err(err.into()),
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

/// Whether a message of a KV bucket's stream deletes or purges its key
/// (its `KV-Operation` header), rather than putting a value.
pub fn is_removal(headers: &async_nats::HeaderMap) -> bool {
    headers
        .get("KV-Operation")
        .is_some_and(|op| matches!(op.as_str(), "DEL" | "PURGE"))
}

/// How long [`latest_entries`] waits for the next value before giving up.
const SWEEP_STALL: Duration = Duration::from_secs(10);

/// The latest value of every key of `bucket` (deleted ones left out) as
/// (key, revision, value), in one sweep of an ordered consumer that starts
/// at each key's last message: one round trip to set it up and the values
/// streamed, where listing the keys and reading each is a round trip per
/// key.
///
/// # Errors
/// The consumer cannot be made, a message is unreadable, or the values
/// stop coming for [`SWEEP_STALL`].
pub async fn latest_entries(
    bucket: &async_nats::jetstream::kv::Store,
) -> Result<Vec<(String, u64, bytes::Bytes)>, async_nats::Error> {
    use async_nats::jetstream::consumer::{pull, DeliverPolicy, ReplayPolicy};
    use futures::StreamExt;
    let consumer = bucket
        .stream
        .create_consumer(pull::OrderedConfig {
            description: Some("headroom: the latest value of every key".to_owned()),
            filter_subject: format!("{}>", bucket.prefix),
            deliver_policy: DeliverPolicy::LastPerSubject,
            replay_policy: ReplayPolicy::Instant,
            ..Default::default()
        })
        .await?;
    let pending = consumer.cached_info().num_pending;
    let mut out = Vec::with_capacity(usize::try_from(pending).unwrap_or(0));
    if pending == 0 {
        return Ok(out);
    }
    let mut messages = consumer.messages().await?;
    loop {
        let message = tokio::time::timeout(SWEEP_STALL, messages.next())
            .await
            .map_err(|_| format!("no value from {} for {SWEEP_STALL:?}", bucket.name))?
            .ok_or_else(|| format!("the sweep of {} ended early", bucket.name))??;
        let info = message.info()?;
        let (revision, pending) = (info.stream_sequence, info.pending);
        if !message.headers.as_ref().is_some_and(is_removal) {
            if let Some(key) = message
                .subject
                .as_str()
                .strip_prefix(bucket.prefix.as_str())
            {
                out.push((key.to_owned(), revision, message.payload.clone()));
            }
        }
        if pending == 0 {
            return Ok(out);
        }
    }
}

/// Follows the keys of `bucket` matching `pattern` until `stop`: current
/// values first, then every change. A watch that ends or fails is started
/// again (after a second); an entry at or below the revision already
/// delivered for its key is skipped, because a restarted watch replays. So
/// each key's entries arrive once, in revision order, and the stream ends
/// only with `stop`.
pub fn follow(
    bucket: async_nats::jetstream::kv::Store,
    pattern: String,
    stop: tokio_util::sync::CancellationToken,
) -> impl futures::Stream<Item = async_nats::jetstream::kv::Entry> {
    use futures::StreamExt;
    struct Following {
        bucket: async_nats::jetstream::kv::Store,
        pattern: String,
        stop: tokio_util::sync::CancellationToken,
        watch: Option<async_nats::jetstream::kv::Watch>,
        delivered: std::collections::HashMap<String, u64>,
    }
    let state = Following {
        bucket,
        pattern,
        stop,
        watch: None,
        delivered: std::collections::HashMap::new(),
    };
    futures::stream::unfold(state, |mut s| async move {
        loop {
            let Some(watch) = s.watch.as_mut() else {
                let started = tokio::select! {
                    _ = s.stop.cancelled() => return None,
                    started = s.bucket.watch_with_history(s.pattern.as_str()) => started,
                };
                match started {
                    Ok(watch) => s.watch = Some(watch),
                    Err(err) => {
                        tracing::warn!(%err, pattern = %s.pattern, "cannot watch KV; trying again");
                        tokio::select! {
                            _ = s.stop.cancelled() => return None,
                            () = tokio::time::sleep(Duration::from_secs(1)) => {}
                        }
                    }
                }
                continue;
            };
            let next = tokio::select! {
                _ = s.stop.cancelled() => return None,
                next = watch.next() => next,
            };
            match next {
                Some(Ok(entry)) => {
                    if s.delivered
                        .get(&entry.key)
                        .is_some_and(|&r| entry.revision <= r)
                    {
                        continue;
                    }
                    s.delivered.insert(entry.key.clone(), entry.revision);
                    return Some((entry, s));
                }
                // Missed heartbeats and the like are not the end of it.
                Some(Err(err)) => tracing::debug!(%err, "KV watch hiccup"),
                None => s.watch = None,
            }
        }
    })
}

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

/// The outcome of a reconfiguration request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// Applied; `servers` are the ones it touched. A partial allocation is
    /// applied with the shortfall named in `error`.
    Applied {
        #[serde(default)]
        servers: Vec<ServerId>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        error: Option<BusError>,
    },
    Rejected {
        error: BusError,
    },
}

/// A request's outcome, in `headroom-requests`. Written once (create), so
/// a request has one outcome whoever applies it and however often it is
/// delivered.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RequestRecord {
    #[serde(default = "crate::codec::default_schema_version")]
    pub v: u16,
    pub id: RequestId,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster: Option<ClusterId>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub action: Option<ReconfigAction>,
    pub outcome: Outcome,
    /// The allocator instance that applied it.
    pub by: String,
    /// Which delivery of the request applied it (above 1: an allocator
    /// stopped or crashed while it was in flight).
    #[serde(default)]
    pub delivery: u64,
    pub at_ms: u64,
}
message!(RequestRecord, "request_record");

/// The ledger's mark that a request has been taken up, in
/// `headroom-requests` under [`RequestStarted::key`]. Created once, before
/// the request's first write, by whichever delivery comes first; every
/// later delivery reads it. Whatever the request changes happens after the
/// cluster generation it names, so a redelivery can tell its own past
/// work, and entries that were not there yet, from what came before.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RequestStarted {
    #[serde(default = "crate::codec::default_schema_version")]
    pub v: u16,
    pub id: RequestId,
    pub cluster: ClusterId,
    /// The cluster's generation when the request was first taken up (0 if
    /// the cluster did not exist).
    pub generation: u64,
    pub by: String,
    pub at_ms: u64,
}
message!(RequestStarted, "request_started");

impl RequestStarted {
    /// Its key: apart from the outcomes (request ids have no '.').
    pub fn key(id: &RequestId) -> String {
        format!("started.{id}")
    }
}

/// JetStream's "wrong last sequence" code, and the code an R3 stream under
/// contention answers with for the same condition.
const WRONG_LAST_SEQUENCE: u64 = 10071;
const R3_CAS_CONFLICT: u64 = 10164;

/// Whether a failed compare-and-set lost a race (re-read and try again), as
/// opposed to failing for another reason.
pub fn is_revision_conflict(err: &async_nats::jetstream::kv::UpdateError) -> bool {
    use async_nats::jetstream::kv::UpdateErrorKind;
    match err.kind() {
        UpdateErrorKind::WrongLastRevision => true,
        UpdateErrorKind::Other => jetstream_code(err)
            .is_some_and(|code| code == R3_CAS_CONFLICT || code == WRONG_LAST_SEQUENCE),
        UpdateErrorKind::InvalidKey | UpdateErrorKind::TimedOut => false,
    }
}

/// Same as [`is_revision_conflict`], for `create` (revision 0).
pub fn is_create_conflict(err: &async_nats::jetstream::kv::CreateError) -> bool {
    use async_nats::jetstream::kv::CreateErrorKind;
    match err.kind() {
        CreateErrorKind::AlreadyExists => true,
        CreateErrorKind::Other => jetstream_code(err)
            .is_some_and(|code| code == R3_CAS_CONFLICT || code == WRONG_LAST_SEQUENCE),
        _ => false,
    }
}

/// Why a [`compare_and_set`] did not write.
#[derive(Debug, thiserror::Error)]
pub enum CasError {
    /// The key moved past the revision (or exists, for revision 0).
    #[error("changed since it was read")]
    Conflict,
    #[error(transparent)]
    Kv(async_nats::Error),
}

/// Writes `value` to `key` if it is still at `revision` (0: if it does not
/// exist). Returns the new revision. The one compare-and-set every writer
/// of a bucket goes through.
///
/// # Errors
/// [`CasError::Conflict`] when another writer got there first.
pub async fn compare_and_set(
    bucket: &async_nats::jetstream::kv::Store,
    key: &str,
    value: bytes::Bytes,
    revision: u64,
) -> Result<u64, CasError> {
    if revision == 0 {
        return bucket.create(key, value).await.map_err(|e| {
            if is_create_conflict(&e) {
                CasError::Conflict
            } else {
                CasError::Kv(e.into())
            }
        });
    }
    bucket.update(key, value, revision).await.map_err(|e| {
        if is_revision_conflict(&e) {
            CasError::Conflict
        } else {
            CasError::Kv(e.into())
        }
    })
}

/// The JetStream API error code somewhere in an error's source chain.
fn jetstream_code(err: &(dyn std::error::Error + 'static)) -> Option<u64> {
    let mut next = Some(err);
    while let Some(e) = next {
        if let Some(js) = e.downcast_ref::<async_nats::jetstream::Error>() {
            return Some(js.error_code().0);
        }
        next = e.source();
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

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
