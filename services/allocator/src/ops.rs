//! The allocator's operations on KV: allocate, release (drain, then return
//! to the pool), replace, reweight, register, and the repairs the
//! reconciler applies.
//!
//! Two keys change for every move and KV has no transactions, so the order
//! of writes carries the invariants:
//! - allocate: reserve a `joining` entry in the cluster record (validates
//!   the size limits), claim the server record, then make the entry
//!   `active`;
//! - release: mark the entry `draining` (validates the minimum), mark the
//!   server record draining; when drained, remove the entry, then free the
//!   server record.
//!
//! So a server listed in a cluster always has a server record naming that
//! cluster (or out of service), and a crash between two writes leaves state
//! the reconciler can complete or undo. Every write is compare-and-set; a
//! lost race re-reads and decides again.
//!
//! A request is applied at most once however it is redelivered: before its
//! first write it is marked taken up in the ledger with the cluster's
//! generation then ([`RequestStarted`]). Each entry names the request that
//! added it, the release that drains it, and the generation that reserved
//! it (its join), so a redelivery recognises its own past work and leaves
//! alone an entry that joined after it was taken up.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream;
use headroom_shared::bus;
use headroom_shared::codec::Codec;
use headroom_shared::kv::{
    ClusterPolicy, ClusterRecord, Join, Member, MemberChange, MemberState, Outcome, RequestStarted,
    ServerRecord, ServerState,
};
use headroom_shared::subjects;
use headroom_shared::wire::{
    codes, now_ms, Assignment, AssignmentNotice, AuditEvent, BusError, EventKind, MembershipChange,
    ReconfigAction, ReconfigRequest, RegisterServer,
};
use headroom_shared::{ClusterId, RequestId, ServerId, SCHEMA_VERSION};
use rand::Rng;
use tracing::{debug, info, instrument, warn};

use crate::metrics::Metrics;
use crate::placement::{plan_repairs, Repair};
use crate::pool::PoolView;
use crate::store::{Store, StoreError, Versioned};

/// Compare-and-set attempts before a step gives up and the request is
/// retried later.
const MAX_ATTEMPTS: u32 = 200;

#[derive(Debug, thiserror::Error)]
pub enum OpError {
    /// The request cannot be applied as asked; retrying will not help.
    #[error("{0}")]
    Rejected(BusError),
    /// KV or JetStream failed; the request should be retried.
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("gave up on {what} after {MAX_ATTEMPTS} conflicting writes")]
    Contended { what: String },
    #[error(transparent)]
    Publish(#[from] bus::PublishError),
}

fn reject(code: &str, message: impl Into<String>) -> OpError {
    OpError::Rejected(BusError::new(code, message))
}

/// What one attempt of a compare-and-set sequence came to.
enum Attempt<T> {
    Done(T),
    /// This attempt moved the state on: read again and go on at once.
    Again,
    /// A lost race: read again and decide again after a short pause.
    Retry,
}
use Attempt::{Again, Done, Retry};

/// How much to allocate.
#[derive(Debug, Clone, Copy)]
enum Goal {
    /// This many joins by the request, which was taken up at cluster
    /// generation `since`: each of them is later.
    Count { count: u32, since: u64 },
    /// Until the cluster reaches its minimum size.
    MinSize,
}

/// A cluster record read before a request's first attempt, taken by it.
struct FirstRead(std::sync::Mutex<Option<Versioned<ClusterRecord>>>);

impl FirstRead {
    fn none() -> Self {
        Self(std::sync::Mutex::new(None))
    }

    /// Keeps a record this attempt wrote, for the next attempt to start
    /// from without reading it back (a stale one only costs a lost
    /// compare-and-set, after which the attempt reads afresh).
    fn keep(&self, record: Versioned<ClusterRecord>) {
        *self.0.lock().unwrap_or_else(|p| p.into_inner()) = Some(record);
    }
}

/// The allocator's handle on KV and the bus.
pub struct Allocator {
    pub(crate) store: Store,
    /// Where servers are, as the watch and this instance's own reads and
    /// writes last saw them: the choice of a server comes from here.
    pub(crate) pool: PoolView,
    pub(crate) js: jetstream::Context,
    client: async_nats::Client,
    instance: String,
    pub metrics: Arc<Metrics>,
}

async fn backoff(attempt: u32) {
    // Random, growing pause so two instances that collided do not collide
    // again in lockstep.
    let max_us = 200 * u64::from(attempt.min(20) + 1);
    let pause = rand::rng().random_range(0..=max_us);
    tokio::time::sleep(Duration::from_micros(pause)).await;
}

impl Allocator {
    pub fn new(
        store: Store,
        pool: PoolView,
        js: jetstream::Context,
        client: async_nats::Client,
        instance: String,
    ) -> Self {
        Self {
            store,
            pool,
            js,
            client,
            instance,
            metrics: Arc::default(),
        }
    }

    pub fn instance(&self) -> &str {
        &self.instance
    }

    /// Its KV buckets (and the count of calls to them).
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// What this instance knows of the pool.
    pub fn pool(&self) -> &PoolView {
        &self.pool
    }

    /// Reads a server record, and shows the view what it read.
    pub(crate) async fn server(
        &self,
        id: &ServerId,
    ) -> Result<Option<Versioned<ServerRecord>>, StoreError> {
        let read = self.store.server(id).await?;
        match &read {
            Some(current) => self.pool.observe(&current.value, current.revision),
            None => self.pool.observe_absent(id),
        }
        Ok(read)
    }

