//! The monitor against a real nats-server: reports are published over NATS,
//! the cluster record lives in JetStream KV, decisions come back as audit
//! events and requests in the reconfig stream. Time is the monitor's
//! manual clock, so ten minutes of policy time run in seconds; the test
//! plays the allocator's part by applying each decision to the KV record,
//! which closes the loop (load spreads over the new members).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use async_nats::jetstream;
use futures::StreamExt;
use headroom_monitor::{fetch_stats, Clock, ClockDriver, Shards};
use headroom_shared::codec::{self, Codec};
use headroom_shared::kv::CLUSTERS_BUCKET;
use headroom_shared::ops::Ops;
use headroom_shared::records::{ClusterPolicy, ClusterRecord, Member, MemberState, ShardLease};
use headroom_shared::subjects;
use headroom_shared::time::now_ms;
use headroom_shared::wire::{AuditEvent, PerformanceReport, ReconfigAction, ReportSource};
use headroom_shared::RequestId;
use headroom_tests::{eventually, metric, NatsServer};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::Value;
use std::time::Duration;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::common::{cid, sid, WAIT};

const SECOND: u64 = 1_000;
const START_MS: u64 = 1_000_000;

/// A decision as the audit log tells it.
#[derive(Debug, Clone)]
pub struct Seen {
    pub at_ms: u64,
    pub action: ReconfigAction,
    pub evidence: Value,
}

impl Seen {
    fn direction(&self) -> Option<i8> {
        match self.action {
            ReconfigAction::Allocate { .. } => Some(1),
            ReconfigAction::Release { .. } => Some(-1),
            _ => None,
        }
    }
}

/// One monitor on a manual clock, one cluster, and a load model.
pub struct Sim {
    /// Kept alive for the test; dropping it kills the server.
    _nats: NatsServer,
    pub client: async_nats::Client,
    pub js: jetstream::Context,
    pub clock: ClockDriver,
    monitor: JoinHandle<Result<(), headroom_monitor::MonitorError>>,
    shutdown: CancellationToken,
    /// The monitor's health and metrics.
    pub ops: Arc<Ops>,
    decided: async_nats::Subscriber,
    pub record: ClusterRecord,
    bucket: jetstream::kv::Store,
    pub now: u64,
    sent: u64,
    next_server: u32,
    pub seen: Vec<Seen>,
    /// Play the allocator: apply decisions to the cluster record.
    pub apply: bool,
    pub silent: Vec<String>,
    /// A front-end keeps reporting the silent servers (in flight 0), as it
    /// does a dead server it can no longer reach.
    pub frontend_sees_silent: bool,
}

impl Sim {
    pub async fn start(policy: ClusterPolicy, members: u32) -> Self {
        Self::start_with(policy, members, false).await
    }

    pub async fn start_with(mut policy: ClusterPolicy, members: u32, dry_run: bool) -> Self {
        // The simulation plays an allocator whose changes every front-end
        // follows at once: a change is confirmed when it is written.
        policy.scaling.confirm_wait_ms = 0;
        headroom_shared::telemetry::init_for_tests();
        let nats = NatsServer::start().await.expect("nats-server");
        let client = nats.client().await.expect("connect");
        let js = jetstream::new(client.clone());
        let bucket =
            headroom_shared::kv::open_bucket(&js, headroom_shared::kv::Bucket::Clusters, 1)
                .await
                .expect("clusters bucket");
        let decided = client
            .subscribe("headroom.events.*.decided")
            .await
            .expect("subscribe to decisions");
        let mut record = ClusterRecord::new(cid("web"), policy, START_MS);
        let mut next_server = 0;
        for _ in 0..members {
            next_server += 1;
            record.members.push(member(next_server, 0));
        }
        let mut config = nats.config();
        config.monitor.instance = "monitor-1".to_owned();
        config.monitor.dry_run = dry_run;
        let (clock, driver) = Clock::manual(START_MS);
        let ops = Ops::new("headroom-monitor");
        let shutdown = CancellationToken::new();
        let monitor_client = nats.client().await.expect("monitor connects");
        let monitor = tokio::spawn(headroom_monitor::run_with_clock(
            config,
            monitor_client,
            ops.clone(),
            shutdown.clone(),
            clock,
        ));
        let mut sim = Self {
            _nats: nats,
            client,
            js,
            clock: driver,
            monitor,
            shutdown,
            ops,
            decided,
            record,
            bucket,
            now: START_MS,
            sent: 0,
            next_server,
            seen: Vec::new(),
            apply: true,
            silent: Vec::new(),
            frontend_sees_silent: false,
        };
        sim.publish_record().await;
        sim
    }

    pub fn members(&self) -> Vec<String> {
        self.record
            .members
            .iter()
            .filter(|m| m.state == MemberState::Active)
            .map(|m| m.server.to_string())
            .collect()
    }

