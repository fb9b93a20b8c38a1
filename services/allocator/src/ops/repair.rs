//! The repairs the reconciler plans (see `placement`): each re-read and
//! applied only if it still holds, so a repair planned from a stale view
//! changes nothing.

use headroom_shared::records::{ClusterRecord, MemberState, ServerRecord};
use headroom_shared::time::now_ms;
use headroom_shared::wire::EventKind;
use headroom_shared::{ClusterId, RequestId, ServerId};
use tracing::warn;

use super::{Allocator, Done, Event, Fact, OpError};
use crate::placement::{plan_repairs, Repair};

impl Allocator {
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
        let read = (
            cluster.as_ref().map(|c| c.generation),
            server.as_ref().map(|s| s.updated_ms),
        );
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
                // Ended by the timer, not by evidence: say what it cut.
                let evidence = {
                    let view = self.data_plane();
                    view.drain_evidence(cluster, server, view.now())
                };
                let has_agent = self.pool.get(server).is_some_and(|r| r.value.agent);
                let why = format!(
                    "forced at its drain deadline; open then: {}",
                    evidence.describe(has_agent)
                );
                return self.finish_drain(cluster, server, &why).await;
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
            let (cluster, server) = repair.subject();
            let fact = Fact::Repair {
                repair,
                cluster_generation: read.0,
                server_updated_ms: read.1,
            };
            let event = Event::new(EventKind::Repaired, fact)
                .cluster(cluster)
                .server(server)
                .detail(format!("{repair:?}"));
            self.log(event).await;
        }
        Ok(changed)
    }

    /// The records a repair concerns, read now: its server, and its cluster
    /// (for a server-only repair, the cluster the server record names).
    pub(super) async fn fresh(
        &self,
        repair: &Repair,
    ) -> Result<(Option<ClusterRecord>, Option<ServerRecord>), OpError> {
        let (cluster, server) = repair.subject();
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

    pub(super) async fn mark_entry_draining(
        &self,
        c: &ClusterId,
        server: &ServerId,
    ) -> Result<bool, OpError> {
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
