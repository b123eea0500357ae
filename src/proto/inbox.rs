//! What the core has received: owned messages and whole Binary batches,
//! and the borrowed view of them ([`MessageRef`]) that reads a batch in
//! place, with no per-message allocation, reference count or copy.

use std::fmt;
use std::ops::Deref;

use serde::de::DeserializeOwned;

use crate::error::Result;
use crate::message::{ByteStr, Message, MessageId, MsgId, Name};
use crate::serializer::binary::{BatchRecords, CheckedBatch, expand, nth_id};

/// A received batch: its sender (the connection's hello) and its checked
/// payload.
#[derive(Debug, Clone)]
pub struct RecvBatch {
    pub(crate) from: Name,
    pub(crate) batch: CheckedBatch,
}

/// One inbox entry, in arrival order.
#[derive(Debug, Clone)]
pub enum Entry {
    /// One message (Json routes, single Binary messages, self-sends,
    /// resumed messages).
    One(Message),
    /// A Binary batch, read in place.
    Batch(RecvBatch),
}

impl Entry {
    /// Payload bytes it holds (what the receive ring's byte budget counts).
    pub fn bytes(&self) -> usize {
        match self {
            Entry::One(m) => m.content_json().len() + 64,
            Entry::Batch(b) => b.batch.held_bytes(),
        }
    }

    /// Messages in this entry (at least one).
    pub fn count(&self) -> usize {
        match self {
            Entry::One(_) => 1,
            Entry::Batch(b) => b.batch.info().count as usize,
        }
    }
}

/// Moves every message of `entries` to the end of `out`, owned (batches
/// are split into messages sharing the frame; `to` is `local`).
pub(crate) fn expand_into(entries: &mut Vec<Entry>, local: &Name, out: &mut Vec<Message>) {
    let n = entries.iter().map(Entry::count).sum();
    out.reserve(n);
    for e in entries.drain(..) {
        match e {
            Entry::One(m) => out.push(m),
            Entry::Batch(b) => expand(&b.batch, &b.from, local, out),
        }
    }
}

/// A received message, borrowed from the receive buffer it arrived in.
///
/// What [`crate::Client::receive`] yields: reading one costs a few
/// instructions (no allocation, no reference count, no copy). Its id is
/// formatted only when asked for. [`MessageRef::to_message`] makes an
/// owned [`Message`] of it, for those who keep messages.
#[derive(Clone, Copy)]
pub struct MessageRef<'a> {
    inner: RefInner<'a>,
}

#[derive(Clone, Copy)]
enum RefInner<'a> {
    One(&'a Message),
    Batch {
        batch: &'a RecvBatch,
        to: &'a Name,
        index: u32,
        content: &'a str,
    },
}

