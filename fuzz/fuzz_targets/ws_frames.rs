//! The broker's own WebSocket framing (what it sends): any payload and
//! opcode framed, read back by an independent RFC 6455 decoder, and cut
//! after any number of written bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    tether_broker::transport::ws::fuzz_framing(data);
});
