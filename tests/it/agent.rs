//! The agent, in-process, against a real nats-server and allocator, with a
//! real (tiny) HTTP application beside it for stats and hooks.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use headroom_shared::codec::{self, Codec};
use headroom_shared::config::Hook;
use headroom_shared::ops::Ops;
use headroom_shared::records::ServerState;
use headroom_shared::subjects;
use headroom_shared::wire::{
    DrainMember, DrainQueued, PerformanceReport, ServerStatus, ServerStatusKind,
};
use headroom_shared::SCHEMA_VERSION;
use headroom_tests::eventually;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::common::{admin, cid, policy, put_cluster, sid, Snapshot, Stack, WAIT};

/// A stand-in for the served application: `GET /stats` answers with the
/// in-flight count the test sets; `POST /hooks/...` is counted.
struct App {
    addr: String,
    in_flight: Arc<AtomicU32>,
    hooks: Arc<AtomicU32>,
}

async fn app() -> App {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr").to_string();
    let in_flight = Arc::new(AtomicU32::new(2));
    let hooks = Arc::new(AtomicU32::new(0));
    let (n, h) = (in_flight.clone(), hooks.clone());
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let (n, h) = (n.clone(), h.clone());
            tokio::spawn(async move {
                let mut request = Vec::new();
                let mut buf = [0u8; 1024];
                while !request.windows(4).any(|w| w == b"\r\n\r\n") {
                    match stream.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(k) => request.extend_from_slice(&buf[..k]),
                    }
                }
                let body = if request.starts_with(b"POST /hooks/") {
                    h.fetch_add(1, Ordering::SeqCst);
                    "{}".to_owned()
                } else {
                    format!(
                        r#"{{"in_flight":{},"requests_per_s":12.5,"latency_p50_ms":3.0,"latency_p99_ms":9.0}}"#,
                        n.load(Ordering::SeqCst)
                    )
                };
                let response = format!(
                    "HTTP/1.0 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
                    body.len()
                );
                let _ = stream.write_all(response.as_bytes()).await;
            });
        }
    });
    App {
        addr,
        in_flight,
        hooks,
    }
}

async fn next_report(reports: &mut async_nats::Subscriber) -> (String, PerformanceReport) {
    let message = tokio::time::timeout(WAIT, reports.next())
        .await
        .expect("a report in time")
        .expect("subscription open");
    let report = codec::decode(message.headers.as_ref(), &message.payload).expect("report");
    (message.subject.to_string(), report)
}

