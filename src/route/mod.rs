//! The route directory: creation, on-disk names, sidecar files, peer
//! discovery and stale-client cleanup, laid out as the Perl client lays them.
//!
//! Everything here is plain file-system work; sockets live in the reactor.

pub mod info;
pub mod names;
pub mod watch;

use std::collections::BTreeMap;
use std::fs::{self, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use bytes::BytesMut;

use crate::error::{Error, Result};
use crate::proto::Stats;
use crate::serializer::Serializer;
use crate::wire::{FrameHeader, HEADER_LEN};
pub use info::Info;
pub use names::{max_on_disk_name_length, on_disk_name};

/// A live peer's entry (see [`Route::live_entries`]).
#[derive(Debug, Clone)]
pub(crate) struct LiveEntry {
    /// The peer's id.
    pub id: String,
    /// Its on-disk name.
    pub disk: String,
    /// Its pid, if it wrote one.
    pub pid: Option<u32>,
}

/// What kind of entry a client has in the route.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryKind {
    /// A listening socket.
    Socket,
    /// A regular file (a non-listener's marker).
    Marker,
}

/// Liveness of a pid, as `pid_is_running` reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PidState {
    /// Signal 0 succeeded.
    Running,
    /// `ESRCH`: no such process.
    Gone,
    /// Exists but cannot be signalled (`EPERM`); counts as alive.
    Unsignalable,
}

impl PidState {
    /// Whether the process counts as alive.
    pub fn is_alive(self) -> bool {
        self != PidState::Gone
    }

    /// Perl's 1 / 0 / -1.
    pub fn as_perl(self) -> i32 {
        match self {
            PidState::Running => 1,
            PidState::Gone => 0,
            PidState::Unsignalable => -1,
        }
    }
}

/// Probes a pid with signal 0.
pub fn pid_is_running(pid: u32) -> PidState {
    let Some(p) = i32::try_from(pid)
        .ok()
        .and_then(rustix::process::Pid::from_raw)
    else {
        return PidState::Gone;
    };
    match rustix::process::test_kill_process(p) {
        Ok(()) => PidState::Running,
        Err(rustix::io::Errno::SRCH) => PidState::Gone,
        Err(_) => PidState::Unsignalable,
    }
}

/// A route directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    path: String,
}

fn nofollow() -> OpenOptions {
    let mut o = OpenOptions::new();
    o.custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC);
    o
}

impl Route {
    /// A route at `path`, used exactly as given.
    pub fn new(path: impl Into<String>) -> Self {
        Route { path: path.into() }
    }

    /// Creates a new route directory (mode 0700) named
    /// `PerlIPCManager-<pid>-XXXXXX` under `parent`, or under `$TMPDIR`
    /// (when it is a writable directory) or `/tmp`.
    pub fn spawn(parent: Option<&Path>) -> Result<Self> {
        Route::spawn_with_template(parent, &format!("PerlIPCManager-{}-", std::process::id()))
    }

    /// Like [`Route::spawn`] with a different name prefix (six random
    /// characters from `[A-Za-z0-9_]` are appended).
    pub fn spawn_with_template(parent: Option<&Path>, prefix: &str) -> Result<Self> {
        const CHARS: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_";
        let parent: PathBuf = match parent {
            Some(p) => p.to_path_buf(),
            None => default_tmpdir(),
        };
        let mut last_err = None;
        for _ in 0..100 {
            let rand = uuid::Uuid::new_v4();
            let suffix: String = rand.as_bytes()[..6]
                .iter()
                .map(|b| CHARS[*b as usize % CHARS.len()] as char)
                .collect();
            let dir = parent.join(format!("{prefix}{suffix}"));
            match fs::DirBuilder::new().mode(0o700).create(&dir) {
                Ok(()) => {
                    let path = dir.to_string_lossy().trim_end_matches('/').to_string();
                    return Ok(Route::new(path));
                }
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => last_err = Some(e),
                Err(e) => {
                    return Err(Error::io(
                        format!("Cannot create route directory '{}'", dir.display()),
                        e,
                    ));
                }
            }
        }
        Err(Error::io(
            "Cannot create route directory",
            last_err.unwrap_or_else(|| io::Error::other("no free name")),
        ))
    }

