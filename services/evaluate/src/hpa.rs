//! The baseline users run: the Kubernetes Horizontal Pod Autoscaler's
//! default algorithm, as kubernetes/website documents it
//! (horizontal-pod-autoscale.md), over the utilisation the monitor reads.
//!
//! Every sync period:
//! - ratio = mean utilisation of the ready members / target; within the
//!   tolerance (10 %) of 1, nothing changes;
//! - members without a fresh reading count as using 100 % of the target
//!   when the ratio says scale down, and 0 % when it says scale up, as do
//!   joining (not yet ready) members on a scale-up; if that reverses the
//!   direction or lands within the tolerance, nothing changes;
//! - desired = ceil(current x ratio);
//! - a scale-up is at most the larger of doubling and +4 a period (the
//!   default `behavior`: 100 % or 4 pods per 15 s, `selectPolicy: Max`);
//! - a scale-down takes the highest recommendation of the stabilisation
//!   window (300 s by default): the default scale-down policy (100 % per
//!   15 s) limits nothing more.
//!
//! The driver that feeds it reports and sends its requests lives in
//! [`crate::run`]; this module is the arithmetic, tested on its own.

use std::collections::VecDeque;
use std::time::Duration;

use crate::compressed;

/// The HPA's knobs, with its time constants already divided by the
/// speed-up.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct HpaParams {
    pub sync_period: Duration,
    pub tolerance: f64,
    pub target: f64,
    pub stabilisation: Duration,
    pub min: u32,
    pub max: u32,
}

impl HpaParams {
    /// Kubernetes' defaults (15 s, 10 %, 300 s), [`compressed`] as
    /// Headroom's are: the sync period to no less than one report (a real
    /// HPA's 15 s is one fresh reading from metrics-server), the
    /// stabilisation window to no less than four, the floor of Headroom's
    /// release window. Divided by the speed-up alone, the 300 s window is
    /// 0.42 s at x720, less than one report: no stabilisation at all.
    pub fn defaults(target: f64, min: u32, max: u32, speedup: f64, interval: Duration) -> Self {
        Self {
            sync_period: compressed(Duration::from_secs(15), speedup, interval, 1),
            tolerance: 0.1,
            target,
            stabilisation: compressed(Duration::from_secs(300), speedup, interval, 4),
            min,
            max,
        }
    }
}

/// What one sync period sees of the members.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Observation {
    /// Utilisation of each ready member with a fresh reading.
    pub ready: Vec<f64>,
    /// Ready members without a fresh reading.
    pub missing: u32,
    /// Members joining (not yet ready).
    pub unready: u32,
}

impl Observation {
    /// The current replica count: every member counted.
    pub fn current(&self) -> u32 {
        u32::try_from(self.ready.len()).unwrap_or(u32::MAX) + self.missing + self.unready
    }
}

/// The autoscaler's memory: its recent recommendations.
#[derive(Debug, Clone)]
pub struct Hpa {
    pub params: HpaParams,
    /// (when, recommendation), oldest first, within the window.
    recommendations: VecDeque<(Duration, u32)>,
}

impl Hpa {
    pub fn new(params: HpaParams) -> Self {
        Self {
            params,
            recommendations: VecDeque::new(),
        }
    }

    /// The unstabilised recommendation for `seen`: the documented
    /// formula with its missing-metrics rules and tolerance.
    pub fn recommend(&self, seen: &Observation) -> u32 {
        let current = seen.current();
        if seen.ready.is_empty() {
            return current;
        }
        let p = &self.params;
        let ready = seen.ready.len() as f64;
        let ratio = seen.ready.iter().sum::<f64>() / ready / p.target;
        if (ratio - 1.0).abs() <= p.tolerance {
            return current;
        }
        let ratio = if seen.missing > 0 || (ratio > 1.0 && seen.unready > 0) {
            // Missing readings are 100 % of target on the way down and 0 %
            // on the way up; unready members are 0 % on the way up (and
            // left out on the way down).
            let (extra, assumed) = if ratio < 1.0 {
                (f64::from(seen.missing), p.target)
            } else {
                (f64::from(seen.missing + seen.unready), 0.0)
            };
            let total = seen.ready.iter().sum::<f64>() + extra * assumed;
            let again = total / (ready + extra) / p.target;
            if (again - 1.0).abs() <= p.tolerance || (again > 1.0) != (ratio > 1.0) {
                return current;
            }
            again
        } else {
            ratio
        };
        (f64::from(current) * ratio - 1e-9).ceil().max(0.0) as u32
    }

