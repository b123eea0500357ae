//! Peer events: joins, clean leaves, SIGKILLed peers and a removed route,
//! each reported once and in order; a storm of joins with few wake-ups;
//! `peer_active` woken by the route's changes; the rescan fallback; the
//! threaded channel; and the Perl-named peer-change handle.

#[macro_use]
mod common;

use std::io::{BufRead, BufReader};
use std::os::fd::AsFd;
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::{ROLE_ENV, TestRoute, backend_from_env, backend_name, helper_command};
use ipcm::{BackendChoice, Client, Info, Options, PeerEvent, PeerWatch, WatchMode};

const WAIT: Duration = Duration::from_secs(5);

/// Helper process: registers a client, says so, then waits to be killed.
#[test]
#[ignore = "helper process entry, run by the tests of this file"]
fn helper_process_entry() {
    let Ok(role) = std::env::var(ROLE_ENV) else {
        return;
    };
    assert_eq!(role, "register_and_wait");
    let info = Info::parse(&std::env::var("IPCM_INFO").unwrap()).unwrap();
    let id = std::env::var("IPCM_ID").unwrap();
    let _client = Client::connect(&info, &id, Options::new().backend(backend_from_env())).unwrap();
    println!("ready");
    std::thread::sleep(Duration::from_secs(60));
}

fn next(w: &mut PeerWatch) -> PeerEvent {
    w.next_event(Some(WAIT))
        .unwrap()
        .expect("an event within 5 s")
}

fn joined(id: &str) -> PeerEvent {
    PeerEvent::Joined(id.to_string())
}

fn left(id: &str) -> PeerEvent {
    PeerEvent::Left(id.to_string())
}

per_backend!(
    join_leave_kill_and_route_removal_are_reported_once_in_order,
    the_rescan_fallback_reports_the_same_events,
    a_thousand_joins_are_few_wakeups,
    peer_active_wakes_on_the_route_change,
    threaded_receivers_get_peer_events_on_a_channel,
    the_perl_peer_change_handle_signals_new_entries,
);

fn scenario(b: BackendChoice, rescan: bool) {
    let t = TestRoute::new(b);
    let watcher = t.connect("watcher");
    let mut w = if rescan {
        PeerWatch::rescanning(watcher.route(), Some(watcher.on_disk())).unwrap()
    } else {
        watcher.peer_watch().unwrap()
    };
    if rescan {
        assert_eq!(w.mode(), WatchMode::Rescan);
    } else {
        assert_eq!(w.mode(), WatchMode::Inotify, "inotify is available here");
    }
    assert!(w.peers().is_empty(), "only itself so far");
    // A join, then a clean leave.
    let mut a = t.connect("a");
    assert_eq!(next(&mut w), joined("a"));
    a.disconnect(None).unwrap();
    assert_eq!(next(&mut w), left("a"));
    // A SIGKILLed peer: its files stay, its pidfd reports the death.
    let mut child = helper_command("register_and_wait")
        .env("IPCM_INFO", t.info().to_info_string())
        .env("IPCM_ID", "victim")
        .env("IPCM_TEST_BACKEND", backend_name(b))
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    // The test harness prints its own lines first; the reader stays open
    // until the kill, so the helper never writes to a closed pipe.
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    while !line.contains("ready") {
        line.clear();
        assert!(
            out.read_line(&mut line).unwrap() > 0,
            "the helper ended early"
        );
    }
    assert_eq!(next(&mut w), joined("victim"));
    child.kill().unwrap();
    child.wait().unwrap();
    drop(out);
    assert_eq!(next(&mut w), left("victim"));
    assert!(
        !t.file("victim").exists() && !t.file("victim.pid").exists(),
        "the dead peer's files were reaped"
    );
    // Nothing else happened: each change was reported once.
    let _b = t.connect_nl("b");
    assert_eq!(next(&mut w), joined("b"));
    assert_eq!(
        w.next_event(Some(Duration::from_millis(200))).unwrap(),
        None
    );
    // The route removed: everyone left, then the watch ends.
    std::fs::remove_dir_all(t.route.path()).unwrap();
    assert_eq!(next(&mut w), left("b"));
    assert_eq!(
        w.next_event(Some(Duration::from_millis(200))).unwrap(),
        None
    );
    assert!(w.is_ended());
    std::mem::forget(watcher);
    std::mem::forget(_b);
}

