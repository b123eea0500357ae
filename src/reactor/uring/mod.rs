//! The io_uring backend: native completions.
//!
//! The [`Backend`] contract, point by point (the files of this folder:
//! `ops.rs` for operations and their memory, `provided.rs` for the
//! provided-buffer group, `hot.rs` for the hot set):
//!
//! 1. Receives: an armed `RECV` SQE owns its buffer (or selects a provided
//!    one) until its CQE; on hot connections a parked receive is read
//!    directly. A receive the kernel cancelled while its connection is open
//!    is reported as `WouldBlock` and started again.
//! 2. Sends: one `SEND`/`SENDMSG` per connection, whose operation owns
//!    references to its frames, its iovecs and `msghdr` until the CQE.
//! 3. Closes: operations are cancelled; the descriptor is closed as soon as
//!    no queued SQE names it, and before any wait; the operations' memory
//!    is freed when their CQEs arrive.
//! 4. Accepts: one multishot `ACCEPT`; a failed one is not re-armed until
//!    `resume_accept`.
//! 5. Waits: `io_uring_enter` waiting for one CQE with the timeout (or the
//!    hot set's epoll wait); the [`Waker`]'s eventfd is read by a `READ` op.
//! 6. Threads: the kernel ties requests to the thread that submitted them;
//!    `moved_to_this_thread` submits the long-lived ones again.
//!
//! * Accepts with one multishot `ACCEPT` (re-armed if the kernel ends it;
//!   single-shot on kernels without multishot).
//! * Receives with `RECV`: into the connection's partial-frame buffer when
//!   it has one, otherwise with `IOSQE_BUFFER_SELECT` from a group of
//!   pooled buffers provided to the kernel, so idle connections pin no
//!   memory.
//! * Writes each connection's outbox with one `SENDMSG` (gathering up to
//!   1024 frames, `MSG_NOSIGNAL`); all of a turn's sends go to the kernel in
//!   the single `io_uring_enter` that also waits for completions.
//! * Wakes from other threads through an eventfd read by a `READ` op (see
//!   [`Waker`]).
//! * Conversations are waited on directly. A connection read and then
//!   written, turn by turn (a request answered, a reply awaited), is *hot*:
//!   its receives are parked instead of armed, and a blocking wait sleeps in
//!   an edge-triggered epoll instance holding the hot sockets and the ring's
//!   descriptor, then reads the hot sockets that became readable with plain
//!   `read`s. A receive armed in the ring is woken through task work, which
//!   made a blocking ping-pong measurably slower than raw sockets
//!   (PERFORMANCE.md); waiting on the socket itself costs what epoll does. A connection that
//!   brings data twice without a send in between is a stream and goes back
//!   to the ring, so streams and fan-in stay entirely on io_uring. Busy
//!   polling reads (and writes) its hot connections directly on each spin.
//!
//! # Buffer ownership
//!
//! The kernel may write into (or read from) memory until it posts the
//! operation's completion, so memory is owned by *operations*, never by
//! connections:
//!
//! * every in-flight operation is an entry of `ops` (a slab; its key is the
//!   SQE's user data) that owns what the kernel may touch: the receive
//!   buffer, or the send's frames (reference-counted clones), iovec array and
//!   `msghdr`, boxed so their addresses never move;
//! * buffers provided to the kernel live in `provided` until a completion
//!   names them (then they are handed out with the data) or the backend is
//!   torn down;
//! * closing a connection cancels its operations (`ASYNC_CANCEL`) and closes
//!   its descriptor, but the operations stay in `ops` until their
//!   completions arrive; only then is their memory released. A completion
//!   for a closed connection is dropped (connection ids carry a generation,
//!   so a reused slot is never confused with its predecessor);
//! * dropping the backend cancels everything and waits (bounded) for every
//!   completion; should the kernel not answer in time, the memory is leaked
//!   rather than freed under it.

mod hot;
mod ops;
mod provided;

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use io_uring::{IoUring, cqueue, opcode, squeue, types};
use slab::Slab;

use super::{Backend, BackendKind, Completion, ConnTable, Waker};
use crate::proto::{ConnId, Outbox, RecvBuf};
use crate::wire::{BufferPool, RecvInto};

