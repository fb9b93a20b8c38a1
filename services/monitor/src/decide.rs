//! The monitor's decisions, as a pure function of what it was told and when.
//!
//! No I/O and no clock here: [`Decider::observe`] takes a report with the
//! time it arrived, [`Decider::set_cluster`] a cluster's policy and
//! membership, and [`Decider::tick`] the time to evaluate at. The same calls
//! give the same decisions, which is what makes `replay` byte-identical and
//! lets tests run ten minutes of load in milliseconds.
//!
//! Memory is O(1) per server: a server keeps its latest readings and the
//! times its utilisation crossed the levels, not a list of samples. The
//! per-tick history (a short ring of cluster samples) is kept per cluster.

use std::collections::{BTreeMap, HashMap, VecDeque};

use headroom_shared::errors::{codes, BusError};
use headroom_shared::records::{self, ClusterPolicy, ClusterRecord, MemberState, ScalingPolicy};
use headroom_shared::wire::{FrontendDemand, PerformanceReport, ReconfigAction, ReportSource};
use headroom_shared::{ClusterId, RequestId, ServerId};
use serde::{Deserialize, Serialize};

/// Front-ends whose view of one server is kept; more is noise, and the
/// bound keeps a server's state small.
const MAX_FRONTENDS: usize = 4;
/// A reading is trusted for this many of its sender's intervals.
const STALE_INTERVALS: u64 = 3;
/// Weight changes smaller than this are not worth a request (IBM Network
/// Dispatcher's sensitivity threshold).
const WEIGHT_SENSITIVITY: f64 = 0.05;
/// The least weight a hot member is given: it still gets some traffic, so
/// it is seen when it recovers.
const MIN_WEIGHT: f64 = 0.1;
/// A member is hot, for a reweight, only when it is over the upper level
/// and this many times the mean of the others: a member a little above a
/// cluster that sits near the level is noise (in-flight counts are small
/// integers), not a hot spot.
const HOT_RATIO: f64 = 1.5;
/// Consecutive evaluations a panic (`panic_ratio`) must hold: one reading
/// is not enough.
const PANIC_SAMPLES: usize = 2;
/// A cluster is spare when the others would carry the release window's
/// peak load at no more than this share of the target without one member:
/// any member may then go, not only one that sat under the lower level.
/// With even load balancing no member is ever alone under `lower`, so
/// that rule on its own keeps a cluster at a third of its target; the 10 %
/// margin (the HPA's tolerance) keeps a release from landing the others
/// at the target, where noise would ask for the member back.
const SPARE_SHARE: f64 = 0.9;
/// How long a change's confirmation is kept: longer than any cooldown it
/// could start.
const CONFIRMATIONS_KEPT_MS: u64 = 10 * 60 * 1000;

/// A member as the monitor needs it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MemberView {
    pub server: ServerId,
    pub state: MemberState,
    #[serde(default = "full_weight")]
    pub weight: f64,
    /// When it entered its state (allocator's clock); 0 when unknown.
    #[serde(default)]
    pub since_ms: u64,
    /// The request whose change put it in its state (its drain's, when
    /// draining), whose confirmation the cooldowns count from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request: Option<RequestId>,
}

fn full_weight() -> f64 {
    1.0
}

/// A cluster's policy and membership, as the monitor needs them. Live, it
/// comes from the cluster's KV record; in a recording it can be written by
/// hand.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClusterView {
    pub id: ClusterId,
    #[serde(default)]
    pub generation: u64,
    pub policy: ClusterPolicy,
    #[serde(default)]
    pub members: Vec<MemberView>,
}

impl From<&ClusterRecord> for ClusterView {
    fn from(record: &ClusterRecord) -> Self {
        Self {
            id: record.id.clone(),
            generation: record.generation,
            policy: record.policy.clone(),
            members: record
                .members
                .iter()
                .map(|m| MemberView {
                    server: m.server.clone(),
                    state: m.state,
                    weight: m.weight,
                    since_ms: m.since_ms,
                    request: Some(match m.state {
                        MemberState::Draining => {
                            m.drain_request.clone().unwrap_or_else(|| m.request.clone())
                        }
                        _ => m.request.clone(),
                    }),
                })
                .collect(),
        }
    }
}

/// One decision, with the window values that caused it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Decision {
    pub at_ms: u64,
    pub cluster: ClusterId,
    /// The membership generation it was decided on.
    pub generation: u64,
    pub action: ReconfigAction,
    pub reason: String,
    pub evidence: Evidence,
}

impl Decision {
    /// A request id that names the decision, the same on every replay and
    /// on every retry of its publication.
    pub fn request_id(&self) -> String {
        match &self.action {
            ReconfigAction::Allocate { .. } => {
                format!("{}-{}-{}", self.action.name(), self.cluster, self.at_ms)
            }
            ReconfigAction::Release { server }
            | ReconfigAction::Replace { server }
            | ReconfigAction::Reweight { server, .. } => {
                format!("{}-{}-{}", self.action.name(), server, self.at_ms)
            }
        }
    }
}

/// What a decision saw. Utilisations are 0..1 (more when a measure is over
/// its scale), rounded to 4 places so the log reads well and stays stable.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Evidence {
    /// Members that count towards the size (active and joining).
    pub size: u32,
    /// Active members with a fresh reading.
    pub known: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub utilisation: Option<f64>,
    /// The cluster's utilisation at each evaluation of the deciding window.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub window: Vec<Option<f64>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub total_load: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub desired: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub server_utilisation: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub server_in_flight: Option<u32>,
    /// Since when the condition has held.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub held_since_ms: Option<u64>,
    /// Utilisation of the others if the decision is carried out.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub projected: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub silent_ms: Option<u64>,
    /// The front-ends that have ejected the member, and since when.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub ejected_by: Vec<EjectedBy>,
}

/// A front-end that has ejected a member, since when (its clock: when
/// this monitor first heard it say so).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct EjectedBy {
    pub frontend: String,
    pub since_ms: u64,
}

/// Why a report was not taken.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{0}")]
pub struct Rejection(pub BusError);

impl Rejection {
    pub fn code(&self) -> &str {
        &self.0.code
    }
}

fn unknown_cluster(cluster: &ClusterId) -> Rejection {
    Rejection(BusError::new(
        codes::UNKNOWN_CLUSTER,
        format!("no cluster {cluster}"),
    ))
}

/// One source's latest numbers. f32 is plenty for a utilisation and halves
/// the state per server.
#[derive(Debug, Clone, Copy, Default)]
struct Reading {
    at_ms: u64,
    fresh_for_ms: u32,
    cpu: Option<f32>,
    in_flight: Option<u32>,
    concurrency: Option<u32>,
    latency_p99_ms: Option<f32>,
}

impl Reading {
    fn of(report: &PerformanceReport, now_ms: u64, silent_after_ms: u64) -> Self {
        // Not `clamp`: a policy may say silent after 1 s, under the floor,
        // and `clamp` panics when its bounds cross.
        let fresh = (u64::from(report.interval_ms) * STALE_INTERVALS)
            .max(1_500)
            .min(silent_after_ms);
        Self {
            at_ms: now_ms,
            fresh_for_ms: u32::try_from(fresh).unwrap_or(u32::MAX),
            cpu: report.cpu.map(|x| x as f32),
            in_flight: report.in_flight,
            concurrency: report.concurrency,
            latency_p99_ms: report.latency_p99_ms.map(|x| x as f32),
        }
    }

    fn fresh(&self, now_ms: u64) -> bool {
        now_ms.saturating_sub(self.at_ms) <= u64::from(self.fresh_for_ms)
    }
}

/// What one front-end says of a server.
#[derive(Debug, Clone)]
struct FrontView {
    /// The front-end's name, hashed.
    key: u64,
    reading: Reading,
    /// Since when it has reported the server ejected, and its name: kept
    /// only then, for the evidence of a replacement.
    ejected: Option<(u64, Box<str>)>,
}

/// What one server is known to be doing, and how long it has been so.
#[derive(Debug, Clone)]
struct Tracked {
    cluster: ClusterId,
    agent: Option<Reading>,
    frontends: Vec<FrontView>,
    /// When it became a member as far as this monitor knows: its silence is
    /// counted from here until its first report.
    first_seen_ms: u64,
    /// The server's own last word: silence is the agent's. Front-ends keep
    /// reporting a dead server (it answers them nothing), so their reports
    /// do not count as it being alive.
    last_agent_ms: Option<u64>,
    below_lower_since: Option<u64>,
    above_upper_since: Option<u64>,
    /// Since when it would stay under target at full weight.
    cool_since: Option<u64>,
    /// The weight last asked for and when, until the membership shows it
    /// (or the ask is old enough to be taken as lost).
    asked_weight: Option<(f32, u64)>,
    replace_asked: bool,
    /// A replacement was asked for because every front-end ejected it.
    eject_replace_asked: bool,
}

