//! The `Binary` serializer for Rust-only routes: a fixed header read in
//! place (zerocopy), then `from`, `to`, extra keys and the content.
//!
//! ```text
//! offset  size  field
//!      0     4  magic "IPCB"
//!      4     1  version (1)
//!      5     1  flags: 1 = hello, 2 = broadcast
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

/// Magic bytes that start every binary payload.
pub const MAGIC: [u8; 4] = *b"IPCB";
/// Format version.
pub const VERSION: u8 = 1;
const FLAG_HELLO: u8 = 1;
const FLAG_BROADCAST: u8 = 2;

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
        Content::Raw(r) => out.put_slice(r.trim().as_bytes()),
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
    if header.magic != MAGIC {
        return Err(
            "not a binary ipcm payload (bad magic): is the route's serializer Binary?".into(),
        );
    }
    if header.version != VERSION {
        return Err(format!(
            "binary payload version {} is not supported",
            header.version
        ));
    }
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
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

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
