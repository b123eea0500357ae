//! The shared-memory lane between ipcm peers (in progress): its rings.
//!
//! So far only the ring of records ([`ring`]) exists, with its checks
//! against a hostile peer, its tests and its fuzz target; the negotiation
//! after the hello, the memfd, the wake-ups and the wiring into the
//! reactor are not built yet, so nothing in a connection uses it.

pub(crate) mod ring;