impl Tracked {
    fn new(cluster: ClusterId, now_ms: u64) -> Self {
        Self {
            cluster,
            agent: None,
            frontends: Vec::new(),
            first_seen_ms: now_ms,
            last_agent_ms: None,
            below_lower_since: None,
            above_upper_since: None,
            cool_since: None,
            asked_weight: None,
            replace_asked: false,
            eject_replace_asked: false,
        }
    }

    /// Every live front-end (one heard within its report's freshness)
    /// has had the server ejected for `for_ms`: who, and since when.
    /// `None` when one has not, or none is live.
    fn ejected_by_all(&self, now_ms: u64, for_ms: u64) -> Option<Vec<EjectedBy>> {
        let mut live = self
            .frontends
            .iter()
            .filter(|f| f.reading.fresh(now_ms))
            .peekable();
        live.peek()?;
        live.map(|f| {
            let (since_ms, name) = f.ejected.as_ref()?;
            (now_ms.saturating_sub(*since_ms) >= for_ms).then(|| EjectedBy {
                frontend: name.to_string(),
                since_ms: *since_ms,
            })
        })
        .collect()
    }

    /// The merged view: the agent's own CPU and in-flight count are
    /// authoritative; without them, the front-ends' in-flight counts add
    /// up (each sees its own share); latency is the worst anyone saw,
    /// because the outside view includes queueing the server cannot see.
    /// The server's merged reading now: its agent's, with what the
    /// front-ends see where the agent says nothing.
    fn current(&self, now_ms: u64) -> records::Reading {
        let agent = self.agent.filter(|r| r.fresh(now_ms));
        let fronts = self
            .frontends
            .iter()
            .map(|f| &f.reading)
            .filter(|r| r.fresh(now_ms));
        let cpu = agent.and_then(|r| r.cpu).map(f64::from);
        let mut in_flight = agent.and_then(|r| r.in_flight);
        let mut latency = agent.and_then(|r| r.latency_p99_ms).map(f64::from);
        let mut front_in_flight: Option<u32> = None;
        for r in fronts {
            if let Some(n) = r.in_flight {
                front_in_flight = Some(front_in_flight.unwrap_or(0).saturating_add(n));
            }
            if let Some(l) = r.latency_p99_ms {
                latency = Some(latency.map_or(f64::from(l), |x| x.max(f64::from(l))));
            }
        }
        if in_flight.is_none() {
            in_flight = front_in_flight;
        }
        records::Reading {
            cpu,
            in_flight,
            concurrency: agent.and_then(|r| r.concurrency),
            latency_p99_ms: latency,
        }
    }
}

/// One evaluation of a cluster.
#[derive(Debug, Clone, Copy)]
struct Sample {
    at_ms: u64,
    /// Mean utilisation of the active members with a fresh reading.
    mean: Option<f32>,
    /// The load in servers' worth: the known utilisations, plus the mean
    /// for each active member whose reading is missing.
    total: f32,
    /// Every active member had a fresh reading.
    complete: bool,
}

#[derive(Debug)]
struct ClusterState {
    view: ClusterView,
    history: History,
    last_up_ms: Option<u64>,
    last_down_ms: Option<u64>,
    demand: Demand,
}

/// What the front-ends say of a cluster's demand as a whole: requests held
/// for want of a member, and when any of them last saw a request.
#[derive(Debug)]
struct Demand {
    /// Per front-end (its name, hashed): held requests, and until when
    /// that word holds.
    held: HashMap<u64, (u32, u64)>,
    /// When a front-end last said it saw a request (held, sent to a member
    /// or answered from its cache); until the first, when this monitor
    /// started deciding for the cluster.
    last_request_ms: u64,
}

impl Demand {
    fn new(now_ms: u64) -> Self {
        Self {
            held: HashMap::new(),
            last_request_ms: now_ms,
        }
    }

    /// Requests held now, by the front-ends whose word is fresh.
    fn held(&mut self, now_ms: u64) -> u32 {
        self.held.retain(|_, (_, until)| now_ms <= *until);
        self.held
            .values()
            .map(|(n, _)| *n)
            .fold(0, u32::saturating_add)
    }

    fn saw_requests(&mut self, now_ms: u64) {
        self.last_request_ms = self.last_request_ms.max(now_ms);
    }
}

/// A cluster's samples, oldest first, as far back as its longest window.
#[derive(Debug, Default)]
struct History {
    samples: VecDeque<Sample>,
}

impl History {
    /// Adds the newest sample and forgets those older than `horizon_ms`,
    /// keeping one at or before it for a window's start.
    fn push(&mut self, sample: Sample, horizon_ms: u64) {
        let now_ms = sample.at_ms;
        self.samples.push_back(sample);
        while self.samples.len() > 1 && self.samples[1].at_ms <= now_ms.saturating_sub(horizon_ms) {
            self.samples.pop_front();
        }
    }

    /// Whether the newest `n` samples all hold.
    fn latest_all(&self, n: usize, holds: impl Fn(&Sample) -> bool) -> bool {
        self.samples.len() >= n && self.samples.iter().rev().take(n).all(holds)
    }

    /// The samples of the last `window_ms`, starting with the newest one
    /// taken at or before its start; `None` while the history is shorter.
    fn window(&self, now_ms: u64, window_ms: u64) -> Option<impl Iterator<Item = &Sample>> {
        let start = now_ms.checked_sub(window_ms)?;
        let anchor = self.samples.iter().rposition(|s| s.at_ms <= start)?;
        Some(self.samples.iter().skip(anchor))
    }

    fn held(&self, now_ms: u64, window_ms: u64, holds: impl Fn(&Sample) -> bool) -> bool {
        self.window(now_ms, window_ms)
            .is_some_and(|mut samples| samples.all(holds))
    }

    /// The least load of the window: what held all through it.
    fn least_load(&self, now_ms: u64, window_ms: u64) -> Option<f64> {
        self.window(now_ms, window_ms)
            .map(|w| w.map(|x| f64::from(x.total)).fold(f64::INFINITY, f64::min))
    }

    /// The least load of the newest `n` samples.
    fn latest_least_load(&self, n: usize) -> Option<f64> {
        (self.samples.len() >= n).then(|| {
            self.samples
                .iter()
                .rev()
                .take(n)
                .map(|x| f64::from(x.total))
                .fold(f64::INFINITY, f64::min)
        })
    }

    /// `held` projected `lead_ms` past the newest sample along the trend of
    /// the window (a least-squares line), when the load is rising: a step
    /// sized for the load of the window's start serves a load that has
    /// grown since. Never below `held`, never above twice it, so one noisy
    /// window cannot ask for the pool.
    fn expected_load(&self, now_ms: u64, window_ms: u64, lead_ms: u64, held: f64) -> f64 {
        let Some(points) = self.window(now_ms, window_ms) else {
            return held;
        };
        let points: Vec<(f64, f64)> = points
            .map(|x| (x.at_ms as f64, f64::from(x.total)))
            .collect();
        if points.len() < 3 {
            return held;
        }
        let n = points.len() as f64;
        let (mt, ml) = (
            points.iter().map(|p| p.0).sum::<f64>() / n,
            points.iter().map(|p| p.1).sum::<f64>() / n,
        );
        let spread: f64 = points.iter().map(|p| (p.0 - mt).powi(2)).sum();
        if spread <= 0.0 {
            return held;
        }
        let slope = points.iter().map(|p| (p.0 - mt) * (p.1 - ml)).sum::<f64>() / spread;
        let newest = points.last().map_or(mt, |p| p.0);
        let expected = ml + slope * (newest - mt + lead_ms as f64);
        if slope <= 0.0 || !expected.is_finite() {
            return held;
        }
        expected.clamp(held, 2.0 * held)
    }

    fn window_values(&self, now_ms: u64, window_ms: u64) -> Vec<Option<f64>> {
        self.window(now_ms, window_ms)
            .map(|samples| {
                samples
                    .map(|s| s.mean.map(|m| round(f64::from(m))))
                    .collect()
            })
            .unwrap_or_default()
    }
}

/// When the last member was added or removed, as the membership tells it
/// (a `since_ms` of 0 is unknown): cooldowns then hold across a monitor
/// restart. A change counts from when every live front-end confirmed it
/// (`confirmed`, by request), not from when it was written: until then
/// traffic has not followed it. An arrival written but not yet confirmed
/// counts as happening now, for up to `wait_ms`: the next scale-up waits
/// for traffic to reach the last one, and a lost confirmation holds it
/// back no longer than that.
fn membership_times(
    view: &ClusterView,
    confirmed: &HashMap<RequestId, u64>,
    now_ms: u64,
    wait_ms: u64,
) -> (Option<u64>, Option<u64>) {
    let mut added = None;
    let mut removed = None;
    for m in view.members.iter().filter(|m| m.since_ms > 0) {
        let confirmation = m.request.as_ref().and_then(|r| confirmed.get(r));
        let awaited = m.request.is_some()
            && m.state == MemberState::Active
            && now_ms.saturating_sub(m.since_ms) < wait_ms;
        let at = match confirmation {
            Some(&at) => m.since_ms.max(at),
            None if awaited => now_ms,
            None => m.since_ms,
        };
        let slot = match m.state {
            MemberState::Draining => &mut removed,
            MemberState::Joining | MemberState::Active => &mut added,
        };
        *slot = Some(slot.map_or(at, |t: u64| t.max(at)));
    }
    (added, removed)
}