    /// Removes the whole route directory tree.
    pub fn unspawn(&self) -> Result<()> {
        // A client disconnecting as the tree goes writes its `.stats` last,
        // after its socket is gone (the protocol's order), so a file can
        // appear between the removal's listing and its rmdir: look again
        // while that keeps happening, for up to a second.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(1);
        loop {
            match fs::remove_dir_all(&self.path) {
                Ok(()) => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
                Err(e)
                    if e.kind() == io::ErrorKind::DirectoryNotEmpty
                        && std::time::Instant::now() < deadline =>
                {
                    std::thread::sleep(std::time::Duration::from_millis(2));
                }
                Err(e) => {
                    return Err(Error::io(format!("Cannot remove route '{}'", self.path), e));
                }
            }
        }
    }

    /// The route string.
    pub fn path(&self) -> &str {
        &self.path
    }

    /// Whether the route directory exists.
    pub fn exists(&self) -> bool {
        Path::new(&self.path).is_dir()
    }

    /// The on-disk name of `id` on this route.
    pub fn on_disk_name(&self, id: &str) -> Result<String> {
        on_disk_name(&self.path, id)
    }

    /// The longest verbatim on-disk name.
    pub fn max_on_disk_name_length(&self) -> i64 {
        max_on_disk_name_length(&self.path)
    }

    /// `<route>/<name>`.
    pub fn file(&self, name: &str) -> String {
        format!("{}/{}", self.path, name)
    }

    /// What `path` is, if it is a socket or a regular file (following
    /// symlinks): the Perl client's `check_path`.
    pub fn check_path(path: &str) -> Option<EntryKind> {
        let meta = fs::metadata(path).ok()?;
        let ft = meta.file_type();
        if ft.is_socket() {
            Some(EntryKind::Socket)
        } else if ft.is_file() {
            Some(EntryKind::Marker)
        } else {
            None
        }
    }

    /// The pid recorded in `<name>.pid`, if it holds one.
    pub fn read_pid(&self, disk: &str) -> Option<u32> {
        let text = fs::read_to_string(self.file(&format!("{disk}.pid"))).ok()?;
        let line = text.split('\n').next()?;
        if line.is_empty() || !line.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        line.parse().ok()
    }

