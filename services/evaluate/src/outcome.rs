//! The outcome of one run, from its per-second timeline: the SLO kept or
//! not, the server cost against an oracle, the SPEC Research Group's
//! elasticity metrics, and how fast new members served after a rise.
//!
//! Everything here is arithmetic on a [`Timeline`], so the tests can work
//! the figures out by hand.

use std::collections::BTreeMap;

use headroom_loadgen::percentile_ms;
use serde::Serialize;

/// What the servers can carry and what the service promises.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Model {
    /// Requests a second one server carries flat out (its concurrency over
    /// its mean service time).
    pub capacity_rps: f64,
    /// The utilisation the oracle provisions for.
    pub target: f64,
    /// The level past which the members are overloaded (for reactions).
    pub upper: f64,
    /// The fewest members a cluster has.
    pub min_size: u32,
    pub latency_slo_ms: f64,
    /// The most of a minute's requests that may fail (0.001: 0.1 %).
    pub error_budget: f64,
}

/// One second of trace time.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Second {
    /// Requests a second the trace asked for, after scaling.
    pub offered_rps: f64,
    /// Requests sent (or due but not sent) in this second.
    pub requests: u64,
    pub ok: u64,
    /// Requests without a 2xx: error statuses, no answer, not sent.
    pub errors: u64,
    /// The same by cause: the status code, `no answer` or `not sent`.
    pub errors_by: BTreeMap<String, u64>,
    /// Latency of each 2xx answer, in microseconds.
    pub latencies_us: Vec<u32>,
    /// Members serving, joining and draining at the middle of the second.
    pub active: u32,
    pub joining: u32,
    pub draining: u32,
    pub pool_free: u32,
}

