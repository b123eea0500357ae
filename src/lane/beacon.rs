//! The beacon: how an ipcm initiator learns that its acceptor is ipcm too,
//! without a Perl peer seeing anything, and how the lane's memfd crosses
//! to it.
//!
//! Every process with a listening ipcm client and the lane enabled binds
//! one UNIX socket in the abstract namespace, `ipcm-lane/<pid>` (no file
//! on disk, nothing in the route). An initiator that wants a lane reads
//! the pid of its connection's acceptor (`SO_PEERCRED`) and connects to
//! that name:
//!
//! * nothing listens there: the acceptor is a Perl client (or an ipcm one
//!   with the lane off), and the connection stays on the socket. The Perl
//!   peer saw nothing: not a byte, not a frame, not a file.
//! * something listens: it must be the acceptor's own process
//!   (`SO_PEERCRED` of the beacon connection names the same pid and uid),
//!   else the beacon is a squatter and is ignored. The initiator sends the
//!   memfd with `SCM_RIGHTS` and a random nonce over the beacon
//!   connection, closes it, and only then sends `OFFER` with the nonce on
//!   its main connection.
//!
//! The acceptor accepts beacon connections only when an `OFFER` arrives:
//! by then the one it names is in the backlog with its data (both were
//! sent before the `OFFER`), so the accept and receive never wait. It
//! keeps what else it accepted (bounded in number and age) for other
//! offers, and takes the descriptor only if the beacon connection came
//! from the same process as the main connection.
//!
//! Passing the descriptor beside the main socket, not on it, keeps it out
//! of both backends' receive paths: those read with plain `recv`, which
//! would drop a descriptor.

use std::io::Write as _;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use rustix::io::Errno;
use rustix::net::{AddressFamily, SocketAddrUnix, SocketFlags, SocketType};

use super::pass;

/// What a beacon connection carries besides the descriptor.
const HELLO: &[u8; 8] = b"IPCMLANE";
/// Bytes of a beacon message: magic, version, nonce.
const MESSAGE_LEN: usize = 8 + 1 + 16;
/// Passed descriptors kept for offers not yet arrived (beyond it the
/// oldest is closed: a local process flooding the beacon holds no more).
const MAX_PENDING: usize = 256;
/// How long a passed descriptor waits for its offer.
const PENDING_FOR: Duration = Duration::from_secs(10);
/// Beacon connections accepted per offer at most (accepting stops as soon
/// as the offer's own descriptor has arrived).
const ACCEPTS_PER_TAKE: usize = 1024;
/// The beacon's listen backlog: initiators that all pass at once (a
/// hundred clients starting together) find room.
const BACKLOG: i32 = 1024;

struct Pending {
    nonce: [u8; 16],
    pid: i32,
    uid: u32,
    fd: OwnedFd,
    at: Instant,
}

struct Beacon {
    /// The process it was bound for (a forked child binds its own).
    pid: u32,
    listener: OwnedFd,
    pending: Vec<Pending>,
}

static BEACON: Mutex<Option<Beacon>> = Mutex::new(None);

fn name(pid: i32) -> Result<SocketAddrUnix, Errno> {
    SocketAddrUnix::new_abstract_name(format!("ipcm-lane/{pid}").as_bytes())
}

fn socket() -> Result<OwnedFd, Errno> {
    rustix::net::socket_with(
        AddressFamily::UNIX,
        SocketType::STREAM,
        SocketFlags::NONBLOCK | SocketFlags::CLOEXEC,
        None,
    )
}

/// Binds this process's beacon, unless it is bound already.
pub fn listen() -> Result<(), Errno> {
    let mut g = BEACON.lock().unwrap_or_else(|p| p.into_inner());
    let pid = std::process::id();
    if g.as_ref().is_some_and(|b| b.pid == pid) {
        return Ok(());
    }
    // A forked child's copy of its parent's beacon is closed here; the
    // parent's stays open.
    *g = None;
    let fd = socket()?;
    rustix::net::bind(&fd, &name(pid as i32)?)?;
    rustix::net::listen(&fd, BACKLOG)?;
    *g = Some(Beacon {
        pid,
        listener: fd,
        pending: Vec::new(),
    });
    Ok(())
}

/// Why a descriptor could not be passed.
#[derive(Debug, thiserror::Error)]
pub enum BeaconError {
    /// The peer's process has no beacon: not ipcm, or its lane is off.
    #[error("the peer offers no shared-memory lane")]
    NotOffered,
    /// Something went wrong that should not have.
    #[error("{0}")]
    Failed(String),
}

/// A connection to the beacon of the process at the other end of a main
/// connection, checked to be that process's own.
pub struct Side(OwnedFd);

