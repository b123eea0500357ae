//! Fuzz target `scan_envelope`: see `ipcm::fuzzing::scan_envelope` for what it checks.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| ipcm::fuzzing::scan_envelope(data));
