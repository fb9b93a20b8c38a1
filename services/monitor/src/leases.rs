//! Which shards this monitor instance decides for, by leases in the
//! `headroom-monitors` bucket, so that instances can stop, crash or join
//! and every cluster is still decided by one instance, never by two.
//!
//! - Each shard is a key, `shard.<n>`, whose value names its holder. The
//!   holder renews it by compare-and-set every quarter of `lease_ttl`.
//! - Another instance takes it when it is empty (handed over), or when its
//!   revision has not moved for a whole `lease_ttl` as that instance saw it.
//! - The holder stops deciding for a shard half a `lease_ttl` after the last
//!   renewal it sent that succeeded, before it can be taken: the taker's
//!   wait starts when it first saw that renewal, which was after it was
//!   sent. Both measure on their own monotonic clock, so the wall clocks
//!   of the machines need not agree; the quarter left over covers a round
//!   of lateness and the clocks' rates.
//! - Each instance also puts a heartbeat, `instance.<id>`, every round,
//!   with the shards it holds. Instances whose heartbeat moved within a
//!   `lease_ttl` are live. Each takes free or lapsed shards while under its
//!   even share rounded up and gives away what is over it; the fullest
//!   also gives one to an instance under the share rounded down (4 shards
//!   on 3 instances end 2, 1, 1, not 2, 2, 0).
//!
//! A shard given away is first dropped by the decider (the loss is
//! acknowledged), then emptied, so its next holder starts after the last
//! decision of the one before. Taking and leaving are audit events
//! (`shard_taken`, `shard_left`).

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::time::Duration;

use async_nats::jetstream::{self, kv};
use futures::StreamExt;
use headroom_shared::codec::Codec;
use headroom_shared::kv::{compare_and_set, CasError};
use headroom_shared::records::{MonitorHeartbeat, ShardLease};
use headroom_shared::time::now_ms;
use headroom_shared::wire::{AuditEvent, EventKind};
use headroom_shared::{bus, subjects, SCHEMA_VERSION};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// A change to the shards this instance holds, for the decider.
#[derive(Debug)]
pub enum Ownership {
    /// Decide for this shard's clusters from now on, and say so on `done`.
    Gained {
        shard: u32,
        done: oneshot::Sender<()>,
    },
    /// Stop deciding for this shard now, and say so on `done`.
    Lost {
        shard: u32,
        done: oneshot::Sender<()>,
    },
}

/// What the lease holder needs to know.
#[derive(Debug, Clone)]
pub struct LeaseSettings {
    pub shards: u32,
    pub ttl: Duration,
    /// The instance's configured name (`monitor.instance`).
    pub instance: String,
}

/// The latest value of a key as this instance saw it.
struct Seen {
    revision: u64,
    holder: Option<String>,
    /// For a heartbeat: how many shards the instance said it holds.
    holds: usize,
    /// When this instance first saw this revision.
    since: Instant,
}

/// A shard this instance holds.
struct Held {
    revision: u64,
    /// Past this, it stops deciding for the shard unless renewed.
    valid_until: Instant,
}

/// The key of shard `n`.
pub fn shard_key(n: u32) -> String {
    format!("shard.{n}")
}

const INSTANCE_PREFIX: &str = "instance.";

/// Holds this instance's share of the shards until `stop`; once the decider
/// is gone (`decider_gone`), empties its leases so others take them at once.
/// `first_round` is told when the first round is over (what was free is
/// taken and decided for), so that the monitor is ready only then.
///
/// # Errors
/// Never for KV trouble (that only lets leases lapse); the result names
/// the task for the monitor's supervisor.
pub async fn hold(
    bucket: kv::Store,
    js: jetstream::Context,
    settings: LeaseSettings,
    ownership: mpsc::Sender<Ownership>,
    stop: CancellationToken,
    decider_gone: CancellationToken,
    first_round: oneshot::Sender<()>,
) -> Result<&'static str, crate::MonitorError> {
    let mut holder = Holder::new(bucket.clone(), js, settings, ownership);
    info!(holder = %holder.me, "holding monitor shard leases");
    // What is there now, so that the first round knows the live instances
    // and the held shards; the watch then brings every change.
    match headroom_shared::kv::latest_entries(&bucket).await {
        Ok(entries) => {
            for (key, revision, value) in entries {
                holder.see_put(key, revision, &value);
            }
        }
        Err(err) => warn!(%err, "cannot read the monitors bucket; the watch will fill it in"),
    }
    let entries = headroom_shared::kv::follow(bucket, ">".to_owned(), stop.clone());
    futures::pin_mut!(entries);
    let mut ticker = tokio::time::interval(holder.round());
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut first_round = Some(first_round);
    loop {
        tokio::select! {
            biased;
            () = stop.cancelled() => break,
            entry = entries.next() => match entry {
                // A shard handed over is taken at once, not at next round.
                Some(entry) => {
                    if holder.see(entry) && !holder.balance().await {
                        break;
                    }
                }
                None => break,
            },
            () = tokio::time::sleep_until(holder.next_lapse()) => {
                if !holder.lapse().await {
                    break;
                }
            }
            _ = ticker.tick() => {
                if !holder.round_of_leases().await {
                    break;
                }
                if let Some(told) = first_round.take() {
                    let _ = told.send(());
                }
            }
        }
    }
    // Hand over only once the decider can no longer decide. If it never
    // ends, the supervisor's grace aborts both and the leases lapse.
    decider_gone.cancelled().await;
    holder.hand_over_all().await;
    Ok("shard leases")
}

