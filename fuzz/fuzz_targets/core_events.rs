//! Fuzz target `core_events`: see `ipcm::fuzzing::core_events` for what it checks.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| ipcm::fuzzing::core_events(data));
