//! Headroom's monitor: reads every member's performance reports, keeps a
//! window per server and per cluster, and decides when a cluster grows,
//! lets a member go, sends a hot member less traffic, or replaces a member
//! that went silent.
//!
//! # Layout
//! - [`decide`]: the decisions, a pure function of inputs and time.
//! - [`ingest`]: subject, codec and sanity checks in front of it; counters.
//! - [`leases`]: which shards this instance holds, by leases in KV.
//! - [`replay`]: recordings, and replaying them through a policy.
//! - [`reports`]: the subscriptions reports arrive on, per shard.
//! - [`run`]: the live service: NATS in, requests and audit events out.
//!
//! Decisions need a whole cluster in view, so monitors share the work by
//! cluster (a hash picks one of `monitor.shards`; live instances share the
//! shards by lease), not by message: a queue group would scatter one
//! server's reports over several monitors, each of which would then see a
//! healthy server fall silent.

pub mod decide;
pub mod ingest;
pub mod leases;
pub mod replay;
pub mod reports;

use std::collections::HashMap;
use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, kv};
use async_nats::service::ServiceExt;
use futures::StreamExt;
use headroom_shared::codec::Codec;
use headroom_shared::config::{Config, MonitorConfig};
use headroom_shared::kv::Bucket;
use headroom_shared::ledger::RequestConfirmed;
use headroom_shared::ops::Ops;
use headroom_shared::records::ClusterRecord;
use headroom_shared::time::now_ms;
use headroom_shared::wire::{AuditEvent, EventKind, ReconfigAction, ReconfigRequest};
use headroom_shared::{bus, subjects, ClusterId, RequestId, SCHEMA_VERSION};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, info_span, warn, Instrument};

pub use decide::{ClusterView, Decider, Decision};
pub use ingest::{Counters, Shards};
pub use leases::Ownership;
pub use reports::Reports;

