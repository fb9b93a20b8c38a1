//! Scale from zero and back, through the real services: an allocator, a
//! monitor and two front-ends in this process, sample backends over HTTP,
//! a real nats-server. A burst on a cluster with no member is held, not
//! dropped, and every request is answered once the first members are
//! active; a burst past `frontend.hold_max` gets 503s with `Retry-After`;
//! an idle cluster goes back to zero, and the next request brings it back.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use headroom_frontend::{Frontend, Proxy};
use headroom_shared::config::Config;
use headroom_shared::ops::Ops;
use headroom_shared::records::ClusterPolicy;
use headroom_tests::eventually;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tokio_util::sync::CancellationToken;

use crate::common::{put_cluster, Snapshot, Stack, WAIT};
use crate::frontend::{backend, register};

type Http = Client<HttpConnector, Empty<Bytes>>;

fn zero_policy() -> ClusterPolicy {
    headroom_tests::zero_policy(2, 3_000)
}

async fn frontend(
    stack: &Stack,
    cluster: &str,
    instance: &str,
    configure: impl FnOnce(&mut Config),
    stop: &CancellationToken,
) -> (std::net::SocketAddr, Arc<Proxy>) {
    let mut config = stack.nats.config();
    config.frontend.cluster = cluster.to_owned();
    config.frontend.instance = instance.to_owned();
    config.frontend.listen = "127.0.0.1:0".to_owned();
    config.frontend.workers = 1;
    config.frontend.pin_workers = false;
    config.frontend.cache_bytes = 0;
    config.frontend.report_interval = Duration::from_millis(500);
    config.frontend.hold_timeout = Duration::from_secs(20);
    configure(&mut config);
    let frontend = Frontend::bind(config).await.expect("bind");
    let (addr, proxy) = (frontend.local_addr().expect("addr"), frontend.proxy());
    tokio::spawn(frontend.serve(stop.clone()));
    // It has the cluster's record, with no member in it.
    eventually(WAIT, || async { proxy.table.load_full().map(|_| ()) })
        .await
        .expect("the front-end has a table");
    (addr, proxy)
}

/// A request's status and `Retry-After`, or the failure of the connection.
async fn get(
    http: &Http,
    addr: std::net::SocketAddr,
    path: &str,
) -> Result<(StatusCode, Option<String>), String> {
    let request = Request::get(format!("http://{addr}{path}"))
        .body(Empty::new())
        .expect("request");
    let response = http.request(request).await.map_err(|e| e.to_string())?;
    let (parts, body) = response.into_parts();
    body.collect().await.map_err(|e| e.to_string())?;
    let retry_after = parts
        .headers
        .get(http::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    Ok((parts.status, retry_after))
}

fn members(snapshot: &Snapshot, cluster: &str) -> usize {
    snapshot.cluster(cluster).members.len()
}

#[tokio::test]
async fn a_cold_burst_is_held_until_the_first_member_and_an_idle_cluster_goes_back_to_zero() {
    let stack = Stack::start().await;
    let stop = CancellationToken::new();
    let mut backends = Vec::new();
    for name in ["b1", "b2"] {
        let b = backend(name, &stop).await;
        register(&stack.client, &b, &[]).await;
        backends.push(b);
    }
    put_cluster(&stack.client, "web", zero_policy())
        .await
        .expect("cluster");
    // A second cluster with no server to give it (none serves its
    // request type): it stays at zero.
    let api = ClusterPolicy {
        routes: vec![crate::frontend::route(
            "api",
            "/",
            headroom_shared::records::Balance::LeastRequests,
        )],
        ..zero_policy()
    };
    put_cluster(&stack.client, "api", api)
        .await
        .expect("cluster");
    let mut monitor_config = stack.nats.config();
    monitor_config.monitor.instance = "monitor-1".to_owned();
    tokio::spawn(headroom_monitor::run(
        monitor_config,
        stack.nats.client().await.expect("connect"),
        Ops::new("headroom-monitor"),
        stop.clone(),
    ));
    let fe1 = frontend(&stack, "web", "fe-1", |_| {}, &stop).await;
    let fe2 = frontend(&stack, "web", "fe-2", |_| {}, &stop).await;
    let small = frontend(
        &stack,
        "api",
        "fe-api",
        |c| {
            c.frontend.hold_max = 5;
            c.frontend.hold_timeout = Duration::from_secs(1);
        },
        &stop,
    )
    .await;
    assert_eq!(members(&Snapshot::read(&stack.js).await, "web"), 0);
    let http: Http = Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(0)
        .build(HttpConnector::new());

    // Cold start: 200 requests at once, half through each front-end.
    let started = Instant::now();
    let burst: Vec<_> = (0..200)
        .map(|i| {
            let (http, addr) = (http.clone(), if i % 2 == 0 { fe1.0 } else { fe2.0 });
            tokio::spawn(async move {
                let answer = get(&http, addr, &format!("/cold/{i}?cost_ms=20")).await;
                (answer, started.elapsed())
            })
        })
        .collect();
    let mut first = None;
    for request in burst {
        let (answer, took) = request.await.expect("client");
        let (status, _) = answer.expect("answered, no connection error");
        assert_eq!(status, StatusCode::OK, "every held request is served");
        first = Some(first.map_or(took, |f: Duration| f.min(took)));
    }
    let first = first.expect("answers");
    println!(
        "cold start: first answer {first:?} after the burst, all 200 by {:?}",
        started.elapsed()
    );
    let held: u64 = [&fe1.1, &fe2.1]
        .iter()
        .map(|p| p.hold.released.load(Ordering::Relaxed))
        .sum();
    assert!(held > 0, "the requests were held, then released");
    assert!(first < Duration::from_secs(10), "{first:?}");

    // Past hold_max, on the cluster that gets no member: 503s with
    // Retry-After, at once for those past the bound, after the wait for
    // the five held; every one answered.
    let burst: Vec<_> = (0..20)
        .map(|i| {
            let (http, addr) = (http.clone(), small.0);
            tokio::spawn(async move { get(&http, addr, &format!("/api/{i}")).await })
        })
        .collect();
    for request in burst {
        let (status, retry_after) = request
            .await
            .expect("client")
            .expect("answered, no connection error");
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(retry_after.as_deref(), Some("1"), "says when to come back");
    }
    let hold = &small.1.hold;
    assert_eq!(
        hold.refused_full.load(Ordering::Relaxed),
        15,
        "past hold_max"
    );
    assert_eq!(
        hold.timed_out.load(Ordering::Relaxed),
        5,
        "the held ones' wait ran out"
    );

    // Idle: released down to one by the usual rule, then to zero after
    // three idle seconds.
    eventually(Duration::from_secs(40), || async {
        (members(&Snapshot::read(&stack.js).await, "web") == 0).then_some(())
    })
    .await
    .expect("an idle cluster goes back to zero");
    let zero = eventually(WAIT, || async {
        let table = fe1.1.table.load_full()?;
        table.backends.is_empty().then_some(())
    })
    .await;
    assert!(zero.is_some(), "the front-end routes to no member");

    // The next request brings it back.
    let again = Instant::now();
    let (status, _) = get(&http, fe1.0, "/again?cost_ms=5")
        .await
        .expect("answered");
    assert_eq!(status, StatusCode::OK);
    println!("from zero again: answered in {:?}", again.elapsed());
    assert!(members(&Snapshot::read(&stack.js).await, "web") >= 1);
    stop.cancel();
}
