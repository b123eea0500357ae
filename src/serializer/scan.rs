//! The envelope scanner of the Json routes: one pass over a received
//! payload that finds the top-level keys and the extent of each value, and
//! leaves every value raw (the content stays text until asked for).
//!
//! It is hostile input's first contact, so it decides exactly as the
//! serde_json decoder of [`RawEnvelope`] does (that decoder is its oracle:
//! the `scan_envelope` fuzz target and the tests compare the two on every
//! input): the same payloads are accepted, with the same envelope, and the
//! same are refused.
//!
//! * A payload whose first value is not an object is left to serde_json
//!   itself (such payloads carry no message; they are rare).
//! * An object payload must be UTF-8 as a whole (serde_json refuses an
//!   object with any other byte too: outside strings JSON is ASCII, and it
//!   checks every key and raw value).
//! * Strings are checked as serde_json checks those it skips (no control
//!   character, valid escapes); a key with an escape is decoded by
//!   serde_json, which also refuses lone surrogates there.
//! * Values are skipped without recursion (an explicit stack of brackets),
//!   as serde_json skips a raw value: no depth limit, no stack to exhaust.

use std::borrow::Cow;

use super::json::{CowStr, Field, Key, RawEnvelope};

/// Why a payload is no JSON envelope (the text says where).
pub(crate) type ScanError = String;

/// Decodes a payload's envelope (see the module documentation).
pub(crate) fn scan_envelope(payload: &[u8]) -> Result<RawEnvelope<'_>, ScanError> {
    match simdutf8::basic::from_utf8(payload) {
        Ok(text) => match ipcm_layout(text) {
            Some(l) => Ok(l.into_envelope()),
            None => scan_text(text),
        },
        Err(_) => scan_bytes(payload),
    }
}

/// [`scan_envelope`] of a payload already checked as UTF-8, past ipcm's
/// layout (the caller tried [`ipcm_layout`] first).
pub(crate) fn scan_text(text: &str) -> Result<RawEnvelope<'_>, ScanError> {
    let start = skip_ws(text.as_bytes(), 0);
    if text.as_bytes().get(start) != Some(&b'{') {
        return serde_json::from_str(text).map_err(|e| e.to_string());
    }
    scan_object(text, start)
}

/// [`scan_envelope`] of a payload that is not UTF-8: serde_json decides
/// for a non-object (as for any), an object is refused.
fn scan_bytes(payload: &[u8]) -> Result<RawEnvelope<'_>, ScanError> {
    let start = skip_ws(payload, 0);
    if payload.get(start) != Some(&b'{') {
        return serde_json::from_slice(payload).map_err(|e| e.to_string());
    }
    Err("invalid UTF-8 in a JSON object payload".to_string())
}

/// The general scan of an object payload starting at `start`.
fn scan_object(text: &str, start: usize) -> Result<RawEnvelope<'_>, ScanError> {
    let payload = text.as_bytes();
    let mut s = Scanner {
        text,
        bytes: payload,
        pos: start + 1,
    };
    let mut env = RawEnvelope {
        is_object: true,
        ..RawEnvelope::default()
    };
    s.ws();
    if s.peek() == Some(b'}') {
        s.pos += 1;
    } else {
        loop {
            match s.peek() {
                Some(b'"') => {}
                Some(_) => return Err(s.err("key must be a string")),
                None => return Err(s.err("EOF while parsing an object")),
            }
            let key = s.key()?;
            s.ws();
            match s.peek() {
                Some(b':') => s.pos += 1,
                Some(_) => return Err(s.err("expected `:`")),
                None => return Err(s.err("EOF while parsing an object")),
            }
            s.ws();
            let from = s.pos;
            let plain = s.value()?;
            env.take_value(key, &text[from..s.pos], plain);
            s.ws();
            match s.peek() {
                Some(b',') => {
                    s.pos += 1;
                    s.ws();
                    if s.peek() == Some(b'}') {
                        return Err(s.err("trailing comma"));
                    }
                }
                Some(b'}') => {
                    s.pos += 1;
                    break;
                }
                Some(_) => return Err(s.err("expected `,` or `}`")),
                None => return Err(s.err("EOF while parsing an object")),
            }
        }
    }
    s.ws();
    if s.pos != payload.len() {
        return Err(s.err("trailing characters"));
    }
    Ok(env)
}

