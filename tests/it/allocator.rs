//! The allocator against a real nats-server: allocation and release end to
//! end, concurrency between two instances, crashes at random points, and
//! bad input.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use async_nats::jetstream;
use futures::StreamExt;
use headroom_shared::bus;
use headroom_shared::codec::{self, Codec};
use headroom_shared::errors::codes;
use headroom_shared::ledger::Outcome;
use headroom_shared::records::{MemberState, ServerState};
use headroom_shared::subjects;
use headroom_shared::time::now_ms;
use headroom_shared::wire::{
    Assignment, AssignmentNotice, ClusterList, EventKind, MembershipChange, ReconfigAction,
    ReconfigRequest, RegisterServer, ServerList, ServerStatus, ServerStatusKind, ERROR_CODE_HEADER,
};
use headroom_shared::{RequestId, ServerId, SCHEMA_VERSION};

use headroom_tests::{eventually, NatsServer};
use rand::Rng;
use tokio_util::sync::CancellationToken;

use crate::common::*;

fn reconfig(cluster: &str, action: ReconfigAction) -> ReconfigRequest {
    ReconfigRequest::new(cid(cluster), action, "test")
}

fn allocate(cluster: &str, count: u32) -> ReconfigRequest {
    let request_type = None;
    reconfig(
        cluster,
        ReconfigAction::Allocate {
            count,
            request_type,
        },
    )
}

fn release(cluster: &str, server: &ServerId) -> ReconfigRequest {
    let server = server.clone();
    reconfig(cluster, ReconfigAction::Release { server })
}

async fn send(js: &jetstream::Context, request: &ReconfigRequest) {
    bus::request_reconfig(js, request)
        .await
        .expect("request stored in the stream");
}

async fn next<T: headroom_shared::Message>(sub: &mut async_nats::Subscriber) -> T {
    let message = tokio::time::timeout(WAIT, sub.next())
        .await
        .expect("message in time")
        .expect("subscription open");
    codec::decode(message.headers.as_ref(), &message.payload).expect("decodes")
}

#[tokio::test]
async fn fills_to_min_allocates_releases_and_allocates_the_released_server_again() {
    let Stack {
        nats: _nats,
        client,
        js,
        allocator,
    } = Stack::start().await;

    for i in 1..=5 {
        register(&client, &format!("s{i}"), &["static"]).await;
    }
    let mut membership = client
        .subscribe(subjects::membership(&cid("web")))
        .await
        .expect("subscribe");
    let web = put_cluster(&client, "web", policy(2, 4))
        .await
        .expect("cluster");
    assert_eq!(web.active(), 2, "filled to min at creation: {web:?}");

    let mut notices = client
        .subscribe("headroom.assign.*")
        .await
        .expect("subscribe");
    let before = Snapshot::read(&js).await;
    let generation = before.cluster("web").generation;
    let request = allocate("web", 1);
    send(&js, &request).await;
    let done = wait_outcome(&js, &request.id).await;
    let Outcome::Applied {
        servers,
        error: None,
    } = done.outcome
    else {
        panic!("allocation applied in full: {done:?}");
    };
    let third = servers[0].clone();

    let after = Snapshot::read(&js).await;
    let web = after.cluster("web");
    assert_eq!(web.active(), 3);
    let member = web.member(&third).expect("listed");
    assert_eq!(member.address, after.server(third.as_str()).address);
    assert_eq!(member.port, 8080);
    assert_eq!(
        after.server(third.as_str()).state,
        ServerState::Allocated {
            cluster: cid("web")
        }
    );
    // Membership changes: the latest one lists the new member, with a
    // higher generation and revision than before.
    let latest = loop {
        let change: MembershipChange = next(&mut membership).await;
        if change.generation == web.generation {
            break change;
        }
    };
    assert!(latest.generation > generation);
    assert!(latest.revision > before.clusters[&cid("web")].1);
    assert!(latest
        .members
        .iter()
        .any(|m| m.server == third && m.state == MemberState::Active));
    let notice: AssignmentNotice = next(&mut notices).await;
    assert_eq!(
        (&notice.server, &notice.assignment),
        (&third, &Assignment::Allocated)
    );

    // Release: drain first, then back to the pool when the server reports
    // it has drained (as its agent does).
    let request = release("web", &third);
    send(&js, &request).await;
    wait_outcome(&js, &request.id).await;
    let draining = Snapshot::read(&js).await;
    assert_eq!(
        draining.cluster("web").member(&third).map(|m| m.state),
        Some(MemberState::Draining)
    );
    assert!(matches!(
        draining.server(third.as_str()).state,
        ServerState::Draining { .. }
    ));
    let notice: AssignmentNotice = next(&mut notices).await;
    assert!(
        matches!(notice.assignment, Assignment::Draining { .. }),
        "{notice:?}"
    );
    let status = ServerStatus {
        v: SCHEMA_VERSION,
        server: third.clone(),
        cluster: Some(cid("web")),
        status: ServerStatusKind::Drained,
        at_ms: now_ms(),
    };
    client
        .publish(
            subjects::status(&third),
            codec::encode(&status).expect("encode"),
        )
        .await
        .expect("publish status");
    let released = wait_settled(&js).await;
    assert_eq!(released.server(third.as_str()).state, ServerState::Free);
    assert!(released.cluster("web").member(&third).is_none());
    let notice: AssignmentNotice = next(&mut notices).await;
    assert_eq!(notice.assignment, Assignment::Released);

    // The next allocation picks it again: its cache is warm for web.
    let request = allocate("web", 1);
    send(&js, &request).await;
    let done = wait_outcome(&js, &request.id).await;
    assert_eq!(
        done.outcome,
        Outcome::Applied {
            servers: vec![third.clone()],
            error: None
        }
    );
    let kinds: Vec<&'static str> = audit_log(&js)
        .await
        .iter()
        .filter(|e| e.server.as_ref() == Some(&third))
        .map(|e| e.kind.token())
        .collect();
    assert_eq!(
        kinds,
        [
            "registered",
            "allocated",
            "drain_started",
            "released",
            "allocated"
        ]
    );
    allocator.stop().await;
}

