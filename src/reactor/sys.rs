//! What both backends need of the kernel, in one place: non-blocking
//! socket reads and gathering writes with their error mapping, iovec
//! building, timespecs, the event array of an epoll wait, and the set of
//! hot connections that busy polling and io_uring's conversations read
//! directly.

use std::fmt;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::time::Duration;

use std::os::fd::{AsFd, OwnedFd};

use rustix::event::epoll;

use super::Completion;
use crate::proto::{ConnId, Outbox};

/// An epoll instance watching sockets edge-triggered: the epoll backend's
/// readiness, and the wait of io_uring's hot connections. The one place
/// that registers descriptors and reads events.
#[derive(Debug)]
pub(crate) struct ReadySet {
    ep: OwnedFd,
    events: EventBuf,
}

/// What one event says of its descriptor.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Ready {
    /// The token it was watched with.
    pub(crate) token: u64,
    /// Data, end of stream, or an error may be read.
    pub(crate) readable: bool,
    /// Room to write (or an error to learn by writing).
    pub(crate) writable: bool,
    /// The peer hung up (or the socket failed): after the data, a read
    /// returns the end of stream or the error, and no further edge comes.
    pub(crate) hup: bool,
}

impl ReadySet {
    /// An empty set reporting up to `capacity` events per wait.
    pub(crate) fn new(capacity: usize) -> io::Result<Self> {
        Ok(ReadySet {
            ep: epoll::create(epoll::CreateFlags::CLOEXEC)?,
            events: EventBuf(Vec::with_capacity(capacity)),
        })
    }

    /// Watches a connection's socket: readable, writable and peer-closed,
    /// edge-triggered (with `OUT`, the peer consuming what was sent wakes
    /// the waiter too, shortly before its reply is due).
    pub(crate) fn watch_socket(&self, fd: BorrowedFd<'_>, token: u64) -> io::Result<()> {
        let flags = epoll::EventFlags::IN
            | epoll::EventFlags::OUT
            | epoll::EventFlags::RDHUP
            | epoll::EventFlags::ET;
        self.add(fd, token, flags)
    }

    /// Watches `fd` for readability, edge- or level-triggered.
    pub(crate) fn watch_readable(
        &self,
        fd: BorrowedFd<'_>,
        token: u64,
        edge: bool,
    ) -> io::Result<()> {
        let mut flags = epoll::EventFlags::IN;
        if edge {
            flags |= epoll::EventFlags::ET;
        }
        self.add(fd, token, flags)
    }

    fn add(&self, fd: BorrowedFd<'_>, token: u64, flags: epoll::EventFlags) -> io::Result<()> {
        Ok(epoll::add(
            &self.ep,
            fd,
            epoll::EventData::new_u64(token),
            flags,
        )?)
    }

    /// Stops watching `fd` (before it closes, or when it cools down).
    pub(crate) fn unwatch(&self, fd: BorrowedFd<'_>) {
        let _ = epoll::delete(&self.ep, fd);
    }

    /// The epoll instance's descriptor (readable while events wait).
    pub(crate) fn fd(&self) -> BorrowedFd<'_> {
        self.ep.as_fd()
    }

    /// Waits up to `timeout` (`None`: forever) for events; an interrupted
    /// wait is an empty one.
    pub(crate) fn wait(&mut self, timeout: Option<Duration>) -> io::Result<()> {
        let ts = timeout.map(timespec);
        self.events.0.clear();
        match epoll::wait(
            &self.ep,
            rustix::buffer::spare_capacity(&mut self.events.0),
            ts.as_ref(),
        ) {
            Ok(_) | Err(rustix::io::Errno::INTR) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// Events of the last wait.
    pub(crate) fn len(&self) -> usize {
        self.events.0.len()
    }

    /// Event `i` of the last wait.
    pub(crate) fn get(&self, i: usize) -> Ready {
        let ev = &self.events.0[i];
        // A copy: the kernel's event struct is packed.
        let (flags, data) = (ev.flags, ev.data);
        let err_or_hup = epoll::EventFlags::ERR | epoll::EventFlags::HUP;
        Ready {
            token: data.u64(),
            readable: flags
                .intersects(epoll::EventFlags::IN | epoll::EventFlags::RDHUP | err_or_hup),
            writable: flags.intersects(epoll::EventFlags::OUT | err_or_hup),
            hup: flags.intersects(epoll::EventFlags::RDHUP | err_or_hup),
        }
    }
}

/// Whether an `accept` error means "try again now" (a connection that went
/// away while queued, a signal, an empty queue, or our own cancel) rather
/// than a failure the core backs off from (`EMFILE`, `ENFILE`, `ENOMEM`,
/// `ENOBUFS`, anything else). Both backends classify with it.
pub(crate) fn accept_retry_now(errno: i32) -> bool {
    [
        libc::EINTR,
        libc::ECONNABORTED,
        libc::EAGAIN,
        libc::ECANCELED,
    ]
    .contains(&errno)
}

/// One direct receive on a socket that may be readable, into `into`:
/// `None` if it had nothing (`EAGAIN`; `into` unchanged), else the result
/// and whether the socket may hold more (a read that filled what it was
/// given drained nothing for sure, and no new edge will say so).
pub(crate) fn read_ready(
    fd: BorrowedFd<'_>,
    into: &mut crate::wire::RecvInto,
) -> Option<(io::Result<usize>, bool)> {
    let room = into.room();
    match read_into(fd, into) {
        Err(rustix::io::Errno::AGAIN) => None,
        Ok(n) => Some((Ok(n), n > 0 && n == room)),
        Err(e) => Some((Err(e.into()), false)),
    }
}

/// The event array handed to `epoll_wait` (the epoll backend's, and the
/// io_uring backend's wait on its hot connections).
struct EventBuf(Vec<rustix::event::epoll::Event>);

// SAFETY: the events carry only `u64` tokens (never pointers), so moving
// the buffer to another thread shares nothing.
unsafe impl Send for EventBuf {}

impl fmt::Debug for EventBuf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("EventBuf")
    }
}

