//! Threaded against inline, in one run: throughput of a 1 → 1 stream and
//! ping-pong round-trip latency, each measured for both modes side by side
//! (alternating rounds; medians). `cargo bench --bench threaded_vs_inline`
//! (`-- --quick` for fewer rounds).

use std::time::{Duration, Instant};

use ipcm::{BackendChoice, Client, Info, Options, Route, Serializer};

fn route() -> (Route, Info) {
    let r = Route::spawn(None).unwrap();
    let info = Info::new(Serializer::Json, r.path());
    (r, info)
}

fn opts() -> Options {
    Options::new().backend(BackendChoice::Auto)
}

/// Messages per second of a 1 → 1 stream (sender batches 64 per flush).
fn throughput(threaded: bool, n: u64) -> f64 {
    let (route, info) = route();
    let rx_client = Client::connect(&info, "sink", opts()).unwrap();
    let info2 = info.clone();
    let start = Instant::now();
    let sender = std::thread::spawn(move || {
        let mut tx = Client::connect(&info2, "src", opts().listen(false)).unwrap();
        for i in 0..n {
            if i % 64 == 0 {
                tx.drain_pending();
            }
            while let Err(ipcm::Error::WouldBlock { .. }) = tx.queue_message("sink", &i) {
                tx.drain_pending();
            }
        }
        tx.disconnect(None).unwrap();
    });
    let mut got = 0;
    if threaded {
        let (_s, mut rx, h) = rx_client.into_threaded().unwrap();
        let mut batch = Vec::with_capacity(4096);
        while got < n {
            batch.clear();
            if rx.recv_batch(&mut batch, 4096) == 0
                && let Some(m) = rx.recv_timeout(Duration::from_secs(10))
            {
                batch.push(m);
            }
            got += batch.len() as u64;
        }
        let secs = start.elapsed().as_secs_f64();
        sender.join().unwrap();
        h.shutdown().unwrap();
        route.unspawn().unwrap();
        return n as f64 / secs;
    }
    let mut rx = rx_client;
    while got < n {
        got += rx
            .get_messages_timeout(Duration::from_secs(10))
            .unwrap()
            .len() as u64;
    }
    let secs = start.elapsed().as_secs_f64();
    sender.join().unwrap();
    rx.disconnect(None).unwrap();
    route.unspawn().unwrap();
    n as f64 / secs
}

/// Round-trip latencies (µs) of `n` ping-pongs; the echo side is threaded
/// or inline, the pinger is inline in both cases.
fn ping_pong(threaded: bool, n: usize) -> Vec<f64> {
    let (route, info) = route();
    let echo = Client::connect(&info, "echo", opts()).unwrap();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = stop.clone();
    let echo_thread = if threaded {
        let (mut tx, mut rx, h) = echo.into_threaded().unwrap();
        std::thread::spawn(move || {
            while let Some(m) = rx.recv() {
                if m.is_terminate() {
                    break;
                }
                tx.send(m.from(), &m.content_value().unwrap()).unwrap();
            }
            drop(h);
        })
    } else {
        let mut echo = echo;
        std::thread::spawn(move || {
            while !flag.load(std::sync::atomic::Ordering::Relaxed) {
                for m in echo
                    .get_messages_timeout(Duration::from_millis(100))
                    .unwrap()
                {
                    if m.is_terminate() {
                        return;
                    }
                    echo.send_message(m.from(), &m.content_value().unwrap())
                        .unwrap();
                }
            }
        })
    };
    let mut ping = Client::connect(&info, "ping", opts()).unwrap();
    let mut lat = Vec::with_capacity(n);
    for i in 0..n + 100 {
        let t = Instant::now();
        ping.send_message("echo", &i).unwrap();
        loop {
            if !ping
                .get_messages_timeout(Duration::from_secs(5))
                .unwrap()
                .is_empty()
            {
                break;
            }
        }
        if i >= 100 {
            lat.push(t.elapsed().as_secs_f64() * 1e6);
        }
    }
    ping.send_message("echo", &serde_json::json!({"terminate": 1}))
        .unwrap();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    echo_thread.join().unwrap();
    drop(ping);
    route.unspawn().unwrap();
    lat.sort_by(f64::total_cmp);
    lat
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let (rounds, n, pings) = if quick {
        (3, 200_000, 2_000)
    } else {
        (7, 1_000_000, 10_000)
    };
    let (mut ti, mut tt) = (Vec::new(), Vec::new());
    let (mut pi, mut pt) = (Vec::new(), Vec::new());
    for _ in 0..rounds {
        ti.push(throughput(false, n));
        tt.push(throughput(true, n));
        let l = ping_pong(false, pings);
        pi.push((l[l.len() / 2], l[l.len() * 99 / 100]));
        let l = ping_pong(true, pings);
        pt.push((l[l.len() / 2], l[l.len() * 99 / 100]));
    }
    let (mi, mt) = (median(&mut ti), median(&mut tt));
    let mut p50i: Vec<f64> = pi.iter().map(|p| p.0).collect();
    let mut p99i: Vec<f64> = pi.iter().map(|p| p.1).collect();
    let mut p50t: Vec<f64> = pt.iter().map(|p| p.0).collect();
    let mut p99t: Vec<f64> = pt.iter().map(|p| p.1).collect();
    let (a, b, c, d) = (
        median(&mut p50i),
        median(&mut p99i),
        median(&mut p50t),
        median(&mut p99t),
    );
    println!("mode      msgs/s (1->1, 64-msg batches)   ping-pong p50 us   p99 us");
    println!("inline    {mi:>12.0}                   {a:>10.1}   {b:>8.1}");
    println!("threaded  {mt:>12.0}                   {c:>10.1}   {d:>8.1}");
    println!(
        "summary: threaded/inline throughput {:.2}, ping-pong p50 {:.2}x, over {rounds} rounds",
        mt / mi,
        c / a
    );
}