#[tokio::test]
async fn a_drain_that_never_reports_ends_at_its_deadline() {
    let Stack {
        nats: _nats,
        client,
        js,
        allocator,
    } = Stack::start().await;
    register(&client, "a", &[]).await;
    register(&client, "b", &[]).await;
    put_cluster(&client, "web", policy(1, 2))
        .await
        .expect("cluster");
    let request = allocate("web", 1);
    send(&js, &request).await;
    wait_outcome(&js, &request.id).await;

    let member = Snapshot::read(&js).await.active_members("web")[0].clone();
    let started = tokio::time::Instant::now();
    let request = release("web", &member);
    send(&js, &request).await;
    wait_outcome(&js, &request.id).await;
    let settled = wait_settled(&js).await;
    assert!(
        started.elapsed() >= Duration::from_millis(400),
        "waited for the drain deadline"
    );
    assert_eq!(settled.server(member.as_str()).state, ServerState::Free);
    assert_eq!(settled.cluster("web").size(), 1);

    // At min size now: a further release is refused.
    let last = settled.active_members("web")[0].clone();
    let request = release("web", &last);
    send(&js, &request).await;
    let done = wait_outcome(&js, &request.id).await;
    assert!(
        matches!(&done.outcome, Outcome::Rejected { error } if error.code == codes::AT_MIN_SIZE),
        "{done:?}"
    );
    allocator.stop().await;
}

/// Sends a round of requests built from the membership KV shows now.
fn round(snapshot: &Snapshot, clusters: &[&str], n: usize) -> Vec<ReconfigRequest> {
    let mut rng = rand::rng();
    (0..n)
        .map(|_| {
            let cluster = clusters[rng.random_range(0..clusters.len())];
            let members = snapshot.active_members(cluster);
            if members.is_empty() || rng.random_bool(0.5) {
                allocate(cluster, rng.random_range(1..=2))
            } else {
                release(cluster, &members[rng.random_range(0..members.len())])
            }
        })
        .collect()
}

/// Checks the audit log against the requests: each applied at most once.
pub(crate) fn check_at_most_once(
    events: &[headroom_shared::wire::AuditEvent],
    requests: &[ReconfigRequest],
) {
    let mut allocations: HashMap<&RequestId, HashSet<&ServerId>> = HashMap::new();
    let mut allocation_events: HashMap<&RequestId, usize> = HashMap::new();
    let mut drains: HashMap<&RequestId, usize> = HashMap::new();
    for event in events {
        let (Some(request), Some(server)) = (&event.request, &event.server) else {
            continue;
        };
        match event.kind {
            EventKind::Allocated => {
                allocations.entry(request).or_default().insert(server);
                *allocation_events.entry(request).or_default() += 1;
            }
            EventKind::DrainStarted => *drains.entry(request).or_default() += 1,
            _ => {}
        }
    }
    for request in requests {
        match &request.action {
            ReconfigAction::Allocate { count, .. } => {
                let n = allocation_events.get(&request.id).copied().unwrap_or(0);
                assert!(
                    n <= *count as usize,
                    "request {} asked for {count} and was applied {n} times",
                    request.id
                );
            }
            ReconfigAction::Release { .. } => {
                let n = drains.get(&request.id).copied().unwrap_or(0);
                assert!(n <= 1, "release {} applied {n} times", request.id);
            }
            _ => {}
        }
    }
}

