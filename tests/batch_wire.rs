//! The Binary route's batch wire (docs/binary-format.md) end to end, on both
//! backends: what a receiver sees of batched messages, in place and owned,
//! inline and threaded; batches under back-pressure and blocking sends; and
//! what a hostile peer's malformed batches and a peer of another format
//! version get.

#[macro_use]
mod common;

use std::collections::HashSet;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use common::TestRoute;
use ipcm::{BackendChoice, Client, Info, Message, Serializer};

const WAIT: Duration = Duration::from_secs(10);

fn binary(t: &TestRoute) -> Info {
    Info::new(Serializer::Binary, t.route.path())
}

/// Receives `n` messages with the borrowed view, kept as owned copies.
fn receive_n(c: &mut Client, n: usize) -> Vec<Message> {
    let deadline = Instant::now() + WAIT;
    let mut out = Vec::new();
    while out.len() < n {
        assert!(Instant::now() < deadline, "{} of {n} arrived", out.len());
        let got = c.receive(Duration::from_millis(200)).unwrap();
        for m in &got {
            let owned = m.to_message();
            assert_eq!(owned.content_json(), m.content_json());
            assert_eq!(owned.id(), &*m.id());
            assert_eq!(owned.stamp().to_bits(), m.stamp().to_bits());
            assert_eq!(owned.stamp_ord(), m.stamp_ord());
            out.push(owned);
        }
    }
    out
}

/// The envelope a batch implies: from the connection's sender to its
/// receiver, ids distinct upper-case UUIDs, `(stamp, stamp_ord)` strictly
/// increasing in send order.
fn assert_envelopes(msgs: &[Message], from: &str, to: &str) {
    let mut ids = HashSet::new();
    let mut last = (f64::MIN, 0u64);
    for m in msgs {
        assert_eq!((m.from(), m.to()), (from, Some(to)));
        assert!(!m.is_broadcast());
        let id = m.id();
        assert_eq!(id.len(), 36);
        assert_eq!(id, id.to_ascii_uppercase());
        assert!(uuid::Uuid::parse_str(id).is_ok(), "{id}");
        assert!(ids.insert(id.to_string()), "id {id} repeats");
        let key = (m.stamp(), m.stamp_ord());
        assert!(key > last, "{key:?} after {last:?}");
        last = key;
    }
}

fn queued_messages_arrive_as_batches_read_in_place(b: BackendChoice) {
    let t = TestRoute::new(b);
    let info = binary(&t);
    let mut rx = Client::connect(&info, "rx", t.opts()).unwrap();
    let mut tx = Client::connect(&info, "tx", t.opts().listen(false)).unwrap();
    const N: usize = 5_000;
    // Sizes from 1 byte to past a batch (64 KiB): small ones share batches,
    // the large one is a batch of its own.
    let big = format!("\"{}\"", "é".repeat(40_000));
    for i in 0..N {
        match i {
            7 => tx.queue_json("rx", &big).unwrap(),
            _ if i % 3 == 0 => tx.queue_message("rx", &i).unwrap(),
            _ => tx.queue_json("rx", &format!("{{\"i\":{i}}}")).unwrap(),
        }
    }
    tx.flush_pending(Some(WAIT)).unwrap();
    let got = receive_n(&mut rx, N);
    assert_eq!(got.len(), N);
    for (i, m) in got.iter().enumerate() {
        match i {
            7 => assert_eq!(m.content_json(), big),
            _ if i % 3 == 0 => assert_eq!(m.content::<usize>().unwrap(), i),
            _ => assert_eq!(m.content_value().unwrap()["i"], i),
        }
    }
    assert_envelopes(&got, "tx", "rx");
    assert_eq!(tx.stats().sent["rx"], N as u64);
    assert_eq!(rx.stats().read["tx"], N as u64);
    // The view is in place: nothing is left once it is dropped.
    assert!(rx.receive(Duration::ZERO).unwrap().is_empty());
    tx.disconnect(None).unwrap();
    rx.disconnect(None).unwrap();
}

fn owned_and_borrowed_reads_agree_and_replies_go_back(b: BackendChoice) {
    let t = TestRoute::new(b);
    let info = binary(&t);
    let mut a = Client::connect(&info, "a", t.opts()).unwrap();
    let mut z = Client::connect(&info, "z", t.opts().listen(false)).unwrap();
    for i in 0..100 {
        z.queue_message("a", &i).unwrap();
    }
    z.flush_pending(Some(WAIT)).unwrap();
    let mut owned = Vec::new();
    while owned.len() < 100 {
        a.get_messages_timeout_into(&mut owned, WAIT).unwrap();
    }
    assert_eq!(
        owned
            .iter()
            .map(|m| m.content::<i32>().unwrap())
            .collect::<Vec<_>>(),
        (0..100).collect::<Vec<_>>()
    );
    assert_envelopes(&owned, "z", "a");
    // Blocking sends back over the accepted connection: each returns once
    // written, each its own batch.
    for i in 0..10 {
        a.send_message("z", &format!("r{i}")).unwrap();
    }
    let back = receive_n(&mut z, 10);
    assert_envelopes(&back, "a", "z");
    assert_eq!(back[9].content::<String>().unwrap(), "r9");
    z.disconnect(None).unwrap();
    a.disconnect(None).unwrap();
}

