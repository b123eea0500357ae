//! The shared-memory lane between ipcm peers: the switch from the socket,
//! order and completeness across it, backpressure, hostile memory, a
//! writer killed mid-write, refusal by seccomp, and what a Perl-shaped
//! peer sees (nothing of it). Every test runs on both backends.

#[macro_use]
mod common;

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::time::{Duration, Instant};

use common::*;
use ipcm::{BackendChoice, Client, Error, Info, LaneKind, Message, Serializer};

per_backend!(
    messages_cross_the_switch_in_order_and_complete,
    large_and_small_messages_keep_their_order_through_the_ring,
    a_large_ring_wraps_early_and_fills_when_the_reader_lags,
    a_threaded_receiver_reads_the_lane_in_order,
    a_reader_that_stops_fills_the_ring_then_the_outbox_not_memory,
    a_perl_shaped_initiator_never_sees_a_control_frame,
    the_lane_can_be_turned_off,
    a_writer_killed_mid_write_yields_no_torn_message,
    refused_shared_memory_keeps_the_socket_and_says_why_once,
    busy_polling_answers_over_the_lane_and_still_reads_sockets,
    an_idle_lane_is_released_then_offered_again,
    a_threaded_client_releases_an_idle_lane_and_carries_on,
    descriptors_travel_with_their_message,
    lane_traffic_counts_as_activity,
);

// These read or write the whole process's mappings and descriptors (the
// large-payload ones look their content up in /proc/self/maps): each runs
// in a process of its own.
per_backend_isolated!(
    a_16_mib_message_arrives_in_a_sealed_memfd_without_a_copy,
    a_16_mib_message_on_the_socket_goes_as_a_memfd_too,
    a_threaded_receiver_gets_a_large_payload_without_a_copy,
    a_perl_shaped_acceptor_sees_only_the_hello_and_messages,
    a_scribbled_ring_closes_its_connection_and_nothing_else,
    upgrade_and_close_cycles_leave_no_descriptor_or_mapping,
    seventy_clients_offering_at_once_all_get_lanes,
    released_lanes_leave_no_mapping_or_descriptor,
);

fn lane_opts(t: &TestRoute) -> ipcm::Options {
    t.opts()
        .lane(true)
        .lane_after_bytes(4096)
        .lane_ring_bytes(256 * 1024)
}

/// Lanes released after 100 ms without traffic.
fn releasing_opts(t: &TestRoute) -> ipcm::Options {
    lane_opts(t).lane_release_after(Some(Duration::from_millis(100)))
}

/// Turns both clients until neither maps a lane; what `b` receives
/// meanwhile is kept.
fn until_released(a: &mut Client, b: &mut Client, got: &mut Vec<Message>) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while a.resources().lane_mappings + b.resources().lane_mappings > 0 {
        assert!(
            Instant::now() < deadline,
            "lane kept: {:?} / {:?}",
            a.resources(),
            b.resources()
        );
        a.get_messages_timeout(Duration::from_millis(5)).unwrap();
        got.extend(b.get_messages_timeout(Duration::from_millis(5)).unwrap());
    }
}

fn recv_until(c: &mut Client, n: usize, out: &mut Vec<Message>) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while out.len() < n {
        assert!(Instant::now() < deadline, "{} of {n} arrived", out.len());
        out.extend(c.get_messages_timeout(Duration::from_millis(50)).unwrap());
    }
}

fn numbers(msgs: &[Message]) -> Vec<usize> {
    msgs.iter().map(|m| m.content::<usize>().unwrap()).collect()
}

/// Waits (turning both clients) until `a`'s connection to `b` is on the
/// lane both ways.
fn until_on_lane(a: &mut Client, an: &str, b: &mut Client, bn: &str) -> Vec<Message> {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut got = Vec::new();
    while a.lane(bn) != Some(LaneKind::SharedMemory) || b.lane(an) != Some(LaneKind::SharedMemory) {
        assert!(
            Instant::now() < deadline,
            "no lane: {:?} {:?}",
            a.lane(bn),
            b.lane(an)
        );
        a.get_messages_timeout(Duration::from_millis(1)).unwrap();
        got.extend(b.get_messages_timeout(Duration::from_millis(1)).unwrap());
    }
    got
}

fn messages_cross_the_switch_in_order_and_complete(b: BackendChoice) {
    let t = TestRoute::new(b);
    for ser in [Serializer::Json, Serializer::Binary] {
        let info = Info::new(ser.clone(), t.route.path());
        let name = |s: &str| format!("{s}-{}", ser.class().len());
        let (an, bn) = (name("a"), name("b"));
        let mut a = Client::connect(&info, &an, lane_opts(&t)).unwrap();
        let mut bc = Client::connect(&info, &bn, lane_opts(&t)).unwrap();
        const N: usize = 20_000;
        let mut got = Vec::new();
        for i in 0..N {
            a.send_message(&bn, &i).unwrap();
            if i % 256 == 0 {
                got.extend(bc.get_messages().unwrap());
            }
        }
        recv_until(&mut bc, N, &mut got);
        assert_eq!(numbers(&got), (0..N).collect::<Vec<_>>(), "{ser:?}");
        a.get_messages().unwrap();
        assert_eq!(a.lane(&bn), Some(LaneKind::SharedMemory), "{ser:?}");
        assert_eq!(bc.lane(&an), Some(LaneKind::SharedMemory), "{ser:?}");
        // Replies go back over the same lane.
        let mut back = Vec::new();
        for i in 0..N {
            bc.send_message(&an, &i).unwrap();
            if i % 256 == 0 {
                back.extend(a.get_messages().unwrap());
            }
        }
        recv_until(&mut a, N, &mut back);
        assert_eq!(numbers(&back), (0..N).collect::<Vec<_>>());
        assert!(
            a.get_messages_timeout(Duration::from_millis(50))
                .unwrap()
                .is_empty()
        );
        for (c, peer) in [(&mut a, &bn), (&mut bc, &an)] {
            assert_eq!(c.stats().sent[peer], N as u64);
            assert_eq!(c.stats().read[peer], N as u64);
            assert_eq!(c.resources().lanes, 1);
        }
        a.disconnect(None).unwrap();
        bc.disconnect(None).unwrap();
        // The `.stats` files say the same.
        for (me, peer) in [(&an, &bn), (&bn, &an)] {
            let st = t.route.read_stats(me, &ser).unwrap();
            assert_eq!(st.sent[peer], N as u64, "{me}.stats");
            assert_eq!(st.read[peer], N as u64, "{me}.stats");
        }
    }
}

fn a_threaded_receiver_reads_the_lane_in_order(b: BackendChoice) {
    let t = TestRoute::new(b);
    let info = Info::new(Serializer::Binary, t.route.path());
    let srv = Client::connect(&info, "srv", lane_opts(&t)).unwrap();
    let (mut stx, mut rx, handle) = srv.into_threaded().unwrap();
    let mut a = Client::connect(&info, "a", lane_opts(&t)).unwrap();
    const N: usize = 50_000;
    let reader = std::thread::spawn(move || {
        let mut got = Vec::with_capacity(N);
        while got.len() < N {
            let m = rx.recv_timeout(Duration::from_secs(10)).expect("message");
            got.push(m.content::<usize>().unwrap());
        }
        (rx, got)
    });
    for i in 0..N {
        a.send_message("srv", &i).unwrap();
    }
    let (_rx, got) = reader.join().unwrap();
    assert_eq!(got, (0..N).collect::<Vec<_>>());
    a.get_messages().unwrap();
    assert_eq!(a.lane("srv"), Some(LaneKind::SharedMemory));
    // And back, from the threaded sender.
    let sender = std::thread::spawn(move || {
        for i in 0..N {
            stx.send("a", &i).unwrap();
        }
        stx
    });
    let mut back = Vec::new();
    recv_until(&mut a, N, &mut back);
    let stx = sender.join().unwrap();
    assert_eq!(numbers(&back), (0..N).collect::<Vec<_>>());
    let stats = stx.stats().unwrap();
    assert_eq!(stats.read["a"], N as u64);
    assert_eq!(stats.sent["a"], N as u64);
    a.disconnect(None).unwrap();
    handle.shutdown().unwrap();
}

