//! The one error type of the crate, with the Perl client's error texts
//! word for word (Perl users match on them).
//!
//! Texts that Perl users match on are reproduced exactly (without Perl's
//! ` at FILE line N.` suffix). Operating-system errors are rendered the way
//! Perl's `$!` renders them: the plain `strerror` text, no `(os error N)`.

use std::fmt;
use std::io;

/// Result alias used throughout the crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// An operating-system error shown as its `strerror` text (as Perl's `$!`).
#[derive(Debug)]
pub struct SysError(pub io::Error);

impl SysError {
    /// The error number, when the error came from the operating system.
    pub fn raw_os_error(&self) -> Option<i32> {
        self.0.raw_os_error()
    }

    /// The kind of the underlying I/O error.
    pub fn kind(&self) -> io::ErrorKind {
        self.0.kind()
    }
}

impl fmt::Display for SysError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&strerror(&self.0))
    }
}

impl From<io::Error> for SysError {
    fn from(e: io::Error) -> Self {
        SysError(e)
    }
}

impl From<rustix::io::Errno> for SysError {
    fn from(e: rustix::io::Errno) -> Self {
        SysError(e.into())
    }
}

/// Renders an I/O error as Perl's `$!` would: `Connection refused`, not
/// `Connection refused (os error 111)`.
pub fn strerror(e: &io::Error) -> String {
    let text = e.to_string();
    match text.rfind(" (os error ") {
        Some(pos) if text.ends_with(')') => text[..pos].to_string(),
        _ => text,
    }
}

