//! Writing message heads: the answer's status line, headers and framing
//! for a client, and the pieces a request head for a member is made of.
//! Numbers and addresses are written by hand: `fmt` stood out in the
//! proxy's profile (about 4 % of its user-space time per request).

use std::fmt::Write as _;
use std::net::IpAddr;
use std::time::SystemTime;

use bytes::{BufMut, BytesMut};
use http::header;
use http::StatusCode;

use super::framing::Framing;
use super::lines::Lines;

/// One `name: value` line.
pub fn header_line(out: &mut BytesMut, name: &[u8], value: &[u8]) {
    out.extend_from_slice(name);
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

pub fn decimal(out: &mut BytesMut, mut n: u64) {
    let mut digits = [0u8; 20];
    let mut at = digits.len();
    loop {
        at -= 1;
        digits[at] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[at..]);
}

pub fn ip(out: &mut BytesMut, ip: IpAddr) {
    match ip {
        IpAddr::V4(v4) => {
            for (i, octet) in v4.octets().into_iter().enumerate() {
                if i > 0 {
                    out.extend_from_slice(b".");
                }
                decimal(out, u64::from(octet));
            }
        }
        IpAddr::V6(v6) => {
            let _ = write!(out, "{v6}");
        }
    }
}

thread_local! {
    /// The `date` value, made once a second per worker.
    static DATE: std::cell::RefCell<(u64, [u8; 29])> = const { std::cell::RefCell::new((u64::MAX, [0; 29])) };
}

/// Now, as an IMF-fixdate (RFC 9110 §5.6.7).
pub fn date(out: &mut BytesMut) {
    let now = SystemTime::now();
    let second = now
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    DATE.with_borrow_mut(|(at, text)| {
        if *at != second {
            let fresh = httpdate::fmt_http_date(now);
            if fresh.len() == text.len() {
                text.copy_from_slice(fresh.as_bytes());
                *at = second;
            } else {
                // Not the fixed IMF-fixdate length: written as it is.
                out.extend_from_slice(fresh.as_bytes());
                return;
            }
        }
        out.extend_from_slice(text);
    });
}

/// Most header lines [`answer_head`] adds to an answer's own: `Date`, the
/// framing (`Content-Length` or `Transfer-Encoding`) and `Connection`.
pub const ADDED_HEADERS: usize = 3;

/// How an answer's head frames what follows it, and the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AnswerHead {
    pub framing: Framing,
    /// To an HTTP/1.0 client, a kept-alive connection is said so.
    pub http10: bool,
    pub keep_alive: bool,
}

/// Writes the status line, the end-to-end headers (the member's `lines`
/// as they came, when it has them, else the map in `parts`), the framing
/// and the connection's fate, up to the blank line.
pub fn answer_head(
    out: &mut BytesMut,
    parts: &http::response::Parts,
    lines: Option<&Lines>,
    head: AnswerHead,
) {
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(parts.status.as_str().as_bytes());
    out.put_u8(b' ');
    let reason = parts.status.canonical_reason().unwrap_or("Unknown");
    out.extend_from_slice(reason.as_bytes());
    out.extend_from_slice(b"\r\n");
    let (dated, length_said) = match lines {
        Some(lines) => copy_lines(out, lines, head.framing),
        None => map_lines(out, &parts.headers, head.framing),
    };
    if !dated {
        out.extend_from_slice(b"date: ");
        date(out);
        out.extend_from_slice(b"\r\n");
    }
    match head.framing {
        Framing::Length(n) if !length_said => {
            out.extend_from_slice(b"content-length: ");
            decimal(out, n);
            out.extend_from_slice(b"\r\n");
        }
        Framing::Chunked => out.extend_from_slice(b"transfer-encoding: chunked\r\n"),
        _ => {}
    }
    if parts.status == StatusCode::SWITCHING_PROTOCOLS {
        out.extend_from_slice(b"connection: upgrade\r\n");
    } else if !head.keep_alive {
        out.extend_from_slice(b"connection: close\r\n");
    } else if head.http10 {
        out.extend_from_slice(b"connection: keep-alive\r\n");
    }
    out.extend_from_slice(b"\r\n");
}

