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
        }
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

    /// Every client's `.stats` on the route.
    pub fn all_stats(&self) -> Result<BTreeMap<String, Stats>> {
        self.route.all_stats(&self.serializer)
    }

    /// Fails with `Client used from wrong PID` in another process.
    pub fn pid_check(&self) -> Result<()> {
        if crate::fork::generation() != self.fork_generation {
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
}
