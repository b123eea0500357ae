//! Threaded mode: the client's reactor runs on its own thread; the
//! application holds a [`Receiver`] (a bounded lock-free ring of received
//! messages, with a pollable descriptor) and cloneable [`Sender`]s.
//!
//! * Senders serialize frames in their own thread (into a per-sender arena,
//!   so steady-state sends do not allocate) and hand them over through a
//!   bounded lock-free queue. The reactor is woken through the [`Waker`]
//!   handshake: no syscall while it is busy.
//! * The first message to a peer waits for the reactor's verdict, so
//!   connection errors come back with the inline texts; later
//!   [`Sender::try_send`]s to that peer return at once, and a later failure
//!   is reported by the next call for that peer.
//! * The ring is [`rtrb`]'s single-producer single-consumer queue of inbox
//!   entries: single messages, and on Binary routes whole batches (one
//!   hand-over per batch, not per message; the reader takes them one by
//!   one with [`Receiver::recv`] or in place with [`Receiver::receive`]).
//!   When it is full (in entries or in bytes) the reactor keeps the rest,
//!   then stops reading sockets once the inbox limit is reached: senders
//!   feel backpressure, memory stays bounded, nothing is dropped.
//! * [`ReactorHandle::shutdown`] sends what is queued, disconnects
//!   (the inline client's rules) and returns its result; messages that arrive while
//!   disconnecting still go to the ring.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use crossbeam_queue::ArrayQueue;
use serde::Serialize;

use crate::client::{BroadcastResult, Client};
use crate::error::{Error, Result};
use crate::message::{Message, Name};
use crate::proto::{ConnId, Cursor, Entry, Received};
use crate::reactor::Waker;
use crate::serializer::{Content, Outgoing, Serializer};
use crate::wire::build_frame;

/// Sizes of the threaded mode's queues.
#[derive(Debug, Clone)]
pub struct ThreadedOptions {
    /// Entries the receive ring holds: messages, or on Binary routes whole
    /// batches of messages.
    pub ring_capacity: usize,
    /// Payload bytes the receive ring holds at most (an entry larger than
    /// this still passes, alone).
    pub ring_bytes: usize,
    /// Frames the send queue holds before `try_send` reports `WouldBlock`.
    pub send_queue: usize,
    /// Frame bytes the send queue holds at most (a frame larger than this
    /// still passes, alone); with `send_queue` it bounds what senders can
    /// hand over while the reactor waits for a slow peer.
    pub send_queue_bytes: usize,
    /// Payload bytes the reactor keeps beyond a full ring before it stops
    /// reading sockets.
    pub inbox_limit: usize,
    /// Whether the reactor's thread, before it sleeps, polls the sockets
    /// for [`crate::Options::spin_before_sleep`] as an inline client does
    /// (off by default; its spin on a lane's ring stays). A threaded client
    /// runs two threads, and the reactor's spin takes the core that the
    /// application's thread needs when threads outnumber cores: on two
    /// cores, a threaded ping-pong's p50 went from 35 to 88 µs with it on.
    pub spin_on_sockets: bool,
}

impl Default for ThreadedOptions {
    fn default() -> Self {
        ThreadedOptions {
            ring_capacity: 64 * 1024,
            ring_bytes: 32 * 1024 * 1024,
            send_queue: 64 * 1024,
            send_queue_bytes: 8 * 1024 * 1024,
            inbox_limit: 8 * 1024 * 1024,
            spin_on_sockets: false,
        }
    }
}

/// The receive ring's backpressure handshake: the reactor, finding the
/// ring full, announces that it waits for room and looks again; the
/// reader, after taking a message, wakes it if it waits.
///
/// One atomic: bit 0 is "the reactor waits", the rest counts the reader's
/// pops. Both sides read-modify-write it, so they fall in one total order:
/// if the reader's pop came first, the reactor's announcement reads it
/// (acquire), and its second look at the ring sees the room; otherwise
/// the reader's count reads the announcement and wakes the reactor. A
/// wake-up is never lost (a loom model checks it, `src/loom_models.rs`).
#[derive(Debug, Default)]
pub(crate) struct RingGate {
    state: crate::sync::AtomicUsize,
}

impl RingGate {
    /// The reactor found the ring full. It must try the push once more
    /// afterwards and wait for a wake only if that fails too.
    pub(crate) fn producer_blocked(&self) {
        self.state.fetch_or(1, crate::sync::Ordering::AcqRel);
    }

