//! The front-end's HTTP/1.1 client to members, with a pool of kept-alive
//! connections per worker thread.
//!
//! Why not hyper's client: its connections each run in their own task, so
//! every request crosses two channels and wakes two tasks, and its response
//! body arrives through a third. Here the request's own task writes the
//! request head, reads the answer and streams the body straight off the
//! socket (what nginx and Pingora do). Profiling put hyper's client at the
//! top of the front-end's own time per request.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::future::Future;
use std::hash::BuildHasherDefault;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{ready, Context, Poll};
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes, BytesMut};
use headroom_shared::hash::Fnv1a;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::{Body, Frame, SizeHint};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Bytes read from a member at a time.
const READ_CHUNK: usize = 16 << 10;
/// Largest response head accepted from a member.
const MAX_HEAD: usize = 64 << 10;
/// Most headers in a member's response.
const MAX_HEADERS: usize = 100;
/// Longest chunk-size or trailer line in a chunked body.
const MAX_LINE: usize = 4 << 10;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("cannot connect to {authority}: {source}")]
    Connect {
        authority: String,
        #[source]
        source: io::Error,
    },
    #[error("connecting to {0} timed out")]
    ConnectTimeout(String),
    #[error("the connection to the member failed: {0}")]
    Io(#[from] io::Error),
    #[error("the member closed the connection before its answer was complete")]
    Closed,
    #[error("the member sent nothing of its answer for {0:?}")]
    Stalled(Duration),
    #[error("the member's answer is not valid HTTP/1.1: {0}")]
    Protocol(&'static str),
    #[error("the client's request body failed: {0}")]
    RequestBody(#[source] BoxError),
}

impl UpstreamError {
    /// The member could not be connected to (it counts towards ejection;
    /// other failures may be the request's own).
    pub fn is_connect(&self) -> bool {
        matches!(self, Self::Connect { .. } | Self::ConnectTimeout(_))
    }
}

/// Headers that describe one connection, not the message: never passed on
/// (RFC 9110 §7.6.1), nor are the ones a `Connection` header names.
pub fn is_hop_by_hop(name: &HeaderName) -> bool {
    HOP_BY_HOP.contains(&name.as_str())
}

// Names, not `HeaderName`s: a `const` array of those was built and dropped
// at every use (it showed in the profile).
const HOP_BY_HOP: [&str; 7] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

/// The tokens of a message's `Connection` header(s).
pub(crate) fn connection_tokens<'a>(
    connection: impl IntoIterator<Item = &'a HeaderValue>,
) -> impl Iterator<Item = &'a str> {
    connection
        .into_iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
}

/// Whether `name` is listed in the message's `Connection` header(s).
pub fn named_by_connection(
    connection: &header::GetAll<'_, HeaderValue>,
    name: &HeaderName,
) -> bool {
    connection_tokens(connection).any(|token| token.eq_ignore_ascii_case(name.as_str()))
}

/// How a request body is framed on the way to the member.
pub enum RequestBody<B> {
    None,
    /// The head carries `content-length: n`.
    Length(u64, B),
    /// The head carries `transfer-encoding: chunked`.
    Chunked(B),
}

/// A connection kept alive to a member.
struct Conn {
    stream: TcpStream,
    /// What was read and not yet used.
    buf: BytesMut,
    /// The member's `host:port`, its key in the pool.
    authority: Arc<str>,
}

struct Idle {
    conn: Conn,
    since: Instant,
}

/// Idle connections by member address. Keyed by FNV-1a: member addresses
/// come from the cluster's configuration, not from clients, so a hash that
/// resists chosen keys (the default SipHash, which showed in the profile)
/// buys nothing here.
type IdleMap = HashMap<Arc<str>, Vec<Idle>, BuildHasherDefault<Fnv1a>>;

/// Connections to members. Cheap to clone; each worker thread has its own,
/// so checking a connection out or in never contends.
#[derive(Clone)]
pub struct Upstream {
    inner: Arc<Inner>,
}

struct Inner {
    idle: Mutex<IdleMap>,
    connect_timeout: Duration,
    /// Longest wait for the next bytes of an answer's body.
    read_timeout: Duration,
    idle_timeout: Duration,
    max_idle_per_member: usize,
}

impl Upstream {
    /// `read_timeout` bounds each wait for more of an answer's body (the
    /// head is the caller's to bound); connections idle for `idle_timeout`
    /// are closed.
    pub fn new(connect_timeout: Duration, read_timeout: Duration, idle_timeout: Duration) -> Self {
        Self {
            inner: Arc::new(Inner {
                idle: Mutex::new(IdleMap::default()),
                connect_timeout,
                read_timeout,
                idle_timeout,
                max_idle_per_member: 1024,
            }),
        }
    }

