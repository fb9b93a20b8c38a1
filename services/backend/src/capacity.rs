//! What one sample server can carry: `concurrency` requests worked on at
//! once, a FIFO queue of at most `queue_limit` behind them, and the
//! service time each request is given. Latency is then queueing plus
//! service, and a server past its capacity shows it as a real one does:
//! first as waiting, then as refusals.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use headroom_shared::config::{BackendConfig, ServiceTime};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// No draw is longer than this many times the mean: a lognormal's tail
/// is long, and one request held for minutes would measure nothing.
const LONGEST_DRAW: f64 = 20.0;

/// The slots, the queue and the service-time draws of one server.
#[derive(Debug)]
pub struct Capacity {
    /// `None` when concurrency is unlimited.
    slots: Option<Arc<Semaphore>>,
    concurrency: usize,
    queue_limit: usize,
    busy: AtomicU64,
    queued: AtomicU64,
    rejected: AtomicU64,
    service_time: ServiceTime,
    sigma: f64,
    rng: Mutex<StdRng>,
}

/// A slot held while a request is worked on; it frees the slot when
/// dropped, so a request cut off by its client frees it too.
#[derive(Debug)]
pub struct Slot<'a> {
    capacity: &'a Capacity,
    _permit: Option<OwnedSemaphorePermit>,
}

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        self.capacity.busy.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Counts a request as queued until it gets its slot or is abandoned.
struct Waiting<'a>(&'a AtomicU64);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Capacity {
    pub fn new(config: &BackendConfig) -> Self {
        // The name varies the draws between servers that share a seed.
        let name_hash = headroom_shared::hash::fnv1a(config.name.as_bytes());
        Self {
            slots: (config.concurrency > 0).then(|| Arc::new(Semaphore::new(config.concurrency))),
            concurrency: config.concurrency,
            queue_limit: config.queue_limit,
            busy: AtomicU64::new(0),
            queued: AtomicU64::new(0),
            rejected: AtomicU64::new(0),
            service_time: config.service_time,
            sigma: config.service_sigma,
            rng: Mutex::new(StdRng::seed_from_u64(config.seed ^ name_hash)),
        }
    }

    /// Waits for a slot, in arrival order; `None` at once when the queue
    /// is full (the request is refused, and counted).
    pub async fn admit(&self) -> Option<Slot<'_>> {
        let Some(slots) = &self.slots else {
            self.busy.fetch_add(1, Ordering::Relaxed);
            return Some(Slot {
                capacity: self,
                _permit: None,
            });
        };
        // A free slot is taken only when nobody waits: tokio's semaphore
        // is fair, so a newcomer never overtakes the queue.
        let permit = match slots.clone().try_acquire_owned() {
            Ok(permit) => permit,
            Err(_) => {
                if self.queued.fetch_add(1, Ordering::Relaxed) >= self.queue_limit as u64 {
                    self.queued.fetch_sub(1, Ordering::Relaxed);
                    self.rejected.fetch_add(1, Ordering::Relaxed);
                    return None;
                }
                let _waiting = Waiting(&self.queued);
                slots.clone().acquire_owned().await.ok()?
            }
        };
        self.busy.fetch_add(1, Ordering::Relaxed);
        Some(Slot {
            capacity: self,
            _permit: Some(permit),
        })
    }

    /// A service time around `mean`, as configured.
    pub fn draw(&self, mean: Duration) -> Duration {
        if mean.is_zero() || self.service_time == ServiceTime::Fixed {
            return mean;
        }
        let (u1, u2): (f64, f64) = match self.rng.lock() {
            Ok(mut rng) => (rng.random(), rng.random()),
            Err(_) => return mean,
        };
        // 1 - u is in (0, 1]: its log is finite.
        let factor = match self.service_time {
            ServiceTime::Fixed => 1.0,
            ServiceTime::Exponential => -(1.0 - u1).ln(),
            ServiceTime::Lognormal => {
                let z = (-2.0 * (1.0 - u1).ln()).sqrt() * (std::f64::consts::TAU * u2).cos();
                // exp(mu + sigma z) with mu chosen so that the mean is 1.
                (self.sigma * z - self.sigma * self.sigma / 2.0).exp()
            }
        };
        mean.mul_f64(factor.clamp(0.0, LONGEST_DRAW))
    }

    /// Requests being worked on now.
    pub fn busy(&self) -> u64 {
        self.busy.load(Ordering::Relaxed)
    }

    /// Requests waiting for a slot now.
    pub fn queued(&self) -> u64 {
        self.queued.load(Ordering::Relaxed)
    }

    /// Requests refused so far because the queue was full.
    pub fn rejected(&self) -> u64 {
        self.rejected.load(Ordering::Relaxed)
    }

    /// The slots (0: unlimited).
    pub fn concurrency(&self) -> usize {
        self.concurrency
    }

    pub fn queue_limit(&self) -> usize {
        self.queue_limit
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(service_time: ServiceTime) -> BackendConfig {
        BackendConfig {
            name: "b".into(),
            service_time,
            ..BackendConfig::default()
        }
    }

    #[test]
    fn draws_have_the_cost_as_mean_and_repeat_with_the_seed() {
        let mean = Duration::from_millis(100);
        for kind in [ServiceTime::Exponential, ServiceTime::Lognormal] {
            let (a, b) = (Capacity::new(&config(kind)), Capacity::new(&config(kind)));
            let draws: Vec<f64> = (0..20_000).map(|_| a.draw(mean).as_secs_f64()).collect();
            let again: Vec<f64> = (0..20_000).map(|_| b.draw(mean).as_secs_f64()).collect();
            assert_eq!(draws, again, "{kind:?}: the same seed, the same draws");
            let m = draws.iter().sum::<f64>() / draws.len() as f64;
            assert!((m - 0.1).abs() < 0.004, "{kind:?}: mean {m}");
            assert!(draws.iter().any(|d| *d > 0.2), "{kind:?} varies");
        }
        let fixed = Capacity::new(&config(ServiceTime::Fixed));
        assert_eq!(fixed.draw(mean), mean);
    }

    #[tokio::test]
    async fn a_full_queue_refuses_and_a_freed_slot_goes_to_the_first_waiting() {
        let capacity = Arc::new(Capacity::new(&BackendConfig {
            concurrency: 1,
            queue_limit: 1,
            ..config(ServiceTime::Fixed)
        }));
        let first = capacity.admit().await.expect("a free slot");
        let waiting = {
            let capacity = capacity.clone();
            tokio::spawn(async move { capacity.admit().await.is_some() })
        };
        tokio::time::timeout(Duration::from_secs(5), async {
            while capacity.queued() == 0 {
                tokio::task::yield_now().await;
            }
        })
        .await
        .expect("queued");
        assert!(capacity.admit().await.is_none(), "the queue is full");
        assert_eq!(
            (capacity.busy(), capacity.queued(), capacity.rejected()),
            (1, 1, 1)
        );
        drop(first);
        assert!(waiting.await.expect("task"), "the waiting one got the slot");
        assert_eq!((capacity.busy(), capacity.queued()), (0, 0));
    }
}
