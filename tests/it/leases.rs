//! Monitor instances sharing the shards by lease, as instances stop, crash
//! and join: one that stops hands its shards over at once, one killed with
//! SIGKILL (a real `headroom-monitor` process) loses them after a lease,
//! one that joins gets its share. The audit log's `shard_taken` and
//! `shard_left` events must show no shard held by two instances at once,
//! and every shard held again within a bound.

use std::collections::BTreeMap;
use std::time::Duration;

use async_nats::jetstream;
use headroom_shared::codec::Codec;
use headroom_shared::kv::MONITORS_BUCKET;
use headroom_shared::ops::Ops;
use headroom_shared::records::{ClusterRecord, ShardLease};
use headroom_shared::time::now_ms;
use headroom_shared::wire::{AuditEvent, EventKind};
use headroom_tests::{eventually, metric, NatsServer};
use serde_json::Value;
use tokio::process::Child;
use tokio_util::sync::CancellationToken;

use crate::common::{audit_log, cid, policy, service_command, workspace_binary, WAIT};

const SHARDS: u32 = 4;
const CLUSTERS: usize = 8;
const TTL: Duration = Duration::from_secs(1);

/// A monitor in this process, with its own stop.
struct InProcess {
    ops: std::sync::Arc<Ops>,
    stop: CancellationToken,
}

impl InProcess {
    async fn start(nats: &NatsServer, instance: &str) -> Self {
        let mut config = nats.config();
        config.monitor.instance = instance.to_owned();
        config.monitor.shards = SHARDS;
        config.monitor.lease_ttl = TTL;
        let ops = Ops::new("headroom-monitor");
        let stop = CancellationToken::new();
        tokio::spawn(headroom_monitor::run(
            config,
            nats.client().await.expect("connect"),
            ops.clone(),
            stop.clone(),
        ));
        Self { ops, stop }
    }

    fn held(&self) -> u64 {
        metric(&self.ops, "headroom_monitor_shards_held", "")
    }

    fn clusters(&self) -> u64 {
        metric(&self.ops, "headroom_monitor_clusters", "")
    }
}

/// A `headroom-monitor` process.
fn spawn_monitor(nats: &NatsServer, instance: &str, log: &std::path::Path) -> Child {
    let log = std::fs::File::create(log).expect("monitor log");
    let binary = workspace_binary("headroom-monitor", "HEADROOM_MONITOR_BIN");
    service_command(&binary, nats.url(), log)
        .env("HEADROOM_MONITOR__INSTANCE", instance)
        .env("HEADROOM_MONITOR__SHARDS", SHARDS.to_string())
        .env("HEADROOM_MONITOR__LEASE_TTL", "1s")
        .spawn()
        .expect("monitor starts")
}

/// How many shards each holder prefix (instance name) holds in KV now.
async fn holders(js: &jetstream::Context) -> BTreeMap<String, u32> {
    let bucket = js.get_key_value(MONITORS_BUCKET).await.expect("bucket");
    let mut out = BTreeMap::new();
    for n in 0..SHARDS {
        let Ok(Some(value)) = bucket.get(format!("shard.{n}")).await else {
            continue;
        };
        let lease: ShardLease = Codec::MsgPack.decode(&value).expect("lease");
        if let Some(holder) = lease.holder {
            let name = holder
                .rsplit_once('-')
                .map_or(holder.clone(), |(n, _)| n.to_owned());
            *out.entry(name).or_default() += 1;
        }
    }
    out
}

/// A shard taken or left, from the audit log.
#[derive(Debug)]
struct Change {
    at_ms: u64,
    shard: u32,
    holder: String,
    taken: bool,
}

fn shard_changes(events: &[AuditEvent]) -> Vec<Change> {
    let mut changes: Vec<Change> = events
        .iter()
        .filter(|e| matches!(e.kind, EventKind::ShardTaken | EventKind::ShardLeft))
        .map(|e| {
            let detail: Value = serde_json::from_str(&e.detail).expect("detail is JSON");
            Change {
                at_ms: e.at_ms,
                shard: u32::try_from(detail["shard"].as_u64().expect("shard")).expect("small"),
                holder: detail["holder"].as_str().expect("holder").to_owned(),
                taken: matches!(e.kind, EventKind::ShardTaken),
            }
        })
        .collect();
    // Leaving before taking at the same millisecond: a hand-over.
    changes.sort_by_key(|c| (c.shard, c.at_ms, c.taken));
    changes
}

