//! Serializers: how hellos, messages, `.stats` and `.resume` records become
//! frame payloads. The route's info string names the one every client uses:
//! Perl-compatible JSON, Perl-compatible zstd-compressed JSON, or the
//! Rust-only binary format.

mod ascii;
pub mod binary;
pub mod json;
mod scan;
#[cfg(feature = "unstable")]
pub(crate) use scan::check_against_serde as scan_check_against_serde;
pub mod zstd;

use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::error::{Error, Result};
use crate::message::{
    ByteStr, Message, MessageId, MsgId, Name, new_message_id, next_stamp, next_stamp_ord,
};
use json::{RawEnvelope, is_truthy, push_raw_ascii, push_str, to_ascii_json};
pub use zstd::ZstdCodec;

/// Class-name prefix of serializers in the info string.
pub const CLASS_PREFIX: &str = "IPC::Manager::Serializer::";

/// Info-string class of the binary serializer: not a Perl module, so a Perl
/// client refuses the route with "Can't locate ipcm/Serializer/Binary.pm".
pub const BINARY_CLASS: &str = "+ipcm::Serializer::Binary";

/// The serializer of a route.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Serializer {
    /// `IPC::Manager::Serializer::JSON`: compact ASCII-only JSON.
    Json,
    /// `IPC::Manager::Serializer::JSON::Zstd`: that JSON in one zstd frame.
    JsonZstd(Arc<ZstdCodec>),
    /// ipcm's binary format (Rust-only routes).
    Binary,
}

impl Serializer {
    /// zstd-compressed JSON at the default level, without dictionary.
    pub fn json_zstd() -> Result<Self> {
        Ok(Serializer::JsonZstd(ZstdCodec::new(
            zstd::DEFAULT_LEVEL,
            None,
        )?))
    }
}

/// Why a received payload yields no message.
#[derive(Debug)]
pub(crate) enum DecodeError {
    /// Not decodable at all (warned as a malformed frame).
    Malformed(String),
    /// Decodable, but not a valid message: warned about and skipped
    /// (docs/perl-differences.md, bad-message).
    Invalid(Error),
}

/// The content of an outgoing message.
pub(crate) enum Content<'a, T: ?Sized> {
    /// A value to serialize.
    Value(&'a T),
    /// JSON text as is.
    Raw(&'a str),
}

// Both variants are references: copying never needs `T: Copy`.
impl<T: ?Sized> Clone for Content<'_, T> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<T: ?Sized> Copy for Content<'_, T> {}

/// One outgoing envelope, borrowed from the caller.
pub(crate) struct Outgoing<'a, T: ?Sized> {
    pub from: &'a str,
    pub to: &'a str,
    pub content: Content<'a, T>,
    pub id: Option<&'a str>,
    pub stamp: Option<f64>,
    pub stamp_ord: Option<u64>,
    pub broadcast: bool,
    pub extra: &'a [(ByteStr, ByteStr)],
}

impl<'a, T: ?Sized> Outgoing<'a, T> {
    /// A new message: id, stamp and ordinal assigned when it is encoded,
    /// no extra keys.
    pub(crate) fn new(from: &'a str, to: &'a str, content: Content<'a, T>) -> Self {
        Outgoing {
            from,
            to,
            content,
            id: None,
            stamp: None,
            stamp_ord: None,
            broadcast: false,
            extra: &[],
        }
    }
}

impl<'a> Outgoing<'a, ()> {
    /// `msg` as it travels again, from `from` to `to`: its content raw,
    /// its id, stamp, ordinal, broadcast flag and extra keys kept.
    pub(crate) fn resend(msg: &'a Message, from: &'a str, to: &'a str) -> Self {
        Outgoing {
            from,
            to,
            content: Content::Raw(msg.content_json()),
            id: Some(msg.id()),
            stamp: Some(msg.stamp()),
            stamp_ord: Some(msg.stamp_ord()),
            broadcast: msg.is_broadcast(),
            extra: &msg.extra,
        }
    }
}

