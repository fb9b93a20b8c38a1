//! The front-end in front of real sample backends over HTTP, following a
//! cluster that a real allocator changes, on a real nats-server.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use headroom_backend::Backend;
use headroom_frontend::{Frontend, Proxy};
use headroom_shared::codec::{self, Codec};
use headroom_shared::config::{BackendConfig, Config};
use headroom_shared::records::{Balance, ClusterPolicy, Route};
use headroom_shared::subjects;
use headroom_shared::wire::{
    DrainMember, DrainQueued, FrontendApplied, ReconfigAction, ReconfigRequest, RegisterServer,
};
use headroom_shared::{bus, SCHEMA_VERSION};
use headroom_tests::eventually;
use http::{HeaderMap, Request, StatusCode};
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use crate::common::{admin, cid, put_cluster, sid, Snapshot, Stack, WAIT};

type Http = Client<HttpConnector, Empty<Bytes>>;

pub struct Site {
    pub stack: Stack,
    pub backends: Vec<Backend>,
    pub addr: std::net::SocketAddr,
    pub proxy: Arc<Proxy>,
    pub shutdown: CancellationToken,
    pub dir: tempfile::TempDir,
    pub http: Http,
    pub config: Config,
    /// The front-end's health and metrics.
    pub ops: Arc<headroom_shared::ops::Ops>,
}

pub fn route(t: &str, prefix: &str, balance: Balance) -> Route {
    Route {
        request_type: t.to_owned(),
        path_prefix: Some(prefix.to_owned()),
        host: None,
        methods: Vec::new(),
        balance,
    }
}

pub async fn backend(name: &str, shutdown: &CancellationToken) -> Backend {
    Backend::start(
        BackendConfig {
            name: name.to_owned(),
            listen: "127.0.0.1:0".to_owned(),
            size: 64,
            ..BackendConfig::default()
        },
        shutdown.clone(),
    )
    .await
    .expect("backend")
}

pub async fn register(client: &async_nats::Client, backend: &Backend, types: &[&str]) {
    let _: headroom_shared::records::ServerRecord = admin(
        client,
        subjects::admin::POOL_REGISTER,
        &RegisterServer {
            v: SCHEMA_VERSION,
            id: sid(&backend.name),
            address: backend.addr.ip().to_string(),
            port: backend.addr.port(),
            request_types: types.iter().map(|t| (*t).to_owned()).collect(),
        },
        Codec::MsgPack,
    )
    .await
    .expect("register");
}

impl Site {
    /// An allocator, the named backends in the pool, cluster `web` with
    /// `policy`, and a front-end for it.
    pub async fn start(backends: &[(&str, &[&str])], policy: ClusterPolicy) -> Self {
        Self::start_with(backends, policy, |_| {}).await
    }

    /// As [`Site::start`], with the front-end's configuration changed by
    /// `configure`. The periodic KV check is an hour away unless it says
    /// otherwise, so the tests see changes arrive on the membership subject.
    pub async fn start_with(
        backends: &[(&str, &[&str])],
        policy: ClusterPolicy,
        configure: impl FnOnce(&mut Config),
    ) -> Self {
        let stack = Stack::start().await;
        let shutdown = CancellationToken::new();
        let mut started = Vec::new();
        for (name, types) in backends {
            let b = backend(name, &shutdown).await;
            register(&stack.client, &b, types).await;
            started.push(b);
        }
        put_cluster(&stack.client, "web", policy)
            .await
            .expect("cluster");
        let dir = tempfile::tempdir().expect("temp dir");
        let mut config = stack.nats.config();
        config.frontend.cluster = "web".to_owned();
        config.frontend.instance = "fe-1".to_owned();
        config.frontend.listen = "127.0.0.1:0".to_owned();
        config.frontend.last_known_good = Some(dir.path().join("routing.json"));
        config.frontend.slow_start = Duration::ZERO;
        config.frontend.eject_for = Duration::from_secs(30);
        config.frontend.report_interval = Duration::from_millis(200);
        config.frontend.header_timeout = Duration::from_secs(1);
        config.frontend.max_body_bytes = 1 << 20;
        config.frontend.resync_interval = Duration::from_secs(3600);
        configure(&mut config);
        let frontend = Frontend::bind(config.clone()).await.expect("bind");
        let addr = frontend.local_addr().expect("addr");
        let proxy = frontend.proxy();
        let ops = frontend.ops();
        tokio::spawn(frontend.serve(shutdown.clone()));
        let site = Self {
            ops,
            stack,
            backends: started,
            addr,
            proxy,
            shutdown,
            dir,
            http: Client::builder(TokioExecutor::new()).build(HttpConnector::new()),
            config,
        };
        site.wait_in_step().await;
        site
    }

