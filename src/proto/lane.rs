//! The core's half of the shared-memory lane: the state of a connection
//! moving onto its rings, the switch, and moving frames through them.
//!
//! The rings carry the connection's byte stream exactly as the socket
//! would (length-prefixed frames, cut into ring records anywhere), so the
//! framing, its limits and every check of what arrives are the socket's.
//! What the reactor does for the lane (the beacon, the memfd, the
//! descriptor passing) happens outside the core; the core only moves
//! memory and queues control frames.
//!
//! # The switch
//!
//! Each direction switches once, at its `SWITCH` control frame: the
//! sender's frames up to it go on the socket, every frame after it in its
//! ring. The socket outbox that holds the frames before the switch is set
//! aside (`Up::sock`) and keeps writing to the socket, where only control
//! frames follow; the connection's outbox continues the byte count in the
//! ring. The receiver reads its ring only once it has decoded the
//! peer's `SWITCH` from the socket, so nothing is reordered, lost or
//! duplicated across the switch:
//!
//! 1. the initiator passes the memfd over the beacon and sends `OFFER`;
//! 2. the acceptor maps it, sends `SWITCH` and writes to its ring from
//!    then on (or sends `REFUSE` and stays on the socket);
//! 3. the initiator, at the acceptor's `SWITCH`, reads the acceptor's ring,
//!    sends its own `SWITCH` and writes to its ring;
//! 4. the acceptor, at the initiator's `SWITCH`, reads the initiator's ring.

use bytes::Bytes;

use super::outbox::{LONE_PREFIX, lone_prefix};
use super::{Conn, ConnId, Core, Outbox, Role, SocketHint};
use crate::lane::control::{Control, is_control};
use crate::lane::ring::{Consumer, Producer, RingError};
use crate::lane::shm::Region;
use crate::message::IdSeq;
use crate::wire::{BufferPool, FrameDecoder, HEADER_LEN};

/// Payload bytes of one ring record at most (several frames share one
/// record; a larger frame is cut into several).
const RECORD_MAX: usize = 32 * 1024;
/// Frames gathered into one record at most.
const RECORD_PARTS: usize = 64;

/// Bytes one reading of a ring takes at most before the reactor hands
/// what it read to the application. A reader that took all the ring held
/// (up to the inbox limit, 4 MiB) made the application read, and the
/// next copies write, more memory than a core's cache holds; this much
/// stays in it, and the buffers the application has dropped are reused
/// while still warm (a 16 KiB stream: 10–15 % faster, measured; docs/lane.md).
pub(crate) const LANE_READ_BUDGET: usize = 256 * 1024;

/// The shared-memory lane's settings.
#[derive(Debug, Clone)]
pub struct LaneConfig {
    /// Move busy connections between ipcm peers onto a shared-memory lane.
    pub enabled: bool,
    /// Bytes a connection carries (both ways) before its initiator offers
    /// a lane: only busy connections get one.
    pub after_bytes: u64,
    /// Record bytes of each of a lane's two rings (a power of two of at
    /// least 4 KiB): a lane maps `2 × (ring_bytes + 128)` bytes.
    pub ring_bytes: usize,
    /// The largest ring a peer's offer may have.
    pub max_ring_bytes: usize,
    /// A lane that carried nothing either way for about this long (one to
    /// two periods) is released: both sides go back to the socket and
    /// unmap the rings; the initiator offers a new lane once the
    /// connection is busy again. `None`: lanes last as long as their
    /// connections.
    pub release_after: Option<std::time::Duration>,
    /// Frames of at least this many payload bytes go from a lane's ring as
    /// a sealed memfd of their own, received without a copy (when the
    /// peer process has a beacon; else through the ring).
    pub blob_min: usize,
}

impl Default for LaneConfig {
    fn default() -> Self {
        LaneConfig {
            enabled: true,
            after_bytes: 64 * 1024,
            ring_bytes: 4 * 1024 * 1024,
            max_ring_bytes: 64 * 1024 * 1024,
            release_after: Some(std::time::Duration::from_secs(5)),
            blob_min: 1024 * 1024,
        }
    }
}

/// Which path a connection's messages take.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum LaneKind {
    /// The UNIX socket.
    Socket,
    /// The shared-memory rings, both ways.
    SharedMemory,
}

impl std::fmt::Display for LaneKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            LaneKind::Socket => "socket",
            LaneKind::SharedMemory => "shared-memory",
        })
    }
}

/// A connection's lane.
#[derive(Debug)]
pub(crate) enum ConnLane {
    /// The initiator passed the memfd and sent `OFFER`.
    Offered(Region),
    /// Both sides hold the region.
    Up(Box<Up>),
}

/// An established lane.
#[derive(Debug)]
pub(crate) struct Up {
    tx: Producer,
    rx: Consumer,
    /// Our frames go to our ring (we queued our `SWITCH`).
    tx_on: bool,
    /// The peer's `SWITCH` was decoded: its frames come from its ring.
    rx_on: bool,
    /// The socket's outbox after our switch: the frames before it, then
    /// control frames only.
    sock: Outbox,
    /// The connection's byte count at our `SWITCH` (its end).
    switch_at: u64,
    /// Frames arriving through the ring.
    decoder: FrameDecoder,
    /// The peer's `RELEASE` was decoded and its ring drained: its frames
    /// come from the socket again.
    rx_done: bool,
    /// The rings' counts at the last idle check: (ours written, theirs
    /// read).
    seen: (u64, u64),
    /// The rings' counts when the connection's activity was last stamped
    /// (by the check, or [`Core::set_last_activity`]).
    active_at: (u64, u64),
    /// Payload bytes from which a frame goes as a memfd.
    blob_min: usize,
    /// The mapping the ring ends point into: dropped after them.
    _region: Region,
}

