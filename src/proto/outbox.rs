//! A connection's outbox: whole frames in order, the write position inside
//! the first one, byte counters, and on Binary routes the batch being
//! filled.
//!
//! Frames are never interleaved: a partly written frame stays at the front
//! until its last byte is written. The open batch is one contiguous buffer
//! (frame header, batch header, records) that messages are appended to; it
//! is sealed into a frame, behind every frame queued before it, when the
//! connection's write starts, when it is full, or when a frame of another
//! kind is queued after it.

use std::collections::VecDeque;

use bytes::{BufMut, Bytes, BytesMut};

use crate::error::Error;
use crate::message::{IdSeq, reserve_stamps};
use crate::serializer::binary::{
    BATCH_HEADER_SIZE, MAX_BATCH_COUNT, MAX_RECORD, RECORD_LEN_SIZE, batch_header, record_len_bytes,
};
use crate::wire::{BufferPool, FrameHeader, HEADER_LEN};
use zerocopy::IntoBytes;

/// Payload bytes after which a batch is sealed (a record that would take
/// it past this starts the next batch; one larger record is a batch of
/// its own). Half a receive buffer's window: a receive stops at the
/// window of a pooled buffer, and the frame it leaves incomplete there is
/// completed in the 40 KiB of slack behind it (`wire::RecvInto`) when it
/// fits, which a batch of 32 KiB plus one record of up to 8 KiB always
/// does; a longer frame is copied into the next buffer. 64 B messages
/// still go some 500 to a batch.
pub const BATCH_BYTES: usize = 32 * 1024;

/// Bytes in front of the first record of a batch frame.
const BATCH_PREFIX: usize = HEADER_LEN + BATCH_HEADER_SIZE;

/// Bytes in front of the content of a batch of one message: frame header,
/// batch header, record length.
pub(crate) const LONE_PREFIX: usize = BATCH_PREFIX + RECORD_LEN_SIZE;

/// The frame header and batch header of a batch of `count` messages whose
/// frame payload is `payload` bytes, sealed now: its stamp (one clock
/// read), ordinals and ids are given.
fn batch_prefix(count: u32, payload: usize, ids: &mut IdSeq) -> [u8; BATCH_PREFIX] {
    let (stamp, first_ord) = reserve_stamps(count);
    let first_id = ids.take(count);
    let mut out = [0; BATCH_PREFIX];
    out[..HEADER_LEN].copy_from_slice(FrameHeader::new(payload as u32).as_bytes());
    out[HEADER_LEN..].copy_from_slice(batch_header(count, stamp, first_ord, first_id).as_bytes());
    out
}

/// The bytes in front of `len` bytes of content that make them a batch
/// frame of one message, sealed now (see [`Outbox::count_passed`]): for a
/// large message written where it is to go, not appended to a batch.
pub(crate) fn lone_prefix(len: usize, ids: &mut IdSeq) -> [u8; LONE_PREFIX] {
    debug_assert!(len <= MAX_RECORD);
    let mut out = [0; LONE_PREFIX];
    out[..BATCH_PREFIX].copy_from_slice(&batch_prefix(
        1,
        BATCH_HEADER_SIZE + RECORD_LEN_SIZE + len,
        ids,
    ));
    out[BATCH_PREFIX..].copy_from_slice(&record_len_bytes(len));
    out
}

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
    /// The open batch: frame header and batch header (both written when it
    /// is sealed), then its records. Empty when `open_count` is 0.
    open: BytesMut,
    /// Messages in the open batch.
    open_count: u32,
    /// Record bytes the open batch still takes without being sealed
    /// (within [`BATCH_BYTES`] and the buffer's capacity); 0 when none is
    /// open.
    room: usize,
    /// The sizes of the messages queued (whether the socket wants the
    /// large send buffer), and a change of that wish not yet taken.
    sizes: super::sockbuf::SizeWatch,
    size_wish: Option<bool>,
}

// The byte limit keeps a batch below the count limit (a record takes at
// least five bytes), so appending checks bytes only.
const _: () = assert!(BATCH_BYTES / (RECORD_LEN_SIZE + 1) < MAX_BATCH_COUNT as usize);
const _: () = assert!(BATCH_BYTES < MAX_RECORD);

