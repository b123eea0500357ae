//! Threaded mode on each backend: receive ring, senders, backpressure,
//! shutdown, and many threads moving many messages.

#[macro_use]
mod common;

use std::collections::HashMap;
use std::os::fd::AsFd;
use std::time::{Duration, Instant};

use common::{TestRoute, poll};
use ipcm::{BackendChoice, Client, ThreadedOptions};
use serde_json::json;

/// The tests of this file that move many messages run one at a time (the
/// machine has two cores; the one that measures memory has a process of
/// its own).
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|p| p.into_inner())
}

fn readable(fd: impl AsFd, ms: i32) -> bool {
    let ts = rustix::event::Timespec {
        tv_sec: (ms / 1000) as _,
        tv_nsec: ((ms % 1000) * 1_000_000) as _,
    };
    let mut fds = [rustix::event::PollFd::new(
        &fd,
        rustix::event::PollFlags::IN,
    )];
    rustix::event::poll(&mut fds, Some(&ts)).unwrap_or(0) > 0
}

per_backend!(
    receiver_gets_messages_in_order_and_its_fd_signals,
    sender_reports_inline_errors,
    many_threads_many_messages_nothing_lost,
    shutdown_while_traffic_flows_loses_nothing_silently,
    a_threaded_reactor_reaps_a_silent_connection_on_time,
    connections_arriving_while_the_reactor_moves_are_accepted,
    a_peer_that_stops_reading_fills_the_send_queue_not_memory,
);

/// Voluntary context switches (times it slept) of this process's thread
/// named `name`, from `/proc/self/task`: that thread's own count. Threads
/// that exit while the directory is read are skipped.
fn thread_sleeps_named(name: &str) -> Option<u64> {
    std::fs::read_dir("/proc/self/task")
        .ok()?
        .flatten()
        .map(|entry| entry.path())
        .filter(|dir| std::fs::read_to_string(dir.join("comm")).is_ok_and(|c| c.trim_end() == name))
        .find_map(|dir| {
            let status = std::fs::read_to_string(dir.join("status")).ok()?;
            status
                .lines()
                .find_map(|l| l.strip_prefix("voluntary_ctxt_switches:"))
                .and_then(|v| v.trim().parse().ok())
        })
}

/// `ThreadedOptions::spin_on_sockets`: off (the default), the reactor's
/// thread sleeps at once when its sockets are quiet; on, it polls them
/// for `Options::spin_before_sleep` first, and a message that comes
/// meanwhile is taken without its sleeping.
fn the_reactor_thread_polls_sockets_before_sleeping_only_when_asked(b: BackendChoice) {
    let t = TestRoute::new(b);
    for spin_on_sockets in [false, true] {
        let id = if spin_on_sockets { "spin1" } else { "spin0" };
        // A look longer than the test: with it, the reactor's thread
        // never sleeps while the test runs.
        let opts = t
            .opts()
            .lane(false)
            .spin_before_sleep(Duration::from_secs(2));
        let rx = Client::connect(&t.info(), id, opts.clone()).unwrap();
        let (_rtx, mut rrx, handle) = rx
            .into_threaded_with(ThreadedOptions {
                spin_on_sockets,
                ..ThreadedOptions::default()
            })
            .unwrap();
        let mut tx = Client::connect(&t.info(), &format!("{id}-tx"), opts.listen(false)).unwrap();
        for m in ["first", "late"] {
            // The sockets stay quiet for 50 ms before each message.
            std::thread::sleep(Duration::from_millis(50));
            tx.send_message(id, m).unwrap();
            let got = rrx.recv_timeout(Duration::from_secs(10)).expect(m);
            assert_eq!(got.content::<String>().unwrap(), m);
        }
        let slept = thread_sleeps_named(&format!("ipcm-{id}")).expect("the reactor thread");
        assert_eq!(
            slept > 0,
            !spin_on_sockets,
            "{b:?} spin_on_sockets {spin_on_sockets}: the reactor's thread slept {slept} times"
        );
        tx.disconnect(None).unwrap();
        handle.shutdown().unwrap();
    }
}

// Measure the whole process's RSS, or read /proc/self: each in a process
// of its own.
per_backend_isolated!(
    full_ring_applies_backpressure_with_bounded_memory,
    the_reactor_thread_polls_sockets_before_sleeping_only_when_asked,
);

