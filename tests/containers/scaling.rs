//! The stack scales with the load, survives its services and servers
//! being killed, and goes on with one of three NATS nodes stopped.

use std::time::{Duration, Instant};

use async_nats::jetstream;
use headroom_shared::codec::Codec;
use headroom_shared::records::ServerState;
use headroom_shared::time::now_ms;
use headroom_shared::wire::{
    DrainMember, DrainQueued, EventKind, PerformanceReport, ReportSource, ServerStatus,
    ServerStatusKind,
};
use headroom_shared::{bus, subjects, ServerId, SCHEMA_VERSION};
use headroom_tests::eventually;

use crate::common::{self, Snapshot};
use crate::stack::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_stack_scales_survives_crashes_and_keeps_agents_in_their_place() {
    let began = Instant::now();
    // Up: the cluster at its minimum, both front-ends serving it.
    let Some(Started {
        stack,
        js,
        web: first,
        ..
    }) = started("scaling", false).await
    else {
        return;
    };
    for frontend in 0..2 {
        let served = load(&stack, frontend, "hold:5:1s").await.expect("load");
        assert_eq!(served.errors(), 0, "front-end {frontend}: {served:?}");
    }
    eprintln!("stack up in {:?}", began.elapsed());

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
    let taken_out = eventually(Duration::from_secs(40), || async {
        replaced(&Snapshot::read(&js).await, &victim).then_some(())
    })
    .await;
    assert!(
        taken_out.is_some(),
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
    applied_once(&common::audit_log(&js).await);
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

    // 4. An agent's user cannot ask for a reconfiguration nor write KV,
    // nor speak for another server.
    let backend_1 = ServerId::new("backend-1").expect("id");
    let agent = stack.client_as_agent(&backend_1).await;
    let (asked, wrote) = common::act_as_intruder(agent.clone(), "backend-1").await;
    assert!(
        asked.is_err(),
        "an agent's reconfiguration request is refused"
    );
    assert!(wrote.is_err(), "an agent's KV write is refused");
    speaks_for_itself_only(&stack, &js, agent).await;

    // 5. From zero: with min_size 0 and every member drained, a burst is
    // held by the front-ends, not dropped, until the first member is
    // active; the monitor's ask is confirmed by both front-ends.
    from_zero(&stack, &js).await;
    eprintln!("single-node stack tests took {:?}", began.elapsed());
}

async fn from_zero(stack: &Stack, js: &jetstream::Context) {
    let operator = stack.operator().await;
    let before = record(js).await.expect("web");
    let mut policy = before.policy.clone();
    policy.min_size = 0;
    common::put_cluster(&operator, "web", policy)
        .await
        .unwrap_or_else(|(code, message)| panic!("policy of web: {code}: {message}"));
    for server in active(&before) {
        let _: DrainQueued = common::admin(
            &operator,
            subjects::admin::MEMBER_DRAIN,
            &DrainMember {
                v: SCHEMA_VERSION,
                cluster: before.id.clone(),
                server,
            },
            Codec::MsgPack,
        )
        .await
        .unwrap_or_else(|(code, message)| panic!("drain: {code}: {message}"));
    }
    let empty = eventually(Duration::from_secs(60), || async {
        record(js).await.filter(|r| r.members.is_empty())
    })
    .await;
    assert!(
        empty.is_some(),
        "every member drained
{}",
        stack.logs("allocator")
    );
    let cold = now_ms();
    let burst = load(stack, 0, "hold:50:2s").await.expect("load");
    assert_eq!(burst.errors(), 0, "held, not dropped: {burst:?}");
    let events = common::audit_log(js).await;
    let asked = events
        .iter()
        .find(|e| {
            e.kind == EventKind::Decided && e.at_ms >= cold && e.detail.contains("front-ends hold")
        })
        .and_then(|e| e.request.clone())
        .unwrap_or_else(|| {
            panic!(
                "the monitor asked from zero
{}",
                stack.logs("monitor")
            )
        });
    let confirmed = eventually(Duration::from_secs(30), || async {
        common::audit_log(js)
            .await
            .into_iter()
            .find(|e| e.kind == EventKind::Confirmed && e.request.as_ref() == Some(&asked))
    })
    .await
    .unwrap_or_else(|| {
        panic!(
            "{asked} confirmed
{}",
            stack.logs("allocator")
        )
    });
    assert!(
        confirmed.detail.contains("frontend-1") && confirmed.detail.contains("frontend-2"),
        "by both front-ends: {confirmed:?}"
    );
    eprintln!(
        "from zero: {} of {} answered, {:?}; {}",
        burst.ok, burst.sent, burst.latency_ms, confirmed.detail
    );
}

/// `agent` (backend-1's) reports backend-2 idle and failed, on backend-2's
/// subjects: the server refuses both and logs it, and backend-2 is left as
/// it was.
async fn speaks_for_itself_only(stack: &Stack, js: &jetstream::Context, agent: async_nats::Client) {
    let backend_2 = ServerId::new("backend-2").expect("id");
    let before = Snapshot::read(js).await.servers[&backend_2].1;
    let forged = PerformanceReport {
        in_flight: Some(0),
        concurrency: Some(8),
        ..PerformanceReport::new(backend_2.clone(), None, ReportSource::Agent, now_ms(), 1000)
    };
    let failed = ServerStatus {
        v: SCHEMA_VERSION,
        server: backend_2.clone(),
        cluster: None,
        status: ServerStatusKind::Failed {
            reason: "forged".to_owned(),
        },
        at_ms: now_ms(),
    };
    // Refused by the server, so the client hears nothing back.
    let _ = bus::publish(&agent, subjects::metrics(None, &backend_2), &forged).await;
    let _ = bus::publish(&agent, subjects::status(&backend_2), &failed).await;
    let _ = agent.flush().await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        Snapshot::read(js).await.servers[&backend_2].1,
        before,
        "backend-2's record untouched"
    );
    let log = stack.logs("nats");
    for subject in [
        "headroom.metrics._pool.backend-2",
        "headroom.status.backend-2",
    ] {
        assert!(
            log.lines().any(|l| l.contains("user:agent-backend-1")
                && l.contains("Publish Violation")
                && l.contains(subject)),
            "the server logs the refusal of {subject}:\n{log}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_three_nats_nodes_one_can_stop_and_rejoin() {
    let Some(Started { stack, js, .. }) = started("three-nodes", true).await else {
        return;
    };
    assert!(
        eventually(Duration::from_secs(30), || async {
            routes(stack.monitor_ports[0]).await.filter(|n| *n >= 2)
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
        routes(stack.monitor_ports[0]).await.filter(|n| *n >= 2)
    })
    .await;
    assert!(
        rejoined.is_some(),
        "nats-2 rejoined\n{}",
        stack.logs("nats-2")
    );
    invariants_hold(&js).await;
}
