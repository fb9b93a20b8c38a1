//! What an evaluation shows: a table of every strategy's figures and their
//! ratios to Headroom's, the same as JSON (with each run's per-second
//! series), and each run's timeline as SVG with the SLO line.

use std::fmt::Write as _;

use headroom_demo::plot::{self, Levels, Sample};
use serde_json::json;

use crate::outcome::Timeline;
use crate::{Floor, RunResult, Settings, Strategy};

/// The conditions every figure depends on, in one line.
pub fn conditions(settings: &Settings, floor: &Floor) -> String {
    let s = &settings.policy.scaling;
    format!(
        "{}: {} s of trace at x{} speed-up ({:.0} s of wall clock), rates x{}; {} servers of {} slots at {} ms ({:?}), {:.0} requests/s each flat out; target {}, upper {}, lower {}; Headroom: sustain {} ms, release after {} ms, cooldowns {}/{} ms, panic ratio {}, projection {}; reports every {} ms; SLO p99 {} ms and 0.1 % errors per trace minute; {:.4} % of requests over it on an idle server, so {:.2} violating minutes even without a shortage",
        settings.name,
        settings.trace.len(),
        settings.speedup,
        settings.trace.len() as f64 / settings.speedup,
        settings.scale,
        settings.backends,
        settings.backend.concurrency,
        settings.backend.cost.as_millis(),
        settings.backend.service_time,
        settings.model().capacity_rps,
        s.target,
        s.upper,
        s.lower,
        s.sustain_ms,
        s.release_sustain_ms,
        s.cooldown_up_ms,
        s.cooldown_down_ms,
        s.panic_ratio,
        if s.project_rise { "on" } else { "off" },
        settings.interval.as_millis(),
        settings.latency_slo_ms,
        100.0 * floor.slow_share,
        floor.minutes,
    )
}

fn reaction_text(r: &RunResult) -> String {
    let reaction = &r.outcome.reaction;
    let mut seconds = reaction.seconds.clone();
    seconds.sort_by(f64::total_cmp);
    let median = seconds.get(seconds.len() / 2);
    match (median, seconds.last()) {
        (Some(p50), Some(max)) => format!(
            "{}/{} rises, p50 {p50:.1} s max {max:.1} s",
            seconds.len(),
            reaction.rises
        ),
        _ => format!("0/{} rises", reaction.rises),
    }
}

/// The table, Markdown, one row per run; the ratio columns compare with
/// Headroom's run when there is one.
pub fn table(settings: &Settings, floor: &Floor, results: &[RunResult]) -> String {
    let headroom = results.iter().find(|r| r.strategy == Strategy::Headroom);
    let mut out = String::new();
    let _ = writeln!(out, "{}\n", conditions(settings, floor));
    let _ = writeln!(
        out,
        "| strategy | SLO met (minutes) | violating minutes | requests over SLO | errors | server-s | x oracle | cost / Headroom's | adaptations | under / over accuracy | under / over time | instability | reaction |"
    );
    let _ = writeln!(out, "|{}", " --- |".repeat(13));
    for r in results {
        let o = &r.outcome;
        let name = match r.static_size {
            Some(n) => format!("{} ({n})", r.strategy.name()),
            None => r.strategy.name().to_owned(),
        };
        let versus = headroom.map_or("-".to_owned(), |h| {
            format!(
                "{:.2}",
                o.cost.server_seconds / h.outcome.cost.server_seconds.max(1e-9)
            )
        });
        let e = &o.elasticity;
        let _ = writeln!(
            out,
            "| {name} | {:.1} % | {} of {} | {:.2} % | {:.2} % | {:.0} | {:.2} | {versus} | {} | {:.0} / {:.0} % | {:.0} / {:.0} % | {:.1} % | {} |",
            100.0 * o.slo.met_share,
            o.slo.violating_minutes,
            o.slo.minutes,
            100.0 * o.slo.slow_share,
            100.0 * o.slo.error_share,
            o.cost.server_seconds,
            o.cost.over_oracle,
            e.adaptations,
            e.under_accuracy,
            e.over_accuracy,
            e.under_time_share,
            e.over_time_share,
            e.instability,
            reaction_text(r),
        );
    }
    out
}

/// The targets on this trace, checked: Headroom meets the SLO in 99 % of
/// minutes, costs at most 1.3 times the oracle, and has fewer violating
/// minutes than the HPA at no more server-seconds.
pub fn verdict(results: &[RunResult]) -> Vec<(String, bool)> {
    let Some(h) = results.iter().find(|r| r.strategy == Strategy::Headroom) else {
        return Vec::new();
    };
    let mut out = vec![
        (
            format!(
                "SLO met in {:.1} % of minutes (target 99 %)",
                100.0 * h.outcome.slo.met_share
            ),
            h.outcome.slo.met_share >= 0.99,
        ),
        (
            format!(
                "{:.2} x the oracle's server-seconds (target 1.3)",
                h.outcome.cost.over_oracle
            ),
            h.outcome.cost.over_oracle <= 1.3,
        ),
    ];
    if let Some(hpa) = results.iter().find(|r| r.strategy == Strategy::Hpa) {
        let (hv, pv) = (
            h.outcome.slo.violating_minutes,
            hpa.outcome.slo.violating_minutes,
        );
        let (hc, pc) = (
            h.outcome.cost.server_seconds,
            hpa.outcome.cost.server_seconds,
        );
        out.push((
            format!(
                "{hv} violating minutes against the HPA's {pv}, at {hc:.0} server-s against {pc:.0}"
            ),
            (hv < pv || (hv == 0 && pv == 0)) && hc <= pc,
        ));
    }
    out
}

