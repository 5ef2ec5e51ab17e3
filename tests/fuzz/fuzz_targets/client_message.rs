#![no_main]
//! See `conch::fuzz::client_message` for what must hold.

libfuzzer_sys::fuzz_target!(|data: &[u8]| conch::fuzz::client_message(data));