    /// Writes a server record (compare-and-set), and shows the view the
    /// write, so this instance does not pick a server it just claimed.
    async fn put_server(&self, record: &ServerRecord, revision: u64) -> Result<u64, StoreError> {
        let written = self.store.put_server(record, revision).await?;
        self.pool.observe(record, written);
        Ok(written)
    }

    /// Runs `attempt` until it is done. A lost compare-and-set
    /// ([`StoreError::Conflict`], usually propagated with `?`) or a
    /// [`Retry`] re-runs it after a short random pause, an [`Again`] at
    /// once (a pause there costs a timer tick, a millisecond, per step of
    /// every allocation); after [`MAX_ATTEMPTS`] the request is left for a
    /// later delivery.
    async fn with_retries<T, F, Fut>(
        &self,
        what: impl FnOnce() -> String,
        mut attempt: F,
    ) -> Result<T, OpError>
    where
        F: FnMut(u32) -> Fut,
        Fut: std::future::Future<Output = Result<Attempt<T>, OpError>>,
    {
        for n in 0..MAX_ATTEMPTS {
            match attempt(n).await {
                Ok(Done(value)) => return Ok(value),
                Ok(Again) => {}
                Ok(Retry) | Err(OpError::Store(StoreError::Conflict { .. })) => backoff(n).await,
                Err(err) => return Err(err),
            }
        }
        Err(OpError::Contended { what: what() })
    }

    // ---- publishing ----

    /// Writes a cluster record (generation + 1) and tells front-ends.
    async fn commit_cluster(
        &self,
        record: &mut ClusterRecord,
        revision: u64,
        cause: Option<&RequestId>,
    ) -> Result<u64, StoreError> {
        let new_revision = self.store.put_cluster(record, revision).await?;
        let change = MembershipChange::of(record, new_revision, cause.cloned());
        let subject = subjects::membership(&record.id);
        if let Err(err) = bus::publish(&self.client, subject, &change).await {
            // Front-ends that miss it see the generation gap on the next
            // change, or read KV at their periodic check.
            warn!(%err, cluster = %record.id, "could not publish membership change");
        }
        Ok(new_revision)
    }

    async fn notify(
        &self,
        server: &ServerId,
        cluster: &ClusterId,
        assignment: Assignment,
        request: Option<&RequestId>,
    ) {
        let notice = AssignmentNotice {
            v: SCHEMA_VERSION,
            server: server.clone(),
            cluster: cluster.clone(),
            assignment,
            request: request.cloned(),
            at_ms: now_ms(),
        };
        if let Err(err) = bus::publish(&self.client, subjects::assign(server), &notice).await {
            warn!(%err, %server, "could not send assignment notice");
        }
    }

    /// Appends to the audit log. `dedup` names the fact, so a step that is
    /// redone after a crash does not log it twice.
    pub(crate) async fn event(
        &self,
        kind: EventKind,
        cluster: Option<&ClusterId>,
        server: Option<&ServerId>,
        request: Option<&RequestId>,
        detail: String,
        dedup: String,
    ) {
        let event = AuditEvent {
            v: SCHEMA_VERSION,
            kind,
            cluster: cluster.cloned(),
            server: server.cloned(),
            request: request.cloned(),
            detail,
            origin: self.instance.clone(),
            at_ms: now_ms(),
        };
        self.metrics.events.inc(&[event.kind.token()]);
        let subject = subjects::events(cluster, event.kind.token());
        if let Err(err) =
            bus::publish_durable(&self.js, subject, &dedup, Codec::MsgPack, &event).await
        {
            warn!(%err, "could not append to the audit log");
        }
    }

    // ---- requests ----

    /// Applies one reconfiguration request.
    ///
    /// # Errors
    /// [`OpError::Rejected`] when it cannot be applied; other errors are
    /// transient and the request should be retried.
    #[instrument(skip_all, fields(cluster = %request.cluster, request = %request.id, action = request.action.name()))]
    pub async fn apply(&self, request: &ReconfigRequest) -> Result<Outcome, OpError> {
        let (c, id) = (&request.cluster, &request.id);
        match &request.action {
            ReconfigAction::Allocate {
                count,
                request_type,
            } => {
                if *count == 0 {
                    return Err(reject(codes::INVALID, "allocate count must be at least 1"));
                }
                let (since, first) = self.take_up(request).await?;
                let goal = Goal::Count {
                    count: *count,
                    since,
                };
                self.allocate(c, id, goal, request_type.as_deref(), first)
                    .await
            }
            ReconfigAction::Release { server } => {
                let (since, first) = self.take_up(request).await?;
                self.release(c, server, id, since, first).await
            }
            ReconfigAction::Replace { server } => {
                let (since, _) = self.take_up(request).await?;
                self.replace(c, server, id, since).await
            }
            // Setting a weight again changes nothing: no mark needed.
            ReconfigAction::Reweight { server, weight } => {
                self.reweight(c, server, *weight, id).await
            }
        }
    }

