//! The routing table: which request type a request is (the cluster's
//! routes), which members serve it, and which one gets this request.
//!
//! A table is immutable; a membership change builds a new one and swaps it
//! in (the request path only loads a pointer). What must outlive a swap,
//! the per-member counters and health, lives in [`Backend`], shared between
//! consecutive tables.

use std::collections::HashMap;
use std::hash::Hasher;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;

use headroom_shared::hash::Fnv1a;
use headroom_shared::records::{Balance, ClusterRecord, MemberState, Route};
use headroom_shared::{ClusterId, ServerId};
use rand::Rng;

use crate::stats::Latency;

/// The bounded-load factor of consistent hashing: a member takes a key
/// only while under this times the average in-flight count.
const LOAD_BOUND: f64 = 1.25;
/// The least share a member in slow start gets (Envoy's floor).
const SLOW_START_FLOOR: f64 = 0.1;

/// One member as the proxy talks to it, and what it has seen of it.
#[derive(Debug)]
pub struct Backend {
    pub server: ServerId,
    /// `host:port`.
    pub authority: String,
    pub in_flight: AtomicU32,
    /// Of those in flight, open WebSocket tunnels.
    pub tunnels: AtomicU32,
    pub requests: AtomicU64,
    pub errors: AtomicU64,
    pub latency: Latency,
    consecutive_failures: AtomicU32,
    /// Unix ms until which it is ejected.
    ejected_until_ms: AtomicU64,
    /// Ejections in a row, for the back-off.
    ejections: AtomicU32,
}

impl Backend {
    pub fn new(server: ServerId, authority: String) -> Self {
        Self {
            server,
            authority,
            in_flight: AtomicU32::new(0),
            tunnels: AtomicU32::new(0),
            requests: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            latency: Latency::default(),
            consecutive_failures: AtomicU32::new(0),
            ejected_until_ms: AtomicU64::new(0),
            ejections: AtomicU32::new(0),
        }
    }

    /// Whether it is ejected at `now_ms`. An ejection simply runs out
    /// (the next request is the probe); its failure count is kept, so one
    /// more failure ejects it again, for twice as long.
    pub fn is_ejected(&self, now_ms: u64) -> bool {
        now_ms < self.ejected_until_ms.load(Ordering::Acquire)
    }

    /// It has been ejected and has not answered since (between two
    /// ejections, too, while the next request probes it).
    pub fn failing(&self) -> bool {
        self.ejections.load(Ordering::Acquire) != 0
    }

    /// A request reached it and got an answer.
    pub fn succeeded(&self) {
        // Read before writing: every worker thread calls this on every
        // answer, and a write would move the cache line between cores
        // each time when there is nothing to reset.
        if self.consecutive_failures.load(Ordering::Acquire) != 0 {
            self.consecutive_failures.store(0, Ordering::Release);
        }
        if self.ejections.load(Ordering::Acquire) != 0
            && self.ejections.swap(0, Ordering::AcqRel) != 0
        {
            self.ejected_until_ms.store(0, Ordering::Release);
            tracing::info!(server = %self.server, "member answers again; back in rotation");
        }
    }

    /// It could not be reached (or did not answer in time). From
    /// `eject_after` failures in a row it is ejected for `eject_for_ms`,
    /// doubling with each ejection in a row (up to 16x).
    pub fn failed(&self, now_ms: u64, eject_after: u32, eject_for_ms: u64) {
        self.errors.fetch_add(1, Ordering::Relaxed);
        let failures = self.consecutive_failures.fetch_add(1, Ordering::AcqRel) + 1;
        if failures >= eject_after {
            let n = self.ejections.fetch_add(1, Ordering::AcqRel).min(4);
            let until = now_ms + eject_for_ms * (1 << n);
            self.ejected_until_ms.store(until, Ordering::Release);
            tracing::warn!(server = %self.server, failures, until_ms = until, "member ejected");
        }
    }
}

/// A member in one table.
#[derive(Debug, Clone)]
struct Entry {
    backend: Arc<Backend>,
    weight: f64,
    since_ms: u64,
}

/// A compiled route: a rule and the members that serve its type.
#[derive(Debug)]
struct CompiledRoute {
    route: Route,
    members: Vec<Entry>,
}

/// One routing table, for one membership generation.
#[derive(Debug)]
pub struct Table {
    pub cluster: ClusterId,
    pub generation: u64,
    routes: Vec<CompiledRoute>,
    /// Members for requests no route names, when the cluster has no
    /// routes at all.
    everyone: Vec<Entry>,
    pub backends: Vec<Arc<Backend>>,
    /// Members being drained: sent nothing new, but what is still open
    /// with them is counted and reported, so that the drain ends on
    /// evidence.
    pub draining: Vec<Arc<Backend>>,
}

