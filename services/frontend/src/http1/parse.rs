//! Reading a message head off the front of a connection's buffer: a
//! client's request, or a member's answer. The parsing is httparse,
//! hyper's parser; what it leaves open (the framing, the host, the
//! connection) is decided here, and a head that another hop could read
//! another way is refused.

use std::mem::MaybeUninit;
use std::ops::Range;

use bytes::{Buf, Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, StatusCode, Uri, Version};

use super::framing::Framing;
use super::headers::{self, HOP_BY_HOP};
use super::lines::{self, Lines, Place, Said};
use super::Malformed;

/// Most headers in a message.
pub const MAX_HEADERS: usize = 100;

/// Most headers in a member's answer: fewer than in a message by what the
/// front-end adds to an answer's head at most (`Date`, its framing and
/// its `Connection`), so what it writes to a client stays within what it
/// would read itself (found by the `member_answer` fuzz target: an answer
/// of 100 headers went out with 102).
pub const MAX_ANSWER_HEADERS: usize = MAX_HEADERS - super::write::ADDED_HEADERS;

/// A request the front-end answers itself, closing the connection after.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refusal {
    pub status: StatusCode,
    pub why: &'static str,
}

impl Refusal {
    pub const fn new(status: StatusCode, why: &'static str) -> Self {
        Self { status, why }
    }

    const fn bad(why: &'static str) -> Self {
        Self::new(StatusCode::BAD_REQUEST, why)
    }
}

/// A client's request head, and how its body comes.
#[derive(Debug)]
pub struct RequestHead {
    pub request: Request<()>,
    pub body: Framing,
    pub keep_alive: bool,
    pub expects_continue: bool,
}

/// Parses a complete request head off the front of `buf`; `None` while
/// more bytes are needed.
pub fn request(buf: &mut BytesMut) -> Result<Option<RequestHead>, Refusal> {
    let mut slots = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
    let mut parsed = httparse::Request::new(&mut []);
    let length = match parsed.parse_with_uninit_headers(buf, &mut slots) {
        Ok(httparse::Status::Complete(length)) => length,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => {
            return Err(Refusal::new(
                StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                "too many request headers",
            ))
        }
        Err(httparse::Error::Version) => {
            return Err(Refusal::new(
                StatusCode::HTTP_VERSION_NOT_SUPPORTED,
                "HTTP version not supported",
            ))
        }
        Err(_) => return Err(Refusal::bad("malformed request head")),
    };
    let version = match parsed.version {
        Some(1) => Version::HTTP_11,
        _ => Version::HTTP_10,
    };
    let method = Method::from_bytes(parsed.method.unwrap_or("").as_bytes())
        .map_err(|_| Refusal::bad("invalid method"))?;
    let target = place(buf, parsed.path.unwrap_or("").as_bytes());
    let seen = Seen::of(parsed.headers);
    let places = places(buf, parsed.headers).map_err(|m| Refusal::bad(m.0))?;
    let head = buf.split_to(length).freeze();
    let uri =
        Uri::from_maybe_shared(head.slice(target)).map_err(|_| Refusal::bad("invalid target"))?;
    let mut headers = header_map(&head, places).map_err(|_| Refusal::bad("invalid header"))?;
    let (body, keep_alive) = request_framing(&headers, version, seen)?;
    if seen.hosts > 1 {
        return Err(Refusal::bad("more than one Host header"));
    }
    if seen.hosts == 0 && version == Version::HTTP_11 {
        return Err(Refusal::bad("no Host header"));
    }
    // RFC 9112 §3.2.2: with an absolute-form target, its authority is the
    // host, whatever `Host` said; it takes that header's place, so that
    // the cache, the routing and the member see the host the client asked.
    if let Some(authority) = uri.authority() {
        let host = match authority.port() {
            Some(port) => format!("{}:{port}", authority.host()),
            None => authority.host().to_owned(),
        };
        let host = HeaderValue::try_from(host).map_err(|_| Refusal::bad("invalid target"))?;
        headers.insert(header::HOST, host);
    }
    let expects_continue = version == Version::HTTP_11
        && seen.expect
        && headers
            .get(header::EXPECT)
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"));
    let mut request = Request::new(());
    *request.method_mut() = method;
    *request.uri_mut() = uri;
    *request.version_mut() = version;
    *request.headers_mut() = headers;
    Ok(Some(RequestHead {
        request,
        body,
        keep_alive,
        expects_continue,
    }))
}

