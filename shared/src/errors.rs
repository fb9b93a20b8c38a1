//! Errors as they travel on the bus: a stable code and a message for
//! people. Every message type and record may carry one, so this module
//! depends on nothing else of the crate.

use serde::{Deserialize, Serialize};

/// Stable error codes carried on the bus (events, admin replies, ledger).
/// Codes are strings, not an enum, so an older reader still shows a code it
/// does not know.
pub mod codes {
    pub const MALFORMED: &str = "malformed";
    pub const UNSUPPORTED_VERSION: &str = "unsupported_version";
    pub const INVALID: &str = "invalid";
    pub const SUBJECT_MISMATCH: &str = "subject_mismatch";
    pub const UNKNOWN_CLUSTER: &str = "unknown_cluster";
    pub const UNKNOWN_SERVER: &str = "unknown_server";
    pub const NOT_A_MEMBER: &str = "not_a_member";
    pub const POOL_EXHAUSTED: &str = "pool_exhausted";
    pub const AT_MAX_SIZE: &str = "at_max_size";
    pub const AT_MIN_SIZE: &str = "at_min_size";
    pub const SERVER_IN_USE: &str = "server_in_use";
    pub const CONFLICT: &str = "conflict";
    /// A redelivered request whose earlier work the cluster's log no
    /// longer reaches back to: it stops rather than risk acting twice.
    pub const PROGRESS_UNKNOWN: &str = "progress_unknown";
    pub const INTERNAL: &str = "internal";
}

/// An error as it travels: a stable code and a message for people.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BusError {
    pub code: String,
    pub message: String,
}

impl BusError {
    pub fn new(code: &str, message: impl Into<String>) -> Self {
        Self {
            code: code.to_owned(),
            message: message.into(),
        }
    }
}

impl std::fmt::Display for BusError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.code, self.message)
    }
}
