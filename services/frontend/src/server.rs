//! The client side of the front-end: one connection, its requests read off
//! the socket, each handed to the proxy, and its answers written back,
//! with the connection kept alive between them. HTTP/2 connections, told
//! by their preface, go to hyper.
//!
//! Why HTTP/1 is not hyper's: a proxy needs little of a general server
//! (no service stack, one request at a time; an upgrade is a splice of two
//! sockets), and hyper's dispatcher, its per-request header timer and its
//! request body channel were most of the proxy's own CPU time per request
//! once the client to members was its own (see the README's benchmark).
//! The parsing is still httparse, hyper's parser.

use std::convert::Infallible;
use std::io;
use std::mem::MaybeUninit;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode, Uri, Version};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::server::conn::http2;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::debug;

use crate::proxy::{Proxy, ProxyBody, Tunnel};
use crate::upstream::{self, Chunked, Step, Upstream, UpstreamError};

/// What an HTTP/2 connection opens with (RFC 9113 §3.4).
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// Most headers in a request.
const MAX_HEADERS: usize = 100;
/// Bytes read from a client at a time.
const READ_CHUNK: usize = 8 << 10;
/// A first body frame up to this size is copied behind the head, so both
/// go in one small write; a larger one goes in a vectored write.
const COPY_BEHIND_HEAD: usize = 16 << 10;
/// After an error answer the client may still be sending: the connection
/// is read and the bytes thrown away for this long before it is closed,
/// since closing with unread bytes resets it, and a reset can destroy the
/// answer before the client has read it.
const LINGER: Duration = Duration::from_millis(500);
/// Most bytes thrown away while lingering.
const LINGER_BYTES: usize = 1 << 20;

/// What every connection on a worker shares.
#[derive(Clone)]
pub struct Shared {
    pub proxy: Arc<Proxy>,
    /// This worker's connections to members.
    pub upstream: Upstream,
    pub http2: Arc<http2::Builder<TokioExecutor>>,
}

/// Serves one client connection until it closes, fails, idles past the
/// header timeout, or `shutdown` (then an HTTP/1 request in progress is
/// answered first; HTTP/2 streams in progress finish).
pub async fn serve(
    mut stream: TcpStream,
    client: SocketAddr,
    shared: Shared,
    shutdown: CancellationToken,
) {
    let settings = shared.proxy.settings();
    let (header_timeout, max_head) = (settings.header_timeout, settings.max_header_bytes);
    let mut buf = BytesMut::with_capacity(READ_CHUNK);
    let mut out = BytesMut::with_capacity(1024);
    // One timer for the connection, moved later for each request: moving
    // an armed timer later is a cheap update in tokio (it is not taken out
    // of the wheel), where a new one per request was not.
    let timer = tokio::time::sleep(header_timeout);
    tokio::pin!(timer);
    let cancelled = shutdown.clone().cancelled_owned();
    tokio::pin!(cancelled);
    let mut sniffing = true;
    loop {
        timer.as_mut().reset(Instant::now() + header_timeout);
        // Read until a whole request head is in.
        let head = loop {
            if !buf.is_empty() {
                if sniffing {
                    match sniff(&buf) {
                        Some(true) => {
                            let prefix = buf.split().freeze();
                            return serve_http2(stream, prefix, client, shared, cancelled).await;
                        }
                        Some(false) => sniffing = false,
                        None => {}
                    }
                }
                if !sniffing {
                    match parse_head(&mut buf) {
                        Ok(Some(head)) => break head,
                        Ok(None) => {}
                        Err(refusal) => return refuse(stream, &mut out, refusal).await,
                    }
                }
                if buf.len() >= max_head {
                    let refusal = Refusal(
                        StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                        "request head too large",
                    );
                    return refuse(stream, &mut out, refusal).await;
                }
            }
            buf.reserve(READ_CHUNK);
            let idle = buf.is_empty();
            tokio::select! {
                biased;
                read = stream.read_buf(&mut buf) => match read {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                },
                () = &mut timer => {
                    if idle {
                        return;
                    }
                    let refusal = Refusal(StatusCode::REQUEST_TIMEOUT, "request head not received in time");
                    return refuse(stream, &mut out, refusal).await;
                }
                () = &mut cancelled, if idle => return,
            }
        };
        let Head {
            request,
            mut body,
            mut keep_alive,
            expects_continue,
        } = head;
        if request.method() == Method::CONNECT {
            let refusal = Refusal(StatusCode::METHOD_NOT_ALLOWED, "CONNECT is not supported");
            return refuse(stream, &mut out, refusal).await;
        }
        let http10 = request.version() == Version::HTTP_10;
        let head_request = request.method() == Method::HEAD;
        if expects_continue && body != BodyState::Done {
            // The client waits for this before it sends its body.
            if stream
                .write_all(b"HTTP/1.1 100 Continue\r\n\r\n")
                .await
                .is_err()
            {
                return;
            }
        }
        let response = {
            let request = request.map(|()| ClientBody {
                stream: &mut stream,
                buf: &mut buf,
                state: &mut body,
            });
            shared.proxy.handle(&shared.upstream, request, client).await
        };
        let sink = Sink {
            stream: &stream,
            stall: settings.request_timeout,
        };
        // The member switched protocols: the connection is a tunnel now.
        if matches!(response.body(), ProxyBody::Tunnel(_)) {
            let (parts, ProxyBody::Tunnel(tunnel)) = response.into_parts() else {
                return;
            };
            if write_head(&sink, &mut out, &parts, Framing::None, false, true, None).await {
                let counters = &shared.proxy.counters;
                counters.tunnels.fetch_add(1, Ordering::Relaxed);
                counters.tunnels_open.fetch_add(1, Ordering::Relaxed);
                join(stream, buf, tunnel, cancelled).await;
                counters.tunnels_open.fetch_sub(1, Ordering::Relaxed);
            }
            return;
        }
        // A body not read to its end leaves the connection out of step.
        keep_alive &= body == BodyState::Done && !shutdown.is_cancelled();
        let written =
            write_response(&sink, &mut out, response, head_request, http10, keep_alive).await;
        if !(written && keep_alive) {
            if written {
                if body == BodyState::Done {
                    let _ = stream.shutdown().await;
                } else {
                    // The client may still be sending the body.
                    linger(stream).await;
                }
            }
            return;
        }
    }
}

