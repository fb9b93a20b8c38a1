//! NATS security as the stack configures it (`nats/secure.conf`): each
//! service works with its own user, and an agent's user can neither ask
//! for a reconfiguration nor write KV; the server refuses it. Each agent
//! has a user of its own and speaks for its own server only: the server
//! refuses its publications for another, and the monitor and the
//! allocator refuse, and count, a body that names another server than
//! its subject does.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use headroom_frontend::Frontend;
use headroom_shared::ops::Ops;
use headroom_shared::subjects;
use headroom_tests::{eventually, NatsServer};
use hyper::StatusCode;
use tokio_util::sync::CancellationToken;

use headroom_shared::bus::{self, AdminError};
use headroom_shared::errors::codes;
use headroom_shared::records::ServerRecord;
use headroom_shared::wire::{
    PerformanceReport, RegisterServer, ReportSource, ServerStatus, ServerStatusKind,
};
use headroom_shared::{ServerId, SCHEMA_VERSION};

use crate::common::{
    act_as_intruder, cid, policy, put_cluster, sid, stream_messages, wait_for_admin, Snapshot, WAIT,
};
use crate::frontend::backend;

#[tokio::test]
async fn every_service_works_with_its_own_user_and_an_agent_cannot_reconfigure_or_write_kv() {
    headroom_shared::telemetry::init_for_tests();
    let nats = NatsServer::start_secure_with_agents(&[sid("sec-1")])
        .await
        .expect("nats-server");
    let operator = nats.client().await.expect("operator connects");
    let js = async_nats::jetstream::new(operator.clone());
    let shutdown = CancellationToken::new();

    // No user, or a wrong password: refused.
    assert!(
        async_nats::connect(nats.url()).await.is_err(),
        "anonymous refused"
    );
    let wrong =
        async_nats::ConnectOptions::with_user_and_password("agent-sec-1".into(), "nope".into())
            .connect(nats.url())
            .await;
    assert!(wrong.is_err(), "a wrong password is refused");

    tokio::spawn(headroom_allocator::run(
        nats.config_as("allocator"),
        nats.client_as("allocator")
            .await
            .expect("allocator connects"),
        Ops::new("headroom-allocator"),
        shutdown.clone(),
    ));
    wait_for_admin(&operator).await;

    // A sample backend and its agent, with the agent's user.
    let app = backend("sec-1", &shutdown).await;
    let mut agent_config = nats.config_as_agent(&sid("sec-1"));
    agent_config.agent.address = app.addr.ip().to_string();
    agent_config.agent.port = app.addr.port();
    agent_config.agent.interval = Duration::from_millis(200);
    agent_config.agent.stats_url = Some(format!("http://{}/stats", app.addr));
    let agent_ops = Ops::new("headroom-agent");
    tokio::spawn(headroom_agent::run(
        agent_config,
        nats.client_as_agent(&sid("sec-1"))
            .await
            .expect("agent connects"),
        agent_ops.clone(),
        shutdown.clone(),
    ));
    let mut monitor_config = nats.config_as("monitor");
    monitor_config.monitor.evaluate_interval = Duration::from_millis(200);
    tokio::spawn(headroom_monitor::run(
        monitor_config,
        nats.client_as("monitor").await.expect("monitor connects"),
        Ops::new("headroom-monitor"),
        shutdown.clone(),
    ));
    let registered = eventually(WAIT, || async {
        Snapshot::read(&js).await.servers.get(&sid("sec-1"))?;
        Some(())
    })
    .await;
    assert!(
        registered.is_some(),
        "the agent registered with its own user"
    );

    // The operator creates the cluster; the agent's server is allocated and
    // a front-end with its own user routes to it.
    put_cluster(&operator, "web", policy(1, 2))
        .await
        .expect("cluster");
    let mut frontend_config = nats.config_as("frontend");
    frontend_config.frontend.cluster = "web".to_owned();
    frontend_config.frontend.instance = "fe-sec".to_owned();
    frontend_config.frontend.listen = "127.0.0.1:0".to_owned();
    frontend_config.frontend.slow_start = Duration::ZERO;
    frontend_config.frontend.report_interval = Duration::from_millis(200);
    let frontend = Frontend::bind(frontend_config).await.expect("bind");
    let address = frontend.local_addr().expect("address");
    let proxy = frontend.proxy();
    tokio::spawn(frontend.serve(shutdown.clone()));
    let routed = eventually(WAIT, || async {
        let table = proxy.table.load_full()?;
        (table.backends.len() == 1).then_some(())
    })
    .await;
    assert!(
        routed.is_some(),
        "the front-end follows KV with its own user"
    );
    let http = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<http_body_util::Empty<bytes::Bytes>>();
    let answer = http
        .get(format!("http://{address}/api/x").parse().expect("uri"))
        .await
        .expect("answer");
    assert_eq!(answer.status(), StatusCode::OK);

    // The monitor reads the agent's reports (as a member) and the front-end's.
    let mut counts = operator
        .subscribe("headroom.metrics.web.sec-1")
        .await
        .expect("subscribe");
    let report = tokio::time::timeout(WAIT, counts.next()).await;
    assert!(matches!(report, Ok(Some(_))), "reports flow as a member");
    let taken = eventually(WAIT, || async {
        let stats = headroom_monitor::fetch_stats(&operator).await.ok()?;
        (stats.reports > 0).then_some(())
    })
    .await;
    assert!(
        taken.is_some(),
        "the monitor took reports with its own user"
    );

    // The agent's user: no reconfiguration request, no KV write.
    let agent = nats
        .client_as_agent(&sid("sec-1"))
        .await
        .expect("agent connects");
    let stream_before = stream_messages(&js, subjects::RECONFIG_STREAM).await;
    let servers_before = Snapshot::read(&js).await;
    let (asked, wrote) = act_as_intruder(agent.clone(), "sec-1").await;
    assert!(asked.is_err(), "an agent cannot ask for a reconfiguration");
    assert!(wrote.is_err(), "an agent cannot write KV");
    assert_eq!(
        stream_messages(&js, subjects::RECONFIG_STREAM).await,
        stream_before,
        "nothing reached the stream"
    );
    let servers_after = Snapshot::read(&js).await;
    assert_eq!(
        servers_after.servers.get(&sid("sec-1")).map(|s| s.1),
        servers_before.servers.get(&sid("sec-1")).map(|s| s.1),
        "the server's record is untouched"
    );
    // Nor read other services' traffic it has no business with.
    let mut snoop = agent.subscribe("headroom.metrics.>").await.expect("sub");
    let snooped = tokio::time::timeout(Duration::from_secs(1), snoop.next()).await;
    assert!(
        !matches!(snooped, Ok(Some(_))),
        "an agent does not see other servers' reports"
    );
    assert_eq!(agent_ops.readiness(), Ok(()), "the real agent is fine");

    // The server refused exactly those three, and nothing any service did.
    let log = nats.log();
    let refused: Vec<&str> = log.lines().filter(|l| l.contains("Violation")).collect();
    let expected = [
        "Publish Violation - Subject \"headroom.reconfig.web\"",
        "Publish Violation - Subject \"$KV.headroom-servers.sec-1\"",
        "Subscription Violation - Subject \"headroom.metrics.>\"",
    ];
    assert_eq!(refused.len(), expected.len(), "{}", refused.join("\n"));
    for line in &refused {
        assert!(
            line.contains("user:agent-sec-1") && expected.iter().any(|e| line.contains(e)),
            "unexpected refusal: {line}"
        );
    }
    shutdown.cancel();
}

