//! A single-producer single-consumer ring of records in memory shared with
//! a peer process that is not trusted: the building block of the
//! shared-memory lane (one ring per direction).
//!
//! # Layout
//!
//! A ring region is `RING_HEADER + capacity` bytes, 64-byte aligned,
//! `capacity` a power of two of at least [`MIN_CAPACITY`] bytes:
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 8 | `tail`: bytes ever written (the producer's; a u64, native order) |
//! | 8 | 8 | `room`: nonzero while the producer waits for room |
//! | 64 | 8 | `head`: bytes ever read (the consumer's) |
//! | 72 | 8 | `wake`: nonzero while the consumer sleeps (or is about to) |
//! | 128 | `capacity` | records |
//!
//! A record is an 8-byte header (the payload length as a u32, then four
//! zero bytes), the payload, and zero padding to a multiple of 8. A record
//! never wraps: where the next one does not fit before the end, the
//! producer writes a header of length [`PAD`] and the record starts at
//! offset 0. A producer also pads to the end when it finds the ring empty
//! past its first [`COMPACT`] bytes, so that a stream whose consumer keeps
//! up stays in that part of the ring (in cache, and the only memory it
//! touches). The producer writes a record whole, then publishes `tail`
//! (release); the consumer reads `tail` (acquire), copies the record out,
//! then publishes `head` (release).
//!
//! # Wake-ups
//!
//! A consumer about to sleep sets `wake` and then looks at `tail` once
//! more; a producer publishes `tail` and then takes `wake` (a swap to 0):
//! if it was set, the producer wakes the consumer (over the socket). Both
//! sides use sequentially consistent accesses, so either the consumer's
//! second look sees the record or the producer sees the flag: a wake-up
//! is never lost (Dekker's pattern). `room` is the same handshake with
//! the roles swapped, for a producer that found the ring full; the
//! consumer wakes a waiting producer only once the ring is at most half
//! full, so that one wake-up buys half a ring. A peer that
//! scribbles on the flags causes spurious wake-ups (harmless) or withholds
//! its own (it then waits for nothing but itself).
//!
//! # The peer is untrusted
//!
//! The peer may write anything into the region at any time, or die
//! halfway through a write.
//! * Each side keeps its own index privately and only publishes it; the
//!   peer's index is read, checked against the capacity, and never
//!   trusted beyond that: a `tail` more than `capacity` ahead of `head`, a
//!   length past `tail` or past the end, a pad with nothing after it, are
//!   all [`RingError::Corrupt`], and the ring is not read again.
//! * Every access to the region is an atomic load or store of an aligned
//!   word through a raw pointer: no `&[u8]` or `&str` is ever formed over
//!   memory the peer can write. Payloads are copied out (a torn or
//!   scribbled payload is then just wrong bytes, which the batch check
//!   after it rejects, never undefined behaviour).
//! * A producer killed mid-record never published its `tail`, so its
//!   consumer never sees the record: no torn message.
//! * Each read consumes at least 8 bytes or stops, so no sequence of peer
//!   writes makes the reader loop.

use std::sync::atomic::{AtomicU64, Ordering};

/// Bytes in front of the records.
pub const RING_HEADER: usize = 128;
/// The smallest capacity.
pub const MIN_CAPACITY: usize = 4096;
/// A record header's length that marks the rest of the ring as padding.
pub const PAD: u32 = u32::MAX;
/// Bytes of a record header.
pub const RECORD_HEADER: usize = 8;

const TAIL: usize = 0;
/// Set by a producer that found the ring full; taken by the consumer that
/// makes room (it then wakes the producer).
const ROOM: usize = 8;
const HEAD: usize = 64;
/// Set by a consumer about to sleep; taken by the producer that publishes
/// next (it then wakes the consumer).
const WAKE: usize = 72;

/// Why a ring cannot be used (any further).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RingError {
    /// What the peer wrote breaks the ring's rules.
    #[error("shared-memory ring corrupt: {0}")]
    Corrupt(&'static str),
    /// A region of the wrong size or alignment.
    #[error("shared-memory ring: bad region ({0})")]
    Region(&'static str),
    /// A record larger than the ring can ever hold.
    #[error("record of {len} bytes exceeds the ring's largest of {max}")]
    TooLarge {
        /// The payload length.
        len: usize,
        /// The largest payload this ring takes.
        max: usize,
    },
}

/// A ring region: a raw pointer, never a reference, because the peer
/// writes the memory concurrently.
#[derive(Debug, Clone, Copy)]
struct Region {
    base: *mut u8,
    capacity: usize,
}

// SAFETY: the region is only accessed through atomic word operations
// (`word`), which are sound from any thread; the creator of the ring
// guarantees the mapping outlives it (`Ring::new`).
unsafe impl Send for Region {}

impl Region {
    /// # Safety
    /// `base` must be valid for reads and writes of `RING_HEADER +
    /// capacity` bytes, 8-byte aligned, for as long as the ring lives, and
    /// accessed by others only atomically or from another process.
    unsafe fn new(base: *mut u8, len: usize) -> Result<Self, RingError> {
        if !(base as usize).is_multiple_of(64) {
            return Err(RingError::Region("not 64-byte aligned"));
        }
        let capacity = len
            .checked_sub(RING_HEADER)
            .ok_or(RingError::Region("smaller than the header"))?;
        if capacity < MIN_CAPACITY || !capacity.is_power_of_two() {
            return Err(RingError::Region(
                "capacity not a power of two of at least 4 KiB",
            ));
        }
        Ok(Region { base, capacity })
    }

    /// The aligned word at byte `at` of the region.
    fn word(&self, at: usize) -> &AtomicU64 {
        assert!(at.is_multiple_of(8) && at + 8 <= RING_HEADER + self.capacity);
        // SAFETY: `at` is in bounds and 8-aligned (asserted; the base is
        // 64-aligned), the region is valid for the ring's life
        // (`Region::new`'s contract), and the word is only ever accessed
        // atomically from this process: an `AtomicU64` over it is sound
        // whatever the peer process writes.
        unsafe { AtomicU64::from_ptr(self.base.add(at).cast::<u64>()) }
    }

    /// The `n` aligned words from byte `at` of the region (checked once).
    fn words(&self, at: usize, n: usize) -> &[AtomicU64] {
        assert!(at.is_multiple_of(8) && at + 8 * n <= RING_HEADER + self.capacity);
        // SAFETY: as for `word`, for each of the `n` words in bounds: a
        // slice of atomics may be written concurrently by anyone.
        unsafe { std::slice::from_raw_parts(self.base.add(at).cast::<AtomicU64>(), n) }
    }

    fn data(&self, pos: usize) -> usize {
        RING_HEADER + pos
    }

    /// The address of the `len` bytes from byte `at` of the region
    /// (checked), for [`copy_bytes`].
    fn bytes(&self, at: usize, len: usize) -> *mut u8 {
        assert!(at + len <= RING_HEADER + self.capacity);
        // SAFETY: in bounds of the mapping (asserted just above).
        unsafe { self.base.add(at) }
    }
}

/// Payload bytes from which a record is copied with the CPU's string copy
/// ([`copy_bytes`]) rather than a word at a time: below it the string
/// copy's start-up costs more than it saves.
const STRING_COPY_MIN: usize = 256;

/// Copies `len` bytes from `src` to `dst` with one `rep movsb`, the
/// instruction the kernel's own copies to and from user memory use.
///
/// This is how bytes cross memory that the peer process may write at the
/// same time: the copy is an inline-assembly block, opaque to the
/// compiler, so no Rust load or store of that memory exists to race (the
/// rings' words are otherwise touched only through atomics). What the
/// hardware does when the peer writes concurrently is at worst bytes
/// that are neither old nor new, which is what the reader is built for:
/// it copies out, then checks what it copied.
///
/// # Safety
/// `src` must be valid for reads and `dst` for writes of `len` bytes, and
/// the two ranges must not overlap; neither may be memory this process
/// accesses through Rust references at the same time.
#[cfg(target_arch = "x86_64")]
#[inline]
unsafe fn copy_bytes(dst: *mut u8, src: *const u8, len: usize) {
    // SAFETY: the caller's contract; `rep movsb` reads `rcx` bytes at
    // `rsi` and writes them at `rdi`, going up (the direction flag is
    // clear on entry to an asm block), and touches nothing else.
    unsafe {
        std::arch::asm!(
            "rep movsb",
            inout("rcx") len => _,
            inout("rdi") dst => _,
            inout("rsi") src => _,
            options(nostack, preserves_flags)
        );
    }
}

/// Payload bytes from which a record is copied out and checked for ASCII
/// in the same pass ([`copy_checked`]), where the CPU can.
const CHECKED_COPY_MIN: usize = 1024;

/// Bytes at the front of a record that [`copy_checked`] copies without
/// looking at them: a frame's length and a batch's header (52 bytes) are
/// binary, so a record that starts a frame would never check as ASCII
/// whole; past these, the rest of a record that holds one batch frame is
/// that batch's records, all ASCII when their contents are.
pub const UNCHECKED_HEAD: usize = 64;

/// Whether this CPU has what [`copy_checked`] needs.
#[cfg(target_arch = "x86_64")]
fn can_copy_checked() -> bool {
    std::arch::is_x86_feature_detected!("avx512bw")
}

#[cfg(not(target_arch = "x86_64"))]
fn can_copy_checked() -> bool {
    false
}

/// Copies `len` bytes from `src` to `dst` as [`copy_bytes`] does, 64 bytes
/// a register, and returns whether every byte past the first
/// [`UNCHECKED_HEAD`] is below 0x80, judged on the bytes written to `dst`:
/// the check and the copy are the same loads, so what the peer writes to
/// the source meanwhile cannot make the answer wrong about the copy.
///
/// A batch's contents are checked as UTF-8 before they are handed out as
/// `&str`; a copy out of a ring that already knows its bytes are ASCII
/// spares that check a second pass over them (a tenth of a 16 KiB
/// stream's reader, measured). Soundness of the access as for
/// [`copy_bytes`]: one inline-assembly block, opaque to the compiler; the
/// masked load and store of the tail touch only the bytes the mask
/// selects, and the CPU suppresses faults on the others.
///
/// # Safety
/// As for [`copy_bytes`], with `len >= UNCHECKED_HEAD`; and the CPU must
/// have AVX-512 F and BW ([`can_copy_checked`]).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn copy_checked(dst: *mut u8, src: *const u8, len: usize) -> bool {
    debug_assert!(len >= UNCHECKED_HEAD);
    let rest = len - UNCHECKED_HEAD;
    let blocks = rest / 64;
    // The tail's bytes, as a mask (fewer than 64 of them).
    let mask: u64 = (1u64 << (rest % 64)) - 1;
    let high: u64;
    // SAFETY: the caller's contract: `src` is readable and `dst` writable
    // for `len` bytes, which is the head's 64, `blocks` whole blocks of 64
    // and `rest % 64` masked bytes, in that order; the block clobbers only
    // the named registers and the flags.
    unsafe {
        std::arch::asm!(
            "vmovdqu64 zmm0, zmmword ptr [{src}]",
            "vmovdqu64 zmmword ptr [{dst}], zmm0",
            "vpxorq zmm1, zmm1, zmm1",
            "test {n}, {n}",
            "jz 3f",
            "2:",
            "add {src}, 64",
            "add {dst}, 64",
            "vmovdqu64 zmm0, zmmword ptr [{src}]",
            "vmovdqu64 zmmword ptr [{dst}], zmm0",
            "vporq zmm1, zmm1, zmm0",
            "dec {n}",
            "jnz 2b",
            "3:",
            "add {src}, 64",
            "add {dst}, 64",
            "kmovq k1, {mask}",
            "vmovdqu8 zmm0 {{k1}} {{z}}, zmmword ptr [{src}]",
            "vmovdqu8 zmmword ptr [{dst}] {{k1}}, zmm0",
            "vporq zmm1, zmm1, zmm0",
            "vpmovb2m k2, zmm1",
            "kmovq {high}, k2",
            src = inout(reg) src => _,
            dst = inout(reg) dst => _,
            n = inout(reg) blocks => _,
            mask = in(reg) mask,
            high = lateout(reg) high,
            out("zmm0") _,
            out("zmm1") _,
            out("k1") _,
            out("k2") _,
            options(nostack),
        );
    }
    high == 0
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn copy_checked(_dst: *mut u8, _src: *const u8, _len: usize) -> bool {
    unreachable!("only called where can_copy_checked")
}

/// Bytes of one part from which the producer writes it into the ring with
/// non-temporal stores ([`stream_bytes`]).
const STREAM_MIN: usize = 4096;

/// Copies `len` bytes from `src` to `dst` as [`copy_bytes`] does, but with
/// non-temporal stores (`movntdq`) for all but the ends: the lines go to
/// memory instead of into this core's cache. A ring's lines were last
/// read by the consumer's core, so an ordinary store must first take each
/// line back from that core's cache; at a 256 KiB ring that halved the
/// producer's rate (7.6 against 13 GB/s, measured with two threads on
/// this project's machines). Not for small records: a consumer that keeps
/// up would then read them from memory rather than from our cache. Not
/// either for records written [`FAR_BACKLOG`] or more ahead of the
/// consumer: it is then the slower side, and reads them faster from
/// cache.
///
/// The stores are weakly ordered: [`stream_fence`] must follow before
/// the record is published. Soundness as for [`copy_bytes`]: one
/// inline-assembly block per stretch, opaque to the compiler.
///
/// # Safety
/// As for [`copy_bytes`].
#[cfg(target_arch = "x86_64")]
#[inline]
unsafe fn stream_bytes(dst: *mut u8, src: *const u8, len: usize) {
    // The head up to a 16-byte boundary of `dst` (`movntdq` needs one),
    // and the tail after the last whole 64 bytes, go the ordinary way.
    let head = dst.align_offset(16).min(len);
    let body = (len - head) & !63;
    // SAFETY: the caller's contract, for the first `head` bytes.
    unsafe { copy_bytes(dst, src, head) };
    if body > 0 {
        // SAFETY: the caller's contract: `src + head` is readable and
        // `dst + head` (16-byte aligned, just above) writable for `body`
        // bytes, a nonzero multiple of 64; the loop reads and writes
        // exactly those, 64 bytes a turn, and clobbers only the named
        // registers and the flags.
        unsafe {
            std::arch::asm!(
                "2:",
                "movdqu xmm0, [rsi]",
                "movdqu xmm1, [rsi + 16]",
                "movdqu xmm2, [rsi + 32]",
                "movdqu xmm3, [rsi + 48]",
                "movntdq [rdi], xmm0",
                "movntdq [rdi + 16], xmm1",
                "movntdq [rdi + 32], xmm2",
                "movntdq [rdi + 48], xmm3",
                "add rsi, 64",
                "add rdi, 64",
                "sub rcx, 64",
                "jnz 2b",
                inout("rcx") body => _,
                inout("rdi") dst.add(head) => _,
                inout("rsi") src.add(head) => _,
                out("xmm0") _,
                out("xmm1") _,
                out("xmm2") _,
                out("xmm3") _,
                options(nostack),
            );
        }
    }
    let done = head + body;
    // SAFETY: the caller's contract, for the last `len - done` bytes.
    unsafe { copy_bytes(dst.add(done), src.add(done), len - done) };
}

/// Orders the non-temporal stores of [`stream_bytes`] before every later
/// store (the `tail` that publishes them).
#[cfg(target_arch = "x86_64")]
#[inline]
fn stream_fence() {
    // SAFETY: `sfence` only orders stores; it reads and writes nothing.
    unsafe { std::arch::asm!("sfence", options(nostack, preserves_flags)) };
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn stream_bytes(_dst: *mut u8, _src: *const u8, _len: usize) {
    unreachable!("only called where HAS_STRING_COPY")
}

#[cfg(not(target_arch = "x86_64"))]
fn stream_fence() {}

/// Whether this target has [`copy_bytes`]; elsewhere every copy goes a
/// word at a time.
const HAS_STRING_COPY: bool = cfg!(target_arch = "x86_64");

#[cfg(not(target_arch = "x86_64"))]
unsafe fn copy_bytes(_dst: *mut u8, _src: *const u8, _len: usize) {
    unreachable!("only called where HAS_STRING_COPY")
}

fn padded(len: usize) -> usize {
    (RECORD_HEADER + len + 7) & !7
}

fn header(len: u32) -> u64 {
    u64::from(len)
}

/// The producing end of a ring.
#[derive(Debug)]
pub struct Producer {
    region: Region,
    /// Bytes ever written (ours; published as `tail`).
    tail: u64,
    /// The consumer's `head` as last read (checked): the ring has at least
    /// the room it implies, since `head` only grows. Reading it only when
    /// that room runs low keeps the consumer's line out of the
    /// producer's path (a ping-pong would move it between the cores on
    /// every message).
    head_seen: u64,
    /// `tail` from which `head` is read again even with room to spare:
    /// so that [`Producer::backlog`] and the emptiness [`COMPACT`] looks
    /// for are never more than [`REFRESH_EVERY`] bytes old.
    refresh_at: u64,
}

/// Bytes at the start of a ring that a producer keeps to while its
/// consumer keeps up: past them, a producer that finds the ring empty
/// pads to the end and goes on from the start. A lane whose reader keeps
/// up touches (and keeps in cache) only this much of its ring; the rest
/// fills only when the reader falls behind (`docs/lane.md`, "Ring size,
/// and which stores").
pub const COMPACT: usize = 256 * 1024;

/// Bytes written between two reads of the consumer's `head` while the
/// ring has room to spare: `head` is on a line the consumer writes, so
/// not every record reads it.
const REFRESH_EVERY: u64 = 64 * 1024;

/// Bytes of backlog (written, not yet read) from which a large record goes
/// with ordinary stores rather than non-temporal ones. A backlog this
/// large means the consumer is the slower side: ordinary stores leave the
/// record in cache, where the consumer's copy reads it faster than from
/// memory, and the producer has time for what they cost it. While the
/// consumer keeps up, the producer is the slower side, and non-temporal
/// stores, the cheapest for it, win (`docs/lane.md`, "Ring size, and
/// which stores").
pub const FAR_BACKLOG: usize = 1024 * 1024;

/// The consuming end of a ring.
#[derive(Debug)]
pub struct Consumer {
    region: Region,
    /// Bytes ever read (ours; published as `head`).
    head: u64,
    /// Set once the peer broke the rules: the ring is not read again.
    broken: Option<&'static str>,
}

/// Zeroes a fresh region's indices and flags (the creator's side, before
/// it is shared).
///
/// # Safety
/// As for [`Producer::new`].
pub unsafe fn init(base: *mut u8, len: usize) -> Result<(), RingError> {
    // SAFETY: the caller's contract is `Region::new`'s.
    let r = unsafe { Region::new(base, len)? };
    for at in [TAIL, ROOM, HEAD, WAKE] {
        r.word(at).store(0, Ordering::Release);
    }
    Ok(())
}

/// Copies `parts` (exactly `len` bytes in all) into the region from byte
/// `at`: a large record with the string copy, a small one a word at a time
/// (its last word padded with zeros); with `stream`, parts of at least
/// [`STREAM_MIN`] bytes with non-temporal stores.
fn store_parts(region: &Region, at: usize, parts: &[&[u8]], len: usize, stream: bool) {
    if HAS_STRING_COPY && len >= STRING_COPY_MIN {
        let dst = region.bytes(at, len);
        let mut done = 0;
        let mut streamed = false;
        for part in parts {
            // SAFETY: the parts add up to `len` bytes (the caller's), all
            // inside the region (`bytes` checked `at + len`); the source is
            // our own memory, the destination the shared mapping, which
            // no Rust reference covers.
            unsafe {
                if stream && part.len() >= STREAM_MIN {
                    stream_bytes(dst.add(done), part.as_ptr(), part.len());
                    streamed = true;
                } else {
                    copy_bytes(dst.add(done), part.as_ptr(), part.len());
                }
            }
            done += part.len();
        }
        if streamed {
            stream_fence();
        }
        debug_assert_eq!(done, len);
        return;
    }
    let words = region.words(at, len.div_ceil(8));
    let mut next = 0;
    let mut word = [0u8; 8];
    let mut fill = 0;
    for part in parts {
        let mut p: &[u8] = part;
        if fill > 0 {
            let n = (8 - fill).min(p.len());
            word[fill..fill + n].copy_from_slice(&p[..n]);
            fill += n;
            p = &p[n..];
            if fill < 8 {
                continue;
            }
            words[next].store(u64::from_ne_bytes(word), Ordering::Relaxed);
            next += 1;
        }
        let chunks = p.chunks_exact(8);
        let rest = chunks.remainder();
        let n = p.len() / 8;
        for (w, c) in words[next..next + n].iter().zip(chunks) {
            w.store(
                u64::from_ne_bytes(c.try_into().expect("8 bytes")),
                Ordering::Relaxed,
            );
        }
        next += n;
        word = [0; 8];
        word[..rest.len()].copy_from_slice(rest);
        fill = rest.len();
    }
    if fill > 0 {
        words[next].store(u64::from_ne_bytes(word), Ordering::Relaxed);
    }
}

impl Producer {
    /// The producing end over a region whose indices are both zero (see
    /// [`init`]).
    ///
    /// # Safety
    /// `base` must be valid for reads and writes of `len` bytes, 64-byte
    /// aligned, for the producer's whole life, and no other value in this
    /// process may access that memory other than through this ring's
    /// atomics (the peer process may write it at will).
    pub unsafe fn new(base: *mut u8, len: usize) -> Result<Self, RingError> {
        // SAFETY: the caller's contract is `Region::new`'s.
        let region = unsafe { Region::new(base, len)? };
        Ok(Producer {
            region,
            tail: 0,
            head_seen: 0,
            refresh_at: REFRESH_EVERY,
        })
    }

    /// The largest payload a record can carry.
    pub fn max_payload(&self) -> usize {
        self.region.capacity / 2 - RECORD_HEADER
    }

    /// Bytes the ring has free now; an error if the peer's `head` is not
    /// one a consumer could have published.
    fn free(&mut self) -> Result<usize, RingError> {
        let cap = self.region.capacity;
        let seen = cap - self.tail.wrapping_sub(self.head_seen) as usize;
        if seen >= cap / 2 && self.tail < self.refresh_at {
            return Ok(seen);
        }
        self.fresh_free()
    }

    /// Bytes written that the consumer had not read when `head` was last
    /// read (at most [`REFRESH_EVERY`] bytes of writing ago).
    pub fn backlog(&self) -> usize {
        self.tail.wrapping_sub(self.head_seen) as usize
    }

    /// [`Producer::free`] from `head` read now.
    fn fresh_free(&mut self) -> Result<usize, RingError> {
        let head = self.region.word(HEAD).load(Ordering::SeqCst);
        let used = self.tail.wrapping_sub(head);
        // `head` never goes back: one behind what was seen is the peer's.
        if used > self.region.capacity as u64
            || !head.is_multiple_of(8)
            || head.wrapping_sub(self.head_seen) > self.region.capacity as u64
        {
            return Err(RingError::Corrupt("head outside the written range"));
        }
        self.head_seen = head;
        self.refresh_at = self.tail + REFRESH_EVERY;
        Ok(self.region.capacity - used as usize)
    }

    /// Whether the consumer has read everything published.
    #[cfg_attr(not(any(test, feature = "unstable")), allow(dead_code))]
    pub fn is_drained(&mut self) -> Result<bool, RingError> {
        Ok(self.fresh_free()? == self.region.capacity)
    }

    /// The largest payload one record written now can carry (0: the ring
    /// is full). Where too little is left before the end for a header and
    /// a word, the rest of the ring is padded first.
    ///
    /// Past [`COMPACT`] bytes into the ring, a ring found empty is padded
    /// to its end too, so that the next record starts at offset 0 (the
    /// pad is published with that record).
    pub fn room(&mut self) -> Result<usize, RingError> {
        let cap = self.region.capacity;
        let mut free = self.free()?;
        let pos = (self.tail as usize) & (cap - 1);
        let mut to_end = cap - pos;
        let back = pos >= COMPACT && free == cap;
        if to_end < RECORD_HEADER + 8 || back {
            if free < to_end {
                return Ok(0);
            }
            self.region
                .word(self.region.data(pos))
                .store(header(PAD), Ordering::Relaxed);
            self.tail += to_end as u64;
            free -= to_end;
            to_end = cap;
        }
        let fits = free.min(to_end);
        Ok(fits.saturating_sub(RECORD_HEADER).min(self.max_payload()))
    }

    /// Writes one record of the concatenated `parts` (`len` bytes in all,
    /// at most [`Producer::room`]) and publishes it. Parts of at least
    /// 4 KiB go with non-temporal stores ([`stream_bytes`]) unless the
    /// consumer is [`FAR_BACKLOG`] bytes or more behind.
    pub fn push_parts(&mut self, parts: &[&[u8]], len: usize) -> Result<(), RingError> {
        let stream = self.backlog() < FAR_BACKLOG;
        self.push_with(parts, len, stream)
    }

    #[inline]
    fn push_with(&mut self, parts: &[&[u8]], len: usize, stream: bool) -> Result<(), RingError> {
        debug_assert_eq!(parts.iter().map(|p| p.len()).sum::<usize>(), len);
        let room = self.room()?;
        if len > room || len == 0 {
            return Err(RingError::TooLarge { len, max: room });
        }
        let cap = self.region.capacity;
        let pos = (self.tail as usize) & (cap - 1);
        let at = self.region.data(pos);
        self.region
            .word(at)
            .store(header(len as u32), Ordering::Relaxed);
        store_parts(&self.region, at + RECORD_HEADER, parts, len, stream);
        self.tail += padded(len) as u64;
        // SeqCst: ordered before the load of the consumer's wake flag in
        // `take_wake` (the consumer stores its flag, then loads `tail`).
        self.region.word(TAIL).store(self.tail, Ordering::SeqCst);
        Ok(())
    }

    /// Writes one record; `Ok(false)` (nothing written) when the ring has
    /// no room for it now.
    #[cfg_attr(not(any(test, feature = "unstable")), allow(dead_code))]
    pub fn push(&mut self, payload: &[u8]) -> Result<bool, RingError> {
        let len = payload.len();
        if len > self.max_payload() {
            return Err(RingError::TooLarge {
                len,
                max: self.max_payload(),
            });
        }
        let cap = self.region.capacity;
        let need = padded(len);
        let pos = (self.tail as usize) & (cap - 1);
        let to_end = cap - pos;
        let pad = if need > to_end { to_end } else { 0 };
        if self.free()? < pad + need {
            return Ok(false);
        }
        if pad > 0 {
            self.region
                .word(self.region.data(pos))
                .store(header(PAD), Ordering::Relaxed);
            self.tail += pad as u64;
        }
        let pos = (self.tail as usize) & (cap - 1);
        let at = self.region.data(pos);
        self.region
            .word(at)
            .store(header(len as u32), Ordering::Relaxed);
        store_parts(&self.region, at + RECORD_HEADER, &[payload], len, true);
        self.tail += need as u64;
        self.region.word(TAIL).store(self.tail, Ordering::SeqCst);
        Ok(true)
    }

    /// Bytes ever written into the ring (this end's own count).
    pub fn written(&self) -> u64 {
        self.tail
    }

    /// After publishing: whether the consumer had announced that it
    /// sleeps (then it must be woken, once); the announcement is taken.
    pub fn take_wake(&self) -> bool {
        let w = self.region.word(WAKE);
        w.load(Ordering::SeqCst) != 0 && w.swap(0, Ordering::SeqCst) != 0
    }

    /// The ring had no room: announces that this producer waits for room,
    /// then looks again; true if room appeared meanwhile (then no wake
    /// will come, and the caller writes now).
    pub fn wait_for_room(&mut self) -> Result<bool, RingError> {
        self.region.word(ROOM).swap(1, Ordering::SeqCst);
        // `head` read after the flag (Dekker's pattern, see the module).
        self.fresh_free()?;
        Ok(self.room()? > 0)
    }
}

impl Consumer {
    /// The consuming end over a region whose indices are both zero.
    ///
    /// # Safety
    /// As for [`Producer::new`].
    pub unsafe fn new(base: *mut u8, len: usize) -> Result<Self, RingError> {
        // SAFETY: the caller's contract is `Region::new`'s.
        let region = unsafe { Region::new(base, len)? };
        Ok(Consumer {
            region,
            head: 0,
            broken: None,
        })
    }

    fn corrupt(&mut self, why: &'static str) -> RingError {
        self.broken = Some(why);
        RingError::Corrupt(why)
    }

    /// The next record, checked: its payload's byte offset and length;
    /// `None` when the ring is empty. Pads are skipped.
    fn next_record(&mut self) -> Result<Option<(usize, usize)>, RingError> {
        if let Some(why) = self.broken {
            return Err(RingError::Corrupt(why));
        }
        let cap = self.region.capacity;
        let tail = self.region.word(TAIL).load(Ordering::SeqCst);
        loop {
            let avail = tail.wrapping_sub(self.head);
            if avail == 0 {
                return Ok(None);
            }
            if avail > cap as u64 {
                return Err(self.corrupt("tail more than a ring ahead of head"));
            }
            let avail = avail as usize;
            if avail < RECORD_HEADER || !tail.is_multiple_of(8) {
                return Err(self.corrupt("tail not at a record boundary"));
            }
            let pos = (self.head as usize) & (cap - 1);
            let at = self.region.data(pos);
            let h = self.region.word(at).load(Ordering::Relaxed);
            let len = (h & 0xFFFF_FFFF) as u32;
            if len == PAD {
                let to_end = cap - pos;
                if to_end >= avail {
                    return Err(self.corrupt("padding with no record after it"));
                }
                self.head += to_end as u64;
                continue;
            }
            let len = len as usize;
            let need = padded(len);
            if h >> 32 != 0 || len > cap / 2 - RECORD_HEADER {
                return Err(self.corrupt("record header out of range"));
            }
            if need > avail || pos + need > cap {
                return Err(self.corrupt("record past the written bytes"));
            }
            return Ok(Some((at + RECORD_HEADER, len)));
        }
    }

    /// Marks the record of `len` payload bytes read and publishes `head`.
    fn consumed(&mut self, len: usize) {
        self.head += padded(len) as u64;
        // SeqCst: ordered before the load of the producer's room flag in
        // `take_room_wanted` (the producer stores its flag, then loads
        // `head`).
        self.region.word(HEAD).store(self.head, Ordering::SeqCst);
    }

    /// Copies the next record's payload into `out` (cleared first);
    /// `Ok(false)` when the ring is empty. After an error the ring stays
    /// broken.
    #[cfg_attr(not(any(test, feature = "unstable")), allow(dead_code))]
    pub fn pop(&mut self, out: &mut Vec<u8>) -> Result<bool, RingError> {
        out.clear();
        let Some((at, len)) = self.next_record()? else {
            return Ok(false);
        };
        out.reserve(len);
        for i in 0..len.div_ceil(8) {
            let w = self
                .region
                .word(at + i * 8)
                .load(Ordering::Relaxed)
                .to_ne_bytes();
            let take = (len - i * 8).min(8);
            out.extend_from_slice(&w[..take]);
        }
        self.consumed(len);
        Ok(true)
    }

    /// Appends the payloads of the next records to `out`, while the next
    /// one fits in `limit` bytes in all (the first is taken whatever its
    /// size); returns the bytes appended (0: the ring is empty).
    ///
    /// `ascii` gets the address ranges of what was appended that the copy
    /// found all ASCII (each a record's payload past its first
    /// [`UNCHECKED_HEAD`] bytes; see [`copy_checked`]). They hold for as
    /// long as those bytes of `out` are neither written nor freed; if
    /// `out` moves, ranges into it from before are dropped.
    pub fn pop_into(
        &mut self,
        out: &mut bytes::BytesMut,
        limit: usize,
        ascii: &mut Vec<std::ops::Range<usize>>,
    ) -> Result<usize, RingError> {
        let mut total = 0;
        let checked = can_copy_checked();
        while let Some((at, len)) = self.next_record()? {
            if total > 0 && total + len > limit {
                break;
            }
            let before = out.as_ptr();
            out.reserve(len);
            if out.as_ptr() != before {
                ascii.clear();
            }
            let spare = out.spare_capacity_mut();
            let dst = spare.as_mut_ptr().cast::<u8>();
            if checked && len >= CHECKED_COPY_MIN {
                let src = self.region.bytes(at, len);
                // SAFETY: as for `copy_bytes` below; `len` is at least
                // `CHECKED_COPY_MIN`, more than `UNCHECKED_HEAD`, and the
                // CPU can (`can_copy_checked`).
                if unsafe { copy_checked(dst, src, len) } {
                    let from = dst as usize + UNCHECKED_HEAD;
                    ascii.push(from..dst as usize + len);
                }
            } else if HAS_STRING_COPY && len >= STRING_COPY_MIN {
                let src = self.region.bytes(at, len);
                // SAFETY: `reserve(len)` made room for `len` bytes after
                // the buffer's length; the source is `len` bytes inside
                // the shared mapping (checked by `bytes`), which no Rust
                // reference covers; the two cannot overlap.
                unsafe { copy_bytes(dst, src, len) };
            } else {
                let words = self.region.words(at, len.div_ceil(8));
                let (full, tail) = words.split_at(len / 8);
                for (i, w) in full.iter().enumerate() {
                    // SAFETY: `reserve(len)` made room for `len` bytes after
                    // the buffer's length, and `i * 8 + 8 <= len`.
                    unsafe {
                        dst.add(i * 8)
                            .cast::<u64>()
                            .write_unaligned(w.load(Ordering::Relaxed))
                    };
                }
                if let Some(w) = tail.first() {
                    let w = w.load(Ordering::Relaxed).to_ne_bytes();
                    let done = full.len() * 8;
                    // SAFETY: as above, for the last `len - done` (< 8)
                    // bytes; the source is a local array.
                    unsafe { std::ptr::copy_nonoverlapping(w.as_ptr(), dst.add(done), len - done) };
                }
            }
            // SAFETY: whichever way above, the `len` bytes after the old
            // length were just written.
            unsafe { out.set_len(out.len() + len) };
            self.consumed(len);
            total += len;
        }
        Ok(total)
    }

    /// After reading: whether the producer had announced that it waits
    /// for room (then it must be woken, once); the announcement is taken.
    pub fn take_room_wanted(&self) -> bool {
        let w = self.region.word(ROOM);
        w.load(Ordering::SeqCst) != 0 && w.swap(0, Ordering::SeqCst) != 0
    }

    /// Announces that the consumer is about to sleep, then looks again:
    /// true if the ring is still empty (the producer will wake it, so it
    /// may sleep); false if something arrived meanwhile. Either way
    /// [`Consumer::end_sleep`] follows.
    pub fn prepare_sleep(&mut self) -> bool {
        self.region.word(WAKE).swap(1, Ordering::SeqCst);
        let tail = self.region.word(TAIL).load(Ordering::SeqCst);
        tail == self.head
    }

    /// Bytes ever read from the ring (this end's own count).
    pub fn read_total(&self) -> u64 {
        self.head
    }

    /// The consumer is awake again: a producer need not wake it.
    pub fn end_sleep(&self) {
        self.region.word(WAKE).store(0, Ordering::SeqCst);
    }

    /// Whether the peer broke the ring's rules (it is not read again).
    pub fn is_broken(&self) -> bool {
        self.broken.is_some()
    }

    /// Whether a record (or garbage) is published and unread.
    #[cfg_attr(not(any(test, feature = "unstable")), allow(dead_code))]
    pub fn has_data(&self) -> bool {
        self.broken.is_none() && self.region.word(TAIL).load(Ordering::SeqCst) != self.head
    }

    /// Whether a producer that waits for room is worth waking now: the
    /// ring is at most half full. A producer faster than its consumer
    /// fills the ring and waits; woken at once, it would write a record or
    /// two and wait again, a wake-up (a system call on each side) every
    /// few records. Woken at half, it writes half a ring in one go, while
    /// the consumer still has the other half to read. A `tail` no producer
    /// could have published answers yes (the next read reports it).
    pub fn room_to_offer(&self) -> bool {
        let unread = self
            .region
            .word(TAIL)
            .load(Ordering::Acquire)
            .wrapping_sub(self.head);
        let cap = self.region.capacity as u64;
        unread <= cap / 2 || unread > cap
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A 64-byte aligned heap region standing in for a shared mapping.
    struct Mem(Vec<Aligned>);

    #[repr(C, align(64))]
    #[derive(Clone, Copy)]
    struct Aligned([u64; 8]);

    impl Mem {
        fn new(capacity: usize) -> Self {
            Mem(vec![Aligned([0; 8]); (RING_HEADER + capacity) / 64])
        }
        fn ptr(&mut self) -> *mut u8 {
            self.0.as_mut_ptr().cast()
        }
        fn len(&self) -> usize {
            self.0.len() * 64
        }
    }

    fn pair(mem: &mut Mem) -> (Producer, Consumer) {
        let (p, n) = (mem.ptr(), mem.len());
        // SAFETY: `mem` outlives both ends in each test and is touched
        // only through them.
        unsafe {
            init(p, n).unwrap();
            (Producer::new(p, n).unwrap(), Consumer::new(p, n).unwrap())
        }
    }

    #[test]
    fn records_come_out_in_order_across_wraps() {
        let mut mem = Mem::new(4096);
        let (mut tx, mut rx) = pair(&mut mem);
        let mut out = Vec::new();
        let mut next_out = 0u32;
        for i in 0..5000u32 {
            let rec = vec![i as u8; (i as usize * 7) % 300 + 1];
            while !tx.push(&rec).unwrap() {
                assert!(rx.pop(&mut out).unwrap(), "full ring holds a record");
                let want = (next_out as usize * 7) % 300 + 1;
                assert_eq!(out, vec![next_out as u8; want]);
                next_out += 1;
            }
        }
        while rx.pop(&mut out).unwrap() {
            assert_eq!(out.len(), (next_out as usize * 7) % 300 + 1);
            next_out += 1;
        }
        assert_eq!(next_out, 5000);
    }

    #[test]
    fn a_full_ring_refuses_and_an_empty_one_is_empty() {
        let mut mem = Mem::new(4096);
        let (mut tx, mut rx) = pair(&mut mem);
        let mut out = vec![1];
        assert!(!rx.pop(&mut out).unwrap());
        assert!(out.is_empty());
        let rec = [7u8; 1000];
        let mut n = 0;
        while tx.push(&rec).unwrap() {
            n += 1;
        }
        assert_eq!(n, 4096 / padded(1000));
        assert!(matches!(
            tx.push(&[0; 4096]),
            Err(RingError::TooLarge { .. })
        ));
    }

    #[test]
    fn scribbled_indices_and_headers_are_errors_not_reads() {
        let mut mem = Mem::new(4096);
        let base = mem.ptr();
        let (mut tx, mut rx) = pair(&mut mem);
        tx.push(b"hello").unwrap();
        let word = |at: usize| {
            // SAFETY: in bounds and aligned; the test is single-threaded.
            unsafe { AtomicU64::from_ptr(base.add(at).cast()) }
        };
        // A header claiming more than was written.
        word(RING_HEADER).store(4000, Ordering::Relaxed);
        let mut out = Vec::new();
        assert!(matches!(rx.pop(&mut out), Err(RingError::Corrupt(_))));
        assert!(
            matches!(rx.pop(&mut out), Err(RingError::Corrupt(_))),
            "stays broken"
        );
        // A tail a ring and more ahead.
        let mut mem = Mem::new(4096);
        let base = mem.ptr();
        let (_tx, mut rx) = pair(&mut mem);
        // SAFETY: as above.
        unsafe { AtomicU64::from_ptr(base.cast::<u64>()) }.store(1 << 40, Ordering::Relaxed);
        assert!(matches!(rx.pop(&mut out), Err(RingError::Corrupt(_))));
        // A producer whose consumer claims to have read unwritten bytes.
        let mut mem = Mem::new(4096);
        let base = mem.ptr();
        let (mut tx, _rx) = pair(&mut mem);
        // SAFETY: as above.
        unsafe { AtomicU64::from_ptr(base.add(HEAD).cast::<u64>()) }
            .store(1 << 20, Ordering::Relaxed);
        // It is seen once the producer needs the room `head` gives: within
        // half a ring of records.
        let mut pushed = 0;
        let err = loop {
            match tx.push(b"x") {
                Ok(true) => pushed += 1,
                other => break other,
            }
        };
        assert!(matches!(err, Err(RingError::Corrupt(_))), "{err:?}");
        assert!(pushed * padded(1) <= 4096 / 2 + 16, "{pushed}");
    }

    #[test]
    fn an_unpublished_record_is_never_seen() {
        // A producer killed mid-record: header and payload written, tail
        // not published.
        let mut mem = Mem::new(4096);
        let base = mem.ptr();
        let (_tx, mut rx) = pair(&mut mem);
        // SAFETY: as above.
        unsafe { AtomicU64::from_ptr(base.add(RING_HEADER).cast::<u64>()) }
            .store(5, Ordering::Relaxed);
        let mut out = Vec::new();
        assert!(!rx.pop(&mut out).unwrap());
    }

    #[test]
    fn two_threads_move_every_record_in_order() {
        let mut mem = Mem::new(8192);
        let (mut tx, mut rx) = pair(&mut mem);
        const N: u32 = 200_000;
        std::thread::scope(|s| {
            s.spawn(move || {
                for i in 0..N {
                    let rec = i.to_le_bytes().repeat((i % 5 + 1) as usize);
                    while !tx.push(&rec).unwrap() {
                        std::hint::spin_loop();
                    }
                }
            });
            let mut out = Vec::new();
            let mut next = 0u32;
            while next < N {
                if rx.pop(&mut out).unwrap() {
                    assert_eq!(out, next.to_le_bytes().repeat((next % 5 + 1) as usize));
                    next += 1;
                } else {
                    std::hint::spin_loop();
                }
            }
        });
    }

    /// A peer writing random words all over the region while the consumer
    /// reads: every pop returns (a record within bounds, empty, or an
    /// error that sticks), and none loops.
    #[test]
    fn a_concurrently_scribbling_peer_yields_errors_never_panics() {
        let mut mem = Mem::new(4096);
        let base = mem.ptr() as usize;
        let len = mem.len();
        let (mut tx, mut rx) = pair(&mut mem);
        let max = tx.max_payload();
        let stop = std::sync::atomic::AtomicBool::new(false);
        std::thread::scope(|s| {
            s.spawn(|| {
                let mut x = 0x9E37_79B9_7F4A_7C15u64;
                while !stop.load(Ordering::Relaxed) {
                    // xorshift: arbitrary words at arbitrary aligned offsets.
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    // Every fourth write hits the tail; the rest land anywhere.
                    let off = if x & 6 == 0 {
                        0
                    } else {
                        (x as usize % (len / 8)) * 8
                    };
                    let v = if x & 1 == 0 { x >> 20 } else { x & 0xFFFF };
                    // SAFETY: in bounds and aligned; the region outlives
                    // the scope.
                    unsafe { AtomicU64::from_ptr((base + off) as *mut u64) }
                        .store(v, Ordering::Relaxed);
                }
            });
            let mut out = Vec::new();
            let mut errors = 0u64;
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
            let mut i = 0u32;
            // Until the scribbles were noticed (a scribbled tail breaks the
            // ring for good), and at least 50,000 rounds.
            while (errors == 0 || i < 50_000) && std::time::Instant::now() < deadline {
                if i.is_multiple_of(4) {
                    let _ = tx.push(&i.to_le_bytes());
                }
                match rx.pop(&mut out) {
                    Ok(_) => assert!(out.len() <= max),
                    Err(_) => errors += 1,
                }
                i += 1;
            }
            stop.store(true, Ordering::Relaxed);
            assert!(errors > 0, "the scribbles were noticed");
        });
    }

    /// Pushes `stream` through a ring over `mem`, popping as it
    /// goes, and checks that it comes out whole and in order. Record `k`
    /// (counted from 0) takes `cut(k, avail)` = (its length, at most
    /// `avail`; the length of its first part) while the ring has room;
    /// the pops take `pop_limit(k)` bytes, `k` the records pushed so far.
    /// Returns the producer and the number of records.
    fn pass_stream(
        mem: &mut Mem,
        stream: &[u8],
        mut cut: impl FnMut(usize, usize) -> (usize, usize),
        pop_limit: impl Fn(usize) -> usize,
    ) -> (Producer, usize) {
        let (mut tx, mut rx) = pair(mem);
        let (mut sent, mut got) = (0, bytes::BytesMut::new());
        let mut k = 0usize;
        while got.len() < stream.len() {
            let room = tx.room().unwrap();
            let left = stream.len() - sent;
            if room > 0 && left > 0 {
                let (len, first) = cut(k, room.min(left));
                let (a, b) = stream[sent..sent + len].split_at(first);
                tx.push_parts(&[a, b], len).unwrap();
                sent += len;
                k += 1;
            }
            rx.pop_into(&mut got, pop_limit(k), &mut Vec::new())
                .unwrap();
        }
        assert!(got[..] == stream[..]);
        (tx, k)
    }

    /// A byte stream cut into records wherever room ends, from parts of
    /// every alignment, comes out whole and in order.
    #[test]
    fn parts_pushed_as_room_allows_come_out_as_the_same_stream() {
        let mut mem = Mem::new(4096);
        let stream: Vec<u8> = (0..200_000u32).map(|i| (i * 31 % 251) as u8).collect();
        let (mut tx, _) = pass_stream(
            &mut mem,
            &stream,
            |k, avail| {
                let len = avail.min((k + 1) * 13 % 3000 + 1);
                (len, len / 3)
            },
            |k| (k + 1) % 5000,
        );
        assert!(tx.is_drained().unwrap());
        assert!(matches!(
            tx.push_parts(&[&[0; 10]], 10)
                .and(tx.push_parts(&[&[0; 4096]], 4096)),
            Err(RingError::TooLarge { .. })
        ));
    }

    /// Parts large enough to be streamed (non-temporal stores), at every
    /// alignment of source and destination, with small parts between
    /// them, come out as the same stream.
    #[test]
    fn streamed_parts_come_out_whole_at_every_alignment() {
        let mut mem = Mem::new(1 << 16);
        let stream: Vec<u8> = (0..2_000_000u32).map(|i| (i * 131 % 251) as u8).collect();
        let (_, k) = pass_stream(
            &mut mem,
            &stream,
            |k, avail| {
                let len = avail.min(STREAM_MIN * 3 + k % 61);
                // A small part (odd length: the next one starts unaligned)
                // before a streamed one, when there is room for both.
                let small = if len > STREAM_MIN + 40 { 1 + k % 39 } else { 0 };
                (len, small)
            },
            |_| 1 << 20,
        );
        assert!(k > 100, "{k} records");
    }

    /// A producer whose consumer keeps up stays within the ring's first
    /// [`COMPACT`] bytes (and the distance to its next look at `head`),
    /// whatever the ring's size: going back to the start when it finds
    /// the ring empty.
    #[test]
    fn a_consumer_that_keeps_up_keeps_the_producer_near_the_start() {
        let cap = 1 << 20;
        let mut mem = Mem::new(cap);
        let (mut tx, mut rx) = pair(&mut mem);
        let (mut out, mut highest, mut k) = (bytes::BytesMut::new(), 0, 0u32);
        while tx.written() < 4 * cap as u64 {
            let len = (1000 + (k as usize * 37) % 3000).min(tx.room().unwrap());
            let at = (tx.written() as usize) & (cap - 1);
            highest = highest.max(at + RECORD_HEADER + len);
            tx.push_parts(&[&vec![k as u8; len]], len).unwrap();
            out.clear();
            assert_eq!(
                rx.pop_into(&mut out, usize::MAX, &mut Vec::new()).unwrap(),
                len
            );
            assert!(out.iter().all(|b| *b == k as u8));
            k += 1;
        }
        let bound = COMPACT + REFRESH_EVERY as usize + RECORD_HEADER + 4000;
        assert!(highest <= bound, "wrote up to {highest}, bound {bound}");
        assert!(highest > COMPACT, "went past the compact start");
    }

    /// A consumer that falls behind lets the whole ring fill: the
    /// producer goes back to the start only over an empty ring.
    #[test]
    fn a_consumer_that_falls_behind_lets_the_whole_ring_fill() {
        let cap = 1 << 20;
        let mut mem = Mem::new(cap);
        let (mut tx, mut rx) = pair(&mut mem);
        let one = vec![7u8; 4000];
        let mut out = bytes::BytesMut::new();
        for lap in 0..3 {
            // Pushed without reading until full.
            let mut pushed = 0;
            while tx.room().unwrap() >= one.len() {
                tx.push_parts(&[&one], one.len()).unwrap();
                pushed += 1;
            }
            assert!(
                pushed * 4008 > cap - 2 * 4008,
                "lap {lap}: {pushed} records"
            );
            assert!(tx.backlog() > cap - 2 * 4008);
            out.clear();
            while rx.pop_into(&mut out, usize::MAX, &mut Vec::new()).unwrap() > 0 {}
            assert_eq!(out.len(), pushed * one.len());
            assert!(out.iter().all(|b| *b == 7));
        }
    }

    /// Large records written far behind the consumer (ordinary stores,
    /// [`FAR_BACKLOG`]) and near it (non-temporal) come out whole, from
    /// parts of every alignment.
    #[test]
    fn large_records_far_behind_the_consumer_come_out_whole() {
        let cap = 4 << 20;
        let mut mem = Mem::new(cap);
        let (mut tx, mut rx) = pair(&mut mem);
        let stream: Vec<u8> = (0..24_000_000u32).map(|i| (i * 131 % 251) as u8).collect();
        let (mut sent, mut got, mut k) = (0, bytes::BytesMut::new(), 0usize);
        let (mut far, mut near) = (0, 0);
        while got.len() < stream.len() {
            let room = tx.room().unwrap();
            let left = stream.len() - sent;
            if room > 0 && left > 0 {
                let len = left.min(room).min(STREAM_MIN * 4 - k % 61);
                let small = (1 + k % 39).min(len);
                let (a, b) = stream[sent..sent + len].split_at(small);
                if tx.backlog() >= FAR_BACKLOG {
                    far += 1;
                } else {
                    near += 1;
                }
                tx.push_parts(&[a, b], len).unwrap();
                sent += len;
                k += 1;
            } else {
                // The consumer reads only once the ring is full, so the
                // backlog stays above FAR_BACKLOG most of the time.
                rx.pop_into(&mut got, cap / 2, &mut Vec::new()).unwrap();
            }
        }
        assert!(got[..] == stream[..]);
        assert!(far > 100 && near > 10, "{far} far, {near} near");
    }

    fn fill(tx: &mut Producer) {
        loop {
            let room = tx.room().unwrap();
            if room == 0 {
                return;
            }
            tx.push_parts(&[&vec![1; room]], room).unwrap();
        }
    }

    #[test]
    fn a_sleeping_consumer_is_woken_once_and_a_waiting_producer_too() {
        let mut mem = Mem::new(4096);
        let (mut tx, mut rx) = pair(&mut mem);
        assert!(!tx.take_wake(), "nobody sleeps yet");
        assert!(rx.prepare_sleep(), "empty: may sleep");
        tx.push(b"x").unwrap();
        assert!(tx.take_wake(), "the sleeper is woken");
        assert!(!tx.take_wake(), "once");
        assert!(!rx.prepare_sleep(), "data arrived: no sleep");
        rx.end_sleep();
        tx.push(b"y").unwrap();
        assert!(!tx.take_wake(), "awake consumers are not woken");
        fill(&mut tx);
        assert!(!tx.wait_for_room().unwrap(), "still full");
        let mut mem = Mem::new(4096);
        let (mut tx, mut rx) = pair(&mut mem);
        fill(&mut tx);
        assert!(!tx.wait_for_room().unwrap());
        let mut out = Vec::new();
        assert!(rx.pop(&mut out).unwrap());
        assert!(rx.take_room_wanted(), "the waiting producer is woken");
        assert!(!rx.take_room_wanted(), "once");
    }

    /// The checked copy copies every length exactly, and vouches for a
    /// record past its head exactly when every byte there is ASCII: a
    /// high bit anywhere past the head (in a whole block or in the tail)
    /// withholds the range, one in the head does not.
    #[test]
    #[allow(clippy::single_range_in_vec_init)] // one range, in a list of ranges
    fn a_checked_copy_vouches_for_exactly_the_ascii_records() {
        if !can_copy_checked() {
            eprintln!("skipped: this CPU has no AVX-512 BW (the checked copy is not used here)");
            return;
        }
        let mut mem = Mem::new(1 << 16);
        let (mut tx, mut rx) = pair(&mut mem);
        for len in [CHECKED_COPY_MIN, 1025, 1087, 1088, 4096, 5000, 16_391] {
            let clean: Vec<u8> = (0..len).map(|i| b'a' + (i % 26) as u8).collect();
            let mut marks = vec![None, Some(0), Some(UNCHECKED_HEAD - 1)];
            marks.extend([UNCHECKED_HEAD, UNCHECKED_HEAD + 65, len - 64, len - 1].map(Some));
            for at in marks {
                let mut rec = clean.clone();
                if let Some(at) = at {
                    rec[at] = 0xC3;
                }
                assert!(tx.push(&rec).unwrap());
                let mut out = bytes::BytesMut::with_capacity(1 << 15);
                let mut ascii = Vec::new();
                assert_eq!(rx.pop_into(&mut out, usize::MAX, &mut ascii).unwrap(), len);
                assert!(out[..] == rec[..], "len {len}: copied exactly");
                let base = out.as_ptr() as usize;
                let vouched = at.is_none_or(|at| at < UNCHECKED_HEAD);
                if vouched {
                    assert_eq!(
                        ascii,
                        [base + UNCHECKED_HEAD..base + len],
                        "len {len}, {at:?}"
                    );
                } else {
                    assert!(
                        ascii.is_empty(),
                        "len {len}: high bit at {at:?} vouched for"
                    );
                }
            }
        }
        // Below the threshold, nothing is vouched for (the usual check
        // runs).
        assert!(tx.push(&[b'a'; CHECKED_COPY_MIN - 1]).unwrap());
        let (mut out, mut ascii) = (bytes::BytesMut::new(), Vec::new());
        rx.pop_into(&mut out, usize::MAX, &mut ascii).unwrap();
        assert!(ascii.is_empty());
    }

    /// A buffer that moves while records are appended drops the ranges
    /// into where it was.
    #[test]
    fn ranges_into_a_buffer_that_moved_are_dropped() {
        if !can_copy_checked() {
            eprintln!("skipped: this CPU has no AVX-512 BW (the checked copy is not used here)");
            return;
        }
        let mut mem = Mem::new(1 << 16);
        let (mut tx, mut rx) = pair(&mut mem);
        for _ in 0..3 {
            assert!(tx.push(&[b'z'; 5000]).unwrap());
        }
        // Room for the first record only, in a buffer that shares its
        // allocation (so it cannot grow in place): the second record moves
        // it.
        let mut out = bytes::BytesMut::with_capacity(5008);
        out.extend_from_slice(&[0; 8]);
        let _other = out.split_to(8);
        let first = out.as_ptr();
        let mut ascii = Vec::new();
        assert_eq!(
            rx.pop_into(&mut out, usize::MAX, &mut ascii).unwrap(),
            15_000
        );
        assert_ne!(out.as_ptr(), first, "the buffer moved");
        let base = out.as_ptr() as usize;
        assert!(!ascii.is_empty());
        for r in &ascii {
            assert!(
                r.start >= base && r.end <= base + out.len(),
                "{r:?} outside the buffer"
            );
            // SAFETY: inside `out` (just asserted), which lives and is not
            // written meanwhile.
            let s = unsafe { std::slice::from_raw_parts(r.start as *const u8, r.len()) };
            assert!(s.is_ascii());
        }
    }

    #[test]
    fn room_is_offered_from_half_the_ring() {
        let mut mem = Mem::new(4096);
        let (mut tx, mut rx) = pair(&mut mem);
        assert!(rx.room_to_offer(), "empty");
        for _ in 0..3 {
            tx.push(&[7; 1000]).unwrap();
        }
        assert!(!rx.room_to_offer(), "three quarters full");
        let mut out = Vec::new();
        assert!(rx.pop(&mut out).unwrap());
        assert!(rx.room_to_offer(), "half full");
        // A tail no producer could publish: offered (the read reports it).
        rx.region.word(TAIL).store(1 << 40, Ordering::Relaxed);
        assert!(rx.room_to_offer());
    }

    #[test]
    fn bad_regions_are_refused() {
        let mut mem = Mem::new(4096);
        let p = mem.ptr();
        // SAFETY: the pointers are only checked, never used, on refusal.
        unsafe {
            assert!(Producer::new(p, RING_HEADER + 3000).is_err());
            assert!(Producer::new(p, RING_HEADER + 2048).is_err());
            assert!(Consumer::new(p.add(8), RING_HEADER + 4096).is_err());
        }
    }
}
