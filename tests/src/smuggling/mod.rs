//! Request smuggling, differentially: a corpus of ambiguous requests, a
//! recording member that writes down every request that reaches it as it
//! was framed, and the exchange of one case through a proxy. Two proxies
//! that agree on every case forward the same requests with the same
//! bodies, or both refuse: where they frame a request differently, one of
//! them can be made to hide a request inside another's body.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// One request as it reached the member.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Forwarded {
    pub method: String,
    pub target: String,
    /// Its `Host` (the last one, were there several).
    pub host: Option<String>,
    pub body: Vec<u8>,
}

impl std::fmt::Display for Forwarded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.method, self.target)?;
        if let Some(host) = self.host.as_deref().filter(|h| *h != "h") {
            write!(f, " (Host {host})")?;
        }
        if !self.body.is_empty() {
            write!(f, " {:?}", String::from_utf8_lossy(&self.body))?;
        }
        Ok(())
    }
}

/// What a case came to through one proxy.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Outcome {
    /// The status of every answer the client read, in order (1xx too).
    pub statuses: Vec<u16>,
    /// What reached the member, in order.
    pub forwarded: Vec<Forwarded>,
}

impl Outcome {
    /// Some answer was an error the proxy made (or passed on).
    pub fn refused(&self) -> bool {
        self.statuses.iter().any(|s| *s >= 400)
    }

    /// The same requests reached the member, and both refused or neither.
    pub fn agrees_with(&self, other: &Outcome) -> bool {
        self.forwarded == other.forwarded && self.refused() == other.refused()
    }
}

impl std::fmt::Display for Outcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let statuses: Vec<String> = self.statuses.iter().map(u16::to_string).collect();
        if statuses.is_empty() {
            write!(f, "no answer")?;
        } else {
            write!(f, "{}", statuses.join(" "))?;
        }
        if self.forwarded.is_empty() {
            return write!(f, "; nothing forwarded");
        }
        let forwarded: Vec<String> = self.forwarded.iter().map(ToString::to_string).collect();
        write!(f, "; forwarded {}", forwarded.join(", "))
    }
}

/// A member that records each request it is sent, framed strictly by
/// RFC 9112 (CRLF lines, one `Content-Length` or a final `chunked`), and
/// answers `200 ok`. What it cannot read it records as method
/// `<unreadable>` with the reason, and closes.
pub struct Recorder {
    addr: SocketAddr,
    seen: Arc<Mutex<Vec<Forwarded>>>,
}

impl Recorder {
    /// Listens on a free loopback port.
    ///
    /// # Errors
    /// When no port can be bound.
    pub async fn start() -> std::io::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let seen = Arc::new(Mutex::new(Vec::new()));
        let log = seen.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                tokio::spawn(record_connection(stream, log.clone()));
            }
        });
        Ok(Self { addr, seen })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// What reached it since the last call.
    pub fn take(&self) -> Vec<Forwarded> {
        std::mem::take(&mut *self.seen.lock().unwrap_or_else(PoisonError::into_inner))
    }
}

async fn record_connection(mut stream: TcpStream, seen: Arc<Mutex<Vec<Forwarded>>>) {
    let mut buffer = Vec::new();
    loop {
        let request = match read_request(&mut stream, &mut buffer).await {
            Ok(Some(request)) => request,
            Ok(None) => return,
            Err(why) => {
                let unreadable = Forwarded {
                    method: "<unreadable>".to_owned(),
                    target: why,
                    host: None,
                    body: std::mem::take(&mut buffer),
                };
                seen.lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .push(unreadable);
                return;
            }
        };
        seen.lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(request);
        let answer = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok";
        if stream.write_all(answer).await.is_err() {
            return;
        }
    }
}

/// Reads more of `stream` into `buffer`; `false` at its end.
async fn fill(stream: &mut TcpStream, buffer: &mut Vec<u8>) -> Result<bool, String> {
    let mut chunk = [0u8; 4096];
    match tokio::time::timeout(Duration::from_secs(5), stream.read(&mut chunk)).await {
        Ok(Ok(0)) => Ok(false),
        Ok(Ok(n)) => {
            buffer.extend_from_slice(&chunk[..n]);
            Ok(true)
        }
        Ok(Err(err)) => Err(err.to_string()),
        Err(_) => Err("no more bytes in 5 s".to_owned()),
    }
}

