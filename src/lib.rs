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
//! Layers, bottom up: [`wire`] (framing, buffers), [`serializer`] and
//! [`message`] (envelopes), [`proto`] (the sans-IO protocol core),
//! [`reactor`] (the backends that drive it), [`route`] (the directory and
//! its files), [`Client`] and [`Spawn`] (the API).

#![deny(missing_docs)]
#![deny(unsafe_op_in_unsafe_fn)]
#![deny(clippy::undocumented_unsafe_blocks)]

mod backend_kind;
pub mod client;
pub mod error;
mod fork;
#[doc(hidden)]
pub mod fuzzing;
pub mod message;
pub mod proto;
pub mod reactor;
pub mod route;
pub mod serializer;
pub mod spawn;
mod sync;
pub mod threaded;
pub mod wire;

#[cfg(all(test, ipcm_loom))]
mod loom_models;

/// The README's examples, compiled and run as doc tests.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;

pub use client::{BroadcastResult, Client, Options, Resources};
pub use error::{Error, Result};
pub use message::Message;
pub use proto::Stats;
pub use reactor::{BackendChoice, BackendKind};
pub use route::{Info, Route};
pub use serializer::Serializer;
pub use spawn::{Spawn, SpawnOptions};
pub use threaded::{ReactorHandle, Receiver, Sender, ThreadedOptions};