    async fn publish_record(&mut self) {
        self.record.generation += 1;
        let body = Codec::MsgPack.encode(&self.record).expect("encode");
        self.bucket.put("web", body).await.expect("put cluster");
        let want = self.record.members.len() as u64;
        let seen = eventually(WAIT, || async {
            let stats = fetch_stats(&self.client).await.ok()?;
            (stats.tracked_servers == want && stats.clusters == 1).then_some(())
        })
        .await;
        assert!(seen.is_some(), "the monitor never saw the cluster record");
    }

    /// Publishes one agent report per active member, with `cpu(server)`,
    /// and waits until the monitor has taken them.
    pub async fn report(&mut self, mut cpu: impl FnMut(&str) -> f64) {
        self.clock.set(self.now);
        for server in self.members() {
            if self.silent.contains(&server) {
                if self.frontend_sees_silent {
                    let seen = PerformanceReport {
                        in_flight: Some(0),
                        ..PerformanceReport::new(
                            sid(&server),
                            Some(cid("web")),
                            ReportSource::Frontend {
                                frontend: "fe-1".to_owned(),
                            },
                            self.now,
                            1_000,
                        )
                    };
                    self.publish(&subjects::metrics(Some(&cid("web")), &sid(&server)), &seen)
                        .await;
                }
                continue;
            }
            // Later servers have less work in flight, so "least in
            // flight" and "first by id" pick different members.
            let n: u32 = server.trim_start_matches('s').parse().unwrap_or(0);
            let report = PerformanceReport {
                cpu: Some(cpu(&server).clamp(0.0, 1.0)),
                in_flight: Some(100u32.saturating_sub(n)),
                ..report(&server, self.now)
            };
            self.publish(
                &subjects::metrics(Some(&cid("web")), &sid(&server)),
                &report,
            )
            .await;
        }
        self.client.flush().await.expect("flush");
        self.wait_taken().await;
    }

    pub async fn publish(&mut self, subject: &str, report: &PerformanceReport) {
        let body = Codec::MsgPack.encode(report).expect("encode");
        self.publish_raw(subject, Codec::MsgPack, body.to_vec())
            .await;
    }

    pub async fn publish_raw(&mut self, subject: &str, codec: Codec, body: Vec<u8>) {
        self.client
            .publish_with_headers(subject.to_owned(), codec.headers(), body.into())
            .await
            .expect("publish");
        self.sent += 1;
    }

    /// Waits until every published message was taken or rejected.
    pub async fn wait_taken(&self) {
        self.client.flush().await.expect("flush");
        let sent = self.sent;
        let done = eventually(WAIT, || async {
            let s = fetch_stats(&self.client).await.ok()?;
            (s.reports + s.pool_reports + s.skipped + s.rejected >= sent).then_some(())
        })
        .await;
        assert!(done.is_some(), "the monitor did not take {sent} messages");
    }

    /// Evaluates at the current time, collects the decisions, applies them
    /// (when playing the allocator), and moves time one second on.
    pub async fn step(&mut self) -> Vec<Seen> {
        assert!(self.clock.evaluate(self.now).await, "monitor is running");
        let stats = eventually(WAIT, || async {
            let s = fetch_stats(&self.client).await.ok()?;
            (s.requests_sent + s.send_failures >= s.decisions
                || s.decisions == self.seen.len() as u64)
                .then_some(s)
        })
        .await
        .expect("stats");
        let mut new = Vec::new();
        while (self.seen.len() + new.len()) < stats.decisions as usize {
            let message = tokio::time::timeout(WAIT, self.decided.next())
                .await
                .expect("decision event in time")
                .expect("subscription open");
            let event: AuditEvent =
                codec::decode(message.headers.as_ref(), &message.payload).expect("audit event");
            let line: Value = serde_json::from_str(&event.detail).expect("decision JSON");
            let action: ReconfigAction =
                serde_json::from_value(line["action"].clone()).expect("action");
            new.push(Seen {
                at_ms: line["at_ms"].as_u64().expect("at_ms"),
                action,
                evidence: line["evidence"].clone(),
            });
        }
        if self.apply && !new.is_empty() {
            for seen in &new {
                self.apply(&seen.action);
            }
            self.publish_record().await;
        }
        self.seen.extend(new.iter().cloned());
        self.now += SECOND;
        new
    }

    fn apply(&mut self, action: &ReconfigAction) {
        match action {
            ReconfigAction::Allocate { count, .. } => {
                for _ in 0..*count {
                    self.next_server += 1;
                    self.record.members.push(member(self.next_server, self.now));
                }
            }
            ReconfigAction::Release { server } | ReconfigAction::Replace { server } => {
                self.record.members.retain(|m| &m.server != server);
                if matches!(action, ReconfigAction::Replace { .. }) {
                    self.next_server += 1;
                    self.record.members.push(member(self.next_server, self.now));
                }
            }
            ReconfigAction::Reweight { server, weight } => {
                for m in &mut self.record.members {
                    if &m.server == server {
                        m.weight = *weight;
                    }
                }
            }
        }
    }

