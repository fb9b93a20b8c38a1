//! How a message's body is delimited (RFC 9112 §6.3), and reading one off
//! a connection's buffer as it comes, whoever sent it.

use bytes::BytesMut;
use http::StatusCode;

use super::chunked::{self, Step};
use super::Malformed;

/// How a message's body is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// No body: a HEAD answer, 1xx, 204, 304, or a request without one.
    Empty,
    Length(u64),
    Chunked,
    /// To the close (an answer of unknown length).
    UntilClose,
    /// No body: after a `101` the connection carries another protocol.
    Tunnel,
}

impl Framing {
    /// How an answer to a client is framed: `exact` is its body's length
    /// when known before it is sent. An HTTP/1.0 client cannot take
    /// chunks, so a body of unknown length runs to the close.
    pub fn of_answer(status: StatusCode, answer: Answering, exact: Option<u64>) -> Self {
        if answer.head_request
            || status.is_informational()
            || status == StatusCode::NO_CONTENT
            || status == StatusCode::NOT_MODIFIED
        {
            Self::Empty
        } else if let Some(n) = exact {
            Self::Length(n)
        } else if answer.http10 {
            Self::UntilClose
        } else {
            Self::Chunked
        }
    }
}

/// What the client's request says of the answer it can take.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Answering {
    /// A HEAD request: the answer has a head only.
    pub head_request: bool,
    /// An HTTP/1.0 client: no chunks, and kept alive only when asked.
    pub http10: bool,
}

/// Where the reading of one body is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyDecoder {
    /// This many bytes are left.
    Length(u64),
    Chunked(chunked::Decoder),
    UntilClose,
    /// Read to its end, or there was none.
    Done,
}

impl BodyDecoder {
    pub fn new(framing: Framing) -> Self {
        match framing {
            Framing::Empty | Framing::Tunnel | Framing::Length(0) => Self::Done,
            Framing::Length(n) => Self::Length(n),
            Framing::Chunked => Self::Chunked(chunked::Decoder::Size),
            Framing::UntilClose => Self::UntilClose,
        }
    }

    /// The body's next piece off the front of `buf`, leaving what follows
    /// the body where it is.
    pub fn decode(&mut self, buf: &mut BytesMut) -> Result<Step, Malformed> {
        let step = match self {
            Self::Done => Step::Done,
            _ if buf.is_empty() && !matches!(self, Self::Chunked(_)) => Step::NeedMore,
            Self::Length(left) => {
                let n = usize::try_from(*left).unwrap_or(usize::MAX).min(buf.len());
                *left -= n as u64;
                let data = buf.split_to(n).freeze();
                if *left == 0 {
                    *self = Self::Done;
                }
                Step::Data(data)
            }
            Self::Chunked(decoder) => {
                let step = decoder.decode(buf)?;
                if *decoder == chunked::Decoder::Done {
                    *self = Self::Done;
                }
                step
            }
            Self::UntilClose => Step::Data(buf.split().freeze()),
        };
        Ok(step)
    }

    /// Whether the body bytes already in `buf` are well framed, leaving
    /// them where they are. A chunked body that came with its head is
    /// checked before the head goes to a member, so a bad one is refused
    /// whole, not cut off after the member was sent part of it (a bad
    /// chunk that comes later can only be cut off: RFC 9112 §8, the
    /// member sees an incomplete message). Chunked requests are rare
    /// enough for the copy this makes.
    pub fn check_ahead(&self, buf: &[u8]) -> Result<(), Malformed> {
        let Self::Chunked(decoder) = self else {
            return Ok(());
        };
        let mut decoder = *decoder;
        let mut ahead = BytesMut::from(buf);
        loop {
            match decoder.decode(&mut ahead)? {
                Step::Data(_) => {}
                Step::NeedMore | Step::Done => return Ok(()),
            }
        }
    }

    /// The sender closed the connection: whether that ended the body (it
    /// does only one that runs to the close, or one already complete).
    pub fn at_close(&mut self) -> bool {
        match self {
            Self::UntilClose | Self::Done => {
                *self = Self::Done;
                true
            }
            Self::Length(_) | Self::Chunked(_) => false,
        }
    }

    pub fn is_done(&self) -> bool {
        *self == Self::Done
    }

    /// How many bytes are left, when the framing says.
    pub fn exact(&self) -> Option<u64> {
        match self {
            Self::Length(n) => Some(*n),
            Self::Done => Some(0),
            Self::Chunked(_) | Self::UntilClose => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read_all(framing: Framing, input: &[u8]) -> (Vec<u8>, BodyDecoder, Vec<u8>) {
        let mut decoder = BodyDecoder::new(framing);
        let mut buf = BytesMut::from(input);
        let mut body = Vec::new();
        while let Ok(Step::Data(data)) = decoder.decode(&mut buf) {
            body.extend_from_slice(&data);
        }
        (body, decoder, buf.to_vec())
    }

    #[test]
    fn a_body_is_read_as_its_framing_says_and_what_follows_stays() {
        let (body, decoder, rest) = read_all(Framing::Length(5), b"helloGET");
        assert_eq!(
            (&body[..], decoder, &rest[..]),
            (&b"hello"[..], BodyDecoder::Done, &b"GET"[..])
        );
        let (body, decoder, rest) = read_all(Framing::Chunked, b"2\r\nhi\r\n0\r\n\r\nGET");
        assert_eq!(
            (&body[..], decoder, &rest[..]),
            (&b"hi"[..], BodyDecoder::Done, &b"GET"[..])
        );
        let (body, mut decoder, _) = read_all(Framing::UntilClose, b"all of it");
        assert_eq!(&body[..], b"all of it");
        assert!(decoder.at_close() && decoder.is_done());
        let (_, mut decoder, _) = read_all(Framing::Length(9), b"short");
        assert_eq!(decoder.exact(), Some(4));
        assert!(!decoder.at_close(), "a close inside a sized body cuts it");
        for empty in [Framing::Empty, Framing::Tunnel, Framing::Length(0)] {
            assert!(BodyDecoder::new(empty).is_done());
        }
    }

    #[test]
    fn an_answer_is_framed_by_what_the_client_can_take() {
        let plain = Answering {
            head_request: false,
            http10: false,
        };
        let ok = StatusCode::OK;
        assert_eq!(Framing::of_answer(ok, plain, Some(3)), Framing::Length(3));
        assert_eq!(Framing::of_answer(ok, plain, None), Framing::Chunked);
        let old = Answering {
            http10: true,
            ..plain
        };
        assert_eq!(Framing::of_answer(ok, old, None), Framing::UntilClose);
        let head = Answering {
            head_request: true,
            ..plain
        };
        assert_eq!(Framing::of_answer(ok, head, Some(3)), Framing::Empty);
        for status in [StatusCode::NO_CONTENT, StatusCode::NOT_MODIFIED] {
            assert_eq!(Framing::of_answer(status, plain, None), Framing::Empty);
        }
    }
}