/// A member's state at one evaluation.
struct Now<'a> {
    server: &'a ServerId,
    weight: f64,
    utilisation: Option<f64>,
    in_flight: Option<u32>,
}

/// Every cluster's windows and the decisions they lead to.
#[derive(Debug, Default)]
pub struct Decider {
    clusters: BTreeMap<ClusterId, ClusterState>,
    /// Decisions made between evaluations: a cluster at zero is asked for
    /// a member as soon as a front-end says it holds requests.
    urgent: Vec<Decision>,
    servers: HashMap<ServerId, Tracked>,
    /// When each recent change was confirmed by every live front-end (the
    /// allocator's clock), whichever cluster it is of: a confirmation may
    /// come before the record that shows its change, or before this
    /// instance holds its cluster's shard.
    confirmed: HashMap<RequestId, u64>,
    last_report_ms: Option<u64>,
}

impl Decider {
    pub fn new() -> Self {
        Self::default()
    }

    /// Servers whose state is kept.
    pub fn tracked_servers(&self) -> usize {
        self.servers.len()
    }

    pub fn clusters(&self) -> usize {
        self.clusters.len()
    }

    /// Takes a cluster's policy and membership (created or changed).
    pub fn set_cluster(&mut self, now_ms: u64, view: ClusterView) {
        let id = view.id.clone();
        // Members it had that it no longer lists stop being tracked here.
        if let Some(old) = self.clusters.get(&id) {
            for m in &old.view.members {
                if !view.members.iter().any(|n| n.server == m.server) {
                    if let Some(t) = self.servers.get(&m.server) {
                        if t.cluster == id {
                            self.servers.remove(&m.server);
                        }
                    }
                }
            }
        }
        for m in &view.members {
            let tracked = self
                .servers
                .entry(m.server.clone())
                .or_insert_with(|| Tracked::new(id.clone(), now_ms));
            if tracked.cluster != id {
                // It moved here from another cluster: start afresh.
                *tracked = Tracked::new(id.clone(), now_ms);
            }
            if tracked
                .asked_weight
                .is_some_and(|(w, _)| (f64::from(w) - m.weight).abs() < 1e-3)
            {
                tracked.asked_weight = None;
            }
        }
        match self.clusters.get_mut(&id) {
            Some(state) => state.view = view,
            None => {
                self.clusters.insert(
                    id,
                    ClusterState {
                        view,
                        history: History::default(),
                        last_up_ms: None,
                        last_down_ms: None,
                        demand: Demand::new(now_ms),
                    },
                );
            }
        }
    }

    /// Takes a front-end's word on its cluster's demand, that arrived at
    /// `now_ms`.
    ///
    /// # Errors
    /// [`codes::UNKNOWN_CLUSTER`] for a cluster it has no record of.
    pub fn demand(
        &mut self,
        now_ms: u64,
        cluster: &ClusterId,
        said: &FrontendDemand,
    ) -> Result<(), Rejection> {
        let state = self
            .clusters
            .get_mut(cluster)
            .ok_or_else(|| unknown_cluster(cluster))?;
        let key = headroom_shared::hash::fnv1a(said.frontend.as_bytes());
        let fresh_for = u64::from(said.interval_ms) * STALE_INTERVALS;
        state
            .demand
            .held
            .insert(key, (said.held, now_ms + fresh_for));
        if said.held > 0 || said.requests_per_s > 0.0 {
            state.demand.saw_requests(now_ms);
        }
        self.last_report_ms = Some(now_ms);
        if said.held > 0 {
            if let Some(up) = from_zero_at_once(state, now_ms) {
                self.urgent.push(up);
            }
        }
        Ok(())
    }

    /// The decisions made since the last call, between evaluations.
    pub fn take_urgent(&mut self) -> Vec<Decision> {
        std::mem::take(&mut self.urgent)
    }

    /// Takes word that every live front-end follows `request`'s change
    /// since `confirmed_ms`.
    pub fn confirmed(&mut self, request: RequestId, confirmed_ms: u64) {
        self.confirmed.insert(request, confirmed_ms);
    }

    /// Forgets a deleted cluster.
    pub fn remove_cluster(&mut self, id: &ClusterId) {
        if let Some(state) = self.clusters.remove(id) {
            for m in &state.view.members {
                if self
                    .servers
                    .get(&m.server)
                    .is_some_and(|t| &t.cluster == id)
                {
                    self.servers.remove(&m.server);
                }
            }
        }
    }

    /// Takes a validated report that arrived at `now_ms` about a server of
    /// the cluster named on its subject.
    ///
    /// # Errors
    /// [`codes::UNKNOWN_CLUSTER`] for a cluster it has no record of,
    /// [`codes::NOT_A_MEMBER`] for a server that is not listed in it.
    pub fn observe(
        &mut self,
        now_ms: u64,
        cluster: &ClusterId,
        report: &PerformanceReport,
    ) -> Result<(), Rejection> {
        let state = self
            .clusters
            .get(cluster)
            .ok_or_else(|| unknown_cluster(cluster))?;
        let silent_after = state.view.policy.scaling.silent_after_ms;
        let tracked = match self.servers.get_mut(&report.server) {
            Some(t) if &t.cluster == cluster => t,
            _ => {
                return Err(Rejection(BusError::new(
                    codes::NOT_A_MEMBER,
                    format!("{} is not a member of {cluster}", report.server),
                )))
            }
        };
        let reading = Reading::of(report, now_ms, silent_after);
        let busy = report.requests_per_s.is_some_and(|r| r > 0.0)
            || report.in_flight.is_some_and(|n| n > 0);
        match &report.source {
            ReportSource::Agent => {
                tracked.agent = Some(reading);
                tracked.last_agent_ms = Some(now_ms);
                tracked.replace_asked = false;
            }
            ReportSource::Frontend { frontend } => {
                let key = headroom_shared::hash::fnv1a(frontend.as_bytes());
                let slot = tracked.frontends.iter().position(|f| f.key == key);
                let ejected = (report.ejected == Some(true)).then(|| {
                    let since = slot.and_then(|i| tracked.frontends[i].ejected.as_ref());
                    (
                        since.map_or(now_ms, |(at, _)| *at),
                        frontend.as_str().into(),
                    )
                });
                let view = FrontView {
                    key,
                    reading,
                    ejected,
                };
                if busy {
                    if let Some(state) = self.clusters.get_mut(cluster) {
                        state.demand.saw_requests(now_ms);
                    }
                }
                if let Some(i) = slot {
                    tracked.frontends[i] = view;
                } else if tracked.frontends.len() < MAX_FRONTENDS {
                    tracked.frontends.push(view);
                } else if let Some(oldest) =
                    tracked.frontends.iter_mut().min_by_key(|f| f.reading.at_ms)
                {
                    *oldest = view;
                }
            }
        }
        self.last_report_ms = Some(now_ms);
        Ok(())
    }

    /// Evaluates every cluster at `now_ms`. Call it at a steady interval;
    /// the windows are measured in these evaluations.
    pub fn tick(&mut self, now_ms: u64) -> Vec<Decision> {
        let mut decisions = Vec::new();
        // A monitor that has heard nothing at all for a while is more
        // likely cut off than looking at a fleet that died at once.
        let hearing = self.last_report_ms;
        // Past this, a confirmation moves no cooldown that policies use.
        self.confirmed
            .retain(|_, at| now_ms.saturating_sub(*at) < CONFIRMATIONS_KEPT_MS);
        for state in self.clusters.values_mut() {
            let heard = Heard {
                last_report_ms: hearing,
                confirmed: &self.confirmed,
            };
            evaluate(state, &mut self.servers, now_ms, &heard, &mut decisions);
        }
        decisions
    }
}

/// What the whole monitor has heard, beside a cluster's own reports.
struct Heard<'a> {
    /// When any report last came: a monitor that has heard nothing for a
    /// while is more likely cut off than looking at a fleet that died.
    last_report_ms: Option<u64>,
    confirmed: &'a HashMap<RequestId, u64>,
}

