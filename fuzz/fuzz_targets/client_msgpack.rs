//! A client frame over `tether.v1.msgpack` (and QUIC): decoding never
//! panics, and what decodes encodes back to the same message.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tether_protocol::Encoding;
use tether_protocol::codec::{decode_client, encode_client};

const MAX: usize = 64 * 1024;

fuzz_target!(|data: &[u8]| {
    if let Ok(msg) = decode_client(data, Encoding::MsgPack, MAX) {
        let again = encode_client(&msg, Encoding::MsgPack);
        let back =
            decode_client(&again, Encoding::MsgPack, usize::MAX).expect("re-encoded frame decodes");
        assert_eq!(back, msg);
    }
});
