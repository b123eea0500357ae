//! Fuzz targets, shared by the `cargo fuzz` crate (`fuzz/`) and the corpus
//! replay tests, so that both run exactly the same checks. Each target
//! takes arbitrary bytes and panics only when an invariant breaks.

use bytes::{Bytes, BytesMut};

use crate::proto::{ConnId, Core, CoreConfig, Enqueue, RecvBuf};
use crate::route::{Info, names};
use crate::serializer::Serializer;
use crate::wire::{BufferPool, FrameDecoder, FrameError, HEADER_LEN, RecvInto, encode_frame};

/// Largest frame the targets allow (small, so limits are reached).
const MAX_FRAME: usize = 64 * 1024;
/// Receive-buffer size the targets use.
const BUF: usize = 4096;

/// Splits `data` into a chunk-size script (first byte says how many sizes
/// follow) and a payload.
fn script(data: &[u8]) -> (&[u8], &[u8]) {
    let n = data.first().copied().unwrap_or(0) as usize;
    let sizes = data.get(1..1 + n).unwrap_or(&[]);
    let rest = data.get(1 + n..).unwrap_or(&[]);
    (sizes, rest)
}

/// The frame decoder fed any byte stream in any chunking: it yields exactly
/// the frames a reference parser finds, stops with an error exactly where
/// a prefix is too large, and holds at most twice what arrived (or one
/// pooled buffer).
pub fn frame_decoder(data: &[u8]) {
    let (sizes, stream) = script(data);
    let mut pool = BufferPool::new(BUF, 4);
    let mut dec = FrameDecoder::new(MAX_FRAME);
    let mut got: Vec<Bytes> = Vec::new();
    let mut error = None;
    let mut at = 0;
    let mut i = 0;
    while at < stream.len() && error.is_none() {
        let size = sizes
            .get(i % sizes.len().max(1))
            .copied()
            .unwrap_or(255)
            .max(1) as usize;
        i += 1;
        let end = (at + size).min(stream.len());
        dec.push_slice(&stream[at..end], &mut pool);
        at = end;
        loop {
            match dec.next_frame() {
                Ok(Some(f)) => got.push(f),
                Ok(None) => break,
                Err(e) => {
                    error = Some(e);
                    break;
                }
            }
        }
        // As a connection does after each receive.
        dec.release(&mut pool);
        let bound = (2 * dec.partial_len()).max(2 * BUF) + HEADER_LEN;
        assert!(
            dec.capacity() <= bound,
            "capacity {} for {} buffered bytes",
            dec.capacity(),
            dec.partial_len()
        );
    }
    // Reference parse of the bytes delivered so far.
    let mut want = Vec::new();
    let mut want_err = None;
    let mut p = &stream[..at];
    while p.len() >= HEADER_LEN {
        let len = u32::from_be_bytes([p[0], p[1], p[2], p[3]]) as usize;
        if len > MAX_FRAME {
            want_err = Some(FrameError::TooLarge {
                len,
                max: MAX_FRAME,
            });
            break;
        }
        if p.len() < HEADER_LEN + len {
            break;
        }
        want.push(&p[HEADER_LEN..HEADER_LEN + len]);
        p = &p[HEADER_LEN + len..];
    }
    assert_eq!(error, want_err);
    assert_eq!(got.len(), want.len());
    for (g, w) in got.iter().zip(&want) {
        assert_eq!(&g[..], *w);
    }
}

fn serializers() -> [Serializer; 3] {
    let zstd = Serializer::json_zstd().unwrap_or(Serializer::Json);
    [Serializer::Json, zstd, Serializer::Binary]
}

