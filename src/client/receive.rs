//! Receiving: `get_messages` and its waits, sorting, the resume file and
//! requeueing.

use super::*;

impl Client {
    // ----- receiving --------------------------------------------------

    /// Every message available now, sorted by stamp then stamp_ord
    /// (stamps from different clients compare as wall-clock times). Never
    /// blocks.
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

    /// Waits up to `timeout` (zero: not at all) for messages, then lends
    /// out every message received, in arrival order, borrowed from the
    /// receive buffers: iterate the [`crate::Received`] view, with no allocation,
    /// reference count or copy per message (on Binary routes a whole batch
    /// is read in place). Each sender's messages come in the order it sent
    /// them; unlike [`Client::get_messages`], messages of different
    /// senders are not sorted by stamp. Messages not kept
    /// ([`crate::MessageRef::to_message`]) are gone when the view is dropped.
    pub fn receive(&mut self, timeout: Duration) -> Result<crate::proto::Received<'_>> {
        if self.resume_pending {
            for m in self.take_resumed()? {
                self.reactor.core_mut().push_local(m);
            }
        }
        self.reactor
            .turn(Some(Duration::ZERO))
            .map_err(|e| Error::io("reactor poll failed", e))?;
        if !self.reactor.core().has_messages() && !timeout.is_zero() {
            let deadline = Instant::now() + timeout;
            let mut spins = 0u32;
            while !self.reactor.core().has_messages() {
                let wait = if self.opts.busy_poll {
                    spins = spins.wrapping_add(1);
                    if spins.is_multiple_of(64) && Instant::now() >= deadline {
                        break;
                    }
                    std::hint::spin_loop();
                    Duration::ZERO
                } else {
                    let now = Instant::now();
                    if now >= deadline {
                        break;
                    }
                    deadline - now
                };
                self.reactor
                    .turn(Some(wait))
                    .map_err(|e| Error::io("reactor wait failed", e))?;
            }
        }
        let mut entries = std::mem::take(&mut self.spare_entries);
        let core = self.reactor.core_mut();
        let was_paused = core.is_paused();
        core.take_entries(&mut entries);
        self.reactor.took_messages(was_paused);
        self.warn_failed_sends("");
        let Client {
            reactor,
            spare_entries,
            ..
        } = self;
        Ok(crate::proto::Received::new(
            entries,
            spare_entries,
            reactor.core().local_id(),
        ))
    }

    pub(super) fn collect_into(&mut self, out: &mut Vec<Message>, start: usize) {
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
    pub(super) fn warn_failed_sends(&mut self, when: &str) {
        if !self.reactor.core().has_closed() {
            return;
        }
        for c in self.reactor.core_mut().take_closed() {
            if let (Some(e), Some(p)) = (c.write_error, c.peer) {
                log::warn!(
                    "ConnectionUnix: send to '{p}' failed{when}: {}",
                    crate::error::strerror(&e)
                );
            }
        }
    }

    pub(super) fn take_resumed(&mut self) -> Result<Vec<Message>> {
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

    /// Alias of [`Client::pending_messages`] (docs/perl-differences.md,
    /// inherited-probes).
    pub fn have_pending_messages(&mut self) -> Result<bool> {
        self.pending_messages()
    }

    /// Alias of [`Client::ready_messages`] (docs/perl-differences.md,
    /// inherited-probes).
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
                &Outgoing::resend(m, m.from(), m.to().unwrap_or(&self.id)),
                &mut payload,
            )?;
            encode_frame(&payload, &mut records)?;
        }
        self.route.append_resume(&self.disk, &records)?;
        self.resume_pending = true;
        Ok(())
    }
}
