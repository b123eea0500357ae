//! loom models of the hand-written synchronisation protocols: the
//! reactor's wake-up handshake ([`WakeFlags`]) and the threaded mode's
//! command hand-off, receive ring ([`RingGate`] plus the ring's readiness
//! signal), waits for room in the send queue (the same gate, roles
//! swapped) and closing handshake ([`CloseGate`]). loom runs every interleaving (and every weak-memory
//! outcome it models) of a few threads; a lost wake-up shows as a thread
//! blocked forever, which loom reports as a deadlock.
//!
//! Run with `RUSTFLAGS="--cfg ipcm_loom" cargo test --release --lib
//! loom_models` (`.ci/run` does). The protocols' own code runs here on
//! loom's atomics (`src/sync.rs`); the kernel objects around them (the
//! eventfds, the lock-free queues) are modelled by the smallest loom
//! equivalents with the same ordering guarantees.

use loom::sync::atomic::{AtomicUsize, Ordering};
use loom::sync::{Arc, Condvar, Mutex};
use loom::thread;

use crate::reactor::WakeFlags;
use crate::threaded::{CloseGate, RingGate};

/// An eventfd: a counter that a blocked reader waits on.
#[derive(Default)]
struct EventFd {
    count: Mutex<u64>,
    cv: Condvar,
}

impl EventFd {
    fn write(&self) {
        *self.count.lock().unwrap() += 1;
        self.cv.notify_all();
    }

    /// Blocks until the counter is non-zero (as a poll for readability).
    fn wait_readable(&self) {
        let mut c = self.count.lock().unwrap();
        while *c == 0 {
            c = self.cv.wait(c).unwrap();
        }
    }

    fn drain(&self) {
        *self.count.lock().unwrap() = 0;
    }
}

/// A reactor's wake-up: [`WakeFlags`] and its eventfd, as `Waker` and the
/// backends' waits use them.
#[derive(Default)]
struct ModelWaker {
    flags: WakeFlags,
    efd: EventFd,
}

impl ModelWaker {
    /// `Waker::wake`.
    fn wake(&self) {
        if self.flags.wake() {
            self.efd.write();
        }
    }

    /// One blocking wait of a backend (`wait_timeout` with no timeout, the
    /// wait, `finish_sleep`, the eventfd drained when it was readable).
    fn sleep(&self) {
        if self.flags.prepare_sleep() {
            self.efd.wait_readable();
            self.efd.drain();
        }
        self.flags.finish_sleep();
    }
}

#[test]
fn a_wake_is_never_lost_by_a_reactor_going_to_sleep() {
    loom::model(|| {
        let w = Arc::new(ModelWaker::default());
        let work = Arc::new(AtomicUsize::new(0));
        let t = {
            let (w, work) = (w.clone(), work.clone());
            thread::spawn(move || {
                work.store(1, Ordering::Release);
                w.wake();
            })
        };
        // The reactor: looks for work, and sleeps only if there is none.
        while work.load(Ordering::Acquire) == 0 {
            w.sleep();
        }
        t.join().unwrap();
    });
}

#[test]
fn two_wakers_and_two_sleeps_never_strand_the_reactor() {
    loom::model(|| {
        let w = Arc::new(ModelWaker::default());
        let work = Arc::new(AtomicUsize::new(0));
        let spawn = |w: Arc<ModelWaker>, work: Arc<AtomicUsize>| {
            thread::spawn(move || {
                work.fetch_add(1, Ordering::Release);
                w.wake();
            })
        };
        let a = spawn(w.clone(), work.clone());
        let b = spawn(w.clone(), work.clone());
        let mut seen = 0;
        while seen < 2 {
            seen = work.load(Ordering::Acquire);
            if seen < 2 {
                w.sleep();
            }
        }
        a.join().unwrap();
        b.join().unwrap();
    });
}

/// The threaded mode's command hand-off: senders push a command onto the
/// bounded queue and wake the reactor; the reactor takes every command,
/// then sleeps only if the queue is still empty (`Worker::serve`).
#[test]
fn commands_handed_to_a_sleeping_reactor_are_all_taken() {
    loom::model(|| {
        let w = Arc::new(ModelWaker::default());
        // The command queue (crossbeam's ArrayQueue: a push happens before
        // the pop that takes it).
        let cmds = Arc::new(Mutex::new(Vec::<u32>::new()));
        let senders: Vec<_> = (0..2)
            .map(|i| {
                let (w, cmds) = (w.clone(), cmds.clone());
                thread::spawn(move || {
                    cmds.lock().unwrap().push(i);
                    w.wake();
                })
            })
            .collect();
        let mut taken = Vec::new();
        loop {
            taken.append(&mut cmds.lock().unwrap());
            if taken.len() == 2 {
                break;
            }
            if !cmds.lock().unwrap().is_empty() {
                continue;
            }
            w.sleep();
        }
        taken.sort();
        assert_eq!(taken, [0, 1]);
        for s in senders {
            s.join().unwrap();
        }
    });
}

/// A single-producer single-consumer ring of one slot with rtrb's
/// orderings: each side publishes its index with `Release` and reads the
/// other's with `Acquire`.
struct Ring {
    slot: loom::cell::UnsafeCell<Option<u32>>,
    head: AtomicUsize,
    tail: AtomicUsize,
}

// SAFETY: the slot is written only by the producer while `tail == head`
// and read only by the consumer while `tail == head + 1`; the index
// handshake orders those accesses (loom checks it).
unsafe impl Sync for Ring {}