    fn write_atomic(
        &self,
        file: &str,
        content: &[u8],
    ) -> std::result::Result<(), (bool, String, io::Error)> {
        let pend = format!("{file}.pend");
        let mut f = nofollow()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o666)
            .open(&pend)
            .map_err(|e| (true, pend.clone(), e))?;
        f.write_all(content).map_err(|e| (true, pend.clone(), e))?;
        drop(f);
        fs::rename(&pend, file).map_err(|e| (false, pend, e))
    }

    /// Writes `<name>.pid` atomically (via `.pend` and rename).
    pub fn write_pid(&self, disk: &str, pid: u32) -> Result<()> {
        let file = self.file(&format!("{disk}.pid"));
        self.write_atomic(&file, pid.to_string().as_bytes())
            .map_err(|(open, pend, err)| {
                if open {
                    Error::PidFileOpen {
                        path: pend,
                        err: err.into(),
                    }
                } else {
                    Error::PidFileRename {
                        from: pend,
                        to: file.clone(),
                        err: err.into(),
                    }
                }
            })
    }

    /// Writes `<name>.name` (the real id of a hashed name) atomically.
    pub fn write_name(&self, disk: &str, id: &str) -> Result<()> {
        let file = self.file(&format!("{disk}.name"));
        self.write_atomic(&file, id.as_bytes())
            .map_err(|(open, pend, err)| {
                if open {
                    Error::NameFileOpen {
                        path: pend,
                        err: err.into(),
                    }
                } else {
                    Error::NameFileRename {
                        from: pend,
                        to: file.clone(),
                        err: err.into(),
                    }
                }
            })
    }

    /// The real id behind on-disk name `disk`.
    pub fn real_id(&self, disk: &str) -> String {
        match fs::read(self.file(&format!("{disk}.name"))) {
            Ok(bytes) => String::from_utf8_lossy(&bytes).into_owned(),
            Err(_) => disk.to_string(),
        }
    }

    /// Writes `<name>.stats` with the bus serializer (truncate and write).
    /// Skipped silently when the route is gone.
    pub fn write_stats(&self, disk: &str, ser: &Serializer, stats: &Stats) -> Result<()> {
        let file = self.file(&format!("{disk}.stats"));
        let mut out = BytesMut::new();
        ser.encode_value(stats, &mut out)?;
        let res = nofollow()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o666)
            .open(&file)
            .and_then(|mut f| f.write_all(&out));
        match res {
            Ok(()) => Ok(()),
            Err(_) if !self.exists() => Ok(()),
            Err(e) => Err(Error::StatsFileWrite {
                path: file,
                err: e.into(),
            }),
        }
    }

    /// Reads `<name>.stats`.
    pub fn read_stats(&self, disk: &str, ser: &Serializer) -> Result<Stats> {
        let bytes = fs::read(self.file(&format!("{disk}.stats")))
            .map_err(|e| Error::StatsFileRead { err: e.into() })?;
        ser.decode_value(&bytes)
    }

    /// Every client's `.stats` on the route, keyed by real id.
    pub fn all_stats(&self, ser: &Serializer) -> Result<BTreeMap<String, Stats>> {
        let mut out = BTreeMap::new();
        for name in self.list()? {
            let Some(disk) = name.strip_suffix(".stats") else {
                continue;
            };
            if let Ok(stats) = self.read_stats(disk, ser) {
                out.insert(self.real_id(disk), stats);
            }
        }
        Ok(out)
    }

    /// Appends frames (`u32` length + payload each) to `<name>.resume`.
    pub fn append_resume(&self, disk: &str, records: &[u8]) -> Result<()> {
        let file = self.file(&format!("{disk}.resume"));
        let mut f = nofollow()
            .append(true)
            .create(true)
            .mode(0o666)
            .open(&file)
            .map_err(|e| Error::ResumeFileOpen { err: e.into() })?;
        f.write_all(records)
            .map_err(|e| Error::io(format!("Could not write resume file '{file}'"), e))
    }

    /// Whether `<name>.resume` exists.
    pub fn have_resume(&self, disk: &str) -> bool {
        fs::symlink_metadata(self.file(&format!("{disk}.resume"))).is_ok()
    }

    /// Reads and deletes `<name>.resume`, returning its record payloads.
    pub fn take_resume(&self, disk: &str) -> Result<Vec<bytes::Bytes>> {
        let file = self.file(&format!("{disk}.resume"));
        let mut data = Vec::new();
        match nofollow().read(true).open(&file) {
            Ok(mut f) => {
                f.read_to_end(&mut data)
                    .map_err(|e| Error::ResumeFileOpen { err: e.into() })?;
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(Error::ResumeFileOpen { err: e.into() }),
        }
        let data = bytes::Bytes::from(data);
        let mut records = Vec::new();
        let mut at = 0;
        while at < data.len() {
            let rest = &data[at..];
            let Some(h) = FrameHeader::parse(rest) else {
                return Err(Error::ResumeHeader { got: rest.len() });
            };
            let len = h.payload_len() as usize;
            let got = rest.len() - HEADER_LEN;
            if got < len {
                return Err(Error::ResumePayload { wanted: len, got });
            }
            records.push(data.slice(at + HEADER_LEN..at + HEADER_LEN + len));
            at += HEADER_LEN + len;
        }
        fs::remove_file(&file).map_err(|_| Error::ResumeUnlink)?;
        Ok(records)
    }

    /// Names in the route directory.
    pub fn list(&self) -> Result<Vec<String>> {
        let rd = fs::read_dir(&self.path).map_err(|e| Error::OpenDir { err: e.into() })?;
        Ok(rd
            .filter_map(|e| e.ok())
            .filter_map(|e| e.file_name().into_string().ok())
            .collect())
    }

    /// Live peers' real ids, sorted, without the one whose on-disk name is
    /// `own`.
    pub fn peers(&self, own: Option<&str>) -> Result<Vec<String>> {
        let mut ids: Vec<String> = self.live_entries(own)?.into_iter().map(|e| e.id).collect();
        ids.sort();
        Ok(ids)
    }

    /// The entries [`Route::peers`] reports, with their on-disk names and
    /// pids.
    pub(crate) fn live_entries(&self, own: Option<&str>) -> Result<Vec<LiveEntry>> {
        let mut out = Vec::new();
        for name in self.list()? {
            if Some(name.as_str()) == own || !names::is_peer_candidate(&name) {
                continue;
            }
            if Route::check_path(&self.file(&name)).is_none() {
                continue;
            }
            let pid = self.read_pid(&name);
            if pid.is_some_and(|pid| !pid_is_running(pid).is_alive()) {
                continue;
            }
            out.push(LiveEntry {
                id: self.real_id(&name),
                disk: name,
                pid,
            });
        }
        Ok(out)
    }

    /// Peers whose entry is a listening socket.
    pub fn listening_peers(&self, own: Option<&str>) -> Result<Vec<String>> {
        let mut out = Vec::new();
        for id in self.peers(own)? {
            if self.peer_is_listener(&id)? {
                out.push(id);
            }
        }
        Ok(out)
    }

    /// The path of `id`'s entry if it is a socket or regular file (no
    /// liveness check).
    pub fn peer_exists(&self, id: &str) -> Result<Option<String>> {
        if id.is_empty() || id == "0" {
            return Err(Error::PeerIdRequiredQuoted);
        }
        let path = self.file(&self.on_disk_name(id)?);
        Ok(Route::check_path(&path).map(|_| path))
    }

    /// Whether `id`'s entry is a listening socket.
    pub fn peer_is_listener(&self, id: &str) -> Result<bool> {
        Ok(match self.peer_exists(id)? {
            Some(p) => Route::check_path(&p) == Some(EntryKind::Socket),
            None => false,
        })
    }

    /// `None` if `id` has no entry; `Some(0)` without a valid `.pid`;
    /// otherwise its pid.
    pub fn peer_pid(&self, id: &str) -> Result<Option<u32>> {
        if self.peer_exists(id)?.is_none() {
            return Ok(None);
        }
        Ok(Some(self.read_pid(&self.on_disk_name(id)?).unwrap_or(0)))
    }

    /// Whether `id` has a running pid. With a timeout, waits until true or
    /// the deadline (`Some(Duration::ZERO)` waits forever): on an inotify
    /// watch of the route, so it wakes as soon as the peer's entry or pid
    /// file is written; where inotify is unavailable, by checking every
    /// 50 ms.
    pub fn peer_active(&self, id: &str, timeout: Option<Duration>) -> Result<bool> {
        let check = || -> Result<bool> {
            Ok(
                matches!(self.peer_pid(id)?, Some(pid) if pid != 0 && pid_is_running(pid).is_alive()),
            )
        };
        let Some(timeout) = timeout else {
            return check();
        };
        let deadline = (!timeout.is_zero()).then(|| Instant::now() + timeout);
        // Watch first, then check: a change between the two is not missed.
        let watch = if watch::rescan_forced() {
            None
        } else {
            use rustix::fs::inotify::WatchFlags as W;
            watch::watch_route(self, W::CREATE | W::MOVED_TO | W::CLOSE_WRITE | W::ATTRIB).ok()
        };
        loop {
            if check()? {
                return Ok(true);
            }
            let left = deadline.map(|d| d.saturating_duration_since(Instant::now()));
            if left.is_some_and(|l| l.is_zero()) {
                return Ok(false);
            }
            match &watch {
                Some(fd) => {
                    // Woken by the route's changes; a peer that dies
                    // (which changes no file) is noticed within a second.
                    let wait =
                        left.map_or(Duration::from_secs(1), |l| l.min(Duration::from_secs(1)));
                    let ts = crate::wire::timespec(wait);
                    let mut fds = [rustix::event::PollFd::new(fd, rustix::event::PollFlags::IN)];
                    let _ = rustix::event::poll(&mut fds, Some(&ts));
                    watch::drain(std::os::fd::AsFd::as_fd(fd));
                }
                None => std::thread::sleep(left.map_or(Duration::from_millis(50), |l| {
                    l.min(Duration::from_millis(50))
                })),
            }
        }
    }

    /// Reaps every entry whose `.pid` names a dead process; returns how many
    /// (whose pid is gone). Entries without a valid pid are left alone.
    pub fn peer_left(&self, own: Option<&str>) -> Result<usize> {
        let mut n = 0;
        for name in self.list()? {
            if Some(name.as_str()) == own || !names::is_peer_candidate(&name) {
                continue;
            }
            if let Some(pid) = self.read_pid(&name)
                && !pid_is_running(pid).is_alive()
            {
                self.reap(&name);
                n += 1;
            }
        }
        Ok(n)
    }

    /// Removes a stale client's entry and sidecars.
    pub fn reap(&self, disk: &str) {
        let entry = self.file(disk);
        let _ = match fs::symlink_metadata(&entry) {
            Ok(m) if m.is_dir() => fs::remove_dir_all(&entry),
            Ok(_) => fs::remove_file(&entry),
            Err(_) => Ok(()),
        };
        for suffix in ["", ".pid", ".name", ".resume", ".stats", ".suspend"] {
            let f = self.file(&format!("{disk}{suffix}"));
            if !suffix.is_empty() {
                let _ = fs::remove_file(&f);
            }
            let _ = fs::remove_file(format!("{f}.pend"));
        }
    }

    /// The expiry recorded in a peer's `.suspend`, if any.
    pub fn peer_suspend_expires(&self, id: &str) -> Result<Option<f64>> {
        let disk = self.on_disk_name(id)?;
        let Ok(text) = fs::read_to_string(self.file(&format!("{disk}.suspend"))) else {
            return Ok(None);
        };
        let t = text.trim();
        let valid = !t.is_empty()
            && t.split_once('.')
                .map_or(t.bytes().all(|b| b.is_ascii_digit()), |(a, b)| {
                    !a.is_empty()
                        && !b.is_empty()
                        && (a.bytes().chain(b.bytes())).all(|c| c.is_ascii_digit())
                });
        Ok(if valid { t.parse().ok() } else { None })
    }
}

