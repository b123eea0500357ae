//! The ownership rules, checked against the running kernel.

use super::*;

fn backend() -> Option<UringBackend> {
    match UringBackend::new() {
        Ok(b) => Some(b),
        Err(e) => {
            eprintln!("skipped: io_uring unavailable ({e})");
            None
        }
    }
}

fn pair() -> (OwnedFd, OwnedFd) {
    let (a, b) = std::os::unix::net::UnixStream::pair().unwrap();
    a.set_nonblocking(true).unwrap();
    b.set_nonblocking(true).unwrap();
    (a.into(), b.into())
}

#[test]
fn close_with_receive_in_flight_releases_only_after_completion() {
    let Some(mut be) = backend() else { return };
    let mut pool = BufferPool::new(4096, 4);
    let (a, _b) = pair();
    let id = ConnId::from_u64(7);
    be.add_conn(id, a).unwrap();
    let mut partial = BytesMut::with_capacity(4096);
    partial.extend_from_slice(&[0, 0, 0, 9]);
    be.recv(
        id,
        RecvBuf::Partial(crate::wire::RecvInto::within(partial, usize::MAX)),
        &mut pool,
    );
    let mut out = Vec::new();
    be.poll(Some(Duration::ZERO), &mut out, &mut pool).unwrap();
    assert!(out.is_empty(), "nothing to read yet");
    assert!(be.ops_in_flight() >= 2, "recv (and wake) in flight");
    be.close(id);
    // The receive's buffer is still owned by its operation until the
    // cancellation completes; no completion reaches the core.
    let deadline = Instant::now() + Duration::from_secs(2);
    while be
        .ops
        .iter()
        .any(|(_, (_, op))| matches!(op, Op::Recv { .. }))
    {
        be.poll(Some(Duration::from_millis(10)), &mut out, &mut pool)
            .unwrap();
        assert!(Instant::now() < deadline, "cancellation never completed");
    }
    assert!(out.is_empty(), "no completion for a closed connection");
}

#[test]
fn drop_mid_send_keeps_frames_alive_until_the_kernel_lets_go() {
    let Some(mut be) = backend() else { return };
    let mut pool = BufferPool::new(4096, 4);
    let (a, _reader) = pair();
    let id = ConnId::from_u64(3);
    be.add_conn(id, a).unwrap();
    let frame = Bytes::from(vec![1u8; 8 << 20]);
    let mut ob = Outbox::default();
    ob.push(frame.clone());
    let mut out = Vec::new();
    // The first send fills the socket and completes short; the second
    // waits in the kernel for room that never comes.
    for _ in 0..2 {
        be.send(id, &ob);
        be.poll(Some(Duration::from_millis(20)), &mut out, &mut pool)
            .unwrap();
    }
    assert!(
        be.ops
            .iter()
            .any(|(_, (_, op))| matches!(op, Op::Send { .. })),
        "send in flight"
    );
    drop(ob);
    assert!(!frame.is_unique(), "the in-flight send owns a reference");
    drop(be);
    assert!(
        frame.is_unique(),
        "teardown waited for the kernel before releasing"
    );
}

/// A backend with connection `id` (one end of a pair) and a pooled
/// receive armed and submitted on it; the pool and the pair's other end.
fn receive_armed(id: ConnId) -> Option<(UringBackend, BufferPool, OwnedFd)> {
    let mut be = backend()?;
    let mut pool = BufferPool::new(4096, 64);
    let (a, b) = pair();
    be.add_conn(id, a).unwrap();
    be.recv(id, RecvBuf::Pooled, &mut pool);
    let mut out = Vec::new();
    be.poll(Some(Duration::ZERO), &mut out, &mut pool).unwrap();
    assert!(out.is_empty(), "nothing to read yet");
    Some((be, pool, b))
}

