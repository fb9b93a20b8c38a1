//! The allocator's in-memory view of the server pool, kept by a watch on
//! `headroom-servers`: every record, and the free ones indexed so choosing
//! a server costs a few ordered-set lookups, not a read of every key.
//!
//! The view is a hint. It can lag KV by the watch's delay, and another
//! instance can claim a server it still shows as free: the compare-and-set
//! on the server record decides, and a claim that finds the record moved
//! feeds the fresh record back into the view ([`PoolView::observe`]) before
//! the allocator picks again.
//!
//! Free servers are grouped by the set of request types they serve (a
//! fleet has few such sets), and within a group by the cluster they last
//! served, so [`PoolView::candidates`] ranks as
//! [`crate::placement::rank_candidates`] does by visiting groups, not
//! servers.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, RwLock};

use async_nats::jetstream::kv;
use futures::StreamExt;
use headroom_shared::codec::Codec;
use headroom_shared::records::{ClusterRecord, ServerRecord, ServerState};
use headroom_shared::{ClusterId, ServerId};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error};

use crate::store::Versioned;

/// Free servers that serve one set of request types.
#[derive(Default)]
struct Group {
    all: BTreeSet<ServerId>,
    /// The same servers by the cluster they served last.
    by_last: HashMap<ClusterId, BTreeSet<ServerId>>,
}

#[derive(Default)]
struct Index {
    records: HashMap<ServerId, (ServerRecord, u64)>,
    /// Servers deleted, at the revision of their deletion (or just above
    /// the last revision seen), so a slower read cannot bring one back.
    gone: HashMap<ServerId, u64>,
    /// Free servers by the (sorted) request types they serve.
    free: HashMap<Vec<String>, Group>,
}

fn signature(record: &ServerRecord) -> Vec<String> {
    let mut types = record.request_types.clone();
    types.sort();
    types.dedup();
    types
}

impl Index {
    fn unindex(&mut self, record: &ServerRecord) {
        if record.state != ServerState::Free {
            return;
        }
        let sig = signature(record);
        let Some(group) = self.free.get_mut(&sig) else {
            return;
        };
        group.all.remove(&record.id);
        if let Some(last) = &record.last_cluster {
            if let Some(warm) = group.by_last.get_mut(last) {
                warm.remove(&record.id);
                if warm.is_empty() {
                    group.by_last.remove(last);
                }
            }
        }
        if group.all.is_empty() {
            self.free.remove(&sig);
        }
    }

    fn index(&mut self, record: &ServerRecord) {
        if record.state != ServerState::Free {
            return;
        }
        let group = self.free.entry(signature(record)).or_default();
        group.all.insert(record.id.clone());
        if let Some(last) = &record.last_cluster {
            group
                .by_last
                .entry(last.clone())
                .or_default()
                .insert(record.id.clone());
        }
    }

    /// Takes `record` at `revision` unless the view already has a later one.
    fn put(&mut self, record: ServerRecord, revision: u64) {
        if self.gone.get(&record.id).is_some_and(|&at| at >= revision) {
            return;
        }
        self.gone.remove(&record.id);
        if let Some((old, seen)) = self.records.get(&record.id) {
            if *seen >= revision {
                return;
            }
            let old = old.clone();
            self.unindex(&old);
        }
        self.index(&record);
        self.records.insert(record.id.clone(), (record, revision));
    }

    fn remove(&mut self, key: &str, revision: u64) {
        let Ok(id) = ServerId::new(key) else {
            return;
        };
        if let Some((old, seen)) = self.records.get(&id) {
            if *seen >= revision {
                return;
            }
            let old = old.clone();
            self.unindex(&old);
            self.records.remove(&id);
        }
        let at = self.gone.entry(id).or_default();
        *at = (*at).max(revision);
    }
}

/// What the allocator knows of the pool, shared by its tasks.
#[derive(Clone)]
pub struct PoolView {
    index: Arc<RwLock<Index>>,
    current: watch::Receiver<bool>,
}

/// Keeps a [`PoolView`] up to date; run it as a task.
pub struct PoolFollower {
    index: Arc<RwLock<Index>>,
    current: watch::Sender<bool>,
}

