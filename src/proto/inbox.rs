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
