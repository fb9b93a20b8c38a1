//! Headroom's agent: runs on every server, samples it every interval and
//! publishes a performance report on `headroom.metrics.<cluster>.<server>`
//! (`_pool` while the server is free); registers the server in the pool;
//! and answers its assignments: runs the allocate hook and reports ready,
//! or on a drain waits for in-flight work to finish, runs the release hook
//! and reports drained.
//!
//! Which cluster the server is in comes from its own record in KV (a
//! watch), not from the notices alone: a notice can be missed, the record
//! cannot.
//!
//! # Layout
//! - [`sample`]: the kernel's counters.
//! - [`hooks`]: running the allocate and release hooks.
//! - [`metrics`]: what `/metrics` shows of it.

pub mod hooks;
pub mod metrics;
pub mod sample;

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream::{self, kv};
use futures::StreamExt;
use headroom_shared::bus::{self, AdminError};
use headroom_shared::codec::{self, Codec};
use headroom_shared::config::{AgentConfig, Config};
use headroom_shared::http_client;
use headroom_shared::kv::Bucket;
use headroom_shared::ops::Ops;
use headroom_shared::records::{ServerRecord, ServerState};
use headroom_shared::time::now_ms;
use headroom_shared::wire::{
    Assignment, AssignmentNotice, PerformanceReport, RegisterServer, ReportSource, ServerStatus,
    ServerStatusKind,
};
use headroom_shared::{subjects, ClusterId, IdError, ServerId, SCHEMA_VERSION};
use serde::Deserialize;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, info_span, warn, Instrument};

use crate::hooks::HookEvent;
use crate::metrics::Metrics;

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("agent.server: {0}")]
    ServerId(#[from] IdError),
    #[error("cannot set up {0}: {1}")]
    Setup(&'static str, #[source] async_nats::Error),
    #[error(
        "agent.address and agent.port say where front-ends reach the server; both are required"
    )]
    NoAddress,
}

/// What the application's stats endpoint may tell; every field optional.
#[derive(Debug, Clone, Copy, Default, PartialEq, Deserialize)]
pub struct AppStats {
    /// Requests in flight now (what a drain waits to see at 0).
    pub in_flight: Option<u32>,
    /// The mean in flight since the last read, when the application keeps
    /// it: reported instead of `in_flight`, which is one noisy instant.
    pub in_flight_mean: Option<f64>,
    /// Of those in flight, the ones waiting for a slot now.
    pub queued: Option<u32>,
    /// Requests it works on at once.
    pub concurrency: Option<u32>,
    pub requests_per_s: Option<f64>,
    pub latency_p50_ms: Option<f64>,
    pub latency_p99_ms: Option<f64>,
    pub errors_per_s: Option<f64>,
}

/// Reads the application's stats; `None` when it cannot be read (unknown).
pub async fn app_stats(url: &str, timeout: Duration) -> Option<AppStats> {
    match http_client::call("GET", url, None, timeout).await {
        Ok(body) => match serde_json::from_slice(&body) {
            Ok(stats) => Some(stats),
            Err(err) => {
                debug!(%err, url, "stats endpoint answered something else");
                None
            }
        },
        Err(err) => {
            debug!(%err, "cannot read the application's stats");
            None
        }
    }
}

/// Where the server is, as its KV record says.
type Placement = Arc<Mutex<Option<ClusterId>>>;

fn placement_of(state: &ServerState) -> Option<ClusterId> {
    state.cluster().cloned()
}

/// Gives the agent's connection an inbox prefix of its server's own, unless
/// one is set: its NATS user may read its own replies only
/// (`headroom_shared::nats_users`).
pub fn own_inbox(config: &mut Config) {
    if config.nats.inbox_prefix.is_none() {
        if let Ok(server) = ServerId::new(config.agent.server.clone()) {
            config.nats.inbox_prefix = Some(headroom_shared::nats_users::inbox_prefix(&server));
        }
    }
}

