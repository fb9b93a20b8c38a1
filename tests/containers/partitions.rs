//! Network partitions in the compose stack, under load through the
//! front-ends. Each test cuts one path with `docker network disconnect`
//! (no reset reaches either side, as in a real partition), heals it, and
//! judges what the load generator saw and the whole KV history, every
//! revision, not only the final state. The figures (requests sent and
//! failed, time to recover) are printed and recorded in the README.

use std::time::{Duration, Instant};

use async_nats::jetstream;
use futures::StreamExt;
use headroom_loadgen::{Profile, Summary};
use headroom_shared::codec;
use headroom_shared::records::{ClusterRecord, MemberState, ServerRecord, ServerState};
use headroom_shared::wire::{
    EventKind, PerformanceReport, ReconfigAction, ReconfigRequest, RegisterServer, ReportSource,
};
use headroom_shared::{bus, subjects, ClusterId, ServerId, SCHEMA_VERSION};
use headroom_tests::eventually;

use crate::common::{self, Snapshot};
use crate::history::History;
use crate::stack::*;

/// How long each cut lasts.
const CUT: Duration = Duration::from_secs(30);
/// A NATS node's: long enough for its clients to move, the cluster to
/// settle, and a scale-up through the other two.
const NODE_CUT: Duration = Duration::from_secs(90);

/// The invariants over the whole KV history, for every request the
/// ledger has an outcome for; the audit log applied each once.
async fn history_holds(js: &jetstream::Context) {
    let history = History::read(js).await;
    let asked = history.asked();
    let verdict = history.check(asked.iter().map(|(id, action)| (id, action)));
    println!(
        "history: {} server, {} cluster revisions; {} requests, {} joins, {} drains",
        history.servers.len(),
        history.clusters.len(),
        asked.len(),
        verdict.joins,
        verdict.drains
    );
    assert!(
        verdict.violations.is_empty(),
        "{} violations in the KV history:\n{}",
        verdict.violations.len(),
        verdict.violations.join("\n")
    );
    applied_once(&common::audit_log(js).await);
}

/// Every request in the reconfiguration stream taken and acknowledged.
async fn requests_done(js: &jetstream::Context) -> bool {
    eventually(Duration::from_secs(60), || async {
        let stream = js.get_stream(subjects::RECONFIG_STREAM).await.ok()?;
        let mut consumer = stream
            .get_consumer::<jetstream::consumer::pull::Config>(subjects::ALLOCATOR_CONSUMER)
            .await
            .ok()?;
        let info = consumer.info().await.ok()?;
        (info.num_pending == 0 && info.num_ack_pending == 0).then_some(())
    })
    .await
    .is_some()
}

/// Cluster `web`'s policy with another minimum size.
async fn set_min_size(operator: &async_nats::Client, record: &ClusterRecord, min_size: u32) {
    let mut policy = record.policy.clone();
    policy.min_size = min_size;
    common::put_cluster(operator, "web", policy)
        .await
        .unwrap_or_else(|(code, message)| panic!("policy of web: {code}: {message}"));
}

/// Sleeps until `at`.
async fn until(at: Instant) {
    tokio::time::sleep_until(at.into()).await;
}

/// Every request answered; what was refused (overload) is printed.
fn none_lost(what: &str, summary: &Summary) {
    print_summary(what, summary);
    assert_eq!(summary.failed, 0, "{what}: no request went unanswered");
    let refused: u64 = summary.statuses.values().sum();
    let only_overload = summary.statuses.keys().all(|s| *s == 503);
    assert!(
        only_overload,
        "{what}: refused only for a full backlog, not {refused}: {:?}",
        summary.statuses
    );
}

fn print_summary(what: &str, summary: &Summary) {
    println!(
        "{what}: {} sent, {} answered 2xx, {} failed, refused {:?}; p50 {:.0} ms, p99 {:.0} ms",
        summary.sent,
        summary.ok,
        summary.failed,
        summary.statuses,
        summary.latency_ms.p50,
        summary.latency_ms.p99
    );
}