    /// Runs `seconds` of simulated time with a total load (in servers'
    /// worth) spread evenly, each member's share times (1 ± noise).
    pub async fn run_load(
        &mut self,
        seconds: u64,
        rng: &mut StdRng,
        noise: f64,
        mut total: impl FnMut(u64) -> f64,
    ) {
        for _ in 0..seconds {
            let n = self.members().len().max(1) as f64;
            let load = total(self.now);
            let mut shares: BTreeMap<String, f64> = BTreeMap::new();
            for server in self.members() {
                let jitter = if noise > 0.0 {
                    rng.random_range(-noise..=noise)
                } else {
                    0.0
                };
                shares.insert(server, load / n * (1.0 + jitter));
            }
            self.report(|s| shares.get(s).copied().unwrap_or(0.0)).await;
            self.step().await;
        }
    }

    /// The decisions of one action (`allocate`, `release`, ...) so far.
    pub fn decided(&self, action: &str) -> Vec<&Seen> {
        self.seen
            .iter()
            .filter(|s| s.action.name() == action)
            .collect()
    }

    pub fn allocations(&self) -> Vec<&Seen> {
        self.decided("allocate")
    }

    /// Requests the monitor put in the reconfig stream.
    pub async fn requests(&self) -> u64 {
        match self.js.get_stream(subjects::RECONFIG_STREAM).await {
            Ok(mut stream) => stream.info().await.expect("stream info").state.messages,
            Err(_) => 0,
        }
    }

    pub async fn stop(self) {
        self.shutdown.cancel();
        tokio::time::timeout(WAIT, self.monitor)
            .await
            .expect("monitor stops in time")
            .expect("monitor joined")
            .expect("monitor ended cleanly");
    }
}

fn member(n: u32, since_ms: u64) -> Member {
    Member {
        server: sid(&format!("s{n}")),
        address: "10.0.0.1".to_owned(),
        port: 8080,
        request_types: Vec::new(),
        state: MemberState::Active,
        weight: 1.0,
        request: RequestId::new(format!("r{n}")).expect("id"),
        drain_request: None,
        since_ms,
        joined: 0,
    }
}

pub fn report(server: &str, at_ms: u64) -> PerformanceReport {
    PerformanceReport {
        memory: Some(0.4),
        load1: Some(0.5),
        ..PerformanceReport::new(
            sid(server),
            Some(cid("web")),
            ReportSource::Agent,
            at_ms,
            1_000,
        )
    }
}

fn scaling_policy(min: u32, max: u32) -> ClusterPolicy {
    ClusterPolicy {
        min_size: min,
        max_size: max,
        ..ClusterPolicy::default()
    }
}

#[tokio::test]
async fn rising_load_scales_up_once_after_the_sustain_window() {
    let mut sim = Sim::start(scaling_policy(2, 10), 4).await;
    let mut rng = StdRng::seed_from_u64(1);
    // 4 servers at 0.5, then the load rises to 0.9 each (3.6 servers).
    sim.run_load(10, &mut rng, 0.0, |_| 2.0).await;
    let rise = sim.now;
    sim.run_load(30, &mut rng, 0.0, |_| 3.6).await;
    let ups = sim.allocations();
    assert_eq!(ups.len(), 1, "exactly one scale-up: {:?}", sim.seen);
    let sustain = ClusterPolicy::default().scaling.sustain_ms;
    assert!(
        ups[0].at_ms >= rise + sustain,
        "not before the sustain window: rise {rise}, decided {}",
        ups[0].at_ms
    );
    assert!(
        ups[0].at_ms <= rise + sustain + 2 * SECOND,
        "within the sustain window and an evaluation: rise {rise}, decided {}",
        ups[0].at_ms
    );
    // 3.6 servers of load at target 0.6 wants 6: two more.
    assert_eq!(
        ups[0].action,
        ReconfigAction::Allocate {
            count: 2,
            request_type: None
        }
    );
    assert_eq!(ups[0].evidence["desired"], 6);
    assert_eq!(sim.requests().await, 1, "one request reached the stream");
    let metrics = sim.ops.render();
    assert!(
        metrics.contains("headroom_monitor_decisions_total{action=\"allocate\"} 1\n"),
        "{metrics}"
    );
    assert!(metrics.contains("headroom_monitor_requests_sent_total 1\n"));
    assert_eq!(sim.ops.readiness(), Ok(()));
    sim.stop().await;
}

#[tokio::test]
async fn a_sharp_spike_asks_for_several_servers_sized_by_load() {
    let mut sim = Sim::start(scaling_policy(2, 20), 2).await;
    let mut rng = StdRng::seed_from_u64(2);
    sim.run_load(5, &mut rng, 0.0, |_| 0.8).await;
    // Both members saturated: 2.0 servers of load wants ceil(2 / 0.6) = 4.
    sim.run_load(5, &mut rng, 0.0, |_| 2.0).await;
    let ups = sim.allocations();
    assert_eq!(ups.len(), 1, "{:?}", sim.seen);
    assert_eq!(
        ups[0].action,
        ReconfigAction::Allocate {
            count: 2,
            request_type: None
        }
    );
    sim.stop().await;
}