/// Which of the headers that decide framing and routing a message has,
/// noted while its names are read: most requests have none but `Host`,
/// most answers none but `Content-Length`, and each lookup not made is a
/// hash and a probe saved.
#[derive(Debug, Clone, Copy, Default)]
struct Seen {
    /// `Host` headers. RFC 9112 §3.2: an HTTP/1.1 request names its host,
    /// and only once; two could be read one way here (routing, the cache
    /// key) and another by the member.
    hosts: u32,
    /// A hop-by-hop header (`Connection`, `Transfer-Encoding`, ...).
    hop_by_hop: bool,
    content_length: Found,
    expect: bool,
    date: bool,
    /// What a cache keeps an answer by: `Set-Cookie` or `Vary` (then it
    /// does not), `Cache-Control` and `Expires`.
    personal: bool,
    cache_control: Found,
    expires: Found,
}

/// How often a header came, and where it came last.
#[derive(Debug, Clone, Copy, Default)]
struct Found {
    count: u32,
    at: usize,
}

impl Found {
    fn note(&mut self, at: usize) {
        self.count += 1;
        self.at = at;
    }

    /// Where it is, when it came once.
    fn once(self) -> Option<usize> {
        (self.count == 1).then_some(self.at)
    }
}

impl Seen {
    fn of(parsed: &[httparse::Header<'_>]) -> Self {
        let mut seen = Self::default();
        for (i, h) in parsed.iter().enumerate() {
            let name = h.name.as_bytes();
            let is = |known: &str| name.eq_ignore_ascii_case(known.as_bytes());
            // By length first: most names are then compared with one
            // known name, or none.
            match name.len() {
                4 if is("host") => seen.hosts += 1,
                4 if is("date") => seen.date = true,
                4 | 10 if is("vary") || is("set-cookie") => seen.personal = true,
                6 if is("expect") => seen.expect = true,
                7 if is("expires") => seen.expires.note(i),
                13 if is("cache-control") => seen.cache_control.note(i),
                14 if is("content-length") => seen.content_length.note(i),
                2 | 7 | 10 | 16 | 17 if HOP_BY_HOP.iter().any(|hop| is(hop)) => {
                    seen.hop_by_hop = true;
                }
                _ => {}
            }
        }
        seen
    }

    /// Whether the connection may carry another message (HTTP/1.1 unless
    /// it says `close`, HTTP/1.0 only when it says `keep-alive`). Without a
    /// hop-by-hop header there is no `Connection` to look up.
    fn keep_alive(&self, headers: &HeaderMap, http11: bool) -> bool {
        let says = |token| self.hop_by_hop && headers::connection_has(headers, token);
        if http11 {
            !says("close")
        } else {
            says("keep-alive")
        }
    }

    /// The message's transfer coding, as [`headers::transfer_coding`].
    fn coding(&self, headers: &HeaderMap) -> Option<bool> {
        self.hop_by_hop
            .then(|| headers::transfer_coding(headers))
            .flatten()
    }
}

/// How a request's body comes, and whether the connection may carry
/// another request after it.
fn request_framing(
    headers: &HeaderMap,
    version: Version,
    seen: Seen,
) -> Result<(Framing, bool), Refusal> {
    let mut keep_alive = seen.keep_alive(headers, version == Version::HTTP_11);
    // RFC 9112 §6.3: a transfer coding decides the length; with a
    // content-length beside it, the request is answered and the connection
    // closed (one of them may be what another hop went by), as after an
    // HTTP/1.0 request with a transfer coding (§6.1).
    let chunked = seen.hop_by_hop && request_coding(headers)?;
    let body = match chunked {
        true => {
            if version == Version::HTTP_10 || seen.content_length.count > 0 {
                keep_alive = false;
            }
            Framing::Chunked
        }
        false if seen.content_length.count == 0 => Framing::Empty,
        // RFC 9110 §8.6 lets a recipient take repeats of one value as one
        // length; they are refused instead, as a list ("5, 5") is: a hop
        // that reads the repeats otherwise would frame another body.
        false if seen.content_length.count > 1 => {
            return Err(Refusal::bad("more than one content-length"))
        }
        false => match headers::content_length(headers) {
            Ok(Some(n)) if n > 0 => Framing::Length(n),
            Ok(_) => Framing::Empty,
            Err(_) => return Err(Refusal::bad("invalid content-length")),
        },
    };
    Ok((body, keep_alive))
}

/// Whether a request's body is chunked, by its `Transfer-Encoding`:
/// `chunked` must come last (RFC 9112 §6.3: 400 otherwise) and once
/// (§7: a sender applies it once; a hop that decoded it twice would read
/// another body), and the front-end forwards no other coding, since it
/// decodes the chunks and frames the body anew (§6.1: 501).
fn request_coding(headers: &HeaderMap) -> Result<bool, Refusal> {
    let mut codings = headers
        .get_all(header::TRANSFER_ENCODING)
        .iter()
        .flat_map(|v| v.as_bytes().split(|b| *b == b','))
        .map(<[u8]>::trim_ascii)
        .filter(|c| !c.is_empty())
        .peekable();
    if codings.peek().is_none() {
        return Ok(false);
    }
    let (mut chunked, mut others, mut last_chunked) = (0, 0, false);
    for coding in codings {
        last_chunked = coding.eq_ignore_ascii_case(b"chunked");
        if last_chunked {
            chunked += 1;
        } else {
            others += 1;
        }
    }
    match (last_chunked, chunked, others) {
        (false, _, _) => Err(Refusal::bad("the last transfer coding is not chunked")),
        (true, 1, 0) => Ok(true),
        (true, 1, _) => Err(Refusal::new(
            StatusCode::NOT_IMPLEMENTED,
            "transfer coding not implemented",
        )),
        (true, _, _) => Err(Refusal::bad("chunked more than once")),
    }
}

/// What the request asked that decides how its answer is read.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Asked {
    /// A HEAD request: the answer has no body, whatever its head says.
    pub head_request: bool,
    /// The request asked to upgrade: a `101` is its answer, not an error.
    pub upgrade: bool,
    /// The answer goes to a client on HTTP/1: its header lines may be kept
    /// as they came ([`Lines`]) when none of them is this hop's.
    pub pass_through: bool,
}

