//! Backend choice, fallback, wake-ups and resource hygiene on each backend.

#[macro_use]
mod common;

use std::time::{Duration, Instant};

use common::{ROLE_ENV, TestRoute, drain_for, helper_command, poll, refuse_syscall};
use ipcm::internals::{Reactor, make_backend};
use ipcm::{BackendChoice, BackendKind, io_uring_available};
use ipcm::{Client, Error, Info, Options, Serializer};

/// Helper process. `no_io_uring`: io_uring is refused by seccomp; checks
/// every way of choosing a backend. `report_backend`: prints the backend
/// `Auto` picks under the inherited environment.
#[test]
#[ignore = "helper process entry, run by the tests of this file"]
fn helper_process_entry() {
    let Ok(role) = std::env::var(ROLE_ENV) else {
        return;
    };
    if role == "flood" {
        flood_and_hold();
        return;
    }
    let info = Info::parse(&std::env::var("IPCM_INFO").unwrap()).unwrap();
    if role == "report_backend" {
        let c = Client::connect(&info, "probe", Options::new()).unwrap();
        println!("backend={}", c.backend());
        return;
    }
    assert_eq!(role, "no_io_uring");
    refuse_syscall(libc::SYS_io_uring_setup);
    let reason = io_uring_available().unwrap_err();
    assert_eq!(reason.raw_os_error(), Some(libc::EPERM), "{reason}");
    // Auto falls back to epoll, observably.
    let c = Client::connect(&info, "auto", Options::new()).unwrap();
    assert_eq!(c.backend(), BackendKind::Epoll);
    // Forcing io_uring is a clear error, not a silent fallback.
    let err = Client::connect(
        &info,
        "forced",
        Options::new().backend(BackendChoice::IoUring),
    )
    .unwrap_err();
    assert!(matches!(
        err,
        Error::BackendUnavailable {
            backend: BackendKind::IoUring,
            ..
        }
    ));
    let text = err.to_string();
    assert!(
        text.starts_with("the io_uring backend is unavailable: "),
        "{text}"
    );
    assert!(text.contains("Operation not permitted"), "{text}");
    assert!(!std::path::Path::new(&format!("{}/forced", info.route)).exists());
    println!("fallback checks passed");
}

#[test]
fn falls_back_to_epoll_when_io_uring_setup_is_refused() {
    let t = TestRoute::new(BackendChoice::Auto);
    let out = helper_command("no_io_uring")
        .env("IPCM_INFO", t.info().to_info_string())
        .env_remove("IPCM_BACKEND")
        .stdout(std::process::Stdio::piped())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "helper failed: {:?}\n{stdout}\n{stderr}",
        out.status
    );
    assert!(stdout.contains("fallback checks passed"), "{stdout}");
}

