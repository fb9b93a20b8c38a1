//! One client request: limits, cache, route, member, forward (retrying an
//! idempotent request once on another member when the connection fails),
//! and the answer, streamed or stored, or the member's connection when it
//! switches protocols (WebSocket).

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant, SystemTime};

use arc_swap::ArcSwapOption;
use bytes::{Bytes, BytesMut};
use headroom_shared::config::FrontendConfig;
use headroom_shared::ops::Histogram;
use headroom_shared::time::now_ms;
use headroom_shared::ServerId;
use http::header::{self, HeaderMap, HeaderValue};
use http::{Method, Request, Response, StatusCode, Version};
use http_body_util::{BodyExt, LengthLimitError, Limited};
use hyper::body::{Body, Frame, SizeHint};
use tokio::net::TcpStream;
use tokio::time::Sleep;

use crate::cache::{self, Cache};
use crate::forward::{self, recycle_head, request_head, Forwarded, Present, Then};
use crate::hold::Hold;
use crate::http1::headers;
use crate::http1::{Asked, Lines};
use crate::routing::{Backend, RouteId, Table};
use crate::stats::Latency;
use crate::upstream::{BoxError, RequestBody, Sending, Upstream, UpstreamBody, UpstreamError};

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
    /// Protocol switches (WebSocket) joined to a member, and those open.
    pub tunnels: AtomicU64,
    pub tunnels_open: AtomicU64,
    /// Client connections accepted, and those open.
    pub connections: AtomicU64,
    pub connections_open: AtomicU64,
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
    /// Requests waiting for the cluster's first member.
    pub hold: Hold,
    settings: FrontendConfig,
}

impl Proxy {
    pub fn new(settings: FrontendConfig) -> Self {
        Self {
            table: ArcSwapOption::empty(),
            cache: Cache::new(settings.cache_bytes, settings.cache_max_object),
            fills: cache::Fills::default(),
            counters: Counters::default(),
            from_file: AtomicBool::new(false),
            applied: tokio::sync::watch::Sender::new(0),
            hold: Hold::new(settings.hold_max),
            settings,
        }
    }

    /// Swaps in a routing table, tells whoever watches, and, when it has
    /// members, sends the held requests on to them.
    pub fn set_table(&self, table: Table) {
        let generation = table.generation;
        let table = Arc::new(table);
        self.table.store(Some(table.clone()));
        self.applied.send_replace(generation);
        if !table.backends.is_empty() {
            self.hold.release(&table);
        }
    }

    /// Follows the generation of the table in use.
    pub fn applied(&self) -> tokio::sync::watch::Receiver<u64> {
        self.applied.subscribe()
    }

    /// A new connection pool to members, for one worker thread: a request
    /// and its connection to the member stay on one thread (no
    /// cross-thread wake-ups on the hot path).
    pub fn upstream(&self) -> Upstream {
        Upstream::new(
            self.settings.connect_timeout,
            self.settings.request_timeout,
            self.settings.member_idle_timeout,
        )
    }

    pub fn settings(&self) -> &FrontendConfig {
        &self.settings
    }

    /// Answers one request, whichever connection it came on (HTTP/1 from
    /// [`crate::server`], HTTP/2 through hyper); never fails (errors are
    /// responses). `timer` bounds the wait for a member's answer: a
    /// connection that carries one request at a time lends its own, as
    /// moving an armed timer costs less than making one per request.
    pub async fn handle<B>(
        &self,
        upstream: &Upstream,
        request: Request<B>,
        client: SocketAddr,
        timer: Option<Pin<&mut Sleep>>,
    ) -> Response<ProxyBody>
    where
        B: Body<Data = Bytes> + Unpin,
        B::Error: Into<BoxError>,
    {
        let started = Instant::now();
        self.counters.requests.fetch_add(1, Ordering::Relaxed);
        self.counters.in_flight.fetch_add(1, Ordering::Relaxed);
        let mut own = None;
        let timer = match timer {
            Some(lent) => lent,
            None => own
                .insert(Box::pin(tokio::time::sleep(self.settings.request_timeout)))
                .as_mut(),
        };
        let response = self
            .forward(upstream, request, client, started, timer)
            .await;
        self.counters.in_flight.fetch_sub(1, Ordering::Relaxed);
        let elapsed = started.elapsed();
        self.counters.latency.record(elapsed);
        self.counters.duration.observe(elapsed);
        self.counters.by_status.record(response.status());
        if response.status().is_server_error() {
            self.counters.errors.fetch_add(1, Ordering::Relaxed);
        }
        response
    }

