//! A connection's outbox: whole frames in order, the write position inside
//! the first one, and byte counters.
//!
//! Frames are never interleaved: a partly written frame stays at the front
//! until its last byte is written.

use std::collections::VecDeque;

use bytes::Bytes;

/// Frames waiting to be written on one connection.
#[derive(Debug, Default)]
pub struct Outbox {
    frames: VecDeque<Bytes>,
    /// Bytes of `frames[0]` already written.
    offset: usize,
    queued: usize,
    enqueued_total: u64,
    written_total: u64,
    /// Frames an in-flight write may still be reading.
    in_flight: usize,
}

impl Outbox {
    /// Appends a frame.
    pub fn push(&mut self, frame: Bytes) {
        self.queued += frame.len();
        self.enqueued_total += frame.len() as u64;
        self.frames.push_back(frame);
    }

    /// Appends every frame of `other`.
    pub fn append(&mut self, other: Outbox) {
        debug_assert_eq!(other.offset, 0);
        for f in other.frames {
            self.push(f);
        }
    }

    /// Whether nothing is queued.
    pub fn is_empty(&self) -> bool {
        self.frames.is_empty()
    }

    /// Bytes not yet written.
    pub fn queued_bytes(&self) -> usize {
        self.queued
    }

    /// Bytes ever queued.
    pub fn enqueued_total(&self) -> u64 {
        self.enqueued_total
    }

    /// Bytes ever written.
    pub fn written_total(&self) -> u64 {
        self.written_total
    }

    /// Bytes of the first frame already written.
    pub fn front_offset(&self) -> usize {
        self.offset
    }

    /// The queued frames, first one whole (see [`Outbox::front_offset`]).
    pub fn frames(&self) -> impl Iterator<Item = &Bytes> {
        self.frames.iter()
    }

    pub(crate) fn set_in_flight(&mut self, n: usize) {
        self.in_flight = n;
    }

    /// Marks `n` bytes written, dropping completed frames.
    pub fn advance(&mut self, mut n: usize) {
        self.written_total += n as u64;
        self.queued -= n.min(self.queued);
        while n > 0 {
            let Some(front) = self.frames.front() else {
                break;
            };
            let rest = front.len() - self.offset;
            if n >= rest {
                n -= rest;
                self.offset = 0;
                self.frames.pop_front();
            } else {
                self.offset += n;
                n = 0;
            }
        }
    }

    /// Removes and returns the frames no write has touched yet (neither
    /// partly written nor covered by an in-flight write).
    pub fn take_unstarted(&mut self) -> Outbox {
        let keep = self.in_flight.max(usize::from(self.offset > 0));
        let mut out = Outbox::default();
        while self.frames.len() > keep {
            if let Some(f) = self.frames.pop_back() {
                self.queued -= f.len();
                out.frames.push_front(f);
            }
        }
        out.queued = out.frames.iter().map(Bytes::len).sum();
        out.enqueued_total = out.queued as u64;
        // Those bytes will never be written here.
        self.enqueued_total -= out.enqueued_total;
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn advance_walks_frames_without_interleaving() {
        let mut o = Outbox::default();
        o.push(Bytes::from_static(b"abcd"));
        o.push(Bytes::from_static(b"ef"));
        o.advance(3);
        assert_eq!(o.front_offset(), 3);
        let v: Vec<&Bytes> = o.frames().collect();
        assert_eq!(&v[0][o.front_offset()..], b"d");
        assert_eq!(&v[1][..], b"ef");
        o.advance(3);
        assert!(o.is_empty());
        assert_eq!(o.written_total(), 6);
        assert_eq!(o.queued_bytes(), 0);
    }

    #[test]
    fn unstarted_frames_exclude_partial_and_held() {
        let mut o = Outbox::default();
        for f in [&b"11"[..], b"22", b"33"] {
            o.push(Bytes::copy_from_slice(f));
        }
        o.advance(1);
        let t = o.take_unstarted();
        assert_eq!(t.frames().count(), 2);
        assert_eq!(o.frames().count(), 1);
        assert_eq!(o.queued_bytes(), 1);
        let mut o = Outbox::default();
        for f in [&b"11"[..], b"22", b"33"] {
            o.push(Bytes::copy_from_slice(f));
        }
        o.set_in_flight(2);
        assert_eq!(o.take_unstarted().frames().count(), 1);
    }
}
