//! At most once under real crashes: two allocator processes and the
//! nats-server are killed with SIGKILL at random moments while requests
//! flow, some of them published twice, some again after JetStream's
//! de-duplication window. The invariants are then checked on the whole
//! history of the three KV buckets, every revision in stream order, not
//! only on the final state.
//!
//! KV keeps a few revisions per key; the test records every one by
//! mirroring each bucket's stream into a stream of its own with no limits,
//! created before any allocator starts. The reconfiguration stream is made
//! here too, with a one-second de-duplication window, so a duplicate sent
//! two seconds later goes past it as one sent after 120 s would.
//!
//! Sizes come from the environment, so the soak (`scripts/soak-crash.sh`)
//! runs the same test longer: `HEADROOM_CRASH_KILLS` (allocator kills, 120),
//! `HEADROOM_CRASH_NATS_KILLS` (8), `HEADROOM_CRASH_REQUESTS` (150);
//! `HEADROOM_ALLOCATOR_BIN` runs another allocator binary (an older build,
//! to see the test fail on it).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, stream};
use headroom_shared::codec::{Codec, Message};
use headroom_shared::kv::{open_bucket, Bucket, CLUSTERS_BUCKET, REQUESTS_BUCKET, SERVERS_BUCKET};
use headroom_shared::records::{ClusterRecord, MemberState, ServerRecord, ServerState};
use headroom_shared::wire::{EventKind, ReconfigAction, ReconfigRequest};
use headroom_shared::{bus, subjects, ClusterId, RequestId, ServerId};
use headroom_tests::{env_usize, eventually, NatsServer};
use rand::Rng;
use tokio::process::Child;
use tokio::sync::Mutex;

use headroom_allocator::store::Store;

use crate::common::*;

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
    record_history(&js).await;
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
    let verdict = history.check(&sent);
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

fn history_stream(bucket: &str) -> String {
    format!("HISTORY_{}", bucket.replace('-', "_"))
}

/// Creates the buckets as the services would, and a mirror of each with no
/// limits, so every revision stays readable after KV has let it go.
async fn record_history(js: &jetstream::Context) {
    for bucket in [Bucket::Servers, Bucket::Clusters, Bucket::Requests] {
        open_bucket(js, bucket, 1).await.expect("bucket");
        let bucket = bucket.name();
        js.create_stream(stream::Config {
            name: history_stream(bucket),
            mirror: Some(stream::Source {
                name: format!("KV_{bucket}"),
                ..Default::default()
            }),
            storage: stream::StorageType::File,
            ..Default::default()
        })
        .await
        .expect("history mirror");
    }
}

/// One revision of a KV key: its key, and its value unless it was a delete.
struct Revision<T> {
    key: String,
    value: Option<T>,
}

/// Every revision of the three buckets, each bucket in its stream order.
struct History {
    servers: Vec<Revision<ServerRecord>>,
    clusters: Vec<Revision<ClusterRecord>>,
    /// The ledger's keys only (outcomes and taken-up marks).
    requests: Vec<Revision<()>>,
}

impl History {
    async fn read(js: &jetstream::Context) -> Self {
        Self {
            servers: decoded(read_revisions(js, SERVERS_BUCKET).await),
            clusters: decoded(read_revisions(js, CLUSTERS_BUCKET).await),
            requests: read_revisions(js, REQUESTS_BUCKET)
                .await
                .into_iter()
                .map(|r| Revision {
                    key: r.key,
                    value: r.value.map(|_| ()),
                })
                .collect(),
        }
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
    for seq in caught_up.first_sequence..=caught_up.last_sequence {
        let raw = mirror
            .get_raw_message(seq)
            .await
            .expect("mirrored revision");
        let deleted = headroom_shared::kv::is_removal(&raw.headers);
        out.push(Revision {
            key: raw.subject.as_str().trim_start_matches(&prefix).to_owned(),
            value: (!deleted).then_some(raw.payload),
        });
    }
    out
}

/// What the history shows.
struct Verdict {
    joins: usize,
    drains: usize,
    violations: Vec<String>,
}

impl History {
    /// The invariants, revision by revision.
    fn check(&self, sent: &[ReconfigRequest]) -> Verdict {
        let mut violations = Vec::new();
        let wanted: HashMap<&RequestId, u32> = sent
            .iter()
            .filter_map(|r| match r.action {
                ReconfigAction::Allocate { count, .. } => Some((&r.id, count)),
                ReconfigAction::Replace { .. } => Some((&r.id, 1)),
                _ => None,
            })
            .collect();
        let releases: HashSet<&RequestId> = sent
            .iter()
            .filter(|r| matches!(r.action, ReconfigAction::Release { .. }))
            .map(|r| &r.id)
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
        for request in sent {
            match outcomes.get(request.id.as_str()) {
                Some(1) => {}
                n => violations.push(format!("{} has {n:?} outcomes", request.id)),
            }
        }
        Verdict {
            joins: all_joins,
            drains: all_drains,
            violations,
        }
    }
}
