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
    fds: Vec<OwnedFd>,
    at: Instant,
}

struct Beacon {
    /// The process it was bound for (a forked child binds its own).
    pid: u32,
    listener: OwnedFd,
    pending: Vec<Pending>,
    /// Connections accepted before their sender had written (a sender
    /// connects, then passes: another offer's accepts can come between);
    /// read again at the next take, at most `MAX_PENDING` for
    /// `PENDING_FOR`.
    unread: Vec<(OwnedFd, Instant)>,
}

/// What reading one accepted beacon connection gave.
enum Read {
    /// A descriptor and its nonce.
    Got(Pending),
    /// Nothing yet: read it again later.
    NotYet,
    /// Nothing usable: it is closed.
    Drop,
}

/// Reads the lane message of an accepted beacon connection.
fn read_side(side: &OwnedFd, now: Instant) -> Read {
    let Ok(cred) = rustix::net::sockopt::socket_peercred(side) else {
        return Read::Drop;
    };
    let mut msg = [0u8; MESSAGE_LEN + 1];
    let (n, fds) = match pass::recv_with_fds(side.as_fd(), &mut msg) {
        Ok((n, fds)) if !fds.is_empty() => (n, fds),
        Ok(_) => return Read::Drop,
        Err(pass::PassError::Sys {
            err: Errno::AGAIN | Errno::INTR,
            ..
        }) => return Read::NotYet,
        Err(e) => {
            log::debug!("ConnectionUnix: lane beacon: {e}");
            return Read::Drop;
        }
    };
    if n != MESSAGE_LEN || &msg[..8] != HELLO || msg[8] != super::control::VERSION {
        log::debug!("ConnectionUnix: lane beacon: a message of {n} bytes that is not a lane's");
        return Read::Drop;
    }
    Read::Got(Pending {
        nonce: msg[9..25].try_into().expect("16 bytes"),
        pid: cred.pid.as_raw_nonzero().get(),
        uid: cred.uid.as_raw(),
        fds,
        at: now,
    })
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
        unread: Vec::new(),
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
    probe_pid(peer.pid.as_raw_nonzero().get(), peer.uid.as_raw())
}

/// The process and user at the other end of `main` (`SO_PEERCRED`).
pub fn peer_of(main: BorrowedFd<'_>) -> Option<(i32, u32)> {
    let c = rustix::net::sockopt::socket_peercred(main).ok()?;
    Some((c.pid.as_raw_nonzero().get(), c.uid.as_raw()))
}

