//! The chunked transfer coding (RFC 9112 §7.1), both ways: decoding a
//! member's answer or a client's request body, and the size lines of the
//! chunks the front-end writes itself.

use bytes::{Buf, Bytes, BytesMut};

use super::Malformed;

/// Longest chunk-size or trailer line in a chunked body.
pub const MAX_LINE: usize = 4 << 10;

/// The chunk that ends a body, with no trailers.
pub const LAST_CHUNK: &[u8] = b"0\r\n\r\n";

/// Where a chunked body's decoder is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decoder {
    Size,
    Data(u64),
    /// The CRLF after a chunk's data.
    DataEnd,
    Trailers,
    Done,
}

/// What one step of decoding a body gave.
#[derive(Debug, PartialEq, Eq)]
pub enum Step {
    Data(Bytes),
    NeedMore,
    Done,
}

impl Decoder {
    /// Decodes what it can off the front of `buf`, leaving what follows
    /// the body (a pipelined request) where it is.
    pub fn decode(&mut self, buf: &mut BytesMut) -> Result<Step, Malformed> {
        loop {
            match *self {
                Self::Size => {
                    let Some(line) = take_line(buf)? else {
                        return Ok(Step::NeedMore);
                    };
                    *self = match chunk_size(&line)? {
                        0 => Self::Trailers,
                        size => Self::Data(size),
                    };
                }
                Self::Data(left) => {
                    if buf.is_empty() {
                        return Ok(Step::NeedMore);
                    }
                    let n = usize::try_from(left).unwrap_or(usize::MAX).min(buf.len());
                    let data = buf.split_to(n).freeze();
                    *self = match left - n as u64 {
                        0 => Self::DataEnd,
                        rest => Self::Data(rest),
                    };
                    return Ok(Step::Data(data));
                }
                Self::DataEnd => {
                    if buf.len() < 2 {
                        return Ok(Step::NeedMore);
                    }
                    if &buf[..2] != b"\r\n" {
                        return Err(Malformed("chunk not followed by CRLF"));
                    }
                    buf.advance(2);
                    *self = Self::Size;
                }
                Self::Trailers => {
                    // Trailers are not passed on: they are rarely used and
                    // the client may not have asked for them (TE).
                    let Some(line) = take_line(buf)? else {
                        return Ok(Step::NeedMore);
                    };
                    if line.is_empty() {
                        *self = Self::Done;
                    }
                }
                Self::Done => return Ok(Step::Done),
            }
        }
    }
}

/// A chunk-size line's size, its extensions ignored (RFC 9112 §7.1.1):
/// hex digits only (`from_str_radix` would take a leading `+`), then
/// optional whitespace before the extensions.
fn chunk_size(line: &[u8]) -> Result<u64, Malformed> {
    let invalid = Malformed("invalid chunk size");
    let size = line.split(|b| *b == b';').next().unwrap_or(&[]);
    let digits = size.trim_ascii_end();
    if digits.is_empty()
        || size[digits.len()..]
            .iter()
            .any(|b| !matches!(b, b' ' | b'\t'))
    {
        return Err(invalid);
    }
    digits.iter().try_fold(0u64, |n, &b| {
        let digit = char::from(b).to_digit(16).ok_or(invalid)?;
        n.checked_mul(16)
            .and_then(|n| n.checked_add(u64::from(digit)))
            .ok_or(invalid)
    })
}

/// One CRLF-terminated line off the front of `buf`, without its CRLF.
/// A control character in it (a bare LF or CR, a NUL) is an error: a hop
/// that ends lines at a bare LF would frame the chunks after it
/// otherwise, and that difference is what request smuggling is made of.
fn take_line(buf: &mut BytesMut) -> Result<Option<BytesMut>, Malformed> {
    match buf.windows(2).position(|w| w == b"\r\n") {
        Some(at)
            if buf[..at]
                .iter()
                .any(|&b| (b < 0x20 && b != b'\t') || b == 0x7f) =>
        {
            Err(Malformed("control character in a chunk line"))
        }
        Some(at) => {
            let line = buf.split_to(at);
            buf.advance(2);
            Ok(Some(line))
        }
        None if buf.len() > MAX_LINE => Err(Malformed("chunk line too long")),
        None => Ok(None),
    }
}

/// Writes the size line of a chunk of `size` bytes.
pub fn size_line(out: &mut BytesMut, size: usize) {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn decode_all(input: &[&[u8]]) -> Result<(Vec<u8>, bool), Malformed> {
        let mut state = Decoder::Size;
        let mut buf = BytesMut::new();
        let mut out = Vec::new();
        for piece in input {
            buf.extend_from_slice(piece);
            loop {
                match state.decode(&mut buf)? {
                    Step::Data(d) => out.extend_from_slice(&d),
                    Step::NeedMore => break,
                    Step::Done => return Ok((out, buf.is_empty())),
                }
            }
        }
        Ok((out, false))
    }

    #[test]
    fn chunked_bodies_decode_however_they_are_split() {
        let whole: &[u8] = b"5;ext=1\r\nhello\r\n7\r\n, world\r\n0\r\nx-trailer: t\r\n\r\n";
        assert_eq!(
            decode_all(&[whole]).ok(),
            Some((b"hello, world".to_vec(), true))
        );
        for split in 1..whole.len() {
            let (a, b) = whole.split_at(split);
            assert_eq!(
                decode_all(&[a, b]).ok(),
                Some((b"hello, world".to_vec(), true)),
                "split at {split}"
            );
        }
    }

    #[test]
    fn bad_chunked_bodies_are_errors() {
        assert!(decode_all(&[b"zz\r\nhello\r\n"]).is_err());
        assert!(decode_all(&[b"2\r\nhiXX0\r\n\r\n"]).is_err());
        assert!(decode_all(&[&[b'1'; MAX_LINE + 10]]).is_err());
        // What another hop may read otherwise: a sign, a bare LF or a NUL
        // in the size line, a size past 64 bits, a bare LF in a trailer.
        for bad in [
            &b"+5\r\nhello\r\n0\r\n\r\n"[..],
            b"5;a\nb\r\nhello\r\n0\r\n\r\n",
            b"5\0\r\nhello\r\n0\r\n\r\n",
            b"5 x\r\nhello\r\n0\r\n\r\n",
            b"1ffffffffffffffff\r\nhello\r\n0\r\n\r\n",
            b"5\r\nhello\r\n0\r\nx: a\nb\r\n\r\n",
        ] {
            assert!(
                decode_all(&[bad]).is_err(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
        // What RFC 9112 §7.1 allows: leading zeros, whitespace before the
        // extensions, quoted extension values.
        for good in [
            &b"0005\r\nhello\r\n0\r\n\r\n"[..],
            b"5 ;a=b\r\nhello\r\n0\r\n\r\n",
            b"5;a=\"b c\"\r\nhello\r\n0\r\n\r\n",
        ] {
            assert_eq!(decode_all(&[good]).expect("valid").0, b"hello");
        }
    }

    #[test]
    fn chunk_sizes_are_hex() {
        for n in [0usize, 1, 15, 16, 255, 4096, 1 << 20, usize::MAX] {
            let mut out = BytesMut::new();
            size_line(&mut out, n);
            assert_eq!(&out[..], format!("{n:x}\r\n").as_bytes());
        }
    }
}
