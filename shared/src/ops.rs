//! The operations endpoint every service serves on a small HTTP port:
//! `/healthz` (the process answers), `/readyz` (it can do its job now) and
//! `/metrics` (Prometheus text format 0.0.4).
//!
//! Metrics are read at scrape time from the atomics each service already
//! keeps for its own work, through collectors registered here, so the hot
//! paths pay nothing for being observable.

use std::collections::{BTreeMap, HashSet};
use std::convert::Infallible;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::nats::ConnectionEvents;

/// Upper bounds of latency buckets, in microseconds; the last is open.
pub const LATENCY_BOUNDS_US: [u64; 24] = [
    250,
    500,
    1_000,
    2_000,
    3_000,
    5_000,
    7_500,
    10_000,
    15_000,
    20_000,
    30_000,
    50_000,
    75_000,
    100_000,
    150_000,
    200_000,
    300_000,
    500_000,
    750_000,
    1_000_000,
    2_000_000,
    5_000_000,
    10_000_000,
    u64::MAX,
];

/// The bucket of [`LATENCY_BOUNDS_US`] a duration falls in.
pub fn latency_bucket(elapsed: Duration) -> usize {
    let us = u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX);
    LATENCY_BOUNDS_US
        .partition_point(|&b| b < us)
        .min(LATENCY_BOUNDS_US.len() - 1)
}

/// A cumulative latency histogram (never reset, as Prometheus expects).
#[derive(Debug, Default)]
pub struct Histogram {
    buckets: [AtomicU64; LATENCY_BOUNDS_US.len()],
    sum_us: AtomicU64,
}

impl Histogram {
    pub fn observe(&self, elapsed: Duration) {
        self.buckets[latency_bucket(elapsed)].fetch_add(1, Ordering::Relaxed);
        let us = u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX);
        self.sum_us.fetch_add(us, Ordering::Relaxed);
    }

    pub fn count(&self) -> u64 {
        self.buckets.iter().map(|b| b.load(Ordering::Relaxed)).sum()
    }
}

/// A family of series told apart by label values: counters of low-rate
/// events (a mutex per change: for decisions and allocations, not for
/// requests on a hot path), or gauges replaced whole by each observation
/// (pool sizes by state, members by cluster).
#[derive(Debug)]
pub struct Family<V> {
    name: &'static str,
    help: &'static str,
    labels: &'static [&'static str],
    values: Mutex<BTreeMap<Vec<String>, V>>,
}

/// Counts by label values.
pub type CounterVec = Family<u64>;
/// Gauges by label values.
pub type GaugeVec = Family<f64>;

impl<V: Copy> Family<V> {
    pub const fn new(
        name: &'static str,
        help: &'static str,
        labels: &'static [&'static str],
    ) -> Self {
        Self {
            name,
            help,
            labels,
            values: Mutex::new(BTreeMap::new()),
        }
    }

    fn values(&self) -> std::sync::MutexGuard<'_, BTreeMap<Vec<String>, V>> {
        self.values.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The series with these label values (in the order of the label
    /// names), if there is one.
    pub fn get(&self, values: &[&str]) -> Option<V> {
        self.values().get(&key(values)).copied()
    }

    /// Each series in turn, through `sample`; the family is declared even
    /// before its first series.
    fn write_with(
        &self,
        out: &mut Exposition,
        kind: &str,
        mut sample: impl FnMut(&mut Exposition, &[(&str, &str)], V),
    ) {
        let values = self.values();
        out.family(self.name, self.help, kind);
        for (key, value) in values.iter() {
            let labels: Vec<(&str, &str)> = self
                .labels
                .iter()
                .copied()
                .zip(key.iter().map(String::as_str))
                .collect();
            sample(out, &labels, *value);
        }
    }
}

fn key(values: &[&str]) -> Vec<String> {
    values.iter().map(|v| (*v).to_owned()).collect()
}

impl Family<u64> {
    /// Adds one to the series with these label values (in the order of
    /// the label names).
    pub fn inc(&self, values: &[&str]) {
        *self.values().entry(key(values)).or_default() += 1;
    }

    pub fn write(&self, out: &mut Exposition) {
        let (name, help) = (self.name, self.help);
        self.write_with(out, "counter", |out, labels, n| {
            out.counter(name, help, labels, n);
        });
    }
}

impl Family<f64> {
    /// Replaces every series with `series`.
    pub fn replace(&self, series: impl IntoIterator<Item = (Vec<String>, f64)>) {
        *self.values() = series.into_iter().collect();
    }

