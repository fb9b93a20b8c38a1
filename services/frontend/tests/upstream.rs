//! The front-end's client to members against scripted members on real
//! sockets: keep-alive, every body framing, request bodies, and members
//! that close connections under it.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use headroom_frontend::http1::Asked;
use headroom_frontend::upstream::{RequestBody, Sending, Upstream, UpstreamError};

/// A GET: sent again on a new connection if a kept-alive one was closed.
const REPLAYABLE: Sending = Sending {
    asked: Asked {
        head_request: false,
        upgrade: false,
        pass_through: false,
    },
    replayable: true,
};
use http::StatusCode;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::Frame;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

// Not every helper is used here.
#[allow(dead_code)]
mod common;
use common::read_request;

/// What a scripted member does with one request.
enum Reply {
    Send(&'static [u8]),
    /// Sends, then closes the connection.
    SendAndClose(&'static [u8]),
    /// Closes the connection without a word.
    Close,
    /// Sends and keeps the connection open without finishing the body.
    SendAndStall(&'static [u8]),
}

/// A member on a real socket answering by script: `script(connection,
/// request on it, request bytes)`.
struct Member {
    addr: SocketAddr,
    connections: Arc<AtomicUsize>,
    requests: Arc<Mutex<Vec<Vec<u8>>>>,
}

impl Member {
    async fn start(script: fn(usize, usize, &[u8]) -> Reply) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let connections = Arc::new(AtomicUsize::new(0));
        let requests = Arc::new(Mutex::new(Vec::new()));
        let (counted, recorded) = (connections.clone(), requests.clone());
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                let connection = counted.fetch_add(1, Ordering::SeqCst);
                let recorded = recorded.clone();
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    for n in 0.. {
                        let Some(request) = read_request(&mut stream, &mut buf).await else {
                            return;
                        };
                        recorded.lock().expect("lock").push(request.clone());
                        match script(connection, n, &request) {
                            Reply::Send(bytes) => {
                                if stream.write_all(bytes).await.is_err() {
                                    return;
                                }
                            }
                            Reply::SendAndClose(bytes) => {
                                let _ = stream.write_all(bytes).await;
                                return;
                            }
                            Reply::Close => return,
                            Reply::SendAndStall(bytes) => {
                                let _ = stream.write_all(bytes).await;
                                tokio::time::sleep(Duration::from_secs(30)).await;
                                return;
                            }
                        }
                    }
                });
            }
        });
        Self {
            addr,
            connections,
            requests,
        }
    }

    fn authority(&self) -> String {
        self.addr.to_string()
    }

    fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }

    fn last_request(&self) -> String {
        let requests = self.requests.lock().expect("lock");
        String::from_utf8_lossy(requests.last().map_or(&[][..], Vec::as_slice)).into_owned()
    }
}

fn head(method: &str, path: &str) -> Vec<u8> {
    format!("{method} {path} HTTP/1.1\r\nhost: member\r\n\r\n").into_bytes()
}

fn pool() -> Upstream {
    Upstream::new(
        Duration::from_secs(1),
        Duration::from_secs(5),
        Duration::from_secs(20),
    )
}

const NO_BODY: RequestBody<Full<Bytes>> = RequestBody::None;

async fn get(
    upstream: &Upstream,
    member: &Member,
    method: &str,
    path: &str,
) -> Result<(StatusCode, Bytes), UpstreamError> {
    let response = upstream
        .send(
            &member.authority(),
            &head(method, path),
            NO_BODY,
            Sending {
                asked: Asked {
                    head_request: method == "HEAD",
                    upgrade: false,
                    pass_through: false,
                },
                replayable: true,
            },
        )
        .await?;
    let status = response.status();
    let body = response.into_body().collect().await?.to_bytes();
    Ok((status, body))
}