#[tokio::test]
async fn monitors_that_stop_crash_or_join_never_leave_a_shard_to_two_or_to_none() {
    headroom_shared::telemetry::init_for_tests();
    let nats = NatsServer::start().await.expect("nats-server");
    let client = nats.client().await.expect("connect");
    let js = jetstream::new(client.clone());
    let clusters = headroom_shared::kv::open_bucket(&js, headroom_shared::kv::Bucket::Clusters, 1)
        .await
        .expect("clusters bucket");
    for c in 0..CLUSTERS {
        let record = ClusterRecord::new(cid(&format!("c{c}")), policy(1, 4), now_ms());
        let body = Codec::MsgPack.encode(&record).expect("encode");
        clusters.put(format!("c{c}"), body).await.expect("put");
    }
    let dir = tempfile::tempdir().expect("temp dir");

    // One instance alone holds every shard and decides every cluster.
    let a = InProcess::start(&nats, "a").await;
    let alone = eventually(WAIT, || async {
        (a.held() == 4 && a.clusters() == CLUSTERS as u64).then_some(())
    })
    .await;
    assert!(alone.is_some(), "a lone instance holds all {SHARDS} shards");

    // A second, a real process, joins: two each.
    let mut c = spawn_monitor(&nats, "c", &dir.path().join("c.log"));
    let halves = eventually(WAIT, || async {
        let h = holders(&js).await;
        (a.held() == 2 && h.get("c") == Some(&2)).then_some(())
    })
    .await;
    assert!(
        halves.is_some(),
        "a joining instance gets half: {:?}",
        holders(&js).await
    );

    // A third joins: 2, 1, 1.
    let b = InProcess::start(&nats, "b").await;
    let thirds = eventually(WAIT, || async {
        let h = holders(&js).await;
        (b.held() == 1 && h.values().sum::<u32>() == SHARDS && h.len() == 3).then_some(())
    })
    .await;
    assert!(
        thirds.is_some(),
        "the third gets one: {:?}",
        holders(&js).await
    );

    // The process is killed: its shards come back after a lease.
    let killed_ms = now_ms();
    c.kill().await.expect("SIGKILL");
    let recovered = eventually(WAIT, || async {
        (a.held() + b.held() == u64::from(SHARDS) && a.clusters() + b.clusters() == CLUSTERS as u64)
            .then_some(())
    })
    .await;
    assert!(
        recovered.is_some(),
        "the killed instance's shards are taken again"
    );
    let recovered_ms = now_ms();

    // One stops: it hands over, and the last holds everything.
    let stopped_ms = now_ms();
    a.stop.cancel();
    let last = eventually(WAIT, || async {
        (b.held() == u64::from(SHARDS) && b.clusters() == CLUSTERS as u64).then_some(())
    })
    .await;
    assert!(
        last.is_some(),
        "the stopped instance's shards go to the last"
    );
    let handed_ms = now_ms();
    assert!(
        handed_ms - stopped_ms < TTL.as_millis() as u64,
        "a stop hands over within a lease, not after one: {} ms",
        handed_ms - stopped_ms
    );

    // The audit log: per shard, each holder's time is its own.
    let log = eventually(WAIT, || async {
        let changes = shard_changes(&audit_log(&js).await);
        (changes
            .iter()
            .filter(|c| c.holder.starts_with("a-") && !c.taken)
            .count()
            >= 2)
            .then_some(changes)
    })
    .await
    .expect("the stopped instance's leaving is in the log");
    let mut c_taken = 0;
    let mut after_kill_ms = Vec::new();
    for shard in 0..SHARDS {
        let mut holder: Option<&Change> = None;
        for change in log.iter().filter(|c| c.shard == shard) {
            if change.taken {
                if let Some(before) = holder {
                    // Only the killed process never says it left.
                    assert!(
                        before.holder.starts_with("c-"),
                        "shard {shard} taken by {} while {} held it: {log:#?}",
                        change.holder,
                        before.holder
                    );
                    // Its last renewal was at most a round before the kill,
                    // and a taker waits a whole lease from seeing it.
                    let waited = change.at_ms.saturating_sub(killed_ms);
                    assert!(
                        change.at_ms >= killed_ms + TTL.as_millis() as u64 * 3 / 4,
                        "shard {shard} taken from the killed process {waited} ms after the \
                         kill, before its lease could have run out"
                    );
                    assert!(
                        change.at_ms <= recovered_ms,
                        "shard {shard} taken again by the time all were held"
                    );
                    c_taken += 1;
                    after_kill_ms.push(waited);
                }
                holder = Some(change);
            } else {
                let held_by = holder.map(|h| h.holder.as_str());
                assert_eq!(
                    held_by,
                    Some(change.holder.as_str()),
                    "shard {shard} left by one that did not hold it: {log:#?}"
                );
                holder = None;
            }
        }
        assert!(
            holder.is_some_and(|h| h.holder.starts_with("b-")),
            "shard {shard} ends with the last instance: {log:#?}"
        );
    }
    assert!(
        c_taken >= 1,
        "the killed process held shards that were taken again"
    );
    println!(
        "lease {} ms: the killed process's shards taken again {after_kill_ms:?} ms after \
         SIGKILL; the stopped instance's handed over within {} ms",
        TTL.as_millis(),
        handed_ms - stopped_ms
    );
    b.stop.cancel();
}
