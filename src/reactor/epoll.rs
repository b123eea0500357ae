//! The epoll backend: edge-triggered readiness turned into completions.
//!
//! Each socket is registered once (`IN | OUT | RDHUP`, edge-triggered) and
//! its readiness remembered. A receive started on a readable socket is
//! performed at once; otherwise it is performed when the next edge arrives.
//! Writes are performed synchronously with `sendmsg` (gathering the outbox,
//! `MSG_NOSIGNAL`) until the kernel refuses more, and reported as finished;
//! a write that could not start waits for the `OUT` edge and then completes
//! with 0 bytes, which tells the core to try again.
//!
//! The [`Backend`] contract, point by point:
//!
//! 1. Receives: performed by a `read` at once when the socket is readable,
//!    else at its next edge; a pool buffer is taken only when data is there.
//! 2. Sends: performed synchronously (`sendmsg`, `MSG_NOSIGNAL`) until the
//!    kernel refuses more, so no frame is referenced after `send` returns.
//! 3. Closes: the socket leaves the epoll set and is closed at once.
//! 4. Accepts: the edge-triggered listener is drained to `EAGAIN`; a failure
//!    stops accepting until `resume_accept` drains it again.
//! 5. Waits: `epoll_wait` with the timeout; the [`Waker`]'s eventfd is in
//!    the set.
//! 6. Threads: nothing is tied to a thread; `moved_to_this_thread` is the
//!    default no-op.

use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::time::Duration;

use rustix::io::Errno;
use rustix::net::SocketFlags;

use super::sys::{ReadySet, read_ready};
use super::{Backend, BackendKind, Completion, ConnTable, Waker};
use crate::proto::{ConnId, Outbox, RecvBuf};
use crate::wire::BufferPool;

const LISTENER: u64 = u64::MAX;
const WAKE: u64 = u64::MAX - 1;
const EVENTS: usize = 256;

#[derive(Debug)]
struct EpollConn {
    id: ConnId,
    fd: OwnedFd,
    readable: bool,
    /// The peer hung up (see `Ready::hup`).
    hup: bool,
    writable: bool,
    want_write: bool,
    /// An armed receive: `Some(Pooled)` takes a pool buffer when data is
    /// there.
    recv: Option<RecvBuf>,
    /// The socket carries only a lane's control frames (see
    /// [`Backend::set_quiet`]): never hot.
    quiet: bool,
}

/// The epoll backend.
#[derive(Debug)]
pub struct EpollBackend {
    set: ReadySet,
    listener: Option<OwnedFd>,
    /// Accepting stopped after a failure, until `resume_accept`.
    accept_paused: bool,
    conns: ConnTable<EpollConn>,
    ready: Vec<Completion>,
    waker: Waker,
    /// Busy polling: zero-timeout polls read the connections that last
    /// had data directly, and call `epoll_wait` only every
    /// [`BUSY_EPOLL_EVERY`]th time (or when there is none to read).
    busy: bool,
    hot: crate::reactor::sys::HotConns,
    spins: u32,
    /// Receives are paused (the core's inbox is full): readiness is
    /// remembered, the reads wait.
    paused: bool,
    /// Connections that became readable with a receive started while
    /// receives were paused.
    deferred: Vec<ConnId>,
    /// How many of the connections are quiet.
    quiet: usize,
}

/// While busy polling, one zero-timeout poll in this many calls `epoll_wait`.
const BUSY_EPOLL_EVERY: u32 = 16;

impl EpollBackend {
    /// A backend with its own epoll instance.
    pub fn new() -> io::Result<Self> {
        let set = ReadySet::new(EVENTS)?;
        let waker = Waker::new()?;
        set.watch_readable(waker.fd(), WAKE, true)?;
        Ok(EpollBackend {
            set,
            listener: None,
            accept_paused: false,
            conns: ConnTable::default(),
            ready: Vec::new(),
            waker,
            busy: false,
            hot: crate::reactor::sys::HotConns::default(),
            spins: 0,
            paused: false,
            deferred: Vec::new(),
            quiet: 0,
        })
    }

