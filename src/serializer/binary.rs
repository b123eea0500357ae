//! The `Binary` serializer for Rust-only routes (docs/binary-format.md has
//! the layout byte by byte). Two payload kinds share the first six bytes
//! (magic, version, flags):
//!
//! * a **single message** (hellos, broadcasts, resent messages with their
//!   own id, stamp or extra keys): a fixed header read in place
//!   (zerocopy), then `from`, `to`, extra keys and the content;
//! * a **batch** (what `send_message`, `send_json` and the `queue_*`
//!   calls write): many messages from the connection's sender to its
//!   receiver in one frame, their shared stamp and first id written once.
//!
//! ```text
//! offset  size  field
//!      0     4  magic "IPCB"
//!      4     1  version (2)
//!      5     1  flags: 1 = hello, 2 = broadcast, 4 = batch (see [`BatchHeader`])
//!      6     2  from length (u16 LE)
//!      8     2  to length (u16 LE)
//!     10     2  reserved (0)
//!     12     4  extra length (u32 LE): a JSON object of extra keys, or empty
//!     16     4  content length (u32 LE): the content as UTF-8 JSON text
//!     20     8  stamp (f64 LE, epoch seconds)
//!     28     8  stamp_ord (u64 LE)
//!     36    16  message id (UUID bytes)
//!     52     …  from, to, extra, content
//! ```
//!
//! A hello is a header with the hello flag whose `from` is the sender's id.
//! Decoding borrows `from`, `to` and the content from the frame; nothing is
//! copied, and the content is checked as UTF-8 but only parsed as JSON when
//! the application asks for its value. Perl clients cannot load this
//! serializer (its class name is not a Perl module), so they refuse such a
//! route instead of misreading it.

use bytes::{BufMut, Bytes, BytesMut};
use serde::Serialize;
use serde_json::value::RawValue;
use zerocopy::byteorder::{F64, LittleEndian, U16, U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

use super::{Content, DecodeError, Outgoing};
use crate::error::Error;
use crate::message::{ByteStr, Message, MsgId, Name, new_message_id_bytes};
use crate::wire::BufferPool;

/// Magic bytes that start every binary payload.
pub const MAGIC: [u8; 4] = *b"IPCB";
/// Format version. Version 1 (no batches) is refused with an error that
/// names both versions: a peer of another version is detected at its
/// hello, never misread.
pub const VERSION: u8 = 2;
const FLAG_HELLO: u8 = 1;
const FLAG_BROADCAST: u8 = 2;
const FLAG_BATCH: u8 = 4;

/// The fixed header of a binary payload.
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct BinaryHeader {
    magic: [u8; 4],
    version: u8,
    flags: u8,
    from_len: U16<LittleEndian>,
    to_len: U16<LittleEndian>,
    reserved: [u8; 2],
    extra_len: U32<LittleEndian>,
    content_len: U32<LittleEndian>,
    stamp: F64<LittleEndian>,
    stamp_ord: U64<LittleEndian>,
    id: [u8; 16],
}

/// Size of [`BinaryHeader`].
pub const HEADER_SIZE: usize = std::mem::size_of::<BinaryHeader>();

fn header(flags: u8) -> BinaryHeader {
    BinaryHeader {
        magic: MAGIC,
        version: VERSION,
        flags,
        from_len: U16::new(0),
        to_len: U16::new(0),
        reserved: [0; 2],
        extra_len: U32::new(0),
        content_len: U32::new(0),
        stamp: F64::new(0.0),
        stamp_ord: U64::new(0),
        id: [0; 16],
    }
}

fn len16(s: &str, what: &str) -> Result<U16<LittleEndian>, Error> {
    u16::try_from(s.len())
        .map(U16::new)
        .map_err(|_| Error::Serialize(format!("{what} id longer than 65535 bytes")))
}

/// Appends a hello announcing `id`.
pub fn encode_hello(id: &str, out: &mut BytesMut) {
    let mut h = header(FLAG_HELLO);
    // Local ids are validated and short; a longer one cannot register.
    h.from_len = U16::new(id.len().min(u16::MAX as usize) as u16);
    out.put_slice(h.as_bytes());
    out.put_slice(&id.as_bytes()[..h.from_len.get() as usize]);
}

/// Appends one message.
pub(crate) fn encode_message<T: Serialize + ?Sized>(
    msg: &Outgoing<'_, T>,
    out: &mut BytesMut,
) -> Result<(), Error> {
    let start = out.len();
    let mut h = header(if msg.broadcast { FLAG_BROADCAST } else { 0 });
    h.from_len = len16(msg.from, "from")?;
    h.to_len = len16(msg.to, "to")?;
    let (stamp, ord) = super::stamp_pair(msg.stamp, msg.stamp_ord);
    h.stamp = F64::new(stamp);
    h.stamp_ord = U64::new(ord);
    h.id = match msg.id {
        None => new_message_id_bytes(),
        Some(text) => *uuid::Uuid::parse_str(text)
            .map_err(|_| {
                Error::Serialize(format!("binary routes need UUID message ids, not {text:?}"))
            })?
            .as_bytes(),
    };
    out.put_slice(h.as_bytes());
    out.put_slice(msg.from.as_bytes());
    out.put_slice(msg.to.as_bytes());
    let extra_at = out.len();
    let extras: Vec<_> = msg
        .extra
        .iter()
        .filter(|(k, _)| {
            !matches!(
                k.as_str(),
                "from" | "to" | "content" | "id" | "stamp" | "stamp_ord" | "broadcast"
            )
        })
        .collect();
    if !extras.is_empty() {
        out.put_u8(b'{');
        for (i, (k, v)) in extras.iter().enumerate() {
            if i > 0 {
                out.put_u8(b',');
            }
            serde_json::to_writer(out.writer(), k.as_str())?;
            out.put_u8(b':');
            out.put_slice(v.as_bytes());
        }
        out.put_u8(b'}');
    }
    let extra_len = out.len() - extra_at;
    let content_at = out.len();
    match &msg.content {
        Content::Value(v) => serde_json::to_writer(out.writer(), v).map_err(|e| {
            out.truncate(start);
            Error::from(e)
        })?,
        Content::Raw(r) => out.put_slice(super::trim_exact(r).as_bytes()),
    }
    let content_len = out.len() - content_at;
    if content_len == 0 || &out[content_at..] == b"null" {
        out.truncate(start);
        return Err(Error::ContentRequired);
    }
    let too_big = |_| Error::FrameTooLarge {
        len: content_len,
        max: u32::MAX as usize,
    };
    h.extra_len = U32::new(u32::try_from(extra_len).map_err(too_big)?);
    h.content_len = U32::new(u32::try_from(content_len).map_err(too_big)?);
    out[start..start + HEADER_SIZE].copy_from_slice(h.as_bytes());
    Ok(())
}

/// Refuses a payload that is not ipcm's binary format of this version
/// (both payload kinds start with the magic and the version).
fn check_kind(magic: [u8; 4], version: u8) -> Result<(), String> {
    if magic != MAGIC {
        return Err(
            "not a binary ipcm payload (bad magic): is the route's serializer Binary?".into(),
        );
    }
    if version != VERSION {
        return Err(format!(
            "binary payload version {version} is not supported (this ipcm speaks version \
             {VERSION}): every client of a Binary route must run the same ipcm format"
        ));
    }
    Ok(())
}

/// The parts of a binary payload, borrowed.
struct Parts<'a> {
    header: BinaryHeader,
    from: &'a str,
    to: &'a str,
    extra: &'a [u8],
    content: &'a str,
}

