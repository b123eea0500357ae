//! The reactor: drives the sans-IO [`Core`] with a completion-style
//! [`Backend`].
//!
//! The backend contract is the completion model (what io_uring provides
//! natively, what epoll emulates): the reactor *starts* receives and sends,
//! handing the buffers over, and later receives [`Completion`]s. Nothing
//! above this module knows which backend runs.

pub mod epoll;

use std::fmt;
use std::io;
use std::os::fd::{BorrowedFd, OwnedFd};
use std::time::Duration;

use bytes::BytesMut;

use crate::proto::{ConnId, Core, Outbox, RecvBuf};
use crate::wire::BufferPool;

/// Which I/O backend a reactor runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum BackendKind {
    /// Readiness-based `epoll`, with completions emulated.
    Epoll,
}

impl fmt::Display for BackendKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            BackendKind::Epoll => "epoll",
        })
    }
}

/// Which backend to use when connecting.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum BackendChoice {
    /// The best one available (today: epoll).
    #[default]
    Auto,
    /// epoll, always.
    Epoll,
}

/// A finished operation.
#[derive(Debug)]
pub enum Completion {
    /// The listening socket accepted a connection (non-blocking, close-on-exec).
    Accepted(OwnedFd),
    /// A receive finished; `buf` is the [`RecvBuf::Partial`] buffer with the
    /// new bytes appended, or a pooled buffer holding just the new bytes.
    /// `Ok(0)` is end of stream.
    Recv {
        /// The connection.
        conn: ConnId,
        /// The buffer lent with [`Backend::recv`].
        buf: BytesMut,
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
/// Ownership rules (what makes a completion backend sound): a buffer given
/// to [`Backend::recv`] (or taken from the pool for it) belongs to the
/// backend until it comes back in a [`Completion::Recv`]; for [`Backend::send`] the backend keeps its own
/// references to whatever frames the kernel may still read; after
/// [`Backend::close`] no completion for that connection is delivered, and
/// the backend frees its buffers only once the kernel is done with them.
pub trait Backend: Send {
    /// Which backend this is.
    fn kind(&self) -> BackendKind;

    /// A descriptor that becomes readable when [`Backend::poll`] has work.
    fn pollable_fd(&self) -> BorrowedFd<'_>;

    /// Starts accepting on a listening socket (the backend owns it).
    fn listen(&mut self, fd: OwnedFd) -> io::Result<()>;

    /// Stops accepting and closes the listening socket.
    fn close_listener(&mut self);

    /// Adopts a connected, non-blocking socket as `conn`.
    fn add_conn(&mut self, conn: ConnId, fd: OwnedFd) -> io::Result<()>;

    /// The socket of `conn`.
    fn conn_fd(&self, conn: ConnId) -> Option<BorrowedFd<'_>>;

    /// Starts one receive, into the free space of a partial buffer or into
    /// a buffer taken from `pool` once data is there.
    fn recv(&mut self, conn: ConnId, buf: RecvBuf, pool: &mut BufferPool);

    /// Starts one write of (a prefix of) `outbox`; returns how many of its
    /// frames the kernel may still be reading after this call returns.
    fn send(&mut self, conn: ConnId, outbox: &Outbox) -> usize;

    /// Cancels `conn`'s operations and closes its socket.
    fn close(&mut self, conn: ConnId);

    /// Collects operations that already finished, without a syscall.
    fn collect(&mut self, out: &mut Vec<Completion>);

    /// Collects finished operations, waiting up to `timeout` (`None`:
    /// forever) when there are none yet.
    fn poll(
        &mut self,
        timeout: Option<Duration>,
        out: &mut Vec<Completion>,
        pool: &mut BufferPool,
    ) -> io::Result<()>;
}

/// Picks and builds a backend.
pub fn make_backend(choice: BackendChoice) -> io::Result<Box<dyn Backend>> {
    match choice {
        BackendChoice::Auto | BackendChoice::Epoll => Ok(Box::new(epoll::EpollBackend::new()?)),
    }
}

/// The core plus a backend: one single-threaded event loop.
pub struct Reactor {
    core: Core,
    backend: Box<dyn Backend>,
    pool: BufferPool,
    completions: Vec<Completion>,
    scratch: Vec<ConnId>,
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
            core,
            backend,
            completions: Vec::new(),
            scratch: Vec::new(),
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

    /// Stops accepting.
    pub fn close_listener(&mut self) {
        self.backend.close_listener();
    }

    /// Hands a connected socket for `id` to the backend.
    pub fn attach(&mut self, id: ConnId, fd: OwnedFd) -> io::Result<()> {
        if let Err(e) = self.backend.add_conn(id, fd) {
            self.core.close(id, None);
            self.core.take_closed_ids();
            return Err(e);
        }
        Ok(())
    }

    /// Starts every operation the core wants.
    fn dispatch(&mut self) {
        loop {
            for id in self.core.take_closed_ids() {
                self.backend.close(id);
            }
            self.core.take_dirty(&mut self.scratch);
            if self.scratch.is_empty() {
                return;
            }
            for id in std::mem::take(&mut self.scratch) {
                if let Some(buf) = self.core.start_recv(id, &mut self.pool) {
                    self.backend.recv(id, buf, &mut self.pool);
                }
                if let Some(outbox) = self.core.start_send(id) {
                    let held = self.backend.send(id, outbox);
                    self.core.sending(id, held);
                }
            }
        }
    }

    fn process(&mut self) {
        for c in std::mem::take(&mut self.completions) {
            match c {
                Completion::Accepted(fd) => {
                    let id = self.core.add_acceptor();
                    if let Err(e) = self.attach(id, fd) {
                        log::warn!("ConnectionUnix: cannot register accepted connection: {e}");
                    }
                }
                Completion::Recv { conn, buf, result } => {
                    self.core.on_recv(conn, buf, result, &mut self.pool)
                }
                Completion::Sent { conn, result } => self.core.on_sent(conn, result),
            }
        }
    }

    /// Starts pending operations and applies those that finish at once
    /// (no waiting, no extra syscall).
    pub fn flush(&mut self) {
        loop {
            self.dispatch();
            self.backend.collect(&mut self.completions);
            if self.completions.is_empty() {
                return;
            }
            self.process();
        }
    }

    /// One turn: start pending operations, collect completions (waiting up
    /// to `timeout` if none are ready), apply them, start follow-ups.
    pub fn turn(&mut self, timeout: Option<Duration>) -> io::Result<()> {
        self.dispatch();
        self.backend
            .poll(timeout, &mut self.completions, &mut self.pool)?;
        let progressed = !self.completions.is_empty();
        self.process();
        self.dispatch();
        if progressed {
            // Completions produced while dispatching (e.g. synchronous
            // writes) are applied now rather than a turn later.
            self.flush();
        }
        Ok(())
    }

    /// Closes every connection and the listener.
    pub fn shutdown(&mut self) {
        self.core.close_all();
        self.dispatch();
        self.backend.close_listener();
    }
}
