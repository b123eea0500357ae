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
                    if $crate::common::io_uring_missing() {
                        return;
                    }
                    super::$name(ipcm::BackendChoice::IoUring)
                }
            )*
        }
    };
}

/// [`per_backend!`] for tests that measure something process-wide
/// (descriptors, RSS, CPU time, page faults): each runs in a process of its
/// own (see [`isolated`]), so that other tests of the same binary, running
/// in parallel threads, cannot move its numbers.
#[macro_export]
macro_rules! per_backend_isolated {
    ($($name:ident),* $(,)?) => {
        mod isolated {
            mod epoll {
                $(
                    #[test]
                    fn $name() {
                        $crate::common::isolated(
                            concat!("isolated::epoll::", stringify!($name)),
                            || super::super::$name(ipcm::BackendChoice::Epoll),
                        )
                    }
                )*
            }
            mod io_uring {
                $(
                    #[test]
                    fn $name() {
                        if $crate::common::io_uring_missing() {
                            return;
                        }
                        $crate::common::isolated(
                            concat!("isolated::io_uring::", stringify!($name)),
                            || super::super::$name(ipcm::BackendChoice::IoUring),
                        )
                    }
                )*
            }
        }
    };
}

/// True, after printing why, when io_uring cannot run here (the caller
/// skips its io_uring test).
pub fn io_uring_missing() -> bool {
    match ipcm::io_uring_available() {
        Ok(()) => false,
        Err(reason) => {
            eprintln!("skipped: io_uring unavailable ({reason})");
            true
        }
    }
}

/// Names the one test an isolated child process runs (see [`isolated`]).
pub const ISOLATED_ENV: &str = "IPCM_ISOLATED_TEST";

/// Runs `body`, the test named `name` (its full path in this test binary),
/// in a process of its own: the binary re-runs itself with only that test
/// selected, one test thread, and [`ISOLATED_ENV`] set, and this test
/// passes when that child ran the test and it passed. In the child, `body`
/// runs directly.
pub fn isolated(name: &str, body: impl FnOnce()) {
    if std::env::var(ISOLATED_ENV).as_deref() == Ok(name) {
        init_logging();
        body();
        return;
    }
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args([name, "--exact", "--nocapture", "--test-threads", "1"])
        .env(ISOLATED_ENV, name)
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    // What the child printed, for --nocapture and for failures.
    eprint!("{stderr}");
    assert!(
        out.status.success(),
        "isolated test {name} failed ({}):\n{stdout}\n{stderr}",
        out.status
    );
    assert!(
        stdout.contains("1 passed"),
        "the child process ran no test named {name}:\n{stdout}"
    );
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
            let text = r.args().to_string();
            eprintln!("[pid {} {}] {text}", std::process::id(), r.level());
            LOGGED
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push((r.level(), text));
        }
    }
    fn flush(&self) {}
}

/// Every record logged since [`init_logging`], for tests that count them.
static LOGGED: std::sync::Mutex<Vec<(log::Level, String)>> = std::sync::Mutex::new(Vec::new());

/// The records logged so far at `level` whose text contains `needle`.
pub fn logged(level: log::Level, needle: &str) -> Vec<String> {
    LOGGED
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .iter()
        .filter(|(l, t)| *l == level && t.contains(needle))
        .map(|(_, t)| t.clone())
        .collect()
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

/// Makes `syscall` fail with EPERM for this thread and what it starts,
/// as a seccomp policy would.
pub fn refuse_syscall(nr: i64) {
    use libc::*;
    // SAFETY: building BPF instructions is plain data; the prctl calls get
    // valid pointers to a filter that outlives them (the kernel copies it).
    unsafe {
        let filter = [
            BPF_STMT((BPF_LD | BPF_W | BPF_ABS) as u16, 0),
            BPF_JUMP((BPF_JMP | BPF_JEQ | BPF_K) as u16, nr as u32, 0, 1),
            BPF_STMT((BPF_RET | BPF_K) as u16, SECCOMP_RET_ERRNO | EPERM as u32),
            BPF_STMT((BPF_RET | BPF_K) as u16, SECCOMP_RET_ALLOW),
        ];
        let prog = sock_fprog {
            len: filter.len() as u16,
            filter: filter.as_ptr() as *mut sock_filter,
        };
        assert_eq!(prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), 0);
        assert_eq!(
            prctl(
                PR_SET_SECCOMP,
                SECCOMP_MODE_FILTER,
                &prog as *const sock_fprog as c_ulong
            ),
            0,
            "seccomp filter refused"
        );
    }
}