impl Up {
    /// After a publish: queues a `WAKE` on the socket if the reader
    /// sleeps; whether it did.
    #[inline(always)]
    fn wake_reader(&mut self) -> bool {
        let asleep = self.tx.take_wake();
        if asleep {
            self.sock.push(Control::Wake.frame());
        }
        asleep
    }

    /// The rings' counts: (ours written, theirs read). Traffic moves them;
    /// the idle check and the activity stamps compare them.
    fn counts(&self) -> (u64, u64) {
        (self.tx.written(), self.rx.read_total())
    }
}

impl ConnLane {
    /// The established lane, once our frames go to the ring.
    pub(crate) fn tx_up(&mut self) -> Option<&mut Up> {
        match self {
            ConnLane::Up(up) if up.tx_on => Some(up),
            _ => None,
        }
    }

    fn up(&self) -> Option<&Up> {
        match self {
            ConnLane::Up(up) => Some(up),
            ConnLane::Offered(_) => None,
        }
    }
}

/// Bytes written of the connection's stream: the socket's until it has
/// written our `SWITCH`, then the ring's.
pub(crate) fn written_total(conn: &Conn) -> u64 {
    match conn.lane.as_deref().and_then(ConnLane::up) {
        Some(up) if up.tx_on && up.sock.written_total() < up.switch_at => up.sock.written_total(),
        _ => conn.outbox.written_total(),
    }
}

/// Bytes queued on the socket and in the ring's outbox.
pub(crate) fn queued_bytes(conn: &Conn) -> usize {
    conn.outbox.queued_bytes()
        + conn
            .lane
            .as_deref()
            .and_then(ConnLane::up)
            .map_or(0, |up| up.sock.queued_bytes())
}

/// The outbox that writes to the socket.
pub(crate) fn socket_outbox(conn: &mut Conn) -> &mut Outbox {
    match conn.lane.as_deref_mut().and_then(ConnLane::tx_up) {
        Some(up) => &mut up.sock,
        None => &mut conn.outbox,
    }
}

/// Moves what `outbox` holds into the ring, as far as it has room;
/// queues a `WAKE` on the socket if the peer sleeps. True if anything
/// moved.
/// `peer`: the process and user at the other end, for large payloads
/// (`Conn::lane_peer`). `wait`: a full ring asks the peer for a wake
/// when it has room (the reactor waits for it); without it, what does not
/// fit stays queued and the peer is not asked.
pub(crate) fn pump_tx(
    up: &mut Up,
    outbox: &mut Outbox,
    ids: &mut IdSeq,
    peer: Option<(i32, u32)>,
    wait: bool,
) -> Result<bool, RingError> {
    let mut moved = false;
    if outbox.open_len() > 0 && outbox.frames().next().is_none() {
        // An open batch alone goes from its buffer (see `write_open`).
        let room = up.tx.room()?.min(RECORD_MAX);
        let tx = &mut up.tx;
        moved = outbox.write_open(ids, room, |b| tx.push_parts(&[b], b.len()))?;
    }
    outbox.seal(ids);
    while !outbox.is_empty() {
        let room = up.tx.room()?;
        if room == 0 {
            if wait && up.tx.wait_for_room()? {
                continue;
            }
            break;
        }
        match send_as_blob(up, outbox, room, peer) {
            Blob::Sent => {
                moved = true;
                continue;
            }
            Blob::NeedsRoom => {
                // Not a byte of it into the ring: it waits for room for
                // its `BLOB` frame.
                if wait && up.tx.wait_for_room()? && up.tx.room()? >= BLOB_FRAME {
                    continue;
                }
                break;
            }
            Blob::No => {}
        }
        let limit = room.min(RECORD_MAX);
        if let Some(s) = outbox.sole_frame()
            && s.len() <= limit
        {
            // One frame that fits (a send flushed at once): no gathering.
            let len = s.len();
            up.tx.push_parts(&[s], len)?;
            outbox.advance(len);
            moved = true;
            continue;
        }
        let mut parts: [&[u8]; RECORD_PARTS] = [&[]; RECORD_PARTS];
        let (mut n, mut len) = (0, 0);
        for (i, f) in outbox.frames().enumerate() {
            let s = if i == 0 {
                &f[outbox.front_offset()..]
            } else {
                &f[..]
            };
            if n == RECORD_PARTS || (i > 0 && blob_eligible(up, peer, f)) {
                // A frame to go as a memfd starts the next round.
                break;
            }
            if len + s.len() > limit {
                if len == 0 {
                    parts[0] = &s[..limit];
                    n = 1;
                    len = limit;
                }
                break;
            }
            parts[n] = s;
            n += 1;
            len += s.len();
        }
        up.tx.push_parts(&parts[..n], len)?;
        outbox.advance(len);
        moved = true;
    }
    if moved {
        up.wake_reader();
    }
    Ok(moved)
}

/// How often lanes are checked for activity when they are never released
/// ([`LaneConfig::release_after`] `None`).
const ACTIVITY_CHECK: std::time::Duration = std::time::Duration::from_secs(5);

/// The period of the lanes' check: idle release and activity stamps.
fn lane_check_period(release_after: Option<std::time::Duration>) -> std::time::Duration {
    release_after.unwrap_or(ACTIVITY_CHECK)
}

/// Bytes of a `BLOB` control frame.
const BLOB_FRAME: usize = 4 + 6 + 24;

/// Whether frame `f` goes as a memfd when it is at the front.
fn blob_eligible(up: &Up, peer: Option<(i32, u32)>, f: &Bytes) -> bool {
    peer.is_some() && f.len().saturating_sub(HEADER_LEN) >= up.blob_min.max(1)
}

