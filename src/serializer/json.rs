//! The Perl-compatible `IPC::Manager::Serializer::JSON` encoding.
//!
//! Output is compact and ASCII-only: every non-ASCII character becomes a
//! `\uXXXX` escape (a surrogate pair above U+FFFF), because the Perl decoder
//! reads payload bytes as Latin-1. Decoding borrows from the frame: strings
//! without escapes and the raw `content` text become slices of the received
//! buffer.

use std::borrow::Cow;
use std::fmt;
use std::io;

use bytes::{BufMut, BytesMut};
use serde::Serialize;
use serde::de::{self, Deserialize, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde_json::value::RawValue;

/// A `serde_json` formatter that writes compact, ASCII-only JSON.
#[derive(Debug, Clone, Copy, Default)]
pub struct AsciiFormatter;

impl serde_json::ser::Formatter for AsciiFormatter {
    fn write_string_fragment<W: ?Sized + io::Write>(
        &mut self,
        writer: &mut W,
        fragment: &str,
    ) -> io::Result<()> {
        if fragment.is_ascii() {
            return writer.write_all(fragment.as_bytes());
        }
        write_ascii_escaped(writer, fragment)
    }
}

/// Writes `text` with every non-ASCII character as a `\uXXXX` escape.
///
/// Safe on a whole JSON document too: outside strings JSON is ASCII, so only
/// string contents change, and only in representation.
fn write_ascii_escaped<W: ?Sized + io::Write>(writer: &mut W, text: &str) -> io::Result<()> {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let bytes = text.as_bytes();
    let mut start = 0;
    for (i, ch) in text.char_indices() {
        if ch.is_ascii() {
            continue;
        }
        writer.write_all(&bytes[start..i])?;
        let mut units = [0u16; 2];
        for unit in ch.encode_utf16(&mut units) {
            let u = *unit as usize;
            let esc = [
                b'\\',
                b'u',
                HEX[(u >> 12) & 0xF],
                HEX[(u >> 8) & 0xF],
                HEX[(u >> 4) & 0xF],
                HEX[u & 0xF],
            ];
            writer.write_all(&esc)?;
        }
        start = i + ch.len_utf8();
    }
    writer.write_all(&bytes[start..])
}

/// Serializes `value` as compact ASCII-only JSON onto `out`.
pub fn to_ascii_json<T: Serialize + ?Sized>(
    value: &T,
    out: &mut BytesMut,
) -> serde_json::Result<()> {
    let mut ser = serde_json::Serializer::with_formatter(out.writer(), AsciiFormatter);
    value.serialize(&mut ser)
}

/// Appends a JSON text, re-escaping any non-ASCII characters.
pub fn push_raw_ascii(raw: &str, out: &mut BytesMut) {
    if raw.is_ascii() {
        out.extend_from_slice(raw.as_bytes());
    } else {
        // Writing into a BytesMut cannot fail.
        let _ = write_ascii_escaped(&mut out.writer(), raw);
    }
}

/// Appends `s` as a JSON string literal (ASCII-only).
pub fn push_str(s: &str, out: &mut BytesMut) {
    if is_plain_ascii(s.as_bytes()) {
        // What serde_json writes for such a string: its bytes, quoted
        // (nothing in 0x20..=0x7e but `"` and `\` is escaped). A name or
        // an id takes this way, without the serializer's machinery.
        out.reserve(s.len() + 2);
        out.extend_from_slice(b"\"");
        out.extend_from_slice(s.as_bytes());
        out.extend_from_slice(b"\"");
        return;
    }
    // Serializing a &str into memory cannot fail.
    let _ = to_ascii_json(s, out);
}

/// Whether every byte is printable ASCII (0x20..=0x7e) other than `"`
/// and `\\`: a JSON string's text that needs no escape.
#[inline]
fn is_plain_ascii(b: &[u8]) -> bool {
    b.iter()
        .all(|&c| (0x20..=0x7e).contains(&c) && c != b'"' && c != b'\\')
}

/// Appends a stamp as serde_json writes an `f64` (the shortest decimal
/// that reads back as the same number), without serde_json for the
/// stamps ipcm makes: a whole number of 10 µs ticks divided by 100,000
/// ([`crate::message::next_stamp`]), from 1 s to 10^10 s.
///
/// Such a stamp is the `f64` nearest to the decimal `secs.fffff`; an
/// `f64` there is at most 3.8e-6 from its neighbours, closer than two
/// decimals of five places (1e-5), so no other decimal of as few digits
/// reads back as it: that decimal, its trailing zeros dropped, is the
/// shortest, and serde_json writes it (`.0` for a whole second). Any
/// other stamp goes through serde_json. The tests compare the two over
/// every tick of a span and random ticks of the whole range.
pub(crate) fn push_stamp(stamp: f64, out: &mut BytesMut) -> serde_json::Result<()> {
    if (1.0..1e10).contains(&stamp) {
        // The nearest tick (a truncating conversion of a positive value
        // plus a half: no call to `round`), checked below.
        let t = (stamp * 100_000.0 + 0.5) as u64;
        if t as f64 / 100_000.0 == stamp {
            let mut buf = itoa::Buffer::new();
            out.extend_from_slice(buf.format(t / 100_000).as_bytes());
            let frac = t % 100_000;
            if frac == 0 {
                out.extend_from_slice(b".0");
                return Ok(());
            }
            // "1fffff": the five decimals with their leading zeros, behind
            // a 1 that becomes the point.
            let mut digits = *buf
                .format(100_000 + frac)
                .as_bytes()
                .first_chunk::<6>()
                .expect("six digits");
            digits[0] = b'.';
            let mut end = 6;
            while digits[end - 1] == b'0' {
                end -= 1;
            }
            out.extend_from_slice(&digits[..end]);
            return Ok(());
        }
    }
    to_ascii_json(&stamp, out)
}

/// A string that borrows from the input when it has no escapes.
#[derive(Debug)]
pub(crate) struct CowStr<'a>(pub Cow<'a, str>);

