//! The client: one named participant of a route, with the API of the Perl
//! ConnectionUnix client under its names, running its reactor
//! inline inside its own calls.

use std::collections::BTreeMap;
use std::fs::{self, OpenOptions};
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use rustix::net::{AddressFamily, SocketAddrUnix, SocketFlags, SocketType};
use serde::Serialize;

use crate::error::{Error, Result};
use crate::message::{Message, sort_messages_with};
use crate::proto::Stats;
use crate::proto::{Append, ConnId, Core, CoreConfig, Enqueue, LaneKind};
use crate::reactor::{BackendChoice, BackendKind, Reactor, make_backend};
use crate::route::{EntryKind, Info, PidState, Route, names::check_local_id, pid_is_running};
use crate::serializer::{Content, Outgoing, Serializer};
use crate::wire::encode_frame;

/// The Perl `path_type` of this transport.
pub const PATH_TYPE: &str = "UNIX Socket or marker file";

mod compat;
mod driver;
mod options;
mod receive;
mod registration;
mod send;

pub use options::{BroadcastResult, DisconnectHandler, Options, Resources};
use registration::connect_socket;

/// A client of a route.
///
/// ```
/// use ipcm::{Client, Info, Options, Route, Serializer};
/// # let dir = tempfile::tempdir().unwrap();
/// let route = Route::spawn(Some(dir.path())).unwrap();
/// let info = Info::new(Serializer::Json, route.path());
/// let mut a = Client::connect(&info, "a", Options::new()).unwrap();
/// let mut b = Client::connect(&info, "b", Options::new()).unwrap();
/// a.send_message("b", &serde_json::json!({"hello": "world"})).unwrap();
/// let msgs = b.get_messages_timeout(std::time::Duration::from_secs(5)).unwrap();
/// assert_eq!(msgs[0].from(), "a");
/// assert_eq!(msgs[0].content_json(), r#"{"hello":"world"}"#);
/// ```
#[derive(Debug)]
pub struct Client {
    id: String,
    disk: String,
    route: Route,
    serializer: Serializer,
    pid: u32,
    listen: bool,
    path: String,
    reactor: Reactor,
    send_blocking: bool,
    disconnected: bool,
    opts: Options,
    /// Fork generation at creation (see [`Client::pid_check`]).
    fork_generation: u64,
    /// Whether `<name>.resume` may exist (set at connect and by
    /// `requeue_message`; only this client writes it).
    resume_pending: bool,
    /// Scratch of the batch sort (kept to receive without allocating).
    sort_scratch: crate::message::SortScratch,
    /// The entry vector [`Client::receive`] lends out, kept to receive
    /// without allocating.
    spare_entries: Vec<crate::proto::Entry>,
    /// The connection of the last peer sent to.
    send_cache: SendCache,
    /// The Perl-named peer-change handle (an inotify watch of the route
    /// for created entries), made on first use.
    peer_change: std::cell::OnceCell<Option<std::os::fd::OwnedFd>>,
}

/// The last peer sent to and its connection, valid while the core's
/// [`Core::peers_epoch`] stays what it was (a send to the same peer as the
/// last one skips the hash lookup).
#[derive(Debug, Default)]
struct SendCache {
    peer: String,
    conn: Option<(ConnId, u64)>,
}

impl SendCache {
    fn remember(&mut self, peer: &str, id: ConnId, epoch: u64) {
        self.peer.clear();
        self.peer.push_str(peer);
        self.conn = Some((id, epoch));
    }
}

fn since(t: Instant) -> f64 {
    t.elapsed().as_secs_f64()
}

impl AsFd for Client {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.reactor.pollable_fd()
    }
}

/// The clients created in this process, by route path (Perl's
/// `local_clients`), with the fork generation they belong to: a forked
/// child starts with none.
static LOCAL_CLIENTS: std::sync::Mutex<(u64, LocalClients)> =
    std::sync::Mutex::new((0, BTreeMap::new()));

/// Client ids by route path.
type LocalClients = BTreeMap<String, std::collections::BTreeSet<String>>;

fn local_clients_table<R>(f: impl FnOnce(&mut LocalClients) -> R) -> R {
    let mut g = LOCAL_CLIENTS.lock().unwrap_or_else(|p| p.into_inner());
    let generation = crate::fork::generation();
    if g.0 != generation {
        *g = (generation, BTreeMap::new());
    }
    f(&mut g.1)
}

pub(crate) fn local_client_added(route: &str, id: &str) {
    local_clients_table(|t| {
        t.entry(route.to_string())
            .or_default()
            .insert(id.to_string());
    });
}

pub(crate) fn local_client_gone(route: &str, id: &str) {
    local_clients_table(|t| {
        if let Some(ids) = t.get_mut(route) {
            ids.remove(id);
            if ids.is_empty() {
                t.remove(route);
            }
        }
    });
}

impl Client {
    /// The ids of the clients of `route` created in this process and not
    /// yet disconnected, sorted (reset in a forked child), as Perl's
    /// `local_clients`.
    pub fn local_clients(route: &str) -> Vec<String> {
        local_clients_table(|t| {
            t.get(route)
                .map(|ids| ids.iter().cloned().collect())
                .unwrap_or_default()
        })
    }

    /// Whether this transport can be used here (UNIX stream sockets):
    /// always true on Linux, the only platform ipcm builds for. Never
    /// fails.
    pub fn viable() -> bool {
        cfg!(target_os = "linux")
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        if self.disconnected || crate::fork::generation() != self.fork_generation {
            return;
        }
        if let Err(e) = self.disconnect(None) {
            log::warn!(
                "ConnectionUnix: disconnect of '{}' during drop failed: {e}",
                self.id
            );
            if !self.disconnected {
                let _ = self.write_stats();
            }
        }
    }
}