/// What [`send_as_blob`] did.
enum Blob {
    /// The front frame went as a memfd.
    Sent,
    /// It is to go as one, once the ring has room for its `BLOB` frame.
    NeedsRoom,
    /// It goes through the ring.
    No,
}

/// If the outbox's front frame is unstarted and large enough, sends its
/// payload as a sealed memfd and writes the `BLOB` frame that stands for
/// it into the ring (`room`: what the ring takes now). The outbox's byte
/// count moves by the whole frame, as if it had gone into the ring:
/// blocking sends wait for positions in the outbox's count.
fn send_as_blob(up: &mut Up, outbox: &mut Outbox, room: usize, peer: Option<(i32, u32)>) -> Blob {
    let Some(peer) = peer else { return Blob::No };
    let Some(f) = outbox.frames().next() else {
        return Blob::No;
    };
    if outbox.front_offset() != 0 || !blob_eligible(up, Some(peer), f) {
        return Blob::No;
    }
    if room < BLOB_FRAME {
        return Blob::NeedsRoom;
    }
    let frame_len = f.len();
    match crate::lane::send_blob(peer, &f[HEADER_LEN..]) {
        Ok(Some(ctl)) => {
            if up.tx.push_parts(&[&ctl[..]], ctl.len()).is_err() {
                // Not reached (the room was checked); the peer then takes
                // a memfd it never hears of, and the frame goes whole.
                return Blob::No;
            }
            outbox.advance(frame_len);
            Blob::Sent
        }
        // No beacon there (a peer that does not listen), or its backlog is
        // full: the ring carries this one.
        Ok(None) => Blob::No,
        Err(why) => {
            crate::lane::log_unavailable(&format!("large payload as a memfd: {why}"));
            Blob::No
        }
    }
}

/// Content bytes from which a message to a peer on a lane, with nothing
/// queued before it, is written straight into the ring as a batch of its
/// own ([`Core::append_to_ring`]): one copy instead of two (into the batch,
/// then into the ring). Below it, batching many messages per ring record
/// is worth the second copy.
pub(crate) const DIRECT_MIN: usize = 4096;

impl Core {
    /// The short way of a large message (`content`, at least
    /// [`DIRECT_MIN`] bytes) onto a lane: what `id`'s ring outbox holds
    /// goes into the ring first, as far as it has room; if that empties
    /// it and the ring has room for this one too, writes it into the ring
    /// now as a batch of one, sealed (its stamp, ordinal and id given) and
    /// published. `None` appends it the usual way: no lane, something
    /// still queued before it, no room, a memfd's size, or a ring that
    /// fails (found again by the usual path).
    ///
    /// Moving the queue first keeps a sender that fell behind (its ring
    /// was full) from staying on the slow way, two copies per message,
    /// for as long as anything is queued.
    pub(super) fn append_to_ring(&mut self, id: ConnId, content: &[u8]) -> Option<super::Append> {
        debug_assert!(content.len() >= DIRECT_MIN);
        let Core {
            conns, ids, dirty, ..
        } = self;
        let conn = super::conn_mut(conns, id)?;
        pump_queued(conn, id, ids, dirty)?;
        let Conn {
            outbox,
            lane,
            lane_peer,
            uncounted,
            ..
        } = conn;
        let up = lane.as_deref_mut()?.tx_up()?;
        let len = LONE_PREFIX + content.len();
        if !outbox.is_empty()
            || (lane_peer.is_some() && len - HEADER_LEN >= up.blob_min.max(1))
            || !up.tx.room().is_ok_and(|r| r >= len)
        {
            return None;
        }
        let prefix = lone_prefix(content.len(), ids);
        up.tx.push_parts(&[&prefix, content], len).ok()?;
        if up.wake_reader() {
            dirty.push(id);
        }
        outbox.count_passed(len);
        *uncounted += 1;
        Some(super::Append::Queued)
    }
}

/// Moves what `conn`'s ring outbox holds (`id`'s) into its ring, as far as
/// the ring has room now, asking the peer for no wake (no one waits for
/// it); marks `id` in `dirty` if a `WAKE` was queued for the socket.
/// `None`: no lane to write to, or its ring failed (the usual path finds
/// that again).
///
/// For appends on a lane: a full batch goes into the ring as it fills, its
/// buffer kept for the next one ([`Outbox::write_open`]), and a sender
/// that fell behind (its ring was full) catches up in the ring rather than
/// through a second copy.
pub(super) fn pump_queued(
    conn: &mut Conn,
    id: ConnId,
    ids: &mut IdSeq,
    dirty: &mut Vec<ConnId>,
) -> Option<()> {
    if conn.write_failed.is_some() {
        return None;
    }
    let up = conn.lane.as_deref_mut()?.tx_up()?;
    if conn.outbox.is_empty() {
        return Some(());
    }
    let before = up.sock.queued_bytes();
    pump_tx(up, &mut conn.outbox, ids, conn.lane_peer, false).ok()?;
    if up.sock.queued_bytes() > before {
        dirty.push(id);
    }
    Some(())
}

/// Takes the frames no write has started into `into`, for another
/// connection to the same peer, with the runs they formed (see
/// [`Outbox::take_unstarted_into`]): on a lane, the socket's data frames
/// and then the ring's. Control frames stay: they belong to this
/// connection (a `SWITCH` left behind would strand what its ring holds).
pub(crate) fn take_unstarted(conn: &mut Conn, into: &mut Outbox, runs: &mut Vec<(u64, u64)>) {
    let control = |f: &Bytes| f.len() >= 4 && is_control(&f[4..]);
    let Some(up) = conn.lane.as_deref_mut().and_then(ConnLane::tx_up) else {
        conn.outbox.take_unstarted_into(into, control, runs);
        return;
    };
    // The socket's data frames all come before our `SWITCH`, which stays:
    // the socket's count at its end moves down by what left.
    let before = up.sock.enqueued_total();
    up.sock.take_unstarted_into(into, control, runs);
    up.switch_at -= before - up.sock.enqueued_total();
    conn.outbox.take_unstarted_into(into, |_| false, runs);
}

