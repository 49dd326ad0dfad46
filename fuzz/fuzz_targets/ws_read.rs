//! The broker's reading of what a WebSocket client sends: any bytes, cut
//! into reads anywhere, never panic and give only messages within the
//! limit; a message sent in masked fragments reads back exactly.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    tether_broker::transport::ws::read::fuzz_reading(data);
});
