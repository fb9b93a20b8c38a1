//! The allocator at fleet scale, over real NATS. Prints figures; asserts
//! nothing (a shared 2-core machine is no place for timed assertions).
//!
//! With 1,000 clusters, servers are registered in steps (100, 1,000,
//! 10,000, 100,000 by default) straight into KV; at each step an allocator
//! is started (its view of the pool is rebuilt from the watch: the time it
//! takes and the process's memory growth are printed), then allocations of
//! one server to random clusters are timed from publishing the request to
//! the membership change that lists the new member as active.
//!
//! `cargo bench -p headroom-tests --bench fleet` (the nats-server binary
//! from `NATS_SERVER_BIN`, as for the tests). `BENCH_SIZES` (comma
//! separated), `BENCH_ALLOCATIONS` (per size, 100) and `BENCH_RECONCILE_S`
//! (the reconciler's interval, 5) change the run.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use headroom_allocator::store::Store;
use headroom_shared::codec;
use headroom_shared::ops::Ops;
use headroom_shared::records::{ClusterPolicy, ClusterRecord, MemberState, ServerRecord};
use headroom_shared::time::now_ms;
use headroom_shared::wire::{MembershipChange, ReconfigAction, ReconfigRequest};
use headroom_shared::{bus, subjects, ClusterId, ServerId};
use headroom_tests::{env_usize, metric, percentiles, rss, NatsServer};
use rand::Rng;
use tokio_util::sync::CancellationToken;

const CLUSTERS: usize = 1_000;

fn env_list(name: &str, default: &[usize]) -> Vec<usize> {
    std::env::var(name)
        .ok()
        .map(|v| v.split(',').filter_map(|n| n.trim().parse().ok()).collect())
        .unwrap_or_else(|| default.to_vec())
}

fn rss_mib() -> f64 {
    rss() as f64 / (1024.0 * 1024.0)
}

fn cluster_id(n: usize) -> ClusterId {
    ClusterId::new(format!("c{n:04}")).expect("cluster id")
}

async fn register(store: &Store, from: usize, to: usize) {
    let ids: Vec<usize> = (from..to).collect();
    for chunk in ids.chunks(1_000) {
        futures::future::try_join_all(chunk.iter().map(|n| {
            let record = ServerRecord::new_free(
                ServerId::new(format!("s{n:06}")).expect("server id"),
                format!("10.{}.{}.{}", n >> 16, (n >> 8) & 255, n & 255),
                8080,
                vec![],
                now_ms(),
            );
            async move { store.put_server(&record, 0).await }
        }))
        .await
        .expect("servers registered");
    }
}

async fn create_clusters(store: &Store) {
    let policy = ClusterPolicy {
        min_size: 0,
        max_size: 10_000,
        ..ClusterPolicy::default()
    };
    let ids: Vec<usize> = (0..CLUSTERS).collect();
    for chunk in ids.chunks(200) {
        futures::future::try_join_all(chunk.iter().map(|n| {
            let mut record = ClusterRecord::new(cluster_id(*n), policy.clone(), now_ms());
            async move { store.put_cluster(&mut record, 0).await }
        }))
        .await
        .expect("clusters created");
    }
}

/// Publishes an allocation of one server to `cluster` and waits for the
/// membership change that lists it as active. Returns the time in ms.
async fn allocate_once(
    client: &async_nats::Client,
    js: &async_nats::jetstream::Context,
    cluster: &ClusterId,
) -> f64 {
    let mut changes = client
        .subscribe(subjects::membership(cluster))
        .await
        .expect("subscribe");
    let request = ReconfigRequest::new(
        cluster.clone(),
        ReconfigAction::Allocate {
            count: 1,
            request_type: None,
        },
        "fleet-bench",
    );
    let asked = Instant::now();
    bus::request_reconfig(js, &request)
        .await
        .expect("request published");
    let listed = tokio::time::timeout(Duration::from_secs(30), async {
        while let Some(message) = changes.next().await {
            let Ok(change) =
                codec::decode::<MembershipChange>(message.headers.as_ref(), &message.payload)
            else {
                continue;
            };
            let active = change
                .members
                .iter()
                .any(|m| m.request == request.id && m.state == MemberState::Active);
            if active {
                return;
            }
        }
    })
    .await;
    assert!(listed.is_ok(), "allocation to {cluster} never listed");
    asked.elapsed().as_secs_f64() * 1_000.0
}

