//! Sending: blocking and non-blocking sends, the outbox, broadcasts and
//! self-sends.

use super::*;

/// How far a send goes before it returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Delivery {
    /// Queued only: written at the next drain or reactor turn
    /// (`queue_message`); a full outbox is `WouldBlock`.
    Queue,
    /// Queued and written as far as the kernel takes it now
    /// (`try_send_message`); a full outbox is `WouldBlock`.
    Start,
    /// Written whole to the kernel, waiting for outbox room and for the
    /// write (a blocking `send_message`), within `Options::send_timeout`.
    Complete,
}

/// Where [`Client::enqueue_frame`] put a frame.
pub(super) enum Placed {
    /// A self-send, delivered to this client's own inbox.
    Local,
    /// In the outbox of `id`, ending at byte `target` of its stream.
    Queued { id: ConnId, target: u64 },
    /// The outbox of `id` has no room: the frame comes back.
    Full {
        id: ConnId,
        frame: Bytes,
        queued: usize,
    },
}

impl Client {
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

    /// The cached connection to `peer`, or a new one to its socket.
    #[inline(always)]
    pub(super) fn conn_for_send(&mut self, peer: &str) -> Result<ConnId> {
        match self.cached_conn(peer) {
            Some(id) => Ok(id),
            None => self.conn_for_send_slow(peer, self.reactor.core().peers_epoch()),
        }
    }

    /// The connection of `peer` if it is the last peer sent to and its
    /// connection is still the live one.
    #[inline(always)]
    fn cached_conn(&self, peer: &str) -> Option<ConnId> {
        match self.send_cache.conn {
            Some((id, at))
                if at == self.reactor.core().peers_epoch()
                    && same_name(self.send_cache.peer.as_bytes(), peer.as_bytes()) =>
            {
                Some(id)
            }
            _ => None,
        }
    }