    /// Marks `request` taken up, before anything it changes, and returns the
    /// cluster generation of the first delivery to get here (whatever this
    /// request did, or will do, is written after it), with the record read
    /// for the mark, for the request's first attempt.
    async fn take_up(&self, request: &ReconfigRequest) -> Result<(u64, FirstRead), OpError> {
        let read = self.store.cluster(&request.cluster).await?;
        let generation = read.as_ref().map_or(0, |c| c.value.generation);
        let mark = RequestStarted {
            v: SCHEMA_VERSION,
            id: request.id.clone(),
            cluster: request.cluster.clone(),
            generation,
            by: self.instance.clone(),
            at_ms: now_ms(),
        };
        let since = self.store.start(&mark).await?.generation;
        Ok((since, FirstRead(std::sync::Mutex::new(read))))
    }

    /// The cluster record for an attempt: the one read for the first, or
    /// written by the attempt before; else a fresh read (a stale one only
    /// costs a lost compare-and-set).
    async fn cluster_for(
        &self,
        c: &ClusterId,
        first: &FirstRead,
    ) -> Result<Versioned<ClusterRecord>, OpError> {
        let read = first.0.lock().unwrap_or_else(|p| p.into_inner()).take();
        match read {
            Some(record) => Ok(record),
            None => self.load_cluster(c).await,
        }
    }

    async fn load_cluster(&self, c: &ClusterId) -> Result<Versioned<ClusterRecord>, OpError> {
        self.store
            .cluster(c)
            .await?
            .ok_or_else(|| reject(codes::UNKNOWN_CLUSTER, format!("no cluster named {c}")))
    }

    async fn allocate(
        &self,
        c: &ClusterId,
        id: &RequestId,
        goal: Goal,
        request_type: Option<&str>,
        first: FirstRead,
    ) -> Result<Outcome, OpError> {
        let lost_races = &AtomicU32::new(0);
        let first = &first;
        let what = || format!("allocation to {c}");
        self.with_retries(what, |_| async move {
            let cluster = self.cluster_for(c, first).await?;
            // Finish what this request began earlier (a crash, a lost race,
            // a redelivery running beside us) before adding more.
            if let Some(joining) = cluster
                .value
                .members
                .iter()
                .find(|m| &m.request == id && m.state == MemberState::Joining)
            {
                let server = joining.server.clone();
                if let Some(committed) = self.settle_own_joining(c, &server, id, cluster).await? {
                    first.keep(committed);
                }
                return Ok(Again);
            }
            let mine = cluster.value.joins_by(id);
            let size = u32::try_from(cluster.value.size()).unwrap_or(u32::MAX);
            let policy = &cluster.value.policy;
            let (reached, wanted) = match goal {
                Goal::Count { count, .. } => (mine.len() >= count as usize, count as usize),
                Goal::MinSize => (
                    size >= policy.min_size,
                    policy.min_size.saturating_sub(size) as usize + mine.len(),
                ),
            };
            if reached {
                return Ok(Done(Outcome::Applied {
                    servers: servers_of(mine),
                    error: None,
                }));
            }
            if let Goal::Count { since, .. } = goal {
                // Joins of ours that have left are counted from the log; if
                // it no longer reaches back to when this request was taken
                // up, more would risk allocating twice.
                if !cluster.value.remembers_since(since) {
                    return shortfall(
                        mine,
                        wanted,
                        codes::PROGRESS_UNKNOWN,
                        format!("{c}'s change log no longer reaches back to generation {since}, when this request was taken up"),
                    )
                    .map(Done);
                }
            }
            if size >= policy.max_size {
                return shortfall(
                    mine,
                    wanted,
                    codes::AT_MAX_SIZE,
                    format!("cluster {c} is at its maximum size {}", policy.max_size),
                )
                .map(Done);
            }
            // The best few from the view: the claim on the record decides.
            let candidates = self.pool.candidates(&cluster.value, request_type, 3);
            if candidates.is_empty() {
                let what = request_type.map_or_else(
                    || format!("cluster {c}"),
                    |t| format!("request type {t:?} in cluster {c}"),
                );
                return shortfall(
                    mine,
                    wanted,
                    codes::POOL_EXHAUSTED,
                    format!("no free server in the pool fits {what}"),
                )
                .map(Done);
            }
            // The best candidate first; after a lost race, spread over the
            // best few so racing allocators stop choosing the same server.
            let pick = if lost_races.load(Ordering::Relaxed) == 0 {
                &candidates[0]
            } else {
                &candidates[rand::rng().random_range(0..candidates.len())]
            };
            let mut record = cluster.value.clone();
            record.members.push(Member {
                server: pick.id.clone(),
                address: pick.address.clone(),
                port: pick.port,
                request_types: pick.request_types.clone(),
                state: MemberState::Joining,
                weight: 1.0,
                request: id.clone(),
                drain_request: None,
                since_ms: now_ms(),
                joined: record.next_generation(),
            });
            match self
                .commit_cluster(&mut record, cluster.revision, Some(id))
                .await
            {
                // Claiming and committing happen on the next attempt, in
                // settle_own_joining, the same path a retry takes.
                Ok(revision) => {
                    debug!(server = %pick.id, "reserved");
                    first.keep(Versioned {
                        value: record,
                        revision,
                    });
                    Ok(Again)
                }
                Err(StoreError::Conflict { .. }) => {
                    lost_races.fetch_add(1, Ordering::Relaxed);
                    Ok(Retry)
                }
                Err(err) => Err(err.into()),
            }
        })
        .await
    }

