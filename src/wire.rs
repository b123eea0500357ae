//! Framing: the 4-byte big-endian length header, the zero-copy frame decoder
//! and the pool of receive buffers it reads into.
//!
//! Nothing here does I/O. A backend receives into the buffer that
//! [`FrameDecoder::recv_buf`] hands out and gives it back with
//! [`FrameDecoder::filled`]; every complete frame then comes out of
//! [`FrameDecoder::next_frame`] as a [`Bytes`] slice of that same buffer.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use zerocopy::byteorder::{BigEndian, U32};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

/// Size of the length header in front of every frame.
pub const HEADER_LEN: usize = 4;

/// Default largest payload accepted from a peer (64 MiB).
pub const DEFAULT_MAX_FRAME: usize = 64 * 1024 * 1024;

/// Default size of one pooled receive buffer (the Perl reader's chunk size).
pub const DEFAULT_BUF_SIZE: usize = 64 * 1024;

/// Smallest free space worth a receive; below it the buffer is grown first.
const MIN_RECV_SPACE: usize = 4 * 1024;

/// A pooled buffer's room past its receive window, as a fraction of the
/// window (5/8: 40 KiB behind a 64 KiB window). A receive into a fresh
/// buffer stops at the window, so that a frame it leaves incomplete at the
/// end, up to this long, is completed in place by the next receive rather
/// than copied into a fresh buffer (see [`RecvInto`]).
const SLACK_NUM: usize = 5;
const SLACK_DEN: usize = 8;

/// The frame header: payload length, `u32` big-endian, no other fields.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned,
)]
#[repr(C)]
pub struct FrameHeader {
    len: U32<BigEndian>,
}

impl FrameHeader {
    /// A header announcing `len` payload bytes.
    pub fn new(len: u32) -> Self {
        FrameHeader { len: U32::new(len) }
    }

    /// The announced payload length.
    pub fn payload_len(&self) -> u32 {
        self.len.get()
    }

    /// Reads a header from the first four bytes of `bytes`.
    pub fn parse(bytes: &[u8]) -> Option<Self> {
        FrameHeader::read_from_prefix(bytes).ok().map(|(h, _)| h)
    }
}

/// Appends one frame (header + `payload`) to `out`.
pub fn encode_frame(payload: &[u8], out: &mut BytesMut) -> Result<(), FrameError> {
    let len = u32::try_from(payload.len()).map_err(|_| FrameError::TooLarge {
        len: payload.len(),
        max: u32::MAX as usize,
    })?;
    out.reserve(HEADER_LEN + payload.len());
    out.put_slice(FrameHeader::new(len).as_bytes());
    out.put_slice(payload);
    Ok(())
}

/// Writes a frame whose payload is produced by `write` directly into `out`
/// (no intermediate copy), then patches the header and splits the frame off.
pub fn build_frame<E>(
    out: &mut BytesMut,
    write: impl FnOnce(&mut BytesMut) -> Result<(), E>,
) -> Result<Bytes, E>
where
    E: From<FrameError>,
{
    debug_assert!(out.is_empty());
    out.put_slice(FrameHeader::new(0).as_bytes());
    if let Err(e) = write(out) {
        out.clear();
        return Err(e);
    }
    let payload_len = out.len() - HEADER_LEN;
    let Ok(len) = u32::try_from(payload_len) else {
        out.clear();
        return Err(FrameError::TooLarge {
            len: payload_len,
            max: u32::MAX as usize,
        }
        .into());
    };
    out[..HEADER_LEN].copy_from_slice(FrameHeader::new(len).as_bytes());
    Ok(out.split().freeze())
}

/// Allocation handles [`BufferPool::take`] looks at from the newest end
/// before it looks at the oldest.
const NEWEST_FIRST: usize = 8;

/// A free list of fixed-size receive buffers shared by all connections.
///
/// A buffer goes back to the pool when its connection holds no partial
/// frame. Frames handed to the user keep their part of the allocation alive;
/// once every such frame is dropped, the next [`BufferPool::take`] reclaims
/// the whole allocation without allocating (`BytesMut::reserve` on a unique
/// buffer). Idle connections therefore hold no buffer at all.
///
/// A buffer returned with too little room left to receive into is kept as
/// a handle on its allocation (up to twice `max_idle`), so that once its
/// frames are dropped the allocation is reused rather than freed and
/// allocated afresh: the most recently kept one that is free first (it is
/// likeliest still in cache), else the oldest.
#[derive(Debug)]
pub struct BufferPool {
    free: Vec<BytesMut>,
    /// Room kept past the receive window of a fresh buffer.
    slack: usize,
    /// Empty handles on allocations whose frames may still be in use,
    /// oldest first.
    allocations: std::collections::VecDeque<BytesMut>,
    buf_size: usize,
    max_idle: usize,
}

