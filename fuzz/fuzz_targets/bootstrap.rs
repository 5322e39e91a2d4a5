//! A bootstrap file: parsed, and checked by `weft_config::fuzzing::bootstrap`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    weft_config::fuzzing::bootstrap(data);
});