impl<'a> MessageRef<'a> {
    /// The sender's id.
    #[inline]
    pub fn from(&self) -> &'a str {
        match self.inner {
            RefInner::One(m) => m.from(),
            RefInner::Batch { batch, .. } => batch.from.as_str(),
        }
    }

    /// The recipient's id (absent only on hand-made broadcast messages).
    #[inline]
    pub fn to(&self) -> Option<&'a str> {
        match self.inner {
            RefInner::One(m) => m.to(),
            RefInner::Batch { to, .. } => Some(to.as_str()),
        }
    }

    /// The content as raw JSON text, exactly as received.
    #[inline]
    pub fn content_json(&self) -> &'a str {
        match self.inner {
            RefInner::One(m) => m.content_json(),
            RefInner::Batch { content, .. } => content,
        }
    }

    /// The content as any deserializable type.
    pub fn content<T: DeserializeOwned>(&self) -> Result<T> {
        Ok(serde_json::from_str(self.content_json())?)
    }

    /// The message id (an upper-case UUID for messages ipcm builds).
    pub fn id(&self) -> IdText<'a> {
        match self.inner {
            RefInner::One(m) => IdText(IdInner::Borrowed(m.id())),
            RefInner::Batch { batch, index, .. } => IdText(IdInner::Formatted(
                MessageId::from_bytes(nth_id(&batch.batch.info().first_id, index)),
            )),
        }
    }

    /// Creation time, epoch seconds (on Binary routes: when its batch was
    /// sealed, at the flush that sent it).
    #[inline]
    pub fn stamp(&self) -> f64 {
        match self.inner {
            RefInner::One(m) => m.stamp(),
            RefInner::Batch { batch, .. } => batch.batch.info().stamp,
        }
    }

    /// Tie-breaker among equal stamps.
    #[inline]
    pub fn stamp_ord(&self) -> u64 {
        match self.inner {
            RefInner::One(m) => m.stamp_ord(),
            RefInner::Batch { batch, index, .. } => {
                batch.batch.info().first_ord.wrapping_add(u64::from(index))
            }
        }
    }

    /// Whether this is a copy produced by `broadcast`.
    pub fn is_broadcast(&self) -> bool {
        match self.inner {
            RefInner::One(m) => m.is_broadcast(),
            RefInner::Batch { .. } => false,
        }
    }

    /// An extra (non-standard) key's raw JSON value.
    pub fn extra(&self, key: &str) -> Option<&'a str> {
        match self.inner {
            RefInner::One(m) => m.extra(key),
            RefInner::Batch { .. } => None,
        }
    }

    /// Whether the content is an object with a truthy `terminate` key.
    pub fn is_terminate(&self) -> bool {
        match self.inner {
            RefInner::One(m) => m.is_terminate(),
            RefInner::Batch { content, .. } => crate::message::content_is_terminate(content),
        }
    }

    /// An owned copy (sharing the receive buffer, not copying it).
    pub fn to_message(&self) -> Message {
        match self.inner {
            RefInner::One(m) => m.clone(),
            RefInner::Batch {
                batch,
                to,
                index,
                content,
            } => Message {
                from: batch.from.clone(),
                to: to.clone(),
                content: ByteStr::slice_of(batch.batch.payload(), content),
                id: MsgId::Raw(
                    nth_id(&batch.batch.info().first_id, index),
                    std::sync::OnceLock::new(),
                ),
                stamp: self.stamp(),
                stamp_ord: self.stamp_ord(),
                broadcast: false,
                extra: Vec::new(),
                fds: crate::message::Fds::default(),
            },
        }
    }
}

impl fmt::Debug for MessageRef<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MessageRef")
            .field("from", &self.from())
            .field("to", &self.to())
            .field("id", &&*self.id())
            .field("stamp", &self.stamp())
            .field("stamp_ord", &self.stamp_ord())
            .field("content", &self.content_json())
            .finish()
    }
}

/// A message id as [`MessageRef::id`] gives it: borrowed, or formatted on
/// the spot from a batch's counter.
#[derive(Clone, Copy)]
pub struct IdText<'a>(IdInner<'a>);

#[derive(Clone, Copy)]
enum IdInner<'a> {
    Borrowed(&'a str),
    Formatted(MessageId),
}

impl Deref for IdText<'_> {
    type Target = str;
    fn deref(&self) -> &str {
        match &self.0 {
            IdInner::Borrowed(s) => s,
            IdInner::Formatted(id) => id.as_str(),
        }
    }
}

impl fmt::Display for IdText<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self)
    }
}

impl fmt::Debug for IdText<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&**self, f)
    }
}

/// The messages of a run of inbox entries, in arrival order.
pub struct Iter<'a> {
    entries: std::slice::Iter<'a, Entry>,
    local: &'a Name,
    batch: Option<(&'a RecvBatch, BatchRecords<'a>, u32)>,
}

impl<'a> Iter<'a> {
    pub(crate) fn new(entries: &'a [Entry], local: &'a Name) -> Self {
        Iter {
            entries: entries.iter(),
            local,
            batch: None,
        }
    }
}

impl<'a> Iterator for Iter<'a> {
    type Item = MessageRef<'a>;

    #[inline]
    fn next(&mut self) -> Option<MessageRef<'a>> {
        loop {
            if let Some((batch, records, index)) = &mut self.batch {
                if let Some(content) = records.next() {
                    let r = MessageRef {
                        inner: RefInner::Batch {
                            batch,
                            to: self.local,
                            index: *index,
                            content,
                        },
                    };
                    *index += 1;
                    return Some(r);
                }
                self.batch = None;
            }
            match self.entries.next()? {
                Entry::One(m) => {
                    return Some(MessageRef {
                        inner: RefInner::One(m),
                    });
                }
                Entry::Batch(b) => self.batch = Some((b, b.batch.records(), 0)),
            }
        }
    }
}

impl fmt::Debug for Iter<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Iter").finish_non_exhaustive()
    }
}

