//! Helpers shared by the integration tests: start allocators in-process,
//! call admin endpoints, read KV and the audit log directly, and check the
//! KV invariants.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream;
use futures::TryStreamExt;
use headroom_shared::codec::{self, Codec, Message};
use headroom_shared::config::Config;
use headroom_shared::kv::{CLUSTERS_BUCKET, REQUESTS_BUCKET, SERVERS_BUCKET};
use headroom_shared::ledger::RequestRecord;
use headroom_shared::ops::Ops;
use headroom_shared::records::{
    ClusterPolicy, ClusterRecord, MemberState, ServerRecord, ServerState,
};
use headroom_shared::subjects;
use headroom_shared::wire::{
    AuditEvent, DeregisterServer, Empty, PutCluster, ReconfigAction, ReconfigRequest,
    RegisterServer, ERROR_CODE_HEADER,
};
use headroom_shared::{ClusterId, RequestId, ServerId, SCHEMA_VERSION};
use headroom_tests::{eventually, NatsServer};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub const WAIT: Duration = Duration::from_secs(20);

/// A command running service `binary` against the nats-server at `url`,
/// warnings only, logging to `log`, killed when dropped. The test's own
/// `HEADROOM_*` knobs are no settings of the service, so they are cleared;
/// the caller adds the service's own.
pub fn service_command(
    binary: &std::path::Path,
    url: &str,
    log: std::fs::File,
) -> tokio::process::Command {
    let mut command = tokio::process::Command::new(binary);
    for (name, _) in std::env::vars().filter(|(k, _)| k.starts_with("HEADROOM_")) {
        command.env_remove(name);
    }
    command
        .env("HEADROOM_NATS__URL", url)
        .env("HEADROOM_TELEMETRY__FILTER", "warn")
        .env_remove("RUST_LOG")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(log)
        .kill_on_drop(true);
    command
}

/// A service binary for tests that run real processes: the one named in
/// `env`, else this workspace's (`scripts/test.sh` builds every binary
/// before the tests; by hand, `cargo build -p <name>`).
pub fn workspace_binary(name: &str, env: &str) -> std::path::PathBuf {
    if let Some(path) = std::env::var_os(env) {
        return path.into();
    }
    let exe = std::env::current_exe().expect("test binary path");
    // target/<profile>/deps/<test binary> -> target/<profile>/<name>
    let binary = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("target dir")
        .join(name);
    assert!(
        binary.is_file(),
        "{} is missing: run `cargo build -p {name}` (scripts/test.sh builds it) \
         or name one in {env}",
        binary.display()
    );
    binary
}

pub fn sid(s: &str) -> ServerId {
    ServerId::new(s).expect("server id")
}
pub fn cid(s: &str) -> ClusterId {
    ClusterId::new(s).expect("cluster id")
}

/// An allocator running in this process on its own NATS connection.
pub struct RunningAllocator {
    pub task: JoinHandle<Result<(), headroom_allocator::AllocatorError>>,
    pub shutdown: CancellationToken,
    /// Its health and metrics.
    pub ops: Arc<Ops>,
}

impl RunningAllocator {
    pub async fn start(nats: &NatsServer, instance: &str) -> Self {
        Self::start_with(nats.config(), nats, instance).await
    }

    pub async fn start_with(mut config: Config, nats: &NatsServer, instance: &str) -> Self {
        config.allocator.instance = instance.to_owned();
        let client = nats.client().await.expect("allocator connects");
        let shutdown = CancellationToken::new();
        let ops = Ops::new("headroom-allocator");
        ops.watch_nats(client.clone(), Arc::default(), true);
        let task = tokio::spawn(headroom_allocator::run(
            config,
            client,
            ops.clone(),
            shutdown.clone(),
        ));
        Self {
            task,
            shutdown,
            ops,
        }
    }

