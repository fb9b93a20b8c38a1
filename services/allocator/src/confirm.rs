//! Confirmation by the data plane: a request's change is done when every
//! live front-end of its cluster routes by a generation that holds it, not
//! when the allocator wrote it.
//!
//! Every instance hears every front-end's [`FrontendApplied`] and follows
//! the clusters bucket, so each can tell when a change is followed by
//! traffic. Whichever instance first creates the request's
//! [`RequestConfirmed`] in the requests bucket logs the `confirmed` event,
//! so it is logged once. A front-end silent for three of its report
//! intervals is gone and holds nothing back; one that is live but behind
//! past [`AllocatorConfig::confirm_deadline`] is named in a `lagging`
//! event.
//!
//! [`AllocatorConfig::confirm_deadline`]: headroom_shared::config::AllocatorConfig::confirm_deadline

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream::kv;
use futures::StreamExt;
use headroom_shared::codec::Codec;
use headroom_shared::ledger::{FrontendGeneration, RequestConfirmed};
use headroom_shared::records::{ClusterRecord, MemberState};
use headroom_shared::subjects;
use headroom_shared::time::now_ms;
use headroom_shared::wire::{DrainingMember, EventKind, FrontendApplied};
use headroom_shared::{ClusterId, RequestId, ServerId, SCHEMA_VERSION};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::ops::{Event, Fact};
use crate::{Allocator, AllocatorError};

/// A front-end silent for this many of its report intervals is gone.
const GONE_AFTER_INTERVALS: u64 = 3;

/// Changes older than this when first seen (an instance starting, a record
/// replayed) are not confirmed again: whatever confirmed them has.
const TRACK_WINDOW_MS: u64 = 10 * 60 * 1000;

/// How long an agent's word that its server is drained is kept for a
/// drain this instance has not read yet.
const AGENT_WORD_KEPT_MS: u64 = 60_000;

/// How often waiting changes are looked at.
const TICK: Duration = Duration::from_millis(100);

/// The last word of one front-end, in this instance's monotonic time.
#[derive(Debug, Clone)]
struct Heard {
    generation: u64,
    interval_ms: u64,
    at: u64,
    /// What it still had open with each member it has as draining.
    draining: Vec<DrainingMember>,
}

/// A change waiting for the front-ends.
#[derive(Debug, Clone)]
struct Pending {
    cluster: ClusterId,
    /// The first generation that held the whole change.
    generation: u64,
    seen_at: u64,
    lagging_said: bool,
    gone: Vec<String>,
}

/// What [`Confirmer::due`] found.
#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    Confirmed {
        request: RequestId,
        cluster: ClusterId,
        generation: u64,
        frontends: Vec<FrontendGeneration>,
        gone: Vec<String>,
    },
    Lagging {
        request: RequestId,
        cluster: ClusterId,
        generation: u64,
        behind: Vec<FrontendGeneration>,
        waited_ms: u64,
    },
}

/// One live front-end's open work with a draining member.
#[derive(Debug, Clone, PartialEq)]
pub struct OpenWork {
    pub frontend: String,
    pub in_flight: u32,
    pub tunnels: u32,
    /// Nothing answered by the member for one report interval.
    pub quiet: bool,
}

/// What is known of a drain's progress: the evidence it ends on, or the
/// work it cut when it ends on its deadline.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct DrainEvidence {
    pub frontends: Vec<OpenWork>,
    /// Live front-ends that do not have it as draining yet: they may still
    /// send it requests.
    pub routing: Vec<String>,
    pub agent_drained: bool,
}

impl DrainEvidence {
    /// Every live front-end has it as draining, has nothing open with it,
    /// and has had nothing from it for an interval.
    pub fn proven(&self) -> bool {
        self.routing.is_empty()
            && self
                .frontends
                .iter()
                .all(|f| f.in_flight == 0 && f.tunnels == 0 && f.quiet)
    }