struct Holder {
    bucket: kv::Store,
    js: jetstream::Context,
    settings: LeaseSettings,
    /// This process's holder id: the instance name and when it started, so
    /// that two processes under one name are still two holders.
    me: String,
    seen: HashMap<String, Seen>,
    held: BTreeMap<u32, Held>,
    /// When this instance last gave a shard to one under its share.
    last_gift: Option<Instant>,
    ownership: mpsc::Sender<Ownership>,
}

impl Holder {
    fn new(
        bucket: kv::Store,
        js: jetstream::Context,
        settings: LeaseSettings,
        ownership: mpsc::Sender<Ownership>,
    ) -> Self {
        let name: String = settings
            .instance
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        let started = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        Self {
            bucket,
            js,
            me: format!("{name}-{started:x}"),
            settings,
            seen: HashMap::new(),
            held: BTreeMap::new(),
            last_gift: None,
            ownership,
        }
    }

    fn round(&self) -> Duration {
        self.settings.ttl / 4
    }

    /// Bounds a KV call by a round, so that a cut connection cannot hold
    /// the lapse of a lease back.
    async fn bounded<T, E: std::fmt::Display>(
        &self,
        what: &str,
        call: impl Future<Output = Result<T, E>>,
    ) -> Option<Result<T, E>> {
        let result = tokio::time::timeout(self.round(), call).await;
        if result.is_err() {
            warn!(what, "monitors bucket did not answer within a round");
        }
        result.ok()
    }

    /// Takes in a change; true when it made a shard free.
    fn see(&mut self, entry: kv::Entry) -> bool {
        match entry.operation {
            kv::Operation::Put => {
                let shard = !entry.key.starts_with(INSTANCE_PREFIX);
                self.see_put(entry.key.clone(), entry.revision, &entry.value);
                shard
                    && self
                        .seen
                        .get(&entry.key)
                        .is_some_and(|s| s.holder.is_none())
            }
            kv::Operation::Delete | kv::Operation::Purge => {
                self.seen.remove(&entry.key);
                false
            }
        }
    }

    fn see_put(&mut self, key: String, revision: u64, value: &[u8]) {
        // A revision seen already keeps the time it was first seen (the
        // watch starts by replaying what the first read gave).
        if self.seen.get(&key).is_some_and(|s| s.revision >= revision) {
            return;
        }
        let mut holds = 0;
        let holder = if let Some(id) = key.strip_prefix(INSTANCE_PREFIX) {
            holds = Codec::MsgPack
                .decode::<MonitorHeartbeat>(value)
                .map_or(0, |beat| beat.shards.len());
            Some(id.to_owned())
        } else {
            match Codec::MsgPack.decode::<ShardLease>(value) {
                Ok(lease) => lease.holder,
                Err(err) => {
                    warn!(%key, %err, "unreadable lease; treated as held");
                    Some(String::new())
                }
            }
        };
        let since = Instant::now();
        self.seen.insert(
            key,
            Seen {
                revision,
                holder,
                holds,
                since,
            },
        );
    }

    /// One round: drop what lapsed, beat, renew, then even out. False once
    /// the decider is gone.
    async fn round_of_leases(&mut self) -> bool {
        self.lapse().await
            && {
                self.heartbeat().await;
                self.renew().await
            }
            && self.lapse().await
            && self.balance().await
    }

    /// When the first held lease runs out unless renewed.
    fn next_lapse(&self) -> Instant {
        self.held
            .values()
            .map(|h| h.valid_until)
            .min()
            .unwrap_or_else(|| Instant::now() + self.settings.ttl)
    }

    /// Stops deciding for every held shard whose renewal is overdue.
    async fn lapse(&mut self) -> bool {
        let now = Instant::now();
        let lapsed: Vec<u32> = self
            .held
            .iter()
            .filter(|(_, h)| h.valid_until <= now)
            .map(|(&n, _)| n)
            .collect();
        for n in lapsed {
            warn!(
                shard = n,
                "shard lease not renewed in time; no longer deciding for it"
            );
            if !self.lose(n, "its lease could not be renewed in time").await {
                return false;
            }
        }
        true
    }