/// Buffer group of the provided receive buffers.
const BGID: u16 = 0x1c;
/// Buffers kept provided to the kernel: one per receive waiting on the
/// group (plus one), but no more than recent demand calls for (at least
/// [`PROVIDED_MIN`], at most [`PROVIDED_MAX`]): idle connections pin no
/// buffers, and a thousand busy senders do not starve on `ENOBUFS`.
const PROVIDED_MIN: usize = 32;
/// Upper bound of provided buffers.
const PROVIDED_MAX: usize = 4096;
/// Completions applied per reap.
const REAP_BATCH: usize = 256;
/// Frames gathered by one `SENDMSG` (the kernel's `UIO_MAXIOV`).
const IOV_MAX: usize = 1024;
const SQ_ENTRIES: u32 = 256;
const CQ_ENTRIES: u32 = 4096;

/// Memory of one in-flight `SENDMSG`; reused by its connection.
struct SendState {
    frames: Vec<Bytes>,
    iov: Vec<libc::iovec>,
    msg: libc::msghdr,
}

// SAFETY: the raw pointers in `iov` and `msg` point into `frames` and
// `iov`, which this struct owns; moving it to another thread moves that
// memory with it, and nothing else shares it.
unsafe impl Send for SendState {}

impl SendState {
    fn new() -> Box<Self> {
        Box::new(SendState {
            frames: Vec::new(),
            iov: Vec::new(),
            // SAFETY: `msghdr` is plain data; all-zero is a valid value.
            msg: unsafe { std::mem::zeroed() },
        })
    }
}

/// The parts of an in-flight split receive (see [`RecvInto`]).
struct RecvParts([libc::iovec; 2]);

// SAFETY: the pointers are into the buffers of the `RecvInto` that the
// same `Op::Recv` owns; moving the op to another thread moves that memory
// with it, and nothing else shares it.
unsafe impl Send for RecvParts {}

enum Op {
    Accept {
        multishot: bool,
    },
    /// `buf: None` selects a provided buffer; `iov` is a split receive's
    /// parts (`READV`).
    Recv {
        conn: ConnId,
        buf: Option<RecvInto>,
        /// Only has to outlive the kernel's read of it.
        _iov: Option<Box<RecvParts>>,
    },
    Send {
        conn: ConnId,
        state: Box<SendState>,
    },
    Provide {
        bid: u16,
    },
    Cancel,
    /// The buffer is never read: it only has to outlive the kernel's write.
    Wake {
        _buf: Box<[u8; 8]>,
    },
}

struct UringConn {
    fd: OwnedFd,
    /// For parked receives: the socket may hold unread data (an edge from
    /// `hot_wait`, or the last direct read filled its buffer).
    readable: bool,
    /// The peer hung up (see `Ready::hup`).
    hup: bool,
    /// Registered with `hot_wait`.
    watched: bool,
    /// Receives that brought data since the last send (saturating).
    reads_since_send: u8,
    /// The socket carries only a lane's control frames (see
    /// [`Backend::set_quiet`]): never hot, its receive stays an armed SQE,
    /// whose completion a spin sees without a system call.
    quiet: bool,
    recv_op: Option<u64>,
    /// The armed receive's place in the order of pushed SQEs.
    recv_seq: u64,
    send_op: Option<u64>,
    spare_send: Option<Box<SendState>>,
}

/// The io_uring backend.
pub struct UringBackend {
    ring: IoUring,
    /// The kernel flags pending completion work in the submission ring
    /// (`IORING_SETUP_TASKRUN_FLAG`).
    taskrun_flag: bool,
    /// In-flight operations; the key (with a generation) is the SQE's user
    /// data.
    ops: Slab<(u32, Op)>,
    next_gen: u32,
    conns: ConnTable<UringConn>,
    listener: Option<OwnedFd>,
    accept: AcceptState,
    provided: provided::ProvidedBufs,
    waker: Waker,
    wake: WakeRead,
    /// Completions ready for the reactor.
    ready: Vec<Completion>,
    cqes: Vec<(u64, i32, u32)>,
    /// Descriptors of closed connections, kept open until the SQEs that
    /// name them by number have been submitted (a number closed earlier
    /// could be reused by an unrelated socket before the kernel reads the
    /// SQE).
    deferred_close: Vec<OwnedFd>,
    hot: hot::HotSet,
    /// SQEs pushed so far: the ones still in the submission queue are the
    /// last of them, and all the others have been submitted.
    pushed: u64,
}

/// The listening socket's accept.
#[derive(Debug)]
struct AcceptState {
    /// The armed accept.
    op: Option<u64>,
    /// Multishot accepts work on this kernel (else single-shot ones).
    multishot: bool,
    /// Accepting stopped after a failure, until `resume_accept`.
    paused: bool,
    /// Its place in the order of pushed SQEs (see `UringBackend::pushed`).
    seq: u64,
    /// An accept cancelled by `moved_to_this_thread`: the next one is armed
    /// when its last completion arrives, not before (see there).
    rearm_after: Option<u64>,
}