pub(crate) use crate::wire::timespec;

/// Whether `s` starts where `last` ends (frames built one after another in
/// the send arena are adjacent, and one iovec can cover them). The kernel
/// reads iovecs as plain address ranges, so adjacent ranges need not share
/// an allocation.
pub(crate) fn extends(last: &libc::iovec, s: &[u8]) -> bool {
    (last.iov_base as usize).wrapping_add(last.iov_len) == s.as_ptr() as usize
}

/// The one iovec builder: `s` extends `last` when it [`extends`] it
/// (`None`), else it needs an entry of its own (returned).
pub(crate) fn next_iovec(last: Option<&mut libc::iovec>, s: &[u8]) -> Option<libc::iovec> {
    if let Some(last) = last
        && extends(last, s)
    {
        last.iov_len += s.len();
        return None;
    }
    Some(libc::iovec {
        iov_base: s.as_ptr() as *mut libc::c_void,
        iov_len: s.len(),
    })
}

/// [`next_iovec`] into the first `count` entries of a stack array; returns
/// the new count.
pub(crate) fn push_iovec(
    iov: &mut [std::mem::MaybeUninit<libc::iovec>],
    count: usize,
    s: &[u8],
) -> usize {
    let last = count.checked_sub(1).map(|i| {
        // SAFETY: entries below `count` were written by earlier calls.
        unsafe { iov[i].assume_init_mut() }
    });
    match next_iovec(last, s) {
        None => count,
        Some(v) => {
            iov[count].write(v);
            count + 1
        }
    }
}

/// Frames gathered by one [`write_frames`] call.
pub(crate) const WRITE_BATCH: usize = 128;

/// One non-blocking, gathering write of the queued frames from position
/// `(skip_frames, skip_bytes)` (up to [`WRITE_BATCH`] frames; one range
/// goes out with `send`, skipping the msghdr). Returns what the kernel
/// took and how many bytes were offered; `EINTR` is retried.
pub(crate) fn write_frames(
    fd: BorrowedFd<'_>,
    outbox: &Outbox,
    skip_frames: usize,
    skip_bytes: usize,
) -> (Result<usize, rustix::io::Errno>, usize) {
    // Uninitialised: only the entries `push_iovec` writes are used.
    let mut iov = [std::mem::MaybeUninit::<libc::iovec>::uninit(); WRITE_BATCH];
    let (mut count, mut want) = (0, 0);
    for (i, f) in outbox
        .frames()
        .skip(skip_frames)
        .take(WRITE_BATCH)
        .enumerate()
    {
        let s = if i == 0 { &f[skip_bytes..] } else { &f[..] };
        want += s.len();
        count = push_iovec(&mut iov, count, s);
    }
    if count == 0 {
        return (Ok(0), 0);
    }
    let flags = libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT;
    loop {
        let rc = if count == 1 {
            // SAFETY: `push_iovec` wrote entry 0; the range lies in frames
            // the outbox keeps alive for this call; the kernel only reads.
            unsafe {
                let one = iov[0].assume_init_ref();
                libc::send(fd.as_raw_fd(), one.iov_base, one.iov_len, flags)
            }
        } else {
            // SAFETY: an all-zero msghdr is a valid empty header.
            let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
            // `MaybeUninit<iovec>` has iovec's layout; `count` are written.
            msg.msg_iov = iov.as_mut_ptr().cast();
            msg.msg_iovlen = count as _;
            // SAFETY: the iovecs point into frames the outbox keeps alive
            // for this call; the kernel only reads them.
            unsafe { libc::sendmsg(fd.as_raw_fd(), &msg, flags) }
        };
        if rc >= 0 {
            return (Ok(rc as usize), want);
        }
        let e = rustix::io::Errno::from_io_error(&io::Error::last_os_error())
            .unwrap_or(rustix::io::Errno::IO);
        if e != rustix::io::Errno::INTR {
            return (Err(e), want);
        }
    }
}