/// Evaluates one cluster: measure its members, sample the cluster, then
/// decide in order of precedence: replace the silent, scale up (which ends
/// the evaluation), reweight, release.
fn evaluate(
    state: &mut ClusterState,
    servers: &mut HashMap<ServerId, Tracked>,
    now_ms: u64,
    heard: &Heard<'_>,
    decisions: &mut Vec<Decision>,
) {
    let ClusterState {
        view,
        history,
        last_up_ms,
        last_down_ms,
        demand,
    } = state;
    let view = &*view;
    let s = &view.policy.scaling;
    let measured = measure(view, servers, now_ms);
    let load = sample(&measured, servers, now_ms, s.upper);
    history.push(
        load.sample(now_ms, &measured),
        s.sustain_ms.max(s.release_sustain_ms),
    );
    let (added_ms, removed_ms) = membership_times(view, heard.confirmed, now_ms, s.confirm_wait_ms);
    let cx = Context {
        now_ms,
        view,
        evidence: Evidence {
            size: measured.size(),
            known: load.known,
            utilisation: load.mean.map(round),
            ..Evidence::default()
        },
        measured,
        load,
        last_up: (*last_up_ms).max(added_ms),
        last_down: (*last_down_ms).max(removed_ms),
    };
    replace_silent(&cx, servers, heard.last_report_ms, decisions);
    replace_ejected(&cx, servers, decisions);
    let held = demand.held(now_ms);
    if let Some(up) = scale_from_zero(&cx, held).or_else(|| scale_up(&cx, history)) {
        *last_up_ms = Some(now_ms);
        decisions.push(up);
        return;
    }
    reweight(&cx, servers, decisions);
    let idle_ms = now_ms.saturating_sub(demand.last_request_ms);
    let mut down = release(&cx, history, servers);
    if down.is_empty() {
        down.extend(release_idle_last(&cx, held, idle_ms));
    }
    if !down.is_empty() {
        *last_down_ms = Some(now_ms);
        decisions.extend(down);
    }
}

/// Step 1: each active member's utilisation now, and how long it has held.
struct Measured<'a> {
    members: Vec<Now<'a>>,
    joining: u32,
    /// Members that stopped reporting, not yet asked to be replaced, and
    /// for how long.
    silent: Vec<(ServerId, u64)>,
    /// Members whose agent reports but every live front-end has ejected
    /// for `silent_after_ms`, not yet asked to be replaced, and by whom.
    ejected: Vec<(ServerId, Vec<EjectedBy>)>,
}

impl Measured<'_> {
    fn active(&self) -> u32 {
        u32::try_from(self.members.len()).unwrap_or(u32::MAX)
    }

    fn size(&self) -> u32 {
        self.active() + self.joining
    }
}

fn measure<'a>(
    view: &'a ClusterView,
    servers: &mut HashMap<ServerId, Tracked>,
    now_ms: u64,
) -> Measured<'a> {
    let s = &view.policy.scaling;
    let mut measured = Measured {
        members: Vec::new(),
        joining: 0,
        silent: Vec::new(),
        ejected: Vec::new(),
    };
    for m in &view.members {
        match m.state {
            MemberState::Joining => {
                measured.joining += 1;
                continue;
            }
            MemberState::Draining => continue,
            MemberState::Active => {}
        }
        let Some(t) = servers.get_mut(&m.server) else {
            continue;
        };
        let reading = t.current(now_ms);
        let quiet_since = t.last_agent_ms.unwrap_or(t.first_seen_ms);
        let quiet_ms = now_ms.saturating_sub(quiet_since);
        let is_silent = quiet_ms >= s.silent_after_ms;
        // A silent server's load is unknown, whatever the front-ends see of
        // it: no release is judged on it.
        let u = if is_silent {
            None
        } else {
            s.measures.utilisation(&reading)
        };
        let since = |flag: bool, at: &mut Option<u64>| {
            if flag {
                at.get_or_insert(now_ms);
            } else {
                *at = None;
            }
        };
        since(u.is_some_and(|u| u < s.lower), &mut t.below_lower_since);
        since(
            u.is_some_and(|u| u / m.weight.max(MIN_WEIGHT) < s.target),
            &mut t.cool_since,
        );
        if is_silent && !t.replace_asked {
            measured.silent.push((m.server.clone(), quiet_ms));
        }
        match t.ejected_by_all(now_ms, s.silent_after_ms) {
            Some(by) if !is_silent && !t.eject_replace_asked => {
                measured.ejected.push((m.server.clone(), by));
            }
            Some(_) => {}
            None => t.eject_replace_asked = false,
        }
        measured.members.push(Now {
            server: &m.server,
            weight: m.weight,
            utilisation: u,
            in_flight: reading.in_flight,
        });
    }
    measured
}

/// Step 2: the cluster's load at this evaluation.
struct Load {
    /// Mean utilisation of the members with a fresh reading.
    mean: Option<f64>,
    /// In servers' worth: the mean for every active member.
    total: f64,
    /// Members with a fresh reading.
    known: u32,
}

impl Load {
    fn sample(&self, at_ms: u64, measured: &Measured<'_>) -> Sample {
        let active = measured.active();
        Sample {
            at_ms,
            mean: self.mean.map(|m| m as f32),
            total: self.total as f32,
            complete: active > 0 && self.known == active,
        }
    }
}

/// Samples the cluster, and marks each member hot (for a reweight) while
/// it is over the upper level and well above the others.
fn sample(
    measured: &Measured<'_>,
    servers: &mut HashMap<ServerId, Tracked>,
    now_ms: u64,
    upper: f64,
) -> Load {
    let known: Vec<f64> = measured
        .members
        .iter()
        .filter_map(|m| m.utilisation)
        .collect();
    let mean = (!known.is_empty()).then(|| known.iter().sum::<f64>() / known.len() as f64);
    let known_sum: f64 = known.iter().sum();
    for m in &measured.members {
        let Some(t) = servers.get_mut(m.server) else {
            continue;
        };
        let hot = m.utilisation.is_some_and(|u| {
            let others = known.len().saturating_sub(1);
            let others_mean = (others > 0).then(|| (known_sum - u) / others as f64);
            u >= upper && others_mean.is_some_and(|o| u >= HOT_RATIO * o)
        });
        if hot {
            t.above_upper_since.get_or_insert(now_ms);
        } else {
            t.above_upper_since = None;
        }
    }
    Load {
        mean,
        total: mean.map_or(0.0, |m| m * f64::from(measured.active())),
        known: u32::try_from(known.len()).unwrap_or(u32::MAX),
    }
}

/// What the deciding steps share.
struct Context<'a> {
    now_ms: u64,
    view: &'a ClusterView,
    measured: Measured<'a>,
    load: Load,
    /// What every decision's evidence starts from.
    evidence: Evidence,
    /// The last scale-up and scale-down, this monitor's or the membership's.
    last_up: Option<u64>,
    last_down: Option<u64>,
}

impl Context<'_> {
    fn scaling(&self) -> &ScalingPolicy {
        &self.view.policy.scaling
    }

    fn decision(&self, action: ReconfigAction, reason: String, evidence: Evidence) -> Decision {
        Decision {
            at_ms: self.now_ms,
            cluster: self.view.id.clone(),
            generation: self.view.generation,
            action,
            reason,
            evidence,
        }
    }

    fn cooling(&self, last: Option<u64>, cooldown_ms: u64) -> bool {
        last.is_some_and(|at| self.now_ms < at.saturating_add(cooldown_ms))
    }
}

/// Step 3, health first: a member that stopped reporting is replaced,
/// never released. Unless so many went quiet together that the monitor's
/// own view (or the metrics path) is the likelier fault.
fn replace_silent(
    cx: &Context<'_>,
    servers: &mut HashMap<ServerId, Tracked>,
    last_heard_ms: Option<u64>,
    decisions: &mut Vec<Decision>,
) {
    let silent = &cx.measured.silent;
    let outage = silent.len() > 1 && silent.len() * 2 > cx.measured.members.len();
    let deaf =
        last_heard_ms.is_none_or(|at| cx.now_ms.saturating_sub(at) >= cx.scaling().silent_after_ms);
    if silent.is_empty() || outage || deaf {
        return;
    }
    for (server, quiet_ms) in silent {
        if let Some(t) = servers.get_mut(server) {
            t.replace_asked = true;
        }
        decisions.push(cx.decision(
            ReconfigAction::Replace {
                server: server.clone(),
            },
            format!("no report for {quiet_ms} ms: unhealthy, not idle"),
            Evidence {
                silent_ms: Some(*quiet_ms),
                ..cx.evidence.clone()
            },
        ));
    }
}

/// Step 3 too: a member whose agent reports, but that every live front-end
/// has ejected for `silent_after_ms`, has an application that is down (or
/// answers only errors): it is replaced, with the front-ends and since
/// when in the evidence. Unless more than half the members are ejected
/// together: that is the front-ends' path to them failing, not them.
fn replace_ejected(
    cx: &Context<'_>,
    servers: &mut HashMap<ServerId, Tracked>,
    decisions: &mut Vec<Decision>,
) {
    let ejected = &cx.measured.ejected;
    if ejected.len() > 1 && ejected.len() * 2 > cx.measured.members.len() {
        return;
    }
    for (server, by) in ejected {
        if let Some(t) = servers.get_mut(server) {
            t.eject_replace_asked = true;
        }
        let names: Vec<String> = by
            .iter()
            .map(|e| {
                format!(
                    "{} for {} ms",
                    e.frontend,
                    cx.now_ms.saturating_sub(e.since_ms)
                )
            })
            .collect();
        decisions.push(cx.decision(
            ReconfigAction::Replace {
                server: server.clone(),
            },
            format!(
                "ejected by every live front-end ({}) while its agent reports: its application is down",
                names.join(", ")
            ),
            Evidence {
                ejected_by: by.clone(),
                ..cx.evidence.clone()
            },
        ));
    }
}