/// The `READ` of the [`Waker`]'s eventfd.
#[derive(Debug, Default)]
struct WakeRead {
    armed: bool,
    /// The armed read.
    op: Option<u64>,
    /// Its place in the order of pushed SQEs (see `UringBackend::pushed`).
    seq: u64,
}

/// The ring's token in the hot set's epoll instance.
const RING_TOKEN: u64 = u64::MAX;

/// While busy polling, one spin in this many enters the ring.
const BUSY_ENTER_EVERY: u32 = 16;

impl std::fmt::Debug for UringBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UringBackend")
            .field("ops", &self.ops.len())
            .field("provided", &self.provided.count)
            .finish()
    }
}

/// Opcodes the backend needs, with their names for error messages.
const REQUIRED: [(u8, &str); 6] = [
    (opcode::Accept::CODE, "ACCEPT"),
    (opcode::Recv::CODE, "RECV"),
    (opcode::SendMsg::CODE, "SENDMSG"),
    (opcode::AsyncCancel::CODE, "ASYNC_CANCEL"),
    (opcode::ProvideBuffers::CODE, "PROVIDE_BUFFERS"),
    (opcode::Read::CODE, "READ"),
];

impl UringBackend {
    /// Sets up a ring and probes the opcodes the backend needs. Fails with
    /// the reason (setup refused, opcode missing) when io_uring is not
    /// usable here.
    pub fn new() -> io::Result<Self> {
        // Cooperative task running and its flag (both Linux 5.19): the
        // flag tells a turn that does not wait whether entering the kernel
        // would post anything. Without them, every such turn enters.
        let (ring, taskrun_flag) = match IoUring::builder()
            .setup_cqsize(CQ_ENTRIES)
            .setup_coop_taskrun()
            .setup_taskrun_flag()
            .build(SQ_ENTRIES)
        {
            Ok(ring) => (ring, true),
            Err(_) => (
                IoUring::builder()
                    .setup_cqsize(CQ_ENTRIES)
                    .build(SQ_ENTRIES)?,
                false,
            ),
        };
        let mut probe = io_uring::Probe::new();
        ring.submitter().register_probe(&mut probe)?;
        for (code, name) in REQUIRED {
            if !probe.is_supported(code) {
                return Err(io::Error::new(
                    io::ErrorKind::Unsupported,
                    format!("the kernel's io_uring lacks IORING_OP_{name}"),
                ));
            }
        }
        Ok(UringBackend {
            ring,
            taskrun_flag,
            ops: Slab::new(),
            next_gen: 1,
            conns: ConnTable::default(),
            listener: None,
            accept: AcceptState {
                op: None,
                multishot: true,
                paused: false,
                seq: 0,
                rearm_after: None,
            },
            provided: provided::ProvidedBufs::default(),
            waker: Waker::new()?,
            wake: WakeRead::default(),
            ready: Vec::new(),
            cqes: Vec::new(),
            deferred_close: Vec::new(),
            hot: hot::HotSet::default(),
            pushed: 0,
        })
    }

    /// Operations in flight (for tests of the ownership scheme).
    #[cfg(test)]
    pub fn ops_in_flight(&self) -> usize {
        self.ops.len()
    }

    fn conn(&mut self, id: ConnId) -> Option<&mut UringConn> {
        self.conns.get_mut(id)
    }
}

impl Backend for UringBackend {
    fn kind(&self) -> BackendKind {
        BackendKind::IoUring
    }