fn a_full_outbox_refuses_whole_messages_and_keeps_order(b: BackendChoice) {
    let t = TestRoute::new(b);
    let info = binary(&t);
    let mut rx = Client::connect(&info, "rx", t.opts()).unwrap();
    let mut tx =
        Client::connect(&info, "tx", t.opts().listen(false).outbox_limit(8 * 1024)).unwrap();
    tx.set_send_blocking(false);
    let body = format!("\"{}\"", "x".repeat(1000));
    let (mut sent, mut refused) = (0usize, 0usize);
    let mut got = 0usize;
    let deadline = Instant::now() + WAIT;
    while sent < 2_000 {
        assert!(Instant::now() < deadline);
        match tx.queue_json("rx", &body) {
            Ok(()) => sent += 1,
            Err(ipcm::Error::WouldBlock { queued, limit, .. }) => {
                // The record: its 4-byte length and the content.
                assert!(
                    queued + 4 + body.len() > limit,
                    "refused below the limit: {queued}"
                );
                refused += 1;
                tx.drain_pending();
                for m in &rx.receive(Duration::ZERO).unwrap() {
                    assert_eq!(m.content_json(), body);
                    got += 1;
                }
            }
            Err(e) => panic!("{e}"),
        }
    }
    tx.flush_pending(Some(WAIT)).unwrap();
    got += receive_n(&mut rx, sent - got).len();
    assert_eq!(got, sent);
    assert!(refused > 0, "the limit was reached");
    assert_eq!(
        tx.stats().sent["rx"],
        sent as u64,
        "refused sends are not counted"
    );
    tx.disconnect(None).unwrap();
    rx.disconnect(None).unwrap();
}

fn the_threaded_receiver_takes_batches_in_place_and_one_by_one(b: BackendChoice) {
    let t = TestRoute::new(b);
    let info = binary(&t);
    let rx = Client::connect(&info, "rx", t.opts()).unwrap();
    let (_stx, mut rx, handle) = rx.into_threaded().unwrap();
    let mut tx = Client::connect(&info, "tx", t.opts().listen(false)).unwrap();
    const N: i64 = 20_000;
    for i in 0..N {
        tx.queue_message("rx", &i).unwrap();
        if i % 1000 == 999 {
            tx.drain_pending();
        }
    }
    tx.flush_pending(Some(WAIT)).unwrap();
    let mut next = 0i64;
    let deadline = Instant::now() + WAIT;
    while next < N {
        assert!(Instant::now() < deadline, "{next} of {N}");
        // Alternate: a few one by one (leaving a batch half read), then
        // the rest of what waits, in place.
        for _ in 0..3 {
            if let Some(m) = rx.recv_timeout(Duration::from_millis(100)) {
                assert_eq!(m.content::<i64>().unwrap(), next);
                assert_eq!((m.from(), m.to()), ("tx", Some("rx")));
                next += 1;
            }
        }
        for m in &rx.receive(Duration::from_millis(100)) {
            assert_eq!(m.content::<i64>().unwrap(), next);
            next += 1;
        }
    }
    assert!(rx.try_recv().is_none());
    tx.disconnect(None).unwrap();
    handle.shutdown().unwrap();
}

/// A plain socket peer that said hello on a Binary route.
fn raw_peer(rx: &Client, name: &str) -> UnixStream {
    let mut s = UnixStream::connect(rx.path()).unwrap();
    let mut hello = bytes::BytesMut::new();
    Serializer::Binary.encode_hello(name, &mut hello);
    s.write_all(&frame(&hello)).unwrap();
    s
}

fn frame(payload: &[u8]) -> Vec<u8> {
    let mut v = (payload.len() as u32).to_be_bytes().to_vec();
    v.extend_from_slice(payload);
    v
}

fn record_len(n: usize) -> [u8; 4] {
    [
        (n & 0x7F) as u8,
        ((n >> 7) & 0x7F) as u8,
        ((n >> 14) & 0x7F) as u8,
        ((n >> 21) & 0x7F) as u8,
    ]
}

