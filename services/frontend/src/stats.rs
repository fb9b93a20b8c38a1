//! Latency percentiles without keeping samples: a fixed histogram of
//! atomic counters, read and reset once per report interval.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use headroom_shared::ops::{latency_bucket, LATENCY_BOUNDS_US as BOUNDS_US};

#[derive(Debug, Default)]
pub struct Latency {
    buckets: [AtomicU64; BOUNDS_US.len()],
}

impl Latency {
    pub fn record(&self, elapsed: Duration) {
        self.buckets[latency_bucket(elapsed)].fetch_add(1, Ordering::Relaxed);
    }

    /// The count and the p50 and p99 (bucket upper bounds, in ms) since
    /// the last call, which starts a new interval.
    pub fn take(&self) -> (u64, Option<f64>, Option<f64>) {
        let counts: Vec<u64> = self
            .buckets
            .iter()
            .map(|b| b.swap(0, Ordering::Relaxed))
            .collect();
        let total: u64 = counts.iter().sum();
        if total == 0 {
            return (0, None, None);
        }
        let quantile = |q: f64| {
            let rank = (q * total as f64).ceil().max(1.0) as u64;
            let mut seen = 0;
            for (i, c) in counts.iter().enumerate() {
                seen += c;
                if seen >= rank {
                    let bound = if i + 1 == BOUNDS_US.len() {
                        BOUNDS_US[i - 1] * 2
                    } else {
                        BOUNDS_US[i]
                    };
                    return bound as f64 / 1000.0;
                }
            }
            BOUNDS_US[BOUNDS_US.len() - 2] as f64 / 1000.0
        };
        (total, Some(quantile(0.5)), Some(quantile(0.99)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_come_from_the_buckets() {
        let l = Latency::default();
        for _ in 0..98 {
            l.record(Duration::from_micros(800));
        }
        l.record(Duration::from_millis(40));
        l.record(Duration::from_millis(40));
        assert_eq!(l.take(), (100, Some(1.0), Some(50.0)));
        assert_eq!(l.take(), (0, None, None), "a new interval");
    }
}