/// The end-to-end headers from a map: whether there was a `date`, and
/// whether the body's length is said already (never: the framing writes
/// its own).
fn map_lines(out: &mut BytesMut, headers: &http::HeaderMap, framing: Framing) -> (bool, bool) {
    let has_body = !matches!(framing, Framing::Empty | Framing::Tunnel);
    let mut dated = false;
    for (name, value) in headers {
        // The framing and the connection are this hop's to say.
        if name == header::CONNECTION
            || name == header::TRANSFER_ENCODING
            || (name == header::CONTENT_LENGTH && has_body)
        {
            continue;
        }
        dated |= name == header::DATE;
        header_line(out, name.as_str().as_bytes(), value.as_bytes());
    }
    (dated, false)
}

/// The member's own lines: in one piece when its `Content-Length` is the
/// answer's (or there is none, or no body follows: a HEAD answer keeps
/// its length), else without that line.
fn copy_lines(out: &mut BytesMut, lines: &Lines, framing: Framing) -> (bool, bool) {
    let length = lines.content_length();
    let as_they_are = match framing {
        Framing::Length(n) => length.is_none_or(|said| said == n),
        Framing::Empty | Framing::Tunnel => true,
        Framing::Chunked | Framing::UntilClose => length.is_none(),
    };
    if as_they_are {
        out.extend_from_slice(lines.as_bytes());
    } else {
        lines.write_without_length(out);
    }
    let length_said = as_they_are && matches!(framing, Framing::Length(_)) && length.is_some();
    (lines.is_dated(), length_said)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_date_is_an_imf_fixdate() {
        let mut out = BytesMut::new();
        date(&mut out);
        date(&mut out);
        let text = std::str::from_utf8(&out).expect("text");
        assert_eq!(text.len(), 58);
        assert!(httpdate::parse_http_date(&text[..29]).is_ok(), "{text}");
        assert_eq!(&text[..29], &text[29..]);
    }

    #[test]
    fn numbers_and_addresses_are_written_as_fmt_would() {
        for n in [0, 7, 10, 99, 1_000_003, u64::MAX] {
            let mut out = BytesMut::new();
            decimal(&mut out, n);
            assert_eq!(&out[..], n.to_string().as_bytes());
        }
        for addr in ["192.0.2.9", "0.0.0.0", "255.255.255.255", "2001:db8::1"] {
            let mut out = BytesMut::new();
            let parsed: IpAddr = addr.parse().expect("an address");
            ip(&mut out, parsed);
            assert_eq!(&out[..], addr.as_bytes());
        }
    }

    #[test]
    fn an_answer_head_says_its_own_framing_and_connection() {
        let (mut parts, ()) = http::Response::builder()
            .status(200)
            .header("content-length", "99")
            .header("transfer-encoding", "chunked")
            .header("connection", "keep-alive")
            .header("date", "Tue, 01 Dec 2026 00:00:00 GMT")
            .header("x-kept", "yes")
            .body(())
            .expect("a response")
            .into_parts();
        let written = |parts: &http::response::Parts, head| {
            let mut out = BytesMut::new();
            answer_head(&mut out, parts, None, head);
            String::from_utf8(out.to_vec()).expect("text")
        };
        let head = AnswerHead {
            framing: Framing::Length(5),
            http10: false,
            keep_alive: true,
        };
        assert_eq!(
            written(&parts, head),
            "HTTP/1.1 200 OK\r\ndate: Tue, 01 Dec 2026 00:00:00 GMT\r\nx-kept: yes\r\n\
             content-length: 5\r\n\r\n"
        );
        let close = AnswerHead {
            framing: Framing::Chunked,
            keep_alive: false,
            ..head
        };
        assert!(written(&parts, close)
            .ends_with("transfer-encoding: chunked\r\nconnection: close\r\n\r\n"));
        let old = AnswerHead {
            framing: Framing::Empty,
            http10: true,
            keep_alive: true,
        };
        let text = written(&parts, old);
        assert!(
            text.contains("content-length: 99\r\n"),
            "a HEAD answer keeps its length"
        );
        assert!(text.ends_with("connection: keep-alive\r\n\r\n"));
        parts.status = StatusCode::SWITCHING_PROTOCOLS;
        let tunnel = AnswerHead {
            framing: Framing::Tunnel,
            http10: false,
            keep_alive: true,
        };
        assert!(written(&parts, tunnel).ends_with("connection: upgrade\r\n\r\n"));
    }
}
