//! The load generator against a real sample backend over HTTP.

use std::time::Duration;

use headroom_loadgen::{run, Profile, Progress, Target};
use tokio_util::sync::CancellationToken;

use crate::frontend::backend;

fn target(addr: std::net::SocketAddr) -> Target {
    Target {
        base: format!("http://{addr}"),
        paths: vec!["/api/a".into(), "/static/b".into()],
        timeout: Duration::from_secs(5),
        max_in_flight: 1024,
    }
}

#[tokio::test]
async fn it_plays_the_profile_and_counts_what_the_backend_saw() {
    let shutdown = CancellationToken::new();
    let b = backend("load-1", &shutdown).await;
    let profile = Profile::parse("ramp:0-100:1s,hold:100:1s").expect("profile");
    let mut progress = Vec::new();
    let summary = run(
        &profile,
        &target(b.addr),
        Some(Progress {
            out: &mut progress,
            redraw: false,
        }),
    )
    .await;
    // 50 in the ramp's one second (its mid-point rate), 100 in the hold.
    assert_eq!(summary.sent, 150, "{summary:?}");
    assert_eq!(summary.ok, b.requests(), "every answer counted once");
    assert_eq!(summary.ok, 150);
    assert_eq!(summary.errors(), 0);
    assert!(summary.seconds >= 1.9, "the schedule is kept: {summary:?}");
    assert!(summary.latency_ms.p99 > 0.0 && summary.latency_ms.p50 <= summary.latency_ms.p99);
    let progress = String::from_utf8(progress).expect("utf-8");
    assert_eq!(progress.lines().count(), 2, "a line per step: {progress}");
    assert!(
        progress.starts_with("[###############---------------]"),
        "{progress}"
    );

    // A file profile at 4x: two lines of 40 and 80 take half a second.
    let fast = Profile::from_lines("40\n80\n", 4.0).expect("profile");
    let summary = run(&fast, &target(b.addr), None).await;
    assert_eq!(summary.sent, 30, "{summary:?}");
    assert!(summary.seconds >= 0.45, "four lines a second: {summary:?}");

    // The backend goes away: failures are counted, not hidden.
    b.stop();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let summary = run(
        &Profile::parse("hold:20:1s").expect("profile"),
        &target(b.addr),
        None,
    )
    .await;
    assert_eq!(summary.failed, 20, "{summary:?}");
    assert_eq!(summary.ok, 0);
    shutdown.cancel();
}

/// CPU time of this process (user + system), from /proc.
fn cpu_time() -> Duration {
    let stat = std::fs::read_to_string("/proc/self/stat").expect("/proc/self/stat");
    // Fields after the command name (which is in parentheses).
    let rest = stat.rsplit_once(')').expect("stat format").1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 =
        fields[11].parse::<u64>().expect("utime") + fields[12].parse::<u64>().expect("stime");
    // The kernel's USER_HZ is 100 on Linux.
    Duration::from_millis(ticks * 10)
}

#[tokio::test]
async fn the_sample_backend_burns_the_cpu_it_is_asked_to() {
    let shutdown = CancellationToken::new();
    let b = backend("cpu-1", &shutdown).await;
    let before = cpu_time();
    let profile = Profile::parse("hold:5:1s").expect("profile");
    let mut t = target(b.addr);
    t.paths = vec!["/api/work?cpu_ms=60".into()];
    let summary = run(&profile, &t, None).await;
    assert_eq!(summary.ok, 5, "{summary:?}");
    let used = cpu_time() - before;
    // 5 × 60 ms of work (the test process hosts the backend).
    assert!(used >= Duration::from_millis(250), "only {used:?} of CPU");
    shutdown.cancel();
}

#[tokio::test]
async fn the_sample_backend_reports_its_mean_concurrency() {
    let shutdown = CancellationToken::new();
    let b = backend("mean-1", &shutdown).await;
    let stats_url = format!("http://{}/stats", b.addr);
    let read = || async {
        headroom_agent::app_stats(&stats_url, Duration::from_secs(2))
            .await
            .expect("stats")
    };
    // The first read opens the window.
    read().await;
    // 50 requests a second, 40 ms each: 2 in flight on average (Little's law).
    let mut t = target(b.addr);
    t.paths = vec!["/api/slow?cost_ms=40".into()];
    let summary = run(&Profile::parse("hold:50:2s").expect("profile"), &t, None).await;
    assert_eq!(summary.ok, 100, "{summary:?}");
    let stats = read().await;
    let mean = stats.in_flight_mean.expect("mean in flight");
    assert!((1.5..=2.5).contains(&mean), "mean in flight {mean}");
    assert_eq!(stats.in_flight, Some(0), "none in flight now");
    shutdown.cancel();
}