    /// For the audit log; `has_agent`: whether the server has an agent
    /// whose word counts.
    pub fn describe(&self, has_agent: bool) -> String {
        let mut parts: Vec<String> = self
            .frontends
            .iter()
            .map(|f| {
                let mut said = format!("{} {} in flight", f.frontend, f.in_flight);
                match f.tunnels {
                    0 => {}
                    1 => said.push_str(" (1 WebSocket tunnel)"),
                    n => said.push_str(&format!(" ({n} WebSocket tunnels)")),
                }
                said
            })
            .collect();
        if !self.routing.is_empty() {
            parts.push(format!("still routing to it: {}", self.routing.join(", ")));
        }
        if parts.is_empty() {
            parts.push("no front-end live".to_owned());
        }
        let agent = match (has_agent, self.agent_drained) {
            (_, true) => "; its agent saw nothing in flight",
            (true, false) => "; its agent had not said it was idle",
            (false, false) => "",
        };
        format!("{}{agent}", parts.join(", "))
    }
}

/// Which changes every live front-end follows: the state, fed with what is
/// heard and read, asked at each tick. Times are milliseconds of one
/// monotonic clock, so that tests can drive it.
#[derive(Debug)]
pub struct Confirmer {
    frontends: HashMap<ClusterId, BTreeMap<String, Heard>>,
    pending: BTreeMap<RequestId, Pending>,
    /// Per cluster, the requests in its record that are confirmed, so that
    /// a later write does not bring them back.
    done: HashMap<ClusterId, HashSet<RequestId>>,
    started_at: u64,
    /// Until this long after starting, nothing is confirmed: a front-end
    /// not heard yet is not known to be gone.
    listen_first_ms: u64,
    deadline_ms: u64,
    /// Members being drained, by server: their cluster.
    draining: HashMap<ServerId, ClusterId>,
    /// Per (front-end, draining member): its answer count, and since when
    /// it has stood still.
    quiet: HashMap<(String, ServerId), (u64, u64)>,
    /// Servers whose agent said nothing is in flight on its drain, and
    /// when: its word may come before this instance reads the record that
    /// drains it.
    agent_drained: HashMap<ServerId, u64>,
    epoch: Instant,
}

impl Confirmer {
    /// Listening from its clock's start ([`Confirmer::now`] 0), until
    /// [`Confirmer::start`] says otherwise.
    pub fn new(listen_first: Duration, deadline: Duration) -> Self {
        Self {
            frontends: HashMap::new(),
            pending: BTreeMap::new(),
            done: HashMap::new(),
            started_at: 0,
            listen_first_ms: millis(listen_first),
            deadline_ms: millis(deadline),
            draining: HashMap::new(),
            quiet: HashMap::new(),
            agent_drained: HashMap::new(),
            epoch: Instant::now(),
        }
    }

    /// Milliseconds of this instance's monotonic clock, the one `now` is
    /// in when live.
    pub fn now(&self) -> u64 {
        millis(self.epoch.elapsed())
    }

    /// Starts listening afresh at `now` with these timings (the serve loop,
    /// as it starts).
    pub fn start(&mut self, now: u64, listen_first: Duration, deadline: Duration) {
        self.started_at = now;
        self.listen_first_ms = millis(listen_first);
        self.deadline_ms = millis(deadline);
    }

    /// A front-end said which generation it routes by.
    pub fn heard(&mut self, said: &FrontendApplied, now: u64) {
        let heard = Heard {
            generation: said.generation,
            interval_ms: u64::from(said.interval_ms.max(1)),
            at: now,
            draining: said.draining.clone(),
        };
        for open in &said.draining {
            let key = (said.frontend.clone(), open.server.clone());
            match self.quiet.get_mut(&key) {
                Some(quiet) if quiet.0 == open.answered => {}
                _ => {
                    self.quiet.insert(key, (open.answered, now));
                }
            }
        }
        self.frontends
            .entry(said.cluster.clone())
            .or_default()
            .insert(said.frontend.clone(), heard);
    }