    /// Stops it as SIGTERM would, and checks it ended cleanly.
    pub async fn stop(self) {
        self.shutdown.cancel();
        let ended = tokio::time::timeout(WAIT, self.task)
            .await
            .expect("allocator stops within the grace period")
            .expect("allocator task joined");
        ended.expect("allocator ended without error");
    }
}

/// A nats-server, a client on it, and one allocator serving.
pub struct Stack {
    /// Kept alive for the test's duration; dropping it kills the server.
    pub nats: NatsServer,
    pub client: async_nats::Client,
    pub js: jetstream::Context,
    pub allocator: RunningAllocator,
}

impl Stack {
    pub async fn start() -> Self {
        headroom_shared::telemetry::init_for_tests();
        let nats = NatsServer::start().await.expect("nats-server");
        let client = nats.client().await.expect("connect");
        let js = jetstream::new(client.clone());
        let allocator = RunningAllocator::start(&nats, "alloc-1").await;
        wait_for_admin(&client).await;
        Self {
            nats,
            client,
            js,
            allocator,
        }
    }
}

/// Calls an admin endpoint; on a refusal returns (stable code, message).
pub async fn admin<Req: Message, Resp: Message>(
    client: &async_nats::Client,
    verb: &str,
    request: &Req,
    codec: Codec,
) -> Result<Resp, (String, String)> {
    let answer = tokio::time::timeout(
        WAIT,
        headroom_shared::bus::admin_with(client, verb, request, codec),
    )
    .await
    .expect("admin answers in time");
    match answer {
        Ok(answer) => Ok(answer),
        Err(headroom_shared::bus::AdminError::Refused(err)) => Err((err.code, err.message)),
        Err(err) => panic!("admin call {verb}: {err}"),
    }
}

/// Waits until an allocator answers on the admin endpoints.
pub async fn wait_for_admin(client: &async_nats::Client) {
    let up = eventually(WAIT, || async {
        let reply = client
            .request(
                format!("{}.{}", subjects::ADMIN_GROUP, subjects::admin::POOL_LIST),
                codec::encode(&Empty::new()).expect("encode"),
            )
            .await
            .ok()?;
        let failed = reply
            .headers
            .as_ref()
            .is_some_and(|h| h.get(ERROR_CODE_HEADER).is_some());
        (!failed).then_some(())
    })
    .await;
    assert!(up.is_some(), "allocator admin endpoints never came up");
}

pub async fn register(client: &async_nats::Client, id: &str, types: &[&str]) -> ServerRecord {
    admin(
        client,
        subjects::admin::POOL_REGISTER,
        &RegisterServer {
            v: SCHEMA_VERSION,
            id: sid(id),
            address: format!("10.0.0.{}", id.len()),
            port: 8080,
            request_types: types.iter().map(|t| (*t).to_owned()).collect(),
        },
        Codec::MsgPack,
    )
    .await
    .expect("register")
}

pub async fn deregister(
    client: &async_nats::Client,
    id: &ServerId,
) -> Result<Empty, (String, String)> {
    let request = DeregisterServer {
        v: SCHEMA_VERSION,
        id: id.clone(),
    };
    admin(
        client,
        subjects::admin::POOL_DEREGISTER,
        &request,
        Codec::MsgPack,
    )
    .await
}

pub async fn put_cluster(
    client: &async_nats::Client,
    id: &str,
    policy: ClusterPolicy,
) -> Result<ClusterRecord, (String, String)> {
    admin(
        client,
        subjects::admin::CLUSTER_PUT,
        &PutCluster {
            v: SCHEMA_VERSION,
            id: cid(id),
            policy,
        },
        Codec::MsgPack,
    )
    .await
}

pub fn policy(min: u32, max: u32) -> ClusterPolicy {
    ClusterPolicy {
        min_size: min,
        max_size: max,
        drain_timeout_ms: 500,
        ..ClusterPolicy::default()
    }
}