#[tokio::test]
async fn two_allocators_serve_200_concurrent_requests_without_breaking_invariants() {
    let Stack {
        nats,
        client,
        js,
        allocator: a,
    } = Stack::start().await;
    let b = RunningAllocator::start(&nats, "alloc-b").await;
    let registered: Vec<ServerId> = (0..16).map(|i| sid(&format!("s{i:02}"))).collect();
    for id in &registered {
        register(&client, id.as_str(), &[]).await;
    }
    let clusters = ["web", "api", "batch"];
    for c in clusters {
        put_cluster(&client, c, policy(0, 7))
            .await
            .expect("cluster");
    }

    let mut sent = Vec::new();
    for _ in 0..4 {
        let snapshot = Snapshot::read(&js).await;
        let requests = round(&snapshot, &clusters, 50);
        // All at once, and a tenth of them twice, as a retrying monitor would.
        let publishes = requests.iter().chain(requests.iter().step_by(10));
        futures::future::join_all(publishes.map(|r| send(&js, r))).await;
        for request in &requests {
            wait_outcome(&js, &request.id).await;
        }
        sent.extend(requests);
    }
    assert_eq!(sent.len(), 200);
    let settled = wait_settled(&js).await;
    settled
        .check_invariants(&registered)
        .expect("invariants hold");
    check_at_most_once(&audit_log(&js).await, &sent);
    let outcomes = outcomes(&js, &sent).await;
    assert_eq!(outcomes.len(), sent.len(), "one outcome per request");
    let applied = outcomes
        .iter()
        .filter(|o| matches!(o.outcome, Outcome::Applied { .. }))
        .count();
    let by: HashSet<&str> = outcomes.iter().map(|o| o.by.as_str()).collect();
    println!("200 requests: {applied} applied, the rest rejected; served by {by:?}");
    assert_eq!(by.len(), 2, "both allocators took requests: {by:?}");
    a.stop().await;
    b.stop().await;
}

#[tokio::test]
async fn crashes_at_random_points_lose_no_request_and_keep_invariants() {
    let Stack {
        nats,
        client,
        js,
        allocator: first,
    } = Stack::start().await;
    let registered: Vec<ServerId> = (0..10).map(|i| sid(&format!("s{i}"))).collect();
    for id in &registered {
        register(&client, id.as_str(), &[]).await;
    }
    for c in ["web", "api"] {
        put_cluster(&client, c, policy(1, 5))
            .await
            .expect("cluster");
    }
    first.stop().await;

    let mut rng = rand::rng();
    let mut sent = Vec::new();
    let trials = 40;
    for trial in 0..trials {
        let allocator = RunningAllocator::start(&nats, &format!("alloc-{trial}")).await;
        let snapshot = Snapshot::read(&js).await;
        let requests = round(&snapshot, &["web", "api"], 6);
        futures::future::join_all(requests.iter().map(|r| send(&js, r))).await;
        sent.extend(requests);
        // Kill it somewhere in the middle of its work: the task is aborted,
        // as a process is killed, with no chance to finish a step.
        tokio::time::sleep(Duration::from_millis(rng.random_range(0..60))).await;
        allocator.task.abort();
        let _ = allocator.task.await;
    }
    let last = RunningAllocator::start(&nats, "alloc-final").await;
    for request in &sent {
        wait_outcome(&js, &request.id).await;
    }
    let settled = wait_settled(&js).await;
    settled
        .check_invariants(&registered)
        .expect("invariants hold after crashes");
    let events = audit_log(&js).await;
    check_at_most_once(&events, &sent);
    let repairs = events
        .iter()
        .filter(|e| e.kind == EventKind::Repaired)
        .count();
    let redelivered = outcomes(&js, &sent)
        .await
        .iter()
        .filter(|o| o.delivery > 1)
        .count();
    println!(
        "{trials} crashes, {} requests: {repairs} repairs of half-done state, \
         {redelivered} requests applied on a later delivery",
        sent.len()
    );
    assert!(
        repairs + redelivered > 0,
        "the crashes never hit work in flight, so this run proved nothing"
    );
    last.stop().await;
}