/// Publishes `message` on `subject` as `client` would, and flushes (a
/// publication the server refuses is dropped there; the client only hears
/// of it in an error event).
async fn publish<M: headroom_shared::Message>(
    client: &async_nats::Client,
    subject: String,
    message: &M,
) {
    headroom_shared::bus::publish(client, subject, message)
        .await
        .expect("published");
    client.flush().await.expect("flushed");
}

/// An allocator and a monitor, each with its own user; the allocator's ops.
async fn allocator_and_monitor(
    nats: &NatsServer,
    operator: &async_nats::Client,
    shutdown: &CancellationToken,
) -> Arc<Ops> {
    let allocator_ops = Ops::new("headroom-allocator");
    tokio::spawn(headroom_allocator::run(
        nats.config_as("allocator"),
        nats.client_as("allocator").await.expect("allocator"),
        allocator_ops.clone(),
        shutdown.clone(),
    ));
    wait_for_admin(operator).await;
    tokio::spawn(headroom_monitor::run(
        nats.config_as("monitor"),
        nats.client_as("monitor").await.expect("monitor"),
        Ops::new("headroom-monitor"),
        shutdown.clone(),
    ));
    allocator_ops
}

/// What an agent would forge for server `b`: an idle report, a failed
/// status, a registration with another address.
struct Forgeries {
    report: PerformanceReport,
    status: ServerStatus,
    registration: RegisterServer,
}