impl<'de> Deserialize<'de> for CowStr<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = CowStr<'de>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a string")
            }
            fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Self::Value, E> {
                Ok(CowStr(Cow::Borrowed(v)))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
                Ok(CowStr(Cow::Owned(v.to_owned())))
            }
            fn visit_string<E: de::Error>(self, v: String) -> Result<Self::Value, E> {
                Ok(CowStr(Cow::Owned(v)))
            }
            // Perl stringifies numeric ids; accept them the same way.
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Self::Value, E> {
                Ok(CowStr(Cow::Owned(v.to_string())))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Self::Value, E> {
                Ok(CowStr(Cow::Owned(v.to_string())))
            }
        }
        d.deserialize_any(V)
    }
}

/// A decoded top-level JSON payload, borrowing from the frame.
#[derive(Debug, Default)]
pub(crate) struct RawEnvelope<'a> {
    pub is_object: bool,
    pub keys: usize,
    pub from: Option<Cow<'a, str>>,
    pub to: Option<Cow<'a, str>>,
    pub content: Option<&'a str>,
    pub id: Option<Cow<'a, str>>,
    pub stamp: Option<f64>,
    pub stamp_ord: Option<u64>,
    pub broadcast: Option<&'a str>,
    pub hello: Option<&'a str>,
    pub extra: Vec<(Cow<'a, str>, &'a str)>,
    /// A field of the wrong type, reported once the rest is known.
    pub bad_field: Option<&'static str>,
}

/// Reads a JSON string value (or `null`) that must be a string.
fn opt_str(raw: &str) -> Option<Cow<'_, str>> {
    if let [b'"', inner @ .., b'"'] = raw.as_bytes()
        && !inner.contains(&b'\\')
    {
        // No escape: the text between the quotes (already checked).
        return Some(Cow::Borrowed(&raw[1..raw.len() - 1]));
    }
    serde_json::from_str::<CowStr<'_>>(raw).ok().map(|c| c.0)
}

/// The envelope's keys, as the decoders tell them apart (the scanner
/// matches them as literals, so the hot path compares no key text).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Field {
    From,
    To,
    Content,
    Id,
    Stamp,
    StampOrd,
    Broadcast,
    Hello,
}