    pub fn write(&self, out: &mut Exposition) {
        let (name, help) = (self.name, self.help);
        self.write_with(out, "gauge", |out, labels, v| {
            out.gauge(name, help, labels, v)
        });
    }
}

/// A Prometheus text exposition being written. Each family's samples
/// must be written together; its `HELP` and `TYPE` lines come once.
#[derive(Debug, Default)]
pub struct Exposition {
    out: String,
    families: HashSet<String>,
}

impl Exposition {
    fn family(&mut self, name: &str, help: &str, kind: &str) {
        if self.families.insert(name.to_owned()) {
            let _ = writeln!(self.out, "# HELP {name} {help}");
            let _ = writeln!(self.out, "# TYPE {name} {kind}");
        }
    }

    fn sample(&mut self, name: &str, labels: &[(&str, &str)], extra: Option<(&str, &str)>) {
        self.out.push_str(name);
        let mut all = labels.iter().copied().chain(extra).peekable();
        if all.peek().is_some() {
            self.out.push('{');
            for (i, (key, value)) in all.enumerate() {
                if i > 0 {
                    self.out.push(',');
                }
                self.out.push_str(key);
                self.out.push_str("=\"");
                for c in value.chars() {
                    match c {
                        '\\' => self.out.push_str("\\\\"),
                        '"' => self.out.push_str("\\\""),
                        '\n' => self.out.push_str("\\n"),
                        c => self.out.push(c),
                    }
                }
                self.out.push('"');
            }
            self.out.push('}');
        }
    }

    /// A monotonically increasing count; `name` should end in `_total`.
    pub fn counter(&mut self, name: &str, help: &str, labels: &[(&str, &str)], value: u64) {
        self.family(name, help, "counter");
        self.sample(name, labels, None);
        let _ = writeln!(self.out, " {value}");
    }

    pub fn gauge(&mut self, name: &str, help: &str, labels: &[(&str, &str)], value: f64) {
        self.family(name, help, "gauge");
        self.sample(name, labels, None);
        let _ = writeln!(self.out, " {value}");
    }

    /// A latency histogram, in seconds; `name` should end in `_seconds`.
    pub fn histogram(&mut self, name: &str, help: &str, labels: &[(&str, &str)], h: &Histogram) {
        self.family(name, help, "histogram");
        let bucket = format!("{name}_bucket");
        let mut cumulative = 0u64;
        for (i, count) in h.buckets.iter().enumerate() {
            cumulative += count.load(Ordering::Relaxed);
            let le = if i + 1 == LATENCY_BOUNDS_US.len() {
                "+Inf".to_owned()
            } else {
                format!("{}", LATENCY_BOUNDS_US[i] as f64 / 1e6)
            };
            self.sample(&bucket, labels, Some(("le", &le)));
            let _ = writeln!(self.out, " {cumulative}");
        }
        self.sample(&format!("{name}_sum"), labels, None);
        let sum = h.sum_us.load(Ordering::Relaxed) as f64 / 1e6;
        let _ = writeln!(self.out, " {sum}");
        self.sample(&format!("{name}_count"), labels, None);
        let _ = writeln!(self.out, " {cumulative}");
    }

    pub fn into_string(self) -> String {
        self.out
    }
}

type Collector = Box<dyn Fn(&mut Exposition) + Send + Sync>;
type Probe = Box<dyn Fn() -> Result<(), String> + Send + Sync>;

/// One service's health and metrics, shared by its tasks and its HTTP
/// endpoint.
pub struct Ops {
    service: String,
    /// `None` once ready; otherwise why not.
    not_ready: Mutex<Option<String>>,
    collectors: Mutex<Vec<Collector>>,
    /// A readiness check of the service's own state, asked on each probe.
    probe: Mutex<Option<Probe>>,
    nats: Mutex<Option<(async_nats::Client, Arc<ConnectionEvents>, bool)>>,
}

impl std::fmt::Debug for Ops {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ops")
            .field("service", &self.service)
            .finish_non_exhaustive()
    }
}

impl Ops {
    /// A service that is starting: alive, not ready yet.
    pub fn new(service: &str) -> Arc<Self> {
        Arc::new(Self {
            service: service.to_owned(),
            not_ready: Mutex::new(Some("starting".to_owned())),
            collectors: Mutex::new(Vec::new()),
            probe: Mutex::new(None),
            nats: Mutex::new(None),
        })
    }

    pub fn set_ready(&self) {
        *self
            .not_ready
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = None;
    }

    pub fn set_not_ready(&self, why: impl Into<String>) {
        *self
            .not_ready
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(why.into());
    }