    /// The reader took a message; true if the reactor waits for room (it
    /// is woken once per wait).
    pub(crate) fn consumer_popped(&self) -> bool {
        use crate::sync::Ordering::AcqRel;
        self.state.fetch_add(2, AcqRel) & 1 != 0 && self.state.fetch_and(!1, AcqRel) & 1 != 0
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The send queue's closing handshake: no command is stranded in the
/// queue when the reactor ends.
///
/// One atomic: bit 0 is "closed", the rest counts senders inside
/// [`CloseGate::enter`]..[`CloseGate::leave`]. A sender enters (adding to
/// the count) and is refused if it saw the bit; the reactor sets the bit,
/// then waits for the count to reach zero before its last look at the
/// queue. All are read-modify-writes of one atomic, in one total order:
/// a sender that entered first has pushed before the count drops, so the
/// reactor's last look sees its command; one that entered later sees the
/// bit (a loom model checks it, `src/loom_models.rs`).
#[derive(Debug, Default)]
pub(crate) struct CloseGate {
    state: crate::sync::AtomicUsize,
}

impl CloseGate {
    /// A sender is about to push; false (and nothing to undo) if closed.
    pub(crate) fn enter(&self) -> bool {
        use crate::sync::Ordering::AcqRel;
        if self.state.fetch_add(2, AcqRel) & 1 != 0 {
            self.state.fetch_sub(2, AcqRel);
            return false;
        }
        true
    }

    /// The sender's push is done.
    pub(crate) fn leave(&self) {
        self.state.fetch_sub(2, crate::sync::Ordering::AcqRel);
    }

    /// Refuses senders from now on and returns once every sender inside
    /// has left (their pushes are then visible).
    pub(crate) fn close(&self) {
        use crate::sync::Ordering::{AcqRel, Acquire};
        self.state.fetch_or(1, AcqRel);
        while self.state.load(Acquire) != 1 {
            crate::sync::yield_now();
        }
    }
}

/// A one-shot reply slot, waited on by a blocked thread or polled by a
/// task.
pub(crate) struct Ack<T> {
    slot: Mutex<AckSlot<T>>,
    cv: Condvar,
}

struct AckSlot<T> {
    value: Option<T>,
    waker: Option<std::task::Waker>,
}

impl<T> Ack<T> {
    fn new() -> Arc<Self> {
        Arc::new(Ack {
            slot: Mutex::new(AckSlot {
                value: None,
                waker: None,
            }),
            cv: Condvar::new(),
        })
    }

    fn set(&self, v: T) {
        let waker = {
            let mut g = lock(&self.slot);
            g.value = Some(v);
            g.waker.take()
        };
        self.cv.notify_all();
        if let Some(w) = waker {
            w.wake();
        }
    }

    fn wait(&self) -> T {
        let mut g = lock(&self.slot);
        loop {
            if let Some(v) = g.value.take() {
                return v;
            }
            g = self.cv.wait(g).unwrap_or_else(|p| p.into_inner());
        }
    }

    /// The reply if it came; otherwise the task is woken when it comes.
    #[cfg_attr(not(feature = "tokio"), allow(dead_code))]
    pub(crate) fn poll(&self, cx: &mut std::task::Context<'_>) -> std::task::Poll<T> {
        let mut g = lock(&self.slot);
        match g.value.take() {
            Some(v) => std::task::Poll::Ready(v),
            None => {
                if !g.waker.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                    g.waker = Some(cx.waker().clone());
                }
                std::task::Poll::Pending
            }
        }
    }
}

/// The reactor's end of an [`Ack`]: dropped unanswered (the reactor
/// thread unwinding), it answers [`Error::ReactorPanicked`], so no waiter
/// waits forever.
pub(crate) struct Reply<T>(Option<Arc<Ack<Result<T>>>>);

impl<T> Reply<T> {
    pub(crate) fn pair() -> (Reply<T>, Arc<Ack<Result<T>>>) {
        let ack = Ack::new();
        (Reply(Some(ack.clone())), ack)
    }

    fn set(mut self, v: Result<T>) {
        if let Some(a) = self.0.take() {
            a.set(v);
        }
    }
}

impl<T> Drop for Reply<T> {
    fn drop(&mut self) {
        if let Some(a) = self.0.take() {
            a.set(Err(Error::ReactorPanicked));
        }
    }
}

/// Who waits for room in the send queue: tasks (their wakers) and blocked
/// threads (a waker that unparks them). The reactor wakes them all after
/// it took commands off the queue.
///
/// The handshake is the receive ring's [`RingGate`] with the roles
/// swapped: a waiter registers its waker, announces its wait on the gate,
/// then tries its push again; the reactor, after popping, counts on the
/// gate and wakes every registered waiter if one announced. Either the
/// second try sees the room or the reactor sees the announcement (and the
/// waker registered before it): no wake-up is lost.
#[derive(Default)]
struct Room {
    gate: RingGate,
    wakers: Mutex<Vec<std::task::Waker>>,
}

impl Room {
    fn register(&self, w: &std::task::Waker) {
        {
            let mut ws = lock(&self.wakers);
            if !ws.iter().any(|x| x.will_wake(w)) {
                ws.push(w.clone());
            }
        }
        self.gate.producer_blocked();
    }

    fn notify(&self) {
        if self.gate.consumer_popped() {
            self.wake_all();
        }
    }

    /// Wakes every registered waiter (they try again and find the queue
    /// closed, or room).
    fn wake_all(&self) {
        let ws = std::mem::take(&mut *lock(&self.wakers));
        for w in ws {
            w.wake();
        }
    }
}

/// Wakes a thread parked in [`Sender::push`].
struct Unpark(std::thread::Thread);

impl std::task::Wake for Unpark {
    fn wake(self: Arc<Self>) {
        self.0.unpark();
    }
}

pub(crate) enum Cmd {
    /// A frame of `count` messages (a batch frame holds many).
    Frame {
        peer: Arc<str>,
        frame: Bytes,
        count: u32,
        ack: Option<Reply<()>>,
    },
    /// A single-message frame with descriptors for it (passed first).
    Fds {
        peer: Arc<str>,
        frame: Bytes,
        fds: Vec<std::os::fd::OwnedFd>,
        ack: Reply<()>,
    },
    /// Connect to the peer if need be, queueing nothing: the verdict a
    /// first frame would get.
    #[cfg_attr(not(feature = "tokio"), allow(dead_code))]
    Connect {
        peer: Arc<str>,
        ack: Reply<()>,
    },
    /// Answered once every frame queued before it is written.
    Flush {
        ack: Reply<()>,
    },
    Stats {
        ack: Reply<crate::proto::Stats>,
    },
    Broadcast {
        content: String,
        ack: Reply<BTreeMap<String, BroadcastResult>>,
    },
    Requeue {
        msgs: Vec<Message>,
        ack: Reply<()>,
    },
}

impl Cmd {
    /// Frame bytes this command holds (what the send queue's byte limit
    /// counts).
    fn bytes(&self) -> usize {
        match self {
            Cmd::Frame { frame, .. } => frame.len(),
            _ => 0,
        }
    }
}

pub(crate) struct Shared {
    cmds: ArrayQueue<Cmd>,
    waker: Waker,
    stop: AtomicBool,
    /// The reactor takes no more commands once closed (see
    /// [`Shared::hand_over`]).
    closing: CloseGate,
    /// Waiters for room in `cmds`.
    room: Room,
    /// Frame bytes in `cmds` (added before a push, taken off after a
    /// pop), and their limit.
    queued_bytes: AtomicUsize,
    queued_bytes_limit: usize,
    /// The reactor thread's result, once it has ended.
    outcome: Arc<Ack<Result<()>>>,
    /// The reactor waits for ring space.
    gate: RingGate,
    /// Payload bytes in the ring (added by the reactor, taken off by the
    /// reader before it looks at the gate), and their limit.
    ring_bytes: AtomicUsize,
    ring_bytes_limit: usize,
    /// The reactor thread has ended.
    finished: AtomicBool,
    /// Readable while messages wait in the ring.
    ready: OwnedFd,
    /// Failures of fire-and-forget sends, per peer, reported by the next
    /// call for that peer.
    failures: Mutex<HashMap<String, String>>,
    /// Entries in `failures` (written under its lock).
    failed: AtomicUsize,
    id: String,
    serializer: Serializer,
    /// The route and this client's entry in it (for peer events).
    route: crate::route::Route,
    disk: String,
}

impl Shared {
    fn signal_ready(&self) {
        let _ = rustix::io::write(&self.ready, &1u64.to_ne_bytes());
    }