impl Field {
    /// The field a decoded key names, if any.
    #[inline]
    pub(crate) fn of(key: &str) -> Option<Field> {
        Some(match key {
            "from" => Field::From,
            "to" => Field::To,
            "content" => Field::Content,
            "id" => Field::Id,
            "stamp" => Field::Stamp,
            "stamp_ord" => Field::StampOrd,
            "broadcast" => Field::Broadcast,
            "hello" => Field::Hello,
            _ => return None,
        })
    }
}

/// A key of a received envelope: one of the envelope's own, or another.
#[derive(Debug)]
pub(crate) enum Key<'a> {
    Known(Field),
    Other(Cow<'a, str>),
}

impl<'a> Key<'a> {
    /// The key a decoded key text is.
    pub(crate) fn of(key: Cow<'a, str>) -> Key<'a> {
        match Field::of(&key) {
            Some(f) => Key::Known(f),
            None => Key::Other(key),
        }
    }
}

impl<'a> RawEnvelope<'a> {
    /// Takes one key and its raw value (both decoders share this, so they
    /// agree on what every key means, repeated keys included).
    pub(crate) fn take(&mut self, key: Cow<'a, str>, raw: &'a str) {
        self.take_value(Key::of(key), raw, false);
    }

    /// [`RawEnvelope::take`], told whether `raw` is known to be a string
    /// without escapes (its text is then what is between the quotes).
    #[inline]
    pub(crate) fn take_value(&mut self, key: Key<'a>, raw: &'a str, plain: bool) {
        let text = |raw: &'a str| {
            if plain {
                Some(Cow::Borrowed(&raw[1..raw.len() - 1]))
            } else {
                opt_str(raw)
            }
        };
        self.keys += 1;
        let field = match key {
            Key::Known(f) => f,
            Key::Other(key) => {
                self.extra.push((key, raw));
                return;
            }
        };
        match field {
            Field::From => {
                self.from = text(raw);
                if self.from.is_none() && raw != "null" {
                    self.bad_field = Some("from");
                }
            }
            Field::To => self.to = text(raw),
            Field::Content => self.content = (raw != "null").then_some(raw),
            Field::Id => self.id = text(raw),
            Field::Stamp => self.stamp = parse_number(raw),
            Field::StampOrd => {
                self.stamp_ord = parse_number(raw).filter(|v| *v >= 0.0).map(|v| v as u64)
            }
            Field::Broadcast => self.broadcast = Some(raw),
            Field::Hello => self.hello = Some(raw),
        }
    }
}

impl<'de> Deserialize<'de> for RawEnvelope<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = RawEnvelope<'de>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a JSON value")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut env = RawEnvelope {
                    is_object: true,
                    ..RawEnvelope::default()
                };
                while let Some(key) = map.next_key::<CowStr<'de>>()? {
                    let raw: &'de RawValue = map.next_value()?;
                    env.take(key.0, raw.get());
                }
                Ok(env)
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
                while seq.next_element::<IgnoredAny>()?.is_some() {}
                Ok(RawEnvelope::default())
            }
            fn visit_bool<E: de::Error>(self, _: bool) -> Result<Self::Value, E> {
                Ok(RawEnvelope::default())
            }
            fn visit_i64<E: de::Error>(self, _: i64) -> Result<Self::Value, E> {
                Ok(RawEnvelope::default())
            }
            fn visit_u64<E: de::Error>(self, _: u64) -> Result<Self::Value, E> {
                Ok(RawEnvelope::default())
            }
            fn visit_f64<E: de::Error>(self, _: f64) -> Result<Self::Value, E> {
                Ok(RawEnvelope::default())
            }
            fn visit_str<E: de::Error>(self, _: &str) -> Result<Self::Value, E> {
                Ok(RawEnvelope::default())
            }
            fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
                Ok(RawEnvelope::default())
            }
        }
        d.deserialize_any(V)
    }
}

pub(crate) use crate::message::is_truthy;

