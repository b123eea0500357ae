//! The lane's control frames: what two ipcm peers say on their socket to
//! move a connection onto the shared-memory lane, and to wake each other
//! once there.
//!
//! A control frame is an ordinary frame (4-byte big-endian length, then
//! the payload) whose payload starts with the six bytes `00 'I' 'P' 'L'
//! version kind`. No message payload of any route starts with a NUL byte
//! (JSON text starts with `{`, a zstd frame with `28 B5 2F FD`, a Binary
//! payload with `IPCB`), so a control frame is never taken for a message.
//! Control frames are only ever sent to a peer known to be ipcm (see
//! [`super::beacon`]); a Perl peer never sees one.
//!
//! | kind | name | after the six bytes | sent by |
//! |---|---|---|---|
//! | 1 | `OFFER` | 16-byte nonce, ring capacity (u32 LE) | the initiator, after passing the memfd |
//! | 2 | `SWITCH` | nothing | each side, as its last frame on the socket before its ring |
//! | 3 | `REFUSE` | nothing | the acceptor that cannot take the offer |
//! | 4 | `WAKE` | nothing | a side whose peer sleeps on (or waits for room in) a ring |
//! | 5 | `RELEASE` | nothing | each side of an idle lane, as its first frame back on the socket |
//! | 6 | `BLOB` | 16-byte nonce, payload length (u64 LE) | a sender whose frame went as a sealed memfd (in its ring) |
//! | 7 | `FDS` | 16-byte nonce, descriptor count (u8) | a sender whose next message carries descriptors passed to the peer's beacon |

/// The first four bytes of every control payload.
pub const MAGIC: [u8; 4] = *b"\0IPL";
/// The version of these frames (and of the lane's memory layout).
/// Version 2 added `RELEASE`: a version-1 peer refuses our offers rather
/// than meet a kind it does not know.
pub const VERSION: u8 = 2;
/// Bytes of a control payload before its kind's fields.
const PREFIX: usize = 6;

/// One control frame, parsed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Control {
    /// The initiator passed a memfd tagged `nonce` over the beacon; its
    /// rings have `capacity` bytes each.
    Offer {
        /// Matches the descriptor passed beside the socket.
        nonce: [u8; 16],
        /// Record bytes of each ring.
        capacity: u32,
    },
    /// The sender's frames continue in its ring.
    Switch,
    /// The acceptor did not take the offer; the connection stays on the
    /// socket.
    Refuse,
    /// Look at the rings.
    Wake,
    /// The sender's ring carries nothing after what it holds: its frames
    /// continue on the socket (an idle lane is being released).
    Release,
    /// The next frame's payload is a sealed memfd passed to our beacon
    /// tagged `nonce`, of `len` bytes (see [`super::blob`]).
    Blob {
        /// Matches the descriptor passed beside the lane.
        nonce: [u8; 16],
        /// The payload's length.
        len: u64,
    },
    /// The next message carries the `count` descriptors the sender passed
    /// to our beacon tagged `nonce`.
    Fds {
        /// Matches the descriptors passed beside the lane.
        nonce: [u8; 16],
        /// How many.
        count: u8,
    },
}

/// Whether `payload` is a control payload (whatever its contents).
#[inline]
pub fn is_control(payload: &[u8]) -> bool {
    payload.len() >= 4 && payload[..4] == MAGIC
}