/// Moves the write position `(frames, bytes)` past `n` written bytes.
pub(crate) fn advance_position(outbox: &Outbox, pos: &mut (usize, usize), mut n: usize) {
    for f in outbox.frames().skip(pos.0) {
        let rest = f.len() - pos.1;
        if n >= rest {
            n -= rest;
            pos.0 += 1;
            pos.1 = 0;
        } else {
            pos.1 += n;
            return;
        }
    }
}

/// Frames a write that ended at `pos` touched (wholly or partly): they stay
/// in flight until the core applies the completion.
pub(crate) fn touched_frames(pos: (usize, usize)) -> usize {
    pos.0 + usize::from(pos.1 > 0)
}

/// One non-blocking read into what `into` lends (`EINTR` retried): a
/// `read` into its one buffer, or a `readv` over both parts of a split
/// receive; the bytes read are appended where they landed.
pub(crate) fn read_into(
    fd: BorrowedFd<'_>,
    into: &mut crate::wire::RecvInto,
) -> Result<usize, rustix::io::Errno> {
    if into.next.is_none() {
        let max = into.room();
        let len = into.head.len();
        loop {
            let spare = &mut into.head.spare_capacity_mut()[..max];
            match rustix::io::read(fd, spare) {
                Ok((init, _)) => {
                    let n = init.len();
                    // SAFETY: `read` initialised the first `n` bytes of the
                    // spare capacity, directly after the `len` valid ones.
                    unsafe { into.head.set_len(len + n) };
                    return Ok(n);
                }
                Err(rustix::io::Errno::INTR) => continue,
                Err(e) => return Err(e),
            }
        }
    }
    let (parts, count) = into.parts();
    let iov = parts.map(|(ptr, len)| libc::iovec {
        iov_base: ptr.cast(),
        iov_len: len,
    });
    loop {
        // SAFETY: each of the first `count` iovecs is spare capacity lent
        // by `parts` (writable, `iov_len` bytes, in buffers `into` owns and
        // nothing else uses during the call); `readv` writes at most that.
        let r = unsafe { libc::readv(fd.as_raw_fd(), iov.as_ptr(), count as libc::c_int) };
        if r >= 0 {
            // SAFETY: `readv` wrote the first `r` bytes of the parts, in
            // order.
            unsafe { into.advance(r as usize) };
            return Ok(r as usize);
        }
        match rustix::io::Errno::from_raw_os_error(
            std::io::Error::last_os_error().raw_os_error().unwrap_or(0),
        ) {
            rustix::io::Errno::INTR => continue,
            e => return Err(e),
        }
    }
}

/// The connections that last received data, read (and written) directly
/// while busy polling. Most recent first.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct HotConns([Option<ConnId>; 4]);

impl HotConns {
    /// Marks `id` hot (the oldest falls out).
    pub(crate) fn note(&mut self, id: ConnId) {
        if !self.contains(id) {
            self.0.rotate_right(1);
            self.0[0] = Some(id);
        }
    }

    pub(crate) fn contains(&self, id: ConnId) -> bool {
        self.0.contains(&Some(id))
    }

    /// The hot connections.
    pub(crate) fn ids(&self) -> impl Iterator<Item = ConnId> + use<> {
        self.0.into_iter().flatten()
    }

    /// Marks hot the connections whose receives in `completions` brought
    /// data, of those `may_be_hot` allows.
    pub(crate) fn note_received(
        &mut self,
        completions: &[Completion],
        may_be_hot: impl Fn(ConnId) -> bool,
    ) {
        for c in completions {
            if let Completion::Recv {
                conn,
                result: Ok(n),
                ..
            } = c
                && *n > 0
                && may_be_hot(*conn)
            {
                self.note(*conn);
            }
        }
    }

    /// Forgets a connection that went away.
    pub(crate) fn forget(&mut self, id: ConnId) {
        for slot in &mut self.0 {
            if *slot == Some(id) {
                *slot = None;
            }
        }
    }