/// A run, second by second of trace time.
#[derive(Debug, Clone, PartialEq)]
pub struct Timeline {
    /// Wall-clock seconds one trace second lasted (1 / the speed-up).
    pub step_s: f64,
    pub seconds: Vec<Second>,
    /// For each member that joined during the load: (when it joined,
    /// when it served its first request), wall-clock seconds from the
    /// start of the load.
    pub first_served_s: Vec<(f64, f64)>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Slo {
    pub minutes: usize,
    /// Minutes whose p99 was over the SLO or whose error share was over
    /// the budget.
    pub violating_minutes: usize,
    /// Good minutes over all minutes.
    pub met_share: f64,
    pub requests: u64,
    /// Requests answered slower than the SLO, over all requests.
    pub slow_share: f64,
    /// Requests without a 2xx, over all requests.
    pub error_share: f64,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Cost {
    /// Wall-clock server-seconds: members serving, joining or draining.
    pub server_seconds: f64,
    pub oracle_server_seconds: f64,
    pub over_oracle: f64,
}

/// Herbst et al.'s elasticity metrics, supply being the members serving
/// and demand the oracle's count; accuracies in percent of demand, time
/// shares and instability in percent of time.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Elasticity {
    pub under_accuracy: f64,
    pub over_accuracy: f64,
    pub under_time_share: f64,
    pub over_time_share: f64,
    /// Changes of the provisioned size (serving plus joining).
    pub adaptations: usize,
    /// Seconds whose supply moved differently from demand.
    pub instability: f64,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Reaction {
    /// Rises of the offered load past what the members carried at the
    /// upper level, that lasted a wall-clock second or were answered.
    pub rises: usize,
    /// Rises shorter than that and unanswered: noise, not counted above.
    pub blips: usize,
    /// For each rise answered by a new member: wall seconds until it
    /// served its first request.
    pub seconds: Vec<f64>,
    /// Rises that fell back before a new member served.
    pub subsided: usize,
    /// Rises still unanswered at the end.
    pub unanswered: usize,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Outcome {
    pub slo: Slo,
    pub cost: Cost,
    pub elasticity: Elasticity,
    pub reaction: Reaction,
    /// The largest oracle size and the trace's mean, in servers.
    pub oracle_peak: u32,
    pub oracle_mean: f64,
}

/// The fewest members that carry `rps` at the target utilisation.
pub fn needed(model: &Model, rps: f64) -> u32 {
    let per_server = model.capacity_rps * model.target;
    let n = if per_server > 0.0 {
        (rps / per_server - 1e-9).ceil().max(0.0)
    } else {
        0.0
    };
    (n as u32).max(model.min_size)
}

/// The offered rate of each second averaged over the wall-clock second
/// around it: a server feels load over the time its requests take, and
/// at a speed-up of 720 one trace second is 1.4 ms, so the oracle of a
/// lone trace second would provision for a burst no server ever saw.
pub fn smoothed_rps(timeline: &Timeline) -> Vec<f64> {
    let n = timeline.seconds.len();
    let half = ((1.0 / timeline.step_s.max(1e-9)).round() as usize).max(1) / 2;
    let mut prefix = vec![0.0; n + 1];
    for (i, s) in timeline.seconds.iter().enumerate() {
        prefix[i + 1] = prefix[i] + s.offered_rps;
    }
    (0..n)
        .map(|i| {
            let (from, to) = (i.saturating_sub(half), (i + half + 1).min(n));
            (prefix[to] - prefix[from]) / (to - from) as f64
        })
        .collect()
}

/// The oracle: per second, the fewest members for the smoothed load.
pub fn oracle(model: &Model, timeline: &Timeline) -> Vec<u32> {
    smoothed_rps(timeline)
        .into_iter()
        .map(|rps| needed(model, rps))
        .collect()
}

pub fn slo(model: &Model, timeline: &Timeline) -> Slo {
    let mut out = Slo::default();
    let (mut slow, mut errors) = (0u64, 0u64);
    for minute in timeline.seconds.chunks(60) {
        let requests: u64 = minute.iter().map(|s| s.requests).sum();
        let failed: u64 = minute.iter().map(|s| s.errors).sum();
        let mut latencies: Vec<u32> = minute
            .iter()
            .flat_map(|s| s.latencies_us.iter().copied())
            .collect();
        let slo_us = model.latency_slo_ms * 1000.0;
        slow += latencies.iter().filter(|l| f64::from(**l) > slo_us).count() as u64;
        errors += failed;
        out.requests += requests;
        out.minutes += 1;
        let too_slow =
            percentile_ms(&mut latencies, 0.99).is_some_and(|p| p > model.latency_slo_ms);
        let too_many_errors = requests > 0 && failed as f64 > model.error_budget * requests as f64;
        if too_slow || too_many_errors {
            out.violating_minutes += 1;
        }
    }
    let share = |n: u64| {
        if out.requests == 0 {
            0.0
        } else {
            n as f64 / out.requests as f64
        }
    };
    out.slow_share = share(slow);
    out.error_share = share(errors);
    out.met_share = if out.minutes == 0 {
        1.0
    } else {
        1.0 - out.violating_minutes as f64 / out.minutes as f64
    };
    out
}

/// The violating minutes to expect of a cluster never short of capacity,
/// from the service time's own tail: a minute of `n` requests fails when
/// more of them than its p99 allows (n - ceil(0.99 n), nearest rank) are
/// slower than the SLO, and each is, on an idle server, with chance
/// `slow_chance`. What no provisioning can do better than.
pub fn slo_floor(requests_per_minute: &[u64], slow_chance: f64) -> f64 {
    let p = slow_chance.clamp(0.0, 1.0);
    requests_per_minute
        .iter()
        .filter(|n| **n > 0)
        .map(|&n| {
            let allowed = n - (0.99 * n as f64).ceil() as u64;
            1.0 - binomial_at_most(n, p, allowed)
        })
        .sum()
}

/// P(X <= k) for X ~ Binomial(n, p), summing the terms from 0 up.
fn binomial_at_most(n: u64, p: f64, k: u64) -> f64 {
    if p <= 0.0 {
        return 1.0;
    }
    if p >= 1.0 {
        return if k >= n { 1.0 } else { 0.0 };
    }
    // The first term is (1 - p)^n; each next one is the last times
    // (n - i) / (i + 1) * p / (1 - p).
    let mut term = (n as f64 * (1.0 - p).ln()).exp();
    let mut sum = term;
    for i in 0..k.min(n) {
        term *= (n - i) as f64 / (i + 1) as f64 * p / (1.0 - p);
        sum += term;
    }
    sum.min(1.0)
}

pub fn cost(timeline: &Timeline, oracle: &[u32]) -> Cost {
    let server_seconds: f64 = timeline
        .seconds
        .iter()
        .map(|s| f64::from(s.active + s.joining + s.draining) * timeline.step_s)
        .sum();
    let oracle_server_seconds: f64 = oracle.iter().map(|n| f64::from(*n) * timeline.step_s).sum();
    Cost {
        server_seconds,
        oracle_server_seconds,
        over_oracle: if oracle_server_seconds > 0.0 {
            server_seconds / oracle_server_seconds
        } else {
            0.0
        },
    }
}

pub fn elasticity(timeline: &Timeline, oracle: &[u32]) -> Elasticity {
    let n = timeline.seconds.len().min(oracle.len());
    let mut out = Elasticity::default();
    if n == 0 {
        return out;
    }
    let mut moved_apart = 0usize;
    for i in 0..n {
        let (s, d) = (
            f64::from(timeline.seconds[i].active),
            f64::from(oracle[i]).max(1.0),
        );
        out.under_accuracy += (d - s).max(0.0) / d;
        out.over_accuracy += (s - d).max(0.0) / d;
        out.under_time_share += f64::from(u8::from(s < d));
        out.over_time_share += f64::from(u8::from(s > d));
        if i > 0 {
            let was = &timeline.seconds[i - 1];
            let now = &timeline.seconds[i];
            if was.active + was.joining != now.active + now.joining {
                out.adaptations += 1;
            }
            let ds = i64::from(now.active) - i64::from(was.active);
            let dd = i64::from(oracle[i]) - i64::from(oracle[i - 1]);
            if ds.signum() != dd.signum() {
                moved_apart += 1;
            }
        }
    }
    let percent = 100.0 / n as f64;
    out.under_accuracy *= percent;
    out.over_accuracy *= percent;
    out.under_time_share *= percent;
    out.over_time_share *= percent;
    out.instability = if n > 1 {
        100.0 * moved_apart as f64 / (n - 1) as f64
    } else {
        0.0
    };
    out
}

/// Wall-clock seconds a rise must last to count when nobody answers it.
const MIN_RISE_S: f64 = 1.0;

pub fn reaction(model: &Model, timeline: &Timeline) -> Reaction {
    let rps = smoothed_rps(timeline);
    let carried =
        |i: usize| f64::from(timeline.seconds[i].active) * model.capacity_rps * model.upper;
    let over = |i: usize| rps[i] > carried(i);
    let mut out = Reaction::default();
    let mut first_served = timeline.first_served_s.clone();
    first_served.sort_by(|a, b| a.1.total_cmp(&b.1));
    // A rise ends when a new member serves, or when the load falls back
    // under what the members carried when it began (members joining do
    // not end it: they are the answer, whose first request is awaited).
    let mut pending: Option<(f64, f64)> = None;
    for (i, &load) in rps.iter().enumerate() {
        let t = i as f64 * timeline.step_s;
        if let Some((since, level)) = pending {
            // A new member: one that joined after the rise began.
            let answered = first_served
                .iter()
                .find(|(joined, served)| *joined >= since && *served <= t);
            if let Some((_, served)) = answered {
                out.rises += 1;
                out.seconds.push(served - since);
                pending = None;
            } else if load <= level {
                if t - since >= MIN_RISE_S {
                    out.rises += 1;
                    out.subsided += 1;
                } else {
                    out.blips += 1;
                }
                pending = None;
            }
            continue;
        }
        if over(i) && (i == 0 || !over(i - 1)) {
            pending = Some((t, carried(i)));
        }
    }
    if pending.is_some() {
        out.rises += 1;
        out.unanswered += 1;
    }
    out
}

/// Every figure of the run.
pub fn outcome(model: &Model, timeline: &Timeline) -> Outcome {
    let oracle = oracle(model, timeline);
    Outcome {
        slo: slo(model, timeline),
        cost: cost(timeline, &oracle),
        elasticity: elasticity(timeline, &oracle),
        reaction: reaction(model, timeline),
        oracle_peak: oracle.iter().copied().max().unwrap_or(0),
        oracle_mean: if oracle.is_empty() {
            0.0
        } else {
            oracle.iter().map(|n| f64::from(*n)).sum::<f64>() / oracle.len() as f64
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn model() -> Model {
        Model {
            capacity_rps: 10.0,
            target: 0.5,
            upper: 0.8,
            min_size: 1,
            latency_slo_ms: 100.0,
            error_budget: 0.001,
        }
    }

    fn second(offered_rps: f64, active: u32, latencies_ms: &[f64], errors: u64) -> Second {
        Second {
            offered_rps,
            requests: latencies_ms.len() as u64 + errors,
            ok: latencies_ms.len() as u64,
            errors,
            latencies_us: latencies_ms.iter().map(|ms| (ms * 1000.0) as u32).collect(),
            active,
            ..Second::default()
        }
    }

    /// Three minutes at one trace second per wall second: the first is
    /// good, the second has one slow second, the third one error in 600.
    fn three_minutes() -> Timeline {
        let mut seconds = Vec::new();
        for i in 0..180 {
            let (rps, active) = match i {
                0..60 => (4.0, 1),
                60..120 => (12.0, if i < 70 { 1 } else { 3 }),
                _ => (8.0, 2),
            };
            let mut latencies = vec![20.0; 10];
            let mut errors = 0;
            if i == 65 {
                // 10 of the minute's 600 over the SLO: its p99 is 250.
                latencies = vec![250.0; 10];
            }
            if i == 150 {
                latencies.pop();
                errors = 1;
            }
            seconds.push(second(rps, active, &latencies, errors));
        }
        Timeline {
            step_s: 1.0,
            seconds,
            first_served_s: vec![(30.0, 31.0), (62.0, 68.5)],
        }
    }

    #[test]
    fn the_figures_of_a_hand_made_timeline() {
        let model = model();
        let timeline = three_minutes();
        // 5 requests/s per server at target: 4/s needs 1, 12/s needs 3,
        // 8/s needs 2.
        let oracle = oracle(&model, &timeline);
        assert_eq!((oracle[0], oracle[100], oracle[170]), (1, 3, 2));

        let slo = slo(&model, &timeline);
        assert_eq!(slo.minutes, 3);
        assert_eq!(slo.requests, 1800);
        // Minute 2: 10 of 600 at 250 ms puts its p99 (the 594th) at 250.
        // Minute 3: 1 error in 600 is 0.17 %, over 0.1 %.
        assert_eq!(slo.violating_minutes, 2);
        assert!((slo.met_share - 1.0 / 3.0).abs() < 1e-9);
        assert!((slo.slow_share - 10.0 / 1800.0).abs() < 1e-12);
        assert!((slo.error_share - 1.0 / 1800.0).abs() < 1e-12);

        // Used: 60 x 1 + 10 x 1 + 50 x 3 + 60 x 2 = 340; oracle:
        // 60 x 1 + 60 x 3 + 60 x 2 = 360.
        let cost = cost(&timeline, &oracle);
        assert!((cost.server_seconds - 340.0).abs() < 1e-9);
        assert!((cost.oracle_server_seconds - 360.0).abs() < 1e-9);
        assert!((cost.over_oracle - 340.0 / 360.0).abs() < 1e-12);

        // Under for 10 s at 1 of 3 (2/3 short each): 100/180 x 10 x 2/3;
        // never over; the size changed twice (1 to 3, 3 to 2); supply and
        // demand moved apart at 60 (demand up alone) and 70 (supply up
        // alone), and together at 120.
        let e = elasticity(&timeline, &oracle);
        assert!((e.under_accuracy - 100.0 / 180.0 * 10.0 * 2.0 / 3.0).abs() < 1e-9);
        assert_eq!(e.over_accuracy, 0.0);
        assert!((e.under_time_share - 100.0 * 10.0 / 180.0).abs() < 1e-9);
        assert_eq!(e.over_time_share, 0.0);
        assert_eq!(e.adaptations, 2);
        assert!((e.instability - 100.0 * 2.0 / 179.0).abs() < 1e-9);

        // One member carries 8/s at the upper level: 12/s at 60 is a rise,
        // answered by the member that joined at 62 s and served first at
        // 68.5 s (the one that joined before the rise does not count).
        let r = reaction(&model, &timeline);
        assert_eq!(r.rises, 1);
        assert_eq!(r.seconds, vec![8.5]);
        assert_eq!((r.subsided, r.unanswered), (0, 0));
    }

    #[test]
    fn the_floor_of_an_idle_cluster_is_the_chance_of_too_many_slow_requests() {
        // 20 requests: the p99 is the slowest, so one slow one fails the
        // minute: 1 - 0.99^20. 200 requests: the p99 (the 198th) allows
        // two: 1 - P(X <= 2) with X ~ B(200, 0.01).
        let one = 1.0 - 0.99f64.powi(20);
        let q = 0.99f64;
        let at_most_two =
            q.powi(200) + 200.0 * 0.01 * q.powi(199) + 19_900.0 * 0.0001 * q.powi(198);
        let floor = slo_floor(&[20, 0, 200], 0.01);
        assert!((floor - (one + 1.0 - at_most_two)).abs() < 1e-12, "{floor}");
        assert_eq!(slo_floor(&[20, 200], 0.0), 0.0);
        assert!((slo_floor(&[5], 1.0) - 1.0).abs() < 1e-12);
    }

    #[test]
    fn the_oracle_smooths_over_a_wall_second_when_time_is_compressed() {
        // At a speed-up of 4, a second of 8/s between three idle ones is
        // 2/s on average over the wall second: one member, not two.
        let mut timeline = Timeline {
            step_s: 0.25,
            seconds: [0.0, 0.0, 8.0, 0.0, 0.0, 0.0]
                .iter()
                .map(|r| second(*r, 1, &[], 0))
                .collect(),
            first_served_s: Vec::new(),
        };
        let rps = smoothed_rps(&timeline);
        assert!((rps[2] - 8.0 / 5.0).abs() < 1e-9, "{rps:?}");
        assert_eq!(oracle(&model(), &timeline), vec![1; 6]);
        timeline.step_s = 1.0;
        assert_eq!(oracle(&model(), &timeline)[2], 2, "uncompressed");
    }

    #[test]
    fn a_rise_that_falls_back_before_anyone_joins_subsided() {
        // At x4: a rise of two trace seconds (half a wall second), one of
        // eight (two wall seconds), then one still on at the end.
        let rates = [
            4.0, 9.0, 9.0, 4.0, 9.0, 9.0, 9.0, 9.0, 9.0, 9.0, 9.0, 9.0, 4.0, 9.0,
        ];
        let seconds = rates.iter().map(|r| second(*r, 1, &[], 0)).collect();
        let timeline = Timeline {
            step_s: 1.0,
            seconds,
            first_served_s: Vec::new(),
        };
        let r = reaction(&model(), &timeline);
        assert_eq!((r.rises, r.subsided, r.unanswered), (3, 2, 1), "{r:?}");
        let compressed = Timeline {
            step_s: 0.25,
            ..timeline
        };
        // Smoothed over a wall second (five trace seconds around each),
        // only trace seconds 6 to 9 are over 8/s: one rise of a wall
        // second, which subsided.
        let r = reaction(&model(), &compressed);
        assert_eq!(
            (r.rises, r.subsided, r.blips, r.unanswered),
            (1, 1, 0, 0),
            "{r:?}"
        );
        // At x2 (three trace seconds around each), 8, 10, 8 is over 8/s
        // for one trace second only: half a wall second, a blip.
        let short = Timeline {
            step_s: 0.5,
            seconds: [4.0, 4.0, 8.0, 10.0, 8.0, 4.0, 4.0]
                .iter()
                .map(|r| second(*r, 1, &[], 0))
                .collect(),
            first_served_s: Vec::new(),
        };
        let r = reaction(&model(), &short);
        assert_eq!((r.rises, r.blips), (0, 1), "{r:?}");
    }
}
