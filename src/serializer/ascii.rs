//! Whether a received body is all ASCII, at the speed of the loads.
//!
//! A batch's body is checked as UTF-8 before any of it is handed out
//! (`binary::parse_batch_indexed`). Most bodies are ASCII, and an ASCII body is
//! UTF-8: one pass that ORs every byte together and looks at the high
//! bit settles it. simdutf8's own ASCII path does that 32 bytes at a time
//! with a test per block; this does 128 or 256 bytes a turn with no test
//! until the end, which halves the check of a 16 KiB body that was just
//! copied out of a lane's ring (it sits in the first-level cache). A body
//! that is not ASCII goes on to the full UTF-8 check, so the answer here
//! only ever spares work.

/// Whether every byte of `b` is below 0x80.
#[inline]
pub fn is_ascii(b: &[u8]) -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512bw") {
            // SAFETY: the CPU has AVX-512 F and BW (BW implies F), the
            // features the function is compiled for.
            return unsafe { x86::is_ascii_avx512(b) };
        }
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU has AVX2, the feature the function is
            // compiled for.
            return unsafe { x86::is_ascii_avx2(b) };
        }
    }
    b.is_ascii()
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    /// [`super::is_ascii`] with 64-byte registers, four of them a turn.
    ///
    /// # Safety
    /// The CPU must have AVX-512 F and BW.
    #[target_feature(enable = "avx512f,avx512bw")]
    pub unsafe fn is_ascii_avx512(b: &[u8]) -> bool {
        let mut chunks = b.chunks_exact(256);
        let mut acc = _mm512_setzero_si512();
        for c in &mut chunks {
            let p = c.as_ptr();
            // SAFETY: `c` is 256 bytes, so each unaligned 64-byte load
            // at 0, 64, 128 and 192 is inside it.
            let (w, x, y, z) = unsafe {
                (
                    _mm512_loadu_si512(p.cast()),
                    _mm512_loadu_si512(p.add(64).cast()),
                    _mm512_loadu_si512(p.add(128).cast()),
                    _mm512_loadu_si512(p.add(192).cast()),
                )
            };
            acc = _mm512_or_si512(
                acc,
                _mm512_or_si512(_mm512_or_si512(w, x), _mm512_or_si512(y, z)),
            );
        }
        let mut rest = chunks.remainder().chunks_exact(64);
        for c in &mut rest {
            // SAFETY: `c` is 64 bytes.
            acc = _mm512_or_si512(acc, unsafe { _mm512_loadu_si512(c.as_ptr().cast()) });
        }
        let tail = rest.remainder();
        // A mask of the tail's bytes (fewer than 64): the masked load reads
        // only those, and faults on none of the others.
        let mask: __mmask64 = (1u64 << tail.len()) - 1;
        // SAFETY: the load touches only the `tail.len()` bytes the mask
        // selects, all inside `tail`.
        let t = unsafe { _mm512_maskz_loadu_epi8(mask, tail.as_ptr().cast()) };
        acc = _mm512_or_si512(acc, t);
        _mm512_movepi8_mask(acc) == 0
    }

    /// [`super::is_ascii`] with 32-byte registers, four of them a turn.
    ///
    /// # Safety
    /// The CPU must have AVX2.
    #[target_feature(enable = "avx2")]
    pub unsafe fn is_ascii_avx2(b: &[u8]) -> bool {
        let mut chunks = b.chunks_exact(128);
        let mut acc = _mm256_setzero_si256();
        for c in &mut chunks {
            let p = c.as_ptr();
            // SAFETY: `c` is 128 bytes, so each unaligned 32-byte load at
            // 0, 32, 64 and 96 is inside it.
            let (w, x, y, z) = unsafe {
                (
                    _mm256_loadu_si256(p.cast()),
                    _mm256_loadu_si256(p.add(32).cast()),
                    _mm256_loadu_si256(p.add(64).cast()),
                    _mm256_loadu_si256(p.add(96).cast()),
                )
            };
            acc = _mm256_or_si256(
                acc,
                _mm256_or_si256(_mm256_or_si256(w, x), _mm256_or_si256(y, z)),
            );
        }
        _mm256_movemask_epi8(acc) == 0 && chunks.remainder().is_ascii()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every length up to a few blocks, with a high bit at every position
    /// (and none): the fast check agrees with the standard library's.
    #[test]
    fn agrees_with_the_standard_check_at_every_length_and_position() {
        for len in 0..700 {
            let clean: Vec<u8> = (0..len).map(|i| (i % 127) as u8).collect();
            assert!(is_ascii(&clean), "len {len}");
            for at in 0..len {
                let mut b = clean.clone();
                b[at] = 0x80 | (at as u8);
                assert!(!is_ascii(&b), "len {len}, high bit at {at}");
            }
        }
    }

    /// Both implementations, whichever the CPU would pick.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn both_widths_agree() {
        let mut b: Vec<u8> = (0..5000).map(|i| (i % 100) as u8 + 20).collect();
        let cases = [0usize, 1, 63, 64, 127, 128, 255, 256, 257, 4999];
        for &at in &cases {
            for v in [b'a', 0xC3, 0xFF] {
                b[at] = v;
                for len in [at + 1, 4096, 5000] {
                    let s = &b[..len.max(at + 1)];
                    let want = s.is_ascii();
                    if std::arch::is_x86_feature_detected!("avx2") {
                        // SAFETY: the CPU has AVX2.
                        assert_eq!(unsafe { x86::is_ascii_avx2(s) }, want, "avx2 at {at}");
                    }
                    if std::arch::is_x86_feature_detected!("avx512bw") {
                        // SAFETY: the CPU has AVX-512 BW.
                        assert_eq!(unsafe { x86::is_ascii_avx512(s) }, want, "avx512 at {at}");
                    }
                }
                b[at] = b'a';
            }
        }
    }
}