    /// Moves one of this request's joining entries on: claim its server and
    /// commit, or drop the entry when the server went elsewhere. `cluster`
    /// is the record the caller read, for the commit to start from.
    /// Returns the cluster record as committed, if it committed.
    async fn settle_own_joining(
        &self,
        c: &ClusterId,
        server: &ServerId,
        id: &RequestId,
        cluster: Versioned<ClusterRecord>,
    ) -> Result<Option<Versioned<ClusterRecord>>, OpError> {
        // A server the view has as free is claimed on the view's revision,
        // without reading it: the compare-and-set succeeds only if KV
        // holds exactly that record. A stale view loses it, and the record
        // is read below as it would have been.
        if let Some(seen) = self
            .pool
            .get(server)
            .filter(|s| s.value.state == ServerState::Free)
        {
            if self.claim(c, id, &seen).await? {
                return self
                    .commit_joining(c, server, Some(id), Some(cluster))
                    .await;
            }
        }
        let Some(current) = self.server(server).await? else {
            self.drop_entry(c, server, |m| m.state == MemberState::Joining)
                .await?;
            return Ok(None);
        };
        match &current.value.state {
            ServerState::Allocated { cluster: at } if at == c => {
                self.commit_joining(c, server, Some(id), Some(cluster))
                    .await
            }
            // Someone else moved it if the claim fails; the caller re-reads
            // and decides.
            ServerState::Free => match self.claim(c, id, &current).await? {
                true => {
                    self.commit_joining(c, server, Some(id), Some(cluster))
                        .await
                }
                false => Ok(None),
            },
            _ => {
                self.drop_entry(c, server, |m| m.state == MemberState::Joining)
                    .await?;
                Ok(None)
            }
        }
    }

    /// Claims a free server for `c` on the revision it was seen at; false
    /// when it moved since.
    async fn claim(
        &self,
        c: &ClusterId,
        id: &RequestId,
        free: &Versioned<ServerRecord>,
    ) -> Result<bool, OpError> {
        let mut claimed = free.value.clone();
        claimed.state = ServerState::Allocated { cluster: c.clone() };
        claimed.last_request = Some(id.clone());
        claimed.updated_ms = now_ms();
        match self.put_server(&claimed, free.revision).await {
            Ok(_) => Ok(true),
            Err(StoreError::Conflict { .. }) => Ok(false),
            Err(err) => Err(err.into()),
        }
    }

    /// Turns a joining entry whose server is claimed into an active member,
    /// starting from `known` if given (else reading the cluster). If the
    /// entry vanished meanwhile (the reconciler judged it abandoned), the
    /// claim is undone instead. Returns the cluster record as committed.
    async fn commit_joining(
        &self,
        c: &ClusterId,
        server: &ServerId,
        cause: Option<&RequestId>,
        known: Option<Versioned<ClusterRecord>>,
    ) -> Result<Option<Versioned<ClusterRecord>>, OpError> {
        let what = || format!("commit of {server} to {c}");
        let known = &std::sync::Mutex::new(known);
        self.with_retries(what, |_| async move {
            let known = known.lock().unwrap_or_else(|p| p.into_inner()).take();
            let mut cluster = match known {
                Some(record) => record,
                None => self.load_cluster(c).await?,
            };
            let Some(entry) = cluster.value.member_mut(server) else {
                self.free_orphan(server, c).await?;
                return Ok(Done(None));
            };
            if entry.state != MemberState::Joining {
                return Ok(Done(None));
            }
            entry.state = MemberState::Active;
            entry.since_ms = now_ms();
            let (request, join) = (entry.request.clone(), entry.join());
            cluster
                .value
                .remember(&request, &join, MemberChange::Allocated);
            let revision = self
                .commit_cluster(&mut cluster.value, cluster.revision, cause)
                .await?;
            info!(%server, cluster = %c, "allocated");
            self.notify(server, c, Assignment::Allocated, Some(&request))
                .await;
            self.event(
                EventKind::Allocated,
                Some(c),
                Some(server),
                Some(&request),
                format!("{server} joined {c}"),
                format!("{request}.{server}.{}.allocated", join.joined),
            )
            .await;
            Ok(Done(Some(Versioned {
                value: cluster.value,
                revision,
            })))
        })
        .await
    }

    /// Removes `server`'s entry from `c` if it still satisfies `still`.
    /// Returns whether it removed one.
    async fn drop_entry(
        &self,
        c: &ClusterId,
        server: &ServerId,
        still: impl Fn(&Member) -> bool,
    ) -> Result<bool, OpError> {
        let still = &still;
        let what = || format!("removal of {server} from {c}");
        self.with_retries(what, |_| async move {
            let Some(mut cluster) = self.store.cluster(c).await? else {
                return Ok(Done(false));
            };
            let before = cluster.value.members.len();
            cluster
                .value
                .members
                .retain(|m| !(&m.server == server && still(m)));
            if cluster.value.members.len() == before {
                return Ok(Done(false));
            }
            self.commit_cluster(&mut cluster.value, cluster.revision, None)
                .await?;
            Ok(Done(true))
        })
        .await
    }

