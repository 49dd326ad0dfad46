//! The QUIC session stream's framing, fed in arbitrary chunks: never
//! panics, never yields a frame over the limit, and yields the same frames
//! however the bytes were cut.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use tether_protocol::frame::FrameDecoder;

const MAX: usize = 4096;

fn frames(chunks: impl Iterator<Item = Vec<u8>>) -> (Vec<Vec<u8>>, bool) {
    let decoder = FrameDecoder::new(MAX);
    let mut buf = BytesMut::new();
    let mut out = Vec::new();
    for chunk in chunks {
        buf.extend_from_slice(&chunk);
        loop {
            match decoder.decode(&mut buf) {
                Ok(Some(f)) => {
                    assert!(f.len() <= MAX);
                    out.push(f.to_vec());
                }
                Ok(None) => break,
                Err(_) => return (out, true),
            }
        }
    }
    (out, false)
}

fuzz_target!(|data: &[u8]| {
    let Some((&cut, data)) = data.split_first() else {
        return;
    };
    let step = usize::from(cut % 16) + 1;
    let whole = frames(std::iter::once(data.to_vec()));
    let pieces = frames(data.chunks(step).map(<[u8]>::to_vec));
    assert_eq!(whole, pieces);
});