    async fn heartbeat(&mut self) {
        let beat = MonitorHeartbeat {
            v: SCHEMA_VERSION,
            instance: self.settings.instance.clone(),
            shards: self.held.keys().copied().collect(),
            at_ms: now_ms(),
        };
        let Ok(body) = Codec::MsgPack.encode(&beat) else {
            return;
        };
        let key = format!("{INSTANCE_PREFIX}{}", self.me);
        if let Some(Err(err)) = self.bounded("heartbeat", self.bucket.put(key, body)).await {
            warn!(%err, "cannot put the monitor's heartbeat");
        }
    }

    fn lease_body(&self, holder: Option<&str>) -> Option<bytes::Bytes> {
        let lease = ShardLease {
            v: SCHEMA_VERSION,
            holder: holder.map(str::to_owned),
            at_ms: now_ms(),
        };
        Codec::MsgPack.encode(&lease).ok()
    }

    async fn renew(&mut self) -> bool {
        let shards: Vec<(u32, u64)> = self.held.iter().map(|(&n, h)| (n, h.revision)).collect();
        for (n, revision) in shards {
            // A cut connection makes every call wait a round: the ones
            // after it must not hold a lapse back.
            if !self.lapse().await {
                return false;
            }
            if !self.held.contains_key(&n) {
                continue;
            }
            let Some(body) = self.lease_body(Some(&self.me)) else {
                continue;
            };
            let sent = Instant::now();
            let key = shard_key(n);
            let update = compare_and_set(&self.bucket, &key, body, revision);
            match self.bounded("renewal", update).await {
                Some(Ok(revision)) => {
                    let valid_until = sent + self.settings.ttl / 2;
                    self.held.insert(
                        n,
                        Held {
                            revision,
                            valid_until,
                        },
                    );
                }
                Some(Err(CasError::Conflict)) => {
                    warn!(
                        shard = n,
                        "shard lease changed under this instance; leaving it"
                    );
                    if !self
                        .lose(n, "its lease was changed by another instance")
                        .await
                    {
                        return false;
                    }
                }
                Some(Err(err)) => warn!(shard = n, %err, "cannot renew a shard lease"),
                None => {}
            }
        }
        true
    }

    /// The other live instances, by id, with how many shards each holds.
    fn live_others(&self, now: Instant) -> Vec<(&str, usize)> {
        self.seen
            .iter()
            .filter(|(key, seen)| {
                key.starts_with(INSTANCE_PREFIX)
                    && seen.holder.as_deref() != Some(self.me.as_str())
                    && now.duration_since(seen.since) < self.settings.ttl
            })
            .map(|(key, seen)| (&key[INSTANCE_PREFIX.len()..], seen.holds))
            .collect()
    }

    /// Evens out: gives away what is over this instance's share rounded
    /// up, gives one to an instance under its share rounded down when this
    /// one holds the most, and takes free and lapsed shards while under
    /// the share rounded up.
    async fn balance(&mut self) -> bool {
        let now = Instant::now();
        let others = self.live_others(now);
        let live = u32::try_from(others.len() + 1).unwrap_or(u32::MAX);
        let high = self.settings.shards.div_ceil(live) as usize;
        let low = (self.settings.shards / live) as usize;
        let held = self.held.len();
        let needy = others.iter().any(|&(_, holds)| holds < low);
        let fullest = others
            .iter()
            .all(|&(id, holds)| (holds, id) < (held, self.me.as_str()));
        // One gift per lease: the heartbeats must show it taken first.
        let may_give = self
            .last_gift
            .is_none_or(|at| now.duration_since(at) >= self.settings.ttl);
        let over = if held > high {
            held - high
        } else {
            usize::from(held > low && needy && fullest && may_give)
        };
        for _ in 0..over {
            let Some((&n, _)) = self.held.iter().next_back() else {
                break;
            };
            self.last_gift = Some(now);
            if !self.hand_over(n).await {
                return false;
            }
        }
        if over > 0 {
            return true;
        }
        for n in 0..self.settings.shards {
            if self.held.len() >= high {
                break;
            }
            if self.held.contains_key(&n) {
                continue;
            }
            if !self.lapse().await || !self.try_take(n, now).await {
                return false;
            }
        }
        true
    }