#[tokio::test]
async fn bad_input_gets_a_clear_error_event_and_changes_nothing() {
    let Stack {
        nats: _nats,
        client,
        js,
        allocator,
    } = Stack::start().await;
    register(&client, "a", &["static"]).await;
    register(&client, "b", &["static"]).await;
    put_cluster(&client, "web", policy(1, 1))
        .await
        .expect("web");
    put_cluster(&client, "batch", policy(1, 3))
        .await
        .expect("batch");
    let before = Snapshot::read(&js).await;
    assert_eq!(
        before.cluster("web").size() + before.cluster("batch").size(),
        2
    );
    let web_member = before.active_members("web")[0].clone();
    let batch_member = before.active_members("batch")[0].clone();

    let mut rejections = client
        .subscribe("headroom.events.*.rejected")
        .await
        .expect("subscribe");
    // A body that is not MessagePack at all.
    js.publish("headroom.reconfig.web", "not msgpack".into())
        .await
        .expect("publish")
        .await
        .expect("stored");
    let mut future = allocate("web", 1);
    future.v = 99;
    let mismatched = allocate("batch", 1);
    let cases = [
        (allocate("nowhere", 1), codes::UNKNOWN_CLUSTER),
        (release("web", &batch_member), codes::NOT_A_MEMBER),
        (allocate("batch", 1), codes::POOL_EXHAUSTED),
        (allocate("web", 1), codes::AT_MAX_SIZE),
        (release("web", &web_member), codes::AT_MIN_SIZE),
        (
            reconfig(
                "batch",
                ReconfigAction::Reweight {
                    server: batch_member.clone(),
                    weight: f64::NAN,
                },
            ),
            codes::INVALID,
        ),
    ];
    let malformed = next::<headroom_shared::wire::AuditEvent>(&mut rejections).await;
    assert!(
        matches!(&malformed.kind, EventKind::Rejected { error } if error.code == codes::MALFORMED),
        "{malformed:?}"
    );
    assert_eq!(malformed.cluster, Some(cid("web")));

    for (request, code) in &cases {
        send(&js, request).await;
        let got = next::<headroom_shared::wire::AuditEvent>(&mut rejections).await;
        assert_eq!(got.request.as_ref(), Some(&request.id));
        let EventKind::Rejected { error } = &got.kind else {
            panic!("{got:?}");
        };
        assert_eq!(error.code, *code, "{}: {error}", request.action.name());
        assert!(!error.message.is_empty());
    }
    // A newer schema version and a request on another cluster's subject.
    bus::publish_durable(
        &js,
        subjects::reconfig(&cid("web")),
        future.id.as_str(),
        Codec::MsgPack,
        &future,
    )
    .await
    .expect("publish");
    let got = next::<headroom_shared::wire::AuditEvent>(&mut rejections).await;
    assert!(
        matches!(&got.kind, EventKind::Rejected { error } if error.code == codes::UNSUPPORTED_VERSION),
        "{got:?}"
    );
    bus::publish_durable(
        &js,
        subjects::reconfig(&cid("web")),
        mismatched.id.as_str(),
        Codec::Json,
        &mismatched,
    )
    .await
    .expect("publish");
    let got = next::<headroom_shared::wire::AuditEvent>(&mut rejections).await;
    assert!(
        matches!(&got.kind, EventKind::Rejected { error } if error.code == codes::SUBJECT_MISMATCH),
        "{got:?}"
    );

    let after = Snapshot::read(&js).await;
    let revisions = |s: &Snapshot| {
        (
            s.servers.values().map(|(_, r)| *r).collect::<Vec<_>>(),
            s.clusters.values().map(|(_, r)| *r).collect::<Vec<_>>(),
        )
    };
    assert_eq!(
        revisions(&before),
        revisions(&after),
        "KV unchanged by bad input"
    );

    // Bad admin input: a clear error code, nothing registered.
    let bad_id = client
        .request_with_headers(
            format!(
                "{}.{}",
                subjects::ADMIN_GROUP,
                subjects::admin::POOL_REGISTER
            ),
            Codec::Json.headers(),
            r#"{"v":1,"id":"a.b","address":"h","port":1}"#.into(),
        )
        .await
        .expect("reply");
    let code = bad_id
        .headers
        .as_ref()
        .and_then(|h| h.get(headroom_shared::wire::ERROR_CODE_HEADER))
        .map(|v| v.to_string());
    assert_eq!(code.as_deref(), Some(codes::MALFORMED));

    // And it keeps serving: a new server makes the allocation possible.
    register(&client, "c", &["static"]).await;
    let request = allocate("batch", 1);
    send(&js, &request).await;
    let done = wait_outcome(&js, &request.id).await;
    assert_eq!(
        done.outcome,
        Outcome::Applied {
            servers: vec![sid("c")],
            error: None
        }
    );
    allocator.stop().await;
}

#[tokio::test]
async fn admin_speaks_json_and_xml_and_is_discoverable() {
    let Stack {
        nats: _nats,
        client,
        js,
        allocator,
    } = Stack::start().await;

    let registered: headroom_shared::records::ServerRecord = admin(
        &client,
        subjects::admin::POOL_REGISTER,
        &RegisterServer {
            v: SCHEMA_VERSION,
            id: sid("x1"),
            address: "backend-1".into(),
            port: 9000,
            request_types: vec!["static".into()],
        },
        Codec::Xml,
    )
    .await
    .expect("register over XML");
    assert_eq!(registered.state, ServerState::Free);
    put_cluster(&client, "web", policy(0, 2))
        .await
        .expect("cluster");
    let pool: ServerList = admin(
        &client,
        subjects::admin::POOL_LIST,
        &headroom_shared::wire::Empty::new(),
        Codec::Json,
    )
    .await
    .expect("list over JSON");
    assert_eq!(pool.servers.len(), 1);
    assert_eq!(pool.servers[0].address, "backend-1");
    let clusters: ClusterList = admin(
        &client,
        subjects::admin::CLUSTER_LIST,
        &headroom_shared::wire::Empty::new(),
        Codec::Xml,
    )
    .await
    .expect("clusters over XML");
    assert_eq!(clusters.clusters.len(), 1);

    // Standard NATS tooling finds it through the services API.
    let ping = client
        .request("$SRV.PING.headroom-allocator", "".into())
        .await
        .expect("ping answered");
    let ping: serde_json::Value = serde_json::from_slice(&ping.payload).expect("json");
    assert_eq!(ping["name"], "headroom-allocator");
    let info = client
        .request("$SRV.INFO.headroom-allocator", "".into())
        .await
        .expect("info answered");
    let info: serde_json::Value = serde_json::from_slice(&info.payload).expect("json");
    let endpoints: Vec<&str> = info["endpoints"]
        .as_array()
        .expect("endpoints")
        .iter()
        .filter_map(|e| e["subject"].as_str())
        .collect();
    assert!(
        endpoints.contains(&"headroom.admin.pool.register"),
        "{endpoints:?}"
    );

    // A drain by hand that could never apply is refused at once, with the
    // stable code, and queues nothing.
    let queued_before = stream_messages(&js, subjects::RECONFIG_STREAM).await;
    for (cluster, server, code) in [
        ("web", "x1", codes::NOT_A_MEMBER),
        ("nope", "x1", codes::UNKNOWN_CLUSTER),
        ("web", "ghost", codes::UNKNOWN_SERVER),
    ] {
        let refused = admin::<_, headroom_shared::wire::DrainQueued>(
            &client,
            subjects::admin::MEMBER_DRAIN,
            &headroom_shared::wire::DrainMember {
                v: SCHEMA_VERSION,
                cluster: cid(cluster),
                server: sid(server),
            },
            Codec::MsgPack,
        )
        .await;
        assert_eq!(
            refused.map_err(|(code, _)| code).err().as_deref(),
            Some(code),
            "drain of {server} from {cluster}"
        );
    }
    assert_eq!(
        stream_messages(&js, subjects::RECONFIG_STREAM).await,
        queued_before,
        "a refused drain queues no request"
    );
    // The list calls take an empty body or an empty message, nothing else.
    let listed = client
        .request(
            format!(
                "{}.{}",
                subjects::ADMIN_GROUP,
                subjects::admin::CLUSTER_LIST
            ),
            "".into(),
        )
        .await
        .expect("answered");
    assert!(listed
        .headers
        .is_none_or(|h| h.get(ERROR_CODE_HEADER).is_none()));
    let garbage = client
        .request(
            format!("{}.{}", subjects::ADMIN_GROUP, subjects::admin::POOL_LIST),
            "\u{1}garbage".into(),
        )
        .await
        .expect("answered");
    assert_eq!(
        garbage
            .headers
            .as_ref()
            .and_then(|h| h.get(ERROR_CODE_HEADER))
            .map(|v| v.as_str()),
        Some(codes::MALFORMED)
    );
    allocator.stop().await;
}

