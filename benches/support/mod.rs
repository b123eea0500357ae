//! Helpers shared by the benches (`mod support;`) and by `tests/memory.rs`
//! (through `#[path]`): message bodies, the queueing sender step, the echo
//! peer of the ping-pongs, and the idle-connection memory measurement.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::process::{Command, ExitStatus, Stdio};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use ipcm::{Client, Error, Info, Options, Serializer};

/// How long any single wait in a bench may take before it is a failure.
pub const WAIT: Duration = Duration::from_secs(30);

/// A JSON string of exactly `size` bytes (quotes included): the content
/// of a message of that size.
pub fn json_string(size: usize) -> String {
    let mut s = String::with_capacity(size);
    s.push('"');
    s.extend((0..size.saturating_sub(2)).map(|i| (b'a' + (i % 26) as u8) as char));
    s.push('"');
    s
}

/// Queues `content` to `peer`, writing the outbox out while it is full.
pub fn queue(tx: &mut Client, peer: &str, content: &str) {
    loop {
        match tx.queue_json(peer, content) {
            Ok(()) => return,
            Err(Error::WouldBlock { .. }) => tx.flush_pending(Some(WAIT)).unwrap(),
            Err(e) => panic!("queue_json: {e}"),
        }
    }
}

/// The echo end of a ping-pong, on its own thread: sends every message
/// back to its sender until the content `0` arrives. It reads in place,
/// as the pinging side does (`Client::receive`), copying each message's
/// sender and content into buffers it reuses, then answers.
pub fn spawn_echo(mut echo: Client) -> JoinHandle<()> {
    std::thread::spawn(move || {
        let mut replies: Vec<(String, String)> = Vec::with_capacity(64);
        loop {
            let mut n = 0;
            for m in &echo.receive(WAIT).unwrap() {
                if n == replies.len() {
                    replies.push(Default::default());
                }
                let (to, content) = &mut replies[n];
                to.clear();
                to.push_str(m.from());
                content.clear();
                content.push_str(m.content_json());
                n += 1;
            }
            for (to, content) in &replies[..n] {
                if content == "0" {
                    echo.disconnect(None).unwrap();
                    return;
                }
                echo.send_json(to, content).unwrap();
            }
        }
    })
}

/// Raises the soft descriptor limit to the hard one; returns the limit
/// now in force (0 if it could not be read).
pub fn raise_fd_limit() -> u64 {
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

/// This process's resident set size in bytes.
pub fn rss_bytes() -> usize {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap();
    let pages: usize = statm.split_whitespace().nth(1).unwrap().parse().unwrap();
    // SAFETY: sysconf has no preconditions.
    pages * unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as usize
}

/// Environment of the idle-clients child: the socket to connect to and
/// how many connections to hold.
pub const IDLE_SOCKET_ENV: &str = "IPCM_IDLE_SOCKET";
/// See [`IDLE_SOCKET_ENV`].
pub const IDLE_COUNT_ENV: &str = "IPCM_IDLE_COUNT";

/// Child role: opens the connections [`IDLE_SOCKET_ENV`] and
/// [`IDLE_COUNT_ENV`] ask for, says hello on each (Binary), prints `ready`
/// and holds them until its stdin closes.
pub fn hold_idle_clients() {
    raise_fd_limit();
    let socket = std::env::var(IDLE_SOCKET_ENV).unwrap();
    let count: usize = std::env::var(IDLE_COUNT_ENV).unwrap().parse().unwrap();
    let mut conns = Vec::with_capacity(count);
    for i in 0..count {
        let mut s = loop {
            match UnixStream::connect(&socket) {
                Ok(s) => break s,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    std::thread::sleep(Duration::from_millis(1))
                }
                Err(e) => panic!("connect {i}: {e}"),
            }
        };
        let mut payload = bytes::BytesMut::new();
        Serializer::Binary.encode_hello(&format!("idle{i}"), &mut payload);
        let mut frame = bytes::BytesMut::new();
        ipcm::internals::encode_frame(&payload, &mut frame).unwrap();
        s.write_all(&frame).unwrap();
        conns.push(s);
    }
    println!("ready");
    std::io::stdout().flush().unwrap();
    let mut sink = Vec::new();
    let _ = std::io::stdin().read_to_end(&mut sink);
}

/// What [`measure_idle`] saw.
pub struct IdleRun {
    /// The listener's RSS before the connections, in bytes.
    pub before: usize,
    /// Its RSS with them, in bytes.
    pub after: usize,
    /// Connections that said hello within the time allowed.
    pub connected: usize,
    /// How the child ended.
    pub status: std::io::Result<ExitStatus>,
}

impl IdleRun {
    /// RSS growth per connection, in bytes.
    pub fn per_connection(&self) -> f64 {
        self.after.saturating_sub(self.before) as f64 / self.connected.max(1) as f64
    }
}

/// Measures the listener `rx` (on the route of `info`) while a child,
/// `child` running [`hold_idle_clients`], holds `count` idle connections
/// to it. Fixed costs (a peer, a message, warm pools) are paid first.
pub fn measure_idle(rx: &mut Client, info: &Info, count: usize, mut child: Command) -> IdleRun {
    let mut batch = Vec::new();
    {
        let mut warm = Client::connect(info, "warm", Options::new().listen(false)).unwrap();
        warm.send_json(rx.id(), "1").unwrap();
        rx.get_messages_timeout_into(&mut batch, Duration::from_secs(5))
            .unwrap();
        assert_eq!(batch.len(), 1, "the warm-up message");
        warm.disconnect(None).unwrap();
        for _ in 0..5 {
            rx.get_messages_into(&mut batch).unwrap();
        }
    }
    let before = rss_bytes();
    let mut child = child
        .env(IDLE_SOCKET_ENV, rx.path())
        .env(IDLE_COUNT_ENV, count.to_string())
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
    while rx.connections().len() < count && Instant::now() < deadline {
        rx.get_messages_timeout_into(&mut batch, Duration::from_millis(20))
            .unwrap();
    }
    let connected = rx.connections().len();
    let after = rss_bytes();
    drop(child.stdin.take());
    let status = child.wait();
    assert!(
        batch.iter().all(|m| m.from() == "warm"),
        "only the warm-up message arrives"
    );
    IdleRun {
        before,
        after,
        connected,
        status,
    }
}