/// [`probe`] for the process `pid` of user `uid` (known from the main
/// connection).
pub fn probe_pid(pid: i32, uid: u32) -> Result<Side, BeaconError> {
    let failed = |what: &str, e: Errno| BeaconError::Failed(format!("{what}: {e}"));
    let side = socket().map_err(|e| failed("socket", e))?;
    match rustix::net::connect(&side, &name(pid).map_err(|e| failed("beacon name", e))?) {
        Ok(()) => {}
        Err(Errno::CONNREFUSED | Errno::NOENT) => return Err(BeaconError::NotOffered),
        // A full backlog: no lane this time.
        Err(Errno::AGAIN) => return Err(BeaconError::NotOffered),
        Err(e) => return Err(failed("connect to the beacon", e)),
    }
    let at = rustix::net::sockopt::socket_peercred(&side).map_err(|e| failed("SO_PEERCRED", e))?;
    if at.pid.as_raw_nonzero().get() != pid || at.uid.as_raw() != uid {
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
        self.pass_fds(&[memfd], nonce)
    }

    /// Passes `fds` (1 to [`pass::MAX_FDS`]) tagged `nonce`, then closes
    /// the beacon connection.
    pub fn pass_fds(self, fds: &[BorrowedFd<'_>], nonce: &[u8; 16]) -> Result<(), BeaconError> {
        let mut msg = [0u8; MESSAGE_LEN];
        let mut w = &mut msg[..];
        let _ = w.write_all(HELLO);
        let _ = w.write_all(&[super::control::VERSION]);
        let _ = w.write_all(nonce);
        match pass::send_with_fds(self.0.as_fd(), &msg, fds) {
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
    take_from(peer.pid.as_raw_nonzero().get(), peer.uid.as_raw(), nonce)
}

/// [`take`] for the process `pid` of user `uid` (known from the main
/// connection).
pub fn take_from(pid: i32, uid: u32, nonce: &[u8; 16]) -> Result<OwnedFd, String> {
    let mut fds = take_fds_from(pid, uid, nonce)?;
    if fds.len() != 1 {
        return Err(format!("{} descriptors came where one was due", fds.len()));
    }
    Ok(fds.remove(0))
}

/// The descriptors the process `pid` of user `uid` passed tagged `nonce`.
pub fn take_fds_from(pid: i32, uid: u32, nonce: &[u8; 16]) -> Result<Vec<OwnedFd>, String> {
    let mut g = BEACON.lock().unwrap_or_else(|p| p.into_inner());
    let b = g
        .as_mut()
        .filter(|b| b.pid == std::process::id())
        .ok_or("this process has no lane beacon")?;
    let now = Instant::now();
    b.pending.retain(|p| now.duration_since(p.at) < PENDING_FOR);
    b.unread
        .retain(|(_, at)| now.duration_since(*at) < PENDING_FOR);
    let Beacon {
        listener,
        pending,
        unread,
        ..
    } = b;
    let keep = |p: Pending, pending: &mut Vec<Pending>| {
        if pending.len() >= MAX_PENDING {
            pending.remove(0);
        }
        pending.push(p);
    };
    // Those accepted before their sender wrote have written by now.
    let mut i = 0;
    while i < unread.len() {
        match read_side(&unread[i].0, now) {
            Read::Got(p) => {
                unread.swap_remove(i);
                keep(p, pending);
            }
            Read::NotYet => i += 1,
            Read::Drop => {
                unread.swap_remove(i);
            }
        }
    }
    for _ in 0..ACCEPTS_PER_TAKE {
        if pending.iter().any(|p| &p.nonce == nonce) {
            // The rest stay in the backlog for their own offers.
            break;
        }
        let side = match rustix::net::accept_with(
            &*listener,
            SocketFlags::NONBLOCK | SocketFlags::CLOEXEC,
        ) {
            Ok(fd) => fd,
            Err(Errno::INTR) => continue,
            Err(_) => break,
        };
        match read_side(&side, now) {
            Read::Got(p) => keep(p, pending),
            Read::NotYet => {
                if unread.len() >= MAX_PENDING {
                    unread.remove(0);
                }
                unread.push((side, now));
            }
            Read::Drop => {}
        }
    }
    let Some(i) = pending.iter().position(|p| &p.nonce == nonce) else {
        return Err("no descriptor arrived with the offer's nonce".into());
    };
    let p = pending.swap_remove(i);
    if p.pid != pid || p.uid != uid {
        return Err(format!(
            "the offer's descriptor came from pid {} (uid {}), not from the peer's pid {pid}",
            p.pid, p.uid
        ));
    }
    Ok(p.fds)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A sender connects, then passes; another take that accepts its
    /// connection in between (before it wrote) must keep it, not close it
    /// (the sender's `sendmsg` then failed with `EPIPE` and its lane or
    /// large payload went without a memfd).
    #[test]
    fn a_connection_accepted_before_its_sender_wrote_is_read_later() {
        listen().unwrap();
        let me = std::process::id() as i32;
        let uid = rustix::process::getuid().as_raw();
        let side = probe_pid(me, uid).unwrap();
        // Another take, for a nonce that never comes, accepts it first.
        assert!(take_from(me, uid, &[1; 16]).is_err());
        let memfd = rustix::fs::memfd_create("t", rustix::fs::MemfdFlags::CLOEXEC).unwrap();
        side.pass(memfd.as_fd(), &[2; 16]).unwrap();
        let got = take_from(me, uid, &[2; 16]).unwrap();
        let a = rustix::fs::fstat(&memfd).unwrap();
        let b = rustix::fs::fstat(&got).unwrap();
        assert_eq!((a.st_dev, a.st_ino), (b.st_dev, b.st_ino), "the same file");
    }
}
