//! The whole history of the KV buckets, every revision in stream order,
//! and the invariants checked on it revision by revision: a test that
//! judges only the final state would miss a server that served two
//! clusters for a moment, or a join made twice and undone.
//!
//! KV keeps a few revisions per key; [`record_history`] mirrors each
//! bucket's stream into a stream of its own with no limits, so every
//! revision stays readable. It must run before the revisions it is to
//! judge are written (before any allocator starts, or right after a
//! compose stack's allocator made the buckets, before work begins).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::Duration;

use async_nats::jetstream::{self, stream};
use headroom_shared::codec::{Codec, Message};
use headroom_shared::kv::{open_bucket, Bucket, CLUSTERS_BUCKET, REQUESTS_BUCKET, SERVERS_BUCKET};
use headroom_shared::ledger::RequestRecord;
use headroom_shared::records::{ClusterRecord, MemberState, ServerRecord, ServerState};
use headroom_shared::wire::ReconfigAction;
use headroom_shared::{ClusterId, RequestId, ServerId};
use headroom_tests::eventually;

fn history_stream(bucket: &str) -> String {
    format!("HISTORY_{}", bucket.replace('-', "_"))
}

/// Opens the buckets (creating them as the services would when they are
/// not there yet), and a mirror of each with no limits, so every revision
/// stays readable after KV has let it go. `replicas` as the stack's.
///
/// # Errors
/// When JetStream does not answer (it may still be electing a leader).
pub async fn record_history(
    js: &jetstream::Context,
    replicas: usize,
) -> Result<(), async_nats::Error> {
    for bucket in [Bucket::Servers, Bucket::Clusters, Bucket::Requests] {
        open_bucket(js, bucket, replicas).await?;
        let bucket = bucket.name();
        js.create_stream(stream::Config {
            name: history_stream(bucket),
            mirror: Some(stream::Source {
                name: format!("KV_{bucket}"),
                ..Default::default()
            }),
            storage: stream::StorageType::File,
            num_replicas: replicas,
            ..Default::default()
        })
        .await?;
    }
    Ok(())
}

/// One revision of a KV key: its key, and its value unless it was a delete.
pub struct Revision<T> {
    pub key: String,
    pub value: Option<T>,
}

/// Every revision of the three buckets, each bucket in its stream order.
pub struct History {
    pub servers: Vec<Revision<ServerRecord>>,
    pub clusters: Vec<Revision<ClusterRecord>>,
    /// The ledger: outcomes under the request's id, taken-up marks under
    /// `started.<id>` (kept as written; only outcomes are decoded).
    pub requests: Vec<Revision<bytes::Bytes>>,
}

impl History {
    pub async fn read(js: &jetstream::Context) -> Self {
        Self {
            servers: decoded(read_revisions(js, SERVERS_BUCKET).await),
            clusters: decoded(read_revisions(js, CLUSTERS_BUCKET).await),
            requests: read_revisions(js, REQUESTS_BUCKET).await,
        }
    }

    /// The requests the ledger has an outcome for, each once, with what
    /// they asked: what was asked of a stack whose requests the test did
    /// not send itself.
    pub fn asked(&self) -> Vec<(RequestId, ReconfigAction)> {
        let mut seen = HashSet::new();
        self.requests
            .iter()
            .filter(|r| !r.key.starts_with("started."))
            .filter_map(|r| {
                Codec::MsgPack
                    .decode::<RequestRecord>(r.value.as_ref()?)
                    .ok()
            })
            .filter_map(|r| Some((r.id, r.action?)))
            .filter(|(id, _)| seen.insert(id.clone()))
            .collect()
    }
}

fn decoded<T: Message>(revisions: Vec<Revision<bytes::Bytes>>) -> Vec<Revision<T>> {
    revisions
        .into_iter()
        .map(|r| Revision {
            value: r.value.map(|bytes| {
                Codec::MsgPack
                    .decode::<T>(&bytes)
                    .unwrap_or_else(|e| panic!("revision of {} decodes: {e}", r.key))
            }),
            key: r.key,
        })
        .collect()
}

/// Waits until the mirror of `bucket` holds every message its stream ever
/// had, then reads them all in order.
async fn read_revisions(js: &jetstream::Context, bucket: &str) -> Vec<Revision<bytes::Bytes>> {
    let origin = format!("KV_{bucket}");
    let caught_up = eventually(Duration::from_secs(30), || async {
        let mut origin = js.get_stream(&origin).await.ok()?;
        let last = origin.info().await.ok()?.state.last_sequence;
        let mut mirror = js.get_stream(history_stream(bucket)).await.ok()?;
        let state = mirror.info().await.ok()?.state.clone();
        (state.messages == last).then_some(state)
    })
    .await
    .unwrap_or_else(|| panic!("the mirror of {bucket} never held every revision"));
    let mirror = js.get_stream(history_stream(bucket)).await.expect("mirror");
    let prefix = format!("$KV.{bucket}.");
    let mut out = Vec::new();
    // An empty stream's sequences are 0..=0, and there is no message 0.
    let written =
        (caught_up.messages > 0).then_some(caught_up.first_sequence..=caught_up.last_sequence);
    for seq in written.into_iter().flatten() {
        let raw = mirror
            .get_raw_message(seq)
            .await
            .unwrap_or_else(|e| panic!("revision {seq} of {bucket}: {e}"));
        let deleted = headroom_shared::kv::is_removal(&raw.headers);
        out.push(Revision {
            key: raw.subject.as_str().trim_start_matches(&prefix).to_owned(),
            value: (!deleted).then_some(raw.payload),
        });
    }
    out
}