    /// Adds a collector, called on every scrape.
    pub fn register(&self, collector: impl Fn(&mut Exposition) + Send + Sync + 'static) {
        self.collectors
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(Box::new(collector));
    }

    /// Adds a readiness check asked on every probe, for a service whose
    /// readiness is a fact of its state rather than an event.
    pub fn set_probe(&self, probe: impl Fn() -> Result<(), String> + Send + Sync + 'static) {
        *self.probe.lock().unwrap_or_else(PoisonError::into_inner) = Some(Box::new(probe));
    }

    /// Exposes the connection's state and events; with `required`, the
    /// service is not ready while disconnected.
    pub fn watch_nats(
        &self,
        client: async_nats::Client,
        events: Arc<ConnectionEvents>,
        required: bool,
    ) {
        *self.nats.lock().unwrap_or_else(PoisonError::into_inner) =
            Some((client, events, required));
    }

    /// `Ok` when ready, otherwise why not.
    ///
    /// # Errors
    /// The reason the service cannot do its job now.
    pub fn readiness(&self) -> Result<(), String> {
        if let Some(why) = &*self
            .not_ready
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
        {
            return Err(why.clone());
        }
        if let Some(probe) = &*self.probe.lock().unwrap_or_else(PoisonError::into_inner) {
            probe()?;
        }
        if let Some((client, _, true)) = &*self.nats.lock().unwrap_or_else(PoisonError::into_inner)
        {
            if client.connection_state() != async_nats::connection::State::Connected {
                return Err("not connected to NATS".to_owned());
            }
        }
        Ok(())
    }

    /// The whole exposition.
    pub fn render(&self) -> String {
        let mut out = Exposition::default();
        let service = [("service", self.service.as_str())];
        out.gauge(
            "headroom_ready",
            "1 when the service can do its job now (what /readyz says).",
            &service,
            if self.readiness().is_ok() { 1.0 } else { 0.0 },
        );
        if let Some((client, events, _)) =
            &*self.nats.lock().unwrap_or_else(PoisonError::into_inner)
        {
            let connected = client.connection_state() == async_nats::connection::State::Connected;
            out.gauge(
                "headroom_nats_connected",
                "1 while the NATS connection is up.",
                &service,
                if connected { 1.0 } else { 0.0 },
            );
            for (name, help, counter) in [
                (
                    "headroom_nats_disconnects_total",
                    "Times the NATS connection was lost.",
                    &events.disconnects,
                ),
                (
                    "headroom_nats_slow_consumer_total",
                    "Times the client dropped messages because a subscriber lagged.",
                    &events.slow_consumers,
                ),
                (
                    "headroom_nats_server_errors_total",
                    "Errors the NATS server reported to this client.",
                    &events.server_errors,
                ),
            ] {
                out.counter(name, help, &service, counter.load(Ordering::Relaxed));
            }
        }
        for collector in &*self
            .collectors
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
        {
            collector(&mut out);
        }
        out.into_string()
    }

    /// Serves `/healthz`, `/readyz` and `/metrics` on `listener` until
    /// `shutdown`.
    pub async fn serve(self: Arc<Self>, listener: TcpListener, shutdown: CancellationToken) {
        let local = listener.local_addr().ok();
        tracing::info!(addr = ?local, "health and metrics endpoint serving");
        loop {
            let (stream, _) = tokio::select! {
                () = shutdown.cancelled() => return,
                accepted = listener.accept() => match accepted {
                    Ok(accepted) => accepted,
                    Err(err) => {
                        // Out of descriptors, say: back off instead of spinning.
                        tracing::warn!(%err, "health endpoint cannot accept");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                },
            };
            let ops = self.clone();
            let shutdown = shutdown.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |request| {
                    let ops = ops.clone();
                    async move { Ok::<_, Infallible>(ops.answer(&request)) }
                });
                let connection = hyper::server::conn::http1::Builder::new()
                    .header_read_timeout(Duration::from_secs(5))
                    .timer(hyper_util::rt::TokioTimer::new())
                    .serve_connection(TokioIo::new(stream), service);
                tokio::select! {
                    () = shutdown.cancelled() => {}
                    _ = connection => {}
                }
            });
        }
    }

    fn answer<B>(&self, request: &Request<B>) -> Response<Full<Bytes>> {
        let text = |status: StatusCode, content_type: &'static str, body: String| {
            let mut response = Response::new(Full::new(Bytes::from(body)));
            *response.status_mut() = status;
            response.headers_mut().insert(
                hyper::header::CONTENT_TYPE,
                hyper::header::HeaderValue::from_static(content_type),
            );
            response
        };
        const PLAIN: &str = "text/plain; charset=utf-8";
        if request.method() != Method::GET && request.method() != Method::HEAD {
            return text(
                StatusCode::METHOD_NOT_ALLOWED,
                PLAIN,
                "only GET\n".to_owned(),
            );
        }
        match request.uri().path() {
            "/healthz" => text(StatusCode::OK, PLAIN, "ok\n".to_owned()),
            "/readyz" => match self.readiness() {
                Ok(()) => text(StatusCode::OK, PLAIN, "ready\n".to_owned()),
                Err(why) => text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    PLAIN,
                    format!("not ready: {why}\n"),
                ),
            },
            "/metrics" => text(
                StatusCode::OK,
                "text/plain; version=0.0.4; charset=utf-8",
                self.render(),
            ),
            _ => text(
                StatusCode::NOT_FOUND,
                PLAIN,
                "try /healthz, /readyz or /metrics\n".to_owned(),
            ),
        }
    }
}