#[tokio::test]
async fn replace_reweight_and_deregister() {
    let Stack {
        nats: _nats,
        client,
        js,
        allocator,
    } = Stack::start().await;
    for id in ["a", "b", "c"] {
        register(&client, id, &[]).await;
    }
    put_cluster(&client, "web", policy(2, 3))
        .await
        .expect("cluster");
    let members = Snapshot::read(&js).await.active_members("web");
    let (dead, hot) = (members[0].clone(), members[1].clone());

    // A member that went silent is replaced: out of service, not back in
    // the pool, and the spare takes its place.
    let request = reconfig(
        "web",
        ReconfigAction::Replace {
            server: dead.clone(),
        },
    );
    send(&js, &request).await;
    let done = wait_outcome(&js, &request.id).await;
    let Outcome::Applied {
        servers,
        error: None,
    } = &done.outcome
    else {
        panic!("replacement applied: {done:?}");
    };
    let after = Snapshot::read(&js).await;
    assert!(matches!(
        after.server(dead.as_str()).state,
        ServerState::OutOfService { .. }
    ));
    assert!(after.cluster("web").member(&dead).is_none());
    assert_eq!(after.cluster("web").active(), 2);
    assert!(after.cluster("web").member(&servers[0]).is_some());
    let registered: Vec<ServerId> = ["a", "b", "c"].iter().map(|s| sid(s)).collect();
    after.check_invariants(&registered).expect("invariants");

    // Reweight: the weight is in the cluster record and in the membership
    // change front-ends receive.
    let mut membership = client
        .subscribe(subjects::membership(&cid("web")))
        .await
        .expect("subscribe");
    let request = reconfig(
        "web",
        ReconfigAction::Reweight {
            server: hot.clone(),
            weight: 0.25,
        },
    );
    send(&js, &request).await;
    wait_outcome(&js, &request.id).await;
    let change: MembershipChange = next(&mut membership).await;
    let weight = |members: &[headroom_shared::records::Member]| {
        members.iter().find(|m| m.server == hot).map(|m| m.weight)
    };
    assert_eq!(weight(&change.members), Some(0.25));
    assert_eq!(
        weight(&Snapshot::read(&js).await.cluster("web").members),
        Some(0.25)
    );

    // Deregister: refused while in use, allowed once out of service.
    let in_use = deregister(&client, &hot)
        .await
        .expect_err("a member cannot be deregistered");
    assert_eq!(in_use.0, codes::SERVER_IN_USE);
    deregister(&client, &dead)
        .await
        .expect("an out-of-service server can be deregistered");
    assert!(!Snapshot::read(&js).await.servers.contains_key(&dead));
    allocator.stop().await;
}

