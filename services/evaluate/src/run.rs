//! One run: a fresh nats-server and every service, the cluster sized by
//! one [`Strategy`], the trace played open loop through the front-end,
//! and the per-second timeline it leaves.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use headroom_demo::System;
use headroom_loadgen::{Profile, Summary, Target};
use headroom_local_nats::NatsServer;
use headroom_shared::bus;
use headroom_shared::codec;
use headroom_shared::records::{ClusterRecord, MemberState};
use headroom_shared::wire::{
    PerformanceReport, PutCluster, ReconfigAction, ReconfigRequest, ReportSource,
};
use headroom_shared::{subjects, ServerId, SCHEMA_VERSION};
use tokio::sync::{watch, Mutex};
use tokio_util::sync::CancellationToken;

use crate::hpa::{Hpa, HpaParams, Observation};
use crate::outcome::{self, Outcome, Second, Timeline};
use crate::record::{self, Record};
use crate::{Settings, Strategy};

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("{0}")]
    Nats(#[from] headroom_local_nats::LocalNatsError),
    #[error("{0}")]
    Demo(#[from] headroom_demo::DemoError),
    #[error("{0}")]
    Record(#[from] record::RecordError),
    #[error("the cluster did not reach {0} members within 60 s")]
    NotSized(u32),
    #[error("putting the policy back: {0}")]
    Policy(String),
}

/// What one strategy did on the trace.
#[derive(Debug)]
pub struct RunResult {
    pub strategy: Strategy,
    pub timeline: Timeline,
    pub outcome: Outcome,
    pub load: Summary,
    /// For the static strategies, the size they held.
    pub static_size: Option<u32>,
    /// (seconds into the load, utilisation) of every member's agent
    /// report, as the monitor would measure it.
    pub utilisation: Vec<(f64, f64)>,
}

/// Plays `settings` once with `strategy` on a nats-server of its own.
///
/// # Errors
/// A part cannot start, or a static cluster does not reach its size.
pub async fn evaluate(settings: &Settings, strategy: Strategy) -> Result<RunResult, RunError> {
    let nats = NatsServer::start().await?;
    let (peak, mean) = settings.static_sizes();
    let static_size = match strategy {
        Strategy::StaticPeak => Some(peak),
        Strategy::StaticMean => Some(mean),
        Strategy::Headroom | Strategy::Hpa => None,
    };
    let demo = demo_settings(settings, strategy, static_size);
    let mut quiet = std::io::sink();
    let system = System::start(&demo, &nats, &mut quiet).await?;
    let played = play(settings, strategy, &system, static_size).await;
    system.stop().await;
    let Played {
        record,
        load,
        shift,
        first_served_s,
        utilisation,
    } = played?;
    let timeline = timeline(settings, &record, &load, shift, &first_served_s);
    let outcome = outcome::outcome(&settings.model(), &timeline);
    Ok(RunResult {
        strategy,
        timeline,
        outcome,
        load,
        static_size,
        utilisation: utilisation
            .into_iter()
            .map(|(t, u)| (t - shift, u))
            .collect(),
    })
}

fn demo_settings(
    settings: &Settings,
    strategy: Strategy,
    static_size: Option<u32>,
) -> headroom_demo::Settings {
    let mut policy = settings.policy.clone();
    policy.max_size = u32::try_from(settings.backends).unwrap_or(u32::MAX);
    // Every run starts at the initial size (a static one stays there); a
    // scaled one gets its own minimum back once it is there.
    let start = static_size.unwrap_or_else(|| settings.initial_size());
    policy.min_size = start.max(policy.min_size);
    if let Some(size) = static_size {
        policy.max_size = size;
    }
    let mut demo = headroom_demo::Settings::standard(std::env::temp_dir().join("unused.svg"));
    demo.backends = settings.backends;
    demo.backend = settings.backend.clone();
    demo.monitor = strategy == Strategy::Headroom;
    demo.interval = settings.interval;
    demo.policy = policy;
    demo.listen = "127.0.0.1:0".to_owned();
    demo.profile = profile(settings);
    demo
}

fn profile(settings: &Settings) -> Profile {
    Profile {
        rates: settings.rates(),
        step: Duration::from_secs_f64(1.0 / settings.speedup),
    }
}

/// What a run left to judge it by.
struct Played {
    record: Record,
    load: Summary,
    /// The load's start, in the record's seconds.
    shift: f64,
    /// When each new member joined and first served, seconds into the load.
    first_served_s: Vec<(f64, f64)>,
    /// Every member's reported utilisation, in the record's seconds.
    utilisation: Vec<(f64, f64)>,
}

/// The latest agent report of each server, and every utilisation seen.
#[derive(Default)]
struct Reports {
    latest: HashMap<ServerId, (Instant, PerformanceReport)>,
    seen: Vec<(f64, f64)>,
}

/// Sizes the cluster, plays the trace, and returns what was recorded.
async fn play(
    settings: &Settings,
    strategy: Strategy,
    system: &System,
    static_size: Option<u32>,
) -> Result<Played, RunError> {
    let stop = CancellationToken::new();
    let _stop_on_return = stop.clone().drop_guard();
    let origin = Instant::now();
    let (latest, mut seen) = watch::channel(None::<ClusterRecord>);
    let recorder = tokio::spawn(record::follow(
        system.js.clone(),
        system.cluster.clone(),
        origin,
        latest,
        stop.clone(),
    ));
    let size = static_size.unwrap_or_else(|| settings.initial_size());
    let sized = tokio::time::timeout(Duration::from_secs(60), async {
        seen.wait_for(|r| r.as_ref().is_some_and(|r| active(r) >= size))
            .await
            .is_ok()
    })
    .await;
    if sized != Ok(true) {
        return Err(RunError::NotSized(size));
    }
    if static_size.is_none() {
        restore_minimum(settings, system).await?;
    }
    let reports = follow_reports(settings, system, origin, stop.clone()).await;
    if strategy == Strategy::Hpa {
        tokio::spawn(drive_hpa(
            settings.clone(),
            system.js.clone(),
            system.cluster.clone(),
            seen,
            reports.clone(),
            stop.clone(),
        ));
    }
    let shift = origin.elapsed().as_secs_f64();
    let start_ms = headroom_shared::time::now_ms();
    let target = Target {
        base: format!("http://{}", system.address),
        paths: vec!["/api/item".to_owned()],
        timeout: Duration::from_secs(10),
        max_in_flight: 8192,
    };
    let load = headroom_loadgen::run(&profile(settings), &target, None).await;
    stop.cancel();
    let record = match recorder.await {
        Ok(record) => record?,
        Err(_) => Record::default(),
    };
    let first_served_s = first_served(system, &record, start_ms);
    let utilisation = std::mem::take(&mut reports.lock().await.seen);
    Ok(Played {
        record,
        load,
        shift,
        first_served_s,
        utilisation,
    })
}

/// Puts the cluster's policy back with its own minimum, so that the
/// controller may shrink it from the initial size.
async fn restore_minimum(settings: &Settings, system: &System) -> Result<(), RunError> {
    let mut policy = settings.policy.clone();
    policy.max_size = u32::try_from(settings.backends).unwrap_or(u32::MAX);
    let request = PutCluster {
        v: SCHEMA_VERSION,
        id: system.cluster.clone(),
        policy,
    };
    bus::admin::<_, ClusterRecord>(&system.client, subjects::admin::CLUSTER_PUT, &request)
        .await
        .map(|_| ())
        .map_err(|e| RunError::Policy(e.to_string()))
}

fn active(record: &ClusterRecord) -> u32 {
    let n = record
        .members
        .iter()
        .filter(|m| m.state == MemberState::Active)
        .count();
    u32::try_from(n).unwrap_or(u32::MAX)
}

/// When each member that joined during the load joined and served its
/// first request, in seconds from the load's start.
fn first_served(system: &System, record: &Record, start_ms: u64) -> Vec<(f64, f64)> {
    let backends: HashMap<&str, &headroom_backend::Backend> = system
        .backends
        .iter()
        .map(|b| (b.name.as_str(), b))
        .collect();
    record
        .joins
        .iter()
        .filter(|(_, at_ms)| *at_ms >= start_ms)
        .filter_map(|(server, at_ms)| {
            let first = backends.get(server.as_str())?.first_request_since(*at_ms)?;
            let seconds = |ms: u64| ms.saturating_sub(start_ms) as f64 / 1000.0;
            Some((seconds(*at_ms), seconds(first)))
        })
        .collect()
}

/// The run, second by second of trace time.
fn timeline(
    settings: &Settings,
    record: &Record,
    load: &Summary,
    shift: f64,
    first_served_s: &[(f64, f64)],
) -> Timeline {
    let step_s = 1.0 / settings.speedup;
    let rates = settings.rates();
    let seconds = rates
        .iter()
        .enumerate()
        .map(|(i, offered_rps)| {
            let size = record.size_at(shift + (i as f64 + 0.5) * step_s);
            let step = load.steps.get(i).cloned().unwrap_or_default();
            let mut errors_by: std::collections::BTreeMap<String, u64> = step
                .statuses
                .iter()
                .map(|(status, n)| (status.to_string(), *n))
                .collect();
            for (cause, n) in [("no answer", step.failed), ("not sent", step.skipped)] {
                if n > 0 {
                    errors_by.insert(cause.to_owned(), n);
                }
            }
            Second {
                offered_rps: *offered_rps,
                requests: step.sent + step.skipped,
                ok: step.ok,
                errors: step.errors(),
                errors_by,
                latencies_us: step.latencies_us,
                active: size.active,
                joining: size.joining,
                draining: size.draining,
                pool_free: size.pool_free,
            }
        })
        .collect();
    Timeline {
        step_s,
        seconds,
        first_served_s: first_served_s.to_vec(),
    }
}

/// Keeps the members' agent reports (what the monitor reads) until `stop`.
async fn follow_reports(
    settings: &Settings,
    system: &System,
    origin: Instant,
    stop: CancellationToken,
) -> Arc<Mutex<Reports>> {
    let reports: Arc<Mutex<Reports>> = Arc::default();
    let subject = format!("{}.metrics.{}.>", subjects::ROOT, system.cluster);
    let Ok(mut subscription) = system.client.subscribe(subject).await else {
        tracing::error!("cannot subscribe to the members' reports");
        return reports;
    };
    let measures = settings.policy.scaling.measures.clone();
    let kept = reports.clone();
    tokio::spawn(async move {
        loop {
            let message = tokio::select! {
                _ = stop.cancelled() => return,
                m = subscription.next() => match m { Some(m) => m, None => return },
            };
            let Ok(r) =
                codec::decode::<PerformanceReport>(message.headers.as_ref(), &message.payload)
            else {
                continue;
            };
            if r.source != ReportSource::Agent {
                continue;
            }
            let u = measures.utilisation(&r.reading());
            let mut reports = kept.lock().await;
            if let Some(u) = u {
                reports.seen.push((origin.elapsed().as_secs_f64(), u));
            }
            reports.latest.insert(r.server.clone(), (Instant::now(), r));
        }
    });
    reports
}

/// The HPA baseline: reads the agents' reports as the monitor does, and
/// every sync period asks the allocator for the size it computes.
async fn drive_hpa(
    settings: Settings,
    js: async_nats::jetstream::Context,
    cluster: headroom_shared::ClusterId,
    latest: watch::Receiver<Option<ClusterRecord>>,
    reports: Arc<Mutex<Reports>>,
    stop: CancellationToken,
) {
    let policy = &settings.policy;
    let max = u32::try_from(settings.backends).unwrap_or(u32::MAX);
    let params = HpaParams::defaults(
        policy.scaling.target,
        policy.min_size,
        max,
        settings.speedup,
        settings.interval,
    );
    let mut hpa = Hpa::new(params);
    let mut ticker = tokio::time::interval(params.sync_period);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let started = Instant::now();
    let mut period = 0u64;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = ticker.tick() => {}
        }
        let Some(record) = latest.borrow().clone() else {
            continue;
        };
        let seen = observe(&settings, &record, &reports.lock().await.latest);
        let current = seen.current();
        let desired = hpa.desired(started.elapsed(), &seen);
        period += 1;
        for action in hpa_actions(&record, current, desired) {
            let mut request = ReconfigRequest::new(cluster.clone(), action, "hpa-emulation");
            request.reason = format!("HPA period {period}: {current} to {desired}");
            if let Err(err) = bus::request_reconfig(&js, &request).await {
                tracing::warn!(%err, "the HPA's request was not sent");
            }
        }
    }
}

