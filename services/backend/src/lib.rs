//! Headroom's sample backend: a content server whose every answer costs a
//! configurable time, with a finite capacity ([`capacity`]), so load on it
//! is real load and overload is real overload. It serves
//! - `GET /stats`: what the agent reads (in flight, busy slots, queue,
//!   concurrency, request rate, latency percentiles with the queueing in
//!   them, refusals), as JSON;
//! - `POST /hooks/<event>`: a hook target for the agent, answering 200
//!   without queueing;
//! - anything else: `size` bytes naming the backend and the path, after a
//!   slot, a service time drawn around `cost` and `cpu_cost` of real CPU
//!   work (`?cost_ms=`, `?cpu_ms=`, `?size=` and `?max_age=` override per
//!   request); paths under `cacheable_prefix` say they may be cached. With
//!   the queue full it answers 503 with `Retry-After` at once.
//!
//! It keeps a log of what it was asked (path, the front-end's routing
//! generation, arrival time) for tests to read.

pub mod capacity;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use headroom_shared::config::BackendConfig;
use headroom_shared::time::now_ms;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::capacity::Capacity;

/// The most requests the log keeps (older ones are dropped).
const LOG_LIMIT: usize = 100_000;

/// One request as the backend saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Seen {
    pub method: String,
    pub path: String,
    /// The `x-headroom-generation` the front-end routed it with.
    pub generation: Option<u64>,
    pub at_ms: u64,
}

#[derive(Debug)]
struct State {
    /// Requests in the server: being worked on or waiting for a slot.
    in_flight: AtomicU64,
    requests: AtomicU64,
    capacity: Capacity,
    occupancy: Mutex<Occupancy>,
    log: Mutex<Vec<Seen>>,
    /// (requests, refused, at) of the last stats read, for the rates.
    last: Mutex<Option<(u64, u64, Instant)>>,
    latency_us: Mutex<Vec<u64>>,
}

impl State {
    fn new(config: &BackendConfig) -> Self {
        Self {
            in_flight: AtomicU64::new(0),
            requests: AtomicU64::new(0),
            capacity: Capacity::new(config),
            occupancy: Mutex::new(Occupancy::new()),
            log: Mutex::new(Vec::new()),
            last: Mutex::new(None),
            latency_us: Mutex::new(Vec::new()),
        }
    }
}

/// The number of requests in the server and its integral over time, so
/// that the mean over a window is exact: a count of the requests that
/// ended would lag by their latency, which is seconds under overload.
#[derive(Debug)]
struct Occupancy {
    now: u64,
    changed: Instant,
    /// Request-microseconds since the last stats read.
    area_us: u128,
}

impl Occupancy {
    fn new() -> Self {
        Self {
            now: 0,
            changed: Instant::now(),
            area_us: 0,
        }
    }

    fn step(&mut self, at: Instant) {
        let dt = at.saturating_duration_since(self.changed).as_micros();
        self.area_us += u128::from(self.now) * dt;
        self.changed = at;
    }

    /// The mean since the last call, over `window`; starts a new window.
    fn take_mean(&mut self, window: Duration) -> f64 {
        self.step(Instant::now());
        let area = std::mem::take(&mut self.area_us);
        area as f64 / window.as_micros().max(1) as f64
    }
}

/// Counts a request in the server from its arrival until its answer is
/// ready or its client gives up.
struct InFlight<'a>(&'a State);

impl<'a> InFlight<'a> {
    fn enter(state: &'a State) -> Self {
        state.in_flight.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut o) = state.occupancy.lock() {
            o.step(Instant::now());
            o.now += 1;
        }
        Self(state)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
        if let Ok(mut o) = self.0.occupancy.lock() {
            o.step(Instant::now());
            o.now = o.now.saturating_sub(1);
        }
    }
}

/// A running backend.
#[derive(Clone)]
pub struct Backend {
    pub addr: SocketAddr,
    pub name: String,
    state: Arc<State>,
    stop: CancellationToken,
}

#[derive(Debug, thiserror::Error)]
#[error("cannot listen on {address}: {source}")]
pub struct ListenError {
    address: String,
    #[source]
    source: std::io::Error,
}