    fn pollable_fd(&self) -> BorrowedFd<'_> {
        // The ring's descriptor polls readable when completions are waiting.
        // SAFETY: the ring owns this descriptor for as long as `self` lives,
        // which bounds the returned borrow.
        unsafe { BorrowedFd::borrow_raw(self.ring.as_raw_fd()) }
    }

    fn listen(&mut self, fd: OwnedFd) -> io::Result<()> {
        self.listener = Some(fd);
        self.arm_accept();
        Ok(())
    }

    fn close_listener(&mut self) {
        if let Some(op) = self.accept.op.take() {
            self.cancel(op);
        }
        if let Some(l) = self.listener.take() {
            self.defer_close(l);
        }
        self.accept.paused = false;
    }

    fn resume_accept(&mut self) {
        if std::mem::take(&mut self.accept.paused) && self.accept.op.is_none() {
            self.arm_accept();
        }
    }

    fn moved_to_this_thread(&mut self) {
        // The kernel ties a request to the thread that submitted it (it
        // runs the request's completion work there, interrupting that
        // thread's system calls, and cancels the request when the thread
        // exits). Requests the old thread submitted are submitted again
        // from here; those it only queued are submitted by this thread,
        // hence already its own, and stay as they are.
        let submitted = self.pushed - self.ring.submission().len() as u64;
        if let Some(op) = self.accept.op
            && self.accept.seq <= submitted
        {
            // The new accept is armed once the old one's last completion
            // is in: the kernel wakes one accept waiter per connection, and
            // a connection arriving while both were armed could wake the
            // dying one, leaving the new one asleep and the connection in
            // the backlog for good.
            self.accept.op = None;
            self.accept.rearm_after = Some(op);
            self.cancel(op);
        }
        if let Some(op) = self.wake.op
            && self.wake.seq <= submitted
        {
            self.wake.op = None;
            self.cancel(op);
            self.wake.armed = false;
            self.arm_wake();
        }
        let armed: Vec<u64> = self
            .conns
            .values()
            .filter(|c| c.recv_seq <= submitted)
            .filter_map(|c| c.recv_op)
            .collect();
        for op in armed {
            self.cancel(op);
        }
        Backend::submit(self);
    }

    fn add_conn(&mut self, id: ConnId, fd: OwnedFd) -> io::Result<()> {
        self.conns.insert(
            id,
            UringConn {
                fd,
                readable: false,
                hup: false,
                watched: false,
                reads_since_send: 0,
                quiet: false,
                recv_op: None,
                recv_seq: 0,
                send_op: None,
                spare_send: None,
            },
        );
        Ok(())
    }

    fn conn_fd(&self, id: ConnId) -> Option<BorrowedFd<'_>> {
        self.conns.get(id).map(|c| c.fd.as_fd())
    }

    fn recv(&mut self, id: ConnId, buf: RecvBuf, pool: &mut BufferPool) {
        let Some(c) = self.conn(id) else {
            buf.give_back(pool);
            return;
        };
        if c.recv_op.is_some() {
            return;
        }
        if self.hot.recent.contains(id) {
            // A hot connection: the polls read it directly (see
            // `read_parked` and `wait_parked`), into a buffer of our own.
            let buf = buf.into_target(pool);
            self.hot.parked.push((id, buf));
            return;
        }
        self.issue_recv(id, buf, pool);
    }

    fn send(&mut self, id: ConnId, outbox: &Outbox) -> usize {
        self.send_inner(id, outbox)
    }

    fn set_quiet(&mut self, id: ConnId, quiet: bool, pool: &mut BufferPool) {
        let Some(c) = self.conns.get_mut(id) else {
            return;
        };
        c.quiet = quiet;
        if quiet {
            // Its parked receive becomes an armed SQE now.
            self.hot.recent.forget(id);
            self.unpark_cold(pool);
        }
    }
    fn close(&mut self, id: ConnId) {
        self.unwatch(id);
        self.hot.recent.forget(id);
        let Some(c) = self.conns.remove(id) else {
            return;
        };
        for op in [c.recv_op, c.send_op].into_iter().flatten() {
            self.cancel(op);
        }
        // The descriptor closes once the queued SQEs naming it are
        // submitted; in-flight operations hold their own reference to the
        // socket until their (cancelled) completions arrive.
        self.defer_close(c.fd);
    }

    fn lent_buffers(&self) -> usize {
        let in_ops = self
            .ops
            .iter()
            .filter(|(_, (_, op))| matches!(op, Op::Recv { buf: Some(_), .. } | Op::Send { .. }))
            .count()
            + self.hot.parked.len();
        in_ops + self.provided.count
    }

    fn waker(&self) -> Waker {
        self.waker.clone()
    }

    fn submit(&mut self) {
        if self.ring.submission().is_empty() {
            self.deferred_close.clear();
            return;
        }
        if let Err(e) = self.submit(0, None)
            && e.raw_os_error() != Some(libc::EBUSY)
        {
            log::error!("io_uring submit failed: {e}");
        }
    }

    fn take_performed(&mut self, out: &mut Vec<Completion>) {
        out.append(&mut self.ready);
    }

    fn collect(&mut self, out: &mut Vec<Completion>) {
        self.reap();
        self.rearm_wake();
        out.append(&mut self.ready);
    }

    fn pause_receives(&mut self, pause: bool, _pool: &mut BufferPool) {
        // Parked receives wait (their sockets' readiness is remembered);
        // the SQEs armed in the ring complete as the kernel performs them.
        self.hot.paused = pause;
    }

    fn set_busy_poll(&mut self, spin: bool) {
        self.hot.busy = spin;
        if !spin {
            self.hot.recent.clear();
        }
    }

    fn poll(
        &mut self,
        timeout: Option<Duration>,
        out: &mut Vec<Completion>,
        pool: &mut BufferPool,
    ) -> io::Result<()> {
        if self.hot.busy && timeout == Some(Duration::ZERO) && self.ready.is_empty() {
            self.hot.spins = self.hot.spins.wrapping_add(1);
            // Spinning: read the hot connections directly; enter the ring
            // only when there is something to submit, or every
            // BUSY_ENTER_EVERY spins for the rest.
            if !self.hot.spins.is_multiple_of(BUSY_ENTER_EVERY)
                && self.ring.submission().is_empty()
                && self.read_parked(pool, true)
            {
                self.reap();
                out.append(&mut self.ready);
                return Ok(());
            }
        }
        self.unpark_cold(pool);
        self.arm_wake();
        if !self.hot.parked.is_empty() && timeout == Some(Duration::ZERO) {
            // Not waiting: the hot sockets are read as the spins read them
            // (when spinning, by the spins themselves).
            if !self.hot.busy {
                self.read_parked(pool, true);
            }
        } else if !self.hot.parked.is_empty() {
            if self.wait_parked(timeout, out, pool)? {
                return Ok(());
            }
            // No epoll for the hot connections: the ring performs them.
            self.hot.recent.clear();
            self.unpark_cold(pool);
        }
        self.release_deferred();
        self.reap();
        // Armed again if the reap took its completion: the enter below
        // submits it, and an eventfd already signalled completes it at once.
        self.arm_wake();
        let ready = !self.ready.is_empty() || !self.ring.completion().is_empty();
        let (timeout, blocking) = self.waker.wait_timeout(ready, timeout);
        let res = match timeout {
            Some(d) if d.is_zero() && self.nothing_to_enter_for() => {
                // As after an enter with the queue empty.
                self.deferred_close.clear();
                Ok(0)
            }
            Some(d) if d.is_zero() => self.submit(0, None),
            None => self.submit(1, None),
            Some(d) => self.submit(1, Some(d)),
        };
        if blocking {
            self.waker.finish_sleep();
        }
        match res {
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::ETIME | libc::EINTR | libc::EBUSY)
                ) => {}
            Err(e) => return Err(e),
        }
        self.reap();
        self.rearm_wake();
        out.append(&mut self.ready);
        Ok(())
    }
}

