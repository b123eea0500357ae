//! Shared helpers of the integration tests.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use ipcm::{BackendChoice, Client, Info, Message, Options, Route, Serializer};

/// Runs each listed test function once per backend: `fn name(backend: BackendChoice)`
/// becomes `epoll::name` and `io_uring::name`. Where io_uring cannot run, its
/// tests pass after printing "skipped: io_uring unavailable (<reason>)".
#[macro_export]
macro_rules! per_backend {
    ($($name:ident),* $(,)?) => {
        mod epoll {
            $(
                #[test]
                fn $name() {
                    super::$name(ipcm::BackendChoice::Epoll)
                }
            )*
        }
        mod io_uring {
            $(
                #[test]
                fn $name() {
                    if let Err(reason) = ipcm::reactor::io_uring_available() {
                        eprintln!("skipped: io_uring unavailable ({reason})");
                        return;
                    }
                    super::$name(ipcm::BackendChoice::IoUring)
                }
            )*
        }
    };
}

/// A fresh route in a private temporary directory, removed on drop.
pub struct TestRoute {
    pub dir: tempfile::TempDir,
    pub route: Route,
    pub backend: BackendChoice,
}

impl TestRoute {
    pub fn new(backend: BackendChoice) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("ipcm")
            .tempdir_in("/tmp")
            .unwrap();
        let route = Route::spawn(Some(dir.path())).unwrap();
        TestRoute {
            dir,
            route,
            backend,
        }
    }

    pub fn info(&self) -> Info {
        Info::new(Serializer::Json, self.route.path())
    }

    pub fn opts(&self) -> Options {
        Options::new().backend(self.backend)
    }

    pub fn connect(&self, id: &str) -> Client {
        Client::connect(&self.info(), id, self.opts()).unwrap()
    }

    pub fn connect_nl(&self, id: &str) -> Client {
        Client::connect(&self.info(), id, self.opts().listen(false)).unwrap()
    }

    pub fn file(&self, name: &str) -> PathBuf {
        Path::new(self.route.path()).join(name)
    }
}

/// Polls `get_messages` (20 ms apart, up to 5 s) until `n` messages arrived.
pub fn poll(c: &mut Client, n: usize) -> Vec<Message> {
    poll_for(c, n, Duration::from_secs(5))
}

pub fn poll_for(c: &mut Client, n: usize, timeout: Duration) -> Vec<Message> {
    let deadline = Instant::now() + timeout;
    let mut out = Vec::new();
    while out.len() < n && Instant::now() < deadline {
        let got = c.get_messages().unwrap();
        if got.is_empty() {
            std::thread::sleep(Duration::from_millis(20));
        }
        out.extend(got);
    }
    out
}

/// Keeps receiving for `quiet` and returns what came.
pub fn drain_for(c: &mut Client, quiet: Duration) -> Vec<Message> {
    let deadline = Instant::now() + quiet;
    let mut out = Vec::new();
    while Instant::now() < deadline {
        out.extend(c.get_messages_timeout(Duration::from_millis(20)).unwrap());
    }
    out
}

pub fn contents(msgs: &[Message]) -> Vec<serde_json::Value> {
    msgs.iter().map(|m| m.content_value().unwrap()).collect()
}

/// Path of the vectors captured from the Perl implementation: the shared
/// copy next to the project when present, else the copy in `tests/vectors`.
pub fn vectors_dir() -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let shared = root.join("../shared/vectors");
    if shared.join("wire_capture.jsonl").exists() {
        shared
    } else {
        root.join("tests/vectors")
    }
}

pub fn read_jsonl(name: &str) -> Vec<serde_json::Value> {
    let path = vectors_dir().join(name);
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// Environment variable naming the role a re-executed test binary plays.
pub const ROLE_ENV: &str = "IPCM_TEST_ROLE";

/// A command that re-runs this test binary as a helper process: it runs
/// only the ignored test `helper_process_entry`, which reads its role from
/// [`ROLE_ENV`].
pub fn helper_command(role: &str) -> std::process::Command {
    let mut c = std::process::Command::new(std::env::current_exe().unwrap());
    c.args([
        "--ignored",
        "--exact",
        "helper_process_entry",
        "--nocapture",
        "--test-threads",
        "1",
    ])
    .env(ROLE_ENV, role)
    .stdout(std::process::Stdio::null());
    c
}

/// Parses a backend name passed to a helper process.
pub fn backend_from_env() -> BackendChoice {
    match std::env::var("IPCM_TEST_BACKEND").as_deref() {
        Ok("epoll") => BackendChoice::Epoll,
        Ok("io_uring") => BackendChoice::IoUring,
        _ => BackendChoice::Auto,
    }
}

pub fn backend_name(b: BackendChoice) -> &'static str {
    match b {
        BackendChoice::Epoll => "epoll",
        BackendChoice::IoUring => "io_uring",
        _ => "auto",
    }
}

struct StderrLogger;

impl log::Log for StderrLogger {
    fn enabled(&self, m: &log::Metadata) -> bool {
        m.level() <= log::max_level()
    }
    fn log(&self, r: &log::Record) {
        if self.enabled(r.metadata()) {
            eprintln!("[pid {} {}] {}", std::process::id(), r.level(), r.args());
        }
    }
    fn flush(&self) {}
}

/// Sends the library's log records to stderr (shown for failing tests).
pub fn init_logging() {
    static LOGGER: StderrLogger = StderrLogger;
    if log::set_logger(&LOGGER).is_ok() {
        let debug = std::env::var("IPCM_TEST_LOG").is_ok_and(|v| v == "debug");
        log::set_max_level(if debug {
            log::LevelFilter::Debug
        } else {
            log::LevelFilter::Info
        });
    }
}
