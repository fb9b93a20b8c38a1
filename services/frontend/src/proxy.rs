//! One client request: limits, cache, route, member, forward (retrying an
//! idempotent request once on another member when the connection fails),
//! and the answer, streamed or stored.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Instant, SystemTime};

use arc_swap::ArcSwapOption;
use bytes::Bytes;
use headroom_shared::config::FrontendConfig;
use headroom_shared::ops::Histogram;
use headroom_shared::wire::now_ms;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode, Uri};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Empty, Full, Limited};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

use crate::cache::{self, Cache};
use crate::routing::{Backend, Table};
use crate::stats::Latency;

/// Header on requests to members naming the routing table's generation.
pub const GENERATION_HEADER: &str = "x-headroom-generation";

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
pub type ProxyBody = BoxBody<Bytes, BoxError>;

/// What the proxy counts of itself.
#[derive(Debug, Default)]
pub struct Counters {
    pub requests: AtomicU64,
    /// Answers by status code (index = code − 100).
    pub by_status: StatusCounts,
    pub cache_hits: AtomicU64,
    /// Cacheable requests the cache could not answer (missing or stale).
    pub cache_misses: AtomicU64,
    /// Every request's time, kept for `/metrics` (never reset).
    pub duration: Histogram,
    pub retries: AtomicU64,
    pub errors: AtomicU64,
    pub in_flight: AtomicU64,
    pub latency: Latency,
    /// Times the routing was reloaded from the KV snapshot because changes
    /// were missed or the watch fell behind.
    pub resyncs: AtomicU64,
}

/// Answers counted by status code.
#[derive(Debug)]
pub struct StatusCounts(pub [AtomicU64; 500]);

impl Default for StatusCounts {
    fn default() -> Self {
        Self(std::array::from_fn(|_| AtomicU64::new(0)))
    }
}

