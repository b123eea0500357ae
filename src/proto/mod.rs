//! The sans-IO protocol core: the connection table, the hello handshake,
//! connection replacement, framing, bounded outboxes and statistics.
//!
//! Nothing here makes a syscall. A reactor feeds the core completions
//! ("these bytes arrived", "n bytes were written", "a connection was
//! accepted") and asks it, per connection, whether to arm a receive, what to
//! write and what to close. The core never assumes readiness semantics: a
//! receive or send is an operation that is started and later completes,
//! which is what both epoll (emulated) and io_uring (native) provide.

mod deadlines;
mod inbox;
mod lane;
mod outbox;
mod sockbuf;
mod stats;

use std::io;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use slab::Slab;

use crate::message::{ByteStr, IdSeq, Message, Name, coarse_stamp};
use crate::serializer::{DecodeError, Serializer, binary};
use crate::wire::{BufferPool, FrameDecoder, HEADER_LEN, RecvInto, build_frame};
use deadlines::AcceptBackoff;
#[cfg(test)]
use deadlines::{ACCEPT_RETRY_MAX, ACCEPT_RETRY_MIN, ACCEPT_WARN_QUIET};
pub use inbox::{Cursor, Entry, IdText, Iter, MessageRef, Received, RecvBatch};
pub use lane::{LaneConfig, LaneKind};
pub use outbox::{Appended, Outbox};
pub use sockbuf::SocketHint;
pub use stats::Stats;

/// Identifies one connection: a slab slot plus a generation, so a late
/// completion for a closed connection never reaches its slot's successor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConnId(u64);

impl ConnId {
    fn new(slot: usize, generation: u32) -> Self {
        ConnId(((generation as u64) << 32) | slot as u64)
    }

    /// The slab slot (stable while the connection is open).
    pub fn slot(self) -> usize {
        (self.0 & 0xFFFF_FFFF) as usize
    }

    fn generation(self) -> u32 {
        (self.0 >> 32) as u32
    }

    /// The value stored in kernel user-data fields.
    pub fn as_u64(self) -> u64 {
        self.0
    }

    /// Rebuilds an id from [`ConnId::as_u64`].
    pub fn from_u64(v: u64) -> Self {
        ConnId(v)
    }
}

/// Limits of the core.
#[derive(Debug, Clone)]
pub struct CoreConfig {
    /// Largest payload accepted from a peer.
    pub max_frame: usize,
    /// Bytes a connection's outbox may hold before sends wait or fail.
    pub outbox_limit: usize,
    /// Size of one pooled receive buffer.
    pub buf_size: usize,
    /// Payload bytes of received, undelivered messages above which the core
    /// stops receiving (backpressure to senders) until they are taken.
    /// This also bounds one `get_messages` batch, to the limit plus one
    /// receive buffer (or one larger frame): 4 MiB by default, which keeps
    /// a batch cache-sized (PERFORMANCE.md has what larger batches cost).
    /// What is already
    /// read beyond it waits in the reactor for the next call, and the
    /// client's `handles_for_select` descriptor turns readable for it.
    pub inbox_limit: usize,
    /// How long an accepted connection may stay silent before its hello.
    pub hello_timeout: Duration,
    /// `SO_SNDBUF` asked for on a connection's socket while it carries
    /// large messages (1 KiB and up; `None`: never, the system default
    /// `net.core.wmem_default` always). The kernel caps it at
    /// `net.core.wmem_max` and doubles it for its own overhead. A bigger
    /// buffer lets a sender of large messages run further ahead of its
    /// reader, so both sides make fewer system calls and sleep less
    /// (6–15 % more messages a second at 1 KiB and 16 KiB); for small
    /// messages it costs as much, so a connection gives it back after
    /// 4,096 small messages in a row (docs/architecture.md, "Socket send
    /// buffers"). It bounds the kernel's memory for the connection, on top
    /// of [`CoreConfig::outbox_limit`], while the peer does not read.
    pub socket_send_buffer: Option<usize>,
    /// The shared-memory lane between ipcm peers.
    pub lane: LaneConfig,
}

/// [`CoreConfig::socket_send_buffer`] by default: 1 MiB.
pub const DEFAULT_SOCKET_SEND_BUFFER: usize = 1024 * 1024;

impl Default for CoreConfig {
    fn default() -> Self {
        CoreConfig {
            max_frame: crate::wire::DEFAULT_MAX_FRAME,
            outbox_limit: 16 * 1024 * 1024,
            buf_size: crate::wire::DEFAULT_BUF_SIZE,
            inbox_limit: 4 * 1024 * 1024,
            hello_timeout: Duration::from_secs(30),
            socket_send_buffer: Some(DEFAULT_SOCKET_SEND_BUFFER),
            lane: LaneConfig::default(),
        }
    }
}

/// Who opened a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// We connected and sent the hello.
    Initiator,
    /// The peer connected to our listening socket.
    Acceptor,
}

#[derive(Debug)]
struct Conn {
    generation: u32,
    /// `None` while an accepted connection waits for its hello.
    peer: Option<ByteStr>,
    role: Role,
    decoder: FrameDecoder,
    outbox: Outbox,
    recv_in_flight: bool,
    send_in_flight: bool,
    last_activity: f64,
    /// Messages queued on it and not yet added to the `sent` statistics,
    /// and batched messages read from it not yet added to `read` (both
    /// added when the statistics are read or the connection closes, not
    /// per message: a map lookup by name was a twentieth of a round trip
    /// over a lane).
    uncounted: u64,
    read_uncounted: u64,
    /// Bytes carried both ways, counted until a lane is asked for.
    traffic: u64,
    /// A lane was asked for (or cannot be).
    lane_tried: bool,
    /// The peer process and user (`SO_PEERCRED`, read when the connection
    /// is attached, with the lane enabled): large payloads and descriptors
    /// go to that process's beacon.
    lane_peer: Option<(i32, u32)>,
    /// The peer process has no beacon (a Perl client, or ipcm with the
    /// lane off): large payloads on the socket go whole, without asking
    /// again.
    beaconless: bool,
    /// Descriptors for the next message from this connection (an `FDS`
    /// frame came before it).
    next_fds: Option<Vec<std::os::fd::OwnedFd>>,
    /// The shared-memory lane, once offered.
    lane: Option<Box<lane::ConnLane>>,
    /// Writing failed because the peer closed: nothing more is written,
    /// and what it sent before is read (whatever the inbox limit) until
    /// its end of stream closes the connection with this error.
    write_failed: Option<io::Error>,
}

