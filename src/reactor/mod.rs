//! The reactor: drives the sans-IO [`Core`] with a completion-style
//! [`Backend`].
//!
//! The backend contract is the completion model (what io_uring provides
//! natively, what epoll emulates): the reactor *starts* receives and sends,
//! handing the buffers over, and later receives [`Completion`]s. Nothing
//! above this module knows which backend runs.

pub mod epoll;
pub(crate) mod sys;
pub mod uring;

use std::fmt;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::proto::{ConnId, Core, Outbox, RecvBuf, SocketHint};
use crate::wire::{BufferPool, RecvInto};

pub use crate::backend_kind::BackendKind;

/// Spins of a busy-polling reactor with lanes per look at the sockets.
const LANE_SPINS_PER_POLL: u32 = 64;

/// How long a reactor looks for work before it sleeps, by default (see
/// [`Reactor::set_spin_before_sleep`]).
pub const DEFAULT_SPIN_BEFORE_SLEEP: Duration = Duration::from_micros(20);

/// Which backend to use when connecting.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum BackendChoice {
    /// The environment variable `IPCM_BACKEND` if set, else io_uring when
    /// the kernel allows it, else epoll (the reason logged once).
    #[default]
    Auto,
    /// epoll, always.
    Epoll,
    /// io_uring; an error where it is unavailable (no silent fallback).
    IoUring,
}

impl BackendChoice {
    /// Parses `auto`, `epoll` or `io_uring` (also `uring`, `io-uring`).
    pub fn parse(s: &str) -> Option<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "auto" | "" => Some(BackendChoice::Auto),
            "epoll" => Some(BackendChoice::Epoll),
            "io_uring" | "io-uring" | "uring" | "iouring" => Some(BackendChoice::IoUring),
            _ => None,
        }
    }
}

/// Name of the environment variable that picks the backend under `Auto`.
pub const BACKEND_ENV: &str = "IPCM_BACKEND";

/// The wake-up handshake of a [`Waker`], without its descriptor.
///
/// One atomic holds both flags (`SLEEPING`, `WOKEN`) and every operation
/// is a read-modify-write of it, so all of them fall in one total order:
/// either the waker's `fetch_or` comes after the reactor announced its
/// sleep (the waker sees `SLEEPING` and signals the descriptor), or before
/// (the reactor sees `WOKEN` and does not block). A wake is never lost, and
/// the woken reactor sees everything the waker did before waking it
/// (acquire/release). Read-modify-writes, not a pair of flags with
/// `SeqCst` fences: loom models the former exactly; a loom model checks
/// this handshake (`src/loom_models.rs`).
#[derive(Debug, Default)]
pub(crate) struct WakeFlags {
    state: crate::sync::AtomicU8,
}

const SLEEPING: u8 = 1;
const WOKEN: u8 = 2;

impl WakeFlags {
    /// Records a wake; true if the reactor is asleep (or about to sleep)
    /// and its descriptor must be signalled (once per sleep: a second wake
    /// finds `WOKEN` already set, by a waker that signalled, or before the
    /// reactor looked).
    pub(crate) fn wake(&self) -> bool {
        let prev = self.state.fetch_or(WOKEN, crate::sync::Ordering::AcqRel);
        prev & (SLEEPING | WOKEN) == SLEEPING
    }

    /// Records a wake that will be signalled regardless.
    pub(crate) fn note_wake(&self) {
        self.state.fetch_or(WOKEN, crate::sync::Ordering::AcqRel);
    }

    /// Announces a blocking wait; false if a wake already arrived (then
    /// the wait must not block). Either way [`WakeFlags::finish_sleep`]
    /// follows.
    pub(crate) fn prepare_sleep(&self) -> bool {
        let prev = self.state.fetch_or(SLEEPING, crate::sync::Ordering::AcqRel);
        prev & WOKEN == 0
    }

    /// Ends a wait; returns whether a wake arrived.
    pub(crate) fn finish_sleep(&self) -> bool {
        self.state.swap(0, crate::sync::Ordering::AcqRel) & WOKEN != 0
    }

    /// Whether a wake arrived since the last wait ended (a reactor that
    /// spins before it sleeps stops for it).
    pub(crate) fn woken(&self) -> bool {
        self.state.load(crate::sync::Ordering::Acquire) & WOKEN != 0
    }
}

/// Wakes a reactor from another thread.
///
/// Costs no syscall while the reactor is awake: the eventfd is written only
/// when the reactor has announced that it is about to sleep (see
/// `WakeFlags`).
#[derive(Clone, Debug)]
pub struct Waker {
    inner: Arc<WakeState>,
}

#[derive(Debug)]
struct WakeState {
    efd: OwnedFd,
    flags: WakeFlags,
}

