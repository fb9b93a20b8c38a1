//! Headroom end to end on one machine: a local nats-server, the allocator,
//! the monitor, a front-end, and sample backends each with its agent (most
//! of them waiting in the pool), under a load profile. While the load
//! plays it shows what happens (members, utilisation, decisions, pool);
//! at the end it writes a timeline plot and returns a summary.
//!
//! Every part is the real service, run in this process on its own NATS
//! connection, exactly as its binary runs it; only the machines are one.
//!
//! # Layout
//! - [`plot`]: the timeline as SVG and CSV.
//! - [`Settings`]: the scenario (standard, or short for tests).
//! - [`System`]: every service started, for the demo and the reaction
//!   benchmark.
//! - [`run`]: plays the scenario.

pub mod plot;

use std::collections::HashMap;
use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use headroom_backend::Backend;
use headroom_frontend::{Frontend, Proxy};
use headroom_loadgen::{Profile, Summary, Target};
use headroom_local_nats::NatsServer;
use headroom_shared::bus::{self, AdminError};
use headroom_shared::codec::{self, Codec};
use headroom_shared::config::{BackendConfig, Config, ServiceTime};
use headroom_shared::kv::{CLUSTERS_BUCKET, SERVERS_BUCKET};
use headroom_shared::ops::Ops;
use headroom_shared::records::{
    ClusterPolicy, ClusterRecord, Measures, MemberState, ScalingPolicy, ServerRecord, ServerState,
};
use headroom_shared::time::now_ms;
use headroom_shared::wire::{
    AuditEvent, EventKind, PerformanceReport, PutCluster, ReconfigAction, ReportSource,
};
use headroom_shared::{subjects, ClusterId, ServerId, SCHEMA_VERSION};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::plot::{Mark, Sample};

/// The cluster the demo grows and shrinks.
pub const CLUSTER: &str = "demo";

#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error("{0}")]
    Nats(#[from] headroom_local_nats::LocalNatsError),
    #[error("connecting to the demo's nats-server: {0}")]
    Connect(#[from] async_nats::ConnectError),
    #[error("starting {what}: {why}")]
    Start { what: String, why: String },
    #[error("{what} did not happen within {within:?}")]
    Timeout {
        what: &'static str,
        within: Duration,
    },
    #[error("writing {path}: {source}")]
    Write {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("KV: {0}")]
    Kv(String),
}

/// The scenario.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Sample backends, each with its agent; `policy.min_size` of them are
    /// members at the start, the rest wait in the pool.
    pub backends: usize,
    /// Each sample backend's capacity and cost (its name and address are
    /// its own): load shows as requests in flight, queued ones included,
    /// which the policy weighs.
    pub backend: BackendConfig,
    /// Whether the monitor runs: without it the cluster stays as it is
    /// put, or as another controller sizes it.
    pub monitor: bool,
    /// Agents' report interval, the front-end's report interval and the
    /// monitor's evaluation interval.
    pub interval: Duration,
    pub policy: ClusterPolicy,
    pub profile: Profile,
    /// How often the live view prints a line and the timeline takes a
    /// sample.
    pub tick: Duration,
    /// Where the plot goes (the CSV goes beside it).
    pub plot: PathBuf,
    /// The front-end's address (`127.0.0.1:0` picks a port).
    pub listen: String,
}

/// The sample servers both scenarios use: 100 ms a request, 8 at once
/// (80 requests/s flat out), up to 256 waiting, exponential service times.
pub fn demo_backend() -> BackendConfig {
    BackendConfig {
        cost: Duration::from_millis(100),
        concurrency: 8,
        queue_limit: 256,
        service_time: ServiceTime::Exponential,
        ..BackendConfig::default()
    }
}

