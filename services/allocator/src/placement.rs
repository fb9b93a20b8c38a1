//! The allocator's decisions as pure functions of KV state: which free
//! server to allocate, and what a crash left half-done that needs repair.
//! No I/O here, so every rule is unit-tested without NATS.

use std::collections::HashMap;

use headroom_shared::records::{ClusterRecord, MemberState, ServerRecord, ServerState};
use headroom_shared::{ClusterId, ServerId};

/// Free servers that can join `cluster`, best first: the ranking stated
/// plainly, over a list. The allocator ranks from its indexed view of the
/// pool ([`crate::pool::PoolView::candidates`]), which is tested against
/// this, so this is kept for the tests only.
///
/// A server fits when it serves `request_type` (if one is asked for) and at
/// least one of the cluster's request types. Among those: servers that cover
/// every type the cluster routes, then servers that served this cluster
/// before (their cache is warm for it), then wider coverage, then id order
/// so the choice is stable.
#[cfg(test)]
pub fn rank_candidates<'a>(
    servers: impl IntoIterator<Item = &'a ServerRecord>,
    cluster: &ClusterRecord,
    request_type: Option<&str>,
) -> Vec<&'a ServerRecord> {
    let types = cluster.policy.request_types();
    let mut fit: Vec<&ServerRecord> = servers
        .into_iter()
        .filter(|s| s.state == ServerState::Free)
        .filter(|s| cluster.member(&s.id).is_none())
        .filter(|s| request_type.is_none_or(|t| s.request_types.iter().any(|own| own == t)))
        .filter(|s| s.serves_any(&types))
        .collect();
    fit.sort_by_key(|s| {
        let coverage = s.coverage(&types);
        (
            std::cmp::Reverse(coverage == types.len()),
            std::cmp::Reverse(s.last_cluster.as_ref() == Some(&cluster.id)),
            std::cmp::Reverse(coverage),
            s.id.clone(),
        )
    });
    fit
}

/// A repair of state that a crash (or a racing instance) left half-done.
/// Each is re-checked against fresh KV state before it is applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Repair {
    /// A joining entry whose server was claimed for the cluster: finish the
    /// allocation.
    CommitJoining {
        cluster: ClusterId,
        server: ServerId,
    },
    /// An entry whose server record does not tie it to this cluster (never
    /// claimed, claimed elsewhere, out of service, or gone): the server
    /// record is the authority, so the entry goes.
    DropEntry {
        cluster: ClusterId,
        server: ServerId,
    },
    /// The server record says draining but the entry still takes traffic.
    MarkEntryDraining {
        cluster: ClusterId,
        server: ServerId,
    },
    /// The entry says draining but the server record does not.
    DrainServer {
        cluster: ClusterId,
        server: ServerId,
        deadline_ms: u64,
    },
    /// A drain whose deadline passed, or a draining server no longer listed.
    FinishDrain {
        cluster: ClusterId,
        server: ServerId,
    },
    /// A server claimed for a cluster that never listed it: back to the pool.
    FreeOrphan { server: ServerId },
    /// The cluster is below its minimum size.
    FillToMin { cluster: ClusterId, missing: u32 },
}

impl Repair {
    /// The records it concerns: its cluster, its server.
    pub fn subject(&self) -> (Option<&ClusterId>, Option<&ServerId>) {
        match self {
            Self::CommitJoining { cluster, server }
            | Self::DropEntry { cluster, server }
            | Self::MarkEntryDraining { cluster, server }
            | Self::DrainServer {
                cluster, server, ..
            }
            | Self::FinishDrain { cluster, server } => (Some(cluster), Some(server)),
            Self::FreeOrphan { server } => (None, Some(server)),
            Self::FillToMin { cluster, .. } => (Some(cluster), None),
        }
    }

    pub fn name(&self) -> &'static str {
        match self {
            Self::CommitJoining { .. } => "commit_joining",
            Self::DropEntry { .. } => "drop_entry",
            Self::MarkEntryDraining { .. } => "mark_entry_draining",
            Self::DrainServer { .. } => "drain_server",
            Self::FinishDrain { .. } => "finish_drain",
            Self::FreeOrphan { .. } => "free_orphan",
            Self::FillToMin { .. } => "fill_to_min",
        }
    }
}

