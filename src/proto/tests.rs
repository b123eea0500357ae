//! The protocol core, driven without sockets: bytes in, decisions out.

use super::*;
use crate::wire::encode_frame;

fn core() -> Core {
    Core::new(Serializer::Json, CoreConfig::default())
}

fn frame(payload: &str) -> Vec<u8> {
    let mut out = BytesMut::new();
    encode_frame(payload.as_bytes(), &mut out).unwrap();
    out.to_vec()
}

fn msg(from: &str, to: &str, content: &str) -> Vec<u8> {
    frame(&format!(
        r#"{{"from":"{from}","to":"{to}","content":{content},"stamp":1.5,"id":"X"}}"#
    ))
}

/// Delivers `bytes` as receive completions, as many as the lent buffers
/// need.
fn feed(c: &mut Core, id: ConnId, bytes: &[u8]) {
    let mut pool = BufferPool::new(4096, 4);
    let mut rest = bytes;
    while !rest.is_empty() {
        let start = c.start_recv(id, &mut pool).expect("receive can start");
        let mut buf = start.into_target(&mut pool);
        let n = buf.fill_from(rest);
        assert!(n > 0, "a receive has room");
        rest = &rest[n..];
        c.on_recv(id, buf, Ok(n), &mut pool);
    }
}

fn eof(c: &mut Core, id: ConnId) {
    let mut pool = BufferPool::new(4096, 4);
    let buf = match c.start_recv(id, &mut pool).expect("receive can start") {
        RecvBuf::Pooled => RecvInto::default(),
        RecvBuf::Partial(b) => b,
    };
    c.on_recv(id, buf, Ok(0), &mut pool);
}

fn take(c: &mut Core) -> Vec<Message> {
    let mut v = Vec::new();
    c.take_messages(&mut v);
    v
}

/// An acceptor that `cli` said hello to, on a lane (4 KiB rings) whose
/// initiator has switched: its frames come from its ring now. `peer` is
/// the initiator's process, as read at attach. Returns the connection and
/// the initiator's side of the region.
fn acceptor_on_lane(c: &mut Core, peer: Option<(i32, u32)>) -> (ConnId, crate::lane::shm::Region) {
    acceptor_on_rings(c, &Serializer::Json, peer, 4096)
}

/// [`acceptor_on_lane`] with rings of `ring` bytes, on a route of
/// `serializer` (the core's).
fn acceptor_on_rings(
    c: &mut Core,
    serializer: &Serializer,
    peer: Option<(i32, u32)>,
    ring: usize,
) -> (ConnId, crate::lane::shm::Region) {
    use crate::lane::shm::Region;
    let id = c.add_acceptor(Instant::now());
    let mut hello = BytesMut::new();
    serializer.encode_hello("cli", &mut hello);
    let mut hello_frame = BytesMut::new();
    encode_frame(&hello, &mut hello_frame).unwrap();
    feed(c, id, &hello_frame);
    let theirs = Region::create(ring).expect("a memfd region");
    let fd = theirs.fd().try_clone_to_owned().unwrap();
    c.set_peer_process(id, peer);
    c.lane_accepted(id, Region::open(fd, ring).unwrap());
    feed(c, id, &crate::lane::control::Control::Switch.frame());
    (id, theirs)
}

