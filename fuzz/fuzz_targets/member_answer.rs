//! A member's bytes as the front-end's client reads them, then the head
//! the front-end writes for its client from what it read: that head must
//! read back, by the same parser, as the same status with the framing it
//! says. The lines kept as they came must read as a map too.
#![no_main]

use bytes::BytesMut;
use headroom_frontend::http1::write::{self, AnswerHead};
use headroom_frontend::http1::{parse, Answering, Asked, Framing};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&how, bytes)) = data.split_first() else {
        return;
    };
    let asked = Asked {
        head_request: how & 1 != 0,
        upgrade: how & 2 != 0,
        pass_through: how & 4 != 0,
    };
    let mut buf = BytesMut::from(bytes);
    let Ok(Some(head)) = parse::response(&mut buf, asked) else {
        return;
    };
    if let Some(lines) = &head.lines {
        assert!(
            lines.to_map().is_ok(),
            "kept lines that do not read as a map"
        );
    }
    let exact = match head.framing {
        Framing::Length(n) => Some(n),
        Framing::Empty => Some(0),
        _ => None,
    };
    let answering = Answering {
        head_request: asked.head_request,
        http10: how & 8 != 0,
    };
    let framing = match head.framing {
        Framing::Tunnel => Framing::Tunnel,
        _ => Framing::of_answer(head.status, answering, exact),
    };
    let mut response = http::Response::new(());
    *response.status_mut() = head.status;
    *response.headers_mut() = head.headers;
    let (parts, ()) = response.into_parts();
    let mut out = BytesMut::new();
    let written = AnswerHead {
        framing,
        http10: answering.http10,
        keep_alive: true,
    };
    write::answer_head(&mut out, &parts, head.lines.as_ref(), written);
    // Within the header limit the front-end reads by itself.
    let mut slots = [httparse::EMPTY_HEADER; parse::MAX_HEADERS];
    let mut raw = httparse::Response::new(&mut slots);
    let complete = matches!(raw.parse(&out), Ok(httparse::Status::Complete(n)) if n == out.len());
    assert!(complete, "the written head is not one head: {out:?}");
    if raw.headers.len() > parse::MAX_ANSWER_HEADERS {
        return;
    }
    // Read back as the client would: a switch only if one was asked.
    let again = Asked {
        head_request: asked.head_request,
        upgrade: framing == Framing::Tunnel,
        pass_through: false,
    };
    let text = out.clone();
    let read = parse::response(&mut out, again);
    let Ok(Some(read)) = read else {
        panic!("the written head does not read back: {read:?}\n{text:?}");
    };
    assert_eq!(read.status, head.status);
    if let Framing::Length(n) = framing {
        assert_eq!(read.framing, Framing::Length(n), "{text:?}");
    }
    if framing == Framing::Chunked {
        assert_eq!(read.framing, Framing::Chunked, "{text:?}");
    }
    assert!(out.is_empty(), "bytes after the written head");
});
