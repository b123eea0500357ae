//! Peer events: who joins and who leaves a route, without polling.
//!
//! * The route directory is watched with inotify (entries created, moved
//!   in, removed, moved out, written; the directory itself removed).
//! * Every live peer that wrote a `.pid` file is also watched through a
//!   pidfd: a SIGKILLed peer leaves its files behind, which inotify alone
//!   never reports; its pidfd becomes readable the moment it dies, and its
//!   stale files are then reaped as [`Route::peer_left`] does.
//! * Both wait in one epoll instance ([`PeerWatch`] is `AsFd`), so a
//!   storm of changes is one wake-up and one rescan of the directory, not
//!   one per file: the inotify queue is drained whole before the rescan.
//! * Where inotify is unavailable (no support, or its watch limit is
//!   exhausted) the watch rescans the route every 50 ms instead, says so
//!   once in the log, and reports [`WatchMode::Rescan`]. The environment
//!   variable `IPCM_PEER_WATCH=rescan` forces that mode.
//!
//! Events are computed by comparing rescans, so they describe what
//! [`Route::peers`] reports: a peer joins when its entry appears with a
//! live (or no) pid, and leaves when its entry goes or its process dies.

use std::collections::{HashMap, VecDeque};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::Once;
use std::time::{Duration, Instant};

use rustix::event::epoll;
use rustix::fs::inotify;

use super::{LiveEntry, Route};
use crate::error::{Error, Result};

/// A change in a route's peers.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum PeerEvent {
    /// A peer appeared (its id).
    Joined(String),
    /// A peer disconnected, died or its route was removed (its id).
    Left(String),
}

/// How a [`PeerWatch`] learns of changes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WatchMode {
    /// An inotify watch of the route (and a pidfd per peer).
    Inotify,
    /// A rescan every [`RESCAN_INTERVAL`] (and a pidfd per peer).
    Rescan,
}

/// The environment variable that forces [`WatchMode::Rescan`] (value
/// `rescan`).
pub const PEER_WATCH_ENV: &str = "IPCM_PEER_WATCH";

/// Whether [`PEER_WATCH_ENV`] forces the rescan fallback (for every
/// wait on the route: watches, `peer_active`, the Perl handle).
pub(crate) fn rescan_forced() -> bool {
    std::env::var(PEER_WATCH_ENV).is_ok_and(|v| v == "rescan")
}

/// How often the fallback rescans.
pub const RESCAN_INTERVAL: Duration = Duration::from_millis(50);

/// Once woken, the watch waits for the changes to pause this long before
/// it rescans (a storm of changes is one rescan).
pub const SETTLE: Duration = Duration::from_millis(5);

/// ... but rescans at the latest this long after it woke.
pub const SETTLE_MAX: Duration = Duration::from_millis(250);

/// The epoll token of the inotify descriptor (pidfds use their own).
const INOTIFY_TOKEN: u64 = u64::MAX;

/// What the route watch asks inotify for.
fn route_events() -> inotify::WatchFlags {
    use inotify::WatchFlags as W;
    W::CREATE | W::DELETE | W::MOVED_FROM | W::MOVED_TO | W::CLOSE_WRITE | W::DELETE_SELF
}

/// A known peer.
#[derive(Debug)]
struct Known {
    id: String,
    pid: Option<u32>,
    /// Its pidfd's epoll token, if it has one.
    token: Option<u64>,
}

/// Reports peers joining and leaving a route (see the module documentation).
#[derive(Debug)]
pub struct PeerWatch {
    route: Route,
    own: Option<String>,
    epoll: OwnedFd,
    inotify: Option<OwnedFd>,
    mode: WatchMode,
    /// Live peers by on-disk name.
    known: HashMap<String, Known>,
    /// pidfds by token, with the on-disk name they watch.
    pidfds: HashMap<u64, (OwnedFd, String)>,
    next_token: u64,
    pending: VecDeque<PeerEvent>,
    /// The route is gone: every peer has been reported as left.
    ended: bool,
    last_scan: Instant,
    wakeups: u64,
    rescans: u64,
}

