//! Following the cluster's membership: the KV record first, then every
//! change the allocator publishes on the core-NATS membership subject, in
//! revision order. A change carries a generation that grows by one per
//! change; a jump means changes were missed (messages lost while
//! disconnected, say), and the front-end resynchronises from the KV
//! snapshot. A periodic check does the same for changes whose messages
//! never came. Core NATS rather than a KV watch: a watch is a JetStream
//! consumer per front-end, and the server's fan-out of one message to a
//! thousand subscribers costs far less than a thousand consumers (which
//! nats-server 2.15 refuses past 1,000 per stream by default). Every table
//! it installs is also written to the last-known-good file.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, kv};
use futures::StreamExt;
use headroom_shared::codec::{self, Codec};
use headroom_shared::kv::Bucket;
use headroom_shared::records::{ClusterRecord, MemberState};
use headroom_shared::time::now_ms;
use headroom_shared::wire::MembershipChange;
use headroom_shared::{subjects, ClusterId};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::proxy::Proxy;
use crate::routing::Table;

/// Installs the routing for `record`, keeping the counters and health of
/// members that stay.
pub fn install(proxy: &Proxy, record: &ClusterRecord) {
    let previous = proxy
        .table
        .load()
        .as_ref()
        .map(|t| t.backends_by_server())
        .unwrap_or_default();
    proxy.set_table(Table::build(record, &previous));
}

/// The last-known-good file: the servers available for each request type,
/// for people, and the record it came from, to load again.
#[derive(Debug, Serialize, Deserialize)]
struct LastKnownGood {
    cluster: ClusterId,
    generation: u64,
    saved_ms: u64,
    /// Request type ("" when the cluster has no routes) → `host:port` of
    /// each active member serving it.
    servers: BTreeMap<String, Vec<String>>,
    record: ClusterRecord,
}

#[derive(Debug, thiserror::Error)]
pub enum LastKnownGoodError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {source}")]
    Format {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
}

/// # Errors
/// The file cannot be read or is not a last-known-good file.
pub fn read_last_known_good(path: &Path) -> Result<ClusterRecord, LastKnownGoodError> {
    let text = std::fs::read_to_string(path).map_err(|source| LastKnownGoodError::Io {
        path: path.to_owned(),
        source,
    })?;
    let file: LastKnownGood =
        serde_json::from_str(&text).map_err(|source| LastKnownGoodError::Format {
            path: path.to_owned(),
            source,
        })?;
    Ok(file.record)
}

/// Writes the file whole (temporary file, then rename), so a crash never
/// leaves half of one.
///
/// # Errors
/// I/O.
pub fn write_last_known_good(
    path: &Path,
    record: &ClusterRecord,
) -> Result<(), LastKnownGoodError> {
    let io = |source| LastKnownGoodError::Io {
        path: path.to_owned(),
        source,
    };
    let mut servers: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let types = record.policy.request_types();
    for m in record
        .members
        .iter()
        .filter(|m| m.state == MemberState::Active)
    {
        let address = format!("{}:{}", m.address, m.port);
        if types.is_empty() {
            servers.entry(String::new()).or_default().push(address);
            continue;
        }
        for t in &types {
            if m.request_types.is_empty() || m.request_types.contains(t) {
                servers.entry(t.clone()).or_default().push(address.clone());
            }
        }
    }
    let file = LastKnownGood {
        cluster: record.id.clone(),
        generation: record.generation,
        saved_ms: now_ms(),
        servers,
        record: record.clone(),
    };
    let text = serde_json::to_vec_pretty(&file).map_err(|source| LastKnownGoodError::Format {
        path: path.to_owned(),
        source,
    })?;
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).map_err(io)?;
    std::fs::rename(&tmp, path).map_err(io)
}

struct Follower {
    proxy: Arc<Proxy>,
    last_known_good: Option<PathBuf>,
    revision: u64,
    generation: u64,
}

impl Follower {
    fn apply(&mut self, record: &ClusterRecord, revision: u64) {
        if revision <= self.revision {
            return;
        }
        install(&self.proxy, record);
        if self.proxy.from_file.swap(false, Ordering::AcqRel) {
            info!("routing now follows KV instead of the last known good file");
        }
        info!(
            generation = record.generation,
            revision,
            members = record.members.len(),
            "routing table swapped"
        );
        self.revision = revision;
        self.generation = record.generation;
        if let Some(path) = &self.last_known_good {
            if let Err(err) = write_last_known_good(path, record) {
                warn!(%err, "cannot write the last known good file");
            }
        }
    }
}

