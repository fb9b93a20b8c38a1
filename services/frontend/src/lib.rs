//! Headroom's front-end: an HTTP/1.1 and HTTP/2 reverse proxy in front of
//! one cluster. It answers from its own cache when it can, otherwise sends
//! the request to a member that serves its request type; it follows the
//! cluster's membership live and reports what it sees of each member.
//!
//! # Layout
//! - [`routing`]: the routing table and member choice (weighted least
//!   requests, or rendezvous hashing with bounded load), slow start,
//!   passive health.
//! - [`cache`]: the response cache and HTTP's rules on what may be kept.
//! - [`proxy`]: one request, end to end.
//! - [`hold`]: requests held while the cluster has no member.
//! - [`http1`]: HTTP/1.1 on the wire for both sides: head parsing, body
//!   framing, the chunked coding, head writing. Where request smuggling is
//!   decided.
//! - [`server`]: a client's connection: HTTP/1 requests read and answered
//!   through [`http1`], HTTP/2 handed to hyper.
//! - [`membership`]: following the cluster record in KV, and the
//!   last-known-good file.
//! - [`upstream`]: the connections to members: the pool, and one exchange
//!   (the bytes through [`http1`]).
//! - [`stats`]: latency histograms.
//! - [`metrics`]: what `/metrics` shows of it.
//! - [`Frontend`]: the listener and the tasks around it.

pub mod cache;
pub mod forward;
pub mod hold;
pub mod http1;
pub mod membership;
pub mod metrics;
pub mod proxy;
pub mod routing;
pub mod server;
pub mod stats;
pub mod upstream;

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use headroom_shared::bus;
use headroom_shared::config::Config;
use headroom_shared::ops::Ops;
use headroom_shared::time::now_ms;
use headroom_shared::wire::{
    DrainingMember, FrontendApplied, FrontendDemand, PerformanceReport, ReportSource,
};
use headroom_shared::{subjects, ClusterId, IdError, ServerId, SCHEMA_VERSION};
use hyper_util::rt::{TokioExecutor, TokioTimer};
use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, info_span, warn, Instrument};

pub use proxy::Proxy;

#[derive(Debug, thiserror::Error)]
pub enum FrontendError {
    #[error("frontend.cluster: {0}")]
    Cluster(#[source] IdError),
    #[error("cannot listen on {address}: {source}")]
    Listen {
        address: String,
        #[source]
        source: std::io::Error,
    },
}

/// A bound front-end, ready to serve.
pub struct Frontend {
    config: Config,
    cluster: ClusterId,
    /// One listener per worker thread, all on one port (SO_REUSEPORT: the
    /// kernel spreads connections over them).
    listeners: Vec<std::net::TcpListener>,
    proxy: Arc<Proxy>,
    ops: Arc<Ops>,
}

fn listen(address: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    let socket = match address {
        SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
        SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
    };
    socket.set_reuseaddr(true)?;
    socket.set_reuseport(true)?;
    socket.set_nodelay(true)?;
    socket.bind(address)?;
    let listener = socket.listen(4096)?;
    listener.into_std()
}

impl Frontend {
    /// Binds the listener and loads the last-known-good routing, if there
    /// is a file. NATS is not needed yet.
    ///
    /// # Errors
    /// A bad cluster id, or the address cannot be bound.
    pub async fn bind(config: Config) -> Result<Self, FrontendError> {
        let settings = &config.frontend;
        let cluster = ClusterId::new(settings.cluster.clone()).map_err(FrontendError::Cluster)?;
        let failed = |source| FrontendError::Listen {
            address: settings.listen.clone(),
            source,
        };
        let address = tokio::net::lookup_host(&settings.listen)
            .await
            .map_err(failed)?
            .next()
            .ok_or_else(|| failed(std::io::Error::other("the address resolves to nothing")))?;
        let first = listen(address).map_err(failed)?;
        // Port 0 picked a port: the other workers take the same one.
        let bound = first.local_addr().map_err(failed)?;
        let mut listeners = vec![first];
        for _ in 1..settings.workers.max(1) {
            listeners.push(listen(bound).map_err(failed)?);
        }
        let proxy = Arc::new(Proxy::new(settings.clone()));
        if let Some(path) = &settings.last_known_good {
            match membership::read_last_known_good(path) {
                Ok(record) if record.id == cluster => {
                    membership::install(&proxy, &record);
                    proxy.from_file.store(true, Ordering::Release);
                    warn!(file = %path.display(), generation = record.generation,
                        "serving from the last known good routing until NATS answers");
                }
                Ok(record) => {
                    warn!(file = %path.display(), other = %record.id, "last known good file is for another cluster; ignored")
                }
                Err(err) => debug!(%err, "no last known good routing"),
            }
        }
        let ops = Ops::new("headroom-frontend");
        metrics::register(&proxy, &ops);
        Ok(Self {
            config,
            cluster,
            listeners,
            proxy,
            ops,
        })
    }