impl PeerWatch {
    /// Watches `route`, leaving out the entry `own` (an on-disk name). The
    /// peers present now are the starting point: events report changes
    /// from here on (see [`PeerWatch::peers`]).
    pub fn new(route: &Route, own: Option<&str>) -> Result<Self> {
        PeerWatch::with_mode(route, own, rescan_forced())
    }

    /// [`PeerWatch::new`] in [`WatchMode::Rescan`], whatever inotify offers
    /// (the fallback, chosen explicitly).
    pub fn rescanning(route: &Route, own: Option<&str>) -> Result<Self> {
        PeerWatch::with_mode(route, own, true)
    }

    fn with_mode(route: &Route, own: Option<&str>, rescan: bool) -> Result<Self> {
        let epoll = epoll::create(epoll::CreateFlags::CLOEXEC)
            .map_err(|e| Error::io("Cannot create an epoll instance for the peer watch", e))?;
        let inotify = if rescan {
            None
        } else {
            match watch_route(route, route_events()) {
                Ok(fd) => Some(fd),
                Err(e) => {
                    static ONCE: Once = Once::new();
                    ONCE.call_once(|| {
                        log::warn!(
                            "ConnectionUnix: no inotify watch of the route ({e}); peer events \
                             come from a rescan every {} ms",
                            RESCAN_INTERVAL.as_millis()
                        )
                    });
                    None
                }
            }
        };
        if let Some(fd) = &inotify {
            epoll::add(
                &epoll,
                fd,
                epoll::EventData::new_u64(INOTIFY_TOKEN),
                epoll::EventFlags::IN,
            )
            .map_err(|e| Error::io("Cannot watch the route", e))?;
        }
        let mut w = PeerWatch {
            route: route.clone(),
            own: own.map(str::to_string),
            epoll,
            mode: if inotify.is_some() {
                WatchMode::Inotify
            } else {
                WatchMode::Rescan
            },
            inotify,
            known: HashMap::new(),
            pidfds: HashMap::new(),
            next_token: 0,
            pending: VecDeque::new(),
            ended: false,
            last_scan: Instant::now(),
            wakeups: 0,
            rescans: 0,
        };
        w.rescan();
        w.pending.clear();
        Ok(w)
    }

    /// How this watch learns of changes.
    pub fn mode(&self) -> WatchMode {
        self.mode
    }

    /// The peers known now, sorted.
    pub fn peers(&self) -> Vec<String> {
        let mut ids: Vec<String> = self.known.values().map(|k| k.id.clone()).collect();
        ids.sort();
        ids
    }

    /// Times the watch woke up for a change.
    pub fn wakeups(&self) -> u64 {
        self.wakeups
    }

    /// Times it listed the route.
    pub fn rescans(&self) -> u64 {
        self.rescans
    }

    /// Whether the route is gone (every peer was reported as left; no
    /// further event comes).
    pub fn is_ended(&self) -> bool {
        self.ended
    }

    /// The next event, waiting up to `timeout` (`None`: as long as it
    /// takes; zero: not at all). `None` when the time ran out or the route
    /// is gone and every event was taken.
    pub fn next_event(&mut self, timeout: Option<Duration>) -> Result<Option<PeerEvent>> {
        let deadline = timeout.map(|t| Instant::now() + t);
        loop {
            if let Some(e) = self.pending.pop_front() {
                return Ok(Some(e));
            }
            if self.ended {
                return Ok(None);
            }
            let now = Instant::now();
            let mut wait = deadline.map(|d| d.saturating_duration_since(now));
            if self.mode == WatchMode::Rescan {
                let next_scan = (self.last_scan + RESCAN_INTERVAL).saturating_duration_since(now);
                wait = Some(wait.map_or(next_scan, |w| w.min(next_scan)));
            }
            let changed = self.wait(wait)?;
            if changed
                || (self.mode == WatchMode::Rescan && self.last_scan.elapsed() >= RESCAN_INTERVAL)
            {
                self.rescan();
                continue;
            }
            if deadline.is_some_and(|d| Instant::now() >= d) {
                return Ok(self.pending.pop_front());
            }
        }
    }