    pub(crate) fn drain_ready(&self) {
        let mut b = [0u8; 8];
        let _ = rustix::io::read(&self.ready, &mut b);
    }

    #[cfg_attr(not(feature = "tokio"), allow(dead_code))]
    pub(crate) fn ready_fd(&self) -> BorrowedFd<'_> {
        self.ready.as_fd()
    }

    /// Whether the reactor thread has ended.
    #[cfg_attr(not(feature = "tokio"), allow(dead_code))]
    pub(crate) fn is_finished(&self) -> bool {
        self.finished.load(Ordering::Acquire)
    }

    #[cfg_attr(not(feature = "tokio"), allow(dead_code))]
    pub(crate) fn id(&self) -> &str {
        &self.id
    }

    #[cfg_attr(not(feature = "tokio"), allow(dead_code))]
    pub(crate) fn serializer(&self) -> &Serializer {
        &self.serializer
    }

    #[cfg_attr(not(feature = "tokio"), allow(dead_code))]
    pub(crate) fn route(&self) -> &crate::route::Route {
        &self.route
    }

    #[cfg_attr(not(feature = "tokio"), allow(dead_code))]
    pub(crate) fn disk(&self) -> &str {
        &self.disk
    }

    fn disconnected(&self) -> Error {
        Error::Disconnected {
            id: self.id.clone(),
        }
    }

    /// Pushes `cmd` unless the reactor has closed; a full queue hands it
    /// back (`Ok(Err(cmd))`), registering `waiter` first when given (then
    /// trying once more, so the room the reactor makes meanwhile is not
    /// missed).
    ///
    /// The closing handshake ([`CloseGate`]): a command is either refused
    /// here or seen by the reactor's last look at the queue; none is
    /// stranded in it.
    pub(crate) fn hand_over(
        &self,
        cmd: Cmd,
        waiter: Option<&std::task::Waker>,
    ) -> Result<std::result::Result<(), Cmd>> {
        if !self.closing.enter() {
            return Err(self.disconnected());
        }
        let r = match self.push(cmd) {
            Ok(()) => Ok(Ok(())),
            Err(back) => match waiter {
                None => Ok(Err(back)),
                Some(w) => {
                    self.room.register(w);
                    Ok(self.push(back))
                }
            },
        };
        self.closing.leave();
        if matches!(r, Ok(Ok(()))) {
            self.waker.wake();
        }
        r
    }

    /// Answers every command left in the queue with [`Error::Disconnected`]
    /// (the reactor has ended or is ending and takes no more).
    fn refuse_queued(&self) {
        while let Some(cmd) = self.pop() {
            let gone = self.disconnected();
            match cmd {
                Cmd::Frame { peer, ack, .. } => match ack {
                    Some(a) => a.set(Err(gone)),
                    None => {
                        self.record_failure(&peer, gone.to_string());
                    }
                },
                Cmd::Connect { ack, .. }
                | Cmd::Flush { ack }
                | Cmd::Requeue { ack, .. }
                | Cmd::Fds { ack, .. } => ack.set(Err(gone)),
                Cmd::Stats { ack } => ack.set(Err(gone)),
                Cmd::Broadcast { ack, .. } => ack.set(Err(gone)),
            }
        }
    }

    /// One push within the queue's slots and bytes (an empty queue takes a
    /// frame of any size).
    fn push(&self, cmd: Cmd) -> std::result::Result<(), Cmd> {
        let bytes = cmd.bytes();
        if bytes > 0 {
            let held = self.queued_bytes.fetch_add(bytes, Ordering::SeqCst);
            if held > 0 && held + bytes > self.queued_bytes_limit {
                self.queued_bytes.fetch_sub(bytes, Ordering::SeqCst);
                return Err(cmd);
            }
        }
        self.cmds.push(cmd).inspect_err(|_| {
            self.queued_bytes.fetch_sub(bytes, Ordering::SeqCst);
        })
    }

    /// One command off the queue (the reactor's side of [`Shared::push`]).
    fn pop(&self) -> Option<Cmd> {
        let cmd = self.cmds.pop()?;
        let bytes = cmd.bytes();
        if bytes > 0 {
            self.queued_bytes.fetch_sub(bytes, Ordering::SeqCst);
        }
        Some(cmd)
    }

    /// Starts a thread that watches this client's route and hands each
    /// peer event to `deliver` until it returns false, the returned flag
    /// is set (noticed within 200 ms), or the route is removed (after
    /// every peer is reported as left).
    pub(crate) fn watch_peers(
        &self,
        mut deliver: impl FnMut(crate::route::watch::PeerEvent) -> bool + Send + 'static,
    ) -> Result<Arc<AtomicBool>> {
        let mut watch = crate::route::watch::PeerWatch::new(&self.route, Some(&self.disk))?;
        let closed = Arc::new(AtomicBool::new(false));
        let dropped = closed.clone();
        std::thread::Builder::new()
            .name(format!("ipcm-peers-{}", self.id))
            .spawn(move || {
                loop {
                    // Wakes now and then to notice a dropped receiver.
                    match watch.next_event(Some(Duration::from_millis(200))) {
                        Ok(Some(e)) => {
                            if !deliver(e) {
                                return;
                            }
                        }
                        Ok(None) if watch.is_ended() => return,
                        Ok(None) => {
                            if dropped.load(Ordering::Acquire) {
                                return;
                            }
                        }
                        Err(e) => {
                            log::warn!("ConnectionUnix: peer watch ended: {e}");
                            return;
                        }
                    }
                }
            })
            .map_err(|e| Error::io("Cannot start the peer watch thread", e))?;
        Ok(closed)
    }