    /// One sync period at `now` (time since the start): the size to set.
    pub fn desired(&mut self, now: Duration, seen: &Observation) -> u32 {
        let p = self.params;
        let current = seen.current();
        let recommendation = self.recommend(seen).clamp(p.min, p.max.max(p.min));
        self.recommendations.push_back((now, recommendation));
        while self
            .recommendations
            .front()
            .is_some_and(|(at, _)| now.saturating_sub(*at) > p.stabilisation)
        {
            self.recommendations.pop_front();
        }
        let stabilised = self
            .recommendations
            .iter()
            .map(|(_, r)| *r)
            .max()
            .unwrap_or(recommendation);
        let desired = if recommendation > current {
            recommendation.min(current.saturating_mul(2).max(current + 4))
        } else {
            // Down only as far as the window's highest recommendation
            // allows, and never up on its account.
            stabilised.min(current.max(recommendation))
        };
        desired.clamp(p.min, p.max.max(p.min))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hpa() -> Hpa {
        Hpa::new(HpaParams {
            sync_period: Duration::from_secs(15),
            tolerance: 0.1,
            target: 0.6,
            stabilisation: Duration::from_secs(300),
            min: 1,
            max: 20,
        })
    }

    fn seen(ready: &[f64], missing: u32, unready: u32) -> Observation {
        Observation {
            ready: ready.to_vec(),
            missing,
            unready,
        }
    }

    #[test]
    fn its_time_constants_are_compressed_as_headroom_s_are() {
        let reports = Duration::from_millis(500);
        // x10: 15 s and 300 s divided, both past the floors.
        let p = HpaParams::defaults(0.6, 1, 20, 10.0, reports);
        assert_eq!(p.sync_period, Duration::from_millis(1_500));
        assert_eq!(p.stabilisation, Duration::from_secs(30));
        // x720: 21 ms and 417 ms divided; one report and four at least,
        // the floors of Headroom's evaluation and release window.
        let p = HpaParams::defaults(0.6, 1, 20, 720.0, reports);
        assert_eq!(p.sync_period, reports);
        assert_eq!(p.stabilisation, Duration::from_secs(2));
        let headroom = crate::policy(20, 720.0, reports, 1000.0).scaling;
        assert_eq!(headroom.release_sustain_ms, 2_000);
    }

    #[test]
    fn recommendations_follow_the_documented_formula() {
        let h = hpa();
        // ceil(2 x 0.9 / 0.6) = 3.
        assert_eq!(h.recommend(&seen(&[0.9, 0.9], 0, 0)), 3);
        // ratio 0.65 / 0.6 = 1.083: within the 10 % tolerance.
        assert_eq!(h.recommend(&seen(&[0.65, 0.65, 0.65], 0, 0)), 3);
        // ceil(4 x 0.15 / 0.6) = 1.
        assert_eq!(h.recommend(&seen(&[0.1, 0.2, 0.1, 0.2], 0, 0)), 1);
        // Up with one joining: (1.2 + 1.2 + 0) / 3 / 0.6 = 1.333, and
        // ceil(3 x 1.333) = 4.
        assert_eq!(h.recommend(&seen(&[1.2, 1.2], 0, 1)), 4);
        // Down with one missing: (0.3 + 0.6) / 2 / 0.6 = 0.75, and
        // ceil(2 x 0.75) = 2: no change.
        assert_eq!(h.recommend(&seen(&[0.3], 1, 0)), 2);
        // Down with one missing, still down: (0.12 + 0.12 + 0.12 + 0.6)
        // / 4 / 0.6 = 0.4, ceil(4 x 0.4) = 2.
        assert_eq!(h.recommend(&seen(&[0.12, 0.12, 0.12], 1, 0)), 2);
        // Up reversed by the joining ones: (0.7 + 0 + 0) / 3 / 0.6 = 0.39.
        assert_eq!(h.recommend(&seen(&[0.7], 0, 2)), 3);
        // Nothing ready: nothing to go on.
        assert_eq!(h.recommend(&seen(&[], 2, 1)), 3);
    }

    #[test]
    fn scale_up_is_limited_and_scale_down_waits_for_the_window() {
        let mut h = hpa();
        let at = |s: u64| Duration::from_secs(s);
        // 1 member at 4.0: the formula says ceil(4.0 / 0.6) = 7, the limit
        // max(2, 1 + 4) = 5.
        assert_eq!(h.desired(at(0), &seen(&[4.0], 0, 0)), 5);
        // 5 at 1.2 each: 10, within max(10, 9).
        assert_eq!(h.desired(at(15), &seen(&[1.2; 5], 0, 0)), 10);
        // 10 at 0.3: the formula says 5, but 10 was recommended 15 s ago.
        assert_eq!(h.desired(at(30), &seen(&[0.3; 10], 0, 0)), 10);
        // Still 0.3 each: the window holds 10 until 15 + 300 s.
        assert_eq!(h.desired(at(300), &seen(&[0.3; 10], 0, 0)), 10);
        // Past it: the highest of the window is now the 5s since 30 s.
        assert_eq!(h.desired(at(316), &seen(&[0.3; 10], 0, 0)), 5);
        // The bounds hold whatever the formula says.
        assert_eq!(h.desired(at(331), &seen(&[9.0; 5], 0, 0)), 10);
        let mut capped = hpa();
        capped.params.max = 6;
        assert_eq!(capped.desired(at(0), &seen(&[3.0; 4], 0, 0)), 6);
    }
}