#[derive(Debug, thiserror::Error)]
pub enum MonitorError {
    #[error("cannot set up {0}: {1}")]
    Setup(&'static str, #[source] async_nats::Error),
    #[error("cannot open the decision log {path}: {source}")]
    DecisionLog {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

/// Where the monitor's time comes from.
pub enum Clock {
    /// Wall-clock time, evaluating every `monitor.evaluate_interval`.
    System,
    /// Time set by a driver, evaluating when it says (tests and
    /// simulations run minutes of policy time in seconds, over real NATS).
    Manual(ManualClock),
}

/// The monitor's side of a [`Clock::Manual`].
pub struct ManualClock {
    now: Arc<AtomicU64>,
    evaluations: mpsc::Receiver<(u64, oneshot::Sender<()>)>,
}

/// The driver's side of a [`Clock::Manual`].
#[derive(Clone)]
pub struct ClockDriver {
    now: Arc<AtomicU64>,
    evaluations: mpsc::Sender<(u64, oneshot::Sender<()>)>,
}

impl Clock {
    /// A manual clock starting at `start_ms`, and its driver.
    pub fn manual(start_ms: u64) -> (Clock, ClockDriver) {
        let now = Arc::new(AtomicU64::new(start_ms));
        let (tx, rx) = mpsc::channel(1);
        (
            Clock::Manual(ManualClock {
                now: now.clone(),
                evaluations: rx,
            }),
            ClockDriver {
                now,
                evaluations: tx,
            },
        )
    }
}

impl ClockDriver {
    pub fn now_ms(&self) -> u64 {
        self.now.load(Ordering::SeqCst)
    }

    /// Moves time to `at_ms` (reports received from now on carry it).
    pub fn set(&self, at_ms: u64) {
        self.now.store(at_ms, Ordering::SeqCst);
    }

    /// Moves time to `at_ms`, evaluates, and returns once the evaluation's
    /// decisions are queued for sending. False once the monitor is gone.
    pub async fn evaluate(&self, at_ms: u64) -> bool {
        self.set(at_ms);
        let (done, wait) = oneshot::channel();
        self.evaluations.send((at_ms, done)).await.is_ok() && wait.await.is_ok()
    }
}

impl Clock {
    fn now_ms(&self) -> u64 {
        match self {
            Clock::System => now_ms(),
            Clock::Manual(manual) => manual.now.load(Ordering::SeqCst),
        }
    }
}

/// A change to the clusters the decider knows.
enum ClusterUpdate {
    Put(ClusterView),
    Removed(ClusterId),
    /// Every live front-end follows a request's change, since when.
    Confirmed(RequestId, u64),
}

/// Runs the monitor until `shutdown`, then stops evaluating, sends the
/// decisions already made, and drains the connection.
///
/// # Errors
/// When the subscription, the KV watch, the streams or the stats service
/// cannot be set up, or a task fails.
pub async fn run(
    config: Config,
    client: async_nats::Client,
    ops: Arc<Ops>,
    shutdown: CancellationToken,
) -> Result<(), MonitorError> {
    run_with_clock(config, client, ops, shutdown, Clock::System).await
}

/// [`run`], on the given clock.
///
/// # Errors
/// As [`run`].
pub async fn run_with_clock(
    config: Config,
    client: async_nats::Client,
    ops: Arc<Ops>,
    shutdown: CancellationToken,
    clock: Clock,
) -> Result<(), MonitorError> {
    let settings = config.monitor.clone();
    let span = info_span!("monitor", instance = %settings.instance, shards = settings.shards);
    async move {
        let js = jetstream::new(client.clone());
        let opened = Opened::open(&js, &settings, config.nats.replicas).await?;
        let counters = Arc::new(Counters::default());
        {
            let counters = counters.clone();
            ops.register(move |out| counters.expose(out));
        }
        let stats = client
            .service_builder()
            .description("Headroom monitor: performance reports in, reconfiguration requests out")
            .metadata([("instance".to_owned(), settings.instance.clone())].into())
            .start(subjects::MONITOR_SERVICE, env!("CARGO_PKG_VERSION"))
            .await
            .map_err(|e| MonitorError::Setup("stats service", e))?;
        let endpoint = stats
            .endpoint(subjects::MONITOR_STATS)
            .await
            .map_err(|e| MonitorError::Setup("stats endpoint", e))?;
        info!(dry_run = settings.dry_run, "monitor starting");

        let stop = shutdown.child_token();
        let wiring = Wiring {
            js,
            opened,
            reports: Reports::new(client.clone(), settings.shards),
            counters,
            endpoint,
            clock,
        };
        let (tasks, first_round) = wiring.spawn(&settings, &stop);
        // Ready once the first round of leases has taken what was free.
        if tokio::time::timeout(2 * settings.lease_ttl, first_round)
            .await
            .is_err()
        {
            warn!("no first round of shard leases yet; ready anyway");
        }
        ops.set_ready();

        // The sender ends once the decider is gone and its queue is sent;
        // the leases are handed over once the decider is gone.
        let ended = headroom_shared::service::supervise(
            tasks,
            &ops,
            &shutdown,
            &stop,
            settings.shutdown_grace,
            MonitorError::Setup,
        )
        .await;
        if let Err(err) = stats.stop().await {
            debug!(%err, "stats service already stopped");
        }
        if let Err(err) = client.drain().await {
            warn!(%err, "could not drain the NATS connection");
        }
        ended
    }
    .instrument(span)
    .await
}

/// What the monitor opens before its tasks start: its streams, its two
/// buckets, and the decision log.
struct Opened {
    clusters: kv::Store,
    monitors: kv::Store,
    decision_log: Option<std::fs::File>,
}

impl Opened {
    async fn open(
        js: &jetstream::Context,
        settings: &MonitorConfig,
        replicas: usize,
    ) -> Result<Self, MonitorError> {
        js.get_or_create_stream(subjects::reconfig_stream(replicas))
            .await
            .map_err(|e| MonitorError::Setup("reconfig stream", e.into()))?;
        js.get_or_create_stream(subjects::events_stream(replicas))
            .await
            .map_err(|e| MonitorError::Setup("events stream", e.into()))?;
        let clusters = headroom_shared::kv::open_bucket(js, Bucket::Clusters, replicas)
            .await
            .map_err(|e| MonitorError::Setup("clusters bucket", e))?;
        let monitors = headroom_shared::kv::open_bucket(js, Bucket::Monitors, replicas)
            .await
            .map_err(|e| MonitorError::Setup("monitors bucket", e))?;
        let decision_log = match &settings.decision_log {
            Some(path) => Some(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)
                    .map_err(|source| MonitorError::DecisionLog {
                        path: path.display().to_string(),
                        source,
                    })?,
            ),
            None => None,
        };
        Ok(Self {
            clusters,
            monitors,
            decision_log,
        })
    }
}

/// Everything the monitor's tasks are made of.
struct Wiring {
    js: jetstream::Context,
    opened: Opened,
    reports: Reports,
    counters: Arc<Counters>,
    endpoint: async_nats::service::endpoint::Endpoint,
    clock: Clock,
}

type Tasks = JoinSet<Result<&'static str, MonitorError>>;

impl Wiring {
    /// Starts the cluster watch, the leases, the decider, the sender and
    /// the stats endpoint: the tasks, and word of the leases' first round.
    fn spawn(
        self,
        settings: &MonitorConfig,
        stop: &CancellationToken,
    ) -> (Tasks, oneshot::Receiver<()>) {
        let Self {
            js,
            opened,
            reports,
            counters,
            endpoint,
            clock,
        } = self;
        let (updates_tx, updates_rx) = mpsc::channel(1024);
        let (decisions_tx, decisions_rx) = mpsc::channel(4096);
        let (ownership_tx, ownership_rx) = mpsc::channel(64);
        let decider_gone = CancellationToken::new();
        let (first_round_tx, first_round) = oneshot::channel();
        let mut tasks = Tasks::new();
        tasks.spawn(watch_clusters(
            opened.clusters,
            updates_tx.clone(),
            stop.clone(),
        ));
        tasks.spawn(watch_confirmations(js.clone(), updates_tx, stop.clone()));
        let lease = leases::LeaseSettings {
            shards: settings.shards,
            ttl: settings.lease_ttl,
            instance: settings.instance.clone(),
        };
        tasks.spawn(leases::hold(
            opened.monitors,
            js.clone(),
            lease,
            ownership_tx,
            stop.clone(),
            decider_gone.clone(),
            first_round_tx,
        ));
        let inputs = Inputs {
            reports,
            updates: updates_rx,
            ownership: ownership_rx,
            shards: Shards::none(settings.shards),
            interval: settings.evaluate_interval,
            clock,
        };
        let (deciding, stopping) = (counters.clone(), stop.clone());
        tasks.spawn(async move {
            // However it ends, the leases may then be handed over.
            let _gone = decider_gone.drop_guard();
            decide_loop(inputs, decisions_tx, deciding, stopping).await
        });
        tasks.spawn(send_loop(
            js,
            decisions_rx,
            opened.decision_log,
            counters.clone(),
            settings.instance.clone(),
            settings.dry_run,
        ));
        tasks.spawn(serve_stats(endpoint, counters, stop.clone()));
        (tasks, first_round)
    }
}

/// Follows the clusters bucket (current records first, then every change)
/// and hands every cluster to the decider's loop, which keeps those of the
/// shards it holds.
async fn watch_clusters(
    bucket: kv::Store,
    updates: mpsc::Sender<ClusterUpdate>,
    stop: CancellationToken,
) -> Result<&'static str, MonitorError> {
    let entries = headroom_shared::kv::follow(bucket, ">".to_owned(), stop);
    futures::pin_mut!(entries);
    while let Some(entry) = entries.next().await {
        let update = match entry.operation {
            kv::Operation::Put => match Codec::MsgPack.decode::<ClusterRecord>(&entry.value) {
                Ok(record) => ClusterUpdate::Put(ClusterView::from(&record)),
                Err(err) => {
                    warn!(key = %entry.key, %err, "unreadable cluster record; ignored");
                    continue;
                }
            },
            kv::Operation::Delete | kv::Operation::Purge => match ClusterId::new(&entry.key) {
                Ok(id) => ClusterUpdate::Removed(id),
                Err(_) => continue,
            },
        };
        if updates.send(update).await.is_err() {
            break;
        }
    }
    Ok("cluster watch")
}

/// Follows the allocators' confirmations (`confirmed.<request>` in the
/// requests bucket) and hands each to the decider's loop: cooldowns run
/// from them. The bucket is the allocator's: until it is made, this waits
/// rather than failing, so a monitor may start first.
async fn watch_confirmations(
    js: jetstream::Context,
    updates: mpsc::Sender<ClusterUpdate>,
    stop: CancellationToken,
) -> Result<&'static str, MonitorError> {
    let bucket = loop {
        match js.get_key_value(Bucket::Requests.name()).await {
            Ok(bucket) => break bucket,
            Err(err) => debug!(%err, "no requests bucket yet; confirmations wait"),
        }
        tokio::select! {
            () = stop.cancelled() => return Ok("confirmation watch"),
            () = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    };
    let pattern = format!("{}>", RequestConfirmed::PREFIX);
    let entries = headroom_shared::kv::follow_named(js.client(), bucket, pattern, stop);
    futures::pin_mut!(entries);
    while let Some(entry) = entries.next().await {
        if entry.operation != kv::Operation::Put {
            continue;
        }
        let confirmed = match Codec::MsgPack.decode::<RequestConfirmed>(&entry.value) {
            Ok(confirmed) => confirmed,
            Err(err) => {
                warn!(key = %entry.key, %err, "unreadable confirmation; ignored");
                continue;
            }
        };
        let update = ClusterUpdate::Confirmed(confirmed.id, confirmed.confirmed_ms);
        if updates.send(update).await.is_err() {
            break;
        }
    }
    Ok("confirmation watch")
}

/// What the decider listens to.
struct Inputs {
    reports: Reports,
    updates: mpsc::Receiver<ClusterUpdate>,
    ownership: mpsc::Receiver<Ownership>,
    shards: Shards,
    interval: Duration,
    clock: Clock,
}

/// The one task that owns the decider: reports, cluster changes, shard
/// changes and the evaluation clock all pass through here, so no lock is
/// ever taken on the hot path.
async fn decide_loop(
    inputs: Inputs,
    decisions: mpsc::Sender<Decision>,
    counters: Arc<Counters>,
    stop: CancellationToken,
) -> Result<&'static str, MonitorError> {
    let Inputs {
        reports,
        mut updates,
        mut ownership,
        shards,
        interval,
        mut clock,
    } = inputs;
    let mut deciding = Deciding {
        decider: Decider::new(),
        reports,
        shards,
        known: HashMap::new(),
        counters,
    };
    deciding.gauges();
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            biased;
            _ = stop.cancelled() => return Ok("decider"),
            // Shard changes first: a lost shard must stop being decided
            // before anything else is.
            change = ownership.recv() => match change {
                Some(change) => deciding.ownership(clock.now_ms(), change).await?,
                None => return Ok("decider"),
            },
            update = updates.recv() => match update {
                Some(update) => deciding.update(clock.now_ms(), update).await?,
                None => return Ok("decider"),
            },
            _ = ticker.tick(), if matches!(clock, Clock::System) => {
                deciding.evaluate(now_ms(), &decisions);
            }
            asked = async {
                match &mut clock {
                    Clock::Manual(manual) => manual.evaluations.recv().await,
                    Clock::System => std::future::pending().await,
                }
            } => match asked {
                Some((at_ms, done)) => {
                    deciding.evaluate(at_ms, &decisions);
                    let _ = done.send(());
                }
                None => return Ok("decider"),
            },
            message = deciding.reports.next() => {
                if let Err(rejection) = ingest::ingest(
                    &mut deciding.decider,
                    &deciding.shards,
                    &deciding.counters,
                    clock.now_ms(),
                    message.subject.as_str(),
                    message.headers.as_ref(),
                    &message.payload,
                ) {
                    debug!(subject = %message.subject, %rejection, "report rejected");
                }
                deciding.urgent(&decisions);
            }
        }
    }
}

