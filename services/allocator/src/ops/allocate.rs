//! Allocate: reserve a `joining` entry in the cluster record (which checks
//! the size limits), claim a free server's record, then make the entry
//! `active`; and filling a cluster to its minimum size the same way.

use std::sync::atomic::{AtomicU32, Ordering};

use headroom_shared::errors::{codes, BusError};
use headroom_shared::ledger::Outcome;
use headroom_shared::records::{
    ClusterRecord, Join, Member, MemberChange, MemberState, ServerRecord, ServerState,
};
use headroom_shared::time::now_ms;
use headroom_shared::wire::{Assignment, EventKind};
use headroom_shared::{ClusterId, RequestId, ServerId};
use rand::Rng;
use tracing::{debug, info};

use super::{
    reject, servers_of, Again, Allocator, Attempt, Done, Event, Fact, FirstRead, Goal, OpError,
    Retry,
};
use crate::store::{StoreError, Versioned};

impl Allocator {
    pub(super) async fn allocate(
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
            let Some(wanted) = wanted(goal, &cluster.value, mine.len()) else {
                return Ok(Done(Outcome::Applied {
                    servers: servers_of(mine),
                    error: None,
                }));
            };
            if let Some((code, why)) = refusal(c, &cluster.value, goal) {
                return shortfall(mine, wanted, code, why).map(Done);
            }
            // The best few from the view: the claim on the record decides.
            let candidates = self.pool.candidates(&cluster.value, request_type, 3);
            if candidates.is_empty() {
                let what = request_type.map_or_else(
                    || format!("cluster {c}"),
                    |t| format!("request type {t:?} in cluster {c}"),
                );
                let why = format!("no free server in the pool fits {what}");
                return shortfall(mine, wanted, codes::POOL_EXHAUSTED, why).map(Done);
            }
            // The best candidate first; after a lost race, spread over the
            // best few so racing allocators stop choosing the same server.
            let pick = if lost_races.load(Ordering::Relaxed) == 0 {
                &candidates[0]
            } else {
                &candidates[rand::rng().random_range(0..candidates.len())]
            };
            self.reserve(cluster, id, pick, first, lost_races).await
        })
        .await
    }

    /// Adds a `joining` entry for `pick` to the cluster record. Claiming
    /// its server and committing happen on the next attempt, in
    /// [`Self::settle_own_joining`], the same path a retry takes.
    async fn reserve(
        &self,
        cluster: Versioned<ClusterRecord>,
        id: &RequestId,
        pick: &ServerRecord,
        first: &FirstRead,
        lost_races: &AtomicU32,
    ) -> Result<Attempt<Outcome>, OpError> {
        let mut record = cluster.value;
        let joined = record.next_generation();
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
            joined,
        });
        match self
            .commit_cluster(&mut record, cluster.revision, Some(id))
            .await
        {
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
    }

    /// Moves one of this request's joining entries on: claim its server and
    /// commit, or drop the entry when the server went elsewhere. `cluster`
    /// is the record the caller read, for the commit to start from.
    /// Returns the cluster record as committed, if it committed.
    pub(super) async fn settle_own_joining(
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
    pub(super) async fn claim(
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
    pub(super) async fn commit_joining(
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
            let event = Event::new(
                EventKind::Allocated,
                Fact::Join {
                    request: &request,
                    server,
                    joined: join.joined,
                },
            )
            .cluster(c)
            .server(server)
            .request(&request)
            .detail(format!("{server} joined {c}"));
            self.log(event).await;
            Ok(Done(Some(Versioned {
                value: cluster.value,
                revision,
            })))
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
}

/// The outcome when fewer servers than wanted could be allocated: a partial
/// success if some were, a rejection if none.
/// How many joins the request still wants in all (its own so far
/// included), or `None` when it has what it asked for.
fn wanted(goal: Goal, cluster: &ClusterRecord, mine: usize) -> Option<usize> {
    let size = u32::try_from(cluster.size()).unwrap_or(u32::MAX);
    let min_size = cluster.policy.min_size;
    match goal {
        Goal::Count { count, .. } => (mine < count as usize).then_some(count as usize),
        Goal::MinSize => (size < min_size).then(|| min_size.saturating_sub(size) as usize + mine),
    }
}

/// Why no server may be added to the cluster now, before the pool is
/// asked: a log too short to count this request's earlier joins, or the
/// maximum size.
fn refusal(c: &ClusterId, cluster: &ClusterRecord, goal: Goal) -> Option<(&'static str, String)> {
    if let Goal::Count { since, .. } = goal {
        // Joins of ours that have left are counted from the log; if it no
        // longer reaches back to when this request was taken up, more
        // would risk allocating twice.
        if !cluster.remembers_since(since) {
            let why = format!("{c}'s change log no longer reaches back to generation {since}, when this request was taken up");
            return Some((codes::PROGRESS_UNKNOWN, why));
        }
    }
    let size = u32::try_from(cluster.size()).unwrap_or(u32::MAX);
    if size >= cluster.policy.max_size {
        let why = format!(
            "cluster {c} is at its maximum size {}",
            cluster.policy.max_size
        );
        return Some((codes::AT_MAX_SIZE, why));
    }
    None
}

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