    /// Accepts until the queue is empty (the listener is edge-triggered:
    /// no new edge comes for connections left in it). A failure stops
    /// accepting and is reported; the core's back-off resumes it.
    fn accept_all(&mut self) {
        let Some(l) = &self.listener else { return };
        if self.accept_paused {
            return;
        }
        loop {
            match rustix::net::accept_with(l, SocketFlags::NONBLOCK | SocketFlags::CLOEXEC) {
                Ok(fd) => self.ready.push(Completion::Accepted(fd)),
                Err(Errno::AGAIN) => return,
                Err(e) if crate::reactor::sys::accept_retry_now(e.raw_os_error()) => continue,
                Err(e) => {
                    // EMFILE, ENFILE, ENOMEM, ENOBUFS...: the queue still
                    // holds connections, and the edge is spent. Retrying
                    // now would spin; the core says when to try again.
                    self.accept_paused = true;
                    self.ready.push(Completion::AcceptFailed(e.into()));
                    return;
                }
            }
        }
    }

    fn do_read(ready: &mut Vec<Completion>, c: &mut EpollConn, pool: &mut BufferPool) {
        Self::do_read_keep(ready, c, pool, false)
    }

    /// [`Self::do_read`]; with `keep`, a pool buffer that received nothing
    /// stays with the connection (busy polling reads it again at once).
    fn do_read_keep(
        ready: &mut Vec<Completion>,
        c: &mut EpollConn,
        pool: &mut BufferPool,
        keep: bool,
    ) {
        let Some(armed) = c.recv.take() else { return };
        let pooled = matches!(armed, RecvBuf::Pooled);
        let mut buf = armed.into_target(pool);
        match read_ready(c.fd.as_fd(), &mut buf) {
            Some((result, more)) => {
                // A short read drained the socket; the next arrival raises
                // a new edge. After a hang-up none comes: the next read
                // returns the end of stream.
                c.readable = more || c.hup;
                ready.push(Completion::Recv {
                    conn: c.id,
                    buf,
                    result,
                });
            }
            None => {
                c.readable = false;
                c.recv = Some(if pooled && !keep {
                    // Nothing arrived: the pool buffer goes back.
                    buf.give_back(pool);
                    RecvBuf::Pooled
                } else {
                    RecvBuf::Partial(buf)
                });
            }
        }
    }
}

impl EpollBackend {
    /// Busy polling with every connection on a lane (their sockets quiet,
    /// see [`Backend::set_quiet`]): the spins read the rings, and the
    /// sockets (control frames, the listener, the waker) get an
    /// `epoll_wait` only every [`BUSY_EPOLL_EVERY`]th poll, not a system
    /// call on each.
    fn all_quiet(&self) -> bool {
        self.quiet > 0 && self.quiet == self.conns.len()
    }

    /// Busy polling: reads the hot connections that have a receive armed,
    /// readiness or not (a read that finds nothing costs what an empty
    /// `epoll_wait` costs, and one that finds data saves the `epoll_wait`
    /// that would have announced it). False when there was none to read.
    fn read_hot(&mut self, pool: &mut BufferPool) -> bool {
        let EpollBackend {
            conns, ready, hot, ..
        } = self;
        let mut tried = false;
        if self.paused {
            return false;
        }
        for id in hot.ids() {
            match conns.get_mut(id) {
                Some(c) if c.recv.is_some() => {
                    tried = true;
                    Self::do_read_keep(ready, c, pool, true);
                }
                Some(_) => {}
                None => hot.forget(id),
            }
        }
        tried
    }
}

impl Backend for EpollBackend {
    fn kind(&self) -> BackendKind {
        BackendKind::Epoll
    }