impl Ring {
    fn empty() -> Self {
        Ring {
            slot: loom::cell::UnsafeCell::new(None),
            head: AtomicUsize::new(0),
            tail: AtomicUsize::new(0),
        }
    }

    fn push(&self, v: u32) -> Result<(), u32> {
        let tail = self.tail.load(Ordering::Relaxed);
        if tail - self.head.load(Ordering::Acquire) == 1 {
            return Err(v);
        }
        // SAFETY: the ring is empty, so the consumer does not touch it.
        self.slot.with_mut(|p| unsafe { *p = Some(v) });
        self.tail.store(tail + 1, Ordering::Release);
        Ok(())
    }

    fn pop(&self) -> Option<u32> {
        let head = self.head.load(Ordering::Relaxed);
        if self.tail.load(Ordering::Acquire) == head {
            return None;
        }
        // SAFETY: the ring is full, so the producer does not touch it.
        let v = self.slot.with_mut(|p| unsafe { (*p).take() });
        self.head.store(head + 1, Ordering::Release);
        v
    }
}

/// The receive ring: the reactor pushes messages and signals the ring's
/// descriptor once per batch (`Worker::deliver`); finding the ring full it
/// announces so through [`RingGate`], looks again, and sleeps until the
/// reader wakes it. The reader pops, wakes a waiting reactor, and when the
/// ring is empty drains the descriptor, looks again, and blocks on it
/// (`Receiver::try_recv` and `recv`). Neither may wait forever.
#[test]
fn the_receive_ring_loses_no_wake_up_either_way() {
    loom::model(|| {
        let ring = Arc::new(Ring::empty());
        let gate = Arc::new(RingGate::default());
        let reactor = Arc::new(ModelWaker::default());
        let ready = Arc::new(EventFd::default());
        let producer = {
            let (ring, gate, reactor, ready) =
                (ring.clone(), gate.clone(), reactor.clone(), ready.clone());
            thread::spawn(move || {
                for v in 0..2u32 {
                    while let Err(v) = ring.push(v) {
                        gate.producer_blocked();
                        if ring.push(v).is_ok() {
                            break;
                        }
                        reactor.sleep();
                    }
                    ready.write();
                }
            })
        };
        let mut got = Vec::new();
        while got.len() < 2 {
            let popped = ring.pop().or_else(|| {
                ready.drain();
                ring.pop()
            });
            match popped {
                Some(v) => {
                    if gate.consumer_popped() {
                        reactor.wake();
                    }
                    got.push(v);
                }
                None => ready.wait_readable(),
            }
        }
        assert_eq!(got, [0, 1]);
        producer.join().unwrap();
    });
}

/// Waits for room in the send queue (`Room` in `threaded.rs`): a sender
/// finding the one-slot queue full registers its waker, announces its
/// wait on a [`RingGate`] and pushes once more before it sleeps; the
/// reactor, after each pop, counts on the gate and wakes every registered
/// waker if a wait was announced. Two senders, each pushing one command
/// into a one-slot queue: neither may sleep forever.
#[test]
fn senders_waiting_for_queue_room_are_always_woken() {
    loom::model(|| {
        let queue = Arc::new(Ring::empty());
        // The one-slot ring is single-producer: the two senders take turns
        // through a lock, as pushes onto crossbeam's queue are linearised.
        let push_lock = Arc::new(Mutex::new(()));
        let gate = Arc::new(RingGate::default());
        let wakers: Arc<Mutex<Vec<Arc<ModelWaker>>>> = Arc::new(Mutex::new(Vec::new()));
        let senders: Vec<_> = (0..2u32)
            .map(|v| {
                let (queue, push_lock, gate, wakers) = (
                    queue.clone(),
                    push_lock.clone(),
                    gate.clone(),
                    wakers.clone(),
                );
                thread::spawn(move || {
                    let me = Arc::new(ModelWaker::default());
                    let push = |v| {
                        let _g = push_lock.lock().unwrap();
                        queue.push(v)
                    };
                    while push(v).is_err() {
                        wakers.lock().unwrap().push(me.clone());
                        gate.producer_blocked();
                        if push(v).is_ok() {
                            break;
                        }
                        me.sleep();
                    }
                })
            })
            .collect();
        let mut got = Vec::new();
        while got.len() < 2 {
            match queue.pop() {
                Some(v) => {
                    got.push(v);
                    if gate.consumer_popped() {
                        for w in std::mem::take(&mut *wakers.lock().unwrap()) {
                            w.wake();
                        }
                    }
                }
                None => thread::yield_now(),
            }
        }
        got.sort();
        assert_eq!(got, [0, 1]);
        for s in senders {
            s.join().unwrap();
        }
    });
}

/// The closing handshake ([`CloseGate`]): a sender enters, pushes and
/// leaves; the reactor closes, then takes what is queued, once. Every
/// command is either refused or taken: none is stranded.
#[test]
fn no_command_is_stranded_when_the_reactor_closes() {
    loom::model(|| {
        let gate = Arc::new(CloseGate::default());
        let cmds = Arc::new(Mutex::new(Vec::<u32>::new()));
        let sender = {
            let (gate, cmds) = (gate.clone(), cmds.clone());
            thread::spawn(move || {
                if !gate.enter() {
                    return false;
                }
                cmds.lock().unwrap().push(7);
                gate.leave();
                true
            })
        };
        gate.close();
        let taken = std::mem::take(&mut *cmds.lock().unwrap());
        let accepted = sender.join().unwrap();
        assert_eq!(taken.len(), usize::from(accepted), "accepted means taken");
        assert!(cmds.lock().unwrap().is_empty(), "nothing left behind");
    });
}
