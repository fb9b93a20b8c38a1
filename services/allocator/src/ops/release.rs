//! Release: mark the entry `draining` (which checks the minimum size), mark
//! the server record draining; once drained, remove the entry, then return
//! the server to the pool.

use headroom_shared::errors::codes;
use headroom_shared::ledger::Outcome;
use headroom_shared::records::{Join, Member, MemberChange, MemberState, ServerState};
use headroom_shared::time::now_ms;
use headroom_shared::wire::{Assignment, EventKind};
use headroom_shared::{ClusterId, RequestId, ServerId};
use tracing::{info, instrument};

use super::{applied, reject, Allocator, Done, Event, Fact, FirstRead, OpError, Update};

impl Allocator {
    /// Drains `server`'s entry, as it was when the request was taken up
    /// (generation `since`): an entry that joined later is another join of
    /// the same server, never this request's to end.
    pub(super) async fn release(
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
    pub(super) async fn drain_server(
        &self,
        c: &ClusterId,
        join: &Join,
        deadline_ms: u64,
        id: &RequestId,
    ) -> Result<(), OpError> {
        let server = &join.server;
        let update = self
            .update_server(server, |mut current| async move {
                match &current.state {
                    ServerState::Allocated { cluster } if cluster == c => {}
                    // Already draining, or no longer ours to drain.
                    _ => return Ok(None),
                }
                current.state = ServerState::Draining {
                    cluster: c.clone(),
                    deadline_ms,
                };
                current.last_request = Some(id.clone());
                Ok(Some(current))
            })
            .await?;
        if update.written() {
            info!(%server, cluster = %c, deadline_ms, "draining");
            self.notify(server, c, Assignment::Draining { deadline_ms }, Some(id))
                .await;
            let fact = Fact::Join {
                request: id,
                server,
                joined: join.joined,
            };
            let event = Event::new(EventKind::DrainStarted, fact)
                .cluster(c)
                .server(server)
                .request(id)
                .detail(format!("{server} draining from {c}"));
            self.log(event).await;
        }
        Ok(())
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
        let update = self
            .update_server(server, |mut current| async move {
                if !current.state.is_draining_from(c) {
                    return Ok(None);
                }
                current.state = ServerState::Free;
                current.last_cluster = Some(c.clone());
                Ok(Some(current))
            })
            .await?;
        let Update::Written {
            before, revision, ..
        } = update
        else {
            return Ok(false);
        };
        info!(why, "released to the pool");
        let request = before.last_request.as_ref();
        self.notify(server, c, Assignment::Released, request).await;
        let fact = Fact::Write {
            record: server.as_str(),
            revision,
        };
        let event = Event::new(EventKind::Released, fact)
            .cluster(c)
            .server(server)
            .request(request)
            .detail(format!("{server} back in the pool ({why})"));
        self.log(event).await;
        Ok(true)
    }

    /// Removes `server`'s entry from `c` if it still satisfies `still`.
    /// Returns whether it removed one.
    pub(super) async fn drop_entry(
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
    pub(super) async fn free_orphan(
        &self,
        server: &ServerId,
        c: &ClusterId,
    ) -> Result<bool, OpError> {
        let update = self
            .update_server(server, |mut current| async move {
                if current.state != (ServerState::Allocated { cluster: c.clone() }) {
                    return Ok(None);
                }
                // Read again on every attempt: a commit that lists it makes
                // it no orphan.
                if let Some(cluster) = self.store.cluster(c).await? {
                    if cluster.value.member(server).is_some() {
                        return Ok(None);
                    }
                }
                current.state = ServerState::Free;
                Ok(Some(current))
            })
            .await?;
        Ok(update.written())
    }
}