#[tokio::test]
async fn one_kept_alive_connection_carries_every_body_framing() {
    let member = Member::start(|_, _, request| {
        let request = String::from_utf8_lossy(request);
        let path = request.split(' ').nth(1).unwrap_or("");
        Reply::Send(match path {
            "/length" => b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhello",
            "/chunked" => b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\nconnection: keep-alive\r\n\r\n5\r\nhello\r\n6;x=y\r\n world\r\n0\r\ntrailer: t\r\n\r\n",
            "/head" => b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\n",
            "/empty" => b"HTTP/1.1 204 No Content\r\n\r\n",
            "/continue" => b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 201 Created\r\ncontent-length: 2\r\n\r\nok",
            _ => b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n",
        })
    })
    .await;
    let upstream = pool();
    let answers = [
        ("GET", "/length", StatusCode::OK, &b"hello"[..]),
        ("GET", "/chunked", StatusCode::OK, b"hello world"),
        ("HEAD", "/head", StatusCode::OK, b""),
        ("GET", "/empty", StatusCode::NO_CONTENT, b""),
        ("GET", "/continue", StatusCode::CREATED, b"ok"),
        ("GET", "/length", StatusCode::OK, b"hello"),
    ];
    for (method, path, status, body) in answers {
        let answer = get(&upstream, &member, method, path).await;
        assert_eq!(
            answer.ok(),
            Some((status, Bytes::from_static(body))),
            "{method} {path}"
        );
    }
    assert_eq!(member.connections(), 1, "every request on one connection");
    assert_eq!(upstream.idle(), 1);
}

#[tokio::test]
async fn hop_by_hop_headers_of_the_answer_are_not_passed_on() {
    let member = Member::start(|_, _, _| {
        Reply::Send(b"HTTP/1.1 200 OK\r\nconnection: x-private\r\nx-private: 1\r\nkeep-alive: timeout=5\r\nx-kept: yes\r\ncontent-length: 0\r\n\r\n")
    })
    .await;
    let response = pool()
        .send(&member.authority(), &head("GET", "/"), NO_BODY, REPLAYABLE)
        .await
        .expect("answer");
    let headers = response.headers();
    assert_eq!(
        headers.get("x-kept").map(|v| v.as_bytes()),
        Some(&b"yes"[..])
    );
    for gone in ["connection", "x-private", "keep-alive"] {
        assert!(headers.get(gone).is_none(), "{gone} passed on");
    }
}

#[tokio::test]
async fn a_body_to_the_close_ends_with_the_connection() {
    let member =
        Member::start(|_, _, _| Reply::SendAndClose(b"HTTP/1.0 200 OK\r\n\r\nall of it")).await;
    let upstream = pool();
    for _ in 0..2 {
        let answer = get(&upstream, &member, "GET", "/").await;
        assert_eq!(
            answer.ok(),
            Some((StatusCode::OK, Bytes::from_static(b"all of it")))
        );
    }
    assert_eq!(
        member.connections(),
        2,
        "a close-delimited connection is not reused"
    );
    assert_eq!(upstream.idle(), 0);
}