fn receiver_gets_messages_in_order_and_its_fd_signals(b: BackendChoice) {
    let _g = serial();
    let t = TestRoute::new(b);
    let (_tx, mut rx, handle) = t.connect("srv").into_threaded().unwrap();
    assert!(rx.try_recv().is_none());
    assert!(!readable(&rx, 0), "no readiness while the ring is empty");
    let mut a = t.connect_nl("a");
    for i in 0..1000 {
        a.send_message("srv", &i).unwrap();
    }
    assert!(readable(&rx, 5000), "the fd becomes readable");
    let mut got = Vec::new();
    while got.len() < 1000 {
        let m = rx.recv_timeout(Duration::from_secs(5)).expect("message");
        got.push(m.content::<u64>().unwrap());
        rx.recv_batch(&mut Vec::new(), 0);
    }
    assert_eq!(got, (0..1000).collect::<Vec<u64>>());
    assert!(rx.recv_timeout(Duration::from_millis(50)).is_none());
    assert!(!readable(&rx, 0), "drained: not readable");
    // Replies from the threaded side reach the inline client.
    a.send_message("srv", "ping").unwrap();
    let m = rx.recv_timeout(Duration::from_secs(5)).unwrap();
    assert_eq!(m.content_json(), "\"ping\"");
    handle.shutdown().unwrap();
    assert!(!t.file("srv").exists(), "disconnect removed the socket");
    assert!(t.file("srv.stats").exists());
}

fn sender_reports_inline_errors(b: BackendChoice) {
    let _g = serial();
    let t = TestRoute::new(b);
    let mut sink = t.connect("sink");
    let (mut tx, _rx, handle) = t.connect("src").into_threaded().unwrap();
    assert_eq!(
        tx.send("nobody", "x").unwrap_err().to_string(),
        "'nobody' is not a valid message recipient"
    );
    assert_eq!(
        tx.try_send("nobody", "x").unwrap_err().to_string(),
        "'nobody' is not a valid message recipient"
    );
    let _nl = t.connect_nl("quiet");
    assert_eq!(
        tx.send("quiet", "x").unwrap_err().to_string(),
        "no active connection to 'quiet' and peer is not listening"
    );
    tx.send("sink", "one").unwrap();
    tx.try_send("sink", "two").unwrap();
    let mut other = tx.clone();
    std::thread::spawn(move || other.send("sink", "three").unwrap())
        .join()
        .unwrap();
    let got = poll(&mut sink, 3);
    assert_eq!(got.len(), 3);
    let res = tx.broadcast(&json!({"all": 1})).unwrap();
    assert!(res["sink"].sent);
    assert!(!res["quiet"].sent);
    handle.shutdown().unwrap();
    assert!(
        tx.send("sink", "late").is_err(),
        "a stopped reactor refuses sends"
    );
}