    /// Every event that is ready now, without waiting.
    pub fn ready_events(&mut self) -> Result<Vec<PeerEvent>> {
        let mut out = Vec::new();
        while let Some(e) = self.next_event(Some(Duration::ZERO))? {
            out.push(e);
        }
        Ok(out)
    }

    /// Waits on the epoll instance; true if something may have changed
    /// (the inotify queue is drained, dead peers' files reaped). A storm
    /// of changes is one wake-up: once woken, it goes on draining while
    /// changes keep coming [`SETTLE`] apart (for at most [`SETTLE_MAX`]),
    /// so that one rescan covers them all.
    fn wait(&mut self, wait: Option<Duration>) -> Result<bool> {
        if !self.wait_once(wait)? {
            return Ok(false);
        }
        self.wakeups += 1;
        let start = Instant::now();
        while start.elapsed() < SETTLE_MAX && self.wait_once(Some(SETTLE))? {}
        Ok(true)
    }

    /// One epoll wait and what it reports; true if anything did.
    fn wait_once(&mut self, wait: Option<Duration>) -> Result<bool> {
        let ts = wait.map(crate::wire::timespec);
        let mut events = Vec::with_capacity(16);
        match epoll::wait(
            &self.epoll,
            rustix::buffer::spare_capacity(&mut events),
            ts.as_ref(),
        ) {
            Ok(_) | Err(rustix::io::Errno::INTR) => {}
            Err(e) => return Err(Error::io("Cannot wait for peer changes", e)),
        }
        if events.is_empty() {
            return Ok(false);
        }
        for ev in &events {
            let token = ev.data.u64();
            if token == INOTIFY_TOKEN {
                self.drain_inotify();
            } else if let Some((_, disk)) = self.pidfds.get(&token) {
                // The peer died: reap its files if its pid file names the
                // dead process (a restarted peer keeps its new files).
                let disk = disk.clone();
                if let Some(k) = self.known.get(&disk)
                    && let Some(pid) = k.pid
                    && self.route.read_pid(&disk) == Some(pid)
                    && !super::pid_is_running(pid).is_alive()
                {
                    self.route.reap(&disk);
                }
                self.forget_pidfd(token);
            }
        }
        Ok(true)
    }

    /// Reads every queued inotify event (a storm is one rescan).
    fn drain_inotify(&self) {
        if let Some(fd) = &self.inotify {
            drain(fd.as_fd());
        }
    }

