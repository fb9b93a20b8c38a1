//! Headroom's allocator: owns the free-server pool and every cluster's
//! membership in JetStream KV, and applies reconfiguration requests.
//!
//! Several instances may run at once: they share the request consumer,
//! serve the admin endpoints in one queue group, and every KV write is
//! compare-and-set, so they cannot undo each other's work.
//!
//! # Layout
//! - [`store`]: typed, revision-checked access to the KV buckets.
//! - [`placement`]: pure decisions: what needs repair (and the ranking
//!   of servers stated plainly, which the pool view is tested against).
//! - [`pool`]: the in-memory view of every server, kept by a KV watch,
//!   from which a server is chosen without reading the bucket.
//! - [`ops`]: the operations (allocate, release, replace, reweight,
//!   register, repairs) as compare-and-set sequences.
//! - [`requests`]: the durable request consumer and the outcome ledger.
//! - [`admin`]: the NATS services API endpoints.
//! - [`confirm`]: which changes every live front-end follows.
//! - [`metrics`]: what `/metrics` shows of it.
//! - [`run`]: wires them together until shutdown.

pub mod admin;
pub mod confirm;
pub mod metrics;
pub mod ops;
pub mod placement;
pub mod pool;
pub mod requests;
pub mod store;

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream;
use futures::StreamExt;
use headroom_shared::codec;
use headroom_shared::config::{AllocatorConfig, Config};
use headroom_shared::errors::codes;
use headroom_shared::ops::Ops;
use headroom_shared::records::ServerState;
use headroom_shared::subjects;
use headroom_shared::time::now_ms;
use headroom_shared::wire::{ReconfigAction, ReconfigRequest, ServerStatus, ServerStatusKind};
use headroom_shared::{bus, RequestId};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

pub use ops::Allocator;