/// Whether the connection opens with the HTTP/2 preface: `None` while too
/// few bytes are in to tell.
fn sniff(buf: &[u8]) -> Option<bool> {
    let n = buf.len().min(H2_PREFACE.len());
    if buf[..n] != H2_PREFACE[..n] {
        Some(false)
    } else if n == H2_PREFACE.len() {
        Some(true)
    } else {
        None
    }
}

/// An answer the server gives itself, closing the connection after it.
struct Refusal(StatusCode, &'static str);

/// A request head, and how its body comes.
struct Head {
    request: Request<()>,
    body: BodyState,
    keep_alive: bool,
    expects_continue: bool,
}

/// Parses a complete request head off the front of `buf`; `None` while
/// more bytes are needed.
fn parse_head(buf: &mut BytesMut) -> Result<Option<Head>, Refusal> {
    let bad = |why| Refusal(StatusCode::BAD_REQUEST, why);
    let mut slots = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
    let mut parsed = httparse::Request::new(&mut []);
    let length = match parsed.parse_with_uninit_headers(buf, &mut slots) {
        Ok(httparse::Status::Complete(length)) => length,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => {
            return Err(Refusal(
                StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                "too many request headers",
            ))
        }
        Err(httparse::Error::Version) => {
            return Err(Refusal(
                StatusCode::HTTP_VERSION_NOT_SUPPORTED,
                "HTTP version not supported",
            ))
        }
        Err(_) => return Err(bad("malformed request head")),
    };
    let version = match parsed.version {
        Some(1) => Version::HTTP_11,
        _ => Version::HTTP_10,
    };
    let method = Method::from_bytes(parsed.method.unwrap_or("").as_bytes())
        .map_err(|_| bad("invalid method"))?;
    // Where the target and each value sit in the head, so the head can be
    // frozen and shared by them instead of copied piece by piece.
    let base = buf.as_ptr() as usize;
    let place = |s: &[u8]| {
        let start = s.as_ptr() as usize - base;
        start..start + s.len()
    };
    let target = place(parsed.path.unwrap_or("").as_bytes());
    let mut places = Vec::with_capacity(parsed.headers.len());
    for h in parsed.headers.iter() {
        let name =
            HeaderName::from_bytes(h.name.as_bytes()).map_err(|_| bad("invalid header name"))?;
        places.push((name, place(h.value)));
    }
    let head = buf.split_to(length).freeze();
    let uri = Uri::from_maybe_shared(head.slice(target)).map_err(|_| bad("invalid target"))?;
    let mut headers = HeaderMap::with_capacity(places.len());
    for (name, at) in places {
        let value =
            HeaderValue::from_maybe_shared(head.slice(at)).map_err(|_| bad("invalid header"))?;
        headers.append(name, value);
    }
    let connection = |token: &str| {
        upstream::connection_tokens(&headers.get_all(header::CONNECTION))
            .any(|t| t.eq_ignore_ascii_case(token))
    };
    let mut keep_alive = if version == Version::HTTP_11 {
        !connection("close")
    } else {
        connection("keep-alive")
    };
    // RFC 9112 §6.3: a transfer coding decides the length, and chunked
    // must be the last one; with a content-length beside it, the request
    // is answered and the connection closed (one of them may be what
    // another hop went by).
    let body = match upstream::transfer_coding(&headers) {
        Some(false) => return Err(bad("unsupported transfer coding")),
        Some(true) => {
            if version == Version::HTTP_10 || headers.contains_key(header::CONTENT_LENGTH) {
                keep_alive = false;
            }
            BodyState::Chunked(Chunked::Size)
        }
        None => match upstream::content_length(&headers) {
            Ok(Some(n)) if n > 0 => BodyState::Length(n),
            Ok(_) => BodyState::Done,
            Err(_) => return Err(bad("invalid content-length")),
        },
    };
    // RFC 9112 §3.2: an HTTP/1.1 request names its host, and only once;
    // two could be read one way here (routing, the cache key) and
    // another by the member.
    let mut hosts = headers.get_all(header::HOST).iter();
    match (hosts.next(), hosts.next()) {
        (None, _) if version == Version::HTTP_11 => return Err(bad("no Host header")),
        (Some(_), Some(_)) => return Err(bad("more than one Host header")),
        _ => {}
    }
    let expects_continue = version == Version::HTTP_11
        && headers
            .get(header::EXPECT)
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"));
    let mut request = Request::new(());
    *request.method_mut() = method;
    *request.uri_mut() = uri;
    *request.version_mut() = version;
    *request.headers_mut() = headers;
    Ok(Some(Head {
        request,
        body,
        keep_alive,
        expects_continue,
    }))
}

/// How much of a request body is still to come.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BodyState {
    Length(u64),
    Chunked(Chunked),
    /// Read to its end (or there was none).
    Done,
    /// It broke off or was malformed: the connection is out of step.
    Failed,
}