/// The KV operations the allocator counts.
const KV_OPS: [&str; 5] = ["get", "create", "update", "delete", "sweep"];

fn main() {
    let sizes = env_list("BENCH_SIZES", &[100, 1_000, 10_000, 100_000]);
    let allocations = env_usize("BENCH_ALLOCATIONS", 100);
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    runtime.block_on(async {
        let nats = NatsServer::start().await.expect("nats-server");
        let client = nats.client().await.expect("connect");
        let js = async_nats::jetstream::new(client.clone());
        let store = Store::open(&js, 1).await.expect("buckets");
        create_clusters(&store).await;
        // What the reconciler's pass and admin's cluster.list read.
        let mut reads = Vec::new();
        for _ in 0..10 {
            let started = Instant::now();
            let clusters = store.clusters().await.expect("every cluster");
            assert_eq!(clusters.len(), CLUSTERS);
            reads.push(started.elapsed().as_secs_f64() * 1000.0);
        }
        let (p50, _, max) = percentiles(&mut reads);
        println!("fleet: every cluster record read ({CLUSTERS}, as a reconciler pass and cluster.list do): p50 {p50:.1} ms  max {max:.1} ms");
        println!("fleet: {CLUSTERS} clusters; allocations of one server to a random cluster, publish to membership listed");
        let mut registered = 0;
        for size in sizes {
            let started = Instant::now();
            register(&store, registered, size).await;
            registered = registered.max(size);
            let took_register = started.elapsed();

            // An allocator started now rebuilds its view from the watch.
            let before = rss_mib();
            let mut config = nats.config();
            config.allocator.instance = format!("fleet-{size}");
            config.allocator.reconcile_interval = Duration::from_secs(std::env::var("BENCH_RECONCILE_S").ok().and_then(|v| v.parse().ok()).unwrap_or(5));
            config.allocator.repair_after = Duration::from_secs(10);
            let shutdown = CancellationToken::new();
            let ops = Ops::new("headroom-allocator");
            let started = Instant::now();
            let allocator = tokio::spawn(headroom_allocator::run(
                config,
                nats.client().await.expect("connect"),
                Arc::clone(&ops),
                shutdown.clone(),
            ));
            while ops.readiness().is_err() {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            let ready = started.elapsed();
            let grown = rss_mib() - before;

            let calls = |op: &str| metric(&ops, "headroom_allocator_kv_calls_total", &format!("{{op=\"{op}\""));
            let ops_before: Vec<u64> = KV_OPS.iter().map(|op| calls(op)).collect();
            let mut samples = Vec::with_capacity(allocations);
            for _ in 0..allocations {
                let cluster = cluster_id(rand::rng().random_range(0..CLUSTERS));
                samples.push(allocate_once(&client, &js, &cluster).await);
            }
            let (p50, p99, max) = percentiles(&mut samples);
            println!(
                "  {size:>7} servers (registered in {took_register:>7.2?}): allocator ready in {ready:>7.2?}, \
                 memory +{grown:>6.1} MiB; allocation p50 {p50:>6.2} ms  p99 {p99:>6.2} ms  max {max:>6.2} ms"
            );
            // Counted, not timed: the KV round trips one allocation costs
            // (the reconciler's passes meanwhile included; its sweeps apart).
            let per: Vec<String> = KV_OPS
                .iter()
                .zip(&ops_before)
                .map(|(op, before)| {
                    let n = calls(op) - before;
                    if *op == "sweep" {
                        format!("{op} {n} in all")
                    } else {
                        format!("{op} {:.2}", n as f64 / allocations as f64)
                    }
                })
                .collect();
            println!("           KV calls per allocation: {}", per.join(", "));
            shutdown.cancel();
            let _ = allocator.await;
        }
    });
}