impl BufferPool {
    /// A pool of `buf_size`-byte buffers keeping at most `max_idle` spares.
    pub fn new(buf_size: usize, max_idle: usize) -> Self {
        let buf_size = buf_size.max(MIN_RECV_SPACE);
        BufferPool {
            free: Vec::new(),
            slack: buf_size / SLACK_DEN * SLACK_NUM,
            allocations: std::collections::VecDeque::new(),
            buf_size,
            max_idle,
        }
    }

    /// Bytes a receive may put into a buffer with `spare` bytes free: all
    /// but the slack when the rest is still worth a receive, else all.
    pub fn window(&self, spare: usize) -> usize {
        if spare >= self.slack + MIN_RECV_SPACE {
            spare - self.slack
        } else {
            spare
        }
    }

    /// Size of one pooled buffer.
    pub fn buf_size(&self) -> usize {
        self.buf_size
    }

    /// Spare buffers currently held.
    pub fn idle(&self) -> usize {
        self.free.len()
    }

    /// An empty buffer with at least `buf_size` bytes of free space (for
    /// batches and a lane's reads: no slack).
    ///
    /// Prefers a spare whose allocation no delivered frame still uses (it is
    /// reclaimed in place); allocates only when every spare is still shared.
    pub fn take(&mut self) -> BytesMut {
        self.take_sized(self.buf_size)
    }

    /// [`BufferPool::take`] with the slack past the window: a socket
    /// receive's buffer. (Batch buffers stay without it: a lane's sender
    /// with 104 KiB batch buffers moved 12–25 % fewer 64 B messages.)
    pub fn take_window(&mut self) -> BytesMut {
        self.take_sized(self.buf_size + self.slack)
    }

    fn take_sized(&mut self, size: usize) -> BytesMut {
        if let Some(i) = self.free.iter_mut().rposition(|b| b.try_reclaim(size)) {
            return self.free.swap_remove(i);
        }
        // The newest allocations are the warmest in cache: a reader whose
        // application keeps up finds those it filled a turn ago free
        // again, and cycling through every allocation instead made each
        // copy into a buffer write lines long gone from the cache (a
        // lane's 16 KiB stream: 128 allocations, 8 MiB, in turn).
        let n = self.allocations.len();
        for k in 1..=NEWEST_FIRST.min(n) {
            if self.allocations[n - k].try_reclaim(size) {
                return self.allocations.remove(n - k).expect("in range");
            }
        }
        // Else the oldest, the likeliest to be free again. (Those still in
        // use stay where they are: the deque stays in the order the
        // buffers were filled, which the look at the newest relies on.)
        for i in 0..2.min(self.allocations.len()) {
            if self.allocations[i].try_reclaim(size) {
                return self.allocations.remove(i).expect("in range");
            }
        }
        let mut buf = BytesMut::new();
        buf.reserve(size);
        buf
    }

    /// A buffer to receive a fresh read into: the most recently returned
    /// spare with at least a quarter of `buf_size` free (the unused tail
    /// of a buffer whose start still holds delivered frames serves the next
    /// connection's read: a thousand connections reading a few KiB each
    /// share buffers instead of each taking a fresh one), else as
    /// [`BufferPool::take`].
    pub fn take_recv(&mut self) -> BytesMut {
        self.take_spare().unwrap_or_else(|| self.take_window())
    }

    /// [`BufferPool::take_recv`] without the slack (a lane's reads, which
    /// take whole records and cut no frame).
    pub fn take_recv_plain(&mut self) -> BytesMut {
        self.take_spare().unwrap_or_else(|| self.take())
    }

    /// The most recently returned spare with at least a quarter of
    /// `buf_size` free.
    fn take_spare(&mut self) -> Option<BytesMut> {
        let min = self.buf_size / 4;
        let i = self.free.iter().rposition(|b| b.capacity() >= min)?;
        Some(self.free.swap_remove(i))
    }

    /// Returns an empty buffer to the pool (non-empty ones are dropped).
    /// One with room to receive into is a spare; one without is kept as a
    /// handle on its allocation, reclaimed once its frames are dropped.
    /// Only buffers that had an allocation belong here.
    pub fn put(&mut self, buf: BytesMut) {
        if !buf.is_empty() || self.max_idle == 0 {
            return;
        }
        if buf.capacity() >= self.buf_size / 4 && self.free.len() < self.max_idle {
            self.free.push(buf);
            return;
        }
        if self.allocations.len() >= 2 * self.max_idle {
            // The oldest goes back to the allocator once its frames drop.
            self.allocations.pop_front();
        }
        self.allocations.push_back(buf);
    }
}