/// Everything that can go wrong in ipcm.
///
/// Variants whose text comes from the Perl client keep that text exactly; the
/// rest are ipcm's own and say what to do.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The client id is missing.
    #[error("'id' is a required attribute")]
    IdRequired,
    /// The client id starts with the reserved `_`.
    #[error("'id' may not begin with an underscore")]
    IdUnderscore,
    /// An id that ipcm refuses for a local client (docs/perl-differences.md,
    /// odd-ids and non-ascii-ids).
    #[error("'id' {id:?} cannot be used by a local client: {reason}")]
    IdUnusable {
        /// The refused id.
        id: String,
        /// Why it is refused.
        reason: &'static str,
    },
    /// The info string has no serializer.
    #[error("'serializer' is a required attribute")]
    SerializerRequired,
    /// The info string has no route.
    #[error("'route' is a required attribute")]
    RouteRequired,
    /// The spawner's sanity check found sent and read counts that differ.
    #[error("\nMessages sent vs received mismatch:\n{report}")]
    StatsMismatch {
        /// One line per mismatched pair.
        report: String,
    },
    /// An empty peer id was given to the name mapping.
    #[error("peer_id is required")]
    PeerIdRequired,
    /// An empty peer id was given to `peer_exists` and friends.
    #[error("'peer_id' is required")]
    PeerIdRequiredQuoted,
    /// The hashed on-disk name does not fit the route's budget.
    #[error(
        "Cannot map peer id '{id}' to on-disk name: hashed form (42 bytes) exceeds available budget ({max} bytes) under route '{route}'"
    )]
    NameBudget {
        /// The id that needed hashing.
        id: String,
        /// The budget of the route (may be negative).
        max: i64,
        /// The route string.
        route: String,
    },
    /// Registration found a live (or pid-less) entry with the same id.
    #[error("{id} UNIX Socket or marker file already exists")]
    AlreadyExists {
        /// The id being registered.
        id: String,
    },
    /// Reconnect found no entry for the id.
    #[error("{id} UNIX Socket or marker file does not exist")]
    DoesNotExist {
        /// The id being reconnected.
        id: String,
    },
    /// Reconnect found the id owned by a running process.
    #[error("Looks like the connection is already running in pid {pid}")]
    AlreadyRunning {
        /// The owner's pid.
        pid: u32,
    },
    /// Binding or listening on the client's socket failed.
    #[error("Cannot create listen socket '{path}': {err}")]
    ListenSocket {
        /// Socket path.
        path: String,
        /// Cause.
        err: SysError,
    },
    /// Creating a non-listener's marker file failed.
    #[error("Cannot create marker file '{path}': {err}")]
    MarkerFile {
        /// Marker path.
        path: String,
        /// Cause.
        err: SysError,
    },
    /// Opening `<name>.pid.pend` failed.
    #[error("Could not open pidfile '{path}': {err}")]
    PidFileOpen {
        /// The `.pend` path.
        path: String,
        /// Cause.
        err: SysError,
    },
    /// Renaming `<name>.pid.pend` failed.
    #[error("Could not rename file '{from}' -> '{to}': {err}")]
    PidFileRename {
        /// The `.pend` path.
        from: String,
        /// The pid file.
        to: String,
        /// Cause.
        err: SysError,
    },
    /// Opening `<name>.name.pend` failed.
    #[error("Could not open name file '{path}': {err}")]
    NameFileOpen {
        /// The `.pend` path.
        path: String,
        /// Cause.
        err: SysError,
    },
    /// Renaming `<name>.name.pend` failed.
    #[error("Could not rename '{from}' -> '{to}': {err}")]
    NameFileRename {
        /// The `.pend` path.
        from: String,
        /// The name file.
        to: String,
        /// Cause.
        err: SysError,
    },
    /// Writing `.stats` failed while the route exists.
    #[error("Could not open stats file ({path}): {err}")]
    StatsFileWrite {
        /// The stats file.
        path: String,
        /// Cause.
        err: SysError,
    },
    /// Reading `.stats` failed.
    #[error("Could not open stats file: {err}")]
    StatsFileRead {
        /// Cause.
        err: SysError,
    },
    /// Opening `.resume` for append failed.
    #[error("Could not open resume file: {err}")]
    ResumeFileOpen {
        /// Cause.
        err: SysError,
    },
    /// A `.resume` record header was cut short.
    #[error("Truncated resume file header (got {got} bytes)")]
    ResumeHeader {
        /// Bytes present.
        got: usize,
    },
    /// A `.resume` record payload was cut short.
    #[error("Truncated resume file payload (wanted {wanted}, got {got})")]
    ResumePayload {
        /// Length announced.
        wanted: usize,
        /// Bytes present.
        got: usize,
    },
    /// Deleting a consumed `.resume` failed.
    #[error("Could not unlink resume file")]
    ResumeUnlink,
    /// Messages arrived during disconnect and no handler took them.
    #[error("Messages waiting at disconnect for {id}")]
    MessagesWaiting {
        /// The disconnecting client's id.
        id: String,
    },
    /// The client was used from a process other than the one that made it.
    #[error("Client used from wrong PID")]
    WrongPid,
    /// `suspend` is not supported by this transport.
    #[error("suspend is not supported by the ConnectionUnix driver")]
    SuspendUnsupported,
    /// A message without a sender.
    #[error("'from' is a required attribute")]
    FromRequired,
    /// A message without content (or with `null` content).
    #[error("'content' is a required attribute")]
    ContentRequired,
    /// A message with neither `to` nor `broadcast`.
    #[error("Message must either have a 'to' or 'broadcast' attribute")]
    ToOrBroadcast,
    /// A send without a recipient.
    #[error("No peer specified")]
    NoPeer,
    /// The recipient has no entry on the route.
    #[error("'{id}' is not a valid message recipient")]
    NotRecipient {
        /// The recipient id.
        id: String,
    },
    /// The recipient's entry is not a socket.
    #[error("'{id}' is not listening")]
    NotListening {
        /// The recipient id.
        id: String,
    },
    /// The recipient is a non-listener and no connection to it is cached.
    #[error("no active connection to '{id}' and peer is not listening")]
    NoActiveConnection {
        /// The recipient id.
        id: String,
    },
    /// Connecting to a peer's socket failed.
    #[error("Cannot connect to '{path}': {err}")]
    Connect {
        /// The peer's socket path.
        path: String,
        /// Cause.
        err: SysError,
    },
    /// Writing to a connection failed; the connection was dropped.
    #[error("write failed: {err}")]
    Write {
        /// Cause.
        err: SysError,
    },
    /// Listing the route directory failed.
    #[error("Could not open dir: {err}")]
    OpenDir {
        /// Cause.
        err: SysError,
    },
    /// Unlinking a client's entry failed.
    #[error("Could not unlink '{path}': {err}")]
    Unlink {
        /// The path.
        path: String,
        /// Cause.
        err: SysError,
    },
    /// The bounded outbox of a connection has no room for the frame.
    #[error(
        "outbox to '{peer}' is full ({queued} bytes queued, limit {limit}): drain_pending() once the peer reads, or raise Options::outbox_limit"
    )]
    WouldBlock {
        /// The recipient id.
        peer: String,
        /// Bytes already queued.
        queued: usize,
        /// The configured limit.
        limit: usize,
    },
    /// A frame larger than the configured maximum.
    #[error("frame of {len} bytes exceeds the maximum frame size of {max} bytes")]
    FrameTooLarge {
        /// Frame payload length.
        len: usize,
        /// Configured maximum.
        max: usize,
    },
    /// The info string could not be parsed.
    #[error("invalid info string: {0}")]
    InfoString(String),
    /// The info string names a protocol ipcm does not speak.
    #[error("unsupported protocol '{0}': ipcm speaks IPC::Manager::Client::ConnectionUnix")]
    UnsupportedProtocol(String),
    /// The info string names a serializer ipcm does not implement.
    #[error("unsupported serializer '{0}'")]
    UnsupportedSerializer(String),
    /// A payload could not be serialized or deserialized.
    #[error("{0}")]
    Serialize(String),
    /// A threaded [`Sender::try_send`](crate::Sender::try_send) to `peer`
    /// failed after it returned; the next call for that peer reports it,
    /// with the text the inline send would have given.
    #[error("{text}")]
    DeferredSend {
        /// The peer the earlier message was for.
        peer: String,
        /// The failure, as the inline API words it.
        text: String,
    },
    /// The threaded mode's reactor thread panicked.
    #[error("the reactor thread panicked")]
    ReactorPanicked,
    /// The route directory fails the ownership or permission check.
    #[error("refusing route '{route}': {reason} (set Options::trust_route to use it anyway)")]
    InsecureRoute {
        /// The route.
        route: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The I/O backend asked for cannot run here.
    #[error("the {backend} backend is unavailable: {reason}")]
    BackendUnavailable {
        /// The backend asked for.
        backend: crate::backend_kind::BackendKind,
        /// Why.
        reason: SysError,
    },
    /// A wait ran out of time.
    #[error("timed out after {secs:.3}s waiting for {what}")]
    Timeout {
        /// What was awaited.
        what: &'static str,
        /// The timeout in seconds.
        secs: f64,
    },
    /// Descriptors go only to an ipcm peer whose process takes them (see
    /// [`Client::send_message_with_fds`](crate::Client::send_message_with_fds)).
    #[error("cannot pass descriptors to '{peer}': {why}")]
    NoLane {
        /// The peer.
        peer: String,
        /// What is missing.
        why: String,
    },
    /// The client has already disconnected.
    #[error("client '{id}' is disconnected")]
    Disconnected {
        /// The client id.
        id: String,
    },
    /// Any other I/O failure, with what was being done.
    #[error("{context}: {err}")]
    Io {
        /// What was being done.
        context: String,
        /// Cause.
        err: SysError,
    },
}

