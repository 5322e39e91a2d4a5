//! A client connection's raw bytes, followed for HTTP/1 request framing by
//! `weft_proxy::fuzzing::framing` (split invariance, and hyper as the
//! reference for what it claims).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    weft_proxy::fuzzing::framing(data);
});
