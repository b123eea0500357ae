//! ipcm side by side with what a user could pick instead, in one process and
//! on the same work: `cargo bench --bench compare` (`-- --quick` for a short
//! run).
//!
//! Systems, each with a sender and a receiver on separate threads:
//! * `raw`: `std::os::unix::net::UnixStream` with frames hand-batched into
//!   64 KiB writes and parsed out of 64 KiB reads — the practical limit;
//! * `tokio`: tokio-util's `LengthDelimitedCodec` over a `UnixStream`, one
//!   current-thread runtime per thread;
//! * `ipcm-uring`, `ipcm-epoll`: ipcm clients on a Binary route;
//! * `ipcm-json`: ipcm on the Perl-compatible Json route (io_uring where
//!   available);
//! * `ipcm-thread`: the threaded mode (Binary, io_uring where available):
//!   the receiver's reactor on its own thread, handing messages over
//!   through the lock-free receive ring; in ping-pong both ends threaded.
//! * `ipcm-async`: the async face (`ipcm::aio`, Binary, io_uring where
//!   available) at both ends, each on a current-thread tokio runtime, as
//!   the `tokio` row: fed to its `Sink` and flushed every 64 KiB, batches
//!   read with `receive().await`; in ping-pong `send().await` and
//!   `recv().await`.
//!
//! Every round runs every system once per payload size (side by side, so
//! machine noise hits them alike); tables give medians over the rounds,
//! and each ratio is the median of the per-round ratios (a pair measured
//! in one round, seconds apart, shares the machine's state).
//! Results go to `target/ipcm-compare/results.csv` and `results.svg`; the
//! last line printed is a one-line summary of the headline ratios.
//!
//! Other sections: ping-pong round trips with blocking waits and with busy
//! polling (the table's blocking round trips are ipcm's defaults, whose
//! waits look for the reply for 20 µs before sleeping; a section after it
//! has ipcm's waits sleep at once, as raw's do), fan-in (1,000 senders
//! into one listener against 1 → 1), and the memory of 10,000 idle
//! connections (measured in a child process).

use std::fmt::Write as _;
use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use ipcm::{BackendChoice, Client, Info, Options, Route, Serializer};
use tokio_util::codec::{Framed, LengthDelimitedCodec};

mod support;

#[cfg(feature = "iceoryx2")]
#[path = "support/iox.rs"]
mod iox;
#[cfg(not(feature = "iceoryx2"))]
mod iox {
    //! Without the `iceoryx2` feature its row is not in the list.
    pub fn throughput(_: usize, _: usize) -> f64 {
        unreachable!("iceoryx2 row without the iceoryx2 feature")
    }
    pub fn ping_pong(_: usize, _: usize) -> Vec<f64> {
        unreachable!("iceoryx2 row without the iceoryx2 feature")
    }
}
use support::{WAIT, json_string as payload, queue};

const SIZES: [usize; 3] = [64, 1024, 16384];
const IPCM_AND_BASELINES: [System; 8] = [
    System::Raw,
    System::Tokio,
    System::Ipcm(Flavor::Uring),
    System::Ipcm(Flavor::Epoll),
    System::Ipcm(Flavor::Json),
    System::Ipcm(Flavor::Threaded),
    System::Ipcm(Flavor::Async),
    System::Ipcm(Flavor::Shm),
];

/// Every system measured: the iceoryx2 row only with the bench's
/// `iceoryx2` feature.
fn systems() -> Vec<System> {
    let mut v = IPCM_AND_BASELINES.to_vec();
    if cfg!(feature = "iceoryx2") {
        v.push(System::Iceoryx2);
    }
    v
}

#[derive(Clone, Copy, PartialEq, Debug)]
enum Flavor {
    Uring,
    Epoll,
    Json,
    /// Binary, io_uring where available, the reactor on its own thread.
    Threaded,
    /// The threaded reactor awaited from tokio (`ipcm::aio`).
    Async,
    /// Binary, io_uring where available, on the shared-memory lane (the
    /// other rows keep it off: they measure the socket).
    Shm,
}

#[derive(Clone, Copy, PartialEq, Debug)]
enum System {
    Raw,
    Tokio,
    Ipcm(Flavor),
    /// iceoryx2 publish-subscribe between two threads, busy polling
    /// (feature `iceoryx2`).
    Iceoryx2,
}

impl System {
    fn name(self) -> &'static str {
        match self {
            System::Raw => "raw",
            System::Tokio => "tokio",
            System::Ipcm(Flavor::Uring) => "ipcm-uring",
            System::Ipcm(Flavor::Epoll) => "ipcm-epoll",
            System::Ipcm(Flavor::Json) => "ipcm-json",
            System::Ipcm(Flavor::Threaded) => "ipcm-thread",
            System::Ipcm(Flavor::Async) => "ipcm-async",
            System::Ipcm(Flavor::Shm) => "ipcm-shm",
            System::Iceoryx2 => "iceoryx2",
        }
    }
}

/// Messages per throughput run: a byte budget (1 GiB in a full run, so
/// that a 16 KiB run lasts a tenth of a second or more and a scheduling
/// hiccup does not make its rate), within a count range.
fn messages_for(size: usize, quick: bool) -> usize {
    let bytes: usize = if quick { 48 << 20 } else { 1 << 30 };
    let cap = if quick { 1_000_000 } else { 4_000_000 };
    (bytes / size).clamp(20_000, cap)
}

// ----- raw sockets -----------------------------------------------------

fn raw_throughput(size: usize, n: usize) -> f64 {
    let (mut a, mut b) = UnixStream::pair().unwrap();
    let body = payload(size).into_bytes();
    let start = Instant::now();
    let sender = std::thread::spawn(move || {
        let mut buf = Vec::with_capacity(64 * 1024 + size + 4);
        for _ in 0..n {
            buf.extend_from_slice(&(size as u32).to_be_bytes());
            buf.extend_from_slice(&body);
            if buf.len() >= 64 * 1024 {
                a.write_all(&buf).unwrap();
                buf.clear();
            }
        }
        a.write_all(&buf).unwrap();
    });
    let mut buf = vec![0u8; 64 * 1024 + size + 4];
    let (mut filled, mut got, mut bytes) = (0usize, 0usize, 0usize);
    while got < n {
        let r = b.read(&mut buf[filled..]).unwrap();
        assert!(r > 0, "raw sender closed early");
        filled += r;
        let mut at = 0;
        while filled - at >= 4 {
            let len = u32::from_be_bytes(buf[at..at + 4].try_into().unwrap()) as usize;
            if filled - at < 4 + len {
                break;
            }
            bytes += len + (buf[at + 4 + len - 1] & 1) as usize;
            got += 1;
            at += 4 + len;
        }
        buf.copy_within(at..filled, 0);
        filled -= at;
    }
    let secs = start.elapsed().as_secs_f64();
    sender.join().unwrap();
    std::hint::black_box(bytes);
    n as f64 / secs
}

fn read_frame(s: &mut UnixStream, buf: &mut Vec<u8>) -> io::Result<()> {
    let mut len = [0u8; 4];
    s.read_exact(&mut len)?;
    buf.resize(u32::from_be_bytes(len) as usize, 0);
    s.read_exact(buf)
}