/// A JSON number as the nearest `f64` (correctly rounded, unlike
/// serde_json's fast path, which can miss by an ulp on long inputs and
/// would then change a stamp that is passed on); `None` for anything else
/// or a value out of range.
pub(crate) fn parse_number(text: &str) -> Option<f64> {
    let t = text.as_bytes();
    if !matches!(t.first(), Some(b'-' | b'0'..=b'9')) {
        return None;
    }
    if let Some(v) = exact_decimal(t) {
        return Some(v);
    }
    text.parse::<f64>().ok().filter(|v| v.is_finite())
}

/// The powers of ten that are exact doubles (Clinger's fast path, here
/// and in the scanner's one-pass stamp numbers).
pub(crate) const POW10: [f64; 23] = [
    1e0, 1e1, 1e2, 1e3, 1e4, 1e5, 1e6, 1e7, 1e8, 1e9, 1e10, 1e11, 1e12, 1e13, 1e14, 1e15, 1e16,
    1e17, 1e18, 1e19, 1e20, 1e21, 1e22,
];

/// A decimal `-?digits[.digits]` whose digits, read as one integer, are
/// below 2^53 and whose fraction has at most 22 digits: both that integer
/// and the power of ten are exact doubles, so one division is correctly
/// rounded (Clinger's fast path) and agrees with `str::parse`. Stamps are
/// such numbers. `None` for anything else.
#[inline]
fn exact_decimal(t: &[u8]) -> Option<f64> {
    let (neg, digits) = match t {
        [b'-', rest @ ..] => (true, rest),
        _ => (false, t),
    };
    let mut mantissa: u64 = 0;
    let mut frac = None;
    let mut count = 0;
    for (i, &c) in digits.iter().enumerate() {
        match c {
            b'0'..=b'9' => {
                count += 1;
                if count > 16 {
                    return None;
                }
                mantissa = mantissa * 10 + u64::from(c - b'0');
            }
            b'.' if frac.is_none() && i > 0 => frac = Some(i),
            _ => return None,
        }
    }
    let scale = match frac {
        Some(at) if at + 1 == digits.len() => return None,
        Some(at) => digits.len() - at - 1,
        None if digits.is_empty() => return None,
        None => 0,
    };
    if mantissa >= 1 << 53 || scale >= POW10.len() {
        return None;
    }
    let v = mantissa as f64 / POW10[scale];
    Some(if neg { -v } else { v })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stamp_text(stamp: f64) -> String {
        let mut out = BytesMut::new();
        push_stamp(stamp, &mut out).unwrap();
        String::from_utf8(out.to_vec()).unwrap()
    }

    /// The stamp writer's short way gives serde_json's text: for every
    /// tick of a span (every pattern of the five decimals, whole seconds
    /// included), for random ticks across 1 s to 10^10 s, at the range's
    /// edges, and for stamps that are no whole tick (serde_json's way).
    #[test]
    fn stamps_are_written_as_serde_json_writes_them() {
        let check = |stamp: f64| {
            assert_eq!(
                stamp_text(stamp),
                serde_json::to_string(&stamp).unwrap(),
                "{stamp:?}"
            );
        };
        let base = 1_795_565_113u64 * 100_000;
        for t in base - 3..base + 200_003 {
            check(t as f64 / 100_000.0);
        }
        let mut x: u64 = 0x2545_F491_4F6C_DD1D;
        for _ in 0..300_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            // Ticks from 1 s to 10^10 s, and the same scaled down so that
            // short integer parts come up as often as long ones.
            let t = 100_000 + x % (1_000_000_000_000_000 - 100_000);
            check(t as f64 / 100_000.0);
            check((100_000 + t % 10_000_000_000) as f64 / 100_000.0);
        }
        for stamp in [
            1.0,
            1.00001,
            9_999_999_999.999_99,
            0.99999,
            1e10,
            1795565113.716251,
            1795565113.0000001,
            0.5,
            -1795565113.71625,
            f64::MAX,
            1e-7,
        ] {
            check(stamp);
        }
    }

    #[test]
    fn plain_strings_are_written_as_serde_json_writes_them() {
        for s in [
            "",
            "src",
            "sink",
            "a b",
            "~",
            "\u{7f}",
            "é",
            "a\"b",
            "a\\b",
            "\n",
            "\u{1f}",
            "x\u{0}",
            "2C814B02-7532-46B1-AE22-59791AC81A49",
        ] {
            let mut out = BytesMut::new();
            push_str(s, &mut out);
            let mut want = BytesMut::new();
            to_ascii_json(s, &mut want).unwrap();
            assert_eq!(out, want, "{s:?}");
        }
    }

    #[test]
    fn long_stamps_parse_to_the_nearest_double() {
        // Found by fuzzing: serde_json's fast float path was an ulp off, so
        // a forwarded stamp changed.
        let text = "17955651177777777737.1625";
        assert_eq!(parse_number(text), Some(text.parse::<f64>().unwrap()));
        assert_eq!(parse_number("1e400"), None);
        assert_eq!(parse_number("\"1\""), None);
        assert_eq!(parse_number("-2.5"), Some(-2.5));
    }

    #[test]
    fn the_exact_decimal_path_agrees_with_str_parse() {
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        let mut fast = 0;
        for _ in 0..200_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let int = x % 10_000_000_000;
            let frac_digits = (x >> 40) as usize % 8;
            let frac = (x >> 20) % 10u64.pow(frac_digits as u32);
            let t = if frac_digits == 0 {
                int.to_string()
            } else {
                format!("{int}.{frac:0frac_digits$}")
            };
            let t = if x & 1 == 1 { format!("-{t}") } else { t };
            match exact_decimal(t.as_bytes()) {
                Some(v) => {
                    fast += 1;
                    assert_eq!(v.to_bits(), t.parse::<f64>().unwrap().to_bits(), "{t}");
                }
                // Only long inputs leave the fast path.
                None => assert!(t.len() > 16, "{t}"),
            }
        }
        assert!(fast > 150_000, "{fast} on the fast path");
        for t in [
            "1.",
            ".5",
            "-",
            "",
            "1e5",
            "01.5",
            "12345678901234567",
            "1.2.3",
        ] {
            if let Some(v) = exact_decimal(t.as_bytes()) {
                assert_eq!(Some(v), t.parse::<f64>().ok(), "{t}");
            }
        }
    }

    #[test]
    fn non_ascii_is_escaped_with_surrogates() {
        let mut out = BytesMut::new();
        to_ascii_json(&serde_json::json!({"k": "trés 😀 /"}), &mut out).unwrap();
        assert_eq!(&out[..], br#"{"k":"tr\u00e9s \ud83d\ude00 /"}"#);
        // Perl (and serde_json) read it back to the same text.
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["k"], "trés 😀 /");
    }

    #[test]
    fn raw_text_is_reescaped() {
        let mut out = BytesMut::new();
        push_raw_ascii(r#"["é",1]"#, &mut out);
        assert_eq!(&out[..], br#"["\u00e9",1]"#);
    }

    #[test]
    fn envelope_borrows_plain_strings() {
        let text = r#"{"from":"a","to":"b\u00e9","content":{"x":[1,2]},"stamp":1.5,"k":true}"#;
        let env: RawEnvelope = serde_json::from_str(text).unwrap();
        assert!(matches!(env.from, Some(Cow::Borrowed("a"))));
        assert!(matches!(env.to.as_deref(), Some("bé")));
        assert_eq!(env.content.unwrap(), r#"{"x":[1,2]}"#);
        assert_eq!(env.stamp, Some(1.5));
        assert_eq!(env.extra.len(), 1);
        assert_eq!(env.keys, 5);
    }

    #[test]
    fn top_level_non_objects_are_recognised() {
        for t in ["[1,[2]]", "3", "\"s\"", "true", "null"] {
            let env: RawEnvelope = serde_json::from_str(t).unwrap();
            assert!(!env.is_object, "{t}");
        }
        assert!(serde_json::from_str::<RawEnvelope>("{} x").is_err());
    }

    #[test]
    fn truthiness_follows_perl() {
        for (t, want) in [
            ("1", true),
            ("0", false),
            ("\"0\"", false),
            ("true", true),
            ("null", false),
        ] {
            assert_eq!(is_truthy(t), want, "{t}");
        }
    }
}