#[derive(Debug, thiserror::Error)]
pub enum AllocatorError {
    #[error("cannot set up {0}: {1}")]
    Setup(&'static str, #[source] async_nats::Error),
    #[error(transparent)]
    Store(#[from] store::StoreError),
}

/// Runs the allocator until `shutdown` is cancelled, then stops taking
/// work, lets in-flight requests finish within the configured grace, and
/// drains the NATS connection.
///
/// Every task it starts is owned here: if this future is dropped (a crash
/// test aborts it), they all stop with it.
///
/// # Errors
/// When KV, the streams or the consumer cannot be set up within
/// `nats.startup_deadline`, the admin service cannot be set up, or a task
/// fails.
pub async fn run(
    config: Config,
    client: async_nats::Client,
    ops: Arc<Ops>,
    shutdown: CancellationToken,
) -> Result<(), AllocatorError> {
    let settings = config.allocator.clone();
    let js = jetstream::new(client.clone());
    ops.set_not_ready("setting up KV and streams");
    let Some((store, consumer)) = set_up_in_time(&js, &config, &shutdown).await? else {
        return Ok(());
    };
    let stop = shutdown.child_token();
    let mut tasks: JoinSet<Result<&'static str, AllocatorError>> = JoinSet::new();
    let (pool, follower) = pool::view();
    {
        let (bucket, stop) = (store.servers_bucket(), stop.clone());
        tasks.spawn(async move {
            follower.follow(bucket, stop).await;
            Ok("pool view")
        });
    }
    ops.set_not_ready("loading the pool");
    let loading = Instant::now();
    pool.wait_current(&shutdown).await;
    if shutdown.is_cancelled() {
        return Ok(());
    }
    info!(servers = pool.len(), took = ?loading.elapsed(), "pool view loaded");
    let allocator = Arc::new(Allocator::new(
        store,
        pool,
        js,
        client.clone(),
        settings.instance.clone(),
    ));
    allocator
        .metrics
        .register(&ops, allocator.pool.clone(), allocator.store.calls());
    info!(instance = %settings.instance, "allocator starting");

    // Repair what a crash left half-done before taking new work. Work
    // younger than `repair_after` may belong to a live peer: it is left to
    // that peer, or to the redelivery of its request.
    ops.set_not_ready("repairing what an earlier crash left");
    reconcile_once(&allocator, settings.repair_after).await;
    spawn_work(&mut tasks, &allocator, consumer, &client, &config, &stop);
    ops.set_ready();

    // Work abandoned after the grace period is redelivered to another.
    let ended = headroom_shared::service::supervise(
        tasks,
        &ops,
        &shutdown,
        &stop,
        settings.shutdown_grace,
        AllocatorError::Setup,
    )
    .await;
    if let Err(err) = client.drain().await {
        warn!(%err, "could not drain the NATS connection");
    }
    ended
}

type Consumer = jetstream::consumer::Consumer<jetstream::consumer::pull::Config>;

/// [`set_up`], tried again until the start-up deadline: JetStream can
/// answer before it can place what is asked of it (a cluster still
/// electing its meta leader, or not yet knowing all its peers for R3).
/// `None` on shutdown meanwhile.
async fn set_up_in_time(
    js: &jetstream::Context,
    config: &Config,
    shutdown: &CancellationToken,
) -> Result<Option<(store::Store, Consumer)>, AllocatorError> {
    let (replicas, deadline) = (config.nats.replicas, config.nats.startup_deadline);
    let started = Instant::now();
    let mut delay = Duration::from_millis(200);
    loop {
        match set_up(js, replicas, &config.allocator).await {
            Ok(done) => return Ok(Some(done)),
            Err(err) if started.elapsed() + delay < deadline => {
                warn!(%err, retry_in = ?delay, "cannot set up KV and streams yet");
                tokio::select! {
                    _ = shutdown.cancelled() => return Ok(None),
                    _ = tokio::time::sleep(delay) => {}
                }
                delay = (delay * 2).min(Duration::from_secs(5));
            }
            Err(err) => return Err(err),
        }
    }
}

/// The allocator's work once the pool is loaded and repaired: requests,
/// the admin service, the reconciler, status, and the metrics' follower.
fn spawn_work(
    tasks: &mut JoinSet<Result<&'static str, AllocatorError>>,
    allocator: &Arc<Allocator>,
    consumer: Consumer,
    client: &async_nats::Client,
    config: &Config,
    stop: &CancellationToken,
) {
    let settings = &config.allocator;
    {
        let (allocator, stop) = (allocator.clone(), stop.clone());
        let (max_in_flight, ack_wait) = (settings.max_in_flight, settings.ack_wait);
        tasks.spawn(async move {
            requests::serve(allocator, consumer, max_in_flight, ack_wait, stop).await?;
            Ok("requests")
        });
    }
    {
        let (allocator, client, stop) = (allocator.clone(), client.clone(), stop.clone());
        tasks.spawn(async move {
            admin::serve(allocator, client, stop).await?;
            Ok("admin")
        });
    }
    tasks.spawn(reconcile_loop(
        allocator.clone(),
        settings.reconcile_interval,
        settings.repair_after,
        stop.clone(),
    ));
    tasks.spawn(status_loop(allocator.clone(), client.clone(), stop.clone()));
    // A front-end not heard within three of its report intervals is not
    // live; until then, one not heard yet may be.
    tasks.spawn(confirm::serve(
        allocator.clone(),
        client.clone(),
        config.frontend.report_interval * 3,
        settings.confirm_deadline,
        stop.clone(),
    ));
    tasks.spawn(
        allocator
            .metrics
            .clone()
            .follow(allocator.store.clusters_bucket(), stop.clone()),
    );
}

/// One pass of the reconciler: plan repairs from a fresh snapshot and apply
/// each after re-checking it. Returns how many changed something.
pub async fn reconcile_once(allocator: &Allocator, repair_after: Duration) -> usize {
    // Servers from the view (each repair re-reads its own records before
    // acting); clusters from KV, one read per cluster.
    let clusters = match allocator.store.clusters().await {
        Ok(clusters) => clusters,
        Err(err) => {
            warn!(%err, "reconciler cannot read KV; will try again");
            return 0;
        }
    };
    let clusters: Vec<_> = clusters.into_iter().map(|c| c.value).collect();
    let servers = allocator.pool.servers();
    let repair_after_ms = u64::try_from(repair_after.as_millis()).unwrap_or(u64::MAX);
    let repairs = placement::plan_repairs(&clusters, &servers, now_ms(), repair_after_ms);
    let mut changed = 0;
    for repair in &repairs {
        match allocator.repair(repair, repair_after_ms).await {
            Ok(true) => changed += 1,
            Ok(false) => {}
            Err(err) => debug!(%err, ?repair, "repair not applied this pass"),
        }
    }
    changed
}

/// The buckets, the events stream and the request consumer.
async fn set_up(
    js: &jetstream::Context,
    replicas: usize,
    settings: &AllocatorConfig,
) -> Result<(store::Store, Consumer), AllocatorError> {
    let store = store::Store::open(js, replicas).await?;
    js.get_or_create_stream(subjects::events_stream(replicas))
        .await
        .map_err(|e| AllocatorError::Setup("events stream", e.into()))?;
    let consumer = requests::consumer(js, replicas, settings).await?;
    Ok((store, consumer))
}

async fn reconcile_loop(
    allocator: Arc<Allocator>,
    interval: Duration,
    repair_after: Duration,
    stop: CancellationToken,
) -> Result<&'static str, AllocatorError> {
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return Ok("reconciler"),
            _ = ticker.tick() => {
                reconcile_once(&allocator, repair_after).await;
            }
        }
    }
}