    /// Waits until the front-end routes with the cluster's current record.
    pub async fn wait_in_step(&self) {
        let js = self.stack.js.clone();
        let done = eventually(WAIT, || async {
            let bucket = js
                .get_key_value(headroom_shared::kv::CLUSTERS_BUCKET)
                .await
                .ok()?;
            let entry = bucket.get("web").await.ok()??;
            let record: headroom_shared::records::ClusterRecord =
                Codec::MsgPack.decode(&entry).ok()?;
            let settled = record
                .members
                .iter()
                .all(|m| m.state == headroom_shared::records::MemberState::Active);
            let table = self.proxy.table.load_full()?;
            (settled && table.generation == record.generation).then_some(())
        })
        .await;
        assert!(
            done.is_some(),
            "the front-end caught up with the cluster record"
        );
    }

    pub async fn get(&self, path: &str) -> (StatusCode, HeaderMap, Bytes) {
        let request = Request::get(format!("http://{}{path}", self.addr))
            .body(Empty::new())
            .expect("request");
        let response = tokio::time::timeout(WAIT, self.http.request(request))
            .await
            .expect("answer in time")
            .expect("answer");
        let (parts, body) = response.into_parts();
        let body = body.collect().await.expect("body").to_bytes();
        (parts.status, parts.headers, body)
    }

    pub fn backend(&self, name: &str) -> &Backend {
        self.backends
            .iter()
            .find(|b| b.name == name)
            .expect("backend")
    }
}

fn served_by(headers: &HeaderMap) -> String {
    headers
        .get("x-backend")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned()
}

/// No routes: every request is one type, every member serves it.
fn any_type() -> ClusterPolicy {
    ClusterPolicy {
        routes: Vec::new(),
        ..two_types()
    }
}

fn two_types() -> ClusterPolicy {
    ClusterPolicy {
        min_size: 2,
        max_size: 4,
        routes: vec![
            route("static", "/static/", Balance::Hash),
            route("api", "/api/", Balance::LeastRequests),
        ],
        drain_timeout_ms: 2_000,
        ..ClusterPolicy::default()
    }
}

#[tokio::test]
async fn it_says_which_generation_it_routes_by_when_it_applies_one() {
    let site = Site::start(&[("g1", &[]), ("g2", &[])], any_type()).await;
    let mut said = site
        .stack
        .client
        .subscribe(subjects::FRONTEND_APPLIED_ALL)
        .await
        .expect("subscribe");
    // A change: a third server, and the minimum raised to take it.
    let third = backend("g3", &site.shutdown).await;
    register(&site.stack.client, &third, &[]).await;
    put_cluster(
        &site.stack.client,
        "web",
        ClusterPolicy {
            min_size: 3,
            ..any_type()
        },
    )
    .await
    .expect("policy");
    let grown = eventually(WAIT, || async {
        let snapshot = Snapshot::read(&site.stack.js).await;
        (snapshot.active_members("web").len() == 3).then(|| snapshot.cluster("web").generation)
    })
    .await
    .expect("three members");
    let heard = tokio::time::timeout(WAIT, async {
        while let Some(message) = said.next().await {
            let applied: Option<FrontendApplied> =
                codec::decode(message.headers.as_ref(), &message.payload).ok();
            if let Some(applied) = applied.filter(|a| a.generation >= grown) {
                return Some((message.subject, applied));
            }
        }
        None
    })
    .await
    .ok()
    .flatten();
    let (subject, applied) = heard.expect("the front-end said it applied the new generation");
    assert_eq!(
        subject.as_str(),
        subjects::frontend_applied(&cid("web"), "fe-1")
    );
    assert_eq!(
        (applied.cluster, applied.frontend.as_str()),
        (cid("web"), "fe-1")
    );
    let table = site.proxy.table.load_full().expect("a table");
    assert_eq!(applied.generation, table.generation, "what its table holds");
    site.shutdown.cancel();
}

