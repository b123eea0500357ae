//! Operations and their memory: the slab of in-flight operations, the
//! submission queue, completions, and the receives and sends an SQE
//! carries (see the ownership rules in `mod.rs`).

use super::*;

impl UringBackend {
    /// Queues one SQE, submitting first if the queue is full.
    ///
    /// # Safety
    /// Every pointer in `entry` must stay valid until its completion is
    /// reaped: it must point into memory owned by an entry of `self.ops` or
    /// `self.provided.bufs`.
    pub(super) unsafe fn push(&mut self, entry: squeue::Entry) {
        loop {
            // SAFETY: upheld by the caller (see above).
            if unsafe { self.ring.submission().push(&entry) }.is_ok() {
                self.pushed += 1;
                return;
            }
            match self.submit(0, None) {
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) => self.reap(),
                Err(e) => {
                    log::error!("io_uring submit failed: {e}");
                    self.reap();
                }
            }
        }
    }

    /// Stores an operation; returns its SQE user data: the slab key plus a
    /// generation, so that a cancellation aimed at a finished operation can
    /// never hit a newer one that reused the key.
    pub(super) fn insert_op(&mut self, op: Op) -> u64 {
        let generation = self.next_gen;
        self.next_gen = self.next_gen.wrapping_add(1).max(1);
        let key = self.ops.insert((generation, op));
        (u64::from(generation) << 32) | key as u64
    }

    /// Submits queued SQEs (waiting for `want` completions, up to
    /// `timeout`), then releases descriptors no queued SQE names any more.
    pub(super) fn submit(&mut self, want: usize, timeout: Option<Duration>) -> io::Result<usize> {
        let res = match timeout {
            Some(d) if want > 0 => {
                let ts = types::Timespec::from(d);
                let args = types::SubmitArgs::new().timespec(&ts);
                self.ring.submitter().submit_with_args(want, &args)
            }
            _ => self.ring.submit_and_wait(want),
        };
        if self.ring.submission().is_empty() {
            self.deferred_close.clear();
        }
        res
    }

    /// Closes `fd` as soon as no queued SQE can name it by number: at once
    /// when the submission queue is empty, else at the next submit (which
    /// every wait does first, see `release_deferred`), never after a wait.
    pub(super) fn defer_close(&mut self, fd: OwnedFd) {
        if self.ring.submission().is_empty() {
            drop(fd);
        } else {
            self.deferred_close.push(fd);
        }
    }

    /// Submits the queue if descriptors wait for it to be closed, so that
    /// a wait never holds a closed connection's descriptor open (a peer's
    /// EOF would otherwise keep it until the next completion).
    pub(super) fn release_deferred(&mut self) {
        if self.deferred_close.is_empty() {
            return;
        }
        if let Err(e) = self.submit(0, None)
            && e.raw_os_error() != Some(libc::EBUSY)
        {
            log::error!("io_uring submit failed: {e}");
        }
    }

    pub(super) fn arm_accept(&mut self) {
        let Some(l) = &self.listener else { return };
        let fd = types::Fd(l.as_raw_fd());
        let flags = libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC;
        let multishot = self.accept.multishot;
        let key = self.insert_op(Op::Accept { multishot });
        let entry = if multishot {
            opcode::AcceptMulti::new(fd).flags(flags).build()
        } else {
            opcode::Accept::new(fd, std::ptr::null_mut(), std::ptr::null_mut())
                .flags(flags)
                .build()
        };
        self.accept.op = Some(key);
        // SAFETY: accept passes no memory to the kernel.
        unsafe { self.push(entry.user_data(key)) };
        self.accept.seq = self.pushed;
    }

    pub(super) fn arm_wake(&mut self) {
        if self.wake.armed {
            return;
        }
        let mut buf = Box::new([0u8; 8]);
        let ptr = buf.as_mut_ptr();
        let fd = types::Fd(self.waker.fd().as_raw_fd());
        let key = self.insert_op(Op::Wake { _buf: buf });
        self.wake.armed = true;
        self.wake.op = Some(key);
        // SAFETY: the 8-byte buffer is boxed inside `ops[key]` until the
        // completion is reaped.
        unsafe { self.push(opcode::Read::new(fd, ptr, 8).build().user_data(key)) };
        self.wake.seq = self.pushed;
    }

    /// Re-arms the wake-up read if a completion just consumed it, and
    /// submits it now: a signal (see [`Waker::signal`]) must make the ring
    /// readable before the next poll, for callers who poll its descriptor.
    pub(super) fn rearm_wake(&mut self) {
        if self.wake.armed {
            return;
        }
        self.arm_wake();
        if let Err(e) = self.submit(0, None)
            && e.raw_os_error() != Some(libc::EBUSY)
        {
            log::error!("io_uring submit failed: {e}");
        }
    }

    pub(super) fn cancel(&mut self, op: u64) {
        let key = self.insert_op(Op::Cancel);
        // SAFETY: cancellation passes no memory.
        unsafe { self.push(opcode::AsyncCancel::new(op).build().user_data(key)) };
    }

    pub(super) fn result(res: i32) -> io::Result<usize> {
        if res >= 0 {
            Ok(res as usize)
        } else {
            Err(io::Error::from_raw_os_error(-res))
        }
    }

    /// Moves finished completions into `ready`.
    pub(super) fn reap(&mut self) {
        self.cqes.clear();
        // A bounded batch per turn (as epoll's event array bounds it): with
        // many busy connections, the data and messages of one turn stay
        // small enough to stay in cache; the rest waits in the ring.
        for cqe in self.ring.completion().take(REAP_BATCH) {
            self.cqes.push((cqe.user_data(), cqe.result(), cqe.flags()));
        }
        let cqes = std::mem::take(&mut self.cqes);
        let selecting = self.provided.selecting;
        for &(user_data, res, flags) in &cqes {
            self.complete(user_data, res, flags);
        }
        // Every buffer-selecting receive that completed wanted a buffer.
        let seen = selecting.saturating_sub(self.provided.selecting);
        self.provided.demand = seen.max(self.provided.demand - self.provided.demand / 8);
        self.cqes = cqes;
    }

    /// Applies one completion to the operation it names.
    pub(super) fn complete(&mut self, user_data: u64, res: i32, flags: u32) {
        let key = (user_data & 0xFFFF_FFFF) as usize;
        let generation = (user_data >> 32) as u32;
        let Some((_, op)) = self.ops.get(key).filter(|(g, _)| *g == generation) else {
            log::error!("io_uring completion for unknown operation {user_data:#x}");
            return;
        };
        if let Op::Accept { multishot } = *op {
            // A multishot accept stays in flight while the kernel says more.
            if !cqueue::more(flags) {
                self.ops.remove(key);
            }
            return self.accepted(user_data, multishot, res, flags);
        }
        match self.ops.remove(key).1 {
            Op::Accept { .. } | Op::Cancel => {}
            Op::Recv { conn, buf, .. } => self.received_into(user_data, conn, buf, res, flags),
            Op::Send { conn, state } => self.sent(user_data, conn, state, res),
            Op::Provide { bid } => self.provide_done(bid, res),
            Op::Wake { .. } => {
                if self.wake.op == Some(user_data) {
                    self.wake.op = None;
                    self.wake.armed = false;
                }
            }
        }
    }

    /// An accept's completion (one of a multishot accept's).
    fn accepted(&mut self, user_data: u64, multishot: bool, res: i32, flags: u32) {
        let more = cqueue::more(flags);
        if res >= 0 {
            // SAFETY: a successful accept returns a new descriptor that
            // nothing else owns.
            let fd = unsafe { OwnedFd::from_raw_fd(res) };
            self.ready.push(Completion::Accepted(fd));
        } else if res == -libc::EINVAL && multishot {
            log::info!("io_uring: multishot accept unsupported; using single-shot accepts");
            self.accept.multishot = false;
        } else if !crate::reactor::sys::accept_retry_now(-res) {
            // EMFILE, ENFILE, ENOMEM, ENOBUFS...: stop accepting until the
            // core's back-off says to try again (re-arming now would fail
            // at once, forever: a busy loop).
            self.accept.paused = true;
            self.ready
                .push(Completion::AcceptFailed(io::Error::from_raw_os_error(-res)));
            if more && self.accept.op == Some(user_data) {
                // A multishot accept that goes on after an error is stopped
                // too; its cancellation is no longer current.
                self.accept.op = None;
                self.cancel(user_data);
            }
        }
        // Ended and still current: not cancelled by us (we forget an accept
        // before cancelling it), but by the kernel, which also cancels a
        // thread's requests when it exits.
        if !more && self.accept.op == Some(user_data) {
            self.accept.op = None;
            if !self.accept.paused {
                self.arm_accept();
            }
        }
        // The accept `moved_to_this_thread` cancelled has ended: its
        // successor may wait now.
        if !more && self.accept.rearm_after == Some(user_data) {
            self.accept.rearm_after = None;
            if self.accept.op.is_none() && !self.accept.paused {
                self.arm_accept();
            }
        }
    }

    /// A receive's completion: its own buffer or the provided one the
    /// kernel picked, with `res` bytes appended.
    fn received_into(
        &mut self,
        user_data: u64,
        conn: ConnId,
        buf: Option<RecvInto>,
        res: i32,
        flags: u32,
    ) {
        let mut buf = match buf {
            Some(b) => b,
            None => {
                self.provided.selecting -= 1;
                let b = cqueue::buffer_select(flags)
                    .and_then(|bid| self.take_provided(bid))
                    .unwrap_or_default();
                let room = b.capacity() - b.len();
                RecvInto::within(b, room)
            }
        };
        if res > 0 {
            let n = (res as usize).min(buf.room());
            debug_assert_eq!(n, res as usize);
            // SAFETY: the kernel wrote `res` bytes into the parts the
            // receive was given (for a provided buffer, from its start,
            // within its capacity), in order.
            unsafe { buf.advance(n) };
            self.received(conn);
        }
        let result = if res == -libc::ENOBUFS || res == -libc::ECANCELED {
            // The provided group ran dry; try again after refilling. Or the
            // receive was cancelled while its connection is open (ours are
            // cancelled only when it closes): by `moved_to_this_thread`, or
            // by the kernel because the thread that submitted it exited.
            // Armed again.
            Err(io::ErrorKind::WouldBlock.into())
        } else {
            Self::result(res)
        };
        if let Some(c) = self.conn(conn) {
            if c.recv_op == Some(user_data) {
                c.recv_op = None;
            }
            self.ready.push(Completion::Recv { conn, buf, result });
        }
    }

    /// A send's completion; its memory goes back to the connection.
    fn sent(&mut self, user_data: u64, conn: ConnId, mut state: Box<SendState>, res: i32) {
        state.frames.clear();
        let Some(c) = self.conn(conn) else { return };
        if c.send_op == Some(user_data) {
            c.send_op = None;
        }
        c.spare_send = Some(state);
        // Cancelled with its connection open (its submitting thread
        // exited): nothing was written; write again.
        let result = if res == -libc::ECANCELED {
            Ok(0)
        } else {
            Self::result(res)
        };
        self.ready.push(Completion::Sent { conn, result });
    }

    /// Arms a receive SQE (into `buf`, or a provided buffer for `Pooled`).
    pub(super) fn issue_recv(&mut self, id: ConnId, buf: RecvBuf, pool: &mut BufferPool) {
        let Some(c) = self.conn(id) else {
            buf.give_back(pool);
            return;
        };
        let fd = types::Fd(c.fd.as_raw_fd());
        match buf {
            RecvBuf::Partial(mut b) => {
                let (parts, count) = b.parts();
                let iov = (count > 1).then(|| {
                    Box::new(RecvParts(parts.map(|(ptr, len)| libc::iovec {
                        iov_base: ptr.cast(),
                        iov_len: len,
                    })))
                });
                let entry = match &iov {
                    Some(iov) => opcode::Readv::new(fd, iov.0.as_ptr(), count as u32).build(),
                    None => {
                        let (ptr, len) = parts[0];
                        opcode::Recv::new(fd, ptr, len.min(u32::MAX as usize) as u32).build()
                    }
                };
                let key = self.insert_op(Op::Recv {
                    conn: id,
                    buf: Some(b),
                    _iov: iov,
                });
                if let Some(c) = self.conn(id) {
                    c.recv_op = Some(key);
                }
                // SAFETY: the buffers' heap memory, and the iovecs naming
                // it, are owned by `ops[key]` (moving a `BytesMut` or a
                // `Box` does not move what it points to) until reaped.
                unsafe { self.push(entry.user_data(key)) };
            }
            RecvBuf::Pooled => {
                self.provided.selecting += 1;
                self.replenish(pool);
                let len = pool.buf_size().min(u32::MAX as usize) as u32;
                let key = self.insert_op(Op::Recv {
                    conn: id,
                    buf: None,
                    _iov: None,
                });
                if let Some(c) = self.conn(id) {
                    c.recv_op = Some(key);
                }
                let entry = opcode::Recv::new(fd, std::ptr::null_mut(), len)
                    .buf_group(BGID)
                    .build()
                    .flags(squeue::Flags::BUFFER_SELECT);
                // SAFETY: the kernel picks a buffer from `self.provided.bufs`,
                // which keeps it until the completion names it.
                unsafe { self.push(entry.user_data(key)) };
            }
        }
        let seq = self.pushed;
        if let Some(c) = self.conn(id) {
            c.recv_seq = seq;
        }
    }

    pub(super) fn send_inner(&mut self, id: ConnId, outbox: &Outbox) -> usize {
        let Some(c) = self.conn(id) else { return 0 };
        if c.send_op.is_some() {
            return 0;
        }
        if std::mem::take(&mut c.reads_since_send) > 0 && !c.quiet {
            // A connection read and then written, turn by turn (a request
            // answered, a reply awaited): its receives are parked and
            // waited on directly, for latency (see `wait_parked`).
            self.hot.recent.note(id);
        }
        if self.hot.recent.contains(id)
            && let Some(in_flight) = self.send_direct(id, outbox)
        {
            return in_flight;
        }
        let Some(c) = self.conn(id) else { return 0 };
        let fd = types::Fd(c.fd.as_raw_fd());
        let mut st = c.spare_send.take().unwrap_or_else(SendState::new);
        st.frames.clear();
        st.iov.clear();
        st.frames.extend(outbox.frames().take(IOV_MAX).cloned());
        let offset = outbox.front_offset();
        for (i, f) in st.frames.iter().enumerate() {
            let s = if i == 0 { &f[offset..] } else { &f[..] };
            // Frames built one after another in the send arena are adjacent
            // in memory: one iovec covers them all.
            if let Some(v) = crate::reactor::sys::next_iovec(st.iov.last_mut(), s) {
                st.iov.push(v);
            }
        }
        st.msg.msg_iov = st.iov.as_mut_ptr();
        st.msg.msg_iovlen = st.iov.len() as _;
        let in_flight = st.frames.len();
        let msg: *const libc::msghdr = &st.msg;
        // Ranges above 4 GiB go through SENDMSG (SEND takes a u32 length).
        let single: &[libc::iovec] = match st.iov.as_slice() {
            [one] if one.iov_len <= u32::MAX as usize => &[*one],
            _ => &[],
        };
        let key = self.insert_op(Op::Send {
            conn: id,
            state: st,
        });
        if let Some(c) = self.conn(id) {
            c.send_op = Some(key);
        }
        let entry = if let [one] = single {
            // One range (adjacent frames merged): a plain SEND skips
            // importing the msghdr and iovec array.
            opcode::Send::new(fd, one.iov_base as *const u8, one.iov_len as u32)
                .flags(libc::MSG_NOSIGNAL)
                .build()
        } else {
            opcode::SendMsg::new(fd, msg)
                .flags(libc::MSG_NOSIGNAL as u32)
                .build()
        }
        .user_data(key);
        // SAFETY: `msg`, the iovecs and the frame bytes they point to are
        // owned by the boxed state in `ops[key]` until the completion.
        unsafe { self.push(entry) };
        in_flight
    }
}
