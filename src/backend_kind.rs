//! Which I/O backend a reactor runs on: the name the reactor reports and
//! the errors carry.

use std::fmt;

/// Which I/O backend a reactor runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum BackendKind {
    /// Readiness-based `epoll`, with completions emulated.
    Epoll,
    /// io_uring: native completions.
    IoUring,
}

impl fmt::Display for BackendKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            BackendKind::Epoll => "epoll",
            BackendKind::IoUring => "io_uring",
        })
    }
}