    /// Admit → look up (cache, coalescing) → attempt (the retry loop) →
    /// finish.
    async fn forward<B>(
        &self,
        upstream: &Upstream,
        request: Request<B>,
        client: SocketAddr,
        started: Instant,
        timer: Pin<&mut Sleep>,
    ) -> Response<ProxyBody>
    where
        B: Body<Data = Bytes> + Unpin,
        B::Error: Into<BoxError>,
    {
        let (parts, body) = request.into_parts();
        let admitted = match self.admit(&parts, body.size_hint().exact()) {
            Ok(admitted) => admitted,
            Err((status, why)) => return error(status, why),
        };
        let looked_up = match self.look_up(&admitted).await {
            Ok(looked_up) => looked_up,
            Err(hit) => return self.answer_from_cache(&hit),
        };
        // No member at all: wait for the first (scale from zero).
        let admitted = if admitted.table.backends.is_empty() {
            match self.held(admitted).await {
                Ok(admitted) => admitted,
                Err(response) => return response,
            }
        } else {
            admitted
        };
        let limit = usize::try_from(self.settings.max_body_bytes).unwrap_or(usize::MAX);
        let request_body = match admitted.length {
            Some(0) => RequestBody::None,
            Some(n) => RequestBody::Length(n, Limited::new(body, limit)),
            // HTTP/1 chunked, or an HTTP/2 stream without a length.
            None if !body.is_end_stream() => RequestBody::Chunked(Limited::new(body, limit)),
            None => RequestBody::None,
        };
        let attempts = Attempts {
            admitted,
            looked_up,
            upstream,
            client,
            started,
        };
        attempts.run(self, request_body, timer).await
    }