/// A member's answer head, its end-to-end headers only, and how its body
/// is framed.
#[derive(Debug)]
pub struct ResponseHead {
    pub status: StatusCode,
    /// Empty when `lines` holds the headers.
    pub headers: HeaderMap,
    pub lines: Option<Lines>,
    pub framing: Framing,
    pub keep_alive: bool,
}

/// Parses a complete answer head off the front of `buf`, skipping interim
/// (1xx) answers but for a `101` to a request that asked to upgrade;
/// `None` while more bytes are needed.
pub fn response(buf: &mut BytesMut, asked: Asked) -> Result<Option<ResponseHead>, Malformed> {
    loop {
        let mut slots = [httparse::EMPTY_HEADER; MAX_ANSWER_HEADERS];
        let mut response = httparse::Response::new(&mut slots);
        let length = match response.parse(buf) {
            Ok(httparse::Status::Complete(length)) => length,
            Ok(httparse::Status::Partial) => return Ok(None),
            Err(httparse::Error::TooManyHeaders) => return Err(Malformed("too many headers")),
            Err(_) => return Err(Malformed("malformed response head")),
        };
        let status = StatusCode::from_u16(response.code.unwrap_or(0))
            .map_err(|_| Malformed("invalid status code"))?;
        if status == StatusCode::SWITCHING_PROTOCOLS && !asked.upgrade {
            return Err(Malformed("unexpected protocol switch"));
        }
        if status.is_informational() && status != StatusCode::SWITCHING_PROTOCOLS {
            buf.advance(length);
            continue;
        }
        let seen = Seen::of(response.headers);
        let answer = Answer {
            status,
            seen,
            version_11: response.version == Some(1),
            head_request: asked.head_request,
        };
        if asked.pass_through && answer.passes_through() {
            if let Some(at) = lines::block_start(buf, length, response.headers) {
                let said = lines_said(buf, at, response.headers, seen)?;
                let head = buf.split_to(length).freeze();
                return Ok(Some(answer.with_lines(Lines::new(&head, at, said))));
            }
        }
        let places = places(buf, response.headers)?;
        let head = buf.split_to(length).freeze();
        let all = header_map(&head, places)?;
        return answer.framed(all).map(Some);
    }
}

