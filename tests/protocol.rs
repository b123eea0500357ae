//! Protocol behaviour over real sockets: hellos, replacement, hostile
//! framing, outbox bounds, disconnect rules, resume files, reconnect,
//! hashed ids and the spawn guard. Each runs once per backend.

#[macro_use]
mod common;

use std::fs;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use common::{TestRoute, contents, drain_for, poll};
use ipcm::{BackendChoice, Client, Error, Options, Spawn, SpawnOptions};
use serde_json::json;

fn frame(payload: &str) -> Vec<u8> {
    let mut v = (payload.len() as u32).to_be_bytes().to_vec();
    v.extend_from_slice(payload.as_bytes());
    v
}

fn msg(from: &str, to: &str, content: &str) -> Vec<u8> {
    frame(&format!(
        r#"{{"from":"{from}","to":"{to}","content":{content}}}"#
    ))
}

fn raw(t: &TestRoute, id: &str) -> UnixStream {
    let s = UnixStream::connect(t.file(id)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s
}

/// Reads until EOF (the peer closed the connection), or panics on timeout.
fn expect_closed(s: &mut UnixStream, c: &mut Client) {
    s.set_nonblocking(true).unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut buf = [0u8; 64];
    loop {
        let _ = c.get_messages().unwrap();
        match s.read(&mut buf) {
            Ok(0) => return,
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(_) => return,
        }
        assert!(Instant::now() < deadline, "connection was not closed");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// A listener's socket file appears only once it listens (it is bound
/// under a temporary dot-name and renamed into place), so a peer that finds
/// it is never refused; the temporary name never stays behind; a second
/// client of the same name is still refused; and a stale socket
/// that nobody listens on is refused at once, as in Perl.
fn socket_file_appears_only_once_listening(b: BackendChoice) {
    let t = TestRoute::new(b);
    let mut rx = t.connect("rx");
    let leftovers: Vec<_> = fs::read_dir(t.route.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(".ipcm-bind"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    // A raw connect to the path succeeds straight away.
    UnixStream::connect(t.file("rx")).unwrap();
    let err = Client::connect(&t.info(), "rx", t.opts()).unwrap_err();
    assert!(err.to_string().contains("already exists"), "{err}");
    // Racing peers: each new listener is reachable the moment its file
    // shows up.
    let mut tx = t.connect_nl("tx");
    for i in 0..50 {
        let name = format!("l{i}");
        let info = t.info();
        let opts = t.opts();
        let n2 = name.clone();
        let h = std::thread::spawn(move || Client::connect(&info, &n2, opts).unwrap());
        while !t.file(&name).exists() {
            std::hint::spin_loop();
        }
        tx.send_json(&name, "1").unwrap();
        let mut l = h.join().unwrap();
        let got = poll(&mut l, 1);
        assert_eq!(got.len(), 1);
        l.disconnect(None).unwrap();
    }

    let path = t.file("never");
    let fd = bound_unix_socket(&path);
    let start = Instant::now();
    let err = tx.send_json("never", "1").unwrap_err();
    assert!(err.to_string().contains("Connection refused"), "{err}");
    assert!(start.elapsed() < Duration::from_millis(500));
    // SAFETY: closes the socket created above.
    unsafe { libc::close(fd) };
    tx.disconnect(None).unwrap();
    rx.disconnect(None).unwrap();
}

fn bound_unix_socket(path: &std::path::Path) -> i32 {
    use std::os::unix::ffi::OsStrExt;
    // SAFETY: plain socket/bind calls on a zeroed sockaddr_un we fill in.
    unsafe {
        let fd = libc::socket(libc::AF_UNIX, libc::SOCK_STREAM, 0);
        assert!(fd >= 0);
        let mut addr: libc::sockaddr_un = std::mem::zeroed();
        addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
        for (d, s) in addr.sun_path.iter_mut().zip(path.as_os_str().as_bytes()) {
            *d = *s as libc::c_char;
        }
        let len = std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t;
        assert_eq!(libc::bind(fd, (&raw const addr).cast(), len), 0);
        fd
    }
}

per_backend!(
    socket_file_appears_only_once_listening,
    simultaneous_connects_lose_nothing,
    garbage_hello_drops_connection_and_listener_keeps_serving,
    hello_without_id_drops_connection,
    connection_without_hello_is_closed_after_timeout,
    oversize_length_prefix_closes_connection_only,
    peer_dying_mid_frame_delivers_nothing_partial,
    newer_hello_replaces_stale_connection,
    replies_go_over_the_newest_connection,
    self_send_short_circuits,
    a_built_message_sent_to_itself_keeps_id_stamp_and_extra_keys,
    requeued_messages_come_back_first,
    disconnect_with_unread_messages_fails_and_adjusts_stats,
    disconnect_hands_late_messages_to_handler,
    disconnect_ignores_terminate_messages,
    drop_disconnects_cleanly,
    slow_reader_fills_outbox_then_drains_without_loss,
    blocking_send_times_out_on_a_stalled_reader,
    reconnect_rules,
    hashed_ids_work_end_to_end,
    bad_ids_are_refused_with_perl_texts,
    unknown_recipient_is_reported,
    messages_are_sorted_by_stamp_then_ord,
    explicit_message_fields_travel,
    spawn_guard_terminates_and_removes_route,
);

// Counts the whole process's descriptors: in a process of its own.
per_backend_isolated!(connect_disconnect_cycles_leak_no_descriptors);

fn garbage_hello_drops_connection_and_listener_keeps_serving(b: BackendChoice) {
    let t = TestRoute::new(b);
    let mut srv = t.connect("srv");
    let mut bad = raw(&t, "srv");
    bad.write_all(&frame("this is not json")).unwrap();
    bad.write_all(&msg("evil", "srv", "1")).unwrap();
    expect_closed(&mut bad, &mut srv);
    let mut good = t.connect_nl("good");
    good.send_message("srv", "still here").unwrap();
    let got = poll(&mut srv, 1);
    assert_eq!(contents(&got), [json!("still here")]);
    assert_eq!(srv.connections(), ["good"]);
}

fn hello_without_id_drops_connection(b: BackendChoice) {
    let t = TestRoute::new(b);
    let mut srv = t.connect("srv");
    for payload in [
        r#"{"hello":""}"#,
        r#"["hello"]"#,
        r#"{"from":"x","to":"srv","content":1}"#,
    ] {
        let mut s = raw(&t, "srv");
        s.write_all(&frame(payload)).unwrap();
        expect_closed(&mut s, &mut srv);
    }
    assert!(srv.connections().is_empty());
}

fn connection_without_hello_is_closed_after_timeout(b: BackendChoice) {
    let t = TestRoute::new(b);
    let opts = t.opts().hello_timeout(Duration::from_millis(100));
    let mut srv = Client::connect(&t.info(), "srv", opts).unwrap();
    let mut silent = raw(&t, "srv");
    std::thread::sleep(Duration::from_millis(150));
    expect_closed(&mut silent, &mut srv);
}

fn oversize_length_prefix_closes_connection_only(b: BackendChoice) {
    let t = TestRoute::new(b);
    let opts = t.opts().max_frame(1 << 20);
    let mut srv = Client::connect(&t.info(), "srv", opts).unwrap();
    let mut good = t.connect_nl("good");
    good.send_message("srv", &1).unwrap();
    assert_eq!(contents(&poll(&mut srv, 1)), [json!(1)]);
    for prefix in [u32::MAX, (1 << 20) + 1] {
        let mut s = raw(&t, "srv");
        s.write_all(&frame(r#"{"hello":"hostile"}"#)).unwrap();
        s.write_all(&prefix.to_be_bytes()).unwrap();
        s.write_all(b"{\"from\":").unwrap();
        expect_closed(&mut s, &mut srv);
    }
    good.send_message("srv", &2).unwrap();
    assert_eq!(contents(&poll(&mut srv, 1)), [json!(2)]);
    assert_eq!(srv.connections(), ["good"]);
}

fn peer_dying_mid_frame_delivers_nothing_partial(b: BackendChoice) {
    let t = TestRoute::new(b);
    let mut srv = t.connect("srv");
    {
        let mut s = raw(&t, "srv");
        s.write_all(&frame(r#"{"hello":"dying"}"#)).unwrap();
        s.write_all(&msg("dying", "srv", "\"whole\"")).unwrap();
        let partial = msg("dying", "srv", "\"partial\"");
        s.write_all(&partial[..partial.len() - 4]).unwrap();
    }
    let got = drain_for(&mut srv, Duration::from_millis(300));
    assert_eq!(contents(&got), [json!("whole")]);
    assert!(!srv.has_connection("dying"), "EOF closed the entry");
}

fn newer_hello_replaces_stale_connection(b: BackendChoice) {
    let t = TestRoute::new(b);
    let mut srv = t.connect("srv");
    let mut first = raw(&t, "srv");
    first.write_all(&frame(r#"{"hello":"p"}"#)).unwrap();
    first.write_all(&msg("p", "srv", "1")).unwrap();
    assert_eq!(contents(&poll(&mut srv, 1)), [json!(1)]);
    let mut second = raw(&t, "srv");
    second.write_all(&frame(r#"{"hello":"p"}"#)).unwrap();
    second.write_all(&msg("p", "srv", "2")).unwrap();
    assert_eq!(contents(&poll(&mut srv, 1)), [json!(2)]);
    assert_eq!(srv.connections(), ["p"]);
    // The replaced connection is retired, not cut: what the peer still had
    // in flight on it arrives, and its close is an ordinary EOF.
    first.write_all(&msg("p", "srv", "3")).unwrap();
    assert_eq!(contents(&poll(&mut srv, 1)), [json!(3)]);
    drop(first);
    drain_for(&mut srv, Duration::from_millis(50));
    assert_eq!(srv.connections(), ["p"]);
    // Replies use the newest connection.
    srv.send_message("p", "reply").unwrap();
    let mut len = [0u8; 4];
    second.read_exact(&mut len).unwrap();
    let mut body = vec![0u8; u32::from_be_bytes(len) as usize];
    second.read_exact(&mut body).unwrap();
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["content"], "reply");
    assert_eq!(v["from"], "srv");
    assert_eq!(v["to"], "p");
}

/// Two listeners connecting to each other at the same moment
/// (docs/perl-differences.md, replacement): in Perl both connections break; here both stay usable and every
/// queued message arrives.
fn simultaneous_connects_lose_nothing(b: BackendChoice) {
    let t = TestRoute::new(b);
    let mut a = t.connect("a");
    let mut bb = t.connect("b");
    a.set_send_blocking(false);
    bb.set_send_blocking(false);
    for i in 0..50 {
        a.queue_message("b", &i).unwrap();
        bb.queue_message("a", &i).unwrap();
    }
    // Both hellos cross; each side sees the other's newer connection.
    let deadline = Instant::now() + Duration::from_secs(10);
    let (mut got_a, mut got_b) = (Vec::new(), Vec::new());
    while (got_a.len() < 50 || got_b.len() < 50) && Instant::now() < deadline {
        a.drain_pending();
        bb.drain_pending();
        got_a.extend(a.get_messages().unwrap());
        got_b.extend(bb.get_messages().unwrap());
    }
    let want: Vec<_> = (0..50).map(|i| json!(i)).collect();
    assert_eq!(contents(&got_a), want);
    assert_eq!(contents(&got_b), want);
    // And both directions keep working.
    a.set_send_blocking(true);
    bb.set_send_blocking(true);
    for _ in 0..3 {
        a.send_message("b", "x").unwrap();
        bb.send_message("a", "y").unwrap();
    }
    assert_eq!(poll(&mut bb, 3).len(), 3);
    assert_eq!(poll(&mut a, 3).len(), 3);
}

fn replies_go_over_the_newest_connection(b: BackendChoice) {
    let t = TestRoute::new(b);
    let mut a = t.connect("a");
    let mut bb = t.connect("b");
    a.send_message("b", "1").unwrap();
    assert_eq!(poll(&mut bb, 1).len(), 1);
    // a drops its cached connection; its next send opens a new one, which
    // replaces the old entry on b's side.
    a.disconnect_connection("b");
    a.send_message("b", "2").unwrap();
    assert_eq!(contents(&poll(&mut bb, 1)), [json!("2")]);
    bb.send_message("a", "back").unwrap();
    assert_eq!(contents(&poll(&mut a, 1)), [json!("back")]);
    assert_eq!(bb.connections(), ["a"]);
}

fn self_send_short_circuits(b: BackendChoice) {
    let t = TestRoute::new(b);
    let mut a = t.connect("a");
    a.send_message("a", &json!({"note": "to self"})).unwrap();
    assert!(a.connections().is_empty(), "no socket opened to itself");
    let got = a.get_messages().unwrap();
    assert_eq!(contents(&got), [json!({"note": "to self"})]);
    assert_eq!(got[0].from(), "a");
    assert_eq!(a.stats().sent["a"], 1);
    assert_eq!(a.stats().read["a"], 1);
}

fn requeued_messages_come_back_first(b: BackendChoice) {
    let t = TestRoute::new(b);
    let mut a = t.connect("a");
    let mut bb = t.connect("b");
    a.send_message("b", "one").unwrap();
    let got = poll(&mut bb, 1);
    bb.requeue_message(&got).unwrap();
    assert!(t.file("b.resume").exists());
    assert!(bb.pending_messages().unwrap());
    let again = bb.get_messages().unwrap();
    assert_eq!(again.len(), 1);
    assert_eq!(again[0].id(), got[0].id());
    assert_eq!(again[0].stamp(), got[0].stamp());
    assert!(!t.file("b.resume").exists());
    assert_eq!(bb.stats().read["a"], 1, "resume messages are not counted");
}

fn disconnect_with_unread_messages_fails_and_adjusts_stats(b: BackendChoice) {
    let t = TestRoute::new(b);
    let mut a = t.connect("a");
    let mut bb = t.connect("b");
    a.send_message("b", "unread").unwrap();
    let err = bb.disconnect(None).unwrap_err();
    assert_eq!(err.to_string(), "Messages waiting at disconnect for b");
    assert!(bb.disconnected());
    assert!(!t.file("b").exists());
    let stats: serde_json::Value =
        serde_json::from_slice(&fs::read(t.file("b.stats")).unwrap()).unwrap();
    assert_eq!(stats["read"]["a"], 0);
}

fn disconnect_hands_late_messages_to_handler(b: BackendChoice) {
    let t = TestRoute::new(b);
    let mut a = t.connect("a");
    let mut bb = t.connect("b");
    a.send_message("b", "late").unwrap();
    let mut seen = Vec::new();
    let mut handler = |_: &Client, msgs: Vec<ipcm::Message>| seen.extend(msgs);
    bb.disconnect(Some(&mut handler)).unwrap();
    assert_eq!(contents(&seen), [json!("late")]);
    let stats: serde_json::Value =
        serde_json::from_slice(&fs::read(t.file("b.stats")).unwrap()).unwrap();
    assert_eq!(stats["read"]["a"], 1);
}

fn disconnect_ignores_terminate_messages(b: BackendChoice) {
    let t = TestRoute::new(b);
    let mut a = t.connect("a");
    let mut bb = t.connect("b");
    a.send_message("b", &json!({"terminate": 1})).unwrap();
    bb.disconnect(None).unwrap();
}

fn drop_disconnects_cleanly(b: BackendChoice) {
    let t = TestRoute::new(b);
    {
        let mut a = t.connect("a");
        let _bb = t.connect("b");
        a.send_message("b", "x").unwrap();
        drop(a);
    }
    assert!(!t.file("a").exists());
    assert!(!t.file("b").exists());
    assert!(t.file("a.stats").exists());
    assert!(t.file("b.stats").exists());
    assert!(t.file("a.pid").exists(), ".pid survives disconnect (Q4)");
}

fn slow_reader_fills_outbox_then_drains_without_loss(b: BackendChoice) {
    let t = TestRoute::new(b);
    let limit = 256 * 1024;
    let mut a = Client::connect(&t.info(), "a", t.opts().outbox_limit(limit)).unwrap();
    let mut bb = t.connect("b");
    a.set_send_blocking(false);
    let pad = "x".repeat(1000);
    let mut sent = 0u64;
    let mut would_block = false;
    for i in 0..10_000u64 {
        match a.try_send_message("b", &json!({"i": i, "pad": pad})) {
            Ok(()) => sent += 1,
            Err(Error::WouldBlock { peer, limit: l, .. }) => {
                assert_eq!(peer, "b");
                assert_eq!(l, limit);
                would_block = true;
                break;
            }
            Err(e) => panic!("{e}"),
        }
    }
    assert!(would_block, "the outbox is bounded");
    assert_eq!(a.stats().sent["b"], sent, "refused sends are not counted");
    assert!(a.pending_sends() == 1);
    // The reader catches up; draining delivers everything, in order.
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut got = Vec::new();
    while (got.len() as u64) < sent {
        a.drain_pending();
        got.extend(bb.get_messages().unwrap());
        assert!(Instant::now() < deadline, "{} of {sent}", got.len());
    }
    for (n, m) in got.iter().enumerate() {
        assert_eq!(m.content_value().unwrap()["i"], n as u64);
    }
    // The sender learns of its last writes' completion at its next turn.
    while a.pending_sends() > 0 {
        a.drain_pending();
        assert!(Instant::now() < deadline, "backlog never reported empty");
    }
}

fn blocking_send_times_out_on_a_stalled_reader(b: BackendChoice) {
    let t = TestRoute::new(b);
    let opts = t.opts().send_timeout(Some(Duration::from_millis(200)));
    let mut a = Client::connect(&t.info(), "a", opts).unwrap();
    let _stalled = t.connect("b");
    let pad = "y".repeat(64 * 1024);
    let start = Instant::now();
    let err = loop {
        if let Err(e) = a.send_message("b", &pad) {
            break e;
        }
        assert!(start.elapsed() < Duration::from_secs(10), "never blocked");
    };
    assert!(matches!(err, Error::Timeout { .. }), "{err}");
}

fn reconnect_rules(b: BackendChoice) {
    let t = TestRoute::new(b);
    let err = Client::reconnect(&t.info(), "r", t.opts()).unwrap_err();
    assert_eq!(
        err.to_string(),
        "Could not open stats file: No such file or directory"
    );
    let mut r = t.connect("r");
    let mut peer = t.connect("peer");
    r.send_message("peer", "before").unwrap();
    assert_eq!(poll(&mut peer, 1).len(), 1);
    r.write_stats().unwrap();
    let err = Client::reconnect(&t.info(), "r", t.opts()).unwrap_err();
    assert_eq!(
        err.to_string(),
        format!(
            "Looks like the connection is already running in pid {}",
            std::process::id()
        )
    );
    // The owner "dies": its pid file names a dead process.
    std::mem::forget(r);
    fs::write(t.file("r.pid"), "999999999").unwrap();
    let mut r = Client::reconnect(&t.info(), "r", t.opts()).unwrap();
    assert_eq!(r.stats().sent["peer"], 1, "stats loaded");
    peer.disconnect_connection("r");
    peer.send_message("r", "after").unwrap();
    assert_eq!(contents(&poll(&mut r, 1)), [json!("after")]);
}

fn hashed_ids_work_end_to_end(b: BackendChoice) {
    let t = TestRoute::new(b);
    let long = "l".repeat(120);
    let mut slash = t.connect("has/slash");
    let mut longc = t.connect(&long);
    let disk = slash.on_disk().to_string();
    assert!(disk.starts_with("h-") && disk.len() == 42);
    assert_eq!(
        fs::read_to_string(t.file(&format!("{disk}.name"))).unwrap(),
        "has/slash"
    );
    assert_eq!(slash.peers().unwrap(), std::slice::from_ref(&long));
    slash.send_message(&long, "to long").unwrap();
    let got = poll(&mut longc, 1);
    assert_eq!(got[0].from(), "has/slash");
    longc.send_message("has/slash", "back").unwrap();
    assert_eq!(contents(&poll(&mut slash, 1)), [json!("back")]);
}

fn bad_ids_are_refused_with_perl_texts(b: BackendChoice) {
    let t = TestRoute::new(b);
    let e = |id: &str| {
        Client::connect(&t.info(), id, t.opts())
            .unwrap_err()
            .to_string()
    };
    assert_eq!(e("_x"), "'id' may not begin with an underscore");
    assert_eq!(e(""), "'id' is a required attribute");
    assert!(e("x.pid").contains("cannot be used by a local client"));
    let _a = t.connect("dup");
    assert_eq!(e("dup"), "dup UNIX Socket or marker file already exists");
}

fn unknown_recipient_is_reported(b: BackendChoice) {
    let t = TestRoute::new(b);
    let mut a = t.connect("a");
    assert_eq!(
        a.send_message("nobody", "x").unwrap_err().to_string(),
        "'nobody' is not a valid message recipient"
    );
    assert_eq!(
        a.send_message("", "x").unwrap_err().to_string(),
        "No peer specified"
    );
    assert_eq!(
        a.send_message("nobody", &serde_json::Value::Null)
            .unwrap_err()
            .to_string(),
        "'content' is a required attribute"
    );
}

fn messages_are_sorted_by_stamp_then_ord(b: BackendChoice) {
    let t = TestRoute::new(b);
    let mut x = t.connect("x");
    let mut y = t.connect("y");
    let mut sink = t.connect("sink");
    let mut late = x.build_message("sink", "late").unwrap();
    late.set_stamp(2000.0, 0);
    let mut early = y.build_message("sink", "early").unwrap();
    early.set_stamp(1000.0, 1);
    let mut earliest = y.build_message("sink", "earliest").unwrap();
    earliest.set_stamp(1000.0, 0);
    x.send(&late).unwrap();
    y.send(&early).unwrap();
    y.send(&earliest).unwrap();
    std::thread::sleep(Duration::from_millis(50));
    let got = sink.get_messages().unwrap();
    assert_eq!(
        contents(&got),
        [json!("earliest"), json!("early"), json!("late")]
    );
}

fn explicit_message_fields_travel(b: BackendChoice) {
    let t = TestRoute::new(b);
    let mut a = t.connect("a");
    let mut bb = t.connect("b");
    let mut m = a.build_message("b", &json!(["é", "😀"])).unwrap();
    m.set_extra("trace", &json!({"hop": 1})).unwrap();
    a.send(&m).unwrap();
    let got = poll(&mut bb, 1);
    assert_eq!(got[0].id(), m.id());
    assert_eq!(got[0].stamp(), m.stamp());
    assert_eq!(got[0].content_value().unwrap(), json!(["é", "😀"]));
    assert_eq!(got[0].extra("trace"), Some(r#"{"hop":1}"#));
    assert!(
        got[0].content_json().is_ascii(),
        "non-ASCII is escaped on the wire"
    );
}

fn a_built_message_sent_to_itself_keeps_id_stamp_and_extra_keys(b: BackendChoice) {
    let t = TestRoute::new(b);
    let mut a = t.connect("a");
    let mut m = a.build_message("a", &json!({"n": 1})).unwrap();
    m.set_extra("trace", &json!({"hop": 2})).unwrap();
    a.send(&m).unwrap();
    assert!(a.connections().is_empty(), "no socket opened to itself");
    let got = a.get_messages().unwrap();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].id(), m.id());
    assert_eq!(got[0].stamp(), m.stamp());
    assert_eq!(got[0].stamp_ord(), m.stamp_ord());
    assert_eq!(got[0].extra("trace"), Some(r#"{"hop":2}"#));
    assert_eq!(got[0].content_value().unwrap(), json!({"n": 1}));
    assert_eq!(got[0].from(), "a");
    assert_eq!(a.stats().sent["a"], 1);
    assert_eq!(a.stats().read["a"], 1);
}

fn spawn_guard_terminates_and_removes_route(b: BackendChoice) {
    let dir = tempfile::Builder::new()
        .prefix("ipcm")
        .tempdir_in("/tmp")
        .unwrap();
    let spawn = Spawn::with_options(SpawnOptions {
        dir: Some(dir.path().into()),
        peer_timeout: Duration::from_secs(10),
        ..SpawnOptions::default()
    })
    .unwrap();
    let info = spawn.info_string();
    assert!(info.starts_with(
        r#"["IPC::Manager::Client::ConnectionUnix","IPC::Manager::Serializer::JSON",""#
    ));
    let route = spawn.route().path().to_string();
    let worker = std::thread::spawn(move || {
        let mut w = Client::connect_info(&info, "worker", Options::new().backend(b)).unwrap();
        loop {
            let msgs = w.get_messages_timeout(Duration::from_secs(10)).unwrap();
            assert!(!msgs.is_empty(), "no terminate arrived");
            if msgs.iter().any(|m| m.is_terminate()) {
                assert_eq!(msgs[0].from(), "spawn");
                assert!(msgs[0].is_broadcast());
                break;
            }
        }
        w.disconnect(None).unwrap();
    });
    let start = Instant::now();
    while !std::path::Path::new(&format!("{route}/worker")).exists() {
        assert!(start.elapsed() < Duration::from_secs(5));
        std::thread::sleep(Duration::from_millis(5));
    }
    let left = spawn.shutdown().unwrap();
    assert!(left.is_empty(), "{left:?}");
    worker.join().unwrap();
    assert!(!std::path::Path::new(&route).exists());
}

fn open_fds() -> usize {
    fs::read_dir("/proc/self/fd").unwrap().count()
}

fn connect_disconnect_cycles_leak_no_descriptors(b: BackendChoice) {
    let t = TestRoute::new(b);
    let mut srv = t.connect("srv");
    // Warm up (lazily created process-wide descriptors).
    let mut c = t.connect_nl("c");
    c.send_message("srv", &0).unwrap();
    c.disconnect(None).unwrap();
    poll(&mut srv, 1);
    let before = open_fds();
    for i in 0..200 {
        let mut c = t.connect_nl(&format!("c{i}"));
        c.send_message("srv", &i).unwrap();
        c.disconnect(None).unwrap();
    }
    let got = drain_for(&mut srv, Duration::from_millis(200));
    assert_eq!(got.len(), 200);
    // In a process of its own: every descriptor must be back.
    assert!(srv.connections().is_empty(), "{:?}", srv.connections());
    assert!(open_fds() <= before, "fds {before} -> {}", open_fds());
}