#[test]
fn environment_variable_picks_the_backend_under_auto() {
    // Checked in a child so that the variable does not leak into other tests.
    for (value, want) in [("epoll", "epoll"), ("io_uring", "io_uring"), ("auto", "")] {
        if want == "io_uring" && io_uring_available().is_err() {
            eprintln!("skipped {value}: io_uring unavailable");
            continue;
        }
        let t = TestRoute::new(BackendChoice::Auto);
        let out = helper_command("report_backend")
            .env("IPCM_INFO", t.info().to_info_string())
            .env("IPCM_BACKEND", value)
            .stdout(std::process::Stdio::piped())
            .output()
            .unwrap();
        let got = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{value}: {:?} {got} {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        // libtest prints "test name ... " before the helper's own output.
        let line = got
            .split_whitespace()
            .find(|w| w.starts_with("backend="))
            .unwrap_or("");
        if want.is_empty() {
            assert!(
                line == "backend=epoll" || line == "backend=io_uring",
                "{got}"
            );
        } else {
            assert_eq!(line, format!("backend={want}"));
        }
    }
}

#[test]
fn backend_choice_parses_names() {
    assert_eq!(
        BackendChoice::parse("io_uring"),
        Some(BackendChoice::IoUring)
    );
    assert_eq!(BackendChoice::parse("EPOLL"), Some(BackendChoice::Epoll));
    assert_eq!(BackendChoice::parse("auto"), Some(BackendChoice::Auto));
    assert_eq!(BackendChoice::parse("kqueue"), None);
}

/// Busy polling: waits spin instead of sleeping, yet deliver the same
/// messages; `queue_json` + `flush_pending` write everything before
/// returning; `get_messages_into` appends after what the vector holds.
fn busy_polling_and_batch_apis_deliver_everything(backend: BackendChoice) {
    let t = TestRoute::new(backend);
    let info = Info::new(Serializer::Binary, t.route.path());
    let opts = Options::new().backend(backend).busy_poll(true);
    let mut rx = Client::connect(&info, "rx", opts.clone()).unwrap();
    let mut tx = Client::connect(&info, "tx", opts.listen(false)).unwrap();
    for i in 0..1000 {
        tx.queue_json("rx", &i.to_string()).unwrap();
    }
    assert!(matches!(
        tx.queue_json("rx", "  "),
        Err(Error::ContentRequired)
    ));
    assert!(matches!(
        tx.queue_json("rx", "null"),
        Err(Error::ContentRequired)
    ));
    tx.flush_pending(Some(Duration::from_secs(10))).unwrap();
    assert!(!tx.have_pending_sends());
    let mut inbox = Vec::new();
    let first = {
        // A message already in the vector stays first.
        tx.send_json("rx", "\"marker\"").unwrap();
        rx.get_messages_timeout_into(&mut inbox, Duration::from_secs(10))
            .unwrap()
    };
    assert!(first >= 1);
    let start = Instant::now();
    while inbox.len() < 1001 && start.elapsed() < Duration::from_secs(10) {
        let before = inbox.len();
        let n = rx
            .get_messages_timeout_into(&mut inbox, Duration::from_millis(100))
            .unwrap();
        assert_eq!(inbox.len(), before + n);
    }
    let got: Vec<&str> = inbox.iter().map(|m| m.content_json()).collect();
    let mut want: Vec<String> = (0..1000).map(|i| i.to_string()).collect();
    want.push("\"marker\"".into());
    assert_eq!(got, want, "every message, in send order");
    // A busy-polling wait with nothing to receive still ends at its timeout.
    let t0 = Instant::now();
    assert_eq!(
        rx.get_messages_timeout_into(&mut inbox, Duration::from_millis(50))
            .unwrap(),
        0
    );
    assert!(t0.elapsed() >= Duration::from_millis(50));
    tx.disconnect(None).unwrap();
    rx.disconnect(None).unwrap();
}

/// Request/response traffic: on io_uring, a connection read and then
/// written turn by turn is waited on directly (an edge-triggered epoll
/// beside the ring). Nothing may be lost on that path: a message larger
/// than a receive buffer (reads that fill the buffer raise no new edge),
/// a burst behind it, a reactor thread woken to send while it waits there,
/// and a peer that leaves and comes back under the same name.
fn conversations_lose_nothing_on_hot_connections(backend: BackendChoice) {
    let t = TestRoute::new(backend);
    let info = Info::new(Serializer::Binary, t.route.path());
    let opts = Options::new().backend(backend);
    let wait = Duration::from_secs(10);
    let mut a = Client::connect(&info, "a", opts.clone()).unwrap();
    let mut b = Client::connect(&info, "b", opts.clone()).unwrap();
    let take_one = |c: &mut Client| {
        let mut got = Vec::new();
        let start = Instant::now();
        while got.is_empty() && start.elapsed() < wait {
            c.get_messages_timeout_into(&mut got, wait).unwrap();
        }
        assert_eq!(got.len(), 1, "exactly one reply");
        got.pop().unwrap()
    };
    for i in 0..50 {
        a.send_json("b", &i.to_string()).unwrap();
        let m = take_one(&mut b);
        assert_eq!(m.content_json(), i.to_string());
        b.send_json("a", &(i + 1000).to_string()).unwrap();
        assert_eq!(take_one(&mut a).content_json(), (i + 1000).to_string());
    }
    // A burst that fits in the socket, all written before `a` reads: the
    // reads that fill a buffer leave data behind with no edge to come.
    a.send_json("b", "\"go\"").unwrap();
    assert_eq!(take_one(&mut b).content_json(), "\"go\"");
    let body = "y".repeat(100);
    for i in 0..600 {
        b.queue_json("a", &format!("\"{i} {body}\"")).unwrap();
    }
    b.flush_pending(Some(wait)).unwrap();
    let mut inbox = Vec::new();
    let start = Instant::now();
    while inbox.len() < 600 && start.elapsed() < wait {
        a.get_messages_timeout_into(&mut inbox, Duration::from_millis(200))
            .unwrap();
    }
    assert_eq!(inbox.len(), 600);
    for (i, m) in inbox.iter().enumerate() {
        assert_eq!(m.content_json(), format!("\"{i} {body}\""));
    }
    // One message larger than a receive buffer, all in the socket before
    // `a` waits once: the first read fills its buffer and leaves the rest
    // with no edge to come; the wait must read on, not sleep.
    a.send_json("b", "\"go\"").unwrap();
    assert_eq!(take_one(&mut b).content_json(), "\"go\"");
    let large = format!("\"{}\"", "z".repeat(120 * 1024));
    b.send_json("a", &large).unwrap();
    b.flush_pending(Some(wait)).unwrap();
    let mut got = Vec::new();
    let t0 = Instant::now();
    a.get_messages_timeout_into(&mut got, Duration::from_secs(5))
        .unwrap();
    assert_eq!(got.len(), 1, "the whole message in one wait");
    assert_eq!(got[0].content_json(), large);
    assert!(t0.elapsed() < Duration::from_secs(2), "{:?}", t0.elapsed());
    // A 300 KiB message, then a burst, while `a` waits.
    let big = format!("\"{}\"", "x".repeat(300 * 1024));
    let sender = {
        let big = big.clone();
        std::thread::spawn(move || {
            b.send_json("a", &big).unwrap();
            for i in 0..500 {
                b.queue_json("a", &i.to_string()).unwrap();
            }
            b.flush_pending(Some(wait)).unwrap();
            b
        })
    };
    let mut inbox = Vec::new();
    let start = Instant::now();
    while inbox.len() < 501 && start.elapsed() < wait {
        a.get_messages_timeout_into(&mut inbox, Duration::from_millis(200))
            .unwrap();
    }
    let b = sender.join().unwrap();
    assert_eq!(inbox.len(), 501);
    assert_eq!(inbox[0].content_json(), big);
    for (i, m) in inbox[1..].iter().enumerate() {
        assert_eq!(m.content_json(), i.to_string());
    }
    // `b`'s reactor on its own thread: each reply it sends must wake it
    // from its wait.
    let (mut tx, mut rx, handle) = b.into_threaded().unwrap();
    for i in 0..20 {
        a.send_json("b", &i.to_string()).unwrap();
        let m = rx.recv_timeout(wait).expect("request reaches b");
        assert_eq!(m.content_json(), i.to_string());
        tx.send("a", &(i + 2000)).unwrap();
        assert_eq!(take_one(&mut a).content_json(), (i + 2000).to_string());
    }
    handle.shutdown().unwrap();
    // `b` is gone: a wait ends at its timeout; a new `b` is served.
    let t0 = Instant::now();
    let mut none = Vec::new();
    a.get_messages_timeout_into(&mut none, Duration::from_millis(100))
        .unwrap();
    assert!(none.is_empty());
    assert!(t0.elapsed() < Duration::from_secs(5));
    let mut b = Client::connect(&info, "b", opts).unwrap();
    for i in 0..5 {
        b.send_json("a", &i.to_string()).unwrap();
        assert_eq!(take_one(&mut a).content_json(), i.to_string());
        a.send_json("b", &(i + 3000).to_string()).unwrap();
        assert_eq!(take_one(&mut b).content_json(), (i + 3000).to_string());
    }
    b.disconnect(None).unwrap();
    a.disconnect(None).unwrap();
}

/// The inbox limit bounds each batch, even when many connections have data
/// waiting at once (a thousand senders accepted together once brought a
/// full buffer each into one batch: 63 MB against a 4 MiB limit). The rest
/// follows in later calls, nothing lost or reordered; and a caller that
/// polls `handles_for_select` before each `get_messages` is woken for it.
fn inbox_limit_bounds_each_batch_and_the_rest_follows(backend: BackendChoice) {
    const SENDERS: usize = 40;
    const EACH: usize = 100;
    const LIMIT: usize = 256 * 1024;
    let t = TestRoute::new(backend);
    let info = Info::new(Serializer::Binary, t.route.path());
    let mut opts = Options::new().backend(backend);
    opts.limits.inbox_limit = LIMIT;
    let buf_size = opts.limits.buf_size;
    let mut rx = Client::connect(&info, "rx", opts.clone()).unwrap();
    let body = "q".repeat(1000);
    let mut senders = Vec::new();
    for s in 0..SENDERS {
        let mut tx = Client::connect(&info, &format!("tx{s}"), opts.clone().listen(false)).unwrap();
        for i in 0..EACH {
            tx.queue_json("rx", &format!("\"{s} {i} {body}\"")).unwrap();
        }
        tx.flush_pending(Some(Duration::from_secs(10))).unwrap();
        senders.push(tx);
    }
    // Everything waits in the sockets before `rx` first looks.
    let mut next = vec![0usize; SENDERS];
    let mut total = 0;
    let mut batches = 0;
    let deadline = Instant::now() + Duration::from_secs(20);
    while total < SENDERS * EACH {
        assert!(Instant::now() < deadline, "only {total} messages arrived");
        if batches > 0 {
            let mut pfd = libc::pollfd {
                fd: std::os::fd::AsRawFd::as_raw_fd(&rx.handles_for_select()),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: polls one live pollfd.
            let n = unsafe { libc::poll(&mut pfd, 1, 5000) };
            assert_eq!(
                n,
                1,
                "not woken with {total} of {} messages",
                SENDERS * EACH
            );
        }
        let got = rx.get_messages().unwrap();
        batches += 1;
        let bytes: usize = got.iter().map(|m| m.content_json().len() + 100).sum();
        assert!(
            bytes <= LIMIT + 2 * buf_size,
            "a batch of {bytes} bytes against an inbox limit of {LIMIT}"
        );
        for m in &got {
            let c = m.content_json();
            let mut it = c.trim_matches('"').split(' ');
            let s: usize = it.next().unwrap().parse().unwrap();
            let i: usize = it.next().unwrap().parse().unwrap();
            assert_eq!(i, next[s], "sender {s}: in order, none lost or repeated");
            next[s] += 1;
        }
        total += got.len();
    }
    assert!(batches >= 4, "{batches} batches for {} KiB", SENDERS * EACH);
    assert_eq!(next, vec![EACH; SENDERS]);
    for mut tx in senders {
        tx.disconnect(None).unwrap();
    }
    rx.disconnect(None).unwrap();
}

/// A peer that converses (so its connection is waited on directly on
/// io_uring) and then dies in the middle of a frame: the listener drops the
/// partial frame, keeps every complete message, does not hang, and reports
/// the peer gone when it next sends to it.
fn a_conversing_peer_that_dies_mid_frame_loses_nothing_complete(backend: BackendChoice) {
    use std::io::{Read, Write};
    let t = TestRoute::new(backend);
    let info = Info::new(Serializer::Binary, t.route.path());
    let mut a = Client::connect(&info, "a", Options::new().backend(backend)).unwrap();
    let mut p = std::os::unix::net::UnixStream::connect(a.path()).unwrap();
    p.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let frame = |payload: &[u8]| {
        let mut out = bytes::BytesMut::new();
        ipcm::internals::encode_frame(payload, &mut out).unwrap();
        out
    };
    let mut hello = bytes::BytesMut::new();
    Serializer::Binary.encode_hello("p", &mut hello);
    p.write_all(&frame(&hello)).unwrap();
    let wait = Duration::from_secs(10);
    for i in 0..20 {
        let mut payload = bytes::BytesMut::new();
        Serializer::Binary
            .encode_payload("p", "a", &i.to_string(), &mut payload)
            .unwrap();
        p.write_all(&frame(&payload)).unwrap();
        let mut got = Vec::new();
        while got.is_empty() {
            a.get_messages_timeout_into(&mut got, wait).unwrap();
        }
        assert_eq!(got[0].content_json(), i.to_string());
        // `a` answers over the same connection.
        a.send_json("p", &(i + 100).to_string()).unwrap();
        let mut len = [0u8; 4];
        p.read_exact(&mut len).unwrap();
        let mut body = vec![0u8; u32::from_be_bytes(len) as usize];
        p.read_exact(&mut body).unwrap();
        let mut ms = Vec::new();
        Serializer::Binary
            .decode_payloads(&bytes::Bytes::from(body), "a", "p", &mut ms)
            .unwrap();
        assert_eq!(ms.len(), 1, "one message in the batch");
        assert_eq!(ms[0].content_json(), (i + 100).to_string());
        assert_eq!((ms[0].from(), ms[0].to()), ("a", Some("p")));
    }
    // One complete message, then half of the next, then gone.
    let mut last = bytes::BytesMut::new();
    Serializer::Binary
        .encode_payload("p", "a", "\"last\"", &mut last)
        .unwrap();
    let mut cut = bytes::BytesMut::new();
    Serializer::Binary
        .encode_payload("p", "a", "\"never complete\"", &mut cut)
        .unwrap();
    let cut = frame(&cut);
    let mut bytes = frame(&last).to_vec();
    bytes.extend_from_slice(&cut[..cut.len() / 2]);
    p.write_all(&bytes).unwrap();
    drop(p);
    let mut got = Vec::new();
    let start = Instant::now();
    while got.is_empty() && start.elapsed() < wait {
        a.get_messages_timeout_into(&mut got, wait).unwrap();
    }
    let contents: Vec<&str> = got.iter().map(|m| m.content_json()).collect();
    assert_eq!(contents, ["\"last\""]);
    // Nothing more arrives, and the wait ends on time.
    let t0 = Instant::now();
    let mut none = Vec::new();
    a.get_messages_timeout_into(&mut none, Duration::from_millis(200))
        .unwrap();
    assert!(none.is_empty());
    assert!(t0.elapsed() < Duration::from_secs(5));
    // `p` had no socket of its own: with its connection gone, a send fails.
    let deadline = Instant::now() + wait;
    loop {
        match a.send_json("p", "1") {
            Err(_) => break,
            Ok(()) => {
                assert!(
                    Instant::now() < deadline,
                    "sends to a dead peer keep succeeding"
                );
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
    a.disconnect(None).unwrap();
}

/// `SO_SNDBUF` as the kernel reports it for a request of `asked` bytes
/// (capped at `wmem_max`, then doubled), or with none (`wmem_default`).
fn expected_sndbuf(asked: Option<usize>) -> usize {
    let sysctl = |name: &str| -> usize {
        std::fs::read_to_string(format!("/proc/sys/net/core/{name}"))
            .unwrap()
            .trim()
            .parse()
            .unwrap()
    };
    match asked {
        Some(bytes) => 2 * bytes.min(sysctl("wmem_max")),
        None => sysctl("wmem_default"),
    }
}

fn sndbuf(fd: std::os::fd::BorrowedFd<'_>) -> usize {
    rustix::net::sockopt::socket_send_buffer_size(fd).unwrap()
}

/// `from` sends `content` to `to` (named `to_name`) `times` times, and `to`
/// receives them all.
fn exchange(from: &mut Client, to: &mut Client, to_name: &str, content: &str, times: usize) {
    for _ in 0..times {
        from.send_message(to_name, content).unwrap();
    }
    assert_eq!(poll(to, times).len(), times);
}

fn large_messages_get_the_large_socket_send_buffer_and_small_runs_give_it_back(
    backend: BackendChoice,
) {
    let big = "x".repeat(4096);
    for asked in [
        Some(ipcm::internals::DEFAULT_SOCKET_SEND_BUFFER),
        Some(96 * 1024),
        None,
    ] {
        let t = TestRoute::new(backend);
        // The socket carries the messages (a lane would take them after
        // its first 64 KiB).
        let opts = t.opts().socket_send_buffer(asked).lane(false);
        let info = t.info();
        let mut a = Client::connect(&info, "a", opts.clone()).unwrap();
        let mut b = Client::connect(&info, "b", opts).unwrap();
        let default = expected_sndbuf(None);
        let large = asked.map_or(default, |_| expected_sndbuf(asked));
        let ends = |a: &Client, b: &Client| {
            (
                sndbuf(a.connection_handle("b").expect("a's connection")),
                sndbuf(b.connection_handle("a").expect("b's connection")),
            )
        };
        // Small messages both ways: both ends keep the default.
        exchange(&mut a, &mut b, "b", "ping", 1);
        exchange(&mut b, &mut a, "a", "pong", 1);
        assert_eq!(
            ends(&a, &b),
            (default, default),
            "{backend:?} {asked:?}: small"
        );
        // Large messages: their sender's socket (here the connecting end)
        // gets the large buffer from its next write on; the other end
        // does not.
        exchange(&mut a, &mut b, "b", &big, 2);
        assert_eq!(
            ends(&a, &b),
            (large, default),
            "{backend:?} {asked:?}: large from a"
        );
        // So does the accepting end once it sends one.
        exchange(&mut b, &mut a, "a", &big, 2);
        assert_eq!(
            ends(&a, &b),
            (large, large),
            "{backend:?} {asked:?}: large both ways"
        );
        // A long run of small messages gives it back; nothing is lost.
        // (Read as they go: a blocking send waits for a reader.)
        let mut got = Vec::new();
        for i in 0..=4096u32 {
            a.send_message("b", &i).unwrap();
            if i % 256 == 255 || i == 4096 {
                got.extend(poll(&mut b, if i == 4096 { 1 } else { 256 }));
            }
        }
        let got: Vec<u32> = got.iter().map(|m| m.content().unwrap()).collect();
        assert_eq!(got, (0..=4096).collect::<Vec<u32>>());
        assert_eq!(
            ends(&a, &b),
            (default, large),
            "{backend:?} {asked:?}: small run from a"
        );
        a.disconnect(None).unwrap();
        b.disconnect(None).unwrap();
    }
}

/// Voluntary context switches of the calling thread so far: the times it
/// slept in the kernel.
fn thread_sleeps() -> i64 {
    let mut u = std::mem::MaybeUninit::<libc::rusage>::zeroed();
    // SAFETY: `getrusage` writes one `rusage` through the pointer, which
    // points to one (zeroed, so initialised whatever it writes).
    let rc = unsafe { libc::getrusage(libc::RUSAGE_THREAD, u.as_mut_ptr()) };
    assert_eq!(rc, 0, "getrusage(RUSAGE_THREAD)");
    // SAFETY: zeroed above, then filled in.
    unsafe { u.assume_init() }.ru_nvcsw
}

/// A wait looks for work for `spin_before_sleep` before it sleeps: a
/// message that comes meanwhile is taken without sleeping; with no spin
/// the wait sleeps; and the spin never keeps a wait past its timeout.
fn a_wait_spins_before_it_sleeps_and_never_past_its_timeout(backend: BackendChoice) {
    let t = TestRoute::new(backend);
    for (spin, sleeps) in [(Duration::ZERO, true), (Duration::from_secs(5), false)] {
        // On the socket (a lane's wait watches its ring instead).
        let opts = t.opts().spin_before_sleep(spin).lane(false);
        let mut rx = Client::connect(&t.info(), "rx", opts.clone()).unwrap();
        let mut tx = Client::connect(&t.info(), "tx", opts.listen(false)).unwrap();
        tx.send_message("rx", "warm").unwrap();
        assert_eq!(poll(&mut rx, 1).len(), 1);
        let sender = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(20));
            tx.send_message("rx", "late").unwrap();
            tx
        });
        let before = thread_sleeps();
        let got = rx.get_messages_timeout(Duration::from_secs(10)).unwrap();
        let slept = thread_sleeps() - before;
        assert_eq!(got.len(), 1, "{backend:?} {spin:?}");
        assert_eq!(got[0].content::<String>().unwrap(), "late");
        assert_eq!(
            slept > 0,
            sleeps,
            "{backend:?} spin {spin:?}: {slept} sleeps while waiting"
        );
        // Nothing comes: a 50 ms wait ends after 50 ms, however long the
        // spin.
        let start = Instant::now();
        assert!(
            rx.get_messages_timeout(Duration::from_millis(50))
                .unwrap()
                .is_empty()
        );
        let took = start.elapsed();
        assert!(
            took >= Duration::from_millis(50) && took < Duration::from_secs(2),
            "{backend:?} spin {spin:?}: a 50 ms wait took {took:?}"
        );
        let mut tx = sender.join().unwrap();
        tx.disconnect(None).unwrap();
        rx.disconnect(None).unwrap();
    }
}

per_backend!(
    large_messages_get_the_large_socket_send_buffer_and_small_runs_give_it_back,
    a_conversing_peer_that_dies_mid_frame_loses_nothing_complete,
    inbox_limit_bounds_each_batch_and_the_rest_follows,
    conversations_lose_nothing_on_hot_connections,
    busy_polling_and_batch_apis_deliver_everything,
    waker_interrupts_a_blocking_wait_and_is_free_when_awake,
);

// These count the whole process's descriptors or CPU time, or a thread's
// context switches: each runs in a process of its own.
per_backend_isolated!(
    a_wait_spins_before_it_sleeps_and_never_past_its_timeout,
    ten_thousand_connection_cycles_leak_nothing,
    client_create_drop_cycles_leak_no_descriptors,
    idle_reactor_uses_no_cpu,
    peers_closing_before_their_hello_release_descriptors_during_a_blocking_wait,
    descriptor_exhaustion_backs_off_and_recovers,
);

fn waker_interrupts_a_blocking_wait_and_is_free_when_awake(b: BackendChoice) {
    let core = ipcm::internals::Core::new(Serializer::Json, Default::default());
    let mut reactor = Reactor::new(core, make_backend(b).map_err(|e| e.reason).unwrap());
    let waker = reactor.waker();
    assert!(!waker.wake(), "no syscall while the reactor is awake");
    // That wake is consumed by the next wait, which must not block.
    let start = Instant::now();
    reactor.turn(Some(Duration::from_secs(5))).unwrap();
    assert!(start.elapsed() < Duration::from_secs(1));
    let w = waker.clone();
    let t = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(100));
        w.wake()
    });
    let start = Instant::now();
    reactor.turn(None).unwrap();
    let slept = start.elapsed();
    assert!(t.join().unwrap(), "a sleeping reactor needs the eventfd");
    assert!(
        slept >= Duration::from_millis(50) && slept < Duration::from_secs(5),
        "{slept:?}"
    );
}

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

