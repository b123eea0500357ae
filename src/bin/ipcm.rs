//! The `ipcm` command. For now one job: `ipcm demo`, which creates a route,
//! moves messages from a sender process-thread to a listener and reports
//! the rate. (The full command set arrives with its own issue.)

use std::time::{Duration, Instant};

use ipcm::{Client, Options, Spawn};

fn usage() -> ! {
    eprintln!("usage: ipcm demo [--messages N] [--size BYTES]");
    std::process::exit(2);
}

fn main() {
    let mut args = std::env::args().skip(1);
    let Some(cmd) = args.next() else { usage() };
    if cmd != "demo" {
        usage();
    }
    let mut messages: u64 = 200_000;
    let mut size: usize = 64;
    while let Some(a) = args.next() {
        let v = args.next().unwrap_or_else(|| usage());
        match a.as_str() {
            "--messages" => messages = v.parse().unwrap_or_else(|_| usage()),
            "--size" => size = v.parse().unwrap_or_else(|_| usage()),
            _ => usage(),
        }
    }
    if let Err(e) = demo(messages, size) {
        eprintln!("ipcm: {e}");
        std::process::exit(1);
    }
}

fn demo(messages: u64, size: usize) -> ipcm::Result<()> {
    let spawn = Spawn::new()?;
    let info = spawn.info_string();
    println!("route: {info}");
    let mut rx = Client::connect_info(&info, "sink", Options::new())?;
    println!("backend: {}", rx.backend());
    let payload = "x".repeat(size);
    let sender_info = info.clone();
    let start = Instant::now();
    let sender = std::thread::spawn(move || -> ipcm::Result<()> {
        let mut tx = Client::connect_info(&sender_info, "source", Options::new().listen(false))?;
        tx.set_send_blocking(false);
        for _ in 0..messages {
            loop {
                match tx.try_send_message("sink", &payload) {
                    Ok(()) => break,
                    Err(ipcm::Error::WouldBlock { .. }) => {
                        tx.drain_pending();
                        std::thread::sleep(Duration::from_micros(50));
                    }
                    Err(e) => return Err(e),
                }
            }
        }
        tx.disconnect(None)
    });
    let mut got = 0u64;
    while got < messages {
        let batch = rx.get_messages_timeout(Duration::from_secs(10))?;
        if batch.is_empty() {
            break;
        }
        got += batch.len() as u64;
    }
    let secs = start.elapsed().as_secs_f64();
    sender.join().expect("sender thread panicked")?;
    rx.disconnect(None)?;
    println!(
        "{got} messages of {size} bytes in {secs:.3}s: {:.0} msgs/s, {:.1} MB/s",
        got as f64 / secs,
        got as f64 * size as f64 / secs / 1e6
    );
    if got != messages {
        return Err(ipcm::Error::Timeout {
            what: "all demo messages",
            secs: 10.0,
        });
    }
    drop(spawn);
    Ok(())
}
