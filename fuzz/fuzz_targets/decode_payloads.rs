//! Fuzz target `decode_payloads`: see `ipcm::fuzzing::decode_payloads` for what it checks.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| ipcm::fuzzing::decode_payloads(data));