fn ten_thousand_connection_cycles_leak_nothing(b: BackendChoice) {
    let t = TestRoute::new(b);
    let mut srv = t.connect("srv");
    let mut cli = t.connect_nl("cli");
    // Warm up pools and lazily opened descriptors.
    for i in 0..50 {
        cli.send_message("srv", &i).unwrap();
        cli.disconnect_connection("srv");
        srv.get_messages().unwrap();
    }
    drain_for(&mut srv, Duration::from_millis(50));
    let fds = open_fds();
    let before = srv.resources();
    let mut got = 0;
    for i in 0..10_000u32 {
        cli.send_message("srv", &i).unwrap();
        assert!(cli.disconnect_connection("srv"));
        got += srv.get_messages().unwrap().len();
    }
    while got < 10_000 {
        let more = srv.get_messages_timeout(Duration::from_secs(5)).unwrap();
        assert!(!more.is_empty(), "{got} of 10000 arrived");
        got += more.len();
    }
    drain_for(&mut srv, Duration::from_millis(100));
    let after = srv.resources();
    assert_eq!(after.connections, 0, "every closed connection was dropped");
    assert!(
        after.backend_buffers <= before.backend_buffers.max(64),
        "{before:?} -> {after:?}"
    );
    assert!(after.pooled_buffers <= 64, "{after:?}");
    assert_eq!(cli.resources().connections, 0);
    let now = open_fds();
    assert!(now <= fds, "descriptors {fds} -> {now}");
}