/// JetStream that cannot yet do what set-up asks (here a stream squatting
/// on the servers bucket's subjects; in a new 3-node cluster, placement
/// before the peers know each other) is waited out: the allocator says why
/// it is not ready, tries again, and serves once set-up goes through.
#[tokio::test]
async fn set_up_that_jetstream_refuses_at_first_is_tried_again() {
    let nats = NatsServer::start().await.expect("nats-server");
    let client = nats.client().await.expect("client");
    let js = jetstream::new(client.clone());
    let squatter = format!("$KV.{}.>", headroom_shared::kv::SERVERS_BUCKET);
    js.create_stream(jetstream::stream::Config {
        name: "squatter".to_owned(),
        subjects: vec![squatter],
        ..Default::default()
    })
    .await
    .expect("squatting stream");

    let allocator = RunningAllocator::start(&nats, "a-1").await;
    let waiting = eventually(WAIT, || async {
        match allocator.ops.readiness() {
            Err(why) if why.contains("setting up") => Some(why),
            _ => None,
        }
    })
    .await;
    assert!(waiting.is_some(), "not ready while set-up fails");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!allocator.task.is_finished(), "it did not give up at once");

    js.delete_stream("squatter").await.expect("delete squatter");
    let ready = eventually(WAIT, || async { allocator.ops.readiness().ok() }).await;
    assert!(ready.is_some(), "ready once set-up goes through");
    allocator.stop().await;
}

/// An allocator's operations on their own, with no consumer, reconciler or
/// admin service beside them, so a test decides every step; its view of
/// the pool follows KV until the token is cancelled.
async fn bare_allocator_following(
    nats: &NatsServer,
) -> (headroom_allocator::Allocator, CancellationToken) {
    let client = nats.client().await.expect("connect");
    let js = jetstream::new(client.clone());
    let store = headroom_allocator::store::Store::open(&js, 1)
        .await
        .expect("buckets");
    let (pool, follower) = headroom_allocator::pool::view();
    let following = CancellationToken::new();
    tokio::spawn(follower.follow(store.servers_bucket(), following.clone()));
    pool.wait_current(&following).await;
    let ops = headroom_allocator::Allocator::new(store, pool, js, client, "bare".into());
    (ops, following)
}

async fn bare_allocator(nats: &NatsServer) -> headroom_allocator::Allocator {
    bare_allocator_following(nats).await.0
}

fn joins(outcome: &Outcome) -> Vec<ServerId> {
    match outcome {
        Outcome::Applied { servers, .. } => servers.clone(),
        Outcome::Rejected { .. } => Vec::new(),
    }
}

#[tokio::test]
async fn a_redelivered_release_leaves_alone_a_server_that_joined_again_since() {
    let stack = Stack::start().await;
    for i in 1..=3 {
        register(&stack.client, &format!("s{i}"), &[]).await;
    }
    put_cluster(&stack.client, "web", policy(1, 4))
        .await
        .expect("cluster");
    stack.allocator.stop().await;
    let ops = bare_allocator(&stack.nats).await;
    let added = ops.apply(&allocate("web", 1)).await.expect("allocated");
    let server = joins(&added)[0].clone();

    // The release drains it, the drain completes, and a later request
    // puts the same server back (the warmest for this cluster).
    let release = release("web", &server);
    ops.apply(&release).await.expect("released");
    ops.finish_drain(&cid("web"), &server, "test")
        .await
        .expect("drained");
    let again = ops.apply(&allocate("web", 1)).await.expect("allocated");
    assert_eq!(
        joins(&again),
        vec![server.clone()],
        "the same server is back"
    );

    // The release is delivered again (its first delivery died before its
    // ack): it must not drain the new join.
    let redelivered = ops.apply(&release).await.expect("answered");
    assert_eq!(joins(&redelivered), vec![server.clone()], "{redelivered:?}");
    let snapshot = Snapshot::read(&stack.js).await;
    assert!(
        snapshot.active_members("web").contains(&server),
        "{server} stays: {:?}",
        snapshot.cluster("web").members
    );
}

#[tokio::test]
async fn a_redelivered_allocation_counts_its_joins_not_its_servers() {
    let stack = Stack::start().await;
    for i in 1..=3 {
        register(&stack.client, &format!("s{i}"), &[]).await;
    }
    put_cluster(&stack.client, "web", policy(0, 6))
        .await
        .expect("cluster");
    stack.allocator.stop().await;
    let ops = bare_allocator(&stack.nats).await;
    // Three asked, two made: one server is kept out of the pool for now.
    let request = allocate("web", 3);
    let spare = sid("s3");
    ops.deregister(&spare).await.expect("out of the pool");
    let first = ops.apply(&request).await.expect("partly applied");
    let made = joins(&first);
    assert_eq!(made.len(), 2, "{first:?}");

    // One of its joins is released and the server goes back to the pool;
    // the spare returns too.
    let gone = made[0].clone();
    ops.apply(&release("web", &gone)).await.expect("released");
    ops.finish_drain(&cid("web"), &gone, "test")
        .await
        .expect("drained");
    ops.register(
        &RegisterServer {
            v: SCHEMA_VERSION,
            id: spare.clone(),
            address: "10.0.0.3".into(),
            port: 8080,
            request_types: vec![],
        },
        false,
    )
    .await
    .expect("back in the pool");

    // Delivered again, it makes exactly one more join: three in all.
    let again = ops.apply(&request).await.expect("applied");
    assert_eq!(joins(&again).len(), 3, "{again:?}");
    let again = ops.apply(&request).await.expect("applied");
    assert_eq!(joins(&again).len(), 3, "and no more: {again:?}");
    let snapshot = Snapshot::read(&stack.js).await;
    let mine = snapshot
        .cluster("web")
        .members
        .iter()
        .filter(|m| m.request == request.id)
        .count();
    assert_eq!(mine, 2, "two of its three joins are members now");
}

