//! The front-end's HTTP/1 server, driven in-process over real sockets by a
//! raw client, in front of a scripted member: keep-alive and pipelining,
//! every body framing both ways, HTTP/1.0, `Expect: 100-continue`, bodies
//! left unread, ambiguous framing, protocol switches (WebSocket), and
//! shutdown.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use headroom_frontend::Frontend;
use headroom_shared::config::Config;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

mod common;
use common::{find, header, read_request};

/// The size of `/big`: more than the kernel's socket buffers on both sides
/// hold.
const BIG: usize = 32 << 20;

/// A member that answers by path, and remembers every request it read.
async fn member() -> (SocketAddr, Arc<Mutex<Vec<String>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let seen = Arc::new(Mutex::new(Vec::new()));
    let recorded = seen.clone();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let recorded = recorded.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                while let Some(request) = read_request(&mut stream, &mut buf).await {
                    let text = String::from_utf8_lossy(&request).into_owned();
                    recorded.lock().expect("lock").push(text.clone());
                    let path = text.split(' ').nth(1).unwrap_or("").to_owned();
                    let body = text.split_once("\r\n\r\n").map_or("", |(_, b)| b);
                    let switch = path == "/ws"
                        && text
                            .to_ascii_lowercase()
                            .contains("\r\nupgrade: websocket\r\n");
                    if switch {
                        // Switches, sends a greeting, then echoes in
                        // capitals (from what came behind the head) until
                        // the client is done, and closes.
                        let switched = b"HTTP/1.1 101 Switching Protocols\r\n\
                            upgrade: websocket\r\nconnection: upgrade\r\n\
                            sec-websocket-accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\nhello ";
                        if stream.write_all(switched).await.is_err() {
                            return;
                        }
                        let mut chunk = [0u8; 1024];
                        loop {
                            if !buf.is_empty() {
                                let echo = buf.to_ascii_uppercase();
                                buf.clear();
                                if stream.write_all(&echo).await.is_err() {
                                    return;
                                }
                            }
                            match stream.read(&mut chunk).await {
                                Ok(0) | Err(_) => return,
                                Ok(n) => buf.extend_from_slice(&chunk[..n]),
                            }
                        }
                    }
                    let answer = if text.starts_with("HEAD ") {
                        "HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n".to_owned()
                    } else if path == "/chunked" {
                        "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n\
                         5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"
                            .to_owned()
                    } else if path == "/big" {
                        let head = format!("HTTP/1.1 200 OK\r\ncontent-length: {BIG}\r\n\r\n");
                        let body = vec![b'x'; BIG];
                        if stream.write_all(head.as_bytes()).await.is_err()
                            || stream.write_all(&body).await.is_err()
                        {
                            return;
                        }
                        continue;
                    } else if path == "/close" {
                        let _ = stream
                            .write_all(b"HTTP/1.1 200 OK\r\n\r\nto the close")
                            .await;
                        return;
                    } else {
                        if path == "/slow" {
                            tokio::time::sleep(Duration::from_millis(400)).await;
                        }
                        let echo = format!("{path} {body}");
                        format!(
                            "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{echo}",
                            echo.len()
                        )
                    };
                    if stream.write_all(answer.as_bytes()).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    (addr, seen)
}

/// The last request the member read.
fn last_request(seen: &Mutex<Vec<String>>) -> String {
    seen.lock()
        .expect("lock")
        .last()
        .cloned()
        .unwrap_or_default()
}

/// A front-end on its own port, routing everything to `member` from a
/// last-known-good file (no NATS).
struct Proxy {
    addr: SocketAddr,
    shutdown: CancellationToken,
    dir: PathBuf,
    /// The front-end's own state, for its counters.
    inner: Arc<headroom_frontend::Proxy>,
}

impl Proxy {
    async fn start(member: SocketAddr) -> Self {
        Self::start_with(member, |_| {}).await
    }

    async fn start_with(member: SocketAddr, settings: impl FnOnce(&mut Config)) -> Self {
        let dir = std::env::temp_dir().join(format!(
            "headroom-server-test-{}-{}",
            std::process::id(),
            member.port()
        ));
        std::fs::create_dir_all(&dir).expect("dir");
        let file = dir.join("routing.json");
        let port = member.port();
        std::fs::write(
            &file,
            format!(
                r#"{{"cluster":"t","generation":1,"saved_ms":0,"servers":{{"":["{member}"]}},
 "record":{{"v":1,"id":"t","generation":1,"updated_ms":0,"recent":[],
  "policy":{{"min_size":1,"max_size":1}},
  "members":[{{"server":"m","address":"127.0.0.1","port":{port},"request_types":[],
   "state":"active","weight":1.0,"request":"r","since_ms":0}}]}}}}"#
            ),
        )
        .expect("write the routing file");
        let mut config = Config::default();
        config.nats.url = "nats://127.0.0.1:1".to_owned();
        config.frontend.cluster = "t".to_owned();
        config.frontend.listen = "127.0.0.1:0".to_owned();
        config.frontend.last_known_good = Some(file);
        config.frontend.workers = 1;
        config.frontend.pin_workers = false;
        config.frontend.slow_start = Duration::ZERO;
        config.frontend.header_timeout = Duration::from_secs(2);
        config.frontend.max_body_bytes = 1024;
        config.frontend.request_timeout = Duration::from_secs(1);
        settings(&mut config);
        let frontend = Frontend::bind(config).await.expect("bind");
        let addr = frontend.local_addr().expect("addr");
        let inner = frontend.proxy();
        let shutdown = CancellationToken::new();
        tokio::spawn(frontend.serve(shutdown.clone()));
        Self {
            addr,
            shutdown,
            dir,
            inner,
        }
    }

    async fn connect(&self) -> Client {
        Client {
            stream: TcpStream::connect(self.addr).await.expect("connect"),
            buf: Vec::new(),
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.shutdown.cancel();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

struct Client {
    stream: TcpStream,
    buf: Vec<u8>,
}

/// An answer: its head (lowercased) and its body (chunks decoded).
#[derive(Debug)]
struct Answer {
    head: String,
    body: String,
}

impl Answer {
    fn status(&self) -> u16 {
        self.head
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0)
    }

    fn header(&self, name: &str) -> Option<&str> {
        header(&self.head, name)
    }
}

impl Client {
    async fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).await.expect("send");
    }

    async fn fill(&mut self) -> bool {
        let mut chunk = [0u8; 4096];
        match tokio::time::timeout(Duration::from_secs(5), self.stream.read(&mut chunk)).await {
            Ok(Ok(0)) | Ok(Err(_)) => false,
            Ok(Ok(n)) => {
                self.buf.extend_from_slice(&chunk[..n]);
                true
            }
            Err(_) => panic!("no answer within 5 s"),
        }
    }

    /// The next answer; `head_request` when it answers a HEAD.
    async fn answer(&mut self, head_request: bool) -> Answer {
        let end = loop {
            if let Some(end) = find(&self.buf, b"\r\n\r\n") {
                break end;
            }
            assert!(self.fill().await, "closed before an answer: {:?}", self.buf);
        };
        let head = String::from_utf8_lossy(&self.buf[..end]).to_ascii_lowercase();
        self.buf.drain(..end + 4);
        let status: u16 = head
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        let mut body = Vec::new();
        if head_request || status == 100 || status == 101 || status == 204 || status == 304 {
        } else if header(&head, "transfer-encoding") == Some("chunked") {
            loop {
                let line = loop {
                    if let Some(at) = find(&self.buf, b"\r\n") {
                        break at;
                    }
                    assert!(self.fill().await, "closed inside a chunked body");
                };
                let size = usize::from_str_radix(
                    std::str::from_utf8(&self.buf[..line]).expect("size"),
                    16,
                )
                .expect("hex size");
                while self.buf.len() < line + 2 + size + 2 {
                    assert!(self.fill().await, "closed inside a chunk");
                }
                body.extend_from_slice(&self.buf[line + 2..line + 2 + size]);
                assert_eq!(&self.buf[line + 2 + size..line + 4 + size], b"\r\n");
                self.buf.drain(..line + 4 + size);
                if size == 0 {
                    break;
                }
            }
        } else if let Some(n) = header(&head, "content-length") {
            let n: usize = n.parse().expect("length");
            while self.buf.len() < n {
                assert!(self.fill().await, "closed inside a body");
            }
            body = self.buf.drain(..n).collect();
        } else {
            while self.fill().await {}
            body = std::mem::take(&mut self.buf);
        }
        Answer {
            head,
            body: String::from_utf8_lossy(&body).into_owned(),
        }
    }

    /// Whether the proxy closed the connection (nothing more comes).
    async fn closed(&mut self) -> bool {
        !self.fill().await && self.buf.is_empty()
    }
}

