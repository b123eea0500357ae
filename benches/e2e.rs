//! End to end through real sockets, per backend: throughput of a 1 → 1
//! stream on a Binary route for 64 B, 1 KiB and 16 KiB contents (each
//! iteration moves a batch of messages from a sender thread to the
//! receiver), and ping-pong round-trip latency.
//! `cargo bench --bench e2e` (side-by-side ratios against raw sockets and
//! tokio: `cargo bench --bench compare`).

use std::sync::mpsc;
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use ipcm::{BackendChoice, Client, Info, Options, Route, Serializer};

mod support;
use support::{WAIT, json_string as content, queue};

fn backends() -> Vec<(&'static str, BackendChoice)> {
    let mut v = vec![("epoll", BackendChoice::Epoll)];
    match ipcm::internals::make_backend(BackendChoice::IoUring) {
        Ok(_) => v.push(("io_uring", BackendChoice::IoUring)),
        Err(e) => eprintln!("io_uring benches skipped: io_uring refused here ({e:?})"),
    }
    v
}

/// A sender thread that sends `n` messages each time it is told to.
struct Pair {
    route: Option<Route>,
    rx: Client,
    go: mpsc::Sender<u64>,
    sender: Option<std::thread::JoinHandle<()>>,
}

impl Pair {
    fn new(backend: BackendChoice, size: usize) -> Pair {
        let route = Route::spawn(None).unwrap();
        let info = Info::new(Serializer::Binary, route.path());
        let opts = Options::new().backend(backend).outbox_limit(256 * 1024);
        let rx = Client::connect(&info, "sink", opts.clone()).unwrap();
        let (go, orders) = mpsc::channel::<u64>();
        let body = content(size);
        let sender = std::thread::spawn(move || {
            let mut tx = Client::connect(&info, "src", opts.listen(false)).unwrap();
            let batch = (64usize * 1024).div_ceil(size + 64) as u64;
            while let Ok(n) = orders.recv() {
                let mut left = batch;
                for _ in 0..n {
                    queue(&mut tx, "sink", &body);
                    left -= 1;
                    if left == 0 {
                        left = batch;
                        tx.drain_pending();
                    }
                }
                tx.flush_pending(Some(WAIT)).unwrap();
            }
            tx.disconnect(None).unwrap();
        });
        Pair {
            route: Some(route),
            rx,
            go,
            sender: Some(sender),
        }
    }

    fn run(&mut self, n: u64, batch: &mut Vec<ipcm::Message>) {
        self.go.send(n).unwrap();
        let mut got = 0;
        while got < n {
            batch.clear();
            got += self.rx.get_messages_timeout_into(batch, WAIT).unwrap() as u64;
        }
    }
}

impl Drop for Pair {
    fn drop(&mut self) {
        let (tx, _) = mpsc::channel();
        drop(std::mem::replace(&mut self.go, tx));
        if let Some(s) = self.sender.take() {
            s.join().unwrap();
        }
        self.rx.disconnect(None).unwrap();
        if let Some(r) = self.route.take() {
            r.unspawn().unwrap();
        }
    }
}

fn throughput(c: &mut Criterion) {
    let mut g = c.benchmark_group("throughput");
    g.sample_size(10).measurement_time(Duration::from_secs(3));
    for (name, backend) in backends() {
        for size in [64usize, 1024, 16384] {
            let n: u64 = if size > 1024 { 2_000 } else { 20_000 };
            g.throughput(Throughput::Elements(n));
            let mut pair = Pair::new(backend, size);
            let mut batch = Vec::with_capacity(4096);
            g.bench_function(format!("{name}/{size}"), |b| {
                b.iter(|| pair.run(n, &mut batch))
            });
        }
    }
    g.finish();
}

fn ping_pong(c: &mut Criterion) {
    let mut g = c.benchmark_group("ping_pong");
    g.sample_size(20).measurement_time(Duration::from_secs(3));
    for (name, backend) in backends() {
        for busy in [false, true] {
            let route = Route::spawn(None).unwrap();
            let info = Info::new(Serializer::Binary, route.path());
            let opts = Options::new().backend(backend).busy_poll(busy);
            let echo = Client::connect(&info, "echo", opts.clone()).unwrap();
            let echo_thread = support::spawn_echo(echo);
            let mut ping = Client::connect(&info, "ping", opts).unwrap();
            let body = content(64);
            let mut batch = Vec::new();
            let mode = if busy { "busy" } else { "blocking" };
            g.bench_function(format!("{name}/{mode}/64"), |b| {
                b.iter_custom(|iters| {
                    let start = Instant::now();
                    for _ in 0..iters {
                        ping.send_json("echo", &body).unwrap();
                        batch.clear();
                        while batch.is_empty() {
                            ping.get_messages_timeout_into(&mut batch, WAIT).unwrap();
                        }
                    }
                    start.elapsed()
                })
            });
            ping.send_json("echo", "0").unwrap();
            echo_thread.join().unwrap();
            ping.disconnect(None).unwrap();
            route.unspawn().unwrap();
        }
    }
    g.finish();
}

criterion_group!(benches, throughput, ping_pong);
criterion_main!(benches);
