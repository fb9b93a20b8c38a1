//! A dead application behind a live agent is replaced. Three servers, each
//! an application and its real agent; cluster `web` of two behind a real
//! front-end, with a real allocator (and, for the second case, a real
//! monitor). Requests flow throughout, and none fails: the front-end
//! retries a GET on another member when one refuses or resets.
//! - The application is killed: its agent cannot read its stats
//!   `agent.stats_failures` times in a row and reports the server failed;
//!   the allocator replaces it.
//! - The application still answers its stats but resets every request:
//!   only the front-ends see it fail. Every live front-end ejects it, and
//!   the monitor replaces it, naming them in its decision.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use headroom_frontend::Frontend;
use headroom_shared::ops::Ops;
use headroom_shared::records::{ClusterPolicy, ServerState};
use headroom_shared::wire::EventKind;
use headroom_shared::ServerId;
use headroom_tests::eventually;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::common::{audit_log, policy, put_cluster, sid, Snapshot, Stack, WAIT};

/// An application on its own port: answers `GET /stats` for its agent and
/// `ok` to anything else, unless `broken` (then it closes every other
/// request's connection unanswered); [`App::kill`] stops it listening.
struct App {
    addr: SocketAddr,
    broken: Arc<AtomicBool>,
    listening: JoinHandle<()>,
}

impl App {
    async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let broken = Arc::new(AtomicBool::new(false));
        let flag = broken.clone();
        let listening = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                tokio::spawn(answer(stream, flag.clone()));
            }
        });
        Self {
            addr,
            broken,
            listening,
        }
    }

    fn kill(&self) {
        self.listening.abort();
    }
}