/// The policy both scenarios use, with its windows scaled by `scale`.
pub fn demo_policy(backends: usize, scale: f64) -> ClusterPolicy {
    let ms = |full: u64| (full as f64 * scale).round() as u64;
    ClusterPolicy {
        min_size: 1,
        max_size: u32::try_from(backends).unwrap_or(u32::MAX),
        routes: Vec::new(),
        scaling: ScalingPolicy {
            upper: 0.75,
            lower: 0.30,
            target: 0.60,
            sustain_ms: ms(2_000),
            release_sustain_ms: ms(4_000),
            cooldown_up_ms: ms(3_000),
            cooldown_down_ms: ms(2_000),
            max_step: 3,
            // The sample backends wait rather than burn CPU, so their load
            // is what they have in flight: 8 in flight is a full server.
            measures: Measures {
                cpu: 0.0,
                in_flight: 1.0,
                in_flight_capacity: 8.0,
                latency: 0.0,
                latency_slo_ms: 250.0,
            },
            silent_after_ms: 10_000,
            ..ScalingPolicy::default()
        },
        drain_timeout_ms: 10_000,
    }
}

impl Settings {
    /// About two minutes: a ramp that needs every server, a quiet spell
    /// that needs one, and a second rise served from the pool.
    pub fn standard(plot: PathBuf) -> Self {
        let backends = 4;
        Self {
            backends,
            backend: demo_backend(),
            monitor: true,
            interval: Duration::from_secs(1),
            policy: demo_policy(backends, 1.0),
            profile: Profile {
                rates: ramp(10.0, 200.0, 15)
                    .chain(hold(200.0, 20))
                    .chain(ramp(200.0, 10.0, 5))
                    .chain(hold(10.0, 35))
                    .chain(ramp(10.0, 200.0, 10))
                    .chain(hold(200.0, 20))
                    .collect(),
                step: Duration::from_secs(1),
            },
            tick: Duration::from_secs(1),
            plot,
            listen: "127.0.0.1:8080".to_owned(),
        }
    }

    /// The same story in about 35 seconds, for tests: intervals of 250 ms,
    /// windows at half length, profile steps of 500 ms.
    pub fn short(plot: PathBuf) -> Self {
        let backends = 4;
        Self {
            backends,
            backend: demo_backend(),
            monitor: true,
            interval: Duration::from_millis(250),
            policy: demo_policy(backends, 0.5),
            profile: Profile {
                rates: ramp(10.0, 200.0, 8)
                    .chain(hold(200.0, 12))
                    .chain(ramp(200.0, 10.0, 2))
                    .chain(hold(10.0, 22))
                    .chain(ramp(10.0, 200.0, 6))
                    .chain(hold(200.0, 14))
                    .collect(),
                step: Duration::from_millis(500),
            },
            tick: Duration::from_millis(500),
            plot,
            listen: "127.0.0.1:0".to_owned(),
        }
    }
}

fn ramp(from: f64, to: f64, steps: usize) -> impl Iterator<Item = f64> {
    (0..steps).map(move |i| from + (to - from) * (i as f64 + 0.5) / steps as f64)
}

fn hold(rate: f64, steps: usize) -> impl Iterator<Item = f64> {
    std::iter::repeat_n(rate, steps)
}

/// What the run did.
#[derive(Debug)]
pub struct Report {
    pub samples: Vec<Sample>,
    pub marks: Vec<Mark>,
    pub load: Summary,
    /// (seconds into the run, server) of every allocation, in order.
    pub allocations: Vec<(f64, ServerId)>,
    /// (seconds into the run, server) of every return to the pool.
    pub releases: Vec<(f64, ServerId)>,
    pub plot: PathBuf,
    pub csv: PathBuf,
}

impl Report {
    pub fn peak_size(&self) -> u32 {
        self.samples.iter().map(|s| s.members).max().unwrap_or(0)
    }

    /// Servers allocated again after they had been returned to the pool.
    pub fn reallocated(&self) -> Vec<ServerId> {
        let mut out = Vec::new();
        for (released_at, server) in &self.releases {
            let again = self
                .allocations
                .iter()
                .any(|(t, s)| s == server && t > released_at);
            if again && !out.contains(server) {
                out.push(server.clone());
            }
        }
        out
    }