/// Hello and message decoding for every serializer: never panics, and
/// whatever decodes re-encodes and decodes to the same message.
pub fn decode_payloads(data: &[u8]) {
    let payload = Bytes::copy_from_slice(data);
    for ser in serializers() {
        let _ = ser.decode_hello(&payload);
        let Ok(Some(m)) = ser.decode_message(&payload) else {
            continue;
        };
        let _ = m.to_value();
        let _ = m.is_terminate();
        // Round trip through the same serializer.
        let mut out = BytesMut::new();
        let outgoing = crate::serializer::Outgoing::<()> {
            from: m.from(),
            to: m.to().unwrap_or("x"),
            content: crate::serializer::Content::Raw(m.content_json()),
            id: Some(m.id()),
            stamp: Some(m.stamp()),
            stamp_ord: Some(m.stamp_ord()),
            broadcast: m.is_broadcast(),
            extra: &m.extra,
        };
        if ser.encode_message(&outgoing, &mut out).is_err() {
            continue;
        }
        let again = ser
            .decode_message(&out.freeze())
            .ok()
            .flatten()
            .expect("a re-encoded message decodes");
        assert_eq!(again.from(), m.from());
        assert_eq!(again.stamp().to_bits(), m.stamp().to_bits());
        assert_eq!(again.stamp_ord(), m.stamp_ord());
        let a: Result<serde_json::Value, _> = again.content();
        let b: Result<serde_json::Value, _> = m.content();
        if let (Ok(a), Ok(b)) = (a, b) {
            assert_eq!(a, b);
        }
    }
}

/// The Json envelope scanner against serde_json, its oracle: on every
/// input both accept with the same envelope, or both refuse.
pub fn scan_envelope(data: &[u8]) {
    crate::serializer::scan_check_against_serde(data);
}

/// Binary batches from a hostile peer: checking never panics; a batch that
/// passes yields exactly its announced count of non-empty UTF-8 contents,
/// and the same contents appended by a sender's outbox check and read back
/// the same.
pub fn binary_batch(data: &[u8]) {
    use crate::serializer::binary::{CheckedBatch, INDEX_BLOCK};
    // The indexed check (what a receiving core uses) agrees with the plain
    // one on every input: both refuse, or both accept with the same
    // records, read the same ways.
    let mut blocks = BufferPool::new(INDEX_BLOCK, 2);
    let indexed = CheckedBatch::parse_indexed(Bytes::copy_from_slice(data), &mut blocks);
    let Ok(batch) = CheckedBatch::parse(Bytes::copy_from_slice(data)) else {
        assert!(indexed.is_err(), "only the indexed check accepted");
        return;
    };
    let indexed = indexed.expect("only the plain check accepted");
    let contents: Vec<&str> = batch.records().collect();
    assert!(indexed.records().eq(contents.iter().copied()));
    let mut cursor = indexed.records();
    for c in &contents {
        let read = indexed.records_len() - cursor.remaining();
        assert_eq!(indexed.records_from(read).next(), Some(*c));
        assert_eq!(cursor.next(), Some(*c));
    }
    assert_eq!(cursor.next(), None);
    assert_eq!(contents.len(), batch.info().count as usize);
    assert!(contents.iter().all(|c| !c.is_empty()));
    let mut out = Vec::new();
    crate::serializer::binary::expand(
        &batch,
        &crate::message::Name::copy_from("p"),
        &crate::message::Name::copy_from("q"),
        &mut out,
    );
    assert_eq!(out.len(), contents.len());
    for (i, m) in out.iter().enumerate() {
        assert_eq!(m.content_json(), contents[i]);
        assert_eq!(m.id().len(), 36);
    }
    // A sender writes the same contents: they read back the same.
    let mut outbox = crate::proto::Outbox::default();
    let mut pool = BufferPool::new(BUF, 4);
    let mut ids = crate::message::IdSeq::new();
    let mut kept = Vec::new();
    for c in &contents {
        if outbox.append_raw(c.as_bytes(), &mut pool, &mut ids).is_ok() {
            kept.push(*c);
        }
    }
    outbox.seal(&mut ids);
    let mut again = Vec::new();
    for frame in outbox.frames() {
        let b = CheckedBatch::parse(frame.slice(HEADER_LEN..)).expect("our own batch checks");
        again.extend(b.records().map(str::to_string));
    }
    assert_eq!(again, kept);
}

