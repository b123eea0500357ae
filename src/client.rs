//! The client: one named participant of a route, with the API of the Perl
//! ConnectionUnix client (PROTOCOL.md's API table), running its reactor
//! inline inside its own calls.

use std::collections::BTreeMap;
use std::fs::{self, OpenOptions};
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use rustix::net::{AddressFamily, SocketAddrUnix, SocketFlags, SocketType};
use serde::Serialize;

use crate::error::{Error, Result};
use crate::message::{Message, sort_messages_with};
use crate::proto::Stats;
use crate::proto::{ConnId, Core, CoreConfig, Enqueue};
use crate::reactor::{BackendChoice, BackendKind, Reactor, make_backend};
use crate::route::{EntryKind, Info, Route, names::check_local_id, pid_is_running};
use crate::serializer::{Content, Outgoing, Serializer};
use crate::wire::encode_frame;

/// The Perl `path_type` of this transport.
pub const PATH_TYPE: &str = "UNIX Socket or marker file";

/// How a client connects and behaves. Defaults follow PROTOCOL.md, with
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
}

/// A handler that takes the messages still arriving during `disconnect`.
pub type DisconnectHandler<'a> = &'a mut dyn FnMut(&Client, Vec<Message>);

/// A client of a route.
///
/// ```
/// use ipcm::{Client, Info, Options, Route, Serializer};
/// # let dir = tempfile::tempdir().unwrap();
/// let route = Route::spawn(Some(dir.path())).unwrap();
/// let info = Info::new(Serializer::Json, route.path());
/// let mut a = Client::connect(&info, "a", Options::new()).unwrap();
/// let mut b = Client::connect(&info, "b", Options::new()).unwrap();
/// a.send_message("b", &serde_json::json!({"hello": "world"})).unwrap();
/// let msgs = b.get_messages_timeout(std::time::Duration::from_secs(5)).unwrap();
/// assert_eq!(msgs[0].from(), "a");
/// assert_eq!(msgs[0].content_json(), r#"{"hello":"world"}"#);
/// ```
#[derive(Debug)]
pub struct Client {
    id: String,
    disk: String,
    route: Route,
    serializer: Serializer,
    pid: u32,
    listen: bool,
    path: String,
    reactor: Reactor,
    send_blocking: bool,
    disconnected: bool,
    opts: Options,
    /// Fork generation at creation (see [`Client::pid_check`]).
    fork_generation: u64,
    /// Whether `<name>.resume` may exist (set at connect and by
    /// `requeue_message`; only this client writes it).
    resume_pending: bool,
    /// Scratch of the batch sort (kept to receive without allocating).
    sort_scratch: crate::message::SortScratch,
}

fn since(t: Instant) -> f64 {
    t.elapsed().as_secs_f64()
}

impl Client {
    /// Registers `id` on the route of `info` (PROTOCOL.md 6.1).
    pub fn connect(info: &Info, id: &str, opts: Options) -> Result<Client> {
        Client::register(info, id, opts, false)
    }

    /// Parses `info` (an info string) and connects.
    pub fn connect_info(info: &str, id: &str, opts: Options) -> Result<Client> {
        Client::connect(&Info::parse(info)?, id, opts)
    }

    /// Takes over the id of a client that died (PROTOCOL.md 6.2): its
    /// `.stats` are loaded and its leftovers replaced by a fresh entry.
    ///
    /// Perl's reconnect leaves a dead socket behind (Q6); this one re-binds.
    pub fn reconnect(info: &Info, id: &str, opts: Options) -> Result<Client> {
        Client::register(info, id, opts, true)
    }

    fn register(info: &Info, id: &str, opts: Options, reconnect: bool) -> Result<Client> {
        check_local_id(id)?;
        let route = Route::new(info.route.clone());
        let route_owner = check_route(&route, &opts)?;
        let serializer = info.serializer.clone();
        let disk = route.on_disk_name(id)?;
        let path = route.file(&disk);
        let mut stats = Stats::default();
        if reconnect {
            stats = route.read_stats(&disk, &serializer)?;
            if Route::check_path(&path).is_none() {
                return Err(Error::DoesNotExist { id: id.to_string() });
            }
            if let Some(pid) = route.read_pid(&disk)
                && pid_is_running(pid).is_alive()
            {
                return Err(Error::AlreadyRunning { pid });
            }
            let _ = fs::remove_file(&path);
        } else if fs::symlink_metadata(&path).is_ok() {
            match route.read_pid(&disk) {
                Some(pid) if !pid_is_running(pid).is_alive() => route.reap(&disk),
                _ => return Err(Error::AlreadyExists { id: id.to_string() }),
            }
        }

        let backend = make_backend(opts.backend).map_err(|e| Error::BackendUnavailable {
            backend: e.backend,
            reason: e.reason.into(),
        })?;
        let mut core = Core::new(serializer.clone(), opts.limits.clone());
        *core.stats_mut() = stats;
        let mut reactor = Reactor::new(core, backend);
        reactor.set_busy_poll(opts.busy_poll);
        if !opts.allow_any_uid {
            let mut uids = vec![rustix::process::geteuid().as_raw()];
            uids.extend(route_owner);
            uids.extend(&opts.allow_uids);
            reactor.set_allowed_peer_uids(Some(uids));
        }

        // From here on, undo only what we created (Q2).
        if opts.listen {
            let fd = bind_listener(&path, opts.backlog)?;
            if let Err(e) = reactor.listen(fd) {
                let _ = fs::remove_file(&path);
                return Err(Error::io("Cannot watch the listen socket", e));
            }
        } else {
            OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
                .open(&path)
                .map_err(|e| Error::MarkerFile {
                    path: path.clone(),
                    err: e.into(),
                })?;
        }
        let pid = std::process::id();
        let route_has_resume = route.have_resume(&disk);
        let undo = |e: Error| {
            let _ = fs::remove_file(&path);
            e
        };
        if disk != id {
            route.write_name(&disk, id).map_err(undo)?;
        }
        route.write_pid(&disk, pid).map_err(undo)?;
        let _ = fs::remove_file(route.file(&format!("{disk}.suspend")));

        Ok(Client {
            id: id.to_string(),
            disk,
            route,
            serializer,
            pid,
            listen: opts.listen,
            path,
            reactor,
            send_blocking: true,
            disconnected: false,
            opts,
            fork_generation: crate::fork::generation(),
            resume_pending: route_has_resume,
            sort_scratch: Default::default(),
        })
    }