fn default_tmpdir() -> PathBuf {
    if let Some(t) = std::env::var_os("TMPDIR") {
        let p = PathBuf::from(t);
        if p.is_dir() && rustix::fs::access(&p, rustix::fs::Access::WRITE_OK).is_ok() {
            return p;
        }
    }
    PathBuf::from("/tmp")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    /// Clients writing their last `.stats` while the route is removed (a
    /// file appears between the removal's listing and its rmdir): the
    /// removal looks again instead of failing.
    #[test]
    fn unspawn_outlasts_files_written_while_it_removes() {
        for _ in 0..20 {
            let parent = tempfile::tempdir().unwrap();
            let r = Route::spawn(Some(parent.path())).unwrap();
            for i in 0..200 {
                fs::write(format!("{}/c{i}.stats", r.path()), b"{}").unwrap();
            }
            let dir = r.path().to_string();
            let writer = std::thread::spawn(move || {
                for i in 0..20 {
                    // Fails once the directory is gone, as a late client's
                    // write does.
                    let _ = fs::write(format!("{dir}/late{i}.stats"), b"{}");
                    std::thread::yield_now();
                }
            });
            r.unspawn().unwrap();
            writer.join().unwrap();
            assert!(!r.exists());
        }
    }

    #[test]
    fn spawn_creates_private_dir_with_perl_template() {
        let parent = tempfile::tempdir().unwrap();
        let r = Route::spawn(Some(parent.path())).unwrap();
        let name = Path::new(r.path())
            .file_name()
            .unwrap()
            .to_str()
            .unwrap()
            .to_string();
        let prefix = format!("PerlIPCManager-{}-", std::process::id());
        assert!(name.starts_with(&prefix), "{name}");
        let tail = &name[prefix.len()..];
        assert_eq!(tail.len(), 6);
        assert!(tail.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_'));
        let mode = fs::metadata(r.path()).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode & 0o077, 0, "mode {mode:o}");
        r.unspawn().unwrap();
        assert!(!r.exists());
    }

    #[test]
    fn pid_files_and_liveness() {
        let dir = tempfile::tempdir().unwrap();
        let r = Route::new(dir.path().to_str().unwrap());
        r.write_pid("x", 4242).unwrap();
        assert_eq!(fs::read_to_string(r.file("x.pid")).unwrap(), "4242");
        assert_eq!(r.read_pid("x"), Some(4242));
        fs::write(r.file("y.pid"), "17\n").unwrap();
        assert_eq!(r.read_pid("y"), Some(17));
        fs::write(r.file("z.pid"), "abc").unwrap();
        assert_eq!(r.read_pid("z"), None);
        assert_eq!(pid_is_running(std::process::id()), PidState::Running);
        assert!(!Path::new(&r.file("x.pid.pend")).exists());
    }

    #[test]
    fn resume_records_round_trip_and_truncation_errors() {
        let dir = tempfile::tempdir().unwrap();
        let r = Route::new(dir.path().to_str().unwrap());
        let mut recs = BytesMut::new();
        crate::wire::encode_frame(b"one", &mut recs).unwrap();
        crate::wire::encode_frame(b"two!", &mut recs).unwrap();
        r.append_resume("me", &recs).unwrap();
        assert!(r.have_resume("me"));
        let got = r.take_resume("me").unwrap();
        assert_eq!(
            got,
            vec![bytes::Bytes::from("one"), bytes::Bytes::from("two!")]
        );
        assert!(!r.have_resume("me"));
        fs::write(r.file("me.resume"), [0, 0]).unwrap();
        assert_eq!(
            r.take_resume("me").unwrap_err().to_string(),
            "Truncated resume file header (got 2 bytes)"
        );
        fs::write(r.file("me.resume"), [0, 0, 0, 9, b'a']).unwrap();
        assert_eq!(
            r.take_resume("me").unwrap_err().to_string(),
            "Truncated resume file payload (wanted 9, got 1)"
        );
    }

    #[test]
    fn sidecar_writes_do_not_follow_symlinks() {
        let dir = tempfile::tempdir().unwrap();
        let r = Route::new(dir.path().to_str().unwrap());
        let target = dir.path().join("target");
        fs::write(&target, "keep").unwrap();
        std::os::unix::fs::symlink(&target, r.file("me.stats")).unwrap();
        assert!(
            r.write_stats("me", &Serializer::Json, &Stats::default())
                .is_err()
        );
        assert_eq!(fs::read_to_string(&target).unwrap(), "keep");
    }

    #[test]
    fn peers_skip_sidecars_pend_and_dead_pids() {
        let dir = tempfile::tempdir().unwrap();
        let r = Route::new(dir.path().to_str().unwrap());
        for f in [
            "alive",
            "nopid",
            "dead",
            "me",
            "x.pid.pend",
            ".hidden",
            "_private",
        ] {
            fs::write(r.file(f), "").unwrap();
        }
        r.write_pid("alive", std::process::id()).unwrap();
        r.write_pid("dead", 999_999_999).unwrap();
        let hashed = on_disk_name(r.path(), "h-real").unwrap();
        fs::write(r.file(&hashed), "").unwrap();
        r.write_name(&hashed, "h-real").unwrap();
        assert_eq!(r.peers(Some("me")).unwrap(), ["alive", "h-real", "nopid"]);
        assert_eq!(r.peer_left(Some("me")).unwrap(), 1);
        assert!(!Path::new(&r.file("dead")).exists());
        assert!(!Path::new(&r.file("dead.pid")).exists());
        assert_eq!(r.peer_pid("nopid").unwrap(), Some(0));
        assert_eq!(r.peer_pid("absent").unwrap(), None);
        assert!(r.peer_active("alive", None).unwrap());
        assert!(
            !r.peer_active("nopid", Some(Duration::from_millis(60)))
                .unwrap()
        );
        assert!(matches!(
            r.peer_exists(""),
            Err(Error::PeerIdRequiredQuoted)
        ));
    }
}