fn many_threads_many_messages_nothing_lost(b: BackendChoice) {
    let _g = serial();
    // IPCM_THREADED_MESSAGES overrides the total (10 million by default).
    let total: u64 = std::env::var("IPCM_THREADED_MESSAGES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000_000);
    let t = TestRoute::new(b);
    let (_rtx, mut rx, rhandle) = t.connect("sink").into_threaded().unwrap();
    const CLIENTS: u64 = 2;
    const THREADS_PER_CLIENT: u64 = 2;
    let per_thread = total / (CLIENTS * THREADS_PER_CLIENT);
    let mut handles = Vec::new();
    let mut threads = Vec::new();
    for c in 0..CLIENTS {
        let client = t.connect_nl(&format!("src{c}"));
        let (tx, _rx, h) = client.into_threaded().unwrap();
        handles.push(h);
        for k in 0..THREADS_PER_CLIENT {
            let mut tx = tx.clone();
            threads.push(std::thread::spawn(move || {
                for seq in 0..per_thread {
                    let msg = [k, seq];
                    loop {
                        match tx.try_send("sink", &msg) {
                            Ok(()) => break,
                            Err(ipcm::Error::WouldBlock { .. }) => std::thread::yield_now(),
                            Err(e) => panic!("{e}"),
                        }
                    }
                }
            }));
        }
    }
    let want = per_thread * CLIENTS * THREADS_PER_CLIENT;
    let mut next: HashMap<(String, u64), u64> = HashMap::new();
    let mut got = 0u64;
    let mut batch = Vec::with_capacity(4096);
    let deadline = Instant::now() + Duration::from_secs(600);
    while got < want {
        assert!(Instant::now() < deadline, "{got} of {want}");
        batch.clear();
        if rx.recv_batch(&mut batch, 4096) == 0
            && let Some(m) = rx.recv_timeout(Duration::from_millis(100))
        {
            batch.push(m);
        }
        for m in &batch {
            let [k, seq]: [u64; 2] = m.content().unwrap();
            let n = next.entry((m.from().to_string(), k)).or_default();
            assert_eq!(
                seq,
                *n,
                "from {} thread {k}: lost, duplicated or reordered",
                m.from()
            );
            *n += 1;
            got += 1;
        }
    }
    for th in threads {
        th.join().unwrap();
    }
    for h in handles {
        h.shutdown().unwrap();
    }
    assert!(
        rx.recv_timeout(Duration::from_millis(100)).is_none(),
        "nothing extra"
    );
    rhandle.shutdown().unwrap();
    let stats = t.route.all_stats(&ipcm::Serializer::Json).unwrap();
    for c in 0..CLIENTS {
        let id = format!("src{c}");
        assert_eq!(stats[&id].sent["sink"], per_thread * THREADS_PER_CLIENT);
        assert_eq!(stats["sink"].read[&id], per_thread * THREADS_PER_CLIENT);
    }
}

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

fn full_ring_applies_backpressure_with_bounded_memory(b: BackendChoice) {
    let t = TestRoute::new(b);
    let opts = ThreadedOptions {
        ring_capacity: 16,
        send_queue: 64,
        inbox_limit: 64 * 1024,
        ..ThreadedOptions::default()
    };
    let (_tx, mut rx, handle) = t.connect("sink").into_threaded_with(opts).unwrap();
    let src = Client::connect(
        &t.info(),
        "src",
        t.opts().listen(false).outbox_limit(256 * 1024),
    )
    .unwrap();
    let (mut stx, _srx, shandle) = src
        .into_threaded_with(ThreadedOptions {
            send_queue: 64,
            ..ThreadedOptions::default()
        })
        .unwrap();
    let pad = "p".repeat(1000);
    const N: u64 = 40_000; // 40 MB in total
    let before = rss_kib();
    let sender = std::thread::spawn(move || {
        for i in 0..N {
            if let Err(e) = stx.send("sink", &json!({"i": i, "pad": pad})) {
                panic!("send {i}: {e}");
            }
        }
        stx
    });
    // Nobody reads for a while: the sender must be held back.
    std::thread::sleep(Duration::from_millis(500));
    assert!(!sender.is_finished(), "backpressure reached the sender");
    assert_eq!(rx.len(), 16, "the ring is full");
    let grown = rss_kib().saturating_sub(before);
    assert!(
        grown < 16 * 1024,
        "memory grew by {grown} KiB while blocked"
    );
    let mut n = 0;
    while n < N {
        let m = rx
            .recv_timeout(Duration::from_secs(10))
            .expect("messages keep flowing");
        assert_eq!(m.content_value().unwrap()["i"], n);
        n += 1;
    }
    sender.join().unwrap();
    shandle.shutdown().unwrap();
    handle.shutdown().unwrap();
}

fn shutdown_while_traffic_flows_loses_nothing_silently(b: BackendChoice) {
    let _g = serial();
    let t = TestRoute::new(b);
    let (_tx, mut rx, handle) = t.connect("sink").into_threaded().unwrap();
    let src = t.connect_nl("src");
    let (mut stx, _srx, shandle) = src.into_threaded().unwrap();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = stop.clone();
    let sender = std::thread::spawn(move || {
        let mut sent = 0u64;
        while !flag.load(std::sync::atomic::Ordering::Relaxed) {
            if stx.send("sink", &sent).is_err() {
                break;
            }
            sent += 1;
        }
        sent
    });
    std::thread::sleep(Duration::from_millis(200));
    // Stop the receiving side mid-stream.
    let res = handle.shutdown();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let sent = sender.join().unwrap();
    shandle.shutdown().unwrap();
    let mut got = 0u64;
    while let Some(m) = rx.try_recv() {
        assert_eq!(m.content::<u64>().unwrap(), got, "in order");
        got += 1;
    }
    assert!(sent > 0 && got > 0);
    // Everything the receiver counted as read is in the ring, or the
    // shutdown said messages were lost.
    let stats = t.route.all_stats(&ipcm::Serializer::Json).unwrap();
    let read = stats["sink"].read.get("src").copied().unwrap_or(0);
    match res {
        Ok(()) => assert_eq!(read, got, "read counted {read}, ring held {got}"),
        Err(e) => assert_eq!(e.to_string(), "Messages waiting at disconnect for sink"),
    }
}

/// The threaded reactor, parked with no traffic at all, still closes a
/// connection that sends no hello when its hello timeout passes: the core's
/// deadline bounds the reactor's wait.
fn a_threaded_reactor_reaps_a_silent_connection_on_time(b: BackendChoice) {
    use std::io::Read;
    let t = TestRoute::new(b);
    let timeout = Duration::from_millis(300);
    let srv = Client::connect(&t.info(), "srv", t.opts().hello_timeout(timeout)).unwrap();
    let (_tx, _rx, handle) = srv.into_threaded().unwrap();
    let mut silent = std::os::unix::net::UnixStream::connect(t.file("srv")).unwrap();
    let start = Instant::now();
    silent
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut buf = [0u8; 16];
    // io_uring runs completion work of requests this thread submitted
    // (before the move) here, which interrupts a read with a timeout.
    let n = loop {
        match silent.read(&mut buf) {
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            r => break r,
        }
    };
    let after = start.elapsed();
    assert!(
        matches!(n, Ok(0)),
        "closed by the listener: {n:?} after {after:?}"
    );
    assert!(
        after >= timeout - Duration::from_millis(20)
            && after < timeout + Duration::from_millis(700),
        "closed {after:?} after connecting, hello timeout {timeout:?}"
    );
    handle.shutdown().unwrap();
}

/// A peer that connects while a listener's reactor is moving to its thread
/// (the first thing the new thread does) is accepted, every time. On
/// io_uring the move hands the accept to the new thread: a connection that
/// came in between the old accept's cancellation and the new one's arming
/// once sat unaccepted in the backlog for good (a threaded ping-pong
/// stalled at its first message).
fn connections_arriving_while_the_reactor_moves_are_accepted(b: BackendChoice) {
    let _g = serial();
    let t = TestRoute::new(b);
    for round in 0..200 {
        let name = format!("srv{round}");
        let srv = t.connect(&name);
        let mut cli = t.connect_nl(&format!("cli{round}"));
        // Connect and send from another thread while the reactor starts.
        let sender = std::thread::spawn(move || {
            cli.send_message(&name, &round).unwrap();
            cli
        });
        let (_tx, mut rx, handle) = srv.into_threaded().unwrap();
        let m = rx
            .recv_timeout(Duration::from_secs(5))
            .unwrap_or_else(|| panic!("round {round}: the message never arrived"));
        assert_eq!(m.content::<u64>().unwrap(), round);
        let mut cli = sender.join().unwrap();
        handle.shutdown().unwrap();
        cli.disconnect(None).unwrap();
    }
}

/// A peer that reads nothing: once its socket, the outbox and the send
/// queue are full, `try_send` reports `WouldBlock` (the reactor takes no
/// more commands while a frame is stalled; it used to take them all into
/// an unbounded list) and a blocking `send` waits; when the peer reads
/// again, every accepted message arrives, in order.
fn a_peer_that_stops_reading_fills_the_send_queue_not_memory(b: BackendChoice) {
    let _g = serial();
    let t = TestRoute::new(b);
    let mut sink = t.connect("sink");
    let src = Client::connect(
        &t.info(),
        "src",
        t.opts().listen(false).outbox_limit(64 * 1024),
    )
    .unwrap();
    let opts = ThreadedOptions {
        send_queue: 64,
        send_queue_bytes: 64 * 1024,
        ..ThreadedOptions::default()
    };
    let (mut tx, _rx, handle) = src.into_threaded_with(opts).unwrap();
    let pad = "q".repeat(1000);
    tx.send("sink", &(0u64, &pad)).unwrap();
    let mut accepted = 1u64;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match tx.try_send("sink", &(accepted, &pad)) {
            Ok(()) => accepted += 1,
            Err(ipcm::Error::WouldBlock { .. }) => {
                // The reactor may still be making room: full means full
                // for a while.
                std::thread::sleep(Duration::from_millis(200));
                if tx.try_send("sink", &(accepted, &pad)).is_ok() {
                    accepted += 1;
                    continue;
                }
                break;
            }
            Err(e) => panic!("try_send failed: {e}"),
        }
        assert!(Instant::now() < deadline, "the send queue never filled");
    }
    // Socket buffers, a 64 KiB outbox and a 64 KiB queue: well under 8 MiB.
    assert!(
        accepted < 8_000,
        "{accepted} messages of 1 KB accepted by a stalled peer"
    );
    eprintln!("stalled after {accepted} messages");
    // A blocking send waits (parked, not failing) until the peer reads.
    let mut late = tx.clone();
    let n = accepted;
    let blocked = std::thread::spawn(move || late.send("sink", &(n, "last")).unwrap());
    std::thread::sleep(Duration::from_millis(300));
    assert!(!blocked.is_finished(), "a send to a full queue waits");
    let mut next = 0u64;
    let deadline = Instant::now() + Duration::from_secs(30);
    while next <= n {
        assert!(
            Instant::now() < deadline,
            "only {next} of {} arrived",
            n + 1
        );
        for m in sink
            .get_messages_timeout(Duration::from_millis(50))
            .unwrap()
        {
            let v = m.content_value().unwrap();
            assert_eq!(v[0], next, "in order, none lost");
            next += 1;
        }
    }
    blocked.join().unwrap();
    handle.shutdown().unwrap();
    sink.disconnect(None).unwrap();
}