async fn answer(mut stream: tokio::net::TcpStream, broken: Arc<AtomicBool>) {
    let mut request = Vec::new();
    let mut buf = [0u8; 2048];
    while !request.windows(4).any(|w| w == b"\r\n\r\n") {
        match stream.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => request.extend_from_slice(&buf[..n]),
        }
    }
    let stats = request.starts_with(b"GET /stats ");
    if !stats && broken.load(Ordering::SeqCst) {
        return;
    }
    let body = if stats { r#"{"in_flight":0}"# } else { "ok" };
    let head = format!(
        "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    let _ = stream.write_all(head.as_bytes()).await;
    let _ = stream.write_all(body.as_bytes()).await;
}

/// The servers, their agents, cluster `web` of two with `silent_after_ms`
/// as short as allowed, and a front-end for it, its table full.
struct Site {
    stack: Stack,
    apps: Vec<(ServerId, App)>,
    frontend: SocketAddr,
    shutdown: CancellationToken,
}

impl Site {
    async fn start() -> Self {
        let stack = Stack::start().await;
        let shutdown = CancellationToken::new();
        let mut apps = Vec::new();
        for n in 1..=3 {
            let server = sid(&format!("app-{n}"));
            let app = App::start().await;
            let mut config = stack.nats.config();
            config.agent.server = server.to_string();
            config.agent.address = app.addr.ip().to_string();
            config.agent.port = app.addr.port();
            config.agent.interval = Duration::from_millis(200);
            config.agent.stats_url = Some(format!("http://{}/stats", app.addr));
            config.agent.stats_failures = 3;
            let client = stack.nats.client().await.expect("agent connects");
            tokio::spawn(headroom_agent::run(
                config,
                client,
                Ops::new("headroom-agent"),
                shutdown.clone(),
            ));
            apps.push((server, app));
        }
        let registered = eventually(WAIT, || async {
            let snapshot = Snapshot::read(&stack.js).await;
            (snapshot.servers.len() == 3).then_some(())
        })
        .await;
        assert!(registered.is_some(), "the agents registered their servers");
        put_cluster(&stack.client, "web", Self::policy())
            .await
            .expect("cluster");
        let frontend = Self::frontend(&stack, &shutdown).await;
        Self {
            stack,
            apps,
            frontend,
            shutdown,
        }
    }

    fn policy() -> ClusterPolicy {
        let mut policy = policy(2, 3);
        policy.scaling.silent_after_ms = 1_000;
        policy
    }

    async fn frontend(stack: &Stack, shutdown: &CancellationToken) -> SocketAddr {
        let mut config = stack.nats.config();
        config.frontend.cluster = "web".to_owned();
        config.frontend.instance = "fe-1".to_owned();
        config.frontend.listen = "127.0.0.1:0".to_owned();
        config.frontend.slow_start = Duration::ZERO;
        config.frontend.report_interval = Duration::from_millis(200);
        let frontend = Frontend::bind(config).await.expect("bind");
        let addr = frontend.local_addr().expect("addr");
        let proxy = frontend.proxy();
        tokio::spawn(frontend.serve(shutdown.clone()));
        let routed = eventually(WAIT, || async {
            let table = proxy.table.load_full()?;
            (table.backends.len() == 2).then_some(())
        })
        .await;
        assert!(routed.is_some(), "the front-end routes to both members");
        addr
    }

    /// A member of `web` now.
    async fn member(&self) -> (ServerId, &App) {
        let snapshot = Snapshot::read(&self.stack.js).await;
        let server = snapshot.active_members("web")[0].clone();
        let app = self
            .apps
            .iter()
            .find(|(s, _)| *s == server)
            .map(|(_, app)| app)
            .expect("its application");
        (server, app)
    }

    /// GETs through the front-end every 20 ms until stopped: (sent, not 200).
    fn traffic(&self) -> (Arc<AtomicBool>, JoinHandle<(u64, u64)>) {
        let (stop, url) = (
            Arc::new(AtomicBool::new(false)),
            format!("http://{}/x", self.frontend),
        );
        let halt = stop.clone();
        let failed = Arc::new(AtomicU64::new(0));
        let task = tokio::spawn(async move {
            let mut sent = 0;
            while !halt.load(Ordering::SeqCst) {
                sent += 1;
                let answer =
                    headroom_shared::http_client::call("GET", &url, None, Duration::from_secs(5))
                        .await;
                if answer.is_err() {
                    failed.fetch_add(1, Ordering::SeqCst);
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            (sent, failed.load(Ordering::SeqCst))
        });
        (stop, task)
    }

    /// Waits until `server` is out of service and `web` has two active
    /// members again; how long that took from `since`.
    async fn replaced(&self, server: &ServerId, since: Instant) -> Duration {
        let done = eventually(Duration::from_secs(20), || async {
            let snapshot = Snapshot::read(&self.stack.js).await;
            let out = snapshot
                .servers
                .get(server)
                .is_some_and(|(r, _)| matches!(r.state, ServerState::OutOfService { .. }));
            let members = snapshot.active_members("web");
            (out && members.len() == 2 && !members.contains(server)).then_some(())
        })
        .await;
        assert!(done.is_some(), "{server} replaced");
        since.elapsed()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_application_behind_a_live_agent_is_replaced_and_no_request_fails() {
    let site = Site::start().await;
    let (server, app) = site.member().await;
    let (stop, traffic) = site.traffic();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let killed = Instant::now();
    app.kill();
    let took = site.replaced(&server, killed).await;
    stop.store(true, Ordering::SeqCst);
    let (sent, failed) = traffic.await.expect("traffic");
    println!(
        "{server}'s application killed: replaced in {took:?}; {sent} requests, {failed} failed"
    );
    // Three stats reads 200 ms apart, then the allocator's replacement.
    assert!(
        took < Duration::from_secs(5),
        "replaced within the configured time: {took:?}"
    );
    assert_eq!(failed, 0, "no request failed of {sent}");
    // Replaced on its agent's word, not the monitor's.
    let snapshot = Snapshot::read(&site.stack.js).await;
    let request = snapshot.servers[&server].0.last_request.clone();
    assert!(
        request
            .as_ref()
            .is_some_and(|r| r.as_str().starts_with("failed-")),
        "replaced for the failed status: {request:?}"
    );
    site.shutdown.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_application_only_the_front_ends_see_failing_is_replaced_by_the_monitor() {
    let site = Site::start().await;
    let mut config = site.stack.nats.config();
    config.monitor.evaluate_interval = Duration::from_millis(200);
    tokio::spawn(headroom_monitor::run(
        config,
        site.stack.client.clone(),
        Ops::new("headroom-monitor"),
        site.shutdown.clone(),
    ));
    let (server, app) = site.member().await;
    let (stop, traffic) = site.traffic();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let broke = Instant::now();
    app.broken.store(true, Ordering::SeqCst);
    let took = site.replaced(&server, broke).await;
    stop.store(true, Ordering::SeqCst);
    let (sent, failed) = traffic.await.expect("traffic");
    println!(
        "{server}'s application resets every request, its stats fine: replaced in {took:?}; \
         {sent} requests, {failed} failed"
    );
    assert_eq!(failed, 0, "no request failed of {sent}");
    // The decision names the front-end that ejected it, and since when.
    let decided = audit_log(&site.stack.js)
        .await
        .into_iter()
        .find(|e| e.kind == EventKind::Decided && e.server.as_ref() == Some(&server));
    let detail = decided.map(|e| e.detail).unwrap_or_default();
    assert!(
        detail.contains("ejected by every live front-end") && detail.contains("fe-1"),
        "the decision's evidence: {detail}"
    );
    site.shutdown.cancel();
}
