//! `headroom`, the operator's command line: what the cluster looks like,
//! what is on the wire, and the few changes an operator makes by hand. The
//! wire and KV are MessagePack; every command prints them as text or JSON.
//!
//! Each command is a function over a NATS connection and an output, so
//! tests run them against a live system and compare with KV read directly.

use std::collections::BTreeMap;
use std::io::Write;
use std::time::Duration;

use async_nats::jetstream;
use futures::{StreamExt, TryStreamExt};
use headroom_shared::bus::{self, AdminError};
use headroom_shared::codec::{self, Codec};
use headroom_shared::kv::{CLUSTERS_BUCKET, REQUESTS_BUCKET, SERVERS_BUCKET};
use headroom_shared::ledger::RequestConfirmed;
use headroom_shared::records::{ClusterRecord, MemberState, ServerRecord};
use headroom_shared::time::now_ms;
use headroom_shared::wire::{
    AuditEvent, ClusterList, DeregisterServer, DrainMember, DrainQueued, Empty, EventKind,
    FrontendApplied, GetCluster, PerformanceReport, PutCluster, RegisterServer, ReportSource,
    ServerList,
};
use headroom_shared::{subjects, ClusterId, IdError, RequestId, ServerId, SCHEMA_VERSION};

#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error(transparent)]
    Admin(#[from] AdminError),
    #[error(transparent)]
    Id(#[from] IdError),
    #[error("{what}: {source}")]
    Nats {
        what: String,
        #[source]
        source: async_nats::Error,
    },
    #[error("no key {key} in {bucket}")]
    NoKey { bucket: String, key: String },
    #[error("writing the output: {0}")]
    Output(#[from] std::io::Error),
    #[error(transparent)]
    Policy(#[from] headroom_shared::records::PolicyFileError),
    #[error("{path}: {source}")]
    File {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Users(#[from] headroom_shared::nats_users::UsersError),
}

fn nats(what: impl Into<String>) -> impl FnOnce(async_nats::Error) -> CliError {
    let what = what.into();
    move |source| CliError::Nats { what, source }
}

async fn bucket(
    client: &async_nats::Client,
    bucket: &str,
) -> Result<jetstream::kv::Store, CliError> {
    jetstream::new(client.clone())
        .get_key_value(bucket)
        .await
        .map_err(|e| nats(format!("bucket {bucket}"))(e.into()))
}

/// The keys of a bucket, sorted.
async fn keys(store: &jetstream::kv::Store, bucket: &str) -> Result<Vec<String>, CliError> {
    let mut keys: Vec<String> = store
        .keys()
        .await
        .map_err(|e| nats(format!("keys of {bucket}"))(e.into()))?
        .try_collect()
        .await
        .map_err(|e| nats(format!("keys of {bucket}"))(e.into()))?;
    keys.sort();
    Ok(keys)
}

/// The buckets as they are: every record of one bucket, decoded, by key.
async fn records<T: codec::Message>(
    client: &async_nats::Client,
    bucket: &str,
) -> Result<Vec<(String, T, u64)>, CliError> {
    let store = self::bucket(client, bucket).await?;
    let keys = keys(&store, bucket).await?;
    let mut out = Vec::new();
    for key in keys {
        if let Some(entry) = store
            .entry(&key)
            .await
            .map_err(|e| nats(format!("{bucket}/{key}"))(e.into()))?
        {
            if let Ok(value) = Codec::MsgPack.decode::<T>(&entry.value) {
                out.push((key, value, entry.revision));
            }
        }
    }
    Ok(out)
}

/// What `status` heard during its sample: each server's CPU from its
/// agent, and each front-end's applied generation, by (cluster, front-end).
#[derive(Default)]
struct Heard {
    cpu: BTreeMap<String, f64>,
    applied: BTreeMap<(String, String), u64>,
}

async fn hear(client: &async_nats::Client, sample: Duration) -> Result<Heard, CliError> {
    let subscribe = |subject: &'static str| async move {
        client
            .subscribe(subject)
            .await
            .map_err(|e| nats(format!("subscribing to {subject}"))(e.into()))
    };
    let mut reports = subscribe(subjects::METRICS_ALL).await?;
    let mut applied = subscribe(subjects::FRONTEND_APPLIED_ALL).await?;
    let mut heard = Heard::default();
    let deadline = tokio::time::sleep(sample);
    tokio::pin!(deadline);
    loop {
        tokio::select! {
            () = &mut deadline => break,
            Some(message) = reports.next() => {
                if let Ok(report) = codec::decode::<PerformanceReport>(message.headers.as_ref(), &message.payload) {
                    if let (ReportSource::Agent, Some(c)) = (&report.source, report.cpu) {
                        heard.cpu.insert(report.server.to_string(), c);
                    }
                }
            }
            Some(message) = applied.next() => {
                if let Ok(said) = codec::decode::<FrontendApplied>(message.headers.as_ref(), &message.payload) {
                    heard.applied.insert((said.cluster.to_string(), said.frontend), said.generation);
                }
            }
            else => break,
        }
    }
    Ok(heard)
}

/// `headroom status`: every cluster, the generation each of its front-ends
/// routes by (how far behind the record it is, and for how long: lagging
/// past `deadline`), whether its recent changes are confirmed by the data
/// plane, its members (with the CPU their agents report), the pool, and
/// the monitor's counters.
///
/// # Errors
/// NATS or KV cannot be read, or the output cannot be written.
pub async fn status(
    client: &async_nats::Client,
    sample: Duration,
    deadline: Duration,
    out: &mut impl Write,
) -> Result<(), CliError> {
    let clusters: Vec<(String, ClusterRecord, u64)> = records(client, CLUSTERS_BUCKET).await?;
    let servers: Vec<(String, ServerRecord, u64)> = records(client, SERVERS_BUCKET).await?;
    let heard = hear(client, sample).await?;
    let clusters_bucket = bucket(client, CLUSTERS_BUCKET).await?;
    // No requests bucket before an allocator's first run: nothing to confirm.
    let requests = bucket(client, REQUESTS_BUCKET).await.ok();
    for (key, c, revision) in &clusters {
        writeln!(
            out,
            "cluster {}  generation {}  revision {}  size {} (min {}, max {})",
            c.id,
            c.generation,
            revision,
            c.size(),
            c.policy.min_size,
            c.policy.max_size
        )?;
        if let Some(requests) = &requests {
            write_changes(client, requests, c, out).await?;
        }
        // What traffic follows: the generation each front-end routes by.
        let fronts = heard
            .applied
            .iter()
            .filter(|((cluster, _), _)| cluster == c.id.as_str());
        // Read once, and only for a cluster with a front-end behind.
        let mut written: Option<Vec<(u64, u64)>> = None;
        for ((_, frontend), generation) in fronts {
            let lag = c.generation.saturating_sub(*generation);
            let state = if lag == 0 {
                "applied (lag 0)".to_owned()
            } else {
                let written = match &mut written {
                    Some(written) => written,
                    None => written.insert(generations_written(&clusters_bucket, key).await?),
                };
                let since = written
                    .iter()
                    .find(|(g, _)| g > generation)
                    .map_or_else(now_ms, |(_, at)| *at);
                let behind_ms = now_ms().saturating_sub(since);
                let word = if Duration::from_millis(behind_ms) > deadline {
                    "lagging"
                } else {
                    "applying"
                };
                format!("{word} (lag {lag}, {:.1} s behind)", behind_ms as f64 / 1e3)
            };
            writeln!(
                out,
                "  front-end {frontend:<10} generation {generation}  {state}"
            )?;
        }
        for m in &c.members {
            let load = heard
                .cpu
                .get(m.server.as_str())
                .map_or("cpu ?".to_owned(), |u| format!("cpu {u:.2}"));
            writeln!(
                out,
                "  {:<20} {:<9} weight {:.2}  {}:{}  {load}",
                m.server.as_str(),
                format!("{:?}", m.state).to_lowercase(),
                m.weight,
                m.address,
                m.port
            )?;
        }
    }
    let mut by_state: BTreeMap<&str, usize> = BTreeMap::new();
    for (_, s, _) in &servers {
        *by_state.entry(s.state.name()).or_default() += 1;
    }
    let counts: Vec<String> = by_state.iter().map(|(k, n)| format!("{k} {n}")).collect();
    writeln!(
        out,
        "pool: {} servers ({})",
        servers.len(),
        counts.join(", ")
    )?;
    for (_, s, _) in &servers {
        let place = s.state.cluster().map_or(String::new(), |c| format!(" {c}"));
        writeln!(
            out,
            "  {:<20} {}{place}  {}:{}",
            s.id.as_str(),
            s.state.name(),
            s.address,
            s.port
        )?;
    }
    match headroom_monitor::fetch_stats(client).await {
        Ok(m) => writeln!(
            out,
            "monitor: {} reports, {} rejected, {} decisions, {} requests sent, tracking {} servers in {} clusters",
            m.reports, m.rejected, m.decisions, m.requests_sent, m.tracked_servers, m.clusters
        )?,
        Err(_) => writeln!(out, "monitor: no answer")?,
    }
    Ok(())
}

/// Each generation of the cluster's record in its kept history (the
/// bucket keeps 32 revisions), oldest first, and when it was written: a
/// front-end at generation g has been behind since the first one past g
/// (at least since the oldest kept).
async fn generations_written(
    clusters: &jetstream::kv::Store,
    key: &str,
) -> Result<Vec<(u64, u64)>, CliError> {
    let what = || nats(format!("history of {CLUSTERS_BUCKET}/{key}"));
    let mut history = clusters.history(key).await.map_err(|e| what()(e.into()))?;
    let mut written = Vec::new();
    while let Some(entry) = history.next().await {
        let entry = entry.map_err(|e| what()(e.into()))?;
        if let Ok(record) = Codec::MsgPack.decode::<ClusterRecord>(&entry.value) {
            let ms = entry.created.unix_timestamp_nanos() / 1_000_000;
            written.push((record.generation, u64::try_from(ms).unwrap_or(0)));
        }
    }
    Ok(written)
}

/// The cluster's changes of the last ten minutes that traffic can follow
/// (members that came or are draining), each confirmed by every live
/// front-end or not yet, as the allocators' `confirmed.<request>` records
/// say.
async fn write_changes(
    client: &async_nats::Client,
    requests: &jetstream::kv::Store,
    c: &ClusterRecord,
    out: &mut impl Write,
) -> Result<(), CliError> {
    let now = now_ms();
    let mut changes: Vec<(u64, &RequestId)> = c
        .members
        .iter()
        .filter(|m| now.saturating_sub(m.since_ms) < 10 * 60 * 1000)
        .filter_map(|m| match m.state {
            MemberState::Active => Some((m.since_ms, &m.request)),
            MemberState::Draining => m.drain_request.as_ref().map(|r| (m.since_ms, r)),
            MemberState::Joining => None,
        })
        .collect();
    changes.sort();
    changes.dedup_by(|a, b| a.1 == b.1);
    for (since_ms, request) in changes {
        let key = RequestConfirmed::key(request);
        let entry = requests
            .get(&key)
            .await
            .map_err(|e| nats(format!("{REQUESTS_BUCKET}/{key}"))(e.into()))?;
        let confirmed = entry.and_then(|v| Codec::MsgPack.decode::<RequestConfirmed>(&v).ok());
        let said = match confirmed {
            Some(k) => {
                let after = k
                    .waited_ms()
                    .map_or("at an unknown time after the decision".to_owned(), |ms| {
                        format!("{ms} ms after the decision")
                    });
                let gone = if k.gone.is_empty() {
                    String::new()
                } else {
                    format!(", gone: {}", k.gone.join(", "))
                };
                format!(
                    "confirmed {after} (generation {}, {} front-ends{gone})",
                    k.generation,
                    k.frontends.len()
                )
            }
            None => {
                let mut said = format!(
                    "not confirmed, {:.1} s after it was written",
                    now.saturating_sub(since_ms) as f64 / 1e3
                );
                if let Some(lagging) = last_lagging(client, &c.id).await {
                    if lagging.request.as_ref() == Some(request) {
                        said.push_str(&format!("; lagging: {}", lagging.detail));
                    }
                }
                said
            }
        };
        writeln!(out, "  change {request}  {said}")?;
    }
    Ok(())
}

/// The allocators' last `lagging` event of a cluster: who is behind on its
/// newest unconfirmed change. A paused front-end says nothing, so only
/// the allocator, which heard it last, can name it.
async fn last_lagging(client: &async_nats::Client, cluster: &ClusterId) -> Option<AuditEvent> {
    let stream = jetstream::new(client.clone())
        .get_stream(subjects::EVENTS_STREAM)
        .await
        .ok()?;
    let subject = subjects::events(Some(cluster), EventKind::Lagging.token());
    let raw = stream
        .get_last_raw_message_by_subject(&subject)
        .await
        .ok()?;
    codec::decode(Some(&raw.headers), &raw.payload).ok()
}

/// `headroom pool list`.
///
/// # Errors
/// The allocator does not answer or refuses.
pub async fn pool_list(client: &async_nats::Client, out: &mut impl Write) -> Result<(), CliError> {
    let list: ServerList = bus::admin(client, subjects::admin::POOL_LIST, &Empty::new()).await?;
    for s in &list.servers {
        let place = s.state.cluster().map_or(String::new(), |c| format!(" {c}"));
        writeln!(
            out,
            "{} {}{place} {}:{}",
            s.id,
            s.state.name(),
            s.address,
            s.port
        )?;
    }
    Ok(())
}

/// `headroom pool add`.
///
/// # Errors
/// A bad id, or the allocator does not answer or refuses.
pub async fn pool_add(
    client: &async_nats::Client,
    id: &str,
    address: &str,
    port: u16,
    request_types: Vec<String>,
    out: &mut impl Write,
) -> Result<(), CliError> {
    let request = RegisterServer {
        v: SCHEMA_VERSION,
        id: ServerId::new(id)?,
        address: address.to_owned(),
        port,
        request_types,
    };
    let record: ServerRecord = bus::admin(client, subjects::admin::POOL_REGISTER, &request).await?;
    writeln!(
        out,
        "{} {} {}:{}",
        record.id,
        record.state.name(),
        record.address,
        record.port
    )?;
    Ok(())
}

/// `headroom cluster put <id> --policy <file>`: creates the cluster or
/// changes its policy (the allocator fills it to its minimum).
///
/// # Errors
/// A bad id or policy file, or the allocator does not answer or refuses.
pub async fn cluster_put(
    client: &async_nats::Client,
    id: &str,
    policy: &std::path::Path,
    out: &mut impl Write,
) -> Result<(), CliError> {
    let request = PutCluster {
        v: SCHEMA_VERSION,
        id: ClusterId::new(id)?,
        policy: headroom_shared::records::ClusterPolicy::read(policy)?,
    };
    let record: ClusterRecord = bus::admin(client, subjects::admin::CLUSTER_PUT, &request).await?;
    writeln!(
        out,
        "{} generation {} min {} max {} members {}",
        record.id,
        record.generation,
        record.policy.min_size,
        record.policy.max_size,
        record.members.len()
    )?;
    Ok(())
}

/// `headroom cluster get <id>` (one record) or `headroom cluster list`
/// (every record), as JSON lines.
///
/// # Errors
/// A bad id, or the allocator does not answer or refuses (unknown cluster).
pub async fn cluster_show(
    client: &async_nats::Client,
    id: Option<&str>,
    out: &mut impl Write,
) -> Result<(), CliError> {
    let records = match id {
        Some(id) => {
            let get = GetCluster {
                v: SCHEMA_VERSION,
                id: ClusterId::new(id)?,
            };
            vec![bus::admin::<_, ClusterRecord>(client, subjects::admin::CLUSTER_GET, &get).await?]
        }
        None => {
            bus::admin::<_, ClusterList>(client, subjects::admin::CLUSTER_LIST, &Empty::new())
                .await?
                .clusters
        }
    };
    for record in &records {
        let value = serde_json::to_value(record).unwrap_or(serde_json::Value::Null);
        writeln!(out, "{}", json_line(&value))?;
    }
    Ok(())
}

/// `headroom pool remove`.
///
/// # Errors
/// A bad id, or the allocator does not answer or refuses (a server in a
/// cluster cannot be removed).
pub async fn pool_remove(
    client: &async_nats::Client,
    id: &str,
    out: &mut impl Write,
) -> Result<(), CliError> {
    let request = DeregisterServer {
        v: SCHEMA_VERSION,
        id: ServerId::new(id)?,
    };
    let _: Empty = bus::admin(client, subjects::admin::POOL_DEREGISTER, &request).await?;
    writeln!(out, "{id} removed")?;
    Ok(())
}

/// `headroom drain`: release a member by hand.
///
/// # Errors
/// Bad ids, or the allocator does not answer or refuses.
pub async fn drain(
    client: &async_nats::Client,
    cluster: &str,
    server: &str,
    out: &mut impl Write,
) -> Result<(), CliError> {
    let request = DrainMember {
        v: SCHEMA_VERSION,
        cluster: ClusterId::new(cluster)?,
        server: ServerId::new(server)?,
    };
    let queued: DrainQueued = bus::admin(client, subjects::admin::MEMBER_DRAIN, &request).await?;
    writeln!(
        out,
        "release of {server} from {cluster} queued as request {}",
        queued.request
    )?;
    Ok(())
}

fn json_line(value: &serde_json::Value) -> String {
    serde_json::to_string(value).unwrap_or_else(|_| "null".to_owned())
}

/// `headroom kv list <bucket>`: every key with its revision and value.
///
/// # Errors
/// The bucket cannot be read.
pub async fn kv_list(
    client: &async_nats::Client,
    bucket: &str,
    out: &mut impl Write,
) -> Result<(), CliError> {
    let store = self::bucket(client, bucket).await?;
    for key in keys(&store, bucket).await? {
        if let Ok(Some(entry)) = store.entry(&key).await {
            let value = codec::readable(None, &entry.value).unwrap_or(serde_json::Value::Null);
            writeln!(out, "{key} @{} {}", entry.revision, json_line(&value))?;
        }
    }
    Ok(())
}

/// `headroom kv get <bucket> <key>` (with `history`, every kept revision).
///
/// # Errors
/// The bucket cannot be read or has no such key.
pub async fn kv_get(
    client: &async_nats::Client,
    bucket: &str,
    key: &str,
    history: bool,
    out: &mut impl Write,
) -> Result<(), CliError> {
    let store = self::bucket(client, bucket).await?;
    let entries: Vec<jetstream::kv::Entry> = if history {
        store
            .history(key)
            .await
            .map_err(|e| nats(format!("history of {key}"))(e.into()))?
            .try_collect()
            .await
            .map_err(|e| nats(format!("history of {key}"))(e.into()))?
    } else {
        store
            .entry(key)
            .await
            .map_err(|e| nats(format!("{bucket}/{key}"))(e.into()))?
            .into_iter()
            .collect()
    };
    if entries.is_empty() {
        return Err(CliError::NoKey {
            bucket: bucket.to_owned(),
            key: key.to_owned(),
        });
    }
    for entry in entries {
        let value = codec::readable(None, &entry.value).unwrap_or(serde_json::Value::Null);
        writeln!(
            out,
            "{key} @{} {:?} {}",
            entry.revision,
            entry.operation,
            json_line(&value)
        )?;
    }
    Ok(())
}

/// `headroom kv watch <bucket> [key pattern]`: the current values, then
/// every change as it happens, with revisions, for `count` entries or
/// `duration`, whichever comes first.
///
/// # Errors
/// The bucket does not exist or cannot be watched.
pub async fn kv_watch(
    client: &async_nats::Client,
    bucket: &str,
    pattern: &str,
    count: Option<usize>,
    duration: Option<Duration>,
    out: &mut impl Write,
) -> Result<(), CliError> {
    let store = self::bucket(client, bucket).await?;
    let mut entries = store
        .watch_with_history(pattern)
        .await
        .map_err(|e| nats(format!("watching {bucket}/{pattern}"))(e.into()))?;
    let deadline = tokio::time::sleep(duration.unwrap_or(Duration::from_secs(u64::MAX / 4)));
    tokio::pin!(deadline);
    let mut seen = 0;
    while count.is_none_or(|c| seen < c) {
        let entry = tokio::select! {
            () = &mut deadline => break,
            entry = entries.next() => match entry {
                Some(Ok(entry)) => entry,
                Some(Err(err)) => return Err(nats(format!("watching {bucket}"))(err.into())),
                None => break,
            },
        };
        let value = codec::readable(None, &entry.value).unwrap_or(serde_json::Value::Null);
        writeln!(
            out,
            "{} @{} {:?} {}",
            entry.key,
            entry.revision,
            entry.operation,
            json_line(&value)
        )?;
        out.flush()?;
        seen += 1;
    }
    Ok(())
}

/// `headroom watch <pattern>`: live messages, headers and decoded body, for
/// `count` messages or `duration`, whichever comes first.
///
/// # Errors
/// The subscription cannot be made.
pub async fn watch(
    client: &async_nats::Client,
    pattern: &str,
    count: Option<usize>,
    duration: Option<Duration>,
    out: &mut impl Write,
) -> Result<(), CliError> {
    let mut messages = client
        .subscribe(pattern.to_owned())
        .await
        .map_err(|e| nats(format!("subscribing to {pattern}"))(e.into()))?;
    client
        .flush()
        .await
        .map_err(|e| nats("flushing")(e.into()))?;
    let deadline = tokio::time::sleep(duration.unwrap_or(Duration::from_secs(u64::MAX / 4)));
    tokio::pin!(deadline);
    let mut seen = 0;
    while count.is_none_or(|c| seen < c) {
        let message = tokio::select! {
            () = &mut deadline => break,
            message = messages.next() => match message {
                Some(message) => message,
                None => break,
            },
        };
        let headers: BTreeMap<String, String> = message
            .headers
            .iter()
            .flat_map(|h| h.iter())
            .map(|(k, v)| {
                let values: Vec<&str> = v.iter().map(|x| x.as_str()).collect();
                (k.to_string(), values.join(","))
            })
            .collect();
        let body = match codec::readable(message.headers.as_ref(), &message.payload) {
            Ok(value) => json_line(&value),
            Err(err) => format!("<{} bytes, not readable: {err}>", message.payload.len()),
        };
        writeln!(
            out,
            "{} {} {body}",
            message.subject,
            json_line(&serde_json::json!(headers))
        )?;
        seen += 1;
    }
    Ok(())
}

/// `headroom events`: the last `last` audit events, oldest first, of one
/// cluster or all.
///
/// # Errors
/// The audit stream cannot be read.
pub async fn events(
    client: &async_nats::Client,
    cluster: Option<&str>,
    last: u64,
    out: &mut impl Write,
) -> Result<(), CliError> {
    let js = jetstream::new(client.clone());
    let mut stream = js
        .get_stream(subjects::EVENTS_STREAM)
        .await
        .map_err(|e| nats("the audit stream")(e.into()))?;
    let state = stream
        .info()
        .await
        .map_err(|e| nats("the audit stream")(e.into()))?
        .state
        .clone();
    let mut printed = 0;
    let mut lines = Vec::new();
    let mut seq = state.last_sequence;
    while seq >= state.first_sequence.max(1) && printed < last {
        if let Ok(message) = stream.get_raw_message(seq).await {
            let event: Option<AuditEvent> =
                codec::decode(Some(&message.headers), &message.payload).ok();
            if let Some(event) = event {
                let wanted =
                    cluster.is_none_or(|c| event.cluster.as_ref().is_some_and(|e| e.as_str() == c));
                if wanted {
                    lines.push(format!(
                        "#{seq} {} {} {} {} {}",
                        event.at_ms,
                        event.kind.token(),
                        event.cluster.as_ref().map_or("-", ClusterId::as_str),
                        event.server.as_ref().map_or("-", ServerId::as_str),
                        event.detail
                    ));
                    printed += 1;
                }
            }
        }
        seq -= 1;
    }
    for line in lines.iter().rev() {
        writeln!(out, "{line}")?;
    }
    Ok(())
}

/// What `headroom services` asks every service (the NATS services API).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Discover {
    /// `$SRV.PING`: who is there, and how long each took to answer.
    Ping,
    /// `$SRV.INFO`: description, metadata and endpoint subjects.
    Info,
    /// `$SRV.STATS`: requests and errors per endpoint.
    Stats,
}

impl Discover {
    fn subject(self) -> &'static str {
        match self {
            Discover::Ping => "$SRV.PING",
            Discover::Info => "$SRV.INFO",
            Discover::Stats => "$SRV.STATS",
        }
    }
}

/// `headroom services [ping|info|stats]`: every running service that
/// answers within `window`, one line each.
///
/// # Errors
/// NATS cannot be asked.
pub async fn services(
    client: &async_nats::Client,
    ask: Discover,
    window: Duration,
    out: &mut impl Write,
) -> Result<(), CliError> {
    let inbox = client.new_inbox();
    let mut replies = client
        .subscribe(inbox.clone())
        .await
        .map_err(|e| nats("subscribing to replies")(e.into()))?;
    let asked = std::time::Instant::now();
    client
        .publish_with_reply(ask.subject(), inbox, bytes::Bytes::new())
        .await
        .map_err(|e| nats("asking for services")(e.into()))?;
    client
        .flush()
        .await
        .map_err(|e| nats("flushing")(e.into()))?;
    let deadline = tokio::time::sleep(window);
    tokio::pin!(deadline);
    let mut found = Vec::new();
    loop {
        tokio::select! {
            () = &mut deadline => break,
            reply = replies.next() => {
                let Some(reply) = reply else { break };
                if let Ok(answer) = serde_json::from_slice::<serde_json::Value>(&reply.payload) {
                    found.push((answer, asked.elapsed()));
                }
            }
        }
    }
    found.sort_by_key(|(s, _)| (s["name"].to_string(), s["id"].to_string()));
    let text = |v: &serde_json::Value| v.as_str().unwrap_or("?").to_owned();
    for (s, took) in &found {
        let head = format!(
            "{} {} {}",
            text(&s["name"]),
            text(&s["version"]),
            text(&s["id"])
        );
        let endpoints = |each: &dyn Fn(&serde_json::Value) -> String| -> String {
            s["endpoints"]
                .as_array()
                .map(|e| e.iter().map(each).collect::<Vec<_>>().join("; "))
                .unwrap_or_default()
        };
        match ask {
            Discover::Ping => writeln!(
                out,
                "{head}  answered in {:.1} ms",
                took.as_secs_f64() * 1e3
            )?,
            Discover::Info => writeln!(
                out,
                "{head}  {}  metadata {}  endpoints: {}",
                text(&s["description"]),
                json_line(&s["metadata"]),
                endpoints(&|e| format!("{} on {}", text(&e["name"]), text(&e["subject"])))
            )?,
            Discover::Stats => writeln!(
                out,
                "{head} started {}  {}",
                text(&s["started"]),
                endpoints(&|e| format!(
                    "{} {}req {}err",
                    text(&e["name"]),
                    e["num_requests"],
                    e["num_errors"]
                ))
            )?,
        }
    }
    writeln!(out, "{} services answered", found.len())?;
    Ok(())
}

/// Rewrites the agents' users in the nats-server configuration `file` (the
/// block between its markers) for `servers`, or prints the whole file so
/// changed; then names the password variables nats-server will read.
///
/// # Errors
/// A bad server id, a file that cannot be read or written, or one without
/// the markers.
pub fn nats_users(
    file: &std::path::Path,
    servers: &[String],
    print: bool,
    out: &mut impl Write,
) -> Result<(), CliError> {
    let servers = servers
        .iter()
        .map(|s| ServerId::new(s.clone()))
        .collect::<Result<Vec<_>, _>>()?;
    let failed = |source| CliError::File {
        path: file.display().to_string(),
        source,
    };
    let conf = std::fs::read_to_string(file).map_err(failed)?;
    let written = headroom_shared::nats_users::rewrite(&conf, &servers)?;
    if print {
        write!(out, "{written}")?;
        return Ok(());
    }
    std::fs::write(file, written).map_err(failed)?;
    writeln!(
        out,
        "{}: {} agent users; nats-server reads their passwords from",
        file.display(),
        servers.len()
    )?;
    for server in &servers {
        writeln!(
            out,
            "  {} (user {}, inbox prefix {})",
            headroom_shared::nats_users::password_variable(server),
            headroom_shared::nats_users::user(server),
            headroom_shared::nats_users::inbox_prefix(server)
        )?;
    }
    Ok(())
}
