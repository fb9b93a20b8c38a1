//! Test fixtures: a real nats-server with JetStream per test
//! (`headroom-local-nats`, so the demo and the tests start it the same way),
//! and helpers that keep every wait bounded; and what the benchmarks and
//! long tests share to read their settings and print their figures.

pub use headroom_local_nats::{
    eventually, nats_server_binary, LocalNatsError as FixtureError, NatsServer, PINNED_VERSION,
};

pub mod smuggling;

/// A whole number from the environment variable `name`, or `default`.
pub fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// p50, p99 and max of `samples` (sorted in place), nearest rank.
///
/// # Panics
/// When `samples` is empty.
pub fn percentiles(samples: &mut [f64]) -> (f64, f64, f64) {
    samples.sort_by(f64::total_cmp);
    let at = |q: f64| {
        let i = ((q * samples.len() as f64).ceil() as usize).clamp(1, samples.len()) - 1;
        samples[i]
    };
    (at(0.50), at(0.99), at(1.0))
}

/// Prints one line of a benchmark's table: `name`, then the p50, p99 and
/// maximum of `samples` (milliseconds).
///
/// # Panics
/// When `samples` is empty.
pub fn print_row(name: &str, samples: &mut [f64]) {
    let (p50, p99, max) = percentiles(samples);
    println!("  {name:<44} p50 {p50:>8.1} ms  p99 {p99:>8.1} ms  max {max:>8.1} ms");
}

/// A counter or gauge of a service's `/metrics` (its [`Ops`]), summed over
/// the series whose labels start with `labels` (`""` for all of them).
///
/// [`Ops`]: headroom_shared::ops::Ops
pub fn metric(ops: &headroom_shared::ops::Ops, name: &str, labels: &str) -> u64 {
    ops.render()
        .lines()
        .filter(|line| {
            line.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with(labels) && rest.starts_with(['{', ' ']))
        })
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

/// CPU time (user and system) that process `pid`, or this one, has used,
/// in seconds; 0 when it cannot be read.
pub fn cpu_seconds(pid: Option<u32>) -> f64 {
    let path = pid.map_or_else(
        || "/proc/self/stat".to_owned(),
        |p| format!("/proc/{p}/stat"),
    );
    let Ok(stat) = std::fs::read_to_string(path) else {
        return 0.0;
    };
    // The command may hold spaces; the fields after its closing
    // parenthesis are fixed: utime and stime are the 12th and 13th.
    let Some((_, fields)) = stat.rsplit_once(')') else {
        return 0.0;
    };
    let ticks: u64 = fields
        .split_whitespace()
        .skip(11)
        .take(2)
        .filter_map(|f| f.parse::<u64>().ok())
        .sum();
    // USER_HZ, 100 on every Linux this runs on.
    ticks as f64 / 100.0
}

/// Resident memory of this process, in bytes.
pub fn rss() -> u64 {
    std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| {
            s.split_whitespace()
                .nth(1)
                .and_then(|p| p.parse::<u64>().ok())
        })
        .map_or(0, |pages| pages * 4096)
}

/// A policy for scaling from zero and back without agents: `min_size` 0,
/// the front-ends' in-flight counts as the load (no CPU reports), silence
/// not held against a member within a test, short cooldowns, and the last
/// member going after `idle_to_zero_ms` of no request.
pub fn zero_policy(max_size: u32, idle_to_zero_ms: u64) -> headroom_shared::records::ClusterPolicy {
    use headroom_shared::records::{ClusterPolicy, Measures};
    let mut policy = ClusterPolicy {
        min_size: 0,
        max_size,
        drain_timeout_ms: 2_000,
        ..ClusterPolicy::default()
    };
    let s = &mut policy.scaling;
    s.measures = Measures {
        cpu: 0.0,
        in_flight: 1.0,
        ..Measures::default()
    };
    s.silent_after_ms = 600_000;
    s.release_sustain_ms = 2_000;
    s.cooldown_down_ms = 1_000;
    s.cooldown_up_ms = 1_000;
    s.idle_to_zero_ms = idle_to_zero_ms;
    policy
}
