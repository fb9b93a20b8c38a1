//! JetStream KV, Headroom's only store: its buckets and keys, and the
//! plumbing every service shares (opening a bucket, compare-and-set, a
//! sweep of the latest values, a watch that resumes). The records kept in
//! it are [`crate::records`] and [`crate::ledger`].
//!
//! JetStream KV is Headroom's only store. Four buckets:
//! - `headroom-servers`, key = server id: where each server is. This record
//!   is the authority on a server's placement, so a server can be in at most
//!   one cluster by construction.
//! - `headroom-clusters`, key = cluster id: the cluster's policy and its
//!   member list, the routing view front-ends follow.
//! - `headroom-requests`, key = request id: the outcome of every
//!   reconfiguration request, so a redelivered request is applied at most
//!   once.
//! - `headroom-monitors`: which monitor instance holds each shard's lease
//!   (`shard.<n>`), and each live instance's heartbeat (`instance.<id>`).
//!
//! Every write is compare-and-set on the revision read. A server listed in a
//! cluster's members always has a server record naming that cluster; the
//! reverse may lag after a crash until the allocator's reconciler repairs it.

use std::time::Duration;

pub const SERVERS_BUCKET: &str = "headroom-servers";
pub const CLUSTERS_BUCKET: &str = "headroom-clusters";
pub const REQUESTS_BUCKET: &str = "headroom-requests";
pub const MONITORS_BUCKET: &str = "headroom-monitors";

/// Headroom's buckets, so that each is made one way and a misspelt name
/// cannot be made at all.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bucket {
    Servers,
    Clusters,
    Requests,
    Monitors,
}

impl Bucket {
    pub const fn name(self) -> &'static str {
        match self {
            Bucket::Servers => SERVERS_BUCKET,
            Bucket::Clusters => CLUSTERS_BUCKET,
            Bucket::Requests => REQUESTS_BUCKET,
            Bucket::Monitors => MONITORS_BUCKET,
        }
    }
}

/// How a bucket is made. One definition, used by whoever creates it.
pub fn bucket_config(bucket: Bucket, replicas: usize) -> async_nats::jetstream::kv::Config {
    let (description, history, max_age) = match bucket {
        Bucket::Servers => ("Headroom: every server and where it is", 16, Duration::ZERO),
        Bucket::Clusters => (
            "Headroom: cluster policy and membership",
            32,
            Duration::ZERO,
        ),
        // Leases are judged by whether their revision moves, so only the
        // last value of each key matters.
        Bucket::Monitors => (
            "Headroom: monitor shard leases and heartbeats",
            1,
            Duration::ZERO,
        ),
        // Outcomes outlive JetStream's de-duplication window by far; a day
        // bounds the bucket while covering any redelivery.
        Bucket::Requests => (
            "Headroom: outcome of each reconfiguration request",
            1,
            Duration::from_secs(24 * 3600),
        ),
    };
    async_nats::jetstream::kv::Config {
        bucket: bucket.name().to_owned(),
        description: description.to_owned(),
        history,
        max_age,
        num_replicas: replicas.max(1),
        storage: async_nats::jetstream::stream::StorageType::File,
        ..Default::default()
    }
}

/// Opens a bucket, creating it when it is missing. Every service that
/// needs a bucket calls this, so whichever starts first makes it the same
/// way.
///
/// # Errors
/// When the bucket can neither be found nor created.
pub async fn open_bucket(
    js: &async_nats::jetstream::Context,
    bucket: Bucket,
    replicas: usize,
) -> Result<async_nats::jetstream::kv::Store, async_nats::Error> {
    use async_nats::jetstream::context::KeyValueErrorKind;
    match js.get_key_value(bucket.name()).await {
        Ok(store) => Ok(store),
        Err(err) if err.kind() == KeyValueErrorKind::GetBucket => {
            Ok(js.create_key_value(bucket_config(bucket, replicas)).await?)
        }
        Err(err) => Err(err.into()),
    }
}