    /// Takes the failure of an earlier fire-and-forget frame to `peer`,
    /// as the [`Error::DeferredSend`] the next call for that peer returns.
    pub(crate) fn take_failure(&self, peer: &str) -> Result<()> {
        // Most calls find none: one load, no lock.
        if self.failed.load(Ordering::Acquire) == 0 {
            return Ok(());
        }
        let mut f = lock(&self.failures);
        let text = f.remove(peer);
        self.failed.store(f.len(), Ordering::Release);
        match text {
            Some(text) => Err(Error::DeferredSend {
                peer: peer.to_string(),
                text,
            }),
            None => Ok(()),
        }
    }

    /// Whether a failure waits to be reported (one load).
    #[cfg_attr(not(feature = "tokio"), allow(dead_code))]
    pub(crate) fn has_failures(&self) -> bool {
        self.failed.load(Ordering::Acquire) != 0
    }

    /// Records the failure of a fire-and-forget frame to `peer`.
    fn record_failure(&self, peer: &str, text: String) {
        let mut f = lock(&self.failures);
        f.insert(peer.to_string(), text);
        self.failed.store(f.len(), Ordering::Release);
    }

    pub(crate) fn would_block(&self) -> Error {
        Error::WouldBlock {
            peer: self.id.clone(),
            queued: self.cmds.len(),
            limit: self.cmds.capacity(),
        }
    }

    /// Builds the frame of one message from this client.
    pub(crate) fn frame<T: Serialize + ?Sized>(
        &self,
        arena: &mut BytesMut,
        peer: &str,
        content: &T,
    ) -> Result<Bytes> {
        if arena.capacity() < 4096 {
            arena.reserve(64 * 1024);
        }
        let from = self.id.as_str();
        let ser = &self.serializer;
        build_frame(arena, |b| {
            ser.encode_message(&Outgoing::new(from, peer, Content::Value(content)), b)
        })
    }
}

/// Builds a command needing an answer, hands it over (waiting for room)
/// and waits for the answer: the blocking form of the async face's
/// requests.
fn request<T>(shared: &Shared, make: impl FnOnce(Reply<T>) -> Cmd) -> Result<T> {
    let (reply, ack) = Reply::pair();
    push_blocking(shared, make(reply))?;
    ack.wait()
}

/// Hands `cmd` over, parking while the queue is full.
fn push_blocking(shared: &Shared, cmd: Cmd) -> Result<()> {
    // The common case: room at once, no waker made.
    let Err(mut cmd) = shared.hand_over(cmd, None)? else {
        return Ok(());
    };
    let waker = std::task::Waker::from(Arc::new(Unpark(std::thread::current())));
    loop {
        match shared.hand_over(cmd, Some(&waker))? {
            Ok(()) => return Ok(()),
            Err(back) => {
                cmd = back;
                shared.waker.wake();
                // The wake comes from the reactor; the timeout is a safety
                // net, not a poll.
                std::thread::park_timeout(Duration::from_millis(100));
            }
        }
    }
}

/// The sending side: `Clone + Send`, one per thread.
pub struct Sender {
    shared: Arc<Shared>,
    arena: BytesMut,
    known: HashSet<Arc<str>>,
}

impl std::fmt::Debug for Sender {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sender")
            .field("id", &self.shared.id)
            .finish()
    }
}

impl Clone for Sender {
    fn clone(&self) -> Self {
        Sender {
            shared: self.shared.clone(),
            arena: BytesMut::new(),
            known: HashSet::new(),
        }
    }
}

impl Sender {
    #[cfg_attr(not(feature = "tokio"), allow(dead_code))]
    pub(crate) fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    fn frame<T: Serialize + ?Sized>(&mut self, peer: &str, content: &T) -> Result<Bytes> {
        self.shared.frame(&mut self.arena, peer, content)
    }

    fn take_failure(&mut self, peer: &str) -> Result<()> {
        self.shared.take_failure(peer).inspect_err(|_| {
            self.known.remove(peer);
        })
    }

    fn send_acked(&mut self, peer: &str, frame: Bytes) -> Result<()> {
        self.request_for(peer, |peer, ack| Cmd::Frame {
            peer,
            frame,
            count: 1,
            ack: Some(ack),
        })
    }

    /// Hands over the command `make` builds for `peer` and waits for its
    /// answer; once one succeeded, `peer` is known (its verdict is in).
    fn request_for(
        &mut self,
        peer: &str,
        make: impl FnOnce(Arc<str>, Reply<()>) -> Cmd,
    ) -> Result<()> {
        let peer: Arc<str> = Arc::from(peer);
        let r = request(&self.shared, |ack| make(peer.clone(), ack));
        if r.is_ok() {
            self.known.insert(peer);
        }
        r
    }

    /// Sends and waits until the kernel has the whole frame (as a blocking
    /// inline send). Errors carry the inline texts.
    pub fn send<T: Serialize + ?Sized>(&mut self, peer: &str, content: &T) -> Result<()> {
        self.take_failure(peer)?;
        let frame = self.frame(peer, content)?;
        self.send_acked(peer, frame)
    }

    /// Sends `content` with `fds` attached and waits until the kernel has
    /// it, as [`Client::send_message_with_fds`](crate::Client::send_message_with_fds)
    /// (the same refusals, nothing sent then).
    pub fn send_with_fds<T: Serialize + ?Sized>(
        &mut self,
        peer: &str,
        content: &T,
        fds: Vec<std::os::fd::OwnedFd>,
    ) -> Result<()> {
        if fds.is_empty() {
            return self.send(peer, content);
        }
        self.take_failure(peer)?;
        let frame = self.frame(peer, content)?;
        self.request_for(peer, |peer, ack| Cmd::Fds {
            peer,
            frame,
            fds,
            ack,
        })
    }

