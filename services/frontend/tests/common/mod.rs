//! What the front-end's socket tests share: a raw reading of HTTP/1
//! requests, as a scripted member sees them.

use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

/// One whole request (head, and a body by length or chunked, raw).
pub async fn read_request(stream: &mut TcpStream, buf: &mut Vec<u8>) -> Option<Vec<u8>> {
    loop {
        if let Some(end) = find(buf, b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
            let at = end + 4;
            let body = if head.contains("transfer-encoding: chunked") {
                find(&buf[at..], b"0\r\n\r\n").map(|n| n + 5)
            } else {
                let n = header(&head, "content-length").map_or(0, |v| v.parse().unwrap_or(0));
                (buf.len() >= at + n).then_some(n)
            };
            if let Some(n) = body {
                return Some(buf.drain(..at + n).collect());
            }
        }
        let mut chunk = [0u8; 4096];
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

pub fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// A header's value in a lowercased head.
pub fn header<'a>(head: &'a str, name: &str) -> Option<&'a str> {
    head.lines().find_map(|line| {
        let (n, v) = line.split_once(':')?;
        (n.trim() == name).then(|| v.trim())
    })
}
