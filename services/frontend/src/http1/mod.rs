//! HTTP/1.1 on the wire (RFC 9112), for both of the front-end's sides: the
//! server reading clients' requests and the client reading members'
//! answers. Request smuggling is decided here: a message is read one way
//! only, and a head that another hop could read another way is refused.
//!
//! - [`parse`]: request and answer heads, and what they say of the body
//!   and the connection.
//! - [`headers`]: the headers that are HTTP/1.1's own (hop-by-hop,
//!   `Connection`, `Transfer-Encoding`, `Content-Length`).
//! - [`lines`]: a member's header lines kept as they came, for a client on
//!   HTTP/1.
//! - [`framing`]: how a body is delimited, and reading one as it comes.
//! - [`chunked`]: the chunked coding both ways.
//! - [`write`]: answer heads, and the pieces of request heads.
//!
//! Nothing here touches a socket: `server` and `upstream` drive the
//! connections.

pub mod chunked;
pub mod framing;
pub mod headers;
pub mod lines;
pub mod parse;
pub mod write;

pub use chunked::Step;
pub use framing::{Answering, BodyDecoder, Framing};
pub use lines::Lines;
pub use parse::{Asked, Refusal, RequestHead, ResponseHead};

/// A message that is not valid HTTP/1.1, and what is wrong with it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Malformed(pub &'static str);

#[cfg(test)]
mod tests;