    /// A cluster record as written: the requests whose whole change it
    /// holds start waiting, at its generation. `wall_ms` is the allocator's
    /// clock, which the members' `since_ms` are in.
    pub fn record(&mut self, record: &ClusterRecord, now: u64, wall_ms: u64) {
        let still_joining: HashSet<&RequestId> = record
            .members
            .iter()
            .filter(|m| m.state == MemberState::Joining)
            .map(|m| &m.request)
            .collect();
        let recent = |since_ms: u64| wall_ms.saturating_sub(since_ms) <= TRACK_WINDOW_MS;
        let mut changed: HashSet<&RequestId> = HashSet::new();
        for m in record.members.iter().filter(|m| recent(m.since_ms)) {
            match m.state {
                MemberState::Active if !still_joining.contains(&m.request) => {
                    changed.insert(&m.request);
                }
                MemberState::Draining => changed.extend(m.drain_request.as_ref()),
                _ => {}
            }
        }
        self.draining.retain(|_, c| c != &record.id);
        for m in &record.members {
            if m.state == MemberState::Draining {
                self.draining.insert(m.server.clone(), record.id.clone());
            } else {
                // A join after its drain: that word was of the last one.
                self.agent_drained.remove(&m.server);
            }
        }
        let draining = &self.draining;
        self.agent_drained.retain(|s, at| {
            draining.contains_key(s) || now.saturating_sub(*at) < AGENT_WORD_KEPT_MS
        });
        self.quiet.retain(|(_, s), _| draining.contains_key(s));
        let done = self.done.entry(record.id.clone()).or_default();
        // What the record no longer shows cannot come back.
        let shown: HashSet<&RequestId> = record
            .members
            .iter()
            .flat_map(|m| std::iter::once(&m.request).chain(m.drain_request.as_ref()))
            .collect();
        done.retain(|r| shown.contains(r));
        for request in changed {
            if done.contains(request) || self.pending.contains_key(request) {
                continue;
            }
            self.pending.insert(
                request.clone(),
                Pending {
                    cluster: record.id.clone(),
                    generation: record.generation,
                    seen_at: now,
                    lagging_said: false,
                    gone: Vec::new(),
                },
            );
        }
    }

    /// A cluster was deleted: nothing of it waits.
    pub fn forget(&mut self, cluster: &ClusterId) {
        self.pending.retain(|_, p| &p.cluster != cluster);
        self.draining.retain(|_, c| c != cluster);
        self.done.remove(cluster);
        self.frontends.remove(cluster);
    }

    /// Confirms what every live front-end follows, and names once those
    /// behind past the deadline; first forgets the front-ends gone silent.
    pub fn due(&mut self, now: u64) -> Vec<Verdict> {
        if self.listening(now) {
            return Vec::new();
        }
        self.drop_gone(now);
        self.check(now, |_| true)
    }

    /// [`Confirmer::due`] for one cluster, at once on word from one of its
    /// front-ends or a new record: a confirmation waits for no tick. The
    /// silent are forgotten only at [`Confirmer::due`], whose sweep of
    /// every front-end is too much for each message.
    pub fn due_for(&mut self, cluster: &ClusterId, now: u64) -> Vec<Verdict> {
        if self.listening(now) {
            return Vec::new();
        }
        self.check(now, |c| c == cluster)
    }

    /// Until a while after starting nothing is confirmed: a front-end
    /// not heard yet is not known to be gone.
    fn listening(&self, now: u64) -> bool {
        now.saturating_sub(self.started_at) < self.listen_first_ms
    }