#[tokio::test]
async fn a_kept_alive_connection_closed_under_a_request_is_replaced_when_that_is_safe() {
    // The first connection answers once, then closes on the next request
    // without answering: the race of a member timing out an idle
    // connection just as it is reused.
    let member = Member::start(|connection, n, _| match (connection, n) {
        (0, 0) => Reply::Send(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"),
        (0, _) => Reply::Close,
        _ => Reply::Send(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"),
    })
    .await;
    let upstream = pool();
    let ok = Some((StatusCode::OK, Bytes::from_static(b"ok")));
    assert_eq!(get(&upstream, &member, "GET", "/").await.ok(), ok);
    // Idempotent and without a body: sent again on a new connection.
    assert_eq!(get(&upstream, &member, "GET", "/").await.ok(), ok);
    assert_eq!(member.connections(), 2);

    // Same race for a request that cannot be sent twice: an error, for the
    // proxy to answer 502 rather than risk doing it twice.
    let member = Member::start(|connection, n, _| match (connection, n) {
        (0, 0) => Reply::Send(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"),
        _ => Reply::Close,
    })
    .await;
    let upstream = pool();
    assert_eq!(get(&upstream, &member, "GET", "/").await.ok(), ok);
    let post = upstream
        .send(
            &member.authority(),
            b"POST / HTTP/1.1\r\nhost: member\r\ncontent-length: 3\r\n\r\n",
            RequestBody::Length(3, Full::new(Bytes::from_static(b"abc"))),
            Sending::default(),
        )
        .await;
    match post {
        Err(err) => assert!(!err.is_connect(), "{err}"),
        Ok(_) => panic!("a POST on a closed connection succeeded"),
    }
    assert_eq!(member.connections(), 1, "not sent again");
}

#[tokio::test]
async fn request_bodies_reach_the_member_framed() {
    let member =
        Member::start(|_, _, _| Reply::Send(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")).await;
    let upstream = pool();
    let sized = upstream
        .send(
            &member.authority(),
            b"PUT /a HTTP/1.1\r\nhost: member\r\ncontent-length: 11\r\n\r\n",
            RequestBody::Length(11, Full::new(Bytes::from_static(b"hello world"))),
            Sending::default(),
        )
        .await;
    assert_eq!(sized.map(|r| r.status()).ok(), Some(StatusCode::OK));
    assert!(member.last_request().ends_with("\r\n\r\nhello world"));

    let frames = [&b"hello"[..], b"", b" world"]
        .map(|d| Ok::<_, Infallible>(Frame::data(Bytes::from_static(d))));
    let streamed = StreamBody::new(futures::stream::iter(frames));
    let chunked = upstream
        .send(
            &member.authority(),
            b"PUT /b HTTP/1.1\r\nhost: member\r\ntransfer-encoding: chunked\r\n\r\n",
            RequestBody::Chunked(streamed),
            Sending::default(),
        )
        .await;
    assert_eq!(chunked.map(|r| r.status()).ok(), Some(StatusCode::OK));
    assert!(
        member
            .last_request()
            .ends_with("\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"),
        "{:?}",
        member.last_request()
    );

    // A body shorter than it said is an error, and its connection is not
    // used again.
    let short = upstream
        .send(
            &member.authority(),
            b"PUT /c HTTP/1.1\r\nhost: member\r\ncontent-length: 20\r\n\r\n",
            RequestBody::Length(20, Full::new(Bytes::from_static(b"too short"))),
            Sending::default(),
        )
        .await;
    assert!(matches!(short, Err(UpstreamError::RequestBody(_))));
    assert_eq!(upstream.idle(), 0);
}

#[tokio::test]
async fn a_body_left_unread_closes_its_connection() {
    let member = Member::start(|connection, _, _| match connection {
        0 => Reply::SendAndStall(b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nhalf!"),
        _ => Reply::Send(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"),
    })
    .await;
    let upstream = pool();
    let response = upstream
        .send(&member.authority(), &head("GET", "/"), NO_BODY, REPLAYABLE)
        .await
        .expect("head");
    drop(response);
    assert_eq!(upstream.idle(), 0);
    let again = get(&upstream, &member, "GET", "/").await;
    assert_eq!(
        again.ok(),
        Some((StatusCode::OK, Bytes::from_static(b"ok")))
    );
    assert_eq!(member.connections(), 2);
}

#[tokio::test]
async fn a_member_that_goes_quiet_in_the_middle_of_a_body_is_cut_off() {
    let member = Member::start(|_, _, _| {
        Reply::SendAndStall(b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nhalf!")
    })
    .await;
    let upstream = Upstream::new(
        Duration::from_secs(1),
        Duration::from_millis(200),
        Duration::from_secs(20),
    );
    let response = upstream
        .send(&member.authority(), &head("GET", "/"), NO_BODY, REPLAYABLE)
        .await
        .expect("head");
    let started = std::time::Instant::now();
    let body = response.into_body().collect().await;
    assert!(matches!(body, Err(UpstreamError::Stalled(_))));
    assert!(started.elapsed() < Duration::from_secs(5));
    assert_eq!(upstream.idle(), 0);
}

#[tokio::test]
async fn a_member_that_is_not_listening_is_a_connect_error() {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    drop(listener);
    let answer = pool()
        .send(&addr.to_string(), &head("GET", "/"), NO_BODY, REPLAYABLE)
        .await;
    assert!(answer.is_err_and(|e| e.is_connect()));
}

#[tokio::test]
async fn garbage_from_a_member_is_a_clear_error() {
    let member = Member::start(|_, _, _| Reply::SendAndClose(b"SSH-2.0-OpenSSH_9.2\r\n\r\n")).await;
    let answer = get(&pool(), &member, "GET", "/").await;
    assert!(
        matches!(answer, Err(UpstreamError::Protocol(_))),
        "{answer:?}"
    );
}

/// What a member that answers after the request head, before the body,
/// does next.
#[derive(Clone, Copy)]
enum AfterAnswer {
    /// Closes at once, on a body it has not read (the client sees a reset).
    Close,
    /// Keeps the connection but reads nothing more.
    StopReading,
    /// Reads the whole body, then reports how much it got.
    ReadBody,
}

/// A member that answers `answer` as soon as it has a request head; the
/// body bytes it read come back on the returned channel (for `ReadBody`).
async fn early_member(
    answer: &'static [u8],
    after: AfterAnswer,
) -> (String, tokio::sync::oneshot::Receiver<usize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let authority = listener.local_addr().expect("addr").to_string();
    let (got, read) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        let Ok((mut stream, _)) = listener.accept().await else {
            return;
        };
        let mut buf = Vec::new();
        let mut chunk = vec![0u8; 64 << 10];
        let at = loop {
            if let Some(end) = common::find(&buf, b"\r\n\r\n") {
                break end + 4;
            }
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        };
        if stream.write_all(answer).await.is_err() {
            return;
        }
        match after {
            AfterAnswer::Close => {}
            AfterAnswer::StopReading => tokio::time::sleep(Duration::from_secs(30)).await,
            AfterAnswer::ReadBody => {
                let mut body = buf.len() - at;
                while let Ok(n) = stream.read(&mut chunk).await {
                    if n == 0 {
                        break;
                    }
                    body += n;
                }
                let _ = got.send(body);
            }
        }
    });
    (authority, read)
}

const UPLOAD: usize = 8 << 20;

fn upload_head() -> Vec<u8> {
    format!("PUT /upload HTTP/1.1\r\nhost: member\r\ncontent-length: {UPLOAD}\r\n\r\n").into_bytes()
}

#[tokio::test]
async fn a_member_that_refuses_an_upload_early_has_its_answer_passed_on() {
    const REFUSAL: &[u8] = b"HTTP/1.1 413 Content Too Large\r\ncontent-length: 9\r\n\r\ntoo large";
    for after in [AfterAnswer::Close, AfterAnswer::StopReading] {
        let (authority, _) = early_member(REFUSAL, after).await;
        let upstream = pool();
        // Far more than the sockets' buffers hold: without reading the
        // member's answer meanwhile, the write would wait for a member
        // that no longer reads.
        let body = Full::new(Bytes::from(vec![b'x'; UPLOAD]));
        let head = upload_head();
        let sending = upstream.send(
            &authority,
            &head,
            RequestBody::Length(UPLOAD as u64, body),
            Sending::default(),
        );
        let answer = tokio::time::timeout(Duration::from_secs(4), sending)
            .await
            .expect("the answer came before the body was sent")
            .expect("the member's own answer");
        assert_eq!(answer.status(), StatusCode::PAYLOAD_TOO_LARGE);
        let text = answer.into_body().collect().await.expect("body").to_bytes();
        assert_eq!(&text[..], b"too large");
        // The member did not read the request: its connection is not
        // used again.
        assert_eq!(upstream.idle(), 0);
    }
}

#[tokio::test]
async fn a_body_still_streaming_when_the_member_refuses_is_not_waited_for() {
    let (authority, _) = early_member(
        b"HTTP/1.1 401 Unauthorized\r\ncontent-length: 0\r\n\r\n",
        AfterAnswer::StopReading,
    )
    .await;
    // The client sends a little, then nothing: the refusal must not wait
    // for the rest.
    let first = Ok::<_, Infallible>(Frame::data(Bytes::from_static(b"a little")));
    let body = StreamBody::new(futures::stream::iter([first]).chain(futures::stream::pending()));
    let upstream = pool();
    let sending = upstream.send(
        &authority,
        b"POST /in HTTP/1.1\r\nhost: member\r\ntransfer-encoding: chunked\r\n\r\n",
        RequestBody::Chunked(body),
        Sending::default(),
    );
    let answer = tokio::time::timeout(Duration::from_secs(4), sending)
        .await
        .expect("not waiting for the body")
        .expect("the member's own answer");
    assert_eq!(answer.status(), StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn an_early_success_still_gets_the_whole_body() {
    let (authority, read) = early_member(
        b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok",
        AfterAnswer::ReadBody,
    )
    .await;
    let upstream = pool();
    let body = Full::new(Bytes::from(vec![b'x'; UPLOAD]));
    let answer = upstream
        .send(
            &authority,
            &upload_head(),
            RequestBody::Length(UPLOAD as u64, body),
            Sending::default(),
        )
        .await
        .expect("answer");
    assert_eq!(answer.status(), StatusCode::OK);
    let text = answer.into_body().collect().await.expect("body").to_bytes();
    assert_eq!(&text[..], b"ok");
    let received = tokio::time::timeout(Duration::from_secs(4), read)
        .await
        .expect("the member read to the end")
        .expect("count");
    assert_eq!(received, UPLOAD);
}