/// A view and the task that keeps it.
pub fn view() -> (PoolView, PoolFollower) {
    let index = Arc::new(RwLock::new(Index::default()));
    let (tx, rx) = watch::channel(false);
    (
        PoolView {
            index: index.clone(),
            current: rx,
        },
        PoolFollower { index, current: tx },
    )
}

impl PoolFollower {
    /// Follows the bucket until `stop`: current values first (the view is
    /// current once they are in), then every change. A watch that breaks is
    /// started again and replays; older revisions are skipped.
    pub async fn follow(self, bucket: kv::Store, stop: CancellationToken) {
        // An empty bucket delivers nothing to say it is current.
        if bucket.status().await.is_ok_and(|s| s.values() == 0) {
            self.current.send_replace(true);
        }
        let mut entries = std::pin::pin!(headroom_shared::kv::follow(bucket, ">".to_owned(), stop));
        while let Some(entry) = entries.next().await {
            self.apply(&entry);
            if entry.seen_current && !*self.current.borrow() {
                self.current.send_replace(true);
            }
        }
    }

    fn apply(&self, entry: &kv::Entry) {
        let mut index = self.index.write().unwrap_or_else(|p| p.into_inner());
        match entry.operation {
            kv::Operation::Put => match Codec::MsgPack.decode::<ServerRecord>(&entry.value) {
                Ok(record) => index.put(record, entry.revision),
                Err(err) => {
                    // One bad record must not stop the view: it is left out.
                    error!(%err, key = %entry.key, "skipping an undecodable server record");
                    index.remove(&entry.key, entry.revision);
                }
            },
            kv::Operation::Delete | kv::Operation::Purge => {
                index.remove(&entry.key, entry.revision);
            }
        }
    }
}

