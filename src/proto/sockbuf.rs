//! Which connections want a large socket send buffer
//! ([`CoreConfig::socket_send_buffer`](super::CoreConfig)).
//!
//! A large buffer lets a sender of 1 KiB and 16 KiB messages run further
//! ahead of its reader, so both sides sleep and call the kernel less
//! often (6–15 % more messages a second). For 64 B messages it costs as
//! much (5–25 % fewer): the reader is then the slower side, and data that
//! waits longer in the kernel is colder when it is read. So a connection
//! asks for the large buffer only while it carries large messages, and
//! gives it back after a long run of small ones.

/// Messages of at least this many bytes (a batched message's content, or
/// a whole frame) ask for the large buffer.
pub(crate) const LARGE_MESSAGE: usize = 1024;

/// Small messages in a row after which a connection gives the large
/// buffer back (a few writes' worth: a mix of sizes does not flip it
/// back and forth).
pub(crate) const SMALL_RUN: u32 = 4096;

/// What the reactor tells a connection's socket or backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SocketHint {
    /// The socket carries only occasional control frames (a lane came
    /// up: `true`) or messages again (`false`); see
    /// [`Backend::set_quiet`](crate::reactor::Backend::set_quiet).
    Quiet(bool),
    /// The socket's send buffer: the large one (`true`) or the system's
    /// default (`false`).
    LargeSendBuffer(bool),
}

/// One connection's run of message sizes.
#[derive(Debug, Default, Clone)]
pub(crate) struct SizeWatch {
    large: bool,
    small_run: u32,
}

impl SizeWatch {
    /// Notes `count` messages of `bytes` bytes in all (a frame, or a
    /// batch); the connection's new wish when it changes. A batch counts
    /// as large when its messages are, on average.
    #[inline]
    pub(crate) fn note(&mut self, bytes: usize, count: u32) -> Option<bool> {
        if bytes >= LARGE_MESSAGE.saturating_mul(count as usize) {
            self.small_run = 0;
            if !self.large {
                self.large = true;
                return Some(true);
            }
        } else if self.large {
            self.small_run = self.small_run.saturating_add(count);
            if self.small_run >= SMALL_RUN {
                self.large = false;
                self.small_run = 0;
                return Some(false);
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn large_messages_ask_once_and_a_long_small_run_gives_it_back() {
        let mut w = SizeWatch::default();
        assert_eq!(w.note(64, 1), None, "small messages ask for nothing");
        assert_eq!(w.note(LARGE_MESSAGE - 1, 1), None);
        assert_eq!(
            w.note(LARGE_MESSAGE, 1),
            Some(true),
            "the first large one asks"
        );
        assert_eq!(w.note(16384, 1), None, "once");
        // A mix keeps it: each large message restarts the run.
        for _ in 0..3 {
            for _ in 0..SMALL_RUN - 1 {
                assert_eq!(w.note(64, 1), None);
            }
            assert_eq!(w.note(2048, 1), None);
        }
        for _ in 0..SMALL_RUN - 1 {
            assert_eq!(w.note(64, 1), None);
        }
        assert_eq!(w.note(64, 1), Some(false), "a full small run gives it back");
        assert_eq!(w.note(64, 1), None);
        assert_eq!(w.note(4096, 1), Some(true), "and a large one asks again");
    }

    #[test]
    fn batches_count_by_their_average_message() {
        let mut w = SizeWatch::default();
        assert_eq!(w.note(32 * 1024, 480), None, "480 messages of 68 bytes");
        assert_eq!(w.note(32 * 1024, 32), Some(true), "32 of 1 KiB");
        assert_eq!(w.note(32 * 1024, 33), None);
        assert_eq!(
            w.note(32 * 1024, SMALL_RUN),
            Some(false),
            "a batch of many small ones"
        );
        assert_eq!(w.note(usize::MAX, u32::MAX), Some(true), "no overflow");
    }
}