fn split(payload: &[u8]) -> Result<Parts<'_>, String> {
    let (header, rest) = BinaryHeader::read_from_prefix(payload).map_err(|_| {
        format!(
            "binary payload of {} bytes is shorter than its {HEADER_SIZE}-byte header",
            payload.len()
        )
    })?;
    check_kind(header.magic, header.version)?;
    let lens = [
        header.from_len.get() as usize,
        header.to_len.get() as usize,
        header.extra_len.get() as usize,
        header.content_len.get() as usize,
    ];
    let total: usize = lens.iter().sum();
    if total != rest.len() {
        return Err(format!(
            "binary payload lengths add up to {total}, but {} bytes follow the header",
            rest.len()
        ));
    }
    let (from, rest) = rest.split_at(lens[0]);
    let (to, rest) = rest.split_at(lens[1]);
    let (extra, content) = rest.split_at(lens[2]);
    fn text<'a>(b: &'a [u8], what: &str) -> Result<&'a str, String> {
        // SIMD validation: std's check cost a 16 KiB receive more than the
        // kernel's copy of it.
        simdutf8::basic::from_utf8(b).map_err(|_| format!("binary payload: {what} is not UTF-8"))
    }
    Ok(Parts {
        header,
        from: text(from, "from")?,
        to: text(to, "to")?,
        extra,
        content: text(content, "content")?,
    })
}

/// Reads a hello: the sender's id, `None` if the payload is no hello.
pub(crate) fn decode_hello(payload: &Bytes) -> Result<Option<ByteStr>, String> {
    let p = split(payload)?;
    if p.header.flags & FLAG_HELLO == 0 || p.from.is_empty() || p.from == "0" {
        return Ok(None);
    }
    Ok(Some(ByteStr::slice_of(payload, p.from)))
}