impl PoolView {
    fn read(&self) -> std::sync::RwLockReadGuard<'_, Index> {
        self.index.read().unwrap_or_else(|p| p.into_inner())
    }

    /// Waits until the view holds every record the bucket had when it
    /// started following (or `stop`).
    pub async fn wait_current(&self, stop: &CancellationToken) {
        let mut current = self.current.clone();
        tokio::select! {
            _ = stop.cancelled() => {}
            _ = current.wait_for(|c| *c) => {}
        }
    }

    /// Takes a record just read from KV, if it is newer than the view's.
    pub fn observe(&self, record: &ServerRecord, revision: u64) {
        let mut index = self.index.write().unwrap_or_else(|p| p.into_inner());
        index.put(record.clone(), revision);
        debug!(server = %record.id, revision, "view refreshed by a read");
    }

    /// Takes a read that found no record for `id`: it was deleted after
    /// the last revision the view has of it.
    pub fn observe_absent(&self, id: &ServerId) {
        let mut index = self.index.write().unwrap_or_else(|p| p.into_inner());
        let after = index.records.get(id).map(|(_, seen)| seen + 1);
        if let Some(after) = after {
            index.remove(id.as_str(), after);
        }
    }

    /// The view's record of `id`, at the revision it was seen at.
    pub fn get(&self, id: &ServerId) -> Option<Versioned<ServerRecord>> {
        let index = self.read();
        index.records.get(id).map(|(value, revision)| Versioned {
            value: value.clone(),
            revision: *revision,
        })
    }

    /// Every record, in id order (admin listing, the reconciler).
    pub fn servers(&self) -> Vec<ServerRecord> {
        let index = self.read();
        let mut all: Vec<ServerRecord> = index.records.values().map(|(r, _)| r.clone()).collect();
        all.sort_by(|a, b| a.id.cmp(&b.id));
        all
    }

    /// How many servers it knows.
    pub fn len(&self) -> usize {
        self.read().records.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// How many servers are in each state (the gauges).
    pub fn counts(&self) -> HashMap<&'static str, usize> {
        let mut counts = HashMap::new();
        for (record, _) in self.read().records.values() {
            *counts.entry(record.state.name()).or_default() += 1;
        }
        counts
    }

    /// Up to `k` free servers that can join `cluster`, best first, ranked
    /// as [`crate::placement::rank_candidates`] ranks them.
    ///
    /// Cost: for each group of free servers that fits, a few ordered-set
    /// steps, plus one step per member of the cluster passed over; never a
    /// visit of every free server.
    pub fn candidates(
        &self,
        cluster: &ClusterRecord,
        request_type: Option<&str>,
        k: usize,
    ) -> Vec<ServerRecord> {
        let types = cluster.policy.request_types();
        let index = self.read();
        // (covers every type, coverage, group) for the groups that fit.
        let mut groups: Vec<(bool, usize, &Group)> = index
            .free
            .iter()
            .filter(|(sig, _)| request_type.is_none_or(|t| sig.iter().any(|s| s == t)))
            .filter(|(sig, _)| types.is_empty() || types.iter().any(|t| sig.contains(t)))
            .map(|(sig, group)| {
                let coverage = types.iter().filter(|t| sig.contains(t)).count();
                (coverage == types.len(), coverage, group)
            })
            .collect();
        // The rank's order: covers all, then warm, then coverage, then id.
        groups.sort_by_key(|(all, coverage, _)| {
            (std::cmp::Reverse(*all), std::cmp::Reverse(*coverage))
        });
        let usable = |id: &ServerId| cluster.member(id).is_none();
        let mut picked: Vec<ServerId> = Vec::with_capacity(k);
        for covers_all in [true, false] {
            let tier: Vec<(usize, &Group)> = groups
                .iter()
                .filter(|(all, _, _)| *all == covers_all)
                .map(|(_, coverage, group)| (*coverage, *group))
                .collect();
            // Warm servers of the tier first, by coverage then id.
            let warm = tier.iter().filter_map(|(coverage, group)| {
                group.by_last.get(&cluster.id).map(|set| (*coverage, set))
            });
            take_ranked(warm, &usable, k, &mut picked);
            let cold = tier.iter().map(|(coverage, group)| (*coverage, &group.all));
            let is_warm = |id: &ServerId| {
                index
                    .records
                    .get(id)
                    .is_some_and(|(r, _)| r.last_cluster.as_ref() == Some(&cluster.id))
            };
            take_ranked(cold, &|id| usable(id) && !is_warm(id), k, &mut picked);
            if picked.len() >= k {
                break;
            }
        }
        picked
            .iter()
            .filter_map(|id| index.records.get(id).map(|(r, _)| r.clone()))
            .collect()
    }
}