#[tokio::test]
async fn requests_of_each_type_go_to_the_members_that_serve_it() {
    let site = Site::start(
        &[("b-static", &["static"]), ("b-api", &["api"])],
        two_types(),
    )
    .await;
    for i in 0..40 {
        let (status, headers, _) = site.get(&format!("/api/items/{i}")).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(served_by(&headers), "b-api");
        let (status, headers, _) = site.get(&format!("/static/{i}.css")).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(served_by(&headers), "b-static");
    }
    let (status, _, body) = site.get("/elsewhere").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(body, "no route for this request\n");
    site.shutdown.cancel();
}

#[tokio::test]
async fn a_cacheable_get_is_answered_from_the_cache_the_second_time() {
    let site = Site::start(
        &[("b1", &["static", "api"]), ("b2", &["static", "api"])],
        two_types(),
    )
    .await;
    let (status, first, body) = site.get("/static/logo.png").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        first.get("x-cache").map(|v| v.as_bytes()),
        Some(&b"miss"[..])
    );
    let (status, second, again) = site.get("/static/logo.png").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        second.get("x-cache").map(|v| v.as_bytes()),
        Some(&b"hit"[..])
    );
    assert_eq!(body, again);
    let asked: u64 = site.backends.iter().map(Backend::requests).sum();
    assert_eq!(asked, 1, "the backends saw one request");
    // Not cacheable (the backend says no-store): both reach a backend.
    site.get("/api/x").await;
    site.get("/api/x").await;
    let asked: u64 = site.backends.iter().map(Backend::requests).sum();
    assert_eq!(asked, 3);
    site.shutdown.cancel();
}

#[tokio::test]
async fn a_reweight_shifts_the_share_of_traffic_as_asked() {
    let policy = ClusterPolicy {
        routes: Vec::new(),
        ..two_types()
    };
    let site = Site::start(&[("b1", &[]), ("b2", &[])], policy).await;
    let request = ReconfigRequest::new(
        cid("web"),
        ReconfigAction::Reweight {
            server: sid("b2"),
            weight: 0.25,
        },
        "test",
    );
    bus::request_reconfig(&site.stack.js, &request)
        .await
        .expect("request");
    let applied = eventually(WAIT, || async {
        let snapshot = crate::common::Snapshot::read(&site.stack.js).await;
        let b2 = snapshot
            .cluster("web")
            .members
            .iter()
            .find(|m| m.server.as_str() == "b2")?;
        (b2.weight == 0.25).then_some(())
    })
    .await;
    assert!(applied.is_some(), "the allocator applied the reweight");
    site.wait_in_step().await;
    let before = site.backend("b2").requests();
    let total = 2_000u64;
    for i in 0..total {
        let (status, _, _) = site.get(&format!("/r/{i}")).await;
        assert_eq!(status, StatusCode::OK);
    }
    let share = (site.backend("b2").requests() - before) as f64 / total as f64;
    // 0.25 / (1 + 0.25) = 20 %.
    assert!(
        (0.16..=0.24).contains(&share),
        "b2 got {share:.3} of the traffic"
    );
    site.shutdown.cancel();
}