/// Polls `be` with `timeout` until a completion comes (at most 2 s), and
/// checks that it is `id`'s receive of `hello`.
fn receives_hello(be: &mut UringBackend, pool: &mut BufferPool, id: ConnId, timeout: Duration) {
    let mut out = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(2);
    while out.is_empty() {
        be.poll(Some(timeout), &mut out, pool).unwrap();
        assert!(Instant::now() < deadline, "the receive never came out");
    }
    match out.pop() {
        Some(Completion::Recv { conn, buf, result }) => {
            assert_eq!(conn, id);
            assert_eq!(result.unwrap(), 5);
            assert_eq!(&buf.head[..], b"hello");
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn provided_buffers_receive_for_idle_connections() {
    let id = ConnId::from_u64(11);
    let Some((mut be, mut pool, b)) = receive_armed(id) else {
        return;
    };
    rustix::io::write(&b, b"hello").unwrap();
    receives_hello(&mut be, &mut pool, id, Duration::from_millis(50));
}

/// A turn that does not wait enters the kernel only for something to
/// submit or for completion work the kernel flags (`nothing_to_enter_for`):
/// an idle poll makes no system call, and polls that never wait still
/// collect a receive completed while this thread made no system call.
#[test]
fn polls_that_never_wait_still_collect_completions() {
    let id = ConnId::from_u64(12);
    let Some((mut be, mut pool, b)) = receive_armed(id) else {
        return;
    };
    if be.taskrun_flag {
        assert!(be.nothing_to_enter_for(), "idle: no enter");
    } else {
        eprintln!("no IORING_SETUP_TASKRUN_FLAG here: every poll enters");
    }
    // Written by another thread: a system call of this one would run the
    // completion work on its way out, enter or not.
    let writer = std::thread::spawn(move || {
        rustix::io::write(&b, b"hello").unwrap();
        b
    });
    receives_hello(&mut be, &mut pool, id, Duration::ZERO);
    drop(writer.join().unwrap());
}

/// A backend listening on a socket in a fresh directory (kept alive by
/// the returned guard), and the socket's path.
fn listening() -> Option<(UringBackend, tempfile::TempDir, std::path::PathBuf)> {
    let mut be = backend()?;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("l.sock");
    let l = std::os::unix::net::UnixListener::bind(&path).unwrap();
    l.set_nonblocking(true).unwrap();
    be.listen(l.into()).unwrap();
    Some((be, dir, path))
}

fn accept_one(be: &mut UringBackend, pool: &mut BufferPool) -> OwnedFd {
    let mut out = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        be.poll(Some(Duration::from_millis(20)), &mut out, pool)
            .unwrap();
        if let Some(i) = out
            .iter()
            .position(|c| matches!(c, Completion::Accepted(_)))
        {
            let Completion::Accepted(fd) = out.swap_remove(i) else {
                unreachable!()
            };
            return fd;
        }
        assert!(
            Instant::now() < deadline,
            "the connection was never accepted"
        );
    }
}

/// Requests only queued (never submitted) when the reactor moves are
/// submitted by the new thread: nothing to cancel, one accept armed.
#[test]
fn a_move_keeps_requests_the_old_thread_only_queued() {
    let Some((mut be, _dir, path)) = listening() else {
        return;
    };
    let mut pool = BufferPool::new(4096, 4);
    let before = be.accept.op;
    assert!(before.is_some());
    std::thread::scope(|s| {
        s.spawn(|| {
            be.moved_to_this_thread();
            assert_eq!(be.accept.op, before, "the queued accept stays");
            assert_eq!(be.accept.rearm_after, None);
            let _peer = std::os::unix::net::UnixStream::connect(&path).unwrap();
            accept_one(&mut be, &mut pool);
        });
    });
}

/// An accept the old thread submitted is cancelled, and its successor is
/// armed only once the cancelled one has ended (never two accept waiters:
/// the kernel wakes one per connection). Connections that arrive in
/// between wait in the backlog and are accepted.
#[test]
fn a_move_rearms_a_submitted_accept_after_its_cancellation() {
    let Some((mut be, _dir, path)) = listening() else {
        return;
    };
    let mut pool = BufferPool::new(4096, 4);
    let mut out = Vec::new();
    be.poll(Some(Duration::ZERO), &mut out, &mut pool).unwrap();
    let old = be.accept.op.expect("armed");
    std::thread::scope(|s| {
        s.spawn(|| {
            be.moved_to_this_thread();
            assert_eq!(be.accept.op, None, "no successor while it is cancelled");
            assert_eq!(be.accept.rearm_after, Some(old));
            // Arrives while the old accept is being cancelled.
            let _peer = std::os::unix::net::UnixStream::connect(&path).unwrap();
            accept_one(&mut be, &mut pool);
            assert!(be.accept.op.is_some_and(|op| op != old), "re-armed");
            assert_eq!(be.accept.rearm_after, None);
            let _second = std::os::unix::net::UnixStream::connect(&path).unwrap();
            accept_one(&mut be, &mut pool);
        });
    });
}

/// A wake-up read's completion reaped just before a wait (the eventfd was
/// written while the reactor was awake, or by a wake whose sleep had ended
/// already) must not leave the wait without a wake-up read: the next
/// [`Waker::wake`] must end it. Checked with no hot connection (the wait
/// in the ring) and with one (the wait in the hot set's epoll instance).
#[test]
fn a_wake_after_a_stray_wake_completion_ends_the_wait() {
    for hot in [false, true] {
        let Some(mut be) = backend() else { return };
        let mut pool = BufferPool::new(4096, 4);
        let (a, _b) = pair();
        let id = ConnId::from_u64(5);
        be.add_conn(id, a).unwrap();
        if hot {
            be.hot.recent.note(id);
        }
        be.recv(id, RecvBuf::Pooled, &mut pool);
        assert_eq!(be.hot.parked.len(), usize::from(hot));
        let mut out = Vec::new();
        be.poll(Some(Duration::ZERO), &mut out, &mut pool).unwrap();
        // A short wait first: the hot set's epoll instance exists and
        // watches the socket (the second wait of a hot connection).
        be.poll(Some(Duration::from_millis(10)), &mut out, &mut pool)
            .unwrap();
        assert!(be.wake.armed, "the wake-up read is in the kernel");
        // The eventfd written while nobody sleeps: the read completes, and
        // its completion waits in the ring for the next reap.
        let waker = be.waker();
        let _ = rustix::io::write(waker.fd(), &1u64.to_ne_bytes());
        std::thread::sleep(Duration::from_millis(20));
        let late = waker.clone();
        let t = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(100));
            late.wake();
        });
        let start = Instant::now();
        be.poll(Some(Duration::from_secs(3)), &mut out, &mut pool)
            .unwrap();
        // The stray completion may end the first wait; the wake must end
        // the one after it.
        if start.elapsed() < Duration::from_millis(90) {
            be.poll(Some(Duration::from_secs(3)), &mut out, &mut pool)
                .unwrap();
        }
        t.join().unwrap();
        assert!(
            start.elapsed() < Duration::from_secs(2),
            "hot {hot}: the wake was lost ({:?})",
            start.elapsed()
        );
        assert!(out.is_empty());
    }
}