impl Serializer {
    /// The full class name, as written in the info string.
    pub fn class(&self) -> &'static str {
        match self {
            Serializer::Json => "IPC::Manager::Serializer::JSON",
            Serializer::JsonZstd(_) => "IPC::Manager::Serializer::JSON::Zstd",
            Serializer::Binary => BINARY_CLASS,
        }
    }

    /// Picks the serializer from the info string's serializer element: a
    /// class name, or `[class, key, value, ...]` with constructor arguments
    /// (`level`, `dictionary` for zstd).
    pub fn from_spec(spec: &serde_json::Value) -> Result<Self> {
        let (class, args) = match spec {
            serde_json::Value::String(s) => (s.as_str(), &[][..]),
            serde_json::Value::Array(a) => match a.split_first() {
                Some((serde_json::Value::String(s), rest)) => (s.as_str(), rest),
                _ => {
                    return Err(Error::InfoString(
                        "serializer array lacks a class name".into(),
                    ));
                }
            },
            _ => {
                return Err(Error::InfoString(
                    "serializer must be a string or an array".into(),
                ));
            }
        };
        if class == BINARY_CLASS {
            return Ok(Serializer::Binary);
        }
        let full = expand_class(class, CLASS_PREFIX);
        match full.as_str() {
            "IPC::Manager::Serializer::JSON" => Ok(Serializer::Json),
            "IPC::Manager::Serializer::JSON::Zstd" => {
                let mut level = zstd::DEFAULT_LEVEL;
                let mut dictionary = None;
                for pair in args.chunks(2) {
                    match pair {
                        [serde_json::Value::String(k), v] if k == "level" => {
                            level = v.as_i64().and_then(|l| i32::try_from(l).ok()).ok_or_else(
                                || Error::InfoString("zstd level must be an integer".into()),
                            )?;
                        }
                        [serde_json::Value::String(k), serde_json::Value::String(p)]
                            if k == "dictionary" =>
                        {
                            dictionary = Some(std::path::PathBuf::from(p));
                        }
                        _ => {
                            return Err(Error::InfoString(format!(
                                "unknown zstd serializer argument {:?}",
                                pair.first()
                            )));
                        }
                    }
                }
                Ok(Serializer::JsonZstd(ZstdCodec::new(
                    level,
                    dictionary.as_deref(),
                )?))
            }
            _ => Err(Error::UnsupportedSerializer(full)),
        }
    }

    /// The serializer element of the info string (the array form only for a
    /// configured zstd serializer, as the Perl spawner writes it).
    pub fn spec(&self) -> serde_json::Value {
        match self {
            Serializer::JsonZstd(c)
                if c.level() != zstd::DEFAULT_LEVEL || c.dictionary().is_some() =>
            {
                let mut v = vec![serde_json::Value::from(self.class())];
                if c.level() != zstd::DEFAULT_LEVEL {
                    v.push("level".into());
                    v.push(c.level().into());
                }
                if let Some(d) = c.dictionary() {
                    v.push("dictionary".into());
                    v.push(d.to_string_lossy().into_owned().into());
                }
                serde_json::Value::Array(v)
            }
            _ => serde_json::Value::String(self.class().to_string()),
        }
    }

    /// Appends a hello payload announcing `id`.
    pub fn encode_hello(&self, id: &str, out: &mut BytesMut) {
        let json = |out: &mut BytesMut| {
            out.extend_from_slice(b"{\"hello\":");
            push_str(id, out);
            out.extend_from_slice(b"}");
        };
        match self {
            Serializer::Json => json(out),
            Serializer::JsonZstd(c) => {
                let mut text = BytesMut::new();
                json(&mut text);
                // A hello of a validated id always compresses.
                let _ = c.compress(&text, out);
            }
            Serializer::Binary => binary::encode_hello(id, out),
        }
    }

    /// Reads a hello payload: `Ok(Some(id))`, `Ok(None)` when it is not an
    /// object with a non-empty `hello`, `Err` when it does not decode.
    pub(crate) fn decode_hello(&self, payload: &Bytes) -> Result<Option<ByteStr>, String> {
        let payload = &match self {
            Serializer::Json => payload.clone(),
            Serializer::JsonZstd(c) => c.decompress(payload)?,
            Serializer::Binary => return binary::decode_hello(payload),
        };
        let env = scan::scan_envelope(payload).map_err(|e| describe_scan(e, payload))?;
        let Some(raw) = env.hello else {
            return Ok(None);
        };
        let id = match serde_json::from_str::<json::CowStr>(raw) {
            Ok(s) => s.0,
            Err(_) => return Ok(None),
        };
        if id.is_empty() || id == "0" {
            return Ok(None);
        }
        Ok(Some(owned_or_slice(payload, id)))
    }

    /// Appends one message payload.
    pub(crate) fn encode_message<T: Serialize + ?Sized>(
        &self,
        msg: &Outgoing<'_, T>,
        out: &mut BytesMut,
    ) -> Result<()> {
        match self {
            Serializer::Json => encode_json_envelope(msg, out),
            Serializer::JsonZstd(c) => {
                let mut text = BytesMut::new();
                encode_json_envelope(msg, &mut text)?;
                c.compress(&text, out)
            }
            Serializer::Binary => binary::encode_message(msg, out),
        }
    }

    /// Decodes one message payload, borrowing from it.
    ///
    /// `Ok(None)`: skip silently (not an object, or a stray hello).
    pub(crate) fn decode_message(&self, payload: &Bytes) -> Result<Option<Message>, DecodeError> {
        let inflated;
        let payload = match self {
            Serializer::Json => payload,
            Serializer::JsonZstd(c) => {
                inflated = c.decompress(payload).map_err(DecodeError::Malformed)?;
                &inflated
            }
            Serializer::Binary => return binary::decode_message(payload),
        };
        // One UTF-8 check, then ipcm's own layout straight into a message,
        // else the general scan (see `scan::scan_envelope`).
        let env = match simdutf8::basic::from_utf8(payload) {
            Ok(text) => match scan::ipcm_layout(text) {
                Some(l) => match layout_message(payload, &l) {
                    Some(m) => return Ok(Some(m)),
                    None => Ok(l.into_envelope()),
                },
                None => scan::scan_text(text),
            },
            Err(_) => scan::scan_envelope(payload),
        }
        .map_err(|e| DecodeError::Malformed(describe_scan(e, payload)))?;
        if !env.is_object || (env.keys == 1 && env.hello.is_some()) {
            return Ok(None);
        }
        envelope_to_message(payload, env)
            .map(Some)
            .map_err(DecodeError::Invalid)
    }

    /// Appends the payload of a new message from `from` to `to` whose
    /// content is the JSON text `content_json` (a fresh id and stamp), as a
    /// client's send does before framing it.
    pub fn encode_payload(
        &self,
        from: &str,
        to: &str,
        content_json: &str,
        out: &mut BytesMut,
    ) -> Result<()> {
        self.encode_message::<()>(
            &Outgoing {
                from,
                to,
                content: Content::Raw(content_json),
                id: None,
                stamp: None,
                stamp_ord: None,
                broadcast: false,
                extra: &[],
            },
            out,
        )
    }

    /// Decodes a message payload as a client's receive does: `Ok(None)` for
    /// a hello or a payload that is not an object, an error for one that
    /// does not decode or breaks the envelope's rules.
    pub fn decode_payload(&self, payload: &Bytes) -> Result<Option<Message>> {
        self.decode_message(payload).map_err(|e| match e {
            DecodeError::Malformed(text) => Error::Serialize(text),
            DecodeError::Invalid(e) => e,
        })
    }

    /// Decodes a payload that may be a Binary batch, appending its
    /// messages to `out`: a batch does not carry its sender and recipient
    /// (they are the connection's), so `from` and `to` supply them. Any
    /// other payload is decoded as [`Serializer::decode_payload`] does (and
    /// keeps its own `from` and `to`). Returns how many were appended.
    pub fn decode_payloads(
        &self,
        payload: &Bytes,
        from: &str,
        to: &str,
        out: &mut Vec<Message>,
    ) -> Result<usize> {
        if matches!(self, Serializer::Binary) && binary::is_batch(payload) {
            let batch = binary::CheckedBatch::parse(payload.clone()).map_err(Error::Serialize)?;
            let start = out.len();
            binary::expand(&batch, &Name::copy_from(from), &Name::copy_from(to), out);
            return Ok(out.len() - start);
        }
        Ok(match self.decode_payload(payload)? {
            Some(m) => {
                out.push(m);
                1
            }
            None => 0,
        })
    }

    /// Serializes any value (stats files).
    pub fn encode_value<T: Serialize + ?Sized>(&self, value: &T, out: &mut BytesMut) -> Result<()> {
        match self {
            Serializer::Json | Serializer::Binary => Ok(to_ascii_json(value, out)?),
            Serializer::JsonZstd(c) => {
                let mut text = BytesMut::new();
                to_ascii_json(value, &mut text)?;
                c.compress(&text, out)
            }
        }
    }

    /// Deserializes any value (stats files).
    pub fn decode_value<T: DeserializeOwned>(&self, bytes: &[u8]) -> Result<T> {
        match self {
            Serializer::Json | Serializer::Binary => Ok(serde_json::from_slice(bytes)?),
            Serializer::JsonZstd(c) => {
                let text = c.decompress(bytes).map_err(Error::Serialize)?;
                Ok(serde_json::from_slice(&text)?)
            }
        }
    }
}