#[tokio::test]
async fn noise_around_the_upper_level_does_not_flap_but_a_real_step_scales_up() {
    let mut sim = Sim::start(scaling_policy(2, 20), 4).await;
    let mut rng = StdRng::seed_from_u64(3);
    // 4 servers at 0.75 each (the upper level), ±20 % noise, 10 minutes.
    sim.run_load(600, &mut rng, 0.2, |_| 3.0).await;
    let directions: Vec<i8> = sim.seen.iter().filter_map(Seen::direction).collect();
    eprintln!(
        "decisions in 10 minutes of noise: {:?}",
        sim.seen
            .iter()
            .map(|s| (s.at_ms - START_MS, s.action.clone()))
            .collect::<Vec<_>>()
    );
    let changes = directions.windows(2).filter(|w| w[0] != w[1]).count();
    assert!(
        changes <= 1,
        "at most one change of direction in 10 minutes: {directions:?}"
    );
    let before_ups = sim.allocations().len();
    // A real step: every member 30 % over the upper level.
    let step_at = sim.now;
    let stepped = sim.members().len() as f64 * 0.75 * 1.3;
    sim.run_load(15, &mut rng, 0.2, |_| stepped).await;
    let after: Vec<&Seen> = sim.allocations().split_off(before_ups);
    assert!(!after.is_empty(), "the step scaled up: {:?}", sim.seen);
    let sustain = ClusterPolicy::default().scaling.sustain_ms;
    assert!(
        after[0].at_ms <= step_at + sustain + 2 * SECOND,
        "scaled up within the sustain window: step {step_at}, decided {}",
        after[0].at_ms
    );
    sim.stop().await;
}

#[tokio::test]
async fn falling_load_releases_the_idle_member_down_to_min_and_no_further() {
    let mut sim = Sim::start(scaling_policy(2, 10), 4).await;
    let mut rng = StdRng::seed_from_u64(4);
    sim.run_load(5, &mut rng, 0.0, |_| 2.0).await;
    sim.run_load(240, &mut rng, 0.0, |_| 0.8).await;
    let releases = sim.decided("release");
    assert_eq!(releases.len(), 2, "4 → 2 (min): {:?}", sim.seen);
    assert!(sim.allocations().is_empty());
    // The member with the least work in flight (the highest number) first.
    assert_eq!(
        releases[0].action,
        ReconfigAction::Release { server: sid("s4") }
    );
    for r in &releases {
        let projected = r.evidence["projected"].as_f64().expect("projected");
        assert!(projected < 0.6, "the rest stay under target: {r:?}");
    }
    assert_eq!(sim.members().len(), 2, "never below min");
    sim.stop().await;
}

#[tokio::test]
async fn an_idle_member_whose_load_the_rest_cannot_absorb_stays() {
    let mut sim = Sim::start(scaling_policy(1, 10), 2).await;
    for _ in 0..120 {
        // s1 idle, s2 carrying 0.58: without s1, s2 would be at 0.68.
        sim.report(|s| if s == "s1" { 0.10 } else { 0.58 }).await;
        sim.step().await;
    }
    assert!(sim.seen.is_empty(), "no release: {:?}", sim.seen);
    sim.stop().await;
}

#[tokio::test]
async fn one_hot_member_is_reweighted_not_scaled_and_restored_when_it_cools() {
    let mut sim = Sim::start(scaling_policy(2, 10), 4).await;
    let weight = |sim: &Sim, server: &str| {
        sim.record
            .members
            .iter()
            .find(|m| m.server.as_str() == server)
            .map_or(1.0, |m| m.weight)
    };
    // s1's load follows its weight; the others are comfortable.
    for _ in 0..20 {
        let w1 = weight(&sim, "s1");
        sim.report(|s| if s == "s1" { 0.95 * w1 } else { 0.35 })
            .await;
        sim.step().await;
    }
    let reweights = sim.decided("reweight");
    assert!(
        !reweights.is_empty(),
        "hot member reweighted: {:?}",
        sim.seen
    );
    let ReconfigAction::Reweight { server, weight: w } = &reweights[0].action else {
        unreachable!()
    };
    assert_eq!(server.as_str(), "s1");
    assert!(*w < 1.0 && *w >= 0.1, "sent less: {w}");
    assert_eq!(
        reweights.len(),
        1,
        "once under upper at its new weight, left alone: {:?}",
        sim.seen
    );
    assert!(
        sim.allocations().is_empty(),
        "no allocation: {:?}",
        sim.seen
    );
    // It cools down.
    for _ in 0..10 {
        sim.report(|s| if s == "s1" { 0.15 } else { 0.35 }).await;
        sim.step().await;
    }
    let last = sim
        .seen
        .iter()
        .rev()
        .find(|s| matches!(s.action, ReconfigAction::Reweight { .. }))
        .expect("a reweight");
    assert_eq!(
        last.action,
        ReconfigAction::Reweight {
            server: sid("s1"),
            weight: 1.0
        },
        "restored once cool"
    );
    assert!(sim.allocations().is_empty());
    sim.stop().await;
}