/// Reads exactly `buf.len()` bytes from a non-blocking socket, spinning.
fn spin_read(s: &mut UnixStream, buf: &mut [u8]) -> io::Result<()> {
    let mut at = 0;
    while at < buf.len() {
        match s.read(&mut buf[at..]) {
            Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => at += n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => std::hint::spin_loop(),
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

fn raw_ping_pong(size: usize, n: usize, spin: bool) -> Vec<f64> {
    let (mut a, mut b) = UnixStream::pair().unwrap();
    a.set_nonblocking(spin).unwrap();
    b.set_nonblocking(spin).unwrap();
    let echo = std::thread::spawn(move || {
        let mut buf = Vec::new();
        let mut len = [0u8; 4];
        loop {
            let r = if spin {
                spin_read(&mut b, &mut len).and_then(|()| {
                    buf.resize(u32::from_be_bytes(len) as usize, 0);
                    spin_read(&mut b, &mut buf)
                })
            } else {
                read_frame(&mut b, &mut buf)
            };
            if r.is_err() {
                return;
            }
            let mut out = (buf.len() as u32).to_be_bytes().to_vec();
            out.extend_from_slice(&buf);
            b.write_all(&out).unwrap();
        }
    });
    let body = payload(size).into_bytes();
    let mut frame = (size as u32).to_be_bytes().to_vec();
    frame.extend_from_slice(&body);
    let mut lat = Vec::with_capacity(n);
    let mut buf = Vec::new();
    let mut len = [0u8; 4];
    for i in 0..n + n / 10 {
        let t = Instant::now();
        a.write_all(&frame).unwrap();
        if spin {
            spin_read(&mut a, &mut len).unwrap();
            buf.resize(u32::from_be_bytes(len) as usize, 0);
            spin_read(&mut a, &mut buf).unwrap();
        } else {
            read_frame(&mut a, &mut buf).unwrap();
        }
        if i >= n / 10 {
            lat.push(t.elapsed().as_secs_f64() * 1e6);
        }
    }
    drop(a);
    echo.join().unwrap();
    lat
}

// ----- tokio -------------------------------------------------------------

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()
        .unwrap()
}

fn framed(s: UnixStream) -> Framed<tokio::net::UnixStream, LengthDelimitedCodec> {
    s.set_nonblocking(true).unwrap();
    Framed::new(
        tokio::net::UnixStream::from_std(s).unwrap(),
        LengthDelimitedCodec::new(),
    )
}

fn tokio_throughput(size: usize, n: usize) -> f64 {
    let (a, b) = UnixStream::pair().unwrap();
    let body = Bytes::from(payload(size));
    let start = Instant::now();
    let sender = std::thread::spawn(move || {
        runtime().block_on(async move {
            let mut tx = framed(a);
            let batch = (64 * 1024 / (size + 4)).max(1);
            let mut left = batch;
            for _ in 0..n {
                tx.feed(body.clone()).await.unwrap();
                left -= 1;
                if left == 0 {
                    left = batch;
                    SinkExt::<Bytes>::flush(&mut tx).await.unwrap();
                }
            }
            SinkExt::<Bytes>::flush(&mut tx).await.unwrap();
        })
    });
    let bytes = runtime().block_on(async move {
        let mut rx = framed(b);
        let (mut got, mut bytes) = (0, 0);
        while got < n {
            let f = rx.next().await.unwrap().unwrap();
            bytes += f.len();
            got += 1;
        }
        bytes
    });
    let secs = start.elapsed().as_secs_f64();
    sender.join().unwrap();
    std::hint::black_box(bytes);
    n as f64 / secs
}

fn tokio_ping_pong(size: usize, n: usize) -> Vec<f64> {
    let (a, b) = UnixStream::pair().unwrap();
    let echo = std::thread::spawn(move || {
        runtime().block_on(async move {
            let mut s = framed(b);
            while let Some(Ok(f)) = s.next().await {
                if s.send(f.freeze()).await.is_err() {
                    return;
                }
            }
        })
    });
    let body = Bytes::from(payload(size));
    let lat = runtime().block_on(async move {
        let mut s = framed(a);
        let mut lat = Vec::with_capacity(n);
        for i in 0..n + n / 10 {
            let t = Instant::now();
            s.send(body.clone()).await.unwrap();
            s.next().await.unwrap().unwrap();
            if i >= n / 10 {
                lat.push(t.elapsed().as_secs_f64() * 1e6);
            }
        }
        lat
    });
    echo.join().unwrap();
    lat
}

// ----- ipcm ------------------------------------------------------------

fn ipcm_route(flavor: Flavor) -> (Route, Info, Options) {
    let route = Route::spawn(None).unwrap();
    let (ser, opts) = ipcm_route_options(flavor);
    let info = Info::new(ser, route.path());
    (route, info, opts)
}

/// The serializer, backend and options of a flavor's clients.
fn ipcm_route_options(flavor: Flavor) -> (Serializer, Options) {
    let ser = if flavor == Flavor::Json {
        Serializer::Json
    } else {
        Serializer::Binary
    };
    let backend = match flavor {
        Flavor::Epoll => BackendChoice::Epoll,
        Flavor::Uring | Flavor::Json | Flavor::Threaded | Flavor::Async | Flavor::Shm => {
            uring_or_epoll()
        }
    };
    // A bounded outbox gives the sender back-pressure, as the socket buffer
    // gives the raw sender and the codec's 8 KiB boundary gives tokio;
    // the 16 MiB default would let it run ahead and churn memory.
    let opts = Options::new()
        .backend(backend)
        .outbox_limit(256 * 1024)
        .lane(flavor == Flavor::Shm)
        .lane_after_bytes(0);
    (ser, opts)
}

fn uring_or_epoll() -> BackendChoice {
    use std::sync::OnceLock;
    static CHOICE: OnceLock<BackendChoice> = OnceLock::new();
    *CHOICE.get_or_init(
        || match ipcm::internals::make_backend(BackendChoice::IoUring) {
            Ok(_) => BackendChoice::IoUring,
            Err(e) => {
                eprintln!("note: io_uring refused here ({e:?}); the ipcm-uring rows use epoll");
                BackendChoice::Epoll
            }
        },
    )
}

/// Receives `n` messages, returning the content bytes seen.
fn ipcm_receive(rx: &mut Client, n: usize) -> usize {
    let (mut got, mut bytes) = (0, 0);
    while got < n {
        let batch = rx.receive(WAIT).unwrap();
        assert!(!batch.is_empty(), "ipcm receiver starved");
        for m in &batch {
            bytes += m.content_json().len();
            got += 1;
        }
    }
    bytes
}

/// Messages from the threaded receiver's ring, in batches.
fn threaded_receive(rx: &mut ipcm::Receiver, n: usize) -> usize {
    let (mut got, mut bytes) = (0, 0);
    while got < n {
        let batch = rx.receive(WAIT);
        assert!(!batch.is_empty(), "threaded receiver starved");
        for m in &batch {
            bytes += m.content_json().len();
            got += 1;
        }
    }
    bytes
}

/// Throughput with both ends on the async face, each on a current-thread
/// runtime of its own thread.
fn async_throughput(size: usize, n: usize) -> f64 {
    use serde_json::value::RawValue;
    let (route, info, opts) = ipcm_route(Flavor::Async);
    let rt = runtime();
    let (_stx, mut rx, sink) = rt
        .block_on(async { Client::connect(&info, "sink", opts.clone())?.into_async() })
        .unwrap();
    let body = RawValue::from_string(payload(size)).unwrap();
    let start = Instant::now();
    let sender = std::thread::spawn(move || {
        runtime().block_on(async move {
            let c = Client::connect(&info, "src", opts.listen(false)).unwrap();
            let (mut tx, _rx, handle) = c.into_async().unwrap();
            // As the tokio row: fed to the Sink, flushed every 64 KiB.
            let batch = (64 * 1024 / (size + 4)).max(1);
            let mut left = batch;
            for _ in 0..n {
                tx.feed(("sink", &*body)).await.unwrap();
                left -= 1;
                if left == 0 {
                    left = batch;
                    SinkExt::<(&str, &RawValue)>::flush(&mut tx).await.unwrap();
                }
            }
            SinkExt::<(&str, &RawValue)>::flush(&mut tx).await.unwrap();
            handle.shutdown().await.unwrap();
        })
    });
    let bytes = rt.block_on(async {
        let (mut got, mut bytes) = (0, 0);
        while got < n {
            let batch = rx.receive().await;
            assert!(!batch.is_empty(), "async receiver starved");
            for m in &batch {
                bytes += m.content_json().len();
                got += 1;
            }
        }
        bytes
    });
    let secs = start.elapsed().as_secs_f64();
    sender.join().unwrap();
    std::hint::black_box(bytes);
    rt.block_on(sink.shutdown()).unwrap();
    route.unspawn().unwrap();
    n as f64 / secs
}

/// Ping-pong with both ends on the async face, each on a current-thread
/// runtime: `send().await` and `recv().await`.
fn async_ping_pong(size: usize, n: usize) -> Vec<f64> {
    use serde_json::value::RawValue;
    let (route, info, opts) = ipcm_route(Flavor::Async);
    let (einfo, eopts) = (info.clone(), opts.clone());
    let (up_tx, up_rx) = std::sync::mpsc::channel();
    let echo = std::thread::spawn(move || {
        runtime().block_on(async move {
            let c = Client::connect(&einfo, "echo", eopts).unwrap();
            let (mut tx, mut rx, handle) = c.into_async().unwrap();
            up_tx.send(()).unwrap();
            while let Some(m) = rx.recv().await {
                if m.content_json() == "0" {
                    break;
                }
                let raw = RawValue::from_string(m.content_json().to_string()).unwrap();
                tx.send(m.from(), &*raw).await.unwrap();
            }
            handle.shutdown().await.unwrap();
        })
    });
    up_rx.recv().unwrap();
    let body = RawValue::from_string(payload(size)).unwrap();
    let lat = runtime().block_on(async move {
        let c = Client::connect(&info, "ping", opts).unwrap();
        let (mut tx, mut rx, handle) = c.into_async().unwrap();
        let mut lat = Vec::with_capacity(n);
        for i in 0..n + n / 10 {
            let t = Instant::now();
            tx.send("echo", &*body).await.unwrap();
            rx.recv().await.expect("ping starved");
            if i >= n / 10 {
                lat.push(t.elapsed().as_secs_f64() * 1e6);
            }
        }
        tx.send("echo", &0).await.unwrap();
        tx.flush().await.unwrap();
        handle.shutdown().await.unwrap();
        lat
    });
    echo.join().unwrap();
    route.unspawn().unwrap();
    lat
}

fn ipcm_throughput(flavor: Flavor, size: usize, n: usize) -> f64 {
    if flavor == Flavor::Async {
        return async_throughput(size, n);
    }
    let (route, info, opts) = ipcm_route(flavor);
    let rx = Client::connect(&info, "sink", opts.clone()).unwrap();
    let mut threaded = None;
    let mut inline = None;
    if flavor == Flavor::Threaded {
        threaded = Some(rx.into_threaded().unwrap());
    } else {
        inline = Some(rx);
    }
    let body = payload(size);
    // The clock starts once the connection is up (for `ipcm-shm`, on its
    // lane both ways), as raw's and tokio's start with their socket pair
    // made: a stream's rate, not a connect's cost.
    let up = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let lane_up = up.clone();
    let ready = std::sync::Arc::new(std::sync::Barrier::new(2));
    let go = ready.clone();
    let sender = std::thread::spawn(move || {
        let mut tx = Client::connect(&info, "src", opts.listen(false)).unwrap();
        queue(&mut tx, "sink", &body);
        tx.flush_pending(Some(WAIT)).unwrap();
        let deadline = Instant::now() + WAIT;
        while flavor == Flavor::Shm && tx.lane("sink") != Some(ipcm::LaneKind::SharedMemory) {
            assert!(Instant::now() < deadline, "the lane never came up");
            tx.get_messages().unwrap();
        }
        lane_up.store(true, std::sync::atomic::Ordering::Release);
        go.wait();
        let batch = (64usize * 1024).div_ceil(size + 64);
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
        tx
    });
    let receive = |inline: &mut Option<Client>,
                   threaded: &mut Option<(_, ipcm::Receiver, _)>,
                   n| match (inline, threaded) {
        (Some(rx), _) => ipcm_receive(rx, n),
        (None, Some((_, rx, _))) => threaded_receive(rx, n),
        (None, None) => unreachable!(),
    };
    receive(&mut inline, &mut threaded, 1);
    while !up.load(std::sync::atomic::Ordering::Acquire) {
        // Turns that answer the lane's offer (nothing else arrives yet).
        if let Some(rx) = inline.as_mut() {
            assert!(rx.receive(Duration::from_millis(1)).unwrap().is_empty());
        } else {
            std::thread::sleep(Duration::from_millis(1));
        }
    }
    ready.wait();
    let start = Instant::now();
    let bytes = receive(&mut inline, &mut threaded, n);
    let secs = start.elapsed().as_secs_f64();
    let mut tx = sender.join().unwrap();
    std::hint::black_box(bytes);
    tx.disconnect(None).unwrap();
    if let Some(mut rx) = inline {
        rx.disconnect(None).unwrap();
    }
    if let Some((_, _, handle)) = threaded {
        handle.shutdown().unwrap();
    }
    route.unspawn().unwrap();
    n as f64 / secs
}

/// Ping-pong with both ends in the threaded mode: blocking `Sender::send`
/// and `Receiver::recv_timeout`.
fn threaded_ping_pong(size: usize, n: usize) -> Vec<f64> {
    use serde_json::value::RawValue;
    let (route, info, opts) = ipcm_route(Flavor::Threaded);
    let echo = Client::connect(&info, "echo", opts.clone()).unwrap();
    let (mut etx, mut erx, ehandle) = echo.into_threaded().unwrap();
    let echo_thread = std::thread::spawn(move || {
        loop {
            let m = erx.recv_timeout(WAIT).expect("echo starved");
            if m.content_json() == "0" {
                break;
            }
            let raw = RawValue::from_string(m.content_json().to_string()).unwrap();
            etx.send(m.from(), &*raw).unwrap();
        }
        ehandle.shutdown().unwrap();
    });
    let ping = Client::connect(&info, "ping", opts).unwrap();
    let (mut tx, mut rx, handle) = ping.into_threaded().unwrap();
    let body = RawValue::from_string(payload(size)).unwrap();
    let mut lat = Vec::with_capacity(n);
    for i in 0..n + n / 10 {
        let t = Instant::now();
        tx.send("echo", &*body).unwrap();
        rx.recv_timeout(WAIT).expect("ping starved");
        if i >= n / 10 {
            lat.push(t.elapsed().as_secs_f64() * 1e6);
        }
    }
    tx.send("echo", &0).unwrap();
    echo_thread.join().unwrap();
    handle.shutdown().unwrap();
    route.unspawn().unwrap();
    lat
}

/// `n` timed round trips (after `n / 10` untimed ones) from `ping` to
/// the client `echo`, then the `0` that stops the echo; microseconds.
fn pings_to_echo(ping: &mut Client, size: usize, n: usize) -> Vec<f64> {
    let body = payload(size);
    let mut lat = Vec::with_capacity(n);
    for i in 0..n + n / 10 {
        let t = Instant::now();
        ping.send_json("echo", &body).unwrap();
        while ping.receive(WAIT).unwrap().is_empty() {}
        if i >= n / 10 {
            lat.push(t.elapsed().as_secs_f64() * 1e6);
        }
    }
    ping.send_json("echo", "0").unwrap();
    lat
}

/// How an ipcm ping-pong's clients wait for the reply.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Wait {
    /// Blocking waits with the default options: a wait looks for work for
    /// `Options::spin_before_sleep` (20 µs), then sleeps.
    Default,
    /// Blocking waits that sleep at once (`spin_before_sleep` zero), as
    /// raw's and tokio's do.
    Sleep,
    /// Busy polling.
    Busy,
}

fn ipcm_ping_pong(flavor: Flavor, size: usize, n: usize, wait: Wait) -> Vec<f64> {
    if flavor == Flavor::Threaded {
        return threaded_ping_pong(size, n);
    }
    if flavor == Flavor::Async {
        return async_ping_pong(size, n);
    }
    let (route, info, opts) = ipcm_route(flavor);
    let mut opts = opts.busy_poll(wait == Wait::Busy);
    if wait == Wait::Sleep {
        opts = opts.spin_before_sleep(Duration::ZERO);
    }
    let echo = Client::connect(&info, "echo", opts.clone()).unwrap();
    let echo_thread = support::spawn_echo(echo);
    let mut ping = Client::connect(&info, "ping", opts).unwrap();
    let lat = pings_to_echo(&mut ping, size, n);
    echo_thread.join().unwrap();
    ping.disconnect(None).unwrap();
    route.unspawn().unwrap();
    lat
}

// ----- fan-in and idle memory -----------------------------------------------

/// Fan-in: `senders` connections into one ipcm listener on `listener`'s
/// backend; messages per second at the listener.
///
/// The senders are plain sockets, said hello to, that write pre-encoded
/// batches of 64 Binary messages (each batch with the next `stamp_ord`s,
/// so every connection's stream stays in order), round-robin from one
/// thread: a write per batch is all they cost, so the listener is what is
/// measured, with 1 connection and with 1,000 alike.
fn fan_in_on(listener: Flavor, senders: usize, n: usize) -> f64 {
    let (route, info, opts) = ipcm_route(listener);
    let mut rx = Client::connect(&info, "sink", opts).unwrap();
    let per = n / senders / 64 * 64;
    let total = per * senders;
    let socket = rx.path().to_string();
    let ready = std::sync::Arc::new(std::sync::Barrier::new(2));
    let go = ready.clone();
    let sender = std::thread::spawn(move || {
        let body = payload(64);
        let mut conns: Vec<(UnixStream, Vec<u8>)> = (0..senders)
            .map(|i| {
                let name = format!("s{i}");
                let mut s = UnixStream::connect(&socket).unwrap();
                let mut hello = bytes::BytesMut::new();
                Serializer::Binary.encode_hello(&name, &mut hello);
                let mut batch = bytes::BytesMut::new();
                ipcm::internals::encode_frame(&hello, &mut batch).unwrap();
                s.write_all(&batch).unwrap();
                batch.clear();
                for _ in 0..64 {
                    let mut p = bytes::BytesMut::new();
                    Serializer::Binary
                        .encode_payload(&name, "sink", &body, &mut p)
                        .unwrap();
                    ipcm::internals::encode_frame(&p, &mut batch).unwrap();
                }
                (s, batch.to_vec())
            })
            .collect();
        go.wait();
        for round in 0..(per / 64) as u64 {
            for (s, batch) in &mut conns {
                // One sender's frames are all the same length.
                let frame_len = batch.len() / 64;
                // Next stamp_ords: bytes 28..36 of each Binary payload,
                // after the frame's 4-byte length.
                for j in 0..64 {
                    let at = j * frame_len + 4 + 28;
                    let ord = round * 64 + j as u64;
                    batch[at..at + 8].copy_from_slice(&ord.to_le_bytes());
                }
                s.write_all(batch).unwrap();
            }
        }
        conns
    });
    ready.wait();
    let start = Instant::now();
    ipcm_receive(&mut rx, total);
    let secs = start.elapsed().as_secs_f64();
    drop(sender.join().unwrap());
    rx.disconnect(None).unwrap();
    route.unspawn().unwrap();
    total as f64 / secs
}

/// Fan-in over the shared-memory lane: `senders` ipcm clients (Binary, one
/// thread driving them all in turn, 64 messages each per turn) into one
/// ipcm listener, every connection on its own lane before the clock
/// starts.
fn fan_in_lane(senders: usize, n: usize) -> f64 {
    use std::sync::atomic::{AtomicBool, Ordering};
    let (route, info, opts) = ipcm_route(Flavor::Shm);
    let mut rx = Client::connect(&info, "sink", opts.clone()).unwrap();
    let per = n / senders / 64 * 64;
    let total = per * senders;
    let up = std::sync::Arc::new(AtomicBool::new(false));
    let lanes_up = up.clone();
    let ready = std::sync::Arc::new(std::sync::Barrier::new(2));
    let go = ready.clone();
    let sender = std::thread::spawn(move || {
        let body = payload(64);
        let mut txs: Vec<Client> = (0..senders)
            .map(|i| Client::connect(&info, &format!("s{i}"), opts.clone().listen(false)).unwrap())
            .collect();
        for tx in &mut txs {
            queue(tx, "sink", &body);
            tx.flush_pending(Some(WAIT)).unwrap();
        }
        let deadline = Instant::now() + WAIT;
        while txs
            .iter()
            .any(|tx| tx.lane("sink") != Some(ipcm::LaneKind::SharedMemory))
        {
            assert!(Instant::now() < deadline, "lanes never came up");
            for tx in &mut txs {
                tx.get_messages().unwrap();
            }
        }
        lanes_up.store(true, Ordering::Release);
        go.wait();
        for _ in 0..per / 64 {
            for tx in &mut txs {
                for _ in 0..64 {
                    queue(tx, "sink", &body);
                }
                tx.drain_pending();
            }
        }
        for tx in &mut txs {
            tx.flush_pending(Some(WAIT)).unwrap();
        }
        txs
    });
    // The warm-up messages, then turns until every lane is up both ways.
    ipcm_receive(&mut rx, senders);
    while !up.load(Ordering::Acquire) {
        let _ = rx.receive(std::time::Duration::from_millis(1)).unwrap();
    }
    ready.wait();
    let start = Instant::now();
    ipcm_receive(&mut rx, total);
    let secs = start.elapsed().as_secs_f64();
    for mut tx in sender.join().unwrap() {
        tx.disconnect(None).unwrap();
    }
    rx.disconnect(None).unwrap();
    route.unspawn().unwrap();
    total as f64 / secs
}

/// The lane's busy ping-pong with its echo in another process (this
/// binary, re-run in the `echo` role), as two ipcm peers usually are. In
/// one process the two clients also share the process's stamp clock (one
/// cache line, written by every send), which two processes do not.
fn ipcm_ping_pong_processes(size: usize, n: usize) -> Vec<f64> {
    use std::io::BufRead;
    let (route, info, opts) = ipcm_route(Flavor::Shm);
    let opts = opts.busy_poll(true);
    let mut child = std::process::Command::new(std::env::current_exe().unwrap())
        .env("IPCM_COMPARE_ROLE", "echo")
        .env("IPCM_COMPARE_INFO", info.to_info_string())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut ready = String::new();
    std::io::BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut ready)
        .unwrap();
    assert_eq!(ready.trim(), "ready", "the echo process did not start");
    let mut ping = Client::connect(&info, "ping", opts).unwrap();
    let lat = pings_to_echo(&mut ping, size, n);
    assert!(child.wait().unwrap().success(), "the echo process failed");
    ping.disconnect(None).unwrap();
    route.unspawn().unwrap();
    lat
}