impl StatusCounts {
    pub fn record(&self, status: StatusCode) {
        if let Some(slot) = self.0.get(usize::from(status.as_u16()).wrapping_sub(100)) {
            slot.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// The proxy's state, shared by every connection.
pub struct Proxy {
    /// The routing table; swapped whole on a membership change.
    pub table: ArcSwapOption<Table>,
    pub cache: Option<Cache>,
    fills: cache::Fills,
    pub counters: Counters,
    /// Routing came from the last-known-good file, not from NATS.
    pub from_file: AtomicBool,
    /// The generation of the table in use, for whoever waits on a change
    /// (tests, the reaction benchmark).
    applied: tokio::sync::watch::Sender<u64>,
    settings: FrontendConfig,
}

/// A pool of connections to members. Each worker thread has its own, so a
/// request and its upstream connection stay on one thread (no cross-thread
/// wake-ups on the hot path).
pub type Upstream = Client<HttpConnector, ProxyBody>;

impl Proxy {
    pub fn new(settings: FrontendConfig) -> Self {
        Self {
            table: ArcSwapOption::empty(),
            cache: Cache::new(settings.cache_bytes, settings.cache_max_object),
            fills: cache::Fills::default(),
            counters: Counters::default(),
            from_file: AtomicBool::new(false),
            applied: tokio::sync::watch::Sender::new(0),
            settings,
        }
    }

    /// Swaps in a routing table, and tells whoever watches.
    pub fn set_table(&self, table: Table) {
        let generation = table.generation;
        self.table.store(Some(Arc::new(table)));
        self.applied.send_replace(generation);
    }

    /// Follows the generation of the table in use.
    pub fn applied(&self) -> tokio::sync::watch::Receiver<u64> {
        self.applied.subscribe()
    }

    /// A new connection pool to members, for one worker thread.
    pub fn upstream(&self) -> Upstream {
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(self.settings.connect_timeout));
        connector.set_nodelay(true);
        Client::builder(TokioExecutor::new())
            .pool_idle_timeout(std::time::Duration::from_secs(30))
            .pool_max_idle_per_host(1024)
            .build(connector)
    }

    pub fn settings(&self) -> &FrontendConfig {
        &self.settings
    }

    /// Answers one request; never fails (errors are responses).
    pub async fn handle(
        self: Arc<Self>,
        upstream: Upstream,
        request: Request<Incoming>,
        client: SocketAddr,
    ) -> Result<Response<ProxyBody>, Infallible> {
        let started = Instant::now();
        self.counters.requests.fetch_add(1, Ordering::Relaxed);
        self.counters.in_flight.fetch_add(1, Ordering::Relaxed);
        let response = self.forward(&upstream, request, client).await;
        self.counters.in_flight.fetch_sub(1, Ordering::Relaxed);
        let elapsed = started.elapsed();
        self.counters.latency.record(elapsed);
        self.counters.duration.observe(elapsed);
        self.counters.by_status.record(response.status());
        if response.status().is_server_error() {
            self.counters.errors.fetch_add(1, Ordering::Relaxed);
        }
        Ok(response)
    }

    async fn forward(
        &self,
        upstream_pool: &Upstream,
        request: Request<Incoming>,
        client: SocketAddr,
    ) -> Response<ProxyBody> {
        let length = content_length(request.headers());
        if length.is_some_and(|n| n > self.settings.max_body_bytes) {
            return error(StatusCode::PAYLOAD_TOO_LARGE, "request body too large");
        }
        let Some(table) = self.table.load_full() else {
            return error(StatusCode::SERVICE_UNAVAILABLE, "no routing table yet");
        };
        let host = request
            .headers()
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
            .map(str::to_owned)
            .or_else(|| request.uri().authority().map(|a| a.to_string()));
        let method = request.method().clone();
        let path_and_query = request
            .uri()
            .path_and_query()
            .map_or("/", |pq| pq.as_str())
            .to_owned();
        let Some(route) = table.route(method.as_str(), host.as_deref(), request.uri().path())
        else {
            return error(StatusCode::NOT_FOUND, "no route for this request");
        };

        // Held by the request that fetches a missing object, until it is
        // stored; others asking for it meanwhile wait instead of fetching.
        let mut _filling = None;
        let cache_key = match &self.cache {
            Some(cache) if method == Method::GET && cache::request_allows(request.headers()) => {
                let key = cache::key(host.as_deref(), &path_and_query);
                let lookup = cache.lookup(&key);
                if !matches!(lookup, cache::Lookup::Fresh(_)) {
                    self.counters.cache_misses.fetch_add(1, Ordering::Relaxed);
                }
                match lookup {
                    cache::Lookup::Fresh(hit) => return self.answer_from_cache(&hit),
                    cache::Lookup::Missing => {}
                    cache::Lookup::Stale => match self.fills.join(&key) {
                        cache::Fill::Lead(guard) => _filling = Some(guard),
                        cache::Fill::Follow(mut done) => {
                            let _ =
                                tokio::time::timeout(self.settings.request_timeout, done.changed())
                                    .await;
                            if let Some(hit) = cache.get(&key) {
                                return self.answer_from_cache(&hit);
                            }
                            // Not stored again (no longer cacheable, or it
                            // failed): ask a member ourselves.
                        }
                    },
                }
                Some(key)
            }
            _ => None,
        };

        let bodyless =
            length.unwrap_or(0) == 0 && !request.headers().contains_key(header::TRANSFER_ENCODING);
        let idempotent = matches!(
            method,
            Method::GET
                | Method::HEAD
                | Method::OPTIONS
                | Method::PUT
                | Method::DELETE
                | Method::TRACE
        );
        let (parts, body) = request.into_parts();
        let mut body = Some(body);
        let mut headers = forward_headers(&parts.headers, client, host.as_deref());
        // Which membership generation routed it: members and tests can tell
        // a request routed before a change from one routed after.
        headers.insert(GENERATION_HEADER, HeaderValue::from(table.generation));
        let mut exclude = None;
        for attempt in 0..2 {
            let Some(backend) = table.pick(
                route,
                path_and_query.as_bytes(),
                now_ms(),
                u64::try_from(self.settings.slow_start.as_millis()).unwrap_or(u64::MAX),
                exclude.as_ref(),
            ) else {
                return error(
                    StatusCode::SERVICE_UNAVAILABLE,
                    &format!(
                        "no member serves request type {:?}",
                        table.request_type(route)
                    ),
                );
            };
            let upstream_body: ProxyBody = match (bodyless, body.take()) {
                (false, Some(b)) => Limited::new(
                    b,
                    usize::try_from(self.settings.max_body_bytes).unwrap_or(usize::MAX),
                )
                .map_err(BoxError::from)
                .boxed(),
                _ => Empty::<Bytes>::new()
                    .map_err(|never| match never {})
                    .boxed(),
            };
            let uri: Uri = match format!("http://{}{}", backend.authority, path_and_query).parse() {
                Ok(uri) => uri,
                Err(_) => return error(StatusCode::BAD_REQUEST, "request target is not a path"),
            };
            let mut upstream = Request::new(upstream_body);
            *upstream.method_mut() = method.clone();
            *upstream.uri_mut() = uri;
            *upstream.headers_mut() = headers.clone();

            let guard = InFlight::start(backend.clone());
            let sent = Instant::now();
            let answer = tokio::time::timeout(
                self.settings.request_timeout,
                upstream_pool.request(upstream),
            )
            .await;
            let failed = |backend: &Backend| {
                backend.failed(
                    now_ms(),
                    self.settings.eject_after,
                    u64::try_from(self.settings.eject_for.as_millis()).unwrap_or(u64::MAX),
                );
            };
            match answer {
                Ok(Ok(response)) => {
                    backend.succeeded();
                    backend.requests.fetch_add(1, Ordering::Relaxed);
                    backend.latency.record(sent.elapsed());
                    if response.status().is_server_error() {
                        backend.errors.fetch_add(1, Ordering::Relaxed);
                    }
                    return self
                        .respond(
                            response,
                            guard,
                            cache_key.as_deref(),
                            &method,
                            _filling.is_some(),
                        )
                        .await;
                }
                Ok(Err(err)) => {
                    // Only a member that cannot be connected to counts
                    // towards ejection: a broken request body is the
                    // client's doing, not the member's.
                    if err.is_connect() {
                        failed(&backend);
                    } else {
                        backend.errors.fetch_add(1, Ordering::Relaxed);
                    }
                    tracing::debug!(server = %backend.server, %err, "member failed a request");
                    if attempt == 0 && idempotent && bodyless {
                        self.counters.retries.fetch_add(1, Ordering::Relaxed);
                        exclude = Some(backend.server.clone());
                        continue;
                    }
                    return error(StatusCode::BAD_GATEWAY, "the member could not be reached");
                }
                Err(_) => {
                    failed(&backend);
                    return error(
                        StatusCode::GATEWAY_TIMEOUT,
                        "the member did not answer in time",
                    );
                }
            }
        }
        error(StatusCode::BAD_GATEWAY, "no member could be reached")
    }

    fn answer_from_cache(&self, hit: &cache::Cached) -> Response<ProxyBody> {
        self.counters.cache_hits.fetch_add(1, Ordering::Relaxed);
        let mut response = Response::new(full(hit.body.clone()));
        *response.status_mut() = hit.status;
        *response.headers_mut() = hit.headers.clone();
        let headers = response.headers_mut();
        headers.insert(header::AGE, cache::age_header(hit.age(Instant::now())));
        headers.insert("x-cache", HeaderValue::from_static("hit"));
        response
    }

    /// The member's answer to the client: stored first when it may be
    /// shared, otherwise streamed (the member counts as busy until the body
    /// has been passed on).
    async fn respond(
        &self,
        response: Response<Incoming>,
        guard: InFlight,
        cache_key: Option<&str>,
        method: &Method,
        refilling: bool,
    ) -> Response<ProxyBody> {
        let (mut parts, body) = response.into_parts();
        strip_hop_by_hop(&mut parts.headers);
        let storable = match (&self.cache, cache_key) {
            (Some(cache), Some(key)) if *method == Method::GET => {
                cache::freshness(parts.status, &parts.headers, SystemTime::now())
                    .filter(|_| {
                        content_length(&parts.headers).is_some_and(|n| n <= cache.max_object())
                    })
                    .map(|ttl| (cache, key, ttl))
            }
            _ => None,
        };
        if let Some((cache, key, ttl)) = storable {
            match body.collect().await {
                Ok(collected) => {
                    let bytes = collected.to_bytes();
                    drop(guard);
                    cache.put(
                        key.to_owned(),
                        parts.status,
                        parts.headers.clone(),
                        bytes.clone(),
                        ttl,
                    );
                    parts
                        .headers
                        .insert("x-cache", HeaderValue::from_static("miss"));
                    return Response::from_parts(parts, full(bytes));
                }
                Err(_) => return error(StatusCode::BAD_GATEWAY, "the member's answer broke off"),
            }
        }
        if let (true, Some(cache), Some(key)) = (refilling, &self.cache, cache_key) {
            // The expired copy is not replaced: drop it, so later misses do
            // not wait on each other for an object that is not kept.
            cache.forget(key);
        }
        let body = Guarded {
            inner: body,
            _guard: guard,
        };
        Response::from_parts(parts, body.map_err(BoxError::from).boxed())
    }
}

/// Counts a request in flight at a member until dropped.
struct InFlight(Arc<Backend>);

impl InFlight {
    fn start(backend: Arc<Backend>) -> Self {
        backend.in_flight.fetch_add(1, Ordering::Relaxed);
        Self(backend)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A member's response body, holding its in-flight count until done.
struct Guarded {
    inner: Incoming,
    _guard: InFlight,
}

impl Body for Guarded {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        Pin::new(&mut self.get_mut().inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

fn full(bytes: Bytes) -> ProxyBody {
    Full::new(bytes).map_err(|never| match never {}).boxed()
}

/// A short, clear error answer.
pub fn error(status: StatusCode, message: &str) -> Response<ProxyBody> {
    let mut response = Response::new(full(Bytes::from(format!("{message}\n"))));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

fn content_length(headers: &HeaderMap) -> Option<u64> {
    headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse().ok())
}

const HOP_BY_HOP: [HeaderName; 7] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .collect();
    for name in HOP_BY_HOP.iter().chain(named.iter()) {
        headers.remove(name);
    }
}

/// The headers sent to the member: the client's, less hop-by-hop ones,
/// plus who asked and through what.
fn forward_headers(incoming: &HeaderMap, client: SocketAddr, host: Option<&str>) -> HeaderMap {
    let mut headers = incoming.clone();
    strip_hop_by_hop(&mut headers);
    let ip = client.ip().to_string();
    let forwarded_for = match headers.get("x-forwarded-for").and_then(|v| v.to_str().ok()) {
        Some(previous) => format!("{previous}, {ip}"),
        None => ip,
    };
    if let Ok(v) = HeaderValue::from_str(&forwarded_for) {
        headers.insert("x-forwarded-for", v);
    }
    headers.insert("x-forwarded-proto", HeaderValue::from_static("http"));
    if let Some(v) = host.and_then(|h| HeaderValue::from_str(h).ok()) {
        headers.insert("x-forwarded-host", v);
    }
    headers.append(header::VIA, HeaderValue::from_static("1.1 headroom"));
    headers
}