/// KV as it is now, read directly (not through the allocator's code).
pub struct Snapshot {
    pub servers: BTreeMap<ServerId, (ServerRecord, u64)>,
    pub clusters: BTreeMap<ClusterId, (ClusterRecord, u64)>,
}

/// Every live record of `bucket` with its revision; `None` when KV does
/// not answer (a stream electing its leader after a partition, say). A
/// record that does not decode is a bug, and panics.
async fn read_all<T: Message>(js: &jetstream::Context, bucket: &str) -> Option<Vec<(T, u64)>> {
    let kv = js.get_key_value(bucket).await.ok()?;
    let keys: Vec<String> = kv.keys().await.ok()?.try_collect().await.ok()?;
    let mut out = Vec::new();
    for key in keys {
        if let Some(entry) = kv.entry(&key).await.ok()? {
            if entry.operation == jetstream::kv::Operation::Put {
                let value = Codec::MsgPack
                    .decode(&entry.value)
                    .expect("KV record decodes");
                out.push((value, entry.revision));
            }
        }
    }
    Some(out)
}

impl Snapshot {
    pub async fn read(js: &jetstream::Context) -> Self {
        Self::try_read(js).await.expect("KV answers")
    }

    /// [`Snapshot::read`], or `None` when KV does not answer now.
    pub async fn try_read(js: &jetstream::Context) -> Option<Self> {
        let servers = read_all::<ServerRecord>(js, SERVERS_BUCKET)
            .await?
            .into_iter()
            .map(|(s, rev)| (s.id.clone(), (s, rev)))
            .collect();
        let clusters = read_all::<ClusterRecord>(js, CLUSTERS_BUCKET)
            .await?
            .into_iter()
            .map(|(c, rev)| (c.id.clone(), (c, rev)))
            .collect();
        Some(Self { servers, clusters })
    }

    pub fn cluster(&self, id: &str) -> &ClusterRecord {
        &self.clusters[&cid(id)].0
    }

    pub fn server(&self, id: &str) -> &ServerRecord {
        &self.servers[&sid(id)].0
    }

    pub fn active_members(&self, cluster: &str) -> Vec<ServerId> {
        self.cluster(cluster)
            .members
            .iter()
            .filter(|m| m.state == MemberState::Active)
            .map(|m| m.server.clone())
            .collect()
    }

    /// No half-done work left: nothing joining or draining.
    pub fn settled(&self) -> bool {
        self.clusters
            .values()
            .all(|(c, _)| c.members.iter().all(|m| m.state == MemberState::Active))
            && self
                .servers
                .values()
                .all(|(s, _)| !matches!(s.state, ServerState::Draining { .. }))
    }

    /// The invariants, on settled state: every server is in exactly one
    /// place; the cluster lists and the server records agree.
    pub fn check_invariants(&self, registered: &[ServerId]) -> Result<(), String> {
        let mut listed: HashMap<&ServerId, Vec<&ClusterId>> = HashMap::new();
        for (cluster, _) in self.clusters.values() {
            let size = cluster.size() as u32;
            if size > cluster.policy.max_size {
                return Err(format!("{} has {size} members, above its max", cluster.id));
            }
            for m in &cluster.members {
                listed.entry(&m.server).or_default().push(&cluster.id);
                let Some((server, _)) = self.servers.get(&m.server) else {
                    return Err(format!("{} lists unknown server {}", cluster.id, m.server));
                };
                let agrees = match (m.state, &server.state) {
                    (MemberState::Active, ServerState::Allocated { cluster: c })
                    | (MemberState::Draining, ServerState::Draining { cluster: c, .. }) => {
                        c == &cluster.id
                    }
                    _ => false,
                };
                if !agrees {
                    return Err(format!(
                        "{} lists {} as {:?} but its record says {:?}",
                        cluster.id, m.server, m.state, server.state
                    ));
                }
            }
        }
        for (server, clusters) in &listed {
            if clusters.len() > 1 {
                return Err(format!(
                    "{server} is listed in several clusters: {clusters:?}"
                ));
            }
        }
        for id in registered {
            let Some((server, _)) = self.servers.get(id) else {
                return Err(format!("server {id} was lost from KV"));
            };
            match &server.state {
                ServerState::Free | ServerState::OutOfService { .. } => {
                    if listed.contains_key(id) {
                        return Err(format!("{id} is {:?} but listed", server.state));
                    }
                }
                ServerState::Allocated { cluster } | ServerState::Draining { cluster, .. } => {
                    if listed.get(id).map(|c| c.as_slice()) != Some(&[cluster][..]) {
                        return Err(format!("{id} says {cluster} but is not listed there"));
                    }
                }
            }
        }
        Ok(())
    }
}