/// Why a connection went away, for the one who asked to send on it.
#[derive(Debug)]
pub struct Closed {
    /// The connection.
    pub id: ConnId,
    /// The peer, if the hello had been seen.
    pub peer: Option<ByteStr>,
    /// The write error that closed it, if any.
    pub write_error: Option<io::Error>,
    /// Bytes written on it before it closed (see [`Core::written_total`]).
    pub written_total: u64,
}

/// Closes [`Core::closed_written`] remembers (a few KiB per client).
const CLOSED_HISTORY: usize = 256;

/// The buffer a receive fills.
#[derive(Debug)]
pub enum RecvBuf {
    /// Any pooled buffer, picked when data arrives (the connection holds
    /// no partial frame).
    Pooled,
    /// These buffers, the first of which holds a partial frame; new bytes
    /// go after it (see [`RecvInto`]).
    Partial(RecvInto),
}

impl RecvBuf {
    /// Gives a partial buffer back to the pool (a receive that will not
    /// start: its connection is gone).
    pub(crate) fn give_back(self, pool: &mut BufferPool) {
        if let RecvBuf::Partial(b) = self {
            b.give_back(pool);
        }
    }

    /// Where to receive: the lent buffers, or a fresh pooled one.
    pub(crate) fn into_target(self, pool: &mut BufferPool) -> RecvInto {
        match self {
            RecvBuf::Partial(b) => b,
            RecvBuf::Pooled => RecvInto::fresh(pool.take_recv(), pool),
        }
    }
}

/// Frames that moved from one connection's outbox to another's: byte
/// positions above `from_total` on `from` continue at `to_base` on `to`.
#[derive(Debug, Clone, Copy)]
struct Move {
    from: ConnId,
    from_total: u64,
    to: ConnId,
    to_base: u64,
}

/// Outcome of queueing a frame.
#[derive(Debug, PartialEq, Eq)]
pub enum Enqueue {
    /// Queued; the value is the connection's byte count after this frame
    /// (compare with [`Core::written_total`]).
    Queued(u64),
    /// The outbox has no room; nothing was queued, and the frame comes
    /// back.
    Full {
        /// Bytes already queued.
        queued: usize,
        /// The frame, for a later try.
        frame: Bytes,
    },
    /// No such connection.
    Gone,
}

/// Outcome of appending a message to a connection's batch.
#[derive(Debug, PartialEq, Eq)]
pub enum Append {
    /// In the connection's open batch.
    Queued,
    /// The outbox has no room; nothing was appended.
    Full {
        /// Bytes already queued.
        queued: usize,
    },
    /// No such connection.
    Gone,
}

/// The protocol state machine of one client.
#[derive(Debug)]
pub struct Core {
    cfg: CoreConfig,
    serializer: Serializer,
    conns: Slab<Conn>,
    next_generation: u32,
    /// Messages read since the last stats update: their `from` and count.
    read_run: Option<(crate::message::Name, u64)>,
    /// Live connection per peer name (FxHash: the names come from this
    /// user's own processes, so no flooding to defend against).
    by_peer: rustc_hash::FxHashMap<ByteStr, usize>,
    /// Changes whenever `by_peer` does (see [`Core::peers_epoch`]).
    peers_epoch: u64,
    inbox: Vec<Entry>,
    inbox_bytes: usize,
    /// Where the record indexes of received batches are carved from
    /// ([`binary::CheckedBatch::parse_indexed`]).
    index_blocks: BufferPool,
    /// Address ranges of what the ring just read that its copy found all
    /// ASCII (`ring::Consumer::pop_into`): set only while that reading's
    /// frames are decoded, empty otherwise, so that a batch's UTF-8 check
    /// skips what the copy already checked.
    lane_ascii: Vec<std::ops::Range<usize>>,
    /// This client's id: the `to` of the batches it receives.
    local: Name,
    /// Ids of the batches it sends.
    ids: IdSeq,
    paused: bool,
    stats: Stats,
    dirty: Vec<ConnId>,
    /// Open connections that a newer one from the same peer replaced.
    retired: usize,
    /// Recent moves of unstarted frames between connections (see
    /// [`Core::locate`]).
    moves: std::collections::VecDeque<Move>,
    to_close: Vec<ConnId>,
    closed: Vec<Closed>,
    /// The last [`CLOSED_HISTORY`] closes: connection, bytes written, and
    /// the write error's number. Whether a frame went out before its
    /// connection closed can still be told after [`Core::take_closed`]
    /// handed the record to someone else (a receive's warning, say).
    closed_history: std::collections::VecDeque<(ConnId, u64, Option<i32>)>,
    arena: BytesMut,
    /// Retired send arenas, reclaimed once their frames are all written.
    arenas: crate::wire::BufferPool,
    /// Accepted connections in order of arrival, for the hello timeout
    /// (those resolved or closed since are skipped when reached).
    unresolved: std::collections::VecDeque<(Instant, ConnId)>,
    /// Accepting is backed off after a failure (see [`Core::on_accept_error`]).
    accept: AcceptBackoff,
    /// Initiators' connections that want a lane (for the reactor).
    lane_wanted: Vec<ConnId>,
    /// Lane offers received (for the reactor): connection, nonce, capacity.
    lane_offers: Vec<(ConnId, [u8; 16], u32)>,
    /// Connections with an established lane.
    lanes: Vec<ConnId>,
    /// What the reactor is to tell connections' sockets or its backend:
    /// quiet or loud again (a lane came up or went down), large send
    /// buffer or default (see [`SocketHint`]).
    socket_hints: Vec<(ConnId, SocketHint)>,
    /// Lane connections whose ring broke, to be closed.
    lane_broken: Vec<ConnId>,
    /// Our offers awaiting an answer.
    lane_offers_out: Vec<ConnId>,
    /// When the lanes are next looked at for idleness (see
    /// [`LaneConfig::release_after`](crate::proto::LaneConfig)).
    lane_check_at: Option<Instant>,
    /// Lanes whose peer released its ring: ours follows once our outbox
    /// has all gone into it.
    lane_releasing: Vec<ConnId>,
    /// Connections holding descriptors for their next message (the one
    /// check the message path makes for them).
    fds_waiting: usize,
}