    fn check(&mut self, now: u64, wanted: impl Fn(&ClusterId) -> bool) -> Vec<Verdict> {
        let mut verdicts = Vec::new();
        let mut confirmed = Vec::new();
        for (request, p) in self.pending.iter_mut().filter(|(_, p)| wanted(&p.cluster)) {
            let live = self.frontends.get(&p.cluster);
            let of = |f: (&String, &Heard)| FrontendGeneration {
                frontend: f.0.clone(),
                generation: f.1.generation,
            };
            let behind: Vec<FrontendGeneration> = live
                .into_iter()
                .flatten()
                .filter(|(_, h)| h.generation < p.generation)
                .map(of)
                .collect();
            let waited_ms = now.saturating_sub(p.seen_at);
            if behind.is_empty() {
                verdicts.push(Verdict::Confirmed {
                    request: request.clone(),
                    cluster: p.cluster.clone(),
                    generation: p.generation,
                    frontends: live.into_iter().flatten().map(of).collect(),
                    gone: std::mem::take(&mut p.gone),
                });
                confirmed.push(request.clone());
            } else if waited_ms >= self.deadline_ms && !p.lagging_said {
                p.lagging_said = true;
                verdicts.push(Verdict::Lagging {
                    request: request.clone(),
                    cluster: p.cluster.clone(),
                    generation: p.generation,
                    behind,
                    waited_ms,
                });
            }
        }
        for request in confirmed {
            if let Some(p) = self.pending.remove(&request) {
                self.done.entry(p.cluster).or_default().insert(request);
            }
        }
        verdicts
    }

    /// Front-ends silent for three of their intervals no longer count; the
    /// changes of their cluster that were waiting say so when confirmed.
    fn drop_gone(&mut self, now: u64) {
        for (cluster, frontends) in &mut self.frontends {
            let gone: Vec<String> = frontends
                .iter()
                .filter(|(_, h)| now.saturating_sub(h.at) > GONE_AFTER_INTERVALS * h.interval_ms)
                .map(|(name, _)| name.clone())
                .collect();
            for name in gone {
                frontends.remove(&name);
                info!(%cluster, frontend = %name, "front-end silent for three report intervals: gone");
                for p in self.pending.values_mut().filter(|p| &p.cluster == cluster) {
                    p.gone.push(name.clone());
                }
            }
        }
    }

    /// A draining server's agent said nothing is in flight there.
    pub fn agent_drained(&mut self, server: &ServerId, now: u64) {
        self.agent_drained.insert(server.clone(), now);
    }

    /// What the live front-ends of `cluster` have open with `server`.
    pub fn drain_evidence(
        &self,
        cluster: &ClusterId,
        server: &ServerId,
        now: u64,
    ) -> DrainEvidence {
        let mut evidence = DrainEvidence {
            agent_drained: self.agent_drained.contains_key(server),
            ..DrainEvidence::default()
        };
        for (name, heard) in self.frontends.get(cluster).into_iter().flatten() {
            let Some(open) = heard.draining.iter().find(|d| &d.server == server) else {
                // Still routing to it, or not yet told: not proven.
                evidence.routing.push(name.clone());
                continue;
            };
            let quiet_ms = self
                .quiet
                .get(&(name.clone(), server.clone()))
                .map_or(0, |(_, since)| now.saturating_sub(*since));
            evidence.frontends.push(OpenWork {
                frontend: name.clone(),
                in_flight: open.in_flight,
                tunnels: open.tunnels,
                quiet: quiet_ms >= heard.interval_ms,
            });
        }
        evidence
    }

    /// Drains that every live front-end proves over (nothing in flight,
    /// nothing answered for one of its report intervals) and, for a server
    /// with an agent (`has_agent`), its agent too: each with what proved it.
    pub fn drains_due(
        &self,
        now: u64,
        has_agent: impl Fn(&ServerId) -> bool,
    ) -> Vec<(ClusterId, ServerId, DrainEvidence)> {
        if self.listening(now) {
            return Vec::new();
        }
        self.draining
            .iter()
            .map(|(server, cluster)| (cluster, server, self.drain_evidence(cluster, server, now)))
            .filter(|(_, server, e)| e.proven() && (e.agent_drained || !has_agent(server)))
            .map(|(c, s, e)| (c.clone(), s.clone(), e))
            .collect()
    }

