//! What the threaded mode drives a client with: queueing a built frame,
//! its outcome, one reactor turn, and taking what arrived.

use super::*;

impl Client {
    // ----- building blocks of the threaded mode -----------------------

    /// Queues a complete frame for `peer` (connecting if needed); returns
    /// the connection and the byte count to wait for, or `None` for a
    /// self-send delivered locally. `Ok(Err(frame))` hands the frame back
    /// when the outbox is full.
    pub(crate) fn queue_frame(
        &mut self,
        peer: &str,
        frame: bytes::Bytes,
        count: u32,
    ) -> Result<std::result::Result<Option<(ConnId, u64)>, bytes::Bytes>> {
        match self.enqueue_frame(peer, frame)? {
            send::Placed::Local => Ok(Ok(None)),
            send::Placed::Queued { id, target } => {
                self.reactor.core_mut().count_sent_on(id, peer, count);
                Ok(Ok(Some((id, target))))
            }
            send::Placed::Full { frame, .. } => Ok(Err(frame)),
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

    /// Connects to `peer` if no connection is open yet (a self-send needs
    /// none): the verdict the first send to a peer would give, without
    /// queueing anything.
    pub(crate) fn ensure_connection(&mut self, peer: &str) -> Result<()> {
        self.check_usable()?;
        if peer.is_empty() {
            return Err(Error::NoPeer);
        }
        if peer == self.id {
            return Ok(());
        }
        self.conn_for_send(peer).map(drop)
    }

    /// Seals every open batch and returns, per connection with bytes not
    /// yet written, the byte count that ends what is queued now (for
    /// [`Client::frame_outcome`]).
    pub(crate) fn flush_targets(&mut self) -> Vec<(ConnId, u64)> {
        let core = self.reactor.core_mut();
        let mut out = Vec::new();
        for id in core.all_conns() {
            if let Some(target) = core.seal(id)
                && core.written_total(id).is_some_and(|w| w < target)
            {
                out.push((id, target));
            }
        }
        out
    }

    /// One reactor turn (waiting up to `timeout`).
    pub(crate) fn turn(&mut self, timeout: Option<Duration>) -> Result<()> {
        self.reactor
            .turn(timeout)
            .map_err(|e| Error::io("reactor wait failed", e))
    }

    /// Whether a wait that would sleep polls the sockets first (see
    /// [`Reactor::set_spin_on_sockets`]).
    pub(crate) fn set_spin_on_sockets(&mut self, on: bool) {
        self.reactor.set_spin_on_sockets(on);
    }

    /// The reactor now runs on the calling thread (threaded mode).
    pub(crate) fn moved_to_this_thread(&mut self) {
        self.reactor.moved_to_this_thread();
    }

    /// Starts queued operations now.
    pub(crate) fn flush(&mut self) {
        self.reactor.flush();
    }

    /// Appends what was received to `out`, in arrival order (resumed
    /// messages first), batches whole.
    pub(crate) fn take_received(&mut self, out: &mut Vec<crate::proto::Entry>) -> Result<()> {
        for m in self.take_resumed()? {
            out.push(crate::proto::Entry::One(m));
        }
        let core = self.reactor.core_mut();
        if !core.has_messages() {
            return Ok(());
        }
        let was_paused = core.is_paused();
        let mut taken = std::mem::take(&mut self.spare_entries);
        core.take_entries(&mut taken);
        out.append(&mut taken);
        self.spare_entries = taken;
        self.reactor.took_messages(was_paused);
        self.warn_failed_sends("");
        Ok(())
    }

    /// This client's id as the `to` of the batches it receives.
    pub(crate) fn local_name(&self) -> crate::message::Name {
        self.reactor.core().local_id().clone()
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
}
