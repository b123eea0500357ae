//! The core's deadlines, in quinn-proto's contract: the core is told the
//! time (`handle_timeout(now)`) and says when it next needs to be
//! (`poll_timeout`). The hello timeout of accepted connections and the
//! accept back-off live here.

use std::io;
use std::time::{Duration, Instant};

use super::Core;

/// The accept back-off: after `accept` fails (descriptors or kernel memory
/// exhausted, or anything else), accepting pauses and is retried on a
/// deadline that doubles up to [`ACCEPT_RETRY_MAX`], so an exhausted
/// process neither spins nor loses its listener.
///
/// One warning per episode. An episode ends with a successful accept, but
/// a queue drained while descriptors trickle back fails and succeeds by
/// turns; failures within [`ACCEPT_WARN_QUIET`] of the last warning belong
/// to the same episode and are not warned about again.
#[derive(Debug, Default)]
pub(super) struct AcceptBackoff {
    /// When the failing began, how many attempts failed since, and
    /// whether it was warned about.
    pub(super) episode: Option<(Instant, u64, bool)>,
    /// When the last warning was logged.
    pub(super) warned: Option<Instant>,
    /// The current delay between attempts.
    pub(super) delay: Duration,
    /// When to try again (`None`: not waiting).
    pub(super) retry_at: Option<Instant>,
    /// The retry is due: the reactor resumes accepting.
    pub(super) resume: bool,
}

/// The first delay after a failed accept.
pub const ACCEPT_RETRY_MIN: Duration = Duration::from_millis(5);
/// The longest delay between accept attempts while they keep failing.
pub const ACCEPT_RETRY_MAX: Duration = Duration::from_millis(500);
/// Accept failures this soon after the last warning are not warned about.
pub const ACCEPT_WARN_QUIET: Duration = Duration::from_secs(10);

impl Core {
    /// When the core next needs [`Core::handle_timeout`]: the earliest of
    /// the oldest unresolved connection's hello deadline and the accept
    /// retry. `None`: no deadline; the driver may wait forever.
    ///
    /// Every driver calls this before it waits and waits no longer than
    /// the instant returned (quinn-proto's contract: the core never reads
    /// the clock for its deadlines; it is told the time).
    pub fn poll_timeout(&self) -> Option<Instant> {
        let hello = self
            .unresolved
            .front()
            .map(|&(created, _)| created + self.cfg.hello_timeout);
        [hello, self.accept.retry_at, self.lane_check_at]
            .into_iter()
            .flatten()
            .min()
    }

    /// Drops the connections at the front of the hello queue that resolved
    /// or closed, so that its front is a connection still waiting and
    /// [`Core::poll_timeout`] names no deadline that is not one (a driver
    /// would read the clock on every turn for nothing).
    pub(super) fn prune_unresolved(&mut self) {
        while let Some(&(_, id)) = self.unresolved.front() {
            if self.get(id).is_some_and(|c| c.peer.is_none()) {
                return;
            }
            self.unresolved.pop_front();
        }
    }

    /// Does what is due at `now`: closes accepted connections that sent no
    /// hello within the timeout, and makes a due accept retry known to the
    /// reactor ([`Core::take_accept_resume`]). Returns how many
    /// connections it closed. Calling it early is harmless.
    pub fn handle_timeout(&mut self, now: Instant) -> usize {
        if self.accept.retry_at.is_some_and(|at| at <= now) {
            self.accept.retry_at = None;
            self.accept.resume = true;
        }
        if self.lane_check_at.is_some_and(|at| at <= now) {
            self.lane_idle_check(now);
        }
        let timeout = self.cfg.hello_timeout;
        let mut closed = 0;
        // Oldest first: stop at the first one still waiting within its time.
        while let Some(&(created, id)) = self.unresolved.front() {
            if self.get(id).is_none_or(|c| c.peer.is_some()) {
                self.unresolved.pop_front();
                continue;
            }
            if now.saturating_duration_since(created) < timeout {
                break;
            }
            self.unresolved.pop_front();
            log::warn!(
                "ConnectionUnix: closing a connection that sent no hello within {timeout:?}"
            );
            self.close(id, None);
            closed += 1;
        }
        closed
    }

    /// `accept` failed at `now`: accepting pauses (the backend stopped
    /// after reporting the failure) and is retried after a delay that
    /// doubles while failures continue. Logs one warning per episode.
    pub fn on_accept_error(&mut self, now: Instant, err: &io::Error) {
        let b = &mut self.accept;
        match &mut b.episode {
            Some((_, failures, _)) => {
                *failures += 1;
                b.delay = (b.delay * 2).min(ACCEPT_RETRY_MAX);
            }
            None => {
                let quiet = b
                    .warned
                    .is_none_or(|w| now.saturating_duration_since(w) >= ACCEPT_WARN_QUIET);
                if quiet {
                    log::warn!(
                        "ConnectionUnix: accept failed: {}; new connections wait in the \
                         listen queue, retried every {ACCEPT_RETRY_MIN:?} to {ACCEPT_RETRY_MAX:?} \
                         until accepting succeeds",
                        crate::error::strerror(err)
                    );
                    b.warned = Some(now);
                } else {
                    log::debug!(
                        "ConnectionUnix: accept failed again: {}",
                        crate::error::strerror(err)
                    );
                }
                b.episode = Some((now, 1, quiet));
                b.delay = ACCEPT_RETRY_MIN;
            }
        }
        b.retry_at = Some(now + b.delay);
        b.resume = false;
    }

    /// An accept succeeded: ends a back-off episode (logged once).
    pub(super) fn on_accepted(&mut self, now: Instant) {
        let b = &mut self.accept;
        if let Some((since, failures, warned)) = b.episode.take() {
            let level = if warned {
                log::Level::Info
            } else {
                log::Level::Debug
            };
            log::log!(
                level,
                "ConnectionUnix: accepting again after {failures} failed attempt(s) over {:?}",
                now.saturating_duration_since(since)
            );
            b.delay = Duration::ZERO;
            b.retry_at = None;
            b.resume = false;
        }
    }

    /// Whether accepting is backed off after a failure.
    #[cfg(test)]
    pub fn accept_backed_off(&self) -> bool {
        self.accept.episode.is_some()
    }

    /// Whether the reactor should resume accepting now (a retry became
    /// due); true once per retry.
    pub fn take_accept_resume(&mut self) -> bool {
        std::mem::take(&mut self.accept.resume)
    }
}