fn join_leave_kill_and_route_removal_are_reported_once_in_order(b: BackendChoice) {
    scenario(b, false);
}

fn the_rescan_fallback_reports_the_same_events(b: BackendChoice) {
    scenario(b, true);
}

fn a_thousand_joins_are_few_wakeups(b: BackendChoice) {
    let t = TestRoute::new(b);
    let watcher = t.connect("watcher");
    let mut w = watcher.peer_watch().unwrap();
    // Marker files, as non-listening peers leave them, created while the
    // watch waits on another thread.
    let dir = t.route.path().to_string();
    let maker = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(50));
        for i in 0..1000 {
            std::fs::write(format!("{dir}/p{i:04}"), b"").unwrap();
        }
    });
    let mut seen = std::collections::HashSet::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    while seen.len() < 1000 {
        assert!(
            Instant::now() < deadline,
            "only {} joins reported",
            seen.len()
        );
        if let Some(e) = w.next_event(Some(Duration::from_secs(1))).unwrap() {
            assert!(matches!(e, PeerEvent::Joined(_)), "{e:?}");
            assert!(seen.insert(e), "reported twice");
        }
    }
    maker.join().unwrap();
    assert_eq!(
        w.next_event(Some(Duration::from_millis(100))).unwrap(),
        None
    );
    eprintln!(
        "1,000 joins: {} wake-ups, {} rescans",
        w.wakeups(),
        w.rescans()
    );
    assert!(
        w.wakeups() <= 200 && w.rescans() <= w.wakeups() + 1,
        "1,000 joins took {} wake-ups and {} rescans",
        w.wakeups(),
        w.rescans()
    );
}

fn peer_active_wakes_on_the_route_change(b: BackendChoice) {
    let t = TestRoute::new(b);
    let watcher = t.connect("watcher");
    let info = t.info();
    let opts = t.opts();
    let late = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(100));
        Client::connect(&info, "late", opts).unwrap()
    });
    let start = Instant::now();
    assert!(watcher.peer_active("late", Some(WAIT)).unwrap());
    let waited = start.elapsed();
    let _late = late.join().unwrap();
    eprintln!("peer_active returned {waited:?} after the start (the peer connects at 100 ms)");
    // Without a change to wake it, the wait looks again only after a
    // second: returning well before that means the change woke it.
    assert!(
        waited < Duration::from_millis(700),
        "peer_active took {waited:?}: it slept instead of waking on the change"
    );
    assert!(
        !watcher
            .peer_active("nobody", Some(Duration::from_millis(50)))
            .unwrap()
    );
}

fn threaded_receivers_get_peer_events_on_a_channel(b: BackendChoice) {
    let t = TestRoute::new(b);
    let (_tx, rx, handle) = t.connect("srv").into_threaded().unwrap();
    let events = rx.peer_events().unwrap();
    let mut a = t.connect_nl("a");
    assert_eq!(events.recv_timeout(WAIT).unwrap(), joined("a"));
    a.disconnect(None).unwrap();
    assert_eq!(events.recv_timeout(WAIT).unwrap(), left("a"));
    drop(events);
    handle.shutdown().unwrap();
}

fn the_perl_peer_change_handle_signals_new_entries(b: BackendChoice) {
    let t = TestRoute::new(b);
    let watcher = t.connect("watcher");
    assert!(watcher.have_handles_for_peer_change());
    let readable = |c: &Client, ms: i32| {
        let handles = c.handles_for_peer_change();
        assert_eq!(handles.len(), 1);
        let ts = rustix::event::Timespec {
            tv_sec: (ms / 1000) as _,
            tv_nsec: ((ms % 1000) as i64 * 1_000_000) as _,
        };
        let fd = handles[0].as_fd();
        let mut fds = [rustix::event::PollFd::new(
            &fd,
            rustix::event::PollFlags::IN,
        )];
        rustix::event::poll(&mut fds, Some(&ts)).unwrap() > 0
    };
    assert!(!readable(&watcher, 0), "nothing created yet");
    let _a = t.connect("a");
    assert!(readable(&watcher, 2000), "a created entry signals");
    watcher.reset_handles_for_peer_change();
    assert!(!readable(&watcher, 0), "drained by the reset");
}
