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
//! What the bytes mean (heads, framing, chunks) is [`crate::http1`]'s;
//! this module drives the connection.

use std::convert::Infallible;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use http::{Method, Request, Response, StatusCode, Version};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::server::conn::http2;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::debug;

use crate::http1::chunked::{self, LAST_CHUNK};
use crate::http1::write::{self, AnswerHead};
use crate::http1::{
    parse, Answering, BodyDecoder, Framing, Lines, Malformed, Refusal, RequestHead, Step,
};
use crate::proxy::{Proxy, ProxyBody, Tunnel};
use crate::upstream::{Upstream, UpstreamError};

/// What an HTTP/2 connection opens with (RFC 9113 §3.4).
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
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
        let reading = Reading {
            stream: &mut stream,
            buf: &mut buf,
            sniffing: &mut sniffing,
            max_head,
        };
        let head = match reading.head(timer.as_mut(), cancelled.as_mut()).await {
            Read::Head(head) => head,
            Read::Http2 => {
                let prefix = buf.split().freeze();
                return serve_http2(stream, prefix, client, shared, cancelled).await;
            }
            Read::Refused(refusal) => return refuse(stream, &mut out, refusal).await,
            Read::Gone => return,
        };
        let RequestHead {
            request,
            body,
            mut keep_alive,
            expects_continue,
        } = head;
        if request.method() == Method::CONNECT {
            let refusal = Refusal::new(StatusCode::METHOD_NOT_ALLOWED, "CONNECT is not supported");
            return refuse(stream, &mut out, refusal).await;
        }
        let answering = Answering {
            http10: request.version() == Version::HTTP_10,
            head_request: request.method() == Method::HEAD,
        };
        let decoder = BodyDecoder::new(body);
        if let Err(malformed) = decoder.check_ahead(&buf) {
            let refusal = Refusal::new(StatusCode::BAD_REQUEST, malformed.0);
            return refuse(stream, &mut out, refusal).await;
        }
        let mut body = BodyState::Reading(decoder);
        if expects_continue && !body.is_done() {
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
            let timer = Some(timer.as_mut());
            shared
                .proxy
                .handle(&shared.upstream, request, client, timer)
                .await
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
            let head = AnswerHead {
                framing: Framing::Tunnel,
                http10: false,
                keep_alive: true,
            };
            if write_head(&sink, &mut out, Answer::own(&parts), head, None).await {
                let counters = &shared.proxy.counters;
                counters.tunnels.fetch_add(1, Ordering::Relaxed);
                counters.tunnels_open.fetch_add(1, Ordering::Relaxed);
                join(stream, buf, tunnel, cancelled).await;
                counters.tunnels_open.fetch_sub(1, Ordering::Relaxed);
            }
            return;
        }
        // A body not read to its end leaves the connection out of step.
        keep_alive &= body.is_done() && !shutdown.is_cancelled();
        match write_response(&sink, &mut out, response, answering, keep_alive).await {
            Some(true) => {}
            Some(false) if body.is_done() => {
                let _ = stream.shutdown().await;
                return;
            }
            // The client may still be sending the body.
            Some(false) => return linger(stream).await,
            None => return,
        }
    }
}

/// What reading a request head came to.
// Matched as soon as it is returned, once per request: boxing the head
// would be an allocation per request for nothing.
#[allow(clippy::large_enum_variant)]
enum Read {
    Head(RequestHead),
    /// The connection opened with the HTTP/2 preface.
    Http2,
    Refused(Refusal),
    /// The client closed, idled past the header timeout between requests,
    /// or the server is shutting down between requests.
    Gone,
}

/// A connection between requests, reading the next head.
struct Reading<'a> {
    stream: &'a mut TcpStream,
    buf: &'a mut BytesMut,
    /// Still telling whether the connection is HTTP/2.
    sniffing: &'a mut bool,
    max_head: usize,
}

