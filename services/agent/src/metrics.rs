//! What the agent exposes on `/metrics`: reports sent, the application's
//! stats endpoint failing, assignments answered and hooks run.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use headroom_shared::ops::{CounterVec, Ops};

#[derive(Debug)]
pub struct Metrics {
    /// Reports published, by where the server was (member of a cluster or
    /// free in the pool).
    pub reports: CounterVec,
    pub reports_failed: AtomicU64,
    pub app_stats_failed: AtomicU64,
    pub hooks: CounterVec,
    pub assignments: CounterVec,
}

impl Default for Metrics {
    fn default() -> Self {
        Self {
            reports: CounterVec::new(
                "headroom_agent_reports_total",
                "Performance reports published, by placement (member or pool).",
                &["placement"],
            ),
            reports_failed: AtomicU64::new(0),
            app_stats_failed: AtomicU64::new(0),
            hooks: CounterVec::new(
                "headroom_agent_hooks_total",
                "Allocate and release hooks run, by event and outcome.",
                &["event", "outcome"],
            ),
            assignments: CounterVec::new(
                "headroom_agent_assignments_total",
                "Assignment notices received from the allocator, by kind.",
                &["kind"],
            ),
        }
    }
}

impl Metrics {
    pub fn register(self: &Arc<Self>, ops: &Ops) {
        let metrics = self.clone();
        ops.register(move |out| {
            metrics.reports.write(out);
            out.counter(
                "headroom_agent_reports_failed_total",
                "Reports that could not be published or were invalid.",
                &[],
                metrics.reports_failed.load(Ordering::Relaxed),
            );
            out.counter(
                "headroom_agent_app_stats_failed_total",
                "Times the application's stats endpoint did not answer usefully.",
                &[],
                metrics.app_stats_failed.load(Ordering::Relaxed),
            );
            metrics.hooks.write(out);
            metrics.assignments.write(out);
        });
    }
}
