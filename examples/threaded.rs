//! A minimal service: the reactor runs on its own thread, a worker thread
//! answers requests from the receive ring, and a client talks to it.
//!
//! `cargo run --example threaded [REQUESTS]`

use std::time::Duration;

use ipcm::{Client, Options, Spawn};

/// Runs the service for `requests` round trips; returns the answers.
pub fn run(requests: u64) -> ipcm::Result<u64> {
    let spawn = Spawn::new()?;
    let info = spawn.info_string();

    // The service: reactor thread + one worker thread.
    let service = Client::connect_info(&info, "doubler", Options::new())?;
    let (mut tx, rx, reactor) = service.into_threaded()?;
    let worker = std::thread::spawn(move || -> ipcm::Result<()> {
        for msg in rx {
            if msg.is_terminate() {
                break;
            }
            let n: u64 = msg.content()?;
            tx.send(msg.from(), &(n * 2))?;
        }
        Ok(())
    });

    // A plain (inline) client using it.
    let mut client = Client::connect_info(&info, "caller", Options::new().listen(false))?;
    let mut answers = 0;
    for n in 0..requests {
        client.send_message("doubler", &n)?;
        let reply = client.get_messages_timeout(Duration::from_secs(5))?;
        assert_eq!(reply[0].content::<u64>()?, n * 2);
        answers += 1;
    }
    client.send_message("doubler", &serde_json::json!({"terminate": 1}))?;
    worker.join().expect("worker panicked")?;
    reactor.shutdown()?;
    client.disconnect(None)?;
    Ok(answers)
}

#[allow(dead_code)]
fn main() -> ipcm::Result<()> {
    let n = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(1000);
    let answers = run(n)?;
    println!("{answers} requests answered by the threaded service");
    Ok(())
}
