//! What HTTP/1.1's own headers say: which are this hop's (RFC 9110
//! §7.6.1), the tokens of `Connection`, and the two that frame a body,
//! `Transfer-Encoding` and `Content-Length` (RFC 9112 §6).

use http::header::{self, HeaderMap, HeaderName, HeaderValue};

use super::Malformed;

/// Headers that describe one connection, not the message: never passed on
/// (RFC 9110 §7.6.1), nor are the ones a `Connection` header names.
pub fn is_hop_by_hop(name: &HeaderName) -> bool {
    HOP_BY_HOP.contains(&name.as_str())
}

// Names, not `HeaderName`s: a `const` array of those was built and dropped
// at every use (it showed in the profile).
pub(super) const HOP_BY_HOP: [&str; 7] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

/// The tokens of a message's `Connection` header(s).
pub fn connection_tokens<'a>(
    connection: impl IntoIterator<Item = &'a HeaderValue>,
) -> impl Iterator<Item = &'a str> {
    connection
        .into_iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
}

/// Whether `token` is one of the message's `Connection` tokens.
pub fn connection_has(headers: &HeaderMap, token: &str) -> bool {
    names(&headers.get_all(header::CONNECTION), token)
}

/// Whether `name` is listed in the message's `Connection` header(s),
/// looked up once by the caller (it asks for every header).
pub fn named_by_connection(
    connection: &header::GetAll<'_, HeaderValue>,
    name: &HeaderName,
) -> bool {
    names(connection, name.as_str())
}

fn names(connection: &header::GetAll<'_, HeaderValue>, token: &str) -> bool {
    connection_tokens(connection).any(|t| t.eq_ignore_ascii_case(token))
}

/// Whether a message has a transfer coding and, if it has, whether
/// `chunked` is the last one (RFC 9112 §6.3: only then does the coding
/// frame the body).
pub fn transfer_coding(headers: &HeaderMap) -> Option<bool> {
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
pub fn content_length(headers: &HeaderMap) -> Result<Option<u64>, Malformed> {
    let mut length = None;
    for value in headers.get_all(header::CONTENT_LENGTH) {
        let n = length_value(value.as_bytes())?;
        if length.is_some_and(|l| l != n) {
            return Err(Malformed("conflicting content-length"));
        }
        length = Some(n);
    }
    Ok(length)
}

/// One `content-length` value: digits only. `u64::from_str` also takes a
/// leading `+`, which another hop may read differently (request
/// smuggling).
pub fn length_value(value: &[u8]) -> Result<u64, Malformed> {
    let digits = value.trim_ascii();
    let number = digits.iter().try_fold(0u64, |n, &b| {
        let digit = b.is_ascii_digit().then(|| u64::from(b - b'0'))?;
        n.checked_mul(10)?.checked_add(digit)
    });
    number
        .filter(|_| !digits.is_empty())
        .ok_or(Malformed("invalid content-length"))
}
