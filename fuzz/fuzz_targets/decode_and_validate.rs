//! See the crate docs and docs/FUZZING.md.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| registry_fuzz::decode::run(data));