impl Waker {
    pub(crate) fn new() -> io::Result<Self> {
        let efd = rustix::event::eventfd(
            0,
            rustix::event::EventfdFlags::CLOEXEC | rustix::event::EventfdFlags::NONBLOCK,
        )?;
        Ok(Waker {
            inner: Arc::new(WakeState {
                efd,
                flags: WakeFlags::default(),
            }),
        })
    }

    /// Wakes the reactor; returns whether a syscall was needed (the reactor
    /// was asleep or about to sleep).
    pub fn wake(&self) -> bool {
        if self.inner.flags.wake() {
            let _ = rustix::io::write(&self.inner.efd, &1u64.to_ne_bytes());
            return true;
        }
        false
    }

    /// Makes the backend's pollable descriptor readable even while the
    /// reactor is awake (the next wait consumes it).
    pub(crate) fn signal(&self) {
        self.inner.flags.note_wake();
        let _ = rustix::io::write(&self.inner.efd, &1u64.to_ne_bytes());
    }

    /// The eventfd the backend watches.
    pub(crate) fn fd(&self) -> BorrowedFd<'_> {
        self.inner.efd.as_fd()
    }

    /// The timeout a backend's wait should use, and whether it announced a
    /// sleep (then it must call [`Waker::finish_sleep`] after the wait):
    /// zero when completions are `ready` already or a wake arrived first.
    pub(crate) fn wait_timeout(
        &self,
        ready: bool,
        timeout: Option<Duration>,
    ) -> (Option<Duration>, bool) {
        if ready || timeout == Some(Duration::ZERO) {
            return (Some(Duration::ZERO), false);
        }
        if !self.inner.flags.prepare_sleep() {
            return (Some(Duration::ZERO), true);
        }
        (timeout, true)
    }

    /// Ends a wait; returns whether a wake arrived.
    pub(crate) fn finish_sleep(&self) -> bool {
        self.inner.flags.finish_sleep()
    }

    /// Whether a wake arrived since the reactor's last wait.
    pub(crate) fn woken(&self) -> bool {
        self.inner.flags.woken()
    }

    /// Drains the eventfd counter.
    pub(crate) fn drain(&self) {
        let mut buf = [0u8; 8];
        let _ = rustix::io::read(&self.inner.efd, &mut buf);
    }
}

/// Per-connection state of a backend: indexed by the connection's slab slot
/// and checked against its full id, so a stale id never reaches the state
/// of the connection that reused its slot.
#[derive(Debug)]
pub(crate) struct ConnTable<T> {
    slots: Vec<Option<(ConnId, T)>>,
    /// Slots in use.
    len: usize,
}

impl<T> Default for ConnTable<T> {
    fn default() -> Self {
        ConnTable {
            slots: Vec::new(),
            len: 0,
        }
    }
}

impl<T> ConnTable<T> {
    /// Inserts `value` for `id`, returning what its slot held before.
    pub(crate) fn insert(&mut self, id: ConnId, value: T) -> Option<T> {
        let slot = id.slot();
        if self.slots.len() <= slot {
            self.slots.resize_with(slot + 1, || None);
        }
        let old = self.slots[slot].replace((id, value)).map(|(_, v)| v);
        self.len += usize::from(old.is_none());
        old
    }

    /// How many connections it holds.
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    pub(crate) fn get(&self, id: ConnId) -> Option<&T> {
        match self.slots.get(id.slot()) {
            Some(Some((i, v))) if *i == id => Some(v),
            _ => None,
        }
    }

    pub(crate) fn get_mut(&mut self, id: ConnId) -> Option<&mut T> {
        match self.slots.get_mut(id.slot()) {
            Some(Some((i, v))) if *i == id => Some(v),
            _ => None,
        }
    }

    pub(crate) fn remove(&mut self, id: ConnId) -> Option<T> {
        let entry = self.slots.get_mut(id.slot())?;
        if entry.as_ref().is_some_and(|(i, _)| *i == id) {
            self.len -= 1;
            return entry.take().map(|(_, v)| v);
        }
        None
    }

    pub(crate) fn ids(&self) -> impl Iterator<Item = ConnId> + '_ {
        self.slots.iter().flatten().map(|(i, _)| *i)
    }

    pub(crate) fn values(&self) -> impl Iterator<Item = &T> {
        self.slots.iter().flatten().map(|(_, v)| v)
    }
}

/// A finished operation.
#[derive(Debug)]
pub enum Completion {
    /// The listening socket accepted a connection (non-blocking, close-on-exec).
    Accepted(OwnedFd),
    /// `accept` failed with something other than a retry-at-once error
    /// (`EMFILE`, `ENFILE`, `ENOMEM`, `ENOBUFS`, ...). The backend has
    /// stopped accepting; it starts again at [`Backend::resume_accept`],
    /// which the reactor calls when the core's back-off deadline is due.
    AcceptFailed(io::Error),
    /// A receive finished; `buf` is what [`RecvBuf::Partial`] lent with the
    /// new bytes appended, or a pooled buffer holding just the new bytes.
    /// `Ok(0)` is end of stream.
    Recv {
        /// The connection.
        conn: ConnId,
        /// The buffers lent with [`Backend::recv`].
        buf: RecvInto,
        /// Bytes received, or the error.
        result: io::Result<usize>,
    },
    /// A send finished having written this many bytes (0: try again).
    Sent {
        /// The connection.
        conn: ConnId,
        /// Bytes written, or the error.
        result: io::Result<usize>,
    },
}