fn client_create_drop_cycles_leak_no_descriptors(b: BackendChoice) {
    let t = TestRoute::new(b);
    let mut srv = t.connect("srv");
    {
        let mut c = t.connect_nl("warm");
        c.send_message("srv", "x").unwrap();
    }
    poll(&mut srv, 1);
    let fds = open_fds();
    for i in 0..200 {
        let mut c =
            Client::connect(&t.info(), &format!("c{i}"), t.opts().listen(i % 2 == 0)).unwrap();
        c.send_message("srv", &i).unwrap();
        drop(c);
    }
    let got = drain_for(&mut srv, Duration::from_millis(300));
    assert_eq!(got.len(), 200);
    let now = open_fds();
    assert!(now <= fds, "descriptors {fds} -> {now}");
}

fn thread_cpu() -> Duration {
    let ts = rustix::time::clock_gettime(rustix::time::ClockId::ThreadCPUTime);
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

fn idle_reactor_uses_no_cpu(b: BackendChoice) {
    let t = TestRoute::new(b);
    let mut srv = t.connect("srv");
    let mut peers: Vec<Client> = (0..20).map(|i| t.connect_nl(&format!("p{i}"))).collect();
    for p in &mut peers {
        p.send_message("srv", "hello").unwrap();
    }
    assert_eq!(poll(&mut srv, 20).len(), 20);
    let cpu = thread_cpu();
    let start = Instant::now();
    let msgs = srv.get_messages_timeout(Duration::from_secs(1)).unwrap();
    assert!(msgs.is_empty());
    assert!(start.elapsed() >= Duration::from_millis(990));
    let used = thread_cpu() - cpu;
    assert!(
        used < Duration::from_millis(10),
        "idle second cost {used:?} of CPU"
    );
}

/// Helper role `flood`: connects up to `IPCM_FLOOD_COUNT` sockets to
/// `IPCM_FLOOD_PATH` (never saying hello; refused ones are skipped),
/// prints how many connected, and holds them until its stdin closes.
fn flood_and_hold() {
    use std::io::{Read, Write};
    use std::os::unix::net::UnixStream;
    let path = std::env::var("IPCM_FLOOD_PATH").unwrap();
    let n: usize = std::env::var("IPCM_FLOOD_COUNT").unwrap().parse().unwrap();
    // The parent lowered its limit; this process needs room for the flood.
    set_fd_limit(u64::MAX);
    let held: Vec<UnixStream> = (0..n)
        .filter_map(|_| UnixStream::connect(&path).ok())
        .collect();
    let mut out = std::io::stdout();
    writeln!(out, "connected {}", held.len()).unwrap();
    out.flush().unwrap();
    let mut rest = Vec::new();
    let _ = std::io::stdin().read_to_end(&mut rest);
    drop(held);
}

/// A listener `srv` that has served one client already, so the lazily
/// opened descriptors (pools, eventfds) exist before anything is counted.
fn warm_listener(t: &TestRoute) -> Client {
    let mut srv = t.connect("srv");
    let mut warm = t.connect_nl("warm");
    warm.send_message("srv", "warm").unwrap();
    warm.disconnect(None).unwrap();
    poll(&mut srv, 1);
    drain_for(&mut srv, Duration::from_millis(50));
    srv
}

/// Waits up to `limit` for `cond`; whether it came true.
fn eventually(limit: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Peers that connect and close without a hello: the listener, blocked in
/// a long wait with no other traffic, releases their descriptors at once
/// (not at its next wake-up, nor at the hello timeout).
fn peers_closing_before_their_hello_release_descriptors_during_a_blocking_wait(b: BackendChoice) {
    use std::os::unix::net::UnixStream;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    const PEERS: usize = 300;
    let t = TestRoute::new(b);
    let mut srv = warm_listener(&t);
    let base = open_fds();
    let stop = Arc::new(AtomicBool::new(false));
    let server = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            while !stop.load(Ordering::SeqCst) {
                // Long waits: only I/O ends them.
                srv.get_messages_timeout(Duration::from_secs(20)).unwrap();
            }
            srv
        })
    };
    let peers: Vec<UnixStream> = (0..PEERS)
        .map(|_| UnixStream::connect(t.file("srv")).unwrap())
        .collect();
    assert!(
        eventually(Duration::from_secs(10), || open_fds() >= base + 2 * PEERS),
        "the listener accepted them all: {base} -> {}",
        open_fds()
    );
    drop(peers);
    let start = Instant::now();
    let released = eventually(Duration::from_secs(2), || open_fds() <= base);
    let now = open_fds();
    eprintln!(
        "{b:?}: {PEERS} closed peers: descriptors {base} -> {now} after {:?}",
        start.elapsed()
    );
    assert!(
        released,
        "descriptors {base} -> {now}: closed connections still held 2 s after their EOF"
    );
    stop.store(true, Ordering::SeqCst);
    let mut c = t.connect_nl("wake");
    c.send_message("srv", "stop").unwrap();
    let mut srv = server.join().unwrap();
    assert!(srv.connections().iter().all(|p| p == "wake"));
    c.disconnect(None).unwrap();
    drain_for(&mut srv, Duration::from_millis(20));
}

