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
    be.recv(id, RecvBuf::Partial(partial), &mut pool);
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

#[test]
fn provided_buffers_receive_for_idle_connections() {
    let Some(mut be) = backend() else { return };
    let mut pool = BufferPool::new(4096, 64);
    let (a, b) = pair();
    let id = ConnId::from_u64(11);
    be.add_conn(id, a).unwrap();
    be.recv(id, RecvBuf::Pooled, &mut pool);
    let mut out = Vec::new();
    be.poll(Some(Duration::ZERO), &mut out, &mut pool).unwrap();
    assert!(out.is_empty());
    rustix::io::write(&b, b"hello").unwrap();
    let deadline = Instant::now() + Duration::from_secs(2);
    while out.is_empty() {
        be.poll(Some(Duration::from_millis(50)), &mut out, &mut pool)
            .unwrap();
        assert!(Instant::now() < deadline);
    }
    match out.pop() {
        Some(Completion::Recv { conn, buf, result }) => {
            assert_eq!(conn, id);
            assert_eq!(result.unwrap(), 5);
            assert_eq!(&buf[..], b"hello");
        }
        other => panic!("{other:?}"),
    }
}
