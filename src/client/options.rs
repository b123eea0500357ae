//! How a client connects and behaves ([`Options`]), and the plain types its
//! calls report ([`BroadcastResult`], [`Resources`]).

use super::*;

/// How a client connects and behaves. Defaults follow the Perl client, with
/// bounded waits where Perl had none.
#[derive(Debug, Clone)]
pub struct Options {
    /// Own a listening socket (default) or only a marker file.
    pub listen: bool,
    /// Listen backlog (default `SOMAXCONN`).
    pub backlog: i32,
    /// The I/O backend.
    pub backend: BackendChoice,
    /// Frame, outbox and inbox limits.
    pub limits: CoreConfig,
    /// How long connecting to a peer may wait for room in its backlog.
    pub connect_timeout: Duration,
    /// Deadline of a blocking send (`None`: wait as long as it takes, as Perl).
    pub send_timeout: Option<Duration>,
    /// How long `disconnect` waits for in-flight messages and to flush
    /// queued sends before closing.
    pub drain_timeout: Duration,
    /// Use a route directory that another user owns or that is group- or
    /// world-writable (refused by default).
    pub trust_route: bool,
    /// Further uids allowed to connect, besides the route's owner and this
    /// process's user (checked with `SO_PEERCRED` on accept).
    pub allow_uids: Vec<u32>,
    /// Accept connections from any user.
    pub allow_any_uid: bool,
    /// Wait by spinning instead of sleeping in the kernel: receives and
    /// blocking sends poll the sockets without blocking until there is
    /// something to do. Costs a core while waiting; cuts wake-up latency.
    pub busy_poll: bool,
    /// How long a wait looks for work before it sleeps in the kernel
    /// (20 µs by default; zero: it sleeps at once). A message that comes
    /// this soon is taken without a wake-up on either side: the sender
    /// does not pay to wake this thread, and this thread does not pay to
    /// be scheduled again. Costs up to that much CPU time per wait that
    /// ends in sleep. With a shared-memory lane the wait watches the
    /// lane's ring; on sockets it polls them without blocking.
    pub spin_before_sleep: Duration,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            listen: true,
            backlog: libc::SOMAXCONN,
            backend: BackendChoice::Auto,
            limits: CoreConfig::default(),
            connect_timeout: Duration::from_secs(5),
            send_timeout: None,
            drain_timeout: Duration::from_secs(2),
            trust_route: false,
            allow_uids: Vec::new(),
            allow_any_uid: false,
            busy_poll: false,
            spin_before_sleep: crate::reactor::DEFAULT_SPIN_BEFORE_SLEEP,
        }
    }
}

impl Options {
    /// Default options.
    pub fn new() -> Self {
        Options::default()
    }

    /// Sets [`Options::listen`].
    pub fn listen(mut self, listen: bool) -> Self {
        self.listen = listen;
        self
    }

    /// Sets [`Options::backlog`].
    pub fn backlog(mut self, backlog: i32) -> Self {
        self.backlog = backlog;
        self
    }

    /// Sets [`Options::backend`].
    pub fn backend(mut self, backend: BackendChoice) -> Self {
        self.backend = backend;
        self
    }

    /// Moves busy connections to other ipcm clients onto a shared-memory
    /// lane (on by default; the environment variable `IPCM_LANE=off` turns
    /// it off for the whole process whatever this says). Perl peers are
    /// never offered one.
    pub fn lane(mut self, on: bool) -> Self {
        self.limits.lane.enabled = on;
        self
    }

    /// Bytes a connection carries (both ways) before it moves to a lane
    /// (default 64 KiB; 0: at its first write).
    pub fn lane_after_bytes(mut self, bytes: u64) -> Self {
        self.limits.lane.after_bytes = bytes;
        self
    }

    /// Record bytes of each of a lane's two rings (a power of two of at
    /// least 4 KiB; default 4 MiB): a lane maps twice this much shared
    /// memory, and a full ring makes sends wait as a full outbox does.
    /// While its reader keeps up, a ring's writer stays within its first
    /// 256 KiB (and that is all the memory it touches); the rest fills
    /// only when the reader falls behind.
    pub fn lane_ring_bytes(mut self, bytes: usize) -> Self {
        self.limits.lane.ring_bytes = bytes;
        self
    }