fn process_cpu() -> Duration {
    let ts = rustix::time::clock_gettime(rustix::time::ClockId::ProcessCPUTime);
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// Open descriptors below `limit + 64`, counted without opening one (as
/// reading /proc/self/fd would: impossible while they are exhausted).
fn fds_by_probe(limit: u64) -> u64 {
    (0..limit as i32 + 64)
        // SAFETY: F_GETFD only reads the descriptor's flags; an unused
        // number fails with EBADF.
        .filter(|&fd| unsafe { libc::fcntl(fd, libc::F_GETFD) } != -1)
        .count() as u64
}

fn set_fd_limit(soft: u64) {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit read and write a struct we own.
    unsafe {
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim), 0);
        lim.rlim_cur = soft.min(lim.rlim_max);
        assert_eq!(libc::setrlimit(libc::RLIMIT_NOFILE, &lim), 0);
    }
}

/// `RLIMIT_NOFILE` lowered, and a flood of connections that exhausts it:
/// the listener backs off instead of spinning, warns once, keeps its
/// socket, and serves a well-behaved client once the flood has gone.
fn descriptor_exhaustion_backs_off_and_recovers(b: BackendChoice) {
    use std::io::BufRead;
    use std::process::Stdio;
    const FLOOD: usize = 400;
    // Room for 40 more descriptors than the listener needs. Lowered before
    // the listener starts: io_uring's accept reads the limit when armed.
    let limit = open_fds() as u64 + 48;
    set_fd_limit(limit);
    let t = TestRoute::new(b);
    let mut srv = warm_listener(&t);
    let base = open_fds() as u64;
    let mut flood = helper_command("flood")
        .env("IPCM_FLOOD_PATH", t.file("srv"))
        .env("IPCM_FLOOD_COUNT", FLOOD.to_string())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    // The harness prints its own text first, on the same line too. The
    // reader stays open until the helper exits (it prints more).
    let mut report = std::io::BufReader::new(flood.stdout.take().unwrap()).lines();
    let connected: usize = report
        .by_ref()
        .map_while(Result::ok)
        .find_map(|l| l.split("connected ").nth(1)?.trim().parse().ok())
        .expect("the flood helper reports its connections");
    assert!(connected > 100, "the flood connected only {connected}");
    // While exhausted: the reactor waits, it does not spin.
    let cpu = process_cpu();
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(1) {
        srv.get_messages_timeout(Duration::from_millis(100))
            .unwrap();
    }
    let used = process_cpu() - cpu;
    let held = fds_by_probe(limit);
    let warnings = common::logged(log::Level::Warn, "accept failed");
    eprintln!(
        "{b:?}: {connected} flooding connections, limit {limit}: {held} descriptors, \
         {used:?} CPU in 1 s, {} warning(s), the first: {:?}",
        warnings.len(),
        warnings.first()
    );
    assert!(
        held >= limit - 4,
        "the limit was reached ({held} of {limit})"
    );
    assert!(
        used < Duration::from_millis(200),
        "{used:?} of CPU in 1 s while exhausted"
    );
    assert_eq!(
        warnings.len(),
        1,
        "one warning per episode, not per attempt"
    );
    // The flood goes; its connections close; the queue drains.
    drop(flood.stdin.take());
    let rest: Vec<String> = report.map_while(Result::ok).collect();
    assert!(flood.wait().unwrap().success(), "flood helper: {rest:?}");
    assert!(
        eventually(Duration::from_secs(10), || {
            srv.get_messages_timeout(Duration::from_millis(20)).unwrap();
            srv.resources().connections == 0 && fds_by_probe(limit) <= base
        }),
        "the flood's connections were all accepted and closed: {} connections, {} descriptors",
        srv.resources().connections,
        fds_by_probe(limit)
    );
    // A well-behaved client is accepted and served.
    let mut good = t.connect_nl("good");
    good.send_message("srv", "served").unwrap();
    let got = poll(&mut srv, 1);
    assert_eq!(got.len(), 1, "the listener serves again");
    assert_eq!(got[0].content::<String>().unwrap(), "served");
    assert_eq!(
        common::logged(log::Level::Warn, "accept failed").len(),
        1,
        "still one warning"
    );
    assert!(
        !common::logged(log::Level::Info, "accepting again").is_empty(),
        "recovery is logged"
    );
    good.disconnect(None).unwrap();
}
