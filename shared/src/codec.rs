//! Encoding and decoding of every message on the bus and in KV.
//!
//! MessagePack with named fields is the default; JSON and XML are accepted
//! for interop and for reading on the wire. The `content-type` header picks
//! the codec; a message without one is MessagePack. Every message carries a
//! schema version `v`, checked on decode, so a newer writer is refused with a
//! clear error instead of being half-understood.

use async_nats::HeaderMap;
use bytes::Bytes;
use serde::{de::DeserializeOwned, Serialize};

/// Header naming the codec of the body.
pub const CONTENT_TYPE: &str = "content-type";
/// The schema version this build writes and reads.
pub const SCHEMA_VERSION: u16 = 1;

/// A body format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Codec {
    #[default]
    MsgPack,
    Json,
    Xml,
}

impl Codec {
    pub const ALL: [Codec; 3] = [Codec::MsgPack, Codec::Json, Codec::Xml];

    pub fn content_type(self) -> &'static str {
        match self {
            Codec::MsgPack => "application/msgpack",
            Codec::Json => "application/json",
            Codec::Xml => "application/xml",
        }
    }

    /// The codec a `content-type` value names; parameters such as
    /// `; charset=utf-8` are ignored.
    ///
    /// # Errors
    /// [`WireError::UnknownContentType`] for anything else.
    pub fn from_content_type(value: &str) -> Result<Self, WireError> {
        let essence = value
            .split(';')
            .next()
            .unwrap_or_default()
            .trim()
            .to_ascii_lowercase();
        match essence.as_str() {
            "application/msgpack" | "application/x-msgpack" | "application/vnd.msgpack" => {
                Ok(Codec::MsgPack)
            }
            "application/json" => Ok(Codec::Json),
            "application/xml" | "text/xml" => Ok(Codec::Xml),
            _ => Err(WireError::UnknownContentType(value.to_owned())),
        }
    }

    /// The codec of a message: its `content-type` header, MessagePack when
    /// there is none.
    ///
    /// # Errors
    /// [`WireError::UnknownContentType`] when the header names no codec here.
    pub fn of(headers: Option<&HeaderMap>) -> Result<Self, WireError> {
        match headers.and_then(|h| h.get(CONTENT_TYPE)) {
            Some(value) => Self::from_content_type(value.as_str()),
            None => Ok(Codec::MsgPack),
        }
    }

    /// Headers announcing this codec.
    pub fn headers(self) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(CONTENT_TYPE, self.content_type());
        headers
    }

    /// # Errors
    /// [`WireError::Encode`] when the value cannot be written in this codec.
    pub fn encode<T: Message>(self, message: &T) -> Result<Bytes, WireError> {
        let bytes = match self {
            Codec::MsgPack => {
                rmp_serde::to_vec_named(message).map_err(|e| WireError::Encode(e.to_string()))?
            }
            Codec::Json => {
                serde_json::to_vec(message).map_err(|e| WireError::Encode(e.to_string()))?
            }
            Codec::Xml => crate::xml::to_string(T::KIND, message)
                .map_err(|e| WireError::Encode(e.to_string()))?
                .into_bytes(),
        };
        Ok(Bytes::from(bytes))
    }

    /// # Errors
    /// [`WireError::Malformed`] when the body does not decode as `T`,
    /// [`WireError::UnsupportedVersion`] when it has another schema version.
    pub fn decode<T: Message>(self, body: &[u8]) -> Result<T, WireError> {
        let message: T = match self {
            Codec::MsgPack => rmp_serde::from_slice(body).map_err(|e| malformed::<T>(self, e))?,
            Codec::Json => serde_json::from_slice(body).map_err(|e| malformed::<T>(self, e))?,
            Codec::Xml => {
                let text = std::str::from_utf8(body).map_err(|e| malformed::<T>(self, e))?;
                crate::xml::from_str(text).map_err(|e| malformed::<T>(self, e))?
            }
        };
        if message.schema_version() != SCHEMA_VERSION {
            return Err(WireError::UnsupportedVersion {
                kind: T::KIND,
                found: message.schema_version(),
                supported: SCHEMA_VERSION,
            });
        }
        Ok(message)
    }
}

fn malformed<T: Message>(codec: Codec, err: impl std::fmt::Display) -> WireError {
    WireError::Malformed {
        kind: T::KIND,
        codec: codec.content_type(),
        reason: err.to_string(),
    }
}

/// Decodes a NATS message body with the codec its headers name.
///
/// # Errors
/// See [`Codec::of`] and [`Codec::decode`].
pub fn decode<T: Message>(headers: Option<&HeaderMap>, body: &[u8]) -> Result<T, WireError> {
    Codec::of(headers)?.decode(body)
}

/// Any body as JSON for people to read, whatever its type: MessagePack and
/// JSON become a JSON value, XML is shown as its text.
///
/// # Errors
/// The body is not what its `content-type` says.
pub fn readable(headers: Option<&HeaderMap>, body: &[u8]) -> Result<serde_json::Value, WireError> {
    let codec = Codec::of(headers)?;
    let bad = |e: &dyn std::fmt::Display| WireError::Malformed {
        kind: "message",
        codec: codec.content_type(),
        reason: e.to_string(),
    };
    match codec {
        Codec::MsgPack => rmp_serde::from_slice(body).map_err(|e| bad(&e)),
        Codec::Json => serde_json::from_slice(body).map_err(|e| bad(&e)),
        Codec::Xml => std::str::from_utf8(body)
            .map(|t| serde_json::Value::String(t.to_owned()))
            .map_err(|e| bad(&e)),
    }
}

/// Encodes as MessagePack, the default on the bus and the only form in KV.
///
/// # Errors
/// [`WireError::Encode`].
pub fn encode<T: Message>(message: &T) -> Result<Bytes, WireError> {
    Codec::MsgPack.encode(message)
}

/// A type that travels on the bus or sits in KV.
pub trait Message: Serialize + DeserializeOwned {
    /// Its name in errors and as the XML root element.
    const KIND: &'static str;
    fn schema_version(&self) -> u16;
}

/// Makes a struct with a `v` field a [`Message`] named `$kind`.
macro_rules! message {
    ($name:ident, $kind:literal) => {
        impl $crate::codec::Message for $name {
            const KIND: &'static str = $kind;
            fn schema_version(&self) -> u16 {
                self.v
            }
        }
    };
}
pub(crate) use message;

/// The schema version a body without one is read as (serde's default).
pub(crate) fn default_schema_version() -> u16 {
    SCHEMA_VERSION
}

/// Why a body could not be read or written.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum WireError {
    #[error(
        "unknown content-type {0:?}; use application/msgpack, application/json or application/xml"
    )]
    UnknownContentType(String),
    #[error("malformed {kind} ({codec}): {reason}")]
    Malformed {
        kind: &'static str,
        codec: &'static str,
        reason: String,
    },
    #[error("{kind} has schema version {found}; this build reads version {supported}")]
    UnsupportedVersion {
        kind: &'static str,
        found: u16,
        supported: u16,
    },
    #[error("could not encode: {0}")]
    Encode(String),
}

impl WireError {
    /// The stable error code this maps to on the bus.
    pub fn code(&self) -> &'static str {
        match self {
            WireError::UnsupportedVersion { .. } => crate::errors::codes::UNSUPPORTED_VERSION,
            WireError::Encode(_) => crate::errors::codes::INTERNAL,
            WireError::UnknownContentType(_) | WireError::Malformed { .. } => {
                crate::errors::codes::MALFORMED
            }
        }
    }
}