/// What the parse of an answer whose lines pass through said of them,
/// for those who read them later (the framing, the cache). `at` is where
/// the lines start in `buf`.
fn lines_said(
    buf: &[u8],
    at: usize,
    parsed: &[httparse::Header<'_>],
    seen: Seen,
) -> Result<Said, Malformed> {
    let value = |found: Found| {
        let place = place(buf, parsed[found.once()?].value);
        Some(place.start - at..place.end - at)
    };
    let content_length = value(seen.content_length)
        .map(|range| headers::length_value(&buf[at..][range]))
        .transpose()?;
    let cache_control = value(seen.cache_control).map(Place::of);
    let expires = value(seen.expires).map(Place::of);
    Ok(Said {
        content_length,
        dated: seen.date,
        personal: seen.personal,
        cache_control: cache_control.flatten().unwrap_or_default(),
        expires: expires.flatten().unwrap_or_default(),
        cache_readable: seen.cache_control.count <= 1
            && seen.expires.count <= 1
            && !matches!(cache_control, Some(None))
            && !matches!(expires, Some(None)),
    })
}

/// What the status line and the parse said of an answer.
struct Answer {
    status: StatusCode,
    /// Its framing headers: most answers have no hop-by-hop one, so no
    /// `Connection` and no transfer coding to look up.
    seen: Seen,
    version_11: bool,
    head_request: bool,
}

impl Answer {
    /// Whether its header lines can go to an HTTP/1 client as they came:
    /// nothing in them is this hop's to take out or to read twice.
    fn passes_through(&self) -> bool {
        !self.seen.hop_by_hop
            && self.seen.content_length.count <= 1
            && self.status != StatusCode::SWITCHING_PROTOCOLS
    }

    /// An answer whose lines pass through: without a hop-by-hop header
    /// there is no coding and no `Connection` to read.
    fn with_lines(self, lines: Lines) -> ResponseHead {
        let (framing, keep_alive) = self.framing(None, lines.content_length(), false);
        ResponseHead {
            status: self.status,
            headers: HeaderMap::new(),
            lines: Some(lines),
            framing,
            keep_alive: keep_alive && self.version_11,
        }
    }

    /// Reads the framing and keep-alive off the member's headers, and
    /// keeps only the end-to-end ones (RFC 9112 §6.3).
    fn framed(self, all: HeaderMap) -> Result<ResponseHead, Malformed> {
        // Chunked only when it is the last coding; any other leaves the
        // body running to the close.
        let coding = self.seen.coding(&all);
        let length = match coding {
            None if self.seen.content_length.count > 0 => headers::content_length(&all)?,
            _ => None,
        };
        // What the member switches to, which the client is told too.
        let switched = if self.status == StatusCode::SWITCHING_PROTOCOLS {
            let protocol = all.get(header::UPGRADE).cloned();
            Some(protocol.ok_or(Malformed("a protocol switch without Upgrade"))?)
        } else {
            None
        };
        let (framing, kept) = self.framing(coding, length, switched.is_some());
        let keep_alive = kept && self.seen.keep_alive(&all, self.version_11);
        let mut headers = all;
        if coding.is_some() {
            // The coding decides the length (RFC 9112 §6.3): a
            // content-length passed on beside it would frame the body
            // wrongly for the client.
            headers.remove(header::CONTENT_LENGTH);
        }
        if self.seen.hop_by_hop {
            drop_hop_by_hop(&mut headers);
        }
        if let Some(protocol) = switched {
            headers.insert(header::UPGRADE, protocol);
        }
        Ok(ResponseHead {
            status: self.status,
            headers,
            lines: None,
            framing,
            keep_alive,
        })
    }

    /// How the body is framed, and whether the framing lets the connection
    /// carry another answer (a body to the close, or a switch, does not).
    fn framing(
        &self,
        coding: Option<bool>,
        length: Option<u64>,
        switched: bool,
    ) -> (Framing, bool) {
        let no_body = self.head_request
            || self.status == StatusCode::NO_CONTENT
            || self.status == StatusCode::NOT_MODIFIED;
        if switched {
            (Framing::Tunnel, false)
        } else if no_body {
            (Framing::Empty, true)
        } else if coding == Some(true) {
            (Framing::Chunked, true)
        } else if let Some(n) = length {
            (Framing::Length(n), true)
        } else {
            (Framing::UntilClose, false)
        }
    }
}

/// Removes this hop's headers, and those its `Connection` names.
fn drop_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers::connection_tokens(headers.get_all(header::CONNECTION))
        .filter_map(|t| HeaderName::from_bytes(t.as_bytes()).ok())
        .collect();
    for name in &named {
        headers.remove(name);
    }
    for name in HOP_BY_HOP {
        headers.remove(name);
    }
}

/// Where `part` sits in `buf`, which it borrows from.
pub(super) fn place(buf: &[u8], part: &[u8]) -> Range<usize> {
    let start = part.as_ptr() as usize - buf.as_ptr() as usize;
    start..start + part.len()
}

/// Each header's name, and where its value sits in the head, so the head
/// can be frozen and shared by the values instead of copied one by one.
pub(super) fn places(
    buf: &[u8],
    parsed: &[httparse::Header<'_>],
) -> Result<Vec<(HeaderName, Range<usize>)>, Malformed> {
    let mut places = Vec::with_capacity(parsed.len());
    for h in parsed {
        let name = HeaderName::from_bytes(h.name.as_bytes())
            .map_err(|_| Malformed("invalid header name"))?;
        places.push((name, place(buf, h.value)));
    }
    Ok(places)
}

pub(super) fn header_map(
    head: &Bytes,
    places: Vec<(HeaderName, Range<usize>)>,
) -> Result<HeaderMap, Malformed> {
    let mut headers = HeaderMap::with_capacity(places.len());
    for (name, at) in places {
        let value = HeaderValue::from_maybe_shared(head.slice(at))
            .map_err(|_| Malformed("invalid header value"))?;
        headers.append(name, value);
    }
    Ok(headers)
}
