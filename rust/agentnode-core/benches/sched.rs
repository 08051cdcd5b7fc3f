//! Scheduler throughput in operations per second, a push and a pop counting as one operation
//! each, for three designs: the shipped mutex-guarded `Shared`; a lock-free inbox (pushes through
//! a lock-free channel, drained under the lock by whoever pops); and a single-owner scheduler
//! thread fed by a channel. `cargo bench -p agentnode-core --bench sched`.

#![allow(clippy::cast_precision_loss)] // op counts stay far below 2^52

use std::sync::mpsc;
use std::thread;
use std::time::Instant;

use agentnode_core::sched::{Class, Limits, Shared, Task};

const TENANTS: [&str; 8] = ["t0", "t1", "t2", "t3", "t4", "t5", "t6", "t7"];
const N: u64 = 1_000_000;

fn task(id: u64) -> Task<'static> {
    Task {
        id,
        tenant: TENANTS[(id % 8) as usize],
        class: Class::ALL[(id % 5) as usize],
        cpu: 1,
        mem: 1,
    }
}

/// Push and pop operations per second with `threads` threads, each keeping 64 tasks in flight.
fn mutex(threads: u64) -> f64 {
    let s = Shared::new(Limits::default());
    let t0 = Instant::now();
    thread::scope(|scope| {
        for th in 0..threads {
            let s = &s;
            scope.spawn(move || {
                let base = th * N;
                for i in 0..N / threads {
                    s.lock().push(&task(base + i)).unwrap();
                    if i >= 64 {
                        let mut g = s.lock();
                        let p = g.pop(u64::MAX, u64::MAX).unwrap();
                        g.complete(p.id).unwrap();
                    }
                }
            });
        }
    });
    2.0 * N as f64 / t0.elapsed().as_secs_f64()
}

/// The lock-free candidate: pushes go through std's lock-free unbounded channel and never take
/// the lock; a popper takes it, drains the inbox into the scheduler, then pops.
struct Inbox {
    tx: mpsc::Sender<u64>,
    inner: std::sync::Mutex<(mpsc::Receiver<u64>, agentnode_core::sched::Scheduler)>,
}

fn lock_free_inbox(threads: u64) -> f64 {
    let (tx, rx) = mpsc::channel();
    let inbox = Inbox {
        tx,
        inner: std::sync::Mutex::new((
            rx,
            agentnode_core::sched::Scheduler::new(Limits::default()),
        )),
    };
    let t0 = Instant::now();
    thread::scope(|scope| {
        for th in 0..threads {
            let inbox = &inbox;
            scope.spawn(move || {
                let base = th * N;
                for i in 0..N / threads {
                    inbox.tx.send(base + i).unwrap();
                    if i >= 64 {
                        let mut g = inbox.inner.lock().unwrap();
                        let (rx, s) = &mut *g;
                        for id in rx.try_iter() {
                            s.push(&task(id)).unwrap();
                        }
                        let p = s.pop(u64::MAX, u64::MAX).unwrap();
                        s.complete(p.id).unwrap();
                    }
                }
            });
        }
    });
    2.0 * N as f64 / t0.elapsed().as_secs_f64()
}

enum Msg {
    Push(u64),
    Pop(mpsc::SyncSender<u64>),
}

fn channel(threads: u64) -> f64 {
    let (tx, rx) = mpsc::sync_channel::<Msg>(1024);
    let owner = thread::spawn(move || {
        let mut s = agentnode_core::sched::Scheduler::new(Limits::default());
        for m in rx {
            match m {
                Msg::Push(id) => s.push(&task(id)).unwrap(),
                Msg::Pop(reply) => {
                    let p = s.pop(u64::MAX, u64::MAX).unwrap();
                    s.complete(p.id).unwrap();
                    reply.send(p.id).unwrap();
                }
            }
        }
    });
    let t0 = Instant::now();
    thread::scope(|scope| {
        for th in 0..threads {
            let tx = tx.clone();
            scope.spawn(move || {
                let (rtx, rrx) = mpsc::sync_channel(1);
                let base = th * N;
                for i in 0..N / threads {
                    tx.send(Msg::Push(base + i)).unwrap();
                    if i >= 64 {
                        tx.send(Msg::Pop(rtx.clone())).unwrap();
                        rrx.recv().unwrap();
                    }
                }
            });
        }
    });
    let rate = 2.0 * N as f64 / t0.elapsed().as_secs_f64();
    drop(tx);
    owner.join().unwrap();
    rate
}

fn batched() -> f64 {
    let s = Shared::new(Limits::default());
    let t0 = Instant::now();
    let mut id = 0;
    while id < N {
        let mut g = s.lock();
        for _ in 0..256 {
            g.push(&task(id)).unwrap();
            id += 1;
        }
        for p in g.pop_many(256, u64::MAX, u64::MAX) {
            g.complete(p.id).unwrap();
        }
    }
    2.0 * N as f64 / t0.elapsed().as_secs_f64()
}

fn main() {
    for threads in [1, 2] {
        println!(
            "sched push+pop, {threads} thread(s): mutex {:.2} M ops/s, lock-free inbox + mutex {:.2} M ops/s, channel-fed owner {:.2} M ops/s",
            mutex(threads) / 1e6,
            lock_free_inbox(threads) / 1e6,
            channel(threads) / 1e6
        );
    }
    println!(
        "sched push+pop, batches of 256 under one lock: {:.2} M ops/s",
        batched() / 1e6
    );
}