/// Adds to `picked`, up to `k` in all, ids from `sets` in (coverage
/// descending, id ascending) order, keeping those `usable` allows.
fn take_ranked<'a>(
    sets: impl Iterator<Item = (usize, &'a BTreeSet<ServerId>)>,
    usable: &dyn Fn(&ServerId) -> bool,
    k: usize,
    picked: &mut Vec<ServerId>,
) {
    let mut sets: Vec<(usize, &BTreeSet<ServerId>)> = sets.collect();
    sets.sort_by_key(|(coverage, _)| std::cmp::Reverse(*coverage));
    let mut start = 0;
    while start < sets.len() && picked.len() < k {
        // The sets of one coverage are merged in id order.
        let coverage = sets[start].0;
        let end = start
            + sets[start..]
                .iter()
                .take_while(|(c, _)| *c == coverage)
                .count();
        let mut merged: Vec<&ServerId> = Vec::new();
        for (_, set) in &sets[start..end] {
            merged.extend(
                set.iter()
                    .filter(|id| usable(id) && !picked.contains(id))
                    .take(k),
            );
        }
        merged.sort();
        for id in merged {
            if picked.len() >= k {
                break;
            }
            picked.push(id.clone());
        }
        start = end;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::placement::rank_candidates;
    use headroom_shared::records::{ClusterPolicy, Member, MemberState, Route};
    use headroom_shared::RequestId;
    use rand::{Rng, SeedableRng};

    const TYPES: [&str; 3] = ["static", "api", "batch"];

    fn record(n: u32, types: &[&str], state: ServerState, last: Option<&str>) -> ServerRecord {
        ServerRecord {
            v: 1,
            id: ServerId::new(format!("s{n:03}")).expect("id"),
            address: "127.0.0.1".into(),
            port: 8000,
            request_types: types.iter().map(|t| (*t).to_owned()).collect(),
            state,
            last_request: None,
            last_cluster: last.map(|c| ClusterId::new(c).expect("id")),
            updated_ms: 0,
            agent: false,
        }
    }

    fn cluster(id: &str, types: &[&str], members: &[&ServerRecord]) -> ClusterRecord {
        let route = |t: &&str| Route {
            request_type: (*t).to_owned(),
            path_prefix: None,
            host: None,
            methods: vec![],
            balance: Default::default(),
        };
        let mut c = ClusterRecord::new(
            ClusterId::new(id).expect("id"),
            ClusterPolicy {
                routes: types.iter().map(route).collect(),
                ..ClusterPolicy::default()
            },
            0,
        );
        for s in members {
            c.members.push(Member {
                server: s.id.clone(),
                address: s.address.clone(),
                port: s.port,
                request_types: s.request_types.clone(),
                state: MemberState::Joining,
                weight: 1.0,
                request: RequestId::random(),
                drain_request: None,
                since_ms: 0,
                joined: 0,
            });
        }
        c
    }

    fn ids(records: &[ServerRecord]) -> Vec<String> {
        records.iter().map(|r| r.id.to_string()).collect()
    }

    #[test]
    fn ranks_as_the_plain_rule_on_random_pools() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        for round in 0..300 {
            let (view, follower) = view();
            let mut records = Vec::new();
            for n in 0..rng.random_range(0..40) {
                let types: Vec<&str> = TYPES
                    .iter()
                    .copied()
                    .filter(|_| rng.random_bool(0.5))
                    .collect();
                let state = match rng.random_range(0..4) {
                    0 => ServerState::Allocated {
                        cluster: ClusterId::new("x").expect("id"),
                    },
                    _ => ServerState::Free,
                };
                let last = [None, Some("web"), Some("api")][rng.random_range(0..3)];
                let r = record(n, &types, state, last);
                follower.index.write().expect("lock").put(r.clone(), 1);
                records.push(r);
            }
            let wanted: Vec<&str> = TYPES
                .iter()
                .copied()
                .filter(|_| rng.random_bool(0.5))
                .collect();
            let listed: Vec<&ServerRecord> =
                records.iter().filter(|_| rng.random_bool(0.1)).collect();
            let web = cluster("web", &wanted, &listed);
            let request_type = [None, Some("api")][rng.random_range(0..2)];
            let expected: Vec<String> = rank_candidates(&records, &web, request_type)
                .iter()
                .take(3)
                .map(|r| r.id.to_string())
                .collect();
            assert_eq!(
                ids(&view.candidates(&web, request_type, 3)),
                expected,
                "round {round}: cluster types {wanted:?}, request type {request_type:?}"
            );
        }
    }

    #[test]
    fn follows_changes_and_ignores_older_revisions() {
        let (view, follower) = view();
        let web = cluster("web", &[], &[]);
        let free = record(1, &[], ServerState::Free, None);
        let taken = record(
            1,
            &[],
            ServerState::Allocated {
                cluster: web.id.clone(),
            },
            None,
        );
        follower.index.write().expect("lock").put(free.clone(), 5);
        assert_eq!(ids(&view.candidates(&web, None, 3)), vec!["s001"]);
        view.observe(&taken, 6);
        assert!(view.candidates(&web, None, 3).is_empty(), "claimed");
        view.observe(&free, 5);
        assert!(
            view.candidates(&web, None, 3).is_empty(),
            "an older read changes nothing"
        );
        // Deleted, then a slow read of before the delete: it stays gone.
        follower.index.write().expect("lock").remove("s001", 7);
        view.observe(&free, 6);
        assert_eq!(view.len(), 0);
        // Registered again later: back.
        view.observe(&free, 8);
        assert_eq!(ids(&view.candidates(&web, None, 3)), vec!["s001"]);
        // A read that finds it gone: gone, until a later revision.
        view.observe_absent(&free.id);
        assert_eq!(view.len(), 0);
        assert_eq!(view.counts().get("free"), None);
    }
}