/// The envelope exactly as ipcm's encoder lays it out (compact, its keys
/// in its order, strings without escapes): its values, found by matching
/// the layout literal by literal, with the general scanner's own checks
/// for each value, so that it accepts only what the general scan accepts,
/// with the same envelope. `None` at the first difference (then the
/// general scan runs: Perl peers order their keys at random, and their
/// payloads take it).
#[derive(Debug)]
pub(crate) struct Layout<'a> {
    pub from: &'a str,
    pub to: &'a str,
    /// Raw JSON (possibly `null`).
    pub content: &'a str,
    pub id: &'a str,
    pub stamp: Option<f64>,
    pub stamp_ord: Option<u64>,
    pub broadcast: bool,
}

/// See [`Layout`].
#[inline]
pub(crate) fn ipcm_layout(text: &str) -> Option<Layout<'_>> {
    let mut s = Scanner {
        text,
        bytes: text.as_bytes(),
        pos: 0,
    };
    s.literal(b"{\"from\":")?;
    let from = s.plain_string()?;
    s.literal(b",\"to\":")?;
    let to = s.plain_string()?;
    s.literal(b",\"content\":")?;
    // Compact: the value starts right here (the general value scan would
    // skip whitespace first, and the content would keep it).
    if matches!(s.peek(), Some(b' ' | b'\n' | b'\t' | b'\r')) {
        return None;
    }
    let at = s.pos;
    // The general value scan (any JSON value); a hostile one errs here as
    // it would there, and the general scan then reports it.
    s.value().ok()?;
    let content = &text[at..s.pos];
    s.literal(b",\"id\":")?;
    let id = s.plain_string()?;
    s.literal(b",\"stamp\":")?;
    let stamp = s.number_value()?;
    s.literal(b",\"stamp_ord\":")?;
    let stamp_ord = s.number_value()?.filter(|v| *v >= 0.0).map(|v| v as u64);
    let broadcast = s.literal(b",\"broadcast\":1").is_some();
    s.literal(b"}")?;
    (s.pos == text.len()).then_some(Layout {
        from,
        to,
        content,
        id,
        stamp,
        stamp_ord,
        broadcast,
    })
}

impl<'a> Layout<'a> {
    /// The layout's values as the envelope the general scan finds.
    pub(crate) fn into_envelope(self) -> RawEnvelope<'a> {
        RawEnvelope {
            is_object: true,
            keys: 6 + usize::from(self.broadcast),
            from: Some(Cow::Borrowed(self.from)),
            to: Some(Cow::Borrowed(self.to)),
            content: (self.content != "null").then_some(self.content),
            id: Some(Cow::Borrowed(self.id)),
            stamp: self.stamp,
            stamp_ord: self.stamp_ord,
            broadcast: self.broadcast.then_some("1"),
            ..RawEnvelope::default()
        }
    }
}

/// The first byte of `b` that ends or interrupts a string's plain text: a
/// quote, a backslash or a control character. Sixteen bytes at a time
/// (SSE2, part of every x86-64), then eight (one `u64`).
#[inline]
fn find_special(b: &[u8]) -> Option<usize> {
    let mut i = 0;
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{
            __m128i, _mm_cmpeq_epi8, _mm_loadu_si128, _mm_min_epu8, _mm_movemask_epi8,
            _mm_or_si128, _mm_set1_epi8,
        };
        // SAFETY: SSE2 is in the x86-64 baseline, so these intrinsics are
        // always available; each unaligned 16-byte load reads
        // `b[i..i + 16]`, which the loop condition keeps inside `b`.
        unsafe {
            let quote = _mm_set1_epi8(b'"' as i8);
            let slash = _mm_set1_epi8(b'\\' as i8);
            let below = _mm_set1_epi8(0x1f);
            while i + 16 <= b.len() {
                let x = _mm_loadu_si128(b.as_ptr().add(i).cast::<__m128i>());
                // A control character is one equal to its minimum with
                // 0x1f (unsigned).
                let hit = _mm_or_si128(
                    _mm_or_si128(_mm_cmpeq_epi8(x, quote), _mm_cmpeq_epi8(x, slash)),
                    _mm_cmpeq_epi8(_mm_min_epu8(x, below), x),
                );
                let mask = _mm_movemask_epi8(hit) as u32;
                if mask != 0 {
                    return Some(i + mask.trailing_zeros() as usize);
                }
                i += 16;
            }
        }
    }
    find_special_swar(b, i)
}