impl Core {
    /// Counts bytes a connection carried; an initiator's busy connection
    /// asks the reactor for a lane (see [`Core::take_lane_wanted`]).
    #[inline]
    pub(super) fn note_traffic(&mut self, id: ConnId, n: usize) {
        if !self.cfg.lane.enabled {
            return;
        }
        let after = self.cfg.lane.after_bytes;
        let Some(c) = self.get_mut(id) else { return };
        if c.lane_tried || c.role != Role::Initiator {
            return;
        }
        c.traffic += n as u64;
        if c.traffic >= after {
            c.lane_tried = true;
            self.lane_wanted.push(id);
        }
    }

    /// Connections whose initiator wants a lane offered.
    pub fn take_lane_wanted(&mut self, into: &mut Vec<ConnId>) {
        into.append(&mut self.lane_wanted);
    }

    /// Offers from peers: the connection, the nonce and the ring capacity.
    pub fn take_lane_offers(&mut self, into: &mut Vec<(ConnId, [u8; 16], u32)>) {
        into.append(&mut self.lane_offers);
    }

    /// What connections' sockets are to be told since the last call
    /// ([`SocketHint`]).
    pub fn take_socket_hints(&mut self, into: &mut Vec<(ConnId, SocketHint)>) {
        into.append(&mut self.socket_hints);
    }

    /// Whether the reactor has lane work to do.
    #[inline]
    pub fn has_lane_work(&self) -> bool {
        !self.lane_wanted.is_empty() || !self.lane_offers.is_empty()
    }

    /// Whether there are [`SocketHint`]s since the last
    /// [`Core::take_socket_hints`] (hints, no work that holds up a send).
    #[inline]
    pub fn has_socket_hints(&self) -> bool {
        !self.socket_hints.is_empty()
    }

    /// The initiator passed `region`'s memfd tagged `nonce`: queues the
    /// `OFFER`.
    pub fn lane_offered(&mut self, id: ConnId, region: Region, nonce: [u8; 16]) {
        let capacity = region.capacity() as u32;
        let Core {
            conns, ids, dirty, ..
        } = self;
        let Some(c) = super::conn_mut(conns, id) else {
            return;
        };
        c.outbox.seal(ids);
        c.outbox.push(Control::Offer { nonce, capacity }.frame());
        c.lane = Some(Box::new(ConnLane::Offered(region)));
        if !c.send_in_flight {
            dirty.push(id);
        }
        self.lane_offers_out.push(id);
    }

    /// Whether an offer of ours awaits its answer.
    #[inline]
    pub fn lane_offer_pending(&mut self) -> bool {
        if self.lane_offers_out.is_empty() {
            return false;
        }
        let Core {
            conns,
            lane_offers_out,
            ..
        } = self;
        lane_offers_out.retain(|&id| {
            super::conn_mut(conns, id)
                .is_some_and(|c| matches!(c.lane.as_deref(), Some(ConnLane::Offered(_))))
        });
        !lane_offers_out.is_empty()
    }

    /// The acceptor mapped the initiator's region: its frames go to its
    /// ring from now on.
    pub fn lane_accepted(&mut self, id: ConnId, region: Region) {
        self.lane_up(id, region, false);
    }

    /// The acceptor could not take the offer on `id` (already logged).
    pub fn lane_refused(&mut self, id: ConnId) {
        self.queue_control(id, Control::Refuse);
    }

    fn queue_control(&mut self, id: ConnId, ctl: Control) {
        let Core {
            conns, ids, dirty, ..
        } = self;
        let Some(c) = super::conn_mut(conns, id) else {
            return;
        };
        let sock = socket_outbox(c);
        sock.seal(ids);
        sock.push(ctl.frame());
        if !c.send_in_flight {
            dirty.push(id);
        }
    }

    /// Makes `region` the lane of `id` and switches our sending to it;
    /// `initiator`: we created it (and the peer switched already).
    fn lane_up(&mut self, id: ConnId, region: Region, initiator: bool) {
        let max_frame = self.cfg.max_frame;
        let (tx, rx) = match region.ends(initiator) {
            Ok(e) => e,
            Err(e) => {
                log::warn!("ConnectionUnix: shared-memory lane unusable: {e}");
                return;
            }
        };
        let release_after = self.cfg.lane.release_after;
        let blob_min = self.cfg.lane.blob_min;
        let Core {
            conns,
            ids,
            dirty,
            lanes,
            lane_check_at,
            socket_hints,
            ..
        } = self;
        let Some(c) = super::conn_mut(conns, id) else {
            return;
        };
        // Our last socket frame: everything queued so far goes before it.
        c.outbox.seal(ids);
        let mut sock = std::mem::take(&mut c.outbox);
        sock.push(Control::Switch.frame());
        let switch_at = sock.enqueued_total();
        c.outbox = Outbox::continuing(&sock);
        c.lane = Some(Box::new(ConnLane::Up(Box::new(Up {
            tx,
            rx,
            tx_on: true,
            rx_on: initiator,
            sock,
            switch_at,
            decoder: FrameDecoder::new(max_frame),
            rx_done: false,
            seen: (0, 0),
            active_at: (0, 0),
            blob_min,
            _region: region,
        }))));
        lanes.push(id);
        // The socket now carries only the lane's control frames.
        socket_hints.push((id, SocketHint::Quiet(true)));
        if !c.send_in_flight {
            dirty.push(id);
        }
        if lane_check_at.is_none() {
            *lane_check_at = Some(std::time::Instant::now() + lane_check_period(release_after));
        }
        log::debug!(
            "ConnectionUnix: connection {id:?} to '{}' moves to a shared-memory lane",
            c.peer.as_deref().unwrap_or("")
        );
    }

