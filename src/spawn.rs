//! The spawn guard: creates a route, hands out its info string, and on
//! shutdown (or drop) broadcasts `terminate`, waits for the clients to leave
//! and removes the route.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use crate::client::{BroadcastResult, Client, Options};
use crate::error::Result;
use crate::route::{Info, Route};
use crate::serializer::Serializer;

/// Settings of a spawned route.
#[derive(Debug, Clone)]
pub struct SpawnOptions {
    /// Parent directory (default `$TMPDIR` or `/tmp`).
    pub dir: Option<PathBuf>,
    /// The route serializer.
    pub serializer: Serializer,
    /// How long shutdown waits for clients to leave (default: the
    /// `IPC_MANAGER_SPAWN_PEER_TIMEOUT` environment variable, else 60 s).
    pub peer_timeout: Duration,
    /// A signal sent to every peer's pid before the terminate broadcast.
    pub signal: Option<rustix::process::Signal>,
    /// Whether dropping the guard shuts the route down (default true).
    pub guard: bool,
}

impl Default for SpawnOptions {
    fn default() -> Self {
        let secs = std::env::var("IPC_MANAGER_SPAWN_PEER_TIMEOUT")
            .ok()
            .and_then(|v| v.trim().parse::<f64>().ok())
            .filter(|v| *v >= 0.0)
            .unwrap_or(60.0);
        SpawnOptions {
            dir: None,
            serializer: Serializer::Json,
            peer_timeout: Duration::from_secs_f64(secs),
            signal: None,
            guard: true,
        }
    }
}

/// Owner of a route: created with it, removes it when done.
///
/// Non-listening clients cannot receive the terminate broadcast
/// (docs/perl-differences.md, terminate-non-listeners); stop
/// them with [`SpawnOptions::signal`] or your own logic.
#[derive(Debug)]
pub struct Spawn {
    route: Route,
    opts: SpawnOptions,
    pid: u32,
    done: bool,
}

impl Spawn {
    /// Creates a route with default settings.
    pub fn new() -> Result<Self> {
        Spawn::with_options(SpawnOptions::default())
    }

    /// Creates a route.
    pub fn with_options(opts: SpawnOptions) -> Result<Self> {
        let route = Route::spawn(opts.dir.as_deref())?;
        Ok(Spawn {
            route,
            opts,
            pid: std::process::id(),
            done: false,
        })
    }

    /// The route.
    pub fn route(&self) -> &Route {
        &self.route
    }

    /// The info string, parsed.
    pub fn info(&self) -> Info {
        Info::new(self.opts.serializer.clone(), self.route.path())
    }

    /// The info string, as other processes take it.
    pub fn info_string(&self) -> String {
        self.info().to_info_string()
    }

    /// Connects a listening client `id` to the route.
    pub fn connect(&self, id: &str) -> Result<Client> {
        Client::connect(&self.info(), id, Options::new())
    }

    /// Signals peers (if configured) and broadcasts `{"terminate":1}` from
    /// a client named `spawn`.
    pub fn terminate(&self) -> Result<BTreeMap<String, BroadcastResult>> {
        let mut con = self.connect("spawn")?;
        let res = self.terminate_with(&mut con);
        let _ = con.disconnect(None);
        res
    }

    fn terminate_with(&self, con: &mut Client) -> Result<BTreeMap<String, BroadcastResult>> {
        if let Some(sig) = self.opts.signal {
            for peer in con.peers()? {
                if let Some(pid) = con.peer_pid(&peer)?
                    && pid != 0
                    && pid != std::process::id()
                    && let Some(p) = rustix::process::Pid::from_raw(pid as i32)
                {
                    let _ = rustix::process::kill_process(p, sig);
                }
            }
        }
        con.broadcast(&serde_json::json!({"terminate": 1}))
    }

    /// Terminates the clients, waits (up to the peer timeout) for them to
    /// leave and removes the route. Returns the ids that did not leave.
    pub fn shutdown(mut self) -> Result<Vec<String>> {
        self.shutdown_inner()
    }

    fn shutdown_inner(&mut self) -> Result<Vec<String>> {
        if self.done {
            return Ok(Vec::new());
        }
        self.done = true;
        let mut con = self.connect("spawn")?;
        let _ = self.terminate_with(&mut con);
        let deadline = Instant::now() + self.opts.peer_timeout;
        // Woken by the peers leaving (the route's changes, and their pidfds
        // for those that die), not by a poll tick.
        let mut watch = con.peer_watch().ok();
        let mut left = con.peers()?;
        while !left.is_empty() && Instant::now() < deadline {
            let wait = deadline
                .saturating_duration_since(Instant::now())
                .min(Duration::from_millis(250));
            match &mut watch {
                Some(w) => {
                    let _ = w.next_event(Some(wait));
                }
                None => std::thread::sleep(wait.min(Duration::from_millis(50))),
            }
            let _ = con.get_messages();
            left = con.peers()?;
        }
        if !left.is_empty() {
            log::warn!(
                "IPC::Manager::Spawn: gave up waiting for clients to disconnect after {}s: {}",
                self.opts.peer_timeout.as_secs(),
                left.join(", ")
            );
        }
        let _ = con.disconnect(None);
        self.route.unspawn()?;
        Ok(left)
    }

    /// Compares every client's `.stats`: for each ordered pair, messages
    /// sent must equal messages read. Fails with the Perl report text.
    pub fn sanity_check(&self) -> Result<()> {
        let all = self.route.all_stats(&self.opts.serializer)?;
        let report = sanity_delta(&all);
        if report.is_empty() {
            return Ok(());
        }
        Err(crate::Error::StatsMismatch { report })
    }

    /// Removes the route directory now, without terminating anyone.
    pub fn unspawn(mut self) -> Result<()> {
        self.done = true;
        self.route.unspawn()
    }
}

/// One line per ordered pair whose sent and read counts differ.
pub fn sanity_delta(all: &BTreeMap<String, crate::proto::Stats>) -> String {
    let mut pairs: BTreeMap<(&str, &str), (u64, u64)> = BTreeMap::new();
    for (id, stats) in all {
        for (to, n) in &stats.sent {
            pairs.entry((id.as_str(), to.as_str())).or_default().0 += n;
        }
        for (from, n) in &stats.read {
            pairs.entry((from.as_str(), id.as_str())).or_default().1 += n;
        }
    }
    let mut report = String::new();
    for ((from, to), (sent, read)) in pairs {
        if sent != read {
            report.push_str(&format!("  {from} -> {to}: sent {sent}, read {read}\n"));
        }
    }
    report
}

impl Drop for Spawn {
    fn drop(&mut self) {
        if self.done || !self.opts.guard || std::process::id() != self.pid {
            return;
        }
        if let Err(e) = self.shutdown_inner() {
            log::warn!("IPC::Manager::Spawn: shutdown failed: {e}");
            let _ = self.route.unspawn();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::Stats;

    #[test]
    fn sanity_delta_reports_only_mismatches() {
        let mut all = BTreeMap::new();
        let mut a = Stats::default();
        a.sent.insert("b".into(), 3);
        a.read.insert("b".into(), 1);
        let mut b = Stats::default();
        b.read.insert("a".into(), 2);
        b.sent.insert("a".into(), 1);
        all.insert("a".to_string(), a);
        all.insert("b".to_string(), b);
        assert_eq!(sanity_delta(&all), "  a -> b: sent 3, read 2\n");
        let err = crate::Error::StatsMismatch {
            report: sanity_delta(&all),
        };
        assert!(
            err.to_string()
                .starts_with("\nMessages sent vs received mismatch:\n")
        );
    }
}
