//! A `POST /v1/publish` body through the API's parsing and checks (JSON
//! nesting, the publication's fields, `data` kept as sent, `push`
//! bounds): never panics; an accepted `data` is valid, compact JSON.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    tether_broker::api::fuzz_publication(data);
});