/// Content of message `i`: sizes from a few bytes to more than a ring
/// record (32 KiB) and more than a whole 16 KiB ring, so that records are
/// cut, rings fill and the outbox backs up between small messages.
fn sized_content(i: usize) -> String {
    // 5,000: at least `DIRECT_MIN` and within a 16 KiB ring's record, so
    // it may go straight into the ring (when nothing waits before it).
    let len = [10, 3000, 9000, 40_000, 5000, 2100, 70][i % 7];
    format!("\"{i}:{}\"", "x".repeat(len))
}

/// How many [`sized_content`] messages each phase sends.
const SIZED_N: usize = 1200;

/// Writes what `from` has queued and reads what `to` has received.
fn turn_both(from: &mut Client, to: &mut Client, got: &mut Vec<Message>) {
    from.drain_pending();
    got.extend(to.get_messages().unwrap());
}

/// Queues [`sized_content`] messages from `from` to `to` (both inline,
/// turned in turn), checks they arrive whole and in order, and that
/// `.stats` counts them.
fn sized_messages_arrive(from: &mut Client, from_name: &str, to: &mut Client, to_name: &str) {
    const N: usize = SIZED_N;
    let mut got = Vec::new();
    let sent_before = from.stats().sent.get(to_name).copied().unwrap_or(0);
    for i in 0..N {
        // A full outbox refuses; turning both sides makes room.
        while let Err(e) = from.queue_json(to_name, &sized_content(i)) {
            assert!(matches!(e, Error::WouldBlock { .. }), "{e}");
            turn_both(from, to, &mut got);
        }
        if i % 7 == 0 {
            turn_both(from, to, &mut got);
        }
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    while got.len() < N {
        assert!(
            Instant::now() < deadline,
            "{from_name}: {} of {N}",
            got.len()
        );
        from.drain_pending();
        got.extend(to.get_messages_timeout(Duration::from_millis(5)).unwrap());
    }
    for (i, m) in got.iter().enumerate() {
        assert_eq!(
            m.content_json(),
            sized_content(i),
            "{from_name}: message {i}"
        );
        assert_eq!(m.from(), from_name);
    }
    assert_eq!(from.lane(to_name), Some(LaneKind::SharedMemory));
    assert_eq!(from.stats().sent[to_name] - sent_before, N as u64);
    assert!(to.get_messages().unwrap().is_empty());
}

fn large_and_small_messages_keep_their_order_through_the_ring(b: BackendChoice) {
    let t = TestRoute::new(b);
    let info = Info::new(Serializer::Binary, t.route.path());
    // A small ring: it fills often, and a 40 KB message spans several
    // refills of it.
    let opts = lane_opts(&t).lane_after_bytes(0).lane_ring_bytes(16 * 1024);
    let mut a = Client::connect(&info, "a", opts.clone()).unwrap();
    let mut bc = Client::connect(&info, "b", opts.clone()).unwrap();
    a.send_message("b", &"warm").unwrap();
    let got = until_on_lane(&mut a, "a", &mut bc, "b");
    assert_eq!(got.len(), 1);
    sized_messages_arrive(&mut a, "a", &mut bc, "b");
    sized_messages_arrive(&mut bc, "b", &mut a, "a");
    bc.disconnect(None).unwrap();

    // Blocking sends, which wait for room in the ring, into a threaded
    // receiver that drains it.
    const N: usize = SIZED_N;
    let srv = Client::connect(&info, "srv", opts).unwrap();
    let (_stx, mut rx, handle) = srv.into_threaded().unwrap();
    let reader = std::thread::spawn(move || {
        let mut got = Vec::with_capacity(N);
        while got.len() < N {
            got.push(rx.recv_timeout(Duration::from_secs(10)).expect("message"));
        }
        got
    });
    a.send_message("srv", &"warm").unwrap();
    for i in 1..N {
        a.send_json("srv", &sized_content(i)).unwrap();
    }
    let got = reader.join().unwrap();
    assert_eq!(got[0].content::<String>().unwrap(), "warm");
    for (i, m) in got.iter().enumerate().skip(1) {
        assert_eq!(m.content_json(), sized_content(i), "message {i}");
        assert_eq!(m.from(), "a");
    }
    assert_eq!(a.lane("srv"), Some(LaneKind::SharedMemory));
    assert_eq!(a.stats().sent["srv"], N as u64);
    a.disconnect(None).unwrap();
    handle.shutdown().unwrap();
}

/// A ring larger than the part a producer keeps to while its reader keeps
/// up (256 KiB): streamed with the reader keeping up, the producer goes
/// back to the ring's start whenever it finds it empty; with a reader that
/// lags, the whole ring fills, and large messages then written far behind
/// the reader (with ordinary stores, not streamed ones) arrive whole.
fn a_large_ring_wraps_early_and_fills_when_the_reader_lags(b: BackendChoice) {
    let t = TestRoute::new(b);
    let info = Info::new(Serializer::Binary, t.route.path());
    let opts = lane_opts(&t)
        .lane_after_bytes(0)
        .lane_ring_bytes(2 << 20)
        .outbox_limit(8 << 20);
    let mut a = Client::connect(&info, "a", opts.clone()).unwrap();
    let mut bc = Client::connect(&info, "b", opts).unwrap();
    a.send_message("b", &"warm").unwrap();
    assert_eq!(until_on_lane(&mut a, "a", &mut bc, "b").len(), 1);
    // The reader keeps up: about 11 MiB through the ring's first part.
    sized_messages_arrive(&mut a, "a", &mut bc, "b");
    // The reader lags: 3 MiB queued before it reads anything.
    let content = |i: usize| format!("\"{i}:{}\"", "y".repeat(16_000 + i % 61));
    const N: usize = 192;
    for i in 0..N {
        a.queue_json("b", &content(i)).unwrap();
        a.drain_pending();
    }
    let mut got = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    while got.len() < N {
        assert!(Instant::now() < deadline, "{} of {N}", got.len());
        a.drain_pending();
        got.extend(bc.get_messages_timeout(Duration::from_millis(5)).unwrap());
    }
    for (i, m) in got.iter().enumerate() {
        assert_eq!(m.content_json(), content(i), "message {i}");
    }
    assert_eq!(a.lane("b"), Some(LaneKind::SharedMemory));
    a.disconnect(None).unwrap();
    bc.disconnect(None).unwrap();
}

fn a_reader_that_stops_fills_the_ring_then_the_outbox_not_memory(b: BackendChoice) {
    let t = TestRoute::new(b);
    let info = Info::new(Serializer::Json, t.route.path());
    let opts = lane_opts(&t).lane_ring_bytes(64 * 1024).lane_after_bytes(0);
    let mut a = Client::connect(&info, "a", opts.clone().outbox_limit(128 * 1024)).unwrap();
    let mut bc = Client::connect(&info, "b", opts).unwrap();
    a.send_message("b", &0usize).unwrap();
    let mut got = until_on_lane(&mut a, "a", &mut bc, "b");
    // `b` stops reading: the ring fills, then the outbox, then sends are
    // refused.
    a.set_send_blocking(false);
    let mut sent = 1usize;
    let refused = loop {
        match a.send_message("b", &sent) {
            Ok(()) => sent += 1,
            Err(e) => break e,
        }
        assert!(sent < 100_000, "sends never refused: memory is not bounded");
    };
    assert!(matches!(refused, Error::WouldBlock { .. }), "{refused}");
    assert!(sent > 1000, "the ring and outbox took only {sent}");
    a.set_send_blocking(true);
    // `b` reads again: everything arrives, in order.
    let deadline = Instant::now() + Duration::from_secs(20);
    while got.len() < sent {
        assert!(Instant::now() < deadline, "{} of {sent}", got.len());
        got.extend(bc.get_messages_timeout(Duration::from_millis(20)).unwrap());
        a.drain_pending();
    }
    assert_eq!(numbers(&got), (0..sent).collect::<Vec<_>>());
    a.disconnect(None).unwrap();
    bc.disconnect(None).unwrap();
}

/// Reads frames from a plain socket until `n` arrived; returns their
/// payloads.
fn read_frames(s: &mut UnixStream, n: usize) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    while out.len() < n {
        let mut len = [0u8; 4];
        s.read_exact(&mut len).unwrap();
        let mut body = vec![0u8; u32::from_be_bytes(len) as usize];
        s.read_exact(&mut body).unwrap();
        out.push(body);
    }
    out
}