impl Backend {
    /// Binds and serves in the background until [`Backend::stop`] or
    /// `shutdown`.
    ///
    /// # Errors
    /// The address cannot be bound.
    pub async fn start(
        config: BackendConfig,
        shutdown: CancellationToken,
    ) -> Result<Self, ListenError> {
        let listener = TcpListener::bind(&config.listen)
            .await
            .map_err(|source| ListenError {
                address: config.listen.clone(),
                source,
            })?;
        let addr = listener.local_addr().map_err(|source| ListenError {
            address: config.listen.clone(),
            source,
        })?;
        let state = Arc::new(State::new(&config));
        let stop = shutdown.child_token();
        let backend = Self {
            addr,
            name: config.name.clone(),
            state: state.clone(),
            stop: stop.clone(),
        };
        let config = Arc::new(config);
        tokio::spawn(async move {
            let builder = Arc::new(auto::Builder::new(TokioExecutor::new()));
            let mut connections = tokio::task::JoinSet::new();
            loop {
                while connections.try_join_next().is_some() {}
                let (stream, _) = tokio::select! {
                    _ = stop.cancelled() => break,
                    accepted = listener.accept() => match accepted {
                        Ok(accepted) => accepted,
                        Err(_) => continue,
                    },
                };
                let (state, config) = (state.clone(), config.clone());
                let service =
                    service_fn(move |request| answer(state.clone(), config.clone(), request));
                let builder = builder.clone();
                connections.spawn(async move {
                    let _ = builder
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
            drop(listener);
            // Stopped like a crash: open connections are cut, not drained.
            connections.abort_all();
        });
        Ok(backend)
    }

    /// Stops listening and drops its connections (a crash, as far as a
    /// front-end can tell).
    pub fn stop(&self) {
        self.stop.cancel();
    }

    /// What it has been asked, oldest first.
    pub fn seen(&self) -> Vec<Seen> {
        self.state.log.lock().map(|l| l.clone()).unwrap_or_default()
    }

    pub fn requests(&self) -> u64 {
        self.state.requests.load(Ordering::Relaxed)
    }

    /// Requests in the server now, working or waiting.
    pub fn in_flight(&self) -> u64 {
        self.state.in_flight.load(Ordering::Relaxed)
    }

    /// Requests refused because the queue was full.
    pub fn refused(&self) -> u64 {
        self.state.capacity.rejected()
    }

    /// When it began its first request at or after `since_ms` (wall
    /// clock, ms), as far as its log reaches.
    pub fn first_request_since(&self, since_ms: u64) -> Option<u64> {
        let log = self.state.log.lock().ok()?;
        let first = log.partition_point(|seen| seen.at_ms < since_ms);
        log.get(first).map(|seen| seen.at_ms)
    }

    /// Publishes its counters on `ops` and says it is ready.
    pub fn register(&self, ops: &headroom_shared::ops::Ops) {
        let backend = self.clone();
        ops.register(move |out| {
            out.counter(
                "headroom_backend_requests_total",
                "Requests the sample backend answered.",
                &[],
                backend.requests(),
            );
            out.counter(
                "headroom_backend_refused_total",
                "Requests refused with 503 because the queue was full.",
                &[],
                backend.refused(),
            );
            out.gauge(
                "headroom_backend_in_flight",
                "Requests in the server now, being worked on or queued.",
                &[],
                backend.in_flight() as f64,
            );
            out.gauge(
                "headroom_backend_queued",
                "Requests waiting for a slot now.",
                &[],
                backend.state.capacity.queued() as f64,
            );
        });
        ops.set_ready();
    }
}

fn query(request: &Request<Incoming>, name: &str) -> Option<u64> {
    request.uri().query()?.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=')?;
        (k == name).then(|| v.parse().ok()).flatten()
    })
}

async fn answer(
    state: Arc<State>,
    config: Arc<BackendConfig>,
    request: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let path = request.uri().path().to_owned();
    if path == "/stats" {
        return Ok(stats(&state));
    }
    let started = Instant::now();
    let hook = request.method() == Method::POST && path.starts_with("/hooks/");
    let _in_flight = InFlight::enter(&state);
    // The agent's hooks are the operator's, not traffic: they never queue.
    let slot = if hook {
        None
    } else {
        match state.capacity.admit().await {
            Some(slot) => Some(slot),
            None => return Ok(refuse(&config)),
        }
    };
    state.requests.fetch_add(1, Ordering::Relaxed);
    log_request(&state, &request, &path);
    let cost = query(&request, "cost_ms").map_or(config.cost, Duration::from_millis);
    let cost = state.capacity.draw(cost);
    let cpu = query(&request, "cpu_ms").map_or(config.cpu_cost, Duration::from_millis);
    let size = query(&request, "size").map_or(config.size, |s| {
        usize::try_from(s).unwrap_or(0).min(64 << 20)
    });
    let max_age = query(&request, "max_age");
    // Read the body through, as a real server would.
    let _ = request.into_body().collect().await;
    if !cpu.is_zero() {
        // Real work on a blocking thread, so the CPU the agent reports
        // follows the load while the server stays responsive.
        let _ = tokio::task::spawn_blocking(move || burn(cpu)).await;
    }
    if !cost.is_zero() {
        tokio::time::sleep(cost).await;
    }
    drop(slot);
    let response = content(&config, &path, hook, size, max_age);
    if let Ok(mut lat) = state.latency_us.lock() {
        if lat.len() < 100_000 {
            lat.push(u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX));
        }
    }
    Ok(response)
}

fn log_request(state: &State, request: &Request<Incoming>, path: &str) {
    if let Ok(mut log) = state.log.lock() {
        if log.len() >= LOG_LIMIT {
            log.drain(..LOG_LIMIT / 2);
        }
        log.push(Seen {
            method: request.method().to_string(),
            path: path.to_owned(),
            generation: request
                .headers()
                .get("x-headroom-generation")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse().ok()),
            at_ms: now_ms(),
        });
    }
}