impl Default for BufferPool {
    fn default() -> Self {
        BufferPool::new(DEFAULT_BUF_SIZE, 64)
    }
}

/// Why a connection's byte stream cannot be decoded any further.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// The length prefix exceeds the configured maximum.
    #[error("frame length {len} exceeds the maximum frame size of {max} bytes")]
    TooLarge {
        /// The announced payload length.
        len: usize,
        /// The configured maximum.
        max: usize,
    },
}

/// Where one receive puts what it reads: after the bytes of `head` (up
/// to a limit), then, for a split receive, into `next`.
///
/// A split receive completes the frame that `head` ends with, in place,
/// and reads what follows into a fresh buffer (`readv` with two parts):
/// a frame never straddles two buffers, so none is copied from one into
/// the next.
#[derive(Debug, Default)]
pub struct RecvInto {
    /// The buffer receiving first.
    pub head: BytesMut,
    head_max: usize,
    /// The buffer receiving what the head has no room for.
    pub next: Option<BytesMut>,
    next_max: usize,
}

impl RecvInto {
    /// A receive into `buf` alone, up to the pool's window.
    pub fn fresh(buf: BytesMut, pool: &BufferPool) -> Self {
        let max = pool.window(buf.capacity() - buf.len());
        RecvInto {
            head: buf,
            head_max: max,
            next: None,
            next_max: 0,
        }
    }

    /// A receive into `buf` alone, up to `max` bytes (at most its spare
    /// capacity).
    pub fn within(buf: BytesMut, max: usize) -> Self {
        let max = max.min(buf.capacity() - buf.len());
        RecvInto {
            head: buf,
            head_max: max,
            next: None,
            next_max: 0,
        }
    }

    /// Bytes this receive can take in all.
    pub fn room(&self) -> usize {
        self.head_max + self.next_max
    }

    /// The spare memory to receive into, as `(pointer, length)` pairs: the
    /// head's, then the next buffer's (for a split receive).
    pub fn parts(&mut self) -> ([(*mut u8, usize); 2], usize) {
        let head = self.head.spare_capacity_mut().as_mut_ptr().cast::<u8>();
        let mut out = [(head, self.head_max), (std::ptr::null_mut(), 0)];
        let mut n = 1;
        if let Some(next) = self.next.as_mut() {
            out[1] = (
                next.spare_capacity_mut().as_mut_ptr().cast::<u8>(),
                self.next_max,
            );
            n = 2;
        }
        (out, n)
    }

    /// Records that `n` bytes were received into [`RecvInto::parts`].
    ///
    /// # Safety
    /// The first `n` bytes of the parts, in order, must have been written
    /// (`n` at most [`RecvInto::room`]).
    pub unsafe fn advance(&mut self, n: usize) {
        debug_assert!(n <= self.room());
        let into_head = n.min(self.head_max);
        // SAFETY: the caller's contract: the first `into_head` bytes of the
        // head's spare capacity (its first part) are written.
        unsafe { self.head.set_len(self.head.len() + into_head) };
        if let Some(next) = self.next.as_mut() {
            let rest = (n - into_head).min(self.next_max);
            // SAFETY: as above, for the next buffer's first `rest` bytes
            // (the second part).
            unsafe { next.set_len(next.len() + rest) };
        }
    }

    /// Receives `data` by copying (tests and the fuzzer): as much of it as
    /// [`RecvInto::room`] takes, returned.
    pub fn fill_from(&mut self, data: &[u8]) -> usize {
        let n = self.room().min(data.len());
        let (parts, count) = self.parts();
        let mut done = 0;
        for &(ptr, len) in &parts[..count] {
            let k = len.min(n - done);
            // SAFETY: `ptr` is the start of `len` bytes of spare capacity
            // lent by `parts`, and `k <= len`; the source is `data`, which
            // cannot overlap a buffer this value owns.
            unsafe { std::ptr::copy_nonoverlapping(data[done..].as_ptr(), ptr, k) };
            done += k;
        }
        // SAFETY: the first `n` bytes of the parts were written above.
        unsafe { self.advance(n) };
        n
    }

    /// Gives the buffers back to the pool (a receive that will not start
    /// or whose connection is gone).
    pub fn give_back(self, pool: &mut BufferPool) {
        pool.put(self.head);
        if let Some(next) = self.next {
            pool.put(next);
        }
    }
}