    /// How many changes wait.
    pub fn waiting(&self) -> usize {
        self.pending.len()
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// Follows the front-ends and the clusters bucket until `stop`, confirming
/// changes and naming laggards as [`Confirmer`] finds them.
///
/// # Errors
/// When the front-ends' subject cannot be subscribed to.
pub async fn serve(
    allocator: Arc<Allocator>,
    client: async_nats::Client,
    listen_first: Duration,
    deadline: Duration,
    stop: CancellationToken,
) -> Result<&'static str, AllocatorError> {
    let mut applied = client
        .subscribe(subjects::FRONTEND_APPLIED_ALL)
        .await
        .map_err(|e| AllocatorError::Setup("front-ends' applied subscription", e.into()))?;
    let mut clusters = std::pin::pin!(headroom_shared::kv::follow(
        allocator.store.clusters_bucket(),
        ">".to_owned(),
        stop.clone(),
    ));
    {
        let mut view = allocator.data_plane();
        let now = view.now();
        view.start(now, listen_first, deadline);
    }
    // The lock is held for each step, never across an await.
    let with = |f: &mut dyn FnMut(&mut Confirmer, u64) -> Vec<Verdict>| {
        let mut view = allocator.data_plane();
        let now = view.now();
        f(&mut view, now)
    };
    let mut ticker = tokio::time::interval(TICK);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let verdicts = tokio::select! {
            () = stop.cancelled() => return Ok("confirmations"),
            Some(message) = applied.next() => match crate::read_own::<FrontendApplied>(
                &allocator,
                "applied",
                &message,
                |said| subjects::frontend_applied(&said.cluster, &said.frontend),
            ) {
                Some(said) => with(&mut |c, now| {
                    c.heard(&said, now);
                    c.due_for(&said.cluster, now)
                }),
                None => continue,
            },
            Some(entry) = clusters.next() => with(&mut |c, now| {
                match on_record(c, &entry, now) {
                    Some(cluster) => c.due_for(&cluster, now),
                    None => Vec::new(),
                }
            }),
            _ = ticker.tick() => {
                finish_proven_drains(&allocator).await;
                with(&mut |c, now| c.due(now))
            }
        };
        for verdict in verdicts {
            act(&allocator, verdict).await;
        }
    }
}

/// Ends each drain its evidence proves over: every live front-end has
/// nothing open with the member, and its agent (where it has one) agrees.
async fn finish_proven_drains(allocator: &Allocator) {
    let due = {
        let view = allocator.data_plane();
        let has_agent = |s: &ServerId| allocator.pool.get(s).is_some_and(|r| r.value.agent);
        view.drains_due(view.now(), has_agent)
    };
    for (cluster, server, evidence) in due {
        let has_agent = allocator.pool.get(&server).is_some_and(|r| r.value.agent);
        let why = format!("drained: {}", evidence.describe(has_agent));
        if let Err(err) = allocator.finish_drain(&cluster, &server, &why).await {
            warn!(%err, %cluster, %server, "could not finish a proven drain");
        }
    }
}

/// Takes a cluster's record, or its deletion; the cluster, when it still
/// has one.
fn on_record(confirmer: &mut Confirmer, entry: &kv::Entry, now: u64) -> Option<ClusterId> {
    let cluster = ClusterId::new(entry.key.clone()).ok()?;
    if entry.operation != kv::Operation::Put {
        confirmer.forget(&cluster);
        return None;
    }
    match Codec::MsgPack.decode::<ClusterRecord>(&entry.value) {
        Ok(record) => confirmer.record(&record, now, now_ms()),
        Err(err) => debug!(%err, key = %entry.key, "cluster record not read for confirmation"),
    }
    Some(cluster)
}