/// Info strings and on-disk names: parsing never panics, names always obey
/// the Perl client's on-disk naming rules.
pub fn names_and_info(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    if let Ok(info) = Info::parse(&text) {
        let again = Info::parse(&info.to_info_string()).expect("own info strings parse");
        assert_eq!(again.route, info.route);
    }
    let (route, id) = match text.split_once('\n') {
        Some((r, i)) => (r, i),
        None => ("/tmp/PerlIPCManager-1-abcdef", text.as_ref()),
    };
    let _ = names::check_local_id(id);
    match names::on_disk_name(route, id) {
        Ok(name) => {
            let max = names::max_on_disk_name_length(route);
            if name == id {
                assert!(id.chars().count() as i64 <= max);
                assert!(!id.starts_with("h-"));
                assert!(
                    !id.chars()
                        .any(|c| (c as u32) < 0x20 || c == '/' || c == '\\')
                );
            } else {
                assert_eq!(name.len(), 42);
                assert!(name.starts_with("h-"));
                assert!(name[2..].bytes().all(|b| b.is_ascii_hexdigit()));
                assert!(max >= 42);
            }
        }
        Err(_) => assert!(id.is_empty() || names::max_on_disk_name_length(route) < 42),
    }
}

/// The protocol core driven by an arbitrary sequence of events (accepts,
/// bytes in any chunking, EOFs, sends, write completions, closes). It never
/// panics; each connection holds at most about twice the largest frame; and
/// messages sent whole on a resolved connection come out once, in order.
pub fn core_events(data: &[u8]) {
    let cfg = CoreConfig {
        max_frame: MAX_FRAME,
        outbox_limit: 8 * 1024,
        buf_size: BUF,
        inbox_limit: 1 << 20,
        ..CoreConfig::default()
    };
    let mut core = Core::new(Serializer::Json, cfg);
    let mut pool = BufferPool::new(BUF, 8);
    let mut conns: Vec<ConnId> = Vec::new();
    // Well-formed messages we fed whole, per connection, in order.
    let mut expected: Vec<(ConnId, u32)> = Vec::new();
    let mut delivered: Vec<u32> = Vec::new();
    let mut seq = 0u32;
    let mut now = std::time::Instant::now();
    let mut bytes = data.iter().copied();
    let mut next = || bytes.next();
    while let Some(op) = next() {
        let pick = |k: Option<u8>, conns: &[ConnId]| -> Option<ConnId> {
            (!conns.is_empty()).then(|| conns[k.unwrap_or(0) as usize % conns.len()])
        };
        match op % 9 {
            0 => {
                // Time moves only when the input says so (the core is fed
                // `now`): 0..=255 quarter-seconds, then what is due.
                now += std::time::Duration::from_millis(250 * u64::from(next().unwrap_or(0)));
                core.handle_timeout(now);
                if let Some(at) = core.poll_timeout() {
                    assert!(at > now, "a deadline handled at {now:?} is still due");
                }
                conns.push(core.add_acceptor(now));
            }
            1 => {
                let peer = format!("p{}", next().unwrap_or(0) % 4);
                conns.push(core.add_initiator(&peer, "me"));
            }
            2 | 3 => {
                let Some(id) = pick(next(), &conns) else {
                    continue;
                };
                let len = next().unwrap_or(0) as usize;
                let mut chunk: Vec<u8> = (0..len).filter_map(|_| next()).collect();
                if op % 9 == 3 {
                    // A well-formed frame: hello for unresolved, else a message.
                    chunk = if core.peer_of(id).is_none() {
                        frame(format!(r#"{{"hello":"p{}"}}"#, len % 4).as_bytes())
                    } else {
                        seq += 1;
                        expected.push((id, seq));
                        let p = core.peer_of(id).unwrap_or("p").to_string();
                        frame(format!(r#"{{"from":"{p}","to":"me","content":{seq}}}"#).as_bytes())
                    };
                }
                feed(&mut core, &mut pool, id, &chunk);
            }
            4 => {
                let Some(id) = pick(next(), &conns) else {
                    continue;
                };
                if let Some(start) = core.start_recv(id, &mut pool) {
                    let buf = match start {
                        RecvBuf::Partial(b) => b,
                        RecvBuf::Pooled => RecvInto::default(),
                    };
                    core.on_recv(id, buf, Ok(0), &mut pool);
                }
            }
            5 => {
                let Some(id) = pick(next(), &conns) else {
                    continue;
                };
                let len = next().unwrap_or(1) as usize * 40;
                let r = core.enqueue(id, Bytes::from(vec![b'x'; len]));
                if let Enqueue::Full { queued, .. } = r {
                    assert!(queued > 0, "an empty outbox takes any frame");
                }
            }
            6 => {
                let Some(id) = pick(next(), &conns) else {
                    continue;
                };
                let n = next().unwrap_or(0) as usize * 16;
                if let Some(ob) = core.start_send(id) {
                    let n = n.min(ob.queued_bytes());
                    core.on_sent(id, Ok(n));
                }
            }
            7 => {
                let Some(id) = pick(next(), &conns) else {
                    continue;
                };
                core.close(id, None);
            }
            _ => {
                let mut v = Vec::new();
                core.take_messages(&mut v);
                delivered.extend(v.iter().filter_map(|m| m.content::<u32>().ok()));
            }
        }
        let held = core.receive_capacity();
        let bound = core.conn_count() * (2 * (MAX_FRAME + HEADER_LEN) + 2 * BUF);
        assert!(
            held <= bound,
            "{held} bytes held by {} connections",
            core.conn_count()
        );
        let mut dirty = Vec::new();
        core.take_dirty(&mut dirty);
        core.take_closed_ids();
        core.take_closed();
    }
    let mut v = Vec::new();
    core.take_messages(&mut v);
    delivered.extend(v.iter().filter_map(|m| m.content::<u32>().ok()));
    // Every delivered sequence number was sent, once, and per connection
    // in order (a connection closed mid-way may lose later ones).
    let mut seen = std::collections::HashSet::new();
    for d in &delivered {
        assert!(seen.insert(*d), "message {d} delivered twice");
        assert!(
            expected.iter().any(|(_, s)| s == d),
            "message {d} never sent"
        );
    }
    for id in conns.iter().copied() {
        let sent: Vec<u32> = expected
            .iter()
            .filter(|(c, _)| *c == id)
            .map(|(_, s)| *s)
            .collect();
        let got: Vec<u32> = delivered
            .iter()
            .copied()
            .filter(|d| sent.contains(d))
            .collect();
        let mut sorted = got.clone();
        sorted.sort_unstable();
        assert_eq!(got, sorted, "order kept on one connection");
    }
}

fn frame(payload: &[u8]) -> Vec<u8> {
    let mut out = BytesMut::new();
    // Payloads here are small.
    let _ = encode_frame(payload, &mut out);
    out.to_vec()
}

fn feed(core: &mut Core, pool: &mut BufferPool, id: ConnId, chunk: &[u8]) {
    let mut rest = chunk;
    while !rest.is_empty() {
        let Some(start) = core.start_recv(id, pool) else {
            return;
        };
        let mut buf = start.into_target(pool);
        let n = buf.fill_from(rest);
        if n == 0 {
            core.on_recv(id, buf, Err(std::io::ErrorKind::WouldBlock.into()), pool);
            return;
        }
        rest = &rest[n..];
        core.on_recv(id, buf, Ok(n), pool);
        if !core.is_open(id) {
            return;
        }
    }
}

/// The shared-memory ring's consumer against a hostile peer: a script of
/// pushes, pops and arbitrary writes of words anywhere in the region
/// (indices, headers, payloads), interleaved in any order. The consumer
/// never panics, never yields a payload longer than the ring allows, stays
/// broken once it reported corruption, and while no word was scribbled on
/// yields exactly what was pushed, in order.
pub fn lane_ring(data: &[u8]) {
    use crate::lane::ring::{self, Consumer, Producer, RING_HEADER, RingError};
    use std::sync::atomic::{AtomicU64, Ordering};

    #[repr(C, align(64))]
    #[derive(Clone, Copy)]
    struct Line([u64; 8]);
    const CAP: usize = 4096;
    let mut mem = vec![Line([0; 8]); (RING_HEADER + CAP) / 64];
    let len = mem.len() * 64;
    let base: *mut u8 = mem.as_mut_ptr().cast();
    // SAFETY: `mem` outlives both ends (dropped at the end of this
    // function) and is touched only through the ring's atomics and the
    // scribbles below, which are atomic word stores too.
    let (mut tx, mut rx) = unsafe {
        ring::init(base, len).unwrap();
        (
            Producer::new(base, len).unwrap(),
            Consumer::new(base, len).unwrap(),
        )
    };
    let max = tx.max_payload();
    let mut model = std::collections::VecDeque::new();
    let mut scribbled = false;
    let mut broken = false;
    let mut out = Vec::new();
    let mut at = 0;
    let mut next = |n: usize| {
        let s = data.get(at..at + n);
        at += n;
        s
    };
    let mut seq = 0u8;
    while let Some(&[op]) = next(1) {
        match op % 4 {
            0 => {
                let Some(&[a, b]) = next(2) else { break };
                let n = (usize::from(a) << 8 | usize::from(b)) % (max + 16);
                seq = seq.wrapping_add(1);
                // Bytes below 0x80 or not, as the sequence goes: both what
                // the copy vouches for and what it must not.
                let rec = vec![seq; n];
                match tx.push(&rec) {
                    Ok(true) => model.push_back(rec),
                    Ok(false) => {}
                    Err(RingError::TooLarge { .. }) => assert!(n > max),
                    Err(_) => assert!(scribbled, "the producer saw corruption nobody made"),
                }
            }
            1 => match rx.pop(&mut out) {
                Ok(got) => {
                    assert!(!broken, "a broken ring was read again");
                    assert!(out.len() <= max, "a payload past the ring's largest");
                    if !scribbled {
                        assert_eq!(got.then(|| out.clone()), model.pop_front(), "in order");
                    }
                }
                Err(_) => {
                    assert!(scribbled, "corruption reported on an honest ring");
                    broken = true;
                }
            },
            2 => {
                // Several records at once, into a buffer whose copy vouches
                // for what it found ASCII: every byte it vouches for is.
                let Some(&[l]) = next(1) else { break };
                let limit = usize::from(l) * 32;
                let mut buf = bytes::BytesMut::with_capacity(usize::from(l) * 16);
                let mut ascii = Vec::new();
                match rx.pop_into(&mut buf, limit, &mut ascii) {
                    Ok(n) => {
                        assert!(!broken, "a broken ring was read again");
                        assert_eq!(n, buf.len());
                        let base = buf.as_ptr() as usize;
                        for r in &ascii {
                            assert!(r.start >= base && r.end <= base + buf.len());
                            assert!(buf[r.start - base..r.end - base].is_ascii(), "vouched");
                        }
                        if !scribbled {
                            // The records `pop_into` takes, by its rule:
                            // the first whatever its size, then each that
                            // keeps the total within the limit.
                            let mut at = 0;
                            while let Some(want) = model.front() {
                                if at > 0 && at + want.len() > limit {
                                    break;
                                }
                                assert!(buf[at..at + want.len()] == want[..], "in order");
                                at += want.len();
                                model.pop_front();
                            }
                            assert_eq!(at, n, "what was taken is what was pushed");
                        }
                    }
                    Err(_) => {
                        assert!(scribbled, "corruption reported on an honest ring");
                        broken = true;
                    }
                }
            }
            _ => {
                let Some(w) = next(10) else { break };
                let off = (usize::from(w[0]) << 8 | usize::from(w[1])) % (len / 8) * 8;
                let v = u64::from_le_bytes(w[2..10].try_into().unwrap());
                // SAFETY: in bounds and aligned (a multiple of 8 inside the
                // 64-aligned region).
                unsafe { AtomicU64::from_ptr(base.add(off).cast::<u64>()) }
                    .store(v, Ordering::Relaxed);
                scribbled = true;
            }
        }
    }
    // The ends are done with the region before it goes.
    let _ = (tx, rx);
    drop(mem);
}