    /// The summary printed at the end.
    pub fn write_summary(&self, out: &mut dyn Write) -> std::io::Result<()> {
        let count = |action: &str| self.marks.iter().filter(|m| m.action == action).count();
        writeln!(out)?;
        writeln!(out, "── summary ──")?;
        writeln!(
            out,
            "load: {} sent, {} ok, {} errors, p50 {:.1} ms, p99 {:.1} ms over {:.0} s",
            self.load.sent,
            self.load.ok,
            self.load.errors(),
            self.load.latency_ms.p50,
            self.load.latency_ms.p99,
            self.load.seconds
        )?;
        writeln!(
            out,
            "decisions: {} allocate, {} release, {} reweight, {} replace",
            count("allocate"),
            count("release"),
            count("reweight"),
            count("replace")
        )?;
        writeln!(
            out,
            "cluster: peak {} members, {} allocations, {} returns to the pool, re-allocated from the pool: {}",
            self.peak_size(),
            self.allocations.len(),
            self.releases.len(),
            display_list(&self.reallocated())
        )?;
        writeln!(
            out,
            "timeline: {} (data: {})",
            self.plot.display(),
            self.csv.display()
        )
    }
}

fn display_list(servers: &[ServerId]) -> String {
    if servers.is_empty() {
        return "none".to_owned();
    }
    servers
        .iter()
        .map(ServerId::as_str)
        .collect::<Vec<_>>()
        .join(", ")
}

/// The whole system on one machine: every service running, the cluster
/// at its minimum, the front-end routing to it.
pub struct System {
    pub client: async_nats::Client,
    pub js: async_nats::jetstream::Context,
    pub cluster: ClusterId,
    /// The front-end's address.
    pub address: SocketAddr,
    pub proxy: Arc<Proxy>,
    pub backends: Vec<Backend>,
    tasks: JoinSet<()>,
    shutdown: CancellationToken,
}

/// What a started system is made of.
struct Parts {
    client: async_nats::Client,
    cluster: ClusterId,
    address: SocketAddr,
    proxy: Arc<Proxy>,
    backends: Vec<Backend>,
}

/// What starting the services reads from.
#[derive(Clone, Copy)]
struct Starting<'a> {
    settings: &'a Settings,
    nats: &'a NatsServer,
    config: &'a Config,
    shutdown: &'a CancellationToken,
}