#[tokio::test]
async fn a_killed_backend_is_retried_around_and_ejected() {
    let policy = ClusterPolicy {
        min_size: 3,
        routes: Vec::new(),
        ..two_types()
    };
    let site = Site::start(&[("b1", &[]), ("b2", &[]), ("b3", &[])], policy).await;
    for i in 0..30 {
        site.get(&format!("/warm/{i}")).await;
    }
    site.backend("b2").stop();
    let before = site.backend("b2").requests();
    for i in 0..200 {
        let (status, headers, _) = site.get(&format!("/after/{i}")).await;
        assert_eq!(status, StatusCode::OK, "request {i} failed");
        assert_ne!(served_by(&headers), "b2");
    }
    assert_eq!(site.backend("b2").requests(), before);
    assert!(
        site.proxy.counters.retries.load(Ordering::Relaxed) >= 1,
        "some were retried"
    );
    let table = site.proxy.table.load_full().expect("table");
    let b2 = table
        .backends
        .iter()
        .find(|b| b.server.as_str() == "b2")
        .expect("still a member");
    assert!(b2.is_ejected(headroom_shared::time::now_ms()), "ejected");
    site.shutdown.cancel();
}

#[tokio::test]
async fn membership_changes_under_load_fail_no_request_and_a_drained_member_gets_nothing_new() {
    let policy = ClusterPolicy {
        min_size: 2,
        max_size: 4,
        routes: Vec::new(),
        drain_timeout_ms: 1_000,
        ..ClusterPolicy::default()
    };
    let site = Arc::new(
        Site::start(
            &[("b1", &[]), ("b2", &[]), ("b3", &[]), ("b4", &[])],
            policy,
        )
        .await,
    );
    // Load: 8 clients in a loop, some requests slow enough to be in flight
    // when their member starts draining.
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let mut clients = Vec::new();
    for c in 0..8 {
        let (site, stop, ok, failed) = (site.clone(), stop.clone(), ok.clone(), failed.clone());
        clients.push(tokio::spawn(async move {
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let cost = if i.is_multiple_of(5) { 30 } else { 0 };
                let (status, _, _) = site.get(&format!("/load/{c}/{i}?cost_ms={cost}")).await;
                let counter = if status == StatusCode::OK {
                    &ok
                } else {
                    &failed
                };
                counter.fetch_add(1, Ordering::Relaxed);
                i += 1;
            }
        }));
    }
    let js = &site.stack.js;
    tokio::time::sleep(Duration::from_millis(300)).await;
    // Grow by two.
    let grow = ReconfigRequest::new(
        cid("web"),
        ReconfigAction::Allocate {
            count: 2,
            request_type: None,
        },
        "test",
    );
    bus::request_reconfig(js, &grow).await.expect("grow");
    crate::common::wait_outcome(js, &grow.id).await;
    site.wait_in_step().await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    // Drain one, and note the generation that stopped routing to it.
    let members = crate::common::Snapshot::read(js)
        .await
        .active_members("web");
    let victim = members[0].clone();
    let _: DrainQueued = admin(
        &site.stack.client,
        subjects::admin::MEMBER_DRAIN,
        &DrainMember {
            v: SCHEMA_VERSION,
            cluster: cid("web"),
            server: victim.clone(),
        },
        Codec::MsgPack,
    )
    .await
    .expect("drain");
    let drain_generation = eventually(WAIT, || async {
        let table = site.proxy.table.load_full()?;
        (!table.backends.iter().any(|b| b.server == victim)).then_some(table.generation)
    })
    .await
    .expect("the front-end stopped routing to the drained member");
    // It finishes draining and is removed.
    let gone = eventually(WAIT, || async {
        let snapshot = crate::common::Snapshot::read(js).await;
        (!snapshot
            .cluster("web")
            .members
            .iter()
            .any(|m| m.server == victim))
        .then_some(())
    })
    .await;
    assert!(gone.is_some(), "the drained member left the cluster");
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        c.await.expect("client");
    }
    assert_eq!(
        failed.load(Ordering::Relaxed),
        0,
        "no request failed ({} ok)",
        ok.load(Ordering::Relaxed)
    );
    assert!(ok.load(Ordering::Relaxed) > 100);
    let drained = site.backend(victim.as_str()).seen();
    let late: Vec<_> = drained
        .iter()
        .filter(|s| s.generation.is_some_and(|g| g >= drain_generation))
        .collect();
    assert!(
        late.is_empty(),
        "requests routed to {victim} after its drain began: {late:?}"
    );
    assert!(!drained.is_empty(), "it served before the drain");
    site.shutdown.cancel();
}