    /// Its health and metrics, to serve on the operations port.
    pub fn ops(&self) -> Arc<Ops> {
        self.ops.clone()
    }

    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.listeners.first().and_then(|l| l.local_addr().ok())
    }

    pub fn proxy(&self) -> Arc<Proxy> {
        self.proxy.clone()
    }

    /// Serves until `shutdown`: clients at once; membership and reports
    /// once NATS answers (connecting goes on in the background, so a
    /// front-end started while NATS is down still serves from its file).
    /// On shutdown, open connections finish their requests.
    pub async fn serve(self, shutdown: CancellationToken) {
        let span = info_span!("frontend", cluster = %self.cluster, instance = %self.config.frontend.instance);
        async move {
            let mut tasks = JoinSet::new();
            tasks.spawn(control_plane(
                self.config.clone(),
                self.cluster.clone(),
                self.proxy.clone(),
                self.ops.clone(),
                shutdown.clone(),
            ));
            info!(listen = ?self.local_addr(), workers = self.listeners.len(), "front-end serving");
            // Thread per core: each worker accepts, proxies and keeps its
            // own upstream connections on one current-thread runtime.
            let cpus = worker_cpus(&self.config.frontend, self.listeners.len());
            let mut workers = Vec::new();
            for (n, listener) in self.listeners.into_iter().enumerate() {
                let cpu = cpus.get(n).copied();
                let (proxy, shutdown) = (self.proxy.clone(), shutdown.clone());
                let (done, finished) = tokio::sync::oneshot::channel::<()>();
                let span = tracing::Span::current();
                let spawned = std::thread::Builder::new()
                    .name(format!("frontend-{n}"))
                    .spawn(move || {
                        if let Some(cpu) = cpu {
                            if !core_affinity::set_for_current(cpu) {
                                warn!(cpu = cpu.id, "cannot pin the worker to its CPU");
                            }
                        }
                        let runtime = tokio::runtime::Builder::new_current_thread()
                            .enable_all()
                            .build();
                        match runtime {
                            Ok(runtime) => runtime.block_on(
                                async move {
                                    match TcpListener::from_std(listener) {
                                        Ok(listener) => {
                                            accept_loop(listener, proxy, shutdown).await
                                        }
                                        Err(err) => warn!(%err, "worker cannot listen"),
                                    }
                                }
                                .instrument(span),
                            ),
                            Err(err) => warn!(%err, "worker cannot start its runtime"),
                        }
                        let _ = done.send(());
                    });
                match spawned {
                    Ok(_) => workers.push(finished),
                    Err(err) => warn!(%err, "cannot start a worker thread"),
                }
            }
            for worker in workers {
                let _ = worker.await;
            }
            while tasks.join_next().await.is_some() {}
        }
        .instrument(span)
        .await;
    }
}

/// The CPU for each worker when they are pinned: one each, from those the
/// process may run on (its affinity mask, so a container's cpuset is
/// honoured); none when pinning is off or there are too few.
fn worker_cpus(
    settings: &headroom_shared::config::FrontendConfig,
    workers: usize,
) -> Vec<core_affinity::CoreId> {
    if !settings.pin_workers {
        return Vec::new();
    }
    match core_affinity::get_core_ids() {
        Some(cpus) if cpus.len() >= workers => cpus.into_iter().take(workers).collect(),
        Some(cpus) => {
            info!(
                workers,
                cpus = cpus.len(),
                "more workers than CPUs; workers are not pinned"
            );
            Vec::new()
        }
        None => {
            warn!("cannot read the CPUs this process may run on; workers are not pinned");
            Vec::new()
        }
    }
}