/// Decodes one message, borrowing from the payload.
pub(crate) fn decode_message(payload: &Bytes) -> Result<Option<Message>, DecodeError> {
    if is_batch(payload) {
        return Err(DecodeError::Malformed(
            "a binary batch holds many messages (Serializer::decode_payloads reads it)".into(),
        ));
    }
    let p = split(payload).map_err(DecodeError::Malformed)?;
    if p.header.flags & FLAG_HELLO != 0 {
        return Ok(None);
    }
    if p.from.is_empty() || p.from == "0" {
        return Err(DecodeError::Invalid(Error::FromRequired));
    }
    if p.content.is_empty() {
        return Err(DecodeError::Invalid(Error::ContentRequired));
    }
    // The content is checked as UTF-8 (in `split`) but not parsed here: a
    // 16 KiB content would cost the receiver more to parse than to move.
    // ipcm senders write JSON; `Message::content` and `content_value` parse
    // it on demand and report malformed text as an error then.
    if p.content == "null" {
        return Err(DecodeError::Invalid(Error::ContentRequired));
    }
    let broadcast = p.header.flags & FLAG_BROADCAST != 0;
    if p.to.is_empty() && !broadcast {
        return Err(DecodeError::Invalid(Error::ToOrBroadcast));
    }
    let mut extra = Vec::new();
    if !p.extra.is_empty() {
        let map: Vec<(std::borrow::Cow<'_, str>, &RawValue)> = serde_json::from_slice::<
            std::collections::BTreeMap<std::borrow::Cow<'_, str>, &RawValue>,
        >(p.extra)
        .map_err(|e| DecodeError::Malformed(format!("binary payload extra keys: {e}")))?
        .into_iter()
        .collect();
        for (k, v) in map {
            extra.push((ByteStr::copy_from(&k), ByteStr::slice_of(payload, v.get())));
        }
    }
    Ok(Some(Message {
        from: Name::slice_of(payload, p.from),
        to: Name::slice_of(payload, p.to),
        content: ByteStr::slice_of(payload, p.content),
        id: MsgId::Raw(p.header.id, std::sync::OnceLock::new()),
        stamp: p.header.stamp.get(),
        stamp_ord: p.header.stamp_ord.get(),
        broadcast,
        extra,
        fds: crate::message::Fds::default(),
    }))
}

// ----- batches ------------------------------------------------------------

/// The fixed header of a batch payload; the records follow it.
///
/// ```text
/// offset  size  field
///      0     4  magic "IPCB"
///      4     1  version (2)
///      5     1  flags: 4 (batch)
///      6     2  reserved (0)
///      8     4  count (u32 LE): messages in the batch, at least 1
///     12     4  reserved (0)
///     16     8  stamp (f64 LE, epoch seconds): every message's stamp
///     24     8  first stamp_ord (u64 LE): message i has first + i
///     32    16  first message id (UUID bytes): message i adds i to the
///               last 6 bytes, read as a 48-bit big-endian counter
///     48     …  count records: a 4-byte length, then that many bytes of
///               content (UTF-8 JSON text)
/// ```
///
/// A record's length is 28 bits in four bytes of seven bits each, least
/// significant first, every byte below 0x80. The length bytes are thus
/// ASCII, and the whole record area is valid UTF-8 exactly when every
/// content is: the receiver checks it in one pass, and each content is a
/// `str` slice of the frame with no further check. `from` is the
/// connection's sender (its hello) and `to` its receiver: neither is
/// written.
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct BatchHeader {
    magic: [u8; 4],
    version: u8,
    flags: u8,
    reserved: [u8; 2],
    count: U32<LittleEndian>,
    reserved2: [u8; 4],
    stamp: F64<LittleEndian>,
    first_ord: U64<LittleEndian>,
    first_id: [u8; 16],
}

/// Size of [`BatchHeader`].
pub const BATCH_HEADER_SIZE: usize = std::mem::size_of::<BatchHeader>();

/// Size of a record's length.
pub const RECORD_LEN_SIZE: usize = 4;

/// Largest content a batch record holds (2^28 - 1 bytes); a larger one
/// travels as a single message.
pub const MAX_RECORD: usize = (1 << 28) - 1;

/// Most messages in one batch (their stamp ordinals must fit one clock
/// tick's 65,536).
pub const MAX_BATCH_COUNT: u32 = 65_535;

/// The four length bytes of a record of `len` bytes (`len <= MAX_RECORD`).
#[inline(always)]
pub fn record_len_bytes(len: usize) -> [u8; 4] {
    debug_assert!(len <= MAX_RECORD);
    let l = len as u32;
    // One little-endian word either way, so the caller stores it whole
    // (four byte stores were a fifth of `queue_json`'s time). The packing
    // gives `l` itself below 128; the branch only skips its work for the
    // usual short content.
    let w = if l < 0x80 {
        l
    } else {
        (l & 0x7F) | ((l >> 7) & 0x7F) << 8 | ((l >> 14) & 0x7F) << 16 | ((l >> 21) & 0x7F) << 24
    };
    w.to_le_bytes()
}

/// A record length read back: `None` if a byte has its high bit set.
#[inline(always)]
pub fn record_len(bytes: [u8; 4]) -> Option<usize> {
    let x = u32::from_le_bytes(bytes);
    if x < 0x80 {
        return Some(x as usize);
    }
    if x & 0x8080_8080 != 0 {
        return None;
    }
    // Seven-bit pairs into 14-bit halves, then the halves together.
    let x = (x & 0x007F_007F) | ((x >> 1) & 0x3F80_3F80);
    Some(((x & 0x3FFF) | ((x >> 2) & 0x0FFF_C000)) as usize)
}

/// The header of a batch of `count` messages.
pub fn batch_header(count: u32, stamp: f64, first_ord: u64, first_id: [u8; 16]) -> BatchHeader {
    BatchHeader {
        magic: MAGIC,
        version: VERSION,
        flags: FLAG_BATCH,
        reserved: [0; 2],
        count: U32::new(count),
        reserved2: [0; 4],
        stamp: F64::new(stamp),
        first_ord: U64::new(first_ord),
        first_id,
    }
}

/// Whether `payload` claims to be a batch (checked by [`parse_batch_indexed`]).
#[inline(always)]
pub fn is_batch(payload: &[u8]) -> bool {
    payload.len() >= 6 && payload[5] & FLAG_BATCH != 0 && payload[..4] == MAGIC
}

/// What a checked batch holds.
#[derive(Debug, Clone, Copy)]
pub struct BatchInfo {
    /// Messages in it.
    pub count: u32,
    /// Their stamp.
    pub stamp: f64,
    /// The first one's `stamp_ord`.
    pub first_ord: u64,
    /// The first one's id.
    pub first_id: [u8; 16],
    /// Records whose content is `null` (invalid messages, skipped).
    pub nulls: u32,
}

/// What is wrong with a record (the walk reports it with the record's
/// index; the text is made only then, off the hot loop).
enum RecordFault {
    CutLength,
    BadLength,
    Overrun { len: usize, left: usize },
    Empty,
}

/// Walks the records of a batch: their count and how many are `null`.
/// The end of record `n` (its byte offset in `body`) goes to `index[n]`,
/// for the records the index has room for.
#[inline]
fn walk_records(
    body: &[u8],
    index: &mut [[u8; INDEX_ENTRY]],
) -> Result<(u32, u32), (u32, RecordFault)> {
    let (mut rest, mut n, mut nulls) = (body, 0u32, 0u32);
    while !rest.is_empty() {
        let Some((len_bytes, after)) = rest.split_first_chunk::<RECORD_LEN_SIZE>() else {
            return Err((n, RecordFault::CutLength));
        };
        let Some(len) = record_len(*len_bytes) else {
            return Err((n, RecordFault::BadLength));
        };
        let Some((content, after)) = after.split_at_checked(len) else {
            let left = after.len();
            return Err((n, RecordFault::Overrun { len, left }));
        };
        match len {
            0 => return Err((n, RecordFault::Empty)),
            4 if *content == *b"null" => nulls += 1,
            _ => {}
        }
        if let Some(slot) = index.get_mut(n as usize) {
            // At most the body's length, which a frame keeps below 4 GiB.
            *slot = ((body.len() - after.len()) as u32).to_ne_bytes();
        }
        // At most a fifth of the payload's length: no overflow.
        n = n.wrapping_add(1);
        rest = after;
    }
    Ok((n, nulls))
}

/// Bytes at the front of a body that may lie before a vouched range and
/// are then checked here (a lane's reader leaves the first 64 bytes of a
/// record out of what it vouches for, and a body starts 52 bytes in).
const VOUCHED_HEAD_MAX: usize = 64;

/// Whether `body` lies in one of the `vouched` address ranges (known
/// ASCII), but for at most [`VOUCHED_HEAD_MAX`] bytes at its front, which
/// are then checked here.
fn vouched_ascii(body: &[u8], vouched: &[std::ops::Range<usize>]) -> bool {
    let start = body.as_ptr() as usize;
    let end = start + body.len();
    vouched.iter().any(|r| {
        r.start <= end
            && end <= r.end
            && (start >= r.start
                || (r.start - start <= VOUCHED_HEAD_MAX && body[..r.start - start].is_ascii()))
    })
}

/// Checks a batch payload whole: header, every record's length, the
/// count, and that every content is UTF-8. A batch that fails is refused
/// whole (its frame is malformed); one that passes can be walked with
/// [`BatchRecords`] with no further check. Writes the end of each record
/// (its byte offset in the record area, native-endian `u32`) to `index`,
/// for as many records as it has room for.
///
/// A body inside the `vouched` ranges (see
/// [`CheckedBatch::parse_indexed_vouched`]) is not checked for UTF-8
/// again.
fn parse_batch_indexed(
    payload: &[u8],
    index: &mut [[u8; INDEX_ENTRY]],
    vouched: &[std::ops::Range<usize>],
) -> Result<BatchInfo, String> {
    let (h, body) = BatchHeader::read_from_prefix(payload).map_err(|_| {
        format!(
            "binary batch of {} bytes is shorter than its {BATCH_HEADER_SIZE}-byte header",
            payload.len()
        )
    })?;
    check_kind(h.magic, h.version)?;
    if h.flags != FLAG_BATCH {
        return Err(format!(
            "binary batch with flags {:#x} (only 0x4 is defined)",
            h.flags
        ));
    }
    let count = h.count.get();
    if count == 0 {
        return Err("binary batch of 0 messages".into());
    }
    // A short ASCII body (the usual small message) is checked a word at a
    // time; simdutf8's setup costs more than that below a few hundred
    // bytes. A longer one is checked for ASCII a register of blocks at a
    // time (`ascii`), and only a body that is not goes through simdutf8.
    let ascii = if body.len() <= 256 {
        body.is_ascii()
    } else {
        vouched_ascii(body, vouched) || super::ascii::is_ascii(body)
    };
    if !ascii && simdutf8::basic::from_utf8(body).is_err() {
        return Err("binary batch: a content is not UTF-8, or a record length is malformed".into());
    }
    let (n, nulls) = walk_records(body, index).map_err(|(n, fault)| match fault {
        RecordFault::CutLength => format!("binary batch: record {n} is cut inside its length"),
        RecordFault::BadLength => format!("binary batch: record {n} has a malformed length"),
        RecordFault::Overrun { len, left } => {
            format!("binary batch: record {n} announces {len} bytes, {left} remain")
        }
        RecordFault::Empty => format!("binary batch: record {n} has no content"),
    })?;
    if n != count {
        return Err(format!(
            "binary batch announces {count} messages but holds {n}"
        ));
    }
    Ok(BatchInfo {
        count,
        stamp: h.stamp.get(),
        first_ord: h.first_ord.get(),
        first_id: h.first_id,
        nulls,
    })
}

/// The id of message `index` of a batch whose first id is `first`.
#[inline]
pub fn nth_id(first: &[u8; 16], index: u32) -> [u8; 16] {
    let mut id = *first;
    let mut c = [0u8; 8];
    c[2..].copy_from_slice(&id[10..]);
    let n = u64::from_be_bytes(c).wrapping_add(u64::from(index)) & ((1 << 48) - 1);
    id[10..].copy_from_slice(&n.to_be_bytes()[2..]);
    id
}

/// A received batch payload that [`parse_batch_indexed`] accepted.
///
/// Its fields are private and [`CheckedBatch::parse`] (or
/// [`CheckedBatch::parse_indexed`]) is the only way to make one, so every
/// `CheckedBatch` holds a payload that passed the check, and an index that
/// the check wrote for that payload.
#[derive(Debug, Clone)]
pub struct CheckedBatch {
    payload: Bytes,
    info: BatchInfo,
    /// The end of every record (native-endian `u32`, [`INDEX_ENTRY`] bytes
    /// each), written by the check; empty when the batch was not indexed.
    index: Bytes,
}

/// Bytes of one record's entry in a batch's index.
const INDEX_ENTRY: usize = 4;

/// Batches of fewer messages are not indexed: walking their lengths
/// costs no more than reading an index.
pub const INDEX_MIN_COUNT: u32 = 8;

/// Where the indexes of received batches are carved from: blocks of
/// this many bytes, reclaimed in place once every batch indexed in one
/// is dropped. A batch whose index would need more than a quarter of a
/// block is not indexed.
pub const INDEX_BLOCK: usize = 64 * 1024;

impl CheckedBatch {
    /// Checks `payload` ([`parse_batch_indexed`]).
    pub fn parse(payload: Bytes) -> Result<Self, String> {
        // SAFETY: no range is vouched for.
        unsafe { Self::parse_unindexed(payload, &[]) }
    }

    /// [`CheckedBatch::parse`] with the `vouched` ranges of
    /// [`CheckedBatch::parse_indexed_vouched`].
    ///
    /// # Safety
    /// As for [`CheckedBatch::parse_indexed_vouched`].
    unsafe fn parse_unindexed(
        payload: Bytes,
        vouched: &[std::ops::Range<usize>],
    ) -> Result<Self, String> {
        let info = parse_batch_indexed(&payload, &mut [], vouched)?;
        Ok(CheckedBatch {
            payload,
            info,
            index: Bytes::new(),
        })
    }

    /// Checks `payload` as [`CheckedBatch::parse`] does and, for a batch
    /// of [`INDEX_MIN_COUNT`] messages or more, records where each of its
    /// records ends, in an index taken from `blocks` (see [`INDEX_BLOCK`]).
    ///
    /// Reading the batch then needs no record's length: without the index
    /// each record's position depends on a load of the one before it, a
    /// chain of dependent loads that the CPU cannot overlap; with it, the
    /// positions are known up front. The check walks the lengths anyway,
    /// so writing the index costs one store a record.
    #[inline]
    #[cfg_attr(not(any(test, feature = "unstable")), allow(dead_code))]
    pub fn parse_indexed(payload: Bytes, blocks: &mut BufferPool) -> Result<Self, String> {
        // SAFETY: no range is vouched for.
        unsafe { Self::parse_indexed_vouched(payload, blocks, &[]) }
    }

    /// [`CheckedBatch::parse_indexed`], told which memory is known to
    /// hold only ASCII: a body inside one of the `vouched` address ranges
    /// (but for its first few bytes, checked here) is taken as UTF-8
    /// without a second look. A lane's reader vouches for what its copy
    /// out of the ring checked on the way (`ring::Consumer::pop_into`).
    ///
    /// # Safety
    /// Every byte at an address in `vouched` must be below 0x80, and must
    /// stay so, unwritten and not freed, for as long as `payload` (and so
    /// the batch made from it) lives: the batch hands its contents out as
    /// `&str`.
    #[inline]
    pub(crate) unsafe fn parse_indexed_vouched(
        payload: Bytes,
        blocks: &mut BufferPool,
        vouched: &[std::ops::Range<usize>],
    ) -> Result<Self, String> {
        // The announced count, read directly (a short payload reads as
        // none; the check refuses it).
        let announced = payload
            .get(std::mem::offset_of!(BatchHeader, count)..)
            .and_then(|b| b.first_chunk::<4>())
            .map_or(0, |b| u32::from_le_bytes(*b));
        if announced < INDEX_MIN_COUNT {
            // SAFETY: our caller's contract.
            return unsafe { CheckedBatch::parse_unindexed(payload, vouched) };
        }
        // The announced count is the peer's word: the index is sized by
        // it only up to what the payload could hold (a record is at least
        // five bytes) and a quarter of a block.
        let most = payload.len().saturating_sub(BATCH_HEADER_SIZE) / (RECORD_LEN_SIZE + 1);
        let slots = (announced as usize).min(most);
        let need = slots * INDEX_ENTRY;
        if need > INDEX_BLOCK / 4 {
            // SAFETY: our caller's contract.
            return unsafe { CheckedBatch::parse_unindexed(payload, vouched) };
        }
        // A spare has a quarter of a block free, and `need` is at most
        // that, so `resize` stays inside the block.
        let mut block = blocks.take_recv_plain();
        debug_assert!(block.is_empty() && block.capacity() >= need);
        block.resize(need, 0);
        let (entries, _) = block.as_chunks_mut::<INDEX_ENTRY>();
        let info = match parse_batch_indexed(&payload, entries, vouched) {
            Ok(info) => info,
            Err(e) => {
                block.clear();
                blocks.put(block);
                return Err(e);
            }
        };
        // `parse_batch_indexed` accepted the batch, so it holds exactly
        // `announced` records and wrote every slot.
        let index = block.split().freeze();
        blocks.put(block);
        Ok(CheckedBatch {
            payload,
            info,
            index,
        })
    }

    /// What the header says.
    pub fn info(&self) -> &BatchInfo {
        &self.info
    }

    /// The whole payload.
    pub fn payload(&self) -> &Bytes {
        &self.payload
    }

    /// Whether the check recorded where each record ends.
    #[cfg(test)]
    pub fn is_indexed(&self) -> bool {
        !self.index.is_empty()
    }

    /// Bytes the payload and its index hold (what the inbox and the
    /// threaded mode's receive ring count against their limits).
    pub fn held_bytes(&self) -> usize {
        self.payload.len() + self.index.len()
    }

    /// The contents, in order.
    #[inline]
    pub fn records(&self) -> BatchRecords<'_> {
        let body = &self.payload[BATCH_HEADER_SIZE..];
        // SAFETY: `parse` accepted this payload, which checked
        // `payload[BATCH_HEADER_SIZE..]` as UTF-8; `Bytes` is immutable,
        // and the field is private, so it is still that payload.
        let body = unsafe { std::str::from_utf8_unchecked(body) };
        BatchRecords {
            body,
            at: 0,
            ends: self.index.as_chunks::<INDEX_ENTRY>().0,
        }
    }
}