    /// Hands the message to the reactor and returns. The first message to
    /// a peer waits for the connection verdict; a full send queue is
    /// [`Error::WouldBlock`]; a failure of an earlier message to `peer` is
    /// returned here (that earlier message was not delivered).
    pub fn try_send<T: Serialize + ?Sized>(&mut self, peer: &str, content: &T) -> Result<()> {
        self.take_failure(peer)?;
        let frame = self.frame(peer, content)?;
        let Some(peer) = self.known.get(peer).cloned() else {
            return self.send_acked(peer, frame);
        };
        let cmd = Cmd::Frame {
            peer,
            frame,
            count: 1,
            ack: None,
        };
        match self.shared.hand_over(cmd, None)? {
            Ok(()) => Ok(()),
            Err(_) => Err(self.shared.would_block()),
        }
    }

    /// Sends `content` to every live peer; the result per peer.
    pub fn broadcast<T: Serialize + ?Sized>(
        &mut self,
        content: &T,
    ) -> Result<BTreeMap<String, BroadcastResult>> {
        let content = serde_json::to_string(content)?;
        request(&self.shared, |ack| Cmd::Broadcast { content, ack })
    }

    /// Waits until every message handed over so far (by any sender of this
    /// client) is written to the kernel.
    pub fn flush(&mut self) -> Result<()> {
        request(&self.shared, |ack| Cmd::Flush { ack })
    }

    /// This client's counters (`.stats`), as the reactor has them now.
    pub fn stats(&self) -> Result<crate::proto::Stats> {
        request(&self.shared, |ack| Cmd::Stats { ack })
    }
}

impl Sender {
    /// Hands messages back to this client, as the inline
    /// [`Client::requeue_message`] does: they are written to its resume
    /// file and come out of the [`Receiver`] again, ahead of newer ones.
    /// Waits until the reactor has written them.
    pub fn requeue(&mut self, msgs: Vec<Message>) -> Result<()> {
        request(&self.shared, |ack| Cmd::Requeue { msgs, ack })
    }
}

/// Peer events delivered on a channel ([`Receiver::peer_events`]):
/// derefs to the [`std::sync::mpsc::Receiver`]; dropping it stops the
/// watching thread (within 200 ms).
#[derive(Debug)]
pub struct PeerEvents {
    rx: std::sync::mpsc::Receiver<crate::route::watch::PeerEvent>,
    closed: Arc<AtomicBool>,
}

impl std::ops::Deref for PeerEvents {
    type Target = std::sync::mpsc::Receiver<crate::route::watch::PeerEvent>;
    fn deref(&self) -> &Self::Target {
        &self.rx
    }
}

impl Drop for PeerEvents {
    fn drop(&mut self) {
        self.closed.store(true, Ordering::Release);
    }
}

/// The receiving side: a lock-free ring filled by the reactor thread.
pub struct Receiver {
    ring: rtrb::Consumer<Entry>,
    shared: Arc<Shared>,
    /// A batch being read one message at a time.
    cursor: Option<Cursor>,
    /// This client's id: the `to` of batches.
    local: Name,
    /// The entry vector [`Receiver::receive`] lends out.
    spare: Vec<Entry>,
}

impl std::fmt::Debug for Receiver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Receiver")
            .field("waiting", &self.ring.slots())
            .finish()
    }
}

impl Receiver {
    #[cfg_attr(not(feature = "tokio"), allow(dead_code))]
    pub(crate) fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    /// The next entry off the ring (waking the reactor if it waits for
    /// room).
    fn pop_entry(&mut self) -> Option<Entry> {
        let e = self.ring.pop().ok()?;
        self.popped(e.bytes());
        Some(e)
    }

    /// `bytes` left the ring: the byte count goes down before the gate is
    /// looked at, so a reactor that announces its wait after this sees
    /// the room (the gate's argument, for bytes as for slots).
    fn popped(&self, bytes: usize) {
        self.shared.ring_bytes.fetch_sub(bytes, Ordering::AcqRel);
        if self.shared.gate.consumer_popped() {
            self.shared.waker.wake();
        }
    }

    pub(crate) fn pop(&mut self) -> Option<Message> {
        loop {
            if let Some(c) = &mut self.cursor {
                if let Some(m) = c.next_message(&self.local) {
                    if c.is_done() {
                        self.cursor = None;
                    }
                    return Some(m);
                }
                self.cursor = None;
            }
            match self.pop_entry()? {
                Entry::One(m) => return Some(m),
                batch => self.cursor = Some(Cursor::new(batch)),
            }
        }
    }

