//! Memory of idle connections: a listener holding 10,000 connected, idle
//! peers (hello said, nothing sent) grows by less than 4 KiB of RSS per
//! connection, on both backends. The peers live in a helper process, so
//! only the listener's side is measured.

mod common;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use common::{ROLE_ENV, helper_command};
use ipcm::{Client, Info, Options, Serializer};

const IDLE: usize = 10_000;

/// The two backends' tests measure the same process's RSS: one at a time.
static SERIAL: Mutex<()> = Mutex::new(());

fn raise_fd_limit() -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit read and write a struct we own.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return 0;
        }
        lim.rlim_cur = lim.rlim_max;
        libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
    }
    lim.rlim_cur
}

fn rss() -> usize {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap();
    let pages: usize = statm.split_whitespace().nth(1).unwrap().parse().unwrap();
    // SAFETY: sysconf has no preconditions.
    pages * unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as usize
}

#[test]
#[ignore = "helper process, run by the tests below"]
fn helper_process_entry() {
    let Ok(role) = std::env::var(ROLE_ENV) else {
        return;
    };
    assert_eq!(role, "idle-clients");
    raise_fd_limit();
    let socket = std::env::var("IPCM_SOCKET").unwrap();
    let count: usize = std::env::var("IPCM_COUNT").unwrap().parse().unwrap();
    let mut conns = Vec::with_capacity(count);
    for i in 0..count {
        let mut s = UnixStream::connect(&socket).unwrap();
        let mut payload = bytes::BytesMut::new();
        Serializer::Binary.encode_hello(&format!("idle{i}"), &mut payload);
        let mut frame = bytes::BytesMut::new();
        ipcm::wire::encode_frame(&payload, &mut frame).unwrap();
        s.write_all(&frame).unwrap();
        conns.push(s);
    }
    // Hold them until the test closes our stdin.
    let mut sink = Vec::new();
    let _ = std::io::stdin().read_to_end(&mut sink);
}

fn idle_connections_cost_under_4_kib_each(backend: ipcm::BackendChoice) {
    let _one_at_a_time = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let limit = raise_fd_limit();
    if limit < IDLE as u64 + 256 {
        eprintln!("skipped: RLIMIT_NOFILE allows {limit} descriptors, the test needs {IDLE} + 256");
        return;
    }
    let t = common::TestRoute::new(backend);
    let info = Info::new(Serializer::Binary, t.route.path());
    let mut rx = Client::connect(&info, "sink", Options::new().backend(backend)).unwrap();
    let mut batch = Vec::new();
    // Pay the fixed costs first: a peer, a message, pools and tables warm.
    {
        let mut warm = Client::connect(&info, "warm", Options::new().listen(false)).unwrap();
        warm.send_json("sink", "1").unwrap();
        rx.get_messages_timeout_into(&mut batch, Duration::from_secs(5))
            .unwrap();
        assert_eq!(batch.len(), 1);
        warm.disconnect(None).unwrap();
        for _ in 0..5 {
            rx.get_messages_into(&mut batch).unwrap();
        }
    }
    let before = rss();
    let mut child = helper_command("idle-clients")
        .env("IPCM_SOCKET", rx.path())
        .env("IPCM_COUNT", IDLE.to_string())
        .stdin(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
    while rx.connections().len() < IDLE && Instant::now() < deadline {
        rx.get_messages_timeout_into(&mut batch, Duration::from_millis(20))
            .unwrap();
    }
    let connected = rx.connections().len();
    let after = rss();
    drop(child.stdin.take());
    let status = child.wait().unwrap();
    assert_eq!(connected, IDLE, "connections that said hello");
    assert!(status.success(), "helper failed: {status}");
    let per = (after.saturating_sub(before)) as f64 / IDLE as f64;
    eprintln!(
        "{backend:?}: {IDLE} idle connections: RSS {before} -> {after} bytes, {per:.0} bytes each"
    );
    assert!(per < 4096.0, "{per:.0} bytes of RSS per idle connection");
    assert!(batch.is_empty() || batch.iter().all(|m| m.from() == "warm"));
    rx.disconnect(None).unwrap();
}

per_backend!(idle_connections_cost_under_4_kib_each);