/// Records a confirmation once and logs it, or logs a laggard.
async fn act(allocator: &Allocator, verdict: Verdict) {
    match verdict {
        Verdict::Confirmed {
            request,
            cluster,
            generation,
            frontends,
            gone,
        } => {
            let issued_ms = match allocator.store.started(&request).await {
                Ok(started) => started.map_or(0, |s| s.issued_ms),
                Err(err) => {
                    debug!(%err, %request, "decision time not read");
                    0
                }
            };
            let confirmed = RequestConfirmed {
                v: SCHEMA_VERSION,
                id: request,
                cluster,
                generation,
                issued_ms,
                confirmed_ms: now_ms(),
                frontends,
                gone,
                by: allocator.instance().to_owned(),
            };
            match allocator.store.confirm(&confirmed).await {
                Ok(standing) if standing == confirmed => log_confirmed(allocator, &confirmed).await,
                Ok(_) => debug!(request = %confirmed.id, "confirmed by another instance"),
                Err(err) => warn!(%err, request = %confirmed.id, "confirmation not recorded"),
            }
        }
        Verdict::Lagging {
            request,
            cluster,
            generation,
            behind,
            waited_ms,
        } => {
            let names = describe(&behind);
            warn!(%cluster, %request, generation, behind = %names, waited_ms, "front-ends have not applied a change");
            let detail = format!(
                "generation {generation} not applied {waited_ms} ms after it was written by: {names}"
            );
            let fact = Fact::Request {
                request: &request,
                server: None,
            };
            allocator
                .log(
                    Event::new(EventKind::Lagging, fact)
                        .cluster(&cluster)
                        .request(&request)
                        .detail(detail),
                )
                .await;
        }
    }
}

async fn log_confirmed(allocator: &Allocator, confirmed: &RequestConfirmed) {
    let waited = confirmed
        .waited_ms()
        .map_or("decision time unknown".to_owned(), |ms| {
            format!("{ms} ms after the decision")
        });
    if let Some(ms) = confirmed.waited_ms() {
        allocator
            .metrics
            .confirm_seconds
            .observe(Duration::from_millis(ms));
    }
    let mut detail = format!(
        "generation {} applied by every live front-end, {waited}: {}",
        confirmed.generation,
        describe(&confirmed.frontends)
    );
    if !confirmed.gone.is_empty() {
        detail.push_str(&format!("; gone meanwhile: {}", confirmed.gone.join(", ")));
    }
    info!(cluster = %confirmed.cluster, request = %confirmed.id, %detail, "change confirmed");
    let fact = Fact::Request {
        request: &confirmed.id,
        server: None,
    };
    allocator
        .log(
            Event::new(EventKind::Confirmed, fact)
                .cluster(&confirmed.cluster)
                .request(&confirmed.id)
                .detail(detail),
        )
        .await;
}