#[tokio::test]
async fn started_without_nats_it_serves_from_the_last_known_good_file() {
    let site = Site::start(&[("b1", &[]), ("b2", &[])], any_type()).await;
    let file = site.dir.path().join("routing.json");
    let written = std::fs::read_to_string(&file).expect("last known good file written");
    assert!(written.contains("\"servers\""), "{written}");
    // A second front-end, with NATS unreachable and the same file.
    let mut config = site.config.clone();
    config.nats.url = "nats://127.0.0.1:1".to_owned();
    config.frontend.instance = "fe-2".to_owned();
    let frontend = Frontend::bind(config).await.expect("bind");
    let addr = frontend.local_addr().expect("addr");
    let proxy = frontend.proxy();
    let shutdown = CancellationToken::new();
    tokio::spawn(frontend.serve(shutdown.clone()));
    assert!(
        proxy.from_file.load(Ordering::Relaxed),
        "says it serves from the file"
    );
    for i in 0..20 {
        let request = Request::get(format!("http://{addr}/x/{i}"))
            .body(Empty::new())
            .expect("request");
        let response = site.http.request(request).await.expect("answer");
        assert_eq!(response.status(), StatusCode::OK);
    }
    shutdown.cancel();
    site.shutdown.cancel();
}

async fn raw(addr: std::net::SocketAddr, bytes: &[u8]) -> String {
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    stream.write_all(bytes).await.expect("write");
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut answer)).await;
    String::from_utf8_lossy(&answer).into_owned()
}

