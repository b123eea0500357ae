//! The Perl-named surface that is no more than a view: the client's ids,
//! files and peers, and its cached connections (the Perl client's API).

use super::*;

impl Client {
    // ----- attributes -------------------------------------------------

    /// The client's id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The pid that created the client.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// The route.
    pub fn route(&self) -> &Route {
        &self.route
    }

    /// The info string of the route.
    pub fn info(&self) -> Info {
        Info::new(self.serializer.clone(), self.route.path())
    }

    /// The route serializer.
    pub fn serializer(&self) -> &Serializer {
        &self.serializer
    }

    /// Whether the client owns a listening socket.
    pub fn listen(&self) -> bool {
        self.listen
    }

    /// The backend the reactor runs on.
    pub fn backend(&self) -> BackendKind {
        self.reactor.backend_kind()
    }

    /// What the client holds right now.
    pub fn resources(&self) -> Resources {
        Resources {
            connections: self.reactor.core().conn_count(),
            pooled_buffers: self.reactor.pool().idle(),
            backend_buffers: self.reactor.backend_buffers(),
            lanes: self.reactor.core().lane_count(),
            lane_mappings: self.reactor.core().lane_mapped(),
        }
    }

    /// Which path messages to and from `peer` take: the socket, or (both
    /// ways) a shared-memory lane; `None` without a connection to `peer`.
    pub fn lane(&self, peer: &str) -> Option<LaneKind> {
        self.reactor.core().lane_of(peer)
    }

    /// Always false: this transport cannot suspend.
    pub fn suspend_supported(&self) -> bool {
        false
    }

    /// Always fails: this transport cannot suspend.
    pub fn suspend(&mut self) -> Result<()> {
        Err(Error::SuspendUnsupported)
    }