/// The next CRLF-ended line of `buffer` from `at`, reading more as needed.
async fn line(stream: &mut TcpStream, buffer: &mut Vec<u8>, at: usize) -> Result<usize, String> {
    loop {
        if let Some(end) = buffer[at..].windows(2).position(|w| w == b"\r\n") {
            return Ok(at + end);
        }
        if buffer.len() > 1 << 16 {
            return Err("a line over 64 KiB".to_owned());
        }
        if !fill(stream, buffer).await? {
            return Err("the connection ended inside a line".to_owned());
        }
    }
}

/// What a request's header fields say of its framing and host.
#[derive(Default)]
struct Fields {
    length: Option<usize>,
    chunked: bool,
    host: Option<String>,
}

impl Fields {
    /// One header line: a token name, a colon, a value with no CR, LF or
    /// NUL; one Content-Length at most, and no coding but chunked.
    fn read(&mut self, field: &str) -> Result<(), String> {
        let Some((name, value)) = field.split_once(':') else {
            return Err(format!("header line {field:?}"));
        };
        if name.is_empty() || name.contains([' ', '\t']) || value.contains(['\r', '\n', '\0']) {
            return Err(format!("header line {field:?}"));
        }
        let value = value.trim_matches([' ', '\t']);
        if name.eq_ignore_ascii_case("host") {
            self.host = Some(value.to_owned());
        } else if name.eq_ignore_ascii_case("content-length") {
            if self.length.is_some() {
                return Err("two Content-Length fields".to_owned());
            }
            let length = value
                .parse()
                .map_err(|_| format!("Content-Length {value:?}"))?;
            self.length = Some(length);
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            if !value.eq_ignore_ascii_case("chunked") {
                return Err(format!("Transfer-Encoding {value:?}"));
            }
            self.chunked = true;
        }
        Ok(())
    }
}

/// One request off `stream`; `None` when it ends between requests.
async fn read_request(
    stream: &mut TcpStream,
    buffer: &mut Vec<u8>,
) -> Result<Option<Forwarded>, String> {
    // Between requests a pooled connection may idle for as long as the
    // proxy likes, and end (or be reset) when it likes.
    if buffer.is_empty() {
        let mut chunk = [0u8; 4096];
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => return Ok(None),
            Ok(n) => buffer.extend_from_slice(&chunk[..n]),
        }
    }
    let end = line(stream, buffer, 0).await?;
    let request_line = String::from_utf8_lossy(&buffer[..end]).into_owned();
    let mut parts = request_line.split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(format!("request line {request_line:?}"));
    };
    if !version.starts_with("HTTP/1.") {
        return Err(format!("request line {request_line:?}"));
    }
    let mut at = end + 2;
    let mut fields = Fields::default();
    loop {
        let end = line(stream, buffer, at).await?;
        if end == at {
            at += 2;
            break;
        }
        fields.read(&String::from_utf8_lossy(&buffer[at..end]))?;
        at = end + 2;
    }
    let Fields {
        length,
        chunked,
        host,
    } = fields;
    if chunked && length.is_some() {
        return Err("both Content-Length and Transfer-Encoding".to_owned());
    }
    buffer.drain(..at);
    let body = if chunked {
        chunked_body(stream, buffer).await?
    } else {
        let length = length.unwrap_or(0);
        while buffer.len() < length {
            if !fill(stream, buffer).await? {
                return Err("the connection ended inside the body".to_owned());
            }
        }
        buffer.drain(..length).collect()
    };
    Ok(Some(Forwarded {
        method: method.to_owned(),
        target: target.to_owned(),
        host,
        body,
    }))
}