    /// A control frame arrived on `id`.
    pub(super) fn on_control(&mut self, id: ConnId, payload: &Bytes) {
        let ctl = match Control::parse(payload) {
            Ok(c) => c,
            Err(e) => {
                let peer = self.peer_of(id).unwrap_or("");
                log::warn!("ConnectionUnix: {e} from '{peer}' ignored");
                // An offer (kind 1) we cannot read, of another version, is
                // refused, so
                // its initiator stays on the socket rather than waiting.
                if payload.get(5) == Some(&1)
                    && let Some(c) = self.get(id)
                    && c.role == Role::Acceptor
                    && c.lane.is_none()
                {
                    self.queue_control(id, Control::Refuse);
                }
                return;
            }
        };
        let enabled = self.cfg.lane.enabled;
        let max_ring = self.cfg.lane.max_ring_bytes;
        let Some(c) = self.get_mut(id) else { return };
        match ctl {
            Control::Offer { nonce, capacity } => {
                let fits = (capacity as usize) <= max_ring;
                if enabled && fits && c.role == Role::Acceptor && c.lane.is_none() {
                    self.lane_offers.push((id, nonce, capacity));
                } else {
                    log::debug!("ConnectionUnix: lane offer on {id:?} refused");
                    self.queue_control(id, Control::Refuse);
                }
            }
            Control::Switch => match c.lane.as_deref_mut() {
                Some(ConnLane::Offered(_)) => {
                    let Some(ConnLane::Offered(region)) = c.lane.take().map(|b| *b) else {
                        return;
                    };
                    self.lane_up(id, region, true);
                }
                Some(ConnLane::Up(up)) if !up.rx_on => up.rx_on = true,
                _ => log::warn!("ConnectionUnix: unexpected lane switch on {id:?} ignored"),
            },
            Control::Refuse => {
                if matches!(c.lane.as_deref(), Some(ConnLane::Offered(_))) {
                    c.lane = None;
                    log::debug!("ConnectionUnix: lane refused on {id:?}; staying on the socket");
                }
            }
            // The next turn looks at the rings; a sender waiting for room
            // pumps again.
            Control::Wake => self.dirty.push(id),
            Control::Release => self.on_release(id),
            Control::Blob { nonce, len } => self.on_blob(id, &nonce, len),
            Control::Fds { nonce, count } => self.on_fds(id, &nonce, count),
        }
    }

    /// An `FDS`: the descriptors the peer passed with `nonce` belong to
    /// its next message, taken now (they were passed before the frame was
    /// written). Descriptors that cannot be had close the connection: the
    /// peer said a message carries them.
    fn on_fds(&mut self, id: ConnId, nonce: &[u8; 16], count: u8) {
        let Some(c) = self.get(id) else { return };
        let taken = match c.lane_peer {
            None => Err("descriptors from a process that is not known".to_string()),
            Some(_) if usize::from(count) > crate::lane::pass::MAX_FDS || count == 0 => {
                Err(format!("{count} descriptors announced"))
            }
            Some(p) => crate::lane::beacon::take_fds_from(p.0, p.1, nonce).and_then(|fds| {
                if fds.len() == usize::from(count) {
                    Ok(fds)
                } else {
                    Err(format!("{} descriptors came, {count} announced", fds.len()))
                }
            }),
        };
        match taken {
            Ok(fds) => {
                let Some(c) = self.get_mut(id) else { return };
                if c.next_fds.replace(fds).is_none() {
                    self.fds_waiting += 1;
                }
            }
            Err(why) => {
                let peer = self.peer_of(id).unwrap_or("").to_string();
                log::error!("ConnectionUnix: closing connection from '{peer}': {why}");
                self.close(id, None);
            }
        }
    }

    /// A `BLOB`: the frame it stands for is the sealed memfd the peer
    /// passed with `nonce`, taken now (it was passed before the `BLOB` was
    /// published) so that the message keeps its place. A payload that is
    /// too large, missing or not sealed closes the connection: the peer
    /// said a message was there.
    fn on_blob(&mut self, id: ConnId, nonce: &[u8; 16], len: u64) {
        let max = self.cfg.max_frame;
        let Some(c) = self.get(id) else { return };
        let peer = c.lane_peer;
        let taken = match peer {
            _ if len > max as u64 => Err(format!(
                "a large payload of {len} bytes exceeds the frame limit of {max}"
            )),
            None => Err("a large payload from a process that is not known".to_string()),
            Some(p) => crate::lane::take_blob(p, nonce, len as usize),
        };
        match taken {
            Ok(frame) if !is_control(&frame) => self.take_message(id, frame),
            Ok(_) => {
                let peer = self.peer_of(id).unwrap_or("").to_string();
                log::warn!(
                    "ConnectionUnix: a control frame as a large payload from '{peer}' ignored"
                );
            }
            Err(why) => {
                let peer = self.peer_of(id).unwrap_or("").to_string();
                log::error!("ConnectionUnix: closing connection from '{peer}': {why}");
                self.close(id, None);
            }
        }
    }

    /// The peer's `RELEASE`: everything it put in its ring was published
    /// before it, so the ring is drained now (whatever the inbox limit:
    /// at most one ring) and the socket's frames after it follow in
    /// order. Ours follows when our outbox has gone into our ring.
    fn on_release(&mut self, id: ConnId) {
        let Some(c) = self.get_mut(id) else { return };
        match c.lane.as_deref_mut() {
            Some(ConnLane::Up(up)) if up.rx_on && !up.rx_done => {
                // Set first: a `RELEASE` the peer put in its ring (never
                // sent by ipcm) meets this flag and is ignored.
                up.rx_done = true;
            }
            _ => {
                log::warn!("ConnectionUnix: unexpected lane release on {id:?} ignored");
                return;
            }
        }
        let mut pool = BufferPool::new(self.cfg.buf_size, 0);
        self.drain_lane(id, &mut pool);
        self.lane_releasing.push(id);
        self.release_lanes();
    }