/// The ledger outcome of a request, once there is one.
pub async fn outcome(js: &jetstream::Context, id: &RequestId) -> Option<RequestRecord> {
    let kv = js.get_key_value(REQUESTS_BUCKET).await.ok()?;
    let bytes = kv.get(id.as_str()).await.ok()??;
    Codec::MsgPack.decode(&bytes).ok()
}

/// The outcomes of those requests that have one.
pub async fn outcomes(js: &jetstream::Context, requests: &[ReconfigRequest]) -> Vec<RequestRecord> {
    futures::future::join_all(requests.iter().map(|r| outcome(js, &r.id)))
        .await
        .into_iter()
        .flatten()
        .collect()
}

pub async fn wait_outcome(js: &jetstream::Context, id: &RequestId) -> RequestRecord {
    eventually(WAIT, || outcome(js, id))
        .await
        .unwrap_or_else(|| panic!("request {id} was never applied"))
}

/// Waits until KV has no joining or draining entry left.
pub async fn wait_settled(js: &jetstream::Context) -> Snapshot {
    eventually(Duration::from_secs(30), || async {
        let snapshot = Snapshot::read(js).await;
        snapshot.settled().then_some(snapshot)
    })
    .await
    .expect("KV settles (no joining or draining members left)")
}

/// Every event in the audit log, in order.
pub async fn audit_log(js: &jetstream::Context) -> Vec<AuditEvent> {
    let mut stream = js
        .get_stream(subjects::EVENTS_STREAM)
        .await
        .expect("events stream");
    let state = stream.info().await.expect("stream info").state.clone();
    let mut events = Vec::new();
    for seq in state.first_sequence..=state.last_sequence {
        if let Ok(raw) = stream.get_raw_message(seq).await {
            events.push(
                codec::decode(Some(&raw.headers), &raw.payload).expect("audit event decodes"),
            );
        }
    }
    events
}

/// What an agent's user gets when it acts above its station, in cluster
/// `web`: (asking for a reconfiguration, writing `server`'s KV record).
/// Both should be refused by the server.
pub async fn act_as_intruder(
    agent: async_nats::Client,
    server: &str,
) -> (Result<(), String>, Result<(), String>) {
    let mut js = jetstream::new(agent);
    js.set_timeout(Duration::from_secs(2));
    let request = ReconfigRequest::new(
        cid("web"),
        ReconfigAction::Allocate {
            count: 1,
            request_type: None,
        },
        "intruder",
    );
    let asked = headroom_shared::bus::request_reconfig(&js, &request)
        .await
        .map(|_| ())
        .map_err(|e| e.to_string());
    let wrote = async {
        let bucket = js.get_key_value(SERVERS_BUCKET).await?;
        bucket
            .put(server, bytes::Bytes::from_static(b"forged"))
            .await?;
        Ok::<_, async_nats::Error>(())
    }
    .await
    .map_err(|e| e.to_string());
    (asked, wrote)
}

/// Messages in a stream now.
pub async fn stream_messages(js: &jetstream::Context, stream: &str) -> u64 {
    js.get_stream(stream)
        .await
        .expect("stream")
        .info()
        .await
        .expect("stream info")
        .state
        .messages
}