/// What the HPA sees: ready members' utilisations, missing and unready.
fn observe(
    settings: &Settings,
    record: &ClusterRecord,
    reports: &HashMap<ServerId, (Instant, PerformanceReport)>,
) -> Observation {
    let measures = &settings.policy.scaling.measures;
    let fresh = settings.interval * 3;
    let mut seen = Observation::default();
    for m in &record.members {
        match m.state {
            MemberState::Joining => seen.unready += 1,
            MemberState::Draining => {}
            MemberState::Active => {
                let u = reports
                    .get(&m.server)
                    .filter(|(at, _)| at.elapsed() <= fresh)
                    .and_then(|(_, r)| measures.utilisation(&r.reading()));
                match u {
                    Some(u) => seen.ready.push(u),
                    None => seen.missing += 1,
                }
            }
        }
    }
    seen
}

/// The requests that take the cluster from `current` to `desired`: one
/// allocation for a rise, the newest members released for a fall (as a
/// ReplicaSet removes the youngest pods first).
fn hpa_actions(record: &ClusterRecord, current: u32, desired: u32) -> Vec<ReconfigAction> {
    if desired > current {
        return vec![ReconfigAction::Allocate {
            count: desired - current,
            request_type: None,
        }];
    }
    let mut members: Vec<_> = record
        .members
        .iter()
        .filter(|m| m.state != MemberState::Draining)
        .collect();
    members.sort_by_key(|m| std::cmp::Reverse(m.joined));
    members
        .into_iter()
        .take((current - desired) as usize)
        .map(|m| ReconfigAction::Release {
            server: m.server.clone(),
        })
        .collect()
}