/// The decider and what it decides for: every known cluster, of which it
/// holds those of its shards.
struct Deciding {
    decider: Decider,
    reports: Reports,
    shards: Shards,
    /// Every cluster in KV, so that a shard taken is decided for at once.
    known: HashMap<ClusterId, ClusterView>,
    counters: Arc<Counters>,
}

impl Deciding {
    fn evaluate(&mut self, at_ms: u64, decisions: &mpsc::Sender<Decision>) {
        let made = self.decider.tick(at_ms);
        self.send(made, decisions);
        self.gauges();
    }

    /// Sends what the decider decided between evaluations (a cluster at
    /// zero that front-ends hold requests for).
    fn urgent(&mut self, decisions: &mpsc::Sender<Decision>) {
        let made = self.decider.take_urgent();
        self.send(made, decisions);
    }

    fn send(&mut self, made: Vec<Decision>, decisions: &mpsc::Sender<Decision>) {
        for decision in made {
            self.counters.decisions.fetch_add(1, Ordering::Relaxed);
            self.counters.decided.0.inc(&[decision.action.name()]);
            if decisions.try_send(decision).is_err() {
                self.counters.send_failures.fetch_add(1, Ordering::Relaxed);
                warn!("decision queue full; a decision was dropped");
            }
        }
    }

