//! The chunked coding read whole and read in two pieces (split where the
//! first two bytes say): the same data, the same end, the same bytes left
//! after it. A decoder that read the pieces differently from the whole
//! would let a body be framed two ways. And the check the front-end makes
//! of what came with a head before it forwards it refuses exactly what
//! decoding the same bytes would find malformed.
#![no_main]

use bytes::BytesMut;
use headroom_frontend::http1::{BodyDecoder, Framing, Step};
use libfuzzer_sys::fuzz_target;

#[derive(Debug, PartialEq, Eq)]
enum End {
    Done(Vec<u8>),
    NeedMore,
    Malformed,
}

fn decode(pieces: &[&[u8]]) -> (Vec<u8>, End) {
    let mut decoder = BodyDecoder::new(Framing::Chunked);
    let mut buf = BytesMut::new();
    let mut data = Vec::new();
    for (i, piece) in pieces.iter().enumerate() {
        buf.extend_from_slice(piece);
        loop {
            match decoder.decode(&mut buf) {
                Ok(Step::Data(chunk)) => data.extend_from_slice(&chunk),
                Ok(Step::Done) => {
                    // What follows the body: the rest of this piece and
                    // every piece after it.
                    let mut after = buf.to_vec();
                    pieces[i + 1..]
                        .iter()
                        .for_each(|p| after.extend_from_slice(p));
                    return (data, End::Done(after));
                }
                Ok(Step::NeedMore) => break,
                Err(_) => return (data, End::Malformed),
            }
        }
    }
    (data, End::NeedMore)
}

fuzz_target!(|data: &[u8]| {
    let Some((split, body)) = data.split_first_chunk::<2>() else {
        return;
    };
    let at = usize::from(u16::from_le_bytes(*split)) % (body.len() + 1);
    let whole = decode(&[body]);
    let pieces = decode(&[&body[..at], &body[at..]]);
    assert_eq!(whole, pieces, "split at {at}");
    let checked = BodyDecoder::new(Framing::Chunked).check_ahead(body);
    assert_eq!(
        checked.is_err(),
        whole.1 == End::Malformed,
        "check ahead {checked:?}, decoded {:?}",
        whole.1
    );
});
