//! Passing the lane's memfd (and later, user descriptors) between ipcm
//! peers over their UNIX socket with `SCM_RIGHTS`.
//!
//! A descriptor travels with at least one byte of ordinary data (the
//! kernel attaches ancillary data to bytes). The receiver takes at most
//! the descriptors it expects: any more the peer sent are closed at once,
//! and a truncated control message (`MSG_CTRUNC`: more descriptors than
//! room, which the kernel has then closed) is an error. Received
//! descriptors are close-on-exec (`MSG_CMSG_CLOEXEC`).

use std::io::{IoSlice, IoSliceMut};
use std::mem::MaybeUninit;
use std::os::fd::{BorrowedFd, OwnedFd};

use rustix::net::{
    RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, ReturnFlags, SendAncillaryBuffer,
    SendAncillaryMessage, SendFlags,
};

/// Why a descriptor could not be passed.
#[derive(Debug, thiserror::Error)]
pub enum PassError {
    /// The system call failed.
    #[error("{what}: {err}")]
    Sys {
        /// The call.
        what: &'static str,
        /// The kernel's answer.
        err: rustix::io::Errno,
    },
    /// What arrived is not what the protocol allows.
    #[error("descriptor passing: {0}")]
    Protocol(&'static str),
}

/// The most descriptors one message carries (a lane's memfd, a large
/// payload's, or those a user attaches to a message).
pub const MAX_FDS: usize = 16;

/// Sends `data` (not empty) with `fd` attached; returns the bytes sent
/// (the descriptor went with the first of them).
#[cfg_attr(not(test), allow(dead_code))]
pub fn send_with_fd(
    sock: BorrowedFd<'_>,
    data: &[u8],
    fd: BorrowedFd<'_>,
) -> Result<usize, PassError> {
    send_with_fds(sock, data, &[fd])
}

/// Sends `data` (not empty) with `fds` (1 to [`MAX_FDS`]) attached.
pub fn send_with_fds(
    sock: BorrowedFd<'_>,
    data: &[u8],
    fds: &[BorrowedFd<'_>],
) -> Result<usize, PassError> {
    if data.is_empty() {
        return Err(PassError::Protocol(
            "a descriptor needs a byte to travel with",
        ));
    }
    if fds.is_empty() || fds.len() > MAX_FDS {
        return Err(PassError::Protocol("1 to 16 descriptors per message"));
    }
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(MAX_FDS))];
    let mut control = SendAncillaryBuffer::new(&mut space);
    if !control.push(SendAncillaryMessage::ScmRights(fds)) {
        return Err(PassError::Protocol("no room for the descriptors"));
    }
    rustix::net::sendmsg(
        sock,
        &[IoSlice::new(data)],
        &mut control,
        SendFlags::NOSIGNAL,
    )
    .map_err(|err| PassError::Sys {
        what: "sendmsg",
        err,
    })
}

/// Receives into `buf`, taking at most one descriptor: returns the byte
/// count and the descriptor, if one came. Extra descriptors are closed.
#[cfg_attr(not(test), allow(dead_code))]
pub fn recv_with_fd(
    sock: BorrowedFd<'_>,
    buf: &mut [u8],
) -> Result<(usize, Option<OwnedFd>), PassError> {
    let (n, fds) = recv_with_fds(sock, buf)?;
    // The first is kept; the rest drop (close) here.
    Ok((n, fds.into_iter().next()))
}

/// Receives into `buf` with up to [`MAX_FDS`] descriptors; more is an
/// error (the kernel closed those it had no room for).
pub fn recv_with_fds(
    sock: BorrowedFd<'_>,
    buf: &mut [u8],
) -> Result<(usize, Vec<OwnedFd>), PassError> {
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(MAX_FDS))];
    let mut control = RecvAncillaryBuffer::new(&mut space);
    let r = rustix::net::recvmsg(
        sock,
        &mut [IoSliceMut::new(buf)],
        &mut control,
        RecvFlags::CMSG_CLOEXEC,
    )
    .map_err(|err| PassError::Sys {
        what: "recvmsg",
        err,
    })?;
    let mut got = Vec::new();
    for msg in control.drain() {
        if let RecvAncillaryMessage::ScmRights(fds) = msg {
            got.extend(fds);
        }
    }
    if r.flags.contains(ReturnFlags::CTRUNC) {
        return Err(PassError::Protocol(
            "control message truncated (too many descriptors)",
        ));
    }
    Ok((r.bytes, got))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;
    use std::os::unix::net::UnixStream;

    #[test]
    fn a_memfd_crosses_and_maps_the_same_memory() {
        let (a, b) = UnixStream::pair().unwrap();
        let region = super::super::shm::Region::create(4096).unwrap();
        assert_eq!(send_with_fd(a.as_fd(), b"L", region.fd()).unwrap(), 1);
        let mut buf = [0u8; 8];
        let (n, fd) = recv_with_fd(b.as_fd(), &mut buf).unwrap();
        assert_eq!(&buf[..n], b"L");
        let other = super::super::shm::Region::open(fd.expect("a descriptor"), 4096).unwrap();
        let (mut tx, _) = region.ends(true).unwrap();
        let (_, mut rx) = other.ends(false).unwrap();
        tx.push(b"through the passed memfd").unwrap();
        let mut out = Vec::new();
        assert!(rx.pop(&mut out).unwrap());
        assert_eq!(out, b"through the passed memfd");
    }

    #[test]
    fn plain_bytes_carry_no_descriptor_and_extras_are_closed() {
        let (a, b) = UnixStream::pair().unwrap();
        use std::io::Write;
        (&a).write_all(b"xy").unwrap();
        let mut buf = [0u8; 8];
        let (n, fd) = recv_with_fd(b.as_fd(), &mut buf).unwrap();
        assert_eq!((n, fd.is_none()), (2, true));
        // A peer sending three descriptors: one is kept, two are closed.
        let (p1, _q1) = UnixStream::pair().unwrap();
        let (p2, _q2) = UnixStream::pair().unwrap();
        let (p3, _q3) = UnixStream::pair().unwrap();
        let fds = [p1.as_fd(), p2.as_fd(), p3.as_fd()];
        let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(3))];
        let mut control = SendAncillaryBuffer::new(&mut space);
        assert!(control.push(SendAncillaryMessage::ScmRights(&fds)));
        rustix::net::sendmsg(&a, &[IoSlice::new(b"z")], &mut control, SendFlags::empty()).unwrap();
        let (_, kept) = recv_with_fd(b.as_fd(), &mut buf).unwrap();
        // The first one is kept (the same socket as p1).
        let ino = |fd: BorrowedFd<'_>| rustix::fs::fstat(fd).unwrap().st_ino;
        assert_eq!(ino(kept.unwrap().as_fd()), ino(p1.as_fd()));
        assert!(send_with_fd(a.as_fd(), b"", p1.as_fd()).is_err());
    }
}
