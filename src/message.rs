//! The message envelope: `from`, `to`, `content`, `id`, `stamp`,
//! `stamp_ord`, `broadcast` and any extra keys a peer added.
//!
//! A received [`Message`] is a set of slices of the frame it arrived in:
//! nothing is copied, and `content` stays raw JSON text until the caller asks
//! for it as a [`serde_json::Value`] or any `Deserialize` type.

use std::cmp::Ordering;
use std::fmt;
use std::ops::Deref;
use std::sync::Mutex;

use bytes::Bytes;
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::value::RawValue;

use crate::error::{Error, Result};

/// Immutable UTF-8 text sharing a [`Bytes`] buffer (a slice of a frame).
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Default)]
pub struct ByteStr(Bytes);

// Hash as `str` does, so that maps keyed by `ByteStr` can be queried with
// `&str` (required by the `Borrow<str>` contract).
impl std::hash::Hash for ByteStr {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.as_str().hash(state)
    }
}

impl std::borrow::Borrow<str> for ByteStr {
    fn borrow(&self) -> &str {
        self.as_str()
    }
}

impl ByteStr {
    /// Copies `s` into a new buffer.
    pub fn copy_from(s: &str) -> Self {
        ByteStr(Bytes::copy_from_slice(s.as_bytes()))
    }

    /// Takes ownership of a `String` without copying.
    pub fn from_string(s: String) -> Self {
        ByteStr(Bytes::from(s))
    }

    /// The slice `sub` of `whole`, which must lie inside `buf`'s bytes.
    pub(crate) fn slice_of(buf: &Bytes, sub: &str) -> Self {
        ByteStr(buf.slice_ref(sub.as_bytes()))
    }

    /// The text.
    pub fn as_str(&self) -> &str {
        // SAFETY: every constructor takes its bytes from a `&str` or a
        // `String`, so they are valid UTF-8, and `Bytes` is immutable.
        unsafe { std::str::from_utf8_unchecked(&self.0) }
    }

    /// The underlying bytes.
    pub fn as_bytes(&self) -> &Bytes {
        &self.0
    }
}

impl Deref for ByteStr {
    type Target = str;
    fn deref(&self) -> &str {
        self.as_str()
    }
}

impl fmt::Debug for ByteStr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self.as_str(), f)
    }
}

impl fmt::Display for ByteStr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl From<&str> for ByteStr {
    fn from(s: &str) -> Self {
        ByteStr::copy_from(s)
    }
}

impl PartialEq<str> for ByteStr {
    fn eq(&self, other: &str) -> bool {
        self.as_str() == other
    }
}

impl PartialEq<&str> for ByteStr {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

/// Longest peer name kept inline in a [`Name`] (a `Name` is then as
/// small as a `ByteStr`).
const NAME_INLINE: usize = 22;

/// A peer name inside a message. Short names (nearly all) are kept inline:
/// a received message then holds one reference to its frame (through the
/// content) instead of three, and copying a name touches no shared counter.
#[derive(Clone)]
pub(crate) enum Name {
    Inline(u8, [u8; NAME_INLINE]),
    Shared(ByteStr),
}

impl Name {
    /// `s`, inline if short enough, else copied into its own buffer.
    pub(crate) fn copy_from(s: &str) -> Self {
        Self::inline(s).unwrap_or_else(|| Name::Shared(ByteStr::copy_from(s)))
    }

    /// `sub` (which lies inside `buf`), inline if short enough, else a
    /// slice of `buf`.
    pub(crate) fn slice_of(buf: &Bytes, sub: &str) -> Self {
        Self::inline(sub).unwrap_or_else(|| Name::Shared(ByteStr::slice_of(buf, sub)))
    }

    /// `s`, inline if short enough.
    pub(crate) fn from_byte_str(s: ByteStr) -> Self {
        Self::inline(&s).unwrap_or(Name::Shared(s))
    }

    fn inline(s: &str) -> Option<Self> {
        (s.len() <= NAME_INLINE).then(|| {
            let mut b = [0u8; NAME_INLINE];
            b[..s.len()].copy_from_slice(s.as_bytes());
            Name::Inline(s.len() as u8, b)
        })
    }

    /// The text.
    pub(crate) fn as_str(&self) -> &str {
        match self {
            // SAFETY: the first `len` bytes were copied from a `&str`.
            Name::Inline(len, b) => unsafe { std::str::from_utf8_unchecked(&b[..*len as usize]) },
            Name::Shared(s) => s.as_str(),
        }
    }
}

impl Deref for Name {
    type Target = str;
    fn deref(&self) -> &str {
        self.as_str()
    }
}

impl fmt::Debug for Name {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self.as_str(), f)
    }
}