    async fn update(&mut self, now_ms: u64, update: ClusterUpdate) -> Result<(), MonitorError> {
        match update {
            ClusterUpdate::Put(view) => {
                if self.shards.owns(view.id.as_str()) {
                    self.hold(now_ms, view.clone()).await?;
                }
                self.known.insert(view.id.clone(), view);
            }
            ClusterUpdate::Removed(id) => {
                self.known.remove(&id);
                self.let_go(&id);
            }
            ClusterUpdate::Confirmed(request, at_ms) => self.decider.confirmed(request, at_ms),
        }
        self.gauges();
        Ok(())
    }

    async fn ownership(&mut self, now_ms: u64, change: Ownership) -> Result<(), MonitorError> {
        match change {
            Ownership::Gained { shard, done } => {
                self.shards.held.insert(shard);
                if shard == 0 {
                    self.reports
                        .take_first_shard()
                        .await
                        .map_err(|e| MonitorError::Setup("metrics subscription", e.into()))?;
                }
                let views: Vec<ClusterView> = self
                    .known
                    .values()
                    .filter(|v| self.shards.of(v.id.as_str()) == shard)
                    .cloned()
                    .collect();
                for view in views {
                    self.hold(now_ms, view).await?;
                }
                let _ = done.send(());
            }
            Ownership::Lost { shard, done } => {
                self.shards.held.remove(&shard);
                if shard == 0 {
                    self.reports.leave_first_shard();
                }
                let ids: Vec<ClusterId> = self
                    .known
                    .keys()
                    .filter(|id| self.shards.of(id.as_str()) == shard)
                    .cloned()
                    .collect();
                for id in &ids {
                    self.let_go(id);
                }
                let _ = done.send(());
            }
        }
        self.gauges();
        Ok(())
    }