fn forgeries(b: &ServerId) -> Forgeries {
    let now = headroom_shared::time::now_ms();
    Forgeries {
        report: PerformanceReport {
            cpu: Some(0.0),
            ..PerformanceReport::new(b.clone(), Some(cid("web")), ReportSource::Agent, now, 1000)
        },
        status: ServerStatus {
            v: SCHEMA_VERSION,
            server: b.clone(),
            cluster: None,
            status: ServerStatusKind::Failed {
                reason: "forged".to_owned(),
            },
            at_ms: now,
        },
        registration: RegisterServer {
            v: SCHEMA_VERSION,
            id: b.clone(),
            address: "10.9.9.9".to_owned(),
            port: 80,
            request_types: Vec::new(),
        },
    }
}

#[tokio::test]
async fn an_agent_speaks_for_its_own_server_only() {
    headroom_shared::telemetry::init_for_tests();
    let (a, b) = (sid("own-1"), sid("own-2"));
    let nats = NatsServer::start_secure_with_agents(&[a.clone(), b.clone()])
        .await
        .expect("nats-server");
    let operator = nats.client().await.expect("operator connects");
    let shutdown = CancellationToken::new();
    let allocator_ops = allocator_and_monitor(&nats, &operator, &shutdown).await;
    let agent = nats.client_as_agent(&a).await.expect("agent connects");
    let mut seen = operator
        .subscribe(format!("headroom.*.*.{b}"))
        .await
        .expect("subscribe");
    let mut statuses = operator
        .subscribe(subjects::status(&b))
        .await
        .expect("subscribe");

    // For server B on B's subjects: the server refuses them.
    let Forgeries {
        report: forged,
        status: failed,
        registration: b_registration,
    } = forgeries(&b);
    publish(&agent, subjects::metrics(Some(&cid("web")), &b), &forged).await;
    publish(&agent, subjects::status(&b), &failed).await;
    // Refused by the server, so no one answers.
    let on_b = tokio::time::timeout(
        Duration::from_secs(2),
        bus::admin::<_, ServerRecord>(
            &agent,
            &subjects::admin::pool_register_own(&b),
            &b_registration,
        ),
    )
    .await;
    assert!(
        !matches!(on_b, Ok(Ok(_))),
        "B's registration subject is refused"
    );
    let any = tokio::time::timeout(Duration::from_millis(500), async {
        tokio::select! {
            m = seen.next() => m,
            m = statuses.next() => m,
        }
    })
    .await;
    assert!(
        !matches!(any, Ok(Some(_))),
        "nothing for B got through: {any:?}"
    );

    // For server B on A's own subjects: they reach the monitor and the
    // allocator, which refuse them and count them.
    publish(&agent, subjects::metrics(Some(&cid("web")), &a), &forged).await;
    publish(&agent, subjects::status(&a), &failed).await;
    let refused = bus::admin::<_, ServerRecord>(
        &agent,
        &subjects::admin::pool_register_own(&a),
        &b_registration,
    )
    .await;
    assert!(
        matches!(&refused, Err(AdminError::Refused(e)) if e.code == codes::SUBJECT_MISMATCH),
        "a registration of B on A's subject: {refused:?}"
    );
    let counted = eventually(WAIT, || async {
        let monitor = headroom_monitor::fetch_stats(&operator).await.ok()?;
        let allocator = |what: &str| {
            headroom_tests::metric(
                &allocator_ops,
                "headroom_allocator_server_messages_refused_total",
                &format!("{{what=\"{what}\",reason=\"subject_mismatch\"}}"),
            )
        };
        (monitor.subject_mismatch >= 1
            && allocator("status") >= 1
            && allocator("registration") >= 1)
            .then_some(())
    })
    .await;
    assert!(counted.is_some(), "each forgery refused and counted");
    assert!(
        !Snapshot::read(&async_nats::jetstream::new(operator.clone()))
            .await
            .servers
            .contains_key(&b),
        "B was never registered"
    );

    // What A needs for itself still works: its own registration.
    let own = RegisterServer {
        id: a.clone(),
        ..b_registration
    };
    let record: ServerRecord = bus::admin(&agent, &subjects::admin::pool_register_own(&a), &own)
        .await
        .expect("A registers itself");
    assert_eq!(record.id, a);

    // The server's log names the refusals, and only those.
    let log = nats.log();
    let refusals: Vec<&str> = log.lines().filter(|l| l.contains("Violation")).collect();
    for subject in [
        format!("headroom.metrics.web.{b}"),
        format!("headroom.status.{b}"),
        format!("headroom.admin.pool.register.{b}"),
    ] {
        assert!(
            refusals
                .iter()
                .any(|l| l.contains("user:agent-own-1") && l.contains(&format!("\"{subject}\""))),
            "the log names {subject}:\n{}",
            refusals.join("\n")
        );
    }
    assert_eq!(refusals.len(), 3, "{}", refusals.join("\n"));
    shutdown.cancel();
}
