//! The sample backend's capacity, over real HTTP: requests past its
//! concurrency wait in order, past the queue limit they are refused at
//! once, and its stats say so.

use std::time::{Duration, Instant};

use bytes::Bytes;
use headroom_backend::Backend;
use headroom_shared::config::BackendConfig;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tokio_util::sync::CancellationToken;

type Http = Client<HttpConnector, Empty<Bytes>>;

fn client() -> Http {
    Client::builder(TokioExecutor::new()).build(HttpConnector::new())
}

async fn get(client: &Http, url: String) -> (u16, Option<String>, Bytes, Duration) {
    let begun = Instant::now();
    let request = http::Request::get(url).body(Empty::new()).expect("request");
    let response = client.request(request).await.expect("an answer");
    let status = response.status().as_u16();
    let retry_after = response
        .headers()
        .get(http::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let body = response
        .into_body()
        .collect()
        .await
        .expect("body")
        .to_bytes();
    (status, retry_after, body, begun.elapsed())
}

async fn backend(concurrency: usize, queue_limit: usize) -> (Backend, CancellationToken) {
    let stop = CancellationToken::new();
    let backend = Backend::start(
        BackendConfig {
            name: "b1".into(),
            listen: "127.0.0.1:0".into(),
            cost: Duration::from_millis(100),
            concurrency,
            queue_limit,
            ..BackendConfig::default()
        },
        stop.clone(),
    )
    .await
    .expect("backend");
    (backend, stop)
}

#[tokio::test]
async fn requests_past_the_concurrency_queue_and_the_latency_shows_it() {
    let (backend, stop) = backend(2, 100).await;
    let client = client();
    let url = format!("http://{}/item", backend.addr);
    let mut sent = tokio::task::JoinSet::new();
    for _ in 0..20 {
        let (client, url) = (client.clone(), url.clone());
        sent.spawn(async move { get(&client, url).await });
    }
    let mut latencies = Vec::new();
    while let Some(answer) = sent.join_next().await {
        let (status, _, _, elapsed) = answer.expect("task");
        assert_eq!(status, 200);
        latencies.push(elapsed.as_secs_f64());
    }
    latencies.sort_by(f64::total_cmp);
    // Two at a time, 100 ms each: the last pair waits for nine before it.
    let (p50, p99) = (latencies[9], latencies[19]);
    assert!(
        (0.95..1.5).contains(&p99),
        "p99 {p99:.3} s: ten rounds of 100 ms"
    );
    assert!((0.45..0.8).contains(&p50), "p50 {p50:.3} s");
    assert!(latencies[0] >= 0.095, "none is faster than its own cost");

    let (status, _, body, _) = get(&client, format!("http://{}/stats", backend.addr)).await;
    assert_eq!(status, 200);
    let stats: serde_json::Value = serde_json::from_slice(&body).expect("json");
    assert_eq!(stats["concurrency"], 2);
    assert_eq!(stats["queued"], 0);
    assert_eq!(stats["busy"], 0);
    stop.cancel();
}

#[tokio::test]
async fn past_the_queue_limit_a_503_comes_back_at_once() {
    let (backend, stop) = backend(1, 2).await;
    let client = client();
    let url = format!("http://{}/item?cost_ms=1000", backend.addr);
    let mut held = tokio::task::JoinSet::new();
    for _ in 0..3 {
        let (client, url) = (client.clone(), url.clone());
        held.spawn(async move { get(&client, url).await });
    }
    // One working and two queued, as the stats see it.
    let stats_url = format!("http://{}/stats", backend.addr);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let (_, _, body, _) = get(&client, stats_url.clone()).await;
        let stats: serde_json::Value = serde_json::from_slice(&body).expect("json");
        if stats["busy"] == 1 && stats["queued"] == 2 {
            assert_eq!(stats["in_flight"], 3);
            break;
        }
        assert!(
            Instant::now() < deadline,
            "never 1 busy and 2 queued: {stats}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let (status, retry_after, _, elapsed) = get(&client, url.clone()).await;
    assert_eq!(status, 503, "the queue is full");
    assert_eq!(retry_after.as_deref(), Some("1"));
    assert!(
        elapsed < Duration::from_millis(300),
        "refused at once, not after a wait: {elapsed:?}"
    );
    assert_eq!(backend.refused(), 1);
    while let Some(answer) = held.join_next().await {
        assert_eq!(answer.expect("task").0, 200, "the queued ones are served");
    }
    let (_, _, body, _) = get(&client, stats_url).await;
    let stats: serde_json::Value = serde_json::from_slice(&body).expect("json");
    assert!(
        stats["errors_per_s"].as_f64().is_some_and(|e| e > 0.0),
        "the refusal is in the stats: {stats}"
    );
    stop.cancel();
}