/// Appends every message of `batch` to `out`, owned (each shares the
/// frame), from `from` to `to`.
pub(crate) fn expand(batch: &CheckedBatch, from: &Name, to: &Name, out: &mut Vec<Message>) {
    let info = *batch.info();
    let payload = batch.payload();
    out.reserve(info.count as usize);
    for (i, content) in batch.records().enumerate() {
        let i = i as u32;
        out.push(Message {
            from: from.clone(),
            to: to.clone(),
            content: ByteStr::slice_of(payload, content),
            id: MsgId::Raw(nth_id(&info.first_id, i), std::sync::OnceLock::new()),
            stamp: info.stamp,
            stamp_ord: info.first_ord.wrapping_add(u64::from(i)),
            broadcast: false,
            extra: Vec::new(),
            fds: crate::message::Fds::default(),
        });
    }
}

/// The contents of a [`CheckedBatch`], in order, each a slice of the frame.
#[derive(Debug, Clone)]
pub struct BatchRecords<'a> {
    /// The whole record area.
    body: &'a str,
    /// Where the next record starts.
    at: usize,
    /// The ends of the records not yet read, when the batch is indexed
    /// (else empty, and each record's length is read before it).
    ends: &'a [[u8; INDEX_ENTRY]],
}

impl BatchRecords<'_> {
    /// Bytes of records not yet read.
    pub fn remaining(&self) -> usize {
        self.body.len() - self.at
    }
}