/// Splits a byte stream into frames without copying.
///
/// Bytes may arrive in any chunking. Each complete frame's payload is a
/// [`Bytes`] slice of the receive buffer it arrived in. A frame longer than a
/// pooled buffer gets its own allocation, grown as its bytes arrive (at most
/// twice what has arrived), so a hostile length prefix never makes the
/// decoder allocate up front.
///
/// Receives into a pooled buffer stop at its window (see
/// [`BufferPool::window`]); the frame left incomplete at its end is then
/// completed in the slack behind the window by a split receive
/// ([`RecvInto`]), whose second buffer becomes the decoder's once the first
/// one's frames are out.
#[derive(Debug)]
pub struct FrameDecoder {
    buf: BytesMut,
    /// What a split receive put after `buf`'s last frame (until `buf`'s
    /// frames are out); empty, the unused second buffer of a receive that
    /// stopped short, until [`FrameDecoder::release`] or the next split.
    next: Option<BytesMut>,
    /// The handle on a buffer emptied when `next` took its place, for the
    /// pool.
    spent: Option<BytesMut>,
    max_frame: usize,
    out: bool,
    /// `buf` is (a part of) an allocation from a receive, to go back to
    /// the pool when emptied; false for the initial, unallocated one.
    pooled: bool,
}

impl FrameDecoder {
    /// A decoder that refuses payloads longer than `max_frame` bytes.
    pub fn new(max_frame: usize) -> Self {
        FrameDecoder {
            buf: BytesMut::new(),
            next: None,
            spent: None,
            max_frame,
            out: false,
            pooled: false,
        }
    }

    /// Bytes of an incomplete frame currently held.
    #[cfg_attr(not(feature = "unstable"), allow(dead_code))]
    pub fn partial_len(&self) -> usize {
        self.buf.len() + self.next.as_ref().map_or(0, BytesMut::len)
    }

    /// Capacity currently held by this decoder.
    #[cfg_attr(not(feature = "unstable"), allow(dead_code))]
    pub fn capacity(&self) -> usize {
        self.buf.capacity()
            + self.next.as_ref().map_or(0, BytesMut::capacity)
            + self.spent.as_ref().map_or(0, BytesMut::capacity)
    }

    /// The total length (header included) of the frame at the front, once
    /// its header is complete.
    fn front_need(&self) -> Option<usize> {
        FrameHeader::parse(&self.buf).map(|h| HEADER_LEN + h.payload_len() as usize)
    }

    /// Once `buf`'s frames are all out, what a split receive put after them
    /// becomes `buf`.
    #[inline]
    fn promote(&mut self) {
        if self.next.is_some() && self.buf.is_empty() {
            self.promote_next();
        }
    }

    #[cold]
    fn promote_next(&mut self) {
        if let Some(next) = self.next.take_if(|n| !n.is_empty()) {
            let old = std::mem::replace(&mut self.buf, next);
            if self.pooled {
                self.spent = Some(old);
            }
            self.pooled = true;
        }
    }

    /// Lends out where to receive into when the decoder holds a partial
    /// frame; `None` when it holds nothing (then any pooled buffer will do,
    /// chosen when data arrives, so idle connections hold none).
    ///
    /// Must be followed by [`FrameDecoder::filled`] with what was lent.
    pub fn recv_buf(&mut self, pool: &mut BufferPool) -> Option<RecvInto> {
        debug_assert!(!self.out, "receive buffer lent twice");
        self.promote();
        if self.spent.is_some() {
            self.put_spent(pool);
        }
        self.out = true;
        if self.buf.is_empty() {
            self.give_back(pool);
            return None;
        }
        Some(self.lend(pool))
    }

    /// [`FrameDecoder::recv_buf`] for a source that appends whole buffers
    /// at a time (a lane's ring): one buffer, no window, no split (so the
    /// decoder never holds a second one).
    pub fn recv_buf_whole(&mut self, pool: &mut BufferPool) -> Option<BytesMut> {
        debug_assert!(!self.out, "receive buffer lent twice");
        debug_assert!(self.next.is_none() && self.spent.is_none());
        self.out = true;
        if self.buf.is_empty() {
            self.give_back(pool);
            return None;
        }
        let len = self.buf.len();
        let need = self.front_need().unwrap_or(HEADER_LEN);
        if need > pool.buf_size() {
            return Some(self.lend_large(need, pool).head);
        }
        if self.buf.capacity() - len < MIN_RECV_SPACE.min(need.saturating_sub(len)).max(1)
            || self.buf.capacity() < need
        {
            return Some(self.refill(pool));
        }
        Some(std::mem::take(&mut self.buf))
    }