    /// Sends one request to the member at `authority` and returns its
    /// answer once the head has arrived; the body streams from the socket.
    ///
    /// `head` is the complete request head. A request that is `replayable`
    /// (idempotent, without a body) is sent again on a new connection when
    /// a kept-alive one turns out to have been closed by the member
    /// before it answered anything.
    pub async fn send<B>(
        &self,
        authority: &str,
        head: &[u8],
        body: RequestBody<B>,
        head_request: bool,
        replayable: bool,
    ) -> Result<Response<UpstreamBody>, UpstreamError>
    where
        B: Body<Data = Bytes> + Unpin,
        B::Error: Into<BoxError>,
    {
        self.exchange_on_pool(authority, head, body, head_request, replayable, false)
            .await
    }

    /// Sends a request that asks to switch protocols (`head` carries
    /// `Connection: upgrade` and `Upgrade`, and the request has no body).
    /// A `101 Switching Protocols` answer hands over the connection: take
    /// it with [`UpstreamBody::into_tunnel`]. Any other answer is an
    /// ordinary one, the member having declined.
    pub async fn send_upgrade(
        &self,
        authority: &str,
        head: &[u8],
    ) -> Result<Response<UpstreamBody>, UpstreamError> {
        let none: RequestBody<http_body_util::Empty<Bytes>> = RequestBody::None;
        self.exchange_on_pool(authority, head, none, false, true, true)
            .await
    }

    async fn exchange_on_pool<B>(
        &self,
        authority: &str,
        head: &[u8],
        mut body: RequestBody<B>,
        head_request: bool,
        replayable: bool,
        upgrade: bool,
    ) -> Result<Response<UpstreamBody>, UpstreamError>
    where
        B: Body<Data = Bytes> + Unpin,
        B::Error: Into<BoxError>,
    {
        let mut fresh_only = false;
        loop {
            let (mut conn, reused) = match self.check_out(authority, fresh_only) {
                Some(conn) => (conn, true),
                None => (self.connect(authority).await?, false),
            };
            match exchange(&mut conn, head, &mut body, head_request, upgrade).await {
                Ok(parsed) => return Ok(self.response(conn, parsed)),
                Err(Failure { error, silent }) => {
                    if reused && silent && replayable && !fresh_only {
                        tracing::debug!(%authority, %error, "kept-alive connection was closed; sending again on a new one");
                        fresh_only = true;
                        continue;
                    }
                    return Err(error);
                }
            }
        }
    }

    /// The idle connections. A panic while they were held leaves nothing
    /// half-changed (each change is one push or pop), so a poisoned lock
    /// is taken as it is.
    fn lock_idle(&self) -> std::sync::MutexGuard<'_, IdleMap> {
        self.inner
            .idle
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Drops connections idle too long, and members with none left.
    pub fn prune(&self) {
        let now = Instant::now();
        let mut idle = self.lock_idle();
        idle.retain(|_, conns| {
            conns.retain(|c| now.duration_since(c.since) < self.inner.idle_timeout);
            !conns.is_empty()
        });
    }

    /// Idle connections kept (for tests).
    pub fn idle(&self) -> usize {
        let idle = self.lock_idle();
        idle.values().map(Vec::len).sum()
    }

    fn check_out(&self, authority: &str, fresh_only: bool) -> Option<Conn> {
        if fresh_only {
            return None;
        }
        let now = Instant::now();
        let mut idle = self.lock_idle();
        let conns = idle.get_mut(authority)?;
        // Most recently used first: it is the likeliest to be alive.
        while let Some(Idle { conn, since }) = conns.pop() {
            if now.duration_since(since) < self.inner.idle_timeout && still_open(&conn.stream) {
                return Some(conn);
            }
        }
        None
    }

    fn check_in(&self, conn: Conn) {
        let mut idle = self.lock_idle();
        let conns = match idle.get_mut(&*conn.authority) {
            Some(conns) => conns,
            None => idle.entry(conn.authority.clone()).or_default(),
        };
        if conns.len() < self.inner.max_idle_per_member {
            conns.push(Idle {
                conn,
                since: Instant::now(),
            });
        }
    }