#[derive(Debug, thiserror::Error)]
pub enum ClientBodyError {
    #[error("reading the request body: {0}")]
    Io(#[from] io::Error),
    #[error("the client closed the connection before its request body was complete")]
    Closed,
    #[error("malformed chunked request body: {0}")]
    Chunked(#[source] UpstreamError),
}

/// A request body, read off the client's connection as the member takes it.
struct ClientBody<'a> {
    stream: &'a mut TcpStream,
    buf: &'a mut BytesMut,
    state: &'a mut BodyState,
}

impl Body for ClientBody<'_> {
    type Data = Bytes;
    type Error = ClientBodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, ClientBodyError>>> {
        let this = self.get_mut();
        loop {
            match this.state {
                BodyState::Done | BodyState::Failed => return Poll::Ready(None),
                BodyState::Length(left) => {
                    if !this.buf.is_empty() {
                        let n = usize::try_from(*left)
                            .unwrap_or(usize::MAX)
                            .min(this.buf.len());
                        let data = this.buf.split_to(n).freeze();
                        *left -= n as u64;
                        if *left == 0 {
                            *this.state = BodyState::Done;
                        }
                        return Poll::Ready(Some(Ok(Frame::data(data))));
                    }
                }
                BodyState::Chunked(decoder) => match decoder.decode(this.buf) {
                    Ok(Step::Data(data)) => return Poll::Ready(Some(Ok(Frame::data(data)))),
                    Ok(Step::Done) => {
                        *this.state = BodyState::Done;
                        return Poll::Ready(None);
                    }
                    Ok(Step::NeedMore) => {}
                    Err(err) => {
                        *this.state = BodyState::Failed;
                        return Poll::Ready(Some(Err(ClientBodyError::Chunked(err))));
                    }
                },
            }
            this.buf.reserve(READ_CHUNK);
            match std::task::ready!(tokio_util::io::poll_read_buf(
                Pin::new(&mut *this.stream),
                cx,
                this.buf
            )) {
                Ok(0) => {
                    *this.state = BodyState::Failed;
                    return Poll::Ready(Some(Err(ClientBodyError::Closed)));
                }
                Ok(_) => {}
                Err(err) => {
                    *this.state = BodyState::Failed;
                    return Poll::Ready(Some(Err(err.into())));
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        matches!(self.state, BodyState::Done | BodyState::Failed)
    }

    fn size_hint(&self) -> SizeHint {
        match *self.state {
            BodyState::Length(n) => SizeHint::with_exact(n),
            BodyState::Chunked(_) => SizeHint::default(),
            BodyState::Done | BodyState::Failed => SizeHint::with_exact(0),
        }
    }
}

/// How an answer's body is framed for the client.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Framing {
    /// HEAD, 1xx, 204, 304: the head says what it says, no body follows.
    None,
    Length(u64),
    Chunked,
    /// To the close (an HTTP/1.0 client, length unknown).
    Close,
}

/// Writes the answer; `false` when the connection cannot carry another
/// (the client is gone, or the member's body broke off midway).
async fn write_response(
    sink: &Sink<'_>,
    out: &mut BytesMut,
    response: Response<ProxyBody>,
    head_request: bool,
    http10: bool,
    mut keep_alive: bool,
) -> bool {
    let (parts, mut body) = response.into_parts();
    let status = parts.status;
    let framing = if head_request
        || status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED
    {
        Framing::None
    } else if let Some(n) = body.size_hint().exact() {
        Framing::Length(n)
    } else if http10 {
        keep_alive = false;
        Framing::Close
    } else {
        Framing::Chunked
    };
    // Most bodies arrive with their head: looked at without waiting, so
    // head and body can go in one write. Whatever is not there yet is
    // waited for below (this poll's waker is replaced by that one).
    let first = if framing == Framing::None {
        drop(body);
        return write_head(sink, out, &parts, framing, http10, keep_alive, None).await;
    } else {
        match poll_now(&mut body) {
            Poll::Ready(Some(Ok(frame))) => frame.into_data().ok(),
            Poll::Ready(Some(Err(err))) => {
                // Nothing has been sent: the client gets a clear error.
                debug!(%err, "the member's answer broke off before its body");
                let (parts, message) =
                    own_answer(StatusCode::BAD_GATEWAY, "the member's answer broke off");
                let framing = Framing::Length(message.len() as u64);
                write_head(sink, out, &parts, framing, http10, false, Some(message)).await;
                return false;
            }
            Poll::Ready(None) => None,
            Poll::Pending => None,
        }
    };
    let mut sent = first.as_ref().map_or(0, |b| b.len() as u64);
    let ended = body.is_end_stream();
    if !write_head(sink, out, &parts, framing, http10, keep_alive, first).await {
        return false;
    }
    if !ended {
        while let Some(frame) = std::future::poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)).await
        {
            let data = match frame {
                Ok(frame) => match frame.into_data() {
                    Ok(data) if !data.is_empty() => data,
                    _ => continue,
                },
                Err(err) => {
                    debug!(%err, "the member's answer broke off midway");
                    return false;
                }
            };
            sent += data.len() as u64;
            let written = if framing == Framing::Chunked {
                out.clear();
                chunk_size_line(out, data.len());
                let chunk = Buf::chain(&out[..], data).chain(&b"\r\n"[..]);
                send(sink, chunk).await
            } else {
                send(sink, data).await
            };
            if written.is_err() {
                return false;
            }
        }
    }
    match framing {
        Framing::Chunked => send(sink, &b"0\r\n\r\n"[..]).await.is_ok(),
        Framing::Length(n) => sent == n,
        Framing::None | Framing::Close => true,
    }
}

