//! Confirmation by the data plane, with real front-end processes on a
//! secure nats-server (each service its own user): a change is done when
//! every live front-end routes by it. One of three front-ends is paused
//! (SIGSTOP): the monitor's scale-up is applied by two, not confirmed, the
//! laggard is named in the audit log and in `headroom status`, and the
//! monitor asks for nothing more meanwhile; resumed, it confirms. Stopped
//! for good, it holds confirmation back only until it counts as gone.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use futures::StreamExt;
use headroom_shared::codec::{self, Codec};
use headroom_shared::kv::REQUESTS_BUCKET;
use headroom_shared::ledger::RequestConfirmed;
use headroom_shared::ops::Ops;
use headroom_shared::records::{ClusterPolicy, ClusterRecord};
use headroom_shared::subjects;
use headroom_shared::wire::{
    EventKind, FrontendApplied, PerformanceReport, ReconfigAction, ReconfigRequest, ReportSource,
};
use headroom_shared::RequestId;
use headroom_tests::{eventually, NatsServer};
use tokio::process::Child;
use tokio_util::sync::CancellationToken;

use crate::common::*;

/// The front-ends' report interval: one silent three times this is gone.
const REPORT_INTERVAL: Duration = Duration::from_secs(4);
/// How long a change may wait before its laggards are named.
const DEADLINE: Duration = Duration::from_secs(2);

fn spawn_frontend(nats: &NatsServer, instance: &str, dir: &std::path::Path) -> Child {
    let log = std::fs::File::create(dir.join(format!("{instance}.log"))).expect("log");
    let binary = workspace_binary("headroom-frontend", "HEADROOM_FRONTEND_BIN");
    service_command(&binary, nats.url(), log)
        .env("HEADROOM_NATS__USER", "frontend")
        .env(
            "HEADROOM_NATS__PASSWORD",
            nats.password("frontend").expect("front-end user"),
        )
        .env("HEADROOM_FRONTEND__INSTANCE", instance)
        .env("HEADROOM_FRONTEND__CLUSTER", "web")
        .env("HEADROOM_FRONTEND__LISTEN", "127.0.0.1:0")
        .env("HEADROOM_FRONTEND__WORKERS", "1")
        .env(
            "HEADROOM_FRONTEND__REPORT_INTERVAL",
            format!("{}s", REPORT_INTERVAL.as_secs()),
        )
        .spawn()
        .expect("front-end starts")
}

/// Pauses `child` (SIGSTOP) right after front-end `name` said which
/// generation it applied: when it was paused.
async fn pause_after_word(applied: &Applied, child: &Child, name: &str) -> Instant {
    let mut applied = applied.clone();
    applied.borrow_and_update();
    loop {
        applied.changed().await.expect("following the front-ends");
        let fresh = applied
            .borrow_and_update()
            .get(name)
            .is_some_and(|(_, at)| at.elapsed() < Duration::from_millis(100));
        if fresh {
            signal(child, "-STOP");
            return Instant::now();
        }
    }
}

fn signal(child: &Child, signal: &str) {
    let pid = child.id().expect("running").to_string();
    let status = std::process::Command::new("kill")
        .args([signal, &pid])
        .status()
        .expect("kill runs");
    assert!(status.success(), "kill {signal} {pid}");
}

/// The generation each front-end last said it applied, and when it said so.
type Applied = tokio::sync::watch::Receiver<BTreeMap<String, (u64, Instant)>>;

fn follow_applied(client: async_nats::Client) -> Applied {
    let (tx, rx) = tokio::sync::watch::channel(BTreeMap::new());
    tokio::spawn(async move {
        let mut applied = client
            .subscribe(subjects::FRONTEND_APPLIED_ALL)
            .await
            .expect("subscribe");
        while let Some(message) = applied.next().await {
            if let Ok(said) =
                codec::decode::<FrontendApplied>(message.headers.as_ref(), &message.payload)
            {
                tx.send_modify(|m| {
                    m.insert(said.frontend, (said.generation, Instant::now()));
                });
            }
        }
    });
    rx
}

async fn confirmation(
    js: &async_nats::jetstream::Context,
    id: &RequestId,
) -> Option<RequestConfirmed> {
    let bucket = js.get_key_value(REQUESTS_BUCKET).await.ok()?;
    let value = bucket.get(RequestConfirmed::key(id)).await.ok()??;
    Codec::MsgPack.decode(&value).ok()
}

