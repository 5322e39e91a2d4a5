//! A policy file: parsed and checked, then compiled for both sides of the
//! sidecar, by `weft_proxy::fuzzing::policy`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    weft_proxy::fuzzing::policy(data);
});
