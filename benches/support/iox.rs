//! The iceoryx2 row of `compare` (feature `iceoryx2`): publish-subscribe
//! over iceoryx2's shared memory between two threads, each with its own
//! node (as two processes would have), busy polling, the same work as
//! the other rows: `size`-byte payloads copied into a loaned sample and
//! read on the other side.

use std::sync::Barrier;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use iceoryx2::prelude::*;

/// A service name no other run of this process uses.
fn unique(what: &str) -> ServiceName {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    ServiceName::new(&format!("ipcm-compare/{}/{n}/{what}", std::process::id())).unwrap()
}

fn node() -> Node<ipc::Service> {
    set_log_level(LogLevel::Error);
    NodeBuilder::new().create::<ipc::Service>().unwrap()
}

type PubSub =
    iceoryx2::service::port_factory::publish_subscribe::PortFactory<ipc::Service, [u8], ()>;
type Sub = iceoryx2::port::subscriber::Subscriber<ipc::Service, [u8], ()>;
type Pub = iceoryx2::port::publisher::Publisher<ipc::Service, [u8], ()>;

/// A subscriber to `inbound` and a publisher of `size`-byte samples to
/// `outbound`: one side of a ping-pong.
fn ports(inbound: &PubSub, outbound: &PubSub, size: usize) -> (Sub, Pub) {
    let rx = inbound.subscriber_builder().create().unwrap();
    let tx = outbound
        .publisher_builder()
        .initial_max_slice_len(size)
        .create()
        .unwrap();
    (rx, tx)
}

/// The next sample, spinning until one arrives.
fn next(rx: &Sub) -> iceoryx2::sample::Sample<ipc::Service, [u8], ()> {
    loop {
        if let Some(s) = rx.receive().unwrap() {
            return s;
        }
        std::hint::spin_loop();
    }
}

/// A sample of `len` bytes, spinning while every sample is out (the
/// subscriber's releases reach the publisher a little later).
fn loan(
    tx: &Pub,
    len: usize,
) -> iceoryx2::sample_mut_uninit::SampleMutUninit<ipc::Service, [core::mem::MaybeUninit<u8>], ()> {
    loop {
        match tx.loan_slice_uninit(len) {
            Ok(s) => return s,
            Err(_) => std::hint::spin_loop(),
        }
    }
}

/// Round trips of `size` bytes, `n` of them, one thread echoing; the
/// latencies in microseconds.
pub fn ping_pong(size: usize, n: usize) -> Vec<f64> {
    let (a2b, b2a) = (unique("a2b"), unique("b2a"));
    let ready = Barrier::new(2);
    let open = |node: &Node<ipc::Service>, name: &ServiceName| {
        node.service_builder(name)
            .publish_subscribe::<[u8]>()
            .history_size(0)
            .subscriber_max_buffer_size(1)
            .enable_safe_overflow(true)
            .open_or_create()
            .unwrap()
    };
    std::thread::scope(|s| {
        s.spawn(|| {
            let node = node();
            let (rx, tx) = ports(&open(&node, &a2b), &open(&node, &b2a), size);
            ready.wait();
            ready.wait();
            for _ in 0..n {
                let got = next(&rx);
                let reply = loan(&tx, got.payload().len()).write_from_slice(got.payload());
                drop(got);
                reply.send().unwrap();
            }
            // A publisher dropped at once takes its last sample with it:
            // it stays until the other side has it.
            ready.wait();
        });
        let node = node();
        let (rx, tx) = ports(&open(&node, &b2a), &open(&node, &a2b), size);
        // Both sides' ports exist before the first sample.
        ready.wait();
        ready.wait();
        let body = vec![b'x'; size];
        let mut lat = Vec::with_capacity(n);
        for _ in 0..n {
            let t = Instant::now();
            loan(&tx, size).write_from_slice(&body).send().unwrap();
            std::hint::black_box(next(&rx).payload()[0]);
            lat.push(t.elapsed().as_secs_f64() * 1e6);
        }
        ready.wait();
        lat
    })
}

/// `n` samples of `size` bytes one way, the publisher held back by a
/// full subscriber buffer (it retries until delivered); messages per
/// second.
pub fn throughput(size: usize, n: usize) -> f64 {
    const BUFFER: usize = 256;
    let name = unique("stream");
    let ready = Barrier::new(2);
    let open = |node: &Node<ipc::Service>| {
        node.service_builder(&name)
            .publish_subscribe::<[u8]>()
            .history_size(0)
            .subscriber_max_buffer_size(BUFFER)
            .enable_safe_overflow(false)
            .open_or_create()
            .unwrap()
    };
    std::thread::scope(|s| {
        s.spawn(|| {
            let node = node();
            let service = open(&node);
            // The subscriber exists first: a publisher made before it may
            // not see it in time, and its first samples went to no one
            // (the receiver then waited for ever).
            ready.wait();
            let tx = service
                .publisher_builder()
                .initial_max_slice_len(size)
                .backpressure_strategy(BackpressureStrategy::RetryUntilDelivered)
                .create()
                .unwrap();
            ready.wait();
            let body = vec![b'x'; size];
            for _ in 0..n {
                loan(&tx, size).write_from_slice(&body).send().unwrap();
            }
            // Kept until the subscriber has every sample (see above).
            ready.wait();
        });
        let node = node();
        let service = open(&node);
        let rx = service.subscriber_builder().create().unwrap();
        ready.wait();
        let start = Instant::now();
        ready.wait();
        let (mut got, mut bytes) = (0, 0usize);
        let (mut last, mut empty) = (Instant::now(), 0u32);
        let mut waited = Duration::ZERO;
        while got < n {
            match rx.receive().unwrap() {
                Some(s) => {
                    let p = s.payload();
                    // Touch the content, as the other rows' receivers do.
                    bytes += p.iter().step_by(64).map(|&b| b as usize).sum::<usize>();
                    got += 1;
                    empty = 0;
                }
                None => {
                    // The clock only now and then, and only while waiting.
                    empty += 1;
                    if empty == 1 {
                        last = Instant::now();
                    } else if empty.is_multiple_of(4096) && last.elapsed() >= Duration::from_secs(2)
                    {
                        // iceoryx2 lost samples (seen: some 20 k of 4 M at
                        // 64 B): the row reports the rate of what came,
                        // and says so, rather than wait for ever.
                        eprintln!("iceoryx2 row: {got} of {n} samples arrived; the rest were lost");
                        waited = last.elapsed();
                        break;
                    }
                    std::hint::spin_loop()
                }
            }
        }
        let rate = got as f64 / start.elapsed().saturating_sub(waited).as_secs_f64();
        ready.wait();
        std::hint::black_box(bytes);
        rate
    })
}