/// The initiator's first half: connects to the beacon of the process at
/// the other end of `main`.
pub fn probe(main: BorrowedFd<'_>) -> Result<Side, BeaconError> {
    let failed = |what: &str, e: Errno| BeaconError::Failed(format!("{what}: {e}"));
    let peer = rustix::net::sockopt::socket_peercred(main).map_err(|e| failed("SO_PEERCRED", e))?;
    let pid = peer.pid.as_raw_nonzero().get();
    let side = socket().map_err(|e| failed("socket", e))?;
    match rustix::net::connect(&side, &name(pid).map_err(|e| failed("beacon name", e))?) {
        Ok(()) => {}
        Err(Errno::CONNREFUSED | Errno::NOENT) => return Err(BeaconError::NotOffered),
        // A full backlog: no lane this time.
        Err(Errno::AGAIN) => return Err(BeaconError::NotOffered),
        Err(e) => return Err(failed("connect to the beacon", e)),
    }
    let at = rustix::net::sockopt::socket_peercred(&side).map_err(|e| failed("SO_PEERCRED", e))?;
    if at.pid != peer.pid || at.uid != peer.uid {
        log::warn!(
            "ConnectionUnix: the lane beacon of pid {pid} is held by pid {} (uid {}): ignored",
            at.pid.as_raw_nonzero(),
            at.uid.as_raw()
        );
        return Err(BeaconError::NotOffered);
    }
    Ok(Side(side))
}

impl Side {
    /// The initiator's second half: passes `memfd` tagged `nonce`, then
    /// closes the beacon connection.
    pub fn pass(self, memfd: BorrowedFd<'_>, nonce: &[u8; 16]) -> Result<(), BeaconError> {
        let mut msg = [0u8; MESSAGE_LEN];
        let mut w = &mut msg[..];
        let _ = w.write_all(HELLO);
        let _ = w.write_all(&[super::control::VERSION]);
        let _ = w.write_all(nonce);
        match pass::send_with_fd(self.0.as_fd(), &msg, memfd) {
            Ok(n) if n == MESSAGE_LEN => Ok(()),
            Ok(_) => Err(BeaconError::Failed("beacon message cut short".into())),
            Err(e) => Err(BeaconError::Failed(e.to_string())),
        }
    }
}

/// The acceptor's half: the descriptor tagged `nonce` that the process at
/// the other end of `main` passed to this process's beacon.
pub fn take(main: BorrowedFd<'_>, nonce: &[u8; 16]) -> Result<OwnedFd, String> {
    let peer =
        rustix::net::sockopt::socket_peercred(main).map_err(|e| format!("SO_PEERCRED: {e}"))?;
    let mut g = BEACON.lock().unwrap_or_else(|p| p.into_inner());
    let b = g
        .as_mut()
        .filter(|b| b.pid == std::process::id())
        .ok_or("this process has no lane beacon")?;
    let now = Instant::now();
    b.pending.retain(|p| now.duration_since(p.at) < PENDING_FOR);
    for _ in 0..ACCEPTS_PER_TAKE {
        if b.pending.iter().any(|p| &p.nonce == nonce) {
            // The rest stay in the backlog for their own offers.
            break;
        }
        let side = match rustix::net::accept_with(
            &b.listener,
            SocketFlags::NONBLOCK | SocketFlags::CLOEXEC,
        ) {
            Ok(fd) => fd,
            Err(Errno::INTR) => continue,
            Err(_) => break,
        };
        let Ok(cred) = rustix::net::sockopt::socket_peercred(&side) else {
            continue;
        };
        let mut msg = [0u8; MESSAGE_LEN + 1];
        let (n, fd) = match pass::recv_with_fd(side.as_fd(), &mut msg) {
            Ok((n, Some(fd))) => (n, fd),
            Ok(_) => continue,
            Err(e) => {
                log::debug!("ConnectionUnix: lane beacon: {e}");
                continue;
            }
        };
        if n != MESSAGE_LEN || &msg[..8] != HELLO || msg[8] != super::control::VERSION {
            log::debug!("ConnectionUnix: lane beacon: a message of {n} bytes that is not a lane's");
            continue;
        }
        if b.pending.len() >= MAX_PENDING {
            b.pending.remove(0);
        }
        b.pending.push(Pending {
            nonce: msg[9..25].try_into().expect("16 bytes"),
            pid: cred.pid.as_raw_nonzero().get(),
            uid: cred.uid.as_raw(),
            fd,
            at: now,
        });
    }
    let pid = peer.pid.as_raw_nonzero().get();
    let Some(i) = b.pending.iter().position(|p| &p.nonce == nonce) else {
        return Err("no descriptor arrived with the offer's nonce".into());
    };
    let p = b.pending.swap_remove(i);
    if p.pid != pid || p.uid != peer.uid.as_raw() {
        return Err(format!(
            "the offer's descriptor came from pid {} (uid {}), not from the peer's pid {pid}",
            p.pid, p.uid
        ));
    }
    Ok(p.fd)
}
