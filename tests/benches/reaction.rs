//! How fast Headroom reacts, over real NATS and real services. Prints
//! figures; asserts nothing (a shared 2-core machine is no place for timed
//! assertions).
//!
//! 1. Decision to every front-end applied: a reconfiguration request is
//!    published as the monitor does; the allocator allocates; the bench
//!    times when the change is in KV and when each front-end has swapped
//!    in the new routing table. With 1 front-end, 100 and 1,000 simulated
//!    ones (each its own NATS connection running the front-end's own
//!    membership follower and routing table, without the HTTP listener).
//! 2. Load crossing the upper level to the new member's first request:
//!    the whole system (agents, monitor, allocator, front-end, sample
//!    backends) with the default 1 s report interval and 2 s sustain; the
//!    load steps from 25 % to 125 % of one member at a known instant.
//! 3. Decision to confirmed by every front-end: real front-ends (in this
//!    process), 1 and 10, each saying the generation it applied as in
//!    production; the allocator confirms when all of them route by the
//!    change, and the bench times when the `confirmed.<request>` record
//!    arrives on a KV watch.
//!
//! `cargo bench -p headroom-tests --bench reaction` (the nats-server
//! binary from `NATS_SERVER_BIN`, as for the tests). `BENCH_TRIALS` and
//! `BENCH_CROSSINGS` change the number of trials (0 crossings skips part
//! two), `BENCH_FRONTENDS` the simulated front-end counts (`1,100,1000`),
//! `BENCH_CONFIRMING` the real ones of part three (`1,10`).

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use headroom_demo::{Settings, System};
use headroom_frontend::{membership, Frontend, Proxy};
use headroom_loadgen::{Profile, Target};
use headroom_shared::bus;
use headroom_shared::codec::{self, Codec};
use headroom_shared::config::FrontendConfig;
use headroom_shared::kv::{CLUSTERS_BUCKET, REQUESTS_BUCKET};
use headroom_shared::ledger::RequestConfirmed;
use headroom_shared::ops::Ops;
use headroom_shared::records::{ClusterPolicy, ClusterRecord, MemberState};
use headroom_shared::time::now_ms;
use headroom_shared::wire::{
    AuditEvent, EventKind, PutCluster, ReconfigAction, ReconfigRequest, RegisterServer,
};
use headroom_shared::{subjects, ClusterId, SCHEMA_VERSION};
use headroom_tests::{cpu_seconds, env_usize, eventually, print_row, NatsServer};
use tokio_util::sync::CancellationToken;

const WAIT: Duration = Duration::from_secs(30);

/// One front-end's routing: the same follower and table the front-end
/// runs, with a log of when each generation was swapped in.
struct Follower {
    applied: Arc<Mutex<Vec<(u64, Instant)>>>,
    proxy: Arc<Proxy>,
}

async fn follower(nats: &NatsServer, cluster: &ClusterId, stop: &CancellationToken) -> Follower {
    let client = nats.client().await.expect("connect");
    let proxy = Arc::new(Proxy::new(FrontendConfig {
        cluster: cluster.to_string(),
        cache_bytes: 0,
        ..FrontendConfig::default()
    }));
    let applied = applied_log(&proxy, stop);
    // The bench's connection is not watched for reconnections: none
    // are expected in a run.
    let (_, connected) = tokio::sync::watch::channel(0);
    tokio::spawn(membership::follow(
        client,
        connected,
        1,
        cluster.clone(),
        proxy.clone(),
        None,
        stop.clone(),
    ));
    Follower { applied, proxy }
}

/// When `proxy` swapped in each generation, until `stop`.
fn applied_log(proxy: &Proxy, stop: &CancellationToken) -> Arc<Mutex<Vec<(u64, Instant)>>> {
    let applied = Arc::new(Mutex::new(Vec::new()));
    let (log, mut generations, stop) = (applied.clone(), proxy.applied(), stop.clone());
    tokio::spawn(async move {
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                changed = generations.changed() => if changed.is_err() { return },
            }
            let generation = *generations.borrow_and_update();
            if let Ok(mut log) = log.lock() {
                log.push((generation, Instant::now()));
            }
        }
    });
    applied
}

