//! How fast one monitor ingests reports over a real NATS connection, and
//! how much memory each tracked server costs. Prints figures; asserts
//! nothing (a shared 2-core machine is no place for timed assertions).
//!
//! Then the same flat-out blast against 1, 2 and 4 monitor instances
//! sharing the clusters by shard (`BENCH_MONITORS`), each with its own
//! connection, for their aggregate ingest side by side in one run.
//!
//! `cargo bench -p headroom-tests --bench monitor_ingest` (the nats-server
//! binary from `NATS_SERVER_BIN`, as for the tests). `BENCH_SERVERS` and
//! `BENCH_REPORTS` change the sizes.

use std::time::{Duration, Instant};

use headroom_monitor::fetch_stats;
use headroom_shared::codec::Codec;
use headroom_shared::ops::Ops;
use headroom_shared::records::{ClusterPolicy, ClusterRecord, Member, MemberState};
use headroom_shared::time::now_ms;
use headroom_shared::wire::{PerformanceReport, ReportSource};
use headroom_shared::{subjects, ClusterId, RequestId, ServerId, SCHEMA_VERSION};
use headroom_tests::{cpu_seconds, env_usize, metric, rss, NatsServer};
use tokio_util::sync::CancellationToken;

const PER_CLUSTER: usize = 100;
/// Publishers in the sharded runs.
const PUBLISHERS: usize = 4;

/// Pre-encoded reports, one per server, with their subjects.
fn reports(servers: usize) -> Vec<(String, bytes::Bytes)> {
    (0..servers)
        .map(|i| {
            let cluster = ClusterId::new(format!("c{}", i / PER_CLUSTER)).expect("id");
            let server = ServerId::new(format!("s{i}")).expect("id");
            let report = PerformanceReport {
                v: SCHEMA_VERSION,
                server: server.clone(),
                cluster: Some(cluster.clone()),
                source: ReportSource::Agent,
                at_ms: now_ms(),
                interval_ms: 1_000,
                cpu: Some(0.5),
                memory: Some(0.4),
                load1: Some(1.0),
                net_rx_bytes_per_s: Some(1e6),
                net_tx_bytes_per_s: Some(2e6),
                in_flight: Some(4),
                queued: Some(0),
                concurrency: Some(8),
                requests_per_s: Some(100.0),
                latency_p50_ms: Some(3.0),
                latency_p99_ms: Some(12.0),
                errors_per_s: Some(0.0),
                ejected: None,
            };
            (
                subjects::metrics(Some(&cluster), &server),
                Codec::MsgPack.encode(&report).expect("encode"),
            )
        })
        .collect()
}

/// Publishes `count` reports at `rate` per second, in 10 ms batches.
async fn paced(
    client: &async_nats::Client,
    reports: &[(String, bytes::Bytes)],
    count: usize,
    rate: usize,
) {
    let batch = (rate / 100).max(1);
    let mut ticker = tokio::time::interval(Duration::from_millis(10));
    let mut sent = 0;
    while sent < count {
        ticker.tick().await;
        for i in sent..(sent + batch).min(count) {
            let (subject, body) = &reports[i % reports.len()];
            client
                .publish(subject.clone(), body.clone())
                .await
                .expect("publish");
        }
        sent += batch;
    }
    client.flush().await.expect("flush");
}

