//! Scale from zero: how long the first request waits when its cluster has
//! no member, split into its stages, over real NATS and real services (an
//! allocator, a monitor with its default 1 s evaluation, one front-end and
//! one sample backend, all in this process). Prints figures; asserts
//! nothing.
//!
//! Each trial waits until the cluster is back at zero (`idle_to_zero_ms`
//! 1 s), then for a random part of a second, sends one request and times: the front-end's demand on the bus,
//! the monitor's decision, the allocation, the front-end routing to the
//! member, and the answer.
//!
//! `cargo bench -p headroom-tests --bench cold_start` (the nats-server
//! binary from `NATS_SERVER_BIN`); `BENCH_TRIALS` (20) trials.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use headroom_backend::Backend;
use headroom_frontend::Frontend;
use headroom_shared::codec::{self, Codec};
use headroom_shared::config::BackendConfig;
use headroom_shared::kv::CLUSTERS_BUCKET;
use headroom_shared::ops::Ops;
use headroom_shared::records::{ClusterRecord, ServerRecord};
use headroom_shared::time::now_ms;
use headroom_shared::wire::{AuditEvent, EventKind, FrontendDemand, PutCluster, RegisterServer};
use headroom_shared::{bus, subjects, ClusterId, ServerId, SCHEMA_VERSION};
use headroom_tests::{env_usize, eventually, print_row, NatsServer};
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tokio_util::sync::CancellationToken;

const WAIT: Duration = Duration::from_secs(60);

/// When each thing was first heard, in the system's milliseconds.
#[derive(Default)]
struct Log {
    demand: Vec<u64>,
    decided: Vec<u64>,
    allocated: Vec<u64>,
}

fn first_after(times: &[u64], t: u64) -> Option<u64> {
    times.iter().copied().find(|&x| x >= t)
}

fn listen(client: async_nats::Client, cluster: ClusterId, log: Arc<Mutex<Log>>) {
    tokio::spawn(async move {
        let mut demand = client
            .subscribe(subjects::demand(&cluster))
            .await
            .expect("demand");
        let mut events = client
            .subscribe(format!("{}.events.>", subjects::ROOT))
            .await
            .expect("events");
        loop {
            tokio::select! {
                Some(m) = demand.next() => {
                    if let Ok(d) = codec::decode::<FrontendDemand>(m.headers.as_ref(), &m.payload) {
                        if d.held > 0 {
                            if let Ok(mut log) = log.lock() { log.demand.push(now_ms()); }
                        }
                    }
                }
                Some(m) = events.next() => {
                    let Ok(e) = codec::decode::<AuditEvent>(m.headers.as_ref(), &m.payload) else { continue };
                    let Ok(mut log) = log.lock() else { return };
                    match e.kind {
                        EventKind::Decided if e.detail.contains("\"allocate\"") => log.decided.push(e.at_ms),
                        EventKind::Allocated => log.allocated.push(e.at_ms),
                        _ => {}
                    }
                }
                else => return,
            }
        }
    });
}

async fn members(js: &async_nats::jetstream::Context) -> Option<usize> {
    let bucket = js.get_key_value(CLUSTERS_BUCKET).await.ok()?;
    let entry = bucket.get("cold").await.ok()??;
    let record: ClusterRecord = Codec::MsgPack.decode(&entry).ok()?;
    Some(record.members.len())
}