/// A message id: text as received, a UUID formatted in place, or the 16
/// raw bytes a binary route carries, formatted on first use (most
/// receivers never look at ids).
#[derive(Clone, Debug)]
pub(crate) enum MsgId {
    Text(ByteStr),
    Uuid(MessageId),
    Raw([u8; 16], std::sync::OnceLock<MessageId>),
}

impl MsgId {
    pub(crate) fn as_str(&self) -> &str {
        match self {
            MsgId::Text(t) => t.as_str(),
            MsgId::Uuid(u) => u.as_str(),
            MsgId::Raw(bytes, text) => text.get_or_init(|| MessageId::from_bytes(*bytes)).as_str(),
        }
    }
}

/// One message, received or built for sending.
#[derive(Clone, Debug)]
pub struct Message {
    pub(crate) from: Name,
    /// Empty for none (a present `to` is never empty).
    pub(crate) to: Name,
    /// Raw JSON text of the content (never `null`).
    pub(crate) content: ByteStr,
    pub(crate) id: MsgId,
    pub(crate) stamp: f64,
    pub(crate) stamp_ord: u64,
    pub(crate) broadcast: bool,
    pub(crate) extra: Vec<(ByteStr, ByteStr)>,
    /// Descriptors the sender attached (ipcm peers on a lane only).
    pub(crate) fds: Fds,
}

/// The descriptors attached to a message: shared by its clones, taken
/// once (see [`Message::take_fds`]).
#[derive(Clone, Debug, Default)]
pub(crate) struct Fds(Option<std::sync::Arc<std::sync::Mutex<Vec<std::os::fd::OwnedFd>>>>);

impl Fds {
    /// Descriptors just received.
    pub(crate) fn new(fds: Vec<std::os::fd::OwnedFd>) -> Self {
        Fds(Some(std::sync::Arc::new(std::sync::Mutex::new(fds))))
    }
}

impl Message {
    /// Builds a message from `from` to `to` with `content` serialized as
    /// JSON, a fresh id and stamp.
    ///
    /// Fails with `'content' is a required attribute` for `null` content and
    /// `'from' is a required attribute` for an empty sender.
    pub fn new<T: Serialize + ?Sized>(from: &str, to: &str, content: &T) -> Result<Self> {
        let raw = serde_json::to_string(content)?;
        Message::with_raw_content(from, Some(to), raw)
    }

    /// Builds a message whose content is already JSON text.
    pub fn with_raw_content(from: &str, to: Option<&str>, content_json: String) -> Result<Self> {
        if from.is_empty() || from == "0" {
            return Err(Error::FromRequired);
        }
        let trimmed = content_json.trim();
        if trimmed.is_empty() || trimmed == "null" {
            return Err(Error::ContentRequired);
        }
        serde_json::from_str::<&RawValue>(&content_json)?;
        let Some(to) = to.filter(|t| !t.is_empty()) else {
            return Err(Error::ToOrBroadcast);
        };
        let (stamp, stamp_ord) = next_stamp();
        Ok(Message {
            from: Name::copy_from(from),
            to: Name::copy_from(to),
            content: ByteStr::from_string(content_json),
            id: MsgId::Uuid(new_message_id()),
            stamp,
            stamp_ord,
            broadcast: false,
            extra: Vec::new(),
            fds: crate::message::Fds::default(),
        })
    }

    /// The sender's id.
    pub fn from(&self) -> &str {
        &self.from
    }

    /// The recipient's id (absent only on hand-made broadcast messages).
    pub fn to(&self) -> Option<&str> {
        (!self.to.is_empty()).then(|| self.to.as_str())
    }

    /// The message id (an upper-case UUID for messages ipcm builds).
    pub fn id(&self) -> &str {
        self.id.as_str()
    }

    /// Creation time, epoch seconds.
    pub fn stamp(&self) -> f64 {
        self.stamp
    }

    /// Tie-breaker among equal stamps.
    pub fn stamp_ord(&self) -> u64 {
        self.stamp_ord
    }

    /// Whether this is a copy produced by `broadcast`.
    pub fn is_broadcast(&self) -> bool {
        self.broadcast
    }

    /// Takes the file descriptors the sender attached
    /// ([`Client::send_message_with_fds`](crate::Client::send_message_with_fds)):
    /// all of them, once; clones of this message share them, so only the
    /// first call (on any clone) gets them. Empty for a message without any.
    pub fn take_fds(&self) -> Vec<std::os::fd::OwnedFd> {
        match &self.fds.0 {
            Some(m) => std::mem::take(&mut *m.lock().unwrap_or_else(|p| p.into_inner())),
            None => Vec::new(),
        }
    }

    /// The content as raw JSON text, exactly as received.
    pub fn content_json(&self) -> &str {
        &self.content
    }

