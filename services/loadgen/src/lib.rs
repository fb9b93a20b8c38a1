//! A load generator for demonstrations and tests: it plays a profile of
//! requests per second against an HTTP endpoint, open loop (requests are
//! sent on schedule whether or not earlier ones have answered, as real
//! clients do), shows progress each second, and ends with a summary of
//! latencies and errors.
//!
//! A profile is a list of steps, `ramp:0-200:10s,hold:200:20s,spike:800:5s,
//! ramp:200-0:10s`, or a file with one requests-per-second value per line
//! (one line per second), played at a chosen speed-up.

use std::collections::BTreeMap;
use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde::Serialize;

/// Requests per second over time, in steps of `step`.
#[derive(Debug, Clone, PartialEq)]
pub struct Profile {
    /// The rate for each step, in order.
    pub rates: Vec<f64>,
    pub step: Duration,
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ProfileError {
    #[error("profile step {0:?}: expected ramp:A-B:Ns, hold:R:Ns or spike:R:Ns")]
    Step(String),
    #[error("profile line {line}: {value:?} is not a rate (requests per second, 0 or more)")]
    Line { line: usize, value: String },
    #[error("the speed-up must be above 0")]
    Speedup,
    #[error("profile steps {0:?} and before: more than {MAX_STEPS} seconds in all")]
    TooLong(String),
}

/// Most one-second steps a `ramp:`/`hold:` profile may spell out (about
/// 115 days; 80 MB of rates). A few characters could otherwise ask for
/// more memory than the machine has (found by the `load_profile` fuzz
/// target: `ramp:0-102:466888888888888888s`).
pub const MAX_STEPS: u64 = 10_000_000;

fn seconds(text: &str) -> Option<u64> {
    text.strip_suffix('s')?.parse().ok()
}

fn rate(text: &str) -> Option<f64> {
    text.parse::<f64>()
        .ok()
        .filter(|r| r.is_finite() && *r >= 0.0)
}

impl Profile {
    /// Parses `ramp:A-B:Ns`, `hold:R:Ns` and `spike:R:Ns` steps, comma
    /// separated, into one rate per second.
    ///
    /// # Errors
    /// The first step that is none of these.
    pub fn parse(spec: &str) -> Result<Self, ProfileError> {
        let mut rates = Vec::new();
        for step in spec.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            let bad = || ProfileError::Step(step.to_owned());
            let parts: Vec<&str> = step.split(':').collect();
            let fits = |n: u64| {
                let total = (rates.len() as u64).saturating_add(n);
                let fits = total <= MAX_STEPS;
                fits.then_some(n)
                    .ok_or_else(|| ProfileError::TooLong(step.to_owned()))
            };
            match parts.as_slice() {
                ["ramp", range, duration] => {
                    let (from, to) = range.split_once('-').ok_or_else(bad)?;
                    let (from, to) = (rate(from).ok_or_else(bad)?, rate(to).ok_or_else(bad)?);
                    let n = seconds(duration).filter(|n| *n > 0).ok_or_else(bad)?;
                    let n = fits(n)?;
                    for i in 0..n {
                        rates.push(from + (to - from) * (i as f64 + 0.5) / n as f64);
                    }
                }
                ["hold" | "spike", r, duration] => {
                    let r = rate(r).ok_or_else(bad)?;
                    let n = fits(seconds(duration).ok_or_else(bad)?)?;
                    rates.extend(std::iter::repeat_n(r, usize::try_from(n).unwrap_or(0)));
                }
                _ => return Err(bad()),
            }
        }
        Ok(Self {
            rates,
            step: Duration::from_secs(1),
        })
    }

    /// One rate per line (blank lines and `#` comments skipped), each line
    /// lasting one second divided by `speedup`.
    ///
    /// # Errors
    /// A line that is not a rate, or a speed-up that is not positive.
    pub fn from_lines(text: &str, speedup: f64) -> Result<Self, ProfileError> {
        if !(speedup.is_finite() && speedup > 0.0) {
            return Err(ProfileError::Speedup);
        }
        let mut rates = Vec::new();
        for (i, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            rates.push(rate(line).ok_or_else(|| ProfileError::Line {
                line: i + 1,
                value: line.to_owned(),
            })?);
        }
        Ok(Self {
            rates,
            step: Duration::from_secs_f64(1.0 / speedup),
        })
    }