/// Step 4, scale up: the upper level has held for the sustain window, or
/// a large overload for the last few evaluations (a panic: at twice the
/// target, queues grow by the second, and waiting out the window costs the
/// SLO).
fn scale_up(cx: &Context<'_>, history: &History) -> Option<Decision> {
    let (s, now_ms, size) = (cx.scaling(), cx.now_ms, cx.measured.size());
    let (upper, target, max_size) = (s.upper, s.target, cx.view.policy.max_size);
    let hot = history.held(now_ms, s.sustain_ms, |x| {
        x.mean.is_some_and(|m| f64::from(m) >= upper)
    });
    let panic = s.panic_ratio > 0.0
        && history.latest_all(PANIC_SAMPLES, |x| {
            x.mean
                .is_some_and(|m| f64::from(m) >= s.panic_ratio * target)
        });
    if !(hot || panic) || cx.cooling(cx.last_up, s.cooldown_up_ms) || size >= max_size {
        return None;
    }
    // The load that held through the whole window (or the panic's
    // readings) sizes the step, projected to when the step serves.
    let total = cx.load.total;
    let held_load = if hot {
        history.least_load(now_ms, s.sustain_ms).unwrap_or(total)
    } else {
        history.latest_least_load(PANIC_SAMPLES).unwrap_or(total)
    };
    let held_load = if s.project_rise {
        history.expected_load(now_ms, s.sustain_ms, s.cooldown_up_ms, held_load)
    } else {
        held_load
    };
    let desired = ceil_u32(held_load / target);
    let add = desired
        .saturating_sub(size)
        .min(s.max_step)
        .min(max_size - size);
    if add == 0 {
        return None;
    }
    let reason = if hot {
        format!(
            "utilisation at or above {upper} for {} ms; load {:.2} servers wants {desired} at target {target}",
            s.sustain_ms, held_load
        )
    } else {
        format!(
            "overload: utilisation at or above {:.2} ({} x target) for {PANIC_SAMPLES} evaluations; load {:.2} servers wants {desired} at target {target}",
            s.panic_ratio * target,
            s.panic_ratio,
            held_load
        )
    };
    Some(cx.decision(
        ReconfigAction::Allocate {
            count: add,
            request_type: None,
        },
        reason,
        Evidence {
            window: history.window_values(now_ms, s.sustain_ms),
            total_load: Some(round(held_load)),
            desired: Some(desired),
            ..cx.evidence.clone()
        },
    ))
}

/// Step 4, from zero: a cluster with no member (none active, none joining)
/// whose front-ends hold requests for one. No sustain window: every held
/// request is a client waiting. Sized by the held requests, at the
/// policy's in-flight capacity and target, bounded by `max_step` and
/// `max_size`; not again within `cooldown_up_ms` of the last ask.
fn scale_from_zero(cx: &Context<'_>, held: u32) -> Option<Decision> {
    let s = cx.scaling();
    let max_size = cx.view.policy.max_size;
    if held == 0
        || cx.measured.size() > 0
        || max_size == 0
        || cx.cooling(cx.last_up, s.cooldown_up_ms)
    {
        return None;
    }
    let per_member = (s.measures.in_flight_capacity * s.target).max(1.0);
    let desired = ceil_u32(f64::from(held) / per_member).max(1);
    let count = desired.min(s.max_step.max(1)).min(max_size);
    Some(cx.decision(
        ReconfigAction::Allocate {
            count,
            request_type: None,
        },
        format!(
            "no member, and the front-ends hold {held} requests: {count} member(s) at {per_member:.0} requests each"
        ),
        Evidence {
            desired: Some(desired),
            ..cx.evidence.clone()
        },
    ))
}

/// [`scale_from_zero`] as a front-end's word arrives, not at the next
/// evaluation: at zero, every held request is a client waiting, and the
/// evaluation interval would be most of its wait.
fn from_zero_at_once(state: &mut ClusterState, now_ms: u64) -> Option<Decision> {
    let held = state.demand.held(now_ms);
    let view = &state.view;
    let staying = view
        .members
        .iter()
        .filter(|m| m.state != MemberState::Draining)
        .count();
    if staying > 0 {
        return None;
    }
    let cx = Context {
        now_ms,
        view,
        measured: Measured {
            members: Vec::new(),
            joining: 0,
            silent: Vec::new(),
            ejected: Vec::new(),
        },
        load: Load {
            mean: None,
            total: 0.0,
            known: 0,
        },
        evidence: Evidence::default(),
        last_up: state.last_up_ms,
        last_down: state.last_down_ms,
    };
    let up = scale_from_zero(&cx, held)?;
    state.last_up_ms = Some(now_ms);
    Some(up)
}

/// Back to zero: with `min_size` 0 and `idle_to_zero_ms` set, the last
/// member goes once no front-end has seen a request (held, forwarded, or
/// answered from its cache) for that long, and none is held.
fn release_idle_last(cx: &Context<'_>, held: u32, idle_ms: u64) -> Option<Decision> {
    let s = cx.scaling();
    let window = s.idle_to_zero_ms;
    let cooling =
        cx.cooling(cx.last_down, s.cooldown_down_ms) || cx.cooling(cx.last_up, s.cooldown_down_ms);
    if window == 0
        || cx.view.policy.min_size > 0
        || cx.measured.active() != 1
        || cx.measured.joining > 0
        || held > 0
        || idle_ms < window
        || cooling
    {
        return None;
    }
    let last = cx.measured.members.first()?;
    Some(cx.decision(
        ReconfigAction::Release {
            server: last.server.clone(),
        },
        format!("no front-end has seen a request for {idle_ms} ms (idle_to_zero_ms {window}): down to zero"),
        Evidence {
            server_in_flight: last.in_flight,
            ..cx.evidence.clone()
        },
    ))
}

/// Step 5, reweight: one member hot while the cluster is not; restore it
/// once it would stay under target at full weight. Not within the scale-up
/// cooldown after a member came: the front-ends ramp a new member's share
/// up (slow start), so for a while the others carry more and look hot by
/// comparison; sending them less would fight the ramp.
fn reweight(
    cx: &Context<'_>,
    servers: &mut HashMap<ServerId, Tracked>,
    decisions: &mut Vec<Decision>,
) {
    let (s, now_ms) = (cx.scaling(), cx.now_ms);
    let cluster_hot = cx.load.mean.is_some_and(|m| m >= s.upper);
    let settling = cx.cooling(cx.last_up, s.cooldown_up_ms);
    for m in &cx.measured.members {
        let Some(t) = servers.get_mut(m.server) else {
            continue;
        };
        if t.asked_weight
            .is_some_and(|(_, at)| now_ms.saturating_sub(at) >= s.silent_after_ms)
        {
            t.asked_weight = None;
        }
        let (Some(u), false) = (m.utilisation, t.asked_weight.is_some()) else {
            continue;
        };
        let change = match (cluster_hot || settling, held_since(cx, t.above_upper_since)) {
            (false, Some(at)) => relieved(cx, m, u, at),
            _ => restored(cx, m, t, u),
        };
        if let Some((weight, since, reason)) = change {
            t.asked_weight = Some((weight as f32, now_ms));
            t.above_upper_since = None;
            t.cool_since = None;
            decisions.push(cx.decision(
                ReconfigAction::Reweight {
                    server: m.server.clone(),
                    weight,
                },
                reason,
                Evidence {
                    server_utilisation: Some(round(u)),
                    server_in_flight: m.in_flight,
                    held_since_ms: Some(since),
                    ..cx.evidence.clone()
                },
            ));
        }
    }
}

/// When `since` has held for the sustain window.
fn held_since(cx: &Context<'_>, since: Option<u64>) -> Option<u64> {
    since.filter(|&at| cx.now_ms.saturating_sub(at) >= cx.scaling().sustain_ms)
}

/// A member hot since `at`: its lower weight, if lower enough, and why.
fn relieved(cx: &Context<'_>, m: &Now<'_>, u: f64, at: u64) -> Option<(f64, u64, String)> {
    let s = cx.scaling();
    let weight = round_step(m.weight * s.target / u).max(MIN_WEIGHT);
    (weight < m.weight - WEIGHT_SENSITIVITY).then(|| {
        (
            weight,
            at,
            format!(
                "member at {:.2} above {} while the cluster is at {:.2}: send it less",
                u,
                s.upper,
                cx.load.mean.unwrap_or(0.0)
            ),
        )
    })
}

/// A cooled member's full weight back, with since when it was cool and why.
fn restored(cx: &Context<'_>, m: &Now<'_>, t: &Tracked, u: f64) -> Option<(f64, u64, String)> {
    if m.weight >= 1.0 {
        return None;
    }
    let at = held_since(cx, t.cool_since)?;
    Some((
        1.0,
        at,
        format!(
            "member cooled: {:.2} at weight {:.2} stays under target at full weight",
            u, m.weight
        ),
    ))
}