impl Starting<'_> {
    /// The sample backends, each with an agent that registers it, once
    /// every one is in the pool.
    async fn backends(
        self,
        tasks: &mut JoinSet<()>,
        client: &async_nats::Client,
    ) -> Result<Vec<Backend>, DemoError> {
        let Self {
            settings,
            nats,
            config,
            shutdown,
        } = self;
        let mut backends = Vec::new();
        for n in 1..=settings.backends {
            let name = format!("backend-{n}");
            let backend = Backend::start(
                BackendConfig {
                    name: name.clone(),
                    listen: "127.0.0.1:0".to_owned(),
                    ..settings.backend.clone()
                },
                shutdown.clone(),
            )
            .await
            .map_err(|e| DemoError::Start {
                what: name.clone(),
                why: e.to_string(),
            })?;
            let mut agent = config.clone();
            agent.agent.server = name.clone();
            agent.agent.address = backend.addr.ip().to_string();
            agent.agent.port = backend.addr.port();
            agent.agent.stats_url = Some(format!("http://{}/stats", backend.addr));
            spawn_service(
                tasks,
                format!("agent {name}"),
                headroom_agent::run(
                    agent,
                    nats.client().await?,
                    Ops::new("headroom-agent"),
                    shutdown.clone(),
                ),
            );
            backends.push(backend);
        }
        let js = async_nats::jetstream::new(client.clone());
        let servers = wait_bucket(&js, SERVERS_BUCKET).await?;
        wait_until(START_WITHIN, "every backend registered", || async {
            let keys: Vec<String> = servers
                .keys()
                .await
                .ok()?
                .filter_map(|k| async { k.ok() })
                .collect()
                .await;
            (keys.len() >= settings.backends).then_some(())
        })
        .await?;
        Ok(backends)
    }

    /// The front-end, once it routes to a member: its address and state.
    async fn frontend(
        self,
        tasks: &mut JoinSet<()>,
    ) -> Result<(SocketAddr, Arc<Proxy>), DemoError> {
        let settings = self.settings;
        let mut frontend_config = self.config.clone();
        frontend_config.frontend.cluster = CLUSTER.to_owned();
        frontend_config.frontend.instance = "demo-frontend".to_owned();
        frontend_config.frontend.listen = settings.listen.clone();
        frontend_config.frontend.workers = 1;
        frontend_config.frontend.report_interval = settings.interval;
        frontend_config.frontend.slow_start = settings.interval * 4;
        let frontend = Frontend::bind(frontend_config)
            .await
            .map_err(|e| DemoError::Start {
                what: "the front-end".into(),
                why: e.to_string(),
            })?;
        let address = frontend.local_addr().ok_or_else(|| DemoError::Start {
            what: "the front-end".into(),
            why: "no address".into(),
        })?;
        let proxy = frontend.proxy();
        tasks.spawn(frontend.serve(self.shutdown.clone()));
        wait_until(
            START_WITHIN,
            "the front-end routing to a member",
            || async {
                let table = proxy.table.load_full()?;
                (!table.backends.is_empty()).then_some(())
            },
        )
        .await?;
        Ok((address, proxy))
    }
}

fn spawn_service<E: std::fmt::Display>(
    tasks: &mut JoinSet<()>,
    name: String,
    service: impl std::future::Future<Output = Result<(), E>> + Send + 'static,
) {
    tasks.spawn(async move {
        if let Err(err) = service.await {
            tracing::error!(service = %name, "{err}");
        }
    });
}

const START_WITHIN: Duration = Duration::from_secs(30);

/// Plays the scenario against `nats`, printing the live view on `out`.
///
/// # Errors
/// A part cannot start, or the plot cannot be written.
pub async fn run(
    settings: &Settings,
    nats: &NatsServer,
    out: &mut (dyn Write + Send),
) -> Result<Report, DemoError> {
    let system = System::start(settings, nats, out).await?;
    let report = system.play(settings, out).await;
    system.stop().await;
    report
}

impl System {
    /// Starts the allocator, the sample backends and their agents (all
    /// registered in the pool), the cluster at its minimum, the monitor
    /// and the front-end; returns once the front-end routes to a member.
    ///
    /// # Errors
    /// A part cannot start in time.
    pub async fn start(
        settings: &Settings,
        nats: &NatsServer,
        out: &mut (dyn Write + Send),
    ) -> Result<Self, DemoError> {
        let mut tasks = JoinSet::new();
        let shutdown = CancellationToken::new();
        let started = Self::start_parts(settings, nats, out, &mut tasks, &shutdown).await;
        match started {
            Ok(Parts {
                client,
                cluster,
                address,
                proxy,
                backends,
            }) => Ok(Self {
                js: async_nats::jetstream::new(client.clone()),
                client,
                cluster,
                address,
                proxy,
                backends,
                tasks,
                shutdown,
            }),
            Err(err) => {
                stop_all(tasks, shutdown).await;
                Err(err)
            }
        }
    }

    /// Stops every service, as SIGTERM would.
    pub async fn stop(self) {
        stop_all(self.tasks, self.shutdown).await;
    }