    // ----- attributes -------------------------------------------------

    /// The client's id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The pid that created the client.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// The route.
    pub fn route(&self) -> &Route {
        &self.route
    }

    /// The info string of the route.
    pub fn info(&self) -> Info {
        Info::new(self.serializer.clone(), self.route.path())
    }

    /// The route serializer.
    pub fn serializer(&self) -> &Serializer {
        &self.serializer
    }

    /// Whether the client owns a listening socket.
    pub fn listen(&self) -> bool {
        self.listen
    }

    /// The backend the reactor runs on.
    pub fn backend(&self) -> BackendKind {
        self.reactor.backend_kind()
    }

    /// What the client holds right now.
    pub fn resources(&self) -> Resources {
        Resources {
            connections: self.reactor.core().conn_count(),
            pooled_buffers: self.reactor.pool().idle(),
            backend_buffers: self.reactor.backend_buffers(),
        }
    }

    /// Always false: this transport cannot suspend.
    pub fn suspend_supported(&self) -> bool {
        false
    }

    /// Always fails: this transport cannot suspend.
    pub fn suspend(&mut self) -> Result<()> {
        Err(Error::SuspendUnsupported)
    }

    /// `UNIX Socket or marker file`.
    pub fn path_type(&self) -> &'static str {
        PATH_TYPE
    }

    /// Whether `disconnect` has run.
    pub fn disconnected(&self) -> bool {
        self.disconnected
    }

    /// The client's entry (`<route>/<on-disk name>`).
    pub fn path(&self) -> &str {
        &self.path
    }

    /// The client's on-disk name.
    pub fn on_disk(&self) -> &str {
        &self.disk
    }

    /// The on-disk name of any id on this route.
    pub fn on_disk_name(&self, id: &str) -> Result<String> {
        self.route.on_disk_name(id)
    }

    /// The route's verbatim-name budget.
    pub fn max_on_disk_name_length(&self) -> i64 {
        self.route.max_on_disk_name_length()
    }

    /// `<path>.pid`.
    pub fn pidfile(&self) -> String {
        format!("{}.pid", self.path)
    }

    /// `<path>.stats`.
    pub fn stats_file(&self) -> String {
        format!("{}.stats", self.path)
    }

    /// `<path>.resume`.
    pub fn resume_file(&self) -> String {
        format!("{}.resume", self.path)
    }

    /// `<path>.name`.
    pub fn name_file(&self) -> String {
        format!("{}.name", self.path)
    }

    /// The in-memory statistics.
    pub fn stats(&self) -> &Stats {
        self.reactor.core().stats()
    }

    /// Writes `.stats` now.
    pub fn write_stats(&self) -> Result<()> {
        self.route
            .write_stats(&self.disk, &self.serializer, self.stats())
    }

    /// Every client's `.stats` on the route.
    pub fn all_stats(&self) -> Result<BTreeMap<String, Stats>> {
        self.route.all_stats(&self.serializer)
    }

    /// Fails with `Client used from wrong PID` in another process.
    pub fn pid_check(&self) -> Result<()> {
        if crate::fork::generation() != self.fork_generation {
            return Err(Error::WrongPid);
        }
        Ok(())
    }

    fn check_usable(&self) -> Result<()> {
        self.pid_check()?;
        if self.disconnected {
            return Err(Error::Disconnected {
                id: self.id.clone(),
            });
        }
        Ok(())
    }

    // ----- peers ------------------------------------------------------

    /// Live peers, sorted, without this client.
    pub fn peers(&self) -> Result<Vec<String>> {
        self.route.peers(Some(&self.disk))
    }

    /// Live peers that listen.
    pub fn listening_peers(&self) -> Result<Vec<String>> {
        self.route.listening_peers(Some(&self.disk))
    }

    /// Whether `id`'s entry is a listening socket.
    pub fn peer_is_listener(&self, id: &str) -> Result<bool> {
        self.route.peer_is_listener(id)
    }

    /// The path of `id`'s entry if it exists (no liveness check).
    pub fn peer_exists(&self, id: &str) -> Result<Option<String>> {
        self.route.peer_exists(id)
    }

    /// `id`'s pid (`Some(0)` without a pid file, `None` without an entry).
    pub fn peer_pid(&self, id: &str) -> Result<Option<u32>> {
        self.route.peer_pid(id)
    }

    /// Whether `id` runs (optionally waiting up to `timeout`).
    pub fn peer_active(&self, id: &str, timeout: Option<Duration>) -> Result<bool> {
        self.route.peer_active(id, timeout)
    }

    /// Reaps dead clients' leftovers; returns how many.
    pub fn peer_left(&self) -> Result<usize> {
        self.route.peer_left(Some(&self.disk))
    }

    /// Expiry time from a peer's `.suspend`, if any.
    pub fn peer_suspend_expires(&self, id: &str) -> Result<Option<f64>> {
        self.route.peer_suspend_expires(id)
    }

    // ----- connections ------------------------------------------------

    /// Whether a connection to `peer` is cached.
    pub fn has_connection(&self, peer: &str) -> bool {
        self.reactor.core().conn_for(peer).is_some()
    }

    /// Peers with a cached connection, sorted.
    pub fn connections(&self) -> Vec<String> {
        self.reactor.core().connections()
    }

    /// Closes the connection to `peer`; whether there was one.
    pub fn disconnect_connection(&mut self, peer: &str) -> bool {
        let had = self.reactor.core_mut().close_peer(peer);
        self.reactor.flush();
        had
    }

    /// The socket of the cached connection to `peer`.
    pub fn connection_handle(&self, peer: &str) -> Option<BorrowedFd<'_>> {
        let id = self.reactor.core().conn_for(peer)?;
        self.reactor.conn_fd(id)
    }

    /// Activity time (epoch seconds) of the connection to `peer`.
    pub fn last_activity(&self, peer: &str) -> Option<f64> {
        self.reactor.core().last_activity(peer)
    }

    /// Sets the activity time of the connection to `peer` (for idle
    /// policies driven from outside); whether there is one.
    pub fn set_last_activity(&mut self, peer: &str, at: f64) -> bool {
        self.reactor.core_mut().set_last_activity(peer, at)
    }

    /// Closes connections idle for more than `max_idle` seconds; returns
    /// how many.
    pub fn close_idle_connections(&mut self, max_idle: f64) -> usize {
        let n = self.reactor.core_mut().close_idle(max_idle);
        self.reactor.flush();
        n
    }

    /// The descriptor to poll for readability before `get_messages`
    /// (it covers the listening socket and every connection).
    pub fn handles_for_select(&self) -> BorrowedFd<'_> {
        self.reactor.pollable_fd()
    }

    /// Always true.
    pub fn have_handles_for_select(&self) -> bool {
        true
    }

    // ----- sending ----------------------------------------------------

    /// Whether sends block until written (default true).
    pub fn send_blocking(&self) -> bool {
        self.send_blocking
    }

    /// Chooses blocking sends or the non-blocking outbox.
    pub fn set_send_blocking(&mut self, blocking: bool) {
        self.send_blocking = blocking;
    }

    /// Builds a message from this client.
    pub fn build_message<T: Serialize + ?Sized>(&self, to: &str, content: &T) -> Result<Message> {
        Message::new(&self.id, to, content)
    }

    /// The cached connection to `peer`, or a new one (PROTOCOL.md 9.1 step 4).
    fn conn_for_send(&mut self, peer: &str) -> Result<ConnId> {
        if peer.is_empty() {
            return Err(Error::NoPeer);
        }
        if let Some(id) = self.reactor.core().conn_for(peer) {
            return Ok(id);
        }
        let Some(path) = self.route.peer_exists(peer)? else {
            return Err(Error::NotRecipient {
                id: peer.to_string(),
            });
        };
        if Route::check_path(&path) != Some(EntryKind::Socket) {
            return Err(Error::NoActiveConnection {
                id: peer.to_string(),
            });
        }
        let fd = connect_socket(&path, self.opts.connect_timeout)?;
        let id = self.reactor.core_mut().add_initiator(peer, &self.id);
        self.reactor.attach(id, fd).map_err(|e| Error::Connect {
            path,
            err: e.into(),
        })?;
        Ok(id)
    }

    fn encode<T: Serialize + ?Sized>(
        &mut self,
        to: &str,
        content: Content<'_, T>,
        broadcast: bool,
    ) -> Result<bytes::Bytes> {
        let from = self.id.as_str();
        self.reactor.core_mut().build_frame(|ser, out| {
            ser.encode_message(
                &Outgoing {
                    from,
                    to,
                    content,
                    id: None,
                    stamp: None,
                    stamp_ord: None,
                    broadcast,
                    extra: &[],
                },
                out,
            )
        })
    }

    /// Why connection `id` went away; `Ok` if it had written `target`
    /// bytes first (the frame reached the kernel before the close).
    fn closed_outcome(&mut self, id: ConnId, target: u64) -> Result<()> {
        let mut outcome = Err(None);
        for c in self.reactor.core_mut().take_closed() {
            if c.id == id {
                outcome = if c.written_total >= target {
                    Ok(())
                } else {
                    Err(c.write_error)
                };
            } else if let (Some(e), Some(p)) = (c.write_error, c.peer) {
                log::warn!(
                    "ConnectionUnix: send to '{p}' failed: {}",
                    crate::error::strerror(&e)
                );
            }
        }
        outcome.map_err(|err| Error::Write {
            err: err
                .unwrap_or_else(|| io::Error::from_raw_os_error(libc::EPIPE))
                .into(),
        })
    }

    fn closed_error(&mut self, id: ConnId) -> Error {
        match self.closed_outcome(id, u64::MAX) {
            Err(e) => e,
            Ok(()) => Error::Write {
                err: io::Error::from_raw_os_error(libc::EPIPE).into(),
            },
        }
    }

    fn deliver_frame(
        &mut self,
        peer: &str,
        id: ConnId,
        frame: bytes::Bytes,
        blocking: bool,
    ) -> Result<()> {
        let deadline = self.opts.send_timeout.map(|t| Instant::now() + t);
        let limit = self.opts.limits.outbox_limit;
        let target = loop {
            match self.reactor.core_mut().enqueue(id, frame.clone()) {
                Enqueue::Queued(t) => break t,
                Enqueue::Gone => return Err(self.closed_error(id)),
                Enqueue::Full { queued } if !blocking => {
                    return Err(Error::WouldBlock {
                        peer: peer.to_string(),
                        queued,
                        limit,
                    });
                }
                Enqueue::Full { .. } => self.wait_turn(deadline, "room in the outbox")?,
            }
        };
        self.reactor.flush();
        if !blocking {
            let (id, target) = self.reactor.core().locate(id, target);
            if !self.reactor.core().is_open(id) {
                // A frame already handed to the kernel counts as sent even
                // if the connection closed right after.
                return self.closed_outcome(id, target);
            }
            return Ok(());
        }
        loop {
            // The frame may have moved to a newer connection to the peer.
            let (id, target) = self.reactor.core().locate(id, target);
            if !self.reactor.core().is_open(id) {
                return self.closed_outcome(id, target);
            }
            if self
                .reactor
                .core()
                .written_total(id)
                .is_some_and(|w| w >= target)
            {
                return Ok(());
            }
            self.wait_turn(deadline, "the peer to accept the message")?;
        }
    }

    fn wait_turn(&mut self, deadline: Option<Instant>, what: &'static str) -> Result<()> {
        let mut wait = Duration::from_millis(500);
        if let Some(d) = deadline {
            let now = Instant::now();
            if now >= d {
                return Err(Error::Timeout {
                    what,
                    secs: self.opts.send_timeout.map_or(0.0, |t| t.as_secs_f64()),
                });
            }
            wait = wait.min(d - now);
        }
        if self.opts.busy_poll {
            std::hint::spin_loop();
            wait = Duration::ZERO;
        }
        self.reactor
            .turn(Some(wait))
            .map_err(|e| Error::io("reactor wait failed", e))
    }

    /// Delivers a frame addressed to this client straight to its inbox
    /// (no socket): what a peer would decode from it, id, stamp and extra
    /// keys included.
    fn send_to_self(&mut self, frame: Bytes) -> Result<()> {
        let payload = frame.slice(crate::wire::HEADER_LEN..);
        let msg = self
            .serializer
            .decode_message(&payload)
            .ok()
            .flatten()
            .ok_or(Error::ContentRequired)?;
        let id = self.id.clone();
        let core = self.reactor.core_mut();
        core.count_sent(&id);
        core.count_read(&id);
        core.push_local(msg);
        Ok(())
    }

    fn send_content<T: Serialize + ?Sized>(
        &mut self,
        peer: &str,
        content: Content<'_, T>,
        blocking: bool,
        broadcast: bool,
    ) -> Result<()> {
        self.check_usable()?;
        if peer.is_empty() {
            return Err(Error::NoPeer);
        }
        if peer == self.id {
            let frame = self.encode(&self.id.clone(), content, false)?;
            return self.send_to_self(frame);
        }
        let frame = self.encode(peer, content, broadcast)?;
        let id = self.conn_for_send(peer)?;
        self.deliver_frame(peer, id, frame, blocking)?;
        self.reactor.core_mut().count_sent(peer);
        Ok(())
    }

    /// Sends `content` to `peer` (PROTOCOL.md 9.1). In blocking mode (the
    /// default) it returns once the kernel has the whole frame; in
    /// non-blocking mode it behaves as [`Client::try_send_message`].
    pub fn send_message<T: Serialize + ?Sized>(&mut self, peer: &str, content: &T) -> Result<()> {
        let blocking = self.send_blocking;
        self.send_content(peer, Content::Value(content), blocking, false)
    }

    /// Sends content that is already JSON text.
    pub fn send_json(&mut self, peer: &str, content_json: &str) -> Result<()> {
        let blocking = self.send_blocking;
        self.send_content::<()>(peer, Content::Raw(content_json), blocking, false)
    }

    /// Sends a built message (its `from` is replaced by this client's id;
    /// its id, stamp and extra keys are kept).
    pub fn send(&mut self, msg: &Message) -> Result<()> {
        self.check_usable()?;
        let Some(peer) = msg.to().map(str::to_string) else {
            return Err(Error::NoPeer);
        };
        let from = self.id.clone();
        let frame = self.reactor.core_mut().build_frame(|ser, out| {
            ser.encode_message::<()>(
                &Outgoing {
                    from: &from,
                    to: &peer,
                    content: Content::Raw(msg.content_json()),
                    id: Some(msg.id()),
                    stamp: Some(msg.stamp()),
                    stamp_ord: Some(msg.stamp_ord()),
                    broadcast: msg.is_broadcast(),
                    extra: &msg.extra,
                },
                out,
            )
        })?;
        if peer == self.id {
            return self.send_to_self(frame);
        }
        let id = self.conn_for_send(&peer)?;
        let blocking = self.send_blocking;
        self.deliver_frame(&peer, id, frame, blocking)?;
        self.reactor.core_mut().count_sent(&peer);
        Ok(())
    }

    /// `send_message`, reporting failure as `(false, error text)`.
    pub fn try_message<T: Serialize + ?Sized>(
        &mut self,
        peer: &str,
        content: &T,
    ) -> (bool, Option<String>) {
        match self.send_message(peer, content) {
            Ok(()) => (true, None),
            Err(e) => (false, Some(e.to_string())),
        }
    }

    /// Non-blocking send (PROTOCOL.md 9.3): queues the frame, writes what the
    /// kernel takes now and leaves the rest for [`Client::drain_pending`].
    /// A full outbox is [`Error::WouldBlock`] (nothing queued); a hard write
    /// error is returned, not counted as sent (Q13).
    pub fn try_send_message<T: Serialize + ?Sized>(
        &mut self,
        peer: &str,
        content: &T,
    ) -> Result<()> {
        self.send_content(peer, Content::Value(content), false, false)
    }

    /// Non-blocking send of an already-serialized payload (Q12's raw form).
    pub fn try_send_raw(&mut self, peer: &str, payload: &[u8]) -> Result<()> {
        self.check_usable()?;
        let mut out = BytesMut::new();
        encode_frame(payload, &mut out)?;
        let id = self.conn_for_send(peer)?;
        self.deliver_frame(peer, id, out.freeze(), false)?;
        self.reactor.core_mut().count_sent(peer);
        Ok(())
    }

    /// Queues a message without writing anything; it goes out, batched with
    /// everything else queued, at the next [`Client::drain_pending`] or
    /// reactor turn. A full outbox is [`Error::WouldBlock`].
    pub fn queue_message<T: Serialize + ?Sized>(&mut self, peer: &str, content: &T) -> Result<()> {
        self.queue_content(peer, Content::Value(content))
    }

    /// [`Client::queue_message`] for content that is already JSON text
    /// (sent as is, as [`Client::send_json`] does).
    pub fn queue_json(&mut self, peer: &str, content_json: &str) -> Result<()> {
        self.queue_content::<()>(peer, Content::Raw(content_json))
    }

    fn queue_content<T: Serialize + ?Sized>(
        &mut self,
        peer: &str,
        content: Content<'_, T>,
    ) -> Result<()> {
        self.check_usable()?;
        if peer.is_empty() {
            return Err(Error::NoPeer);
        }
        if peer == self.id {
            let frame = self.encode(&self.id.clone(), content, false)?;
            return self.send_to_self(frame);
        }
        let id = self.conn_for_send(peer)?;
        let limit = self.opts.limits.outbox_limit;
        let frame = self.encode(peer, content, false)?;
        match self.reactor.core_mut().enqueue(id, frame) {
            Enqueue::Queued(_) => {
                self.reactor.core_mut().count_sent(peer);
                Ok(())
            }
            Enqueue::Full { queued } => Err(Error::WouldBlock {
                peer: peer.to_string(),
                queued,
                limit,
            }),
            Enqueue::Gone => Err(self.closed_error(id)),
        }
    }

    /// Number of connections with queued bytes.
    pub fn pending_sends(&self) -> usize {
        self.reactor.core().backlogged().len()
    }

    /// Whether any connection has queued bytes.
    pub fn have_pending_sends(&self) -> bool {
        self.pending_sends() > 0
    }

    /// Whether the connection to `peer` has queued bytes.
    pub fn pending_sends_to(&self, peer: &str) -> bool {
        self.reactor
            .core()
            .conn_for(peer)
            .is_some_and(|id| self.reactor.core().queued_bytes(id) > 0)
    }

    /// Writes queued bytes without blocking; returns how many connections'
    /// backlogs became empty. Failed connections are dropped with a warning.
    pub fn drain_pending(&mut self) -> usize {
        let before = self.reactor.core().backlogged();
        if before.is_empty() {
            return 0;
        }
        let _ = self.reactor.turn(Some(Duration::ZERO));
        let core = self.reactor.core();
        let emptied = before
            .iter()
            .filter(|id| core.is_open(**id) && core.queued_bytes(**id) == 0)
            .count();
        self.warn_failed_sends(" during drain");
        emptied
    }

    /// Waits until every queued frame has been written to the kernel, or
    /// `timeout` passes ([`Error::Timeout`]). Connections that fail are
    /// dropped with a warning, as in [`Client::drain_pending`].
    pub fn flush_pending(&mut self, timeout: Option<Duration>) -> Result<()> {
        let deadline = timeout.map(|t| Instant::now() + t);
        self.reactor.flush();
        while self.have_pending_sends() {
            let mut wait = Duration::from_millis(500);
            if let Some(d) = deadline {
                let now = Instant::now();
                if now >= d {
                    return Err(Error::Timeout {
                        what: "queued messages to be written",
                        secs: timeout.map_or(0.0, |t| t.as_secs_f64()),
                    });
                }
                wait = wait.min(d - now);
            }
            if self.opts.busy_poll {
                wait = Duration::ZERO;
            }
            self.reactor
                .turn(Some(wait))
                .map_err(|e| Error::io("reactor wait failed", e))?;
            self.warn_failed_sends(" during flush");
        }
        Ok(())
    }

    /// Whether any connection has queued bytes.
    pub fn have_writable_handles(&self) -> bool {
        self.have_pending_sends()
    }

    /// Sockets with queued bytes (to poll for writability).
    pub fn writable_handles(&self) -> Vec<BorrowedFd<'_>> {
        self.reactor
            .core()
            .backlogged()
            .into_iter()
            .filter_map(|id| self.reactor.conn_fd(id))
            .collect()
    }

    /// Whether a connection to `peer` is cached with nothing queued
    /// (false without a connection, as in Perl; Q11).
    pub fn can_send_to(&self, peer: &str) -> bool {
        self.reactor
            .core()
            .conn_for(peer)
            .is_some_and(|id| self.reactor.core().queued_bytes(id) == 0)
    }

    /// Sends `content` to every live peer; the result per peer.
    pub fn broadcast<T: Serialize + ?Sized>(
        &mut self,
        content: &T,
    ) -> Result<BTreeMap<String, BroadcastResult>> {
        self.broadcast_content(Content::Value(content))
    }

    fn broadcast_content<T: Serialize + ?Sized>(
        &mut self,
        content: Content<'_, T>,
    ) -> Result<BTreeMap<String, BroadcastResult>> {
        self.check_usable()?;
        let mut out = BTreeMap::new();
        let blocking = self.send_blocking;
        for peer in self.peers()? {
            let r = match self.send_content(&peer, content, blocking, true) {
                Ok(()) => BroadcastResult {
                    sent: true,
                    error: None,
                },
                Err(e) => BroadcastResult {
                    sent: false,
                    error: Some(e.to_string()),
                },
            };
            out.insert(peer, r);
        }
        Ok(out)
    }

    // ----- building blocks of the threaded mode -----------------------

    /// Queues a complete frame for `peer` (connecting if needed); returns
    /// the connection and the byte count to wait for, or `None` for a
    /// self-send delivered locally. `Ok(Err(frame))` hands the frame back
    /// when the outbox is full.
    pub(crate) fn queue_frame(
        &mut self,
        peer: &str,
        frame: bytes::Bytes,
    ) -> Result<std::result::Result<Option<(ConnId, u64)>, bytes::Bytes>> {
        self.check_usable()?;
        if peer.is_empty() {
            return Err(Error::NoPeer);
        }
        if peer == self.id {
            let payload = frame.slice(crate::wire::HEADER_LEN..);
            if let Ok(Some(msg)) = self.serializer.decode_message(&payload) {
                let id = self.id.clone();
                let core = self.reactor.core_mut();
                core.count_sent(&id);
                core.count_read(&id);
                core.push_local(msg);
            }
            return Ok(Ok(None));
        }
        let id = self.conn_for_send(peer)?;
        match self.reactor.core_mut().enqueue(id, frame.clone()) {
            Enqueue::Queued(target) => {
                self.reactor.core_mut().count_sent(peer);
                Ok(Ok(Some((id, target))))
            }
            Enqueue::Full { .. } => Ok(Err(frame)),
            Enqueue::Gone => Err(self.closed_error(id)),
        }
    }

    /// Whether `target` bytes were written on `id`: `None` while pending.
    pub(crate) fn frame_outcome(&mut self, id: ConnId, target: u64) -> Option<Result<()>> {
        let (id, target) = self.reactor.core().locate(id, target);
        if !self.reactor.core().is_open(id) {
            return Some(self.closed_outcome(id, target));
        }
        let written = self.reactor.core().written_total(id)?;
        (written >= target).then_some(Ok(()))
    }

    /// One reactor turn (waiting up to `timeout`).
    pub(crate) fn turn(&mut self, timeout: Option<Duration>) -> Result<()> {
        self.reactor
            .turn(timeout)
            .map_err(|e| Error::io("reactor wait failed", e))
    }

    /// The reactor now runs on the calling thread (threaded mode).
    pub(crate) fn moved_to_this_thread(&mut self) {
        self.reactor.moved_to_this_thread();
    }

    /// Starts queued operations now.
    pub(crate) fn flush(&mut self) {
        self.reactor.flush();
    }

    /// Moves received messages (sorted per batch) into `out`.
    pub(crate) fn take_received(&mut self, out: &mut Vec<Message>) -> Result<()> {
        let start = out.len();
        let mut resumed = self.take_resumed()?;
        out.append(&mut resumed);
        self.collect_into(out, start);
        Ok(())
    }

    /// `broadcast` with content that is already JSON text.
    pub(crate) fn broadcast_json(
        &mut self,
        json: &str,
    ) -> Result<BTreeMap<String, BroadcastResult>> {
        self.broadcast_content::<()>(Content::Raw(json))
    }

    /// Sets the payload bytes of undelivered messages above which receiving
    /// pauses.
    pub(crate) fn set_inbox_limit(&mut self, bytes: usize) {
        self.reactor.core_mut().set_inbox_limit(bytes);
    }

    /// A handle that wakes this client's reactor from another thread.
    pub fn waker(&self) -> crate::reactor::Waker {
        self.reactor.waker()
    }

    // ----- receiving --------------------------------------------------

    /// Every message available now, sorted by stamp then stamp_ord
    /// (PROTOCOL.md 10.1). Never blocks.
    pub fn get_messages(&mut self) -> Result<Vec<Message>> {
        let mut out = Vec::new();
        self.get_messages_into(&mut out)?;
        Ok(out)
    }

    /// [`Client::get_messages`] appending to `out` (reuse one vector to
    /// receive without allocating); returns how many were appended. The
    /// appended messages are sorted among themselves.
    pub fn get_messages_into(&mut self, out: &mut Vec<Message>) -> Result<usize> {
        let start = out.len();
        if self.resume_pending {
            out.append(&mut self.take_resumed()?);
        }
        self.reactor
            .turn(Some(Duration::ZERO))
            .map_err(|e| Error::io("reactor poll failed", e))?;
        self.collect_into(out, start);
        Ok(out.len() - start)
    }

    /// [`Client::get_messages_into`], waiting up to `timeout` for at least
    /// one message (spinning if [`Options::busy_poll`] is set).
    pub fn get_messages_timeout_into(
        &mut self,
        out: &mut Vec<Message>,
        timeout: Duration,
    ) -> Result<usize> {
        let deadline = Instant::now() + timeout;
        let start = out.len();
        self.get_messages_into(out)?;
        if self.opts.busy_poll {
            // Spin on zero-timeout turns; the clock and the housekeeping
            // of `collect_into` are looked at only every 64th turn.
            let mut spins = 0u32;
            while out.len() == start {
                spins = spins.wrapping_add(1);
                if spins.is_multiple_of(64) {
                    if Instant::now() >= deadline {
                        break;
                    }
                    self.collect_into(out, start);
                }
                std::hint::spin_loop();
                self.reactor
                    .turn(Some(Duration::ZERO))
                    .map_err(|e| Error::io("reactor poll failed", e))?;
                if self.reactor.core().has_messages() {
                    self.collect_into(out, start);
                }
            }
            return Ok(out.len() - start);
        }
        while out.len() == start {
            let now = Instant::now();
            if now >= deadline {
                break;
            }
            self.reactor
                .turn(Some(deadline - now))
                .map_err(|e| Error::io("reactor wait failed", e))?;
            self.collect_into(out, start);
        }
        Ok(out.len() - start)
    }

    fn collect_into(&mut self, out: &mut Vec<Message>, start: usize) {
        // Messages already past `start` (resumed ones, or an earlier
        // collect of this call) need a sort with the new ones; otherwise
        // the new ones are appended in order, each moved once.
        let merge = out.len() > start;
        let core = self.reactor.core_mut();
        let was_paused = core.is_paused();
        core.take_messages_sorted(out, &mut self.sort_scratch);
        self.reactor.took_messages(was_paused);
        self.warn_failed_sends("");
        if merge {
            sort_messages_with(&mut out[start..], &mut self.sort_scratch);
        }
    }

    /// Logs the connections that closed with a write error (their queued
    /// messages were not all sent); `when` follows "failed".
    fn warn_failed_sends(&mut self, when: &str) {
        for c in self.reactor.core_mut().take_closed() {
            if let (Some(e), Some(p)) = (c.write_error, c.peer) {
                log::warn!(
                    "ConnectionUnix: send to '{p}' failed{when}: {}",
                    crate::error::strerror(&e)
                );
            }
        }
    }

    fn take_resumed(&mut self) -> Result<Vec<Message>> {
        let mut out = Vec::new();
        if !self.resume_pending {
            return Ok(out);
        }
        let records = self.route.take_resume(&self.disk)?;
        self.resume_pending = false;
        for rec in records {
            match self.serializer.decode_message(&rec) {
                Ok(Some(m)) => out.push(m),
                Ok(None) => {}
                Err(e) => log::warn!("ConnectionUnix: bad record in resume file skipped: {e:?}"),
            }
        }
        Ok(out)
    }

    /// Like [`Client::get_messages`], but waits up to `timeout` for at
    /// least one message.
    pub fn get_messages_timeout(&mut self, timeout: Duration) -> Result<Vec<Message>> {
        let mut out = Vec::new();
        self.get_messages_timeout_into(&mut out, timeout)?;
        Ok(out)
    }

    /// Whether messages are (or may be) waiting: a resume file, buffered
    /// messages, or new data on any connection.
    pub fn pending_messages(&mut self) -> Result<bool> {
        self.pid_check()?;
        if self.resume_pending || self.reactor.core().has_messages() {
            return Ok(true);
        }
        self.reactor
            .turn(Some(Duration::ZERO))
            .map_err(|e| Error::io("reactor poll failed", e))?;
        Ok(self.reactor.core().has_messages())
    }

    /// Same as [`Client::pending_messages`].
    pub fn ready_messages(&mut self) -> Result<bool> {
        self.pending_messages()
    }

    /// Alias of [`Client::pending_messages`] (Q26).
    pub fn have_pending_messages(&mut self) -> Result<bool> {
        self.pending_messages()
    }

    /// Alias of [`Client::ready_messages`] (Q26).
    pub fn have_ready_messages(&mut self) -> Result<bool> {
        self.ready_messages()
    }

    /// Hands messages back to this client: they come out of the next
    /// `get_messages` (via `<name>.resume`).
    pub fn requeue_message(&mut self, msgs: &[Message]) -> Result<()> {
        self.pid_check()?;
        let mut records = BytesMut::new();
        for m in msgs {
            let mut payload = BytesMut::new();
            self.serializer.encode_message::<()>(
                &Outgoing {
                    from: m.from(),
                    to: m.to().unwrap_or(&self.id),
                    content: Content::Raw(m.content_json()),
                    id: Some(m.id()),
                    stamp: Some(m.stamp()),
                    stamp_ord: Some(m.stamp_ord()),
                    broadcast: m.is_broadcast(),
                    extra: &m.extra,
                },
                &mut payload,
            )?;
            encode_frame(&payload, &mut records)?;
        }
        self.route.append_resume(&self.disk, &records)?;
        self.resume_pending = true;
        Ok(())
    }

    // ----- shutdown ---------------------------------------------------

    /// Orderly shutdown (PROTOCOL.md 6.3): removes the entry, drains
    /// in-flight messages (to `handler`, or fails with `Messages waiting at
    /// disconnect for <id>`), flushes queued sends within the drain timeout,
    /// closes everything and writes `.stats`.
    pub fn disconnect(&mut self, mut handler: Option<DisconnectHandler<'_>>) -> Result<()> {
        self.pid_check()?;
        if self.disconnected {
            return Ok(());
        }
        if let Err(e) = fs::remove_file(&self.path)
            && e.kind() != io::ErrorKind::NotFound
        {
            log::warn!(
                "{}",
                Error::Unlink {
                    path: self.path.clone(),
                    err: e.into()
                }
            );
        }
        let deadline = Instant::now() + self.opts.drain_timeout;
        // Flush queued sends (Q19) so peers get what was acknowledged.
        while self.have_pending_sends() && Instant::now() < deadline {
            let left = deadline.saturating_duration_since(Instant::now());
            let _ = self.reactor.turn(Some(left.min(Duration::from_millis(50))));
        }
        let mut failure = None;
        let mut quiet_rounds = 0;
        while quiet_rounds < 2 && Instant::now() < deadline {
            let msgs: Vec<Message> = self
                .get_messages()?
                .into_iter()
                .filter(|m| !m.is_terminate())
                .collect();
            if msgs.is_empty() {
                // Nothing readable now (Perl polls the handles with a zero
                // timeout too); a second look catches data behind an accept.
                quiet_rounds += 1;
                continue;
            }
            quiet_rounds = 0;
            match handler.as_mut() {
                Some(h) => h(self, msgs),
                None => {
                    let read = &mut self.reactor.core_mut().stats_mut().read;
                    for m in &msgs {
                        if let Some(n) = read.get_mut(m.from()) {
                            *n = n.saturating_sub(1);
                        }
                    }
                    failure = Some(Error::MessagesWaiting {
                        id: self.id.clone(),
                    });
                    break;
                }
            }
        }
        self.disconnected = true;
        self.reactor.shutdown();
        if Path::new(&self.path).exists() {
            let _ = fs::remove_file(&self.path);
        }
        self.write_stats()?;
        match failure {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}

impl AsFd for Client {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.reactor.pollable_fd()
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        if self.disconnected || crate::fork::generation() != self.fork_generation {
            return;
        }
        if let Err(e) = self.disconnect(None) {
            log::warn!(
                "ConnectionUnix: disconnect of '{}' during drop failed: {e}",
                self.id
            );
            if !self.disconnected {
                let _ = self.write_stats();
            }
        }
    }
}