/// Outcome of [`Outbox::append`].
#[derive(Debug, PartialEq, Eq)]
pub enum Appended {
    /// In the open batch.
    Queued,
    /// In a batch just opened (the connection needs a write started).
    Opened,
}

impl Outbox {
    /// An empty outbox that continues `before`'s stream: its byte counts
    /// start at `before`'s total, and it goes on watching the sizes of
    /// the connection's messages (the socket's send buffer is the
    /// connection's, whichever outbox fills it).
    pub(crate) fn continuing(before: &Outbox) -> Self {
        let total = before.enqueued_total;
        Outbox {
            enqueued_total: total,
            written_total: total,
            sizes: before.sizes.clone(),
            ..Outbox::default()
        }
    }

    /// Appends a frame (behind the open batch, which the caller seals
    /// first).
    pub fn push(&mut self, frame: Bytes) {
        self.push_counted(frame, 1);
    }

    /// [`Outbox::push`] of a frame of `messages` messages.
    #[inline]
    fn push_counted(&mut self, frame: Bytes, messages: u32) {
        debug_assert_eq!(self.open_count, 0, "an open batch is sealed first");
        if let Some(wish) = self.sizes.note(frame.len(), messages) {
            self.size_wish = Some(wish);
        }
        self.queued += frame.len();
        self.enqueued_total += frame.len() as u64;
        self.frames.push_back(frame);
    }

    /// Whether nothing is queued (no frame, no open batch).
    pub fn is_empty(&self) -> bool {
        self.frames.is_empty() && self.open_count == 0
    }

    /// Bytes not yet written (the open batch included).
    pub fn queued_bytes(&self) -> usize {
        self.queued + self.open.len()
    }

    /// Appends one message whose content `write` puts into the buffer
    /// (`hint`: its size, if known) to the open batch, opening one if
    /// needed: a record of a batch from this connection's sender to its
    /// receiver. Nothing is appended on error.
    #[inline(always)]
    pub(crate) fn append(
        &mut self,
        hint: usize,
        pool: &mut BufferPool,
        ids: &mut IdSeq,
        write: impl FnOnce(&mut BytesMut) -> Result<(), Error>,
    ) -> Result<Appended, Error> {
        let need = RECORD_LEN_SIZE + hint;
        let opened = need > self.room;
        if opened {
            self.seal(ids);
            self.start_batch(need, pool);
        }
        let at = self.open.len();
        self.open.put_slice(&[0; RECORD_LEN_SIZE]);
        if let Err(e) = write(&mut self.open) {
            self.unappend(at);
            return Err(e);
        }
        let content = &self.open[at + RECORD_LEN_SIZE..];
        let len = content.len();
        if len == 0 || content == b"null" {
            self.unappend(at);
            return Err(Error::ContentRequired);
        }
        if len > MAX_RECORD {
            self.unappend(at);
            return Err(Error::FrameTooLarge {
                len,
                max: MAX_RECORD,
            });
        }
        self.open[at..at + RECORD_LEN_SIZE].copy_from_slice(&record_len_bytes(len));
        self.open_count += 1;
        self.update_room();
        Ok(if opened {
            Appended::Opened
        } else {
            Appended::Queued
        })
    }

