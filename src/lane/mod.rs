//! The shared-memory lane between ipcm peers (in progress): its memory
//! and rings.
//!
//! Built so far: the ring of records ([`ring`]) with its checks against a
//! hostile peer, its tests and its fuzz target; the sealed memfd that
//! holds two of them ([`shm`]); and passing a descriptor over the socket
//! ([`pass`]). The negotiation after the hello, the wake-ups and the
//! wiring into the reactor are not built yet, so no connection uses the
//! lane.

pub(crate) mod pass;
pub(crate) mod ring;
pub(crate) mod shm;