    async fn connect(&self, authority: &str) -> Result<Conn, UpstreamError> {
        let connecting = TcpStream::connect(authority);
        let stream = match tokio::time::timeout(self.inner.connect_timeout, connecting).await {
            Ok(Ok(stream)) => stream,
            Ok(Err(source)) => {
                return Err(UpstreamError::Connect {
                    authority: authority.to_owned(),
                    source,
                })
            }
            Err(_) => return Err(UpstreamError::ConnectTimeout(authority.to_owned())),
        };
        stream.set_nodelay(true)?;
        Ok(Conn {
            stream,
            buf: BytesMut::with_capacity(READ_CHUNK),
            authority: Arc::from(authority),
        })
    }

    fn response(&self, conn: Conn, parsed: Parsed) -> Response<UpstreamBody> {
        let mut body = UpstreamBody {
            conn: Some(conn),
            framing: parsed.framing,
            keep_alive: parsed.keep_alive,
            pool: self.clone(),
            stall: None,
        };
        // An empty body is done before it is polled: the connection goes
        // back to the pool at once.
        body.finish_if_done();
        let mut response = Response::new(body);
        *response.status_mut() = parsed.status;
        *response.headers_mut() = parsed.headers;
        response
    }
}

/// Whether a kept-alive connection is still open. Free unless the socket
/// has signalled something since it was last read (tokio only tries the
/// read when it has a readiness event to clear).
fn still_open(stream: &TcpStream) -> bool {
    let mut probe = [0u8; 1];
    matches!(stream.try_read(&mut probe), Err(e) if e.kind() == io::ErrorKind::WouldBlock)
}

struct Failure {
    error: UpstreamError,
    /// Nothing at all came back: the member may never have seen the request.
    silent: bool,
}

impl<E: Into<UpstreamError>> From<E> for Failure {
    fn from(error: E) -> Self {
        Self {
            error: error.into(),
            silent: false,
        }
    }
}

/// A member's response head, and how its body is framed.
struct Parsed {
    status: StatusCode,
    headers: HeaderMap,
    framing: Framing,
    keep_alive: bool,
}

async fn exchange<B>(
    conn: &mut Conn,
    head: &[u8],
    body: &mut RequestBody<B>,
    head_request: bool,
    upgrade: bool,
) -> Result<Parsed, Failure>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    let written = conn.stream.write_all(head).await;
    if let Err(error) = written {
        return Err(Failure {
            error: error.into(),
            silent: true,
        });
    }
    // The write that failed under the body: the member may have answered
    // (a refusal) and closed before it, and that answer is still to read.
    let mut cut = None;
    if !matches!(body, RequestBody::None) {
        match send_body_watching(conn, body, head_request).await {
            Ok(Some(answered)) => return Ok(answered),
            Ok(None) => {}
            Err(UpstreamError::Io(error)) => cut = Some(error),
            Err(error) => return Err(error.into()),
        }
    }
    let mut received = false;
    loop {
        if !conn.buf.is_empty() {
            received = true;
            if let Some(mut parsed) = parse_head(&mut conn.buf, head_request, upgrade)? {
                // The member did not read the whole request.
                parsed.keep_alive &= cut.is_none();
                return Ok(parsed);
            }
            if conn.buf.len() > MAX_HEAD {
                return Err(UpstreamError::Protocol("response head too large").into());
            }
        }
        conn.buf.reserve(READ_CHUNK);
        let error = match conn.stream.read_buf(&mut conn.buf).await {
            Ok(0) => UpstreamError::Closed,
            Ok(_) => continue,
            Err(error) => error.into(),
        };
        return Err(Failure {
            error: cut.map_or(error, UpstreamError::Io),
            silent: !received,
        });
    }
}

