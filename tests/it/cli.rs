//! The operator CLI against a live system: what it prints is what KV and
//! the subjects hold, read directly.

use std::time::Duration;

use headroom_shared::codec::Codec;
use headroom_shared::kv::SERVERS_BUCKET;
use headroom_shared::records::{ServerRecord, ServerState};
use headroom_shared::subjects;
use headroom_shared::wire::{FrontendApplied, PerformanceReport, ReportSource};
use headroom_shared::SCHEMA_VERSION;

use crate::common::{cid, policy, put_cluster, register, sid, Snapshot, Stack, WAIT};

async fn server_record(js: &async_nats::jetstream::Context, id: &str) -> ServerRecord {
    let bucket = js.get_key_value(SERVERS_BUCKET).await.expect("bucket");
    let value = bucket.get(id).await.expect("get").expect("in KV");
    Codec::MsgPack.decode(&value).expect("record")
}

fn text(out: Vec<u8>) -> String {
    String::from_utf8(out).expect("utf-8")
}

#[tokio::test]
async fn status_pool_and_drain_print_what_kv_holds() {
    let stack = Stack::start().await;
    for s in ["c1", "c2", "c3"] {
        register(&stack.client, s, &[]).await;
    }
    put_cluster(&stack.client, "web", policy(2, 3))
        .await
        .expect("cluster");
    let snapshot = crate::common::wait_settled(&stack.js).await;
    let members = snapshot.active_members("web");
    assert_eq!(members.len(), 2);

    // An agent's report for one member, so status shows its CPU.
    let reporter = {
        let client = stack.client.clone();
        let member = members[0].clone();
        tokio::spawn(async move {
            loop {
                let report = PerformanceReport {
                    cpu: Some(0.42),
                    ..PerformanceReport::new(
                        member.clone(),
                        Some(cid("web")),
                        ReportSource::Agent,
                        1,
                        100,
                    )
                };
                let _ = client
                    .publish(
                        subjects::metrics(Some(&cid("web")), &member),
                        Codec::MsgPack.encode(&report).expect("encode"),
                    )
                    .await;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
    };
    // Two front-ends' word on the generation they route by: one current,
    // one a generation behind.
    let record = snapshot.cluster("web").clone();
    let saying = {
        let client = stack.client.clone();
        let generation = record.generation;
        tokio::spawn(async move {
            loop {
                for (frontend, generation) in [("fe-a", generation), ("fe-b", generation - 1)] {
                    let said = FrontendApplied {
                        v: SCHEMA_VERSION,
                        cluster: cid("web"),
                        frontend: frontend.to_owned(),
                        generation,
                        interval_ms: 100,
                        at_ms: 1,
                        draining: Vec::new(),
                    };
                    let subject = subjects::frontend_applied(&cid("web"), frontend);
                    let _ = headroom_shared::bus::publish(&client, subject, &said).await;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
    };
    // Behind for longer than a deadline of nothing: lagging; within an
    // hour's: applying.
    let status_with = |deadline: Duration| {
        let client = stack.client.clone();
        async move {
            let mut out = Vec::new();
            headroom_cli::status(&client, Duration::from_millis(400), deadline, &mut out)
                .await
                .expect("status");
            text(out)
        }
    };
    let status = status_with(Duration::ZERO).await;
    let patient = status_with(Duration::from_secs(3600)).await;
    reporter.abort();
    saying.abort();
    let generation = record.generation;
    assert!(
        status.contains(&format!(
            "front-end fe-a       generation {generation}  applied (lag 0)"
        )),
        "{status}"
    );
    let behind = format!("front-end fe-b       generation {}  ", generation - 1);
    assert!(
        status.contains(&format!("{behind}lagging (lag 1, ")),
        "{status}"
    );
    assert!(
        patient.contains(&format!("{behind}applying (lag 1, ")),
        "{patient}"
    );
    // Each member's arrival is a change whose confirmation is shown (fe-b
    // may have held it back, or been heard too late to).
    for m in &record.members {
        assert!(
            status.contains(&format!("  change {}  ", m.request)),
            "{status}"
        );
    }
    assert!(
        status.contains(&format!("cluster web  generation {}", record.generation)),
        "{status}"
    );
    for m in &members {
        assert!(status.contains(m.as_str()), "{status}");
    }
    assert!(status.contains("cpu 0.42"), "{status}");
    assert!(
        status.contains("pool: 3 servers (allocated 2, free 1)"),
        "{status}"
    );

    // pool add / list / remove against KV.
    let mut out = Vec::new();
    headroom_cli::pool_add(
        &stack.client,
        "c4",
        "10.9.9.9",
        8081,
        vec!["static".into()],
        &mut out,
    )
    .await
    .expect("add");
    let added = server_record(&stack.js, "c4").await;
    assert_eq!(added.state, ServerState::Free);
    assert_eq!((added.address.as_str(), added.port), ("10.9.9.9", 8081));
    let mut out = Vec::new();
    headroom_cli::pool_list(&stack.client, &mut out)
        .await
        .expect("list");
    let list = text(out);
    assert_eq!(list.lines().count(), 4, "{list}");
    assert!(list.contains("c4 free 10.9.9.9:8081"), "{list}");
    let mut out = Vec::new();
    headroom_cli::pool_remove(&stack.client, "c4", &mut out)
        .await
        .expect("remove");
    assert!(!Snapshot::read(&stack.js)
        .await
        .servers
        .contains_key(&sid("c4")));
    // Removing a member is refused with the allocator's reason.
    let err = headroom_cli::pool_remove(&stack.client, members[0].as_str(), &mut Vec::new())
        .await
        .expect_err("a member cannot be removed");
    assert!(err.to_string().contains("server_in_use"), "{err}");

    // drain: with the minimum lowered to 1, the member leaves the cluster.
    put_cluster(&stack.client, "web", policy(1, 3))
        .await
        .expect("policy");
    let mut out = Vec::new();
    headroom_cli::drain(&stack.client, "web", members[1].as_str(), &mut out)
        .await
        .expect("drain");
    assert!(text(out).contains("queued as request"));
    let gone = headroom_tests::eventually(WAIT, || async {
        let snapshot = Snapshot::read(&stack.js).await;
        (!snapshot
            .cluster("web")
            .members
            .iter()
            .any(|m| m.server == members[1]))
        .then_some(())
    })
    .await;
    assert!(gone.is_some(), "drained and removed");
}

#[tokio::test]
async fn kv_watch_events_and_services_show_the_wire_readably() {
    let stack = Stack::start().await;
    register(&stack.client, "k1", &["api"]).await;
    let record = server_record(&stack.js, "k1").await;

    let mut out = Vec::new();
    headroom_cli::kv_get(&stack.client, SERVERS_BUCKET, "k1", false, &mut out)
        .await
        .expect("kv get");
    let line = text(out);
    assert!(line.starts_with("k1 @"), "{line}");
    let json: serde_json::Value =
        serde_json::from_str(line.splitn(4, ' ').nth(3).expect("value")).expect("JSON");
    assert_eq!(json["address"], record.address.as_str());
    assert_eq!(json["request_types"][0], "api");
    let mut out = Vec::new();
    headroom_cli::kv_list(&stack.client, SERVERS_BUCKET, &mut out)
        .await
        .expect("kv list");
    assert!(text(out).starts_with("k1 @"));
    let err = headroom_cli::kv_get(
        &stack.client,
        SERVERS_BUCKET,
        "nope",
        false,
        &mut Vec::new(),
    )
    .await
    .expect_err("missing key");
    assert!(err.to_string().contains("no key nope"), "{err}");

    // kv watch: the current value first, then a change as it happens,
    // each with the revision KV gave it.
    let kv_watcher = {
        let client = stack.client.clone();
        tokio::spawn(async move {
            let mut out = Vec::new();
            headroom_cli::kv_watch(
                &client,
                SERVERS_BUCKET,
                ">",
                Some(2),
                Some(Duration::from_secs(10)),
                &mut out,
            )
            .await
            .expect("kv watch");
            text(out)
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    register(&stack.client, "k2", &["web"]).await;
    let watched = kv_watcher.await.expect("joined");
    let lines: Vec<&str> = watched.lines().collect();
    assert_eq!(lines.len(), 2, "{watched}");
    let k2 = server_record(&stack.js, "k2").await;
    let bucket = stack
        .js
        .get_key_value(SERVERS_BUCKET)
        .await
        .expect("bucket");
    for (line, key) in lines.iter().zip(["k1", "k2"]) {
        let revision = bucket
            .entry(key)
            .await
            .expect("entry")
            .expect("present")
            .revision;
        assert!(
            line.starts_with(&format!("{key} @{revision} Put ")),
            "{line}"
        );
    }
    assert!(
        lines[1].contains(&format!("\"address\":\"{}\"", k2.address)),
        "{watched}"
    );

    // watch: a MessagePack report comes out as JSON with its headers.
    let watcher = {
        let client = stack.client.clone();
        tokio::spawn(async move {
            let mut out = Vec::new();
            headroom_cli::watch(
                &client,
                "headroom.metrics.>",
                Some(1),
                Some(Duration::from_secs(10)),
                &mut out,
            )
            .await
            .expect("watch");
            text(out)
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    let report = PerformanceReport {
        cpu: Some(0.25),
        ..PerformanceReport::new(sid("k1"), None, ReportSource::Agent, 7, 1000)
    };
    stack
        .client
        .publish_with_headers(
            subjects::metrics(None, &sid("k1")),
            Codec::MsgPack.headers(),
            Codec::MsgPack.encode(&report).expect("encode"),
        )
        .await
        .expect("publish");
    let watched = tokio::time::timeout(WAIT, watcher)
        .await
        .expect("in time")
        .expect("joined");
    assert!(
        watched.starts_with("headroom.metrics._pool.k1 "),
        "{watched}"
    );
    assert!(watched.contains("\"cpu\":0.25"), "{watched}");
    assert!(watched.contains("application/msgpack"), "{watched}");

    // events: the registration is in the audit log.
    let mut out = Vec::new();
    headroom_cli::events(&stack.client, None, 10, &mut out)
        .await
        .expect("events");
    let events = text(out);
    assert!(events.contains("registered - k1"), "{events}");

    // services: the allocator answers discovery, each way.
    for (ask, shows) in [
        (headroom_cli::Discover::Stats, "req "),
        (headroom_cli::Discover::Info, " on headroom.admin."),
        (headroom_cli::Discover::Ping, "answered in"),
    ] {
        let mut out = Vec::new();
        headroom_cli::services(&stack.client, ask, Duration::from_millis(500), &mut out)
            .await
            .expect("services");
        let services = text(out);
        assert!(services.contains("headroom-allocator"), "{services}");
        assert!(services.contains(shows), "{ask:?}: {services}");
        assert!(services.contains("1 services answered"), "{services}");
    }
}

#[tokio::test]
async fn cluster_put_list_and_get_go_through_the_allocator() {
    let stack = Stack::start().await;
    register(&stack.client, "c1", &[]).await;
    register(&stack.client, "c2", &[]).await;
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("policy.toml");
    std::fs::write(
        &file,
        "min_size = 2\nmax_size = 3\n[scaling]\nupper = 0.8\nlower = 0.2\ntarget = 0.6\n",
    )
    .expect("policy file");
    let mut out = Vec::new();
    headroom_cli::cluster_put(&stack.client, "shop", &file, &mut out)
        .await
        .expect("cluster put");
    assert!(text(out).starts_with("shop generation "));
    let filled = headroom_tests::eventually(WAIT, || async {
        let snapshot = Snapshot::read(&stack.js).await;
        (snapshot.active_members("shop").len() == 2).then_some(snapshot)
    })
    .await
    .expect("filled to its minimum");

    let mut out = Vec::new();
    headroom_cli::cluster_show(&stack.client, Some("shop"), &mut out)
        .await
        .expect("cluster get");
    let shown: serde_json::Value = serde_json::from_str(text(out).trim()).expect("JSON");
    let record = filled.cluster("shop");
    assert_eq!(shown["policy"]["min_size"], 2);
    assert_eq!(shown["policy"]["scaling"]["upper"], 0.8);
    assert_eq!(
        shown["members"].as_array().map(Vec::len),
        Some(record.members.len())
    );
    let mut out = Vec::new();
    headroom_cli::cluster_show(&stack.client, None, &mut out)
        .await
        .expect("cluster list");
    assert_eq!(text(out).lines().count(), 1);

    // A bad policy or an unknown cluster: clear errors, nothing changed.
    std::fs::write(&file, "min_size = 5\nmax_size = 3\n").expect("policy file");
    let err = headroom_cli::cluster_put(&stack.client, "shop", &file, &mut Vec::new())
        .await
        .expect_err("min over max");
    assert!(err.to_string().contains("not a usable policy"), "{err}");
    let err = headroom_cli::cluster_show(&stack.client, Some("nope"), &mut Vec::new())
        .await
        .expect_err("unknown");
    assert!(err.to_string().contains("nope"), "{err}");
    assert_eq!(
        Snapshot::read(&stack.js).await.cluster("shop").generation,
        record.generation
    );
}