    pub fn duration(&self) -> Duration {
        self.step * u32::try_from(self.rates.len()).unwrap_or(u32::MAX)
    }
}

/// What a run did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Summary {
    pub sent: u64,
    pub ok: u64,
    /// Answers by status code, other than 2xx.
    pub statuses: BTreeMap<u16, u64>,
    /// Requests that got no answer (connection refused, reset, timeout).
    pub failed: u64,
    /// Requests not sent because `max_in_flight` were already waiting.
    pub skipped: u64,
    pub seconds: f64,
    pub latency_ms: Percentiles,
    /// What happened to the requests sent in each step of the profile.
    #[serde(skip)]
    pub steps: Vec<StepTally>,
}

/// The requests sent in one step of the profile, and their answers.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct StepTally {
    pub sent: u64,
    pub ok: u64,
    /// Answers by status code, other than 2xx.
    pub statuses: BTreeMap<u16, u64>,
    /// No answer (connection refused, reset, timeout).
    pub failed: u64,
    /// Not sent: `max_in_flight` were already waiting.
    pub skipped: u64,
    /// Latency of each answered 2xx, in microseconds, in no order.
    pub latencies_us: Vec<u32>,
}

impl StepTally {
    /// Requests that did not get a 2xx, the skipped ones included.
    pub fn errors(&self) -> u64 {
        self.failed + self.skipped + self.statuses.values().sum::<u64>()
    }
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Percentiles {
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub max: f64,
}

impl Summary {
    pub fn errors(&self) -> u64 {
        self.failed + self.statuses.values().sum::<u64>()
    }
}

/// Where and how to send.
#[derive(Debug, Clone)]
pub struct Target {
    /// `http://host:port`.
    pub base: String,
    /// Paths used in turn.
    pub paths: Vec<String>,
    pub timeout: Duration,
    pub max_in_flight: usize,
}

#[derive(Default)]
struct Tally {
    ok: u64,
    statuses: BTreeMap<u16, u64>,
    failed: u64,
    latencies_us: Vec<u32>,
    steps: Vec<StepTally>,
}

impl Tally {
    fn record(&mut self, step: usize, answer: Option<http::StatusCode>, elapsed_us: u32) {
        let at = self.steps.get_mut(step);
        match answer {
            Some(s) if s.is_success() => {
                self.ok += 1;
                self.latencies_us.push(elapsed_us);
                if let Some(at) = at {
                    at.ok += 1;
                    at.latencies_us.push(elapsed_us);
                }
            }
            Some(s) => {
                *self.statuses.entry(s.as_u16()).or_default() += 1;
                if let Some(at) = at {
                    *at.statuses.entry(s.as_u16()).or_default() += 1;
                }
            }
            None => {
                self.failed += 1;
                if let Some(at) = at {
                    at.failed += 1;
                }
            }
        }
    }
}

/// Where progress goes: a line per step, or one line redrawn in place
/// (for a terminal).
pub struct Progress<'a> {
    pub out: &'a mut (dyn Write + Send),
    pub redraw: bool,
}

/// A bar of `width` cells, `done` of `total` filled.
fn bar(done: usize, total: usize, width: usize) -> String {
    let filled = (done * width)
        .checked_div(total)
        .unwrap_or(width)
        .min(width);
    format!("[{}{}]", "#".repeat(filled), "-".repeat(width - filled))
}

