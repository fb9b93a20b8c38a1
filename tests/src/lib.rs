//! Test fixtures: a real nats-server with JetStream per test (the shared
//! crate's local server, so the demo and the tests start it the same way),
//! and helpers that keep every wait bounded; and what the benchmarks and
//! long tests share to read their settings and print their figures.

pub use headroom_shared::local::{
    eventually, nats_server_binary, LocalNatsError as FixtureError, NatsServer, PINNED_VERSION,
};

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