/// Which route a request took, as an index into the table.
#[derive(Debug, Clone, Copy)]
pub struct RouteId(Option<usize>);

impl Table {
    /// Builds the table for `record`, reusing the backends of `previous`
    /// (so counters and ejections survive the swap).
    pub fn build(record: &ClusterRecord, previous: &HashMap<ServerId, Arc<Backend>>) -> Self {
        let reuse = |server: &ServerId, authority: String| match previous.get(server) {
            Some(b) if b.authority == authority => b.clone(),
            _ => Arc::new(Backend::new(server.clone(), authority)),
        };
        let draining = record
            .members
            .iter()
            .filter(|m| m.state == MemberState::Draining)
            .map(|m| reuse(&m.server, format!("{}:{}", m.address, m.port)))
            .collect();
        let mut backends = Vec::new();
        let entries: Vec<(Entry, &[String])> = record
            .members
            .iter()
            // Draining and joining members get no new requests.
            .filter(|m| m.state == MemberState::Active)
            .map(|m| {
                let backend = reuse(&m.server, format!("{}:{}", m.address, m.port));
                backends.push(backend.clone());
                (
                    Entry {
                        backend,
                        weight: if m.weight.is_finite() {
                            m.weight.max(0.0)
                        } else {
                            0.0
                        },
                        since_ms: m.since_ms,
                    },
                    m.request_types.as_slice(),
                )
            })
            .collect();
        let routes = record
            .policy
            .routes
            .iter()
            .map(|route| CompiledRoute {
                route: route.clone(),
                members: entries
                    .iter()
                    .filter(|(_, types)| types.is_empty() || types.contains(&route.request_type))
                    .map(|(e, _)| e.clone())
                    .collect(),
            })
            .collect();
        Self {
            cluster: record.id.clone(),
            generation: record.generation,
            routes,
            everyone: entries.into_iter().map(|(e, _)| e).collect(),
            backends,
            draining,
        }
    }

    /// The backends by server, draining ones too, to build the next table
    /// from.
    pub fn backends_by_server(&self) -> HashMap<ServerId, Arc<Backend>> {
        self.backends
            .iter()
            .chain(&self.draining)
            .map(|b| (b.server.clone(), b.clone()))
            .collect()
    }

    /// The first route whose rules match; with no routes at all, every
    /// request is one type. `None`: no route takes it.
    pub fn route(&self, method: &str, host: Option<&str>, path: &str) -> Option<RouteId> {
        if self.routes.is_empty() {
            return Some(RouteId(None));
        }
        self.routes
            .iter()
            .position(|r| matches(&r.route, method, host, path))
            .map(|i| RouteId(Some(i)))
    }

    pub fn request_type(&self, id: RouteId) -> &str {
        id.0.map_or("", |i| self.routes[i].route.request_type.as_str())
    }

    /// Chooses a member for a request on route `id`, never `exclude`.
    pub fn pick(
        &self,
        id: RouteId,
        key: &[u8],
        now_ms: u64,
        slow_start_ms: u64,
        exclude: Option<&ServerId>,
    ) -> Option<Arc<Backend>> {
        let (members, balance) = match id.0 {
            Some(i) => (&self.routes[i].members, self.routes[i].route.balance),
            None => (&self.everyone, Balance::LeastRequests),
        };
        let weight = |e: &Entry| {
            let age = now_ms.saturating_sub(e.since_ms);
            let ramp = if slow_start_ms == 0 || e.since_ms == 0 || age >= slow_start_ms {
                1.0
            } else {
                (age as f64 / slow_start_ms as f64).max(SLOW_START_FLOOR)
            };
            e.weight * ramp
        };
        let eligible = || {
            members
                .iter()
                .filter(|e| exclude != Some(&e.backend.server))
                .map(|e| (e, weight(e)))
                .filter(|(_, w)| *w > 0.0)
        };
        let chosen = match balance {
            Balance::LeastRequests => least_requests(eligible, now_ms),
            Balance::Hash => bounded_hash(&eligible().collect::<Vec<_>>(), key, now_ms),
        };
        chosen.map(|e| e.backend.clone())
    }
}

fn matches(route: &Route, method: &str, host: Option<&str>, path: &str) -> bool {
    route
        .path_prefix
        .as_deref()
        .is_none_or(|p| path.starts_with(p))
        && route.host.as_deref().is_none_or(|h| {
            host.is_some_and(|got| {
                got.split(':')
                    .next()
                    .is_some_and(|g| g.eq_ignore_ascii_case(h))
            })
        })
        && (route.methods.is_empty()
            || route.methods.iter().any(|m| m.eq_ignore_ascii_case(method)))
}