/// An I/O backend, in completion style.
///
/// The contract every backend fulfils (each backend's module says how, in
/// the same order):
///
/// 1. **Receives.** A receive started with [`Backend::recv`] completes
///    once, as a [`Completion::Recv`] carrying its buffer (`Ok(0)` is end of
///    stream; `WouldBlock` means start it again), unless its connection is
///    closed first. The buffer belongs to the backend until then.
/// 2. **Sends.** A send started with [`Backend::send`] completes once, as a
///    [`Completion::Sent`] (0 bytes: start it again). The backend keeps its
///    own references to whatever frames the kernel may still read.
/// 3. **Closes.** After [`Backend::close`] no completion for that
///    connection is delivered; its descriptor is closed before the next
///    wait, never held across one; buffers are freed only once the kernel
///    is done with them.
/// 4. **Accepts.** Each accepted connection is a [`Completion::Accepted`].
///    A failed accept is one [`Completion::AcceptFailed`], after which the
///    backend accepts nothing until [`Backend::resume_accept`].
/// 5. **Waits.** [`Backend::poll`] waits no longer than its timeout, and
///    returns early when something completed or a [`Waker`] woke it;
///    [`Backend::pollable_fd`] is readable while it has work.
/// 6. **Threads.** The backend may move between threads; after a move the
///    reactor calls [`Backend::moved_to_this_thread`].
pub trait Backend: Send {
    /// Which backend this is.
    fn kind(&self) -> BackendKind;

    /// A descriptor that becomes readable when [`Backend::poll`] has work.
    fn pollable_fd(&self) -> BorrowedFd<'_>;

    /// Starts accepting on a listening socket (the backend owns it).
    fn listen(&mut self, fd: OwnedFd) -> io::Result<()>;

    /// Stops accepting and closes the listening socket.
    fn close_listener(&mut self);

    /// Accepts again after [`Completion::AcceptFailed`] (a no-op while
    /// accepting, or without a listener). Connections that queued up in
    /// the meantime are accepted now.
    fn resume_accept(&mut self);

    /// The reactor now runs on the calling thread (threaded mode moved it):
    /// operations that the kernel ties to the thread that submitted them
    /// are submitted again from this one. A no-op where none are.
    fn moved_to_this_thread(&mut self) {}

    /// Adopts a connected, non-blocking socket as `conn`.
    fn add_conn(&mut self, conn: ConnId, fd: OwnedFd) -> io::Result<()>;

    /// The socket of `conn`.
    fn conn_fd(&self, conn: ConnId) -> Option<BorrowedFd<'_>>;

    /// Starts one receive, into the free space of a partial buffer or into
    /// a buffer taken from `pool` once data is there.
    fn recv(&mut self, conn: ConnId, buf: RecvBuf, pool: &mut BufferPool);

    /// Starts one write of (a prefix of) `outbox`; returns how many of its
    /// leading frames the write covers (the kernel may still be reading
    /// them, or has written them without the completion being applied yet).
    /// The core never moves those frames elsewhere until the completion.
    fn send(&mut self, conn: ConnId, outbox: &Outbox) -> usize;

    /// Cancels `conn`'s operations and closes its socket.
    fn close(&mut self, conn: ConnId);

    /// Receive and send buffers the backend holds right now (lent to the
    /// kernel or parked with an armed receive).
    fn lent_buffers(&self) -> usize;

    /// A handle that wakes [`Backend::poll`] from another thread.
    fn waker(&self) -> Waker;

    /// Collects operations that already finished, without a syscall.
    fn collect(&mut self, out: &mut Vec<Completion>);

    /// Collects only what the backend performed itself since the last
    /// collect (cheaper than [`Backend::collect`]: no completion queue is
    /// looked at).
    fn take_performed(&mut self, out: &mut Vec<Completion>) {
        self.collect(out);
    }

    /// Hands queued operations to the kernel now, without waiting (a no-op
    /// where operations start synchronously).
    fn submit(&mut self);

    /// Tells the backend its owner spins on zero-timeout polls (busy
    /// polling), so it may look for data in cheaper ways than a full poll.
    fn set_busy_poll(&mut self, _spin: bool) {}