    /// Waits up to `timeout` (zero: not at all) for messages, then lends
    /// out every message waiting, in arrival order, borrowed from the
    /// receive buffers (as [`Client::receive`] does inline: no allocation,
    /// reference count or copy per message).
    pub fn receive(&mut self, timeout: Duration) -> Received<'_> {
        let mut entries = std::mem::take(&mut self.spare);
        if let Some(mut c) = self.cursor.take() {
            c.drain_into(&self.local, &mut entries);
        }
        let deadline = Instant::now() + timeout;
        loop {
            let mut bytes = 0;
            let mut drained = false;
            loop {
                match self.ring.pop() {
                    Ok(e) => {
                        bytes += e.bytes();
                        entries.push(e);
                    }
                    Err(_) if !drained && entries.is_empty() => {
                        drained = true;
                        self.shared.drain_ready();
                    }
                    Err(_) => break,
                }
            }
            if bytes > 0 {
                self.popped(bytes);
            }
            if !entries.is_empty() || !self.wait_ready(Some(deadline)) {
                break;
            }
        }
        Received::new(entries, &mut self.spare, &self.local)
    }

    /// Waits for the ring's readiness until `deadline`; false when the
    /// time ran out or the reactor has ended.
    fn wait_ready(&self, deadline: Option<Instant>) -> bool {
        if self.shared.finished.load(Ordering::Acquire) {
            return !self.ring.is_empty();
        }
        let wait = match deadline {
            Some(d) => {
                let now = Instant::now();
                if now >= d {
                    return false;
                }
                (d - now).min(Duration::from_millis(100))
            }
            None => Duration::from_millis(100),
        };
        let ts = crate::wire::timespec(wait);
        let mut fds = [rustix::event::PollFd::new(
            &self.shared.ready,
            rustix::event::PollFlags::IN,
        )];
        let _ = rustix::event::poll(&mut fds, Some(&ts));
        true
    }

    /// A waiting message, if any; never blocks.
    pub fn try_recv(&mut self) -> Option<Message> {
        if let Some(m) = self.pop() {
            return Some(m);
        }
        // Empty: clear readiness, then look again (a push may have raced).
        self.shared.drain_ready();
        self.pop()
    }

    /// Waits up to `timeout` for a message (`None` waits as long as the
    /// reactor runs). `None` when the time ran out or the reactor ended and
    /// the ring is empty.
    pub fn recv_timeout(&mut self, timeout: Duration) -> Option<Message> {
        self.recv_until(Some(Instant::now() + timeout))
    }

    /// Waits for a message; `None` once the reactor has ended and every
    /// message was taken.
    pub fn recv(&mut self) -> Option<Message> {
        self.recv_until(None)
    }

    fn recv_until(&mut self, deadline: Option<Instant>) -> Option<Message> {
        loop {
            if let Some(m) = self.try_recv() {
                return Some(m);
            }
            if !self.wait_ready(deadline) {
                return self.pop();
            }
        }
    }

    /// Moves up to `max` waiting messages into `out`; returns how many.
    pub fn recv_batch(&mut self, out: &mut Vec<Message>, max: usize) -> usize {
        let mut n = 0;
        let mut drained = false;
        while n < max {
            match self.pop() {
                Some(m) => {
                    out.push(m);
                    n += 1;
                }
                // Empty: clear readiness, then look once more (a push may
                // have raced), as `try_recv` does.
                None if !drained => {
                    drained = true;
                    self.shared.drain_ready();
                }
                None => break,
            }
        }
        n
    }

    /// Peer events of this client's route on a channel, fed by a thread of
    /// their own (a [`crate::route::watch::PeerWatch`] waiting on inotify and the peers'
    /// pidfds); the thread ends when the channel's receiver is dropped or
    /// the route is removed (after reporting every peer as left).
    pub fn peer_events(&self) -> Result<PeerEvents> {
        let (tx, rx) = std::sync::mpsc::channel();
        let closed = self.shared.watch_peers(move |e| tx.send(e).is_ok())?;
        Ok(PeerEvents { rx, closed })
    }

    /// Entries waiting in the ring (messages, or on Binary routes batches
    /// of messages).
    pub fn len(&self) -> usize {
        self.ring.slots()
    }

    /// Whether no message waits.
    pub fn is_empty(&self) -> bool {
        self.ring.is_empty() && self.cursor.is_none()
    }
}

impl Iterator for Receiver {
    type Item = Message;
    fn next(&mut self) -> Option<Message> {
        self.recv()
    }
}

impl AsFd for Receiver {
    /// Readable while messages wait (register it with epoll, mio or
    /// tokio's `AsyncFd`, then drain with [`Receiver::try_recv`]).
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.shared.ready.as_fd()
    }
}

/// Controls the reactor thread.
pub struct ReactorHandle {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for ReactorHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReactorHandle")
            .field("id", &self.shared.id)
            .finish()
    }
}

impl ReactorHandle {
    /// Sends everything queued, disconnects (socket removed, `.stats`
    /// written) and returns the disconnect's result. Messages that arrive
    /// meanwhile stay readable from the [`Receiver`].
    pub fn shutdown(mut self) -> Result<()> {
        self.stop()
    }

    /// Asks the reactor to end (it sends what is queued, then disconnects).
    pub(crate) fn request_stop(&self) {
        self.shared.stop.store(true, Ordering::Release);
        self.shared.waker.wake();
    }

    fn stop(&mut self) -> Result<()> {
        self.request_stop();
        match self.thread.take() {
            Some(t) => {
                let _ = t.join();
                self.shared.outcome.wait()
            }
            None => Ok(()),
        }
    }

    /// The reactor's result once it has ended (after
    /// [`ReactorHandle::request_stop`]); the task is woken when it ends.
    #[cfg_attr(not(feature = "tokio"), allow(dead_code))]
    pub(crate) fn poll_stopped(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<()>> {
        if self.thread.is_none() {
            return std::task::Poll::Ready(Ok(()));
        }
        let r = std::task::ready!(self.shared.outcome.poll(cx));
        // The outcome is set as the thread's last act: this join is short.
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        std::task::Poll::Ready(r)
    }

    /// Whether the reactor thread still runs.
    pub fn is_running(&self) -> bool {
        !self.shared.finished.load(Ordering::Acquire)
    }
}

impl Drop for ReactorHandle {
    fn drop(&mut self) {
        if let Err(e) = self.stop() {
            log::warn!("ConnectionUnix: threaded client shutdown: {e}");
        }
    }
}

/// The reactor thread's last act, on return or unwind alike: no command
/// is left unanswered, readers and waiting senders are woken, and the
/// outcome is set.
struct Finish {
    shared: Arc<Shared>,
    result: Option<Result<()>>,
}

impl Drop for Finish {
    fn drop(&mut self) {
        let s = &self.shared;
        s.closing.close();
        s.refuse_queued();
        s.finished.store(true, Ordering::Release);
        s.signal_ready();
        s.room.wake_all();
        s.outcome
            .set(self.result.take().unwrap_or(Err(Error::ReactorPanicked)));
    }
}

/// A frame waiting to be written (for an acknowledgement) or for room.
struct Pending {
    peer: Arc<str>,
    frame: Option<Bytes>,
    count: u32,
    ack: Option<Reply<()>>,
    written: Option<(ConnId, u64)>,
}

/// A [`Cmd::Flush`] waiting for its connections' bytes to be written.
struct FlushWait {
    ack: Reply<()>,
    targets: Vec<(ConnId, u64)>,
}

struct Worker {
    client: Client,
    shared: Arc<Shared>,
    ring: rtrb::Producer<Entry>,
    /// Received entries the ring had no room for yet.
    spill: VecDeque<Entry>,
    batch: Vec<Entry>,
    /// Frames in order, stalled on a full outbox. While any is stalled the
    /// reactor takes no more commands: the bounded command queue then
    /// fills and senders wait (or see `WouldBlock`), so memory stays
    /// bounded by the queue and the outboxes.
    pending: VecDeque<Pending>,
    /// Frames written to an outbox, awaiting their acknowledgement.
    acks: Vec<Pending>,
    flushes: Vec<FlushWait>,
}

impl Worker {
    fn fail(&self, p: Pending, e: Error) {
        match p.ack {
            Some(a) => a.set(Err(e)),
            None => {
                self.shared.record_failure(&p.peer, e.to_string());
            }
        }
    }

