//! Publishing Headroom's messages: on core NATS (reports, statuses,
//! membership changes, assignment notices), and durable ones through
//! JetStream (headers, de-duplication id, and waiting for the stream's
//! acknowledgement). Every message goes out in MessagePack with its
//! `content-type`, so NATS tooling and any reader can tell its encoding.

use async_nats::jetstream;

use crate::codec::{Codec, Message, WireError};
use crate::subjects;
use crate::wire::ReconfigRequest;

/// JetStream's de-duplication header.
pub const MSG_ID: &str = "Nats-Msg-Id";

#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error(transparent)]
    Encode(#[from] WireError),
    #[error("publishing to {subject}: {source}")]
    Publish {
        subject: String,
        #[source]
        source: jetstream::context::PublishError,
    },
    #[error("publishing to {subject}: {source}")]
    Core {
        subject: String,
        #[source]
        source: async_nats::PublishError,
    },
}

/// Publishes `message` on core NATS: no stream, no acknowledgement; a
/// reader that misses it catches up by its own means (the next report, a
/// generation gap, a KV read).
///
/// # Errors
/// When the message cannot be encoded, or the client cannot queue it.
pub async fn publish<T: Message>(
    client: &async_nats::Client,
    subject: String,
    message: &T,
) -> Result<(), PublishError> {
    let body = Codec::MsgPack.encode(message)?;
    client
        .publish_with_headers(subject.clone(), Codec::MsgPack.headers(), body)
        .await
        .map_err(|source| PublishError::Core { subject, source })
}

/// Publishes `message` to a stream subject with `msg_id` as its
/// de-duplication id, and waits until the stream has stored it. Returns
/// whether the stream already had a message with that id.
///
/// # Errors
/// When the message cannot be encoded, or the stream does not acknowledge.
pub async fn publish_durable<T: Message>(
    js: &jetstream::Context,
    subject: String,
    msg_id: &str,
    codec: Codec,
    message: &T,
) -> Result<bool, PublishError> {
    let body = codec.encode(message)?;
    let mut headers = codec.headers();
    headers.insert(MSG_ID, msg_id);
    let ack = js
        .publish_with_headers(subject.clone(), headers, body)
        .await
        .map_err(|source| PublishError::Publish {
            subject: subject.clone(),
            source,
        })?
        .await
        .map_err(|source| PublishError::Publish { subject, source })?;
    Ok(ack.duplicate)
}

/// Why an admin call did not give an answer.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("no allocator answers on {subject} (is one running?)")]
    NoAllocator { subject: String },
    #[error("{subject}: {source}")]
    Request {
        subject: String,
        #[source]
        source: async_nats::RequestError,
    },
    #[error("refused: {0}")]
    Refused(crate::errors::BusError),
    #[error(transparent)]
    Wire(#[from] WireError),
}

/// Calls the allocator's admin endpoint `verb` (for example
/// [`subjects::admin::POOL_LIST`]) in MessagePack and decodes its answer.
///
/// # Errors
/// No allocator answers, the call fails, the allocator refuses (with its
/// stable code), or the answer does not decode.
pub async fn admin<Req: Message, Resp: Message>(
    client: &async_nats::Client,
    verb: &str,
    request: &Req,
) -> Result<Resp, AdminError> {
    admin_with(client, verb, request, Codec::MsgPack).await
}

/// [`admin`], with the request in `codec` (the answer comes in the same).
///
/// # Errors
/// As [`admin`].
pub async fn admin_with<Req: Message, Resp: Message>(
    client: &async_nats::Client,
    verb: &str,
    request: &Req,
    codec: Codec,
) -> Result<Resp, AdminError> {
    let subject = format!("{}.{verb}", subjects::ADMIN_GROUP);
    let body = codec.encode(request)?;
    let reply = client
        .request_with_headers(subject.clone(), codec.headers(), body)
        .await
        .map_err(|source| match source.kind() {
            async_nats::RequestErrorKind::NoResponders => AdminError::NoAllocator {
                subject: subject.clone(),
            },
            _ => AdminError::Request {
                subject: subject.clone(),
                source,
            },
        })?;
    if let Some(code) = reply
        .headers
        .as_ref()
        .and_then(|h| h.get(crate::wire::ERROR_CODE_HEADER))
    {
        let message = reply
            .headers
            .as_ref()
            .and_then(|h| h.get("Nats-Service-Error"))
            .map(|v| v.to_string())
            .unwrap_or_default();
        return Err(AdminError::Refused(crate::errors::BusError::new(
            code.as_str(),
            message,
        )));
    }
    Ok(crate::codec::decode(
        reply.headers.as_ref(),
        &reply.payload,
    )?)
}

/// Sends a reconfiguration request to the allocators. Publishing the same
/// request again (same id) within the stream's de-duplication window stores
/// it once; after that, the allocator's outcome ledger still applies it at
/// most once.
///
/// # Errors
/// See [`publish_durable`].
pub async fn request_reconfig(
    js: &jetstream::Context,
    request: &ReconfigRequest,
) -> Result<bool, PublishError> {
    publish_durable(
        js,
        subjects::reconfig(&request.cluster),
        request.id.as_str(),
        Codec::MsgPack,
        request,
    )
    .await
}