/// Whether a message of a KV bucket's stream deletes or purges its key
/// (its `KV-Operation` header), rather than putting a value.
pub fn is_removal(headers: &async_nats::HeaderMap) -> bool {
    headers
        .get("KV-Operation")
        .is_some_and(|op| matches!(op.as_str(), "DEL" | "PURGE"))
}

/// How long [`latest_entries`] waits for the next value before giving up.
const SWEEP_STALL: Duration = Duration::from_secs(10);

/// The latest value of every key of `bucket` (deleted ones left out) as
/// (key, revision, value), in one sweep of an ordered consumer that starts
/// at each key's last message: one round trip to set it up and the values
/// streamed, where listing the keys and reading each is a round trip per
/// key.
///
/// # Errors
/// The consumer cannot be made, a message is unreadable, or the values
/// stop coming for [`SWEEP_STALL`].
pub async fn latest_entries(
    bucket: &async_nats::jetstream::kv::Store,
) -> Result<Vec<(String, u64, bytes::Bytes)>, async_nats::Error> {
    use async_nats::jetstream::consumer::{pull, DeliverPolicy, ReplayPolicy};
    use futures::StreamExt;
    let consumer = bucket
        .stream
        .create_consumer(pull::OrderedConfig {
            description: Some("headroom: the latest value of every key".to_owned()),
            filter_subject: format!("{}>", bucket.prefix),
            deliver_policy: DeliverPolicy::LastPerSubject,
            replay_policy: ReplayPolicy::Instant,
            ..Default::default()
        })
        .await?;
    let pending = consumer.cached_info().num_pending;
    let mut out = Vec::with_capacity(usize::try_from(pending).unwrap_or(0));
    if pending == 0 {
        return Ok(out);
    }
    let mut messages = consumer.messages().await?;
    loop {
        let message = tokio::time::timeout(SWEEP_STALL, messages.next())
            .await
            .map_err(|_| format!("no value from {} for {SWEEP_STALL:?}", bucket.name))?
            .ok_or_else(|| format!("the sweep of {} ended early", bucket.name))??;
        let info = message.info()?;
        let (revision, pending) = (info.stream_sequence, info.pending);
        if !message.headers.as_ref().is_some_and(is_removal) {
            if let Some(key) = message
                .subject
                .as_str()
                .strip_prefix(bucket.prefix.as_str())
            {
                out.push((key.to_owned(), revision, message.payload.clone()));
            }
        }
        if pending == 0 {
            return Ok(out);
        }
    }
}

/// A watch's entries, whoever started it.
type Entries =
    futures::stream::BoxStream<'static, Result<async_nats::jetstream::kv::Entry, String>>;
/// What starts a watch of a pattern in a bucket.
type StartWatch = Box<
    dyn Fn(
            async_nats::jetstream::kv::Store,
            String,
        ) -> futures::future::BoxFuture<'static, Result<Entries, String>>
        + Send,
>;

/// Follows the keys of `bucket` matching `pattern` until `stop`: current
/// values first, then every change. A watch that ends or fails is started
/// again (after a second); an entry at or below the revision already
/// delivered for its key is skipped, because a restarted watch replays. So
/// each key's entries arrive once, in revision order, and the stream ends
/// only with `stop`.
pub fn follow(
    bucket: async_nats::jetstream::kv::Store,
    pattern: String,
    stop: tokio_util::sync::CancellationToken,
) -> impl futures::Stream<Item = async_nats::jetstream::kv::Entry> {
    use futures::{FutureExt, StreamExt, TryStreamExt};
    let start: StartWatch = Box::new(|bucket, pattern| {
        async move {
            let watch = bucket
                .watch_with_history(pattern)
                .await
                .map_err(|e| e.to_string())?;
            Ok(watch.map_err(|e| e.to_string()).boxed())
        }
        .boxed()
    });
    following(bucket, pattern, stop, start)
}

