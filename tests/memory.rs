//! Memory of idle connections: a listener holding 10,000 connected, idle
//! peers (hello said, nothing sent) grows by less than 4 KiB of RSS per
//! connection, on both backends. The peers live in a helper process, so
//! only the listener's side is measured.

mod common;
#[path = "../benches/support/mod.rs"]
mod support;

use common::{ROLE_ENV, helper_command};
use ipcm::{Client, Info, Options, Serializer};

const IDLE: usize = 10_000;

#[test]
#[ignore = "helper process, run by the tests below"]
fn helper_process_entry() {
    let Ok(role) = std::env::var(ROLE_ENV) else {
        return;
    };
    assert_eq!(role, "idle-clients");
    support::hold_idle_clients();
}

fn idle_connections_cost_under_4_kib_each(backend: ipcm::BackendChoice) {
    let limit = support::raise_fd_limit();
    if limit < IDLE as u64 + 256 {
        eprintln!("skipped: RLIMIT_NOFILE allows {limit} descriptors, the test needs {IDLE} + 256");
        return;
    }
    let t = common::TestRoute::new(backend);
    let info = Info::new(Serializer::Binary, t.route.path());
    let mut rx = Client::connect(&info, "sink", Options::new().backend(backend)).unwrap();
    let run = support::measure_idle(&mut rx, &info, IDLE, helper_command("idle-clients"));
    let status = run.status.as_ref().unwrap();
    assert_eq!(run.connected, IDLE, "connections that said hello");
    assert!(status.success(), "helper failed: {status}");
    let per = run.per_connection();
    eprintln!(
        "{backend:?}: {IDLE} idle connections: RSS {} -> {} bytes, {per:.0} bytes each",
        run.before, run.after
    );
    assert!(per < 4096.0, "{per:.0} bytes of RSS per idle connection");
    rx.disconnect(None).unwrap();
}

// Measures the whole process's RSS: in a process of its own.
per_backend_isolated!(idle_connections_cost_under_4_kib_each);