#[tokio::test]
async fn a_member_carrying_more_while_a_new_one_ramps_up_is_not_reweighted() {
    let mut sim = Sim::start(scaling_policy(1, 10), 1).await;
    // 1.2 servers' worth on one: saturated, so one more is asked for.
    let load = 1.2;
    for _ in 0..10 {
        sim.report(|_| 1.0).await;
        if !sim.step().await.is_empty() {
            break;
        }
    }
    assert_eq!(sim.members().len(), 2, "scaled up: {:?}", sim.seen);
    // The front-ends ramp the new member's share from 10 % to all of it
    // over their slow start (10 s): meanwhile the first carries more, over
    // the upper level and well above the new one for seconds, while the
    // cluster is under the level.
    let slow_start = 10 * SECOND;
    for _ in 0..30 {
        let shares: Vec<(String, f64)> = sim
            .record
            .members
            .iter()
            .map(|m| {
                let ramp = if m.since_ms == 0 {
                    1.0
                } else {
                    let t = sim.now.saturating_sub(m.since_ms) as f64 / slow_start as f64;
                    0.1 + 0.9 * t.min(1.0)
                };
                (m.server.as_str().to_owned(), m.weight * ramp)
            })
            .collect();
        let total: f64 = shares.iter().map(|(_, w)| w).sum();
        sim.report(|s| {
            shares
                .iter()
                .find(|(server, _)| server == s)
                .map_or(0.0, |(_, w)| (load * w / total).min(1.0))
        })
        .await;
        sim.step().await;
    }
    assert!(
        sim.decided("reweight").is_empty(),
        "the ramp is not a hot spot: {:?}",
        sim.seen
    );
    sim.stop().await;
}

#[tokio::test]
async fn a_member_just_over_the_level_in_a_busy_cluster_is_not_reweighted() {
    // The cluster sits just under the upper level (0.75) and one member
    // reads a notch above it, as small in-flight counts do: noise, not a
    // hot spot, so no reweight (and no scale-up: the cluster is under).
    let mut sim = Sim::start(scaling_policy(2, 10), 4).await;
    for _ in 0..20 {
        sim.report(|s| if s == "s1" { 0.80 } else { 0.65 }).await;
        sim.step().await;
    }
    assert!(sim.decided("reweight").is_empty(), "{:?}", sim.seen);
    sim.stop().await;
}

#[tokio::test]
async fn a_silent_member_is_replaced_not_released() {
    let mut sim = Sim::start(scaling_policy(2, 10), 4).await;
    let mut rng = StdRng::seed_from_u64(5);
    // Quiet enough that a release would be on the table for an idle one.
    sim.run_load(5, &mut rng, 0.0, |_| 0.4).await;
    sim.silent.push("s2".to_owned());
    // The front-end still reports it: silence is the server's own.
    sim.frontend_sees_silent = true;
    let silenced = sim.now;
    sim.run_load(20, &mut rng, 0.0, |_| 0.4).await;
    let about_s2: Vec<&Seen> = sim
        .seen
        .iter()
        .filter(|s| {
            matches!(&s.action, ReconfigAction::Replace { server } | ReconfigAction::Release { server } if server.as_str() == "s2")
        })
        .collect();
    assert_eq!(about_s2.len(), 1, "{:?}", sim.seen);
    assert_eq!(
        about_s2[0].action,
        ReconfigAction::Replace { server: sid("s2") }
    );
    let silent_after = ClusterPolicy::default().scaling.silent_after_ms;
    assert!(about_s2[0].at_ms >= silenced + silent_after - SECOND);

    // Every member silent at once looks like a metrics outage: nothing is
    // replaced, and nothing is released on missing data.
    let before = sim.seen.len();
    sim.silent = sim.members();
    sim.run_load(40, &mut rng, 0.0, |_| 0.4).await;
    assert_eq!(sim.seen.len(), before, "{:?}", &sim.seen[before..]);
    sim.stop().await;
}

