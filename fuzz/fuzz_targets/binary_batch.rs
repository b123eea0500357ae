//! Fuzz target `binary_batch`: see `ipcm::fuzzing::binary_batch` for what it checks.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| ipcm::fuzzing::binary_batch(data));