impl CheckedBatch {
    /// The records after the first `read` bytes of the record area (a
    /// position from [`BatchRecords::remaining`]: the area's length minus
    /// what remained).
    pub fn records_from(&self, read: usize) -> BatchRecords<'_> {
        let mut r = self.records();
        // Read by their lengths from there (the index is by record, not
        // by byte).
        r.ends = &[];
        r.at = read.min(r.body.len());
        r
    }

    /// Bytes in the record area.
    pub fn records_len(&self) -> usize {
        self.payload.len() - BATCH_HEADER_SIZE
    }
}

impl<'a> Iterator for BatchRecords<'a> {
    type Item = &'a str;

    #[inline(always)]
    fn next(&mut self) -> Option<&'a str> {
        let start = self.at + RECORD_LEN_SIZE;
        let end = if let Some((end, rest)) = self.ends.split_first() {
            self.ends = rest;
            u32::from_ne_bytes(*end) as usize
        } else {
            let len_bytes = self.body.as_bytes().get(self.at..start)?;
            start + record_len(len_bytes.try_into().ok()?)?
        };
        // Both checks are on numbers only (no load of the body).
        if start > end || end > self.body.len() {
            return None;
        }
        // SAFETY: `body` is valid UTF-8 and every record length byte is
        // ASCII (the check refused any other). `start` is right after a
        // record's length bytes, and `end` is the end of the body or the
        // start of the next record's length bytes: the end that the
        // record's own length gives, read just above or written to the
        // index by the check that walked these same, immutable bytes. So
        // the slice starts right after an ASCII byte and ends right before
        // one (or at the end): both are character boundaries of valid
        // UTF-8, and the slice is itself valid UTF-8; and it is in bounds
        // (checked just above).
        let content = unsafe { self.body.get_unchecked(start..end) };
        self.at = end;
        Some(content)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn record_lengths_round_trip_and_stay_ascii() {
        for len in (0..=MAX_RECORD)
            .step_by(997)
            .chain([MAX_RECORD, 127, 128, 16383, 16384])
        {
            let b = record_len_bytes(len);
            assert!(b.iter().all(u8::is_ascii), "{len}: {b:?}");
            assert_eq!(record_len(b), Some(len));
        }
        assert_eq!(record_len([0x80, 0, 0, 0]), None);
        assert_eq!(record_len([0, 0, 0, 0xFF]), None);
        // The layout itself (docs/binary-format.md): seven bits a byte,
        // least significant first; a length below 128 is its own byte.
        assert_eq!(record_len_bytes(66), [66, 0, 0, 0]);
        assert_eq!(record_len_bytes(200), [200 & 0x7F, 1, 0, 0]);
        assert_eq!(
            record_len_bytes((5 << 21) | (4 << 14) | (3 << 7) | 2),
            [2, 3, 4, 5]
        );
    }