#[tokio::test]
async fn malformed_and_absurd_reports_are_rejected_counted_and_change_nothing() {
    let mut sim = Sim::start(scaling_policy(2, 10), 2).await;
    let web = |server: &str| subjects::metrics(Some(&cid("web")), &sid(server));
    let mut junk = 0u64;
    for _ in 0..10 {
        sim.report(|_| 0.5).await;
        let now = sim.now;
        // Not decodable.
        sim.publish_raw(&web("s1"), Codec::MsgPack, b"\xc1\xff".to_vec())
            .await;
        sim.publish_raw(&web("s1"), Codec::Json, b"{\"v\":1,".to_vec())
            .await;
        // NaN, negative, CPU over 100 %: all claim a hot s1.
        for bad in [
            PerformanceReport {
                cpu: Some(f64::NAN),
                ..report("s1", now)
            },
            PerformanceReport {
                cpu: Some(0.99),
                latency_p99_ms: Some(-5.0),
                ..report("s1", now)
            },
            PerformanceReport {
                cpu: Some(1.7),
                ..report("s1", now)
            },
        ] {
            sim.publish(&web("s1"), &bad).await;
        }
        // An unknown server, and a report on another cluster's subject.
        sim.publish(
            &web("s99"),
            &PerformanceReport {
                cpu: Some(0.99),
                ..report("s99", now)
            },
        )
        .await;
        sim.publish(
            &subjects::metrics(Some(&cid("api")), &sid("s1")),
            &PerformanceReport {
                cpu: Some(0.99),
                ..report("s1", now)
            },
        )
        .await;
        let mut other = PerformanceReport {
            cpu: Some(0.99),
            ..report("x1", now)
        };
        other.cluster = Some(cid("api"));
        sim.publish(&subjects::metrics(Some(&cid("api")), &sid("x1")), &other)
            .await;
        junk += 8;
        sim.wait_taken().await;
        sim.step().await;
    }
    let stats = fetch_stats(&sim.client).await.expect("stats");
    assert_eq!(stats.rejected, junk, "{stats:?}");
    assert_eq!(stats.malformed, 20);
    assert_eq!(stats.invalid, 30);
    assert_eq!(stats.not_a_member, 10);
    assert_eq!(stats.subject_mismatch, 10);
    assert_eq!(stats.unknown_cluster, 10);
    assert_eq!(stats.reports, 20, "the good ones were all taken");
    assert!(sim.seen.is_empty(), "decisions unaffected: {:?}", sim.seen);
    let metrics = sim.ops.render();
    for line in [
        "headroom_monitor_reports_rejected_total{reason=\"malformed\"} 20\n",
        "headroom_monitor_reports_rejected_total{reason=\"invalid\"} 30\n",
        "headroom_monitor_reports_total{kind=\"member\"} 20\n",
    ] {
        assert!(metrics.contains(line), "{line} in {metrics}");
    }
    sim.stop().await;
}