/// Refuses a route another user owns or others may write to (unless
/// trusted); returns its owner's uid.
fn check_route(route: &Route, opts: &Options) -> Result<Option<u32>> {
    use std::os::unix::fs::MetadataExt;
    // A missing route fails later with the Perl error of bind/create.
    let Ok(meta) = fs::metadata(route.path()) else {
        return Ok(None);
    };
    if opts.trust_route {
        return Ok(Some(meta.uid()));
    }
    let me = rustix::process::geteuid().as_raw();
    let refuse = |reason: String| Error::InsecureRoute {
        route: route.path().to_string(),
        reason,
    };
    if !meta.is_dir() {
        return Err(refuse("it is not a directory".into()));
    }
    if meta.uid() != me {
        return Err(refuse(format!(
            "it is owned by uid {}, not by this user (uid {me})",
            meta.uid()
        )));
    }
    if meta.mode() & 0o022 != 0 {
        return Err(refuse(format!(
            "its mode {:04o} lets other users write to it (expected 0700)",
            meta.mode() & 0o7777
        )));
    }
    Ok(Some(meta.uid()))
}

/// Binds and listens on `path`. The socket is bound under a temporary
/// dot-name in the same directory (which peers skip) and renamed into place
/// once it listens, so that no peer ever finds the file of a socket that
/// would still refuse it. An existing entry at `path` fails as `bind` would
/// (`Address already in use`); where the rename cannot be done without
/// replacing (`RENAME_NOREPLACE` unsupported), the socket is bound in place.
fn bind_listener(path: &str, backlog: i32) -> Result<OwnedFd> {
    let err = |e: rustix::io::Errno| Error::ListenSocket {
        path: path.to_string(),
        err: e.into(),
    };
    let socket = || {
        rustix::net::socket_with(
            AddressFamily::UNIX,
            SocketType::STREAM,
            SocketFlags::NONBLOCK | SocketFlags::CLOEXEC,
            None,
        )
        .map_err(err)
    };
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let dir = Path::new(path).parent().unwrap_or(Path::new("."));
    let tmp = dir.join(format!(
        ".ipcm-bind-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    ));
    if let (Ok(tmp_addr), Some(tmp_str)) = (SocketAddrUnix::new(&tmp), tmp.to_str()) {
        let fd = socket()?;
        if rustix::net::bind(&fd, &tmp_addr).is_ok() {
            let placed = rustix::net::listen(&fd, backlog).and_then(|()| {
                rustix::fs::renameat_with(
                    rustix::fs::CWD,
                    tmp_str,
                    rustix::fs::CWD,
                    path,
                    rustix::fs::RenameFlags::NOREPLACE,
                )
            });
            match placed {
                Ok(()) => return Ok(fd),
                Err(e) => {
                    let _ = fs::remove_file(&tmp);
                    match e {
                        rustix::io::Errno::EXIST => {
                            return Err(err(rustix::io::Errno::ADDRINUSE));
                        }
                        // No RENAME_NOREPLACE here: bind in place below.
                        rustix::io::Errno::INVAL | rustix::io::Errno::NOSYS => {}
                        e => return Err(err(e)),
                    }
                }
            }
        }
    }
    let fd = socket()?;
    let addr = SocketAddrUnix::new(path).map_err(err)?;
    rustix::net::bind(&fd, &addr).map_err(err)?;
    if let Err(e) = rustix::net::listen(&fd, backlog) {
        let _ = fs::remove_file(path);
        return Err(err(e));
    }
    Ok(fd)
}

/// Connects to a peer's socket. A full backlog (`EAGAIN` on a non-blocking
/// UNIX socket) is retried until `timeout`; other failures are final.
fn connect_socket(path: &str, timeout: Duration) -> Result<OwnedFd> {
    let err = |e: rustix::io::Errno| Error::Connect {
        path: path.to_string(),
        err: e.into(),
    };
    let fd = rustix::net::socket_with(
        AddressFamily::UNIX,
        SocketType::STREAM,
        SocketFlags::NONBLOCK | SocketFlags::CLOEXEC,
        None,
    )
    .map_err(err)?;
    let addr = SocketAddrUnix::new(path).map_err(err)?;
    let start = Instant::now();
    loop {
        match rustix::net::connect(&fd, &addr) {
            Ok(()) => return Ok(fd),
            Err(rustix::io::Errno::INTR) => continue,
            Err(rustix::io::Errno::AGAIN) if since(start) < timeout.as_secs_f64() => {
                std::thread::sleep(Duration::from_millis(1));
            }

            Err(e) => return Err(err(e)),
        }
    }
}
