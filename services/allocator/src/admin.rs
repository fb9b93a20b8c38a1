//! The allocator's admin endpoints, on the NATS services API so standard
//! tooling can discover, ping and read stats of every instance
//! (`$SRV.PING.headroom-allocator`). Requests and replies use the codec the
//! request's `content-type` names; an error reply carries the services
//! API's error headers plus `Headroom-Error-Code` with the stable code.

use std::sync::Arc;

use async_nats::service::{self, ServiceExt};
use bytes::Bytes;
use futures::StreamExt;
use headroom_shared::codec::{Codec, Message, WireError};
use headroom_shared::errors::{codes, BusError};
use headroom_shared::records::MemberState;
use headroom_shared::subjects::{self, admin};
use headroom_shared::wire::{
    ClusterList, DeregisterServer, DrainMember, DrainQueued, Empty, GetCluster, PutCluster,
    ReconfigAction, ReconfigRequest, RegisterServer, ServerList, ERROR_CODE_HEADER,
};
use headroom_shared::{bus, SCHEMA_VERSION};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::warn;

use crate::ops::{Allocator, OpError};
use crate::AllocatorError;

pub const SERVICE_NAME: &str = "headroom-allocator";

const ENDPOINTS: [(&str, &str); 8] = [
    ("pool-list", admin::POOL_LIST),
    ("pool-register", admin::POOL_REGISTER),
    ("pool-register-own", admin::POOL_REGISTER_OWN),
    ("pool-deregister", admin::POOL_DEREGISTER),
    ("cluster-list", admin::CLUSTER_LIST),
    ("cluster-get", admin::CLUSTER_GET),
    ("cluster-put", admin::CLUSTER_PUT),
    ("member-drain", admin::MEMBER_DRAIN),
];

/// Starts the service and answers requests until `shutdown`.
///
/// # Errors
/// When the service or an endpoint cannot be registered.
pub async fn serve(
    allocator: Arc<Allocator>,
    client: async_nats::Client,
    shutdown: CancellationToken,
) -> Result<(), AllocatorError> {
    let service = client
        .service_builder()
        .description("Headroom allocator: free pool and cluster membership")
        .metadata([("instance".to_owned(), allocator.instance().to_owned())].into())
        .start(SERVICE_NAME, env!("CARGO_PKG_VERSION"))
        .await
        .map_err(|e| AllocatorError::Setup("admin service", e))?;
    let group = service.group(subjects::ADMIN_GROUP);
    let mut tasks = JoinSet::new();
    for (name, subject) in ENDPOINTS {
        let mut endpoint = group
            .endpoint_builder()
            .name(name)
            .add(subject)
            .await
            .map_err(|e| AllocatorError::Setup("admin endpoint", e))?;
        let allocator = allocator.clone();
        let shutdown = shutdown.clone();
        tasks.spawn(async move {
            loop {
                let request = tokio::select! {
                    _ = shutdown.cancelled() => break,
                    next = endpoint.next() => match next {
                        Some(request) => request,
                        None => break,
                    },
                };
                answer(&allocator, subject, request).await;
            }
            let _ = endpoint.stop().await;
        });
    }
    while tasks.join_next().await.is_some() {}
    if let Err(err) = service.stop().await {
        warn!(%err, "admin service did not stop cleanly");
    }
    Ok(())
}

async fn answer(allocator: &Allocator, subject: &str, request: service::Request) {
    let codec = Codec::of(request.message.headers.as_ref());
    let sent_to = request.message.subject.as_str();
    let (codec, result) = match codec {
        Ok(codec) => (
            codec,
            dispatch(
                allocator,
                (subject, sent_to),
                codec,
                &request.message.payload,
            )
            .await,
        ),
        Err(err) => (Codec::default(), Err(AdminError::Wire(err))),
    };
    let mut headers = codec.headers();
    let response = result.map_err(|err| {
        let bus = err.to_bus();
        headers.insert(ERROR_CODE_HEADER, bus.code.as_str());
        service::error::Error {
            status: bus.to_string(),
            code: status_of(&bus.code),
        }
    });
    if let Err(err) = request.respond_with_headers(response, headers).await {
        warn!(%err, subject, "could not answer an admin request");
    }
}