    /// The content as raw JSON bytes, sharing the receive buffer.
    pub fn content_bytes(&self) -> &Bytes {
        self.content.as_bytes()
    }

    /// The content as any deserializable type.
    pub fn content<T: DeserializeOwned>(&self) -> Result<T> {
        Ok(serde_json::from_str(&self.content)?)
    }

    /// The content as a [`serde_json::Value`].
    pub fn content_value(&self) -> Result<serde_json::Value> {
        self.content()
    }

    /// An extra (non-standard) key's raw JSON value.
    pub fn extra(&self, key: &str) -> Option<&str> {
        self.extra
            .iter()
            .find(|(k, _)| k.as_str() == key)
            .map(|(_, v)| v.as_str())
    }

    /// All extra keys with their raw JSON values.
    pub fn extras(&self) -> impl Iterator<Item = (&str, &str)> {
        self.extra.iter().map(|(k, v)| (k.as_str(), v.as_str()))
    }

    /// Overrides the stamp and its tie-breaker.
    pub fn set_stamp(&mut self, stamp: f64, stamp_ord: u64) {
        self.stamp = stamp;
        self.stamp_ord = stamp_ord;
    }

    /// Adds (or replaces) an extra key with a value serialized as JSON.
    pub fn set_extra<T: Serialize + ?Sized>(&mut self, key: &str, value: &T) -> Result<()> {
        let v = ByteStr::from_string(serde_json::to_string(value)?);
        match self.extra.iter_mut().find(|(k, _)| k.as_str() == key) {
            Some(slot) => slot.1 = v,
            None => self.extra.push((ByteStr::copy_from(key), v)),
        }
        Ok(())
    }

    /// Whether the content is an object with a truthy `terminate` key.
    pub fn is_terminate(&self) -> bool {
        content_is_terminate(&self.content)
    }

    /// The whole envelope as a JSON value (for display and tools).
    pub fn to_value(&self) -> serde_json::Value {
        let mut m = serde_json::Map::new();
        m.insert("from".into(), self.from.as_str().into());
        if let Some(to) = self.to() {
            m.insert("to".into(), to.into());
        }
        m.insert(
            "content".into(),
            self.content_value().unwrap_or(serde_json::Value::Null),
        );
        m.insert("id".into(), self.id.as_str().into());
        m.insert("stamp".into(), self.stamp.into());
        m.insert("stamp_ord".into(), self.stamp_ord.into());
        if self.broadcast {
            m.insert("broadcast".into(), 1.into());
        }
        for (k, v) in &self.extra {
            let v = serde_json::from_str(v).unwrap_or(serde_json::Value::Null);
            m.insert(k.to_string(), v);
        }
        serde_json::Value::Object(m)
    }
}

/// Whether JSON text `content` is an object with a truthy `terminate` key.
pub(crate) fn content_is_terminate(content: &str) -> bool {
    #[derive(serde::Deserialize)]
    struct T<'a> {
        #[serde(borrow)]
        terminate: Option<&'a RawValue>,
    }
    if !content.starts_with('{') {
        return false;
    }
    match serde_json::from_str::<T>(content) {
        Ok(T { terminate: Some(v) }) => is_truthy(v.get()),
        _ => false,
    }
}

/// Orders messages as `get_messages` returns them: by stamp, then stamp_ord;
/// a stable sort keeps arrival order among ties.
pub fn sort_messages(msgs: &mut [Message]) {
    sort_messages_with(msgs, &mut SortScratch::default());
}

/// Reusable buffers of [`sort_messages_with`].
#[derive(Default)]
pub(crate) struct SortScratch {
    keys: Vec<(i64, u64, u32)>,
    moved: Vec<std::mem::MaybeUninit<Message>>,
}

impl fmt::Debug for SortScratch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SortScratch")
    }
}

/// [`sort_messages`] with reusable scratch: no allocation once the buffers
/// have grown to the batch size.
///
/// Messages from one connection arrive in order, so the usual batch is
/// sorted already and only checked. Otherwise (batches from many
/// connections) the sort orders small keys, not the messages themselves:
/// `(stamp, stamp_ord, position)` sorted unstably is the stable order.
/// The messages are then moved twice, in bulk: out in key order, back in
/// one copy.
pub(crate) fn sort_messages_with(msgs: &mut [Message], scratch: &mut SortScratch) {
    if msgs.is_sorted_by(|a, b| compare(a, b) != Ordering::Greater) {
        return;
    }
    if msgs.len() > u32::MAX as usize {
        msgs.sort_by(compare);
        return;
    }
    let SortScratch { keys, moved } = scratch;
    sorted_keys(msgs, keys);
    moved.clear();
    moved.reserve(msgs.len());
    let src = msgs.as_ptr();
    for k in keys.iter() {
        // SAFETY: the third key fields are a permutation of 0..len, so
        // every message is read out exactly once; nothing below can panic
        // (the capacity is reserved), and the copy back makes `msgs` own
        // each message once again.
        moved.push(std::mem::MaybeUninit::new(unsafe {
            std::ptr::read(src.add(k.2 as usize))
        }));
    }
    // SAFETY: `moved` holds `msgs.len()` initialised messages; they are
    // copied over the slots they were read from (no drop of the old bits),
    // then forgotten in `moved` (`MaybeUninit` never drops).
    unsafe {
        std::ptr::copy_nonoverlapping(
            moved.as_ptr().cast::<Message>(),
            msgs.as_mut_ptr(),
            msgs.len(),
        );
    }
    moved.clear();
}