#[tokio::test]
async fn the_agent_registers_reports_and_answers_its_assignments() {
    let stack = Stack::start().await;
    let app = app().await;
    let dir = tempfile::tempdir().expect("temp dir");
    let hook_log = dir.path().join("hook.log");
    let mut reports = stack
        .client
        .subscribe("headroom.metrics.*.a1")
        .await
        .expect("subscribe");
    let mut statuses = stack
        .client
        .subscribe(subjects::status(&sid("a1")))
        .await
        .expect("subscribe");

    let mut config = stack.nats.config();
    config.agent.server = "a1".to_owned();
    config.agent.address = "127.0.0.1".to_owned();
    config.agent.port = 8080;
    config.agent.interval = Duration::from_millis(100);
    config.agent.stats_url = Some(format!("http://{}/stats", app.addr));
    config.agent.on_allocate = Some(Hook::Command(vec![
        "sh".to_owned(),
        "-c".to_owned(),
        format!(
            "echo \"$HEADROOM_EVENT $HEADROOM_CLUSTER\" >> {}",
            hook_log.display()
        ),
    ]));
    config.agent.on_release = Some(Hook::Http(format!("http://{}/hooks/release", app.addr)));
    let shutdown = CancellationToken::new();
    let ops = Ops::new("headroom-agent");
    let agent = tokio::spawn(headroom_agent::run(
        config,
        stack.nats.client().await.expect("agent connects"),
        ops.clone(),
        shutdown.clone(),
    ));

    // It registers its server, and reports from the pool with the
    // application's numbers and its own machine's.
    let registered = eventually(WAIT, || async {
        let snapshot = Snapshot::read(&stack.js).await;
        snapshot.servers.get(&sid("a1")).map(|s| s.0.state.clone())
    })
    .await;
    assert_eq!(registered, Some(ServerState::Free));
    let (subject, report) = next_report(&mut reports).await;
    assert_eq!(subject, "headroom.metrics._pool.a1");
    assert_eq!(report.in_flight, Some(2));
    assert_eq!(report.requests_per_s, Some(12.5));
    assert_eq!(report.latency_p99_ms, Some(9.0));
    assert!(report.memory.is_some_and(|m| (0.0..=1.0).contains(&m)));
    let (_, report) = next_report(&mut reports).await;
    assert!(report.cpu.is_some(), "CPU from two samples: {report:?}");

    // A cluster with min 1 takes it: the allocate hook runs, it reports
    // ready, and its reports move to the cluster's subject.
    let mut slow_drain = policy(1, 2);
    slow_drain.drain_timeout_ms = 20_000;
    put_cluster(&stack.client, "web", slow_drain)
        .await
        .expect("cluster");
    let ready = tokio::time::timeout(WAIT, statuses.next())
        .await
        .expect("a status in time")
        .expect("subscription open");
    let ready: ServerStatus =
        codec::decode(ready.headers.as_ref(), &ready.payload).expect("status");
    assert_eq!(ready.status, ServerStatusKind::Ready);
    let hook = std::fs::read_to_string(&hook_log).expect("hook ran");
    assert_eq!(hook.trim(), "allocate web");
    let mut moved = false;
    for _ in 0..50 {
        let (subject, _) = next_report(&mut reports).await;
        if subject == "headroom.metrics.web.a1" {
            moved = true;
            break;
        }
    }
    assert!(moved, "reports moved to the cluster subject");

    // Released: it waits for in-flight work, runs the release hook, says
    // drained, and the allocator returns it to the pool long before the
    // drain deadline.
    app.in_flight.store(3, Ordering::SeqCst);
    let mut may_empty = policy(0, 2);
    may_empty.drain_timeout_ms = 20_000;
    put_cluster(&stack.client, "web", may_empty)
        .await
        .expect("policy");
    let queued: DrainQueued = admin(
        &stack.client,
        subjects::admin::MEMBER_DRAIN,
        &DrainMember {
            v: SCHEMA_VERSION,
            cluster: cid("web"),
            server: sid("a1"),
        },
        Codec::MsgPack,
    )
    .await
    .expect("drain queued");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        app.hooks.load(Ordering::SeqCst),
        0,
        "waits for in-flight work"
    );
    app.in_flight.store(0, Ordering::SeqCst);
    let drained = tokio::time::timeout(WAIT, statuses.next())
        .await
        .expect("a status in time")
        .expect("subscription open");
    let drained: ServerStatus =
        codec::decode(drained.headers.as_ref(), &drained.payload).expect("status");
    assert_eq!(drained.status, ServerStatusKind::Drained, "{queued:?}");
    assert_eq!(app.hooks.load(Ordering::SeqCst), 1, "release hook ran once");
    let free = eventually(Duration::from_secs(10), || async {
        let snapshot = Snapshot::read(&stack.js).await;
        (snapshot.servers.get(&sid("a1")).map(|s| &s.0.state) == Some(&ServerState::Free))
            .then_some(())
    })
    .await;
    assert!(free.is_some(), "back in the pool before the drain deadline");

    // Its metrics say what it did.
    assert_eq!(ops.readiness(), Ok(()), "registered, so ready");
    let metrics = ops.render();
    for line in [
        "headroom_agent_hooks_total{event=\"allocate\",outcome=\"ok\"} 1\n",
        "headroom_agent_hooks_total{event=\"release\",outcome=\"ok\"} 1\n",
        "headroom_agent_assignments_total{kind=\"allocated\"} 1\n",
        "headroom_agent_assignments_total{kind=\"draining\"} 1\n",
    ] {
        assert!(metrics.contains(line), "{line} in {metrics}");
    }
    for placement in ["member", "pool"] {
        let series = format!("headroom_agent_reports_total{{placement=\"{placement}\"}} ");
        let count: u64 = metrics
            .lines()
            .find_map(|l| l.strip_prefix(series.as_str()))
            .and_then(|n| n.parse().ok())
            .unwrap_or(0);
        assert!(count > 0, "reports as {placement} counted: {metrics}");
    }

    shutdown.cancel();
    tokio::time::timeout(WAIT, agent)
        .await
        .expect("agent stops")
        .expect("joined")
        .expect("agent ended cleanly");
}