    /// `UNIX Socket or marker file`.
    pub fn path_type(&self) -> &'static str {
        PATH_TYPE
    }

    /// Whether `disconnect` has run.
    pub fn disconnected(&self) -> bool {
        self.disconnected
    }

    /// The client's entry (`<route>/<on-disk name>`).
    pub fn path(&self) -> &str {
        &self.path
    }

    /// The client's on-disk name.
    pub fn on_disk(&self) -> &str {
        &self.disk
    }

    /// The on-disk name of any id on this route.
    pub fn on_disk_name(&self, id: &str) -> Result<String> {
        self.route.on_disk_name(id)
    }

    /// The route's verbatim-name budget.
    pub fn max_on_disk_name_length(&self) -> i64 {
        self.route.max_on_disk_name_length()
    }

    /// `<path>.pid`.
    pub fn pidfile(&self) -> String {
        format!("{}.pid", self.path)
    }

    /// `<path>.stats`.
    pub fn stats_file(&self) -> String {
        format!("{}.stats", self.path)
    }

    /// `<path>.resume`.
    pub fn resume_file(&self) -> String {
        format!("{}.resume", self.path)
    }

    /// `<path>.name`.
    pub fn name_file(&self) -> String {
        format!("{}.name", self.path)
    }

    /// The in-memory statistics (queued messages count as sent).
    pub fn stats(&mut self) -> &Stats {
        self.reactor.core_mut().count_queued();
        self.reactor.core().stats()
    }

    /// Writes `.stats` now.
    pub fn write_stats(&mut self) -> Result<()> {
        self.reactor.core_mut().count_queued();
        self.route
            .write_stats(&self.disk, &self.serializer, self.reactor.core().stats())
    }

    /// This client's `.stats` file as last written (by
    /// [`Client::write_stats`] or a disconnect).
    pub fn read_stats(&self) -> Result<Stats> {
        self.route.read_stats(&self.disk, &self.serializer)
    }

    /// Perl's `pid_is_running` (1 running, 0 gone, -1 running but not
    /// signalable).
    pub fn pid_is_running(pid: u32) -> PidState {
        pid_is_running(pid)
    }

    /// Perl's `check_path`: whether `path` is a socket or a regular file.
    pub fn check_path(path: &str) -> Option<EntryKind> {
        Route::check_path(path)
    }

    /// Every client's `.stats` on the route.
    pub fn all_stats(&self) -> Result<BTreeMap<String, Stats>> {
        self.route.all_stats(&self.serializer)
    }

    /// Fails with `Client used from wrong PID` in another process.
    pub fn pid_check(&self) -> Result<()> {
        // Every client read the generation when it was made, so the
        // child handler is registered: one load.
        if crate::fork::generation_registered() != self.fork_generation {
            return Err(Error::WrongPid);
        }
        Ok(())
    }

    pub(super) fn check_usable(&self) -> Result<()> {
        self.pid_check()?;
        if self.disconnected {
            return Err(Error::Disconnected {
                id: self.id.clone(),
            });
        }
        Ok(())
    }

    // ----- peers ------------------------------------------------------

    /// Watches this client's route for peers joining and leaving (inotify
    /// and a pidfd per peer; see [`crate::route::watch::PeerWatch`]). The peers present now are
    /// the starting point.
    pub fn peer_watch(&self) -> Result<crate::route::watch::PeerWatch> {
        crate::route::watch::PeerWatch::new(&self.route, Some(&self.disk))
    }

    /// Whether [`Client::handles_for_peer_change`] has a handle: true where
    /// inotify is available (as in Perl; see
    /// [`crate::route::watch::PEER_WATCH_ENV`]).
    pub fn have_handles_for_peer_change(&self) -> bool {
        !self.handles_for_peer_change().is_empty()
    }

    /// The peer-change handle, as Perl's: an inotify descriptor watching
    /// the route for created entries (made on first use), readable when
    /// one appeared (drain it with
    /// [`Client::reset_handles_for_peer_change`]). Empty where inotify is
    /// unavailable. [`Client::peer_watch`] reports joins and leaves
    /// themselves.
    pub fn handles_for_peer_change(&self) -> Vec<std::os::fd::BorrowedFd<'_>> {
        use std::os::fd::AsFd;
        self.peer_change
            .get_or_init(|| {
                if crate::route::watch::rescan_forced() {
                    return None;
                }
                crate::route::watch::watch_route(
                    &self.route,
                    rustix::fs::inotify::WatchFlags::CREATE,
                )
                .ok()
            })
            .iter()
            .map(|fd| fd.as_fd())
            .collect()
    }

    /// Discards the events waiting on the peer-change handle.
    pub fn reset_handles_for_peer_change(&self) {
        use std::os::fd::AsFd;
        if let Some(Some(fd)) = self.peer_change.get() {
            crate::route::watch::drain(fd.as_fd());
        }
    }

    /// Live peers, sorted, without this client.
    pub fn peers(&self) -> Result<Vec<String>> {
        self.route.peers(Some(&self.disk))
    }

    /// Live peers that listen.
    pub fn listening_peers(&self) -> Result<Vec<String>> {
        self.route.listening_peers(Some(&self.disk))
    }

    /// Whether `id`'s entry is a listening socket.
    pub fn peer_is_listener(&self, id: &str) -> Result<bool> {
        self.route.peer_is_listener(id)
    }

    /// The path of `id`'s entry if it exists (no liveness check).
    pub fn peer_exists(&self, id: &str) -> Result<Option<String>> {
        self.route.peer_exists(id)
    }

    /// `id`'s pid (`Some(0)` without a pid file, `None` without an entry).
    pub fn peer_pid(&self, id: &str) -> Result<Option<u32>> {
        self.route.peer_pid(id)
    }

    /// Whether `id` runs (optionally waiting up to `timeout`).
    pub fn peer_active(&self, id: &str, timeout: Option<Duration>) -> Result<bool> {
        self.route.peer_active(id, timeout)
    }

    /// Reaps dead clients' leftovers; returns how many.
    pub fn peer_left(&self) -> Result<usize> {
        self.route.peer_left(Some(&self.disk))
    }

    /// Expiry time from a peer's `.suspend`, if any.
    pub fn peer_suspend_expires(&self, id: &str) -> Result<Option<f64>> {
        self.route.peer_suspend_expires(id)
    }

    // ----- connections ------------------------------------------------

    /// Whether a connection to `peer` is cached.
    pub fn has_connection(&self, peer: &str) -> bool {
        self.reactor.core().conn_for(peer).is_some()
    }

    /// Peers with a cached connection, sorted.
    pub fn connections(&self) -> Vec<String> {
        self.reactor.core().connections()
    }

    /// Closes the connection to `peer`; whether there was one.
    pub fn disconnect_connection(&mut self, peer: &str) -> bool {
        let had = self.reactor.core_mut().close_peer(peer);
        self.reactor.flush();
        had
    }

    /// The socket of the cached connection to `peer`.
    pub fn connection_handle(&self, peer: &str) -> Option<BorrowedFd<'_>> {
        let id = self.reactor.core().conn_for(peer)?;
        self.reactor.conn_fd(id)
    }

    /// Activity time (epoch seconds) of the connection to `peer`.
    ///
    /// On a shared-memory lane, messages stamp nothing as they pass (a
    /// clock read per message would be a fortieth of a round trip): the
    /// lane's periodic check stamps a connection whose rings moved
    /// (every [`crate::Options::lane_release_after`], 5 s by default), and
    /// this call and [`Client::close_idle_connections`] count a
    /// connection whose rings moved since as active now.
    pub fn last_activity(&self, peer: &str) -> Option<f64> {
        self.reactor.core().last_activity(peer)
    }

    /// Sets the activity time of the connection to `peer` (for idle
    /// policies driven from outside); whether there is one.
    pub fn set_last_activity(&mut self, peer: &str, at: f64) -> bool {
        self.reactor.core_mut().set_last_activity(peer, at)
    }

    /// Closes connections idle for more than `max_idle` seconds; returns
    /// how many.
    pub fn close_idle_connections(&mut self, max_idle: f64) -> usize {
        let n = self.reactor.core_mut().close_idle(max_idle);
        self.reactor.flush();
        n
    }

    /// The descriptor to poll for readability before `get_messages`
    /// (it covers the listening socket and every connection).
    pub fn handles_for_select(&self) -> BorrowedFd<'_> {
        self.reactor.pollable_fd()
    }

    /// Always true.
    pub fn have_handles_for_select(&self) -> bool {
        true
    }

    /// Always true, as in Perl: the handles change as connections come
    /// and go, so a poll set is built afresh before every wait. (ipcm's
    /// [`Client::handles_for_select`] is one descriptor whose readiness
    /// covers them all, so a set built once also stays right.)
    pub fn have_dynamic_handles_for_select(&self) -> bool {
        true
    }

    /// Perl's `listen` setter, which has no effect after construction:
    /// neither has this one ([`Client::listen`] keeps reporting how the
    /// client registered; choose with [`Options::listen`]).
    pub fn set_listen(&mut self, listen: bool) {
        let _ = listen;
    }

    /// Whether this client's `.resume` file exists (messages handed back
    /// with [`Client::requeue_message`] wait in it).
    pub fn have_resume_file(&self) -> bool {
        std::path::Path::new(&self.resume_file()).exists()
    }

    /// Takes the messages of this client's `.resume` file (it is removed),
    /// as the next receive would.
    pub fn read_resume_file(&mut self) -> Result<Vec<Message>> {
        self.resume_pending = self.have_resume_file();
        self.take_resumed()
    }

    /// `<route>/<on-disk name of id>.pid`.
    pub fn peer_pid_file(&self, id: &str) -> Result<String> {
        Ok(self
            .route
            .file(&format!("{}.pid", self.route.on_disk_name(id)?)))
    }

    /// `<route>/<on-disk name of id>.suspend`.
    pub fn peer_suspend_file(&self, id: &str) -> Result<String> {
        Ok(self
            .route
            .file(&format!("{}.suspend", self.route.on_disk_name(id)?)))
    }

    /// Writes this client's `.pid` file (its pid), as registration does.
    pub fn write_pid(&self) -> Result<()> {
        self.route.write_pid(&self.disk, self.pid)
    }

    /// Removes this client's `.pid` file (Perl's `clear_pid`). Peers then
    /// see it with pid 0 (not active); [`Client::write_pid`] writes it
    /// again.
    pub fn clear_pid(&self) -> Result<()> {
        match std::fs::remove_file(self.pidfile()) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(Error::io(format!("Cannot remove {}", self.pidfile()), e)),
        }
    }
}
