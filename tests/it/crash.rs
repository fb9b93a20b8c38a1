//! At most once under real crashes: two allocator processes and the
//! nats-server are killed with SIGKILL at random moments while requests
//! flow, some of them published twice, some again after JetStream's
//! de-duplication window. The invariants are then checked on the whole
//! history of the three KV buckets, every revision in stream order, not
//! only on the final state.
//!
//! The history is recorded by mirrors made before any allocator starts
//! (`history.rs`). The reconfiguration stream is made here too, with a
//! one-second de-duplication window, so a duplicate sent two seconds later
//! goes past it as one sent after 120 s would.
//!
//! Sizes come from the environment, so the soak (`scripts/soak-crash.sh`)
//! runs the same test longer: `HEADROOM_CRASH_KILLS` (allocator kills, 120),
//! `HEADROOM_CRASH_NATS_KILLS` (8), `HEADROOM_CRASH_REQUESTS` (150);
//! `HEADROOM_ALLOCATOR_BIN` runs another allocator binary (an older build,
//! to see the test fail on it).

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream;
use headroom_shared::wire::{EventKind, ReconfigAction, ReconfigRequest};
use headroom_shared::{bus, subjects, ServerId};
use headroom_tests::{env_usize, eventually, NatsServer};
use rand::Rng;
use tokio::process::Child;
use tokio::sync::Mutex;

use headroom_allocator::store::Store;

use crate::common::*;
use crate::history::{record_history, History};

const CLUSTERS: [&str; 3] = ["c1", "c2", "c3"];
const SERVERS: usize = 30;
const DEDUP_WINDOW: Duration = Duration::from_secs(1);

/// The allocator binary: `HEADROOM_ALLOCATOR_BIN`, else this workspace's.
fn allocator_binary() -> PathBuf {
    workspace_binary("headroom-allocator", "HEADROOM_ALLOCATOR_BIN")
}

/// One allocator process, restarted after every kill.
struct AllocatorProcess {
    name: String,
    binary: PathBuf,
    log: PathBuf,
    child: Option<Child>,
}

impl AllocatorProcess {
    fn new(name: &str, binary: &std::path::Path, dir: &std::path::Path) -> Self {
        Self {
            name: name.to_owned(),
            binary: binary.to_owned(),
            log: dir.join(format!("{name}.log")),
            child: None,
        }
    }

    fn start(&mut self, url: &str) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("allocator log");
        let child = service_command(&self.binary, url, log)
            .env("HEADROOM_NATS__MAX_RECONNECT_DELAY", "300ms")
            .env("HEADROOM_ALLOCATOR__INSTANCE", &self.name)
            .env("HEADROOM_ALLOCATOR__ACK_WAIT", "4s")
            .env("HEADROOM_ALLOCATOR__RECONCILE_INTERVAL", "200ms")
            .env("HEADROOM_ALLOCATOR__REPAIR_AFTER", "1s")
            .spawn()
            .expect("allocator starts");
        self.child = Some(child);
    }

    /// SIGKILL, as the kernel's OOM killer or a lost machine would.
    async fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill().await;
        }
    }
}

/// What the chaos did, for the figures.
#[derive(Default)]
struct Chaos {
    allocator_kills: AtomicU64,
    nats_kills: AtomicU64,
}

