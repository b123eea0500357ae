//! Codec costs per message, in memory (no I/O): framing, the Json and
//! Binary envelopes, encoded and decoded, and the stamp and id every
//! message needs. `cargo bench --bench codec`.

use std::hint::black_box;

use bytes::{Bytes, BytesMut};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use ipcm::Serializer;
use ipcm::internals::{BufferPool, FrameDecoder, encode_frame};

mod support;
use support::json_string as content;

fn frames(c: &mut Criterion) {
    let mut g = c.benchmark_group("frame");
    for size in [64usize, 1024, 16384] {
        let payload = vec![7u8; size];
        g.throughput(Throughput::Elements(1));
        let mut out = BytesMut::with_capacity(1 << 20);
        g.bench_function(format!("encode/{size}"), |b| {
            b.iter(|| {
                if out.len() > (1 << 20) - size - 8 {
                    out.clear();
                }
                encode_frame(black_box(&payload), &mut out).unwrap();
            })
        });
        // 64 frames back to back, decoded from one buffer per iteration.
        let mut stream = BytesMut::new();
        for _ in 0..64 {
            encode_frame(&payload, &mut stream).unwrap();
        }
        let stream = stream.freeze();
        let mut pool = BufferPool::new(64 * 1024, 8);
        let mut dec = FrameDecoder::new(64 << 20);
        g.throughput(Throughput::Elements(64));
        g.bench_function(format!("decode64/{size}"), |b| {
            b.iter(|| {
                dec.push_slice(&stream, &mut pool);
                let mut n = 0;
                while let Some(f) = dec.next_frame().unwrap() {
                    n += f.len();
                }
                dec.release(&mut pool);
                black_box(n)
            })
        });
    }
    g.finish();
}

fn envelopes(c: &mut Criterion) {
    let mut g = c.benchmark_group("envelope");
    g.throughput(Throughput::Elements(1));
    for (name, ser) in [("json", Serializer::Json), ("binary", Serializer::Binary)] {
        for size in [64usize, 1024, 16384] {
            let body = content(size);
            let mut out = BytesMut::with_capacity(1 << 20);
            g.bench_function(format!("{name}/encode/{size}"), |b| {
                b.iter(|| {
                    if out.capacity() - out.len() < size + 256 {
                        out.clear();
                    }
                    ser.encode_payload("sender", "receiver", black_box(&body), &mut out)
                        .unwrap();
                })
            });
            let mut one = BytesMut::new();
            ser.encode_payload("sender", "receiver", &body, &mut one)
                .unwrap();
            let payload: Bytes = one.freeze();
            g.bench_function(format!("{name}/decode/{size}"), |b| {
                b.iter(|| {
                    let m = ser.decode_payload(black_box(&payload)).unwrap().unwrap();
                    black_box(m.content_json().len())
                })
            });
        }
    }
    g.finish();
}

/// What every message costs its sender before any encoding: the stamp
/// (one wall-clock read, as the protocol stamps each message) and the id.
fn per_message(c: &mut Criterion) {
    let mut g = c.benchmark_group("per_message");
    g.bench_function("clock_gettime", |b| {
        let mut t = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: writes the current time into a timespec we own.
        b.iter(|| unsafe { libc::clock_gettime(libc::CLOCK_REALTIME, black_box(&mut t)) })
    });
    g.bench_function("next_stamp", |b| b.iter(ipcm::internals::next_stamp));
    g.bench_function("message_id", |b| {
        b.iter(ipcm::internals::new_message_id_bytes)
    });
    g.finish();
}

criterion_group!(benches, frames, envelopes, per_message);
criterion_main!(benches);
