//! Fuzz target `names_and_info`: see `ipcm::fuzzing::names_and_info` for what it checks.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| ipcm::fuzzing::names_and_info(data));