    /// Takes shard `n` if it is free or lapsed. False once the decider is
    /// gone.
    async fn try_take(&mut self, n: u32, now: Instant) -> bool {
        let key = shard_key(n);
        let expected = match self.seen.get(&key) {
            None => None,
            Some(seen)
                if seen.holder.is_none() || now.duration_since(seen.since) >= self.settings.ttl =>
            {
                Some(seen.revision)
            }
            Some(_) => return true,
        };
        let Some(body) = self.lease_body(Some(&self.me)) else {
            return true;
        };
        let sent = Instant::now();
        let take = compare_and_set(&self.bucket, &key, body, expected.unwrap_or(0));
        let taken = match self.bounded("take", take).await {
            Some(Ok(revision)) => Some(revision),
            Some(Err(CasError::Kv(err))) => {
                warn!(shard = n, %err, "cannot take a shard lease");
                None
            }
            // Another instance took it first, or no answer within a round.
            Some(Err(CasError::Conflict)) | None => None,
        };
        let Some(revision) = taken else {
            return true;
        };
        let valid_until = sent + self.settings.ttl / 2;
        self.held.insert(
            n,
            Held {
                revision,
                valid_until,
            },
        );
        let previous = self.seen.get(&key).and_then(|s| s.holder.clone());
        // Recorded as of now: the decider starts deciding for it no earlier.
        let at_ms = now_ms();
        if !self.tell(|done| Ownership::Gained { shard: n, done }).await {
            return false;
        }
        info!(shard = n, ?previous, "took a shard lease");
        self.event(EventKind::ShardTaken, n, "taken", at_ms);
        true
    }

    /// Stops deciding for shard `n` (waiting for the decider to say it
    /// has) and forgets it. False once the decider is gone.
    async fn lose(&mut self, n: u32, why: &str) -> bool {
        self.held.remove(&n);
        if !self.tell(|done| Ownership::Lost { shard: n, done }).await {
            return false;
        }
        self.event(EventKind::ShardLeft, n, why, now_ms());
        true
    }

    /// Tells the decider of a change and waits until it has made it. False
    /// once the decider is gone.
    async fn tell(&self, change: impl FnOnce(oneshot::Sender<()>) -> Ownership) -> bool {
        let (done, made) = oneshot::channel();
        self.ownership.send(change(done)).await.is_ok() && made.await.is_ok()
    }

    /// Gives shard `n` away: the decider drops it, then the lease is
    /// emptied for another instance to take at once.
    async fn hand_over(&mut self, n: u32) -> bool {
        let Some(revision) = self.held.get(&n).map(|h| h.revision) else {
            return true;
        };
        if !self.lose(n, "handed over to even out the shards").await {
            return false;
        }
        self.empty(n, revision).await;
        true
    }

    /// Empties shard `n`'s lease if it is still this instance's revision.
    async fn empty(&self, n: u32, revision: u64) {
        let Some(body) = self.lease_body(None) else {
            return;
        };
        let key = shard_key(n);
        let update = compare_and_set(&self.bucket, &key, body, revision);
        if let Some(Err(err)) = self.bounded("hand-over", update).await {
            warn!(shard = n, %err, "cannot empty a shard lease; it will lapse instead");
        }
    }

    /// At stop, with the decider gone: every lease emptied, the heartbeat
    /// removed.
    async fn hand_over_all(&mut self) {
        let held = std::mem::take(&mut self.held);
        for (n, h) in held {
            // Before emptying, so the next holder's taking comes after.
            self.event(EventKind::ShardLeft, n, "the instance stopped", now_ms());
            self.empty(n, h.revision).await;
        }
        let key = format!("{INSTANCE_PREFIX}{}", self.me);
        if let Some(Err(err)) = self.bounded("heartbeat", self.bucket.delete(key)).await {
            warn!(%err, "cannot remove the monitor's heartbeat");
        }
    }

    /// Records taking or leaving shard `n` at `at_ms` in the audit log.
    /// Sent on its own task so that a slow stream cannot delay a lapse;
    /// retried, so a short cut still gets it through.
    fn event(&self, kind: EventKind, n: u32, why: &str, at_ms: u64) {
        let token = kind.token();
        let event = AuditEvent {
            v: SCHEMA_VERSION,
            kind,
            cluster: None,
            server: None,
            request: None,
            detail: serde_json::json!({
                "shard": n,
                "shards": self.settings.shards,
                "holder": self.me,
                "why": why,
            })
            .to_string(),
            origin: self.settings.instance.clone(),
            at_ms,
        };
        let js = self.js.clone();
        let id = format!("{token}-{}-{n}-{at_ms}", self.me);
        tokio::spawn(async move {
            for attempt in 0..5u64 {
                let sent = bus::publish_durable(
                    &js,
                    subjects::events(None, token),
                    &id,
                    Codec::MsgPack,
                    &event,
                )
                .await;
                match sent {
                    Ok(_) => return,
                    Err(err) if attempt == 4 => warn!(%err, "cannot record a shard change"),
                    Err(_) => tokio::time::sleep(Duration::from_millis(500 * (attempt + 1))).await,
                }
            }
        });
    }
}