    /// A hint: `conn`'s socket now carries only occasional control frames
    /// (its messages travel on a shared-memory lane), or, with `false`,
    /// messages again. A backend that reads busy connections directly
    /// (a system call per look) stops doing so for a quiet one and waits
    /// for its data the cheap way.
    fn set_quiet(&mut self, _conn: ConnId, _quiet: bool, _pool: &mut BufferPool) {}

    /// While `pause` is set (the core's inbox is full), receives already
    /// started but not yet performed wait instead of reading; they resume
    /// when it is cleared. Receives the kernel already performs on its own
    /// (io_uring's armed SQEs) are not paused.
    fn pause_receives(&mut self, _pause: bool, _pool: &mut BufferPool) {}

    /// Collects finished operations, waiting up to `timeout` (`None`:
    /// forever) when there are none yet.
    fn poll(
        &mut self,
        timeout: Option<Duration>,
        out: &mut Vec<Completion>,
        pool: &mut BufferPool,
    ) -> io::Result<()>;
}

/// Why a backend could not be had.
#[derive(Debug)]
pub struct BackendUnavailable {
    /// The backend asked for.
    pub backend: BackendKind,
    /// The reason.
    pub reason: io::Error,
}

/// Builds the backend `choice` asks for (see [`BackendChoice`]).
pub fn make_backend(choice: BackendChoice) -> Result<Box<dyn Backend>, BackendUnavailable> {
    let choice = match choice {
        BackendChoice::Auto => match std::env::var(BACKEND_ENV) {
            Ok(v) => BackendChoice::parse(&v).unwrap_or_else(|| {
                log::warn!("{BACKEND_ENV}={v:?} is not one of auto, epoll, io_uring; using auto");
                BackendChoice::Auto
            }),
            Err(_) => BackendChoice::Auto,
        },
        other => other,
    };
    let epoll = || -> Result<Box<dyn Backend>, BackendUnavailable> {
        epoll::EpollBackend::new()
            .map(|b| Box::new(b) as Box<dyn Backend>)
            .map_err(|reason| BackendUnavailable {
                backend: BackendKind::Epoll,
                reason,
            })
    };
    match choice {
        BackendChoice::Epoll => epoll(),
        BackendChoice::IoUring => uring::UringBackend::new()
            .map(|b| Box::new(b) as Box<dyn Backend>)
            .map_err(|reason| BackendUnavailable {
                backend: BackendKind::IoUring,
                reason,
            }),
        BackendChoice::Auto => match uring::UringBackend::new() {
            Ok(b) => Ok(Box::new(b)),
            Err(e) => {
                static LOGGED: std::sync::Once = std::sync::Once::new();
                LOGGED.call_once(|| {
                    log::info!(
                        "io_uring unavailable ({}); using epoll",
                        crate::error::strerror(&e)
                    )
                });
                epoll()
            }
        },
    }
}

/// Whether io_uring can be used here; `Err` carries the reason.
pub fn io_uring_available() -> io::Result<()> {
    uring::UringBackend::new().map(drop)
}

/// The core plus a backend: one single-threaded event loop.
pub struct Reactor {
    core: Core,
    backend: Box<dyn Backend>,
    pool: BufferPool,
    allowed_uids: Option<Vec<u32>>,
    completions: Vec<Completion>,
    scratch: Vec<ConnId>,
    /// Receives are paused (see [`Backend::pause_receives`]).
    receives_paused: bool,
    /// Receives that finished while the inbox was full, applied once the
    /// application has taken messages (each connection has at most one).
    stalled: std::collections::VecDeque<(ConnId, RecvInto, io::Result<usize>)>,
    /// The system's `SO_SNDBUF` default as the kernel reports it, read
    /// before the first socket's was made large.
    default_send_buffer: Option<usize>,
    /// Busy polling (see [`Reactor::set_busy_poll`]).
    busy: bool,
    /// Spins so far (busy polling with lanes).
    spins: u32,
    /// How long a turn that would sleep looks for work first.
    spin_before_sleep: Duration,
    /// Whether that look includes polling the sockets (else only rings).
    spin_on_sockets: bool,
    /// The lanes' consumers announced a sleep (`Core::lane_prepare_sleep`).
    lane_asleep: bool,
}

impl fmt::Debug for Reactor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Reactor")
            .field("backend", &self.backend.kind())
            .field("conns", &self.core.conn_count())
            .finish()
    }
}

impl Reactor {
    /// A reactor driving `core` on `backend`.
    pub fn new(core: Core, backend: Box<dyn Backend>) -> Self {
        Reactor {
            pool: BufferPool::new(core.config().buf_size, 64),
            allowed_uids: None,
            core,
            backend,
            completions: Vec::new(),
            scratch: Vec::new(),
            receives_paused: false,
            stalled: std::collections::VecDeque::new(),
            default_send_buffer: None,
            busy: false,
            spins: 0,
            spin_before_sleep: DEFAULT_SPIN_BEFORE_SLEEP,
            spin_on_sockets: true,
            lane_asleep: false,
        }
    }