/// Fills `keys` with `(stamp, stamp_ord, position)` of each message, in
/// sorted order: positions are distinct, so the unstable sort of the keys
/// gives the stable order of the messages. (At most `u32::MAX` messages.)
fn sorted_keys(msgs: &[Message], keys: &mut Vec<(i64, u64, u32)>) {
    keys.clear();
    keys.extend(msgs.iter().enumerate().map(|(i, m)| {
        // `f64::total_cmp` order as an integer.
        let bits = m.stamp.to_bits() as i64;
        (
            bits ^ ((((bits >> 63) as u64) >> 1) as i64),
            m.stamp_ord,
            i as u32,
        )
    }));
    keys.sort_unstable();
}

fn compare(a: &Message, b: &Message) -> Ordering {
    a.stamp
        .total_cmp(&b.stamp)
        .then(a.stamp_ord.cmp(&b.stamp_ord))
}

/// The current time as Perl stamps it: epoch seconds with (at most) 15
/// significant digits, i.e. 10-microsecond resolution today.
#[cfg_attr(not(any(test, feature = "unstable")), allow(dead_code))]
pub fn now_stamp() -> f64 {
    now_ticks() as f64 / 100_000.0
}

/// The wall clock at the kernel tick's resolution (a few milliseconds),
/// for activity times: `CLOCK_REALTIME_COARSE` costs a quarter of the
/// precise clock, and a connection's last activity is read in seconds.
pub fn coarse_stamp() -> f64 {
    let mut t = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: writes the current time into a timespec we own.
    unsafe { libc::clock_gettime(libc::CLOCK_REALTIME_COARSE, &mut t) };
    let ticks = (t.tv_sec.max(0) as u64) * 100_000 + (t.tv_nsec.max(0) as u64) / 10_000;
    ticks as f64 / 100_000.0
}

/// The wall clock in 10-microsecond ticks since the epoch (one vDSO call,
/// integer arithmetic only: this runs once per message sent).
fn now_ticks() -> u64 {
    // libc's (not rustix's own vDSO lookup, which valgrind cannot follow).
    let mut t = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: writes the current time into a timespec we own.
    unsafe { libc::clock_gettime(libc::CLOCK_REALTIME, &mut t) };
    let ticks = (t.tv_sec.max(0) as u64) * 100_000 + (t.tv_nsec.max(0) as u64) / 10_000;
    CLOCK
        .ms
        .store(ticks / 100, std::sync::atomic::Ordering::Relaxed);
    ticks
}

/// The stamp clock's state, written once per message sent. It has a cache
/// line of its own: sharing one with statics that receiving threads read
/// (the UTF-8 validator's function pointer, the log level) made every
/// stamp's compare-and-swap wait for that line to come back from the
/// receiver's core (a quarter of a Json sender's time, measured).
// 128: adjacent-line prefetching pairs cache lines on x86.
#[repr(align(128))]
struct StampClock {
    /// The last stamp given: `(ticks since base) << 16 | stamp_ord`
    /// (`u64::MAX`: none yet). 48 bits of 10-µs ticks last 89 years of
    /// process life; 16 bits of `stamp_ord` allow 6.5 billion messages per
    /// second.
    last: std::sync::atomic::AtomicU64,
    /// Milliseconds of the latest clock reading, for message ids (saves
    /// each id a second clock read).
    ms: std::sync::atomic::AtomicU64,
    /// The clock's ticks at the process's first stamp.
    base: std::sync::OnceLock<u64>,
}

static CLOCK: StampClock = StampClock {
    last: std::sync::atomic::AtomicU64::new(u64::MAX),
    ms: std::sync::atomic::AtomicU64::new(0),
    base: std::sync::OnceLock::new(),
};