    /// Lends the buffer of a frame longer than a pooled buffer, grown with
    /// what has arrived (never to the prefix).
    fn lend_large(&mut self, need: usize, pool: &BufferPool) -> RecvInto {
        let len = self.buf.len();
        if self.buf.capacity() < need {
            let target = need.min((len * 2).max(pool.buf_size()));
            if target > self.buf.capacity() {
                self.buf.reserve(target - len);
            }
        }
        let buf = std::mem::take(&mut self.buf);
        let room = buf.capacity() - buf.len();
        RecvInto::within(buf, room)
    }

    /// [`FrameDecoder::recv_buf`] once the buffer holds a partial frame.
    fn lend(&mut self, pool: &mut BufferPool) -> RecvInto {
        let len = self.buf.len();
        let need = self.front_need();
        let known = need.unwrap_or(HEADER_LEN);
        let spare = self.buf.capacity() - len;
        if known > pool.buf_size() {
            return self.lend_large(known, pool);
        }
        let window = pool.window(spare);
        if window < spare || need.is_some_and(|need| need <= len) {
            // Still inside the window (or complete frames are still
            // buffered, which receives take out first): go on receiving
            // here.
            return RecvInto::within(std::mem::take(&mut self.buf), window);
        }
        match need {
            Some(need) if need - len <= spare => {
                // Complete the frame in place; what follows goes into a
                // fresh buffer.
                // A whole buffer, not a spare's tail: its window leaves
                // slack for the frame its own receive will cut.
                let next = self
                    .next
                    .take_if(|n| n.capacity() - n.len() >= pool.buf_size())
                    .unwrap_or_else(|| pool.take_window());
                let next_max = pool.window(next.capacity() - next.len());
                RecvInto {
                    head: std::mem::take(&mut self.buf),
                    head_max: need - len,
                    next: Some(next),
                    next_max,
                }
            }
            // The frame does not fit (or its header is incomplete): its
            // bytes so far move to a fresh buffer.
            _ => RecvInto::fresh(self.refill(pool), pool),
        }
    }

    /// A fresh buffer holding the partial frame, which leaves `buf`.
    fn refill(&mut self, pool: &mut BufferPool) -> BytesMut {
        let mut fresh = match self.next.take() {
            Some(b) if b.capacity() >= self.buf.len() => b,
            Some(b) => {
                pool.put(b);
                pool.take_window()
            }
            None => pool.take_window(),
        };
        fresh.extend_from_slice(&self.buf);
        self.buf.clear();
        self.give_back(pool);
        fresh
    }

    /// Takes back what [`FrameDecoder::recv_buf`] lent (or a fresh pooled
    /// buffer), now holding the received bytes after the old ones.
    pub fn filled(&mut self, into: RecvInto) {
        self.filled_whole(into.head);
        if let Some(next) = into.next {
            debug_assert!(self.next.is_none());
            self.next = Some(next);
        }
    }

    /// [`FrameDecoder::filled`] for [`FrameDecoder::recv_buf_whole`].
    pub fn filled_whole(&mut self, buf: BytesMut) {
        self.out = false;
        self.buf = buf;
        self.pooled = true;
    }

    /// Hands the (empty) buffer back to the pool.
    fn give_back(&mut self, pool: &mut BufferPool) {
        let old = std::mem::take(&mut self.buf);
        if std::mem::take(&mut self.pooled) {
            pool.put(old);
        }
    }

    /// Appends bytes by copying them (tests and the fuzzer; the I/O path
    /// receives in place through [`FrameDecoder::recv_buf`]).
    #[cfg_attr(not(feature = "unstable"), allow(dead_code))]
    pub fn push_slice(&mut self, data: &[u8], pool: &mut BufferPool) {
        let mut rest = data;
        while !rest.is_empty() {
            let mut into = self
                .recv_buf(pool)
                .unwrap_or_else(|| RecvInto::fresh(pool.take_recv(), pool));
            if into.room() == 0 {
                // Only when complete frames are still buffered.
                into.head.reserve(rest.len());
                let room = into.head.capacity() - into.head.len();
                into.head_max = room;
            }
            let n = into.fill_from(rest);
            rest = &rest[n..];
            self.filled(into);
        }
    }