impl Control {
    /// Parses a control payload; an error names what is wrong with it.
    pub fn parse(payload: &[u8]) -> Result<Control, &'static str> {
        if !is_control(payload) || payload.len() < PREFIX {
            return Err("not a lane control frame");
        }
        if payload[4] != VERSION {
            return Err("lane control frame of another version");
        }
        let body = &payload[PREFIX..];
        match (payload[5], body.len()) {
            (1, 20) => Ok(Control::Offer {
                nonce: body[..16].try_into().expect("16 bytes"),
                capacity: u32::from_le_bytes(body[16..20].try_into().expect("4 bytes")),
            }),
            (2, 0) => Ok(Control::Switch),
            (3, 0) => Ok(Control::Refuse),
            (4, 0) => Ok(Control::Wake),
            (5, 0) => Ok(Control::Release),
            (6, 24) => Ok(Control::Blob {
                nonce: body[..16].try_into().expect("16 bytes"),
                len: u64::from_le_bytes(body[16..24].try_into().expect("8 bytes")),
            }),
            (7, 17) => Ok(Control::Fds {
                nonce: body[..16].try_into().expect("16 bytes"),
                count: body[16],
            }),
            (1..=7, _) => Err("lane control frame of the wrong length"),
            _ => Err("lane control frame of an unknown kind"),
        }
    }

    /// The whole frame: length prefix and payload (no allocation but for
    /// an `OFFER`, a `BLOB` or an `FDS`).
    pub fn frame(&self) -> bytes::Bytes {
        const fn bare(kind: u8) -> [u8; 4 + PREFIX] {
            let m = MAGIC;
            [0, 0, 0, PREFIX as u8, m[0], m[1], m[2], m[3], VERSION, kind]
        }
        static SWITCH: [u8; 4 + PREFIX] = bare(2);
        static REFUSE: [u8; 4 + PREFIX] = bare(3);
        static WAKE: [u8; 4 + PREFIX] = bare(4);
        static RELEASE: [u8; 4 + PREFIX] = bare(5);
        match self {
            Control::Offer { nonce, capacity } => with_body(1, &[nonce, &capacity.to_le_bytes()]),
            Control::Switch => bytes::Bytes::from_static(&SWITCH),
            Control::Refuse => bytes::Bytes::from_static(&REFUSE),
            Control::Wake => bytes::Bytes::from_static(&WAKE),
            Control::Release => bytes::Bytes::from_static(&RELEASE),
            Control::Blob { nonce, len } => with_body(6, &[nonce, &len.to_le_bytes()]),
            Control::Fds { nonce, count } => with_body(7, &[nonce, &[*count]]),
        }
    }
}

/// A control frame of `kind` whose fields are `parts`, in order.
fn with_body(kind: u8, parts: &[&[u8]]) -> bytes::Bytes {
    let body: usize = parts.iter().map(|p| p.len()).sum();
    let mut v = Vec::with_capacity(4 + PREFIX + body);
    v.extend_from_slice(&((PREFIX + body) as u32).to_be_bytes());
    v.extend_from_slice(&MAGIC);
    v.extend_from_slice(&[VERSION, kind]);
    for p in parts {
        v.extend_from_slice(p);
    }
    bytes::Bytes::from(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_round_trips_and_bad_ones_are_named() {
        for c in [
            Control::Offer {
                nonce: [7; 16],
                capacity: 1 << 20,
            },
            Control::Switch,
            Control::Refuse,
            Control::Wake,
            Control::Release,
            Control::Blob {
                nonce: [9; 16],
                len: 16 << 20,
            },
            Control::Fds {
                nonce: [4; 16],
                count: 3,
            },
        ] {
            let f = c.frame();
            let len = u32::from_be_bytes(f[..4].try_into().unwrap()) as usize;
            assert_eq!(len, f.len() - 4);
            assert!(is_control(&f[4..]));
            assert_eq!(Control::parse(&f[4..]), Ok(c));
        }
        assert!(Control::parse(b"\0IPL\x01\x02").is_err());
        assert!(Control::parse(b"\0IPL\x02\x09").is_err());
        assert!(Control::parse(b"\0IPL\x02\x01short").is_err());
        assert!(Control::parse(b"\0IPL\x02\x02x").is_err());
        assert!(Control::parse(b"\0IPL\x02\x05x").is_err());
        assert!(Control::parse(b"\0IPL\x02\x06").is_err());
        assert!(Control::parse(b"\0IP").is_err());
        for msg in [&b"{\"a\":1}"[..], b"IPCB\x02\x04", b"\x28\xb5\x2f\xfd"] {
            assert!(!is_control(msg));
        }
    }
}
