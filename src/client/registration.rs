//! Joining a route and leaving it: registration and reconnection, the
//! listening socket or marker file, and the orderly shutdown.

use super::*;

impl Client {
    /// Registers `id` on the route of `info`: its socket (or marker file
    /// when not listening), `.pid` and, for a hashed name, `.name`.
    pub fn connect(info: &Info, id: &str, opts: Options) -> Result<Client> {
        Client::register(info, id, opts, false)
    }

    /// Parses `info` (an info string) and connects.
    pub fn connect_info(info: &str, id: &str, opts: Options) -> Result<Client> {
        Client::connect(&Info::parse(info)?, id, opts)
    }

    /// Takes over the id of a client that died: its
    /// `.stats` are loaded and its leftovers replaced by a fresh entry.
    ///
    /// Perl's reconnect leaves a dead socket behind; this one re-binds
    /// (docs/perl-differences.md, reconnect).
    pub fn reconnect(info: &Info, id: &str, opts: Options) -> Result<Client> {
        Client::register(info, id, opts, true)
    }

    pub(super) fn register(
        info: &Info,
        id: &str,
        opts: Options,
        reconnect: bool,
    ) -> Result<Client> {
        check_local_id(id)?;
        let route = Route::new(info.route.clone());
        let route_owner = check_route(&route, &opts)?;
        let serializer = info.serializer.clone();
        let disk = route.on_disk_name(id)?;
        let path = route.file(&disk);
        let mut stats = Stats::default();
        if reconnect {
            stats = route.read_stats(&disk, &serializer)?;
            if Route::check_path(&path).is_none() {
                return Err(Error::DoesNotExist { id: id.to_string() });
            }
            if let Some(pid) = route.read_pid(&disk)
                && pid_is_running(pid).is_alive()
            {
                return Err(Error::AlreadyRunning { pid });
            }
            let _ = fs::remove_file(&path);
        } else if fs::symlink_metadata(&path).is_ok() {
            match route.read_pid(&disk) {
                Some(pid) if !pid_is_running(pid).is_alive() => route.reap(&disk),
                _ => return Err(Error::AlreadyExists { id: id.to_string() }),
            }
        }

        let backend = make_backend(opts.backend).map_err(|e| Error::BackendUnavailable {
            backend: e.backend,
            reason: e.reason.into(),
        })?;
        let mut opts = opts;
        if opts.limits.lane.enabled && crate::lane::disabled_by_env() {
            opts.limits.lane.enabled = false;
        }
        if opts.listen
            && opts.limits.lane.enabled
            && let Err(e) = crate::lane::beacon::listen()
        {
            crate::lane::log_unavailable(&format!("cannot bind the lane beacon: {e}"));
        }
        let mut core = Core::new(serializer.clone(), opts.limits.clone());
        *core.stats_mut() = stats;
        core.set_local_id(id);
        let mut reactor = Reactor::new(core, backend);
        reactor.set_busy_poll(opts.busy_poll);
        reactor.set_spin_before_sleep(opts.spin_before_sleep);
        if !opts.allow_any_uid {
            let mut uids = vec![rustix::process::geteuid().as_raw()];
            uids.extend(route_owner);
            uids.extend(&opts.allow_uids);
            reactor.set_allowed_peer_uids(Some(uids));
        }

        // From here on, undo only what we created (docs/perl-differences.md,
        // failed-registration).
        if opts.listen {
            let fd = bind_listener(&path, opts.backlog)?;
            if let Err(e) = reactor.listen(fd) {
                let _ = fs::remove_file(&path);
                return Err(Error::io("Cannot watch the listen socket", e));
            }
        } else {
            OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
                .open(&path)
                .map_err(|e| Error::MarkerFile {
                    path: path.clone(),
                    err: e.into(),
                })?;
        }
        let pid = std::process::id();
        let route_has_resume = route.have_resume(&disk);
        let undo = |e: Error| {
            let _ = fs::remove_file(&path);
            e
        };
        if disk != id {
            route.write_name(&disk, id).map_err(undo)?;
        }
        route.write_pid(&disk, pid).map_err(undo)?;
        let _ = fs::remove_file(route.file(&format!("{disk}.suspend")));

        super::local_client_added(route.path(), id);
        Ok(Client {
            id: id.to_string(),
            disk,
            route,
            serializer,
            pid,
            listen: opts.listen,
            path,
            reactor,
            send_blocking: true,
            disconnected: false,
            opts,
            fork_generation: crate::fork::generation(),
            resume_pending: route_has_resume,
            sort_scratch: Default::default(),
            spare_entries: Vec::new(),
            send_cache: SendCache::default(),
            peer_change: std::cell::OnceCell::new(),
        })
    }

