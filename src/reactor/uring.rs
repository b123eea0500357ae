//! The io_uring backend: native completions.
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
//!   cost a blocking ping-pong ~19% over raw sockets here; waiting on the
//!   socket itself costs what epoll does (about raw). A connection that
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

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use io_uring::{IoUring, cqueue, opcode, squeue, types};
use slab::Slab;

use super::{Backend, BackendKind, Completion, ConnTable, Waker};
use crate::proto::{ConnId, Outbox, RecvBuf};
use crate::wire::BufferPool;

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

enum Op {
    Accept {
        multishot: bool,
    },
    /// `buf: None` selects a provided buffer.
    Recv {
        conn: ConnId,
        buf: Option<BytesMut>,
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
    /// Registered with `hot_wait`.
    watched: bool,
    /// Receives that brought data since the last send (saturating).
    reads_since_send: u8,
    recv_op: Option<u64>,
    send_op: Option<u64>,
    spare_send: Option<Box<SendState>>,
}

/// The io_uring backend.
pub struct UringBackend {
    ring: IoUring,
    ops: Slab<(u32, Op)>,
    next_gen: u32,
    conns: ConnTable<UringConn>,
    listener: Option<OwnedFd>,
    accept_op: Option<u64>,
    multishot_accept: bool,
    /// Accepting stopped after a failure, until `resume_accept`.
    accept_paused: bool,
    provided: Vec<Option<BytesMut>>,
    provided_count: usize,
    /// Armed receives that select a provided buffer.
    selecting: usize,
    /// Buffer-selecting receives that completed (with data or `ENOBUFS`)
    /// in recent reaps: a decaying maximum.
    demand: usize,
    waker: Waker,
    wake_armed: bool,
    /// The armed wake-up read.
    wake_op: Option<u64>,
    ready: Vec<Completion>,
    cqes: Vec<(u64, i32, u32)>,
    /// Descriptors of closed connections, kept open until the SQEs that
    /// name them by number have been submitted (a number closed earlier
    /// could be reused by an unrelated socket before the kernel reads the
    /// SQE).
    deferred_close: Vec<OwnedFd>,
    /// Busy polling: the spinning polls read the hot connections directly
    /// and write them with direct sends, entering the ring only every
    /// [`BUSY_ENTER_EVERY`] spins.
    busy: bool,
    /// Hot connections: when busy polling, those that last brought data;
    /// otherwise the latest conversations (read, then written).
    hot: super::HotConns,
    spins: u32,
    /// Receives on hot connections, performed by direct non-blocking reads
    /// instead of SQEs: on each spinning poll, or after an epoll wait on them
    /// and the ring (see `wait_parked`).
    parked: Vec<(ConnId, BytesMut)>,
    /// Waits with parked receives: an edge-triggered epoll instance holding
    /// the ring's descriptor and the hot sockets (created on first use).
    hot_wait: Option<OwnedFd>,
    hot_events: super::EventBuf,
    /// Parked receives are held back (the core's inbox is full).
    held: bool,
}

/// The ring's token in `hot_wait`.
const RING_TOKEN: u64 = u64::MAX;

/// While busy polling, one spin in this many enters the ring.
const BUSY_ENTER_EVERY: u32 = 16;

impl std::fmt::Debug for UringBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UringBackend")
            .field("ops", &self.ops.len())
            .field("provided", &self.provided_count)
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
        let ring = IoUring::builder()
            .setup_cqsize(CQ_ENTRIES)
            .setup_coop_taskrun()
            .build(SQ_ENTRIES)
            .or_else(|_| {
                IoUring::builder()
                    .setup_cqsize(CQ_ENTRIES)
                    .build(SQ_ENTRIES)
            })?;
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
            ops: Slab::new(),
            next_gen: 1,
            conns: ConnTable::default(),
            listener: None,
            accept_op: None,
            multishot_accept: true,
            accept_paused: false,
            provided: Vec::new(),
            provided_count: 0,
            selecting: 0,
            demand: 0,
            waker: Waker::new()?,
            wake_armed: false,
            wake_op: None,
            ready: Vec::new(),
            cqes: Vec::new(),
            deferred_close: Vec::new(),
            busy: false,
            hot: super::HotConns::default(),
            spins: 0,
            parked: Vec::new(),
            hot_wait: None,
            hot_events: super::EventBuf(Vec::with_capacity(8)),
            held: false,
        })
    }

    /// Operations in flight (for tests of the ownership scheme).
    pub fn ops_in_flight(&self) -> usize {
        self.ops.len()
    }

    /// Queues one SQE, submitting first if the queue is full.
    ///
    /// # Safety
    /// Every pointer in `entry` must stay valid until its completion is
    /// reaped: it must point into memory owned by an entry of `self.ops` or
    /// `self.provided`.
    unsafe fn push(&mut self, entry: squeue::Entry) {
        loop {
            // SAFETY: upheld by the caller (see above).
            if unsafe { self.ring.submission().push(&entry) }.is_ok() {
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
    fn insert_op(&mut self, op: Op) -> u64 {
        let generation = self.next_gen;
        self.next_gen = self.next_gen.wrapping_add(1).max(1);
        let key = self.ops.insert((generation, op));
        (u64::from(generation) << 32) | key as u64
    }

    /// Submits queued SQEs (waiting for `want` completions, up to
    /// `timeout`), then releases descriptors no queued SQE names any more.
    fn submit(&mut self, want: usize, timeout: Option<Duration>) -> io::Result<usize> {
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
    fn defer_close(&mut self, fd: OwnedFd) {
        if self.ring.submission().is_empty() {
            drop(fd);
        } else {
            self.deferred_close.push(fd);
        }
    }

    /// Submits the queue if descriptors wait for it to be closed, so that
    /// a wait never holds a closed connection's descriptor open (a peer's
    /// EOF would otherwise keep it until the next completion).
    fn release_deferred(&mut self) {
        if self.deferred_close.is_empty() {
            return;
        }
        if let Err(e) = self.submit(0, None)
            && e.raw_os_error() != Some(libc::EBUSY)
        {
            log::error!("io_uring submit failed: {e}");
        }
    }

    fn conn(&mut self, id: ConnId) -> Option<&mut UringConn> {
        self.conns.get_mut(id)
    }

    fn arm_accept(&mut self) {
        let Some(l) = &self.listener else { return };
        let fd = types::Fd(l.as_raw_fd());
        let flags = libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC;
        let multishot = self.multishot_accept;
        let key = self.insert_op(Op::Accept { multishot });
        let entry = if multishot {
            opcode::AcceptMulti::new(fd).flags(flags).build()
        } else {
            opcode::Accept::new(fd, std::ptr::null_mut(), std::ptr::null_mut())
                .flags(flags)
                .build()
        };
        self.accept_op = Some(key);
        // SAFETY: accept passes no memory to the kernel.
        unsafe { self.push(entry.user_data(key)) };
    }

    fn arm_wake(&mut self) {
        if self.wake_armed {
            return;
        }
        let mut buf = Box::new([0u8; 8]);
        let ptr = buf.as_mut_ptr();
        let fd = types::Fd(self.waker.fd().as_raw_fd());
        let key = self.insert_op(Op::Wake { _buf: buf });
        self.wake_armed = true;
        self.wake_op = Some(key);
        // SAFETY: the 8-byte buffer is boxed inside `ops[key]` until the
        // completion is reaped.
        unsafe { self.push(opcode::Read::new(fd, ptr, 8).build().user_data(key)) };
    }

    /// Re-arms the wake-up read if a completion just consumed it, and
    /// submits it now: a signal (see [`Waker::signal`]) must make the ring
    /// readable before the next poll, for callers who poll its descriptor.
    fn rearm_wake(&mut self) {
        if self.wake_armed {
            return;
        }
        self.arm_wake();
        if let Err(e) = self.submit(0, None)
            && e.raw_os_error() != Some(libc::EBUSY)
        {
            log::error!("io_uring submit failed: {e}");
        }
    }

    /// Keeps enough pooled buffers provided to the kernel for the
    /// receives waiting on the group (see [`PROVIDED_MIN`]).
    fn replenish(&mut self, pool: &mut BufferPool) {
        let want = PROVIDED_MIN
            .max(self.demand + self.demand / 2)
            .min(PROVIDED_MAX);
        let target = want.min(self.selecting + 1);
        while self.provided_count < target {
            let bid = match self.provided.iter().position(Option::is_none) {
                Some(i) => i,
                None => {
                    self.provided.push(None);
                    self.provided.len() - 1
                }
            };
            let mut buf = pool.take_recv();
            let len = buf.capacity().min(i32::MAX as usize) as i32;
            let ptr = buf.as_mut_ptr();
            self.provided[bid] = Some(buf);
            self.provided_count += 1;
            let key = self.insert_op(Op::Provide { bid: bid as u16 });
            let entry = opcode::ProvideBuffers::new(ptr, len, 1, BGID, bid as u16).build();
            // SAFETY: the buffer stays in `self.provided[bid]` until a
            // completion names it or the backend is torn down.
            unsafe { self.push(entry.user_data(key)) };
        }
    }

    fn cancel(&mut self, op: u64) {
        let key = self.insert_op(Op::Cancel);
        // SAFETY: cancellation passes no memory.
        unsafe { self.push(opcode::AsyncCancel::new(op).build().user_data(key)) };
    }

    fn result(res: i32) -> io::Result<usize> {
        if res >= 0 {
            Ok(res as usize)
        } else {
            Err(io::Error::from_raw_os_error(-res))
        }
    }

    /// Moves finished completions into `ready`.
    fn reap(&mut self) {
        self.cqes.clear();
        // A bounded batch per turn (as epoll's event array bounds it): with
        // many busy connections, the data and messages of one turn stay
        // small enough to stay in cache; the rest waits in the ring.
        for cqe in self.ring.completion().take(REAP_BATCH) {
            self.cqes.push((cqe.user_data(), cqe.result(), cqe.flags()));
        }
        let cqes = std::mem::take(&mut self.cqes);
        let selecting = self.selecting;
        for &(user_data, res, flags) in &cqes {
            self.complete(user_data, res, flags);
        }
        // Every buffer-selecting receive that completed wanted a buffer.
        let seen = selecting.saturating_sub(self.selecting);
        self.demand = seen.max(self.demand - self.demand / 8);
        self.cqes = cqes;
    }

    fn complete(&mut self, user_data: u64, res: i32, flags: u32) {
        let key = (user_data & 0xFFFF_FFFF) as usize;
        let generation = (user_data >> 32) as u32;
        let Some((_, op)) = self.ops.get(key).filter(|(g, _)| *g == generation) else {
            log::error!("io_uring completion for unknown operation {user_data:#x}");
            return;
        };
        if let Op::Accept { multishot } = *op {
            let more = cqueue::more(flags);
            if res >= 0 {
                // SAFETY: a successful accept returns a new descriptor that
                // nothing else owns.
                let fd = unsafe { OwnedFd::from_raw_fd(res) };
                self.ready.push(Completion::Accepted(fd));
            } else if res == -libc::EINVAL && multishot {
                log::info!("io_uring: multishot accept unsupported; using single-shot accepts");
                self.multishot_accept = false;
            } else if ![
                libc::ECANCELED,
                libc::EINTR,
                libc::ECONNABORTED,
                libc::EAGAIN,
            ]
            .contains(&-res)
            {
                // EMFILE, ENFILE, ENOMEM, ENOBUFS...: stop accepting until
                // the core's back-off says to try again (re-arming now
                // would fail at once, forever: a busy loop).
                self.accept_paused = true;
                self.ready
                    .push(Completion::AcceptFailed(io::Error::from_raw_os_error(-res)));
                if more && self.accept_op == Some(user_data) {
                    // A multishot accept that goes on after an error is
                    // stopped too; its cancellation is no longer current.
                    self.accept_op = None;
                    self.cancel(user_data);
                }
            }
            if !more {
                self.ops.remove(key);
                // Still current: not cancelled by us (we forget an accept
                // before cancelling it), but ended by the kernel, which
                // also cancels a thread's requests when it exits.
                if self.accept_op == Some(user_data) {
                    self.accept_op = None;
                    if !self.accept_paused {
                        self.arm_accept();
                    }
                }
            }
            return;
        }
        match self.ops.remove(key).1 {
            Op::Accept { .. } => unreachable!("handled above"),
            Op::Recv { conn, buf } => {
                if buf.is_none() {
                    self.selecting -= 1;
                }
                let mut buf = match buf {
                    Some(b) => b,
                    None => match cqueue::buffer_select(flags) {
                        Some(bid) => {
                            let b = self.provided.get_mut(bid as usize).and_then(Option::take);
                            if b.is_some() {
                                self.provided_count -= 1;
                            }
                            b.unwrap_or_default()
                        }
                        None => BytesMut::new(),
                    },
                };
                if res > 0 {
                    let len = buf.len() + res as usize;
                    debug_assert!(len <= buf.capacity());
                    // SAFETY: the kernel wrote `res` bytes right after the
                    // buffer's `len` initialised bytes, within its capacity.
                    unsafe { buf.set_len(len.min(buf.capacity())) };
                }
                let result = if res == -libc::ENOBUFS || res == -libc::ECANCELED {
                    // The provided group ran dry; try again after refilling.
                    // Or the receive was cancelled while its connection
                    // is open (ours are cancelled only when it closes): by
                    // `moved_to_this_thread`, or by the kernel because the
                    // thread that submitted it exited. Armed again.
                    Err(io::ErrorKind::WouldBlock.into())
                } else {
                    Self::result(res)
                };
                if res > 0 {
                    self.received(conn);
                }
                if let Some(c) = self.conn(conn) {
                    if c.recv_op == Some(user_data) {
                        c.recv_op = None;
                    }
                    self.ready.push(Completion::Recv { conn, buf, result });
                }
            }
            Op::Send { conn, mut state } => {
                state.frames.clear();
                if let Some(c) = self.conn(conn) {
                    if c.send_op == Some(user_data) {
                        c.send_op = None;
                    }
                    c.spare_send = Some(state);
                    // Cancelled with its connection open (its submitting
                    // thread exited): nothing was written; write again.
                    let result = if res == -libc::ECANCELED {
                        Ok(0)
                    } else {
                        Self::result(res)
                    };
                    self.ready.push(Completion::Sent { conn, result });
                }
            }
            Op::Provide { bid } => {
                if res < 0 {
                    log::error!(
                        "io_uring: providing a receive buffer failed: {}",
                        io::Error::from_raw_os_error(-res)
                    );
                    if self
                        .provided
                        .get_mut(bid as usize)
                        .and_then(Option::take)
                        .is_some()
                    {
                        self.provided_count -= 1;
                    }
                }
            }
            Op::Cancel => {}
            Op::Wake { .. } => {
                if self.wake_op == Some(user_data) {
                    self.wake_op = None;
                    self.wake_armed = false;
                }
            }
        }
    }
}

impl UringBackend {
    /// Arms a receive SQE (into `buf`, or a provided buffer for `Pooled`).
    fn issue_recv(&mut self, id: ConnId, buf: RecvBuf, pool: &mut BufferPool) {
        let Some(c) = self.conn(id) else {
            buf.give_back(pool);
            return;
        };
        let fd = types::Fd(c.fd.as_raw_fd());
        match buf {
            RecvBuf::Partial(mut b) => {
                let spare = b.spare_capacity_mut();
                let (ptr, len) = (
                    spare.as_mut_ptr().cast::<u8>(),
                    spare.len().min(u32::MAX as usize) as u32,
                );
                let key = self.insert_op(Op::Recv {
                    conn: id,
                    buf: Some(b),
                });
                if let Some(c) = self.conn(id) {
                    c.recv_op = Some(key);
                }
                let entry = opcode::Recv::new(fd, ptr, len).build();
                // SAFETY: the buffer's heap memory is owned by `ops[key]`
                // (moving the `BytesMut` does not move it) until reaped.
                unsafe { self.push(entry.user_data(key)) };
            }
            RecvBuf::Pooled => {
                self.selecting += 1;
                self.replenish(pool);
                let len = pool.buf_size().min(u32::MAX as usize) as u32;
                let key = self.insert_op(Op::Recv {
                    conn: id,
                    buf: None,
                });
                if let Some(c) = self.conn(id) {
                    c.recv_op = Some(key);
                }
                let entry = opcode::Recv::new(fd, std::ptr::null_mut(), len)
                    .buf_group(BGID)
                    .build()
                    .flags(squeue::Flags::BUFFER_SELECT);
                // SAFETY: the kernel picks a buffer from `self.provided`,
                // which keeps it until the completion names it.
                unsafe { self.push(entry.user_data(key)) };
            }
        }
    }

    /// Reads parked receives directly (non-blocking): all of them (busy
    /// polling), or those whose sockets may hold data. Those that find
    /// nothing stay parked. True if any was tried.
    fn read_parked(&mut self, pool: &mut BufferPool, all: bool) -> bool {
        let mut tried = false;
        if self.held {
            return false;
        }
        let mut parked = std::mem::take(&mut self.parked);
        parked.retain_mut(|(id, buf)| {
            let Some(c) = self.conns.get_mut(*id) else {
                pool.put(std::mem::take(buf));
                return false;
            };
            if !all && !c.readable {
                return true;
            }
            tried = true;
            let spare = buf.capacity() - buf.len();
            let result = match super::read_into(c.fd.as_fd(), buf) {
                Err(rustix::io::Errno::AGAIN) => {
                    c.readable = false;
                    return true;
                }
                r => r.map_err(io::Error::from),
            };
            // A short read drained the socket; a full one may have left
            // more behind (no new edge will say so).
            c.readable = matches!(result, Ok(n) if n == spare && n > 0);
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
        parked.append(&mut self.parked);
        self.parked = parked;
        tried
    }

    /// Notes a receive that brought data on `id`: busy polling makes it
    /// hot; otherwise a connection that receives twice without a send in
    /// between is a stream, not a conversation, and cools down.
    fn received(&mut self, id: ConnId) {
        if self.busy {
            self.hot.note(id);
        }
        let Some(c) = self.conns.get_mut(id) else {
            return;
        };
        c.reads_since_send = c.reads_since_send.saturating_add(1);
        if !self.busy && c.reads_since_send >= 2 {
            self.hot.forget(id);
        }
    }

    /// Busy polling: writes to a hot connection with a direct non-blocking
    /// `send` (as the spinning reads do), reporting the completion at once.
    /// `None` when the kernel took nothing (the caller arms an SQE).
    fn send_direct(&mut self, id: ConnId, outbox: &Outbox) -> Option<usize> {
        let c = self.conns.get(id)?;
        let mut pos = (0, outbox.front_offset());
        let result = match super::write_frames(c.fd.as_fd(), outbox, pos.0, pos.1) {
            (Ok(0), 0) | (Err(rustix::io::Errno::AGAIN), _) => return None,
            (Ok(n), _) => {
                super::advance_position(outbox, &mut pos, n);
                Ok(n)
            }
            (Err(e), _) => Err(io::Error::from(e)),
        };
        let held = if result.is_ok() {
            super::touched_frames(pos)
        } else {
            0
        };
        self.ready.push(Completion::Sent { conn: id, result });
        Some(held)
    }

    fn send_inner(&mut self, id: ConnId, outbox: &Outbox) -> usize {
        let Some(c) = self.conn(id) else { return 0 };
        if c.send_op.is_some() {
            return 0;
        }
        if std::mem::take(&mut c.reads_since_send) > 0 {
            // A connection read and then written, turn by turn (a request
            // answered, a reply awaited): its receives are parked and
            // waited on directly, for latency (see `wait_parked`).
            self.hot.note(id);
        }
        if self.hot.contains(id)
            && let Some(held) = self.send_direct(id, outbox)
        {
            return held;
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
            match st.iov.last_mut() {
                Some(last) if super::extends(last, s) => last.iov_len += s.len(),
                _ => st.iov.push(libc::iovec {
                    iov_base: s.as_ptr() as *mut libc::c_void,
                    iov_len: s.len(),
                }),
            }
        }
        st.msg.msg_iov = st.iov.as_mut_ptr();
        st.msg.msg_iovlen = st.iov.len() as _;
        let held = st.frames.len();
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
        held
    }

    /// Turns the parked receives of connections no longer hot back into
    /// armed SQEs.
    fn unpark_cold(&mut self, pool: &mut BufferPool) {
        if self.parked.iter().all(|(id, _)| self.hot.contains(*id)) {
            return;
        }
        let mut parked = std::mem::take(&mut self.parked);
        parked.retain_mut(|(id, buf)| {
            if self.hot.contains(*id) {
                return true;
            }
            self.unwatch(*id);
            self.issue_recv(*id, RecvBuf::Partial(std::mem::take(buf)), pool);
            false
        });
        parked.append(&mut self.parked);
        self.parked = parked;
    }

    /// Stops watching `id` in `hot_wait` (before its descriptor closes or
    /// when it cools down).
    fn unwatch(&mut self, id: ConnId) {
        let (Some(ep), Some(c)) = (&self.hot_wait, self.conns.get_mut(id)) else {
            return;
        };
        if c.watched {
            c.watched = false;
            let _ = rustix::event::epoll::delete(ep, &c.fd);
        }
    }

    /// Registers the parked connections (and, first, the ring) with
    /// `hot_wait`. False if that failed: the caller waits on the ring.
    fn watch_parked(&mut self) -> bool {
        use rustix::event::epoll;
        if self.hot_wait.is_none() {
            let ep = epoll::create(epoll::CreateFlags::CLOEXEC).and_then(|ep| {
                epoll::add(
                    &ep,
                    self.pollable_fd(),
                    epoll::EventData::new_u64(RING_TOKEN),
                    epoll::EventFlags::IN,
                )
                .map(|()| ep)
            });
            match ep {
                Ok(ep) => self.hot_wait = Some(ep),
                Err(e) => {
                    log::warn!("io_uring: no epoll for hot connections ({e}); waiting on the ring");
                    return false;
                }
            }
        }
        let Some(ep) = &self.hot_wait else {
            return false;
        };
        for (id, _) in &self.parked {
            let Some(c) = self.conns.get_mut(*id) else {
                continue;
            };
            if c.watched {
                continue;
            }
            // Edge-triggered, and with OUT: the peer consuming what we sent
            // wakes this thread too (as the epoll backend's registration
            // does), shortly before its reply is due.
            let flags = epoll::EventFlags::IN
                | epoll::EventFlags::OUT
                | epoll::EventFlags::RDHUP
                | epoll::EventFlags::ET;
            if let Err(e) = epoll::add(ep, &c.fd, epoll::EventData::new_u64(id.as_u64()), flags) {
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
    /// CPU awake when the reply comes. On this 2-core VM a blocking
    /// ping-pong costs ~57 µs per round trip waiting in the ring and ~48 µs
    /// (as raw blocking sockets) waiting here.
    fn wait_parked(
        &mut self,
        timeout: Option<Duration>,
        out: &mut Vec<Completion>,
        pool: &mut BufferPool,
    ) -> io::Result<bool> {
        use rustix::event::epoll;
        if !self.watch_parked() {
            return Ok(false);
        }
        if !self.ring.submission().is_empty() {
            match self.submit(0, None) {
                Ok(_) => {}
                Err(e) if matches!(e.raw_os_error(), Some(libc::EINTR | libc::EBUSY)) => {}
                Err(e) => return Err(e),
            }
        }
        self.reap();
        self.read_parked(pool, false);
        let ready = !self.ready.is_empty() || !self.ring.completion().is_empty();
        let (timeout, blocking) = self.waker.wait_timeout(ready, timeout);
        let ts = timeout.map(super::timespec);
        let Some(ep) = &self.hot_wait else {
            return Ok(false);
        };
        self.hot_events.0.clear();
        let res = epoll::wait(
            ep,
            rustix::buffer::spare_capacity(&mut self.hot_events.0),
            ts.as_ref(),
        );
        if blocking {
            self.waker.finish_sleep();
        }
        match res {
            Ok(_) | Err(rustix::io::Errno::INTR) => {}
            Err(e) => return Err(e.into()),
        }
        let readable = epoll::EventFlags::IN
            | epoll::EventFlags::RDHUP
            | epoll::EventFlags::HUP
            | epoll::EventFlags::ERR;
        for ev in &self.hot_events.0 {
            let (token, flags) = (ev.data.u64(), ev.flags);
            if token != RING_TOKEN
                && flags.intersects(readable)
                && let Some(c) = self.conns.get_mut(ConnId::from_u64(token))
            {
                c.readable = true;
            }
        }
        self.read_parked(pool, false);
        self.reap();
        self.rearm_wake();
        out.append(&mut self.ready);
        Ok(true)
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
        if let Some(op) = self.accept_op.take() {
            self.cancel(op);
        }
        if let Some(l) = self.listener.take() {
            self.defer_close(l);
        }
        self.accept_paused = false;
    }

    fn resume_accept(&mut self) {
        if std::mem::take(&mut self.accept_paused) && self.accept_op.is_none() {
            self.arm_accept();
        }
    }

    fn moved_to_this_thread(&mut self) {
        // The kernel runs a request's completion work on the thread that
        // submitted it (interrupting its system calls) and cancels the
        // request when that thread exits. Long-lived operations are
        // submitted again from here: the accept and the wake-up read at
        // once, the receives when their cancellations come back (see
        // `complete`).
        if let Some(op) = self.accept_op.take() {
            self.cancel(op);
            self.arm_accept();
        }
        if let Some(op) = self.wake_op.take() {
            self.cancel(op);
            self.wake_armed = false;
            self.arm_wake();
        }
        let armed: Vec<u64> = self.conns.values().filter_map(|c| c.recv_op).collect();
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
                watched: false,
                reads_since_send: 0,
                recv_op: None,
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
        if self.hot.contains(id) {
            // A hot connection: the polls read it directly (see
            // `read_parked` and `wait_parked`), into a buffer of our own.
            let buf = match buf {
                RecvBuf::Pooled => pool.take_recv(),
                RecvBuf::Partial(b) => b,
            };
            self.parked.push((id, buf));
            return;
        }
        self.issue_recv(id, buf, pool);
    }

    fn send(&mut self, id: ConnId, outbox: &Outbox) -> usize {
        self.send_inner(id, outbox)
    }
    fn close(&mut self, id: ConnId) {
        self.unwatch(id);
        self.hot.forget(id);
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

    fn held_buffers(&self) -> usize {
        let in_ops = self
            .ops
            .iter()
            .filter(|(_, (_, op))| matches!(op, Op::Recv { buf: Some(_), .. } | Op::Send { .. }))
            .count()
            + self.parked.len();
        in_ops + self.provided_count
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

    fn hold_receives(&mut self, hold: bool, _pool: &mut BufferPool) {
        // Parked receives wait (their sockets' readiness is remembered);
        // the SQEs armed in the ring complete as the kernel performs them.
        self.held = hold;
    }

    fn set_busy_poll(&mut self, spin: bool) {
        self.busy = spin;
        if !spin {
            self.hot.clear();
        }
    }

    fn poll(
        &mut self,
        timeout: Option<Duration>,
        out: &mut Vec<Completion>,
        pool: &mut BufferPool,
    ) -> io::Result<()> {
        if self.busy && timeout == Some(Duration::ZERO) && self.ready.is_empty() {
            self.spins = self.spins.wrapping_add(1);
            // Spinning: read the hot connections directly; enter the ring
            // only when there is something to submit, or every
            // BUSY_ENTER_EVERY spins for the rest.
            if !self.spins.is_multiple_of(BUSY_ENTER_EVERY)
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
        if !self.parked.is_empty() && timeout == Some(Duration::ZERO) {
            // Not waiting: the hot sockets are read as the spins read them
            // (when spinning, by the spins themselves).
            if !self.busy {
                self.read_parked(pool, true);
            }
        } else if !self.parked.is_empty() {
            if self.wait_parked(timeout, out, pool)? {
                return Ok(());
            }
            // No epoll for the hot connections: the ring performs them.
            self.hot.clear();
            self.unpark_cold(pool);
        }
        self.release_deferred();
        self.reap();
        let ready = !self.ready.is_empty() || !self.ring.completion().is_empty();
        let (timeout, blocking) = self.waker.wait_timeout(ready, timeout);
        let res = match timeout {
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
            std::mem::forget(std::mem::take(&mut self.provided));
        }
    }
}

#[cfg(test)]
mod tests {
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
}
