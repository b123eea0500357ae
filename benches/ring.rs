//! Hand-off cost per message through the threaded mode's receive ring
//! (rtrb SPSC): push on one side, pop on the other, one message at a time
//! and in batches, single-threaded and across two threads.

use std::hint::black_box;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use ipcm::Message;

fn message() -> Message {
    Message::new(
        "src",
        "sink",
        &serde_json::json!({"n": 1, "pad": "0123456789abcdef"}),
    )
    .unwrap()
}

fn ring(c: &mut Criterion) {
    let mut g = c.benchmark_group("receive_ring");
    g.throughput(Throughput::Elements(1));
    let (mut tx, mut rx) = rtrb::RingBuffer::<Message>::new(1024);
    // The same message travels round and round: pure hand-off, no clone.
    let mut slot = Some(message());
    g.bench_function("push_pop_one", |b| {
        b.iter(|| {
            tx.push(black_box(slot.take().unwrap())).unwrap();
            slot = Some(black_box(rx.pop().unwrap()));
        })
    });
    let m = message();
    g.throughput(Throughput::Elements(256));
    // With a clone per message (what a producer that keeps a copy pays).
    g.bench_function("clone_push_pop_batch_256", |b| {
        b.iter(|| {
            for _ in 0..256 {
                tx.push(m.clone()).unwrap();
            }
            for _ in 0..256 {
                black_box(rx.pop().unwrap());
            }
        })
    });
    g.finish();

    // Across threads: a producer thread keeps the ring fed; the measured
    // side pops (the consumer's cost per message with a live producer).
    let (mut tx, mut rx) = rtrb::RingBuffer::<Message>::new(64 * 1024);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = stop.clone();
    let producer = std::thread::spawn(move || {
        let m = message();
        while !flag.load(std::sync::atomic::Ordering::Relaxed) {
            if tx.push(m.clone()).is_err() {
                std::hint::spin_loop();
            }
        }
    });
    let mut g = c.benchmark_group("receive_ring_cross_thread");
    g.throughput(Throughput::Elements(1));
    g.bench_function("pop_with_live_producer", |b| {
        b.iter(|| {
            loop {
                if let Ok(m) = rx.pop() {
                    break black_box(m);
                }
                std::hint::spin_loop();
            }
        })
    });
    g.finish();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    producer.join().unwrap();
}

criterion_group!(benches, ring);
criterion_main!(benches);
