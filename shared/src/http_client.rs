//! A small HTTP/1.0 client for calls to an application on its own server:
//! the agent's GET of the stats endpoint and POST of a hook, and the
//! images' health probe. HTTP/1.0 keeps it honest and small: one request
//! per connection, the body ends when the connection does, no chunked
//! encoding to decode. (The front-end's client to members is its own,
//! kept-alive HTTP/1.1: see `headroom_frontend::upstream`.)

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The most of a response that is read: stats are a few hundred bytes.
const MAX_RESPONSE: u64 = 64 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("{0} is not an http://host:port/path URL")]
    Url(String),
    #[error("{url}: {source}")]
    Io {
        url: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{url}: no answer within {timeout:?}")]
    Timeout { url: String, timeout: Duration },
    #[error("{url}: malformed response")]
    Malformed { url: String },
    #[error("{url}: status {status}")]
    Status { url: String, status: u16 },
}

/// Splits `http://host[:port]/path` into (host:port, path).
pub fn split_url(url: &str) -> Result<(String, String), HttpError> {
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| HttpError::Url(url.to_owned()))?;
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    if authority.is_empty() || authority.contains(char::is_whitespace) {
        return Err(HttpError::Url(url.to_owned()));
    }
    let authority = if authority.contains(':') {
        authority.to_owned()
    } else {
        format!("{authority}:80")
    };
    Ok((authority, path.to_owned()))
}

/// Sends `method url` with an optional JSON body and returns the response
/// body when the status is 2xx.
///
/// # Errors
/// A bad URL, a connection or I/O error, a timeout, a response that is not
/// HTTP, or a status outside 2xx.
pub async fn call(
    method: &str,
    url: &str,
    body: Option<&[u8]>,
    timeout: Duration,
) -> Result<Vec<u8>, HttpError> {
    let (authority, path) = split_url(url)?;
    let io = |source| HttpError::Io {
        url: url.to_owned(),
        source,
    };
    let exchange = async {
        let mut stream = TcpStream::connect(&authority).await.map_err(io)?;
        let body = body.unwrap_or_default();
        let head = format!(
            "{method} {path} HTTP/1.0\r\nHost: {authority}\r\nUser-Agent: headroom\r\nAccept: application/json\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
            body.len()
        );
        stream.write_all(head.as_bytes()).await.map_err(io)?;
        stream.write_all(body).await.map_err(io)?;
        let mut response = Vec::new();
        stream
            .take(MAX_RESPONSE)
            .read_to_end(&mut response)
            .await
            .map_err(io)?;
        Ok::<_, HttpError>(response)
    };
    let response = tokio::time::timeout(timeout, exchange)
        .await
        .map_err(|_| HttpError::Timeout {
            url: url.to_owned(),
            timeout,
        })??;
    let malformed = || HttpError::Malformed {
        url: url.to_owned(),
    };
    let split = response
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(malformed)?;
    let head = std::str::from_utf8(&response[..split]).map_err(|_| malformed())?;
    let status: u16 = head
        .lines()
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
        .ok_or_else(malformed)?;
    if !(200..300).contains(&status) {
        return Err(HttpError::Status {
            url: url.to_owned(),
            status,
        });
    }
    Ok(response[split + 4..].to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_split_into_authority_and_path() {
        let (a, p) = split_url("http://127.0.0.1:8080/stats").expect("url");
        assert_eq!((a.as_str(), p.as_str()), ("127.0.0.1:8080", "/stats"));
        let (a, p) = split_url("http://app").expect("url");
        assert_eq!((a.as_str(), p.as_str()), ("app:80", "/"));
        assert!(split_url("https://app/").is_err());
        assert!(split_url("http:///x").is_err());
    }
}