/// Sends the request body while reading what the member says meanwhile.
///
/// A member may answer before it has read the whole body: to refuse it
/// (413 for an upload over its limit, 401, a redirect), often closing at
/// once. Writing on into a member that stopped reading would end in a
/// timeout or a reset, and the client would get a 504 or a 502 instead of
/// the member's own answer. So an answer of 300 or more that comes early
/// is returned at once: the rest of the body is not sent, and the
/// connection is not used again. An early success still waits for the
/// body to be sent, since the member may be reading it as it answers.
async fn send_body_watching<B>(
    conn: &mut Conn,
    body: &mut RequestBody<B>,
    head_request: bool,
) -> Result<Option<Parsed>, UpstreamError>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    let (mut reader, mut writer) = conn.stream.split();
    let buf = &mut conn.buf;
    let sending = send_body(&mut writer, body);
    tokio::pin!(sending);
    let mut watching = true;
    let mut early = None;
    loop {
        if watching {
            buf.reserve(READ_CHUNK);
        }
        tokio::select! {
            biased;
            read = reader.read_buf(buf), if watching => match read {
                Ok(n) if n > 0 => {
                    if let Some(mut parsed) = parse_head(buf, head_request, false)? {
                        if parsed.status.as_u16() >= 300 {
                            parsed.keep_alive = false;
                            return Ok(Some(parsed));
                        }
                        early = Some(parsed);
                        watching = false;
                    } else if buf.len() > MAX_HEAD {
                        return Err(UpstreamError::Protocol("response head too large"));
                    }
                }
                // Closed or failed: what the writes get next tells.
                _ => watching = false,
            },
            sent = &mut sending => {
                return match (sent, early) {
                    (Ok(()), early) => Ok(early),
                    // Answered, then stopped reading: it is done with the
                    // request.
                    (Err(UpstreamError::Io(_)), Some(mut answered)) => {
                        answered.keep_alive = false;
                        Ok(Some(answered))
                    }
                    (Err(error), _) => Err(error),
                };
            }
        }
    }
}

/// Writes the request body as its head framed it.
async fn send_body<B, W>(writer: &mut W, body: &mut RequestBody<B>) -> Result<(), UpstreamError>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
    W: AsyncWriteExt + Unpin,
{
    match body {
        RequestBody::None => {}
        RequestBody::Length(declared, body) => {
            let mut sent = 0u64;
            while let Some(frame) = body.frame().await {
                let frame = frame.map_err(|e| UpstreamError::RequestBody(e.into()))?;
                if let Ok(data) = frame.into_data() {
                    sent += data.len() as u64;
                    if sent > *declared {
                        return Err(UpstreamError::RequestBody(
                            "body longer than its content-length".into(),
                        ));
                    }
                    writer.write_all(&data).await?;
                }
            }
            if sent != *declared {
                return Err(UpstreamError::RequestBody(
                    "body shorter than its content-length".into(),
                ));
            }
        }
        RequestBody::Chunked(body) => {
            while let Some(frame) = body.frame().await {
                let frame = frame.map_err(|e| UpstreamError::RequestBody(e.into()))?;
                if let Ok(data) = frame.into_data() {
                    if data.is_empty() {
                        continue;
                    }
                    // Size line, data and CRLF in one (vectored) write.
                    let mut size = BytesMut::with_capacity(18);
                    let _ = write!(size, "{:x}\r\n", data.len());
                    let mut chunk = size.chain(data).chain(&b"\r\n"[..]);
                    writer.write_all_buf(&mut chunk).await?;
                }
            }
            writer.write_all(b"0\r\n\r\n").await?;
        }
    }
    Ok(())
}

/// Parses a complete response head off the front of `buf`, skipping
/// interim (1xx) answers but for a `101` to a request that asked to
/// `upgrade`; `None` while more bytes are needed.
fn parse_head(
    buf: &mut BytesMut,
    head_request: bool,
    upgrade: bool,
) -> Result<Option<Parsed>, UpstreamError> {
    loop {
        let mut slots = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut response = httparse::Response::new(&mut slots);
        let length = match response.parse(buf) {
            Ok(httparse::Status::Complete(length)) => length,
            Ok(httparse::Status::Partial) => return Ok(None),
            Err(httparse::Error::TooManyHeaders) => {
                return Err(UpstreamError::Protocol("too many headers"))
            }
            Err(_) => return Err(UpstreamError::Protocol("malformed response head")),
        };
        let code = response.code.unwrap_or(0);
        let status = StatusCode::from_u16(code)
            .map_err(|_| UpstreamError::Protocol("invalid status code"))?;
        if status == StatusCode::SWITCHING_PROTOCOLS && !upgrade {
            return Err(UpstreamError::Protocol("unexpected protocol switch"));
        }
        if status.is_informational() && status != StatusCode::SWITCHING_PROTOCOLS {
            buf.advance(length);
            continue;
        }
        let version_11 = response.version == Some(1);
        // Where each header sits in the head, so the head can be frozen
        // and the values shared with it instead of copied one by one.
        let base = buf.as_ptr() as usize;
        let mut places: Vec<(HeaderName, usize, usize)> =
            Vec::with_capacity(response.headers.len());
        let mut hop_by_hop = false;
        for h in response.headers.iter() {
            let name = HeaderName::from_bytes(h.name.as_bytes())
                .map_err(|_| UpstreamError::Protocol("invalid header name"))?;
            hop_by_hop |= is_hop_by_hop(&name);
            let start = h.value.as_ptr() as usize - base;
            places.push((name, start, start + h.value.len()));
        }
        let head = buf.split_to(length).freeze();
        let mut all = HeaderMap::with_capacity(places.len());
        for (name, start, end) in places {
            let value = HeaderValue::from_maybe_shared(head.slice(start..end))
                .map_err(|_| UpstreamError::Protocol("invalid header value"))?;
            all.append(name, value);
        }
        return framing(status, all, hop_by_hop, version_11, head_request).map(Some);
    }
}