impl Core {
    /// A core with no connections.
    pub fn new(serializer: Serializer, cfg: CoreConfig) -> Self {
        Core {
            cfg,
            serializer,
            conns: Slab::new(),
            next_generation: 1,
            by_peer: rustc_hash::FxHashMap::default(),
            peers_epoch: 0,
            read_run: None,
            inbox: Vec::new(),
            inbox_bytes: 0,
            index_blocks: BufferPool::new(binary::INDEX_BLOCK, 4),
            lane_ascii: Vec::new(),
            local: Name::copy_from(""),
            ids: IdSeq::new(),
            paused: false,
            stats: Stats::default(),
            dirty: Vec::new(),
            retired: 0,
            moves: std::collections::VecDeque::new(),
            to_close: Vec::new(),
            closed: Vec::new(),
            closed_history: std::collections::VecDeque::new(),
            arena: BytesMut::new(),
            arenas: crate::wire::BufferPool::new(64 * 1024, 4),
            unresolved: std::collections::VecDeque::new(),
            accept: AcceptBackoff::default(),
            lane_wanted: Vec::new(),
            lane_offers: Vec::new(),
            socket_hints: Vec::new(),
            lanes: Vec::new(),
            lane_broken: Vec::new(),
            lane_offers_out: Vec::new(),
            lane_check_at: None,
            lane_releasing: Vec::new(),
            fds_waiting: 0,
        }
    }

    /// Sets this client's id (the recipient of the batches it receives).
    pub fn set_local_id(&mut self, id: &str) {
        self.local = Name::copy_from(id);
    }

    /// The limits in force.
    pub fn config(&self) -> &CoreConfig {
        &self.cfg
    }

    /// Statistics so far (queued messages, and batched messages read, are
    /// added by [`Core::count_queued`]).
    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    /// Adds every connection's queued messages to the `sent` statistics,
    /// and the batched messages read from it to `read`.
    pub fn count_queued(&mut self) {
        let Core { conns, stats, .. } = self;
        for (_, c) in conns.iter_mut() {
            fold_counts(stats, c);
        }
    }

    /// Mutable statistics (reconnect loads them; disconnect adjusts them).
    pub fn stats_mut(&mut self) -> &mut Stats {
        &mut self.stats
    }

    fn insert(&mut self, peer: Option<ByteStr>, role: Role) -> ConnId {
        let generation = self.next_generation;
        self.next_generation = self.next_generation.wrapping_add(1).max(1);
        let slot = self.conns.insert(Conn {
            generation,
            peer,
            role,
            decoder: FrameDecoder::new(self.cfg.max_frame),
            outbox: Outbox::default(),
            recv_in_flight: false,
            send_in_flight: false,
            last_activity: coarse_stamp(),
            uncounted: 0,
            read_uncounted: 0,
            traffic: 0,
            lane_tried: false,
            lane_peer: None,
            beaconless: false,
            next_fds: None,
            lane: None,
            write_failed: None,
        });
        let id = ConnId::new(slot, generation);
        self.dirty.push(id);
        id
    }

    fn get(&self, id: ConnId) -> Option<&Conn> {
        self.conns
            .get(id.slot())
            .filter(|c| ConnId::new(id.slot(), c.generation) == id)
    }

    fn get_mut(&mut self, id: ConnId) -> Option<&mut Conn> {
        conn_mut(&mut self.conns, id)
    }

    fn id_of(&self, slot: usize) -> ConnId {
        ConnId::new(slot, self.conns[slot].generation)
    }

    /// Registers a connection we opened to `peer` and queues our hello as
    /// its first frame. An existing live connection to `peer` is retired.
    pub fn add_initiator(&mut self, peer: &str, own_id: &str) -> ConnId {
        if self.by_peer.contains_key(peer) {
            // The new connection becomes the live one; the old is retired
            // (see `resolve_hello`).
            self.retired += 1;
        }
        let peer = ByteStr::copy_from(peer);
        let id = self.insert(Some(peer.clone()), Role::Initiator);
        self.by_peer.insert(peer, id.slot());
        self.peers_epoch += 1;
        let ser = self.serializer.clone();
        let hello = build_frame::<crate::Error>(&mut self.arena, |b| {
            ser.encode_hello(own_id, b);
            Ok(())
        });
        if let (Ok(frame), Some(c)) = (hello, self.get_mut(id)) {
            c.outbox.push(frame);
        }
        id
    }

    /// Registers a connection accepted at `now`; it stays unresolved until
    /// its hello, and is closed if none comes within
    /// [`CoreConfig::hello_timeout`] (see [`Core::handle_timeout`]). Also
    /// ends an accept back-off episode.
    pub fn add_acceptor(&mut self, now: Instant) -> ConnId {
        self.on_accepted(now);
        let id = self.insert(None, Role::Acceptor);
        self.unresolved.push_back((now, id));
        id
    }

    /// A count that changes whenever a peer's live connection does: an
    /// answer of [`Core::conn_for`] holds while it stays the same.
    #[inline]
    pub fn peers_epoch(&self) -> u64 {
        self.peers_epoch
    }

    /// The open connection to `peer`, if any.
    pub fn conn_for(&self, peer: &str) -> Option<ConnId> {
        self.by_peer.get(peer).map(|&s| self.id_of(s))
    }

    /// Whether `id` is still open.
    pub fn is_open(&self, id: ConnId) -> bool {
        self.get(id).is_some()
    }

    /// The peer of a connection, once known.
    pub fn peer_of(&self, id: ConnId) -> Option<&str> {
        self.get(id).and_then(|c| c.peer.as_deref())
    }

    /// Sorted ids of resolved connections (unresolved ones are hidden: docs/perl-differences.md, unresolved-connections).
    pub fn connections(&self) -> Vec<String> {
        let mut v: Vec<String> = self.by_peer.keys().map(|k| k.to_string()).collect();
        v.sort();
        v
    }

    /// Every open connection (resolved or not).
    pub fn all_conns(&self) -> Vec<ConnId> {
        self.conns
            .iter()
            .map(|(s, c)| ConnId::new(s, c.generation))
            .collect()
    }

    /// Receive-buffer capacity held by all connections' decoders.
    #[cfg_attr(not(feature = "unstable"), allow(dead_code))]
    pub fn receive_capacity(&self) -> usize {
        self.conns.iter().map(|(_, c)| c.decoder.capacity()).sum()
    }

    /// Number of open connections, unresolved ones included.
    pub fn conn_count(&self) -> usize {
        self.conns.len()
    }

    /// Activity time of the connection to `peer`.
    pub fn last_activity(&self, peer: &str) -> Option<f64> {
        self.conn_for(peer)
            .and_then(|id| self.get(id))
            .map(Core::activity)
    }

    /// Overrides the activity time of the connection to `peer`.
    pub fn set_last_activity(&mut self, peer: &str, at: f64) -> bool {
        match self.conn_for(peer) {
            Some(id) => {
                if let Some(c) = self.get_mut(id) {
                    Core::set_activity(c, at);
                }
                true
            }
            None => false,
        }
    }