/// What the history shows.
pub struct Verdict {
    pub joins: usize,
    pub drains: usize,
    pub violations: Vec<String>,
}

impl History {
    /// The invariants, revision by revision, for the requests `sent` (each
    /// must have exactly one outcome).
    pub fn check<'a>(
        &self,
        sent: impl IntoIterator<Item = (&'a RequestId, &'a ReconfigAction)>,
    ) -> Verdict {
        let sent: Vec<_> = sent.into_iter().collect();
        let mut violations = Vec::new();
        let wanted: HashMap<&RequestId, u32> = sent
            .iter()
            .filter_map(|(id, action)| match action {
                ReconfigAction::Allocate { count, .. } => Some((*id, *count)),
                ReconfigAction::Replace { .. } => Some((*id, 1)),
                _ => None,
            })
            .collect();
        let releases: HashSet<&RequestId> = sent
            .iter()
            .filter(|(_, action)| matches!(action, ReconfigAction::Release { .. }))
            .map(|(id, _)| *id)
            .collect();

        // Servers: never lost, and the claims each request made (a claim
        // is a server record turning allocated, naming its request).
        let mut claims: HashMap<(&RequestId, &ServerId), usize> = HashMap::new();
        let mut was: HashMap<&str, &ServerRecord> = HashMap::new();
        for rev in &self.servers {
            let Some(record) = &rev.value else {
                violations.push(format!("server {} was deleted", rev.key));
                continue;
            };
            let before = was.insert(rev.key.as_str(), record);
            let claimed = matches!(record.state, ServerState::Allocated { .. })
                && !before.is_some_and(|b| matches!(b.state, ServerState::Allocated { .. }));
            if let (true, Some(request)) = (claimed, &record.last_request) {
                *claims.entry((request, &record.id)).or_default() += 1;
            }
        }

        // Clusters, revision by revision in stream order (one stream for
        // every cluster key, so this is one timeline).
        let mut now: BTreeMap<&str, &ClusterRecord> = BTreeMap::new();
        let mut joins: HashMap<&RequestId, usize> = HashMap::new();
        let mut joins_of: HashMap<(&RequestId, &ServerId), usize> = HashMap::new();
        let mut drains: HashMap<&RequestId, usize> = HashMap::new();
        let (mut all_joins, mut all_drains) = (0, 0);
        for (seq, rev) in self.clusters.iter().enumerate() {
            let Some(record) = &rev.value else {
                continue;
            };
            let before = now.insert(rev.key.as_str(), record);
            let state_before =
                |server: &ServerId| before.and_then(|b| b.member(server)).map(|m| m.state);
            for m in &record.members {
                let was = state_before(&m.server);
                if m.state == MemberState::Active && was != Some(MemberState::Active) {
                    all_joins += 1;
                    *joins.entry(&m.request).or_default() += 1;
                    *joins_of.entry((&m.request, &m.server)).or_default() += 1;
                }
                if m.state == MemberState::Draining && was != Some(MemberState::Draining) {
                    all_drains += 1;
                    if let Some(release) = &m.drain_request {
                        *drains.entry(release).or_default() += 1;
                    }
                }
            }
            // No server serves two clusters at any revision.
            let mut serving: HashMap<&ServerId, &ClusterId> = HashMap::new();
            for cluster in now.values() {
                for m in cluster
                    .members
                    .iter()
                    .filter(|m| m.state != MemberState::Joining)
                {
                    if let Some(other) = serving.insert(&m.server, &cluster.id) {
                        violations.push(format!(
                            "revision {}: {} serves {} and {}",
                            seq + 1,
                            m.server,
                            other,
                            cluster.id
                        ));
                    }
                }
            }
        }
        for (request, n) in &joins {
            if let Some(count) = wanted.get(request) {
                if *n > *count as usize {
                    violations.push(format!("{request} asked for {count} and made {n} joins"));
                }
            }
        }
        for ((request, server), n) in &joins_of {
            let claimed = claims.get(&(*request, *server)).copied().unwrap_or(0);
            if wanted.contains_key(request) && *n > claimed {
                violations.push(format!(
                    "{request} joined {server} {n} times on {claimed} claims of it"
                ));
            }
        }
        for (request, n) in &drains {
            if releases.contains(request) && *n > 1 {
                violations.push(format!("release {request} started {n} drains"));
            }
        }
        // The ledger: one outcome per request, written once.
        let mut outcomes: HashMap<&str, usize> = HashMap::new();
        for rev in self
            .requests
            .iter()
            .filter(|r| !r.key.starts_with("started."))
        {
            *outcomes.entry(rev.key.as_str()).or_default() += 1;
        }
        for (id, _) in &sent {
            match outcomes.get(id.as_str()) {
                Some(1) => {}
                n => violations.push(format!("{id} has {n:?} outcomes")),
            }
        }
        Verdict {
            joins: all_joins,
            drains: all_drains,
            violations,
        }
    }
}