/// Reads the framing and keep-alive off the member's headers, and keeps
/// only the end-to-end ones (RFC 9112 §6.3).
fn framing(
    status: StatusCode,
    all: HeaderMap,
    hop_by_hop: bool,
    version_11: bool,
    head_request: bool,
) -> Result<Parsed, UpstreamError> {
    // Without a hop-by-hop header there is no `Connection` and no transfer
    // coding to look up (the common answer: three lookups saved).
    let connection = all.get_all(header::CONNECTION);
    let has_token = |token: &str| {
        hop_by_hop && connection_tokens(&connection).any(|t| t.eq_ignore_ascii_case(token))
    };
    let keep_alive = if version_11 {
        !has_token("close")
    } else {
        has_token("keep-alive")
    };
    // Chunked only when it is the last coding; any other leaves the body
    // running to the close.
    let coding = if hop_by_hop {
        transfer_coding(&all)
    } else {
        None
    };
    let chunked = coding == Some(true);
    let transfer_coded = coding.is_some();
    let length = if transfer_coded {
        None
    } else {
        content_length(&all)?
    };
    let no_body =
        head_request || status == StatusCode::NO_CONTENT || status == StatusCode::NOT_MODIFIED;
    // What the member switches to, which the client is told too.
    let switched = if status == StatusCode::SWITCHING_PROTOCOLS {
        Some(
            all.get(header::UPGRADE)
                .cloned()
                .ok_or(UpstreamError::Protocol("a protocol switch without Upgrade"))?,
        )
    } else {
        None
    };
    let (framing, keep_alive) = if switched.is_some() {
        (Framing::Tunnel, false)
    } else if no_body {
        (Framing::Length(0), keep_alive)
    } else if chunked {
        (Framing::Chunked(Chunked::Size), keep_alive)
    } else if let Some(n) = length {
        (Framing::Length(n), keep_alive)
    } else {
        (Framing::Close, false)
    };
    // The headers `Connection` names go too (only looked for when there
    // is a hop-by-hop header, as `Connection` is one).
    let named: Vec<HeaderName> = if hop_by_hop {
        connection_tokens(&connection)
            .filter_map(|t| HeaderName::from_bytes(t.as_bytes()).ok())
            .collect()
    } else {
        Vec::new()
    };
    let mut headers = all;
    if transfer_coded {
        // The coding decides the length (RFC 9112 §6.3): a content-length
        // passed on beside it would frame the body wrongly for the client.
        headers.remove(header::CONTENT_LENGTH);
    }
    if hop_by_hop {
        for name in &named {
            headers.remove(name);
        }
        for name in HOP_BY_HOP {
            headers.remove(name);
        }
    }
    if let Some(protocol) = switched {
        headers.insert(header::UPGRADE, protocol);
    }
    Ok(Parsed {
        status,
        headers,
        framing,
        keep_alive,
    })
}

/// Whether a message has a transfer coding and, if it has, whether
/// `chunked` is the last one (RFC 9112 §6.3: only then does the coding
/// frame the body).
pub(crate) fn transfer_coding(headers: &HeaderMap) -> Option<bool> {
    let last = headers
        .get_all(header::TRANSFER_ENCODING)
        .iter()
        .next_back()?;
    Some(
        last.to_str()
            .ok()
            .and_then(|v| v.rsplit(',').next())
            .is_some_and(|t| t.trim().eq_ignore_ascii_case("chunked")),
    )
}

/// The `content-length` of a message: one value (repeats must agree).
pub fn content_length(headers: &HeaderMap) -> Result<Option<u64>, UpstreamError> {
    let mut length = None;
    for value in headers.get_all(header::CONTENT_LENGTH) {
        // Digits only: `u64::from_str` also takes a leading `+`, which
        // another hop may read differently (request smuggling).
        let digits = value.as_bytes().trim_ascii();
        let n: u64 = Some(digits)
            .filter(|d| !d.is_empty() && d.iter().all(u8::is_ascii_digit))
            .and_then(|d| std::str::from_utf8(d).ok())
            .and_then(|d| d.parse().ok())
            .ok_or(UpstreamError::Protocol("invalid content-length"))?;
        if length.is_some_and(|l| l != n) {
            return Err(UpstreamError::Protocol("conflicting content-length"));
        }
        length = Some(n);
    }
    Ok(length)
}