    #[test]
    fn ids_of_a_batch_count_up_from_the_first() {
        let mut ids = crate::message::IdSeq::new();
        let first = ids.take(3);
        assert_eq!(nth_id(&first, 3), ids.take(1));
        let mut top = first;
        top[10..].copy_from_slice(&[0xFF; 6]);
        let wrapped = nth_id(&top, 1);
        assert_eq!(wrapped[..10], first[..10], "the prefix stays");
        assert_eq!(wrapped[10..], [0; 6], "the counter wraps modulo 2^48");
    }

    /// A batch payload of `contents`, announcing `count` messages.
    fn batch_of(contents: &[&str], count: u32) -> Bytes {
        let mut out = BytesMut::new();
        out.put_slice(batch_header(count, 1.5, 9, [7; 16]).as_bytes());
        for c in contents {
            out.put_slice(&record_len_bytes(c.len()));
            out.put_slice(c.as_bytes());
        }
        out.freeze()
    }

    /// A body is vouched for only when a range covers it to its end, and
    /// from its start but for a short ASCII head.
    #[test]
    #[allow(clippy::single_range_in_vec_init)] // one range, in a list of ranges
    fn a_body_is_vouched_for_only_inside_a_range() {
        let mut buf = vec![b'a'; 1000];
        buf[10] = 0xC3;
        let base = buf.as_ptr() as usize;
        let body = &buf[100..900];
        let v = |r: std::ops::Range<usize>| vouched_ascii(body, &[base + r.start..base + r.end]);
        assert!(
            v(100..900) && v(0..1000) && v(150..900),
            "covered, or but for an ASCII head"
        );
        assert!(!v(100..899), "short of the end");
        assert!(
            !v(200..900),
            "a head longer than the record's unchecked one"
        );
        assert!(!v(950..1000) && !v(0..50), "elsewhere");
        // A head with a high bit is not vouched for.
        let body = &buf[5..900];
        assert!(!vouched_ascii(body, &[base + 40..base + 1000]));
        // What a range covers is not looked at: its caller vouches for it
        // (`CheckedBatch::parse_indexed_vouched`'s contract).
        assert!(vouched_ascii(body, &[base..base + 1000]));
    }