/// Applies the info-string class rules: a leading `+` means verbatim,
/// otherwise `prefix` is added unless present.
pub(crate) fn expand_class(class: &str, prefix: &str) -> String {
    if let Some(rest) = class.strip_prefix('+') {
        rest.to_string()
    } else if class.starts_with(prefix) {
        class.to_string()
    } else {
        format!("{prefix}{class}")
    }
}

fn describe_scan(e: scan::ScanError, payload: &[u8]) -> String {
    if payload.starts_with(&[0x28, 0xB5, 0x2F, 0xFD]) {
        format!(
            "{e} (the payload starts with the zstd magic: is the route's serializer JSON::Zstd?)"
        )
    } else {
        e.to_string()
    }
}

fn owned_or_slice(payload: &Bytes, s: std::borrow::Cow<'_, str>) -> ByteStr {
    match s {
        std::borrow::Cow::Borrowed(b) => ByteStr::slice_of(payload, b),
        std::borrow::Cow::Owned(o) => ByteStr::from_string(o),
    }
}

fn owned_or_slice_name(payload: &Bytes, s: std::borrow::Cow<'_, str>) -> Name {
    match s {
        std::borrow::Cow::Borrowed(b) => Name::slice_of(payload, b),
        std::borrow::Cow::Owned(o) => Name::from_byte_str(ByteStr::from_string(o)),
    }
}