/// What needs repair, given every cluster and server record at `now_ms`.
/// Half-done work younger than `repair_after_ms` is left to the instance
/// doing it.
pub fn plan_repairs(
    clusters: &[ClusterRecord],
    servers: &[ServerRecord],
    now_ms: u64,
    repair_after_ms: u64,
) -> Vec<Repair> {
    let by_id: HashMap<&ServerId, &ServerRecord> = servers.iter().map(|s| (&s.id, s)).collect();
    let stale = |since_ms: u64| now_ms.saturating_sub(since_ms) >= repair_after_ms;
    let mut repairs = Vec::new();

    for cluster in clusters {
        let c = &cluster.id;
        for entry in &cluster.members {
            let server = by_id.get(&entry.server).copied();
            let state = server.map(|s| &s.state);
            let here = state.and_then(ServerState::cluster) == Some(c);
            let repair = match (entry.state, state) {
                (MemberState::Joining, Some(ServerState::Allocated { .. })) if here => {
                    stale(entry.since_ms).then(|| Repair::CommitJoining {
                        cluster: c.clone(),
                        server: entry.server.clone(),
                    })
                }
                (MemberState::Joining, Some(ServerState::Draining { .. })) if here => {
                    Some(Repair::MarkEntryDraining {
                        cluster: c.clone(),
                        server: entry.server.clone(),
                    })
                }
                (MemberState::Joining, _) => stale(entry.since_ms).then(|| Repair::DropEntry {
                    cluster: c.clone(),
                    server: entry.server.clone(),
                }),
                (MemberState::Active, Some(ServerState::Draining { .. })) if here => {
                    Some(Repair::MarkEntryDraining {
                        cluster: c.clone(),
                        server: entry.server.clone(),
                    })
                }
                (MemberState::Draining, Some(ServerState::Allocated { .. })) if here => {
                    Some(Repair::DrainServer {
                        cluster: c.clone(),
                        server: entry.server.clone(),
                        deadline_ms: entry
                            .since_ms
                            .saturating_add(cluster.policy.drain_timeout_ms),
                    })
                }
                (MemberState::Draining, Some(ServerState::Draining { deadline_ms, .. }))
                    if here =>
                {
                    (now_ms >= *deadline_ms).then(|| Repair::FinishDrain {
                        cluster: c.clone(),
                        server: entry.server.clone(),
                    })
                }
                (MemberState::Active, Some(ServerState::Allocated { .. })) if here => None,
                (MemberState::Active | MemberState::Draining, _) => Some(Repair::DropEntry {
                    cluster: c.clone(),
                    server: entry.server.clone(),
                }),
            };
            repairs.extend(repair);
        }
        let size = u32::try_from(cluster.size()).unwrap_or(u32::MAX);
        if size < cluster.policy.min_size {
            repairs.push(Repair::FillToMin {
                cluster: c.clone(),
                missing: cluster.policy.min_size - size,
            });
        }
    }

    let clusters_by_id: HashMap<&ClusterId, &ClusterRecord> =
        clusters.iter().map(|c| (&c.id, c)).collect();
    for server in servers {
        let Some(c) = server.state.cluster() else {
            continue;
        };
        let listed = clusters_by_id
            .get(c)
            .is_some_and(|cluster| cluster.member(&server.id).is_some());
        if listed {
            continue;
        }
        match &server.state {
            ServerState::Allocated { .. } if stale(server.updated_ms) => {
                repairs.push(Repair::FreeOrphan {
                    server: server.id.clone(),
                });
            }
            ServerState::Draining { cluster, .. } => repairs.push(Repair::FinishDrain {
                cluster: cluster.clone(),
                server: server.id.clone(),
            }),
            _ => {}
        }
    }
    repairs
}

#[cfg(test)]
mod tests {
    use super::*;
    use headroom_shared::records::{ClusterPolicy, Member, Route};
    use headroom_shared::RequestId;