impl Follower {
    fn applied_at(&self, generation: u64) -> Option<Instant> {
        self.applied
            .lock()
            .ok()?
            .iter()
            .find(|(g, _)| *g >= generation)
            .map(|(_, at)| *at)
    }
}

/// A nats-server, an allocator, `trials + 1` servers in the pool, and
/// cluster `bench` with one member and room for `trials` more.
struct Bench {
    nats: NatsServer,
    js: async_nats::jetstream::Context,
    cluster: ClusterId,
    stop: CancellationToken,
}

impl Bench {
    async fn start(trials: usize) -> Self {
        let nats = NatsServer::start().await.expect("nats-server");
        let client = nats.client().await.expect("connect");
        let js = async_nats::jetstream::new(client.clone());
        let stop = CancellationToken::new();
        let mut config = nats.config();
        config.allocator.instance = "bench".to_owned();
        tokio::spawn(headroom_allocator::run(
            config,
            nats.client().await.expect("connect"),
            Ops::new("headroom-allocator"),
            stop.clone(),
        ));
        for i in 0..=trials {
            let register = RegisterServer {
                v: SCHEMA_VERSION,
                id: headroom_shared::ServerId::new(format!("s{i}")).expect("id"),
                address: "127.0.0.1".to_owned(),
                port: 9,
                request_types: Vec::new(),
            };
            eventually(WAIT, || async {
                bus::admin::<_, headroom_shared::records::ServerRecord>(
                    &client,
                    subjects::admin::POOL_REGISTER,
                    &register,
                )
                .await
                .ok()
            })
            .await
            .expect("registered");
        }
        let cluster = ClusterId::new("bench").expect("id");
        let policy = ClusterPolicy {
            min_size: 1,
            max_size: u32::try_from(trials + 1).unwrap_or(u32::MAX),
            ..ClusterPolicy::default()
        };
        let _: ClusterRecord = bus::admin(
            &client,
            subjects::admin::CLUSTER_PUT,
            &PutCluster {
                v: SCHEMA_VERSION,
                id: cluster.clone(),
                policy,
            },
        )
        .await
        .expect("cluster");
        Self {
            nats,
            js,
            cluster,
            stop,
        }
    }

    /// Asks for one more member, as the monitor does.
    async fn allocate(&self) -> ReconfigRequest {
        let request = ReconfigRequest::new(
            self.cluster.clone(),
            ReconfigAction::Allocate {
                count: 1,
                request_type: None,
            },
            "bench",
        );
        bus::request_reconfig(&self.js, &request)
            .await
            .expect("sent");
        request
    }
}

