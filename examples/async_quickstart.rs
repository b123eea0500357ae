//! The README's async quickstart, kept compiling and running (tests/examples.rs).
//!
//! `cargo run --example async_quickstart`

use futures_util::{SinkExt, StreamExt};
use ipcm::{Client, Options, Spawn};

#[tokio::main(flavor = "current_thread")]
pub async fn main() -> ipcm::Result<()> {
    let spawn = Spawn::new()?;
    let info = spawn.info_string();
    let (_tx, mut inbox, service) =
        Client::connect_info(&info, "service", Options::new())?.into_async()?;
    let (mut tx, _rx, client) =
        Client::connect_info(&info, "client", Options::new().listen(false))?.into_async()?;

    tx.send("service", &"hello").await?; // waits for queue room, never blocks the runtime
    tx.send_all(&mut futures_util::stream::iter([
        Ok(("service", 1)),
        Ok(("service", 2)),
    ]))
    .await?; // the Sink: Binary routes batch here
    tokio::select! {
        m = inbox.next() => println!("{}", m.expect("open").content_json()),
        _ = tokio::time::sleep(std::time::Duration::from_secs(1)) => println!("timeout"),
    }
    client.shutdown().await?; // writes out what was handed over, then disconnects
    service.shutdown().await
}