    /// What the request is and where it goes, or why it goes nowhere.
    /// `length` is the body's, when its framing gives one: HTTP/1's
    /// parser and hyper's HTTP/2 have read `Content-Length` already (and
    /// a transfer coding, which decides the length whatever
    /// `Content-Length` says, RFC 9112 §6.3, gives none: the body goes on
    /// chunked).
    fn admit<'a>(
        &self,
        parts: &'a http::request::Parts,
        length: Option<u64>,
    ) -> Result<Admitted<'a>, (StatusCode, &'static str)> {
        if length.is_some_and(|n| n > self.settings.max_body_bytes) {
            return Err((StatusCode::PAYLOAD_TOO_LARGE, "request body too large"));
        }
        let present = Present::of(&parts.headers);
        let upgrade = (length == Some(0))
            .then(|| forward::upgrade_asked(parts, &present))
            .flatten();
        let Some(table) = self.table.load_full() else {
            return Err((StatusCode::SERVICE_UNAVAILABLE, "no routing table yet"));
        };
        // HTTP/2 carries the host in the request target, not a header.
        let authority = parts.uri.authority().map(|a| a.as_str());
        let host = present.host.and_then(|h| h.to_str().ok()).or(authority);
        let path_and_query = parts.uri.path_and_query().map_or("/", |pq| pq.as_str());
        let Some(route) = table.route(parts.method.as_str(), host, parts.uri.path()) else {
            return Err((StatusCode::NOT_FOUND, "no route for this request"));
        };
        Ok(Admitted {
            parts,
            table,
            route,
            host,
            path_and_query,
            length,
            upgrade,
            present,
        })
    }

    /// Holds a request while the cluster has no member, until a table
    /// with members comes (then routed by it), the queue is full or the
    /// wait runs out (a 503 with `Retry-After`, never a dropped
    /// connection).
    async fn held<'a>(
        &self,
        mut admitted: Admitted<'a>,
    ) -> Result<Admitted<'a>, Response<ProxyBody>> {
        let retry_after = self.settings.hold_timeout.as_secs().max(1);
        let Ok(released) = self.hold.enter() else {
            return Err(unavailable(
                retry_after,
                "no member yet, and too many requests wait for one",
            ));
        };
        // A table stored before this request's place was taken was not
        // handed to it: look once more.
        let current = self.table.load_full().filter(|t| !t.backends.is_empty());
        let table = match current {
            Some(table) => table,
            None => match tokio::time::timeout(self.settings.hold_timeout, released).await {
                Ok(Ok(table)) => table,
                _ => {
                    self.hold.timed_out.fetch_add(1, Ordering::Relaxed);
                    return Err(unavailable(retry_after, "no member became ready in time"));
                }
            },
        };
        let parts = admitted.parts;
        let Some(route) = table.route(parts.method.as_str(), admitted.host, parts.uri.path())
        else {
            return Err(error(StatusCode::NOT_FOUND, "no route for this request"));
        };
        admitted.table = table;
        admitted.route = route;
        Ok(admitted)
    }

    /// The cache's fresh copy if it has one (`Err`, as the request is then
    /// done), else what the attempt needs to store the member's answer.
    async fn look_up(&self, admitted: &Admitted<'_>) -> Result<LookedUp<'_>, Arc<cache::Cached>> {
        let mut looked_up = LookedUp {
            key: None,
            filling: None,
            waited: None,
        };
        let Some(cache) = &self.cache else {
            return Ok(looked_up);
        };
        let parts = admitted.parts;
        if admitted.upgrade.is_some()
            || parts.method != Method::GET
            || (admitted.present.cache_terms && !cache::request_allows(&parts.headers))
        {
            return Ok(looked_up);
        }
        let key = cache::key(admitted.host, admitted.path_and_query);
        let lookup = cache.lookup(&key);
        if !matches!(lookup, cache::Lookup::Fresh(_)) {
            self.counters.cache_misses.fetch_add(1, Ordering::Relaxed);
        }
        match lookup {
            cache::Lookup::Fresh(hit) => return Err(hit),
            cache::Lookup::Missing => {}
            cache::Lookup::Stale => match self.fills.join(&key) {
                cache::Fill::Lead(guard) => looked_up.filling = Some(guard),
                cache::Fill::Follow(mut done) => {
                    let _ =
                        tokio::time::timeout(self.settings.request_timeout, done.changed()).await;
                    looked_up.waited = Some(Instant::now());
                    if let Some(hit) = cache.get(&key) {
                        return Err(hit);
                    }
                    // Not stored again (no longer cacheable, or it
                    // failed): ask a member ourselves.
                }
            },
        }
        looked_up.key = Some(key);
        Ok(looked_up)
    }

    fn answer_from_cache(&self, hit: &cache::Cached) -> Response<ProxyBody> {
        self.counters.cache_hits.fetch_add(1, Ordering::Relaxed);
        let mut response = Response::new(ProxyBody::full(hit.body.clone()));
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
        response: Response<UpstreamBody>,
        guard: InFlight,
        cache_key: Option<&str>,
        method: &Method,
        refilling: bool,
    ) -> Response<ProxyBody> {
        let (mut parts, mut body) = response.into_parts();
        let storable = match (&self.cache, cache_key) {
            (Some(cache), Some(key)) if *method == Method::GET => {
                let length = match body.lines() {
                    Some(lines) => Ok(lines.content_length()),
                    None => headers::content_length(&parts.headers),
                };
                let fits = length
                    .ok()
                    .flatten()
                    .is_some_and(|n| n <= cache.max_object());
                fits.then(|| storable_for(&mut parts, &mut body))
                    .flatten()
                    .map(|ttl| (cache, key, ttl))
            }
            _ => None,
        };
        if let Some((cache, key, ttl)) = storable {
            match body.collect().await {
                Ok(collected) => {
                    let bytes = collected.to_bytes();
                    drop(guard);
                    // Copies: what was read shares memory with the
                    // connection's buffer, which a cached object must not
                    // keep alive.
                    cache.put(
                        key.to_owned(),
                        parts.status,
                        detached(&parts.headers),
                        Bytes::copy_from_slice(&bytes),
                        ttl,
                    );
                    parts
                        .headers
                        .insert("x-cache", HeaderValue::from_static("miss"));
                    return Response::from_parts(parts, ProxyBody::full(bytes));
                }
                Err(_) => return error(StatusCode::BAD_GATEWAY, "the member's answer broke off"),
            }
        }
        if let (true, Some(cache), Some(key)) = (refilling, &self.cache, cache_key) {
            // The expired copy is not replaced: drop it, so later misses do
            // not wait on each other for an object that is not kept.
            cache.forget(key);
        }
        Response::from_parts(
            parts,
            ProxyBody::Member {
                body,
                _in_flight: guard,
            },
        )
    }
}

