//! The reconfiguration request consumer: a durable JetStream pull consumer
//! shared by every allocator instance.
//!
//! A request is applied, its outcome written once to the ledger, then
//! acknowledged. A crash before the ack makes JetStream deliver it again;
//! the ledger (and the request id on every KV write) make that redelivery a
//! no-op, so each request is applied at most once and none is lost.

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, consumer::pull, AckKind};
use futures::StreamExt;
use headroom_shared::codec;
use headroom_shared::config::AllocatorConfig;
use headroom_shared::errors::{codes, BusError};
use headroom_shared::ledger::{Outcome, RequestRecord};
use headroom_shared::subjects::{self, ALLOCATOR_CONSUMER};
use headroom_shared::time::now_ms;
use headroom_shared::wire::{EventKind, ReconfigRequest};
use headroom_shared::{ClusterId, SCHEMA_VERSION};
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, warn};

use crate::ops::{Allocator, Event, Fact, OpError};
use crate::AllocatorError;

/// Creates (or binds to) the shared durable consumer.
///
/// # Errors
/// When the stream or consumer cannot be set up.
pub async fn consumer(
    js: &jetstream::Context,
    replicas: usize,
    config: &AllocatorConfig,
) -> Result<jetstream::consumer::Consumer<pull::Config>, AllocatorError> {
    let stream = js
        .get_or_create_stream(subjects::reconfig_stream(replicas))
        .await
        .map_err(|e| AllocatorError::Setup("reconfig stream", e.into()))?;
    stream
        .get_or_create_consumer(
            ALLOCATOR_CONSUMER,
            pull::Config {
                durable_name: Some(ALLOCATOR_CONSUMER.to_owned()),
                description: Some("Headroom allocators".to_owned()),
                ack_policy: jetstream::consumer::AckPolicy::Explicit,
                ack_wait: config.ack_wait,
                max_deliver: -1,
                max_ack_pending: 1_000,
                num_replicas: replicas,
                ..Default::default()
            },
        )
        .await
        .map_err(|e| AllocatorError::Setup("allocator consumer", e.into()))
}

/// Pulls and applies requests until `shutdown`, `max_in_flight` at a time.
/// While one is worked on, JetStream is told so every third of `ack_wait`,
/// so a slow request is not handed to another instance while this one is
/// alive (a crash still hands it on after `ack_wait`).
pub async fn serve(
    allocator: Arc<Allocator>,
    consumer: jetstream::consumer::Consumer<pull::Config>,
    max_in_flight: usize,
    ack_wait: Duration,
    shutdown: CancellationToken,
) -> Result<(), AllocatorError> {
    let messages = consumer
        .stream()
        .max_messages_per_batch(max_in_flight)
        .heartbeat(Duration::from_secs(5))
        .expires(Duration::from_secs(30))
        .messages()
        .await
        .map_err(|e| AllocatorError::Setup("request stream", e.into()))?;
    messages
        .take_until(shutdown.cancelled_owned())
        .for_each_concurrent(max_in_flight, |message| {
            let allocator = allocator.clone();
            async move {
                match message {
                    Ok(message) => working(&message, ack_wait, handle(&allocator, &message)).await,
                    // Missed heartbeats and the like: the stream carries on.
                    Err(err) => warn!(%err, "request consumer"),
                }
            }
        })
        .await;
    Ok(())
}

/// Runs `work` on `message`, telling JetStream it is in progress until done.
async fn working(
    message: &jetstream::Message,
    ack_wait: Duration,
    work: impl std::future::Future<Output = ()>,
) {
    let every = (ack_wait / 3).max(Duration::from_millis(100));
    let mut progress = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    tokio::pin!(work);
    loop {
        tokio::select! {
            () = &mut work => return,
            _ = progress.tick() => {
                if let Err(err) = message.ack_with(AckKind::Progress).await {
                    debug!(%err, "could not extend a request's ack wait");
                }
            }
        }
    }
}

/// One request: decoded, checked against the ledger, applied, and its
/// outcome recorded before it is acknowledged. Each step that cannot go on
/// acknowledges the message as it must (terminated when malformed, acked
/// when done already, redelivered when it can be tried again).
async fn handle(allocator: &Allocator, message: &jetstream::Message) {
    let subject_cluster =
        subjects::reconfig_cluster(&message.subject).and_then(|token| ClusterId::new(token).ok());
    let Some(request) = decoded(allocator, message, subject_cluster.as_ref()).await else {
        return;
    };
    if done_already(allocator, message, &request).await {
        return;
    }
    let Some(outcome) = outcome_of(allocator, message, &request, subject_cluster.as_ref()).await
    else {
        return;
    };
    settle(allocator, message, &request, outcome).await;
}

