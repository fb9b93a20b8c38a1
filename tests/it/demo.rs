//! The one-command demo, in its short form: the whole system on one
//! nats-server, under a load that rises, falls and rises again.

use headroom_demo::plot::read_series;
use headroom_demo::{run, Settings};
use headroom_tests::NatsServer;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_short_demo_scales_up_then_down_then_reallocates_from_the_pool() {
    headroom_shared::telemetry::init_for_tests();
    let nats = NatsServer::start().await.expect("nats-server");
    let dir = tempfile::tempdir().expect("temp dir");
    let settings = Settings::short(dir.path().join("plot/timeline.svg"));
    let mut out = Vec::new();
    let report = run(&settings, &nats, &mut out)
        .await
        .expect("the demo runs");
    let shown = String::from_utf8_lossy(&out).into_owned();

    assert_eq!(
        report.load.errors(),
        0,
        "no request failed: {:?}",
        report.load
    );
    let sizes: Vec<u32> = report.samples.iter().map(|s| s.members).collect();
    assert_eq!(sizes.first(), Some(&1), "starts at min: {sizes:?}");
    let peak_at = sizes
        .iter()
        .position(|&n| n == report.peak_size())
        .expect("a peak");
    assert!(
        report.peak_size() >= 3,
        "scaled up under the ramp: {sizes:?}"
    );
    let trough_at = sizes[peak_at..]
        .iter()
        .position(|&n| n == 1)
        .map(|i| i + peak_at)
        .unwrap_or_else(|| panic!("scaled back down to min after the ramp: {sizes:?}\n{shown}"));
    assert!(
        sizes[trough_at..].iter().any(|&n| n >= 2),
        "grew again on the second rise: {sizes:?}\n{shown}"
    );
    assert!(
        !report.reallocated().is_empty(),
        "a server returned to the pool was allocated again: allocations {:?}, releases {:?}",
        report.allocations,
        report.releases
    );

    // The live view said what happened, as it happened.
    assert!(shown.contains("monitor decided allocate"), "{shown}");
    assert!(shown.contains("monitor decided release"), "{shown}");
    assert!(shown.contains("returned backend-"), "{shown}");

    // The plot holds the cluster-size series it was drawn from.
    let svg = std::fs::read_to_string(&report.plot).expect("plot written");
    let plotted: Vec<u32> = read_series(&svg, "cluster-size")
        .expect("cluster-size series")
        .into_iter()
        .map(|v| v.expect("known size") as u32)
        .collect();
    assert_eq!(plotted, sizes);
    assert!(read_series(&svg, "offered-load").is_some());
    assert!(read_series(&svg, "utilisation").is_some());
    assert!(svg.contains(r#"data-action="release""#), "decisions marked");
    let csv = std::fs::read_to_string(&report.csv).expect("csv written");
    assert_eq!(csv.lines().count(), sizes.len() + 1);
}