/// How long the cache may keep a member's answer, if at all. Header lines
/// kept as they came are read as they are when they can be, and into the
/// map when the answer is to be kept (a stored answer is served from its
/// map) or when they repeat what the cache reads.
fn storable_for(parts: &mut http::response::Parts, body: &mut UpstreamBody) -> Option<Duration> {
    let status = parts.status;
    let off_lines = body
        .lines()
        .and_then(|lines| cache::freshness_of_lines(status, lines, SystemTime::now));
    if let Some(ttl) = off_lines {
        // Kept only as a map: read into one only when it is kept.
        return ttl.filter(|_| lines_into_map(parts, body));
    }
    if !lines_into_map(parts, body) {
        return None;
    }
    cache::freshness(status, &parts.headers, SystemTime::now)
}

/// Moves a member's kept header lines into the response's map; `false`
/// (and the lines left as they are) if they cannot be read.
fn lines_into_map(parts: &mut http::response::Parts, body: &mut UpstreamBody) -> bool {
    match body.lines().map(Lines::to_map) {
        Some(Ok(map)) => {
            parts.headers = map;
            body.take_lines();
            true
        }
        Some(Err(_)) => false,
        None => true,
    }
}

/// A request admitted: its route, and how its body comes.
struct Admitted<'a> {
    parts: &'a http::request::Parts,
    table: Arc<Table>,
    route: RouteId,
    host: Option<&'a str>,
    path_and_query: &'a str,
    /// Its body's length, when the framing gives one (else it is chunked,
    /// or an HTTP/2 stream without a length).
    length: Option<u64>,
    /// Which of the headers read here it has.
    present: Present<'a>,
    /// The protocol it asks to switch to.
    upgrade: Option<&'a HeaderValue>,
}

/// What the cache said of a request that it could not answer.
struct LookedUp<'a> {
    /// Where the member's answer is stored, if it may be.
    key: Option<String>,
    /// Held by the request that fetches a missing object, until it is
    /// stored; others asking for it meanwhile wait instead of fetching.
    filling: Option<cache::FillGuard<'a>>,
    /// When it waited on another request's fetch: the member's time
    /// starts after the wait.
    waited: Option<Instant>,
}

/// A request on its way to members: at most two attempts, the second on
/// another member, and only for a request that can be sent again.
struct Attempts<'a> {
    admitted: Admitted<'a>,
    looked_up: LookedUp<'a>,
    upstream: &'a Upstream,
    client: SocketAddr,
    started: Instant,
}

/// How one attempt ended.
// Matched as soon as it is returned: boxing the response would be an
// allocation per request for nothing.
#[allow(clippy::large_enum_variant)]
enum Attempted {
    Done(Response<ProxyBody>),
    /// Failed at this member before anything was passed on: another may
    /// be asked.
    Retry(ServerId),
}