#[tokio::test]
async fn one_connection_carries_pipelined_requests_and_every_body_framing() {
    let (member, seen) = member().await;
    let proxy = Proxy::start(member).await;
    let mut client = proxy.connect().await;
    // Two requests in one write: answered in order.
    client
        .send(b"GET /a HTTP/1.1\r\nHost: shop\r\n\r\nGET /b HTTP/1.1\r\nHost: shop\r\n\r\n")
        .await;
    let (a, b) = (client.answer(false).await, client.answer(false).await);
    assert_eq!((a.status(), a.body.as_str()), (200, "/a "));
    assert_eq!((b.status(), b.body.as_str()), (200, "/b "));
    assert!(a.header("date").is_some(), "{a:?}");
    assert_eq!(a.header("connection"), None, "kept alive: {a:?}");
    // The member's chunked answer is passed on chunked.
    client
        .send(b"GET /chunked HTTP/1.1\r\nHost: shop\r\n\r\n")
        .await;
    let chunked = client.answer(false).await;
    assert_eq!(chunked.header("transfer-encoding"), Some("chunked"));
    assert_eq!(chunked.body, "hello world");
    // HEAD: the member's length, and no body.
    client.send(b"HEAD /h HTTP/1.1\r\nHost: shop\r\n\r\n").await;
    let head = client.answer(true).await;
    assert_eq!(
        (head.status(), head.header("content-length")),
        (200, Some("5"))
    );
    // Request bodies by length and chunked reach the member.
    client
        .send(b"POST /len HTTP/1.1\r\nHost: shop\r\nContent-Length: 5\r\n\r\nhello")
        .await;
    assert_eq!(client.answer(false).await.body, "/len hello");
    client
        .send(b"POST /te HTTP/1.1\r\nHost: shop\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n")
        .await;
    let te = client.answer(false).await;
    assert_eq!(te.status(), 200);
    let to_member = last_request(&seen);
    assert!(
        to_member.contains("transfer-encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n"),
        "{to_member:?}"
    );
    // An answer to the member's close has no length: chunked for HTTP/1.1,
    // and the client's connection lives on.
    client
        .send(b"GET /close HTTP/1.1\r\nHost: shop\r\n\r\n")
        .await;
    let close = client.answer(false).await;
    assert_eq!(close.header("transfer-encoding"), Some("chunked"));
    assert_eq!(close.body, "to the close");
    client
        .send(b"GET /after HTTP/1.1\r\nHost: shop\r\n\r\n")
        .await;
    assert_eq!(client.answer(false).await.body, "/after ");
    // Asked to close: answered, then closed.
    client
        .send(b"GET /last HTTP/1.1\r\nHost: shop\r\nConnection: close\r\n\r\n")
        .await;
    let last = client.answer(false).await;
    assert_eq!(last.header("connection"), Some("close"));
    assert!(client.closed().await);
}