#[tokio::test]
async fn oversized_headers_slow_clients_and_garbage_get_clear_errors() {
    let mut policy = ClusterPolicy {
        routes: Vec::new(),
        ..two_types()
    };
    policy.min_size = 1;
    let site = Site::start(&[("b1", &[])], policy).await;
    // Garbage on the socket.
    let answer = raw(site.addr, b"\x16\x03\x01\x02\x00garbage\r\n\r\n").await;
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer:?}");
    // Headers over the limit.
    let big = format!(
        "GET / HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n",
        "a".repeat(64 * 1024)
    );
    let answer = raw(site.addr, big.as_bytes()).await;
    assert!(answer.starts_with("HTTP/1.1 431"), "{:?}", answer.get(..40));
    // A body over the limit is refused before it is read.
    let huge = format!(
        "POST /x HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n",
        1u64 << 40
    );
    let answer = raw(site.addr, huge.as_bytes()).await;
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer:?}");
    assert!(answer.contains("request body too large"));
    // A chunked body gives no length up front: it goes to the member as it
    // comes, until it passes the limit. That is the client's doing, so a
    // 413, and nothing is held against the member.
    let mut stream = TcpStream::connect(site.addr).await.expect("connect");
    let (mut reader, mut writer) = stream.split();
    let send = async {
        let chunk = vec![b'a'; 2 << 20];
        let _ = writer
            .write_all(
                b"POST /x HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n200000\r\n",
            )
            .await;
        let _ = writer.write_all(&chunk).await;
        let _ = writer.write_all(b"\r\n0\r\n\r\n").await;
    };
    let receive = async {
        let mut answer = Vec::new();
        let mut buf = [0u8; 4096];
        while !answer.windows(4).any(|w| w == b"\r\n\r\n") {
            match reader.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => answer.extend_from_slice(&buf[..n]),
            }
        }
        String::from_utf8_lossy(&answer).into_owned()
    };
    let ((), answer) = tokio::time::timeout(Duration::from_secs(10), async {
        tokio::join!(send, receive)
    })
    .await
    .expect("an answer");
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer:?}");
    let table = site.proxy.table.load_full().expect("table");
    assert!(table
        .backends
        .iter()
        .all(|b| b.errors.load(Ordering::Relaxed) == 0));
    // A slow client that never finishes its headers holds nothing up, and
    // is cut off after the header timeout (1 s here).
    let mut slow = TcpStream::connect(site.addr).await.expect("connect");
    let opened = std::time::Instant::now();
    slow.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n")
        .await
        .expect("write");
    let (status, _, _) = site.get("/still-serving").await;
    assert_eq!(status, StatusCode::OK);
    let mut rest = Vec::new();
    // Closed or reset (the kernel resets a socket closed with unread
    // bytes): either way, cut off.
    let _cut = tokio::time::timeout(Duration::from_secs(5), slow.read_to_end(&mut rest))
        .await
        .expect("the slow client was cut off");
    assert!(
        opened.elapsed() >= Duration::from_millis(900),
        "not before the timeout"
    );
    // The header timeout also closes idle keep-alive connections, so ask
    // on a new one.
    let fresh: Http = Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(0)
        .build(HttpConnector::new());
    let request = Request::get(format!("http://{}/still-serving", site.addr))
        .body(Empty::new())
        .expect("request");
    let response = fresh.request(request).await.expect("answer");
    assert_eq!(response.status(), StatusCode::OK);
    site.shutdown.cancel();
}

#[tokio::test]
async fn it_speaks_http2_and_reports_what_it_sees_of_each_backend() {
    let site = Site::start(&[("b1", &[]), ("b2", &[])], any_type()).await;
    let mut reports = site
        .stack
        .client
        .subscribe("headroom.metrics.web.*")
        .await
        .expect("subscribe");
    let mut own = site
        .stack
        .client
        .subscribe(subjects::frontend_stats(&cid("web"), "fe-1"))
        .await
        .expect("subscribe");
    let h2: Http = Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build(HttpConnector::new());
    for i in 0..50 {
        let request = Request::get(format!("http://{}/h2/{i}", site.addr))
            .body(Empty::new())
            .expect("request");
        let response = h2.request(request).await.expect("answer");
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(response.version(), http::Version::HTTP_2);
    }
    let mut seen = None;
    for _ in 0..100 {
        let message = tokio::time::timeout(WAIT, reports.next())
            .await
            .expect("a report in time")
            .expect("open");
        let report: headroom_shared::wire::PerformanceReport =
            headroom_shared::codec::decode(message.headers.as_ref(), &message.payload)
                .expect("report");
        let from_outside = report.source
            == headroom_shared::wire::ReportSource::Frontend {
                frontend: "fe-1".to_owned(),
            };
        if from_outside && report.requests_per_s.is_some_and(|r| r > 0.0) {
            seen = Some(report);
            break;
        }
    }
    let seen = seen.expect("a report about a backend, from the front-end");
    assert!(report_is_valid(&seen), "{seen:?}");
    assert!(seen.latency_p99_ms.is_some() && seen.in_flight.is_some());
    let message = tokio::time::timeout(WAIT, own.next())
        .await
        .expect("own report")
        .expect("open");
    let report: headroom_shared::wire::PerformanceReport =
        headroom_shared::codec::decode(message.headers.as_ref(), &message.payload).expect("report");
    assert_eq!(report.server.as_str(), "fe-1");
    site.shutdown.cancel();
}

fn report_is_valid(report: &headroom_shared::wire::PerformanceReport) -> bool {
    report.validate().is_ok()
}