fn frame(payload: &[u8]) -> Vec<u8> {
    let mut v = (payload.len() as u32).to_be_bytes().to_vec();
    v.extend_from_slice(payload);
    v
}

/// Busy polling spins on the rings (an empty spin returns at once) and
/// still looks at its sockets: a plain-socket peer's messages arrive while
/// a lane carries a ping-pong, and every round trip completes in order.
fn busy_polling_answers_over_the_lane_and_still_reads_sockets(b: BackendChoice) {
    let t = TestRoute::new(b);
    let opts = lane_opts(&t).lane_after_bytes(0).busy_poll(true);
    let mut srv = Client::connect(&t.info(), "srv", opts.clone()).unwrap();
    let mut a = Client::connect(&t.info(), "a", opts.listen(false)).unwrap();
    a.send_message("srv", &0usize).unwrap();
    let mut got = until_on_lane(&mut a, "a", &mut srv, "srv");
    recv_until(&mut srv, 1, &mut got);
    let mut p = UnixStream::connect(srv.path()).unwrap();
    p.write_all(&frame(br#"{"hello":"perl"}"#)).unwrap();
    let (mut from_perl, mut next_perl) = (0, 0);
    const ROUND_TRIPS: usize = 2000;
    for i in 1..=ROUND_TRIPS {
        if i % 100 == 0 {
            let m = format!(
                r#"{{"from":"perl","to":"srv","content":{next_perl},"stamp":1.5,"id":"P{i}"}}"#
            );
            p.write_all(&frame(m.as_bytes())).unwrap();
            next_perl += 1;
        }
        a.send_message("srv", &i).unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        'ping: loop {
            assert!(Instant::now() < deadline, "round trip {i} stalled");
            for m in srv.get_messages().unwrap() {
                if m.from() == "perl" {
                    assert_eq!(m.content::<usize>().unwrap(), from_perl);
                    from_perl += 1;
                } else {
                    assert_eq!(m.content::<usize>().unwrap(), i);
                    srv.send_message("a", &i).unwrap();
                    break 'ping;
                }
            }
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            assert!(Instant::now() < deadline, "reply {i} stalled");
            if let Some(m) = a.get_messages().unwrap().first() {
                assert_eq!(m.content::<usize>().unwrap(), i);
                break;
            }
        }
    }
    assert_eq!(a.lane("srv"), Some(LaneKind::SharedMemory));
    let deadline = Instant::now() + Duration::from_secs(10);
    while from_perl < next_perl {
        assert!(
            Instant::now() < deadline,
            "{from_perl} of {next_perl} socket messages"
        );
        for m in srv.get_messages().unwrap() {
            assert_eq!(m.from(), "perl");
            assert_eq!(m.content::<usize>().unwrap(), from_perl);
            from_perl += 1;
        }
    }
}

/// A lane that carries nothing for a while is released both ways and
/// unmapped while the connection stays; the connection gets a new lane
/// when it is busy again; every message arrives once, in order, across
/// each switch both ways, and the statistics agree.
fn an_idle_lane_is_released_then_offered_again(b: BackendChoice) {
    let t = TestRoute::new(b);
    for ser in [Serializer::Binary, Serializer::Json] {
        let info = Info::new(ser.clone(), t.route.path());
        let name = |s: &str| format!("{s}-{}", ser.class().len());
        let (an, bn) = (name("a"), name("b"));
        let mut a = Client::connect(&info, &an, releasing_opts(&t)).unwrap();
        let mut bc = Client::connect(&info, &bn, releasing_opts(&t)).unwrap();
        let (mut got, mut back) = (Vec::new(), Vec::new());
        let (mut sent, mut replies) = (0, 0);
        for round in 0..3 {
            for i in 0..2_000 {
                a.send_message(&bn, &sent).unwrap();
                sent += 1;
                if i % 256 == 0 {
                    got.extend(bc.get_messages().unwrap());
                }
            }
            got.extend(until_on_lane(&mut a, &an, &mut bc, &bn));
            for _ in 0..100 {
                bc.send_message(&an, &replies).unwrap();
                replies += 1;
            }
            recv_until(&mut a, replies, &mut back);
            until_released(&mut a, &mut bc, &mut got);
            assert_eq!(a.lane(&bn), Some(LaneKind::Socket), "round {round}");
            assert_eq!(bc.lane(&an), Some(LaneKind::Socket), "round {round}");
            assert_eq!(a.resources().lanes + bc.resources().lanes, 0);
            // On the socket again, both ways.
            for _ in 0..10 {
                a.send_message(&bn, &sent).unwrap();
                sent += 1;
                bc.send_message(&an, &replies).unwrap();
                replies += 1;
            }
        }
        recv_until(&mut bc, sent, &mut got);
        recv_until(&mut a, replies, &mut back);
        assert_eq!(numbers(&got), (0..sent).collect::<Vec<_>>(), "{ser:?}");
        assert_eq!(numbers(&back), (0..replies).collect::<Vec<_>>(), "{ser:?}");
        assert_eq!(a.stats().sent[&bn], sent as u64);
        assert_eq!(bc.stats().read[&an], sent as u64);
        assert_eq!(bc.stats().sent[&an], replies as u64);
        assert_eq!(a.stats().read[&bn], replies as u64);
        a.disconnect(None).unwrap();
        bc.disconnect(None).unwrap();
    }
}

/// The threaded reactor releases an idle lane with no call to wake it
/// (its idle check is one of its deadlines), then carries on over the
/// socket and onto a new lane.
fn a_threaded_client_releases_an_idle_lane_and_carries_on(b: BackendChoice) {
    let t = TestRoute::new(b);
    let info = Info::new(Serializer::Binary, t.route.path());
    let srv = Client::connect(&info, "srv", releasing_opts(&t)).unwrap();
    let (stx, mut rx, handle) = srv.into_threaded().unwrap();
    let mut a = Client::connect(&info, "a", releasing_opts(&t)).unwrap();
    const N: usize = 5_000;
    let reader = std::thread::spawn(move || {
        let mut got = Vec::with_capacity(2 * N);
        while got.len() < 2 * N {
            let m = rx.recv_timeout(Duration::from_secs(10)).expect("message");
            got.push(m.content::<usize>().unwrap());
        }
        (rx, got)
    });
    let mut next = 0;
    for round in 0..2 {
        for _ in 0..N {
            a.send_message("srv", &next).unwrap();
            next += 1;
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while a.lane("srv") != Some(LaneKind::SharedMemory) {
            assert!(Instant::now() < deadline, "round {round}: no lane");
            a.get_messages_timeout(Duration::from_millis(5)).unwrap();
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while a.resources().lane_mappings > 0 || a.lane("srv") != Some(LaneKind::Socket) {
            assert!(
                Instant::now() < deadline,
                "round {round}: lane kept: {:?}",
                a.resources()
            );
            a.get_messages_timeout(Duration::from_millis(5)).unwrap();
        }
    }
    let (_rx, got) = reader.join().unwrap();
    assert_eq!(got, (0..next).collect::<Vec<_>>());
    // And back from the threaded sender, over the socket.
    let sender = std::thread::spawn(move || {
        let mut stx = stx;
        for i in 0..1_000 {
            stx.send("a", &i).unwrap();
        }
        stx
    });
    let mut back = Vec::new();
    recv_until(&mut a, 1_000, &mut back);
    let stx = sender.join().unwrap();
    assert_eq!(numbers(&back), (0..1_000).collect::<Vec<_>>());
    let stats = stx.stats().unwrap();
    assert_eq!(stats.read["a"], next as u64);
    assert_eq!(stats.sent["a"], 1_000);
    a.disconnect(None).unwrap();
    handle.shutdown().unwrap();
}

/// Sends 2,000 small messages from `a` to `b`, turning both until their
/// connection is on a lane; returns what `b` got meanwhile.
fn warm_onto_lane(a: &mut Client, an: &str, b: &mut Client, bn: &str) -> Vec<Message> {
    let mut got = Vec::new();
    for i in 0..2_000usize {
        a.send_message(bn, &i.to_string()).unwrap();
        if i % 256 == 0 {
            got.extend(b.get_messages().unwrap());
        }
    }
    got.extend(until_on_lane(a, an, b, bn));
    got
}

/// Sends 2,000 small messages from `a` to the threaded "srv" until their
/// connection is on a lane; returns how many `rx` took meanwhile.
fn warm_threaded(a: &mut Client, rx: &mut ipcm::Receiver) -> usize {
    for i in 0..2_000usize {
        a.send_message("srv", &i).unwrap();
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut n = 0;
    while a.lane("srv") != Some(LaneKind::SharedMemory) {
        assert!(Instant::now() < deadline, "no lane");
        a.get_messages_timeout(Duration::from_millis(5)).unwrap();
        while rx.try_recv().is_some() {
            n += 1;
        }
    }
    n
}

/// Whether `m`'s content lies, whole, in a large-payload mapping: it was
/// received without a copy.
fn in_a_blob_mapping(m: &Message) -> bool {
    let c = m.content_bytes();
    let (start, end) = (c.as_ptr() as usize, c.as_ptr() as usize + c.len());
    memfd_mappings("ipcm-blob")
        .iter()
        .any(|&(a, b)| a <= start && end <= b)
}

/// 16 MiB of content, as JSON text (a string).
fn big_content() -> String {
    let mut s = String::with_capacity(16 << 20);
    while s.len() < 16 << 20 {
        s.push_str(&format!("{:08x}", s.len()));
    }
    s
}

/// A 16 MiB message between ipcm peers on a lane goes as a sealed memfd and
/// is received without a copy of its content; the messages around it keep
/// their order, and the statistics count it once.
fn a_16_mib_message_arrives_in_a_sealed_memfd_without_a_copy(b: BackendChoice) {
    let t = TestRoute::new(b);
    let big = big_content();
    for ser in [Serializer::Binary, Serializer::Json] {
        let info = Info::new(ser.clone(), t.route.path());
        let name = |s: &str| format!("{s}-{}", ser.class().len());
        let (an, bn) = (name("a"), name("b"));
        let mut a = Client::connect(&info, &an, lane_opts(&t)).unwrap();
        let mut bc = Client::connect(&info, &bn, lane_opts(&t)).unwrap();
        let mut got = Vec::new();
        got.extend(warm_onto_lane(&mut a, &an, &mut bc, &bn));
        // From a thread: a send that had to go through the ring would wait
        // for room the receiver makes.
        let (bn2, big2) = (bn.clone(), big.clone());
        let sender = std::thread::spawn(move || {
            a.send_message(&bn2, &"before").unwrap();
            a.send_message(&bn2, &big2).unwrap();
            a.send_message(&bn2, &"after").unwrap();
            a
        });
        recv_until(&mut bc, 2_003, &mut got);
        let mut a = sender.join().unwrap();
        let texts: Vec<String> = got.iter().map(|m| m.content::<String>().unwrap()).collect();
        let want: Vec<String> = (0..2_000usize)
            .map(|i| i.to_string())
            .chain(["before".to_string(), big.clone(), "after".to_string()])
            .collect();
        assert!(texts == want, "{ser:?}: order or content differs");
        assert!(
            in_a_blob_mapping(&got[2_001]),
            "{ser:?}: the 16 MiB content was copied"
        );
        assert!(!in_a_blob_mapping(&got[2_002]));
        assert_eq!(a.stats().sent[&bn], 2_003);
        assert_eq!(bc.stats().read[&an], 2_003);
        drop(got);
        a.disconnect(None).unwrap();
        bc.disconnect(None).unwrap();
    }
}

/// Before any lane (the first messages of a connection), a 16 MiB message
/// goes as a sealed memfd on the socket too: from the initiator on both
/// routes, back from the listener on a Binary route; on a Json route the
/// listener's answer goes whole (its peer might be a Perl client). Order
/// and statistics are kept.
fn a_16_mib_message_on_the_socket_goes_as_a_memfd_too(b: BackendChoice) {
    let t = TestRoute::new(b);
    let big = big_content();
    for ser in [Serializer::Binary, Serializer::Json] {
        let binary = matches!(ser, Serializer::Binary);
        let info = Info::new(ser.clone(), t.route.path());
        let name = |s: &str| format!("{s}-{}", ser.class().len());
        let (an, bn) = (name("a"), name("b"));
        // No lane: it would be offered after 64 MiB.
        let opts = lane_opts(&t).lane_after_bytes(64 << 20);
        let mut a = Client::connect(&info, &an, opts.clone()).unwrap();
        let mut bc = Client::connect(&info, &bn, opts).unwrap();
        let (bn2, big2) = (bn.clone(), big.clone());
        let sender = std::thread::spawn(move || {
            a.send_message(&bn2, &"before").unwrap();
            a.send_message(&bn2, &big2).unwrap();
            a.send_message(&bn2, &"after").unwrap();
            a
        });
        let mut got = Vec::new();
        recv_until(&mut bc, 3, &mut got);
        let mut a = sender.join().unwrap();
        assert_eq!(a.lane(&bn), Some(LaneKind::Socket));
        assert!(got[1].content::<String>().unwrap() == big, "{ser:?}");
        assert_eq!(got[2].content::<String>().unwrap(), "after");
        assert!(in_a_blob_mapping(&got[1]), "{ser:?}: copied");
        assert_eq!(a.stats().sent[&bn], 3);
        assert_eq!(bc.stats().read[&an], 3);
        drop(got);
        // And back, on the connection a opened.
        let (an2, big2) = (an.clone(), big.clone());
        let sender = std::thread::spawn(move || {
            bc.send_message(&an2, &big2).unwrap();
            bc.send_message(&an2, &"last").unwrap();
            bc
        });
        let mut back = Vec::new();
        recv_until(&mut a, 2, &mut back);
        let mut bc = sender.join().unwrap();
        assert!(back[0].content::<String>().unwrap() == big, "{ser:?}");
        assert_eq!(back[1].content::<String>().unwrap(), "last");
        assert_eq!(in_a_blob_mapping(&back[0]), binary, "{ser:?}");
        drop(back);
        a.disconnect(None).unwrap();
        bc.disconnect(None).unwrap();
    }
}

/// The same through a threaded receiver's ring, and back from its sender.
fn a_threaded_receiver_gets_a_large_payload_without_a_copy(b: BackendChoice) {
    let t = TestRoute::new(b);
    let info = Info::new(Serializer::Binary, t.route.path());
    let srv = Client::connect(&info, "srv", lane_opts(&t)).unwrap();
    let (stx, mut rx, handle) = srv.into_threaded().unwrap();
    let mut a = Client::connect(&info, "a", lane_opts(&t)).unwrap();
    let mut small = warm_threaded(&mut a, &mut rx);
    let big = big_content();
    a.send_message("srv", &big).unwrap();
    while small < 2_000 {
        rx.recv_timeout(Duration::from_secs(10)).expect("message");
        small += 1;
    }
    let m = rx
        .recv_timeout(Duration::from_secs(10))
        .expect("the large one");
    assert!(m.content::<String>().unwrap() == big, "content differs");
    assert!(in_a_blob_mapping(&m), "the 16 MiB content was copied");
    drop(m);
    // And back: the threaded sender's reactor sends it as a memfd too.
    let copy = big.clone();
    let sender = std::thread::spawn(move || {
        let mut stx = stx;
        stx.send("a", &copy).unwrap();
        stx
    });
    let mut back = Vec::new();
    recv_until(&mut a, 1, &mut back);
    let _stx = sender.join().unwrap();
    assert!(back[0].content::<String>().unwrap() == big);
    assert!(in_a_blob_mapping(&back[0]), "copied on the way back");
    drop(back);
    a.disconnect(None).unwrap();
    handle.shutdown().unwrap();
}

/// Reads what a memfd of the test's holds.
fn memfd_text(fd: &std::os::fd::OwnedFd) -> Vec<u8> {
    let mut buf = [0u8; 32];
    let n = rustix::io::pread(fd, &mut buf, 0).unwrap();
    buf[..n].to_vec()
}

fn memfd_with(text: &[u8]) -> std::os::fd::OwnedFd {
    let fd = rustix::fs::memfd_create("t", rustix::fs::MemfdFlags::CLOEXEC).unwrap();
    rustix::io::write(&fd, text).unwrap();
    fd
}

/// `from` sends "before", "with" (carrying a memfd holding `tag`) and
/// "after" to `to`; the memfd comes with "with" only.
fn fds_between(from: &mut Client, to: &mut Client, to_name: &str, tag: &[u8]) {
    from.send_message(to_name, &"before").unwrap();
    from.send_message_with_fds(to_name, &"with", vec![memfd_with(tag)])
        .unwrap();
    from.send_message(to_name, &"after").unwrap();
    let mut got = Vec::new();
    recv_until(to, 3, &mut got);
    let texts: Vec<String> = got.iter().map(|m| m.content::<String>().unwrap()).collect();
    assert_eq!(texts, ["before", "with", "after"]);
    assert!(got[0].take_fds().is_empty() && got[2].take_fds().is_empty());
    let fds = got[1].take_fds();
    assert_eq!(fds.len(), 1);
    assert_eq!(memfd_text(&fds[0]), tag);
}

/// A pipe's write end and a memfd attached to a message arrive with that
/// message (not the ones around it) as working descriptors: over the
/// socket (to a listener, whose process's beacon takes them; back from
/// the listener on a Binary route, where the peer is ipcm for sure) and
/// over a lane, inline and through a threaded receiver and sender. A
/// sender with the lane off, and a listener answering on a Json route
/// without a lane (the peer might be Perl), are refused, and nothing is
/// sent.
fn descriptors_travel_with_their_message(b: BackendChoice) {
    use std::os::fd::OwnedFd;
    let t = TestRoute::new(b);
    for ser in [Serializer::Binary, Serializer::Json] {
        let binary = matches!(ser, Serializer::Binary);
        let info = Info::new(ser.clone(), t.route.path());
        let name = |s: &str| format!("{s}-{}", ser.class().len());
        let (an, bn, cn, dn) = (name("a"), name("b"), name("c"), name("d"));
        let mut a = Client::connect(&info, &an, lane_opts(&t)).unwrap();
        let mut bc = Client::connect(&info, &bn, lane_opts(&t)).unwrap();
        let mut cc = Client::connect(&info, &cn, lane_opts(&t)).unwrap();
        // a -> c on the socket (a few messages: no lane).
        fds_between(&mut a, &mut cc, &cn, b"to c");
        assert_eq!(a.lane(&cn), Some(LaneKind::Socket));
        // c answers on the connection a opened.
        if binary {
            fds_between(&mut cc, &mut a, &an, b"to a");
        } else {
            let err = cc
                .send_message_with_fds(&an, &"fds", vec![memfd_with(b"no")])
                .unwrap_err();
            assert!(matches!(err, Error::NoLane { .. }), "{err}");
        }
        assert_eq!(cc.lane(&an), Some(LaneKind::Socket));
        // A sender with the lane off passes none, and sends nothing.
        let mut d = Client::connect(&info, &dn, lane_opts(&t).lane(false)).unwrap();
        d.send_message(&cn, &0).unwrap();
        let err = d
            .send_message_with_fds(&cn, &"fds", vec![memfd_with(b"no")])
            .unwrap_err();
        assert!(matches!(err, Error::NoLane { .. }), "{err}");
        d.send_message(&cn, &1).unwrap();
        let mut on_c = Vec::new();
        recv_until(&mut cc, 2, &mut on_c);
        assert_eq!(numbers(&on_c), [0, 1], "nothing sent for the refused one");
        let mut got = Vec::new();
        got.extend(warm_onto_lane(&mut a, &an, &mut bc, &bn));
        let (mut r, w) = std::io::pipe().unwrap();
        let memfd = rustix::fs::memfd_create("t", rustix::fs::MemfdFlags::CLOEXEC).unwrap();
        rustix::io::write(&memfd, b"memfd bytes").unwrap();
        a.send_message(&bn, &"before").unwrap();
        a.send_message_with_fds(&bn, &"with", vec![OwnedFd::from(w), memfd])
            .unwrap();
        a.send_message(&bn, &"after").unwrap();
        recv_until(&mut bc, 2_003, &mut got);
        let texts: Vec<String> = got[2_000..]
            .iter()
            .map(|m| m.content::<String>().unwrap())
            .collect();
        assert_eq!(texts, ["before", "with", "after"], "{ser:?}");
        assert!(got[2_000].take_fds().is_empty());
        assert!(got[2_002].take_fds().is_empty());
        let mut fds = got[2_001].take_fds();
        assert_eq!(fds.len(), 2, "{ser:?}");
        assert!(got[2_001].take_fds().is_empty(), "taken once");
        let mem = fds.pop().unwrap();
        let mut buf = [0u8; 11];
        assert_eq!(rustix::io::pread(&mem, &mut buf, 0).unwrap(), 11);
        assert_eq!(&buf, b"memfd bytes");
        let mut w = std::fs::File::from(fds.pop().unwrap());
        w.write_all(b"through the pipe").unwrap();
        drop(w);
        let mut s = String::new();
        r.read_to_string(&mut s).unwrap();
        assert_eq!(
            s, "through the pipe",
            "the pipe's last writer was the passed end"
        );
        a.disconnect(None).unwrap();
        bc.disconnect(None).unwrap();
        cc.disconnect(None).unwrap();
    }
    // Through a threaded receiver.
    let info = Info::new(Serializer::Binary, t.route.path());
    let srv = Client::connect(&info, "srv", lane_opts(&t)).unwrap();
    let (mut stx, mut rx, handle) = srv.into_threaded().unwrap();
    let mut a = Client::connect(&info, "a", lane_opts(&t)).unwrap();
    let mut n = warm_threaded(&mut a, &mut rx);
    // The threaded sender passes descriptors too, over the lane.
    let sender = std::thread::spawn(move || {
        stx.send("a", &"before").unwrap();
        stx.send_with_fds("a", &"with", vec![memfd_with(b"from srv")])
            .unwrap();
        stx.send("a", &"after").unwrap();
        stx
    });
    let mut back = Vec::new();
    recv_until(&mut a, 3, &mut back);
    let _stx = sender.join().unwrap();
    let texts: Vec<String> = back
        .iter()
        .map(|m| m.content::<String>().unwrap())
        .collect();
    assert_eq!(texts, ["before", "with", "after"]);
    let fds = back[1].take_fds();
    assert_eq!(fds.len(), 1);
    assert_eq!(memfd_text(&fds[0]), b"from srv");
    assert!(back[0].take_fds().is_empty() && back[2].take_fds().is_empty());
    let memfd = rustix::fs::memfd_create("t", rustix::fs::MemfdFlags::CLOEXEC).unwrap();
    rustix::io::write(&memfd, b"threaded").unwrap();
    a.send_message_with_fds("srv", &"with", vec![memfd])
        .unwrap();
    while n < 2_000 {
        rx.recv_timeout(Duration::from_secs(10)).expect("message");
        n += 1;
    }
    let m = rx
        .recv_timeout(Duration::from_secs(10))
        .expect("the one with fds");
    let fds = m.take_fds();
    assert_eq!(fds.len(), 1);
    let mut buf = [0u8; 8];
    assert_eq!(rustix::io::pread(&fds[0], &mut buf, 0).unwrap(), 8);
    assert_eq!(&buf, b"threaded");
    a.disconnect(None).unwrap();
    handle.shutdown().unwrap();
}

fn a_perl_shaped_initiator_never_sees_a_control_frame(b: BackendChoice) {
    let t = TestRoute::new(b);
    let mut srv = Client::connect(&t.info(), "srv", lane_opts(&t).lane_after_bytes(0)).unwrap();
    let mut p = UnixStream::connect(srv.path()).unwrap();
    p.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    p.write_all(&frame(br#"{"hello":"perl"}"#)).unwrap();
    const N: usize = 2000;
    // A thread writes, so a full socket buffer waits for `srv` to read.
    let writer = std::thread::spawn(move || {
        for i in 0..N {
            let m =
                format!(r#"{{"from":"perl","to":"srv","content":{i},"stamp":1.5,"id":"X{i}"}}"#);
            p.write_all(&frame(m.as_bytes())).unwrap();
        }
        p
    });
    let mut got = Vec::new();
    recv_until(&mut srv, N, &mut got);
    let mut p = writer.join().unwrap();
    assert_eq!(numbers(&got), (0..N).collect::<Vec<_>>());
    let reader = std::thread::spawn(move || (read_frames(&mut p, N), p));
    for i in 0..N {
        srv.send_message("perl", &i).unwrap();
    }
    assert_eq!(srv.lane("perl"), Some(LaneKind::Socket));
    let (frames, mut p) = reader.join().unwrap();
    for (i, f) in frames.iter().enumerate() {
        let v: serde_json::Value = serde_json::from_slice(f).expect("a JSON message");
        assert_eq!(v["content"], i);
        assert_eq!(v["from"], "srv");
    }
    srv.disconnect(None).unwrap();
    // Nothing after the messages but the end of stream.
    let mut rest = Vec::new();
    p.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty(), "{} more bytes", rest.len());
}

/// In a process of its own: no listening ipcm client, so no beacon, as in
/// a Perl process. The ipcm initiator sends the Perl bytes and nothing
/// else.
fn a_perl_shaped_acceptor_sees_only_the_hello_and_messages(b: BackendChoice) {
    let t = TestRoute::new(b);
    let l = UnixListener::bind(t.file("perl")).unwrap();
    let mut a = Client::connect(
        &t.info(),
        "a",
        lane_opts(&t).lane_after_bytes(0).listen(false),
    )
    .unwrap();
    const N: usize = 3000;
    let reader = std::thread::spawn(move || {
        let (mut s, _) = l.accept().unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let frames = read_frames(&mut s, N + 1);
        let mut rest = Vec::new();
        s.read_to_end(&mut rest).unwrap();
        (frames, rest)
    });
    for i in 0..N {
        a.send_message("perl", &i).unwrap();
    }
    assert_eq!(a.lane("perl"), Some(LaneKind::Socket));
    a.disconnect(None).unwrap();
    let (frames, rest) = reader.join().unwrap();
    assert_eq!(
        frames[0], br#"{"hello":"a"}"#,
        "the hello is Perl's, key for key"
    );
    for (i, f) in frames[1..].iter().enumerate() {
        let v: serde_json::Value = serde_json::from_slice(f).expect("a JSON message");
        assert_eq!(v["content"], i);
        let mut keys: Vec<&str> = v.as_object().unwrap().keys().map(|k| k.as_str()).collect();
        keys.sort();
        assert_eq!(keys, ["content", "from", "id", "stamp", "stamp_ord", "to"]);
    }
    assert!(rest.is_empty(), "{} bytes after the messages", rest.len());
}

fn the_lane_can_be_turned_off(b: BackendChoice) {
    let t = TestRoute::new(b);
    let mut a = Client::connect(&t.info(), "a", lane_opts(&t).lane(false)).unwrap();
    let mut bc = Client::connect(&t.info(), "b", lane_opts(&t)).unwrap();
    let mut got = Vec::new();
    for i in 0..5000 {
        a.send_message("b", &i).unwrap();
        if i % 256 == 0 {
            got.extend(bc.get_messages().unwrap());
        }
    }
    recv_until(&mut bc, 5000, &mut got);
    a.get_messages().unwrap();
    assert_eq!(a.lane("b"), Some(LaneKind::Socket));
    assert_eq!(bc.lane("a"), Some(LaneKind::Socket));
    assert_eq!(bc.resources().lanes, 0);
    // The environment turns it off for a whole process.
    run_helper("lane_env", &t, b, &[(ipcm::LANE_ENV, "off")], "lane=socket");
    a.disconnect(None).unwrap();
    bc.disconnect(None).unwrap();
}

fn a_writer_killed_mid_write_yields_no_torn_message(b: BackendChoice) {
    let t = TestRoute::new(b);
    let info = Info::new(Serializer::Binary, t.route.path());
    let mut srv = Client::connect(&info, "srv", lane_opts(&t)).unwrap();
    let mut child = helper_command("lane_writer")
        .env("IPCM_INFO", info.to_info_string())
        .env("IPCM_TEST_BACKEND", backend_name(b))
        .spawn()
        .unwrap();
    let mut got: Vec<Message> = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    // Until the writer is on the lane and well into it.
    while srv.lane("writer") != Some(LaneKind::SharedMemory) || got.len() < 200_000 {
        assert!(
            Instant::now() < deadline,
            "{} arrived, lane {:?}",
            got.len(),
            srv.lane("writer")
        );
        got.extend(srv.get_messages_timeout(Duration::from_millis(5)).unwrap());
    }
    child.kill().unwrap();
    child.wait().unwrap();
    // The rest drains; the connection closes at the end of stream.
    let quiet = Instant::now() + Duration::from_secs(10);
    while srv.lane("writer").is_some() {
        assert!(Instant::now() < quiet, "the dead writer's connection stays");
        got.extend(srv.get_messages_timeout(Duration::from_millis(20)).unwrap());
    }
    got.extend(srv.get_messages().unwrap());
    let n = numbers(&got);
    assert_eq!(
        n,
        (0..n.len()).collect::<Vec<_>>(),
        "no gap, no torn or repeated message"
    );
    srv.disconnect(None).unwrap();
}

fn refused_shared_memory_keeps_the_socket_and_says_why_once(b: BackendChoice) {
    let t = TestRoute::new(b);
    run_helper("no_memfd", &t, b, &[], "memfd refusal checks passed");
}

/// Runs helper process `role` on `t`'s route with `env` added; it must
/// succeed and print `needle`.
fn run_helper(role: &str, t: &TestRoute, b: BackendChoice, env: &[(&str, &str)], needle: &str) {
    let out = helper_command(role)
        .env("IPCM_INFO", t.info().to_info_string())
        .env("IPCM_TEST_BACKEND", backend_name(b))
        .envs(env.iter().copied())
        .stdout(std::process::Stdio::piped())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains(needle), "{stdout}");
}

/// The ranges of this process's mappings of memfds named `name`
/// (`/proc/self/maps`).
fn memfd_mappings(name: &str) -> Vec<(usize, usize)> {
    let needle = format!("memfd:{name}");
    std::fs::read_to_string("/proc/self/maps")
        .unwrap()
        .lines()
        .filter(|l| l.contains(&needle))
        .map(|l| {
            let range = l.split_whitespace().next().unwrap();
            let (a, b) = range.split_once('-').unwrap();
            (
                usize::from_str_radix(a, 16).unwrap(),
                usize::from_str_radix(b, 16).unwrap(),
            )
        })
        .collect()
}

/// The lane mappings of this process.
fn lane_mappings() -> Vec<(usize, usize)> {
    memfd_mappings("ipcm-lane")
}

fn a_scribbled_ring_closes_its_connection_and_nothing_else(b: BackendChoice) {
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    let t = TestRoute::new(b);
    let info = Info::new(Serializer::Binary, t.route.path());
    let opts = lane_opts(&t).lane_after_bytes(0);
    let mut a = Client::connect(&info, "a", opts.clone()).unwrap();
    let mut bc = Client::connect(&info, "b", opts.clone()).unwrap();
    let mut c = Client::connect(&info, "c", opts.lane(false)).unwrap();
    a.send_message("b", &0usize).unwrap();
    until_on_lane(&mut a, "a", &mut bc, "b");
    assert_eq!(lane_mappings().len(), 2, "both ends map the lane");
    // The hostile peer maps the lane's memory on its own, as a peer
    // process would: the clients may unmap theirs while it scribbles.
    let fd = std::fs::read_dir("/proc/self/fd")
        .unwrap()
        .filter_map(|e| e.ok())
        .find(|e| {
            std::fs::read_link(e.path())
                .is_ok_and(|l| l.to_string_lossy().contains("memfd:ipcm-lane"))
        })
        .expect("the lane's memfd");
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(fd.path())
        .unwrap();
    let len = file.metadata().unwrap().len() as usize;
    // SAFETY: a fresh shared mapping of a file we opened, of its length;
    // nothing else in this process uses this mapping, and it is unmapped
    // after the scope, when the scribbler has stopped.
    let base = unsafe {
        use std::os::fd::AsRawFd;
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            file.as_raw_fd(),
            0,
        )
    };
    assert_ne!(base, libc::MAP_FAILED);
    let base = base as usize;
    let stop = AtomicBool::new(false);
    std::thread::scope(|s| {
        // Random words anywhere in the shared memory.
        s.spawn(|| {
            let mut x = 0x9E37_79B9_7F4A_7C15u64;
            while !stop.load(Ordering::Relaxed) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let at = base + (x as usize >> 3) % (len / 8) * 8;
                // SAFETY: in bounds and aligned in our own mapping, which
                // lives until after this thread stops.
                unsafe { AtomicU64::from_ptr(at as *mut u64) }.store(x >> 11, Ordering::Relaxed);
            }
        });
        // Stops the scribbler however this scope ends.
        struct Stop<'a>(&'a AtomicBool);
        impl Drop for Stop<'_> {
            fn drop(&mut self) {
                self.0.store(true, Ordering::Relaxed);
            }
        }
        let _stop = Stop(&stop);
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut i = 1usize;
        // Traffic until either end finds the ring broken and closes (a
        // later send would connect anew, on a fresh lane).
        while bc.lane("a").is_some() && a.lane("b").is_some() {
            assert!(
                Instant::now() < deadline,
                "the scribbled lane was never noticed"
            );
            let _ = a.try_send_message("b", &i);
            i += 1;
            let _ = bc.get_messages_timeout(Duration::from_millis(1));
            let _ = a.get_messages_timeout(Duration::from_millis(1));
        }
        // The other end follows at the end of stream.
        while bc.lane("a").is_some() || a.lane("b").is_some() {
            assert!(Instant::now() < deadline, "the broken lane stays open");
            let _ = bc.get_messages_timeout(Duration::from_millis(1));
            let _ = a.get_messages_timeout(Duration::from_millis(1));
        }
        stop.store(true, Ordering::Relaxed);
    });
    // SAFETY: our own mapping, no longer used by anyone.
    assert_eq!(unsafe { libc::munmap(base as *mut libc::c_void, len) }, 0);
    drop(file);
    // The others carry on.
    c.send_message("b", "still here").unwrap();
    let mut got = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !got.iter().any(|m: &Message| m.from() == "c") {
        assert!(Instant::now() < deadline);
        got.extend(bc.get_messages_timeout(Duration::from_millis(20)).unwrap());
    }
    for cl in [a, bc, c] {
        let _ = { cl }.disconnect(None);
    }
}

/// The process's open descriptors by kind: what each links to, with inode
/// numbers and deleted-file marks cut, counted.
fn fd_kinds() -> std::collections::BTreeMap<String, usize> {
    let mut kinds = std::collections::BTreeMap::new();
    for e in std::fs::read_dir("/proc/self/fd").unwrap() {
        let Ok(target) = std::fs::read_link(e.unwrap().path()) else {
            continue; // the directory's own descriptor, closed by now
        };
        let t = target.to_string_lossy();
        let kind = match t.find(":[") {
            Some(i) if !t.starts_with("anon_inode") => t[..i].to_string(),
            _ => t.trim_end_matches(" (deleted)").to_string(),
        };
        *kinds.entry(kind).or_insert(0) += 1;
    }
    kinds
}

/// Epoll instances are reactor-lifetime state, made on first use: the
/// io_uring backend makes its hot set's when a connection first turns
/// into a conversation, which depends on timing. Everything else must
/// match `before` exactly; epoll instances may only have grown up to one
/// per reactor (`reactors`) over `start` (before any client).
fn assert_fds_back(
    before: &std::collections::BTreeMap<String, usize>,
    start: &std::collections::BTreeMap<String, usize>,
    reactors: usize,
    what: &str,
) {
    const EPOLL: &str = "anon_inode:[eventpoll]";
    let mut now = fd_kinds();
    let mut before = before.clone();
    let epolls = now.remove(EPOLL).unwrap_or(0);
    before.remove(EPOLL);
    assert_eq!(now, before, "descriptors {what}");
    let base = start.get(EPOLL).copied().unwrap_or(0);
    assert!(
        epolls <= base + reactors,
        "descriptors {what}: {epolls} epoll instances for {reactors} reactors (over {base})"
    );
}

fn upgrade_and_close_cycles_leave_no_descriptor_or_mapping(b: BackendChoice) {
    let t = TestRoute::new(b);
    let info = Info::new(Serializer::Binary, t.route.path());
    let at_start = fd_kinds();
    let mut srv = Client::connect(&info, "srv", lane_opts(&t).lane_after_bytes(0)).unwrap();
    let cycle = |srv: &mut Client, i: usize| {
        let mut a =
            Client::connect(&info, "a", lane_opts(&t).lane_after_bytes(0).listen(false)).unwrap();
        a.send_message("srv", &i).unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while srv.lane("a") != Some(LaneKind::SharedMemory)
            || a.lane("srv") != Some(LaneKind::SharedMemory)
        {
            assert!(Instant::now() < deadline, "cycle {i}: no lane");
            srv.get_messages().unwrap();
            a.get_messages().unwrap();
        }
        a.disconnect(None).unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while srv.lane("a").is_some() {
            assert!(Instant::now() < deadline, "cycle {i}: connection stays");
            srv.get_messages().unwrap();
        }
    };
    // Warm up: the beacon, pools and tables.
    for i in 0..20 {
        cycle(&mut srv, i);
    }
    let (fds, maps) = (fd_kinds(), lane_mappings().len());
    assert_eq!(maps, 0);
    const CYCLES: usize = 10_000;
    let start = Instant::now();
    for i in 0..CYCLES {
        cycle(&mut srv, i);
    }
    eprintln!("{CYCLES} upgrade/close cycles in {:?}", start.elapsed());
    // One reactor stays: the listener's (each cycle's client is gone).
    assert_fds_back(&fds, &at_start, 1, &format!("after {CYCLES} cycles"));
    assert_eq!(
        lane_mappings().len(),
        maps,
        "lane mappings after {CYCLES} cycles"
    );
    srv.disconnect(None).unwrap();
}

/// Released lanes give their memory and memfds back while their
/// connections stay open. Reads the process's mappings and descriptors:
/// in a process of its own.
fn released_lanes_leave_no_mapping_or_descriptor(b: BackendChoice) {
    let t = TestRoute::new(b);
    let info = Info::new(Serializer::Binary, t.route.path());
    let start = fd_kinds();
    let mut srv = Client::connect(&info, "srv", releasing_opts(&t)).unwrap();
    let mut clients: Vec<Client> = (0..4)
        .map(|i| {
            Client::connect(&info, &format!("c{i}"), releasing_opts(&t).listen(false)).unwrap()
        })
        .collect();
    // Every connection open, before any lane.
    for c in &mut clients {
        c.send_message("srv", &0).unwrap();
    }
    let mut got = Vec::new();
    recv_until(&mut srv, clients.len(), &mut got);
    assert_eq!(lane_mappings().len(), 0);
    // Twice: the first round makes what stays for good (the beacon, each
    // backend's epoll set for hot connections); the second must give back
    // all it took.
    let mut fds = std::collections::BTreeMap::new();
    for round in 0..2 {
        for (i, c) in clients.iter_mut().enumerate() {
            for n in 0..2_000 {
                c.send_message("srv", &n).unwrap();
                if n % 256 == 0 {
                    got.extend(srv.get_messages().unwrap());
                }
            }
            got.extend(until_on_lane(c, &format!("c{i}"), &mut srv, "srv"));
        }
        assert_eq!(lane_mappings().len(), 2 * clients.len(), "both ends map");
        let deadline = Instant::now() + Duration::from_secs(10);
        while srv.resources().lane_mappings > 0
            || clients.iter().any(|c| c.resources().lane_mappings > 0)
        {
            assert!(
                Instant::now() < deadline,
                "lanes kept: {:?}",
                srv.resources()
            );
            got.extend(srv.get_messages_timeout(Duration::from_millis(5)).unwrap());
            for c in &mut clients {
                c.get_messages_timeout(Duration::from_millis(1)).unwrap();
            }
        }
        assert_eq!(
            lane_mappings().len(),
            0,
            "round {round}: mappings after release"
        );
        if round == 0 {
            fds = fd_kinds();
        } else {
            assert_fds_back(&fds, &start, 1 + clients.len(), "after release");
        }
        assert_eq!(srv.resources().connections, clients.len());
    }
    recv_until(&mut srv, clients.len() * 4_001, &mut got);
    srv.disconnect(None).unwrap();
}

/// More clients than one offer's accepts pass their memfds before the
/// listener looks at any offer (their first sends all complete first):
/// every offer still finds its descriptor (each offer accepts until its
/// own arrives and keeps the others for theirs), and every connection
/// carries its messages in order over its lane. Many descriptors: in a
/// process of its own.
fn seventy_clients_offering_at_once_all_get_lanes(b: BackendChoice) {
    let t = TestRoute::new(b);
    let info = Info::new(Serializer::Binary, t.route.path());
    let opts = lane_opts(&t).lane_after_bytes(0).lane_ring_bytes(4096);
    let mut srv = Client::connect(&info, "srv", opts.clone()).unwrap();
    let mut clients: Vec<Client> = (0..70)
        .map(|i| {
            let mut c =
                Client::connect(&info, &format!("c{i}"), opts.clone().listen(false)).unwrap();
            c.send_message("srv", &0u64).unwrap();
            c
        })
        .collect();
    let mut got = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        got.extend(srv.get_messages().unwrap());
        for c in &mut clients {
            c.get_messages().unwrap();
        }
        let up = clients
            .iter()
            .filter(|c| c.lane("srv") == Some(LaneKind::SharedMemory))
            .count();
        if up == clients.len() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{up} of {} connections got a lane",
            clients.len()
        );
    }
    for n in 1..=3 {
        for c in &mut clients {
            c.send_message("srv", &(n as u64)).unwrap();
        }
    }
    recv_until(&mut srv, 4 * clients.len(), &mut got);
    assert_eq!(srv.resources().lanes, clients.len());
    for (i, _) in clients.iter().enumerate() {
        let from = format!("c{i}");
        let ns: Vec<u64> = got
            .iter()
            .filter(|m| m.from() == from)
            .map(|m| m.content::<u64>().unwrap())
            .collect();
        assert_eq!(ns, [0, 1, 2, 3], "{from}'s messages");
    }
}

