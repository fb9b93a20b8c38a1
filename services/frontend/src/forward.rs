//! The request as a member is sent it: which of the client's headers the
//! front-end reads, noted in one pass over them ([`Present`]), and the
//! head written for the member, with this hop's own headers in place of
//! the client's.

use std::cell::Cell;
use std::net::SocketAddr;

use bytes::BytesMut;
use http::header::{self, HeaderName, HeaderValue};
use http::Version;

use crate::http1::headers::{is_hop_by_hop, named_by_connection};
use crate::http1::write;

/// Header on requests to members naming the routing table's generation.
pub const GENERATION_HEADER: &str = "x-headroom-generation";

/// Which of the headers the front-end reads a request has, noted in one
/// pass over them: most requests have only `Host` of them, and each
/// lookup not made is a hash and a probe saved.
#[derive(Debug, Clone, Copy, Default)]
pub struct Present<'a> {
    /// The first `Host`.
    pub host: Option<&'a HeaderValue>,
    pub connection: bool,
    pub upgrade: bool,
    /// `Authorization` or `Cache-Control`: the cache must look.
    pub cache_terms: bool,
    pub forwarded_for: bool,
}

impl<'a> Present<'a> {
    pub fn of(headers: &'a http::HeaderMap) -> Self {
        let mut present = Self::default();
        for (name, value) in headers {
            if name == header::HOST {
                present.host = present.host.or(Some(value));
            } else if name == header::CONNECTION {
                present.connection = true;
            } else if name == header::UPGRADE {
                present.upgrade = true;
            } else if name == header::AUTHORIZATION || name == header::CACHE_CONTROL {
                present.cache_terms = true;
            } else if name == X_FORWARDED_FOR {
                present.forwarded_for = true;
            }
        }
        present
    }
}

/// The protocol an HTTP/1.1 request asks to switch to: `Upgrade`, named
/// by `Connection` (RFC 9110 §7.8). HTTP/2 has no such switch.
///
/// A switch to cleartext HTTP/2 (`h2c`) is about the client's connection
/// to the front-end, not the member's: passed on, the member would take
/// the client's connection over and its requests would go by routing,
/// cache and balancing. So it is not passed on (the request goes as an
/// ordinary one), as RFC 9113 has since dropped that switch anyway.
pub fn upgrade_asked<'a>(
    parts: &'a http::request::Parts,
    present: &Present<'_>,
) -> Option<&'a HeaderValue> {
    if parts.version != Version::HTTP_11 || !(present.upgrade && present.connection) {
        return None;
    }
    let protocol = parts.headers.get(header::UPGRADE)?;
    let h2c = protocol.to_str().map_or(true, |p| {
        p.split(',').any(|p| p.trim().eq_ignore_ascii_case("h2c"))
    });
    let named = named_by_connection(&parts.headers.get_all(header::CONNECTION), &header::UPGRADE);
    (named && !h2c).then_some(protocol)
}

/// What follows the request head on the connection to the member.
#[derive(Clone, Copy)]
pub enum Then<'a> {
    /// Nothing, or a body as long as the client's `content-length` says.
    AsIs,
    /// A body, chunked.
    Chunked,
    /// Another protocol, if the member agrees to switch (`Upgrade`).
    Upgrade(&'a HeaderValue),
}

/// A name looked up on every request: as a `HeaderName` it is not parsed
/// from a string at each lookup.
static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");

/// Headers the proxy writes itself, so a client's are not passed on.
fn set_by_proxy(name: &HeaderName) -> bool {
    name == header::HOST
        || name == header::EXPECT
        || name.as_str() == "x-forwarded-for"
        || name.as_str() == "x-forwarded-proto"
        || name.as_str() == "x-forwarded-host"
        || name.as_str() == GENERATION_HEADER
}

thread_local! {
    /// A worker's buffer for request heads, used again from one request to
    /// the next instead of allocated for each (see `recycle_head`).
    static HEADS: Cell<Option<BytesMut>> = const { Cell::new(None) };
}

/// Gives a request head's buffer back once it has been sent.
pub fn recycle_head(head: BytesMut) {
    HEADS.with(|heads| heads.set(Some(head)));
}

/// Where a request goes and what the member is told of it.
pub struct Forwarded<'a> {
    pub path_and_query: &'a str,
    pub host: Option<&'a str>,
    /// The member's `host:port`, the host when the client named none.
    pub member: &'a str,
    pub client: SocketAddr,
    pub generation: u64,
    pub then: Then<'a>,
    pub present: Present<'a>,
}

