//! Reweight: a member's share of its cluster's traffic, as the monitor
//! asks when one member is hot while the rest are fine.

use headroom_shared::errors::codes;
use headroom_shared::ledger::Outcome;
use headroom_shared::records::MemberState;
use headroom_shared::wire::EventKind;
use headroom_shared::{ClusterId, RequestId, ServerId};

use super::{applied, reject, Allocator, Done, Event, Fact, OpError};

impl Allocator {
    pub(super) async fn reweight(
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
            let event = Event::new(
                EventKind::Reweighted,
                Fact::Request {
                    request: id,
                    server: None,
                },
            )
            .cluster(c)
            .server(server)
            .request(id)
            .detail(format!("{server} weight {weight}"));
            self.log(event).await;
            Ok(Done(applied(server)))
        })
        .await
    }
}