    /// Closes connections idle since before `now - max_idle` (strictly),
    /// unresolved ones included; returns how many.
    pub fn close_idle(&mut self, max_idle: f64) -> usize {
        let cutoff = coarse_stamp() - max_idle;
        let idle: Vec<ConnId> = self
            .conns
            .iter()
            .filter(|(_, c)| Core::activity(c) < cutoff)
            .map(|(s, c)| ConnId::new(s, c.generation))
            .collect();
        for id in &idle {
            self.close(*id, None);
        }
        idle.len()
    }

    /// Closes a connection; the reactor learns of it via [`Core::take_closed_ids`].
    pub fn close(&mut self, id: ConnId, write_error: Option<io::Error>) {
        if self.get(id).is_none() {
            return;
        }
        if write_error.is_some() && self.lane_to_drain(id) {
            // What the peer published in its ring is not lost with the
            // socket (a write error may come before the peer's EOF). A
            // close of our own (shutdown, idle, `close_peer`) leaves it
            // unread, as it leaves unread bytes in the socket: not counted
            // as read, never half delivered.
            let mut pool = BufferPool::new(self.cfg.buf_size, 0);
            self.drain_lane(id, &mut pool);
            if self.get(id).is_none() {
                return;
            }
        }
        let mut conn = self.conns.remove(id.slot());
        if conn.next_fds.take().is_some() {
            self.fds_waiting -= 1;
        }
        if conn.peer.is_none() {
            self.prune_unresolved();
        }
        conn.outbox.seal(&mut self.ids);
        fold_counts(&mut self.stats, &mut conn);
        let written_total = lane::written_total(&conn);
        log::debug!(
            "ConnectionUnix: closing connection {:?} to '{}' ({:?}, {} bytes written){}",
            id,
            conn.peer.as_deref().unwrap_or("<no hello yet>"),
            conn.role,
            written_total,
            write_error
                .as_ref()
                .map(|e| format!(": {e}"))
                .unwrap_or_default()
        );
        if let Some(peer) = conn.peer.clone() {
            if self.by_peer.get(&peer) == Some(&id.slot()) {
                self.by_peer.remove(&peer);
                self.peers_epoch += 1;
                self.promote_retired(id, &peer, &mut conn);
            } else {
                self.retired -= 1;
            }
        }
        self.to_close.push(id);
        if self.closed_history.len() == CLOSED_HISTORY {
            self.closed_history.pop_front();
        }
        let errno = write_error.as_ref().and_then(io::Error::raw_os_error);
        self.closed_history.push_back((id, written_total, errno));
        self.closed.push(Closed {
            id,
            peer: conn.peer,
            write_error,
            written_total,
        });
    }

    /// For a connection among the last [`CLOSED_HISTORY`] closed: the bytes
    /// written on it before it closed, and its write error's number.
    pub fn closed_written(&self, id: ConnId) -> Option<(u64, Option<i32>)> {
        self.closed_history
            .iter()
            .rev()
            .find(|c| c.0 == id)
            .map(|&(_, written, errno)| (written, errno))
    }

    /// After the live connection to `peer` closed: a retired connection to
    /// the same peer (still open for reading) becomes the live one and takes
    /// the frames no write had started, so they are not lost.
    fn promote_retired(&mut self, from: ConnId, peer: &ByteStr, conn: &mut Conn) {
        if self.retired == 0 {
            return;
        }
        let Some(slot) = self
            .conns
            .iter()
            .find(|(_, c)| c.peer.as_ref() == Some(peer))
            .map(|(s, _)| s)
        else {
            return;
        };
        self.retired -= 1;
        self.by_peer.insert(peer.clone(), slot);
        self.peers_epoch += 1;
        let id = self.id_of(slot);
        let mut runs = Vec::new();
        lane::take_unstarted(conn, &mut self.conns[slot].outbox, &mut runs);
        for &(from_total, to_base) in &runs {
            self.record_move(from, from_total, id, to_base);
        }
        if !runs.is_empty() {
            self.dirty.push(id);
        }
        log::debug!("ConnectionUnix: connection {id:?} to '{peer}' is live again");
    }

    /// Closes every connection to `peer` (the live one and retired ones);
    /// returns whether there was a live one.
    pub fn close_peer(&mut self, peer: &str) -> bool {
        let had = self.by_peer.contains_key(peer);
        let all: Vec<ConnId> = self
            .conns
            .iter()
            .filter(|(_, c)| c.peer.as_deref() == Some(peer))
            .map(|(s, c)| ConnId::new(s, c.generation))
            .collect();
        // Retired ones first, so that none is promoted by the live one's close.
        for id in all.iter().rev() {
            if self.by_peer.get(peer) != Some(&id.slot()) {
                self.close(*id, None);
            }
        }
        for id in all {
            self.close(id, None);
        }
        had
    }

    /// Closes every connection.
    pub fn close_all(&mut self) {
        for id in self.all_conns() {
            self.close(id, None);
        }
    }

    /// Whether [`Core::take_closed_ids`] has any to give (a check the
    /// reactor makes on every dispatch, so it costs two loads).
    #[inline]
    pub fn has_closed_ids(&self) -> bool {
        !self.to_close.is_empty() || !self.lane_broken.is_empty()
    }

    /// Connections the reactor must close (and cancel I/O on).
    pub fn take_closed_ids(&mut self) -> Vec<ConnId> {
        for id in std::mem::take(&mut self.lane_broken) {
            self.close(id, Some(io::Error::other("shared-memory lane corrupt")));
        }
        std::mem::take(&mut self.to_close)
    }

    /// Whether connections went away since the last [`Core::take_closed`].
    #[inline]
    pub fn has_closed(&self) -> bool {
        !self.closed.is_empty()
    }

    /// Why connections went away since the last call.
    pub fn take_closed(&mut self) -> Vec<Closed> {
        std::mem::take(&mut self.closed)
    }

    /// Whether any connection needs operations (re)armed, or closing, or
    /// accepting is to resume.
    pub fn has_operations_to_start(&self) -> bool {
        !self.dirty.is_empty()
            || !self.to_close.is_empty()
            || self.accept.resume
            || !self.lane_broken.is_empty()
    }

    /// Connections whose operations need (re)arming.
    pub fn take_dirty(&mut self, into: &mut Vec<ConnId>) {
        into.append(&mut self.dirty);
    }

