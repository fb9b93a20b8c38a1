//! A member's header lines kept as it sent them, for a client on HTTP/1:
//! copied through in one piece instead of taken apart into a header map
//! and written out again, which was an eighth of the proxy's instructions
//! per request (see the README's counted figures).
//!
//! Only an answer that could go on as it is gets its lines kept: none of
//! its headers is this hop's (so nothing needs taking out), it has at
//! most one `Content-Length`, and every line ends in CRLF. Anything else
//! is read into a map, as before.

use std::ops::Range;

use bytes::{Bytes, BytesMut};
use http::HeaderMap;

use super::parse::{self, MAX_ANSWER_HEADERS};
use super::Malformed;

/// The header lines of an answer, from the first to the blank line that
/// ends the head.
#[derive(Debug, Clone)]
pub struct Lines {
    /// The lines and the blank line after them.
    block: Bytes,
    said: Said,
}

/// What the head's parse said of its lines: what the framing and the
/// cache read, so that neither looks through the lines again.
// Kept small: an answer's body carries it, and every move of an answer
// copies it.
#[derive(Debug, Clone)]
pub(super) struct Said {
    pub content_length: Option<u64>,
    /// It has a `Date` (else one is added, as for any answer).
    pub dated: bool,
    /// `Set-Cookie` or `Vary`.
    pub personal: bool,
    pub cache_control: Place,
    pub expires: Place,
    /// `Cache-Control` and `Expires` came once at most, so the two above
    /// are all there is of them.
    pub cache_readable: bool,
}

/// Where a value is in the block; empty for none (an empty value says
/// nothing either).
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct Place {
    start: u32,
    end: u32,
}

impl Place {
    /// `None` for a place past what a head can be (it is then read from
    /// a map).
    pub(super) fn of(range: Range<usize>) -> Option<Self> {
        Some(Self {
            start: u32::try_from(range.start).ok()?,
            end: u32::try_from(range.end).ok()?,
        })
    }

    fn range(self) -> Option<Range<usize>> {
        (self.start < self.end).then_some(self.start as usize..self.end as usize)
    }
}

/// What a shared cache decides by (see [`crate::cache::freshness`]).
#[derive(Debug, Clone, Copy)]
pub struct CacheTerms<'a> {
    /// `Set-Cookie` or `Vary`.
    pub personal: bool,
    pub cache_control: Option<&'a [u8]>,
    pub expires: Option<&'a [u8]>,
}

impl Lines {
    /// `head` is the whole head; `at` is where its header lines start in
    /// it (see [`block_start`]).
    pub(super) fn new(head: &Bytes, at: usize, said: Said) -> Self {
        Self {
            block: head.slice(at..),
            said,
        }
    }

    pub fn content_length(&self) -> Option<u64> {
        self.said.content_length
    }

    pub fn is_dated(&self) -> bool {
        self.said.dated
    }

    /// What a cache decides by, or `None` when the lines repeat
    /// `Cache-Control` or `Expires` (then read them as a map).
    pub fn cache_terms(&self) -> Option<CacheTerms<'_>> {
        let said = &self.said;
        let value = |at: Place| at.range().and_then(|at| self.block.get(at));
        said.cache_readable.then(|| CacheTerms {
            personal: said.personal,
            cache_control: value(said.cache_control),
            expires: value(said.expires),
        })
    }

    /// The lines, each ending in CRLF, without the blank line.
    pub fn as_bytes(&self) -> &[u8] {
        &self.block[..self.block.len() - 2]
    }

    /// Writes the lines but the `Content-Length` one, for a client whose
    /// answer is framed another way.
    pub fn write_without_length(&self, out: &mut BytesMut) {
        const NAME: &[u8] = b"content-length:";
        for line in self.as_bytes().split_inclusive(|&b| b == b'\n') {
            let named = line.len() > NAME.len() && line[..NAME.len()].eq_ignore_ascii_case(NAME);
            if !named {
                out.extend_from_slice(line);
            }
        }
    }

    /// The lines as a header map, for the readers that need one: the cache
    /// deciding whether to keep an answer, or an HTTP/2 client.
    pub fn to_map(&self) -> Result<HeaderMap, Malformed> {
        let mut slots = [httparse::EMPTY_HEADER; MAX_ANSWER_HEADERS];
        match httparse::parse_headers(&self.block, &mut slots) {
            Ok(httparse::Status::Complete((_, parsed))) => {
                let places = parse::places(&self.block, parsed)?;
                parse::header_map(&self.block, places)
            }
            _ => Err(Malformed("malformed header lines")),
        }
    }
}

/// Where the header lines start in a head of `length` bytes at the front
/// of `buf`, if every one of them ends in CRLF. httparse also takes a bare
/// LF as a line's end; a client could read such a line otherwise, so the
/// lines are then not passed on as they are. The line ends are the gaps
/// between one value and the next name: only whitespace and CRLF.
pub(super) fn block_start(
    buf: &[u8],
    length: usize,
    headers: &[httparse::Header<'_>],
) -> Option<usize> {
    let Some(first) = headers.first() else {
        // No headers: the blank line only.
        let at = length.checked_sub(2)?;
        return (&buf[at..length] == b"\r\n").then_some(at);
    };
    let mut ends = headers.windows(2).map(|pair| {
        let from = parse::place(buf, pair[0].value).end;
        let to = parse::place(buf, pair[1].name.as_bytes()).start;
        (from..to, &b"\r\n"[..])
    });
    let last = parse::place(buf, headers[headers.len() - 1].value).end;
    let each_crlf =
        ends.all(|(gap, end)| line_end(buf, gap, end)) && line_end(buf, last..length, b"\r\n\r\n");
    each_crlf.then(|| parse::place(buf, first.name.as_bytes()).start)
}

/// Whether `buf[gap]` is whitespace, then `end`.
fn line_end(buf: &[u8], gap: Range<usize>, end: &[u8]) -> bool {
    buf.get(gap)
        .and_then(|gap| gap.strip_suffix(end))
        .is_some_and(|space| space.iter().all(|&b| b == b' ' || b == b'\t'))
}
