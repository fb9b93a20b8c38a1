//! Headroom's outcome on real traffic: plays a trace of per-second request
//! rates, open loop, through the real system (allocator, front-end,
//! agents and capacity-limited sample backends, with the monitor or a
//! baseline sizing the cluster), records each second of trace time, and
//! judges the run: SLO minutes, server cost against an oracle, elasticity
//! and reaction.
//!
//! # Layout
//! - [`trace`]: the traces and their excerpts.
//! - [`outcome`]: the figures, from a per-second timeline.
//! - [`hpa`]: the Kubernetes HPA's algorithm, the baseline users run.
//! - [`record`]: the cluster's size over the run, from KV.
//! - [`report`]: the table, the JSON and the timeline plot.
//! - [`run`]: one run of one strategy.

pub mod hpa;
pub mod outcome;
pub mod record;
pub mod report;
pub mod run;
pub mod trace;

use std::time::Duration;

use headroom_shared::config::{BackendConfig, ServiceTime};
use headroom_shared::records::{ClusterPolicy, Measures, ScalingPolicy};
use serde::Serialize;

pub use run::{evaluate, RunError, RunResult};

/// Who sizes the cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Strategy {
    /// Headroom's monitor.
    Headroom,
    /// A fixed cluster sized for the trace's peak (the cost ceiling).
    StaticPeak,
    /// A fixed cluster sized for the trace's mean.
    StaticMean,
    /// The Kubernetes HPA's default algorithm.
    Hpa,
}

impl Strategy {
    pub const ALL: [Strategy; 4] = [
        Strategy::Headroom,
        Strategy::Hpa,
        Strategy::StaticPeak,
        Strategy::StaticMean,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Strategy::Headroom => "headroom",
            Strategy::StaticPeak => "static-peak",
            Strategy::StaticMean => "static-mean",
            Strategy::Hpa => "hpa",
        }
    }

    pub fn parse(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|s| s.name() == name)
    }
}

/// A production time constant compressed for a run: divided by the
/// speed-up, but never shorter than `reports` report intervals, since a
/// window shorter than the readings it judges is no window. Headroom's
/// constants and the HPA's are compressed by this one rule.
pub fn compressed(
    production: Duration,
    speedup: f64,
    interval: Duration,
    reports: u32,
) -> Duration {
    production
        .div_f64(speedup.max(1e-9))
        .max(interval * reports)
}

/// Headroom's production policy ([`ScalingPolicy::default`]) for sample
/// servers whose load is what they have in flight (8 a full server), with
/// its time constants [`compressed`]: windows and cooldowns of at least
/// two reports, a release window of at least four.
pub fn policy(backends: usize, speedup: f64, interval: Duration, slo_ms: f64) -> ClusterPolicy {
    let defaults = ScalingPolicy::default();
    let compress = |ms: u64, reports: u32| {
        let d = compressed(Duration::from_millis(ms), speedup, interval, reports);
        u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
    };
    ClusterPolicy {
        min_size: 1,
        max_size: u32::try_from(backends).unwrap_or(u32::MAX),
        routes: Vec::new(),
        scaling: ScalingPolicy {
            sustain_ms: compress(defaults.sustain_ms, 2),
            release_sustain_ms: compress(defaults.release_sustain_ms, 4),
            cooldown_up_ms: compress(defaults.cooldown_up_ms, 2),
            cooldown_down_ms: compress(defaults.cooldown_down_ms, 2),
            measures: Measures {
                cpu: 0.0,
                in_flight: 1.0,
                in_flight_capacity: 8.0,
                latency: 0.0,
                latency_slo_ms: slo_ms,
            },
            ..defaults
        },
        drain_timeout_ms: 10_000,
    }
}

/// The standard p99 objective. It is set where the servers' own service
/// times cannot miss it: with 100 ms lognormal service times (sigma 0.5),
/// about one request in 3,500 takes over 500 ms however idle its server,
/// and at 15 to 90 requests a trace minute (where a minute's p99 is its
/// slowest request or close to it) a cluster never short of capacity
/// fails 4 to 6 minutes of each NASA excerpt at 500 ms: what the 500 ms
/// runs measured of the static cluster for the peak. Over 1 s it is
/// about one request in 500,000, so a violating minute is queueing,
/// which is what provisioning controls. [`Settings::slo_floor`] works the
/// floor out for any objective.
pub const SLO_MS: f64 = 1000.0;

/// The SLO's floor on a trace: what no provisioning can do better than.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Floor {
    /// Requests slower than the SLO on an idle server.
    pub slow_share: f64,
    /// Violating minutes to expect of a cluster never short of capacity.
    pub minutes: f64,
}