async fn accept_loop(listener: TcpListener, proxy: Arc<Proxy>, shutdown: CancellationToken) {
    let settings = proxy.settings().clone();
    let upstream = proxy.upstream();
    // A timer that is always due within a second. Every request arms a
    // header timeout far in the future; when no earlier timer exists,
    // arming one wakes the I/O driver (an eventfd write and an extra
    // epoll_wait per request, measured with strace). With this one always
    // nearer, arming never does. It also closes idle member connections.
    let pool = upstream.clone();
    let heartbeat = tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_millis(500));
        loop {
            tick.tick().await;
            pool.prune();
        }
    });
    let mut http2 = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
    http2
        .timer(TokioTimer::new())
        .max_header_list_size(u32::try_from(settings.max_header_bytes).unwrap_or(u32::MAX));
    let shared = server::Shared {
        proxy,
        upstream,
        http2: Arc::new(http2),
    };
    // This worker's own token: its connections wait on it, so they never
    // share a lock with another worker's.
    let connections = shutdown.child_token();
    let tracker = tokio_util::task::TaskTracker::new();
    // This worker's share of the connection limit (the kernel spreads
    // connections evenly over the workers' listeners).
    let share = settings
        .max_connections
        .div_ceil(settings.workers.max(1))
        .max(1);
    let open = Arc::new(tokio::sync::Semaphore::new(share));
    // At most one warning a minute: a front-end held at its limit would
    // otherwise log at the rate connections close.
    let mut warned: Option<std::time::Instant> = None;
    loop {
        if open.available_permits() == 0
            && warned.is_none_or(|at| at.elapsed() >= Duration::from_secs(60))
        {
            warned = Some(std::time::Instant::now());
            warn!(
                limit = share,
                "this worker is at its connection limit; accepting again when one closes"
            );
        }
        let permit = tokio::select! {
            _ = shutdown.cancelled() => break,
            permit = open.clone().acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_) => break,
            },
        };
        let (stream, client) = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(err) => {
                    // Out of file descriptors and the like: back off.
                    warn!(%err, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let counters = &shared.proxy.counters;
        counters.connections.fetch_add(1, Ordering::Relaxed);
        counters.connections_open.fetch_add(1, Ordering::Relaxed);
        let (shared, connections) = (shared.clone(), connections.clone());
        tracker.spawn(async move {
            let proxy = shared.proxy.clone();
            server::serve(stream, client, shared, connections).await;
            proxy
                .counters
                .connections_open
                .fetch_sub(1, Ordering::Relaxed);
            drop(permit);
        });
    }
    drop(listener);
    heartbeat.abort();
    info!("front-end stopping; letting open requests finish");
    tracker.close();
    if tokio::time::timeout(Duration::from_secs(10), tracker.wait())
        .await
        .is_err()
    {
        warn!("connections still open after 10s; closing them");
    }
}

/// Connects to NATS (retrying for as long as it takes), then follows the
/// membership and reports.
async fn control_plane(
    config: Config,
    cluster: ClusterId,
    proxy: Arc<Proxy>,
    ops: Arc<Ops>,
    shutdown: CancellationToken,
) {
    let mut nats = config.nats.clone();
    // Keep trying: the proxy serves meanwhile.
    nats.startup_deadline = Duration::from_secs(365 * 24 * 3600);
    let (client, connected) = tokio::select! {
        _ = shutdown.cancelled() => return,
        connected = headroom_shared::nats::connect(&nats, "headroom-frontend") => match connected {
            Ok((client, events)) => {
                let connected = events.connected();
                // Not required for readiness: it serves what routing it has.
                ops.watch_nats(client.clone(), events, false);
                (client, connected)
            }
            Err(err) => {
                warn!(%err, "cannot reach NATS; serving from what routing there is");
                return;
            }
        },
    };
    let mut tasks = JoinSet::new();
    tasks.spawn(membership::follow(
        client.clone(),
        connected,
        config.nats.replicas,
        cluster.clone(),
        proxy.clone(),
        config.frontend.last_known_good.clone(),
        shutdown.clone(),
    ));
    tasks.spawn(report_loop(
        client.clone(),
        cluster,
        proxy,
        config.frontend.instance.clone(),
        shutdown.clone(),
    ));
    while tasks.join_next().await.is_some() {}
    if let Err(err) = client.drain().await {
        debug!(%err, "could not drain the NATS connection");
    }
}

/// Says which membership generation it routes by, and what it still has
/// open with each draining member, on its applied subject.
async fn say_applied(
    client: &async_nats::Client,
    cluster: &ClusterId,
    instance: &str,
    proxy: &Proxy,
    interval_ms: u32,
) {
    let Some(table) = proxy.table.load_full() else {
        return; // no table yet
    };
    let draining = table
        .draining
        .iter()
        .map(|b| DrainingMember {
            server: b.server.clone(),
            in_flight: b.in_flight.load(Ordering::Relaxed),
            tunnels: b.tunnels.load(Ordering::Relaxed),
            answered: b.requests.load(Ordering::Relaxed),
        })
        .collect();
    let said = FrontendApplied {
        v: SCHEMA_VERSION,
        cluster: cluster.clone(),
        frontend: instance.to_owned(),
        generation: table.generation,
        interval_ms,
        at_ms: now_ms(),
        draining,
    };
    let subject = subjects::frontend_applied(cluster, instance);
    if let Err(err) = bus::publish(client, subject, &said).await {
        debug!(%err, "applied generation not sent");
    }
}

