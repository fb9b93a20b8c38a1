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
//!
//! One file per command, as mini-redis has: [`allocate`], [`release`],
//! [`replace`], [`reweight`], [`admin`] (register, deregister, clusters)
//! and [`repair`] (the reconciler's). This file holds what they share:
//! the retry loop, the server-record update, publishing, the audit log.

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream;
use headroom_shared::bus;
use headroom_shared::codec::Codec;
use headroom_shared::errors::{codes, BusError};
use headroom_shared::ledger::{Outcome, RequestStarted};
use headroom_shared::records::{ClusterRecord, Join, ServerRecord};
use headroom_shared::subjects;
use headroom_shared::time::now_ms;
use headroom_shared::wire::{
    Assignment, AssignmentNotice, AuditEvent, EventKind, MembershipChange, ReconfigAction,
    ReconfigRequest,
};
use headroom_shared::{ClusterId, RequestId, ServerId, SCHEMA_VERSION};
use rand::Rng;
use tracing::{instrument, warn};

use crate::metrics::Metrics;
use crate::placement::Repair;
use crate::pool::PoolView;
use crate::store::{Store, StoreError, Versioned};

mod admin;
mod allocate;
mod release;
mod repair;
mod replace;
mod reweight;

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

/// What [`Allocator::update_server`] came to.
#[derive(Debug)]
pub(crate) enum Update {
    /// Written at `revision`; `before` is the record it replaced.
    Written { before: ServerRecord, revision: u64 },
    /// The change was not needed, or not the caller's.
    Unchanged,
    /// There is no such server.
    Absent,
}

impl Update {
    pub(crate) fn written(&self) -> bool {
        matches!(self, Self::Written { .. })
    }
}

/// One entry for the audit log.
pub(crate) struct Event<'a> {
    kind: EventKind,
    fact: Fact<'a>,
    cluster: Option<&'a ClusterId>,
    server: Option<&'a ServerId>,
    request: Option<&'a RequestId>,
    detail: String,
}

impl<'a> Event<'a> {
    pub(crate) fn new(kind: EventKind, fact: Fact<'a>) -> Self {
        Self {
            kind,
            fact,
            cluster: None,
            server: None,
            request: None,
            detail: String::new(),
        }
    }

    pub(crate) fn cluster(mut self, cluster: impl Into<Option<&'a ClusterId>>) -> Self {
        self.cluster = cluster.into();
        self
    }

    pub(crate) fn server(mut self, server: impl Into<Option<&'a ServerId>>) -> Self {
        self.server = server.into();
        self
    }

    pub(crate) fn request(mut self, request: impl Into<Option<&'a RequestId>>) -> Self {
        self.request = request.into();
        self
    }

    pub(crate) fn detail(mut self, detail: impl Into<String>) -> Self {
        self.detail = detail.into();
        self
    }
}

/// What an audit entry records once, whichever instance or delivery
/// writes it: with its kind, the entry's de-duplication key.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Fact<'a> {
    /// A request's step on one join of a server (the generation that
    /// reserved the entry): allocated, drain started.
    Join {
        request: &'a RequestId,
        server: &'a ServerId,
        joined: u64,
    },
    /// What a request did once, to a server or to its cluster: out of
    /// service, reweighted, rejected.
    Request {
        request: &'a RequestId,
        server: Option<&'a ServerId>,
    },
    /// A record's write at a revision: registered, deregistered, back in
    /// the pool, a policy.
    Write { record: &'a str, revision: u64 },
    /// A request message that could not be read, by its stream sequence.
    Malformed { sequence: u64 },
    /// A repair on the records as they were read for it: instances that
    /// race to apply the same repair log it once.
    Repair {
        repair: &'a Repair,
        cluster_generation: Option<u64>,
        server_updated_ms: Option<u64>,
    },
}