    async fn start_parts(
        settings: &Settings,
        nats: &NatsServer,
        out: &mut (dyn Write + Send),
        tasks: &mut JoinSet<()>,
        shutdown: &CancellationToken,
    ) -> Result<Parts, DemoError> {
        let mut config = nats.config();
        config.monitor.instance = "demo-monitor".to_owned();
        config.monitor.evaluate_interval = settings.interval;
        config.agent.interval = settings.interval;
        let cluster = ClusterId::new(CLUSTER).map_err(|e| DemoError::Start {
            what: "the cluster".into(),
            why: e.to_string(),
        })?;
        let client = nats.client().await?;
        let _ = writeln!(
            out,
            "nats-server {} (JetStream, temporary store)",
            nats.url()
        );
        let starting = Starting {
            settings,
            nats,
            config: &config,
            shutdown,
        };
        spawn_service(
            tasks,
            "allocator".into(),
            headroom_allocator::run(
                config.clone(),
                nats.client().await?,
                Ops::new("headroom-allocator"),
                shutdown.clone(),
            ),
        );
        let backends = starting.backends(tasks, &client).await?;
        let _ = writeln!(
            out,
            "{} sample backends registered in the pool ({} ms per request, {} at once, {} may queue)",
            settings.backends,
            settings.backend.cost.as_millis(),
            settings.backend.concurrency,
            settings.backend.queue_limit
        );
        put_cluster(&client, &cluster, &settings.policy).await?;
        if settings.monitor {
            spawn_service(
                tasks,
                "monitor".into(),
                headroom_monitor::run(
                    config.clone(),
                    nats.client().await?,
                    Ops::new("headroom-monitor"),
                    shutdown.clone(),
                ),
            );
        }
        let (address, proxy) = starting.frontend(tasks).await?;
        let _ = writeln!(
            out,
            "cluster {CLUSTER}: min {} max {}; front-end on http://{address}",
            settings.policy.min_size, settings.policy.max_size
        );
        Ok(Parts {
            client,
            cluster,
            address,
            proxy,
            backends,
        })
    }

    /// Plays the load profile, showing what happens, then writes the plot.
    async fn play(
        &self,
        settings: &Settings,
        out: &mut (dyn Write + Send),
    ) -> Result<Report, DemoError> {
        let _ = writeln!(
            out,
            "playing {} s of load; upper level {}, target {}, lower {}\n",
            settings.profile.duration().as_secs(),
            settings.policy.scaling.upper,
            settings.policy.scaling.target,
            settings.policy.scaling.lower
        );
        // Load starts now: the timeline's zero.
        let start = Instant::now();
        let start_ms = now_ms();
        let load = {
            let profile = settings.profile.clone();
            let target = Target {
                base: format!("http://{}", self.address),
                paths: vec!["/api/item".to_owned()],
                timeout: Duration::from_secs(10),
                max_in_flight: 4096,
            };
            tokio::spawn(async move { headroom_loadgen::run(&profile, &target, None).await })
        };
        let proxy = self.proxy.clone();
        View::new(settings, start, start_ms)
            .follow(
                &self.client,
                &self.js,
                &self.cluster,
                || {
                    proxy
                        .counters
                        .requests
                        .load(std::sync::atomic::Ordering::Relaxed)
                },
                load,
                out,
            )
            .await
    }
}

async fn stop_all(mut tasks: JoinSet<()>, shutdown: CancellationToken) {
    shutdown.cancel();
    let all = async { while tasks.join_next().await.is_some() {} };
    if tokio::time::timeout(Duration::from_secs(15), all)
        .await
        .is_err()
    {
        tracing::warn!("some services did not stop within 15s");
        tasks.abort_all();
    }
}

async fn wait_bucket(
    js: &async_nats::jetstream::Context,
    bucket: &'static str,
) -> Result<async_nats::jetstream::kv::Store, DemoError> {
    wait_until(START_WITHIN, "the KV buckets", || async {
        js.get_key_value(bucket).await.ok()
    })
    .await
}

async fn wait_until<T, F, Fut>(
    within: Duration,
    what: &'static str,
    mut probe: F,
) -> Result<T, DemoError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    headroom_local_nats::eventually(within, &mut probe)
        .await
        .ok_or(DemoError::Timeout { what, within })
}

