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
    let start = skip_ws(payload, 0);
    if payload.get(start) != Some(&b'{') {
        return serde_json::from_slice(payload).map_err(|e| e.to_string());
    }
    let text = simdutf8::basic::from_utf8(payload)
        .map_err(|_| "invalid UTF-8 in a JSON object payload".to_string())?;
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

/// The first byte of `b` that ends or interrupts a string's plain text: a
/// quote, a backslash or a control character. Eight bytes at a time.
#[inline]
fn find_special(b: &[u8]) -> Option<usize> {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGH: u64 = 0x8080_8080_8080_8080;
    let mut i = 0;
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

    #[test]
    fn the_word_scan_finds_the_first_special_byte() {
        let plain = |i: usize| b"abcdefghijklmnop\x7f\xc3\xa9xyz"[i % 20];
        for len in 0..40 {
            for at in 0..=len {
                for special in [b'"', b'\\', 0x00, 0x1F] {
                    let mut v: Vec<u8> = (0..len).map(plain).collect();
                    if at < len {
                        v[at] = special;
                    }
                    let want = v.iter().position(|&c| c == b'"' || c == b'\\' || c < 0x20);
                    assert_eq!(find_special(&v), want, "{v:?}");
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
