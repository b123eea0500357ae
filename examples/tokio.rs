//! A tokio program on ipcm's async face (feature `tokio`): a service task
//! awaiting messages as a `Stream`, producer tasks awaiting their sends,
//! and a `select!` over ipcm and a timer.
//!
//! `cargo run --example tokio --features tokio [MESSAGES]`

use std::time::Duration;

use futures_util::StreamExt;
use ipcm::{Client, Options, Spawn};

/// Receives `count` messages from four producer tasks; returns how many
/// arrived.
pub async fn run(count: u64) -> ipcm::Result<u64> {
    let spawn = Spawn::new()?;
    let info = spawn.info_string();
    let service = Client::connect_info(&info, "async-sink", Options::new())?;
    let (_service_tx, mut inbox, service_handle) = service.into_async()?;

    let producer = Client::connect_info(&info, "producer", Options::new().listen(false))?;
    let (tx, _producer_rx, producer_handle) = producer.into_async()?;
    let producers: Vec<tokio::task::JoinHandle<ipcm::Result<()>>> = (0..4u64)
        .map(|p| {
            // One clone per task, as with tokio's channels.
            let mut tx = tx.clone();
            tokio::spawn(async move {
                for i in (p..count).step_by(4) {
                    // Waits for room in the send queue, never blocking the runtime.
                    tx.send("async-sink", &i).await?;
                }
                Ok(())
            })
        })
        .collect();

    let mut got = 0;
    let mut tick = tokio::time::interval(Duration::from_millis(10));
    while got < count {
        tokio::select! {
            m = inbox.next() => {
                let m = m.expect("the service's reactor ended early");
                let _: u64 = m.content()?;
                got += 1;
            }
            // Other work of the service, interleaved with its messages.
            _ = tick.tick() => {}
        }
    }
    for p in producers {
        p.await.expect("producer task panicked")?;
    }
    let stats = producer_handle.stats().await?;
    assert_eq!(
        stats.sent["async-sink"], count,
        "every message counted as sent"
    );
    producer_handle.shutdown().await?;
    service_handle.shutdown().await?;
    Ok(got)
}

#[allow(dead_code)]
fn main() -> ipcm::Result<()> {
    let n = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(10_000);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| ipcm::Error::io("tokio runtime", e))?;
    let got = rt.block_on(run(n))?;
    println!("{got} messages awaited on ipcm's async face");
    Ok(())
}
