//! Zero heap allocations per message in steady state, on send and on
//! receive, proven with a counting global allocator (per thread, so the
//! sender's and the receiver's counts are separate), on both backends and
//! both serializers.

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::time::Duration;

use ipcm::{Client, Info, Message, Options, Serializer};

struct Counting;

thread_local! {
    static ALLOCS: Cell<u64> = const { Cell::new(0) };
}

fn bump() {
    // `try_with`: the slot may be gone while a thread exits.
    let _ = ALLOCS.try_with(|c| c.set(c.get() + 1));
}

// SAFETY: forwards every call to the system allocator unchanged; counting
// touches only a const-initialised thread-local without a destructor.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        bump();
        // SAFETY: same contract as ours.
        unsafe { System.alloc(l) }
    }
    unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
        bump();
        // SAFETY: same contract as ours.
        unsafe { System.alloc_zeroed(l) }
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, n: usize) -> *mut u8 {
        bump();
        // SAFETY: same contract as ours.
        unsafe { System.realloc(p, l, n) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        // SAFETY: same contract as ours.
        unsafe { System.dealloc(p, l) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

fn allocs() -> u64 {
    ALLOCS.with(Cell::get)
}

/// Moves `rounds` batches of 64 messages from `tx` to `rx` on this thread;
/// returns (allocations while sending, allocations while receiving).
fn pump(tx: &mut Client, rx: &mut Client, rounds: usize, inbox: &mut Vec<Message>) -> (u64, u64) {
    let content = "\"0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcd\"";
    let (mut sending, mut receiving) = (0, 0);
    for _ in 0..rounds {
        let a = allocs();
        for _ in 0..64 {
            tx.queue_json("sink", content).unwrap();
        }
        tx.flush_pending(Some(Duration::from_secs(10))).unwrap();
        let b = allocs();
        let mut got = 0;
        while got < 64 {
            inbox.clear();
            got += rx
                .get_messages_timeout_into(inbox, Duration::from_secs(10))
                .unwrap();
        }
        assert_eq!(inbox.last().unwrap().content_json(), content);
        inbox.clear();
        let c = allocs();
        sending += b - a;
        receiving += c - b;
    }
    (sending, receiving)
}

fn steady_state_allocates_nothing_per_message(backend: ipcm::BackendChoice) {
    for ser in [Serializer::Binary, Serializer::Json] {
        let t = common::TestRoute::new(backend);
        let info = Info::new(ser.clone(), t.route.path());
        let opts = Options::new().backend(backend);
        let mut rx = Client::connect(&info, "sink", opts.clone()).unwrap();
        let mut tx = Client::connect(&info, "src", opts.listen(false)).unwrap();
        let mut inbox = Vec::with_capacity(4096);
        // Warm up: connect, hello, grow the arenas, pools and tables.
        pump(&mut tx, &mut rx, 200, &mut inbox);
        let rounds = 2_000;
        let messages = (rounds * 64) as f64;
        let (s, r) = pump(&mut tx, &mut rx, rounds, &mut inbox);
        eprintln!(
            "{backend:?} {}: {} messages: {s} allocations sending ({:.4}/msg), {r} receiving ({:.4}/msg)",
            ser.class(),
            messages,
            s as f64 / messages,
            r as f64 / messages
        );
        // Measured: none at all (send arenas and receive buffers are
        // reclaimed in place). The bound leaves room for a rare refill;
        // anything per message would be at least one per message.
        assert!(
            (s as f64) < messages / 1000.0,
            "sending allocates: {s} for {messages} messages"
        );
        assert!(
            (r as f64) < messages / 1000.0,
            "receiving allocates: {r} for {messages} messages"
        );
        tx.disconnect(None).unwrap();
        rx.disconnect(None).unwrap();
    }
}

per_backend!(steady_state_allocates_nothing_per_message);