/// Step 6, release: when the others would carry the release window's peak
/// under target without it, a member under the lower level for that
/// window; or, when the cluster is spare (the others would stay under
/// [`SPARE_SHARE`] of target), as many members as it can spare
/// ([`spare_count`]), least in flight first. Only on complete data: a
/// missing reading is unknown, never zero.
fn release(
    cx: &Context<'_>,
    history: &History,
    servers: &HashMap<ServerId, Tracked>,
) -> Vec<Decision> {
    let (s, now_ms, active) = (cx.scaling(), cx.now_ms, cx.measured.active());
    let cooling_down =
        cx.cooling(cx.last_down, s.cooldown_down_ms) || cx.cooling(cx.last_up, s.cooldown_down_ms);
    if cooling_down
        || cx.measured.joining > 0
        || cx.measured.size() <= cx.view.policy.min_size
        || active < 2
        || !history.held(now_ms, s.release_sustain_ms, |x| x.complete)
    {
        return Vec::new();
    }
    let peak = history
        .window(now_ms, s.release_sustain_ms)
        .map(|w| w.map(|x| f64::from(x.total)).fold(0.0, f64::max))
        .unwrap_or(cx.load.total);
    let without_one = peak / f64::from(active - 1);
    if without_one >= s.target {
        return Vec::new();
    }
    let spare = without_one <= SPARE_SHARE * s.target;
    let count = if spare { spare_count(cx, peak) } else { 1 };
    let going = release_candidates(cx, servers, spare, count);
    let stay = active - u32::try_from(going.len()).unwrap_or(active);
    let projected = peak / f64::from(stay.max(1));
    let why = if spare {
        format!(
            "the cluster is spare: {} of {active} go, and the other {stay} carry the peak of the last {} ms at {projected:.2}, at most {SPARE_SHARE} of target {}",
            going.len(),
            s.release_sustain_ms,
            s.target
        )
    } else {
        format!(
            "under {} for {} ms; the other {stay} stay at {projected:.2} below target {} without it",
            s.lower, s.release_sustain_ms, s.target
        )
    };
    let below_since = |m: &Now<'_>| servers.get(m.server).and_then(|t| t.below_lower_since);
    let window = history.window_values(now_ms, s.release_sustain_ms);
    going
        .into_iter()
        .map(|m| {
            cx.decision(
                ReconfigAction::Release {
                    server: m.server.clone(),
                },
                why.clone(),
                Evidence {
                    window: window.clone(),
                    total_load: Some(round(peak)),
                    server_utilisation: m.utilisation.map(round),
                    server_in_flight: m.in_flight,
                    held_since_ms: below_since(m),
                    projected: Some(round(projected)),
                    ..cx.evidence.clone()
                },
            )
        })
        .collect()
}

/// How many members a spare cluster gives back at once: as many as leave
/// the others at [`SPARE_SHARE`] of target or less at the window's peak,
/// but at most half of them (Knative's default scale-down rate of 2), and
/// never below `min_size`. One at a time, a cluster grown for a spike
/// kept most of that size a cooldown per member after the spike ended.
fn spare_count(cx: &Context<'_>, peak: f64) -> usize {
    let active = cx.measured.active();
    let keep = ceil_u32(peak / (SPARE_SHARE * cx.scaling().target)).max(1);
    let by_load = active.saturating_sub(keep);
    let by_rate = active / 2;
    let by_min = cx.measured.size().saturating_sub(cx.view.policy.min_size);
    usize::try_from(by_load.min(by_rate).min(by_min).max(1)).unwrap_or(1)
}

/// Which members a release takes: the `count` with least work in flight
/// (an unknown count last) among those under the lower level for the
/// release window, or among all when the cluster is spare.
fn release_candidates<'a>(
    cx: &'a Context<'_>,
    servers: &HashMap<ServerId, Tracked>,
    spare: bool,
    count: usize,
) -> Vec<&'a Now<'a>> {
    let (s, now_ms) = (cx.scaling(), cx.now_ms);
    let under_lower = |m: &Now<'_>| {
        servers
            .get(m.server)
            .and_then(|t| t.below_lower_since)
            .is_some_and(|at| now_ms.saturating_sub(at) >= s.release_sustain_ms)
    };
    let mut candidates: Vec<&Now<'_>> = cx
        .measured
        .members
        .iter()
        .filter(|m| spare || under_lower(m))
        .collect();
    candidates.sort_by(|a, b| {
        let key = |m: &Now<'_>| (m.in_flight.is_none(), m.in_flight.unwrap_or(0));
        key(a)
            .cmp(&key(b))
            .then(
                a.utilisation
                    .unwrap_or(f64::MAX)
                    .total_cmp(&b.utilisation.unwrap_or(f64::MAX)),
            )
            .then(a.server.cmp(b.server))
    });
    candidates.truncate(count);
    candidates
}

fn round(x: f64) -> f64 {
    (x * 10_000.0).round() / 10_000.0
}

/// Down to a multiple of 0.05, so weights stay few and readable.
fn round_step(x: f64) -> f64 {
    ((x * 20.0).floor() / 20.0).clamp(0.0, 1.0)
}

fn ceil_u32(x: f64) -> u32 {
    // A hair of slack so 2.4 / 0.6 is 4, not 5.
    let c = (x - 1e-9).ceil();
    if c.is_finite() && c > 0.0 {
        c.min(f64::from(u32::MAX)) as u32
    } else {
        0
    }
}

#[cfg(test)]
mod tests {
    use headroom_shared::records::Measures;

    use super::*;

    fn view(members: &[&str]) -> ClusterView {
        ClusterView {
            id: ClusterId::new("web").expect("id"),
            generation: 1,
            policy: ClusterPolicy::default(),
            members: members
                .iter()
                .map(|s| MemberView {
                    server: ServerId::new(*s).expect("id"),
                    state: MemberState::Active,
                    weight: 1.0,
                    since_ms: 0,
                    request: None,
                })
                .collect(),
        }
    }

    fn report(server: &str, cpu: f64, source: ReportSource) -> PerformanceReport {
        let web = ClusterId::new("web").expect("id");
        PerformanceReport {
            cpu: Some(cpu),
            in_flight: Some(2),
            latency_p99_ms: Some(20.0),
            ..PerformanceReport::new(
                ServerId::new(server).expect("id"),
                Some(web),
                source,
                1,
                1_000,
            )
        }
    }

    #[test]
    fn front_end_views_merge_with_the_agents_and_are_bounded() {
        let mut decider = Decider::new();
        decider.set_cluster(0, view(&["s1"]));
        let web = ClusterId::new("web").expect("id");
        decider
            .observe(0, &web, &report("s1", 0.5, ReportSource::Agent))
            .expect("agent");
        for f in 0..10 {
            let mut r = report(
                "s1",
                0.0,
                ReportSource::Frontend {
                    frontend: format!("fe{f}"),
                },
            );
            r.cpu = None;
            r.in_flight = Some(1);
            r.latency_p99_ms = Some(40.0 + f64::from(f));
            decider.observe(0, &web, &r).expect("front-end");
        }
        let t = decider
            .servers
            .get(&ServerId::new("s1").expect("id"))
            .expect("tracked");
        assert_eq!(t.frontends.len(), MAX_FRONTENDS, "bounded");
        let now = t.current(0);
        assert_eq!(now.cpu, Some(0.5), "the agent's own CPU");
        assert_eq!(now.in_flight, Some(2), "the agent's own count wins");
        assert_eq!(
            now.latency_p99_ms,
            Some(49.0),
            "the worst latency seen from outside"
        );
        // Once the agent's reading is stale, the front-ends' counts add up.
        assert_eq!(t.current(3_100).in_flight, None, "all stale");
    }

    /// Every member's agent at `cpu` every second from `from` to `to`;
    /// every decision made.
    fn steady(
        decider: &mut Decider,
        members: &[&str],
        cpu: f64,
        from: u64,
        to: u64,
    ) -> Vec<Decision> {
        let web = ClusterId::new("web").expect("id");
        let mut decisions = Vec::new();
        for t in (from..=to).step_by(1_000) {
            for server in members {
                let r = PerformanceReport {
                    at_ms: t,
                    ..report(server, cpu, ReportSource::Agent)
                };
                decider.observe(t, &web, &r).expect("agent");
            }
            decisions.extend(decider.tick(t));
        }
        decisions
    }

    /// Runs a hot cluster from `from` to `to` (agents at CPU 0.9 every
    /// second); the times it asked for servers.
    fn hot(decider: &mut Decider, members: &[&str], from: u64, to: u64) -> Vec<u64> {
        let mut ups: Vec<u64> = steady(decider, members, 0.9, from, to)
            .into_iter()
            .filter(|d| matches!(d.action, ReconfigAction::Allocate { .. }))
            .map(|d| d.at_ms)
            .collect();
        ups.dedup();
        ups
    }

    fn grown(at: u64) -> ClusterView {
        let mut grown = view(&["s1", "s2", "s3"]);
        grown.members[2].since_ms = at;
        grown.members[2].request = Some(RequestId::new("up-1").expect("id"));
        grown
    }