enum Framing {
    /// This many bytes are left.
    Length(u64),
    Chunked(Chunked),
    /// Until the member closes the connection.
    Close,
    /// No body: after a `101` the connection carries another protocol.
    Tunnel,
}

/// Where a chunked body's decoder is (a member's answer, or a client's
/// request body).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Chunked {
    Size,
    Data(u64),
    /// The CRLF after a chunk's data.
    DataEnd,
    Trailers,
    Done,
}

/// What one step of decoding gave.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Step {
    Data(Bytes),
    NeedMore,
    Done,
}

impl Chunked {
    pub(crate) fn decode(&mut self, buf: &mut BytesMut) -> Result<Step, UpstreamError> {
        loop {
            match *self {
                Self::Size => {
                    let Some(line) = take_line(buf)? else {
                        return Ok(Step::NeedMore);
                    };
                    let digits = line[..].split(|b| *b == b';').next().unwrap_or(&[]);
                    let digits = std::str::from_utf8(digits)
                        .map_err(|_| UpstreamError::Protocol("invalid chunk size"))?;
                    let size = u64::from_str_radix(digits.trim(), 16)
                        .map_err(|_| UpstreamError::Protocol("invalid chunk size"))?;
                    *self = if size == 0 {
                        Self::Trailers
                    } else {
                        Self::Data(size)
                    };
                }
                Self::Data(left) => {
                    if buf.is_empty() {
                        return Ok(Step::NeedMore);
                    }
                    let n = usize::try_from(left).unwrap_or(usize::MAX).min(buf.len());
                    let data = buf.split_to(n).freeze();
                    *self = match left - n as u64 {
                        0 => Self::DataEnd,
                        rest => Self::Data(rest),
                    };
                    return Ok(Step::Data(data));
                }
                Self::DataEnd => {
                    if buf.len() < 2 {
                        return Ok(Step::NeedMore);
                    }
                    if &buf[..2] != b"\r\n" {
                        return Err(UpstreamError::Protocol("chunk not followed by CRLF"));
                    }
                    buf.advance(2);
                    *self = Self::Size;
                }
                Self::Trailers => {
                    // Trailers are not passed on: they are rarely used and
                    // the client may not have asked for them (TE).
                    let Some(line) = take_line(buf)? else {
                        return Ok(Step::NeedMore);
                    };
                    if line.is_empty() {
                        *self = Self::Done;
                    }
                }
                Self::Done => return Ok(Step::Done),
            }
        }
    }
}

/// One CRLF-terminated line off the front of `buf`, without its CRLF.
fn take_line(buf: &mut BytesMut) -> Result<Option<BytesMut>, UpstreamError> {
    match buf.windows(2).position(|w| w == b"\r\n") {
        Some(at) => {
            let line = buf.split_to(at);
            buf.advance(2);
            Ok(Some(line))
        }
        None if buf.len() > MAX_LINE => Err(UpstreamError::Protocol("chunk line too long")),
        None => Ok(None),
    }
}

/// A member's response body, read straight off its connection. Once it is
/// complete the connection goes back to the pool; dropped before, the
/// connection is closed.
pub struct UpstreamBody {
    conn: Option<Conn>,
    framing: Framing,
    keep_alive: bool,
    pool: Upstream,
    /// Armed while waiting on the socket: a member that goes quiet in the
    /// middle of a body would otherwise hold the client for ever. Made
    /// only when a body has to wait (most arrive with their head).
    stall: Option<(Pin<Box<tokio::time::Sleep>>, bool)>,
}

impl UpstreamBody {
    /// After a `101 Switching Protocols`: the member's connection, and
    /// what it sent after the head (already the new protocol's bytes).
    pub fn into_tunnel(mut self) -> Option<(TcpStream, BytesMut)> {
        match self.framing {
            Framing::Tunnel => self.conn.take().map(|conn| (conn.stream, conn.buf)),
            _ => None,
        }
    }