/// An attempt ready to go: its member, and its request head.
struct Prepared {
    backend: Arc<Backend>,
    head: BytesMut,
    guard: InFlight,
    /// When the member's time starts.
    sent: Instant,
}

impl Attempts<'_> {
    /// The attempts, in one future: each layer of `async fn` between the
    /// request and the socket is a future moved (copied) when made, which
    /// showed in the instruction counts.
    async fn run<B>(
        &self,
        proxy: &Proxy,
        mut body: RequestBody<B>,
        mut timer: Pin<&mut Sleep>,
    ) -> Response<ProxyBody>
    where
        B: Body<Data = Bytes> + Unpin,
        B::Error: Into<BoxError>,
    {
        let settings = &proxy.settings;
        let (parts, upgrade) = (self.admitted.parts, self.admitted.upgrade);
        let mut exclude = None;
        for attempt in 0..2 {
            let replayable = self.replayable(&body);
            let Prepared {
                backend,
                head,
                guard,
                sent,
            } = match self.prepare(&body, settings, attempt, exclude.as_ref()) {
                Ok(prepared) => prepared,
                Err(why) => return error(StatusCode::SERVICE_UNAVAILABLE, &why),
            };
            let exchange = async {
                if upgrade.is_some() {
                    return self.upstream.send_upgrade(&backend.authority, &head).await;
                }
                let sending = Sending {
                    asked: Asked {
                        head_request: parts.method == Method::HEAD,
                        upgrade: false,
                        // `crate::server` writes HTTP/1 answers and takes
                        // the lines; hyper's HTTP/2 needs the map.
                        pass_through: matches!(parts.version, Version::HTTP_10 | Version::HTTP_11),
                    },
                    replayable,
                };
                let body = std::mem::replace(&mut body, RequestBody::None);
                self.upstream
                    .send(&backend.authority, &head, body, sending)
                    .await
            };
            // The exchange is raced with the timer where it is, rather
            // than moved into a `Timeout`: each move of it was a copy of
            // all its state.
            timer
                .as_mut()
                .reset(tokio::time::Instant::from_std(sent) + settings.request_timeout);
            let answer = {
                tokio::pin!(exchange);
                std::future::poll_fn(|cx| match exchange.as_mut().poll(cx) {
                    Poll::Ready(answer) => Poll::Ready(Some(answer)),
                    Poll::Pending => timer.as_mut().poll(cx).map(|()| None),
                })
                .await
            };
            recycle_head(head);
            let Some(answer) = answer else {
                backend.failed(now_ms(), settings.eject_after, eject_for_ms(settings));
                return error(
                    StatusCode::GATEWAY_TIMEOUT,
                    "the member did not answer in time",
                );
            };
            let response = match answer {
                Ok(response) => response,
                Err(err) => match self.failed(proxy, &backend, err, attempt == 0 && replayable) {
                    Attempted::Done(response) => return response,
                    Attempted::Retry(server) => {
                        exclude = Some(server);
                        continue;
                    }
                },
            };
            // An answer is a sign of life, but a server error is not:
            // an application that fails every request behind a port that
            // still accepts is as down as one that refuses (a 503, a full
            // backlog's answer, is overload, and ejecting for it would move
            // the load onto the others).
            let status = response.status();
            if status.is_server_error() && status != StatusCode::SERVICE_UNAVAILABLE {
                backend.failed(now_ms(), settings.eject_after, eject_for_ms(settings));
            } else {
                backend.succeeded();
                if status.is_server_error() {
                    backend.errors.fetch_add(1, Ordering::Relaxed);
                }
            }
            backend.requests.fetch_add(1, Ordering::Relaxed);
            backend.latency.record(sent.elapsed());
            if response.status() == StatusCode::SWITCHING_PROTOCOLS {
                return tunnel(response, guard);
            }
            let refilling = self.looked_up.filling.is_some();
            let key = self.looked_up.key.as_deref();
            return proxy
                .respond(response, guard, key, &parts.method, refilling)
                .await;
        }
        error(StatusCode::BAD_GATEWAY, "no member could be reached")
    }

    /// Idempotent (RFC 9110 §9.2.2) and without a body: safe to send again.
    fn replayable(&self, body: &RequestBody<impl Sized>) -> bool {
        matches!(body, RequestBody::None)
            && matches!(
                self.admitted.parts.method,
                Method::GET
                    | Method::HEAD
                    | Method::OPTIONS
                    | Method::PUT
                    | Method::DELETE
                    | Method::TRACE
            )
    }

    /// Picks the member for this attempt and writes its request head; or
    /// says why no member can take it.
    fn prepare<B>(
        &self,
        body: &RequestBody<B>,
        settings: &FrontendConfig,
        attempt: u32,
        exclude: Option<&ServerId>,
    ) -> Result<Prepared, String> {
        let Admitted {
            parts,
            ref table,
            route,
            upgrade,
            ..
        } = self.admitted;
        let slow_start = u64::try_from(settings.slow_start.as_millis()).unwrap_or(u64::MAX);
        let key = self.admitted.path_and_query.as_bytes();
        let Some(backend) = table.pick(route, key, now_ms(), slow_start, exclude) else {
            let why = format!(
                "no member serves request type {:?}",
                table.request_type(route)
            );
            return Err(why);
        };
        let then = match (body, upgrade) {
            (_, Some(protocol)) => Then::Upgrade(protocol),
            (RequestBody::Chunked(_), None) => Then::Chunked,
            _ => Then::AsIs,
        };
        let forwarded = Forwarded {
            path_and_query: self.admitted.path_and_query,
            host: self.admitted.host,
            member: &backend.authority,
            client: self.client,
            generation: table.generation,
            then,
            present: self.admitted.present,
        };
        let head = request_head(parts, &forwarded);
        let guard = InFlight::start(backend.clone());
        // The first attempt goes out within microseconds of the request's
        // arrival (unless it waited): one clock read less per request.
        let sent = match (attempt, self.looked_up.waited) {
            (0, None) => self.started,
            (0, Some(at)) => at,
            _ => Instant::now(),
        };
        Ok(Prepared {
            backend,
            head,
            guard,
            sent,
        })
    }

    /// A failed exchange: whose failure it was, and whether another member
    /// may be asked.
    fn failed(
        &self,
        proxy: &Proxy,
        backend: &Backend,
        err: UpstreamError,
        may_retry: bool,
    ) -> Attempted {
        if let UpstreamError::RequestBody(cause) = &err {
            // The client's body, not the member: not held against it, and
            // not sent again (it is spent).
            tracing::debug!(%cause, "the request body failed");
            return Attempted::Done(if cause.is::<LengthLimitError>() {
                error(StatusCode::PAYLOAD_TOO_LARGE, "request body too large")
            } else {
                error(StatusCode::BAD_REQUEST, "the request body broke off")
            });
        }
        // A member that cannot be connected to, resets or breaks the
        // protocol counts towards ejection (and as an error).
        let settings = &proxy.settings;
        backend.failed(now_ms(), settings.eject_after, eject_for_ms(settings));
        tracing::debug!(server = %backend.server, %err, "member failed a request");
        if may_retry {
            proxy.counters.retries.fetch_add(1, Ordering::Relaxed);
            return Attempted::Retry(backend.server.clone());
        }
        Attempted::Done(error(
            StatusCode::BAD_GATEWAY,
            "the member could not be reached",
        ))
    }
}