    /// [`Client::conn_for_send`] when the peer is not the last one sent to.
    #[inline(never)]
    fn conn_for_send_slow(&mut self, peer: &str, epoch: u64) -> Result<ConnId> {
        if peer.is_empty() {
            return Err(Error::NoPeer);
        }
        if let Some(id) = self.reactor.core().conn_for(peer) {
            self.send_cache.remember(peer, id, epoch);
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

    pub(super) fn encode<T: Serialize + ?Sized>(
        &mut self,
        to: &str,
        content: Content<'_, T>,
        broadcast: bool,
    ) -> Result<bytes::Bytes> {
        let from = self.id.as_str();
        self.reactor.core_mut().new_frame(|ser, out| {
            let mut msg = Outgoing::new(from, to, content);
            msg.broadcast = broadcast;
            ser.encode_message(&msg, out)
        })
    }

    /// Sends `content` to `peer` with `fds` attached (blocking, as
    /// [`Client::send_message`]); the peer gets them as `OwnedFd`s from
    /// [`Message::take_fds`](crate::Message::take_fds), on a
    /// shared-memory lane or on the socket. Only an ipcm peer whose
    /// process takes descriptors (it holds a listening ipcm client with the
    /// lane on, or is on a lane with this one) gets them
    /// ([`Error::NoLane`] otherwise, nothing sent); at most 16 per message.
    /// The descriptors are closed here once passed (the peer's are
    /// copies).
    pub fn send_message_with_fds<T: Serialize + ?Sized>(
        &mut self,
        peer: &str,
        content: &T,
        fds: Vec<std::os::fd::OwnedFd>,
    ) -> Result<()> {
        self.check_usable()?;
        if fds.is_empty() {
            return self.send_message(peer, content);
        }
        // The message first, so that a failure to encode it passes nothing.
        let frame = self.encode(peer, Content::Value(content), false)?;
        self.pass_fds(peer, fds)?;
        self.send_frame(peer, frame, Delivery::Complete)
    }

    /// Passes `fds` to `peer`'s process and queues the `FDS` frame that
    /// gives them to the next message queued to `peer` (the caller's, right
    /// after this).
    pub(crate) fn pass_fds(&mut self, peer: &str, fds: Vec<std::os::fd::OwnedFd>) -> Result<()> {
        let no_lane = |why: &str| Error::NoLane {
            peer: peer.to_string(),
            why: why.to_string(),
        };
        if fds.len() > crate::lane::pass::MAX_FDS {
            return Err(no_lane("more than 16 descriptors"));
        }
        let id = self.conn_for_send(peer)?;
        let Some(target) = self.reactor.core().fds_target(id) else {
            return Err(no_lane("the lane is off, or the peer may not be ipcm"));
        };
        let borrowed: Vec<_> = fds.iter().map(std::os::fd::AsFd::as_fd).collect();
        let ctl = crate::lane::send_fds(target, &borrowed).map_err(|e| no_lane(&e))?;
        drop(borrowed);
        drop(fds);
        if !self.reactor.core_mut().enqueue_control(id, ctl) {
            return Err(self.closed_error(id));
        }
        Ok(())
    }

    /// Why connection `id` went away; `Ok` if it had written `target`
    /// bytes first (the frame reached the kernel before the close).
    pub(super) fn closed_outcome(&mut self, id: ConnId, target: u64) -> Result<()> {
        // Found below, or (its record taken already, by a receive's
        // warning) in the history of closes.
        let mut outcome = match self.reactor.core().closed_written(id) {
            Some((written, _)) if written >= target => Ok(()),
            Some((_, errno)) => Err(errno.map(io::Error::from_raw_os_error)),
            None => Err(None),
        };
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

    /// The refusal of a send that found `peer`'s outbox full with
    /// `queued` bytes.
    #[cold]
    #[inline(never)]
    fn outbox_full(&self, peer: &str, queued: usize) -> Error {
        Error::WouldBlock {
            peer: peer.to_string(),
            queued,
            limit: self.opts.limits.outbox_limit,
        }
    }

    pub(super) fn closed_error(&mut self, id: ConnId) -> Error {
        match self.closed_outcome(id, u64::MAX) {
            Err(e) => e,
            Ok(()) => Error::Write {
                err: io::Error::from_raw_os_error(libc::EPIPE).into(),
            },
        }
    }

    /// The one way a frame is queued: a self-send is delivered locally;
    /// otherwise the frame goes into the outbox of the connection to `peer`
    /// (connecting first). Every send path comes through here.
    #[inline(always)]
    pub(super) fn enqueue_frame(&mut self, peer: &str, frame: Bytes) -> Result<Placed> {
        self.check_usable()?;
        if peer.is_empty() {
            return Err(Error::NoPeer);
        }
        if peer == self.id {
            self.send_to_self(frame)?;
            return Ok(Placed::Local);
        }
        let id = self.conn_for_send(peer)?;
        self.place(id, frame)
    }

    /// Queues `frame` on connection `id`.
    #[inline(always)]
    fn place(&mut self, id: ConnId, frame: Bytes) -> Result<Placed> {
        match self.reactor.core_mut().enqueue(id, frame) {
            Enqueue::Queued(target) => Ok(Placed::Queued { id, target }),
            Enqueue::Full { queued, frame } => Ok(Placed::Full { id, frame, queued }),
            Enqueue::Gone => Err(self.closed_error(id)),
        }
    }

    /// Sends a built frame to `peer` as far as `how` says, counting it as
    /// sent once it got there (a hard write error is returned, not
    /// counted).
    // Inlined: each caller's Delivery is a constant, and the hot
    // path keeps no call layers (callgrind counts them).
    #[inline(always)]
    pub(super) fn send_frame(&mut self, peer: &str, frame: Bytes, how: Delivery) -> Result<()> {
        // Only a blocking send waits, and it reads the clock only then.
        let mut deadline = match how {
            Delivery::Complete => self.send_deadline(),
            _ => Deadline::NONE,
        };
        let mut placed = self.enqueue_frame(peer, frame)?;
        let (id, target) = loop {
            match placed {
                Placed::Local => return Ok(()),
                Placed::Queued { id, target } => break (id, target),
                Placed::Full { queued, .. } if how != Delivery::Complete => {
                    return Err(self.outbox_full(peer, queued));
                }
                Placed::Full { id, frame, .. } => {
                    self.wait_turn(&mut deadline, "room in the outbox")?;
                    placed = self.place(id, frame)?;
                }
            }
        };
        let counted = id;
        match how {
            Delivery::Queue => {}
            Delivery::Start => {
                self.reactor.flush_after_send(id);
                let (id, target) = self.reactor.core().locate(id, target);
                if !self.reactor.core().is_open(id) {
                    // A frame already handed to the kernel counts as sent
                    // even if the connection closed right after.
                    self.closed_outcome(id, target)?;
                }
            }
            Delivery::Complete => {
                self.reactor.flush_after_send(id);
                self.wait_written(id, target, &mut deadline)?;
            }
        }
        self.reactor.core_mut().count_sent_on(counted, peer, 1);
        Ok(())
    }

    /// Sends one message of this client's to `peer` on a Binary route: it
    /// is appended to the open batch of the connection (no frame of its
    /// own), and goes as far as `how` says. Hellos, broadcasts, resent
    /// messages and self-sends are single frames ([`Client::send_frame`]).
    #[inline(always)]
    pub(super) fn send_batched<T: Serialize + ?Sized>(
        &mut self,
        peer: &str,
        content: Content<'_, T>,
        how: Delivery,
    ) -> Result<()> {
        self.check_usable()?;
        // The last peer sent to (never this client itself, never empty);
        // anyone else is looked at first.
        let id = match self.cached_conn(peer) {
            Some(id) => id,
            None => {
                if peer.is_empty() {
                    return Err(Error::NoPeer);
                }
                if peer == self.id {
                    let frame = self.encode(peer, content, false)?;
                    return self.send_to_self(frame);
                }
                self.conn_for_send(peer)?
            }
        };
        let mut deadline = match how {
            Delivery::Complete => self.send_deadline(),
            _ => Deadline::NONE,
        };
        loop {
            let core = self.reactor.core_mut();
            let appended = match content {
                Content::Raw(r) => core.append_raw(id, trim_json(r).as_bytes())?,
                Content::Value(v) => core.append(id, 0, |out| {
                    serde_json::to_writer(bytes::BufMut::writer(out), v).map_err(Error::from)
                })?,
            };
            match appended {
                Append::Queued => break,
                Append::Full { queued } if how != Delivery::Complete => {
                    return Err(self.outbox_full(peer, queued));
                }
                Append::Full { .. } => self.wait_turn(&mut deadline, "room in the outbox")?,
                Append::Gone => return Err(self.closed_error(id)),
            }
        }
        if how == Delivery::Queue {
            return Ok(());
        }
        let Some(target) = self.reactor.core_mut().seal(id) else {
            return Err(self.closed_error(id));
        };
        self.reactor.flush_after_send(id);
        match how {
            Delivery::Start => {
                let (id, target) = self.reactor.core().locate(id, target);
                if !self.reactor.core().is_open(id) {
                    self.closed_outcome(id, target)?;
                }
                Ok(())
            }
            _ => self.wait_written(id, target, &mut deadline),
        }
    }

    /// Waits until the frame ending at byte `target` of `id`'s stream is
    /// written (it may move to a newer connection to the same peer).
    fn wait_written(
        &mut self,
        mut id: ConnId,
        mut target: u64,
        deadline: &mut Deadline,
    ) -> Result<()> {
        loop {
            (id, target) = self.reactor.core().locate(id, target);
            if !self.reactor.core().is_open(id) {
                // Written before the close counts as sent.
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

    /// The deadline of a blocking send ([`Options::send_timeout`]).
    fn send_deadline(&self) -> Deadline {
        Deadline::after(self.opts.send_timeout)
    }

    /// One reactor turn of a wait for `what`, which ends at `deadline`
    /// (the instant, and the timeout it came from, for the error);
    /// busy polling spins instead of sleeping.
    pub(super) fn wait_turn(&mut self, deadline: &mut Deadline, what: &'static str) -> Result<()> {
        let mut wait = Duration::from_millis(500);
        if let Some(left) = deadline.left(what)? {
            wait = wait.min(left);
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
    pub(super) fn send_to_self(&mut self, frame: Bytes) -> Result<()> {
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

    pub(super) fn send_content<T: Serialize + ?Sized>(
        &mut self,
        peer: &str,
        content: Content<'_, T>,
        blocking: bool,
        broadcast: bool,
    ) -> Result<()> {
        let how = if blocking {
            Delivery::Complete
        } else {
            Delivery::Start
        };
        if !broadcast && matches!(self.serializer, Serializer::Binary) {
            return self.send_batched(peer, content, how);
        }
        let frame = self.encode(peer, content, broadcast)?;
        self.send_frame(peer, frame, how)
    }

    /// Sends `content` to `peer`. In blocking mode (the
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
        let frame = self
            .reactor
            .core_mut()
            .new_frame(|ser, out| ser.encode_message(&Outgoing::resend(msg, &from, &peer), out))?;
        let how = if self.send_blocking {
            Delivery::Complete
        } else {
            Delivery::Start
        };
        self.send_frame(&peer, frame, how)
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

    /// Non-blocking send: queues the frame, writes what the
    /// kernel takes now and leaves the rest for [`Client::drain_pending`].
    /// A full outbox is [`Error::WouldBlock`] (nothing queued); a hard write
    /// error is returned, not counted as sent (docs/perl-differences.md,
    /// non-blocking-failure).
    pub fn try_send_message<T: Serialize + ?Sized>(
        &mut self,
        peer: &str,
        content: &T,
    ) -> Result<()> {
        self.send_content(peer, Content::Value(content), false, false)
    }

    /// Non-blocking send of an already-serialized payload
    /// (docs/perl-differences.md, raw-payloads).
    pub fn try_send_raw(&mut self, peer: &str, payload: &[u8]) -> Result<()> {
        self.check_usable()?;
        let mut out = BytesMut::new();
        encode_frame(payload, &mut out)?;
        self.send_frame(peer, out.freeze(), Delivery::Start)
    }

    /// Queues a message without writing anything; it goes out, batched with
    /// everything else queued, at the next [`Client::drain_pending`] or
    /// reactor turn. A full outbox is [`Error::WouldBlock`].
    pub fn queue_message<T: Serialize + ?Sized>(&mut self, peer: &str, content: &T) -> Result<()> {
        self.queue_content(peer, Content::Value(content))
    }

    /// [`Client::queue_message`] for content that is already JSON text
    /// (sent as is, as [`Client::send_json`] does).
    #[inline]
    pub fn queue_json(&mut self, peer: &str, content_json: &str) -> Result<()> {
        // The hot path, kept small (few registers to save): a Binary
        // route, a usable client, the peer last sent to. Anything else,
        // and any outcome but a queued message, goes the general way.
        if matches!(self.serializer, Serializer::Binary)
            && !self.disconnected
            && crate::fork::generation_registered() == self.fork_generation
            && let Some(id) = self.cached_conn(peer)
        {
            let content = trim_json(content_json).as_bytes();
            return match self.reactor.core_mut().append_raw(id, content) {
                Ok(Append::Queued) => Ok(()),
                other => self.queued_outcome(peer, id, other),
            };
        }
        self.queue_json_general(peer, content_json)
    }

    /// [`Client::queue_json`] off its hot path (a Json route, a peer not
    /// sent to last, a client that cannot send), as one call: inlined,
    /// the general path would weigh on every caller's hot path.
    #[inline(never)]
    fn queue_json_general(&mut self, peer: &str, content_json: &str) -> Result<()> {
        self.queue_content::<()>(peer, Content::Raw(content_json))
    }

    /// What a queued append on the hot path ([`Client::queue_json`]) that
    /// did not simply queue means, as [`Client::send_batched`] would say.
    #[cold]
    #[inline(never)]
    fn queued_outcome(
        &mut self,
        peer: &str,
        id: ConnId,
        appended: crate::Result<Append>,
    ) -> Result<()> {
        match appended? {
            Append::Queued => Ok(()),
            Append::Full { queued } => Err(self.outbox_full(peer, queued)),
            Append::Gone => Err(self.closed_error(id)),
        }
    }

    pub(super) fn queue_content<T: Serialize + ?Sized>(
        &mut self,
        peer: &str,
        content: Content<'_, T>,
    ) -> Result<()> {
        if matches!(self.serializer, Serializer::Binary) {
            return self.send_batched(peer, content, Delivery::Queue);
        }
        let frame = self.encode(peer, content, false)?;
        self.send_frame(peer, frame, Delivery::Queue)
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
        let mut deadline = Deadline::after(timeout);
        self.reactor.flush();
        while self.have_pending_sends() {
            self.wait_turn(&mut deadline, "queued messages to be written")?;
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
    /// (false without a connection, as in Perl; docs/perl-differences.md,
    /// can-send-to).
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

    pub(super) fn broadcast_content<T: Serialize + ?Sized>(
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
}

/// `text` without surrounding whitespace (usually none: two byte tests).
/// JSON whitespace is below `!`; a text that starts or ends with any other
/// byte at or below it is trimmed as `str::trim` does (a non-ASCII first or
/// last byte is no valid JSON text either way, and is left as it is).
#[inline(always)]
fn trim_json(text: &str) -> &str {
    match text.as_bytes() {
        [first, .., last] if *first > b' ' && *last > b' ' => text,
        _ => text.trim(),
    }
}

/// Whether two peer names are equal: names of 4 to 16 bytes (the usual)
/// are compared as two overlapping words each, with no call to `memcmp`.
#[inline(always)]
fn same_name(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    if a.len() > 8 && a.len() <= 16 {
        if let (Some(a0), Some(b0), Some(a1), Some(b1)) = (
            a.first_chunk::<8>(),
            b.first_chunk::<8>(),
            a.last_chunk::<8>(),
            b.last_chunk::<8>(),
        ) {
            return a0 == b0 && a1 == b1;
        }
    } else if a.len() >= 4
        && a.len() <= 8
        && let (Some(a0), Some(b0), Some(a1), Some(b1)) = (
            a.first_chunk::<4>(),
            b.first_chunk::<4>(),
            a.last_chunk::<4>(),
            b.last_chunk::<4>(),
        )
    {
        return a0 == b0 && a1 == b1;
    }
    a == b
}

#[cfg(test)]
mod tests {
    use super::same_name;
    use crate::{BackendChoice, Client, Info, Options, Route, Serializer};
    use std::time::{Duration, Instant};

    /// A frame written before its connection closed counts as sent even
    /// when the close's record was taken by another path first (a
    /// receive's warning): the threaded mode's flush once reported
    /// `EPIPE` for a peer that had read everything and left.
    #[test]
    fn written_before_the_close_stays_sent_after_the_record_is_taken() {
        for backend in [BackendChoice::Epoll, BackendChoice::IoUring] {
            if backend == BackendChoice::IoUring && crate::io_uring_available().is_err() {
                eprintln!("io_uring unavailable: only epoll checked");
                continue;
            }
            let route = Route::spawn(None).unwrap();
            let info = Info::new(Serializer::Binary, route.path());
            let opts = Options::new().backend(backend).lane(false);
            let mut b = Client::connect(&info, "b", opts.clone()).unwrap();
            let mut a = Client::connect(&info, "a", opts).unwrap();
            for i in 0..100 {
                a.queue_json("b", &i.to_string()).unwrap();
            }
            let targets = a.flush_targets();
            assert_eq!(targets.len(), 1, "one connection with bytes to write");
            let (id, target) = targets[0];
            a.flush_pending(Some(Duration::from_secs(10))).unwrap();
            let mut got = 0;
            let deadline = Instant::now() + Duration::from_secs(10);
            while got < 100 {
                assert!(Instant::now() < deadline, "{got} of 100 arrived");
                got += b
                    .get_messages_timeout(Duration::from_millis(10))
                    .unwrap()
                    .len();
            }
            b.disconnect(None).unwrap();
            // `a` sees the end of the stream; its receive takes the close's
            // record (and would log a write error, had there been one).
            while a.reactor.core().is_open(id) {
                assert!(Instant::now() < deadline, "the close never came");
                a.get_messages_timeout(Duration::from_millis(10)).unwrap();
            }
            assert!(a.reactor.core_mut().take_closed().is_empty());
            assert!(matches!(a.frame_outcome(id, target), Some(Ok(()))));
            // A frame past what was written is still a failure.
            assert!(matches!(a.frame_outcome(id, target + 1), Some(Err(_))));
            a.disconnect(None).unwrap();
            route.unspawn().unwrap();
        }
    }

    #[test]
    fn names_compare_as_slices_do() {
        let names: Vec<Vec<u8>> = (0..40)
            .flat_map(|len| {
                let base: Vec<u8> = (0..len).map(|i| b'a' + (i % 26) as u8).collect();
                let mut variants = vec![base.clone()];
                for i in 0..len {
                    let mut v = base.clone();
                    v[i] ^= 1;
                    variants.push(v);
                }
                variants
            })
            .collect();
        for a in &names {
            for b in &names {
                assert_eq!(same_name(a, b), a == b, "{a:?} {b:?}");
            }
        }
    }
}

/// A wait's deadline, `timeout` after the wait begins: the clock is read
/// at the first [`Deadline::left`], so a send that completes without
/// waiting reads no clock (a blocking send on a shared-memory lane
/// usually does not wait; two clock reads were a tenth of its cost).
#[derive(Debug, Clone, Copy)]
pub(super) struct Deadline {
    timeout: Option<Duration>,
    at: Option<Instant>,
}

impl Deadline {
    /// No deadline: waits are bounded only by their turn's own cap.
    pub(super) const NONE: Deadline = Deadline {
        timeout: None,
        at: None,
    };

    /// A deadline `timeout` after the first look at it (none if `None`).
    pub(super) fn after(timeout: Option<Duration>) -> Self {
        Deadline { timeout, at: None }
    }

    /// The time left (`None`: no deadline), or [`Error::Timeout`] for
    /// `what` once it has passed.
    pub(super) fn left(&mut self, what: &'static str) -> Result<Option<Duration>> {
        let Some(timeout) = self.timeout else {
            return Ok(None);
        };
        let now = Instant::now();
        let at = *self.at.get_or_insert(now + timeout);
        if now >= at {
            return Err(Error::Timeout {
                what,
                secs: timeout.as_secs_f64(),
            });
        }
        Ok(Some(at - now))
    }
}