/// Waits until the monitor has taken `want` more reports than `base`, or
/// stops moving; returns how many it took.
async fn taken_since(client: &async_nats::Client, base: u64, want: usize) -> usize {
    let mut last = 0;
    let mut stalled = 0;
    loop {
        let s = fetch_stats(client).await.expect("stats");
        let taken = usize::try_from(s.reports + s.rejected - base).unwrap_or(usize::MAX);
        if taken >= want || stalled >= 20 {
            return taken;
        }
        if taken == last {
            stalled += 1;
        }
        last = taken;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn blast(client: &async_nats::Client, reports: &[(String, bytes::Bytes)], count: usize) {
    for i in 0..count {
        let (subject, body) = &reports[i % reports.len()];
        client
            .publish(subject.clone(), body.clone())
            .await
            .expect("publish");
    }
    client.flush().await.expect("flush");
}

#[tokio::main]
async fn main() {
    let servers = env_usize("BENCH_SERVERS", 100_000);
    let count = env_usize("BENCH_REPORTS", 1_000_000);
    let nats = NatsServer::start().await.expect("nats-server");
    let client = nats.client().await.expect("connect");
    let js = async_nats::jetstream::new(client.clone());
    let bucket = headroom_shared::kv::open_bucket(&js, headroom_shared::kv::Bucket::Clusters, 1)
        .await
        .expect("bucket");
    for c in 0..servers.div_ceil(PER_CLUSTER) {
        let mut record = ClusterRecord::new(
            ClusterId::new(format!("c{c}")).expect("id"),
            ClusterPolicy::default(),
            now_ms(),
        );
        for i in c * PER_CLUSTER..((c + 1) * PER_CLUSTER).min(servers) {
            record.members.push(Member {
                server: ServerId::new(format!("s{i}")).expect("id"),
                address: "10.0.0.1".to_owned(),
                port: 8080,
                request_types: Vec::new(),
                state: MemberState::Active,
                weight: 1.0,
                request: RequestId::new("bench").expect("id"),
                drain_request: None,
                since_ms: 0,
                joined: 0,
            });
        }
        bucket
            .put(
                record.id.as_str(),
                Codec::MsgPack.encode(&record).expect("encode"),
            )
            .await
            .expect("put");
    }
    let reports = reports(servers);

    // The ceiling: a bare subscriber that only counts, in the same run.
    let bare_client = nats.client().await.expect("connect");
    let mut bare = bare_client
        .subscribe(subjects::METRICS_ALL)
        .await
        .expect("sub");
    bare_client.flush().await.expect("flush");
    let counted = tokio::spawn(async move {
        use futures::StreamExt;
        let mut n = 0usize;
        let started = Instant::now();
        while tokio::time::timeout(Duration::from_secs(2), bare.next())
            .await
            .ok()
            .flatten()
            .is_some()
        {
            n += 1;
            if n == count {
                break;
            }
        }
        (n, started.elapsed())
    });
    let start = Instant::now();
    blast(&client, &reports, count).await;
    let (bare_n, _) = counted.await.expect("bare subscriber");
    let bare_secs = start.elapsed().as_secs_f64();
    drop(bare_client);

    // The monitor.
    let rss_before = rss();
    let mut config = nats.config();
    config.monitor.instance = "bench".to_owned();
    let shutdown = CancellationToken::new();
    let monitor = tokio::spawn(headroom_monitor::run(
        config,
        nats.client().await.expect("connect"),
        headroom_shared::ops::Ops::new("headroom-monitor"),
        shutdown.clone(),
    ));
    loop {
        if let Ok(s) = fetch_stats(&client).await {
            if s.tracked_servers as usize == servers {
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // One report per server first, so every server's state is filled in.
    blast(&client, &reports, servers).await;
    loop {
        let s = fetch_stats(&client).await.expect("stats");
        if (s.reports + s.rejected) as usize >= servers {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let rss_after = rss();

    // At the target rate: every report should be taken.
    let rate_target = env_usize("BENCH_RATE", 100_000);
    let paced_count = rate_target * 5;
    let base = fetch_stats(&client).await.expect("stats");
    let start = Instant::now();
    paced(&client, &reports, paced_count, rate_target).await;
    let paced_taken = taken_since(&client, base.reports + base.rejected, paced_count).await;
    let paced_secs = start.elapsed().as_secs_f64();

    // Flat out: the most it takes, and what it drops when offered more.
    let base = fetch_stats(&client).await.expect("stats");
    let start = Instant::now();
    blast(&client, &reports, count).await;
    let publish_secs = start.elapsed().as_secs_f64();
    let taken = taken_since(&client, base.reports + base.rejected, count).await;
    let secs = start.elapsed().as_secs_f64();
    let stats = fetch_stats(&client).await.expect("stats");
    shutdown.cancel();
    let _ = monitor.await;

    let rate = taken as f64 / secs;
    let bare_rate = bare_n as f64 / bare_secs;
    let per_server = rss_after.saturating_sub(rss_before) as f64 / servers as f64;
    println!(
        "monitor ingest, {servers} servers in {} clusters, {count} reports",
        servers.div_ceil(PER_CLUSTER)
    );
    println!(
        "  monitor, offered {rate_target}/s for 5s: {paced_taken} of {paced_count} taken in {paced_secs:.2}s, {} dropped",
        paced_count.saturating_sub(paced_taken)
    );
    println!("  bare subscriber (ceiling): {bare_n} in {bare_secs:.2}s = {bare_rate:.0} reports/s");
    println!("  monitor, flat out:         {taken} in {secs:.2}s = {rate:.0} reports/s (publishing took {publish_secs:.2}s)");
    println!("  ratio monitor / bare:      {:.2}", rate / bare_rate);
    println!(
        "  dropped flat out (slow consumer): {}",
        count.saturating_sub(taken)
    );
    println!("  rejected:                  {}", stats.rejected);
    println!("  memory per tracked server: {per_server:.0} bytes (process RSS growth / servers, an upper bound)");

    let instances: Vec<u32> = std::env::var("BENCH_MONITORS")
        .unwrap_or_else(|_| "1,2,4".to_owned())
        .split(',')
        .filter_map(|n| n.trim().parse().ok())
        .collect();
    println!("sharded monitors, {count} reports flat out (aggregate over the instances):");
    let mut alone = None;
    for n in instances {
        let (taken, secs, subscriptions) = sharded(&nats, &reports, count, n).await;
        let rate = taken as f64 / secs;
        let ratio = *alone.get_or_insert(rate);
        println!(
            "  {n} instance(s): {taken} taken in {secs:.2}s = {rate:.0} reports/s, x{:.2} of one; {subscriptions} subscriptions",
            rate / ratio
        );
    }
}

/// Starts `n` monitors, shard i of n, waits until together they track
/// every server, blasts `count` reports, and returns how many they took,
/// in how long, and how many subscriptions they hold.
async fn sharded(
    nats: &NatsServer,
    reports: &[(String, bytes::Bytes)],
    count: usize,
    n: u32,
) -> (usize, f64, usize) {
    let shutdown = CancellationToken::new();
    let mut monitors = Vec::new();
    for index in 0..n {
        let mut config = nats.config();
        config.monitor.instance = format!("bench-{index}");
        config.monitor.shards = n;
        let ops = Ops::new("headroom-monitor");
        tokio::spawn(headroom_monitor::run(
            config,
            nats.client().await.expect("connect"),
            ops.clone(),
            shutdown.clone(),
        ));
        monitors.push(ops);
    }
    let sum = |name: &str, labels: &str| -> u64 {
        monitors.iter().map(|ops| metric(ops, name, labels)).sum()
    };
    let servers = reports.len() as u64;
    // The instances share the shards by lease: one each once all are live.
    while sum("headroom_monitor_tracked_servers", "") < servers
        || monitors
            .iter()
            .any(|ops| metric(ops, "headroom_monitor_shards_held", "") != 1)
    {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Every subscription made before the clock starts.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let taken_now = || sum("headroom_monitor_reports_total", "{kind=\"member\"");
    let base = taken_now();
    // Four publishers, each on its own connection, so that the offer is
    // not one connection's pace.
    let mut publishers = Vec::new();
    for p in 0..PUBLISHERS {
        let publisher = nats.client().await.expect("connect");
        let share: Vec<_> = reports
            .iter()
            .skip(p)
            .step_by(PUBLISHERS)
            .cloned()
            .collect();
        publishers.push((publisher, share));
    }
    let cpu = (cpu_seconds(None), cpu_seconds(nats.pid()));
    let start = Instant::now();
    let blasts: Vec<_> = publishers
        .into_iter()
        .map(|(publisher, share)| {
            tokio::spawn(async move { blast(&publisher, &share, count / PUBLISHERS).await })
        })
        .collect();
    for b in blasts {
        b.await.expect("publisher");
    }
    let published = start.elapsed();
    let (mut last, mut stalled) = (base, 0);
    let mut done_at = start.elapsed();
    while stalled < 20 {
        let taken = taken_now();
        if taken > last {
            (last, stalled, done_at) = (taken, 0, start.elapsed());
        } else {
            stalled += 1;
        }
        if usize::try_from(taken - base).unwrap_or(usize::MAX) >= count {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let subscriptions = usize::try_from(sum("headroom_monitor_subscriptions", "")).unwrap_or(0);
    println!(
        "    ({PUBLISHERS} publishers took {:.2}s; CPU: this process (publishers and monitors) {:.2}s, nats-server {:.2}s)",
        published.as_secs_f64(),
        cpu_seconds(None) - cpu.0,
        cpu_seconds(nats.pid()) - cpu.1,
    );
    shutdown.cancel();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let taken = usize::try_from(last - base).unwrap_or(usize::MAX);
    (taken, done_at.as_secs_f64(), subscriptions)
}