impl Fact<'_> {
    fn key(&self, kind: &EventKind) -> String {
        let kind = kind.token();
        match *self {
            Self::Join {
                request,
                server,
                joined,
            } => format!("{request}.{server}.{joined}.{kind}"),
            Self::Request {
                request,
                server: Some(server),
            } => format!("{request}.{server}.{kind}"),
            Self::Request {
                request,
                server: None,
            } => format!("{request}.{kind}"),
            Self::Write { record, revision } => format!("{record}.{revision}.{kind}"),
            Self::Malformed { sequence } => format!("malformed.{sequence}.{kind}"),
            Self::Repair {
                repair,
                cluster_generation,
                server_updated_ms,
            } => {
                let (cluster, server) = repair.subject();
                let or_dash = |n: Option<u64>| n.map_or_else(|| "-".to_owned(), |n| n.to_string());
                format!(
                    "repair.{}.{}.{}.{}.{}.{kind}",
                    repair.name(),
                    cluster.map_or("-", ClusterId::as_str),
                    server.map_or("-", ServerId::as_str),
                    or_dash(cluster_generation),
                    or_dash(server_updated_ms),
                )
            }
        }
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
    /// What the front-ends and agents have said of changes and drains.
    data_plane: std::sync::Mutex<crate::confirm::Confirmer>,
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
            // Timed by its serve loop as it starts (`confirm::serve`).
            data_plane: std::sync::Mutex::new(crate::confirm::Confirmer::new(
                Duration::ZERO,
                Duration::MAX,
            )),
        }
    }

    /// What the front-ends and agents have said (see [`crate::confirm`]).
    pub(crate) fn data_plane(&self) -> std::sync::MutexGuard<'_, crate::confirm::Confirmer> {
        // Its state is a cache of what was heard: a panic elsewhere does
        // not make it wrong.
        self.data_plane.lock().unwrap_or_else(|p| p.into_inner())
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

    /// Changes `id`'s record: `change` makes the new record from the one
    /// in KV, which is written by compare-and-set (with `updated_ms` set);
    /// when another writer got in first, the record is read again and
    /// `change` asked again. (It gets the record by value, which it may
    /// change and return: an async closure borrowing it would not be
    /// `Send` for every lifetime, as spawned tasks need.) `change` returns `Ok(None)` to leave the
    /// record as it is (the change holds already, or is not the caller's
    /// to make), or an error to reject.
    ///
    /// Here and not on [`Store`]: every read and write of a server record
    /// also shows this instance's pool view what it saw.
    pub(crate) async fn update_server<F, Fut>(
        &self,
        id: &ServerId,
        change: F,
    ) -> Result<Update, OpError>
    where
        F: Fn(ServerRecord) -> Fut,
        Fut: std::future::Future<Output = Result<Option<ServerRecord>, OpError>>,
    {
        let change = &change;
        let what = || format!("update of server {id}");
        self.with_retries(what, |_| async move {
            let Some(current) = self.server(id).await? else {
                return Ok(Done(Update::Absent));
            };
            let Some(mut next) = change(current.value.clone()).await? else {
                return Ok(Done(Update::Unchanged));
            };
            next.updated_ms = now_ms();
            let revision = self.put_server(&next, current.revision).await?;
            Ok(Done(Update::Written {
                before: current.value,
                revision,
            }))
        })
        .await
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

    /// Appends `event` to the audit log, once: its fact is its
    /// de-duplication key (`Nats-Msg-Id`), so a step redone after a crash
    /// or by a redelivery does not log it twice.
    pub(crate) async fn log(&self, event: Event<'_>) {
        let dedup = event.fact.key(&event.kind);
        let event = AuditEvent {
            v: SCHEMA_VERSION,
            cluster: event.cluster.cloned(),
            server: event.server.cloned(),
            request: event.request.cloned(),
            detail: event.detail,
            kind: event.kind,
            origin: self.instance.clone(),
            at_ms: now_ms(),
        };
        self.metrics.events.inc(&[event.kind.token()]);
        let subject = subjects::events(event.cluster.as_ref(), event.kind.token());
        if let Err(err) =
            bus::publish_durable(&self.js, subject, &dedup, Codec::MsgPack, &event).await
        {
            warn!(%err, "could not append to the audit log");
        }
    }

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
            issued_ms: request.issued_ms,
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

#[cfg(test)]
mod tests {
    use super::*;

    fn ids() -> (ClusterId, ServerId, RequestId) {
        let cluster = ClusterId::new("web").expect("a cluster id");
        let server = ServerId::new("s1").expect("a server id");
        let request = RequestId::new("r1").expect("a request id");
        (cluster, server, request)
    }

    #[test]
    fn an_audit_fact_is_one_key_however_often_it_is_logged() {
        let (cluster, server, request) = ids();
        let join = Fact::Join {
            request: &request,
            server: &server,
            joined: 7,
        };
        assert_eq!(join.key(&EventKind::Allocated), "r1.s1.7.allocated");
        assert_ne!(
            join.key(&EventKind::Allocated),
            join.key(&EventKind::DrainStarted),
            "two steps on one join are two facts"
        );
        let write = Fact::Write {
            record: server.as_str(),
            revision: 12,
        };
        assert_eq!(write.key(&EventKind::Released), "s1.12.released");
        let out = Fact::Request {
            request: &request,
            server: Some(&server),
        };
        assert_eq!(out.key(&EventKind::OutOfService), "r1.s1.out_of_service");

        // Two instances that read the same records and apply the same
        // repair log it once; the same repair on records read later (it
        // was needed again) is another fact.
        let repair = Repair::FinishDrain {
            cluster: cluster.clone(),
            server: server.clone(),
        };
        let read_at = |generation, updated_ms| Fact::Repair {
            repair: &repair,
            cluster_generation: Some(generation),
            server_updated_ms: Some(updated_ms),
        };
        let kind = EventKind::Repaired;
        assert_eq!(read_at(3, 1_000).key(&kind), read_at(3, 1_000).key(&kind));
        assert_ne!(read_at(3, 1_000).key(&kind), read_at(4, 1_000).key(&kind));
        assert_ne!(read_at(3, 1_000).key(&kind), read_at(3, 2_000).key(&kind));
        let orphan = Repair::FreeOrphan {
            server: server.clone(),
        };
        let key = Fact::Repair {
            repair: &orphan,
            cluster_generation: None,
            server_updated_ms: Some(5),
        }
        .key(&kind);
        assert_eq!(key, "repair.free_orphan.-.s1.-.5.repaired");
    }
}