    /// Starts a receive on `id`: `None` if none should start now (one is in
    /// flight, the inbox is full, or the connection is gone); otherwise the
    /// buffer to receive into.
    pub fn start_recv(&mut self, id: ConnId, pool: &mut BufferPool) -> Option<RecvBuf> {
        let paused = self.paused;
        let conn = self.get_mut(id)?;
        if (paused && conn.write_failed.is_none()) || conn.recv_in_flight {
            return None;
        }
        conn.recv_in_flight = true;
        Some(match conn.decoder.recv_buf(pool) {
            Some(buf) => RecvBuf::Partial(buf),
            None => RecvBuf::Pooled,
        })
    }

    /// A receive finished: `buf` holds the old bytes (for
    /// [`RecvBuf::Partial`]) followed by the new ones; `Ok(0)` is end of
    /// stream.
    pub fn on_recv(
        &mut self,
        id: ConnId,
        buf: RecvInto,
        result: io::Result<usize>,
        pool: &mut BufferPool,
    ) {
        let Some(conn) = self.get_mut(id) else {
            buf.give_back(pool);
            return;
        };
        conn.recv_in_flight = false;
        conn.decoder.filled(buf);
        let eof = match result {
            Ok(0) => true,
            Ok(n) => {
                self.note_traffic(id, n);
                false
            }
            Err(e)
                if e.kind() == io::ErrorKind::Interrupted
                    || e.kind() == io::ErrorKind::WouldBlock =>
            {
                self.dirty.push(id);
                return;
            }
            Err(e) => {
                log::debug!("ConnectionUnix: read error on connection: {e}");
                true
            }
        };
        self.decode_frames(id);
        if !self.is_open(id) {
            return;
        }
        if eof {
            // What the peer published in its ring before it went is read.
            self.drain_lane(id, pool);
            if let Some(c) = self.get_mut(id) {
                let partial = c.decoder.discard();
                if partial > 0 {
                    log::warn!(
                        "ConnectionUnix: connection from '{}' closed with {partial} bytes of an incomplete frame; discarded",
                        c.peer.as_deref().unwrap_or("<no hello yet>")
                    );
                }
            }
            let write_error = self.get_mut(id).and_then(|c| c.write_failed.take());
            self.close(id, write_error);
            return;
        }
        if let Some(c) = self.get_mut(id) {
            c.decoder.release(pool);
        }
        self.dirty.push(id);
    }

    fn decode_frames(&mut self, id: ConnId) {
        let mut got_frame = false;
        self.decode_frames_inner(id, &mut got_frame);
        // Read counts are kept per run of messages with the same `from`
        // and added to the stats map here, once per receive, not once per
        // message (a map lookup per message costs a listener with a
        // thousand peers a good part of its time).
        self.flush_read_run();
        if got_frame {
            crate::message::prefetch_stamp_clock();
        }
        if got_frame && let Some(c) = self.get_mut(id) {
            c.last_activity = coarse_stamp();
        }
    }

    fn flush_read_run(&mut self) {
        if let Some((from, n)) = self.read_run.take() {
            match self.stats.read.get_mut(from.as_str()) {
                Some(c) => *c += n,
                None => {
                    self.stats.read.insert(from.to_string(), n);
                }
            }
        }
    }

    fn decode_frames_inner(&mut self, id: ConnId, got_frame: &mut bool) {
        loop {
            let Some(conn) = self.get_mut(id) else { return };
            let frame = match conn.decoder.next_frame() {
                Ok(Some(f)) => f,
                Ok(None) => break,
                Err(e) => {
                    log::error!(
                        "ConnectionUnix: closing connection from '{}': {e}",
                        conn.peer.as_deref().unwrap_or("<no hello yet>")
                    );
                    self.close(id, None);
                    return;
                }
            };
            *got_frame = true;
            if conn.peer.is_none() {
                if !self.resolve_hello(id, &frame) {
                    return;
                }
                continue;
            }
            self.take_message(id, frame);
        }
    }

    fn resolve_hello(&mut self, id: ConnId, frame: &Bytes) -> bool {
        let peer = match self.serializer.decode_hello(frame) {
            // A copy: a slice would pin the whole receive buffer the hello
            // arrived in for the life of the connection.
            Ok(Some(p)) => ByteStr::copy_from(&p),
            Ok(None) => {
                log::warn!("ConnectionUnix: hello frame missing peer id");
                self.close(id, None);
                return false;
            }
            Err(e) => {
                log::warn!("ConnectionUnix: malformed hello frame: {e}");
                self.close(id, None);
                return false;
            }
        };
        // A newer connection from the same peer becomes the live one
        // (docs/perl-differences.md, replacement): replies go over it, and the old one's
        // not-yet-started frames move to it. Unlike Perl, the old one is not
        // closed but *retired*: it finishes a partly written frame and stays
        // open for reading until the peer closes it, so nothing in flight on
        // it is lost (and two listeners connecting to each other at once
        // keep both connections instead of breaking both).
        let mut runs = Vec::new();
        if let Some(&old_slot) = self.by_peer.get(&peer) {
            let old = self.id_of(old_slot);
            let Core { conns, ids, .. } = self;
            // The new connection has no peer yet, so it is not `old`.
            if let Some((c, new)) = conns.get2_mut(old_slot, id.slot()) {
                c.outbox.seal(ids);
                new.outbox.seal(ids);
                lane::take_unstarted(c, &mut new.outbox, &mut runs);
            }
            for &(from_total, to_base) in &runs {
                self.record_move(old, from_total, id, to_base);
            }
            self.retired += 1;
        }
        let Some(conn) = self.get_mut(id) else {
            return false;
        };
        conn.peer = Some(peer.clone());
        conn.last_activity = coarse_stamp();
        let moved = !runs.is_empty();
        self.by_peer.insert(peer, id.slot());
        self.peers_epoch += 1;
        if moved {
            self.dirty.push(id);
        }
        self.prune_unresolved();
        true
    }