/// Plays `profile` against `target`; with `progress`, writes a line per
/// step (the rate asked, what was sent and answered, p99 so far).
pub async fn run(
    profile: &Profile,
    target: &Target,
    mut progress: Option<Progress<'_>>,
) -> Summary {
    let client: Client<HttpConnector, Empty<Bytes>> =
        Client::builder(TokioExecutor::new()).build(HttpConnector::new());
    let tally = Arc::new(Mutex::new(Tally {
        steps: vec![StepTally::default(); profile.rates.len()],
        ..Tally::default()
    }));
    let in_flight = Arc::new(tokio::sync::Semaphore::new(target.max_in_flight.max(1)));
    let started = Instant::now();
    let mut sent = 0u64;
    let mut skipped = 0u64;
    // (sent, skipped) of each step, kept by the sending loop alone: the
    // tally's lock is for the answers, not taken once more per request.
    let mut step_counts = vec![(0u64, 0u64); profile.rates.len()];
    let mut tasks = tokio::task::JoinSet::new();
    // Spread each step's requests over the step, in slices of about a
    // millisecond that divide it exactly (so a step lasts what it says):
    // at thousands a second, coarser slices send bursts of hundreds at
    // once, and the latencies measure the burst's queue, not the server.
    let slices = (profile.step.as_secs_f64() / 1e-3).round().max(1.0);
    let slice = profile.step.div_f64(slices).max(Duration::from_micros(1));
    let mut due = 0.0f64;
    let mut ticker = tokio::time::interval(slice);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    for (step, &rate) in profile.rates.iter().enumerate() {
        let per_slice = rate * profile.step.as_secs_f64() / slices;
        for _ in 0..slices as u64 {
            ticker.tick().await;
            due += per_slice;
            // The tolerance absorbs the rounding of adding a fraction up a
            // thousand times a second (a whole request would go missing).
            while due >= 1.0 - 1e-6 {
                due -= 1.0;
                let Ok(permit) = in_flight.clone().try_acquire_owned() else {
                    skipped += 1;
                    step_counts[step].1 += 1;
                    continue;
                };
                let path =
                    &target.paths[usize::try_from(sent).unwrap_or(0) % target.paths.len().max(1)];
                let uri = format!("{}{}", target.base, path);
                sent += 1;
                step_counts[step].0 += 1;
                let asking = Asking {
                    client: client.clone(),
                    tally: tally.clone(),
                    timeout: target.timeout,
                    step,
                };
                tasks.spawn(asking.ask(uri, permit));
            }
            while tasks.try_join_next().is_some() {}
        }
        if let Some(progress) = progress.as_mut() {
            let steps = (step + 1, profile.rates.len());
            progress.show(&tally, steps, rate, sent);
        }
    }
    while tasks.join_next().await.is_some() {}
    if let Some(Progress { out, redraw: true }) = progress.as_mut() {
        let _ = writeln!(out);
    }
    summarise(&tally, step_counts, sent, skipped, started)
}

/// One request of a step, and where its answer is counted.
struct Asking {
    client: Client<HttpConnector, Empty<Bytes>>,
    tally: Arc<Mutex<Tally>>,
    timeout: Duration,
    step: usize,
}

impl Asking {
    /// Sends the request and counts its answer (or its failure) with its
    /// latency; the permit is held until then.
    async fn ask(self, uri: String, permit: tokio::sync::OwnedSemaphorePermit) {
        let Self {
            client,
            tally,
            timeout,
            step,
        } = self;
        let begun = Instant::now();
        let answer = tokio::time::timeout(timeout, async {
            let request = http::Request::get(uri).body(Empty::new()).ok()?;
            let response = client.request(request).await.ok()?;
            let status = response.status();
            response.into_body().collect().await.ok()?;
            Some(status)
        })
        .await
        .ok()
        .flatten();
        let elapsed = u32::try_from(begun.elapsed().as_micros()).unwrap_or(u32::MAX);
        if let Ok(mut t) = tally.lock() {
            t.record(step, answer, elapsed);
        }
        drop(permit);
    }
}

impl Progress<'_> {
    /// The line for a step done: `steps` is (done, of).
    fn show(&mut self, tally: &Mutex<Tally>, steps: (usize, usize), rate: f64, sent: u64) {
        let Ok(t) = tally.lock() else {
            return;
        };
        let p99 = percentile(&mut t.latencies_us.clone(), 0.99);
        let line = format!(
            "{} {:>4}/{} {:>7.1} req/s asked  sent {sent}  ok {}  errors {}  p99 {p99:.1} ms",
            bar(steps.0, steps.1, 30),
            steps.0,
            steps.1,
            rate,
            t.ok,
            t.failed + t.statuses.values().sum::<u64>()
        );
        let out = &mut self.out;
        let _ = if self.redraw {
            // Back to the line's start and clear it: one line, redrawn.
            write!(out, "\r\x1b[2K{line}")
        } else {
            writeln!(out, "{line}")
        };
        let _ = out.flush();
    }
}

