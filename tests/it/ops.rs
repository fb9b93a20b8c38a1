//! The health and metrics endpoints, over HTTP: readiness follows the
//! service, and the counters move when the system acts.

use std::time::Duration;

use bytes::Bytes;
use headroom_shared::ops::{self, Ops};
use headroom_shared::records::Balance;
use headroom_shared::wire::{ReconfigAction, ReconfigRequest};
use headroom_tests::eventually;
use http_body_util::{BodyExt, Empty};
use hyper::StatusCode;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tokio_util::sync::CancellationToken;

use crate::common::{cid, policy, wait_outcome, Snapshot, WAIT};
use crate::frontend::{route, Site};

/// Serves `ops` on an ephemeral port; returns its base URL.
async fn serve(ops: &std::sync::Arc<Ops>, shutdown: &CancellationToken) -> String {
    let addr = ops::start(ops, Some("127.0.0.1:0"), shutdown)
        .await
        .expect("bind")
        .expect("address");
    format!("http://{addr}")
}

async fn get(url: &str) -> (StatusCode, String) {
    let client = Client::builder(TokioExecutor::new()).build_http::<Empty<Bytes>>();
    let response = tokio::time::timeout(WAIT, client.get(url.parse().expect("url")))
        .await
        .expect("answer in time")
        .expect("answer");
    let status = response.status();
    let body = response
        .into_body()
        .collect()
        .await
        .expect("body")
        .to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

/// The value of one sample line (`name{labels}`), if present.
fn sample(metrics: &str, series: &str) -> Option<f64> {
    metrics.lines().find_map(|line| {
        let rest = line.strip_prefix(series)?;
        rest.strip_prefix(' ')?.trim().parse().ok()
    })
}

#[tokio::test]
async fn metrics_move_when_the_system_acts() {
    let site = Site::start(
        &[("ops-a", &["web"]), ("ops-b", &["web"])],
        headroom_shared::records::ClusterPolicy {
            routes: vec![route("web", "/", Balance::LeastRequests)],
            ..policy(1, 2)
        },
    )
    .await;
    let shutdown = CancellationToken::new();
    let allocator = serve(&site.stack.allocator.ops, &shutdown).await;
    let frontend = serve(&site.ops, &shutdown).await;

    for base in [&allocator, &frontend] {
        assert_eq!(get(&format!("{base}/healthz")).await.0, StatusCode::OK);
        let ready = eventually(WAIT, || async {
            (get(&format!("{base}/readyz")).await.0 == StatusCode::OK).then_some(())
        })
        .await;
        assert!(
            ready.is_some(),
            "{base} becomes ready: {:?}",
            get(&format!("{base}/readyz")).await
        );
        assert_eq!(get(&format!("{base}/nope")).await.0, StatusCode::NOT_FOUND);
    }

    // The allocator's view of the pool: one allocated, one free.
    let metrics = eventually(WAIT, || async {
        let (_, m) = get(&format!("{allocator}/metrics")).await;
        (sample(&m, "headroom_pool_servers{state=\"free\"}") == Some(1.0)).then_some(m)
    })
    .await
    .expect("pool gauge follows KV");
    assert_eq!(
        sample(&metrics, "headroom_pool_servers{state=\"allocated\"}"),
        Some(1.0)
    );
    assert_eq!(
        sample(
            &metrics,
            "headroom_cluster_members{cluster=\"web\",state=\"active\"}"
        ),
        Some(1.0)
    );
    let allocated_before = sample(
        &metrics,
        "headroom_allocator_events_total{kind=\"allocated\"}",
    )
    .expect("allocations counted");
    assert!(metrics.contains("headroom_nats_connected{service=\"headroom-allocator\"} 1"));

    // Requests through the front-end: counted by status, cache hits too.
    let (_, m) = get(&format!("{frontend}/metrics")).await;
    let ok_before = sample(&m, "headroom_frontend_requests_total{code=\"200\"}").unwrap_or(0.0);
    for _ in 0..5 {
        assert_eq!(site.get("/api/x").await.0, StatusCode::OK);
    }
    for _ in 0..3 {
        assert_eq!(site.get("/static/logo.png").await.0, StatusCode::OK);
    }
    let (_, m) = get(&format!("{frontend}/metrics")).await;
    assert_eq!(
        sample(&m, "headroom_frontend_requests_total{code=\"200\"}"),
        Some(ok_before + 8.0)
    );
    assert_eq!(
        sample(&m, "headroom_frontend_cache_total{result=\"hit\"}"),
        Some(2.0)
    );
    // Every GET is looked up: five API calls and the first logo missed.
    assert_eq!(
        sample(&m, "headroom_frontend_cache_total{result=\"miss\"}"),
        Some(6.0)
    );
    assert!(sample(&m, "headroom_frontend_request_seconds_count").is_some_and(|n| n >= 8.0));
    let generation = Snapshot::read(&site.stack.js)
        .await
        .cluster("web")
        .generation;
    assert_eq!(
        sample(&m, "headroom_membership_generation"),
        Some(generation as f64)
    );

    // One more member: the allocator counts it, the pool gauge and both
    // generations move.
    let request = ReconfigRequest::new(
        cid("web"),
        ReconfigAction::Allocate {
            count: 1,
            request_type: None,
        },
        "ops-test",
    );
    headroom_shared::bus::request_reconfig(&site.stack.js, &request)
        .await
        .expect("request sent");
    wait_outcome(&site.stack.js, &request.id).await;
    site.wait_in_step().await;
    let generation = Snapshot::read(&site.stack.js)
        .await
        .cluster("web")
        .generation;
    let metrics = eventually(WAIT, || async {
        let (_, m) = get(&format!("{allocator}/metrics")).await;
        (sample(&m, "headroom_pool_servers{state=\"free\"}") == Some(0.0)).then_some(m)
    })
    .await
    .expect("pool gauge follows the allocation");
    assert_eq!(
        sample(
            &metrics,
            "headroom_allocator_events_total{kind=\"allocated\"}"
        ),
        Some(allocated_before + 1.0)
    );
    assert_eq!(
        sample(
            &metrics,
            "headroom_allocator_requests_total{action=\"allocate\",outcome=\"applied\"}"
        ),
        Some(1.0)
    );
    assert_eq!(
        sample(&metrics, "headroom_membership_generation{cluster=\"web\"}"),
        Some(generation as f64)
    );
    let (_, m) = get(&format!("{frontend}/metrics")).await;
    assert_eq!(
        sample(&m, "headroom_membership_generation"),
        Some(generation as f64)
    );
    assert!(m.contains("headroom_frontend_member_in_flight{server=\"ops-b\"}"));

    // Stopping: the allocator says it is not ready any more.
    site.stack.allocator.shutdown.cancel();
    let gone = eventually(Duration::from_secs(10), || async {
        (get(&format!("{allocator}/readyz")).await.0 == StatusCode::SERVICE_UNAVAILABLE)
            .then_some(())
    })
    .await;
    assert!(gone.is_some(), "not ready once stopping");
    shutdown.cancel();
    site.shutdown.cancel();
}

#[tokio::test]
async fn services_connect_through_a_list_of_urls() {
    // The 3-node stack gives every service all three URLs; one may be down.
    let nats = headroom_tests::NatsServer::start()
        .await
        .expect("nats-server");
    let mut config = nats.config();
    config.nats.url = format!("nats://127.0.0.1:1, {}", nats.url());
    let (client, _) = headroom_shared::nats::connect(&config.nats, "list-test")
        .await
        .expect("connects through the URL that answers");
    client.flush().await.expect("flush");
    assert_eq!(
        client.connection_state(),
        async_nats::connection::State::Connected
    );
}