    fn finish_if_done(&mut self) {
        let done = match self.framing {
            Framing::Length(n) => n == 0,
            Framing::Chunked(state) => state == Chunked::Done,
            Framing::Close | Framing::Tunnel => false,
        };
        if done {
            if let Some(conn) = self.conn.take() {
                // Bytes after the answer: the member is out of step, so the
                // connection is not used again.
                if self.keep_alive && conn.buf.is_empty() {
                    self.pool.check_in(conn);
                }
            }
        }
    }

    fn next(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Bytes, UpstreamError>>> {
        loop {
            let Some(conn) = self.conn.as_mut() else {
                return Poll::Ready(None);
            };
            let step = match &mut self.framing {
                // The connection is the tunnel's, not a body's.
                Framing::Tunnel => return Poll::Ready(None),
                Framing::Length(0) => Step::Done,
                Framing::Length(left) => {
                    if conn.buf.is_empty() {
                        Step::NeedMore
                    } else {
                        let n = usize::try_from(*left)
                            .unwrap_or(usize::MAX)
                            .min(conn.buf.len());
                        *left -= n as u64;
                        Step::Data(conn.buf.split_to(n).freeze())
                    }
                }
                Framing::Chunked(state) => state.decode(&mut conn.buf)?,
                Framing::Close => {
                    if conn.buf.is_empty() {
                        Step::NeedMore
                    } else {
                        Step::Data(conn.buf.split().freeze())
                    }
                }
            };
            match step {
                Step::Data(data) => {
                    self.finish_if_done();
                    return Poll::Ready(Some(Ok(data)));
                }
                Step::Done => {
                    self.finish_if_done();
                    return Poll::Ready(None);
                }
                Step::NeedMore => {
                    conn.buf.reserve(READ_CHUNK);
                    let polled = tokio_util::io::poll_read_buf(
                        Pin::new(&mut conn.stream),
                        cx,
                        &mut conn.buf,
                    );
                    let timeout = self.pool.inner.read_timeout;
                    let read = match polled {
                        Poll::Ready(read) => {
                            if let Some((_, armed)) = &mut self.stall {
                                *armed = false;
                            }
                            read
                        }
                        Poll::Pending => {
                            let (sleep, armed) = self.stall.get_or_insert_with(|| {
                                (Box::pin(tokio::time::sleep(timeout)), true)
                            });
                            if !*armed {
                                sleep.as_mut().reset(tokio::time::Instant::now() + timeout);
                                *armed = true;
                            }
                            ready!(sleep.as_mut().poll(cx));
                            return Poll::Ready(Some(Err(UpstreamError::Stalled(timeout))));
                        }
                    };
                    match read {
                        Ok(0) => {
                            self.conn = None;
                            return Poll::Ready(match self.framing {
                                Framing::Close => None,
                                _ => Some(Err(UpstreamError::Closed)),
                            });
                        }
                        Ok(_) => {}
                        Err(error) => return Poll::Ready(Some(Err(error.into()))),
                    }
                }
            }
        }
    }
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = UpstreamError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, UpstreamError>>> {
        let this = self.get_mut();
        match ready!(this.next(cx)) {
            Some(Ok(data)) => Poll::Ready(Some(Ok(Frame::data(data)))),
            Some(Err(error)) => {
                // A connection that failed mid-body is not used again.
                this.conn = None;
                Poll::Ready(Some(Err(error)))
            }
            None => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.conn.is_none() || matches!(self.framing, Framing::Tunnel)
    }

    fn size_hint(&self) -> SizeHint {
        match (&self.framing, &self.conn) {
            (_, None) | (Framing::Tunnel, _) => SizeHint::with_exact(0),
            (Framing::Length(n), _) => SizeHint::with_exact(*n),
            _ => SizeHint::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode_all(input: &[&[u8]]) -> Result<(Vec<u8>, bool), UpstreamError> {
        let mut state = Chunked::Size;
        let mut buf = BytesMut::new();
        let mut out = Vec::new();
        for piece in input {
            buf.extend_from_slice(piece);
            loop {
                match state.decode(&mut buf)? {
                    Step::Data(d) => out.extend_from_slice(&d),
                    Step::NeedMore => break,
                    Step::Done => return Ok((out, buf.is_empty())),
                }
            }
        }
        Ok((out, false))
    }

    #[test]
    fn chunked_bodies_decode_however_they_are_split() {
        let whole: &[u8] = b"5;ext=1\r\nhello\r\n7\r\n, world\r\n0\r\nx-trailer: t\r\n\r\n";
        assert_eq!(
            decode_all(&[whole]).ok(),
            Some((b"hello, world".to_vec(), true))
        );
        for split in 1..whole.len() {
            let (a, b) = whole.split_at(split);
            assert_eq!(
                decode_all(&[a, b]).ok(),
                Some((b"hello, world".to_vec(), true)),
                "split at {split}"
            );
        }
    }

    #[test]
    fn bad_chunked_bodies_are_errors() {
        assert!(decode_all(&[b"zz\r\nhello\r\n"]).is_err());
        assert!(decode_all(&[b"2\r\nhiXX0\r\n\r\n"]).is_err());
        assert!(decode_all(&[&[b'1'; MAX_LINE + 10]]).is_err());
    }

    #[test]
    fn heads_give_status_end_to_end_headers_and_framing() {
        let mut buf = BytesMut::from(
            &b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\ncontent-length: 5\r\nconnection: x-private\r\nx-private: 1\r\nkeep-alive: timeout=5\r\nx-kept: yes\r\n\r\nhello"[..],
        );
        let parsed = parse_head(&mut buf, false, false).ok().flatten();
        let Some(parsed) = parsed else {
            panic!("head not parsed")
        };
        assert_eq!(parsed.status, StatusCode::OK);
        assert!(parsed.keep_alive);
        assert!(matches!(parsed.framing, Framing::Length(5)));
        assert_eq!(
            parsed.headers.get("x-kept").map(|v| v.as_bytes()),
            Some(&b"yes"[..])
        );
        assert!(parsed.headers.get("x-private").is_none());
        assert!(parsed.headers.get("keep-alive").is_none());
        assert!(parsed.headers.get("connection").is_none());
        assert_eq!(&buf[..], b"hello");

        let mut partial = BytesMut::from(&b"HTTP/1.1 200 OK\r\ncontent-le"[..]);
        assert!(matches!(parse_head(&mut partial, false, false), Ok(None)));

        let mut chunked = BytesMut::from(
            &b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ncontent-length: 3\r\n\r\n"[..],
        );
        let parsed = parse_head(&mut chunked, false, false).ok().flatten();
        assert!(parsed
            .as_ref()
            .is_some_and(|p| !p.headers.contains_key(header::CONTENT_LENGTH)));
        assert!(matches!(
            parsed.map(|p| p.framing),
            Some(Framing::Chunked(Chunked::Size))
        ));

        let mut close = BytesMut::from(&b"HTTP/1.0 200 OK\r\n\r\n"[..]);
        let parsed = parse_head(&mut close, false, false).ok().flatten();
        assert!(matches!(
            parsed.map(|p| (p.framing, p.keep_alive)),
            Some((Framing::Close, false))
        ));

        let mut head = BytesMut::from(&b"HTTP/1.1 200 OK\r\ncontent-length: 9\r\n\r\n"[..]);
        let parsed = parse_head(&mut head, true, false).ok().flatten();
        assert!(matches!(
            parsed.map(|p| p.framing),
            Some(Framing::Length(0))
        ));

        for bad in [
            &b"HTTP/1.1 200 OK\r\ncontent-length: 1\r\ncontent-length: 2\r\n\r\n"[..],
            b"HTTP/1.1 200 OK\r\ncontent-length: -1\r\n\r\n",
            b"HTTP/1.1 101 Switching Protocols\r\n\r\n",
            b"SSH-2.0-OpenSSH\r\n\r\n",
        ] {
            assert!(parse_head(&mut BytesMut::from(bad), false, false).is_err());
        }

        // Asked for, a switch is the answer: the connection is the
        // tunnel's, and the client is told what it switched to.
        let mut switch = BytesMut::from(
            &b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\n\
               Upgrade: websocket\r\nSec-WebSocket-Accept: k\r\n\r\nframe"[..],
        );
        let parsed = parse_head(&mut switch, false, true).ok().flatten();
        assert!(parsed
            .as_ref()
            .is_some_and(|p| p.status == StatusCode::SWITCHING_PROTOCOLS
                && matches!(p.framing, Framing::Tunnel)
                && !p.keep_alive
                && p.headers
                    .get(header::UPGRADE)
                    .is_some_and(|v| v == "websocket")
                && p.headers.contains_key("sec-websocket-accept")
                && !p.headers.contains_key(header::CONNECTION)));
        assert_eq!(&switch[..], b"frame");
        let mut unnamed = BytesMut::from(&b"HTTP/1.1 101 Switching Protocols\r\n\r\n"[..]);
        assert!(parse_head(&mut unnamed, false, true).is_err());
    }
}