async fn put_cluster(
    client: &async_nats::Client,
    cluster: &ClusterId,
    policy: &ClusterPolicy,
) -> Result<(), DemoError> {
    let request = PutCluster {
        v: SCHEMA_VERSION,
        id: cluster.clone(),
        policy: policy.clone(),
    };
    wait_until(START_WITHIN, "the allocator taking the cluster", || async {
        match bus::admin::<_, ClusterRecord>(client, subjects::admin::CLUSTER_PUT, &request).await {
            Ok(_) => Some(Ok(())),
            Err(AdminError::Refused(err)) => Some(Err(DemoError::Start {
                what: "the cluster".into(),
                why: err.to_string(),
            })),
            Err(_) => None,
        }
    })
    .await?
}

/// The live view: what the terminal shows and the timeline records.
struct View<'a> {
    settings: &'a Settings,
    start: Instant,
    start_ms: u64,
    record: Option<ClusterRecord>,
    servers: HashMap<String, ServerState>,
    /// The latest agent report of each server: (received, report).
    reports: HashMap<ServerId, (Instant, PerformanceReport)>,
    samples: Vec<Sample>,
    marks: Vec<Mark>,
    allocations: Vec<(f64, ServerId)>,
    releases: Vec<(f64, ServerId)>,
    served_before: (Instant, u64),
}

impl<'a> View<'a> {
    fn new(settings: &'a Settings, start: Instant, start_ms: u64) -> Self {
        Self {
            settings,
            start,
            start_ms,
            record: None,
            servers: HashMap::new(),
            reports: HashMap::new(),
            samples: Vec::new(),
            marks: Vec::new(),
            allocations: Vec::new(),
            releases: Vec::new(),
            served_before: (start, 0),
        }
    }

    fn seconds_at(&self, at_ms: u64) -> f64 {
        at_ms.saturating_sub(self.start_ms) as f64 / 1000.0
    }

    /// Follows KV, reports and events until the load ends, printing as it
    /// goes; then writes the plot.
    async fn follow(
        mut self,
        client: &async_nats::Client,
        js: &async_nats::jetstream::Context,
        cluster: &ClusterId,
        served: impl Fn() -> u64,
        mut load: tokio::task::JoinHandle<Summary>,
        out: &mut (dyn Write + Send),
    ) -> Result<Report, DemoError> {
        let stop = CancellationToken::new();
        let _stop_on_return = stop.clone().drop_guard();
        let clusters = wait_bucket(js, CLUSTERS_BUCKET).await?;
        let servers = wait_bucket(js, SERVERS_BUCKET).await?;
        let records = headroom_shared::kv::follow(clusters, cluster.to_string(), stop.clone());
        let server_records = headroom_shared::kv::follow(servers, ">".to_owned(), stop.clone());
        let mut records = std::pin::pin!(records);
        let mut server_records = std::pin::pin!(server_records);
        let sub = |subject: String| async move {
            client
                .subscribe(subject)
                .await
                .map_err(|e| DemoError::Start {
                    what: "the live view".into(),
                    why: e.to_string(),
                })
        };
        let mut reports = sub(format!("{}.metrics.{cluster}.>", subjects::ROOT)).await?;
        let mut events = sub(format!("{}.events.>", subjects::ROOT)).await?;
        let mut ticker = tokio::time::interval(self.settings.tick);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let summary = loop {
            tokio::select! {
                summary = &mut load => break summary.unwrap_or_default(),
                _ = ticker.tick(), if self.record.is_some() => {
                    let sample = self.sample(served());
                    let _ = writeln!(out, "{}", self.line(&sample));
                    self.samples.push(sample);
                }
                Some(entry) = records.next() => {
                    if entry.operation == async_nats::jetstream::kv::Operation::Put {
                        if let Ok(record) = Codec::MsgPack.decode::<ClusterRecord>(&entry.value) {
                            self.record = Some(record);
                        }
                    }
                }
                Some(entry) = server_records.next() => {
                    match Codec::MsgPack.decode::<ServerRecord>(&entry.value) {
                        Ok(record) if entry.operation == async_nats::jetstream::kv::Operation::Put => {
                            self.servers.insert(entry.key, record.state);
                        }
                        _ => {
                            self.servers.remove(&entry.key);
                        }
                    }
                }
                Some(message) = reports.next() => {
                    if let Ok(report) = codec::decode::<PerformanceReport>(message.headers.as_ref(), &message.payload) {
                        if report.source == ReportSource::Agent {
                            self.reports.insert(report.server.clone(), (Instant::now(), report));
                        }
                    }
                }
                Some(message) = events.next() => {
                    if let Ok(event) = codec::decode::<AuditEvent>(message.headers.as_ref(), &message.payload) {
                        if let Some(line) = self.event(&event) {
                            let _ = writeln!(out, "{line}");
                        }
                    }
                }
            }
        };
        let sample = self.sample(served());
        self.samples.push(sample);
        self.write_plot(summary)
    }

