//! A tokio program awaiting ipcm messages: the receive ring's descriptor is
//! registered with tokio through `AsyncFd`, so the task sleeps until
//! messages wait.
//!
//! `cargo run --example tokio [MESSAGES]`

use std::os::fd::{AsFd, AsRawFd, RawFd};

use ipcm::{Client, Options, Receiver, Spawn};
use tokio::io::unix::AsyncFd;

/// `AsyncFd` wants `AsRawFd`; the receiver's descriptor lives as long as it.
struct Ring(Receiver);

impl AsRawFd for Ring {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_fd().as_raw_fd()
    }
}

/// Receives `count` messages in a tokio task; returns how many arrived.
pub async fn run(count: u64) -> ipcm::Result<u64> {
    let spawn = Spawn::new()?;
    let info = spawn.info_string();
    let service = Client::connect_info(&info, "async-sink", Options::new())?;
    let (_tx, rx, reactor) = service.into_threaded()?;
    // SAFETY: the descriptor belongs to the receiver inside `Ring`, which the
    // `AsyncFd` owns; it stays open and the same for the `AsyncFd`'s life.
    let mut ring =
        unsafe { AsyncFd::register_with_interest(Ring(rx), tokio::io::Interest::READABLE) }
            .map_err(|e| ipcm::Error::io("AsyncFd", std::io::Error::from(e)))?;

    // A producer on a plain thread.
    let producer_info = info.clone();
    let producer = std::thread::spawn(move || -> ipcm::Result<()> {
        let mut c = Client::connect_info(&producer_info, "producer", Options::new().listen(false))?;
        for i in 0..count {
            c.send_message("async-sink", &i)?;
        }
        c.disconnect(None)
    });

    let mut got = 0;
    while got < count {
        let mut guard = ring
            .readable_mut()
            .await
            .map_err(|e| ipcm::Error::io("readable", e))?;
        while let Some(m) = guard.get_inner_mut().0.try_recv() {
            assert_eq!(m.content::<u64>()?, got, "in order");
            got += 1;
        }
        guard.clear_ready();
    }
    producer.join().expect("producer panicked")?;
    reactor.shutdown()?;
    Ok(got)
}

#[allow(dead_code)]
fn main() -> ipcm::Result<()> {
    let n = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(10_000);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()
        .map_err(|e| ipcm::Error::io("tokio runtime", e))?;
    let got = rt.block_on(run(n))?;
    println!("{got} messages awaited through AsyncFd");
    Ok(())
}
