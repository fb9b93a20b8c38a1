//! Following the cluster's membership: the KV record first, then every
//! change in revision order. The record carries a generation that grows by
//! one per change; a jump means changes were missed (a watch restarted
//! after a reconnect, say), and the front-end resynchronises from the KV
//! snapshot. A periodic check does the same for a watch that went quiet.
//! Every table it installs is also written to the last-known-good file.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, kv};
use futures::StreamExt;
use headroom_shared::codec::Codec;
use headroom_shared::kv::{ClusterRecord, MemberState, CLUSTERS_BUCKET};
use headroom_shared::wire::now_ms;
use headroom_shared::ClusterId;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::proxy::Proxy;
use crate::routing::Table;

/// How often the snapshot is compared with what was applied.
const RESYNC_EVERY: Duration = Duration::from_secs(10);

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

/// Follows `cluster`'s record until `shutdown`.
pub async fn follow(
    client: async_nats::Client,
    replicas: usize,
    cluster: ClusterId,
    proxy: Arc<Proxy>,
    last_known_good: Option<PathBuf>,
    shutdown: CancellationToken,
) {
    let js = jetstream::new(client);
    let bucket = loop {
        match headroom_shared::kv::open_bucket(&js, CLUSTERS_BUCKET, replicas).await {
            Ok(bucket) => break bucket,
            Err(err) => {
                warn!(%err, "cannot open the clusters bucket; trying again");
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    () = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
            }
        }
    };
    let mut follower = Follower {
        proxy,
        last_known_good,
        revision: 0,
        generation: 0,
    };
    let entries = headroom_shared::kv::follow(bucket.clone(), cluster.to_string(), shutdown);
    futures::pin_mut!(entries);
    let mut check = tokio::time::interval(RESYNC_EVERY);
    check.tick().await;
    loop {
        let entry = tokio::select! {
            _ = check.tick() => {
                resync(&bucket, &cluster, &mut follower, "periodic check").await;
                continue;
            }
            entry = entries.next() => match entry {
                Some(entry) => entry,
                None => return,
            },
        };
        match entry.operation {
            kv::Operation::Put => match Codec::MsgPack.decode::<ClusterRecord>(&entry.value) {
                Ok(record) => {
                    let gap =
                        follower.generation != 0 && record.generation > follower.generation + 1;
                    if gap {
                        warn!(
                            from = follower.generation,
                            to = record.generation,
                            "membership changes were missed; resynchronising from the KV snapshot"
                        );
                        resync(&bucket, &cluster, &mut follower, "generation gap").await;
                    }
                    follower.apply(&record, entry.revision);
                }
                Err(err) => warn!(%err, "unreadable cluster record; keeping the current routing"),
            },
            kv::Operation::Delete | kv::Operation::Purge => {
                // A deleted cluster has no members; keep serving what there
                // is rather than failing every request.
                warn!("the cluster record was deleted; keeping the last routing");
            }
        }
    }
}

async fn resync(bucket: &kv::Store, cluster: &ClusterId, follower: &mut Follower, why: &str) {
    match bucket.entry(cluster.as_str()).await {
        Ok(Some(entry))
            if entry.operation == kv::Operation::Put && entry.revision > follower.revision =>
        {
            if let Ok(record) = Codec::MsgPack.decode::<ClusterRecord>(&entry.value) {
                let resyncs = follower
                    .proxy
                    .counters
                    .resyncs
                    .fetch_add(1, Ordering::Relaxed)
                    + 1;
                info!(
                    why,
                    revision = entry.revision,
                    resyncs,
                    "resynchronised from the KV snapshot"
                );
                follower.apply(&record, entry.revision);
            }
        }
        Ok(_) => {}
        Err(err) => debug!(%err, "snapshot read failed"),
    }
}