/// Moves the `web` record on by `generations` in one compare-and-set
/// (changes this front-end never saw) and returns it and its revision.
async fn jump_generations(
    site: &Site,
    generations: u64,
) -> (headroom_shared::records::ClusterRecord, u64) {
    let bucket = site
        .stack
        .js
        .get_key_value(headroom_shared::kv::CLUSTERS_BUCKET)
        .await
        .expect("bucket");
    let entry = bucket.entry("web").await.expect("read").expect("record");
    let mut record: headroom_shared::records::ClusterRecord =
        Codec::MsgPack.decode(&entry.value).expect("record");
    record.generation += generations;
    let revision = bucket
        .update(
            "web",
            Codec::MsgPack.encode(&record).expect("encode"),
            entry.revision,
        )
        .await
        .expect("compare-and-set");
    (record, revision)
}

async fn caught_up(site: &Site, generation: u64) -> bool {
    eventually(WAIT, || async {
        let table = site.proxy.table.load_full()?;
        (table.generation == generation).then_some(())
    })
    .await
    .is_some()
}

#[tokio::test]
async fn a_gap_in_membership_generations_resynchronises_from_the_snapshot() {
    let site = Site::start(&[("b1", &[]), ("b2", &[])], any_type()).await;
    let (record, revision) = jump_generations(&site, 5).await;
    // Only the last change's message arrives.
    let change = headroom_shared::wire::MembershipChange::of(&record, revision, None);
    site.stack
        .client
        .publish_with_headers(
            subjects::membership(&record.id),
            Codec::MsgPack.headers(),
            Codec::MsgPack.encode(&change).expect("encode"),
        )
        .await
        .expect("publish");
    assert!(
        caught_up(&site, record.generation).await,
        "the front-end caught up"
    );
    assert!(
        site.proxy.counters.resyncs.load(Ordering::Relaxed) >= 1,
        "it noticed the gap and resynchronised from the snapshot"
    );
    let (status, _, _) = site.get("/after-the-gap").await;
    assert_eq!(status, StatusCode::OK);
    site.shutdown.cancel();
}

#[tokio::test]
async fn a_change_whose_message_was_lost_is_applied_at_the_periodic_check() {
    let site = Site::start_with(&[("b1", &[]), ("b2", &[])], any_type(), |config| {
        config.frontend.resync_interval = Duration::from_millis(300);
    })
    .await;
    // Written to KV, never published.
    let (record, _) = jump_generations(&site, 1).await;
    assert!(
        caught_up(&site, record.generation).await,
        "the front-end caught up"
    );
    assert!(site.proxy.counters.resyncs.load(Ordering::Relaxed) >= 1);
    site.shutdown.cancel();
}

#[tokio::test]
async fn an_expired_object_asked_for_by_many_is_fetched_once() {
    let site = Arc::new(Site::start(&[("b1", &[]), ("b2", &[])], any_type()).await);
    let path = "/static/report.pdf?cost_ms=300&max_age=1";
    let (status, _, _) = site.get(path).await;
    assert_eq!(status, StatusCode::OK);
    tokio::time::sleep(Duration::from_millis(1_100)).await;
    // Expired; 20 clients ask at once.
    let mut asks = Vec::new();
    for _ in 0..20 {
        let site = site.clone();
        asks.push(tokio::spawn(async move { site.get(path).await }));
    }
    let mut hits = 0;
    for ask in asks {
        let (status, headers, _) = ask.await.expect("client");
        assert_eq!(status, StatusCode::OK);
        if headers.get("x-cache").is_some_and(|v| v == "hit") {
            hits += 1;
        }
    }
    let asked: u64 = site.backends.iter().map(Backend::requests).sum();
    assert_eq!(asked, 2, "one fetch to fill, one to refill for everyone");
    assert_eq!(hits, 19);
    site.shutdown.cancel();
}