/// A payload in ipcm's own layout (`l`, its values) that needs none of the
/// envelope rules' repairs (a sender and a recipient, content, a stamp and
/// an ordinal, an id of a UUID's length) as its message, built straight
/// from the layout's values; `None` otherwise, and the layout's envelope
/// then goes through the general rules (the same message, or its error).
#[inline]
fn layout_message(payload: &Bytes, l: &scan::Layout<'_>) -> Option<Message> {
    if l.from.is_empty() || l.from == "0" || l.to.is_empty() || l.content == "null" {
        return None;
    }
    let (Some(stamp), Some(stamp_ord), Some(id)) =
        (l.stamp, l.stamp_ord, MessageId::from_text(l.id))
    else {
        return None;
    };
    Some(Message {
        from: Name::slice_of(payload, l.from),
        to: Name::slice_of(payload, l.to),
        content: ByteStr::slice_of(payload, l.content),
        id: MsgId::Uuid(id),
        stamp,
        stamp_ord,
        broadcast: l.broadcast,
        extra: Vec::new(),
        fds: crate::message::Fds::default(),
    })
}

fn envelope_to_message(payload: &Bytes, env: RawEnvelope<'_>) -> Result<Message> {
    let from = match env.from {
        Some(f) if !f.is_empty() && f != "0" => owned_or_slice_name(payload, f),
        _ => return Err(Error::FromRequired),
    };
    let Some(content) = env.content else {
        return Err(Error::ContentRequired);
    };
    let broadcast = env.broadcast.is_some_and(is_truthy);
    let to = env
        .to
        .filter(|t| !t.is_empty())
        .map(|t| owned_or_slice_name(payload, t));
    // An absent `to` (allowed on broadcasts) is the empty name.
    let Some(to) = to.or_else(|| broadcast.then(|| Name::copy_from(""))) else {
        return Err(Error::ToOrBroadcast);
    };
    let id = match env.id {
        // A UUID-length id is copied inline (cheaper than sharing the
        // frame's buffer: no reference count to take and drop).
        Some(id) => match MessageId::from_text(&id) {
            Some(inline) => MsgId::Uuid(inline),
            None => MsgId::Text(owned_or_slice(payload, id)),
        },
        None => MsgId::Uuid(new_message_id()),
    };
    let (stamp, stamp_ord) = stamp_pair(env.stamp, env.stamp_ord);
    let extra = env
        .extra
        .into_iter()
        .map(|(k, v)| (owned_or_slice(payload, k), ByteStr::slice_of(payload, v)))
        .collect();
    Ok(Message {
        from,
        to,
        content: ByteStr::slice_of(payload, content),
        id,
        stamp,
        stamp_ord,
        broadcast,
        extra,
        fds: crate::message::Fds::default(),
    })
}