    /// Returns a server claimed for `c` to the pool, if it is still claimed
    /// for `c` and `c` does not list it.
    async fn free_orphan(&self, server: &ServerId, c: &ClusterId) -> Result<bool, OpError> {
        let what = || format!("return of {server} to the pool");
        self.with_retries(what, |_| async move {
            let Some(current) = self.server(server).await? else {
                return Ok(Done(false));
            };
            if current.value.state != (ServerState::Allocated { cluster: c.clone() }) {
                return Ok(Done(false));
            }
            if let Some(cluster) = self.store.cluster(c).await? {
                if cluster.value.member(server).is_some() {
                    return Ok(Done(false));
                }
            }
            let mut freed = current.value.clone();
            freed.state = ServerState::Free;
            freed.updated_ms = now_ms();
            self.put_server(&freed, current.revision).await?;
            Ok(Done(true))
        })
        .await
    }

    /// Drains `server`'s entry, as it was when the request was taken up
    /// (generation `since`): an entry that joined later is another join of
    /// the same server, never this request's to end.
    async fn release(
        &self,
        c: &ClusterId,
        server: &ServerId,
        id: &RequestId,
        since: u64,
        first: FirstRead,
    ) -> Result<Outcome, OpError> {
        let first = &first;
        let what = || format!("release of {server} from {c}");
        self.with_retries(what, |_| async move {
            let mut cluster = self.cluster_for(c, first).await?;
            let min = cluster.value.policy.min_size;
            let active = cluster.value.active();
            let timeout = cluster.value.policy.drain_timeout_ms;
            let released_before = cluster
                .value
                .remembers(id, server, MemberChange::DrainStarted);
            let entry = cluster
                .value
                .member_mut(server)
                .filter(|m| m.joined <= since);
            let Some(entry) = entry else {
                if released_before {
                    return Ok(Done(applied(server)));
                }
                return Err(reject(
                    codes::NOT_A_MEMBER,
                    format!(
                        "{server} is not a member of {c} as it was when this request was taken up"
                    ),
                ));
            };
            let join = entry.join();
            match entry.state {
                MemberState::Joining => Err(reject(
                    codes::NOT_A_MEMBER,
                    format!("{server} is still joining {c}"),
                )),
                MemberState::Draining => {
                    let deadline = entry.since_ms.saturating_add(timeout);
                    if entry.drain_request.as_ref() == Some(id) {
                        self.drain_server(c, &join, deadline, id).await?;
                    }
                    // Draining already, by this request or another: the
                    // state asked for holds.
                    Ok(Done(applied(server)))
                }
                MemberState::Active => {
                    if active <= min as usize {
                        return Err(reject(
                            codes::AT_MIN_SIZE,
                            format!("{c} has {active} active members, its minimum is {min}"),
                        ));
                    }
                    entry.state = MemberState::Draining;
                    entry.drain_request = Some(id.clone());
                    entry.since_ms = now_ms();
                    let deadline = entry.since_ms.saturating_add(timeout);
                    cluster
                        .value
                        .remember(id, &join, MemberChange::DrainStarted);
                    self.commit_cluster(&mut cluster.value, cluster.revision, Some(id))
                        .await?;
                    self.drain_server(c, &join, deadline, id).await?;
                    Ok(Done(applied(server)))
                }
            }
        })
        .await
    }

    /// Marks the server record of `join` draining and tells the server and
    /// the log.
    async fn drain_server(
        &self,
        c: &ClusterId,
        join: &Join,
        deadline_ms: u64,
        id: &RequestId,
    ) -> Result<(), OpError> {
        let server = &join.server;
        let what = || format!("drain of {server}");
        self.with_retries(what, |_| async move {
            let Some(current) = self.server(server).await? else {
                return Ok(Done(()));
            };
            match &current.value.state {
                ServerState::Allocated { cluster } if cluster == c => {}
                // Already draining, or no longer ours to drain.
                _ => return Ok(Done(())),
            }
            let mut draining = current.value.clone();
            draining.state = ServerState::Draining {
                cluster: c.clone(),
                deadline_ms,
            };
            draining.last_request = Some(id.clone());
            draining.updated_ms = now_ms();
            self.put_server(&draining, current.revision).await?;
            info!(%server, cluster = %c, deadline_ms, "draining");
            self.notify(server, c, Assignment::Draining { deadline_ms }, Some(id))
                .await;
            self.event(
                EventKind::DrainStarted,
                Some(c),
                Some(server),
                Some(id),
                format!("{server} draining from {c}"),
                format!("{id}.{server}.{}.drain", join.joined),
            )
            .await;
            Ok(Done(()))
        })
        .await
    }

    /// Completes a drain: the entry goes, then the server returns to the
    /// pool where it can be allocated again.
    #[instrument(skip(self), fields(cluster = %c, server = %server))]
    pub async fn finish_drain(
        &self,
        c: &ClusterId,
        server: &ServerId,
        why: &str,
    ) -> Result<bool, OpError> {
        let Some(current) = self.server(server).await? else {
            return Ok(false);
        };
        if !current.value.state.is_draining_from(c) {
            return Ok(false);
        }
        self.drop_entry(c, server, |m| m.state == MemberState::Draining)
            .await?;
        let what = || format!("return of {server} to the pool");
        self.with_retries(what, |_| async move {
            let Some(current) = self.server(server).await? else {
                return Ok(Done(false));
            };
            if !current.value.state.is_draining_from(c) {
                return Ok(Done(false));
            }
            let mut freed = current.value.clone();
            freed.state = ServerState::Free;
            freed.last_cluster = Some(c.clone());
            freed.updated_ms = now_ms();
            let revision = self.put_server(&freed, current.revision).await?;
            info!(why, "released to the pool");
            let request = current.value.last_request.clone();
            self.notify(server, c, Assignment::Released, request.as_ref())
                .await;
            self.event(
                EventKind::Released,
                Some(c),
                Some(server),
                request.as_ref(),
                format!("{server} back in the pool ({why})"),
                format!("{server}.{revision}.released"),
            )
            .await;
            Ok(Done(true))
        })
        .await
    }