/// Listens to servers' answers to their assignments: a drained server is
/// returned to the pool at once; a server whose allocate hook failed is
/// replaced.
async fn status_loop(
    allocator: Arc<Allocator>,
    client: async_nats::Client,
    stop: CancellationToken,
) -> Result<&'static str, AllocatorError> {
    let mut statuses = client
        .queue_subscribe(subjects::STATUS_ALL, admin::SERVICE_NAME.to_owned())
        .await
        .map_err(|e| AllocatorError::Setup("status subscription", e.into()))?;
    loop {
        let message = tokio::select! {
            _ = stop.cancelled() => return Ok("status"),
            next = statuses.next() => match next {
                Some(message) => message,
                None => return Ok("status"),
            },
        };
        // A server speaks for itself only: its agent's user may publish on
        // its own subject, so a body naming another server is forged.
        let Some(status) = read_own::<ServerStatus>(&allocator, "status", &message, |s| {
            subjects::status(&s.server)
        }) else {
            continue;
        };
        if let Err(err) = on_status(&allocator, &status).await {
            warn!(%err, server = %status.server, "could not act on a server status");
        }
    }
}

/// A message from a server or front-end about itself: decoded, and on the
/// subject `own` says it must come on (its user may publish there and
/// nowhere else, so a body naming another is forged). Refused ones are
/// logged and counted under `what`.
pub(crate) fn read_own<T: headroom_shared::codec::Message>(
    allocator: &Allocator,
    what: &'static str,
    message: &async_nats::Message,
    own: impl Fn(&T) -> String,
) -> Option<T> {
    let refused = |reason| allocator.metrics.refused.inc(&[what, reason]);
    let said: T = match codec::decode(message.headers.as_ref(), &message.payload) {
        Ok(said) => said,
        Err(err) => {
            warn!(%err, subject = %message.subject, kind = T::KIND, "ignoring a malformed message");
            refused(codes::MALFORMED);
            return None;
        }
    };
    if message.subject.as_str() != own(&said) {
        warn!(subject = %message.subject, kind = T::KIND, "a message on another's subject; ignored");
        refused(codes::SUBJECT_MISMATCH);
        return None;
    }
    Some(said)
}

async fn on_status(allocator: &Allocator, status: &ServerStatus) -> Result<(), ops::OpError> {
    let Some(record) = allocator.store.server(&status.server).await? else {
        return Ok(());
    };
    match (&status.status, &record.value.state) {
        (ServerStatusKind::Drained, ServerState::Draining { cluster, .. }) => {
            // Its word is half the proof: the drain ends once every live
            // front-end has nothing open with it either (confirm.rs).
            let mut view = allocator.data_plane();
            let now = view.now();
            view.agent_drained(&status.server, now);
            info!(server = %status.server, %cluster, "its agent sees nothing in flight");
        }
        (ServerStatusKind::Failed { reason }, ServerState::Allocated { cluster }) => {
            warn!(server = %status.server, %reason, "server reported failed; replacing");
            // One id per failure of this allocation, so repeats collapse.
            let id = RequestId::new(format!("failed-{}-{}", status.server, record.revision))
                .map_err(|e| {
                    ops::OpError::Rejected(headroom_shared::errors::BusError::new(
                        headroom_shared::errors::codes::INVALID,
                        e.to_string(),
                    ))
                })?;
            let request = ReconfigRequest {
                id,
                reason: format!("server reported failed: {reason}"),
                ..ReconfigRequest::new(
                    cluster.clone(),
                    ReconfigAction::Replace {
                        server: status.server.clone(),
                    },
                    allocator.instance(),
                )
            };
            bus::request_reconfig(&allocator.js, &request).await?;
        }
        _ => debug!(server = %status.server, status = ?status.status, "server status"),
    }
    Ok(())
}
