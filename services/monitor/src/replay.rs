//! Recordings and their replay. A recording is JSON lines, one input each,
//! in the order they arrived:
//!
//! ```text
//! {"kind":"cluster","at_ms":0,"cluster":{"id":"web","policy":{...},"members":[...]}}
//! {"kind":"report","at_ms":1000,"subject":"headroom.metrics.web.s1","report":{...}}
//! {"kind":"raw","at_ms":1000,"subject":"...","content_type":"application/msgpack","hex":"81a1..."}
//! {"kind":"cluster_removed","at_ms":5000,"id":"web"}
//! {"kind":"confirmed","at_ms":5200,"request":"allocate-web-4000","confirmed_ms":5150}
//! ```
//!
//! `record` writes what it sees live (a message that does not decode or
//! validate is kept byte for byte as `raw`); people write them by hand too.
//! Replay feeds them through the live ingestion path and evaluates at
//! fixed steps from the first input, so the same file and policy always
//! give the same decision log, byte for byte.

use std::io::{BufRead, Write};

use async_nats::HeaderMap;
use headroom_shared::codec::{Codec, CONTENT_TYPE};
use headroom_shared::records::ClusterPolicy;
use headroom_shared::{ClusterId, RequestId};
use serde::{Deserialize, Serialize};

use crate::decide::{ClusterView, Decider, Decision};
use crate::ingest::{ingest, Counters, CountersSnapshot, Shards};

/// One input of a recording.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Recorded {
    Cluster {
        at_ms: u64,
        cluster: ClusterView,
    },
    ClusterRemoved {
        at_ms: u64,
        id: ClusterId,
    },
    /// Every live front-end followed a request's change: cooldowns run
    /// from `confirmed_ms`.
    Confirmed {
        at_ms: u64,
        request: RequestId,
        confirmed_ms: u64,
    },
    Report {
        at_ms: u64,
        subject: String,
        report: serde_json::Value,
    },
    Raw {
        at_ms: u64,
        subject: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        content_type: Option<String>,
        hex: String,
    },
}

impl Recorded {
    pub fn at_ms(&self) -> u64 {
        match self {
            Recorded::Cluster { at_ms, .. }
            | Recorded::ClusterRemoved { at_ms, .. }
            | Recorded::Confirmed { at_ms, .. }
            | Recorded::Report { at_ms, .. }
            | Recorded::Raw { at_ms, .. } => *at_ms,
        }
    }

