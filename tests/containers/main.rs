//! Containerized integration tests: the compose stack itself (images built
//! FROM scratch, one NATS user per service, health checks on /readyz),
//! brought up under its own project name with free host ports, driven with
//! the load generator from outside, judged through NATS and KV, and torn
//! down after (`down -v`), also when a test fails.
//!
//! They need a Docker engine with compose and the images built
//! (`scripts/compose.sh build`); `scripts/test.sh` does both when Docker is
//! present and sets `HEADROOM_CONTAINER_TESTS=1`. Without it they say so
//! and stop. They run one at a time: each stack takes the whole machine.

#[allow(dead_code)]
#[path = "../it/common.rs"]
mod common;

use std::collections::BTreeMap;
use std::process::Command;
use std::time::{Duration, Instant};

use async_nats::jetstream;
use futures::StreamExt;
use headroom_loadgen::{Profile, Summary, Target};
use headroom_shared::codec::{self, Codec};
use headroom_shared::kv::CLUSTERS_BUCKET;
use headroom_shared::records::{ClusterRecord, MemberState, ServerState};
use headroom_shared::wire::{AuditEvent, EventKind};
use headroom_shared::{subjects, ServerId};
use headroom_tests::eventually;

use common::Snapshot;

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

fn enabled() -> bool {
    if std::env::var("HEADROOM_CONTAINER_TESTS").as_deref() == Ok("1") {
        return true;
    }
    eprintln!(
        "container tests not run: set HEADROOM_CONTAINER_TESTS=1 with a Docker engine and \
         the images built (scripts/test.sh does both when Docker is present)"
    );
    false
}

/// A free TCP port on this host (the kernel's choice, released at once).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// The passwords compose gives the stack, from the repository's `.env`.
fn passwords() -> BTreeMap<String, String> {
    let text = std::fs::read_to_string(format!("{ROOT}/../.env")).expect(".env");
    text.lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
        .collect()
}

/// One compose project: up on creation, `down -v` on drop.
struct Stack {
    project: String,
    files: Vec<&'static str>,
    env: Vec<(String, String)>,
    nats_port: u16,
    frontend_ports: [u16; 2],
    monitor_port: u16,
}

impl Stack {
    fn up(cluster: bool) -> Self {
        let project = format!(
            "headroom-it-{}-{}",
            std::process::id(),
            if cluster { "cluster" } else { "single" }
        );
        let nats_port = free_port();
        let frontend_ports = [free_port(), free_port()];
        let monitor_port = free_port();
        let mut env = vec![
            ("HEADROOM_NATS_PORT".to_owned(), nats_port.to_string()),
            (
                "HEADROOM_NATS_MONITOR_PORT".to_owned(),
                monitor_port.to_string(),
            ),
            (
                "HEADROOM_FRONTEND_1_PORT".to_owned(),
                frontend_ports[0].to_string(),
            ),
            (
                "HEADROOM_FRONTEND_2_PORT".to_owned(),
                frontend_ports[1].to_string(),
            ),
        ];
        let mut files = vec!["docker-compose.yml"];
        if cluster {
            files.push("docker-compose.cluster.yml");
            env.push((
                "HEADROOM_NATS_URLS".to_owned(),
                "nats://nats:4222,nats://nats-2:4222,nats://nats-3:4222".to_owned(),
            ));
            env.push(("HEADROOM_NATS_REPLICAS".to_owned(), "3".to_owned()));
        }
        let stack = Self {
            project,
            files,
            env,
            nats_port,
            frontend_ports,
            monitor_port,
        };
        stack.compose(&["up", "-d", "--no-build"]);
        stack
    }

    fn command(&self, args: &[&str]) -> Command {
        // Compose v2 (`docker compose`) when there is one, else v1.
        let v2 = Command::new("docker")
            .args(["compose", "version"])
            .output()
            .is_ok_and(|o| o.status.success());
        let mut command = if v2 {
            let mut c = Command::new("docker");
            c.arg("compose");
            c
        } else {
            Command::new("docker-compose")
        };
        command.current_dir(format!("{ROOT}/.."));
        command.arg("-p").arg(&self.project);
        for file in &self.files {
            command.arg("-f").arg(file);
        }
        command.args(args);
        for (k, v) in &self.env {
            command.env(k, v);
        }
        command
    }