    /// Releases our ring of each lane whose peer released its own, once
    /// our outbox has all gone into the ring (the `RELEASE` goes after
    /// it); a lane released both ways is unmapped.
    fn release_lanes(&mut self) {
        let mut i = 0;
        while i < self.lane_releasing.len() {
            let id = self.lane_releasing[i];
            if self.try_release_tx(id) != Some(false) {
                self.lane_releasing.swap_remove(i);
                self.lane_down(id);
            } else {
                i += 1;
            }
        }
    }

    /// Sends our `RELEASE` if nothing waits to go into the ring or onto
    /// the socket: our frames continue on the socket, in the outbox that
    /// continued the ring's byte count. `Some(true)`: released (now or
    /// before); `Some(false)`: not yet; `None`: no lane.
    fn try_release_tx(&mut self, id: ConnId) -> Option<bool> {
        let Core {
            conns, ids, dirty, ..
        } = self;
        let c = super::conn_mut(conns, id)?;
        let Some(ConnLane::Up(up)) = c.lane.as_deref_mut() else {
            return None;
        };
        if !up.tx_on {
            return Some(true);
        }
        if c.send_in_flight || !c.outbox.is_empty() || !up.sock.is_empty() {
            return Some(false);
        }
        up.tx_on = false;
        c.outbox.seal(ids);
        c.outbox.push(Control::Release.frame());
        dirty.push(id);
        log::debug!(
            "ConnectionUnix: connection {id:?} to '{}' leaves its idle shared-memory lane",
            c.peer.as_deref().unwrap_or("")
        );
        Some(true)
    }

    /// Unmaps a lane released both ways; the initiator may offer a new one
    /// once the connection is busy again.
    fn lane_down(&mut self, id: ConnId) {
        let Some(c) = self.get_mut(id) else { return };
        if !matches!(c.lane.as_deref(), Some(ConnLane::Up(up)) if !up.tx_on && up.rx_done) {
            return;
        }
        c.lane = None;
        c.lane_tried = false;
        c.traffic = 0;
        self.lanes.retain(|&l| l != id);
        self.socket_hints.push((id, SocketHint::Quiet(false)));
    }

    /// The activity time of `c`: its stamp, or now if it is on a lane
    /// whose rings moved since the last check (the lane's messages stamp
    /// nothing as they pass; see [`Core::lane_idle_check`]).
    pub(super) fn activity(c: &Conn) -> f64 {
        if let Some(ConnLane::Up(up)) = c.lane.as_deref()
            && up.counts() != up.active_at
        {
            return crate::message::coarse_stamp();
        }
        c.last_activity
    }

    /// Stamps `c` active at `at`, its lane's traffic so far included.
    pub(super) fn set_activity(c: &mut Conn, at: f64) {
        c.last_activity = at;
        if let Some(ConnLane::Up(up)) = c.lane.as_deref_mut() {
            up.active_at = up.counts();
        }
    }

    /// The idle check (see [`LaneConfig::release_after`]): a lane whose
    /// rings moved nothing either way since the last check, with nothing
    /// waiting, is released (our side now, the peer's on our `RELEASE`).
    ///
    /// It also notes the lanes' activity: a ring read or written moves no
    /// clock per message (a clock read was a fortieth of a busy ping-pong's
    /// round trip); a connection whose rings moved since the last check
    /// is stamped active now (see [`Core::activity`]). The check runs
    /// while lanes exist, every `release_after` (or every
    /// [`ACTIVITY_CHECK`] if lanes are never released).
    pub(super) fn lane_idle_check(&mut self, now: std::time::Instant) {
        self.lane_check_at = None;
        let release_after = self.cfg.lane.release_after;
        let mut idle = Vec::new();
        let mut stamp = None;
        for &id in &self.lanes {
            let Some(c) = self.conns.get_mut(id.slot()) else {
                continue;
            };
            let Some(ConnLane::Up(up)) = c.lane.as_deref_mut() else {
                continue;
            };
            let seen = up.counts();
            if seen != up.active_at {
                c.last_activity = *stamp.get_or_insert_with(crate::message::coarse_stamp);
                up.active_at = seen;
            }
            let still = seen == up.seen && !up.rx.has_data();
            up.seen = seen;
            if release_after.is_some() && still && up.tx_on && up.rx_on && !up.rx_done {
                idle.push(id);
            }
        }
        for id in idle {
            self.try_release_tx(id);
        }
        if !self.lanes.is_empty() {
            self.lane_check_at = Some(now + lane_check_period(release_after));
        }
    }

    /// Moves what arrived in the lanes' rings into the inbox, and marks
    /// lanes whose outbox waits for room that has appeared. True if
    /// anything arrived.
    pub fn lane_poll(&mut self, pool: &mut BufferPool) -> bool {
        if self.lanes.is_empty() {
            return false;
        }
        if !self.lane_releasing.is_empty() {
            self.release_lanes();
        }
        let mut got = false;
        let mut gone = false;
        let mut i = 0;
        while i < self.lanes.len() {
            let id = self.lanes[i];
            i += 1;
            if !self.paused {
                got |= self.pump_rx(id, pool);
            }
            let Some(c) = self.get_mut(id) else {
                gone = true;
                continue;
            };
            let outbox_waits = !c.outbox.is_empty();
            if let Some(up) = c.lane.as_deref_mut().and_then(ConnLane::tx_up)
                && outbox_waits
                && matches!(up.tx.room(), Ok(r) if r > 0)
            {
                self.dirty.push(id);
            }
        }
        if gone {
            self.lanes.retain(|&id| {
                self.conns
                    .get(id.slot())
                    .is_some_and(|c| ConnId::new(id.slot(), c.generation) == id)
            });
        }
        got
    }