    pub(crate) fn clear(&mut self) {
        self.0 = [None; 4];
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn adjacent_slices_share_an_iovec() {
        let buf = [1u8, 2, 3, 4, 5, 6];
        let other = [9u8; 2];
        let mut iov = [std::mem::MaybeUninit::<libc::iovec>::uninit(); 4];
        let mut n = super::push_iovec(&mut iov, 0, &buf[..2]);
        n = super::push_iovec(&mut iov, n, &buf[2..5]);
        assert_eq!(n, 1);
        n = super::push_iovec(&mut iov, n, &other);
        n = super::push_iovec(&mut iov, n, &buf[5..]);
        assert_eq!(n, 3);
        // SAFETY: the calls above wrote the first `n` entries.
        let iov: Vec<libc::iovec> = iov[..n]
            .iter()
            .map(|v| unsafe { v.assume_init() })
            .collect();
        assert_eq!(iov[0].iov_len, 5);
        assert_eq!(iov[1].iov_len, 2);
        assert_eq!(iov[2].iov_base as usize, buf[5..].as_ptr() as usize);
    }
}

/// Split receives through each backend's real receive paths: a stream of
/// frames cut at every receive window arrives whole and in order, and the
/// frames cut at a window are completed in place (the first frame of a
/// split receive's head lies in that head's allocation).
#[cfg(test)]
mod split_receive_tests {
    use std::os::fd::OwnedFd;
    use std::time::{Duration, Instant};

    use crate::proto::{ConnId, RecvBuf};
    use crate::reactor::{Backend, Completion};
    use crate::wire::{BufferPool, FrameDecoder};

    fn stream(frames: usize) -> (Vec<u8>, Vec<Vec<u8>>) {
        let payloads: Vec<Vec<u8>> = (0..frames)
            .map(|i| vec![i as u8; [700, 1500, 3000, 100][i % 4]])
            .collect();
        let mut out = Vec::new();
        for p in &payloads {
            out.extend_from_slice(&(p.len() as u32).to_be_bytes());
            out.extend_from_slice(p);
        }
        (out, payloads)
    }

    /// Receives `payloads` through `be` from a socket the whole stream was
    /// written to; returns how many receives were split. Every receive
    /// lent by the decoder goes on where the last one ended: a partial
    /// frame is never copied into a fresh buffer.
    fn receive_through(
        be: &mut dyn Backend,
        pool: &mut BufferPool,
        id: ConnId,
        payloads: &[Vec<u8>],
    ) -> usize {
        let mut dec = FrameDecoder::new(1 << 20);
        let (mut got, mut splits) = (0, 0);
        let mut last_end = 0usize;
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut out = Vec::new();
        while got < payloads.len() {
            let lent = match dec.recv_buf(pool) {
                Some(mut into) => {
                    let (parts, count) = into.parts();
                    assert_eq!(parts[0].0 as usize, last_end, "a partial frame was copied");
                    splits += usize::from(count == 2);
                    RecvBuf::Partial(into)
                }
                None => RecvBuf::Pooled,
            };
            be.recv(id, lent, pool);
            loop {
                be.submit();
                be.poll(Some(Duration::from_millis(50)), &mut out, pool)
                    .unwrap();
                if !out.is_empty() {
                    break;
                }
                assert!(Instant::now() < deadline, "the receive never came out");
            }
            for c in out.drain(..) {
                let Completion::Recv { buf, result, .. } = c else {
                    continue;
                };
                assert!(result.unwrap() > 0, "end of stream before the last frame");
                let last = buf
                    .next
                    .as_ref()
                    .filter(|n| !n.is_empty())
                    .unwrap_or(&buf.head);
                last_end = last.as_ptr() as usize + last.len();
                dec.filled(buf);
                while let Some(f) = dec.next_frame().unwrap() {
                    assert_eq!(&f[..], &payloads[got][..], "frame {got}");
                    got += 1;
                }
                dec.release(pool);
            }
        }
        assert_eq!(dec.partial_len(), 0);
        splits
    }

    fn check(mut be: Box<dyn Backend>) {
        // Small windows (16 KiB, 10 KiB of slack), so that many receives
        // end inside a frame.
        let mut pool = BufferPool::new(16 * 1024, 8);
        let (a, b) = std::os::unix::net::UnixStream::pair().unwrap();
        a.set_nonblocking(true).unwrap();
        let id = ConnId::from_u64(3);
        be.add_conn(id, OwnedFd::from(a)).unwrap();
        let (bytes, payloads) = stream(1000);
        let writer = std::thread::spawn(move || {
            use std::io::Write;
            let mut b = b;
            b.write_all(&bytes).unwrap();
            b
        });
        let splits = receive_through(be.as_mut(), &mut pool, id, &payloads);
        drop(writer.join().unwrap());
        assert!(splits > 50, "{}: only {splits} split receives", be.kind());
    }

    #[test]
    fn epoll_split_receives_deliver_the_stream() {
        check(Box::new(
            crate::reactor::epoll::EpollBackend::new().unwrap(),
        ));
    }

    #[test]
    fn io_uring_split_receives_deliver_the_stream() {
        match crate::reactor::uring::UringBackend::new() {
            Ok(be) => check(Box::new(be)),
            Err(e) => eprintln!("skipped: io_uring unavailable ({e})"),
        }
    }
}
