//! Typed access to Headroom's KV buckets: every read returns the revision it
//! saw, every write is compare-and-set on a revision. Each call to KV is
//! counted by operation and bucket (`headroom_allocator_kv_calls_total`),
//! so the round trips a request costs can be counted, not only timed.

use std::sync::Arc;

use async_nats::jetstream::{self, kv};
use headroom_shared::codec::{self, Message, WireError};
use headroom_shared::kv::{compare_and_set, Bucket, CasError};
use headroom_shared::ledger::{RequestConfirmed, RequestRecord, RequestStarted};
use headroom_shared::ops::CounterVec;
use headroom_shared::records::{ClusterRecord, ServerRecord};
use headroom_shared::{ClusterId, RequestId, ServerId};

/// A value and the KV revision it was read at.
#[derive(Debug, Clone)]
pub struct Versioned<T> {
    pub value: T,
    pub revision: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Another writer changed the key since it was read: read again.
    #[error("{key} changed since it was read")]
    Conflict { key: String },
    #[error("KV {op} on {key}: {source}")]
    Kv {
        op: &'static str,
        key: String,
        #[source]
        source: async_nats::Error,
    },
    #[error("KV record {key} does not decode: {source}")]
    Corrupt {
        key: String,
        #[source]
        source: WireError,
    },
    #[error("cannot set up bucket {bucket}: {source}")]
    Setup {
        bucket: &'static str,
        #[source]
        source: async_nats::Error,
    },
}

impl StoreError {
    fn kv(op: &'static str, key: &str, source: impl Into<async_nats::Error>) -> Self {
        StoreError::Kv {
            op,
            key: key.to_owned(),
            source: source.into(),
        }
    }
}

/// The three buckets.
#[derive(Clone)]
pub struct Store {
    servers: kv::Store,
    clusters: kv::Store,
    requests: kv::Store,
    calls: Arc<CounterVec>,
}

async fn open_bucket(
    js: &jetstream::Context,
    bucket: Bucket,
    replicas: usize,
) -> Result<kv::Store, StoreError> {
    headroom_shared::kv::open_bucket(js, bucket, replicas)
        .await
        .map_err(|source| StoreError::Setup {
            bucket: bucket.name(),
            source,
        })
}

impl Store {
    /// Opens the buckets, creating any that is missing.
    ///
    /// # Errors
    /// When JetStream is not available or refuses the bucket.
    pub async fn open(js: &jetstream::Context, replicas: usize) -> Result<Self, StoreError> {
        Ok(Self {
            servers: open_bucket(js, headroom_shared::kv::Bucket::Servers, replicas).await?,
            clusters: open_bucket(js, headroom_shared::kv::Bucket::Clusters, replicas).await?,
            requests: open_bucket(js, headroom_shared::kv::Bucket::Requests, replicas).await?,
            calls: Arc::new(CounterVec::new(
                "headroom_allocator_kv_calls_total",
                "Calls to KV (each a round trip to JetStream), by operation and bucket.",
                &["op", "bucket"],
            )),
        })
    }

    /// The KV calls made so far.
    pub fn calls(&self) -> Arc<CounterVec> {
        self.calls.clone()
    }

    fn count(&self, op: &str, bucket: &kv::Store) {
        let name = bucket
            .name
            .strip_prefix("headroom-")
            .unwrap_or(&bucket.name);
        self.calls.inc(&[op, name]);
    }

    /// The servers bucket, for watching.
    pub fn servers_bucket(&self) -> kv::Store {
        self.servers.clone()
    }

    /// The clusters bucket, for watching.
    pub fn clusters_bucket(&self) -> kv::Store {
        self.clusters.clone()
    }

    async fn get<T: Message>(
        &self,
        bucket: &kv::Store,
        key: &str,
    ) -> Result<Option<Versioned<T>>, StoreError> {
        self.count("get", bucket);
        let entry = bucket
            .entry(key)
            .await
            .map_err(|e| StoreError::kv("get", key, e))?;
        match entry {
            Some(entry) if entry.operation == kv::Operation::Put => {
                let value = codec::Codec::MsgPack
                    .decode::<T>(&entry.value)
                    .map_err(|source| StoreError::Corrupt {
                        key: key.to_owned(),
                        source,
                    })?;
                Ok(Some(Versioned {
                    value,
                    revision: entry.revision,
                }))
            }
            _ => Ok(None),
        }
    }

    /// Every record of `bucket`, in one sweep (no read per key).
    async fn all<T: Message>(&self, bucket: &kv::Store) -> Result<Vec<Versioned<T>>, StoreError> {
        self.count("sweep", bucket);
        let entries = headroom_shared::kv::latest_entries(bucket)
            .await
            .map_err(|e| StoreError::kv("sweep", "*", e))?;
        let mut out = Vec::with_capacity(entries.len());
        for (key, revision, value) in entries {
            match codec::Codec::MsgPack.decode::<T>(&value) {
                Ok(value) => out.push(Versioned { value, revision }),
                // One bad record must not stop the allocator from serving
                // every other cluster.
                Err(source) => {
                    let err = StoreError::Corrupt { key, source };
                    tracing::error!(%err, "skipping undecodable KV record");
                }
            }
        }
        Ok(out)
    }