/// The body's next frame if it is there already.
fn poll_now(body: &mut ProxyBody) -> Poll<Option<Result<Frame<Bytes>, UpstreamError>>> {
    let mut cx = Context::from_waker(std::task::Waker::noop());
    Pin::new(body).poll_frame(&mut cx)
}

/// Writes the status line, the headers and the framing, with the first
/// body data (chunk-framed if need be) in the same write.
async fn write_head(
    sink: &Sink<'_>,
    out: &mut BytesMut,
    parts: &http::response::Parts,
    framing: Framing,
    http10: bool,
    keep_alive: bool,
    first: Option<Bytes>,
) -> bool {
    out.clear();
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(parts.status.as_str().as_bytes());
    out.put_u8(b' ');
    out.extend_from_slice(
        parts
            .status
            .canonical_reason()
            .unwrap_or("Unknown")
            .as_bytes(),
    );
    out.extend_from_slice(b"\r\n");
    for (name, value) in &parts.headers {
        // The framing and the connection are this hop's to say.
        if name == header::CONNECTION
            || name == header::TRANSFER_ENCODING
            || (name == header::CONTENT_LENGTH && framing != Framing::None)
        {
            continue;
        }
        header_line(out, name.as_str().as_bytes(), value.as_bytes());
    }
    if !parts.headers.contains_key(header::DATE) {
        out.extend_from_slice(b"date: ");
        http_date(out);
        out.extend_from_slice(b"\r\n");
    }
    match framing {
        Framing::Length(n) => {
            out.extend_from_slice(b"content-length: ");
            crate::proxy::write_decimal(out, n);
            out.extend_from_slice(b"\r\n");
        }
        Framing::Chunked => out.extend_from_slice(b"transfer-encoding: chunked\r\n"),
        Framing::None | Framing::Close => {}
    }
    if parts.status == StatusCode::SWITCHING_PROTOCOLS {
        out.extend_from_slice(b"connection: upgrade\r\n");
    } else if !keep_alive {
        out.extend_from_slice(b"connection: close\r\n");
    } else if http10 {
        out.extend_from_slice(b"connection: keep-alive\r\n");
    }
    out.extend_from_slice(b"\r\n");
    let written = match first {
        Some(data) if !data.is_empty() => {
            let chunked = framing == Framing::Chunked;
            if chunked {
                chunk_size_line(out, data.len());
            }
            if data.len() <= COPY_BEHIND_HEAD {
                out.extend_from_slice(&data);
                if chunked {
                    out.extend_from_slice(b"\r\n");
                }
                send(sink, &out[..]).await
            } else {
                let tail: &[u8] = if chunked { b"\r\n" } else { b"" };
                send(sink, Buf::chain(&out[..], data).chain(tail)).await
            }
        }
        _ => send(sink, &out[..]).await,
    };
    written.is_ok()
}