    #[test]
    fn the_next_scale_up_waits_for_the_front_ends_to_follow_the_last() {
        let s = ClusterPolicy::default().scaling;
        assert_eq!((s.cooldown_up_ms, s.confirm_wait_ms), (10_000, 15_000));
        // Confirmed 12 s after it was written: the cooldown runs from then.
        let mut decider = Decider::new();
        decider.set_cluster(0, view(&["s1", "s2"]));
        let first = hot(&mut decider, &["s1", "s2"], 1_000, 10_000);
        let at = *first.first().expect("a first scale-up");
        decider.set_cluster(at, grown(at));
        let members = ["s1", "s2", "s3"];
        let waiting = hot(&mut decider, &members, at + 1_000, at + 12_000);
        assert!(waiting.is_empty(), "not confirmed yet: {waiting:?}");
        decider.confirmed(RequestId::new("up-1").expect("id"), at + 12_000);
        let next = hot(&mut decider, &members, at + 13_000, at + 30_000);
        assert_eq!(next.first(), Some(&(at + 22_000)), "{next:?}");

        // Never confirmed (an allocator that does not confirm, a lost
        // record): held back for confirm_wait_ms, no longer.
        let mut decider = Decider::new();
        decider.set_cluster(0, view(&["s1", "s2"]));
        hot(&mut decider, &["s1", "s2"], 1_000, 10_000);
        decider.set_cluster(at, grown(at));
        let next = hot(&mut decider, &members, at + 1_000, at + 30_000);
        assert_eq!(next.first(), Some(&(at + 15_000)), "{next:?}");

        // Without confirmation in view (a recording), as before: the
        // cooldown runs from the write.
        let mut decider = Decider::new();
        decider.set_cluster(0, view(&["s1", "s2"]));
        hot(&mut decider, &["s1", "s2"], 1_000, 10_000);
        let mut unnamed = grown(at);
        unnamed.members[2].request = None;
        decider.set_cluster(at, unnamed);
        let next = hot(&mut decider, &members, at + 1_000, at + 30_000);
        assert_eq!(next.first(), Some(&(at + 10_000)), "{next:?}");
    }

    fn demand(frontend: &str, held: u32, rate: f64) -> FrontendDemand {
        FrontendDemand {
            v: 1,
            cluster: ClusterId::new("web").expect("id"),
            frontend: frontend.to_owned(),
            held,
            requests_per_s: rate,
            interval_ms: 1_000,
            at_ms: 1,
        }
    }

    #[test]
    fn held_requests_bring_a_cluster_up_from_zero_at_once_sized_by_them() {
        let web = ClusterId::new("web").expect("id");
        let mut empty = view(&[]);
        empty.policy.min_size = 0;
        let mut decider = Decider::new();
        decider.set_cluster(0, empty);
        assert!(
            decider.tick(1_000).is_empty(),
            "nothing held, nothing asked"
        );
        decider
            .demand(1_500, &web, &demand("fe-2", 0, 3.0))
            .expect("taken");
        assert!(decider.take_urgent().is_empty(), "seen, but nothing held");
        // The first word of held requests is acted on at once, sized by
        // them: 100 at 64 in flight x 0.6 target each is 3 members.
        decider
            .demand(1_500, &web, &demand("fe-1", 100, 0.0))
            .expect("taken");
        let decisions = decider.take_urgent();
        assert!(
            matches!(&decisions[..], [d] if d.action == ReconfigAction::Allocate { count: 3, request_type: None } && d.at_ms == 1_500),
            "{decisions:?}"
        );
        decider
            .demand(1_600, &web, &demand("fe-2", 40, 0.0))
            .expect("taken");
        assert!(decider.take_urgent().is_empty(), "asked once");
        assert!(
            decider.tick(2_000).is_empty(),
            "not again at the evaluation"
        );
        decider
            .demand(2_500, &web, &demand("fe-1", 60, 0.0))
            .expect("taken");
        assert!(decider.tick(3_000).is_empty(), "not every second");
        // Word that is not fresh holds nothing at an evaluation.
        let mut decider = Decider::new();
        let mut empty = view(&[]);
        empty.policy.min_size = 0;
        empty.policy.scaling.cooldown_up_ms = 0;
        decider.set_cluster(0, empty);
        decider
            .demand(0, &web, &demand("fe-1", 60, 0.0))
            .expect("taken");
        assert_eq!(decider.take_urgent().len(), 1);
        assert!(
            decider.tick(3_001).is_empty(),
            "stale after three intervals"
        );
    }

    #[test]
    fn the_last_member_goes_only_after_the_idle_window_with_min_size_zero() {
        let web = ClusterId::new("web").expect("id");
        let run = |min_size: u32, idle_to_zero_ms: u64| {
            let mut one = view(&["s1"]);
            one.policy.min_size = min_size;
            one.policy.scaling.idle_to_zero_ms = idle_to_zero_ms;
            let mut decider = Decider::new();
            decider.set_cluster(0, one);
            let mut released = None;
            for t in (1_000..=40_000).step_by(1_000) {
                let r = PerformanceReport {
                    at_ms: t,
                    ..report("s1", 0.05, ReportSource::Agent)
                };
                decider.observe(t, &web, &r).expect("agent");
                // Requests until 10 s, then none.
                let rate = if t <= 10_000 { 5.0 } else { 0.0 };
                decider
                    .demand(t, &web, &demand("fe-1", 0, rate))
                    .expect("demand");
                let down = decider
                    .tick(t)
                    .into_iter()
                    .any(|d| matches!(d.action, ReconfigAction::Release { .. }));
                if down && released.is_none() {
                    released = Some(t);
                }
            }
            released
        };
        assert_eq!(run(0, 20_000), Some(30_000), "20 s after the last request");
        assert_eq!(run(0, 0), None, "off by default");
        assert_eq!(run(1, 20_000), None, "min_size keeps it");
    }

    #[test]
    fn a_policy_silent_after_less_than_the_freshness_floor_is_taken() {
        // silent_after_ms may be 1 s (the policy's own floor), under the
        // 1.5 s freshness floor: a report is then fresh for 1 s. It was a
        // panic in the monitor (found by the dead-application test).
        let mut decider = Decider::new();
        let mut cluster = view(&["s1"]);
        cluster.policy.scaling.silent_after_ms = 1_000;
        decider.set_cluster(0, cluster);
        let web = ClusterId::new("web").expect("id");
        decider
            .observe(0, &web, &report("s1", 0.5, ReportSource::Agent))
            .expect("taken");
        let t = &decider.servers[&ServerId::new("s1").expect("id")];
        assert_eq!(t.current(1_000).cpu, Some(0.5));
        assert_eq!(t.current(1_001).cpu, None, "stale after silent_after_ms");
    }

    /// At `t`: every agent of `members` reports, and front-ends fe0 and fe1
    /// report `ejected` members as ejected, the others as answering.
    fn seen(
        decider: &mut Decider,
        t: u64,
        members: &[&str],
        ejected: [&[&str]; 2],
    ) -> Vec<Decision> {
        let web = ClusterId::new("web").expect("id");
        for server in members {
            let r = PerformanceReport {
                at_ms: t,
                ..report(server, 0.5, ReportSource::Agent)
            };
            decider.observe(t, &web, &r).expect("agent");
            for (f, which) in ejected.iter().enumerate() {
                let r = PerformanceReport {
                    at_ms: t,
                    ejected: Some(which.contains(server)),
                    ..report(
                        server,
                        0.0,
                        ReportSource::Frontend {
                            frontend: format!("fe{f}"),
                        },
                    )
                };
                decider.observe(t, &web, &r).expect("front-end");
            }
        }
        decider.tick(t)
    }

