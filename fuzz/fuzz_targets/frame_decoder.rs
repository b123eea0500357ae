//! Fuzz target `frame_decoder`: see `ipcm::fuzzing::frame_decoder` for what it checks.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| ipcm::fuzzing::frame_decoder(data));