#[tokio::test]
async fn a_cluster_put_replies_with_its_own_write_and_keeps_it_when_the_pool_is_short() {
    let stack = Stack::start().await;
    register(&stack.client, "s1", &[]).await;
    // More than the pool holds: the policy is stored, not refused.
    let short = put_cluster(&stack.client, "web", policy(3, 6))
        .await
        .expect("stored");
    assert_eq!(short.policy.min_size, 3);
    assert_eq!(short.active(), 1, "filled as far as the pool allows");
    assert_eq!(
        Snapshot::read(&stack.js)
            .await
            .cluster("web")
            .policy
            .min_size,
        3
    );

    // Two writers at once: each reply shows the policy it wrote.
    let asked = [policy(1, 10), policy(3, 6)];
    let replies = futures::future::join_all(
        asked
            .iter()
            .map(|p| put_cluster(&stack.client, "api", p.clone())),
    )
    .await;
    for (asked, reply) in asked.iter().zip(replies) {
        let reply = reply.expect("stored");
        assert_eq!(
            (reply.policy.min_size, reply.policy.max_size),
            (asked.min_size, asked.max_size)
        );
    }
    stack.allocator.stop().await;
}

/// Ids of the free servers `ops` would choose for `cluster` now.
async fn choice(
    ops: &headroom_allocator::Allocator,
    js: &jetstream::Context,
    cluster: &str,
) -> Vec<ServerId> {
    let record = Snapshot::read(js).await.cluster(cluster).clone();
    ops.pool()
        .candidates(&record, None, 3)
        .into_iter()
        .map(|s| s.id)
        .collect()
}

#[tokio::test]
async fn the_pool_view_follows_what_another_instance_does() {
    let stack = Stack::start().await;
    put_cluster(&stack.client, "web", policy(0, 4))
        .await
        .expect("cluster");
    let (other, _following) = bare_allocator_following(&stack.nats).await;
    let sees = |wanted: Vec<ServerId>| {
        let (other, js) = (&other, &stack.js);
        async move {
            eventually(WAIT, || {
                let wanted = wanted.clone();
                async move { (choice(other, js, "web").await == wanted).then_some(()) }
            })
            .await
            .is_some()
        }
    };
    // Registered by the serving instance: this one's choice has it.
    register(&stack.client, "s1", &[]).await;
    assert!(sees(vec![sid("s1")]).await, "a registration shows up");
    // Allocated by the serving instance: no longer a choice.
    let request = allocate("web", 1);
    send(&stack.js, &request).await;
    wait_outcome(&stack.js, &request.id).await;
    assert!(sees(vec![]).await, "an allocation shows up");
    // Released and back in the pool: a choice again.
    let request = release("web", &sid("s1"));
    send(&stack.js, &request).await;
    wait_outcome(&stack.js, &request.id).await;
    assert!(sees(vec![sid("s1")]).await, "a release shows up");
    // Removed: gone.
    deregister(&stack.client, &sid("s1"))
        .await
        .expect("deregistered");
    assert!(sees(vec![]).await, "a removal shows up");
    assert!(other.pool().is_empty());
    stack.allocator.stop().await;
}

#[tokio::test]
async fn a_stale_view_never_assigns_a_server_twice() {
    let stack = Stack::start().await;
    register(&stack.client, "last", &[]).await;
    for c in ["web", "api"] {
        put_cluster(&stack.client, c, policy(0, 4))
            .await
            .expect("cluster");
    }
    stack.allocator.stop().await;
    let fresh = bare_allocator(&stack.nats).await;
    // This one's view stops following: it will think `last` is free.
    let (stale, following) = bare_allocator_following(&stack.nats).await;
    following.cancel();
    let won = fresh.apply(&allocate("web", 1)).await.expect("allocated");
    assert_eq!(joins(&won), vec![sid("last")]);
    assert_eq!(
        choice(&stale, &stack.js, "api").await,
        vec![sid("last")],
        "the stale view still offers it"
    );
    // It tries, its claim finds the record moved, and it ends cleanly.
    let lost = stale.apply(&allocate("api", 1)).await;
    assert!(
        matches!(&lost, Err(headroom_allocator::ops::OpError::Rejected(e)) if e.code == codes::POOL_EXHAUSTED),
        "{lost:?}"
    );
    assert!(
        choice(&stale, &stack.js, "api").await.is_empty(),
        "the read refreshed it"
    );
    let snapshot = Snapshot::read(&stack.js).await;
    snapshot
        .check_invariants(&[sid("last")])
        .expect("one place per server");
    assert!(snapshot.cluster("api").members.is_empty());

    // Two current views racing for one server: one winner, one clean miss.
    let ops = fresh;
    ops.register(
        &RegisterServer {
            v: SCHEMA_VERSION,
            id: sid("one"),
            address: "10.0.0.9".into(),
            port: 8080,
            request_types: vec![],
        },
        false,
    )
    .await
    .expect("registered");
    let (other, _following) = bare_allocator_following(&stack.nats).await;
    let (to_web, to_api) = (allocate("web", 1), allocate("api", 1));
    let (a, b) = tokio::join!(ops.apply(&to_web), other.apply(&to_api));
    let winners = [&a, &b].iter().filter(|r| r.is_ok()).count();
    assert_eq!(winners, 1, "{a:?} {b:?}");
    Snapshot::read(&stack.js)
        .await
        .check_invariants(&[sid("last"), sid("one")])
        .expect("one place per server");
}