    // ----- shutdown ---------------------------------------------------

    /// Orderly shutdown: removes the entry, drains
    /// in-flight messages (to `handler`, or fails with `Messages waiting at
    /// disconnect for <id>`), flushes queued sends within the drain timeout,
    /// closes everything and writes `.stats`.
    pub fn disconnect(&mut self, mut handler: Option<DisconnectHandler<'_>>) -> Result<()> {
        self.pid_check()?;
        if self.disconnected {
            return Ok(());
        }
        if let Err(e) = fs::remove_file(&self.path)
            && e.kind() != io::ErrorKind::NotFound
        {
            log::warn!(
                "{}",
                Error::Unlink {
                    path: self.path.clone(),
                    err: e.into()
                }
            );
        }
        let deadline = Instant::now() + self.opts.drain_timeout;
        // Flush queued sends so peers get what was acknowledged
        // (docs/perl-differences.md, queued-bytes-at-disconnect).
        while self.have_pending_sends() && Instant::now() < deadline {
            let left = deadline.saturating_duration_since(Instant::now());
            let _ = self.reactor.turn(Some(left.min(Duration::from_millis(50))));
        }
        let mut failure = None;
        let mut quiet_rounds = 0;
        while quiet_rounds < 2 && Instant::now() < deadline {
            let msgs: Vec<Message> = self
                .get_messages()?
                .into_iter()
                .filter(|m| !m.is_terminate())
                .collect();
            if msgs.is_empty() {
                // Nothing readable now (Perl polls the handles with a zero
                // timeout too); a second look catches data behind an accept.
                quiet_rounds += 1;
                continue;
            }
            quiet_rounds = 0;
            match handler.as_mut() {
                Some(h) => h(self, msgs),
                None => {
                    let core = self.reactor.core_mut();
                    core.count_queued();
                    let read = &mut core.stats_mut().read;
                    for m in &msgs {
                        if let Some(n) = read.get_mut(m.from()) {
                            *n = n.saturating_sub(1);
                        }
                    }
                    failure = Some(Error::MessagesWaiting {
                        id: self.id.clone(),
                    });
                    break;
                }
            }
        }
        self.disconnected = true;
        super::local_client_gone(self.route.path(), &self.id);
        self.reactor.shutdown();
        if Path::new(&self.path).exists() {
            let _ = fs::remove_file(&self.path);
        }
        self.write_stats()?;
        match failure {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}

/// Refuses a route another user owns or others may write to (unless
/// trusted); returns its owner's uid.
pub(super) fn check_route(route: &Route, opts: &Options) -> Result<Option<u32>> {
    use std::os::unix::fs::MetadataExt;
    // A missing route fails later with the Perl error of bind/create.
    let Ok(meta) = fs::metadata(route.path()) else {
        return Ok(None);
    };
    if opts.trust_route {
        return Ok(Some(meta.uid()));
    }
    let me = rustix::process::geteuid().as_raw();
    let refuse = |reason: String| Error::InsecureRoute {
        route: route.path().to_string(),
        reason,
    };
    if !meta.is_dir() {
        return Err(refuse("it is not a directory".into()));
    }
    if meta.uid() != me {
        return Err(refuse(format!(
            "it is owned by uid {}, not by this user (uid {me})",
            meta.uid()
        )));
    }
    if meta.mode() & 0o022 != 0 {
        return Err(refuse(format!(
            "its mode {:04o} lets other users write to it (expected 0700)",
            meta.mode() & 0o7777
        )));
    }
    Ok(Some(meta.uid()))
}

/// Binds and listens on `path`. The socket is bound under a temporary
/// dot-name in the same directory (which peers skip) and renamed into place
/// once it listens, so that no peer ever finds the file of a socket that
/// would still refuse it. An existing entry at `path` fails as `bind` would
/// (`Address already in use`); where the rename cannot be done without
/// replacing (`RENAME_NOREPLACE` unsupported), the socket is bound in place.
pub(super) fn bind_listener(path: &str, backlog: i32) -> Result<OwnedFd> {
    let err = |e: rustix::io::Errno| Error::ListenSocket {
        path: path.to_string(),
        err: e.into(),
    };
    let socket = || {
        rustix::net::socket_with(
            AddressFamily::UNIX,
            SocketType::STREAM,
            SocketFlags::NONBLOCK | SocketFlags::CLOEXEC,
            None,
        )
        .map_err(err)
    };
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let dir = Path::new(path).parent().unwrap_or(Path::new("."));
    let tmp = dir.join(format!(
        ".ipcm-bind-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    ));
    if let (Ok(tmp_addr), Some(tmp_str)) = (SocketAddrUnix::new(&tmp), tmp.to_str()) {
        let fd = socket()?;
        if rustix::net::bind(&fd, &tmp_addr).is_ok() {
            let placed = rustix::net::listen(&fd, backlog).and_then(|()| {
                rustix::fs::renameat_with(
                    rustix::fs::CWD,
                    tmp_str,
                    rustix::fs::CWD,
                    path,
                    rustix::fs::RenameFlags::NOREPLACE,
                )
            });
            match placed {
                Ok(()) => return Ok(fd),
                Err(e) => {
                    let _ = fs::remove_file(&tmp);
                    match e {
                        rustix::io::Errno::EXIST => {
                            return Err(err(rustix::io::Errno::ADDRINUSE));
                        }
                        // No RENAME_NOREPLACE here: bind in place below.
                        rustix::io::Errno::INVAL | rustix::io::Errno::NOSYS => {}
                        e => return Err(err(e)),
                    }
                }
            }
        }
    }
    let fd = socket()?;
    let addr = SocketAddrUnix::new(path).map_err(err)?;
    rustix::net::bind(&fd, &addr).map_err(err)?;
    if let Err(e) = rustix::net::listen(&fd, backlog) {
        let _ = fs::remove_file(path);
        return Err(err(e));
    }
    Ok(fd)
}

/// Connects to a peer's socket. A full backlog (`EAGAIN` on a non-blocking
/// UNIX socket) is retried until `timeout`; other failures are final.
pub(super) fn connect_socket(path: &str, timeout: Duration) -> Result<OwnedFd> {
    let err = |e: rustix::io::Errno| Error::Connect {
        path: path.to_string(),
        err: e.into(),
    };
    let fd = rustix::net::socket_with(
        AddressFamily::UNIX,
        SocketType::STREAM,
        SocketFlags::NONBLOCK | SocketFlags::CLOEXEC,
        None,
    )
    .map_err(err)?;
    let addr = SocketAddrUnix::new(path).map_err(err)?;
    let start = Instant::now();
    loop {
        match rustix::net::connect(&fd, &addr) {
            Ok(()) => return Ok(fd),
            Err(rustix::io::Errno::INTR) => continue,
            Err(rustix::io::Errno::AGAIN) if since(start) < timeout.as_secs_f64() => {
                std::thread::sleep(Duration::from_millis(1));
            }

            Err(e) => return Err(err(e)),
        }
    }
}
