#![no_main]
//! See `conch::fuzz::frame_codec` for what must hold.

libfuzzer_sys::fuzz_target!(|data: &[u8]| conch::fuzz::frame_codec(data));
