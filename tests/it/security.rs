//! NATS security as the stack configures it (`nats/secure.conf`): each
//! service works with its own user, and an agent's user can neither ask
//! for a reconfiguration nor write KV; the server refuses it.

use std::time::Duration;

use futures::StreamExt;
use headroom_frontend::Frontend;
use headroom_shared::ops::Ops;
use headroom_shared::subjects;
use headroom_tests::{eventually, NatsServer};
use hyper::StatusCode;
use tokio_util::sync::CancellationToken;

use crate::common::{
    act_as_intruder, policy, put_cluster, stream_messages, wait_for_admin, Snapshot, WAIT,
};
use crate::frontend::backend;

#[tokio::test]
async fn every_service_works_with_its_own_user_and_an_agent_cannot_reconfigure_or_write_kv() {
    headroom_shared::telemetry::init_for_tests();
    let nats = NatsServer::start_secure().await.expect("nats-server");
    let operator = nats.client().await.expect("operator connects");
    let js = async_nats::jetstream::new(operator.clone());
    let shutdown = CancellationToken::new();

    // No user, or a wrong password: refused.
    assert!(
        async_nats::connect(nats.url()).await.is_err(),
        "anonymous refused"
    );
    let wrong = async_nats::ConnectOptions::with_user_and_password("agent".into(), "nope".into())
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
    let mut agent_config = nats.config_as("agent");
    agent_config.agent.server = "sec-1".to_owned();
    agent_config.agent.address = app.addr.ip().to_string();
    agent_config.agent.port = app.addr.port();
    agent_config.agent.interval = Duration::from_millis(200);
    agent_config.agent.stats_url = Some(format!("http://{}/stats", app.addr));
    let agent_ops = Ops::new("headroom-agent");
    tokio::spawn(headroom_agent::run(
        agent_config,
        nats.client_as("agent").await.expect("agent connects"),
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
        Snapshot::read(&js)
            .await
            .servers
            .get(&crate::common::sid("sec-1"))?;
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
    let agent = nats.client_as("agent").await.expect("agent connects");
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
        servers_after
            .servers
            .get(&crate::common::sid("sec-1"))
            .map(|s| s.1),
        servers_before
            .servers
            .get(&crate::common::sid("sec-1"))
            .map(|s| s.1),
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
            line.contains("user:agent") && expected.iter().any(|e| line.contains(e)),
            "unexpected refusal: {line}"
        );
    }
    shutdown.cancel();
}