async fn decision_to_frontends(frontends: usize, trials: usize) {
    let bench = Bench::start(trials).await;
    let (nats, js, cluster, stop) = (&bench.nats, &bench.js, &bench.cluster, &bench.stop);
    let mut followers = Vec::new();
    for _ in 0..frontends {
        followers.push(follower(nats, cluster, stop).await);
    }
    let bucket = js.get_key_value(CLUSTERS_BUCKET).await.expect("bucket");
    let active = |record: &ClusterRecord| {
        record
            .members
            .iter()
            .filter(|m| m.state == MemberState::Active)
            .count()
    };
    let current = || async {
        let entry = bucket.get("bench").await.ok()??;
        Codec::MsgPack.decode::<ClusterRecord>(&entry).ok()
    };
    let settled = eventually(WAIT, || async {
        let record = current().await?;
        (active(&record) == 1
            && followers
                .iter()
                .all(|f| f.applied_at(record.generation).is_some()))
        .then_some(())
    })
    .await;
    settled.expect("every front-end has the cluster");

    let mut watch = bucket.watch("bench").await.expect("watch");
    let (mut to_kv, mut kv_to_all, mut to_all) = (Vec::new(), Vec::new(), Vec::new());
    let cpu_before = (cpu_seconds(None), cpu_seconds(nats.pid()));
    for trial in 0..trials {
        let before = active(&current().await.expect("record"));
        let decided = Instant::now();
        bench.allocate().await;
        // The change in KV: the record where the new member is active.
        let (generation, in_kv) = loop {
            let entry = tokio::time::timeout(WAIT, watch.next())
                .await
                .expect("a change in time")
                .expect("watch open")
                .expect("entry");
            let seen = Instant::now();
            let Ok(record) = Codec::MsgPack.decode::<ClusterRecord>(&entry.value) else {
                continue;
            };
            if active(&record) > before {
                break (record.generation, seen);
            }
        };
        let applied = eventually(WAIT, || async {
            followers
                .iter()
                .map(|f| f.applied_at(generation))
                .collect::<Option<Vec<_>>>()
        })
        .await
        .unwrap_or_else(|| panic!("trial {trial}: every front-end applied {generation}"));
        let last = applied.iter().max().copied().unwrap_or(in_kv);
        let ms = |d: Duration| d.as_secs_f64() * 1000.0;
        to_kv.push(ms(in_kv.duration_since(decided)));
        kv_to_all.push(ms(last.saturating_duration_since(in_kv)));
        to_all.push(ms(last.duration_since(decided)));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    println!(
        "decision -> every front-end applied, {frontends} front-end(s), {trials} allocations:"
    );
    print_row("decision -> allocation in KV", &mut to_kv);
    print_row(
        "allocation in KV -> every front-end applied",
        &mut kv_to_all,
    );
    print_row("decision -> every front-end applied", &mut to_all);
    let per_allocation_ms = |before: f64, now: f64| (now - before) * 1000.0 / trials as f64;
    println!(
        "  CPU per allocation: this process (allocator, bench, {frontends} front-ends) {:.1} ms, nats-server {:.1} ms",
        per_allocation_ms(cpu_before.0, cpu_seconds(None)),
        per_allocation_ms(cpu_before.1, cpu_seconds(nats.pid())),
    );
    let resyncs: u64 = followers
        .iter()
        .map(|f| f.proxy.counters.resyncs.load(Ordering::Relaxed))
        .sum();
    println!("  KV reads to resynchronise, all front-ends together: {resyncs}");
    stop.cancel();
}

/// Real front-ends (in this process, one worker each), each saying the
/// generation it applied as it does in production; the allocator
/// confirms a change when every one of them routes by it.
async fn decision_to_confirmed(frontends: usize, trials: usize) {
    let bench = Bench::start(trials).await;
    let mut followers = Vec::new();
    for n in 0..frontends {
        let mut config = bench.nats.config();
        config.frontend = FrontendConfig {
            instance: format!("fe-{n}"),
            cluster: bench.cluster.to_string(),
            listen: "127.0.0.1:0".to_owned(),
            workers: 1,
            pin_workers: false,
            cache_bytes: 0,
            ..FrontendConfig::default()
        };
        let frontend = Frontend::bind(config).await.expect("front-end binds");
        let proxy = frontend.proxy();
        let applied = applied_log(&proxy, &bench.stop);
        followers.push(Follower { applied, proxy });
        tokio::spawn(frontend.serve(bench.stop.clone()));
    }
    let requests = eventually(WAIT, || async {
        bench.js.get_key_value(REQUESTS_BUCKET).await.ok()
    })
    .await
    .expect("the requests bucket");
    let mut confirmations = requests
        .watch(format!("{}>", RequestConfirmed::PREFIX))
        .await
        .expect("watch");
    // The first member's, once the allocator has listened for the
    // front-ends (three report intervals).
    let (first, _) = confirmation(&mut confirmations).await;
    assert_eq!(first.frontends.len(), frontends, "{first:?}");
    let (mut to_applied, mut applied_to_confirmed, mut to_confirmed, mut stamped) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for trial in 0..trials {
        let decided = Instant::now();
        let request = bench.allocate().await;
        let (confirmed, seen) = confirmation(&mut confirmations).await;
        assert_eq!(
            confirmed.id, request.id,
            "trial {trial}: one change at a time"
        );
        let applied = followers
            .iter()
            .map(|f| f.applied_at(confirmed.generation))
            .collect::<Option<Vec<_>>>()
            .unwrap_or_else(|| {
                panic!("trial {trial}: confirmed before every front-end applied it")
            });
        let last = applied.iter().max().copied().unwrap_or(seen);
        let ms = |d: Duration| d.as_secs_f64() * 1000.0;
        to_applied.push(ms(last.duration_since(decided)));
        applied_to_confirmed.push(ms(seen.saturating_duration_since(last)));
        to_confirmed.push(ms(seen.duration_since(decided)));
        stamped.push(confirmed.waited_ms().unwrap_or(0) as f64);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    println!(
        "decision -> confirmed by every front-end, {frontends} real front-end(s), {trials} allocations:"
    );
    print_row("decision -> every front-end applied", &mut to_applied);
    print_row(
        "last applied -> confirmation seen",
        &mut applied_to_confirmed,
    );
    print_row("decision -> confirmation seen", &mut to_confirmed);
    print_row("decision -> confirmed (allocator's stamps)", &mut stamped);
    bench.stop.cancel();
}

/// The next confirmation the watch delivers, and when it came.
async fn confirmation(
    confirmations: &mut async_nats::jetstream::kv::Watch,
) -> (RequestConfirmed, Instant) {
    loop {
        let entry = tokio::time::timeout(WAIT, confirmations.next())
            .await
            .expect("a confirmation in time")
            .expect("watch open")
            .expect("entry");
        if let Ok(confirmed) = Codec::MsgPack.decode::<RequestConfirmed>(&entry.value) {
            return (confirmed, Instant::now());
        }
    }
}

/// What the audit log said, with when it was said.
#[derive(Default)]
struct Heard {
    decided: Vec<u64>,
    allocated: Vec<(u64, String)>,
}

async fn crossing_to_first_request(crossings: usize) {
    let nats = NatsServer::start().await.expect("nats-server");
    let dir = tempfile::tempdir().expect("temp dir");
    let mut settings = Settings::standard(dir.path().join("unused.svg"));
    settings.backends = 2;
    settings.policy.max_size = 2;
    settings.interval = Duration::from_secs(1);
    settings.listen = "127.0.0.1:0".to_owned();
    settings.policy.scaling.sustain_ms = 2_000;
    let mut quiet = std::io::sink();
    let system = System::start(&settings, &nats, &mut quiet)
        .await
        .expect("system");
    let heard = Arc::new(Mutex::new(Heard::default()));
    {
        let mut events = system
            .client
            .subscribe(format!("{}.events.>", subjects::ROOT))
            .await
            .expect("events");
        let heard = heard.clone();
        tokio::spawn(async move {
            while let Some(message) = events.next().await {
                let Ok(event) =
                    codec::decode::<AuditEvent>(message.headers.as_ref(), &message.payload)
                else {
                    continue;
                };
                let Ok(mut heard) = heard.lock() else { return };
                match (&event.kind, &event.server) {
                    (EventKind::Decided, _) if event.detail.contains("\"allocate\"") => {
                        heard.decided.push(event.at_ms);
                    }
                    (EventKind::Allocated, Some(server)) => {
                        heard.allocated.push((event.at_ms, server.to_string()));
                    }
                    _ => {}
                }
            }
        });
    }
    let applied_log = Arc::new(Mutex::new(Vec::<(u64, u64)>::new()));
    {
        let (log, mut generations) = (applied_log.clone(), system.proxy.applied());
        tokio::spawn(async move {
            while generations.changed().await.is_ok() {
                let generation = *generations.borrow_and_update();
                if let Ok(mut log) = log.lock() {
                    log.push((generation, now_ms()));
                }
            }
        });
    }
    // 25 % of one member (20 req/s of 100 ms on a capacity of 8 in
    // flight), then 125 %.
    let base = Duration::from_secs(4);
    let target = Target {
        base: format!("http://{}", system.address),
        paths: vec!["/api/item".to_owned()],
        timeout: Duration::from_secs(10),
        max_in_flight: 4096,
    };
    let (mut detection, mut to_allocation, mut to_applied, mut to_served, mut total) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for trial in 0..crossings {
        let profile = Profile::parse("hold:20:4s,hold:100:8s").expect("profile");
        let started_ms = now_ms();
        let crossing_ms = started_ms + u64::try_from(base.as_millis()).unwrap_or(0);
        let load = {
            let target = target.clone();
            tokio::spawn(async move { headroom_loadgen::run(&profile, &target, None).await })
        };
        let summary = load.await.expect("load ran");
        let (decided, allocated) = {
            let heard = heard.lock().expect("lock");
            let decided = heard.decided.iter().copied().find(|&t| t >= crossing_ms);
            let allocated = heard
                .allocated
                .iter()
                .find(|(t, _)| *t >= crossing_ms)
                .cloned();
            (decided, allocated)
        };
        let (Some(decided), Some((allocated, server))) = (decided, allocated) else {
            println!("  trial {trial}: no scale-up seen ({summary:?})");
            continue;
        };
        let backend = system
            .backends
            .iter()
            .find(|b| b.name == server)
            .expect("the allocated backend");
        let served = backend
            .seen()
            .iter()
            .map(|s| s.at_ms)
            .find(|&t| t >= allocated);
        // The front-end's first table after the allocation.
        let applied = applied_log
            .lock()
            .expect("lock")
            .iter()
            .map(|(_, at)| *at)
            .find(|&at| at >= allocated);
        let (Some(served), Some(applied)) = (served, applied) else {
            println!("  trial {trial}: the new member served nothing");
            continue;
        };
        let ms = |from: u64, to: u64| to.saturating_sub(from) as f64;
        detection.push(ms(crossing_ms, decided));
        to_allocation.push(ms(decided, allocated));
        to_applied.push(ms(allocated, applied));
        to_served.push(ms(applied, served));
        total.push(ms(crossing_ms, served));
        // Back to one member and a free pool before the next crossing.
        let quiet = Profile::parse("hold:20:6s").expect("profile");
        let settle = headroom_loadgen::run(&quiet, &target, None);
        let released = async {
            eventually(Duration::from_secs(60), || async {
                let bucket = system.js.get_key_value(CLUSTERS_BUCKET).await.ok()?;
                let entry = bucket.get("demo").await.ok()??;
                let record = Codec::MsgPack.decode::<ClusterRecord>(&entry).ok()?;
                (record.members.len() == 1).then_some(())
            })
            .await
        };
        let (_, released) = tokio::join!(settle, released);
        if released.is_none() {
            println!("  the cluster did not shrink back; stopping after {trial} crossings");
            break;
        }
        // Let the windows forget the last rise.
        tokio::time::sleep(Duration::from_secs(3)).await;
    }
    println!(
        "load crossing the upper level -> the new member's first request, {} crossings \
         (1 s interval, {} ms sustain):",
        total.len(),
        settings.policy.scaling.sustain_ms
    );
    if total.is_empty() {
        return;
    }
    print_row("detection (crossing -> decision)", &mut detection);
    print_row("decision -> allocation", &mut to_allocation);
    print_row("allocation -> front-end applied", &mut to_applied);
    print_row("front-end applied -> first request served", &mut to_served);
    print_row("crossing -> first request served", &mut total);
    system.stop().await;
}

fn main() {
    headroom_shared::telemetry::init_for_tests();
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let trials = env_usize("BENCH_TRIALS", 50);
    let confirming: Vec<usize> = std::env::var("BENCH_CONFIRMING")
        .unwrap_or_else(|_| "1,10".to_owned())
        .split(',')
        .filter_map(|n| n.trim().parse().ok())
        .collect();
    let crossings = env_usize("BENCH_CROSSINGS", 5);
    let frontends: Vec<usize> = std::env::var("BENCH_FRONTENDS")
        .unwrap_or_else(|_| "1,100,1000".to_owned())
        .split(',')
        .filter_map(|n| n.trim().parse().ok())
        .collect();
    runtime.block_on(async {
        for n in frontends {
            decision_to_frontends(n, trials).await;
        }
        for n in confirming {
            decision_to_confirmed(n, trials).await;
        }
        if crossings > 0 {
            crossing_to_first_request(crossings).await;
        }
    });
}