    /// Runs `docker-compose <args>` for this project; panics with its
    /// output when it fails.
    fn compose(&self, args: &[&str]) -> String {
        let out = self.command(args).output().expect("docker-compose runs");
        assert!(
            out.status.success(),
            "docker-compose {args:?} failed:\n{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn logs(&self, service: &str) -> String {
        let out = self
            .command(&["logs", "--no-color", "--tail", "40", service])
            .output();
        out.map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default()
    }

    async fn operator(&self) -> async_nats::Client {
        let password = passwords()
            .remove("HEADROOM_OPERATOR_PASSWORD")
            .expect("operator password");
        self.client_as("operator", &password).await
    }

    async fn client_as(&self, user: &str, password: &str) -> async_nats::Client {
        let url = format!("nats://127.0.0.1:{}", self.nats_port);
        let client = eventually(Duration::from_secs(60), || async {
            async_nats::ConnectOptions::with_user_and_password(user.into(), password.into())
                .connect(&url)
                .await
                .ok()
        })
        .await;
        client.unwrap_or_else(|| panic!("NATS at {url} as {user}\n{}", self.logs("nats")))
    }

    fn target(&self, frontend: usize) -> Target {
        Target {
            base: format!("http://127.0.0.1:{}", self.frontend_ports[frontend]),
            paths: vec!["/api/item".to_owned()],
            timeout: Duration::from_secs(10),
            max_in_flight: 4096,
        }
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        // Torn down even when the test failed.
        let _ = self
            .command(&["down", "-v", "--remove-orphans", "-t", "5"])
            .output();
    }
}

async fn record(js: &jetstream::Context) -> Option<ClusterRecord> {
    let bucket = js.get_key_value(CLUSTERS_BUCKET).await.ok()?;
    let entry = bucket.get("web").await.ok()??;
    Codec::MsgPack.decode(&entry).ok()
}

fn active(record: &ClusterRecord) -> Vec<ServerId> {
    record
        .members
        .iter()
        .filter(|m| m.state == MemberState::Active)
        .map(|m| m.server.clone())
        .collect()
}

/// Waits until cluster `web` has `want(active members)`, for `within`.
async fn wait_members(
    js: &jetstream::Context,
    within: Duration,
    want: impl Fn(usize) -> bool,
) -> Option<ClusterRecord> {
    eventually(within, || async {
        let record = record(js).await?;
        want(active(&record).len()).then_some(record)
    })
    .await
}

/// Plays `spec` against front-end `frontend` in the background.
fn load(stack: &Stack, frontend: usize, spec: &str) -> tokio::task::JoinHandle<Summary> {
    let profile = Profile::parse(spec).expect("profile");
    let target = stack.target(frontend);
    tokio::spawn(async move { headroom_loadgen::run(&profile, &target, None).await })
}

/// The audit log so far.
async fn audit(js: &jetstream::Context) -> Vec<AuditEvent> {
    let Ok(stream) = js.get_stream(subjects::EVENTS_STREAM).await else {
        return Vec::new();
    };
    let Ok(consumer) = stream
        .create_consumer(jetstream::consumer::pull::OrderedConfig::default())
        .await
    else {
        return Vec::new();
    };
    let Ok(mut messages) = consumer.messages().await else {
        return Vec::new();
    };
    let mut events = Vec::new();
    while let Ok(Some(Ok(message))) =
        tokio::time::timeout(Duration::from_millis(500), messages.next()).await
    {
        if let Ok(event) = codec::decode::<AuditEvent>(message.headers.as_ref(), &message.payload) {
            events.push(event);
        }
    }
    events
}

fn servers() -> Vec<ServerId> {
    (1..=4)
        .map(|n| ServerId::new(format!("backend-{n}")).expect("id"))
        .collect()
}

/// Every server in exactly one place, once nothing is in flight.
async fn invariants_hold(js: &jetstream::Context) {
    let settled = eventually(Duration::from_secs(60), || async {
        let snapshot = Snapshot::read(js).await;
        snapshot.settled().then_some(snapshot)
    })
    .await
    .expect("the stack settles");
    settled
        .check_invariants(&servers())
        .unwrap_or_else(|err| panic!("KV invariants: {err}"));
}

/// No request was applied twice: one allocation or return to the pool per
/// (request, server), however often a request was delivered.
fn applied_once(events: &[AuditEvent]) {
    let mut seen = std::collections::HashSet::new();
    for event in events {
        if matches!(event.kind, EventKind::Allocated | EventKind::Released) {
            let key = (
                event.kind.token(),
                event.request.clone(),
                event.server.clone(),
            );
            assert!(seen.insert(key), "applied twice: {event:?}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_stack_scales_survives_crashes_and_keeps_agents_in_their_place() {
    if !enabled() {
        return;
    }
    let stack = Stack::up(false);
    let operator = stack.operator().await;
    let js = jetstream::new(operator.clone());
    let started = Instant::now();

    // Up: the cluster at its minimum, both front-ends serving it.
    let first = wait_members(&js, Duration::from_secs(120), |n| n == 1)
        .await
        .unwrap_or_else(|| panic!("cluster web at its minimum\n{}", stack.logs("allocator")));
    for frontend in 0..2 {
        let served = load(&stack, frontend, "hold:5:1s").await.expect("load");
        assert_eq!(served.errors(), 0, "front-end {frontend}: {served:?}");
    }
    eprintln!("stack up in {:?}", started.elapsed());

    // 1. Load: scale up, then down, then the released servers come back.
    let rise = load(&stack, 0, "ramp:10-200:10s,hold:200:25s");
    let grown = wait_members(&js, Duration::from_secs(40), |n| n >= 3)
        .await
        .unwrap_or_else(|| panic!("scaled up under load\n{}", stack.logs("monitor")));
    let summary = rise.await.expect("load");
    assert_eq!(
        summary.errors(),
        0,
        "nothing failed while scaling up: {summary:?}"
    );
    let quiet = load(&stack, 1, "hold:10:40s");
    let shrunk = wait_members(&js, Duration::from_secs(40), |n| n == 1).await;
    assert!(
        shrunk.is_some(),
        "scaled down after the load\n{}",
        stack.logs("monitor")
    );
    let released: Vec<ServerId> = active(&grown)
        .into_iter()
        .filter(|s| shrunk.as_ref().is_some_and(|r| !active(r).contains(s)))
        .collect();
    let pooled = eventually(Duration::from_secs(30), || async {
        let snapshot = Snapshot::read(&js).await;
        released
            .iter()
            .all(|s| {
                snapshot
                    .servers
                    .get(s)
                    .is_some_and(|(r, _)| r.state == ServerState::Free)
            })
            .then_some(())
    })
    .await;
    assert!(
        pooled.is_some(),
        "released servers back in the pool: {released:?}"
    );
    quiet.abort();
    let again = load(&stack, 0, "ramp:10-200:6s,hold:200:20s");
    let regrown = wait_members(&js, Duration::from_secs(40), |n| n >= 2)
        .await
        .expect("grew again on the next rise");
    assert!(
        active(&regrown).iter().any(|s| released.contains(s)),
        "a released server re-allocated: released {released:?}, now {:?}",
        active(&regrown)
    );

    // 2. A server dies (its backend and agent containers killed) while
    // serving: it is replaced from the pool and the front-ends stop
    // sending to it.
    let victim = active(&regrown)
        .into_iter()
        .find(|s| s != &first.members[0].server)
        .unwrap_or_else(|| active(&regrown)[0].clone());
    let n = victim.as_str().trim_start_matches("backend-").to_owned();
    stack.compose(&["kill", &format!("backend-{n}"), &format!("agent-{n}")]);
    let replaced = eventually(Duration::from_secs(40), || async {
        let snapshot = Snapshot::read(&js).await;
        let out = snapshot
            .servers
            .get(&victim)
            .is_some_and(|(r, _)| matches!(r.state, ServerState::OutOfService { .. }));
        (out && !active(snapshot.cluster("web")).contains(&victim)).then_some(())
    })
    .await;
    assert!(
        replaced.is_some(),
        "{victim} taken out and replaced\n{}",
        stack.logs("monitor")
    );
    let summary = again.await.expect("load");
    let after = load(&stack, 1, "hold:50:5s").await.expect("load");
    assert_eq!(
        after.errors(),
        0,
        "no request reaches the dead server: {after:?}"
    );
    eprintln!("while the server died: {summary:?}");

    // 3. The allocator and the monitor killed and restarted under load:
    // they resume, KV stays consistent, nothing is applied twice.
    let busy = load(&stack, 0, "ramp:10-200:8s,hold:200:10s,hold:10:20s");
    tokio::time::sleep(Duration::from_secs(6)).await;
    stack.compose(&["kill", "allocator", "monitor"]);
    tokio::time::sleep(Duration::from_secs(2)).await;
    stack.compose(&["start", "allocator", "monitor"]);
    let summary = busy.await.expect("load");
    assert_eq!(
        summary.failed, 0,
        "the front-ends kept serving: {summary:?}"
    );
    invariants_hold(&js).await;
    applied_once(&audit(&js).await);
    // Every request in the stream got exactly one outcome.
    let stream = js
        .get_stream(subjects::RECONFIG_STREAM)
        .await
        .expect("stream");
    let consumer = stream
        .get_consumer::<jetstream::consumer::pull::Config>(subjects::ALLOCATOR_CONSUMER)
        .await;
    let pending = eventually(Duration::from_secs(60), || async {
        let mut consumer = consumer.as_ref().ok()?.clone();
        let info = consumer.info().await.ok()?;
        (info.num_pending == 0 && info.num_ack_pending == 0).then_some(())
    })
    .await;
    assert!(
        pending.is_some(),
        "every request applied after the restarts"
    );

    // 4. An agent's user cannot ask for a reconfiguration nor write KV.
    let agent = stack
        .client_as(
            "agent",
            &passwords()
                .remove("HEADROOM_AGENT_PASSWORD")
                .expect("agent password"),
        )
        .await;
    let (asked, wrote) = common::act_as_intruder(agent, "backend-1").await;
    assert!(
        asked.is_err(),
        "an agent's reconfiguration request is refused"
    );
    assert!(wrote.is_err(), "an agent's KV write is refused");
    eprintln!("single-node stack tests took {:?}", started.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_three_nats_nodes_one_can_stop_and_rejoin() {
    if !enabled() {
        return;
    }
    let stack = Stack::up(true);
    let operator = stack.operator().await;
    let js = jetstream::new(operator.clone());
    wait_members(&js, Duration::from_secs(120), |n| n == 1)
        .await
        .unwrap_or_else(|| panic!("cluster web at its minimum\n{}", stack.logs("allocator")));
    let routes = || async {
        let url = format!("http://127.0.0.1:{}/routez", stack.monitor_port);
        let body = headroom_shared::http_client::call("GET", &url, None, Duration::from_secs(2))
            .await
            .ok()?;
        let value: serde_json::Value = serde_json::from_slice(&body).ok()?;
        value["num_routes"].as_u64()
    };
    assert!(
        eventually(Duration::from_secs(30), || async {
            routes().await.filter(|n| *n >= 2)
        })
        .await
        .is_some(),
        "three nodes routed"
    );

    // One node stops: scaling and serving go on.
    stack.compose(&["stop", "-t", "2", "nats-2"]);
    let rise = load(&stack, 0, "ramp:10-200:8s,hold:200:20s");
    let grown = wait_members(&js, Duration::from_secs(40), |n| n >= 2).await;
    assert!(
        grown.is_some(),
        "scaled up with a node down\n{}",
        stack.logs("monitor")
    );
    let summary = rise.await.expect("load");
    assert_eq!(summary.failed, 0, "served with a node down: {summary:?}");

    // It rejoins when started.
    stack.compose(&["start", "nats-2"]);
    let rejoined = eventually(Duration::from_secs(60), || async {
        routes().await.filter(|n| *n >= 2)
    })
    .await;
    assert!(
        rejoined.is_some(),
        "nats-2 rejoined\n{}",
        stack.logs("nats-2")
    );
    invariants_hold(&js).await;
}