    fn replaced(decisions: &[Decision]) -> Vec<&ServerId> {
        decisions
            .iter()
            .filter_map(|d| match &d.action {
                ReconfigAction::Replace { server } => Some(server),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn a_member_every_front_end_ejects_is_replaced_while_its_agent_reports() {
        let members = ["s1", "s2", "s3"];
        let mut decider = Decider::new();
        decider.set_cluster(0, view(&members));
        let silent_after = ClusterPolicy::default().scaling.silent_after_ms;
        // Only one front-end ejects it: its path, not the member.
        for t in (0..=silent_after + 2_000).step_by(1_000) {
            let decisions = seen(&mut decider, t, &members, [&["s1"], &[]]);
            assert!(replaced(&decisions).is_empty(), "{decisions:?}");
        }
        // Both eject it: replaced once silent_after_ms has passed, not before,
        // with who and since when.
        let start = silent_after + 3_000;
        let mut asked = Vec::new();
        for t in (start..=start + silent_after + 2_000).step_by(1_000) {
            for d in seen(&mut decider, t, &members, [&["s1"], &["s1"]]) {
                if matches!(d.action, ReconfigAction::Replace { .. }) {
                    asked.push((t, d));
                }
            }
        }
        assert_eq!(asked.len(), 1, "asked once: {asked:?}");
        let (at, decision) = &asked[0];
        assert_eq!(*at, start + silent_after, "after silent_after_ms of it");
        assert_eq!(
            replaced(std::slice::from_ref(decision)),
            [&ServerId::new("s1").expect("id")]
        );
        let by: Vec<(&str, u64)> = decision
            .evidence
            .ejected_by
            .iter()
            .map(|e| (e.frontend.as_str(), e.since_ms))
            .collect();
        // fe0 has said so since the start; fe1 since `start`.
        assert_eq!(by, [("fe0", 0), ("fe1", start)], "{decision:?}");
        assert!(decision.reason.contains("fe0") && decision.reason.contains("fe1"));

        // Two of three ejected by both: the front-ends' path failing, not
        // the members; nothing is replaced.
        let mut decider = Decider::new();
        decider.set_cluster(0, view(&members));
        for t in (0..=2 * silent_after).step_by(1_000) {
            let decisions = seen(&mut decider, t, &members, [&["s1", "s2"], &["s1", "s2"]]);
            assert!(replaced(&decisions).is_empty(), "{decisions:?}");
        }
    }

    /// `in_flight` requests on 8 slots for each of s1 and s2, at `t`.
    fn overload(decider: &mut Decider, t: u64, in_flight: u32) -> Vec<Decision> {
        let web = ClusterId::new("web").expect("id");
        for server in ["s1", "s2"] {
            let r = PerformanceReport {
                in_flight: Some(in_flight),
                concurrency: Some(8),
                ..report(server, 0.0, ReportSource::Agent)
            };
            decider.observe(t, &web, &r).expect("report");
        }
        decider.tick(t)
    }

    #[test]
    fn a_large_overload_scales_up_without_waiting_out_the_sustain_window() {
        let mut decider = Decider::new();
        let mut cluster = view(&["s1", "s2"]);
        cluster.policy.max_size = 20;
        // Sized by the readings alone here; the trend is tested apart.
        cluster.policy.scaling.project_rise = false;
        cluster.policy.scaling.measures = Measures {
            cpu: 0.0,
            in_flight: 1.0,
            ..Measures::default()
        };
        decider.set_cluster(0, cluster);
        for t in (0..5_000).step_by(1_000) {
            assert!(overload(&mut decider, t, 4).is_empty(), "0.5 each");
        }
        // 12 in flight on 8 slots: 1.5 each, over twice the target.
        assert!(overload(&mut decider, 5_000, 12).is_empty(), "one reading");
        let decisions = overload(&mut decider, 6_000, 12);
        assert_eq!(decisions.len(), 1, "{decisions:?}");
        // Within a second, not the 2 s sustain window; sized by the load
        // of both readings: ceil(3.0 / 0.6) = 5, three more.
        assert_eq!(
            decisions[0].action,
            ReconfigAction::Allocate {
                count: 3,
                request_type: None
            }
        );
        assert!(decisions[0].reason.starts_with("overload"), "{decisions:?}");

        // Just under twice the target (1.125 each) waits for the window.
        let mut decider = Decider::new();
        let mut cluster = view(&["s1", "s2"]);
        cluster.policy.scaling.measures = Measures {
            cpu: 0.0,
            in_flight: 1.0,
            ..Measures::default()
        };
        decider.set_cluster(0, cluster);
        let mut first = None;
        for t in (0..10_000).step_by(1_000) {
            if !overload(&mut decider, t, 9).is_empty() && first.is_none() {
                first = Some(t);
            }
        }
        assert_eq!(first, Some(2_000), "after the sustain window");
    }

    /// Every member at `cpu` every second for `seconds`; the releases.
    fn even(decider: &mut Decider, members: &[&str], cpu: f64, seconds: u64) -> Vec<Decision> {
        steady(decider, members, cpu, 0, (seconds - 1) * 1_000)
            .into_iter()
            .filter(|d| matches!(d.action, ReconfigAction::Release { .. }))
            .collect()
    }

    #[test]
    fn an_evenly_loaded_cluster_that_is_spare_gives_one_member_back() {
        let members = ["s1", "s2", "s3", "s4"];
        let window = ScalingPolicy::default().release_sustain_ms;
        // 0.40 each, none under the lower level (0.30): without one, the
        // other three carry 1.6 at 0.533, under 0.9 of the target (0.54).
        let mut decider = Decider::new();
        decider.set_cluster(0, view(&members));
        let releases = even(&mut decider, &members, 0.40, 40);
        assert_eq!(releases.len(), 1, "{releases:?}");
        assert!(
            releases[0].at_ms >= window,
            "not before the release window: {}",
            releases[0].at_ms
        );
        assert!(
            releases[0].reason.contains("spare"),
            "{}",
            releases[0].reason
        );
        assert_eq!(releases[0].evidence.projected, Some(0.5333));
        // 0.42 each: the others would be at 0.56, within 10 % of the
        // target: a release there would bring noise back over it.
        let mut decider = Decider::new();
        decider.set_cluster(0, view(&members));
        assert!(even(&mut decider, &members, 0.42, 60).is_empty());
    }

    #[test]
    fn a_cluster_grown_for_a_spike_gives_back_what_it_can_spare_at_once_up_to_half() {
        let members: Vec<String> = (1..=12).map(|i| format!("s{i:02}")).collect();
        let members: Vec<&str> = members.iter().map(String::as_str).collect();
        // 12 at 0.22 each: 2.64 servers of load, which 5 carry at 0.53
        // (4 would be at 0.66): 7 could go, but at most half do, 6.
        let mut decider = Decider::new();
        decider.set_cluster(0, view(&members));
        let releases = even(&mut decider, &members, 0.22, 40);
        assert_eq!(releases.len(), 6, "{releases:?}");
        assert!(releases.iter().all(|r| r.at_ms == releases[0].at_ms));
        assert_eq!(releases[0].evidence.projected, Some(0.44));
        assert!(
            releases[0].reason.contains("6 of 12 go"),
            "{}",
            releases[0].reason
        );
        // Never below the minimum: with min_size 10, two go.
        let mut decider = Decider::new();
        let mut cluster = view(&members);
        cluster.policy.min_size = 10;
        decider.set_cluster(0, cluster);
        assert_eq!(even(&mut decider, &members, 0.22, 40).len(), 2);
    }

    #[test]
    fn a_rising_load_is_projected_to_when_the_step_serves() {
        let mut history = History::default();
        // 1.0, 1.5, 2.0 at 0, 1 and 2 s: 0.5 a second, so 2.5 a second
        // after the newest; held at 1.0, it is clamped to twice that.
        for (at_ms, total) in [(0, 1.0f32), (1_000, 1.5), (2_000, 2.0)] {
            history.push(
                Sample {
                    at_ms,
                    mean: Some(total),
                    total,
                    complete: true,
                },
                10_000,
            );
        }
        assert_eq!(history.least_load(2_000, 2_000), Some(1.0));
        assert!((history.expected_load(2_000, 2_000, 1_000, 1.0) - 2.0).abs() < 1e-9);
        assert!((history.expected_load(2_000, 2_000, 0, 1.8) - 2.0).abs() < 1e-9);
        // Falling or flat: the held load as it is.
        for s in history.samples.iter_mut() {
            s.total = 3.0 - s.total;
        }
        assert_eq!(history.expected_load(2_000, 2_000, 1_000, 1.0), 1.0);
    }

    #[test]
    fn reports_about_strangers_are_refused() {
        let mut decider = Decider::new();
        decider.set_cluster(0, view(&["s1"]));
        let web = ClusterId::new("web").expect("id");
        let api = ClusterId::new("api").expect("id");
        let err = decider
            .observe(0, &web, &report("s2", 0.5, ReportSource::Agent))
            .expect_err("stranger");
        assert_eq!(err.code(), codes::NOT_A_MEMBER);
        let err = decider
            .observe(0, &api, &report("s1", 0.5, ReportSource::Agent))
            .expect_err("no such cluster");
        assert_eq!(err.code(), codes::UNKNOWN_CLUSTER);
        // A member that leaves stops being tracked.
        decider.set_cluster(0, view(&[]));
        assert_eq!(decider.tracked_servers(), 0);
    }

    #[test]
    fn a_member_that_never_reported_is_silent_from_when_it_was_seen() {
        let mut decider = Decider::new();
        decider.set_cluster(5_000, view(&["s1", "s2"]));
        let web = ClusterId::new("web").expect("id");
        let mut decisions = Vec::new();
        for t in (5_000..=20_000).step_by(1_000) {
            decider
                .observe(t, &web, &report("s1", 0.5, ReportSource::Agent))
                .expect("report");
            decisions.extend(decider.tick(t));
        }
        assert_eq!(decisions.len(), 1, "{decisions:?}");
        assert_eq!(
            decisions[0].at_ms, 15_000,
            "silent_after_ms from first sight"
        );
        assert_eq!(
            decisions[0].action,
            ReconfigAction::Replace {
                server: ServerId::new("s2").expect("id")
            }
        );
        assert_eq!(decisions[0].request_id(), "replace-s2-15000");
    }
}