/// A member's `101`: the client's connection is to be joined to its.
fn tunnel(response: Response<UpstreamBody>, guard: InFlight) -> Response<ProxyBody> {
    let (parts, body) = response.into_parts();
    let Some((member, early)) = body.into_tunnel() else {
        return error(StatusCode::BAD_GATEWAY, "the member's switch broke off");
    };
    let tunnel = Tunnel {
        member,
        early,
        _open: TunnelOpen::start(guard.0.clone()),
        in_flight: guard,
    };
    Response::from_parts(parts, ProxyBody::Tunnel(tunnel))
}

fn eject_for_ms(settings: &FrontendConfig) -> u64 {
    u64::try_from(settings.eject_for.as_millis()).unwrap_or(u64::MAX)
}

/// Counts a request in flight at a member until dropped.
pub struct InFlight(Arc<Backend>);

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

/// Counts an open tunnel at a member until dropped: a drain that ends on
/// its deadline names what it cut.
pub struct TunnelOpen(Arc<Backend>);

impl TunnelOpen {
    fn start(backend: Arc<Backend>) -> Self {
        backend.tunnels.fetch_add(1, Ordering::Relaxed);
        Self(backend)
    }
}

impl Drop for TunnelOpen {
    fn drop(&mut self) {
        self.0.tunnels.fetch_sub(1, Ordering::Relaxed);
    }
}