/// The `echo` role: the echo end of [`ipcm_ping_pong_processes`].
fn echo_process() {
    let info = Info::parse(&std::env::var("IPCM_COMPARE_INFO").unwrap()).unwrap();
    let (_, opts) = ipcm_route_options(Flavor::Shm);
    let echo = Client::connect(&info, "echo", opts.busy_poll(true)).unwrap();
    println!("ready");
    support::spawn_echo(echo).join().unwrap();
}

/// Bytes of listener memory (RSS delta) per idle connection, with `count`
/// connections held open by a child process (this binary, re-run in the
/// idle-clients role).
fn idle_cost(backend: BackendChoice, count: usize) -> Option<f64> {
    support::raise_fd_limit();
    let route = Route::spawn(None).unwrap();
    let info = Info::new(Serializer::Binary, route.path());
    let mut rx = Client::connect(&info, "sink", Options::new().backend(backend)).ok()?;
    let mut child = std::process::Command::new(std::env::current_exe().unwrap());
    child.env("IPCM_COMPARE_ROLE", "idle-clients");
    let run = support::measure_idle(&mut rx, &info, count, child);
    rx.disconnect(None).unwrap();
    route.unspawn().unwrap();
    if run.connected < count {
        eprintln!(
            "idle: only {} of {count} connections came up",
            run.connected
        );
        return None;
    }
    Some(run.per_connection())
}