/// Weighted least outstanding requests: each member's weight is divided
/// by its requests in flight plus one, and the member is drawn at random by
/// that. Idle members share traffic exactly by weight; busy ones get less
/// (Envoy's least-request with unequal weights, bias 1).
///
/// `eligible` is walked twice (the sum, then the draw) rather than
/// collected: a pick allocates nothing, on every request.
fn least_requests<'a, I>(eligible: impl Fn() -> I, now_ms: u64) -> Option<&'a Entry>
where
    I: Iterator<Item = (&'a Entry, f64)>,
{
    let live = || {
        eligible()
            .filter(|(e, _)| !e.backend.is_ejected(now_ms))
            .map(|(e, w)| {
                (
                    e,
                    w / f64::from(e.backend.in_flight.load(Ordering::Relaxed) + 1),
                )
            })
    };
    let total: f64 = live().map(|(_, w)| w).sum();
    if total <= 0.0 {
        // Every member ejected: better a likely failure than a sure one.
        return eligible().next().map(|(e, _)| e);
    }
    let mut x = rand::rng().random_range(0.0..total);
    // Counts in flight may have moved since the sum: past the end, the
    // last one takes it.
    let mut last = None;
    for (e, w) in live() {
        if x < w {
            return Some(e);
        }
        x -= w;
        last = Some(e);
    }
    last
}

/// Weighted rendezvous hashing with bounded load: members ranked by
/// weight / -ln(hash(key, member)); the first under 1.25x the average
/// in-flight count takes it.
fn bounded_hash<'a>(eligible: &[(&'a Entry, f64)], key: &[u8], now_ms: u64) -> Option<&'a Entry> {
    let live: Vec<(&Entry, f64)> = eligible
        .iter()
        .filter(|(e, _)| !e.backend.is_ejected(now_ms))
        .copied()
        .collect();
    if live.is_empty() {
        return least_requests(|| eligible.iter().copied(), now_ms);
    }
    let mut ranked: Vec<(f64, &Entry)> = live
        .iter()
        .map(|(e, w)| {
            let h = fnv1a(key, e.backend.server.as_str().as_bytes());
            // A uniform draw in (0, 1) from the hash.
            let u = ((h >> 11) as f64 + 0.5) / (1u64 << 53) as f64;
            (w / -u.ln(), *e)
        })
        .collect();
    ranked.sort_by(|a, b| b.0.total_cmp(&a.0));
    let in_flight: u32 = live
        .iter()
        .map(|(e, _)| e.backend.in_flight.load(Ordering::Relaxed))
        .sum();
    let cap = ((f64::from(in_flight) + 1.0) * LOAD_BOUND / live.len() as f64).ceil();
    ranked
        .iter()
        .find(|(_, e)| f64::from(e.backend.in_flight.load(Ordering::Relaxed)) < cap)
        .or(ranked.first())
        .map(|(_, e)| *e)
}

/// FNV-1a of `a`, a separator and `b`.
fn fnv1a(a: &[u8], b: &[u8]) -> u64 {
    let mut hasher = Fnv1a::default();
    hasher.write(a);
    hasher.write(&[0xff]);
    hasher.write(b);
    let mut hash = hasher.finish();
    // FNV's low bits mix poorly; finish with a multiply-xorshift.
    hash ^= hash >> 33;
    hash = hash.wrapping_mul(0xff51_afd7_ed55_8ccd);
    hash ^ (hash >> 33)
}

#[cfg(test)]
mod tests {
    use super::*;
    use headroom_shared::records::{ClusterPolicy, Member};
    use headroom_shared::RequestId;

    fn record(members: &[(&str, &[&str], MemberState, f64)], routes: Vec<Route>) -> ClusterRecord {
        let mut r = ClusterRecord::new(
            ClusterId::new("web").expect("id"),
            ClusterPolicy {
                routes,
                ..ClusterPolicy::default()
            },
            0,
        );
        for (i, (s, types, state, weight)) in members.iter().enumerate() {
            r.members.push(Member {
                server: ServerId::new(*s).expect("id"),
                address: "10.0.0.1".into(),
                port: 8000 + i as u16,
                request_types: types.iter().map(|t| (*t).to_owned()).collect(),
                state: *state,
                weight: *weight,
                request: RequestId::new("r").expect("id"),
                drain_request: None,
                since_ms: 0,
                joined: 0,
            });
        }
        r
    }

    fn route(t: &str, prefix: &str, balance: Balance) -> Route {
        Route {
            request_type: t.into(),
            path_prefix: Some(prefix.into()),
            host: None,
            methods: vec![],
            balance,
        }
    }