#[test]
fn hello_resolves_and_frames_in_the_same_read_are_delivered() {
    let mut c = core();
    let id = c.add_acceptor(Instant::now());
    assert!(
        c.connections().is_empty(),
        "unresolved connections are hidden"
    );
    let mut bytes = frame(r#"{"hello":"cli"}"#);
    bytes.extend(msg("cli", "srv", "1"));
    feed(&mut c, id, &bytes);
    assert_eq!(c.connections(), ["cli"]);
    assert_eq!(c.conn_for("cli"), Some(id));
    let m = take(&mut c);
    assert_eq!(m.len(), 1);
    assert_eq!(m[0].content_json(), "1");
    assert_eq!(c.stats().read["cli"], 1);
}

#[test]
fn hello_split_across_reads_waits_for_the_rest() {
    let mut c = core();
    let id = c.add_acceptor(Instant::now());
    let bytes = frame(r#"{"hello":"cli"}"#);
    for b in &bytes {
        assert!(c.conn_for("cli").is_none());
        feed(&mut c, id, std::slice::from_ref(b));
    }
    assert_eq!(c.conn_for("cli"), Some(id));
}

#[test]
fn garbage_hello_drops_the_connection() {
    let mut c = core();
    let id = c.add_acceptor(Instant::now());
    let mut bytes = frame("not json");
    bytes.extend(msg("cli", "srv", "1"));
    feed(&mut c, id, &bytes);
    assert!(!c.is_open(id));
    assert!(take(&mut c).is_empty(), "frames after a bad hello are lost");
    assert_eq!(c.take_closed_ids(), [id]);
}

#[test]
fn hello_without_id_drops_the_connection() {
    for payload in [
        r#"{"hello":""}"#,
        r#"[1,2]"#,
        r#"{"from":"x"}"#,
        r#"{"hello":null}"#,
    ] {
        let mut c = core();
        let id = c.add_acceptor(Instant::now());
        feed(&mut c, id, &frame(payload));
        assert!(!c.is_open(id), "{payload}");
    }
}

#[test]
fn silent_connection_stays_parked_and_eof_closes_it_silently() {
    let mut c = core();
    let id = c.add_acceptor(Instant::now());
    feed(&mut c, id, &[0, 0]);
    assert!(c.is_open(id));
    eof(&mut c, id);
    assert!(!c.is_open(id));
}

fn core_with_hello_timeout(t: Duration) -> Core {
    Core::new(
        Serializer::Json,
        CoreConfig {
            hello_timeout: t,
            ..CoreConfig::default()
        },
    )
}

#[test]
fn unresolved_connection_expires_at_its_hello_deadline() {
    let mut c = core_with_hello_timeout(Duration::from_secs(30));
    let t0 = Instant::now();
    assert_eq!(c.poll_timeout(), None, "no deadline without connections");
    let id = c.add_acceptor(t0);
    assert_eq!(c.poll_timeout(), Some(t0 + Duration::from_secs(30)));
    assert_eq!(c.handle_timeout(t0 + Duration::from_millis(29_999)), 0);
    assert!(c.is_open(id));
    assert_eq!(c.handle_timeout(t0 + Duration::from_secs(30)), 1);
    assert!(!c.is_open(id));
    assert_eq!(c.poll_timeout(), None);
}

#[test]
fn only_silent_connections_past_the_timeout_expire() {
    let mut c = core_with_hello_timeout(Duration::from_millis(50));
    let t0 = Instant::now();
    let ms = Duration::from_millis;
    let old = c.add_acceptor(t0);
    let resolved = c.add_acceptor(t0);
    feed(&mut c, resolved, &frame(r#"{"hello":"cli"}"#));
    let gone = c.add_acceptor(t0);
    c.close(gone, None);
    let young = c.add_acceptor(t0 + ms(80));
    assert_eq!(c.handle_timeout(t0 + ms(80)), 1, "only the old silent one");
    assert!(!c.is_open(old));
    assert!(c.is_open(resolved) && c.is_open(young));
    assert_eq!(
        c.poll_timeout(),
        Some(t0 + ms(130)),
        "the young one's deadline"
    );
    assert_eq!(c.handle_timeout(t0 + ms(129)), 0);
    assert_eq!(c.handle_timeout(t0 + ms(160)), 1);
    assert!(!c.is_open(young));
    assert!(c.is_open(resolved), "a resolved connection never expires");
    assert_eq!(c.poll_timeout(), None);
}

#[test]
fn failed_accepts_back_off_on_a_doubling_deadline_and_recover() {
    let mut c = core();
    let t0 = Instant::now();
    let err = io::Error::from_raw_os_error(libc::EMFILE);
    c.on_accept_error(t0, &err);
    assert!(c.accept_backed_off());
    assert!(!c.take_accept_resume(), "not before the deadline");
    assert_eq!(c.poll_timeout(), Some(t0 + ACCEPT_RETRY_MIN));
    assert!(c.has_operations_to_start() || c.poll_timeout().is_some());
    c.handle_timeout(t0 + ACCEPT_RETRY_MIN - Duration::from_nanos(1));
    assert!(!c.take_accept_resume());
    c.handle_timeout(t0 + ACCEPT_RETRY_MIN);
    assert!(c.has_operations_to_start(), "the reactor must resume");
    assert!(c.take_accept_resume());
    assert!(!c.take_accept_resume(), "once per retry");
    assert_eq!(c.poll_timeout(), None, "no deadline while the retry runs");
    // Failing again doubles the delay, up to the cap.
    let mut now = t0 + ACCEPT_RETRY_MIN;
    let mut delay = ACCEPT_RETRY_MIN;
    for _ in 0..20 {
        c.on_accept_error(now, &err);
        delay = (delay * 2).min(ACCEPT_RETRY_MAX);
        assert_eq!(c.poll_timeout(), Some(now + delay));
        now += delay;
        c.handle_timeout(now);
        assert!(c.take_accept_resume());
    }
    assert_eq!(delay, ACCEPT_RETRY_MAX);
    // An accepted connection ends the episode; the next failure starts
    // over at the shortest delay.
    let id = c.add_acceptor(now);
    assert!(!c.accept_backed_off());
    c.close(id, None);
    c.on_accept_error(now, &err);
    assert_eq!(c.poll_timeout(), Some(now + ACCEPT_RETRY_MIN));
}

#[test]
fn every_accept_error_backs_off_and_one_warning_covers_an_episode() {
    for errno in [libc::EMFILE, libc::ENFILE, libc::ENOMEM, libc::ENOBUFS] {
        let mut c = core();
        let t0 = Instant::now();
        let err = io::Error::from_raw_os_error(errno);
        c.on_accept_error(t0, &err);
        assert!(c.accept_backed_off(), "errno {errno}");
        assert!(c.accept.warned == Some(t0), "errno {errno} warned");
        // Draining the queue as descriptors come back: success, failure.
        let id = c.add_acceptor(t0 + Duration::from_millis(1));
        c.close(id, None);
        c.on_accept_error(t0 + Duration::from_millis(2), &err);
        assert!(c.accept_backed_off());
        assert_eq!(
            c.accept.warned,
            Some(t0),
            "the same episode: no new warning"
        );
        // Long after, a new failure is a new episode.
        let later = t0 + ACCEPT_WARN_QUIET + Duration::from_millis(2);
        let id = c.add_acceptor(later);
        c.close(id, None);
        c.on_accept_error(later, &err);
        assert_eq!(c.accept.warned, Some(later));
    }
}

#[test]
fn the_earliest_deadline_is_reported() {
    let mut c = core_with_hello_timeout(Duration::from_millis(3));
    let t0 = Instant::now();
    c.add_acceptor(t0);
    c.on_accept_error(t0, &io::Error::from_raw_os_error(libc::ENFILE));
    assert_eq!(c.poll_timeout(), Some(t0 + Duration::from_millis(3)));
    c.handle_timeout(t0 + Duration::from_millis(3));
    assert_eq!(c.poll_timeout(), Some(t0 + ACCEPT_RETRY_MIN));
}

#[test]
fn newer_hello_replaces_the_old_connection_keeping_its_messages() {
    let mut c = core();
    let old = c.add_acceptor(Instant::now());
    let mut bytes = frame(r#"{"hello":"p"}"#);
    bytes.extend(msg("p", "me", "\"early\""));
    feed(&mut c, old, &bytes);
    let new = c.add_acceptor(Instant::now());
    let mut bytes = frame(r#"{"hello":"p"}"#);
    bytes.extend(msg("p", "me", "\"late\""));
    feed(&mut c, new, &bytes);
    assert!(c.is_open(old), "the old connection is retired, not closed");
    assert_eq!(c.conn_for("p"), Some(new));
    assert_eq!(c.connections(), ["p"]);
    // Frames still arriving on the retired connection are delivered.
    feed(&mut c, old, &msg("p", "me", "\"straggler\""));
    let got: Vec<String> = take(&mut c)
        .iter()
        .map(|m| m.content_json().to_string())
        .collect();
    assert_eq!(got, ["\"early\"", "\"late\"", "\"straggler\""]);
    // When the live one closes, the retired one takes over.
    c.close(new, None);
    assert_eq!(c.conn_for("p"), Some(old));
}

#[test]
fn replacement_moves_unstarted_outgoing_frames_to_the_new_connection() {
    let mut c = core();
    let old = c.add_initiator("p", "me");
    // The hello is queued; add two frames, then let a partial write happen.
    c.enqueue(old, Bytes::from(msg("me", "p", "1")));
    c.enqueue(old, Bytes::from(msg("me", "p", "2")));
    assert!(c.start_send(old).is_some());
    c.on_sent(old, Ok(3));
    let new = c.add_acceptor(Instant::now());
    feed(&mut c, new, &frame(r#"{"hello":"p"}"#));
    assert!(
        c.is_open(old),
        "retired: it still has a partly written frame"
    );
    assert_eq!(c.conn_for("p"), Some(new));
    // The partly written hello stays behind; both messages moved.
    let moved = c.queued_bytes(new);
    assert_eq!(moved, msg("me", "p", "1").len() + msg("me", "p", "2").len());
    // A waiter for the second message finds it on the new connection.
    let hello = frame(r#"{"hello":"me"}"#).len() as u64;
    let second_end = hello + (msg("me", "p", "1").len() + msg("me", "p", "2").len()) as u64;
    assert_eq!(c.locate(old, second_end), (new, moved as u64));
    assert_eq!(c.locate(old, hello), (old, hello), "the hello stayed");
}

#[test]
fn stray_hello_and_non_objects_are_skipped_silently() {
    let mut c = core();
    let id = c.add_acceptor(Instant::now());
    let mut bytes = frame(r#"{"hello":"p"}"#);
    bytes.extend(frame(r#"{"hello":"p"}"#));
    bytes.extend(frame("[1]"));
    bytes.extend(frame("3"));
    bytes.extend(msg("p", "me", "true"));
    feed(&mut c, id, &bytes);
    assert!(c.is_open(id));
    assert_eq!(take(&mut c).len(), 1);
}

#[test]
fn malformed_and_invalid_frames_are_skipped_without_losing_others() {
    let mut c = core();
    let id = c.add_acceptor(Instant::now());
    let mut bytes = frame(r#"{"hello":"p"}"#);
    bytes.extend(msg("p", "me", "1"));
    bytes.extend(frame("{broken"));
    bytes.extend(frame(r#"{"to":"me","content":1}"#));
    bytes.extend(frame(""));
    bytes.extend(msg("p", "me", "2"));
    feed(&mut c, id, &bytes);
    assert!(c.is_open(id));
    let got: Vec<String> = take(&mut c)
        .iter()
        .map(|m| m.content_json().to_string())
        .collect();
    assert_eq!(got, ["1", "2"]);
    assert_eq!(c.stats().read["p"], 2);
}

#[test]
fn oversize_length_prefix_closes_only_that_connection() {
    let mut c = Core::new(
        Serializer::Json,
        CoreConfig {
            max_frame: 1024,
            ..CoreConfig::default()
        },
    );
    let good = c.add_acceptor(Instant::now());
    feed(&mut c, good, &frame(r#"{"hello":"good"}"#));
    let bad = c.add_acceptor(Instant::now());
    let mut bytes = frame(r#"{"hello":"bad"}"#);
    bytes.extend([0, 0, 4, 1]);
    feed(&mut c, bad, &bytes);
    assert!(!c.is_open(bad));
    assert!(c.is_open(good));
    feed(&mut c, good, &msg("good", "me", "1"));
    assert_eq!(take(&mut c).len(), 1);
}

#[test]
fn eof_with_partial_frame_discards_it_and_closes() {
    let mut c = core();
    let id = c.add_acceptor(Instant::now());
    let mut bytes = frame(r#"{"hello":"p"}"#);
    bytes.extend(msg("p", "me", "1"));
    let partial = msg("p", "me", "2");
    bytes.extend(&partial[..partial.len() - 3]);
    feed(&mut c, id, &bytes);
    eof(&mut c, id);
    assert!(!c.is_open(id));
    assert_eq!(take(&mut c).len(), 1, "no partial message delivered");
}

#[test]
fn outbox_is_bounded_but_always_takes_one_frame() {
    let mut c = Core::new(
        Serializer::Json,
        CoreConfig {
            outbox_limit: 100,
            ..CoreConfig::default()
        },
    );
    let id = c.add_acceptor(Instant::now());
    feed(&mut c, id, &frame(r#"{"hello":"p"}"#));
    let big = Bytes::from(vec![0u8; 150]);
    assert!(matches!(c.enqueue(id, big.clone()), Enqueue::Queued(150)));
    assert_eq!(
        c.enqueue(id, Bytes::from_static(b"x")),
        Enqueue::Full {
            queued: 150,
            frame: Bytes::from_static(b"x")
        }
    );
    assert!(c.start_send(id).is_some());
    c.on_sent(id, Ok(150));
    assert_eq!(c.written_total(id), Some(150));
    assert!(matches!(
        c.enqueue(id, Bytes::from_static(b"x")),
        Enqueue::Queued(151)
    ));
}

#[test]
fn write_error_closes_with_the_error_recorded() {
    let mut c = core();
    let id = c.add_initiator("p", "me");
    assert!(c.start_send(id).is_some());
    c.on_sent(id, Err(io::Error::from_raw_os_error(libc::EIO)));
    assert!(!c.is_open(id));
    let closed = c.take_closed();
    assert_eq!(closed.len(), 1);
    assert_eq!(closed[0].peer.as_deref(), Some("p"));
    assert_eq!(
        closed[0].write_error.as_ref().unwrap().raw_os_error(),
        Some(libc::EIO)
    );
}

/// A peer that sent and closed: the write that fails with `EPIPE` stops
/// writing, but what the peer sent is still read (even with the inbox
/// full), and its end of stream closes with the write error.
#[test]
fn a_broken_pipe_still_reads_what_the_peer_sent_then_closes() {
    let mut c = core();
    c.set_inbox_limit(1);
    let id = c.add_acceptor(Instant::now());
    let mut bytes = frame(r#"{"hello":"p"}"#);
    bytes.extend(msg("p", "me", "1"));
    feed(&mut c, id, &bytes);
    assert!(c.is_paused(), "the inbox is full");
    assert!(c.enqueue(id, frame("{}").into()) != Enqueue::Gone);
    assert!(c.start_send(id).is_some());
    c.on_sent(id, Err(io::Error::from_raw_os_error(libc::EPIPE)));
    assert!(c.is_open(id), "open until the peer's end of stream");
    assert!(c.start_send(id).is_none(), "nothing more is written");
    feed(&mut c, id, &msg("p", "me", "2"));
    eof(&mut c, id);
    assert!(!c.is_open(id));
    let closed = c.take_closed();
    assert_eq!(
        closed[0].write_error.as_ref().unwrap().raw_os_error(),
        Some(libc::EPIPE)
    );
    let got: Vec<String> = take(&mut c)
        .iter()
        .map(|m| m.content_json().to_string())
        .collect();
    assert_eq!(got, ["1", "2"]);
}

#[test]
fn completions_for_a_closed_connection_never_reach_its_successor() {
    let mut c = core();
    let old = c.add_acceptor(Instant::now());
    let mut pool = BufferPool::new(4096, 4);
    assert!(matches!(
        c.start_recv(old, &mut pool),
        Some(RecvBuf::Pooled)
    ));
    let buf = pool.take();
    c.close(old, None);
    let new = c.add_acceptor(Instant::now());
    assert_eq!(new.slot(), old.slot(), "slot reused");
    assert_ne!(new, old);
    let mut late = buf;
    late.extend_from_slice(&frame(r#"{"hello":"intruder"}"#));
    c.on_recv(old, RecvInto::within(late, 0), Ok(10), &mut pool);
    assert!(c.conn_for("intruder").is_none());
    assert!(c.is_open(new));
}

#[test]
fn full_inbox_pauses_receiving_until_taken() {
    let mut c = Core::new(
        Serializer::Json,
        CoreConfig {
            inbox_limit: 10,
            ..CoreConfig::default()
        },
    );
    let id = c.add_acceptor(Instant::now());
    let mut bytes = frame(r#"{"hello":"p"}"#);
    bytes.extend(msg("p", "me", "1"));
    feed(&mut c, id, &bytes);
    assert!(c.is_paused());
    let mut pool = BufferPool::new(4096, 4);
    assert!(
        c.start_recv(id, &mut pool).is_none(),
        "no receive while the inbox is full"
    );
    assert_eq!(take(&mut c).len(), 1);
    assert!(!c.is_paused());
    let mut dirty = Vec::new();
    c.take_dirty(&mut dirty);
    assert!(dirty.contains(&id));
    assert!(c.start_recv(id, &mut pool).is_some());
}

// The connection-role tests (who connected, who answers), on the core's table.

#[test]
fn empty_table_answers_every_query() {
    let mut c = core();
    assert!(c.connections().is_empty());
    assert!(c.conn_for("a").is_none());
    assert!(c.last_activity("a").is_none());
    assert_eq!(c.close_idle(0.0), 0);
}

fn resolved(c: &mut Core, peer: &str, activity: f64) -> ConnId {
    let id = c.add_acceptor(Instant::now());
    feed(c, id, &frame(&format!(r#"{{"hello":"{peer}"}}"#)));
    assert!(c.set_last_activity(peer, activity));
    id
}

#[test]
fn table_lists_sorted_keys_and_activity() {
    let mut c = core();
    let now = crate::message::now_stamp();
    resolved(&mut c, "beta", now);
    let alpha = resolved(&mut c, "alpha", now - 10.0);
    assert_eq!(c.connections(), ["alpha", "beta"]);
    assert!(c.conn_for("gamma").is_none());
    assert!(c.last_activity("alpha").unwrap() <= now - 9.0);
    assert!(c.last_activity("beta").unwrap() >= now - 1.0);
    c.close(alpha, None);
    assert_eq!(c.connections(), ["beta"]);
    assert_eq!(c.take_closed_ids(), [alpha], "the close hook ran for alpha");
}

#[test]
fn close_idle_closes_only_entries_older_than_the_cutoff() {
    let mut c = core();
    let now = crate::message::now_stamp();
    resolved(&mut c, "old", now - 100.0);
    resolved(&mut c, "recent", now);
    assert_eq!(c.close_idle(50.0), 1);
    assert_eq!(c.connections(), ["recent"]);
}

#[test]
fn initiator_queues_exact_hello_first() {
    let mut c = core();
    let id = c.add_initiator("srv", "cli");
    let ob = c.start_send(id).unwrap();
    let first: Vec<u8> = ob.frames().next().unwrap().to_vec();
    assert_eq!(first, frame(r#"{"hello":"cli"}"#));
    assert_eq!(&first[..4], &[0, 0, 0, 0x0F]);
}

#[test]
fn an_offer_of_another_lane_version_is_refused_not_left_waiting() {
    let mut c = core();
    let id = c.add_acceptor(Instant::now());
    feed(&mut c, id, &frame(r#"{"hello":"cli"}"#));
    // `00 'I' 'P' 'L'`, version 9, kind 1 (OFFER), fields unknown to us.
    let mut offer = BytesMut::new();
    encode_frame(b"\0IPL\x09\x01whatever-v9-says", &mut offer).unwrap();
    feed(&mut c, id, &offer);
    assert!(take(&mut c).is_empty(), "a control frame is no message");
    let out = c.start_send(id).expect("a reply is queued");
    let bytes: Vec<u8> = out.frames().flat_map(|f| f.iter().copied()).collect();
    assert_eq!(
        bytes,
        crate::lane::control::Control::Refuse.frame().to_vec()
    );
    assert!(c.is_open(id));
}

/// A replacement takes the unstarted frames of a connection on a lane
/// (before and after the switch), leaves its control frames behind, and a
/// waiter for any of them finds it on the new connection. (A waiter of a
/// frame moved off an offered lane once waited for ever: the soak test's
/// blocking senders hung.)
#[test]
fn replacement_moves_data_off_a_lane_and_waiters_follow_it() {
    use crate::lane::control::Control;
    let mut c = core();
    let old = c.add_initiator("p", "me");
    let hello = frame(r#"{"hello":"me"}"#).len();
    assert!(c.start_send(old).is_some());
    c.on_sent(old, Ok(hello));
    let (m1, m2, m3) = (
        msg("me", "p", "1"),
        msg("me", "p", "2"),
        msg("me", "p", "3"),
    );
    let Enqueue::Queued(t1) = c.enqueue(old, Bytes::from(m1.clone())) else {
        panic!("queued")
    };
    let region = crate::lane::shm::Region::create(4096).expect("a memfd region");
    c.lane_offered(old, region, [7; 16]);
    let Enqueue::Queued(t2) = c.enqueue(old, Bytes::from(m2.clone())) else {
        panic!("queued")
    };
    // The acceptor switched: our SWITCH goes behind m2 on the socket, and
    // m3 into the ring's outbox.
    feed(&mut c, old, &Control::Switch.frame());
    let Enqueue::Queued(t3) = c.enqueue(old, Bytes::from(m3.clone())) else {
        panic!("queued")
    };
    let offer = Control::Offer {
        nonce: [7; 16],
        capacity: 4096,
    }
    .frame()
    .len();
    let switch = Control::Switch.frame().len();
    let switch_end = (hello + m1.len() + offer + m2.len() + switch) as u64;
    assert_eq!(
        t3,
        switch_end + m3.len() as u64,
        "m3 counts on from the switch"
    );

    let new = c.add_acceptor(Instant::now());
    feed(&mut c, new, &frame(r#"{"hello":"p"}"#));
    assert_eq!(c.conn_for("p"), Some(new));
    assert_eq!(c.queued_bytes(new), m1.len() + m2.len() + m3.len());
    assert_eq!(c.locate(old, t1), (new, m1.len() as u64));
    assert_eq!(c.locate(old, t2), (new, (m1.len() + m2.len()) as u64));
    assert_eq!(
        c.locate(old, t3),
        (new, (m1.len() + m2.len() + m3.len()) as u64)
    );
    // What stayed is the offer and the switch, in order.
    let out = c.start_send(old).expect("the control frames are written");
    let bytes: Vec<u8> = out.frames().flat_map(|f| f.iter().copied()).collect();
    let mut want = Control::Offer {
        nonce: [7; 16],
        capacity: 4096,
    }
    .frame()
    .to_vec();
    want.extend_from_slice(&Control::Switch.frame());
    assert_eq!(bytes, want);
    c.on_sent(old, Ok(want.len()));
    // Once the switch is written the old connection's count is the ring's
    // (nothing of which is left to write).
    assert_eq!(c.written_total(old), Some(switch_end));
}

/// A core whose inbox is full reads no ring, so a ring holding data must
/// not keep it awake (the reactor spun at full CPU beside such a ring
/// while its application was blocked in a send); taking the messages
/// makes it look again.
#[test]
fn a_full_inbox_sleeps_beside_a_ring_that_holds_data() {
    let mut c = core();
    c.set_inbox_limit(1);
    let (_id, theirs) = acceptor_on_lane(&mut c, None);
    let (mut tx, _rx) = theirs.ends(true).unwrap();
    let mut pool = BufferPool::new(4096, 4);
    assert!(tx.push(&msg("cli", "srv", "1")).unwrap());
    assert!(c.lane_poll(&mut pool));
    assert!(c.is_paused(), "one message fills an inbox of one byte");
    assert!(tx.push(&msg("cli", "srv", "2")).unwrap());
    assert!(!c.lane_poll(&mut pool), "paused: the ring is not read");
    assert!(c.lane_prepare_sleep(), "paused: it sleeps beside the data");
    c.lane_end_sleep();
    assert_eq!(take(&mut c).len(), 1);
    assert!(!c.lane_prepare_sleep(), "resumed: the data keeps it awake");
    c.lane_end_sleep();
    assert!(c.lane_poll(&mut pool));
    let got = take(&mut c);
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].content_json().to_string(), "2");
}

/// One reading of a ring takes about `LANE_READ_BUDGET` bytes, then hands
/// them on; the rest comes with the next polls, in order, none lost.
#[test]
fn a_ring_is_read_a_budget_at_a_time() {
    let mut c = core();
    let (_id, theirs) = acceptor_on_rings(&mut c, &Serializer::Json, None, 1 << 20);
    let (mut tx, _rx) = theirs.ends(true).unwrap();
    let mut pool = BufferPool::new(64 * 1024, 4);
    let pad = "x".repeat(8000);
    let n = 3 * super::lane::LANE_READ_BUDGET / 8000;
    for i in 0..n {
        let m = msg("cli", "srv", &format!("[{i},\"{pad}\"]"));
        assert!(tx.push(&m).unwrap(), "the ring holds {n} records");
    }
    let mut got = Vec::new();
    let mut polls = 0;
    while c.lane_poll(&mut pool) {
        polls += 1;
        let batch = take(&mut c);
        let bytes: usize = batch.iter().map(|m| m.content_json().len()).sum();
        assert!(
            bytes <= super::lane::LANE_READ_BUDGET + 2 * 8100,
            "poll {polls} took {bytes} bytes"
        );
        got.extend(batch);
    }
    assert!(polls >= 3, "{polls} polls for three budgets");
    assert_eq!(got.len(), n);
    for (i, m) in got.iter().enumerate() {
        assert!(m.content_json().starts_with(&format!("[{i},")), "order");
    }
}

/// A producer that waits for room is woken once half the ring is free,
/// not at the first record read (a wake-up a record or two), and before
/// the ring is empty (the consumer still reads while the producer
/// refills).
#[test]
fn a_waiting_producer_is_woken_when_half_the_ring_is_free() {
    use crate::lane::control::Control;
    let mut c = core();
    let (id, theirs) = acceptor_on_rings(&mut c, &Serializer::Json, None, 1 << 20);
    let (mut tx, _rx) = theirs.ends(true).unwrap();
    let mut pool = BufferPool::new(64 * 1024, 4);
    let pad = "x".repeat(8000);
    let mut n = 0;
    while tx
        .push(&msg("cli", "srv", &format!("[{n},\"{pad}\"]")))
        .unwrap()
    {
        n += 1;
    }
    // No room for another message: the producer announces that it waits
    // (whatever sliver is left).
    tx.wait_for_room().unwrap();
    // What the socket already holds (our own `SWITCH`) goes first.
    if let Some(sock) = c.start_send(id) {
        let n = sock.queued_bytes();
        c.on_sent(id, Ok(n));
    }
    assert_eq!(c.queued_bytes(id), 0);
    let (mut got, mut woken_at) = (0, None);
    while c.lane_poll(&mut pool) {
        got += take(&mut c).len();
        if woken_at.is_none() && c.queued_bytes(id) > 0 {
            woken_at = Some(got);
            let sock = c.start_send(id).expect("the socket has frames");
            let bytes: Vec<u8> = sock.frames().flat_map(|f| f.iter().copied()).collect();
            assert_eq!(bytes, Control::Wake.frame().to_vec());
        }
    }
    assert_eq!(got, n, "every message");
    let at = woken_at.expect("the waiting producer is woken");
    assert!(at >= n / 2 - 2 && at < n, "woken after {at} of {n} records");
    assert!(tx.room().unwrap() > 0);
}

/// Batches read from a ring whose copy checked them on the way
/// (`ring::Consumer::pop_into`): ASCII and other UTF-8 contents arrive
/// intact; a content that is not UTF-8 is refused with its batch, whether
/// the bad byte lies where the copy looked or in the record's head, which
/// it does not look at; the batches after it arrive.
#[test]
fn contents_read_from_a_ring_are_checked_as_utf8_whatever_the_copy_found() {
    use crate::serializer::binary::{batch_header, record_len_bytes};
    use zerocopy::IntoBytes;
    let mut c = Core::new(Serializer::Binary, CoreConfig::default());
    let (_id, theirs) = acceptor_on_rings(&mut c, &Serializer::Binary, None, 1 << 20);
    let (mut tx, _rx) = theirs.ends(true).unwrap();
    let mut pool = BufferPool::new(64 * 1024, 4);
    let frame_of = |content: &[u8]| {
        let mut p = batch_header(1, 1.5, 9, [7; 16]).as_bytes().to_vec();
        p.extend_from_slice(&record_len_bytes(content.len()));
        p.extend_from_slice(content);
        let mut f = (p.len() as u32).to_be_bytes().to_vec();
        f.extend(p);
        f
    };
    let text = |at: usize, bytes: &[u8]| {
        let mut v = b"\"".to_vec();
        v.resize(16 * 1024, b'a');
        v.push(b'"');
        v[at..at + bytes.len()].copy_from_slice(bytes);
        v
    };
    let good = [
        text(1, b"z"),
        text(8000, "\u{e9}".as_bytes()),
        text(2, "\u{e9}".as_bytes()),
        text(16 * 1024 - 2, b"b"),
    ];
    let bad = [
        text(8000, &[0xFF]),
        text(2, &[0xC3]),
        text(16 * 1024, &[0x80]),
    ];
    for (g, b) in good.iter().zip(bad.iter().chain([&good[0]])) {
        assert!(tx.push(&frame_of(g)).unwrap());
        assert!(tx.push(&frame_of(b)).unwrap());
    }
    while c.lane_poll(&mut pool) {}
    let got: Vec<Vec<u8>> = take(&mut c)
        .iter()
        .map(|m| m.content_json().as_bytes().to_vec())
        .collect();
    let want = [&good[0], &good[1], &good[2], &good[3], &good[0]];
    assert_eq!(got.len(), want.len(), "the UTF-8 batches, and no other");
    assert!(got.iter().eq(want), "in order, intact");
}

/// A `BLOB` whose memfd never came (or from a peer with no known process)
/// closes its connection: the peer said a message was there. Nothing is
/// delivered in its place, and nothing panics.
#[test]
fn a_blob_that_cannot_be_had_closes_its_connection() {
    use crate::lane::control::Control;
    use crate::lane::shm::Region;
    for peer in [None, Some((std::process::id() as i32, 0))] {
        let mut c = core();
        let (id, theirs) = acceptor_on_lane(&mut c, peer);
        let (mut tx, _rx) = theirs.ends(true).unwrap();
        let mut pool = BufferPool::new(4096, 4);
        assert!(tx.push(&msg("cli", "srv", "1")).unwrap());
        let blob = Control::Blob {
            nonce: [3; 16],
            len: 1 << 20,
        };
        assert!(tx.push(&blob.frame()).unwrap());
        assert!(tx.push(&msg("cli", "srv", "3")).unwrap());
        c.lane_poll(&mut pool);
        let got = take(&mut c);
        assert_eq!(got.len(), 1, "{peer:?}: what came before the blob");
        assert_eq!(got[0].content_json().to_string(), "1");
        assert!(!c.is_open(id), "{peer:?}: the connection closes");
    }
    // Descriptors announced that never came close the connection too.
    let mut c = core();
    let id = c.add_acceptor(Instant::now());
    feed(&mut c, id, &frame(r#"{"hello":"cli"}"#));
    for (peer, count) in [(None, 1), (Some((std::process::id() as i32, 0)), 2)] {
        let theirs = Region::create(4096).expect("a memfd region");
        let fd = theirs.fd().try_clone_to_owned().unwrap();
        let id = c.add_acceptor(Instant::now());
        feed(&mut c, id, &frame(r#"{"hello":"cli2"}"#));
        c.set_peer_process(id, peer);
        c.lane_accepted(id, Region::open(fd, 4096).unwrap());
        feed(
            &mut c,
            id,
            &Control::Fds {
                nonce: [5; 16],
                count,
            }
            .frame(),
        );
        assert!(!c.is_open(id), "{peer:?}");
    }
    assert!(c.is_open(id));
    // A length past the frame limit is refused before anything is taken.
    let mut c = core();
    let id = c.add_acceptor(Instant::now());
    feed(&mut c, id, &frame(r#"{"hello":"cli"}"#));
    feed(
        &mut c,
        id,
        &Control::Blob {
            nonce: [3; 16],
            len: u64::MAX,
        }
        .frame(),
    );
    assert!(take(&mut c).is_empty());
    assert!(!c.is_open(id));
}

/// A send's short way into the ring (`Core::flush_to_lane`) moves the
/// outbox into the ring when its connection alone has work and nothing
/// waits for its socket; otherwise it leaves everything as it was, for
/// the full flush (it must never skip another connection's work, nor a
/// frame for the socket).
#[test]
fn a_send_goes_straight_into_the_ring_only_when_nothing_else_waits() {
    use crate::lane::control::Control;
    let mut c = core();
    let mut pool = BufferPool::new(4096, 4);
    let (id, theirs) = acceptor_on_lane(&mut c, None);
    let (_tx, mut rx) = theirs.ends(true).unwrap();
    let m1 = msg("srv", "cli", "1");
    let mut drained = Vec::new();
    c.take_dirty(&mut drained);
    assert!(c.start_recv(id, &mut pool).is_some(), "a receive in flight");

    // Our SWITCH still waits for the socket: the short way refuses and
    // leaves the connection marked, so the full flush writes it. (m1 may
    // be in the ring already, as the dispatch would put it: the peer reads
    // the ring only after our SWITCH.)
    let Enqueue::Queued(_) = c.enqueue(id, Bytes::from(m1.clone())) else {
        panic!("queued")
    };
    assert!(!c.flush_to_lane(id), "a frame waits for the socket");
    let mut marked = Vec::new();
    c.take_dirty(&mut marked);
    assert_eq!(marked, [id], "left for the full flush");
    let sock = c.start_send(id).expect("the SWITCH is written");
    let bytes: Vec<u8> = sock.frames().flat_map(|f| f.iter().copied()).collect();
    assert_eq!(bytes, Control::Switch.frame().to_vec());
    c.on_sent(id, Ok(bytes.len()));
    let mut out = Vec::new();
    assert!(rx.pop(&mut out).unwrap(), "m1 is in the ring");
    assert_eq!(out, m1);

    // Nothing else waits: the message goes into the ring at once, and the
    // connection is no longer marked.
    c.take_dirty(&mut drained);
    let m2 = msg("srv", "cli", "2");
    let Enqueue::Queued(t2) = c.enqueue(id, Bytes::from(m2.clone())) else {
        panic!("queued")
    };
    assert!(c.flush_to_lane(id));
    assert!(!c.has_operations_to_start());
    assert_eq!(c.written_total(id), Some(t2), "a blocking send is done");
    assert!(rx.pop(&mut out).unwrap());
    assert_eq!(out, m2);

    // Another connection has work to start: the short way leaves both.
    let other = c.add_acceptor(Instant::now());
    let m3 = msg("srv", "cli", "3");
    let Enqueue::Queued(_) = c.enqueue(id, Bytes::from(m3.clone())) else {
        panic!("queued")
    };
    assert!(!c.flush_to_lane(id), "{other:?} has work too");
    assert!(!rx.pop(&mut out).unwrap(), "nothing moved");
    marked.clear();
    c.take_dirty(&mut marked);
    assert!(
        marked.contains(&id) && marked.contains(&other),
        "{marked:?}"
    );
}

/// A large message on a lane goes into the ring as it is appended
/// (`Core::append_to_ring`), behind what was queued before it, which goes
/// first as far as the ring takes it; what the ring cannot take yet stays
/// queued, and the message with it. The order holds across both ways,
/// every message arrives once, in a whole batch, with stamps that keep
/// increasing, and a sleeping reader gets its `WAKE`.
#[test]
fn a_large_message_goes_straight_into_the_ring_behind_what_was_queued() {
    use crate::lane::control::Control;
    use crate::serializer::binary::CheckedBatch;
    let mut c = Core::new(Serializer::Binary, CoreConfig::default());
    let (id, theirs) = acceptor_on_rings(&mut c, &Serializer::Binary, None, 64 * 1024);
    let (_tx, mut rx) = theirs.ends(true).unwrap();
    let big = |n: usize| format!("\"{n}{}\"", "x".repeat(super::lane::DIRECT_MIN));
    // Our SWITCH is written first.
    let sock = c.start_send(id).expect("the SWITCH is to be written");
    let n = sock.queued_bytes();
    c.on_sent(id, Ok(n));
    // What the ring holds (a stream of frames, a record may end inside
    // one): each whole batch's contents, and the (stamp, ordinal) of every
    // message.
    let mut stream = Vec::new();
    let mut pop = |rx: &mut crate::lane::ring::Consumer| {
        let mut out = Vec::new();
        while rx.pop(&mut out).unwrap() {
            stream.extend_from_slice(&out);
        }
        let (mut batches, mut stamps) = (Vec::new(), Vec::new());
        while stream.len() >= HEADER_LEN {
            let len = u32::from_be_bytes(stream[..HEADER_LEN].try_into().unwrap()) as usize;
            if stream.len() < HEADER_LEN + len {
                break;
            }
            let payload: Vec<u8> = stream.drain(..HEADER_LEN + len).skip(HEADER_LEN).collect();
            if crate::lane::control::is_control(&payload) {
                continue;
            }
            let b = CheckedBatch::parse(Bytes::from(payload)).unwrap();
            let contents: Vec<String> = b.records().map(str::to_string).collect();
            let info = b.info();
            stamps.extend((0..contents.len() as u64).map(|i| (info.stamp, info.first_ord + i)));
            batches.push(contents);
        }
        (batches, stamps)
    };
    let mut sent = Vec::new();
    let append = |c: &mut Core, sent: &mut Vec<String>, content: String| {
        assert_eq!(
            c.append_raw(id, content.as_bytes()).unwrap(),
            Append::Queued
        );
        sent.push(content);
    };

    // Behind a small message in the open batch: the batch goes first, and
    // the large one after it, nothing left queued nor to start.
    let mut marked = Vec::new();
    c.take_dirty(&mut marked);
    append(&mut c, &mut sent, "1".to_string());
    append(&mut c, &mut sent, big(0));
    assert_eq!(c.queued_bytes(id), 0);
    assert_eq!(c.written_total(id), c.seal(id));
    marked.clear();
    c.take_dirty(&mut marked);
    assert!(marked.iter().all(|&m| m == id), "{marked:?}");
    let (batches, mut stamps) = pop(&mut rx);
    assert_eq!(batches, [vec!["1".to_string()], vec![big(0)]]);

    // A reader that stopped: once the ring is full, messages stay queued,
    // and the ring is not asked for a wake (no one waits for it yet).
    let mut k = 1;
    while c.queued_bytes(id) == 0 {
        append(&mut c, &mut sent, big(k));
        k += 1;
        assert!(k < 100, "the ring fills");
    }
    append(&mut c, &mut sent, big(k));
    let queued = c.queued_bytes(id);
    assert!(
        queued > super::lane::DIRECT_MIN,
        "the last one whole: {queued}"
    );
    // The reader catches up: the next message moves the queue first.
    let (batches, more) = pop(&mut rx);
    stamps.extend(more);
    let mut got: Vec<String> = batches.into_iter().flatten().collect();
    append(&mut c, &mut sent, big(k + 1));
    assert_eq!(c.queued_bytes(id), 0);
    let (batches, more) = pop(&mut rx);
    stamps.extend(more);
    got.extend(batches.into_iter().flatten());
    assert_eq!(
        ["1".to_string(), big(0)]
            .into_iter()
            .chain(got)
            .collect::<Vec<_>>(),
        sent
    );
    assert!(
        stamps.windows(2).all(|w| w[0] < w[1]),
        "stamps keep increasing"
    );

    // The reader sleeps: the message goes all the same, and the socket
    // gets a `WAKE` for it.
    assert!(rx.prepare_sleep(), "the ring is empty");
    c.take_dirty(&mut marked);
    marked.clear();
    append(&mut c, &mut sent, big(0));
    c.take_dirty(&mut marked);
    assert_eq!(marked, [id], "the WAKE is to be written");
    let sock = c.start_send(id).expect("the socket has frames");
    let bytes: Vec<u8> = sock.frames().flat_map(|f| f.iter().copied()).collect();
    assert_eq!(bytes, Control::Wake.frame().to_vec());
    rx.end_sleep();
    assert_eq!(pop(&mut rx).0, [vec![big(0)]]);
    c.count_queued();
    assert_eq!(
        c.stats().sent["cli"],
        sent.len() as u64,
        "every message counted once"
    );
}