    /// Mean utilisation of active members with a fresh agent report.
    fn utilisation(&self, active: &[&ServerId]) -> Option<f64> {
        let measures = &self.settings.policy.scaling.measures;
        let fresh = self.settings.interval * 3;
        let known: Vec<f64> = active
            .iter()
            .filter_map(|server| self.reports.get(*server))
            .filter(|(at, _)| at.elapsed() <= fresh)
            .filter_map(|(_, r)| measures.utilisation(&r.reading()))
            .collect();
        (!known.is_empty()).then(|| known.iter().sum::<f64>() / known.len() as f64)
    }

    fn sample(&mut self, served: u64) -> Sample {
        let now = Instant::now();
        let t_s = now.duration_since(self.start).as_secs_f64();
        let (before_at, before) = self.served_before;
        let dt = now.duration_since(before_at).as_secs_f64();
        let served_rps = if dt > 0.0 {
            served.saturating_sub(before) as f64 / dt
        } else {
            0.0
        };
        self.served_before = (now, served);
        let step = self.settings.profile.step.as_secs_f64();
        let index = (t_s / step) as usize;
        let offered_rps = self
            .settings
            .profile
            .rates
            .get(index)
            .copied()
            .unwrap_or(0.0);
        let members = self
            .record
            .as_ref()
            .map(|r| r.members.as_slice())
            .unwrap_or(&[]);
        let active: Vec<&ServerId> = members
            .iter()
            .filter(|m| m.state == MemberState::Active)
            .map(|m| &m.server)
            .collect();
        let changing = members.len() - active.len();
        Sample {
            t_s,
            offered_rps,
            served_rps,
            members: u32::try_from(active.len()).unwrap_or(u32::MAX),
            changing: u32::try_from(changing).unwrap_or(u32::MAX),
            utilisation: self.utilisation(&active),
            pool_free: u32::try_from(
                self.servers
                    .values()
                    .filter(|s| **s == ServerState::Free)
                    .count(),
            )
            .unwrap_or(u32::MAX),
            p99_ms: None,
        }
    }

    fn line(&self, s: &Sample) -> String {
        let members = self
            .record
            .as_ref()
            .map(|r| r.members.as_slice())
            .unwrap_or(&[]);
        let names: Vec<String> = members
            .iter()
            .map(|m| match m.state {
                MemberState::Active => m.server.to_string(),
                MemberState::Joining => format!("{}(joining)", m.server),
                MemberState::Draining => format!("{}(draining)", m.server),
            })
            .collect();
        let bar_width = 20usize;
        let filled = s
            .utilisation
            .map_or(0, |u| ((u.min(1.0)) * bar_width as f64).round() as usize);
        format!(
            "{:>6.1}s  load {:>5.0}/{:>5.0} req/s  util {} {}  members {} [{}]  pool {} free",
            s.t_s,
            s.served_rps,
            s.offered_rps,
            format_args!("{}{}", "#".repeat(filled), ".".repeat(bar_width - filled)),
            s.utilisation
                .map_or("  ?  ".to_owned(), |u| format!("{u:>5.2}")),
            s.members,
            names.join(" "),
            s.pool_free
        )
    }

