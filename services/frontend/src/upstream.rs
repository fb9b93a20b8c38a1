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
use std::future::Future;
use std::hash::BuildHasherDefault;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{ready, Context, Poll};
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes, BytesMut};
use headroom_shared::hash::Fnv1a;
use http::Response;
use http_body_util::BodyExt;
use hyper::body::{Body, Frame, SizeHint};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::http1::chunked::{self, LAST_CHUNK};
use crate::http1::{parse, Asked, BodyDecoder, Framing, Lines, Malformed, ResponseHead, Step};

/// Bytes read from a member at a time.
const READ_CHUNK: usize = 16 << 10;
/// Largest response head accepted from a member.
const MAX_HEAD: usize = 64 << 10;

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
    Protocol(#[from] Malformed),
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

/// What a request is, as far as sending it goes.
#[derive(Debug, Clone, Copy, Default)]
pub struct Sending {
    /// What the answer is read as (a HEAD's, an upgrade's).
    pub asked: Asked,
    /// Idempotent and without a body: sent again on a new connection when
    /// a kept-alive one turns out to have been closed by the member
    /// before it answered anything.
    pub replayable: bool,
}

/// How a request body is framed on the way to the member.
pub enum RequestBody<B> {
    None,
    /// The head carries `content-length: n`.
    Length(u64, B),
    /// The head carries `transfer-encoding: chunked`.
    Chunked(B),
}

/// A connection kept alive to a member. Boxed once when it is made: an
/// answer's body carries it, and each move of an answer copies it.
struct Conn {
    stream: TcpStream,
    /// What was read and not yet used.
    buf: BytesMut,
    /// The member's `host:port`, its key in the pool.
    authority: Arc<str>,
}

struct Idle {
    conn: Box<Conn>,
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
    /// `head` is the complete request head.
    pub async fn send<B>(
        &self,
        authority: &str,
        head: &[u8],
        body: RequestBody<B>,
        sending: Sending,
    ) -> Result<Response<UpstreamBody>, UpstreamError>
    where
        B: Body<Data = Bytes> + Unpin,
        B::Error: Into<BoxError>,
    {
        self.exchange_on_pool(authority, head, body, sending).await
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
        let sending = Sending {
            asked: Asked {
                head_request: false,
                upgrade: true,
                pass_through: false,
            },
            replayable: true,
        };
        self.exchange_on_pool(authority, head, none, sending).await
    }

    async fn exchange_on_pool<B>(
        &self,
        authority: &str,
        head: &[u8],
        mut body: RequestBody<B>,
        sending: Sending,
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
            match exchange(&mut conn, head, &mut body, sending.asked).await {
                Ok(parsed) => return Ok(self.response(conn, parsed)),
                Err(Failure { error, silent }) => {
                    if reused && silent && sending.replayable && !fresh_only {
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

    fn check_out(&self, authority: &str, fresh_only: bool) -> Option<Box<Conn>> {
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

    fn check_in(&self, conn: Box<Conn>) {
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

    async fn connect(&self, authority: &str) -> Result<Box<Conn>, UpstreamError> {
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
        Ok(Box::new(Conn {
            stream,
            buf: BytesMut::with_capacity(READ_CHUNK),
            authority: Arc::from(authority),
        }))
    }

    fn response(&self, conn: Box<Conn>, parsed: ResponseHead) -> Response<UpstreamBody> {
        let mut body = UpstreamBody {
            conn: Some(conn),
            lines: parsed.lines,
            decoder: BodyDecoder::new(parsed.framing),
            tunnel: parsed.framing == Framing::Tunnel,
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

async fn exchange<B>(
    conn: &mut Conn,
    head: &[u8],
    body: &mut RequestBody<B>,
    asked: Asked,
) -> Result<ResponseHead, Failure>
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
        match send_body_watching(conn, body, asked).await {
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
            if let Some(mut parsed) = parse::response(&mut conn.buf, asked)? {
                // The member did not read the whole request.
                parsed.keep_alive &= cut.is_none();
                return Ok(parsed);
            }
            if conn.buf.len() > MAX_HEAD {
                return Err(Malformed("response head too large").into());
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
    asked: Asked,
) -> Result<Option<ResponseHead>, UpstreamError>
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
                    if let Some(mut parsed) = parse::response(buf, asked)? {
                        if parsed.status.as_u16() >= 300 {
                            parsed.keep_alive = false;
                            return Ok(Some(parsed));
                        }
                        early = Some(parsed);
                        watching = false;
                    } else if buf.len() > MAX_HEAD {
                        return Err(Malformed("response head too large").into());
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
                    chunked::size_line(&mut size, data.len());
                    let mut chunk = size.chain(data).chain(&b"\r\n"[..]);
                    writer.write_all_buf(&mut chunk).await?;
                }
            }
            writer.write_all(LAST_CHUNK).await?;
        }
    }
    Ok(())
}

/// A member's response body, read straight off its connection. Once it is
/// complete the connection goes back to the pool; dropped before, the
/// connection is closed.
pub struct UpstreamBody {
    conn: Option<Box<Conn>>,
    /// The answer's header lines, when they are kept as they came (then
    /// the response's header map is empty).
    lines: Option<Lines>,
    decoder: BodyDecoder,
    /// After a `101`: the connection is the tunnel's, not a body's.
    tunnel: bool,
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
        if !self.tunnel {
            return None;
        }
        self.conn.take().map(|conn| {
            let Conn { stream, buf, .. } = *conn;
            (stream, buf)
        })
    }

    /// The answer's header lines as the member sent them, if they were
    /// kept so ([`Asked::pass_through`]): the response's header map is
    /// empty then, and whoever takes them writes them or reads them.
    pub fn take_lines(&mut self) -> Option<Lines> {
        self.lines.take()
    }

    pub fn lines(&self) -> Option<&Lines> {
        self.lines.as_ref()
    }

    fn finish_if_done(&mut self) {
        if self.tunnel || !self.decoder.is_done() {
            return;
        }
        if let Some(conn) = self.conn.take() {
            // Bytes after the answer: the member is out of step, so the
            // connection is not used again.
            if self.keep_alive && conn.buf.is_empty() {
                self.pool.check_in(conn);
            }
        }
    }

    fn next(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Bytes, UpstreamError>>> {
        loop {
            let Some(conn) = self.conn.as_mut() else {
                return Poll::Ready(None);
            };
            if self.tunnel {
                return Poll::Ready(None);
            }
            match self.decoder.decode(&mut conn.buf)? {
                Step::Data(data) => {
                    self.finish_if_done();
                    return Poll::Ready(Some(Ok(data)));
                }
                Step::Done => {
                    self.finish_if_done();
                    return Poll::Ready(None);
                }
                Step::NeedMore => {}
            }
            match ready!(self.read_more(cx)) {
                Ok(0) => {
                    self.conn = None;
                    let ended = self.decoder.at_close();
                    return Poll::Ready((!ended).then_some(Err(UpstreamError::Closed)));
                }
                Ok(_) => {}
                Err(error) => return Poll::Ready(Some(Err(error))),
            }
        }
    }

    /// Reads more of the body, bounded by the read timeout.
    fn read_more(&mut self, cx: &mut Context<'_>) -> Poll<Result<usize, UpstreamError>> {
        let Some(conn) = self.conn.as_mut() else {
            return Poll::Ready(Ok(0));
        };
        conn.buf.reserve(READ_CHUNK);
        let polled = tokio_util::io::poll_read_buf(Pin::new(&mut conn.stream), cx, &mut conn.buf);
        let timeout = self.pool.inner.read_timeout;
        match polled {
            Poll::Ready(read) => {
                if let Some((_, armed)) = &mut self.stall {
                    *armed = false;
                }
                Poll::Ready(read.map_err(UpstreamError::from))
            }
            Poll::Pending => {
                let (sleep, armed) = self
                    .stall
                    .get_or_insert_with(|| (Box::pin(tokio::time::sleep(timeout)), true));
                if !*armed {
                    sleep.as_mut().reset(tokio::time::Instant::now() + timeout);
                    *armed = true;
                }
                ready!(sleep.as_mut().poll(cx));
                Poll::Ready(Err(UpstreamError::Stalled(timeout)))
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
        self.conn.is_none() || self.tunnel
    }

    fn size_hint(&self) -> SizeHint {
        if self.conn.is_none() || self.tunnel {
            return SizeHint::with_exact(0);
        }
        match self.decoder.exact() {
            Some(n) => SizeHint::with_exact(n),
            None => SizeHint::default(),
        }
    }
}