    fn take_message(&mut self, id: ConnId, frame: Bytes) {
        if crate::lane::control::is_control(&frame) {
            self.on_control(id, &frame);
            return;
        }
        if matches!(self.serializer, Serializer::Binary) && binary::is_batch(&frame) {
            self.take_batch(id, frame);
            return;
        }
        match self.serializer.decode_message(&frame) {
            Ok(Some(mut msg)) => {
                if self.fds_waiting > 0
                    && let Some(fds) = self.get_mut(id).and_then(|c| c.next_fds.take())
                {
                    self.fds_waiting -= 1;
                    msg.fds = crate::message::Fds::new(fds);
                }
                match &mut self.read_run {
                    Some((from, n)) if from.as_str() == msg.from() => *n += 1,
                    _ => {
                        self.flush_read_run();
                        self.read_run = Some((msg.from.clone(), 1));
                    }
                }
                self.inbox_bytes += frame.len();
                self.inbox.push(Entry::One(msg));
                if self.inbox_bytes >= self.cfg.inbox_limit {
                    self.paused = true;
                }
            }
            Ok(None) => {}
            Err(DecodeError::Malformed(e)) => {
                let peer = self.peer_of(id).unwrap_or("");
                log::warn!("ConnectionUnix: malformed frame from '{peer}': {e}");
            }
            Err(DecodeError::Invalid(e)) => {
                let peer = self.peer_of(id).unwrap_or("");
                log::warn!("ConnectionUnix: invalid message from '{peer}' skipped: {e}");
            }
        }
    }

    /// A Binary batch arrived on `id`: checked whole, then kept as one
    /// entry (its messages are read in place when taken).
    fn take_batch(&mut self, id: ConnId, frame: Bytes) {
        if self.fds_waiting > 0
            && let Some(fds) = self.get_mut(id).and_then(|c| c.next_fds.take())
        {
            // Descriptors go with single messages only: a sender that put
            // them before a batch broke that rule; they are closed.
            self.fds_waiting -= 1;
            let peer = self.peer_of(id).unwrap_or("");
            log::warn!(
                "ConnectionUnix: {} descriptors before a batch from '{peer}' closed",
                fds.len()
            );
        }
        // SAFETY: `lane_ascii` holds ranges only while a ring's reading is
        // decoded, each over bytes of that reading's buffer that its copy
        // found ASCII; that buffer is written no more, and lives while its
        // frames do (`pump_rx`).
        let checked = match unsafe {
            binary::CheckedBatch::parse_indexed_vouched(
                frame,
                &mut self.index_blocks,
                &self.lane_ascii,
            )
        } {
            Ok(b) => b,
            Err(e) => {
                let peer = self.peer_of(id).unwrap_or("");
                log::warn!("ConnectionUnix: malformed frame from '{peer}': {e}");
                return;
            }
        };
        let Some(c) = self.get_mut(id) else {
            return;
        };
        let Some(from) = c.peer.clone() else {
            return;
        };
        let info = checked.info();
        c.read_uncounted += u64::from(info.count - info.nulls);
        let len = checked.held_bytes();
        let from = Name::from_byte_str(from);
        let batch = RecvBatch {
            from,
            batch: checked,
        };
        if batch.batch.info().nulls > 0 {
            // Rare (a broken sender): the batch is split, and the messages
            // without content are skipped as any invalid message is.
            let nulls = batch.batch.info().nulls;
            log::warn!(
                "ConnectionUnix: invalid message from '{}' skipped: 'content' is a required attribute ({nulls} in one batch)",
                batch.from.as_str()
            );
            let mut msgs = Vec::new();
            inbox::expand_into(&mut vec![Entry::Batch(batch)], &self.local, &mut msgs);
            self.inbox.extend(
                msgs.into_iter()
                    .filter(|m| m.content_json() != "null")
                    .map(Entry::One),
            );
        } else {
            self.inbox.push(Entry::Batch(batch));
        }
        self.inbox_bytes += len;
        if self.inbox_bytes >= self.cfg.inbox_limit {
            self.paused = true;
        }
    }

    /// Adds a message that did not come from a connection (self-sends).
    pub fn push_local(&mut self, msg: Message) {
        self.inbox.push(Entry::One(msg));
    }

    /// Whether received messages are waiting.
    pub fn has_messages(&self) -> bool {
        !self.inbox.is_empty()
    }

    /// Takes every received message (unsorted, arrival order) and resumes
    /// receiving if the inbox had filled up.
    pub fn take_messages(&mut self, into: &mut Vec<Message>) {
        inbox::expand_into(&mut self.inbox, &self.local, into);
        self.emptied_inbox();
    }

    /// The inbox was emptied: receiving resumes if it had paused.
    fn emptied_inbox(&mut self) {
        self.inbox_bytes = 0;
        if self.paused {
            self.paused = false;
            let all = self.all_conns();
            self.dirty.extend(all);
        }
    }

    /// [`Core::take_messages`], appending them to `into` sorted by stamp
    /// (each message moved once).
    pub(crate) fn take_messages_sorted(
        &mut self,
        into: &mut Vec<Message>,
        scratch: &mut crate::message::SortScratch,
    ) {
        let start = into.len();
        self.take_messages(into);
        crate::message::sort_messages_with(&mut into[start..], scratch);
    }

    /// Swaps the inbox with `into` (which must be empty): every entry, in
    /// arrival order, batches whole. Receiving resumes if it had paused.
    pub fn take_entries(&mut self, into: &mut Vec<Entry>) {
        debug_assert!(into.is_empty());
        std::mem::swap(&mut self.inbox, into);
        self.emptied_inbox();
    }

    /// This client's id, as the `to` of the batches it receives.
    pub(crate) fn local_id(&self) -> &Name {
        &self.local
    }

    /// Changes the inbox limit (see [`CoreConfig::inbox_limit`]).
    pub fn set_inbox_limit(&mut self, bytes: usize) {
        self.cfg.inbox_limit = bytes;
    }

    /// Whether receiving is paused because the inbox is full.
    pub fn is_paused(&self) -> bool {
        self.paused
    }

    /// Serializes a frame into the core's send arena (no per-message
    /// allocation once the arena has warmed up).
    #[inline]
    pub fn new_frame(
        &mut self,
        write: impl FnOnce(&Serializer, &mut BytesMut) -> crate::Result<()>,
    ) -> crate::Result<Bytes> {
        let Core {
            arena,
            arenas,
            serializer,
            ..
        } = self;
        if arena.capacity() < 4096 {
            // Frames still queued keep the old arena alive; it joins the
            // spares and is reused in place once they have been written.
            let fresh = arenas.take();
            arenas.put(std::mem::replace(arena, fresh));
        }
        build_frame(arena, |b| write(serializer, b))
    }