/// A chunked body off the front of `buffer`, trailers dropped.
async fn chunked_body(stream: &mut TcpStream, buffer: &mut Vec<u8>) -> Result<Vec<u8>, String> {
    let mut body = Vec::new();
    loop {
        let end = line(stream, buffer, 0).await?;
        let size_line = String::from_utf8_lossy(&buffer[..end]).into_owned();
        let digits = size_line.split(';').next().unwrap_or_default();
        let size = usize::from_str_radix(digits, 16)
            .ok()
            .filter(|_| !digits.is_empty() && digits.len() <= 8)
            .ok_or_else(|| format!("chunk size {size_line:?}"))?;
        buffer.drain(..end + 2);
        if size == 0 {
            loop {
                let end = line(stream, buffer, 0).await?;
                buffer.drain(..end + 2);
                if end == 0 {
                    return Ok(body);
                }
            }
        }
        while buffer.len() < size + 2 {
            if !fill(stream, buffer).await? {
                return Err("the connection ended inside a chunk".to_owned());
            }
        }
        if &buffer[size..size + 2] != b"\r\n" {
            return Err("a chunk not ended by CRLF".to_owned());
        }
        body.extend(buffer.drain(..size));
        buffer.drain(..2);
    }
}

/// Sends `raw` on a new connection to `proxy`, reads the answers until the
/// proxy closes or has said nothing for `idle`, then takes what reached
/// `recorder`.
pub async fn exchange(proxy: SocketAddr, raw: &[u8], recorder: &Recorder) -> Outcome {
    let idle = Duration::from_millis(400);
    let mut answers = Vec::new();
    if let Ok(mut stream) = TcpStream::connect(proxy).await {
        if stream.write_all(raw).await.is_ok() {
            let mut chunk = [0u8; 8192];
            while let Ok(Ok(n)) = tokio::time::timeout(idle, stream.read(&mut chunk)).await {
                if n == 0 {
                    break;
                }
                answers.extend_from_slice(&chunk[..n]);
            }
        }
    }
    // Anything a proxy forwards, it forwards before it answers for it.
    tokio::time::sleep(Duration::from_millis(50)).await;
    Outcome {
        statuses: statuses(&answers),
        forwarded: recorder.take(),
    }
}

/// The status codes of the answers in `bytes`: what follows each HTTP/1
/// version (an answer starts right after the body before it, and the
/// bodies here, the member's `ok` and the proxies' error pages, hold none).
fn statuses(bytes: &[u8]) -> Vec<u16> {
    let text = String::from_utf8_lossy(bytes);
    text.match_indices("HTTP/1.")
        .filter_map(|(at, _)| text.get(at + 9..at + 12)?.parse().ok())
        .collect()
}

/// What a case is expected to come to through Headroom's front-end.
#[derive(Debug, Clone, Copy)]
pub enum Verdict {
    /// Refused with this status; nothing reaches the member.
    Refused(u16),
    /// These requests (method, target, host, body) reach the member, each
    /// answered 200.
    Forwards(&'static [(&'static str, &'static str, &'static str, &'static [u8])]),
}

impl Verdict {
    /// Whether `outcome` is what this verdict says.
    pub fn holds_for(&self, outcome: &Outcome) -> bool {
        match self {
            Verdict::Refused(status) => {
                outcome.forwarded.is_empty() && outcome.statuses.first() == Some(status)
            }
            Verdict::Forwards(requests) => {
                let forwarded: Vec<(&str, &str, &str, &[u8])> = outcome
                    .forwarded
                    .iter()
                    .map(|f| {
                        let host = f.host.as_deref().unwrap_or("");
                        (
                            f.method.as_str(),
                            f.target.as_str(),
                            host,
                            f.body.as_slice(),
                        )
                    })
                    .collect();
                forwarded == *requests
                    && outcome.statuses.iter().filter(|s| **s == 200).count() == requests.len()
                    && !outcome.refused()
            }
        }
    }
}

/// One ambiguous request (or several on one connection).
pub struct Case {
    pub name: &'static str,
    pub raw: &'static [u8],
    /// What the front-end does with it.
    pub verdict: Verdict,
    /// Where HAProxy does otherwise: why the front-end is right too, by
    /// RFC 9112's section. `None` where they agree.
    pub differs: Option<&'static str>,
}

mod corpus;
pub use corpus::CORPUS;