fn encode_json_envelope<T: Serialize + ?Sized>(
    msg: &Outgoing<'_, T>,
    out: &mut BytesMut,
) -> Result<()> {
    let start = out.len();
    out.extend_from_slice(b"{\"from\":");
    push_str(msg.from, out);
    out.extend_from_slice(b",\"to\":");
    push_str(msg.to, out);
    out.extend_from_slice(b",\"content\":");
    let content_at = out.len();
    match &msg.content {
        Content::Value(v) => {
            if let Err(e) = to_ascii_json(*v, out) {
                out.truncate(start);
                return Err(e.into());
            }
        }
        Content::Raw(r) => push_raw_ascii(trim_exact(r), out),
    }
    if &out[content_at..] == b"null" || out.len() == content_at {
        out.truncate(start);
        return Err(Error::ContentRequired);
    }
    out.extend_from_slice(b",\"id\":\"");
    match msg.id {
        Some(id) => {
            out.truncate(out.len() - 1);
            push_str(id, out);
        }
        None => {
            out.extend_from_slice(new_message_id().as_str().as_bytes());
            out.extend_from_slice(b"\"");
        }
    }
    let (stamp, ord) = stamp_pair(msg.stamp, msg.stamp_ord);
    out.extend_from_slice(b",\"stamp\":");
    json::push_stamp(stamp, out)?;
    out.extend_from_slice(b",\"stamp_ord\":");
    out.extend_from_slice(itoa::Buffer::new().format(ord).as_bytes());
    if msg.broadcast {
        out.extend_from_slice(b",\"broadcast\":1");
    }
    for (k, v) in msg.extra {
        if matches!(
            k.as_str(),
            "from" | "to" | "content" | "id" | "stamp" | "stamp_ord" | "broadcast"
        ) {
            continue;
        }
        out.extend_from_slice(b",");
        push_str(k, out);
        out.extend_from_slice(b":");
        push_raw_ascii(v, out);
    }
    out.extend_from_slice(b"}");
    Ok(())
}