fn no_request_failed(what: &str, summary: &Summary) {
    print_summary(what, summary);
    assert_eq!(summary.failed, 0, "{what}: no request went unanswered");
    assert_eq!(summary.errors(), 0, "{what}: no request was refused");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_front_end_cut_off_from_nats_serves_from_its_table_and_catches_up() {
    let Some(Started {
        stack,
        operator,
        js,
        web: before,
    }) = started("frontend-cut", false).await
    else {
        return;
    };
    let applied = || stack.metric("frontend-1", "headroom_membership_generation");
    let generation = |r: &ClusterRecord| Some(r.generation as f64);
    assert!(
        eventually(Duration::from_secs(30), || async {
            (applied() == generation(&before)).then_some(())
        })
        .await
        .is_some(),
        "frontend-1 applied generation {}",
        before.generation
    );

    let serving = load(&stack, 0, "hold:40:50s");
    tokio::time::sleep(Duration::from_secs(5)).await;
    stack.cut("frontend-1", "bus");
    let cut = Instant::now();

    // A change while it is cut off: the minimum raised to two members.
    tokio::time::sleep(Duration::from_secs(3)).await;
    set_min_size(&operator, &before, 2).await;
    let grown = wait_members(&js, Duration::from_secs(30), |n| n == 2)
        .await
        .unwrap_or_else(|| panic!("web grew to two\n{}", stack.logs("allocator")));
    assert_eq!(
        applied(),
        generation(&before),
        "frontend-1 cannot have heard of generation {} while cut off",
        grown.generation
    );

    until(cut + CUT).await;
    stack.heal("frontend-1", "bus");
    let healed = Instant::now();
    let caught_up = eventually(Duration::from_secs(60), || async {
        (applied()? >= grown.generation as f64).then_some(())
    })
    .await;
    let took = healed.elapsed();
    assert!(
        caught_up.is_some(),
        "frontend-1 applied generation {} after the cut healed\n{}",
        grown.generation,
        stack.logs("frontend-1")
    );
    println!(
        "front-end cut off for {CUT:?}: generation {} applied {took:?} after the cut healed \
         ({} disconnections, {} resynchronisations from KV)",
        grown.generation,
        stack
            .metric("frontend-1", "headroom_nats_disconnects_total")
            .unwrap_or(0.0),
        stack
            .metric("frontend-1", "headroom_frontend_resyncs_total")
            .unwrap_or(0.0),
    );
    // Within one resync once connected again: the client gave the dead
    // connection up during the cut (nats.ping_interval) and retries at
    // most every nats.max_reconnect_delay (5 s, 20 % jitter); the
    // front-end's resync_interval is 10 s.
    assert!(
        took <= Duration::from_secs(6 + 10 + 2),
        "applied within one resync of reconnecting, not {took:?}"
    );
    no_request_failed(
        "through frontend-1 while it was cut off",
        &serving.await.expect("load"),
    );
    history_holds(&js).await;
}

/// Server `server`'s record now.
async fn server_record(js: &jetstream::Context, server: &ServerId) -> Option<ServerRecord> {
    Snapshot::read(js)
        .await
        .servers
        .get(server)
        .map(|(record, _)| record.clone())
}

/// Whether an agent's own report comes (front-ends report on the same
/// subjects) before `reports` ends.
async fn from_agent(reports: &mut async_nats::Subscriber) -> bool {
    while let Some(message) = reports.next().await {
        let report: Option<PerformanceReport> =
            codec::decode(message.headers.as_ref(), &message.payload).ok();
        if report.is_some_and(|r| r.source == ReportSource::Agent) {
            return true;
        }
    }
    false
}

/// Registers the server of `record` in the pool again, as `headroom pool
/// add` does: the way back for a server taken out of service.
async fn register_again(operator: &async_nats::Client, record: &ServerRecord) {
    let registration = RegisterServer {
        v: SCHEMA_VERSION,
        id: record.id.clone(),
        address: record.address.clone(),
        port: record.port,
        request_types: record.request_types.clone(),
    };
    let _: ServerRecord = common::admin(
        operator,
        subjects::admin::POOL_REGISTER,
        &registration,
        codec::Codec::MsgPack,
    )
    .await
    .unwrap_or_else(|(code, message)| panic!("registered again: {code}: {message}"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_cut_off_is_replaced_and_its_server_returns_only_through_the_pool() {
    let Some(Started {
        stack,
        operator,
        js,
        web: before,
    }) = started("agent-cut", false).await
    else {
        return;
    };
    // A second cluster, so that "used by two clusters" can happen.
    let mut batch = before.policy.clone();
    batch.min_size = 1;
    common::put_cluster(&operator, "batch", batch.clone())
        .await
        .unwrap_or_else(|(code, message)| panic!("cluster batch: {code}: {message}"));
    let victim = before.members[0].server.clone();
    let agent = victim.as_str().replace("backend-", "agent-");

    let serving = [
        load(&stack, 0, "hold:20:60s"),
        load(&stack, 1, "hold:20:60s"),
    ];
    tokio::time::sleep(Duration::from_secs(5)).await;
    stack.cut(&agent, "bus");
    let cut = Instant::now();
    let took = eventually(Duration::from_secs(40), || async {
        let snapshot = Snapshot::read(&js).await;
        let members = snapshot.active_members("web");
        (replaced(&snapshot, &victim) && members.len() == 1).then_some(cut.elapsed())
    })
    .await
    .unwrap_or_else(|| panic!("{victim} replaced\n{}", stack.logs("monitor")));
    println!("{agent} cut off: {victim} out of service and replaced {took:?} after the cut");

    until(cut + CUT).await;
    let mut reports = operator
        .subscribe(format!("{}.metrics.*.{victim}", subjects::ROOT))
        .await
        .expect("subscribe to its reports");
    stack.heal(&agent, "bus");
    let healed = Instant::now();
    let back = tokio::time::timeout(Duration::from_secs(60), from_agent(&mut reports)).await;
    assert!(
        back == Ok(true),
        "{agent} reports again once the cut healed\n{}",
        stack.logs(&agent)
    );
    println!(
        "{agent} reporting again {:?} after the cut healed",
        healed.elapsed()
    );
    // Reporting again does not put it back: it stays out of service, in
    // no cluster, through a few report intervals and a monitor's window.
    tokio::time::sleep(Duration::from_secs(8)).await;
    let record = server_record(&js, &victim).await.expect("its record");
    assert!(
        matches!(record.state, ServerState::OutOfService { .. }),
        "{victim} stays out of service once its agent is back: {:?}",
        record.state
    );
    let snapshot = Snapshot::read(&js).await;
    for cluster in ["web", "batch"] {
        assert!(
            snapshot.cluster(cluster).member(&victim).is_none(),
            "{victim} is in no cluster"
        );
    }

    register_again(&operator, &record).await;
    batch.min_size = 3;
    common::put_cluster(&operator, "batch", batch)
        .await
        .unwrap_or_else(|(code, message)| panic!("cluster batch: {code}: {message}"));
    let rejoined = eventually(Duration::from_secs(30), || async {
        let snapshot = Snapshot::read(&js).await;
        snapshot
            .active_members("batch")
            .contains(&victim)
            .then_some(())
    })
    .await;
    assert!(
        rejoined.is_some(),
        "{victim} allocated again from the pool\n{}",
        stack.logs("allocator")
    );
    // A one-member cluster has no active member between the replaced one
    // leaving and its replacement's agent saying ready: a request in that
    // window gets a 503 (seen: 1 of 1,200), none goes unanswered.
    for (n, serving) in serving.into_iter().enumerate() {
        none_lost(
            &format!("through frontend-{} while {agent} was cut off", n + 1),
            &serving.await.expect("load"),
        );
    }
    assert!(requests_done(&js).await, "every request applied");
    history_holds(&js).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_allocator_cut_off_mid_drain_finishes_it_once_healed() {
    let Some(Started {
        stack,
        operator,
        js,
        web: before,
    }) = started("allocator-cut", false).await
    else {
        return;
    };
    // Only this test's requests change the cluster.
    stack.compose(&["stop", "-t", "5", "monitor"]);
    set_min_size(&operator, &before, 2).await;
    let two = wait_members(&js, Duration::from_secs(30), |n| n == 2)
        .await
        .expect("two members");
    set_min_size(&operator, &two, 1).await;

    // Long requests on both members (8 s each), then one member released.
    let mut target = stack.target(0);
    target.paths = vec!["/api/item?cost_ms=8000".to_owned()];
    target.timeout = Duration::from_secs(30);
    let profile = Profile::parse("hold:4:2s").expect("profile");
    let long = tokio::spawn(async move { headroom_loadgen::run(&profile, &target, None).await });
    let short = load(&stack, 1, "hold:20:50s");
    tokio::time::sleep(Duration::from_secs(3)).await;
    let released = active(&two)[0].clone();
    let release = ReconfigRequest::new(
        ClusterId::new("web").expect("id"),
        ReconfigAction::Release {
            server: released.clone(),
        },
        "partition test",
    );
    bus::request_reconfig(&js, &release)
        .await
        .expect("release asked");
    let draining = eventually(Duration::from_secs(20), || async {
        let record = server_record(&js, &released).await?;
        matches!(record.state, ServerState::Draining { .. }).then_some(())
    })
    .await;
    assert!(draining.is_some(), "{released} draining");

    // Cut off mid-drain; more work asked meanwhile.
    stack.cut("allocator", "bus");
    let cut = Instant::now();
    let allocate = ReconfigRequest::new(
        ClusterId::new("web").expect("id"),
        ReconfigAction::Allocate {
            count: 1,
            request_type: None,
        },
        "partition test",
    );
    bus::request_reconfig(&js, &allocate)
        .await
        .expect("allocation asked");
    until(cut + CUT).await;
    stack.heal("allocator", "bus");
    let healed = Instant::now();
    // The drain ends (the server back in the pool: the audit log says so,
    // as it may be allocated again at once, by the very allocation asked
    // meanwhile) and that allocation is made.
    let finished = eventually(Duration::from_secs(60), || async {
        let returned = common::audit_log(&js)
            .await
            .iter()
            .any(|e| e.kind == EventKind::Released && e.server.as_ref() == Some(&released));
        let allocated = common::outcome(&js, &allocate.id).await.is_some();
        let members = Snapshot::read(&js).await.active_members("web").len();
        (returned && allocated && members == 2).then_some(healed.elapsed())
    })
    .await
    .unwrap_or_else(|| {
        panic!(
            "the drain finished and the allocation made after the cut\n{}",
            stack.logs("allocator")
        )
    });
    println!(
        "allocator cut off for {CUT:?} mid-drain: {released} back in the pool and the \
         allocation asked meanwhile made {finished:?} after the cut healed (allocated {:?}); \
         the allocator container restarted {} times",
        Snapshot::read(&js).await.active_members("web"),
        stack.restarts("allocator")
    );
    no_request_failed(
        "long requests on the drained member",
        &long.await.expect("load"),
    );
    no_request_failed(
        "while the allocator was cut off",
        &short.await.expect("load"),
    );
    assert!(requests_done(&js).await, "every request applied");
    invariants_hold(&js).await;
    history_holds(&js).await;
}

/// Every replica of every stream current, none lagging.
async fn replicas_current(js: &jetstream::Context) -> Result<(), String> {
    let mut names = js.stream_names();
    let mut behind = Vec::new();
    while let Some(name) = names.next().await {
        let name = name.map_err(|e| e.to_string())?;
        let mut stream = js.get_stream(&name).await.map_err(|e| e.to_string())?;
        let info = stream.info().await.map_err(|e| e.to_string())?;
        let Some(cluster) = &info.cluster else {
            continue;
        };
        for peer in &cluster.replicas {
            let lag = peer.lag.unwrap_or(0);
            if !peer.current || lag > 0 {
                behind.push(format!("{name} on {} ({lag} behind)", peer.name));
            }
        }
    }
    if behind.is_empty() {
        Ok(())
    } else {
        Err(behind.join(", "))
    }
}

/// Headroom's services in the stack (two front-ends, four agents, the
/// allocator and the monitor), each with one connection.
const SERVICES: usize = 8;

/// Each of the three nodes routed to the other two, within a minute.
async fn all_routed(stack: &Stack) -> bool {
    eventually(Duration::from_secs(60), || async {
        for port in &stack.monitor_ports {
            if routes(*port).await? < 2 {
                return None;
            }
        }
        Some(())
    })
    .await
    .is_some()
}

/// The services connected to each node, once all of them are.
async fn placement(stack: &Stack) -> Vec<Vec<String>> {
    eventually(Duration::from_secs(30), || async {
        let mut on = Vec::new();
        for port in &stack.monitor_ports {
            on.push(connections(*port).await?);
        }
        (on.iter().map(Vec::len).sum::<usize>() == SERVICES).then_some(on)
    })
    .await
    .expect("every service connected")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_nats_node_cut_off_from_the_other_two_loses_nothing() {
    let Some(Started { stack, js, .. }) = started("node-cut", true).await else {
        return;
    };
    let [one, _, three] = [0, 1, 2].map(|n| stack.monitor_ports[n]);
    assert!(all_routed(&stack).await, "three nodes routed");
    let placed = placement(&stack).await;
    println!(
        "before the cut: {} services on nats, {} on nats-2 ({:?}), {} on nats-3",
        placed[0].len(),
        placed[1].len(),
        placed[1],
        placed[2].len()
    );

    // A light load through the whole cut, within one member's capacity;
    // the rise once the cut node's clients have moved: until then those of
    // them that report (agents, front-ends) are not heard, and a rise
    // would be seen late, which is the cost of detection, not of a lost
    // connection (nats.ping_interval: three unanswered pings).
    let steady = load(&stack, 1, "hold:30:95s");
    tokio::time::sleep(Duration::from_secs(2)).await;
    stack.cut("nats-2", "bus");
    let cut = Instant::now();
    let moved = eventually(Duration::from_secs(60), || async {
        let on = connections(one).await?.len() + connections(three).await?.len();
        (on == SERVICES).then_some(cut.elapsed())
    })
    .await;
    let moved = moved.unwrap_or_else(|| {
        panic!(
            "the clients of nats-2 moved to the others\n{}",
            stack.logs("frontend-1")
        )
    });
    println!(
        "nats-2 cut off: its {} clients on the others {moved:?} after the cut",
        placed[1].len()
    );
    // A member whose agent was on the cut node was silent for longer than
    // `silent_after_ms` and is replaced (as an agent cut off is); the rise
    // waits until no member is joining, so that it measures the majority's
    // scaling.
    // One get of the cluster record (a KV listing makes a consumer, which
    // waits out the cut node's leaderships).
    let last = std::sync::Mutex::new(String::from("KV never answered"));
    let settled = eventually(Duration::from_secs(30), || async {
        let web = record(&js).await?;
        if let Ok(mut last) = last.lock() {
            *last = format!("{:?}", web.members);
        }
        web.members
            .iter()
            .all(|m| m.state == MemberState::Active)
            .then_some(())
    })
    .await;
    assert!(
        settled.is_some(),
        "the cluster settled with nats-2 cut off: {}",
        last.lock().map(|l| l.clone()).unwrap_or_default()
    );
    let replacements = common::audit_log(&js)
        .await
        .iter()
        .filter(|e| e.kind == EventKind::OutOfService)
        .count();
    println!(
        "{replacements} member(s) replaced, their agent on the cut node; settled {:?} after the cut",
        cut.elapsed()
    );
    let rise = load(&stack, 0, "ramp:10-200:10s,hold:200:15s");
    let rose = Instant::now();
    // JetStream moves the leadership of the cut node's streams to the
    // others first: requests published meanwhile wait for their ack.
    let grown = wait_members(&js, Duration::from_secs(60), |n| n >= 2).await;
    assert!(
        grown.is_some(),
        "scaled up through the majority\n{}",
        stack.logs("monitor")
    );
    println!(
        "scaled up with nats-2 cut off, {:?} after the rise began ({:?} after the cut)",
        rose.elapsed(),
        cut.elapsed()
    );
    assert!(cut.elapsed() < NODE_CUT, "scaled up before the cut healed");
    until(cut + NODE_CUT).await;
    stack.heal("nats-2", "bus");
    let healed = Instant::now();
    assert!(
        all_routed(&stack).await,
        "nats-2 rejoined\n{}",
        stack.logs("nats-2")
    );
    let caught_up = eventually(Duration::from_secs(60), || async {
        replicas_current(&js).await.ok()
    })
    .await;
    assert!(
        caught_up.is_some(),
        "every stream's replicas current after the rejoin: {:?}",
        replicas_current(&js).await
    );
    println!(
        "nats-2 rejoined and every replica current {:?} after the cut healed",
        healed.elapsed()
    );
    // No request lost; a rise the cluster could not grow for yet is
    // refused by its full backlog (503), which is counted, not hidden.
    for (what, summary) in [
        (
            "through frontend-1, rising while nats-2 was cut off",
            rise.await.expect("load"),
        ),
        ("through frontend-2 throughout", steady.await.expect("load")),
    ] {
        none_lost(what, &summary);
    }
    assert!(requests_done(&js).await, "every request applied");
    invariants_hold(&js).await;
    history_holds(&js).await;
}