    /// How `record` keeps a message: readable when it is a valid report,
    /// byte for byte when it is not.
    pub fn message(at_ms: u64, subject: &str, headers: Option<&HeaderMap>, payload: &[u8]) -> Self {
        let readable = headroom_shared::codec::decode::<headroom_shared::wire::PerformanceReport>(
            headers, payload,
        )
        .ok()
        .filter(|r| r.validate().is_ok())
        .and_then(|r| serde_json::to_value(r).ok());
        match readable {
            Some(report) => Recorded::Report {
                at_ms,
                subject: subject.to_owned(),
                report,
            },
            None => Recorded::Raw {
                at_ms,
                subject: subject.to_owned(),
                content_type: headers
                    .and_then(|h| h.get(CONTENT_TYPE))
                    .map(|v| v.as_str().to_owned()),
                hex: to_hex(payload),
            },
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    #[error("reading the recording: {0}")]
    Read(#[from] std::io::Error),
    #[error("recording line {line}: {reason}")]
    Line { line: usize, reason: String },
    #[error("recording line {line}: input at {at_ms} ms comes before the previous one at {previous_ms} ms")]
    OutOfOrder {
        line: usize,
        at_ms: u64,
        previous_ms: u64,
    },
    #[error("cannot read {path}")]
    Open {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Policy(#[from] headroom_shared::records::PolicyFileError),
}

/// The arguments of a replay, the same for `headroom-monitor replay` and
/// `headroom replay`.
#[derive(Debug, Clone, clap::Args)]
pub struct ReplayArgs {
    /// The recording (JSON lines).
    pub input: std::path::PathBuf,
    /// A cluster policy (TOML or JSON) to use instead of the recorded ones.
    #[arg(long)]
    pub policy: Option<std::path::PathBuf>,
    /// Evaluate every this many milliseconds of recorded time.
    #[arg(long, default_value_t = 1000)]
    pub interval_ms: u64,
}

impl ReplayArgs {
    /// Replays to standard output (a decision per line) and says what it
    /// did on standard error. Offline: no configuration, no NATS.
    ///
    /// # Errors
    /// As [`replay_file`], or standard output cannot be written.
    pub fn run_to_stdout(&self) -> Result<(), ReplayError> {
        let stdout = std::io::stdout();
        let mut out = std::io::BufWriter::new(stdout.lock());
        let summary = replay_file(
            &self.input,
            self.policy.as_deref(),
            self.interval_ms,
            &mut out,
        )?;
        out.flush()?;
        eprintln!(
            "{}",
            serde_json::to_string(&summary).unwrap_or_else(|_| "{}".to_owned())
        );
        Ok(())
    }
}

/// [`replay`] of the recording in `input`, judged by the policy in
/// `policy` when given, decisions written to `log`.
///
/// # Errors
/// As [`replay`] and [`ClusterPolicy::read`], or the file cannot be
/// opened.
pub fn replay_file(
    input: &std::path::Path,
    policy: Option<&std::path::Path>,
    interval_ms: u64,
    log: &mut impl Write,
) -> Result<ReplaySummary, ReplayError> {
    let policy = policy.map(ClusterPolicy::read).transpose()?;
    let file = std::fs::File::open(input).map_err(|source| ReplayError::Open {
        path: input.display().to_string(),
        source,
    })?;
    replay(
        std::io::BufReader::new(file),
        policy.as_ref(),
        interval_ms,
        log,
    )
}

/// What a replay did besides its decisions.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ReplaySummary {
    pub inputs: u64,
    pub evaluations: u64,
    pub decisions: u64,
    pub counters: CountersSnapshot,
}

/// Replays `input`, evaluating every `interval_ms` from its first input,
/// and writes each decision to `log` as one JSON line. With `policy`, every
/// cluster is judged by that policy instead of the recorded one.
///
/// # Errors
/// A line that is not an input, inputs out of time order, or I/O.
pub fn replay(
    input: impl BufRead,
    policy: Option<&ClusterPolicy>,
    interval_ms: u64,
    log: &mut impl Write,
) -> Result<ReplaySummary, ReplayError> {
    let mut replayer = Replayer {
        decider: Decider::new(),
        lone: Shards::default(),
        counters: Counters::default(),
        summary: ReplaySummary::default(),
        policy,
        interval_ms: interval_ms.max(1),
        next_tick: None,
        previous_ms: 0,
    };
    for (n, line) in input.lines().enumerate() {
        let line_no = n + 1;
        let line = line?;
        if line.trim().is_empty() || line.trim_start().starts_with('#') {
            continue;
        }
        let recorded: Recorded = serde_json::from_str(&line).map_err(|e| ReplayError::Line {
            line: line_no,
            reason: e.to_string(),
        })?;
        replayer.take(line_no, recorded, log)?;
    }
    replayer.finish(log)
}

/// A replay in progress: the decider, and when it evaluates next.
struct Replayer<'a> {
    decider: Decider,
    lone: Shards,
    counters: Counters,
    summary: ReplaySummary,
    policy: Option<&'a ClusterPolicy>,
    interval_ms: u64,
    next_tick: Option<u64>,
    previous_ms: u64,
}

impl Replayer<'_> {
    /// One recorded input, after the evaluations due before it.
    fn take(
        &mut self,
        line_no: usize,
        recorded: Recorded,
        log: &mut dyn Write,
    ) -> Result<(), ReplayError> {
        let at_ms = recorded.at_ms();
        if at_ms < self.previous_ms {
            return Err(ReplayError::OutOfOrder {
                line: line_no,
                at_ms,
                previous_ms: self.previous_ms,
            });
        }
        self.previous_ms = at_ms;
        self.next_tick.get_or_insert(at_ms);
        // Inputs at a time are seen by the evaluation at that same time.
        self.evaluate_until(at_ms, log)?;
        self.summary.inputs += 1;
        let (subject, headers, body) = match recorded {
            Recorded::Cluster { mut cluster, .. } => {
                if let Some(policy) = self.policy {
                    cluster.policy = policy.clone();
                }
                self.decider.set_cluster(at_ms, cluster);
                return Ok(());
            }
            Recorded::ClusterRemoved { id, .. } => {
                self.decider.remove_cluster(&id);
                return Ok(());
            }
            Recorded::Confirmed {
                request,
                confirmed_ms,
                ..
            } => {
                self.decider.confirmed(request, confirmed_ms);
                return Ok(());
            }
            message => message_of(line_no, message)?,
        };
        // A rejection is counted; replay goes on, as the live monitor does.
        let _ = ingest(
            &mut self.decider,
            &self.lone,
            &self.counters,
            at_ms,
            &subject,
            headers.as_ref(),
            &body,
        );
        // Decided as the input came, as live (a cluster at zero).
        for decision in self.decider.take_urgent() {
            write_decision(log, &decision)?;
            self.summary.decisions += 1;
            self.counters
                .decisions
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        Ok(())
    }

    /// Evaluates at every step before `until_ms`.
    fn evaluate_until(&mut self, until_ms: u64, log: &mut dyn Write) -> std::io::Result<()> {
        while let Some(at) = self.next_tick.filter(|&t| t < until_ms) {
            for decision in self.decider.tick(at) {
                write_decision(log, &decision)?;
                self.summary.decisions += 1;
                self.counters
                    .decisions
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
            self.summary.evaluations += 1;
            self.next_tick = Some(at + self.interval_ms);
        }
        Ok(())
    }

    /// The evaluation at the time of the last input, and the summary.
    fn finish(mut self, log: &mut dyn Write) -> Result<ReplaySummary, ReplayError> {
        if self.next_tick.is_some() {
            self.evaluate_until(self.previous_ms + 1, log)?;
        }
        let relaxed = std::sync::atomic::Ordering::Relaxed;
        let counters = &self.counters;
        counters
            .tracked_servers
            .store(self.decider.tracked_servers() as u64, relaxed);
        counters
            .clusters
            .store(self.decider.clusters() as u64, relaxed);
        self.summary.counters = counters.snapshot();
        Ok(self.summary)
    }
}

/// A recorded message as it came off the bus: subject, headers, body.
/// Reports go through the JSON codec, so they meet the same checks a live
/// one does.
fn message_of(
    line_no: usize,
    recorded: Recorded,
) -> Result<(String, Option<HeaderMap>, Vec<u8>), ReplayError> {
    let bad = |reason: String| ReplayError::Line {
        line: line_no,
        reason,
    };
    match recorded {
        Recorded::Report {
            subject, report, ..
        } => {
            let body = serde_json::to_vec(&report).map_err(|e| bad(e.to_string()))?;
            Ok((subject, Some(Codec::Json.headers()), body))
        }
        Recorded::Raw {
            subject,
            content_type,
            hex,
            ..
        } => {
            let body = from_hex(&hex).ok_or_else(|| bad("hex is not hexadecimal".to_owned()))?;
            let headers = content_type.map(|ct| {
                let mut headers = HeaderMap::new();
                headers.insert(CONTENT_TYPE, ct.as_str());
                headers
            });
            Ok((subject, headers, body))
        }
        Recorded::Cluster { .. } | Recorded::ClusterRemoved { .. } | Recorded::Confirmed { .. } => {
            Err(bad("not a message".to_owned()))
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    #[error("cannot set up the recording: {0}")]
    Setup(#[source] async_nats::Error),
    #[error("writing the recording: {0}")]
    Write(#[from] std::io::Error),
    #[error("the {0} ended")]
    Ended(&'static str),
}

/// Writes every cluster record, confirmation and report seen on NATS to
/// `sink`, as a recording, until `stop`. Returns how many inputs it wrote.
///
/// # Errors
/// When the watch or subscription cannot be set up or ends, or on I/O.
pub async fn record(
    client: &async_nats::Client,
    replicas: usize,
    mut sink: impl Write,
    stop: tokio_util::sync::CancellationToken,
) -> Result<u64, RecordError> {
    use futures::StreamExt;
    use headroom_shared::kv::Bucket;
    use headroom_shared::records::ClusterRecord;
    use headroom_shared::time::now_ms;

    let js = async_nats::jetstream::new(client.clone());
    let bucket = headroom_shared::kv::open_bucket(&js, Bucket::Clusters, replicas)
        .await
        .map_err(RecordError::Setup)?;
    let clusters = headroom_shared::kv::follow(bucket, ">".to_owned(), stop.clone());
    futures::pin_mut!(clusters);
    let confirmations = confirmations(&js, stop.clone()).await;
    futures::pin_mut!(confirmations);
    let mut reports = client
        .subscribe(headroom_shared::subjects::METRICS_ALL)
        .await
        .map_err(|e| RecordError::Setup(e.into()))?;
    // Reports sent before this point are not ours to see; make sure the
    // server knows of the subscription before the caller goes on.
    client
        .flush()
        .await
        .map_err(|e| RecordError::Setup(e.into()))?;
    let mut written = 0u64;
    loop {
        let recorded = tokio::select! {
            _ = stop.cancelled() => break,
            entry = clusters.next() => match entry {
                Some(entry) => match entry.operation {
                    async_nats::jetstream::kv::Operation::Put => {
                        match Codec::MsgPack.decode::<ClusterRecord>(&entry.value) {
                            Ok(record) => Recorded::Cluster { at_ms: now_ms(), cluster: (&record).into() },
                            Err(err) => {
                                tracing::warn!(key = %entry.key, %err, "unreadable cluster record");
                                continue;
                            }
                        }
                    }
                    _ => match ClusterId::new(&entry.key) {
                        Ok(id) => Recorded::ClusterRemoved { at_ms: now_ms(), id },
                        Err(_) => continue,
                    },
                },
                // The watch only ends with `stop`.
                None => break,
            },
            Some(confirmed) = confirmations.next() => Recorded::Confirmed {
                at_ms: now_ms(),
                request: confirmed.id,
                confirmed_ms: confirmed.confirmed_ms,
            },
            message = reports.next() => match message {
                Some(m) => Recorded::message(now_ms(), m.subject.as_str(), m.headers.as_ref(), &m.payload),
                None => return Err(RecordError::Ended("reports subscription")),
            },
        };
        serde_json::to_writer(&mut sink, &recorded).map_err(std::io::Error::other)?;
        sink.write_all(b"\n")?;
        written += 1;
    }
    sink.flush()?;
    Ok(written)
}

/// The allocators' confirmations as they are made; none while there is no
/// requests bucket (no allocator has run).
async fn confirmations(
    js: &async_nats::jetstream::Context,
    stop: tokio_util::sync::CancellationToken,
) -> futures::stream::BoxStream<'static, headroom_shared::ledger::RequestConfirmed> {
    use futures::StreamExt;
    use headroom_shared::kv::Bucket;
    use headroom_shared::ledger::RequestConfirmed;
    let bucket = match js.get_key_value(Bucket::Requests.name()).await {
        Ok(bucket) => bucket,
        Err(err) => {
            tracing::warn!(%err, "no requests bucket: recording without confirmations");
            return futures::stream::pending().boxed();
        }
    };
    let pattern = format!("{}>", RequestConfirmed::PREFIX);
    // Named, so that the monitor's own user may record too.
    headroom_shared::kv::follow_named(js.client(), bucket, pattern, stop)
        .filter_map(|entry| async move {
            let put = entry.operation == async_nats::jetstream::kv::Operation::Put;
            put.then(|| Codec::MsgPack.decode::<RequestConfirmed>(&entry.value).ok())
                .flatten()
        })
        .boxed()
}

/// One decision as one JSON line; the same bytes for the same decision.
///
/// # Errors
/// I/O.
pub fn write_decision(log: &mut dyn Write, decision: &Decision) -> std::io::Result<()> {
    let line = serde_json::to_string(&DecisionLine {
        id: decision.request_id(),
        decision,
    })
    .map_err(std::io::Error::other)?;
    writeln!(log, "{line}")
}

#[derive(Serialize)]
struct DecisionLine<'a> {
    id: String,
    #[serde(flatten)]
    decision: &'a Decision,
}

fn to_hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        out.push(char::from(DIGITS[usize::from(b >> 4)]));
        out.push(char::from(DIGITS[usize::from(b & 0xf)]));
    }
    out
}

fn from_hex(text: &str) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A recording written by hand: a cluster, a rising load, junk.
    const HAND_WRITTEN: &str = r#"
# two servers; the load rises at 3 s
{"kind":"cluster","at_ms":0,"cluster":{"id":"web","policy":{"min_size":1,"max_size":4},"members":[{"server":"s1","state":"active"},{"server":"s2","state":"active"}]}}
{"kind":"report","at_ms":0,"subject":"headroom.metrics.web.s1","report":{"server":"s1","cluster":"web","source":"agent","at_ms":1,"interval_ms":1000,"cpu":0.4}}
{"kind":"report","at_ms":0,"subject":"headroom.metrics.web.s2","report":{"server":"s2","cluster":"web","source":"agent","at_ms":1,"interval_ms":1000,"cpu":0.4}}
{"kind":"report","at_ms":1000,"subject":"headroom.metrics.web.s1","report":{"server":"s1","cluster":"web","source":"agent","at_ms":1,"interval_ms":1000,"cpu":0.4}}
{"kind":"report","at_ms":1000,"subject":"headroom.metrics.web.s2","report":{"server":"s2","cluster":"web","source":"agent","at_ms":1,"interval_ms":1000,"cpu":0.4}}
{"kind":"raw","at_ms":1500,"subject":"headroom.metrics.web.s1","content_type":"application/msgpack","hex":"c1"}
{"kind":"report","at_ms":2000,"subject":"headroom.metrics.web.s1","report":{"server":"s1","cluster":"web","source":"agent","at_ms":1,"interval_ms":1000,"cpu":1.5}}
{"kind":"report","at_ms":3000,"subject":"headroom.metrics.web.s1","report":{"server":"s1","cluster":"web","source":"agent","at_ms":1,"interval_ms":1000,"cpu":0.9}}
{"kind":"report","at_ms":3000,"subject":"headroom.metrics.web.s2","report":{"server":"s2","cluster":"web","source":"agent","at_ms":1,"interval_ms":1000,"cpu":0.9}}
{"kind":"report","at_ms":4000,"subject":"headroom.metrics.web.s1","report":{"server":"s1","cluster":"web","source":"agent","at_ms":1,"interval_ms":1000,"cpu":0.9}}
{"kind":"report","at_ms":4000,"subject":"headroom.metrics.web.s2","report":{"server":"s2","cluster":"web","source":"agent","at_ms":1,"interval_ms":1000,"cpu":0.9}}
{"kind":"report","at_ms":5000,"subject":"headroom.metrics.web.s1","report":{"server":"s1","cluster":"web","source":"agent","at_ms":1,"interval_ms":1000,"cpu":0.9}}
{"kind":"report","at_ms":5000,"subject":"headroom.metrics.web.s2","report":{"server":"s2","cluster":"web","source":"agent","at_ms":1,"interval_ms":1000,"cpu":0.9}}
"#;

    #[test]
    fn a_confirmation_is_recorded_as_the_module_shows_it() {
        let line = r#"{"kind":"confirmed","at_ms":5200,"request":"allocate-web-4000","confirmed_ms":5150}"#;
        let read: Recorded = serde_json::from_str(line).expect("a confirmation");
        assert_eq!(
            read,
            Recorded::Confirmed {
                at_ms: 5_200,
                request: RequestId::new("allocate-web-4000").expect("id"),
                confirmed_ms: 5_150,
            }
        );
        assert_eq!(serde_json::to_string(&read).expect("written"), line);
    }

    #[test]
    fn a_hand_written_recording_replays_the_same_every_time() {
        let run = || {
            let mut log = Vec::new();
            let summary = replay(HAND_WRITTEN.as_bytes(), None, 1_000, &mut log).expect("replay");
            (String::from_utf8(log).expect("utf-8"), summary)
        };
        let (first, summary) = run();
        let (second, _) = run();
        assert_eq!(first, second);
        assert_eq!(summary.counters.malformed, 1);
        assert_eq!(summary.counters.invalid, 1, "CPU over 100 %");
        assert_eq!(summary.evaluations, 6);
        // Hot from 3 s; held for the 2 s sustain window at 5 s; 1.8
        // servers of load at target 0.6 wants 3: one more.
        assert_eq!(
            first,
            concat!(
                r#"{"id":"allocate-web-5000","at_ms":5000,"cluster":"web","generation":0,"#,
                r#""action":{"allocate":{"count":1}},"#,
                r#""reason":"utilisation at or above 0.75 for 2000 ms; load 1.80 servers wants 3 at target 0.6","#,
                r#""evidence":{"size":2,"known":2,"utilisation":0.9,"window":[0.9,0.9,0.9],"total_load":1.8,"desired":3}}"#,
                "\n"
            )
        );
    }

    #[test]
    fn out_of_order_and_broken_lines_are_named() {
        let mut log = Vec::new();
        let err = replay(
            "{\"kind\":\"cluster_removed\",\"at_ms\":5,\"id\":\"web\"}\n{\"kind\":\"cluster_removed\",\"at_ms\":4,\"id\":\"web\"}\n".as_bytes(),
            None,
            1_000,
            &mut log,
        )
        .expect_err("out of order");
        assert!(err.to_string().contains("line 2"), "{err}");
        let err = replay("{\"kind\":\"nope\"}\n".as_bytes(), None, 1_000, &mut log)
            .expect_err("not an input");
        assert!(err.to_string().contains("line 1"), "{err}");
        assert_eq!(to_hex(&[0x00, 0xab, 0xff]), "00abff");
        assert_eq!(from_hex("00abff"), Some(vec![0x00, 0xab, 0xff]));
        assert_eq!(from_hex("0g"), None);
    }
}