    /// The next complete frame's payload, if one is buffered.
    pub fn next_frame(&mut self) -> Result<Option<Bytes>, FrameError> {
        self.promote();
        let Some(need) = self.front_need() else {
            return Ok(None);
        };
        let len = need - HEADER_LEN;
        if len > self.max_frame {
            return Err(FrameError::TooLarge {
                len,
                max: self.max_frame,
            });
        }
        if self.buf.len() < need {
            return Ok(None);
        }
        let mut frame = self.buf.split_to(need);
        frame.advance(HEADER_LEN);
        Ok(Some(frame.freeze()))
    }

    /// Gives back to the pool what holds no partial frame: the buffer when
    /// it is empty, and the spare one a split receive left unused.
    pub fn release(&mut self, pool: &mut BufferPool) {
        if self.out {
            return;
        }
        self.promote();
        if self.spent.is_some() {
            self.put_spent(pool);
        }
        if self.next.is_some() {
            self.put_next(pool);
        }
        if self.buf.is_empty() {
            self.give_back(pool);
        }
    }

    /// Hands the spent buffer back to the pool.
    #[cold]
    fn put_spent(&mut self, pool: &mut BufferPool) {
        if let Some(spent) = self.spent.take() {
            pool.put(spent);
        }
    }

    /// Hands an unused next buffer back to the pool.
    #[cold]
    fn put_next(&mut self, pool: &mut BufferPool) {
        if let Some(next) = self.next.take_if(|n| n.is_empty()) {
            pool.put(next);
        }
    }

    /// Drops any partial frame (at end of stream) and returns its length.
    pub fn discard(&mut self) -> usize {
        let n = self.partial_len();
        self.buf.clear();
        if let Some(next) = self.next.as_mut() {
            next.clear();
        }
        n
    }
}