/// Helper processes: `lane_writer` sends numbers to `srv` until killed;
/// `no_memfd` checks the fallback with `memfd_create` refused; `lane_env`
/// reports the lane with the lane turned off by the environment.
#[test]
#[ignore = "helper process entry, run by the tests of this file"]
fn helper_process_entry() {
    let Ok(role) = std::env::var(ROLE_ENV) else {
        return;
    };
    init_logging();
    let info = Info::parse(&std::env::var("IPCM_INFO").unwrap()).unwrap();
    let b = backend_from_env();
    let opts = ipcm::Options::new()
        .backend(b)
        .lane(true)
        .lane_after_bytes(4096);
    match role.as_str() {
        "lane_writer" => {
            let mut w = Client::connect(&info, "writer", opts.listen(false)).unwrap();
            for i in 0usize.. {
                w.queue_message("srv", &i).unwrap_or_else(|_| {
                    w.flush_pending(Some(Duration::from_secs(10))).unwrap();
                    w.queue_message("srv", &i).unwrap();
                });
                if i % 64 == 0 {
                    w.flush_pending(Some(Duration::from_secs(10))).unwrap();
                }
            }
        }
        "lane_env" => {
            let mut a = Client::connect(&info, "env-a", opts.clone()).unwrap();
            let mut bc = Client::connect(&info, "env-b", opts).unwrap();
            for i in 0..5000 {
                a.send_message("env-b", &i).unwrap();
                if i % 256 == 0 {
                    bc.get_messages().unwrap();
                }
            }
            a.get_messages().unwrap();
            println!("lane={}", a.lane("env-b").unwrap());
            a.disconnect(None).unwrap();
            bc.disconnect(Some(&mut |_, _| {})).unwrap();
        }
        "no_memfd" => {
            refuse_syscall(libc::SYS_memfd_create);
            let mut srv = Client::connect(&info, "srv", opts.clone()).unwrap();
            for k in 0..3 {
                let name = format!("a{k}");
                let mut a = Client::connect(&info, &name, opts.clone().listen(false)).unwrap();
                let mut got = Vec::new();
                for i in 0..3000 {
                    a.send_message("srv", &i).unwrap();
                    if i % 256 == 0 {
                        got.extend(srv.get_messages().unwrap());
                    }
                }
                recv_until(&mut srv, 3000, &mut got);
                assert_eq!(numbers(&got), (0..3000).collect::<Vec<_>>());
                a.get_messages().unwrap();
                assert_eq!(a.lane("srv"), Some(LaneKind::Socket));
                a.disconnect(None).unwrap();
            }
            let warned = logged(log::Level::Warn, "shared-memory lane unavailable");
            assert_eq!(warned.len(), 1, "{warned:?}");
            assert!(warned[0].contains("memfd_create"), "{warned:?}");
            srv.disconnect(None).unwrap();
            println!("memfd refusal checks passed");
        }
        other => panic!("unknown role {other}"),
    }
}

