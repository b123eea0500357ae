//! ipcm: fast message passing between local processes, wire- and
//! disk-compatible with the Perl IPC::Manager `ConnectionUnix` client.
//!
//! Named clients share a *route* directory; each listening client owns a
//! UNIX stream socket there; clients connect to each other, say hello and
//! exchange length-prefixed messages. A Rust client and a Perl client on
//! the same route talk to each other without either noticing.
//!
//! ```
//! use std::time::Duration;
//! use ipcm::{Client, Options, Spawn, SpawnOptions};
//!
//! # let dir = tempfile::tempdir().unwrap();
//! # let opts = SpawnOptions { dir: Some(dir.path().into()), ..SpawnOptions::default() };
//! let spawn = Spawn::with_options(opts).unwrap();      // a fresh route
//! let info = spawn.info_string();                       // give this to other processes
//!
//! let mut server = Client::connect_info(&info, "server", Options::new()).unwrap();
//! let mut worker = Client::connect_info(&info, "worker", Options::new().listen(false)).unwrap();
//!
//! worker.send_message("server", &serde_json::json!({"job": 42})).unwrap();
//! let msgs = server.get_messages_timeout(Duration::from_secs(5)).unwrap();
//! assert_eq!(msgs[0].from(), "worker");
//! assert_eq!(msgs[0].content_value().unwrap()["job"], 42);
//!
//! // Replies travel back over the connection the worker opened.
//! server.send_message("worker", "done").unwrap();
//! let reply = worker.get_messages_timeout(Duration::from_secs(5)).unwrap();
//! assert_eq!(reply[0].content::<String>().unwrap(), "done");
//! ```
//!
//! The public API is what this page lists: [`Client`] and its
//! [`Options`], the threaded mode ([`Client::into_threaded`]: [`Sender`],
//! [`Receiver`], [`ReactorHandle`]), [`Spawn`] for creating a route,
//! [`Message`] (and the borrowed view of [`Client::receive`]:
//! [`Received`], [`MessageRef`]), [`Route`] and [`Info`] for the directory and its info
//! string, [`Serializer`], [`Stats`] and [`Error`].
//!
//! Inside, the layers run one way, bottom up: `wire` (framing, buffers),
//! `message`, `serializer` (envelopes), `proto` (the sans-IO protocol core,
//! fed bytes and time), `route` (the directory and its files), `reactor`
//! (the io_uring and epoll backends that drive the core), `client`, and
//! `threaded` and `spawn` on top. They are private; the benches, fuzz
//! targets and tests reach what they need of them through the hidden
//! `internals` module of the `unstable` feature, which makes no stability
//! promise.

#![deny(missing_docs)]
#![deny(unsafe_op_in_unsafe_fn)]
#![deny(clippy::undocumented_unsafe_blocks)]

#[cfg(feature = "tokio")]
pub mod aio;
mod backend_kind;
mod client;
mod error;
mod fork;
#[cfg(feature = "unstable")]
#[doc(hidden)]
pub mod fuzzing;
mod lane;
mod message;
mod proto;
mod reactor;
mod route;
mod serializer;
mod spawn;
mod sync;
mod threaded;
mod wire;

/// What the benches, fuzz targets and tests use of the internal layers
/// (feature `unstable`; no stability promise, not part of the API).
#[cfg(feature = "unstable")]
#[doc(hidden)]
pub mod internals {
    pub use crate::message::{new_message_id_bytes, next_stamp, now_stamp};
    pub use crate::proto::{Core, CoreConfig, DEFAULT_SOCKET_SEND_BUFFER};
    pub use crate::reactor::{Backend, Reactor, make_backend};
    pub use crate::spawn::sanity_delta;
    pub use crate::wire::{BufferPool, FrameDecoder, encode_frame};
}

#[cfg(all(test, ipcm_loom))]
mod loom_models;

/// The README's examples, compiled and run as doc tests.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;

pub use client::{BroadcastResult, Client, DisconnectHandler, Options, PATH_TYPE, Resources};
pub use error::{Error, Result};
pub use lane::LANE_ENV;
pub use message::{Message, sort_messages};
pub use proto::{IdText, Iter, LaneConfig, LaneKind, MessageRef, Received, Stats};
pub use reactor::{BACKEND_ENV, BackendChoice, BackendKind, Waker, io_uring_available};
pub use route::watch::{PEER_WATCH_ENV, PeerEvent, PeerWatch, RESCAN_INTERVAL, WatchMode};
pub use route::{EntryKind, Info, PidState, Route, max_on_disk_name_length, on_disk_name};
pub use serializer::Serializer;
pub use spawn::{Spawn, SpawnOptions};
pub use threaded::{PeerEvents, ReactorHandle, Receiver, Sender, ThreadedOptions};