    /// Queues a complete frame on `id`, within the outbox limit (an empty
    /// outbox takes any frame, so a frame above the limit still goes out).
    pub fn enqueue(&mut self, id: ConnId, frame: Bytes) -> Enqueue {
        let limit = self.cfg.outbox_limit;
        let Core { conns, ids, .. } = self;
        let Some(conn) = conn_mut(conns, id) else {
            return Enqueue::Gone;
        };
        let queued = conn.outbox.queued_bytes();
        if queued > 0 && queued + frame.len() > limit {
            return Enqueue::Full { queued, frame };
        }
        // Frames go out in the order they were queued: a batch queued
        // before this frame is sealed ahead of it.
        conn.outbox.seal(ids);
        let len = frame.len();
        conn.outbox.push(frame);
        if !conn.send_in_flight || conn.lane.is_some() {
            self.dirty.push(id);
        }
        if len.saturating_sub(HEADER_LEN) >= self.cfg.lane.blob_min && self.cfg.lane.enabled {
            self.blob_on_socket(id);
        }
        let total = self.get(id).map_or(0, |c| c.outbox.enqueued_total());
        Enqueue::Queued(total)
    }

    /// Appends one message to `id`'s open batch (Binary routes), within
    /// the outbox limit as [`Core::enqueue`]; `write` puts its content
    /// (`hint`: its size, if known). The message goes out when the batch is
    /// sealed: at the next write started on the connection, or when it is
    /// full ([`Core::seal`] seals it now).
    #[inline(always)]
    pub fn append(
        &mut self,
        id: ConnId,
        hint: usize,
        write: impl FnOnce(&mut BytesMut) -> crate::Result<()>,
    ) -> crate::Result<Append> {
        self.append_with(id, hint, |outbox, pool, ids| {
            outbox.append(hint, pool, ids, write)
        })
    }

    /// [`Core::append`] of content given as JSON bytes.
    #[inline(always)]
    pub fn append_raw(&mut self, id: ConnId, content: &[u8]) -> crate::Result<Append> {
        if content.len() >= lane::DIRECT_MIN
            && self.lane_count_hint()
            && let Some(done) = self.append_to_ring(id, content)
        {
            return Ok(done);
        }
        self.append_with(id, content.len(), |outbox, pool, ids| {
            outbox.append_raw(content, pool, ids)
        })
    }

    /// The one body of [`Core::append`] and [`Core::append_raw`]: the
    /// connection, the outbox limit, the append `put` makes, and the
    /// bookkeeping of a batch just opened.
    #[inline(always)]
    fn append_with(
        &mut self,
        id: ConnId,
        len: usize,
        put: impl FnOnce(&mut Outbox, &mut BufferPool, &mut IdSeq) -> crate::Result<Appended>,
    ) -> crate::Result<Append> {
        let limit = self.cfg.outbox_limit;
        let Core {
            conns,
            ids,
            arenas,
            dirty,
            ..
        } = self;
        let Some(conn) = conn_mut(conns, id) else {
            return Ok(Append::Gone);
        };
        // Within the open batch's room the outbox limit holds already (see
        // `Outbox::cap_room`); only past it is the limit looked at.
        let need = len + binary::RECORD_LEN_SIZE;
        if need > conn.outbox.room() {
            if conn.lane.is_some() {
                // The full batch goes into the ring now, not behind it.
                let _ = lane::pump_queued(conn, id, ids, dirty);
            }
            let queued = conn.outbox.queued_bytes();
            if queued > 0 && queued + need > limit {
                return Ok(Append::Full { queued });
            }
        }
        if put(&mut conn.outbox, arenas, ids)? == Appended::Opened {
            conn.outbox.cap_room(limit);
            if !conn.send_in_flight || conn.lane.is_some() {
                dirty.push(id);
            }
        }
        conn.uncounted += 1;
        if conn.outbox.open_len() >= self.cfg.lane.blob_min && self.cfg.lane.enabled {
            // A large message is a batch of its own: sealed now, it may go
            // as a memfd.
            conn.outbox.seal(ids);
            self.blob_on_socket(id);
        }
        Ok(Append::Queued)
    }

    /// Seals `id`'s open batch; returns the connection's byte count after
    /// it (compare with [`Core::written_total`]).
    pub fn seal(&mut self, id: ConnId) -> Option<u64> {
        let Core { conns, ids, .. } = self;
        let conn = conn_mut(conns, id)?;
        conn.outbox.seal(ids);
        Some(conn.outbox.enqueued_total())
    }

    /// Where the frame that ends at byte `target` of `id`'s stream is now:
    /// unstarted frames follow their connection's replacement.
    pub fn locate(&self, mut id: ConnId, mut target: u64) -> (ConnId, u64) {
        for _ in 0..self.moves.len() {
            let Some(m) = self
                .moves
                .iter()
                .rev()
                .find(|m| m.from == id && target > m.from_total)
            else {
                break;
            };
            target = target - m.from_total + m.to_base;
            id = m.to;
        }
        (id, target)
    }

    fn record_move(&mut self, from: ConnId, from_total: u64, to: ConnId, to_base: u64) {
        if self.moves.len() >= 1024 {
            self.moves.pop_front();
        }
        self.moves.push_back(Move {
            from,
            from_total,
            to,
            to_base,
        });
    }

    /// Bytes written so far on `id` (see [`Enqueue::Queued`]).
    pub fn written_total(&self, id: ConnId) -> Option<u64> {
        self.get(id).map(lane::written_total)
    }

    /// Bytes queued (not yet written) on `id`.
    pub fn queued_bytes(&self, id: ConnId) -> usize {
        self.get(id).map_or(0, lane::queued_bytes)
    }

    /// Counts a message as sent to `peer`.
    pub fn count_sent(&mut self, peer: &str) {
        Stats::bump(&mut self.stats.sent, peer);
    }

    /// Counts a message queued on `id` as sent to `peer` (added to the
    /// statistics when they are read or the connection closes, or now if
    /// it has closed).
    #[inline]
    pub fn count_sent_on(&mut self, id: ConnId, peer: &str, count: u32) {
        match self.get_mut(id) {
            Some(c) => c.uncounted += u64::from(count),
            None => Stats::add(&mut self.stats_mut().sent, peer, u64::from(count)),
        }
    }

    /// Counts a message as read from `peer` (self-sends).
    pub fn count_read(&mut self, peer: &str) {
        Stats::bump(&mut self.stats.read, peer);
    }

    /// Resolved connections with queued bytes.
    pub fn backlogged(&self) -> Vec<ConnId> {
        self.conns
            .iter()
            .filter(|(_, c)| c.peer.is_some() && lane::queued_bytes(c) > 0)
            .map(|(s, c)| ConnId::new(s, c.generation))
            .collect()
    }

