//! Two OS processes move 100,000 messages: nothing lost, nothing
//! duplicated, order kept, and both `.stats` files agree.

#[macro_use]
mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use common::{ROLE_ENV, TestRoute, backend_from_env, backend_name, helper_command};
use ipcm::{BackendChoice, Client, Info, Options, Stats};
use serde_json::json;

const MESSAGES: u64 = 100_000;

/// Helper process: sends `IPCM_COUNT` numbered messages to `rx`, then waits
/// for rx's reply and disconnects cleanly.
#[test]
#[ignore = "helper process entry, run by the tests of this file"]
fn helper_process_entry() {
    let Ok(role) = std::env::var(ROLE_ENV) else {
        return;
    };
    assert_eq!(role, "sender");
    common::init_logging();
    let info = Info::parse(&std::env::var("IPCM_INFO").unwrap()).unwrap();
    let count: u64 = std::env::var("IPCM_COUNT").unwrap().parse().unwrap();
    let blocking = std::env::var("IPCM_BLOCKING").unwrap() == "1";
    let mut tx = Client::connect(&info, "tx", Options::new().backend(backend_from_env())).unwrap();
    tx.set_send_blocking(blocking);
    for seq in 0..count {
        let content = json!({"seq": seq, "pad": "0123456789abcdef"});
        loop {
            match tx.send_message("rx", &content) {
                Ok(()) => break,
                Err(ipcm::Error::WouldBlock { .. }) => {
                    tx.drain_pending();
                    std::thread::sleep(Duration::from_micros(100));
                }
                Err(e) => panic!("send {seq}: {e}"),
            }
        }
    }
    // Wait for the receiver's "done" (over the same connection), so that
    // disconnect has nothing in flight.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let msgs = tx.get_messages_timeout(Duration::from_millis(100)).unwrap();
        if let Some(m) = msgs
            .iter()
            .find(|m| m.content_value().unwrap()["done"].is_string())
        {
            let v = m.content_value().unwrap();
            assert_eq!(
                v["done"],
                info.route.as_str(),
                "a 'done' from another route"
            );
            break;
        }
        assert!(Instant::now() < deadline, "no 'done' from rx");
    }
    tx.disconnect(None).unwrap();
}

per_backend!(
    hundred_thousand_messages_blocking,
    hundred_thousand_messages_non_blocking
);

fn hundred_thousand_messages_blocking(b: BackendChoice) {
    run(b, true);
}

fn hundred_thousand_messages_non_blocking(b: BackendChoice) {
    run(b, false);
}

fn run(b: BackendChoice, blocking: bool) {
    common::init_logging();
    let t = TestRoute::new(b);
    let mut rx = t.connect("rx");
    let mut child = helper_command("sender")
        .env("IPCM_INFO", t.info().to_info_string())
        .env("IPCM_COUNT", MESSAGES.to_string())
        .env("IPCM_BLOCKING", if blocking { "1" } else { "0" })
        .env("IPCM_TEST_BACKEND", backend_name(b))
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut next = 0u64;
    while next < MESSAGES {
        assert!(Instant::now() < deadline, "only {next} messages arrived");
        for m in rx.get_messages_timeout(Duration::from_millis(200)).unwrap() {
            assert_eq!(m.from(), "tx");
            let seq = m.content_value().unwrap()["seq"].as_u64().unwrap();
            assert_eq!(seq, next, "lost, duplicated or reordered");
            next += 1;
        }
        if let Some(status) = child.try_wait().unwrap() {
            assert!(
                next == MESSAGES || status.success(),
                "sender failed: {status:?}"
            );
        }
    }
    if let Err(e) = rx.send_message("tx", &json!({"done": t.route.path()})) {
        panic!(
            "sending 'done' failed: {e}; sender exit: {:?}",
            child.wait()
        );
    }
    let status = child.wait().unwrap();
    assert!(status.success(), "sender: {status:?}");
    // Nothing more arrives.
    assert!(
        rx.get_messages_timeout(Duration::from_millis(100))
            .unwrap()
            .is_empty()
    );
    rx.disconnect(None).unwrap();

    let all: BTreeMap<String, Stats> = t.route.all_stats(&ipcm::Serializer::Json).unwrap();
    assert_eq!(all["tx"].sent["rx"], MESSAGES);
    assert_eq!(all["rx"].read["tx"], MESSAGES);
    assert_eq!(all["rx"].sent["tx"], 1);
    assert_eq!(all["tx"].read["rx"], 1);
}