    /// Reads `id`'s ring while it has records and the inbox has room.
    fn pump_rx(&mut self, id: ConnId, pool: &mut BufferPool) -> bool {
        // Ranges of each reading that its copy found ASCII (see
        // `Core::lane_ascii`), in the core's own allocation, which goes
        // back to it on every way out (no allocation per reading).
        let mut ascii = std::mem::take(&mut self.lane_ascii);
        let got = self.pump_rx_with(id, pool, &mut ascii);
        ascii.clear();
        self.lane_ascii = ascii;
        self.flush_read_run();
        if got {
            crate::message::prefetch_stamp_clock();
        }
        // Activity on a lane is noted by `lane_idle_check`, not here.
        if got
            && let Some(c) = self.get_mut(id)
            && let Some(ConnLane::Up(up)) = c.lane.as_deref_mut()
            && up.rx.room_to_offer()
            && up.rx.take_room_wanted()
        {
            // The peer's producer waits for room, and half the ring is
            // free (`Consumer::room_to_offer`; an emptied ring always
            // is, so a producer that waits is always woken in the end).
            self.queue_control(id, Control::Wake);
        }
        got
    }

    /// [`Core::pump_rx`]'s readings, with `ascii` to collect each one's
    /// vouched ranges in.
    fn pump_rx_with(
        &mut self,
        id: ConnId,
        pool: &mut BufferPool,
        ascii: &mut Vec<std::ops::Range<usize>>,
    ) -> bool {
        let mut got = false;
        let mut read = 0;
        loop {
            if read >= LANE_READ_BUDGET {
                // The rest waits for the next turn (the ring is not empty,
                // so the reactor does not sleep before it).
                break;
            }
            ascii.clear();
            let Some(c) = self.get_mut(id) else {
                return got;
            };
            let Some(ConnLane::Up(up)) = c.lane.as_deref_mut() else {
                return got;
            };
            if !up.rx_on || !up.rx.has_data() {
                break;
            }
            let mut buf = up
                .decoder
                .recv_buf_whole(pool)
                .unwrap_or_else(|| pool.take_recv_plain());
            let space = (buf.capacity() - buf.len())
                .min(LANE_READ_BUDGET - read)
                .max(1);
            let r = up.rx.pop_into(&mut buf, space, ascii);
            up.decoder.filled_whole(buf);
            match r {
                Ok(0) => {
                    up.decoder.release(pool);
                    break;
                }
                Ok(n) => {
                    got = true;
                    read += n;
                }
                Err(e) => {
                    let peer = c.peer.as_deref().unwrap_or("").to_string();
                    log::error!("ConnectionUnix: closing connection from '{peer}': {e}");
                    self.close(id, None);
                    return got;
                }
            }
            // The ranges stand while this reading's frames are decoded
            // (the buffer is the decoder's, written no more), and not a
            // moment longer.
            std::mem::swap(&mut self.lane_ascii, ascii);
            let open = self.decode_lane_frames(id);
            std::mem::swap(&mut self.lane_ascii, ascii);
            if !open || self.paused {
                break;
            }
        }
        got
    }

    /// Takes the frames the ring brought; false if the connection closed.
    fn decode_lane_frames(&mut self, id: ConnId) -> bool {
        loop {
            let Some(c) = self.get_mut(id) else {
                return false;
            };
            let Some(ConnLane::Up(up)) = c.lane.as_deref_mut() else {
                return false;
            };
            let frame = match up.decoder.next_frame() {
                Ok(Some(f)) => f,
                Ok(None) => return true,
                Err(e) => {
                    log::error!(
                        "ConnectionUnix: closing connection from '{}': {e}",
                        c.peer.as_deref().unwrap_or("")
                    );
                    self.close(id, None);
                    return false;
                }
            };
            self.take_message(id, frame);
        }
    }

    /// Before the reactor sleeps: asks every lane's producer for a wake;
    /// false if a ring holds something already (then it must not sleep).
    pub fn lane_prepare_sleep(&mut self) -> bool {
        if self.paused {
            // A full inbox reads no ring: what waits there is looked at
            // when the application takes its messages (which wakes the
            // reactor), not by spinning now.
            return true;
        }
        let mut sleep = true;
        for &id in &self.lanes {
            if let Some(c) = self.conns.get_mut(id.slot())
                && let Some(ConnLane::Up(up)) = c.lane.as_deref_mut()
                && up.rx_on
                && !up.rx.prepare_sleep()
            {
                sleep = false;
            }
        }
        sleep
    }

    /// The reactor is awake: producers need not wake it.
    pub fn lane_end_sleep(&mut self) {
        for &id in &self.lanes {
            if let Some(c) = self.conns.get_mut(id.slot())
                && let Some(ConnLane::Up(up)) = c.lane.as_deref()
            {
                up.rx.end_sleep();
            }
        }
    }

    /// Whether `id` reads a ring that is not broken (see
    /// [`Core::drain_lane`]).
    pub(super) fn lane_to_drain(&self, id: ConnId) -> bool {
        matches!(
            self.get(id).and_then(|c| c.lane.as_deref()),
            Some(ConnLane::Up(up)) if up.rx_on && !up.rx.is_broken()
        )
    }