/// Publishes `request`, trying again while the server is down. Returns
/// whether it was sent.
async fn publish(js: &jetstream::Context, request: &ReconfigRequest) -> bool {
    for _ in 0..100 {
        if bus::request_reconfig(js, request).await.is_ok() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    false
}

/// A round of requests made from what KV shows now (nothing while the
/// server is down).
async fn next_round(store: &Store, n: usize) -> Vec<ReconfigRequest> {
    let Ok(Some(snapshot)) =
        tokio::time::timeout(Duration::from_secs(2), snapshot_or_none(store)).await
    else {
        return Vec::new();
    };
    let mut rng = rand::rng();
    (0..n)
        .map(|_| {
            let cluster = CLUSTERS[rng.random_range(0..CLUSTERS.len())];
            let members = snapshot.active_members(cluster);
            let action = if members.is_empty() || rng.random_bool(0.5) {
                ReconfigAction::Allocate {
                    count: rng.random_range(1..=3),
                    request_type: None,
                }
            } else {
                ReconfigAction::Release {
                    server: members[rng.random_range(0..members.len())].clone(),
                }
            };
            ReconfigRequest::new(cid(cluster), action, "crash-test")
        })
        .collect()
}

/// KV as it is now, or `None` while it cannot be read.
async fn snapshot_or_none(store: &Store) -> Option<Snapshot> {
    let servers = store.servers().await.ok()?;
    let clusters = store.clusters().await.ok()?;
    Some(Snapshot {
        servers: servers
            .into_iter()
            .map(|s| (s.value.id.clone(), (s.value, s.revision)))
            .collect(),
        clusters: clusters
            .into_iter()
            .map(|c| (c.value.id.clone(), (c.value, c.revision)))
            .collect(),
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkilled_allocators_and_nats_server_never_apply_a_request_twice() {
    headroom_shared::telemetry::init_for_tests();
    let kills = env_usize("HEADROOM_CRASH_KILLS", 120);
    let nats_kills = env_usize("HEADROOM_CRASH_NATS_KILLS", 8);
    let wanted = env_usize("HEADROOM_CRASH_REQUESTS", 150);
    let started = Instant::now();

    let nats = Arc::new(Mutex::new(NatsServer::start().await.expect("nats-server")));
    let url = nats.lock().await.url().to_owned();
    let client = async_nats::ConnectOptions::new()
        .retry_on_initial_connect()
        .connect(&url)
        .await
        .expect("connect");
    let js = jetstream::new(client.clone());
    record_history(&js, 1).await.expect("history mirrors");
    let store = Store::open(&js, 1).await.expect("buckets");
    let mut reconfig = subjects::reconfig_stream(1);
    reconfig.duplicate_window = DEDUP_WINDOW;
    js.create_stream(reconfig).await.expect("reconfig stream");

    let mut dir = tempfile::Builder::new()
        .prefix("headroom-crash-")
        .tempdir()
        .expect("temp dir");
    // HEADROOM_CRASH_KEEP_LOGS=1 keeps the allocators' logs for a look.
    if std::env::var_os("HEADROOM_CRASH_KEEP_LOGS").is_some() {
        dir.disable_cleanup(true);
        println!("allocator logs in {}", dir.path().display());
    }
    let binary = allocator_binary();
    let allocators: Vec<Arc<Mutex<AllocatorProcess>>> = ["alloc-a", "alloc-b"]
        .iter()
        .map(|name| Arc::new(Mutex::new(AllocatorProcess::new(name, &binary, dir.path()))))
        .collect();
    for a in &allocators {
        a.lock().await.start(&url);
    }
    wait_for_admin(&client).await;
    let registered: Vec<ServerId> = (0..SERVERS).map(|i| sid(&format!("s{i:02}"))).collect();
    for id in &registered {
        register(&client, id.as_str(), &[]).await;
    }
    for c in CLUSTERS {
        put_cluster(&client, c, policy(1, 8))
            .await
            .expect("cluster");
    }

    // The chaos: one allocator or the other killed and restarted at once,
    // and now and then the nats-server itself.
    let chaos = Arc::new(Chaos::default());
    let stop = Arc::new(AtomicBool::new(false));
    let chaos_task = {
        let (chaos, stop, nats, allocators, url) = (
            chaos.clone(),
            stop.clone(),
            nats.clone(),
            allocators.clone(),
            url.clone(),
        );
        tokio::spawn(async move {
            let every_nats = (kills / nats_kills.max(1)).max(1);
            for n in 1..=kills {
                let pause = rand::rng().random_range(50..400);
                tokio::time::sleep(Duration::from_millis(pause)).await;
                let which = rand::rng().random_range(0..allocators.len());
                let mut victim = allocators[which].lock().await;
                victim.kill().await;
                victim.start(&url);
                chaos.allocator_kills.fetch_add(1, Ordering::Relaxed);
                drop(victim);
                if nats_kills > 0
                    && n % every_nats == 0
                    && chaos.nats_kills.load(Ordering::Relaxed) < nats_kills as u64
                {
                    let mut server = nats.lock().await;
                    server.kill().await.expect("nats-server killed");
                    let down = rand::rng().random_range(0..500);
                    tokio::time::sleep(Duration::from_millis(down)).await;
                    server.restart().await.expect("nats-server restarts");
                    chaos.nats_kills.fetch_add(1, Ordering::Relaxed);
                }
            }
            stop.store(true, Ordering::Relaxed);
        })
    };

    // The load: rounds made from the state KV shows, a tenth published
    // twice at once, a tenth again past the de-duplication window.
    let mut sent: Vec<ReconfigRequest> = Vec::new();
    let mut late: Vec<(Instant, ReconfigRequest)> = Vec::new();
    let (mut doubled, mut late_sent) = (0usize, 0usize);
    while !stop.load(Ordering::Relaxed) || sent.len() < wanted {
        for request in next_round(&store, 6).await {
            if !publish(&js, &request).await {
                continue;
            }
            let roll = rand::rng().random_range(0..10);
            if roll == 0 && publish(&js, &request).await {
                doubled += 1;
            } else if roll == 1 {
                late.push((Instant::now() + DEDUP_WINDOW * 2, request.clone()));
            }
            sent.push(request);
        }
        let now = Instant::now();
        for (_, request) in late.iter().filter(|(at, _)| *at <= now) {
            if publish(&js, request).await {
                late_sent += 1;
            }
        }
        late.retain(|(at, _)| *at > now);
        tokio::time::sleep(Duration::from_millis(rand::rng().random_range(20..150))).await;
        if started.elapsed() > Duration::from_secs(1_800) {
            break;
        }
    }
    chaos_task.await.expect("chaos ends");
    let chaos_took = started.elapsed();
    tokio::time::sleep(DEDUP_WINDOW * 2).await;
    for (_, request) in &late {
        if publish(&js, request).await {
            late_sent += 1;
        }
    }

    // Everything settles: every request has its one outcome, nothing is
    // left joining or draining, the mirrors have every revision.
    for request in &sent {
        let done = eventually(Duration::from_secs(60), || outcome(&js, &request.id)).await;
        assert!(
            done.is_some(),
            "request {} has no outcome\n{}",
            request.id,
            logs(&allocators).await
        );
    }
    let answered_at = started.elapsed();
    let settled = wait_settled(&js).await;
    settled
        .check_invariants(&registered)
        .expect("the final state holds the invariants");
    let history = History::read(&js).await;
    let verdict = history.check(sent.iter().map(|r| (&r.id, &r.action)));
    let audit = audit_log(&js).await;

    let outcomes = outcomes(&js, &sent).await;
    let redelivered = outcomes.iter().filter(|o| o.delivery > 1).count();
    let repairs = audit
        .iter()
        .filter(|e| e.kind == EventKind::Repaired)
        .count();
    println!(
        "crash test: {} allocator kills, {} nats-server kills, {} requests ({doubled} sent twice at once, \
         {late_sent} again past the de-duplication window), {} applied on a later delivery, {repairs} repairs; \
         history: {} server, {} cluster, {} ledger revisions; {} joins, {} drains; \
         chaos for {chaos_took:?}, every request answered {:?} later, all in {:?}",
        chaos.allocator_kills.load(Ordering::Relaxed),
        chaos.nats_kills.load(Ordering::Relaxed),
        sent.len(),
        redelivered,
        history.servers.len(),
        history.clusters.len(),
        history.requests.len(),
        verdict.joins,
        verdict.drains,
        answered_at - chaos_took,
        started.elapsed(),
    );
    assert!(
        verdict.violations.is_empty(),
        "{} violations of at most once in the KV history:\n{}",
        verdict.violations.len(),
        verdict.violations.join("\n")
    );
    // The audit log agrees (after the history, which says more).
    crate::allocator::check_at_most_once(&audit, &sent);
    assert!(
        redelivered + repairs > 0,
        "the kills never hit work in flight, so this run proved nothing"
    );
    for a in &allocators {
        a.lock().await.kill().await;
    }
}

async fn logs(allocators: &[Arc<Mutex<AllocatorProcess>>]) -> String {
    let mut out = String::new();
    for a in allocators {
        let a = a.lock().await;
        let text = std::fs::read_to_string(&a.log).unwrap_or_default();
        let tail: Vec<&str> = text.lines().rev().take(30).collect();
        out += &format!("--- {} ---\n", a.name);
        for line in tail.into_iter().rev() {
            out += line;
            out.push('\n');
        }
    }
    out
}