/// One evaluation: the trace, how it is played, the servers and the
/// policy.
#[derive(Debug, Clone)]
pub struct Settings {
    /// The trace's name, for the reports.
    pub name: String,
    /// Requests per second of trace time, before scaling.
    pub trace: Vec<f64>,
    /// Multiplies every rate.
    pub scale: f64,
    /// Trace seconds per wall-clock second.
    pub speedup: f64,
    /// Sample servers registered (the cluster's maximum).
    pub backends: usize,
    pub backend: BackendConfig,
    /// Headroom's policy (the baselines take its target and bounds).
    pub policy: ClusterPolicy,
    /// Agents' and front-end's report interval, the monitor's evaluation
    /// interval.
    pub interval: Duration,
    /// A minute whose p99 is over this fails the SLO.
    pub latency_slo_ms: f64,
}

impl Settings {
    /// The evaluation's standard servers and policy for `trace`: 20
    /// sample servers of 8 slots at 100 ms (lognormal, sigma 0.5), 80
    /// requests/s each flat out; a p99 objective of [`SLO_MS`].
    pub fn standard(name: String, trace: Vec<f64>, scale: f64, speedup: f64) -> Self {
        let backends = 20;
        let interval = Duration::from_millis(500);
        Self {
            name,
            trace,
            scale,
            speedup,
            backends,
            backend: BackendConfig {
                cost: Duration::from_millis(100),
                concurrency: 8,
                queue_limit: 256,
                service_time: ServiceTime::Lognormal,
                service_sigma: 0.5,
                ..BackendConfig::default()
            },
            policy: policy(backends, speedup, interval, SLO_MS),
            interval,
            latency_slo_ms: SLO_MS,
        }
    }

    /// The rates as played, requests per wall-clock second.
    pub fn rates(&self) -> Vec<f64> {
        self.trace.iter().map(|r| r * self.scale).collect()
    }

    /// What a server carries and what the service promises.
    pub fn model(&self) -> outcome::Model {
        let cost = self.backend.cost.as_secs_f64().max(1e-6);
        outcome::Model {
            capacity_rps: self.backend.concurrency.max(1) as f64 / cost,
            target: self.policy.scaling.target,
            upper: self.policy.scaling.upper,
            min_size: self.policy.min_size.max(1),
            latency_slo_ms: self.latency_slo_ms,
            error_budget: 0.001,
        }
    }

    /// The size every run starts at: the oracle's for the trace's first
    /// wall-clock second, as a service already running would be sized.
    /// Starting every run at the minimum would measure a cold start that
    /// no trace excerpt has.
    pub fn initial_size(&self) -> u32 {
        let model = self.model();
        let first = ((self.speedup.round() as usize).max(1)).min(self.trace.len().max(1));
        let rps = self.rates().iter().take(first).sum::<f64>() / first as f64;
        let cap = u32::try_from(self.backends).unwrap_or(u32::MAX);
        outcome::needed(&model, rps).min(cap)
    }

    /// The share of requests slower than the SLO on an idle server: the
    /// servers' own service-time sampler, drawn a million times.
    pub fn slow_chance(&self) -> f64 {
        const DRAWS: u32 = 1_000_000;
        let sampler = headroom_backend::capacity::Capacity::new(&self.backend);
        let slo = Duration::from_secs_f64(self.latency_slo_ms.max(0.0) / 1000.0);
        let slow = (0..DRAWS)
            .filter(|_| sampler.draw(self.backend.cost) > slo)
            .count();
        slow as f64 / f64::from(DRAWS)
    }

    /// What a cluster never short of capacity would miss of the SLO on
    /// this trace, from the service time alone ([`outcome::slo_floor`]).
    /// A million draws: worked out once per trace, by the caller.
    pub fn slo_floor(&self) -> Floor {
        let step_s = 1.0 / self.speedup.max(1e-9);
        let per_minute: Vec<u64> = self
            .rates()
            .chunks(60)
            .map(|m| (m.iter().sum::<f64>() * step_s).round() as u64)
            .collect();
        let slow_share = self.slow_chance();
        Floor {
            slow_share,
            minutes: outcome::slo_floor(&per_minute, slow_share),
        }
    }

    /// The static sizes: for the peak and for the mean of the load as the
    /// oracle sees it.
    pub fn static_sizes(&self) -> (u32, u32) {
        let model = self.model();
        let timeline = outcome::Timeline {
            step_s: 1.0 / self.speedup,
            seconds: self
                .rates()
                .into_iter()
                .map(|offered_rps| outcome::Second {
                    offered_rps,
                    ..outcome::Second::default()
                })
                .collect(),
            first_served_s: Vec::new(),
        };
        let smoothed = outcome::smoothed_rps(&timeline);
        let peak = smoothed.iter().copied().fold(0.0, f64::max);
        let mean = smoothed.iter().sum::<f64>() / smoothed.len().max(1) as f64;
        let cap = u32::try_from(self.backends).unwrap_or(u32::MAX);
        (
            outcome::needed(&model, peak).min(cap),
            outcome::needed(&model, mean).min(cap),
        )
    }
}
