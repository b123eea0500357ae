//! Replays every fuzz seed and corpus entry through its target on stable,
//! as ordinary tests; and, where `cargo fuzz` is installed, fuzzes each
//! target briefly.

use std::path::{Path, PathBuf};
use std::time::Duration;

type Target = fn(&[u8]);

const TARGETS: [(&str, Target); 7] = [
    ("frame_decoder", ipcm::fuzzing::frame_decoder),
    ("decode_payloads", ipcm::fuzzing::decode_payloads),
    ("names_and_info", ipcm::fuzzing::names_and_info),
    ("core_events", ipcm::fuzzing::core_events),
    ("scan_envelope", ipcm::fuzzing::scan_envelope),
    ("binary_batch", ipcm::fuzzing::binary_batch),
    ("lane_ring", ipcm::fuzzing::lane_ring),
];

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz")
}

fn inputs(target: &str) -> Vec<PathBuf> {
    let mut files = Vec::new();
    for kind in ["seeds", "corpus", "artifacts"] {
        let dir = fuzz_dir().join(kind).join(target);
        if let Ok(rd) = std::fs::read_dir(&dir) {
            files.extend(
                rd.filter_map(|e| e.ok())
                    .map(|e| e.path())
                    .filter(|p| p.is_file()),
            );
        }
    }
    files.sort();
    files
}

#[test]
fn every_seed_and_corpus_entry_passes_its_target() {
    for (name, target) in TARGETS {
        let files = inputs(name);
        assert!(!files.is_empty(), "no seeds for {name}");
        for f in files {
            let data = std::fs::read(&f).unwrap();
            let res = std::panic::catch_unwind(|| target(&data));
            assert!(res.is_ok(), "{name} failed on {}", f.display());
        }
    }
}

#[test]
fn targets_survive_simple_mutations_of_the_seeds() {
    // A cheap stand-in for fuzzing on machines without cargo-fuzz:
    // truncations and single-byte flips of every seed.
    for (name, target) in TARGETS {
        for f in inputs(name) {
            let data = std::fs::read(&f).unwrap();
            for cut in (0..data.len()).step_by((data.len() / 16).max(1)) {
                target(&data[..cut]);
            }
            for i in (0..data.len()).step_by((data.len() / 32).max(1)) {
                let mut d = data.clone();
                d[i] ^= 0xA5;
                target(&d);
            }
        }
    }
}

/// Runs each target under libFuzzer for a few seconds when `cargo fuzz` is
/// installed (`.ci/run` installs it); otherwise says it was skipped.
#[test]
fn short_fuzz_runs() {
    let ok = std::process::Command::new("cargo")
        .args(["fuzz", "--version"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        eprintln!("skipped: cargo-fuzz not installed (cargo install cargo-fuzz --locked)");
        return;
    }
    let secs = std::env::var("IPCM_FUZZ_SECONDS").unwrap_or_else(|_| "10".into());
    for (name, _) in TARGETS {
        let work = tempfile::tempdir().unwrap();
        let started = std::time::Instant::now();
        let out = std::process::Command::new("cargo")
            .current_dir(fuzz_dir())
            .env("RUSTC_BOOTSTRAP", "1")
            .args(["fuzz", "run", name])
            .arg(work.path())
            .arg(fuzz_dir().join("seeds").join(name))
            .arg("--")
            .arg(format!("-max_total_time={secs}"))
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        if !out.status.success()
            && (err.contains("error[E0554]") || err.contains("requires a nightly"))
        {
            eprintln!("skipped: this toolchain cannot build fuzz targets");
            return;
        }
        assert!(
            out.status.success(),
            "fuzzing {name} failed:\n{}",
            &err[err.len().saturating_sub(4000)..]
        );
        eprintln!(
            "fuzzed {name} for {:?}",
            started.elapsed().max(Duration::ZERO)
        );
    }
}
