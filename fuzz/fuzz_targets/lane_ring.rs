//! Fuzz target `lane_ring`: see `ipcm::fuzzing::lane_ring` for what it checks.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| ipcm::fuzzing::lane_ring(data));