/// [`find_special`] from `i`, eight bytes at a time.
#[inline]
fn find_special_swar(b: &[u8], mut i: usize) -> Option<usize> {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGH: u64 = 0x8080_8080_8080_8080;
    while let Some(chunk) = b.get(i..i + 8) {
        let x = u64::from_le_bytes(chunk.try_into().expect("eight bytes"));
        let quote = x ^ (ONES * u64::from(b'"'));
        let slash = x ^ (ONES * u64::from(b'\\'));
        // A byte is flagged when it is zero after the XOR (a match) or
        // below 0x20; bytes of 0x80 and above are never flagged.
        let hit = (quote.wrapping_sub(ONES) & !quote)
            | (slash.wrapping_sub(ONES) & !slash)
            | (x.wrapping_sub(ONES * 0x20) & !x);
        let hit = hit & HIGH;
        if hit != 0 {
            // The lowest flagged byte is exact (borrows only run upwards,
            // from a flagged byte), so its position is the first match.
            return Some(i + (hit.trailing_zeros() / 8) as usize);
        }
        i += 8;
    }
    b[i..]
        .iter()
        .position(|&c| c == b'"' || c == b'\\' || c < 0x20)
        .map(|p| i + p)
}

#[inline]
fn skip_ws(b: &[u8], mut i: usize) -> usize {
    while let Some(b' ' | b'\n' | b'\t' | b'\r') = b.get(i) {
        i += 1;
    }
    i
}