    #[test]
    fn types_go_to_their_members_and_draining_ones_get_nothing() {
        let table = Table::build(
            &record(
                &[
                    ("s1", &["static"], MemberState::Active, 1.0),
                    ("s2", &["api"], MemberState::Active, 1.0),
                    ("s3", &["api"], MemberState::Draining, 1.0),
                ],
                vec![
                    route("static", "/static", Balance::Hash),
                    route("api", "/api", Balance::LeastRequests),
                ],
            ),
            &HashMap::new(),
        );
        let api = table.route("GET", None, "/api/x").expect("api");
        assert_eq!(table.request_type(api), "api");
        for _ in 0..100 {
            let b = table.pick(api, b"/api/x", 0, 0, None).expect("member");
            assert_eq!(b.server.as_str(), "s2");
        }
        let st = table.route("GET", None, "/static/a.css").expect("static");
        assert_eq!(
            table.pick(st, b"k", 0, 0, None).expect("m").server.as_str(),
            "s1"
        );
        assert!(table.route("GET", None, "/other").is_none());
        assert!(table
            .pick(api, b"", 0, 0, Some(&ServerId::new("s2").expect("id")))
            .is_none());
    }

    #[test]
    fn weights_share_traffic_and_hashing_keeps_keys_in_place() {
        let members = [
            ("s1", &[][..], MemberState::Active, 1.0),
            ("s2", &[][..], MemberState::Active, 0.25),
        ];
        let table = Table::build(&record(&members, vec![]), &HashMap::new());
        let id = table.route("GET", None, "/").expect("route");
        let mut s2 = 0;
        for _ in 0..10_000 {
            if table.pick(id, b"", 0, 0, None).expect("m").server.as_str() == "s2" {
                s2 += 1;
            }
        }
        // Idle members share by weight: 0.25 / 1.25 = 20 %.
        assert!((1_700..2_300).contains(&s2), "s2 took {s2} of 10000");

        let three = [
            ("s1", &[][..], MemberState::Active, 1.0),
            ("s2", &[][..], MemberState::Active, 1.0),
            ("s3", &[][..], MemberState::Active, 1.0),
        ];
        let routes = vec![route("all", "/", Balance::Hash)];
        let before = Table::build(&record(&three, routes.clone()), &HashMap::new());
        let after = Table::build(&record(&three[..2], routes), &HashMap::new());
        let id = before.route("GET", None, "/").expect("route");
        let mut moved = 0;
        for k in 0..3_000 {
            let key = format!("/k{k}");
            let a = before.pick(id, key.as_bytes(), 0, 0, None).expect("m");
            let b = after.pick(id, key.as_bytes(), 0, 0, None).expect("m");
            if a.server != b.server {
                assert_eq!(
                    a.server.as_str(),
                    "s3",
                    "only the leaving member's keys move"
                );
                moved += 1;
            }
        }
        assert!((700..1300).contains(&moved), "about a third moved: {moved}");
    }

    #[test]
    fn a_new_member_ramps_up() {
        let mut r = record(
            &[
                ("old", &[][..], MemberState::Active, 1.0),
                ("new", &[][..], MemberState::Active, 1.0),
            ],
            vec![],
        );
        r.members[0].since_ms = 1;
        r.members[1].since_ms = 100_000;
        let table = Table::build(&r, &HashMap::new());
        let id = table.route("GET", None, "/").expect("route");
        let share = |now_ms: u64| {
            (0..10_000)
                .filter(|_| {
                    table
                        .pick(id, b"", now_ms, 10_000, None)
                        .expect("m")
                        .server
                        .as_str()
                        == "new"
                })
                .count()
        };
        // At the start: the 10 % floor, 0.1 / 1.1 of the traffic.
        assert!((700..1_200).contains(&share(100_000)), "{}", share(100_000));
        // Half-way: 0.5 / 1.5.
        assert!(
            (3_000..3_700).contains(&share(105_000)),
            "{}",
            share(105_000)
        );
        // Done: an equal share.
        assert!(
            (4_600..5_400).contains(&share(110_000)),
            "{}",
            share(110_000)
        );
    }

    #[test]
    fn a_failing_member_is_ejected_and_comes_back() {
        let b = Backend::new(ServerId::new("s1").expect("id"), "x:1".into());
        b.failed(1_000, 2, 100);
        assert!(!b.is_ejected(1_000));
        b.failed(1_000, 2, 100);
        assert!(b.is_ejected(1_050));
        assert!(!b.is_ejected(1_100), "the ejection runs out");
        b.failed(1_100, 2, 100);
        assert!(
            b.is_ejected(1_250),
            "one more failure: ejected for twice as long"
        );
        assert!(!b.is_ejected(1_300));
        b.succeeded();
        b.failed(1_300, 2, 100);
        assert!(!b.is_ejected(1_300), "an answer resets the count");
    }
}