/// The request head for the member, written once as HTTP/1.1: the
/// client's end-to-end headers plus who asked and through what, and which
/// membership generation routed it (so members and tests can tell a
/// request routed before a change from one routed after).
pub fn request_head(parts: &http::request::Parts, forwarded: &Forwarded<'_>) -> BytesMut {
    let &Forwarded {
        path_and_query,
        host,
        member,
        client,
        generation,
        then,
        present,
    } = forwarded;
    use write::header_line as line;
    let chunked = matches!(then, Then::Chunked);
    let mut head = HEADS.with(Cell::take).unwrap_or_default();
    head.clear();
    head.reserve(512 + path_and_query.len());
    head.extend_from_slice(parts.method.as_str().as_bytes());
    head.extend_from_slice(b" ");
    head.extend_from_slice(path_and_query.as_bytes());
    head.extend_from_slice(b" HTTP/1.1\r\n");
    line(&mut head, b"host", host.unwrap_or(member).as_bytes());
    let connection = present
        .connection
        .then(|| parts.headers.get_all(header::CONNECTION));
    for (name, value) in &parts.headers {
        if is_hop_by_hop(name)
            || set_by_proxy(name)
            || (chunked && name == header::CONTENT_LENGTH)
            || connection
                .as_ref()
                .is_some_and(|connection| named_by_connection(connection, name))
        {
            continue;
        }
        line(&mut head, name.as_str().as_bytes(), value.as_bytes());
    }
    // Earlier proxies' addresses, then the client's.
    head.extend_from_slice(b"x-forwarded-for: ");
    if present.forwarded_for {
        for value in parts.headers.get_all(&X_FORWARDED_FOR) {
            head.extend_from_slice(value.as_bytes());
            head.extend_from_slice(b", ");
        }
    }
    write::ip(&mut head, client.ip());
    head.extend_from_slice(b"\r\n");
    line(&mut head, b"x-forwarded-proto", b"http");
    if let Some(host) = host {
        line(&mut head, b"x-forwarded-host", host.as_bytes());
    }
    line(&mut head, b"via", b"1.1 headroom");
    head.extend_from_slice(GENERATION_HEADER.as_bytes());
    head.extend_from_slice(b": ");
    write::decimal(&mut head, generation);
    head.extend_from_slice(b"\r\n");
    match then {
        Then::AsIs => {}
        Then::Chunked => line(&mut head, b"transfer-encoding", b"chunked"),
        Then::Upgrade(protocol) => {
            line(&mut head, b"connection", b"upgrade");
            line(&mut head, b"upgrade", protocol.as_bytes());
        }
    }
    head.extend_from_slice(b"\r\n");
    head
}

#[cfg(test)]
mod tests {
    use http::{Method, Request};

    use super::*;

    #[test]
    fn the_member_gets_end_to_end_headers_and_who_asked() {
        let request = Request::builder()
            .method(Method::POST)
            .uri("/cart?id=7")
            .header("host", "shop.example")
            .header("connection", "keep-alive, x-secret")
            .header("x-secret", "hop")
            .header("keep-alive", "timeout=5")
            .header("transfer-encoding", "chunked")
            .header("content-length", "12")
            .header("expect", "100-continue")
            .header("x-forwarded-for", "10.0.0.1")
            .header("x-forwarded-for", "10.0.0.2")
            .header("x-headroom-generation", "999")
            .header("accept", "text/plain")
            .header("via", "1.0 edge")
            .body(())
            .expect("request");
        let (parts, ()) = request.into_parts();
        let client: SocketAddr = "192.0.2.9:5000".parse().expect("addr");
        let forwarded = Forwarded {
            path_and_query: "/cart?id=7",
            host: Some("shop.example"),
            member: "127.0.0.1:9000",
            client,
            generation: 42,
            then: Then::Chunked,
            present: Present::of(&parts.headers),
        };
        let head = request_head(&parts, &forwarded);
        let head = String::from_utf8(head.to_vec()).expect("text");
        assert_eq!(
            head,
            "POST /cart?id=7 HTTP/1.1\r\n\
             host: shop.example\r\n\
             accept: text/plain\r\n\
             via: 1.0 edge\r\n\
             x-forwarded-for: 10.0.0.1, 10.0.0.2, 192.0.2.9\r\n\
             x-forwarded-proto: http\r\n\
             x-forwarded-host: shop.example\r\n\
             via: 1.1 headroom\r\n\
             x-headroom-generation: 42\r\n\
             transfer-encoding: chunked\r\n\r\n"
        );

        let v6: SocketAddr = "[2001:db8::1]:5000".parse().expect("addr");
        let forwarded = Forwarded {
            host: None,
            member: "m:1",
            client: v6,
            generation: 0,
            then: Then::AsIs,
            ..forwarded
        };
        let head = request_head(&parts, &forwarded);
        let head = String::from_utf8_lossy(&head).into_owned();
        assert!(head.contains("x-forwarded-for: 10.0.0.1, 10.0.0.2, 2001:db8::1\r\n"));
        assert!(head.contains("x-headroom-generation: 0\r\n"));

        // Without a host (HTTP/1.0, or HTTP/2 without an authority) the
        // member's own address is the host.
        let (parts, ()) = Request::get("/").body(()).expect("request").into_parts();
        let forwarded = Forwarded {
            path_and_query: "/",
            member: "127.0.0.1:9000",
            client,
            generation: 1,
            present: Present::of(&parts.headers),
            ..forwarded
        };
        let head = request_head(&parts, &forwarded);
        assert!(String::from_utf8_lossy(&head)
            .starts_with("GET / HTTP/1.1\r\nhost: 127.0.0.1:9000\r\n"));
    }
}