/// Follows `cluster`'s membership until `shutdown`: the core-NATS
/// membership subject for changes, the KV record for the snapshot. The
/// subscription is made before the snapshot is read, on the same
/// connection, so no change falls between them. KV is read (one get, no
/// consumer) at start, on a generation gap, on a message without the
/// policy, on every reconnection (changes published while there was no
/// connection are not delivered), and every `frontend.resync_interval`
/// (which bounds how late a change whose message was lost is applied).
pub async fn follow(
    client: async_nats::Client,
    mut connected: tokio::sync::watch::Receiver<u64>,
    replicas: usize,
    cluster: ClusterId,
    proxy: Arc<Proxy>,
    last_known_good: Option<PathBuf>,
    shutdown: CancellationToken,
) {
    let Some(mut changes) = retry(&shutdown, "subscribe to the membership subject", || {
        client.subscribe(subjects::membership(&cluster))
    })
    .await
    else {
        return;
    };
    let js = jetstream::new(client);
    let Some(bucket) = retry(&shutdown, "open the clusters bucket", || {
        headroom_shared::kv::open_bucket(&js, Bucket::Clusters, replicas)
    })
    .await
    else {
        return;
    };
    let mut follower = Follower {
        proxy,
        last_known_good,
        revision: 0,
        generation: 0,
    };
    snapshot(&bucket, &cluster, &mut follower).await;
    let mut check = tokio::time::interval(follower.proxy.settings().resync_interval);
    check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    check.tick().await;
    loop {
        let message = tokio::select! {
            () = shutdown.cancelled() => return,
            _ = check.tick() => {
                resync(&bucket, &cluster, &mut follower, "periodic check").await;
                continue;
            }
            Ok(()) = connected.changed() => {
                resync(&bucket, &cluster, &mut follower, "reconnected").await;
                continue;
            }
            message = changes.next() => match message {
                Some(message) => message,
                None => return,
            },
        };
        let change = match codec::decode::<MembershipChange>(
            message.headers.as_ref(),
            &message.payload,
        ) {
            Ok(change) if change.cluster == cluster => change,
            Ok(change) => {
                warn!(other = %change.cluster, "a membership change for another cluster; ignored");
                continue;
            }
            Err(err) => {
                warn!(%err, "unreadable membership change; keeping the current routing");
                continue;
            }
        };
        if change.revision <= follower.revision {
            // A repeat, or an older change overtaken (two allocators'
            // messages need not arrive in the order of their writes).
            continue;
        }
        let gap = follower.generation != 0 && change.generation > follower.generation + 1;
        match change.routing_record() {
            Some(record) if !gap => follower.apply(&record, change.revision),
            _ => {
                if gap {
                    warn!(
                        from = follower.generation,
                        to = change.generation,
                        "membership changes were missed; resynchronising from the KV snapshot"
                    );
                }
                resync(
                    &bucket,
                    &cluster,
                    &mut follower,
                    if gap {
                        "generation gap"
                    } else {
                        "change without policy"
                    },
                )
                .await;
            }
        }
    }
}

/// Runs `attempt` every second until it succeeds or `shutdown`.
async fn retry<T, E: std::fmt::Display, Fut>(
    shutdown: &CancellationToken,
    what: &str,
    attempt: impl Fn() -> Fut,
) -> Option<T>
where
    Fut: std::future::Future<Output = Result<T, E>>,
{
    loop {
        match attempt().await {
            Ok(value) => return Some(value),
            Err(err) => warn!(%err, "cannot {what}; trying again"),
        }
        tokio::select! {
            () = shutdown.cancelled() => return None,
            () = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    }
}

/// Reads the record from KV and resynchronises from it when it is newer
/// than what was applied, counting it.
async fn resync(bucket: &kv::Store, cluster: &ClusterId, follower: &mut Follower, why: &str) {
    if let Some(revision) = snapshot(bucket, cluster, follower).await {
        let resyncs = follower
            .proxy
            .counters
            .resyncs
            .fetch_add(1, Ordering::Relaxed)
            + 1;
        info!(
            why,
            revision, resyncs, "resynchronised from the KV snapshot"
        );
    }
}

/// Applies the record in KV when it is newer than what was applied, and
/// says at which revision.
async fn snapshot(bucket: &kv::Store, cluster: &ClusterId, follower: &mut Follower) -> Option<u64> {
    match bucket.entry(cluster.as_str()).await {
        Ok(Some(entry))
            if entry.operation == kv::Operation::Put && entry.revision > follower.revision =>
        {
            match Codec::MsgPack.decode::<ClusterRecord>(&entry.value) {
                Ok(record) => {
                    follower.apply(&record, entry.revision);
                    return Some(entry.revision);
                }
                Err(err) => warn!(%err, "unreadable cluster record; keeping the current routing"),
            }
        }
        // A deleted cluster has no members; keep serving what there is
        // rather than failing every request.
        Ok(Some(entry)) if entry.operation != kv::Operation::Put => {
            warn!("the cluster record was deleted; keeping the last routing");
        }
        Ok(_) => {}
        Err(err) => debug!(%err, "snapshot read failed"),
    }
    None
}
