//! Identifiers for servers, clusters and requests.
//!
//! Every id ends up as a NATS subject token and a JetStream KV key, so it is
//! validated once, where it is made: a wildcard or a dot smuggled into an id
//! would otherwise widen a subscription or address the wrong key.

use std::fmt;

use serde::{Deserialize, Serialize};

/// Longest server or cluster id; keeps subjects and keys short and bounded.
pub const MAX_NAME_LEN: usize = 64;
/// Longest request id: room for ids Headroom derives from a server or
/// cluster id, such as `failed-<server>-<revision>`.
pub const MAX_REQUEST_ID_LEN: usize = 128;

/// Why a string is not a valid id.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    #[error("{what} id is empty")]
    Empty { what: &'static str },
    #[error("{what} id is longer than {max} characters")]
    TooLong { what: &'static str, max: usize },
    #[error("{what} id {id:?} has {bad:?}; only ASCII letters, digits, '-' and '_' are allowed")]
    BadChar {
        what: &'static str,
        id: String,
        bad: char,
    },
}

fn validate(what: &'static str, max: usize, id: &str) -> Result<(), IdError> {
    if id.is_empty() {
        return Err(IdError::Empty { what });
    }
    if id.len() > max {
        return Err(IdError::TooLong { what, max });
    }
    if let Some(bad) = id
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || *c == '-' || *c == '_'))
    {
        return Err(IdError::BadChar {
            what,
            id: id.to_owned(),
            bad,
        });
    }
    Ok(())
}

macro_rules! id_type {
    ($(#[$doc:meta])* $name:ident, $what:literal, $max:expr) => {
        $(#[$doc])*
        #[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        #[serde(try_from = "String", into = "String")]
        pub struct $name(String);

        impl $name {
            /// Checks and wraps an id.
            ///
            /// # Errors
            /// When the id is empty, too long, or has a character that is
            /// not safe in a subject token or KV key.
            pub fn new(id: impl Into<String>) -> Result<Self, IdError> {
                let id = id.into();
                validate($what, $max, &id)?;
                Ok(Self(id))
            }

            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl TryFrom<String> for $name {
            type Error = IdError;
            fn try_from(id: String) -> Result<Self, IdError> {
                Self::new(id)
            }
        }

        impl std::str::FromStr for $name {
            type Err = IdError;
            fn from_str(id: &str) -> Result<Self, IdError> {
                Self::new(id)
            }
        }

        impl From<$name> for String {
            fn from(id: $name) -> String {
                id.0
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({:?})", stringify!($name), self.0)
            }
        }
    };
}

id_type!(
    /// A backend server, as registered in the pool.
    ServerId,
    "server",
    MAX_NAME_LEN
);
id_type!(
    /// A cluster: a set of members behind the same front-ends.
    ClusterId,
    "cluster",
    MAX_NAME_LEN
);
id_type!(
    /// A reconfiguration request; also its JetStream de-duplication id.
    RequestId,
    "request",
    MAX_REQUEST_ID_LEN
);

impl RequestId {
    /// A fresh, unique request id (a NUID: 22 base-62 characters).
    pub fn random() -> Self {
        Self(nuid::next().to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_subject_safe_ids() {
        assert!(ServerId::new("web-01_a").is_ok());
    }

    #[test]
    fn rejects_wildcards_dots_and_spaces() {
        for bad in ["a.b", "*", ">", "a b", "", "é"] {
            assert!(ClusterId::new(bad).is_err(), "{bad:?} should be rejected");
        }
        assert!(ServerId::new("x".repeat(MAX_NAME_LEN + 1)).is_err());
        assert!(RequestId::new("x".repeat(MAX_REQUEST_ID_LEN + 1)).is_err());
    }

    #[test]
    fn derived_request_ids_fit_the_longest_names() {
        let server = "s".repeat(MAX_NAME_LEN);
        assert!(RequestId::new(format!("failed-{server}-{}", u64::MAX)).is_ok());
        assert!(RequestId::new(format!("fill-{}", "c".repeat(MAX_NAME_LEN))).is_ok());
    }

    #[test]
    fn random_request_ids_are_valid_and_distinct() {
        let a = RequestId::random();
        let b = RequestId::random();
        assert_ne!(a, b);
        assert!(RequestId::new(a.as_str()).is_ok());
    }

    #[test]
    fn deserialising_validates() {
        let bytes = rmp_serde::to_vec("bad.id").expect("encode");
        assert!(rmp_serde::from_slice::<ServerId>(&bytes).is_err());
    }
}