/// Agents' reports of every active member at CPU 0.95, every 500 ms, until
/// `stop`: a cluster that wants more servers.
fn hot_load(stack: &Stack, stop: CancellationToken) {
    let (client, js) = (stack.client.clone(), stack.js.clone());
    tokio::spawn(async move {
        while !stop.is_cancelled() {
            let snapshot = Snapshot::read(&js).await;
            for member in snapshot.active_members("web") {
                let report = PerformanceReport {
                    cpu: Some(0.95),
                    ..PerformanceReport::new(
                        member.clone(),
                        Some(cid("web")),
                        ReportSource::Agent,
                        headroom_shared::time::now_ms(),
                        500,
                    )
                };
                let body = Codec::MsgPack.encode(&report).expect("encode");
                let _ = client
                    .publish(subjects::metrics(Some(&cid("web")), &member), body)
                    .await;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    });
}

fn scaling_policy() -> ClusterPolicy {
    let mut policy = policy(1, 6);
    let s = &mut policy.scaling;
    s.sustain_ms = 1_000;
    s.cooldown_up_ms = 1_000;
    s.max_step = 1;
    s.panic_ratio = 0.0;
    s.confirm_wait_ms = 60_000;
    policy
}

fn allocations(events: &[headroom_shared::wire::AuditEvent]) -> Vec<(u64, RequestId)> {
    events
        .iter()
        .filter(|e| e.kind == EventKind::Decided)
        .filter_map(|e| e.request.clone().map(|r| (e.at_ms, r)))
        .filter(|(_, r)| r.as_str().starts_with("allocate-"))
        .collect()
}

#[tokio::test]
async fn a_change_is_confirmed_only_when_every_live_front_end_routes_by_it() {
    headroom_shared::telemetry::init_for_tests();
    let dir = tempfile::tempdir().expect("tempdir");
    let nats = NatsServer::start_secure().await.expect("nats-server");
    let client = nats.client().await.expect("operator connects");
    let js = async_nats::jetstream::new(client.clone());
    let mut config = nats.config_as("allocator");
    config.allocator.confirm_deadline = DEADLINE;
    config.frontend.report_interval = REPORT_INTERVAL;
    let allocator = RunningAllocator::start_with(config, &nats, "alloc-1").await;
    wait_for_admin(&client).await;
    let stack = Stack {
        nats,
        client,
        js,
        allocator,
    };
    for s in ["s1", "s2", "s3", "s4", "s5"] {
        register(&stack.client, s, &[]).await;
    }
    put_cluster(&stack.client, "web", scaling_policy())
        .await
        .expect("cluster");
    let first = wait_settled(&stack.js).await.cluster("web").clone();

    // Three front-ends, all routing by the first member.
    let applied = follow_applied(stack.client.clone());
    let frontends: Vec<Child> = ["fe-1", "fe-2", "fe-3"]
        .iter()
        .map(|name| spawn_frontend(&stack.nats, name, dir.path()))
        .collect();
    let all_at = |generation: u64| {
        let applied = applied.clone();
        async move {
            let m = applied.borrow().clone();
            (m.len() == 3 && m.values().all(|(g, _)| *g >= generation)).then_some(())
        }
    };
    eventually(WAIT, || all_at(first.generation))
        .await
        .expect("every front-end applies the first membership");
    let up_first = first.members[0].request.clone();
    eventually(WAIT, || confirmation(&stack.js, &up_first))
        .await
        .expect("the first member is confirmed");

    // fe-3 paused just after it spoke, so that it counts as live for
    // three report intervals from now; the cluster runs hot; the monitor
    // scales up once.
    let paused_at = pause_after_word(&applied, &frontends[2], "fe-3").await;
    let monitor_stop = CancellationToken::new();
    let mut monitor_config = stack.nats.config_as("monitor");
    monitor_config.monitor.instance = "monitor-1".to_owned();
    let monitor = tokio::spawn(headroom_monitor::run(
        monitor_config,
        stack
            .nats
            .client_as("monitor")
            .await
            .expect("monitor connects"),
        Ops::new("headroom-monitor"),
        monitor_stop.clone(),
    ));
    let load_stop = CancellationToken::new();
    hot_load(&stack, load_stop.clone());
    let grown = eventually(WAIT, || async {
        let snapshot = Snapshot::read(&stack.js).await;
        let c = snapshot.cluster("web").clone();
        (c.members.len() == 2 && snapshot.settled()).then_some(c)
    })
    .await
    .expect("the monitor's scale-up lands");
    let up = allocations(&audit_log(&stack.js).await);
    assert_eq!(up.len(), 1, "one scale-up: {up:?}");
    let up_second = up[0].1.clone();
    eventually(WAIT, || async {
        let m = applied.borrow().clone();
        (m["fe-1"].0 >= grown.generation && m["fe-2"].0 >= grown.generation).then_some(())
    })
    .await
    .expect("the two running front-ends apply it");

    // Past the deadline: named as lagging, shown so in status, and not
    // confirmed; the monitor, hot all along with a 1 s cooldown, waits.
    let lagging = eventually(WAIT, || async {
        audit_log(&stack.js)
            .await
            .into_iter()
            .find(|e| e.kind == EventKind::Lagging && e.request.as_ref() == Some(&up_second))
    })
    .await
    .expect("the laggard is named");
    assert!(lagging.detail.contains("fe-3"), "{lagging:?}");
    assert!(!lagging.detail.contains("fe-1"), "{lagging:?}");
    let mut out = Vec::new();
    headroom_cli::status(
        &stack.client,
        Duration::from_millis(300),
        DEADLINE,
        &mut out,
    )
    .await
    .expect("status");
    let status = String::from_utf8(out).expect("utf-8");
    println!("{status}");
    // Paused, fe-3 says nothing: status names it, with its generation,
    // from the allocator's word.
    let change = status
        .lines()
        .find(|l| l.starts_with(&format!("  change {up_second}  ")))
        .unwrap_or_else(|| panic!("{status}"));
    assert!(change.contains("not confirmed"), "{change}");
    assert!(
        change.contains("lagging: ")
            && change.contains(&format!("by: fe-3 at {}", first.generation)),
        "{change}"
    );
    assert!(
        confirmation(&stack.js, &up_second).await.is_none(),
        "not confirmed while fe-3 is behind"
    );
    assert_eq!(
        allocations(&audit_log(&stack.js).await).len(),
        1,
        "no second scale-up while the first is unconfirmed"
    );
    assert!(
        paused_at.elapsed() < 3 * REPORT_INTERVAL - Duration::from_millis(500),
        "fe-3 must still count as live: paused {:?}",
        paused_at.elapsed()
    );

    // Resumed: it applies the change, which is then confirmed with it.
    signal(&frontends[2], "-CONT");
    let confirmed = eventually(WAIT, || confirmation(&stack.js, &up_second))
        .await
        .expect("confirmed once fe-3 applies it");
    let by: Vec<&str> = confirmed
        .frontends
        .iter()
        .map(|f| f.frontend.as_str())
        .collect();
    assert_eq!(by, ["fe-1", "fe-2", "fe-3"], "{confirmed:?}");
    assert!(confirmed.gone.is_empty(), "{confirmed:?}");
    assert!(confirmed
        .frontends
        .iter()
        .all(|f| f.generation >= confirmed.generation));
    let waited = confirmed.waited_ms().expect("the decision's time is known");
    assert!(waited >= DEADLINE.as_millis() as u64, "{confirmed:?}");
    let event = eventually(WAIT, || async {
        audit_log(&stack.js)
            .await
            .into_iter()
            .find(|e| e.kind == EventKind::Confirmed && e.request.as_ref() == Some(&up_second))
    })
    .await
    .expect("a confirmed event");
    assert!(
        event
            .detail
            .contains(&format!("{waited} ms after the decision")),
        "{event:?}"
    );
    // The monitor's next scale-up comes after the confirmation, not before.
    let second = eventually(WAIT, || async {
        let up = allocations(&audit_log(&stack.js).await);
        up.get(1).cloned()
    })
    .await
    .expect("the monitor scales up again once confirmed");
    assert!(
        second.0 >= confirmed.confirmed_ms,
        "{second:?} {confirmed:?}"
    );
    load_stop.cancel();
    monitor_stop.cancel();
    monitor
        .await
        .expect("monitor joined")
        .expect("monitor ended cleanly");
    wait_settled(&stack.js).await;

    // fe-3 stopped for good: a change waits for it until it is gone (three
    // report intervals of silence), then is confirmed without it.
    let stopped_at = pause_after_word(&applied, &frontends[2], "fe-3").await;
    let request = ReconfigRequest::new(
        cid("web"),
        ReconfigAction::Allocate {
            count: 1,
            request_type: None,
        },
        "test",
    );
    headroom_shared::bus::request_reconfig(&stack.js, &request)
        .await
        .expect("asked");
    let confirmed = eventually(WAIT, || confirmation(&stack.js, &request.id))
        .await
        .expect("confirmed once fe-3 is gone");
    assert!(
        stopped_at.elapsed() >= 3 * REPORT_INTERVAL - Duration::from_millis(500),
        "confirmed {:?} after fe-3 stopped, before it was gone",
        stopped_at.elapsed()
    );
    assert_eq!(confirmed.gone, ["fe-3"], "{confirmed:?}");
    let by: Vec<&str> = confirmed
        .frontends
        .iter()
        .map(|f| f.frontend.as_str())
        .collect();
    assert_eq!(by, ["fe-1", "fe-2"], "{confirmed:?}");
    let record: ClusterRecord = Snapshot::read(&stack.js).await.cluster("web").clone();
    assert!(record.generation >= confirmed.generation);
    signal(&frontends[2], "-CONT");
    drop(frontends);
    stack.allocator.stop().await;
}