#[tokio::test]
async fn a_recorded_stream_replays_to_byte_identical_decision_logs() {
    let sim = Sim::start_with(scaling_policy(2, 10), 3, true).await;
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("recording.jsonl");
    let stop = CancellationToken::new();
    let recorder = {
        let client = sim.client.clone();
        let file = std::fs::File::create(&path).expect("create recording");
        let stop = stop.clone();
        tokio::spawn(async move {
            headroom_monitor::replay::record(&client, 1, std::io::BufWriter::new(file), stop).await
        })
    };
    // The recorder sees the cluster record before any report.
    tokio::time::sleep(Duration::from_millis(200)).await;
    // Four seconds of live reports every 100 ms; load rises half-way, and
    // some reports are junk.
    let mut rng = StdRng::seed_from_u64(6);
    for round in 0..40u32 {
        let load: f64 = if round < 20 { 0.5 } else { 0.95 };
        for server in sim.members() {
            let cpu = load * (1.0 + rng.random_range(-0.05..=0.05));
            let body = PerformanceReport {
                cpu: Some(cpu.min(1.0)),
                interval_ms: 100,
                ..report(&server, now_ms())
            };
            let subject = subjects::metrics(Some(&cid("web")), &sid(&server));
            sim.client
                .publish(
                    subject.clone(),
                    Codec::MsgPack.encode(&body).expect("encode"),
                )
                .await
                .expect("publish");
            if round % 10 == 0 {
                sim.client
                    .publish(subject, b"not a report".as_slice().into())
                    .await
                    .expect("publish");
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    sim.client.flush().await.expect("flush");
    tokio::time::sleep(Duration::from_millis(200)).await;
    stop.cancel();
    let written = recorder.await.expect("recorder joined").expect("recorded");
    assert!(written >= 120, "recorded {written} inputs");

    let tight = ClusterPolicy {
        scaling: headroom_shared::records::ScalingPolicy {
            sustain_ms: 300,
            release_sustain_ms: 1_000,
            cooldown_up_ms: 1_000,
            cooldown_down_ms: 1_000,
            ..Default::default()
        },
        ..scaling_policy(2, 10)
    };
    let replay = |policy: &ClusterPolicy| {
        let file = std::fs::File::open(&path).expect("open recording");
        let mut log = Vec::new();
        let summary = headroom_monitor::replay::replay(
            std::io::BufReader::new(file),
            Some(policy),
            100,
            &mut log,
        )
        .expect("replay");
        (log, summary)
    };
    let (first, summary) = replay(&tight);
    let (second, _) = replay(&tight);
    assert!(!first.is_empty(), "the rise was decided on: {summary:?}");
    assert_eq!(first, second, "byte-identical decision logs");
    assert_eq!(summary.counters.malformed, 12, "{summary:?}");
    let text = String::from_utf8(first.clone()).expect("utf-8");
    assert!(text.contains("\"allocate\""), "{text}");
    // A different policy gives a different log: that is what replay is for.
    let lax = ClusterPolicy {
        scaling: headroom_shared::records::ScalingPolicy {
            upper: 0.99,
            target: 0.9,
            lower: 0.1,
            ..tight.scaling.clone()
        },
        ..tight.clone()
    };
    let (other, _) = replay(&lax);
    assert_ne!(first, other);
    sim.stop().await;
}

#[tokio::test]
async fn with_the_allocator_the_cluster_grows_and_shrinks_for_real() {
    let stack = crate::common::Stack::start().await;
    let servers: Vec<String> = (1..=6).map(|n| format!("p{n}")).collect();
    for s in &servers {
        crate::common::register(&stack.client, s, &[]).await;
    }
    let mut policy = crate::common::policy(2, 6);
    policy.scaling = headroom_shared::records::ScalingPolicy {
        sustain_ms: 300,
        release_sustain_ms: 1_000,
        cooldown_up_ms: 1_000,
        cooldown_down_ms: 1_000,
        silent_after_ms: 5_000,
        ..Default::default()
    };
    crate::common::put_cluster(&stack.client, "web", policy)
        .await
        .expect("cluster");
    let mut config = stack.nats.config();
    config.monitor.instance = "monitor-1".to_owned();
    config.monitor.evaluate_interval = Duration::from_millis(100);
    let shutdown = CancellationToken::new();
    let monitor = tokio::spawn(headroom_monitor::run(
        config,
        stack.nats.client().await.expect("connect"),
        Ops::new("headroom-monitor"),
        shutdown.clone(),
    ));

    // The load generator: every 100 ms, each active member reports its
    // share of the total load.
    let total = Arc::new(AtomicU64::new(0.8f64.to_bits()));
    let load = {
        let (client, js, total) = (stack.client.clone(), stack.js.clone(), total.clone());
        tokio::spawn(async move {
            let bucket = js.get_key_value(CLUSTERS_BUCKET).await.expect("bucket");
            loop {
                let Ok(Some(entry)) = bucket.get("web").await else {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                };
                let record: ClusterRecord = Codec::MsgPack.decode(&entry).expect("record");
                let active: Vec<_> = record
                    .members
                    .iter()
                    .filter(|m| m.state == MemberState::Active)
                    .collect();
                let load = f64::from_bits(total.load(Ordering::SeqCst));
                for m in &active {
                    let body = PerformanceReport {
                        cpu: Some((load / active.len() as f64).min(1.0)),
                        interval_ms: 100,
                        in_flight: Some(1),
                        ..report(m.server.as_str(), now_ms())
                    };
                    let _ = client
                        .publish(
                            subjects::metrics(Some(&cid("web")), &m.server),
                            Codec::MsgPack.encode(&body).expect("encode"),
                        )
                        .await;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    };
    let active = |snapshot: &crate::common::Snapshot| snapshot.active_members("web").len();

    // Load for 3 servers at target 0.6 wants 5.
    total.store(3.0f64.to_bits(), Ordering::SeqCst);
    eventually(Duration::from_secs(30), || async {
        let snapshot = crate::common::Snapshot::read(&stack.js).await;
        (active(&snapshot) >= 5).then_some(snapshot)
    })
    .await
    .expect("the cluster grew to 5");
    // Invariants hold between changes (mid-allocation a claimed server
    // may not be listed yet).
    crate::common::wait_settled(&stack.js)
        .await
        .check_invariants(&servers.iter().map(|s| sid(s)).collect::<Vec<_>>())
        .expect("invariants");

    // The load falls away: back to the minimum, never below.
    total.store(0.3f64.to_bits(), Ordering::SeqCst);
    let free = |snapshot: &crate::common::Snapshot| {
        snapshot
            .servers
            .values()
            .filter(|(s, _)| s.state == headroom_shared::records::ServerState::Free)
            .count()
    };
    let shrunk = eventually(Duration::from_secs(60), || async {
        let snapshot = crate::common::Snapshot::read(&stack.js).await;
        (snapshot.cluster("web").members.len() == 2 && free(&snapshot) == 4).then_some(snapshot)
    })
    .await
    .expect("the cluster shrank to its minimum, the rest back in the pool");
    assert_eq!(active(&shrunk), 2, "never below the minimum");
    shrunk
        .check_invariants(&servers.iter().map(|s| sid(s)).collect::<Vec<_>>())
        .expect("invariants");

    load.abort();
    shutdown.cancel();
    tokio::time::timeout(WAIT, monitor)
        .await
        .expect("monitor stops")
        .expect("joined")
        .expect("monitor ended cleanly");
}

#[tokio::test]
async fn sharded_monitors_are_each_sent_only_their_own_clusters_reports() {
    headroom_shared::telemetry::init_for_tests();
    let nats = NatsServer::start().await.expect("nats-server");
    let client = nats.client().await.expect("connect");
    let js = jetstream::new(client.clone());
    let bucket = headroom_shared::kv::open_bucket(&js, headroom_shared::kv::Bucket::Clusters, 1)
        .await
        .expect("clusters bucket");
    let clusters: Vec<String> = (0..8).map(|c| format!("c{c}")).collect();
    for (c, name) in clusters.iter().enumerate() {
        let mut record = ClusterRecord::new(cid(name), scaling_policy(1, 4), START_MS);
        let first = u32::try_from(2 * c).expect("small") + 1;
        record.members = vec![member(first, 0), member(first + 1, 0)];
        let body = Codec::MsgPack.encode(&record).expect("encode");
        bucket.put(name.as_str(), body).await.expect("put cluster");
    }
    let shutdown = CancellationToken::new();
    let mut instances = Vec::new();
    for index in 0..2 {
        let mut config = nats.config();
        config.monitor.instance = format!("monitor-{index}");
        config.monitor.shards = 2;
        config.monitor.lease_ttl = Duration::from_millis(800);
        let ops = Ops::new("headroom-monitor");
        tokio::spawn(headroom_monitor::run(
            config,
            nats.client().await.expect("connect"),
            ops.clone(),
            shutdown.clone(),
        ));
        instances.push(ops);
    }
    // The two share the two shards by lease: one each, once both are live.
    let shared = eventually(WAIT, || async {
        instances
            .iter()
            .all(|ops| metric(ops, "headroom_monitor_shards_held", "") == 1)
            .then_some(())
    })
    .await;
    assert!(shared.is_some(), "each instance holds one shard");
    let monitors = headroom_shared::kv::open_bucket(&js, headroom_shared::kv::Bucket::Monitors, 1)
        .await
        .expect("monitors bucket");
    let mut shards = Vec::new();
    for (index, ops) in instances.into_iter().enumerate() {
        let mut held = None;
        for n in 0..2u32 {
            let entry = monitors
                .get(format!("shard.{n}"))
                .await
                .expect("read lease")
                .expect("lease");
            let lease: ShardLease = Codec::MsgPack.decode(&entry).expect("lease");
            if lease
                .holder
                .is_some_and(|h| h.starts_with(&format!("monitor-{index}-")))
            {
                held = Some(n);
            }
        }
        let shard = Shards {
            count: 2,
            held: [held.expect("a shard of its own")].into(),
        };
        let owned: Vec<&String> = clusters.iter().filter(|c| shard.owns(c)).collect();
        shards.push((ops, owned, shard.owns_pool()));
    }
    assert!(
        shards.iter().all(|(_, owned, _)| !owned.is_empty()),
        "both shards own clusters"
    );
    // Each holds a subscription per owned cluster, and shard 0's the pool's.
    for (index, (ops, owned, pool)) in shards.iter().enumerate() {
        let want = owned.len() as u64 + u64::from(*pool);
        let subscribed = eventually(WAIT, || async {
            (metric(ops, "headroom_monitor_subscriptions", "") == want).then_some(())
        })
        .await;
        assert!(
            subscribed.is_some(),
            "instance {index} subscribes to its {want}"
        );
    }
    for (c, name) in clusters.iter().enumerate() {
        for n in [2 * c + 1, 2 * c + 2] {
            let server = format!("s{n}");
            let report = PerformanceReport {
                cluster: Some(cid(name)),
                ..report(&server, START_MS)
            };
            let subject = subjects::metrics(Some(&cid(name)), &sid(&server));
            let body = Codec::MsgPack.encode(&report).expect("encode");
            client
                .publish_with_headers(subject, Codec::MsgPack.headers(), body)
                .await
                .expect("publish");
        }
    }
    let free = PerformanceReport {
        cluster: None,
        ..report("free-1", START_MS)
    };
    let body = Codec::MsgPack.encode(&free).expect("encode");
    client
        .publish_with_headers(
            subjects::metrics(None, &sid("free-1")),
            Codec::MsgPack.headers(),
            body,
        )
        .await
        .expect("publish");
    client.flush().await.expect("flush");
    let all_taken = eventually(WAIT, || async {
        let taken: u64 = shards
            .iter()
            .map(|(ops, _, _)| metric(ops, "headroom_monitor_reports_total", "{kind=\"member\""))
            .sum();
        (taken == 16).then_some(())
    })
    .await;
    assert!(all_taken.is_some(), "every member report was taken once");
    for (index, (ops, owned, pool)) in shards.iter().enumerate() {
        let kind = |k: &str| {
            metric(
                ops,
                "headroom_monitor_reports_total",
                &format!("{{kind=\"{k}\""),
            )
        };
        assert_eq!(
            kind("member"),
            2 * owned.len() as u64,
            "shard {index}: its own clusters' reports"
        );
        assert_eq!(
            kind("skipped"),
            0,
            "shard {index} was sent no other shard's report"
        );
        assert_eq!(
            kind("pool"),
            u64::from(*pool),
            "instance {index}: the pool's report if it holds shard 0"
        );
    }
    // A cluster that goes away takes its subscription with it.
    let (ops, owned, pool) = &shards[1];
    bucket.delete(owned[0].as_str()).await.expect("delete");
    let want = owned.len() as u64 - 1 + u64::from(*pool);
    let dropped = eventually(WAIT, || async {
        (metric(ops, "headroom_monitor_subscriptions", "") == want).then_some(())
    })
    .await;
    assert!(
        dropped.is_some(),
        "the deleted cluster's subscription ended"
    );
    shutdown.cancel();
}