fn epoch_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

/// Messages on a lane stamp no activity as they pass (no clock read per
/// message), yet `last_activity` and `close_idle_connections` see them,
/// both ways, and a backdated connection with no traffic since is idle.
fn lane_traffic_counts_as_activity(b: BackendChoice) {
    let t = TestRoute::new(b);
    let info = Info::new(Serializer::Binary, t.route.path());
    // Never released: the lanes' check then runs only every 5 s, so this
    // test sees what the queries themselves find. Busy polling: a reader
    // that never sleeps is sent no `WAKE` frames, so nothing crosses the
    // sockets (whose frames stamp activity as they always did).
    let opts = lane_opts(&t).lane_release_after(None).busy_poll(true);
    let mut a = Client::connect(&info, "a", opts.clone()).unwrap();
    let mut bc = Client::connect(&info, "b", opts).unwrap();
    for i in 0..200 {
        a.send_message("b", &i).unwrap();
    }
    let mut got = until_on_lane(&mut a, "a", &mut bc, "b");
    recv_until(&mut bc, 200, &mut got);
    // Backdated, with no traffic since: idle by the stamps.
    assert!(a.set_last_activity("b", 1.0));
    assert!(bc.set_last_activity("a", 1.0));
    assert_eq!(a.last_activity("b"), Some(1.0));
    assert_eq!(bc.last_activity("a"), Some(1.0));
    // Traffic over the lane, both ways.
    a.send_message("b", &"ping").unwrap();
    let mut back = Vec::new();
    recv_until(&mut bc, 1, &mut back);
    bc.send_message("a", &"pong").unwrap();
    let mut back = Vec::new();
    recv_until(&mut a, 1, &mut back);
    assert_eq!(a.lane("b"), Some(LaneKind::SharedMemory));
    assert_eq!(bc.lane("a"), Some(LaneKind::SharedMemory));
    let recent = epoch_now() - 5.0;
    assert!(
        a.last_activity("b").unwrap() >= recent,
        "{:?}",
        a.last_activity("b")
    );
    assert!(
        bc.last_activity("a").unwrap() >= recent,
        "{:?}",
        bc.last_activity("a")
    );
    assert_eq!(a.close_idle_connections(60.0), 0, "active over the lane");
    assert_eq!(bc.close_idle_connections(60.0), 0, "active over the lane");
    // Backdated again, nothing moved since: closed as idle.
    assert!(a.set_last_activity("b", 1.0));
    assert_eq!(a.close_idle_connections(60.0), 1);
    let _ = bc.disconnect(None);
}