    /// How long a lane may carry nothing either way before it is released
    /// (default 5 s; it goes within one to two of these): both sides go
    /// back to the socket and unmap the rings, and the connection gets a
    /// new lane once it is busy again. `None` keeps lanes as long as their
    /// connections.
    pub fn lane_release_after(mut self, idle: Option<Duration>) -> Self {
        self.limits.lane.release_after = idle;
        self
    }

    /// Payload bytes from which a frame to a peer on a lane travels as a
    /// sealed memfd of its own and is received without a copy (default
    /// 1 MiB; `usize::MAX`: never).
    pub fn lane_blob_min(mut self, bytes: usize) -> Self {
        self.limits.lane.blob_min = bytes;
        self
    }

    /// Sets the largest payload accepted from a peer.
    pub fn max_frame(mut self, bytes: usize) -> Self {
        self.limits.max_frame = bytes;
        self
    }

    /// Sets the per-connection outbox limit in bytes.
    pub fn outbox_limit(mut self, bytes: usize) -> Self {
        self.limits.outbox_limit = bytes;
        self
    }

    /// Sets the `SO_SNDBUF` asked for on a connection's socket while it
    /// carries messages of 1 KiB and up (1 MiB by default; `None`: the
    /// system default always). The kernel caps the size at
    /// `net.core.wmem_max` and doubles it. A larger buffer lets a sender
    /// of large messages run further ahead of its reader (fewer system
    /// calls and sleeps on both sides); a connection gives it back after
    /// 4,096 smaller messages in a row, since for small messages it costs
    /// speed. It bounds the kernel's memory for the connection, on top of
    /// the outbox limit, while the peer does not read.
    pub fn socket_send_buffer(mut self, bytes: Option<usize>) -> Self {
        self.limits.socket_send_buffer = bytes;
        self
    }

    /// Sets [`Options::send_timeout`].
    pub fn send_timeout(mut self, timeout: Option<Duration>) -> Self {
        self.send_timeout = timeout;
        self
    }

    /// Sets [`Options::trust_route`].
    pub fn trust_route(mut self, trust: bool) -> Self {
        self.trust_route = trust;
        self
    }

    /// Allows connections from processes running as `uid` too.
    pub fn allow_uid(mut self, uid: u32) -> Self {
        self.allow_uids.push(uid);
        self
    }

    /// Sets [`Options::allow_any_uid`].
    pub fn allow_any_uid(mut self, any: bool) -> Self {
        self.allow_any_uid = any;
        self
    }

    /// Sets [`Options::spin_before_sleep`].
    pub fn spin_before_sleep(mut self, spin: Duration) -> Self {
        self.spin_before_sleep = spin;
        self
    }

    /// Sets [`Options::busy_poll`].
    pub fn busy_poll(mut self, spin: bool) -> Self {
        self.busy_poll = spin;
        self
    }

    /// Sets how long an accepted connection may wait before its hello.
    pub fn hello_timeout(mut self, timeout: Duration) -> Self {
        self.limits.hello_timeout = timeout;
        self
    }
}

/// The outcome of a broadcast for one peer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BroadcastResult {
    /// Whether the copy was sent.
    pub sent: bool,
    /// Why not.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// What a client holds right now (for monitoring and leak checks).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Resources {
    /// Open connections, unresolved ones included.
    pub connections: usize,
    /// Idle receive buffers kept in the pool.
    pub pooled_buffers: usize,
    /// Buffers the backend holds (armed receives, in-flight sends, buffers
    /// provided to the kernel).
    pub backend_buffers: usize,
    /// Connections on a shared-memory lane.
    pub lanes: usize,
    /// Lanes mapped: those in use, and those being released (each maps
    /// its two rings until both sides have left it).
    pub lane_mappings: usize,
}

/// A handler that takes the messages still arriving during `disconnect`.
pub type DisconnectHandler<'a> = &'a mut dyn FnMut(&Client, Vec<Message>);