    /// Drains `id`'s ring whatever the inbox limit, once (its connection
    /// ends: what the peer published is not lost).
    pub(super) fn drain_lane(&mut self, id: ConnId, pool: &mut BufferPool) {
        if !self.lane_to_drain(id) {
            return;
        }
        let paused = std::mem::replace(&mut self.paused, false);
        loop {
            self.paused = false;
            if !self.pump_rx(id, pool) {
                break;
            }
        }
        self.paused = paused || self.inbox_bytes >= self.cfg.inbox_limit;
        if let Some(c) = self.get_mut(id)
            && let Some(ConnLane::Up(up)) = c.lane.as_deref_mut()
        {
            up.rx_on = false;
        }
    }

    /// Which path `peer`'s live connection takes.
    pub fn lane_of(&self, peer: &str) -> Option<LaneKind> {
        let c = self.get(self.conn_for(peer)?)?;
        Some(match c.lane.as_deref().and_then(ConnLane::up) {
            Some(up) if up.tx_on && up.rx_on => LaneKind::SharedMemory,
            _ => LaneKind::Socket,
        })
    }

    /// Whether a lane has something to do now: a ring to read (with room
    /// in the inbox) or room for an outbox that waits for it. Reads only
    /// the rings' indices: cheap enough to spin on.
    pub fn lane_ready(&mut self) -> bool {
        let paused = self.paused;
        let Core { lanes, conns, .. } = self;
        lanes.iter().any(|&id| {
            let Some(c) = conns.get_mut(id.slot()) else {
                return false;
            };
            let waits = !c.outbox.is_empty();
            let Some(ConnLane::Up(up)) = c.lane.as_deref_mut() else {
                return false;
            };
            (!paused && up.rx_on && up.rx.has_data())
                || (waits && up.tx_on && matches!(up.tx.room(), Ok(r) if r > 0))
        })
    }

    /// Whether any connection has a lane (the reactor's turns then look
    /// at the rings).
    #[inline]
    pub fn lane_count_hint(&self) -> bool {
        !self.lanes.is_empty()
    }

    /// The peer process (pid, uid) of `id`, with our lane on: descriptors
    /// may go to its beacon, if it has one (on a lane or not: the `FDS`
    /// frame and the message share the connection's outbox, so they
    /// arrive in order).
    pub fn fds_target(&self, id: ConnId) -> Option<(i32, u32)> {
        self.beacon_target(self.get(id)?)
    }

    /// The peer process whose beacon may take large payloads and
    /// descriptors from connection `c`, with our lane on. An initiator's
    /// peer is the listener it connected to: its process's beacon says it
    /// is ipcm (as for a lane's offer). An acceptor's peer is ipcm for
    /// sure on a Binary route (a Perl client cannot join one), or once it
    /// offered a lane; on a Json route without a lane it may be a Perl
    /// client in a process that also holds an ipcm listener, so nothing
    /// goes to it.
    fn beacon_target(&self, c: &Conn) -> Option<(i32, u32)> {
        if !self.cfg.lane.enabled || c.beaconless {
            return None;
        }
        let ipcm = c.role == Role::Initiator
            || c.lane.is_some()
            || matches!(self.serializer, crate::serializer::Serializer::Binary);
        if ipcm { c.lane_peer } else { None }
    }

    /// Records the process and user at the other end of `id`
    /// (`SO_PEERCRED`), when it is attached.
    pub fn set_peer_process(&mut self, id: ConnId, peer: Option<(i32, u32)>) {
        if let Some(c) = self.get_mut(id) {
            c.lane_peer = peer;
        }
    }

    /// A large frame just queued at the back of `id`'s outbox, on a
    /// connection without a lane, goes as a sealed memfd to the peer
    /// process's beacon, and a `BLOB` frame takes its place on the socket
    /// (with its byte count: nothing was told a position past it yet).
    /// A peer process without a beacon (a Perl client, or ipcm with the
    /// lane off) gets the frame itself, and is not asked again: it never
    /// sees a byte of this.
    #[cold]
    #[inline(never)]
    pub(super) fn blob_on_socket(&mut self, id: ConnId) {
        let Some(c) = self.get(id) else { return };
        if c.lane.is_some() {
            // On a lane, the ring's pump sends large frames as memfds.
            return;
        }
        let Some(peer) = self.beacon_target(c) else {
            return;
        };
        let Some(c) = self.get_mut(id) else { return };
        let Some(f) = c.outbox.back_unstarted() else {
            return;
        };
        match crate::lane::send_blob(peer, &f[HEADER_LEN..]) {
            Ok(Some(ctl)) => c.outbox.replace_back(ctl),
            Ok(None) => c.beaconless = true,
            Err(why) => crate::lane::log_unavailable(&format!("large payload as a memfd: {why}")),
        }
    }

    /// Queues a control frame on `id`'s outbox (the ring's when on a
    /// lane) whatever the outbox limit: it is a few bytes, and the frame
    /// queued next depends on it.
    pub fn enqueue_control(&mut self, id: ConnId, frame: Bytes) -> bool {
        let Core {
            conns, ids, dirty, ..
        } = self;
        let Some(c) = super::conn_mut(conns, id) else {
            return false;
        };
        c.outbox.seal(ids);
        c.outbox.push(frame);
        dirty.push(id);
        true
    }

    /// Connections holding a lane's mapping (on it, or leaving it).
    pub fn lane_mapped(&self) -> usize {
        self.lanes
            .iter()
            .filter_map(|&id| self.get(id))
            .filter(|c| matches!(c.lane.as_deref(), Some(ConnLane::Up(_))))
            .count()
    }

    /// Connections on a lane (both ways).
    pub fn lane_count(&self) -> usize {
        self.lanes
            .iter()
            .filter_map(|&id| self.get(id))
            .filter(|c| matches!(c.lane.as_deref().and_then(ConnLane::up), Some(up) if up.tx_on && up.rx_on))
            .count()
    }
}