/// `d` as the kernel's timespec (saturating at `time_t`'s range), for the
/// waits of every layer (poll, epoll, io_uring).
pub(crate) fn timespec(d: std::time::Duration) -> rustix::event::Timespec {
    rustix::event::Timespec {
        tv_sec: d.as_secs().min(i64::MAX as u64) as _,
        tv_nsec: d.subsec_nanos() as _,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(payload: &[u8]) -> Vec<u8> {
        let mut out = BytesMut::new();
        encode_frame(payload, &mut out).unwrap();
        out.to_vec()
    }

    fn drain(dec: &mut FrameDecoder) -> Vec<Bytes> {
        let mut v = Vec::new();
        while let Some(f) = dec.next_frame().unwrap() {
            v.push(f);
        }
        v
    }

    #[test]
    fn header_is_big_endian_u32() {
        assert_eq!(FrameHeader::new(0x0102_0304).as_bytes(), &[1, 2, 3, 4]);
        assert_eq!(
            FrameHeader::parse(&[0, 0, 0, 15, 9]).unwrap().payload_len(),
            15
        );
        assert!(FrameHeader::parse(&[0, 0, 1]).is_none());
    }

    #[test]
    fn decodes_any_chunking() {
        let payloads: Vec<Vec<u8>> = (0..50).map(|i| vec![i as u8; i * 37]).collect();
        let stream: Vec<u8> = payloads.iter().flat_map(|p| frame(p)).collect();
        for chunk in [1, 2, 3, 5, 7, 64, 1000, stream.len()] {
            let mut pool = BufferPool::new(4096, 4);
            let mut dec = FrameDecoder::new(1 << 20);
            let mut got = Vec::new();
            for c in stream.chunks(chunk) {
                dec.push_slice(c, &mut pool);
                got.extend(drain(&mut dec));
            }
            assert_eq!(got.len(), payloads.len(), "chunk {chunk}");
            for (g, p) in got.iter().zip(&payloads) {
                assert_eq!(&g[..], &p[..]);
            }
            assert_eq!(dec.partial_len(), 0);
        }
    }

    /// Receives `stream` the way a backend does: into what the decoder
    /// lends (or a fresh pooled buffer), at most `chunk` bytes a receive,
    /// taking the frames out after each.
    fn receive_all(stream: &[u8], chunk: usize, pool: &mut BufferPool) -> Vec<Bytes> {
        let mut dec = FrameDecoder::new(1 << 20);
        let mut got = Vec::new();
        let mut rest = stream;
        while !rest.is_empty() {
            let mut into = dec
                .recv_buf(pool)
                .unwrap_or_else(|| RecvInto::fresh(pool.take_recv(), pool));
            let n = into.fill_from(&rest[..chunk.min(rest.len())]);
            assert!(n > 0, "a receive has room");
            rest = &rest[n..];
            dec.filled(into);
            got.extend(drain(&mut dec));
            dec.release(pool);
        }
        assert_eq!(dec.partial_len(), 0);
        got
    }

    #[test]
    fn a_frame_left_at_the_window_is_completed_in_place() {
        let mut pool = BufferPool::new(4096, 4);
        let mut dec = FrameDecoder::new(1 << 20);
        // Frames of 1,004 bytes: the first receive stops at the 4,096-byte
        // window, inside the fifth frame.
        let stream: Vec<u8> = (0..8u8).flat_map(|i| frame(&[i; 1000])).collect();
        let mut into = RecvInto::fresh(pool.take_recv(), &pool);
        let base = into.head.as_ptr() as usize;
        let cap = into.head.capacity();
        assert_eq!(into.room(), 4096, "a fresh receive stops at the window");
        let n = into.fill_from(&stream);
        dec.filled(into);
        let first = drain(&mut dec);
        assert_eq!(first.len(), 4);
        // The next receive completes the fifth frame in the same buffer
        // and reads on into a fresh one.
        let mut into = dec.recv_buf(&mut pool).expect("a partial frame is held");
        let (parts, count) = into.parts();
        assert_eq!(count, 2, "a split receive");
        assert_eq!(parts[0], ((base + n) as *mut u8, 5 * 1004 - n));
        into.fill_from(&stream[n..]);
        dec.filled(into);
        let rest = drain(&mut dec);
        assert_eq!(rest.len(), 4);
        let fifth = rest[0].as_ptr() as usize;
        assert!(
            (base..base + cap).contains(&fifth),
            "the fifth frame was not copied"
        );
        let sixth = rest[1].as_ptr() as usize;
        assert!(
            !(base..base + cap).contains(&sixth),
            "the sixth is in the next buffer"
        );
        for (i, f) in first.iter().chain(&rest).enumerate() {
            assert_eq!(&f[..], &[i as u8; 1000][..]);
        }
        assert_eq!(dec.partial_len(), 0);
    }

    #[test]
    fn split_receives_deliver_any_stream_whole() {
        // Frame sizes around the window and the slack, the header cut at
        // every point, receives of every size class.
        let sizes = [
            0usize, 1, 3, 100, 1000, 2555, 2556, 2557, 4000, 4092, 4093, 5000, 9000,
        ];
        let payloads: Vec<Vec<u8>> = (0..200)
            .map(|i| vec![i as u8; sizes[(i * 7) % sizes.len()]])
            .collect();
        let stream: Vec<u8> = payloads.iter().flat_map(|p| frame(p)).collect();
        for chunk in [1, 3, 4, 5, 1003, 4096, 6000, 7000, stream.len()] {
            let mut pool = BufferPool::new(4096, 4);
            let got = receive_all(&stream, chunk, &mut pool);
            assert_eq!(got.len(), payloads.len(), "chunk {chunk}");
            for (g, p) in got.iter().zip(&payloads) {
                assert_eq!(&g[..], &p[..], "chunk {chunk}");
            }
        }
    }

    #[test]
    fn frames_are_slices_of_the_receive_buffer() {
        let mut pool = BufferPool::new(4096, 4);
        let mut dec = FrameDecoder::new(1024);
        assert!(
            dec.recv_buf(&mut pool).is_none(),
            "an empty decoder lends nothing"
        );
        let mut buf = pool.take();
        let base = buf.as_ptr() as usize;
        buf.extend_from_slice(&frame(b"abc"));
        buf.extend_from_slice(&frame(b"defg"));
        dec.filled_whole(buf);
        let a = dec.next_frame().unwrap().unwrap();
        let b = dec.next_frame().unwrap().unwrap();
        assert_eq!(a.as_ptr() as usize, base + 4);
        assert_eq!(b.as_ptr() as usize, base + 4 + 3 + 4);
    }

    #[test]
    fn oversize_prefix_is_refused_without_allocating() {
        let mut pool = BufferPool::new(4096, 4);
        let mut dec = FrameDecoder::new(DEFAULT_MAX_FRAME);
        dec.push_slice(&[0xFF, 0xFF, 0xFF, 0xFF], &mut pool);
        assert_eq!(
            dec.next_frame(),
            Err(FrameError::TooLarge {
                len: 0xFFFF_FFFF,
                max: DEFAULT_MAX_FRAME
            })
        );
        assert!(dec.capacity() <= 2 * 4096);
    }

    #[test]
    fn large_frame_grows_with_arrivals_only() {
        let mut pool = BufferPool::new(4096, 4);
        let mut dec = FrameDecoder::new(DEFAULT_MAX_FRAME);
        // Announce 32 MiB but deliver 10 KiB: capacity follows the bytes.
        let mut head = FrameHeader::new(32 << 20).as_bytes().to_vec();
        head.extend(vec![7u8; 10 * 1024]);
        dec.push_slice(&head, &mut pool);
        assert_eq!(dec.next_frame(), Ok(None));
        assert!(dec.capacity() < 64 * 1024, "capacity {}", dec.capacity());
    }

    #[test]
    fn large_frame_completes() {
        let mut pool = BufferPool::new(4096, 4);
        let mut dec = FrameDecoder::new(DEFAULT_MAX_FRAME);
        let payload: Vec<u8> = (0..300_000u32).map(|i| i as u8).collect();
        let f = frame(&payload);
        for c in f.chunks(4000) {
            dec.push_slice(c, &mut pool);
        }
        assert_eq!(&dec.next_frame().unwrap().unwrap()[..], &payload[..]);
    }

    #[test]
    fn zero_length_frame_is_legal_framing() {
        let mut pool = BufferPool::default();
        let mut dec = FrameDecoder::new(16);
        dec.push_slice(&frame(b""), &mut pool);
        assert_eq!(dec.next_frame().unwrap().unwrap().len(), 0);
    }

    #[test]
    fn pool_reclaims_buffer_once_frames_are_dropped() {
        let mut pool = BufferPool::new(4096, 4);
        let mut dec = FrameDecoder::new(1024);
        assert!(dec.recv_buf(&mut pool).is_none());
        let mut buf = pool.take();
        let base = buf.as_ptr() as usize;
        buf.extend_from_slice(&frame(b"hello"));
        dec.filled_whole(buf);
        let f = dec.next_frame().unwrap().unwrap();
        dec.release(&mut pool);
        drop(f);
        let again = pool.take();
        assert_eq!(again.as_ptr() as usize, base, "allocation reused");
    }

    /// Of several free allocations, the one filled last comes back first
    /// (the warmest in cache); one still in use is passed over.
    #[test]
    fn pool_reuses_the_newest_free_allocation_first() {
        let mut pool = BufferPool::new(4096, 4);
        let mut frames = Vec::new();
        let mut bases = Vec::new();
        for _ in 0..4 {
            let mut dec = FrameDecoder::new(8192);
            let mut buf = pool.take();
            bases.push(buf.as_ptr() as usize);
            let cap = buf.capacity();
            buf.extend_from_slice(&frame(&vec![b'x'; cap - HEADER_LEN]));
            dec.filled_whole(buf);
            frames.push(dec.next_frame().unwrap().unwrap());
            dec.release(&mut pool);
        }
        assert_eq!(pool.allocations.len(), 4);
        // The newest (index 3) is still in use; 0, 1 and 2 are free.
        let newest = frames.pop().unwrap();
        frames.clear();
        let again = pool.take();
        assert_eq!(again.as_ptr() as usize, bases[2], "the newest free one");
        drop(newest);
        let again = pool.take();
        assert_eq!(again.as_ptr() as usize, bases[3], "now free, and newest");
    }

    #[test]
    fn pool_reclaims_a_buffer_filled_to_the_end() {
        let mut pool = BufferPool::new(4096, 4);
        let mut dec = FrameDecoder::new(8192);
        let mut buf = pool.take();
        let base = buf.as_ptr() as usize;
        let cap = buf.capacity();
        // One frame filling the buffer exactly: nothing left to receive
        // into, so the remnant is kept only as a handle.
        buf.extend_from_slice(&frame(&vec![b'x'; cap - HEADER_LEN]));
        assert_eq!(buf.capacity(), cap);
        dec.filled_whole(buf);
        let f = dec.next_frame().unwrap().unwrap();
        dec.release(&mut pool);
        assert_eq!(pool.idle(), 0, "no room to lend out");
        let other = pool.take();
        assert_ne!(other.as_ptr() as usize, base, "frame still in use");
        assert_eq!(pool.allocations.len(), 1, "a handle is kept");
        drop(f);
        // Were the allocation freed, this would likely take its place.
        let squatter: Vec<u8> = Vec::with_capacity(cap);
        let again = pool.take();
        assert_eq!(again.as_ptr() as usize, base, "allocation reused");
        assert!(again.capacity() >= 4096);
        drop((other, squatter));
    }

    #[test]
    fn build_frame_patches_length() {
        let mut arena = BytesMut::new();
        let f = build_frame::<FrameError>(&mut arena, |b| {
            b.extend_from_slice(b"{\"hello\":\"cli\"}");
            Ok(())
        })
        .unwrap();
        assert_eq!(&f[..4], &[0, 0, 0, 0x0F]);
        assert_eq!(&f[4..], b"{\"hello\":\"cli\"}");
    }
}