/// Busy polling reads a hot connection directly (a system call per look);
/// once its socket is quiet (its messages moved to a lane) its parked
/// receive becomes an armed SQE at once, data on it still comes out of
/// spinning polls, and it does not turn hot again until it is loud.
#[test]
fn a_quiet_connection_is_never_read_directly() {
    let Some(mut be) = backend() else { return };
    let mut pool = BufferPool::new(4096, 8);
    be.set_busy_poll(true);
    let (a, b) = pair();
    let id = ConnId::from_u64(21);
    be.add_conn(id, a).unwrap();
    be.hot.recent.note(id);
    be.recv(id, RecvBuf::Pooled, &mut pool);
    assert_eq!(be.hot.parked.len(), 1, "hot: parked for direct reads");
    be.set_quiet(id, true, &mut pool);
    assert!(be.hot.parked.is_empty(), "quiet: unparked at once");
    assert!(be.conns.get(id).unwrap().recv_op.is_some(), "an armed SQE");
    for round in 0..2 {
        rustix::io::write(&b, b"hello").unwrap();
        receives_hello(&mut be, &mut pool, id, Duration::ZERO);
        assert!(!be.hot.recent.contains(id), "round {round}: not hot");
        // A send after a read (which makes a conversation hot) and the
        // next receive, started as the reactor starts it, keep it armed.
        let mut outbox = crate::proto::Outbox::default();
        outbox.push(bytes::Bytes::from_static(b"x"));
        be.send(id, &outbox);
        let mut out = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(2);
        while !out.iter().any(|c| matches!(c, Completion::Sent { .. })) {
            be.poll(Some(Duration::ZERO), &mut out, &mut pool).unwrap();
            assert!(Instant::now() < deadline, "the send never completed");
        }
        assert!(!be.hot.recent.contains(id), "round {round}: not hot");
        be.recv(id, RecvBuf::Pooled, &mut pool);
        assert!(be.hot.parked.is_empty(), "round {round}: not parked");
        assert!(be.conns.get(id).unwrap().recv_op.is_some());
    }
    let mut x = [0u8; 2];
    assert_eq!(
        rustix::io::read(&b, &mut x).unwrap(),
        2,
        "both sends arrived"
    );
    // Loud again: its data makes it hot, as before.
    be.set_quiet(id, false, &mut pool);
    rustix::io::write(&b, b"hello").unwrap();
    receives_hello(&mut be, &mut pool, id, Duration::ZERO);
    assert!(be.hot.recent.contains(id), "busy polling: hot again");
}