    /// Queues stalled frames in order; stops at the first that still does
    /// not fit.
    fn place_pending(&mut self) {
        while let Some(mut p) = self.pending.pop_front() {
            let Some(frame) = p.frame.take() else {
                continue;
            };
            match self.client.queue_frame(&p.peer, frame, p.count) {
                Ok(Ok(Some(w))) => {
                    if p.ack.is_some() {
                        p.written = Some(w);
                        self.acks.push(p);
                    }
                }
                Ok(Ok(None)) => {
                    if let Some(a) = p.ack {
                        a.set(Ok(()));
                    }
                }
                Ok(Err(frame)) => {
                    p.frame = Some(frame);
                    self.pending.push_front(p);
                    return;
                }
                Err(e) => self.fail(p, e),
            }
        }
    }

    /// Takes commands while no frame is stalled; true if it took any.
    fn take_commands(&mut self) -> bool {
        self.place_pending();
        let mut took = false;
        while self.pending.is_empty() {
            let Some(cmd) = self.shared.pop() else {
                break;
            };
            took = true;
            self.run_command(cmd);
        }
        if took {
            self.shared.room.notify();
        }
        took
    }

    fn run_command(&mut self, cmd: Cmd) {
        match cmd {
            Cmd::Frame {
                peer,
                frame,
                count,
                ack,
            } => {
                self.pending.push_back(Pending {
                    peer,
                    frame: Some(frame),
                    count,
                    ack,
                    written: None,
                });
                self.place_pending();
            }
            Cmd::Fds {
                peer,
                frame,
                fds,
                ack,
            } => {
                // No frame is stalled (commands are taken only then), so
                // the message goes right behind its `FDS` frame.
                if let Err(e) = self.client.pass_fds(&peer, fds) {
                    ack.set(Err(e));
                    return;
                }
                self.pending.push_back(Pending {
                    peer,
                    frame: Some(frame),
                    count: 1,
                    ack: Some(ack),
                    written: None,
                });
                self.place_pending();
            }
            Cmd::Connect { peer, ack } => ack.set(self.client.ensure_connection(&peer)),
            Cmd::Flush { ack } => {
                let targets = self.client.flush_targets();
                self.flushes.push(FlushWait { ack, targets });
            }
            Cmd::Stats { ack } => ack.set(Ok(self.client.stats().clone())),
            Cmd::Broadcast { content, ack } => ack.set(self.client.broadcast_json(&content)),
            Cmd::Requeue { msgs, ack } => ack.set(self.client.requeue_message(&msgs)),
        }
    }

    fn settle_acks(&mut self) {
        let mut i = 0;
        while i < self.acks.len() {
            let Some((id, target)) = self.acks[i].written else {
                i += 1;
                continue;
            };
            match self.client.frame_outcome(id, target) {
                Some(r) => {
                    let p = self.acks.swap_remove(i);
                    if let Some(a) = p.ack {
                        a.set(r);
                    }
                }
                None => i += 1,
            }
        }
        let mut i = 0;
        while i < self.flushes.len() {
            let f = &mut self.flushes[i];
            let mut failed = None;
            let client = &mut self.client;
            f.targets
                .retain(|&(id, target)| match client.frame_outcome(id, target) {
                    None => true,
                    Some(Ok(())) => false,
                    Some(Err(e)) => {
                        failed.get_or_insert(e);
                        false
                    }
                });
            if failed.is_some() || f.targets.is_empty() {
                let f = self.flushes.swap_remove(i);
                f.ack.set(failed.map_or(Ok(()), Err));
            } else {
                i += 1;
            }
        }
    }

    fn waiting_on_writes(&self) -> bool {
        !self.pending.is_empty() || !self.acks.is_empty() || !self.flushes.is_empty()
    }

    /// One entry into the ring, within its slots and its byte budget (an
    /// empty ring takes any entry); the entry comes back if it does not
    /// fit.
    fn push(&mut self, e: Entry) -> Option<Entry> {
        let bytes = e.bytes();
        let held = self.shared.ring_bytes.load(Ordering::Acquire);
        if held > 0 && held + bytes > self.shared.ring_bytes_limit {
            return Some(e);
        }
        // Counted before it is visible to the reader, which subtracts it.
        self.shared.ring_bytes.fetch_add(bytes, Ordering::AcqRel);
        match self.ring.push(e) {
            Ok(()) => None,
            Err(rtrb::PushError::Full(e)) => {
                self.shared.ring_bytes.fetch_sub(bytes, Ordering::AcqRel);
                Some(e)
            }
        }
    }

    /// Moves received messages into the ring until it is full or nothing
    /// is left; true if it filled up.
    fn fill_ring(&mut self) -> Result<bool> {
        let mut pushed = false;
        loop {
            if self.spill.is_empty() {
                // Taking the inbox also lifts a paused receive.
                self.client.take_received(&mut self.batch)?;
                self.spill.extend(self.batch.drain(..));
                if self.spill.is_empty() {
                    break;
                }
            }
            while let Some(m) = self.spill.pop_front() {
                match self.push(m) {
                    None => pushed = true,
                    Some(m) => {
                        // Announce the wait, then look again: the reader
                        // may have made room before it could see the flag.
                        self.shared.gate.producer_blocked();
                        match self.push(m) {
                            None => pushed = true,
                            Some(m) => {
                                self.spill.push_front(m);
                                break;
                            }
                        }
                    }
                }
            }
            if !self.spill.is_empty() {
                break;
            }
        }
        // One eventfd write per delivered batch (not per message): the
        // reader drains it only after seeing the ring empty, so a batch can
        // never be stranded behind a consumed signal.
        if pushed {
            self.shared.signal_ready();
        }
        Ok(!self.spill.is_empty())
    }

