//! The stack scales with the load, survives its services and servers
//! being killed, and goes on with one of three NATS nodes stopped.

use std::time::{Duration, Instant};

use async_nats::jetstream;
use headroom_shared::records::ServerState;
use headroom_shared::{subjects, ServerId};
use headroom_tests::eventually;

use crate::common::{self, Snapshot};
use crate::stack::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_stack_scales_survives_crashes_and_keeps_agents_in_their_place() {
    if !enabled() {
        return;
    }
    let stack = Stack::up("scaling", false).await;
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
    let stack = Stack::up("three-nodes", true).await;
    let operator = stack.operator().await;
    let js = jetstream::new(operator.clone());
    wait_members(&js, Duration::from_secs(120), |n| n == 1)
        .await
        .unwrap_or_else(|| panic!("cluster web at its minimum\n{}", stack.logs("allocator")));
    let routes = || async {
        let url = format!("http://127.0.0.1:{}/routez", stack.monitor_ports[0]);
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