    /// Writes `value` if the key is still at `revision` (0: if it does not
    /// exist). Returns the new revision.
    async fn cas<T: Message>(
        &self,
        bucket: &kv::Store,
        key: &str,
        value: &T,
        revision: u64,
    ) -> Result<u64, StoreError> {
        let op = if revision == 0 { "create" } else { "update" };
        self.count(op, bucket);
        let bytes = codec::encode(value).map_err(|source| StoreError::Corrupt {
            key: key.to_owned(),
            source,
        })?;
        compare_and_set(bucket, key, bytes, revision)
            .await
            .map_err(|e| match e {
                CasError::Conflict => StoreError::Conflict {
                    key: key.to_owned(),
                },
                CasError::Kv(source) => StoreError::kv(op, key, source),
            })
    }

    /// # Errors
    /// On a KV failure or an undecodable record.
    pub async fn server(
        &self,
        id: &ServerId,
    ) -> Result<Option<Versioned<ServerRecord>>, StoreError> {
        self.get(&self.servers, id.as_str()).await
    }

    /// Every server record; undecodable ones are logged and skipped. It
    /// reads every key: the allocator itself uses its view of the pool
    /// ([`crate::pool`]); this is for tools and tests.
    ///
    /// # Errors
    /// On a KV failure.
    pub async fn servers(&self) -> Result<Vec<Versioned<ServerRecord>>, StoreError> {
        self.all(&self.servers).await
    }

    /// # Errors
    /// [`StoreError::Conflict`] when the record moved past `revision`.
    pub async fn put_server(
        &self,
        record: &ServerRecord,
        revision: u64,
    ) -> Result<u64, StoreError> {
        self.cas(&self.servers, record.id.as_str(), record, revision)
            .await
    }

    /// # Errors
    /// [`StoreError::Conflict`] when the record moved past `revision`.
    pub async fn delete_server(&self, id: &ServerId, revision: u64) -> Result<(), StoreError> {
        self.count("delete", &self.servers);
        self.servers
            .delete_expect_revision(id.as_str(), Some(revision))
            .await
            .map_err(|e| {
                if e.kind() == kv::DeleteErrorKind::WrongLastRevision {
                    StoreError::Conflict {
                        key: id.to_string(),
                    }
                } else {
                    StoreError::kv("delete", id.as_str(), e)
                }
            })
    }

    /// # Errors
    /// On a KV failure or an undecodable record.
    pub async fn cluster(
        &self,
        id: &ClusterId,
    ) -> Result<Option<Versioned<ClusterRecord>>, StoreError> {
        self.get(&self.clusters, id.as_str()).await
    }

    /// # Errors
    /// On a KV failure.
    pub async fn clusters(&self) -> Result<Vec<Versioned<ClusterRecord>>, StoreError> {
        self.all(&self.clusters).await
    }

    /// Writes a cluster record, advancing its generation by one. After an
    /// error the record is stale: read it again.
    ///
    /// # Errors
    /// [`StoreError::Conflict`] when the record moved past `revision`.
    pub async fn put_cluster(
        &self,
        record: &mut ClusterRecord,
        revision: u64,
    ) -> Result<u64, StoreError> {
        record.generation += 1;
        record.updated_ms = headroom_shared::time::now_ms();
        self.cas(&self.clusters, record.id.as_str(), &*record, revision)
            .await
    }

    /// # Errors
    /// On a KV failure or an undecodable record.
    pub async fn outcome(&self, id: &RequestId) -> Result<Option<RequestRecord>, StoreError> {
        Ok(self
            .get(&self.requests, id.as_str())
            .await?
            .map(|v| v.value))
    }

    /// Records a request's outcome once. Returns the outcome that stands:
    /// this one, or the one another instance recorded first.
    ///
    /// # Errors
    /// On a KV failure.
    pub async fn record_outcome(
        &self,
        record: &RequestRecord,
    ) -> Result<RequestRecord, StoreError> {
        self.create_once(&self.requests, record.id.as_str(), record)
            .await
    }

    /// Creates `key` with `value` unless it exists; returns the value that
    /// stands (this one, or the one written first).
    async fn create_once<T: Message + Clone>(
        &self,
        bucket: &kv::Store,
        key: &str,
        value: &T,
    ) -> Result<T, StoreError> {
        match self.cas(bucket, key, value, 0).await {
            Ok(_) => Ok(value.clone()),
            Err(StoreError::Conflict { .. }) => Ok(self
                .get::<T>(bucket, key)
                .await?
                .map_or_else(|| value.clone(), |v| v.value)),
            Err(err) => Err(err),
        }
    }

    /// The mark that `id` was taken up, if it was.
    ///
    /// # Errors
    /// On a KV failure or an undecodable record.
    pub async fn started(&self, id: &RequestId) -> Result<Option<RequestStarted>, StoreError> {
        Ok(self
            .get(&self.requests, &RequestStarted::key(id))
            .await?
            .map(|v| v.value))
    }

    /// Records that every live front-end follows a request's change, once:
    /// the confirmation that stands is returned, this one or another
    /// instance's.
    ///
    /// # Errors
    /// On a KV failure or an undecodable record.
    pub async fn confirm(
        &self,
        confirmed: &RequestConfirmed,
    ) -> Result<RequestConfirmed, StoreError> {
        self.create_once(
            &self.requests,
            &RequestConfirmed::key(&confirmed.id),
            confirmed,
        )
        .await
    }

    /// Marks a request as taken up, once: the mark that stands is returned,
    /// this one or the one an earlier (or concurrent) delivery made.
    ///
    /// # Errors
    /// On a KV failure or an undecodable record.
    pub async fn start(&self, started: &RequestStarted) -> Result<RequestStarted, StoreError> {
        self.create_once(&self.requests, &RequestStarted::key(&started.id), started)
            .await
    }
}