/// Joins the client's connection to the member's once the member has
/// switched protocols: bytes go both ways as they come, and when one side
/// is done sending the other is told (its write side shut down) while the
/// other way goes on, until both are done, either fails, or shutdown.
/// A tunnel has no idle limit: WebSocket connections idle for long
/// stretches, and keep themselves alive (pings) if they need to.
async fn join(
    mut client: TcpStream,
    from_client: BytesMut,
    tunnel: Tunnel,
    cancelled: Pin<&mut tokio_util::sync::WaitForCancellationFutureOwned>,
) {
    // The in-flight count is held until the tunnel closes.
    let Tunnel {
        mut member,
        early,
        in_flight: _in_flight,
    } = tunnel;
    // What either side sent after its head, before the switch was through.
    if !from_client.is_empty() && member.write_all(&from_client).await.is_err() {
        return;
    }
    if !early.is_empty() && client.write_all(&early).await.is_err() {
        return;
    }
    tokio::select! {
        carried = tokio::io::copy_bidirectional(&mut client, &mut member) => {
            debug!(?carried, "tunnel closed");
        }
        () = cancelled => debug!("tunnel closed on shutdown"),
    }
}

/// The client's side of the connection, for writing answers.
struct Sink<'a> {
    stream: &'a TcpStream,
    /// Longest the client may take none of its answer.
    stall: Duration,
}

/// Writes all of `buf`, giving up when the client takes none of it for
/// `sink.stall`: a client that stops reading would otherwise hold its
/// answer, and the member's connection streaming it, for ever. The timer
/// is made only when the socket is full, so a write that fits costs none.
async fn send(sink: &Sink<'_>, mut buf: impl Buf) -> io::Result<()> {
    let Sink { stream, stall } = *sink;
    while buf.has_remaining() {
        let mut slices = [io::IoSlice::new(&[]); 4];
        let n = buf.chunks_vectored(&mut slices);
        match stream.try_write_vectored(&slices[..n]) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(written) => buf.advance(written),
            Err(err) if err.kind() == io::ErrorKind::WouldBlock => {
                match tokio::time::timeout(stall, stream.writable()).await {
                    Ok(ready) => ready?,
                    Err(_) => {
                        debug!(?stall, "the client read nothing of its answer; cut off");
                        return Err(io::ErrorKind::TimedOut.into());
                    }
                }
            }
            Err(err) => return Err(err),
        }
    }
    Ok(())
}

