//! A single-threaded, deterministic run of the hot paths for instruction
//! counting: `scripts/callgrind.sh` runs it under
//! `valgrind --tool=callgrind` at two message counts and divides the
//! difference, which cancels setup and teardown.
//!
//! Arguments: `[binary|binary-owned|binary16k|json|json-owned|pingpong|pingpong-shm] [MESSAGES]`
//! (defaults: binary, 10000; `pingpong` moves one Binary message each way
//! at a time). The receiver reads with the borrowed view
//! (`Client::receive`); the `-owned` variants take owned messages
//! (`get_messages_timeout_into`, sorted by stamp) instead.
//! Both clients live on this thread (epoll backend: valgrind does not model
//! io_uring's shared rings); each round queues 64 messages of 64 B content
//! (`binary16k`: 4 of 16 KiB), flushes them and receives them. Every mode
//! but `pingpong-shm` measures the socket path (the lane off); callgrind
//! counts each iteration of a string copy as an instruction, so the
//! lane's copies would weigh by their bytes.

use std::time::Duration;

use ipcm::{BackendChoice, Client, Info, Options, Route, Serializer};

fn main() {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a != "--bench")
        .collect();
    let mode = args.first().map(String::as_str).unwrap_or("binary");
    let ser = if mode.starts_with("json") {
        Serializer::Json
    } else {
        Serializer::Binary
    };
    let owned = mode.ends_with("-owned");
    // `pingpong`: one message at a time, blocking send, busy-polling
    // receive (what one hop of a ping-pong costs in user space).
    // `pingpong-shm`: the same over a shared-memory lane (both clients
    // in this process, so it is theirs once the first message is sent),
    // received with the borrowed view as `compare`'s ping-pong does.
    let ping_pong = mode == "pingpong" || mode == "pingpong-shm";
    let shm = mode == "pingpong-shm";
    let n: usize = args.get(1).and_then(|a| a.parse().ok()).unwrap_or(10_000);
    let route = Route::spawn(None).unwrap();
    let info = Info::new(ser, route.path());
    // The socket path: a lane would take these connections after their
    // first 64 KiB (`pingpong-shm` measures the lane).
    let opts = Options::new().backend(BackendChoice::Epoll).lane(false);
    let mut rx = Client::connect(&info, "sink", opts.clone()).unwrap();
    let mut tx = Client::connect(&info, "src", opts.listen(false)).unwrap();
    let large = mode == "binary16k";
    let content = if large {
        format!("\"{}\"", "0123456789abcdef".repeat(1024).split_at(16382).0)
    } else {
        "\"0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcd\"".to_string()
    };
    let content = content.as_str();
    let per_round = if large { 4 } else { 64 };
    let mut inbox = Vec::with_capacity(4096);
    let mut sent = 0;
    let mut bytes = 0;
    if ping_pong {
        drop((tx, rx));
        let opts = Options::new()
            .backend(BackendChoice::Epoll)
            .busy_poll(true)
            .lane(shm)
            .lane_after_bytes(0);
        let mut a = Client::connect(&info, "a", opts.clone()).unwrap();
        let mut b = Client::connect(&info, "b", opts).unwrap();
        if shm {
            a.send_json("b", content).unwrap();
            let mut warm = 0;
            while a.lane("b") != Some(ipcm::LaneKind::SharedMemory)
                || b.lane("a") != Some(ipcm::LaneKind::SharedMemory)
            {
                warm += b.receive(Duration::from_millis(1)).unwrap().len();
                a.receive(Duration::from_millis(1)).unwrap();
            }
            while warm == 0 {
                warm += b.receive(Duration::from_millis(1)).unwrap().len();
            }
        }
        let mut reply = (String::new(), String::new());
        for _ in 0..n {
            a.send_json("b", content).unwrap();
            if shm {
                // As `compare`'s busy ping-pong: both sides read in place;
                // the echo side copies the sender and content out, then
                // answers.
                loop {
                    let got = b.receive(Duration::from_secs(30)).unwrap();
                    if let Some(m) = got.iter().next() {
                        reply.0.clear();
                        reply.0.push_str(m.from());
                        reply.1.clear();
                        reply.1.push_str(m.content_json());
                        break;
                    }
                }
                b.send_json(&reply.0, &reply.1).unwrap();
                loop {
                    let got = a.receive(Duration::from_secs(30)).unwrap();
                    if !got.is_empty() {
                        bytes += got.iter().map(|m| m.content_json().len()).sum::<usize>();
                        break;
                    }
                }
                continue;
            }
            inbox.clear();
            while b
                .get_messages_timeout_into(&mut inbox, Duration::from_secs(30))
                .unwrap()
                == 0
            {}
            b.send_json("a", inbox[0].content_json()).unwrap();
            inbox.clear();
            while a
                .get_messages_timeout_into(&mut inbox, Duration::from_secs(30))
                .unwrap()
                == 0
            {}
            bytes += inbox[0].content_json().len();
        }
        assert_eq!(bytes, n * content.len());
        a.disconnect(None).unwrap();
        b.disconnect(None).unwrap();
        route.unspawn().unwrap();
        let over = if shm { " over a lane" } else { "" };
        println!("{n} round trips{over}");
        return;
    }
    while sent < n {
        let k = (n - sent).min(per_round);
        for _ in 0..k {
            tx.queue_json("sink", content).unwrap();
        }
        tx.flush_pending(Some(Duration::from_secs(30))).unwrap();
        let mut got = 0;
        while got < k {
            if owned {
                inbox.clear();
                got += rx
                    .get_messages_timeout_into(&mut inbox, Duration::from_secs(30))
                    .unwrap();
                bytes += inbox.iter().map(|m| m.content_json().len()).sum::<usize>();
            } else {
                let batch = rx.receive(Duration::from_secs(30)).unwrap();
                for m in &batch {
                    bytes += m.content_json().len();
                    got += 1;
                }
            }
        }
        sent += k;
    }
    assert_eq!(bytes, n * content.len());
    tx.disconnect(None).unwrap();
    rx.disconnect(None).unwrap();
    route.unspawn().unwrap();
    println!("moved {n} messages");
}
