//! A client's bytes as the front-end's server reads them: request heads
//! and their bodies, pipelined, until the bytes run out or one is refused.
//! Beyond not panicking: a body never yields more than its length says,
//! and every step takes bytes off the buffer or ends.
#![no_main]

use bytes::BytesMut;
use headroom_frontend::http1::{parse, BodyDecoder, Framing, Step};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut buf = BytesMut::from(data);
    for _ in 0..32 {
        let Ok(Some(head)) = parse::request(&mut buf) else {
            return;
        };
        let declared = match head.body {
            Framing::Length(n) => Some(n),
            _ => None,
        };
        let mut body = BodyDecoder::new(head.body);
        let mut read = 0u64;
        loop {
            let before = buf.len();
            match body.decode(&mut buf) {
                Ok(Step::Data(data)) => {
                    assert!(!data.is_empty() || buf.len() < before, "no progress");
                    read += data.len() as u64;
                    if let Some(n) = declared {
                        assert!(read <= n, "{read} bytes of a {n}-byte body");
                    }
                }
                Ok(Step::Done) => break,
                Ok(Step::NeedMore) | Err(_) => return,
            }
        }
        if let Some(n) = declared {
            assert_eq!(read, n, "a body done short of its length");
        }
    }
});
