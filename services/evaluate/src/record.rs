//! What the cluster looked like during a run, from the KV records as they
//! changed: members serving, joining and draining, the free pool, and
//! when each new member joined. The HPA baseline reads the same view.

use std::collections::{HashMap, HashSet};
use std::time::Instant;

use async_nats::jetstream::kv::Operation;
use futures::StreamExt;
use headroom_shared::codec::Codec;
use headroom_shared::kv::{CLUSTERS_BUCKET, SERVERS_BUCKET};
use headroom_shared::records::{ClusterRecord, MemberState, ServerRecord, ServerState};
use headroom_shared::time::now_ms;
use headroom_shared::{ClusterId, ServerId};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// The cluster at one moment.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Size {
    /// Seconds since the load started (negative: before it).
    pub at_s: f64,
    pub active: u32,
    pub joining: u32,
    pub draining: u32,
    pub pool_free: u32,
}

/// Everything recorded.
#[derive(Debug, Default)]
pub struct Record {
    /// Every change of size, in order.
    pub sizes: Vec<Size>,
    /// (server, wall-clock ms) of every member entry when first seen.
    pub joins: Vec<(ServerId, u64)>,
}

impl Record {
    /// The size at `t_s` seconds into the load.
    pub fn size_at(&self, t_s: f64) -> Size {
        let i = self.sizes.partition_point(|s| s.at_s <= t_s);
        i.checked_sub(1)
            .and_then(|i| self.sizes.get(i))
            .copied()
            .unwrap_or_default()
    }
}

#[derive(Debug, thiserror::Error)]
#[error("cannot open the {0} bucket: {1}")]
pub struct RecordError(&'static str, String);

/// Follows the cluster's record and the pool until `stop`, timing changes
/// from `start`; publishes the latest cluster record on `latest`.
///
/// # Errors
/// A bucket cannot be opened.
pub async fn follow(
    js: async_nats::jetstream::Context,
    cluster: ClusterId,
    start: Instant,
    latest: watch::Sender<Option<ClusterRecord>>,
    stop: CancellationToken,
) -> Result<Record, RecordError> {
    let open = |name: &'static str| {
        let js = js.clone();
        async move {
            js.get_key_value(name)
                .await
                .map_err(|e| RecordError(name, e.to_string()))
        }
    };
    let records = headroom_shared::kv::follow(
        open(CLUSTERS_BUCKET).await?,
        cluster.to_string(),
        stop.clone(),
    );
    let servers =
        headroom_shared::kv::follow(open(SERVERS_BUCKET).await?, ">".into(), stop.clone());
    let (mut records, mut servers) = (std::pin::pin!(records), std::pin::pin!(servers));
    let mut record = Record::default();
    let mut size = Size::default();
    let mut free: HashMap<String, bool> = HashMap::new();
    let mut seen: HashSet<(ServerId, u64)> = HashSet::new();
    loop {
        tokio::select! {
            _ = stop.cancelled() => return Ok(record),
            Some(entry) = records.next() => {
                let Ok(value) = Codec::MsgPack.decode::<ClusterRecord>(&entry.value) else {
                    continue;
                };
                if entry.operation != Operation::Put {
                    continue;
                }
                let count = |state| {
                    let n = value.members.iter().filter(|m| m.state == state).count();
                    u32::try_from(n).unwrap_or(u32::MAX)
                };
                size.active = count(MemberState::Active);
                size.joining = count(MemberState::Joining);
                size.draining = count(MemberState::Draining);
                for m in &value.members {
                    if seen.insert((m.server.clone(), m.joined)) {
                        record.joins.push((m.server.clone(), now_ms()));
                    }
                }
                latest.send_replace(Some(value));
            }
            Some(entry) = servers.next() => {
                let is_free = entry.operation == Operation::Put
                    && Codec::MsgPack
                        .decode::<ServerRecord>(&entry.value)
                        .is_ok_and(|r| r.state == ServerState::Free);
                free.insert(entry.key, is_free);
                size.pool_free = u32::try_from(free.values().filter(|f| **f).count()).unwrap_or(u32::MAX);
            }
        }
        size.at_s = seconds_since(start);
        if record.sizes.last().is_none_or(|last| !same(last, &size)) {
            record.sizes.push(size);
        }
    }
}

fn same(a: &Size, b: &Size) -> bool {
    (a.active, a.joining, a.draining, a.pool_free) == (b.active, b.joining, b.draining, b.pool_free)
}

/// Seconds from `start` to now; negative before it.
fn seconds_since(start: Instant) -> f64 {
    let now = Instant::now();
    match now.checked_duration_since(start) {
        Some(d) => d.as_secs_f64(),
        None => -start.duration_since(now).as_secs_f64(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_size_at_a_moment_is_the_last_change_before_it() {
        let size = |at_s, active| Size {
            at_s,
            active,
            ..Size::default()
        };
        let record = Record {
            sizes: vec![size(-2.0, 1), size(3.0, 2), size(5.5, 4)],
            joins: Vec::new(),
        };
        assert_eq!(record.size_at(0.0).active, 1);
        assert_eq!(record.size_at(3.0).active, 2);
        assert_eq!(record.size_at(5.0).active, 2);
        assert_eq!(record.size_at(100.0).active, 4);
        assert_eq!(record.size_at(-5.0).active, 0, "before anything");
    }
}
