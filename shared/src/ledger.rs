//! The request ledger in `headroom-requests`: each reconfiguration
//! request's mark that it was taken up, and its one outcome, so that a
//! redelivered request is applied at most once.

use serde::{Deserialize, Serialize};

use crate::codec::message;
use crate::errors::BusError;
use crate::ids::{ClusterId, RequestId, ServerId};
use crate::wire::ReconfigAction;

/// The outcome of a reconfiguration request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// Applied; `servers` are the ones it touched. A partial allocation is
    /// applied with the shortfall named in `error`.
    Applied {
        #[serde(default)]
        servers: Vec<ServerId>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        error: Option<BusError>,
    },
    Rejected {
        error: BusError,
    },
}

/// A request's outcome, in `headroom-requests`. Written once (create), so
/// a request has one outcome whoever applies it and however often it is
/// delivered.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RequestRecord {
    #[serde(default = "crate::codec::default_schema_version")]
    pub v: u16,
    pub id: RequestId,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster: Option<ClusterId>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub action: Option<ReconfigAction>,
    pub outcome: Outcome,
    /// The allocator instance that applied it.
    pub by: String,
    /// Which delivery of the request applied it (above 1: an allocator
    /// stopped or crashed while it was in flight).
    #[serde(default)]
    pub delivery: u64,
    pub at_ms: u64,
}
message!(RequestRecord, "request_record");

/// The ledger's mark that a request has been taken up, in
/// `headroom-requests` under [`RequestStarted::key`]. Created once, before
/// the request's first write, by whichever delivery comes first; every
/// later delivery reads it. Whatever the request changes happens after the
/// cluster generation it names, so a redelivery can tell its own past
/// work, and entries that were not there yet, from what came before.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RequestStarted {
    #[serde(default = "crate::codec::default_schema_version")]
    pub v: u16,
    pub id: RequestId,
    pub cluster: ClusterId,
    /// The cluster's generation when the request was first taken up (0 if
    /// the cluster did not exist).
    pub generation: u64,
    pub by: String,
    pub at_ms: u64,
}
message!(RequestStarted, "request_started");

impl RequestStarted {
    /// Its key: apart from the outcomes (request ids have no '.').
    pub fn key(id: &RequestId) -> String {
        format!("started.{id}")
    }
}
