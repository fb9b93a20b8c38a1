//! The parser's cases: requests as a client may send them, answers as a
//! member may, and the heads that could be read two ways.

use bytes::BytesMut;
use http::header;
use http::{Method, StatusCode};

use super::parse::{self, MAX_HEADERS};
use super::*;

fn head(text: &[u8]) -> Result<Option<RequestHead>, Refusal> {
    let mut buf = BytesMut::from(text);
    parse::request(&mut buf)
}

fn accepted(text: &[u8]) -> RequestHead {
    match head(text) {
        Ok(Some(parsed)) => parsed,
        Ok(None) => panic!("incomplete {:?}", String::from_utf8_lossy(text)),
        Err(Refusal { status, why }) => panic!("refused with {status}: {why}"),
    }
}

fn refused(text: &[u8]) -> StatusCode {
    match head(text) {
        Err(refusal) => refusal.status,
        Ok(Some(_)) => panic!("accepted {:?}", String::from_utf8_lossy(text)),
        Ok(None) => panic!("incomplete {:?}", String::from_utf8_lossy(text)),
    }
}

#[test]
fn a_request_head_and_how_its_body_comes() {
    assert!(head(b"GET / HTTP/1.1\r\nHost: x\r\n")
        .ok()
        .flatten()
        .is_none());
    let mut buf = BytesMut::from(
        &b"POST /a?b=1 HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhelloGET"[..],
    );
    let parsed = parse::request(&mut buf).ok().flatten().expect("a head");
    assert_eq!(parsed.request.method(), Method::POST);
    assert_eq!(
        parsed.request.uri().path_and_query().map(|p| p.as_str()),
        Some("/a?b=1")
    );
    assert_eq!(parsed.request.headers()["host"], "x");
    assert_eq!(parsed.body, Framing::Length(5));
    assert!(parsed.keep_alive);
    assert_eq!(&buf[..], b"helloGET", "the body and what follows stay");

    let parsed = accepted(b"GET / HTTP/1.0\r\n\r\n");
    assert!(!parsed.keep_alive, "HTTP/1.0 closes unless asked");
    assert_eq!(parsed.body, Framing::Empty);
    let parsed = accepted(b"GET / HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n");
    assert!(parsed.keep_alive);
    let parsed = accepted(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: upgrade, close\r\n\r\n");
    assert!(!parsed.keep_alive);

    let parsed = accepted(b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: Chunked\r\n\r\n");
    assert_eq!(parsed.body, Framing::Chunked);
    assert!(parsed.keep_alive);
    // A coding the front-end would drop when it frames the body anew
    // (found by the smuggling corpus: the member got gzip bytes as plain).
    assert_eq!(
        refused(b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip, chunked\r\n\r\n"),
        StatusCode::NOT_IMPLEMENTED
    );
    // The target's authority is the host (RFC 9112 §3.2.2).
    let parsed = accepted(b"GET http://g:8080/a HTTP/1.1\r\nHost: h\r\n\r\n");
    assert_eq!(parsed.request.headers()["host"], "g:8080");
    assert_eq!(parsed.request.uri().path(), "/a");
    // Both framings: the coding wins and the connection closes after.
    let parsed = accepted(
        b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n",
    );
    assert_eq!(parsed.body, Framing::Chunked);
    assert!(!parsed.keep_alive);
    let parsed =
        accepted(b"PUT / HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 3\r\n\r\n");
    assert!(parsed.expects_continue);
}

#[test]
fn a_head_that_could_be_read_two_ways_is_refused() {
    let bad = StatusCode::BAD_REQUEST;
    for text in [
        &b"\x16\x03\x01\x02\x00garbage\r\n\r\n"[..],
        b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked, gzip\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: identity\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: +5\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5, 6\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: x\r\nBad Name: x\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: x\r\n Folded: x\r\n\r\n",
        // Found by the smuggling corpus: chunked twice was decoded once,
        // and repeats of one length were passed on as they came.
        b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nContent-Length: 2\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 2, 2\r\n\r\n",
    ] {
        assert_eq!(refused(text), bad, "{:?}", String::from_utf8_lossy(text));
    }
    assert_eq!(
        refused(b"GET / HTTP/2.0\r\n\r\n"),
        StatusCode::HTTP_VERSION_NOT_SUPPORTED
    );
    assert_eq!(
        refused(b"GET / HTTP/1.1\r\n\r\n"),
        bad,
        "HTTP/1.1 names its host"
    );
    assert_eq!(
        refused(b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n"),
        bad,
        "one host only"
    );
    let mut many = b"GET / HTTP/1.1\r\nHost: x\r\n".to_vec();
    for i in 0..=MAX_HEADERS {
        many.extend_from_slice(format!("x-{i}: y\r\n").as_bytes());
    }
    many.extend_from_slice(b"\r\n");
    assert_eq!(refused(&many), StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE);
}

fn answer(text: &[u8], asked: Asked) -> Option<ResponseHead> {
    parse::response(&mut BytesMut::from(text), asked)
        .ok()
        .flatten()
}

#[test]
fn heads_give_status_end_to_end_headers_and_framing() {
    let plain = Asked::default();
    let mut buf = BytesMut::from(
        &b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\ncontent-length: 5\r\nconnection: x-private\r\nx-private: 1\r\nkeep-alive: timeout=5\r\nx-kept: yes\r\n\r\nhello"[..],
    );
    let Some(parsed) = parse::response(&mut buf, plain).ok().flatten() else {
        panic!("head not parsed")
    };
    assert_eq!(parsed.status, StatusCode::OK);
    assert!(parsed.keep_alive);
    assert_eq!(parsed.framing, Framing::Length(5));
    assert_eq!(
        parsed.headers.get("x-kept").map(|v| v.as_bytes()),
        Some(&b"yes"[..])
    );
    assert!(parsed.headers.get("x-private").is_none());
    assert!(parsed.headers.get("keep-alive").is_none());
    assert!(parsed.headers.get("connection").is_none());
    assert_eq!(&buf[..], b"hello");

    let mut partial = BytesMut::from(&b"HTTP/1.1 200 OK\r\ncontent-le"[..]);
    assert!(matches!(parse::response(&mut partial, plain), Ok(None)));

    let parsed = answer(
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ncontent-length: 3\r\n\r\n",
        plain,
    );
    assert!(parsed
        .as_ref()
        .is_some_and(|p| !p.headers.contains_key(header::CONTENT_LENGTH)));
    assert_eq!(parsed.map(|p| p.framing), Some(Framing::Chunked));

    let parsed = answer(b"HTTP/1.0 200 OK\r\n\r\n", plain);
    assert_eq!(
        parsed.map(|p| (p.framing, p.keep_alive)),
        Some((Framing::UntilClose, false))
    );

    let head = Asked {
        head_request: true,
        ..plain
    };
    let parsed = answer(b"HTTP/1.1 200 OK\r\ncontent-length: 9\r\n\r\n", head);
    assert_eq!(parsed.map(|p| p.framing), Some(Framing::Empty));

    for bad in [
        &b"HTTP/1.1 200 OK\r\ncontent-length: 1\r\ncontent-length: 2\r\n\r\n"[..],
        b"HTTP/1.1 200 OK\r\ncontent-length: -1\r\n\r\n",
        b"HTTP/1.1 101 Switching Protocols\r\n\r\n",
        b"SSH-2.0-OpenSSH\r\n\r\n",
    ] {
        assert!(parse::response(&mut BytesMut::from(bad), plain).is_err());
    }

    // Asked for, a switch is the answer: the connection is the tunnel's,
    // and the client is told what it switched to.
    let upgrade = Asked {
        upgrade: true,
        ..plain
    };
    let mut switch = BytesMut::from(
        &b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\n\
           Upgrade: websocket\r\nSec-WebSocket-Accept: k\r\n\r\nframe"[..],
    );
    let parsed = parse::response(&mut switch, upgrade).ok().flatten();
    assert!(parsed
        .as_ref()
        .is_some_and(|p| p.status == StatusCode::SWITCHING_PROTOCOLS
            && p.framing == Framing::Tunnel
            && !p.keep_alive
            && p.headers
                .get(header::UPGRADE)
                .is_some_and(|v| v == "websocket")
            && p.headers.contains_key("sec-websocket-accept")
            && !p.headers.contains_key(header::CONNECTION)));
    assert_eq!(&switch[..], b"frame");
    let mut unnamed = BytesMut::from(&b"HTTP/1.1 101 Switching Protocols\r\n\r\n"[..]);
    assert!(parse::response(&mut unnamed, upgrade).is_err());
}

fn passing_through() -> Asked {
    Asked {
        pass_through: true,
        ..Asked::default()
    }
}

#[test]
fn an_answer_with_nothing_of_this_hop_keeps_its_lines_as_they_came() {
    let mut buf = BytesMut::from(
        &b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 5 \r\nX-Kept:  yes\r\n\r\nhello"[..],
    );
    let parsed = parse::response(&mut buf, passing_through())
        .ok()
        .flatten()
        .expect("a head");
    assert_eq!(parsed.framing, Framing::Length(5));
    assert!(parsed.keep_alive);
    assert!(parsed.headers.is_empty(), "the lines hold the headers");
    let lines = parsed.lines.expect("lines kept");
    assert_eq!(
        lines.as_bytes(),
        b"Content-Type: text/plain\r\nContent-Length: 5 \r\nX-Kept:  yes\r\n"
    );
    assert_eq!(lines.content_length(), Some(5));
    assert!(!lines.is_dated());
    let terms = lines.cache_terms().expect("readable");
    assert!(!terms.personal && terms.cache_control.is_none() && terms.expires.is_none());
    let map = lines.to_map().expect("a map");
    assert_eq!(map.len(), 3);
    assert_eq!(map["x-kept"], "yes");
    assert_eq!(&buf[..], b"hello");

    let parsed = answer(
        b"HTTP/1.0 204 No Content\r\nDate: Tue, 01 Dec 2026 00:00:00 GMT\r\nCache-Control: max-age=5\r\nVary: x\r\n\r\n",
        passing_through(),
    )
    .expect("a head");
    assert_eq!((parsed.framing, parsed.keep_alive), (Framing::Empty, false));
    let lines = parsed.lines.expect("lines kept");
    assert!(lines.is_dated());
    let terms = lines.cache_terms().expect("readable");
    assert_eq!(terms.cache_control, Some(&b"max-age=5"[..]));
    assert!(terms.personal);
    let twice = answer(
        b"HTTP/1.1 200 OK\r\nCache-Control: public\r\nCache-Control: max-age=5\r\n\r\n",
        passing_through(),
    );
    let lines = twice.and_then(|p| p.lines).expect("lines kept");
    assert!(
        lines.cache_terms().is_none(),
        "two values are read from a map"
    );
    let parsed = answer(b"HTTP/1.1 200 OK\r\n\r\n", passing_through()).expect("a head");
    assert_eq!(parsed.framing, Framing::UntilClose);
    assert_eq!(parsed.lines.map(|l| l.as_bytes().len()), Some(0));
}

#[test]
fn lines_that_another_hop_could_read_otherwise_go_through_the_map() {
    for text in [
        // A bare LF ends a line for httparse, maybe not for the client.
        &b"HTTP/1.1 200 OK\r\nContent-Length: 0\nX-Next: 1\r\n\r\n"[..],
        b"HTTP/1.1 200 OK\r\nX-Last: 1\n\r\n",
        b"HTTP/1.1 200 OK\n\n",
        // Two lengths, however they agree, are said once.
        b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nContent-Length: 0\r\n\r\n",
        // This hop's headers are taken out.
        b"HTTP/1.1 200 OK\r\nKeep-Alive: timeout=5\r\nContent-Length: 0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
    ] {
        let parsed = answer(text, passing_through());
        let shown = String::from_utf8_lossy(text);
        let parsed = parsed.unwrap_or_else(|| panic!("not parsed: {shown:?}"));
        assert!(parsed.lines.is_none(), "lines kept: {shown:?}");
    }
    let parsed = answer(
        b"HTTP/1.1 200 OK\r\nContent-Length: 0\nX-Next: 1\r\n\r\n",
        passing_through(),
    );
    assert!(parsed.is_some_and(|p| p.headers.contains_key("x-next")));
}

#[test]
fn kept_lines_are_written_with_this_hops_framing() {
    let lines = answer(
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-Kept: yes\r\n\r\n",
        passing_through(),
    )
    .and_then(|p| p.lines)
    .expect("lines kept");
    let (parts, ()) = http::Response::new(()).into_parts();
    let written = |framing, keep_alive| {
        let mut out = BytesMut::new();
        let head = write::AnswerHead {
            framing,
            http10: false,
            keep_alive,
        };
        write::answer_head(&mut out, &parts, Some(&lines), head);
        String::from_utf8(out.to_vec()).expect("text")
    };
    let text = written(Framing::Length(5), true);
    assert!(text.starts_with("HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-Kept: yes\r\ndate: "));
    assert_eq!(text.matches("ontent-").count(), 1, "{text}");
    assert!(text.ends_with(" GMT\r\n\r\n"), "{text}");
    let text = written(Framing::Chunked, false);
    assert!(!text.contains("Content-Length"), "{text}");
    assert!(text.contains("X-Kept: yes\r\n"));
    assert!(text.ends_with("transfer-encoding: chunked\r\nconnection: close\r\n\r\n"));
    let text = written(Framing::Length(7), true);
    assert!(text.contains("content-length: 7\r\n") && !text.contains("Content-Length: 5"));
}

/// Found by the `member_answer` fuzz target: an answer at the header
/// limit went to the client with the front-end's own headers beside it,
/// past the limit, so that its head no longer read back.
#[test]
fn an_answer_goes_out_within_the_header_limit_it_came_in_under() {
    let with = |n: usize| {
        let mut text = b"HTTP/1.1 200 OK\r\n".to_vec();
        for i in 0..n {
            text.extend_from_slice(format!("x-{i}: y\r\n").as_bytes());
        }
        text.extend_from_slice(b"\r\n");
        text
    };
    let most = parse::MAX_ANSWER_HEADERS;
    for asked in [Asked::default(), passing_through()] {
        assert!(
            parse::response(&mut BytesMut::from(&with(most + 1)[..]), asked).is_err(),
            "more than the answer's limit"
        );
        let head = answer(&with(most), asked).expect("at the limit");
        let (mut parts, ()) = http::Response::new(()).into_parts();
        parts.headers = head.headers;
        let mut out = BytesMut::new();
        let written = write::AnswerHead {
            framing: Framing::Length(0),
            http10: false,
            keep_alive: false,
        };
        write::answer_head(&mut out, &parts, head.lines.as_ref(), written);
        let mut slots = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut read = httparse::Response::new(&mut slots);
        assert!(
            matches!(read.parse(&out), Ok(httparse::Status::Complete(_))),
            "the written head is within the limit"
        );
        assert_eq!(read.headers.len(), MAX_HEADERS);
    }
}
