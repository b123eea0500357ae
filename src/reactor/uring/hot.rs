//! The hot set: conversations (a connection read, then written) are read
//! and written directly and waited on in an edge-triggered epoll instance
//! with the ring's descriptor, instead of through armed SQEs.

use super::*;

/// The hot connections and their waits.
#[derive(Debug, Default)]
pub(super) struct HotSet {
    /// Busy polling: the spinning polls read the hot connections directly
    /// and write them with direct sends, entering the ring only every
    /// [`BUSY_ENTER_EVERY`] spins.
    pub(super) busy: bool,
    /// When busy polling, the connections that last brought data;
    /// otherwise the latest conversations (read, then written).
    pub(super) recent: crate::reactor::sys::HotConns,
    pub(super) spins: u32,
    /// Receives on hot connections, performed by direct non-blocking reads
    /// instead of SQEs: on each spinning poll, or after an epoll wait on
    /// them and the ring (see `wait_parked`).
    pub(super) parked: Vec<(ConnId, RecvInto)>,
    /// Waits with parked receives: the ring's descriptor and the hot
    /// sockets (created on first use).
    pub(super) set: Option<crate::reactor::sys::ReadySet>,
    /// Parked receives are paused (the core's inbox is full).
    pub(super) paused: bool,
}

impl UringBackend {
    /// Reads parked receives directly (non-blocking): all of them (busy
    /// polling), or those whose sockets may hold data. Those that find
    /// nothing stay parked. True if any was tried.
    pub(super) fn read_parked(&mut self, pool: &mut BufferPool, all: bool) -> bool {
        let mut tried = false;
        if self.hot.paused {
            return false;
        }
        let mut parked = std::mem::take(&mut self.hot.parked);
        parked.retain_mut(|(id, buf)| {
            let Some(c) = self.conns.get_mut(*id) else {
                std::mem::take(buf).give_back(pool);
                return false;
            };
            if !all && !c.readable {
                return true;
            }
            tried = true;
            let Some((result, more)) = crate::reactor::sys::read_ready(c.fd.as_fd(), buf) else {
                c.readable = false;
                return true;
            };
            // A short read drained the socket; a full one may have left
            // more behind (no new edge will say so), as may a hang-up (the
            // end of stream is still to read).
            c.readable = more || c.hup;
            if matches!(result, Ok(n) if n > 0) {
                self.received(*id);
            }
            self.ready.push(Completion::Recv {
                conn: *id,
                buf: std::mem::take(buf),
                result,
            });
            false
        });
        parked.append(&mut self.hot.parked);
        self.hot.parked = parked;
        tried
    }

    /// Notes a receive that brought data on `id`: busy polling makes it
    /// hot; otherwise a connection that receives twice without a send in
    /// between is a stream, not a conversation, and cools down.
    pub(super) fn received(&mut self, id: ConnId) {
        let Some(c) = self.conns.get_mut(id) else {
            return;
        };
        if c.quiet {
            return;
        }
        if self.hot.busy {
            self.hot.recent.note(id);
        }
        c.reads_since_send = c.reads_since_send.saturating_add(1);
        if !self.hot.busy && c.reads_since_send >= 2 {
            self.hot.recent.forget(id);
        }
    }

    /// Busy polling: writes to a hot connection with a direct non-blocking
    /// `send` (as the spinning reads do), reporting the completion at once.
    /// `None` when the kernel took nothing (the caller arms an SQE).
    pub(super) fn send_direct(&mut self, id: ConnId, outbox: &Outbox) -> Option<usize> {
        let c = self.conns.get(id)?;
        let mut pos = (0, outbox.front_offset());
        let result = match crate::reactor::sys::write_frames(c.fd.as_fd(), outbox, pos.0, pos.1) {
            (Ok(0), 0) | (Err(rustix::io::Errno::AGAIN), _) => return None,
            (Ok(n), _) => {
                crate::reactor::sys::advance_position(outbox, &mut pos, n);
                Ok(n)
            }
            (Err(e), _) => Err(io::Error::from(e)),
        };
        let in_flight = if result.is_ok() {
            crate::reactor::sys::touched_frames(pos)
        } else {
            0
        };
        self.ready.push(Completion::Sent { conn: id, result });
        Some(in_flight)
    }

