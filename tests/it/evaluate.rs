//! The evaluation end to end: a trace played through the real services
//! (allocator, monitor or the HPA emulation, front-end, agents and
//! capacity-limited backends on a real nats-server), and the figures it
//! gives agreeing with what the load generator sent.

use headroom_evaluate::{evaluate, report, Settings, Strategy};

/// 60 s of trace at x2: 20 s at 0.5, then 40 s at 3 (x50: 25 then 150
/// requests/s, which needs 4 of the 6 servers at the target).
fn step_trace() -> Settings {
    let trace: Vec<f64> = std::iter::repeat_n(0.5, 20)
        .chain(std::iter::repeat_n(3.0, 40))
        .collect();
    let mut settings = Settings::standard("step".into(), trace, 50.0, 2.0);
    settings.backends = 6;
    settings.policy.max_size = 6;
    settings
}

fn assert_counts_match(result: &headroom_evaluate::RunResult, settings: &Settings) {
    let load = &result.load;
    let seconds = &result.timeline.seconds;
    assert_eq!(seconds.len(), 60, "one record per trace second");
    let sum =
        |f: fn(&headroom_evaluate::outcome::Second) -> u64| seconds.iter().map(f).sum::<u64>();
    assert_eq!(sum(|s| s.requests), load.sent + load.skipped);
    assert_eq!(sum(|s| s.ok), load.ok);
    assert_eq!(sum(|s| s.errors), load.errors() + load.skipped);
    assert_eq!(
        sum(|s| s.latencies_us.len() as u64),
        load.ok,
        "a latency for every answer"
    );
    // Open loop: what was due is what the trace says, whatever happened.
    let due: f64 = settings.rates().iter().map(|r| r / settings.speedup).sum();
    let asked = (load.sent + load.skipped) as f64;
    assert!((asked - due).abs() <= 1.0, "{asked} sent for {due} due");
    let slo = &result.outcome.slo;
    assert_eq!(slo.requests, load.sent + load.skipped);
    assert_eq!(slo.minutes, 1);
    assert!(
        seconds.iter().all(|s| s.active >= 1),
        "never below the minimum"
    );
    let cost = &result.outcome.cost;
    assert!(cost.server_seconds >= 30.0, "at least one server all along");
    assert!(cost.oracle_server_seconds > 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_trace_plays_end_to_end_and_its_figures_match_what_was_sent() {
    let settings = step_trace();
    let result = evaluate(&settings, Strategy::Headroom)
        .await
        .expect("a run");
    assert_counts_match(&result, &settings);
    let peak = result.timeline.seconds.iter().map(|s| s.active).max();
    assert!(
        peak >= Some(3),
        "the monitor grew the cluster for the step: {peak:?}"
    );
    let reaction = &result.outcome.reaction;
    assert!(reaction.rises >= 1, "{reaction:?}");
    assert!(
        reaction.seconds.first().is_some_and(|s| *s < 10.0),
        "a new member served within 10 s of the rise: {reaction:?}"
    );
    let floor = settings.slo_floor();
    let json = report::json(&settings, &floor, std::slice::from_ref(&result));
    assert_eq!(json["runs"][0]["strategy"], "headroom");
    assert_eq!(json["runs"][0]["load"]["sent"], result.load.sent);
    assert_eq!(json["slo_floor"]["minutes"], floor.minutes);
    let svg = report::svg(&settings, &result);
    assert!(svg.contains(r#"id="p99-latency""#) && svg.contains(r#"id="slo""#));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_hpa_emulation_sizes_the_cluster_through_the_allocator() {
    let settings = step_trace();
    let result = evaluate(&settings, Strategy::Hpa).await.expect("a run");
    assert_counts_match(&result, &settings);
    let peak = result.timeline.seconds.iter().map(|s| s.active).max();
    // Sync every 7.5 s: ceil(1 x u / 0.6) with u near 2 (150/s on 80/s
    // of capacity), limited to 1 + 4.
    assert!(peak >= Some(3), "the HPA grew the cluster: {peak:?}");
    let static_peak = evaluate(&settings, Strategy::StaticPeak)
        .await
        .expect("a run");
    let (peak_size, _) = settings.static_sizes();
    assert_eq!(static_peak.static_size, Some(peak_size));
    assert!(
        static_peak
            .timeline
            .seconds
            .iter()
            .all(|s| s.active == peak_size),
        "a static cluster holds its size"
    );
}
