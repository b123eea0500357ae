//! The atomics of ipcm's hand-written synchronisation protocols (the
//! reactor's [`WakeFlags`](crate::reactor::WakeFlags) and the threaded
//! mode's [`RingGate`](crate::threaded::RingGate) and
//! [`CloseGate`](crate::threaded::CloseGate)): std's, or loom's when
//! the loom models are built (`RUSTFLAGS="--cfg ipcm_loom"`, see
//! `src/loom_models.rs`).

#[cfg(ipcm_loom)]
pub(crate) use loom::sync::atomic::{AtomicU8, AtomicUsize, Ordering};
#[cfg(ipcm_loom)]
pub(crate) use loom::thread::yield_now;
#[cfg(not(ipcm_loom))]
pub(crate) use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};
#[cfg(not(ipcm_loom))]
pub(crate) use std::thread::yield_now;