fn header_line(out: &mut BytesMut, name: &[u8], value: &[u8]) {
    out.extend_from_slice(name);
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

fn chunk_size_line(out: &mut BytesMut, size: usize) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut digits = [0u8; 16];
    let mut at = digits.len();
    let mut n = size;
    loop {
        at -= 1;
        digits[at] = HEX[n & 0xf];
        n >>= 4;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[at..]);
    out.extend_from_slice(b"\r\n");
}

thread_local! {
    /// The `date` value, made once a second per worker.
    static DATE: std::cell::RefCell<(u64, [u8; 29])> = const { std::cell::RefCell::new((u64::MAX, [0; 29])) };
}

fn http_date(out: &mut BytesMut) {
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

/// One of the proxy's short error answers, as its head and its body.
fn own_answer(status: StatusCode, why: &str) -> (http::response::Parts, Bytes) {
    let (parts, body) = crate::proxy::error(status, why).into_parts();
    let message = match body {
        ProxyBody::Full(Some(message)) => message,
        _ => Bytes::new(),
    };
    (parts, message)
}

/// Answers with an error of the server's own and closes the connection.
async fn refuse(stream: TcpStream, out: &mut BytesMut, Refusal(status, why): Refusal) {
    debug!(%status, why, "request refused");
    let (parts, message) = own_answer(status, why);
    let framing = Framing::Length(message.len() as u64);
    // The client has this long to take the answer, as it has to linger.
    let sink = Sink {
        stream: &stream,
        stall: LINGER,
    };
    if write_head(&sink, out, &parts, framing, false, false, Some(message)).await {
        linger(stream).await;
    }
}

/// Closes the connection after the answer has been written, reading and
/// throwing away what the client still sends for a while (see [`LINGER`]).
async fn linger(mut stream: TcpStream) {
    if stream.shutdown().await.is_err() {
        return;
    }
    let mut sink = [0u8; 4096];
    let mut thrown = 0;
    let _ = tokio::time::timeout(LINGER, async {
        while thrown < LINGER_BYTES {
            match stream.read(&mut sink).await {
                Ok(0) | Err(_) => break,
                Ok(n) => thrown += n,
            }
        }
    })
    .await;
}

/// An HTTP/2 connection, served by hyper.
async fn serve_http2(
    stream: TcpStream,
    prefix: Bytes,
    client: SocketAddr,
    shared: Shared,
    cancelled: Pin<&mut tokio_util::sync::WaitForCancellationFutureOwned>,
) {
    let Shared {
        proxy,
        upstream,
        http2,
    } = shared;
    let service = service_fn(move |request: Request<Incoming>| {
        let (proxy, upstream) = (proxy.clone(), upstream.clone());
        async move { Ok::<_, Infallible>(proxy.handle(&upstream, request, client).await) }
    });
    let connection = http2.serve_connection(TokioIo::new(Rewound { prefix, stream }), service);
    tokio::pin!(connection);
    let result = tokio::select! {
        result = connection.as_mut() => result,
        () = cancelled => {
            connection.as_mut().graceful_shutdown();
            connection.await
        }
    };
    if let Err(err) = result {
        debug!(%err, %client, "HTTP/2 connection ended with an error");
    }
}

/// A connection with what was read of it to tell its protocol put back in
/// front.
struct Rewound {
    prefix: Bytes,
    stream: TcpStream,
}

impl AsyncRead for Rewound {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.prefix.is_empty() {
            return Pin::new(&mut this.stream).poll_read(cx, buf);
        }
        let n = this.prefix.len().min(buf.remaining());
        buf.put_slice(&this.prefix[..n]);
        this.prefix.advance(n);
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for Rewound {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(text: &[u8]) -> Result<Option<Head>, Refusal> {
        let mut buf = BytesMut::from(text);
        parse_head(&mut buf)
    }

    fn accepted(text: &[u8]) -> Head {
        match head(text) {
            Ok(Some(parsed)) => parsed,
            Ok(None) => panic!("incomplete {:?}", String::from_utf8_lossy(text)),
            Err(Refusal(status, why)) => panic!("refused with {status}: {why}"),
        }
    }

    fn refused(text: &[u8]) -> StatusCode {
        match head(text) {
            Err(Refusal(status, _)) => status,
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
        let parsed = parse_head(&mut buf).ok().flatten().expect("a head");
        assert_eq!(parsed.request.method(), Method::POST);
        assert_eq!(
            parsed.request.uri().path_and_query().map(|p| p.as_str()),
            Some("/a?b=1")
        );
        assert_eq!(parsed.request.headers()["host"], "x");
        assert_eq!(parsed.body, BodyState::Length(5));
        assert!(parsed.keep_alive);
        assert_eq!(&buf[..], b"helloGET", "the body and what follows stay");

        let parsed = accepted(b"GET / HTTP/1.0\r\n\r\n");
        assert!(!parsed.keep_alive, "HTTP/1.0 closes unless asked");
        assert_eq!(parsed.body, BodyState::Done);
        let parsed = accepted(b"GET / HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n");
        assert!(parsed.keep_alive);
        let parsed = accepted(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: upgrade, close\r\n\r\n");
        assert!(!parsed.keep_alive);

        let parsed =
            accepted(b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip, chunked\r\n\r\n");
        assert_eq!(parsed.body, BodyState::Chunked(Chunked::Size));
        assert!(parsed.keep_alive);
        // Both framings: the coding wins and the connection closes after.
        let parsed =
            accepted(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n");
        assert_eq!(parsed.body, BodyState::Chunked(Chunked::Size));
        assert!(!parsed.keep_alive);
        let parsed = accepted(
            b"PUT / HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 3\r\n\r\n",
        );
        assert!(parsed.expects_continue);
    }

    #[test]
    fn a_head_that_could_be_read_two_ways_is_refused() {
        let bad = StatusCode::BAD_REQUEST;
        assert_eq!(refused(b"\x16\x03\x01\x02\x00garbage\r\n\r\n"), bad);
        assert_eq!(
            refused(b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked, gzip\r\n\r\n"),
            bad
        );
        assert_eq!(
            refused(b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: identity\r\n\r\n"),
            bad
        );
        assert_eq!(
            refused(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: +5\r\n\r\n"),
            bad
        );
        assert_eq!(
            refused(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5, 6\r\n\r\n"),
            bad
        );
        assert_eq!(
            refused(
                b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n"
            ),
            bad
        );
        assert_eq!(
            refused(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n"),
            bad
        );
        assert_eq!(
            refused(b"GET / HTTP/1.1\r\nHost: x\r\nBad Name: x\r\n\r\n"),
            bad
        );
        assert_eq!(
            refused(b"GET / HTTP/1.1\r\nHost: x\r\n Folded: x\r\n\r\n"),
            bad
        );
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
        // Repeats that agree are one length.
        let parsed = accepted(
            b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nContent-Length: 2\r\n\r\n",
        );
        assert_eq!(parsed.body, BodyState::Length(2));
    }

    #[test]
    fn http2_is_told_by_its_preface() {
        assert_eq!(sniff(b"PRI * HTTP/2.0\r\n"), None);
        assert_eq!(sniff(H2_PREFACE), Some(true));
        assert_eq!(sniff(b"GET / HTTP/1.1\r\nHost: x\r\n"), Some(false));
        assert_eq!(sniff(b"P"), None);
        assert_eq!(sniff(b"POST"), Some(false));
    }

    #[test]
    fn chunk_sizes_are_hex() {
        for n in [0usize, 1, 15, 16, 255, 4096, 1 << 20, usize::MAX] {
            let mut out = BytesMut::new();
            chunk_size_line(&mut out, n);
            assert_eq!(&out[..], format!("{n:x}\r\n").as_bytes());
        }
    }

    #[test]
    fn the_date_is_an_imf_fixdate() {
        let mut out = BytesMut::new();
        http_date(&mut out);
        http_date(&mut out);
        let text = std::str::from_utf8(&out).expect("text");
        assert_eq!(text.len(), 58);
        assert!(httpdate::parse_http_date(&text[..29]).is_ok(), "{text}");
        assert_eq!(&text[..29], &text[29..]);
    }
}
