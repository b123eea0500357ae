//! The lane's shared memory: a memfd sealed against shrinking and growing,
//! mapped by both peers, holding one [`ring`](super::ring) per direction.
//!
//! The creator sizes the memfd, seals it (`F_SEAL_SHRINK`, `F_SEAL_GROW`,
//! `F_SEAL_SEAL`) and maps it; the receiver of the descriptor maps it only
//! if those seals are set and the size is the one agreed. A peer that could
//! shrink the file would make the other side's reads fault (`SIGBUS`); the
//! seals make that impossible, and the size check makes every ring offset
//! computed from the agreed size fall inside the mapping.
//!
//! Layout: ring 0 (written by the creator), then ring 1 (written by the
//! other side), each `RING_HEADER + capacity` bytes.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::ptr::NonNull;

use rustix::fs::{MemfdFlags, SealFlags};
use rustix::mm::{MapFlags, ProtFlags};

use super::ring::{self, Consumer, Producer, RING_HEADER, RingError};

/// Why a lane's memory could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum ShmError {
    /// A system call refused (memfd, sealing, mapping).
    #[error("{what}: {err}")]
    Sys {
        /// The step that failed.
        what: &'static str,
        /// The kernel's answer.
        err: rustix::io::Errno,
    },
    /// A descriptor from the peer that is not what was agreed.
    #[error("shared-memory lane refused: {0}")]
    Refused(&'static str),
    /// The region does not make rings.
    #[error(transparent)]
    Ring(#[from] RingError),
}

fn sys(what: &'static str) -> impl FnOnce(rustix::io::Errno) -> ShmError {
    move |err| ShmError::Sys { what, err }
}

/// The seals a lane's memfd must carry.
const SEALS: SealFlags = SealFlags::SHRINK
    .union(SealFlags::GROW)
    .union(SealFlags::SEAL);

/// A mapped, sealed memfd of two rings.
#[derive(Debug)]
pub struct Region {
    fd: OwnedFd,
    ptr: NonNull<u8>,
    len: usize,
    capacity: usize,
}

// SAFETY: the mapping is plain memory owned by this value; every access to
// it goes through the rings' atomics.
unsafe impl Send for Region {}

impl Region {
    /// Bytes of a region of two rings of `capacity` bytes each.
    pub fn size(capacity: usize) -> usize {
        2 * (RING_HEADER + capacity)
    }

    /// Creates, sizes, seals and maps a new region with both rings' indices
    /// at zero.
    pub fn create(capacity: usize) -> Result<Self, ShmError> {
        let fd =
            rustix::fs::memfd_create("ipcm-lane", MemfdFlags::CLOEXEC | MemfdFlags::ALLOW_SEALING)
                .map_err(sys("memfd_create"))?;
        let len = Self::size(capacity);
        rustix::fs::ftruncate(&fd, len as u64).map_err(sys("ftruncate"))?;
        rustix::fs::fcntl_add_seals(&fd, SEALS).map_err(sys("F_ADD_SEALS"))?;
        let r = Self::map(fd, len, capacity)?;
        for at in [0, RING_HEADER + capacity] {
            // SAFETY: both rings lie inside the mapping just made, which
            // this region owns and nothing else in the process touches.
            unsafe { ring::init(r.ptr.as_ptr().add(at), RING_HEADER + capacity)? };
        }
        Ok(r)
    }

    /// Maps a region received from the peer, if it is sealed against
    /// resizing and of the size two rings of `capacity` bytes take.
    pub fn open(fd: OwnedFd, capacity: usize) -> Result<Self, ShmError> {
        let seals = rustix::fs::fcntl_get_seals(&fd).map_err(sys("F_GET_SEALS"))?;
        if !seals.contains(SealFlags::SHRINK | SealFlags::GROW) {
            return Err(ShmError::Refused("memfd not sealed against resizing"));
        }
        let len = Self::size(capacity);
        let st = rustix::fs::fstat(&fd).map_err(sys("fstat"))?;
        if st.st_size != len as i64 {
            return Err(ShmError::Refused("memfd of the wrong size"));
        }
        Self::map(fd, len, capacity)
    }

    fn map(fd: OwnedFd, len: usize, capacity: usize) -> Result<Self, ShmError> {
        // SAFETY: a fresh shared mapping of `len` bytes of a file that is
        // exactly `len` bytes and sealed against shrinking (checked by
        // the callers), so every byte of it stays backed.
        let p = unsafe {
            rustix::mm::mmap(
                std::ptr::null_mut(),
                len,
                ProtFlags::READ | ProtFlags::WRITE,
                MapFlags::SHARED,
                &fd,
                0,
            )
        }
        .map_err(sys("mmap"))?;
        let ptr = NonNull::new(p.cast::<u8>()).ok_or(ShmError::Refused("null mapping"))?;
        Ok(Region {
            fd,
            ptr,
            len,
            capacity,
        })
    }

    /// Record bytes of each ring.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// The descriptor to pass to the peer.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// The ends this side uses: the creator (`creator`) writes ring 0 and
    /// reads ring 1, the other side the reverse. Call once per side: each
    /// ring has one producer and one consumer.
    ///
    /// The ends point into the mapping; they must not outlive `self`.
    pub fn ends(&self, creator: bool) -> Result<(Producer, Consumer), ShmError> {
        let ring_len = RING_HEADER + self.capacity;
        let (out, inn) = if creator {
            (0, ring_len)
        } else {
            (ring_len, 0)
        };
        // SAFETY: both rings lie inside the mapping (`len` is two rings),
        // which is page-aligned, stays mapped while `self` lives (the
        // caller keeps the ends within that), and is touched in this
        // process only through the rings' atomics.
        unsafe {
            let base = self.ptr.as_ptr();
            Ok((
                Producer::new(base.add(out), ring_len)?,
                Consumer::new(base.add(inn), ring_len)?,
            ))
        }
    }
}

impl Drop for Region {
    fn drop(&mut self) {
        // SAFETY: the mapping was made by `map` with this pointer and
        // length and is unmapped once, here.
        let _ = unsafe { rustix::mm::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn two_mappings_of_one_memfd_carry_records_both_ways() {
        let a = Region::create(8192).unwrap();
        // What the peer does with the descriptor it received.
        let fd = a.fd().try_clone_to_owned().unwrap();
        let b = Region::open(fd, 8192).unwrap();
        let (mut a_tx, mut a_rx) = a.ends(true).unwrap();
        let (mut b_tx, mut b_rx) = b.ends(false).unwrap();
        let mut out = Vec::new();
        for i in 0..10_000u32 {
            assert!(a_tx.push(&i.to_le_bytes()).unwrap());
            assert!(b_rx.pop(&mut out).unwrap());
            assert_eq!(out, i.to_le_bytes());
            assert!(b_tx.push(&out).unwrap());
            assert!(a_rx.pop(&mut out).unwrap());
            assert_eq!(out, i.to_le_bytes());
        }
        assert!(!a_rx.pop(&mut out).unwrap());
    }

    #[test]
    fn unsealed_or_wrongly_sized_memfds_are_refused() {
        let fd =
            rustix::fs::memfd_create("x", MemfdFlags::CLOEXEC | MemfdFlags::ALLOW_SEALING).unwrap();
        rustix::fs::ftruncate(&fd, Region::size(4096) as u64).unwrap();
        let dup = fd.try_clone().unwrap();
        assert!(matches!(
            Region::open(dup, 4096),
            Err(ShmError::Refused("memfd not sealed against resizing"))
        ));
        rustix::fs::fcntl_add_seals(&fd, SEALS).unwrap();
        assert!(matches!(
            Region::open(fd.try_clone().unwrap(), 8192),
            Err(ShmError::Refused("memfd of the wrong size"))
        ));
        assert!(Region::open(fd, 4096).is_ok());
        // A sealed region cannot be shrunk by the peer.
        let r = Region::create(4096).unwrap();
        assert!(rustix::fs::ftruncate(r.fd(), 64).is_err());
    }
}