    fn sid(s: &str) -> ServerId {
        ServerId::new(s).expect("id")
    }
    fn cid(s: &str) -> ClusterId {
        ClusterId::new(s).expect("id")
    }
    fn server(id: &str, types: &[&str], state: ServerState) -> ServerRecord {
        ServerRecord {
            v: 1,
            id: sid(id),
            address: "127.0.0.1".into(),
            port: 8000,
            request_types: types.iter().map(|t| (*t).to_owned()).collect(),
            state,
            last_request: None,
            last_cluster: None,
            updated_ms: 0,
            agent: false,
        }
    }
    fn cluster(id: &str, types: &[&str]) -> ClusterRecord {
        ClusterRecord::new(
            cid(id),
            ClusterPolicy {
                min_size: 0,
                routes: types
                    .iter()
                    .map(|t| Route {
                        request_type: (*t).to_owned(),
                        path_prefix: None,
                        host: None,
                        methods: vec![],
                        balance: Default::default(),
                    })
                    .collect(),
                ..ClusterPolicy::default()
            },
            0,
        )
    }
    fn entry(server: &str, state: MemberState, since_ms: u64) -> Member {
        Member {
            server: sid(server),
            address: "127.0.0.1".into(),
            port: 8000,
            request_types: vec![],
            state,
            weight: 1.0,
            request: RequestId::new("r").expect("id"),
            drain_request: None,
            since_ms,
            joined: 0,
        }
    }
    fn allocated(c: &str) -> ServerState {
        ServerState::Allocated { cluster: cid(c) }
    }
    fn ids(list: &[&ServerRecord]) -> Vec<String> {
        list.iter().map(|s| s.id.to_string()).collect()
    }

    #[test]
    fn only_free_fitting_servers_are_candidates() {
        let web = cluster("web", &["static", "api"]);
        let servers = [
            server("a", &["api"], ServerState::Free),
            server("b", &["batch"], ServerState::Free),
            server("c", &["static", "api"], allocated("other")),
            server("d", &[], ServerState::OutOfService { reason: "x".into() }),
        ];
        assert_eq!(ids(&rank_candidates(&servers, &web, None)), vec!["a"]);
        assert!(rank_candidates(&servers, &web, Some("static")).is_empty());
    }

    #[test]
    fn full_coverage_then_warm_cache_then_id() {
        let web = cluster("web", &["static", "api"]);
        let mut warm = server("z", &["static", "api"], ServerState::Free);
        warm.last_cluster = Some(cid("web"));
        let servers = [
            server("a", &["api"], ServerState::Free),
            server("b", &["static", "api"], ServerState::Free),
            warm,
        ];
        assert_eq!(
            ids(&rank_candidates(&servers, &web, None)),
            vec!["z", "b", "a"]
        );
    }

    #[test]
    fn a_cluster_without_routes_takes_any_server_but_not_its_own_members() {
        let mut any = cluster("any", &[]);
        any.members.push(entry("a", MemberState::Joining, 0));
        let servers = [
            server("a", &[], ServerState::Free),
            server("b", &["x"], ServerState::Free),
        ];
        assert_eq!(ids(&rank_candidates(&servers, &any, None)), vec!["b"]);
    }

    #[test]
    fn consistent_state_needs_no_repair() {
        let mut web = cluster("web", &[]);
        web.members.push(entry("a", MemberState::Active, 0));
        let servers = [
            server("a", &[], allocated("web")),
            server("b", &[], ServerState::Free),
        ];
        assert!(plan_repairs(&[web], &servers, 100_000, 1_000).is_empty());
    }

    #[test]
    fn a_fresh_joining_entry_is_left_to_its_allocator() {
        let mut web = cluster("web", &[]);
        web.members.push(entry("a", MemberState::Joining, 99_500));
        let servers = [server("a", &[], ServerState::Free)];
        assert!(plan_repairs(std::slice::from_ref(&web), &servers, 100_000, 1_000).is_empty());
        assert_eq!(
            plan_repairs(&[web], &servers, 101_000, 1_000),
            vec![Repair::DropEntry {
                cluster: cid("web"),
                server: sid("a")
            }]
        );
    }