    /// Records an audit event; returns the line to print, if any.
    fn event(&mut self, event: &AuditEvent) -> Option<String> {
        let t_s = self.seconds_at(event.at_ms);
        let server = event.server.clone();
        match event.kind {
            EventKind::Decided => {
                let detail: serde_json::Value = serde_json::from_str(&event.detail).ok()?;
                let action: ReconfigAction =
                    serde_json::from_value(detail.get("action")?.clone()).ok()?;
                let reason = detail
                    .get("reason")
                    .and_then(|r| r.as_str())
                    .unwrap_or_default()
                    .to_owned();
                let (label, what) = match &action {
                    ReconfigAction::Allocate { count, .. } => {
                        (format!("+{count}"), format!("{count} more"))
                    }
                    ReconfigAction::Release { server } => ("-1".to_owned(), server.to_string()),
                    ReconfigAction::Replace { server } => {
                        ("replace".to_owned(), server.to_string())
                    }
                    ReconfigAction::Reweight { server, weight } => (
                        format!("×{weight:.2}"),
                        format!("{server} to weight {weight:.2}"),
                    ),
                };
                let line = format!("monitor decided {} {what}: {reason}", action.name());
                self.marks.push(Mark {
                    t_s,
                    action: action.name().to_owned(),
                    label,
                    detail: line.clone(),
                });
                Some(format!("{t_s:>6.1}s  ▶ {line}"))
            }
            EventKind::Allocated => {
                let server = server?;
                self.allocations.push((t_s, server.clone()));
                Some(format!(
                    "{t_s:>6.1}s  ▶ allocator allocated {server} from the pool"
                ))
            }
            EventKind::DrainStarted => {
                Some(format!("{t_s:>6.1}s  ▶ allocator draining {}", server?))
            }
            EventKind::Released => {
                let server = server?;
                self.releases.push((t_s, server.clone()));
                Some(format!(
                    "{t_s:>6.1}s  ▶ allocator returned {server} to the pool"
                ))
            }
            EventKind::Reweighted | EventKind::OutOfService | EventKind::Rejected { .. } => Some(
                format!("{t_s:>6.1}s  ▶ {}: {}", event.kind.token(), event.detail),
            ),
            _ => None,
        }
    }

    fn write_plot(self, load: Summary) -> Result<Report, DemoError> {
        let plot = self.settings.plot.clone();
        let csv = plot.with_extension("csv");
        let scaling = &self.settings.policy.scaling;
        let mut samples = self.samples;
        plot::fill_p99(
            &mut samples,
            &load.steps,
            self.settings.profile.step.as_secs_f64(),
        );
        let svg = plot::svg(
            &samples,
            &self.marks,
            "Headroom demo: load, utilisation, cluster size and latency",
            plot::Levels {
                upper: scaling.upper,
                lower: scaling.lower,
                slo_ms: scaling.measures.latency_slo_ms,
            },
        );
        for (path, text) in [(&plot, svg), (&csv, plot::csv(&samples))] {
            if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                std::fs::create_dir_all(dir).map_err(|source| DemoError::Write {
                    path: dir.display().to_string(),
                    source,
                })?;
            }
            std::fs::write(path, text).map_err(|source| DemoError::Write {
                path: path.display().to_string(),
                source,
            })?;
        }
        let mut allocations = self.allocations;
        allocations.sort_by(|a, b| a.0.total_cmp(&b.0));
        let mut releases = self.releases;
        releases.sort_by(|a, b| a.0.total_cmp(&b.0));
        Ok(Report {
            samples,
            marks: self.marks,
            load,
            allocations,
            releases,
            plot,
            csv,
        })
    }
}