    /// [`Outbox::append`] of content given as bytes (the hot path: one
    /// capacity check, two copies).
    #[inline(always)]
    pub(crate) fn append_raw(
        &mut self,
        content: &[u8],
        pool: &mut BufferPool,
        ids: &mut IdSeq,
    ) -> Result<Appended, Error> {
        let len = content.len();
        // One compare for any content longer than `null`.
        if len <= 4 && (len == 0 || (len == 4 && content[..4] == *b"null")) {
            return Err(Error::ContentRequired);
        }
        let need = RECORD_LEN_SIZE + len;
        let opened = need > self.room;
        if opened {
            // (Within the room a record is below BATCH_BYTES.)
            if len > MAX_RECORD {
                return Err(Error::FrameTooLarge {
                    len,
                    max: MAX_RECORD,
                });
            }
            self.seal(ids);
            self.start_batch(need, pool);
        }
        let at = self.open.len();
        debug_assert!(self.open.capacity() - at >= need);
        // SAFETY: the room (or the batch just started for this record)
        // guarantees `need` bytes of spare capacity after `at`: both copies
        // stay inside the allocation, write initialised bytes over spare
        // ones, and `set_len` covers exactly what they wrote.
        unsafe {
            let dst = self.open.as_mut_ptr().add(at);
            std::ptr::copy_nonoverlapping(record_len_bytes(len).as_ptr(), dst, RECORD_LEN_SIZE);
            copy_record(content.as_ptr(), dst.add(RECORD_LEN_SIZE), len);
            self.open.set_len(at + need);
        }
        self.open_count += 1;
        if opened {
            self.update_room();
        } else {
            self.room -= need;
        }
        Ok(if opened {
            Appended::Opened
        } else {
            Appended::Queued
        })
    }

    /// Record bytes the open batch takes now without a check of the
    /// outbox limit or a seal (see [`Outbox::cap_room`]).
    #[inline(always)]
    pub fn room(&self) -> usize {
        self.room
    }

    /// Lowers [`Outbox::room`] to what `limit` leaves: appends within it
    /// keep the outbox within its limit without looking at it again (what
    /// written bytes free up is seen when the room runs out).
    #[inline]
    pub fn cap_room(&mut self, limit: usize) {
        self.room = self.room.min(limit.saturating_sub(self.queued_bytes()));
    }

    /// Recomputes [`Outbox::room`] after the open batch grew.
    #[inline]
    fn update_room(&mut self) {
        let len = self.open.len();
        self.room = (BATCH_PREFIX + BATCH_BYTES)
            .saturating_sub(len)
            .min(self.open.capacity() - len);
    }

    /// Takes back a record started at `at` (and the batch, if it was its
    /// first).
    #[cold]
    fn unappend(&mut self, at: usize) {
        let keep = if self.open_count == 0 { 0 } else { at };
        self.open.truncate(keep);
    }

    /// Starts a batch in the open buffer, with room for `need` bytes after
    /// its headers.
    #[cold]
    #[inline(never)]
    fn start_batch(&mut self, need: usize, pool: &mut BufferPool) {
        debug_assert!(self.open.is_empty());
        if self.open.capacity() < BATCH_PREFIX + need {
            let old = std::mem::replace(&mut self.open, pool.take());
            if old.capacity() > 0 {
                pool.put(old);
            }
            self.open.reserve(BATCH_PREFIX + need);
        }
        self.open.put_slice(&[0; BATCH_PREFIX]);
    }

    /// Seals the open batch into a frame behind the queued ones: its stamp
    /// (one clock read), ordinals and ids are given now. Returns the
    /// number of messages it held.
    #[inline]
    pub(crate) fn seal(&mut self, ids: &mut IdSeq) -> u32 {
        if self.open_count == 0 {
            return 0;
        }
        self.seal_open(ids)
    }

    #[inline(never)]
    fn seal_open(&mut self, ids: &mut IdSeq) -> u32 {
        let count = self.open_count;
        // A batch holds at most BATCH_BYTES plus one record of at most
        // MAX_RECORD bytes: far below 4 GiB.
        let prefix = batch_prefix(count, self.open.len() - HEADER_LEN, ids);
        self.open[..BATCH_PREFIX].copy_from_slice(&prefix);
        self.open_count = 0;
        self.room = 0;
        let frame = self.open.split().freeze();
        self.push_counted(frame, count);
        count
    }

    /// A change of whether this connection's socket wants the large send
    /// buffer (its messages turned large, or small for a long run), once.
    pub(crate) fn take_size_wish(&mut self) -> Option<bool> {
        self.size_wish.take()
    }