/// What the proxy answers with: its own bytes (errors, cache hits) or a
/// member's body, streamed, holding the member's in-flight count until done;
/// or, with a `101`, no body but the member's connection.
pub enum ProxyBody {
    Full(Option<Bytes>),
    Member {
        body: UpstreamBody,
        _in_flight: InFlight,
    },
    Tunnel(Tunnel),
}

/// A member's connection after it switched protocols for a client
/// (WebSocket): the client's connection is joined to it. It counts as a
/// request in flight at the member for as long as it is open, so the
/// balancing sees long-lived tunnels and a drain waits for them.
pub struct Tunnel {
    pub member: TcpStream,
    /// What the member sent after its `101`, for the client.
    pub early: BytesMut,
    pub in_flight: InFlight,
    pub _open: TunnelOpen,
}

impl ProxyBody {
    fn full(bytes: Bytes) -> Self {
        Self::Full(Some(bytes))
    }

    /// A member's header lines, kept as they came for an HTTP/1 client
    /// (the response's header map is empty then).
    pub fn take_lines(&mut self) -> Option<Lines> {
        match self {
            Self::Member { body, .. } => body.take_lines(),
            Self::Full(_) | Self::Tunnel(_) => None,
        }
    }
}

impl Body for ProxyBody {
    type Data = Bytes;
    type Error = UpstreamError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, UpstreamError>>> {
        match self.get_mut() {
            Self::Full(bytes) => Poll::Ready(bytes.take().map(|b| Ok(Frame::data(b)))),
            Self::Member { body, .. } => Pin::new(body).poll_frame(cx),
            Self::Tunnel(_) => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Self::Full(bytes) => bytes.is_none(),
            Self::Member { body, .. } => body.is_end_stream(),
            Self::Tunnel(_) => true,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Self::Full(bytes) => SizeHint::with_exact(bytes.as_ref().map_or(0, |b| b.len() as u64)),
            Self::Member { body, .. } => body.size_hint(),
            Self::Tunnel(_) => SizeHint::with_exact(0),
        }
    }
}

/// A short, clear error answer.
pub fn error(status: StatusCode, message: &str) -> Response<ProxyBody> {
    let mut response = Response::new(ProxyBody::full(Bytes::from(format!("{message}\n"))));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

/// A 503 that says when to come back.
fn unavailable(retry_after_s: u64, message: &str) -> Response<ProxyBody> {
    let mut response = error(StatusCode::SERVICE_UNAVAILABLE, message);
    response
        .headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from(retry_after_s));
    response
}

/// Headers that share no memory with anything else (see `respond`).
fn detached(headers: &HeaderMap) -> HeaderMap {
    let mut copy = HeaderMap::with_capacity(headers.len());
    for (name, value) in headers {
        if let Ok(value) = HeaderValue::from_bytes(value.as_bytes()) {
            copy.append(name.clone(), value);
        }
    }
    copy
}