/// Stamp and `stamp_ord` for a new message, taken together in one atomic
/// step so that the pair strictly increases across the whole process.
///
/// The Perl client computes the two separately (the ordinal counts up while
/// the stamp repeats), which is enough for a single-threaded process; with
/// several threads a stamp read before another thread's could otherwise
/// pair with a reset `stamp_ord` and sort before its own predecessor. The
/// stamp never moves backwards here (it is held at the last one while the
/// clock lags), so sorting by `(stamp, stamp_ord)` keeps every
/// connection's send order. A compare-and-swap, not a lock: PERFORMANCE.md
/// has what the lock cost.
pub fn next_stamp() -> (f64, u64) {
    use std::sync::atomic::Ordering::Relaxed;
    let now = now_ticks();
    let base = *CLOCK.base.get_or_init(|| now);
    let rel = now.saturating_sub(base).min((1 << 48) - 1);
    let mut cur = CLOCK.last.load(Relaxed);
    loop {
        let (ticks, ord) = (cur >> 16, cur & 0xFFFF);
        let next = if cur == u64::MAX || rel > ticks {
            rel << 16
        } else if ord < 0xFFFF {
            cur + 1
        } else {
            // 65,536 messages in one tick: the stamp moves on a tick.
            (ticks + 1) << 16
        };
        match CLOCK
            .last
            .compare_exchange_weak(cur, next, Relaxed, Relaxed)
        {
            Ok(_) => {
                let stamp = ((next >> 16) + base) as f64 / 100_000.0;
                return (stamp, next & 0xFFFF);
            }
            Err(actual) => cur = actual,
        }
    }
}

/// Asks this core's cache for the stamp clock's line ahead of the next
/// stamp. Called when messages were delivered: a reply usually follows,
/// and where the sender was a thread of this process the line is in its
/// core's cache, written by its last stamp. Fetched now, while the
/// application reads what came, the line is not fetched in the reply's
/// critical path (a busy ping-pong between two threads over a lane: p50
/// 1.02–1.08 µs → 0.92 µs in six alternating runs). A hint: nothing waits
/// for it, and a line already here costs nothing.
#[inline]
pub fn prefetch_stamp_clock() {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: a prefetch is a hint; it reads nothing the program sees and
    // cannot fault, whatever the address (here a static's).
    #[allow(unused_unsafe)]
    unsafe {
        std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(
            std::ptr::addr_of!(CLOCK).cast::<i8>(),
        )
    };
}

/// One stamp and `count` consecutive ordinals (`1..=65,536`) for a batch
/// of messages: one clock read and one compare-and-swap for all of them.
/// Message `i` of the batch is `(stamp, first + i)`; the pairs strictly
/// increase across the process together with those of [`next_stamp`]
/// (the ordinals of one batch share a tick: when too few are left in the
/// current one, the batch takes the next tick, as a 65,537th message of a
/// tick does in [`next_stamp`]).
pub fn reserve_stamps(count: u32) -> (f64, u64) {
    use std::sync::atomic::Ordering::Relaxed;
    let count = u64::from(count.clamp(1, 1 << 16));
    let now = now_ticks();
    let base = *CLOCK.base.get_or_init(|| now);
    let rel = now.saturating_sub(base).min((1 << 48) - 1);
    let mut cur = CLOCK.last.load(Relaxed);
    loop {
        let mut first = if cur == u64::MAX || rel > cur >> 16 {
            rel << 16
        } else {
            cur + 1
        };
        if (first & 0xFFFF) + count > 1 << 16 {
            first = ((first >> 16) + 1) << 16;
        }
        let last = first + count - 1;
        match CLOCK
            .last
            .compare_exchange_weak(cur, last, Relaxed, Relaxed)
        {
            Ok(_) => {
                let stamp = ((first >> 16) + base) as f64 / 100_000.0;
                return (stamp, first & 0xFFFF);
            }
            Err(actual) => cur = actual,
        }
    }
}

/// Message ids of one client: a random 74-bit prefix and a 48-bit counter,
/// laid out as a UUID of version 8 (RFC 9562's custom layout), so that a
/// batch of messages carries its first id only (the next ones count up).
#[derive(Debug, Clone)]
pub(crate) struct IdSeq {
    prefix: [u8; 10],
    next: u64,
}

impl IdSeq {
    const COUNTER_END: u64 = 1 << 48;

    pub(crate) fn new() -> Self {
        let mut s = IdSeq {
            prefix: [0; 10],
            next: 0,
        };
        s.rekey();
        s
    }

    fn rekey(&mut self) {
        let (a, b) = id_random();
        self.prefix[..8].copy_from_slice(&a.to_le_bytes());
        self.prefix[8..].copy_from_slice(&b.to_le_bytes()[..2]);
        // Version 8, variant 0b10.
        self.prefix[6] = (self.prefix[6] & 0x0F) | 0x80;
        self.prefix[8] = (self.prefix[8] & 0x3F) | 0x80;
        self.next = 0;
    }