    /// Seals the open batch and hands it to `write` in place, when it is
    /// all the outbox holds and is at most `limit` bytes: if `write`
    /// takes it, it counts as queued and written, and its buffer is kept
    /// for the next batch (a lane's batches are copied into the ring, so
    /// one buffer serves them all). Returns whether a batch went.
    pub(crate) fn write_open<E>(
        &mut self,
        ids: &mut IdSeq,
        limit: usize,
        write: impl FnOnce(&[u8]) -> Result<(), E>,
    ) -> Result<bool, E> {
        let len = self.open.len();
        if self.open_count == 0 || !self.frames.is_empty() || len > limit {
            return Ok(false);
        }
        let prefix = batch_prefix(self.open_count, len - HEADER_LEN, ids);
        self.open[..BATCH_PREFIX].copy_from_slice(&prefix);
        write(&self.open)?;
        self.open.clear();
        self.open_count = 0;
        self.room = 0;
        self.count_passed(len);
        Ok(true)
    }

    /// Counts `n` bytes as queued and written at once: a frame that went
    /// out with nothing queued before it, without passing through the
    /// outbox ([`lone_prefix`]).
    pub(crate) fn count_passed(&mut self, n: usize) {
        debug_assert!(self.is_empty(), "nothing is queued before it");
        self.enqueued_total += n as u64;
        self.written_total += n as u64;
    }

    /// Takes the oldest sealed frame out (for a builder of batch frames
    /// that hands them to a connection's outbox elsewhere: the threaded
    /// mode's senders).
    #[cfg_attr(not(feature = "tokio"), allow(dead_code))]
    pub(crate) fn take_sealed(&mut self) -> Option<Bytes> {
        debug_assert_eq!(self.offset, 0, "a builder's frames are never written");
        let f = self.frames.pop_front()?;
        self.queued -= f.len();
        Some(f)
    }

    /// Gives the open buffer's allocation back to `pool` when no batch is
    /// open (an idle connection holds no buffer).
    pub fn release(&mut self, pool: &mut BufferPool) {
        if self.open_count == 0 && self.open.capacity() > 0 {
            pool.put(std::mem::take(&mut self.open));
        }
    }

    /// Bytes of the open batch so far (its headers included; 0 when none
    /// is open).
    #[inline(always)]
    pub fn open_len(&self) -> usize {
        self.open.len()
    }

    /// The last queued frame, if no write has started on it and no write
    /// in flight covers it.
    pub(crate) fn back_unstarted(&self) -> Option<&Bytes> {
        let keep = self.in_flight.max(usize::from(self.offset > 0));
        if self.frames.len() > keep {
            self.frames.back()
        } else {
            None
        }
    }