    /// The protocol core.
    pub fn core(&self) -> &Core {
        &self.core
    }

    /// The protocol core, mutably (changes take effect at the next turn).
    pub fn core_mut(&mut self) -> &mut Core {
        &mut self.core
    }

    /// The backend in use.
    pub fn backend_kind(&self) -> BackendKind {
        self.backend.kind()
    }

    /// Buffers lent to the backend (see [`Backend::lent_buffers`]).
    pub fn backend_buffers(&self) -> usize {
        self.backend.lent_buffers() + self.stalled.len()
    }

    /// After the application took the inbox: if receiving had paused (data
    /// may wait unread in sockets, or read but not yet applied), makes the
    /// pollable descriptor readable, so that a caller who polls it before
    /// `get_messages` comes back for the rest.
    pub fn took_messages(&mut self, was_paused: bool) {
        if was_paused || !self.stalled.is_empty() {
            self.backend.waker().signal();
        }
    }

    /// A handle that wakes this reactor's wait from another thread.
    pub fn waker(&self) -> Waker {
        self.backend.waker()
    }

    /// The receive-buffer pool.
    pub fn pool(&self) -> &BufferPool {
        &self.pool
    }

    /// A descriptor readable when the reactor has work.
    pub fn pollable_fd(&self) -> BorrowedFd<'_> {
        self.backend.pollable_fd()
    }

    /// The socket of a connection.
    pub fn conn_fd(&self, id: ConnId) -> Option<BorrowedFd<'_>> {
        self.backend.conn_fd(id)
    }

    /// Starts accepting on `fd`.
    pub fn listen(&mut self, fd: OwnedFd) -> io::Result<()> {
        self.backend.listen(fd)
    }

    /// Hands a connected socket for `id` to the backend.
    pub fn attach(&mut self, id: ConnId, fd: OwnedFd) -> io::Result<()> {
        // One `getsockopt`: the process large payloads and descriptors
        // come from and go to (read whether or not our lane is on: another
        // client of ours may have sent to the peer's process).
        let peer = crate::lane::beacon::peer_of(fd.as_fd());
        self.core.set_peer_process(id, peer);
        if let Err(e) = self.backend.add_conn(id, fd) {
            self.core.close(id, None);
            self.core.take_closed_ids();
            return Err(e);
        }
        Ok(())
    }

    /// Starts every operation the core wants.
    /// Whether [`Reactor::dispatch`] would find nothing to do but the
    /// dirty connections (which [`Core::has_operations_to_start`] tells).
    #[inline]
    fn nothing_to_dispatch(&mut self) -> bool {
        self.stalled.is_empty()
            && self.core.is_paused() == self.receives_paused
            && !self.core.has_lane_work()
            && !self.core.has_socket_hints()
            && !self.core.lane_offer_pending()
    }

    fn dispatch(&mut self) {
        while !self.core.is_paused()
            && let Some((conn, buf, result)) = self.stalled.pop_front()
        {
            self.core.on_recv(conn, buf, result, &mut self.pool);
        }
        let paused = self.core.is_paused();
        if paused != self.receives_paused {
            // A full inbox holds back the receives already started, so one
            // batch stays near the inbox limit instead of taking a buffer
            // from every readable connection.
            self.receives_paused = paused;
            self.backend.pause_receives(paused, &mut self.pool);
        }
        if self.core.take_accept_resume() {
            self.backend.resume_accept();
        }
        if self.core.has_socket_hints() {
            self.apply_socket_hints();
        }
        if self.core.has_lane_work() {
            self.lane_work();
        }
        loop {
            if self.core.has_closed_ids() {
                for id in self.core.take_closed_ids() {
                    self.backend.close(id);
                }
            }
            self.core.take_dirty(&mut self.scratch);
            if self.scratch.is_empty() {
                return;
            }
            let mut batch = std::mem::take(&mut self.scratch);
            for id in batch.drain(..) {
                if let Some(buf) = self.core.start_recv(id, &mut self.pool) {
                    self.backend.recv(id, buf, &mut self.pool);
                    // A receive the backend performed at once is applied at
                    // once: the inbox limit then stops the next ones (a
                    // thousand connections accepted together would
                    // otherwise each bring a full buffer in one turn).
                    self.backend.take_performed(&mut self.completions);
                    if !self.completions.is_empty() {
                        self.process();
                    }
                }
                if let Some(outbox) = self.core.start_send(id) {
                    let in_flight = self.backend.send(id, outbox);
                    self.core.sending(id, in_flight);
                }
            }
            // Keep the allocation for the next round.
            self.scratch = batch;
        }
    }

    /// Tells sockets and the backend what the core asked for
    /// ([`SocketHint`]).
    #[cold]
    fn apply_socket_hints(&mut self) {
        let mut hints = Vec::new();
        self.core.take_socket_hints(&mut hints);
        for (id, hint) in hints {
            match hint {
                SocketHint::Quiet(q) => self.backend.set_quiet(id, q, &mut self.pool),
                SocketHint::LargeSendBuffer(large) => self.set_send_buffer(id, large),
            }
        }
    }

    /// Offers lanes on initiators' busy connections and takes the offers
    /// of peers: the system calls of the beacon (`lane::beacon`).
    #[cold]
    fn lane_work(&mut self) {
        let mut wanted = Vec::new();
        self.core.take_lane_wanted(&mut wanted);
        let capacity = self.core.config().lane.ring_bytes;
        for id in wanted {
            let Some(fd) = self.backend.conn_fd(id) else {
                continue;
            };
            match crate::lane::offer(fd, capacity) {
                Ok(Some((region, nonce))) => self.core.lane_offered(id, region, nonce),
                Ok(None) => {}
                Err(why) => crate::lane::log_unavailable(&why),
            }
        }
        let mut offers = Vec::new();
        self.core.take_lane_offers(&mut offers);
        for (id, nonce, capacity) in offers {
            let Some(fd) = self.backend.conn_fd(id) else {
                continue;
            };
            match crate::lane::accept(fd, &nonce, capacity as usize) {
                Ok(region) => self.core.lane_accepted(id, region),
                Err(why) => {
                    crate::lane::log_unavailable(&why);
                    self.core.lane_refused(id);
                }
            }
        }
    }

    /// Gives `id`'s socket the large send buffer
    /// ([`CoreConfig::socket_send_buffer`](crate::proto::CoreConfig)) or
    /// the system's default back. Best effort: a refused `setsockopt`
    /// leaves the buffer as it was, which costs only speed.
    fn set_send_buffer(&mut self, id: ConnId, large: bool) {
        let Some(bytes) = self.core.config().socket_send_buffer else {
            return;
        };
        let Some(fd) = self.backend.conn_fd(id) else {
            return;
        };
        use rustix::net::sockopt::{set_socket_send_buffer_size, socket_send_buffer_size};
        // The system's default, read from the first socket before it is
        // changed: the kernel reports twice what is set, so setting half
        // of it restores it exactly.
        let default = match self.default_send_buffer {
            Some(d) => d,
            // Nothing was made large yet: nothing to give back.
            None if !large => return,
            None => match socket_send_buffer_size(fd) {
                Ok(d) => *self.default_send_buffer.insert(d),
                Err(_) => return,
            },
        };
        let want = if large { bytes } else { default / 2 };
        if let Err(e) = set_socket_send_buffer_size(fd, want) {
            log::debug!("ConnectionUnix: SO_SNDBUF {want} refused: {e}");
        }
    }

    /// Accept connections only from processes running as one of `uids`
    /// (checked with `SO_PEERCRED`); `None` accepts everyone.
    pub fn set_allowed_peer_uids(&mut self, uids: Option<Vec<u32>>) {
        self.allowed_uids = uids;
    }

    fn peer_allowed(&self, fd: &OwnedFd) -> bool {
        let Some(allowed) = &self.allowed_uids else {
            return true;
        };
        match rustix::net::sockopt::socket_peercred(fd) {
            Ok(cred) if allowed.contains(&cred.uid.as_raw()) => true,
            Ok(cred) => {
                log::warn!(
                    "ConnectionUnix: refused a connection from uid {} (pid {}): not an allowed user \
                     (see Options::allow_uid)",
                    cred.uid.as_raw(),
                    cred.pid.as_raw_nonzero()
                );
                false
            }
            Err(e) => {
                log::warn!(
                    "ConnectionUnix: refused a connection whose credentials are unknown: {e}"
                );
                false
            }
        }
    }

    fn process(&mut self) {
        let mut batch = std::mem::take(&mut self.completions);
        for c in batch.drain(..) {
            match c {
                Completion::Accepted(fd) => {
                    if !self.peer_allowed(&fd) {
                        continue;
                    }
                    let id = self.core.add_acceptor(Instant::now());
                    if let Err(e) = self.attach(id, fd) {
                        log::warn!("ConnectionUnix: cannot register accepted connection: {e}");
                    }
                }
                Completion::Recv { conn, buf, result } => {
                    if self.core.is_paused() {
                        // The inbox is full: the data waits here, so that
                        // one batch stays near the inbox limit.
                        self.stalled.push_back((conn, buf, result));
                    } else {
                        self.core.on_recv(conn, buf, result, &mut self.pool)
                    }
                }
                Completion::Sent { conn, result } => self.core.on_sent(conn, result),
                Completion::AcceptFailed(e) => self.core.on_accept_error(Instant::now(), &e),
            }
        }
        // Keep the allocation for the next batch.
        if self.completions.is_empty() {
            self.completions = batch;
        }
    }

    /// [`Reactor::flush`] after a send queued on `id`: a connection on a
    /// shared-memory lane with nothing else to start moves its outbox
    /// into its ring with no round through the backend
    /// ([`Core::flush_to_lane`]); anything else is a full flush.
    pub fn flush_after_send(&mut self, id: ConnId) {
        if self.stalled.is_empty()
            && self.core.is_paused() == self.receives_paused
            && self.core.lane_count_hint()
            && self.core.flush_to_lane(id)
        {
            return;
        }
        self.flush();
    }

    /// Starts pending operations and applies those that finish at once
    /// (no waiting, no extra syscall).
    pub fn flush(&mut self) {
        if self.core.lane_offer_pending() {
            // An initiator that only sends (and so never waits) reads the
            // answer to its lane offer all the same.
            let _ = self
                .backend
                .poll(Some(Duration::ZERO), &mut self.completions, &mut self.pool);
            if !self.completions.is_empty() {
                self.process();
            }
        }
        loop {
            self.dispatch();
            self.backend.submit();
            self.backend.collect(&mut self.completions);
            if self.completions.is_empty() {
                return;
            }
            self.process();
            if !self.core.has_operations_to_start() {
                // Nothing to re-arm or close: another round would find
                // nothing either (a write that emptied its outbox).
                return;
            }
        }
    }

    /// How long a look before sleeping lasts: the spin before sleep, never
    /// past `timeout`.
    fn spin_limit(&self, timeout: Option<Duration>) -> Duration {
        timeout.map_or(self.spin_before_sleep, |t| t.min(self.spin_before_sleep))
    }

    /// Before sleeping with lanes: watches their rings for a short while
    /// (at most the spin before sleep, and never past `timeout`), since a
    /// peer that writes to a ring this soon would otherwise pay for a
    /// wake-up over the socket on both sides (two system calls and a
    /// scheduler round trip for one record).
    fn spin_on_lanes(&mut self, timeout: Option<Duration>) {
        let limit = self.spin_limit(timeout);
        let waker = self.backend.waker();
        let start = Instant::now();
        loop {
            for _ in 0..32 {
                // Another thread's wake (the threaded mode's sender) ends
                // the spin as a ring's record does.
                if self.core.lane_ready() || waker.woken() {
                    return;
                }
                std::hint::spin_loop();
            }
            if start.elapsed() >= limit {
                return;
            }
        }
    }

    /// Before sleeping without lanes: polls the backend without waiting
    /// for a short while (at most the spin before sleep, and never past
    /// `timeout`), until something completes or another thread wakes the
    /// reactor. A peer that writes this soon then finds this thread awake:
    /// its write needs no wake-up, which the writer pays for in the kernel
    /// (a streaming 64 B sender ran 8–10 % slower when its reader slept
    /// between its writes).
    ///
    /// A wake while the reactor is awake only sets a flag (the eventfd is
    /// written for a reactor that announced its sleep), which no poll
    /// sees: the spin ends on it, and the wait that follows takes the flag
    /// and does not sleep, as after any wake.
    fn spin_on_sockets(&mut self, timeout: Option<Duration>) -> io::Result<()> {
        let limit = self.spin_limit(timeout);
        let start = Instant::now();
        loop {
            self.backend
                .poll(Some(Duration::ZERO), &mut self.completions, &mut self.pool)?;
            if !self.completions.is_empty()
                || self.backend.waker().woken()
                || start.elapsed() >= limit
            {
                return Ok(());
            }
            std::hint::spin_loop();
        }
    }

    /// One turn: start pending operations, collect completions (waiting up
    /// to `timeout` if none are ready, and never past the core's next
    /// deadline), apply them, do what is due, start follow-ups.
    ///
    /// This is the one place the core's deadlines are driven
    /// ([`Core::poll_timeout`], [`Core::handle_timeout`]): every way of
    /// waiting (inline calls, busy polling, the threaded loop) goes through
    /// it. The clock is read only while a deadline exists.
    pub fn turn(&mut self, timeout: Option<Duration>) -> io::Result<()> {
        let lanes = self.core.lane_count_hint();
        // Spinning on rings, the clock is read for the core's deadlines
        // (all coarse: hello timeouts, accept retries, idle checks) on the
        // spins that look at the sockets, not on every spin: a clock read
        // cost as much as the rest of an empty spin (perf: a fifth of a
        // busy ping-pong's time).
        let skip_clock = lanes
            && self.busy
            && timeout == Some(Duration::ZERO)
            && !self
                .spins
                .wrapping_add(1)
                .is_multiple_of(LANE_SPINS_PER_POLL);
        let mut timeout = if skip_clock {
            timeout
        } else {
            self.handle_due(timeout)
        };
        if lanes {
            if std::mem::take(&mut self.lane_asleep) {
                self.core.lane_end_sleep();
            }
            let got = self.core.lane_poll(&mut self.pool);
            if got {
                // Messages arrived: this turn hands them over and does not
                // wait (as a turn whose socket read brought some returns),
                // so a caller between turns (the threaded mode's worker,
                // which fills its ring then) sees them now.
                timeout = Some(Duration::ZERO);
            }
            if self.busy && timeout == Some(Duration::ZERO) {
                // Spinning on rings: the sockets are looked at on one spin
                // in LANE_SPINS_PER_POLL (a lane's socket carries only
                // control frames; a read per spin cost a system call per
                // spin for nothing).
                self.spins = self.spins.wrapping_add(1);
                if !self.spins.is_multiple_of(LANE_SPINS_PER_POLL) {
                    if !self.core.has_operations_to_start() && (!got || self.nothing_to_dispatch())
                    {
                        // An empty spin, or messages that left nothing to
                        // start or apply (sends flush themselves): the
                        // next look at the rings comes sooner.
                        return Ok(());
                    }
                    self.dispatch();
                    self.backend.take_performed(&mut self.completions);
                    if !self.completions.is_empty() {
                        self.process();
                    }
                    self.flush();
                    return Ok(());
                }
            }
        }
        self.dispatch();
        if !lanes
            && self.spin_on_sockets
            && timeout != Some(Duration::ZERO)
            && !self.spin_before_sleep.is_zero()
        {
            self.spin_on_sockets(timeout)?;
            if !self.completions.is_empty() {
                timeout = Some(Duration::ZERO);
            }
        }
        if lanes && timeout != Some(Duration::ZERO) {
            if !self.spin_before_sleep.is_zero() {
                self.spin_on_lanes(timeout);
            }
            self.lane_asleep = true;
            if !self.core.lane_prepare_sleep() {
                // A ring holds something: look, do not sleep.
                timeout = Some(Duration::ZERO);
            }
        }
        self.backend
            .poll(timeout, &mut self.completions, &mut self.pool)?;
        if !self.completions.is_empty() {
            // Apply what finished and start the follow-ups (re-armed
            // receives, resolved hellos' first reads, replies) at once, so
            // one turn accepts, resolves and reads everything available.
            self.process();
            self.flush();
        }
        if self.core.lane_count_hint() {
            if std::mem::take(&mut self.lane_asleep) {
                self.core.lane_end_sleep();
            }
            if self.core.lane_poll(&mut self.pool) || self.core.has_operations_to_start() {
                self.flush();
            }
            // Between turns a producer wakes us over the socket (so a
            // caller polling our descriptor sees lane traffic), unless we
            // spin: then the next spin looks at the rings.
            let spinning = self.busy && timeout == Some(Duration::ZERO);
            if !spinning {
                self.lane_asleep = true;
                if !self.core.lane_prepare_sleep() {
                    self.backend.waker().signal();
                }
            }
        }
        if self.core.poll_timeout().is_some() {
            self.handle_due(None);
            if self.core.has_operations_to_start() {
                self.flush();
            }
        }
        Ok(())
    }

    /// Feeds the core the time if one of its deadlines is due, and returns
    /// `timeout` shortened to the next deadline.
    fn handle_due(&mut self, timeout: Option<Duration>) -> Option<Duration> {
        let Some(mut at) = self.core.poll_timeout() else {
            return timeout;
        };
        let now = Instant::now();
        if at <= now {
            self.core.handle_timeout(now);
            match self.core.poll_timeout() {
                Some(next) => at = next,
                None => return timeout,
            }
        }
        let until = at.saturating_duration_since(now);
        Some(timeout.map_or(until, |t| t.min(until)))
    }

    /// See [`Backend::moved_to_this_thread`].
    pub fn moved_to_this_thread(&mut self) {
        self.backend.moved_to_this_thread();
    }

    /// How long a turn that would sleep looks for work first (zero: it
    /// sleeps at once). With lanes it watches their rings; without, it
    /// polls the sockets without waiting.
    pub fn set_spin_before_sleep(&mut self, spin: Duration) {
        self.spin_before_sleep = spin;
    }

    /// Whether the look for work before sleeping polls the sockets (on by
    /// default; off, a turn without lanes sleeps at once).
    pub fn set_spin_on_sockets(&mut self, on: bool) {
        self.spin_on_sockets = on;
    }

    /// See [`Backend::set_busy_poll`].
    pub fn set_busy_poll(&mut self, spin: bool) {
        self.busy = spin;
        self.backend.set_busy_poll(spin);
    }

    /// Closes every connection and the listener.
    pub fn shutdown(&mut self) {
        self.core.close_all();
        self.backend.close_listener();
        // Hand the closes to the kernel now: a completion backend releases a
        // socket only once its cancelled operations are done, and peers
        // must see EOF without waiting for our next turn.
        self.flush();
    }
}