    #[test]
    fn an_indexed_batch_reads_the_same_records_as_a_walked_one() {
        let mut blocks = BufferPool::new(INDEX_BLOCK, 2);
        let long = "x".repeat(300);
        for n in [1usize, 7, 8, 9, 100, 3000] {
            let owned: Vec<String> = (0..n)
                .map(|i| match i % 3 {
                    0 => format!("{i}"),
                    1 => format!("\"é{i}\""),
                    _ => long.clone(),
                })
                .collect();
            let contents: Vec<&str> = owned.iter().map(String::as_str).collect();
            let payload = batch_of(&contents, n as u32);
            let plain = CheckedBatch::parse(payload.clone()).unwrap();
            let indexed = CheckedBatch::parse_indexed(payload, &mut blocks).unwrap();
            assert!(!plain.is_indexed());
            assert_eq!(
                indexed.is_indexed(),
                n >= INDEX_MIN_COUNT as usize,
                "{n} messages"
            );
            assert!(indexed.records().eq(contents.iter().copied()), "{n}");
            assert!(plain.records().eq(contents.iter().copied()), "{n}");
            // Part way through, by byte position (the threaded cursor's
            // way), the records that follow.
            let mut r = indexed.records();
            r.nth(n / 2);
            let from = indexed.records_from(indexed.records_len() - r.remaining());
            assert!(from.eq(contents[n / 2 + 1..].iter().copied()), "{n}");
        }
    }

