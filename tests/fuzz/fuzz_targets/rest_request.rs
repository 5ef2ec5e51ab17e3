#![no_main]
//! See `conch::fuzz::rest_request` for what must hold.

libfuzzer_sys::fuzz_target!(|data: &[u8]| conch::fuzz::rest_request(data));