// ----- reporting -------------------------------------------------------------

/// The machine's state, for reading a run: nanoseconds per step of a
/// fixed single-threaded loop (a dependent chain of multiplies and table
/// reads in L1, about 50 ms). The same binary on the same machine gives
/// the same number when nothing else runs; a slow spell (another tenant
/// on the host) makes it larger.
fn machine_loop_ns() -> f64 {
    const STEPS: u64 = 20_000_000;
    let table: Vec<u64> = (0..1024u64)
        .map(|i| i.wrapping_mul(0x9E37_79B9_7F4A_7C15))
        .collect();
    let start = Instant::now();
    let mut x: u64 = 1;
    for i in 0..STEPS {
        x = x.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(i);
        x ^= table[(x >> 54) as usize];
    }
    std::hint::black_box(x);
    start.elapsed().as_nanos() as f64 / STEPS as f64
}

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// The median of the per-round ratios `a[i] / b[i]`: each pair was
/// measured in the same round, seconds apart, so a slow spell of the shared
/// machine moves both sides of a pair and cancels out.
fn paired(a: &[f64], b: &[f64]) -> f64 {
    let ratios: Vec<f64> = a.iter().zip(b).map(|(x, y)| x / y).collect();
    median(&ratios)
}

fn pct(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

/// One throughput run of `system`: `n` messages of `size` bytes.
fn throughput(system: System, size: usize, n: usize) -> f64 {
    match system {
        System::Raw => raw_throughput(size, n),
        System::Tokio => tokio_throughput(size, n),
        System::Ipcm(f) => ipcm_throughput(f, size, n),
        System::Iceoryx2 => iox::throughput(size, n),
    }
}

/// The table's ping-pong of `system` (blocking waits, ipcm's defaults):
/// `n` round trips of `size` bytes. iceoryx2 has no blocking wait to
/// measure (its ping-pong is in the busy section): one NaN.
fn table_ping_pong(system: System, size: usize, n: usize) -> Vec<f64> {
    match system {
        System::Raw => raw_ping_pong(size, n, false),
        System::Tokio => tokio_ping_pong(size, n),
        System::Ipcm(f) => ipcm_ping_pong(f, size, n, Wait::Default),
        System::Iceoryx2 => vec![f64::NAN],
    }
}

/// Round trips of the table's ping-pong at `size`: a quarter of `pings`
/// above 1 KiB.
fn pings_for(size: usize, pings: usize) -> usize {
    if size > 1024 { pings / 4 } else { pings }
}

/// A ping-pong's round trips, sorted, as one more p50 and p99.
fn push_p50_p99(p50: &mut Vec<f64>, p99: &mut Vec<f64>, mut lat: Vec<f64>) {
    lat.sort_by(f64::total_cmp);
    p50.push(pct(&lat, 0.5));
    p99.push(pct(&lat, 0.99));
}

/// Prints a ping-pong section's rows (the first is raw's) with their
/// CSV rows `<system>-<suffix>`; returns raw's p50s, which the ratios
/// are paired with.
fn pp_section(
    csv: &mut String,
    rows: &[(System, Vec<f64>, Vec<f64>)],
    suffix: &str,
    rounds: usize,
) -> Vec<f64> {
    let raw = rows[0].1.clone();
    for (system, p50, p99) in rows {
        let (a, b) = (median(p50), median(p99));
        let x_raw = paired(p50, &raw);
        println!(
            "{:<11} p50 {a:>7.2}us  p99 {b:>7.2}us  p50 x raw {x_raw:.2}",
            system.name()
        );
        writeln!(
            csv,
            "{}-{suffix},64,,,{a:.2},{b:.2},{x_raw:.4},,{rounds},",
            system.name()
        )
        .unwrap();
    }
    raw
}

/// `system`'s p50 in a ping-pong section, paired with raw's (NaN if the
/// section has no such row).
fn pp_x_raw(rows: &[(System, Vec<f64>, Vec<f64>)], system: System, raw: &[f64]) -> f64 {
    rows.iter()
        .find(|r| r.0 == system)
        .map_or(f64::NAN, |r| paired(&r.1, raw))
}

struct Row {
    system: System,
    size: usize,
    rates: Vec<f64>,
    p50: Vec<f64>,
    p99: Vec<f64>,
}

fn write_svg(path: &PathBuf, rows: &[Row]) -> Result<(), Box<dyn std::error::Error>> {
    use plotters::prelude::*;
    let root = SVGBackend::new(path, (900, 560)).into_drawing_area();
    root.fill(&WHITE)?;
    let max = rows
        .iter()
        .map(|r| median(&r.rates) * r.size as f64 / 1e6)
        .fold(1.0, f64::max);
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "ipcm compare: throughput by payload size",
            ("sans-serif", 22),
        )
        .margin(16)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d((32f64..32768f64).log_scale(), 0f64..max * 1.1)?;
    chart
        .configure_mesh()
        .x_desc("payload bytes")
        .y_desc("MB/s (payload)")
        .x_label_formatter(&|x| format!("{x:.0}"))
        .draw()?;
    let colors = [RED, BLUE, GREEN, MAGENTA, BLACK, CYAN];
    for (i, sys) in systems().iter().enumerate() {
        let pts: Vec<(f64, f64)> = rows
            .iter()
            .filter(|r| r.system == *sys)
            .map(|r| (r.size as f64, median(&r.rates) * r.size as f64 / 1e6))
            .collect();
        let c = colors[i % colors.len()];
        chart
            .draw_series(LineSeries::new(pts.clone(), c.stroke_width(2)))?
            .label(sys.name())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], c));
        chart.draw_series(pts.iter().map(|p| Circle::new(*p, 4, c.filled())))?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .border_style(BLACK)
        .background_style(WHITE.mix(0.8))
        .draw()?;
    root.present()?;
    Ok(())
}