/// Every interval: what it saw of each member, on the member's metrics
/// subject (the monitor merges it with the agent's own), of itself, and the
/// membership generation it routes by; that one also at once when it
/// applies a new one, so that a change can be known to be followed by
/// traffic, while its silence says it is gone.
async fn report_loop(
    client: async_nats::Client,
    cluster: ClusterId,
    proxy: Arc<Proxy>,
    instance: String,
    shutdown: CancellationToken,
) {
    let interval = proxy.settings().report_interval;
    let interval_ms = u32::try_from(interval.as_millis()).unwrap_or(u32::MAX);
    let seconds = interval.as_secs_f64();
    let mut last: std::collections::HashMap<ServerId, (u64, u64)> =
        std::collections::HashMap::new();
    let mut own_last = (0u64, 0u64);
    let mut applied = proxy.applied();
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Every request it was sent, per second, over the last interval.
    let mut rate = 0.0;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = ticker.tick() => {}
            Ok(()) = applied.changed() => {
                applied.borrow_and_update();
                say_applied(&client, &cluster, &instance, &proxy, interval_ms).await;
                continue;
            }
            () = proxy.hold.demand.notified() => {
                // The first held request makes the demand known at once.
                say_demand(&client, &cluster, &instance, &proxy, rate, interval_ms).await;
                continue;
            }
        }
        applied.borrow_and_update();
        say_applied(&client, &cluster, &instance, &proxy, interval_ms).await;
        let at_ms = now_ms();
        let blank = |server: ServerId| {
            PerformanceReport::new(
                server,
                Some(cluster.clone()),
                ReportSource::Frontend {
                    frontend: instance.clone(),
                },
                at_ms,
                interval_ms,
            )
        };
        let table = proxy.table.load_full();
        // Only current members are remembered, so churn does not grow it.
        let mut seen = std::collections::HashMap::new();
        for backend in table.iter().flat_map(|t| t.backends.iter()) {
            let requests = backend.requests.load(Ordering::Relaxed);
            let errors = backend.errors.load(Ordering::Relaxed);
            // A member first seen here has counted from zero.
            let (r0, e0) = last.get(&backend.server).copied().unwrap_or((0, 0));
            seen.insert(backend.server.clone(), (requests, errors));
            let (_, p50, p99) = backend.latency.take();
            let report = PerformanceReport {
                in_flight: Some(backend.in_flight.load(Ordering::Relaxed)),
                requests_per_s: Some(requests.saturating_sub(r0) as f64 / seconds),
                errors_per_s: Some(errors.saturating_sub(e0) as f64 / seconds),
                latency_p50_ms: p50,
                latency_p99_ms: p99,
                ejected: Some(backend.failing()),
                ..blank(backend.server.clone())
            };
            publish(
                &client,
                subjects::metrics(Some(&cluster), &backend.server),
                &report,
            )
            .await;
        }
        last = seen;
        let c = &proxy.counters;
        let (requests, errors) = (
            c.requests.load(Ordering::Relaxed),
            c.errors.load(Ordering::Relaxed),
        );
        let (_, p50, p99) = c.latency.take();
        let requests_per_s = requests.saturating_sub(own_last.0) as f64 / seconds;
        if let Ok(me) = ServerId::new(instance.clone()) {
            let report = PerformanceReport {
                in_flight: Some(
                    u32::try_from(c.in_flight.load(Ordering::Relaxed)).unwrap_or(u32::MAX),
                ),
                requests_per_s: Some(requests_per_s),
                errors_per_s: Some(errors.saturating_sub(own_last.1) as f64 / seconds),
                latency_p50_ms: p50,
                latency_p99_ms: p99,
                ..blank(me)
            };
            publish(
                &client,
                subjects::frontend_stats(&cluster, &instance),
                &report,
            )
            .await;
        }
        own_last = (requests, errors);
        rate = requests_per_s;
        say_demand(&client, &cluster, &instance, &proxy, rate, interval_ms).await;
    }
}

/// Says how many requests it holds for want of a member, and how many it
/// is sent, on the cluster's demand subject.
async fn say_demand(
    client: &async_nats::Client,
    cluster: &ClusterId,
    instance: &str,
    proxy: &Proxy,
    requests_per_s: f64,
    interval_ms: u32,
) {
    let said = FrontendDemand {
        v: SCHEMA_VERSION,
        cluster: cluster.clone(),
        frontend: instance.to_owned(),
        held: u32::try_from(proxy.hold.len()).unwrap_or(u32::MAX),
        requests_per_s,
        interval_ms,
        at_ms: now_ms(),
    };
    if let Err(err) = bus::publish(client, subjects::demand(cluster), &said).await {
        debug!(%err, "demand not sent");
    }
}

async fn publish(client: &async_nats::Client, subject: String, report: &PerformanceReport) {
    if let Err(err) = bus::publish(client, subject, report).await {
        debug!(%err, "report not sent");
    }
}
