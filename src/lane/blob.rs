//! Large payloads between ipcm peers on a lane: each travels as a memfd of
//! its own, sealed against every change, and is received without a copy.
//!
//! The sender writes the payload into a fresh memfd (`ipcm-blob`), seals it
//! with `F_SEAL_WRITE | F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL`, passes
//! it to the receiver's beacon with a nonce, and puts a `BLOB` control frame
//! (nonce, length) in its ring where the frame would have gone. The
//! receiver takes the descriptor, checks the seals and the size, and maps
//! it read-only: the frame is a [`Bytes`] over that mapping, so the
//! message's content is a slice of it.
//!
//! Lending the bytes is sound here, where it is not for the rings: with
//! `F_SEAL_WRITE` no one can write the file any more (`write` fails, a
//! shared writable mapping cannot be made, and none existed when the seal
//! was added), and with `F_SEAL_SHRINK` no page of it can go away (no
//! `SIGBUS`). A private writable mapping the sender might make changes only
//! its own copy. The bytes behind the reference never change.

use std::os::fd::{AsFd, OwnedFd};
use std::ptr::NonNull;

use bytes::Bytes;
use rustix::fs::{MemfdFlags, SealFlags};
use rustix::mm::{MapFlags, ProtFlags};

use super::shm::ShmError;

/// The seals a payload's memfd must carry.
const SEALS: SealFlags = SealFlags::WRITE
    .union(SealFlags::SHRINK)
    .union(SealFlags::GROW)
    .union(SealFlags::SEAL);

fn sys(what: &'static str) -> impl FnOnce(rustix::io::Errno) -> ShmError {
    move |err| ShmError::Sys { what, err }
}

/// A new memfd holding `payload`, sealed against every change.
pub fn seal(payload: &[u8]) -> Result<OwnedFd, ShmError> {
    let fd = rustix::fs::memfd_create("ipcm-blob", MemfdFlags::CLOEXEC | MemfdFlags::ALLOW_SEALING)
        .map_err(sys("memfd_create"))?;
    rustix::fs::ftruncate(&fd, payload.len() as u64).map_err(sys("ftruncate"))?;
    let mut at = 0;
    while at < payload.len() {
        match rustix::io::pwrite(&fd, &payload[at..], at as u64) {
            Ok(0) => return Err(ShmError::Refused("memfd took no bytes")),
            Ok(n) => at += n,
            Err(rustix::io::Errno::INTR) => {}
            Err(e) => {
                return Err(ShmError::Sys {
                    what: "write",
                    err: e,
                });
            }
        }
    }
    rustix::fs::fcntl_add_seals(&fd, SEALS).map_err(sys("F_ADD_SEALS"))?;
    Ok(fd)
}

/// A read-only mapping of a sealed memfd, unmapped when dropped.
struct Mapping {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: the mapped bytes never change (see the module comment) and the
// mapping is owned by this value alone: sharing and sending it is sharing
// and sending an immutable byte slice.
unsafe impl Send for Mapping {}
// SAFETY: as above.
unsafe impl Sync for Mapping {}

impl AsRef<[u8]> for Mapping {
    fn as_ref(&self) -> &[u8] {
        // SAFETY: `len` bytes mapped read-only at `ptr` for as long as
        // `self` lives, of a file sealed against writes and shrinking
        // (checked in `open`): initialised, never written, never unmapped
        // before `self` is dropped.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `open`, unmapped once, here; no
        // slice of it outlives `self` (`Bytes` keeps its owner alive).
        let _ = unsafe { rustix::mm::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

/// Maps a payload memfd from the peer, if it carries every seal and is
/// `len` bytes long; the descriptor is closed (the mapping stays).
pub fn open(fd: OwnedFd, len: usize) -> Result<Bytes, ShmError> {
    let seals = rustix::fs::fcntl_get_seals(&fd).map_err(sys("F_GET_SEALS"))?;
    if !seals.contains(SealFlags::WRITE | SealFlags::SHRINK | SealFlags::GROW) {
        return Err(ShmError::Refused(
            "payload memfd not sealed against changes",
        ));
    }
    let st = rustix::fs::fstat(&fd).map_err(sys("fstat"))?;
    if st.st_size != len as i64 {
        return Err(ShmError::Refused("payload memfd of the wrong size"));
    }
    if len == 0 {
        return Ok(Bytes::new());
    }
    // SAFETY: a fresh read-only shared mapping of a file that is exactly
    // `len` bytes and can neither shrink nor be written (checked above).
    let p = unsafe {
        rustix::mm::mmap(
            std::ptr::null_mut(),
            len,
            ProtFlags::READ,
            MapFlags::SHARED,
            fd.as_fd(),
            0,
        )
    }
    .map_err(sys("mmap"))?;
    let ptr = NonNull::new(p.cast::<u8>()).ok_or(ShmError::Refused("null mapping"))?;
    Ok(Bytes::from_owner(Mapping { ptr, len }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sealed_payload_maps_whole_and_an_unsealed_or_resized_one_is_refused() {
        let payload: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
        let fd = seal(&payload).unwrap();
        assert!(
            rustix::io::write(&fd, b"x").is_err(),
            "sealed against writes"
        );
        let dup = fd.try_clone().unwrap();
        assert!(matches!(
            open(dup, payload.len() + 1),
            Err(ShmError::Refused("payload memfd of the wrong size"))
        ));
        let got = open(fd, payload.len()).unwrap();
        assert_eq!(&got[..], &payload[..]);
        let plain =
            rustix::fs::memfd_create("x", MemfdFlags::CLOEXEC | MemfdFlags::ALLOW_SEALING).unwrap();
        rustix::fs::ftruncate(&plain, 16).unwrap();
        rustix::fs::fcntl_add_seals(&plain, SealFlags::SHRINK | SealFlags::GROW).unwrap();
        assert!(matches!(
            open(plain, 16),
            Err(ShmError::Refused(
                "payload memfd not sealed against changes"
            ))
        ));
    }
}