fn describe(frontends: &[FrontendGeneration]) -> String {
    if frontends.is_empty() {
        return "no front-end live".to_owned();
    }
    frontends
        .iter()
        .map(|f| format!("{} at {}", f.frontend, f.generation))
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use headroom_shared::records::{ClusterPolicy, Member};
    use headroom_shared::ServerId;

    fn cluster() -> ClusterId {
        ClusterId::new("web").expect("id")
    }

    fn request(id: &str) -> RequestId {
        RequestId::new(id).expect("id")
    }

    fn member(server: &str, state: MemberState, by: &str, since_ms: u64) -> Member {
        Member {
            server: ServerId::new(server).expect("id"),
            address: "10.0.0.1".to_owned(),
            port: 80,
            request_types: Vec::new(),
            state,
            weight: 1.0,
            request: request(by),
            drain_request: None,
            since_ms,
            joined: 1,
        }
    }

    fn record(generation: u64, members: Vec<Member>) -> ClusterRecord {
        let policy = ClusterPolicy {
            min_size: 0,
            max_size: 10,
            ..ClusterPolicy::default()
        };
        let mut record = ClusterRecord::new(cluster(), policy, 0);
        record.members = members;
        record.generation = generation;
        record
    }

    fn said(frontend: &str, generation: u64) -> FrontendApplied {
        FrontendApplied {
            v: SCHEMA_VERSION,
            cluster: cluster(),
            frontend: frontend.to_owned(),
            generation,
            interval_ms: 1_000,
            at_ms: 0,
            draining: Vec::new(),
        }
    }

    const WALL: u64 = 1_000_000;

    fn confirmer() -> Confirmer {
        Confirmer::new(Duration::from_secs(3), Duration::from_secs(5))
    }

    fn confirmed(verdicts: &[Verdict]) -> Vec<&str> {
        verdicts
            .iter()
            .filter_map(|v| match v {
                Verdict::Confirmed { request, .. } => Some(request.as_str()),
                Verdict::Lagging { .. } => None,
            })
            .collect()
    }

    #[test]
    fn a_change_is_confirmed_when_every_live_front_end_routes_by_it() {
        let mut c = confirmer();
        c.heard(&said("fe-1", 4), 0);
        c.heard(&said("fe-2", 4), 0);
        c.record(
            &record(4, vec![member("s1", MemberState::Joining, "up", WALL)]),
            0,
            WALL,
        );
        assert_eq!(
            c.waiting(),
            0,
            "a joining member is not a change traffic can follow"
        );
        c.record(
            &record(5, vec![member("s1", MemberState::Active, "up", WALL)]),
            100,
            WALL,
        );
        assert_eq!(c.waiting(), 1);
        c.heard(&said("fe-1", 4), 2_500);
        c.heard(&said("fe-2", 4), 2_500);
        assert!(c.due(3_000).is_empty(), "neither has applied generation 5");
        c.heard(&said("fe-1", 5), 3_100);
        assert!(confirmed(&c.due(3_100)).is_empty(), "fe-2 is behind");
        c.heard(&said("fe-2", 6), 3_200);
        let other = ClusterId::new("api").expect("id");
        assert!(
            c.due_for(&other, 3_200).is_empty(),
            "another cluster's word"
        );
        let verdicts = c.due_for(&cluster(), 3_200);
        assert_eq!(confirmed(&verdicts), ["up"]);
        let Verdict::Confirmed {
            frontends,
            generation,
            ..
        } = &verdicts[0]
        else {
            unreachable!()
        };
        assert_eq!(*generation, 5);
        assert_eq!(frontends.len(), 2);
        // A later write of the same members does not confirm it again.
        c.record(
            &record(6, vec![member("s1", MemberState::Active, "up", WALL)]),
            3_300,
            WALL,
        );
        assert!(c.due(3_400).is_empty());
    }

    #[test]
    fn nothing_is_confirmed_before_the_front_ends_had_time_to_speak() {
        let mut c = confirmer();
        c.record(
            &record(2, vec![member("s1", MemberState::Active, "up", WALL)]),
            0,
            WALL,
        );
        assert!(
            c.due(2_999).is_empty(),
            "a front-end not heard yet may be live"
        );
        assert_eq!(confirmed(&c.due(3_000)), ["up"], "none spoke: none is live");
    }

    #[test]
    fn a_laggard_is_named_once_and_a_silent_one_stops_holding_back() {
        let mut c = confirmer();
        c.record(
            &record(7, vec![member("s1", MemberState::Active, "up", WALL)]),
            0,
            WALL,
        );
        for t in (0..=5_000).step_by(1_000) {
            c.heard(&said("fe-1", 7), t);
            c.heard(&said("fe-2", 6), t);
        }
        let verdicts = c.due(5_000);
        assert!(
            matches!(&verdicts[..], [Verdict::Lagging { behind, .. }] if behind == &[FrontendGeneration { frontend: "fe-2".to_owned(), generation: 6 }]),
            "{verdicts:?}"
        );
        assert!(c.due(5_100).is_empty(), "named once");
        // fe-2 stops speaking: gone after three intervals.
        for t in [6_000, 7_000, 8_000] {
            c.heard(&said("fe-1", 7), t);
            assert!(c.due(t).is_empty(), "fe-2 silent {} ms", t - 5_000);
        }
        c.heard(&said("fe-1", 7), 8_001);
        let verdicts = c.due(8_001);
        assert!(
            matches!(&verdicts[..], [Verdict::Confirmed { gone, .. }] if gone == &["fe-2".to_owned()]),
            "{verdicts:?}"
        );
    }

    fn open(
        frontend: &str,
        generation: u64,
        server: &str,
        in_flight: u32,
        answered: u64,
    ) -> FrontendApplied {
        FrontendApplied {
            draining: vec![DrainingMember {
                server: ServerId::new(server).expect("id"),
                in_flight,
                tunnels: 0,
                answered,
            }],
            ..said(frontend, generation)
        }
    }

    #[test]
    fn a_drain_ends_when_every_live_front_end_and_the_agent_prove_it_idle() {
        let s2 = ServerId::new("s2").expect("id");
        let mut draining = member("s2", MemberState::Draining, "up", WALL);
        draining.drain_request = Some(request("down"));
        let members = vec![member("s1", MemberState::Active, "up-1", WALL), draining];
        let mut c = confirmer();
        c.record(&record(9, members), 0, WALL);
        let with_agent = |_: &ServerId| true;
        let without = |_: &ServerId| false;
        // fe-2 has not applied the drain: it may still send s2 requests.
        c.heard(&open("fe-1", 9, "s2", 2, 10), 3_000);
        c.heard(&said("fe-2", 8), 3_000);
        assert!(c.drains_due(3_000, without).is_empty());
        let evidence = c.drain_evidence(&cluster(), &s2, 3_000);
        assert_eq!(evidence.routing, ["fe-2"]);
        let said = evidence.describe(false);
        assert!(
            said.contains("fe-1 2 in flight") && !said.contains("agent"),
            "{said}"
        );
        // Both have it as draining; fe-1's last two requests finish at 3.5 s.
        c.heard(&open("fe-2", 9, "s2", 0, 4), 3_200);
        c.heard(&open("fe-1", 9, "s2", 0, 12), 3_500);
        assert!(
            c.drains_due(4_000, without).is_empty(),
            "fe-1 answered within the interval"
        );
        c.heard(&open("fe-1", 9, "s2", 0, 12), 4_500);
        c.heard(&open("fe-2", 9, "s2", 0, 4), 4_500);
        let due = c.drains_due(4_500, without);
        assert_eq!(due.len(), 1, "quiet for an interval, nothing open: {due:?}");
        assert!(due[0].2.proven());
        // With an agent, its word is wanted too.
        assert!(c.drains_due(4_500, with_agent).is_empty());
        c.agent_drained(&s2, 4_600);
        let due = c.drains_due(4_600, with_agent);
        assert_eq!(due.len(), 1, "{due:?}");
        assert!(due[0]
            .2
            .describe(true)
            .contains("its agent saw nothing in flight"));
        // Gone back to active (a new join): the old word does not count.
        c.record(
            &record(10, vec![member("s2", MemberState::Active, "up-2", WALL)]),
            4_700,
            WALL,
        );
        assert!(c.drains_due(4_700, with_agent).is_empty());
        assert!(!c.drain_evidence(&cluster(), &s2, 4_700).agent_drained);
    }

    #[test]
    fn a_drain_waits_for_its_generation_and_old_changes_are_left_alone() {
        let mut c = confirmer();
        c.heard(&said("fe-1", 3), 0);
        let mut draining = member("s1", MemberState::Draining, "up-long-ago", WALL);
        draining.drain_request = Some(request("down"));
        let old = member(
            "s2",
            MemberState::Active,
            "up-long-ago-too",
            WALL - TRACK_WINDOW_MS - 1,
        );
        c.record(&record(4, vec![draining, old]), 0, WALL);
        assert_eq!(
            c.waiting(),
            1,
            "the drain waits; the old allocation is not tracked"
        );
        c.heard(&said("fe-1", 4), 3_000);
        assert_eq!(confirmed(&c.due(3_000)), ["down"]);
    }
}