/// [`follow`], on a watch whose consumer this process names, so that its
/// filter is in the subject it is created on
/// (`$JS.API.CONSUMER.CREATE.<stream>.<name>.<filter>`) and a user's
/// permissions can bind it to its own keys: an agent may watch its own
/// server's record and no other. async-nats's own watch creates its
/// consumer on the stream's subject alone, with the filter in the body.
pub fn follow_named(
    client: async_nats::Client,
    bucket: async_nats::jetstream::kv::Store,
    pattern: String,
    stop: tokio_util::sync::CancellationToken,
) -> impl futures::Stream<Item = async_nats::jetstream::kv::Entry> {
    use futures::FutureExt;
    let start: StartWatch =
        Box::new(move |bucket, pattern| named_watch(client.clone(), bucket, pattern).boxed());
    following(bucket, pattern, stop, start)
}

/// An ordered consumer named `watch_<nuid>` on `bucket`'s stream, from each
/// key's last value on, read as KV entries.
async fn named_watch(
    client: async_nats::Client,
    bucket: async_nats::jetstream::kv::Store,
    pattern: String,
) -> Result<Entries, String> {
    use async_nats::jetstream::consumer::{push, DeliverPolicy, ReplayPolicy};
    use futures::StreamExt;
    let consumer = bucket
        .stream
        .create_consumer(push::OrderedConfig {
            name: Some(format!("watch_{}", nuid::next())),
            deliver_subject: client.new_inbox(),
            description: Some("headroom kv watch".to_owned()),
            filter_subject: format!("{}{pattern}", bucket.prefix),
            replay_policy: ReplayPolicy::Instant,
            deliver_policy: DeliverPolicy::LastPerSubject,
            ..Default::default()
        })
        .await
        .map_err(|e| e.to_string())?;
    let messages = consumer.messages().await.map_err(|e| e.to_string())?;
    let (prefix, name) = (bucket.prefix.clone(), bucket.name.clone());
    Ok(messages
        .map(move |message| {
            let message = message.map_err(|e| e.to_string())?;
            entry_of(&prefix, &name, &message)
        })
        .boxed())
}

/// A KV entry from the message its stream delivered (as async-nats reads
/// its own watch's).
fn entry_of(
    prefix: &str,
    bucket: &str,
    message: &async_nats::jetstream::Message,
) -> Result<async_nats::jetstream::kv::Entry, String> {
    use async_nats::jetstream::kv::Operation;
    let info = message.info().map_err(|e| e.to_string())?;
    let header = |name| message.headers.as_ref()?.get(name).map(|v| v.as_str());
    // A delete or purge, or the server's marker of a key that expired.
    let operation = match (header("KV-Operation"), header("Nats-Marker-Reason")) {
        (Some("DEL"), _) | (None, Some("Remove")) => Operation::Delete,
        (Some("PURGE"), _) | (None, Some("MaxAge" | "Purge")) => Operation::Purge,
        _ => Operation::Put,
    };
    let key = message
        .subject
        .strip_prefix(prefix)
        .ok_or_else(|| format!("{} is not a key of {bucket}", message.subject))?;
    Ok(async_nats::jetstream::kv::Entry {
        bucket: bucket.to_owned(),
        key: key.to_owned(),
        value: message.payload.clone(),
        revision: info.stream_sequence,
        delta: info.pending,
        created: info.published,
        operation,
        seen_current: info.pending == 0,
    })
}