    /// Takes `server` out of service, as it was in `c` when the request was
    /// taken up (generation `since`), and allocates one in its place.
    async fn replace(
        &self,
        c: &ClusterId,
        server: &ServerId,
        id: &RequestId,
        since: u64,
    ) -> Result<Outcome, OpError> {
        self.load_cluster(c).await?;
        let what = || format!("taking {server} out of service");
        let removed = self
            .with_retries(what, |_| async move {
                let current = self.server(server).await?.ok_or_else(|| {
                    reject(codes::UNKNOWN_SERVER, format!("no server named {server}"))
                })?;
                let done = matches!(current.value.state, ServerState::OutOfService { .. })
                    && current.value.last_request.as_ref() == Some(id);
                // A later join of the server: the one this request replaced
                // was taken out before it returned through the pool.
                let rejoined = self
                    .load_cluster(c)
                    .await?
                    .value
                    .member(server)
                    .is_some_and(|m| m.joined > since);
                if done || rejoined {
                    return Ok(Done(false));
                }
                if current.value.state.cluster() != Some(c) {
                    return Err(reject(
                        codes::NOT_A_MEMBER,
                        format!("{server} is not a member of {c}"),
                    ));
                }
                // Out of service first: it can then never be allocated
                // elsewhere while the entry still lists it.
                let mut out = current.value.clone();
                out.state = ServerState::OutOfService {
                    reason: format!("replaced in {c} by request {id}"),
                };
                out.last_request = Some(id.clone());
                out.last_cluster = Some(c.clone());
                out.updated_ms = now_ms();
                self.put_server(&out, current.revision).await?;
                Ok(Done(true))
            })
            .await?;
        self.drop_entry(c, server, |m| m.joined <= since).await?;
        if removed {
            warn!(%server, cluster = %c, "out of service");
            self.notify(
                server,
                c,
                Assignment::OutOfService {
                    reason: "replaced".into(),
                },
                Some(id),
            )
            .await;
        }
        self.event(
            EventKind::OutOfService,
            Some(c),
            Some(server),
            Some(id),
            format!("{server} taken out of service in {c}"),
            format!("{id}.{server}.out"),
        )
        .await;
        let goal = Goal::Count { count: 1, since };
        self.allocate(c, id, goal, None, FirstRead::none()).await
    }

    async fn reweight(
        &self,
        c: &ClusterId,
        server: &ServerId,
        weight: f64,
        id: &RequestId,
    ) -> Result<Outcome, OpError> {
        if !(weight.is_finite() && (0.0..=100.0).contains(&weight)) {
            return Err(reject(
                codes::INVALID,
                format!("weight {weight} is not between 0 and 100"),
            ));
        }
        let what = || format!("reweight of {server}");
        self.with_retries(what, |_| async move {
            let mut cluster = self.load_cluster(c).await?;
            let Some(entry) = cluster.value.member_mut(server) else {
                return Err(reject(
                    codes::NOT_A_MEMBER,
                    format!("{server} is not a member of {c}"),
                ));
            };
            if entry.state == MemberState::Draining {
                return Err(reject(
                    codes::NOT_A_MEMBER,
                    format!("{server} is draining from {c}"),
                ));
            }
            if (entry.weight - weight).abs() < f64::EPSILON {
                return Ok(Done(applied(server)));
            }
            entry.weight = weight;
            self.commit_cluster(&mut cluster.value, cluster.revision, Some(id))
                .await?;
            self.event(
                EventKind::Reweighted,
                Some(c),
                Some(server),
                Some(id),
                format!("{server} weight {weight}"),
                format!("{id}.reweight"),
            )
            .await;
            Ok(Done(applied(server)))
        })
        .await
    }

    /// Allocates until `c` reaches its minimum size, under one request id
    /// per cluster so concurrent fillers count each other's work.
    ///
    /// # Errors
    /// As [`Allocator::apply`].
    pub async fn fill_to_min(&self, c: &ClusterId) -> Result<Outcome, OpError> {
        let id = RequestId::new(format!("fill-{c}"))
            .map_err(|e| reject(codes::INVALID, e.to_string()))?;
        self.allocate(c, &id, Goal::MinSize, None, FirstRead::none())
            .await
    }

    // ---- admin ----