/// The answer to a request the full queue cannot take.
fn refuse(config: &BackendConfig) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from_static(b"queue full\n")));
    *response.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
    let headers = response.headers_mut();
    if let Ok(v) = HeaderValue::from_str(&config.name) {
        headers.insert("x-backend", v);
    }
    headers.insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

fn content(
    config: &BackendConfig,
    path: &str,
    hook: bool,
    size: usize,
    max_age: Option<u64>,
) -> Response<Full<Bytes>> {
    let mut body = format!("{} {}\n", config.name, path).into_bytes();
    if !hook {
        body.resize(size.max(body.len()), b'.');
    }
    let mut response = Response::new(Full::new(Bytes::from(body)));
    let headers = response.headers_mut();
    if let Ok(v) = HeaderValue::from_str(&config.name) {
        headers.insert("x-backend", v);
    }
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    let max_age = max_age.unwrap_or(config.cache_max_age.as_secs());
    if path.starts_with(&config.cacheable_prefix) && max_age > 0 {
        if let Ok(v) = HeaderValue::from_str(&format!("public, max-age={max_age}")) {
            headers.insert(header::CACHE_CONTROL, v);
        }
    } else {
        headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    }
    response
}

/// This thread's CPU time so far, from the scheduler's account (the first
/// field of `/proc/thread-self/schedstat`, in nanoseconds).
fn thread_cpu_time() -> Option<Duration> {
    let text = std::fs::read_to_string("/proc/thread-self/schedstat").ok()?;
    let ns: u64 = text.split_whitespace().next()?.parse().ok()?;
    Some(Duration::from_nanos(ns))
}

/// Burns `how_long` of CPU time on this thread: CPU time, not wall time,
/// so a busy machine makes a request slower rather than cheaper. Without
/// the scheduler's account it burns wall time instead; either way it gives
/// up after ten times `how_long` of wall time.
fn burn(how_long: Duration) {
    let started = Instant::now();
    let give_up = started + how_long * 10;
    let cpu_start = thread_cpu_time();
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    loop {
        for _ in 0..20_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
        }
        std::hint::black_box(x);
        let now = Instant::now();
        let done = match (cpu_start, thread_cpu_time()) {
            (Some(from), Some(to)) => to.saturating_sub(from) >= how_long,
            _ => now.duration_since(started) >= how_long,
        };
        if done || now >= give_up {
            return;
        }
    }
}

fn stats(state: &State) -> Response<Full<Bytes>> {
    let requests = state.requests.load(Ordering::Relaxed);
    let refused = state.capacity.rejected();
    let now = Instant::now();
    let mut latencies = state
        .latency_us
        .lock()
        .map(|mut l| std::mem::take(&mut *l))
        .unwrap_or_default();
    // Over the window since the last read: the request and refusal rates,
    // and the mean number in the server, working or queued, which is
    // steadier than one instant's count.
    let window = state.last.lock().ok().and_then(|mut last| {
        let window = last.map(|(n, r, at)| {
            (
                requests.saturating_sub(n),
                refused.saturating_sub(r),
                now.duration_since(at),
            )
        });
        *last = Some((requests, refused, now));
        window
    });
    let (rate, errors, in_flight_mean) = match window {
        Some((n, r, elapsed)) if elapsed.as_secs_f64() > 0.0 => {
            let secs = elapsed.as_secs_f64();
            let mean = state
                .occupancy
                .lock()
                .ok()
                .map(|mut o| o.take_mean(elapsed));
            (Some(n as f64 / secs), Some(r as f64 / secs), mean)
        }
        _ => {
            // The first read starts the first window.
            if let Ok(mut o) = state.occupancy.lock() {
                o.take_mean(Duration::from_secs(1));
            }
            (None, None, None)
        }
    };
    latencies.sort_unstable();
    let pct = |q: f64| {
        (!latencies.is_empty()).then(|| {
            let i = ((q * latencies.len() as f64).ceil() as usize).clamp(1, latencies.len()) - 1;
            latencies[i] as f64 / 1000.0
        })
    };
    let capacity = &state.capacity;
    let body = serde_json::json!({
        "in_flight": state.in_flight.load(Ordering::Relaxed),
        "in_flight_mean": in_flight_mean,
        "busy": capacity.busy(),
        "queued": capacity.queued(),
        "concurrency": (capacity.concurrency() > 0).then_some(capacity.concurrency()),
        "queue_limit": capacity.queue_limit(),
        "requests_per_s": rate,
        "latency_p50_ms": pct(0.5),
        "latency_p99_ms": pct(0.99),
        "errors_per_s": errors,
    });
    let mut response = Response::new(Full::new(Bytes::from(body.to_string())));
    *response.status_mut() = StatusCode::OK;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}
