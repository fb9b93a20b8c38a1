//! Replace: take a member out of service first (so it can never be
//! allocated elsewhere while its entry lists it), drop its entry, and
//! allocate one in its place.

use headroom_shared::errors::codes;
use headroom_shared::ledger::Outcome;
use headroom_shared::records::ServerState;
use headroom_shared::wire::{Assignment, EventKind};
use headroom_shared::{ClusterId, RequestId, ServerId};
use tracing::warn;

use super::{reject, Allocator, Event, Fact, FirstRead, Goal, OpError, Update};

impl Allocator {
    /// Takes `server` out of service, as it was in `c` when the request was
    /// taken up (generation `since`), and allocates one in its place.
    pub(super) async fn replace(
        &self,
        c: &ClusterId,
        server: &ServerId,
        id: &RequestId,
        since: u64,
    ) -> Result<Outcome, OpError> {
        self.load_cluster(c).await?;
        let update = self
            .update_server(server, |mut current| async move {
                let done = matches!(current.state, ServerState::OutOfService { .. })
                    && current.last_request.as_ref() == Some(id);
                // A later join of the server: the one this request replaced
                // was taken out before it returned through the pool.
                let rejoined = self
                    .load_cluster(c)
                    .await?
                    .value
                    .member(server)
                    .is_some_and(|m| m.joined > since);
                if done || rejoined {
                    return Ok(None);
                }
                if current.state.cluster() != Some(c) {
                    return Err(reject(
                        codes::NOT_A_MEMBER,
                        format!("{server} is not a member of {c}"),
                    ));
                }
                // Out of service first: it can then never be allocated
                // elsewhere while the entry still lists it.
                current.state = ServerState::OutOfService {
                    reason: format!("replaced in {c} by request {id}"),
                };
                current.last_request = Some(id.clone());
                current.last_cluster = Some(c.clone());
                Ok(Some(current))
            })
            .await?;
        if matches!(update, Update::Absent) {
            return Err(reject(
                codes::UNKNOWN_SERVER,
                format!("no server named {server}"),
            ));
        }
        let removed = update.written();
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
        let event = Event::new(
            EventKind::OutOfService,
            Fact::Request {
                request: id,
                server: Some(server),
            },
        )
        .cluster(c)
        .server(server)
        .request(id)
        .detail(format!("{server} taken out of service in {c}"));
        self.log(event).await;
        let goal = Goal::Count { count: 1, since };
        self.allocate(c, id, goal, None, FirstRead::none()).await
    }
}
