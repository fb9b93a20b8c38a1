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
    /// When the request was asked ([`ReconfigRequest::issued_ms`]): for
    /// a monitor's request, its decision. 0 when unknown.
    ///
    /// [`ReconfigRequest::issued_ms`]: crate::wire::ReconfigRequest::issued_ms
    #[serde(default)]
    pub issued_ms: u64,
}
message!(RequestStarted, "request_started");

impl RequestStarted {
    /// Its key: apart from the outcomes (request ids have no '.').
    pub fn key(id: &RequestId) -> String {
        format!("started.{id}")
    }
}

/// A front-end and the membership generation it routes by.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FrontendGeneration {
    pub frontend: String,
    pub generation: u64,
}

/// The data plane's word that a request's change is followed by traffic:
/// every live front-end of its cluster routes by a generation that holds
/// it. In `headroom-requests` under [`RequestConfirmed::key`], created
/// once, by whichever allocator instance sees it first; the monitor starts
/// its cooldowns from `confirmed_ms`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RequestConfirmed {
    #[serde(default = "crate::codec::default_schema_version")]
    pub v: u16,
    pub id: RequestId,
    pub cluster: ClusterId,
    /// The first cluster generation that held the request's whole change
    /// (no member of it still joining).
    pub generation: u64,
    /// When it was asked (the decision), 0 when unknown.
    pub issued_ms: u64,
    pub confirmed_ms: u64,
    /// The live front-ends and the generation each had applied.
    pub frontends: Vec<FrontendGeneration>,
    /// Front-ends that fell silent while it waited, so no longer held it
    /// back.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub gone: Vec<String>,
    /// The allocator instance that confirmed it.
    pub by: String,
}
message!(RequestConfirmed, "request_confirmed");

impl RequestConfirmed {
    /// What its keys start with: apart from the outcomes and the marks.
    pub const PREFIX: &'static str = "confirmed.";

    pub fn key(id: &RequestId) -> String {
        format!("{}{id}", Self::PREFIX)
    }

    /// The request whose confirmation a key of the requests bucket holds.
    pub fn of_key(key: &str) -> Option<&str> {
        key.strip_prefix(Self::PREFIX)
    }

    /// Milliseconds from the decision to the confirmation, when the
    /// decision's time is known.
    pub fn waited_ms(&self) -> Option<u64> {
        (self.issued_ms > 0).then(|| self.confirmed_ms.saturating_sub(self.issued_ms))
    }
}