    fn pollable_fd(&self) -> BorrowedFd<'_> {
        self.set.fd()
    }

    fn listen(&mut self, fd: OwnedFd) -> io::Result<()> {
        self.set.watch_readable(fd.as_fd(), LISTENER, true)?;
        self.listener = Some(fd);
        Ok(())
    }

    fn close_listener(&mut self) {
        if let Some(l) = self.listener.take() {
            self.set.unwatch(l.as_fd());
        }
        self.accept_paused = false;
    }

    fn resume_accept(&mut self) {
        if std::mem::take(&mut self.accept_paused) {
            self.accept_all();
        }
    }

    fn add_conn(&mut self, id: ConnId, fd: OwnedFd) -> io::Result<()> {
        self.set.watch_socket(fd.as_fd(), id.as_u64())?;
        let replaced = self.conns.insert(
            id,
            EpollConn {
                id,
                fd,
                // Optimistic: data (a hello) is often there already.
                readable: true,
                hup: false,
                writable: true,
                want_write: false,
                recv: None,
                quiet: false,
            },
        );
        if let Some(old) = replaced {
            // A slot reused without a close (not done by the reactor, but
            // the counts stay true whatever the caller does).
            self.set.unwatch(old.fd.as_fd());
            self.quiet -= usize::from(old.quiet);
        }
        Ok(())
    }

    fn conn_fd(&self, id: ConnId) -> Option<BorrowedFd<'_>> {
        self.conns.get(id).map(|c| c.fd.as_fd())
    }

    fn recv(&mut self, id: ConnId, buf: RecvBuf, pool: &mut BufferPool) {
        let EpollBackend { conns, ready, .. } = self;
        let Some(c) = conns.get_mut(id) else {
            // A closed connection: its partial buffer goes back, as in uring.
            buf.give_back(pool);
            return;
        };
        c.recv = Some(buf);
        if c.readable {
            if self.paused {
                self.deferred.push(id);
            } else {
                Self::do_read(ready, c, pool);
            }
        }
    }

    fn send(&mut self, id: ConnId, outbox: &Outbox) -> usize {
        let EpollBackend { conns, ready, .. } = self;
        let Some(c) = conns.get_mut(id) else {
            return 0;
        };
        if !c.writable {
            c.want_write = true;
            return 0;
        }
        let mut total = 0usize;
        let mut pos = (0, outbox.front_offset());
        let result = loop {
            match crate::reactor::sys::write_frames(c.fd.as_fd(), outbox, pos.0, pos.1) {
                (Ok(0), 0) => break Ok(()),
                (Ok(n), want) => {
                    total += n;
                    crate::reactor::sys::advance_position(outbox, &mut pos, n);
                    if n < want {
                        c.writable = false;
                        break Ok(());
                    }
                }
                (Err(Errno::AGAIN), _) => {
                    c.writable = false;
                    break Ok(());
                }
                (Err(e), _) => break Err(e),
            }
        };
        match result {
            Ok(()) if total == 0 => c.want_write = true,
            Ok(()) => ready.push(Completion::Sent {
                conn: id,
                result: Ok(total),
            }),
            Err(_) if total > 0 => ready.push(Completion::Sent {
                conn: id,
                result: Ok(total),
            }),
            Err(e) => ready.push(Completion::Sent {
                conn: id,
                result: Err(e.into()),
            }),
        }
        // The frames this call wrote (wholly or partly) stay in flight until
        // the core applies the completion, so that a connection replacement
        // in between does not move (and resend) them.
        if total > 0 {
            crate::reactor::sys::touched_frames(pos)
        } else {
            0
        }
    }

    fn close(&mut self, id: ConnId) {
        if let Some(c) = self.conns.remove(id) {
            self.set.unwatch(c.fd.as_fd());
            self.quiet -= usize::from(c.quiet);
            self.hot.forget(id);
        }
    }

    fn set_quiet(&mut self, id: ConnId, quiet: bool, _pool: &mut BufferPool) {
        let Some(c) = self.conns.get_mut(id) else {
            return;
        };
        if c.quiet != quiet {
            c.quiet = quiet;
            if quiet {
                self.quiet += 1;
                self.hot.forget(id);
            } else {
                self.quiet -= 1;
            }
        }
    }

    fn lent_buffers(&self) -> usize {
        self.conns
            .values()
            .filter(|c| matches!(c.recv, Some(RecvBuf::Partial(_))))
            .count()
    }

    fn waker(&self) -> Waker {
        self.waker.clone()
    }

    fn submit(&mut self) {}

    fn set_busy_poll(&mut self, spin: bool) {
        self.busy = spin;
    }

    fn pause_receives(&mut self, pause: bool, pool: &mut BufferPool) {
        self.paused = pause;
        if pause {
            return;
        }
        let EpollBackend {
            conns,
            ready,
            deferred,
            ..
        } = self;
        for id in deferred.drain(..) {
            if let Some(c) = conns.get_mut(id)
                && c.readable
            {
                Self::do_read(ready, c, pool);
            }
        }
    }

    fn collect(&mut self, out: &mut Vec<Completion>) {
        out.append(&mut self.ready);
    }

    fn poll(
        &mut self,
        timeout: Option<Duration>,
        out: &mut Vec<Completion>,
        pool: &mut BufferPool,
    ) -> io::Result<()> {
        if self.busy && timeout == Some(Duration::ZERO) && self.ready.is_empty() {
            self.spins = self.spins.wrapping_add(1);
            if !self.spins.is_multiple_of(BUSY_EPOLL_EVERY)
                && (self.read_hot(pool) || self.all_quiet())
            {
                out.append(&mut self.ready);
                return Ok(());
            }
        }
        let (timeout, blocking) = self.waker.wait_timeout(!self.ready.is_empty(), timeout);
        let res = self.set.wait(timeout);
        if blocking {
            self.waker.finish_sleep();
        }
        res?;
        for i in 0..self.set.len() {
            let ev = self.set.get(i);
            if ev.token == LISTENER {
                self.accept_all();
                continue;
            }
            if ev.token == WAKE {
                self.waker.drain();
                continue;
            }
            let EpollBackend { conns, ready, .. } = self;
            let id = ConnId::from_u64(ev.token);
            let Some(c) = conns.get_mut(id) else {
                continue;
            };
            if ev.readable {
                c.readable = true;
                c.hup |= ev.hup;
                if !self.paused {
                    Self::do_read(ready, c, pool);
                } else if c.recv.is_some() {
                    self.deferred.push(id);
                }
            }
            if ev.writable {
                c.writable = true;
                if c.want_write {
                    c.want_write = false;
                    ready.push(Completion::Sent {
                        conn: id,
                        result: Ok(0),
                    });
                }
            }
        }
        if self.busy {
            let conns = &self.conns;
            self.hot
                .note_received(&self.ready, |id| conns.get(id).is_some_and(|c| !c.quiet));
        }
        out.append(&mut self.ready);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair() -> (OwnedFd, OwnedFd) {
        let (a, b) = std::os::unix::net::UnixStream::pair().unwrap();
        a.set_nonblocking(true).unwrap();
        b.set_nonblocking(true).unwrap();
        (a.into(), b.into())
    }

    /// Spins until a completion comes out (at most 2 s).
    fn spin_until_received(be: &mut EpollBackend, pool: &mut BufferPool) -> Vec<Completion> {
        let mut out = Vec::new();
        let deadline = std::time::Instant::now() + Duration::from_secs(2);
        while out.is_empty() {
            be.poll(Some(Duration::ZERO), &mut out, pool).unwrap();
            assert!(std::time::Instant::now() < deadline, "nothing came out");
        }
        out
    }

    /// Busy polling: a connection that brought data is read directly; a
    /// quiet one (its messages moved to a lane) is not, and while every
    /// connection is quiet the spins skip `epoll_wait` but for one poll in
    /// [`BUSY_EPOLL_EVERY`], which still brings what arrives. The counts
    /// follow closes and a loud connection.
    #[test]
    fn quiet_connections_are_not_hot_and_skip_the_wait() {
        let mut be = EpollBackend::new().unwrap();
        let mut pool = BufferPool::new(4096, 8);
        be.set_busy_poll(true);
        let (a, b) = pair();
        let (c, _d) = pair();
        let (one, two) = (ConnId::from_u64(3), ConnId::from_u64(4));
        be.add_conn(one, a).unwrap();
        be.add_conn(two, c).unwrap();
        be.recv(one, RecvBuf::Pooled, &mut pool);
        rustix::io::write(&b, b"hello").unwrap();
        spin_until_received(&mut be, &mut pool);
        assert!(be.hot.contains(one), "data made it hot");
        be.set_quiet(one, true, &mut pool);
        assert!(!be.hot.contains(one), "quiet: not hot");
        assert!(!be.all_quiet(), "the other connection is not quiet");
        be.set_quiet(two, true, &mut pool);
        be.set_quiet(two, true, &mut pool);
        assert!(be.all_quiet());
        assert_eq!(
            (be.conns.len(), be.quiet),
            (2, 2),
            "set twice, counted once"
        );
        // The spins skip the wait, yet the data comes out, and the
        // connection stays cold.
        be.recv(one, RecvBuf::Pooled, &mut pool);
        rustix::io::write(&b, b"again").unwrap();
        let out = spin_until_received(&mut be, &mut pool);
        assert!(
            matches!(&out[..], [Completion::Recv { conn, result: Ok(5), .. }] if *conn == one),
            "{out:?}"
        );
        assert!(!be.hot.contains(one), "still not hot");
        be.close(two);
        assert_eq!((be.conns.len(), be.quiet), (1, 1));
        be.set_quiet(one, false, &mut pool);
        assert!(!be.all_quiet());
        be.recv(one, RecvBuf::Pooled, &mut pool);
        rustix::io::write(&b, b"loud!").unwrap();
        spin_until_received(&mut be, &mut pool);
        assert!(be.hot.contains(one), "loud again: hot");
        be.close(one);
        assert_eq!((be.conns.len(), be.quiet), (0, 0));
    }
}
