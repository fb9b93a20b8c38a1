//! What the front-end exposes on `/metrics`: requests by status, cache
//! hits and misses, latency, the routing table's generation and each
//! member as this front-end sees it.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use headroom_shared::ops::{Exposition, Ops};
use headroom_shared::time::now_ms;

use crate::Proxy;

/// Registers the proxy's collectors, and a readiness that holds while it
/// has a routing table (from KV or from the last-known-good file).
pub fn register(proxy: &Arc<Proxy>, ops: &Ops) {
    let collected = proxy.clone();
    ops.register(move |out| expose(&collected, out));
    let probed = proxy.clone();
    ops.set_probe(move || match probed.table.load().as_ref() {
        Some(_) => Ok(()),
        None => Err("no routing table yet".to_owned()),
    });
    // Nothing else to wait for: the probe says the rest.
    ops.set_ready();
}

fn expose(proxy: &Proxy, out: &mut Exposition) {
    requests(proxy, out);
    for (name, help, value) in counts(proxy) {
        match value {
            Value::Counter(n) => out.counter(name, help, &[], n),
            Value::Gauge(v) => out.gauge(name, help, &[], v),
        }
    }
    held(proxy, out);
    out.histogram(
        "headroom_frontend_request_seconds",
        "Time from a request's head to its response's head.",
        &[],
        &proxy.counters.duration,
    );
    routing(proxy, out);
}

/// Requests by status, and the cache's hits and misses.
fn requests(proxy: &Proxy, out: &mut Exposition) {
    let c = &proxy.counters;
    const REQUESTS: &str = "headroom_frontend_requests_total";
    const REQUESTS_HELP: &str = "Requests answered, by status code (cache hits included).";
    let mut any = false;
    for (i, count) in c.by_status.0.iter().enumerate() {
        let n = count.load(Ordering::Relaxed);
        if n > 0 {
            any = true;
            let code = (i + 100).to_string();
            out.counter(REQUESTS, REQUESTS_HELP, &[("code", &code)], n);
        }
    }
    if !any {
        out.counter(REQUESTS, REQUESTS_HELP, &[("code", "200")], 0);
    }
    const CACHE: &str = "headroom_frontend_cache_total";
    const CACHE_HELP: &str = "Requests looked up in the cache (GETs that allow it), by result.";
    for (result, count) in [("hit", &c.cache_hits), ("miss", &c.cache_misses)] {
        let n = count.load(Ordering::Relaxed);
        out.counter(CACHE, CACHE_HELP, &[("result", result)], n);
    }
}

/// Requests held for want of a member: waiting now, and how each ended.
fn held(proxy: &Proxy, out: &mut Exposition) {
    let h = &proxy.hold;
    out.gauge(
        "headroom_frontend_held",
        "Requests waiting for the cluster's first member.",
        &[],
        h.len() as f64,
    );
    const HELD: &str = "headroom_frontend_held_total";
    const HELD_HELP: &str = "Requests held for want of a member, by outcome (held: every one; released: sent on to a member; full and timed_out: answered 503 with Retry-After).";
    for (outcome, count) in [
        ("held", &h.held),
        ("released", &h.released),
        ("full", &h.refused_full),
        ("timed_out", &h.timed_out),
    ] {
        out.counter(
            HELD,
            HELD_HELP,
            &[("outcome", outcome)],
            count.load(Ordering::Relaxed),
        );
    }
}

enum Value {
    Counter(u64),
    Gauge(f64),
}

/// The front-end's single counts, each with its name and help.
fn counts(proxy: &Proxy) -> [(&'static str, &'static str, Value); 8] {
    let c = &proxy.counters;
    let count = |a: &std::sync::atomic::AtomicU64| Value::Counter(a.load(Ordering::Relaxed));
    let now = |a: &std::sync::atomic::AtomicU64| Value::Gauge(a.load(Ordering::Relaxed) as f64);
    let cached = proxy.cache.as_ref().map_or(0, |cache| cache.weight());
    [
        (
            "headroom_frontend_cache_bytes",
            "Bytes of responses held in the cache.",
            Value::Gauge(cached as f64),
        ),
        (
            "headroom_frontend_retries_total",
            "Requests retried on another member after a connection failure.",
            count(&c.retries),
        ),
        (
            "headroom_frontend_resyncs_total",
            "Times the routing was reloaded from the KV snapshot (missed changes).",
            count(&c.resyncs),
        ),
        (
            "headroom_frontend_in_flight",
            "Requests being answered now.",
            now(&c.in_flight),
        ),
        (
            "headroom_frontend_connections_total",
            "Client connections accepted.",
            count(&c.connections),
        ),
        (
            "headroom_frontend_connections_open",
            "Client connections open now (up to frontend.max_connections).",
            now(&c.connections_open),
        ),
        (
            "headroom_frontend_tunnels_total",
            "Protocol switches (WebSocket) joined to a member.",
            count(&c.tunnels),
        ),
        (
            "headroom_frontend_tunnels_open",
            "Protocol switches (WebSocket) open now.",
            now(&c.tunnels_open),
        ),
    ]
}

/// The routing table in use, and each member as this front-end sees it.
fn routing(proxy: &Proxy, out: &mut Exposition) {
    let table = proxy.table.load_full();
    out.gauge(
        "headroom_membership_generation",
        "Generation of the routing table in use (the cluster record's).",
        &[],
        table.as_ref().map_or(0.0, |t| t.generation as f64),
    );
    let from_file = proxy.from_file.load(Ordering::Acquire);
    out.gauge(
        "headroom_frontend_routing_from_file",
        "1 while routing comes from the last-known-good file, not NATS.",
        &[],
        if from_file { 1.0 } else { 0.0 },
    );
    let now = now_ms();
    let backends = table.as_ref().map(|t| t.backends.as_slice()).unwrap_or(&[]);
    for backend in backends {
        let server = [("server", backend.server.as_str())];
        out.gauge(
            "headroom_frontend_member_in_flight",
            "Requests in flight to each member.",
            &server,
            f64::from(backend.in_flight.load(Ordering::Relaxed)),
        );
    }
    for backend in backends {
        let server = [("server", backend.server.as_str())];
        out.gauge(
            "headroom_frontend_member_ejected",
            "1 while a member is ejected by passive health checks.",
            &server,
            if backend.is_ejected(now) { 1.0 } else { 0.0 },
        );
    }
}