    /// If `id` has bytes to write and no write in flight, marks the write
    /// as started and returns the outbox to write from.
    pub fn start_send(&mut self, id: ConnId) -> Option<&Outbox> {
        let large_buffer = self.cfg.socket_send_buffer.is_some();
        let Core {
            conns,
            ids,
            socket_hints,
            ..
        } = self;
        let conn = conn_mut(conns, id)?;
        if conn.write_failed.is_some() {
            return None;
        }
        if conn.lane.is_some() {
            return Self::start_send_lane(conn, id, ids, &mut self.lane_broken);
        }
        if conn.send_in_flight || conn.outbox.is_empty() {
            return None;
        }
        conn.outbox.seal(ids);
        conn.send_in_flight = true;
        if let Some(large) = conn.outbox.take_size_wish()
            && large_buffer
        {
            // From the connection's next write on (this one may be
            // performed already).
            socket_hints.push((id, SocketHint::LargeSendBuffer(large)));
        }
        Some(&conn.outbox)
    }

    /// A send's short way onto a shared-memory lane, for a caller about to
    /// flush: when `id` is the only connection with operations to start
    /// and its socket has a receive in flight, moves what its outbox holds
    /// into its ring now, as the reactor's dispatch would
    /// ([`Core::start_send`]). True if that was all the dispatch had to do
    /// (`id` is then no longer marked): nothing for the socket (no control
    /// frame to write), nothing to close, no lane work. False leaves
    /// everything as it was for a full flush (what moved into the ring
    /// stays moved).
    ///
    /// A blocking send over a lane is then a copy into the ring and no
    /// round through the backend (a tenth of a busy ping-pong's
    /// instructions).
    pub fn flush_to_lane(&mut self, id: ConnId) -> bool {
        if self.dirty.len() != 1
            || self.dirty[0] != id
            || self.has_closed_ids()
            || self.has_lane_work()
            || self.accept.resume
            || !self.lane_offers_out.is_empty()
        {
            return false;
        }
        let Core {
            conns,
            ids,
            lane_broken,
            ..
        } = self;
        let Some(conn) = conn_mut(conns, id) else {
            return false;
        };
        if conn.write_failed.is_some() || !conn.recv_in_flight || conn.lane.is_none() {
            return false;
        }
        if Self::pump_lane(conn, id, ids, lane_broken).is_err() {
            return false;
        }
        if !conn.send_in_flight && !lane::socket_outbox(conn).is_empty() {
            return false;
        }
        self.dirty.clear();
        true
    }

    /// Moves what `conn`'s lane outbox holds into its ring (if it is on
    /// one). A broken ring is logged and `id` queued for closing (`Err`).
    #[inline(always)]
    fn pump_lane(
        conn: &mut Conn,
        id: ConnId,
        ids: &mut IdSeq,
        broken: &mut Vec<ConnId>,
    ) -> Result<(), ()> {
        let Conn {
            lane,
            outbox,
            lane_peer,
            ..
        } = conn;
        let Some(up) = lane.as_deref_mut().and_then(|l| l.tx_up()) else {
            return Ok(());
        };
        // Activity on a lane is noted by the lanes' check, not per send.
        match lane::pump_tx(up, outbox, ids, *lane_peer, true) {
            Ok(_) => {}
            Err(e) => {
                log::error!(
                    "ConnectionUnix: closing connection to '{}': {e}",
                    conn.peer.as_deref().unwrap_or("")
                );
                // Closed at the reactor's next `take_closed_ids`.
                broken.push(id);
                return Err(());
            }
        }
        Ok(())
    }

    /// [`Core::start_send`] on a connection with a lane: the ring's outbox
    /// is moved into the ring first, then the socket's is written.
    #[inline(never)]
    fn start_send_lane<'a>(
        conn: &'a mut Conn,
        id: ConnId,
        ids: &mut IdSeq,
        broken: &mut Vec<ConnId>,
    ) -> Option<&'a Outbox> {
        conn.lane.as_ref()?;
        Self::pump_lane(conn, id, ids, broken).ok()?;
        if conn.send_in_flight || lane::socket_outbox(conn).is_empty() {
            return None;
        }
        lane::socket_outbox(conn).seal(ids);
        conn.send_in_flight = true;
        Some(lane::socket_outbox(conn))
    }

    /// Records how many frames of `id`'s outbox the backend's in-flight
    /// write covers (the kernel may still be reading them).
    pub fn sending(&mut self, id: ConnId, held_frames: usize) {
        if let Some(c) = self.get_mut(id) {
            lane::socket_outbox(c).set_in_flight(held_frames);
        }
    }

    /// A write finished having written `result` bytes (0 means "retry",
    /// e.g. after the kernel buffer had no room).
    pub fn on_sent(&mut self, id: ConnId, result: io::Result<usize>) {
        let Core { conns, arenas, .. } = self;
        let Some(conn) = conn_mut(conns, id) else {
            return;
        };
        conn.send_in_flight = false;
        let sock = lane::socket_outbox(conn);
        sock.set_in_flight(0);
        match result {
            Ok(n) => {
                sock.advance(n);
                if n > 0 && sock.is_empty() {
                    sock.release(arenas);
                    conn.last_activity = coarse_stamp();
                }
                if !lane::socket_outbox(conn).is_empty() || !conn.outbox.is_empty() {
                    self.dirty.push(id);
                }
                if n > 0 && !conn.lane_tried {
                    self.note_traffic(id, n);
                }
            }
            Err(e)
                if e.kind() == io::ErrorKind::Interrupted
                    || e.kind() == io::ErrorKind::WouldBlock =>
            {
                self.dirty.push(id);
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset
                ) =>
            {
                // The peer closed: what it sent before is still to be read
                // (a peer that sent and left, answered too late), so the
                // connection closes at its end of stream, not now.
                conn.write_failed = Some(e);
                self.dirty.push(id);
            }
            Err(e) => self.close(id, Some(e)),
        }
    }
}

/// The open connection `id` (its slot holds it, in its generation).
#[inline(always)]
fn conn_mut(conns: &mut Slab<Conn>, id: ConnId) -> Option<&mut Conn> {
    conns
        .get_mut(id.slot())
        .filter(|c| c.generation == id.generation())
}

/// Adds `conn`'s uncounted messages to the `sent` and `read` statistics.
fn fold_counts(stats: &mut Stats, conn: &mut Conn) {
    if let Some(peer) = &conn.peer {
        if conn.uncounted > 0 {
            Stats::add(&mut stats.sent, peer, conn.uncounted);
        }
        if conn.read_uncounted > 0 {
            Stats::add(&mut stats.read, peer, conn.read_uncounted);
        }
    }
    conn.uncounted = 0;
    conn.read_uncounted = 0;
}

#[cfg(test)]
mod tests;