#[derive(Debug, thiserror::Error)]
enum AdminError {
    #[error(transparent)]
    Wire(#[from] WireError),
    #[error(transparent)]
    Op(#[from] OpError),
    #[error("could not queue the request: {0}")]
    Queue(#[from] bus::PublishError),
}

impl AdminError {
    fn to_bus(&self) -> BusError {
        match self {
            AdminError::Wire(e) => BusError::new(e.code(), e.to_string()),
            AdminError::Op(OpError::Rejected(e)) => e.clone(),
            other => BusError::new(codes::INTERNAL, other.to_string()),
        }
    }
}

/// HTTP-like status for the services API's numeric error code.
fn status_of(code: &str) -> usize {
    match code {
        codes::MALFORMED | codes::UNSUPPORTED_VERSION | codes::INVALID => 400,
        codes::UNKNOWN_CLUSTER | codes::UNKNOWN_SERVER | codes::NOT_A_MEMBER => 404,
        codes::SERVER_IN_USE
        | codes::CONFLICT
        | codes::AT_MAX_SIZE
        | codes::AT_MIN_SIZE
        | codes::POOL_EXHAUSTED => 409,
        _ => 500,
    }
}

/// The list calls take no arguments: an empty body, or an empty message
/// in the request's codec. Anything else is refused like any bad body.
fn no_arguments(codec: Codec, body: &[u8]) -> Result<(), AdminError> {
    if body.is_empty() {
        return Ok(());
    }
    codec.decode::<Empty>(body)?;
    Ok(())
}

/// Refuses at once, with the stable code, a drain the request consumer
/// would only reject later: an unknown cluster or server, or a server that
/// is not an active member. The consumer still decides on the state it
/// finds (this is only a check, not a reservation).
async fn drainable(allocator: &Allocator, drain: &DrainMember) -> Result<(), AdminError> {
    let refuse =
        |code, message: String| AdminError::Op(OpError::Rejected(BusError::new(code, message)));
    let (cluster, server) = (&drain.cluster, &drain.server);
    let record = allocator
        .store
        .cluster(cluster)
        .await
        .map_err(OpError::from)?
        .ok_or_else(|| {
            refuse(
                codes::UNKNOWN_CLUSTER,
                format!("no cluster named {cluster}"),
            )
        })?;
    match record.value.member(server).map(|m| m.state) {
        Some(MemberState::Active) => Ok(()),
        Some(state) => Err(refuse(
            codes::NOT_A_MEMBER,
            format!("{server} is {} in {cluster}, not active", state.name()),
        )),
        None => {
            let known = allocator
                .store
                .server(server)
                .await
                .map_err(OpError::from)?
                .is_some();
            Err(if known {
                refuse(
                    codes::NOT_A_MEMBER,
                    format!("{server} is not a member of {cluster}"),
                )
            } else {
                refuse(codes::UNKNOWN_SERVER, format!("no server named {server}"))
            })
        }
    }
}

fn reply<T: Message>(codec: Codec, message: &T) -> Result<Bytes, AdminError> {
    Ok(codec.encode(message)?)
}

/// A server's own registration, on `pool.register.<server>` (`sent_to`).
async fn register_own(
    allocator: &Allocator,
    sent_to: &str,
    codec: Codec,
    body: &[u8],
) -> Result<Bytes, AdminError> {
    let reg: RegisterServer = codec.decode(body)?;
    if sent_to.rsplit('.').next() != Some(reg.id.as_str()) {
        allocator
            .metrics
            .refused
            .inc(&["registration", codes::SUBJECT_MISMATCH]);
        return Err(AdminError::Op(OpError::Rejected(BusError::new(
            codes::SUBJECT_MISMATCH,
            format!("a registration of {} on {sent_to}", reg.id),
        ))));
    }
    reply(codec, &allocator.register(&reg, true).await?)
}

/// Answers a request to endpoint `subject` (sent to `sent_to`, which names
/// the server on a server's own endpoint).
async fn dispatch(
    allocator: &Allocator,
    (subject, sent_to): (&str, &str),
    codec: Codec,
    body: &[u8],
) -> Result<Bytes, AdminError> {
    match subject {
        admin::POOL_LIST => {
            no_arguments(codec, body)?;
            // From the view: a listing never reads the whole bucket.
            reply(
                codec,
                &ServerList {
                    v: SCHEMA_VERSION,
                    servers: allocator.pool.servers(),
                },
            )
        }
        admin::POOL_REGISTER => {
            let reg: RegisterServer = codec.decode(body)?;
            reply(codec, &allocator.register(&reg, false).await?)
        }
        // An agent's: its user may publish here for its own server only,
        // so a body that names another is forged.
        admin::POOL_REGISTER_OWN => register_own(allocator, sent_to, codec, body).await,
        admin::POOL_DEREGISTER => {
            let dereg: DeregisterServer = codec.decode(body)?;
            allocator.deregister(&dereg.id).await?;
            reply(codec, &Empty::new())
        }
        admin::CLUSTER_LIST => {
            no_arguments(codec, body)?;
            let clusters = allocator.store.clusters().await.map_err(OpError::from)?;
            reply(
                codec,
                &ClusterList {
                    v: SCHEMA_VERSION,
                    clusters: clusters.into_iter().map(|c| c.value).collect(),
                },
            )
        }
        admin::CLUSTER_GET => {
            let get: GetCluster = codec.decode(body)?;
            let cluster = allocator
                .store
                .cluster(&get.id)
                .await
                .map_err(OpError::from)?
                .ok_or_else(|| {
                    OpError::Rejected(BusError::new(
                        codes::UNKNOWN_CLUSTER,
                        format!("no cluster named {}", get.id),
                    ))
                })?;
            reply(codec, &cluster.value)
        }
        admin::CLUSTER_PUT => {
            let put: PutCluster = codec.decode(body)?;
            reply(codec, &allocator.put_cluster(&put.id, &put.policy).await?)
        }
        admin::MEMBER_DRAIN => {
            let drain: DrainMember = codec.decode(body)?;
            drainable(allocator, &drain).await?;
            let request = ReconfigRequest {
                reason: "drained by an operator".to_owned(),
                ..ReconfigRequest::new(
                    drain.cluster,
                    ReconfigAction::Release {
                        server: drain.server,
                    },
                    format!("admin@{}", allocator.instance()),
                )
            };
            bus::request_reconfig(&allocator.js, &request).await?;
            reply(
                codec,
                &DrainQueued {
                    v: SCHEMA_VERSION,
                    request: request.id,
                },
            )
        }
        other => Err(AdminError::Op(OpError::Rejected(BusError::new(
            codes::INVALID,
            format!("no admin endpoint {other}"),
        )))),
    }
}