impl Reading<'_> {
    /// Reads until a whole request head is in.
    async fn head(
        self,
        mut timer: Pin<&mut tokio::time::Sleep>,
        mut cancelled: Pin<&mut tokio_util::sync::WaitForCancellationFutureOwned>,
    ) -> Read {
        loop {
            if !self.buf.is_empty() {
                if *self.sniffing {
                    match sniff(self.buf) {
                        Some(true) => return Read::Http2,
                        Some(false) => *self.sniffing = false,
                        None => {}
                    }
                }
                if !*self.sniffing {
                    match parse::request(self.buf) {
                        Ok(Some(head)) => return Read::Head(head),
                        Ok(None) => {}
                        Err(refusal) => return Read::Refused(refusal),
                    }
                }
                if self.buf.len() >= self.max_head {
                    return Read::Refused(Refusal::new(
                        StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                        "request head too large",
                    ));
                }
            }
            self.buf.reserve(READ_CHUNK);
            let idle = self.buf.is_empty();
            tokio::select! {
                biased;
                read = self.stream.read_buf(self.buf) => match read {
                    Ok(0) | Err(_) => return Read::Gone,
                    Ok(_) => {}
                },
                () = &mut timer => {
                    if idle {
                        return Read::Gone;
                    }
                    return Read::Refused(Refusal::new(
                        StatusCode::REQUEST_TIMEOUT,
                        "request head not received in time",
                    ));
                }
                () = &mut cancelled, if idle => return Read::Gone,
            }
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

/// How much of a request body is still to come.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BodyState {
    Reading(BodyDecoder),
    /// It broke off or was malformed: the connection is out of step.
    Failed,
}

impl BodyState {
    /// Read to its end (or there was none): the connection is in step.
    fn is_done(&self) -> bool {
        matches!(self, Self::Reading(decoder) if decoder.is_done())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ClientBodyError {
    #[error("reading the request body: {0}")]
    Io(#[from] io::Error),
    #[error("the client closed the connection before its request body was complete")]
    Closed,
    #[error("malformed chunked request body: {0}")]
    Chunked(#[source] Malformed),
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
            let BodyState::Reading(decoder) = this.state else {
                return Poll::Ready(None);
            };
            match decoder.decode(this.buf) {
                Ok(Step::Data(data)) => return Poll::Ready(Some(Ok(Frame::data(data)))),
                Ok(Step::Done) => return Poll::Ready(None),
                Ok(Step::NeedMore) => {}
                Err(err) => {
                    *this.state = BodyState::Failed;
                    return Poll::Ready(Some(Err(ClientBodyError::Chunked(err))));
                }
            }
            this.buf.reserve(READ_CHUNK);
            let read = std::task::ready!(tokio_util::io::poll_read_buf(
                Pin::new(&mut *this.stream),
                cx,
                this.buf
            ));
            let failed = match read {
                Ok(0) if decoder.at_close() => return Poll::Ready(None),
                Ok(0) => ClientBodyError::Closed,
                Ok(_) => continue,
                Err(err) => err.into(),
            };
            *this.state = BodyState::Failed;
            return Poll::Ready(Some(Err(failed)));
        }
    }

    fn is_end_stream(&self) -> bool {
        !matches!(*self.state, BodyState::Reading(d) if !d.is_done())
    }

    fn size_hint(&self) -> SizeHint {
        match *self.state {
            BodyState::Reading(decoder) => match decoder.exact() {
                Some(n) => SizeHint::with_exact(n),
                None => SizeHint::default(),
            },
            BodyState::Failed => SizeHint::with_exact(0),
        }
    }
}

/// Writes the answer: whether the connection stays open for another
/// request, or `None` when it cannot carry anything more (the client is
/// gone, or the member's body broke off midway).
async fn write_response(
    sink: &Sink<'_>,
    out: &mut BytesMut,
    response: Response<ProxyBody>,
    answering: Answering,
    keep_alive: bool,
) -> Option<bool> {
    let (parts, mut body) = response.into_parts();
    let lines = body.take_lines();
    let answer = Answer {
        parts: &parts,
        lines: lines.as_ref(),
    };
    let framing = Framing::of_answer(parts.status, answering, body.size_hint().exact());
    let head = AnswerHead {
        framing,
        http10: answering.http10,
        keep_alive: keep_alive && framing != Framing::UntilClose,
    };
    // Most bodies arrive with their head: looked at without waiting, so
    // head and body can go in one write. Whatever is not there yet is
    // waited for below (this poll's waker is replaced by that one).
    let first = if framing == Framing::Empty {
        drop(body);
        let written = write_head(sink, out, answer, head, None).await;
        return written.then_some(head.keep_alive);
    } else {
        match poll_now(&mut body) {
            Poll::Ready(Some(Ok(frame))) => frame.into_data().ok(),
            Poll::Ready(Some(Err(err))) => {
                // Nothing has been sent: the client gets a clear error.
                debug!(%err, "the member's answer broke off before its body");
                let (parts, message) =
                    own_answer(StatusCode::BAD_GATEWAY, "the member's answer broke off");
                let head = AnswerHead {
                    framing: Framing::Length(message.len() as u64),
                    keep_alive: false,
                    ..head
                };
                write_head(sink, out, Answer::own(&parts), head, Some(message)).await;
                return None;
            }
            Poll::Ready(None) | Poll::Pending => None,
        }
    };
    let mut sent = first.as_ref().map_or(0, |b| b.len() as u64);
    let ended = body.is_end_stream();
    if !write_head(sink, out, answer, head, first).await {
        return None;
    }
    if !ended {
        sent += write_body(sink, out, &mut body, framing).await?;
    }
    let complete = match framing {
        Framing::Chunked => send(sink, LAST_CHUNK).await.is_ok(),
        Framing::Length(n) => sent == n,
        Framing::Empty | Framing::UntilClose | Framing::Tunnel => true,
    };
    complete.then_some(head.keep_alive)
}

/// Writes the rest of the body as it comes, chunk-framed if need be:
/// how many bytes, or `None` when the client or the member failed.
async fn write_body(
    sink: &Sink<'_>,
    out: &mut BytesMut,
    body: &mut ProxyBody,
    framing: Framing,
) -> Option<u64> {
    let mut sent = 0;
    while let Some(frame) = std::future::poll_fn(|cx| Pin::new(&mut *body).poll_frame(cx)).await {
        let data = match frame {
            Ok(frame) => match frame.into_data() {
                Ok(data) if !data.is_empty() => data,
                _ => continue,
            },
            Err(err) => {
                debug!(%err, "the member's answer broke off midway");
                return None;
            }
        };
        sent += data.len() as u64;
        let written = if framing == Framing::Chunked {
            out.clear();
            chunked::size_line(out, data.len());
            let chunk = Buf::chain(&out[..], data).chain(&b"\r\n"[..]);
            send(sink, chunk).await
        } else {
            send(sink, data).await
        };
        written.ok()?;
    }
    Some(sent)
}

/// The body's next frame if it is there already.
fn poll_now(body: &mut ProxyBody) -> Poll<Option<Result<Frame<Bytes>, UpstreamError>>> {
    let mut cx = Context::from_waker(std::task::Waker::noop());
    Pin::new(body).poll_frame(&mut cx)
}

/// An answer's status and headers: a member's header lines as it sent
/// them, or the header map.
#[derive(Clone, Copy)]
struct Answer<'a> {
    parts: &'a http::response::Parts,
    lines: Option<&'a Lines>,
}

impl<'a> Answer<'a> {
    /// One whose headers are all in the map.
    fn own(parts: &'a http::response::Parts) -> Self {
        Self { parts, lines: None }
    }
}

/// Writes the answer's head with the first body data (chunk-framed if
/// need be) in the same write.
async fn write_head(
    sink: &Sink<'_>,
    out: &mut BytesMut,
    answer: Answer<'_>,
    head: AnswerHead,
    first: Option<Bytes>,
) -> bool {
    out.clear();
    write::answer_head(out, answer.parts, answer.lines, head);
    let written = match first {
        Some(data) if !data.is_empty() => {
            let in_chunks = head.framing == Framing::Chunked;
            if in_chunks {
                chunked::size_line(out, data.len());
            }
            if data.len() <= COPY_BEHIND_HEAD {
                out.extend_from_slice(&data);
                if in_chunks {
                    out.extend_from_slice(b"\r\n");
                }
                send(sink, &out[..]).await
            } else {
                let tail: &[u8] = if in_chunks { b"\r\n" } else { b"" };
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
        _open,
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
async fn refuse(stream: TcpStream, out: &mut BytesMut, Refusal { status, why }: Refusal) {
    debug!(%status, why, "request refused");
    let (parts, message) = own_answer(status, why);
    let head = AnswerHead {
        framing: Framing::Length(message.len() as u64),
        http10: false,
        keep_alive: false,
    };
    // The client has this long to take the answer, as it has to linger.
    let sink = Sink {
        stream: &stream,
        stall: LINGER,
    };
    if write_head(&sink, out, Answer::own(&parts), head, Some(message)).await {
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
        async move { Ok::<_, Infallible>(proxy.handle(&upstream, request, client, None).await) }
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

    #[test]
    fn http2_is_told_by_its_preface() {
        assert_eq!(sniff(b"PRI * HTTP/2.0\r\n"), None);
        assert_eq!(sniff(H2_PREFACE), Some(true));
        assert_eq!(sniff(b"GET / HTTP/1.1\r\nHost: x\r\n"), Some(false));
        assert_eq!(sniff(b"P"), None);
        assert_eq!(sniff(b"POST"), Some(false));
    }
}