    /// The first of `count` consecutive ids (the counter never wraps
    /// inside a batch: a fresh prefix starts before it would).
    pub(crate) fn take(&mut self, count: u32) -> [u8; 16] {
        if self.next + u64::from(count) > Self::COUNTER_END {
            self.rekey();
        }
        let mut id = [0u8; 16];
        id[..10].copy_from_slice(&self.prefix);
        id[10..].copy_from_slice(&self.next.to_be_bytes()[2..]);
        self.next += u64::from(count);
        id
    }
}

static LAST_GIVEN_STAMP: Mutex<(f64, u64)> = Mutex::new((0.0, 0));

/// The `stamp_ord` for a message that has a stamp but no `stamp_ord` (the
/// Perl rule: it counts up while the stamp repeats). It keeps its
/// own state, so that stamps from elsewhere never disturb the increasing
/// sequence of [`next_stamp`].
pub fn next_stamp_ord(stamp: f64) -> u64 {
    let mut last = LAST_GIVEN_STAMP.lock().unwrap_or_else(|p| p.into_inner());
    if last.0 == stamp {
        last.1 += 1;
    } else {
        *last = (stamp, 0);
    }
    last.1
}

/// A message id: an upper-case UUIDv7, `8-4-4-4-12` (or, received, any
/// 36-byte UTF-8 id text, kept inline rather than as a slice of its frame).
#[derive(Clone, Copy)]
pub struct MessageId([u8; 36]);

impl std::fmt::Debug for MessageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl MessageId {
    /// Formats 16 UUID bytes the way ipcm writes ids (upper-case
    /// hexadecimal, `8-4-4-4-12`, as `uuid`'s `encode_upper` writes them:
    /// a test compares the two).
    ///
    /// Two digits a byte from a table: about half the instructions of
    /// `encode_upper`, which looks up each digit on its own (callgrind,
    /// on the Json route's send path).
    pub fn from_bytes(bytes: [u8; 16]) -> Self {
        const PAIRS: [[u8; 2]; 256] = {
            const HEX: &[u8; 16] = b"0123456789ABCDEF";
            let mut t = [[0u8; 2]; 256];
            let mut i = 0;
            while i < 256 {
                t[i] = [HEX[i >> 4], HEX[i & 15]];
                i += 1;
            }
            t
        };
        let mut buf = [b'-'; 36];
        // The byte each group starts at, and where its digits go.
        for (from, to, n) in [(0, 0, 4), (4, 9, 2), (6, 14, 2), (8, 19, 2), (10, 24, 6)] {
            for i in 0..n {
                let [a, b] = PAIRS[usize::from(bytes[from + i])];
                buf[to + 2 * i] = a;
                buf[to + 2 * i + 1] = b;
            }
        }
        MessageId(buf)
    }

    /// A received id text of exactly 36 bytes (a UUID's length), copied.
    pub(crate) fn from_text(text: &str) -> Option<Self> {
        text.as_bytes().try_into().ok().map(MessageId)
    }

    /// The id text.
    pub fn as_str(&self) -> &str {
        // SAFETY: the bytes are either what `encode_upper` writes (ASCII
        // hex digits and hyphens) or a copy of a whole `&str`
        // (`from_text`); both are valid UTF-8.
        unsafe { std::str::from_utf8_unchecked(&self.0) }
    }
}

/// A fresh message id.
pub fn new_message_id() -> MessageId {
    MessageId::from_bytes(new_message_id_bytes())
}

/// A fresh message id as 16 bytes (UUIDv7).
///
/// The time field is the latest stamp's millisecond (ids are unique, not
/// ordered); the 74 random bits come from a per-thread generator seeded
/// from the OS and reseeded after `fork`, so that no two processes or
/// threads share a sequence.
pub fn new_message_id_bytes() -> [u8; 16] {
    let mut ms = CLOCK.ms.load(std::sync::atomic::Ordering::Relaxed);
    if ms == 0 {
        ms = now_ticks() / 100;
    }
    let (a, b) = id_random();
    let mut rand = [0u8; 10];
    rand[..8].copy_from_slice(&a.to_le_bytes());
    rand[8..].copy_from_slice(&b.to_le_bytes()[..2]);
    *uuid::Builder::from_unix_timestamp_millis(ms, &rand)
        .into_uuid()
        .as_bytes()
}

thread_local! {
    /// wyrand state and the fork generation it was seeded in.
    static ID_RNG: std::cell::Cell<Option<(u64, u64)>> = const { std::cell::Cell::new(None) };
}