#[tokio::test]
async fn an_allocation_reads_the_cluster_once_and_nothing_it_wrote() {
    let stack = Stack::start().await;
    register(&stack.client, "s1", &[]).await;
    put_cluster(&stack.client, "web", policy(0, 4))
        .await
        .expect("cluster");
    stack.allocator.stop().await;
    let ops = bare_allocator(&stack.nats).await;
    let calls = ops.store().calls();
    let count = |op: &str, bucket: &str| calls.get(&[op, bucket]).unwrap_or(0);
    let before: Vec<u64> = KV_CALLS.iter().map(|(op, b)| count(op, b)).collect();
    let outcome = ops.apply(&allocate("web", 1)).await.expect("allocated");
    assert_eq!(joins(&outcome), vec![sid("s1")]);
    let made: Vec<(&str, &str, u64)> = KV_CALLS
        .iter()
        .zip(before)
        .map(|((op, b), was)| (*op, *b, count(op, b) - was))
        .filter(|(_, _, n)| *n > 0)
        .collect();
    // The cluster read once (for the taken-up mark), the server never
    // (claimed on the view's revision), nothing read back after a write.
    // (The outcome's read and write are the consumer's, around `apply`.)
    assert_eq!(
        made,
        vec![
            ("get", "clusters", 1),
            ("update", "clusters", 2),
            ("update", "servers", 1),
            ("create", "requests", 1),
        ],
        "the allocation's KV calls"
    );
}

/// Every operation and bucket an allocation might call.
const KV_CALLS: [(&str, &str); 9] = [
    ("get", "clusters"),
    ("get", "servers"),
    ("get", "requests"),
    ("update", "clusters"),
    ("update", "servers"),
    ("create", "clusters"),
    ("create", "servers"),
    ("create", "requests"),
    ("sweep", "clusters"),
];

#[tokio::test]
async fn allocates_with_ten_thousand_servers_registered() {
    let stack = Stack::start().await;
    stack.allocator.stop().await;
    let store = headroom_allocator::store::Store::open(&stack.js, 1)
        .await
        .expect("buckets");
    let started = std::time::Instant::now();
    let ids: Vec<ServerId> = (0..10_000).map(|i| sid(&format!("s{i:05}"))).collect();
    for chunk in ids.chunks(500) {
        futures::future::try_join_all(chunk.iter().map(|id| {
            let record = headroom_shared::records::ServerRecord::new_free(
                id.clone(),
                "10.0.0.1".into(),
                8080,
                vec![],
                now_ms(),
            );
            let store = store.clone();
            async move { store.put_server(&record, 0).await }
        }))
        .await
        .expect("registered");
    }
    let registered = started.elapsed();
    let allocator = RunningAllocator::start(&stack.nats, "alloc-big").await;
    wait_for_admin(&stack.client).await;
    put_cluster(&stack.client, "web", policy(0, 8))
        .await
        .expect("cluster");
    let request = allocate("web", 3);
    let asked = std::time::Instant::now();
    send(&stack.js, &request).await;
    let done = wait_outcome(&stack.js, &request.id).await;
    println!(
        "10,000 servers: registered in {registered:?}; an allocation of 3 took {:?}",
        asked.elapsed()
    );
    assert_eq!(joins(&done.outcome).len(), 3, "{done:?}");
    allocator.stop().await;
}

#[tokio::test]
async fn one_sweep_reads_the_latest_value_of_every_key_and_leaves_out_deleted_ones() {
    let nats = NatsServer::start().await.expect("nats-server");
    let client = nats.client().await.expect("connect");
    let js = jetstream::new(client);
    let bucket = headroom_shared::kv::open_bucket(&js, headroom_shared::kv::Bucket::Clusters, 1)
        .await
        .expect("bucket");
    assert!(headroom_shared::kv::latest_entries(&bucket)
        .await
        .expect("sweep of an empty bucket")
        .is_empty());
    let mut latest = HashMap::new();
    for round in 0..3 {
        for key in 0..50 {
            let value = format!("c{key} v{round}");
            let revision = bucket
                .put(format!("c{key}"), value.clone().into())
                .await
                .expect("put");
            latest.insert(format!("c{key}"), (revision, value));
        }
    }
    for key in 40..50 {
        bucket.delete(format!("c{key}")).await.expect("delete");
        latest.remove(&format!("c{key}"));
    }
    bucket.purge("c39").await.expect("purge");
    latest.remove("c39");
    let swept: HashMap<String, (u64, String)> = headroom_shared::kv::latest_entries(&bucket)
        .await
        .expect("sweep")
        .into_iter()
        .map(|(key, revision, value)| {
            (
                key,
                (revision, String::from_utf8_lossy(&value).into_owned()),
            )
        })
        .collect();
    assert_eq!(swept, latest);
}