    /// Adds a server to the pool, or updates a free one's connection info.
    /// A server out of service that registers again returns to the pool.
    ///
    /// # Errors
    /// [`OpError::Rejected`] when the server is in use with other
    /// connection info.
    pub async fn register(&self, reg: &RegisterServer) -> Result<ServerRecord, OpError> {
        if reg.address.trim().is_empty() || reg.port == 0 {
            return Err(reject(codes::INVALID, "address and port are required"));
        }
        let what = || format!("registration of {}", reg.id);
        self.with_retries(what, |_| async move {
            let existing = self.server(&reg.id).await?;
            let (record, revision) = match existing {
                None => (
                    ServerRecord::new_free(
                        reg.id.clone(),
                        reg.address.clone(),
                        reg.port,
                        reg.request_types.clone(),
                        now_ms(),
                    ),
                    0,
                ),
                Some(current) => {
                    let same = current.value.address == reg.address
                        && current.value.port == reg.port
                        && current.value.request_types == reg.request_types;
                    match current.value.state {
                        ServerState::Free
                        | ServerState::Allocated { .. }
                        | ServerState::Draining { .. }
                            if same =>
                        {
                            return Ok(Done(current.value))
                        }
                        ServerState::Allocated { .. } | ServerState::Draining { .. } => {
                            return Err(reject(
                                codes::SERVER_IN_USE,
                                format!(
                                    "{} is {}; release it before changing its connection info",
                                    reg.id,
                                    current.value.state.name()
                                ),
                            ))
                        }
                        ServerState::Free | ServerState::OutOfService { .. } => {}
                    }
                    let mut record = current.value.clone();
                    record.address = reg.address.clone();
                    record.port = reg.port;
                    record.request_types = reg.request_types.clone();
                    record.state = ServerState::Free;
                    record.updated_ms = now_ms();
                    (record, current.revision)
                }
            };
            let rev = self.put_server(&record, revision).await?;
            info!(server = %record.id, address = %record.address, port = record.port, "registered");
            self.event(
                EventKind::Registered,
                None,
                Some(&record.id),
                None,
                format!(
                    "{}:{} serves {:?}",
                    record.address, record.port, record.request_types
                ),
                format!("{}.{rev}.registered", record.id),
            )
            .await;
            Ok(Done(record))
        })
        .await
    }

    /// Removes a free or out-of-service server from Headroom.
    ///
    /// # Errors
    /// [`OpError::Rejected`] when it is unknown or in use.
    pub async fn deregister(&self, server: &ServerId) -> Result<(), OpError> {
        let what = || format!("deregistration of {server}");
        self.with_retries(what, |_| async move {
            let current = self.server(server).await?.ok_or_else(|| {
                reject(codes::UNKNOWN_SERVER, format!("no server named {server}"))
            })?;
            if current.value.state.cluster().is_some() {
                return Err(reject(
                    codes::SERVER_IN_USE,
                    format!(
                        "{server} is {}; release it first",
                        current.value.state.name()
                    ),
                ));
            }
            self.store.delete_server(server, current.revision).await?;
            self.pool.observe_absent(server);
            self.event(
                EventKind::Deregistered,
                None,
                Some(server),
                None,
                String::new(),
                format!("{server}.{}.deregistered", current.revision),
            )
            .await;
            Ok(Done(()))
        })
        .await
    }

    /// Creates a cluster or replaces its policy, keeping its members, then
    /// fills it to its minimum size. Returns the record as this write made
    /// it, with the members the fill added, unless another write of the
    /// policy came after it (then as it was written here).
    ///
    /// A pool too small for the minimum does not undo the write: the policy
    /// stands, the shortfall is logged, and the reconciler keeps filling.
    ///
    /// # Errors
    /// [`OpError::Rejected`] for an invalid policy (nothing is written).
    pub async fn put_cluster(
        &self,
        c: &ClusterId,
        policy: &ClusterPolicy,
    ) -> Result<ClusterRecord, OpError> {
        policy
            .validate()
            .map_err(|e| reject(codes::INVALID, e.to_string()))?;
        let what = || format!("policy of {c}");
        let written = self
            .with_retries(what, |_| async move {
                let (mut record, revision) = match self.store.cluster(c).await? {
                    Some(current) => (current.value, current.revision),
                    None => (ClusterRecord::new(c.clone(), policy.clone(), now_ms()), 0),
                };
                record.policy = policy.clone();
                let rev = self.commit_cluster(&mut record, revision, None).await?;
                info!(cluster = %c, min = policy.min_size, max = policy.max_size, "policy set");
                self.event(
                    EventKind::PolicyUpdated,
                    Some(c),
                    None,
                    None,
                    format!("min {} max {}", policy.min_size, policy.max_size),
                    format!("{c}.{rev}.policy"),
                )
                .await;
                Ok(Done(record))
            })
            .await?;
        match self.fill_to_min(c).await {
            Ok(Outcome::Applied { error: None, .. }) => {}
            Ok(
                Outcome::Applied {
                    error: Some(error), ..
                }
                | Outcome::Rejected { error },
            )
            | Err(OpError::Rejected(error)) => {
                warn!(cluster = %c, %error, "cluster stays below its minimum size for now");
            }
            Err(err) => warn!(cluster = %c, %err, "could not fill to the minimum yet"),
        }
        match self.store.cluster(c).await {
            Ok(Some(now)) if now.value.policy == written.policy => Ok(now.value),
            _ => Ok(written),
        }
    }

    // ---- repairs ----

