//! The shared-memory lane between ipcm peers: the switch from the socket,
//! order and completeness across it, and what stays on the socket.

mod common;

use std::time::{Duration, Instant};

use common::*;
use ipcm::{BackendChoice, Client, LaneKind, Message, Serializer};

per_backend!(messages_cross_the_switch_in_order_and_complete,);

fn lane_opts(t: &TestRoute) -> ipcm::Options {
    t.opts()
        .lane(true)
        .lane_after_bytes(4096)
        .lane_ring_bytes(256 * 1024)
}

fn recv_until(c: &mut Client, n: usize, out: &mut Vec<Message>) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while out.len() < n {
        assert!(Instant::now() < deadline, "{} of {n} arrived", out.len());
        out.extend(c.get_messages_timeout(Duration::from_millis(50)).unwrap());
    }
}

fn messages_cross_the_switch_in_order_and_complete(b: BackendChoice) {
    let t = TestRoute::new(b);
    for ser in [Serializer::Json, Serializer::Binary] {
        let info = ipcm::Info::new(ser.clone(), t.route.path());
        let name = |s: &str| format!("{s}-{}", ser.class().len());
        let (an, bn) = (name("a"), name("b"));
        let mut a = Client::connect(&info, &an, lane_opts(&t)).unwrap();
        let mut bc = Client::connect(&info, &bn, lane_opts(&t)).unwrap();
        const N: usize = 20_000;
        let mut got = Vec::new();
        for i in 0..N {
            a.send_message(&bn, &i).unwrap();
            if i % 256 == 0 {
                got.extend(bc.get_messages().unwrap());
            }
        }
        recv_until(&mut bc, N, &mut got);
        let seen: Vec<usize> = got.iter().map(|m| m.content::<usize>().unwrap()).collect();
        assert_eq!(seen, (0..N).collect::<Vec<_>>());
        assert_eq!(a.lane(&bn), Some(LaneKind::SharedMemory), "{ser:?}");
        assert_eq!(bc.lane(&an), Some(LaneKind::SharedMemory), "{ser:?}");
        // Replies go back over the same lane.
        let mut back = Vec::new();
        for i in 0..N {
            bc.send_message(&an, &i).unwrap();
            if i % 256 == 0 {
                back.extend(a.get_messages().unwrap());
            }
        }
        recv_until(&mut a, N, &mut back);
        let seen: Vec<usize> = back.iter().map(|m| m.content::<usize>().unwrap()).collect();
        assert_eq!(seen, (0..N).collect::<Vec<_>>());
        assert_eq!(a.stats().sent[&bn], N as u64);
        assert_eq!(bc.stats().read[&an], N as u64);
        assert_eq!(bc.stats().sent[&an], N as u64);
        assert_eq!(a.stats().read[&bn], N as u64);
        assert_eq!(a.resources().lanes, 1);
        a.disconnect(None).unwrap();
        bc.disconnect(None).unwrap();
    }
}