struct Scanner<'a> {
    text: &'a str,
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Scanner<'a> {
    #[inline]
    fn peek(&self) -> Option<u8> {
        self.bytes.get(self.pos).copied()
    }

    #[inline]
    fn ws(&mut self) {
        self.pos = skip_ws(self.bytes, self.pos);
    }

    #[cold]
    fn err(&self, what: &str) -> ScanError {
        format!("{what} at byte {}", self.pos)
    }

    /// Steps over `lit` if it comes next (a fixed-size compare, no
    /// `memcmp` call).
    #[inline]
    fn literal<const N: usize>(&mut self, lit: &[u8; N]) -> Option<()> {
        if self.bytes[self.pos..].first_chunk::<N>() == Some(lit) {
            self.pos += lit.len();
            Some(())
        } else {
            None
        }
    }

    /// A string value without escapes (checked as [`Scanner::string`]
    /// checks one): its text. `None` if it is not one.
    #[inline]
    fn plain_string(&mut self) -> Option<&'a str> {
        if self.peek() != Some(b'"') {
            return None;
        }
        let from = self.pos + 1;
        let at = find_special(&self.bytes[from..])?;
        if self.bytes[from + at] != b'"' {
            return None;
        }
        self.pos = from + at + 1;
        Some(&self.text[from..from + at])
    }

    /// A number value (checked as [`Scanner::value`] checks one), parsed
    /// as the envelope's decoders parse it. `None` if it is not one.
    ///
    /// Stamps and ordinals (`-?(0|[1-9][0-9]*)(.[0-9]+)?`, at most 16
    /// digits, below 2^53 as an integer) are checked and converted in one
    /// pass, exactly as `parse_number`'s exact path converts them; any
    /// other number takes the general check and `parse_number`.
    #[inline]
    fn number_value(&mut self) -> Option<Option<f64>> {
        let b = self.bytes;
        let from = self.pos;
        let mut i = from;
        let neg = b.get(i) == Some(&b'-');
        if neg {
            i += 1;
        }
        let digits = |i: &mut usize, m: &mut u64| {
            let start = *i;
            while let Some(&c) = b.get(*i) {
                let d = c.wrapping_sub(b'0');
                if d > 9 {
                    break;
                }
                // Wrapping: more than 16 digits are refused below.
                *m = m.wrapping_mul(10).wrapping_add(u64::from(d));
                *i += 1;
            }
            *i - start
        };
        let mut m = 0u64;
        let int_start = i;
        let int_len = digits(&mut i, &mut m);
        let mut scale = 0;
        let mut simple = int_len > 0 && (int_len == 1 || b[int_start] != b'0');
        if simple && b.get(i) == Some(&b'.') {
            i += 1;
            scale = digits(&mut i, &mut m);
            simple = scale > 0;
        }
        if simple && !matches!(b.get(i), Some(b'e' | b'E')) && int_len + scale <= 16 && m < 1 << 53
        {
            self.pos = i;
            let v = m as f64 / super::json::POW10[scale];
            return Some(Some(if neg { -v } else { v }));
        }
        if !matches!(b.get(from), Some(b'-' | b'0'..=b'9')) {
            return None;
        }
        self.pos = from;
        self.number().ok()?;
        Some(super::json::parse_number(&self.text[from..self.pos]))
    }

    /// A key: borrowed when it has no escape, else decoded by serde_json
    /// (which refuses what its own key parser refuses).
    fn key(&mut self) -> Result<Key<'a>, ScanError> {
        // The envelope's own keys, matched as literals (they have no
        // escape, so there is nothing to check inside them).
        let b = &self.bytes[self.pos..];
        let known = match b {
            [b'"', b'f', b'r', b'o', b'm', b'"', ..] => Some((Field::From, 6)),
            [b'"', b't', b'o', b'"', ..] => Some((Field::To, 4)),
            [b'"', b'i', b'd', b'"', ..] => Some((Field::Id, 4)),
            [b'"', b'c', b'o', b'n', b't', b'e', b'n', b't', b'"', ..] => Some((Field::Content, 9)),
            [b'"', b's', b't', b'a', b'm', b'p', b'"', ..] => Some((Field::Stamp, 7)),
            [
                b'"',
                b's',
                b't',
                b'a',
                b'm',
                b'p',
                b'_',
                b'o',
                b'r',
                b'd',
                b'"',
                ..,
            ] => Some((Field::StampOrd, 11)),
            [b'"', b'h', b'e', b'l', b'l', b'o', b'"', ..] => Some((Field::Hello, 7)),
            _ => None,
        };
        if let Some((field, len)) = known {
            self.pos += len;
            return Ok(Key::Known(field));
        }
        let from = self.pos;
        let escaped = self.string()?;
        let raw = &self.text[from..self.pos];
        if !escaped {
            return Ok(Key::of(Cow::Borrowed(&raw[1..raw.len() - 1])));
        }
        serde_json::from_str::<CowStr<'a>>(raw)
            .map(|c| Key::of(c.0))
            .map_err(|e| format!("{e} in a key at byte {from}"))
    }

    /// Skips a string starting at its opening quote, checking it as
    /// serde_json checks a skipped string; true if it has an escape.
    #[inline]
    fn string(&mut self) -> Result<bool, ScanError> {
        self.pos += 1;
        let mut escaped = false;
        loop {
            let Some(at) = find_special(&self.bytes[self.pos..]) else {
                self.pos = self.bytes.len();
                return Err(self.err("EOF while parsing a string"));
            };
            self.pos += at;
            match self.bytes[self.pos] {
                b'"' => {
                    self.pos += 1;
                    return Ok(escaped);
                }
                b'\\' => {
                    escaped = true;
                    self.pos += 1;
                    match self.peek() {
                        Some(b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't') => {
                            self.pos += 1
                        }
                        Some(b'u') => {
                            self.pos += 1;
                            for _ in 0..4 {
                                match self.peek() {
                                    Some(h) if h.is_ascii_hexdigit() => self.pos += 1,
                                    Some(_) => return Err(self.err("invalid escape")),
                                    None => return Err(self.err("EOF while parsing a string")),
                                }
                            }
                        }
                        Some(_) => return Err(self.err("invalid escape")),
                        None => return Err(self.err("EOF while parsing a string")),
                    }
                }
                _ => return Err(self.err("control character while parsing a string")),
            }
        }
    }

    /// Skips one value, as serde_json skips a raw value; true if it is a
    /// string without escapes.
    fn value(&mut self) -> Result<bool, ScanError> {
        if self.peek() == Some(b'"') {
            return Ok(!self.string()?);
        }
        // The brackets enclosing the current position, innermost last.
        let mut stack: Vec<u8> = Vec::new();
        loop {
            self.ws();
            match self.peek() {
                Some(b'n') => self.ident(b"null")?,
                Some(b't') => self.ident(b"true")?,
                Some(b'f') => self.ident(b"false")?,
                Some(b'-' | b'0'..=b'9') => self.number()?,
                Some(b'"') => {
                    self.string()?;
                }
                Some(open @ (b'[' | b'{')) => {
                    self.pos += 1;
                    self.ws();
                    let close = if open == b'[' { b']' } else { b'}' };
                    if self.peek() == Some(close) {
                        self.pos += 1;
                    } else {
                        stack.push(open);
                        if open == b'{' {
                            self.member_key()?;
                        }
                        continue;
                    }
                }
                Some(_) => return Err(self.err("expected a value")),
                None => return Err(self.err("EOF while parsing a value")),
            }
            // A value ended: close what it ends, or go on to the next one.
            loop {
                let Some(&frame) = stack.last() else {
                    return Ok(false);
                };
                self.ws();
                let close = if frame == b'[' { b']' } else { b'}' };
                match self.peek() {
                    Some(b',') => {
                        self.pos += 1;
                        if frame == b'{' {
                            self.member_key()?;
                        }
                        break;
                    }
                    Some(c) if c == close => {
                        self.pos += 1;
                        stack.pop();
                    }
                    Some(_) if frame == b'[' => {
                        return Err(self.err("expected `,` or `]`"));
                    }
                    Some(_) => return Err(self.err("expected `,` or `}`")),
                    None => return Err(self.err("EOF while parsing a value")),
                }
            }
        }
    }

    /// Inside an object being skipped: a key and its colon.
    fn member_key(&mut self) -> Result<(), ScanError> {
        self.ws();
        match self.peek() {
            Some(b'"') => {
                self.string()?;
            }
            Some(_) => return Err(self.err("key must be a string")),
            None => return Err(self.err("EOF while parsing an object")),
        }
        self.ws();
        match self.peek() {
            Some(b':') => {
                self.pos += 1;
                Ok(())
            }
            Some(_) => Err(self.err("expected `:`")),
            None => Err(self.err("EOF while parsing an object")),
        }
    }

    fn ident(&mut self, word: &[u8]) -> Result<(), ScanError> {
        for &c in word {
            match self.peek() {
                Some(b) if b == c => self.pos += 1,
                Some(_) => return Err(self.err("expected ident")),
                None => return Err(self.err("EOF while parsing a value")),
            }
        }
        Ok(())
    }

    /// A number in JSON's grammar (serde_json's `ignore_integer` and what
    /// follows it).
    fn number(&mut self) -> Result<(), ScanError> {
        if self.peek() == Some(b'-') {
            self.pos += 1;
        }
        match self.peek() {
            Some(b'0') => {
                self.pos += 1;
                if let Some(b'0'..=b'9') = self.peek() {
                    return Err(self.err("invalid number"));
                }
            }
            Some(b'1'..=b'9') => self.digits(),
            _ => return Err(self.err("invalid number")),
        }
        if self.peek() == Some(b'.') {
            self.pos += 1;
            if !matches!(self.peek(), Some(b'0'..=b'9')) {
                return Err(self.err("invalid number"));
            }
            self.digits();
        }
        if let Some(b'e' | b'E') = self.peek() {
            self.pos += 1;
            if let Some(b'+' | b'-') = self.peek() {
                self.pos += 1;
            }
            if !matches!(self.peek(), Some(b'0'..=b'9')) {
                return Err(self.err("invalid number"));
            }
            self.digits();
        }
        Ok(())
    }

    #[inline]
    fn digits(&mut self) {
        while let Some(b'0'..=b'9') = self.peek() {
            self.pos += 1;
        }
    }
}