impl Error {
    /// Wraps an I/O error with a short description of what was being done.
    pub fn io(context: impl Into<String>, err: impl Into<SysError>) -> Self {
        Error::Io {
            context: context.into(),
            err: err.into(),
        }
    }
}

impl From<serde_json::Error> for Error {
    fn from(e: serde_json::Error) -> Self {
        Error::Serialize(e.to_string())
    }
}

impl From<crate::wire::FrameError> for Error {
    fn from(e: crate::wire::FrameError) -> Self {
        match e {
            crate::wire::FrameError::TooLarge { len, max } => Error::FrameTooLarge { len, max },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strerror_drops_rust_suffix() {
        let e = io::Error::from_raw_os_error(libc::ECONNREFUSED);
        assert_eq!(strerror(&e), "Connection refused");
        let e = io::Error::from_raw_os_error(libc::EPIPE);
        assert_eq!(
            Error::Write { err: e.into() }.to_string(),
            "write failed: Broken pipe"
        );
    }

    #[test]
    fn protocol_texts_are_exact() {
        let e = Error::NameBudget {
            id: "x".into(),
            max: 27,
            route: "/r".into(),
        };
        assert_eq!(
            e.to_string(),
            "Cannot map peer id 'x' to on-disk name: hashed form (42 bytes) exceeds available budget (27 bytes) under route '/r'"
        );
        assert_eq!(
            Error::AlreadyExists { id: "foo".into() }.to_string(),
            "foo UNIX Socket or marker file already exists"
        );
        assert_eq!(
            Error::NoActiveConnection { id: "b".into() }.to_string(),
            "no active connection to 'b' and peer is not listening"
        );
    }
}