/// Binds and serves the endpoint in the background when `listen` is set;
/// returns the bound address.
///
/// # Errors
/// When the address cannot be bound.
pub async fn start(
    ops: &Arc<Ops>,
    listen: Option<&str>,
    shutdown: &CancellationToken,
) -> std::io::Result<Option<SocketAddr>> {
    let Some(listen) = listen else {
        return Ok(None);
    };
    let listener = TcpListener::bind(listen).await?;
    let addr = listener.local_addr()?;
    tokio::spawn(ops.clone().serve(listener, shutdown.clone()));
    Ok(Some(addr))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exposition_groups_families_and_escapes_labels() {
        let ops = Ops::new("test");
        let h = Arc::new(Histogram::default());
        h.observe(Duration::from_micros(700));
        h.observe(Duration::from_millis(40));
        let h2 = h.clone();
        ops.register(move |out| {
            out.counter("x_total", "X.", &[("kind", "a\"b\\c")], 3);
            out.counter("x_total", "X.", &[("kind", "d")], 4);
            out.histogram("lat_seconds", "Latency.", &[], &h2);
        });
        let text = ops.render();
        assert_eq!(text.matches("# TYPE x_total counter").count(), 1);
        assert!(text.contains("x_total{kind=\"a\\\"b\\\\c\"} 3\n"), "{text}");
        assert!(text.contains("x_total{kind=\"d\"} 4\n"));
        assert!(
            text.contains("lat_seconds_bucket{le=\"0.0005\"} 0\n"),
            "{text}"
        );
        assert!(
            text.contains("lat_seconds_bucket{le=\"0.001\"} 1\n"),
            "{text}"
        );
        assert!(text.contains("lat_seconds_bucket{le=\"+Inf\"} 2\n"));
        assert!(text.contains("lat_seconds_count 2\n"));
        assert!(text.contains("lat_seconds_sum 0.0407\n"), "{text}");
        assert!(text.contains("headroom_ready{service=\"test\"} 0\n"));
    }

    #[test]
    fn families_write_their_series_and_declare_themselves_when_empty() {
        let counts = CounterVec::new("c_total", "C.", &["kind", "outcome"]);
        let gauges = GaugeVec::new("g", "G.", &["state"]);
        let mut out = Exposition::default();
        counts.write(&mut out);
        gauges.write(&mut out);
        let empty = out.into_string();
        assert!(empty.contains("# TYPE c_total counter\n") && empty.contains("# TYPE g gauge\n"));
        assert!(!empty.contains("c_total{"), "{empty}");
        counts.inc(&["a", "ok"]);
        counts.inc(&["a", "ok"]);
        counts.inc(&["b", "failed"]);
        gauges.replace([(vec!["free".to_owned()], 3.0)]);
        gauges.replace([(vec!["allocated".to_owned()], 1.0)]);
        let mut out = Exposition::default();
        counts.write(&mut out);
        gauges.write(&mut out);
        let text = out.into_string();
        assert!(
            text.contains("c_total{kind=\"a\",outcome=\"ok\"} 2\n"),
            "{text}"
        );
        assert!(text.contains("c_total{kind=\"b\",outcome=\"failed\"} 1\n"));
        assert!(text.contains("g{state=\"allocated\"} 1\n"));
        assert!(!text.contains("free"), "replaced whole: {text}");
    }

    #[test]
    fn readiness_follows_the_service() {
        let ops = Ops::new("test");
        assert_eq!(ops.readiness(), Err("starting".to_owned()));
        ops.set_ready();
        assert_eq!(ops.readiness(), Ok(()));
        ops.set_not_ready("draining");
        assert_eq!(ops.readiness(), Err("draining".to_owned()));
    }
}