impl UringBackend {
    /// Whether an enter that neither submits nor waits would do nothing:
    /// no SQE queued, and the kernel flags no completion work pending (it
    /// runs that work on an enter) and no overflowed completions. A turn
    /// that only looks (a sender's drain, a receive that found messages
    /// on a lane) then costs no system call.
    fn nothing_to_enter_for(&mut self) -> bool {
        if !self.taskrun_flag {
            return false;
        }
        let sq = self.ring.submission();
        sq.is_empty() && !sq.taskrun() && !sq.cq_overflow()
    }
}

impl Drop for UringBackend {
    fn drop(&mut self) {
        self.close_listener();
        let ids: Vec<ConnId> = self.conns.ids().collect();
        for id in ids {
            self.close(id);
        }
        let pending: Vec<u64> = self
            .ops
            .iter()
            .filter(|(_, (_, op))| matches!(op, Op::Wake { .. } | Op::Accept { .. }))
            .map(|(k, (g, _))| (u64::from(*g) << 32) | k as u64)
            .collect();
        for op in pending {
            self.cancel(op);
        }
        // Wait for every operation that may touch our memory to complete.
        let deadline = Instant::now() + Duration::from_secs(2);
        let busy = |ops: &Slab<(u32, Op)>| {
            ops.iter()
                .any(|(_, (_, op))| !matches!(op, Op::Cancel | Op::Provide { .. }))
        };
        while busy(&self.ops) && Instant::now() < deadline {
            let _ = self.submit(1, Some(Duration::from_millis(50)));
            self.reap();
            self.ready.clear();
        }
        if busy(&self.ops) {
            log::error!("io_uring: operations still in flight at teardown; leaking their buffers");
            std::mem::forget(std::mem::take(&mut self.ops));
            std::mem::forget(std::mem::take(&mut self.provided.bufs));
        }
    }
}

#[cfg(test)]
mod tests;