async fn cold_starts(trials: usize) {
    let nats = NatsServer::start().await.expect("nats-server");
    let client = nats.client().await.expect("connect");
    let js = async_nats::jetstream::new(client.clone());
    let stop = CancellationToken::new();
    let mut config = nats.config();
    config.allocator.instance = "bench".to_owned();
    config.monitor.instance = "bench".to_owned();
    tokio::spawn(headroom_allocator::run(
        config.clone(),
        nats.client().await.expect("connect"),
        Ops::new("headroom-allocator"),
        stop.clone(),
    ));
    tokio::spawn(headroom_monitor::run(
        config,
        nats.client().await.expect("connect"),
        Ops::new("headroom-monitor"),
        stop.clone(),
    ));
    let backend = Backend::start(
        BackendConfig {
            name: "b1".to_owned(),
            listen: "127.0.0.1:0".to_owned(),
            ..BackendConfig::default()
        },
        stop.clone(),
    )
    .await
    .expect("backend");
    let register = RegisterServer {
        v: SCHEMA_VERSION,
        id: ServerId::new("b1").expect("id"),
        address: backend.addr.ip().to_string(),
        port: backend.addr.port(),
        request_types: Vec::new(),
    };
    eventually(WAIT, || async {
        bus::admin::<_, ServerRecord>(&client, subjects::admin::POOL_REGISTER, &register)
            .await
            .ok()
    })
    .await
    .expect("registered");
    let cluster = ClusterId::new("cold").expect("id");
    let _: ClusterRecord = bus::admin(
        &client,
        subjects::admin::CLUSTER_PUT,
        &PutCluster {
            v: SCHEMA_VERSION,
            id: cluster.clone(),
            policy: headroom_tests::zero_policy(1, 1_000),
        },
    )
    .await
    .expect("cluster");
    let mut fe = nats.config();
    fe.frontend.cluster = "cold".to_owned();
    fe.frontend.instance = "fe-1".to_owned();
    fe.frontend.listen = "127.0.0.1:0".to_owned();
    fe.frontend.workers = 1;
    fe.frontend.pin_workers = false;
    fe.frontend.cache_bytes = 0;
    fe.frontend.report_interval = Duration::from_millis(200);
    let frontend = Frontend::bind(fe).await.expect("front-end");
    let (addr, proxy) = (frontend.local_addr().expect("addr"), frontend.proxy());
    tokio::spawn(frontend.serve(stop.clone()));
    let routed = Arc::new(Mutex::new(Vec::<u64>::new()));
    {
        let (routed, proxy, mut applied) = (routed.clone(), proxy.clone(), proxy.applied());
        tokio::spawn(async move {
            while applied.changed().await.is_ok() {
                applied.borrow_and_update();
                let members = proxy.table.load().as_ref().map_or(0, |t| t.backends.len());
                if members > 0 {
                    if let Ok(mut routed) = routed.lock() {
                        routed.push(now_ms());
                    }
                }
            }
        });
    }
    let log = Arc::new(Mutex::new(Log::default()));
    listen(client.clone(), cluster, log.clone());
    let http = Client::builder(TokioExecutor::new()).build_http::<Empty<Bytes>>();
    let mut stages: [Vec<f64>; 5] = Default::default();
    let mut total = Vec::new();
    for trial in 0..trials {
        let at_zero = eventually(WAIT, || async {
            let empty = proxy
                .table
                .load()
                .as_ref()
                .is_some_and(|t| t.backends.is_empty());
            (members(&js).await == Some(0) && empty).then_some(())
        })
        .await;
        if at_zero.is_none() {
            println!("  trial {trial}: the cluster did not go back to zero; stopping");
            break;
        }
        // Past the cooldowns of the last release, and at a random point of
        // the monitor's evaluation interval: the release to zero happened
        // on one of its evaluations, so a fixed pause would always land at
        // the same point of the next.
        let jitter = rand::random_range(0..1_000);
        tokio::time::sleep(Duration::from_millis(600 + jitter)).await;
        let sent = now_ms();
        let request = http::Request::get(format!("http://{addr}/first?cost_ms=5"))
            .body(Empty::new())
            .expect("request");
        let response = http.request(request).await.expect("answer");
        let ok = response.status().is_success();
        let _ = response.into_body().collect().await;
        let answered = now_ms();
        if !ok {
            println!("  trial {trial}: not answered 200");
            continue;
        }
        let times = {
            let log = log.lock().expect("log");
            let routed = routed.lock().expect("routed");
            [
                first_after(&log.demand, sent),
                first_after(&log.decided, sent),
                first_after(&log.allocated, sent),
                first_after(&routed, sent),
            ]
        };
        let [Some(demand), Some(decided), Some(allocated), Some(routed)] = times else {
            println!("  trial {trial}: a stage was not seen ({times:?})");
            continue;
        };
        let ms = |from: u64, to: u64| to.saturating_sub(from) as f64;
        stages[0].push(ms(sent, demand));
        stages[1].push(ms(demand, decided));
        stages[2].push(ms(decided, allocated));
        stages[3].push(ms(allocated, routed));
        stages[4].push(ms(routed, answered));
        total.push(ms(sent, answered));
    }
    println!(
        "cold start: one request to a cluster at zero, {} trials (monitor.evaluate_interval 1 s):",
        total.len()
    );
    if total.is_empty() {
        return;
    }
    let names = [
        "request -> demand on the bus",
        "demand -> the monitor's decision",
        "decision -> allocated (KV)",
        "allocated -> front-end routes to it",
        "routes to it -> answered",
    ];
    for (name, samples) in names.iter().zip(stages.iter_mut()) {
        print_row(name, samples);
    }
    print_row("request -> answered", &mut total);
    stop.cancel();
}

fn main() {
    headroom_shared::telemetry::init_for_tests();
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    runtime.block_on(cold_starts(env_usize("BENCH_TRIALS", 20)));
}