/// The stamp and `stamp_ord` of an outgoing message: given ones, or the
/// next of the process (see [`crate::message::next_stamp`]).
pub(crate) fn stamp_pair(stamp: Option<f64>, ord: Option<u64>) -> (f64, u64) {
    match (stamp, ord) {
        (Some(s), Some(o)) => (s, o),
        (Some(s), None) => (s, next_stamp_ord(s)),
        (None, o) => {
            let (s, n) = next_stamp();
            (s, o.unwrap_or(n))
        }
    }
}

/// `str::trim`, with two byte tests for the usual text: one whose first
/// and last bytes are visible ASCII has no whitespace at either end. (The
/// batched send's `trim_json` differs on purpose: it leaves a non-ASCII
/// end as it is.)
#[inline]
pub(crate) fn trim_exact(text: &str) -> &str {
    match text.as_bytes() {
        [first, .., last] if first.is_ascii_graphic() && last.is_ascii_graphic() => text,
        _ => text.trim(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hello_is_exact() {
        let mut out = BytesMut::new();
        Serializer::Json.encode_hello("cli", &mut out);
        assert_eq!(&out[..], br#"{"hello":"cli"}"#);
    }

    #[test]
    fn class_prefix_rules() {
        assert_eq!(
            expand_class("JSON", CLASS_PREFIX),
            "IPC::Manager::Serializer::JSON"
        );
        assert_eq!(expand_class("+My::Ser", CLASS_PREFIX), "My::Ser");
        let s = Serializer::from_spec(&serde_json::json!("JSON")).unwrap();
        assert_eq!(s, Serializer::Json);
        assert!(matches!(
            Serializer::from_spec(&serde_json::json!("Nope")),
            Err(Error::UnsupportedSerializer(c)) if c == "IPC::Manager::Serializer::Nope"
        ));
    }

    #[test]
    fn trim_exact_is_str_trim() {
        for t in [
            "",
            " ",
            "x",
            "\"abc\"",
            " 1 ",
            "\t[1]\n",
            "{}\u{3000}",
            "\u{a0}7",
            "é",
            "1\u{2029}",
            "\u{85}",
        ] {
            assert_eq!(trim_exact(t), t.trim(), "{t:?}");
        }
    }

    #[test]
    fn envelope_round_trips() {
        let mut out = BytesMut::new();
        let extra = vec![(ByteStr::from("note"), ByteStr::from("[1,\"é\"]"))];
        let msg = Outgoing {
            from: "a",
            to: "b/é",
            content: Content::Value(&serde_json::json!({"x": "😀"})),
            id: None,
            stamp: Some(1795639018.0416),
            stamp_ord: Some(3),
            broadcast: true,
            extra: &extra,
        };
        Serializer::Json.encode_message(&msg, &mut out).unwrap();
        assert!(out.is_ascii());
        let payload = out.freeze();
        let m = Serializer::Json.decode_message(&payload).unwrap().unwrap();
        assert_eq!(m.from(), "a");
        assert_eq!(m.to(), Some("b/é"));
        assert_eq!(m.content_value().unwrap(), serde_json::json!({"x": "😀"}));
        assert_eq!(m.stamp(), 1795639018.0416);
        assert_eq!(m.stamp_ord(), 3);
        assert!(m.is_broadcast());
        assert_eq!(m.extra("note"), Some(r#"[1,"\u00e9"]"#));
        assert_eq!(m.id().len(), 36);
    }

    #[test]
    fn invalid_messages_are_reported_not_panicked() {
        let cases: [(&str, &str); 4] = [
            (
                r#"{"to":"b","content":1}"#,
                "'from' is a required attribute",
            ),
            (
                r#"{"from":"a","to":"b"}"#,
                "'content' is a required attribute",
            ),
            (
                r#"{"from":"a","to":"b","content":null}"#,
                "'content' is a required attribute",
            ),
            (
                r#"{"from":"a","content":1}"#,
                "Message must either have a 'to' or 'broadcast' attribute",
            ),
        ];
        for (text, want) in cases {
            match Serializer::Json.decode_message(&Bytes::from(text)) {
                Err(DecodeError::Invalid(e)) => assert_eq!(e.to_string(), want),
                other => panic!("{text}: {other:?}"),
            }
        }
        assert!(matches!(
            Serializer::Json.decode_message(&Bytes::from_static(b"")),
            Err(DecodeError::Malformed(_))
        ));
        assert!(matches!(
            Serializer::Json.decode_message(&Bytes::from_static(br#"{"hello":"x"}"#)),
            Ok(None)
        ));
        assert!(matches!(
            Serializer::Json.decode_message(&Bytes::from_static(b"[1]")),
            Ok(None)
        ));
    }

    #[test]
    fn missing_stamp_and_id_are_filled() {
        let m = Serializer::Json
            .decode_message(&Bytes::from_static(
                br#"{"from":"a","to":"b","content":"x"}"#,
            ))
            .unwrap()
            .unwrap();
        assert!(m.stamp() > 1.0e9);
        assert_eq!(m.id().len(), 36);
    }

    /// Ids are kept exactly as received, whether copied inline (36 bytes,
    /// a UUID's length, any UTF-8) or shared with the frame (other lengths,
    /// escaped text).
    #[test]
    fn layout_fast_path_builds_the_general_paths_message() {
        let uuid = "\"3F2504E0-4F89-41D3-9A0C-0305E82C3301\"";
        let summary = |m: &Message| {
            format!(
                "{}|{:?}|{}|{}|{}|{}|{}|{:?}",
                m.from(),
                m.to(),
                m.content_json(),
                m.id(),
                m.stamp().to_bits(),
                m.stamp_ord(),
                m.is_broadcast(),
                m.extra
            )
        };
        let mut fast = 0;
        for from in [
            "\"a\"",
            "\"0\"",
            "\"\"",
            "\"a-much-longer-sender-name-than-inline-names\"",
        ] {
            for to in ["\"sink\"", "\"\""] {
                for content in ["1", "null", "\"x\"", "{\"terminate\":1}"] {
                    for id in [uuid, "\"short\""] {
                        for (stamp, ord) in [("1795565113.71625", "3"), ("1e400", "0"), ("2", "-1")]
                        {
                            for tail in ["}", ",\"broadcast\":1}"] {
                                let p = Bytes::from(format!(
                                    "{{\"from\":{from},\"to\":{to},\"content\":{content},\
                                     \"id\":{id},\"stamp\":{stamp},\"stamp_ord\":{ord}{tail}"
                                ));
                                // The reference: serde_json's envelope and the
                                // general rules.
                                let env: RawEnvelope<'_> = serde_json::from_slice(&p).unwrap();
                                let want = envelope_to_message(&p, env);
                                let layout = scan::ipcm_layout(std::str::from_utf8(&p).unwrap());
                                match layout.and_then(|l| layout_message(&p, &l)) {
                                    Some(m) => {
                                        fast += 1;
                                        let want = want.expect("the fast path took an invalid one");
                                        // A missing stamp is filled with the time:
                                        // the fast path never takes those.
                                        assert_eq!(summary(&m), summary(&want), "{p:?}");
                                    }
                                    None => {
                                        // Taken by the general path: same result.
                                        let got = Serializer::Json.decode_message(&p);
                                        assert_eq!(got.is_ok(), want.is_ok(), "{p:?}");
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
        assert!(fast >= 8, "the fast path took {fast} payloads");
    }

    #[test]
    fn received_ids_are_kept_exactly() {
        let ids = [
            "3F2504E0-4F89-41D3-9A0C-0305E82C3301",
            "3f2504e0-4f89-41d3-9a0c-0305e82c3301",
            "ÄÖÜäöü-not-a-uuid-but-36-bytes",
            "short",
            "a-long-id-of-more-than-thirty-six-bytes-0123456789",
            "",
        ];
        for id in ids {
            let payload = format!(r#"{{"from":"a","to":"b","content":1,"id":"{id}"}}"#);
            let m = Serializer::Json
                .decode_message(&Bytes::from(payload))
                .unwrap()
                .unwrap();
            assert_eq!(m.id(), id);
        }
        // An escaped id is decoded (and then copied, being 36 bytes).
        let m = Serializer::Json
            .decode_message(&Bytes::from_static(
                br#"{"from":"a","to":"b","content":1,"id":"\u00c4\u00d6\u00dc\u00e4\u00f6\u00fc-not-a-uuid-but-36-bytes"}"#,
            ))
            .unwrap()
            .unwrap();
        assert_eq!(m.id(), "ÄÖÜäöü-not-a-uuid-but-36-bytes");
    }

    /// Re-encodes every captured Perl message: the bytes are ASCII-only and
    /// decode to exactly what Perl decoded.
    #[test]
    fn captured_messages_reencode_to_perl_equivalent_bytes() {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/vectors/wire_capture.jsonl"
        );
        let text = std::fs::read_to_string(path).unwrap();
        let rows: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        let mut hello = BytesMut::new();
        Serializer::Json.encode_hello("caller", &mut hello);
        assert_eq!(&hello[..], rows[0]["payload"].as_str().unwrap().as_bytes());
        for row in &rows[1..] {
            let d = &row["decoded"];
            let mut out = BytesMut::new();
            let msg = Outgoing {
                from: d["from"].as_str().unwrap(),
                to: d["to"].as_str().unwrap(),
                content: Content::Value(&d["content"]),
                id: d["id"].as_str(),
                stamp: d["stamp"].as_f64(),
                stamp_ord: d["stamp_ord"].as_u64(),
                broadcast: false,
                extra: &[],
            };
            Serializer::Json.encode_message(&msg, &mut out).unwrap();
            assert!(out.is_ascii());
            let back: serde_json::Value = serde_json::from_slice(&out).unwrap();
            assert_eq!(&back, d);
            let perl = row["payload"].as_str().unwrap();
            if perl.contains("\\u00e9") || perl.contains("\\u") {
                assert!(std::str::from_utf8(&out).unwrap().contains("\\u00e9"));
            }
            // Same stamp text as Perl wrote (15 significant digits).
            let stamp = d["stamp"].to_string();
            assert!(perl.contains(&format!("\"stamp\":{stamp}")));
            assert!(
                std::str::from_utf8(&out)
                    .unwrap()
                    .contains(&format!("\"stamp\":{stamp}"))
            );
        }
    }

    #[test]
    fn hello_decoding() {
        let s = Serializer::Json;
        assert_eq!(
            s.decode_hello(&Bytes::from_static(br#"{"hello":"cli"}"#))
                .unwrap()
                .unwrap(),
            "cli"
        );
        assert_eq!(
            s.decode_hello(&Bytes::from_static(br#"{"hello":"cli","x":1}"#))
                .unwrap()
                .unwrap(),
            "cli"
        );
        assert!(
            s.decode_hello(&Bytes::from_static(br#"{"hello":""}"#))
                .unwrap()
                .is_none()
        );
        assert!(
            s.decode_hello(&Bytes::from_static(br#"[1]"#))
                .unwrap()
                .is_none()
        );
        assert!(s.decode_hello(&Bytes::from_static(b"garbage")).is_err());
    }
}
#[cfg(test)]
mod deep_tests {
    use super::*;

    /// Deep nesting never overflows the stack: an envelope too deep is an
    /// error; deep content stays raw and fails cleanly when asked for.
    #[test]
    fn deep_nesting_is_handled_without_recursion() {
        let deep = format!(
            r#"{{"from":"w","to":"s","content":{}1{}}}"#,
            "[".repeat(100_000),
            "]".repeat(100_000)
        );
        let m = Serializer::Json
            .decode_message(&Bytes::from(deep))
            .unwrap()
            .unwrap();
        assert!(
            m.content_value().is_err(),
            "the JSON parser's depth limit applies"
        );
        let deep_obj = format!("{}1{}", "{\"a\":".repeat(50_000), "}".repeat(50_000));
        assert!(
            Serializer::Json
                .decode_message(&Bytes::from(deep_obj))
                .is_err()
        );
    }
}