    /// Puts `frame` in the place of the last queued frame (one that
    /// [`Outbox::back_unstarted`] returns), as if that one had never been
    /// queued: the byte counts are those of `frame`.
    pub(crate) fn replace_back(&mut self, frame: Bytes) {
        debug_assert!(self.back_unstarted().is_some());
        debug_assert_eq!(self.open_count, 0, "an open batch is sealed first");
        let Some(old) = self.frames.pop_back() else {
            return;
        };
        self.queued -= old.len();
        self.enqueued_total -= old.len() as u64;
        self.push(frame);
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

    /// The unwritten rest of the front frame, when it is the only one.
    #[inline]
    pub fn sole_frame(&self) -> Option<&[u8]> {
        match self.frames.len() {
            1 => Some(&self.frames[0][self.offset..]),
            _ => None,
        }
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

    /// Takes the frames no write has started, except those `stays` keeps
    /// here (in their order): the taken ones in order, behind what `into`
    /// holds. Each run of taken frames that were adjacent here is noted in
    /// `runs`, in stream order, as (this stream's byte count where the run
    /// began, `into`'s byte count where it went), so that a frame ending
    /// at byte `t` here, `t` past a run's start, ends at `t - start + to`
    /// there.
    pub fn take_unstarted_into(
        &mut self,
        into: &mut Outbox,
        stays: impl Fn(&Bytes) -> bool,
        runs: &mut Vec<(u64, u64)>,
    ) {
        debug_assert_eq!(self.open_count, 0, "an open batch is sealed first");
        debug_assert_eq!(into.open_count, 0, "an open batch is sealed first");
        let keep = self.in_flight.max(usize::from(self.offset > 0));
        if self.frames.len() <= keep {
            return;
        }
        let tail: Vec<Bytes> = self.frames.drain(keep..).collect();
        let tail_bytes: usize = tail.iter().map(Bytes::len).sum();
        let mut pos = self.enqueued_total - tail_bytes as u64;
        self.queued -= tail_bytes;
        self.enqueued_total -= tail_bytes as u64;
        let mut in_run = false;
        for f in tail {
            let len = f.len() as u64;
            if stays(&f) {
                in_run = false;
                self.push(f);
            } else {
                if !in_run {
                    runs.push((pos, into.enqueued_total));
                    in_run = true;
                }
                into.push(f);
            }
            pos += len;
        }
    }
}

/// Copies a record's `len` content bytes from `src` to `dst`. Small
/// contents (up to 64 bytes, the common case of a batched message) are
/// copied inline with two overlapping moves of a power of two; a call to
/// `memcpy` cost a sixth of a lane sender's time at 64 B (perf).
///
/// # Safety
/// `src` must be valid for reads of `len` bytes, `dst` for writes of
/// `len` bytes, and the two must not overlap.
#[inline(always)]
unsafe fn copy_record(src: *const u8, dst: *mut u8, len: usize) {
    /// Moves the first and the last `N` bytes of `len` (`N <= len <= 2N`):
    /// together they cover all `len`.
    ///
    /// # Safety
    /// As [`copy_record`]'s, with `N <= len`.
    #[inline(always)]
    unsafe fn two<const N: usize>(src: *const u8, dst: *mut u8, len: usize) {
        // SAFETY: `N <= len`, so both moves read `[src, src + len)` and
        // write `[dst, dst + len)` only, which the caller makes valid; the
        // unaligned reads and writes need no alignment. The values are
        // read before either write, so the overlap of the two moves (when
        // `len < 2N`) writes the same bytes twice.
        unsafe {
            let a = std::ptr::read_unaligned(src.cast::<[u8; N]>());
            let b = std::ptr::read_unaligned(src.add(len - N).cast::<[u8; N]>());
            std::ptr::write_unaligned(dst.cast::<[u8; N]>(), a);
            std::ptr::write_unaligned(dst.add(len - N).cast::<[u8; N]>(), b);
        }
    }
    // SAFETY: each arm's size bound meets `two`'s `N <= len`; the rest is
    // the caller's promise, passed on.
    unsafe {
        match len {
            32..=64 => two::<32>(src, dst, len),
            16..=31 => two::<16>(src, dst, len),
            8..=15 => two::<8>(src, dst, len),
            4..=7 => two::<4>(src, dst, len),
            0..=3 => {
                for i in 0..len {
                    *dst.add(i) = *src.add(i);
                }
            }
            _ => std::ptr::copy_nonoverlapping(src, dst, len),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn record_copies_are_exact_at_every_small_length() {
        // Every length the inline moves cover, and a few past them, at
        // every source and destination offset within a word: exactly the
        // content is written, nothing before or after it.
        let src: Vec<u8> = (0..200u32).map(|i| (i * 7 + 1) as u8).collect();
        for len in 0..=130 {
            for s_off in 0..8 {
                for d_off in 0..8 {
                    let mut dst = [0xEEu8; 160 + 16];
                    // SAFETY: `src[s_off..]` holds at least 130 + 8 bytes
                    // and `dst[d_off..]` at least 168; they are distinct
                    // arrays.
                    unsafe { copy_record(src[s_off..].as_ptr(), dst[d_off..].as_mut_ptr(), len) };
                    assert!(dst[..d_off].iter().all(|&b| b == 0xEE), "len {len}: before");
                    assert_eq!(
                        &dst[d_off..d_off + len],
                        &src[s_off..s_off + len],
                        "len {len}"
                    );
                    assert!(
                        dst[d_off + len..].iter().all(|&b| b == 0xEE),
                        "len {len}: after"
                    );
                }
            }
        }
    }

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
    fn a_replaced_back_frame_counts_as_its_replacement() {
        let mut o = Outbox::default();
        o.push(Bytes::from_static(b"abcd"));
        o.advance(1);
        assert!(o.back_unstarted().is_none(), "the front one is started");
        o.push(Bytes::from_static(b"large frame"));
        assert_eq!(&o.back_unstarted().unwrap()[..], b"large frame");
        o.replace_back(Bytes::from_static(b"ctl"));
        assert_eq!(o.enqueued_total(), 7);
        assert_eq!(o.queued_bytes(), 6);
        let v: Vec<&[u8]> = o.frames().map(|f| &f[..]).collect();
        assert_eq!(v, [&b"abcd"[..], b"ctl"]);
        o.set_in_flight(2);
        assert!(o.back_unstarted().is_none(), "a write in flight covers it");
        o.advance(6);
        assert!(o.is_empty());
        assert_eq!(o.written_total(), o.enqueued_total());
    }

    #[test]
    fn unstarted_frames_exclude_partial_and_held() {
        let mut o = Outbox::default();
        for f in [&b"11"[..], b"22", b"33"] {
            o.push(Bytes::copy_from_slice(f));
        }
        o.advance(1);
        let (mut t, mut runs) = (Outbox::default(), Vec::new());
        o.take_unstarted_into(&mut t, |_| false, &mut runs);
        assert_eq!(t.frames().count(), 2);
        assert_eq!(o.frames().count(), 1);
        assert_eq!(o.queued_bytes(), 1);
        assert_eq!(runs, [(2, 0)]);
        let mut o = Outbox::default();
        for f in [&b"11"[..], b"22", b"33"] {
            o.push(Bytes::copy_from_slice(f));
        }
        o.set_in_flight(2);
        let (mut t, mut runs) = (Outbox::default(), Vec::new());
        o.take_unstarted_into(&mut t, |_| false, &mut runs);
        assert_eq!(t.frames().count(), 1);
    }

    #[test]
    fn frames_that_stay_split_the_runs_and_keep_their_order() {
        let mut o = Outbox::default();
        for f in [&b"aa"[..], b"C1", b"bbb", b"cccc", b"C2", b"d"] {
            o.push(Bytes::copy_from_slice(f));
        }
        o.advance(1);
        let mut before = Outbox::default();
        before.push(Bytes::from(vec![0u8; 100]));
        let mut t = Outbox::continuing(&before);
        t.push(Bytes::from_static(b"xyz"));
        let mut runs = Vec::new();
        o.take_unstarted_into(&mut t, |f| f[0] == b'C', &mut runs);
        let here: Vec<&[u8]> = o.frames().map(|f| &f[..]).collect();
        assert_eq!(here, [&b"aa"[..], b"C1", b"C2"]);
        let there: Vec<&[u8]> = t.frames().map(|f| &f[..]).collect();
        assert_eq!(there, [&b"xyz"[..], b"bbb", b"cccc", b"d"]);
        // "bbb" began at byte 4 here and at 103 there; "d" at 13 and 110.
        assert_eq!(runs, [(4, 103), (13, 110)]);
        assert_eq!(o.queued_bytes(), 1 + 2 + 2);
        assert_eq!(o.enqueued_total(), 6);
        assert_eq!(t.enqueued_total(), 111);
    }

    #[test]
    fn a_continuing_outbox_keeps_watching_the_message_sizes() {
        let mut a = Outbox::default();
        a.push(Bytes::from(vec![b'x'; 4096]));
        assert_eq!(a.take_size_wish(), Some(true), "a large frame asks");
        assert_eq!(a.take_size_wish(), None, "once");
        // The lane takes over: the next outbox knows the socket is large,
        // so a long run of small frames gives the buffer back.
        let mut b = Outbox::continuing(&a);
        assert_eq!(b.enqueued_total(), 4096);
        for _ in 0..super::super::sockbuf::SMALL_RUN {
            b.push(Bytes::from_static(b"small"));
        }
        assert_eq!(b.take_size_wish(), Some(false));
    }
}