/// Runs the agent until `shutdown`.
///
/// # Errors
/// A bad server id, or the KV watch, the assignment subscription or the
/// servers bucket cannot be set up.
pub async fn run(
    config: Config,
    client: async_nats::Client,
    ops: Arc<Ops>,
    shutdown: CancellationToken,
) -> Result<(), AgentError> {
    let settings = config.agent.clone();
    let server = ServerId::new(settings.server.clone())?;
    if settings.address.trim().is_empty() || settings.port == 0 {
        return Err(AgentError::NoAddress);
    }
    let span = info_span!("agent", server = %server);
    async move {
        let js = jetstream::new(client.clone());
        let servers = headroom_shared::kv::open_bucket(&js, Bucket::Servers, config.nats.replicas)
            .await
            .map_err(|e| AgentError::Setup("servers bucket", e))?;
        let placement: Placement = Arc::new(Mutex::new(None));
        let notices = client
            .subscribe(subjects::assign(&server))
            .await
            .map_err(|e| AgentError::Setup("assignment subscription", e.into()))?;
        let metrics = Arc::new(Metrics::default());
        metrics.register(&ops);
        info!(address = %settings.address, port = settings.port, "agent starting");

        let stop = shutdown.child_token();
        let mut tasks: JoinSet<&'static str> = JoinSet::new();
        tasks.spawn(follow_record(
            client.clone(),
            servers,
            server.clone(),
            placement.clone(),
            stop.clone(),
        ));
        if settings.register {
            ops.set_not_ready("registering in the pool");
            tasks.spawn(register(
                client.clone(),
                settings.clone(),
                server.clone(),
                ops.clone(),
                stop.clone(),
            ));
        } else {
            ops.set_ready();
        }
        let agent = Agent {
            client: client.clone(),
            settings,
            server,
            metrics,
        };
        let agent = Arc::new(agent);
        tasks.spawn(report_loop(agent.clone(), placement.clone(), stop.clone()));
        tasks.spawn(assignment_loop(agent, notices, stop.clone()));
        shutdown.cancelled().await;
        info!("agent stopping");
        ops.set_not_ready("stopping");
        stop.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(5), async {
            while tasks.join_next().await.is_some() {}
        })
        .await;
        tasks.abort_all();
        if let Err(err) = client.drain().await {
            warn!(%err, "could not drain the NATS connection");
        }
        Ok(())
    }
    .instrument(span)
    .await
}

/// What the reporting and assignment tasks share.
struct Agent {
    client: async_nats::Client,
    settings: AgentConfig,
    server: ServerId,
    metrics: Arc<Metrics>,
}

/// Keeps `placement` equal to what the server's KV record says.
async fn follow_record(
    client: async_nats::Client,
    bucket: kv::Store,
    server: ServerId,
    placement: Placement,
    stop: CancellationToken,
) -> &'static str {
    // Named, so that its user's permissions can bind the watch to this
    // server's record (`headroom_shared::nats_users`).
    let entries =
        headroom_shared::kv::follow_named(client.clone(), bucket, server.to_string(), stop);
    futures::pin_mut!(entries);
    while let Some(entry) = entries.next().await {
        let cluster = match entry.operation {
            kv::Operation::Put => match Codec::MsgPack.decode::<ServerRecord>(&entry.value) {
                Ok(record) => placement_of(&record.state),
                Err(err) => {
                    warn!(%err, "unreadable server record");
                    continue;
                }
            },
            kv::Operation::Delete | kv::Operation::Purge => None,
        };
        if let Ok(mut current) = placement.lock() {
            if *current != cluster {
                info!(cluster = ?cluster.as_ref().map(ClusterId::as_str), "placement changed");
            }
            *current = cluster;
        }
    }
    "record watch"
}

/// Registers the server in the pool, retrying until an allocator answers.
/// A server already known is left as it is (the allocator keeps its state).
async fn register(
    client: async_nats::Client,
    settings: AgentConfig,
    server: ServerId,
    ops: Arc<Ops>,
    stop: CancellationToken,
) -> &'static str {
    let request = RegisterServer {
        v: SCHEMA_VERSION,
        id: server,
        address: settings.address.clone(),
        port: settings.port,
        request_types: settings.request_types.clone(),
    };
    // Its own subject: its user may register this server and no other.
    let verb = subjects::admin::pool_register_own(&request.id);
    let mut attempt = 0;
    loop {
        let answer = tokio::select! {
            _ = stop.cancelled() => return "register",
            answer = bus::admin::<_, ServerRecord>(&client, &verb, &request) => answer,
        };
        match answer {
            Ok(record) => {
                info!(state = record.state.name(), "registered in the pool");
                ops.set_ready();
                return "register";
            }
            // A refusal, or an answer this build cannot read, will not
            // change by asking again.
            Err(err @ (AdminError::Refused(_) | AdminError::Wire(_))) => {
                warn!(%err, "registration refused");
                ops.set_not_ready(format!("registration refused: {err}"));
                return "register";
            }
            Err(err) => debug!(%err, "no allocator answered the registration yet"),
        }
        attempt += 1;
        let delay = headroom_shared::nats::reconnect_delay(attempt, Duration::from_secs(5));
        tokio::select! {
            _ = stop.cancelled() => return "register",
            () = tokio::time::sleep(delay) => {}
        }
    }
}