    #[test]
    fn a_claimed_joining_entry_is_committed() {
        let mut web = cluster("web", &[]);
        web.members.push(entry("a", MemberState::Joining, 0));
        let servers = [server("a", &[], allocated("web"))];
        assert_eq!(
            plan_repairs(&[web], &servers, 5_000, 1_000),
            vec![Repair::CommitJoining {
                cluster: cid("web"),
                server: sid("a")
            }]
        );
    }

    #[test]
    fn half_done_releases_roll_forward() {
        let mut web = cluster("web", &[]);
        web.policy.drain_timeout_ms = 500;
        web.members.push(entry("a", MemberState::Active, 0));
        web.members.push(entry("b", MemberState::Draining, 1_000));
        web.members.push(entry("c", MemberState::Draining, 0));
        let servers = [
            server(
                "a",
                &[],
                ServerState::Draining {
                    cluster: cid("web"),
                    deadline_ms: 9_000,
                },
            ),
            server("b", &[], allocated("web")),
            server(
                "c",
                &[],
                ServerState::Draining {
                    cluster: cid("web"),
                    deadline_ms: 2_000,
                },
            ),
            server(
                "d",
                &[],
                ServerState::Draining {
                    cluster: cid("web"),
                    deadline_ms: 9_000,
                },
            ),
        ];
        let repairs = plan_repairs(&[web], &servers, 3_000, 1_000);
        assert_eq!(
            repairs,
            vec![
                Repair::MarkEntryDraining {
                    cluster: cid("web"),
                    server: sid("a")
                },
                Repair::DrainServer {
                    cluster: cid("web"),
                    server: sid("b"),
                    deadline_ms: 1_500
                },
                Repair::FinishDrain {
                    cluster: cid("web"),
                    server: sid("c")
                },
                Repair::FinishDrain {
                    cluster: cid("web"),
                    server: sid("d")
                },
            ]
        );
    }

    #[test]
    fn the_server_record_wins_over_a_stale_entry() {
        let mut web = cluster("web", &[]);
        web.members.push(entry("a", MemberState::Active, 0));
        web.members.push(entry("b", MemberState::Active, 0));
        web.members.push(entry("gone", MemberState::Active, 0));
        let servers = [
            server("a", &[], allocated("other")),
            server(
                "b",
                &[],
                ServerState::OutOfService {
                    reason: "dead".into(),
                },
            ),
        ];
        let repairs = plan_repairs(&[web], &servers, 0, 1_000);
        assert_eq!(repairs.len(), 3);
        assert!(repairs
            .iter()
            .all(|r| matches!(r, Repair::DropEntry { .. })));
    }

    #[test]
    fn unlisted_claims_go_back_to_the_pool_once_stale() {
        let web = cluster("web", &[]);
        let mut orphan = server("a", &[], allocated("web"));
        orphan.updated_ms = 10_000;
        let vanished = server("b", &[], allocated("deleted"));
        let servers = [orphan, vanished];
        assert_eq!(
            plan_repairs(std::slice::from_ref(&web), &servers, 10_500, 1_000),
            vec![Repair::FreeOrphan { server: sid("b") }]
        );
        assert_eq!(plan_repairs(&[web], &servers, 11_000, 1_000).len(), 2);
    }

    #[test]
    fn clusters_below_min_are_filled() {
        let mut web = cluster("web", &[]);
        web.policy.min_size = 3;
        web.members.push(entry("a", MemberState::Active, 0));
        web.members.push(entry("b", MemberState::Draining, 0));
        let servers = [
            server("a", &[], allocated("web")),
            server(
                "b",
                &[],
                ServerState::Draining {
                    cluster: cid("web"),
                    deadline_ms: 1 << 40,
                },
            ),
        ];
        assert_eq!(
            plan_repairs(&[web], &servers, 0, 1_000),
            vec![Repair::FillToMin {
                cluster: cid("web"),
                missing: 2
            }]
        );
    }
}