/// Reads an entry's messages one at a time, owned (the threaded
/// receiver's `recv`).
#[derive(Debug)]
pub struct Cursor {
    entry: Option<Entry>,
    /// Record bytes of the batch already read, and messages read.
    read: usize,
    index: u32,
}

impl Cursor {
    /// A cursor at the start of `entry`.
    pub fn new(entry: Entry) -> Self {
        Cursor {
            entry: Some(entry),
            read: 0,
            index: 0,
        }
    }

    /// The next message, owned; `to` for batches is `local`.
    pub fn next_message(&mut self, local: &Name) -> Option<Message> {
        match self.entry.take()? {
            Entry::One(m) => Some(m),
            Entry::Batch(b) => {
                let mut records = b.batch.records_from(self.read);
                let content = records.next()?;
                self.read = b.batch.records_len() - records.remaining();
                let info = b.batch.info();
                let m = Message {
                    from: b.from.clone(),
                    to: local.clone(),
                    content: ByteStr::slice_of(b.batch.payload(), content),
                    id: MsgId::Raw(
                        nth_id(&info.first_id, self.index),
                        std::sync::OnceLock::new(),
                    ),
                    stamp: info.stamp,
                    stamp_ord: info.first_ord.wrapping_add(u64::from(self.index)),
                    broadcast: false,
                    extra: Vec::new(),
                    fds: crate::message::Fds::default(),
                };
                self.index += 1;
                if records.remaining() > 0 {
                    self.entry = Some(Entry::Batch(b));
                }
                Some(m)
            }
        }
    }

    /// What is left, as owned messages.
    pub fn drain_into(&mut self, local: &Name, out: &mut Vec<Entry>) {
        while let Some(m) = self.next_message(local) {
            out.push(Entry::One(m));
        }
    }

    /// Whether every message was read.
    pub fn is_done(&self) -> bool {
        self.entry.is_none()
    }
}

/// The messages [`crate::Client::receive`] (or the threaded
/// [`crate::Receiver::receive`]) lends out, in arrival order.
///
/// ```
/// use std::time::Duration;
/// use ipcm::{Client, Info, Options, Route, Serializer};
/// # let dir = tempfile::tempdir().unwrap();
/// let route = Route::spawn(Some(dir.path())).unwrap();
/// let info = Info::new(Serializer::Binary, route.path());
/// let mut a = Client::connect(&info, "a", Options::new()).unwrap();
/// let mut b = Client::connect(&info, "b", Options::new()).unwrap();
/// for i in 0..3 {
///     a.queue_message("b", &i).unwrap();
/// }
/// a.flush_pending(None).unwrap();
/// let mut sum = 0;
/// while sum < 3 {
///     let got = b.receive(Duration::from_secs(5)).unwrap();
///     for m in &got {
///         assert_eq!((m.from(), m.to()), ("a", Some("b")));
///         sum += m.content::<i32>().unwrap();
///     }
/// }
/// assert_eq!(sum, 3);
/// ```
pub struct Received<'c> {
    entries: Vec<Entry>,
    /// Where the vector goes back to (kept to receive without allocating).
    spare: &'c mut Vec<Entry>,
    /// The receiver's id: the `to` of batches.
    local: &'c Name,
}

impl<'c> Received<'c> {
    pub(crate) fn new(entries: Vec<Entry>, spare: &'c mut Vec<Entry>, local: &'c Name) -> Self {
        Received {
            entries,
            spare,
            local,
        }
    }

    /// The messages, in arrival order.
    #[inline]
    pub fn iter(&self) -> Iter<'_> {
        Iter::new(&self.entries, self.local)
    }

    /// How many messages there are.
    pub fn len(&self) -> usize {
        self.entries.iter().map(Entry::count).sum()
    }

    /// Whether there are none (the wait timed out).
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

impl<'a> IntoIterator for &'a Received<'_> {
    type Item = MessageRef<'a>;
    type IntoIter = Iter<'a>;
    fn into_iter(self) -> Self::IntoIter {
        self.iter()
    }
}

impl std::fmt::Debug for Received<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Received")
            .field("messages", &self.len())
            .finish_non_exhaustive()
    }
}

impl Drop for Received<'_> {
    fn drop(&mut self) {
        self.entries.clear();
        *self.spare = std::mem::take(&mut self.entries);
    }
}