    #[test]
    fn a_hostile_count_neither_sizes_the_index_nor_passes() {
        let mut blocks = BufferPool::new(INDEX_BLOCK, 2);
        let contents = ["1"; 20];
        for count in [19, 21, 1 << 20, u32::MAX] {
            let e =
                CheckedBatch::parse_indexed(batch_of(&contents, count), &mut blocks).unwrap_err();
            assert!(e.contains("announces"), "{count}: {e}");
        }
        // A record cut short, after enough whole ones to be indexed.
        let mut cut = BytesMut::from(&batch_of(&contents, 20)[..]);
        cut.truncate(cut.len() - 1);
        cut.put_slice(b"\x80");
        assert!(CheckedBatch::parse_indexed(cut.freeze(), &mut blocks).is_err());
        // The blocks still serve after the refusals, and then without
        // allocating: every index lives in one block while its batches
        // are kept, and is reclaimed in place once they are dropped.
        // Fifty rounds carve 400 KB of indexes; a block is carved from its
        // start, so an index outside every block seen so far starts one.
        let payload = batch_of(&contents, 20);
        let mut starts: Vec<usize> = Vec::new();
        for _ in 0..50 {
            let kept: Vec<CheckedBatch> = (0..100)
                .map(|_| CheckedBatch::parse_indexed(payload.clone(), &mut blocks).unwrap())
                .collect();
            for b in &kept {
                assert!(b.is_indexed());
                let at = b.index.as_ptr() as usize;
                if !starts.iter().any(|&s| (s..s + INDEX_BLOCK).contains(&at)) {
                    starts.push(at);
                }
            }
        }
        assert!(starts.len() <= 2, "{} blocks allocated", starts.len());
    }

    #[test]
    fn a_batch_too_large_to_index_is_walked() {
        let mut blocks = BufferPool::new(INDEX_BLOCK, 2);
        let n = INDEX_BLOCK / 4 / INDEX_ENTRY + 1;
        let contents = vec!["0"; n];
        let b = CheckedBatch::parse_indexed(batch_of(&contents, n as u32), &mut blocks).unwrap();
        assert!(!b.is_indexed());
        assert_eq!(b.records().count(), n);
    }

    #[test]
    fn header_is_52_bytes() {
        assert_eq!(HEADER_SIZE, 52);
    }

    #[test]
    fn round_trip_borrows_from_the_frame() {
        let mut out = BytesMut::new();
        let extra = vec![(ByteStr::from("trace"), ByteStr::from("[1,2]"))];
        let msg = Outgoing {
            from: "a",
            to: "bé",
            content: Content::Value(&serde_json::json!({"k": "😀"})),
            id: None,
            stamp: Some(12.5),
            stamp_ord: Some(7),
            broadcast: true,
            extra: &extra,
        };
        encode_message(&msg, &mut out).unwrap();
        let payload = out.freeze();
        let m = decode_message(&payload).unwrap().unwrap();
        assert_eq!(m.from(), "a");
        assert_eq!(m.to(), Some("bé"));
        assert_eq!(
            m.content_json(),
            r#"{"k":"😀"}"#,
            "content is raw UTF-8, not escaped"
        );
        let inside = |p: *const u8| payload.as_ptr_range().contains(&p);
        assert!(
            inside(m.content_json().as_ptr()),
            "content is a slice of the frame"
        );
        assert!(!inside(m.from().as_ptr()), "a short name is kept inline");
        let long = "a-peer-name-longer-than-thirty-bytes";
        let mut out = BytesMut::new();
        encode_message(
            &Outgoing {
                from: long,
                to: long,
                extra: &[],
                ..msg
            },
            &mut out,
        )
        .unwrap();
        let payload2 = out.freeze();
        let m2 = decode_message(&payload2).unwrap().unwrap();
        assert_eq!((m2.from(), m2.to()), (long, Some(long)));
        assert!(
            payload2.as_ptr_range().contains(&m2.from().as_ptr()),
            "a long name is a slice"
        );
        assert_eq!(m.stamp(), 12.5);
        assert_eq!(m.stamp_ord(), 7);
        assert!(m.is_broadcast());
        assert_eq!(m.extra("trace"), Some("[1,2]"));
        assert_eq!(m.id().len(), 36);
    }

    #[test]
    fn hello_round_trip() {
        let mut out = BytesMut::new();
        encode_hello("cli", &mut out);
        let p = out.freeze();
        assert_eq!(decode_hello(&p).unwrap().unwrap(), "cli");
        assert!(
            decode_message(&p).unwrap().is_none(),
            "a hello is no message"
        );
    }

    #[test]
    fn hostile_payloads_are_errors() {
        assert!(decode_message(&Bytes::from_static(b"short")).is_err());
        assert!(decode_message(&Bytes::from_static(b"{\"from\":\"a\"}")).is_err());
        let mut out = BytesMut::new();
        encode_hello("cli", &mut out);
        let mut bad = out.to_vec();
        bad.push(0);
        assert!(
            decode_hello(&Bytes::from(bad)).is_err(),
            "lengths must add up"
        );
        let mut out = BytesMut::new();
        encode_hello("cli", &mut out);
        let mut bad = out.to_vec();
        bad[8] = 0xFF;
        assert!(decode_hello(&Bytes::from(bad)).is_err());
    }
}