    fn run(mut self) -> Result<()> {
        self.client.moved_to_this_thread();
        let result = self.serve();
        // No sender gets in after this; those handing a command over
        // finish first (`Shared::hand_over`), and what they pushed is
        // taken below.
        self.shared.closing.close();
        self.shared.room.wake_all();
        // Queued frames go out before disconnecting.
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            self.take_commands();
            self.settle_acks();
            if (self.shared.cmds.is_empty() && !self.waiting_on_writes())
                || Instant::now() >= deadline
            {
                break;
            }
            let _ = self.client.turn(Some(Duration::from_millis(10)));
        }
        for p in std::mem::take(&mut self.pending)
            .into_iter()
            .chain(std::mem::take(&mut self.acks))
        {
            self.fail(p, self.shared.disconnected());
        }
        for f in self.flushes.drain(..) {
            f.ack.set(Err(self.shared.disconnected()));
        }
        self.shared.refuse_queued();
        let _ = self.fill_ring();
        let mut spill = std::mem::take(&mut self.spill);
        let ring = &mut self.ring;
        let mut lost = 0usize;
        let shared = self.shared.clone();
        // Past the byte budget now (the reactor is ending): only the
        // ring's slots limit these, and the byte count stays exact.
        let last_push = move |ring: &mut rtrb::Producer<Entry>, e: Entry| -> usize {
            let bytes = e.bytes();
            shared.ring_bytes.fetch_add(bytes, Ordering::AcqRel);
            match ring.push(e) {
                Ok(()) => 0,
                Err(rtrb::PushError::Full(e)) => {
                    shared.ring_bytes.fetch_sub(bytes, Ordering::AcqRel);
                    e.count()
                }
            }
        };
        let mut late = |_: &Client, msgs: Vec<Message>| {
            for m in msgs {
                spill.push_back(Entry::One(m));
            }
            while let Some(m) = spill.pop_front() {
                lost += last_push(ring, m);
            }
        };
        let closed = self.client.disconnect(Some(&mut late));
        while let Some(m) = spill.pop_front() {
            lost += last_push(&mut self.ring, m);
        }
        self.shared.signal_ready();
        result?;
        closed?;
        if lost > 0 {
            return Err(Error::MessagesWaiting {
                id: self.shared.id.clone(),
            });
        }
        Ok(())
    }

    fn serve(&mut self) -> Result<()> {
        while !self.shared.stop.load(Ordering::Acquire) {
            self.take_commands();
            self.client.flush();
            self.settle_acks();
            let full = self.fill_ring()?;
            let busy = self.pending.is_empty() && !self.shared.cmds.is_empty();
            // Sleep until I/O or a wake; a full ring is woken by the reader.
            let wait = if busy {
                Some(Duration::ZERO)
            } else if self.waiting_on_writes() || full {
                Some(Duration::from_millis(50))
            } else {
                None
            };
            self.client.turn(wait)?;
        }
        Ok(())
    }
}

impl Client {
    /// Moves this client's reactor onto its own thread (default queue
    /// sizes).
    pub fn into_threaded(self) -> Result<(Sender, Receiver, ReactorHandle)> {
        self.into_threaded_with(ThreadedOptions::default())
    }

    /// Moves this client's reactor onto its own thread.
    pub fn into_threaded_with(
        mut self,
        opts: ThreadedOptions,
    ) -> Result<(Sender, Receiver, ReactorHandle)> {
        self.set_inbox_limit(opts.inbox_limit);
        self.set_spin_on_sockets(opts.spin_on_sockets);
        let ready = rustix::event::eventfd(
            0,
            rustix::event::EventfdFlags::CLOEXEC | rustix::event::EventfdFlags::NONBLOCK,
        )
        .map_err(|e| Error::io("Cannot create the receive ring's eventfd", e))?;
        let shared = Arc::new(Shared {
            cmds: ArrayQueue::new(opts.send_queue.max(1)),
            waker: self.waker(),
            stop: AtomicBool::new(false),
            closing: CloseGate::default(),
            room: Room::default(),
            queued_bytes: AtomicUsize::new(0),
            queued_bytes_limit: opts.send_queue_bytes.max(1),
            outcome: Ack::new(),
            gate: RingGate::default(),
            ring_bytes: AtomicUsize::new(0),
            ring_bytes_limit: opts.ring_bytes.max(1),
            finished: AtomicBool::new(false),
            ready,
            failures: Mutex::new(HashMap::new()),
            failed: AtomicUsize::new(0),
            id: self.id().to_string(),
            serializer: self.serializer().clone(),
            route: self.route().clone(),
            disk: self.on_disk().to_string(),
        });
        let (producer, consumer) = rtrb::RingBuffer::new(opts.ring_capacity.max(1));
        let local = self.local_name();
        let worker = Worker {
            client: self,
            shared: shared.clone(),
            ring: producer,
            spill: VecDeque::new(),
            batch: Vec::new(),
            pending: VecDeque::new(),
            acks: Vec::new(),
            flushes: Vec::new(),
        };
        let done = shared.clone();
        let thread = std::thread::Builder::new()
            .name(format!("ipcm-{}", shared.id))
            .spawn(move || {
                let mut finish = Finish {
                    shared: done,
                    result: None,
                };
                finish.result = Some(worker.run());
            })
            .map_err(|e| Error::io("Cannot start the reactor thread", e))?;
        Ok((
            Sender {
                shared: shared.clone(),
                arena: BytesMut::new(),
                known: HashSet::new(),
            },
            Receiver {
                ring: consumer,
                shared: shared.clone(),
                cursor: None,
                local,
                spare: Vec::new(),
            },
            ReactorHandle {
                shared,
                thread: Some(thread),
            },
        ))
    }
}