    /// Lists the route and turns the differences into events.
    fn rescan(&mut self) {
        self.rescans += 1;
        self.last_scan = Instant::now();
        let live = if self.route.exists() {
            self.route.live_entries(self.own.as_deref()).ok()
        } else {
            None
        };
        let live: Vec<LiveEntry> = match live {
            Some(l) => l,
            None => {
                // The route is gone: everyone left.
                let mut left: Vec<String> = self.known.drain().map(|(_, k)| k.id).collect();
                left.sort();
                self.pending.extend(left.into_iter().map(PeerEvent::Left));
                let tokens: Vec<u64> = self.pidfds.keys().copied().collect();
                for t in tokens {
                    self.forget_pidfd(t);
                }
                self.ended = true;
                return;
            }
        };
        let mut now: HashMap<String, LiveEntry> =
            live.into_iter().map(|e| (e.disk.clone(), e)).collect();
        let mut left = Vec::new();
        let gone: Vec<String> = self
            .known
            .iter()
            .filter(|(disk, k)| {
                now.get(*disk)
                    .is_none_or(|e| e.pid != k.pid && k.pid.is_some())
            })
            .map(|(disk, _)| disk.clone())
            .collect();
        for disk in gone {
            if let Some(k) = self.known.remove(&disk) {
                if let Some(t) = k.token {
                    self.forget_pidfd(t);
                }
                left.push(k.id);
            }
        }
        left.sort();
        self.pending.extend(left.into_iter().map(PeerEvent::Left));
        let mut joined = Vec::new();
        let mut fresh: Vec<String> = now
            .keys()
            .filter(|d| !self.known.contains_key(*d))
            .cloned()
            .collect();
        fresh.sort();
        for disk in fresh {
            let Some(e) = now.remove(&disk) else { continue };
            let token = e.pid.and_then(|pid| self.watch_pid(pid, &disk));
            joined.push(e.id.clone());
            self.known.insert(
                disk,
                Known {
                    id: e.id,
                    pid: e.pid,
                    token,
                },
            );
        }
        for (disk, e) in now {
            // Known peers that wrote their pid since the last scan.
            if let Some(k) = self.known.get_mut(&disk)
                && k.pid.is_none()
                && let Some(pid) = e.pid
            {
                k.pid = Some(pid);
                let token = self.watch_pid(pid, &disk);
                if let Some(k) = self.known.get_mut(&disk) {
                    k.token = token;
                }
            }
        }
        joined.sort();
        self.pending
            .extend(joined.into_iter().map(PeerEvent::Joined));
    }

    /// A pidfd for `pid` in the epoll set; `None` where pidfds are refused
    /// (the death is then seen by the next rescan).
    fn watch_pid(&mut self, pid: u32, disk: &str) -> Option<u64> {
        let pid = rustix::process::Pid::from_raw(pid as i32)?;
        let fd = rustix::process::pidfd_open(pid, rustix::process::PidfdFlags::empty()).ok()?;
        let token = self.next_token;
        self.next_token += 1;
        epoll::add(
            &self.epoll,
            &fd,
            epoll::EventData::new_u64(token),
            epoll::EventFlags::IN,
        )
        .ok()?;
        self.pidfds.insert(token, (fd, disk.to_string()));
        Some(token)
    }

    fn forget_pidfd(&mut self, token: u64) {
        if let Some((fd, disk)) = self.pidfds.remove(&token) {
            let _ = epoll::delete(&self.epoll, &fd);
            if let Some(k) = self.known.get_mut(&disk)
                && k.token == Some(token)
            {
                k.token = None;
            }
        }
    }
}

impl Iterator for PeerWatch {
    type Item = Result<PeerEvent>;

    /// The next event, waiting as long as it takes; `None` once the route
    /// is gone and every peer was reported as left.
    fn next(&mut self) -> Option<Result<PeerEvent>> {
        self.next_event(None).transpose()
    }
}

impl AsFd for PeerWatch {
    /// Readable when a change may be waiting (register it with a poller,
    /// then call [`PeerWatch::ready_events`]). In [`WatchMode::Rescan`]
    /// only peer deaths make it readable: poll with a timeout of at most
    /// [`RESCAN_INTERVAL`].
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.epoll.as_fd()
    }
}

/// An inotify descriptor (non-blocking, close-on-exec) watching `route`
/// for `flags`.
pub(crate) fn watch_route(
    route: &Route,
    flags: inotify::WatchFlags,
) -> rustix::io::Result<OwnedFd> {
    let fd = inotify::init(inotify::CreateFlags::CLOEXEC | inotify::CreateFlags::NONBLOCK)?;
    inotify::add_watch(&fd, route.path(), flags)?;
    Ok(fd)
}

/// Discards every event queued on an inotify descriptor.
pub(crate) fn drain(fd: BorrowedFd<'_>) {
    let mut buf = [std::mem::MaybeUninit::<u8>::uninit(); 4096];
    let mut reader = inotify::Reader::new(fd, &mut buf);
    loop {
        match reader.next() {
            Ok(_) | Err(rustix::io::Errno::INTR) => {}
            Err(_) => return,
        }
    }
}