/// The request, or `None` when it is malformed (logged, counted, and
/// not delivered again).
async fn decoded(
    allocator: &Allocator,
    message: &jetstream::Message,
    subject_cluster: Option<&ClusterId>,
) -> Option<ReconfigRequest> {
    let err = match codec::decode(message.headers.as_ref(), &message.payload) {
        Ok(request) => return Some(request),
        Err(err) => err,
    };
    warn!(%err, subject = %message.subject, "rejected a malformed request");
    let seq = message
        .info()
        .map(|i| i.stream_sequence)
        .unwrap_or_default();
    let event = Event::new(
        EventKind::Rejected {
            error: BusError::new(err.code(), err.to_string()),
        },
        Fact::Malformed { sequence: seq },
    )
    .cluster(subject_cluster)
    .detail(format!("stream sequence {seq}"));
    allocator.log(event).await;
    allocator.metrics.requests.inc(&["unknown", "malformed"]);
    // Nothing to retry: tell JetStream to stop delivering it.
    ack(message, AckKind::Term).await;
    None
}

/// Whether the ledger has the request's outcome already (then it is
/// acked), or cannot be read (then it comes again).
async fn done_already(
    allocator: &Allocator,
    message: &jetstream::Message,
    request: &ReconfigRequest,
) -> bool {
    match allocator.store.outcome(&request.id).await {
        Ok(Some(done)) => {
            debug!(request = %request.id, outcome = ?done.outcome, "already applied");
            allocator
                .metrics
                .requests
                .inc(&[request.action.name(), "duplicate"]);
            ack(message, AckKind::Ack).await;
            true
        }
        Ok(None) => false,
        Err(err) => {
            warn!(%err, "cannot read the outcome ledger; will retry");
            ack(message, AckKind::Nak(Some(Duration::from_secs(1)))).await;
            true
        }
    }
}

/// Applies the request: its outcome, or `None` when it failed in a way
/// that may pass (then it comes again).
async fn outcome_of(
    allocator: &Allocator,
    message: &jetstream::Message,
    request: &ReconfigRequest,
    subject_cluster: Option<&ClusterId>,
) -> Option<Outcome> {
    let started = std::time::Instant::now();
    let result = if subject_cluster != Some(&request.cluster) {
        Err(OpError::Rejected(BusError::new(
            codes::SUBJECT_MISMATCH,
            format!(
                "request for cluster {} arrived on {}",
                request.cluster, message.subject
            ),
        )))
    } else {
        allocator.apply(request).await
    };
    allocator.metrics.request_seconds.observe(started.elapsed());
    match result {
        Ok(outcome) => Some(outcome),
        Err(OpError::Rejected(error)) => Some(Outcome::Rejected { error }),
        Err(err) => {
            allocator
                .metrics
                .requests
                .inc(&[request.action.name(), "retry"]);
            error!(%err, request = %request.id, "request failed; it will be retried");
            ack(message, AckKind::Nak(Some(Duration::from_millis(500)))).await;
            None
        }
    }
}

/// Records the outcome in the ledger (the first one recorded stands),
/// logs what was not applied, and acknowledges the request.
async fn settle(
    allocator: &Allocator,
    message: &jetstream::Message,
    request: &ReconfigRequest,
    outcome: Outcome,
) {
    let record = RequestRecord {
        v: SCHEMA_VERSION,
        id: request.id.clone(),
        cluster: Some(request.cluster.clone()),
        action: Some(request.action.clone()),
        outcome,
        by: allocator.instance().to_owned(),
        delivery: message
            .info()
            .ok()
            .and_then(|i| u64::try_from(i.delivered).ok())
            .unwrap_or(1),
        at_ms: now_ms(),
    };
    let stands = match allocator.store.record_outcome(&record).await {
        Ok(stands) => stands,
        Err(err) => {
            warn!(%err, "cannot record the outcome; will retry");
            ack(message, AckKind::Nak(Some(Duration::from_secs(1)))).await;
            return;
        }
    };
    let (error, counted) = match &stands.outcome {
        Outcome::Rejected { error } => (Some(error), "rejected"),
        Outcome::Applied { error, .. } => (error.as_ref(), "applied"),
    };
    allocator
        .metrics
        .requests
        .inc(&[request.action.name(), counted]);
    if let Some(error) = error {
        warn!(request = %request.id, %error, "request not (fully) applied");
        let event = Event::new(
            EventKind::Rejected {
                error: error.clone(),
            },
            Fact::Request {
                request: &request.id,
                server: None,
            },
        )
        .cluster(&request.cluster)
        .request(&request.id)
        .detail(format!(
            "{} request from {:?}",
            request.action.name(),
            request.origin
        ));
        allocator.log(event).await;
    }
    ack(message, AckKind::Ack).await;
}

async fn ack(message: &jetstream::Message, kind: AckKind) {
    // A lost ack means a redelivery, which the ledger absorbs.
    let result = match kind {
        AckKind::Ack => message.double_ack().await,
        other => message.ack_with(other).await,
    };
    if let Err(err) = result {
        warn!(%err, "could not acknowledge a request");
    }
}