/// The run's summary, from the answers' tally and the sender's counts.
fn summarise(
    tally: &Mutex<Tally>,
    step_counts: Vec<(u64, u64)>,
    sent: u64,
    skipped: u64,
    started: Instant,
) -> Summary {
    let seconds = started.elapsed().as_secs_f64();
    let mut t = tally
        .lock()
        .map(|mut t| std::mem::take(&mut *t))
        .unwrap_or_default();
    for (at, (sent, skipped)) in t.steps.iter_mut().zip(step_counts) {
        (at.sent, at.skipped) = (sent, skipped);
    }
    let latency_ms = Percentiles {
        p50: percentile(&mut t.latencies_us, 0.50),
        p90: percentile(&mut t.latencies_us, 0.90),
        p99: percentile(&mut t.latencies_us, 0.99),
        max: percentile(&mut t.latencies_us, 1.0),
    };
    Summary {
        sent,
        ok: t.ok,
        statuses: t.statuses,
        failed: t.failed,
        skipped,
        seconds,
        latency_ms,
        steps: t.steps,
    }
}

fn percentile(samples: &mut [u32], q: f64) -> f64 {
    percentile_ms(samples, q).unwrap_or(0.0)
}

/// The `q` quantile (nearest rank) of latencies in microseconds, in
/// milliseconds; `None` without any. Sorts `latencies_us`.
pub fn percentile_ms(latencies_us: &mut [u32], q: f64) -> Option<f64> {
    if latencies_us.is_empty() {
        return None;
    }
    latencies_us.sort_unstable();
    let n = latencies_us.len();
    let i = ((q * n as f64).ceil() as usize).clamp(1, n) - 1;
    Some(f64::from(latencies_us[i]) / 1000.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bar_fills_with_the_steps() {
        assert_eq!(bar(0, 4, 8), "[--------]");
        assert_eq!(bar(2, 4, 8), "[####----]");
        assert_eq!(bar(4, 4, 8), "[########]");
        assert_eq!(bar(1, 0, 4), "[####]");
    }

    #[test]
    fn profiles_parse_into_rates_per_second() {
        let p = Profile::parse("ramp:0-100:4s, hold:50:2s, spike:400:1s").expect("profile");
        assert_eq!(p.rates, vec![12.5, 37.5, 62.5, 87.5, 50.0, 50.0, 400.0]);
        assert_eq!(p.duration(), Duration::from_secs(7));
        assert_eq!(
            Profile::parse("hold:fast:2s"),
            Err(ProfileError::Step("hold:fast:2s".into()))
        );
        let f = Profile::from_lines("# rps\n10\n\n20\n", 4.0).expect("lines");
        assert_eq!(f.rates, vec![10.0, 20.0]);
        assert_eq!(f.step, Duration::from_millis(250));
        assert_eq!(
            Profile::from_lines("10\n-3\n", 1.0),
            Err(ProfileError::Line {
                line: 2,
                value: "-3".into()
            })
        );
        assert_eq!(Profile::from_lines("1", 0.0), Err(ProfileError::Speedup));
    }

    /// Found by the `load_profile` fuzz target: a few characters asked for
    /// 466,888,888,888,888,888 steps and the allocation took the machine.
    #[test]
    fn a_profile_longer_than_the_limit_is_an_error_not_an_allocation() {
        let found = "ramp:0-102:466888888888888888s";
        assert_eq!(
            Profile::parse(found),
            Err(ProfileError::TooLong(found.into()))
        );
        let max = format!("hold:1:{MAX_STEPS}s");
        assert_eq!(Profile::parse(&max).map(|p| p.rates.len()), Ok(10_000_000));
        let past = format!("{max}, spike:5:1s");
        assert_eq!(
            Profile::parse(&past),
            Err(ProfileError::TooLong("spike:5:1s".into()))
        );
        assert!(Profile::parse(&format!("hold:1:{}s", u64::MAX)).is_err());
    }
}