/// What the differential check compares: the envelope's meaning.
#[cfg(any(test, feature = "unstable"))]
pub(crate) fn envelope_summary(env: &RawEnvelope<'_>) -> String {
    format!(
        "object={} keys={} from={:?} to={:?} content={:?} id={:?} stamp={:?} ord={:?} \
         broadcast={:?} hello={:?} extra={:?} bad={:?}",
        env.is_object,
        env.keys,
        env.from,
        env.to,
        env.content,
        env.id,
        env.stamp.map(f64::to_bits),
        env.stamp_ord,
        env.broadcast,
        env.hello,
        env.extra,
        env.bad_field
    )
}

/// Checks the scanner against serde_json on one payload: both accept with
/// the same envelope, or both refuse. Panics with both answers otherwise.
#[cfg(any(test, feature = "unstable"))]
pub(crate) fn check_against_serde(payload: &[u8]) {
    let ours = scan_envelope(payload).map(|e| envelope_summary(&e));
    let oracle = serde_json::from_slice::<RawEnvelope<'_>>(payload).map(|e| envelope_summary(&e));
    match (&ours, &oracle) {
        (Ok(a), Ok(b)) if a == b => {}
        (Err(_), Err(_)) => {}
        _ => panic!(
            "scanner and serde_json disagree on {:?}:\n  scanner: {ours:?}\n  serde:   {oracle:?}",
            String::from_utf8_lossy(payload)
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agrees_with_serde_json_on_hand_picked_payloads() {
        let cases: &[&[u8]] = &[
            br#"{"from":"a","to":"b","content":{"x":[1,2,{"y":null}]},"id":"I","stamp":1.5,"stamp_ord":3}"#,
            br#" { "from" : "a" , "content" : "s" , "broadcast" : 1 } "#,
            br#"{}"#,
            br#"{"hello":"x"}"#,
            br#"{"from":"a\u00e9","to":"\ud83d\ude00","content":1}"#,
            br#"{"from":"\ud800","content":1}"#,
            br#"{"\ud800":1}"#,
            br#"{"a\n":1}"#,
            br#"{"from":12,"to":-3,"content":1.5e3,"id":1.5}"#,
            br#"{"content":[1,2,]}"#,
            br#"{"content":01}"#,
            br#"{"content":1.}"#,
            br#"{"content":-}"#,
            br#"{"content":1e}"#,
            br#"{"content":1E+5}"#,
            br#"{"a":1,}"#,
            br#"{"a":1"#,
            br#"{"a":1} x"#,
            br#"{"a" 1}"#,
            br#"{1:1}"#,
            br#"{"content":"\x"}"#,
            br#"{"content":"\u12"}"#,
            br#"{"content":tru}"#,
            br#"{"content":[[[[[[[[[[[[[[[[[[[[[[]]]]]]]]]]]]]]]]]]]]]]}"#,
            br#"{"content":{"a":}}"#,
            br#"{"content":{"a" 1}}"#,
            br#"{"content":{,}}"#,
            br#"{"stamp":"1","stamp_ord":-1,"from":null,"to":null}"#,
            br#"{"from":"a","from":"b","x":1,"x":2}"#,
            b"{\"from\":\"\xff\"}",
            b"{\"content\":\"\x01\"}",
            b"[1,\"\xff\"]",
            br#"[1,2"#,
            br#"3"#,
            br#"  "#,
            br#""#,
            br#"null"#,
        ];
        for c in cases {
            check_against_serde(c);
        }
    }

    /// The layout fast path accepts only what serde_json accepts, with
    /// the same envelope, and hands everything else to the general scan:
    /// every value position of ipcm's layout, filled with edge cases.
    #[test]
    fn the_ipcm_layout_path_agrees_with_serde_json() {
        let numbers = [
            "0",
            "-0",
            "1",
            "01",
            "-01",
            "00",
            "1.",
            "1.5",
            "-1.5",
            ".5",
            "1e5",
            "1E+2",
            "1.5e-3",
            "9007199254740991",
            "9007199254740992",
            "9007199254740993",
            "12345678901234567",
            "1795565113.71625",
            "17955651177777777737.1625",
            "-",
            "--1",
            "1.2.3",
            "1x",
            "0.0000000000000001",
            "123456789012345.6",
            "1e400",
            "\"1\"",
            "null",
            "",
        ];
        let strings = [
            "\"src\"",
            "\"\"",
            "\"a\\\"b\"",
            "\"a\\u00e9\"",
            "\"a\nb\"",
            "\"a",
            "1",
            "null",
            "\"é\"",
            "\"0123456789abcdef0123\"",
        ];
        let contents = [
            "\"x\"",
            "1",
            "null",
            "{\"a\":[1,2]}",
            "[",
            "\"a\\x\"",
            "{}",
            "[1,]",
            "tru",
            // Whitespace before the content (found by fuzzing: the content
            // kept it) and inside it.
            " 1",
            "\r\n{\"x\":[1,2]}",
            "\t\"s\"",
            "[ 1 , 2 ]",
        ];
        let layout = |from: &str, content: &str, id: &str, stamp: &str, ord: &str, tail: &str| {
            format!(
                "{{\"from\":{from},\"to\":\"sink\",\"content\":{content},\"id\":{id},\
                 \"stamp\":{stamp},\"stamp_ord\":{ord}{tail}"
            )
        };
        let mut fast = 0;
        let mut check = |p: String| {
            if ipcm_layout(&p).is_some() {
                fast += 1;
            }
            check_against_serde(p.as_bytes());
        };
        for n in numbers {
            check(layout("\"a\"", "1", "\"I\"", n, "0", "}"));
            check(layout("\"a\"", "1", "\"I\"", "1.5", n, "}"));
        }
        for st in strings {
            check(layout(st, "1", "\"I\"", "1.5", "0", "}"));
            check(layout("\"a\"", "1", st, "1.5", "0", "}"));
        }
        for c in contents {
            check(layout("\"a\"", c, "\"I\"", "1.5", "0", "}"));
        }
        for tail in [
            "}",
            "} ",
            "}x",
            "",
            ",\"broadcast\":1}",
            ",\"broadcast\":0}",
            ",\"broadcast\":1",
            ",\"x\":1}",
            ",\"stamp\":2}",
        ] {
            check(layout("\"a\"", "1", "\"I\"", "1.5", "0", tail));
        }
        assert!(fast > 20, "the fast path took only {fast} payloads");
    }

    #[test]
    fn the_word_scan_finds_the_first_special_byte() {
        // Neighbours of the special bytes included: 0x20, 0x21, 0x5b, 0x5d,
        // 0x7f, and bytes above 0x7f (0x80, 0x9f, 0xa2, 0xdc, 0xff).
        let plain =
            |i: usize| b"abcdefghijklmnop\x7f\xc3\xa9xyz \x21\x5b\x5d\x80\x9f\xa2\xdc\xff"[i % 29];
        for len in 0..70 {
            for at in 0..=len {
                for special in [b'"', b'\\', 0x00, 0x1F] {
                    let mut v: Vec<u8> = (0..len).map(plain).collect();
                    if at < len {
                        v[at] = special;
                    }
                    let want = v.iter().position(|&c| c == b'"' || c == b'\\' || c < 0x20);
                    assert_eq!(find_special(&v), want, "{v:?}");
                    assert_eq!(find_special_swar(&v, 0), want, "{v:?}");
                }
            }
        }
    }

    #[test]
    fn deep_nesting_is_no_stack_overflow() {
        let mut p = b"{\"content\":".to_vec();
        p.extend(std::iter::repeat_n(b'[', 1_000_000));
        p.extend(std::iter::repeat_n(b']', 1_000_000));
        p.push(b'}');
        let env = scan_envelope(&p).unwrap();
        assert_eq!(env.content.map(str::len), Some(2_000_000));
    }

    #[test]
    fn values_stay_raw_slices_of_the_payload() {
        let p = br#"{"from":"a","content":{"k": [1, "x"]},"z":true}"#;
        let env = scan_envelope(p).unwrap();
        assert_eq!(env.content, Some(r#"{"k": [1, "x"]}"#));
        assert!(matches!(env.from, Some(Cow::Borrowed("a"))));
        assert_eq!(env.extra, vec![(Cow::Borrowed("z"), "true")]);
    }
}
