//! The shared-memory lane between ipcm peers: its memory and rings, the
//! beacon that finds ipcm peers and carries the memfd, and the control
//! frames (docs/lane.md).
//!
//! * [`ring`]: a ring of records in memory a hostile peer may write;
//! * [`shm`]: the sealed memfd holding one ring per direction;
//! * [`beacon`]: how an initiator learns that its acceptor is ipcm, and
//!   passes it the memfd, without a Perl peer seeing anything;
//! * [`control`]: the control frames of the switch and the wake-ups;
//! * [`pass`]: descriptor passing with `SCM_RIGHTS`;
//! * [`blob`]: large payloads as sealed memfds, received without a copy.
//!
//! The core (`proto/lane.rs`) moves frames through the rings; the reactor
//! does the system calls of the beacon.

pub(crate) mod beacon;
pub(crate) mod blob;
pub(crate) mod control;
pub(crate) mod pass;
pub(crate) mod ring;
pub(crate) mod shm;

use std::os::fd::BorrowedFd;

/// The environment variable that turns the lane off (`0`, `off`, `false`,
/// `no`) for every client of the process, whatever its options say.
pub const LANE_ENV: &str = "IPCM_LANE";

/// Whether the environment turns the lane off.
pub fn disabled_by_env() -> bool {
    std::env::var(LANE_ENV).is_ok_and(|v| {
        matches!(
            v.trim().to_ascii_lowercase().as_str(),
            "0" | "off" | "false" | "no"
        )
    })
}

/// Logs why a lane could not be had: a warning the first time in this
/// process, then at debug level (the connection stays on the socket).
pub fn log_unavailable(why: &dyn std::fmt::Display) {
    static ONCE: std::sync::Once = std::sync::Once::new();
    let mut first = false;
    ONCE.call_once(|| first = true);
    if first {
        log::warn!(
            "ConnectionUnix: shared-memory lane unavailable ({why}); connections stay on the socket"
        );
    } else {
        log::debug!("ConnectionUnix: shared-memory lane unavailable ({why})");
    }
}

/// The initiator's side: a region with rings of `capacity` bytes, its
/// memfd passed to the beacon of the process at the other end of `main`,
/// and the nonce for the `OFFER`. `Ok(None)`: the peer offers no lane (a
/// Perl peer, or one with the lane off).
pub fn offer(
    main: BorrowedFd<'_>,
    capacity: usize,
) -> Result<Option<(shm::Region, [u8; 16])>, String> {
    let side = match beacon::probe(main) {
        Ok(s) => s,
        Err(beacon::BeaconError::NotOffered) => return Ok(None),
        Err(e) => return Err(e.to_string()),
    };
    let region = shm::Region::create(capacity).map_err(|e| e.to_string())?;
    let nonce = *uuid::Uuid::new_v4().as_bytes();
    side.pass(region.fd(), &nonce).map_err(|e| e.to_string())?;
    Ok(Some((region, nonce)))
}

/// The acceptor's side: maps the region the process at the other end of
/// `main` passed with `nonce`.
pub fn accept(
    main: BorrowedFd<'_>,
    nonce: &[u8; 16],
    capacity: usize,
) -> Result<shm::Region, String> {
    let fd = beacon::take(main, nonce)?;
    shm::Region::open(fd, capacity).map_err(|e| e.to_string())
}

/// A large payload's sender: `payload` in a sealed memfd passed to the
/// beacon of process `peer` (pid, uid), and the `BLOB` frame that stands
/// for it in the ring. `Ok(None)`: that process has no beacon (the payload
/// goes through the ring).
pub fn send_blob(peer: (i32, u32), payload: &[u8]) -> Result<Option<bytes::Bytes>, String> {
    let side = match beacon::probe_pid(peer.0, peer.1) {
        Ok(s) => s,
        Err(beacon::BeaconError::NotOffered) => return Ok(None),
        Err(e) => return Err(e.to_string()),
    };
    let fd = blob::seal(payload).map_err(|e| e.to_string())?;
    let nonce = *uuid::Uuid::new_v4().as_bytes();
    side.pass(std::os::fd::AsFd::as_fd(&fd), &nonce)
        .map_err(|e| e.to_string())?;
    Ok(Some(
        control::Control::Blob {
            nonce,
            len: payload.len() as u64,
        }
        .frame(),
    ))
}

/// A large payload's receiver: the sealed memfd process `peer` passed with
/// `nonce`, mapped read-only (`len` bytes).
pub fn take_blob(peer: (i32, u32), nonce: &[u8; 16], len: usize) -> Result<bytes::Bytes, String> {
    let fd = beacon::take_from(peer.0, peer.1, nonce)?;
    blob::open(fd, len).map_err(|e| e.to_string())
}

/// User descriptors for a message to process `peer` (pid, uid): passed to
/// its beacon, and the `FDS` frame to queue right before the message.
pub fn send_fds(
    peer: (i32, u32),
    fds: &[std::os::fd::BorrowedFd<'_>],
) -> Result<bytes::Bytes, String> {
    let side = beacon::probe_pid(peer.0, peer.1).map_err(|e| e.to_string())?;
    let nonce = *uuid::Uuid::new_v4().as_bytes();
    side.pass_fds(fds, &nonce).map_err(|e| e.to_string())?;
    Ok(control::Control::Fds {
        nonce,
        count: fds.len() as u8,
    }
    .frame())
}
