//! A request head (raw HTTP/1-style bytes, decoded leniently): screened,
//! routed and rewritten by `weft_proxy::fuzzing::request`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    weft_proxy::fuzzing::request(data);
});