#[tokio::test]
async fn a_member_slower_than_the_request_timeout_is_answered_for_and_the_connection_goes_on() {
    let (member, _) = member().await;
    // The connection's timer bounds the head, then the member's answer:
    // each request gets the request timeout, however short the header
    // timeout is.
    let patient = Proxy::start_with(member, |c| {
        c.frontend.header_timeout = Duration::from_millis(150);
        c.frontend.request_timeout = Duration::from_secs(2);
    })
    .await;
    let mut client = patient.connect().await;
    for _ in 0..2 {
        client.send(b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n").await;
        assert_eq!(client.answer(false).await.body, "/slow ");
    }
    let hasty = Proxy::start_with(member, |c| {
        c.frontend.request_timeout = Duration::from_millis(150);
    })
    .await;
    let mut client = hasty.connect().await;
    let asked = std::time::Instant::now();
    client.send(b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n").await;
    let answer = client.answer(false).await;
    assert_eq!(answer.status(), 504, "{answer:?}");
    assert!(
        asked.elapsed() < Duration::from_millis(390),
        "{:?}",
        asked.elapsed()
    );
    client.send(b"GET /after HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert_eq!(client.answer(false).await.body, "/after ");
}

#[tokio::test]
async fn http10_clients_get_what_http10_can_read() {
    let (member, _) = member().await;
    let proxy = Proxy::start(member).await;
    // Without a length: no chunked coding, the body runs to the close.
    let mut client = proxy.connect().await;
    client.send(b"GET /close HTTP/1.0\r\n\r\n").await;
    let answer = client.answer(false).await;
    assert_eq!(answer.header("transfer-encoding"), None, "{answer:?}");
    assert_eq!(answer.body, "to the close");
    // Keep-alive only when asked for.
    let mut client = proxy.connect().await;
    client
        .send(b"GET /one HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
        .await;
    let one = client.answer(false).await;
    assert_eq!(one.header("connection"), Some("keep-alive"));
    client.send(b"GET /two HTTP/1.0\r\n\r\n").await;
    let two = client.answer(false).await;
    assert_eq!(two.body, "/two ");
    assert_eq!(two.header("connection"), Some("close"));
    assert!(client.closed().await);
}

#[tokio::test]
async fn a_client_that_expects_100_continue_gets_it_before_sending_its_body() {
    let (member, _) = member().await;
    let proxy = Proxy::start(member).await;
    let mut client = proxy.connect().await;
    client
        .send(b"PUT /up HTTP/1.1\r\nHost: s\r\nExpect: 100-continue\r\nContent-Length: 4\r\n\r\n")
        .await;
    let interim = client.answer(false).await;
    assert_eq!(interim.status(), 100);
    client.send(b"data").await;
    let answer = client.answer(false).await;
    assert_eq!((answer.status(), answer.body.as_str()), (200, "/up data"));
}

#[tokio::test]
async fn requests_that_leave_the_connection_out_of_step_are_answered_and_closed() {
    let (member, seen) = member().await;
    let proxy = Proxy::start(member).await;
    // A body over the limit is not read: refused, then closed.
    let mut client = proxy.connect().await;
    client
        .send(b"POST /big HTTP/1.1\r\nHost: s\r\nContent-Length: 5000\r\n\r\n")
        .await;
    let answer = client.answer(false).await;
    assert_eq!(answer.status(), 413);
    assert_eq!(answer.header("connection"), Some("close"));
    assert!(client.closed().await);
    // Both framings: read by the coding, then closed.
    let mut client = proxy.connect().await;
    client
        .send(b"POST /both HTTP/1.1\r\nHost: s\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n")
        .await;
    let answer = client.answer(false).await;
    assert_eq!(answer.status(), 200);
    assert_eq!(answer.header("connection"), Some("close"));
    assert!(client.closed().await);
    let to_member = last_request(&seen);
    assert!(
        !to_member.to_ascii_lowercase().contains("content-length"),
        "{to_member:?}"
    );
    // Heads that cannot be read one way only: 400, nothing forwarded.
    let before = seen.lock().expect("lock").len();
    for request in [
        &b"POST /x HTTP/1.1\r\nTransfer-Encoding: identity\r\n\r\n"[..],
        b"POST /x HTTP/1.1\r\nContent-Length: +3\r\n\r\nabc",
        b"POST /x HTTP/1.1\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd",
        // Which host, for routing and the cache, and which for the member?
        b"GET /x HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
        b"GET /x HTTP/1.1\r\n\r\n",
    ] {
        let mut client = proxy.connect().await;
        client.send(request).await;
        let answer = client.answer(false).await;
        assert_eq!(answer.status(), 400, "{answer:?}");
        assert!(client.closed().await);
    }
    assert_eq!(seen.lock().expect("lock").len(), before);
}

#[tokio::test]
async fn on_shutdown_idle_connections_close_and_requests_in_progress_finish() {
    let (member, _) = member().await;
    let proxy = Proxy::start(member).await;
    let mut idle = proxy.connect().await;
    idle.send(b"GET /a HTTP/1.1\r\nHost: s\r\n\r\n").await;
    assert_eq!(idle.answer(false).await.status(), 200);
    let mut busy = proxy.connect().await;
    busy.send(b"GET /slow HTTP/1.1\r\nHost: s\r\n\r\n").await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    proxy.shutdown.cancel();
    assert!(idle.closed().await, "the idle connection is closed");
    let answer = busy.answer(false).await;
    assert_eq!((answer.status(), answer.body.as_str()), (200, "/slow "));
    assert_eq!(answer.header("connection"), Some("close"));
    assert!(busy.closed().await);
}

#[tokio::test]
async fn a_client_that_reads_nothing_of_its_answer_is_cut_off() {
    let (member, _) = member().await;
    let proxy = Proxy::start(member).await;
    let mut client = proxy.connect().await;
    client.send(b"GET /big HTTP/1.1\r\nHost: s\r\n\r\n").await;
    // Reads nothing for three times the stall limit (request_timeout, 1 s).
    tokio::time::sleep(Duration::from_secs(3)).await;
    let mut got = 0usize;
    let mut chunk = vec![0u8; 1 << 16];
    let read = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match client.stream.read(&mut chunk).await {
                Ok(0) | Err(_) => break,
                Ok(n) => got += n,
            }
        }
    })
    .await;
    assert!(read.is_ok(), "the connection was closed");
    assert!(
        got < BIG,
        "cut off before the end of the answer: {got} bytes"
    );
}

/// Reads until `want` bytes have come past the answers, or the connection
/// closes.
async fn read_tunnel(client: &mut Client, want: usize) -> String {
    while client.buf.len() < want && client.fill().await {}
    String::from_utf8_lossy(&std::mem::take(&mut client.buf)).into_owned()
}

const SWITCH: &[u8] = b"GET /ws HTTP/1.1\r\nHost: chat\r\nConnection: keep-alive, Upgrade\r\n\
    Upgrade: websocket\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
    Sec-WebSocket-Version: 13\r\n\r\n";

#[tokio::test]
async fn a_protocol_switch_joins_the_client_to_the_member() {
    let (member, seen) = member().await;
    let proxy = Proxy::start(member).await;
    let mut client = proxy.connect().await;
    // Bytes right behind the head, before the switch is through, go too.
    client.send(&[SWITCH, b"early "].concat()).await;
    let answer = client.answer(false).await;
    assert_eq!(answer.status(), 101, "{answer:?}");
    assert_eq!(answer.header("upgrade"), Some("websocket"));
    assert_eq!(answer.header("connection"), Some("upgrade"));
    assert_eq!(
        answer.header("sec-websocket-accept"),
        Some("s3pplmbitxaq9kygzzhzrbk+xoo=")
    );
    // The member's greeting (sent behind its 101), then its echo.
    assert_eq!(read_tunnel(&mut client, 12).await, "hello EARLY ");
    client.send(b"ping").await;
    assert_eq!(read_tunnel(&mut client, 4).await, "PING");
    let counters = &proxy.inner.counters;
    assert_eq!(counters.tunnels.load(Ordering::Relaxed), 1);
    assert_eq!(counters.tunnels_open.load(Ordering::Relaxed), 1);
    // The member saw the switch asked for, with the key, and none of the
    // client's other hop-by-hop tokens.
    let asked = last_request(&seen);
    let asked = asked.to_ascii_lowercase();
    assert!(asked.contains("\r\nconnection: upgrade\r\n"), "{asked}");
    assert!(asked.contains("\r\nupgrade: websocket\r\n"), "{asked}");
    assert!(asked.contains("\r\nsec-websocket-key: dghlihnhbxbszsbub25jzq==\r\n"));
    assert!(!asked.contains("keep-alive"), "{asked}");
    // The client is done sending: the member is told, closes, and so does
    // the client's connection.
    client.stream.shutdown().await.expect("shutdown");
    assert!(client.closed().await, "the tunnel closes with the member");
    for _ in 0..100 {
        if counters.tunnels_open.load(Ordering::Relaxed) == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(counters.tunnels_open.load(Ordering::Relaxed), 0);
}

#[tokio::test]
async fn a_switch_the_member_declines_is_an_ordinary_answer() {
    let (member, seen) = member().await;
    let proxy = Proxy::start(member).await;
    let mut client = proxy.connect().await;
    // The member switches only on /ws: elsewhere its answer is ordinary,
    // and the connection carries on as HTTP/1.1.
    let declined = String::from_utf8_lossy(SWITCH).replace("/ws", "/plain");
    client.send(declined.as_bytes()).await;
    let answer = client.answer(false).await;
    assert_eq!((answer.status(), answer.body.as_str()), (200, "/plain "));
    client.send(b"GET /after HTTP/1.1\r\nHost: s\r\n\r\n").await;
    assert_eq!(client.answer(false).await.body, "/after ");
    // A switch to h2c is the client's connection to the front-end, not
    // the member's: the member gets an ordinary request.
    let h2c = String::from_utf8_lossy(SWITCH)
        .replace("Upgrade: websocket", "Upgrade: h2c")
        .replace("/ws", "/h2c");
    client.send(h2c.as_bytes()).await;
    assert_eq!(client.answer(false).await.body, "/h2c ");
    let asked = last_request(&seen);
    assert!(!asked.to_ascii_lowercase().contains("upgrade"), "{asked}");
    // HTTP/1.0 has no switch: the request goes as an ordinary one.
    let mut old = proxy.connect().await;
    old.send(
        String::from_utf8_lossy(SWITCH)
            .replace("HTTP/1.1", "HTTP/1.0")
            .as_bytes(),
    )
    .await;
    assert_eq!(old.answer(false).await.status(), 200);
}

#[tokio::test]
async fn on_shutdown_open_tunnels_close() {
    let (member, _) = member().await;
    let proxy = Proxy::start(member).await;
    let mut client = proxy.connect().await;
    client.send(SWITCH).await;
    assert_eq!(client.answer(false).await.status(), 101);
    assert_eq!(read_tunnel(&mut client, 6).await, "hello ");
    proxy.shutdown.cancel();
    assert!(client.closed().await, "the tunnel is closed on shutdown");
}

#[tokio::test]
async fn at_its_connection_limit_it_accepts_again_when_one_closes() {
    let (member, _) = member().await;
    let proxy = Proxy::start_with(member, |c| c.frontend.max_connections = 2).await;
    let mut first = proxy.connect().await;
    first.send(b"GET /1 HTTP/1.1\r\nHost: s\r\n\r\n").await;
    assert_eq!(first.answer(false).await.body, "/1 ");
    let mut second = proxy.connect().await;
    second.send(b"GET /2 HTTP/1.1\r\nHost: s\r\n\r\n").await;
    assert_eq!(second.answer(false).await.body, "/2 ");
    let counters = &proxy.inner.counters;
    assert_eq!(counters.connections_open.load(Ordering::Relaxed), 2);
    // The third connects (the kernel queues it) but is not taken up while
    // two are open: no answer, where one takes a millisecond.
    let mut third = proxy.connect().await;
    third.send(b"GET /3 HTTP/1.1\r\nHost: s\r\n\r\n").await;
    let mut chunk = [0u8; 64];
    let early =
        tokio::time::timeout(Duration::from_millis(300), third.stream.read(&mut chunk)).await;
    assert!(early.is_err(), "answered over the limit: {early:?}");
    // One closes: the third is taken up and answered.
    drop(first);
    assert_eq!(third.answer(false).await.body, "/3 ");
    assert_eq!(counters.connections.load(Ordering::Relaxed), 3);
}