fn following(
    bucket: async_nats::jetstream::kv::Store,
    pattern: String,
    stop: tokio_util::sync::CancellationToken,
    start: StartWatch,
) -> impl futures::Stream<Item = async_nats::jetstream::kv::Entry> {
    use futures::StreamExt;
    struct Following {
        bucket: async_nats::jetstream::kv::Store,
        pattern: String,
        stop: tokio_util::sync::CancellationToken,
        start: StartWatch,
        watch: Option<Entries>,
        delivered: std::collections::HashMap<String, u64>,
    }
    let state = Following {
        bucket,
        pattern,
        stop,
        start,
        watch: None,
        delivered: std::collections::HashMap::new(),
    };
    futures::stream::unfold(state, |mut s| async move {
        loop {
            let Some(watch) = s.watch.as_mut() else {
                let started = tokio::select! {
                    _ = s.stop.cancelled() => return None,
                    started = (s.start)(s.bucket.clone(), s.pattern.clone()) => started,
                };
                match started {
                    Ok(watch) => s.watch = Some(watch),
                    Err(err) => {
                        tracing::warn!(%err, pattern = %s.pattern, "cannot watch KV; trying again");
                        tokio::select! {
                            _ = s.stop.cancelled() => return None,
                            () = tokio::time::sleep(Duration::from_secs(1)) => {}
                        }
                    }
                }
                continue;
            };
            let next = tokio::select! {
                _ = s.stop.cancelled() => return None,
                next = watch.next() => next,
            };
            match next {
                Some(Ok(entry)) => {
                    if s.delivered
                        .get(&entry.key)
                        .is_some_and(|&r| entry.revision <= r)
                    {
                        continue;
                    }
                    s.delivered.insert(entry.key.clone(), entry.revision);
                    return Some((entry, s));
                }
                // Missed heartbeats and the like are not the end of it.
                Some(Err(err)) => tracing::debug!(%err, "KV watch hiccup"),
                None => s.watch = None,
            }
        }
    })
}

/// JetStream's "wrong last sequence" code, and the code an R3 stream under
/// contention answers with for the same condition.
const WRONG_LAST_SEQUENCE: u64 = 10071;
const R3_CAS_CONFLICT: u64 = 10164;

/// Whether a failed compare-and-set lost a race (re-read and try again), as
/// opposed to failing for another reason.
pub fn is_revision_conflict(err: &async_nats::jetstream::kv::UpdateError) -> bool {
    use async_nats::jetstream::kv::UpdateErrorKind;
    match err.kind() {
        UpdateErrorKind::WrongLastRevision => true,
        UpdateErrorKind::Other => jetstream_code(err)
            .is_some_and(|code| code == R3_CAS_CONFLICT || code == WRONG_LAST_SEQUENCE),
        UpdateErrorKind::InvalidKey | UpdateErrorKind::TimedOut => false,
    }
}

/// Same as [`is_revision_conflict`], for `create` (revision 0).
pub fn is_create_conflict(err: &async_nats::jetstream::kv::CreateError) -> bool {
    use async_nats::jetstream::kv::CreateErrorKind;
    match err.kind() {
        CreateErrorKind::AlreadyExists => true,
        CreateErrorKind::Other => jetstream_code(err)
            .is_some_and(|code| code == R3_CAS_CONFLICT || code == WRONG_LAST_SEQUENCE),
        _ => false,
    }
}

/// Why a [`compare_and_set`] did not write.
#[derive(Debug, thiserror::Error)]
pub enum CasError {
    /// The key moved past the revision (or exists, for revision 0).
    #[error("changed since it was read")]
    Conflict,
    #[error(transparent)]
    Kv(async_nats::Error),
}

/// Writes `value` to `key` if it is still at `revision` (0: if it does not
/// exist). Returns the new revision. The one compare-and-set every writer
/// of a bucket goes through.
///
/// # Errors
/// [`CasError::Conflict`] when another writer got there first.
pub async fn compare_and_set(
    bucket: &async_nats::jetstream::kv::Store,
    key: &str,
    value: bytes::Bytes,
    revision: u64,
) -> Result<u64, CasError> {
    if revision == 0 {
        return bucket.create(key, value).await.map_err(|e| {
            if is_create_conflict(&e) {
                CasError::Conflict
            } else {
                CasError::Kv(e.into())
            }
        });
    }
    bucket.update(key, value, revision).await.map_err(|e| {
        if is_revision_conflict(&e) {
            CasError::Conflict
        } else {
            CasError::Kv(e.into())
        }
    })
}

/// The JetStream API error code somewhere in an error's source chain.
fn jetstream_code(err: &(dyn std::error::Error + 'static)) -> Option<u64> {
    let mut next = Some(err);
    while let Some(e) = next {
        if let Some(js) = e.downcast_ref::<async_nats::jetstream::Error>() {
            return Some(js.error_code().0);
        }
        next = e.source();
    }
    None
}