fn id_random() -> (u64, u64) {
    fn wyrand(state: &mut u64) -> u64 {
        *state = state.wrapping_add(0xa076_1d64_78bd_642f);
        let t = u128::from(*state) * u128::from(*state ^ 0xe703_7ed1_a0b4_28db);
        ((t >> 64) ^ t) as u64
    }
    let generation = crate::fork::generation();
    ID_RNG.with(|cell| {
        let mut state = match cell.get() {
            Some((s, g)) if g == generation => s,
            _ => u64::from_le_bytes(uuid::Uuid::new_v4().as_bytes()[..8].try_into().unwrap()),
        };
        let r = (wyrand(&mut state), wyrand(&mut state));
        cell.set(Some((state, generation)));
        r
    })
}

/// Perl truthiness of a JSON value: everything but `null`, `false`, `0`,
/// `""` and `"0"` is true.
pub(crate) fn is_truthy(raw: &str) -> bool {
    let t = raw.trim();
    !matches!(t, "null" | "false" | "0" | "\"\"" | "\"0\"" | "0.0")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_formatted_as_uuid_formats_them() {
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let mut cases = vec![[0u8; 16], [0xFF; 16], *b"0123456789abcdef"];
        cases.extend((0..10_000).map(|_| {
            let mut b = [0u8; 16];
            b[..8].copy_from_slice(&next().to_le_bytes());
            b[8..].copy_from_slice(&next().to_le_bytes());
            b
        }));
        // Every byte value in every position.
        cases.extend((0..=255u8).map(|v| std::array::from_fn(|i| v.wrapping_add(i as u8 * 17))));
        for bytes in cases {
            let mut want = [0u8; 36];
            uuid::Uuid::from_bytes(bytes)
                .hyphenated()
                .encode_upper(&mut want);
            assert_eq!(MessageId::from_bytes(bytes).0, want, "{bytes:?}");
        }
    }

    #[test]
    fn ids_are_upper_case_uuid_v7() {
        let id = new_message_id();
        let s = id.as_str();
        assert_eq!(s.len(), 36);
        assert_eq!(s.as_bytes()[14], b'7');
        assert_eq!(s, s.to_ascii_uppercase());
        assert_ne!(s, new_message_id().as_str());
        let ids: std::collections::HashSet<[u8; 16]> =
            (0..100_000).map(|_| new_message_id_bytes()).collect();
        assert_eq!(ids.len(), 100_000, "ids repeat");
        let now_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as u64;
        let id = uuid::Uuid::from_bytes(new_message_id_bytes());
        let (secs, nanos) = id.get_timestamp().unwrap().to_unix();
        let ms = secs * 1000 + u64::from(nanos) / 1_000_000;
        assert!(now_ms.abs_diff(ms) < 5_000, "id time {ms} vs now {now_ms}");
        assert_eq!(id.get_version_num(), 7);
    }

    #[test]
    fn key_sort_is_the_stable_sort() {
        // Interleaved runs with ties, negative and equal stamps.
        let mut v = Vec::new();
        for i in 0..500u64 {
            let mut m = Message::new("a", "b", &i).unwrap();
            m.set_stamp(((i * 7919) % 37) as f64 - 10.0, i % 3);
            v.push(m);
        }
        let mut want = v.clone();
        want.sort_by(compare);
        let mut scratch = SortScratch::default();
        sort_messages_with(&mut v, &mut scratch);
        sort_messages_with(&mut v, &mut scratch);
        let got: Vec<&str> = v.iter().map(|m| m.content_json()).collect();
        let want: Vec<&str> = want.iter().map(|m| m.content_json()).collect();
        assert_eq!(got, want);
    }

    #[test]
    fn reserved_stamps_strictly_increase_with_next_stamp() {
        let mut last = next_stamp();
        for count in [1u32, 7, 65_536, 3, 65_535, 1] {
            let (stamp, first) = reserve_stamps(count);
            let end = (stamp, first + u64::from(count) - 1);
            assert!((stamp, first) > last, "{:?} after {last:?}", (stamp, first));
            assert!(end.1 <= 0xFFFF, "one tick holds the batch");
            let next = next_stamp();
            assert!(next > end, "{next:?} after {end:?}");
            last = next;
        }
    }

    #[test]
    fn id_sequence_is_uuid_v8_counting_up() {
        let mut ids = IdSeq::new();
        let a = ids.take(3);
        let b = ids.take(1);
        let u = uuid::Uuid::from_bytes(a);
        assert_eq!(u.get_version_num(), 8);
        assert_eq!(u.get_variant(), uuid::Variant::RFC4122);
        assert_eq!(a[..10], b[..10], "one prefix per client");
        assert_eq!(a[10..], [0, 0, 0, 0, 0, 0]);
        assert_eq!(b[10..], [0, 0, 0, 0, 0, 3], "the counter counts on");
        assert_ne!(IdSeq::new().take(1)[..10], a[..10], "clients differ");
        ids.next = IdSeq::COUNTER_END - 2;
        let c = ids.take(3);
        assert_ne!(c[..10], a[..10], "a fresh prefix before the counter wraps");
        assert_eq!(c[10..], [0; 6]);
    }

    #[test]
    fn a_forked_child_draws_other_ids() {
        new_message_id_bytes();
        let mut fds = [0; 2];
        // SAFETY: creates a pipe into the array we own.
        assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
        // SAFETY: the child only draws an id, writes it and `_exit`s.
        let pid = unsafe { libc::fork() };
        if pid == 0 {
            let id = new_message_id_bytes();
            // SAFETY: writes 16 bytes from a live array, then ends the child.
            unsafe {
                libc::write(fds[1], id.as_ptr().cast(), 16);
                libc::_exit(0);
            }
        }
        let mine = new_message_id_bytes();
        let mut theirs = [0u8; 16];
        // SAFETY: reads into a live 16-byte array; waits for our child.
        unsafe {
            assert_eq!(libc::read(fds[0], theirs.as_mut_ptr().cast(), 16), 16);
            libc::waitpid(pid, std::ptr::null_mut(), 0);
            libc::close(fds[0]);
            libc::close(fds[1]);
        }
        assert_ne!(mine[6..], theirs[6..], "parent and child share a sequence");
    }

    #[test]
    fn stamps_have_perl_precision() {
        let s = now_stamp();
        let text = serde_json::to_string(&s).unwrap();
        let digits = text.chars().filter(|c| c.is_ascii_digit()).count();
        assert!(digits <= 15, "{text}");
    }

    #[test]
    fn stamp_ord_counts_up_on_equal_stamps() {
        let a = next_stamp_ord(12.5);
        let b = next_stamp_ord(12.5);
        let c = next_stamp_ord(13.0);
        // Other tests may interleave; within one stamp the order only rises.
        assert!(b > a || c == 0);
        assert_eq!(next_stamp_ord(99.25), 0);
        assert_eq!(next_stamp_ord(99.25), 1);
    }

    #[test]
    fn stamps_strictly_increase_across_threads() {
        let per_thread: Vec<Vec<(f64, u64)>> = (0..4)
            .map(|_| std::thread::spawn(|| (0..20_000).map(|_| next_stamp()).collect::<Vec<_>>()))
            .collect::<Vec<_>>()
            .into_iter()
            .map(|t| t.join().unwrap())
            .collect();
        let now = now_stamp();
        let mut all = Vec::new();
        for seq in per_thread {
            for w in seq.windows(2) {
                let (a, b) = (w[0], w[1]);
                assert!(b.0 > a.0 || (b.0 == a.0 && b.1 > a.1), "{a:?} then {b:?}");
            }
            all.extend(seq);
        }
        // Unique across threads (other tests draw stamps meanwhile, so the
        // ords of one stamp need not be contiguous here).
        all.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
        for w in all.windows(2) {
            assert!(w[0] != w[1], "{:?} given twice", w[0]);
        }
        assert!(
            (now - all[all.len() - 1].0).abs() < 5.0,
            "stamps are the time"
        );
    }

    #[test]
    fn null_content_is_refused() {
        assert!(matches!(
            Message::with_raw_content("a", Some("b"), "null".into()),
            Err(Error::ContentRequired)
        ));
        assert!(matches!(
            Message::with_raw_content("", Some("b"), "1".into()),
            Err(Error::FromRequired)
        ));
        assert!(matches!(
            Message::with_raw_content("a", None, "1".into()),
            Err(Error::ToOrBroadcast)
        ));
    }

    #[test]
    fn terminate_detection() {
        let m = Message::new("a", "b", &serde_json::json!({"terminate": 1})).unwrap();
        assert!(m.is_terminate());
        let m = Message::new("a", "b", &serde_json::json!({"terminate": 0})).unwrap();
        assert!(!m.is_terminate());
        let m = Message::new("a", "b", "terminate").unwrap();
        assert!(!m.is_terminate());
    }

    #[test]
    fn sort_is_by_stamp_then_ord_and_stable() {
        let mk = |stamp, ord, tag: &str| {
            let mut m = Message::new("a", "b", tag).unwrap();
            m.stamp = stamp;
            m.stamp_ord = ord;
            m
        };
        let mut v = vec![
            mk(2.0, 0, "c"),
            mk(1.0, 1, "b"),
            mk(1.0, 0, "a"),
            mk(2.0, 0, "d"),
        ];
        sort_messages(&mut v);
        let order: Vec<String> = v.iter().map(|m| m.content::<String>().unwrap()).collect();
        assert_eq!(order, ["a", "b", "c", "d"]);
    }
}