/// The timeline in at most `points` samples, each the end of a bucket of
/// trace seconds.
pub fn samples(result: &RunResult, points: usize) -> Vec<Sample> {
    let timeline: &Timeline = &result.timeline;
    let n = timeline.seconds.len();
    let per = n.div_ceil(points.max(1)).max(1);
    let mut out = Vec::new();
    let mut reports = result.utilisation.iter().peekable();
    for (b, bucket) in timeline.seconds.chunks(per).enumerate() {
        let t_s = ((b * per + bucket.len()) as f64) * timeline.step_s;
        let wall = bucket.len() as f64 * timeline.step_s;
        let mut latencies: Vec<u32> = bucket
            .iter()
            .flat_map(|s| s.latencies_us.iter().copied())
            .collect();
        let mut u = Vec::new();
        while let Some((_, value)) = reports.next_if(|(at, _)| *at <= t_s) {
            u.push(*value);
        }
        let last = bucket.last().cloned().unwrap_or_default();
        out.push(Sample {
            t_s,
            offered_rps: bucket.iter().map(|s| s.offered_rps).sum::<f64>() / bucket.len() as f64,
            served_rps: bucket.iter().map(|s| s.ok).sum::<u64>() as f64 / wall,
            members: last.active,
            changing: last.joining + last.draining,
            utilisation: (!u.is_empty()).then(|| u.iter().sum::<f64>() / u.len() as f64),
            pool_free: last.pool_free,
            p99_ms: headroom_loadgen::percentile_ms(&mut latencies, 0.99),
        });
    }
    out
}

pub fn svg(settings: &Settings, result: &RunResult) -> String {
    let title = format!(
        "{} on {} (x{} speed-up, rates x{}): load, utilisation, size, p99",
        result.strategy.name(),
        settings.name,
        settings.speedup,
        settings.scale
    );
    plot::svg(
        &samples(result, 600),
        &[],
        &title,
        Levels {
            upper: settings.policy.scaling.upper,
            lower: settings.policy.scaling.lower,
            slo_ms: settings.latency_slo_ms,
        },
    )
}

/// Per bucket of `per` trace seconds, what the plot does not show: p50,
/// errors by cause, joining and draining apart.
fn details(result: &RunResult, per: usize) -> serde_json::Value {
    let (mut p50, mut errors, mut joining, mut draining) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for bucket in result.timeline.seconds.chunks(per.max(1)) {
        let mut latencies: Vec<u32> = bucket
            .iter()
            .flat_map(|s| s.latencies_us.iter().copied())
            .collect();
        p50.push(headroom_loadgen::percentile_ms(&mut latencies, 0.5));
        let mut by: std::collections::BTreeMap<&str, u64> = Default::default();
        for s in bucket {
            for (cause, n) in &s.errors_by {
                *by.entry(cause.as_str()).or_default() += n;
            }
        }
        errors.push(by);
        let last = bucket.last().cloned().unwrap_or_default();
        joining.push(last.joining);
        draining.push(last.draining);
    }
    json!({ "p50_ms": p50, "errors_by": errors, "joining": joining, "draining": draining })
}

/// Everything, for a program to read: the conditions, every outcome and
/// load summary, and each run's series.
pub fn json(settings: &Settings, floor: &Floor, results: &[RunResult]) -> serde_json::Value {
    let runs: Vec<_> = results
        .iter()
        .map(|r| {
            let points = 2000;
            let series = samples(r, points);
            let per = r.timeline.seconds.len().div_ceil(points).max(1);
            json!({
                "trace_seconds_per_point": per,
                "details": details(r, per),
                "strategy": r.strategy,
                "static_size": r.static_size,
                "outcome": r.outcome,
                "load": r.load,
                "series": {
                    "t_s": series.iter().map(|s| s.t_s).collect::<Vec<_>>(),
                    "offered_rps": series.iter().map(|s| s.offered_rps).collect::<Vec<_>>(),
                    "served_rps": series.iter().map(|s| s.served_rps).collect::<Vec<_>>(),
                    "members": series.iter().map(|s| s.members).collect::<Vec<_>>(),
                    "joining_or_draining": series.iter().map(|s| s.changing).collect::<Vec<_>>(),
                    "pool_free": series.iter().map(|s| s.pool_free).collect::<Vec<_>>(),
                    "utilisation": series.iter().map(|s| s.utilisation).collect::<Vec<_>>(),
                    "p99_ms": series.iter().map(|s| s.p99_ms).collect::<Vec<_>>(),
                },
            })
        })
        .collect();
    json!({
        "trace": settings.name,
        "trace_seconds": settings.trace.len(),
        "scale": settings.scale,
        "speedup": settings.speedup,
        "backends": settings.backends,
        "model": settings.model(),
        "conditions": conditions(settings, floor),
        "slo_floor": floor,
        "verdict": verdict(results).into_iter().map(|(what, met)| json!({"what": what, "met": met})).collect::<Vec<_>>(),
        "runs": runs,
    })
}