fn main() {
    if std::env::var("IPCM_COMPARE_ROLE").as_deref() == Ok("idle-clients") {
        support::hold_idle_clients();
        return;
    }
    if std::env::var("IPCM_COMPARE_ROLE").as_deref() == Ok("echo") {
        echo_process();
        return;
    }
    let args: Vec<String> = std::env::args().collect();
    if let Some(at) = args.iter().position(|a| a == "--only-seq") {
        // `--only-seq SYSTEM:SIZE,... [ROUNDS]`: those throughput rows, each
        // followed by its ping-pong as in a full run, round after round in
        // one process: what a full run's rounds do to one another, without
        // the rest of the run.
        let rows: Vec<(System, usize)> = args
            .get(at + 1)
            .expect("--only-seq SYSTEM:SIZE,... [ROUNDS]")
            .split(',')
            .map(|item| {
                let (name, size) = item.split_once(':').expect("SYSTEM:SIZE");
                let system = *systems()
                    .iter()
                    .find(|s| s.name() == name)
                    .unwrap_or_else(|| panic!("no system {name}"));
                (system, size.parse().expect("a size in bytes"))
            })
            .collect();
        let rounds: usize = args.get(at + 2).and_then(|a| a.parse().ok()).unwrap_or(5);
        for round in 1..=rounds {
            let mut line = String::new();
            for &(system, size) in &rows {
                let rate = throughput(system, size, messages_for(size, false));
                table_ping_pong(system, size, pings_for(size, 20_000));
                line.push_str(&format!("  {} {size} B {:.0} k", system.name(), rate / 1e3));
            }
            println!("round {round}:{line}");
        }
        return;
    }
    if let Some(at) = args.iter().position(|a| a == "--only") {
        // `--only SYSTEM SIZE [MESSAGES]`: one throughput run, for profiling.
        let system = *systems()
            .iter()
            .find(|s| Some(s.name()) == args.get(at + 1).map(String::as_str))
            .expect("--only raw|tokio|ipcm-uring|ipcm-epoll|ipcm-json SIZE [MESSAGES]");
        let size: usize = args[at + 2].parse().unwrap();
        let n = args
            .get(at + 3)
            .and_then(|a| a.parse().ok())
            .unwrap_or(messages_for(size, false));
        let rate = throughput(system, size, n);
        println!("{} {size} B: {rate:.0} msgs/s", system.name());
        return;
    }
    if args.iter().any(|a| a == "--only-machine") {
        // `--only-machine`: the machine-state loop alone (see
        // `machine_loop_ns`), to read single runs beside it.
        println!("machine loop: {:.2} ns a step", machine_loop_ns());
        return;
    }
    if let Some(at) = args.iter().position(|a| a == "--only-pp-processes") {
        // `--only-pp-processes [ROUND_TRIPS]`: the lane's busy ping-pong
        // with its echo in another process.
        let n = args
            .get(at + 1)
            .and_then(|a| a.parse().ok())
            .unwrap_or(20_000);
        let mut lat = ipcm_ping_pong_processes(64, n);
        lat.sort_by(f64::total_cmp);
        println!(
            "ipcm-shm ping-pong, two processes: p50 {:.2}us p99 {:.2}us",
            pct(&lat, 0.5),
            pct(&lat, 0.99)
        );
        return;
    }
    if let Some(at) = args.iter().position(|a| a == "--only-pp") {
        // `--only-pp SYSTEM busy|blocking|sleep [ROUND_TRIPS]`: one 64 B
        // ping-pong run, for profiling (`sleep`: ipcm's waits sleep at
        // once).
        let system = *systems()
            .iter()
            .find(|s| Some(s.name()) == args.get(at + 1).map(String::as_str))
            .expect("--only-pp SYSTEM busy|blocking|sleep [ROUND_TRIPS]");
        let wait = match args.get(at + 2).map(String::as_str) {
            Some("busy") => Wait::Busy,
            Some("sleep") => Wait::Sleep,
            _ => Wait::Default,
        };
        let n = args
            .get(at + 3)
            .and_then(|a| a.parse().ok())
            .unwrap_or(20_000);
        let mut lat = match system {
            System::Raw => raw_ping_pong(64, n, wait == Wait::Busy),
            System::Tokio => tokio_ping_pong(64, n),
            System::Ipcm(f) => ipcm_ping_pong(f, 64, n, wait),
            System::Iceoryx2 => iox::ping_pong(64, n),
        };
        lat.sort_by(f64::total_cmp);
        println!(
            "{} ping-pong: p50 {:.2}us p99 {:.2}us",
            system.name(),
            pct(&lat, 0.5),
            pct(&lat, 0.99)
        );
        return;
    }
    if let Some(at) = args.iter().position(|a| a == "--only-fan-shm") {
        // `--only-fan-shm SENDERS [MESSAGES]`: one fan-in run over lanes.
        let senders: usize = args[at + 1].parse().unwrap();
        let n = args
            .get(at + 2)
            .and_then(|a| a.parse().ok())
            .unwrap_or(4_096_000);
        let rate = fan_in_lane(senders, n);
        println!("fan-in {senders} -> 1 over lanes: {rate:.0} msgs/s");
        return;
    }
    if let Some(at) = args.iter().position(|a| a == "--only-fan") {
        // `--only-fan SENDERS [epoll]`: one fan-in run, for profiling.
        support::raise_fd_limit();
        let senders: usize = args[at + 1].parse().unwrap();
        let flavor = if args.get(at + 2).map(String::as_str) == Some("epoll") {
            Flavor::Epoll
        } else {
            Flavor::Uring
        };
        let n = args
            .get(at + 3)
            .and_then(|a| a.parse().ok())
            .unwrap_or(1_024_000);
        let rate = fan_in_on(flavor, senders, n);
        println!("fan-in {senders} -> 1 ({flavor:?} listener): {rate:.0} msgs/s");
        return;
    }
    let quick = args.iter().any(|a| a == "--quick");
    let rounds = if quick { 3 } else { 5 };
    let pings = if quick { 3_000 } else { 20_000 };
    let fan_msgs = if quick { 256_000 } else { 1_024_000 };
    let started = Instant::now();
    if uring_or_epoll() != BackendChoice::IoUring {
        eprintln!("note: io_uring unavailable; ipcm-uring and ipcm-json rows ran on epoll");
    }
    println!(
        "ipcm compare ({}): {rounds} rounds, sender and receiver on separate threads",
        if quick { "quick" } else { "full" }
    );

    // Idle connections first, while this process's heap is still small:
    // listener memory per connection (RSS delta).
    let idle = 10_000;
    let mut idle_costs = Vec::new();
    for (name, b) in [
        ("io_uring", uring_or_epoll()),
        ("epoll", BackendChoice::Epoll),
    ] {
        match idle_cost(b, idle) {
            Some(c) => {
                println!("idle connections ({name}): {idle} cost {c:.0} bytes of RSS each");
                idle_costs.push((name, c));
            }
            None => println!("idle connections ({name}): not measured (see above)"),
        }
    }

    // Throughput and round trips, every system side by side per round.
    let mut rows: Vec<Row> = Vec::new();
    for &size in &SIZES {
        for &system in &systems() {
            rows.push(Row {
                system,
                size,
                rates: Vec::new(),
                p50: Vec::new(),
                p99: Vec::new(),
            });
        }
    }
    // Busy polling is an inline-mode option.
    let mut busy: Vec<(System, Vec<f64>, Vec<f64>)> = systems()
        .iter()
        .filter(|s| {
            !matches!(
                s,
                System::Tokio | System::Ipcm(Flavor::Threaded | Flavor::Async)
            )
        })
        .map(|s| (*s, Vec::new(), Vec::new()))
        .collect();
    // Blocking ping-pongs whose ipcm waits sleep at once: the table's
    // round trips are ipcm's defaults, which look for the reply for 20 µs
    // before sleeping; these compare like with like against raw's.
    let mut asleep: Vec<(System, Vec<f64>, Vec<f64>)> = [
        System::Raw,
        System::Ipcm(Flavor::Uring),
        System::Ipcm(Flavor::Epoll),
        System::Ipcm(Flavor::Shm),
    ]
    .iter()
    .map(|s| (*s, Vec::new(), Vec::new()))
    .collect();
    // The lane's busy ping-pong with its echo in another process.
    let (mut procs_p50, mut procs_p99) = (Vec::new(), Vec::new());
    let mut machine = Vec::with_capacity(rounds);
    for round in 0..rounds {
        machine.push(machine_loop_ns());
        for row in &mut rows {
            let n = messages_for(row.size, quick);
            row.rates.push(throughput(row.system, row.size, n));
            let lat = table_ping_pong(row.system, row.size, pings_for(row.size, pings));
            push_p50_p99(&mut row.p50, &mut row.p99, lat);
        }
        for (system, p50, p99) in &mut busy {
            let lat = match system {
                System::Raw => raw_ping_pong(64, pings, true),
                System::Ipcm(f) => ipcm_ping_pong(*f, 64, pings, Wait::Busy),
                System::Iceoryx2 => iox::ping_pong(64, pings),
                System::Tokio => unreachable!(),
            };
            push_p50_p99(p50, p99, lat);
        }
        push_p50_p99(
            &mut procs_p50,
            &mut procs_p99,
            ipcm_ping_pong_processes(64, pings),
        );
        for (system, p50, p99) in &mut asleep {
            let lat = match system {
                System::Raw => raw_ping_pong(64, pings, false),
                System::Ipcm(f) => ipcm_ping_pong(*f, 64, pings, Wait::Sleep),
                _ => unreachable!(),
            };
            push_p50_p99(p50, p99, lat);
        }
        eprintln!(
            "round {}/{rounds} done at {:.0}s (machine loop {:.2} ns a step)",
            round + 1,
            started.elapsed().as_secs_f64(),
            machine[round]
        );
    }

    let get = |sys: System, size: usize| {
        rows.iter()
            .find(|r| r.system == sys && r.size == size)
            .unwrap()
    };
    let mut table = String::new();
    writeln!(
        table,
        "\n{:<11} {:>7} {:>12} {:>9} {:>9} {:>9} {:>8} {:>9}",
        "system", "payload", "msgs/s", "MB/s", "rtt p50", "rtt p99", "x raw", "x tokio"
    )
    .unwrap();
    let mut csv = String::from(
        "system,payload_bytes,msgs_per_s,mb_per_s,rtt_p50_us,rtt_p99_us,ratio_raw,ratio_tokio,rounds,bytes_per_conn\n",
    );
    for row in &rows {
        let rate = median(&row.rates);
        let mbs = rate * row.size as f64 / 1e6;
        let raw = paired(&row.rates, &get(System::Raw, row.size).rates);
        let tok = paired(&row.rates, &get(System::Tokio, row.size).rates);
        let (p50, p99) = (median(&row.p50), median(&row.p99));
        writeln!(
            table,
            "{:<11} {:>7} {:>12.0} {:>9.1} {:>7.1}us {:>7.1}us {:>8.2} {:>9.2}",
            row.system.name(),
            row.size,
            rate,
            mbs,
            p50,
            p99,
            raw,
            tok
        )
        .unwrap();
        writeln!(
            csv,
            "{},{},{rate:.0},{mbs:.1},{p50:.2},{p99:.2},{raw:.4},{tok:.4},{rounds},",
            row.system.name(),
            row.size,
        )
        .unwrap();
    }
    // Each round's rate, in the order run: a row whose rounds split into
    // two clusters (a scheduling placement, a slow spell) shows it here,
    // where its median alone would not.
    writeln!(
        table,
        "\nmsgs/s in each round (the medians above are of these)"
    )
    .unwrap();
    for row in &rows {
        let each: Vec<String> = row
            .rates
            .iter()
            .map(|&r| {
                if r >= 1e6 {
                    format!("{:.2}M", r / 1e6)
                } else {
                    format!("{:.0}k", r / 1e3)
                }
            })
            .collect();
        writeln!(
            table,
            "{:<11} {:>7}  {}",
            row.system.name(),
            row.size,
            each.join(" ")
        )
        .unwrap();
    }
    print!("{table}");

    println!("\nping-pong, 64 B, busy polling (raw: spinning non-blocking sockets)");
    let raw_busy = pp_section(&mut csv, &busy, "busy", rounds);

    let (a, b) = (median(&procs_p50), median(&procs_p99));
    let procs_x_raw = paired(&procs_p50, &raw_busy);
    println!(
        "ipcm-shm, echo in another process: p50 {a:.2}us  p99 {b:.2}us  p50 x raw {procs_x_raw:.2} (the rows above run both ends in one process)"
    );
    writeln!(
        csv,
        "ipcm-shm-busy-processes,64,,,{a:.2},{b:.2},{procs_x_raw:.4},,{rounds},"
    )
    .unwrap();

    println!(
        "\nping-pong, 64 B, blocking waits that sleep at once (ipcm: spin_before_sleep 0; the table's rtt columns are ipcm's defaults, which look for the reply for 20 us first)"
    );
    let raw_asleep = pp_section(&mut csv, &asleep, "sleep", rounds);

    println!();
    // Fan-in: the same sender loop with 1 and with 1,000 clients, for a
    // listener on each backend.
    support::raise_fd_limit();
    let mut fan: Vec<(&str, f64)> = Vec::new();
    for (name, flavor) in [("io_uring", Flavor::Uring), ("epoll", Flavor::Epoll)] {
        let (mut one, mut many) = (Vec::new(), Vec::new());
        for _ in 0..rounds {
            one.push(fan_in_on(flavor, 1, fan_msgs));
            many.push(fan_in_on(flavor, 1000, fan_msgs));
        }
        let ratio = paired(&many, &one);
        let (one, many) = (median(&one), median(&many));
        println!(
            "fan-in, 64 B Binary, {name} listener: 1 -> 1 {one:.0} msgs/s, 1000 -> 1 {many:.0} msgs/s, ratio {ratio:.2}"
        );
        writeln!(csv, "fan-in-1-{name},64,{one:.0},,,,,,{rounds},").unwrap();
        writeln!(
            csv,
            "fan-in-1000-{name},64,{many:.0},,,,{ratio:.4},,{rounds},"
        )
        .unwrap();
        fan.push((name, ratio));
    }

    // Fan-in over lanes: 1 and 100 ipcm senders, each on its own lane.
    let (mut one, mut many) = (Vec::new(), Vec::new());
    let lane_msgs = 4 * fan_msgs;
    for _ in 0..rounds {
        one.push(fan_in_lane(1, lane_msgs));
        many.push(fan_in_lane(100, lane_msgs));
    }
    let lane_fan = paired(&many, &one);
    let (one, many) = (median(&one), median(&many));
    println!(
        "fan-in, 64 B Binary, over lanes: 1 -> 1 {one:.0} msgs/s, 100 -> 1 {many:.0} msgs/s, ratio {lane_fan:.2}"
    );
    writeln!(csv, "fan-in-1-shm,64,{one:.0},,,,,,{rounds},").unwrap();
    writeln!(
        csv,
        "fan-in-100-shm,64,{many:.0},,,,{lane_fan:.4},,{rounds},"
    )
    .unwrap();

    for (name, c) in &idle_costs {
        writeln!(csv, "idle-{name},,,,,,,,1,{c:.0}").unwrap();
    }
    let dir = PathBuf::from(
        std::env::var("CARGO_TARGET_DIR")
            .unwrap_or_else(|_| concat!(env!("CARGO_MANIFEST_DIR"), "/target").to_string()),
    )
    .join("ipcm-compare");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("results.csv"), &csv).unwrap();
    let svg = dir.join("results.svg");
    if let Err(e) = write_svg(&svg, &rows) {
        eprintln!("plot not written: {e}");
    }
    println!(
        "\nwrote {} and {} in {:.0}s",
        dir.join("results.csv").display(),
        svg.display(),
        started.elapsed().as_secs_f64()
    );

    let r = |sys, size| median(&get(sys, size).rates);
    let vs = |sys, other, size| paired(&get(sys, size).rates, &get(other, size).rates);
    let (u, e) = (System::Ipcm(Flavor::Uring), System::Ipcm(Flavor::Epoll));
    let ratio = |size| (vs(u, System::Raw, size), vs(e, System::Raw, size));
    let (u64r, e64r) = ratio(64);
    let (u1kr, e1kr) = ratio(1024);
    let (u16r, e16r) = ratio(16384);
    let threaded = vs(System::Ipcm(Flavor::Threaded), u, 64);
    let a = System::Ipcm(Flavor::Async);
    let async_tput = vs(a, System::Tokio, 64);
    let async_rtt = paired(&get(a, 64).p50, &get(System::Tokio, 64).p50);
    let rtt = |sys| paired(&get(sys, 64).p50, &get(System::Raw, 64).p50);
    let busy_of = |sys| pp_x_raw(&busy, sys, &raw_busy);
    let asleep_of = |sys| pp_x_raw(&asleep, sys, &raw_asleep);
    let fan_txt = fan
        .iter()
        .map(|(n, ratio)| format!("{n} {ratio:.2}"))
        .collect::<Vec<_>>()
        .join(" ");
    let idle_txt = idle_costs
        .iter()
        .map(|(n, c)| format!("{n} {c:.0}B"))
        .collect::<Vec<_>>()
        .join(" ");
    println!(
        "summary (io_uring/epoll): 64B x raw {u64r:.2}/{e64r:.2} (target >=0.5), x tokio {:.2}/{:.2} (>=2); 1KiB x raw {u1kr:.2}/{e1kr:.2} (>=0.9); 16KiB x raw {u16r:.2}/{e16r:.2} (>=1.0); json 64B {:.2}M msgs/s (>=4M); threaded 64B x inline io_uring {threaded:.2} (>=0.8); async 64B x tokio {async_tput:.2} (>=1), ping-pong p50 x tokio {async_rtt:.2} (<=1.2); ping-pong p50 x raw blocking {:.2}/{:.2} (<=1.1; sleeping at once {:.2}/{:.2}), busy {:.2}/{:.2} (<=1.2); fan-in 1000/1 {fan_txt} (>=0.7); idle conn {idle_txt} (<4096B)",
        vs(u, System::Tokio, 64),
        vs(e, System::Tokio, 64),
        r(System::Ipcm(Flavor::Json), 64) / 1e6,
        rtt(u),
        rtt(e),
        asleep_of(u),
        asleep_of(e),
        busy_of(u),
        busy_of(e),
    );
    let shm = System::Ipcm(Flavor::Shm);
    let shm_busy = busy
        .iter()
        .find(|b| b.0 == shm)
        .map_or(f64::NAN, |b| median(&b.1));
    let iox = busy
        .iter()
        .find(|b| b.0 == System::Iceoryx2)
        .map_or(String::new(), |b| {
            format!(
                ", x iceoryx2 {:.2} (<=1.0)",
                paired(&busy.iter().find(|b| b.0 == shm).unwrap().1, &b.1)
            )
        });
    let mut sorted = machine.clone();
    sorted.sort_by(f64::total_cmp);
    println!(
        "machine: a fixed user-space loop took {:.2}-{:.2} ns a step over the rounds (median {:.2}); \
         a slow spell of the shared machine shows as a larger number, and hits \
         user-space work (the lane, iceoryx2, ipcm's own code) more than the kernel's copies",
        sorted[0],
        sorted[sorted.len() - 1],
        median(&machine)
    );
    println!(
        "summary (lane): busy ping-pong p50 {shm_busy:.2}us (<=1.0; echo in another process {:.2}us), x raw spinning {:.2} (<=0.3){iox}; blocking ping-pong p50 x raw {:.2} (<=1.0; sleeping at once {:.2}); 64B x raw {:.2} (>=1.0); 16KiB x raw {:.2} (>=2); fan-in 100/1 {lane_fan:.2} (>=0.7)",
        median(&procs_p50),
        busy_of(shm),
        rtt(shm),
        asleep_of(shm),
        vs(shm, System::Raw, 64),
        vs(shm, System::Raw, 16384),
    );
}