/// Samples and publishes a report every interval.
async fn report_loop(
    agent: Arc<Agent>,
    placement: Placement,
    stop: CancellationToken,
) -> &'static str {
    let Agent {
        client,
        settings,
        server,
        metrics,
    } = &*agent;
    let mut sampler = sample::Sampler::new(&settings.proc_root, settings.interfaces.clone());
    let interval_ms = u32::try_from(settings.interval.as_millis()).unwrap_or(u32::MAX);
    let mut ticker = tokio::time::interval(settings.interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut unreadable = 0u32;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return "reports",
            _ = ticker.tick() => {}
        }
        let now = now_ms();
        let kernel = sampler.sample(now);
        let cluster = placement.lock().ok().and_then(|p| p.clone());
        let app = read_app(&agent, cluster.as_ref(), &mut unreadable).await;
        let report = PerformanceReport {
            v: SCHEMA_VERSION,
            server: server.clone(),
            cluster: cluster.clone(),
            source: ReportSource::Agent,
            at_ms: now,
            interval_ms,
            cpu: kernel.cpu,
            memory: kernel.memory,
            load1: kernel.load1,
            net_rx_bytes_per_s: kernel.net_rx_bytes_per_s,
            net_tx_bytes_per_s: kernel.net_tx_bytes_per_s,
            in_flight: app
                .in_flight_mean
                .filter(|m| m.is_finite() && *m >= 0.0)
                .map(|m| m.round().min(f64::from(u32::MAX)) as u32)
                .or(app.in_flight),
            queued: app.queued,
            concurrency: app.concurrency.filter(|c| *c > 0),
            requests_per_s: app.requests_per_s,
            latency_p50_ms: app.latency_p50_ms,
            latency_p99_ms: app.latency_p99_ms,
            errors_per_s: app.errors_per_s,
            ejected: None,
        };
        // Never send what the monitor would reject: say so here instead.
        if let Err(err) = report.validate() {
            warn!(%err, "not sending an invalid report");
            metrics.reports_failed.fetch_add(1, Ordering::Relaxed);
            continue;
        }
        let subject = subjects::metrics(cluster.as_ref(), server);
        let sent = bus::publish(client, subject, &report)
            .await
            .map_err(|err| debug!(%err, "report not sent"));
        match sent {
            Ok(()) => metrics
                .reports
                .inc(&[if cluster.is_some() { "member" } else { "pool" }]),
            Err(()) => {
                metrics.reports_failed.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

/// The application's stats, or all unknown; `unreadable` counts the reads
/// that failed in a row, and at `agent.stats_failures` the server is
/// reported failed.
async fn read_app(agent: &Agent, cluster: Option<&ClusterId>, unreadable: &mut u32) -> AppStats {
    let Some(url) = &agent.settings.stats_url else {
        return AppStats::default();
    };
    if let Some(stats) = app_stats(url, agent.settings.interval).await {
        *unreadable = 0;
        return stats;
    }
    agent
        .metrics
        .app_stats_failed
        .fetch_add(1, Ordering::Relaxed);
    *unreadable = unreadable.saturating_add(1);
    if *unreadable == agent.settings.stats_failures {
        application_dead(&agent.client, &agent.server, cluster, *unreadable).await;
    }
    AppStats::default()
}

/// The application has not answered its stats `reads` times in a row: a
/// member whose application is dead is reported `failed`, once a streak,
/// so the allocator replaces it (the front-ends have ejected it already,
/// but the cluster would stay a member short). A server in the pool is
/// not: nothing is lost until it is allocated, and then it is a member.
async fn application_dead(
    client: &async_nats::Client,
    server: &ServerId,
    cluster: Option<&ClusterId>,
    reads: u32,
) {
    let Some(cluster) = cluster else {
        warn!(
            reads,
            "the application's stats cannot be read; in the pool, nothing to replace"
        );
        return;
    };
    warn!(%cluster, reads, "the application's stats cannot be read; reporting the server failed");
    let status = ServerStatus {
        v: SCHEMA_VERSION,
        server: server.clone(),
        cluster: Some(cluster.clone()),
        status: ServerStatusKind::Failed {
            reason: format!("the application's stats could not be read {reads} times in a row"),
        },
        at_ms: now_ms(),
    };
    if let Err(err) = bus::publish(client, subjects::status(server), &status).await {
        warn!(%err, "could not send the server status");
    }
    let _ = client.flush().await;
}

/// Answers assignment notices one at a time, in order.
async fn assignment_loop(
    agent: Arc<Agent>,
    mut notices: async_nats::Subscriber,
    stop: CancellationToken,
) -> &'static str {
    let Agent {
        client,
        settings,
        server,
        metrics,
    } = &*agent;
    loop {
        let message = tokio::select! {
            _ = stop.cancelled() => return "assignments",
            message = notices.next() => match message {
                Some(message) => message,
                None => return "assignments",
            },
        };
        let notice: AssignmentNotice =
            match codec::decode(message.headers.as_ref(), &message.payload) {
                Ok(notice) => notice,
                Err(err) => {
                    warn!(%err, "ignoring a malformed assignment notice");
                    continue;
                }
            };
        if notice.server != *server {
            warn!(other = %notice.server, "assignment notice for another server; ignored");
            continue;
        }
        let span = info_span!("assignment", cluster = %notice.cluster);
        metrics.assignments.inc(&[notice.assignment.name()]);
        let status = answer(settings, server, metrics, &notice, &stop)
            .instrument(span)
            .await;
        if let Some(status) = status {
            let reply = ServerStatus {
                v: SCHEMA_VERSION,
                server: server.clone(),
                cluster: Some(notice.cluster.clone()),
                status,
                at_ms: now_ms(),
            };
            if let Err(err) = bus::publish(client, subjects::status(server), &reply).await {
                warn!(%err, "could not send the server status");
            }
            let _ = client.flush().await;
        }
    }
}

/// What to tell the allocator about one notice, if anything.
async fn answer(
    settings: &AgentConfig,
    server: &ServerId,
    metrics: &Metrics,
    notice: &AssignmentNotice,
    stop: &CancellationToken,
) -> Option<ServerStatusKind> {
    // The hook for `event`, counted; its success is `done`, its failure
    // the reason the allocator reads.
    let hook = |event: HookEvent, done: ServerStatusKind| async move {
        let configured = match event {
            HookEvent::Allocate => settings.on_allocate.as_ref(),
            HookEvent::Release => settings.on_release.as_ref(),
        };
        let result = hooks::run(
            configured,
            event,
            server,
            &notice.cluster,
            settings.hook_timeout,
        )
        .await;
        match result {
            Ok(()) => {
                metrics.hooks.inc(&[event.name(), "ok"]);
                done
            }
            Err(reason) => {
                warn!(%reason, "hook failed");
                metrics.hooks.inc(&[event.name(), "failed"]);
                ServerStatusKind::Failed { reason }
            }
        }
    };
    match &notice.assignment {
        Assignment::Allocated => {
            info!("allocated; running the allocate hook");
            Some(hook(HookEvent::Allocate, ServerStatusKind::Ready).await)
        }
        Assignment::Draining { deadline_ms } => {
            info!(
                deadline_ms,
                "draining; waiting for in-flight requests to finish"
            );
            wait_idle(settings, *deadline_ms, stop).await;
            Some(hook(HookEvent::Release, ServerStatusKind::Drained).await)
        }
        Assignment::Released => {
            info!("back in the free pool");
            None
        }
        Assignment::OutOfService { reason } => {
            warn!(%reason, "taken out of service");
            None
        }
    }
}

/// Waits until the application says nothing is in flight, or the deadline.
/// Without a stats endpoint there is nothing to wait for.
async fn wait_idle(settings: &AgentConfig, deadline_ms: u64, stop: &CancellationToken) {
    let Some(url) = &settings.stats_url else {
        return;
    };
    while now_ms() < deadline_ms && !stop.is_cancelled() {
        let stats = app_stats(url, Duration::from_secs(1)).await;
        if stats.and_then(|s| s.in_flight) == Some(0) {
            return;
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            () = tokio::time::sleep(Duration::from_millis(100)) => {}
        }
    }
}
