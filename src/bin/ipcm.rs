//! The `ipcm` command. For now one job: `ipcm demo`, which creates a route,
//! feeds a listener from one or more senders and reports the rate, per
//! backend. (The full command set arrives with its own issue.)

use std::time::{Duration, Instant};

use ipcm::{BackendChoice, Client, Options, Spawn};

const USAGE: &str = "usage: ipcm demo [--messages N] [--size BYTES] [--senders K] \
[--backend auto|epoll|io_uring|both] [--sender-backend auto|epoll|io_uring] \
[--blocking | --batch N] [--rounds R]";

fn usage() -> ! {
    eprintln!("{USAGE}");
    std::process::exit(2);
}

struct Demo {
    messages: u64,
    size: usize,
    senders: usize,
    blocking: bool,
    /// Queue this many messages between flushes (0: send each at once).
    batch: u64,
    /// Backend of the senders (`None`: the listener's).
    sender_backend: Option<BackendChoice>,
}

fn main() {
    let mut args = std::env::args().skip(1);
    if args.next().as_deref() != Some("demo") {
        usage();
    }
    let mut demo = Demo {
        messages: 200_000,
        size: 64,
        senders: 1,
        blocking: false,
        batch: 0,
        sender_backend: None,
    };
    let mut backends = vec![BackendChoice::Auto];
    let mut rounds = 1usize;
    while let Some(a) = args.next() {
        if a == "--blocking" {
            demo.blocking = true;
            continue;
        }
        let v = args.next().unwrap_or_else(|| usage());
        match a.as_str() {
            "--messages" => demo.messages = v.parse().unwrap_or_else(|_| usage()),
            "--size" => demo.size = v.parse().unwrap_or_else(|_| usage()),
            "--senders" => demo.senders = v.parse().unwrap_or_else(|_| usage()),
            "--batch" => demo.batch = v.parse().unwrap_or_else(|_| usage()),
            "--rounds" => rounds = v.parse().unwrap_or_else(|_| usage()),
            "--sender-backend" => {
                demo.sender_backend = Some(BackendChoice::parse(&v).unwrap_or_else(|| usage()))
            }
            "--backend" if v == "both" => {
                backends = vec![BackendChoice::Epoll, BackendChoice::IoUring];
            }
            "--backend" => backends = vec![BackendChoice::parse(&v).unwrap_or_else(|| usage())],
            _ => usage(),
        }
    }
    if demo.senders == 0 {
        usage();
    }
    // Backends alternate round by round, so that machine noise hits both.
    let mut rates: Vec<(String, Vec<f64>)> = Vec::new();
    let mut ratios = Vec::new();
    for _ in 0..rounds.max(1) {
        let mut round = Vec::new();
        for (i, b) in backends.iter().enumerate() {
            match run(&demo, *b) {
                Ok((kind, rate)) => {
                    if rates.len() <= i {
                        rates.push((kind, Vec::new()));
                    }
                    rates[i].1.push(rate);
                    round.push(rate);
                }
                Err(e) => {
                    eprintln!("ipcm: {e}");
                    std::process::exit(1);
                }
            }
        }
        if let [a, b] = round.as_slice() {
            ratios.push(b / a);
        }
    }
    if rounds > 1 {
        for (kind, r) in &mut rates {
            println!(
                "{kind:>8}: median {:.0} msgs/s over {} rounds",
                median(r),
                r.len()
            );
        }
    }
    if !ratios.is_empty() {
        let (a, b) = (&rates[0].0, &rates[1].0);
        println!(
            "ratio {b}/{a}: median {:.2} over {} rounds",
            median(&mut ratios),
            ratios.len()
        );
    }
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn run(demo: &Demo, backend: BackendChoice) -> ipcm::Result<(String, f64)> {
    let spawn = Spawn::new()?;
    let info = spawn.info_string();
    let mut rx = Client::connect_info(&info, "sink", Options::new().backend(backend))?;
    let kind = rx.backend().to_string();
    let per_sender = demo.messages / demo.senders as u64;
    let total = per_sender * demo.senders as u64;
    let payload = "x".repeat(demo.size);
    let start = Instant::now();
    let mut threads = Vec::new();
    for s in 0..demo.senders {
        let info = info.clone();
        let payload = payload.clone();
        let blocking = demo.blocking;
        let batch = demo.batch;
        let sender_backend = demo.sender_backend.unwrap_or(backend);
        threads.push(std::thread::spawn(move || -> ipcm::Result<()> {
            let opts = Options::new().listen(false).backend(sender_backend);
            let mut tx = Client::connect_info(&info, &format!("source-{s}"), opts)?;
            tx.set_send_blocking(blocking);
            for n in 0..per_sender {
                if batch > 0 && n % batch == 0 {
                    tx.drain_pending();
                }
                loop {
                    let sent = if batch > 0 {
                        tx.queue_message("sink", &payload)
                    } else {
                        tx.send_message("sink", &payload)
                    };
                    match sent {
                        Ok(()) => break,
                        Err(ipcm::Error::WouldBlock { .. }) => {
                            tx.drain_pending();
                            std::thread::sleep(Duration::from_micros(20));
                        }
                        Err(e) => return Err(e),
                    }
                }
            }
            tx.disconnect(None)
        }));
    }
    let mut got = 0u64;
    while got < total {
        let batch = rx.get_messages_timeout(Duration::from_secs(10))?;
        if batch.is_empty() {
            break;
        }
        got += batch.len() as u64;
    }
    let secs = start.elapsed().as_secs_f64();
    for t in threads {
        t.join().expect("sender thread panicked")?;
    }
    rx.disconnect(None)?;
    let rate = got as f64 / secs;
    println!(
        "{kind:>8}: {got} messages of {} bytes from {} sender(s) in {secs:.3}s: {rate:.0} msgs/s, {:.1} MB/s",
        demo.size,
        demo.senders,
        got as f64 * demo.size as f64 / secs / 1e6
    );
    if got != total {
        return Err(ipcm::Error::Timeout {
            what: "all demo messages",
            secs: 10.0,
        });
    }
    drop(spawn);
    Ok((kind, rate))
}