    /// Decides for `view`'s cluster from now on (or takes its new record).
    async fn hold(&mut self, now_ms: u64, view: ClusterView) -> Result<(), MonitorError> {
        self.reports
            .follow(&view.id)
            .await
            .map_err(|e| MonitorError::Setup("cluster's metrics subscription", e.into()))?;
        self.decider.set_cluster(now_ms, view);
        Ok(())
    }

    fn let_go(&mut self, id: &ClusterId) {
        self.reports.forget(id);
        self.decider.remove_cluster(id);
    }

    fn gauges(&self) {
        let c = &self.counters;
        let set = |gauge: &AtomicU64, n: usize| gauge.store(n as u64, Ordering::Relaxed);
        set(&c.tracked_servers, self.decider.tracked_servers());
        set(&c.clusters, self.decider.clusters());
        set(&c.subscriptions, self.reports.subscriptions());
        set(&c.shards_held, self.shards.held.len());
    }
}

/// Sends each decision: an audit event with its evidence always, the
/// request to the allocator unless this is a dry run.
async fn send_loop(
    js: jetstream::Context,
    mut decisions: mpsc::Receiver<Decision>,
    mut log: Option<std::fs::File>,
    counters: Arc<Counters>,
    instance: String,
    dry_run: bool,
) -> Result<&'static str, MonitorError> {
    while let Some(decision) = decisions.recv().await {
        let mut line = Vec::new();
        if replay::write_decision(&mut line, &decision).is_err() {
            continue;
        }
        let line = String::from_utf8_lossy(&line).trim_end().to_owned();
        let span =
            info_span!("decision", cluster = %decision.cluster, action = decision.action.name());
        let _entered = span.enter();
        info!(dry_run, reason = %decision.reason, "{line}");
        if let Some(file) = &mut log {
            if let Err(err) = writeln!(file, "{line}") {
                warn!(%err, "cannot write the decision log");
            }
        }
        if dry_run {
            continue;
        }
        let id = match RequestId::new(decision.request_id()) {
            Ok(id) => id,
            Err(err) => {
                warn!(%err, "decision id is not a request id");
                continue;
            }
        };
        let request = ReconfigRequest {
            v: SCHEMA_VERSION,
            id: id.clone(),
            cluster: decision.cluster.clone(),
            action: decision.action.clone(),
            reason: decision.reason.clone(),
            origin: instance.clone(),
            issued_ms: now_ms(),
        };
        let server = match &decision.action {
            ReconfigAction::Allocate { .. } => None,
            ReconfigAction::Release { server }
            | ReconfigAction::Replace { server }
            | ReconfigAction::Reweight { server, .. } => Some(server.clone()),
        };
        let event = AuditEvent {
            v: SCHEMA_VERSION,
            kind: EventKind::Decided,
            cluster: Some(decision.cluster.clone()),
            server,
            request: Some(id.clone()),
            detail: line,
            origin: instance.clone(),
            at_ms: now_ms(),
        };
        // The same id on every attempt: JetStream stores it once.
        let mut sent = false;
        for attempt in 0..3u32 {
            let result = async {
                bus::publish_durable(
                    &js,
                    subjects::events(Some(&decision.cluster), EventKind::Decided.token()),
                    &format!("decided-{id}"),
                    Codec::MsgPack,
                    &event,
                )
                .await?;
                bus::request_reconfig(&js, &request).await
            }
            .await;
            match result {
                Ok(_) => {
                    sent = true;
                    break;
                }
                Err(err) => {
                    warn!(%err, attempt, "could not send the decision; retrying");
                    tokio::time::sleep(Duration::from_millis(200 * u64::from(attempt + 1))).await;
                }
            }
        }
        let counter = if sent {
            &counters.requests_sent
        } else {
            &counters.send_failures
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }
    Ok("sender")
}

/// Answers `headroom.monitor.stats` with the counters, as JSON.
async fn serve_stats(
    mut endpoint: async_nats::service::endpoint::Endpoint,
    counters: Arc<Counters>,
    stop: CancellationToken,
) -> Result<&'static str, MonitorError> {
    loop {
        let request = tokio::select! {
            _ = stop.cancelled() => return Ok("stats"),
            request = endpoint.next() => match request {
                Some(request) => request,
                None => return Ok("stats"),
            },
        };
        let body = serde_json::to_vec(&counters.snapshot()).unwrap_or_default();
        if let Err(err) = request.respond(Ok(body.into())).await {
            debug!(%err, "could not answer a stats request");
        }
    }
}

/// Reads the monitor's counters over NATS (tests, the CLI).
///
/// # Errors
/// When no monitor answers or the answer is not the counters.
pub async fn fetch_stats(
    client: &async_nats::Client,
) -> Result<ingest::CountersSnapshot, async_nats::Error> {
    let reply = client
        .request(subjects::MONITOR_STATS, bytes::Bytes::new())
        .await?;
    Ok(serde_json::from_slice(&reply.payload)?)
}