/// A batch payload (docs/binary-format.md) with `count` in its header.
fn batch(count: u32, records: &[&[u8]]) -> Vec<u8> {
    let mut p = b"IPCB\x02\x04\0\0".to_vec();
    p.extend_from_slice(&count.to_le_bytes());
    p.extend_from_slice(&[0; 4]);
    p.extend_from_slice(&1_764_600_000.5f64.to_le_bytes());
    p.extend_from_slice(&7u64.to_le_bytes());
    p.extend_from_slice(&[0x11; 10]);
    p.extend_from_slice(&[0, 0, 0, 0, 0, 0xFF]);
    for r in records {
        p.extend_from_slice(&record_len(r.len()));
        p.extend_from_slice(r);
    }
    p
}

fn malformed_batches_are_refused_whole_and_the_connection_goes_on(b: BackendChoice) {
    common::init_logging();
    let t = TestRoute::new(b);
    let info = binary(&t);
    let mut rx = Client::connect(&info, "rx", t.opts()).unwrap();
    let mut p = raw_peer(&rx, "evil");
    let mut long_len = batch(1, &[b"1"]);
    let at = long_len.len() - 5;
    long_len[at..at + 4].copy_from_slice(&record_len(9));
    let mut high_bit = batch(1, &[b"1"]);
    high_bit[at + 1] = 0x80;
    let bad: Vec<(Vec<u8>, &str)> = vec![
        (batch(2, &[b"1"]), "announces 2 messages but holds 1"),
        (batch(0, &[]), "batch of 0 messages"),
        (batch(1, &[b"\"\xff\""]), "not UTF-8"),
        (batch(1, &[b""]), "has no content"),
        (long_len, "announces 9 bytes"),
        (high_bit, "not UTF-8"),
        (
            b"IPCB\x02\x04\0\0\x01\0\0\0".to_vec(),
            "shorter than its 48-byte header",
        ),
        (
            {
                let mut v = batch(1, &[b"1"]);
                v[4] = 3;
                v
            },
            "version 3 is not supported",
        ),
    ];
    let mut stream = Vec::new();
    for (payload, _) in &bad {
        stream.extend(frame(payload));
    }
    // Then a good batch, with a message id counter about to wrap, and
    // a null content that is skipped as an invalid message.
    stream.extend(frame(&batch(3, &[b"\"ok\"", b"null", b"[1,2]"])));
    p.write_all(&stream).unwrap();
    let got = receive_n(&mut rx, 2);
    assert_eq!(got[0].content_json(), "\"ok\"");
    assert_eq!(got[1].content_json(), "[1,2]");
    assert_eq!((got[0].from(), got[0].to()), ("evil", Some("rx")));
    assert_eq!(got[0].stamp_ord(), 7);
    assert_eq!(got[1].stamp_ord(), 9, "the null was message 1 of the batch");
    assert_eq!(
        rx.stats().read.get("evil"),
        Some(&2),
        "read counts the good messages, not the null nor the bad batches"
    );
    assert!(got[0].id().ends_with("0000000000FF"), "{}", got[0].id());
    assert!(
        got[1].id().ends_with("000000000101"),
        "the counter counts on: {}",
        got[1].id()
    );
    for (_, why) in &bad {
        assert!(
            !common::logged(log::Level::Warn, why).is_empty(),
            "no warning saying {why:?}"
        );
    }
    assert!(!common::logged(log::Level::Warn, "'content' is a required attribute").is_empty());
    drop(p);
    rx.disconnect(None).unwrap();
}

fn a_peer_of_another_format_version_is_refused_at_its_hello(b: BackendChoice) {
    common::init_logging();
    let t = TestRoute::new(b);
    let info = binary(&t);
    let mut rx = Client::connect(&info, "rx", t.opts()).unwrap();
    let mut s = UnixStream::connect(rx.path()).unwrap();
    let mut hello = bytes::BytesMut::new();
    Serializer::Binary.encode_hello("old", &mut hello);
    hello[4] = 1;
    s.write_all(&frame(&hello)).unwrap();
    s.set_nonblocking(true).unwrap();
    // The listener closes the connection: the peer reads end of stream
    // (the inline listener works while it is called).
    let deadline = Instant::now() + WAIT;
    let mut buf = [0u8; 16];
    loop {
        assert!(Instant::now() < deadline, "the connection stayed open");
        assert!(rx.receive(Duration::from_millis(20)).unwrap().is_empty());
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => panic!("{n} bytes for a refused peer"),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => panic!("{e}"),
        }
    }
    assert!(
        !common::logged(
            log::Level::Warn,
            "binary payload version 1 is not supported"
        )
        .is_empty(),
        "the warning names the version"
    );
    rx.disconnect(None).unwrap();
}

per_backend!(
    queued_messages_arrive_as_batches_read_in_place,
    owned_and_borrowed_reads_agree_and_replies_go_back,
    a_full_outbox_refuses_whole_messages_and_keeps_order,
    the_threaded_receiver_takes_batches_in_place_and_one_by_one,
    malformed_batches_are_refused_whole_and_the_connection_goes_on,
    a_peer_of_another_format_version_is_refused_at_its_hello,
);