    /// Turns the parked receives of connections no longer hot back into
    /// armed SQEs.
    pub(super) fn unpark_cold(&mut self, pool: &mut BufferPool) {
        if self
            .hot
            .parked
            .iter()
            .all(|(id, _)| self.hot.recent.contains(*id))
        {
            return;
        }
        let mut parked = std::mem::take(&mut self.hot.parked);
        parked.retain_mut(|(id, buf)| {
            if self.hot.recent.contains(*id) {
                return true;
            }
            self.unwatch(*id);
            self.issue_recv(*id, RecvBuf::Partial(std::mem::take(buf)), pool);
            false
        });
        parked.append(&mut self.hot.parked);
        self.hot.parked = parked;
    }

    /// Stops watching `id` in `hot_wait` (before its descriptor closes or
    /// when it cools down).
    pub(super) fn unwatch(&mut self, id: ConnId) {
        let (Some(set), Some(c)) = (&self.hot.set, self.conns.get_mut(id)) else {
            return;
        };
        if c.watched {
            c.watched = false;
            set.unwatch(c.fd.as_fd());
        }
    }

    /// Registers the parked connections (and, first, the ring) with
    /// `hot_wait`. False if that failed: the caller waits on the ring.
    pub(super) fn watch_parked(&mut self) -> bool {
        if self.hot.set.is_none() {
            // The ring's descriptor level-triggered: completions waiting in
            // it keep the wait short.
            let set = crate::reactor::sys::ReadySet::new(8).and_then(|set| {
                set.watch_readable(self.pollable_fd(), RING_TOKEN, false)
                    .map(|()| set)
            });
            match set {
                Ok(set) => self.hot.set = Some(set),
                Err(e) => {
                    log::warn!("io_uring: no epoll for hot connections ({e}); waiting on the ring");
                    return false;
                }
            }
        }
        let Some(set) = &self.hot.set else {
            return false;
        };
        for (id, _) in &self.hot.parked {
            let Some(c) = self.conns.get_mut(*id) else {
                continue;
            };
            if c.watched {
                continue;
            }
            if let Err(e) = set.watch_socket(c.fd.as_fd(), id.as_u64()) {
                log::warn!("io_uring: cannot watch a hot connection ({e}); waiting on the ring");
                return false;
            }
            c.watched = true;
            // Data may have arrived before the registration.
            c.readable = true;
        }
        true
    }

    /// A poll with parked (hot) receives: submits what is queued, then
    /// waits on the ring's descriptor and the hot sockets together (an
    /// edge-triggered epoll instance) and reads the sockets that became
    /// readable directly.
    ///
    /// A receive armed in the ring is woken through task work; a socket's
    /// own wait queue wakes its waiter directly, and with `OUT` registered
    /// also when the peer reads what we sent, which finds this thread's
    /// CPU awake when the reply comes. PERFORMANCE.md has the blocking
    /// ping-pong measured both ways.
    pub(super) fn wait_parked(
        &mut self,
        timeout: Option<Duration>,
        out: &mut Vec<Completion>,
        pool: &mut BufferPool,
    ) -> io::Result<bool> {
        if !self.watch_parked() {
            return Ok(false);
        }
        // The wake-up read must be in the kernel when the wait starts: a
        // reap may take its completion (a signal, or a wake that came
        // after the last wait had ended), and a wait without it would not
        // see the next wake. Each completion emptied the eventfd, so this
        // ends unless wakes keep coming (then there is work anyway).
        for _ in 0..4 {
            self.arm_wake();
            if !self.ring.submission().is_empty() {
                match self.submit(0, None) {
                    Ok(_) => {}
                    Err(e) if matches!(e.raw_os_error(), Some(libc::EINTR | libc::EBUSY)) => {}
                    Err(e) => return Err(e),
                }
            }
            self.reap();
            if self.wake.armed {
                break;
            }
        }
        self.read_parked(pool, false);
        let ready =
            !self.ready.is_empty() || !self.ring.completion().is_empty() || !self.wake.armed;
        let (timeout, blocking) = self.waker.wait_timeout(ready, timeout);
        let Some(set) = &mut self.hot.set else {
            return Ok(false);
        };
        let res = set.wait(timeout);
        if blocking {
            self.waker.finish_sleep();
        }
        res?;
        for i in 0..set.len() {
            let ev = set.get(i);
            if ev.token != RING_TOKEN
                && ev.readable
                && let Some(c) = self.conns.get_mut(ConnId::from_u64(ev.token))
            {
                c.readable = true;
                c.hup |= ev.hup;
            }
        }
        self.read_parked(pool, false);
        self.reap();
        self.rearm_wake();
        out.append(&mut self.ready);
        Ok(true)
    }
}
