//! The operator's and the agents' commands: register and deregister a
//! server in the pool, create or change a cluster's policy.

use headroom_shared::errors::codes;
use headroom_shared::ledger::Outcome;
use headroom_shared::records::{ClusterPolicy, ClusterRecord, ServerRecord, ServerState};
use headroom_shared::time::now_ms;
use headroom_shared::wire::{EventKind, RegisterServer};
use headroom_shared::{ClusterId, ServerId};
use tracing::{info, warn};

use super::{reject, Allocator, Done, Event, Fact, OpError};

impl Allocator {
    /// Adds a server to the pool, or updates a free one's connection info.
    /// A server out of service that registers again returns to the pool.
    ///
    /// # Errors
    /// [`OpError::Rejected`] when the server is in use with other
    /// connection info.
    pub async fn register(
        &self,
        reg: &RegisterServer,
        by_agent: bool,
    ) -> Result<ServerRecord, OpError> {
        if reg.address.trim().is_empty() || reg.port == 0 {
            return Err(reject(codes::INVALID, "address and port are required"));
        }
        let what = || format!("registration of {}", reg.id);
        self.with_retries(what, |_| async move {
            let existing = self.server(&reg.id).await?;
            let (record, revision) = match existing {
                None => (
                    ServerRecord {
                        agent: by_agent,
                        ..ServerRecord::new_free(
                            reg.id.clone(),
                            reg.address.clone(),
                            reg.port,
                            reg.request_types.clone(),
                            now_ms(),
                        )
                    },
                    0,
                ),
                Some(current) => {
                    // An agent once seen stays known: an operator's later
                    // registration does not make its server agentless.
                    let agent = current.value.agent || by_agent;
                    let same = current.value.address == reg.address
                        && current.value.port == reg.port
                        && current.value.request_types == reg.request_types;
                    let in_use = current.value.state.cluster().is_some();
                    match (same, current.value.agent == agent) {
                        (true, true) if in_use || current.value.state == ServerState::Free => {
                            return Ok(Done(current.value))
                        }
                        (true, false) if in_use => {
                            // Only the agent is news: the state stays.
                            let mut record = current.value.clone();
                            record.agent = true;
                            record.updated_ms = now_ms();
                            self.put_server(&record, current.revision).await?;
                            info!(server = %record.id, "its agent registered it");
                            return Ok(Done(record));
                        }
                        (false, _) if in_use => {
                            return Err(reject(
                                codes::SERVER_IN_USE,
                                format!(
                                    "{} is {}; release it before changing its connection info",
                                    reg.id,
                                    current.value.state.name()
                                ),
                            ))
                        }
                        _ => {}
                    }
                    let mut record = current.value.clone();
                    record.address = reg.address.clone();
                    record.port = reg.port;
                    record.request_types = reg.request_types.clone();
                    record.agent = agent;
                    record.state = ServerState::Free;
                    record.updated_ms = now_ms();
                    (record, current.revision)
                }
            };
            let rev = self.put_server(&record, revision).await?;
            info!(server = %record.id, address = %record.address, port = record.port, "registered");
            let event = Event::new(
                EventKind::Registered,
                Fact::Write {
                    record: record.id.as_str(),
                    revision: rev,
                },
            )
            .server(&record.id)
            .detail(format!(
                "{}:{} serves {:?}",
                record.address, record.port, record.request_types
            ));
            self.log(event).await;
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
            let event = Event::new(
                EventKind::Deregistered,
                Fact::Write {
                    record: server.as_str(),
                    revision: current.revision,
                },
            )
            .server(server);
            self.log(event).await;
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
                let event = Event::new(
                    EventKind::PolicyUpdated,
                    Fact::Write {
                        record: c.as_str(),
                        revision: rev,
                    },
                )
                .cluster(c)
                .detail(format!("min {} max {}", policy.min_size, policy.max_size));
                self.log(event).await;
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
}