    /// Applies one repair after asking the planner again, on freshly read
    /// records, whether it is still needed: the rules of what needs repair
    /// live only in [`crate::placement::plan_repairs`]. Returns whether it
    /// changed anything.
    ///
    /// # Errors
    /// As [`Allocator::apply`].
    pub async fn repair(&self, repair: &Repair, repair_after_ms: u64) -> Result<bool, OpError> {
        if let Repair::FillToMin { cluster, .. } = repair {
            // Filling re-reads and re-checks the size on every step itself.
            let before = self.load_cluster(cluster).await?.value.size();
            match self.fill_to_min(cluster).await {
                Ok(_) | Err(OpError::Rejected(_)) => {}
                Err(err) => return Err(err),
            }
            return Ok(self.load_cluster(cluster).await?.value.size() != before);
        }
        let (cluster, server) = self.fresh(repair).await?;
        let still_needed = plan_repairs(
            cluster.as_slice(),
            server.as_slice(),
            now_ms(),
            repair_after_ms,
        )
        .contains(repair);
        if !still_needed {
            return Ok(false);
        }
        let entry = |s: &ServerId| cluster.as_ref().and_then(|c| c.member(s)).cloned();
        let changed = match repair {
            Repair::CommitJoining { cluster, server } => {
                self.commit_joining(cluster, server, None, None).await?;
                true
            }
            Repair::DropEntry { cluster, server } => {
                // Only the entry version the planner judged: if it moved on
                // since (committed, drained), it is no longer ours to drop.
                let judged = entry(server).map(|m| (m.state, m.since_ms));
                self.drop_entry(cluster, server, |m| Some((m.state, m.since_ms)) == judged)
                    .await?
            }
            Repair::MarkEntryDraining { cluster, server } => {
                self.mark_entry_draining(cluster, server).await?
            }
            Repair::DrainServer {
                cluster,
                server,
                deadline_ms,
            } => {
                let Some(member) = entry(server) else {
                    return Ok(false);
                };
                let id = member
                    .drain_request
                    .clone()
                    .unwrap_or_else(RequestId::random);
                self.drain_server(cluster, &member.join(), *deadline_ms, &id)
                    .await?;
                true
            }
            Repair::FinishDrain { cluster, server } => {
                return self.finish_drain(cluster, server, "drain deadline").await;
            }
            Repair::FreeOrphan { server: s } => {
                match server.as_ref().and_then(|r| r.state.cluster()) {
                    Some(c) => self.free_orphan(s, c).await?,
                    None => false,
                }
            }
            Repair::FillToMin { .. } => false,
        };
        if changed {
            warn!(?repair, "repaired half-done state");
            let (cluster, server) = repair_subject(repair);
            self.event(
                EventKind::Repaired,
                cluster,
                server,
                None,
                format!("{repair:?}"),
                format!("repair.{}", RequestId::random()),
            )
            .await;
        }
        Ok(changed)
    }

    /// The records a repair concerns, read now: its server, and its cluster
    /// (for a server-only repair, the cluster the server record names).
    async fn fresh(
        &self,
        repair: &Repair,
    ) -> Result<(Option<ClusterRecord>, Option<ServerRecord>), OpError> {
        let (cluster, server) = repair_subject(repair);
        let server = match server {
            Some(id) => self.server(id).await?.map(|v| v.value),
            None => None,
        };
        let cluster = cluster
            .cloned()
            .or_else(|| server.as_ref().and_then(|s| s.state.cluster().cloned()));
        let cluster = match cluster {
            Some(id) => self.store.cluster(&id).await?.map(|v| v.value),
            None => None,
        };
        Ok((cluster, server))
    }

    async fn mark_entry_draining(&self, c: &ClusterId, server: &ServerId) -> Result<bool, OpError> {
        let what = || format!("drain of {server}");
        self.with_retries(what, |_| async move {
            let Some(current) = self.server(server).await? else {
                return Ok(Done(false));
            };
            if !current.value.state.is_draining_from(c) {
                return Ok(Done(false));
            }
            let mut cluster = self.load_cluster(c).await?;
            let Some(entry) = cluster.value.member_mut(server) else {
                return Ok(Done(false));
            };
            if entry.state == MemberState::Draining {
                return Ok(Done(false));
            }
            entry.state = MemberState::Draining;
            entry.drain_request = current.value.last_request.clone();
            entry.since_ms = now_ms();
            self.commit_cluster(&mut cluster.value, cluster.revision, None)
                .await?;
            Ok(Done(true))
        })
        .await
    }
}

fn repair_subject(repair: &Repair) -> (Option<&ClusterId>, Option<&ServerId>) {
    match repair {
        Repair::CommitJoining { cluster, server }
        | Repair::DropEntry { cluster, server }
        | Repair::MarkEntryDraining { cluster, server }
        | Repair::DrainServer {
            cluster, server, ..
        }
        | Repair::FinishDrain { cluster, server } => (Some(cluster), Some(server)),
        Repair::FreeOrphan { server } => (None, Some(server)),
        Repair::FillToMin { cluster, .. } => (Some(cluster), None),
    }
}

fn servers_of(joins: Vec<Join>) -> Vec<ServerId> {
    joins.into_iter().map(|j| j.server).collect()
}

fn applied(server: &ServerId) -> Outcome {
    Outcome::Applied {
        servers: vec![server.clone()],
        error: None,
    }
}

/// The outcome when fewer servers than wanted could be allocated: a partial
/// success if some were, a rejection if none.
fn shortfall(
    mine: Vec<Join>,
    wanted: usize,
    code: &str,
    message: String,
) -> Result<Outcome, OpError> {
    if mine.is_empty() {
        return Err(reject(code, message));
    }
    let message = format!("allocated {} of {wanted}: {message}", mine.len());
    Ok(Outcome::Applied {
        servers: servers_of(mine),
        error: Some(BusError::new(code, message)),
    })
}
